//! Filesystem operations confined to the agent's root.
//!
//! Every path is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`
//! from the root's file descriptor to the entry's parent directory, and the
//! final name is operated on with `*at` calls that never follow a symlink.
//! So whatever the master sends, nothing outside the root is touched.

use crate::fs::meta::{replicated_xattr, Entry, Kind, Meta};
use crate::fs::relpath::RelPath;
use crate::protocol::{ErrorKind, SlaveIdentity, WireError};
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fchmod, fstatat, futimens, mkdirat, utimensat, Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};
use serde_bytes::ByteBuf;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub use crate::protocol::{STATE_DIR, TMP_PREFIX};

pub type WResult<T> = Result<T, WireError>;

pub fn errno_err(e: Errno, what: &str, path: &dyn std::fmt::Display) -> WireError {
    let kind = match e {
        Errno::ENOENT | Errno::ENOTDIR => ErrorKind::NotFound,
        Errno::EEXIST | Errno::ENOTEMPTY => ErrorKind::Exists,
        Errno::ENOSPC | Errno::EDQUOT => ErrorKind::NoSpace,
        Errno::EACCES | Errno::EPERM | Errno::EROFS => ErrorKind::Permission,
        Errno::ELOOP | Errno::EXDEV => ErrorKind::InvalidPath,
        _ => ErrorKind::Io,
    };
    let hint = match e {
        Errno::ELOOP | Errno::EXDEV => {
            " (the path goes through a symlink or leaves the slave root)".to_string()
        }
        _ => String::new(),
    };
    WireError::new(kind, format!("{what} {path}: {}{hint}", e.desc()))
}

pub fn io_err(e: std::io::Error, what: &str, path: &dyn std::fmt::Display) -> WireError {
    match e.raw_os_error() {
        Some(n) => errno_err(Errno::from_raw(n), what, path),
        None => WireError::new(ErrorKind::Io, format!("{what} {path}: {e}")),
    }
}

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
}

