//! In-place patching of large files (the session's `inplace_min_size`):
//! only changed ranges are written, so a 1 GiB image with 1% changed costs
//! about 1% of its size in writes and sync, not a whole new copy.
//!
//! Crash safety, instead of atomic publish:
//!
//! 1. Before the file is first touched, an undo log in `.georep/undo/`
//!    records its path, inode, old size and old metadata, and is made
//!    durable (the log and its directory synced).
//! 2. Changes are grouped (up to [`GROUP_BYTES`] of data or
//!    [`GROUP_CHANGES`] changes): the old contents of every range about to
//!    be overwritten (or zeroed, or cut off by shrinking) go to the log —
//!    holes as hole records, never as zeros — one fdatasync makes them
//!    durable, then the new data is written. Zeroing a hole is nothing.
//! 3. At commit the digest of the whole content is checked against the
//!    master's; then metadata is applied, the file synced and the log
//!    deleted (durably). A mismatch, an abort or a lost connection rolls
//!    the file back from the log.
//! 4. An agent starting (and before any further operation) rolls back
//!    every log no live agent holds (each holds an `flock` on its logs):
//!    after a crash the file is its old version again.
//!
//! What it gives up: readers on the slave may see a file half patched
//! while a sync runs (or until the next agent start after a crash).

use super::root::{apply_meta, errno_err, io_err, Root, WResult, STATE_DIR};
use super::settings::Policy;
use super::undo;
use crate::fs::meta::{Meta, Timestamp};
use crate::fs::relpath::RelPath;
use crate::protocol::{ErrorKind, WireError};
use nix::fcntl::{openat, Flock, FlockArg, OFlag};
use nix::sys::stat::Mode;
use serde_bytes::ByteBuf;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};

/// A file shrinking by more than this is assembled in a temporary file
/// instead (its cut-off tail goes into the undo log).
pub const SHRINK_LIMIT: u64 = 16 << 20;
/// New data held before its undo records are made durable and it is written.
pub const GROUP_BYTES: u64 = 8 << 20;
/// Changes queued before they are applied, at most (scattered tiny writes).
pub const GROUP_CHANGES: usize = 4096;
/// The undo logs' directory, under the state directory.
pub const UNDO_DIR: &[u8] = b"undo";
const PIECE: u64 = undo::MAX_RECORD as u64;

enum Change {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
}

struct Log {
    name: Vec<u8>,
    writer: undo::Writer,
    _lock: Flock<File>,
}

/// A file being patched in place.
pub struct InPlace {
    file: File,
    path: RelPath,
    header: undo::Header,
    new_size: u64,
    log: Option<Log>,
    undo_dir: Option<OwnedFd>,
    state: OwnedFd,
    group: Vec<Change>,
    group_bytes: u64,
    written: u64,
    policy: Policy,
}

fn undo_dir(state: &OwnedFd) -> WResult<OwnedFd> {
    let name = OsStr::from_bytes(UNDO_DIR);
    match nix::sys::stat::mkdirat(state.as_fd(), name, Mode::from_bits_truncate(0o700)) {
        Ok(()) => {
            nix::unistd::fsync(state.as_fd()).map_err(|e| errno_err(e, "fsync", &".georep"))?
        }
        Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => return Err(errno_err(e, "mkdir", &".georep/undo")),
    }
    super::root::open_nofollow(state.as_fd(), name, true)
        .map_err(|e| errno_err(e, "open", &".georep/undo"))
}

/// Opens `name` in `dir` for reading and writing, never through a symlink.
fn open_rw(dir: &OwnedFd, name: &[u8]) -> nix::Result<File> {
    let fd = openat(
        dir.as_fd(),
        OsStr::from_bytes(name),
        OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    )?;
    let st = nix::sys::stat::fstat(fd.as_fd())?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(nix::errno::Errno::EINVAL);
    }
    nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()))?;
    Ok(File::from(fd))
}

