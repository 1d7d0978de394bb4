//! A streaming latency quantile (p95) over a sliding window of the most recent samples.
//!
//! The load shedder compares the p95 stream latency with the SLO; it needs an answer on every
//! call, cheaply, over recent traffic only. [`LatencyWindow`] keeps the last `capacity` samples
//! as bucket indices in a ring, plus a count per bucket:
//!
//! ```text
//! record(d):   evict the oldest sample's bucket count if full; count d's bucket
//! quantile(q): walk buckets from the fastest until ⌈q · n⌉ samples are covered;
//!              answer that bucket's upper bound
//! ```
//!
//! Buckets are log-linear over microseconds (as in HdrHistogram): values below 16 µs have their
//! own bucket; above that each power of two is split into 16 equal buckets. So an answer is
//! never below the true sample quantile and at most 1/16 = 6.25 % above it (plus 1 µs of
//! rounding), recording is O(1), a query walks at most [`BUCKETS`] counters and the window
//! never allocates after construction. Samples are capped at 2⁴⁰ µs (about 12.7 days).

use std::time::Duration;

use crate::PolicyError;

/// Exact buckets below this many microseconds, and sub-buckets per power of two above.
const SUB: u64 = 16;
/// log2(SUB).
const SUB_BITS: u32 = 4;
/// Largest recorded value, in microseconds.
const MAX_MICROS: u64 = (1 << 40) - 1;
/// Number of buckets: 16 exact ones, then 16 per power of two from 2⁴ to 2³⁹.
pub const BUCKETS: usize = (SUB + (40 - SUB_BITS as u64) * SUB) as usize;

/// The last `capacity` latency samples; see the module docs.
#[derive(Clone, Debug)]
pub struct LatencyWindow {
    ring: Vec<u16>,
    next: usize,
    len: usize,
    counts: Vec<u32>,
}

impl LatencyWindow {
    /// A window over the last `capacity` samples (1 to 1 000 000).
    pub fn new(capacity: usize) -> Result<Self, PolicyError> {
        if !(1..=1_000_000).contains(&capacity) {
            return Err(PolicyError::CountOutOfRange {
                field: "latency.window",
                range: "[1, 1000000]",
                value: capacity as u64,
            });
        }
        Ok(Self {
            ring: vec![0; capacity],
            next: 0,
            len: 0,
            counts: vec![0; BUCKETS],
        })
    }

    /// Add one sample, evicting the oldest when full.
    pub fn record(&mut self, latency: Duration) {
        let bucket = bucket_of(latency);
        if self.len == self.ring.len() {
            let old = usize::from(self.ring[self.next]);
            self.counts[old] -= 1;
        } else {
            self.len += 1;
        }
        self.ring[self.next] = bucket;
        self.counts[usize::from(bucket)] += 1;
        self.next = (self.next + 1) % self.ring.len();
    }

    /// Samples in the window.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no sample has been recorded.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `q`-quantile (`q` in `[0, 1]`, clamped; NaN counts as 1), rounded up to its bucket;
    /// `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.len == 0 {
            return None;
        }
        let q = if q.is_nan() { 1.0 } else { q.clamp(0.0, 1.0) };
        // The rank of the sample at quantile q, 1-based: ⌈q·n⌉, at least 1.
        let rank = ((q * self.len as f64).ceil() as u64).clamp(1, self.len as u64);
        let mut seen = 0u64;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += u64::from(count);
            if seen >= rank {
                return Some(Duration::from_micros(upper_bound(bucket)));
            }
        }
        // Unreachable while counts sum to len; answer the largest bucket rather than panic.
        Some(Duration::from_micros(MAX_MICROS))
    }

    /// The 95th percentile; `None` when empty.
    pub fn p95(&self) -> Option<Duration> {
        self.quantile(0.95)
    }
}

