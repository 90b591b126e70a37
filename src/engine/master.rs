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

/// Errors reading the master, with the operation and path.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct MasterError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl MasterError {
    pub fn vanished(&self) -> bool {
        matches!(
            self.source.raw_os_error(),
            Some(libc::ENOENT) | Some(libc::ENOTDIR)
        )
    }
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
    (dir.is_root() && crate::protocol::reserved_at_root(name))
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
                meta: Meta::from_metadata(&md, xattrs).with_recorded_setid(p, &md),
                dev: md.dev(),
                ino: md.ino(),
                nlink: md.nlink(),
                target,
            },
            xtime: xt,
        })
    }

    /// Lists a directory sorted by name. Entries that vanish while listed
    /// are left out (their parent's change is seen by the next crawl).
    pub fn list(&self, rel: &RelPath) -> Result<Vec<MEntry>, MasterError> {
        let dir = self.path(rel);
        let mut out = Vec::new();
        for de in std::fs::read_dir(&dir).map_err(err("list", &dir))? {
            let de = de.map_err(err("list", &dir))?;
            let name = de.file_name().as_bytes().to_vec();
            match self.entry(&de.path(), name) {
                Ok(e) => out.push(e),
                Err(e) if e.vanished() => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.entry.name.cmp(&b.entry.name));
        Ok(out)
    }
}
