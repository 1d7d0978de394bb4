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
    parse_code, FirstMessage, Jobs, Profile, Resilience, RetrySettings, Route, DEFAULT_PROFILE,
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
}

/// The data-plane listener.
#[derive(Clone, Debug, PartialEq)]
pub struct Listener {
    /// Address to bind; port 0 lets the OS choose.
    pub addr: SocketAddr,
    /// Serve TLS (ALPN `h2`, `http/1.1`) with this certificate, or plaintext (HTTP/1.1 and h2c
    /// prior knowledge) when `None`.
    pub tls: Option<TlsFiles>,
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
    /// Extra PEM root certificates to trust for `https://` upstreams (added to the system roots).
    pub ca: Option<PathBuf>,
    /// How long to wait for a TCP (and TLS) connection to the upstream.
    pub connect_timeout: Duration,
}

/// The upstream of the data plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamTarget {
    /// The built-in demo upstreams, started in-process on a loopback port.
    Demo,
    /// A gRPC server: `http://` is HTTP/2 cleartext (h2c), `https://` is HTTP/2 over TLS.
    Url(url::Url),
}

/// Cross-origin rules for browsers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cors {
    /// Origins allowed to call; [`AllowedOrigins::Any`] mirrors any origin back.
    pub allowed_origins: AllowedOrigins,
    /// Response headers exposed to scripts in addition to `grpc-status`, `grpc-message`,
    /// `grpc-status-details-bin`.
    pub expose_headers: Vec<String>,
    /// How long browsers may cache a preflight answer.
    pub max_age: Duration,
}

/// Which origins may call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// Any origin (mirrored back, so credentials still work).
    Any,
    /// Exactly these origins, e.g. `https://app.example.com`.
    List(Vec<String>),
}

/// Size limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest message accepted in either direction, checked from the frame header before any
    /// allocation.
    pub max_message_size: usize,
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
            },
            admin: DEFAULT_ADMIN.parse().ok(),
            upstream: Upstream {
                target,
                ca: None,
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            },
            cors: Cors {
                allowed_origins: AllowedOrigins::Any,
                expose_headers: Vec::new(),
                max_age: Duration::from_secs(600),
            },
            limits: Limits {
                max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            },
            shutdown: Shutdown {
                grace_period: DEFAULT_GRACE_PERIOD,
            },
            resilience: Resilience::default(),
            jobs: Jobs::default(),
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
