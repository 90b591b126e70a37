//! A large file over several streams: its windows are cut into
//! contiguous segments, one per stream. The first stream opens the file
//! (`OpenShared`) and sends the first segment; each other stream attaches
//! to the same temporary on the slave (`OpenSegment`) and sends its own,
//! all at once, each exactly as a whole file would be sent (window hashes,
//! blocks, deltas, literals). Every agent answers the hash of each window
//! it wrote; the first commits with them (`CommitShared`), so the slave
//! checks the whole file's digest over what its agents wrote before it
//! publishes. Any stream failing aborts the file, which the next crawl
//! sends again.

use super::windows::{send_windows, Part, Shortcut};
use super::{blocking, fingerprint, merr, meta_of, Basis, FileError, Shipped};
use crate::engine::context::Engine;
use crate::engine::slave::Slave;
use crate::fs::relpath::RelPath;
use crate::hash::digest::{self, WINDOW};
use crate::protocol::{Hash32, ProtoError};
use std::fs::File;
use std::sync::Arc;

/// How many segments a file of `size` bytes is cut into over `streams`:
/// one per stream, each of at least one window (4 MiB). Streams exist
/// only on links whose round trip is long enough for one stream's window
/// of 2 MiB to take longer than a round trip, so even one window per
/// stream gains there.
pub(super) fn count(streams: usize, size: u64) -> usize {
    if size.div_ceil(WINDOW) > crate::protocol::MAX_KEPT_WINDOWS {
        return 1; // the agents keep no more window hashes per file
    }
    (size.div_ceil(WINDOW) as usize).clamp(1, streams.max(1))
}

/// The master file being sent.
pub(super) struct Source<'a> {
    pub(super) path: &'a std::path::Path,
    pub(super) file: &'a Arc<File>,
    pub(super) extents: &'a Arc<Vec<(u64, u64)>>,
    pub(super) before: &'a std::fs::Metadata,
}

/// Window ranges of `nseg` segments of `nwin` windows.
fn bounds(nwin: usize, nseg: usize) -> Vec<std::ops::Range<usize>> {
    (0..nseg)
        .map(|j| nwin * j / nseg..nwin * (j + 1) / nseg)
        .collect()
}

/// Sends `rel` in `nseg` segments, the first over `owner`.
pub(super) async fn shared(
    e: &Engine,
    owner: &Slave,
    rel: &RelPath,
    src: Source<'_>,
    basis: Basis,
    nseg: usize,
) -> Result<(Shipped, Hash32), FileError> {
    let size = src.before.len();
    let nwin = size.div_ceil(WINDOW) as usize;
    let ranges = bounds(nwin, nseg);
    let other = match &basis {
        Basis::Other(p) => Some(p.clone()),
        _ => None,
    };
    let fid0 = e.next_fid();
    let (basis0, tmp) = owner
        .open_shared(fid0, rel.clone(), other.clone(), size)
        .await?
        .wait()
        .await?;
    let basis_size = if basis == Basis::None {
        0
    } else {
        basis0.unwrap_or(0)
    };
    let slaves: Vec<Slave> = (0..nseg).map(|j| owner.on(owner.index() + j)).collect();
    let mut fids = vec![fid0];
    let mut opens = Vec::new();
    for (j, r) in ranges.iter().enumerate().skip(1) {
        let fid = e.next_fid();
        fids.push(fid);
        let (start, end) = (r.start as u64 * WINDOW, (r.end as u64 * WINDOW).min(size));
        opens.push(
            slaves[j]
                .open_segment(
                    fid,
                    rel.clone(),
                    tmp.clone(),
                    other.clone(),
                    size,
                    start,
                    end,
                )
                .await?,
        );
    }
    let result = async {
        for o in opens {
            let b = o.wait().await?;
            if basis != Basis::None && b.unwrap_or(0) != basis_size {
                return Err(FileError::Changed(src.path.to_path_buf()));
            }
        }
        let parts: Vec<Part> = ranges
            .iter()
            .enumerate()
            .map(|(j, r)| Part {
                sl: &slaves[j],
                fid: fids[j],
                windows: r.clone(),
                read_ahead: false,
            })
            .collect();
        let gate = Shortcut::new(nseg);
        let shortcut = (basis == Basis::Dest).then_some(&gate);
        let sent = futures::future::join_all(parts.iter().map(|p| {
            send_windows(
                e,
                p,
                rel,
                src.path,
                src.file,
                src.extents,
                size,
                basis_size,
                shortcut,
            )
        }))
        .await;
        let mut roots = Vec::with_capacity(nwin);
        let mut unchanged = true;
        for s in sent {
            let (r, same) = s?;
            roots.extend(r);
            unchanged &= same;
        }
        // All asked at once: the file waits one round trip for every
        // segment's window hashes, not one per segment.
        let mut finishing = Vec::with_capacity(nseg - 1);
        for j in 1..nseg {
            finishing.push((j, slaves[j].finish_segment(fids[j]).await?));
        }
        let mut segments = Vec::with_capacity(nseg - 1);
        for (j, pending) in finishing {
            segments.push((ranges[j].start as u64 * WINDOW, pending.wait().await?));
        }
        Ok::<_, FileError>((roots, unchanged, segments))
    }
    .await;
    let (roots, unchanged, segments) = match result {
        Ok(r) => r,
        Err(err) => {
            for (j, fid) in fids.iter().enumerate().skip(1) {
                if let Ok(p) = slaves[j].abort(*fid).await {
                    let _ = p.wait().await;
                }
            }
            if let Ok(p) = owner.abort(fid0).await {
                let _ = p.wait().await;
            }
            return Err(err);
        }
    };
    if roots.len() != nwin {
        return Err(ProtoError::Violation(format!("{rel}: {} window hashes", roots.len())).into());
    }
    let digest = digest::of_window_hashes(&roots, size);
    let after = {
        let (file, path) = (src.file.clone(), src.path.to_path_buf());
        blocking(move || file.metadata().map_err(merr("stat", &path))).await?
    };
    let same_file = fingerprint(src.before) == fingerprint(&after);
    if !same_file || unchanged {
        owner.abort(fid0).await?.wait().await?;
        if unchanged && same_file {
            return Ok((Shipped::Unchanged, digest));
        }
        return Err(FileError::Changed(src.path.to_path_buf()));
    }
    let meta = {
        let path = src.path.to_path_buf();
        blocking(move || meta_of(&path, &after)).await?
    };
    owner
        .commit_shared(fid0, digest, meta, segments)
        .await?
        .wait()
        .await?;
    tracing::debug!(segments = nseg, "committed a shared file");
    e.stats
        .files_split
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok((Shipped::Sent, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_tile_the_windows() {
        for (nwin, nseg) in [(512, 8), (17, 3), (16, 16), (1000, 7)] {
            let b = bounds(nwin, nseg);
            assert_eq!(b.len(), nseg);
            assert_eq!(b[0].start, 0);
            assert_eq!(b[nseg - 1].end, nwin);
            for w in b.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert!(!w[0].is_empty());
            }
        }
        assert_eq!(count(1, 10 << 30), 1);
        assert_eq!(count(8, 4 << 20), 1);
        assert_eq!(count(8, (4 << 20) + 1), 2);
        assert_eq!(count(8, 2 << 30), 8);
        assert_eq!(count(4, 12 << 20), 3);
    }
}
