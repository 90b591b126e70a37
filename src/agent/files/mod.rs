//! Assembly of files on the slave: a temporary file in the target's
//! directory receives literal data, copies from the basis and patches, in
//! increasing offset order; the digest of what was written is checked
//! against the master's; then the file is made durable and renamed over
//! its final name, in batches so that many small files share one sync.
//! Large files of sessions that ask for it are patched in place instead
//! (see `inplace`): only changed ranges are written, under an undo log.
//!
//! Copies from the basis move in the kernel (`copy_file_range`, a reflink
//! where the file system can); the digest is always computed over the bytes
//! the target holds once written (copied ranges are read back from it), so
//! a basis that changed after it was hashed cannot slip content past the
//! master's digest.

mod hashes;
mod partial;
mod publish;
mod shared;
mod small;
mod write;

pub use small::Probe;

use super::basis::{BasisCache, Budget};
use super::inplace::{self, InPlace};
use super::meta::foreign_links;
use super::root::{
    apply_meta, errno_err, io_err, open_nofollow, rename_over, tmp_name, Root, WResult,
};
use super::settings::Policy;
use crate::fs::meta::Meta;
use crate::fs::relpath::RelPath;
use crate::fs::sparse;
use crate::hash::blocktree::{FileDigest, BLOCK};
use crate::hash::digest::{self, WINDOW};
use crate::protocol::{ErrorKind, Hash16, Hash32, WireError};
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;

/// Files being assembled at once, at most.
pub const MAX_OPEN: usize = 1024;
/// Largest file size accepted (16 TiB, ext4's limit).
pub const MAX_SIZE: u64 = 16 << 40;
/// Largest basis range hashed, signed or patched against in one request.
pub const MAX_RANGE: u64 = 16 << 20;
/// Commits waiting for one shared sync, at most.
const BATCH_FILES: usize = 512;
const BATCH_BYTES: u64 = 256 << 20;
/// From this many files on, one syncfs is cheaper than an fsync each.
const SYNCFS_MIN: usize = 16;
/// Files patched in place at once, at most (each queues up to
/// `inplace::GROUP_BYTES`); more are assembled in temporary files.
pub const MAX_IN_PLACE: usize = 8;

/// Where a file is assembled.
enum Target {
    /// A temporary file renamed over the final name once verified.
    Temp { tmp: Vec<u8>, file: File },
    /// The final file itself, patched under an undo log.
    InPlace(Box<InPlace>),
}

struct OpenFile {
    path: RelPath,
    dir: OwnedFd,
    name: Vec<u8>,
    target: Target,
    basis: Option<File>,
    /// Basis bytes that can be read (in place: the old size; a shrinking
    /// file is cut at commit).
    basis_size: u64,
    size: u64,
    digest: FileDigest,
    /// Window hashes and block CVs of the basis, computed once.
    cache: BasisCache,
    error: Option<WireError>,
    written: u64,
    /// A segment of another agent's shared temporary, ending here: never
    /// committed or removed by this agent (see `shared`).
    segment: Option<u64>,
    /// A resumable transfer (see `partial`).
    resume: Option<partial::Resume>,
}

impl OpenFile {
    fn tmp(&self) -> Option<&[u8]> {
        match &self.target {
            Target::Temp { tmp, .. } => Some(tmp),
            Target::InPlace(_) => None,
        }
    }

    /// Applies pending in-place changes before the basis is read where they may land.
    fn settle(&mut self) -> WResult<()> {
        match &mut self.target {
            Target::InPlace(ip) => ip.flush(),
            Target::Temp { .. } => Ok(()),
        }
    }
}

/// A verified file waiting for durability and its rename.
pub struct Pending {
    pub id: u64,
    path: RelPath,
    dir: OwnedFd,
    tmp: Vec<u8>,
    name: Vec<u8>,
    file: File,
    written: u64,
}

