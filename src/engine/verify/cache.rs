//! The master's window hashes kept between verifications, so that an
//! unchanged master file is not read again: only the slave reads its copy
//! (which it must, to find rot). Used by `georep verify` and the scrub,
//! which share the master's hashing (`walk::hash_own`); `--no-cache`
//! hashes every master file again (and refreshes what is kept).
//!
//! **Validity.** An entry holds a file's window hashes with the file's
//! stamp when they were computed: device, inode, size, mtime and ctime
//! (nanoseconds). It serves a file only if the open file's `fstat` shows
//! that stamp exactly, before the hashes are used and again after (the
//! caller's fingerprint check). Users can restore an mtime but not a
//! ctime, so a change of content under a restored mtime and size misses.
//! A timestamp has the granularity of the kernel's clock tick, so a write
//! in the same tick as the one that set the ctime, after the hashing, would
//! leave the stamp as it was (git's "racy index"): an entry whose ctime is
//! within [`RACY_NS`] of when its hashes were computed is never stored nor
//! used; such a file is read again until it has been quiet that long.
//!
//! **Bounds.** Only files of at least [`MIN_SIZE`] are kept (below that,
//! reading costs little and an entry much per byte), and all entries
//! together cost at most [`MAX_BYTES`] (path, stamp and 33 bytes per 4 MiB
//! window: about 4 GiB of small files or 500 GiB of images per MiB). The
//! budget counts what this run hashed or used first: to make room, entries
//! loaded but not met yet are dropped (those of deleted files among them);
//! when the budget is full of this run's entries, further files are simply
//! read again next time. A file whose hashes alone exceed the budget is
//! never kept.
//!
//! **On disk**: `verify-cache` in the session's state directory (the
//! master's side; nothing of it goes to the slave), replaced atomically
//! (temporary file, then rename) after a verification or a scrub chunk.
//! Little-endian: magic, version, the owner (session id and master root),
//! the entries, then the BLAKE3 of all of it. A file of another version or
//! owner, or that does not check, is ignored with a warning and rebuilt.

use crate::fs::relpath::RelPath;
use crate::hash::Hash32;
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The cache's file in the session's state directory.
pub const FILE: &str = "verify-cache";
const MAGIC: &[u8; 8] = b"GRVCACHE";
const VERSION: u32 = 1;
/// Files smaller than this are always read.
pub const MIN_SIZE: u64 = 1 << 20;
/// What all entries cost at most, in memory and on disk (about).
pub const MAX_BYTES: usize = 4 << 20;
/// An entry whose ctime is not this much older than its hashes is not used.
pub const RACY_NS: i128 = 2_000_000_000;
/// Fixed cost of an entry besides its path and windows.
const ENTRY_COST: usize = 96;

/// What identifies a file's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl Stamp {
    pub fn of(md: &std::fs::Metadata) -> Stamp {
        let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
        Stamp {
            dev: md.dev(),
            ino: md.ino(),
            size: md.len(),
            mtime_ns: ns(md.mtime(), md.mtime_nsec()),
            ctime_ns: ns(md.ctime(), md.ctime_nsec()),
        }
    }

    /// Whether hashes computed from `hashed_ns` on may be kept for this state.
    fn settled(&self, hashed_ns: u64) -> bool {
        self.ctime_ns + RACY_NS < hashed_ns as i128
    }
}

#[derive(Debug, Clone)]
struct Entry {
    stamp: Stamp,
    /// When the earliest of its hashes was started (ns since the epoch).
    hashed_ns: u64,
    windows: Vec<Option<Hash32>>,
}

fn cost(path: &[u8], windows: usize) -> usize {
    path.len() + ENTRY_COST + 33 * windows
}

#[derive(Default)]
struct Inner {
    /// Loaded and not met by this run yet (dropped first for room).
    old: BTreeMap<Vec<u8>, Entry>,
    /// Hashed or used by this run.
    new: HashMap<Vec<u8>, Entry>,
    bytes: usize,
    dirty: bool,
}

