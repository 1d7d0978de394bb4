//! gRPC over HTTP/3 (QUIC) to a peer pnp's HTTP/3 listener: `h3://host:port`.
//!
//! One QUIC connection carries every call (QUIC streams do not block each other, so there is
//! no head-of-line reason for a pool); it is made on the first call, and again on the first call
//! after it died, by one attempt that concurrent calls share. TLS 1.3 with ALPN `h3` and the
//! host as SNI, trusting the system roots and the configured upstream CA; 0-RTT is never used
//! (a replayed call is not safe to run twice). Windows are sized for bulk: each stream may have
//! `stream_window` bytes unread in pnp, the connection as a whole `connection_window`.
//!
//! QUIC keepalive PINGs go out a third of the keepalive timeout apart and the idle timeout is
//! the keepalive timeout: a peer that vanishes (no packet at all for that long) closes the
//! connection, and every call on it ends UNAVAILABLE within the timeout plus one keepalive
//! interval (QUIC restarts the idle timer once, for the first PING sent into the silence).
//!
//! Requests carry the same headers as over HTTP/2 (`te: trailers`, `grpc-timeout` from the
//! remaining deadline, the content type); request messages are written as they come, one
//! frame in hand. Replies are decoded frame by frame. A cancelled call (its reply dropped
//! before the end, or its request side failing) resets the request stream explicitly:
//! STOP_SENDING and RESET_STREAM with `H3_REQUEST_CANCELLED`. A QUIC send stream that is
//! dropped finishes cleanly, which would look like a complete request, so no request stream of
//! pnp is ever left to its drop.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Buf;
use futures_core::Stream;
use futures_util::StreamExt;
use h3::error::{Code as H3Code, ConnectionError, StreamError};
use http::Request;
use pnp_call::{BoxMessageStream, Call, Code, Reply, ReplyItem, Status, FRAGMENT_THRESHOLD};
use pnp_wire::content_type::Protocol;
use pnp_wire::frame::{FrameBuf, FrameDecoder, FrameKind};
use quinn::VarInt;
use tokio_util::sync::CancellationToken;

use crate::api::{BoxFuture, Capabilities, Estimate, Kind, Meter, Transport};
use crate::grpc::{self, Decoded};
use crate::http2::part_frame;
use crate::{Blame, TransportError};

/// Bytes quinn may have in flight on the connection, unacknowledged: enough for bulk on a fast
/// path (64 MiB carried 3.2 Gbit/s between two processes on loopback here).
const SEND_WINDOW: u64 = 64 << 20;
/// UDP socket buffers (the kernel caps them at `net.core.rmem_max` / `wmem_max`): the default
/// 208 KiB drops thousands of packets per GiB.
const UDP_BUFFER: usize = 8 << 20;
/// Largest response header block accepted.
const MAX_HEADER_LIST: u64 = 64 << 10;
/// Received chunks already waiting are gathered up to this size (see [`gather_chunks`]).
pub const GATHER_LIMIT: usize = 64 << 10;

/// The outcome of [`gather_chunks`].
#[derive(Debug)]
pub enum Gathered<E> {
    /// Bytes received (the stream may go on).
    Data(bytes::Bytes),
    /// The data is over (trailers may follow).
    End,
    /// The stream failed.
    Failed(E),
}

