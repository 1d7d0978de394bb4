//! What every egress transport does the same way with gRPC on the wire: a call's request head
//! (`PROTOCOL-HTTP2.md` "Requests", or gRPC-Web's), the upstream's response head as a reply
//! ("Responses"), decoded reply frames as reply items, and the statuses for what cannot be
//! decoded.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, StatusCode};
use pnp_call::{CallHead, Code, Message, ReplyItem, ResponseHead, Status};
use pnp_wire::content_type::{self, Protocol};
use pnp_wire::frame::{Frame as WireFrame, FrameDecoder, FrameError, Part as WirePart};

use crate::{strip_response_headers, Blame, TransportError};

/// The request to `head.path` on `authority` (over TLS when `https`): its URI, or the
/// proxy's own failure to build one.
pub(crate) fn request_uri(
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    head: &CallHead,
) -> Result<http::Uri, TransportError> {
    http::Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(head.path.clone())
        .build()
        .map_err(|e| TransportError {
            status: Box::new(Status::new(
                Code::Internal,
                format!("pnp: cannot build upstream URI: {e}"),
            )),
            blame: Blame::Proxy,
            unprocessed: true,
        })
}

/// The request headers of a call sent as `protocol` (native gRPC or binary gRPC-Web): its
/// metadata, the content type with the call's subtype, `te: trailers` (gRPC) or `x-grpc-web`
/// and `accept` (gRPC-Web), and the remaining deadline as `grpc-timeout`.
pub(crate) fn request_headers(
    mut headers: HeaderMap,
    subtype: Option<&str>,
    timeout: Option<std::time::Duration>,
    protocol: Protocol,
) -> HeaderMap {
    let base = protocol.content_type();
    let content_type = match subtype {
        Some(sub) => HeaderValue::from_str(&format!("{base}+{sub}"))
            .unwrap_or(HeaderValue::from_static(base)),
        None => HeaderValue::from_static(base),
    };
    headers.insert(header::CONTENT_TYPE, content_type);
    if protocol.is_web() {
        headers.insert("x-grpc-web", HeaderValue::from_static("1"));
        headers.insert(header::ACCEPT, HeaderValue::from_static(base));
    } else {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(timeout) = timeout {
        if let Ok(value) = HeaderValue::from_str(&pnp_wire::timeout::encode(timeout)) {
            headers.insert("grpc-timeout", value);
        }
    }
    headers
}

/// What a gRPC response head says of the call (PROTOCOL-HTTP2.md "Responses").
pub(crate) enum Answer {
    /// A reply stream follows, with this head.
    Stream(ResponseHead),
    /// Trailers-Only: the status came in the headers and nothing follows.
    TrailersOnly(Status),
    /// Not a gRPC answer (another HTTP status, another content type): the status the client
    /// gets instead.
    NotGrpc(Status),
}

/// Read a native gRPC response head: a non-200 answer is mapped from its HTTP status
/// (http-grpc-status-mapping.md), whatever else it carries; a 200 must be `application/grpc`.
pub(crate) fn grpc_answer(status: StatusCode, mut headers: HeaderMap) -> Answer {
    if status != StatusCode::OK {
        return Answer::NotGrpc(Status::new(
            Code::from_http_status(status.as_u16()),
            format!(
                "upstream answered HTTP {} ({}), not gRPC",
                status.as_u16(),
                describe_content_type(&headers)
            ),
        ));
    }
    let subtype = match headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(content_type::parse)
    {
        Some((Protocol::Grpc, subtype)) => subtype.map(str::to_owned),
        _ => {
            return Answer::NotGrpc(Status::new(
                Code::Unknown,
                format!(
                    "upstream answered HTTP 200 with {}, not gRPC",
                    describe_content_type(&headers)
                ),
            ))
        }
    };
    // The other headers are the reply's metadata, minus what belongs to this hop.
    if let Some(mut status) = Status::from_headers(&headers) {
        strip_response_headers(&mut headers);
        status.metadata = headers;
        return Answer::TrailersOnly(status);
    }
    strip_response_headers(&mut headers);
    Answer::Stream(ResponseHead {
        metadata: headers,
        subtype,
    })
}

/// The content type of an answer, for a status message.
pub(crate) fn describe_content_type(headers: &HeaderMap) -> String {
    match headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        Some(ct) => format!("content-type {}", ct.chars().take(64).collect::<String>()),
        None => "no content-type".to_owned(),
    }
}

/// What a reply's frame decoder has ready.
pub(crate) enum Decoded {
    /// A message, the head of a large one, or a fragment of it.
    Item(ReplyItem),
    /// A gRPC-Web trailer frame (its header block).
    Trailers(Bytes),
    /// Nothing until more bytes come.
    NeedMore,
    /// The body cannot be decoded: the call ends with this status.
    Failed(Status),
}

/// The next reply item the decoder has, as the reply streams of every transport take them.
pub(crate) fn next_item(decoder: &mut FrameDecoder) -> Decoded {
    match decoder.next_part() {
        Ok(Some(WirePart::Frame(WireFrame::Message { compressed, data }))) => {
            Decoded::Item(ReplyItem::Message(Message { compressed, data }))
        }
        Ok(Some(WirePart::Head { compressed, len })) => {
            Decoded::Item(ReplyItem::Head { compressed, len })
        }
        Ok(Some(WirePart::Fragment { data, last })) => {
            Decoded::Item(ReplyItem::Fragment { data, last })
        }
        Ok(Some(WirePart::Frame(WireFrame::Trailers { block, .. }))) => Decoded::Trailers(block),
        Ok(None) => Decoded::NeedMore,
        Err(e) => Decoded::Failed(frame_error_status(&e)),
    }
}

/// The status for a native gRPC reply that carried a gRPC-Web trailer frame (a decoder of
/// `FrameKind::Grpc` never yields one; a protocol error if it did).
pub(crate) fn trailer_frame_on_grpc() -> Status {
    Status::new(
        Code::Internal,
        "upstream sent a gRPC-Web trailer frame on a gRPC stream",
    )
}

/// The status for a reply body that could not be decoded.
pub(crate) fn frame_error_status(e: &FrameError) -> Status {
    match e {
        FrameError::TooLarge { len, max } => Status::new(
            Code::ResourceExhausted,
            format!("upstream message of {len} bytes exceeds the limit of {max} bytes"),
        ),
        FrameError::Truncated { buffered } => Status::new(
            Code::Internal,
            format!("upstream stream ended inside a message ({buffered} bytes of it received)"),
        ),
        other => Status::new(Code::Internal, format!("malformed upstream frame: {other}")),
    }
}
