//! Repairing what a verification found: extra entries removed, missing
//! ones shipped (a directory with its whole subtree), types, targets and
//! metadata set again, and files whose bytes differ rebuilt on the slave
//! from their own unchanged blocks plus the master's differing blocks,
//! through the session's publish (a verified temporary renamed over the
//! file, or in place under the undo log for `inplace_min_size`). Only the
//! differing blocks travel; the agent checks the whole file's digest
//! against the master's before publishing, and a file that no longer
//! matches what verification saw is shipped by the ordinary delta.

use super::compare::{Finding, What};
use crate::engine::context::Engine;
use crate::engine::master::MasterError;
use crate::engine::transfer::{self, FileError};
use crate::fs::meta::{read_xattrs, Kind, Meta};
use crate::fs::relpath::RelPath;
use crate::hash::digest::{Digester, WINDOW};
use crate::protocol::{ErrorKind, ProtoError, MAX_DATA};
use serde::Serialize;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What a repair did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Repaired {
    /// Differences repaired.
    pub repaired: u64,
    /// Differences that could not be repaired, with why.
    pub failed: Vec<(String, String)>,
    /// Bytes of file data sent (literal and delta).
    pub bytes_sent: u64,
    /// Files rebuilt from their differing blocks only.
    pub files_by_blocks: u64,
    /// Paths touched, to verify again.
    #[serde(skip)]
    pub paths: Vec<RelPath>,
    /// Directories whose entries changed (their metadata set again), to verify again.
    #[serde(skip)]
    pub dirs: Vec<RelPath>,
}

