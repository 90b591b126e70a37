//! Hard links: a master inode with several names is shipped once and its
//! other names are linked to it on the slave. The names seen so far are
//! remembered across crawls (`links.json` in the session directory), so
//! that when an xtime crawl re-ships the inode through one name, the
//! slave's other names are re-linked too instead of keeping stale content.
//! A name seen alone is remembered too: its partner may appear in a
//! directory already listed in that crawl, and the next crawl may skip
//! this name's directory by its entry digest (a link made mid-crawl).
//! This is the registry of names; the crawl's use of it is `crawl::linked`.

use crate::fs::meta::Entry;
use crate::fs::relpath::RelPath;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;

pub(crate) type Key = (u64, u64);

#[derive(Serialize, Deserialize, Default)]
struct Saved {
    groups: Vec<(u64, u64, Vec<RelPath>)>,
}

#[derive(Default)]
pub struct Links {
    /// Inodes shipped (or being shipped) in this crawl, and through which name.
    cells: Mutex<HashMap<Key, Arc<OnceCell<Option<RelPath>>>>>,
    known: Mutex<HashMap<Key, BTreeSet<RelPath>>>,
    /// Whether `known` changed since it was loaded.
    dirty: std::sync::atomic::AtomicBool,
    file: Option<PathBuf>,
}

impl Links {
    /// Loads the remembered names; a missing or unreadable file starts empty.
    pub fn load(file: PathBuf) -> Links {
        let saved: Saved = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let known = saved
            .groups
            .into_iter()
            .map(|(d, i, p)| ((d, i), p.into_iter().collect()))
            .collect();
        Links {
            cells: Mutex::default(),
            known: Mutex::new(known),
            dirty: Default::default(),
            file: Some(file),
        }
    }

    /// Saves the remembered names if they changed (not fsynced: losing
    /// them only means a later full crawl relearns them).
    pub fn save(&self) -> std::io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        if !self.dirty.swap(false, std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let groups = self
            .known
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.0, k.1, v.iter().cloned().collect()))
            .collect();
        let data = serde_json::to_vec(&Saved { groups }).map_err(std::io::Error::other)?;
        georep_monitor::write_atomic_volatile(file, &data)
    }

    /// Records that `path` is a name of a multiply-linked master inode.
    pub fn saw(&self, e: &Entry, path: &RelPath) {
        let added = self
            .known
            .lock()
            .unwrap()
            .entry((e.dev, e.ino))
            .or_default()
            .insert(path.clone());
        if added {
            self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub(crate) fn cell(&self, key: Key) -> Arc<OnceCell<Option<RelPath>>> {
        self.cells.lock().unwrap().entry(key).or_default().clone()
    }

    /// Whether a name of `key` is being (or was) shipped in this crawl.
    pub(crate) fn started(&self, key: Key) -> bool {
        self.cells.lock().unwrap().contains_key(&key)
    }

    pub(crate) fn others(&self, key: Key, path: &RelPath) -> Vec<RelPath> {
        self.known
            .lock()
            .unwrap()
            .get(&key)
            .map(|s| s.iter().filter(|p| *p != path).cloned().collect())
            .unwrap_or_default()
    }

    pub(crate) fn forget(&self, key: Key, path: &RelPath) {
        if let Some(s) = self.known.lock().unwrap().get_mut(&key) {
            if s.remove(path) {
                self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::meta::{Kind, Meta};

    fn entry(ino: u64) -> Entry {
        Entry {
            name: b"x".to_vec().into(),
            kind: Kind::File,
            size: 1,
            meta: Meta::default(),
            dev: 7,
            ino,
            nlink: 2,
            target: None,
        }
    }

    /// A name seen without its partner survives a restart: the partner's
    /// directory may be the one listed next time, and this one skipped.
    #[test]
    fn a_name_seen_alone_is_remembered_across_crawls() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("links.json");
        let a = RelPath::new(b"d/a".to_vec()).unwrap();
        let b = RelPath::new(b"e/b".to_vec()).unwrap();
        let l = Links::load(file.clone());
        l.saw(&entry(5), &a);
        l.save().unwrap();
        let l = Links::load(file.clone());
        assert_eq!(l.others((7, 5), &b), vec![a.clone()]);
        assert!(l.others((7, 6), &b).is_empty());
        l.forget((7, 5), &a);
        l.save().unwrap();
        assert!(Links::load(file).others((7, 5), &b).is_empty());
    }
}
