//! Graded load shedding: admit a new call, admit it degraded, or reject it, before it costs
//! anything.
//!
//! ```text
//!  in_flight ≥ limit                         → Reject
//!        code UNAVAILABLE + pushback_ms        when another instance can take the call
//!        code RESOURCE_EXHAUSTED               otherwise
//!  in_flight ≥ degrade_at · limit
//!    or p95 stream latency > SLO             → Degrade   if the method may be degraded
//!                                            → Admit     otherwise
//!  otherwise                                 → Admit
//!
//!  scale_out = queue_depth > queue_threshold   (reported with every decision)
//! ```
//!
//! *Degrade* turns a server stream into one buffered reply: the proxy collects the upstream's
//! messages and sends them as a single response, trading time-to-first-token for fewer flushes
//! and wake-ups per call. Only methods whose profile allows it are degraded; the rest are
//! admitted until the hard limit.
//!
//! *Reject* follows DESIGN.md's failure semantics: never a bare HTTP 429 to a gRPC client.
//! `UNAVAILABLE` is retryable by standard gRPC retry policies, so with `pushback_ms` (gRFC A6
//! `grpc-retry-pushback-ms`) a client behind a load balancer comes back, after a short pause,
//! most likely to another instance. `RESOURCE_EXHAUSTED` is not retried by default: it is the
//! answer when no other instance can help.
//!
//! *scale_out* is a signal for the control plane (or an autoscaler) that the backlog is growing;
//! it does not change the decision for this call.
//!
//! The p95 comes from [`crate::latency::LatencyWindow`]; no samples means no evidence of slowness.

use std::time::Duration;

use pnp_wire::status::Code;

use crate::error::check_number;
use crate::PolicyError;

/// Settings for [`ShedPolicy`].
#[derive(Clone, Debug, PartialEq)]
pub struct ShedConfig {
    /// Fraction of the concurrency limit from which eligible calls are degraded, in `(0, 1]`.
    /// Default 0.9.
    pub degrade_at: f64,
    /// Pushback sent with `UNAVAILABLE` when another instance can take the call. Default 50 ms.
    pub pushback: Duration,
}

impl Default for ShedConfig {
    fn default() -> Self {
        Self {
            degrade_at: 0.9,
            pushback: Duration::from_millis(50),
        }
    }
}

/// What the shedder knows when a call arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShedInput {
    /// Calls in flight now (not counting this one).
    pub in_flight: usize,
    /// Concurrency limit.
    pub limit: usize,
    /// Calls waiting (for a connection, a slot, the upstream).
    pub queue_depth: usize,
    /// Queue depth above which to ask for more instances.
    pub queue_threshold: usize,
    /// p95 stream latency over the recent window, if there are samples.
    pub p95: Option<Duration>,
    /// The latency SLO the p95 is held to.
    pub slo: Duration,
    /// The method's profile allows degrading a stream to one buffered reply.
    pub degradable: bool,
    /// Another instance can take the call (there are healthy peers behind the balancer).
    pub peer_available: bool,
}

/// What to do with the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShedAction {
    /// Serve it normally.
    Admit,
    /// Serve it as one buffered reply instead of a stream.
    Degrade,
    /// End it at once, as a Trailers-Only response with this status.
    Reject {
        /// `RESOURCE_EXHAUSTED` or `UNAVAILABLE`.
        code: Code,
        /// `grpc-retry-pushback-ms` to send, with `UNAVAILABLE` only.
        pushback_ms: Option<u32>,
    },
}

/// The decision and the scale-out signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct ShedDecision {
    /// What to do with this call.
    pub action: ShedAction,
    /// The queue is over its threshold: more capacity is needed.
    pub scale_out: bool,
}

/// The graded load-shedding rule; see the module docs.
#[derive(Clone, Debug, PartialEq)]
pub struct ShedPolicy {
    degrade_at: f64,
    pushback_ms: u32,
}

impl ShedPolicy {
    /// Refused unless `degrade_at` is in `(0, 1]`. The pushback is capped at `i32::MAX` ms, the
    /// largest value the header can carry.
    pub fn new(config: ShedConfig) -> Result<Self, PolicyError> {
        check_number(
            "shed.degrade_at",
            "(0, 1]",
            config.degrade_at,
            0.0,
            true,
            1.0,
        )?;
        let pushback_ms = u32::try_from(config.pushback.as_millis())
            .unwrap_or(u32::MAX)
            .min(i32::MAX as u32);
        Ok(Self {
            degrade_at: config.degrade_at,
            pushback_ms,
        })
    }

