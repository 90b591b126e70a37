//! Reading the master tree: listings with xtimes, stimes, file data.

use crate::fs::meta::{read_xattrs, Entry, Kind, Meta};
use crate::fs::relpath::RelPath;
use crate::fs::xtime;
use serde_bytes::ByteBuf;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// A master entry with its xtime (0 when never marked, and for symlinks).
#[derive(Debug, Clone)]
pub struct MEntry {
    pub entry: Entry,
    pub xtime: u64,
}

/// Errors reading the master, with the operation and path (and, when
/// access was refused, what the operator can do about it).
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}{}", fix(source))]
pub struct MasterError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// What to do about an error reading the master, as a suffix of its message.
fn fix(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            ": give the worker's user read access to it on the master (the next sync retries it)"
        }
        _ => "",
    }
}

impl MasterError {
    pub fn vanished(&self) -> bool {
        matches!(
            self.source.raw_os_error(),
            Some(libc::ENOENT) | Some(libc::ENOTDIR)
        )
    }
}

/// A directory's listing: the entries read, sorted by name, and those
/// that could not be read, with why.
#[derive(Debug, Default)]
pub struct Listing {
    pub entries: Vec<MEntry>,
    pub unreadable: Vec<(Vec<u8>, MasterError)>,
}

pub struct Master {
    root: PathBuf,
    xtime_attr: String,
    stime_attr: String,
    dirmark_attr: String,
}

fn err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> MasterError + 'a {
    move |source| MasterError {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Names on the master georep never replicates: they would collide with
/// the agent's own files on the slave.
pub fn reserved(dir: &RelPath, name: &[u8]) -> bool {
    (dir.is_root() && name == crate::protocol::STATE_DIR)
        || name.starts_with(crate::protocol::TMP_PREFIX)
}

impl Master {
    pub fn new(root: PathBuf, master_id: &Uuid, session_id: &Uuid) -> Master {
        Master {
            root,
            xtime_attr: xtime::xtime_attr(master_id),
            stime_attr: xtime::stime_attr(session_id),
            dirmark_attr: xtime::dirmark_attr(master_id),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, rel: &RelPath) -> PathBuf {
        rel.under(&self.root)
    }

    pub fn xtime(&self, rel: &RelPath) -> Result<u64, MasterError> {
        let p = self.path(rel);
        xtime::read(&p, &self.xtime_attr).map_err(err("read xtime of", &p))
    }

    pub fn stime(&self, rel: &RelPath) -> Result<u64, MasterError> {
        let p = self.path(rel);
        xtime::read(&p, &self.stime_attr).map_err(err("read stime of", &p))
    }

    /// The stamp of the newest `georep mark` of the directory itself (0: none).
    pub fn dirmark(&self, rel: &RelPath) -> Result<u64, MasterError> {
        let p = self.path(rel);
        xtime::read(&p, &self.dirmark_attr).map_err(err("read dirmark of", &p))
    }

    pub fn set_stime(&self, rel: &RelPath, stamp: u64) -> Result<(), MasterError> {
        let p = self.path(rel);
        xtime::write(&p, &self.stime_attr, stamp).map_err(err("write stime of", &p))
    }

    pub fn stat(&self, rel: &RelPath) -> Result<MEntry, MasterError> {
        let p = self.path(rel);
        self.entry(&p, rel.name().unwrap_or(b"").to_vec())
    }

    fn entry(&self, p: &Path, name: Vec<u8>) -> Result<MEntry, MasterError> {
        let md = std::fs::symlink_metadata(p).map_err(err("stat", p))?;
        let kind = Kind::of(&md);
        let (xattrs, xt, target) = match kind {
            Kind::File | Kind::Dir => {
                let xattrs = read_xattrs(p).map_err(err("read xattrs of", p))?;
                let xt = xtime::read(p, &self.xtime_attr).map_err(err("read xtime of", p))?;
                (xattrs, xt, None)
            }
            Kind::Symlink => {
                let t = std::fs::read_link(p).map_err(err("readlink", p))?;
                (
                    Vec::new(),
                    0,
                    Some(ByteBuf::from(t.as_os_str().as_bytes().to_vec())),
                )
            }
            Kind::Other => (Vec::new(), 0, None),
        };
        Ok(MEntry {
            entry: Entry {
                name: ByteBuf::from(name),
                kind,
                size: if kind == Kind::File { md.len() } else { 0 },
                meta: Meta::from_metadata(&md, xattrs),
                dev: md.dev(),
                ino: md.ino(),
                nlink: md.nlink(),
                target,
            },
            xtime: xt,
        })
    }

    /// Lists a directory sorted by name. Entries that vanish while listed
    /// are left out (their parent's change is seen by the next crawl);
    /// entries that cannot be read (no read access to their xattrs, say)
    /// are returned apart, so that one of them does not fail its siblings.
    pub fn list(&self, rel: &RelPath) -> Result<Listing, MasterError> {
        let dir = self.path(rel);
        let mut out = Listing::default();
        for de in std::fs::read_dir(&dir).map_err(err("list", &dir))? {
            let de = de.map_err(err("list", &dir))?;
            let name = de.file_name().as_bytes().to_vec();
            match self.entry(&de.path(), name.clone()) {
                Ok(e) => out.entries.push(e),
                Err(e) if e.vanished() => {}
                Err(e) => out.unreadable.push((name, e)),
            }
        }
        out.entries.sort_by(|a, b| a.entry.name.cmp(&b.entry.name));
        Ok(out)
    }
}
