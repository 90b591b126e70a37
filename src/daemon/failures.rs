//! Failures across crawls: which entries keep failing. An entry that fails
//! in every crawl (a slave directory made immutable, a file the master
//! cannot read) must not leave the session looking healthy: after
//! `persistent_failure_crawls` complete crawls in a row it is a persistent
//! failure, reported in status, Prometheus and Nagios and announced by the
//! `persistent_failures` event. Pure: fed the distinct failing entries of
//! each crawl that ran to its end.

use crate::engine::context::Failure;
use georep_monitor::status::FailingEntry;
use std::collections::HashMap;

/// Persistent failures listed in status (the count covers them all).
pub const LISTED: usize = 20;

#[derive(Debug)]
pub struct Tracker {
    /// Crawls in a row an entry must fail in to be persistent.
    threshold: u32,
    /// Entries that failed in the latest crawl: crawls in a row, last error.
    streak: HashMap<String, (u32, String)>,
    /// Entries that started failing, over this tracker's life.
    started: u64,
}

impl Tracker {
    pub fn new(threshold: u32) -> Tracker {
        Tracker {
            threshold: threshold.max(1),
            streak: HashMap::new(),
            started: 0,
        }
    }

    /// Takes the distinct failing entries of one crawl that ran to its end;
    /// returns how many of them started failing in it (were not failing before).
    pub fn crawl(&mut self, failed: &[Failure]) -> u64 {
        let mut next = HashMap::with_capacity(failed.len());
        let mut new = 0;
        for f in failed {
            let n = match self.streak.get(&f.path) {
                Some((n, _)) => n + 1,
                None => {
                    new += 1;
                    1
                }
            };
            next.insert(f.path.clone(), (n, f.error.clone()));
        }
        self.streak = next;
        self.started += new;
        new
    }

    /// Distinct entries failing in the latest crawl.
    pub fn failing(&self) -> u64 {
        self.streak.len() as u64
    }

    /// Entries that started failing, cumulative.
    pub fn started(&self) -> u64 {
        self.started
    }

    /// Entries failing for at least `threshold` crawls in a row.
    pub fn persistent(&self) -> u64 {
        self.streak
            .values()
            .filter(|(n, _)| *n >= self.threshold)
            .count() as u64
    }

    /// The first [`LISTED`] persistent failures, longest-failing first, then by path.
    pub fn persistent_entries(&self) -> Vec<FailingEntry> {
        let mut v: Vec<FailingEntry> = self
            .streak
            .iter()
            .filter(|(_, (n, _))| *n >= self.threshold)
            .map(|(p, (n, e))| FailingEntry {
                path: p.clone(),
                error: e.clone(),
                crawls: *n,
            })
            .collect();
        v.sort_by(|a, b| b.crawls.cmp(&a.crawls).then_with(|| a.path.cmp(&b.path)));
        v.truncate(LISTED);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(paths: &[&str]) -> Vec<Failure> {
        paths
            .iter()
            .map(|p| Failure {
                path: p.to_string(),
                error: format!("{p}: denied"),
            })
            .collect()
    }

    #[test]
    fn an_entry_failing_crawl_after_crawl_counts_once_and_turns_persistent() {
        let mut t = Tracker::new(3);
        assert_eq!(t.crawl(&f(&["a", "b"])), 2);
        assert_eq!(t.crawl(&f(&["a", "b"])), 0, "retries are not new failures");
        assert_eq!(t.persistent(), 0);
        assert_eq!(t.crawl(&f(&["a"])), 0);
        assert_eq!((t.failing(), t.persistent(), t.started()), (1, 1, 2));
        let e = t.persistent_entries();
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].path.as_str(), e[0].crawls), ("a", 3));
        // b failed again after a success: a new failure, its streak restarts.
        assert_eq!(t.crawl(&f(&["a", "b"])), 1);
        assert_eq!(t.started(), 3);
        assert_eq!(t.persistent_entries()[0].crawls, 4);
        // Fixed: nothing failing, nothing persistent.
        assert_eq!(t.crawl(&[]), 0);
        assert_eq!((t.failing(), t.persistent()), (0, 0));
    }
}
