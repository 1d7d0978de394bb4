//! Adaptive header-read timeout: how long a new connection may take to deliver its request
//! headers.
//!
//! A fixed header timeout is wrong both ways: generous, it lets slow-loris clients pin sockets
//! when the instance is busy; tight, it cuts off honest clients on slow links. This one shrinks
//! as load (QPS) rises, so under pressure slow clients are shed first, and grows as the observed
//! header round trip (RT) rises, so a network that got slower for everyone is not mistaken for
//! abuse.
//!
//! ## Formula
//!
//! With `q` the recent requests per second and `r` the recent mean header-read time:
//!
//! ```text
//! raw(q, r)    = (base + rt_factor · r) / (1 + q / qps_half)
//! target(q, r) = clamp(raw(q, r), min, max)
//!
//! T₀ = clamp(base, min, max)                     before any update
//! T₁ = target(q₁, r₁)                            the first update seeds the average
//! Tₖ = Tₖ₋₁ + αₖ · (target(qₖ, rₖ) − Tₖ₋₁)       αₖ = 1 − exp(−Δtₖ / smoothing)
//! ```
//!
//! `qps_half` is the load at which the timeout is half of what it is when idle. The average is a
//! time-based EWMA: `Δtₖ` is the time since the previous update, so irregular update intervals
//! weigh correctly, two updates at the same instant change nothing, and after `smoothing` of a
//! constant load the timeout has moved 63 % of the way to its new target. `raw` is
//! non-increasing in `q` and non-decreasing in `r`, and `clamp` preserves both, so the timeout
//! never rises with load nor falls with RT. NaN or negative QPS counts as 0 and infinite QPS as
//! overload, so the output is always a finite duration in `[min, max]`.
//!
//! [`LoadMeter`] turns per-request observations into the `(q, r)` pair at each update tick.

use std::time::{Duration, Instant};

use crate::duration_math::from_secs;
use crate::error::{check_nonzero, check_number};
use crate::PolicyError;

/// Settings for [`HeaderTimeout`].
#[derive(Clone, Debug, PartialEq)]
pub struct HeaderTimeoutConfig {
    /// Never shorter than this, however heavy the load. Default 1 s.
    pub min: Duration,
    /// Never longer than this, however slow the network. Default 30 s.
    pub max: Duration,
    /// The timeout with no load and instant headers, before clamping. Default 10 s.
    pub base: Duration,
    /// How many observed header round trips to allow on top of `base`. Default 4.
    pub rt_factor: f64,
    /// Requests per second at which the timeout halves. Default 2000.
    pub qps_half: f64,
    /// Time constant of the moving average; zero disables smoothing. Default 10 s.
    pub smoothing: Duration,
}

impl Default for HeaderTimeoutConfig {
    fn default() -> Self {
        Self {
            min: Duration::from_secs(1),
            max: Duration::from_secs(30),
            base: Duration::from_secs(10),
            rt_factor: 4.0,
            qps_half: 2000.0,
            smoothing: Duration::from_secs(10),
        }
    }
}

/// Recent load, as the timeout sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Load {
    /// Requests per second.
    pub qps: f64,
    /// Mean time clients took to deliver their request headers.
    pub header_rt: Duration,
}

/// The adaptive header-read timeout: a smoothed [`target`](HeaderTimeout::target).
#[derive(Clone, Debug)]
pub struct HeaderTimeout {
    config: HeaderTimeoutConfig,
    /// Current smoothed value, in seconds; always within `[min, max]`.
    current: f64,
    last_update: Option<Instant>,
}

impl HeaderTimeout {
    /// A timeout starting at `clamp(base, min, max)`.
    pub fn new(config: HeaderTimeoutConfig) -> Result<Self, PolicyError> {
        check_nonzero("header_timeout.min", config.min)?;
        if config.min > config.max {
            return Err(PolicyError::MinAboveMax {
                min_field: "header_timeout.min",
                min: config.min,
                max_field: "header_timeout.max",
                max: config.max,
            });
        }
        check_number(
            "header_timeout.rt_factor",
            "[0, 1e6]",
            config.rt_factor,
            0.0,
            false,
            1e6,
        )?;
        check_number(
            "header_timeout.qps_half",
            "(0, 1e12]",
            config.qps_half,
            0.0,
            true,
            1e12,
        )?;
        let current = config.base.clamp(config.min, config.max).as_secs_f64();
        Ok(Self {
            config,
            current,
            last_update: None,
        })
    }

    /// The unsmoothed timeout for this load: `clamp((base + rt_factor·r) / (1 + q/qps_half))`.
    pub fn target(&self, load: Load) -> Duration {
        from_secs(self.target_secs(load))
    }

