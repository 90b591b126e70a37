//! The old master's tree as a quarantine walk reaches it: every entry
//! beneath the root through no symlink (`openat2` with `RESOLVE_BENEATH`
//! and `RESOLVE_NO_SYMLINKS` from the root's descriptor, as the agent's
//! other requests), named by a path through its parent's descriptor so
//! that std's and `xattr`'s `l*` calls act on the entry itself.

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// An entry of the old master reached beneath its root through no
/// symlink: its parent directory's descriptor (open while `path` is used)
/// and a path through that descriptor, so that the `l*` calls std and
/// `xattr` make act on the entry itself, never on what a symlink names.
pub struct Beneath {
    _dir: Option<OwnedFd>,
    pub path: PathBuf,
}

pub fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The root of a quarantine walk.
pub struct Tree {
    root: PathBuf,
    fd: OwnedFd,
    /// Entries on another file system than the root's are not reached.
    no_xdev: bool,
}

impl Tree {
    pub fn new(root: &Path, fd: OwnedFd, no_xdev: bool) -> Tree {
        Tree {
            root: root.to_path_buf(),
            fd,
            no_xdev,
        }
    }

    /// The directory `rel` (the root: empty) opened beneath the root.
    pub fn open_dir(&self, rel: &[u8]) -> Option<OwnedFd> {
        let mut resolve = ResolveFlag::RESOLVE_BENEATH
            | ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_NO_MAGICLINKS;
        if self.no_xdev {
            resolve |= ResolveFlag::RESOLVE_NO_XDEV;
        }
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
            .resolve(resolve);
        let p: &OsStr = if rel.is_empty() {
            OsStr::new(".")
        } else {
            OsStr::from_bytes(rel)
        };
        openat2(self.fd.as_fd(), p, how).ok()
    }

    /// The entry `rel`, reached beneath the root (None: gone, or only
    /// through a symlink or another file system).
    pub fn entry(&self, rel: &[u8]) -> Option<Beneath> {
        if rel.is_empty() {
            return Some(Beneath {
                _dir: None,
                path: self.root.clone(),
            });
        }
        let (parent, name) = match rel.iter().rposition(|&b| b == b'/') {
            Some(i) => (&rel[..i], &rel[i + 1..]),
            None => (&b""[..], rel),
        };
        let fd = self.open_dir(parent)?;
        let path = fd_path(&fd).join(OsStr::from_bytes(name));
        Some(Beneath {
            _dir: Some(fd),
            path,
        })
    }
}
