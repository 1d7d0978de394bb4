//! The `grpc-timeout` header.
//!
//! PROTOCOL-HTTP2: `Timeout → "grpc-timeout" TimeoutValue TimeoutUnit`, where TimeoutValue is
//! "positive integer as ASCII string of at most 8 digits" and TimeoutUnit one of `H` hours,
//! `M` minutes, `S` seconds, `m` milliseconds, `u` microseconds, `n` nanoseconds.

use std::time::Duration;

/// Largest TimeoutValue: eight digits.
const MAX_VALUE: u64 = 99_999_999;

/// Units from finest to coarsest, with their length in nanoseconds.
const UNITS: [(u8, u64); 6] = [
    (b'n', 1),
    (b'u', 1_000),
    (b'm', 1_000_000),
    (b'S', 1_000_000_000),
    (b'M', 60_000_000_000),
    (b'H', 3_600_000_000_000),
];

/// Why a `grpc-timeout` value is invalid.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TimeoutError {
    /// The value is empty.
    #[error("empty grpc-timeout")]
    Empty,
    /// The last byte is not one of `H M S m u n`.
    #[error("invalid grpc-timeout unit {0:#04x}")]
    InvalidUnit(u8),
    /// A unit with no digits before it.
    #[error("grpc-timeout has no digits")]
    NoDigits,
    /// More than 8 digits.
    #[error("grpc-timeout has {count} digits, at most 8 are allowed")]
    TooManyDigits {
        /// Characters before the unit.
        count: usize,
    },
    /// A byte before the unit that is not an ASCII digit (sign, space, …).
    #[error("invalid byte {0:#04x} in grpc-timeout")]
    InvalidDigit(u8),
}

/// Parse `grpc-timeout`: 1–8 ASCII digits, then one unit of `H M S m u n`. Nothing else is
/// accepted: no sign, no whitespace, no other unit.
pub fn parse(v: &[u8]) -> Result<Duration, TimeoutError> {
    let Some((&unit, digits)) = v.split_last() else {
        return Err(TimeoutError::Empty);
    };
    let Some(&(_, unit_nanos)) = UNITS.iter().find(|(u, _)| *u == unit) else {
        return Err(TimeoutError::InvalidUnit(unit));
    };
    if digits.is_empty() {
        return Err(TimeoutError::NoDigits);
    }
    if digits.len() > 8 {
        return Err(TimeoutError::TooManyDigits {
            count: digits.len(),
        });
    }
    let mut value = 0u64;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(TimeoutError::InvalidDigit(d));
        }
        value = value * 10 + u64::from(d - b'0');
    }
    // At most 99_999_999 hours: about 3.6e20 ns, beyond u64 nanoseconds, so build from
    // seconds and sub-second nanoseconds.
    const NANOS_PER_SEC: u64 = 1_000_000_000;
    Ok(if unit_nanos >= NANOS_PER_SEC {
        Duration::from_secs(value * (unit_nanos / NANOS_PER_SEC))
    } else {
        Duration::from_nanos(value * unit_nanos)
    })
}

/// Encode a `grpc-timeout` with at most 8 digits, in the finest unit that fits, rounding up
/// to that unit so the receiver never gets a shorter deadline than the caller asked for
/// (`Duration::ZERO` is `"0n"`).
///
/// Durations above `99999999H` (about 11,400 years) cannot be expressed and are clamped to
/// `"99999999H"`, the longest timeout there is.
pub fn encode(d: Duration) -> String {
    let nanos = d.as_nanos();
    for (unit, unit_nanos) in UNITS {
        let value = nanos.div_ceil(u128::from(unit_nanos));
        if value <= u128::from(MAX_VALUE) {
            return format!("{value}{}", char::from(unit));
        }
    }
    format!("{MAX_VALUE}H")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_examples_parse() {
        assert_eq!(parse(b"1H"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse(b"8M"), Ok(Duration::from_secs(480)));
        assert_eq!(parse(b"99999999n"), Ok(Duration::from_nanos(99_999_999)));
        assert_eq!(parse(b"30S"), Ok(Duration::from_secs(30)));
        assert_eq!(parse(b"250m"), Ok(Duration::from_millis(250)));
        assert_eq!(parse(b"7u"), Ok(Duration::from_micros(7)));
        assert_eq!(parse(b"0n"), Ok(Duration::ZERO));
        assert_eq!(parse(b"00000001S"), Ok(Duration::from_secs(1)));
        assert_eq!(
            parse(b"99999999H"),
            Ok(Duration::from_secs(99_999_999 * 3600))
        );
    }

    #[test]
    fn spec_examples_rejected() {
        assert_eq!(parse(b""), Err(TimeoutError::Empty));
        assert_eq!(
            parse(b"123456789S"),
            Err(TimeoutError::TooManyDigits { count: 9 })
        );
        assert_eq!(parse(b"1x"), Err(TimeoutError::InvalidUnit(b'x')));
        assert_eq!(parse(b"-1S"), Err(TimeoutError::InvalidDigit(b'-')));
        assert_eq!(parse(b"1 S"), Err(TimeoutError::InvalidDigit(b' ')));
        assert_eq!(parse(b"S"), Err(TimeoutError::NoDigits));
        assert_eq!(parse(b"+1S"), Err(TimeoutError::InvalidDigit(b'+')));
        assert_eq!(parse(b"1S "), Err(TimeoutError::InvalidUnit(b' ')));
        assert_eq!(parse(b"1s"), Err(TimeoutError::InvalidUnit(b's')));
        assert_eq!(parse(b"1h"), Err(TimeoutError::InvalidUnit(b'h')));
        assert_eq!(parse(b"10"), Err(TimeoutError::InvalidUnit(b'0')));
        assert_eq!(
            parse("١S".as_bytes()),
            Err(TimeoutError::InvalidDigit(0xd9))
        );
    }

    #[test]
    fn encode_picks_finest_unit() {
        assert_eq!(encode(Duration::ZERO), "0n");
        assert_eq!(encode(Duration::from_nanos(99_999_999)), "99999999n");
        assert_eq!(encode(Duration::from_nanos(100_000_000)), "100000u");
        assert_eq!(encode(Duration::from_secs(1)), "1000000u");
        assert_eq!(encode(Duration::from_secs(100)), "100000m");
        assert_eq!(encode(Duration::from_secs(100_000)), "100000S");
        assert_eq!(encode(Duration::from_secs(100_000_000)), "1666667M");
        assert_eq!(encode(Duration::from_secs(99_999_999 * 3600)), "99999999H");
    }

    #[test]
    fn encode_rounds_up() {
        // 1000000.001 us: rounding down would shorten the deadline by a nanosecond.
        assert_eq!(encode(Duration::from_nanos(1_000_000_001)), "1000001u");
        assert_eq!(encode(Duration::new(100_000, 1)), "100001S");
    }

    #[test]
    fn encode_clamps_beyond_the_largest_timeout() {
        assert_eq!(encode(Duration::MAX), "99999999H");
        assert_eq!(
            encode(Duration::from_secs(99_999_999 * 3600 + 1)),
            "99999999H"
        );
    }
}
