//! Seeded simulation: the retry policy and throttle against upstreams that fail at a given rate.
//!
//! Each run sends 10 000 calls at 100 per second of virtual time to an upstream whose attempts
//! fail independently with probability `p` (UNAVAILABLE, retryable, idempotent method). It
//! counts attempts and checks the throttle's invariants after every step. A failing seed is
//! printed; add it to `SEEDS` as a regression.

use std::time::{Duration, Instant};

use pnp_policy::retry::{
    AttemptOutcome, RetryDecision, RetryPolicy, RetryPolicyConfig, RetryState,
};
use pnp_policy::throttle::{RetryBudget, RetryBudgetConfig, RetryThrottle, TokenBucket};
use pnp_policy::Code;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const REQUESTS: u64 = 10_000;
const SEEDS: [u64; 5] = [0, 1, 2, 3, 0xdead_beef];

#[derive(Debug)]
struct Run {
    attempts: u64,
    failed_calls: u64,
}

fn policy() -> RetryPolicy {
    // The most retries A6 allows, so the throttle, not max_attempts, is what bounds them.
    RetryPolicy::new(RetryPolicyConfig {
        max_attempts: 5,
        ..RetryPolicyConfig::default()
    })
    .expect("valid")
}

/// `fails(rng, t)`: whether an attempt at virtual time `t` fails.
fn simulate(
    seed: u64,
    mut throttle: Option<RetryThrottle>,
    mut fails: impl FnMut(&mut ChaCha8Rng, Duration) -> bool,
) -> Run {
    let policy = policy();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let t0 = Instant::now();
    let mut run = Run {
        attempts: 0,
        failed_calls: 0,
    };
    for i in 0..REQUESTS {
        let arrival = Duration::from_millis(i * 10);
        let mut now = arrival;
        if let Some(t) = &mut throttle {
            t.on_request(t0 + now);
        }
        let mut state = RetryState::new();
        loop {
            run.attempts += 1;
            let code = if fails(&mut rng, now) {
                Code::Unavailable
            } else {
                Code::Ok
            };
            let outcome = AttemptOutcome {
                idempotent: true,
                ..AttemptOutcome::new(code)
            };
            let decision = match &mut throttle {
                Some(t) => policy.decide_throttled(&mut state, &outcome, t, t0 + now, &mut rng),
                None => policy.decide(&mut state, &outcome, &mut rng),
            };
            if let Some(t) = &throttle {
                let left = t.tokens_left();
                assert!(
                    left.is_finite() && left >= 0.0,
                    "seed {seed}: tokens {left}"
                );
                if let RetryThrottle::TokenBucket(_) = t {
                    assert!(left <= 10.0, "seed {seed}: tokens {left}");
                }
            }
            assert!(state.attempts() <= policy.max_attempts(), "seed {seed}");
            match decision {
                RetryDecision::Retry { after } => now += after,
                RetryDecision::GiveUp(_) => {
                    if code != Code::Ok {
                        run.failed_calls += 1;
                    }
                    break;
                }
            }
        }
    }
    run
}

fn coin(p: f64) -> impl FnMut(&mut ChaCha8Rng, Duration) -> bool {
    move |rng, _| rng.random_bool(p)
}

fn budget() -> RetryThrottle {
    RetryThrottle::Budget(
        RetryBudget::new(RetryBudgetConfig::default(), Instant::now()).expect("valid"),
    )
}

#[test]
fn without_a_throttle_retries_nearly_double_the_load() {
    // The control: shows the throttle tests below can fail.
    for seed in SEEDS {
        let run = simulate(seed, None, coin(0.5));
        let ratio = run.attempts as f64 / REQUESTS as f64;
        assert!(ratio > 1.9, "seed {seed}: {ratio}");
    }
}

#[test]
fn token_bucket_caps_amplification_at_half_failure() {
    for seed in SEEDS {
        let run = simulate(seed, Some(RetryThrottle::default()), coin(0.5));
        let ratio = run.attempts as f64 / REQUESTS as f64;
        assert!(ratio <= 1.2, "seed {seed}: attempts/requests = {ratio}");
    }
}

#[test]
fn budget_caps_amplification_at_half_failure() {
    for seed in SEEDS {
        let run = simulate(seed, Some(budget()), coin(0.5));
        let ratio = run.attempts as f64 / REQUESTS as f64;
        assert!(ratio <= 1.2, "seed {seed}: attempts/requests = {ratio}");
        // It does spend its budget: a fifth of calls get a retry.
        assert!(ratio >= 1.15, "seed {seed}: attempts/requests = {ratio}");
    }
}

#[test]
fn healthy_upstream_keeps_its_retries() {
    for seed in SEEDS {
        for throttle in [RetryThrottle::default(), budget()] {
            let run = simulate(seed, Some(throttle), coin(0.01));
            // 1 % of 10 000 calls fail once; retries rescue them all (a call fails only if five
            // attempts in a row do).
            assert_eq!(run.failed_calls, 0, "seed {seed}");
            let ratio = run.attempts as f64 / REQUESTS as f64;
            assert!(ratio < 1.02, "seed {seed}: {ratio}");
        }
    }
}

#[test]
fn token_bucket_recovers_after_an_outage() {
    for seed in SEEDS {
        let mut throttle = RetryThrottle::default();
        let policy = policy();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let now = Instant::now();
        let failure = AttemptOutcome {
            idempotent: true,
            ..AttemptOutcome::new(Code::Unavailable)
        };
        // An outage drains the bucket...
        for _ in 0..100 {
            let _ = policy.decide_throttled(
                &mut RetryState::new(),
                &failure,
                &mut throttle,
                now,
                &mut rng,
            );
        }
        assert_eq!(throttle.tokens_left(), 0.0);
        let mut state = RetryState::new();
        assert!(matches!(
            policy.decide_throttled(&mut state, &failure, &mut throttle, now, &mut rng),
            RetryDecision::GiveUp(_)
        ));
        // ...and successes refill it: 6.1 tokens, 5.1 after the next failure is counted, which
        // is above the half-way mark of 5.
        for _ in 0..61 {
            throttle.record(&policy, &AttemptOutcome::new(Code::Ok));
        }
        assert!(throttle.tokens_left() > 6.0);
        let mut state = RetryState::new();
        assert!(matches!(
            policy.decide_throttled(&mut state, &failure, &mut throttle, now, &mut rng),
            RetryDecision::Retry { .. }
        ));
    }
}

#[test]
fn a_fresh_token_bucket_matches_a6_defaults() {
    assert_eq!(
        RetryThrottle::default(),
        RetryThrottle::TokenBucket(TokenBucket::new(10, 0.1).expect("valid"))
    );
}
