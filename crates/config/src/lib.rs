//! Typed configuration of pnp.
//!
//! The binary reads TOML (or flags) and calls [`Config::from_toml`]; libraries only ever see the
//! typed, validated [`Config`]: durations as [`Duration`], sizes in bytes, upstreams as parsed
//! URLs. Unknown keys are errors that name the key. This crate does no I/O: paths it holds are
//! opened by the crates that use them.
#![forbid(unsafe_code)]

mod profile;
mod raw;
mod size;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use profile::{
    parse_code, FirstMessage, Jobs, Negotiation, Profile, Resilience, RetrySettings, Route,
    SwitchRule, DEFAULT_PROFILE,
};
pub use size::parse_size;

/// Default data-plane listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default admin listen address.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9901";
/// Default largest message pnp accepts in either direction (4 MiB, gRPC's default).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;
/// Default time streams get to finish after SIGTERM.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(30);
/// Default upstream connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default limit of client connections open at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default global budget of buffered message bytes (256 MiB).
pub const DEFAULT_BUFFER_BUDGET: usize = 256 * 1024 * 1024;
/// Default HTTP/2 receive window per upstream stream (1 MiB).
pub const DEFAULT_STREAM_WINDOW: u32 = 1024 * 1024;
/// Default most connections (so calls in flight) to a chunked HTTP/1.1 upstream.
pub const DEFAULT_H1_CONNECTIONS: usize = 512;
/// Default QUIC receive window per client stream of the HTTP/3 listener (2 MiB).
///
/// Larger is not faster here: pnp passes request bytes on at the pace of the next hop, and
/// quinn's reassembly buffer copies itself whole each time more than 2048 packets (about
/// 2.4 MiB at an Ethernet MTU) wait in it unread. A 1 GiB upload through a bridge took 2.5×
/// longer and peaked 400 MiB higher with 8 MiB windows than with 2 MiB.
pub const DEFAULT_H3_STREAM_WINDOW: u64 = 2 * 1024 * 1024;
/// Default QUIC receive window per client connection of the HTTP/3 listener (64 MiB).
pub const DEFAULT_H3_CONNECTION_WINDOW: u64 = 64 * 1024 * 1024;

/// The whole, validated configuration of a pnp data plane.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The data-plane listener.
    pub listener: Listener,
    /// The admin listener (`/healthz`, `/readyz`); `None` disables it.
    pub admin: Option<SocketAddr>,
    /// Where calls go.
    pub upstream: Upstream,
    /// Browser cross-origin rules.
    pub cors: Cors,
    /// Size limits.
    pub limits: Limits,
    /// Graceful shutdown.
    pub shutdown: Shutdown,
    /// Load shedding, circuit breaking, retry throttling, keepalive, header-read clock.
    pub resilience: Resilience,
    /// Job profiles and the routes that pick them.
    pub jobs: Jobs,
    /// What pnp believes of request headers from clients at the edge.
    pub edge: Edge,
    /// The link to the control plane (`[control]`).
    pub control: ControlLink,
}

/// The data plane's link to the control plane: the directory of the two shared-memory rings
/// (`pnp-link`). `None`: no control plane; the config file (SIGHUP) and the admin endpoint are
/// the only ways to change a running data plane.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ControlLink {
    /// The rings' directory (`/dev/shm/pnp`, or an in-memory `emptyDir` in Kubernetes).
    pub link_dir: Option<PathBuf>,
}

/// The data-plane listener.
#[derive(Clone, Debug, PartialEq)]
pub struct Listener {
    /// Address to bind; port 0 lets the OS choose.
    pub addr: SocketAddr,
    /// Serve TLS (ALPN `h2`, `http/1.1`) with this certificate, or plaintext (HTTP/1.1 and h2c
    /// prior knowledge) when `None`.
    pub tls: Option<TlsFiles>,
    /// Client connections open at once; over it, a new connection waits up to
    /// `connection_wait` for a slot and is closed otherwise. Calls in flight are untouched.
    pub max_connections: usize,
    /// How long a connection over `max_connections` waits for a slot before it is closed.
    pub connection_wait: Duration,
    /// Time a new connection has to finish its TLS handshake and show which protocol it speaks
    /// (its first bytes); closed after it.
    pub handshake_timeout: Duration,
    /// A client connection with no call in flight for this long is closed (HTTP/2: GOAWAY);
    /// `None` keeps idle connections open.
    pub idle_timeout: Option<Duration>,
    /// HTTP/2 PING interval towards clients; `None` sends none.
    pub keepalive_interval: Option<Duration>,
    /// How long a client's PING answer may take before its connection is closed.
    pub keepalive_timeout: Duration,
    /// TCP keepalive idle time on client sockets; `None` leaves it off.
    pub tcp_keepalive: Option<Duration>,
    /// The HTTP/3 (QUIC) listener beside the TCP one; `None` runs none. Needs `tls`.
    pub h3: Option<H3Listener>,
    /// The UCX listener for peer pnp instances (`ucx://` upstreams); `None` runs none.
    pub ucx: Option<UcxListener>,
}

