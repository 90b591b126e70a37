//! The daemon's worker (`georep worker SESSION`, spawned by the monitor):
//! crawls, then waits for changes and crawls again (continuous mode), or
//! makes one pass per interval (interval mode), reporting to the monitor
//! on stdout at least once a second. One crawl is one call of
//! [`Worker::crawl`]; this module only decides when, and with what
//! continuity, to make it.

use crate::daemon::failures::Tracker;
use crate::daemon::watcher::Watcher;
use crate::engine::context::CrawlKind;
use crate::engine::context::Engine;
use crate::engine::outcome::{SyncOptions, WorkerError};
use crate::engine::progress::{self, Rate};
use crate::engine::worker::Worker;
use crate::error::Retry;
use crate::fs::xtime;
use crate::session::{MarkerPolicy, Session, SyncMode};
use georep_monitor::backoff::Backoff;
use georep_monitor::checkpoint::{self, Checkpoint};
use georep_monitor::report::{WorkerReport, HEARTBEAT};
use georep_monitor::status::{HostPoint, WorkerStatus};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A quiet master still gets a crawl (of the root) this often, so
/// `last_synced` keeps moving and the whole path is proven alive.
pub const IDLE_CRAWL: Duration = Duration::from_secs(60);
/// An idle worker claims the slave current up to this long ago (the
/// watcher gathers events for 50 ms before it stamps them).
const IDLE_MARGIN: Duration = Duration::from_secs(1);
/// Backoff between crawls that did not complete (failed entries, lost slave).
const RETRY: Backoff = Backoff {
    base: Duration::from_secs(1),
    max: Duration::from_secs(60),
};

/// What the heartbeat task reports, besides the live crawl.
#[derive(Default)]
struct Reported {
    report: WorkerReport,
    /// Totals of the crawls that ended.
    failures: u64,
    bytes_sent: u64,
    files_synced: u64,
    crawls: u64,
}

type Live = Arc<Mutex<Option<Arc<Engine>>>>;

/// The rate of the crawl in progress.
#[derive(Default)]
struct Pace {
    crawl: usize,
    rate: Rate,
}

/// Sends reports to the monitor: one JSON line on stdout.
#[derive(Clone)]
struct Reporter {
    state: Arc<Mutex<Reported>>,
    live: Live,
    watcher: Option<Arc<crate::daemon::watcher::Shared>>,
    shutdown: CancellationToken,
    pause: tokio::sync::watch::Receiver<bool>,
    pace: Arc<Mutex<Pace>>,
}

fn engine_progress(e: &Engine) -> (u64, u64, u64) {
    let s = &e.stats;
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let wire = e.slave.client().stats();
    let progress = l(&s.entries_visited)
        + l(&s.files_synced)
        + l(&s.files_unchanged)
        + l(&s.bytes_literal)
        + l(&s.bytes_delta)
        + l(&s.deletes)
        + l(&s.dirs_created)
        + l(&s.symlinks)
        + l(&s.hardlinks)
        + l(&s.meta_updates)
        + l(&s.stimes_written)
        + e.failure_count()
        // Every 64 KiB on the wire (keep-alive pings alone never move it).
        + ((l(&wire.bytes_in) + l(&wire.bytes_out)) >> 16);
    (
        progress,
        l(&s.bytes_literal) + l(&s.bytes_delta),
        l(&s.files_synced),
    )
}

impl Reporter {
    fn update(&self, f: impl FnOnce(&mut Reported)) {
        f(&mut self.state.lock().unwrap());
        self.send();
    }