impl Root {
    pub fn open(path: &Path) -> std::io::Result<Root> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Root {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the directory `rel` beneath the root without following any symlink.
    pub fn dir(&self, rel: &RelPath) -> WResult<OwnedFd> {
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
            .resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS,
            );
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
            return stat_entry(self.fd.as_fd(), OsStr::new("."), b"").map(Some);
        }
        let (dir, name) = match self.parent(rel) {
            Ok(x) => x,
            Err(e) if e.kind == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match stat_entry(dir.as_fd(), OsStr::from_bytes(name), name) {
            Ok(e) => Ok(Some(e)),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Lists `rel`, hiding georep's own files and removing stale temporaries
    /// (`in_use` says which temporaries belong to files being assembled).
    pub fn list(&self, rel: &RelPath, in_use: &dyn Fn(&[u8]) -> bool) -> WResult<Vec<Entry>> {
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
                if !in_use(name) {
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
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            match stat_entry(dir.as_fd(), OsStr::from_bytes(&name), &name) {
                Ok(e) => out.push(e),
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    pub fn mkdir(&self, rel: &RelPath, meta: &Meta) -> WResult<()> {
        let (dir, name) = self.parent(rel)?;
        let name = OsStr::from_bytes(name);
        match mkdirat(dir.as_fd(), name, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(errno_err(e, "mkdir", rel)),
        }
        let fd = open_nofollow(dir.as_fd(), name, true).map_err(|e| errno_err(e, "mkdir", rel))?;
        apply_owner_mode(fd.as_fd(), meta, rel)
    }

    pub fn remove(&self, rel: &RelPath) -> WResult<()> {
        let (dir, name) = self.parent(rel)?;
        remove_at(dir.as_fd(), OsStr::from_bytes(name)).map_err(|e| errno_err(e, "remove", rel))
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
        })
    }

    pub fn set_meta(&self, rel: &RelPath, meta: &Meta) -> WResult<()> {
        if rel.is_root() {
            return apply_meta(self.fd.as_fd(), meta, rel);
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
        let fd =
            open_nofollow(dir.as_fd(), name_os, is_dir).map_err(|e| errno_err(e, "open", rel))?;
        apply_meta(fd.as_fd(), meta, rel)
    }

    pub fn identity(&self) -> WResult<Option<SlaveIdentity>> {
        let path = self
            .path
            .join(OsStr::from_bytes(STATE_DIR))
            .join("identity.json");
        match std::fs::read(&path) {
            Ok(b) => Ok(serde_json::from_slice(&b).ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(e, "read", &path.display())),
        }
    }

    pub fn set_identity(&self, id: &SlaveIdentity) -> WResult<()> {
        let state = self.state_dir()?;
        let data = serde_json::to_vec_pretty(id).expect("identity serializes");
        let tmp = tmp_name();
        let f = openat(
            state.as_fd(),
            OsStr::from_bytes(&tmp),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .map_err(|e| errno_err(e, "write", &"identity"))?;
        let f = File::from(f);
        use std::io::Write;
        (&f).write_all(&data)
            .map_err(|e| io_err(e, "write", &"identity"))?;
        f.sync_all().map_err(|e| io_err(e, "fsync", &"identity"))?;
        rename_over(
            state.as_fd(),
            OsStr::from_bytes(&tmp),
            OsStr::new("identity.json"),
        )
        .map_err(|e| errno_err(e, "rename", &"identity"))?;
        nix::unistd::fsync(state.as_fd()).map_err(|e| errno_err(e, "fsync", &"identity"))
    }

    /// The agent's own directory at the root, created on first use.
    pub fn state_dir(&self) -> WResult<OwnedFd> {
        let name = OsStr::from_bytes(STATE_DIR);
        match mkdirat(self.fd.as_fd(), name, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(errno_err(e, "mkdir", &".georep")),
        }
        open_nofollow(self.fd.as_fd(), name, true).map_err(|e| errno_err(e, "open", &".georep"))
    }
}

pub fn is_root_user() -> bool {
    nix::unistd::geteuid().is_root()
}

pub fn tmp_name() -> Vec<u8> {
    let mut n = TMP_PREFIX.to_vec();
    n.extend_from_slice(format!("{:016x}", rand_u64()).as_bytes());
    n
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    if getrandom(&mut b).is_err() {
        let t = crate::fs::xtime::now_ns();
        return t ^ (std::process::id() as u64) << 32;
    }
    u64::from_le_bytes(b)
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    File::open("/dev/urandom")?.read_exact(buf)
}

pub fn open_nofollow(dir: BorrowedFd<'_>, name: &OsStr, is_dir: bool) -> nix::Result<OwnedFd> {
    let mut flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    if is_dir {
        flags |= OFlag::O_DIRECTORY;
    }
    openat(dir, name, flags, Mode::empty())
}

pub fn rename_over(dir: BorrowedFd<'_>, from: &OsStr, to: &OsStr) -> nix::Result<()> {
    nix::fcntl::renameat(dir, from, dir, to)
}

pub fn timespec(meta: &Meta) -> TimeSpec {
    TimeSpec::new(meta.mtime.sec, meta.mtime.nsec as _)
}

fn stat_entry(dir: BorrowedFd<'_>, name_os: &OsStr, name: &[u8]) -> WResult<Entry> {
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
    let xattrs = if matches!(kind, Kind::File | Kind::Dir) {
        let p = proc_path(dir, name);
        read_xattrs_lossy(&p)
    } else {
        Vec::new()
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
            mode: st.st_mode & 0o7777,
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

fn read_xattrs_lossy(p: &Path) -> Vec<(ByteBuf, ByteBuf)> {
    crate::fs::meta::read_xattrs(p).unwrap_or_default()
}

fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<()> {
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR) | Err(Errno::EPERM) => {}
        Err(e) => return Err(e),
    }
    // A directory: empty it through a no-follow fd, then remove it.
    let fd = match open_nofollow(dir, name, true) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut d = nix::dir::Dir::from_fd(nix::unistd::dup(&fd)?)?;
    let names: Vec<Vec<u8>> = d
        .iter()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_bytes().to_vec())
        .filter(|n| n != b"." && n != b"..")
        .collect();
    for n in names {
        remove_at(fd.as_fd(), OsStr::from_bytes(&n))?;
    }
    match unlinkat(dir, name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

fn apply_owner_mode(fd: BorrowedFd<'_>, meta: &Meta, rel: &dyn std::fmt::Display) -> WResult<()> {
    match fchown(
        fd,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
    ) {
        Ok(()) => {}
        Err(Errno::EPERM) if !is_root_user() => {}
        Err(e) => return Err(errno_err(e, "chown", rel)),
    }
    fchmod(fd, Mode::from_bits_truncate(meta.mode)).map_err(|e| errno_err(e, "chmod", rel))
}

/// Owner, mode, replicated xattrs, then mtime (last, as the others touch ctime only).
pub fn apply_meta(fd: BorrowedFd<'_>, meta: &Meta, rel: &dyn std::fmt::Display) -> WResult<()> {
    apply_owner_mode(fd, meta, rel)?;
    sync_xattrs(fd, &meta.xattrs, rel)?;
    let ts = timespec(meta);
    futimens(fd, &ts, &ts).map_err(|e| errno_err(e, "utimes", rel))
}

fn sync_xattrs(
    fd: BorrowedFd<'_>,
    want: &[(ByteBuf, ByteBuf)],
    rel: &dyn std::fmt::Display,
) -> WResult<()> {
    use xattr::FileExt;
    // xattr's fd API wants a File: use a duplicate of the descriptor.
    let file = File::from(fd.try_clone_to_owned().map_err(|e| io_err(e, "dup", rel))?);
    {
        let have = file
            .list_xattr()
            .map_err(|e| io_err(e, "list xattrs", rel))?;
        for name in have {
            let n = name.as_bytes();
            if replicated_xattr(n) && !want.iter().any(|(w, _)| w.as_slice() == n) {
                file.remove_xattr(&name)
                    .map_err(|e| io_err(e, "remove xattr", rel))?;
            }
        }
        for (n, v) in want {
            if !replicated_xattr(n) {
                continue;
            }
            let name = OsStr::from_bytes(n);
            if file.get_xattr(name).ok().flatten().as_deref() != Some(v.as_slice()) {
                file.set_xattr(name, v)
                    .map_err(|e| io_err(e, "set xattr", rel))?;
            }
        }
        Ok(())
    }
}
