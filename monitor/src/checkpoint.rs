//! Checkpoints (`checkpoint.json`): a master time T, complete once the
//! root's stime reaches T, i.e. everything changed before T is on the slave.
//! Set by `georep checkpoint`, completed by the worker, read by status.

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::fs::OpenOptions;
use std::io;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The checkpoint time T (ns since the epoch).
    pub time_ns: u64,
    /// When it was set.
    pub set_at_ns: u64,
    /// When the worker saw the root's stime reach T.
    pub completed_at_ns: Option<u64>,
}

impl Checkpoint {
    pub fn read(path: &Path) -> Option<Checkpoint> {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// Whether a root stime of `synced` completes it.
    pub fn reached(&self, synced: u64) -> bool {
        synced >= self.time_ns
    }
}

/// Reads, changes and atomically rewrites `path` under an `flock` on a
/// lock file beside it, so the CLI setting a new checkpoint and the worker
/// completing the old one never overwrite each other.
pub fn update<T>(
    path: &Path,
    f: impl FnOnce(Option<Checkpoint>) -> (Option<Checkpoint>, T),
) -> io::Result<T> {
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path.with_extension("lock"))?;
    let _lock = Flock::lock(lock, FlockArg::LockExclusive).map_err(|(_, e)| io::Error::from(e))?;
    let (new, out) = f(Checkpoint::read(path));
    if let Some(c) = new {
        crate::write_atomic(
            path,
            &serde_json::to_vec_pretty(&c).map_err(io::Error::other)?,
        )?;
    }
    Ok(out)
}
