//! Filesystem operations confined to the agent's root.
//!
//! Every path is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS
//! | RESOLVE_NO_XDEV)` from the root's file descriptor to the entry's parent
//! directory, and the final name is operated on with `*at` calls that never
//! follow a symlink; a final component on another file system is refused
//! too (unless the slave's settings allow `cross_mounts`). So whatever the
//! master sends, nothing outside the root is touched.

use super::meta::{apply_owner_mode, foreign_links, foreign_links_error, mark_links};
use super::settings::Policy;
use crate::fs::meta::{Entry, Kind, Meta};
use crate::fs::relpath::RelPath;
use crate::protocol::{ErrorKind, SlaveIdentity, WireError};
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstatat, mkdirat, utimensat, Mode, UtimensatFlags};
use nix::unistd::{fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};
use serde_bytes::ByteBuf;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

pub use super::meta::apply_meta;
pub use super::sys::{
    errno_err, io_err, is_root_user, open_nofollow, rename_over, timespec, tmp_name, WResult,
};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub use crate::protocol::{STATE_DIR, TMP_PREFIX};

/// Refuses paths that name georep's own files on the slave.
fn check_reserved(p: &RelPath) -> WResult<()> {
    let mut first = true;
    for c in p.components() {
        if (first && crate::protocol::reserved_at_root(c)) || c.starts_with(TMP_PREFIX) {
            return Err(WireError::new(
                ErrorKind::InvalidPath,
                format!("{p}: name reserved for georep's own files"),
            ));
        }
        first = false;
    }
    Ok(())
}

pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
    /// The root's device: entries on another one are refused (see [`Policy`]).
    dev: u64,
    policy: Policy,
}