/// The UCX listener (`[listener.ucx]`, `--listen-ucx`): where peer pnp instances whose
/// upstream is `ucx://HOST:PORT` connect (a TCP side channel; the calls then go over whatever
/// UCX picks: RDMA, shared memory or TCP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UcxListener {
    /// The side channel's TCP address; port 0 lets the OS choose.
    pub addr: SocketAddr,
    /// UCX settings of the listener.
    pub settings: UcxSettings,
}

/// UCX settings of a UCX listener or a `ucx://` upstream (the names are UCX's environment
/// variables without `UCX_`; what is not set keeps UCX's default or the process's `UCX_*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UcxSettings {
    /// `TLS`: `tcp`, `sm`, `rc_x,ud_x,sm`, `dc_x` (RoCEv2), …
    pub tls: Option<String>,
    /// `NET_DEVICES`: `lo`, `mlx5_0:1`, …
    pub net_devices: Option<String>,
    /// `RNDV_THRESH`: the size from which UCX uses its rendezvous (zero-copy) protocol.
    pub rndv_thresh: Option<String>,
    /// Any other UCX setting, e.g. `IB_GID_INDEX = "3"` for RoCEv2.
    pub extra: Vec<(String, String)>,
    /// Payload bytes a call may have unread in this process, per direction (per-call credit).
    pub call_window: u32,
    /// Largest message payload in one frame; longer messages go as a head and fragments.
    pub max_fragment: u32,
    /// How long the UCX thread keeps polling after activity before it sleeps on its event fd
    /// (zero: sleep at once). Polling finds a reply or the next fragment without a wakeup, at
    /// the price of a busy core while traffic flows.
    pub busy_poll: Duration,
}

impl Default for UcxSettings {
    fn default() -> Self {
        Self {
            tls: None,
            net_devices: None,
            rndv_thresh: None,
            extra: Vec::new(),
            call_window: 8 << 20,
            max_fragment: 2 << 20,
            busy_poll: Duration::ZERO,
        }
    }
}

/// The HTTP/3 listener: UDP, TLS 1.3 with the listener's certificate, ALPN `h3`, no 0-RTT.
///
/// What clients can make pnp hold in request bytes is bounded by the QUIC receive windows: at
/// most `stream_window` per stream and `connection_window` per connection, whatever the number
/// of streams (so at most `max_connections` × `connection_window` in all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct H3Listener {
    /// UDP address to bind; port 0 lets the OS choose.
    pub addr: SocketAddr,
    /// QUIC receive window per request stream, in bytes.
    pub stream_window: u64,
    /// QUIC receive window per connection, in bytes (all its streams together).
    pub connection_window: u64,
}

impl H3Listener {
    /// An HTTP/3 listener on `addr` with the default windows.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            stream_window: DEFAULT_H3_STREAM_WINDOW,
            connection_window: DEFAULT_H3_CONNECTION_WINDOW,
        }
    }
}

/// A certificate chain and its private key, both PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Where calls are forwarded.
#[derive(Clone, Debug, PartialEq)]
pub struct Upstream {
    /// The target.
    pub target: UpstreamTarget,
    /// Extra PEM root certificates to trust for `https://` and `h3://` upstreams (added to the
    /// system roots).
    pub ca: Option<PathBuf>,
    /// How long to wait for a TCP (and TLS) connection to the upstream.
    pub connect_timeout: Duration,
    /// HTTP/2 connections to the upstream, filled in order: 100 calls on one, then the next.
    pub connections: usize,
    /// HTTP/2 receive window per upstream stream: the most a stalled client's call can hold
    /// in pnp from the upstream (the connection window never binds before the streams' do).
    pub stream_window: u32,
    /// Chunked HTTP/1.1 upstreams (`h1://`): connections open at once, one call each, so the
    /// most calls in flight; as many stay open idle for later calls.
    pub h1_connections: usize,
    /// UCX settings of a `ucx://` upstream (`[upstream.ucx]`).
    pub ucx: UcxSettings,
    /// The same peer over several transports (`upstream.transports`), in order of preference,
    /// at most one per protocol; the call's profile picks among them (see
    /// [`Negotiation`]). Empty: the target alone.
    pub transports: Vec<url::Url>,
}

impl Upstream {
    /// The peer's transports in order: [`transports`](Self::transports), or the target alone.
    /// Empty while the target is the demo.
    pub fn peer(&self) -> Vec<url::Url> {
        match (&self.target, self.transports.is_empty()) {
            (_, false) => self.transports.clone(),
            (UpstreamTarget::Url(url), true) => vec![url.clone()],
            (UpstreamTarget::Demo, true) => Vec::new(),
        }
    }
}

