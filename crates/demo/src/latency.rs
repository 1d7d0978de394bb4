//! The latency model of the token-streaming stand-in, as a pure function.
//!
//! Real LLM front ends (see DESIGN.md, "Who uses it") see streams of 2–8 s with a long tail
//! past 15 s and a first token after up to ~12 s of "thinking". The proxy's idle timers,
//! deadlines and flushing have to cope with exactly that, so the demo upstream reproduces it.
//!
//! For the `llm` class and the default 64 tokens the model is:
//!
//! * **First token.** A mixture: 88 % of calls see an ordinary prefill, log-normal with a
//!   median of 0.35 s (σ = 0.5); 12 % "think" first, log-normal with a median of 2.5 s
//!   (σ = 0.6), which puts roughly one call in a hundred past 7 s. Capped at 12 s.
//! * **Stream speed.** Each stream draws one slowdown factor, log-normal with median 1 and
//!   σ = 1.15, capped at 15 (replica load, model size, batch contention). That per-stream factor, not the
//!   per-token noise, is what makes the tail: the sum of 63 independent gaps would
//!   concentrate around its mean and never reach 15 s.
//! * **Token gaps.** 30 ms × slowdown × log-normal jitter (σ = 0.35); 1 % of gaps are a stall
//!   (batch preemption), Pareto with a 0.2 s minimum and shape 1.5. Each gap is capped at 5 s.
//!
//! That gives a median total of about 3 s (quartiles about 1.7 s and 5.8 s), about 5 % of
//! streams past 15 s and about 1 % past 30 s; the unit tests below check the median and the
//! 15 s fraction over 2000 seeds. The `classifier` class answers in tens of milliseconds
//! with no tail. Unknown classes use the `llm` model, so a profile may name any class.
//!
//! Everything is drawn from ChaCha8 seeded with the request seed, so a plan is a pure function
//! of `(seed, tokens, model_class)` and can be tested without sleeping.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal, Pareto};

/// Upper bound on the first-token delay drawn by the model.
pub const MAX_FIRST_TOKEN: Duration = Duration::from_secs(12);

/// Upper bound on one gap between tokens drawn by the model.
pub const MAX_TOKEN_GAP: Duration = Duration::from_secs(5);

/// Upper bound on the per-stream slowdown factor, which bounds the tail (about 45 s for 64
/// tokens) so that no demo stream runs for minutes.
const MAX_SLOWDOWN: f64 = 15.0;

/// When each token of one stream is produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencyPlan {
    /// Delay from the request to the first token.
    pub first_token: Duration,
    /// `gaps[i]` is the delay between token `i` and token `i + 1`; one fewer than the tokens.
    pub gaps: Vec<Duration>,
}

impl LatencyPlan {
    /// Time from the request to the last token.
    pub fn total(&self) -> Duration {
        self.gaps.iter().sum::<Duration>() + self.first_token
    }

    /// Delay before token `index` (the first-token delay for index 0).
    pub fn delay_before(&self, index: usize) -> Duration {
        match index.checked_sub(1) {
            None => self.first_token,
            Some(gap) => self.gaps.get(gap).copied().unwrap_or_default(),
        }
    }
}

/// The parameters of one model class.
struct ClassModel {
    prefill_median_s: f64,
    prefill_sigma: f64,
    thinking_probability: f64,
    thinking_median_s: f64,
    thinking_sigma: f64,
    gap_median_s: f64,
    stream_sigma: f64,
    gap_sigma: f64,
    stall_probability: f64,
    stall_min_s: f64,
    stall_shape: f64,
}

const LLM: ClassModel = ClassModel {
    prefill_median_s: 0.35,
    prefill_sigma: 0.5,
    thinking_probability: 0.12,
    thinking_median_s: 2.5,
    thinking_sigma: 0.6,
    gap_median_s: 0.030,
    stream_sigma: 1.15,
    gap_sigma: 0.35,
    stall_probability: 0.01,
    stall_min_s: 0.2,
    stall_shape: 1.5,
};

const CLASSIFIER: ClassModel = ClassModel {
    prefill_median_s: 0.06,
    prefill_sigma: 0.4,
    thinking_probability: 0.0,
    thinking_median_s: 0.06,
    thinking_sigma: 0.4,
    gap_median_s: 0.004,
    stream_sigma: 0.2,
    gap_sigma: 0.3,
    stall_probability: 0.0,
    stall_min_s: 0.2,
    stall_shape: 1.5,
};

impl ClassModel {
    fn for_class(model_class: &str) -> &'static ClassModel {
        match model_class {
            "classifier" => &CLASSIFIER,
            _ => &LLM,
        }
    }
}

