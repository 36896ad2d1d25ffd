//! Settings shared by the server and the participants, with their checks.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How participants take turns (the three orderings of DSSGD).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ordering {
    /// No coordination: downloads and uploads interleave freely.
    Asynchronous,
    /// Exclusive turns in a fixed cyclic order.
    RoundRobin,
    /// Exclusive turns, the next holder drawn at random.
    RandomOrder,
}

impl Ordering {
    /// Whether participants must hold a turn to upload.
    pub fn uses_turns(self) -> bool {
        !matches!(self, Ordering::Asynchronous)
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Ordering::Asynchronous => "asynchronous",
            Ordering::RoundRobin => "round-robin",
            Ordering::RandomOrder => "random-order",
        }
    }
}

impl std::str::FromStr for Ordering {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "asynchronous" | "async" => Ok(Ordering::Asynchronous),
            "round-robin" => Ok(Ordering::RoundRobin),
            "random-order" | "random" => Ok(Ordering::RandomOrder),
            other => Err(ConfigError::UnknownOrdering(other.to_string())),
        }
    }
}

/// A setting outside its valid range.
#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    /// A fraction outside its allowed interval.
    #[error("invalid {name} {value}: expected a number in {interval}")]
    Fraction {
        /// Name of the setting, for example `theta_u`.
        name: &'static str,
        /// The rejected value.
        value: f64,
        /// The allowed interval, as text.
        interval: &'static str,
    },
    /// A value that must be finite and positive is not.
    #[error("invalid {name} {value}: expected a finite number greater than 0")]
    NotPositive {
        /// Name of the setting.
        name: &'static str,
        /// The rejected value.
        value: f64,
    },
    /// A value that must be finite and non-negative is not.
    #[error("invalid {name} {value}: expected a finite number of at least 0")]
    Negative {
        /// Name of the setting.
        name: &'static str,
        /// The rejected value.
        value: f64,
    },
    /// A duration in seconds outside the range a setting accepts.
    #[error(
        "invalid {name} {}: expected a number of seconds from {MIN_SECONDS} to {MAX_SECONDS} (one year)",
        short_number(*value)
    )]
    Seconds {
        /// Name of the setting.
        name: &'static str,
        /// The rejected value.
        value: f64,
    },
    /// An ordering name that is not one of the three.
    #[error("unknown ordering {0:?}: expected asynchronous, round-robin or random-order")]
    UnknownOrdering(String),
    /// A participant identifier with characters outside the allowed set.
    #[error(
        "invalid participant id {0:?}: expected 1 to 64 ASCII letters, digits, '-', '_' or '.'"
    )]
    ParticipantId(String),
}

/// Checks `value` is in the closed interval [0, 1] (download fraction).
pub fn check_unit_closed(name: &'static str, value: f64) -> Result<f64, ConfigError> {
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::Fraction {
            name,
            value,
            interval: "[0, 1]",
        })
    }
}

/// Checks `value` is in the half-open interval (0, 1] (upload fraction,
/// shard fraction).
pub fn check_unit_open_closed(name: &'static str, value: f64) -> Result<f64, ConfigError> {
    if value > 0.0 && value <= 1.0 {
        Ok(value)
    } else {
        Err(ConfigError::Fraction {
            name,
            value,
            interval: "(0, 1]",
        })
    }
}

/// Checks `value` is finite and greater than zero (bound gamma, rates).
pub fn check_positive(name: &'static str, value: f64) -> Result<f64, ConfigError> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(ConfigError::NotPositive { name, value })
    }
}

/// Formats `value` as written for ordinary magnitudes and in exponent form
/// for huge or tiny ones, so a message never spells out 300 digits.
fn short_number(value: f64) -> String {
    if value == 0.0 || !value.is_finite() || (1e-4..1e9).contains(&value.abs()) {
        value.to_string()
    } else {
        format!("{value:e}")
    }
}

/// Minimum duration a seconds setting accepts: 1 ms.
pub const MIN_SECONDS: f64 = 0.001;

/// Maximum duration a seconds setting accepts: one year.
pub const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// Checks that `value` is a number of seconds from [`MIN_SECONDS`] to
/// [`MAX_SECONDS`] and converts it (leases, timeouts, grace periods).
pub fn check_seconds(name: &'static str, value: f64) -> Result<Duration, ConfigError> {
    if (MIN_SECONDS..=MAX_SECONDS).contains(&value) {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(ConfigError::Seconds { name, value })
    }
}

/// Checks `value` is finite and at least zero (threshold tau, decay).
pub fn check_non_negative(name: &'static str, value: f64) -> Result<f64, ConfigError> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(ConfigError::Negative { name, value })
    }
}

/// Checks a participant identifier: 1 to 64 ASCII letters, digits, `-`, `_`
/// or `.`, so it is safe in file names, logs and metric labels.
pub fn check_participant_id(id: &str) -> Result<&str, ConfigError> {
    let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if !id.is_empty() && id.len() <= 64 && id.chars().all(valid_char) {
        Ok(id)
    } else {
        Err(ConfigError::ParticipantId(id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_are_checked() {
        assert!(check_unit_closed("theta_d", 0.0).is_ok());
        assert!(check_unit_closed("theta_d", 1.0).is_ok());
        assert!(check_unit_closed("theta_d", 1.5).is_err());
        assert!(check_unit_closed("theta_d", f64::NAN).is_err());
        assert!(check_unit_open_closed("theta_u", 0.0).is_err());
        assert!(check_unit_open_closed("theta_u", 0.1).is_ok());
        let message = check_unit_open_closed("theta_u", -2.0)
            .unwrap_err()
            .to_string();
        assert_eq!(message, "invalid theta_u -2: expected a number in (0, 1]");
    }

    #[test]
    fn positive_and_non_negative_are_checked() {
        assert!(check_positive("gamma", 0.0).is_err());
        assert!(check_positive("gamma", f64::INFINITY).is_err());
        assert!(check_positive("gamma", 0.01).is_ok());
        assert!(check_non_negative("tau", 0.0).is_ok());
        assert!(check_non_negative("tau", -1e-9).is_err());
        for bad in [0.0, 1e-300, -1.0, 1e300, f64::NAN, f64::INFINITY] {
            let error = check_seconds("lease-seconds", bad).unwrap_err().to_string();
            assert!(error.contains("lease-seconds"), "{error}");
        }
        let huge = check_seconds("lease-seconds", 1e300)
            .unwrap_err()
            .to_string();
        assert!(huge.contains("1e300"), "{huge}");
        assert_eq!(
            check_seconds("lease-seconds", 2.5).unwrap(),
            Duration::from_millis(2500)
        );
    }

    #[test]
    fn orderings_parse_by_name() {
        for ordering in [
            Ordering::Asynchronous,
            Ordering::RoundRobin,
            Ordering::RandomOrder,
        ] {
            assert_eq!(ordering.name().parse::<Ordering>().unwrap(), ordering);
        }
        assert!("sequential".parse::<Ordering>().is_err());
    }

    #[test]
    fn participant_ids_are_checked() {
        assert!(check_participant_id("p-07_a.b").is_ok());
        assert!(check_participant_id("").is_err());
        assert!(check_participant_id("a b").is_err());
        assert!(check_participant_id(&"x".repeat(65)).is_err());
    }
}
