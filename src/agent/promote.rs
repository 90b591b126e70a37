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
use crate::fs::relpath::RelPath;
use crate::fs::role::{self, Role, RoleRecord};
use crate::fs::xtime;
use crate::protocol::TMP_PREFIX;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
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
    if let Ok(r) = Root::open(&abs) {
        if let Some(r) = read_role(&r)? {
            if r.is_live() {
                return Ok(already(&abs, &r));
            }
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

fn read_role(root: &Root) -> Result<Option<RoleRecord>, PromoteError> {
    super::role::read_role(root).map_err(PromoteError::Io)
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
    let current = read_role(root)?;
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
        undo_logs: count_undo_logs(root),
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
    cleaned.temporaries = remove_temporaries(root)?;
    let is_store = file_beneath(root, record::STORE_FILE, false).is_some();
    let mut problems = Vec::new();
    let mut hosts = Vec::new();
    let (mut last_synced, mut last_synced_age_secs) = (None, None);
    if is_store {
        clean_store(root, &mut cleaned)?;
        problems = points::verify(&path).map_err(|e| PromoteError::Io(e.to_string()))?;
        hosts = points::store_rpo(&path).map_err(|e| PromoteError::Io(e.to_string()))?;
    } else {
        match read_synced(root) {
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
    super::role::write_role(root, &rec).map_err(|e| PromoteError::Io(e.message))?;
    tracing::info!(root = %path.display(), epoch = epoch + 1, "promoted");
    Ok(report)
}

fn count_undo_logs(root: &Root) -> u64 {
    let undo = format!(
        "{}/{}",
        role::STATE_DIR,
        String::from_utf8_lossy(super::inplace::UNDO_DIR)
    );
    dir_beneath(root, &undo)
        .and_then(|(_fd, p)| std::fs::read_dir(p).ok())
        .map(|d| d.flatten().count() as u64)
        .unwrap_or(0)
}

/// The directory `rel` opened beneath the root through no symlink (see
/// [`Root::dir`]), and a path naming it through that descriptor, so std's
/// listing and removal act on it and on nothing a symlink points to.
fn dir_beneath(root: &Root, rel: &str) -> Option<(OwnedFd, PathBuf)> {
    let r = if rel.is_empty() {
        RelPath::root()
    } else {
        RelPath::new(rel.as_bytes().to_vec()).ok()?
    };
    let fd = root.dir(&r).ok()?;
    let p = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    Some((fd, p))
}

/// The regular file `rel` beneath the root, through no symlink.
fn file_beneath(root: &Root, rel: &str, write: bool) -> Option<std::fs::File> {
    let r = RelPath::new(rel.as_bytes().to_vec()).ok()?;
    let (dir, name) = root.parent(&r).ok()?;
    let flags = if write {
        OFlag::O_WRONLY
    } else {
        OFlag::O_RDONLY
    } | OFlag::O_NOFOLLOW
        | OFlag::O_CLOEXEC
        | OFlag::O_NONBLOCK;
    let fd = openat(dir.as_fd(), OsStr::from_bytes(name), flags, Mode::empty()).ok()?;
    let f = std::fs::File::from(fd);
    f.metadata().ok()?.is_file().then_some(f)
}

/// Removes the entry `name` of `dir` (a file or a whole tree), beneath the root.
fn remove_in(root: &Root, dir: &OwnedFd, name: &OsStr, shown: &str) -> Result<(), PromoteError> {
    super::remove::remove_tree(dir.as_fd(), name, root.dev())
        .map_err(|e| PromoteError::Io(format!("removing {shown}: {}", e.desc())))
}

/// Removes every temporary file below the root (never following symlinks).
fn remove_temporaries(root: &Root) -> Result<u64, PromoteError> {
    let mut n = 0;
    let mut stack = vec![RelPath::root()];
    while let Some(dir) = stack.pop() {
        let Ok(fd) = root.dir(&dir) else { continue };
        let p = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        let shown = dir.to_string();
        for e in std::fs::read_dir(&p).map_err(io("listing", Path::new(&shown)))? {
            let e = e.map_err(io("listing", Path::new(&shown)))?;
            let name = e.file_name();
            if dir.is_root() && crate::protocol::reserved_at_root(name.as_bytes()) {
                continue;
            }
            if name.as_bytes().starts_with(TMP_PREFIX) {
                remove_in(root, &fd, &name, &shown)?;
                n += 1;
            } else if e.file_type().is_ok_and(|t| t.is_dir()) {
                if let Ok(c) = dir.join(name.as_bytes()) {
                    stack.push(c);
                }
            }
        }
    }
    Ok(n)
}

/// A store's unfinished work: hidden generations, journal tails beyond
/// their records, snapshot files no record (or kept image's backing) needs.
/// Everything is reached beneath the root through no symlink: a replica's
/// content comes from a master it must not trust.
fn clean_store(root: &Root, cleaned: &mut Cleaned) -> Result<(), PromoteError> {
    let Some((_hosts, hosts_p)) = dir_beneath(root, record::HOSTS) else {
        return Ok(());
    };
    let Ok(rd) = std::fs::read_dir(&hosts_p) else {
        return Ok(());
    };
    let host_names: Vec<String> = rd
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| record::valid_name(n))
        .collect();
    for h in &host_names {
        let snaps = record::snapshots_dir(h);
        let Some((fd, p)) = dir_beneath(root, &snaps) else {
            continue;
        };
        for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
            if e.file_name().as_bytes().starts_with(b".") {
                let shown = format!("{snaps}/{}", e.file_name().to_string_lossy());
                remove_in(root, &fd, &e.file_name(), &shown)?;
                cleaned.staging += 1;
            }
        }
    }
    let path = root.path();
    let cat = store::load(path).map_err(|e| PromoteError::Io(e.to_string()))?;
    let mut referenced = std::collections::BTreeSet::new();
    for h in cat.hosts.values() {
        for s in h.snapshots.values() {
            for d in s.disks.values() {
                for st in &d.storages {
                    referenced.insert(st.record.body.file().to_string());
                    if let StorageBody::Cdp(c) = &st.record.body {
                        referenced.insert(c.base_file.clone());
                        let Some(f) = file_beneath(root, &c.file, true) else {
                            continue;
                        };
                        let p = Path::new(&c.file);
                        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                        if len > c.length {
                            f.set_len(c.length)
                                .and_then(|_| f.sync_all())
                                .map_err(io("cutting the unpublished tail of", p))?;
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
        match file_beneath(root, &f, false).and_then(|img| backing_name(&img)) {
            Some(b) if b.contains('/') => return Ok(()), // a backing elsewhere: keep everything
            Some(b) => {
                let dir = f.rsplit_once('/').map(|x| x.0).unwrap_or("");
                stack.push(format!("{dir}/{b}"));
            }
            None => {}
        }
    }
    for rel in hosts_unheld(root, &host_names, &keep) {
        let Some((dir, name)) = rel.rsplit_once('/') else {
            continue;
        };
        let Some((fd, _)) = dir_beneath(root, dir) else {
            continue;
        };
        nix::unistd::unlinkat(fd.as_fd(), name, nix::unistd::UnlinkatFlags::NoRemoveDir)
            .map_err(|e| PromoteError::Io(format!("removing {rel}: {}", e.desc())))?;
        cleaned.unreferenced += 1;
    }
    Ok(())
}

/// Snapshot files under the hosts' disk directories that `keep` lacks.
fn hosts_unheld(
    root: &Root,
    hosts: &[String],
    keep: &std::collections::BTreeSet<String>,
) -> Vec<String> {
    let mut out = Vec::new();
    for h in hosts {
        let disks = format!("{}/{}", record::host_dir(h), record::DISKS);
        let Some((_fd, p)) = dir_beneath(root, &disks) else {
            continue;
        };
        for d in std::fs::read_dir(&p).into_iter().flatten().flatten() {
            let Ok(dn) = d.file_name().into_string() else {
                continue;
            };
            if !d.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Some((_dfd, dp)) = dir_beneath(root, &format!("{disks}/{dn}")) else {
                continue;
            };
            for f in std::fs::read_dir(&dp).into_iter().flatten().flatten() {
                let Ok(fname) = f.file_name().into_string() else {
                    continue;
                };
                let rel = format!("{disks}/{dn}/{fname}");
                if f.file_type().is_ok_and(|t| t.is_file())
                    && !fname.starts_with('.')
                    && record::time_of_file(&fname).is_some()
                    && !keep.contains(&rel)
                {
                    out.push(rel);
                }
            }
        }
    }
    out
}

/// The backing file name in a qcow2 image's header (read natively: no qemu-img).
pub fn backing_name(f: &std::fs::File) -> Option<String> {
    use std::os::unix::fs::FileExt;
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
