//! Time-to-first-message budgets: how long a call may wait for its first response message.
//!
//! The budget depends on what is behind the method (its *model class*: a classifier answers in
//! milliseconds, an LLM thinks before its first token) and on the caller's *SLA tier*, which
//! scales it:
//!
//! ```text
//! budget(class, tier) = class_budget(class) × tier_multiplier(tier)
//! class_budget(c)     = the table entry for c, else the fallback budget
//! tier_multiplier(t)  = the table entry for t, else the fallback multiplier
//! ```
//!
//! Names match ASCII case-insensitively. A multiplier above 1 means more patience (the proxy
//! waits longer before failing the call), below 1 less. The product saturates at
//! `Duration::MAX` instead of overflowing.
//!
//! Defaults ([`FirstMessageTable::default`]):
//!
//! | model class | budget  |   | SLA tier   | multiplier |
//! |-------------|---------|---|------------|------------|
//! | classifier  | 300 ms  |   | standard   | × 1.0      |
//! | llm         | 1200 ms |   | batch      | × 1.5      |
//! | (other)     | 1200 ms |   | (other)    | × 1.0      |
//!
//! The fallback class budget is the longest default so that an unlisted model is never cut off
//! sooner than a known one. Reasoning models that think for seconds before the first token
//! need their own, longer class: 1.2 s is a budget for a chat model, not for "thinking".
//!
//! [`crate::idle::FirstMessageClock`] enforces the budget.

use std::time::Duration;

use crate::duration_math::scale;
use crate::error::{check_nonzero, check_number};
use crate::PolicyError;

/// A validated SLA-tier multiplier: finite and in `(0, 1000]`.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct TierMultiplier(f64);

impl TierMultiplier {
    /// The neutral multiplier.
    pub const ONE: TierMultiplier = TierMultiplier(1.0);

    /// A multiplier, refused unless finite and in `(0, 1000]`.
    pub fn new(value: f64) -> Result<Self, PolicyError> {
        check_number(
            "first_message.tier_multiplier",
            "(0, 1000]",
            value,
            0.0,
            true,
            1000.0,
        )?;
        Ok(Self(value))
    }

    /// The factor.
    pub fn get(self) -> f64 {
        self.0
    }
}

/// Budgets per model class, multipliers per SLA tier, and the fallbacks for names not listed.
#[derive(Clone, Debug, PartialEq)]
pub struct FirstMessageTable {
    classes: Vec<(String, Duration)>,
    tiers: Vec<(String, TierMultiplier)>,
    fallback_budget: Duration,
    fallback_multiplier: TierMultiplier,
}

impl FirstMessageTable {
    /// An empty table: every call gets `fallback_budget × fallback_multiplier`.
    pub fn new(
        fallback_budget: Duration,
        fallback_multiplier: TierMultiplier,
    ) -> Result<Self, PolicyError> {
        check_nonzero("first_message.fallback_budget", fallback_budget)?;
        Ok(Self {
            classes: Vec::new(),
            tiers: Vec::new(),
            fallback_budget,
            fallback_multiplier,
        })
    }

    /// Add a model class with its budget. A zero budget or a name already listed is refused.
    pub fn with_class(
        mut self,
        name: impl Into<String>,
        budget: Duration,
    ) -> Result<Self, PolicyError> {
        let name = name.into();
        check_nonzero("first_message.class_budget", budget)?;
        if find(&self.classes, &name).is_some() {
            return Err(PolicyError::DuplicateName {
                table: "first_message.classes",
                name,
            });
        }
        self.classes.push((name, budget));
        Ok(self)
    }

    /// Add an SLA tier with its multiplier. A name already listed is refused.
    pub fn with_tier(
        mut self,
        name: impl Into<String>,
        multiplier: TierMultiplier,
    ) -> Result<Self, PolicyError> {
        let name = name.into();
        if find(&self.tiers, &name).is_some() {
            return Err(PolicyError::DuplicateName {
                table: "first_message.tiers",
                name,
            });
        }
        self.tiers.push((name, multiplier));
        Ok(self)
    }

    /// The budget of `class` (fallback when absent or unknown).
    pub fn class_budget(&self, class: Option<&str>) -> Duration {
        class
            .and_then(|c| find(&self.classes, c))
            .unwrap_or(self.fallback_budget)
    }