#[derive(Default)]
pub struct Files {
    open: HashMap<u64, OpenFile>,
    pending: Vec<Pending>,
    pending_bytes: u64,
    buf: Vec<u8>,
    /// In-place updates whose roll-back failed: retried before every request.
    stuck: Vec<inplace::Stuck>,
    /// A roll-back failed since the last recovery.
    unrecovered: bool,
    /// The slave's policy for metadata.
    policy: Policy,
    /// Block CVs cached for all open files together.
    budget: Budget,
    /// Publishes batches while the agent goes on (see `publish`).
    publisher: Option<publish::Publisher>,
    /// When the oldest pending commit was made.
    pending_since: Option<std::time::Instant>,
}

/// How a commit is answered.
pub enum Committed {
    /// When its batch is published.
    Later,
    /// Now: an in-place file is durable, with this many bytes written.
    Now(u64),
}

fn invalid(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorKind::Invalid, msg)
}

fn create_tmp(dir: &OwnedFd, path: &RelPath) -> WResult<(Vec<u8>, File)> {
    let tmp = tmp_name();
    let fd = openat(
        dir.as_fd(),
        OsStr::from_bytes(&tmp),
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| errno_err(e, "create temporary for", path))?;
    Ok((tmp, File::from(fd)))
}

/// Writes `data` at `offset` into a pre-sized temporary file, leaving
/// all-zero blocks as holes.
fn write_sparse(file: &File, offset: u64, data: &[u8], path: &RelPath) -> WResult<u64> {
    let mut n = 0;
    for (at, range) in sparse::nonzero_runs(offset, data, 4096) {
        file.write_all_at(&data[range.clone()], at)
            .map_err(|e| io_err(e, "write", path))?;
        n += range.len() as u64;
    }
    Ok(n)
}

impl Files {
    /// The file assembly of an agent that starts serving `root`: first
    /// rolls back in-place updates a crash interrupted.
    pub fn start(root: &Root) -> Files {
        let mut f = Files {
            policy: *root.policy(),
            ..Files::default()
        };
        f.recover(root);
        f
    }

    /// The file assembly of an agent joining a stream group: the root's
    /// policy, no recovery (the primary's).
    pub fn joiner(root: &Root) -> Files {
        Files {
            policy: *root.policy(),
            ..Files::default()
        }
    }

    /// Whether an in-place roll-back is still to be done.
    pub fn needs_recovery(&self) -> bool {
        self.unrecovered || !self.stuck.is_empty()
    }

    /// Rolls back the undo logs of in-place updates no live agent holds.
    pub fn recover(&mut self, root: &Root) {
        self.stuck = inplace::recover(root);
        self.unrecovered = false;
    }

    /// Refuses a path whose interrupted in-place update could not be rolled back.
    fn check_stuck(&self, path: &RelPath) -> WResult<()> {
        match self.stuck.iter().find(|s| s.path == path.as_bytes()) {
            Some(s) => Err(WireError::new(
                s.error.kind,
                format!(
                    "{path}: an interrupted in-place update could not be rolled back yet: {}",
                    s.error.message
                ),
            )),
            None => Ok(()),
        }
    }

    pub fn in_use(&self, tmp: &[u8]) -> bool {
        self.open.values().any(|f| f.tmp() == Some(tmp))
            || self.pending.iter().any(|p| p.tmp == tmp)
            || self.publishing(tmp)
    }

    fn check_open(&self, fid: u64, path: &RelPath, size: u64) -> WResult<()> {
        if self.open.contains_key(&fid) {
            return Err(invalid(format!("file id {fid} already open")));
        }
        if self.open.len() >= MAX_OPEN {
            return Err(invalid(format!("more than {MAX_OPEN} files open")));
        }
        if size > MAX_SIZE {
            return Err(invalid(format!(
                "{path}: size {size} above the {MAX_SIZE}-byte limit"
            )));
        }
        self.check_stuck(path)
    }

