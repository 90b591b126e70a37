//! Promote (DESIGN §10): turns a replica into a live store on the DR site
//! alone. It rolls back or removes everything unfinished (interrupted
//! in-place updates, temporaries, staged or half-deleted generations,
//! journal bytes beyond their records, files no record needs), verifies
//! what is left (a store: every record against its data; a tree: the last
//! complete sync it received), makes the root a master whose changes are
//! tracked from now on (a master id and a baseline xtime), and records the
//! role `promoted` with a raised epoch, last: a promote killed at any moment
//! leaves the root a replica, and running it again converges.

use super::files::Files;
use super::role::read_synced;
use super::root::Root;
use crate::catalog::points::{self, HostRpo};
use crate::catalog::record::{self, StorageBody};
use crate::catalog::store;
use crate::fs::role::{self, Role, RoleRecord};
use crate::fs::xtime;
use crate::protocol::TMP_PREFIX;
use serde::{Deserialize, Serialize};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;
use uuid::Uuid;

/// What was rolled back or removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cleaned {
    /// Interrupted in-place updates rolled back from their undo logs.
    pub undo_logs: u64,
    /// Temporary files of unfinished transfers.
    pub temporaries: u64,
    /// Staged, half-published or half-deleted generations (`snapshots/.…`).
    pub staging: u64,
    /// Journals cut back to their recorded length.
    pub journal_tails: u64,
    /// Snapshot files no record needs (interrupted attempts).
    pub unreferenced: u64,
}

/// What `georep promote` reports (text and `--json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromoteReport {
    pub root: String,
    /// It was promoted before: nothing was done this time.
    pub already: bool,
    pub epoch: u64,
    pub promoted_at: String,
    pub promoted_at_ns: u64,
    pub host: String,
    /// The session it was a replica of.
    pub from_session: Option<Uuid>,
    /// "tree" or "store".
    pub layout: String,
    /// Tree: every change made on the old master before this time is here.
    pub last_synced: Option<String>,
    pub last_synced_age_secs: Option<f64>,
    /// Store: per host, the newest complete point recovered and its age (the RPO).
    pub hosts: Vec<HostRpo>,
    pub cleaned: Cleaned,
    /// What does not verify (empty: everything does).
    pub problems: Vec<String>,
    pub duration_ms: u64,
}

/// Why a promote did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    #[error("{0}")]
    NotReplica(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Io(String),
}

impl PromoteError {
    pub fn retry(&self) -> crate::error::Retry {
        match self {
            PromoteError::Busy(_) | PromoteError::Io(_) => crate::error::Retry::Temporary,
            _ => crate::error::Retry::Permanent,
        }
    }
}

fn io(what: &str, p: &Path) -> impl FnOnce(std::io::Error) -> PromoteError {
    let msg = format!("{what} {}", p.display());
    move |e| PromoteError::Io(format!("{msg}: {e}"))
}

/// `georep promote DIR`: takes the root's agent lock (no agent may write
/// it meanwhile) and promotes it.
pub fn promote_dir(dir: &Path) -> Result<PromoteReport, PromoteError> {
    let abs = std::fs::canonicalize(dir).map_err(|e| {
        PromoteError::NotReplica(format!(
            "{}: {e}: give the replica's directory",
            dir.display()
        ))
    })?;
    // A promoted root answers without the lock: a second promote is harmless.
    if let Some(r) = read_role(&abs)? {
        if r.is_live() {
            return Ok(already(&abs, &r));
        }
    }
    let (root, _lock) = super::open_root(&abs).map_err(|e| match e.kind {
        crate::protocol::ErrorKind::Busy => PromoteError::Busy(format!(
            "{}: a georep agent is still serving a worker on it: wait for it to exit (it does within its keep-alive, 2 minutes at most once the master is gone) or stop that worker, then promote again",
            abs.display()
        )),
        _ => PromoteError::NotReplica(e.message),
    })?;
    promote(&root, None)
}

fn read_role(root: &Path) -> Result<Option<RoleRecord>, PromoteError> {
    role::read(root).map_err(|e| PromoteError::Io(e.to_string()))
}

fn already(root: &Path, r: &RoleRecord) -> PromoteReport {
    let mut rep: PromoteReport = r
        .report
        .clone()
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_else(|| PromoteReport {
            root: root.display().to_string(),
            already: true,
            epoch: r.epoch,
            promoted_at: role::format_time(r.at_ns),
            promoted_at_ns: r.at_ns,
            host: r.host.clone(),
            from_session: r.session,
            layout: String::new(),
            last_synced: None,
            last_synced_age_secs: None,
            hosts: Vec::new(),
            cleaned: Cleaned::default(),
            problems: Vec::new(),
            duration_ms: 0,
        });
    rep.already = true;
    rep
}

