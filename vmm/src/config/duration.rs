//! Durations in seconds as users type them (`--timeout 2.5`): finite, positive and
//! bounded, refused with a message instead of a panic in `Duration::from_secs_f64`.

use std::time::Duration;

/// The longest duration accepted, in seconds (about 31 years: anything longer is a typo;
/// omit the option for no limit).
pub const MAX_SECONDS: f64 = 1e9;

/// Parses a positive number of seconds (`30`, `2.5`, `0.1`).
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 =
        text.trim().parse().map_err(|_| format!("'{text}' is not a number of seconds (give e.g. 30 or 2.5)"))?;
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(format!("'{text}': give a positive, finite number of seconds (e.g. 30), or omit it for no limit"));
    }
    if seconds > MAX_SECONDS {
        return Err(format!("'{text}' seconds is more than {MAX_SECONDS:e} (about 31 years); omit it for no limit"));
    }
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("'{text}': {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_positive_finite_and_bounded() {
        assert_eq!(parse_seconds("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_seconds("30"), Ok(Duration::from_secs(30)));
        for bad in ["-1", "0", "NaN", "nan", "inf", "-inf", "1e20", "soon", ""] {
            let err = parse_seconds(bad).unwrap_err();
            assert!(err.contains(&format!("'{bad}'")), "{bad}: {err}");
        }
    }
}
