//! Time as a value: the scheduler never reads a clock.
//!
//! The caller passes "now" as a [`Time`] (milliseconds since the Unix epoch on
//! the controller's clock, or any fixed epoch in tests) and every recorded
//! instant (a failure, a node going down, a readiness check turning passing)
//! is a `Time` too. Durations are [`std::time::Duration`]s, written in job
//! specs in Go's duration syntax (`"30s"`, `"1h30m"`, `"250ms"`) because that
//! is what Nomad's users write.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// An instant, in milliseconds since the Unix epoch (or the test's epoch).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Time(pub u64);

impl Time {
    /// The instant `duration` after `self` (saturating at the end of time).
    pub fn after(self, duration: Duration) -> Time {
        Time(self.0.saturating_add(duration_milliseconds(duration)))
    }

    /// How long after `earlier` this instant is (zero when it is not later).
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Display for Time {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}ms", self.0)
    }
}

/// A duration in whole milliseconds, the resolution of [`Time`].
pub fn duration_milliseconds(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {text:?}: {reason} (write it as Go does, such as \"30s\", \"1h30m\" or \"250ms\")")]
pub struct DurationError {
    text: String,
    reason: &'static str,
}

/// Parses Go's duration syntax: a sequence of decimal numbers, each with an
/// optional fraction and a unit among `ns`, `us`, `µs`, `ms`, `s`, `m`, `h`.
/// `"0"` alone is zero. Negative durations are refused: no policy in a job
/// spec has a meaning for them.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let error = |reason| DurationError {
        text: text.to_string(),
        reason,
    };
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err(error("it is empty"));
    }
    if text.starts_with('-') {
        return Err(error("it is negative"));
    }
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    let mut total_nanoseconds: u128 = 0;
    while !rest.is_empty() {
        let number_length = rest
            .find(|character: char| !(character.is_ascii_digit() || character == '.'))
            .unwrap_or(rest.len());
        let (number, after_number) = rest.split_at(number_length);
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(error("a number is missing or malformed"));
        }
        let unit_length = after_number
            .find(|character: char| character.is_ascii_digit() || character == '.')
            .unwrap_or(after_number.len());
        let (unit, after_unit) = after_number.split_at(unit_length);
        let unit_nanoseconds: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(error("a unit is missing")),
            _ => return Err(error("the unit is unknown")),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| error("a number is too large"))?
        };
        let mut value = whole
            .checked_mul(unit_nanoseconds)
            .ok_or_else(|| error("it is too large"))?;
        let mut scale = unit_nanoseconds;
        for digit in fraction.chars() {
            scale /= 10;
            value += u128::from(digit.to_digit(10).unwrap_or(0)) * scale;
        }
        total_nanoseconds = total_nanoseconds
            .checked_add(value)
            .ok_or_else(|| error("it is too large"))?;
        rest = after_unit;
    }
    let seconds =
        u64::try_from(total_nanoseconds / 1_000_000_000).map_err(|_| error("it is too large"))?;
    Ok(Duration::new(
        seconds,
        (total_nanoseconds % 1_000_000_000) as u32,
    ))
}

/// Formats a duration the way Go prints it, without zero components:
/// `1h30m`, `45s`, `1.5s`, `250ms`, `0s`.
pub fn format_duration(duration: Duration) -> String {
    if duration.is_zero() {
        return "0s".to_string();
    }
    if duration < Duration::from_secs(1) {
        let nanoseconds = duration.subsec_nanos();
        return if nanoseconds.is_multiple_of(1_000_000) {
            format!("{}ms", nanoseconds / 1_000_000)
        } else if nanoseconds.is_multiple_of(1_000) {
            format!("{}us", nanoseconds / 1_000)
        } else {
            format!("{nanoseconds}ns")
        };
    }
    let total_seconds = duration.as_secs();
    let hours = total_seconds / 3600;
    let minutes = (total_seconds % 3600) / 60;
    let seconds = total_seconds % 60;
    let mut text = String::new();
    if hours > 0 {
        text.push_str(&format!("{hours}h"));
    }
    if minutes > 0 {
        text.push_str(&format!("{minutes}m"));
    }
    let nanoseconds = duration.subsec_nanos();
    if nanoseconds > 0 {
        let fraction = format!("{nanoseconds:09}");
        text.push_str(&format!("{seconds}.{}s", fraction.trim_end_matches('0')));
    } else if seconds > 0 {
        text.push_str(&format!("{seconds}s"));
    }
    text
}

/// Serde adapter for `Duration` fields written as Go duration strings.
pub mod duration_text {
    use super::{format_duration, parse_duration};
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Writes the duration as Go's syntax.
    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format_duration(*duration))
    }

    /// Reads a Go duration string.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// Serde adapter for `Option<Duration>` fields written as Go duration strings.
pub mod optional_duration_text {
    use super::{format_duration, parse_duration};
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Writes the duration as Go's syntax, or nothing.
    pub fn serialize<S: Serializer>(
        duration: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match duration {
            Some(duration) => serializer.serialize_str(&format_duration(*duration)),
            None => serializer.serialize_none(),
        }
    }

    /// Reads an optional Go duration string.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = Option::<String>::deserialize(deserializer)?;
        text.map(|text| parse_duration(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("2m0s"), Ok(Duration::from_secs(120)));
    }

    #[test]
    fn refuses_malformed_durations() {
        for text in [
            "",
            "10",
            "-5s",
            "5 s",
            "5x",
            "s",
            "1..5s",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(text).is_err(), "{text:?} should be refused");
        }
    }

    #[test]
    fn formats_round_trip() {
        for text in ["0s", "1h30m", "45s", "1.5s", "250ms", "2h", "1m5s"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }

    #[test]
    fn time_arithmetic_saturates() {
        assert_eq!(Time(1_000).after(Duration::from_secs(2)), Time(3_000));
        assert_eq!(Time(1_000).since(Time(4_000)), Duration::ZERO);
        assert_eq!(Time(u64::MAX).after(Duration::from_secs(1)), Time(u64::MAX));
    }
}
