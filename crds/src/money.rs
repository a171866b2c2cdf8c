//! Money as integer micro-USD, parsed from the decimal strings users write.
//!
//! Floating point never touches money: `"2.50"` becomes `2_500_000` micro-USD.

/// The pattern every money string in a spec must match (also enforced by the CRD schema).
pub const USD_PATTERN: &str = r"^[0-9]{1,12}(\.[0-9]{1,6})?$";

/// Why a money string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a USD amount: write digits with at most 6 decimals, e.g. \"2.50\"")]
pub struct InvalidUsd(pub String);

/// Parses a decimal USD string such as `"10.00"` into micro-USD.
pub fn parse_usd_micros(text: &str) -> Result<i64, InvalidUsd> {
    let invalid = || InvalidUsd(text.to_string());
    let (whole, frac) = match text.split_once('.') {
        Some((w, f)) => (w, f),
        None => (text, ""),
    };
    let digits_ok = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty()
        || whole.len() > 12
        || frac.len() > 6
        || !digits_ok(whole)
        || !digits_ok(frac)
    {
        return Err(invalid());
    }
    if text.contains('.') && frac.is_empty() {
        return Err(invalid());
    }
    let whole: i64 = whole.parse().map_err(|_| invalid())?;
    let mut frac_micros: i64 = 0;
    for (i, b) in frac.bytes().enumerate() {
        frac_micros += i64::from(b - b'0') * 10_i64.pow(5 - i as u32);
    }
    whole
        .checked_mul(1_000_000)
        .and_then(|w| w.checked_add(frac_micros))
        .ok_or_else(invalid)
}

/// Formats micro-USD as a decimal string with at least two decimals.
pub fn format_usd_micros(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    let whole = abs / 1_000_000;
    let frac = abs % 1_000_000;
    let mut frac_text = format!("{frac:06}");
    while frac_text.len() > 2 && frac_text.ends_with('0') {
        frac_text.pop();
    }
    format!("{sign}{whole}.{frac_text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimal_strings() {
        assert_eq!(parse_usd_micros("2.50"), Ok(2_500_000));
        assert_eq!(parse_usd_micros("10"), Ok(10_000_000));
        assert_eq!(parse_usd_micros("0.000001"), Ok(1));
        assert_eq!(parse_usd_micros("500.00"), Ok(500_000_000));
    }

    #[test]
    fn refuses_what_is_not_money() {
        for bad in [
            "",
            "-1",
            "1.",
            ".5",
            "1.0000001",
            "1e3",
            "abc",
            "1,00",
            "1234567890123",
        ] {
            assert!(parse_usd_micros(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn formats_round_trip() {
        for micros in [0, 1, 2_500_000, 10_000_000, 123_456_789] {
            let text = format_usd_micros(micros);
            assert_eq!(parse_usd_micros(&text), Ok(micros), "{text}");
        }
        assert_eq!(format_usd_micros(2_500_000), "2.50");
    }
}
