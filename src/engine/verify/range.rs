//! One range, once both sides hashed it: compare the hashes (segment by
//! segment when the agent stopped early), fetch the slave's items only
//! where they differ, sort each difference into a mismatch, a change not
//! replicated yet, or a change made during verification, and compare the
//! differing windows of a file block by block.

use super::compare::{self, block_ranges, Finding, What};
use super::walk::{Own, Planned};
use super::{Verifier, VerifyError};
use crate::fs::relpath::RelPath;
use crate::hash::blocktree;
use crate::hash::digest::WINDOW;
use crate::hash::stream::{self, Item};
use crate::protocol::{Hash16, ProtoError};
use std::cmp::Ordering;
use std::os::unix::fs::FileExt;

/// Windows of one file compared block by block at most; beyond, the
/// differing windows are reported whole.
const MAX_DESCEND: usize = 256;

impl Verifier {
    /// The slave's items of a range where they differ from the master's
    /// (the master's own where the hashes agree), and whether any differ.
    pub(super) async fn slave_items(
        &mut self,
        rid: u64,
        planned: &Planned,
        own: &[Item],
        mut reply: crate::engine::slave::RangeReply,
    ) -> Result<(bool, Vec<Item>), ProtoError> {
        let (rate, owners) = (self.rate, self.caps.owners);
        let (mut rid, mut req_from, mut from) = (rid, planned.from.clone(), planned.from.clone());
        let mut out = Vec::new();
        let mut differs = false;
        loop {
            let end = reply.stopped.clone().unwrap_or_else(|| planned.to.clone());
            if stream::cmp(&end, &from) != Ordering::Greater {
                return Err(ProtoError::Violation(format!(
                    "the agent stopped a range at {end}, not after its start {from}"
                )));
            }
            let mine: Vec<&Item> = own.iter().filter(|i| i.key().within(&from, &end)).collect();
            if stream::hash_items(mine.iter().copied()) == reply.hash {
                out.extend(mine.into_iter().cloned());
            } else {
                differs = true;
                let items = self
                    .slave
                    .verify_items(rid, req_from.clone(), planned.to.clone(), rate, owners)
                    .await?
                    .wait()
                    .await?;
                out.extend(items.into_iter().filter(|i| i.key().within(&from, &end)));
            }
            match reply.stopped.take() {
                None => return Ok((differs, out)),
                Some(s) => {
                    from = s.clone();
                    req_from = s;
                    rid = self.next_rid();
                    reply = self
                        .slave
                        .verify_range(rid, req_from.clone(), planned.to.clone(), rate, owners)
                        .await?
                        .wait()
                        .await?;
                }
            }
        }
    }

    /// Sorts the differences of a range into mismatches (compared block by
    /// block), changes not yet replicated and changes during verification.
    pub(super) async fn classify(
        &mut self,
        planned: &Planned,
        own: &Own,
        slave: &[Item],
    ) -> Result<(), VerifyError> {
        let mut found = Vec::new();
        compare::diff(&own.items, slave, &mut self.fold, &mut found);
        for (top, n) in self.fold.carried() {
            if let Some(f) = self.findings.iter_mut().rev().find(|f| f.path == top) {
                f.below += n;
            }
        }
        for mut f in found {
            // The later windows of a file cut over ranges follow its first part:
            // changed or pending already, or covered by its missing or type finding.
            let windows_only = f.what == What::Content && f.master_size.is_none();
            if windows_only && self.last_counted.as_ref() == Some(&f.path) {
                continue;
            }
            let covered = self
                .findings
                .iter()
                .rev()
                .take_while(|x| x.path == f.path)
                .any(|x| matches!(x.what, What::Missing | What::Type | What::Extra));
            if windows_only && covered {
                continue;
            }
            let earlier = self
                .findings
                .iter()
                .rposition(|x| x.path == f.path && matches!(x.what, What::Content | What::Size));
            if own.changed.contains(&f.path) {
                self.changed(f.path);
                continue;
            }
            if own.failures.iter().any(|(p, _)| p == &f.path) {
                continue;
            }
            let dir = f.path.parent().unwrap_or_default();
            // Changed (or, for an extra entry, removed from its directory)
            // on the master since this verification started.
            let probe = if f.what == What::Extra { &dir } else { &f.path };
            if self.changed_since_start(probe).await {
                self.changed(f.path);
                continue;
            }
            if self.dir_pending(&dir).await {
                self.pending(f.path);
                continue;
            }
            let size = planned
                .entries
                .iter()
                .find(|e| e.path == f.path)
                .map(|e| e.entry.size);
            // The later windows of a file cut over ranges join its finding.
            if let (Some(i), true) = (earlier, windows_only) {
                if let (Some(m), Some(s)) =
                    (self.findings[i].master_size, self.findings[i].slave_size)
                {
                    // Beyond the shorter side, the size difference covers it.
                    f.windows.retain(|&k| k * WINDOW < m.min(s));
                }
                if !f.windows.is_empty() && !self.descend(&mut f, size).await? {
                    continue;
                }
                let x = &mut self.findings[i];
                x.ranges.extend(f.ranges);
                x.ranges = compare::merge(std::mem::take(&mut x.ranges));
                continue;
            }
            if matches!(f.what, What::Content | What::Size) && !f.windows.is_empty() {
                match self.descend(&mut f, size).await? {
                    true => {}
                    false => {
                        self.changed(f.path);
                        continue;
                    }
                }
            }
            self.mismatch(f);
        }
        Ok(())
    }

