//! Retry throttling per upstream: a retry is an extra request to a service that is already
//! failing, so retries as a whole must be bounded, not just per call.
//!
//! Two rules are offered; [`RetryThrottle::default`] is the first.
//!
//! ## Token bucket (gRFC A6 "Throttling Retry Attempts and Hedged RPCs") — the default
//!
//! ```text
//! tokens starts at max_tokens and stays in [0, max_tokens]
//! attempt ends OK                                   → tokens += token_ratio
//! attempt fails with a retryable code, or with a
//! pushback saying do not retry (and was processed)  → tokens −= 1
//! a retry is allowed only while tokens > max_tokens / 2
//! ```
//!
//! Defaults `max_tokens = 10`, `token_ratio = 0.1` (A6's example). Retries stop once more than
//! about `token_ratio / (1 + token_ratio)` ≈ 9 % of attempts fail, and resume by themselves as
//! successes refill the bucket, whatever the request rate. Counting is done in thousandths of
//! a token, as A6 allows `token_ratio` three decimal places, so there is no float drift.
//! Unprocessed failures do not count (A6 "Transparent Retries"): they never reached the
//! application. Non-retryable failures (`INVALID_ARGUMENT`, …) do not count either: they say
//! nothing about the upstream's health.
//!
//! It is the default because it is what gRPC clients do, and because it cuts retries to almost
//! nothing when an upstream is broken, which is when retries hurt most.
//!
//! ## Budget (Finagle / tower `TpsBudget` style)
//!
//! ```text
//! over a sliding window (default 10 s, in 10 slots):
//! a retry is allowed only while retries < max(floor, ratio · requests)
//! ```
//!
//! Defaults `ratio = 0.2`, `floor = 10` per window. `requests` counts calls (first attempts,
//! [`RetryThrottle::on_request`]), `retries` the retries this budget allowed. The floor lets a
//! quiet upstream still get a few retries; it is a floor, not an addition, so under load
//! retries never exceed 20 % of requests. Unlike the bucket it keeps retrying a fraction of
//! calls through a full outage, which suits upstreams with many replicas where a retry lands
//! elsewhere. The window is the current slot and the nine before it, so it covers between
//! 9/10 and all of `window`.
//!
//! [`RetryThrottle::tokens_left`] feeds the "retry budget left" metric.

use std::time::{Duration, Instant};

use pnp_wire::status::Code;

use crate::backoff::Pushback;
use crate::error::{check_nonzero, check_number};
use crate::retry::{AttemptOutcome, GiveUpReason, RetryDecision, RetryPolicy};
use crate::PolicyError;

/// Thousandths of a token.
const MILLI: u64 = 1000;

/// gRFC A6's retry token bucket; see the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    max: u64,
    ratio: u64,
    tokens: u64,
}

impl TokenBucket {
    /// A full bucket. A6 bounds: `max_tokens` in `[1, 1000]`, `token_ratio` in
    /// `[0.001, 1000]`, kept to three decimal places.
    pub fn new(max_tokens: u32, token_ratio: f64) -> Result<Self, PolicyError> {
        if !(1..=1000).contains(&max_tokens) {
            return Err(PolicyError::CountOutOfRange {
                field: "retry_throttle.max_tokens",
                range: "[1, 1000]",
                value: u64::from(max_tokens),
            });
        }
        check_number(
            "retry_throttle.token_ratio",
            "[0.001, 1000]",
            token_ratio,
            0.001,
            false,
            1000.0,
        )?;
        let max = u64::from(max_tokens) * MILLI;
        Ok(Self {
            max,
            // Rounds to three decimals; the range check keeps it in [1, 1_000_000].
            ratio: (token_ratio * MILLI as f64).round() as u64,
            tokens: max,
        })
    }

    /// An attempt succeeded.
    pub fn on_success(&mut self) {
        self.tokens = (self.tokens + self.ratio).min(self.max);
    }

    /// An attempt failed in a way that counts (see the module docs).
    pub fn on_failure(&mut self) {
        self.tokens = self.tokens.saturating_sub(MILLI);
    }

    /// Whether a retry may be sent: `tokens > max_tokens / 2`.
    pub fn allows_retry(&self) -> bool {
        self.tokens * 2 > self.max
    }

    /// Tokens in the bucket.
    pub fn tokens(&self) -> f64 {
        self.tokens as f64 / MILLI as f64
    }
}

impl Default for TokenBucket {
    /// A6's example: 10 tokens, ratio 0.1.
    fn default() -> Self {
        Self {
            max: 10 * MILLI,
            ratio: 100,
            tokens: 10 * MILLI,
        }
    }
}

/// Slots in a [`RetryBudget`] window.
const SLOTS: usize = 10;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Slot {
    epoch: u64,
    requests: u64,
    retries: u64,
}

