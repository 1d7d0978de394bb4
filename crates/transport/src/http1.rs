//! gRPC-Web (binary) over HTTP/1.1 with chunked transfer encoding, to a peer pnp or any gRPC-Web
//! server (tonic-web, Envoy's grpc_web filter): the transport for paths where only HTTP/1.1
//! gets through.
//!
//! HTTP/1.1 carries one call per connection at a time, so a call takes a connection of its own
//! from a bounded pool ([`Http1Options::max_connections`]); a connection goes back to the pool
//! only after its reply ended cleanly (trailer frame read, body complete). The request body is
//! chunked: each request part leaves as it comes, and a request cut short never gets its last
//! (zero-length) chunk, so the upstream sees a broken body, never a complete one. Cancelling a
//! call — dropping its reply — closes its connection, which is the only way HTTP/1.1 has to say
//! "stop" to the upstream. The status comes in the gRPC-Web trailer frame at the end of the
//! body; a body that ends without one is an error, never OK.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use futures_util::StreamExt;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use pnp_call::{Call, Code, Reply, ReplyItem, ResponseHead, Status, FRAGMENT_THRESHOLD};
use pnp_wire::content_type::{self, Protocol};
use pnp_wire::frame::{FrameDecoder, FrameKind};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;

use crate::api::{BoxFuture, Capabilities, Estimate, Kind, Meter, Transport};
use crate::connect::{connector, open, unreachable, Alpn, Endpoint};
use crate::grpc::{self, Decoded};
use crate::http2::{part_frame, EgressBody};
use crate::{strip_response_headers, Blame, TransportError};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How to reach one upstream over HTTP/1.1.
#[derive(Clone, Debug)]
pub struct Http1Options {
    /// `h1://host:port` (cleartext) or `h1s://host:port` (TLS, ALPN `http/1.1`).
    pub upstream: url::Url,
    /// Extra PEM roots for TLS upstreams.
    pub extra_roots_pem: Option<Vec<u8>>,
    /// TCP+TLS connect timeout.
    pub connect_timeout: Duration,
    /// Connections open at once (each carries one call at a time): the most calls in flight.
    pub max_connections: usize,
    /// Idle connections kept for later calls.
    pub max_idle: usize,
}

/// The chunked HTTP/1.1 egress transport.
#[derive(Clone)]
pub struct Http1Transport {
    shared: Arc<Shared>,
}

struct Shared {
    endpoint: Endpoint,
    connector: HttpsConnector<HttpConnector>,
    options: Http1Options,
    /// One permit per open connection, idle or busy.
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Conn>>,
    meter: Arc<Meter>,
}

/// One open connection, with its place in the pool.
struct Conn {
    sender: SendRequest<EgressBody>,
    task: AbortHandle,
    _permit: OwnedSemaphorePermit,
}

impl fmt::Debug for Http1Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Http1Transport")
            .field("upstream", &self.shared.endpoint.authority)
            .finish()
    }
}

impl Http1Transport {
    /// Build the transport; no connection is made until the first call (or [`Transport::ready`]).
    pub fn new(options: Http1Options) -> io::Result<Self> {
        let tls = options.upstream.scheme() == "h1s";
        let endpoint = Endpoint::new(&options.upstream, tls)?;
        let connector = connector(
            options.extra_roots_pem.as_deref(),
            tls,
            options.connect_timeout,
            Alpn::Http1,
        )?;
        Ok(Self {
            shared: Arc::new(Shared {
                endpoint,
                connector,
                permits: Arc::new(Semaphore::new(options.max_connections.max(1))),
                idle: Mutex::new(Vec::new()),
                options,
                meter: Meter::new(),
            }),
        })
    }
}

