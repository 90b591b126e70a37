//! The canonical stream of a tree that both sides hash to verify a
//! replica: the root and every entry below it in depth-first order, names sorted
//! by bytes, each as an [`Item::Entry`] (kind, size, replicated metadata,
//! symlink target) followed, for a regular file, by one [`Item::Window`]
//! per 4 MiB window of its content (its BLAKE3 hash). A position in the
//! stream is a [`Key`]; a range of it is `(from, to]`, and both sides hash
//! the items of a range into one BLAKE3 hash ([`RangeHash`]), so equal
//! ranges cost a few bytes on the wire whatever they hold.
//!
//! [`Walk`] goes through a tree in stream order from any key, listing only
//! the directories on the way; the master and the agent each implement
//! [`Tree`] over their own side.

use super::digest::{self, WINDOW};
use super::Hash32;
use crate::fs::meta::{Entry, Kind, Meta};
use crate::fs::relpath::RelPath;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::cmp::Ordering;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Just before an entry (no item has it): the start of its subtree.
pub const BEFORE: u64 = 0;
/// An entry's own item.
pub const HEADER: u64 = 1;
/// After an entry and everything below it.
pub const AFTER: u64 = u64::MAX;

/// The position of window `k` of a file.
pub fn window_pos(k: u64) -> u64 {
    k + 2
}

/// A position in the stream: an entry's path and where at that entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Key {
    pub path: RelPath,
    /// [`BEFORE`], [`HEADER`], a [`window_pos`], or [`AFTER`].
    pub pos: u64,
}

impl Key {
    pub fn new(path: RelPath, pos: u64) -> Key {
        Key { path, pos }
    }

    /// The start of the subtree at `path` (exclusive lower bound of its range).
    pub fn before(path: &RelPath) -> Key {
        Key::new(path.clone(), BEFORE)
    }

    /// The end of the subtree at `path` (inclusive upper bound of its range).
    pub fn after(path: &RelPath) -> Key {
        Key::new(path.clone(), AFTER)
    }

    /// Whether `self` lies in `(from, to]`.
    pub fn within(&self, from: &Key, to: &Key) -> bool {
        cmp(self, from) == Ordering::Greater && cmp(self, to) != Ordering::Greater
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = if self.path.is_root() {
            "/".to_string()
        } else {
            self.path.to_string()
        };
        match self.pos {
            BEFORE => write!(f, "{p} (start)"),
            HEADER => write!(f, "{p}"),
            AFTER => write!(f, "{p} (end)"),
            w => write!(f, "{p} @{}", (w - 2) * WINDOW),
        }
    }
}

/// Stream order: depth first, children after their parent's item and
/// before its [`AFTER`], siblings by name bytes.
pub fn cmp(a: &Key, b: &Key) -> Ordering {
    let (mut ca, mut cb) = (a.path.components(), b.path.components());
    loop {
        match (ca.next(), cb.next()) {
            (Some(x), Some(y)) => match x.cmp(y) {
                Ordering::Equal => continue,
                o => return o,
            },
            (None, None) => return a.pos.cmp(&b.pos),
            // `a` is an ancestor of `b`.
            (None, Some(_)) if a.pos == AFTER => return Ordering::Greater,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) if b.pos == AFTER => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
        }
    }
}

/// One item of the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Item {
    Entry {
        path: RelPath,
        kind: Kind,
        size: u64,
        meta: Meta,
        target: Option<ByteBuf>,
    },
    Window {
        path: RelPath,
        index: u64,
        hash: Hash32,
    },
}

impl Item {
    /// The item of entry `e` at `path`, in canonical form: what is not
    /// replicated is left out (a symlink's mode and xattrs, a directory's
    /// size), and the owner too when `owners` is false (an agent that is
    /// not root cannot set it).
    pub fn entry(path: RelPath, e: &Entry, owners: bool) -> Item {
        let mut meta = e.meta.clone();
        if e.kind == Kind::Symlink {
            meta.mode = 0;
            meta.xattrs.clear();
        }
        if !owners {
            meta.uid = 0;
            meta.gid = 0;
        }
        Item::Entry {
            path,
            kind: e.kind,
            size: if e.kind == Kind::File { e.size } else { 0 },
            meta,
            target: e.target.clone(),
        }
    }

    pub fn path(&self) -> &RelPath {
        match self {
            Item::Entry { path, .. } | Item::Window { path, .. } => path,
        }
    }

