//! Roles and epochs on the worker's side (DESIGN §10): a master root that
//! was demoted is refused; every new connection claims the slave for the
//! session's epoch (the agent fences writers of an older one); a
//! failback's first sync has the old master's agent quarantine its
//! divergence before anything there is overwritten.

use crate::engine::outcome::WorkerError;
use crate::engine::slave::Slave;
use crate::fs::relpath::RelPath;
use crate::fs::role::{self, Role};
use crate::fs::xtime;
use crate::protocol::{ErrorKind, FailbackClaim, PeerEntry, ProtoError, QuarantinedEntry};
use crate::session::{Failback, Session, State};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Refuses to read a master root that is a replica again (demoted): its
/// data now comes from another session, and a stray worker of the old
/// direction must not replicate it onward.
pub fn check_master(session: &Session) -> Result<(), WorkerError> {
    let root = &session.config.master;
    match role::read(root) {
        Ok(Some(r)) if r.role == Role::Demoted => Err(WorkerError::Fenced(format!(
            "master {} is {}: session {} of the old direction must not run; delete it (`georep delete {}`), or promote the root again",
            root.display(),
            r.describe(),
            session.name,
            session.name
        ))),
        Ok(_) => Ok(()),
        Err(e) => Err(WorkerError::Fenced(format!("master: {e}"))),
    }
}

fn slave_err(session: &Session, e: ProtoError) -> WorkerError {
    match e {
        ProtoError::Remote(w) if w.kind == ErrorKind::Fenced => {
            WorkerError::Fenced(format!("slave {}: {}", session.config.slave, w.message))
        }
        e => WorkerError::Slave {
            slave: session.config.slave.clone(),
            source: e,
        },
    }
}

/// Claims the slave of a new connection for this session's epoch; records
/// the role the agent answered in `state`.
pub async fn claim(session: &Session, slave: &Slave, state: &mut State) -> Result<(), WorkerError> {
    let store = session.config.layout == crate::session::Layout::Store;
    let points = match &session.config.failback {
        // Only the quarantine's build needs them.
        Some(f) if store && state.quarantine.is_none() => {
            store_points(&session.config.master, f.promoted_at_ns)?
        }
        _ => Vec::new(),
    };
    let failback = session.config.failback.as_ref().map(|f| FailbackClaim {
        old_session: f.old_session,
        force: f.force,
        store,
        points,
    });
    let (r, describe) = slave
        .claim(session.config.session_id, session.config.epoch, failback)
        .await
        .map_err(|e| slave_err(session, e))?;
    tracing::debug!(session = %session.name, role = r.as_str(), %describe, "slave claimed");
    if state.slave_role.as_deref() != Some(r.as_str()) {
        state.slave_role = Some(r.as_str().to_string());
        let _ = session.save_state_volatile(state);
    }
    Ok(())
}

/// The points this (the promoted) store held at its promote, by host and
/// disk: the old master's agent finds the last common point of each disk
/// from them. Later points are this store's own, never common (a point of
/// the old master at the same time is its divergence). At most
/// `MAX_CLAIM_POINTS`, the newest of each disk: older history left out
/// appears in the quarantine as absent (a copy), never lost.
fn store_points(
    root: &Path,
    promoted_at_ns: u64,
) -> Result<Vec<(String, String, Vec<u64>)>, WorkerError> {
    use crate::catalog::points;
    let err = |e: crate::catalog::CatalogError| WorkerError::Master {
        path: root.to_path_buf(),
        source: std::io::Error::other(format!("failback: reading the store's points: {e}")),
    };
    let cat = crate::catalog::store::load(root).map_err(err)?;
    let mut out: Vec<(String, String, Vec<u64>)> = Vec::new();
    for p in points::list(root, &cat, &points::Filter::default()).map_err(err)? {
        if p.time > promoted_at_ns {
            continue;
        }
        match out.last_mut() {
            Some((h, d, ts)) if *h == p.host && *d == p.disk => ts.push(p.time),
            _ => out.push((p.host, p.disk, vec![p.time])),
        }
    }
    let max = crate::agent::quarantine::store::MAX_CLAIM_POINTS;
    if out.iter().map(|d| d.2.len()).sum::<usize>() > max {
        let per = (max / out.len().max(1)).max(1);
        for (_, _, ts) in &mut out {
            let cut = ts.len().saturating_sub(per);
            ts.drain(..cut);
        }
        out.truncate(max);
    }
    Ok(out)
}

/// Whether `p` (on this, the promoted master) changed since the promote:
/// marked later, or its inode changed later. An entry this side does not
/// have is not a conflict: whether it was deleted here or never came here
/// cannot be told apart, and either way the old master's copy is kept.
fn changed_here(root: &Path, p: &[u8], fb: &Failback, attr: Option<&str>) -> bool {
    let full = root.join(std::ffi::OsStr::from_bytes(p));
    let Ok(md) = full.symlink_metadata() else {
        return false;
    };
    let ctime = md.ctime() as i128 * 1_000_000_000 + md.ctime_nsec() as i128;
    let xt = match attr {
        Some(a) if !md.is_symlink() => xtime::read(&full, a).unwrap_or(0),
        _ => 0,
    };
    xt > fb.promote_stamp || ctime >= fb.promoted_at_ns as i128
}