impl Shared {
    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Conn>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A connection for one call: an idle one that is still open, else a new one once the pool
    /// has room.
    async fn checkout(&self) -> Result<Conn, TransportError> {
        loop {
            let Some(mut conn) = self.idle().pop() else {
                break;
            };
            if !conn.sender.is_closed() && conn.sender.ready().await.is_ok() {
                return Ok(conn);
            }
        }
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| unreachable("HTTP/1.1 pool closed".into()))?;
        self.connect(permit).await
    }

    async fn connect(&self, permit: OwnedSemaphorePermit) -> Result<Conn, TransportError> {
        let io = open(
            &self.connector,
            &self.endpoint,
            self.options.connect_timeout,
        )
        .await?;
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| {
                let mut err = TransportError::from_http(&e, "upstream HTTP/1.1 handshake failed");
                err.unprocessed = true;
                err
            })?;
        let authority = self.endpoint.authority.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(upstream = %authority, error = %e, "upstream HTTP/1.1 connection ended");
            }
        })
        .abort_handle();
        Ok(Conn {
            sender,
            task,
            _permit: permit,
        })
    }

    /// A connection whose call ended cleanly goes back to the pool (if it has room).
    fn checkin(&self, conn: Conn) {
        if conn.sender.is_closed() {
            return;
        }
        let mut idle = self.idle();
        if idle.len() < self.options.max_idle {
            idle.push(conn);
        }
    }

    fn request(&self, call: Call) -> Result<Request<EgressBody>, TransportError> {
        let endpoint = &self.endpoint;
        let uri = grpc::request_uri(
            endpoint.scheme.clone(),
            endpoint.authority.clone(),
            &call.head,
        )?;
        let mut headers = grpc::request_headers(
            call.head.metadata,
            call.head.subtype.as_deref(),
            call.head.timeout,
            Protocol::GrpcWeb,
        );
        if let Ok(host) = HeaderValue::from_str(self.endpoint.authority.as_str()) {
            headers.insert(header::HOST, host);
        }
        let frames = call.messages.map(|item| match item {
            Ok(part) => Ok(Frame::data(part_frame(part))),
            Err(status) => Err(BoxError::from(TransportError {
                status: Box::new(status),
                blame: Blame::Client,
                unprocessed: false,
            })),
        });
        let mut request = Request::new(StreamBody::new(frames).boxed_unsync());
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        Ok(request)
    }
}

impl Transport for Http1Transport {
    fn kind(&self) -> Kind {
        Kind::H1
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            client_streaming: false,
            full_duplex: false,
            multiplexed: false,
            max_message_size: u32::MAX as u64,
        }
    }

    fn ready(&self) -> BoxFuture<Result<(), TransportError>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let conn = shared.checkout().await?;
            shared.checkin(conn);
            Ok(())
        })
    }

    fn call(&self, call: Call) -> BoxFuture<Result<Reply, TransportError>> {
        let max = call.head.max_message_size;
        let shared = self.shared.clone();
        let request = shared.request(call);
        self.shared.meter.measure(async move {
            let request = request?;
            let mut conn = shared.checkout().await?;
            let response = conn.sender.send_request(request).await;
            let response = match response {
                Ok(response) => response,
                Err(e) => {
                    conn.task.abort();
                    return Err(TransportError::from_http(&e, "upstream request failed"));
                }
            };
            Ok(reply_from_response(response, max, conn, shared))
        })
    }

    fn estimate(&self) -> Estimate {
        self.shared.meter.estimate()
    }
}

