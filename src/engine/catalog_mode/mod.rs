//! Catalog-mode replication: plans each host (see `plan`) and carries the
//! steps out against the slave.
//!
//! - Data before records: a generation's images (and empty journals) are
//!   shipped, verified by the agent and durable before its records are
//!   written into `snapshots/.staging-TIME/` and published with one rename
//!   to `snapshots/TIME/`. A killed worker leaves at most an invisible
//!   staging directory and unreferenced files, cleaned by the next sync.
//! - Journals grow in place by whole points only; the storage record's
//!   length and end advance after the appended bytes are durable and read
//!   back equal, so anything past the recorded length is invisible and is
//!   cut off by the next append.
//! - Every point read on the master is locked first (see `locks`); the
//!   catalog is then re-read, so a deletion the appliance just committed is
//!   seen before anything is shipped.

mod append;
mod gc;
mod generation;

use crate::catalog::plan::{self, AppendPlan, AppendSource, GenPlan, ImageSource, Step};
use crate::catalog::points;
use crate::catalog::record::{
    self, kind, DiskRef, DiskSnapshotRecord, HostSnapshotRecord, QcowStorage, StorageBody,
    StorageRecord, StoreRecord,
};
use crate::catalog::store::{self, Host};
use crate::catalog::{cdp, locks, qcow, time, CatalogError};
use crate::engine::context::{CrawlKind, Engine, Failure};
use crate::engine::outcome::{CatalogSummary, Summary, WorkerError};
use crate::engine::transfer::{self, Basis, FileError, Shipped};
use crate::fs::meta::{Kind, Meta, Timestamp};
use crate::fs::relpath::RelPath;
use crate::protocol::{ErrorKind, ProtoError};
use crate::session::SyncMode;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Largest catalog record read from the slave.
const MAX_RECORD: u64 = 1 << 20;
/// Bytes of journal per append request.
const APPEND_CHUNK: usize = 4 << 20;
/// Append requests in flight at once.
const APPEND_WINDOW: usize = 8;
/// Largest data of one record of a point made from an image.
const IMAGE_RECORD: u64 = 1 << 20;
/// Plans of one host carried out per sync at most (each after re-reading both sides).
const ROUNDS: usize = 4;

/// Why a catalog sync stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Slave(ProtoError),
    #[error(transparent)]
    Catalog(CatalogError),
    #[error("interrupted by shutdown")]
    Shutdown,
}

/// The outcome of a catalog sync that ran to its end.
#[derive(Debug)]
pub struct Outcome {
    pub summary: CatalogSummary,
    pub failures: Vec<Failure>,
    pub records_read: u64,
}

/// Why one step failed.
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Slave(#[from] ProtoError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("the master changed under the plan ({0}); planning again")]
    Replan(String),
    #[error("{0}")]
    Other(String),
}

impl StepError {
    fn fatal(&self) -> Option<ProtoError> {
        match self {
            StepError::Slave(e) if e.is_fatal() => Some(e.clone()),
            StepError::File(FileError::Slave(e)) if e.is_fatal() => Some(e.clone()),
            _ => None,
        }
    }
}

fn rel(s: &str) -> Result<RelPath, StepError> {
    RelPath::new(s.as_bytes().to_vec()).map_err(|e| StepError::Other(format!("{s}: {e}")))
}

