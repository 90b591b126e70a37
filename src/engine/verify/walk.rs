//! The master's side of verification: cutting its stream into ranges
//! from a metadata walk (so each range can be sent to the agent before
//! the master reads it), then hashing a range's content, noting the files
//! that changed while they were read.

use super::cache::{Stamp, WindowCache};
use crate::engine::master::{reserved, MEntry, Master, MasterError};
use crate::fs::meta::{Entry, Kind};
use crate::fs::relpath::RelPath;
use crate::fs::throttle::Throttle;
use crate::hash::stream::{self, window_pos, Item, Key, Tree, Walk, HEADER};
use std::cmp::Ordering;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// How much one range holds at most.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub entries: u64,
    pub bytes: u64,
    pub item_bytes: usize,
}

/// The master tree as the walk reads it: replicated entries only.
pub struct MasterTree {
    pub master: Arc<Master>,
}

impl Tree for MasterTree {
    type Entry = MEntry;
    type Error = MasterError;
    fn list(&mut self, dir: &RelPath) -> Result<Vec<MEntry>, MasterError> {
        match self.master.list(dir) {
            Ok(l) => {
                // An entry the master cannot read cannot be verified: the
                // directory fails rather than its slave copy looking extra.
                if let Some((_, e)) = l.unreadable.into_iter().next() {
                    return Err(e);
                }
                let mut v = l.entries;
                v.retain(|m| m.entry.kind != Kind::Other && !reserved(dir, &m.entry.name));
                Ok(v)
            }
            Err(e) if e.vanished() => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }
    fn root(&mut self) -> Result<MEntry, MasterError> {
        self.master.stat(&RelPath::root())
    }
    fn entry(e: &MEntry) -> &Entry {
        &e.entry
    }
}

/// One entry of a planned range: its item, and which of its windows.
#[derive(Debug, Clone)]
pub struct PlanEntry {
    pub path: RelPath,
    pub entry: Entry,
    /// Whether the entry's own item is in the range (not for the later
    /// parts of a file cut over several ranges).
    pub header: bool,
    /// Windows `[first, end)` in the range.
    pub windows: (u64, u64),
}

/// A range `(from, to]` of the master's stream, not read yet.
#[derive(Debug, Clone)]
pub struct Planned {
    pub from: Key,
    pub to: Key,
    pub entries: Vec<PlanEntry>,
    pub bytes: u64,
}

/// Cuts the master's stream into ranges, from `start` to `end`.
pub struct Planner {
    tree: MasterTree,
    walk: Walk<MEntry>,
    start: Key,
    end: Key,
    /// The next range starts after this key.
    from: Key,
    /// An entry the walk gave that did not fit in the previous range.
    held: Option<(RelPath, Entry)>,
    /// A file whose windows go on from this one.
    file: Option<(RelPath, Entry, u64)>,
    done: bool,
}

impl Planner {
    pub fn new(master: Arc<Master>, start: Key, end: Key) -> Planner {
        Planner {
            tree: MasterTree { master },
            walk: Walk::new(start.clone()),
            from: start.clone(),
            start,
            end,
            held: None,
            file: None,
            done: false,
        }
    }

    /// The next range, or None after the last (which always ends at `end`).
    pub fn next(&mut self, b: &Budget) -> Result<Option<Planned>, MasterError> {
        if self.done {
            return Ok(None);
        }
        let mut out = Planned {
            from: self.from.clone(),
            to: self.from.clone(),
            entries: Vec::new(),
            bytes: 0,
        };
        let mut item_bytes = 0usize;
        loop {
            if let Some((path, entry, first)) = self.file.take() {
                let n = stream::windows(entry.size);
                let mut k = first;
                while k < n {
                    let len = stream::window_range(entry.size, k).1;
                    let something = out.bytes > 0 || !out.entries.is_empty();
                    if something && out.bytes + len > b.bytes {
                        break;
                    }
                    out.bytes += len;
                    k += 1;
                }
                if k > first {
                    match out.entries.last_mut() {
                        Some(last) if last.path == path => last.windows = (first, k),
                        _ => out.entries.push(PlanEntry {
                            path: path.clone(),
                            entry: entry.clone(),
                            header: false,
                            windows: (first, k),
                        }),
                    }
                    out.to = Key::new(path.clone(), window_pos(k - 1));
                }
                if k < n {
                    self.file = Some((path, entry, k));
                    self.from = out.to.clone();
                    return Ok(Some(out));
                }
                continue;
            }
            let next = match self.held.take() {
                Some(x) => Some(x),
                None => self
                    .walk
                    .next(&mut self.tree)?
                    .map(|(p, m)| (p, m.entry.clone())),
            };
            let Some((path, entry)) = next else {
                return Ok(Some(self.last(out)));
            };
            let header = Key::new(path.clone(), HEADER);
            if stream::cmp(&header, &self.end) == Ordering::Greater {
                return Ok(Some(self.last(out)));
            }
            if stream::cmp(&header, &self.start) != Ordering::Greater {
                // An ancestor of the start, or the file the start lies in.
                if entry.kind == Kind::File && path == self.start.path && self.start.pos >= 2 {
                    let first = self.start.pos - 1;
                    self.file = Some((path, entry, first));
                }
                continue;
            }
            let item = Item::entry(path.clone(), &entry, true);
            let ib = item.encoded_len();
            let full = out.entries.len() as u64 >= b.entries
                || item_bytes + ib > b.item_bytes
                || out.bytes >= b.bytes;
            if full && !out.entries.is_empty() {
                self.held = Some((path, entry));
                self.from = out.to.clone();
                return Ok(Some(out));
            }
            item_bytes += ib;
            out.to = header;
            let file = entry.kind == Kind::File && entry.size > 0;
            out.entries.push(PlanEntry {
                path: path.clone(),
                entry: entry.clone(),
                header: true,
                windows: (0, 0),
            });
            if file {
                self.file = Some((path, entry, 0));
            }
        }
    }

