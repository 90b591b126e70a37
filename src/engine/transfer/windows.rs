//! Shipping a large file window by window: window hashes of both sides
//! first, then per window a copy, aligned 4 KiB blocks, a rolling delta or
//! literals (see the module above for the whole exchange).

use super::read::{all_hole, read_range, read_range_into, spawn_reader, window_range};
use super::{
    blocking, fingerprint, merr, meta_of, Basis, FileError, Shipped, BLOCK, KEYS_BUDGET, PREFETCH,
    ROLL_BLOCK,
};
use crate::engine::context::Engine;
use crate::engine::delta;
use crate::engine::master::MasterError;
use crate::engine::slave::Slave;
use crate::fs::relpath::RelPath;
use crate::fs::sparse;
use crate::hash::blocktree;
use crate::hash::digest::{self, WINDOW};
use crate::protocol::{Hash16, Hash32, ProtoError, MAX_DATA};
use std::collections::VecDeque;
use std::fs::File;
use std::sync::atomic::Ordering;

pub(super) async fn large(
    e: &Engine,
    src: &std::path::Path,
    rel: &RelPath,
    basis: Basis,
    in_place: bool,
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
    let sl = e.slave.pick();
    let mut nseg = if in_place {
        1
    } else {
        super::segments::count(e.slave.streams(), size)
    };
    // As many segments as there are free slots (never waiting for them while
    // holding a large-file slot: another shared file may hold the rest).
    let mut _segs = None;
    while nseg > 1 && _segs.is_none() {
        match e.segment_slots.try_acquire_many(nseg as u32) {
            Ok(p) => _segs = Some(p),
            Err(_) => nseg -= 1,
        }
    }
    if nseg > 1 {
        let src = super::segments::Source {
            path: &path,
            file: &file,
            extents: &extents,
            before: &before,
        };
        return super::segments::shared(e, &sl, rel, src, basis, nseg).await;
    }
    let mut fid = e.next_fid();
    let other = match &basis {
        Basis::Other(p) => Some(p.clone()),
        _ => None,
    };
    // Windows kept from an interrupted attempt (resumable files), with the
    // master's hashes of them.
    let mut kept: Vec<Hash32> = Vec::new();
    let (basis_size, patched) = if in_place {
        let (b, p) = sl
            .open_in_place(fid, rel.clone(), size)
            .await?
            .wait()
            .await?;
        (b.unwrap_or(0), p)
    } else if let Some(mut opened) = super::partial::open(&sl, fid, rel, &other, &before).await? {
        let key = super::partial::key(&before);
        if !opened.2.is_empty() {
            let own =
                super::partial::master_roots(&file, &extents, size, opened.2.len(), &path).await?;
            if own == opened.2 {
                kept = own;
            } else {
                // Not this master file after all: start again from nothing.
                sl.abort(fid).await?.wait().await?;
                fid = e.next_fid();
                opened = sl
                    .open_resumable(fid, rel.clone(), other.clone(), size, key)
                    .await?
                    .wait()
                    .await?;
                opened.2.clear();
            }
        }
        if !kept.is_empty() {
            let bytes = (kept.len() as u64 * WINDOW).min(size);
            e.stats.bytes_resumed.fetch_add(bytes, Ordering::Relaxed);
            tracing::info!(path = %rel, resumed = bytes, "resuming an interrupted transfer");
        }
        let b = if basis != Basis::None {
            opened.0.unwrap_or(0)
        } else {
            0
        };
        (b, false)
    } else {
        let opened = sl.open_file(fid, rel.clone(), other, size).await?;
        let b = if basis != Basis::None {
            opened.wait().await?.unwrap_or(0)
        } else {
            0
        };
        (b, false)
    };
    let gate = Shortcut::new(1);
    let shortcut = (basis == Basis::Dest && kept.is_empty()).then_some(&gate);
    let part = Part {
        sl: &sl,
        fid,
        windows: kept.len()..size.div_ceil(WINDOW) as usize,
        read_ahead: true,
    };
    let result = send_windows(
        e, &part, rel, &path, &file, &extents, size, basis_size, shortcut,
    )
    .await
    .map(|(r, same)| {
        let mut all = std::mem::take(&mut kept);
        all.extend(r);
        (all, same)
    });
    let (roots, unchanged) = match result {
        Ok(r) => r,
        // Stopping: the agent keeps a resumable file for the next run.
        Err(FileError::Interrupted) => return Err(FileError::Interrupted),
        Err(err) => {
            if let Ok(p) = sl.abort(fid).await {
                let _ = p.wait().await;
            }
            return Err(err);
        }
    };
    let digest = digest::of_window_hashes(&roots, size);
    let after = {
        let file = file.clone();
        let path = path.clone();
        blocking(move || file.metadata().map_err(merr("stat", &path))).await?
    };
    if fingerprint(&before) != fingerprint(&after) || unchanged {
        sl.abort(fid).await?.wait().await?;
        if unchanged && fingerprint(&before) == fingerprint(&after) {
            return Ok((Shipped::Unchanged, digest));
        }
        return Err(FileError::Changed(path));
    }
    let meta = {
        let path = path.clone();
        blocking(move || meta_of(&path, &after)).await?
    };
    sl.commit(fid, digest, meta).await?.wait().await?;
    tracing::debug!(in_place = patched, "committed");
    if patched {
        e.stats.files_in_place.fetch_add(1, Ordering::Relaxed);
    }
    Ok((Shipped::Sent, digest))
}

