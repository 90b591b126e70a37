//! Shared temporaries: one large file written by several agents of a
//! stream group at once. The owner opens it (`OpenShared`) and writes the
//! first windows; each other agent attaches to the same temporary for a
//! window-aligned segment (`OpenSegment`), writes it as any file, and
//! answers the hash of each of its windows computed from the bytes it
//! wrote (`FinishSegment`). The owner's `CommitShared` feeds those hashes
//! in place of the segments to the file digest, checks it against the
//! master's, and publishes as usual.

use super::*;

/// Longest temporary name accepted in `OpenSegment`.
const MAX_TMP_NAME: usize = 64;

/// Feeds zeros up to the first segment, then each segment's window hashes;
/// the segments must tile the rest of the file exactly.
pub(super) fn feed_segments(
    digest: &mut FileDigest,
    size: u64,
    segments: &[(u64, Vec<Hash32>)],
    path: &RelPath,
) -> WResult<()> {
    let bad = |what: &str| invalid(format!("{path}: shared commit: {what}"));
    let first = segments.first().map_or(size, |s| s.0);
    let pos = digest.position();
    if pos > first || first > size {
        return Err(bad("the owner's data overlaps a segment"));
    }
    digest.feed_zeros(first - pos);
    for (start, roots) in segments {
        if *start != digest.position() {
            return Err(bad("segments do not tile the file"));
        }
        for h in roots {
            if digest.position() >= size || !digest.at_window_start() {
                return Err(bad("more window hashes than windows"));
            }
            let wl = digest.window_len();
            digest.feed_window_hash(h, wl);
        }
    }
    if digest.position() != size {
        return Err(bad("the segments end before the file"));
    }
    Ok(())
}

impl Files {
    /// Opens a file like [`open`](Self::open) and returns its temporary's
    /// name too, for the agents writing its other segments.
    pub fn open_shared(
        &mut self,
        root: &Root,
        fid: u64,
        path: &RelPath,
        basis: Option<&RelPath>,
        size: u64,
    ) -> WResult<(Option<u64>, Vec<u8>)> {
        let b = self.open(root, fid, path, basis, size)?;
        let tmp = self
            .open
            .get(&fid)
            .and_then(|f| f.tmp())
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        Ok((b, tmp))
    }

    /// Attaches to another agent's shared temporary `tmp` (in `path`'s
    /// directory) to write windows `[start, end)`.
    #[allow(clippy::too_many_arguments)]
    pub fn open_segment(
        &mut self,
        root: &Root,
        fid: u64,
        path: &RelPath,
        tmp: &[u8],
        basis: Option<&RelPath>,
        size: u64,
        start: u64,
        end: u64,
    ) -> WResult<Option<u64>> {
        self.check_open(fid, path, size)?;
        self.check_kept(path, size)?;
        if !tmp.starts_with(crate::protocol::TMP_PREFIX)
            || tmp.len() > MAX_TMP_NAME
            || tmp.contains(&b'/')
        {
            return Err(WireError::new(
                ErrorKind::InvalidPath,
                format!(
                    "{path}: {:?} is not a georep temporary",
                    String::from_utf8_lossy(tmp)
                ),
            ));
        }
        if start % WINDOW != 0 || start >= end || end > size || (end % WINDOW != 0 && end != size) {
            return Err(invalid(format!(
                "{path}: segment {start}..{end} of {size} bytes is not window-aligned"
            )));
        }
        let (dir, name) = root.parent(path)?;
        let name = name.to_vec();
        let fd = openat(
            dir.as_fd(),
            OsStr::from_bytes(tmp),
            OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| errno_err(e, "open the shared temporary of", path))?;
        root.check_dev(fd.as_fd(), path)?;
        let st = nix::sys::stat::fstat(fd.as_fd())
            .map_err(|e| errno_err(e, "stat the shared temporary of", path))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG
            || st.st_nlink != 1
            || st.st_size as u64 != size
        {
            return Err(invalid(format!(
                "{path}: the shared temporary is not a regular file of {size} bytes"
            )));
        }
        let basis = open_basis(root, &dir, &name, basis)?;
        let basis_size = match &basis {
            Some(f) => f
                .metadata()
                .map_err(|e| io_err(e, "stat basis of", path))?
                .len(),
            None => 0,
        };
        let has_basis = basis.is_some();
        self.open.insert(
            fid,
            OpenFile {
                path: path.clone(),
                dir,
                name,
                target: Target::Temp {
                    tmp: tmp.to_vec(),
                    file: File::from(fd),
                },
                basis,
                basis_size,
                size,
                digest: FileDigest::segment(size, start),
                cache: BasisCache::new(&self.budget),
                error: None,
                written: 0,
                segment: Some(end),
                resume: None,
            },
        );
        Ok(has_basis.then_some(basis_size))
    }

    /// Ends a segment: the rest of it reads as zeros; returns the hash of
    /// each of its windows and the bytes written.
    pub fn finish_segment(&mut self, fid: u64) -> WResult<(Vec<Hash32>, u64)> {
        let mut f = self
            .open
            .remove(&fid)
            .ok_or_else(|| invalid(format!("unknown file id {fid}")))?;
        let Some(end) = f.segment else {
            self.open.insert(fid, f);
            return Err(invalid(format!("file id {fid} is not a segment")));
        };
        if let Some(e) = f.error.take() {
            return Err(e);
        }
        let pos = f.digest.position();
        f.digest.feed_zeros(end - pos);
        Ok((f.digest.take_roots(), f.written))
    }

    /// Commits a shared file: `segments` are the other agents' window
    /// hashes (see the module). Answered when published, as `Commit`.
    pub fn commit_shared(
        &mut self,
        id: u64,
        fid: u64,
        want: &Hash32,
        meta: &Meta,
        segments: &[(u64, Vec<Hash32>)],
    ) -> WResult<()> {
        self.commit_with(id, fid, want, meta, segments).map(|_| ())
    }
}