impl Inner {
    fn take(&mut self, path: &[u8]) -> Option<Entry> {
        let e = self.new.remove(path).or_else(|| self.old.remove(path))?;
        self.bytes -= cost(path, e.windows.len());
        Some(e)
    }

    fn put(&mut self, path: Vec<u8>, e: Entry) {
        let c = cost(&path, e.windows.len());
        while self.bytes + c > MAX_BYTES {
            let Some((p, old)) = self.old.pop_first() else {
                return;
            };
            self.bytes -= cost(&p, old.windows.len());
            self.dirty = true;
        }
        self.bytes += c;
        self.new.insert(path, e);
    }
}

/// The window hashes of a session's master files (see the module).
pub struct WindowCache {
    path: PathBuf,
    owner: Vec<u8>,
    /// Whether entries serve reads (false with `--no-cache`: only refreshed).
    use_hits: bool,
    inner: Mutex<Inner>,
}

impl WindowCache {
    /// Loads the cache of `path` for `owner` (what names the session and
    /// its master root); a missing, foreign or damaged file gives an empty
    /// cache (with a warning unless it is missing).
    pub fn load(path: &Path, owner: &[u8], use_hits: bool) -> WindowCache {
        let mut inner = Inner::default();
        match std::fs::read(path) {
            Ok(data) => match decode(&data, owner) {
                Ok(entries) => {
                    for (p, e) in entries {
                        inner.bytes += cost(&p, e.windows.len());
                        if inner.bytes > MAX_BYTES {
                            inner.bytes -= cost(&p, e.windows.len());
                            break;
                        }
                        inner.old.insert(p, e);
                    }
                }
                Err(why) => {
                    tracing::warn!(file = %path.display(), why, "ignoring the verification's cache of master hashes; every master file is read and hashed again");
                    inner.dirty = true;
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read the verification's cache of master hashes; every master file is read and hashed again");
            }
        }
        WindowCache {
            path: path.to_path_buf(),
            owner: owner.to_vec(),
            use_hits,
            inner: Mutex::new(inner),
        }
    }

    /// The hashes of windows `[first, end)` of the file at `path`, whose
    /// open handle shows `stamp`, if they are kept for exactly that state.
    pub fn lookup(
        &self,
        path: &RelPath,
        stamp: &Stamp,
        first: u64,
        end: u64,
    ) -> Option<Vec<Hash32>> {
        if !self.use_hits || stamp.size < MIN_SIZE {
            return None;
        }
        let mut g = self.inner.lock().unwrap();
        let key = path.as_bytes();
        let e = g.take(key)?;
        let hit = (e.stamp == *stamp && stamp.settled(e.hashed_ns))
            .then(|| {
                e.windows
                    .get(first as usize..end as usize)?
                    .iter()
                    .copied()
                    .collect::<Option<Vec<Hash32>>>()
            })
            .flatten();
        if e.stamp == *stamp {
            // Met by this run: kept before what it has not met.
            g.put(key.to_vec(), e);
        } else {
            g.dirty = true;
        }
        hit
    }

    /// Keeps the hashes of windows `first..` of `path`, computed from
    /// `hashed_ns` on while the file showed `stamp` throughout.
    pub fn store(
        &self,
        path: &RelPath,
        stamp: &Stamp,
        hashed_ns: u64,
        first: u64,
        hashes: &[Hash32],
    ) {
        let n = crate::hash::stream::windows(stamp.size) as usize;
        let key = path.as_bytes();
        let mut g = self.inner.lock().unwrap();
        g.dirty = true;
        let prev = g.take(key);
        let keep = stamp.size >= MIN_SIZE
            && stamp.settled(hashed_ns)
            && first as usize + hashes.len() <= n
            && cost(key, n) <= MAX_BYTES;
        if !keep {
            return;
        }
        let mut e = match prev {
            Some(p) if p.stamp == *stamp => p,
            _ => Entry {
                stamp: *stamp,
                hashed_ns,
                windows: vec![None; n],
            },
        };
        e.hashed_ns = e.hashed_ns.min(hashed_ns);
        for (i, h) in hashes.iter().enumerate() {
            e.windows[first as usize + i] = Some(*h);
        }
        g.put(key.to_vec(), e);
    }

    /// Writes the cache if it changed (atomically); a failure is a warning.
    pub fn save(&self) {
        let data = {
            let mut g = self.inner.lock().unwrap();
            if !g.dirty {
                return;
            }
            g.dirty = false;
            let mut all: Vec<(&Vec<u8>, &Entry)> = g.new.iter().chain(g.old.iter()).collect();
            all.sort_by(|a, b| a.0.cmp(b.0));
            encode(&all, &self.owner)
        };
        if let Err(e) = georep_monitor::write_atomic_volatile(&self.path, &data) {
            tracing::warn!(file = %self.path.display(), error = %e, "cannot save the verification's cache of master hashes; the next verification reads the master again");
        }
    }

    /// Entries and their cost (for tests and logs).
    pub fn size(&self) -> (usize, usize) {
        let g = self.inner.lock().unwrap();
        (g.new.len() + g.old.len(), g.bytes)
    }
}

fn encode(entries: &[(&Vec<u8>, &Entry)], owner: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&(owner.len() as u32).to_le_bytes());
    b.extend_from_slice(owner);
    b.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (p, e) in entries {
        b.extend_from_slice(&(p.len() as u32).to_le_bytes());
        b.extend_from_slice(p);
        let s = &e.stamp;
        for v in [s.dev, s.ino, s.size] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&s.mtime_ns.to_le_bytes());
        b.extend_from_slice(&s.ctime_ns.to_le_bytes());
        b.extend_from_slice(&e.hashed_ns.to_le_bytes());
        b.extend_from_slice(&(e.windows.len() as u32).to_le_bytes());
        for w in &e.windows {
            match w {
                Some(h) => {
                    b.push(1);
                    b.extend_from_slice(h);
                }
                None => b.push(0),
            }
        }
    }
    let sum = blake3::hash(&b);
    b.extend_from_slice(sum.as_bytes());
    b
}

