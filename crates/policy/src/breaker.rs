//! Circuit breaker per upstream: stop sending calls to an upstream that keeps failing, probe it
//! now and then, and resume when a probe succeeds.
//!
//! ```text
//!            failure (count < threshold)
//!            success (count := 0)
//!              ┌──────┐
//!              ▼      │
//!         ┌──────────┐   threshold consecutive failures    ┌─────────────────────────┐
//!    ────►│  Closed  │────────────────────────────────────►│ Open { until }          │
//!         └──────────┘                                     │ reopens := 1            │
//!              ▲                                           └─────────────────────────┘
//!              │ probe succeeds                                 │ allow(now ≥ until):
//!              │ (reopens := 0)                                 │ this caller is the probe
//!              │                                                ▼
//!         ┌──────────────────────────┐  probe fails        ┌─────────────────────────┐
//!         │ HalfOpen { probe_since } │────────────────────►│ Open { until }          │
//!         │ one probe in flight;     │                     │ reopens += 1            │
//!         │ everyone else Rejected   │◄────────────────────└─────────────────────────┘
//!         └──────────────────────────┘   allow(now ≥ until)
//! ```
//!
//! The open period grows on each consecutive re-open and is jittered so that many pnp
//! instances watching the same upstream do not probe it in lockstep:
//!
//! ```text
//! penalty(k) = min(max_penalty, base_penalty · 2^(k−1))      k = reopens, 1 on the first open
//! open for   = penalty(k) · (1 − jitter · u)                  u uniform in [0, 1), jitter default 0.2
//! ```
//!
//! While half-open exactly one caller gets [`Admission::Probe`]; the rest get
//! [`Admission::Rejected`] until the probe reports back. Success and failure are reported with
//! [`Breaker::on_success`] and [`Breaker::on_failure`]; in `Open` they are ignored (they belong
//! to calls admitted before it opened), in `HalfOpen` the first one settles the probe.
//!
//! A probe can also end without telling anything about the upstream: its caller went away, or
//! the call was ended for a reason of the caller's own. The layer reports that with
//! [`Breaker::on_probe_abandoned`], naming the probe by the [`ProbeId`] that [`Breaker::probe`]
//! gave it; the breaker goes back to `Open` with its penalty already served, so the next
//! caller becomes the probe at once (the penalty does not grow: nothing failed). A probe whose
//! outcome never arrives at all (a layer that lost it) is presumed lost after `probe_timeout`,
//! and the next caller becomes the probe.
//!
//! ```text
//!   HalfOpen ── on_probe_abandoned(that probe) ──► Open { until: now } ── allow ──► Probe
//! ```
//!
//! The breaker is a plain value: the layer keeps one per upstream behind a mutex, which is what
//! makes "exactly one probe" hold across tasks. What counts as a failure is the layer's choice;
//! it should be the upstream's fault (`UNAVAILABLE`, connect errors, resets, a stream cut after
//! its headers), not the client's (`INVALID_ARGUMENT`, `CANCELLED`). For long streams settle
//! the probe at the first response message rather than at the end of the stream, so a probe
//! does not hold the breaker half-open for the whole stream; report the stream's end as well,
//! as the outcome of an ordinary call.

use std::time::{Duration, Instant};

use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::duration_math::scale;
use crate::error::check_nonzero;
use crate::PolicyError;

/// Settings for [`Breaker`].
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker. Default 5.
    pub failure_threshold: u32,
    /// Open period of the first opening. Default 1 s.
    pub base_penalty: Duration,
    /// Longest open period. Default 60 s.
    pub max_penalty: Duration,
    /// Fraction of the penalty that may be shaved off at random, in `[0, 1)`. Default 0.2.
    pub jitter: f64,
    /// How long a probe may stay unanswered before another caller probes. Default 10 s.
    pub probe_timeout: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            base_penalty: Duration::from_secs(1),
            max_penalty: Duration::from_secs(60),
            jitter: 0.2,
            probe_timeout: Duration::from_secs(10),
        }
    }
}

