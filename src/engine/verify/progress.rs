//! A verification's progress on disk, so that it resumes where it stopped
//! (a lost slave, `--max-duration`, a restart): `verify.json` for
//! `georep verify`, the current pass of `scrub.json` for the scrub.

use super::{Counts, Cursor, Finding, Verifier};
use crate::fs::relpath::RelPath;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Where a verification got to and what it found so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// When it started (ns since the epoch).
    pub started_ns: u64,
    /// The subtrees verified (empty: the whole tree).
    pub scope: Vec<RelPath>,
    /// None once complete.
    pub cursor: Option<Cursor>,
    pub counts: Counts,
    pub findings: Vec<Finding>,
    pub changed: Vec<RelPath>,
    pub pending: Vec<RelPath>,
    pub failures: Vec<(RelPath, String)>,
    /// When it completed (ns since the epoch).
    #[serde(default)]
    pub finished_ns: Option<u64>,
}

impl Progress {
    pub fn new(started_ns: u64, scope: Vec<RelPath>) -> Progress {
        Progress {
            started_ns,
            scope,
            ..Progress::default()
        }
    }

    /// Reads a progress file; None if there is none or it cannot be read.
    pub fn load(path: &Path) -> Option<Progress> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        georep_monitor::write_atomic_volatile(
            path,
            &serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )
    }

    /// Whether it stopped before its end (and so can be resumed).
    pub fn resumable(&self) -> bool {
        self.cursor.is_some() && self.finished_ns.is_none()
    }

    /// Takes what the verifier has found so far.
    pub fn record(&mut self, v: &Verifier) {
        self.cursor = v.cursor.clone();
        self.counts = v.counts.clone();
        self.findings = v.findings.clone();
        self.changed = v.changed.clone();
        self.pending = v.pending.clone();
        self.failures = v.failures.clone();
    }

    /// Gives a new verifier what was found before it, to go on from the cursor.
    pub fn restore(&self, v: &mut Verifier) {
        v.cursor = self.cursor.clone();
        v.counts = self.counts.clone();
        v.findings = self.findings.clone();
        v.changed = self.changed.clone();
        v.pending = self.pending.clone();
        v.failures = self.failures.clone();
    }
}
