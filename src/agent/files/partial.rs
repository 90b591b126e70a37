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
//! so any record a crash leaves describes data that is there. Checkpoints
//! append the new windows' hashes to the record (never rewrite it), and a
//! file keeps at most `MAX_KEPT_WINDOWS` hashes (larger ones are refused:
//! the worker sends them non-resumable). An open partial holds an `flock`:
//! another agent of the stream group neither resumes nor removes it.

use super::*;
use crate::protocol::{Hash16, MAX_KEPT_WINDOWS, PARTIAL_PREFIX, TMP_PREFIX};
use nix::fcntl::{Flock, FlockArg};
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

/// Window hashes kept by all of an agent's open resumable files and
/// segments together, at most (8 MiB); more are refused as busy (the
/// worker then sends the file non-resumable).
pub(super) const MAX_KEPT_TOTAL: u64 = 4 * MAX_KEPT_WINDOWS;

/// The progress record of a partial: on disk, the length of the header
/// (u32 LE), the header (postcard), then 32 bytes per durable window.
#[derive(Debug)]
struct Record {
    path: Vec<u8>,
    tmp: Vec<u8>,
    key: Hash16,
    size: u64,
    roots: Vec<Hash32>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    path: Vec<u8>,
    tmp: Vec<u8>,
    key: Hash16,
    size: u64,
}

/// The resumable state of an open file.
pub struct Resume {
    record: String,
    /// Position of the last checkpoint.
    saved: u64,
    /// `.georep/partial`.
    pdir: OwnedFd,
    /// The record, open for appending roots at `rbase + 32 * nroots`.
    rfile: File,
    rbase: u64,
    nroots: usize,
    /// Held while the partial is open (see the module).
    _lock: Option<Flock<File>>,
}

/// Locks a partial's temporary for this agent; None: another agent holds it.
fn lock(file: &File) -> Option<Flock<File>> {
    Flock::lock(file.try_clone().ok()?, FlockArg::LockExclusiveNonblock).ok()
}

/// Whether the partial `tmp` in `dir` is open in some agent.
fn locked(dir: BorrowedFd<'_>, tmp: &[u8]) -> bool {
    let Ok(fd) = openat(
        dir,
        OsStr::from_bytes(tmp),
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    ) else {
        return false;
    };
    lock(&File::from(fd)).is_none()
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
    let n = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    let h: Header = postcard::from_bytes(buf.get(4..4 + n)?).ok()?;
    let roots = buf[4 + n..]
        .chunks_exact(32)
        .take(MAX_KEPT_WINDOWS as usize)
        .map(|c| c.try_into().expect("32 bytes"))
        .collect();
    Some(Record {
        path: h.path,
        tmp: h.tmp,
        key: h.key,
        size: h.size,
        roots,
    })
}