/// Reads little-endian fields, failing on a short input.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("truncated");
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().unwrap()))
    }
    fn i128(&mut self) -> Result<i128, &'static str> {
        Ok(i128::from_le_bytes(self.bytes(16)?.try_into().unwrap()))
    }
}

fn decode(data: &[u8], owner: &[u8]) -> Result<Vec<(Vec<u8>, Entry)>, &'static str> {
    if data.len() < MAGIC.len() + 4 + 32 || &data[..MAGIC.len()] != MAGIC {
        return Err("not a cache of master hashes");
    }
    let (body, sum) = data.split_at(data.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err("damaged: its checksum does not match");
    }
    let mut r = Reader(&body[MAGIC.len()..]);
    if r.u32()? != VERSION {
        return Err("written by another version of georep");
    }
    let n = r.u32()? as usize;
    if r.bytes(n)? != owner {
        return Err("written for another session or master root");
    }
    let count = r.u32()? as usize;
    let mut out = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let n = r.u32()? as usize;
        let path = r.bytes(n)?.to_vec();
        RelPath::new(path.clone()).map_err(|_| "holds an invalid path")?;
        let (dev, ino, size) = (r.u64()?, r.u64()?, r.u64()?);
        let (mtime_ns, ctime_ns) = (r.i128()?, r.i128()?);
        let hashed_ns = r.u64()?;
        let nw = r.u32()? as usize;
        if nw as u64 != crate::hash::stream::windows(size) || nw > r.0.len() {
            return Err("holds an entry whose windows do not match its size");
        }
        let mut windows = Vec::with_capacity(nw);
        for _ in 0..nw {
            windows.push(match r.bytes(1)?[0] {
                0 => None,
                1 => Some(r.bytes(32)?.try_into().unwrap()),
                _ => return Err("holds an invalid window"),
            });
        }
        let stamp = Stamp {
            dev,
            ino,
            size,
            mtime_ns,
            ctime_ns,
        };
        out.push((
            path,
            Entry {
                stamp,
                hashed_ns,
                windows,
            },
        ));
    }
    if !r.0.is_empty() {
        return Err("has trailing bytes");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(size: u64, ctime_s: i128) -> Stamp {
        Stamp {
            dev: 1,
            ino: 2,
            size,
            mtime_ns: 5,
            ctime_ns: ctime_s * 1_000_000_000,
        }
    }

    fn p(s: &str) -> RelPath {
        RelPath::new(s.as_bytes().to_vec()).unwrap()
    }

    const T: u64 = 100 * 1_000_000_000;

    #[test]
    fn hits_only_for_the_same_settled_state_and_survive_a_save() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join(FILE);
        let c = WindowCache::load(&f, b"owner", true);
        let s = stamp(9 << 20, 10);
        c.store(&p("a"), &s, T, 0, &[[1; 32], [2; 32]]);
        c.store(&p("a"), &s, T, 2, &[[3; 32]]);
        assert_eq!(c.lookup(&p("a"), &s, 1, 3), Some(vec![[2; 32], [3; 32]]));
        // Any field of the stamp moved: a miss, and the entry is gone.
        let mut moved = s;
        moved.ctime_ns += 1;
        assert_eq!(c.lookup(&p("a"), &moved, 0, 1), None);
        assert_eq!(c.lookup(&p("a"), &s, 0, 1), None);
        // Racy (ctime within RACY_NS of the hashing) and small files are not kept.
        c.store(&p("r"), &stamp(9 << 20, 99), T, 0, &[[1; 32]; 3]);
        c.store(&p("s"), &stamp(4096, 10), T, 0, &[[1; 32]]);
        c.store(&p("b"), &s, T, 0, &[[7; 32]; 3]);
        assert_eq!(c.size().0, 1);
        c.save();
        let again = WindowCache::load(&f, b"owner", true);
        assert_eq!(again.lookup(&p("b"), &s, 0, 3), Some(vec![[7; 32]; 3]));
        // --no-cache: no hits.
        assert_eq!(
            WindowCache::load(&f, b"owner", false).lookup(&p("b"), &s, 0, 3),
            None
        );
        // Another owner, or damage anywhere: ignored.
        assert_eq!(WindowCache::load(&f, b"other", true).size().0, 0);
        let mut data = std::fs::read(&f).unwrap();
        for i in [0, 20, data.len() / 2, data.len() - 1] {
            data[i] ^= 1;
            std::fs::write(&f, &data).unwrap();
            assert_eq!(
                WindowCache::load(&f, b"owner", true).size().0,
                0,
                "flipped {i}"
            );
            data[i] ^= 1;
        }
        std::fs::write(&f, &data[..data.len() - 40]).unwrap();
        assert_eq!(WindowCache::load(&f, b"owner", true).size().0, 0);
    }

    #[test]
    fn the_budget_holds_and_prefers_what_this_run_met() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join(FILE);
        let c = WindowCache::load(&f, b"o", true);
        // 1 GiB files: 256 windows each, about 8.5 KiB an entry.
        let s = stamp(1 << 30, 10);
        let hashes = vec![[9u8; 32]; 256];
        let fits = MAX_BYTES / cost(b"f00000", 256);
        for i in 0..fits + 100 {
            c.store(&p(&format!("f{i:05}")), &s, T, 0, &hashes);
        }
        let (n, bytes) = c.size();
        assert!(
            bytes <= MAX_BYTES && n == fits,
            "{n} entries, {bytes} bytes"
        );
        c.save();
        assert!(std::fs::metadata(&f).unwrap().len() as usize <= MAX_BYTES + 4096);
        // A new run meets the later files: they displace the unmet ones.
        let c = WindowCache::load(&f, b"o", true);
        for i in fits + 100..fits + 150 {
            c.store(&p(&format!("f{i:05}")), &s, T, 0, &hashes);
        }
        assert!(c
            .lookup(&p(&format!("f{:05}", fits + 120)), &s, 0, 256)
            .is_some());
        assert!(c.size().1 <= MAX_BYTES);
        // A file whose hashes alone exceed the budget is not kept.
        let huge = stamp(1 << 40, 10);
        c.store(&p("huge"), &huge, T, 0, &[[1; 32]]);
        assert_eq!(c.lookup(&p("huge"), &huge, 0, 1), None);
    }
}
