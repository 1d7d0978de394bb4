//! Why a policy refused its settings.

use std::time::Duration;

/// A setting that cannot work. Every variant names the setting, e.g. `"retry.max_attempts"`, so
/// the config layer can point at the offending key.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// A duration that must be above zero is zero.
    #[error("{field} must be greater than zero")]
    ZeroDuration {
        /// The setting.
        field: &'static str,
    },
    /// A lower bound above its upper bound.
    #[error("{min_field} ({min:?}) must not exceed {max_field} ({max:?})")]
    MinAboveMax {
        /// The lower-bound setting.
        min_field: &'static str,
        /// Its value.
        min: Duration,
        /// The upper-bound setting.
        max_field: &'static str,
        /// Its value.
        max: Duration,
    },
    /// A real number outside its range (NaN and infinities included).
    #[error("{field} must be in {range}, got {value}")]
    NumberOutOfRange {
        /// The setting.
        field: &'static str,
        /// The accepted range, as text.
        range: &'static str,
        /// The refused value.
        value: f64,
    },
    /// A count outside its range.
    #[error("{field} must be in {range}, got {value}")]
    CountOutOfRange {
        /// The setting.
        field: &'static str,
        /// The accepted range, as text.
        range: &'static str,
        /// The refused value.
        value: u64,
    },
    /// A retry policy with no retryable status codes (gRFC A6 requires at least one).
    #[error("retry.retryable_codes must not be empty")]
    NoRetryableCodes,
    /// `OK` listed among the retryable codes.
    #[error("retry.retryable_codes must not contain OK")]
    OkIsRetryable,
    /// A name listed twice in a lookup table.
    #[error("{table} lists {name:?} twice")]
    DuplicateName {
        /// The table.
        table: &'static str,
        /// The repeated name.
        name: String,
    },
}

/// `Ok` when `value` is a finite number with `low <= value` (or `low < value` when
/// `exclusive_low`) and `value <= high`.
pub(crate) fn check_number(
    field: &'static str,
    range: &'static str,
    value: f64,
    low: f64,
    exclusive_low: bool,
    high: f64,
) -> Result<(), PolicyError> {
    let above_low = if exclusive_low {
        value > low
    } else {
        value >= low
    };
    if value.is_finite() && above_low && value <= high {
        Ok(())
    } else {
        Err(PolicyError::NumberOutOfRange {
            field,
            range,
            value,
        })
    }
}

/// `Ok` when `value` is not zero.
pub(crate) fn check_nonzero(field: &'static str, value: Duration) -> Result<(), PolicyError> {
    if value.is_zero() {
        Err(PolicyError::ZeroDuration { field })
    } else {
        Ok(())
    }
}