    pub fn key(&self) -> Key {
        match self {
            Item::Entry { path, .. } => Key::new(path.clone(), HEADER),
            Item::Window { path, index, .. } => Key::new(path.clone(), window_pos(*index)),
        }
    }

    /// Bytes of this item's encoding (what it costs on the wire).
    pub fn encoded_len(&self) -> usize {
        postcard::to_allocvec(self).map(|v| v.len()).unwrap_or(0)
    }
}

/// The hash of a range: BLAKE3 over each item's postcard encoding, each
/// preceded by its length.
#[derive(Default)]
pub struct RangeHash {
    h: blake3::Hasher,
    items: u64,
}

impl RangeHash {
    pub fn new() -> RangeHash {
        RangeHash::default()
    }

    pub fn add(&mut self, item: &Item) {
        let bytes = postcard::to_allocvec(item).expect("items encode");
        self.h.update(&(bytes.len() as u32).to_le_bytes());
        self.h.update(&bytes);
        self.items += 1;
    }

    pub fn items(&self) -> u64 {
        self.items
    }

    pub fn finish(&self) -> Hash32 {
        *self.h.finalize().as_bytes()
    }
}

/// The hash of items in order.
pub fn hash_items<'a>(items: impl IntoIterator<Item = &'a Item>) -> Hash32 {
    let mut h = RangeHash::new();
    for i in items {
        h.add(i);
    }
    h.finish()
}

/// Windows of a file of `size` bytes.
pub fn windows(size: u64) -> u64 {
    size.div_ceil(WINDOW)
}

/// The byte range of window `k` of a file of `size` bytes.
pub fn window_range(size: u64, k: u64) -> (u64, u64) {
    let off = k * WINDOW;
    (off, WINDOW.min(size.saturating_sub(off)))
}

/// BLAKE3 of `len` bytes of `file` at `off` (all hole: not read). Fails
/// with `UnexpectedEof` if the file is shorter.
pub fn window_hash(file: &File, off: u64, len: u64, buf: &mut Vec<u8>) -> std::io::Result<Hash32> {
    if crate::fs::sparse::data_ranges(file, off, off + len)?.is_empty() {
        return Ok(digest::zero_hash(len));
    }
    buf.clear();
    buf.resize(len as usize, 0);
    file.read_exact_at(buf, off)?;
    Ok(digest::hash(buf))
}

/// One side's tree, as [`Walk`] reads it.
pub trait Tree {
    type Entry;
    type Error;
    /// The entries of directory `dir` that belong to the stream, sorted by
    /// name bytes; a directory that vanished lists as empty.
    fn list(&mut self, dir: &RelPath) -> Result<Vec<Self::Entry>, Self::Error>;
    /// The root directory's own entry.
    fn root(&mut self) -> Result<Self::Entry, Self::Error>;
    fn entry(e: &Self::Entry) -> &Entry;
}

struct Level<E> {
    dir: RelPath,
    entries: Vec<E>,
    next: usize,
}

/// A depth-first walk in stream order from a key: yields every entry
/// whose subtree holds keys after it (the caller skips items up to the key
/// itself), listing each directory once, when the walk reaches it.
pub struct Walk<E> {
    stack: Vec<Level<E>>,
    from: Key,
    root: Option<E>,
}

impl<E> Walk<E> {
    /// A walk over the keys after `from`.
    pub fn new(from: Key) -> Walk<E> {
        Walk {
            stack: Vec::new(),
            from,
            root: None,
        }
    }

    fn push<T: Tree<Entry = E>>(&mut self, tree: &mut T, dir: RelPath) -> Result<(), T::Error> {
        let entries = tree.list(&dir)?;
        // Children whose whole subtree lies at or before `from` are skipped.
        let next = entries.partition_point(|e| {
            let name = &T::entry(e).name;
            match dir.join(name) {
                Ok(p) => cmp(&Key::after(&p), &self.from) != Ordering::Greater,
                Err(_) => true,
            }
        });
        self.stack.push(Level { dir, entries, next });
        Ok(())
    }