    fn send(&self) {
        let mut r = {
            let st = self.state.lock().unwrap();
            let mut r = st.report.clone();
            r.failures = st.failures;
            r.bytes_sent = st.bytes_sent;
            r.files_synced = st.files_synced;
            r.progress = st.crawls;
            r
        };
        if let Some(e) = self.live.lock().unwrap().clone() {
            let (progress, bytes, files) = engine_progress(&e);
            r.busy = true;
            r.progress += progress;
            r.bytes_sent += bytes;
            r.files_synced += files;
            let mut pace = self.pace.lock().unwrap();
            let id = Arc::as_ptr(&e) as usize;
            if pace.crawl != id {
                *pace = Pace {
                    crawl: id,
                    rate: Rate::since(e.started),
                };
            }
            let held = *self.pause.borrow();
            r.crawl_progress = Some(progress::snapshot(&e, &mut pace.rate, held));
            r.crawl_status = Some(
                match e.kind {
                    CrawlKind::Full => "Full Crawl",
                    CrawlKind::Xtime => "Xtime Crawl",
                }
                .into(),
            );
        }
        if let Some(w) = &self.watcher {
            (r.entry, r.data, r.meta) = w.pending.lock().unwrap().counts();
        }
        if *self.pause.borrow() && r.status != Some(WorkerStatus::Stopped) {
            r.status = Some(WorkerStatus::Paused);
        }
        let line = serde_json::to_string(&r).expect("report serializes");
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            // The monitor is gone: nobody supervises this worker any more.
            self.shutdown.cancel();
        }
    }
}

fn root_xtime(root: &Path, master: &uuid::Uuid) -> u64 {
    xtime::read(root, &xtime::xtime_attr(master)).unwrap_or(0)
}

/// Records a checkpoint's completion once the root's stime reached it.
fn complete_checkpoint(session: &Session, synced: Option<u64>) {
    let Some(synced) = synced else { return };
    let r = checkpoint::update(&session.checkpoint_path(), |cp| match cp {
        Some(c) if c.completed_at_ns.is_none() && c.reached(synced) => (
            Some(Checkpoint {
                completed_at_ns: Some(xtime::now_ns()),
                ..c
            }),
            true,
        ),
        _ => (None, false),
    });
    if let Ok(true) = r {
        tracing::info!(session = %session.name, "checkpoint completed");
    }
}

/// A checkpoint whose time has come but that the root's xtime does not
/// reach yet: stamping the root makes the next crawl carry its stime past it.
fn checkpoint_due(session: &Session, root_x: u64) -> bool {
    Checkpoint::read(&session.checkpoint_path()).is_some_and(|c| {
        c.completed_at_ns.is_none() && c.time_ns <= xtime::now_ns() && root_x < c.time_ns
    })
}

/// Runs until `shutdown`; returns an error only for what the monitor must
/// handle (a restart). While `pause` says true no crawl starts and the one
/// in progress waits; the watcher goes on counting changes.
pub async fn run(
    session: &Session,
    shutdown: CancellationToken,
    pause: tokio::sync::watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    let mut reporter = Reporter {
        state: Arc::default(),
        live: Arc::default(),
        watcher: None,
        shutdown: shutdown.clone(),
        pause,
        pace: Arc::default(),
    };
    reporter.update(|r| {
        r.report.status = Some(WorkerStatus::Initializing);
        r.report.last_synced_ns = session.state().last_synced_xtime;
    });
    let heartbeat = {
        let mut tick = tokio::time::interval(HEARTBEAT);
        let rep = Arc::new(Mutex::new(reporter.clone()));
        let rep2 = rep.clone();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        let r = rep2.lock().unwrap().clone();
                        tokio::task::spawn_blocking(move || r.send()).await.ok();
                    }
                }
            }
        });
        (rep, task)
    };
    let result = run_loop(session, &mut reporter, &heartbeat.0, shutdown.clone()).await;
    heartbeat.1.abort();
    let _ = heartbeat.1.await;
    reporter.live = Arc::default();
    match &result {
        Ok(()) | Err(WorkerError::Shutdown) => reporter.update(|r| {
            r.report.status = Some(WorkerStatus::Stopped);
            r.report.crawl_status = None;
        }),
        Err(e) => reporter.update(|r| r.report.fatal = Some(e.to_string())),
    }
    match result {
        Err(WorkerError::Shutdown) => Ok(()),
        other => other,
    }
}

