//! BLAKE3 trees of aligned 4 KiB blocks.
//!
//! Each digest window (see [`crate::hash::digest`]) is hashed as its own BLAKE3
//! input, and BLAKE3 is a tree: a window of 4 MiB is the root of 1024
//! subtrees of 4 KiB whose chaining values (CVs) depend only on the block's
//! bytes and its offset inside the window. So one pass over a window yields
//! both its standard hash (merged from the block CVs, 1023 compressions of
//! 64 bytes) and the hashes its blocks are compared by (the CVs truncated to
//! 128 bits), and a window assembled from copied and new blocks can be
//! hashed from the copied blocks' CVs without reading them again.
//!
//! [`WindowDigest`] hashes a window fed in order as bytes, zeros and block
//! CVs; it hashes byte runs in the largest aligned power-of-two subtrees it
//! can (so long runs go at full SIMD speed) and merges subtrees as BLAKE3's
//! own hasher does. Tests check it against `blake3::hash`.

use super::{Hash16, Hash32};
use crate::hash::digest::{self, WINDOW};
use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};
use std::sync::OnceLock;

/// The block size of comparisons and CVs.
pub const BLOCK: u64 = 4096;
/// Blocks in a full window.
pub const WINDOW_BLOCKS: usize = (WINDOW / BLOCK) as usize;

/// A BLAKE3 chaining value.
pub type Cv = [u8; 32];

const CHUNK: u64 = blake3::CHUNK_LEN as u64;
static ZEROS: [u8; BLOCK as usize] = [0; BLOCK as usize];

/// The comparison hash of a block: its CV truncated to 128 bits.
pub fn key(cv: &Cv) -> Hash16 {
    let mut k = [0u8; 16];
    k.copy_from_slice(&cv[..16]);
    k
}

/// The CV of a subtree of a window: `data` at window-relative offset `at`
/// (a multiple of 1 KiB, and `data` no longer than the subtree `at` starts).
fn subtree_cv(at: u64, data: &[u8]) -> Cv {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(at);
    h.update(data);
    h.finalize_non_root()
}

/// Appends the CVs of the consecutive blocks of `data`, which starts at
/// window-relative offset `at` (block-aligned); the last may be short.
pub fn block_cvs(at: u64, data: &[u8], out: &mut Vec<Cv>) {
    debug_assert_eq!(at % BLOCK, 0);
    for (i, b) in data.chunks(BLOCK as usize).enumerate() {
        out.push(subtree_cv(at + i as u64 * BLOCK, b));
    }
}

/// CVs of all-zero full blocks at each block position of a window.
pub fn zero_cvs() -> &'static [Cv] {
    static CVS: OnceLock<Vec<Cv>> = OnceLock::new();
    CVS.get_or_init(|| {
        (0..WINDOW_BLOCKS)
            .map(|k| subtree_cv(k as u64 * BLOCK, &ZEROS))
            .collect()
    })
}

/// The CV of `len` zero bytes at block position `k` of a window.
pub fn zero_cv(k: usize, len: u64) -> Cv {
    if len == BLOCK {
        zero_cvs()[k]
    } else {
        subtree_cv(k as u64 * BLOCK, &ZEROS[..len as usize])
    }
}

fn merge_all(cvs: &[Cv]) -> Cv {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let left = largest_pow2_below(cvs.len());
    merge_subtrees_non_root(
        &merge_all(&cvs[..left]),
        &merge_all(&cvs[left..]),
        Mode::Hash,
    )
}

