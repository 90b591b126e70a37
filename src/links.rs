//! Hard links: a master inode with several names is shipped once and its
//! other names are linked to it on the slave. The names seen so far are
//! remembered across crawls (`links.json` in the session directory), so
//! that when an xtime crawl re-ships the inode through one name, the
//! slave's other names are re-linked too instead of keeping stale content.

use crate::crawl::Engine;
use crate::master::MEntry;
use crate::meta::Entry;
use crate::relpath::RelPath;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;

type Key = (u64, u64);

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
            .filter(|(_, v)| v.len() > 1)
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

    fn cell(&self, key: Key) -> Arc<OnceCell<Option<RelPath>>> {
        self.cells.lock().unwrap().entry(key).or_default().clone()
    }

    fn others(&self, key: Key, path: &RelPath) -> Vec<RelPath> {
        self.known
            .lock()
            .unwrap()
            .get(&key)
            .map(|s| s.iter().filter(|p| *p != path).cloned().collect())
            .unwrap_or_default()
    }

    fn forget(&self, key: Key, path: &RelPath) {
        if let Some(s) = self.known.lock().unwrap().get_mut(&key) {
            if s.remove(path) {
                self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// Ships a multiply-linked file: the first of its names in this crawl
/// ships the content and re-links the other remembered names; later names
/// become links to it.
pub async fn ship_linked(e: &Arc<Engine>, path: &RelPath, m: &MEntry, basis: bool) -> bool {
    let key = (m.entry.dev, m.entry.ino);
    let cell = e.links().cell(key);
    let first = cell
        .get_or_init(|| async {
            e.ship_plain(path, m, None, basis)
                .await
                .then(|| path.clone())
        })
        .await
        .clone();
    match first {
        None => false,
        Some(p) if &p == path => {
            for other in e.links().others(key, path) {
                let same_inode = {
                    let full = e.master.path(&other);
                    tokio::task::spawn_blocking(move || std::fs::symlink_metadata(full).ok())
                        .await
                        .ok()
                        .flatten()
                        .is_some_and(|md| {
                            std::os::unix::fs::MetadataExt::ino(&md) == key.1
                                && std::os::unix::fs::MetadataExt::dev(&md) == key.0
                        })
                };
                if !same_inode {
                    e.links().forget(key, &other);
                    continue;
                }
                match link(e, &other, path).await {
                    // The link changed its directory, whose metadata may already
                    // have been set by this crawl: set it again, from the master.
                    Ok(()) => {
                        if let Err(err) = restore_dir_meta(e, &other).await {
                            if err.is_fatal() {
                                e.record_slave_err(&other, err);
                                return false;
                            }
                        }
                    }
                    // Its directory may not exist on the slave yet: it is linked when visited.
                    Err(err) if !err.is_fatal() => {}
                    Err(err) => {
                        e.record_slave_err(&other, err);
                        return false;
                    }
                }
            }
            true
        }
        Some(p) => match link(e, path, &p).await {
            Ok(()) => true,
            Err(err) => {
                e.record_slave_err(path, err);
                false
            }
        },
    }
}

async fn restore_dir_meta(e: &Engine, path: &RelPath) -> Result<(), crate::protocol::ProtoError> {
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    let full = e.master.path(&dir);
    let meta = tokio::task::spawn_blocking(move || {
        let md = std::fs::symlink_metadata(&full).ok()?;
        let x = crate::meta::read_xattrs(&full).ok()?;
        Some(crate::meta::Meta::from_metadata(&md, x))
    })
    .await
    .ok()
    .flatten();
    match meta {
        Some(meta) => e.slave.set_meta(dir, meta).await?.wait().await,
        None => Ok(()),
    }
}

async fn link(
    e: &Engine,
    path: &RelPath,
    target: &RelPath,
) -> Result<(), crate::protocol::ProtoError> {
    e.slave
        .link(path.clone(), target.clone())
        .await?
        .wait()
        .await?;
    e.stats.hardlinks.fetch_add(1, Ordering::Relaxed);
    Ok(())
}