async fn run_loop(
    session: &Session,
    reporter: &mut Reporter,
    heartbeat: &Arc<Mutex<Reporter>>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let mut worker = Worker::open(session)?;
    worker.pause = Some(reporter.pause.clone());
    let mut pause = reporter.pause.clone();
    let mut tracker = Tracker::new(session.config.persistent_failure_crawls);
    let root = session.config.master.clone();
    let master = worker.master_id();
    reporter.live = worker.live.clone();
    let watcher = if session.config.marker == MarkerPolicy::Auto {
        let r = root.clone();
        let w = tokio::task::spawn_blocking(move || Watcher::start(r, master))
            .await
            .expect("watcher set-up panicked")
            .map_err(|source| WorkerError::Master {
                path: root.clone(),
                source,
            })?;
        reporter.watcher = Some(w.shared().clone());
        Some(w)
    } else {
        None
    };
    *heartbeat.lock().unwrap() = reporter.clone();
    let interval = Duration::from_secs(session.config.interval_secs.max(1));
    let continuous_mode = session.config.mode == SyncMode::Continuous;
    // Watcher gaps when the previous crawl started (None: no previous crawl under this watcher).
    let mut prev_gaps: Option<u64> = None;
    let mut prev_changes = watcher.as_ref().map(|w| w.changes()).unwrap_or(0);
    let mut prev_root_x: Option<u64> = None;
    let mut last_start: Option<Instant> = None;
    let mut retry: Option<(u32, Instant)> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        // Wait until a crawl is due.
        loop {
            if shutdown.is_cancelled() {
                worker.close().await;
                return Ok(());
            }
            if *pause.borrow_and_update() {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = pause.changed() => {}
                }
                continue;
            }
            let now = Instant::now();
            let root_x = root_xtime(&root, &master);
            if last_start.is_some() && retry.is_none() {
                // The last crawl was complete; if nothing changed since it
                // started (no stamp, no watcher event, no gap), the slave is
                // current now, not as of that crawl: lag stays near 0.
                let quiet = watcher
                    .as_ref()
                    .is_none_or(|w| w.changes() == prev_changes && Some(w.gaps()) == prev_gaps);
                if quiet && prev_root_x == Some(root_x) {
                    let proven = xtime::now_ns().saturating_sub(IDLE_MARGIN.as_nanos() as u64);
                    reporter.update(|r| {
                        if r.report.last_synced_ns.is_some_and(|t| t < proven) {
                            r.report.last_synced_ns = Some(proven);
                        }
                    });
                }
            }
            let due = match (retry, last_start) {
                (_, None) => true,
                (Some((_, at)), _) => now >= at,
                (None, Some(started)) if !continuous_mode => {
                    now.duration_since(started) >= interval
                }
                (None, Some(started)) => {
                    let changed = watcher.as_ref().is_some_and(|w| {
                        w.changes() != prev_changes || Some(w.gaps()) != prev_gaps
                    });
                    changed
                        || prev_root_x != Some(root_x)
                        || checkpoint_due(session, root_x)
                        || now.duration_since(started) >= IDLE_CRAWL
                }
            };
            if due {
                break;
            }
            let notified = async {
                match &watcher {
                    Some(w) if continuous_mode => w.shared().notify.notified().await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = notified => {}
                _ = tick.tick() => {}
            }
        }
        // Interval passes, idle crawls and due checkpoints stamp the root,
        // so the root's stime (last_synced) records this crawl.
        let root_x = root_xtime(&root, &master);
        let idle = watcher.as_ref().is_none_or(|w| w.changes() == prev_changes)
            && prev_root_x == Some(root_x);
        if retry.is_none() && (!continuous_mode || idle || checkpoint_due(session, root_x)) {
            if let Err(e) = xtime::mark(&root) {
                tracing::warn!(error = %e, "cannot stamp the master root");
            }
        }
        let gaps = watcher.as_ref().map(|w| w.gaps());
        let marker_continuous = gaps.is_some() && prev_gaps == gaps;
        if let (Some(w), Some(_)) = (&watcher, prev_gaps) {
            if !marker_continuous {
                tracing::info!(reason = ?w.last_gap(), "watcher gap since the last crawl");
            }
        }
        prev_gaps = gaps;
        prev_changes = watcher.as_ref().map(|w| w.changes()).unwrap_or(0);
        prev_root_x = Some(root_xtime(&root, &master));
        last_start = Some(Instant::now());
        if let Some(w) = reporter.watcher.as_ref() {
            w.pending.lock().unwrap().begin_crawl();
        }
        let opts = SyncOptions {
            full: false,
            marker_continuous,
        };
        let result = worker.crawl(&opts, shutdown.clone()).await;
        let complete = matches!(&result, Ok(s) if s.complete);
        if let Some(w) = reporter.watcher.as_ref() {
            w.pending.lock().unwrap().end_crawl(complete);
        }
        match result {
            Ok(summary) => {
                let quiet = summary.files_synced == 0
                    && summary.deletes == 0
                    && summary.meta_updates == 0
                    && summary.dirs_created == 0
                    && summary.symlinks == 0
                    && summary.failures == 0
                    && summary.full_reason.is_none();
                // A quiet crawl (the idle one every minute) is routine: debug, not info.
                macro_rules! crawl_done {
                    ($level:ident) => {
                        tracing::$level!(
                            crawl = summary.crawl,
                            complete = summary.complete,
                            files_synced = summary.files_synced,
                            bytes_sent = summary.bytes_sent,
                            failures = summary.failures,
                            duration_ms = summary.duration_ms,
                            "crawl done"
                        )
                    };
                }
                if quiet {
                    crawl_done!(debug);
                } else {
                    crawl_done!(info);
                }
                let synced = session.state().last_synced_xtime;
                if complete {
                    complete_checkpoint(session, synced);
                }
                let started_failing = tracker.crawl(&summary.failed);
                let persistent = tracker.persistent_entries();
                let error = match persistent.first() {
                    Some(p) => Some(format!(
                        "{} entries failing in every crawl ({}+ in a row), e.g. {}: {}",
                        tracker.persistent(),
                        p.crawls,
                        p.path,
                        p.error
                    )),
                    None => summary.errors.first().map(|f| {
                        format!(
                            "{} entries failed, e.g. {}: {}",
                            summary.failures, f.path, f.error
                        )
                    }),
                };
                let hosts = summary.catalog.as_ref().map(|c| {
                    c.newest
                        .iter()
                        .map(|h| HostPoint {
                            host: h.host.clone(),
                            newest_complete: h
                                .newest_complete
                                .map(georep_monitor::time::format_rfc3339),
                            age_seconds: None,
                        })
                        .collect::<Vec<_>>()
                });
                retry = if complete {
                    None
                } else {
                    let n = retry.map(|r| r.0).unwrap_or(0) + 1;
                    Some((n, Instant::now() + RETRY.delay(n)))
                };
                reporter.update(|r| {
                    r.crawls += 1;
                    r.failures += started_failing;
                    r.report.failing_entries = tracker.failing();
                    r.report.persistent_failures = tracker.persistent();
                    r.report.persistent_failure_entries = persistent;
                    r.report.crawl_progress = None;
                    if hosts.is_some() {
                        r.report.hosts = hosts;
                    }
                    r.bytes_sent += summary.bytes_sent;
                    r.files_synced += summary.files_synced;
                    r.report.status = Some(WorkerStatus::Active);
                    r.report.crawl_status = Some("Idle".into());
                    r.report.busy = false;
                    r.report.last_synced_ns = synced;
                    if summary.full_reason.is_some() {
                        r.report.full_crawl_reason = summary.full_reason.clone();
                    }
                    if error.is_some() {
                        r.report.error = error;
                    }
                });
            }
            Err(WorkerError::Shutdown) => {
                worker.close().await;
                return Ok(());
            }
            Err(e) if e.retry() == Retry::Temporary && !matches!(e, WorkerError::Busy { .. }) => {
                // The watcher keeps running, so continuity survives a lost slave.
                let n = retry.map(|r| r.0).unwrap_or(0) + 1;
                let delay = RETRY.delay(n);
                tracing::warn!(error = %e, retry_in_secs = delay.as_secs(), "crawl failed");
                retry = Some((n, Instant::now() + delay));
                reporter.update(|r| {
                    r.crawls += 1;
                    r.report.status = Some(WorkerStatus::Faulty);
                    r.report.crawl_status = None;
                    r.report.busy = false;
                    r.report.error = Some(e.to_string());
                });
            }
            Err(e) => {
                worker.close().await;
                return Err(e);
            }
        }
    }
}
