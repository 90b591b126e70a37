//! Data extents of sparse files (SEEK_DATA / SEEK_HOLE), so holes are
//! neither read nor sent.

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use std::os::fd::AsFd;

/// The data ranges of `fd` within `[start, end)`, as `(offset, len)`.
/// File systems without SEEK_DATA report the whole range as data.
pub fn data_ranges(fd: impl AsFd, start: u64, end: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = fd.as_fd();
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let data = match lseek(fd, pos as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(Errno::ENXIO) => break,
            Err(Errno::EINVAL) | Err(Errno::EOPNOTSUPP) => {
                out.push((pos, end - pos));
                break;
            }
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            break;
        }
        let hole = match lseek(fd, data as i64, Whence::SeekHole) {
            Ok(h) => (h as u64).min(end),
            Err(Errno::ENXIO) => end,
            Err(e) => return Err(e.into()),
        };
        if hole > data {
            out.push((data, hole - data));
        }
        pos = hole;
    }
    Ok(out)
}

/// Whether a buffer holds only zero bytes.
pub fn is_zero(buf: &[u8]) -> bool {
    static Z: [u8; 4096] = [0; 4096];
    buf.chunks(4096).all(|c| c == &Z[..c.len()])
}

/// Splits `data`, which starts at file offset `offset`, into the runs that
/// are not all-zero blocks (blocks of `block` bytes aligned to the file).
/// Writing only these into a pre-sized file leaves the zero blocks as holes.
pub fn nonzero_runs(offset: u64, data: &[u8], block: u64) -> Vec<(u64, std::ops::Range<usize>)> {
    let mut runs: Vec<(u64, std::ops::Range<usize>)> = Vec::new();
    let mut i = 0usize;
    while i < data.len() {
        let abs = offset + i as u64;
        let next = ((abs / block + 1) * block - offset) as usize;
        let end = next.min(data.len());
        let chunk = &data[i..end];
        let skip = is_zero(chunk);
        if !skip {
            match runs.last_mut() {
                Some((_, r)) if r.end == i => r.end = end,
                _ => runs.push((abs, i..end)),
            }
        }
        i = end;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn finds_data_around_holes() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 256 << 10).unwrap();
        let r = data_ranges(&f, 0, 1 << 20).unwrap();
        assert_eq!(r.len(), 1);
        assert!(r[0].0 <= 256 << 10 && r[0].0 + r[0].1 >= (256 << 10) + 4096);
        assert!(data_ranges(&f, 512 << 10, 1 << 20).unwrap().is_empty());
    }

    #[test]
    fn zero_blocks_are_skipped() {
        let mut d = vec![0u8; 3 * 4096];
        d[200] = 1; // in the block at file offset 4096
        d[9000] = 2; // in the (partial) block at 12288
                     // Starts 100 bytes before a block boundary: blocks are aligned to the file, not the buffer.
        let runs = nonzero_runs(4096 - 100, &d, 4096);
        assert_eq!(runs, vec![(4096, 100..4196), (12288, 8292..12288)]);
        assert!(nonzero_runs(0, &[0u8; 8192], 4096).is_empty());
    }
}
