//! Agent operations for catalog mode: publishing a staged generation with
//! one rename, reading a catalog record, and appending a verified journal
//! tail in place. All confined to the root like every other operation.

use super::root::{errno_err, io_err, open_nofollow, Root, WResult};
use crate::protocol::{ErrorKind, Hash32, WireError, MAX_FRAME};
use crate::relpath::RelPath;
use nix::fcntl::{openat, renameat2, OFlag, RenameFlags};
use nix::sys::stat::Mode;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;

/// Renames `from` to `to`, refusing to replace an existing `to`, then makes
/// both parent directories durable.
pub fn rename_noreplace(root: &Root, from: &RelPath, to: &RelPath) -> WResult<()> {
    let (fdir, fname) = root.parent(from)?;
    let (tdir, tname) = root.parent(to)?;
    renameat2(
        fdir.as_fd(),
        OsStr::from_bytes(fname),
        tdir.as_fd(),
        OsStr::from_bytes(tname),
        RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(|e| errno_err(e, &format!("rename {from} to"), to))?;
    nix::unistd::fsync(tdir.as_fd()).map_err(|e| errno_err(e, "fsync directory of", to))?;
    nix::unistd::fsync(fdir.as_fd()).map_err(|e| errno_err(e, "fsync directory of", from))
}

fn open_regular(root: &Root, path: &RelPath, write: bool) -> WResult<File> {
    let (dir, name) = root.parent(path)?;
    let fd = if write {
        openat(
            dir.as_fd(),
            OsStr::from_bytes(name),
            OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
    } else {
        open_nofollow(dir.as_fd(), OsStr::from_bytes(name), false)
    }
    .map_err(|e| errno_err(e, "open", path))?;
    let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| errno_err(e, "stat", path))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(WireError::new(
            ErrorKind::Invalid,
            format!("{path}: not a regular file"),
        ));
    }
    if !write {
        nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()))
            .map_err(|e| errno_err(e, "open", path))?;
    }
    Ok(File::from(fd))
}

/// Reads at most `max` bytes of a regular file from `offset`.
pub fn read_file(root: &Root, path: &RelPath, offset: u64, max: u64) -> WResult<Vec<u8>> {
    let max = max.min(MAX_FRAME as u64 / 2);
    let mut f = open_regular(root, path, false)?;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(offset))
        .map_err(|e| io_err(e, "seek", path))?;
    let mut out = Vec::new();
    f.take(max)
        .read_to_end(&mut out)
        .map_err(|e| io_err(e, "read", path))?;
    Ok(out)
}

/// The merged disk ranges the journal's points after `after` write.
pub fn journal_extents(
    root: &Root,
    path: &RelPath,
    after: u64,
    limit: u64,
) -> WResult<Vec<(u64, u64)>> {
    use crate::catalog::cdp;
    let f = open_regular(root, path, false)?;
    let bad = |e: cdp::JournalError| WireError::new(ErrorKind::Invalid, format!("{path}: {e}"));
    let mut s = cdp::Scanner::new(&f, limit, false).map_err(bad)?;
    let mut ext: Vec<(u64, u64)> = Vec::new();
    while let Some(p) = s.next_point().map_err(bad)? {
        if p.span.time > after {
            ext.extend(p.writes.iter().map(|(o, d)| (*o, d.len() as u64)));
        }
    }
    Ok(crate::catalog::merge_extents(ext))
}

/// Appends `data` at `at` of an existing file (see `Request::AppendTail`);
/// returns the file's new length.
pub fn append_tail(
    root: &Root,
    path: &RelPath,
    at: u64,
    data: &[u8],
    digest: &Hash32,
    sync: bool,
    check: Option<(u64, Hash32)>,
) -> WResult<u64> {
    let mismatch = |m: String| WireError::new(ErrorKind::Mismatch, m);
    if blake3::hash(data).as_bytes() != digest {
        return Err(mismatch(format!(
            "{path}: appended data damaged in transit"
        )));
    }
    let f = open_regular(root, path, true)?;
    let len = f.metadata().map_err(|e| io_err(e, "stat", path))?.len();
    if len < at {
        return Err(mismatch(format!(
            "{path}: {len} bytes on the slave, expected at least {at}: the slave's copy was changed behind georep's back"
        )));
    }
    if len > at {
        f.set_len(at).map_err(|e| io_err(e, "truncate", path))?;
    }
    f.write_all_at(data, at)
        .map_err(|e| io_err(e, "append to", path))?;
    let end = at + data.len() as u64;
    if sync {
        f.sync_data().map_err(|e| io_err(e, "fsync", path))?;
    }
    if let Some((from, want)) = check {
        if from > end {
            return Err(WireError::new(
                ErrorKind::Invalid,
                format!("{path}: check range starts beyond the end"),
            ));
        }
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut o = from;
        while o < end {
            let n = ((end - o) as usize).min(buf.len());
            f.read_exact_at(&mut buf[..n], o)
                .map_err(|e| io_err(e, "read back", path))?;
            h.update(&buf[..n]);
            o += n as u64;
        }
        if h.finalize().as_bytes() != &want {
            return Err(mismatch(format!(
                "{path}: the appended bytes read back differ from the master's"
            )));
        }
    }
    Ok(end)
}