fn meta(mode: u32) -> Meta {
    let now = time::now();
    Meta {
        mode,
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        mtime: Timestamp {
            sec: (now / 1_000_000_000) as i64,
            nsec: (now % 1_000_000_000) as u32,
        },
        xattrs: Vec::new(),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
}

fn is_not_found(e: &ProtoError) -> bool {
    matches!(e, ProtoError::Remote(w) if w.kind == ErrorKind::NotFound)
}

/// The files a master point's content is read from: its image and backing
/// chain, or its journal and the base image's chain.
fn point_files(m: &Host, disk: &str, t: u64) -> Vec<String> {
    let mut out = Vec::new();
    let Some((_, d)) = m.disk_covering(disk, t) else {
        return out;
    };
    let mut q = match d.qcow_at(t) {
        Some(q) => Some(q.clone()),
        None => {
            let c = d.cdp().expect("covered by the journal");
            out.push(c.file.clone());
            d.qcow_at(c.base).cloned()
        }
    };
    while let Some(x) = q.take() {
        out.push(x.file.clone());
        if let (Some(_), Some(p)) = (&x.backing, x.parent) {
            q = m
                .snapshots
                .values()
                .filter_map(|s| s.disks.get(disk))
                .find_map(|d| d.qcow_at(p).cloned());
        }
    }
    out
}

/// One catalog sync.
pub struct Run {
    e: Arc<Engine>,
    root: PathBuf,
    session: String,
    mode: SyncMode,
    tmp: PathBuf,
    sum: CatalogSummary,
    failures: Vec<Failure>,
    records_read: u64,
    shutdown: CancellationToken,
}

impl Run {
    /// `tmp`: a directory for images built on the master side (the session's).
    pub fn new(
        e: Arc<Engine>,
        session: &str,
        mode: SyncMode,
        tmp: PathBuf,
        shutdown: CancellationToken,
    ) -> Run {
        Run {
            root: e.master.root().to_path_buf(),
            e,
            session: session.to_string(),
            mode,
            tmp,
            sum: CatalogSummary::default(),
            failures: Vec::new(),
            records_read: 0,
            shutdown,
        }
    }

    fn fail(&mut self, what: &str, e: impl std::fmt::Display) {
        let error = e.to_string();
        tracing::warn!(what, %error, "catalog step failed; it will be retried by the next sync");
        if self.failures.len() < 100 {
            self.failures.push(Failure {
                path: what.to_string(),
                error,
            });
        }
    }

    /// Runs the whole sync.
    pub async fn run(mut self) -> Result<Outcome, RunError> {
        // Images built by an interrupted worker of this session are of no use.
        let _ = std::fs::remove_dir_all(&self.tmp);
        std::fs::create_dir_all(&self.tmp)
            .map_err(|e| RunError::Catalog(CatalogError::io("create", &self.tmp, e)))?;
        let (root, session) = (self.root.clone(), self.session.clone());
        self.sum.stale_locks_cleared = blocking(move || locks::clear_stale(&root, Some(&session)))
            .await
            .map_err(RunError::Catalog)? as u64;
        let root = self.root.clone();
        let master = blocking(move || store::load(&root))
            .await
            .map_err(RunError::Catalog)?;
        self.ensure_store().await?;
        let mut hosts: BTreeSet<String> = master.hosts.keys().cloned().collect();
        hosts.extend(self.slave_hosts().await.map_err(RunError::Slave)?);
        for host in hosts {
            if self.shutdown.is_cancelled() {
                return Err(RunError::Shutdown);
            }
            self.sum.hosts += 1;
            if let Err(e) = self.sync_host(&host).await {
                match e.fatal() {
                    Some(p) => return Err(RunError::Slave(p)),
                    None => self.fail(&host, e),
                }
            }
        }
        if self.shutdown.is_cancelled() {
            return Err(RunError::Shutdown);
        }
        Ok(Outcome {
            summary: self.sum,
            failures: self.failures,
            records_read: self.records_read,
        })
    }

    /// Makes the slave root a store (its `store.json`); refuses a slave
    /// that holds something else, so a store never mixes into other data.
    async fn ensure_store(&self) -> Result<(), RunError> {
        let p = RelPath::new(record::STORE_FILE.as_bytes().to_vec()).expect("valid");
        let want = record::to_json(&StoreRecord::default());
        let refuse = |why: String| {
            RunError::Catalog(CatalogError::Usage(format!(
                "slave {}: {why}: give a new or empty slave directory",
                self.e.slave.client().agent_root()
            )))
        };
        let have = self
            .e
            .slave
            .read_file(p.clone(), 0, MAX_RECORD)
            .await
            .map_err(RunError::Slave)?
            .wait()
            .await;
        match have {
            Ok(have)
                if serde_json::from_slice::<StoreRecord>(&have).ok()
                    == Some(StoreRecord::default()) =>
            {
                Ok(())
            }
            Ok(_) => Err(refuse(
                "its store.json is not a georep store of this version".into(),
            )),
            Err(e) if is_not_found(&e) => {
                let entries = self.list("").await.map_err(RunError::Slave)?;
                if let Some(e) = entries.first() {
                    return Err(refuse(format!(
                        "not empty ({} is there) and not a snapshot store",
                        String::from_utf8_lossy(&e.name)
                    )));
                }
                self.put(p, want).await.map_err(RunError::Slave)
            }
            Err(e) => Err(RunError::Slave(e)),
        }
    }

    async fn put(&self, p: RelPath, data: Vec<u8>) -> Result<(), ProtoError> {
        let digest = crate::hash::digest::digest_of(&data);
        self.e
            .slave
            .put_file(p, data, digest, meta(0o644))
            .await?
            .wait()
            .await?;
        Ok(())
    }

    async fn list(&self, dir: &str) -> Result<Vec<crate::fs::meta::Entry>, ProtoError> {
        let p = RelPath::new(dir.as_bytes().to_vec())
            .map_err(|e| ProtoError::Violation(e.to_string()))?;
        match self.e.slave.list(p).await?.wait().await {
            Ok(l) => Ok(l),
            Err(e) if is_not_found(&e) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    async fn slave_hosts(&self) -> Result<Vec<String>, ProtoError> {
        Ok(self
            .list(record::HOSTS)
            .await?
            .into_iter()
            .filter(|e| e.kind == Kind::Dir)
            .filter_map(|e| String::from_utf8(e.name.into_vec()).ok())
            .filter(|n| record::valid_name(n))
            .collect())
    }

    /// Reads one host of the slave's catalog through the agent.
    async fn load_slave_host(&mut self, host: &str) -> Result<Host, ProtoError> {
        let mut h = Host {
            name: host.to_string(),
            ..Host::default()
        };
        for e in self.list(&record::snapshots_dir(host)).await? {
            let Ok(name) = String::from_utf8(e.name.to_vec()) else {
                continue;
            };
            if name.starts_with('.') {
                h.hidden.push(name);
                continue;
            }
            if e.kind != Kind::Dir {
                continue;
            }
            let dir = format!("{}/{name}", record::snapshots_dir(host));
            let mut pending = Vec::new();
            for f in self.list(&dir).await? {
                let Ok(fname) = String::from_utf8(f.name.to_vec()) else {
                    continue;
                };
                if f.kind == Kind::File && fname.ends_with(".json") {
                    let p = RelPath::new(format!("{dir}/{fname}").into_bytes())
                        .map_err(|e| ProtoError::Violation(e.to_string()))?;
                    pending.push((fname, self.e.slave.read_file(p, 0, MAX_RECORD).await?));
                }
            }
            let mut files = BTreeMap::new();
            for (fname, p) in pending {
                match p.wait().await {
                    Ok(b) => {
                        self.records_read += 1;
                        files.insert(fname, b);
                    }
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            match store::assemble(host, &name, &files) {
                Ok(s) => {
                    h.snapshots.insert(s.record.time, s);
                }
                Err(e) => {
                    h.problems.push(e);
                    h.unreadable.push(name);
                }
            }
        }
        Ok(h)
    }

    async fn mkdirs(&self, dirs: &[String]) -> Result<(), ProtoError> {
        let mut pending = Vec::new();
        for d in dirs {
            let p = RelPath::new(d.as_bytes().to_vec())
                .map_err(|e| ProtoError::Violation(e.to_string()))?;
            pending.push(self.e.slave.mkdir(p, meta(0o755)).await?);
        }
        for p in pending {
            p.wait().await?;
        }
        Ok(())
    }

    async fn sync_host(&mut self, host: &str) -> Result<(), StepError> {
        for round in 0..ROUNDS {
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            let (root, h) = (self.root.clone(), host.to_string());
            let m = blocking(move || store::load_host(&root, &h)).await?;
            for p in &m.problems {
                tracing::warn!(host, problem = %p, "master host snapshot left out this time");
            }
            let s = self.load_slave_host(host).await?;
            if round == 0 {
                for hidden in &s.hidden {
                    // Staging or deletion left by an interrupted worker: never published.
                    let p = rel(&format!("{}/{hidden}", record::snapshots_dir(host)))?;
                    self.e.slave.remove(p).await?.wait().await?;
                }
            }
            // A host is gone from the master only when nothing of it is left there.
            let m_opt = (m.record.is_some() || !m.snapshots.is_empty() || !m.unreadable.is_empty())
                .then_some(&m);
            if let Some(rec) = &m.record {
                let mut dirs = vec![
                    record::HOSTS.to_string(),
                    record::host_dir(host),
                    record::snapshots_dir(host),
                    format!("{}/{}", record::host_dir(host), record::DISKS),
                ];
                dirs.extend(rec.disks.iter().map(|d| record::disk_dir(host, d)));
                for snap in m.snapshots.values() {
                    dirs.extend(snap.disks.keys().map(|d| record::disk_dir(host, d)));
                }
                dirs.dedup();
                self.mkdirs(&dirs).await?;
                let hp = rel(&record::host_file(host))?;
                let want = record::to_json(rec);
                let have = self
                    .e
                    .slave
                    .read_file(hp.clone(), 0, MAX_RECORD)
                    .await?
                    .wait()
                    .await
                    .ok();
                if have.as_deref() != Some(&want[..]) {
                    self.put(hp, want).await?;
                }
            }
            let s_opt = (!s.snapshots.is_empty() || !s.unreadable.is_empty()).then_some(&s);
            let steps = plan::plan_host(self.mode, host, m_opt, s_opt);
            if steps.is_empty() {
                break;
            }
            tracing::info!(host, steps = steps.len(), round, "catalog plan");
            match self.execute(&m, steps).await {
                Ok(()) => break,
                Err(StepError::Replan(why)) => {
                    tracing::info!(host, %why, "planning again");
                    if round + 1 == ROUNDS {
                        return Err(StepError::Replan(why));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        self.gc(host).await?;
        let s = self.load_slave_host(host).await?;
        if !s.snapshots.is_empty() {
            self.sum.newest.extend(points::rpo(&store::Catalog {
                hosts: [(host.to_string(), s)].into_iter().collect(),
            }));
        }
        Ok(())
    }

    async fn execute(&mut self, m: &Host, steps: Vec<Step>) -> Result<(), StepError> {
        for step in steps {
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            match step {
                Step::Generation(g) => {
                    let replan = self.generation(m, &g).await?;
                    if replan {
                        return Err(StepError::Replan("a journal's newest point moved".into()));
                    }
                }
                Step::Append(a) => self.append(m, &a).await?,
                Step::Delete { snapshot } => self.delete(&m.name, &snapshot).await?,
            }
        }
        Ok(())
    }

    /// Locks `files` of point (disk, t) and checks, on a fresh read of the
    /// master, that `still` holds for them.
    async fn lock(
        &mut self,
        host: &str,
        disk: &str,
        t: u64,
        files: Vec<String>,
        purpose: &'static str,
        still: impl FnOnce(&Host) -> Result<(), String> + Send + 'static,
    ) -> Result<locks::PointLock, StepError> {
        let (root, session, h, d) = (
            self.root.clone(),
            self.session.clone(),
            host.to_string(),
            disk.to_string(),
        );
        let lock = blocking(move || -> Result<locks::PointLock, StepError> {
            let lock = locks::acquire(&root, &session, &h, &d, t, files, purpose)?;
            let fresh = store::load_host(&root, &h)?;
            still(&fresh).map_err(StepError::Replan)?;
            Ok(lock)
        })
        .await?;
        self.sum.locks_taken += 1;
        Ok(lock)
    }
}

fn sample_block() -> u32 {
    crate::catalog::sample::BLOCK as u32
}

fn storage_record(host: &str, snap: &str, disk: &str, body: StorageBody) -> StorageRecord {
    StorageRecord {
        record: kind::STORAGE.into(),
        host: host.into(),
        snapshot: snap.into(),
        disk: disk.into(),
        body,
    }
}

/// One catalog-mode sync of `session` over a connected slave: what the
/// worker runs instead of the tree crawl when the session's layout is `store`.
pub async fn sync_store(
    session: &crate::session::Session,
    slave: &crate::engine::slave::Slave,
    master_id: &uuid::Uuid,
    shutdown: CancellationToken,
) -> Result<Summary, WorkerError> {
    let root = session.config.master.clone();
    let master =
        crate::engine::master::Master::new(root.clone(), master_id, &session.config.session_id);
    let links = crate::engine::links::Links::load(session.dir.join("links.json"));
    let engine = Engine::new(
        master,
        slave.clone(),
        CrawlKind::Full,
        links,
        shutdown.clone(),
    );
    let run = Run::new(
        engine.clone(),
        &session.name,
        session.config.mode,
        session.dir.join("tmp"),
        shutdown,
    );
    let out = match run.run().await {
        Ok(o) => o,
        Err(RunError::Shutdown) => return Err(WorkerError::Shutdown),
        Err(RunError::Slave(e)) => {
            return Err(WorkerError::Slave {
                slave: session.config.slave.clone(),
                source: e,
            })
        }
        Err(RunError::Catalog(e)) if e.is_usage() => {
            return Err(WorkerError::Config(crate::error::UserError::new(
                e.to_string(),
            )))
        }
        Err(RunError::Catalog(e)) => {
            return Err(WorkerError::Master {
                path: root,
                source: std::io::Error::other(e.to_string()),
            })
        }
    };
    let s = &engine.stats;
    let wire = slave.client().stats();
    let failures = out.failures.len() as u64;
    Ok(Summary {
        session: session.name.clone(),
        crawl: "catalog",
        full_reason: None,
        complete: failures == 0,
        entries_visited: out.records_read,
        files_synced: s.files_synced.load(Ordering::Relaxed),
        files_unchanged: s.files_unchanged.load(Ordering::Relaxed),
        files_in_place: 0, // published images are never patched in place
        bytes_sent: s.bytes_literal.load(Ordering::Relaxed) + s.bytes_delta.load(Ordering::Relaxed),
        bytes_literal: s.bytes_literal.load(Ordering::Relaxed),
        bytes_delta: s.bytes_delta.load(Ordering::Relaxed),
        wire_bytes_out: wire.bytes_out.load(Ordering::Relaxed),
        wire_bytes_in: wire.bytes_in.load(Ordering::Relaxed),
        deletes: out.summary.generations_deleted + out.summary.files_removed,
        dirs_created: 0,
        symlinks: 0,
        hardlinks: 0,
        meta_updates: 0,
        stimes_written: 0,
        skipped: 0,
        failures,
        failed: out.failures.clone(),
        errors: out.failures,
        duration_ms: 0,
        catalog: Some(out.summary),
        bytes_processed: engine.work.bytes_done.load(Ordering::Relaxed),
        throughput_bytes_per_sec: 0.0,
    })
}
