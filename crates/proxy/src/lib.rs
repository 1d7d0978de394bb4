//! The pnp data plane.
//!
//! [`Proxy::start`] binds the data-plane listener (HTTP/1.1 and HTTP/2 on one port, TLS with
//! ALPN when a certificate is configured), the HTTP/3 listener on UDP when configured, and the
//! admin listener, and serves until [`Proxy::shutdown`]. The egress transport follows the
//! upstream's scheme: HTTP/3 for `h3://`, HTTP/2 otherwise. Each request passes CORS, then the [`ingress`] adapter turns gRPC-Web
//! (binary or text) or native gRPC into a [`pnp_call::Call`], the call goes to an egress
//! transport, and the reply is driven back to the client by a [`reply::ReplyBody`] that enforces
//! the deadline, shutdown and the rule that every call ends with exactly one status.
//!
//! It does not parse bytes itself (that is `pnp-wire`) and it does not speak to upstreams
//! itself (that is `pnp-transport`).
#![forbid(unsafe_code)]

mod abort;
mod admin;
mod admission;
mod body;
mod budget;
mod callserver;
mod conn;
mod control;
mod cors;
mod h1drain;
mod h2server;
mod h3quic;
mod h3server;
pub mod ingress;
mod listener;
mod negotiation;
mod profiles;
mod replay;
pub mod reply;
mod request;
mod resilience;
mod responder;
mod site;
mod tls;
mod ucxserver;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pnp_config::{Config, UpstreamTarget};
use pnp_telemetry::Metrics;
use pnp_transport::http1::{Http1Options, Http1Transport};
use pnp_transport::http2::{Http2Options, Http2Transport};
use pnp_transport::http3::{Http3Options, Http3Transport};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use body::{H2Body, H3Body, RequestBody};
pub use control::ConfigChange;
pub use ingress::Ingress;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration names the demo upstream; the binary resolves it to a URL first.
    #[error("the upstream must be a URL here (start the demo upstream and pass its URL)")]
    UnresolvedUpstream,
    /// A policy setting was refused.
    #[error("configuration: {0}")]
    Config(String),
    /// A file could not be read or a socket could not be bound.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: io::Error,
    },
}

/// State shared between the listeners and the admin endpoint.
#[derive(Debug, Default)]
pub(crate) struct Health {
    draining: AtomicBool,
}

impl Health {
    pub(crate) fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Acquire)
    }
}

/// A running data plane.
#[derive(Debug)]
pub struct Proxy {
    local_addr: SocketAddr,
    local_h3_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    grace_period: Duration,
    health: Arc<Health>,
    metrics: Metrics,
    stop_accepting: CancellationToken,
    end_streams: CancellationToken,
    listener: JoinHandle<listener::Drain>,
    h3: Option<H3Listener>,
    admin: Option<JoinHandle<()>>,
    inner: Arc<ingress::Inner>,
    drain: tokio::sync::watch::Receiver<Option<Duration>>,
    /// Cancelled once the proxy has stopped: its background tasks end (and with them the
    /// last hold on its egress transports).
    stopped: CancellationToken,
    /// The service every listener serves, for calls that arrive decoded.
    call_service: callserver::CallService,
    local_ucx_addr: Option<SocketAddr>,
    /// The UCX listener's task: it drains and ends once its calls are over.
    ucx: Option<JoinHandle<()>>,
}

/// How often the data plane sends its counters to the control plane.
const STATS_EVERY: Duration = Duration::from_secs(1);

/// The running HTTP/3 listener: its accept loop and its endpoint (kept until the connections'
/// closes are sent).
#[derive(Debug)]
struct H3Listener {
    accept: JoinHandle<listener::Drain>,
    endpoint: quinn::Endpoint,
}

