//! Removal of a directory tree with bounded stack and file descriptors,
//! whatever its depth (a tree built by renames can be deeper than any
//! path): an explicit stack of the directories being emptied, holding
//! descriptors for the deepest [`HELD`] only. Going back up to a directory
//! whose descriptor was let go opens `..` and checks it is the directory
//! that was descended from (device and inode), so a tree moved while it is
//! removed is never followed elsewhere. Never enters another file system
//! (unless allowed): a mount point under the tree stops the removal before
//! anything in it is touched.

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

/// Directory descriptors held at most while removing.
pub const HELD: usize = 16;
/// Names read from a directory at a time.
const BATCH: usize = 256;

struct Level {
    fd: Option<OwnedFd>,
    dev: u64,
    ino: u64,
    /// Its name in the level above.
    name: Vec<u8>,
}

fn open_dir(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Opens the directory `name` in `dir` as a new level, refused on another device.
fn level(dir: BorrowedFd<'_>, name: &[u8], dev: Option<u64>) -> nix::Result<Level> {
    let fd = open_dir(dir, OsStr::from_bytes(name))?;
    let st = fstat(fd.as_fd())?;
    if dev.is_some_and(|d| d != st.st_dev) {
        return Err(Errno::EXDEV);
    }
    Ok(Level {
        fd: Some(fd),
        dev: st.st_dev,
        ino: st.st_ino,
        name: name.to_vec(),
    })
}

/// Up to [`BATCH`] names of the directory `fd` (a fresh read from its start).
fn names(fd: BorrowedFd<'_>) -> nix::Result<Vec<Vec<u8>>> {
    let mut d = Dir::openat(
        fd,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut out = Vec::new();
    for e in d.iter() {
        let n = e?.file_name().to_bytes().to_vec();
        if n != b"." && n != b".." {
            out.push(n);
            if out.len() == BATCH {
                break;
            }
        }
    }
    Ok(out)
}

/// Unlinks a non-directory; Ok(false) when `name` is a directory.
fn unlink_file(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<bool> {
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(true),
        Err(Errno::EISDIR) => Ok(false),
        // EPERM: a directory on Linux, or a file that cannot be removed.
        Err(Errno::EPERM) => match fstat_at_is_dir(dir, name) {
            Some(true) => Ok(false),
            _ => Err(Errno::EPERM),
        },
        Err(e) => Err(e),
    }
}

fn fstat_at_is_dir(dir: BorrowedFd<'_>, name: &OsStr) -> Option<bool> {
    nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
        .ok()
        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
}

fn rmdir(dir: BorrowedFd<'_>, name: &[u8]) -> nix::Result<()> {
    match unlinkat(dir, OsStr::from_bytes(name), UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes `name` in `dir`, recursively for a directory; absence is
/// success. `dev`: the device everything must be on (None: any).
pub fn remove_tree(dir: BorrowedFd<'_>, name: &OsStr, dev: Option<u64>) -> nix::Result<()> {
    if unlink_file(dir, name)? {
        return Ok(());
    }
    let mut stack = match level(dir, name.as_bytes(), dev) {
        Ok(l) => vec![l],
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    loop {
        let top = stack.last().expect("a level");
        let fd = top
            .fd
            .as_ref()
            .expect("the deepest levels hold a descriptor");
        let batch = names(fd.as_fd())?;
        let mut child = None;
        for n in &batch {
            if !unlink_file(fd.as_fd(), OsStr::from_bytes(n))? {
                match level(fd.as_fd(), n, dev) {
                    Ok(l) => {
                        child = Some(l);
                        break;
                    }
                    Err(Errno::ENOENT) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if let Some(l) = child {
            // The levels holding descriptors are the deepest ones, at most
            // HELD of them: let the shallowest go.
            stack.push(l);
            let n = stack.len();
            if n > HELD {
                stack[n - HELD - 1].fd = None;
            }
            continue;
        }
        if !batch.is_empty() {
            continue; // more names may follow the batch just removed
        }
        // Empty: remove it from the level above.
        let done = stack.pop().expect("a level");
        let Some(up) = stack.last_mut() else {
            return rmdir(dir, &done.name);
        };
        if up.fd.is_none() {
            let fd = done.fd.as_ref().expect("held");
            let parent = open_dir(fd.as_fd(), OsStr::new(".."))?;
            let st = fstat(parent.as_fd())?;
            if (st.st_dev, st.st_ino) != (up.dev, up.ino) {
                return Err(Errno::ESTALE);
            }
            up.fd = Some(parent);
        }
        rmdir(up.fd.as_ref().expect("held").as_fd(), &done.name)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_wide_and_deep_trees_holding_few_descriptors() {
        let d = tempfile::tempdir().unwrap();
        let top = d.path().join("t");
        // Wide: more names than a batch, files and directories mixed.
        for i in 0..600 {
            let sub = top.join(format!("d{}", i % 7));
            std::fs::create_dir_all(&sub).unwrap();
            std::fs::write(sub.join(format!("f{i}")), b"x").unwrap();
            std::fs::write(top.join(format!("g{i}")), b"y").unwrap();
        }
        // Deep: more levels than descriptors held.
        let mut p = top.join("deep");
        for _ in 0..(3 * HELD) {
            p = p.join("d");
        }
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("bottom"), b"z").unwrap();
        std::fs::create_dir(d.path().join("outside")).unwrap();
        std::fs::write(d.path().join("outside/keep"), b"k").unwrap();
        std::os::unix::fs::symlink(d.path().join("outside"), top.join("ln")).unwrap();
        let dir = std::fs::File::open(d.path()).unwrap();
        remove_tree(dir.as_fd(), OsStr::new("t"), None).unwrap();
        assert!(!top.exists());
        assert!(
            d.path().join("outside/keep").exists(),
            "a symlink is removed, not followed"
        );
        // Absent: success; a plain file: unlinked.
        remove_tree(dir.as_fd(), OsStr::new("t"), None).unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        remove_tree(dir.as_fd(), OsStr::new("f"), None).unwrap();
        assert!(!d.path().join("f").exists());
    }

    #[test]
    fn a_tree_on_another_device_is_not_entered() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("t/sub")).unwrap();
        std::fs::write(d.path().join("t/sub/f"), b"x").unwrap();
        let dir = std::fs::File::open(d.path()).unwrap();
        let dev = fstat(dir.as_fd()).unwrap().st_dev;
        let e = remove_tree(dir.as_fd(), OsStr::new("t"), Some(dev + 1)).unwrap_err();
        assert_eq!(e, Errno::EXDEV);
        assert!(d.path().join("t/sub/f").exists());
    }
}