    /// Decide for one arriving call.
    pub fn decide(&self, input: &ShedInput) -> ShedDecision {
        let scale_out = input.queue_depth > input.queue_threshold;
        let action = if input.in_flight >= input.limit {
            if input.peer_available {
                ShedAction::Reject {
                    code: Code::Unavailable,
                    pushback_ms: Some(self.pushback_ms),
                }
            } else {
                ShedAction::Reject {
                    code: Code::ResourceExhausted,
                    pushback_ms: None,
                }
            }
        } else {
            let crowded = input.in_flight as f64 >= self.degrade_at * input.limit as f64;
            let slow = input.p95.is_some_and(|p95| p95 > input.slo);
            if (crowded || slow) && input.degradable {
                ShedAction::Degrade
            } else {
                ShedAction::Admit
            }
        };
        ShedDecision { action, scale_out }
    }
}

impl Default for ShedPolicy {
    fn default() -> Self {
        Self {
            degrade_at: 0.9,
            pushback_ms: 50,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn input() -> ShedInput {
        ShedInput {
            in_flight: 10,
            limit: 100,
            queue_depth: 0,
            queue_threshold: 50,
            p95: Some(Duration::from_millis(500)),
            slo: Duration::from_secs(2),
            degradable: true,
            peer_available: false,
        }
    }

    const EXHAUSTED: ShedAction = ShedAction::Reject {
        code: Code::ResourceExhausted,
        pushback_ms: None,
    };
    const ELSEWHERE: ShedAction = ShedAction::Reject {
        code: Code::Unavailable,
        pushback_ms: Some(50),
    };

    #[test]
    fn decision_table() {
        let p = ShedPolicy::default();
        let slow = Some(Duration::from_secs(3));
        let i = input();
        let cases = [
            (i, ShedAction::Admit),
            (ShedInput { p95: None, ..i }, ShedAction::Admit),
            (ShedInput { p95: slow, ..i }, ShedAction::Degrade),
            (
                ShedInput {
                    p95: slow,
                    degradable: false,
                    ..i
                },
                ShedAction::Admit,
            ),
            (ShedInput { in_flight: 89, ..i }, ShedAction::Admit),
            (ShedInput { in_flight: 90, ..i }, ShedAction::Degrade),
            (
                ShedInput {
                    in_flight: 90,
                    degradable: false,
                    ..i
                },
                ShedAction::Admit,
            ),
            (
                ShedInput {
                    in_flight: 100,
                    ..i
                },
                EXHAUSTED,
            ),
            (
                ShedInput {
                    in_flight: 100,
                    peer_available: true,
                    ..i
                },
                ELSEWHERE,
            ),
            (
                ShedInput {
                    in_flight: 250,
                    p95: slow,
                    ..i
                },
                EXHAUSTED,
            ),
            (
                ShedInput {
                    in_flight: 0,
                    limit: 0,
                    ..i
                },
                EXHAUSTED,
            ),
            // Exactly at the SLO is not over it.
            (
                ShedInput {
                    p95: Some(Duration::from_secs(2)),
                    ..i
                },
                ShedAction::Admit,
            ),
        ];
        for (input, want) in cases {
            assert_eq!(p.decide(&input).action, want, "{input:?}");
        }
    }

    #[test]
    fn scale_out_when_the_queue_passes_its_threshold() {
        let p = ShedPolicy::default();
        let at = ShedInput {
            queue_depth: 50,
            ..input()
        };
        assert!(!p.decide(&at).scale_out);
        let over = ShedInput {
            queue_depth: 51,
            ..input()
        };
        let d = p.decide(&over);
        assert!(d.scale_out);
        assert_eq!(d.action, ShedAction::Admit);
    }

    #[test]
    fn config() {
        assert_eq!(
            ShedPolicy::new(ShedConfig::default()),
            Ok(ShedPolicy::default())
        );
        for bad in [0.0, 1.1, f64::NAN] {
            let config = ShedConfig {
                degrade_at: bad,
                ..ShedConfig::default()
            };
            assert!(ShedPolicy::new(config).is_err(), "{bad}");
        }
        let huge = ShedPolicy::new(ShedConfig {
            pushback: Duration::MAX,
            ..ShedConfig::default()
        })
        .expect("valid");
        assert_eq!(huge.pushback_ms, i32::MAX as u32);
    }

    proptest! {
        #[test]
        fn never_admits_over_the_limit_and_rejects_only_there(
            in_flight in 0usize..300, limit in 0usize..300, queue in 0usize..100,
            p95 in proptest::option::of(0u64..5_000), degradable: bool, peer: bool,
        ) {
            let p = ShedPolicy::default();
            let input = ShedInput {
                in_flight, limit, queue_depth: queue, queue_threshold: 50,
                p95: p95.map(Duration::from_millis), slo: Duration::from_secs(2),
                degradable, peer_available: peer,
            };
            let d = p.decide(&input);
            let rejected = matches!(d.action, ShedAction::Reject { .. });
            prop_assert_eq!(rejected, in_flight >= limit);
            if d.action == ShedAction::Degrade {
                prop_assert!(degradable);
            }
            if let ShedAction::Reject { code, pushback_ms } = d.action {
                prop_assert_eq!(code == Code::Unavailable, peer);
                prop_assert_eq!(pushback_ms.is_some(), peer);
            }
            prop_assert_eq!(d.scale_out, queue > 50);
        }
    }
}
