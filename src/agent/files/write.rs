//! Writing into a file being assembled, in increasing offset order:
//! literal data, copies from the basis (in the kernel), rsync patches; and
//! feeding the digest of what was written.

use super::*;

impl Files {
    /// Checks that a data op lands at or after the cursor and inside the
    /// file; the gap before it reads as zeros (a hole in a new file; zeroed
    /// in place).
    fn advance(f: &mut OpenFile, offset: u64, len: u64) -> WResult<()> {
        let pos = f.digest.position();
        if offset < pos || offset.checked_add(len).is_none_or(|e| e > f.size) {
            return Err(invalid(format!(
                "{}: data at {offset}+{len} out of order or beyond the size {}",
                f.path, f.size
            )));
        }
        f.digest.feed_zeros(offset - pos);
        if let Target::InPlace(ip) = &mut f.target {
            ip.zero(pos, offset - pos)?;
        }
        Ok(())
    }

    /// Runs a data op, recording its first error on the file for `Commit`.
    fn data_op(&mut self, fid: u64, op: impl FnOnce(&mut OpenFile, &mut Vec<u8>) -> WResult<()>) {
        let mut buf = std::mem::take(&mut self.buf);
        if let Some(f) = self.open.get_mut(&fid) {
            if f.error.is_none() {
                if let Err(e) = op(f, &mut buf) {
                    f.error = Some(e);
                }
            }
            f.cache.evict_below(f.digest.position() / WINDOW);
        }
        self.buf = buf;
    }

    /// Writes new data: sparse into a temporary, queued under the undo log in place.
    fn put(f: &mut OpenFile, offset: u64, data: Vec<u8>) -> WResult<()> {
        match &mut f.target {
            Target::Temp { file, .. } => {
                f.written += write_sparse(file, offset, &data, &f.path)?;
            }
            Target::InPlace(ip) => ip.write(offset, data)?,
        }
        Ok(())
    }

    pub fn write(&mut self, fid: u64, offset: u64, data: Vec<u8>) {
        self.data_op(fid, |f, _| {
            Self::advance(f, offset, data.len() as u64)?;
            f.digest.feed(&data);
            Self::put(f, offset, data)
        })
    }

    pub fn copy(&mut self, fid: u64, offset: u64, len: u64) {
        self.data_op(fid, |f, buf| {
            Self::advance(f, offset, len)?;
            if offset.checked_add(len).is_none_or(|e| e > f.basis_size) {
                return Err(invalid(format!("{}: copy beyond the basis", f.path)));
            }
            let basis = f.basis.as_ref().ok_or_else(|| invalid("no basis file"))?;
            if let Target::Temp { file, .. } = &f.target {
                // In the kernel (a reflink where the file system can); holes stay holes.
                for (o, n) in sparse::data_ranges(basis, offset, offset + len)
                    .map_err(|e| io_err(e, "seek", &f.path))?
                {
                    copy_range(basis, file, o, n).map_err(|e| io_err(e, "copy", &f.path))?;
                }
                f.written += len;
            }
            // In place the data is already there. Either way the digest is
            // of what the target now holds, not of the basis as hashed before.
            Self::digest_copied(f, offset + len, buf)
        })
    }

    /// Feeds `[pos, end)` of the target, as written, to the digest: holes
    /// as zeros, data read back. (In place, queued changes all lie before
    /// `pos`: data ops come in offset order.)
    fn digest_copied(f: &mut OpenFile, end: u64, buf: &mut Vec<u8>) -> WResult<()> {
        let target = match &f.target {
            Target::Temp { file, .. } => file,
            Target::InPlace(ip) => ip.file(),
        };
        let pos = f.digest.position();
        let data = sparse::data_ranges(target, pos, end).map_err(|e| io_err(e, "seek", &f.path))?;
        for (o, n) in data {
            f.digest.feed_zeros(o - f.digest.position());
            let mut at = o;
            while at < o + n {
                let m = (o + n - at).min(1 << 20);
                buf.clear();
                buf.resize(m as usize, 0);
                target
                    .read_exact_at(buf, at)
                    .map_err(|e| io_err(e, "read back", &f.path))?;
                f.digest.feed(buf);
                at += m;
            }
        }
        f.digest.feed_zeros(end - f.digest.position());
        Ok(())
    }

    pub fn patch(
        &mut self,
        fid: u64,
        offset: u64,
        out_len: u64,
        basis_off: u64,
        basis_len: u64,
        delta: &[u8],
    ) {
        self.data_op(fid, |f, buf| {
            Self::advance(f, offset, out_len)?;
            if out_len > MAX_RANGE {
                return Err(invalid("patch output too large"));
            }
            f.settle()?;
            Self::read_basis(buf, f, basis_off, basis_len)?;
            let mut out = Vec::with_capacity(out_len as usize);
            fast_rsync::apply_limited(buf, delta, &mut out, out_len as usize)
                .map_err(|e| invalid(format!("{}: bad delta: {e}", f.path)))?;
            if out.len() as u64 != out_len {
                return Err(invalid(format!(
                    "{}: delta produced {} bytes, expected {out_len}",
                    f.path,
                    out.len()
                )));
            }
            f.digest.feed(&out);
            Self::put(f, offset, out)
        })
    }
}

/// Copies `len` bytes at `offset` from `src` to the same offset of `dst` in the kernel.
fn copy_range(src: &File, dst: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let mut off_in = offset as i64;
    let mut off_out = offset as i64;
    let end = (offset + len) as i64;
    while off_in < end {
        let want = (end - off_in) as usize;
        let n = nix::fcntl::copy_file_range(
            src.as_fd(),
            Some(&mut off_in),
            dst.as_fd(),
            Some(&mut off_out),
            want,
        )?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "basis shrank during copy",
            ));
        }
    }
    Ok(())
}
