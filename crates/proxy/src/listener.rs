//! The data-plane accept loop: one port for HTTP/1.1 and HTTP/2 (prior knowledge or ALPN).
//!
//! Every connection runs under budgets: a limit on open connections (over it, a new one waits
//! briefly for a slot, then is closed), one timer for the TLS handshake and protocol detection
//! (a socket that never finishes either is closed), TCP keepalive, and per protocol: the
//! adaptive header-read clock for HTTP/1.1 (which also closes keep-alive connections that send
//! no next request), PINGs and an idle timeout for HTTP/2 ([`crate::h2server`]). HTTP/1.1 goes to
//! hyper; HTTP/2 to pnp's own stream pipe, which can reset one stream without the others.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use pnp_policy::header_timeout::{HeaderTimeout, HeaderTimeoutConfig, LoadMeter};
use pnp_telemetry::Metrics;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::RequestBody;
use crate::conn::{ClientReset, PeerAddr};
use crate::h1drain::{self, Activity, Tracked};
use crate::h2server::{self, H2Settings};
use crate::reply::ReplyBody;

/// How often the adaptive header-read timeout is recomputed.
const HEADER_CLOCK_TICK: Duration = Duration::from_secs(1);
/// Concurrent streams per HTTP/2 connection. Browsers open at most ~100; gRPC clients multiplex
/// many token streams over one connection.
pub(crate) const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// The HTTP/2 connection preface a prior-knowledge client starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Accept queue length. tokio's `TcpListener::bind` asks for 1024, which a reconnect storm of
/// thousands of browsers overflows (SYNs dropped, clients retry after a second); the kernel caps
/// it at `net.core.somaxconn` (4096 by default since Linux 5.4).
const LISTEN_BACKLOG: u32 = 4096;

/// Bind the data-plane socket with a deep accept queue ([`LISTEN_BACKLOG`]).
pub(crate) fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As tokio's `TcpListener::bind` does: a restarted proxy can rebind at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// What is left of the listener after it stopped accepting: the open connections.
#[derive(Debug)]
pub(crate) struct Drain {
    tracker: TaskTracker,
    signal: CancellationToken,
}

impl Drain {
    /// The connections of a listener that stopped accepting: each watches `signal`.
    pub(crate) fn new(tracker: TaskTracker, signal: CancellationToken) -> Self {
        Self { tracker, signal }
    }

    /// Connections still open.
    pub(crate) fn connections(&self) -> usize {
        self.tracker.len()
    }

    /// Ask every connection to finish its in-flight requests and close (HTTP/2 GOAWAY in two
    /// steps; HTTP/1.1 `Connection: close` on the responses still to come and a close once idle,
    /// see [`h1drain`]), and wait until they have.
    pub(crate) async fn shutdown(self) {
        self.signal.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// The listener's budgets and protocol settings.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    /// Connections open at once.
    pub(crate) max_connections: usize,
    /// How long a connection over the limit waits for a slot.
    pub(crate) connection_wait: Duration,
    /// TLS handshake plus protocol detection.
    pub(crate) handshake_timeout: Duration,
    /// TCP keepalive idle time.
    pub(crate) tcp_keepalive: Option<Duration>,
    /// HTTP/2 settings.
    pub(crate) h2: H2Settings,
}

impl Settings {
    pub(crate) fn from_config(listener: &pnp_config::Listener) -> Self {
        Self {
            max_connections: listener.max_connections,
            connection_wait: listener.connection_wait,
            handshake_timeout: listener.handshake_timeout,
            tcp_keepalive: listener.tcp_keepalive,
            h2: H2Settings {
                max_concurrent_streams: MAX_CONCURRENT_STREAMS,
                keepalive_interval: listener.keepalive_interval,
                keepalive_timeout: listener.keepalive_timeout,
                idle_timeout: listener.idle_timeout,
            },
        }
    }
}

/// The header-read clock: how long an HTTP/1.1 client may take to send its request headers,
/// adapted to load (`pnp_policy::header_timeout`): shorter when many connections arrive (shed
/// slow clients), longer when headers take longer to arrive, clamped and smoothed. Its inputs:
/// new connections per second, and the time from accept to the first request head.
#[derive(Debug)]
pub(crate) struct HeaderClock {
    state: Mutex<HeaderState>,
}

#[derive(Debug)]
struct HeaderState {
    timeout: HeaderTimeout,
    meter: LoadMeter,
    last_update: Instant,
}

impl HeaderClock {
    pub(crate) fn new(min: Duration, max: Duration) -> Result<Self, String> {
        let defaults = HeaderTimeoutConfig::default();
        let timeout = HeaderTimeout::new(HeaderTimeoutConfig {
            min,
            max,
            base: defaults.base.clamp(min, max),
            ..defaults
        })
        .map_err(|e| format!("resilience.header_read: {e}"))?;
        let now = Instant::now();
        Ok(Self {
            state: Mutex::new(HeaderState {
                timeout,
                meter: LoadMeter::new(now),
                last_update: now,
            }),
        })
    }