    /// Opens `path` for patching in place when it qualifies (see
    /// `inplace`), else as [`open`](Self::open) with itself as basis.
    /// Returns the basis size and whether it is patched in place.
    pub fn open_in_place(
        &mut self,
        root: &Root,
        fid: u64,
        path: &RelPath,
        size: u64,
    ) -> WResult<(Option<u64>, bool)> {
        self.check_open(fid, path, size)?;
        let (dir, name) = root.parent(path)?;
        let name = name.to_vec();
        let open = &self.open;
        let in_place = open
            .values()
            .filter(|f| matches!(f.target, Target::InPlace(_)))
            .count();
        let busy = |dev: u64, ino: u64| {
            in_place >= MAX_IN_PLACE
                || open
                    .values()
                    .any(|f| matches!(&f.target, Target::InPlace(ip) if ip.inode() == (dev, ino)))
        };
        let ip = match InPlace::open(root, &dir, &name, path, size, &busy) {
            Ok(Some(ip)) => ip,
            Ok(None) => return self.open(root, fid, path, None, size).map(|b| (b, false)),
            Err(e) => {
                self.unrecovered = true;
                return Err(e);
            }
        };
        let basis = ip.file().try_clone().map_err(|e| io_err(e, "dup", path))?;
        let old = ip.old_size();
        self.open.insert(
            fid,
            OpenFile {
                path: path.clone(),
                dir,
                name,
                target: Target::InPlace(Box::new(ip)),
                basis: Some(basis),
                basis_size: old,
                size,
                digest: FileDigest::new(size),
                cache: BasisCache::new(&self.budget),
                error: None,
                written: 0,
                segment: None,
                resume: None,
            },
        );
        Ok((Some(old), true))
    }