/// Promotes `root` (whose lock the caller holds). With `expect` (a
/// switchover through the agent), the root must be a replica of exactly
/// that session and epoch.
pub fn promote(root: &Root, expect: Option<(Uuid, u64)>) -> Result<PromoteReport, PromoteError> {
    let started = Instant::now();
    let path = root.path().to_path_buf();
    let current = read_role(&path)?;
    if let Some(r) = &current {
        if r.is_live() {
            return Ok(already(&path, r));
        }
    }
    let ident = root.identity().ok().flatten();
    let (from_session, epoch) = match (&current, &ident) {
        (Some(r), _) => (r.session, r.epoch),
        (None, Some(i)) => (Some(i.session), 0),
        (None, None) => {
            return Err(PromoteError::NotReplica(format!(
                "{} is not a georep replica (no .georep/role.json or identity.json): nothing to promote; give the slave directory of a session",
                path.display()
            )))
        }
    };
    if let Some((s, e)) = expect {
        if from_session != Some(s) || epoch != e {
            return Err(PromoteError::Refused(format!(
                "{} is {}, not a replica of session {s} at epoch {e}: refusing to promote it for that session",
                path.display(),
                current
                    .as_ref()
                    .map(|r| r.describe())
                    .unwrap_or_else(|| "a replica of another session".into())
            )));
        }
    }
    let mut cleaned = Cleaned {
        undo_logs: count_undo_logs(&path),
        ..Cleaned::default()
    };
    let files = Files::start(root);
    if files.needs_recovery() {
        return Err(PromoteError::Io(format!(
            "{}: an interrupted in-place update could not be rolled back (see the agent's log; check space and permissions in .georep/undo), then promote again",
            path.display()
        )));
    }
    drop(files);
    cleaned.temporaries = remove_temporaries(&path)?;
    let is_store = path.join(record::STORE_FILE).is_file();
    let mut problems = Vec::new();
    let mut hosts = Vec::new();
    let (mut last_synced, mut last_synced_age_secs) = (None, None);
    if is_store {
        clean_store(&path, &mut cleaned)?;
        problems = points::verify(&path).map_err(|e| PromoteError::Io(e.to_string()))?;
        hosts = points::store_rpo(&path).map_err(|e| PromoteError::Io(e.to_string()))?;
    } else {
        match read_synced(&path) {
            Some(s) => {
                last_synced = Some(role::format_time(s.stime));
                last_synced_age_secs =
                    Some(xtime::now_ns().saturating_sub(s.stime) as f64 / 1e9);
            }
            None => problems.push(
                "no complete sync is recorded on this replica: its content is whatever the last, unfinished sync left (every file whole)".into(),
            ),
        }
    }
    // Change tracking from now on: a master id and a baseline stamp newer
    // than anything, under the root lock the caller holds (markers take it too).
    let id = xtime::ensure_master_id(&path).map_err(io("stamping", &path))?;
    let stamp = xtime::next_stamp(&path, &id).map_err(io("stamping", &path))?;
    xtime::write(&path, &xtime::xtime_attr(&id), stamp).map_err(io("stamping", &path))?;
    // The coarse clock the kernel stamps ctimes with: every change made
    // after this moment has a ctime at or after it.
    let at_ns = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME_COARSE)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or_else(|_| xtime::now_ns());
    let host = role::host_name();
    let report = PromoteReport {
        root: path.display().to_string(),
        already: false,
        epoch: epoch + 1,
        promoted_at: role::format_time(at_ns),
        promoted_at_ns: at_ns,
        host: host.clone(),
        from_session,
        layout: if is_store { "store" } else { "tree" }.into(),
        last_synced,
        last_synced_age_secs,
        hosts,
        cleaned,
        problems,
        duration_ms: started.elapsed().as_millis() as u64,
    };
    let rec = RoleRecord {
        role: Role::Promoted,
        epoch: epoch + 1,
        session: from_session,
        at_ns,
        host,
        promote_stamp: Some(stamp),
        report: serde_json::to_value(&report).ok(),
    };
    role::write(&path, &rec).map_err(|e| PromoteError::Io(e.to_string()))?;
    tracing::info!(root = %path.display(), epoch = epoch + 1, "promoted");
    Ok(report)
}

fn count_undo_logs(root: &Path) -> u64 {
    let dir = root
        .join(role::STATE_DIR)
        .join(std::ffi::OsStr::from_bytes(super::inplace::UNDO_DIR));
    std::fs::read_dir(dir)
        .map(|d| d.flatten().count() as u64)
        .unwrap_or(0)
}

