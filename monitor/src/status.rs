//! The per-session status file (`status.json`): written only by the
//! monitor (atomically), read by `georep status`, the Nagios check and the
//! Prometheus exporter, which correct it with what the pid files say so a
//! dead or reused pid is never reported as running.

use crate::time::{format_rfc3339, now_ns, parse_rfc3339};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The monitor's state, as gsyncd names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MonitorStatus {
    /// The session exists and was never started.
    Created,
    Started,
    Paused,
    Stopped,
}

/// The worker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerStatus {
    /// Starting: connecting, setting up the watcher.
    Initializing,
    /// Crawling or waiting for changes.
    Active,
    /// Died, hung or cannot reach the slave; `last_error` says why.
    Faulty,
    Stopped,
    /// Paused by `georep pause`: no crawl runs (one in progress waits at its
    /// next file or window), while the watcher keeps counting changes.
    Paused,
}

impl MonitorStatus {
    pub const ALL: [MonitorStatus; 4] = [
        MonitorStatus::Created,
        MonitorStatus::Started,
        MonitorStatus::Paused,
        MonitorStatus::Stopped,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            MonitorStatus::Created => "Created",
            MonitorStatus::Started => "Started",
            MonitorStatus::Paused => "Paused",
            MonitorStatus::Stopped => "Stopped",
        }
    }
}

impl WorkerStatus {
    pub const ALL: [WorkerStatus; 5] = [
        WorkerStatus::Initializing,
        WorkerStatus::Active,
        WorkerStatus::Faulty,
        WorkerStatus::Stopped,
        WorkerStatus::Paused,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerStatus::Initializing => "Initializing",
            WorkerStatus::Active => "Active",
            WorkerStatus::Faulty => "Faulty",
            WorkerStatus::Stopped => "Stopped",
            WorkerStatus::Paused => "Paused",
        }
    }
}

/// A crawl in progress: what it did so far, what it found still to do
/// (totals grow as the crawl discovers work), its rate and the time left.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CrawlProgress {
    /// When the crawl started (RFC 3339 UTC).
    pub started: Option<String>,
    pub entries_visited: u64,
    /// Files handled so far (sent, found unchanged, or failed).
    pub files_done: u64,
    /// Files the crawl found to ship so far; None when unknown (catalog mode).
    pub files_total: Option<u64>,
    /// Bytes of master file data handled so far.
    pub bytes_done: u64,
    pub bytes_total: Option<u64>,
    pub files_remaining: Option<u64>,
    pub bytes_remaining: Option<u64>,
    /// File data handled per second, over the last few seconds.
    pub rate_bytes_per_sec: f64,
    /// `bytes_remaining` at `rate_bytes_per_sec`; None without a rate or a total.
    pub eta_seconds: Option<u64>,
    /// Payload bytes sent to the slave in this crawl.
    pub bytes_sent: u64,
}

/// An entry that failed in the latest crawls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailingEntry {
    pub path: String,
    pub error: String,
    /// Complete crawls in a row in which it failed.
    pub crawls: u32,
}

/// Catalog mode: the newest complete restorable point of one host on the slave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostPoint {
    pub host: String,
    /// The point's time (RFC 3339 UTC); None when the slave has none yet.
    pub newest_complete: Option<String>,
    /// Seconds from that point to now (the RPO by data time), computed by the reader.
    #[serde(default)]
    pub age_seconds: Option<u64>,
}

/// Crawl states reported in `crawl_status`.
pub const CRAWL_STATES: [&str; 3] = ["Full Crawl", "Xtime Crawl", "Idle"];

