//! Whether to retry a failed attempt, and after how long (gRFC A6 "Retry Policy").
//!
//! The retry layer calls [`RetryPolicy::decide`] each time an attempt ends. The answer is
//! [`RetryDecision::Retry`] with the delay before the next attempt, or
//! [`RetryDecision::GiveUp`] with the reason, checked in this order (first match wins):
//!
//! ```text
//!  1. status OK                                  → GiveUp(Succeeded)
//!  2. committed: a response header or message
//!     already reached the client (A6 "When
//!     Retries are Valid")                        → GiveUp(Committed)
//!  3. the request outgrew the replay buffer
//!     (default 64 KiB, A6 "Memory Management")   → GiveUp(ReplayBufferOverflowed)
//!  4. pushback says do not retry (A6 "Pushback") → GiveUp(ServerPushback)
//!  5. attempts so far ≥ max_attempts             → GiveUp(AttemptsExhausted)
//!  6. unless unprocessed (the request provably
//!     never reached the upstream application):
//!       method not idempotent                    → GiveUp(NotIdempotent)
//!       code not in retryable_codes              → GiveUp(NotRetryable(code))
//!  7. delay = pushback delay if the server gave one (and the back-off restarts from its
//!     first step afterwards, A6 summary case 5), else Backoff::delay(step) with full jitter
//!  8. delay ≥ time left before the deadline      → GiveUp(DeadlineTooClose)
//!  9.                                            → Retry { after: delay }
//! ```
//!
//! Retry throttling (A6 "Throttling Retry Attempts") is a separate, per-upstream object:
//! [`crate::throttle::RetryThrottle`], applied after this decision (or all at once with
//! [`RetryPolicy::decide_throttled`]).
//!
//! Deviations from A6, on purpose, because pnp is a proxy and must bound its own work:
//! - *Transparent retries* of unprocessed failures (connect refused, `REFUSED_STREAM`, GOAWAY
//!   above the last stream id) ignore the method's idempotency and the status code, as in A6,
//!   but unlike A6 they count toward `max_attempts`, wait for the back-off and pass the
//!   throttle. They are not counted as throttle failures (as in A6).
//! - A pushback delay does not make a non-retryable code retryable (as in gRPC Java).
//! - `max_attempts` above 5 is treated as 5 (A6 "Limits on Retries and Hedges").

use std::time::Duration;

use pnp_wire::status::Code;
use rand::Rng;

use crate::backoff::{Backoff, Pushback};
use crate::error::PolicyError;
use crate::throttle::RetryThrottle;

/// The client-side ceiling on `max_attempts` (gRFC A6: larger values are treated as 5).
pub const MAX_ATTEMPTS_LIMIT: u32 = 5;

/// Default replay-buffer size per call: a request larger than this cannot be replayed.
pub const DEFAULT_REPLAY_BUFFER: usize = 64 * 1024;

/// Settings for [`RetryPolicy`], named as in gRFC A6's `retryPolicy`.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicyConfig {
    /// Attempts including the original, at least 2; above 5 counts as 5. Default 3.
    pub max_attempts: u32,
    /// Ceiling of the first retry's random delay. Default 100 ms.
    pub initial_backoff: Duration,
    /// Largest ceiling of any retry's delay. Default 1 s.
    pub max_backoff: Duration,
    /// Growth of the ceiling per retry. Default 2.
    pub backoff_multiplier: f64,
    /// Status codes worth retrying for idempotent methods. Default `[UNAVAILABLE]`.
    pub retryable_codes: Vec<Code>,
    /// Bytes of request the retry layer keeps to replay. Default 64 KiB.
    pub replay_buffer_limit: usize,
}

impl Default for RetryPolicyConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            backoff_multiplier: 2.0,
            retryable_codes: vec![Code::Unavailable],
            replay_buffer_limit: DEFAULT_REPLAY_BUFFER,
        }
    }
}

