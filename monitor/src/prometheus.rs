//! Prometheus text exposition format (version 0.0.4) of the status files,
//! for node_exporter's textfile collector.

use crate::status::{MonitorStatus, Status, WorkerStatus, CRAWL_STATES, ROLES};
use std::fmt::Write;

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let l: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
            .collect();
        let _ = writeln!(self.0, "{name}{{{}}} {value}", l.join(","));
    }
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Renders every session's metrics; each family lists all sessions together.
pub fn render(rows: &[Status]) -> String {
    let mut o = Out(String::new());
    o.family(
        "georep_info",
        "gauge",
        "Session master and slave (always 1).",
    );
    for s in rows {
        o.sample(
            "georep_info",
            &[
                ("session", &s.session),
                ("master", &s.master),
                ("slave", &s.slave),
            ],
            1.0,
        );
    }
    o.family(
        "georep_up",
        "gauge",
        "1 when the monitor runs and the worker is Active.",
    );
    for s in rows {
        let up =
            s.monitor_status == MonitorStatus::Started && s.worker_status == WorkerStatus::Active;
        o.sample("georep_up", &[("session", &s.session)], up as u8 as f64);
    }
    o.family(
        "georep_monitor_status",
        "gauge",
        "Monitor state: 1 for the current one.",
    );
    for s in rows {
        for st in MonitorStatus::ALL {
            o.sample(
                "georep_monitor_status",
                &[("session", &s.session), ("status", st.as_str())],
                (s.monitor_status == st) as u8 as f64,
            );
        }
    }
    o.family(
        "georep_worker_status",
        "gauge",
        "Worker state: 1 for the current one.",
    );
    for s in rows {
        for st in WorkerStatus::ALL {
            o.sample(
                "georep_worker_status",
                &[("session", &s.session), ("status", st.as_str())],
                (s.worker_status == st) as u8 as f64,
            );
        }
    }
    o.family(
        "georep_crawl_status",
        "gauge",
        "Crawl state: 1 for the current one (all 0 without a worker).",
    );
    for s in rows {
        for st in CRAWL_STATES {
            o.sample(
                "georep_crawl_status",
                &[("session", &s.session), ("status", st)],
                (s.crawl_status.as_deref() == Some(st)) as u8 as f64,
            );
        }
    }
    o.family(
        "georep_last_synced_timestamp_seconds",
        "gauge",
        "Every change marked on the master before this time is on the slave.",
    );
    for s in rows {
        if let Some(t) = s.last_synced_ns() {
            o.sample(
                "georep_last_synced_timestamp_seconds",
                &[("session", &s.session)],
                secs(t),
            );
        }
    }
    o.family("georep_lag_seconds", "gauge", "Seconds since last_synced.");
    for s in rows {
        if let Some(l) = s.lag_seconds {
            o.sample("georep_lag_seconds", &[("session", &s.session)], l as f64);
        }
    }
    o.family(
        "georep_pending",
        "gauge",
        "Changes seen by the watcher and not yet synced, by kind (entry, data, meta).",
    );
    for s in rows {
        for (kind, v) in [("entry", s.entry), ("data", s.data), ("meta", s.meta)] {
            o.sample(
                "georep_pending",
                &[("session", &s.session), ("kind", kind)],
                v as f64,
            );
        }
    }
    for (name, help, get) in [
        (
            "georep_failures_total",
            "Entries that failed to sync (counted per crawl).",
            (|s: &Status| s.failures) as fn(&Status) -> u64,
        ),
        (
            "georep_restarts_total",
            "Worker restarts after a fault since the monitor started.",
            |s: &Status| s.restarts,
        ),
        (
            "georep_bytes_sent_total",
            "File payload bytes sent to the slave.",
            |s: &Status| s.bytes_sent,
        ),
        (
            "georep_files_synced_total",
            "Files shipped to the slave.",
            |s: &Status| s.files_synced,
        ),
    ] {
        o.family(name, "counter", help);
        for s in rows {
            o.sample(name, &[("session", &s.session)], get(s) as f64);
        }
    }
    o.family(
        "georep_checkpoint_time_seconds",
        "gauge",
        "The checkpoint's time (absent without a checkpoint).",
    );
    for s in rows {
        if let Some(t) = s
            .checkpoint_time
            .as_deref()
            .and_then(|t| crate::time::parse_rfc3339(t).ok())
        {
            o.sample(
                "georep_checkpoint_time_seconds",
                &[("session", &s.session)],
                secs(t),
            );
        }
    }
    o.family(
        "georep_checkpoint_completed",
        "gauge",
        "1 once everything changed before the checkpoint is on the slave.",
    );
    for s in rows {
        if s.checkpoint_time.is_some() {
            o.sample(
                "georep_checkpoint_completed",
                &[("session", &s.session)],
                s.checkpoint_completed as u8 as f64,
            );
        }
    }
    o.family(
        "georep_checkpoint_completion_timestamp_seconds",
        "gauge",
        "When the checkpoint completed.",
    );
    for s in rows {
        if let Some(t) = s
            .checkpoint_completion_time
            .as_deref()
            .and_then(|t| crate::time::parse_rfc3339(t).ok())
        {
            o.sample(
                "georep_checkpoint_completion_timestamp_seconds",
                &[("session", &s.session)],
                secs(t),
            );
        }
    }
    o.family(
        "georep_role",
        "gauge",
        "Role of the session's master root (master, promoted, replica, demoted): 1 for the current one.",
    );
    for s in rows {
        if let Some(role) = &s.role {
            for r in ROLES {
                o.sample(
                    "georep_role",
                    &[("session", &s.session), ("role", r)],
                    (role == r) as u8 as f64,
                );
            }
        }
    }
    o.family(
        "georep_epoch",
        "gauge",
        "The session's epoch (raised by every promote in its lineage).",
    );
    for s in rows {
        if let Some(e) = s.epoch {
            o.sample("georep_epoch", &[("session", &s.session)], e as f64);
        }
    }
    progress(&mut o, rows);
    o.family(
        "georep_verify_last_timestamp_seconds",
        "gauge",
        "When a verification of the replica last completed (absent before the first).",
    );
    for s in rows {
        if let Some(t) = s
            .verify_last
            .as_deref()
            .and_then(|t| crate::time::parse_rfc3339(t).ok())
        {
            o.sample(
                "georep_verify_last_timestamp_seconds",
                &[("session", &s.session)],
                secs(t),
            );
        }
    }
    o.family(
        "georep_verify_coverage",
        "gauge",
        "Share of the data (0-1) the scrub verified within its period (absent without a scrub).",
    );
    for s in rows {
        if let Some(c) = s.verify_coverage {
            o.sample("georep_verify_coverage", &[("session", &s.session)], c);
        }
    }
    o.family(
        "georep_verify_behind_schedule",
        "gauge",
        "1 when the scrub's coverage is behind its schedule.",
    );
    for s in rows {
        if s.verify_coverage.is_some() {
            o.sample(
                "georep_verify_behind_schedule",
                &[("session", &s.session)],
                s.verify_behind as u8 as f64,
            );
        }
    }
    o.family(
        "georep_verify_mismatches",
        "gauge",
        "Mismatches between master and slave found by the latest verification.",
    );
    for s in rows {
        o.sample(
            "georep_verify_mismatches",
            &[("session", &s.session)],
            s.verify_mismatches as f64,
        );
    }
    o.0
}