    /// The timeout for a connection accepted now.
    pub(crate) fn current(&self) -> Duration {
        let Ok(mut state) = self.state.lock() else {
            return Duration::from_secs(30);
        };
        let now = Instant::now();
        if now.duration_since(state.last_update) >= HEADER_CLOCK_TICK {
            if let Some(load) = state.meter.take(now) {
                let updated = state.timeout.update(now, load);
                tracing::trace!(?updated, qps = load.qps, rt = ?load.header_rt, "header-read timeout");
            }
            state.last_update = now;
        }
        state.timeout.current()
    }

    /// A connection's first request head arrived `rt` after the connection was accepted.
    fn record(&self, rt: Duration) {
        if let Ok(mut state) = self.state.lock() {
            state.meter.record(rt);
        }
    }
}

/// Per-connection context for each request: the client's address and, for HTTP/1.1 (one call
/// at a time), the signal that closes the connection; and the first request's arrival for the
/// header clock.
#[derive(Clone)]
struct ConnContext<S> {
    inner: S,
    peer: SocketAddr,
    reset: Option<CancellationToken>,
    accepted: Instant,
    seen: Arc<AtomicBool>,
    clock: Arc<HeaderClock>,
}

impl<S> tower::Service<Request<RequestBody>> for ConnContext<S>
where
    S: tower::Service<Request<RequestBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<RequestBody>) -> Self::Future {
        if !self.seen.swap(true, Ordering::AcqRel) {
            self.clock.record(self.accepted.elapsed());
        }
        let extensions = request.extensions_mut();
        extensions.insert(PeerAddr(self.peer));
        if let Some(reset) = &self.reset {
            extensions.insert(ClientReset::with_token(reset.clone()));
        }
        self.inner.call(request)
    }
}

/// The service every connection serves.
pub(crate) trait CallService:
    tower::Service<
        Request<RequestBody>,
        Response = Response<ReplyBody>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> CallService for S where
    S: tower::Service<
            Request<RequestBody>,
            Response = Response<ReplyBody>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// Everything a connection task needs, shared.
struct Shared<S> {
    service: S,
    tls: Option<TlsAcceptor>,
    header_clock: Arc<HeaderClock>,
    settings: Settings,
    slots: Arc<Semaphore>,
    metrics: Metrics,
    drain: CancellationToken,
}

#[allow(clippy::too_many_arguments)] // each is one of the listener's parts
pub(crate) async fn serve<S: CallService>(
    tcp: TcpListener,
    tls: Option<TlsAcceptor>,
    service: S,
    stop: CancellationToken,
    header_clock: Arc<HeaderClock>,
    settings: Settings,
    slots: Arc<Semaphore>,
    metrics: Metrics,
) -> Drain {
    let tracker = TaskTracker::new();
    let shared = Arc::new(Shared {
        service,
        tls,
        header_clock,
        slots,
        settings,
        metrics,
        drain: CancellationToken::new(),
    });
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = tcp.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tracker.spawn(connection(stream, peer, shared.clone()));
    }
    Drain {
        tracker,
        signal: shared.drain.clone(),
    }
}

