//! Resumable transfers. A large file opened with `OpenResumable` is
//! assembled in a temporary named with `PARTIAL_PREFIX`, and every
//! [`CHECKPOINT`] bytes the agent makes it durable (fdatasync) and then
//! writes a progress record, `.georep/partial/<hash of path>`: the path,
//! the temporary's name, the master file's identity (`key`) and the hash
//! of each durable window, computed from the bytes written. When the
//! connection ends the file is checkpointed once more and kept. A later
//! `OpenResumable` of the same path and key reads the prefix again,
//! keeps the windows that still hash as recorded, and continues after
//! them; another key (the master file changed) removes the partial.
//! `CleanPartials` removes records older than the session's limit.
//!
//! The record is written only after the data it describes is durable,
//! so any record a crash leaves describes data that is there.

use super::*;
use crate::protocol::{Hash16, PARTIAL_PREFIX, TMP_PREFIX};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::MetadataExt;

/// Bytes between checkpoints (fdatasync + record) of a resumable file.
pub const CHECKPOINT: u64 = 32 << 20;
const PARTIAL_DIR: &str = "partial";
/// Largest record read (a record of a 16 TiB file is about 128 MiB of
/// hashes: larger files simply do not resume).
const MAX_RECORD: u64 = 16 << 20;

/// The progress record of a partial.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    path: Vec<u8>,
    tmp: Vec<u8>,
    key: Hash16,
    size: u64,
    roots: Vec<Hash32>,
}

/// The resumable state of an open file.
pub struct Resume {
    key: Hash16,
    record: String,
    /// Position of the last checkpoint.
    saved: u64,
    /// `.georep/partial`.
    pdir: OwnedFd,
}

fn record_name(path: &RelPath) -> String {
    let h = blake3::hash(path.as_bytes());
    h.to_hex()[..32].to_string()
}

fn partial_dir(root: &Root) -> WResult<OwnedFd> {
    let state = root.state_dir()?;
    match nix::sys::stat::mkdirat(
        state.as_fd(),
        OsStr::new(PARTIAL_DIR),
        Mode::from_bits_truncate(0o700),
    ) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => return Err(errno_err(e, "mkdir", &".georep/partial")),
    }
    super::super::root::open_nofollow(state.as_fd(), OsStr::new(PARTIAL_DIR), true)
        .map_err(|e| errno_err(e, "open", &".georep/partial"))
}

fn read_record(dir: &OwnedFd, name: &str) -> Option<Record> {
    let fd = super::super::root::open_nofollow(dir.as_fd(), OsStr::new(name), false).ok()?;
    let mut buf = Vec::new();
    File::from(fd).take(MAX_RECORD).read_to_end(&mut buf).ok()?;
    postcard::from_bytes(&buf).ok()
}

fn write_record(dir: &OwnedFd, name: &str, rec: &Record) -> WResult<()> {
    let data = postcard::to_allocvec(rec).map_err(|e| invalid(e.to_string()))?;
    let tmp = format!("{name}.new");
    let fd = openat(
        dir.as_fd(),
        OsStr::new(&tmp),
        OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_WRONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| errno_err(e, "write", &"progress record"))?;
    use std::io::Write;
    File::from(fd)
        .write_all(&data)
        .map_err(|e| io_err(e, "write", &"progress record"))?;
    rename_over(dir.as_fd(), OsStr::new(&tmp), OsStr::new(name))
        .map_err(|e| errno_err(e, "rename", &"progress record"))
}

fn unlink(dir: BorrowedFd<'_>, name: &[u8]) {
    let _ = nix::unistd::unlinkat(
        dir,
        OsStr::from_bytes(name),
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    );
}

/// Whether `tmp` is a name a record may point at.
fn partial_name(tmp: &[u8]) -> bool {
    tmp.starts_with(PARTIAL_PREFIX) && tmp.len() <= 64 && !tmp.contains(&b'/')
}

