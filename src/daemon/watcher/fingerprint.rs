//! Telling georep's own xattr writes from real attribute changes: an
//! IN_ATTRIB event whose entry's replicated metadata (mode, owner, mtime,
//! link count, user xattrs other than georep's) is what it was when georep
//! last stamped it changed nothing replicated, and is dropped. That is what
//! keeps stamps and stimes from triggering crawls of their own.

use crate::fs::meta::{read_xattrs, Meta};
use crate::fs::xtime;
use std::collections::{HashMap, HashSet};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// An inode, as (device, inode number).
pub type Inode = (u64, u64);

/// Hash of the replicated metadata of the entry at `path` (not following a symlink).
pub fn fingerprint(path: &Path) -> io::Result<(Inode, [u8; 16])> {
    let md = std::fs::symlink_metadata(path)?;
    let xattrs = if md.file_type().is_symlink() {
        Vec::new()
    } else {
        read_xattrs(path)?
    };
    let meta = Meta::from_metadata(&md, xattrs);
    let mut h = blake3::Hasher::new();
    h.update(&postcard::to_stdvec(&meta).map_err(io::Error::other)?);
    h.update(&md.nlink().to_le_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    Ok(((md.dev(), md.ino()), out))
}

/// The fingerprints recorded when georep last stamped (or first watched) an entry.
#[derive(Default)]
pub struct Fingerprints {
    map: HashMap<Inode, [u8; 16]>,
}

impl Fingerprints {
    pub fn record(&mut self, path: &Path) {
        if let Ok((ino, fp)) = fingerprint(path) {
            self.map.insert(ino, fp);
        }
    }

    /// Whether an attribute event on `path` changed something replicated.
    /// Unknown entries count as changed; so does an entry that is gone.
    pub fn changed(&self, path: &Path) -> bool {
        match fingerprint(path) {
            Ok((ino, fp)) => self.map.get(&ino) != Some(&fp),
            Err(_) => true,
        }
    }

    pub fn forget_all(&mut self) {
        self.map.clear();
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The first entry at or above `p` that can carry an xattr (a file or a directory), within `root`.
fn stampable(root: &Path, p: &Path) -> Option<PathBuf> {
    let mut cur = p.to_path_buf();
    loop {
        if !cur.starts_with(root) {
            return None;
        }
        match std::fs::symlink_metadata(&cur) {
            Ok(md) if md.is_dir() || md.is_file() => return Some(cur),
            _ => {
                if !cur.pop() {
                    return None;
                }
            }
        }
    }
}

/// The entries a batch of changed `paths` stamps, in write order: each
/// path (or its nearest existing directory) and its ancestors up to
/// `root`, every entry after all of its descendants (deepest first). A
/// crawl that reads an ancestor's new stamp then finds it on every entry
/// below that gets it; chains merged path by path would write an ancestor
/// before a second branch, and a crawl in between would record the
/// ancestor's stime over a branch it saw unchanged (found by the model,
/// docs/model.md).
pub fn stamp_order(root: &Path, paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = Vec::new();
    let mut seen = HashSet::new();
    for p in paths {
        let Some(start) = stampable(root, p) else {
            continue;
        };
        let mut cur = start;
        loop {
            if !seen.insert(cur.clone()) {
                break;
            }
            entries.push(cur.clone());
            if cur == root || !cur.pop() {
                break;
            }
        }
    }
    entries.sort_by_key(|e| std::cmp::Reverse(e.components().count()));
    entries
}

/// Stamps `paths` (or their nearest existing directory) and all their
/// ancestors up to `root` with one new stamp, under the master's marker
/// lock, recording each entry's fingerprint taken *before* the write (so
/// a real change racing with the write still differs afterwards).
/// Returns the stamp, or None when nothing was left to stamp.
pub fn mark_many(
    root: &Path,
    master: &Uuid,
    paths: &[PathBuf],
    fps: &mut Fingerprints,
) -> io::Result<Option<u64>> {
    let entries = stamp_order(root, paths);
    if entries.is_empty() {
        return Ok(None);
    }
    let _lock = xtime::MarkerLock::take(root)?;
    let attr = xtime::xtime_attr(master);
    let stamp = xtime::next_stamp(root, master)?;
    for e in &entries {
        let before = fingerprint(e);
        match xtime::write(e, &attr, stamp) {
            Ok(()) => {
                if let Ok((ino, fp)) = before {
                    fps.map.insert(ino, fp);
                }
            }
            // Gone since: its parent is stamped too (it is in `entries`).
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
            Err(err) => return Err(err),
        }
    }
    Ok(Some(stamp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_is_stamped_after_everything_below_it() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("m");
        for p in ["a/b", "a/c", "d"] {
            std::fs::create_dir_all(root.join(p)).unwrap();
        }
        for f in ["a/b/f1", "a/c/f2", "d/f3"] {
            std::fs::write(root.join(f), b"x").unwrap();
        }
        let paths: Vec<PathBuf> = ["a/b/f1", "a/c/f2", "a/c/gone", "d/f3", "a"]
            .iter()
            .map(|p| root.join(p))
            .collect();
        let order = stamp_order(&root, &paths);
        let names: Vec<_> = order
            .iter()
            .map(|p| p.strip_prefix(&root).unwrap().to_path_buf())
            .collect();
        assert_eq!(order.len(), 8, "{names:?}");
        for (i, e) in order.iter().enumerate() {
            for later in &order[i + 1..] {
                assert!(
                    !later.starts_with(e) || later == e,
                    "{} before {} in {names:?}",
                    e.display(),
                    later.display()
                );
            }
        }
        assert_eq!(order.last(), Some(&root));
    }

    #[test]
    fn own_stamps_are_not_changes_but_chmod_and_user_xattrs_are() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("m");
        std::fs::create_dir_all(root.join("a")).unwrap();
        let f = root.join("a/f");
        std::fs::write(&f, b"x").unwrap();
        let id = xtime::ensure_master_id(&root).unwrap();
        let mut fps = Fingerprints::default();
        assert!(fps.changed(&f), "unknown entries count as changed");
        let stamp = mark_many(&root, &id, std::slice::from_ref(&f), &mut fps)
            .unwrap()
            .unwrap();
        assert_eq!(xtime::read(&f, &xtime::xtime_attr(&id)).unwrap(), stamp);
        assert_eq!(xtime::read(&root, &xtime::xtime_attr(&id)).unwrap(), stamp);
        for p in [&f, &root.join("a"), &root] {
            assert!(!fps.changed(p), "{} after georep's own stamp", p.display());
        }
        // A session's stime write is georep's own too.
        xtime::write(&root.join("a"), &xtime::stime_attr(&Uuid::new_v4()), 7).unwrap();
        assert!(!fps.changed(&root.join("a")));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(fps.changed(&f));
        xattr::set(root.join("a"), "user.comment", b"hi").unwrap();
        assert!(fps.changed(&root.join("a")));
        // A vanished path stamps its nearest directory.
        let s2 = mark_many(&root, &id, &[root.join("a/gone")], &mut fps)
            .unwrap()
            .unwrap();
        assert!(s2 > stamp);
        assert_eq!(
            xtime::read(&root.join("a"), &xtime::xtime_attr(&id)).unwrap(),
            s2
        );
    }
}