fn merr<'a>(
    op: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| {
        FileError::Master(MasterError {
            op,
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Repairs `findings` (mismatches of one verification) through `e`.
pub async fn repair(e: &Arc<Engine>, findings: &[Finding]) -> Repaired {
    let mut out = Repaired::default();
    for f in findings {
        let res = one(e, f, &mut out).await;
        match res {
            Ok(()) => {
                out.repaired += 1;
                out.paths.push(f.path.clone());
                // Entries added, removed or replaced moved the directory's mtime.
                if f.what != What::Metadata {
                    if let Some(d) = f.path.parent() {
                        out.dirs.push(d);
                    }
                }
            }
            Err(err) => out.failed.push((f.path.to_string(), err)),
        }
    }
    // Deepest first: setting a directory's metadata never touches its parent's.
    out.dirs
        .sort_by(|a, b| b.depth().cmp(&a.depth()).then(a.cmp(b)));
    out.dirs.dedup();
    for d in out.dirs.clone() {
        let m = {
            let (e, d) = (e.clone(), d.clone());
            blocking(move || e.master.stat(&d)).await
        };
        let res = match m {
            Ok(m) if m.entry.kind == Kind::Dir => {
                match e.slave.set_meta(d.clone(), m.entry.meta).await {
                    Ok(p) => p.wait().await.map_err(|e| e.to_string()),
                    Err(err) => Err(err.to_string()),
                }
            }
            Ok(_) => Ok(()),
            Err(err) => Err(err.to_string()),
        };
        if let Err(err) = res {
            out.failed.push((d.to_string(), err));
        }
    }
    out.bytes_sent =
        e.stats.bytes_literal.load(Ordering::Relaxed) + e.stats.bytes_delta.load(Ordering::Relaxed);
    out
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
}

async fn one(e: &Arc<Engine>, f: &Finding, out: &mut Repaired) -> Result<(), String> {
    let slave = &e.slave;
    let p = f.path.clone();
    let wait = |r: Result<crate::engine::slave::Pending<()>, ProtoError>| async move {
        r.map_err(|e| e.to_string())?
            .wait()
            .await
            .map_err(|e| e.to_string())
    };
    if f.what == What::Extra {
        return wait(slave.remove(p).await).await;
    }
    let m = {
        let (e, p) = (e.clone(), p.clone());
        blocking(move || e.master.stat(&p)).await
    }
    .map_err(|e| format!("{e} (changed since verified: verify again later)"))?;
    match f.what {
        What::Metadata => wait(slave.set_meta(p, m.entry.meta).await).await,
        What::Target => ship_symlink(e, &p, &m.entry).await,
        What::Missing | What::Type => {
            if f.what == What::Type {
                wait(slave.remove(p.clone()).await).await?;
            }
            match m.entry.kind {
                Kind::File => transfer::ship(e, &p, m.entry.size, transfer::Basis::None)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Kind::Symlink => ship_symlink(e, &p, &m.entry).await,
                Kind::Dir => {
                    let mut meta = m.entry.meta.clone();
                    meta.mode |= 0o700; // writable while filled; the crawl sets the final mode
                    wait(slave.mkdir(p.clone(), meta).await).await?;
                    if e.resync_dir(p.clone()).await {
                        Ok(())
                    } else {
                        Err(format!("{} entries failed below it", e.failure_count()))
                    }
                }
                Kind::Other => Err("not a replicated file type".into()),
            }
        }
        What::Content | What::Size => {
            if m.entry.kind != Kind::File {
                return Err("no longer a regular file on the master: verify again".into());
            }
            match by_blocks(e, &p, &f.ranges).await {
                Ok(()) => {
                    out.files_by_blocks += 1;
                    Ok(())
                }
                // The slave's copy moved on since it was verified: an ordinary delta.
                Err(FileError::Slave(ProtoError::Remote(w))) if w.kind == ErrorKind::Mismatch => {
                    match transfer::ship(e, &p, m.entry.size, transfer::Basis::Dest).await {
                        // Updated: the slave had the content; its metadata is the master's now.
                        Ok(transfer::Shipped::Sent | transfer::Shipped::Updated) => Ok(()),
                        // Equal content by now: the metadata may still differ.
                        Ok(transfer::Shipped::Unchanged) => {
                            wait(slave.set_meta(p, m.entry.meta).await).await
                        }
                        Err(e) => Err(e.to_string()),
                    }
                }
                Err(err) => Err(err.to_string()),
            }
        }
        What::Extra => unreachable!(),
    }
}

async fn ship_symlink(e: &Engine, p: &RelPath, m: &crate::fs::meta::Entry) -> Result<(), String> {
    let target = m.target.clone().map(|t| t.into_vec()).unwrap_or_default();
    e.slave
        .symlink(p.clone(), target, m.meta.clone())
        .await
        .map_err(|e| e.to_string())?
        .wait()
        .await
        .map_err(|e| e.to_string())
}

/// One step of rebuilding a file on the slave, in offset order.
enum Op {
    Copy(u64, u64),
    Literal(u64, Vec<u8>),
}

/// The ops of window `[off, off+len)` (its bytes `data`): the bytes of
/// `ranges` and beyond the basis as literals (all-zero blocks left out:
/// the agent zeroes gaps), the rest copied from the slave's own file.
fn window_ops(off: u64, data: &[u8], ranges: &[(u64, u64)], basis: u64) -> Vec<Op> {
    let end = off + data.len() as u64;
    let mut ops = Vec::new();
    let mut pos = off;
    let literal = |s: u64, e: u64, ops: &mut Vec<Op>| {
        let bytes = &data[(s - off) as usize..(e - off) as usize];
        for (at, r) in crate::fs::sparse::nonzero_runs(s, bytes, 4096) {
            for (i, chunk) in bytes[r].chunks(MAX_DATA).enumerate() {
                ops.push(Op::Literal(at + (i * MAX_DATA) as u64, chunk.to_vec()));
            }
        }
    };
    let copy = |s: u64, e: u64, ops: &mut Vec<Op>| {
        let c = e.min(basis);
        if c > s {
            ops.push(Op::Copy(s, c - s));
        }
        if e > c.max(s) {
            literal(c.max(s), e, ops);
        }
    };
    for &(rs, re) in ranges {
        let (rs, re) = (rs.max(off), re.min(end));
        if rs >= re {
            continue;
        }
        if rs > pos {
            copy(pos, rs, &mut ops);
        }
        literal(rs, re, &mut ops);
        pos = re;
    }
    if end > pos {
        copy(pos, end, &mut ops);
    }
    ops
}

/// Rebuilds `p` on the slave from its unchanged blocks and the master's
/// bytes in `ranges`, verified by the whole file's digest.
async fn by_blocks(e: &Engine, p: &RelPath, ranges: &[(u64, u64)]) -> Result<(), FileError> {
    let src = e.master.path(p);
    let (file, before) = {
        let src = src.clone();
        blocking(move || -> Result<_, FileError> {
            let f = std::fs::File::open(&src).map_err(merr("open", &src))?;
            let md = f.metadata().map_err(merr("stat", &src))?;
            Ok((f, md))
        })
        .await?
    };
    let size = before.len();
    let fid = e.next_fid();
    let basis = if e.in_place(size) {
        e.slave
            .open_in_place(fid, p.clone(), size)
            .await?
            .wait()
            .await?
            .0
    } else {
        e.slave
            .open_file(fid, p.clone(), None, size)
            .await?
            .wait()
            .await?
    }
    .unwrap_or(0);
    let file = Arc::new(file);
    let mut digest = Digester::new();
    let mut off = 0;
    let res: Result<(), FileError> = async {
        while off < size {
            let len = WINDOW.min(size - off);
            let (f, s) = (file.clone(), src.clone());
            let data = blocking(move || {
                let mut buf = vec![0u8; len as usize];
                f.read_exact_at(&mut buf, off).map(|_| buf)
            })
            .await
            .map_err(merr("read", &src))?;
            let _ = s;
            for op in window_ops(off, &data, ranges, basis) {
                match op {
                    Op::Copy(o, n) => e.slave.copy(fid, o, n).await?,
                    Op::Literal(o, bytes) => {
                        e.stats
                            .bytes_literal
                            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                        e.slave.write(fid, o, bytes).await?
                    }
                }
            }
            digest.feed(&data);
            off += len;
        }
        Ok(())
    }
    .await;
    let after = file.metadata().map_err(merr("stat", &src))?;
    let same = (
        before.len(),
        before.mtime(),
        before.mtime_nsec(),
        before.ctime(),
        before.ctime_nsec(),
    ) == (
        after.len(),
        after.mtime(),
        after.mtime_nsec(),
        after.ctime(),
        after.ctime_nsec(),
    );
    if res.is_err() || !same {
        e.slave.abort(fid).await?.wait().await?;
        res?;
        return Err(FileError::Changed(src));
    }
    let meta = {
        let s = src.clone();
        blocking(move || read_xattrs(&s).map(|x| Meta::from_metadata(&after, x)))
            .await
            .map_err(merr("read xattrs of", &src))?
    };
    e.slave
        .commit(fid, digest.finish(), meta)
        .await?
        .wait()
        .await?;
    e.stats.files_synced.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(ops: &[Op]) -> Vec<(char, u64, u64)> {
        ops.iter()
            .map(|o| match o {
                Op::Copy(a, n) => ('c', *a, *n),
                Op::Literal(a, b) => ('l', *a, b.len() as u64),
            })
            .collect()
    }

    #[test]
    fn only_the_differing_blocks_and_what_the_basis_lacks_are_literal() {
        let data = vec![7u8; 5 * 4096];
        let w = WINDOW;
        // Block 1 differs; the basis is long enough.
        let ops = window_ops(w, &data, &[(w + 4096, w + 8192)], 10 * w);
        assert_eq!(
            shape(&ops),
            [
                ('c', w, 4096),
                ('l', w + 4096, 4096),
                ('c', w + 8192, 3 * 4096)
            ]
        );
        // The basis ends inside the window: the rest is literal.
        let ops = window_ops(0, &data, &[], 2 * 4096 + 5);
        assert_eq!(shape(&ops), [('c', 0, 8197), ('l', 8197, 3 * 4096 - 5)]);
        // Zero blocks are never sent.
        let mut z = vec![0u8; 3 * 4096];
        z[5000] = 1;
        let ops = window_ops(0, &z, &[(0, 3 * 4096)], 3 * 4096);
        assert_eq!(shape(&ops), [('l', 4096, 4096)]);
    }
}
