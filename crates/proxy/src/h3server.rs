//! The HTTP/3 listener: QUIC on UDP (quinn), HTTP/3 framing by the h3 crate, and every request
//! stream handed to the same service the TCP listener serves (CORS and the ingress), with the
//! same request extensions ([`PeerAddr`], [`ClientReset`]).
//!
//! Like [`crate::h2server`], each stream's reply is piped by a loop of pnp's own: one frame in
//! hand (the next is polled only once quinn took the previous one), trailers with
//! `send_trailers`, a reply cut inside a message ([`CutShort`](crate::reply::CutShort)) ends in
//! a stream reset with `H3_INTERNAL_ERROR` (never a clean finish), the call's [`ClientReset`]
//! resets with `H3_REQUEST_CANCELLED`, and a client's STOP_SENDING (see [`crate::h3quic`]) or a
//! lost connection drops the call, which cancels the upstream.
//!
//! Budgets: the QUIC receive windows bound what a client can make pnp hold
//! (`listener.h3.stream_window` per stream, `connection_window` per connection), the same
//! stream limit per connection as HTTP/2, the listener's connection limit, the handshake timer
//! (QUIC handshake, HTTP/3 SETTINGS and each request's headers), QUIC keepalive and an idle
//! timeout from the listener's keepalive settings (a vanished client is dropped within
//! `keepalive_interval + keepalive_timeout`), and connections without calls for
//! `idle_timeout` are closed. On shutdown every connection gets a GOAWAY and closes once its
//! calls are done; calls still running when the grace period ends get the same UNAVAILABLE as
//! on TCP.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Buf;
use futures_util::future::Future;
use h3::error::Code;
use http::Response;
use http_body::Body as _;
use http_body_util::BodyExt;
use pnp_config::{H3Listener, TlsFiles};
use pnp_telemetry::Metrics;
use pnp_wire::frame::FrameBuf;
use quinn::VarInt;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::body::{H3Body, RequestBody};
use crate::conn::{ClientReset, PeerAddr};
use crate::h2server::{StreamCount, CONNECTION_HEADERS};
use crate::h3quic::{QuicConnection, QuicRecv, StopSignal, StopSignals};
use crate::listener::{CallService, Drain};
use crate::reply::ReplyBody;

/// Bytes quinn may have in flight per connection (unacknowledged), so one bulk stream can fill
/// a fast path: 64 MiB carried 3.2 Gbit/s between two processes on loopback here
/// (`shared/notes/transport-anchors.md`).
const SEND_WINDOW: u64 = 64 << 20;
/// UDP socket buffers. The default (208 KiB) drops thousands of packets per GiB on loopback;
/// the kernel caps the request at `net.core.rmem_max` / `wmem_max`.
const UDP_BUFFER: usize = 8 << 20;
/// Unidirectional streams a client may open: its control stream, two QPACK streams, and room
/// for grease and extensions.
const MAX_UNI_STREAMS: u32 = 16;
/// Largest header block a client may send (as on HTTP/2).
const MAX_HEADER_LIST: u64 = 64 << 10;
/// QUIC idle timeout when the listener sends no keepalives.
const IDLE_WITHOUT_KEEPALIVE: Duration = Duration::from_secs(300);
/// How long a finished response may take to be acknowledged before its stream counts as done.
/// Closing a QUIC connection drops whatever it has not delivered yet, so a draining
/// connection closes only once its last responses (with their statuses) have arrived.
const DELIVERY_WAIT: Duration = Duration::from_secs(5);

/// The HTTP/3 listener's budgets.
#[derive(Clone, Debug)]
pub(crate) struct H3Settings {
    /// Connections open at once (shared budget with nothing else: QUIC has its own).
    pub(crate) max_connections: usize,
    /// How long a connection over the limit waits for a slot.
    pub(crate) connection_wait: Duration,
    /// QUIC handshake plus HTTP/3 setup; also the time a request stream has for its headers.
    pub(crate) handshake_timeout: Duration,
    /// Request streams a client may have open at once on one connection.
    pub(crate) max_concurrent_streams: u32,
    /// Receive window per request stream.
    pub(crate) stream_window: u64,
    /// Receive window per connection.
    pub(crate) connection_window: u64,
    /// QUIC PING interval; `None` sends none.
    pub(crate) keepalive_interval: Option<Duration>,
    /// How long the client may stay silent past a keepalive before it is taken for gone.
    pub(crate) keepalive_timeout: Duration,
    /// Close a connection with no call for this long.
    pub(crate) idle_timeout: Option<Duration>,
}

