//! The tree crawl (see docs/architecture.md, change detection): visit a directory when its xtime is
//! newer than its stime (or always, in a full crawl), make the slave's
//! listing match the master's, ship what changed, descend, and only then
//! record the xtime read before listing as the directory's new stime.

mod dirmeta;
mod linked;
pub mod plan;

use crate::engine::context::{CrawlKind, Engine, Failure};
use crate::engine::master::{reserved, MEntry, MasterError};
use crate::engine::transfer::{self, Basis, FileError, Shipped};
use crate::fs::meta::{Entry, Kind};
use crate::fs::relpath::RelPath;
use crate::protocol::ProtoError;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use plan::Action;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tracing::Instrument;

/// Actions of one directory in flight at once.
const DIR_CONCURRENCY: usize = 512;
/// Stimes queued before they are made durable and written mid-crawl.
const STIME_BATCH: usize = 1000;

/// The slave side of a directory about to be visited.
#[derive(Debug, Clone)]
enum SlaveDir {
    /// Just created: empty, no need to list it.
    Fresh,
    /// Exists; its entry as listed in the parent (None for the root).
    Existing(Option<Entry>),
    /// Exists with the master's metadata: its parent's entries were found
    /// as recorded when last synced (see `Engine::visit`), so it is not
    /// even listed by the parent.
    Known,
}

/// Why a crawl could not finish.
#[derive(Debug, thiserror::Error)]
pub enum CrawlError {
    #[error(transparent)]
    Slave(#[from] ProtoError),
    #[error("interrupted by shutdown")]
    Shutdown,
    /// The slave has no space left (the first error that said so).
    #[error("{0}")]
    SlaveFull(String),
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
    fn file_err(&self, path: &RelPath, e: FileError) {
        match e {
            FileError::Slave(p) => self.slave_err(path, p),
            other => self.fail(path, other),
        }
    }

    /// Runs the whole crawl from the root.
    pub async fn run(self: &Arc<Self>) -> Result<CrawlOutcome, CrawlError> {
        self.work.planned.store(true, Ordering::Relaxed);
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
                .visit(RelPath::root(), SlaveDir::Existing(root), None, self.kind)
                .await
        }
        .instrument(span)
        .await;
        if let Some(e) = self.fatal() {
            return Err(CrawlError::Slave(e));
        }
        // Always a barrier at the end, even with no stime to record: what
        // the slave acknowledged (removals, metadata, also those of an
        // earlier crawl that was killed) is durable once a crawl completes.
        self.flush_stimes(true).await?;
        if self.shutdown_requested() {
            return Err(CrawlError::Shutdown);
        }
        if let Some(e) = self.slave_full() {
            return Err(CrawlError::SlaveFull(e));
        }
        Ok(CrawlOutcome {
            complete,
            failures: self.failures(),
            failure_count: self.failure_count(),
        })
    }

    /// Makes the slave's existing directory `dir` and everything below it
    /// equal to the master's, every entry compared (a full visit of that
    /// subtree only): how a repair fills a directory it just created.
    pub async fn resync_dir(self: &Arc<Self>, dir: RelPath) -> bool {
        let slave = match self.slave.stat(dir.clone()).await {
            Ok(s) => s,
            Err(e) => {
                self.slave_err(&dir, e);
                return false;
            }
        };
        let ok = self
            .clone()
            .visit(dir, SlaveDir::Existing(slave), None, CrawlKind::Full)
            .await;
        ok && self.flush_stimes(true).await.is_ok()
    }