    fn last(&mut self, mut out: Planned) -> Planned {
        self.done = true;
        out.to = self.end.clone();
        out
    }
}

/// What the master's side of a range holds.
#[derive(Debug, Default)]
pub struct Own {
    pub items: Vec<Item>,
    /// Files that changed or vanished while read: "changed, verify later".
    pub changed: Vec<RelPath>,
    /// Files that could not be read, with why.
    pub failures: Vec<(RelPath, String)>,
    pub bytes: u64,
    /// Of `bytes`: read from the master's files, and taken from the cache.
    pub read: u64,
    pub cached: u64,
}

/// Hashes the master's side of a planned range (blocking), taking the
/// windows of files that did not change from `cache` (and keeping there
/// those it read).
pub fn hash_own(
    master: &Master,
    planned: &Planned,
    owners: bool,
    throttle: &Throttle,
    stop: &AtomicBool,
    cache: Option<&WindowCache>,
) -> Own {
    let mut own = Own::default();
    let mut buf = Vec::new();
    for pe in &planned.entries {
        if pe.header {
            own.items
                .push(Item::entry(pe.path.clone(), &pe.entry, owners));
        }
        let (first, end) = pe.windows;
        if first >= end {
            continue;
        }
        let p = master.path(&pe.path);
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
        {
            Ok(f) => f,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::ELOOP | libc::ENOTDIR)
                ) =>
            {
                own.changed.push(pe.path.clone());
                continue;
            }
            Err(e) => {
                own.failures
                    .push((pe.path.clone(), format!("open {}: {e}", p.display())));
                continue;
            }
        };
        let before = match file.metadata() {
            Ok(md) => md,
            Err(e) => {
                own.failures
                    .push((pe.path.clone(), format!("stat {}: {e}", p.display())));
                continue;
            }
        };
        let listed = (pe.entry.size, pe.entry.meta.mtime, pe.entry.ino);
        let now = (
            before.len(),
            crate::fs::meta::Timestamp {
                sec: before.mtime(),
                nsec: before.mtime_nsec() as u32,
            },
            before.ino(),
        );
        let mut changed = listed != now;
        let stamp = Stamp::of(&before);
        let hashed_ns = crate::fs::xtime::now_ns();
        let kept = match cache {
            Some(c) if !changed => c.lookup(&pe.path, &stamp, first, end),
            _ => None,
        };
        let mut fresh = Vec::new();
        let todo = if kept.is_some() { end..end } else { first..end };
        if let Some(kept) = kept {
            for (k, hash) in (first..end).zip(kept) {
                let len = stream::window_range(pe.entry.size, k).1;
                own.items.push(Item::Window {
                    path: pe.path.clone(),
                    index: k,
                    hash,
                });
                own.bytes += len;
                own.cached += len;
            }
        }
        for k in todo {
            let (off, len) = stream::window_range(pe.entry.size, k);
            if !throttle.take(len, stop) {
                return own;
            }
            match stream::window_hash(&file, off, len, &mut buf) {
                Ok(hash) => {
                    fresh.push(hash);
                    own.items.push(Item::Window {
                        path: pe.path.clone(),
                        index: k,
                        hash,
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    changed = true;
                    break;
                }
                Err(e) => {
                    own.failures
                        .push((pe.path.clone(), format!("read {}: {e}", p.display())));
                    break;
                }
            }
            own.bytes += len;
            own.read += len;
        }
        match file.metadata() {
            // What identifies a file's state (size, times, inode, device):
            // if any of it moved, it changed (and cached hashes do not apply).
            Ok(after) if Stamp::of(&after) == stamp => {}
            _ => changed = true,
        }
        if changed {
            own.changed.push(pe.path.clone());
        } else if let (Some(c), false) = (cache, fresh.is_empty()) {
            // Every window read, the file unchanged throughout.
            if fresh.len() as u64 == end - first {
                c.store(&pe.path, &stamp, hashed_ns, first, &fresh);
            }
        }
    }
    own
}

/// The bytes of content in the master's tree (a metadata walk): what a
/// full pass verifies, for the scrub's coverage.
pub fn tree_bytes(master: Arc<Master>) -> Result<u64, MasterError> {
    let mut tree = MasterTree { master };
    let mut walk: Walk<MEntry> = Walk::new(Key::before(&RelPath::root()));
    let mut total = 0;
    while let Some((_, m)) = walk.next(&mut tree)? {
        if m.entry.kind == Kind::File {
            total += m.entry.size;
        }
    }
    Ok(total)
}
