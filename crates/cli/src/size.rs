//! Byte sizes as users write and read them.
//!
//! [`parse_size`] accepts a number with an optional binary suffix: `4096`,
//! `512M`, `20G`, `1.5G`, `2TiB`, `64k`, `100B`. Suffixes K, M, G, T, P
//! (any case) are powers of 1024 and may be followed by `iB` or `B`.
//! Fractions are allowed and rounded down to a whole byte.
//!
//! [`format_size`] prints sizes for humans with one decimal and a binary
//! unit: `0 B`, `512 B`, `1.5 KiB`, `1.0 GiB`.

/// Parses a size such as `512M`, `1.5G` or `4096` into bytes. Zero is refused.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(digits_end);
    let unit = unit.trim_start();
    let bad = || {
        format!("invalid size '{text}': expected a number with an optional K, M, G, T or P suffix, like 512M or 1.5G")
    };
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => return Err(bad()),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let too_big = || format!("size '{text}' is too large");
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_big())?
    };
    // Only the first 18 fractional digits matter at byte precision.
    let fraction = &fraction[..fraction.len().min(18)];
    let frac_value: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().map_err(|_| bad())?
    };
    let scale = 10u128.pow(fraction.len() as u32);
    let bytes = whole
        .checked_mul(1 << shift)
        .and_then(|w| w.checked_add(frac_value * (1u128 << shift) / scale))
        .ok_or_else(too_big)?;
    let bytes = u64::try_from(bytes).map_err(|_| too_big())?;
    if bytes == 0 {
        return Err(format!(
            "invalid size '{text}': a size must be greater than zero"
        ));
    }
    Ok(bytes)
}

/// Formats `bytes` for humans: `512 B`, `1.5 KiB`, `20.0 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    // Switch units when the rounded value would print as 1024.0.
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_suffixed_sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("0.5K"), Ok(512));
        assert_eq!(parse_size(".5M"), Ok(512 << 10));
        assert_eq!(parse_size("8."), Ok(8));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("2GB"), Ok(2 << 30));
        assert_eq!(parse_size("2gib"), Ok(2 << 30));
        assert_eq!(parse_size("100B"), Ok(100));
        assert_eq!(parse_size(" 3 M "), Ok(3 << 20));
    }

    #[test]
    fn fractions_round_down_to_bytes() {
        // 0.1 KiB = 102.4 bytes.
        assert_eq!(parse_size("0.1K"), Ok(102));
        assert_eq!(parse_size("1.0000000000000000000001K"), Ok(1024));
    }

    #[test]
    fn rejects_bad_sizes() {
        for s in [
            "", "G", "abc", "12X", "1.2.3G", "-5M", "1e9", "5 MiBs", "0", "0.0G", "0.0001", "iB",
            "4096iB", "1..G",
        ] {
            assert!(parse_size(s).is_err(), "{s:?} was accepted");
        }
    }

    #[test]
    fn rejects_overflow() {
        assert_eq!(parse_size("16383P"), Ok(16383 << 50));
        assert!(parse_size("16384P").is_err());
        assert!(parse_size("99999999999999999999999999999999999999999").is_err());
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert!(parse_size("18446744073709551616").is_err());
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1.0 KiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(1 << 30), "1.0 GiB");
        assert_eq!(format_size(20 << 30), "20.0 GiB");
        assert_eq!(format_size((1 << 20) - 1), "1.0 MiB");
        assert_eq!(format_size(3 << 39), "1.5 TiB");
        assert_eq!(format_size(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn parse_inverts_format_for_round_values() {
        for bytes in [4096u64, 1 << 20, 3 << 29, 5 << 40] {
            let text = format_size(bytes).replace(' ', "");
            assert_eq!(parse_size(&text), Ok(bytes), "{text}");
        }
    }
}
