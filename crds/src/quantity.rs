//! Byte quantities written the Kubernetes way (`512Mi`, `1Gi`, `100M`).

/// Parses a byte quantity: a whole number with an optional binary (`Ki`..`Ei`) or decimal
/// (`k`, `M`..`E`) suffix.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!("{text:?} is not a byte quantity such as 512Mi or 1Gi"));
    }
    let number: u64 = digits.parse().map_err(|_| format!("{text:?} is too large"))?;
    let factor: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        other => {
            return Err(format!("unknown suffix {other:?} in {text:?} (use Ki, Mi, Gi, Ti or k, M, G, T)"));
        }
    };
    number.checked_mul(factor).ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn binary_and_decimal_suffixes_are_understood() {
        assert_eq!(parse_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_bytes("512Mi"), Ok(512 << 20));
        assert_eq!(parse_bytes("100M"), Ok(100_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
    }

    #[test]
    fn nonsense_is_refused_with_the_text() {
        assert!(parse_bytes("1GB").unwrap_err().contains("GB"));
        assert!(parse_bytes("Gi").is_err());
        assert!(parse_bytes("99999999999Ei").unwrap_err().contains("too large"));
    }
}