impl Root {
    /// Opens the root with the default policy (see [`Root::set_policy`]).
    pub fn open(path: &Path) -> std::io::Result<Root> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let dev = nix::sys::stat::fstat(fd.as_fd())?.st_dev;
        Ok(Root {
            fd,
            path: path.to_path_buf(),
            dev,
            policy: Policy::default(),
        })
    }

    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The device an entry must be on (None: any, `cross_mounts`).
    pub fn dev(&self) -> Option<u64> {
        (!self.policy.cross_mounts).then_some(self.dev)
    }

    /// Refuses an opened entry on another file system than the root's.
    pub fn check_dev(&self, fd: BorrowedFd<'_>, rel: &dyn std::fmt::Display) -> WResult<()> {
        let Some(dev) = self.dev() else { return Ok(()) };
        let st = nix::sys::stat::fstat(fd).map_err(|e| errno_err(e, "stat", rel))?;
        if st.st_dev != dev {
            return Err(errno_err(Errno::EXDEV, "open", rel));
        }
        Ok(())
    }

    /// Opens `name` in `dir` (an entry of the root) without following a
    /// symlink, refused on another file system.
    pub fn open_entry(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        is_dir: bool,
        rel: &dyn std::fmt::Display,
    ) -> WResult<OwnedFd> {
        let fd = open_nofollow(dir, OsStr::from_bytes(name), is_dir)
            .map_err(|e| errno_err(e, "open", rel))?;
        self.check_dev(fd.as_fd(), rel)?;
        Ok(fd)
    }

    /// The same root through a duplicated descriptor (for another thread).
    pub fn try_clone(&self) -> std::io::Result<Root> {
        Ok(Root {
            fd: self.fd.try_clone()?,
            path: self.path.clone(),
            dev: self.dev,
            policy: self.policy,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the directory `rel` beneath the root without following any symlink.
    pub fn dir(&self, rel: &RelPath) -> WResult<OwnedFd> {
        let mut resolve = ResolveFlag::RESOLVE_BENEATH
            | ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_NO_MAGICLINKS;
        if !self.policy.cross_mounts {
            resolve |= ResolveFlag::RESOLVE_NO_XDEV;
        }
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
            .resolve(resolve);
        openat2(self.fd.as_fd(), rel.as_os_str(), how)
            .map_err(|e| errno_err(e, "open directory", rel))
    }

    /// The parent directory of `rel` (opened beneath the root) and its final name.
    pub fn parent<'a>(&self, rel: &'a RelPath) -> WResult<(OwnedFd, &'a [u8])> {
        check_reserved(rel)?;
        let (parent, name) = rel.split_last().ok_or_else(|| {
            WireError::new(
                ErrorKind::InvalidPath,
                "the slave root itself cannot be replaced or removed",
            )
        })?;
        Ok((self.dir(&parent)?, name))
    }

    pub fn stat(&self, rel: &RelPath) -> WResult<Option<Entry>> {
        if rel.is_root() {
            return stat_entry(self.fd.as_fd(), OsStr::new("."), b"", &self.policy).map(Some);
        }
        let (dir, name) = match self.parent(rel) {
            Ok(x) => x,
            Err(e) if e.kind == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match stat_entry(dir.as_fd(), OsStr::from_bytes(name), name, &self.policy) {
            Ok(e) => Ok(Some(e)),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Lists `rel` in name order, one entry at a time into `sink` (so that
    /// the metadata of a large directory is never all in memory), hiding
    /// georep's own files and removing stale temporaries (`in_use` says
    /// which temporaries belong to files being assembled; with
    /// `keep_young`, those changed in the last hour are kept too: they may
    /// be another agent's of the same stream group).
    pub fn list(
        &self,
        rel: &RelPath,
        in_use: &dyn Fn(&[u8]) -> bool,
        keep_young: bool,
        sink: &mut dyn FnMut(Entry) -> WResult<()>,
    ) -> WResult<()> {
        check_reserved(rel)?;
        let dir = self.dir(rel)?;
        let mut d =
            nix::dir::Dir::from_fd(nix::unistd::dup(&dir).map_err(|e| errno_err(e, "list", rel))?)
                .map_err(|e| errno_err(e, "list", rel))?;
        let mut names = Vec::new();
        for ent in d.iter() {
            let ent = ent.map_err(|e| errno_err(e, "list", rel))?;
            let name = ent.file_name().to_bytes();
            if name == b"."
                || name == b".."
                || (rel.is_root() && crate::protocol::reserved_at_root(name))
            {
                continue;
            }
            if name.starts_with(TMP_PREFIX) {
                // Partials are removed by their progress records' rules.
                let partial = name.starts_with(crate::protocol::PARTIAL_PREFIX);
                let keep = partial || in_use(name) || (keep_young && young(dir.as_fd(), name));
                if !keep {
                    let _ = unlinkat(
                        dir.as_fd(),
                        OsStr::from_bytes(name),
                        UnlinkatFlags::NoRemoveDir,
                    );
                }
                continue;
            }
            names.push(name.to_vec());
        }
        names.sort();
        for name in names {
            match stat_entry(dir.as_fd(), OsStr::from_bytes(&name), &name, &self.policy) {
                Ok(e) => sink(e)?,
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub fn mkdir(&self, rel: &RelPath, meta: &Meta) -> WResult<()> {
        let (dir, name) = self.parent(rel)?;
        let name = OsStr::from_bytes(name);
        match mkdirat(dir.as_fd(), name, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(errno_err(e, "mkdir", rel)),
        }
        let fd = self.open_entry(dir.as_fd(), name.as_bytes(), true, rel)?;
        apply_owner_mode(fd.as_fd(), meta, rel, &self.policy)
    }

    /// Removes an entry, a directory with everything below it (never
    /// into another file system unless `cross_mounts`).
    pub fn remove(&self, rel: &RelPath) -> WResult<()> {
        let (dir, name) = self.parent(rel)?;
        super::remove::remove_tree(dir.as_fd(), OsStr::from_bytes(name), self.dev())
            .map_err(|e| errno_err(e, "remove", rel))
    }

    pub fn symlink(&self, rel: &RelPath, target: &[u8], meta: &Meta) -> WResult<()> {
        if target.is_empty() || target.contains(&0) {
            return Err(WireError::new(
                ErrorKind::Invalid,
                format!("{rel}: invalid symlink target"),
            ));
        }
        let (dir, name) = self.parent(rel)?;
        let tmp = tmp_name();
        let tmp_os = OsStr::from_bytes(&tmp);
        symlinkat(OsStr::from_bytes(target), dir.as_fd(), tmp_os)
            .map_err(|e| errno_err(e, "symlink", rel))?;
        let res = (|| {
            match fchownat(
                dir.as_fd(),
                tmp_os,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            ) {
                Ok(()) => {}
                Err(Errno::EPERM) if !is_root_user() => {}
                Err(e) => return Err(errno_err(e, "chown", rel)),
            }
            let ts = timespec(meta);
            utimensat(
                dir.as_fd(),
                tmp_os,
                &ts,
                &ts,
                UtimensatFlags::NoFollowSymlink,
            )
            .map_err(|e| errno_err(e, "utimes", rel))?;
            rename_over(dir.as_fd(), tmp_os, OsStr::from_bytes(name))
                .map_err(|e| errno_err(e, "rename", rel))
        })();
        if res.is_err() {
            let _ = unlinkat(dir.as_fd(), tmp_os, UnlinkatFlags::NoRemoveDir);
        }
        res
    }

    pub fn link(&self, rel: &RelPath, target: &RelPath) -> WResult<()> {
        let (tdir, tname) = self.parent(target)?;
        let (dir, name) = self.parent(rel)?;
        let tst = fstatat(
            tdir.as_fd(),
            OsStr::from_bytes(tname),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| errno_err(e, "stat", target))?;
        if let Ok(st) = fstatat(
            dir.as_fd(),
            OsStr::from_bytes(name),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            // Already a link to the same inode: rename() between two links
            // of one inode does nothing, so there is nothing to do either.
            if (st.st_dev, st.st_ino) == (tst.st_dev, tst.st_ino) {
                return Ok(());
            }
        }
        // A regular file's inode must be one georep owns: never link to a
        // local user's link (symlinks are linked as they are).
        let tfd = if tst.st_mode & libc::S_IFMT == libc::S_IFREG {
            let fd = self.open_entry(tdir.as_fd(), tname, false, target)?;
            if foreign_links(fd.as_fd()) {
                return Err(foreign_links_error(target, false));
            }
            Some(fd)
        } else {
            None
        };
        let tmp = tmp_name();
        let tmp_os = OsStr::from_bytes(&tmp);
        linkat(
            tdir.as_fd(),
            OsStr::from_bytes(tname),
            dir.as_fd(),
            tmp_os,
            AtFlags::empty(),
        )
        .map_err(|e| errno_err(e, "link", rel))?;
        rename_over(dir.as_fd(), tmp_os, OsStr::from_bytes(name)).map_err(|e| {
            let _ = unlinkat(dir.as_fd(), tmp_os, UnlinkatFlags::NoRemoveDir);
            errno_err(e, "rename", rel)
        })?;
        match tfd {
            Some(fd) => mark_links(fd.as_fd(), target),
            None => Ok(()),
        }
    }

    pub fn set_meta(&self, rel: &RelPath, meta: &Meta) -> WResult<()> {
        if rel.is_root() {
            return apply_meta(self.fd.as_fd(), meta, rel, &self.policy);
        }
        let (dir, name) = self.parent(rel)?;
        let name_os = OsStr::from_bytes(name);
        let st = fstatat(dir.as_fd(), name_os, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| errno_err(e, "stat", rel))?;
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            match fchownat(
                dir.as_fd(),
                name_os,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            ) {
                Ok(()) => {}
                Err(Errno::EPERM) if !is_root_user() => {}
                Err(e) => return Err(errno_err(e, "chown", rel)),
            }
            let ts = timespec(meta);
            return utimensat(
                dir.as_fd(),
                name_os,
                &ts,
                &ts,
                UtimensatFlags::NoFollowSymlink,
            )
            .map_err(|e| errno_err(e, "utimes", rel));
        }
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let fd = self.open_entry(dir.as_fd(), name, is_dir, rel)?;
        if foreign_links(fd.as_fd()) {
            // Never through a local user's link: break it (the name goes).
            unlinkat(dir.as_fd(), name_os, UnlinkatFlags::NoRemoveDir)
                .map_err(|e| errno_err(e, "unlink", rel))?;
            return Err(foreign_links_error(rel, true));
        }
        apply_meta(fd.as_fd(), meta, rel, &self.policy)
    }

    /// Removes the name `name` in `dir` if its inode has hard links georep
    /// did not make (`fd` is that inode): the error to answer, else Ok.
    pub fn break_foreign_links(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        fd: BorrowedFd<'_>,
        rel: &dyn std::fmt::Display,
    ) -> WResult<()> {
        if !foreign_links(fd) {
            return Ok(());
        }
        unlinkat(dir, OsStr::from_bytes(name), UnlinkatFlags::NoRemoveDir)
            .map_err(|e| errno_err(e, "unlink", rel))?;
        Err(foreign_links_error(rel, true))
    }

    /// Refuses to go on when the root's path no longer names the directory
    /// the agent opened (moved away, replaced, removed): the slave a
    /// session writes is that path, so the worker is told (and goes Faulty)
    /// instead of writing on into a directory no one looks at.
    pub fn check_path(&self) -> WResult<()> {
        let st = nix::sys::stat::fstat(self.fd.as_fd())
            .map_err(|e| errno_err(e, "stat", &self.path.display()))?;
        let same = std::fs::metadata(&self.path).map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino()) == (st.st_dev, st.st_ino)
        });
        match same {
            Ok(true) => Ok(()),
            Ok(false) => Err(WireError::new(
                ErrorKind::NotFound,
                format!(
                    "slave root {} was replaced while the agent served it: check it on the slave",
                    self.path.display()
                ),
            )),
            Err(e) => Err(WireError::new(
                ErrorKind::NotFound,
                format!(
                    "slave root {}: {e} (moved or removed while the agent served it): check it on the slave",
                    self.path.display()
                ),
            )),
        }
    }

    pub fn identity(&self) -> WResult<Option<SlaveIdentity>> {
        self.check_path()?;
        Ok(self
            .read_state("identity.json")?
            .and_then(|b| serde_json::from_slice(&b).ok()))
    }

    pub fn set_identity(&self, id: &SlaveIdentity) -> WResult<()> {
        let data = serde_json::to_vec_pretty(id).expect("identity serializes");
        self.write_state("identity.json", &data)
    }

    /// The file `name` of the agent's own directory (None: it has none),
    /// read without following a symlink: a `.georep` or a file in it
    /// replaced by a symlink is refused, never read through.
    pub fn read_state(&self, name: &str) -> WResult<Option<Vec<u8>>> {
        let disp = format!(".georep/{name}");
        let dir = match open_nofollow(self.fd.as_fd(), OsStr::from_bytes(STATE_DIR), true) {
            Ok(d) => d,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(errno_err(e, "open", &".georep")),
        };
        let f = match openat(
            dir.as_fd(),
            OsStr::new(name),
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::empty(),
        ) {
            Ok(f) => File::from(f),
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(errno_err(e, "open", &disp)),
        };
        let st = nix::sys::stat::fstat(f.as_fd()).map_err(|e| errno_err(e, "stat", &disp))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_size > 16 << 20 {
            return Err(WireError::new(
                ErrorKind::InvalidPath,
                format!("{disp}: not a georep state file (not a regular file, or too large): move it away"),
            ));
        }
        let mut b = Vec::new();
        use std::io::Read;
        (&f).read_to_end(&mut b)
            .map_err(|e| io_err(e, "read", &disp))?;
        Ok(Some(b))
    }

    /// Replaces the file `name` of the agent's own directory durably
    /// (temporary file, fsync, rename, fsync of the directory), beneath
    /// the root and through no symlink.
    pub fn write_state(&self, name: &str, data: &[u8]) -> WResult<()> {
        let disp = format!(".georep/{name}");
        let state = self.state_dir()?;
        let tmp = tmp_name();
        let f = openat(
            state.as_fd(),
            OsStr::from_bytes(&tmp),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .map_err(|e| errno_err(e, "write", &disp))?;
        let f = File::from(f);
        use std::io::Write;
        let res = (&f)
            .write_all(data)
            .map_err(|e| io_err(e, "write", &disp))
            .and_then(|_| f.sync_all().map_err(|e| io_err(e, "fsync", &disp)))
            .and_then(|_| {
                rename_over(state.as_fd(), OsStr::from_bytes(&tmp), OsStr::new(name))
                    .map_err(|e| errno_err(e, "rename", &disp))
            });
        if res.is_err() {
            let _ = unlinkat(
                state.as_fd(),
                OsStr::from_bytes(&tmp),
                UnlinkatFlags::NoRemoveDir,
            );
        }
        res?;
        nix::unistd::fsync(state.as_fd()).map_err(|e| errno_err(e, "fsync", &disp))
    }

    /// The agent's own directory at the root, created on first use.
    pub fn state_dir(&self) -> WResult<OwnedFd> {
        let name = OsStr::from_bytes(STATE_DIR);
        let before = nix::sys::stat::fstat(self.fd.as_fd()).ok();
        match mkdirat(self.fd.as_fd(), name, Mode::from_bits_truncate(0o700)) {
            Ok(()) => {
                // The root's mtime is replicated data: georep's own
                // directory must not move it.
                if let Some(st) = before {
                    let at = nix::sys::time::TimeSpec::new(st.st_atime, st.st_atime_nsec);
                    let mt = nix::sys::time::TimeSpec::new(st.st_mtime, st.st_mtime_nsec);
                    let _ = nix::sys::stat::futimens(self.fd.as_fd(), &at, &mt);
                }
            }
            Err(Errno::EEXIST) => {}
            Err(e) => return Err(errno_err(e, "mkdir", &".georep")),
        }
        open_nofollow(self.fd.as_fd(), name, true).map_err(|e| errno_err(e, "open", &".georep"))
    }
}

/// Whether entry `name` of `dir` changed within the last hour (by its
/// ctime: a verified temporary already carries the master's mtime).
fn young(dir: BorrowedFd<'_>, name: &[u8]) -> bool {
    match nix::sys::stat::fstatat(
        dir,
        OsStr::from_bytes(name),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    ) {
        Ok(st) => crate::fs::xtime::now_ns() / 1_000_000_000 < st.st_ctime as u64 + 3600,
        Err(_) => false,
    }
}

/// An entry as the agent reports it: a regular file's mode with the
/// setuid/setgid bits it recorded as stripped, and without those on disk
/// that its policy does not allow (a file of an old master, a local
/// user's chmod): the master's mode then differs, and the `SetMeta` it
/// sends applies the policy.
fn stat_entry(
    dir: BorrowedFd<'_>,
    name_os: &OsStr,
    name: &[u8],
    policy: &Policy,
) -> WResult<Entry> {
    let disp = String::from_utf8_lossy(name);
    let st = fstatat(dir, name_os, AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(|e| errno_err(e, "stat", &disp))?;
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => Kind::File,
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFLNK => Kind::Symlink,
        _ => Kind::Other,
    };
    let target = if kind == Kind::Symlink {
        Some(ByteBuf::from(
            nix::fcntl::readlinkat(dir, name_os)
                .map_err(|e| errno_err(e, "readlink", &disp))?
                .as_bytes()
                .to_vec(),
        ))
    } else {
        None
    };
    let (xattrs, setid) = if matches!(kind, Kind::File | Kind::Dir) {
        super::meta::read_xattrs(&proc_path(dir, name), &disp)?
    } else {
        (Vec::new(), 0)
    };
    Ok(Entry {
        name: ByteBuf::from(name.to_vec()),
        kind,
        size: if kind == Kind::File {
            st.st_size as u64
        } else {
            0
        },
        meta: Meta {
            // With the setuid/setgid bits the agent stripped (as the master sent them).
            mode: if kind == Kind::File && !policy.preserve_setuid {
                st.st_mode & 0o7777 & !0o6000 | setid
            } else {
                st.st_mode & 0o7777 | setid
            },
            uid: st.st_uid,
            gid: st.st_gid,
            mtime: crate::fs::meta::Timestamp {
                sec: st.st_mtime,
                nsec: st.st_mtime_nsec as u32,
            },
            xattrs,
        },
        dev: st.st_dev,
        ino: st.st_ino,
        nlink: st.st_nlink,
        target,
    })
}

/// `/proc/self/fd/N/name`: a path through our own directory fd, for the
/// xattr calls that have no `*at` form. The l* calls do not follow `name`.
fn proc_path(dir: BorrowedFd<'_>, name: &[u8]) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    if !name.is_empty() {
        p.push(OsStr::from_bytes(name));
    }
    p
}
