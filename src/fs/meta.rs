//! Entry kinds and the metadata georep replicates: mode, numeric owner,
//! mtime with nanoseconds and user xattrs other than georep's own.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::fs::Metadata;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

/// Prefix of every xattr georep writes itself; never replicated.
pub const GEOREP_XATTR_PREFIX: &[u8] = b"user.georep.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// FIFOs, sockets and devices: listed, never replicated.
    Other,
}

impl Kind {
    pub fn of(md: &Metadata) -> Kind {
        let ft = md.file_type();
        if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else {
            debug_assert!(
                ft.is_fifo() || ft.is_socket() || ft.is_block_device() || ft.is_char_device()
            );
            Kind::Other
        }
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

/// The replicated metadata of one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Meta {
    /// Permission bits, including setuid/setgid/sticky (mode & 0o7777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
    /// `user.*` xattrs except georep's, sorted by name. Always empty for symlinks.
    pub xattrs: Vec<(ByteBuf, ByteBuf)>,
}

impl Meta {
    pub fn from_metadata(md: &Metadata, xattrs: Vec<(ByteBuf, ByteBuf)>) -> Meta {
        Meta {
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime: Timestamp {
                sec: md.mtime(),
                nsec: md.mtime_nsec() as u32,
            },
            xattrs,
        }
    }

    /// With the setuid/setgid bits an agent stripped from the regular file
    /// at `path` and recorded (a promoted replica's files): they are its
    /// data, sent on as the mode the old master had (the receiving agent
    /// applies its own policy to them).
    pub fn with_recorded_setid(mut self, path: &std::path::Path, md: &Metadata) -> Meta {
        self.mode |= recorded_setid(path, md);
        self
    }
}

/// The setuid/setgid bits an agent stripped from the regular file at
/// `path` and recorded in its xattr (0: none).
pub fn recorded_setid(path: &std::path::Path, md: &Metadata) -> u32 {
    if !md.is_file() {
        return 0;
    }
    ["trusted.georep.setid", "user.georep.setid"]
        .iter()
        .filter_map(|a| xattr::get(path, a).ok().flatten())
        .filter_map(|v| u32::from_str_radix(std::str::from_utf8(&v).ok()?, 8).ok())
        .fold(0, |m, b| m | (b & 0o6000))
}

/// One directory entry as either side lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: ByteBuf,
    pub kind: Kind,
    pub size: u64,
    pub meta: Meta,
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
    /// Target of a symlink.
    pub target: Option<ByteBuf>,
}

/// Whether an xattr name is one georep replicates.
pub fn replicated_xattr(name: &[u8]) -> bool {
    name.starts_with(b"user.") && !name.starts_with(GEOREP_XATTR_PREFIX)
}

/// Reads the replicated xattrs of `path` without following a final symlink.
pub fn read_xattrs(path: &std::path::Path) -> std::io::Result<Vec<(ByteBuf, ByteBuf)>> {
    Ok(read_xattrs_and(path, "")?.0)
}

/// Replicated attributes as (name, value), sorted by name.
pub type Xattrs = Vec<(ByteBuf, ByteBuf)>;

/// [`read_xattrs`], and the value of attribute `also` (one of georep's
/// own, e.g. an xtime) from the same listing: one `listxattr` for both,
/// and no `getxattr` at all for a file without attributes.
pub fn read_xattrs_and(
    path: &std::path::Path,
    also: &str,
) -> std::io::Result<(Xattrs, Option<Vec<u8>>)> {
    let (x, mut v) = read_xattrs_with(path, &[also])?;
    Ok((x, v.pop().flatten()))
}

/// [`read_xattrs`], and the values of the attributes `also` (georep's
/// own), from one listing.
pub fn read_xattrs_with(
    path: &std::path::Path,
    also: &[&str],
) -> std::io::Result<(Xattrs, Vec<Option<Vec<u8>>>)> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    let mut extra = vec![None; also.len()];
    for name in xattr::list(path)? {
        let n = name.as_bytes();
        if let Some(i) = also.iter().position(|a| !a.is_empty() && n == a.as_bytes()) {
            extra[i] = xattr::get(path, &name)?;
            continue;
        }
        if !replicated_xattr(n) {
            continue;
        }
        if let Some(v) = xattr::get(path, &name)? {
            out.push((ByteBuf::from(n.to_vec()), ByteBuf::from(v)));
        }
    }
    out.sort();
    Ok((out, extra))
}

/// Where an agent records the setuid/setgid bits it stripped from a file
/// (octal): in the `trusted.` namespace when it runs as root (no user can
/// forge it), else under georep's own `user.georep.` prefix (never
/// replicated). A replica that is itself a master (a cascade, a promoted
/// site) reports those bits as part of the file's mode.
pub fn setid_attr() -> &'static str {
    if nix::unistd::geteuid().is_root() {
        "trusted.georep.setid"
    } else {
        "user.georep.setid"
    }
}

/// The setuid/setgid bits recorded in a [`setid_attr`] value.
pub fn decode_setid(v: Option<&[u8]>) -> u32 {
    v.and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|s| u32::from_str_radix(s, 8).ok())
        .unwrap_or(0)
        & 0o6000
}
