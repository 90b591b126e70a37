//! Shipping one regular file.
//!
//! Small files travel whole in one `PutFile` frame. Larger ones go window
//! by window ([`WINDOW`] bytes, read with pread, so memory stays bounded):
//!
//! 1. With a basis on the slave, both sides hash every overlapping window
//!    (in parallel); equal windows are copied on the slave, not sent. An
//!    unchanged file stops here and costs nothing but the hashes.
//! 2. A differing window is compared by aligned 4 KiB blocks (both sides
//!    hash): equal blocks are copied, different ones sent as literals. That
//!    is the disk-image case: scattered in-place writes.
//! 3. When most blocks differ, the data may have shifted: an rsync rolling
//!    delta (fast_rsync) against the slave's neighbourhood is tried, and
//!    dropped for the rest of the file when it does not pay.
//! 4. Data beyond the basis, and new files, go as literals; holes are never
//!    read or sent, and all-zero blocks are not sent either.
//!
//! The master's digest of the file is checked by the agent before it
//! publishes; a file that changed while being read is aborted and retried.

use crate::crawl::Engine;
use crate::delta;
use crate::digest::{self, Digester, WINDOW};
use crate::master::MasterError;
use crate::meta::{read_xattrs, Meta};
use crate::protocol::{Hash32, ProtoError, MAX_DATA};
use crate::relpath::RelPath;
use crate::sparse;
use std::collections::VecDeque;
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
}

fn merr<'a>(
    op: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> MasterError + 'a {
    move |source| MasterError {
        op,
        path: path.to_path_buf(),
        source,
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
    Ok(Meta::from_metadata(
        md,
        read_xattrs(path).map_err(merr("read xattrs of", path))?,
    ))
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

/// Ships the master file `rel` to the slave. `basis`: whether the slave
/// has a regular file there to diff against.
pub async fn ship(
    e: &Engine,
    rel: &RelPath,
    size_hint: u64,
    basis: bool,
) -> Result<Shipped, FileError> {
    let basis = if basis { Basis::Dest } else { Basis::None };
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
        let has_basis = basis != Basis::None;
        if size_hint <= SMALL || (!has_basis && size_hint <= MAX_DATA as u64) {
            small(e, src, dest, size_hint).await
        } else {
            // Boxed: its state is large, and most files are small.
            Box::pin(large(e, src, dest, basis)).await
        }
    }
    .instrument(span)
    .await
}

async fn small(
    e: &Engine,
    src: &std::path::Path,
    rel: &RelPath,
    size_hint: u64,
) -> Result<(Shipped, Hash32), FileError> {
    let permits = (size_hint.max(1) as usize).min(crate::crawl::READ_BUDGET) as u32;
    let _budget = e
        .read_budget
        .acquire_many(permits)
        .await
        .expect("budget never closed");
    let path = src.to_path_buf();
    let (data, meta) = blocking(move || -> Result<(Vec<u8>, Meta), FileError> {
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
        Ok((data, meta))
    })
    .await?;
    let digest = digest::digest_of(&data);
    let literal = data.len() as u64;
    let pending = e.slave.put_file(rel.clone(), data, digest, meta).await?;
    drop(_budget);
    pending.wait().await?;
    e.stats.bytes_literal.fetch_add(literal, Ordering::Relaxed);
    Ok((Shipped::Sent, digest))
}

/// A window of the master file as read: zeros where the file has holes.
struct Window {
    index: usize,
    data: Vec<u8>,
}

/// Reads the requested windows in order on a blocking thread, one ahead.
fn spawn_reader(
    file: std::sync::Arc<File>,
    extents: std::sync::Arc<Vec<(u64, u64)>>,
    size: u64,
    wanted: Vec<usize>,
    path: PathBuf,
) -> tokio::sync::mpsc::Receiver<Result<Window, MasterError>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::task::spawn_blocking(move || {
        for index in wanted {
            let res = read_window(&file, &extents, size, index)
                .map(|data| Window { index, data })
                .map_err(merr("read", &path));
            let stop = res.is_err();
            if tx.blocking_send(res).is_err() || stop {
                return;
            }
        }
    });
    rx
}

fn window_range(size: u64, index: usize) -> (u64, u64) {
    let off = index as u64 * WINDOW;
    (off, WINDOW.min(size - off))
}

fn read_window(
    file: &File,
    extents: &[(u64, u64)],
    size: u64,
    index: usize,
) -> std::io::Result<Vec<u8>> {
    let (off, len) = window_range(size, index);
    read_range(file, extents, off, len)
}

/// Reads `[off, off+len)`, reading only the data extents (holes are zeros).
fn read_range(file: &File, extents: &[(u64, u64)], off: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    let end = off + len;
    for &(eo, el) in extents {
        let (s, t) = (eo.max(off), (eo + el).min(end));
        if s < t {
            file.read_exact_at(&mut buf[(s - off) as usize..(t - off) as usize], s)?;
        }
    }
    Ok(buf)
}

