//! What the worker tells its monitor: one JSON object per line on its
//! stdout, at least once a second (the heartbeat) and at every change.

use crate::status::{CrawlProgress, FailingEntry, HostPoint, WorkerStatus};
use serde::{Deserialize, Serialize};

/// The worker sends a report at least this often; the monitor's hang
/// detection counts on it.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);

/// One report line.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Initializing, Active, or Faulty while it retries the slave by itself.
    pub status: Option<WorkerStatus>,
    pub crawl_status: Option<String>,
    /// In a crawl: `progress` must keep moving, or the worker is hung.
    pub busy: bool,
    /// A number that changes whenever the crawl does anything.
    pub progress: u64,
    /// The root's stime (ns): every change marked before it is on the slave.
    pub last_synced_ns: Option<u64>,
    pub entry: u64,
    pub data: u64,
    pub meta: u64,
    /// Totals of this worker process (`failures`: entries that started failing).
    pub failures: u64,
    pub bytes_sent: u64,
    pub files_synced: u64,
    /// The latest error (a failed entry, a lost connection).
    pub error: Option<String>,
    pub full_crawl_reason: Option<String>,
    /// Sent just before the worker exits because of this error.
    pub fatal: Option<String>,
    /// The crawl in progress: done, to go, rate, ETA.
    #[serde(default)]
    pub crawl_progress: Option<CrawlProgress>,
    /// Distinct entries that failed in the latest complete crawl.
    #[serde(default)]
    pub failing_entries: u64,
    #[serde(default)]
    pub persistent_failures: u64,
    #[serde(default)]
    pub persistent_failure_entries: Vec<FailingEntry>,
    /// Catalog mode: per host, the newest complete point on the slave (None: not known yet).
    #[serde(default)]
    pub hosts: Option<Vec<HostPoint>>,
}