/// Read what a QUIC stream has ready, gathered into one buffer of up to [`GATHER_LIMIT`]
/// bytes. quinn hands data over one packet at a time (about 1.2 KB at an Ethernet MTU);
/// passed on as they are, those chunks would each become a fragment, an HTTP/2 DATA frame and a
/// write, which costs far more than this one copy. Only chunks that are ready now are taken,
/// so latency is unchanged. An end or an error met after some data is kept in `held` and
/// returned by the next call.
pub fn gather_chunks<E, B: Buf>(
    held: &mut Option<Gathered<E>>,
    cx: &mut Context<'_>,
    mut poll: impl FnMut(&mut Context<'_>) -> Poll<Result<Option<B>, E>>,
) -> Poll<Gathered<E>> {
    if let Some(held) = held.take() {
        return Poll::Ready(held);
    }
    let mut first: Option<bytes::Bytes> = None;
    let mut gathered: Option<bytes::BytesMut> = None;
    loop {
        let len = gathered
            .as_ref()
            .map_or_else(|| first.as_ref().map_or(0, |b| b.len()), |g| g.len());
        if len >= GATHER_LIMIT {
            break;
        }
        let end = match poll(cx) {
            Poll::Ready(Ok(Some(mut data))) => {
                let data = data.copy_to_bytes(data.remaining());
                match (&mut gathered, first.take()) {
                    (Some(buf), _) => buf.extend_from_slice(&data),
                    (None, Some(earlier)) => {
                        let mut buf = bytes::BytesMut::with_capacity(GATHER_LIMIT + data.len());
                        buf.extend_from_slice(&earlier);
                        buf.extend_from_slice(&data);
                        gathered = Some(buf);
                    }
                    (None, None) => first = Some(data),
                }
                continue;
            }
            Poll::Ready(Ok(None)) => Gathered::End,
            Poll::Ready(Err(e)) => Gathered::Failed(e),
            Poll::Pending if len == 0 => return Poll::Pending,
            Poll::Pending => break,
        };
        if len == 0 {
            return Poll::Ready(end);
        }
        *held = Some(end);
        break;
    }
    let data = match gathered {
        Some(buf) => buf.freeze(),
        None => first.unwrap_or_default(),
    };
    Poll::Ready(Gathered::Data(data))
}

/// How to reach one peer over HTTP/3.
#[derive(Clone, Debug)]
pub struct Http3Options {
    /// `h3://host:port`.
    pub upstream: url::Url,
    /// Extra PEM roots (the peer's CA, e.g. `pnp certs dev`'s `ca.pem`).
    pub extra_roots_pem: Option<Vec<u8>>,
    /// QUIC handshake timeout (with name resolution).
    pub connect_timeout: Duration,
    /// A peer silent for this long is gone: the connection closes and its calls end
    /// UNAVAILABLE. Keepalive PINGs go out a third of it apart.
    pub keepalive_timeout: Duration,
    /// Receive window per stream: the most one call holds unread from the peer.
    pub stream_window: u64,
    /// Receive window of the connection (all streams together).
    pub connection_window: u64,
}

/// Default receive window per stream of the HTTP/3 egress (2 MiB): replies are passed on at the
/// client's pace, and quinn's reassembly buffer copies itself whole each time more than 2048
/// packets (about 2.4 MiB at an Ethernet MTU) wait in it unread, so a larger window costs CPU
/// and memory without carrying more (`pnp_config::DEFAULT_H3_STREAM_WINDOW` has the figures).
pub const DEFAULT_STREAM_WINDOW: u64 = 2 << 20;
/// Default receive window of the HTTP/3 egress connection (1 GiB): only the stream windows
/// should bind, so calls whose clients stopped reading cannot starve the others.
pub const DEFAULT_CONNECTION_WINDOW: u64 = 1 << 30;

/// The HTTP/3 egress transport: a cloneable [`tower::Service`] over the call model.
#[derive(Clone)]
pub struct Http3Transport {
    inner: Arc<Inner>,
}

struct Inner {
    host: String,
    port: u16,
    authority: http::uri::Authority,
    client: quinn::ClientConfig,
    connect_timeout: Duration,
    conn: tokio::sync::Mutex<Slot>,
    meter: Arc<Meter>,
}

/// How long frames that need an acknowledgement may go unacknowledged before [`Transport::ready`]
/// calls the connection unresponsive (at least; three smoothed RTTs when that is longer).
pub const UNRESPONSIVE_AFTER: Duration = Duration::from_millis(250);

/// How often a connection's watchdog samples its frame counters for [`Liveness`].
const LIVENESS_SAMPLE: Duration = Duration::from_millis(50);

/// Tracks whether a QUIC connection's peer answers, from the connection's statistics as a
/// watchdog task (every [`LIVENESS_SAMPLE`]) and [`Transport::ready`] sample them. A path whose
/// packets are dropped (a firewall that starts dropping UDP, a peer that vanished) leaves the
/// connection open until its idle timeout; this notices sooner: frames that elicit an
/// acknowledgement were sent, and nothing new was acknowledged for [`UNRESPONSIVE_AFTER`] since
/// that was first seen.
///
/// "Acknowledged" is read from the smoothed RTT, which quinn updates with every RTT sample,
/// and takes a sample only when an ACK newly acknowledges the peer's largest ack-eliciting
/// packet. Counting ACK frames would not do: when only the way to the peer is blocked, the
/// peer's own retransmissions still arrive carrying ACK frames, but they acknowledge nothing new.
#[derive(Debug, Default)]
struct Liveness {
    /// The smoothed RTT when last sampled: it changes when an RTT sample is taken.
    rtt: Duration,
    /// Ack-eliciting frames sent when the RTT last changed.
    eliciting: u64,
    /// When a sample first found ack-eliciting frames sent after the last RTT sample.
    waiting_since: Option<Instant>,
}

impl Liveness {
    /// Sample `conn`: `Err(how long)` when it has waited too long for an acknowledgement.
    fn sample(&mut self, conn: &quinn::Connection, now: Instant) -> Result<(), Duration> {
        let stats = conn.stats();
        let tx = &stats.frame_tx;
        let eliciting = tx.stream
            + tx.ping
            + tx.max_data
            + tx.max_stream_data
            + tx.reset_stream
            + tx.stop_sending
            + tx.crypto;
        if stats.path.rtt != self.rtt {
            *self = Liveness {
                rtt: stats.path.rtt,
                eliciting,
                waiting_since: None,
            };
            return Ok(());
        }
        if eliciting == self.eliciting {
            return Ok(());
        }
        let since = *self.waiting_since.get_or_insert(now);
        let waited = now.saturating_duration_since(since);
        if waited > UNRESPONSIVE_AFTER.max(stats.path.rtt * 3) {
            Err(waited)
        } else {
            Ok(())
        }
    }
}

/// The shared connection, the attempt to make one, and the last failed attempt (which calls
/// that waited for it share).
#[derive(Default)]
struct Slot {
    conn: Option<Connected>,
    /// A connection attempt under way. It runs as a task of its own, so a caller that stops
    /// waiting (a negotiation budget ran out) does not abort it: a slow handshake (a lossy
    /// path, a long RTT) still completes, and a later call or probe finds the connection.
    connecting: Option<tokio::task::JoinHandle<Result<Connected, TransportError>>>,
    failed: Option<(Instant, TransportError)>,
}

type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, FrameBuf>;
type SendHalf = h3::client::RequestStream<h3_quinn::SendStream<FrameBuf>, FrameBuf>;
type RecvHalf = h3::client::RequestStream<h3_quinn::RecvStream, FrameBuf>;

#[derive(Clone)]
struct Connected {
    quic: quinn::Connection,
    /// Whether its peer still acknowledges what it is sent.
    liveness: Arc<std::sync::Mutex<Liveness>>,
    send: SendRequest,
    /// Kept so the endpoint (its socket) lives as long as the connection.
    _endpoint: quinn::Endpoint,
}

impl std::fmt::Debug for Http3Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http3Transport")
            .field("upstream", &format_args!("h3://{}", self.inner.authority))
            .finish()
    }
}

