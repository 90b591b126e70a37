//! Low-level helpers of the agent's file operations: errors from errno
//! with the slave path, no-follow opens, renames, temporary names.

use crate::fs::meta::Meta;
use crate::protocol::{ErrorKind, WireError};
use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;
use nix::sys::time::TimeSpec;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{BorrowedFd, OwnedFd};

pub use crate::protocol::TMP_PREFIX;

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
        Errno::ELOOP => " (the path goes through a symlink or leaves the slave root)",
        Errno::EXDEV => " (the path crosses into another file system, which the slave's settings do not allow (cross_mounts), or leaves the slave root)",
        Errno::ESTALE => " (the tree was moved while the agent worked on it)",
        _ => "",
    };
    WireError::new(kind, format!("{what} {path}: {}{hint}", e.desc()))
}

pub fn io_err(e: std::io::Error, what: &str, path: &dyn std::fmt::Display) -> WireError {
    match e.raw_os_error() {
        Some(n) => errno_err(Errno::from_raw(n), what, path),
        None => WireError::new(ErrorKind::Io, format!("{what} {path}: {e}")),
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