fn bucket_of(d: Duration) -> u16 {
    let us = u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .min(MAX_MICROS);
    let index = if us < SUB {
        us
    } else {
        let exp = 63 - u64::from(us.leading_zeros()); // ≥ SUB_BITS
        let shift = exp - u64::from(SUB_BITS);
        let sub = (us >> shift) - SUB; // 0..SUB
        SUB + shift * SUB + sub
    };
    // At most BUCKETS − 1 = 591.
    index as u16
}

/// The largest microsecond value that falls in `bucket`.
fn upper_bound(bucket: usize) -> u64 {
    let b = bucket as u64;
    if b < SUB {
        b
    } else {
        let shift = (b - SUB) / SUB;
        let sub = (b - SUB) % SUB;
        ((SUB + sub + 1) << shift) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn bucket_bounds_are_consistent() {
        let mut previous_upper = None;
        for b in 0..BUCKETS {
            let upper = upper_bound(b);
            assert_eq!(usize::from(bucket_of(us(upper))), b, "bucket {b}");
            if let Some(p) = previous_upper {
                assert_eq!(
                    usize::from(bucket_of(us(p + 1))),
                    b,
                    "bucket {b} lower edge"
                );
            }
            previous_upper = Some(upper);
        }
        assert_eq!(previous_upper, Some(MAX_MICROS));
        assert_eq!(usize::from(bucket_of(Duration::MAX)), BUCKETS - 1);
    }

    #[test]
    fn empty_and_single() {
        let mut w = LatencyWindow::new(10).expect("valid");
        assert_eq!(w.p95(), None);
        assert!(w.is_empty());
        w.record(us(7));
        assert_eq!(w.p95(), Some(us(7)));
        assert_eq!(w.quantile(0.0), Some(us(7)));
        assert_eq!(w.quantile(f64::NAN), Some(us(7)));
    }

    #[test]
    fn p95_of_a_uniform_ramp() {
        let mut w = LatencyWindow::new(1_000).expect("valid");
        for ms in 1..=1_000u64 {
            w.record(Duration::from_millis(ms));
        }
        let p95 = w.p95().expect("samples");
        assert!(p95 >= Duration::from_millis(950), "{p95:?}");
        assert!(
            p95 <= Duration::from_micros(950_000 + 950_000 / 16 + 1),
            "{p95:?}"
        );
    }

    #[test]
    fn window_forgets_old_samples() {
        let mut w = LatencyWindow::new(100).expect("valid");
        for _ in 0..100 {
            w.record(Duration::from_secs(10));
        }
        assert!(w.p95().expect("samples") >= Duration::from_secs(10));
        for _ in 0..100 {
            w.record(Duration::from_millis(1));
        }
        assert_eq!(w.len(), 100);
        assert!(w.p95().expect("samples") <= Duration::from_micros(1_063));
    }

    #[test]
    fn refuses_bad_capacity() {
        assert!(LatencyWindow::new(0).is_err());
        assert!(LatencyWindow::new(1_000_001).is_err());
    }

    proptest! {
        /// Against the exact quantile of the same window: never below, at most 6.25 % (+1 µs)
        /// above.
        #[test]
        fn matches_the_exact_quantile(
            capacity in 1usize..200,
            samples in proptest::collection::vec(0u64..10_000_000, 1..600),
            q in 0.0f64..=1.0,
        ) {
            let mut w = LatencyWindow::new(capacity).expect("valid");
            for &s in &samples {
                w.record(us(s));
            }
            let start = samples.len().saturating_sub(capacity);
            let mut recent = samples[start..].to_vec();
            recent.sort_unstable();
            let rank = ((q * recent.len() as f64).ceil() as usize).clamp(1, recent.len());
            let exact = recent[rank - 1];
            let got = w.quantile(q).expect("samples").as_micros() as u64;
            prop_assert!(got >= exact, "got {} exact {}", got, exact);
            prop_assert!(got <= exact + exact / 16 + 1, "got {} exact {}", got, exact);
        }
    }
}
