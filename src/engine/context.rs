//! The shared state of one pass over the master (a tree crawl or a
//! catalog sync): both sides, the counters, the budgets that bound memory
//! and concurrency, and the failures recorded so far. The crawl
//! (`engine::crawl`) and file shipping (`engine::transfer`) work on it.

use crate::engine::links::Links;
use crate::engine::master::Master;
use crate::engine::slave::Slave;
use crate::fs::relpath::RelPath;
use crate::protocol::ProtoError;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// How much the crawl may trust xtimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrawlKind {
    /// Every entry compared by stat and metadata: xtimes are not trusted.
    Full,
    /// Only entries whose xtime is newer than the directory's stime.
    Xtime,
}

/// Bytes of small files read but not yet queued for the transport.
pub const READ_BUDGET: usize = 8 << 20;
/// Large files transferred at once (each holds a few windows in memory).
const LARGE_FILES: usize = 2;
/// Segments of shared large files in flight at once over all streams
/// (each holds one window in memory; see `engine::transfer::segments`).
const SEGMENT_SLOTS: usize = 8;
/// Plain files being shipped at once across the whole crawl. Directories
/// are visited concurrently, each with up to `DIR_CONCURRENCY` actions, so
/// without this bound an initial sync of 200 directories of 100 files had
/// 20k action futures of 2.3 KiB alive (93 MiB of worker memory; 50 MiB
/// with this bound). Files wait here for their commit reply, so the bound
/// stays above the agent's commit batch (512 files): 256 made every batch
/// end early (input idle) and cost one more syncfs per 256 files.
const FILE_SLOTS: usize = 1024;
/// Counters of the work a crawl found and handled; exact, updated by the
/// crawl (found) and by file shipping (handled).
#[derive(Debug, Default)]
pub struct Work {
    /// Files the crawl planned to ship, and their sizes.
    pub files_found: AtomicU64,
    pub bytes_found: AtomicU64,
    /// Files handled (sent, unchanged or failed), and the bytes of master
    /// data handled (large files count window by window).
    pub files_done: AtomicU64,
    pub bytes_done: AtomicU64,
    /// Whether `*_found` mean anything (the tree crawl plans; catalog mode does not).
    pub planned: std::sync::atomic::AtomicBool,
}

/// Distinct failing paths remembered per crawl (beyond it, only counted).
pub const FAILED_PATHS: usize = 10_000;
/// Counters of one crawl; exact, so tests assert on them.
#[derive(Debug, Default)]
pub struct Stats {
    pub entries_visited: AtomicU64,
    pub files_synced: AtomicU64,
    pub files_unchanged: AtomicU64,
    /// Files patched in place on the slave (`inplace_min_size`).
    pub files_in_place: AtomicU64,
    /// Files sent in segments over several streams at once.
    pub files_split: AtomicU64,
    /// Bytes not sent again because an interrupted transfer resumed.
    pub bytes_resumed: AtomicU64,
    pub bytes_literal: AtomicU64,
    pub bytes_delta: AtomicU64,
    pub deletes: AtomicU64,
    pub dirs_created: AtomicU64,
    pub symlinks: AtomicU64,
    pub hardlinks: AtomicU64,
    pub meta_updates: AtomicU64,
    pub skipped: AtomicU64,
    pub stimes_written: AtomicU64,
    /// Directories a full crawl found as recorded and did not compare.
    pub dirs_unchanged: AtomicU64,
}

/// One entry that failed; retried by the next crawl.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub path: String,
    pub error: String,
}