/// The block hashes of one of the worker's own windows, from pass 1.
enum Keys {
    Kept(Vec<Hash16>),
    /// All hole: zeros' hashes.
    Hole,
    /// Over the budget: hashed again from the window's bytes.
    Dropped,
}

/// Pass 1 on the worker's side: the hash and the block hashes of every
/// window of the overlap, in one read and one hashing pass.
fn hash_own_windows(
    file: &File,
    extents: &[(u64, u64)],
    overlap: u64,
    windows: std::ops::Range<usize>,
) -> std::io::Result<(Vec<Hash32>, Vec<Keys>)> {
    let nover = windows.len();
    let (mut roots, mut keys) = (Vec::with_capacity(nover), Vec::with_capacity(nover));
    let mut kept = 0usize;
    let mut buf = Vec::new();
    for i in windows {
        let (off, len) = window_range(overlap, i);
        if all_hole(extents, off, len) {
            roots.push(digest::zero_hash(len));
            keys.push(Keys::Hole);
            continue;
        }
        read_range_into(file, extents, off, len, &mut buf)?;
        let (root, cvs) = blocktree::window_tree(&buf);
        roots.push(root);
        if kept + cvs.len() * 16 <= KEYS_BUDGET {
            kept += cvs.len() * 16;
            keys.push(Keys::Kept(cvs.iter().map(blocktree::key).collect()));
        } else {
            keys.push(Keys::Dropped);
        }
    }
    Ok((roots, keys))
}

/// Block hashes of the first `ov` bytes of a window from its bytes.
fn keys_of(data: &[u8]) -> Vec<Hash16> {
    let mut cvs = Vec::with_capacity(data.len().div_ceil(BLOCK as usize));
    blocktree::block_cvs(0, data, &mut cvs);
    cvs.iter().map(blocktree::key).collect()
}

/// Hashes of all-zero blocks over `ov` bytes of a window.
fn zero_keys(ov: u64) -> Vec<Hash16> {
    (0..ov.div_ceil(BLOCK as u64) as usize)
        .map(|k| {
            let n = (BLOCK as u64).min(ov - k as u64 * BLOCK as u64);
            blocktree::key(&blocktree::zero_cv(k, n))
        })
        .collect()
}

/// The windows of a file one stream sends: all of them, or one segment
/// of a shared file (see `segments`).
pub(super) struct Part<'a> {
    pub(super) sl: &'a Slave,
    pub(super) fid: u64,
    pub(super) windows: std::ops::Range<usize>,
    /// Read the next window ahead while this one is sent (a whole file);
    /// the segments of a shared file read in turn, so memory does not grow
    /// with the number of streams.
    pub(super) read_ahead: bool,
}

/// Whether a file's basis is identical to it, decided over all its parts:
/// every part reports after pass 1 (even one that failed) and waits for
/// the others, so a segment that matches is still sent when another
/// does not. A whole file is one part.
pub(super) struct Shortcut {
    barrier: tokio::sync::Barrier,
    differs: std::sync::atomic::AtomicBool,
}