/// Settings for [`RetryBudget`].
#[derive(Clone, Debug, PartialEq)]
pub struct RetryBudgetConfig {
    /// The sliding window. Default 10 s.
    pub window: Duration,
    /// Retries allowed per request in the window. Default 0.2.
    pub ratio: f64,
    /// Retries allowed per window however few the requests. Default 10.
    pub floor: u32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(10),
            ratio: 0.2,
            floor: 10,
        }
    }
}

/// A retry budget over a sliding window; see the module docs.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryBudget {
    slot_nanos: u128,
    ratio: f64,
    floor: u64,
    origin: Instant,
    current: u64,
    slots: [Slot; SLOTS],
}

impl RetryBudget {
    /// An empty budget whose window starts at `now`. Refused unless `window` is at least
    /// 10 ns and `ratio` is finite and in `[0, 100]`.
    pub fn new(config: RetryBudgetConfig, now: Instant) -> Result<Self, PolicyError> {
        check_nonzero("retry_budget.window", config.window / SLOTS as u32)?;
        check_number(
            "retry_budget.ratio",
            "[0, 100]",
            config.ratio,
            0.0,
            false,
            100.0,
        )?;
        Ok(Self {
            slot_nanos: config.window.as_nanos() / SLOTS as u128,
            ratio: config.ratio,
            floor: u64::from(config.floor),
            origin: now,
            current: 0,
            slots: [Slot::default(); SLOTS],
        })
    }

    /// A call started at `now`.
    pub fn on_request(&mut self, now: Instant) {
        self.slot(now).requests += 1;
    }

    /// Take one retry from the budget at `now` if there is one left.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        self.advance(now);
        if self.remaining() >= 1.0 {
            self.slot(now).retries += 1;
            true
        } else {
            false
        }
    }

    /// Retries left in the window as of the latest time seen: `max(floor, ratio · requests)
    /// − retries`, never negative.
    pub fn remaining(&self) -> f64 {
        let (requests, retries) = self
            .live()
            .fold((0u64, 0u64), |(q, r), s| (q + s.requests, r + s.retries));
        let allowed = (self.ratio * requests as f64).max(self.floor as f64);
        (allowed - retries as f64).max(0.0)
    }

    fn live(&self) -> impl Iterator<Item = &Slot> {
        let current = self.current;
        self.slots
            .iter()
            .filter(move |s| s.epoch <= current && s.epoch + SLOTS as u64 > current)
    }

    /// Move the window to `now`; time never goes back.
    fn advance(&mut self, now: Instant) {
        let idx = now.saturating_duration_since(self.origin).as_nanos() / self.slot_nanos;
        let idx = u64::try_from(idx).unwrap_or(u64::MAX);
        self.current = self.current.max(idx);
    }

    fn slot(&mut self, now: Instant) -> &mut Slot {
        self.advance(now);
        let current = self.current;
        let slot = &mut self.slots[(current % SLOTS as u64) as usize];
        if slot.epoch != current {
            *slot = Slot {
                epoch: current,
                requests: 0,
                retries: 0,
            };
        }
        slot
    }
}

/// The retry throttle of one upstream.
#[derive(Clone, Debug, PartialEq)]
#[allow(
    clippy::large_enum_variant,
    reason = "one per upstream, kept in place behind a lock; boxing only adds a pointer chase"
)]
pub enum RetryThrottle {
    /// gRFC A6's token bucket (the default).
    TokenBucket(TokenBucket),
    /// A ratio of requests over a sliding window.
    Budget(RetryBudget),
}

impl Default for RetryThrottle {
    fn default() -> Self {
        RetryThrottle::TokenBucket(TokenBucket::default())
    }
}

impl RetryThrottle {
    /// A call (its first attempt) started at `now`.
    pub fn on_request(&mut self, now: Instant) {
        if let RetryThrottle::Budget(b) = self {
            b.on_request(now);
        }
    }

    /// An attempt ended; the token bucket counts it as the module docs say.
    pub fn record(&mut self, policy: &RetryPolicy, outcome: &AttemptOutcome) {
        if let RetryThrottle::TokenBucket(bucket) = self {
            if outcome.code == Code::Ok {
                bucket.on_success();
            } else if !outcome.unprocessed
                && (policy.is_retryable(outcome.code) || outcome.pushback == Pushback::DoNotRetry)
            {
                bucket.on_failure();
            }
        }
    }

    /// Let a [`RetryDecision::Retry`] through if the throttle allows it at `now` (the budget
    /// counts it), else turn it into [`GiveUpReason::Throttled`]. Other decisions pass as is.
    pub fn gate(&mut self, decision: RetryDecision, now: Instant) -> RetryDecision {
        let RetryDecision::Retry { .. } = decision else {
            return decision;
        };
        let allowed = match self {
            RetryThrottle::TokenBucket(b) => b.allows_retry(),
            RetryThrottle::Budget(b) => b.try_withdraw(now),
        };
        if allowed {
            decision
        } else {
            RetryDecision::GiveUp(GiveUpReason::Throttled)
        }
    }