/// Whether a call may go to the upstream now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Admission {
    /// Closed: send it.
    Allowed,
    /// Half-open and this call is the one probe: send it and report its outcome.
    Probe,
    /// Open, or half-open with a probe in flight: fail fast (`UNAVAILABLE`, with
    /// `retry_after` as pushback if the call may go elsewhere).
    Rejected {
        /// When asking again may give another answer.
        retry_after: Duration,
    },
}

/// The breaker's state, for metrics and the control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow; `failures` consecutive failures so far.
    Closed {
        /// Consecutive failures.
        failures: u32,
    },
    /// Calls are rejected until `until`.
    Open {
        /// End of the open period.
        until: Instant,
    },
    /// One probe is in flight.
    HalfOpen {
        /// When the probe was admitted.
        probe_since: Instant,
    },
}

/// A state change worth an event (`breaker opened`, `breaker closed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The breaker opened (or re-opened) for `penalty`.
    Opened {
        /// The jittered open period.
        penalty: Duration,
        /// Consecutive openings, 1 for the first.
        reopens: u32,
    },
    /// A probe succeeded; calls flow again.
    Closed,
}

/// Names one half-open probe, so that news of an earlier probe cannot settle a later one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProbeId(u64);

/// A circuit breaker for one upstream; see the module docs.
#[derive(Clone, Debug)]
pub struct Breaker<R = ChaCha8Rng> {
    config: BreakerConfig,
    state: BreakerState,
    reopens: u32,
    /// Probes admitted so far; the current one's [`ProbeId`].
    probes: u64,
    rng: R,
}

impl Breaker<ChaCha8Rng> {
    /// A closed breaker whose jitter comes from a ChaCha8 RNG seeded with `seed`. Seed each
    /// upstream's breaker differently so their jitter differs.
    pub fn new(config: BreakerConfig, seed: u64) -> Result<Self, PolicyError> {
        Self::with_rng(config, ChaCha8Rng::seed_from_u64(seed))
    }
}

impl<R: Rng> Breaker<R> {
    /// A closed breaker drawing its jitter from `rng`.
    pub fn with_rng(config: BreakerConfig, rng: R) -> Result<Self, PolicyError> {
        if config.failure_threshold == 0 {
            return Err(PolicyError::CountOutOfRange {
                field: "breaker.failure_threshold",
                range: "[1, ∞)",
                value: 0,
            });
        }
        check_nonzero("breaker.base_penalty", config.base_penalty)?;
        if config.base_penalty > config.max_penalty {
            return Err(PolicyError::MinAboveMax {
                min_field: "breaker.base_penalty",
                min: config.base_penalty,
                max_field: "breaker.max_penalty",
                max: config.max_penalty,
            });
        }
        if !(0.0..1.0).contains(&config.jitter) {
            return Err(PolicyError::NumberOutOfRange {
                field: "breaker.jitter",
                range: "[0, 1)",
                value: config.jitter,
            });
        }
        check_nonzero("breaker.probe_timeout", config.probe_timeout)?;
        Ok(Self {
            config,
            state: BreakerState::Closed { failures: 0 },
            reopens: 0,
            probes: 0,
            rng,
        })
    }

    /// The current state (as of the last call; `Open` turns `HalfOpen` only in `allow`).
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// May a call go to the upstream at `now`?
    pub fn allow(&mut self, now: Instant) -> Admission {
        match self.state {
            BreakerState::Closed { .. } => Admission::Allowed,
            BreakerState::Open { until } if now < until => Admission::Rejected {
                retry_after: until - now,
            },
            BreakerState::Open { .. } => self.start_probe(now),
            BreakerState::HalfOpen { probe_since } => {
                let since = probe_since;
                let lost_at = since
                    .checked_add(self.config.probe_timeout)
                    .unwrap_or(since);
                if now >= lost_at {
                    self.start_probe(now)
                } else {
                    Admission::Rejected {
                        retry_after: lost_at - now,
                    }
                }
            }
        }
    }

    fn start_probe(&mut self, now: Instant) -> Admission {
        self.probes = self.probes.wrapping_add(1);
        self.state = BreakerState::HalfOpen { probe_since: now };
        Admission::Probe
    }

