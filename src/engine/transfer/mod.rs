//! Shipping one regular file.
//!
//! Small files travel whole in one `PutFile` frame. Larger ones go window
//! by window ([`WINDOW`](crate::hash::digest::WINDOW) bytes, read with pread, so memory stays bounded):
//!
//! 1. With a basis on the slave, both sides hash every overlapping window
//!    (at the same time), by 4 KiB blocks (`blocktree`): one pass gives the
//!    window's hash and its blocks' comparison hashes, which both sides
//!    keep (within a memory budget). Equal windows are copied on the slave,
//!    not sent. An unchanged file stops here and costs nothing but the hashes.
//! 2. A differing window is compared by aligned 4 KiB blocks (the agent
//!    sends its kept block hashes): equal blocks are copied, different ones
//!    read again and sent as literals. That is the disk-image case:
//!    scattered in-place writes.
//! 3. When most blocks differ, the data may have shifted: an rsync rolling
//!    delta (fast_rsync) against the slave's neighbourhood is tried, and
//!    dropped for the rest of the file when it does not pay.
//! 4. Data beyond the basis, and new files, go as literals; holes are never
//!    read or sent, and all-zero blocks are not sent either.
//!
//! The master's digest of the file is checked by the agent before it
//! publishes; a file that changed while being read is aborted and retried.
//! Files of at least the session's `inplace_min_size` that exist on the
//! slave are patched there in place (see `agent::inplace`); the exchange
//! is the same.

mod partial;
mod read;
mod segments;
mod windows;

use crate::engine::context::Engine;
use crate::engine::master::MasterError;
use crate::engine::slave::{Probed, Slave};
use crate::fs::meta::{read_xattrs, Meta};
use crate::fs::relpath::RelPath;
use crate::hash::digest;
use crate::protocol::{Hash32, ProtoError, MAX_DATA};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use tracing::Instrument;

/// Files up to this size always travel whole in one frame.
pub const SMALL: u64 = 64 << 10;
/// Aligned block size for in-place change detection.
pub const BLOCK: u32 = 4096;
/// Block size of rsync signatures for the rolling fallback.
const ROLL_BLOCK: u32 = 2048;
/// Windows whose block hashes are requested ahead of use.
const PREFETCH: usize = 8;
/// Block hashes of its own windows the worker keeps per file between the
/// passes (16 MiB: 4 GiB of file); windows beyond are read and hashed again.
const KEYS_BUDGET: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(transparent)]
    Master(#[from] MasterError),
    #[error("{0}: changed while being read; it will be sent again by the next crawl")]
    Changed(PathBuf),
    #[error(transparent)]
    Slave(#[from] ProtoError),
    /// The worker is stopping: the file is aborted (never published) and sent by the next crawl.
    #[error("interrupted by shutdown")]
    Interrupted,
}

impl FileError {
    /// Whether the connection is gone (the crawl cannot go on).
    pub fn fatal(&self) -> bool {
        matches!(self, FileError::Slave(e) if e.is_fatal())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shipped {
    Sent,
    /// The slave already had this content; only metadata may differ.
    Unchanged,
    /// The slave had this content (a small file): its metadata is now the
    /// master's, or a copy of the basis was published; no data was sent.
    Updated,
}

fn merr<'a>(
    op: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> MasterError + 'a {
    move |source| MasterError {
        op,
        path: path.to_path_buf(),
        // A read past the end: the file was truncated while being read.
        source: if source.kind() == std::io::ErrorKind::UnexpectedEof {
            std::io::Error::new(
                source.kind(),
                "the file shrank while being read (truncated); it will be sent again by the next crawl",
            )
        } else {
            source
        },
    }
}

/// What identifies a file's state: if any of it moves, the file changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
}

fn fingerprint(md: &std::fs::Metadata) -> Fingerprint {
    Fingerprint {
        size: md.len(),
        mtime: (md.mtime(), md.mtime_nsec()),
        ctime: (md.ctime(), md.ctime_nsec()),
        ino: md.ino(),
    }
}

fn meta_of(path: &std::path::Path, md: &std::fs::Metadata) -> Result<Meta, MasterError> {
    Ok(
        Meta::from_metadata(md, read_xattrs(path).map_err(merr("read xattrs of", path))?)
            .with_recorded_setid(path, md),
    )
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
}

/// Where the slave finds the basis a file is diffed against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Basis {
    /// No basis: everything goes as literal data.
    None,
    /// The slave's current file at the destination (if it is a regular file).
    Dest,
    /// Another slave file, e.g. the parent point's image.
    Other(RelPath),
}

