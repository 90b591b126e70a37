//! Point times: nanoseconds since the Unix epoch (UTC), written in names as
//! `YYYYMMDDTHHMMSS.nnnnnnnnnZ` (sortable, no `:` so qemu never reads a
//! backing file name as a protocol prefix) and shown as RFC 3339.

/// Days since 1970-01-01 to a civil (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 } as i64;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

struct Parts {
    y: i64,
    mo: u32,
    d: u32,
    h: u64,
    mi: u64,
    s: u64,
    ns: u64,
}

fn parts(t: u64) -> Parts {
    let secs = t / 1_000_000_000;
    let ns = t % 1_000_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, mo, d) = civil_from_days(days);
    Parts {
        y,
        mo,
        d,
        h: rem / 3600,
        mi: rem % 3600 / 60,
        s: rem % 60,
        ns,
    }
}

/// `20250102T030405.000000001Z`: the form used in file and directory names.
pub fn name(t: u64) -> String {
    let p = parts(t);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}.{:09}Z",
        p.y, p.mo, p.d, p.h, p.mi, p.s, p.ns
    )
}

/// `2025-01-02T03:04:05.000000001Z`: RFC 3339 with nanoseconds.
pub fn rfc3339(t: u64) -> String {
    let p = parts(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        p.y, p.mo, p.d, p.h, p.mi, p.s, p.ns
    )
}

/// Parses a time given as nanoseconds, as [`name`] or as RFC 3339 (UTC,
/// `Z`, fraction optional).
pub fn parse(s: &str) -> Option<u64> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().ok();
    }
    let s = s.strip_suffix('Z').or_else(|| s.strip_suffix('z'))?;
    let (main, frac) = match s.split_once('.') {
        Some((m, f)) => (m, Some(f)),
        None => (s, None),
    };
    let digits: String = main.chars().filter(|c| c.is_ascii_digit()).collect();
    let shape_ok = main
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '-' | ':' | 'T' | 't'));
    if !shape_ok || digits.len() != 14 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| digits[r].parse::<u64>().ok();
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, sec) = (num(8..10)?, num(10..12)?, num(12..14)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let ns = match frac {
        None => 0,
        Some(f) if !f.is_empty() && f.len() <= 9 && f.bytes().all(|b| b.is_ascii_digit()) => {
            f.parse::<u64>().ok()? * 10u64.pow(9 - f.len() as u32)
        }
        Some(_) => return None,
    };
    let days = days_from_civil(y as i64, mo as u32, d as u32);
    if days < 0 {
        return None;
    }
    let secs = days as u64 * 86_400 + h * 3600 + mi * 60 + sec;
    secs.checked_mul(1_000_000_000)?.checked_add(ns)
}

/// Now, in nanoseconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A short human form of a duration in seconds: `42s`, `3m12s`, `5h02m`, `2d03h`.
pub fn age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_round_trip() {
        for t in [
            0u64,
            1,
            1_735_689_600_000_000_000,
            1_735_689_600_123_456_789,
            4_102_444_799_999_999_999,
        ] {
            assert_eq!(parse(&name(t)), Some(t), "{}", name(t));
            assert_eq!(parse(&rfc3339(t)), Some(t), "{}", rfc3339(t));
            assert_eq!(parse(&t.to_string()), Some(t));
        }
        assert_eq!(
            name(1_735_689_600_000_000_001),
            "20250101T000000.000000001Z"
        );
        assert_eq!(
            rfc3339(1_735_689_600_500_000_000),
            "2025-01-01T00:00:00.500000000Z"
        );
        assert_eq!(
            parse("2025-01-01T00:00:00Z"),
            Some(1_735_689_600_000_000_000)
        );
        assert_eq!(
            parse("2025-01-01T00:00:00.5Z"),
            Some(1_735_689_600_500_000_000)
        );
        for bad in [
            "",
            "2025-01-01",
            "2025-13-01T00:00:00Z",
            "x",
            "2025-01-01T00:00:00.Z",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn names_sort_like_times() {
        let a = name(1_700_000_000_000_000_000);
        let b = name(1_700_000_000_000_000_001);
        let c = name(1_800_000_000_000_000_000);
        assert!(a < b && b < c);
    }
}