/// A validated gRFC A6 retry policy; see the module docs.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    max_attempts: u32,
    backoff: Backoff,
    /// Bit `c` set when code `c` is retryable.
    retryable: u32,
    replay_buffer_limit: usize,
}

impl RetryPolicy {
    /// Validate the settings (A6: `maxAttempts` ≥ 2, positive back-offs and multiplier, a
    /// non-empty code list; OK is not a failure).
    pub fn new(config: RetryPolicyConfig) -> Result<Self, PolicyError> {
        if config.max_attempts < 2 {
            return Err(PolicyError::CountOutOfRange {
                field: "retry.max_attempts",
                range: "[2, ∞)",
                value: u64::from(config.max_attempts),
            });
        }
        let backoff = Backoff::new(
            config.initial_backoff,
            config.max_backoff,
            config.backoff_multiplier,
        )?;
        if config.retryable_codes.is_empty() {
            return Err(PolicyError::NoRetryableCodes);
        }
        if config.retryable_codes.contains(&Code::Ok) {
            return Err(PolicyError::OkIsRetryable);
        }
        let retryable = config
            .retryable_codes
            .iter()
            .fold(0u32, |bits, c| bits | (1 << c.as_i32()));
        Ok(Self {
            max_attempts: config.max_attempts.min(MAX_ATTEMPTS_LIMIT),
            backoff,
            retryable,
            replay_buffer_limit: config.replay_buffer_limit,
        })
    }

    /// Attempts allowed, the original included (after the A6 ceiling).
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Whether `code` is in the retryable set.
    pub fn is_retryable(&self, code: Code) -> bool {
        self.retryable & (1 << code.as_i32()) != 0
    }

    /// Bytes of request to keep for replay; past this, the call can no longer be retried.
    pub fn replay_buffer_limit(&self) -> usize {
        self.replay_buffer_limit
    }

    /// The back-off between attempts.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// Decide what to do after an attempt ended with `outcome`; see the module docs for the
    /// order of the rules. `state` is the call's retry history: every call counts one more
    /// attempt; the back-off step moves only on [`RetryDecision::Retry`].
    pub fn decide<R: Rng + ?Sized>(
        &self,
        state: &mut RetryState,
        outcome: &AttemptOutcome,
        rng: &mut R,
    ) -> RetryDecision {
        state.attempts = state.attempts.saturating_add(1);
        match self.judge(state, outcome, rng) {
            Ok((after, next_step)) => {
                state.backoff_step = next_step;
                RetryDecision::Retry { after }
            }
            Err(reason) => RetryDecision::GiveUp(reason),
        }
    }

    /// Rules 1–8 of the module docs: the delay and the next back-off step, or why not.
    fn judge<R: Rng + ?Sized>(
        &self,
        state: &RetryState,
        outcome: &AttemptOutcome,
        rng: &mut R,
    ) -> Result<(Duration, u32), GiveUpReason> {
        if outcome.code == Code::Ok {
            return Err(GiveUpReason::Succeeded);
        }
        if outcome.committed {
            return Err(GiveUpReason::Committed);
        }
        if outcome.replay_overflowed {
            return Err(GiveUpReason::ReplayBufferOverflowed);
        }
        if outcome.pushback == Pushback::DoNotRetry {
            return Err(GiveUpReason::ServerPushback);
        }
        if state.attempts >= self.max_attempts {
            return Err(GiveUpReason::AttemptsExhausted);
        }
        if !outcome.unprocessed {
            if !outcome.idempotent {
                return Err(GiveUpReason::NotIdempotent);
            }
            if !self.is_retryable(outcome.code) {
                return Err(GiveUpReason::NotRetryable(outcome.code));
            }
        }
        let (after, next_step) = match outcome.pushback {
            Pushback::RetryAfter(d) => (d, 0),
            _ => (
                self.backoff.delay(state.backoff_step, rng),
                state.backoff_step.saturating_add(1),
            ),
        };
        if outcome.time_left.is_some_and(|left| after >= left) {
            return Err(GiveUpReason::DeadlineTooClose);
        }
        Ok((after, next_step))
    }

