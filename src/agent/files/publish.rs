//! Publishing verified files in batches: one syncfs (or a few fsyncs) for
//! many files, then each renamed over its final name, then the directories
//! made durable.
//!
//! Batches the agent's loop hands over while it goes on reading are
//! published by a publisher thread (group commit): the loop keeps writing
//! the next files' temporaries while one batch is being made durable, and
//! the batch grows as long as a sync takes. At most one batch is in the
//! publisher at a time; every request that depends on a path being
//! published, and every barrier, first waits for it (`Files::flush`), so a
//! commit is still answered only once its file is durable under its name.

use super::*;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Set once a syncfs failed in this agent. A writeback error is reported
/// once per open file description, to whichever syncfs comes first: the
/// batch that saw it may not be the one whose pages failed (the loop goes
/// on writing the next batch meanwhile). From then on every file is made
/// durable by its own fsync, which reports the errors of its own pages
/// (its descriptor was opened before them).
static SYNCFS_FAILED: AtomicBool = AtomicBool::new(false);

fn syncfs(fs: BorrowedFd<'_>) -> WResult<()> {
    nix::unistd::syncfs(fs).map_err(|e| {
        SYNCFS_FAILED.store(true, Ordering::SeqCst);
        errno_err(e, "syncfs", &"slave root")
    })
}

/// Whether `n` files (or directories) go by one syncfs rather than an fsync each.
fn by_syncfs(n: usize) -> bool {
    n >= SYNCFS_MIN && !SYNCFS_FAILED.load(Ordering::SeqCst)
}

/// How a published commit is answered (from the publisher's thread).
pub type Answer = Box<dyn Fn(u64, WResult<u64>) + Send + 'static>;

/// The paths and temporaries of the batch being published (empty: idle).
#[derive(Default)]
struct InFlight {
    items: Vec<(RelPath, Vec<u8>)>,
    /// The commits of the batch (answered with an error if the thread dies).
    ids: Vec<u64>,
    busy: bool,
    /// The thread ended (it panicked): nothing is handed over any more.
    dead: bool,
}

/// If the publisher's thread unwinds: fails the commits of the batch it
/// held (the worker sends those files again) and marks the publisher idle
/// and dead, so that no one waits for it forever and later batches are
/// published on the agent's loop.
struct DeathGuard(Arc<(Mutex<InFlight>, Condvar)>, std::rc::Rc<Answer>);

impl Drop for DeathGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let (m, cv) = &*self.0;
            let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
            for id in std::mem::take(&mut g.ids) {
                (self.1)(
                    id,
                    Err(WireError::new(
                        ErrorKind::Io,
                        "the agent's publisher thread failed: the file is not published",
                    )),
                );
            }
            g.items.clear();
            g.busy = false;
            g.dead = true;
            cv.notify_all();
        }
    }
}

