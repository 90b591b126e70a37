//! The crawl of DESIGN §4, executed: visit a directory when its xtime is
//! newer than its stime (or always, in a full crawl), make the slave's
//! listing match the master's, ship what changed, descend, and only then
//! record the xtime read before listing as the directory's new stime.

pub mod plan;

use crate::links::Links;
use crate::master::{reserved, MEntry, Master, MasterError};
use crate::meta::{Entry, Kind, Meta};
use crate::protocol::ProtoError;
use crate::relpath::RelPath;
use crate::slave::Slave;
use crate::transfer::{self, FileError, Shipped};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use plan::{Action, CrawlKind};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Bytes of small files read but not yet queued for the transport.
pub const READ_BUDGET: usize = 8 << 20;
/// Large files transferred at once (each holds a few windows in memory).
const LARGE_FILES: usize = 2;
/// Actions of one directory in flight at once.
const DIR_CONCURRENCY: usize = 512;
/// Plain files being shipped at once across the whole crawl. Directories
/// are visited concurrently, each with up to `DIR_CONCURRENCY` actions, so
/// without this bound an initial sync of 200 directories of 100 files had
/// 20k action futures of 2.3 KiB alive (93 MiB of worker memory; 50 MiB
/// with this bound). Files wait here for their commit reply, so the bound
/// stays above the agent's commit batch (512 files): 256 made every batch
/// end early (input idle) and cost one more syncfs per 256 files.
const FILE_SLOTS: usize = 1024;
/// Stimes queued before they are made durable and written mid-crawl.
const STIME_BATCH: usize = 1000;

/// Counters of one crawl; exact, so tests assert on them.
#[derive(Debug, Default)]
pub struct Stats {
    pub entries_visited: AtomicU64,
    pub files_synced: AtomicU64,
    pub files_unchanged: AtomicU64,
    /// Files patched in place on the slave (`inplace_min_size`).
    pub files_in_place: AtomicU64,
    pub bytes_literal: AtomicU64,
    pub bytes_delta: AtomicU64,
    pub deletes: AtomicU64,
    pub dirs_created: AtomicU64,
    pub symlinks: AtomicU64,
    pub hardlinks: AtomicU64,
    pub meta_updates: AtomicU64,
    pub skipped: AtomicU64,
    pub stimes_written: AtomicU64,
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
    pub read_budget: Semaphore,
    pub large_files: Semaphore,
    /// See [`FILE_SLOTS`].
    file_slots: Arc<Semaphore>,
    fids: AtomicU64,
    links: Links,
    stimes: Mutex<Vec<(RelPath, u64)>>,
    failures: Mutex<Vec<Failure>>,
    failure_count: AtomicU64,
    fatal: Mutex<Option<ProtoError>>,
    shutdown: CancellationToken,
    /// Files at least this big are patched in place on the slave (u64::MAX: never).
    inplace_min_size: AtomicU64,
}

/// The slave side of a directory about to be visited.
#[derive(Debug, Clone)]
enum SlaveDir {
    /// Just created: empty, no need to list it.
    Fresh,
    /// Exists; its entry as listed in the parent (None for the root).
    Existing(Option<Entry>),
}