    /// [`decide`](RetryPolicy::decide) with the upstream's throttle: record the outcome in
    /// the throttle, decide, then let the throttle veto a retry. Call
    /// [`RetryThrottle::on_request`] once when the call starts.
    pub fn decide_throttled<R: Rng + ?Sized>(
        &self,
        state: &mut RetryState,
        outcome: &AttemptOutcome,
        throttle: &mut RetryThrottle,
        now: std::time::Instant,
        rng: &mut R,
    ) -> RetryDecision {
        throttle.record(self, outcome);
        let decision = self.decide(state, outcome, rng);
        throttle.gate(decision, now)
    }
}

/// The retry history of one call: attempts made and the back-off step reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryState {
    attempts: u32,
    backoff_step: u32,
}

impl RetryState {
    /// A call whose first attempt has not ended yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Attempts that have ended. Before sending the next attempt, this is the value of
    /// `grpc-previous-rpc-attempts` (A6 "Exposed Retry Metadata").
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

/// How an attempt ended, as the retry layer saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttemptOutcome {
    /// Its final status code.
    pub code: Code,
    /// Response headers or a message already went to the client.
    pub committed: bool,
    /// The method is declared idempotent (safe to run twice).
    pub idempotent: bool,
    /// The request provably never reached the upstream application (connect refused,
    /// `REFUSED_STREAM`, GOAWAY above its stream id): `pnp_transport::TransportError::unprocessed`.
    pub unprocessed: bool,
    /// The request grew past the replay buffer, so it cannot be sent again.
    pub replay_overflowed: bool,
    /// The server's `grpc-retry-pushback-ms`.
    pub pushback: Pushback,
    /// Time left before the call's deadline, if it has one.
    pub time_left: Option<Duration>,
}

impl AttemptOutcome {
    /// An attempt that ended with `code`: not committed, not idempotent, processed, within
    /// the buffer, no pushback, no deadline. Set the fields that differ.
    pub fn new(code: Code) -> Self {
        Self {
            code,
            committed: false,
            idempotent: false,
            unprocessed: false,
            replay_overflowed: false,
            pushback: Pushback::Absent,
            time_left: None,
        }
    }
}

/// What to do after an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum RetryDecision {
    /// Send the request again after this delay.
    Retry {
        /// The delay.
        after: Duration,
    },
    /// Stop; the attempt's status is the call's status.
    GiveUp(GiveUpReason),
}

/// Why a call is not retried (a label for the retries metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GiveUpReason {
    /// The attempt succeeded; nothing to retry.
    Succeeded,
    /// Something already reached the client.
    Committed,
    /// The request outgrew the replay buffer.
    ReplayBufferOverflowed,
    /// The server said not to retry (negative or malformed pushback).
    ServerPushback,
    /// `max_attempts` reached.
    AttemptsExhausted,
    /// The method is not idempotent and the request may have been processed.
    NotIdempotent,
    /// The status code is not in the retryable set.
    NotRetryable(Code),
    /// The retry would start at or after the deadline.
    DeadlineTooClose,
    /// The upstream's retry throttle or budget is spent.
    Throttled,
}

