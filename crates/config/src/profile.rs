//! Job profiles, routes and the resilience settings of the data plane.
//!
//! A [`Route`] matches calls by service, method and the `x-pnp-job` header and names a
//! [`Profile`]; the profile holds the per-call policies (clocks, retries, degradation). The
//! defaults are right for token streaming: no total timer, a generous first-message wait (LLMs
//! may think for ~12 s), an idle gap that only runs once tokens flow, and retries only where the
//! request provably never reached the upstream. The default clocks never end a call before a
//! longer `grpc-timeout` the client asked for; clocks a profile sets explicitly always apply.

use std::collections::BTreeMap;
use std::time::Duration;

use pnp_wire::status::Code;

/// The profile every call gets unless a route names another.
pub const DEFAULT_PROFILE: &str = "default";

/// Per-call policies.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    /// How long the upstream may take to send the first response message.
    pub first_message: FirstMessage,
    /// `first_message` was configured (`first_message_timeout` or `model_class`, or a flag)
    /// rather than left at the built-in default. A configured clock applies even when the
    /// client's `grpc-timeout` is longer; the default one then yields to the deadline.
    pub first_message_explicit: bool,
    /// Longest silence between two messages (either direction) once the first response message
    /// arrived; `None` = no idle clock.
    pub idle_timeout: Option<Duration>,
    /// `idle_timeout` was configured rather than left at the built-in default (see
    /// `first_message_explicit`).
    pub idle_timeout_explicit: bool,
    /// Cap on the total deadline; the call's deadline is the smaller of this and
    /// `grpc-timeout`. `None` = only the client's `grpc-timeout`.
    pub max_duration: Option<Duration>,
    /// Retry rules (gRFC A6).
    pub retry: RetrySettings,
    /// The methods of this profile are idempotent: retrying them after the upstream saw the
    /// request is safe.
    pub idempotent: bool,
    /// Under overload, streams of this profile may be answered as one buffered reply.
    pub degradable: bool,
    /// Largest message of this profile's calls, either direction; `None`: `limits.max_message_size`.
    /// Bulk profiles (model loads, checkpoints) go up to 4 GiB − 1, the gRPC frame limit.
    pub max_message_size: Option<usize>,
    /// Which of the peer's transports this profile's calls may use, and what moves them.
    pub negotiation: Negotiation,
}

/// How a profile's calls choose among the peer's transports (`[profiles.NAME.negotiation]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Negotiation {
    /// Transport names (`h2`, `h1`, `h3`, `ucx`) in order of preference: the first is the
    /// default, the rest the fallback chain. `None`: every transport of the upstream, in the
    /// upstream's order.
    pub transports: Option<Vec<String>>,
    /// How long a transport may take to be ready (connected) before a call skips it for the
    /// next one, its request unread.
    pub budget: Duration,
    /// Rules that move the profile's calls between its transports.
    pub rules: Vec<SwitchRule>,
    /// How far below a throughput threshold a job must fall to move back (0.2: 128 MB/s up,
    /// 102.4 MB/s down).
    pub hysteresis: f64,
    /// Time constant of the job's throughput average.
    pub window: Duration,
    /// How long a job that failed over stays away from the transport it left.
    pub return_after: Duration,
}

impl Default for Negotiation {
    fn default() -> Self {
        Self {
            transports: None,
            budget: Duration::from_millis(500),
            rules: Vec::new(),
            hysteresis: 0.2,
            window: Duration::from_secs(1),
            return_after: Duration::from_secs(30),
        }
    }
}

/// A rule of a profile's [`Negotiation`].
#[derive(Clone, Debug, PartialEq)]
pub enum SwitchRule {
    /// The job's throughput (request and response payload, bytes per second) above `above`
    /// moves its new calls to the transport `to`.
    ThroughputAbove {
        /// Bytes per second.
        above: u64,
        /// Transport name.
        to: String,
    },
    /// A call whose size hint (`x-pnp-size-hint`, else `content-length`) is above `above`
    /// bytes goes to `to`.
    SizeAbove {
        /// Bytes.
        above: u64,
        /// Transport name.
        to: String,
    },
    /// After `failures` consecutive calls the transport failed to carry, the job moves to the
    /// next transport of the list.
    Failures {
        /// Consecutive failures.
        failures: u32,
    },
}

impl Default for Profile {
    fn default() -> Self {
        Self {
            first_message: FirstMessage::After(Duration::from_secs(30)),
            first_message_explicit: false,
            idle_timeout: Some(Duration::from_secs(30)),
            idle_timeout_explicit: false,
            max_duration: None,
            retry: RetrySettings::default(),
            idempotent: false,
            degradable: false,
            max_message_size: None,
            negotiation: Negotiation::default(),
        }
    }
}

/// The first-message clock of a profile.
#[derive(Clone, Debug, PartialEq)]
pub enum FirstMessage {
    /// No first-message clock.
    Off,
    /// A fixed budget.
    After(Duration),
    /// The budget of a model class times the multiplier of an SLA tier (see
    /// `pnp_policy::first_message`: `classifier` 300 ms, `llm` 1200 ms; tiers `standard` ×1.0,
    /// `batch` ×1.5).
    Class {
        /// Model class, e.g. `llm`.
        class: String,
        /// SLA tier, e.g. `standard`.
        tier: String,
    },
}

