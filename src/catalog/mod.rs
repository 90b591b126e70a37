//! The snapshot store's model (catalog mode): records, journals, images,
//! points, locks, and the pure planning of what to replicate. It uses only
//! `session`, `fs` and `hash`; the replication that carries a plan out
//! against a slave is `engine::catalog_mode`, the commands `cli::catalog`.
//!
//! A store holds hosts, their host snapshots (one generation each), disk
//! snapshots, storages and snapshot files (qcow2 images and CDP journals),
//! described by JSON catalog records (see `docs/store-format.md`). In
//! catalog mode the worker does not mirror the tree: it replicates points
//! (identified by host, disk and time), publishing each host snapshot on
//! the slave at once and only after its data is there and verified.
//!
//! - [`record`], [`store`]: the records and the catalog assembled from them
//! - [`cdp`], [`qcow`]: the journal format; qcow2 images through qemu-img
//! - [`points`]: listing, restoring and verifying points; RPO per host
//! - [`plan`]: pure planning of what to ship (the sync-mode matrix)
//! - [`locks`]: the lock protocol shared with the appliance
//! - [`sample`]: a generator of realistic sample stores (an appliance model)
//! - [`status`]: locks and RPO of a session, for `status --detail`

pub mod cdp;
pub mod locks;
pub mod plan;
pub mod points;
pub mod qcow;
pub mod record;
pub mod sample;
pub mod status;
pub mod store;
pub mod time;

use crate::error::Retry;
use std::path::{Path, PathBuf};

/// Errors of the catalog side, with the path or tool they concern.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("{0} is not a snapshot store (no store.json): give the store's root directory, or make one with `georep sample-store`")]
    NotAStore(PathBuf),
    #[error("{0}")]
    Tool(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Usage(String),
    #[error("{path}: the store's lock MUTEX stayed taken for {secs} s: a paused or hung process holds it (resume a paused georep session with `georep resume`, or find the holder with `fuser {path}`)")]
    Busy { path: PathBuf, secs: u64 },
}

impl CatalogError {
    pub fn invalid(path: &Path, msg: impl std::fmt::Display) -> CatalogError {
        CatalogError::Invalid {
            path: path.to_path_buf(),
            msg: msg.to_string(),
        }
    }

    pub fn io(op: &'static str, path: &Path, source: std::io::Error) -> CatalogError {
        CatalogError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether an operator must act (bad input) or a retry may succeed.
    pub fn retry(&self) -> Retry {
        match self {
            CatalogError::Io { .. } | CatalogError::Tool(_) | CatalogError::Busy { .. } => {
                Retry::Temporary
            }
            _ => Retry::Permanent,
        }
    }

    /// Bad input from the operator (exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            CatalogError::NotAStore(_) | CatalogError::NotFound(_) | CatalogError::Usage(_)
        )
    }
}

/// Sorts ranges `(offset, length)` and merges overlapping or adjacent ones.
pub fn merge_extents(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.retain(|e| e.1 > 0);
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (o, l) in v {
        match out.last_mut() {
            Some(last) if o <= last.0 + last.1 => last.1 = last.1.max(o + l - last.0),
            _ => out.push((o, l)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn extents_merge() {
        assert_eq!(
            super::merge_extents(vec![(10, 5), (0, 4), (4, 2), (12, 10), (30, 0), (40, 1)]),
            vec![(0, 6), (10, 12), (40, 1)]
        );
    }
}