impl H3Settings {
    pub(crate) fn new(
        listener: &pnp_config::Listener,
        h3: &H3Listener,
        max_concurrent_streams: u32,
    ) -> Self {
        Self {
            max_connections: listener.max_connections,
            connection_wait: listener.connection_wait,
            handshake_timeout: listener.handshake_timeout,
            max_concurrent_streams,
            stream_window: h3.stream_window,
            connection_window: h3.connection_window,
            keepalive_interval: listener.keepalive_interval,
            keepalive_timeout: listener.keepalive_timeout,
            idle_timeout: listener.idle_timeout,
        }
    }

    /// QUIC's idle timeout: silence for this long (no packet, not even an ACK of a keepalive)
    /// means the peer is gone.
    fn quic_idle_timeout(&self) -> Duration {
        match self.keepalive_interval {
            Some(interval) => interval + self.keepalive_timeout,
            None => IDLE_WITHOUT_KEEPALIVE,
        }
    }
}

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.to_string())
}

/// Bind the UDP socket (with raised buffers) and make the QUIC endpoint.
pub(crate) fn bind(
    addr: SocketAddr,
    tls: &TlsFiles,
    settings: &H3Settings,
) -> io::Result<quinn::Endpoint> {
    let crypto = crate::tls::quic_server(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(settings.max_concurrent_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_UNI_STREAMS))
        .stream_receive_window(VarInt::from_u64(settings.stream_window).map_err(invalid)?)
        .receive_window(VarInt::from_u64(settings.connection_window).map_err(invalid)?)
        .send_window(SEND_WINDOW)
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(settings.quic_idle_timeout()).map_err(invalid)?,
        ))
        .keep_alive_interval(settings.keepalive_interval);
    server.transport_config(Arc::new(transport));

    let socket = udp_socket(addr)?;
    let runtime = quinn::default_runtime().ok_or_else(|| invalid("no async runtime for quinn"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        runtime,
    )
}

/// A UDP socket bound to `addr` with socket buffers raised to [`UDP_BUFFER`] (as far as the
/// kernel allows; less is logged, not fatal).
pub(crate) fn udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Err(e) = socket.set_recv_buffer_size(UDP_BUFFER) {
        tracing::debug!(error = %e, "raising SO_RCVBUF failed");
    }
    if let Err(e) = socket.set_send_buffer_size(UDP_BUFFER) {
        tracing::debug!(error = %e, "raising SO_SNDBUF failed");
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Everything a connection task needs, shared.
struct Shared<S> {
    service: S,
    settings: H3Settings,
    slots: Arc<Semaphore>,
    metrics: Metrics,
    drain: CancellationToken,
}

/// Accept QUIC connections until `stop`; then refuse new ones and hand back the open ones.
pub(crate) async fn serve<S: CallService>(
    endpoint: quinn::Endpoint,
    service: S,
    stop: CancellationToken,
    settings: H3Settings,
    slots: Arc<Semaphore>,
    metrics: Metrics,
) -> Drain {
    let tracker = TaskTracker::new();
    let shared = Arc::new(Shared {
        service,
        slots,
        settings,
        metrics,
        drain: CancellationToken::new(),
    });
    loop {
        let incoming = tokio::select! {
            () = stop.cancelled() => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else {
            break;
        };
        tracker.spawn(connection(incoming, shared.clone()));
    }
    // New connection attempts are refused from now on; open connections drain.
    endpoint.set_server_config(None);
    Drain::new(tracker, shared.drain.clone())
}

/// One client connection, from the first packet to close.
async fn connection<S: CallService>(incoming: quinn::Incoming, shared: Arc<Shared<S>>) {
    let accepted = Instant::now();
    let settings = &shared.settings;
    let peer = incoming.remote_address();
    let Some(slot) =
        crate::listener::connection_slot(&shared.slots, settings.connection_wait).await
    else {
        tracing::debug!(%peer, limit = settings.max_connections, "connection limit reached; refusing a QUIC connection");
        shared.metrics.connection_refused("limit");
        incoming.refuse();
        return;
    };
    let handshake_deadline = accepted + settings.handshake_timeout;
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "QUIC connection failed before its handshake");
            shared.metrics.connection_refused("handshake_failed");
            return;
        }
    };
    let conn = match tokio::time::timeout_at(handshake_deadline, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "QUIC handshake failed");
            shared.metrics.connection_refused("handshake_failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "QUIC handshake timed out");
            shared.metrics.connection_refused("handshake_timeout");
            return;
        }
    };
    let open = shared.metrics.connections_open();
    open.inc();
    let stops = StopSignals::default();
    let mut builder = h3::server::builder();
    builder.max_field_section_size(MAX_HEADER_LIST);
    let built = builder.build::<_, FrameBuf>(QuicConnection::new(conn.clone(), stops.clone()));
    match tokio::time::timeout_at(handshake_deadline, built).await {
        Ok(Ok(h3)) => serve_connection(h3, &conn, peer, stops, &shared).await,
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "HTTP/3 setup failed"),
        Err(_) => {
            tracing::debug!(%peer, "HTTP/3 setup timed out");
            conn.close(VarInt::from_u32(0x100), b"setup timed out");
        }
    }
    open.dec();
    drop(slot);
}

