//! gRPC over HTTP/2 to an upstream, cleartext (h2c prior knowledge) or TLS (ALPN `h2`).
//!
//! Calls go over a small pool of connections, filled in order (100 calls each, then the next),
//! so load spreads behind L4 balancers and past the upstream's MAX_CONCURRENT_STREAMS once it
//! is high, and stays on one connection (one write for many calls' frames) while it is not. Flow control isolates calls: each stream's receive window bounds what
//! one call can hold unread in pnp, and the connection window is as large as HTTP/2 allows, so
//! streams whose clients stopped reading never exhaust it for the others. Requests carry
//! `te: trailers` and the remaining deadline as `grpc-timeout` (PROTOCOL-HTTP2.md "Requests").
//! Replies are decoded frame by frame, so each message reaches the client as soon as it arrives.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioTimer;
use pnp_call::{Call, Part, Reply};
use pnp_wire::content_type::Protocol;
use pnp_wire::frame::FrameBuf;

use hyper::client::conn::http2::SendRequest;

use crate::api::{BoxFuture, Capabilities, Estimate, Kind, Meter, Transport};
use crate::batch::{Batched, BatchedExecutor};
use crate::connect::{connector, open, Alpn, Endpoint};
use crate::grpc;
use crate::{Blame, TransportError};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The request body type sent upstream: frames written without copying their payloads.
pub type EgressBody = UnsyncBoxBody<FrameBuf, BoxError>;

/// How to reach one upstream over HTTP/2.
#[derive(Clone, Debug)]
pub struct Http2Options {
    /// `http://host:port` (h2c) or `https://host:port` (TLS).
    pub upstream: url::Url,
    /// Extra PEM roots for TLS upstreams.
    pub extra_roots_pem: Option<Vec<u8>>,
    /// TCP+TLS connect timeout.
    pub connect_timeout: Duration,
    /// HTTP/2 PING interval. Pings go out only while streams are open (never on an idle
    /// connection), so a gRPC server's keepalive enforcement (gRFC A8: by default no more than
    /// one ping per 5 minutes without data) is never tripped by an idle pool.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// Connections in the pool (at least 1).
    pub connections: usize,
    /// Receive window per stream: the most one call holds unread from the upstream.
    pub stream_window: u32,
}

/// Calls a pooled connection takes before new calls spill over to the next one (the common
/// default of servers' MAX_CONCURRENT_STREAMS).
const STREAMS_PER_CONNECTION: usize = 100;

/// The connection receive window: HTTP/2's maximum (RFC 9113 §6.9.1), so only stream windows
/// ever bind. With the default 1 MiB stream window it takes 2048 stalled streams on one
/// connection to fill it, and the clocks end stalled calls long before that.
const CONNECTION_WINDOW: u32 = (1 << 31) - 1;

/// The HTTP/2 egress transport: a [`Transport`] (and a cloneable [`tower::Service`]) over the
/// call model.
#[derive(Clone)]
pub struct Http2Transport {
    shared: Arc<Shared>,
}

struct Shared {
    pool: Box<[PooledConn]>,
    base: Endpoint,
    connector: HttpsConnector<HttpConnector>,
    options: Http2Options,
    meter: Arc<Meter>,
}

/// One pooled connection: its request sender while it is up, and the calls in flight on it.
struct PooledConn {
    sender: std::sync::Mutex<Option<SendRequest<EgressBody>>>,
    /// Held while connecting, so calls that find the connection down wait for one attempt
    /// instead of each making their own.
    connecting: tokio::sync::Mutex<()>,
    in_flight: Arc<AtomicUsize>,
}

impl PooledConn {
    /// The sender of the live connection, if there is one.
    fn current(&self) -> Option<SendRequest<EgressBody>> {
        let sender = self
            .sender
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        sender.as_ref().filter(|s| !s.is_closed()).cloned()
    }
}

/// A call's place on a pooled connection; released when the reply stream (or the failed
/// request) is dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Http2Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http2Transport")
            .field(
                "upstream",
                &format_args!(
                    "{}://{}",
                    self.shared.base.scheme, self.shared.base.authority
                ),
            )
            .finish()
    }
}

impl Http2Transport {
    /// Build the transport; no connection is made until the first call.
    pub fn new(options: Http2Options) -> io::Result<Self> {
        let tls = options.upstream.scheme() == "https";
        let endpoint = Endpoint::new(&options.upstream, tls)?;
        let connector = connector(
            options.extra_roots_pem.as_deref(),
            tls,
            options.connect_timeout,
            Alpn::H2,
        )?;

        let pool = (0..options.connections.max(1))
            .map(|_| PooledConn {
                sender: std::sync::Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                in_flight: Arc::new(AtomicUsize::new(0)),
            })
            .collect();

        Ok(Self {
            shared: Arc::new(Shared {
                pool,
                base: endpoint,
                connector,
                options,
                meter: Meter::new(),
            }),
        })
    }

    /// The connection for a new call: the first one with fewer than
    /// [`STREAMS_PER_CONNECTION`] calls in flight, else the least busy. Filling connections in
    /// order keeps a modest load on one connection, where h2 batches the frames of many calls
    /// into one write (spreading 32 calls over 4 connections cost 3 µs of CPU per call in S1);
    /// above that, calls spill over to the next connections, past the upstream's
    /// MAX_CONCURRENT_STREAMS and across the backends of an L4 balancer.
    fn pick(&self) -> &PooledConn {
        let pool = &self.shared.pool;
        let mut best = &pool[0];
        let mut best_load = usize::MAX;
        for pooled in pool.iter() {
            let load = pooled.in_flight.load(Ordering::Acquire);
            if load < STREAMS_PER_CONNECTION {
                return pooled;
            }
            if load < best_load {
                best = pooled;
                best_load = load;
            }
        }
        best
    }

