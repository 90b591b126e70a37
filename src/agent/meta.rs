//! Metadata on the slave: applying what the master sent under the agent's
//! policy (setuid/setgid stripped from files unless `preserve_setuid`),
//! reading xattrs within a bound, and the marks that tell inodes whose
//! hard links georep made from inodes a local user linked from elsewhere.

use super::settings::Policy;
use super::sys::{errno_err, io_err, is_root_user, timespec, WResult};
use crate::fs::meta::{replicated_xattr, Meta};
use crate::protocol::{ErrorKind, WireError};
use nix::errno::Errno;
use nix::sys::stat::{fchmod, fstat, futimens, Mode};
use nix::unistd::{fchown, Gid, Uid};
use serde_bytes::ByteBuf;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Largest total of one entry's replicated xattrs (names and values) the
/// agent reads or writes: an entry beyond it cannot be listed (its
/// metadata would not fit a frame with room to spare).
pub const MAX_XATTRS: usize = 8 << 20;
/// The setuid and setgid bits.
const SETID: u32 = 0o6000;

/// Where the agent records the setuid/setgid bits it stripped from a file
/// (octal), so it reports the mode the master sent and crawls converge. In
/// the `trusted.` namespace when the agent runs as root (no user can forge
/// it), else under georep's own `user.georep.` prefix (never replicated).
pub fn setid_attr() -> &'static str {
    if is_root_user() {
        "trusted.georep.setid"
    } else {
        "user.georep.setid"
    }
}

/// Where the agent records how many names it gave an inode by `Link`: more
/// links than that were made by someone else (namespace as [`setid_attr`]).
pub fn links_attr() -> &'static str {
    if is_root_user() {
        "trusted.georep.links"
    } else {
        "user.georep.links"
    }
}

fn dup(fd: BorrowedFd<'_>, rel: &dyn std::fmt::Display) -> WResult<File> {
    fd.try_clone_to_owned()
        .map(File::from)
        .map_err(|e| io_err(e, "dup", rel))
}

/// Owner as sent (numeric ids are kept: a DR copy restores them), mode
/// under the policy: files lose setuid/setgid unless `preserve_setuid`
/// (the stripped bits are recorded, see [`setid_attr`]); directories keep
/// setgid (group inheritance grants no privilege).
pub fn apply_owner_mode(
    fd: BorrowedFd<'_>,
    meta: &Meta,
    rel: &dyn std::fmt::Display,
    policy: &Policy,
) -> WResult<()> {
    use xattr::FileExt;
    match fchown(
        fd,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
    ) {
        Ok(()) => {}
        Err(Errno::EPERM) if !is_root_user() => {}
        Err(e) => return Err(errno_err(e, "chown", rel)),
    }
    let st = fstat(fd).map_err(|e| errno_err(e, "stat", rel))?;
    let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
    let stripped = if is_dir || policy.preserve_setuid {
        0
    } else {
        meta.mode & SETID
    };
    let file = dup(fd, rel)?;
    let attr = setid_attr();
    let had = file.get_xattr(attr).ok().flatten().is_some();
    if stripped != 0 {
        file.set_xattr(attr, format!("{stripped:o}").as_bytes())
            .map_err(|e| io_err(e, "record the setuid bits of", rel))?;
    } else if had {
        file.remove_xattr(attr)
            .map_err(|e| io_err(e, "remove xattr", rel))?;
    }
    fchmod(fd, Mode::from_bits_truncate(meta.mode & !stripped))
        .map_err(|e| errno_err(e, "chmod", rel))
}

/// Owner, mode, replicated xattrs, then mtime (last, as the others touch ctime only).
pub fn apply_meta(
    fd: BorrowedFd<'_>,
    meta: &Meta,
    rel: &dyn std::fmt::Display,
    policy: &Policy,
) -> WResult<()> {
    apply_owner_mode(fd, meta, rel, policy)?;
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
    let total: usize = want.iter().map(|(n, v)| n.len() + v.len()).sum();
    if total > MAX_XATTRS {
        return Err(WireError::new(
            ErrorKind::Invalid,
            format!("{rel}: {total} bytes of xattrs, above the agent's {MAX_XATTRS}-byte limit"),
        ));
    }
    let file = dup(fd, rel)?;
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

/// An entry's replicated xattrs (sorted) and the setuid/setgid bits the
/// agent stripped from it, read without following `p`'s final symlink;
/// refused beyond [`MAX_XATTRS`]. A file system without xattrs has none.
pub fn read_xattrs(p: &Path, shown: &str) -> WResult<(Vec<(ByteBuf, ByteBuf)>, u32)> {
    let names = match xattr::list(p) {
        Ok(n) => n,
        Err(_) => return Ok((Vec::new(), 0)),
    };
    let mut out = Vec::new();
    let mut total = 0usize;
    let mut setid = 0;
    for name in names {
        let n = name.as_bytes();
        if n == setid_attr().as_bytes() {
            if let Ok(Some(v)) = xattr::get(p, &name) {
                let bits = std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| u32::from_str_radix(s, 8).ok());
                setid = bits.unwrap_or(0) & SETID;
            }
            continue;
        }
        if !replicated_xattr(n) {
            continue;
        }
        let Ok(Some(v)) = xattr::get(p, &name) else {
            continue;
        };
        total += n.len() + v.len();
        if total > MAX_XATTRS {
            return Err(WireError::new(
                ErrorKind::Invalid,
                format!("{shown}: user xattrs above {MAX_XATTRS} bytes: too large to replicate; remove some"),
            ));
        }
        out.push((ByteBuf::from(n.to_vec()), ByteBuf::from(v)));
    }
    out.sort();
    Ok((out, setid))
}

/// Whether the regular file `fd` has more hard links than georep made
/// (see [`links_attr`]): a name a local user linked to an inode from
/// elsewhere, possibly outside the root.
pub fn foreign_links(fd: BorrowedFd<'_>) -> bool {
    use xattr::FileExt;
    let Ok(st) = fstat(fd) else { return true };
    if st.st_nlink <= 1 || st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return false;
    }
    let made = fd
        .try_clone_to_owned()
        .ok()
        .map(File::from)
        .and_then(|f| f.get_xattr(links_attr()).ok().flatten())
        .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u64>().ok())
        .unwrap_or(1);
    st.st_nlink > made
}

/// Records that georep gave the inode `fd` all the links it has now.
pub fn mark_links(fd: BorrowedFd<'_>, rel: &dyn std::fmt::Display) -> WResult<()> {
    use xattr::FileExt;
    let st = fstat(fd).map_err(|e| errno_err(e, "stat", rel))?;
    dup(fd, rel)?
        .set_xattr(links_attr(), st.st_nlink.to_string().as_bytes())
        .map_err(|e| io_err(e, "record the hard links of", rel))
}

/// The error for an inode with links georep did not make.
pub fn foreign_links_error(rel: &dyn std::fmt::Display, removed: bool) -> WireError {
    let what = if removed {
        "the name was removed (the file is sent again by the next sync)"
    } else {
        "not touched; remove the extra link on the slave"
    };
    WireError::new(
        ErrorKind::Permission,
        format!("{rel}: has hard links georep did not make (a link to a file outside the slave root?): {what}"),
    )
}