type H3Connection = h3::server::Connection<QuicConnection, FrameBuf>;

/// Accept request streams until the client closes, the connection breaks, or it drains (GOAWAY,
/// then close once its calls are done).
async fn serve_connection<S: CallService>(
    mut h3: H3Connection,
    conn: &quinn::Connection,
    peer: SocketAddr,
    stops: StopSignals,
    shared: &Shared<S>,
) {
    let settings = &shared.settings;
    let streams = Arc::new(StreamCount::default());
    let mut idle_since = Some(Instant::now());
    let mut draining = false;
    loop {
        let idle_at = match (settings.idle_timeout, idle_since) {
            (Some(timeout), Some(since)) if !draining => Some(since + timeout),
            _ => None,
        };
        tokio::select! {
            accepted = h3.accept(), if !draining => match accepted {
                Ok(Some(resolver)) => {
                    idle_since = None;
                    let guard = streams.enter();
                    let service = shared.service.clone();
                    let metrics = shared.metrics.clone();
                    let stops = stops.clone();
                    let header_timeout = settings.handshake_timeout;
                    tokio::spawn(async move {
                        let request = tokio::time::timeout(header_timeout, resolver.resolve_request());
                        match request.await {
                            Ok(Ok((request, stream))) => {
                                serve_stream(request, stream, service, peer, &stops, &metrics).await;
                            }
                            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "bad HTTP/3 request"),
                            Err(_) => tracing::debug!(%peer, "HTTP/3 request headers timed out"),
                        }
                        drop(guard);
                    });
                }
                Ok(None) => break,
                Err(e) => {
                    if !e.is_h3_no_error() {
                        tracing::debug!(%peer, error = %e, "HTTP/3 connection ended with an error");
                    }
                    break;
                }
            },
            () = sleep_until(idle_at) => {
                if streams.is_idle() {
                    tracing::debug!(%peer, "idle HTTP/3 connection closed");
                    break;
                }
                idle_since = None;
            }
            () = streams.went_idle(), if idle_since.is_none() || draining => {
                if draining {
                    break;
                }
                idle_since = Some(Instant::now());
            }
            () = shared.drain.cancelled(), if !draining => {
                // GOAWAY: no new requests; those in flight run on (until the grace period
                // ends them) and the connection closes after the last.
                if let Err(e) = h3.shutdown(0).await {
                    tracing::debug!(%peer, error = %e, "sending GOAWAY failed");
                    break;
                }
                draining = true;
                if streams.is_idle() {
                    break;
                }
            }
        }
    }
    drop(h3);
    conn.close(VarInt::from_u32(0x100), b"");
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

type H3Stream = h3::server::RequestStream<crate::h3quic::QuicBidi<FrameBuf>, FrameBuf>;
type H3Send = h3::server::RequestStream<
    <crate::h3quic::QuicBidi<FrameBuf> as h3::quic::BidiStream<FrameBuf>>::SendStream,
    FrameBuf,
>;

/// One request: call the service (dropped if the client stops the stream meanwhile), send the
/// response head, pipe the body.
async fn serve_stream<S: CallService>(
    request: http::Request<()>,
    stream: H3Stream,
    service: S,
    peer: SocketAddr,
    stops: &StopSignals,
    metrics: &Metrics,
) {
    let mut stopped: StopSignal = stops
        .take(stream.id())
        .unwrap_or_else(|| Box::pin(std::future::pending()));
    let (mut send, recv): (H3Send, h3::server::RequestStream<QuicRecv, FrameBuf>) = stream.split();
    let reset = ClientReset::default();
    let mut request = request.map(|()| RequestBody::Http3(Box::new(H3Body::new(recv))));
    request.extensions_mut().insert(PeerAddr(peer));
    request.extensions_mut().insert(reset.clone());

    let response = tokio::select! {
        response = service.oneshot(request) => match response {
            Ok(response) => response,
            Err(never) => match never {},
        },
        _ = &mut stopped => return,
    };
    let (mut parts, body) = response.into_parts();
    for name in CONNECTION_HEADERS {
        parts.headers.remove(name);
    }
    let end_of_stream = body.is_end_stream();
    tokio::select! {
        sent = send.send_response(Response::from_parts(parts, ())) => {
            if let Err(e) = sent {
                tracing::debug!(%peer, error = %e, "could not send response headers");
                return;
            }
        }
        _ = &mut stopped => return,
    }
    if end_of_stream {
        // Trailers-Only: the headers were the whole response.
        if let Step::Done = watch(send.finish(), &reset, &mut stopped).await {
            let _ = tokio::time::timeout(DELIVERY_WAIT, stopped).await;
        }
        return;
    }
    if pipe(body, send, &reset, &mut stopped, metrics).await {
        let _ = tokio::time::timeout(DELIVERY_WAIT, stopped).await;
    }
}

