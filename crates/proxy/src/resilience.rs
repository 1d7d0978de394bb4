//! The guarded upstream: circuit breaker and retries (gRFC A6) around an egress transport.
//!
//! Retries happen only before the call is committed: this runs until the transport hands back a
//! streaming reply, and a streaming reply is returned at once (its headers go to the client), so
//! nothing is ever retried after a response header or message reached the client. A retry needs
//! the profile's permission (idempotent method and a retryable status, or a failure that provably
//! never reached the upstream), attempts left, time left, a replay buffer that held the whole
//! request, and the per-upstream throttle's consent. Each retry carries
//! `grpc-previous-rpc-attempts` and the time left as `grpc-timeout`.

use std::sync::Mutex;
use std::time::Instant;

use http::HeaderValue;
use pnp_call::{BoxMessageStream, Call, CallHead, Code, Reply, Status};
use pnp_config::Resilience;
use pnp_policy::backoff::Pushback;
use pnp_policy::breaker::{Admission as BreakerAdmission, Breaker, BreakerConfig, BreakerState};
use pnp_policy::retry::{AttemptOutcome, RetryDecision, RetryState};
use pnp_policy::throttle::{RetryThrottle, TokenBucket};
use pnp_telemetry::Metrics;
use pnp_transport::{Blame, TransportError};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tower::ServiceExt;

use crate::abort::CallAbort;
use crate::ingress::Transport;
use crate::profiles::CallPolicy;
use crate::replay::Replay;

/// One upstream with its breaker and retry throttle.
pub(crate) struct GuardedUpstream {
    transport: Transport,
    name: String,
    breaker: Mutex<Breaker>,
    throttle: Mutex<RetryThrottle>,
    rng: Mutex<ChaCha8Rng>,
    metrics: Metrics,
}

impl std::fmt::Debug for GuardedUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedUpstream")
            .field("name", &self.name)
            .finish()
    }
}

