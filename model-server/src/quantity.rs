//! Kubernetes quantities as byte counts: the operator's memory fit and the server's memory flags
//! need arithmetic, and k8s-openapi keeps quantities as strings.

/// Bytes of a quantity such as `120Mi`, `80Gi`, `1.5G`, `512k` or `1e9`; None if malformed.
pub fn parse_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let split =
        q.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-')).unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let value: f64 = number.parse().ok()?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse::<i32>().ok()?),
        _ => return None,
    };
    let bytes = value * factor;
    (bytes.is_finite() && bytes >= 0.0).then(|| bytes.ceil() as u64)
}

/// A byte count in the largest binary unit that keeps it readable (`1.5Gi`, `120Mi`).
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)];
    for (unit, size) in UNITS {
        if bytes >= size {
            let v = bytes as f64 / size as f64;
            return if v.fract() == 0.0 { format!("{v:.0}{unit}") } else { format!("{v:.1}{unit}") };
        }
    }
    bytes.to_string()
}

/// A byte count rounded up to whole MiB, in the form the API server stores (`819Mi`, `2Gi`):
/// for quantities written into objects, so the live object reads back equal to what was
/// applied (the server rewrites `818.5Mi` as `838144Ki`, which would look like drift).
pub fn canonical_mib(bytes: u64) -> String {
    let mib = bytes.div_ceil(1 << 20).max(1);
    match mib {
        m if m % (1 << 20) == 0 => format!("{}Ti", m >> 20),
        m if m % (1 << 10) == 0 => format!("{}Gi", m >> 10),
        m => format!("{m}Mi"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_decimal_and_exponent_forms() {
        assert_eq!(parse_bytes("120Mi"), Some(120 << 20));
        assert_eq!(parse_bytes("80Gi"), Some(80 << 30));
        assert_eq!(parse_bytes("1.5G"), Some(1_500_000_000));
        assert_eq!(parse_bytes("512k"), Some(512_000));
        assert_eq!(parse_bytes("1e9"), Some(1_000_000_000));
        assert_eq!(parse_bytes("1024"), Some(1024));
        for bad in ["", "Mi", "lots", "80GB", "1..2Gi"] {
            assert_eq!(parse_bytes(bad), None, "{bad}");
        }
    }

    #[test]
    fn formats_readably() {
        assert_eq!(format_bytes(120 << 20), "120Mi");
        assert_eq!(format_bytes(3 << 29), "1.5Gi");
        assert_eq!(format_bytes(100), "100");
    }

    #[test]
    fn canonical_quantities_are_whole_units() {
        assert_eq!(canonical_mib((818 << 20) + (1 << 19)), "819Mi");
        assert_eq!(canonical_mib(2048 << 20), "2Gi");
        assert_eq!(canonical_mib(3 << 40), "3Ti");
        assert_eq!(canonical_mib(1), "1Mi");
    }
}
