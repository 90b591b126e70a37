//! Bandwidth limits: `bwlimit` (bytes/s over every stream) and
//! `bwlimit_schedule`, rules such as `Mon-Fri 08:00-18:00 20M, * off`
//! evaluated in local time. The first rule that matches the current day
//! and time gives the limit; when none does, `bwlimit` applies. Parsing
//! and matching are pure; the worker applies the result to its
//! `protocol::throttle::Throttle` every few seconds, live.

use crate::catalog::sample::parse_size;

/// One rule: days of the week (bit 0 = Monday), a time range in minutes
/// of the day (`end` may be below `start`: across midnight), a limit
/// (None: no limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    days: u8,
    start: u16,
    end: u16,
    limit: Option<u64>,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Parses a limit: a size per second (`20M`: 20 MiB/s, `500K`, `1G`,
/// plain bytes) or `off`; `Some(None)` is "no limit".
pub fn parse_limit(s: &str) -> Option<Option<u64>> {
    match s.trim().to_ascii_lowercase().as_str() {
        "off" | "none" | "unlimited" | "0" => Some(None),
        v => parse_size(v).filter(|&n| n > 0).map(Some),
    }
}

fn parse_day(s: &str) -> Option<usize> {
    let l = s.to_ascii_lowercase();
    DAYS.iter().position(|d| l.starts_with(d) && l.len() >= 3)
}

fn parse_days(s: &str) -> Option<u8> {
    if s == "*" {
        return Some(0x7f);
    }
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (parse_day(a)?, parse_day(b)?),
        None => {
            let d = parse_day(s)?;
            (d, d)
        }
    };
    let mut days = 0u8;
    let mut d = a;
    loop {
        days |= 1 << d;
        if d == b {
            return Some(days);
        }
        d = (d + 1) % 7;
    }
}

fn parse_minute(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 24 && m < 60 && h * 60 + m <= 1440).then_some(h * 60 + m)
}

/// Parses a schedule; the error says which rule is wrong and how rules look.
pub fn parse_schedule(s: &str) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let words: Vec<&str> = part.split_whitespace().collect();
        let bad = || {
            format!("bad rule {part:?}: write DAYS [HH:MM-HH:MM] LIMIT, e.g. \"Mon-Fri 08:00-18:00 20M, * off\"")
        };
        let (days, range, limit) = match words.as_slice() {
            [d, l] => (*d, None, *l),
            [d, r, l] => (*d, Some(*r), *l),
            _ => return Err(bad()),
        };
        let days = parse_days(days).ok_or_else(bad)?;
        let (start, end) = match range {
            None => (0, 1440),
            Some(r) => {
                let (a, b) = r.split_once('-').ok_or_else(bad)?;
                (
                    parse_minute(a).ok_or_else(bad)?,
                    parse_minute(b).ok_or_else(bad)?,
                )
            }
        };
        let limit = parse_limit(limit).ok_or_else(bad)?;
        rules.push(Rule {
            days,
            start,
            end,
            limit,
        });
    }
    Ok(rules)
}

impl Rule {
    /// Whether the rule covers `weekday` (0 = Monday) at `minute` of the day.
    fn matches(&self, weekday: usize, minute: u16) -> bool {
        let day = |d: usize| self.days & (1 << (d % 7)) != 0;
        if self.start <= self.end {
            day(weekday) && minute >= self.start && minute < self.end
        } else {
            // Across midnight: the evening of its day, or the morning after.
            (day(weekday) && minute >= self.start) || (day(weekday + 6) && minute < self.end)
        }
    }
}

/// The limit in force (bytes/s, None: none) at `weekday`/`minute`.
pub fn limit_at(bwlimit: Option<u64>, rules: &[Rule], weekday: usize, minute: u16) -> Option<u64> {
    match rules.iter().find(|r| r.matches(weekday, minute)) {
        Some(r) => r.limit,
        None => bwlimit,
    }
}

/// The local weekday (0 = Monday) and minute of the day now.
pub fn local_now() -> (usize, u16) {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as libc::time_t)
        .unwrap_or(0);
    // SAFETY: localtime_r only writes the `tm` we pass, and reads `t`;
    // both live on this stack frame for the call. A zeroed `tm` is valid.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return (0, 0);
        }
        tm
    };
    (
        ((tm.tm_wday + 6) % 7) as usize,
        (tm.tm_hour * 60 + tm.tm_min) as u16,
    )
}

/// The limit in force now for a session's `bwlimit` and `bwlimit_schedule`
/// (an invalid schedule is ignored here; `config set` refuses one).
pub fn limit_now(bwlimit: Option<u64>, schedule: Option<&str>) -> Option<u64> {
    let rules = schedule
        .and_then(|s| parse_schedule(s).ok())
        .unwrap_or_default();
    let (d, m) = local_now();
    limit_at(bwlimit, &rules, d, m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_and_the_first_matching_rule_wins() {
        let r = parse_schedule("Mon-Fri 08:00-18:00 20M, Sat 1M, * off").unwrap();
        assert_eq!(limit_at(Some(5), &r, 0, 8 * 60), Some(20 << 20));
        assert_eq!(limit_at(Some(5), &r, 4, 17 * 60 + 59), Some(20 << 20));
        assert_eq!(limit_at(Some(5), &r, 4, 18 * 60), None, "after hours: off");
        assert_eq!(limit_at(Some(5), &r, 5, 3), Some(1 << 20));
        assert_eq!(limit_at(Some(5), &r, 6, 600), None);
        let r = parse_schedule("Fri-Mon 22:00-06:00 500K").unwrap();
        assert_eq!(limit_at(Some(7), &r, 4, 23 * 60), Some(500 << 10));
        assert_eq!(
            limit_at(Some(7), &r, 1, 5 * 60),
            Some(500 << 10),
            "Monday night into Tuesday"
        );
        assert_eq!(
            limit_at(Some(7), &r, 2, 5 * 60),
            Some(7),
            "Tuesday night is not covered"
        );
        assert_eq!(limit_at(Some(7), &r, 1, 12 * 60), Some(7));
        assert_eq!(limit_at(Some(7), &[], 1, 12 * 60), Some(7));
        for bad in [
            "Mon-Fri",
            "Xyz 1M",
            "Mon 8-18 1M",
            "Mon 08:00-18:00 fast",
            "* 25:00-26:00 1M",
        ] {
            assert!(parse_schedule(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_limit("off"), Some(None));
        assert_eq!(parse_limit("20M"), Some(Some(20 << 20)));
        assert_eq!(parse_limit("x"), None);
    }
}