/// The upstream of the data plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamTarget {
    /// The built-in demo upstreams, started in-process on a loopback port.
    Demo,
    /// A gRPC server: `http://` is HTTP/2 cleartext (h2c), `https://` is HTTP/2 over TLS,
    /// `h3://` is HTTP/3 over QUIC (a peer pnp's `--listen-h3`); a gRPC-Web server (a peer pnp,
    /// tonic-web): `h1://` is chunked HTTP/1.1, `h1s://` the same over TLS.
    Url(url::Url),
}

/// Cross-origin rules for browsers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cors {
    /// Origins allowed to call: [`AllowedOrigins::Any`] (the default) lets any origin call
    /// without credentials; a [`AllowedOrigins::List`] lets only its origins call, with them.
    pub allowed_origins: AllowedOrigins,
    /// Response headers exposed to scripts in addition to `grpc-status`, `grpc-message`,
    /// `grpc-status-details-bin`.
    pub expose_headers: Vec<String>,
    /// How long browsers may cache a preflight answer.
    pub max_age: Duration,
    /// Honour grpc-web's `$httpHeaders` query parameter (headers sent in the URL so a browser
    /// needs no preflight), and then only from allowed origins. It can never set
    /// `content-type`, hop-by-hop headers or pnp's own headers.
    pub http_headers_param: bool,
}

/// Which origins may call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// Any origin, without credentials (cookies, HTTP auth) in cross-origin calls.
    Any,
    /// Exactly these origins, e.g. `https://app.example.com`; credentials are allowed for them.
    List(Vec<String>),
}

/// Size limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest message accepted in either direction, checked from the frame header before any
    /// allocation.
    pub max_message_size: usize,
    /// Bytes of messages pnp may hold at once over all calls (replay buffers for retries,
    /// degraded replies, messages being assembled). A request the budget cannot keep for a
    /// retry goes on without one; a call that cannot go on without the bytes ends with
    /// RESOURCE_EXHAUSTED.
    pub buffer_budget: usize,
}

/// What pnp believes of request headers that clients send at the edge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edge {
    /// Take `x-pnp-job` from clients as the call's job (metrics label, forwarded upstream).
    /// When false, a client's `x-pnp-job` is only matched by routes that name a job, and is
    /// neither forwarded nor used as a label.
    pub trust_job_header: bool,
    /// Append the client's address to `x-forwarded-for` on the way upstream.
    pub forwarded_for: bool,
}

/// Graceful shutdown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shutdown {
    /// After SIGTERM/SIGINT, how long in-flight streams may run before they are ended with
    /// UNAVAILABLE.
    pub grace_period: Duration,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML did not parse or had an unknown key (the message names it).
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    /// A value had the right type but a wrong form.
    #[error("invalid `{key}`: {reason}")]
    Invalid {
        /// Dotted key.
        key: String,
        /// What was wrong.
        reason: String,
    },
}

impl Config {
    /// The defaults: `127.0.0.1:8080` in front of the demo upstreams, admin on `127.0.0.1:9901`.
    pub fn demo() -> Self {
        Self::with_upstream(UpstreamTarget::Demo)
    }

    /// Defaults around one upstream.
    pub fn with_upstream(target: UpstreamTarget) -> Self {
        Self {
            listener: Listener {
                addr: DEFAULT_LISTEN
                    .parse()
                    .unwrap_or_else(|_| unreachable_addr()),
                tls: None,
                max_connections: DEFAULT_MAX_CONNECTIONS,
                connection_wait: Duration::from_millis(250),
                handshake_timeout: Duration::from_secs(10),
                idle_timeout: Some(Duration::from_secs(300)),
                keepalive_interval: Some(Duration::from_secs(60)),
                keepalive_timeout: Duration::from_secs(20),
                tcp_keepalive: Some(Duration::from_secs(60)),
                h3: None,
                ucx: None,
            },
            admin: DEFAULT_ADMIN.parse().ok(),
            upstream: Upstream {
                target,
                ca: None,
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                connections: 4,
                stream_window: DEFAULT_STREAM_WINDOW,
                h1_connections: DEFAULT_H1_CONNECTIONS,
                ucx: UcxSettings::default(),
                transports: Vec::new(),
            },
            cors: Cors {
                allowed_origins: AllowedOrigins::Any,
                expose_headers: Vec::new(),
                max_age: Duration::from_secs(600),
                http_headers_param: true,
            },
            limits: Limits {
                max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
                buffer_budget: DEFAULT_BUFFER_BUDGET,
            },
            shutdown: Shutdown {
                grace_period: DEFAULT_GRACE_PERIOD,
            },
            resilience: Resilience::default(),
            jobs: Jobs::default(),
            edge: Edge {
                trust_job_header: false,
                forwarded_for: true,
            },
            control: ControlLink::default(),
        }
    }

    /// Parse a TOML document. Missing sections take their defaults; unknown keys are errors.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(text)?;
        raw.into_config()
    }

    /// Parse an upstream URL as given on the command line.
    pub fn parse_upstream(url: &str) -> Result<UpstreamTarget, ConfigError> {
        raw::parse_upstream("upstream.url", url)
    }
}

fn unreachable_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
