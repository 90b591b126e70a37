//! The file digest both sides compute to verify a transfer end to end.
//!
//! digest = BLAKE3( H(w0) || H(w1) || ... || len_le64 ), where wi are the
//! consecutive [`WINDOW`]-byte windows of the file (the last one shorter)
//! and H is BLAKE3. Windows are what the delta compares, so a side that
//! already knows a window's hash (an all-hole window, a matched basis
//! window) need not read it again.

use std::sync::OnceLock;

/// Window size of the digest and of the delta comparison.
pub const WINDOW: u64 = 4 << 20;

static ZEROS: [u8; 64 << 10] = [0u8; 64 << 10];

/// BLAKE3 of a buffer. Single-threaded on purpose: with AVX2/AVX-512 it
/// runs at several GB/s, and a thread pool's spinning on a small machine
/// (worker and agent side by side) cost far more than it saved.
pub fn hash(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

/// BLAKE3 of `len` zero bytes (cached for a full window).
pub fn zero_hash(len: u64) -> [u8; 32] {
    static FULL: OnceLock<[u8; 32]> = OnceLock::new();
    if len == WINDOW {
        return *FULL.get_or_init(|| zero_hash_uncached(WINDOW));
    }
    zero_hash_uncached(len)
}

fn zero_hash_uncached(mut len: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..n]);
        len -= n as u64;
    }
    *h.finalize().as_bytes()
}

/// Builds a digest from the file's bytes fed in order, or from whole-window
/// hashes where those are already known.
pub struct Digester {
    outer: blake3::Hasher,
    cur: blake3::Hasher,
    cur_len: u64,
    total: u64,
}

impl Default for Digester {
    fn default() -> Self {
        Digester {
            outer: blake3::Hasher::new(),
            cur: blake3::Hasher::new(),
            cur_len: 0,
            total: 0,
        }
    }
}

impl Digester {
    pub fn new() -> Digester {
        Digester::default()
    }

    /// Bytes fed so far.
    pub fn position(&self) -> u64 {
        self.total
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let room = (WINDOW - self.cur_len) as usize;
            let n = room.min(data.len());
            if self.cur_len == 0 && n as u64 == WINDOW {
                let h = hash(&data[..n]);
                self.outer.update(&h);
            } else {
                self.cur.update(&data[..n]);
                self.cur_len += n as u64;
                if self.cur_len == WINDOW {
                    self.close_window();
                }
            }
            self.total += n as u64;
            data = &data[n..];
        }
    }

    pub fn feed_zeros(&mut self, mut len: u64) {
        while len > 0 {
            if self.cur_len == 0 && len >= WINDOW {
                self.outer.update(&zero_hash(WINDOW));
                self.total += WINDOW;
                len -= WINDOW;
            } else {
                let n = len.min(ZEROS.len() as u64).min(WINDOW - self.cur_len) as usize;
                self.feed(&ZEROS[..n]);
                len -= n as u64;
            }
        }
    }

    /// Feeds a whole window by its hash. The digester must be at a window
    /// boundary and `len` must be a full window, or the file's final one.
    pub fn feed_window_hash(&mut self, h: &[u8; 32], len: u64) {
        debug_assert_eq!(self.cur_len, 0);
        debug_assert!(len <= WINDOW);
        self.outer.update(h);
        self.total += len;
    }

    pub fn at_window_boundary(&self) -> bool {
        self.cur_len == 0
    }

    fn close_window(&mut self) {
        let h = *self.cur.finalize().as_bytes();
        self.outer.update(&h);
        self.cur.reset();
        self.cur_len = 0;
    }

    pub fn finish(mut self) -> [u8; 32] {
        if self.cur_len > 0 {
            self.close_window();
        }
        self.outer.update(&self.total.to_le_bytes());
        *self.outer.finalize().as_bytes()
    }
}

/// The digest of a file of `size` bytes from the hashes of its windows.
pub fn of_window_hashes(roots: &[[u8; 32]], size: u64) -> [u8; 32] {
    let mut outer = blake3::Hasher::new();
    for r in roots {
        outer.update(r);
    }
    outer.update(&size.to_le_bytes());
    *outer.finalize().as_bytes()
}

/// The digest of a whole in-memory file.
pub fn digest_of(data: &[u8]) -> [u8; 32] {
    let mut d = Digester::new();
    d.feed(data);
    d.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_feeding_order_of_the_same_bytes_gives_the_same_digest() {
        let len = (WINDOW * 2 + 12345) as usize;
        let mut data = vec![0u8; len];
        for (i, b) in data.iter_mut().enumerate().skip(WINDOW as usize) {
            *b = (i % 251) as u8;
        }
        let whole = digest_of(&data);
        let mut d = Digester::new();
        d.feed_zeros(WINDOW);
        for chunk in data[WINDOW as usize..].chunks(7777) {
            d.feed(chunk);
        }
        assert_eq!(d.finish(), whole);
        let mut d = Digester::new();
        d.feed_window_hash(&zero_hash(WINDOW), WINDOW);
        d.feed(&data[WINDOW as usize..WINDOW as usize * 2]);
        d.feed_window_hash(&hash(&data[WINDOW as usize * 2..]), 12345);
        assert_eq!(d.finish(), whole);
        // Length is part of the digest: a trailing zero changes it.
        let mut longer = data.clone();
        longer.push(0);
        assert_ne!(digest_of(&longer), whole);
        assert_ne!(digest_of(&[]), digest_of(&[0]));
    }
}
