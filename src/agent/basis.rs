//! What the agent learns hashing a basis file: per window its BLAKE3 hash
//! and, within a memory budget shared by all open files, the CVs of its
//! 4 KiB blocks (see [`crate::hash::blocktree`]). One read and one hashing
//! pass over the basis then answer the window hashes (pass 1) and the
//! block hashes of windows that differ (pass 2). Holes are never read nor
//! cached: their hashes are computed. Copies never take their digest from
//! here (see `files`): the bytes written are hashed.

use crate::hash::blocktree::{self, Cv, BLOCK};
use crate::hash::digest::{self, WINDOW};
use crate::protocol::{Hash16, Hash32};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Bytes of block CVs (and their entries) cached across all open files, at
/// most (64 MiB: the blocks of 8 GiB of basis); windows beyond are hashed
/// again when their blocks are asked for.
pub const BUDGET: usize = 64 << 20;
/// What one cached window costs besides its CVs (map entry, vector header).
const ENTRY: usize = 96;

/// The cache bytes in use, shared by the caches of all open files, and
/// their limit ([`BUDGET`]).
#[derive(Clone)]
pub struct Budget {
    used: Arc<AtomicUsize>,
    limit: usize,
}

impl Default for Budget {
    fn default() -> Budget {
        Budget::with_limit(BUDGET)
    }
}

impl Budget {
    pub fn with_limit(limit: usize) -> Budget {
        Budget {
            used: Arc::new(AtomicUsize::new(0)),
            limit,
        }
    }

    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                (u + n <= self.limit).then_some(u + n)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }

    #[cfg(test)]
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

struct Window {
    /// Bytes hashed, from the window's start (the last window may be short).
    len: u64,
    cvs: Vec<Cv>,
}

fn cost(w: &Window) -> usize {
    ENTRY + w.cvs.len() * std::mem::size_of::<Cv>()
}

pub struct BasisCache {
    windows: HashMap<u64, Window>,
    bytes: usize,
    budget: Budget,
}

impl Drop for BasisCache {
    fn drop(&mut self) {
        self.budget.give(self.bytes);
    }
}

fn read(basis: &File, off: u64, len: u64, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.clear();
    buf.resize(len as usize, 0);
    basis.read_exact_at(buf, off)
}

fn is_hole(basis: &File, off: u64, len: u64) -> io::Result<bool> {
    Ok(crate::fs::sparse::data_ranges(basis, off, off + len)?.is_empty())
}

impl BasisCache {
    pub fn new(budget: &Budget) -> BasisCache {
        BasisCache {
            windows: HashMap::new(),
            bytes: 0,
            budget: budget.clone(),
        }
    }

    /// Keeps a window's CVs if the shared budget has room.
    fn keep(&mut self, index: u64, w: Window) {
        if let Some(old) = self.windows.remove(&index) {
            self.bytes -= cost(&old);
            self.budget.give(cost(&old));
        }
        let c = cost(&w);
        if self.budget.take(c) {
            self.bytes += c;
            self.windows.insert(index, w);
        }
    }

