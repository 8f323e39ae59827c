//! Duration strings of the configuration: `"250ms"`, `"30s"`, `"1.5s"`, `"2m"`, `"1h"`.

/// Parses a duration string into whole milliseconds.
///
/// A decimal number followed by `ms`, `s`, `m` or `h`. Values that are not a whole number of
/// milliseconds (`"0.5ms"`) are refused rather than rounded, so what the operator wrote is what runs.
pub fn parse_duration_ms(text: &str) -> Result<u64, &'static str> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or("missing unit")?;
    let (number, unit) = text.split_at(split);
    let unit_us: u64 = match unit {
        "ms" => 1_000,
        "s" => 1_000_000,
        "m" => 60_000_000,
        "h" => 3_600_000_000,
        _ => return Err("unit must be ms, s, m or h"),
    };
    let (whole, frac) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if whole.is_empty() || whole.len() > 9 || frac.len() > 6 || frac.contains('.') {
        return Err("number out of range or malformed");
    }
    let whole: u64 = whole.parse().map_err(|_| "malformed number")?;
    let frac_digits: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| "malformed number")?
    };
    // Scale the fraction to microseconds of the unit: frac_digits / 10^len * unit_us.
    let scale = 10u64.pow(frac.len() as u32);
    let frac_us = frac_digits
        .checked_mul(unit_us)
        .ok_or("number out of range")?;
    if frac_us % scale != 0 {
        return Err("more precision than a microsecond");
    }
    let total_us = whole
        .checked_mul(unit_us)
        .and_then(|w| w.checked_add(frac_us / scale))
        .ok_or("number out of range")?;
    if total_us % 1_000 != 0 {
        return Err("not a whole number of milliseconds");
    }
    Ok(total_us / 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn parses_contract_examples() {
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("30s"), Ok(30_000));
        assert_eq!(parse_duration_ms("1.5s"), Ok(1_500));
        assert_eq!(parse_duration_ms("2m"), Ok(120_000));
        assert_eq!(parse_duration_ms("1h"), Ok(3_600_000));
        assert_eq!(parse_duration_ms("0.25s"), Ok(250));
        assert_eq!(parse_duration_ms("0s"), Ok(0));
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            "",
            "5",
            "s",
            "1.5",
            "-1s",
            "1..5s",
            "1.s5",
            "1 d",
            "0.5ms",
            "1e3s",
            "99999999999h",
            ".5s",
        ] {
            assert!(parse_duration_ms(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
