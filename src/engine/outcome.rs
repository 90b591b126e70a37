//! What a sync reports and why it stops: the summary printed by `sync
//! --json` and kept as `last-sync.json`, and the worker's errors with their
//! retry class. Shared by the tree crawl and catalog mode.

use crate::catalog::points::HostRpo;
use crate::engine::context::Failure;
use crate::error::Retry;
use crate::protocol::ProtoError;
use crate::transport::TransportError;
use serde::Serialize;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("session {session:?} is already being synced by pid {pid}: wait for it, or stop it")]
    Busy { session: String, pid: u32 },
    #[error("{0}")]
    Config(#[from] crate::error::UserError),
    #[error("master {path}: {source}: check that the master is mounted and readable")]
    Master {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("connecting to slave {slave}: {source}")]
    Connect {
        slave: String,
        source: TransportError,
    },
    #[error("slave {slave}: {source}")]
    Slave { slave: String, source: ProtoError },
    #[error("slave full: {slave} has no space left ({detail}): free space on the slave; nothing partial was published and the next sync resumes where this one stopped")]
    SlaveFull { slave: String, detail: String },
    #[error("session state in {path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("interrupted")]
    Shutdown,
    /// The slave is a live store or of a newer epoch, or the master was
    /// demoted: this session must not write (fencing).
    #[error("{0}")]
    Fenced(String),
}

impl WorkerError {
    /// What the monitor (and the exit code) should make of it.
    pub fn retry(&self) -> Retry {
        match self {
            WorkerError::Busy { .. } | WorkerError::Shutdown => Retry::Temporary,
            WorkerError::Config(_) | WorkerError::Fenced(_) => Retry::Permanent,
            WorkerError::Master { .. } => Retry::Temporary,
            WorkerError::Connect { source, .. } => source.retry(),
            WorkerError::Slave { source, .. } => source.retry(),
            WorkerError::State { .. } => Retry::Temporary,
            WorkerError::SlaveFull { .. } => Retry::Temporary,
        }
    }
}

/// What one sync did; printed by `georep sync --json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub session: String,
    /// "full" or "xtime".
    pub crawl: &'static str,
    /// Why a full crawl was needed.
    pub full_reason: Option<String>,
    /// Whether everything reached the slave (no failures, not interrupted).
    pub complete: bool,
    pub entries_visited: u64,
    pub files_synced: u64,
    pub files_unchanged: u64,
    /// Files patched in place on the slave (`inplace_min_size`).
    pub files_in_place: u64,
    /// File payload written to the transport: literal data plus delta instructions.
    pub bytes_sent: u64,
    pub bytes_literal: u64,
    pub bytes_delta: u64,
    /// Every byte written to / read from the transport, protocol overhead included.
    pub wire_bytes_out: u64,
    pub wire_bytes_in: u64,
    pub deletes: u64,
    pub dirs_created: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub meta_updates: u64,
    pub stimes_written: u64,
    /// Directories a full crawl found as last synced (entry digest) and did not compare.
    pub dirs_unchanged: u64,
    pub skipped: u64,
    pub failures: u64,
    pub errors: Vec<Failure>,
    pub duration_ms: u64,
    /// Catalog mode (layout = store): generations, points, locks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub catalog: Option<CatalogSummary>,
    /// Bytes of master file data handled (sent, or found equal by hashes).
    pub bytes_processed: u64,
    /// `bytes_processed` per second of the whole sync.
    pub throughput_bytes_per_sec: f64,
    /// Every distinct failing entry (up to 10,000), for persistent-failure tracking.
    #[serde(skip)]
    pub failed: Vec<Failure>,
    /// The link to the slave: streams, round trip.
    #[serde(flatten)]
    pub link: LinkSummary,
}

impl Summary {
    /// Sets the duration and the throughput it implies.
    pub fn with_duration(self, d: std::time::Duration) -> Summary {
        let secs = d.as_secs_f64();
        Summary {
            duration_ms: d.as_millis() as u64,
            throughput_bytes_per_sec: if secs > 0.0 {
                self.bytes_processed as f64 / secs
            } else {
                0.0
            },
            ..self
        }
    }
}

/// How the worker reached the slave during a sync.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkSummary {
    /// Parallel streams in use (see `streams` in the config).
    pub streams: u64,
    /// Small files (up to 64 KiB, or new files of up to one frame: sent
    /// whole, as a delta, or found equal) that each stream carried, the
    /// primary first.
    pub small_files_by_stream: Vec<u64>,
    /// Files sent in segments over several streams at once.
    pub files_split: u64,
    /// Bytes not sent again: the verified prefix of interrupted transfers.
    pub bytes_resumed: u64,
    /// The round trip measured at the connection's handshake.
    pub rtt_ms: f64,
    /// Wire bytes sent over what they were before compression (1: none).
    pub compression_ratio: f64,
    /// The bandwidth limit in force at the end, bytes/s (null: none).
    pub bwlimit: Option<u64>,
    /// Bytes charged to the limit during this sync (every frame sent while
    /// a limit was in force).
    pub bwlimit_bytes: u64,
}

/// Options of one sync.
#[derive(Debug, Clone, Default)]
pub struct SyncOptions {
    /// Force a full crawl.
    pub full: bool,
    /// A marker (georep's watcher) ran without a gap since this process's
    /// previous crawl, so xtimes can be trusted under the `auto` policy.
    pub marker_continuous: bool,
}

/// What a catalog sync did, beside the transfer counters.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CatalogSummary {
    pub hosts: u64,
    /// Hosts not read at all: unchanged since their stime (xtime crawls).
    pub hosts_unchanged: u64,
    pub generations_published: u64,
    pub generations_deleted: u64,
    /// Images shipped as the master has them.
    pub images_copied: u64,
    /// Images made from a point (a journal point, or rebased on the slave's base).
    pub images_built: u64,
    /// Images the slave already had (a retry after an interruption).
    pub images_unchanged: u64,
    pub cdp_points: u64,
    /// Of those, points the master now holds as images (after a reclamation split).
    pub cdp_points_from_images: u64,
    pub cdp_bytes: u64,
    pub files_removed: u64,
    pub locks_taken: u64,
    pub stale_locks_cleared: u64,
    /// Per host, the newest complete point now on the slave and its age.
    pub newest: Vec<HostRpo>,
}