/// Removes a partial: its temporary (in `path`'s directory) and its record.
fn remove_partial(root: &Root, pdir: &OwnedFd, name: &str, rec: &Record) {
    if partial_name(&rec.tmp) {
        if let Ok(path) = RelPath::new(rec.path.clone()) {
            if let Ok((dir, _)) = root.parent(&path) {
                unlink(dir.as_fd(), &rec.tmp);
            }
        }
    }
    unlink(pdir.as_fd(), name.as_bytes());
}

/// The windows of `file`'s first `windows` that still hash to `roots`.
fn verified_prefix(file: &File, size: u64, roots: &[Hash32], buf: &mut Vec<u8>) -> usize {
    for (i, want) in roots.iter().enumerate() {
        let off = i as u64 * WINDOW;
        if off >= size {
            return i;
        }
        let len = WINDOW.min(size - off) as usize;
        buf.resize(len, 0);
        if file.read_exact_at(buf, off).is_err() || &digest::hash(buf) != want {
            return i;
        }
    }
    roots.len()
}

impl Files {
    /// See `Request::OpenResumable`: returns the basis size, the resumed
    /// prefix's length and its window hashes.
    pub fn open_resumable(
        &mut self,
        root: &Root,
        fid: u64,
        path: &RelPath,
        basis: Option<&RelPath>,
        size: u64,
        key: &Hash16,
    ) -> WResult<(Option<u64>, u64, Vec<Hash32>)> {
        self.check_open(fid, path, size)?;
        let pdir = partial_dir(root)?;
        let rname = record_name(path);
        let (dir, _) = root.parent(path)?;
        let kept = match read_record(&pdir, &rname) {
            Some(rec)
                if rec.path == path.as_bytes()
                    && &rec.key == key
                    && rec.size == size
                    && partial_name(&rec.tmp)
                    && !self.in_use(&rec.tmp) =>
            {
                let fd = openat(
                    dir.as_fd(),
                    OsStr::from_bytes(&rec.tmp),
                    OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                );
                let file = fd.ok().map(File::from).filter(|f| {
                    f.metadata()
                        .is_ok_and(|m| m.is_file() && m.len() == size && m.nlink() == 1)
                });
                match file {
                    Some(f) => Some((rec, f)),
                    None => {
                        remove_partial(root, &pdir, &rname, &rec);
                        None
                    }
                }
            }
            Some(rec) => {
                // Another master file (or a partial in use): start again.
                if !self.in_use(&rec.tmp) {
                    remove_partial(root, &pdir, &rname, &rec);
                }
                None
            }
            None => None,
        };
        let mut digest = FileDigest::recording(size);
        let (basis_size, tmp) = match kept {
            Some((rec, file)) => {
                let mut buf = std::mem::take(&mut self.buf);
                let n = verified_prefix(&file, size, &rec.roots, &mut buf);
                self.buf = buf;
                // Whatever lies after the verified prefix (written after the
                // last checkpoint, by an attempt of other content) is cleared:
                // the gaps the master leaves read as zeros, as the digest is fed.
                let keep = (n as u64 * WINDOW).min(size);
                file.set_len(keep)
                    .and_then(|_| file.set_len(size))
                    .map_err(|e| io_err(e, "truncate the partial of", path))?;
                let b = self.open(root, fid, path, basis, size)?;
                // Swap the fresh temporary for the kept one.
                let f = self.open.get_mut(&fid).expect("just opened");
                if let Target::Temp { tmp, file: fresh } = &mut f.target {
                    unlink(f.dir.as_fd(), tmp);
                    *tmp = rec.tmp.clone();
                    *fresh = file;
                }
                for h in &rec.roots[..n] {
                    let wl = digest.window_len();
                    digest.feed_window_hash(h, wl);
                }
                (b, rec.tmp)
            }
            None => {
                let b = self.open(root, fid, path, basis, size)?;
                let f = self.open.get_mut(&fid).expect("just opened");
                // Renamed to a partial's name: kept by listings, found by its record.
                let mut name = PARTIAL_PREFIX.to_vec();
                name.extend_from_slice(&tmp_name()[TMP_PREFIX.len()..]);
                if let Target::Temp { tmp, .. } = &mut f.target {
                    rename_over(
                        f.dir.as_fd(),
                        OsStr::from_bytes(tmp),
                        OsStr::from_bytes(&name),
                    )
                    .map_err(|e| errno_err(e, "rename temporary of", path))?;
                    *tmp = name.clone();
                }
                (b, name)
            }
        };
        let resumed = digest.position();
        let roots = digest.roots().to_vec();
        let f = self.open.get_mut(&fid).expect("just opened");
        f.written = resumed;
        f.digest = digest;
        f.resume = Some(Resume {
            key: *key,
            record: rname,
            saved: resumed,
            pdir: pdir
                .try_clone()
                .map_err(|e| io_err(e, "dup", &".georep/partial"))?,
        });
        // A record at once: a partial is never without one for long.
        let rec = Record {
            path: path.as_bytes().to_vec(),
            tmp,
            key: *key,
            size,
            roots: roots.clone(),
        };
        write_record(&pdir, &f.resume.as_ref().expect("set").record, &rec)?;
        Ok((basis_size, resumed, roots))
    }