/// What woke the pipe.
enum Event {
    /// The proxy ended the call and its status cannot reach the client.
    Reset,
    /// The client stopped the stream, or the connection is gone.
    Gone,
    /// The next body frame, the end of the body, or the cut of a body that ended inside a
    /// message.
    Frame(Option<Result<http_body::Frame<FrameBuf>, crate::reply::CutShort>>),
}

/// Write a reply body to an HTTP/3 stream, one frame at a time (see the module docs). True
/// when the response was finished cleanly (its delivery is then worth waiting for).
async fn pipe(
    mut body: ReplyBody,
    mut send: H3Send,
    reset: &ClientReset,
    stopped: &mut StopSignal,
    metrics: &Metrics,
) -> bool {
    loop {
        let event = tokio::select! {
            biased;
            () = reset.token.cancelled() => Event::Reset,
            _ = &mut *stopped => Event::Gone,
            frame = body.frame() => Event::Frame(frame),
        };
        let step = match event {
            Event::Reset => Step::Reset,
            Event::Gone => return false,
            Event::Frame(Some(Err(_cut))) => {
                send.stop_stream(Code::H3_INTERNAL_ERROR);
                return false;
            }
            Event::Frame(None) => watch(send.finish(), reset, stopped).await,
            Event::Frame(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) if !data.has_remaining() => continue,
                Ok(data) => {
                    let write = send.send_data(data);
                    match write_once_then_watch(write, reset, stopped).await {
                        Step::Done => continue,
                        other => other,
                    }
                }
                Err(frame) => {
                    let Ok(trailers) = frame.into_trailers() else {
                        continue;
                    };
                    match watch(send.send_trailers(trailers), reset, stopped).await {
                        Step::Done => watch(send.finish(), reset, stopped).await,
                        other => other,
                    }
                }
            },
        };
        // Only a finish (end of body, or trailers) reaches here as `Done`.
        match step {
            Step::Done => return true,
            Step::Reset => {
                metrics.client_reset("h3");
                send.stop_stream(Code::H3_REQUEST_CANCELLED);
                return false;
            }
            Step::Gone => return false,
        }
    }
}

/// How a write ended.
enum Step {
    /// Written.
    Done,
    /// The call's [`ClientReset`] fired meanwhile: the stream is to be reset.
    Reset,
    /// The client stopped the stream, the write failed, or the connection is gone.
    Gone,
}

/// Drive a write to its end unless the call's reset fires or the client goes first.
async fn watch<F>(write: F, reset: &ClientReset, stopped: &mut StopSignal) -> Step
where
    F: Future<Output = Result<(), h3::error::StreamError>>,
{
    tokio::select! {
        biased;
        () = reset.token.cancelled() => Step::Reset,
        _ = stopped => Step::Gone,
        written = write => match written {
            Ok(()) => Step::Done,
            Err(_) => Step::Gone,
        },
    }
}

/// As [`watch`], and while the write waits for the client's window the call counts as stalled
/// (its ended status then gets only a short grace before the stream is reset).
async fn write_once_then_watch<F>(write: F, reset: &ClientReset, stopped: &mut StopSignal) -> Step
where
    F: Future<Output = Result<(), h3::error::StreamError>>,
{
    let mut write = pin!(write);
    let first = poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(Ok(())) => return Step::Done,
        Poll::Ready(Err(_)) => return Step::Gone,
        Poll::Pending => {}
    }
    reset.stalled.store(true, Ordering::Release);
    let step = watch(write, reset, stopped).await;
    reset.stalled.store(false, Ordering::Release);
    step
}

/// The `alt-svc` value that advertises an HTTP/3 listener on `port` (RFC 7838, a day's cache).
pub(crate) fn alt_svc(port: u16) -> http::HeaderValue {
    http::HeaderValue::from_str(&format!("h3=\":{port}\"; ma=86400"))
        .unwrap_or_else(|_| http::HeaderValue::from_static("clear"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alt_svc_names_the_port() {
        assert_eq!(alt_svc(8443), "h3=\":8443\"; ma=86400");
    }
}