fn all_hole(extents: &[(u64, u64)], off: u64, len: u64) -> bool {
    !extents
        .iter()
        .any(|&(eo, el)| eo < off + len && eo + el > off)
}

async fn large(
    e: &Engine,
    src: &std::path::Path,
    rel: &RelPath,
    basis: Basis,
) -> Result<(Shipped, Hash32), FileError> {
    let _slot = e.large_files.acquire().await.expect("never closed");
    if e.shutting_down() {
        return Err(FileError::Interrupted);
    }
    let path = src.to_path_buf();
    let (file, before, extents) = {
        let path = path.clone();
        blocking(move || -> Result<_, MasterError> {
            let f = File::open(&path).map_err(merr("open", &path))?;
            let md = f.metadata().map_err(merr("stat", &path))?;
            let ext = sparse::data_ranges(&f, 0, md.len()).map_err(merr("seek", &path))?;
            Ok((f, md, ext))
        })
        .await?
    };
    let size = before.len();
    let file = std::sync::Arc::new(file);
    let extents = std::sync::Arc::new(extents);
    let fid = e.next_fid();
    let other = match &basis {
        Basis::Other(p) => Some(p.clone()),
        _ => None,
    };
    let opened = e.slave.open_file(fid, rel.clone(), other, size).await?;
    let basis_size = if basis != Basis::None {
        opened.wait().await?.unwrap_or(0)
    } else {
        0
    };
    let shortcut = basis == Basis::Dest;
    let result = send_windows(
        e, rel, fid, &path, &file, &extents, size, basis_size, shortcut,
    )
    .await;
    let (digest, unchanged) = match result {
        Ok(r) => r,
        Err(err) => {
            if let Ok(p) = e.slave.abort(fid).await {
                let _ = p.wait().await;
            }
            return Err(err);
        }
    };
    let after = {
        let file = file.clone();
        let path = path.clone();
        blocking(move || file.metadata().map_err(merr("stat", &path))).await?
    };
    if fingerprint(&before) != fingerprint(&after) || unchanged {
        e.slave.abort(fid).await?.wait().await?;
        if unchanged && fingerprint(&before) == fingerprint(&after) {
            return Ok((Shipped::Unchanged, digest));
        }
        return Err(FileError::Changed(path));
    }
    let meta = {
        let path = path.clone();
        blocking(move || meta_of(&path, &after)).await?
    };
    e.slave.commit(fid, digest, meta).await?.wait().await?;
    Ok((Shipped::Sent, digest))
}