fn largest_pow2_below(n: usize) -> usize {
    debug_assert!(n > 1);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// A window's BLAKE3 hash from the CVs of all its blocks, in order (all
/// full but the last). None for a one-block window, which has no parent
/// node: hash its bytes instead.
pub fn root_of(cvs: &[Cv]) -> Option<Hash32> {
    if cvs.len() < 2 {
        return None;
    }
    let left = largest_pow2_below(cvs.len());
    Some(
        *merge_subtrees_root(
            &merge_all(&cvs[..left]),
            &merge_all(&cvs[left..]),
            Mode::Hash,
        )
        .as_bytes(),
    )
}

/// One pass over a window's bytes: its standard BLAKE3 hash and its block CVs.
pub fn window_tree(data: &[u8]) -> (Hash32, Vec<Cv>) {
    let mut cvs = Vec::with_capacity(data.len().div_ceil(BLOCK as usize));
    block_cvs(0, data, &mut cvs);
    let root = root_of(&cvs).unwrap_or_else(|| digest::hash(data));
    (root, cvs)
}

/// Hashes one window fed in order (bytes, zeros, block CVs) into its
/// standard BLAKE3 hash.
pub struct WindowDigest {
    len: u64,
    /// Bytes accounted for by `stack` (or, for a plain window, fed).
    pos: u64,
    /// Subtree CVs not merged yet, left to right (BLAKE3's lazy CV stack).
    stack: Vec<Cv>,
    /// The block at `pos` being filled byte by byte, and how much is in it.
    partial: Option<(blake3::Hasher, u64)>,
    /// Windows of one block have no parent node: hashed plainly.
    plain: Option<blake3::Hasher>,
    root: Option<Hash32>,
}

impl WindowDigest {
    /// A window of `len` bytes (0 < len <= WINDOW).
    pub fn new(len: u64) -> WindowDigest {
        debug_assert!(len > 0 && len <= WINDOW);
        WindowDigest {
            len,
            pos: 0,
            stack: Vec::new(),
            partial: None,
            plain: (len <= BLOCK).then(blake3::Hasher::new),
            root: None,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes fed so far.
    pub fn position(&self) -> u64 {
        self.pos + self.partial.as_ref().map_or(0, |p| p.1)
    }

    /// Whether the next whole block can be fed by its CV.
    pub fn takes_cv(&self) -> bool {
        self.plain.is_none()
            && self.partial.is_none()
            && self.root.is_none()
            && self.pos % BLOCK == 0
            && self.pos < self.len
    }

    /// Length of the block starting at the current position.
    pub fn block_len(&self) -> u64 {
        BLOCK.min(self.len - self.pos)
    }

    /// Feeds the next whole block by its CV (only when [`takes_cv`](Self::takes_cv)).
    pub fn feed_cv(&mut self, cv: &Cv) {
        debug_assert!(self.takes_cv());
        let n = self.block_len();
        self.push(*cv, n);
    }

    fn push(&mut self, cv: Cv, n: u64) {
        // As BLAKE3's hasher: merge what the count so far says is complete,
        // keeping the newest CV unmerged (it may turn out to be the root's child).
        let keep = (self.pos / CHUNK).count_ones() as usize;
        while self.stack.len() > keep {
            let right = self.stack.pop().expect("stack");
            let left = self.stack.pop().expect("stack");
            self.stack
                .push(merge_subtrees_non_root(&left, &right, Mode::Hash));
        }
        self.stack.push(cv);
        self.pos += n;
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        debug_assert!(self.position() + data.len() as u64 <= self.len);
        if let Some(h) = &mut self.plain {
            h.update(data);
            self.pos += data.len() as u64;
            return;
        }
        if self.pos == 0 && self.partial.is_none() && data.len() as u64 == self.len {
            self.root = Some(digest::hash(data));
            self.pos = self.len;
            return;
        }
        while !data.is_empty() {
            if let Some((h, filled)) = &mut self.partial {
                let end = (self.pos + BLOCK).min(self.len);
                let n = ((end - self.pos - *filled) as usize).min(data.len());
                h.update(&data[..n]);
                *filled += n as u64;
                data = &data[n..];
                if self.pos + *filled == end {
                    let (h, _) = self.partial.take().expect("partial");
                    self.push(h.finalize_non_root(), end - self.pos);
                }
                continue;
            }
            // At a block boundary: the largest aligned power-of-two run available.
            let avail = data.len() as u64;
            let max = if self.pos == 0 {
                u64::MAX
            } else {
                BLOCK << (self.pos / BLOCK).trailing_zeros()
            };
            let s = (1u64 << (63 - avail.leading_zeros())).min(max);
            if s >= BLOCK {
                self.push(subtree_cv(self.pos, &data[..s as usize]), s);
                data = &data[s as usize..];
            } else if self.pos + avail == self.len {
                // The window's final short block, all here.
                self.push(subtree_cv(self.pos, data), avail);
                data = &[];
            } else {
                let mut h = blake3::Hasher::new();
                h.set_input_offset(self.pos);
                self.partial = Some((h, 0));
            }
        }
    }

    pub fn feed_zeros(&mut self, mut n: u64) {
        while n > 0 {
            if self.takes_cv() && n >= self.block_len() {
                let k = (self.pos / BLOCK) as usize;
                let bl = self.block_len();
                self.push(zero_cv(k, bl), bl);
                n -= bl;
            } else {
                let p = self.position();
                let m = n.min(BLOCK - p % BLOCK).min(self.len - p);
                self.feed(&ZEROS[..m as usize]);
                n -= m;
            }
        }
    }

    /// The window's hash; every byte must have been fed.
    pub fn finish(mut self) -> Hash32 {
        debug_assert_eq!(self.position(), self.len);
        if let Some(r) = self.root {
            return r;
        }
        if let Some(h) = self.plain.take() {
            return *h.finalize().as_bytes();
        }
        let mut right = self.stack.pop().expect("a window of several blocks");
        loop {
            let left = self.stack.pop().expect("two subtrees at least");
            if self.stack.is_empty() {
                return *merge_subtrees_root(&left, &right, Mode::Hash).as_bytes();
            }
            right = merge_subtrees_non_root(&left, &right, Mode::Hash);
        }
    }
}

/// The file digest of [`crate::hash::digest`] for a file of known size, fed in
/// order by bytes, zeros, block CVs and whole-window hashes.
pub struct FileDigest {
    size: u64,
    outer: blake3::Hasher,
    window: Option<WindowDigest>,
    /// Start of the current window.
    base: u64,
    /// Window hashes kept, in order (see [`FileDigest::segment`] and
    /// [`FileDigest::recording`]).
    roots: Option<Vec<Hash32>>,
    /// A segment: the hashes are kept instead of making a file digest.
    segment: bool,
}

impl FileDigest {
    pub fn new(size: u64) -> FileDigest {
        FileDigest {
            size,
            outer: blake3::Hasher::new(),
            window: None,
            base: 0,
            roots: None,
            segment: false,
        }
    }

    /// A file digest that also keeps the hash of every window fed (for a
    /// resumable transfer's progress record).
    pub fn recording(size: u64) -> FileDigest {
        FileDigest {
            roots: Some(Vec::new()),
            ..FileDigest::new(size)
        }
    }

    /// The window hashes kept so far (whole windows only).
    pub fn roots(&self) -> &[Hash32] {
        self.roots.as_deref().unwrap_or(&[])
    }

    /// The digest of a segment of a file of `size` bytes that starts at
    /// window boundary `start`: fed from there, it yields the hash of each
    /// of its windows ([`FileDigest::take_roots`]) instead of a file digest.
    pub fn segment(size: u64, start: u64) -> FileDigest {
        debug_assert_eq!(start % WINDOW, 0);
        FileDigest {
            base: start.min(size),
            roots: Some(Vec::new()),
            segment: true,
            ..FileDigest::new(size)
        }
    }

    /// The window hashes a segment digest was fed (whole windows only).
    pub fn take_roots(&mut self) -> Vec<Hash32> {
        self.close_if_full();
        self.roots.take().unwrap_or_default()
    }

    fn push_root(&mut self, h: &Hash32) {
        if let Some(r) = &mut self.roots {
            r.push(*h);
        }
        if !self.segment {
            self.outer.update(h);
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn position(&self) -> u64 {
        self.base + self.window.as_ref().map_or(0, |w| w.position())
    }

    fn window(&mut self) -> &mut WindowDigest {
        let len = WINDOW.min(self.size - self.base);
        self.window.get_or_insert_with(|| WindowDigest::new(len))
    }

    fn close_if_full(&mut self) {
        if let Some(w) = &self.window {
            if w.position() == w.len() {
                let w = self.window.take().expect("window");
                self.base += w.len();
                let h = w.finish();
                self.push_root(&h);
            }
        }
    }

    /// Whether the position is at a window boundary (a whole window can be fed by its hash).
    pub fn at_window_start(&self) -> bool {
        self.window.is_none()
    }

    /// Length of the window starting at the current position.
    pub fn window_len(&self) -> u64 {
        match &self.window {
            Some(w) => w.len(),
            None => WINDOW.min(self.size - self.base),
        }
    }

    /// Feeds the whole next window by its hash (`len`: that window's length).
    pub fn feed_window_hash(&mut self, h: &Hash32, len: u64) {
        debug_assert!(self.window.is_none() && len == self.window_len());
        self.push_root(h);
        self.base += len;
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let w = self.window();
            let n = ((w.len() - w.position()) as usize).min(data.len());
            w.feed(&data[..n]);
            data = &data[n..];
            self.close_if_full();
        }
    }

    pub fn feed_zeros(&mut self, mut n: u64) {
        while n > 0 {
            if self.window.is_none() && n >= self.window_len() {
                let len = self.window_len();
                self.push_root(&digest::zero_hash(len));
                self.base += len;
                n -= len;
                continue;
            }
            let w = self.window();
            let m = n.min(w.len() - w.position());
            w.feed_zeros(m);
            n -= m;
            self.close_if_full();
        }
    }

    /// Whether the next block can be fed by a CV: returns its window-relative
    /// block index and length.
    pub fn next_block(&mut self) -> Option<(usize, u64)> {
        if self.position() >= self.size {
            return None;
        }
        let w = self.window();
        w.takes_cv()
            .then(|| ((w.position() / BLOCK) as usize, w.block_len()))
    }

    /// Feeds the block [`next_block`](Self::next_block) announced by its CV.
    pub fn feed_cv(&mut self, cv: &Cv) {
        self.window().feed_cv(cv);
        self.close_if_full();
    }

    /// The digest; the file's every byte must have been fed.
    pub fn finish(mut self) -> Hash32 {
        debug_assert_eq!(self.position(), self.size);
        self.close_if_full();
        self.outer.update(&self.size.to_le_bytes());
        *self.outer.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn window_tree_gives_the_standard_hash() {
        for len in [
            1,
            1024,
            1025,
            4096,
            4097,
            8192,
            12288 + 5,
            65536,
            1 << 20,
            (4 << 20) - 3,
            4 << 20,
        ] {
            let d = data(len, len as u64);
            let (root, cvs) = window_tree(&d);
            assert_eq!(root, *blake3::hash(&d).as_bytes(), "len {len}");
            assert_eq!(cvs.len(), len.div_ceil(4096));
        }
        let z = vec![0u8; 3 * 4096];
        let (_, cvs) = window_tree(&z);
        assert_eq!(cvs[..], zero_cvs()[..3]);
        assert_eq!(zero_cv(1, 100), subtree_cv(4096, &[0u8; 100]));
    }

    /// How a window is fed in one step of the property test.
    #[derive(Debug, Clone)]
    enum Feed {
        Bytes(usize),
        Zeros(usize),
        /// Whole blocks by CV where possible (bytes otherwise).
        Cvs(usize),
    }

    fn feed() -> impl Strategy<Value = Feed> {
        prop_oneof![
            (1..70_000usize).prop_map(Feed::Bytes),
            (1..20_000usize).prop_map(Feed::Zeros),
            (1..40usize).prop_map(Feed::Cvs),
            (1..5usize).prop_map(|n| Feed::Bytes(n * 4096)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, .. ProptestConfig::default() })]

        /// Any mix of bytes, zeros and block CVs hashes a window to blake3::hash of its bytes.
        #[test]
        fn any_feeding_gives_the_standard_hash(
            len in prop_oneof![1..9000u64, 1..(4u64 << 20), Just(4u64 << 20), Just(1u64 << 20)],
            feeds in prop::collection::vec(feed(), 1..40),
            seed in any::<u64>(),
        ) {
            let mut d = data(len as usize, seed);
            let mut w = WindowDigest::new(len);
            let mut plan = feeds.iter().cycle();
            while w.position() < len {
                let pos = w.position() as usize;
                let left = len as usize - pos;
                match plan.next().unwrap() {
                    Feed::Bytes(n) => {
                        let n = (*n).min(left);
                        w.feed(&d[pos..pos + n]);
                    }
                    Feed::Zeros(n) => {
                        let n = (*n).min(left);
                        d[pos..pos + n].fill(0);
                        w.feed_zeros(n as u64);
                    }
                    Feed::Cvs(n) => {
                        for _ in 0..*n {
                            if !w.takes_cv() {
                                break;
                            }
                            let p = w.position() as usize;
                            let bl = w.block_len() as usize;
                            w.feed_cv(&subtree_cv(p as u64, &d[p..p + bl]));
                        }
                        if w.position() < len && !w.takes_cv() {
                            let p = w.position() as usize;
                            let n = (4096 - p % 4096).min(len as usize - p);
                            w.feed(&d[p..p + n]);
                        }
                    }
                }
            }
            prop_assert_eq!(w.finish(), *blake3::hash(&d).as_bytes());
        }

        /// The file digest fed by windows, CVs, bytes and zeros equals the master's Digester.
        #[test]
        fn file_digest_equals_the_digester(
            size in prop_oneof![0..10_000u64, (4u64 << 20) - 5000..(9u64 << 20)],
            cut in any::<u64>(),
            seed in any::<u64>(),
        ) {
            let mut d = data(size as usize, seed);
            let zstart = (cut % (size + 1)) as usize;
            let zend = (zstart + (cut >> 40) as usize % 300_000).min(size as usize);
            d[zstart..zend].fill(0);
            let want = digest::digest_of(&d);
            let mut f = FileDigest::new(size);
            f.feed(&d[..zstart]);
            f.feed_zeros((zend - zstart) as u64);
            while f.position() < size {
                let p = f.position() as usize;
                if f.at_window_start() && (cut & 1) == 1 {
                    let wl = f.window_len() as usize;
                    f.feed_window_hash(&digest::hash(&d[p..p + wl]), wl as u64);
                } else if let Some((k, bl)) = f.next_block() {
                    let at = k as u64 * BLOCK;
                    f.feed_cv(&subtree_cv(at, &d[p..p + bl as usize]));
                } else {
                    f.feed(&d[p..p + 1]);
                }
            }
            prop_assert_eq!(f.finish(), want);
        }
    }
}