/// The publisher thread and the batch it holds.
pub struct Publisher {
    tx: Option<std::sync::mpsc::Sender<Vec<Pending>>>,
    state: Arc<(Mutex<InFlight>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Publisher {
    /// Starts the thread; `fs` is a descriptor on the slave root's file
    /// system (for syncfs), `answer` replies to each commit.
    fn start(fs: OwnedFd, answer: Answer) -> std::io::Result<Publisher> {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<Pending>>();
        let state: Arc<(Mutex<InFlight>, Condvar)> = Arc::default();
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("publish".into())
            .spawn(move || {
                let answer = std::rc::Rc::new(answer);
                let _guard = DeathGuard(st.clone(), answer.clone());
                for batch in rx {
                    let results = publish(batch, fs.as_fd());
                    let (m, cv) = &*st;
                    let mut g = m.lock().unwrap();
                    g.ids.clear();
                    drop(g);
                    for (id, res) in results {
                        answer(id, res);
                    }
                    let mut g = m.lock().unwrap();
                    g.items.clear();
                    g.busy = false;
                    cv.notify_all();
                }
            })?;
        Ok(Publisher {
            tx: Some(tx),
            state,
            thread: Some(thread),
        })
    }

    /// Waits until no batch is being published.
    fn wait_idle(&self) {
        let (m, cv) = &*self.state;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        while g.busy {
            g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn matches(&self, pred: &dyn Fn(&RelPath) -> bool) -> bool {
        let g = self.state.0.lock().unwrap();
        g.busy && g.items.iter().any(|(p, _)| pred(p))
    }

    fn holds_tmp(&self, tmp: &[u8]) -> bool {
        let g = self.state.0.lock().unwrap();
        g.busy && g.items.iter().any(|(_, t)| t == tmp)
    }

    /// Hands `batch` over (the publisher is idle).
    fn hand_over(&self, batch: Vec<Pending>) -> Result<(), Vec<Pending>> {
        {
            let mut g = self.state.0.lock().unwrap();
            if g.dead {
                return Err(batch);
            }
            g.items = batch
                .iter()
                .map(|p| (p.path.clone(), p.tmp.clone()))
                .collect();
            g.ids = batch.iter().map(|p| p.id).collect();
            g.busy = true;
        }
        let tx = self.tx.as_ref().expect("open until dropped");
        tx.send(batch).map_err(|e| {
            let mut g = self.state.0.lock().unwrap();
            g.items.clear();
            g.ids.clear();
            g.busy = false;
            e.0
        })
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Files {
    /// Whether enough commits wait that they should be published now.
    pub fn batch_full(&self) -> bool {
        self.pending.len() >= BATCH_FILES || self.pending_bytes >= BATCH_BYTES
    }

    /// Whether a pending commit's path, or one being published, satisfies
    /// `pred` (used to publish before an operation that depends on those paths).
    pub fn pending_matches(&self, pred: impl Fn(&RelPath) -> bool) -> bool {
        self.pending.iter().any(|p| pred(&p.path))
            || self.publisher.as_ref().is_some_and(|p| p.matches(&pred))
    }

    /// Whether the temporary `tmp` is a commit being published.
    pub(super) fn publishing(&self, tmp: &[u8]) -> bool {
        self.publisher.as_ref().is_some_and(|p| p.holds_tmp(tmp))
    }

    /// Publishes later batches on a thread of their own (see the module's
    /// doc); without it (or if it cannot start) every batch is published
    /// by [`flush`](Self::flush) on the caller's thread.
    pub fn start_publisher(&mut self, root: &Root, answer: Answer) {
        // A description of its own (not a dup of the root's): the errors a
        // syncfs reports are tracked per open file description, so no other
        // syncfs of the agent can take one the publisher must see.
        let own = nix::fcntl::openat(
            root.fd(),
            ".",
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(std::io::Error::from);
        match own.and_then(|fd| Publisher::start(fd, answer)) {
            Ok(p) => self.publisher = Some(p),
            Err(e) => tracing::warn!(error = %e, "no publisher thread: batches published inline"),
        }
    }

    /// Hands the pending commits to the publisher thread, once it is done
    /// with the batch before (waiting for it). Returns the commits to
    /// answer now: all of them, published here, when there is no publisher.
    /// Without `wait`, nothing is handed over while the publisher is busy.
    pub fn publish_behind(&mut self, root: &Root, wait: bool) -> Vec<(u64, WResult<u64>)> {
        if self.pending.is_empty() {
            return Vec::new();
        }
        let Some(p) = &self.publisher else {
            return self.flush(root);
        };
        if !wait && p.state.0.lock().unwrap().busy {
            return Vec::new();
        }
        p.wait_idle();
        let batch = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        self.pending_since = None;
        match p.hand_over(batch) {
            Ok(()) => Vec::new(),
            Err(batch) => publish(batch, root.fd()),
        }
    }

    /// Publishes every commit: waits for the batch being published, then
    /// publishes the pending ones here. Returns each pending commit's result.
    pub fn flush(&mut self, root: &Root) -> Vec<(u64, WResult<u64>)> {
        if let Some(p) = &self.publisher {
            p.wait_idle();
        }
        let batch = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        self.pending_since = None;
        publish(batch, root.fd())
    }

    /// Whether commits wait to be published.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether the oldest waiting commit has waited `d` or longer.
    pub fn pending_for(&self, d: std::time::Duration) -> bool {
        self.pending_since.is_some_and(|t| t.elapsed() >= d)
    }
}

/// Makes `batch` durable (one syncfs of `fs`'s file system for a batch, an
/// fsync for a few files), renames each over its final name, then makes the
/// directories durable. Returns each commit's result.
fn publish(batch: Vec<Pending>, fs: BorrowedFd<'_>) -> Vec<(u64, WResult<u64>)> {
    if batch.is_empty() {
        return Vec::new();
    }
    let mut results = Vec::with_capacity(batch.len());
    let data_sync: WResult<()> = if by_syncfs(batch.len()) {
        syncfs(fs)
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
    let dir_sync: WResult<()> = if by_syncfs(dirs.len()) {
        syncfs(fs)
    } else {
        dirs.iter().try_for_each(|d| {
            nix::unistd::fsync(d.2.as_fd()).map_err(|e| errno_err(e, "fsync directory of", &"file"))
        })
    };
    for p in renamed {
        results.push((p.id, dir_sync.clone().map(|_| p.written)));
    }
    results
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
