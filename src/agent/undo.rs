//! The undo log of a file patched in place: what to write back to get the
//! old version again.
//!
//! Layout: a header (magic, length, postcard-encoded [`Header`]: the file's
//! path, device and inode, old size and old metadata; a 128-bit BLAKE3
//! check), then records `UREC | offset u64 | len u32 | old bytes | check`
//! for old data and `UZER | offset u64 | len u64 | check` for a range that
//! was a hole (restored as a hole, so a sparse file's log stays small),
//! each check a truncated BLAKE3 of the record. The log is made durable
//! before the file is touched (header) and before each group of ranges is
//! overwritten (records), so every modified range has a durable record.
//! Replay restores the valid records newest first (so the oldest bytes of
//! a range win), cuts the file to its old size; a torn record at the end
//! was never made durable, so its range was never written. Replay is
//! idempotent: it only writes old bytes back.

use crate::fs::meta::Meta;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

const MAGIC: &[u8; 12] = b"GEOREPUNDO1\n";
const REC: &[u8; 4] = b"UREC";
const ZREC: &[u8; 4] = b"UZER";
/// Largest record: bigger ranges are split, so replay memory stays bounded.
pub const MAX_RECORD: usize = 1 << 20;
const CHECK: usize = 16;

/// What the log says about the file it protects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The file's path relative to the slave root.
    pub path: Vec<u8>,
    pub dev: u64,
    pub ino: u64,
    pub old_size: u64,
    /// Mode, owner, mtime and xattrs before patching (restored on replay).
    pub meta: Meta,
}

fn check(parts: &[&[u8]]) -> [u8; CHECK] {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(p);
    }
    let mut out = [0u8; CHECK];
    out.copy_from_slice(&h.finalize().as_bytes()[..CHECK]);
    out
}

/// Appends records to a log whose header is written.
pub struct Writer {
    file: File,
    end: u64,
}

impl Writer {
    /// Writes the header into the empty file `file` (not yet durable: call [`sync`](Self::sync)).
    pub fn create(file: File, header: &Header) -> io::Result<Writer> {
        let body = postcard::to_stdvec(header).map_err(io::Error::other)?;
        let mut buf = Vec::with_capacity(body.len() + 32);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
        buf.extend_from_slice(&body);
        buf.extend_from_slice(&check(&[&body]));
        file.write_all_at(&buf, 0)?;
        Ok(Writer {
            file,
            end: buf.len() as u64,
        })
    }

    /// Appends the old bytes of `[offset, offset + old.len())`, in records of at most [`MAX_RECORD`].
    pub fn record(&mut self, offset: u64, old: &[u8]) -> io::Result<()> {
        for (i, part) in old.chunks(MAX_RECORD).enumerate() {
            let at = offset + (i * MAX_RECORD) as u64;
            let (o, l) = (at.to_le_bytes(), (part.len() as u32).to_le_bytes());
            let mut buf = Vec::with_capacity(part.len() + 32);
            buf.extend_from_slice(REC);
            buf.extend_from_slice(&o);
            buf.extend_from_slice(&l);
            buf.extend_from_slice(part);
            buf.extend_from_slice(&check(&[&o, &l, part]));
            self.file.write_all_at(&buf, self.end)?;
            self.end += buf.len() as u64;
        }
        Ok(())
    }

    /// Appends that `[offset, offset + len)` was a hole (reads as zeros).
    pub fn record_zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let (o, l) = (offset.to_le_bytes(), len.to_le_bytes());
        let mut buf = Vec::with_capacity(20 + CHECK);
        buf.extend_from_slice(ZREC);
        buf.extend_from_slice(&o);
        buf.extend_from_slice(&l);
        buf.extend_from_slice(&check(&[ZREC, &o, &l]));
        self.file.write_all_at(&buf, self.end)?;
        self.end += buf.len() as u64;
        Ok(())
    }

    /// Makes everything written so far durable.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Reads a log's header; None when it is missing or torn (the log never
