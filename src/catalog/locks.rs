//! Point locks on the master: while a worker reads a point's snapshot
//! files, the appliance's retention and reclamation must not delete,
//! rewrite, truncate, split or rebase them (appending to a locked journal
//! is fine). The protocol, for georep and for the appliance's tools:
//!
//! - Locks live in `STORE/.georep-locks/`, one JSON file per locked point
//!   ([`LockRecord`]: session, host, disk, time, the store-relative `files`
//!   being read, and the holder's pid, start time and boot id).
//! - `STORE/.georep-locks/MUTEX` is taken with `flock(LOCK_EX)` around
//!   every check-and-act: georep holds it while writing a lock file; the
//!   appliance holds it while it checks the locks and commits a deletion
//!   or merge (record updates and unlinks), and not while it prepares.
//!   Nobody waits for it forever: after [`MUTEX_WAIT`] the taker gives up
//!   with [`CatalogError::Busy`] (a holder can be stopped, e.g. a worker
//!   paused by `georep pause` at that moment) and retries later.
//! - After writing its lock, georep re-reads the catalog: a change the
//!   appliance committed just before is seen and the point re-planned.
//! - A lock whose holder is gone (pid dead, reused, or another boot) is
//!   stale: it binds no one, and may be removed by anyone holding MUTEX.
//!   georep removes its own locks when the transfer ends, and its
//!   session's stale locks when a worker starts.

use super::CatalogError;
use georep_monitor::{PidRecord, ProcessState};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub const LOCK_DIR: &str = ".georep-locks";
pub const MUTEX: &str = "MUTEX";
/// How long [`mutex`] waits for the MUTEX before giving up.
pub const MUTEX_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// What a lock file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    pub session: String,
    pub host: String,
    pub disk: String,
    /// The point's time (ns since the epoch).
    pub time: u64,
    pub time_utc: String,
    /// Snapshot files being read, relative to the store root.
    pub files: Vec<String>,
    /// What the holder does: `qcow`, `materialise`, `cdp-append`.
    pub purpose: String,
    pub holder: PidRecord,
    /// When the lock was taken (ns since the epoch).
    pub since: u64,
}

/// A lock file as found, with whether its holder still runs.
#[derive(Debug, Clone, Serialize)]
pub struct LockInfo {
    pub path: PathBuf,
    #[serde(flatten)]
    pub record: LockRecord,
    pub live: bool,
}

fn dir(store: &Path) -> PathBuf {
    store.join(LOCK_DIR)
}

/// Holds the store's lock MUTEX while alive.
pub struct Mutex {
    _f: Flock<File>,
}

/// Takes the MUTEX, waiting at most [`MUTEX_WAIT`].
pub fn mutex(store: &Path) -> Result<Mutex, CatalogError> {
    mutex_within(store, MUTEX_WAIT)
}

/// Takes the MUTEX, waiting at most `wait` (polling: `flock` has no timeout).
pub fn mutex_within(store: &Path, wait: std::time::Duration) -> Result<Mutex, CatalogError> {
    let d = dir(store);
    std::fs::create_dir_all(&d).map_err(|e| CatalogError::io("create", &d, e))?;
    let p = d.join(MUTEX);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|e| CatalogError::io("open", &p, e))?;
    let deadline = std::time::Instant::now() + wait;
    let mut f = f;
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(f) => return Ok(Mutex { _f: f }),
            Err((back, nix::errno::Errno::EWOULDBLOCK)) => f = back,
            Err((_, nix::errno::Errno::EINTR)) => {
                return Err(CatalogError::io(
                    "lock",
                    &p,
                    std::io::ErrorKind::Interrupted.into(),
                ))
            }
            Err((_, e)) => return Err(CatalogError::io("lock", &p, e.into())),
        }
        let now = std::time::Instant::now();
        if now >= deadline {
            return Err(CatalogError::Busy {
                path: p,
                secs: wait.as_secs(),
            });
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(std::time::Duration::from_millis(50));
    }
}

/// A held point lock; the lock file is removed when it is dropped.
#[derive(Debug)]
pub struct PointLock {
    path: PathBuf,
}

