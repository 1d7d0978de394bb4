//! Exponential back-off with full jitter, and server pushback (`grpc-retry-pushback-ms`).
//!
//! ## Back-off
//!
//! ```text
//! ceiling(n) = min(cap, base · multiplier^n)          n = 0 for the first retry
//! delay(n)   = uniform random in [0, ceiling(n)]      "full jitter"
//! ```
//!
//! This is gRFC A6's retry back-off ("the n-th attempt will occur at
//! random(0, min(initialBackoff·backoffMultiplier^(n−1), maxBackoff))") and AWS's "full
//! jitter" (`sleep = random(0, min(cap, base·2^attempt))`) with a configurable multiplier.
//! Full jitter spreads the retries of many calls that failed together across the whole
//! interval, so they do not come back as a synchronized wave. The RNG is the caller's, so
//! tests and simulations seed it and get the same delays every run.
//!
//! ## Pushback
//!
//! gRFC A6 "Pushback": a server may answer with `grpc-retry-pushback-ms`, "an ASCII encoded
//! signed 32-bit integer ... If the value for pushback is negative or unparseable, then it will
//! be seen as the server asking the client not to retry at all." [`Pushback::parse`] applies
//! that literally: a missing header is [`Pushback::Absent`]; a value of optional `-` then
//! ASCII digits within `i32` is a delay (when non-negative); anything else (empty, `+`,
//! spaces, too large, several values) is [`Pushback::DoNotRetry`]. Leading zeros are accepted,
//! as gRPC Java and Go accept them.

use std::time::Duration;

use rand::Rng;

use crate::duration_math::scale;
use crate::error::{check_nonzero, check_number};
use crate::PolicyError;

/// The pushback metadata key (gRFC A6).
pub const GRPC_RETRY_PUSHBACK_MS: &str = "grpc-retry-pushback-ms";

/// Exponential back-off with full jitter; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    multiplier: f64,
}

impl Backoff {
    /// Back-off from `base`, growing by `multiplier` per step, never above `cap`. Refused
    /// unless `base` and `cap` are above zero and `multiplier` is finite and in `(0, 1000]`
    /// (gRFC A6 requires all three to be positive).
    pub fn new(base: Duration, cap: Duration, multiplier: f64) -> Result<Self, PolicyError> {
        check_nonzero("backoff.base", base)?;
        check_nonzero("backoff.cap", cap)?;
        check_number(
            "backoff.multiplier",
            "(0, 1000]",
            multiplier,
            0.0,
            true,
            1000.0,
        )?;
        Ok(Self {
            base,
            cap,
            multiplier,
        })
    }

    /// The largest delay of step `n`: `min(cap, base · multiplier^n)`.
    pub fn ceiling(&self, n: u32) -> Duration {
        // multiplier^n is finite, zero or +inf (never NaN); `scale` saturates +inf to
        // `Duration::MAX`, which the cap brings back.
        scale(self.base, self.multiplier.powf(f64::from(n))).min(self.cap)
    }

    /// A random delay for step `n`, uniform in `[0, ceiling(n)]`.
    pub fn delay<R: Rng + ?Sized>(&self, n: u32, rng: &mut R) -> Duration {
        let ceiling = u64::try_from(self.ceiling(n).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=ceiling))
    }
}

impl Default for Backoff {
    /// 100 ms doubling up to 10 s.
    fn default() -> Self {
        Self {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(10),
            multiplier: 2.0,
        }
    }
}

/// What the server said about retrying, from `grpc-retry-pushback-ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushback {
    /// No pushback header: the retry policy decides.
    Absent,
    /// Retry after exactly this delay (instead of the back-off), if otherwise allowed.
    RetryAfter(Duration),
    /// Do not retry this call at all.
    DoNotRetry,
}

impl Pushback {
    /// Interpret the header's value; `None` when the header was absent.
    pub fn parse(value: Option<&[u8]>) -> Pushback {
        match value {
            None => Pushback::Absent,
            Some(v) => match parse_i32(v) {
                Some(ms) if ms >= 0 => {
                    Pushback::RetryAfter(Duration::from_millis(u64::from(ms.unsigned_abs())))
                }
                _ => Pushback::DoNotRetry,
            },
        }
    }

    /// Interpret every value the header had: none is [`Pushback::Absent`], one is parsed,
    /// several are unparseable and so [`Pushback::DoNotRetry`].
    pub fn from_values<'a>(mut values: impl Iterator<Item = &'a [u8]>) -> Pushback {
        match (values.next(), values.next()) {
            (None, _) => Pushback::Absent,
            (Some(v), None) => Pushback::parse(Some(v)),
            (Some(_), Some(_)) => Pushback::DoNotRetry,
        }
    }
}

