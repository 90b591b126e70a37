//! The built-in watcher: inotify on every directory of the master, so
//! writers that never call `georep mark` still get their changes stamped
//! within moments, and the crawl that follows finds them by xtime.
//!
//! Continuity: every event lost or unseeable (queue overflow, a directory
//! that could not be watched, the root moved away) is a *gap*; the worker
//! compares the gap counter around crawls and does a full crawl after one.
//! georep's own xattr writes are dropped by fingerprint (see
//! [`fingerprint`]), so stamps and stimes never trigger crawls themselves.

pub mod fingerprint;
pub mod pending;

use crate::engine::master::reserved;
use crate::fs::relpath::RelPath;
use fingerprint::{mark_many, Fingerprints};
use nix::sys::inotify::{AddWatchFlags as F, InitFlags, Inotify, WatchDescriptor};
use pending::{ChangeKind, Pending};
use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Events are gathered this long after the first of a batch before stamping.
const BATCH: Duration = Duration::from_millis(50);

/// State shared between the watcher thread and the worker.
#[derive(Default)]
pub struct Shared {
    stop: AtomicBool,
    gaps: AtomicU64,
    last_gap: Mutex<Option<String>>,
    /// Batches of changes stamped so far.
    changes: AtomicU64,
    pub pending: Mutex<Pending>,
    pub notify: tokio::sync::Notify,
    watches: AtomicU64,
}

impl Shared {
    fn gap(&self, why: String) {
        tracing::warn!(reason = %why, "watcher gap: the next crawl is a full crawl");
        *self.last_gap.lock().unwrap() = Some(why);
        self.gaps.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_one();
    }
}

/// A running watcher; stops when dropped.
pub struct Watcher {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    /// Watches every directory below `root` before returning, so a crawl
    /// started afterwards misses nothing: a change it does not see is
    /// stamped by the watcher for the next crawl.
    pub fn start(root: PathBuf, master: Uuid) -> std::io::Result<Watcher> {
        let w = Inner::new(root, master)?;
        let shared = w.shared.clone();
        tracing::info!(watches = w.wds.len(), "watcher started");
        let thread = std::thread::Builder::new()
            .name("georep-watcher".into())
            .spawn(move || w.run())?;
        Ok(Watcher {
            shared,
            thread: Some(thread),
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Gaps so far: a crawl is continuous with the previous one only if this did not move in between.
    pub fn gaps(&self) -> u64 {
        self.shared.gaps.load(Ordering::SeqCst)
    }

    pub fn last_gap(&self) -> Option<String> {
        self.shared.last_gap.lock().unwrap().clone()
    }

    /// Batches of changes stamped so far.
    pub fn changes(&self) -> u64 {
        self.shared.changes.load(Ordering::SeqCst)
    }

    pub fn watches(&self) -> u64 {
        self.shared.watches.load(Ordering::Relaxed)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The watcher thread's state.
struct Inner {
    inotify: Inotify,
    root: PathBuf,
    master: Uuid,
    wds: HashMap<WatchDescriptor, PathBuf>,
    fps: Fingerprints,
    shared: Arc<Shared>,
    root_wd: Option<WatchDescriptor>,
}

fn mask() -> F {
    F::IN_CREATE
        | F::IN_DELETE
        | F::IN_MOVED_FROM
        | F::IN_MOVED_TO
        | F::IN_MODIFY
        | F::IN_CLOSE_WRITE
        | F::IN_ATTRIB
        | F::IN_DELETE_SELF
        | F::IN_MOVE_SELF
        | F::IN_ONLYDIR
        | F::IN_DONT_FOLLOW
        // Not in nix: events of unlinked (still open) files are not wanted.
        | F::from_bits_retain(libc::IN_EXCL_UNLINK)
}

impl Inner {
    fn new(root: PathBuf, master: Uuid) -> std::io::Result<Inner> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let mut w = Inner {
            inotify,
            root,
            master,
            wds: HashMap::new(),
            fps: Fingerprints::default(),
            shared: Arc::default(),
            root_wd: None,
        };
        w.walk(&w.root.clone(), false);
        if w.root_wd.is_none() {
            return Err(std::io::Error::other(format!(
                "cannot watch the master root {}",
                w.root.display()
            )));
        }
        Ok(w)
    }

    /// Watches `dir` and every directory below it (watch first, then list,
    /// so nothing created in between is missed). With `collect`, returns
    /// every entry found, to be stamped (a directory that arrived whole).
    fn walk(&mut self, dir: &Path, collect: bool) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            match self.inotify.add_watch(&d, mask()) {
                Ok(wd) => {
                    if d == self.root {
                        self.root_wd = Some(wd);
                    }
                    self.wds.insert(wd, d.clone());
                    self.fps.record(&d);
                }
                Err(nix::errno::Errno::ENOENT) | Err(nix::errno::Errno::ENOTDIR) => continue,
                Err(e) => {
                    let fix = if e == nix::errno::Errno::ENOSPC {
                        ": raise the sysctl fs.inotify.max_user_watches"
                    } else {
                        ""
                    };
                    self.shared
                        .gap(format!("cannot watch {}: {e}{fix}", d.display()));
                    continue;
                }
            }
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if collect {
                    found.push(p.clone());
                }
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(p);
                }
            }
        }
        self.shared
            .watches
            .store(self.wds.len() as u64, Ordering::Relaxed);
        found
    }

