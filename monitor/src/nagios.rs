//! A Nagios/Icinga check of one session: exit code OK 0, WARNING 1,
//! CRITICAL 2, UNKNOWN 3; one line of text, then perfdata after `|`.

use crate::status::{MonitorStatus, Status, WorkerStatus};
use crate::time::parse_rfc3339;

pub const OK: i32 = 0;
pub const WARNING: i32 = 1;
pub const CRITICAL: i32 = 2;
pub const UNKNOWN: i32 = 3;

/// Lag thresholds, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub warning: u64,
    pub critical: u64,
    /// A running monitor that has not rewritten its status for this long is wedged.
    pub stale: u64,
    /// Persistent failures (entries failing crawl after crawl) warn; this many are critical.
    pub failures_critical: u64,
}

fn word(code: i32) -> &'static str {
    match code {
        OK => "OK",
        WARNING => "WARNING",
        CRITICAL => "CRITICAL",
        _ => "UNKNOWN",
    }
}

/// Evaluates a status already corrected by [`crate::status::effective`].
pub fn check(s: &Status, t: &Thresholds, now_ns: u64) -> (i32, String) {
    let age = |v: &Option<String>| {
        v.as_deref()
            .and_then(|x| parse_rfc3339(x).ok())
            .map(|x| now_ns.saturating_sub(x) / 1_000_000_000)
    };
    let err = s
        .last_error
        .as_deref()
        .map(|e| format!(": {e}"))
        .unwrap_or_default();
    let (code, text) = match (s.monitor_status, s.worker_status) {
        (MonitorStatus::Created, _) => (CRITICAL, "never started".to_string()),
        (MonitorStatus::Stopped, _) => (CRITICAL, format!("not running{err}")),
        (_, WorkerStatus::Faulty) => (CRITICAL, format!("worker Faulty{err}")),
        (MonitorStatus::Paused, _) => (WARNING, "paused".to_string()),
        _ => match (s.lag_seconds, age(&s.updated)) {
            (_, Some(a)) if a >= t.stale => (
                UNKNOWN,
                format!("the monitor has not updated its status for {a} s (wedged?)"),
            ),
            (None, _) => (
                WARNING,
                format!("{}, not synced yet", s.worker_status.as_str()),
            ),
            (Some(l), _) if l >= t.critical => (CRITICAL, format!("lag {l} s >= {} s", t.critical)),
            (Some(l), _) if l >= t.warning => (WARNING, format!("lag {l} s >= {} s", t.warning)),
            (Some(l), _) => match (s.checkpoint_completed, age(&s.checkpoint_time)) {
                (false, Some(ca)) if ca >= t.critical => {
                    (WARNING, format!("checkpoint not completed after {ca} s"))
                }
                _ => (
                    OK,
                    format!(
                        "{}, {}, lag {l} s",
                        s.worker_status.as_str(),
                        s.crawl_status.as_deref().unwrap_or("N/A")
                    ),
                ),
            },
        },
    };
    let (code, text) = with_failures(s, t, code, text);
    // "U" is the plugin guidelines' value for "could not be determined".
    let lag = s
        .lag_seconds
        .map(|l| format!("{l}s"))
        .unwrap_or_else(|| "U".into());
    let perf = format!(
        "lag={lag};{};{};0; pending={};;;0; failures={}c restarts={}c bytes_sent={}c files_synced={}c failing={};;;0; persistent_failures={};1;{};0;",
        t.warning,
        t.critical,
        s.entry + s.data + s.meta,
        s.failures,
        s.restarts,
        s.bytes_sent,
        s.files_synced,
        s.failing_entries,
        s.persistent_failures,
        t.failures_critical
    );
    (
        code,
        format!("GEOREP {} - {}: {text} | {perf}", word(code), s.session),
    )
}