/// Why a crawl could not finish.
#[derive(Debug, thiserror::Error)]
pub enum CrawlError {
    #[error(transparent)]
    Slave(#[from] ProtoError),
    #[error("interrupted by shutdown")]
    Shutdown,
}

/// The result of a crawl that ran to its end (possibly with per-entry failures).
#[derive(Debug)]
pub struct CrawlOutcome {
    /// Every entry reached the slave and every stime was advanced.
    pub complete: bool,
    pub failures: Vec<Failure>,
    pub failure_count: u64,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
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
            read_budget: Semaphore::new(READ_BUDGET),
            large_files: Semaphore::new(LARGE_FILES),
            file_slots: Arc::new(Semaphore::new(FILE_SLOTS)),
            fids: AtomicU64::new(1),
            links,
            stimes: Mutex::new(Vec::new()),
            failures: Mutex::new(Vec::new()),
            failure_count: AtomicU64::new(0),
            fatal: Mutex::new(None),
            shutdown,
            inplace_min_size: AtomicU64::new(u64::MAX),
        })
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

    fn fail(&self, path: &RelPath, error: impl std::fmt::Display) {
        let error = error.to_string();
        tracing::warn!(path = %path, %error, "entry failed; it will be retried by the next crawl");
        self.failure_count.fetch_add(1, Ordering::Relaxed);
        let mut f = self.failures.lock().unwrap();
        if f.len() < 100 {
            f.push(Failure {
                path: path.to_string(),
                error,
            });
        }
    }

    fn set_fatal(&self, e: ProtoError) {
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

    fn stopped(&self) -> bool {
        self.shutdown.is_cancelled() || self.fatal.lock().unwrap().is_some()
    }

    /// Records a slave error: fatal ones stop the crawl, others fail the entry.
    fn slave_err(&self, path: &RelPath, e: ProtoError) {
        if e.is_fatal() {
            self.set_fatal(e);
        } else {
            self.fail(path, e);
        }
    }

    fn file_err(&self, path: &RelPath, e: FileError) {
        match e {
            FileError::Slave(p) => self.slave_err(path, p),
            other => self.fail(path, other),
        }
    }

    /// Runs the whole crawl from the root.
    pub async fn run(self: &Arc<Self>) -> Result<CrawlOutcome, CrawlError> {
        let span =
            tracing::info_span!("crawl", kind = ?self.kind, master = %self.master.root().display());
        let complete = async {
            self.stats.entries_visited.fetch_add(1, Ordering::Relaxed);
            let root = match self.slave.stat(RelPath::root()).await {
                Ok(r) => r,
                Err(e) => {
                    self.slave_err(&RelPath::root(), e);
                    return false;
                }
            };
            self.clone()
                .visit(RelPath::root(), SlaveDir::Existing(root), None)
                .await
        }
        .instrument(span)
        .await;
        if let Some(e) = self.fatal.lock().unwrap().clone() {
            return Err(CrawlError::Slave(e));
        }
        self.flush_stimes().await?;
        if self.shutdown.is_cancelled() {
            return Err(CrawlError::Shutdown);
        }
        let failures = self.failures.lock().unwrap().clone();
        Ok(CrawlOutcome {
            complete,
            failures,
            failure_count: self.failure_count.load(Ordering::Relaxed),
        })
    }

    /// Makes the slave durable, then records the stimes of the
    /// directories completed so far (never before: DESIGN §4).
    pub async fn flush_stimes(&self) -> Result<(), ProtoError> {
        let batch: Vec<(RelPath, u64)> = std::mem::take(&mut *self.stimes.lock().unwrap());
        if batch.is_empty() {
            return Ok(());
        }
        self.slave.barrier().await?;
        for (dir, stamp) in batch {
            match self.master.set_stime(&dir, stamp) {
                Ok(()) => {
                    self.stats.stimes_written.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.vanished() => {}
                Err(e) => self.fail(&dir, e),
            }
        }
        Ok(())
    }

    /// Visits one directory; returns whether its whole subtree is now on the slave.
    fn visit(
        self: Arc<Self>,
        dir: RelPath,
        slave: SlaveDir,
        mentry: Option<MEntry>,
    ) -> BoxFuture<'static, bool> {
        async move {
            if self.stopped() {
                return false;
            }
            let stamps = {
                let e = self.clone();
                let d = dir.clone();
                blocking(move || -> Result<(u64, u64), MasterError> { Ok((e.master.xtime(&d)?, e.master.stime(&d)?)) }).await
            };
            let (xtl, stime) = match stamps {
                Ok(s) => s,
                Err(e) if e.vanished() && !dir.is_root() => return true,
                Err(e) => {
                    self.fail(&dir, e);
                    return false;
                }
            };
            let existing = matches!(slave, SlaveDir::Existing(_));
            if self.kind == CrawlKind::Xtime && existing && xtl <= stime {
                return true;
            }
            // List both sides; the slave listing is in flight while the master is read.
            let slave_list = if existing {
                match self.slave.list(dir.clone()).await {
                    Ok(p) => Some(p),
                    Err(e) => {
                        self.slave_err(&dir, e);
                        return false;
                    }
                }
            } else {
                None
            };
            let mlist = {
                let e = self.clone();
                let d = dir.clone();
                blocking(move || e.master.list(&d)).await
            };
            let slist = match slave_list {
                Some(p) => match p.wait().await {
                    Ok(l) => Some(l),
                    Err(e) => {
                        self.slave_err(&dir, e);
                        return false;
                    }
                },
                None => None,
            };
            let mlist = match mlist {
                Ok(l) => l,
                Err(e) if e.vanished() && !dir.is_root() => return true,
                Err(e) => {
                    self.fail(&dir, e);
                    return false;
                }
            };
            self.stats.entries_visited.fetch_add(mlist.len() as u64, Ordering::Relaxed);
            let plan = plan::plan_dir(self.kind, &mlist, slist.as_deref(), stime, |n| reserved(&dir, n));
            for &i in &plan.skipped {
                tracing::debug!(path = %dir.join(&mlist[i].entry.name).unwrap_or_default(), "not replicated (special file or reserved name)");
                self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            }
            for m in &mlist {
                if m.entry.kind == Kind::File && m.entry.nlink > 1 {
                    if let Ok(p) = dir.join(&m.entry.name) {
                        self.links.saw(&m.entry, &p);
                    }
                }
            }
            let mut ok = true;
            // Whether this directory's own entries change (which moves its mtime).
            let dirty = !existing || !plan.remove.is_empty() || plan.actions.iter().any(|(_, a)| !matches!(a, Action::Visit | Action::Meta));
            let mut removes = Vec::new();
            for name in &plan.remove {
                let Ok(p) = dir.join(name) else { continue };
                match self.slave.remove(p.clone()).await {
                    Ok(t) => removes.push((p, t)),
                    Err(e) => {
                        self.slave_err(&p, e);
                        return false;
                    }
                }
            }
            // The agent lists in name order: look entries up by binary search.
            let slave_by_name = |name: &[u8]| {
                let l = slist.as_ref()?;
                l.binary_search_by(|s| s.name.as_slice().cmp(name)).ok().map(|i| l[i].clone())
            };
            let work: Vec<_> = plan
                .actions
                .iter()
                .filter_map(|(i, a)| {
                    let m = mlist[*i].clone();
                    let s = slave_by_name(&m.entry.name);
                    dir.join(&m.entry.name).ok().map(|p| (p, m, s, a.clone()))
                })
                .collect();
            // Futures are made as slots free up, so a huge directory costs
            // memory for its listing, not for one future per entry.
            // A plain file's action is made once it has a file slot (see
            // FILE_SLOTS). Hard-linked files may wait for another name of
            // their inode to be shipped, and directories for their
            // children, so neither takes one: no slot is held while
            // waiting for another.
            let actions = futures::stream::iter(work)
                .then(|(p, m, s, a)| {
                    let slots = self.file_slots.clone();
                    async move {
                        let slot = match a {
                            Action::Ship { .. } if m.entry.nlink <= 1 => {
                                Some(slots.acquire_owned().await.expect("never closed"))
                            }
                            _ => None,
                        };
                        (p, m, s, a, slot)
                    }
                })
                .map(|(p, m, s, a, slot)| {
                    let act = self.clone().act(p, m, s, a);
                    async move {
                        let done = act.await;
                        drop(slot);
                        done
                    }
                });
            for (p, t) in removes {
                match t.wait().await {
                    Ok(()) => {
                        self.stats.deletes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        ok = false;
                        self.slave_err(&p, e);
                    }
                }
            }
            let results: Vec<bool> = actions.buffer_unordered(DIR_CONCURRENCY).collect().await;
            ok &= results.iter().all(|&r| r);
            if !ok || self.stopped() {
                return false;
            }
            // Directory metadata last: creating children changed its mtime.
            let meta = match mentry {
                Some(m) => m.entry.meta,
                None => {
                    let e = self.clone();
                    let d = dir.clone();
                    match blocking(move || e.master.stat(&d)).await {
                        Ok(m) => m.entry.meta,
                        Err(e) => {
                            self.fail(&dir, e);
                            return false;
                        }
                    }
                }
            };
            let slave_meta = match &slave {
                SlaveDir::Existing(Some(s)) => Some(&s.meta),
                _ => None,
            };
            if dirty || slave_meta != Some(&meta) {
                if let Err(e) = self.set_meta_wait(&dir, meta).await {
                    self.slave_err(&dir, e);
                    return false;
                }
            }
            if xtl > stime {
                let full = {
                    let mut q = self.stimes.lock().unwrap();
                    q.push((dir.clone(), xtl));
                    q.len() >= STIME_BATCH
                };
                if full {
                    if let Err(e) = self.flush_stimes().await {
                        self.set_fatal(e);
                        return false;
                    }
                }
            }
            true
        }
        .boxed()
    }

    async fn set_meta_wait(&self, path: &RelPath, meta: Meta) -> Result<(), ProtoError> {
        self.slave
            .set_meta(path.clone(), meta)
            .await?
            .wait()
            .await?;
        self.stats.meta_updates.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Carries out one planned action; returns whether it succeeded.
    fn act(
        self: Arc<Self>,
        path: RelPath,
        m: MEntry,
        s: Option<Entry>,
        action: Action,
    ) -> BoxFuture<'static, bool> {
        async move {
            if self.stopped() {
                return false;
            }
            match action {
                Action::CreateDir => {
                    let mut meta = m.entry.meta.clone();
                    meta.mode |= 0o700; // writable while filled; the final mode is set after
                    let pending = match self.slave.mkdir(path.clone(), meta).await {
                        Ok(p) => p,
                        Err(e) => {
                            self.slave_err(&path, e);
                            return false;
                        }
                    };
                    self.stats.dirs_created.fetch_add(1, Ordering::Relaxed);
                    let below = self
                        .clone()
                        .visit(path.clone(), SlaveDir::Fresh, Some(m))
                        .await;
                    match pending.wait().await {
                        Ok(()) => below,
                        Err(e) => {
                            self.slave_err(&path, e);
                            false
                        }
                    }
                }
                Action::Visit => {
                    self.clone()
                        .visit(path, SlaveDir::Existing(s), Some(m))
                        .await
                }
                Action::Ship { basis } => self.ship_file(&path, &m, s.as_ref(), basis).await,
                Action::Symlink => {
                    let target = m
                        .entry
                        .target
                        .clone()
                        .map(|t| t.into_vec())
                        .unwrap_or_default();
                    let res = async {
                        self.slave
                            .symlink(path.clone(), target, m.entry.meta.clone())
                            .await?
                            .wait()
                            .await
                    }
                    .await;
                    match res {
                        Ok(()) => {
                            self.stats.symlinks.fetch_add(1, Ordering::Relaxed);
                            true
                        }
                        Err(e) => {
                            self.slave_err(&path, e);
                            false
                        }
                    }
                }
                Action::Meta => match self.set_meta_wait(&path, m.entry.meta.clone()).await {
                    Ok(()) => true,
                    Err(e) => {
                        self.slave_err(&path, e);
                        false
                    }
                },
            }
        }
        .boxed()
    }

    async fn ship_file(
        self: &Arc<Self>,
        path: &RelPath,
        m: &MEntry,
        s: Option<&Entry>,
        basis: bool,
    ) -> bool {
        if m.entry.nlink > 1 {
            return crate::links::ship_linked(self, path, m, basis).await;
        }
        self.ship_plain(path, m, s, basis).await
    }

    /// Ships one file and fixes its metadata when the content was unchanged.
    pub(crate) async fn ship_plain(
        &self,
        path: &RelPath,
        m: &MEntry,
        s: Option<&Entry>,
        basis: bool,
    ) -> bool {
        match transfer::ship(self, path, m.entry.size, basis).await {
            Ok(Shipped::Sent) => {
                self.stats.files_synced.fetch_add(1, Ordering::Relaxed);
                true
            }
            Ok(Shipped::Unchanged) => {
                self.stats.files_unchanged.fetch_add(1, Ordering::Relaxed);
                let same = s.is_some_and(|s| !plan::meta_differs(&m.entry, s));
                if same {
                    return true;
                }
                match self.set_meta_wait(path, m.entry.meta.clone()).await {
                    Ok(()) => true,
                    Err(e) => {
                        self.slave_err(path, e);
                        false
                    }
                }
            }
            Err(e) if matches!(&e, FileError::Master(me) if me.vanished()) => {
                // Gone since it was listed: its directory changed again and
                // is visited by the next crawl; this one is not complete.
                self.fail(path, e);
                false
            }
            Err(e) => {
                self.file_err(path, e);
                false
            }
        }
    }

    pub(crate) fn record_slave_err(&self, path: &RelPath, e: ProtoError) {
        self.slave_err(path, e)
    }

    pub fn failure_count(&self) -> u64 {
        self.failure_count.load(Ordering::Relaxed)
    }
}