/// became durable, so the file it names was never touched).
pub fn read_header(log: &File) -> io::Result<Option<(Header, u64)>> {
    let len = log.metadata()?.len();
    let mut head = [0u8; 16];
    if len < 16 + CHECK as u64 {
        return Ok(None);
    }
    log.read_exact_at(&mut head, 0)?;
    if &head[..12] != MAGIC {
        return Ok(None);
    }
    let n = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes")) as u64;
    if n > 1 << 20 || 16 + n + CHECK as u64 > len {
        return Ok(None);
    }
    let mut body = vec![0u8; n as usize + CHECK];
    log.read_exact_at(&mut body, 16)?;
    let (body, sum) = body.split_at(n as usize);
    if check(&[body]) != sum {
        return Ok(None);
    }
    match postcard::from_bytes::<Header>(body) {
        Ok(h) => Ok(Some((h, 16 + n + CHECK as u64))),
        Err(_) => Ok(None),
    }
}

/// One valid record: where its old bytes go and where they are in the
/// log (`zero`: the range was a hole, no bytes in the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    pub len: u64,
    pub at: u64,
    pub zero: bool,
}

/// The valid records from `start` on, up to the first torn or invalid one.
pub fn records(log: &File, start: u64) -> io::Result<Vec<Record>> {
    let len = log.metadata()?.len();
    let mut out = Vec::new();
    let mut pos = start;
    let mut buf = Vec::new();
    loop {
        let mut head = [0u8; 16];
        if pos + 16 > len {
            break;
        }
        log.read_exact_at(&mut head, pos)?;
        if &head[..4] == ZREC {
            let mut rest = [0u8; 4 + CHECK];
            if pos + 20 + CHECK as u64 > len {
                break;
            }
            log.read_exact_at(&mut rest, pos + 16)?;
            let o = &head[4..12];
            let mut l = [0u8; 8];
            l[..4].copy_from_slice(&head[12..16]);
            l[4..].copy_from_slice(&rest[..4]);
            if check(&[ZREC, o, &l]) != rest[4..] {
                break;
            }
            out.push(Record {
                offset: u64::from_le_bytes(o.try_into().expect("8 bytes")),
                len: u64::from_le_bytes(l),
                at: pos,
                zero: true,
            });
            pos += 20 + CHECK as u64;
            continue;
        }
        if &head[..4] != REC {
            break;
        }
        let offset = u64::from_le_bytes(head[4..12].try_into().expect("8 bytes"));
        let n = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes"));
        if n as usize > MAX_RECORD || pos + 16 + n as u64 + CHECK as u64 > len {
            break;
        }
        buf.resize(n as usize + CHECK, 0);
        log.read_exact_at(&mut buf, pos + 16)?;
        let (data, sum) = buf.split_at(n as usize);
        if check(&[&head[4..12], &head[12..16], data]) != sum {
            break;
        }
        out.push(Record {
            offset,
            len: n as u64,
            at: pos + 16,
            zero: false,
        });
        pos += 16 + n as u64 + CHECK as u64;
    }
    Ok(out)
}

/// Writes every recorded range of `target` back (newest record first),
/// leaving zero blocks as holes, then cuts it to the old size. Metadata
/// and durability are the caller's.
pub fn restore(log: &File, start: u64, header: &Header, target: &File) -> io::Result<()> {
    let mut buf = Vec::new();
    for r in records(log, start)?.iter().rev() {
        if r.zero {
            zero_range(target, r.offset, r.len)?;
            continue;
        }
        buf.resize(r.len as usize, 0);
        log.read_exact_at(&mut buf, r.at)?;
        write_back(target, r.offset, &buf)?;
    }
    target.set_len(header.old_size)
}

/// Writes `data` at `offset`: all-zero 4 KiB blocks are punched (holes
/// where the file system can), the rest written.
pub fn write_back(target: &File, offset: u64, data: &[u8]) -> io::Result<()> {
    let mut pos = 0usize;
    for (at, range) in crate::fs::sparse::nonzero_runs(offset, data, 4096) {
        let gap = (at - offset) as usize;
        if gap > pos {
            zero_range(target, offset + pos as u64, (gap - pos) as u64)?;
        }
        target.write_all_at(&data[range.clone()], at)?;
        pos = range.end;
    }
    if pos < data.len() {
        zero_range(target, offset + pos as u64, (data.len() - pos) as u64)?;
    }
    Ok(())
}

