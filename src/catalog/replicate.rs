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

use super::plan::{self, AppendPlan, AppendSource, GenPlan, ImageSource, Step};
use super::points::{self, HostRpo};
use super::record::{
    self, kind, DiskRef, DiskSnapshotRecord, HostSnapshotRecord, QcowStorage, StorageBody,
    StorageRecord, StoreRecord,
};
use super::store::{self, Host};
use super::{cdp, locks, qcow, time, CatalogError};
use crate::crawl::{Engine, Failure};
use crate::meta::{Kind, Meta, Timestamp};
use crate::protocol::{ErrorKind, ProtoError};
use crate::relpath::RelPath;
use crate::session::SyncMode;
use crate::transfer::{self, Basis, FileError, Shipped};
use serde::Serialize;
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

/// What a catalog sync did, beside the transfer counters.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CatalogSummary {
    pub hosts: u64,
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
        self.ensure_store().await.map_err(RunError::Slave)?;
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

    async fn ensure_store(&self) -> Result<(), ProtoError> {
        let p = RelPath::new(record::STORE_FILE.as_bytes().to_vec()).expect("valid");
        let want = record::to_json(&StoreRecord::default());
        match self.e.slave.read_file(p.clone(), 0, MAX_RECORD).await?.wait().await {
            Ok(have) if serde_json::from_slice::<StoreRecord>(&have).ok() == Some(StoreRecord::default()) => Ok(()),
            Ok(_) => Err(ProtoError::Remote(crate::protocol::WireError::new(
                ErrorKind::Invalid,
                "the slave root holds another kind of store.json: give a new or empty slave directory",
            ))),
            Err(e) if is_not_found(&e) => self.put(p, want).await,
            Err(e) => Err(e),
        }
    }

    async fn put(&self, p: RelPath, data: Vec<u8>) -> Result<(), ProtoError> {
        let digest = crate::digest::digest_of(&data);
        self.e
            .slave
            .put_file(p, data, digest, meta(0o644))
            .await?
            .wait()
            .await?;
        Ok(())
    }

    async fn list(&self, dir: &str) -> Result<Vec<crate::meta::Entry>, ProtoError> {
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

    /// Builds, ships and publishes one generation. Returns true when a
    /// journal point resolved differently from the plan (plan again).
    async fn generation(&mut self, m: &Host, g: &GenPlan) -> Result<bool, StepError> {
        let host = g.host.clone();
        let snap = time::name(g.time);
        let mut refs = Vec::new();
        let mut records: Vec<(String, Vec<u8>)> = Vec::new();
        let mut moved = false;
        let mut held = Vec::new();
        for dp in &g.disks {
            let md = m
                .snapshots
                .values()
                .rev()
                .find_map(|s| s.disks.get(&dp.disk).filter(|d| d.covers(dp.point)))
                .ok_or_else(|| {
                    StepError::Replan(format!(
                        "{}/{} no longer has a point at {}",
                        host,
                        dp.disk,
                        time::name(dp.point)
                    ))
                })?;
            let block = md.cdp().map(|c| {
                let p = self.root.join(&c.file);
                std::fs::File::open(&p)
                    .ok()
                    .and_then(|f| {
                        cdp::Scanner::new(&f, c.length, false)
                            .ok()
                            .map(|s| s.header.block_size)
                    })
                    .unwrap_or(sample_block())
            });
            let (qrec, point) = match &dp.how {
                ImageSource::Copy { file, digest } => {
                    let files = vec![file.clone()];
                    let (f2, d2, disk) = (file.clone(), digest.clone(), dp.disk.clone());
                    held.push(
                        self.lock(&host, &dp.disk, dp.point, files, "qcow", move |h| {
                            let ok = h
                                .snapshots
                                .values()
                                .filter_map(|s| s.disks.get(&disk))
                                .flat_map(|d| d.qcows())
                                .any(|q| q.file == f2 && q.digest == d2);
                            if ok {
                                Ok(())
                            } else {
                                Err(format!("{f2} was changed or deleted"))
                            }
                        })
                        .await?,
                    );
                    (self.copy_image(&host, dp, file, digest).await?, dp.point)
                }
                ImageSource::Build { base } => {
                    let mut files = point_files(m, &dp.disk, dp.point);
                    if let Some(b) = base {
                        files.extend(point_files(m, &dp.disk, b.time));
                    }
                    let (disk, pt, bt) = (dp.disk.clone(), dp.point, base.as_ref().map(|b| b.time));
                    held.push(
                        self.lock(&host, &dp.disk, dp.point, files, "materialise", move |h| {
                            for t in std::iter::once(pt).chain(bt) {
                                if h.disk_covering(&disk, t).is_none() {
                                    return Err(format!(
                                        "{disk} no longer has a point at {}",
                                        time::name(t)
                                    ));
                                }
                            }
                            Ok(())
                        })
                        .await?,
                    );
                    self.build_image(m, &host, dp, base.as_ref()).await?
                }
            };
            moved |= point != dp.point;
            let (qname, jname) = plan::slave_storage_names(&dp.disk);
            let mut names = vec![qname.clone()];
            records.push((
                qname,
                record::to_json(&storage_record(
                    &host,
                    &snap,
                    &dp.disk,
                    StorageBody::Qcow(qrec.clone()),
                )),
            ));
            if dp.journal {
                let mut dpp = dp.clone();
                dpp.point = point;
                let j = plan::empty_journal(&host, &dpp);
                let hdr = cdp::Header {
                    block_size: block.unwrap_or(sample_block()),
                    disk_size: dp.virtual_size,
                    start: point,
                    base_time: point,
                    base_name: record::base_name(&j.base_file).to_string(),
                };
                let bytes = hdr
                    .encode()
                    .map_err(|e| StepError::Other(e.to_string()))?
                    .to_vec();
                self.put(rel(&j.file)?, bytes).await?;
                names.push(jname.clone());
                records.push((
                    jname,
                    record::to_json(&storage_record(&host, &snap, &dp.disk, StorageBody::Cdp(j))),
                ));
            }
            let drec = DiskSnapshotRecord {
                record: kind::DISK_SNAPSHOT.into(),
                host: host.clone(),
                snapshot: snap.clone(),
                disk: dp.disk.clone(),
                time: point,
                virtual_size: dp.virtual_size,
                storages: names,
            };
            let dname = record::disk_record_name(&dp.disk);
            records.push((dname.clone(), record::to_json(&drec)));
            refs.push(DiskRef {
                disk: dp.disk.clone(),
                record: dname,
            });
        }
        // Everything referenced is on the slave and verified: stage the records, then publish.
        let stage = format!("{}/.staging-{snap}", record::snapshots_dir(&host));
        let stage_rel = rel(&stage)?;
        self.e.slave.remove(stage_rel.clone()).await?.wait().await?;
        self.e
            .slave
            .mkdir(stage_rel.clone(), meta(0o755))
            .await?
            .wait()
            .await?;
        let srec = HostSnapshotRecord {
            record: kind::HOST_SNAPSHOT.into(),
            host: host.clone(),
            snapshot: snap.clone(),
            time: g.time,
            time_utc: time::rfc3339(g.time),
            disks: refs,
            source: Some(g.source.clone()),
        };
        records.push((record::SNAPSHOT_FILE.to_string(), record::to_json(&srec)));
        let mut pending = Vec::new();
        for (name, data) in records {
            let digest = crate::digest::digest_of(&data);
            pending.push(
                self.e
                    .slave
                    .put_file(rel(&format!("{stage}/{name}"))?, data, digest, meta(0o644))
                    .await?,
            );
        }
        for p in pending {
            p.wait().await?;
        }
        let fin = rel(&record::snapshot_dir(&host, g.time))?;
        self.e.slave.rename(stage_rel, fin).await?.wait().await?;
        self.sum.generations_published += 1;
        tracing::info!(host = %host, snapshot = %snap, source = %g.source, "generation published");
        drop(held);
        Ok(moved)
    }

    /// The slave file to diff a new image against.
    async fn basis_for(
        &self,
        dest: &RelPath,
        fallback: Option<String>,
    ) -> Result<Basis, StepError> {
        if let Some(e) = self.e.slave.stat(dest.clone()).await? {
            if e.kind == Kind::File {
                return Ok(Basis::Dest);
            }
        }
        if let Some(f) = fallback {
            let p = rel(&f)?;
            if self
                .e
                .slave
                .stat(p.clone())
                .await?
                .is_some_and(|e| e.kind == Kind::File)
            {
                return Ok(Basis::Other(p));
            }
        }
        Ok(Basis::None)
    }

    async fn ship(
        &mut self,
        src: &Path,
        dest: &str,
        basis: Basis,
    ) -> Result<(u64, [u8; 32]), StepError> {
        let size = std::fs::metadata(src)
            .map_err(|e| CatalogError::io("stat", src, e))?
            .len();
        let (shipped, digest) = transfer::ship_from(&self.e, src, &rel(dest)?, size, basis).await?;
        match shipped {
            Shipped::Sent => self.e.stats.files_synced.fetch_add(1, Ordering::Relaxed),
            Shipped::Unchanged => {
                self.sum.images_unchanged += 1;
                self.e.stats.files_unchanged.fetch_add(1, Ordering::Relaxed)
            }
        };
        Ok((size, digest))
    }

    async fn copy_image(
        &mut self,
        host: &str,
        dp: &plan::DiskPlan,
        file: &str,
        digest: &str,
    ) -> Result<QcowStorage, StepError> {
        let src = self.root.join(file);
        let dest = record::qcow_file(host, &dp.disk, dp.point);
        let info = {
            let src = src.clone();
            blocking(move || qcow::info(&src)).await?
        };
        // A full image mostly equals its parent: diff it against the parent's replica.
        let fallback = match (&info.backing, dp.parent) {
            (None, Some(p)) => Some(record::qcow_file(host, &dp.disk, p)),
            _ => None,
        };
        let basis = self.basis_for(&rel(&dest)?, fallback).await?;
        let (size, got) = self.ship(&src, &dest, basis).await?;
        if record::hex(&got) != digest {
            return Err(StepError::Replan(format!(
                "{file} does not match its record's digest"
            )));
        }
        self.sum.images_copied += 1;
        Ok(QcowStorage {
            file: dest,
            time: dp.point,
            parent: dp.parent,
            backing: info.backing,
            size,
            digest: digest.to_string(),
        })
    }

    /// Makes the image of a point on the master side and ships it; returns
    /// its record and the point's actual time (a journal's newest point at
    /// or before the planned one).
    async fn build_image(
        &mut self,
        m: &Host,
        host: &str,
        dp: &plan::DiskPlan,
        base: Option<&plan::BaseRef>,
    ) -> Result<(QcowStorage, u64), StepError> {
        let (root, tmp, h, disk, want) = (
            self.root.clone(),
            self.tmp.clone(),
            m.clone(),
            dp.disk.clone(),
            dp.point,
        );
        let base_t = base.map(|b| (b.time, record::base_name(&b.file).to_string()));
        let dest_of = {
            let (host, disk) = (host.to_string(), disk.clone());
            move |t: u64| record::qcow_file(&host, &disk, t)
        };
        let built = blocking(move || -> Result<(tempfile::TempPath, u64), CatalogError> {
            let t = resolve_at_or_before(&root, &h, &disk, want)?;
            let src = points::source(&root, &h, &disk, t, &tmp)?;
            let base_src = match &base_t {
                Some((bt, _)) => Some(points::source(&root, &h, &disk, *bt, &tmp)?),
                None => None,
            };
            let out = tempfile::Builder::new()
                .prefix("image-")
                .suffix(".qcow2")
                .tempfile_in(&tmp)
                .map_err(|e| CatalogError::io("create temporary in", &tmp, e))?
                .into_temp_path();
            let _ = std::fs::remove_file(&out);
            qcow::materialise(
                src.path(),
                src.format(),
                base_src.as_ref().map(|b| (b.path(), b.format())),
                base_t.as_ref().map(|b| b.1.as_str()),
                &out,
            )?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644))
                .map_err(|e| CatalogError::io("chmod", &out, e))?;
            Ok((out, t))
        })
        .await?;
        let (img, point) = built;
        let dest = dest_of(point);
        let fallback = match base {
            Some(_) => None,
            // A standalone image: the slave's newest image of the disk is the likeliest basis.
            None => self.newest_slave_image(host, &dp.disk).await,
        };
        let basis = self.basis_for(&rel(&dest)?, fallback).await?;
        let (size, digest) = self.ship(&img, &dest, basis).await?;
        self.sum.images_built += 1;
        Ok((
            QcowStorage {
                file: dest,
                time: point,
                parent: base.map(|b| b.time),
                backing: base.map(|b| record::base_name(&b.file).to_string()),
                size,
                digest: record::hex(&digest),
            },
            point,
        ))
    }

    async fn newest_slave_image(&self, host: &str, disk: &str) -> Option<String> {
        let l = self.list(&record::disk_dir(host, disk)).await.ok()?;
        l.into_iter()
            .filter_map(|e| String::from_utf8(e.name.into_vec()).ok())
            .filter(|n| n.ends_with(".qcow2") && !n.starts_with('.'))
            .max_by_key(|n| record::time_of_file(n).unwrap_or(0))
            .map(|n| format!("{}/{n}", record::disk_dir(host, disk)))
    }

    /// Appends the planned points to a slave journal, then advances its record.
    async fn append(&mut self, m: &Host, a: &AppendPlan) -> Result<(), StepError> {
        let mut files = Vec::new();
        for s in &a.sources {
            match s {
                AppendSource::Journal { file, .. } => files.push(file.clone()),
                AppendSource::Image { time: t, .. } => files.extend(point_files(m, &a.disk, *t)),
            }
        }
        let sources = a.sources.clone();
        let disk = a.disk.clone();
        let _lock = self
            .lock(
                &a.host,
                &a.disk,
                a.journal.end,
                files,
                "cdp-append",
                move |h| {
                    let disks: Vec<_> = h
                        .snapshots
                        .values()
                        .filter_map(|s| s.disks.get(&disk))
                        .collect();
                    for s in &sources {
                        let ok = match s {
                            AppendSource::Journal { file, length, .. } => disks.iter().any(|d| {
                                d.cdp()
                                    .is_some_and(|c| &c.file == file && c.length >= *length)
                            }),
                            AppendSource::Image { chain, .. } => chain
                                .iter()
                                .all(|f| disks.iter().any(|d| d.qcows().any(|q| &q.file == f))),
                        };
                        if !ok {
                            return Err(format!(
                                "a source of {disk}'s points was changed or deleted"
                            ));
                        }
                    }
                    Ok(())
                },
            )
            .await?;
        let path = rel(&a.journal.file)?;
        let mut j = a.journal.clone();
        let start_len = j.length;
        let mut hasher = blake3::Hasher::new();
        let mut inflight = std::collections::VecDeque::new();
        for s in &a.sources {
            let tail = match s {
                AppendSource::Journal {
                    file,
                    length,
                    after,
                } => {
                    let (p, length, after) = (self.root.join(file), *length, *after);
                    blocking(move || Tail::journal(&p, length, after)).await?
                }
                AppendSource::Image {
                    time: t,
                    chain,
                    since,
                    full,
                } => {
                    let extents = if *full {
                        vec![(0, a.virtual_size)]
                    } else {
                        self.e
                            .slave
                            .journal_extents(path.clone(), *since, j.length)
                            .await?
                    };
                    let (root, tmp, h, disk, t, chain, size, full) = (
                        self.root.clone(),
                        self.tmp.clone(),
                        m.clone(),
                        a.disk.clone(),
                        *t,
                        chain.clone(),
                        a.virtual_size,
                        *full,
                    );
                    let tail = blocking(move || {
                        image_point(&root, &tmp, &h, &disk, t, &chain, extents, full, size)
                    })
                    .await?;
                    self.sum.cdp_points_from_images += 1;
                    tail
                }
            };
            let mut tail = Some(tail);
            loop {
                let mut t = tail.take().expect("put back below");
                let (chunk, t) = blocking(move || (t.next_chunk(APPEND_CHUNK), t)).await;
                tail = Some(t);
                let Some((data, points, last)) = chunk? else {
                    break;
                };
                hasher.update(&data);
                let len = data.len() as u64;
                inflight.push_back(
                    self.e
                        .slave
                        .append_tail(path.clone(), j.length, data, false, None)
                        .await?,
                );
                j.length += len;
                j.points += points;
                if let Some(t) = last {
                    j.end = t;
                }
                self.sum.cdp_points += points;
                self.e.stats.bytes_literal.fetch_add(len, Ordering::Relaxed);
                while inflight.len() > APPEND_WINDOW {
                    inflight.pop_front().expect("non-empty").wait().await?;
                }
            }
        }
        if j.length == start_len {
            return Ok(());
        }
        // Durable, and read back equal to what was sent, before the record says so.
        let check = Some((start_len, *hasher.finalize().as_bytes()));
        inflight.push_back(
            self.e
                .slave
                .append_tail(path.clone(), j.length, Vec::new(), true, check)
                .await?,
        );
        while let Some(p) = inflight.pop_front() {
            p.wait().await?;
        }
        self.sum.cdp_bytes += j.length - start_len;
        let rp = rel(&format!(
            "{}/{}/{}",
            record::snapshots_dir(&a.host),
            a.snapshot,
            a.storage
        ))?;
        let rec = storage_record(&a.host, &a.snapshot, &a.disk, StorageBody::Cdp(j));
        self.put(rp, record::to_json(&rec)).await?;
        Ok(())
    }

    /// Removes a generation: one rename hides it, then its records go.
    async fn delete(&mut self, host: &str, snapshot: &str) -> Result<(), StepError> {
        let dir = rel(&format!("{}/{snapshot}", record::snapshots_dir(host)))?;
        let gone = rel(&format!(
            "{}/.deleting-{snapshot}",
            record::snapshots_dir(host)
        ))?;
        self.e.slave.remove(gone.clone()).await?.wait().await?;
        self.e.slave.rename(dir, gone.clone()).await?.wait().await?;
        self.e.slave.remove(gone).await?.wait().await?;
        self.sum.generations_deleted += 1;
        tracing::info!(
            host,
            snapshot,
            "generation deleted (its master host snapshot is gone)"
        );
        Ok(())
    }

    /// The backing file name in a slave image's qcow2 header.
    async fn slave_backing(&self, file: &str) -> Result<Option<String>, StepError> {
        let head = self
            .e
            .slave
            .read_file(rel(file)?, 0, 64 << 10)
            .await?
            .wait()
            .await?;
        if head.len() < 20 || &head[0..4] != b"QFI\xfb" {
            return Err(StepError::Other(format!("{file}: not a qcow2 image")));
        }
        let off = u64::from_be_bytes(head[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as u64;
        if off == 0 || len == 0 {
            return Ok(None);
        }
        let name = if off + len <= head.len() as u64 {
            head[off as usize..(off + len) as usize].to_vec()
        } else {
            self.e
                .slave
                .read_file(rel(file)?, off, len.min(4096))
                .await?
                .wait()
                .await?
        };
        Ok(Some(String::from_utf8_lossy(&name).into_owned()))
    }

    /// Removes snapshot files no published record needs (directly, or as
    /// a backing file): those of deleted generations and of interrupted
    /// attempts. Files newer than the newest generation are kept: they may
    /// be a retry's basis.
    async fn gc(&mut self, host: &str) -> Result<(), StepError> {
        let s = self.load_slave_host(host).await?;
        let master_has_host = self.root.join(record::host_file(host)).exists();
        let limit = match s.newest() {
            Some(g) => g.record.time,
            None if !master_has_host => u64::MAX,
            None => return Ok(()),
        };
        let mut referenced = BTreeSet::new();
        for g in s.snapshots.values() {
            for d in g.disks.values() {
                for st in &d.storages {
                    referenced.insert(st.record.body.file().to_string());
                    if let StorageBody::Cdp(c) = &st.record.body {
                        referenced.insert(c.base_file.clone());
                    }
                }
            }
        }
        let disks_dir = format!("{}/{}", record::host_dir(host), record::DISKS);
        let mut candidates = Vec::new();
        for d in self.list(&disks_dir).await? {
            if d.kind != Kind::Dir {
                continue;
            }
            let Ok(dn) = String::from_utf8(d.name.into_vec()) else {
                continue;
            };
            for f in self.list(&format!("{disks_dir}/{dn}")).await? {
                let Ok(fname) = String::from_utf8(f.name.to_vec()) else {
                    continue;
                };
                let path = format!("{disks_dir}/{dn}/{fname}");
                if f.kind == Kind::File
                    && !fname.starts_with('.')
                    && !referenced.contains(&path)
                    && record::time_of_file(&fname).is_some_and(|t| t <= limit)
                {
                    candidates.push(path);
                }
            }
        }
        if candidates.is_empty() {
            return Ok(());
        }
        // Backing files of kept images are kept too.
        let mut keep = BTreeSet::new();
        let mut stack: Vec<String> = referenced
            .into_iter()
            .filter(|f| f.ends_with(".qcow2"))
            .collect();
        while let Some(f) = stack.pop() {
            if !keep.insert(f.clone()) {
                continue;
            }
            match self.slave_backing(&f).await {
                Ok(Some(b)) if !b.contains('/') => {
                    let dir = f.rsplit_once('/').map(|x| x.0).unwrap_or("");
                    stack.push(format!("{dir}/{b}"));
                }
                Ok(Some(_)) => return Ok(()), // a backing elsewhere: keep everything
                Ok(None) => {}
                Err(StepError::Slave(e)) if is_not_found(&e) => {}
                Err(e) => return Err(e),
            }
        }
        for c in candidates {
            if !keep.contains(&c) {
                self.e.slave.remove(rel(&c)?).await?.wait().await?;
                self.sum.files_removed += 1;
            }
        }
        Ok(())
    }
}

fn sample_block() -> u32 {
    super::sample::BLOCK as u32
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

/// The newest point of `disk` at or before `t` on the master (reads the journal).
pub fn resolve_at_or_before(
    root: &Path,
    h: &Host,
    disk: &str,
    t: u64,
) -> Result<u64, CatalogError> {
    let (_, d) = h.disk_covering(disk, t).ok_or_else(|| {
        CatalogError::NotFound(format!("{}/{disk}: no point at {}", h.name, time::name(t)))
    })?;
    if d.qcow_at(t).is_some() {
        return Ok(t);
    }
    let c = d.cdp().expect("covered by the journal");
    let p = root.join(&c.file);
    let f = std::fs::File::open(&p).map_err(|e| CatalogError::io("open", &p, e))?;
    let (_, spans) = cdp::spans(&f, c.length, false).map_err(|e| CatalogError::invalid(&p, e))?;
    Ok(spans
        .iter()
        .map(|s| s.time)
        .filter(|&x| x <= t)
        .max()
        .unwrap_or(c.base))
}

/// Bytes to append to a slave journal: whole points of a master journal
/// (checksums verified), or a point made from an image (in a temporary
/// file), read in chunks so memory stays bounded whatever their size.
struct Tail {
    file: std::fs::File,
    path: PathBuf,
    pos: u64,
    end: u64,
    /// End offset and time of each point still to send, in order.
    points: std::collections::VecDeque<(u64, u64)>,
    _tmp: Option<tempfile::TempPath>,
}

/// A chunk of a [`Tail`]: bytes, points completed in it, the last one's time.
type Chunk = (Vec<u8>, u64, Option<u64>);

impl Tail {
    /// The points of `[0, length)` of a master journal after time `after`.
    fn journal(p: &Path, length: u64, after: u64) -> Result<Tail, CatalogError> {
        let file = std::fs::File::open(p).map_err(|e| CatalogError::io("open", p, e))?;
        let bad = |e: cdp::JournalError| CatalogError::invalid(p, e);
        let mut s = cdp::Scanner::new(&file, length, false).map_err(bad)?;
        let mut first = None;
        while let Some(sp) = s.next_span().map_err(bad)? {
            if sp.time > after {
                first = Some(sp);
                break;
            }
        }
        let mut points = std::collections::VecDeque::new();
        let (mut pos, mut end) = (length, length);
        if let Some(f) = first {
            // Verify every record to be sent (reads the data, then again from cache).
            let mut v = cdp::Scanner::new(&file, length, true).map_err(bad)?;
            v.resume(f.start, after);
            while let Some(sp) = v.next_span().map_err(bad)? {
                points.push_back((sp.end, sp.time));
            }
            pos = f.start;
            end = points.back().map(|x| x.0).unwrap_or(f.start);
        }
        Ok(Tail {
            file,
            path: p.to_path_buf(),
            pos,
            end,
            points,
            _tmp: None,
        })
    }

    fn next_chunk(&mut self, max: usize) -> Result<Option<Chunk>, CatalogError> {
        use std::os::unix::fs::FileExt;
        if self.pos >= self.end {
            return Ok(None);
        }
        let n = (self.end - self.pos).min(max as u64);
        let mut buf = vec![0u8; n as usize];
        self.file
            .read_exact_at(&mut buf, self.pos)
            .map_err(|e| CatalogError::io("read", &self.path, e))?;
        self.pos += n;
        let (mut done, mut last) = (0, None);
        while let Some(&(e, t)) = self.points.front() {
            if e > self.pos {
                break;
            }
            done += 1;
            last = Some(t);
            self.points.pop_front();
        }
        Ok(Some((buf, done, last)))
    }
}

/// One point made from a master image: the blocks that can differ from the
/// replica's last point, with the point's content.
#[allow(clippy::too_many_arguments)]
fn image_point(
    root: &Path,
    tmp: &Path,
    h: &Host,
    disk: &str,
    t: u64,
    chain: &[String],
    extents: Vec<(u64, u64)>,
    full: bool,
    size: u64,
) -> Result<Tail, CatalogError> {
    use std::os::unix::fs::FileExt;
    let mut ext = extents;
    if !full {
        for f in chain {
            ext.extend(qcow::top_extents(&root.join(f))?);
        }
    }
    let block = super::sample::BLOCK;
    let ext: Vec<(u64, u64)> = super::merge_extents(ext)
        .into_iter()
        .map(|(o, l)| {
            let s = o / block * block;
            let e = (o + l).div_ceil(block) * block;
            (s, e.min(size) - s)
        })
        .collect();
    let ext = super::merge_extents(ext);
    let src = points::source(root, h, disk, t, tmp)?;
    let raw = tempfile::Builder::new()
        .prefix("point-")
        .tempfile_in(tmp)
        .map_err(|e| CatalogError::io("create temporary in", tmp, e))?
        .into_temp_path();
    let _ = std::fs::remove_file(&raw);
    qcow::convert(src.path(), src.format(), &raw, "raw")?;
    let f = std::fs::File::open(&raw).map_err(|e| CatalogError::io("open", &raw, e))?;
    let out = tempfile::Builder::new()
        .prefix("point-")
        .tempfile_in(tmp)
        .map_err(|e| CatalogError::io("create temporary in", tmp, e))?;
    let outp = out.path().to_path_buf();
    let werr = |e| CatalogError::io("write", &outp, e);
    let mut w = std::io::BufWriter::new(out.as_file());
    let mut pieces = Vec::new();
    for (o, l) in ext {
        let mut at = o;
        while at < o + l {
            let n = (o + l - at).min(IMAGE_RECORD);
            pieces.push((at, n));
            at += n;
        }
    }
    let mut buf = Vec::new();
    for (i, (at, n)) in pieces.iter().enumerate() {
        buf.resize(*n as usize, 0);
        f.read_exact_at(&mut buf, *at)
            .map_err(|e| CatalogError::io("read", &raw, e))?;
        let flags = if i + 1 < pieces.len() {
            cdp::CONTINUED
        } else {
            0
        };
        std::io::Write::write_all(&mut w, &cdp::encode_record(t, flags, *at, &buf))
            .map_err(werr)?;
    }
    if pieces.is_empty() {
        std::io::Write::write_all(&mut w, &cdp::encode_record(t, 0, 0, &[])).map_err(werr)?;
    }
    std::io::Write::flush(&mut w).map_err(werr)?;
    drop(w);
    let path = out.into_temp_path();
    let file = std::fs::File::open(&path).map_err(|e| CatalogError::io("open", &path, e))?;
    let end = file
        .metadata()
        .map_err(|e| CatalogError::io("stat", &path, e))?
        .len();
    Ok(Tail {
        file,
        path: path.to_path_buf(),
        pos: 0,
        end,
        points: [(end, t)].into_iter().collect(),
        _tmp: Some(path),
    })
}

/// One catalog-mode sync of `session` over a connected slave: what the
/// worker runs instead of the tree crawl when the session's layout is `store`.
pub async fn sync_store(
    session: &crate::session::Session,
    slave: &crate::slave::Slave,
    master_id: &uuid::Uuid,
    shutdown: CancellationToken,
) -> Result<crate::worker::Summary, crate::worker::WorkerError> {
    use crate::worker::{Summary, WorkerError};
    let root = session.config.master.clone();
    let master = crate::master::Master::new(root.clone(), master_id, &session.config.session_id);
    let links = crate::links::Links::load(session.dir.join("links.json"));
    let engine = Engine::new(
        master,
        slave.clone(),
        crate::crawl::plan::CrawlKind::Full,
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
        errors: out.failures,
        duration_ms: 0,
        catalog: Some(out.summary),
    })
}