impl Http3Transport {
    /// Build the transport; no connection is made until the first call.
    pub fn new(options: Http3Options) -> io::Result<Self> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
        let host = options
            .upstream
            .host_str()
            .ok_or_else(|| invalid(format!("upstream `{}` has no host", options.upstream)))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = options
            .upstream
            .port()
            .ok_or_else(|| invalid(format!("upstream `{}` has no port", options.upstream)))?;
        let authority: http::uri::Authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
        .parse()
        .map_err(|e| invalid(format!("upstream authority: {e}")))?;

        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            // A broken system certificate must not stop pnp from starting.
            let _ = roots.add(cert);
        }
        if let Some(pem) = &options.extra_roots_pem {
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| invalid(format!("upstream CA: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| invalid(format!("upstream CA: {e}")))?;
            }
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| invalid(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"h3".to_vec()];
        // No 0-RTT: early data can be replayed.
        tls.enable_early_data = false;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| invalid(format!("TLS for QUIC: {e}")))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));

        let keepalive = options.keepalive_timeout.max(Duration::from_millis(300));
        let mut transport = quinn::TransportConfig::default();
        transport
            .stream_receive_window(
                VarInt::from_u64(options.stream_window)
                    .map_err(|e| invalid(format!("stream window: {e}")))?,
            )
            .receive_window(
                VarInt::from_u64(options.connection_window)
                    .map_err(|e| invalid(format!("connection window: {e}")))?,
            )
            .send_window(SEND_WINDOW)
            // The peer opens only its control and QPACK streams towards us.
            .max_concurrent_bidi_streams(VarInt::from_u32(0))
            .keep_alive_interval(Some(keepalive / 3))
            .max_idle_timeout(Some(
                quinn::IdleTimeout::try_from(keepalive)
                    .map_err(|e| invalid(format!("keepalive timeout: {e}")))?,
            ));
        client.transport_config(Arc::new(transport));

        Ok(Self {
            inner: Arc::new(Inner {
                host,
                port,
                authority,
                client,
                connect_timeout: options.connect_timeout,
                conn: tokio::sync::Mutex::new(Slot::default()),
                meter: Meter::new(),
            }),
        })
    }
}