/// The replicated metadata of an open file (xattrs through the descriptor).
fn meta_of(file: &File, path: &RelPath) -> WResult<Meta> {
    use xattr::FileExt as _;
    let md = file.metadata().map_err(|e| io_err(e, "stat", path))?;
    let mut xattrs = Vec::new();
    for name in file
        .list_xattr()
        .map_err(|e| io_err(e, "list xattrs", path))?
    {
        let n = name.as_bytes();
        if !crate::fs::meta::replicated_xattr(n) {
            continue;
        }
        if let Some(v) = file
            .get_xattr(&name)
            .map_err(|e| io_err(e, "read xattr", path))?
        {
            xattrs.push((ByteBuf::from(n.to_vec()), ByteBuf::from(v)));
        }
    }
    xattrs.sort();
    Ok(Meta {
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: Timestamp {
            sec: md.mtime(),
            nsec: md.mtime_nsec() as u32,
        },
        xattrs,
    })
}

fn unlink_log(dir: &OwnedFd, name: &[u8]) -> nix::Result<()> {
    nix::unistd::unlinkat(
        dir.as_fd(),
        OsStr::from_bytes(name),
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    )?;
    nix::unistd::fsync(dir.as_fd())
}

impl InPlace {
    /// Starts patching `name` in `dir` in place to `size` bytes, or None
    /// when it does not qualify (missing, not a regular file, several
    /// links, not writable, shrinking by more than [`SHRINK_LIMIT`], or
    /// `busy` says another open file is this inode).
    pub fn open(
        root: &Root,
        dir: &OwnedFd,
        name: &[u8],
        path: &RelPath,
        size: u64,
        busy: &dyn Fn(u64, u64) -> bool,
    ) -> WResult<Option<InPlace>> {
        let Ok(file) = open_rw(dir, name) else {
            return Ok(None);
        };
        if root.check_dev(file.as_fd(), path).is_err() {
            return Ok(None);
        }
        let md = file.metadata().map_err(|e| io_err(e, "stat", path))?;
        if md.nlink() != 1 || size + SHRINK_LIMIT < md.len() || busy(md.dev(), md.ino()) {
            return Ok(None);
        }
        let header = undo::Header {
            path: path.as_bytes().to_vec(),
            dev: md.dev(),
            ino: md.ino(),
            old_size: md.len(),
            meta: meta_of(&file, path)?,
        };
        let mut ip = InPlace {
            file,
            path: path.clone(),
            header,
            new_size: size,
            log: None,
            undo_dir: None,
            state: root.state_dir()?,
            group: Vec::new(),
            group_bytes: 0,
            written: 0,
            policy: *root.policy(),
        };
        if size > ip.header.old_size {
            if let Err(e) = ip.grow() {
                return Err(match ip.rollback() {
                    Ok(()) => e,
                    Err(r) => WireError::new(e.kind, format!("{}; {}", e.message, r.message)),
                });
            }
        }
        Ok(Some(ip))
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn old_size(&self) -> u64 {
        self.header.old_size
    }

    pub fn inode(&self) -> (u64, u64) {
        (self.header.dev, self.header.ino)
    }

    /// Extends the file to its new size at once (the log records the old size).
    fn grow(&mut self) -> WResult<()> {
        self.ensure_log()?;
        self.file
            .set_len(self.new_size)
            .map_err(|e| io_err(e, "resize", &self.path))
    }

    /// Cuts a shrinking file to its new size at the end (until then its
    /// tail is part of the basis), the tail saved first.
    fn shrink(&mut self) -> WResult<()> {
        let old = self.header.old_size;
        if self.new_size >= old {
            return Ok(());
        }
        self.ensure_log()?;
        self.save(self.new_size, old - self.new_size)?;
        self.sync_log()?;
        self.file
            .set_len(self.new_size)
            .map_err(|e| io_err(e, "resize", &self.path))
    }

    /// Creates the undo log and makes it durable, once.
    fn ensure_log(&mut self) -> WResult<()> {
        if self.log.is_some() {
            return Ok(());
        }
        let dir = match &self.undo_dir {
            Some(d) => d,
            None => self.undo_dir.insert(undo_dir(&self.state)?),
        };
        let name = format!(
            "{:x}-{:x}-{}-{:x}.undo",
            self.header.dev,
            self.header.ino,
            std::process::id(),
            crate::fs::xtime::now_ns()
        )
        .into_bytes();
        let fd = openat(
            dir.as_fd(),
            OsStr::from_bytes(&name),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| errno_err(e, "create undo log for", &self.path))?;
        let file = File::from(fd);
        let lock = Flock::lock(
            file.try_clone()
                .map_err(|e| io_err(e, "dup undo log of", &self.path))?,
            FlockArg::LockExclusiveNonblock,
        )
        .map_err(|(_, e)| errno_err(e, "lock undo log of", &self.path))?;
        let writer = undo::Writer::create(file, &self.header)
            .and_then(|w| w.sync().map(|_| w))
            .map_err(|e| io_err(e, "write undo log of", &self.path));
        let writer = match writer.and_then(|w| {
            nix::unistd::fsync(dir.as_fd())
                .map_err(|e| errno_err(e, "fsync", &".georep/undo"))
                .map(|_| w)
        }) {
            Ok(w) => w,
            Err(e) => {
                let _ = unlink_log(dir, &name);
                return Err(e);
            }
        };
        self.log = Some(Log {
            name,
            writer,
            _lock: lock,
        });
        Ok(())
    }

    /// The data ranges of the file in `[offset, end)`.
    fn data(&self, offset: u64, end: u64) -> WResult<Vec<(u64, u64)>> {
        crate::fs::sparse::data_ranges(&self.file, offset, end)
            .map_err(|e| io_err(e, "seek", &self.path))
    }

    /// Appends the current contents of `[offset, offset + len)` (within the
    /// old size) to the log: data as data, holes as hole records.
    fn save(&mut self, offset: u64, len: u64) -> WResult<()> {
        let end = (offset + len).min(self.header.old_size);
        if end <= offset {
            return Ok(());
        }
        let mut buf = Vec::new();
        let mut pos = offset;
        let werr = |e, p: &RelPath| io_err(e, "write undo log of", p);
        // A hole part is recorded by whole blocks (holes are), so that the
        // roll-back punches them out again rather than leaving zeroed blocks.
        let old_size = self.header.old_size;
        let hole = |a: u64, b: u64| {
            (
                a / 4096 * 4096,
                b.div_ceil(4096).saturating_mul(4096).min(old_size),
            )
        };
        for (d, n) in self.data(offset, end)? {
            let writer = &mut self.log.as_mut().expect("log created first").writer;
            if d > pos {
                let (a, b) = hole(pos, d);
                writer
                    .record_zero(a, b - a)
                    .map_err(|e| werr(e, &self.path))?;
            }
            let mut o = d;
            while o < d + n {
                let m = PIECE.min(d + n - o);
                buf.resize(m as usize, 0);
                self.file
                    .read_exact_at(&mut buf, o)
                    .map_err(|e| io_err(e, "read old data of", &self.path))?;
                let writer = &mut self.log.as_mut().expect("log created first").writer;
                writer.record(o, &buf).map_err(|e| werr(e, &self.path))?;
                o += m;
            }
            pos = d + n;
        }
        if end > pos {
            let writer = &mut self.log.as_mut().expect("log created first").writer;
            let (a, b) = hole(pos, end);
            writer
                .record_zero(a, b - a)
                .map_err(|e| werr(e, &self.path))?;
        }
        Ok(())
    }

    fn sync_log(&self) -> WResult<()> {
        self.log
            .as_ref()
            .expect("log")
            .writer
            .sync()
            .map_err(|e| io_err(e, "sync undo log of", &self.path))
    }

    /// Queues new data for `[offset, offset + data.len())`.
    pub fn write(&mut self, offset: u64, data: Vec<u8>) -> WResult<()> {
        self.group_bytes += data.len() as u64;
        self.group.push(Change::Write { offset, data });
        self.flush_if_full()
    }

    fn flush_if_full(&mut self) -> WResult<()> {
        if self.group_bytes >= GROUP_BYTES || self.group.len() >= GROUP_CHANGES {
            self.flush()?;
        }
        Ok(())
    }

    /// Queues `[offset, offset + len)` to read as zeros (a gap the master
    /// left for zeros or a hole). Only old data needs it: holes and what
    /// lies beyond the old size read as zeros already.
    pub fn zero(&mut self, offset: u64, len: u64) -> WResult<()> {
        let end = (offset + len).min(self.header.old_size);
        if end > offset {
            for (o, n) in self.data(offset, end)? {
                self.group.push(Change::Zero { offset: o, len: n });
                self.flush_if_full()?;
            }
        }
        Ok(())
    }

    /// Applies the queued changes: their old contents into the log, one
    /// sync of the log, then the new data.
    pub fn flush(&mut self) -> WResult<()> {
        if self.group.is_empty() {
            return Ok(());
        }
        self.ensure_log()?;
        let group = std::mem::take(&mut self.group);
        self.group_bytes = 0;
        for c in &group {
            match c {
                Change::Write { offset, data } => self.save(*offset, data.len() as u64)?,
                Change::Zero { offset, len } => self.save(*offset, *len)?,
            }
        }
        self.sync_log()?;
        for c in group {
            match c {
                Change::Write { offset, data } => {
                    undo::write_back(&self.file, offset, &data)
                        .map_err(|e| io_err(e, "write", &self.path))?;
                    self.written += data.len() as u64;
                }
                Change::Zero { offset, len } => {
                    undo::zero_range(&self.file, offset, len)
                        .map_err(|e| io_err(e, "zero", &self.path))?;
                    self.written += len;
                }
            }
        }
        Ok(())
    }

    /// Finishes a verified file: its metadata, a sync, and the log deleted.
    /// On failure the file is rolled back (the second error: that failed too).
    pub fn commit(mut self, meta: &Meta) -> Result<u64, (WireError, Option<WireError>)> {
        let res = self
            .shrink()
            .and_then(|_| apply_meta(self.file.as_fd(), meta, &self.path, &self.policy))
            .and_then(|_| {
                self.file
                    .sync_all()
                    .map_err(|e| io_err(e, "fsync", &self.path))
            });
        if let Err(e) = res {
            return Err((e, self.rollback().err()));
        }
        if let (Some(log), Some(dir)) = (&self.log, &self.undo_dir) {
            if let Err(e) = unlink_log(dir, &log.name) {
                // The new version is durable; the log would roll it back at
                // the next start, which only costs a resend.
                tracing::warn!(path = %self.path, error = %e, "removing an undo log");
            }
        }
        Ok(self.written)
    }

    /// Puts the old version back from the log and deletes the log. On
    /// failure the log stays for the next attempt ([`recover`]).
    pub fn rollback(mut self) -> WResult<()> {
        self.group.clear();
        let (Some(log), Some(dir)) = (self.log.take(), self.undo_dir.as_ref()) else {
            return Ok(()); // nothing was touched
        };
        let res = restore(log.writer.file(), &self.file, &self.path, &self.policy).and_then(|_| {
            unlink_log(dir, &log.name).map_err(|e| errno_err(e, "remove undo log of", &self.path))
        });
        if let Err(e) = &res {
            tracing::error!(path = %self.path, error = %e, "rolling back an in-place update failed; retried before the next operation");
        }
        res
    }
}

/// Restores the file from its log: old ranges, old size, old metadata, synced.
fn restore(log: &File, file: &File, path: &dyn std::fmt::Display, policy: &Policy) -> WResult<()> {
    let (header, start) = undo::read_header(log)
        .map_err(|e| io_err(e, "read undo log of", path))?
        .ok_or_else(|| WireError::new(ErrorKind::Io, format!("{path}: undo log unreadable")))?;
    undo::restore(log, start, &header, file).map_err(|e| io_err(e, "roll back", path))?;
    apply_meta(file.as_fd(), &header.meta, path, policy)?;
    file.sync_all().map_err(|e| io_err(e, "fsync", path))
}

/// A log that could not be rolled back: the file it names, and why.
#[derive(Debug, Clone)]
pub struct Stuck {
    pub path: Vec<u8>,
    pub error: WireError,
}

/// Rolls back every undo log no live agent holds. Returns the failures
/// (their logs stay for the next attempt).
pub fn recover(root: &Root) -> Vec<Stuck> {
    let Ok(state) = super::root::open_nofollow(root.fd(), OsStr::from_bytes(STATE_DIR), true)
    else {
        return Vec::new();
    };
    let Ok(dir) = super::root::open_nofollow(state.as_fd(), OsStr::from_bytes(UNDO_DIR), true)
    else {
        return Vec::new();
    };
    let names: Vec<Vec<u8>> = match nix::dir::Dir::openat(
        dir.as_fd(),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(mut d) => d
            .iter()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_bytes().to_vec())
            .filter(|n| n.ends_with(b".undo"))
            .collect(),
        Err(_) => return Vec::new(),
    };
    let mut stuck = Vec::new();
    for name in names {
        if let Err(s) = recover_one(root, &dir, &name) {
            stuck.push(s);
        }
    }
    stuck
}