/// Makes `[offset, offset + len)` read as zeros: a hole where the file
/// system can punch one (it never grows the file), zeros written otherwise.
pub fn zero_range(target: &File, offset: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let size = target.metadata()?.len();
    let end = (offset + len).min(size);
    if end > offset {
        let punched = fallocate(
            target,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            (end - offset) as i64,
        );
        if punched.is_err() {
            static Z: [u8; 64 << 10] = [0; 64 << 10];
            let mut o = offset;
            while o < end {
                let n = (end - o).min(Z.len() as u64) as usize;
                target.write_all_at(&Z[..n], o)?;
                o += n as u64;
            }
        }
    }
    // Beyond the end of the file: extend it (reads as zeros).
    if offset + len > size {
        target.set_len(offset + len)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(old_size: u64) -> Header {
        Header {
            path: b"dir/disk0.img".to_vec(),
            dev: 1,
            ino: 2,
            old_size,
            meta: Meta::default(),
        }
    }

    fn content(f: &File) -> Vec<u8> {
        let mut v = vec![0u8; f.metadata().unwrap().len() as usize];
        f.read_exact_at(&mut v, 0).unwrap();
        v
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// Overwrites ranges the way the agent does: record old bytes, then write.
    fn patch(w: &mut Writer, target: &File, offset: u64, new: &[u8]) {
        let size = target.metadata().unwrap().len();
        let end = (offset + new.len() as u64).min(size);
        if end > offset {
            let mut old = vec![0u8; (end - offset) as usize];
            target.read_exact_at(&mut old, offset).unwrap();
            w.record(offset, &old).unwrap();
        }
        w.sync().unwrap();
        target.write_all_at(new, offset).unwrap();
    }

    #[test]
    fn replay_restores_the_old_content_and_size_and_is_idempotent() {
        let old = pattern(3 * MAX_RECORD + 12345, 1);
        let target = tempfile::tempfile().unwrap();
        target.write_all_at(&old, 0).unwrap();
        let mut w =
            Writer::create(tempfile::tempfile().unwrap(), &header(old.len() as u64)).unwrap();
        patch(&mut w, &target, 100, &pattern(5000, 2));
        patch(&mut w, &target, 200, &pattern(100, 3)); // overlaps the first: oldest bytes must win
        patch(
            &mut w,
            &target,
            MAX_RECORD as u64 - 10,
            &pattern(2 * MAX_RECORD + 50, 4),
        );
        // Growth beyond the old size needs no record: the size is in the header.
        patch(&mut w, &target, old.len() as u64 - 5, &pattern(1 << 16, 5));
        assert_ne!(content(&target), old);
        let log = w.file().try_clone().unwrap();
        let (h, start) = read_header(&log).unwrap().expect("header");
        assert_eq!(h, header(old.len() as u64));
        assert_eq!(records(&log, start).unwrap().len(), 1 + 1 + 3 + 1);
        restore(&log, start, &h, &target).unwrap();
        assert_eq!(content(&target), old);
        // A second replay (a crash during the first) changes nothing.
        restore(&log, start, &h, &target).unwrap();
        assert_eq!(content(&target), old);
    }

    #[test]
    fn shrinking_is_undone_from_the_recorded_tail() {
        let old = pattern(200_000, 7);
        let target = tempfile::tempfile().unwrap();
        target.write_all_at(&old, 0).unwrap();
        let mut w =
            Writer::create(tempfile::tempfile().unwrap(), &header(old.len() as u64)).unwrap();
        w.record(150_000, &old[150_000..]).unwrap();
        w.sync().unwrap();
        target.set_len(150_000).unwrap();
        let log = w.file().try_clone().unwrap();
        let (h, start) = read_header(&log).unwrap().unwrap();
        restore(&log, start, &h, &target).unwrap();
        assert_eq!(content(&target), old);
    }

    #[test]
    fn torn_records_and_headers_are_ignored() {
        let old = pattern(50_000, 9);
        let target = tempfile::tempfile().unwrap();
        target.write_all_at(&old, 0).unwrap();
        let mut w =
            Writer::create(tempfile::tempfile().unwrap(), &header(old.len() as u64)).unwrap();
        patch(&mut w, &target, 1000, &pattern(3000, 1));
        let log = w.file().try_clone().unwrap();
        let good_len = log.metadata().unwrap().len();
        // A record cut short by a crash, and garbage after it.
        w.record(20_000, &pattern(8000, 2)).unwrap();
        log.set_len(log.metadata().unwrap().len() - 7).unwrap();
        log.write_all_at(b"UREC garbage", log.metadata().unwrap().len())
            .unwrap();
        let (h, start) = read_header(&log).unwrap().unwrap();
        let recs = records(&log, start).unwrap();
        assert_eq!(recs.len(), 1);
        assert!(recs[0].at < good_len);
        restore(&log, start, &h, &target).unwrap();
        assert_eq!(content(&target), old);
        // A flipped bit in a record's data invalidates it (and what follows).
        let bad = tempfile::tempfile().unwrap();
        let mut w2 = Writer::create(bad.try_clone().unwrap(), &header(10)).unwrap();
        w2.record(0, b"0123456789").unwrap();
        let (_, s2) = read_header(&bad).unwrap().unwrap();
        bad.write_all_at(b"X", s2 + 16 + 3).unwrap();
        assert!(records(&bad, s2).unwrap().is_empty());
        // A torn or foreign header: no header (the file was never touched).
        let torn = tempfile::tempfile().unwrap();
        Writer::create(torn.try_clone().unwrap(), &header(10)).unwrap();
        torn.set_len(torn.metadata().unwrap().len() - 1).unwrap();
        assert!(read_header(&torn).unwrap().is_none());
        let foreign = tempfile::tempfile().unwrap();
        foreign.write_all_at(&[7u8; 100], 0).unwrap();
        assert!(read_header(&foreign).unwrap().is_none());
        assert!(read_header(&tempfile::tempfile().unwrap())
            .unwrap()
            .is_none());
    }

    #[test]
    fn hole_records_restore_holes_and_cost_no_bytes() {
        let size = 64u64 << 20;
        let target = tempfile::tempfile().unwrap();
        target.set_len(size).unwrap();
        target.write_all_at(b"head", 0).unwrap();
        let mut w = Writer::create(tempfile::tempfile().unwrap(), &header(size)).unwrap();
        w.record_zero(4096, size - 4096).unwrap();
        w.sync().unwrap();
        target.write_all_at(&pattern(1 << 20, 3), 1 << 20).unwrap();
        target.write_all_at(b"tail", size - 4).unwrap();
        let log = w.file().try_clone().unwrap();
        assert!(
            log.metadata().unwrap().len() < 4096,
            "a hole costs no bytes"
        );
        let (h, start) = read_header(&log).unwrap().unwrap();
        let recs = records(&log, start).unwrap();
        assert_eq!(recs.len(), 1);
        assert!(recs[0].zero && recs[0].len == size - 4096);
        restore(&log, start, &h, &target).unwrap();
        let data = crate::fs::sparse::data_ranges(&target, 0, size).unwrap();
        assert!(data.iter().all(|&(o, _)| o < 4096), "{data:?}");
        let mut head = [0u8; 4];
        target.read_exact_at(&mut head, 0).unwrap();
        assert_eq!(&head, b"head");
        // A damaged hole record is not replayed (nor anything after it).
        let bad = tempfile::tempfile().unwrap();
        let mut w2 = Writer::create(bad.try_clone().unwrap(), &header(10)).unwrap();
        w2.record_zero(0, 10).unwrap();
        let (_, s2) = read_header(&bad).unwrap().unwrap();
        bad.write_all_at(b"X", s2 + 5).unwrap();
        assert!(records(&bad, s2).unwrap().is_empty());
    }

    #[test]
    fn zero_ranges_become_holes_again() {
        let mut old = pattern(64 << 10, 3);
        old[8192..8192 + 16384].fill(0);
        let target = tempfile::tempfile().unwrap();
        target.set_len(old.len() as u64).unwrap();
        target.write_all_at(&old[..8192], 0).unwrap();
        target
            .write_all_at(&old[8192 + 16384..], 8192 + 16384)
            .unwrap();
        let mut w =
            Writer::create(tempfile::tempfile().unwrap(), &header(old.len() as u64)).unwrap();
        patch(&mut w, &target, 0, &pattern(64 << 10, 8));
        let log = w.file().try_clone().unwrap();
        let (h, start) = read_header(&log).unwrap().unwrap();
        restore(&log, start, &h, &target).unwrap();
        assert_eq!(content(&target), old);
        let holes = crate::fs::sparse::data_ranges(&target, 0, old.len() as u64).unwrap();
        assert!(
            holes
                .iter()
                .all(|&(o, l)| o + l <= 8192 || o >= 8192 + 16384),
            "the zero range is a hole again: {holes:?}"
        );
    }
}