    /// For the metric: tokens in the bucket, or retries left in the budget's window.
    pub fn tokens_left(&self) -> f64 {
        match self {
            RetryThrottle::TokenBucket(b) => b.tokens(),
            RetryThrottle::Budget(b) => b.remaining(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::RetryPolicyConfig;

    fn retry() -> RetryDecision {
        RetryDecision::Retry {
            after: Duration::from_millis(1),
        }
    }

    #[test]
    fn bucket_follows_a6() {
        let mut b = TokenBucket::default();
        assert_eq!(b.tokens(), 10.0);
        for _ in 0..4 {
            b.on_failure();
        }
        assert!(b.allows_retry()); // 6 > 5
        b.on_failure();
        assert_eq!(b.tokens(), 5.0);
        assert!(!b.allows_retry()); // 5 is not > 5
        b.on_success();
        assert_eq!(b.tokens(), 5.1);
        assert!(b.allows_retry());
        for _ in 0..100 {
            b.on_success();
        }
        assert_eq!(b.tokens(), 10.0);
        for _ in 0..100 {
            b.on_failure();
        }
        assert_eq!(b.tokens(), 0.0);
    }

    #[test]
    fn bucket_validates_like_a6() {
        assert!(TokenBucket::new(0, 0.1).is_err());
        assert!(TokenBucket::new(1001, 0.1).is_err());
        assert!(TokenBucket::new(10, 0.0).is_err());
        assert!(TokenBucket::new(10, f64::NAN).is_err());
        assert_eq!(TokenBucket::new(10, 0.1), Ok(TokenBucket::default()));
        assert_eq!(TokenBucket::new(1, 0.0015).map(|b| b.ratio), Ok(2));
    }

    #[test]
    fn only_countable_failures_drain_the_bucket() {
        let policy = RetryPolicy::new(RetryPolicyConfig::default()).expect("valid");
        let mut t = RetryThrottle::default();
        let cases = [
            (AttemptOutcome::new(Code::InvalidArgument), 10.0),
            (
                AttemptOutcome {
                    unprocessed: true,
                    ..AttemptOutcome::new(Code::Unavailable)
                },
                10.0,
            ),
            (AttemptOutcome::new(Code::Unavailable), 9.0),
            (
                AttemptOutcome {
                    pushback: Pushback::DoNotRetry,
                    ..AttemptOutcome::new(Code::Internal)
                },
                8.0,
            ),
            (AttemptOutcome::new(Code::Ok), 8.1),
        ];
        for (outcome, tokens) in cases {
            t.record(&policy, &outcome);
            assert_eq!(t.tokens_left(), tokens, "{outcome:?}");
        }
    }

    #[test]
    fn gate_vetoes_only_retries() {
        let now = Instant::now();
        let mut t = RetryThrottle::TokenBucket(TokenBucket::new(2, 0.1).expect("valid"));
        assert_eq!(t.gate(retry(), now), retry());
        if let RetryThrottle::TokenBucket(b) = &mut t {
            b.on_failure();
        }
        assert_eq!(
            t.gate(retry(), now),
            RetryDecision::GiveUp(GiveUpReason::Throttled)
        );
        let other = RetryDecision::GiveUp(GiveUpReason::Committed);
        assert_eq!(t.gate(other, now), other);
    }

    #[test]
    fn budget_allows_floor_then_ratio() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(RetryBudgetConfig::default(), t0).expect("valid");
        // Quiet upstream: the floor.
        let granted = (0..20).filter(|_| b.try_withdraw(t0)).count();
        assert_eq!(granted, 10);
        // 100 requests: 20 % = 20 retries, 10 already spent.
        for _ in 0..100 {
            b.on_request(t0);
        }
        assert_eq!(b.remaining(), 10.0);
        let granted = (0..20).filter(|_| b.try_withdraw(t0)).count();
        assert_eq!(granted, 10);
        assert_eq!(b.remaining(), 0.0);
    }

    #[test]
    fn budget_window_slides() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut b = RetryBudget::new(RetryBudgetConfig::default(), t0).expect("valid");
        for _ in 0..100 {
            b.on_request(t0);
        }
        assert!((0..20).all(|_| b.try_withdraw(t0)));
        assert!(!b.try_withdraw(t0 + s(9)));
        // Slot 0 leaves the window at 10 s; only the floor is left.
        assert!(b.try_withdraw(t0 + s(10)));
        assert_eq!(b.remaining(), 9.0);
        // Time going backwards does not revive old slots.
        b.on_request(t0);
        assert_eq!(b.remaining(), 9.0);
    }

    #[test]
    fn budget_validates() {
        let now = Instant::now();
        let bad = [
            RetryBudgetConfig {
                window: Duration::from_nanos(5),
                ..RetryBudgetConfig::default()
            },
            RetryBudgetConfig {
                ratio: -0.1,
                ..RetryBudgetConfig::default()
            },
            RetryBudgetConfig {
                ratio: f64::INFINITY,
                ..RetryBudgetConfig::default()
            },
        ];
        for config in bad {
            assert!(RetryBudget::new(config.clone(), now).is_err(), "{config:?}");
        }
    }
}