/// The crawl in progress, failures and catalog points.
fn progress(o: &mut Out, rows: &[Status]) {
    // Without a worker nothing is known: no sample. Idle: nothing left to do.
    let running = |s: &Status| s.worker_pid.is_some();
    let idle = |s: &Status| s.crawl_progress.is_none();
    o.family(
        "georep_bytes_remaining",
        "gauge",
        "Bytes of file data the crawl in progress found and has not handled yet (0 when idle).",
    );
    for s in rows.iter().filter(|s| running(s)) {
        let v = match &s.crawl_progress {
            None => Some(0),
            Some(p) => p.bytes_remaining,
        };
        if let Some(v) = v {
            o.sample(
                "georep_bytes_remaining",
                &[("session", &s.session)],
                v as f64,
            );
        }
    }
    o.family(
        "georep_files_remaining",
        "gauge",
        "Files the crawl in progress found to ship and has not handled yet (0 when idle).",
    );
    for s in rows.iter().filter(|s| running(s)) {
        let v = match &s.crawl_progress {
            None => Some(0),
            Some(p) => p.files_remaining,
        };
        if let Some(v) = v {
            o.sample(
                "georep_files_remaining",
                &[("session", &s.session)],
                v as f64,
            );
        }
    }
    o.family(
        "georep_eta_seconds",
        "gauge",
        "Estimated seconds until the crawl in progress ends (0 when idle; absent without a rate).",
    );
    for s in rows.iter().filter(|s| running(s)) {
        let v = match &s.crawl_progress {
            None => Some(0),
            Some(p) => p.eta_seconds,
        };
        if let Some(v) = v {
            o.sample("georep_eta_seconds", &[("session", &s.session)], v as f64);
        }
    }
    o.family(
        "georep_crawl_rate_bytes_per_second",
        "gauge",
        "File data handled per second by the crawl in progress.",
    );
    for s in rows.iter().filter(|s| running(s) && !idle(s)) {
        let rate = s.crawl_progress.as_ref().map(|p| p.rate_bytes_per_sec);
        o.sample(
            "georep_crawl_rate_bytes_per_second",
            &[("session", &s.session)],
            rate.unwrap_or(0.0),
        );
    }
    o.family(
        "georep_failing_entries",
        "gauge",
        "Distinct entries that failed in the latest complete crawl.",
    );
    for s in rows {
        o.sample(
            "georep_failing_entries",
            &[("session", &s.session)],
            s.failing_entries as f64,
        );
    }
    o.family(
        "georep_persistent_failures",
        "gauge",
        "Entries failing in every crawl for persistent_failure_crawls crawls in a row.",
    );
    for s in rows {
        o.sample(
            "georep_persistent_failures",
            &[("session", &s.session)],
            s.persistent_failures as f64,
        );
    }
    o.family(
        "georep_point_timestamp_seconds",
        "gauge",
        "Catalog mode: the newest complete restorable point of a host on the slave.",
    );
    for s in rows {
        for h in &s.hosts {
            if let Some(t) = h
                .newest_complete
                .as_deref()
                .and_then(|t| crate::time::parse_rfc3339(t).ok())
            {
                o.sample(
                    "georep_point_timestamp_seconds",
                    &[("session", &s.session), ("host", &h.host)],
                    secs(t),
                );
            }
        }
    }
    o.family(
        "georep_point_age_seconds",
        "gauge",
        "Catalog mode: age of a host's newest complete point on the slave (the RPO by data time).",
    );
    for s in rows {
        for h in &s.hosts {
            if let Some(a) = h.age_seconds {
                o.sample(
                    "georep_point_age_seconds",
                    &[("session", &s.session), ("host", &h.host)],
                    a as f64,
                );
            }
        }
    }
}