    /// The next entry (its path and listing), or None at the end of the
    /// tree; the root comes first. A directory is descended into right
    /// after it is yielded.
    pub fn next<T: Tree<Entry = E>>(
        &mut self,
        tree: &mut T,
    ) -> Result<Option<(RelPath, &E)>, T::Error> {
        if self.root.is_none() {
            self.root = Some(tree.root()?);
            self.push(tree, RelPath::root())?;
            return Ok(Some((RelPath::root(), self.root.as_ref().expect("set"))));
        }
        loop {
            let Some(top) = self.stack.last_mut() else {
                return Ok(None);
            };
            if top.next >= top.entries.len() {
                self.stack.pop();
                continue;
            }
            let i = top.next;
            top.next += 1;
            let e = T::entry(&top.entries[i]);
            let is_dir = e.kind == Kind::Dir;
            let Ok(path) = top.dir.join(&e.name) else {
                continue;
            };
            if is_dir {
                self.push(tree, path.clone())?;
                // The parent level sits just below the one pushed.
                let n = self.stack.len();
                return Ok(Some((path, &self.stack[n - 2].entries[i])));
            }
            let top = self.stack.last().expect("level");
            return Ok(Some((path, &top.entries[i])));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(p: &str, pos: u64) -> Key {
        Key::new(RelPath::new(p.as_bytes().to_vec()).unwrap(), pos)
    }

    #[test]
    fn keys_sort_depth_first() {
        let order = [
            k("", BEFORE),
            k("a", BEFORE),
            k("a", HEADER),
            k("a/b", HEADER),
            k("a/b", window_pos(0)),
            k("a/b", window_pos(7)),
            k("a/b", AFTER),
            k("a/c", HEADER),
            k("a/c/d", HEADER),
            k("a/c", AFTER),
            k("a", AFTER),
            k("a b", HEADER),
            k("ab", HEADER),
            k("", AFTER),
        ];
        for (i, x) in order.iter().enumerate() {
            for (j, y) in order.iter().enumerate() {
                assert_eq!(cmp(x, y), i.cmp(&j), "{x} vs {y}");
            }
        }
        assert!(k("a/b", HEADER).within(&k("a", BEFORE), &k("a", AFTER)));
        assert!(!k("ab", HEADER).within(&k("a", BEFORE), &k("a", AFTER)));
    }

    struct Mem(Vec<(&'static str, Kind)>);

    impl Tree for Mem {
        type Entry = Entry;
        type Error = ();
        fn list(&mut self, dir: &RelPath) -> Result<Vec<Entry>, ()> {
            let mut v: Vec<Entry> = self
                .0
                .iter()
                .filter_map(|(p, kind)| {
                    let p = RelPath::new(p.as_bytes().to_vec()).unwrap();
                    (p.parent().as_ref() == Some(dir)).then(|| Entry {
                        name: ByteBuf::from(p.name().unwrap().to_vec()),
                        kind: *kind,
                        size: 0,
                        meta: Meta::default(),
                        dev: 0,
                        ino: 0,
                        nlink: 1,
                        target: None,
                    })
                })
                .collect();
            v.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(v)
        }
        fn root(&mut self) -> Result<Entry, ()> {
            Ok(Entry {
                name: ByteBuf::new(),
                kind: Kind::Dir,
                size: 0,
                meta: Meta::default(),
                dev: 0,
                ino: 0,
                nlink: 1,
                target: None,
            })
        }
        fn entry(e: &Entry) -> &Entry {
            e
        }
    }

    #[test]
    fn a_walk_starts_anywhere_and_keeps_stream_order() {
        let mut t = Mem(vec![
            ("a", Kind::Dir),
            ("a/x", Kind::File),
            ("a/y", Kind::Dir),
            ("a/y/z", Kind::File),
            ("b", Kind::File),
            ("c", Kind::Dir),
        ]);
        let all = |from: Key, t: &mut Mem| {
            let mut w = Walk::new(from);
            let mut out = Vec::new();
            while let Some((p, _)) = w.next(t).unwrap() {
                if !p.is_root() {
                    out.push(p.to_string());
                }
            }
            out
        };
        assert_eq!(
            all(k("", BEFORE), &mut t),
            ["a", "a/x", "a/y", "a/y/z", "b", "c"]
        );
        // From inside a file: that file again (its later windows), then on.
        // Ancestors are yielded again (the caller skips their items).
        assert_eq!(
            all(k("a/x", window_pos(3)), &mut t),
            ["a", "a/x", "a/y", "a/y/z", "b", "c"]
        );
        assert_eq!(all(k("a", AFTER), &mut t), ["b", "c"]);
        assert_eq!(
            all(k("a/y/z", HEADER), &mut t),
            ["a", "a/y", "a/y/z", "b", "c"]
        );
        assert_eq!(all(k("a/y", AFTER), &mut t), ["a", "b", "c"]);
    }
}