    /// Whether a master entry changed (its ctime moved) since the run started.
    async fn changed_since_start(&self, p: &RelPath) -> bool {
        use std::os::unix::fs::MetadataExt;
        let (path, since) = (self.master.path(p), self.started_ns);
        tokio::task::spawn_blocking(move || match std::fs::symlink_metadata(&path) {
            Ok(md) => {
                let ctime =
                    md.ctime().max(0) as u64 * 1_000_000_000 + md.ctime_nsec().max(0) as u64;
                ctime >= since
            }
            Err(_) => false,
        })
        .await
        .unwrap_or(false)
    }

    /// Whether a master directory holds changes its stime does not cover
    /// yet (they are on their way to the slave), or vanished.
    async fn dir_pending(&self, dir: &RelPath) -> bool {
        let (m, d) = (self.master.clone(), dir.clone());
        tokio::task::spawn_blocking(move || match (m.xtime(&d), m.stime(&d)) {
            (Ok(x), Ok(s)) => x > s,
            _ => true,
        })
        .await
        .unwrap_or(true)
    }

    /// Compares a file's differing windows block by block; the finding's
    /// ranges become those of the differing blocks. False when no block
    /// differs any more (the file changed between the two reads).
    async fn descend(
        &mut self,
        f: &mut Finding,
        master_size: Option<u64>,
    ) -> Result<bool, VerifyError> {
        let msize = match master_size.or(f.master_size) {
            Some(s) => s,
            None => {
                let (m, p) = (self.master.clone(), f.path.clone());
                match tokio::task::spawn_blocking(move || m.stat(&p)).await {
                    Ok(Ok(e)) => e.entry.size,
                    _ => return Ok(false),
                }
            }
        };
        let size = msize.max(f.slave_size.unwrap_or(0));
        let mut ranges = Vec::new();
        for (n, &k) in f.windows.iter().enumerate() {
            let off = k * WINDOW;
            if n >= MAX_DESCEND {
                ranges.push((off, (off + WINDOW).min(size)));
                continue;
            }
            let remote = self
                .slave
                .verify_blocks(f.path.clone(), off, WINDOW, self.rate)
                .await
                .map_err(VerifyError::Slave)?;
            let local = self.master_keys(&f.path, off, msize);
            let remote = match remote.wait().await {
                Ok(r) => r,
                Err(ProtoError::Remote(e)) if e.kind == crate::protocol::ErrorKind::NotFound => {
                    return Ok(false)
                }
                Err(e) => return Err(VerifyError::Slave(e)),
            };
            let Some(local) = local.await else {
                return Ok(false);
            };
            self.counts.master_bytes_read += WINDOW.min(msize.saturating_sub(off));
            ranges.extend(block_ranges(off, size, &local, &remote));
        }
        if let (Some(m), Some(s)) = (f.master_size, f.slave_size) {
            if m != s {
                ranges.push((m.min(s), m.max(s)));
            }
        }
        f.ranges = compare::merge(ranges);
        Ok(!f.ranges.is_empty())
    }

    /// Block hashes of one window of a master file (None if it cannot be read).
    fn master_keys(
        &self,
        path: &RelPath,
        off: u64,
        size: u64,
    ) -> impl std::future::Future<Output = Option<Vec<Hash16>>> {
        let (p, throttle, stop) = (
            self.master.path(path),
            self.throttle.clone(),
            self.stop.clone(),
        );
        let len = WINDOW.min(size.saturating_sub(off));
        async move {
            tokio::task::spawn_blocking(move || {
                if !throttle.take(len, &stop) {
                    return None;
                }
                let file = std::fs::File::open(&p).ok()?;
                let mut buf = vec![0u8; len as usize];
                file.read_exact_at(&mut buf, off).ok()?;
                let mut cvs = Vec::new();
                blocktree::block_cvs(0, &buf, &mut cvs);
                Some(cvs.iter().map(blocktree::key).collect())
            })
            .await
            .ok()
            .flatten()
        }
    }

    fn changed(&mut self, p: RelPath) {
        // A path's findings come together: it is counted once.
        if self.last_counted.as_ref() == Some(&p) {
            return;
        }
        self.last_counted = Some(p.clone());
        if self.changed.len() < super::MAX_LISTED {
            self.changed.push(p);
        }
        self.counts.changed += 1;
    }

    fn pending(&mut self, p: RelPath) {
        if self.last_counted.as_ref() == Some(&p) {
            return;
        }
        self.last_counted = Some(p.clone());
        if self.pending.len() < super::MAX_LISTED {
            self.pending.push(p);
        }
        self.counts.pending += 1;
    }

    fn mismatch(&mut self, f: Finding) {
        if self.findings.len() < super::MAX_LISTED {
            self.findings.push(f);
        }
        self.counts.mismatches += 1;
    }
}