/// This master's listing of `dir` for the old master's quarantine walk
/// (None: not a directory here).
fn peer_listing(
    root: &Path,
    dir: &RelPath,
    fb: &Failback,
    attr: Option<&str>,
) -> Option<Vec<PeerEntry>> {
    use crate::fs::meta::Kind;
    let full = dir.under(root);
    if !full.symlink_metadata().ok()?.is_dir() {
        return None;
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(&full).ok()?.flatten() {
        let name = e.file_name().as_bytes().to_vec();
        if dir.is_root() && crate::protocol::reserved_at_root(&name) {
            continue;
        }
        let Ok(md) = e.path().symlink_metadata() else {
            continue;
        };
        let kind = Kind::of(&md);
        let rel = [
            dir.as_bytes(),
            if dir.is_root() { b"" } else { b"/" },
            &name,
        ]
        .concat();
        out.push(PeerEntry {
            kind,
            size: if kind == Kind::File { md.len() } else { 0 },
            mtime: crate::fs::meta::Timestamp {
                sec: md.mtime(),
                nsec: md.mtime_nsec() as u32,
            },
            target: std::fs::read_link(e.path())
                .ok()
                .map(|t| serde_bytes::ByteBuf::from(t.as_os_str().as_bytes().to_vec())),
            changed: changed_here(root, &rel, fb, attr),
            name: serde_bytes::ByteBuf::from(name),
            mode: md.mode() & 0o7777 | crate::fs::meta::recorded_setid(&e.path(), &md),
            uid: md.uid(),
            gid: md.gid(),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Some(out)
}

/// Whether the old master's quarantined entry equals this master's version.
fn same_here(root: &Path, e: &QuarantinedEntry) -> bool {
    let full = root.join(std::ffi::OsStr::from_bytes(e.path.as_bytes()));
    let Ok(md) = full.symlink_metadata() else {
        return false;
    };
    use crate::fs::meta::Kind;
    match e.kind {
        Kind::Dir => md.is_dir(),
        Kind::Symlink => {
            md.is_symlink()
                && (md.uid(), md.gid()) == (e.meta.uid, e.meta.gid)
                && (md.mtime(), md.mtime_nsec() as u32) == (e.meta.mtime.sec, e.meta.mtime.nsec)
                && std::fs::read_link(&full).is_ok_and(|t| {
                    Some(t.as_os_str().as_bytes()) == e.target.as_ref().map(|t| t.as_slice())
                })
        }
        Kind::File => {
            md.is_file()
                && md.len() == e.size
                && crate::fs::meta::read_xattrs(&full).is_ok_and(|x| {
                    crate::fs::meta::Meta::from_metadata(&md, x).with_recorded_setid(&full, &md)
                        == e.meta
                })
                && crate::catalog::points::file_digest(&full)
                    .is_ok_and(|(_, d)| Some(d) == e.digest)
        }
        Kind::Other => false,
    }
}

/// A failback's first sync: the old master's agent copies its divergence
/// into a quarantine, this side marks conflicts (also changed here) and
/// drops entries equal to ours, then the quarantine is published, before
/// the crawl writes anything there. Done once per session (re-done from
/// the start if interrupted before it was published).
pub async fn quarantine(
    session: &Session,
    slave: &Slave,
    state: &mut State,
) -> Result<Option<String>, WorkerError> {
    let Some(fb) = &session.config.failback else {
        return Ok(None);
    };
    if state.quarantine.is_some() {
        return Ok(None);
    }
    let root = session.config.master.clone();
    let attr = xtime::master_id(&root)
        .ok()
        .flatten()
        .map(|m| xtime::xtime_attr(&m));
    let mut answers = Vec::new();
    let id = loop {
        let (qid, entries, ask, done) = slave
            .quarantine_step(1000, 64 << 20, answers)
            .await
            .map_err(|e| slave_err(session, e))?;
        let (root2, fb2, attr2) = (root.clone(), fb.clone(), attr.clone());
        let (conflicts, same, next) = tokio::task::spawn_blocking(move || {
            let mut conflicts: Vec<RelPath> = Vec::new();
            let mut same: Vec<RelPath> = Vec::new();
            for e in entries {
                if same_here(&root2, &e) {
                    same.push(e.path);
                } else if changed_here(&root2, e.path.as_bytes(), &fb2, attr2.as_deref()) {
                    conflicts.push(e.path);
                }
            }
            let answers: Vec<_> = ask
                .into_iter()
                .map(|d| {
                    let l = peer_listing(&root2, &d, &fb2, attr2.as_deref());
                    (d, l)
                })
                .collect();
            (conflicts, same, answers)
        })
        .await
        .expect("blocking task");
        answers = next;
        if !conflicts.is_empty() || !same.is_empty() {
            slave
                .quarantine_resolve(conflicts, same)
                .await
                .map_err(|e| slave_err(session, e))?;
        }
        if done {
            break qid;
        }
    };
    slave
        .quarantine_commit()
        .await
        .map_err(|e| slave_err(session, e))?;
    tracing::info!(session = %session.name, %id, "failback quarantine published on the old master");
    state.quarantine = Some(id.clone());
    session
        .save_state(state)
        .map_err(|source| WorkerError::State {
            path: session.dir.join("state.json"),
            source,
        })?;
    Ok(Some(id))
}