/// A place under the connection limit: at once if there is one, else the first to free up
/// within `wait`; `None` when the limit holds for all of `wait`.
pub(crate) async fn connection_slot(
    slots: &Arc<Semaphore>,
    wait: Duration,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(slot) = slots.clone().try_acquire_owned() {
        return Some(slot);
    }
    match tokio::time::timeout(wait, slots.clone().acquire_owned()).await {
        Ok(Ok(slot)) => Some(slot),
        _ => None,
    }
}

/// One client connection, from accept to close.
async fn connection<S: CallService>(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared<S>>) {
    let accepted = Instant::now();
    let settings = &shared.settings;
    let Some(slot) = connection_slot(&shared.slots, settings.connection_wait).await else {
        tracing::debug!(%peer, limit = settings.max_connections, "connection limit reached; closing");
        shared.metrics.connection_refused("limit");
        return;
    };
    let open = shared.metrics.connections_open();
    open.inc();
    let _open = scopeguard(move || {
        open.dec();
        drop(slot);
    });
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "set_nodelay failed");
    }
    if let Some(idle) = settings.tcp_keepalive {
        let keepalive = socket2::TcpKeepalive::new().with_time(idle);
        if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
            tracing::debug!(error = %e, "setting TCP keepalive failed");
        }
    }
    let handshake_deadline = tokio::time::Instant::from_std(accepted + settings.handshake_timeout);
    match shared.tls.clone() {
        None => serve_detected(stream, false, peer, accepted, handshake_deadline, &shared).await,
        Some(acceptor) => {
            let stream =
                match tokio::time::timeout_at(handshake_deadline, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        shared.metrics.connection_refused("handshake_failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        shared.metrics.connection_refused("handshake_timeout");
                        return;
                    }
                };
            let alpn_h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            serve_detected(stream, alpn_h2, peer, accepted, handshake_deadline, &shared).await;
        }
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// Which protocol the client speaks: HTTP/2 when ALPN said so or the connection starts with the
/// HTTP/2 preface, HTTP/1.1 otherwise. The bytes read to tell are replayed to the server.
async fn serve_detected<IO, S>(
    mut io: IO,
    alpn_h2: bool,
    peer: SocketAddr,
    accepted: Instant,
    handshake_deadline: tokio::time::Instant,
    shared: &Shared<S>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: CallService,
{
    let (h2, prefix) = if alpn_h2 {
        (true, Bytes::new())
    } else {
        // A client may open a connection and send nothing on it for a while (a pool that
        // connected ahead of need). While draining, such a connection is idle like a kept-alive
        // one: it gets DRAIN_IDLE to start a request, then is closed (h1drain.rs).
        let drained = async {
            shared.drain.cancelled().await;
            tokio::time::sleep(h1drain::DRAIN_IDLE).await;
        };
        let detected = tokio::select! {
            detected = tokio::time::timeout_at(handshake_deadline, detect(&mut io)) => detected,
            () = drained => {
                tracing::debug!(%peer, "draining: no request on this connection; closing");
                return;
            }
        };
        match detected {
            Ok(Ok(Some(detected))) => detected,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "reading the first bytes failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "no request within the handshake timeout; closing");
                shared.metrics.connection_refused("handshake_timeout");
                return;
            }
        }
    };
    let io = Rewind { prefix, inner: io };
    let context = |reset| ConnContext {
        inner: shared.service.clone(),
        peer,
        reset,
        accepted,
        seen: Arc::new(AtomicBool::new(false)),
        clock: shared.header_clock.clone(),
    };
    if h2 {
        // Batched: one write carries the frames of every stream that had some (batch.rs).
        let served = pnp_transport::batch::Batched::new(h2server::serve(
            io,
            context(None),
            &shared.settings.h2,
            peer,
            handshake_deadline,
            shared.drain.clone(),
            shared.metrics.clone(),
        ))
        .await;
        if let Err(e) = served {
            tracing::debug!(%peer, error = %e, "HTTP/2 connection ended with an error");
        }
    } else {
        let kill = CancellationToken::new();
        let activity = Arc::new(Activity::default());
        let inner = context(Some(kill.clone()));
        let tracked = activity.clone();
        let drain = shared.drain.clone();
        let service = tower::service_fn(move |request: Request<Incoming>| {
            let busy = tracked.start();
            let call = tower::ServiceExt::oneshot(inner.clone(), request.map(RequestBody::Http1));
            let drain = drain.clone();
            async move {
                let response = call.await?;
                Ok::<_, Infallible>(h1drain::track(response, busy, drain.is_cancelled()))
            }
        });
        serve_h1(io, service, shared, peer, &kill, &activity).await;
    }
}

/// Serve HTTP/1.1 until the connection closes, drains, or `kill` fires (a call whose status the
/// client does not read: the connection carries only that call, and closing it is the reset).
/// A draining connection closes once it has been idle for [`h1drain::DRAIN_IDLE`].
async fn serve_h1<IO, S>(
    io: IO,
    service: S,
    shared: &Shared<impl CallService>,
    peer: SocketAddr,
    kill: &CancellationToken,
    activity: &Activity,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<
            Request<Incoming>,
            Response = Response<Tracked<ReplyBody>>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.header_clock.current());
    let mut conn =
        pin!(builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service)));
    let mut draining = false;
    let mut idle_since = tokio::time::Instant::now();
    loop {
        let close_at = (draining && activity.is_idle()).then(|| idle_since + h1drain::DRAIN_IDLE);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = shared.drain.cancelled(), if !draining => {
                draining = true;
                idle_since = tokio::time::Instant::now();
            }
            () = activity.changed(), if draining => {
                if activity.is_idle() {
                    idle_since = tokio::time::Instant::now();
                }
            }
            () = sleep_until(close_at) => {
                // Idle for DRAIN_IDLE while draining: no request is in progress, so closing
                // the connection (dropping it) is all that is left.
                tracing::debug!(%peer, "draining HTTP/1.1 connection idle; closing");
                return;
            }
            () = kill.cancelled() => {
                tracing::debug!(%peer, "closing an HTTP/1.1 connection whose call ended unread");
                shared.metrics.client_reset("h1");
                return;
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Read until the connection's first bytes tell HTTP/2 (the full preface) from HTTP/1.1 (any
/// byte that differs from it). `None` when the client closed first.
async fn detect<IO: AsyncRead + Unpin>(io: &mut IO) -> io::Result<Option<(bool, Bytes)>> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let n = io.read_buf(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        let seen = buf.len().min(H2_PREFACE.len());
        if buf[..seen] != H2_PREFACE[..seen] {
            return Ok(Some((false, buf.freeze())));
        }
        if buf.len() >= H2_PREFACE.len() {
            return Ok(Some((true, buf.freeze())));
        }
    }
}

/// An I/O stream that first replays bytes already read from it.
struct Rewind<IO> {
    prefix: Bytes,
    inner: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn detects_the_h2_preface_and_replays_it() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let write = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in H2_PREFACE.chunks(5) {
                client.write_all(chunk).await.expect("write");
                tokio::task::yield_now().await;
            }
            client
        });
        let (h2, prefix) = detect(&mut server).await.expect("read").expect("bytes");
        assert!(h2);
        assert_eq!(&prefix[..], H2_PREFACE);
        drop(write.await);
    }

    #[tokio::test]
    async fn one_differing_byte_means_http1() {
        let (mut client, mut server) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        client
            .write_all(b"POST /x HTTP/1.1\r\n")
            .await
            .expect("write");
        let (h2, prefix) = detect(&mut server).await.expect("read").expect("bytes");
        assert!(!h2);
        let mut rewind = Rewind {
            prefix,
            inner: server,
        };
        let mut first = [0u8; 4];
        rewind.read_exact(&mut first).await.expect("replayed");
        assert_eq!(&first, b"POST");
    }

    #[tokio::test]
    async fn a_closed_connection_is_none() {
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        assert!(detect(&mut server).await.expect("read").is_none());
    }
}