    /// The multiplier of `tier` (fallback when absent or unknown).
    pub fn tier_multiplier(&self, tier: Option<&str>) -> TierMultiplier {
        tier.and_then(|t| find(&self.tiers, t))
            .unwrap_or(self.fallback_multiplier)
    }

    /// The time-to-first-message budget for a call of this model class and SLA tier.
    pub fn budget(&self, class: Option<&str>, tier: Option<&str>) -> Duration {
        scale(self.class_budget(class), self.tier_multiplier(tier).get())
    }
}

impl Default for FirstMessageTable {
    fn default() -> Self {
        let llm = Duration::from_millis(1200);
        Self {
            classes: vec![
                ("classifier".to_owned(), Duration::from_millis(300)),
                ("llm".to_owned(), llm),
            ],
            tiers: vec![
                ("standard".to_owned(), TierMultiplier::ONE),
                ("batch".to_owned(), TierMultiplier(1.5)),
            ],
            fallback_budget: llm,
            fallback_multiplier: TierMultiplier::ONE,
        }
    }
}

fn find<T: Copy>(entries: &[(String, T)], name: &str) -> Option<T> {
    entries
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|&(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn default_table() {
        let t = FirstMessageTable::default();
        let ms = Duration::from_millis;
        let cases = [
            (Some("classifier"), Some("standard"), ms(300)),
            (Some("classifier"), Some("batch"), ms(450)),
            (Some("llm"), Some("standard"), ms(1200)),
            (Some("llm"), Some("batch"), ms(1800)),
            (Some("LLM"), Some("Batch"), ms(1800)),
            (Some("llm"), None, ms(1200)),
            (Some("llm"), Some("gold"), ms(1200)),
            (Some("speech"), Some("standard"), ms(1200)),
            (None, None, ms(1200)),
            (None, Some("batch"), ms(1800)),
        ];
        for (class, tier, want) in cases {
            assert_eq!(t.budget(class, tier), want, "{class:?} {tier:?}");
        }
    }

    #[test]
    fn custom_table_and_fallbacks() {
        let t = FirstMessageTable::new(Duration::from_secs(2), TierMultiplier::ONE)
            .and_then(|t| t.with_class("reasoning", Duration::from_secs(15)))
            .and_then(|t| t.with_tier("premium", TierMultiplier::new(0.5)?))
            .expect("valid table");
        assert_eq!(
            t.budget(Some("reasoning"), Some("premium")),
            Duration::from_millis(7500)
        );
        assert_eq!(t.budget(Some("other"), None), Duration::from_secs(2));
    }

    #[test]
    fn refuses_bad_entries() {
        let t = FirstMessageTable::default();
        assert!(matches!(
            t.clone().with_class("Classifier", Duration::from_secs(1)),
            Err(PolicyError::DuplicateName { .. })
        ));
        assert!(t.clone().with_class("x", Duration::ZERO).is_err());
        assert!(t.with_tier("standard", TierMultiplier::ONE).is_err());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1001.0] {
            assert!(TierMultiplier::new(bad).is_err(), "{bad}");
        }
        assert!(FirstMessageTable::new(Duration::ZERO, TierMultiplier::ONE).is_err());
    }

    #[test]
    fn huge_products_saturate() {
        let t = FirstMessageTable::new(Duration::MAX, TierMultiplier::ONE)
            .and_then(|t| t.with_tier("slow", TierMultiplier::new(1000.0)?))
            .expect("valid");
        assert_eq!(t.budget(None, Some("slow")), Duration::MAX);
    }

    proptest! {
        #[test]
        fn budget_is_monotonic_in_the_multiplier(ms in 1u64..1_000_000, a in 0.001f64..1000.0, b in 0.001f64..1000.0) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            let t = FirstMessageTable::new(Duration::from_millis(ms), TierMultiplier::ONE)
                .and_then(|t| t.with_tier("lo", TierMultiplier::new(lo)?))
                .and_then(|t| t.with_tier("hi", TierMultiplier::new(hi)?))
                .expect("valid");
            prop_assert!(t.budget(None, Some("lo")) <= t.budget(None, Some("hi")));
        }
    }
}