/// Ships the master file `rel` to the slave, diffed against `basis` (the
/// slave's file there, another slave file such as a rename's source, or none).
pub async fn ship(
    e: &Engine,
    rel: &RelPath,
    size_hint: u64,
    basis: Basis,
) -> Result<Shipped, FileError> {
    // Only here (the tree crawl): catalog mode publishes images whole.
    if basis == Basis::Dest && size_hint > SMALL && e.in_place(size_hint) {
        let span = tracing::info_span!("transfer", path = %rel, size = size_hint, in_place = true);
        let src = e.master.path(rel);
        let r = Box::pin(windows::large(e, &src, rel, Basis::Dest, true))
            .instrument(span)
            .await;
        handled(e, size_hint, false, &r);
        return Ok(r?.0);
    }
    Ok(ship_from(e, &e.master.path(rel), rel, size_hint, basis)
        .await?
        .0)
}

/// Ships local file `src` (a master file or a file made from one) to
/// `dest` on the slave, diffed against `basis`; returns what happened and
/// the digest of the content the slave verified.
pub async fn ship_from(
    e: &Engine,
    src: &std::path::Path,
    dest: &RelPath,
    size_hint: u64,
    basis: Basis,
) -> Result<(Shipped, Hash32), FileError> {
    let span = tracing::info_span!("transfer", path = %dest, size = size_hint, basis = ?basis);
    async move {
        e.gate().await;
        let has_basis = basis != Basis::None;
        if size_hint <= SMALL || (!has_basis && size_hint <= MAX_DATA as u64) {
            let r = small(e, src, dest, size_hint, &basis).await;
            handled(e, size_hint, true, &r);
            r
        } else {
            // Boxed: its state is large, and most files are small.
            let r = Box::pin(windows::large(e, src, dest, basis, false)).await;
            handled(e, size_hint, false, &r);
            r
        }
    }
    .instrument(span)
    .await
}

/// Counts a file as handled for progress. Large files count their windows
/// as they go; one found unchanged by its hashes counts its size here.
fn handled(e: &Engine, size: u64, whole: bool, r: &Result<(Shipped, Hash32), FileError>) {
    e.work.files_done.fetch_add(1, Ordering::Relaxed);
    if whole || matches!(r, Ok((Shipped::Unchanged, _))) {
        e.work.bytes_done.fetch_add(size, Ordering::Relaxed);
    }
}

/// Small files the slave has a copy of are probed first (see
/// `Request::ProbeFile`) when at least this big; below, the probe would
/// cost about what the file does.
const PROBE_MIN: usize = 256;

/// Block size of a small file's signature: about 64 blocks per file.
fn probe_block(len: usize) -> u32 {
    ((len / 64).next_power_of_two() as u32).clamp(256, 4096)
}

