//! Publishing verified files in batches: one syncfs (or a few fsyncs) for
//! many files, then each renamed over its final name, then the directories
//! made durable.

use super::*;

impl Files {
    /// Whether enough commits wait that they should be published now.
    pub fn batch_full(&self) -> bool {
        self.pending.len() >= BATCH_FILES || self.pending_bytes >= BATCH_BYTES
    }

    /// Whether a pending commit's path satisfies `pred` (used to publish
    /// before an operation that depends on those paths).
    pub fn pending_matches(&self, pred: impl Fn(&RelPath) -> bool) -> bool {
        self.pending.iter().any(|p| pred(&p.path))
    }

    /// Publishes every pending commit: makes the data durable (one syncfs
    /// for a batch, an fsync for a few files), renames each over its final
    /// name, then makes the directories durable. Returns each commit's result.
    pub fn flush(&mut self, root: &Root) -> Vec<(u64, WResult<u64>)> {
        let batch = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        if batch.is_empty() {
            return Vec::new();
        }
        let mut results = Vec::with_capacity(batch.len());
        let data_sync: WResult<()> = if batch.len() >= SYNCFS_MIN {
            nix::unistd::syncfs(root.fd()).map_err(|e| errno_err(e, "syncfs", &"slave root"))
        } else {
            batch
                .iter()
                .try_for_each(|p| p.file.sync_all().map_err(|e| io_err(e, "fsync", &p.path)))
        };
        let mut dirs: Vec<(u64, u64, &OwnedFd)> = Vec::new();
        let mut renamed = Vec::new();
        for p in &batch {
            let res = data_sync.clone().and_then(|_| {
                rename_over(
                    p.dir.as_fd(),
                    OsStr::from_bytes(&p.tmp),
                    OsStr::from_bytes(&p.name),
                )
                .map_err(|e| errno_err(e, "publish", &p.path))
            });
            match res {
                Ok(()) => {
                    if let Ok(st) = nix::sys::stat::fstat(p.dir.as_fd()) {
                        if !dirs.iter().any(|d| d.0 == st.st_dev && d.1 == st.st_ino) {
                            dirs.push((st.st_dev, st.st_ino, &p.dir));
                        }
                    }
                    renamed.push(p);
                }
                Err(e) => {
                    p.discard_ref();
                    results.push((p.id, Err(e)));
                }
            }
        }
        let dir_sync: WResult<()> = if dirs.len() >= SYNCFS_MIN {
            nix::unistd::syncfs(root.fd()).map_err(|e| errno_err(e, "syncfs", &"slave root"))
        } else {
            dirs.iter().try_for_each(|d| {
                nix::unistd::fsync(d.2.as_fd())
                    .map_err(|e| errno_err(e, "fsync directory of", &"file"))
            })
        };
        for p in renamed {
            results.push((p.id, dir_sync.clone().map(|_| p.written)));
        }
        results
    }
}

impl Pending {
    pub(super) fn discard_ref(&self) {
        let _ = nix::unistd::unlinkat(
            self.dir.as_fd(),
            OsStr::from_bytes(&self.tmp),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }

    pub(super) fn discard(self) {
        self.discard_ref();
    }
}
