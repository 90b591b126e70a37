//! Agent operations for catalog mode: publishing a staged generation with
//! one rename, reading a catalog record, and appending a verified journal
//! tail in place. All confined to the root like every other operation.

use super::root::{errno_err, io_err, open_nofollow, Root, WResult};
use crate::fs::relpath::RelPath;
use crate::protocol::{ErrorKind, Hash32, WireError, MAX_FRAME};
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

/// Opens a regular file of the root, refusing one on another file system;
/// for writing, a name whose inode has hard links georep did not make is
/// removed instead (see `meta::foreign_links`).
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
    root.check_dev(fd.as_fd(), path)?;
    let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| errno_err(e, "stat", path))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(WireError::new(
            ErrorKind::Invalid,
            format!("{path}: not a regular file"),
        ));
    }
    if write {
        root.break_foreign_links(dir.as_fd(), name, fd.as_fd(), path)?;
    } else if super::meta::foreign_links(fd.as_fd()) {
        return Err(super::meta::foreign_links_error(path, false));
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

/// Separate extents one `JournalExtents` reply carries at most (a few MiB encoded).
pub const MAX_EXTENTS: usize = 256 << 10;

/// The merged disk ranges the journal's points after `after` write, from
/// the record headers alone (never the records' data), merged as they
/// accumulate so memory stays bounded.
pub fn journal_extents(
    root: &Root,
    path: &RelPath,
    after: u64,
    limit: u64,
) -> WResult<Vec<(u64, u64)>> {
    use crate::catalog::{cdp, merge_extents};
    let f = open_regular(root, path, false)?;
    let bad = |e: cdp::JournalError| WireError::new(ErrorKind::Invalid, format!("{path}: {e}"));
    let mut s = cdp::Scanner::new(&f, limit, false).map_err(bad)?;
    let mut ext: Vec<(u64, u64)> = Vec::new();
    let mut merged = 0;
    while let Some(span) = s.next_span().map_err(bad)? {
        if span.time <= after {
            continue;
        }
        let mut at = span.start;
        while at < span.end {
            let rec = cdp::read_record(&f, at).map_err(|e| io_err(e, "read", path))?;
            if rec.length > 0 {
                ext.push((rec.offset, rec.length as u64));
            }
            at += cdp::RECORD_HEADER_LEN + rec.length as u64;
            if ext.len() >= merged.max(4096) * 2 {
                ext = merge_extents(ext);
                merged = ext.len();
                if merged > MAX_EXTENTS {
                    return Err(WireError::new(
                        ErrorKind::Invalid,
                        format!("{path}: more than {MAX_EXTENTS} separate extents after {after}: send the journal whole"),
                    ));
                }
            }
        }
    }
    let ext = merge_extents(ext);
    if ext.len() > MAX_EXTENTS {
        return Err(WireError::new(
            ErrorKind::Invalid,
            format!("{path}: more than {MAX_EXTENTS} separate extents after {after}: send the journal whole"),
        ));
    }
    Ok(ext)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s.as_bytes().to_vec()).unwrap()
    }

    fn h(d: &[u8]) -> Hash32 {
        *blake3::hash(d).as_bytes()
    }

    #[test]
    fn append_tail_cuts_an_unpublished_tail_refuses_gaps_and_checks_what_it_wrote() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::open(d.path()).unwrap();
        std::fs::write(d.path().join("j"), vec![1u8; 100]).unwrap();
        assert_eq!(
            append_tail(&root, &p("j"), 100, b"abc", &h(b"abc"), true, None).unwrap(),
            103
        );
        // A crash left bytes beyond the published length: they are cut off.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(d.path().join("j"))
            .unwrap();
        std::io::Write::write_all(&mut f, b"torn tail").unwrap();
        let check = Some((100, h(b"abcde")));
        assert_eq!(
            append_tail(&root, &p("j"), 103, b"de", &h(b"de"), true, check).unwrap(),
            105
        );
        let data = std::fs::read(d.path().join("j")).unwrap();
        assert_eq!(&data[100..], b"abcde");
        // The slave's copy is shorter than the record says: refused.
        let e = append_tail(&root, &p("j"), 200, b"x", &h(b"x"), false, None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Mismatch);
        // Damaged in transit, or read back different: refused.
        let e = append_tail(&root, &p("j"), 105, b"x", &h(b"y"), false, None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Mismatch);
        let e = append_tail(
            &root,
            &p("j"),
            105,
            b"x",
            &h(b"x"),
            true,
            Some((100, h(b"nope"))),
        )
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Mismatch);
        // Never outside the root, never georep's own files.
        assert!(append_tail(
            &root,
            &p(".georep/identity.json"),
            0,
            b"",
            &h(b""),
            false,
            None
        )
        .is_err());
        assert!(RelPath::new(b"../x".to_vec()).is_err());
    }

    #[test]
    fn rename_never_replaces_and_read_file_reads_ranges() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::open(d.path()).unwrap();
        std::fs::create_dir(d.path().join(".staging-1")).unwrap();
        std::fs::create_dir(d.path().join("1")).unwrap();
        let e = rename_noreplace(&root, &p(".staging-1"), &p("1")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Exists);
        rename_noreplace(&root, &p(".staging-1"), &p("2")).unwrap();
        assert!(d.path().join("2").is_dir());
        std::fs::write(d.path().join("f"), b"0123456789").unwrap();
        assert_eq!(read_file(&root, &p("f"), 0, 100).unwrap(), b"0123456789");
        assert_eq!(read_file(&root, &p("f"), 3, 4).unwrap(), b"3456");
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("l")).unwrap();
        assert!(
            read_file(&root, &p("l"), 0, 100).is_err(),
            "no reading through a symlink"
        );
    }
}