/// Reads a small master file whole, under the read budget (held while the
/// returned permit lives), with its metadata and fingerprint.
async fn read_small<'a>(
    e: &'a Engine,
    src: &std::path::Path,
    size_hint: u64,
) -> Result<(Vec<u8>, Meta, Fingerprint, tokio::sync::SemaphorePermit<'a>), FileError> {
    let permits = (size_hint.max(1) as usize).min(crate::engine::context::READ_BUDGET) as u32;
    let budget = e
        .read_budget
        .acquire_many(permits)
        .await
        .expect("budget never closed");
    let path = src.to_path_buf();
    let (data, meta, fp) = blocking(move || -> Result<(Vec<u8>, Meta, Fingerprint), FileError> {
        let f = File::open(&path).map_err(merr("open", &path))?;
        let before = f.metadata().map_err(merr("stat", &path))?;
        if before.len() > MAX_DATA as u64 {
            return Err(FileError::Changed(path));
        }
        let mut data = vec![0u8; before.len() as usize];
        f.read_exact_at(&mut data, 0).map_err(merr("read", &path))?;
        let after = f.metadata().map_err(merr("stat", &path))?;
        if fingerprint(&before) != fingerprint(&after) {
            return Err(FileError::Changed(path));
        }
        let meta = meta_of(&path, &after)?;
        Ok((data, meta, fingerprint(&after)))
    })
    .await?;
    Ok((data, meta, fp, budget))
}

/// Ships a small file: with a copy on the slave, compared by digest first
/// (same: metadata only) and sent as a delta when that is smaller; else whole.
async fn small(
    e: &Engine,
    src: &std::path::Path,
    rel: &RelPath,
    size_hint: u64,
    basis: &Basis,
) -> Result<(Shipped, Hash32), FileError> {
    let (data, meta, fp, budget) = read_small(e, src, size_hint).await?;
    let digest = digest::digest_of(&data);
    let sl = e.slave.pick();
    if *basis == Basis::None || data.len() < PROBE_MIN {
        return put_whole(e, &sl, rel, data, digest, meta, budget).await;
    }
    let other = match basis {
        Basis::Other(p) => Some(p.clone()),
        _ => None,
    };
    let block = probe_block(data.len());
    // Nothing held while the answer travels: a differing file is read again.
    drop((data, budget));
    let probe = sl
        .probe(rel.clone(), other.clone(), digest, meta.clone(), block)
        .await?;
    let sig = match probe.wait().await? {
        Probed::Same => {
            sl.carried_small();
            return Ok((Shipped::Updated, digest));
        }
        Probed::Differs(sig) => sig,
    };
    let (data, meta, fp2, budget) = read_small(e, src, size_hint).await?;
    if fp2 != fp || digest::digest_of(&data) != digest {
        return Err(FileError::Changed(src.to_path_buf()));
    }
    if sig.is_empty() {
        return put_whole(e, &sl, rel, data, digest, meta, budget).await;
    }
    let (patch, data) =
        blocking(move || (crate::engine::delta::rolling_delta(&sig, &data), data)).await;
    match patch {
        // A delta pays when it saves a tenth of the file (it costs the slave a read).
        Some(p) if p.len() + p.len() / 8 + 64 < data.len() * 9 / 10 => {
            let n = p.len() as u64;
            let size = data.len() as u64;
            drop((data, budget));
            let pending = sl
                .put_delta(rel.clone(), other, size, p, digest, meta)
                .await?;
            pending.wait().await?;
            sl.carried_small();
            e.stats.bytes_delta.fetch_add(n, Ordering::Relaxed);
            Ok((Shipped::Sent, digest))
        }
        _ => put_whole(e, &sl, rel, data, digest, meta, budget).await,
    }
}

/// Sends a small file whole in one frame; waits for it to be published.
async fn put_whole(
    e: &Engine,
    sl: &Slave,
    rel: &RelPath,
    data: Vec<u8>,
    digest: Hash32,
    meta: Meta,
    budget: tokio::sync::SemaphorePermit<'_>,
) -> Result<(Shipped, Hash32), FileError> {
    let literal = data.len() as u64;
    let pending = sl.put_file(rel.clone(), data, digest, meta).await?;
    drop(budget);
    pending.wait().await?;
    sl.carried_small();
    e.stats.bytes_literal.fetch_add(literal, Ordering::Relaxed);
    Ok((Shipped::Sent, digest))
}