/// Retry rules of a profile (gRFC A6).
#[derive(Clone, Debug, PartialEq)]
pub struct RetrySettings {
    /// Attempts in all, the first included; 1 disables retries.
    pub max_attempts: u32,
    /// Back-off ceiling before the first retry.
    pub initial_backoff: Duration,
    /// Largest back-off ceiling.
    pub max_backoff: Duration,
    /// Growth of the ceiling per attempt.
    pub backoff_multiplier: f64,
    /// Status codes that may be retried (when the method is idempotent).
    pub retryable_codes: Vec<Code>,
    /// Request bytes kept for replay; a call whose request outgrows it is not retried.
    pub replay_buffer: usize,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            backoff_multiplier: 2.0,
            retryable_codes: vec![Code::Unavailable],
            replay_buffer: 64 * 1024,
        }
    }
}

/// Which calls a route takes. Empty fields match anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// `package.Service`.
    pub service: Option<String>,
    /// Method name.
    pub method: Option<String>,
    /// Value of the `x-pnp-job` header.
    pub job: Option<String>,
    /// The profile these calls get.
    pub profile: String,
}

impl Route {
    /// Whether a call matches this route.
    pub fn matches(&self, service: Option<&str>, method: Option<&str>, job: Option<&str>) -> bool {
        fn field(want: &Option<String>, have: Option<&str>) -> bool {
            want.as_deref().is_none_or(|w| Some(w) == have)
        }
        field(&self.service, service) && field(&self.method, method) && field(&self.job, job)
    }
}

/// Profiles by name and the routes that pick them.
#[derive(Clone, Debug, PartialEq)]
pub struct Jobs {
    /// Profiles by name; always holds [`DEFAULT_PROFILE`].
    pub profiles: BTreeMap<String, Profile>,
    /// Routes in order; the first match wins, no match means the default profile.
    pub routes: Vec<Route>,
}

impl Default for Jobs {
    fn default() -> Self {
        Self {
            profiles: BTreeMap::from([(DEFAULT_PROFILE.to_owned(), Profile::default())]),
            routes: Vec::new(),
        }
    }
}

impl Jobs {
    /// The name of the profile for a call.
    pub fn profile_for(
        &self,
        service: Option<&str>,
        method: Option<&str>,
        job: Option<&str>,
    ) -> &str {
        self.routes
            .iter()
            .find(|r| r.matches(service, method, job))
            .map_or(DEFAULT_PROFILE, |r| r.profile.as_str())
    }

    /// The default profile, for flags that change it.
    pub fn default_profile_mut(&mut self) -> &mut Profile {
        self.profiles.entry(DEFAULT_PROFILE.to_owned()).or_default()
    }
}

/// Data-plane-wide resilience settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Resilience {
    /// Calls in flight before new ones are shed.
    pub max_concurrent_streams: usize,
    /// Calls one client (one IP address) may have in flight; `None` means a quarter of
    /// `max_concurrent_streams` (at least one).
    pub max_streams_per_client: Option<usize>,
    /// Calls waiting for upstream response headers above which pnp signals scale-out.
    pub queue_threshold: usize,
    /// p95 call duration above which degradable streams are answered buffered.
    pub stream_p95_slo: Duration,
    /// Another instance can take shed calls: answer UNAVAILABLE with `grpc-retry-pushback-ms`
    /// instead of RESOURCE_EXHAUSTED.
    pub peer_available: bool,
    /// Pushback sent with shed calls when `peer_available`.
    pub pushback: Duration,
    /// Consecutive upstream failures that open the circuit.
    pub breaker_failures: u32,
    /// First open period of the circuit; it grows on each re-open.
    pub breaker_base_penalty: Duration,
    /// Largest open period.
    pub breaker_max_penalty: Duration,
    /// Retry throttle (gRFC A6 token bucket): bucket size.
    pub retry_max_tokens: u32,
    /// Retry throttle: tokens a success puts back.
    pub retry_token_ratio: f64,
    /// HTTP/2 keepalive PING interval to upstreams (sent only while streams are open; gRFC A8).
    pub keepalive_interval: Duration,
    /// How long a keepalive PING may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// Bounds of the adaptive HTTP/1.1 header-read timeout.
    pub header_read_min: Duration,
    /// Upper bound of the adaptive header-read timeout.
    pub header_read_max: Duration,
}

impl Default for Resilience {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 10_000,
            max_streams_per_client: None,
            queue_threshold: 1_000,
            stream_p95_slo: Duration::from_secs(30),
            peer_available: false,
            pushback: Duration::from_millis(100),
            breaker_failures: 5,
            breaker_base_penalty: Duration::from_secs(1),
            breaker_max_penalty: Duration::from_secs(30),
            retry_max_tokens: 10,
            retry_token_ratio: 0.1,
            keepalive_interval: Duration::from_secs(300),
            keepalive_timeout: Duration::from_secs(20),
            header_read_min: Duration::from_secs(2),
            header_read_max: Duration::from_secs(30),
        }
    }
}

/// Parse a gRPC code name such as `UNAVAILABLE` (any case) or its number.
pub fn parse_code(text: &str) -> Option<Code> {
    if let Ok(n) = text.parse::<i32>() {
        return Code::from_i32(n);
    }
    Code::ALL
        .iter()
        .copied()
        .find(|c| c.name().eq_ignore_ascii_case(text))
}