    /// The probe in flight, when half-open. Ask right after [`Breaker::allow`] answered
    /// [`Admission::Probe`] (under the same lock) and keep it with that call.
    pub fn probe(&self) -> Option<ProbeId> {
        match self.state {
            BreakerState::HalfOpen { .. } => Some(ProbeId(self.probes)),
            _ => None,
        }
    }

    /// The probe `probe` ended at `now` without an outcome (its caller went away): if it is
    /// still the probe in flight, the breaker goes back to `Open` with the penalty served, so
    /// the next [`Breaker::allow`] admits a new probe; the penalty does not grow. Returns
    /// whether it was still in flight (news of a probe that was settled or replaced changes
    /// nothing).
    pub fn on_probe_abandoned(&mut self, probe: ProbeId, now: Instant) -> bool {
        if self.probe() != Some(probe) {
            return false;
        }
        self.state = BreakerState::Open { until: now };
        true
    }

    /// A call (or the probe) succeeded at `now`.
    pub fn on_success(&mut self, _now: Instant) -> Option<Transition> {
        match self.state {
            BreakerState::Closed { .. } => {
                self.state = BreakerState::Closed { failures: 0 };
                None
            }
            BreakerState::Open { .. } => None,
            BreakerState::HalfOpen { .. } => {
                self.state = BreakerState::Closed { failures: 0 };
                self.reopens = 0;
                Some(Transition::Closed)
            }
        }
    }

    /// A call (or the probe) failed at `now`.
    pub fn on_failure(&mut self, now: Instant) -> Option<Transition> {
        match self.state {
            BreakerState::Closed { failures } => {
                let failures = failures.saturating_add(1);
                if failures >= self.config.failure_threshold {
                    Some(self.open(now))
                } else {
                    self.state = BreakerState::Closed { failures };
                    None
                }
            }
            BreakerState::Open { .. } => None,
            BreakerState::HalfOpen { .. } => Some(self.open(now)),
        }
    }

    fn open(&mut self, now: Instant) -> Transition {
        self.reopens = self.reopens.saturating_add(1);
        let penalty = self.penalty_ceiling(self.reopens);
        let shave = self.config.jitter * self.rng.random::<f64>();
        let penalty = scale(penalty, 1.0 - shave);
        // max_penalty is the caller's; one too long for an Instant (centuries) must not panic.
        // Reopening at once is the safe reading: the probe logic still limits the traffic.
        let until = now.checked_add(penalty).unwrap_or(now);
        self.state = BreakerState::Open { until };
        Transition::Opened {
            penalty,
            reopens: self.reopens,
        }
    }

    /// `min(max_penalty, base_penalty · 2^(k−1))`, before jitter.
    pub fn penalty_ceiling(&self, reopens: u32) -> Duration {
        let doublings = reopens.saturating_sub(1).min(63);
        scale(self.config.base_penalty, 2f64.powi(doublings as i32)).min(self.config.max_penalty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn no_jitter() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 3,
            base_penalty: ms(1_000),
            max_penalty: ms(5_000),
            jitter: 0.0,
            probe_timeout: ms(2_000),
        }
    }

    fn breaker(config: BreakerConfig) -> Breaker {
        Breaker::new(config, 42).expect("valid")
    }

    fn open_it(b: &mut Breaker, now: Instant) {
        while matches!(b.state(), BreakerState::Closed { .. }) {
            b.on_failure(now);
        }
    }