/// Everything `georep status --json` shows about one session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub session: String,
    pub master: String,
    pub slave: String,
    pub monitor_status: MonitorStatus,
    pub worker_status: WorkerStatus,
    /// "Full Crawl", "Xtime Crawl", "Idle", or null without a worker.
    pub crawl_status: Option<String>,
    /// Every change marked on the master before this time is on the slave (the root's stime).
    pub last_synced: Option<String>,
    pub last_error: Option<String>,
    pub last_error_time: Option<String>,
    pub monitor_pid: Option<u32>,
    pub worker_pid: Option<u32>,
    /// Changes seen by the watcher not yet covered by a complete crawl (distinct paths):
    /// entries created, deleted or renamed; files written; metadata changed.
    pub entry: u64,
    pub data: u64,
    pub meta: u64,
    /// Entries that started failing, cumulative over the session's life:
    /// an entry failing in several crawls in a row counts once, not per retry.
    pub failures: u64,
    /// Worker restarts after a fault since the monitor started.
    pub restarts: u64,
    /// File payload sent, cumulative over the session's life.
    pub bytes_sent: u64,
    pub files_synced: u64,
    pub checkpoint_time: Option<String>,
    pub checkpoint_completed: bool,
    pub checkpoint_completion_time: Option<String>,
    /// Why the current or last full crawl was needed.
    #[serde(default)]
    pub full_crawl_reason: Option<String>,
    /// When the monitor last wrote this file.
    #[serde(default)]
    pub updated: Option<String>,
    /// Seconds since `last_synced`, computed by the reader (null when never synced).
    #[serde(default)]
    pub lag_seconds: Option<u64>,
    /// The role of the session's master root, filled in by the reader:
    /// "master" (a live store never promoted), "promoted", "replica" (a
    /// cascade), or "demoted" (a replica again: this session is fenced).
    #[serde(default)]
    pub role: Option<String>,
    /// The session's epoch (raised by every promote in its lineage).
    #[serde(default)]
    pub epoch: Option<u64>,
    /// The slave's role as its agent last reported it ("replica", "demoted").
    #[serde(default)]
    pub slave_role: Option<String>,
    /// The crawl in progress (null when idle or without a worker).
    #[serde(default)]
    pub crawl_progress: Option<CrawlProgress>,
    /// Distinct entries that failed in the latest complete crawl.
    #[serde(default)]
    pub failing_entries: u64,
    /// Of those, entries that failed in `persistent_failure_crawls` crawls in a row.
    #[serde(default)]
    pub persistent_failures: u64,
    /// The persistent failures (at most 20), longest-failing first.
    #[serde(default)]
    pub persistent_failure_entries: Vec<FailingEntry>,
    /// Catalog mode: per host, the newest complete point on the slave.
    #[serde(default)]
    pub hosts: Vec<HostPoint>,
    /// When a verification of the replica (a scrub pass, or `georep verify`)
    /// last completed. Filled by the reader from the session's files.
    #[serde(default)]
    pub verify_last: Option<String>,
    /// Share of the data (0-1) verified within the scrub period (null without a scrub).
    #[serde(default)]
    pub verify_coverage: Option<f64>,
    /// Mismatches found by the latest verification (the scrub's current or
    /// last pass, or `georep verify`).
    #[serde(default)]
    pub verify_mismatches: u64,
    /// The scrub covers less than its schedule says it should by now.
    #[serde(default)]
    pub verify_behind: bool,
    /// The paths of the latest mismatches (at most 10).
    #[serde(default)]
    pub verify_mismatch_paths: Vec<String>,
    /// Parallel streams of the worker's connection to the slave.
    #[serde(default)]
    pub streams: Option<u64>,
    /// The bandwidth limit in force, bytes/s (null: none).
    #[serde(default)]
    pub bwlimit: Option<u64>,
    /// Bytes/s the worker sent over the last few seconds.
    #[serde(default)]
    pub rate: Option<u64>,
    /// Wire bytes over uncompressed bytes sent by this worker (null: nothing yet).
    #[serde(default)]
    pub compression_ratio: Option<f64>,
}

/// The values of `Status::role`.
pub const ROLES: [&str; 4] = ["master", "promoted", "replica", "demoted"];

impl Status {
    /// The status of a session that no monitor has written yet.
    pub fn created(session: &str, master: &str, slave: &str) -> Status {
        Status {
            session: session.into(),
            master: master.into(),
            slave: slave.into(),
            monitor_status: MonitorStatus::Created,
            worker_status: WorkerStatus::Stopped,
            crawl_status: None,
            last_synced: None,
            last_error: None,
            last_error_time: None,
            monitor_pid: None,
            worker_pid: None,
            entry: 0,
            data: 0,
            meta: 0,
            failures: 0,
            restarts: 0,
            bytes_sent: 0,
            files_synced: 0,
            checkpoint_time: None,
            checkpoint_completed: false,
            checkpoint_completion_time: None,
            full_crawl_reason: None,
            updated: None,
            lag_seconds: None,
            role: None,
            epoch: None,
            slave_role: None,
            crawl_progress: None,
            failing_entries: 0,
            persistent_failures: 0,
            persistent_failure_entries: Vec::new(),
            hosts: Vec::new(),
            verify_last: None,
            verify_coverage: None,
            verify_mismatches: 0,
            verify_behind: false,
            verify_mismatch_paths: Vec::new(),
            streams: None,
            bwlimit: None,
            rate: None,
            compression_ratio: None,
        }
    }

