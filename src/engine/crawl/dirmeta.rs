//! A visited directory's last steps: its metadata, once its children are
//! on the slave, and its new stime, queued until the slave is durable.

use super::{blocking, SlaveDir, STIME_BATCH};
use crate::engine::context::Engine;
use crate::fs::meta::Meta;
use crate::fs::relpath::RelPath;
use crate::protocol::ProtoError;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Engine {
    /// Gives the slave directory the master's metadata when it differs
    /// (or `dirty`: its entries changed, which moved its mtime). The
    /// metadata is read now, not from the parent's listing: that was read
    /// before this directory's xtime, so a change in between (an entry
    /// made and marked) would leave a stale mtime under the new stime.
    /// None: the directory vanished from the master.
    pub(super) async fn dir_meta(
        self: &Arc<Self>,
        dir: &RelPath,
        slave: &SlaveDir,
        dirty: bool,
    ) -> Option<bool> {
        let meta = {
            let e = self.clone();
            let d = dir.clone();
            match blocking(move || e.master.stat(&d)).await {
                Ok(m) => m.entry.meta,
                Err(e) if e.vanished() && !dir.is_root() => return None,
                Err(e) => {
                    self.fail(dir, e);
                    return Some(false);
                }
            }
        };
        let slave_meta = match slave {
            SlaveDir::Existing(Some(s)) => Some(&s.meta),
            SlaveDir::Known => Some(&meta),
            _ => None,
        };
        if dirty || slave_meta != Some(&meta) {
            if let Err(e) = self.set_meta_wait(dir, meta).await {
                self.slave_err(dir, e);
                return Some(false);
            }
        }
        Some(true)
    }

    /// Queues the directory's new stime (written once the slave is durable,
    /// in batches); false if flushing a full batch failed.
    pub(super) async fn queue_stime(&self, dir: &RelPath, xtl: u64, stime: u64) -> bool {
        let full = {
            let mut q = self.stimes.lock().unwrap();
            if xtl > stime {
                q.push((dir.clone(), xtl));
            }
            q.len() >= STIME_BATCH || self.digests.lock().unwrap().len() >= STIME_BATCH
        };
        if full {
            if let Err(e) = self.flush_stimes(false).await {
                self.set_fatal(e);
                return false;
            }
        }
        true
    }

    pub(super) async fn set_meta_wait(&self, path: &RelPath, meta: Meta) -> Result<(), ProtoError> {
        self.slave
            .set_meta(path.clone(), meta)
            .await?
            .wait()
            .await?;
        self.stats.meta_updates.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
