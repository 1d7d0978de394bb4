//! The data-plane accept loop: one port for HTTP/1.1 and HTTP/2 (prior knowledge or ALPN).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use pnp_policy::header_timeout::{HeaderTimeout, HeaderTimeoutConfig, LoadMeter};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::reply::ReplyBody;

/// How long a client may take to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the adaptive header-read timeout is recomputed.
const HEADER_CLOCK_TICK: Duration = Duration::from_secs(1);
/// Concurrent streams per HTTP/2 connection. Browsers open at most ~100; gRPC clients multiplex
/// many token streams over one connection.
const MAX_CONCURRENT_STREAMS: u32 = 1024;

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
    graceful: GracefulShutdown,
}

impl Drain {
    /// Connections still open.
    pub(crate) fn connections(&self) -> usize {
        self.graceful.count()
    }

    /// Ask every connection to finish its in-flight requests and close (HTTP/2 GOAWAY, HTTP/1.1
    /// close after the current response), and wait until they have.
    pub(crate) async fn shutdown(self) {
        self.graceful.shutdown().await;
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

/// Records the first request of a connection with the header clock.
#[derive(Clone)]
struct FirstRequest<S> {
    inner: S,
    peer: std::net::SocketAddr,
    accepted: Instant,
    seen: Arc<AtomicBool>,
    clock: Arc<HeaderClock>,
}

impl<S, B> tower::Service<Request<B>> for FirstRequest<S>
where
    S: tower::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        request
            .extensions_mut()
            .insert(crate::conn::PeerAddr(self.peer));
        if !self.seen.swap(true, Ordering::AcqRel) {
            self.clock.record(self.accepted.elapsed());
        }
        self.inner.call(request)
    }
}

pub(crate) async fn serve<S>(
    tcp: TcpListener,
    tls: Option<TlsAcceptor>,
    service: S,
    stop: CancellationToken,
    header_clock: Arc<HeaderClock>,
) -> Drain
where
    S: tower::Service<Request<Incoming>, Response = Response<ReplyBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let graceful = GracefulShutdown::new();
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
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "set_nodelay failed");
        }
        let watcher = graceful.watcher();
        let builder = connection_builder(header_clock.current());
        let service = TowerToHyperService::new(FirstRequest {
            inner: service.clone(),
            peer,
            accepted: Instant::now(),
            seen: Arc::new(AtomicBool::new(false)),
            clock: header_clock.clone(),
        });
        let tls = tls.clone();
        tokio::spawn(async move {
            let result = match tls {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        };
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    Drain { graceful }
}

/// Connection settings; the header-read timeout is the clock's value when it was accepted.
fn connection_builder(header_read_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    builder
}