    /// Makes the slave durable, then records the stimes of the
    /// directories completed so far (never before: an stime must not cover data the slave could still lose).
    pub async fn flush_stimes(&self, barrier_anyway: bool) -> Result<(), ProtoError> {
        let batch: Vec<(RelPath, u64)> = std::mem::take(&mut *self.stimes.lock().unwrap());
        let digests = std::mem::take(&mut *self.digests.lock().unwrap());
        if batch.is_empty() && digests.is_empty() && !barrier_anyway {
            return Ok(());
        }
        self.slave.barrier().await?;
        for (dir, d) in digests {
            match self.master.set_digest(&dir, &d) {
                Ok(()) => {}
                Err(e) if e.vanished() => {}
                Err(e) => {
                    tracing::warn!(dir = %dir, error = %e, "could not record a directory's entry digest")
                }
            }
        }
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

    /// Visits one directory; returns whether its whole subtree is now on
    /// the slave. `kind` is the crawl's, or Full below a directory whose
    /// dirmark is newer than its stime (renamed into place: its stimes and
    /// xtimes describe its old name).
    fn visit(
        self: Arc<Self>,
        dir: RelPath,
        slave: SlaveDir,
        mentry: Option<MEntry>,
        kind: CrawlKind,
    ) -> BoxFuture<'static, bool> {
        async move {
            self.gate().await;
            if self.stopped() {
                return false;
            }
            let stamps = {
                let e = self.clone();
                let d = dir.clone();
                blocking(move || -> Result<(u64, u64, u64), MasterError> {
                    Ok((e.master.xtime(&d)?, e.master.stime(&d)?, e.master.dirmark(&d)?))
                })
                .await
            };
            let (xtl, stime, dirmark) = match stamps {
                Ok(s) => s,
                Err(e) if e.vanished() && !dir.is_root() => return true,
                Err(e) => {
                    self.fail(&dir, e);
                    return false;
                }
            };
            let by_dirmark = dirmark > stime;
            let kind = if by_dirmark { CrawlKind::Full } else { kind };
            // Compared in full, the subtree is on the slave as of the
            // dirmark too, even if that mark was killed before its xtime.
            let xtl = if by_dirmark { xtl.max(dirmark) } else { xtl };
            let existing = !matches!(slave, SlaveDir::Fresh);
            if kind == CrawlKind::Xtime && existing && xtl <= stime {
                return true;
            }
            // The entries as the file system states them, before anything
            // is listed or shipped: recorded once this visit succeeds. In
            // a full crawl that only doubts the marker, entries found as
            // recorded were on the slave when recorded and have not
            // changed since (any change moves a ctime or an mtime): only
            // the subdirectories are visited.
            let light = {
                let e = self.clone();
                let d = dir.clone();
                blocking(move || {
                    let (digest, subdirs, n) = e.master.dir_digest(&d)?;
                    Ok::<_, MasterError>((digest, subdirs, n, e.master.stored_digest(&d)))
                })
                .await
            };
            let light = match light {
                Ok(l) => Some(l),
                Err(e) if e.vanished() && !dir.is_root() => return true,
                Err(_) => None,
            };
            if let Some((digest, subdirs, n, stored)) = &light {
                // Not below a dirmark: the digest was recorded under the old name.
                if kind == CrawlKind::Full && !by_dirmark && existing && self.trust_digests() && stored.as_ref() == Some(digest) {
                    self.stats.entries_visited.fetch_add(*n, Ordering::Relaxed);
                    let mut visits = Vec::with_capacity(subdirs.len());
                    // georep's own directories (a promoted replica's state,
                    // a quarantine) are never replicated.
                    for n in subdirs.iter().filter(|n| !reserved(&dir, n)) {
                        if let Ok(p) = dir.join(n) {
                            visits.push(self.clone().visit(p, SlaveDir::Known, None, kind));
                        }
                    }
                    let results: Vec<bool> = futures::stream::iter(visits)
                        .buffer_unordered(DIR_CONCURRENCY)
                        .collect()
                        .await;
                    if !results.iter().all(|&r| r) || self.stopped() {
                        return false;
                    }
                    self.stats.dirs_unchanged.fetch_add(1, Ordering::Relaxed);
                    match self.dir_meta(&dir, &slave, false).await {
                        Some(true) => {}
                        Some(false) => return false,
                        None => return true,
                    }
                    return self.queue_stime(&dir, xtl, stime).await;
                }
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
            let (mlist, unreadable) = match mlist {
                Ok(l) => (l.entries, l.unreadable),
                Err(e) if e.vanished() && !dir.is_root() => return true,
                Err(e) => {
                    self.fail(&dir, e);
                    return false;
                }
            };
            self.stats.entries_visited.fetch_add(mlist.len() as u64, Ordering::Relaxed);
            let mut plan = plan::plan_dir(kind, &mlist, slist.as_deref(), stime, |n| reserved(&dir, n));
            // An entry the worker cannot read fails alone, and its slave
            // copy is kept: it exists on the master, georep just cannot see it.
            let mut ok = unreadable.is_empty();
            for (name, e) in &unreadable {
                self.fail(&dir.join(name).unwrap_or_else(|_| dir.clone()), e);
            }
            plan.remove.retain(|r| !unreadable.iter().any(|(name, _)| name == r));
            plan.remove_after.retain(|r| !unreadable.iter().any(|(name, _)| name == r));
            for (i, a) in &plan.actions {
                if let Action::Ship { .. } | Action::Moved { .. } = a {
                    self.work.files_found.fetch_add(1, Ordering::Relaxed);
                    self.work.bytes_found.fetch_add(mlist[*i].entry.size, Ordering::Relaxed);
                }
            }
            for &i in &plan.skipped {
                tracing::debug!(path = %dir.join(&mlist[i].entry.name).unwrap_or_default(), "not replicated (special file or reserved name)");
                self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            }
            for m in &mlist {
                if m.entry.kind == Kind::File && m.entry.nlink > 1 {
                    if let Ok(p) = dir.join(&m.entry.name) {
                        self.links().saw(&m.entry, &p);
                    }
                }
            }
            // A name of an inode that another name already ships in this
            // crawl (a new inode on the slave) is linked to it, even when
            // it looks unchanged here or only its metadata differs: its
            // link count can match by chance (a partner gone on the
            // master, one more on the slave). Seen (above) before this
            // check, or it is among the names the shipping one re-links.
            for (i, m) in mlist.iter().enumerate() {
                if m.entry.kind != Kind::File
                    || m.entry.nlink < 2
                    || plan.skipped.contains(&i)
                    || !self.links().started((m.entry.dev, m.entry.ino))
                {
                    continue;
                }
                match plan.actions.iter_mut().find(|(j, _)| *j == i) {
                    Some((_, a @ Action::Meta)) => *a = Action::Ship { basis: true },
                    Some(_) => {}
                    None => plan.actions.push((i, Action::Ship { basis: true })),
                }
            }
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
                            Action::Ship { .. } | Action::Moved { .. } if m.entry.nlink <= 1 => {
                                Some(slots.acquire_owned().await.expect("never closed"))
                            }
                            _ => None,
                        };
                        (p, m, s, a, slot)
                    }
                })
                .map(|(p, m, s, a, slot)| {
                    let act = self.clone().act(p, m, s, a, kind);
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
            // The sources of moves, now that their content is at the new names.
            for name in &plan.remove_after {
                let Ok(p) = dir.join(name) else { continue };
                let res = async { self.slave.remove(p.clone()).await?.wait().await }.await;
                match res {
                    Ok(()) => {
                        self.stats.deletes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        self.slave_err(&p, e);
                        return false;
                    }
                }
            }
            // Directory metadata last: creating children changed its mtime.
            let _ = mentry;
            match self.dir_meta(&dir, &slave, dirty).await {
                Some(true) => {}
                Some(false) => return false,
                None => return true,
            }
            if let Some((digest, _, _, stored)) = light {
                if stored != Some(digest) {
                    self.digests.lock().unwrap().push((dir.clone(), digest));
                }
            }
            self.queue_stime(&dir, xtl, stime).await
        }
        .boxed()
    }

    /// Carries out one planned action; returns whether it succeeded.
    fn act(
        self: Arc<Self>,
        path: RelPath,
        m: MEntry,
        s: Option<Entry>,
        action: Action,
        kind: CrawlKind,
    ) -> BoxFuture<'static, bool> {
        async move {
            self.gate().await;
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
                    // Over several streams the children may go by another
                    // stream than the mkdir: it must be done first.
                    let pending = if self.slave.streams() > 1 {
                        if let Err(e) = pending.wait().await {
                            self.slave_err(&path, e);
                            return false;
                        }
                        None
                    } else {
                        Some(pending)
                    };
                    let below = self
                        .clone()
                        .visit(path.clone(), SlaveDir::Fresh, Some(m), kind)
                        .await;
                    match pending {
                        None => below,
                        Some(p) => match p.wait().await {
                            Ok(()) => below,
                            Err(e) => {
                                self.slave_err(&path, e);
                                false
                            }
                        },
                    }
                }
                Action::Visit => {
                    self.clone()
                        .visit(path, SlaveDir::Existing(s), Some(m), kind)
                        .await
                }
                Action::Ship { basis } => {
                    let basis = if basis { Basis::Dest } else { Basis::None };
                    self.ship_file(&path, &m, s.as_ref(), basis).await
                }
                Action::Moved { from } => {
                    let Some(from) = path.parent().and_then(|d| d.join(&from).ok()) else {
                        return false;
                    };
                    self.ship_file(&path, &m, s.as_ref(), Basis::Other(from))
                        .await
                }
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
        basis: Basis,
    ) -> bool {
        if m.entry.nlink > 1 {
            return linked::ship_linked(self, path, m, basis).await;
        }
        self.ship_plain(path, m, s, basis).await
    }

    /// Ships one file and fixes its metadata when the content was unchanged.
    pub(crate) async fn ship_plain(
        &self,
        path: &RelPath,
        m: &MEntry,
        s: Option<&Entry>,
        basis: Basis,
    ) -> bool {
        match transfer::ship(self, path, m.entry.size, basis).await {
            Ok(Shipped::Sent) => {
                self.stats.files_synced.fetch_add(1, Ordering::Relaxed);
                true
            }
            Ok(Shipped::Updated) => {
                self.stats.files_unchanged.fetch_add(1, Ordering::Relaxed);
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
}