impl PointLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PointLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Locks a point: writes its lock file under the MUTEX.
pub fn acquire(
    store: &Path,
    session: &str,
    host: &str,
    disk: &str,
    time: u64,
    files: Vec<String>,
    purpose: &str,
) -> Result<PointLock, CatalogError> {
    let holder = PidRecord::current()
        .map_err(|e| CatalogError::io("read", Path::new("/proc/self/stat"), e))?;
    let rec = LockRecord {
        session: session.to_string(),
        host: host.to_string(),
        disk: disk.to_string(),
        time,
        time_utc: super::time::rfc3339(time),
        files,
        purpose: purpose.to_string(),
        holder,
        since: super::time::now(),
    };
    let _m = mutex(store)?;
    let name = format!(
        "{session}-{}-{}.json",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let path = dir(store).join(name);
    georep_monitor::write_atomic(&path, &super::record::to_json(&rec))
        .map_err(|e| CatalogError::io("write", &path, e))?;
    Ok(PointLock { path })
}

/// Every lock file of the store, live or stale (for `status --detail`).
pub fn list(store: &Path) -> Result<Vec<LockInfo>, CatalogError> {
    let d = dir(store);
    let rd = match std::fs::read_dir(&d) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CatalogError::io("list", &d, e)),
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !name.ends_with(".json") || name.starts_with('.') {
            continue;
        }
        let Ok(bytes) = std::fs::read(e.path()) else {
            continue;
        };
        let Ok(record) = serde_json::from_slice::<LockRecord>(&bytes) else {
            continue;
        };
        let live = record.holder.state() == ProcessState::Running;
        out.push(LockInfo {
            path: e.path(),
            record,
            live,
        });
    }
    out.sort_by(|a, b| (a.record.since, &a.path).cmp(&(b.record.since, &b.path)));
    Ok(out)
}

/// Removes stale lock files (of `session` only, if given); returns how many.
pub fn clear_stale(store: &Path, session: Option<&str>) -> Result<usize, CatalogError> {
    if !dir(store).is_dir() {
        return Ok(0);
    }
    let _m = mutex(store)?;
    let mut n = 0;
    for l in list(store)? {
        if !l.live
            && session.is_none_or(|s| s == l.record.session)
            && std::fs::remove_file(&l.path).is_ok()
        {
            n += 1;
        }
    }
    Ok(n)
}

/// The appliance's side: under the MUTEX, the first live lock naming any
/// of `files`, else runs `commit` (the deletion or merge) and returns None.
pub fn unless_locked<T>(
    store: &Path,
    files: &[String],
    commit: impl FnOnce() -> T,
) -> Result<Result<T, LockInfo>, CatalogError> {
    let _m = mutex(store)?;
    for l in list(store)? {
        if l.live && l.record.files.iter().any(|f| files.contains(f)) {
            return Ok(Err(l));
        }
    }
    Ok(Ok(commit()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Retry;

    #[test]
    fn a_lock_blocks_the_appliance_until_dropped_and_a_dead_holder_binds_no_one() {
        let d = tempfile::tempdir().unwrap();
        let files = vec!["hosts/h/disks/d/a.qcow2".to_string()];
        let lock = acquire(d.path(), "s", "h", "d", 5, files.clone(), "qcow").unwrap();
        let l = list(d.path()).unwrap();
        assert_eq!(l.len(), 1);
        assert!(l[0].live);
        let blocked = unless_locked(d.path(), &files, || ()).unwrap();
        assert!(blocked.is_err());
        assert!(unless_locked(d.path(), &["other".to_string()], || ())
            .unwrap()
            .is_ok());
        drop(lock);
        assert!(list(d.path()).unwrap().is_empty());
        assert!(unless_locked(d.path(), &files, || ()).unwrap().is_ok());
        // A lock left by a dead process (another start time) is stale.
        let lock = acquire(d.path(), "s", "h", "d", 5, files.clone(), "qcow").unwrap();
        let mut rec: LockRecord =
            serde_json::from_slice(&std::fs::read(lock.path()).unwrap()).unwrap();
        rec.holder.start_ticks += 1;
        std::fs::write(lock.path(), serde_json::to_vec(&rec).unwrap()).unwrap();
        assert!(!list(d.path()).unwrap()[0].live);
        assert!(unless_locked(d.path(), &files, || ()).unwrap().is_ok());
        assert_eq!(clear_stale(d.path(), Some("other")).unwrap(), 0);
        assert_eq!(clear_stale(d.path(), Some("s")).unwrap(), 1);
        assert!(list(d.path()).unwrap().is_empty());
        std::mem::forget(lock);
    }

    #[test]
    fn a_held_mutex_makes_others_give_up_with_a_busy_error_not_wait_forever() {
        let d = tempfile::tempdir().unwrap();
        let held = mutex(d.path()).unwrap();
        let started = std::time::Instant::now();
        let e = mutex_within(d.path(), std::time::Duration::from_millis(200))
            .err()
            .expect("the MUTEX is held");
        assert!(started.elapsed() >= std::time::Duration::from_millis(200));
        assert!(matches!(e, CatalogError::Busy { .. }), "{e}");
        assert_eq!(e.retry(), Retry::Temporary);
        assert!(e.to_string().contains("georep resume"), "{e}");
        drop(held);
        assert!(mutex_within(d.path(), std::time::Duration::ZERO).is_ok());
    }
}