/// Draws when each of `tokens` tokens is produced, for a stream seeded with `seed`.
///
/// A pure function: the same arguments always give the same plan. See the module docs for
/// the distributions.
pub fn latency_plan(seed: u64, tokens: u32, model_class: &str) -> LatencyPlan {
    let model = ClassModel::for_class(model_class);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);

    let first_token = if rng.random_bool(model.thinking_probability) {
        log_normal(&mut rng, model.thinking_median_s, model.thinking_sigma)
    } else {
        log_normal(&mut rng, model.prefill_median_s, model.prefill_sigma)
    };
    let slowdown = log_normal(&mut rng, 1.0, model.stream_sigma).min(MAX_SLOWDOWN);

    let gaps = (1..tokens)
        .map(|_| {
            let gap = if model.stall_probability > 0.0 && rng.random_bool(model.stall_probability) {
                pareto(&mut rng, model.stall_min_s, model.stall_shape)
            } else {
                model.gap_median_s * slowdown * log_normal(&mut rng, 1.0, model.gap_sigma)
            };
            seconds(gap, MAX_TOKEN_GAP)
        })
        .collect();

    LatencyPlan {
        first_token: seconds(first_token, MAX_FIRST_TOKEN),
        gaps,
    }
}

fn log_normal(rng: &mut ChaCha8Rng, median: f64, sigma: f64) -> f64 {
    // The parameters are constants above, all finite with sigma >= 0, so construction
    // cannot fail; fall back to the median rather than panic all the same.
    LogNormal::new(median.ln(), sigma).map_or(median, |d| d.sample(rng))
}

fn pareto(rng: &mut ChaCha8Rng, scale: f64, shape: f64) -> f64 {
    Pareto::new(scale, shape).map_or(scale, |d| d.sample(rng))
}

fn seconds(value: f64, cap: Duration) -> Duration {
    Duration::try_from_secs_f64(value).map_or(cap, |d| d.min(cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEEDS: u64 = 2000;

    fn totals(tokens: u32, class: &str) -> Vec<Duration> {
        let mut totals: Vec<Duration> = (0..SEEDS)
            .map(|seed| latency_plan(seed, tokens, class).total())
            .collect();
        totals.sort();
        totals
    }

    #[test]
    fn llm_median_is_about_three_seconds() {
        let totals = totals(64, "llm");
        let median = totals[totals.len() / 2];
        assert!(
            (Duration::from_secs(2)..=Duration::from_secs(4)).contains(&median),
            "median total {median:?}"
        );
    }

    #[test]
    fn llm_about_five_percent_run_past_fifteen_seconds() {
        let totals = totals(64, "llm");
        let long = totals
            .iter()
            .filter(|t| **t > Duration::from_secs(15))
            .count();
        let fraction = long as f64 / totals.len() as f64;
        assert!(
            (0.03..=0.08).contains(&fraction),
            "fraction past 15 s: {fraction}"
        );
    }

    #[test]
    fn llm_tail_is_bounded() {
        let totals = totals(64, "llm");
        let longest = totals[totals.len() - 1];
        assert!(
            longest < Duration::from_secs(60),
            "longest total {longest:?}"
        );
    }

    #[test]
    fn llm_first_token_sometimes_takes_many_seconds() {
        let firsts: Vec<Duration> = (0..SEEDS)
            .map(|seed| latency_plan(seed, 64, "llm").first_token)
            .collect();
        let slow = firsts
            .iter()
            .filter(|d| **d > Duration::from_secs(5))
            .count();
        assert!(slow > 0, "no first token past 5 s in {SEEDS} seeds");
        assert!(slow < SEEDS as usize / 10, "{slow} first tokens past 5 s");
        assert!(firsts.iter().all(|d| *d <= MAX_FIRST_TOKEN));
    }

    #[test]
    fn plan_is_deterministic_per_seed() {
        assert_eq!(latency_plan(7, 64, "llm"), latency_plan(7, 64, "llm"));
        assert_ne!(latency_plan(7, 64, "llm"), latency_plan(8, 64, "llm"));
    }

    #[test]
    fn plan_has_one_gap_fewer_than_tokens() {
        assert_eq!(latency_plan(1, 64, "llm").gaps.len(), 63);
        assert_eq!(latency_plan(1, 1, "llm").gaps.len(), 0);
        assert_eq!(latency_plan(1, 0, "llm").gaps.len(), 0);
    }

    #[test]
    fn classifier_is_fast() {
        let totals = totals(8, "classifier");
        assert!(totals[totals.len() - 1] < Duration::from_secs(1));
    }

    #[test]
    fn unknown_class_uses_llm_model() {
        assert_eq!(latency_plan(3, 16, "llm-large"), latency_plan(3, 16, "llm"));
        assert_eq!(latency_plan(3, 16, ""), latency_plan(3, 16, "llm"));
    }

    #[test]
    fn delay_before_indexes_first_token_then_gaps() {
        let plan = latency_plan(5, 4, "llm");
        assert_eq!(plan.delay_before(0), plan.first_token);
        assert_eq!(plan.delay_before(1), plan.gaps[0]);
        assert_eq!(plan.delay_before(3), plan.gaps[2]);
        assert_eq!(plan.delay_before(4), Duration::ZERO);
    }
}