    fn target_secs(&self, load: Load) -> f64 {
        let c = &self.config;
        // NaN and negative rates mean "no evidence of load"; infinity is overload and drives the
        // raw value to zero, which the clamp lifts to `min`.
        let qps = if load.qps > 0.0 { load.qps } else { 0.0 };
        let numerator = c.base.as_secs_f64() + c.rt_factor * load.header_rt.as_secs_f64();
        let raw = numerator / (1.0 + qps / c.qps_half);
        let raw = if raw.is_nan() { 0.0 } else { raw };
        raw.clamp(c.min.as_secs_f64(), c.max.as_secs_f64())
    }

    /// Fold one load sample observed at `now` into the average and return the new timeout.
    /// A `now` earlier than the previous update counts as no time elapsed.
    pub fn update(&mut self, now: Instant, load: Load) -> Duration {
        let target = self.target_secs(load);
        let alpha = match self.last_update {
            None => 1.0,
            Some(last) => {
                let tau = self.config.smoothing.as_secs_f64();
                let dt = now.saturating_duration_since(last).as_secs_f64();
                if tau == 0.0 {
                    1.0
                } else {
                    1.0 - (-dt / tau).exp()
                }
            }
        };
        self.current += alpha * (target - self.current);
        // Rounding must not step outside the bounds.
        self.current = self
            .current
            .clamp(self.config.min.as_secs_f64(), self.config.max.as_secs_f64());
        self.last_update = Some(match self.last_update {
            Some(last) if last > now => last,
            _ => now,
        });
        self.current()
    }

    /// The timeout to apply to a connection accepted now.
    pub fn current(&self) -> Duration {
        from_secs(self.current).clamp(self.config.min, self.config.max)
    }
}

/// Accumulates per-request header-read times between two update ticks.
///
/// Call [`record`](LoadMeter::record) for every request whose headers arrived, and
/// [`take`](LoadMeter::take) on each tick (e.g. once a second) to get the [`Load`] for
/// [`HeaderTimeout::update`].
#[derive(Clone, Debug)]
pub struct LoadMeter {
    since: Instant,
    requests: u64,
    rt_sum: Duration,
}