/// Shared state of one crawl.
pub struct Engine {
    pub master: Master,
    pub slave: Slave,
    pub kind: CrawlKind,
    pub stats: Stats,
    /// Work found and handled, for progress and ETA.
    pub work: Work,
    /// When the pass started (ns since the epoch, and as an instant for rates).
    pub started_ns: u64,
    pub started: std::time::Instant,
    pub read_budget: Semaphore,
    pub large_files: Semaphore,
    /// See [`SEGMENT_SLOTS`].
    pub segment_slots: Semaphore,
    /// See [`FILE_SLOTS`].
    pub(crate) file_slots: Arc<Semaphore>,
    fids: AtomicU64,
    links: Links,
    /// Directories completed and their new stimes, not yet written (see `engine::crawl`).
    pub(crate) stimes: Mutex<Vec<(RelPath, u64)>>,
    /// Directories completed and their new entry digests, written with the stimes.
    pub(crate) digests: Mutex<Vec<(RelPath, crate::hash::Hash16)>>,
    /// Whether a full crawl may skip directories whose entry digest is the
    /// one recorded (see `engine::crawl`): only when the slave is the one
    /// last synced and only the marker's continuity is in doubt.
    trust_digests: std::sync::atomic::AtomicBool,
    failures: Mutex<Vec<Failure>>,
    /// Distinct failing paths (the first [`FAILED_PATHS`]) with their error.
    failed: Mutex<std::collections::HashMap<String, String>>,
    failure_count: AtomicU64,
    /// While it says true, the crawl waits at its next directory, file or window.
    pause: std::sync::OnceLock<tokio::sync::watch::Receiver<bool>>,
    fatal: Mutex<Option<ProtoError>>,
    /// The slave ran out of space: the first such error (the crawl stops).
    full: Mutex<Option<String>>,
    shutdown: CancellationToken,
    /// Files at least this big are patched in place on the slave (u64::MAX: never).
    inplace_min_size: AtomicU64,
}

impl Engine {
    pub fn new(
        master: Master,
        slave: Slave,
        kind: CrawlKind,
        links: Links,
        shutdown: CancellationToken,
    ) -> Arc<Engine> {
        Arc::new(Engine {
            master,
            slave,
            kind,
            stats: Stats::default(),
            work: Default::default(),
            started_ns: crate::fs::xtime::now_ns(),
            started: std::time::Instant::now(),
            read_budget: Semaphore::new(READ_BUDGET),
            large_files: Semaphore::new(LARGE_FILES),
            segment_slots: Semaphore::new(SEGMENT_SLOTS),
            file_slots: Arc::new(Semaphore::new(FILE_SLOTS)),
            fids: AtomicU64::new(1),
            links,
            stimes: Mutex::new(Vec::new()),
            digests: Mutex::new(Vec::new()),
            trust_digests: std::sync::atomic::AtomicBool::new(false),
            failures: Mutex::new(Vec::new()),
            failed: Mutex::default(),
            failure_count: AtomicU64::new(0),
            pause: std::sync::OnceLock::new(),
            fatal: Mutex::new(None),
            full: Mutex::new(None),
            shutdown,
            inplace_min_size: AtomicU64::new(u64::MAX),
        })
    }

    /// Lets this (full) crawl skip directories whose entries are as recorded.
    pub fn set_trust_digests(&self, on: bool) {
        self.trust_digests.store(on, Ordering::Relaxed);
    }

    pub(crate) fn trust_digests(&self) -> bool {
        self.trust_digests.load(Ordering::Relaxed)
    }