    /// Hashes `len` bytes of window `index` of `basis` (a hole costs no
    /// read); returns the hash and the bytes read.
    pub fn hash_window(
        &mut self,
        basis: &File,
        index: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> io::Result<(Hash32, u64)> {
        let off = index * WINDOW;
        if is_hole(basis, off, len)? {
            return Ok((digest::zero_hash(len), 0));
        }
        read(basis, off, len, buf)?;
        let (root, cvs) = blocktree::window_tree(buf);
        self.keep(index, Window { len, cvs });
        Ok((root, len))
    }

    /// Comparison hashes of the basis blocks in `[offset, offset + len)`
    /// (block-aligned `offset`), cut at `limit`: from the kept CVs, else by
    /// hashing (a whole window asked for is kept if the budget allows).
    pub fn block_keys(
        &mut self,
        basis: &File,
        offset: u64,
        len: u64,
        limit: u64,
        buf: &mut Vec<u8>,
    ) -> io::Result<Vec<Hash16>> {
        debug_assert_eq!(offset % BLOCK, 0);
        let end = offset.saturating_add(len).min(limit);
        let mut out = Vec::with_capacity(((end.saturating_sub(offset)) / BLOCK + 1) as usize);
        let mut o = offset;
        while o < end {
            let index = o / WINDOW;
            let woff = index * WINDOW;
            let wlen = WINDOW.min(limit - woff);
            let wend = (woff + WINDOW).min(end);
            let k0 = ((o - woff) / BLOCK) as usize;
            let cached = self.windows.get(&index).filter(|w| w.len == wlen);
            let tail_cut = wend < woff + wlen && (wend - woff) % BLOCK != 0;
            if let Some(w) = cached.filter(|_| !tail_cut) {
                out.extend(
                    w.cvs[k0..]
                        .iter()
                        .take(((wend - o).div_ceil(BLOCK)) as usize)
                        .map(blocktree::key),
                );
            } else if is_hole(basis, o, wend - o)? {
                let mut b = o;
                while b < wend {
                    let n = BLOCK.min(wend - b);
                    out.push(blocktree::key(&blocktree::zero_cv(
                        ((b - woff) / BLOCK) as usize,
                        n,
                    )));
                    b += n;
                }
            } else if o == woff && wend == woff + wlen {
                read(basis, woff, wlen, buf)?;
                let (_, cvs) = blocktree::window_tree(buf);
                out.extend(cvs.iter().map(blocktree::key));
                self.keep(index, Window { len: wlen, cvs });
            } else {
                read(basis, o, wend - o, buf)?;
                let mut cvs = Vec::new();
                blocktree::block_cvs(o - woff, buf, &mut cvs);
                out.extend(cvs.iter().map(blocktree::key));
            }
            o = wend;
        }
        Ok(out)
    }

    /// Forgets the windows before `index` (the assembly is past them).
    pub fn evict_below(&mut self, index: u64) {
        if self.windows.keys().any(|&k| k < index) {
            let mut freed = 0;
            self.windows.retain(|&k, w| {
                let keep = k >= index;
                if !keep {
                    freed += cost(w);
                }
                keep
            });
            self.bytes -= freed;
            self.budget.give(freed);
        }
    }

    /// Bytes held.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh_keys(data: &[u8], off: u64, len: u64, limit: u64) -> Vec<Hash16> {
        let mut want = Vec::new();
        let end = (off + len).min(limit);
        let mut o = off;
        while o < end {
            let n = BLOCK.min(end - o);
            let mut v = Vec::new();
            blocktree::block_cvs(o % WINDOW, &data[o as usize..(o + n) as usize], &mut v);
            want.push(blocktree::key(&v[0]));
            o += n;
        }
        want
    }

    #[test]
    fn keys_match_fresh_hashing_cached_or_not_holes_included() {
        let size = 2 * WINDOW + 3 * BLOCK + 100;
        let mut data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8 | 1).collect();
        // The second window is a hole.
        data[WINDOW as usize..2 * WINDOW as usize].fill(0);
        let f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(&data[..WINDOW as usize], 0).unwrap();
        f.write_all_at(&data[2 * WINDOW as usize..], 2 * WINDOW)
            .unwrap();
        let budget = Budget::default();
        let mut buf = Vec::new();
        let mut c = BasisCache::new(&budget);
        let (r0, n) = c.hash_window(&f, 0, WINDOW, &mut buf).unwrap();
        assert_eq!((r0, n), (digest::hash(&data[..WINDOW as usize]), WINDOW));
        let (r1, n) = c.hash_window(&f, 1, WINDOW, &mut buf).unwrap();
        assert_eq!(
            (r1, n),
            (digest::zero_hash(WINDOW), 0),
            "a hole is not read"
        );
        for (off, len, limit) in [
            (0, 64 * BLOCK, size),
            (0, WINDOW + 3 * BLOCK, size),
            (WINDOW - 2 * BLOCK, 5 * BLOCK, size),
            (2 * WINDOW, 4 * BLOCK, size),
            (2 * WINDOW, 4 * BLOCK, 2 * WINDOW + 2 * BLOCK + 5),
            (2 * WINDOW, BLOCK + 7, size),
        ] {
            let keys = c.block_keys(&f, off, len, limit, &mut buf).unwrap();
            assert_eq!(
                keys,
                fresh_keys(&data, off, len, limit),
                "{off} {len} {limit}"
            );
        }
        assert_eq!(c.bytes(), budget.used());
        c.evict_below(3);
        assert_eq!((c.bytes(), budget.used()), (0, 0));
    }

    #[test]
    fn the_budget_is_shared_by_all_files_and_given_back() {
        let data: Vec<u8> = (0..WINDOW).map(|i| (i % 253) as u8 | 1).collect();
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&data, 0).unwrap();
        let per = ENTRY + blocktree::WINDOW_BLOCKS * std::mem::size_of::<Cv>();
        let room = 5;
        let budget = Budget::with_limit(room * per + per / 2);
        let mut buf = Vec::new();
        let mut caches: Vec<BasisCache> = (0..room + 5).map(|_| BasisCache::new(&budget)).collect();
        for c in caches.iter_mut() {
            c.hash_window(&f, 0, WINDOW, &mut buf).unwrap();
        }
        assert_eq!(
            budget.used(),
            room * per,
            "five windows kept, the others not"
        );
        caches.clear();
        assert_eq!(budget.used(), 0);
    }
}