impl LoadMeter {
    /// A meter whose first interval starts at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            since: now,
            requests: 0,
            rt_sum: Duration::ZERO,
        }
    }

    /// One request whose headers took `header_rt` to arrive.
    pub fn record(&mut self, header_rt: Duration) {
        self.requests = self.requests.saturating_add(1);
        self.rt_sum = self.rt_sum.saturating_add(header_rt);
    }

    /// The load since the previous `take` (or `new`), and start a new interval at `now`.
    /// `None` when no time has passed; the interval then keeps accumulating.
    pub fn take(&mut self, now: Instant) -> Option<Load> {
        let elapsed = now.saturating_duration_since(self.since).as_secs_f64();
        if elapsed <= 0.0 {
            return None;
        }
        let header_rt = if self.requests == 0 {
            Duration::ZERO
        } else {
            from_secs(self.rt_sum.as_secs_f64() / self.requests as f64)
        };
        let load = Load {
            qps: self.requests as f64 / elapsed,
            header_rt,
        };
        *self = Self::new(now);
        Some(load)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn timeout() -> HeaderTimeout {
        HeaderTimeout::new(HeaderTimeoutConfig::default()).expect("defaults are valid")
    }

    fn load(qps: f64, rt_ms: u64) -> Load {
        Load {
            qps,
            header_rt: Duration::from_millis(rt_ms),
        }
    }

    #[test]
    fn formula_matches_the_documented_values() {
        let t = timeout();
        // Idle, instant headers: base.
        assert_eq!(t.target(load(0.0, 0)), Duration::from_secs(10));
        // qps_half halves it.
        assert_eq!(t.target(load(2000.0, 0)), Duration::from_secs(5));
        // 1 s of RT adds rt_factor seconds.
        assert_eq!(t.target(load(0.0, 1000)), Duration::from_secs(14));
        // Heavy load bottoms out at min, slow network tops out at max.
        assert_eq!(t.target(load(1e9, 0)), Duration::from_secs(1));
        assert_eq!(t.target(load(0.0, 60_000)), Duration::from_secs(30));
    }

    #[test]
    fn degenerate_inputs_give_finite_clamped_values() {
        let t = timeout();
        for qps in [
            0.0,
            -5.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE,
        ] {
            for rt in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX] {
                let d = t.target(Load { qps, header_rt: rt });
                assert!(
                    d >= Duration::from_secs(1) && d <= Duration::from_secs(30),
                    "{qps} {rt:?}"
                );
            }
        }
        assert_eq!(t.target(load(f64::NAN, 0)), t.target(load(0.0, 0)));
        assert_eq!(t.target(load(f64::INFINITY, 0)), Duration::from_secs(1));
    }

    #[test]
    fn zero_time_steps_do_not_produce_nan() {
        let mut t = timeout();
        let now = Instant::now();
        for _ in 0..10 {
            let d = t.update(now, load(0.0, 0));
            assert_eq!(d, Duration::from_secs(10));
        }
        let mut zero_smoothing = HeaderTimeout::new(HeaderTimeoutConfig {
            smoothing: Duration::ZERO,
            ..HeaderTimeoutConfig::default()
        })
        .expect("valid");
        zero_smoothing.update(now, load(0.0, 0));
        assert_eq!(
            zero_smoothing.update(now, load(2000.0, 0)),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn first_update_seeds_then_smoothing_converges() {
        let mut t = timeout();
        let start = Instant::now();
        assert_eq!(t.current(), Duration::from_secs(10));
        t.update(start, load(0.0, 0));
        let target = t.target(load(6000.0, 0)); // 10 / 4 = 2.5 s
        assert_eq!(target, Duration::from_millis(2500));
        let mut previous = t.current();
        for i in 1..=200u64 {
            let d = t.update(start + Duration::from_secs(i), load(6000.0, 0));
            // Moves monotonically toward the target, never past it.
            assert!(d <= previous && d >= target);
            previous = d;
        }
        let diff = previous.as_secs_f64() - target.as_secs_f64();
        assert!(diff.abs() < 1e-3, "{diff}");
    }

    #[test]
    fn one_step_moves_only_a_fraction_of_the_way() {
        let mut t = timeout();
        let start = Instant::now();
        t.update(start, load(0.0, 0)); // 10 s
        let d = t.update(start + Duration::from_secs(1), load(1e9, 0)); // target 1 s
                                                                        // α = 1 − e^(−0.1) ≈ 0.095: 10 − 0.095·9 ≈ 9.14 s.
        let expected = 10.0 - (1.0 - (-0.1f64).exp()) * 9.0;
        assert!((d.as_secs_f64() - expected).abs() < 1e-6, "{d:?}");
    }

    #[test]
    fn out_of_order_update_counts_as_no_time() {
        let mut t = timeout();
        let start = Instant::now() + Duration::from_secs(100);
        t.update(start, load(0.0, 0));
        let d = t.update(start - Duration::from_secs(50), load(1e9, 0));
        assert_eq!(d, Duration::from_secs(10));
    }

    #[test]
    fn rejects_bad_settings() {
        let bad = [
            HeaderTimeoutConfig {
                min: Duration::ZERO,
                ..HeaderTimeoutConfig::default()
            },
            HeaderTimeoutConfig {
                min: Duration::from_secs(40),
                ..HeaderTimeoutConfig::default()
            },
            HeaderTimeoutConfig {
                rt_factor: f64::NAN,
                ..HeaderTimeoutConfig::default()
            },
            HeaderTimeoutConfig {
                qps_half: 0.0,
                ..HeaderTimeoutConfig::default()
            },
        ];
        for config in bad {
            assert!(HeaderTimeout::new(config.clone()).is_err(), "{config:?}");
        }
    }

    #[test]
    fn load_meter_reports_rate_and_mean() {
        let start = Instant::now();
        let mut m = LoadMeter::new(start);
        assert_eq!(m.take(start), None);
        for ms in [10, 20, 30, 40] {
            m.record(Duration::from_millis(ms));
        }
        let l = m.take(start + Duration::from_secs(2)).expect("time passed");
        assert_eq!(l.qps, 2.0);
        assert_eq!(l.header_rt, Duration::from_millis(25));
        let l = m.take(start + Duration::from_secs(3)).expect("time passed");
        assert_eq!(l, load(0.0, 0));
    }

    proptest! {
        #[test]
        fn non_increasing_in_qps(q1 in 0.0f64..1e7, dq in 0.0f64..1e7, rt in 0u64..100_000) {
            let t = timeout();
            prop_assert!(t.target(load(q1 + dq, rt)) <= t.target(load(q1, rt)));
        }

        #[test]
        fn non_decreasing_in_rt(q in 0.0f64..1e7, r1 in 0u64..100_000, dr in 0u64..100_000) {
            let t = timeout();
            prop_assert!(t.target(load(q, r1 + dr)) >= t.target(load(q, r1)));
        }

        #[test]
        fn smoothed_value_stays_clamped(
            steps in proptest::collection::vec((0u64..5_000, -1e3f64..1e8, 0u64..1_000_000), 1..50),
        ) {
            let mut t = timeout();
            let mut now = Instant::now();
            for (dt_ms, qps, rt_ms) in steps {
                now += Duration::from_millis(dt_ms);
                let d = t.update(now, load(qps, rt_ms));
                prop_assert!(d >= Duration::from_secs(1) && d <= Duration::from_secs(30));
            }
        }
    }
}