/// Sends every window of the file; returns the master's digest and
/// whether the slave's basis turned out identical (nothing to publish,
/// checked only with `shortcut`: when the basis is the destination itself).
#[allow(clippy::too_many_arguments)]
async fn send_windows(
    e: &Engine,
    rel: &RelPath,
    fid: u64,
    path: &std::path::Path,
    file: &std::sync::Arc<File>,
    extents: &std::sync::Arc<Vec<(u64, u64)>>,
    size: u64,
    basis_size: u64,
    shortcut: bool,
) -> Result<(Hash32, bool), FileError> {
    let nwin = size.div_ceil(WINDOW) as usize;
    let overlap = size.min(basis_size);
    let nover = overlap.div_ceil(WINDOW) as usize;

    // Pass 1: window hashes of the overlap, both sides at once.
    let mut equal = vec![false; nover];
    let mut local: Vec<Hash32> = Vec::new();
    if nover > 0 {
        const BATCH: usize = 64;
        let mut tickets = Vec::new();
        for b in (0..nover).step_by(BATCH) {
            let off = b as u64 * WINDOW;
            tickets.push(
                e.slave
                    .window_hashes(
                        fid,
                        off,
                        (BATCH as u64 * WINDOW).min(overlap - off),
                        WINDOW as u32,
                    )
                    .await?,
            );
        }
        let (file, extents, p) = (file.clone(), extents.clone(), path.to_path_buf());
        let local_task =
            tokio::task::spawn_blocking(move || -> Result<Vec<Hash32>, MasterError> {
                (0..nover)
                    .map(|i| {
                        let (off, len) = window_range(overlap, i);
                        if all_hole(&extents, off, len) {
                            Ok(digest::zero_hash(len))
                        } else {
                            read_range(&file, &extents, off, len)
                                .map(|d| digest::hash(&d))
                                .map_err(merr("read", &p))
                        }
                    })
                    .collect()
            });
        let mut remote = Vec::with_capacity(nover);
        for t in tickets {
            remote.extend(t.wait().await?);
        }
        local = local_task.await.expect("hashing panicked")?;
        if remote.len() != nover {
            return Err(ProtoError::Violation(format!(
                "{rel}: {} window hashes for {nover} windows",
                remote.len()
            ))
            .into());
        }
        for i in 0..nover {
            equal[i] = local[i] == remote[i];
        }
        if shortcut && size == basis_size && equal.iter().all(|&x| x) {
            let mut d = Digester::new();
            for (i, h) in local.iter().enumerate() {
                d.feed_window_hash(h, window_range(size, i).1);
            }
            return Ok((d.finish(), true));
        }
    }

    // Pass 2: every window in order.
    let full_copy =
        |i: usize| i < nover && equal[i] && window_range(size, i).1 == window_range(overlap, i).1;
    let wanted: Vec<usize> = (0..nwin)
        .filter(|&i| {
            !full_copy(i) && {
                let (off, len) = window_range(size, i);
                !all_hole(extents, off, len)
            }
        })
        .collect();
    let mismatched: Vec<usize> = (0..nover).filter(|&i| !equal[i]).collect();
    let mut reader = spawn_reader(
        file.clone(),
        extents.clone(),
        size,
        wanted,
        path.to_path_buf(),
    );
    let mut prefetch: VecDeque<(usize, crate::slave::Pending<Vec<[u8; 16]>>)> = VecDeque::new();
    let mut next_mismatch = 0;
    let mut digest = Digester::new();
    let mut rolling = delta::RollingPolicy::default();
    for i in 0..nwin {
        if e.shutting_down() {
            return Err(FileError::Interrupted);
        }
        let (off, len) = window_range(size, i);
        if full_copy(i) {
            e.slave.copy(fid, off, len).await?;
            digest.feed_window_hash(&local[i], len);
            continue;
        }
        if all_hole(extents, off, len) && i >= nover {
            digest.feed_window_hash(&digest::zero_hash(len), len);
            continue;
        }
        // Keep block-hash requests for upcoming mismatched windows in flight.
        while prefetch.len() < PREFETCH && next_mismatch < mismatched.len() {
            let w = mismatched[next_mismatch];
            let (woff, wlen) = window_range(overlap, w);
            prefetch.push_back((w, e.slave.block_hashes(fid, woff, wlen, BLOCK).await?));
            next_mismatch += 1;
        }
        let data = if all_hole(extents, off, len) {
            vec![0u8; len as usize]
        } else {
            let w = reader
                .recv()
                .await
                .ok_or_else(|| FileError::Changed(path.to_path_buf()))??;
            debug_assert_eq!(w.index, i);
            w.data
        };
        let ov = if i < nover {
            window_range(overlap, i).1
        } else {
            0
        };
        let ops = if ov == 0 {
            delta::literal_ops(off, &data)
        } else if equal[i] {
            delta::copy_then_literal(off, &data, ov)
        } else {
            let (w, pending) = prefetch.pop_front().expect("prefetched in order");
            debug_assert_eq!(w, i);
            let remote = pending.wait().await?;
            let local_blocks: Vec<[u8; 16]> = data[..ov as usize]
                .chunks(BLOCK as usize)
                .map(digest::block_hash)
                .collect();
            let block_ops = delta::block_ops(off, &data, ov, BLOCK, &local_blocks, &remote);
            if rolling.worth_trying(&local_blocks, &remote) {
                let (bo, bl) = delta::rolling_basis(off, len, basis_size);
                let sig = e
                    .slave
                    .signature(fid, bo, bl, ROLL_BLOCK)
                    .await?
                    .wait()
                    .await?;
                let data_for_diff = data.clone();
                let patch = blocking(move || delta::rolling_delta(&sig, &data_for_diff)).await;
                match patch {
                    Some(d) if rolling.accept(d.len() as u64, delta::literal_bytes(&block_ops)) => {
                        vec![delta::Op::Patch {
                            offset: off,
                            out_len: len,
                            basis_off: bo,
                            basis_len: bl,
                            delta: d,
                        }]
                    }
                    _ => block_ops,
                }
            } else {
                block_ops
            }
        };
        for op in ops {
            send_op(e, fid, &data, off, op).await?;
        }
        digest.feed(&data);
    }
    Ok((digest.finish(), false))
}

async fn send_op(
    e: &Engine,
    fid: u64,
    window: &[u8],
    win_off: u64,
    op: delta::Op,
) -> Result<(), ProtoError> {
    match op {
        delta::Op::Copy { offset, len } => e.slave.copy(fid, offset, len).await,
        delta::Op::Literal { offset, len } => {
            let start = (offset - win_off) as usize;
            let bytes = &window[start..start + len as usize];
            for (i, chunk) in bytes.chunks(MAX_DATA).enumerate() {
                e.slave
                    .write(fid, offset + (i * MAX_DATA) as u64, chunk.to_vec())
                    .await?;
            }
            e.stats.bytes_literal.fetch_add(len, Ordering::Relaxed);
            Ok(())
        }
        delta::Op::Patch {
            offset,
            out_len,
            basis_off,
            basis_len,
            delta,
        } => {
            e.stats
                .bytes_delta
                .fetch_add(delta.len() as u64, Ordering::Relaxed);
            e.slave
                .patch(fid, offset, out_len, basis_off, basis_len, delta)
                .await
        }
    }
}