impl GuardedUpstream {
    pub(crate) fn new(
        transport: Transport,
        name: String,
        config: &Resilience,
        metrics: Metrics,
    ) -> Result<Self, String> {
        let seed: u64 = rand::random();
        let breaker = Breaker::new(
            BreakerConfig {
                failure_threshold: config.breaker_failures,
                base_penalty: config.breaker_base_penalty,
                max_penalty: config.breaker_max_penalty,
                ..BreakerConfig::default()
            },
            seed,
        )
        .map_err(|e| format!("resilience.breaker: {e}"))?;
        let bucket = TokenBucket::new(config.retry_max_tokens, config.retry_token_ratio)
            .map_err(|e| format!("resilience.retry_throttle: {e}"))?;
        metrics.set_breaker_state(&name, 0);
        metrics.set_retry_tokens(bucket.tokens());
        Ok(Self {
            transport,
            name,
            breaker: Mutex::new(breaker),
            throttle: Mutex::new(RetryThrottle::TokenBucket(bucket)),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed.rotate_left(17))),
            metrics,
        })
    }

    /// Send a call, retrying as its policy allows, until a reply or a final failure.
    pub(crate) async fn call(
        &self,
        head: CallHead,
        messages: BoxMessageStream,
        policy: &CallPolicy,
        deadline: Option<Instant>,
        job: Option<&str>,
        abort: CallAbort,
    ) -> Result<Reply, TransportError> {
        if let (Some(_), Ok(mut throttle)) = (&policy.retry, self.throttle.lock()) {
            throttle.on_request(Instant::now());
        }
        // Without a retry policy the messages go to the one attempt as they are.
        let (replay, mut single) = match &policy.retry {
            Some(retry) => (
                Some(Replay::new(messages, retry.replay_buffer_limit())),
                None,
            ),
            None => (None, Some(messages)),
        };
        let mut state = RetryState::new();
        loop {
            self.admit()?;
            let mut attempt = head.clone();
            if state.attempts() > 0 {
                attempt.metadata.insert(
                    "grpc-previous-rpc-attempts",
                    HeaderValue::from(state.attempts()),
                );
            }
            if let Some(at) = deadline {
                attempt.timeout = Some(at.saturating_duration_since(Instant::now()));
            }
            let messages = match (&replay, single.take()) {
                (Some(replay), _) => replay.reader(),
                (None, Some(messages)) => messages,
                (None, None) => {
                    return Err(TransportError {
                        status: Box::new(Status::new(
                            Code::Internal,
                            "pnp: request messages already consumed",
                        )),
                        blame: Blame::Proxy,
                        unprocessed: false,
                    })
                }
            };
            let result = self
                .transport
                .clone()
                .oneshot(Call {
                    head: attempt,
                    messages,
                })
                .await;

            if abort.status().is_some() {
                // The client's side failed (bad input, gone): not the upstream's fault, and
                // nothing to retry.
                return result;
            }
            let now = Instant::now();
            let (code, unprocessed, pushback, upstream_failed) = match &result {
                Ok(Reply::Stream { .. }) => (Code::Ok, false, Pushback::Absent, false),
                Ok(Reply::TrailersOnly(status)) => (
                    status.code,
                    false,
                    Pushback::from_values(
                        status
                            .metadata
                            .get_all("grpc-retry-pushback-ms")
                            .iter()
                            .map(HeaderValue::as_bytes),
                    ),
                    // An upstream that answers at all is up; UNAVAILABLE is its way to say not.
                    status.code == Code::Unavailable,
                ),
                Err(e) => (
                    e.status.code,
                    e.unprocessed,
                    Pushback::Absent,
                    e.blame == Blame::Upstream,
                ),
            };
            self.report(now, upstream_failed);

            let Some(retry) = &policy.retry else {
                return result;
            };
            let outcome = AttemptOutcome {
                code,
                committed: false,
                idempotent: policy.idempotent,
                unprocessed,
                replay_overflowed: replay.as_ref().is_some_and(Replay::overflowed),
                pushback,
                time_left: deadline.map(|at| at.saturating_duration_since(now)),
            };
            let decision = match (self.throttle.lock(), self.rng.lock()) {
                (Ok(mut throttle), Ok(mut rng)) => {
                    let decision =
                        retry.decide_throttled(&mut state, &outcome, &mut throttle, now, &mut *rng);
                    self.metrics.set_retry_tokens(throttle.tokens_left());
                    decision
                }
                _ => return result,
            };
            match decision {
                RetryDecision::GiveUp(reason) => {
                    if code != Code::Ok {
                        tracing::debug!(
                            attempts = state.attempts(),
                            reason = reason.as_str(),
                            "not retrying"
                        );
                    }
                    return result;
                }
                RetryDecision::Retry { after } => {
                    let reason = if unprocessed {
                        "unprocessed"
                    } else {
                        code_label(code)
                    };
                    self.metrics.retry(head.path.path(), job, reason);
                    tracing::debug!(attempt = state.attempts() + 1, ?after, reason, "retrying");
                    tokio::time::sleep(after).await;
                }
            }
        }
    }

    /// Ask the breaker; an open circuit fails the call fast, before any I/O.
    fn admit(&self) -> Result<(), TransportError> {
        let Ok(mut breaker) = self.breaker.lock() else {
            return Ok(());
        };
        let admission = breaker.allow(Instant::now());
        self.metrics
            .set_breaker_state(&self.name, state_value(breaker.state()));
        match admission {
            BreakerAdmission::Allowed | BreakerAdmission::Probe => Ok(()),
            BreakerAdmission::Rejected { retry_after } => Err(TransportError {
                status: Box::new(Status::new(
                    Code::Unavailable,
                    format!(
                        "pnp: circuit open for upstream {} after repeated failures; next probe in {} ms",
                        self.name,
                        retry_after.as_millis()
                    ),
                )),
                blame: Blame::Proxy,
                unprocessed: true,
            }),
        }
    }

    fn report(&self, now: Instant, failed: bool) {
        let Ok(mut breaker) = self.breaker.lock() else {
            return;
        };
        let transition = if failed {
            breaker.on_failure(now)
        } else {
            breaker.on_success(now)
        };
        if let Some(transition) = transition {
            tracing::warn!(upstream = %self.name, ?transition, "circuit breaker");
        }
        self.metrics
            .set_breaker_state(&self.name, state_value(breaker.state()));
    }
}

fn state_value(state: BreakerState) -> i64 {
    match state {
        BreakerState::Closed { .. } => 0,
        BreakerState::HalfOpen { .. } => 1,
        BreakerState::Open { .. } => 2,
    }
}

/// Lower-case code names as label values.
fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}