    fn request(&self, call: Call) -> Result<Request<EgressBody>, TransportError> {
        let base = &self.shared.base;
        let uri = grpc::request_uri(base.scheme.clone(), base.authority.clone(), &call.head)?;
        let headers = grpc::request_headers(
            call.head.metadata,
            call.head.subtype.as_deref(),
            call.head.timeout,
            Protocol::Grpc,
        );
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

impl Shared {
    /// A live sender on `pooled`, connecting first if its connection is down. Calls that find
    /// it down together share one attempt.
    async fn sender(&self, pooled: &PooledConn) -> Result<SendRequest<EgressBody>, TransportError> {
        if let Some(sender) = pooled.current() {
            return Ok(sender);
        }
        let _connecting = pooled.connecting.lock().await;
        if let Some(sender) = pooled.current() {
            return Ok(sender);
        }
        // Boxed: the connect future (TLS, handshake) is large, and inline it would make every
        // call's future as large, connecting or not.
        let sender = Box::pin(self.connect()).await?;
        *pooled
            .sender
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(sender.clone());
        Ok(sender)
    }

    /// Open one HTTP/2 connection (TCP, TLS with ALPN `h2` for `https`) within the connect
    /// timeout; its connection task runs [`Batched`].
    async fn connect(&self) -> Result<SendRequest<EgressBody>, TransportError> {
        let options = &self.options;
        let io = open(&self.connector, &self.base, options.connect_timeout).await?;
        let handshake = hyper::client::conn::http2::Builder::new(BatchedExecutor)
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(options.keepalive_interval))
            .keep_alive_timeout(options.keepalive_timeout)
            .keep_alive_while_idle(false)
            .adaptive_window(false)
            .initial_stream_window_size(Some(options.stream_window))
            .initial_connection_window_size(Some(CONNECTION_WINDOW))
            .max_frame_size(Some(64 << 10))
            .handshake(io);
        let (sender, connection) = tokio::time::timeout(options.connect_timeout, handshake)
            .await
            .map_err(|_| crate::connect::unreachable("upstream HTTP/2 handshake timed out".into()))?
            .map_err(|e| {
                let mut err = TransportError::from_http(&e, "upstream HTTP/2 handshake failed");
                err.unprocessed = true;
                err
            })?;
        let authority = self.base.authority.clone();
        tokio::spawn(Batched::new(async move {
            if let Err(e) = connection.await {
                tracing::debug!(upstream = %authority, error = %e, "upstream HTTP/2 connection ended");
            }
        }));
        Ok(sender)
    }
}

impl Transport for Http2Transport {
    fn kind(&self) -> Kind {
        Kind::H2
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::FULL
    }

    fn ready(&self) -> BoxFuture<Result<(), TransportError>> {
        let this = self.clone();
        Box::pin(async move {
            let pooled = this.pick();
            this.shared.sender(pooled).await.map(drop)
        })
    }

    fn call(&self, call: Call) -> BoxFuture<Result<Reply, TransportError>> {
        let max = call.head.max_message_size;
        let request = self.request(call);
        let this = self.clone();
        self.shared.meter.measure(async move {
            let request = request?;
            let pooled = this.pick();
            pooled.in_flight.fetch_add(1, Ordering::AcqRel);
            let in_flight = InFlight(pooled.in_flight.clone());
            let mut request = request;
            let mut fresh = false;
            loop {
                let mut sender = this.shared.sender(pooled).await?;
                match sender.try_send_request(request).await {
                    Ok(response) => return Ok(reply_from_response(response, max, in_flight)),
                    Err(mut e) => match e.take_message() {
                        // The connection closed (GOAWAY, EOF) before the request left: it is
                        // untouched, so it goes once more over a new connection.
                        Some(unsent) if !fresh => {
                            fresh = true;
                            request = unsent;
                        }
                        _ => {
                            return Err(TransportError::from_http(
                                &e.into_error(),
                                "upstream request failed",
                            ))
                        }
                    },
                }
            }
        })
    }

    fn estimate(&self) -> Estimate {
        self.shared.meter.estimate()
    }
}

impl tower::Service<Call> for Http2Transport {
    type Response = Reply;
    type Error = TransportError;
    type Future = BoxFuture<Result<Reply, TransportError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        Transport::call(self, call)
    }
}

/// Turn an upstream HTTP response into a reply (PROTOCOL-HTTP2.md "Responses").
fn reply_from_response(
    response: Response<Incoming>,
    max_message_size: usize,
    in_flight: InFlight,
) -> Reply {
    grpc::reply_from_response(response, max_message_size, in_flight)
}

/// A request part as bytes on the wire: a whole frame, a frame header, or payload bytes.
pub fn part_frame(part: Part) -> FrameBuf {
    match part {
        Part::Message(message) => FrameBuf::message(message.compressed, message.data),
        Part::Head { compressed, len } => FrameBuf::head(compressed, len),
        Part::Fragment { data, .. } => FrameBuf::raw(data),
    }
}