    /// Patch files of at least `min` bytes in place on the slave (None: never).
    pub fn set_inplace_min_size(&self, min: Option<u64>) {
        self.inplace_min_size
            .store(min.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Whether a file of `size` bytes is to be patched in place.
    pub fn in_place(&self, size: u64) -> bool {
        size >= self.inplace_min_size.load(Ordering::Relaxed)
    }

    pub fn next_fid(&self) -> u64 {
        self.fids.fetch_add(1, Ordering::Relaxed)
    }

    pub fn links(&self) -> &Links {
        &self.links
    }

    /// Holds the crawl while `pause` says true (`georep pause`).
    pub fn set_pause(&self, pause: tokio::sync::watch::Receiver<bool>) {
        let _ = self.pause.set(pause);
    }

    /// Waits while the session is paused (returns at once when stopping).
    pub(crate) async fn gate(&self) {
        let Some(rx) = self.pause.get() else { return };
        let mut rx = rx.clone();
        while *rx.borrow_and_update() {
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    pub(crate) fn fail(&self, path: &RelPath, error: impl std::fmt::Display) {
        let error = error.to_string();
        tracing::warn!(path = %path, %error, "entry failed; it will be retried by the next crawl");
        {
            // Counted once per entry: a path failing twice in a crawl is one failing entry.
            let mut failed = self.failed.lock().unwrap();
            let key = path.to_string();
            if failed.contains_key(&key) {
                return;
            }
            if failed.len() < FAILED_PATHS {
                failed.insert(key, error.clone());
            }
        }
        self.failure_count.fetch_add(1, Ordering::Relaxed);
        let mut f = self.failures.lock().unwrap();
        if f.len() < 100 {
            f.push(Failure {
                path: path.to_string(),
                error,
            });
        }
    }

    pub(crate) fn set_fatal(&self, e: ProtoError) {
        let mut f = self.fatal.lock().unwrap();
        if f.is_none() {
            tracing::error!(error = %e, "connection to the slave failed");
            *f = Some(e);
        }
    }

    /// Whether the worker was asked to stop (large transfers check it between windows).
    pub(crate) fn shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    pub(crate) fn stopped(&self) -> bool {
        self.shutdown.is_cancelled()
            || self.fatal.lock().unwrap().is_some()
            || self.full.lock().unwrap().is_some()
    }

    /// Records a slave error: fatal ones stop the crawl, others fail the
    /// entry. A full slave stops the crawl too (every further write would
    /// fail the same way), reported once, not per file.
    pub(crate) fn slave_err(&self, path: &RelPath, e: ProtoError) {
        // A stream other than the first that was lost fails only the files
        // it carried (retried by the next crawl, which connects again).
        let other_stream = matches!(e, ProtoError::Lost(_) | ProtoError::Timeout(_))
            && self.slave.closed().is_none();
        if e.is_fatal() && !other_stream {
            self.set_fatal(e);
        } else if matches!(&e, ProtoError::Remote(w) if w.kind == crate::protocol::ErrorKind::NoSpace)
        {
            let mut full = self.full.lock().unwrap();
            if full.is_none() {
                tracing::info!(path = %path, error = %e, "the slave is full: the crawl stops");
                *full = Some(e.to_string());
            }
        } else if matches!(&e, ProtoError::Remote(w) if w.kind == crate::protocol::ErrorKind::Permission)
        {
            self.fail(
                path,
                format!("on the slave, {e}: give the slave user (the one the agent runs as) write access to it and to its directory there (the next sync retries it)"),
            );
        } else {
            self.fail(path, e);
        }
    }

    /// The error that showed the slave full, if it did.
    pub(crate) fn slave_full(&self) -> Option<String> {
        self.full.lock().unwrap().clone()
    }

    pub(crate) fn record_slave_err(&self, path: &RelPath, e: ProtoError) {
        self.slave_err(path, e)
    }

    pub fn failure_count(&self) -> u64 {
        self.failure_count.load(Ordering::Relaxed)
    }

    /// The fatal error that stopped the pass, if any.
    pub(crate) fn fatal(&self) -> Option<ProtoError> {
        self.fatal.lock().unwrap().clone()
    }

    /// The first failures recorded (at most 100).
    pub(crate) fn failures(&self) -> Vec<Failure> {
        self.failures.lock().unwrap().clone()
    }

    /// Every distinct failing entry (up to [`FAILED_PATHS`]), sorted by path.
    pub fn failed_entries(&self) -> Vec<Failure> {
        let mut v: Vec<Failure> = self
            .failed
            .lock()
            .unwrap()
            .iter()
            .map(|(p, e)| Failure {
                path: p.clone(),
                error: e.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.path.cmp(&b.path));
        v
    }

    pub(crate) fn shutdown_requested(&self) -> bool {
        self.shutdown.is_cancelled()
    }
}
