//! The total deadline of a call: the smaller of the client's `grpc-timeout` (less a safety
//! offset) and the job profile's cap.
//!
//! pnp must answer `DEADLINE_EXCEEDED` *before* the client's own timer fires, or the client
//! sees its local deadline error and pnp's status is lost in the race. So the client's timeout
//! is shortened by an offset:
//!
//! ```text
//! offset(t)      = min(max(floor, ratio · t), ceiling)      default floor 5 ms, ratio 1 %, ceiling 1 s
//! client_budget  = t − offset(t), saturating at 0            t = grpc-timeout
//! budget         = min(client_budget, profile_cap)           either side may be absent
//! deadline       = arrival + budget
//! upstream(now)  = deadline − now, saturating at 0           the grpc-timeout to forward
//! ```
//!
//! A 100 ms timeout becomes 95 ms, a 10 s one 9.9 s, a 5 min one 299 s. The profile cap is
//! pnp's own limit and is not shortened. With neither a `grpc-timeout` nor a cap there is no
//! total deadline at all: a healthy stream is never killed for being long (the idle and
//! first-message clocks in [`crate::idle`] catch the stuck ones). The upstream gets exactly the
//! time left at the moment each attempt is sent, so queueing and retries eat into it, and the
//! next pnp hop applies its own offset again.
//!
//! `grpc-timeout` parsing is `pnp_wire::timeout` (PROTOCOL-HTTP2 "Timeout").

use std::time::{Duration, Instant};

use crate::duration_math::scale;
use crate::error::check_number;
use crate::PolicyError;

/// How much earlier than the client's `grpc-timeout` pnp gives up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeadlineOffset {
    floor: Duration,
    ratio: f64,
    ceiling: Duration,
}

impl DeadlineOffset {
    /// `min(max(floor, ratio · t), ceiling)`; refused when `floor > ceiling` or `ratio` is not
    /// in `[0, 0.5]`.
    pub fn new(floor: Duration, ratio: f64, ceiling: Duration) -> Result<Self, PolicyError> {
        check_number("deadline.offset_ratio", "[0, 0.5]", ratio, 0.0, false, 0.5)?;
        if floor > ceiling {
            return Err(PolicyError::MinAboveMax {
                min_field: "deadline.offset_floor",
                min: floor,
                max_field: "deadline.offset_ceiling",
                max: ceiling,
            });
        }
        Ok(Self {
            floor,
            ratio,
            ceiling,
        })
    }

    /// No offset: pnp and the client time out together.
    pub const NONE: DeadlineOffset = DeadlineOffset {
        floor: Duration::ZERO,
        ratio: 0.0,
        ceiling: Duration::ZERO,
    };

    /// The offset for a client timeout `t`.
    pub fn offset(&self, t: Duration) -> Duration {
        scale(t, self.ratio).max(self.floor).min(self.ceiling)
    }
}

impl Default for DeadlineOffset {
    /// 5 ms, or 1 % of the timeout when that is more, at most 1 s.
    fn default() -> Self {
        Self {
            floor: Duration::from_millis(5),
            ratio: 0.01,
            ceiling: Duration::from_secs(1),
        }
    }
}

/// Which limit set the deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadlineSource {
    /// The client's `grpc-timeout` (less the offset); ties go here.
    Client,
    /// The job profile's cap.
    Profile,
}

/// The total deadline of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    /// The instant at which pnp ends the call with `DEADLINE_EXCEEDED`.
    pub at: Instant,
    /// `at − arrival`: the whole budget.
    pub budget: Duration,
    /// Which limit won.
    pub source: DeadlineSource,
}

impl Deadline {
    /// The deadline of a call that arrived at `arrival`. `None` when neither limit is given, or
    /// when the budget is so large that no `Instant` can hold it (centuries): no total deadline.
    pub fn compute(
        arrival: Instant,
        grpc_timeout: Option<Duration>,
        profile_cap: Option<Duration>,
        offset: &DeadlineOffset,
    ) -> Option<Deadline> {
        let client = grpc_timeout.map(|t| t.saturating_sub(offset.offset(t)));
        let (budget, source) = match (client, profile_cap) {
            (None, None) => return None,
            (Some(c), None) => (c, DeadlineSource::Client),
            (None, Some(p)) => (p, DeadlineSource::Profile),
            (Some(c), Some(p)) if c <= p => (c, DeadlineSource::Client),
            (Some(_), Some(p)) => (p, DeadlineSource::Profile),
        };
        let at = arrival.checked_add(budget)?;
        Some(Deadline { at, budget, source })
    }