impl Inner {
    /// The live connection, or a new one. Calls that wait while another makes the attempt
    /// share its outcome: one failed handshake fails them all at once instead of each trying
    /// again in turn.
    async fn connection(self: &Arc<Self>) -> Result<Connected, TransportError> {
        let asked = Instant::now();
        let mut slot = self.conn.lock().await;
        if let Some(conn) = &slot.conn {
            if conn.quic.close_reason().is_none() {
                return Ok(conn.clone());
            }
            slot.conn = None;
        }
        if slot.connecting.is_none() {
            if let Some((at, err)) = &slot.failed {
                if *at >= asked {
                    return Err(err.clone());
                }
            }
            let this = self.clone();
            slot.connecting = Some(tokio::spawn(async move {
                match tokio::time::timeout(this.connect_timeout, this.connect()).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(unreachable_peer(format!(
                        "no HTTP/3 connection to {} within {:?}",
                        this.authority, this.connect_timeout
                    ))),
                }
            }));
        }
        let Some(attempt) = slot.connecting.as_mut() else {
            return Err(unreachable_peer("no connection attempt".into()));
        };
        // Dropped here (the caller's budget ran out), the attempt stays in the slot and goes
        // on; the next caller waits for it.
        let outcome = attempt.await.unwrap_or_else(|e| {
            Err(unreachable_peer(format!(
                "the HTTP/3 connection attempt to {} ended: {e}",
                self.authority
            )))
        });
        slot.connecting = None;
        match outcome {
            Ok(conn) => {
                slot.failed = None;
                slot.conn = Some(conn.clone());
                Ok(conn)
            }
            Err(err) => {
                slot.failed = Some((Instant::now(), err.clone()));
                Err(err)
            }
        }
    }

    /// Stop handing out `conn` to new calls (calls already on it go on).
    async fn forget(&self, conn: &Connected) {
        let mut slot = self.conn.lock().await;
        if slot
            .conn
            .as_ref()
            .is_some_and(|c| c.quic.stable_id() == conn.quic.stable_id())
        {
            slot.conn = None;
        }
    }

    async fn connect(&self) -> Result<Connected, TransportError> {
        let addr = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| unreachable_peer(format!("resolving {}: {e}", self.host)))?
            .next()
            .ok_or_else(|| unreachable_peer(format!("{} has no address", self.host)))?;
        let endpoint = client_endpoint(addr)
            .map_err(|e| unreachable_peer(format!("opening a UDP socket: {e}")))?;
        let connecting = endpoint
            .connect_with(self.client.clone(), addr, &self.host)
            .map_err(|e| unreachable_peer(format!("connecting to {addr}: {e}")))?;
        let quic = connecting.await.map_err(|e| {
            unreachable_peer(format!(
                "QUIC handshake with {} ({addr}): {e}",
                self.authority
            ))
        })?;
        let mut builder = h3::client::builder();
        builder.max_field_section_size(MAX_HEADER_LIST);
        let (mut driver, send) = builder
            .build::<_, _, FrameBuf>(h3_quinn::Connection::new(quic.clone()))
            .await
            .map_err(|e| unreachable_peer(format!("HTTP/3 setup with {}: {e}", self.authority)))?;
        let peer = self.authority.clone();
        tokio::spawn(async move {
            let closed = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
            if !closed.is_h3_no_error() {
                tracing::debug!(%peer, error = %closed, "HTTP/3 upstream connection closed");
            }
        });
        tracing::debug!(peer = %self.authority, %addr, "HTTP/3 upstream connected");
        let liveness = Arc::new(std::sync::Mutex::new(Liveness::default()));
        // The watchdog keeps the liveness samples fresh between calls, so a path that starts
        // dropping packets is noticed within UNRESPONSIVE_AFTER of it, not only after the next
        // call began waiting. It ends with the connection.
        let watched = quic.clone();
        let samples = liveness.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(LIVENESS_SAMPLE);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while watched.close_reason().is_none() {
                tick.tick().await;
                let now = Instant::now();
                let _ = samples
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .sample(&watched, now);
            }
        });
        Ok(Connected {
            quic,
            liveness,
            send,
            _endpoint: endpoint,
        })
    }

    fn request(&self, call: &pnp_call::CallHead) -> Result<Request<()>, TransportError> {
        let uri = grpc::request_uri(http::uri::Scheme::HTTPS, self.authority.clone(), call)?;
        let headers = grpc::request_headers(
            call.metadata.clone(),
            call.subtype.as_deref(),
            call.timeout,
            Protocol::Grpc,
        );
        let mut request = Request::new(());
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        Ok(request)
    }
}