fn recover_one(root: &Root, dir: &OwnedFd, name: &[u8]) -> Result<(), Stuck> {
    let shown = String::from_utf8_lossy(name).into_owned();
    let fail = |path: &[u8], error: WireError| Stuck {
        path: path.to_vec(),
        error,
    };
    let log = match openat(
        dir.as_fd(),
        OsStr::from_bytes(name),
        OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => File::from(fd),
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(fail(b"", errno_err(e, "open undo log", &shown))),
    };
    let log = match Flock::lock(log, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(()), // a live agent's
        Err((_, e)) => return Err(fail(b"", errno_err(e, "lock undo log", &shown))),
    };
    let header = match undo::read_header(&log) {
        Ok(Some((h, _))) => h,
        // Never made durable: the file was not touched.
        Ok(None) => {
            return unlink_log(dir, name)
                .map_err(|e| fail(b"", errno_err(e, "remove undo log", &shown)))
        }
        Err(e) => return Err(fail(b"", io_err(e, "read undo log", &shown))),
    };
    let target = RelPath::new(header.path.clone())
        .ok()
        .and_then(|p| {
            root.parent(&p)
                .ok()
                .map(|(d, n)| (p.clone(), d, n.to_vec()))
        })
        .and_then(|(p, d, n)| open_rw(&d, &n).ok().map(|f| (p, f)));
    let same = target.as_ref().is_some_and(|(_, f)| {
        f.metadata()
            .is_ok_and(|m| m.dev() == header.dev && m.ino() == header.ino)
    });
    match target {
        Some((path, file)) if same => {
            restore(&log, &file, &path, root.policy()).map_err(|e| fail(&header.path, e))?;
            tracing::warn!(path = %path, "rolled back an interrupted in-place update");
        }
        _ => tracing::warn!(
            path = %String::from_utf8_lossy(&header.path),
            "an interrupted in-place update's file is gone or replaced; its undo log is dropped"
        ),
    }
    unlink_log(dir, name).map_err(|e| fail(&header.path, errno_err(e, "remove undo log", &shown)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scattered_tiny_writes_are_queued_boundedly_and_roll_back_to_holes() {
        let d = tempfile::tempdir().unwrap();
        let size = 256u64 << 20;
        std::fs::File::create(d.path().join("img"))
            .unwrap()
            .set_len(size)
            .unwrap();
        let root = Root::open(d.path()).unwrap();
        let path = RelPath::new(b"img".to_vec()).unwrap();
        let (dir, name) = root.parent(&path).unwrap();
        let mut ip = InPlace::open(&root, &dir, name, &path, size, &|_, _| false)
            .unwrap()
            .expect("qualifies");
        let mut most = 0;
        for k in 0..3 * GROUP_CHANGES as u64 {
            ip.zero(k * 8192 + 1, 8191).unwrap();
            ip.write(k * 8192, vec![1]).unwrap();
            most = most.max(ip.group.len());
        }
        assert!(most <= GROUP_CHANGES, "{most} changes queued");
        ip.flush().unwrap();
        let log = ip
            .log
            .as_ref()
            .unwrap()
            .writer
            .file()
            .metadata()
            .unwrap()
            .len();
        assert!(log < 2 << 20, "holes saved as {log} bytes of log");
        ip.rollback().unwrap();
        let f = std::fs::File::open(d.path().join("img")).unwrap();
        assert_eq!(f.metadata().unwrap().len(), size);
        assert!(
            crate::fs::sparse::data_ranges(&f, 0, size)
                .unwrap()
                .is_empty(),
            "the roll-back leaves holes where there were holes"
        );
    }
}