    /// Time left at `now`, zero once passed: the `grpc-timeout` to send upstream with an
    /// attempt that starts at `now`.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.at.saturating_duration_since(now)
    }

    /// Whether the deadline has passed at `now` (a zero budget is expired on arrival).
    pub fn is_expired(&self, now: Instant) -> bool {
        now >= self.at
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn default_offset_table() {
        let o = DeadlineOffset::default();
        let cases = [
            (0, 5),
            (3, 5),
            (100, 5),
            (500, 5),
            (1_000, 10),
            (10_000, 100),
            (300_000, 1_000),
            (3_600_000, 1_000),
        ];
        for (t, want) in cases {
            assert_eq!(o.offset(MS(t)), MS(want), "t = {t} ms");
        }
    }

    #[test]
    fn smaller_limit_wins() {
        let now = Instant::now();
        let o = DeadlineOffset::default();
        let cases = [
            (None, None, None),
            (Some(100), None, Some((95, DeadlineSource::Client))),
            (None, Some(30_000), Some((30_000, DeadlineSource::Profile))),
            (
                Some(10_000),
                Some(30_000),
                Some((9_900, DeadlineSource::Client)),
            ),
            (
                Some(60_000),
                Some(30_000),
                Some((30_000, DeadlineSource::Profile)),
            ),
            (Some(1_000), Some(990), Some((990, DeadlineSource::Client))),
            // Shorter than the offset: expired on arrival rather than negative.
            (Some(3), Some(30_000), Some((0, DeadlineSource::Client))),
            (Some(0), None, Some((0, DeadlineSource::Client))),
        ];
        for (timeout, cap, want) in cases {
            let got = Deadline::compute(now, timeout.map(MS), cap.map(MS), &o)
                .map(|d| (d.budget.as_millis() as u64, d.source));
            assert_eq!(got, want, "{timeout:?} {cap:?}");
        }
        let d = Deadline::compute(now, Some(MS(3)), None, &o).expect("deadline");
        assert!(d.is_expired(now));
        assert_eq!(d.remaining(now), Duration::ZERO);
    }

    #[test]
    fn remaining_shrinks_and_saturates() {
        let now = Instant::now();
        let d =
            Deadline::compute(now, None, Some(MS(1_000)), &DeadlineOffset::NONE).expect("deadline");
        assert_eq!(d.at, now + MS(1_000));
        assert_eq!(d.remaining(now), MS(1_000));
        assert_eq!(d.remaining(now + MS(400)), MS(600));
        assert!(!d.is_expired(now + MS(999)));
        assert!(d.is_expired(now + MS(1_000)));
        assert_eq!(d.remaining(now + MS(5_000)), Duration::ZERO);
    }

    #[test]
    fn enormous_timeouts_mean_no_deadline_not_a_panic() {
        let now = Instant::now();
        assert_eq!(
            Deadline::compute(now, Some(Duration::MAX), None, &DeadlineOffset::default()),
            None
        );
    }

    #[test]
    fn refuses_bad_offsets() {
        assert!(DeadlineOffset::new(MS(5), 0.6, MS(10)).is_err());
        assert!(DeadlineOffset::new(MS(5), f64::NAN, MS(10)).is_err());
        assert!(DeadlineOffset::new(MS(20), 0.01, MS(10)).is_err());
        assert!(DeadlineOffset::new(MS(0), 0.0, MS(0)).is_ok());
    }

    proptest! {
        #[test]
        fn never_later_than_either_limit(t in proptest::option::of(0u64..10_000_000), cap in proptest::option::of(0u64..10_000_000)) {
            let now = Instant::now();
            let o = DeadlineOffset::default();
            match Deadline::compute(now, t.map(MS), cap.map(MS), &o) {
                None => prop_assert!(t.is_none() && cap.is_none()),
                Some(d) => {
                    if let Some(t) = t {
                        prop_assert!(d.budget <= MS(t));
                        prop_assert!(d.budget >= MS(t).saturating_sub(Duration::from_secs(1)).min(cap.map(MS).unwrap_or(Duration::MAX)));
                    }
                    if let Some(cap) = cap {
                        prop_assert!(d.budget <= MS(cap));
                    }
                    prop_assert_eq!(d.at, now + d.budget);
                }
            }
        }
    }
}