    #[test]
    fn closed_counts_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut b = breaker(no_jitter());
        b.on_failure(t0);
        b.on_failure(t0);
        assert_eq!(b.state(), BreakerState::Closed { failures: 2 });
        assert_eq!(b.on_success(t0), None);
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
        b.on_failure(t0);
        b.on_failure(t0);
        assert_eq!(b.allow(t0), Admission::Allowed);
        assert_eq!(
            b.on_failure(t0),
            Some(Transition::Opened {
                penalty: ms(1_000),
                reopens: 1
            })
        );
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: t0 + ms(1_000)
            }
        );
    }

    #[test]
    fn open_rejects_until_the_penalty_ends() {
        let t0 = Instant::now();
        let mut b = breaker(no_jitter());
        open_it(&mut b, t0);
        assert_eq!(
            b.allow(t0),
            Admission::Rejected {
                retry_after: ms(1_000)
            }
        );
        assert_eq!(
            b.allow(t0 + ms(999)),
            Admission::Rejected { retry_after: ms(1) }
        );
        // Stale outcomes of calls admitted before it opened change nothing.
        assert_eq!(b.on_failure(t0 + ms(500)), None);
        assert_eq!(b.on_success(t0 + ms(500)), None);
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: t0 + ms(1_000)
            }
        );
        assert_eq!(b.allow(t0 + ms(1_000)), Admission::Probe);
        assert_eq!(
            b.state(),
            BreakerState::HalfOpen {
                probe_since: t0 + ms(1_000)
            }
        );
    }

    #[test]
    fn half_open_admits_exactly_one_probe() {
        let t0 = Instant::now();
        let mut b = breaker(no_jitter());
        open_it(&mut b, t0);
        let t1 = t0 + ms(1_000);
        assert_eq!(b.allow(t1), Admission::Probe);
        for i in 0..100 {
            assert_eq!(
                b.allow(t1 + ms(i)),
                Admission::Rejected {
                    retry_after: ms(2_000 - i)
                }
            );
        }
    }

    #[test]
    fn probe_success_closes_and_resets_the_penalty() {
        let t0 = Instant::now();
        let mut b = breaker(no_jitter());
        open_it(&mut b, t0);
        assert_eq!(b.allow(t0 + ms(1_000)), Admission::Probe);
        assert!(matches!(
            b.on_failure(t0 + ms(1_100)),
            Some(Transition::Opened { reopens: 2, .. })
        ));
        assert_eq!(b.allow(t0 + ms(3_100)), Admission::Probe);
        assert_eq!(b.on_success(t0 + ms(3_200)), Some(Transition::Closed));
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
        assert_eq!(b.allow(t0 + ms(3_200)), Admission::Allowed);
        // The next opening starts from the base penalty again.
        open_it(&mut b, t0 + ms(4_000));
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: t0 + ms(5_000)
            }
        );
    }

    #[test]
    fn probe_failure_reopens_with_a_doubled_capped_penalty() {
        let t0 = Instant::now();
        let mut b = breaker(no_jitter());
        open_it(&mut b, t0);
        let mut penalties = vec![];
        for _ in 0..5 {
            let BreakerState::Open { until } = b.state() else {
                panic!("open expected")
            };
            let now = until;
            assert_eq!(b.allow(now), Admission::Probe);
            match b.on_failure(now) {
                Some(Transition::Opened { penalty, .. }) => penalties.push(penalty),
                other => panic!("reopen expected, got {other:?}"),
            }
        }
        assert_eq!(penalties, [2_000, 4_000, 5_000, 5_000, 5_000].map(ms));
    }

    #[test]
    fn lost_probe_is_replaced_after_the_probe_timeout() {
        let t0 = Instant::now();
        let mut b = breaker(no_jitter());
        open_it(&mut b, t0);
        let t1 = t0 + ms(1_000);
        assert_eq!(b.allow(t1), Admission::Probe);
        assert!(matches!(
            b.allow(t1 + ms(1_999)),
            Admission::Rejected { .. }
        ));
        assert_eq!(b.allow(t1 + ms(2_000)), Admission::Probe);
        assert!(matches!(
            b.allow(t1 + ms(2_001)),
            Admission::Rejected { .. }
        ));
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_caller_probe_at_once() {
        let t0 = Instant::now();
        let mut b = breaker(no_jitter());
        open_it(&mut b, t0);
        let t1 = t0 + ms(1_000);
        assert_eq!(b.probe(), None, "no probe while open");
        assert_eq!(b.allow(t1), Admission::Probe);
        let first = b.probe().expect("half-open has a probe");
        assert!(matches!(b.allow(t1 + ms(10)), Admission::Rejected { .. }));
        // Its caller goes away: well before the probe timeout, the next caller probes.
        assert!(b.on_probe_abandoned(first, t1 + ms(20)));
        assert_eq!(b.state(), BreakerState::Open { until: t1 + ms(20) });
        assert_eq!(b.allow(t1 + ms(20)), Admission::Probe);
        let second = b.probe().expect("a new probe");
        assert_ne!(first, second);
        // The penalty did not grow: a failing second probe reopens for penalty(2), as if the
        // abandoned one never happened.
        assert_eq!(
            b.on_failure(t1 + ms(30)),
            Some(Transition::Opened {
                penalty: ms(2_000),
                reopens: 2
            })
        );
    }

    #[test]
    fn news_of_a_settled_or_replaced_probe_changes_nothing() {
        let t0 = Instant::now();
        let mut b = breaker(no_jitter());
        open_it(&mut b, t0);
        let t1 = t0 + ms(1_000);
        assert_eq!(b.allow(t1), Admission::Probe);
        let lost = b.probe().expect("probe");
        // Presumed lost after the probe timeout, replaced by another probe.
        assert_eq!(b.allow(t1 + ms(2_000)), Admission::Probe);
        let current = b.probe().expect("probe");
        assert!(!b.on_probe_abandoned(lost, t1 + ms(2_001)));
        assert_eq!(
            b.state(),
            BreakerState::HalfOpen {
                probe_since: t1 + ms(2_000)
            }
        );
        // The current probe succeeds; its late abandonment (a double report) is ignored.
        assert_eq!(b.on_success(t1 + ms(2_002)), Some(Transition::Closed));
        assert!(!b.on_probe_abandoned(current, t1 + ms(2_003)));
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
        assert_eq!(b.probe(), None);
    }

    #[test]
    fn jitter_shortens_within_bounds_and_is_seeded() {
        let t0 = Instant::now();
        let config = BreakerConfig {
            jitter: 0.5,
            ..no_jitter()
        };
        let run = |seed| {
            let mut b = Breaker::new(config.clone(), seed).expect("valid");
            let mut out = vec![];
            for _ in 0..20 {
                b.on_success(t0);
                while !matches!(b.state(), BreakerState::Open { .. }) {
                    if let Some(Transition::Opened { penalty, .. }) = b.on_failure(t0) {
                        out.push(penalty);
                    }
                }
                let _ = b.allow(t0 + Duration::from_secs(3600));
                b.on_success(t0);
            }
            out
        };
        let a = run(1);
        assert_eq!(a, run(1));
        assert_ne!(a, run(2));
        assert!(a.iter().all(|p| *p > ms(500) && *p <= ms(1_000)), "{a:?}");
    }

    #[test]
    fn concurrent_callers_get_one_probe() {
        let t0 = Instant::now();
        let b = Arc::new(Mutex::new(breaker(no_jitter())));
        open_it(&mut b.lock().expect("lock"), t0);
        let t1 = t0 + ms(1_000);
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let b = Arc::clone(&b);
                std::thread::spawn(move || {
                    (0..1_000)
                        .filter(|_| b.lock().expect("lock").allow(t1) == Admission::Probe)
                        .count()
                })
            })
            .collect();
        let probes: usize = handles.into_iter().map(|h| h.join().expect("thread")).sum();
        assert_eq!(probes, 1);
    }

    #[test]
    fn validates() {
        let bad = [
            BreakerConfig {
                failure_threshold: 0,
                ..BreakerConfig::default()
            },
            BreakerConfig {
                base_penalty: Duration::ZERO,
                ..BreakerConfig::default()
            },
            BreakerConfig {
                base_penalty: ms(10),
                max_penalty: ms(5),
                ..BreakerConfig::default()
            },
            BreakerConfig {
                jitter: 1.0,
                ..BreakerConfig::default()
            },
            BreakerConfig {
                probe_timeout: Duration::ZERO,
                ..BreakerConfig::default()
            },
        ];
        for config in bad {
            assert!(Breaker::new(config.clone(), 0).is_err(), "{config:?}");
        }
        let b = breaker(BreakerConfig::default());
        assert_eq!(b.penalty_ceiling(u32::MAX), Duration::from_secs(60));
    }
}
