//! The TOML shape, exactly as written by users, and its conversion into typed values.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use std::collections::BTreeMap;

use crate::{
    parse_code, parse_size, AllowedOrigins, Config, ConfigError, Cors, FirstMessage, H3Listener,
    Jobs, Limits, Negotiation, Profile, Resilience, RetrySettings, Route, Shutdown, SwitchRule,
    TlsFiles, UcxListener, UcxSettings, Upstream, UpstreamTarget, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_GRACE_PERIOD, DEFAULT_PROFILE,
};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    listener: RawListener,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    cors: RawCors,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    shutdown: RawShutdown,
    #[serde(default)]
    resilience: RawResilience,
    #[serde(default)]
    profiles: BTreeMap<String, RawProfile>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    edge: RawEdge,
    #[serde(default)]
    control: RawControl,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    link_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEdge {
    trust_job_header: Option<bool>,
    forwarded_for: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResilience {
    max_concurrent_streams: Option<usize>,
    max_streams_per_client: Option<usize>,
    queue_threshold: Option<usize>,
    stream_p95_slo: Option<String>,
    peer_available: Option<bool>,
    pushback: Option<String>,
    #[serde(default)]
    breaker: RawBreaker,
    #[serde(default)]
    retry_throttle: RawThrottle,
    #[serde(default)]
    keepalive: RawKeepalive,
    #[serde(default)]
    header_read: RawHeaderRead,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    failure_threshold: Option<u32>,
    base_penalty: Option<String>,
    max_penalty: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawThrottle {
    max_tokens: Option<u32>,
    token_ratio: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeepalive {
    interval: Option<String>,
    timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeaderRead {
    min: Option<String>,
    max: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    first_message_timeout: Option<String>,
    model_class: Option<String>,
    sla_tier: Option<String>,
    idle_timeout: Option<String>,
    max_duration: Option<String>,
    idempotent: Option<bool>,
    degradable: Option<bool>,
    max_message_size: Option<String>,
    #[serde(default)]
    retry: RawRetry,
    negotiation: Option<RawNegotiation>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNegotiation {
    transports: Option<Vec<String>>,
    budget: Option<String>,
    hysteresis: Option<f64>,
    window: Option<String>,
    return_after: Option<String>,
    #[serde(default)]
    rules: Vec<RawSwitchRule>,
}

/// One rule: exactly one of the conditions, and `to` where the condition moves calls to a
/// named transport.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSwitchRule {
    throughput_above: Option<String>,
    size_above: Option<String>,
    failures: Option<u32>,
    to: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<u32>,
    initial_backoff: Option<String>,
    max_backoff: Option<String>,
    backoff_multiplier: Option<f64>,
    retryable_codes: Option<Vec<String>>,
    replay_buffer: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    service: Option<String>,
    method: Option<String>,
    job: Option<String>,
    profile: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    addr: Option<String>,
    tls: Option<RawTls>,
    max_connections: Option<usize>,
    connection_wait: Option<String>,
    handshake_timeout: Option<String>,
    idle_timeout: Option<String>,
    keepalive_interval: Option<String>,
    keepalive_timeout: Option<String>,
    tcp_keepalive: Option<String>,
    h3: Option<RawH3>,
    ucx: Option<RawUcxListener>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUcxListener {
    addr: String,
    tls: Option<String>,
    net_devices: Option<String>,
    rndv_thresh: Option<String>,
    #[serde(default)]
    extra: BTreeMap<String, String>,
    call_window: Option<String>,
    max_fragment: Option<String>,
    busy_poll: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUcx {
    tls: Option<String>,
    net_devices: Option<String>,
    rndv_thresh: Option<String>,
    #[serde(default)]
    extra: BTreeMap<String, String>,
    call_window: Option<String>,
    max_fragment: Option<String>,
    busy_poll: Option<String>,
}

impl RawUcx {
    fn into_settings(self, key: &str) -> Result<UcxSettings, ConfigError> {
        let d = UcxSettings::default();
        let size = |field: &str, text: &Option<String>, default: u32| match text {
            None => Ok(default),
            Some(text) => parse_size(text)
                .ok()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| (64 * 1024..=(1 << 30)).contains(n))
                .ok_or_else(|| invalid(&format!("{key}.{field}"), "must be 64KiB … 1GiB")),
        };
        let settings = UcxSettings {
            call_window: size("call_window", &self.call_window, d.call_window)?,
            max_fragment: size("max_fragment", &self.max_fragment, d.max_fragment)?,
            busy_poll: {
                let field = format!("{key}.busy_poll");
                let busy_poll = duration_or(&field, &self.busy_poll, d.busy_poll)?;
                if busy_poll > Duration::from_millis(10) {
                    return Err(invalid(&field, "must be at most 10ms"));
                }
                busy_poll
            },
            tls: self.tls,
            net_devices: self.net_devices,
            rndv_thresh: self.rndv_thresh,
            extra: self.extra.into_iter().collect(),
        };
        if settings.max_fragment > settings.call_window {
            return Err(invalid(
                &format!("{key}.max_fragment"),
                "is larger than call_window",
            ));
        }
        Ok(settings)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawH3 {
    addr: String,
    stream_window: Option<String>,
    connection_window: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    addr: Option<String>,
    enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    /// `demo`, `http://host:port`, `https://host:port`, `h1://host:port` or `h1s://host:port`.
    url: Option<String>,
    ca: Option<PathBuf>,
    connect_timeout: Option<String>,
    connections: Option<usize>,
    stream_window: Option<String>,
    h1_connections: Option<usize>,
    /// The same peer over several transports, in order of preference.
    transports: Option<Vec<String>>,
    ucx: Option<RawUcx>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCors {
    allowed_origins: Option<Vec<String>>,
    expose_headers: Option<Vec<String>>,
    max_age: Option<String>,
    http_headers_param: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_message_size: Option<String>,
    buffer_budget: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    grace_period: Option<String>,
}

/// A message size limit: at most 4 GiB − 1, what the gRPC frame's 4-byte length can say.
fn parse_message_size(key: &str, text: &str) -> Result<usize, ConfigError> {
    let size = parse_size(text).map_err(|reason| invalid(key, reason))?;
    if size == 0 || size > u32::MAX as usize {
        return Err(invalid(
            key,
            "must be 1 byte … 4 GiB − 1 (4294967295), the gRPC frame limit",
        ));
    }
    Ok(size)
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

fn parse_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse()
        .map_err(|e| invalid(key, format!("`{text}` is not an IP:port address ({e})")))
}

fn parse_duration(key: &str, text: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text).map_err(|e| invalid(key, format!("`{text}`: {e}")))
}

/// A duration, or `off` for none.
fn parse_optional_duration(key: &str, text: &str) -> Result<Option<Duration>, ConfigError> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    parse_duration(key, text).map(Some)
}

fn duration_or(
    key: &str,
    text: &Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match text {
        Some(text) => parse_duration(key, text),
        None => Ok(default),
    }
}

impl RawResilience {
    fn into_resilience(self) -> Result<Resilience, ConfigError> {
        let d = Resilience::default();
        let r = Resilience {
            max_concurrent_streams: self
                .max_concurrent_streams
                .unwrap_or(d.max_concurrent_streams),
            max_streams_per_client: self.max_streams_per_client.or(d.max_streams_per_client),
            queue_threshold: self.queue_threshold.unwrap_or(d.queue_threshold),
            stream_p95_slo: duration_or(
                "resilience.stream_p95_slo",
                &self.stream_p95_slo,
                d.stream_p95_slo,
            )?,
            peer_available: self.peer_available.unwrap_or(d.peer_available),
            pushback: duration_or("resilience.pushback", &self.pushback, d.pushback)?,
            breaker_failures: self.breaker.failure_threshold.unwrap_or(d.breaker_failures),
            breaker_base_penalty: duration_or(
                "resilience.breaker.base_penalty",
                &self.breaker.base_penalty,
                d.breaker_base_penalty,
            )?,
            breaker_max_penalty: duration_or(
                "resilience.breaker.max_penalty",
                &self.breaker.max_penalty,
                d.breaker_max_penalty,
            )?,
            retry_max_tokens: self.retry_throttle.max_tokens.unwrap_or(d.retry_max_tokens),
            retry_token_ratio: self
                .retry_throttle
                .token_ratio
                .unwrap_or(d.retry_token_ratio),
            keepalive_interval: duration_or(
                "resilience.keepalive.interval",
                &self.keepalive.interval,
                d.keepalive_interval,
            )?,
            keepalive_timeout: duration_or(
                "resilience.keepalive.timeout",
                &self.keepalive.timeout,
                d.keepalive_timeout,
            )?,
            header_read_min: duration_or(
                "resilience.header_read.min",
                &self.header_read.min,
                d.header_read_min,
            )?,
            header_read_max: duration_or(
                "resilience.header_read.max",
                &self.header_read.max,
                d.header_read_max,
            )?,
        };
        if r.max_concurrent_streams == 0 {
            return Err(invalid(
                "resilience.max_concurrent_streams",
                "must be at least 1",
            ));
        }
        if r.breaker_failures == 0 {
            return Err(invalid(
                "resilience.breaker.failure_threshold",
                "must be at least 1",
            ));
        }
        if r.breaker_max_penalty < r.breaker_base_penalty {
            return Err(invalid(
                "resilience.breaker.max_penalty",
                "is smaller than base_penalty",
            ));
        }
        if !(r.retry_token_ratio > 0.0 && r.retry_token_ratio <= 1.0) {
            return Err(invalid(
                "resilience.retry_throttle.token_ratio",
                "must be in (0, 1]",
            ));
        }
        if r.header_read_min.is_zero() || r.header_read_max < r.header_read_min {
            return Err(invalid("resilience.header_read", "needs 0 < min <= max"));
        }
        if r.keepalive_interval < Duration::from_secs(10) {
            return Err(invalid(
                "resilience.keepalive.interval",
                "below 10s gRPC servers answer with too_many_pings (gRFC A8)",
            ));
        }
        Ok(r)
    }
}

impl RawProfile {
    fn into_profile(self, name: &str) -> Result<Profile, ConfigError> {
        let key = |field: &str| format!("profiles.{name}.{field}");
        let d = Profile::default();
        let first_message = match (&self.first_message_timeout, &self.model_class) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    &key("first_message_timeout"),
                    "give either first_message_timeout or model_class, not both",
                ))
            }
            (Some(text), None) => {
                match parse_optional_duration(&key("first_message_timeout"), text)? {
                    Some(d) => FirstMessage::After(d),
                    None => FirstMessage::Off,
                }
            }
            (None, Some(class)) => FirstMessage::Class {
                class: class.clone(),
                tier: self
                    .sla_tier
                    .clone()
                    .unwrap_or_else(|| "standard".to_owned()),
            },
            (None, None) => d.first_message,
        };
        if self.sla_tier.is_some() && self.model_class.is_none() {
            return Err(invalid(&key("sla_tier"), "needs model_class"));
        }
        let idle_timeout = match &self.idle_timeout {
            Some(text) => parse_optional_duration(&key("idle_timeout"), text)?,
            None => d.idle_timeout,
        };
        let max_duration = match &self.max_duration {
            Some(text) => parse_optional_duration(&key("max_duration"), text)?,
            None => d.max_duration,
        };
        let rd = RetrySettings::default();
        let retry = RetrySettings {
            max_attempts: self.retry.max_attempts.unwrap_or(rd.max_attempts),
            initial_backoff: duration_or(
                &key("retry.initial_backoff"),
                &self.retry.initial_backoff,
                rd.initial_backoff,
            )?,
            max_backoff: duration_or(
                &key("retry.max_backoff"),
                &self.retry.max_backoff,
                rd.max_backoff,
            )?,
            backoff_multiplier: self
                .retry
                .backoff_multiplier
                .unwrap_or(rd.backoff_multiplier),
            retryable_codes: match &self.retry.retryable_codes {
                None => rd.retryable_codes,
                Some(names) => names
                    .iter()
                    .map(|n| {
                        parse_code(n).ok_or_else(|| {
                            invalid(
                                &key("retry.retryable_codes"),
                                format!("`{n}` is not a gRPC status code"),
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?,
            },
            replay_buffer: match &self.retry.replay_buffer {
                Some(text) => {
                    parse_size(text).map_err(|r| invalid(&key("retry.replay_buffer"), r))?
                }
                None => rd.replay_buffer,
            },
        };
        if retry.max_attempts == 0 {
            return Err(invalid(&key("retry.max_attempts"), "must be at least 1"));
        }
        if !(retry.backoff_multiplier >= 1.0 && retry.backoff_multiplier.is_finite()) {
            return Err(invalid(
                &key("retry.backoff_multiplier"),
                "must be at least 1",
            ));
        }
        if retry.max_backoff < retry.initial_backoff {
            return Err(invalid(
                &key("retry.max_backoff"),
                "is smaller than initial_backoff",
            ));
        }
        let negotiation = match self.negotiation {
            Some(raw) => raw.into_negotiation(&key("negotiation"))?,
            None => Negotiation::default(),
        };
        Ok(Profile {
            negotiation,
            first_message,
            first_message_explicit: self.first_message_timeout.is_some()
                || self.model_class.is_some(),
            idle_timeout,
            idle_timeout_explicit: self.idle_timeout.is_some(),
            max_duration,
            retry,
            idempotent: self.idempotent.unwrap_or(d.idempotent),
            degradable: self.degradable.unwrap_or(d.degradable),
            max_message_size: match &self.max_message_size {
                Some(text) => Some(parse_message_size(&key("max_message_size"), text)?),
                None => d.max_message_size,
            },
        })
    }
}

/// A transport's name (`h2`, `h1`, `h3`, `ucx`) from an upstream URL's scheme.
pub(crate) fn transport_name(scheme: &str) -> Option<&'static str> {
    match scheme {
        "http" | "https" => Some("h2"),
        "h1" | "h1s" => Some("h1"),
        "h3" => Some("h3"),
        "ucx" => Some("ucx"),
        _ => None,
    }
}

const TRANSPORT_NAMES: [&str; 4] = ["h2", "h1", "h3", "ucx"];

impl RawNegotiation {
    fn into_negotiation(self, key: &str) -> Result<Negotiation, ConfigError> {
        let key = |field: &str| format!("{key}.{field}");
        let d = Negotiation::default();
        let known = |field: &str, name: &str| {
            if TRANSPORT_NAMES.contains(&name) {
                Ok(name.to_owned())
            } else {
                Err(invalid(
                    &key(field),
                    format!("`{name}` is not a transport (use h2, h1, h3 or ucx)"),
                ))
            }
        };
        let transports = match self.transports {
            None => None,
            Some(list) => {
                if list.is_empty() {
                    return Err(invalid(&key("transports"), "lists no transport"));
                }
                let mut seen = Vec::new();
                for name in &list {
                    known("transports", name)?;
                    if seen.contains(name) {
                        return Err(invalid(
                            &key("transports"),
                            format!("`{name}` is listed twice"),
                        ));
                    }
                    seen.push(name.clone());
                }
                Some(list)
            }
        };
        let mut rules = Vec::new();
        for (i, rule) in self.rules.into_iter().enumerate() {
            let field = format!("rules[{i}]");
            let to = rule
                .to
                .as_deref()
                .map(|to| known(&format!("{field}.to"), to))
                .transpose()?;
            if let (Some(to), Some(list)) = (&to, &transports) {
                if !list.contains(to) {
                    return Err(invalid(
                        &key(&format!("{field}.to")),
                        format!("`{to}` is not in this profile's transports"),
                    ));
                }
            }
            let rule = match (rule.throughput_above, rule.size_above, rule.failures, to) {
                (Some(rate), None, None, Some(to)) => SwitchRule::ThroughputAbove {
                    above: parse_rate(&key(&format!("{field}.throughput_above")), &rate)?,
                    to,
                },
                (None, Some(size), None, Some(to)) => SwitchRule::SizeAbove {
                    above: parse_size(&size)
                        .map_err(|r| invalid(&key(&format!("{field}.size_above")), r))?
                        as u64,
                    to,
                },
                (None, None, Some(failures), None) => {
                    if failures == 0 {
                        return Err(invalid(
                            &key(&format!("{field}.failures")),
                            "must be at least 1",
                        ));
                    }
                    SwitchRule::Failures { failures }
                }
                (None, None, Some(_), Some(_)) => {
                    return Err(invalid(
                        &key(&field),
                        "`failures` moves a job to the next transport of the list; it takes no `to`",
                    ))
                }
                _ => {
                    return Err(invalid(
                        &key(&field),
                        "give one of `throughput_above` (with `to`), `size_above` (with `to`) or `failures`",
                    ))
                }
            };
            rules.push(rule);
        }
        let hysteresis = self.hysteresis.unwrap_or(d.hysteresis);
        if !(0.0..=0.99).contains(&hysteresis) {
            return Err(invalid(&key("hysteresis"), "must be within 0 … 0.99"));
        }
        let window = duration_or(&key("window"), &self.window, d.window)?;
        if window.is_zero() {
            return Err(invalid(&key("window"), "must be more than 0"));
        }
        let budget = duration_or(&key("budget"), &self.budget, d.budget)?;
        if budget.is_zero() {
            return Err(invalid(&key("budget"), "must be more than 0"));
        }
        Ok(Negotiation {
            transports,
            budget,
            rules,
            hysteresis,
            window,
            return_after: duration_or(&key("return_after"), &self.return_after, d.return_after)?,
        })
    }
}

/// A byte rate: a size per second, `128MB/s` (or a bare size, read as per second).
fn parse_rate(key: &str, text: &str) -> Result<u64, ConfigError> {
    let size = text.trim().strip_suffix("/s").unwrap_or(text);
    match parse_size(size) {
        Ok(0) => Err(invalid(key, "must be more than 0")),
        Ok(bytes) => Ok(bytes as u64),
        Err(reason) => Err(invalid(key, reason)),
    }
}

fn into_jobs(
    profiles: BTreeMap<String, RawProfile>,
    routes: Vec<RawRoute>,
) -> Result<Jobs, ConfigError> {
    let mut jobs = Jobs::default();
    for (name, raw) in profiles {
        let profile = raw.into_profile(&name)?;
        jobs.profiles.insert(name, profile);
    }
    for (i, route) in routes.into_iter().enumerate() {
        if !jobs.profiles.contains_key(&route.profile) {
            return Err(invalid(
                &format!("routes[{i}].profile"),
                format!(
                    "no profile named `{}` (defined: {})",
                    route.profile,
                    jobs.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        jobs.routes.push(Route {
            service: route.service,
            method: route.method,
            job: route.job,
            profile: route.profile,
        });
    }
    debug_assert!(jobs.profiles.contains_key(DEFAULT_PROFILE));
    Ok(jobs)
}

pub(crate) fn parse_upstream(key: &str, text: &str) -> Result<UpstreamTarget, ConfigError> {
    if text == "demo" {
        return Ok(UpstreamTarget::Demo);
    }
    let url = url::Url::parse(text).map_err(|e| invalid(key, format!("`{text}`: {e}")))?;
    match url.scheme() {
        "http" | "https" | "h1" | "h1s" => {}
        "h3" | "ucx" => {
            if url.port().is_none() {
                return Err(invalid(
                    key,
                    format!(
                        "`{text}` needs a port (h3://host:port, the peer's UDP port; ucx://host:port, the peer's --listen-ucx)"
                    ),
                ));
            }
        }
        other => {
            return Err(invalid(
                key,
                format!("scheme `{other}` is not supported (use http:// for h2c, https:// for HTTP/2 over TLS, h1:// or h1s:// for chunked HTTP/1.1, h3:// for HTTP/3, ucx:// for UCX, or `demo`)"),
            ))
        }
    }
    if url.host().is_none() {
        return Err(invalid(key, format!("`{text}` has no host")));
    }
    if url.path() != "/" && !url.path().is_empty() {
        return Err(invalid(
            key,
            format!("`{text}` has a path; gRPC upstreams are addressed by host and port only"),
        ));
    }
    Ok(UpstreamTarget::Url(url))
}

impl RawConfig {
    pub(crate) fn into_config(self) -> Result<Config, ConfigError> {
        let mut config = Config::demo();

        if let Some(addr) = &self.listener.addr {
            config.listener.addr = parse_addr("listener.addr", addr)?;
        }
        config.listener.tls = self.listener.tls.as_ref().map(|tls| TlsFiles {
            cert: tls.cert.clone(),
            key: tls.key.clone(),
        });
        let l = &self.listener;
        let d = config.listener.clone();
        if let Some(n) = l.max_connections {
            if n == 0 {
                return Err(invalid("listener.max_connections", "must be at least 1"));
            }
            config.listener.max_connections = n;
        }
        config.listener.connection_wait = duration_or(
            "listener.connection_wait",
            &l.connection_wait,
            d.connection_wait,
        )?;
        config.listener.handshake_timeout = duration_or(
            "listener.handshake_timeout",
            &l.handshake_timeout,
            d.handshake_timeout,
        )?;
        config.listener.keepalive_timeout = duration_or(
            "listener.keepalive_timeout",
            &l.keepalive_timeout,
            d.keepalive_timeout,
        )?;
        if let Some(text) = &l.idle_timeout {
            config.listener.idle_timeout = parse_optional_duration("listener.idle_timeout", text)?;
        }
        if let Some(text) = &l.keepalive_interval {
            config.listener.keepalive_interval =
                parse_optional_duration("listener.keepalive_interval", text)?;
        }
        if let Some(text) = &l.tcp_keepalive {
            config.listener.tcp_keepalive =
                parse_optional_duration("listener.tcp_keepalive", text)?;
        }
        if let Some(h3) = &l.h3 {
            let window = |key: &str, text: &Option<String>, default: u64| match text {
                Some(text) => {
                    let size = parse_size(text).map_err(|reason| invalid(key, reason))?;
                    // QUIC windows are varints (< 2^62); below 64 KiB bulk cannot flow.
                    if !(64 * 1024..=(1 << 40)).contains(&(size as u64)) {
                        return Err(invalid(key, "must be 64KiB … 1TiB"));
                    }
                    Ok(size as u64)
                }
                None => Ok(default),
            };
            let mut listener = H3Listener::new(parse_addr("listener.h3.addr", &h3.addr)?);
            listener.stream_window = window(
                "listener.h3.stream_window",
                &h3.stream_window,
                listener.stream_window,
            )?;
            listener.connection_window = window(
                "listener.h3.connection_window",
                &h3.connection_window,
                listener.connection_window,
            )?;
            if listener.connection_window < listener.stream_window {
                return Err(invalid(
                    "listener.h3.connection_window",
                    "is smaller than stream_window",
                ));
            }
            if config.listener.tls.is_none() {
                return Err(invalid(
                    "listener.h3",
                    "HTTP/3 needs TLS: set listener.tls = { cert = \"…\", key = \"…\" }",
                ));
            }
            config.listener.h3 = Some(listener);
        }
        if let Some(ucx) = self.listener.ucx {
            let settings = RawUcx {
                tls: ucx.tls,
                net_devices: ucx.net_devices,
                rndv_thresh: ucx.rndv_thresh,
                extra: ucx.extra,
                call_window: ucx.call_window,
                max_fragment: ucx.max_fragment,
                busy_poll: ucx.busy_poll,
            };
            config.listener.ucx = Some(UcxListener {
                addr: parse_addr("listener.ucx.addr", &ucx.addr)?,
                settings: settings.into_settings("listener.ucx")?,
            });
        }
        if let Some(trust) = self.edge.trust_job_header {
            config.edge.trust_job_header = trust;
        }
        if let Some(append) = self.edge.forwarded_for {
            config.edge.forwarded_for = append;
        }
        config.control.link_dir = self.control.link_dir;

        if self.admin.enabled == Some(false) {
            config.admin = None;
        } else if let Some(addr) = &self.admin.addr {
            config.admin = Some(parse_addr("admin.addr", addr)?);
        }

        let transports = match &self.upstream.transports {
            None => Vec::new(),
            Some(_) if self.upstream.url.is_some() => {
                return Err(invalid(
                    "upstream.transports",
                    "give either upstream.url (one transport) or upstream.transports, not both",
                ))
            }
            Some(list) if list.is_empty() => {
                return Err(invalid("upstream.transports", "lists no transport"))
            }
            Some(list) => {
                let mut urls: Vec<url::Url> = Vec::with_capacity(list.len());
                for text in list {
                    let UpstreamTarget::Url(url) = parse_upstream("upstream.transports", text)?
                    else {
                        return Err(invalid(
                            "upstream.transports",
                            "`demo` is one transport; use upstream.url = \"demo\"",
                        ));
                    };
                    let name = transport_name(url.scheme());
                    if urls.iter().any(|u| transport_name(u.scheme()) == name) {
                        return Err(invalid(
                            "upstream.transports",
                            format!(
                                "`{text}`: a second {} transport (one per protocol)",
                                name.unwrap_or("?")
                            ),
                        ));
                    }
                    urls.push(url);
                }
                urls
            }
        };
        let upstream_ucx = self
            .upstream
            .ucx
            .unwrap_or_default()
            .into_settings("upstream.ucx")?;
        config.upstream = Upstream {
            ucx: upstream_ucx,
            target: match (&self.upstream.url, transports.first()) {
                (Some(url), _) => parse_upstream("upstream.url", url)?,
                (None, Some(first)) => UpstreamTarget::Url(first.clone()),
                (None, None) => UpstreamTarget::Demo,
            },
            transports,
            ca: self.upstream.ca,
            connect_timeout: match &self.upstream.connect_timeout {
                Some(text) => parse_duration("upstream.connect_timeout", text)?,
                None => DEFAULT_CONNECT_TIMEOUT,
            },
            connections: match self.upstream.connections {
                Some(0) => return Err(invalid("upstream.connections", "must be at least 1")),
                Some(n) => n,
                None => config.upstream.connections,
            },
            h1_connections: match self.upstream.h1_connections {
                Some(0) => return Err(invalid("upstream.h1_connections", "must be at least 1")),
                Some(n) => n,
                None => config.upstream.h1_connections,
            },
            stream_window: match &self.upstream.stream_window {
                Some(text) => {
                    let size = parse_size(text)
                        .map_err(|reason| invalid("upstream.stream_window", reason))?;
                    u32::try_from(size)
                        .ok()
                        .filter(|w| (65_535..=(1 << 31) - 1).contains(w))
                        .ok_or_else(|| {
                            invalid("upstream.stream_window", "must be 64KiB - 1 … 2GiB - 1")
                        })?
                }
                None => config.upstream.stream_window,
            },
        };

        config.cors = Cors {
            allowed_origins: match self.cors.allowed_origins {
                None => AllowedOrigins::Any,
                Some(list) if list.iter().any(|o| o == "*") => AllowedOrigins::Any,
                Some(list) => {
                    for origin in &list {
                        let valid = url::Url::parse(origin)
                            .map(|u| {
                                u.host().is_some() && u.path() == "/" && !origin.ends_with('/')
                            })
                            .unwrap_or(false);
                        if !valid {
                            return Err(invalid(
                                "cors.allowed_origins",
                                format!("`{origin}` is not an origin like https://app.example.com"),
                            ));
                        }
                    }
                    AllowedOrigins::List(list)
                }
            },
            expose_headers: {
                let names = self.cors.expose_headers.unwrap_or_default();
                if let Some(bad) = names.iter().find(|n| !is_token(n)) {
                    return Err(invalid(
                        "cors.expose_headers",
                        format!("`{bad}` is not a header name"),
                    ));
                }
                names
            },
            max_age: match &self.cors.max_age {
                Some(text) => parse_duration("cors.max_age", text)?,
                None => config.cors.max_age,
            },
            http_headers_param: self
                .cors
                .http_headers_param
                .unwrap_or(config.cors.http_headers_param),
        };

        config.limits = Limits {
            max_message_size: match &self.limits.max_message_size {
                Some(text) => parse_message_size("limits.max_message_size", text)?,
                None => config.limits.max_message_size,
            },
            buffer_budget: match &self.limits.buffer_budget {
                Some(text) => {
                    parse_size(text).map_err(|reason| invalid("limits.buffer_budget", reason))?
                }
                None => config.limits.buffer_budget,
            },
        };

        config.shutdown = Shutdown {
            grace_period: match &self.shutdown.grace_period {
                Some(text) => parse_duration("shutdown.grace_period", text)?,
                None => DEFAULT_GRACE_PERIOD,
            },
        };
        config.resilience = self.resilience.into_resilience()?;
        config.jobs = into_jobs(self.profiles, self.routes)?;
        check_profile_transports(&config)?;
        Ok(config)
    }
}

/// Every transport a profile names must be one the upstream has (when the upstream lists its
/// transports; a single-URL or demo upstream is checked when pnp starts, after `--upstream`).
fn check_profile_transports(config: &Config) -> Result<(), ConfigError> {
    let peer: Vec<&str> = config
        .upstream
        .transports
        .iter()
        .filter_map(|u| transport_name(u.scheme()))
        .collect();
    if peer.is_empty() {
        return Ok(());
    }
    for (name, profile) in &config.jobs.profiles {
        let n = &profile.negotiation;
        let named =
            n.transports
                .iter()
                .flatten()
                .map(String::as_str)
                .chain(n.rules.iter().filter_map(|r| match r {
                    SwitchRule::ThroughputAbove { to, .. } | SwitchRule::SizeAbove { to, .. } => {
                        Some(to.as_str())
                    }
                    SwitchRule::Failures { .. } => None,
                }));
        for transport in named {
            if !peer.contains(&transport) {
                return Err(invalid(
                    &format!("profiles.{name}.negotiation"),
                    format!(
                        "`{transport}` is not among upstream.transports ({})",
                        peer.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// RFC 9110 token characters, which is what a header name may hold.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnp_wire::status::Code;

    #[test]
    fn empty_document_is_the_demo() {
        assert_eq!(
            Config::from_toml("").expect("empty config parses"),
            Config::demo()
        );
    }

    #[test]
    fn full_document() {
        let config = Config::from_toml(
            r#"
            [listener]
            addr = "0.0.0.0:8443"
            tls = { cert = "c.pem", key = "k.pem" }
            [admin]
            addr = "127.0.0.1:9902"
            [upstream]
            url = "https://model.internal:50051"
            ca = "ca.pem"
            connect_timeout = "2s"
            [cors]
            allowed_origins = ["https://app.example.com"]
            expose_headers = ["x-pnp-transport"]
            max_age = "1h"
            [limits]
            max_message_size = "16MiB"
            [shutdown]
            grace_period = "45s"
            "#,
        )
        .expect("config parses");
        assert_eq!(config.listener.addr, "0.0.0.0:8443".parse().expect("addr"));
        assert!(config.listener.tls.is_some());
        assert_eq!(config.admin, Some("127.0.0.1:9902".parse().expect("addr")));
        assert!(
            matches!(config.upstream.target, UpstreamTarget::Url(ref u) if u.scheme() == "https")
        );
        assert_eq!(config.upstream.connect_timeout, Duration::from_secs(2));
        assert_eq!(
            config.cors.allowed_origins,
            AllowedOrigins::List(vec!["https://app.example.com".into()])
        );
        assert_eq!(config.limits.max_message_size, 16 << 20);
        assert_eq!(config.shutdown.grace_period, Duration::from_secs(45));
    }

    /// The design notes' table as operators write it (README's bridging section).
    const NEGOTIATION_TABLE: &str = r#"
        [upstream]
        transports = ["http://cluster:8080", "h3://cluster:8443", "h1://cluster:8081"]

        [profiles.gradient-sync.negotiation]
        transports = ["h2", "h3"]
        rules = [{ throughput_above = "128MB/s", to = "h3" }]

        [profiles.model-load]
        max_message_size = "4294967295"
        [profiles.model-load.negotiation]
        transports = ["h2", "h3"]
        rules = [{ size_above = "4GB", to = "h3" }]

        [profiles.checkpoint.negotiation]
        transports = ["h2", "h3", "h1"]
        rules = [{ failures = 3 }]

        [profiles.browser.negotiation]
        transports = ["h2", "h1"]
        budget = "500ms"

        [[routes]]
        job = "gradients"
        profile = "gradient-sync"
    "#;

    #[test]
    fn a_peer_with_several_transports_and_profiles_that_choose_among_them() {
        let config = Config::from_toml(NEGOTIATION_TABLE).expect("valid");
        let peer: Vec<String> = config
            .upstream
            .peer()
            .iter()
            .map(|u| u.to_string())
            .collect();
        assert_eq!(
            peer,
            [
                "http://cluster:8080/",
                "h3://cluster:8443",
                "h1://cluster:8081"
            ]
        );
        assert!(
            matches!(&config.upstream.target, UpstreamTarget::Url(u) if u.scheme() == "http"),
            "the first transport is the target"
        );
        let jobs = &config.jobs.profiles;
        let sync = &jobs["gradient-sync"].negotiation;
        assert_eq!(
            sync.transports.as_deref(),
            Some(&["h2".to_owned(), "h3".to_owned()][..])
        );
        assert_eq!(
            sync.rules,
            [SwitchRule::ThroughputAbove {
                above: 128_000_000,
                to: "h3".into()
            }]
        );
        assert_eq!(sync.budget, Duration::from_millis(500));
        assert_eq!(sync.hysteresis, 0.2);
        assert_eq!(
            jobs["model-load"].negotiation.rules,
            [SwitchRule::SizeAbove {
                above: 4_000_000_000,
                to: "h3".into()
            }]
        );
        assert_eq!(
            jobs["checkpoint"].negotiation.rules,
            [SwitchRule::Failures { failures: 3 }]
        );
        assert_eq!(jobs[DEFAULT_PROFILE].negotiation, Negotiation::default());
    }

    #[test]
    fn bad_negotiation_settings_name_their_key() {
        let peer = "[upstream]\ntransports = [\"http://c:1\", \"h1://c:2\"]\n";
        for (doc, key, says) in [
            (
                "[upstream]\nurl = \"http://c:1\"\ntransports = [\"h1://c:2\"]".to_owned(),
                "upstream.transports",
                "not both",
            ),
            (
                "[upstream]\ntransports = [\"http://c:1\", \"https://c:2\"]".to_owned(),
                "upstream.transports",
                "a second h2 transport",
            ),
            (
                "[upstream]\ntransports = []".to_owned(),
                "upstream.transports",
                "no transport",
            ),
            (
                format!("{peer}[profiles.p.negotiation]\ntransports = [\"h4\"]"),
                "profiles.p.negotiation.transports",
                "not a transport",
            ),
            (
                format!("{peer}[profiles.p.negotiation]\ntransports = [\"h2\", \"h2\"]"),
                "profiles.p.negotiation.transports",
                "twice",
            ),
            (
                format!("{peer}[profiles.p.negotiation]\ntransports = [\"h2\", \"h3\"]"),
                "profiles.p.negotiation",
                "not among upstream.transports",
            ),
            (
                format!(
                    "{peer}[profiles.p.negotiation]\ntransports = [\"h2\"]\nrules = [{{ size_above = \"1GB\", to = \"h1\" }}]"
                ),
                "profiles.p.negotiation.rules[0].to",
                "not in this profile",
            ),
            (
                format!("{peer}[profiles.p.negotiation]\nrules = [{{ failures = 3, to = \"h1\" }}]"),
                "profiles.p.negotiation.rules[0]",
                "takes no `to`",
            ),
            (
                format!("{peer}[profiles.p.negotiation]\nrules = [{{ throughput_above = \"fast\", to = \"h1\" }}]"),
                "profiles.p.negotiation.rules[0].throughput_above",
                "number",
            ),
            (
                format!("{peer}[profiles.p.negotiation]\nrules = [{{ to = \"h1\" }}]"),
                "profiles.p.negotiation.rules[0]",
                "give one of",
            ),
            (
                format!("{peer}[profiles.p.negotiation]\nhysteresis = 1.5"),
                "profiles.p.negotiation.hysteresis",
                "0.99",
            ),
            (
                format!("{peer}[profiles.p.negotiation]\nbudget = \"0s\""),
                "profiles.p.negotiation.budget",
                "more than 0",
            ),
        ] {
            let err = Config::from_toml(&doc).expect_err(&doc).to_string();
            assert!(err.contains(key) && err.contains(says), "{doc}: {err}");
        }
    }

    #[test]
    fn ucx_listener_upstream_and_tuning() {
        let config = Config::from_toml(
            r#"
            [listener.ucx]
            addr = "0.0.0.0:13337"
            tls = "rc_x,ud_x,sm"
            net_devices = "mlx5_0:1"
            rndv_thresh = "64K"
            extra = { IB_GID_INDEX = "3" }
            [upstream]
            url = "ucx://cluster:13337"
            [upstream.ucx]
            tls = "tcp"
            call_window = "16MiB"
            busy_poll = "50us"
            "#,
        )
        .expect("valid");
        let listener = config.listener.ucx.expect("a UCX listener");
        assert_eq!(listener.addr.port(), 13337);
        assert_eq!(listener.settings.tls.as_deref(), Some("rc_x,ud_x,sm"));
        assert_eq!(
            listener.settings.extra,
            [("IB_GID_INDEX".to_owned(), "3".to_owned())]
        );
        assert_eq!(config.upstream.ucx.call_window, 16 << 20);
        assert_eq!(config.upstream.ucx.busy_poll, Duration::from_micros(50));
        assert_eq!(listener.settings.busy_poll, Duration::ZERO);
        assert!(
            matches!(config.upstream.target, UpstreamTarget::Url(ref u) if u.scheme() == "ucx")
        );
        for (doc, key) in [
            ("[upstream]\nurl = \"ucx://cluster\"", "upstream.url"),
            (
                "[listener.ucx]\naddr = \"0.0.0.0:1\"\ncall_window = \"1KiB\"",
                "listener.ucx.call_window",
            ),
            ("[listener.ucx]\naddr = \"0.0.0.0:1\"\ntsl = \"tcp\"", "tsl"),
            (
                "[upstream.ucx]\nbusy_poll = \"1s\"",
                "upstream.ucx.busy_poll",
            ),
            (
                "[upstream.ucx]\nmax_fragment = \"64MiB\"",
                "upstream.ucx.max_fragment",
            ),
        ] {
            let err = Config::from_toml(doc).expect_err(doc).to_string();
            assert!(err.contains(key), "{doc}: {err}");
        }
    }

    /// Every TOML example in README.md is a config pnp takes as it stands (the negotiation
    /// table, the UCX settings, …): an example that stops parsing fails here.
    #[test]
    fn the_readme_examples_parse() {
        let readme = include_str!("../../../README.md");
        let mut blocks = 0;
        let mut rest = readme;
        while let Some(start) = rest.find("```toml\n") {
            let body = &rest[start + "```toml\n".len()..];
            let end = body.find("```").expect("a closed block");
            let block = &body[..end];
            Config::from_toml(block).unwrap_or_else(|e| panic!("{e}\n{block}"));
            blocks += 1;
            rest = &body[end..];
        }
        assert!(blocks >= 3, "{blocks} TOML examples found");
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml("[listener]\nadress = \"x\"\n").expect_err("typo must fail");
        assert!(err.to_string().contains("adress"), "{err}");
        let err = Config::from_toml("[listner]\n").expect_err("typo must fail");
        assert!(err.to_string().contains("listner"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (doc, key) in [
            ("[listener]\naddr = \"localhost\"", "listener.addr"),
            ("[upstream]\nurl = \"ftp://x\"", "upstream.url"),
            ("[upstream]\nurl = \"http://x:1/path\"", "upstream.url"),
            (
                "[shutdown]\ngrace_period = \"soon\"",
                "shutdown.grace_period",
            ),
            (
                "[limits]\nmax_message_size = \"big\"",
                "limits.max_message_size",
            ),
            (
                "[cors]\nallowed_origins = [\"app.example.com\"]",
                "cors.allowed_origins",
            ),
            (
                "[cors]\nexpose_headers = [\"bad header\"]",
                "cors.expose_headers",
            ),
        ] {
            let err = Config::from_toml(doc).expect_err(doc);
            assert!(err.to_string().contains(key), "{doc}: {err}");
        }
    }

    #[test]
    fn profiles_and_routes() {
        let config = Config::from_toml(
            r#"
            [resilience]
            max_concurrent_streams = 64
            peer_available = true
            [resilience.breaker]
            failure_threshold = 3
            [profiles.llm]
            model_class = "llm"
            sla_tier = "batch"
            idle_timeout = "10s"
            [profiles.classify]
            first_message_timeout = "300ms"
            idle_timeout = "off"
            max_duration = "2s"
            idempotent = true
            [profiles.classify.retry]
            retryable_codes = ["unavailable", "RESOURCE_EXHAUSTED", "4"]
            [[routes]]
            job = "chat"
            profile = "llm"
            [[routes]]
            service = "demo.Classifier"
            profile = "classify"
            "#,
        )
        .expect("parses");
        assert_eq!(config.resilience.max_concurrent_streams, 64);
        assert!(config.resilience.peer_available);
        assert_eq!(config.resilience.breaker_failures, 3);
        let jobs = &config.jobs;
        assert_eq!(
            jobs.profile_for(Some("x.Y"), Some("Z"), Some("chat")),
            "llm"
        );
        assert_eq!(
            jobs.profile_for(Some("demo.Classifier"), Some("Run"), None),
            "classify"
        );
        assert_eq!(
            jobs.profile_for(Some("x.Y"), Some("Z"), None),
            DEFAULT_PROFILE
        );
        let llm = &jobs.profiles["llm"];
        assert_eq!(
            llm.first_message,
            FirstMessage::Class {
                class: "llm".into(),
                tier: "batch".into()
            }
        );
        assert_eq!(llm.idle_timeout, Some(Duration::from_secs(10)));
        assert!(llm.first_message_explicit, "model_class sets the clock");
        assert!(llm.idle_timeout_explicit);
        let classify = &jobs.profiles["classify"];
        assert_eq!(
            classify.first_message,
            FirstMessage::After(Duration::from_millis(300))
        );
        assert_eq!(classify.idle_timeout, None);
        assert!(classify.first_message_explicit && classify.idle_timeout_explicit);
        assert_eq!(classify.max_duration, Some(Duration::from_secs(2)));
        assert!(classify.idempotent);
        assert_eq!(
            classify.retry.retryable_codes,
            [
                Code::Unavailable,
                Code::ResourceExhausted,
                Code::DeadlineExceeded
            ]
        );
        assert!(jobs.profiles.contains_key(DEFAULT_PROFILE));
    }

    #[test]
    fn clocks_left_unset_are_the_defaults_and_not_explicit() {
        let config = Config::from_toml(
            r#"
            [profiles.default]
            idempotent = true
            [profiles.quiet]
            idle_timeout = "30s"
            "#,
        )
        .expect("parses");
        let default = &config.jobs.profiles[DEFAULT_PROFILE];
        assert_eq!(default.first_message, Profile::default().first_message);
        assert_eq!(default.idle_timeout, Profile::default().idle_timeout);
        assert!(!default.first_message_explicit && !default.idle_timeout_explicit);
        // Written out, even at the default value, a clock is the profile's own.
        let quiet = &config.jobs.profiles["quiet"];
        assert!(quiet.idle_timeout_explicit && !quiet.first_message_explicit);
    }

    #[test]
    fn edge_and_cors_switches() {
        let config = Config::from_toml(
            "[edge]\ntrust_job_header = true\nforwarded_for = false\n[cors]\nhttp_headers_param = false",
        )
        .expect("parses");
        assert!(config.edge.trust_job_header);
        assert!(!config.edge.forwarded_for);
        assert!(!config.cors.http_headers_param);
        let defaults = Config::from_toml("").expect("parses");
        assert!(!defaults.edge.trust_job_header);
        assert!(defaults.edge.forwarded_for);
        assert!(defaults.cors.http_headers_param);
        assert_eq!(defaults.cors.allowed_origins, AllowedOrigins::Any);
    }

    #[test]
    fn a_bulk_profile_may_raise_the_message_limit_to_the_frame_limit() {
        let config = Config::from_toml(
            "[profiles.checkpoint]\nmax_message_size = \"4294967295\"\n[[routes]]\njob = \"ckpt\"\nprofile = \"checkpoint\"",
        )
        .expect("valid");
        assert_eq!(
            config.jobs.profiles["checkpoint"].max_message_size,
            Some(u32::MAX as usize)
        );
        assert_eq!(config.jobs.profiles["default"].max_message_size, None);
    }

    #[test]
    fn bad_profiles_name_their_key() {
        for (doc, key) in [
            ("[[routes]]\nprofile = \"nope\"", "routes[0].profile"),
            (
                "[profiles.a]\nfirst_message_timeout = \"1s\"\nmodel_class = \"llm\"",
                "profiles.a.first_message_timeout",
            ),
            (
                "[profiles.a.retry]\nretryable_codes = [\"SOMETIMES\"]",
                "profiles.a.retry.retryable_codes",
            ),
            (
                "[profiles.a.retry]\nmax_attempts = 0",
                "profiles.a.retry.max_attempts",
            ),
            (
                "[profiles.a]\nidle_timeout = \"soon\"",
                "profiles.a.idle_timeout",
            ),
            ("[profiles.a]\nidel_timeout = \"1s\"", "idel_timeout"),
            (
                "[profiles.a]\nmax_message_size = \"4294967296\"",
                "profiles.a.max_message_size",
            ),
            (
                "[limits]\nmax_message_size = \"0\"",
                "limits.max_message_size",
            ),
            (
                "[resilience]\nmax_concurrent_streams = 0",
                "resilience.max_concurrent_streams",
            ),
            (
                "[resilience.keepalive]\ninterval = \"1s\"",
                "resilience.keepalive.interval",
            ),
        ] {
            let err = Config::from_toml(doc).expect_err(doc);
            assert!(err.to_string().contains(key), "{doc}: {err}");
        }
    }

    #[test]
    fn the_readme_profile_example_parses() {
        let readme = include_str!("../../../README.md");
        let section = readme
            .split("## Streaming resilience")
            .nth(1)
            .expect("README has the resilience section");
        let block = section
            .split("```toml")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("the section has a toml block");
        let config = Config::from_toml(block).expect("the README example parses");
        assert_eq!(config.jobs.profile_for(None, None, Some("chat")), "chat");
        assert_eq!(
            config
                .jobs
                .profile_for(Some("demo.Classifier"), Some("Run"), None),
            "classify"
        );
    }

    #[test]
    fn the_shipped_example_parses() {
        let config = Config::from_toml(include_str!("../../../deploy/pnp.example.toml"))
            .expect("deploy/pnp.example.toml parses");
        assert_eq!(config.admin, Some("127.0.0.1:9901".parse().expect("addr")));
        assert_eq!(config.cors.expose_headers, ["x-request-id"]);
        assert!(matches!(config.upstream.target, UpstreamTarget::Url(_)));
        assert_eq!(config.resilience, Resilience::default());
        assert_eq!(config.jobs.profiles[DEFAULT_PROFILE], Profile::default());
        assert_eq!(config.jobs.profile_for(None, None, Some("chat")), "chat");
        assert_eq!(config.edge, Config::demo().edge);
        assert!(config.cors.http_headers_param);
    }

    /// The ConfigMaps of the Kubernetes manifests (deploy/k8s): deploy/check compares their
    /// ports and paths with the pod; here they must parse.
    #[test]
    fn the_kubernetes_configs_parse() {
        for (name, text) in [
            ("base", include_str!("../../../deploy/k8s/base/pnp.toml")),
            (
                "dev",
                include_str!("../../../deploy/k8s/overlays/dev/pnp.toml"),
            ),
            (
                "prod",
                include_str!("../../../deploy/k8s/overlays/prod/pnp.toml"),
            ),
        ] {
            let config =
                Config::from_toml(text).unwrap_or_else(|e| panic!("the {name} pnp.toml: {e}"));
            assert_eq!(config.admin.map(|a| a.port()), Some(9901), "{name}");
            assert_eq!(
                config.control.link_dir.as_deref(),
                Some(std::path::Path::new("/link")),
                "{name}"
            );
            assert_eq!(
                config.shutdown.grace_period,
                Duration::from_secs(30),
                "{name}"
            );
            assert!(config.resilience.peer_available, "{name}");
            if name == "prod" {
                assert!(config.listener.tls.is_some() && config.listener.h3.is_some());
            }
        }
    }

    #[test]
    fn an_h3_listener_with_tls_and_an_h3_upstream() {
        let config = Config::from_toml(
            r#"
            [listener]
            tls = { cert = "server.pem", key = "server-key.pem" }
            h3 = { addr = "127.0.0.1:8443", stream_window = "16MiB" }
            [upstream]
            url = "h3://cluster.internal:8443"
            ca = "ca.pem"
            "#,
        )
        .expect("parses");
        let h3 = config.listener.h3.expect("an h3 listener");
        assert_eq!(h3.addr, "127.0.0.1:8443".parse().expect("addr"));
        assert_eq!(h3.stream_window, 16 << 20);
        assert_eq!(h3.connection_window, crate::DEFAULT_H3_CONNECTION_WINDOW);
        assert!(matches!(config.upstream.target, UpstreamTarget::Url(ref u) if u.scheme() == "h3"));
        assert_eq!(Config::demo().listener.h3, None);
    }

    #[test]
    fn bad_h3_settings_name_their_key() {
        let tls = "tls = { cert = \"c\", key = \"k\" }\n";
        for (doc, key) in [
            (
                "[listener]\nh3 = { addr = \"127.0.0.1:1\" }".to_owned(),
                "listener.h3",
            ),
            (
                format!("[listener]\n{tls}h3 = {{ addr = \"x\" }}"),
                "listener.h3.addr",
            ),
            (
                format!("[listener]\n{tls}h3 = {{ addr = \"127.0.0.1:1\", stream_window = \"1KiB\" }}"),
                "listener.h3.stream_window",
            ),
            (
                format!("[listener]\n{tls}h3 = {{ addr = \"127.0.0.1:1\", connection_window = \"1MiB\" }}"),
                "listener.h3.connection_window",
            ),
            (
                "[upstream]\nurl = \"h3://peer\"".to_owned(),
                "upstream.url",
            ),
        ] {
            let err = Config::from_toml(&doc).expect_err(&doc);
            assert!(err.to_string().contains(key), "{doc}: {err}");
        }
    }

    #[test]
    fn admin_can_be_disabled_and_star_means_any() {
        let config =
            Config::from_toml("[admin]\nenabled = false\n[cors]\nallowed_origins = [\"*\"]")
                .expect("parses");
        assert_eq!(config.admin, None);
        assert_eq!(config.cors.allowed_origins, AllowedOrigins::Any);
    }
}