/// The transport an upstream URL's scheme selects: HTTP/3 for `h3://`, chunked HTTP/1.1 for
/// `h1://` and `h1s://`, HTTP/2 otherwise.
fn egress_transport(
    upstream: url::Url,
    config: &Config,
    extra_roots_pem: Option<Vec<u8>>,
) -> std::io::Result<pnp_transport::SharedTransport> {
    Ok(match pnp_transport::Kind::from_scheme(upstream.scheme()) {
        Some(pnp_transport::Kind::H1) => Arc::new(Http1Transport::new(Http1Options {
            upstream,
            extra_roots_pem,
            connect_timeout: config.upstream.connect_timeout,
            max_connections: config.upstream.h1_connections,
            max_idle: config.upstream.h1_connections,
        })?),
        Some(pnp_transport::Kind::Ucx) => {
            let host = upstream.host_str().unwrap_or_default();
            let port = upstream.port().unwrap_or_default();
            let mut options = ucx_options(&config.upstream.ucx);
            options.connect_timeout = config.upstream.connect_timeout;
            Arc::new(pnp_ucx::UcxTransport::new(
                format!("{host}:{port}"),
                options,
            )?)
        }
        Some(pnp_transport::Kind::H3) => Arc::new(Http3Transport::new(Http3Options {
            upstream,
            extra_roots_pem,
            connect_timeout: config.upstream.connect_timeout,
            keepalive_timeout: config.resilience.keepalive_timeout,
            stream_window: pnp_transport::http3::DEFAULT_STREAM_WINDOW,
            connection_window: pnp_transport::http3::DEFAULT_CONNECTION_WINDOW,
        })?),
        _ => Arc::new(Http2Transport::new(Http2Options {
            upstream,
            extra_roots_pem,
            connect_timeout: config.upstream.connect_timeout,
            keepalive_interval: config.resilience.keepalive_interval,
            keepalive_timeout: config.resilience.keepalive_timeout,
            connections: config.upstream.connections,
            stream_window: config.upstream.stream_window,
        })?),
    })
}

/// pnp-ucx's options from the config's UCX settings.
fn ucx_options(settings: &pnp_config::UcxSettings) -> pnp_ucx::UcxOptions {
    let mut options = pnp_ucx::UcxOptions::with_tuning(pnp_ucx::UcxTuning {
        tls: settings.tls.clone(),
        net_devices: settings.net_devices.clone(),
        rndv_thresh: settings.rndv_thresh.clone(),
        extra: settings.extra.clone(),
    });
    options.call_window = settings.call_window;
    options.max_fragment = settings.max_fragment;
    options.busy_poll = settings.busy_poll;
    options
}