/// A UDP socket for one upstream connection, buffers raised, in the peer's address family.
fn client_endpoint(peer: SocketAddr) -> io::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let local: SocketAddr = if peer.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    socket.bind(&local.into())?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime for quinn"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket.into(),
        runtime,
    )
}

/// The peer could not be reached: nothing was sent, a retry is safe.
fn unreachable_peer(message: String) -> TransportError {
    TransportError {
        status: Box::new(Status::new(
            Code::Unavailable,
            format!("upstream connection failed: {message}"),
        )),
        blame: Blame::Upstream,
        unprocessed: true,
    }
}

impl TransportError {
    /// Classify an HTTP/3 stream error into the status the client sees: a reset with an
    /// HTTP/3 error code maps like the HTTP/2 ones (`H3_REQUEST_CANCELLED` → CANCELLED,
    /// `H3_REQUEST_REJECTED` → UNAVAILABLE and safe to retry, …); a lost or closed connection is
    /// UNAVAILABLE.
    pub fn from_h3(err: &StreamError, context: &str) -> Self {
        let (code, unprocessed, text) = match err {
            StreamError::RemoteTerminate { code, .. } => {
                return Self::h3_reset(
                    code.value(),
                    &format!("{context}: upstream reset the stream ({code})"),
                );
            }
            StreamError::StreamError { code, reason, .. } => (
                Code::from_h3_code(code.value()),
                false,
                format!("stream error ({code}: {reason})"),
            ),
            StreamError::RemoteClosing { .. } => (
                Code::Unavailable,
                true,
                "upstream is closing the connection (GOAWAY)".to_owned(),
            ),
            StreamError::ConnectionError { 0: e, .. } => (
                Code::Unavailable,
                false,
                format!(
                    "upstream connection lost ({})",
                    describe_connection_error(e)
                ),
            ),
            StreamError::HeaderTooBig {
                actual_size,
                max_size,
                ..
            } => (
                Code::Internal,
                false,
                format!("header block of {actual_size} bytes over the limit of {max_size}"),
            ),
            other => (Code::Unavailable, false, other.to_string()),
        };
        Self {
            status: Box::new(Status::new(code, format!("{context}: {text}"))),
            blame: Blame::Upstream,
            unprocessed,
        }
    }
}