impl GiveUpReason {
    /// A short snake-case label, e.g. `"not_idempotent"`.
    pub fn as_str(self) -> &'static str {
        match self {
            GiveUpReason::Succeeded => "succeeded",
            GiveUpReason::Committed => "committed",
            GiveUpReason::ReplayBufferOverflowed => "replay_buffer_overflowed",
            GiveUpReason::ServerPushback => "server_pushback",
            GiveUpReason::AttemptsExhausted => "attempts_exhausted",
            GiveUpReason::NotIdempotent => "not_idempotent",
            GiveUpReason::NotRetryable(_) => "not_retryable",
            GiveUpReason::DeadlineTooClose => "deadline_too_close",
            GiveUpReason::Throttled => "throttled",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn policy() -> RetryPolicy {
        RetryPolicy::new(RetryPolicyConfig::default()).expect("defaults are valid")
    }

    fn idempotent(code: Code) -> AttemptOutcome {
        AttemptOutcome {
            idempotent: true,
            ..AttemptOutcome::new(code)
        }
    }

    fn decide_once(outcome: AttemptOutcome) -> RetryDecision {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        policy().decide(&mut RetryState::new(), &outcome, &mut rng)
    }

    #[test]
    fn decision_table() {
        use GiveUpReason::*;
        let unavailable = idempotent(Code::Unavailable);
        let give_up = |outcome, reason| (outcome, Some(reason));
        let retry = |outcome| (outcome, None);
        let cases = [
            give_up(idempotent(Code::Ok), Succeeded),
            retry(unavailable),
            give_up(idempotent(Code::Internal), NotRetryable(Code::Internal)),
            give_up(AttemptOutcome::new(Code::Unavailable), NotIdempotent),
            // Unprocessed: safe even for a non-idempotent method and a non-retryable code.
            retry(AttemptOutcome {
                unprocessed: true,
                ..AttemptOutcome::new(Code::Internal)
            }),
            give_up(
                AttemptOutcome {
                    committed: true,
                    unprocessed: true,
                    ..unavailable
                },
                Committed,
            ),
            give_up(
                AttemptOutcome {
                    replay_overflowed: true,
                    unprocessed: true,
                    ..unavailable
                },
                ReplayBufferOverflowed,
            ),
            give_up(
                AttemptOutcome {
                    pushback: Pushback::DoNotRetry,
                    ..unavailable
                },
                ServerPushback,
            ),
            // Pushback does not make a fatal code retryable.
            give_up(
                AttemptOutcome {
                    pushback: Pushback::RetryAfter(ms(10)),
                    ..idempotent(Code::InvalidArgument)
                },
                NotRetryable(Code::InvalidArgument),
            ),
            give_up(
                AttemptOutcome {
                    time_left: Some(Duration::ZERO),
                    ..unavailable
                },
                DeadlineTooClose,
            ),
            give_up(
                AttemptOutcome {
                    pushback: Pushback::RetryAfter(ms(500)),
                    time_left: Some(ms(400)),
                    ..unavailable
                },
                DeadlineTooClose,
            ),
        ];
        for (outcome, want) in cases {
            let got = decide_once(outcome);
            match want {
                Some(reason) => assert_eq!(got, RetryDecision::GiveUp(reason), "{outcome:?}"),
                None => assert!(
                    matches!(got, RetryDecision::Retry { .. }),
                    "{outcome:?}: {got:?}"
                ),
            }
        }
    }

    #[test]
    fn respects_max_attempts_and_counts_them() {
        let p = policy();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut state = RetryState::new();
        let o = idempotent(Code::Unavailable);
        assert!(matches!(
            p.decide(&mut state, &o, &mut rng),
            RetryDecision::Retry { .. }
        ));
        assert_eq!(state.attempts(), 1);
        assert!(matches!(
            p.decide(&mut state, &o, &mut rng),
            RetryDecision::Retry { .. }
        ));
        assert_eq!(state.attempts(), 2);
        assert_eq!(
            p.decide(&mut state, &o, &mut rng),
            RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted)
        );
        assert_eq!(state.attempts(), 3);
    }