/// Writes a record afresh; returns it open for appending roots, and where they start.
fn write_record(dir: &OwnedFd, name: &str, rec: &Record) -> WResult<(File, u64)> {
    let head = postcard::to_allocvec(&Header {
        path: rec.path.clone(),
        tmp: rec.tmp.clone(),
        key: rec.key,
        size: rec.size,
    })
    .map_err(|e| invalid(e.to_string()))?;
    let mut data = (head.len() as u32).to_le_bytes().to_vec();
    data.extend_from_slice(&head);
    let base = data.len() as u64;
    data.extend(rec.roots.iter().flatten());
    let tmp = format!("{name}.new");
    let fd = openat(
        dir.as_fd(),
        OsStr::new(&tmp),
        OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_WRONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| errno_err(e, "write", &"progress record"))?;
    let file = File::from(fd);
    file.write_all_at(&data, 0)
        .map_err(|e| io_err(e, "write", &"progress record"))?;
    rename_over(dir.as_fd(), OsStr::new(&tmp), OsStr::new(name))
        .map_err(|e| errno_err(e, "rename", &"progress record"))?;
    Ok((file, base))
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

/// Whether a record's partial is open in some agent.
fn held_elsewhere(root: &Root, rec: &Record) -> bool {
    let Ok(path) = RelPath::new(rec.path.clone()) else {
        return false;
    };
    partial_name(&rec.tmp)
        && root
            .parent(&path)
            .is_ok_and(|(dir, _)| locked(dir.as_fd(), &rec.tmp))
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

/// The windows of `file`'s first `windows` that still hash to `roots`;
/// holes are not read (they hash as zeros).
fn verified_prefix(file: &File, size: u64, roots: &[Hash32], buf: &mut Vec<u8>) -> usize {
    for (i, want) in roots.iter().enumerate() {
        let off = i as u64 * WINDOW;
        if off >= size {
            return i;
        }
        let len = WINDOW.min(size - off);
        let hole = sparse::data_ranges(file, off, off + len).is_ok_and(|r| r.is_empty());
        if hole {
            if &digest::zero_hash(len) != want {
                return i;
            }
            continue;
        }
        buf.resize(len as usize, 0);
        if file.read_exact_at(buf, off).is_err() || &digest::hash(buf) != want {
            return i;
        }
    }
    roots.len()
}

impl Files {
    /// Refuses to keep the window hashes of a file of `size` bytes (a
    /// resumable file, a segment) beyond the bounds above.
    pub(super) fn check_kept(&self, path: &RelPath, size: u64) -> WResult<()> {
        let windows = size.div_ceil(WINDOW);
        if windows > MAX_KEPT_WINDOWS {
            return Err(invalid(format!(
                "{path}: {size} bytes is too large to resume or to split in segments (at most {MAX_KEPT_WINDOWS} windows); send it whole"
            )));
        }
        let kept: u64 = self
            .open
            .values()
            .filter(|f| f.resume.is_some() || f.segment.is_some())
            .map(|f| f.size.div_ceil(WINDOW))
            .sum();
        if kept + windows > MAX_KEPT_TOTAL {
            return Err(WireError::new(
                ErrorKind::Busy,
                format!("{path}: too many resumable files and segments open at once; send it non-resumable"),
            ));
        }
        Ok(())
    }
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
        self.check_kept(path, size)?;
        let busy = || {
            WireError::new(
                ErrorKind::Busy,
                format!("{path}: its partial is open in another transfer; send it non-resumable"),
            )
        };
        if self
            .open
            .values()
            .any(|f| f.resume.is_some() && &f.path == path)
        {
            return Err(busy());
        }
        let pdir = partial_dir(root)?;
        let rname = record_name(path);
        let (dir, _) = root.parent(path)?;
        let rec = read_record(&pdir, &rname);
        if let Some(rec) = &rec {
            // Never resumed, superseded or removed under another agent.
            if partial_name(&rec.tmp) && locked(dir.as_fd(), &rec.tmp) {
                return Err(busy());
            }
        }
        let mut held = None;
        let kept = match rec {
            Some(rec)
                if rec.path == path.as_bytes()
                    && &rec.key == key
                    && rec.size == size
                    && partial_name(&rec.tmp) =>
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
                        && root.check_dev(f.as_fd(), path).is_ok()
                });
                if let Some(f) = &file {
                    held = Some(lock(f).ok_or_else(busy)?);
                }
                match file {
                    Some(f) => Some((rec, f)),
                    None => {
                        remove_partial(root, &pdir, &rname, &rec);
                        None
                    }
                }
            }
            Some(rec) => {
                // Another master file: start again.
                remove_partial(root, &pdir, &rname, &rec);
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
                if let Target::Temp { tmp, file } = &mut f.target {
                    held = lock(file);
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
        // A record at once: a partial is never without one for long.
        let rec = Record {
            path: path.as_bytes().to_vec(),
            tmp,
            key: *key,
            size,
            roots,
        };
        let (rfile, rbase) = match write_record(&pdir, &rname, &rec) {
            Ok(r) => r,
            Err(e) => {
                self.abort(fid);
                return Err(e);
            }
        };
        let f = self.open.get_mut(&fid).expect("just opened");
        f.written = resumed;
        f.digest = digest;
        f.resume = Some(Resume {
            record: rname,
            saved: resumed,
            pdir,
            rfile,
            rbase,
            nroots: rec.roots.len(),
            _lock: held,
        });
        Ok((basis_size, resumed, rec.roots))
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
        let Target::Temp { file, .. } = &f.target else {
            return;
        };
        if file.sync_data().is_err() {
            return;
        }
        // Only the windows made durable since the last checkpoint are added.
        let new: Vec<u8> = f.digest.roots()[r.nroots..]
            .iter()
            .flatten()
            .copied()
            .collect();
        let at = r.rbase + 32 * r.nroots as u64;
        if r.rfile.write_all_at(&new, at).is_ok() {
            let n = f.digest.roots().len();
            if let Some(r) = &mut f.resume {
                r.saved = pos;
                r.nroots = n;
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
                Some(rec) if self.in_use(&rec.tmp) || held_elsewhere(root, &rec) => continue,
                Some(rec) => remove_partial(root, &pdir, &name, &rec),
                None => unlink(pdir.as_fd(), name.as_bytes()),
            }
            removed += 1;
        }
        Ok(removed)
    }
}