    /// Reads a status file; `Ok(None)` when there is none.
    pub fn read(path: &Path) -> Result<Option<Status>, String> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut data = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        data.push(b'\n');
        crate::write_atomic(path, &data)
    }

    pub fn set_error(&mut self, error: impl Into<String>) {
        self.last_error = Some(error.into());
        self.last_error_time = Some(format_rfc3339(now_ns()));
    }

    /// Nanoseconds of `last_synced`.
    pub fn last_synced_ns(&self) -> Option<u64> {
        self.last_synced
            .as_deref()
            .and_then(|t| parse_rfc3339(t).ok())
    }

    /// Whether the session's processes run (by the pid files, after [`effective`]).
    pub fn running(&self) -> bool {
        matches!(
            self.monitor_status,
            MonitorStatus::Started | MonitorStatus::Paused
        )
    }
}

/// Corrects a status file with the truth of the pid files: a monitor or
/// worker that is not running (killed, crashed, rebooted, pid reused) is
/// never reported as running. Pure, so every case is tested with plain data.
pub fn effective(mut s: Status, monitor_alive: bool, worker_alive: bool, now: u64) -> Status {
    if !monitor_alive {
        if matches!(
            s.monitor_status,
            MonitorStatus::Started | MonitorStatus::Paused
        ) {
            s.set_error(format!(
                "the monitor{} is not running: it was killed or crashed, or the machine rebooted; run `georep start {}`",
                s.monitor_pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                s.session
            ));
            s.monitor_status = MonitorStatus::Stopped;
        }
        s.monitor_pid = None;
        if worker_alive {
            s.worker_status = WorkerStatus::Faulty;
        } else {
            s.worker_status = WorkerStatus::Stopped;
            s.worker_pid = None;
            s.crawl_status = None;
        }
    } else if !worker_alive {
        if matches!(
            s.worker_status,
            WorkerStatus::Initializing | WorkerStatus::Active
        ) {
            s.set_error(format!(
                "the worker{} is not running (the monitor restarts it)",
                s.worker_pid
                    .map(|p| format!(" (pid {p})"))
                    .unwrap_or_default()
            ));
            s.worker_status = WorkerStatus::Faulty;
        }
        s.worker_pid = None;
        s.crawl_status = None;
    }
    if s.worker_pid.is_none() {
        s.crawl_progress = None;
    }
    s.lag_seconds = s
        .last_synced_ns()
        .map(|t| now.saturating_sub(t) / 1_000_000_000);
    for h in &mut s.hosts {
        h.age_seconds = h
            .newest_complete
            .as_deref()
            .and_then(|t| parse_rfc3339(t).ok())
            .map(|t| now.saturating_sub(t) / 1_000_000_000);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running() -> Status {
        Status {
            monitor_status: MonitorStatus::Started,
            worker_status: WorkerStatus::Active,
            crawl_status: Some("Idle".into()),
            monitor_pid: Some(10),
            worker_pid: Some(11),
            last_synced: Some("2025-01-01T00:00:00Z".into()),
            ..Status::created("s1", "/m", "/s")
        }
    }

    #[test]
    fn dead_monitor_is_never_reported_running() {
        let now = parse_rfc3339("2025-01-01T00:01:00Z").unwrap();
        for worker_alive in [false, true] {
            let s = effective(running(), false, worker_alive, now);
            assert_eq!(s.monitor_status, MonitorStatus::Stopped);
            assert_ne!(s.worker_status, WorkerStatus::Active);
            assert_eq!(s.monitor_pid, None);
            assert!(s.last_error.unwrap().contains("pid 10"));
            assert!(!effective(running(), false, worker_alive, now).running());
        }
        assert_eq!(effective(running(), true, true, now).lag_seconds, Some(60));
    }

    #[test]
    fn dead_worker_is_faulty_and_stopped_stays_stopped() {
        let s = effective(running(), true, false, 0);
        assert_eq!(s.worker_status, WorkerStatus::Faulty);
        assert_eq!(s.worker_pid, None);
        let stopped = Status {
            monitor_status: MonitorStatus::Stopped,
            worker_status: WorkerStatus::Stopped,
            ..Status::created("s1", "/m", "/s")
        };
        let s = effective(stopped.clone(), false, false, 0);
        assert_eq!(s.last_error, None);
        assert_eq!(s.monitor_status, MonitorStatus::Stopped);
        let c = effective(Status::created("s", "/m", "/s"), false, false, 0);
        assert_eq!(c.monitor_status, MonitorStatus::Created);
    }
}