    #[test]
    fn backoff_grows_and_pushback_resets_it() {
        let p = RetryPolicy::new(RetryPolicyConfig {
            max_attempts: 5,
            initial_backoff: ms(100),
            max_backoff: ms(10_000),
            ..RetryPolicyConfig::default()
        })
        .expect("valid");
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut state = RetryState::new();
        let o = idempotent(Code::Unavailable);
        let RetryDecision::Retry { after } = p.decide(&mut state, &o, &mut rng) else {
            panic!("retry expected")
        };
        assert!(after <= ms(100));
        let RetryDecision::Retry { after } = p.decide(&mut state, &o, &mut rng) else {
            panic!("retry expected")
        };
        assert!(after <= ms(200));
        let pushed = AttemptOutcome {
            pushback: Pushback::RetryAfter(ms(750)),
            ..o
        };
        assert_eq!(
            p.decide(&mut state, &pushed, &mut rng),
            RetryDecision::Retry { after: ms(750) }
        );
        // Back to the first step after a pushback (A6 summary, case 5).
        assert_eq!(state.backoff_step, 0);
        let RetryDecision::Retry { after } = p.decide(&mut state, &o, &mut rng) else {
            panic!("retry expected")
        };
        assert!(after <= ms(100));
        // Pushback cannot extend max_attempts.
        assert_eq!(
            p.decide(&mut state, &pushed, &mut rng),
            RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted)
        );
    }

    #[test]
    fn validates_like_a6() {
        let bad = [
            RetryPolicyConfig {
                max_attempts: 1,
                ..RetryPolicyConfig::default()
            },
            RetryPolicyConfig {
                initial_backoff: Duration::ZERO,
                ..RetryPolicyConfig::default()
            },
            RetryPolicyConfig {
                max_backoff: Duration::ZERO,
                ..RetryPolicyConfig::default()
            },
            RetryPolicyConfig {
                backoff_multiplier: 0.0,
                ..RetryPolicyConfig::default()
            },
            RetryPolicyConfig {
                retryable_codes: vec![],
                ..RetryPolicyConfig::default()
            },
            RetryPolicyConfig {
                retryable_codes: vec![Code::Ok],
                ..RetryPolicyConfig::default()
            },
        ];
        for config in bad {
            assert!(RetryPolicy::new(config.clone()).is_err(), "{config:?}");
        }
        let capped = RetryPolicy::new(RetryPolicyConfig {
            max_attempts: 50,
            retryable_codes: vec![Code::Unavailable, Code::Unauthenticated],
            ..RetryPolicyConfig::default()
        })
        .expect("valid");
        assert_eq!(capped.max_attempts(), 5);
        assert!(capped.is_retryable(Code::Unauthenticated));
        assert!(!capped.is_retryable(Code::Internal));
        assert_eq!(policy().replay_buffer_limit(), 64 * 1024);
    }

    fn arb_code() -> impl Strategy<Value = Code> {
        (0usize..17).prop_map(|i| Code::ALL[i])
    }

    proptest! {
        /// The safety rules hold for every combination of inputs and history.
        #[test]
        fn never_retries_what_it_must_not(
            code in arb_code(),
            committed: bool, idempotent: bool, unprocessed: bool, overflowed: bool,
            pushback in prop_oneof![
                Just(Pushback::Absent),
                Just(Pushback::DoNotRetry),
                (0u64..5_000).prop_map(|m| Pushback::RetryAfter(Duration::from_millis(m))),
            ],
            time_left in proptest::option::of(0u64..5_000),
            prior in 0u32..8,
            seed: u64,
        ) {
            let p = policy();
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut state = RetryState { attempts: prior, backoff_step: prior };
            let outcome = AttemptOutcome {
                code, committed, idempotent, unprocessed,
                replay_overflowed: overflowed,
                pushback,
                time_left: time_left.map(Duration::from_millis),
            };
            let decision = p.decide(&mut state, &outcome, &mut rng);
            prop_assert_eq!(state.attempts(), prior + 1);
            if let RetryDecision::Retry { after } = decision {
                prop_assert!(code != Code::Ok);
                prop_assert!(!committed && !overflowed);
                prop_assert!(pushback != Pushback::DoNotRetry);
                prop_assert!(prior + 1 < p.max_attempts());
                prop_assert!(unprocessed || (idempotent && p.is_retryable(code)));
                prop_assert!(outcome.time_left.is_none_or(|left| after < left));
                prop_assert!(after <= Duration::from_secs(5));
            }
        }
    }
}