    pub fn open(
        &mut self,
        root: &Root,
        fid: u64,
        path: &RelPath,
        basis: Option<&RelPath>,
        size: u64,
    ) -> WResult<Option<u64>> {
        self.check_open(fid, path, size)?;
        let (dir, name) = root.parent(path)?;
        let name = name.to_vec();
        let basis = open_basis(root, &dir, &name, basis)?;
        let basis_size = match &basis {
            Some(f) => f
                .metadata()
                .map_err(|e| io_err(e, "stat basis of", path))?
                .len(),
            None => 0,
        };
        let (tmp, file) = create_tmp(&dir, path)?;
        if let Err(e) = file.set_len(size) {
            let _ = nix::unistd::unlinkat(
                dir.as_fd(),
                OsStr::from_bytes(&tmp),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
            return Err(io_err(e, "allocate", path));
        }
        let has_basis = basis.is_some();
        self.open.insert(
            fid,
            OpenFile {
                path: path.clone(),
                dir,
                name,
                target: Target::Temp { tmp, file },
                basis,
                basis_size,
                size,
                digest: FileDigest::new(size),
                cache: BasisCache::new(&self.budget),
                error: None,
                written: 0,
                segment: None,
                resume: None,
            },
        );
        Ok(has_basis.then_some(basis_size))
    }

    fn get(&mut self, fid: u64) -> WResult<&mut OpenFile> {
        self.open
            .get_mut(&fid)
            .ok_or_else(|| invalid(format!("unknown file id {fid}")))
    }

    /// Drops a file being assembled: a temporary is removed, an in-place
    /// file rolled back.
    pub fn abort(&mut self, fid: u64) {
        if let Some(f) = self.open.remove(&fid) {
            if f.segment.is_some() {
                return; // the shared temporary is its owner's to remove
            }
            Self::drop_record(&f);
            match f.target {
                Target::Temp { tmp, .. } => {
                    let _ = nix::unistd::unlinkat(
                        f.dir.as_fd(),
                        OsStr::from_bytes(&tmp),
                        nix::unistd::UnlinkatFlags::NoRemoveDir,
                    );
                }
                Target::InPlace(ip) => {
                    if ip.rollback().is_err() {
                        self.unrecovered = true;
                    }
                }
            }
        }
    }

    /// Drops every file being assembled (the connection ended): resumable
    /// ones are checkpointed and kept for the next connection.
    pub fn abort_all(&mut self) {
        let fids: Vec<u64> = self.open.keys().copied().collect();
        for fid in fids {
            match self.open.remove(&fid) {
                Some(f) if f.resume.is_some() && f.error.is_none() => Self::keep_partial(f),
                Some(f) => {
                    self.open.insert(fid, f);
                    self.abort(fid);
                }
                None => {}
            }
        }
    }

    /// Verifies and finishes file `fid`: a temporary is published by the
    /// next [`flush`](Self::flush); an in-place file is done at once.
    pub fn commit(&mut self, id: u64, fid: u64, want: &Hash32, meta: &Meta) -> WResult<Committed> {
        self.commit_with(id, fid, want, meta, &[])
    }

    /// [`commit`](Self::commit), with the window hashes of the segments
    /// other agents wrote (see `shared`).
    fn commit_with(
        &mut self,
        id: u64,
        fid: u64,
        want: &Hash32,
        meta: &Meta,
        segments: &[(u64, Vec<Hash32>)],
    ) -> WResult<Committed> {
        let f = self
            .open
            .remove(&fid)
            .ok_or_else(|| invalid(format!("unknown file id {fid}")))?;
        if f.segment.is_some() {
            return Err(invalid(format!(
                "{}: a segment is finished, not committed",
                f.path
            )));
        }
        Self::drop_record(&f);
        let OpenFile {
            path,
            dir,
            name,
            target,
            size,
            mut digest,
            written,
            error,
            resume,
            ..
        } = f;
        let (tmp, file) = match target {
            // A resumable file's temporary becomes a plain one: a crash from
            // here leaves a stale temporary, not a partial without a record.
            Target::Temp { tmp, file } if resume.is_some() => {
                let plain = tmp_name();
                match rename_over(
                    dir.as_fd(),
                    OsStr::from_bytes(&tmp),
                    OsStr::from_bytes(&plain),
                ) {
                    Ok(()) => (plain, file),
                    Err(e) => {
                        let _ = nix::unistd::unlinkat(
                            dir.as_fd(),
                            OsStr::from_bytes(&tmp),
                            nix::unistd::UnlinkatFlags::NoRemoveDir,
                        );
                        return Err(errno_err(e, "rename the temporary of", &path));
                    }
                }
            }
            Target::Temp { tmp, file } => (tmp, file),
            Target::InPlace(ip) if segments.is_empty() => {
                return self.commit_in_place(*ip, &path, size, digest, error, want, meta);
            }
            Target::InPlace(ip) => {
                let _ = ip.rollback();
                return Err(invalid(format!("{path}: an in-place file is not shared")));
            }
        };
        let pending = Pending {
            id,
            path,
            dir,
            tmp,
            name,
            file,
            written,
        };
        if let Some(e) = error {
            pending.discard();
            return Err(e);
        }
        if let Err(e) = shared::feed_segments(&mut digest, size, segments, &pending.path) {
            pending.discard();
            return Err(e);
        }
        self.finish(pending, &digest.finish(), want, meta)
            .map(|_| Committed::Later)
    }

    #[allow(clippy::too_many_arguments)]
    fn commit_in_place(
        &mut self,
        mut ip: InPlace,
        path: &RelPath,
        size: u64,
        mut digest: FileDigest,
        error: Option<WireError>,
        want: &Hash32,
        meta: &Meta,
    ) -> WResult<Committed> {
        let pos = digest.position();
        let res = error.map_or(Ok(()), Err).and_then(|_| {
            digest.feed_zeros(size - pos);
            ip.zero(pos, size - pos)?;
            ip.flush()
        });
        let res = res.and_then(|_| {
            if &digest.finish() == want {
                Ok(())
            } else {
                Err(WireError::new(
                    ErrorKind::Mismatch,
                    format!("{path}: content written does not match the master's digest (file changed during transfer?); rolled back to its previous content"),
                ))
            }
        });
        if let Err(e) = res {
            return match ip.rollback() {
                Ok(()) => Err(e),
                Err(r) => {
                    self.unrecovered = true;
                    Err(WireError::new(
                        e.kind,
                        format!("{}; {}", e.message, r.message),
                    ))
                }
            };
        }
        match ip.commit(meta) {
            Ok(written) => Ok(Committed::Now(written)),
            Err((e, rolled)) => {
                if rolled.is_some() {
                    self.unrecovered = true;
                }
                Err(e)
            }
        }
    }

    /// Writes a whole small file from one frame.
    pub fn put_file(
        &mut self,
        root: &Root,
        id: u64,
        path: &RelPath,
        data: &[u8],
        want: &Hash32,
        meta: &Meta,
    ) -> WResult<()> {
        let (dir, name) = root.parent(path)?;
        let name = name.to_vec();
        let (tmp, file) = create_tmp(&dir, path)?;
        let mut pending = Pending {
            id,
            path: path.clone(),
            dir,
            tmp,
            name,
            file,
            written: 0,
        };
        let res = pending
            .file
            .set_len(data.len() as u64)
            .map_err(|e| io_err(e, "allocate", path));
        let res = res.and_then(|_| write_sparse(&pending.file, 0, data, path));
        match res {
            Ok(n) => pending.written = n,
            Err(e) => {
                pending.discard();
                return Err(e);
            }
        }
        self.finish(pending, &digest::digest_of(data), want, meta)
    }

    fn finish(
        &mut self,
        pending: Pending,
        got: &Hash32,
        want: &Hash32,
        meta: &Meta,
    ) -> WResult<()> {
        if got != want {
            let msg = format!("{}: content written does not match the master's digest (file changed during transfer?)", pending.path);
            pending.discard();
            return Err(WireError::new(ErrorKind::Mismatch, msg));
        }
        if let Err(e) = apply_meta(pending.file.as_fd(), meta, &pending.path, &self.policy) {
            pending.discard();
            return Err(e);
        }
        self.pending_bytes += pending.written;
        if self.pending.is_empty() {
            self.pending_since = Some(std::time::Instant::now());
        }
        self.pending.push(pending);
        Ok(())
    }
}

/// The basis of a file named `name` in `dir`: the explicit `basis`, or the
/// file itself (None when it cannot be opened). Never an inode a local user
/// linked from elsewhere (hashes, copies, signatures would read it): an
/// explicit basis with foreign links is refused, a default one is no basis.
fn open_basis(
    root: &Root,
    dir: &OwnedFd,
    name: &[u8],
    basis: Option<&RelPath>,
) -> WResult<Option<File>> {
    match basis {
        Some(b) => {
            let (bdir, bname) = root.parent(b)?;
            let f = open_regular(root, &bdir, bname).map_err(|e| errno_err(e, "open basis", b))?;
            if foreign_links(f.as_fd()) {
                return Err(super::meta::foreign_links_error(b, false));
            }
            Ok(Some(f))
        }
        None => Ok(open_regular(root, dir, name)
            .ok()
            .filter(|f| !foreign_links(f.as_fd()))),
    }
}

/// Opens a regular file of the root (not on another file system).
fn open_regular(root: &Root, dir: &OwnedFd, name: &[u8]) -> nix::Result<File> {
    let fd = open_nofollow(dir.as_fd(), OsStr::from_bytes(name), false)?;
    let st = nix::sys::stat::fstat(fd.as_fd())?;
    if root.dev().is_some_and(|d| d != st.st_dev) {
        return Err(nix::errno::Errno::EXDEV);
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(nix::errno::Errno::EINVAL);
    }
    // Reads are plain blocking reads: clear O_NONBLOCK set for the open.
    nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()))?;
    Ok(File::from(fd))
}