/// Optional `-`, then 1–10 ASCII digits, within `i32`.
fn parse_i32(v: &[u8]) -> Option<i32> {
    let (negative, digits) = match v.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, v),
    };
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let magnitude = digits
        .iter()
        .fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
    i32::try_from(if negative { -magnitude } else { magnitude }).ok()
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

    #[test]
    fn ceilings_grow_then_cap() {
        let b = Backoff::default();
        let got: Vec<_> = (0..10).map(|n| b.ceiling(n)).collect();
        let want = [
            100, 200, 400, 800, 1_600, 3_200, 6_400, 10_000, 10_000, 10_000,
        ]
        .map(ms);
        assert_eq!(got, want);
        assert_eq!(b.ceiling(u32::MAX), ms(10_000));
        let shrinking = Backoff::new(ms(100), ms(100), 0.5).expect("valid");
        assert_eq!(shrinking.ceiling(1), ms(50));
        assert_eq!(shrinking.ceiling(u32::MAX), Duration::ZERO);
    }

    #[test]
    fn delays_are_seeded_and_reproducible() {
        let b = Backoff::default();
        let run = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..8).map(|n| b.delay(n, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn full_jitter_covers_the_interval() {
        let b = Backoff::default();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let samples: Vec<_> = (0..10_000).map(|_| b.delay(3, &mut rng)).collect();
        let mean = samples.iter().map(Duration::as_secs_f64).sum::<f64>() / 10_000.0;
        // Uniform on [0, 800 ms]: mean 400 ms.
        assert!((mean - 0.4).abs() < 0.01, "{mean}");
        assert!(samples.iter().any(|d| *d < ms(40)));
        assert!(samples.iter().any(|d| *d > ms(760)));
    }

    #[test]
    fn refuses_bad_settings() {
        assert!(Backoff::new(Duration::ZERO, ms(1), 2.0).is_err());
        assert!(Backoff::new(ms(1), Duration::ZERO, 2.0).is_err());
        for m in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(Backoff::new(ms(1), ms(1), m).is_err(), "{m}");
        }
    }

    #[test]
    fn pushback_parsing() {
        let cases: [(Option<&[u8]>, Pushback); 14] = [
            (None, Pushback::Absent),
            (Some(b"0"), Pushback::RetryAfter(ms(0))),
            (Some(b"250"), Pushback::RetryAfter(ms(250))),
            (Some(b"007"), Pushback::RetryAfter(ms(7))),
            (Some(b"2147483647"), Pushback::RetryAfter(ms(2_147_483_647))),
            (Some(b"-0"), Pushback::RetryAfter(ms(0))),
            (Some(b"-1"), Pushback::DoNotRetry),
            (Some(b"-2147483648"), Pushback::DoNotRetry),
            (Some(b"2147483648"), Pushback::DoNotRetry),
            (Some(b""), Pushback::DoNotRetry),
            (Some(b"+5"), Pushback::DoNotRetry),
            (Some(b" 5"), Pushback::DoNotRetry),
            (Some(b"5ms"), Pushback::DoNotRetry),
            (Some(b"99999999999999999999"), Pushback::DoNotRetry),
        ];
        for (v, want) in cases {
            assert_eq!(
                Pushback::parse(v),
                want,
                "{:?}",
                v.map(String::from_utf8_lossy)
            );
        }
    }

    #[test]
    fn pushback_from_header_values() {
        let none: [&[u8]; 0] = [];
        assert_eq!(Pushback::from_values(none.into_iter()), Pushback::Absent);
        assert_eq!(
            Pushback::from_values([&b"10"[..]].into_iter()),
            Pushback::RetryAfter(ms(10))
        );
        assert_eq!(
            Pushback::from_values([&b"10"[..], &b"10"[..]].into_iter()),
            Pushback::DoNotRetry
        );
    }

    proptest! {
        #[test]
        fn delay_never_exceeds_its_ceiling(
            base in 1u64..10_000, cap in 1u64..100_000, mult in 0.01f64..100.0, n in 0u32..200, seed: u64,
        ) {
            let b = Backoff::new(ms(base), ms(cap), mult).expect("valid");
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let d = b.delay(n, &mut rng);
            prop_assert!(d <= b.ceiling(n));
            prop_assert!(b.ceiling(n) <= ms(cap));
        }

        #[test]
        fn pushback_round_trips_every_i32(v: i32) {
            let want = if v < 0 {
                Pushback::DoNotRetry
            } else {
                Pushback::RetryAfter(ms(v as u64))
            };
            prop_assert_eq!(Pushback::parse(Some(v.to_string().as_bytes())), want);
        }

        #[test]
        fn pushback_never_panics(bytes: Vec<u8>) {
            let _ = Pushback::parse(Some(&bytes));
        }
    }
}