/// Removes every temporary file below the root (never following symlinks).
fn remove_temporaries(root: &Path) -> Result<u64, PromoteError> {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io("listing", &dir)(e)),
        };
        for e in rd {
            let e = e.map_err(io("listing", &dir))?;
            let name = e.file_name();
            let name = name.as_bytes();
            if dir == root && crate::protocol::reserved_at_root(name) {
                continue;
            }
            let ft = e.file_type().map_err(io("stat", &e.path()))?;
            if name.starts_with(TMP_PREFIX) {
                let res = if ft.is_dir() {
                    std::fs::remove_dir_all(e.path())
                } else {
                    std::fs::remove_file(e.path())
                };
                res.map_err(io("removing", &e.path()))?;
                n += 1;
            } else if ft.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(n)
}

/// A store's unfinished work: hidden generations, journal tails beyond
/// their records, snapshot files no record (or kept image's backing) needs.
fn clean_store(root: &Path, cleaned: &mut Cleaned) -> Result<(), PromoteError> {
    let hosts = root.join(record::HOSTS);
    let Ok(rd) = std::fs::read_dir(&hosts) else {
        return Ok(());
    };
    let host_names: Vec<String> = rd
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| record::valid_name(n))
        .collect();
    for h in &host_names {
        let snaps = root.join(record::snapshots_dir(h));
        for e in std::fs::read_dir(&snaps).into_iter().flatten().flatten() {
            if e.file_name().as_bytes().starts_with(b".") {
                std::fs::remove_dir_all(e.path()).map_err(io("removing", &e.path()))?;
                cleaned.staging += 1;
            }
        }
    }
    let cat = store::load(root).map_err(|e| PromoteError::Io(e.to_string()))?;
    let mut referenced = std::collections::BTreeSet::new();
    for h in cat.hosts.values() {
        for s in h.snapshots.values() {
            for d in s.disks.values() {
                for st in &d.storages {
                    referenced.insert(st.record.body.file().to_string());
                    if let StorageBody::Cdp(c) = &st.record.body {
                        referenced.insert(c.base_file.clone());
                        let p = root.join(&c.file);
                        let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                        if len > c.length {
                            std::fs::OpenOptions::new()
                                .write(true)
                                .open(&p)
                                .and_then(|f| {
                                    f.set_len(c.length)?;
                                    f.sync_all()
                                })
                                .map_err(io("cutting the unpublished tail of", &p))?;
                            cleaned.journal_tails += 1;
                        }
                    }
                }
            }
        }
    }
    // Backing files of kept images are kept too.
    let mut keep = std::collections::BTreeSet::new();
    let mut stack: Vec<String> = referenced.iter().cloned().collect();
    while let Some(f) = stack.pop() {
        if !keep.insert(f.clone()) || !f.ends_with(".qcow2") {
            continue;
        }
        match backing_name(&root.join(&f)) {
            Some(b) if b.contains('/') => return Ok(()), // a backing elsewhere: keep everything
            Some(b) => {
                let dir = f.rsplit_once('/').map(|x| x.0).unwrap_or("");
                stack.push(format!("{dir}/{b}"));
            }
            None => {}
        }
    }
    let unheld = hosts_unheld(root, &host_names, &keep);
    for p in unheld {
        std::fs::remove_file(&p).map_err(io("removing", &p))?;
        cleaned.unreferenced += 1;
    }
    Ok(())
}

fn hosts_unheld(
    root: &Path,
    hosts: &[String],
    keep: &std::collections::BTreeSet<String>,
) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for h in hosts {
        let disks = format!("{}/{}", record::host_dir(h), record::DISKS);
        for d in std::fs::read_dir(root.join(&disks))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(dn) = d.file_name().into_string() else {
                continue;
            };
            if !d.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
                let Ok(fname) = f.file_name().into_string() else {
                    continue;
                };
                let rel = format!("{disks}/{dn}/{fname}");
                if f.file_type().is_ok_and(|t| t.is_file())
                    && !fname.starts_with('.')
                    && record::time_of_file(&fname).is_some()
                    && !keep.contains(&rel)
                {
                    out.push(f.path());
                }
            }
        }
    }
    out
}

/// The backing file name in a qcow2 image's header (read natively: no qemu-img).
pub fn backing_name(p: &Path) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(p).ok()?;
    let mut head = [0u8; 20];
    f.read_exact_at(&mut head, 0).ok()?;
    if &head[0..4] != b"QFI\xfb" {
        return None;
    }
    let off = u64::from_be_bytes(head[8..16].try_into().ok()?);
    let len = u32::from_be_bytes(head[16..20].try_into().ok()?) as usize;
    if off == 0 || len == 0 || len > 4096 {
        return None;
    }
    let mut name = vec![0u8; len];
    f.read_exact_at(&mut name, off).ok()?;
    String::from_utf8(name).ok()
}
