//! Seeded simulation: one circuit breaker in front of an upstream that goes down for 30 s.
//!
//! Virtual time advances in 10 ms ticks. Each tick, completions that are due report their
//! outcome, then 0–3 new calls ask the breaker for admission. An admitted call completes after a
//! random latency and fails if the upstream is down at that moment (and 1 % of the time anyway).
//! Invariants are checked after every step; a failing seed is printed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pnp_policy::breaker::{Admission, Breaker, BreakerConfig, BreakerState, Transition};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SEEDS: [u64; 6] = [0, 1, 2, 3, 4, 0x5eed];
const TICK: Duration = Duration::from_millis(10);
const DOWN_FROM: Duration = Duration::from_secs(10);
const DOWN_UNTIL: Duration = Duration::from_secs(40);
const END: Duration = Duration::from_secs(60);

fn config() -> BreakerConfig {
    BreakerConfig {
        failure_threshold: 5,
        base_penalty: Duration::from_secs(1),
        max_penalty: Duration::from_secs(8),
        jitter: 0.2,
        probe_timeout: Duration::from_secs(2),
    }
}

#[derive(Default, Debug)]
struct Stats {
    sent_while_down: u64,
    probes: u64,
    rejected: u64,
    closed_at: Option<Duration>,
}

struct Call {
    probe: bool,
}

fn run(seed: u64, max_latency_ms: u64) -> Stats {
    let config = config();
    let mut breaker = Breaker::new(config.clone(), seed).expect("valid");
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xabcdef);
    let t0 = Instant::now();
    let down = |t: Duration| t >= DOWN_FROM && t < DOWN_UNTIL;
    // Completion time (ms, plus a sequence number for uniqueness) → call.
    let mut pending: BTreeMap<(u64, u64), Call> = BTreeMap::new();
    let mut seq = 0u64;
    let mut stats = Stats::default();
    let mut last_probe: Option<Duration> = None;
    let mut reported_since_probe = true;
    let mut outstanding_probes = 0u32;
    let mut now = Duration::ZERO;
    while now < END {
        // Outcomes that are due.
        let due: Vec<_> = pending
            .range(..=(now.as_millis() as u64, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            let call = pending.remove(&key).expect("present");
            let failed = down(now) || rng.random_bool(0.01);
            let before = breaker.state();
            let transition = if failed {
                breaker.on_failure(t0 + now)
            } else {
                breaker.on_success(t0 + now)
            };
            if matches!(before, BreakerState::HalfOpen { .. }) {
                reported_since_probe = true;
            }
            match transition {
                Some(Transition::Opened { penalty, reopens }) => {
                    let ceiling = breaker.penalty_ceiling(reopens);
                    assert!(penalty <= ceiling, "seed {seed}: {penalty:?} > {ceiling:?}");
                    assert!(
                        penalty.as_secs_f64()
                            > ceiling.as_secs_f64() * (1.0 - config.jitter) - 1e-9,
                        "seed {seed}: {penalty:?} too short for {ceiling:?}"
                    );
                    assert!(ceiling <= config.max_penalty);
                }
                Some(Transition::Closed) => {
                    assert!(
                        matches!(before, BreakerState::HalfOpen { .. }),
                        "seed {seed}"
                    );
                    if now >= DOWN_UNTIL && stats.closed_at.is_none() {
                        stats.closed_at = Some(now);
                    }
                }
                None => {}
            }
            if call.probe {
                outstanding_probes -= 1;
            }
        }

        // New calls.
        for _ in 0..rng.random_range(0..=3) {
            let before = breaker.state();
            let admission = breaker.allow(t0 + now);
            match admission {
                Admission::Allowed => {
                    assert!(
                        matches!(before, BreakerState::Closed { .. }),
                        "seed {seed} at {now:?}: allowed while {before:?}"
                    );
                }
                Admission::Probe => {
                    match before {
                        BreakerState::Open { until } => assert!(t0 + now >= until, "seed {seed}"),
                        BreakerState::HalfOpen { probe_since } => assert!(
                            t0 + now >= probe_since + config.probe_timeout,
                            "seed {seed}: second probe at {now:?}"
                        ),
                        BreakerState::Closed { .. } => panic!("seed {seed}: probe while closed"),
                    }
                    // Exactly one probe per half-open episode: another only after an outcome
                    // was reported or the probe timed out.
                    if let Some(last) = last_probe {
                        assert!(
                            reported_since_probe || now - last >= config.probe_timeout,
                            "seed {seed}: concurrent probes at {now:?}"
                        );
                    }
                    last_probe = Some(now);
                    outstanding_probes += 1;
                    if max_latency_ms < 800 {
                        // Every call ends before the shortest open period does, so no stale
                        // outcome can settle a probe early: probes never overlap.
                        assert_eq!(outstanding_probes, 1, "seed {seed}: overlapping probes");
                    }
                    reported_since_probe = false;
                    stats.probes += 1;
                }
                Admission::Rejected { retry_after } => {
                    assert!(
                        !matches!(before, BreakerState::Closed { .. }),
                        "seed {seed}: rejected while closed"
                    );
                    assert!(!retry_after.is_zero(), "seed {seed}");
                    assert!(retry_after <= config.max_penalty.max(config.probe_timeout));
                    stats.rejected += 1;
                    continue;
                }
            }
            if down(now) {
                stats.sent_while_down += 1;
            }
            let latency = rng.random_range(1..=max_latency_ms);
            seq += 1;
            pending.insert(
                (now.as_millis() as u64 + latency, seq),
                Call {
                    probe: admission == Admission::Probe,
                },
            );
        }
        now += TICK;
    }
    stats
}

#[test]
fn breaker_sheds_an_outage_and_recovers() {
    for seed in SEEDS {
        let stats = run(seed, 200);
        // ~4500 calls arrive during the 30 s outage; the breaker lets through the calls that
        // trip it plus about one probe per open period (penalties 1, 2, 4, 8, 8, … s).
        assert!(
            stats.sent_while_down < 60,
            "seed {seed}: {stats:?} sent while down"
        );
        assert!(stats.rejected > 4_000, "seed {seed}: {stats:?}");
        assert!(stats.probes >= 4, "seed {seed}: {stats:?}");
        // Recovery within one maximal penalty (plus a probe's latency) of the upstream's return.
        let closed = stats.closed_at.expect("closed again after the outage");
        assert!(
            closed <= DOWN_UNTIL + config().max_penalty + Duration::from_millis(300),
            "seed {seed}: closed at {closed:?}"
        );
    }
}

#[test]
fn long_calls_still_respect_the_admission_invariants() {
    // Latencies up to 3 s outlive the open periods, so outcomes of calls admitted while closed
    // arrive during later states. Admission invariants must hold regardless.
    for seed in SEEDS {
        let stats = run(seed, 3_000);
        assert!(stats.closed_at.is_some(), "seed {seed}: {stats:?}");
    }
}
