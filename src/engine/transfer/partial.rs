//! The master's side of resumable transfers (see `agent::files::partial`):
//! which files resume, the identity of a master file a partial belongs
//! to, and the master's hashes of a kept prefix, which must equal the
//! agent's before anything is skipped.

use super::read::{all_hole, read_range, window_range};
use super::{blocking, merr, FileError};
use crate::engine::slave::Slave;
use crate::fs::relpath::RelPath;
use crate::hash::digest;
use crate::protocol::{ErrorKind, Hash16, Hash32, ProtoError, MAX_KEPT_WINDOWS};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

/// Files at least this big are sent resumably (the agent checkpoints
/// every 32 MiB).
pub const RESUME_MIN: u64 = 32 << 20;

/// Opens a file resumably if it qualifies: at least `RESUME_MIN` bytes, at
/// most `MAX_KEPT_WINDOWS` windows, and the agent has room (it answers
/// `Busy` when not: then None, the file is sent non-resumable).
pub async fn open(
    sl: &Slave,
    fid: u64,
    rel: &RelPath,
    basis: &Option<RelPath>,
    md: &std::fs::Metadata,
) -> Result<Option<(Option<u64>, u64, Vec<Hash32>)>, FileError> {
    let size = md.len();
    if size < RESUME_MIN || size.div_ceil(digest::WINDOW) > MAX_KEPT_WINDOWS {
        return Ok(None);
    }
    let p = sl
        .open_resumable(fid, rel.clone(), basis.clone(), size, key(md))
        .await?;
    match p.wait().await {
        Ok(r) => Ok(Some(r)),
        Err(ProtoError::Remote(w)) if w.kind == ErrorKind::Busy => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The identity of a master file's content as far as resuming goes: its
/// size, mtime and inode (not the ctime: marking a file changes that).
pub fn key(md: &std::fs::Metadata) -> Hash16 {
    let mut h = blake3::Hasher::new();
    for v in [
        md.len(),
        md.mtime() as u64,
        md.mtime_nsec() as u64,
        md.ino(),
        md.dev(),
    ] {
        h.update(&v.to_le_bytes());
    }
    let mut k = [0u8; 16];
    k.copy_from_slice(&h.finalize().as_bytes()[..16]);
    k
}

/// The hashes of the first `n` windows of the master file.
pub async fn master_roots(
    file: &Arc<File>,
    extents: &Arc<Vec<(u64, u64)>>,
    size: u64,
    n: usize,
    path: &std::path::Path,
) -> Result<Vec<Hash32>, FileError> {
    let (f, x, p) = (file.clone(), extents.clone(), path.to_path_buf());
    let n = n.min(size.div_ceil(digest::WINDOW) as usize);
    Ok(blocking(move || {
        (0..n)
            .map(|i| {
                let (off, len) = window_range(size, i);
                if all_hole(&x, off, len) {
                    return Ok(digest::zero_hash(len));
                }
                read_range(&f, &x, off, len).map(|d| digest::hash(&d))
            })
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(merr("read", &p))
    })
    .await?)
}