impl TransportError {
    /// A stream the upstream reset with HTTP/3 error `code`; `H3_REQUEST_REJECTED` means it did
    /// no work on it.
    fn h3_reset(code: u64, message: &str) -> Self {
        Self {
            status: Box::new(Status::new(Code::from_h3_code(code), message)),
            blame: Blame::Upstream,
            unprocessed: code == H3Code::H3_REQUEST_REJECTED.value(),
        }
    }
}

fn describe_connection_error(e: &ConnectionError) -> String {
    match e {
        ConnectionError::Timeout { .. } => "idle timeout: no packet from the peer".to_owned(),
        other => other.to_string(),
    }
}

impl tower::Service<Call> for Http3Transport {
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

impl Transport for Http3Transport {
    fn kind(&self) -> Kind {
        Kind::H3
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::FULL
    }

    /// A connection is up (or was just made) and its peer acknowledges what it is sent: a
    /// connection whose frames have gone unacknowledged for [`UNRESPONSIVE_AFTER`] is not
    /// ready, though QUIC would only give up on it at its idle timeout.
    fn ready(&self) -> BoxFuture<Result<(), TransportError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let conn = inner.connection().await?;
            let sampled = conn
                .liveness
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .sample(&conn.quic, Instant::now());
            sampled.map_err(|waited| {
                unreachable_peer(format!(
                    "the HTTP/3 connection to {} is unresponsive: nothing acknowledged for {} ms",
                    inner.authority,
                    waited.as_millis()
                ))
            })
        })
    }

    /// Besides what the meter saw, the round-trip time QUIC itself measures (smoothed, from
    /// acknowledgements) on the live connection.
    fn estimate(&self) -> Estimate {
        let mut estimate = self.inner.meter.estimate();
        if let Ok(slot) = self.inner.conn.try_lock() {
            if let Some(conn) = slot
                .conn
                .as_ref()
                .filter(|c| c.quic.close_reason().is_none())
            {
                estimate.rtt = Some(conn.quic.rtt());
            }
        }
        estimate
    }

    fn call(&self, call: Call) -> BoxFuture<Result<Reply, TransportError>> {
        let inner = self.inner.clone();
        self.inner.meter.clone().measure(async move {
            let max = call.head.max_message_size;
            let request = inner.request(&call.head)?;
            let conn = inner.connection().await?;
            let mut sender = conn.send.clone();
            let stream = match sender.send_request(request).await {
                Ok(stream) => stream,
                Err(e) => {
                    let err = TransportError::from_h3(&e, "upstream request failed");
                    if err.unprocessed {
                        // GOAWAY: the peer is draining. Its connection stays open for the
                        // calls it still runs, but takes no new ones: the next call connects
                        // afresh (to whatever now answers at the address).
                        inner.forget(&conn).await;
                    }
                    return Err(err);
                }
            };
            let (send, recv) = stream.split();
            let cancel = CancellationToken::new();
            tokio::spawn(pump(
                CancelOnDrop {
                    send,
                    finished: false,
                },
                call.messages,
                cancel.clone(),
            ));
            // From here on, dropping the call (the client went away, a clock ran out) resets
            // both directions of the stream.
            let mut recv = RecvGuard {
                recv,
                cancel,
                done: false,
                reading: true,
            };
            let response = recv
                .recv
                .recv_response()
                .await
                .map_err(|e| TransportError::from_h3(&e, "upstream request failed"))?;
            recv.reading = false;
            Ok(reply_from_response(response, recv, max))
        })
    }
}

/// The request side of a stream: reset unless it was finished.
struct CancelOnDrop {
    send: SendHalf,
    finished: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.finished {
            self.send.stop_stream(H3Code::H3_REQUEST_CANCELLED);
        }
    }
}

