//! Duration strings in configuration: a whole number followed by a unit, e.g. `500ms`, `8s`, `2m`, `1h`.
//!
//! Invariant: parsing is strict — no spaces, no fractions, no signs, no bare numbers — so that a typo is
//! reported instead of silently meaning something else.

use std::time::Duration;

/// Parses `<digits><unit>` with unit `ms`, `s`, `m` or `h`. The error message quotes the input and shows
/// the accepted form.
pub fn parse(s: &str) -> Result<Duration, String> {
    let bad =
        || format!("{s:?} is not a duration (use a whole number with ms, s, m or h, e.g. \"8s\")");
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = s.split_at(digits);
    if number.is_empty() {
        return Err(bad());
    }
    let n: u64 = number.parse().map_err(|_| bad())?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    let millis = n
        .checked_mul(millis_per_unit)
        .ok_or_else(|| format!("{s:?} is too long"))?;
    Ok(Duration::from_millis(millis))
}

/// Formats a duration the way [`parse`] reads it (largest exact unit).
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".to_owned()
    } else if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1_000 == 0 {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}