/// Adds persistent failures of a running session to the verdict: a
/// warning, critical from `failures_critical` entries on.
fn with_failures(s: &Status, t: &Thresholds, code: i32, text: String) -> (i32, String) {
    if s.persistent_failures == 0 || code == UNKNOWN || !s.running() {
        return (code, text);
    }
    let crawls = s
        .persistent_failure_entries
        .iter()
        .map(|e| e.crawls)
        .min()
        .unwrap_or(0);
    let example = s
        .persistent_failure_entries
        .first()
        .map(|e| format!(", e.g. {}: {}", e.path, e.error))
        .unwrap_or_default();
    let what = format!(
        "{} {} failing in every crawl ({crawls}+ in a row){example}",
        s.persistent_failures,
        if s.persistent_failures == 1 {
            "entry"
        } else {
            "entries"
        }
    );
    let pf_code = if s.persistent_failures >= t.failures_critical {
        CRITICAL
    } else {
        WARNING
    };
    match code {
        OK => (pf_code, what),
        _ => (code.max(pf_code), format!("{text}; {what}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::format_rfc3339;

    const NOW: u64 = 1_750_000_000_000_000_000;

    fn active(lag: u64) -> Status {
        Status {
            monitor_status: MonitorStatus::Started,
            worker_status: WorkerStatus::Active,
            crawl_status: Some("Idle".into()),
            last_synced: Some(format_rfc3339(NOW - lag * 1_000_000_000)),
            lag_seconds: Some(lag),
            updated: Some(format_rfc3339(NOW)),
            ..Status::created("s1", "/m", "/s")
        }
    }

    #[test]
    fn codes_follow_state_and_lag() {
        let t = Thresholds {
            warning: 60,
            critical: 600,
            stale: 120,
            failures_critical: 3,
        };
        assert_eq!(check(&active(5), &t, NOW).0, OK);
        assert_eq!(check(&active(60), &t, NOW).0, WARNING);
        assert_eq!(check(&active(600), &t, NOW).0, CRITICAL);
        let faulty = Status {
            worker_status: WorkerStatus::Faulty,
            ..active(0)
        };
        assert_eq!(check(&faulty, &t, NOW).0, CRITICAL);
        let paused = Status {
            monitor_status: MonitorStatus::Paused,
            ..active(0)
        };
        assert_eq!(check(&paused, &t, NOW).0, WARNING);
        let stale = Status {
            updated: Some(format_rfc3339(NOW - 500_000_000_000)),
            ..active(0)
        };
        assert_eq!(check(&stale, &t, NOW).0, UNKNOWN);
        let (_, line) = check(&active(5), &t, NOW);
        assert!(
            line.starts_with("GEOREP OK - s1: Active, Idle, lag 5 s | lag=5s;60;600;0; "),
            "{line}"
        );
        // Unknown lag: the perfdata says U, never an empty value.
        let never = Status {
            last_synced: None,
            lag_seconds: None,
            ..active(0)
        };
        let (code, line) = check(&never, &t, NOW);
        assert_eq!(code, WARNING);
        assert!(line.contains("| lag=U;60;600;0; "), "{line}");
        for (_, l) in [check(&active(5), &t, NOW), check(&never, &t, NOW)] {
            assert_perfdata_valid(&l);
        }
    }

    /// Every perfdata item is label=value[UOM];[warn];[crit];[min];[max] with a number or U.
    fn assert_perfdata_valid(line: &str) {
        let perf = line.split_once(" | ").expect("perfdata").1;
        for item in perf.split(' ') {
            let (label, rest) = item.split_once('=').expect(item);
            assert!(!label.is_empty(), "{item}");
            let value = rest.split(';').next().unwrap();
            let num = value.trim_end_matches(|c: char| c.is_ascii_alphabetic() || c == '%');
            assert!(
                value == "U" || num.parse::<f64>().is_ok(),
                "bad perfdata value in {item:?}"
            );
            for field in rest.split(';').skip(1) {
                assert!(field.is_empty() || field.parse::<f64>().is_ok(), "{item}");
            }
        }
    }

    #[test]
    fn persistent_failures_warn_then_go_critical() {
        let t = Thresholds {
            warning: 60,
            critical: 600,
            stale: 120,
            failures_critical: 3,
        };
        let failing = |n: u64| Status {
            failing_entries: n,
            persistent_failures: n,
            persistent_failure_entries: vec![crate::status::FailingEntry {
                path: "d/x".into(),
                error: "Operation not permitted".into(),
                crawls: 4,
            }],
            ..active(5)
        };
        let (code, line) = check(&failing(1), &t, NOW);
        assert_eq!(code, WARNING, "{line}");
        assert!(
            line.contains(
                "1 entry failing in every crawl (4+ in a row), e.g. d/x: Operation not permitted"
            ),
            "{line}"
        );
        assert!(line.contains("persistent_failures=1;1;3;0;"), "{line}");
        assert_eq!(check(&failing(3), &t, NOW).0, CRITICAL);
        // A lag warning and persistent failures: both are said.
        let both = Status {
            lag_seconds: Some(100),
            ..failing(1)
        };
        let (code, line) = check(&both, &t, NOW);
        assert_eq!(code, WARNING);
        assert!(
            line.contains("lag 100 s >= 60 s; 1 entry failing"),
            "{line}"
        );
        assert_perfdata_valid(&line);
    }
}