/// Write the request messages as they come, one frame in hand (`send_data` completes once
/// quinn took the frame, within the stream's flow-control window). Ends the request with a
/// clean finish only after the last message; a failed request side or a cancelled call
/// resets it.
async fn pump(mut send: CancelOnDrop, mut messages: BoxMessageStream, cancel: CancellationToken) {
    loop {
        let next = tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            next = messages.next() => next,
        };
        match next {
            Some(Ok(part)) => {
                let written = tokio::select! {
                    biased;
                    () = cancel.cancelled() => return,
                    written = send.send.send_data(part_frame(part)) => written,
                };
                if let Err(e) = written {
                    // The peer stopped reading or the connection broke; the reply side sees
                    // the same and reports it.
                    tracing::debug!(error = %e, "HTTP/3 request stream failed");
                    return;
                }
            }
            // The request side failed (bad input, the client went away): reset.
            Some(Err(_)) => return,
            None => {
                let finished = tokio::select! {
                    biased;
                    () = cancel.cancelled() => return,
                    finished = send.send.finish() => finished,
                };
                send.finished = finished.is_ok();
                return;
            }
        }
    }
}

/// The reply side of a stream: while it lives the call runs; dropped before the reply ended,
/// it stops the peer's sending (STOP_SENDING) and resets the request side.
struct RecvGuard {
    recv: RecvHalf,
    cancel: CancellationToken,
    done: bool,
    /// A read is pending. h3-quinn's receive stream then belongs to its read future (and its
    /// `stop_sending` would panic); dropping it sends STOP_SENDING (code 0) all the same.
    reading: bool,
}

impl RecvGuard {
    /// Poll `poll` (one read of the stream, perhaps one of several in a gather), recording
    /// whether it was left pending: what counts is the last read, not what a gather of them
    /// returned (a gather returns what it has when a later read is pending, and h3-quinn's
    /// stream then stays with that read's future).
    fn read<T>(&mut self, poll: impl FnOnce(&mut RecvHalf) -> Poll<T>) -> Poll<T> {
        let polled = poll(&mut self.recv);
        self.reading = polled.is_pending();
        polled
    }
}

impl Drop for RecvGuard {
    fn drop(&mut self) {
        if !self.done && !self.reading {
            self.recv.stop_sending(H3Code::H3_REQUEST_CANCELLED);
        }
        // A request still being written when the reply is over (or abandoned) is reset: the
        // call has ended either way.
        self.cancel.cancel();
    }
}

/// Turn the response head into a reply (PROTOCOL-HTTP2.md "Responses", unchanged over HTTP/3).
fn reply_from_response(response: http::Response<()>, mut recv: RecvGuard, max: usize) -> Reply {
    let (parts, ()) = response.into_parts();
    let head = match grpc::grpc_answer(parts.status, parts.headers) {
        grpc::Answer::Stream(head) => head,
        grpc::Answer::TrailersOnly(status) => {
            // Trailers-Only: the stream is over as far as this call goes.
            recv.done = true;
            return Reply::TrailersOnly(status);
        }
        grpc::Answer::NotGrpc(status) => return Reply::TrailersOnly(status),
    };
    Reply::Stream {
        head,
        items: Box::pin(ReplyStream {
            recv,
            decoder: FrameDecoder::new(FrameKind::Grpc, max).with_fragments(FRAGMENT_THRESHOLD),
            held: None,
            data_done: false,
            finished: false,
        }),
    }
}

/// Decodes the response body into reply items, one message (or fragment) at a time.
struct ReplyStream {
    recv: RecvGuard,
    decoder: FrameDecoder,
    /// The end or failure met while gathering data, for the next poll.
    held: Option<Gathered<StreamError>>,
    data_done: bool,
    finished: bool,
}

impl ReplyStream {
    fn finish(&mut self, status: Status) -> Poll<Option<ReplyItem>> {
        self.finished = true;
        Poll::Ready(Some(ReplyItem::Status(status)))
    }
}

