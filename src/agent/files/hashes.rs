//! Requests that read the basis: window hashes, block hashes and rsync
//! signatures of ranges of the file a transfer is diffed against.

use super::*;

/// Bytes of data (holes not counted) one hash request may read, at most:
/// a request's time stays bounded (the worker asks for 256 MiB at a time).
pub const MAX_HASHED: u64 = 1 << 30;

impl Files {
    /// Reads `[offset, offset+len)` of the basis into the shared buffer.
    pub(super) fn read_basis(
        buf: &mut Vec<u8>,
        f: &OpenFile,
        offset: u64,
        len: u64,
    ) -> WResult<()> {
        let basis = f
            .basis
            .as_ref()
            .ok_or_else(|| invalid(format!("{}: no basis file", f.path)))?;
        if len > MAX_RANGE || offset.checked_add(len).is_none_or(|e| e > f.basis_size) {
            return Err(invalid(format!(
                "{}: basis range {offset}+{len} out of bounds",
                f.path
            )));
        }
        buf.clear();
        buf.resize(len as usize, 0);
        basis
            .read_exact_at(buf, offset)
            .map_err(|e| io_err(e, "read basis of", &f.path))
    }

    fn ranges(offset: u64, len: u64, step: u32, limit: u64) -> WResult<Vec<(u64, u64)>> {
        if !(512..=(MAX_RANGE as u32)).contains(&step) || len / step as u64 > 65536 {
            return Err(invalid(format!(
                "bad hash request: {len} bytes in steps of {step}"
            )));
        }
        let end = offset.saturating_add(len).min(limit);
        let mut out = Vec::new();
        let mut o = offset;
        while o < end {
            let n = (step as u64).min(end - o);
            out.push((o, n));
            o += n;
        }
        Ok(out)
    }

    pub fn window_hashes(
        &mut self,
        fid: u64,
        offset: u64,
        len: u64,
        window: u32,
    ) -> WResult<Vec<Hash32>> {
        let mut buf = std::mem::take(&mut self.buf);
        let res = (|| {
            let f = self.get(fid)?;
            let mut out = Vec::new();
            let mut read = 0;
            for (o, n) in Self::ranges(offset, len, window, f.basis_size)? {
                if read + n > MAX_HASHED {
                    return Err(invalid(format!(
                        "{}: hash request reads more than {MAX_HASHED} bytes: ask for less at a time",
                        f.path
                    )));
                }
                let basis = f.basis.as_ref().ok_or_else(|| invalid("no basis file"))?;
                let h = if window as u64 == WINDOW && o % WINDOW == 0 {
                    // Digest windows: hashed by blocks, whose CVs are kept.
                    let (h, n) = f
                        .cache
                        .hash_window(basis, o / WINDOW, n, &mut buf)
                        .map_err(|e| io_err(e, "read basis of", &f.path))?;
                    read += n;
                    h
                } else if sparse::data_ranges(basis, o, o + n)
                    .map_err(|e| io_err(e, "seek", &f.path))?
                    .is_empty()
                {
                    digest::zero_hash(n)
                } else {
                    Self::read_basis(&mut buf, f, o, n)?;
                    read += n;
                    digest::hash(&buf)
                };
                out.push(h);
            }
            Ok(out)
        })();
        self.buf = buf;
        res
    }

    pub fn block_hashes(
        &mut self,
        fid: u64,
        offset: u64,
        len: u64,
        block: u32,
    ) -> WResult<Vec<Hash16>> {
        let mut buf = std::mem::take(&mut self.buf);
        let res = (|| {
            let f = self.get(fid)?;
            if len > MAX_RANGE {
                return Err(invalid("block hash range too large"));
            }
            if block as u64 != BLOCK || offset % BLOCK != 0 {
                return Err(invalid(format!(
                    "bad block hash request: blocks of {block} bytes at {offset} (want {BLOCK}-byte aligned blocks)"
                )));
            }
            let basis = f.basis.as_ref().ok_or_else(|| invalid("no basis file"))?;
            f.cache
                .block_keys(basis, offset, len, f.basis_size, &mut buf)
                .map_err(|e| io_err(e, "read basis of", &f.path))
        })();
        self.buf = buf;
        res
    }

    pub fn signature(&mut self, fid: u64, offset: u64, len: u64, block: u32) -> WResult<Vec<u8>> {
        let mut buf = std::mem::take(&mut self.buf);
        let res = (|| {
            let f = self.get(fid)?;
            if !(256..=65536).contains(&block) {
                return Err(invalid("bad signature block size"));
            }
            // In place, the basis is the file: what is patched so far is part of it.
            f.settle()?;
            let len = len.min(f.basis_size.saturating_sub(offset));
            Self::read_basis(&mut buf, f, offset, len)?;
            let sig = fast_rsync::Signature::calculate(
                &buf,
                fast_rsync::SignatureOptions {
                    block_size: block,
                    crypto_hash_size: 8,
                },
            );
            Ok(sig.into_serialized())
        })();
        self.buf = buf;
        res
    }
}
