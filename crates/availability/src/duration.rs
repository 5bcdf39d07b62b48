//! Durations in hours: reading `30d`, `1h`, `90s` and writing them back for people.
//!
//! Reliability figures span milliseconds (a pause) to years (a disk's MTTF), so the
//! units go from `ms` to `y`, and a number may have a fraction (`1.5h`).

use crate::{AvailabilityError, HOURS_PER_YEAR};

/// The longest duration accepted: a thousand years, far beyond any MTTF worth modelling,
/// and short enough that every computation on it stays finite.
pub const DURATION_HOURS_MAX: f64 = 1_000.0 * HOURS_PER_YEAR;

/// Parses a duration with a unit (`ms`, `s`, `m`, `h`, `d`, `w`, `y`) into hours.
pub fn parse_hours(text: &str) -> Result<f64, AvailabilityError> {
    let trimmed = text.trim();
    let number_end = trimmed
        .find(|character: char| !(character.is_ascii_digit() || character == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(number_end);
    let parse_error = |reason: &str| AvailabilityError::Parse {
        text: text.to_owned(),
        reason: reason.to_owned(),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| parse_error("expected a duration such as 30d, 1h, 90s or 1.5h"))?;
    let hours_per_unit = match unit {
        "ms" => 1.0 / 3_600_000.0,
        "s" => 1.0 / 3_600.0,
        "m" | "min" => 1.0 / 60.0,
        "h" => 1.0,
        "d" => 24.0,
        "w" => 7.0 * 24.0,
        "y" => HOURS_PER_YEAR,
        "" => return Err(parse_error("needs a unit: ms, s, m, h, d, w or y")),
        _ => return Err(parse_error("unknown unit: use ms, s, m, h, d, w or y")),
    };
    let hours = value * hours_per_unit;
    if !(hours > 0.0 && hours <= DURATION_HOURS_MAX) {
        return Err(parse_error("must be above zero and at most 1000y"));
    }
    Ok(hours)
}

/// Writes a duration in hours with the largest unit that keeps the number above one.
pub fn format_hours(hours: f64) -> String {
    let seconds = hours * 3_600.0;
    if !seconds.is_finite() {
        return "infinite".to_owned();
    }
    if seconds < 1.0 {
        format!("{:.0} ms", seconds * 1_000.0)
    } else if seconds < 60.0 {
        format!("{seconds:.1} s")
    } else if seconds < 3_600.0 {
        format!("{:.1} min", seconds / 60.0)
    } else if hours < 48.0 {
        format!("{hours:.1} h")
    } else if hours < 2.0 * HOURS_PER_YEAR {
        format!("{:.1} d", hours / 24.0)
    } else {
        format!("{:.1} y", hours / HOURS_PER_YEAR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_hours("30d").unwrap(), 720.0);
        assert_eq!(parse_hours("1h").unwrap(), 1.0);
        assert_eq!(parse_hours("1.5h").unwrap(), 1.5);
        assert_eq!(parse_hours("90m").unwrap(), 1.5);
        assert_eq!(parse_hours("36s").unwrap(), 0.01);
        assert_eq!(parse_hours("2w").unwrap(), 336.0);
        assert_eq!(parse_hours("1y").unwrap(), HOURS_PER_YEAR);
    }

    #[test]
    fn refuses_bad_durations_with_the_text() {
        for text in ["", "30", "d", "0h", "5parsecs", "-1h", "2000y"] {
            let error = parse_hours(text).unwrap_err();
            assert!(error.to_string().contains(&format!("{text:?}")), "{error}");
        }
    }

    #[test]
    fn formats_with_a_readable_unit() {
        assert_eq!(format_hours(0.5 / 3600.0), "500 ms");
        assert_eq!(format_hours(31.5 / 3600.0), "31.5 s");
        assert_eq!(format_hours(0.5), "30.0 min");
        assert_eq!(format_hours(8.0), "8.0 h");
        assert_eq!(format_hours(720.0), "30.0 d");
        assert_eq!(format_hours(3.0 * HOURS_PER_YEAR), "3.0 y");
    }
}
