//! Copies into and out of a quarantine with the entry's metadata (mode,
//! owner as root, mtime, user xattrs but georep's own).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// The user xattrs of `src` (georep's own aside) onto `dst`.
pub fn copy_xattrs(src: &Path, dst: &Path) -> std::io::Result<()> {
    for (n, v) in crate::fs::meta::read_xattrs(src).unwrap_or_default() {
        xattr::set(dst, OsStr::from_bytes(&n), &v)?;
    }
    Ok(())
}

/// Owner (as root) and mtime of `md` onto the symlink `dst`.
pub fn symlink_meta(dst: &Path, md: &std::fs::Metadata) -> std::io::Result<()> {
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::lchown(dst, Some(md.uid()), Some(md.gid()))?;
    }
    let ts = nix::sys::time::TimeSpec::new(md.mtime(), md.mtime_nsec());
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        dst,
        &ts,
        &ts,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(std::io::Error::from)
}

/// Mode, owner (as root) and mtime of `md` onto `dst` (not a symlink).
pub fn apply_meta(dst: &Path, md: &std::fs::Metadata) -> std::io::Result<()> {
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(dst, Some(md.uid()), Some(md.gid()))?;
    }
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(md.mode() & 0o7777))?;
    let ts = nix::sys::time::TimeSpec::new(md.mtime(), md.mtime_nsec());
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        dst,
        &ts,
        &ts,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(std::io::Error::from)
}

/// Copies a quarantined entry to `dst` (which must not exist): a file
/// through a temporary beside it and a rename, a symlink, a directory.
pub fn copy_entry(src: &Path, dst: &Path) -> std::io::Result<()> {
    let md = src.symlink_metadata()?;
    if md.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(src)?, dst)?;
        return symlink_meta(dst, &md);
    }
    if md.is_dir() {
        match std::fs::create_dir(dst) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(e),
        }
        return apply_meta(dst, &md);
    }
    let mut tmp_name = crate::protocol::TMP_PREFIX.to_vec();
    tmp_name.extend_from_slice(b"restore-");
    tmp_name.extend_from_slice(dst.file_name().map(|n| n.as_bytes()).unwrap_or_default());
    let tmp = dst.with_file_name(OsStr::from_bytes(&tmp_name));
    let res = (|| {
        std::fs::copy(src, &tmp)?;
        for (n, v) in crate::fs::meta::read_xattrs(src)? {
            xattr::set(&tmp, OsStr::from_bytes(&n), &v)?;
        }
        apply_meta(&tmp, &md)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, dst)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}