impl Proxy {
    /// Bind the listeners and start serving.
    pub async fn start(config: Config) -> Result<Proxy, StartError> {
        if matches!(config.upstream.target, UpstreamTarget::Demo) {
            return Err(StartError::UnresolvedUpstream);
        }
        let io_err = |what: String| move |source| StartError::Io { what, source };
        let extra_roots_pem = match &config.upstream.ca {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(io_err(format!("reading upstream CA {}", path.display())))?,
            ),
            None => None,
        };
        let peer_urls = config.upstream.peer();
        let upstream_name = peer_urls.first().map(|u| u.to_string()).unwrap_or_default();
        let peer = peer_urls
            .into_iter()
            .map(|url| {
                egress_transport(url, &config, extra_roots_pem.clone())
                    .map_err(io_err("configuring the upstream".into()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tls = match &config.listener.tls {
            Some(files) => Some(tls::acceptor(files).map_err(io_err(format!(
                "loading TLS certificate {}",
                files.cert.display()
            )))?),
            None => None,
        };

        let end_streams = CancellationToken::new();
        let stop_accepting = CancellationToken::new();
        let health = Arc::new(Health::default());
        let metrics = Metrics::new();
        let profiles = profiles::Profiles::new(&config.jobs).map_err(StartError::Config)?;
        let admission = Arc::new(
            admission::Admission::new(&config.resilience, metrics.clone())
                .map_err(StartError::Config)?,
        );
        let budget = budget::BufferBudget::new(config.limits.buffer_budget, &metrics);
        let negotiator = negotiation::Negotiator::new(
            peer,
            &config.jobs,
            metrics.clone(),
            config.upstream.connect_timeout,
        )
        .map_err(StartError::Config)?;
        // Background work that ends when the proxy has stopped (the prober, the stats).
        let stopped = CancellationToken::new();
        negotiator.spawn_prober(stopped.clone());
        let upstream = resilience::GuardedUpstream::new(
            upstream_name.trim_end_matches('/').to_owned(),
            &config.resilience,
            budget.clone(),
            metrics.clone(),
        )
        .map_err(StartError::Config)?;
        let jobs = Arc::new(control::JobBook::default());
        for name in config.jobs.profiles.keys() {
            jobs.entry(name);
        }
        let inner = Arc::new(ingress::Inner {
            upstream,
            negotiator: negotiator.clone(),
            live: std::sync::RwLock::new(Arc::new(control::Live {
                version: 1,
                profiles,
                max_message_size: config.limits.max_message_size,
                config: config.clone(),
                toml: None,
            })),
            jobs,
            shutdown: end_streams.clone(),
            metrics: metrics.clone(),
            admission,
            edge: ingress::EdgeRules::new(&config.cors, &config.edge),
            budget,
        });
        let (drain_tx, drain_rx) = tokio::sync::watch::channel(None);
        if let Some(dir) = &config.control.link_dir {
            let (sink, commands) = control::spawn_link(dir).map_err(io_err(format!(
                "opening the control link in {}",
                dir.display()
            )))?;
            inner.negotiator.set_events(sink.clone());
            inner.upstream.set_events(sink.clone());
            control::spawn_stats(inner.clone(), sink.clone(), STATS_EVERY, stopped.clone());
            tokio::spawn(control::steer(inner.clone(), sink, drain_tx, commands));
            tracing::info!(dir = %dir.display(), "control link open");
        }
        let ingress = Ingress::new(inner.clone());
        let service = tower::ServiceBuilder::new()
            .layer(cors::layer(&config.cors))
            .service(ingress);

        // One limit on client connections, whichever listener (TCP or QUIC) they arrive on.
        let connection_slots =
            Arc::new(tokio::sync::Semaphore::new(config.listener.max_connections));
        // HTTP/3 beside TCP: QUIC has no plaintext, so it needs the listener's certificate.
        let h3 = match (&config.listener.h3, &config.listener.tls) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(StartError::Config(
                    "listener.h3 (--listen-h3) needs a TLS certificate: set listener.tls \
                     (--tls-cert FILE --tls-key FILE)"
                        .into(),
                ))
            }
            (Some(h3), Some(files)) => {
                let settings = h3server::H3Settings::new(
                    &config.listener,
                    h3,
                    listener::MAX_CONCURRENT_STREAMS,
                );
                let endpoint = h3server::bind(h3.addr, files, &settings)
                    .map_err(io_err(format!("binding HTTP/3 (UDP) {}", h3.addr)))?;
                let addr = endpoint
                    .local_addr()
                    .map_err(io_err("reading the HTTP/3 address".into()))?;
                let accept = tokio::spawn(h3server::serve(
                    endpoint.clone(),
                    service.clone(),
                    stop_accepting.clone(),
                    settings,
                    connection_slots.clone(),
                    metrics.clone(),
                ));
                Some((addr, H3Listener { accept, endpoint }))
            }
        };
        let local_h3_addr = h3.as_ref().map(|(addr, _)| *addr);
        let h3 = h3.map(|(_, listener)| listener);
        // Browsers learn of the HTTP/3 listener from `alt-svc` on the TCP listener's answers.
        let alt_svc = local_h3_addr.map(|addr| h3server::alt_svc(addr.port()));
        let service = tower::ServiceBuilder::new()
            .map_response(move |mut response: http::Response<reply::ReplyBody>| {
                if let Some(value) = &alt_svc {
                    response
                        .headers_mut()
                        .insert(http::header::ALT_SVC, value.clone());
                }
                response
            })
            .service(service);

        let call_service = callserver::CallService::new(service.clone());
        let ucx = match &config.listener.ucx {
            None => None,
            Some(listener) => {
                let bound =
                    pnp_ucx::UcxListener::bind(listener.addr, ucx_options(&listener.settings))
                        .await
                        .map_err(io_err(format!("binding UCX {}", listener.addr)))?;
                let addr = bound.local_addr();
                let task = tokio::spawn(ucxserver::serve(
                    bound,
                    call_service.clone(),
                    stop_accepting.clone(),
                ));
                Some((addr, task))
            }
        };
        let local_ucx_addr = ucx.as_ref().map(|(addr, _)| *addr);
        let ucx = ucx.map(|(_, task)| task);

        let tcp = listener::bind(config.listener.addr)
            .map_err(io_err(format!("binding {}", config.listener.addr)))?;
        let local_addr = tcp
            .local_addr()
            .map_err(io_err("reading the listen address".into()))?;
        let header_clock = Arc::new(
            listener::HeaderClock::new(
                config.resilience.header_read_min,
                config.resilience.header_read_max,
            )
            .map_err(StartError::Config)?,
        );
        let listener = tokio::spawn(listener::serve(
            tcp,
            tls,
            service,
            stop_accepting.clone(),
            header_clock,
            listener::Settings::from_config(&config.listener),
            connection_slots,
            metrics.clone(),
        ));

        let (admin_addr, admin) = match config.admin {
            Some(addr) => {
                let tcp = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(io_err(format!("binding admin {addr}")))?;
                let addr = tcp
                    .local_addr()
                    .map_err(io_err("reading the admin address".into()))?;
                (
                    Some(addr),
                    Some(tokio::spawn(admin::serve(
                        tcp,
                        health.clone(),
                        metrics.clone(),
                        negotiator,
                    ))),
                )
            }
            None => (None, None),
        };
        tracing::info!(%local_addr, h3 = ?local_h3_addr, admin = ?admin_addr, tls = config.listener.tls.is_some(), "pnp data plane listening");
        Ok(Proxy {
            local_addr,
            local_h3_addr,
            admin_addr,
            grace_period: config.shutdown.grace_period,
            health,
            metrics,
            stop_accepting,
            end_streams,
            listener,
            h3,
            admin,
            inner,
            drain: drain_rx,
            stopped,
            call_service,
            local_ucx_addr,
            ucx,
        })
    }

    /// The data-plane address (useful when the configured port was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The HTTP/3 (UDP) address, if the HTTP/3 listener runs.
    pub fn local_h3_addr(&self) -> Option<SocketAddr> {
        self.local_h3_addr
    }

    /// The admin address, if the admin listener is enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The data plane's metrics (what the admin listener serves at `/metrics`).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Validate `toml` (a whole config) and, unless `dry_run`, make its profiles, routes,
    /// message limit and transport choices govern new calls, atomically; calls in flight keep
    /// what they started with. Refused with the reason when it does not validate (the config
    /// in force stays). Sections that need a restart are reported in the diff, not applied.
    pub fn apply_config(&self, toml: &str, dry_run: bool) -> Result<ConfigChange, String> {
        self.inner.apply_config(toml, dry_run)
    }

    /// Where the UCX listener takes peer pnp instances, when `listener.ucx` is set.
    pub fn local_ucx_addr(&self) -> Option<SocketAddr> {
        self.local_ucx_addr
    }

    /// Serve one call that arrived already decoded (from a peer pnp over UCX) from `peer`,
    /// through everything an HTTP request goes through (profile, admission, clocks,
    /// negotiation, retries, metrics); its reply as the call model has it.
    pub async fn serve_call(&self, call: pnp_call::Call, peer: SocketAddr) -> pnp_call::Reply {
        callserver::serve_call(self.call_service.clone(), call, peer).await
    }

    /// Resolves when the control plane asks for a drain, with the grace it gave.
    pub async fn drain_requested(&self) -> Duration {
        let mut drain = self.drain.clone();
        loop {
            if let Some(grace) = *drain.borrow_and_update() {
                return grace;
            }
            if drain.changed().await.is_err() {
                // No control link: no drain will be asked for.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Graceful shutdown with the configured grace period.
    pub async fn shutdown(self) {
        let grace = self.grace_period;
        self.shutdown_with_grace(grace).await;
    }

    /// Stop accepting, mark not ready, let calls finish for `grace`, then end the remaining
    /// streams with UNAVAILABLE and wait for their connections to close.
    pub async fn shutdown_with_grace(self, grace: Duration) {
        self.health.draining.store(true, Ordering::Release);
        self.stop_accepting.cancel();
        let drain = match self.listener.await {
            Ok(drain) => drain,
            Err(e) => {
                tracing::error!(error = %e, "listener task failed");
                return;
            }
        };
        let (h3_drain, endpoint) = match self.h3 {
            Some(h3) => match h3.accept.await {
                Ok(drain) => (Some(drain), Some(h3.endpoint)),
                Err(e) => {
                    tracing::error!(error = %e, "HTTP/3 listener task failed");
                    (None, Some(h3.endpoint))
                }
            },
            None => (None, None),
        };
        let connections =
            drain.connections() + h3_drain.as_ref().map_or(0, listener::Drain::connections);
        tracing::info!(connections, ?grace, "draining");
        let ucx = self.ucx;
        let finished = async move {
            let ucx = async move {
                if let Some(task) = ucx {
                    let _ = task.await;
                }
            };
            match h3_drain {
                Some(h3) => {
                    tokio::join!(drain.shutdown(), h3.shutdown(), ucx);
                }
                None => {
                    tokio::join!(drain.shutdown(), ucx);
                }
            }
        };
        tokio::pin!(finished);
        tokio::select! {
            () = &mut finished => {}
            () = tokio::time::sleep(grace) => {
                tracing::warn!("grace period over: ending the remaining streams with UNAVAILABLE");
                self.end_streams.cancel();
                if tokio::time::timeout(Duration::from_secs(5), &mut finished).await.is_err() {
                    tracing::warn!("connections still open 5 s after their streams were ended");
                }
            }
        }
        if let Some(endpoint) = endpoint {
            // Let the connections' CONNECTION_CLOSE frames go out.
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
        if let Some(admin) = self.admin {
            admin.abort();
        }
        self.stopped.cancel();
        tracing::info!("stopped");
    }
}
