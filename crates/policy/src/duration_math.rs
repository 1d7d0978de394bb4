//! Duration arithmetic that saturates instead of panicking (`Duration::from_secs_f64` and
//! `Duration::mul_f64` panic on NaN, negative or huge values).

use std::time::Duration;

/// `secs` seconds: NaN and negatives give zero, values past `Duration::MAX` give
/// `Duration::MAX`.
pub(crate) fn from_secs(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        Duration::ZERO
    } else {
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
    }
}

/// `d × factor`, rounded to the nanosecond, saturating like [`from_secs`].
pub(crate) fn scale(d: Duration, factor: f64) -> Duration {
    let nanos = (d.as_nanos() as f64 * factor).round();
    if nanos.is_nan() || nanos <= 0.0 {
        Duration::ZERO
    } else if nanos < u64::MAX as f64 {
        // Exact below ~584 years, which covers every timeout worth having.
        Duration::from_nanos(nanos as u64)
    } else {
        from_secs(nanos / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saturates() {
        assert_eq!(from_secs(f64::NAN), Duration::ZERO);
        assert_eq!(from_secs(-1.0), Duration::ZERO);
        assert_eq!(from_secs(f64::INFINITY), Duration::MAX);
        assert_eq!(from_secs(1e30), Duration::MAX);
        assert_eq!(scale(Duration::MAX, 2.0), Duration::MAX);
        assert_eq!(scale(Duration::from_secs(1), f64::NAN), Duration::ZERO);
        assert_eq!(scale(Duration::from_secs(1), -1.0), Duration::ZERO);
    }

    #[test]
    fn scales_exactly_at_millisecond_grain() {
        assert_eq!(
            scale(Duration::from_millis(300), 1.5),
            Duration::from_millis(450)
        );
        assert_eq!(
            scale(Duration::from_millis(1200), 1.5),
            Duration::from_millis(1800)
        );
    }
}
