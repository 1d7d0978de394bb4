//! What every egress transport does the same way with gRPC on the wire: a call's request head
//! (`PROTOCOL-HTTP2.md` "Requests", or gRPC-Web's), the upstream's response head as a reply
//! ("Responses"), decoded reply frames as reply items, and the statuses for what cannot be
//! decoded.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures_core::Stream;
use http::header::{self, HeaderValue};
use http::{HeaderMap, StatusCode};
use pnp_call::{
    CallHead, Code, Message, Reply, ReplyItem, ResponseHead, Status, FRAGMENT_THRESHOLD,
};
use pnp_wire::content_type::{self, Protocol};
use pnp_wire::frame::{Frame as WireFrame, FrameDecoder, FrameError, FrameKind, Part as WirePart};

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

/// A native gRPC response (any HTTP body) as the call model's [`Reply`]: its head read as
/// [`grpc_answer`] reads it, its body decoded into reply items one message (or fragment) at a
/// time, ending with the status from its trailers; a body that ends without them, or cannot be
/// decoded, ends with an error status, never OK. `guard` lives as long as the item stream
/// (a transport's in-flight count, a connection lease).
pub fn reply_from_response<B, G>(
    response: http::Response<B>,
    max_message_size: usize,
    guard: G,
) -> Reply
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: bytes::Buf + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    G: Send + Unpin + 'static,
{
    let (parts, body) = response.into_parts();
    let head = match grpc_answer(parts.status, parts.headers) {
        Answer::Stream(head) => head,
        Answer::TrailersOnly(status) | Answer::NotGrpc(status) => {
            return Reply::TrailersOnly(status)
        }
    };
    Reply::Stream {
        head,
        items: Box::pin(BodyReply {
            body,
            decoder: FrameDecoder::new(FrameKind::Grpc, max_message_size)
                .with_fragments(FRAGMENT_THRESHOLD),
            done: false,
            _guard: guard,
        }),
    }
}

/// Decodes a gRPC response body into reply items, one message at a time.
struct BodyReply<B, G> {
    body: B,
    decoder: FrameDecoder,
    done: bool,
    _guard: G,
}

impl<B, G> BodyReply<B, G> {
    fn finish(&mut self, status: Status) -> Poll<Option<ReplyItem>> {
        self.done = true;
        Poll::Ready(Some(ReplyItem::Status(status)))
    }
}

impl<B, G> Stream for BodyReply<B, G>
where
    B: http_body::Body + Unpin,
    B::Data: bytes::Buf,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    G: Unpin,
{
    type Item = ReplyItem;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ReplyItem>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match next_item(&mut this.decoder) {
                Decoded::Item(item) => return Poll::Ready(Some(item)),
                Decoded::Trailers(_) => return this.finish(trailer_frame_on_grpc()),
                Decoded::Failed(status) => return this.finish(status),
                Decoded::NeedMore => {}
            }
            let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(mut data) => {
                        let len = bytes::Buf::remaining(&data);
                        this.decoder.push(bytes::Buf::copy_to_bytes(&mut data, len));
                    }
                    Err(frame) => {
                        let status = match frame.into_trailers() {
                            Ok(trailers) => match this.decoder.finish() {
                                Err(e) => frame_error_status(&e),
                                Ok(()) => Status::from_headers(&trailers).unwrap_or_else(|| {
                                    Status::new(
                                        Code::Internal,
                                        "upstream sent trailers without grpc-status",
                                    )
                                }),
                            },
                            Err(_) => continue,
                        };
                        return this.finish(status);
                    }
                },
                Some(Err(e)) => {
                    let e: Box<dyn std::error::Error + Send + Sync> = e.into();
                    let err = TransportError::from_http(&*e, "upstream stream failed");
                    return this.finish(*err.status);
                }
                None => {
                    let status = match this.decoder.finish() {
                        Err(e) => frame_error_status(&e),
                        Ok(()) => Status::new(
                            Code::Internal,
                            "upstream ended the stream without trailers (no grpc-status)",
                        ),
                    };
                    return this.finish(status);
                }
            }
        }
    }
}