impl Shortcut {
    pub(super) fn new(parts: usize) -> Shortcut {
        Shortcut {
            barrier: tokio::sync::Barrier::new(parts),
            differs: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Reports whether this part matched; answers whether all did.
    async fn arrive(&self, same: bool) -> bool {
        if !same {
            self.differs.store(true, Ordering::SeqCst);
        }
        self.barrier.wait().await;
        !self.differs.load(Ordering::SeqCst)
    }
}

/// Pass 1 of a part: which overlapping windows equal the basis, with the
/// master's window hashes and block hashes.
type Pass1 = (Vec<bool>, Vec<Hash32>, Vec<Keys>);

#[allow(clippy::too_many_arguments)]
async fn pass1(
    part: &Part<'_>,
    rel: &RelPath,
    path: &std::path::Path,
    file: &std::sync::Arc<File>,
    extents: &std::sync::Arc<Vec<(u64, u64)>>,
    overlap: u64,
    ov_end: usize,
) -> Result<Pass1, FileError> {
    let (sl, fid, w0) = (part.sl, part.fid, part.windows.start);
    let nover = ov_end - w0;
    let mut equal = vec![false; nover];
    if nover == 0 {
        return Ok((equal, Vec::new(), Vec::new()));
    }
    const BATCH: usize = 64;
    let ov_bytes = overlap.min(ov_end as u64 * WINDOW);
    let mut tickets = Vec::new();
    for b in (w0..ov_end).step_by(BATCH) {
        let off = b as u64 * WINDOW;
        tickets.push(
            sl.window_hashes(
                fid,
                off,
                (BATCH as u64 * WINDOW).min(ov_bytes - off),
                WINDOW as u32,
            )
            .await?,
        );
    }
    let (f, x, p) = (file.clone(), extents.clone(), path.to_path_buf());
    let local_task = tokio::task::spawn_blocking(move || {
        hash_own_windows(&f, &x, overlap, w0..ov_end).map_err(merr("read", &p))
    });
    let mut remote = Vec::with_capacity(nover);
    for t in tickets {
        remote.extend(t.wait().await?);
    }
    let (roots, keys) = local_task.await.expect("hashing panicked")?;
    if remote.len() != nover {
        return Err(ProtoError::Violation(format!(
            "{rel}: {} window hashes for {nover} windows",
            remote.len()
        ))
        .into());
    }
    for i in 0..nover {
        equal[i] = roots[i] == remote[i];
    }
    tracing::debug!(
        windows = nover,
        equal = equal.iter().filter(|&&x| x).count(),
        "window hashes compared"
    );
    Ok((equal, roots, keys))
}

/// Sends the part's windows; returns the master's hash of each and
/// whether the slave's basis turned out identical to the whole file
/// (nothing to publish, checked only with `shortcut`: when the basis is
/// the destination itself).
#[allow(clippy::too_many_arguments)]
pub(super) async fn send_windows(
    e: &Engine,
    part: &Part<'_>,
    rel: &RelPath,
    path: &std::path::Path,
    file: &std::sync::Arc<File>,
    extents: &std::sync::Arc<Vec<(u64, u64)>>,
    size: u64,
    basis_size: u64,
    shortcut: Option<&Shortcut>,
) -> Result<(Vec<Hash32>, bool), FileError> {
    let (sl, fid) = (part.sl, part.fid);
    let (w0, w1) = (part.windows.start, part.windows.end);
    let overlap = size.min(basis_size);
    let nover_all = overlap.div_ceil(WINDOW) as usize;
    // Windows w0..ov_end overlap the basis; local index: i - w0.
    let ov_end = nover_all.clamp(w0, w1);
    let mut out: Vec<Hash32> = Vec::with_capacity(w1 - w0);

    // Pass 1: window hashes (and block hashes) of the overlap, both sides at once.
    let p1 = pass1(part, rel, path, file, extents, overlap, ov_end).await;
    if let Some(gate) = shortcut {
        let same = size == basis_size
            && p1
                .as_ref()
                .is_ok_and(|(eq, _, _)| eq.len() == w1 - w0 && eq.iter().all(|&x| x));
        if gate.arrive(same).await {
            return Ok((p1?.1, true));
        }
    }
    let (equal, roots, keys) = p1?;

    // Pass 2: every window in order.
    let ov_of = |i: usize| {
        if i < nover_all {
            window_range(overlap, i).1
        } else {
            0
        }
    };
    let full_copy = |i: usize| i < ov_end && equal[i - w0] && window_range(size, i).1 == ov_of(i);
    // Windows read whole, ahead, by the reader: new data, the window the
    // basis ends in, and differing windows whose block hashes were dropped.
    let read_whole = |i: usize| {
        let (off, len) = window_range(size, i);
        !full_copy(i)
            && !all_hole(extents, off, len)
            && (ov_of(i) < len || matches!(keys[i - w0], Keys::Dropped))
    };
    let wanted: Vec<usize> = (w0..w1).filter(|&i| read_whole(i)).collect();
    let mismatched: Vec<usize> = (w0..ov_end).filter(|&i| !equal[i - w0]).collect();
    let mut reader = part.read_ahead.then(|| {
        spawn_reader(
            file.clone(),
            extents.clone(),
            size,
            wanted,
            path.to_path_buf(),
        )
    });
    let mut prefetch: VecDeque<(usize, crate::engine::slave::Pending<Vec<[u8; 16]>>)> =
        VecDeque::new();
    let mut next_mismatch = 0;
    let mut rolling = delta::RollingPolicy::default();
    for i in w0..w1 {
        e.gate().await;
        let li = i - w0;
        if e.shutting_down() {
            return Err(FileError::Interrupted);
        }
        let (off, len) = window_range(size, i);
        e.work.bytes_done.fetch_add(len, Ordering::Relaxed);
        let ov = ov_of(i);
        if full_copy(i) {
            sl.copy(fid, off, len).await?;
            out.push(roots[li]);
            continue;
        }
        if all_hole(extents, off, len) && ov < len {
            // New or partly new and all hole here: zeros, nothing to send.
            if ov == 0 {
                out.push(digest::zero_hash(len));
                continue;
            }
        }
        // Keep block-hash requests for upcoming mismatched windows in flight.
        while prefetch.len() < PREFETCH && next_mismatch < mismatched.len() {
            let w = mismatched[next_mismatch];
            let (woff, wlen) = window_range(overlap, w);
            prefetch.push_back((w, sl.block_hashes(fid, woff, wlen, BLOCK).await?));
            next_mismatch += 1;
        }
        let mut data = if read_whole(i) {
            match reader.as_mut() {
                Some(r) => {
                    let w = r
                        .recv()
                        .await
                        .ok_or_else(|| FileError::Changed(path.to_path_buf()))??;
                    debug_assert_eq!(w.index, i);
                    Some(w.data)
                }
                None => {
                    let (f, x, p) = (file.clone(), extents.clone(), path.to_path_buf());
                    Some(
                        blocking(move || read_range(&f, &x, off, len).map_err(merr("read", &p)))
                            .await?,
                    )
                }
            }
        } else if ov < len {
            Some(vec![0u8; len as usize]) // all hole
        } else {
            None
        };
        if ov == 0 {
            let data = data.expect("read");
            send_literal(e, sl, fid, off, &data).await?;
            out.push(digest::hash(&data));
            continue;
        }
        if equal[li] {
            let data = data.expect("read");
            for op in delta::copy_then_literal(off, &data, ov) {
                send_op(e, sl, fid, &data, off, op).await?;
            }
            out.push(digest::hash(&data));
            continue;
        }
        let (w, pending) = prefetch.pop_front().expect("prefetched in order");
        debug_assert_eq!(w, i);
        let remote = pending.wait().await?;
        let local = match &keys[li] {
            Keys::Kept(k) => std::borrow::Cow::Borrowed(k.as_slice()),
            Keys::Hole => std::borrow::Cow::Owned(zero_keys(ov)),
            Keys::Dropped => {
                std::borrow::Cow::Owned(keys_of(&data.as_ref().expect("read whole")[..ov as usize]))
            }
        };
        if remote.len() != local.len() {
            return Err(ProtoError::Violation(format!(
                "{rel}: {} block hashes for {} blocks",
                remote.len(),
                local.len()
            ))
            .into());
        }
        if rolling.worth_trying(&local, &remote) {
            // Most blocks differ: the data may have shifted.
            let d = match data.take() {
                Some(d) => d,
                None => {
                    let (f, x, p) = (file.clone(), extents.clone(), path.to_path_buf());
                    blocking(move || read_range(&f, &x, off, len).map_err(merr("read", &p))).await?
                }
            };
            let block_ops = delta::block_ops(off, &d, ov, BLOCK, &local, &remote);
            let (bo, bl) = delta::rolling_basis(off, len, basis_size);
            let sig = sl.signature(fid, bo, bl, ROLL_BLOCK).await?.wait().await?;
            let (patch, d) = blocking(move || (delta::rolling_delta(&sig, &d), d)).await;
            let ops = match patch {
                Some(p) if rolling.accept(p.len() as u64, delta::literal_bytes(&block_ops)) => {
                    vec![delta::Op::Patch {
                        offset: off,
                        out_len: len,
                        basis_off: bo,
                        basis_len: bl,
                        delta: p,
                    }]
                }
                _ => block_ops,
            };
            for op in ops {
                send_op(e, sl, fid, &d, off, op).await?;
            }
            data = Some(d);
        } else {
            let plan = delta::block_plan(off, ov, BLOCK, &local, &remote);
            // The literal blocks' bytes: from the window if read, else read now.
            let literals: Vec<(u64, u64)> = plan
                .iter()
                .filter_map(|op| match op {
                    delta::Op::Literal { offset, len } => Some((*offset, *len)),
                    _ => None,
                })
                .collect();
            let mut bytes: VecDeque<Vec<u8>> = match &data {
                Some(_) => VecDeque::new(),
                None => {
                    let (f, x, p) = (file.clone(), extents.clone(), path.to_path_buf());
                    let lits = literals.clone();
                    blocking(move || {
                        lits.iter()
                            .map(|&(o, n)| read_range(&f, &x, o, n))
                            .collect::<std::io::Result<VecDeque<_>>>()
                            .map_err(merr("read", &p))
                    })
                    .await?
                }
            };
            for op in plan {
                match op {
                    delta::Op::Literal { offset, len } => match &data {
                        Some(d) => {
                            let s = (offset - off) as usize;
                            send_literal(e, sl, fid, offset, &d[s..s + len as usize]).await?
                        }
                        None => {
                            let b = bytes.pop_front().expect("read");
                            send_literal(e, sl, fid, offset, &b).await?
                        }
                    },
                    op => send_op(e, sl, fid, &[], off, op).await?,
                }
            }
            if ov < len {
                let d = data.as_ref().expect("read whole");
                send_literal(e, sl, fid, off + ov, &d[ov as usize..]).await?;
            }
        }
        match &data {
            Some(d) if ov < len => out.push(digest::hash(d)),
            _ => out.push(roots[li]),
        }
    }
    tracing::debug!(windows = w1 - w0, "all windows sent");
    Ok((out, false))
}

/// Sends `bytes` for `offset` as literals, all-zero blocks left out.
async fn send_literal(
    e: &Engine,
    sl: &Slave,
    fid: u64,
    offset: u64,
    bytes: &[u8],
) -> Result<(), ProtoError> {
    for op in delta::literal_ops(offset, bytes) {
        send_op(e, sl, fid, bytes, offset, op).await?;
    }
    Ok(())
}

async fn send_op(
    e: &Engine,
    sl: &Slave,
    fid: u64,
    window: &[u8],
    win_off: u64,
    op: delta::Op,
) -> Result<(), ProtoError> {
    match op {
        delta::Op::Copy { offset, len } => sl.copy(fid, offset, len).await,
        delta::Op::Literal { offset, len } => {
            let start = (offset - win_off) as usize;
            let bytes = &window[start..start + len as usize];
            for (i, chunk) in bytes.chunks(MAX_DATA).enumerate() {
                sl.write(fid, offset + (i * MAX_DATA) as u64, chunk.to_vec())
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
            sl.patch(fid, offset, out_len, basis_off, basis_len, delta)
                .await
        }
    }
}