    /// Makes a resumable file's data durable up to its position's window
    /// boundary and records it; `force`: whatever was written since the
    /// last checkpoint.
    pub(super) fn checkpoint(f: &mut OpenFile, force: bool) {
        let Some(r) = &f.resume else { return };
        let pos = f.digest.position();
        if f.error.is_some() || !f.digest.at_window_start() || pos <= r.saved {
            return;
        }
        if !force && pos < r.saved + CHECKPOINT {
            return;
        }
        let Target::Temp { tmp, file } = &f.target else {
            return;
        };
        if file.sync_data().is_err() {
            return;
        }
        let rec = Record {
            path: f.path.as_bytes().to_vec(),
            tmp: tmp.clone(),
            key: r.key,
            size: f.size,
            roots: f.digest.roots().to_vec(),
        };
        if write_record(&r.pdir, &r.record, &rec).is_ok() {
            if let Some(r) = &mut f.resume {
                r.saved = pos;
            }
        }
    }

    /// Leaves a resumable file for a later `OpenResumable` (the
    /// connection ended): checkpointed, not removed.
    pub(super) fn keep_partial(mut f: OpenFile) {
        Self::checkpoint(&mut f, true);
    }

    /// Forgets a resumable file's record (it is committed or aborted).
    pub(super) fn drop_record(f: &OpenFile) {
        if let Some(r) = &f.resume {
            unlink(r.pdir.as_fd(), r.record.as_bytes());
        }
    }

    /// See `Request::CleanPartials`; returns how many were removed.
    pub fn clean_partials(&mut self, root: &Root, max_age_secs: u64) -> WResult<u64> {
        let pdir = partial_dir(root)?;
        let mut d = nix::dir::Dir::from_fd(
            nix::unistd::dup(&pdir).map_err(|e| errno_err(e, "list", &".georep/partial"))?,
        )
        .map_err(|e| errno_err(e, "list", &".georep/partial"))?;
        let names: Vec<String> = d
            .iter()
            .flatten()
            .filter_map(|e| e.file_name().to_str().ok().map(str::to_string))
            .filter(|n| !n.starts_with('.'))
            .collect();
        let now = std::time::SystemTime::now();
        let mut removed = 0;
        for name in names {
            let age = nix::sys::stat::fstatat(
                pdir.as_fd(),
                OsStr::new(&name),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .ok()
            .map(|st| {
                let t = std::time::UNIX_EPOCH
                    + std::time::Duration::from_secs(st.st_mtime.max(0) as u64);
                now.duration_since(t).map(|d| d.as_secs()).unwrap_or(0)
            });
            let Some(age) = age else { continue };
            if age < max_age_secs {
                continue;
            }
            if name.ends_with(".new") {
                // A record being replaced when an agent died: the record proper decides.
                unlink(pdir.as_fd(), name.as_bytes());
                continue;
            }
            match read_record(&pdir, &name) {
                Some(rec) if self.in_use(&rec.tmp) => continue,
                Some(rec) => remove_partial(root, &pdir, &name, &rec),
                None => unlink(pdir.as_fd(), name.as_bytes()),
            }
            removed += 1;
        }
        Ok(removed)
    }
}