    /// Stops watching `dir` and everything below it (moved away).
    fn unwatch(&mut self, dir: &Path) {
        let gone: Vec<WatchDescriptor> = self
            .wds
            .iter()
            .filter(|(_, p)| p.starts_with(dir))
            .map(|(wd, _)| *wd)
            .collect();
        for wd in gone {
            let _ = self.inotify.rm_watch(wd);
            self.wds.remove(&wd);
        }
    }

    fn run(mut self) {
        let fd = self
            .inotify
            .as_fd()
            .try_clone_to_owned()
            .expect("dup inotify fd");
        while !self.shared.stop.load(Ordering::SeqCst) {
            let mut fds = [nix::poll::PollFd::new(
                fd.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(&mut fds, 500u16) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => {
                    self.shared.gap(format!("watcher poll failed: {e}"));
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            }
            // Gather a batch: everything queued now and during BATCH.
            let first = Instant::now();
            let mut events = Vec::new();
            loop {
                match self.inotify.read_events() {
                    Ok(ev) => events.extend(ev),
                    Err(nix::errno::Errno::EAGAIN) => {
                        if first.elapsed() >= BATCH {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => {
                        self.shared.gap(format!("reading inotify events: {e}"));
                        break;
                    }
                }
            }
            self.handle(events);
        }
    }

    fn handle(&mut self, events: Vec<nix::sys::inotify::InotifyEvent>) {
        let mut marks: Vec<PathBuf> = Vec::new();
        let mut kinds: Vec<(ChangeKind, PathBuf)> = Vec::new();
        let mut rewalk = false;
        // inotify reports a change only under the name it was made through.
        let mut hardlinked: Option<PathBuf> = None;
        for ev in events {
            let m = ev.mask;
            if m.contains(F::IN_Q_OVERFLOW) {
                self.shared
                    .gap("the inotify queue overflowed (events were lost)".into());
                rewalk = true;
                continue;
            }
            if m.contains(F::IN_IGNORED) {
                self.wds.remove(&ev.wd);
                continue;
            }
            let Some(dir) = self.wds.get(&ev.wd).cloned() else {
                continue;
            };
            let is_root = Some(ev.wd) == self.root_wd;
            let Some(name) = ev.name else {
                // An event on a watched directory itself: its parent's watch
                // reports the same with a name, except for the root.
                if is_root && m.intersects(F::IN_DELETE_SELF | F::IN_MOVE_SELF | F::IN_UNMOUNT) {
                    self.shared.gap(format!(
                        "the master root {} was moved, deleted or unmounted",
                        dir.display()
                    ));
                } else if is_root && m.contains(F::IN_ATTRIB) && self.fps.changed(&dir) {
                    marks.push(dir.clone());
                    kinds.push((ChangeKind::Meta, dir));
                }
                continue;
            };
            let rel_dir = dir
                .strip_prefix(&self.root)
                .ok()
                .and_then(|r| RelPath::new(r.as_os_str().as_bytes().to_vec()).ok());
            if rel_dir.is_some_and(|d| reserved(&d, name.as_bytes())) {
                continue;
            }
            let path = dir.join(&name);
            let is_dir = m.contains(F::IN_ISDIR);
            if !is_dir
                && hardlinked.is_none()
                && !m.intersects(F::IN_DELETE | F::IN_MOVED_FROM)
                && std::fs::symlink_metadata(&path).is_ok_and(|md| md.is_file() && md.nlink() > 1)
            {
                hardlinked = Some(path.clone());
            }
            if m.intersects(F::IN_CREATE | F::IN_DELETE | F::IN_MOVED_FROM | F::IN_MOVED_TO) {
                if is_dir && m.contains(F::IN_MOVED_FROM) {
                    self.unwatch(&path);
                }
                if is_dir && m.intersects(F::IN_CREATE | F::IN_MOVED_TO) {
                    // Whatever it already holds was never evented: stamp it all.
                    for p in self.walk(&path, true) {
                        kinds.push((ChangeKind::Entry, p.clone()));
                        marks.push(p);
                    }
                }
                kinds.push((ChangeKind::Entry, path.clone()));
                marks.push(path);
            } else if m.intersects(F::IN_MODIFY | F::IN_CLOSE_WRITE) {
                kinds.push((ChangeKind::Data, path.clone()));
                marks.push(path);
            } else if m.contains(F::IN_ATTRIB) && self.fps.changed(&path) {
                kinds.push((ChangeKind::Meta, path.clone()));
                marks.push(path);
            }
        }
        if rewalk {
            // Directories created while events were lost have no watch yet.
            self.walk(&self.root.clone(), false);
            self.shared
                .gap("the inotify queue overflowed (watches re-established)".into());
        }
        if marks.is_empty() {
            return;
        }
        if let Some(p) = hardlinked {
            // Its other names (and their directories) saw nothing: only a
            // full crawl finds them all.
            self.shared.gap(format!(
                "{} changed and has several hard links, whose other names inotify does not report",
                p.display()
            ));
        }
        marks.sort();
        marks.dedup();
        match mark_many(&self.root, &self.master, &marks, &mut self.fps) {
            Ok(_) => {
                let mut p = self.shared.pending.lock().unwrap();
                for (k, path) in kinds {
                    p.add(k, path);
                }
                drop(p);
                self.shared.changes.fetch_add(1, Ordering::SeqCst);
                self.shared.notify.notify_one();
            }
            Err(e) => self
                .shared
                .gap(format!("stamping changed entries failed: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::xtime;
    use std::os::unix::fs::PermissionsExt;

    fn wait_changes(w: &Watcher, past: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        while w.changes() == past {
            assert!(
                Instant::now() < deadline,
                "the watcher never reported a change"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        w.changes()
    }

    #[test]
    fn stamps_real_changes_and_ignores_georeps_own_xattrs() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("m");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), b"1").unwrap();
        let id = xtime::ensure_master_id(&root).unwrap();
        let xattr_name = xtime::xtime_attr(&id);
        let w = Watcher::start(root.clone(), id).unwrap();
        assert_eq!(w.watches(), 3);
        // A plain write: the file and its ancestors are stamped.
        std::fs::write(root.join("a/b/f"), b"22").unwrap();
        let c = wait_changes(&w, 0);
        let stamp = xtime::read(&root.join("a/b/f"), &xattr_name).unwrap();
        assert!(stamp > 0);
        assert!(xtime::read(&root, &xattr_name).unwrap() >= stamp);
        // georep's own writes (a stime, a stamp by `georep mark` of a
        // directory), then a sentinel change: only the sentinel counts.
        w.shared().pending.lock().unwrap().begin_crawl();
        w.shared().pending.lock().unwrap().end_crawl(true);
        xtime::write(&root.join("a"), &xtime::stime_attr(&Uuid::new_v4()), 5).unwrap();
        xtime::mark(&root.join("a/b")).unwrap();
        std::fs::set_permissions(root.join("a/b/f"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        let c2 = wait_changes(&w, c);
        assert_eq!(
            c2,
            c + 1,
            "georep's own xattr writes were taken for changes"
        );
        assert_eq!(w.shared().pending.lock().unwrap().counts(), (0, 0, 1));
        // A new directory with content already inside: watched and stamped.
        std::fs::create_dir_all(root.join("n/deep")).unwrap();
        std::fs::write(root.join("n/deep/g"), b"x").unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while xtime::read(&root.join("n/deep/g"), &xattr_name).unwrap_or(0) == 0 {
            assert!(Instant::now() < deadline, "new subtree never stamped");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(w.gaps(), 0);
    }

    #[test]
    fn a_queue_overflow_is_a_gap_and_rewatches_the_tree() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("m");
        std::fs::create_dir_all(&root).unwrap();
        let id = xtime::ensure_master_id(&root).unwrap();
        let mut inner = Inner::new(root.clone(), id).unwrap();
        let gaps = inner.shared.gaps.load(Ordering::SeqCst);
        // A directory made while events were being lost: no watch, no event.
        std::fs::create_dir(root.join("lost")).unwrap();
        let _ = inner.inotify.read_events();
        inner.handle(vec![nix::sys::inotify::InotifyEvent {
            wd: inner.root_wd.unwrap(),
            mask: F::IN_Q_OVERFLOW,
            cookie: 0,
            name: None,
        }]);
        assert!(inner.shared.gaps.load(Ordering::SeqCst) > gaps);
        assert!(inner.wds.values().any(|p| p == &root.join("lost")));
    }
}
