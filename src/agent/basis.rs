//! What the agent learns hashing a basis file: per window its BLAKE3 hash
//! and, within a memory budget, the CVs of its 4 KiB blocks (see
//! [`crate::hash::blocktree`]). One read and one hashing pass over the basis then
//! answer the window hashes (pass 1), the block hashes of windows that
//! differ (pass 2) and the digest of the blocks copied from it, which are
//! neither read nor hashed again.

use crate::hash::blocktree::{self, Cv, BLOCK};
use crate::hash::digest::{self, WINDOW};
use crate::protocol::{Hash16, Hash32};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Block CVs kept per file, at most (16 MiB: the blocks of 2 GiB of basis);
/// windows beyond are hashed again when their blocks are asked for.
pub const BUDGET: usize = 16 << 20;

struct Window {
    /// Bytes hashed, from the window's start (the last window may be short).
    len: u64,
    root: Hash32,
    /// Block CVs, when kept (never for holes: those are computed).
    cvs: Option<Vec<Cv>>,
    hole: bool,
}

#[derive(Default)]
pub struct BasisCache {
    windows: HashMap<u64, Window>,
    bytes: usize,
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
    fn insert(&mut self, index: u64, w: Window) {
        if let Some(old) = self.windows.remove(&index) {
            self.bytes -= old.cvs.map_or(0, |c| c.len() * 32);
        }
        self.bytes += w.cvs.as_ref().map_or(0, |c| c.len() * 32);
        self.windows.insert(index, w);
    }

    fn room_for(&self, blocks: usize) -> bool {
        self.bytes + blocks * 32 <= BUDGET
    }

    /// Hashes `len` bytes of window `index` of `basis` (a hole costs no read).
    pub fn hash_window(
        &mut self,
        basis: &File,
        index: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> io::Result<Hash32> {
        let off = index * WINDOW;
        if is_hole(basis, off, len)? {
            let root = digest::zero_hash(len);
            self.insert(
                index,
                Window {
                    len,
                    root,
                    cvs: None,
                    hole: true,
                },
            );
            return Ok(root);
        }
        read(basis, off, len, buf)?;
        let (root, cvs) = blocktree::window_tree(buf);
        let keep = self.room_for(cvs.len());
        self.insert(
            index,
            Window {
                len,
                root,
                cvs: keep.then_some(cvs),
                hole: false,
            },
        );
        Ok(root)
    }

    /// The hash of window `index` if it was hashed over exactly `len` bytes.
    pub fn window_root(&self, index: u64, len: u64) -> Option<Hash32> {
        self.windows
            .get(&index)
            .filter(|w| w.len == len)
            .map(|w| w.root)
    }

    /// The CV of block `k` of window `index` if that block was hashed over
    /// exactly `n` bytes (a whole block, or the same short final block).
    pub fn cv(&self, index: u64, k: usize, n: u64) -> Option<Cv> {
        let w = self.windows.get(&index)?;
        let start = k as u64 * BLOCK;
        let same = start + n <= w.len && (n == BLOCK || start + n == w.len);
        if !same {
            return None;
        }
        if w.hole {
            return Some(blocktree::zero_cv(k, n));
        }
        w.cvs.as_ref()?.get(k).copied()
    }

    /// Comparison hashes of the basis blocks in `[offset, offset + len)`
    /// (block-aligned `offset`), cut at `limit`: from the kept CVs, else by
    /// hashing the window's blocks (kept if the budget allows).
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
            let n = BLOCK.min(end - o);
            let (index, k) = (o / WINDOW, ((o % WINDOW) / BLOCK) as usize);
            let cv = match self.cv(index, k, n) {
                Some(cv) => cv,
                None => {
                    let woff = index * WINDOW;
                    let wlen = WINDOW.min(limit - woff);
                    let known = self
                        .windows
                        .get(&index)
                        .is_some_and(|w| w.cvs.is_some() || w.hole);
                    if !known && n == BLOCK.min(limit - o) {
                        // Hash the whole window once, so its other blocks and
                        // the copies from it need no read.
                        self.hash_window_blocks(basis, index, wlen, buf)?;
                    }
                    match self.cv(index, k, n) {
                        Some(cv) => cv,
                        None => {
                            read(basis, o, n, buf)?;
                            let mut v = Vec::with_capacity(1);
                            blocktree::block_cvs(o % WINDOW, buf, &mut v);
                            v[0]
                        }
                    }
                }
            };
            out.push(blocktree::key(&cv));
            o += n;
        }
        Ok(out)
    }

    /// Hashes window `index` for its blocks, kept whatever the budget: the
    /// assembly reaches it soon and evicts it then.
    fn hash_window_blocks(
        &mut self,
        basis: &File,
        index: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> io::Result<()> {
        if is_hole(basis, index * WINDOW, len)? {
            self.hash_window(basis, index, len, buf)?;
            return Ok(());
        }
        read(basis, index * WINDOW, len, buf)?;
        let (root, cvs) = blocktree::window_tree(buf);
        self.insert(
            index,
            Window {
                len,
                root,
                cvs: Some(cvs),
                hole: false,
            },
        );
        Ok(())
    }

    /// Forgets the windows before `index` (the assembly is past them).
    pub fn evict_below(&mut self, index: u64) {
        if self.windows.keys().any(|&k| k < index) {
            let mut freed = 0;
            self.windows.retain(|&k, w| {
                let keep = k >= index;
                if !keep {
                    freed += w.cvs.as_ref().map_or(0, |c| c.len() * 32);
                }
                keep
            });
            self.bytes -= freed;
        }
    }

    /// Bytes of CVs held.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_cvs_match_fresh_hashing_cached_or_not() {
        let size = WINDOW + 3 * BLOCK + 100;
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&data, 0).unwrap();
        let mut buf = Vec::new();
        let mut c = BasisCache::default();
        let r0 = c.hash_window(&f, 0, WINDOW, &mut buf).unwrap();
        assert_eq!(r0, digest::hash(&data[..WINDOW as usize]));
        let fresh = |o: u64, n: u64| {
            let mut v = Vec::new();
            blocktree::block_cvs(o % WINDOW, &data[o as usize..(o + n) as usize], &mut v);
            blocktree::key(&v[0])
        };
        // Cached window, uncached window, and a request cut short of the basis's end.
        for (off, len, limit) in [
            (0, 64 * BLOCK, size),
            (WINDOW, 4 * BLOCK, size),
            (WINDOW, 4 * BLOCK, WINDOW + 2 * BLOCK + 5),
        ] {
            let keys = c.block_keys(&f, off, len, limit, &mut buf).unwrap();
            let mut want = Vec::new();
            let mut o = off;
            while o < (off + len).min(limit) {
                let n = BLOCK.min((off + len).min(limit) - o);
                want.push(fresh(o, n));
                o += n;
            }
            assert_eq!(keys, want, "{off} {len} {limit}");
        }
        assert!(c.cv(1, 0, BLOCK).is_some(), "the second window is kept now");
        assert_eq!(
            c.cv(1, 3, 100),
            Some({
                let mut v = Vec::new();
                blocktree::block_cvs(3 * BLOCK, &data[(WINDOW + 3 * BLOCK) as usize..], &mut v);
                v[0]
            })
        );
        assert!(
            c.cv(1, 3, BLOCK).is_none(),
            "a short block is not a whole one"
        );
        c.evict_below(1);
        assert!(c.cv(0, 0, BLOCK).is_none());
        assert_eq!(c.bytes(), 4 * 32);
    }
}