impl Stream for ReplyStream {
    type Item = ReplyItem;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ReplyItem>> {
        let this = self.get_mut();
        loop {
            if this.finished {
                return Poll::Ready(None);
            }
            match grpc::next_item(&mut this.decoder) {
                Decoded::Item(item) => return Poll::Ready(Some(item)),
                Decoded::Trailers(_) => return this.finish(grpc::trailer_frame_on_grpc()),
                Decoded::Failed(status) => return this.finish(status),
                Decoded::NeedMore => {}
            }
            if !this.data_done {
                let (held, guard) = (&mut this.held, &mut this.recv);
                let gathered = ready!(gather_chunks(held, cx, |cx| {
                    guard.read(|recv| recv.poll_recv_data(cx))
                }));
                match gathered {
                    Gathered::Data(data) => {
                        this.decoder.push(data);
                        continue;
                    }
                    Gathered::End => this.data_done = true,
                    Gathered::Failed(e) => {
                        let err = TransportError::from_h3(&e, "upstream stream failed");
                        return this.finish(*err.status);
                    }
                }
            }
            let status = match ready!(this.recv.read(|recv| recv.poll_recv_trailers(cx))) {
                Ok(Some(trailers)) => match this.decoder.finish() {
                    Err(e) => grpc::frame_error_status(&e),
                    Ok(()) => {
                        this.recv.done = true;
                        Status::from_headers(&trailers).unwrap_or_else(|| {
                            Status::new(
                                Code::Internal,
                                "upstream sent trailers without grpc-status",
                            )
                        })
                    }
                },
                Ok(None) => match this.decoder.finish() {
                    Err(e) => grpc::frame_error_status(&e),
                    Ok(()) => Status::new(
                        Code::Internal,
                        "upstream ended the stream without trailers (no grpc-status)",
                    ),
                },
                Err(e) => *TransportError::from_h3(&e, "upstream stream failed").status,
            };
            return this.finish(status);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h3_resets_map_to_grpc_codes_and_rejected_is_retry_safe() {
        let rejected = TransportError::h3_reset(H3Code::H3_REQUEST_REJECTED.value(), "x");
        assert_eq!(rejected.status.code, Code::Unavailable);
        assert!(rejected.unprocessed);
        let cancelled = TransportError::h3_reset(H3Code::H3_REQUEST_CANCELLED.value(), "x");
        assert_eq!(cancelled.status.code, Code::Cancelled);
        assert!(!cancelled.unprocessed);
        let internal = TransportError::h3_reset(H3Code::H3_INTERNAL_ERROR.value(), "x");
        assert_eq!(internal.status.code, Code::Internal);
        assert!(!internal.unprocessed);
    }

    #[test]
    fn ready_chunks_are_gathered_and_an_end_after_data_waits_its_turn() {
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut chunks: std::collections::VecDeque<
            Poll<Result<Option<bytes::Bytes>, &'static str>>,
        > = [
            Poll::Ready(Ok(Some(bytes::Bytes::from_static(b"ab")))),
            Poll::Ready(Ok(Some(bytes::Bytes::from_static(b"cd")))),
            Poll::Pending,
            Poll::Ready(Ok(Some(bytes::Bytes::from_static(b"e")))),
            Poll::Ready(Err("reset")),
        ]
        .into();
        let mut held = None;
        let mut next = |held: &mut Option<Gathered<&'static str>>| {
            gather_chunks(held, &mut cx, |_| {
                chunks.pop_front().unwrap_or(Poll::Pending)
            })
        };
        assert!(matches!(next(&mut held), Poll::Ready(Gathered::Data(d)) if d == "abcd"));
        assert!(matches!(next(&mut held), Poll::Ready(Gathered::Data(d)) if d == "e"));
        assert!(matches!(
            next(&mut held),
            Poll::Ready(Gathered::Failed("reset"))
        ));
        assert!(matches!(next(&mut held), Poll::Pending));
    }

    #[test]
    fn an_h3_url_needs_host_and_port() {
        let options = |url: &str| Http3Options {
            upstream: url::Url::parse(url).expect("url"),
            extra_roots_pem: None,
            connect_timeout: Duration::from_secs(1),
            keepalive_timeout: Duration::from_secs(20),
            stream_window: DEFAULT_STREAM_WINDOW,
            connection_window: DEFAULT_CONNECTION_WINDOW,
        };
        assert!(Http3Transport::new(options("h3://localhost:8443")).is_ok());
        assert!(Http3Transport::new(options("h3://localhost")).is_err());
    }
}