/// Turn an upstream gRPC-Web response into a reply.
fn reply_from_response(
    response: Response<Incoming>,
    max_message_size: usize,
    conn: Conn,
    shared: Arc<Shared>,
) -> Reply {
    let (parts, body) = response.into_parts();
    let lease = Lease {
        conn: Some(conn),
        shared,
        clean: false,
    };
    if parts.status != StatusCode::OK {
        let code = Code::from_http_status(parts.status.as_u16());
        return Reply::TrailersOnly(Status::new(
            code,
            format!(
                "upstream answered HTTP {} over HTTP/1.1, not gRPC-Web",
                parts.status.as_u16()
            ),
        ));
    }
    let subtype =
        match parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(content_type::parse)
        {
            Some((Protocol::GrpcWeb, subtype)) => subtype.map(str::to_owned),
            _ => return Reply::TrailersOnly(Status::new(
                Code::Unknown,
                "upstream answered HTTP 200 over HTTP/1.1 without a gRPC-Web (binary) content type",
            )),
        };
    let mut metadata = parts.headers;
    if let Some(mut status) = Status::from_headers(&metadata) {
        // Trailers-Only: the status came in the headers.
        strip_response_headers(&mut metadata);
        strip_web_headers(&mut metadata);
        status.metadata = metadata;
        return Reply::TrailersOnly(status);
    }
    strip_response_headers(&mut metadata);
    strip_web_headers(&mut metadata);
    Reply::Stream {
        head: ResponseHead { metadata, subtype },
        items: Box::pin(WebReplyStream {
            body,
            decoder: FrameDecoder::new(FrameKind::GrpcWebResponse, max_message_size)
                .with_fragments(FRAGMENT_THRESHOLD),
            status: None,
            done: false,
            lease,
        }),
    }
}

/// HTTP/1.1 framing headers that are not the reply's metadata.
fn strip_web_headers(headers: &mut http::HeaderMap) {
    for name in [
        header::TRANSFER_ENCODING,
        header::CONNECTION,
        header::CONTENT_LENGTH,
        header::VARY,
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
    ] {
        headers.remove(name);
    }
}

/// A call's hold on its connection: back to the pool after a clean end, closed otherwise.
struct Lease {
    conn: Option<Conn>,
    shared: Arc<Shared>,
    clean: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.clean {
            self.shared.checkin(conn);
        } else {
            // Cancelled or broken: closing the connection is HTTP/1.1's reset.
            conn.task.abort();
        }
    }
}

/// Decodes a gRPC-Web body into reply items; the trailer frame carries the status.
struct WebReplyStream {
    body: Incoming,
    decoder: FrameDecoder,
    /// The status from the trailer frame, delivered once the body has ended.
    status: Option<Status>,
    done: bool,
    lease: Lease,
}

impl WebReplyStream {
    fn finish(&mut self, status: Status) -> Poll<Option<ReplyItem>> {
        self.done = true;
        Poll::Ready(Some(ReplyItem::Status(status)))
    }
}

impl Stream for WebReplyStream {
    type Item = ReplyItem;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ReplyItem>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if this.status.is_none() {
                match grpc::next_item(&mut this.decoder) {
                    Decoded::Item(item) => return Poll::Ready(Some(item)),
                    Decoded::Trailers(block) => {
                        let status = match pnp_wire::trailers::decode_block(&block) {
                            Ok(trailers) => Status::from_headers(&trailers).unwrap_or_else(|| {
                                Status::new(
                                    Code::Internal,
                                    "upstream trailer frame has no grpc-status",
                                )
                            }),
                            Err(e) => Status::new(
                                Code::Internal,
                                format!("malformed upstream trailer frame: {e}"),
                            ),
                        };
                        this.status = Some(status);
                    }
                    Decoded::Failed(status) => return this.finish(status),
                    Decoded::NeedMore => {}
                }
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        this.decoder.push(data);
                    }
                }
                Some(Err(e)) => {
                    let err = TransportError::from_http(&e, "upstream stream failed");
                    return this.finish(*err.status);
                }
                None => {
                    let status = match (this.status.take(), this.decoder.finish()) {
                        (Some(status), Ok(())) => {
                            this.lease.clean = true;
                            status
                        }
                        (_, Err(e)) => grpc::frame_error_status(&e),
                        (None, Ok(())) => Status::new(
                            Code::Internal,
                            "upstream ended the HTTP/1.1 body without a trailer frame (no grpc-status)",
                        ),
                    };
                    return this.finish(status);
                }
            }
        }
    }
}
