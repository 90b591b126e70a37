//! Reading the master tree: listings with xtimes, stimes, file data.

use crate::fs::meta::{read_xattrs, Entry, Kind, Meta};
use crate::fs::relpath::RelPath;
use crate::fs::xtime;
use crate::hash::Hash16;
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
    digest_attr: String,
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
            digest_attr: xtime::digest_attr(session_id),
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

    /// A digest of a directory's entries as the file system states them:
    /// name, type, inode, size, mode, owner, link count, mtime, and the
    /// ctime of every non-directory (which any change of content, metadata
    /// or attributes moves); for subdirectories, whose ctime georep's own
    /// stamps move, their replicated attributes instead. Read with one
    /// stat per entry (relative to the directory) and no attribute reads
    /// of files. Also returns the subdirectories' names and the number of entries.
    pub fn dir_digest(&self, rel: &RelPath) -> Result<(Hash16, Vec<Vec<u8>>, u64), MasterError> {
        let dir = self.path(rel);
        let mut rows = Vec::new();
        for de in std::fs::read_dir(&dir).map_err(err("list", &dir))? {
            let de = de.map_err(err("list", &dir))?;
            let md = match de.metadata() {
                Ok(md) => md,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(err("stat", &de.path())(e)),
            };
            rows.push((de.file_name().as_bytes().to_vec(), md, de.path()));
        }
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let count = rows.len() as u64;
        let mut h = blake3::Hasher::new();
        let mut dirs = Vec::new();
        for (name, md, path) in rows {
            h.update(&(name.len() as u64).to_le_bytes());
            h.update(&name);
            for v in [
                md.mode() as u64,
                md.ino(),
                md.dev(),
                md.len(),
                md.uid() as u64,
                md.gid() as u64,
                md.nlink(),
                md.mtime() as u64,
                md.mtime_nsec() as u64,
            ] {
                h.update(&v.to_le_bytes());
            }
            if md.is_dir() {
                let x = read_xattrs(&path).map_err(err("read xattrs of", &path))?;
                h.update(&postcard::to_stdvec(&x).unwrap_or_default());
                dirs.push(name);
            } else {
                h.update(&(md.ctime() as u64).to_le_bytes());
                h.update(&(md.ctime_nsec() as u64).to_le_bytes());
            }
        }
        let mut d = [0u8; 16];
        d.copy_from_slice(&h.finalize().as_bytes()[..16]);
        Ok((d, dirs, count))
    }

    /// The entry digest recorded when the directory was last synced completely.
    pub fn stored_digest(&self, rel: &RelPath) -> Option<Hash16> {
        let v = xattr::get(self.path(rel), &self.digest_attr).ok()??;
        v.try_into().ok()
    }

    /// Records a directory's entry digest (after its entries are durable on the slave).
    pub fn set_digest(&self, rel: &RelPath, d: &Hash16) -> Result<(), MasterError> {
        let p = self.path(rel);
        xattr::set(&p, &self.digest_attr, d).map_err(err("write the entry digest of", &p))
    }

    pub fn stat(&self, rel: &RelPath) -> Result<MEntry, MasterError> {
        let p = self.path(rel);
        self.entry(&p, rel.name().unwrap_or(b"").to_vec())
    }

    fn entry(&self, p: &Path, name: Vec<u8>) -> Result<MEntry, MasterError> {
        let md = std::fs::symlink_metadata(p).map_err(err("stat", p))?;
        self.entry_of(p, name, md)
    }

    /// The entry of `p` whose (no-follow) metadata is `md`.
    fn entry_of(
        &self,
        p: &Path,
        name: Vec<u8>,
        md: std::fs::Metadata,
    ) -> Result<MEntry, MasterError> {
        let kind = Kind::of(&md);
        let mut setid = 0;
        let (xattrs, xt, target) = match kind {
            Kind::File | Kind::Dir => {
                // One listing gives the replicated attributes, the xtime and,
                // on a replica that is a master too, the setuid/setgid bits
                // its agent stripped from the file.
                let (xattrs, mut own) = crate::fs::meta::read_xattrs_with(
                    p,
                    &[&self.xtime_attr, crate::fs::meta::setid_attr()],
                )
                .map_err(err("read xattrs of", p))?;
                if kind == Kind::File {
                    setid = crate::fs::meta::decode_setid(own[1].as_deref());
                }
                (xattrs, xtime::decode_stamp(own[0].take().as_deref()), None)
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
                meta: {
                    let mut m = Meta::from_metadata(&md, xattrs);
                    m.mode |= setid;
                    m
                },
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
            // Stat relative to the open directory (no walk of the whole path).
            let res = de
                .metadata()
                .map_err(err("stat", &de.path()))
                .and_then(|md| self.entry_of(&de.path(), name.clone(), md));
            match res {
                Ok(e) => out.entries.push(e),
                Err(e) if e.vanished() => {}
                Err(e) => out.unreadable.push((name, e)),
            }
        }
        out.entries.sort_by(|a, b| a.entry.name.cmp(&b.entry.name));
        Ok(out)
    }
}
