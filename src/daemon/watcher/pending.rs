//! Changes the watcher saw that no complete crawl has covered yet, by
//! kind, counted as distinct paths (status's `entry`, `data`, `meta`).

use std::collections::HashSet;
use std::path::PathBuf;

/// What kind of change an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Created, deleted or renamed.
    Entry = 0,
    /// File content written.
    Data = 1,
    /// Mode, owner, mtime, xattrs.
    Meta = 2,
}

/// Distinct paths kept per kind before only counting.
const CAP: usize = 100_000;

#[derive(Debug, Default)]
struct Set {
    paths: HashSet<PathBuf>,
    /// Changes beyond CAP, counted without their paths.
    extra: u64,
}

impl Set {
    fn add(&mut self, p: PathBuf) {
        if self.paths.len() < CAP || self.paths.contains(&p) {
            self.paths.insert(p);
        } else {
            self.extra += 1;
        }
    }
    fn len(&self) -> u64 {
        self.paths.len() as u64 + self.extra
    }
    fn absorb(&mut self, other: Set) {
        for p in other.paths {
            self.add(p);
        }
        self.extra += other.extra;
    }
}

/// New changes, and those taken by the crawl in progress.
#[derive(Debug, Default)]
pub struct Pending {
    new: [Set; 3],
    in_flight: [Set; 3],
}

impl Pending {
    pub fn add(&mut self, kind: ChangeKind, path: PathBuf) {
        self.new[kind as usize].add(path);
    }

    /// A crawl starts: it covers everything marked so far.
    pub fn begin_crawl(&mut self) {
        for (f, n) in self.in_flight.iter_mut().zip(self.new.iter_mut()) {
            f.absorb(std::mem::take(n));
        }
    }

    /// The crawl ended: complete, its changes are on the slave; else they stay pending.
    pub fn end_crawl(&mut self, complete: bool) {
        for (f, n) in self.in_flight.iter_mut().zip(self.new.iter_mut()) {
            let f = std::mem::take(f);
            if !complete {
                n.absorb(f);
            }
        }
    }

    /// (entry, data, meta), distinct paths in each (a path counted once per kind).
    pub fn counts(&self) -> (u64, u64, u64) {
        let c = |i: usize| {
            let mut s: HashSet<&PathBuf> = self.new[i].paths.iter().collect();
            s.extend(self.in_flight[i].paths.iter());
            s.len() as u64 + self.new[i].extra + self.in_flight[i].extra
        };
        (c(0), c(1), c(2))
    }

    pub fn is_empty(&self) -> bool {
        self.new.iter().chain(&self.in_flight).all(|s| s.len() == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_complete_crawl_clears_what_it_took_and_a_failed_one_keeps_it() {
        let mut p = Pending::default();
        p.add(ChangeKind::Data, "a".into());
        p.add(ChangeKind::Data, "a".into());
        p.add(ChangeKind::Entry, "b".into());
        assert_eq!(p.counts(), (1, 1, 0));
        p.begin_crawl();
        p.add(ChangeKind::Meta, "c".into());
        p.add(ChangeKind::Data, "a".into());
        assert_eq!(p.counts(), (1, 1, 1));
        p.end_crawl(false);
        assert_eq!(p.counts(), (1, 1, 1));
        p.begin_crawl();
        p.add(ChangeKind::Data, "d".into());
        p.end_crawl(true);
        assert_eq!(p.counts(), (0, 1, 0));
        assert!(!p.is_empty());
    }
}
