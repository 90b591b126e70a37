//! The CDP journal format: an append-only log of timestamped block writes.
//! All integers little-endian.
//!
//! Header, [`HEADER_LEN`] = 128 bytes:
//!
//! | off | len | field |
//! |----:|----:|-------|
//! | 0   | 8   | magic `GEOCDPJ\n` |
//! | 8   | 4   | version, 1 |
//! | 12  | 4   | block size: record offsets and lengths are multiples of it |
//! | 16  | 8   | disk size in bytes |
//! | 24  | 8   | start time (ns since the epoch): the journal holds writes after it |
//! | 32  | 8   | base point time: the point (a qcow image) the records apply to |
//! | 40  | 2   | length of the base file name |
//! | 42  | 70  | base file name (UTF-8, relative to the journal's directory), zero padded |
//! | 112 | 16  | first 16 bytes of BLAKE3 over bytes 0..112 |
//!
//! Then records, each [`RECORD_HEADER_LEN`] = 56 bytes followed by its data:
//!
//! | off | len | field |
//! |----:|----:|-------|
//! | 0   | 8   | timestamp (ns since the epoch) |
//! | 8   | 4   | flags: bit 0 = another record of the same point follows |
//! | 12  | 4   | length of the data (a multiple of the block size, may be 0) |
//! | 16  | 8   | offset on the disk (a multiple of the block size) |
//! | 24  | 32  | BLAKE3 over bytes 0..24 of this header and the data |
//! | 56  | len | data |
//!
//! A point is a group of records with one timestamp, the last without the
//! continuation flag; timestamps strictly increase from group to group and
//! exceed the start time. Every point is restorable: the base image with
//! every record up to and including that point applied in order. A group
//! cut short (a crash while appending) is not a point: readers stop before it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

pub const MAGIC: &[u8; 8] = b"GEOCDPJ\n";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 128;
pub const RECORD_HEADER_LEN: u64 = 56;
/// Flag: another record of the same point follows.
pub const CONTINUED: u32 = 1;
/// Largest data length of one record.
pub const MAX_RECORD: u32 = 64 << 20;
const MAX_BASE_NAME: usize = 70;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub block_size: u32,
    pub disk_size: u64,
    pub start: u64,
    pub base_time: u64,
    pub base_name: String,
}

/// Why a journal cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a journal: {0}")]
    Header(String),
    #[error("corrupt record at byte {offset}: {why}")]
    Corrupt { offset: u64, why: String },
}

impl Header {
    pub fn encode(&self) -> Result<[u8; HEADER_LEN as usize], JournalError> {
        let name = self.base_name.as_bytes();
        if name.is_empty() || name.len() > MAX_BASE_NAME || name.contains(&b'/') {
            return Err(JournalError::Header(format!(
                "base file name {:?} must be 1-{MAX_BASE_NAME} bytes without '/'",
                self.base_name
            )));
        }
        let mut h = [0u8; HEADER_LEN as usize];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        h[16..24].copy_from_slice(&self.disk_size.to_le_bytes());
        h[24..32].copy_from_slice(&self.start.to_le_bytes());
        h[32..40].copy_from_slice(&self.base_time.to_le_bytes());
        h[40..42].copy_from_slice(&(name.len() as u16).to_le_bytes());
        h[42..42 + name.len()].copy_from_slice(name);
        let sum = blake3::hash(&h[..112]);
        h[112..128].copy_from_slice(&sum.as_bytes()[..16]);
        Ok(h)
    }

    pub fn decode(h: &[u8]) -> Result<Header, JournalError> {
        let bad = |m: &str| JournalError::Header(m.to_string());
        if h.len() < HEADER_LEN as usize {
            return Err(bad("shorter than its 128-byte header"));
        }
        if &h[0..8] != MAGIC {
            return Err(bad("bad magic"));
        }
        if blake3::hash(&h[..112]).as_bytes()[..16] != h[112..128] {
            return Err(bad("header checksum mismatch"));
        }
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap());
        if u32_at(8) != VERSION {
            return Err(JournalError::Header(format!(
                "version {} (this georep reads {VERSION})",
                u32_at(8)
            )));
        }
        let block_size = u32_at(12);
        if !block_size.is_power_of_two() || !(512..=(1 << 20)).contains(&block_size) {
            return Err(bad("bad block size"));
        }
        let n = u16::from_le_bytes([h[40], h[41]]) as usize;
        if n == 0 || n > MAX_BASE_NAME {
            return Err(bad("bad base name length"));
        }
        let base_name = std::str::from_utf8(&h[42..42 + n])
            .map_err(|_| bad("base name is not UTF-8"))?
            .to_string();
        Ok(Header {
            block_size,
            disk_size: u64_at(16),
            start: u64_at(24),
            base_time: u64_at(32),
            base_name,
        })
    }
}

/// One record's header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub time: u64,
    pub flags: u32,
    pub offset: u64,
    pub length: u32,
}

fn record_checksum(head: &[u8], data: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&head[..24]);
    h.update(data);
    *h.finalize().as_bytes()
}

/// Encodes one record (header and data).
pub fn encode_record(time: u64, flags: u32, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_HEADER_LEN as usize + data.len());
    out.extend_from_slice(&time.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    let sum = record_checksum(&out, data);
    out.extend_from_slice(&sum);
    out.extend_from_slice(data);
    out
}

/// Encodes one point: its writes as records sharing `time`.
pub fn encode_point(time: u64, writes: &[(u64, &[u8])]) -> Vec<u8> {
    if writes.is_empty() {
        return encode_record(time, 0, 0, &[]);
    }
    let mut out = Vec::new();
    for (i, (off, data)) in writes.iter().enumerate() {
        let flags = if i + 1 < writes.len() { CONTINUED } else { 0 };
        out.extend(encode_record(time, flags, *off, data));
    }
    out
}

/// A point found in a journal: its time and byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointSpan {
    pub time: u64,
    /// Offset of the group's first record.
    pub start: u64,
    /// Offset just after its last record.
    pub end: u64,
}

/// The header fields of the record at `at` (unchecked: for a range a
/// [`Scanner`] already validated).
pub fn read_record(file: &File, at: u64) -> io::Result<Record> {
    let mut head = [0u8; RECORD_HEADER_LEN as usize];
    file.read_exact_at(&mut head, at)?;
    let u32_at = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().unwrap());
    Ok(Record {
        time: u64_at(0),
        flags: u32_at(8),
        length: u32_at(12),
        offset: u64_at(16),
    })
}

/// A record's header fields and, when asked for, its data.
type RecordRead = (Record, Option<Vec<u8>>);

/// Reads a journal's points in order, checking the format as it goes.
pub struct Scanner<'a> {
    file: &'a File,
    pub header: Header,
    pos: u64,
    limit: u64,
    last_time: u64,
    /// Verify record checksums (reads the data); off: headers only.
    verify: bool,
    buf: Vec<u8>,
}

/// A point with its writes, as [`Scanner::next_point`] returns it when
/// asked for data.
pub struct PointData {
    pub span: PointSpan,
    pub writes: Vec<(u64, Vec<u8>)>,
}

impl<'a> Scanner<'a> {
    /// Opens a scan of `[HEADER_LEN, limit)` of `file`.
    pub fn new(file: &'a File, limit: u64, verify: bool) -> Result<Scanner<'a>, JournalError> {
        let mut h = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut h, 0)
            .map_err(|e| JournalError::Header(format!("reading the header: {e}")))?;
        let header = Header::decode(&h)?;
        let last_time = header.start;
        Ok(Scanner {
            file,
            header,
            pos: HEADER_LEN,
            limit,
            last_time,
            verify,
            buf: Vec::new(),
        })
    }

    /// Continues a scan from `pos`, the end of a point at `time` found before.
    pub fn resume(&mut self, pos: u64, time: u64) {
        self.pos = pos;
        self.last_time = time;
    }

    pub fn position(&self) -> u64 {
        self.pos
    }

    fn read_record(&mut self, want_data: bool) -> Result<Option<RecordRead>, JournalError> {
        let at = self.pos;
        if at + RECORD_HEADER_LEN > self.limit {
            return Ok(None);
        }
        let mut head = [0u8; RECORD_HEADER_LEN as usize];
        self.file.read_exact_at(&mut head, at)?;
        let u32_at = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().unwrap());
        let rec = Record {
            time: u64_at(0),
            flags: u32_at(8),
            length: u32_at(12),
            offset: u64_at(16),
        };
        let corrupt = |why: String| JournalError::Corrupt { offset: at, why };
        let bs = self.header.block_size as u64;
        if rec.length > MAX_RECORD
            || rec.offset % bs != 0
            || rec.length as u64 % bs != 0
            || rec
                .offset
                .checked_add(rec.length as u64)
                .is_none_or(|e| e > self.header.disk_size)
            || rec.flags & !CONTINUED != 0
        {
            return Err(corrupt(format!(
                "bad record: offset {} length {} flags {:#x}",
                rec.offset, rec.length, rec.flags
            )));
        }
        let end = at + RECORD_HEADER_LEN + rec.length as u64;
        if end > self.limit {
            return Ok(None);
        }
        let data = if self.verify || want_data {
            self.buf.resize(rec.length as usize, 0);
            self.file
                .read_exact_at(&mut self.buf, at + RECORD_HEADER_LEN)?;
            if self.verify && record_checksum(&head, &self.buf)[..] != head[24..56] {
                return Err(corrupt("checksum mismatch".into()));
            }
            want_data.then(|| self.buf.clone())
        } else {
            None
        };
        self.pos = end;
        Ok(Some((rec, data)))
    }

    fn group(&mut self, want_data: bool) -> Result<Option<PointData>, JournalError> {
        let start = self.pos;
        let mut writes = Vec::new();
        let mut time = None;
        loop {
            let rec_at = self.pos;
            let Some((rec, data)) = self.read_record(want_data)? else {
                self.pos = start;
                return Ok(None);
            };
            match time {
                None => {
                    if rec.time <= self.last_time {
                        return Err(JournalError::Corrupt {
                            offset: rec_at,
                            why: format!(
                                "timestamp {} not after the previous point {}",
                                rec.time, self.last_time
                            ),
                        });
                    }
                    time = Some(rec.time);
                }
                Some(t) if t != rec.time => {
                    return Err(JournalError::Corrupt {
                        offset: rec_at,
                        why: "a continued point changes its timestamp".into(),
                    })
                }
                Some(_) => {}
            }
            if rec.length > 0 {
                if let Some(d) = data {
                    writes.push((rec.offset, d));
                }
            }
            if rec.flags & CONTINUED == 0 {
                let t = time.unwrap();
                self.last_time = t;
                return Ok(Some(PointData {
                    span: PointSpan {
                        time: t,
                        start,
                        end: self.pos,
                    },
                    writes,
                }));
            }
        }
    }

    /// The next whole point, or None at the limit (or before a partial group).
    pub fn next_span(&mut self) -> Result<Option<PointSpan>, JournalError> {
        Ok(self.group(false)?.map(|p| p.span))
    }

    /// The next whole point with its writes.
    pub fn next_point(&mut self) -> Result<Option<PointData>, JournalError> {
        self.group(true)
    }
}

/// Every point of `[0, limit)` of a journal.
pub fn spans(
    file: &File,
    limit: u64,
    verify: bool,
) -> Result<(Header, Vec<PointSpan>), JournalError> {
    let mut s = Scanner::new(file, limit, verify)?;
    let mut out = Vec::new();
    while let Some(p) = s.next_span()? {
        out.push(p);
    }
    Ok((s.header, out))
}

/// Applies every point up to and including `upto` to a raw image of the
/// base; returns how many points were applied and the last one's time.
pub fn apply(
    journal: &File,
    limit: u64,
    upto: u64,
    raw: &File,
) -> Result<(u64, Option<u64>), JournalError> {
    let mut s = Scanner::new(journal, limit, true)?;
    let (mut n, mut last) = (0, None);
    while let Some(p) = s.next_point()? {
        if p.span.time > upto {
            break;
        }
        for (off, data) in &p.writes {
            raw.write_all_at(data, *off)?;
        }
        n += 1;
        last = Some(p.span.time);
    }
    Ok((n, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            block_size: 4096,
            disk_size: 1 << 20,
            start: 100,
            base_time: 100,
            base_name: "x.qcow2".into(),
        }
    }

    #[test]
    fn header_round_trips_and_detects_damage() {
        let h = header();
        let enc = h.encode().unwrap();
        assert_eq!(Header::decode(&enc).unwrap(), h);
        let mut bad = enc;
        bad[20] ^= 1;
        assert!(Header::decode(&bad).is_err());
        assert!(Header {
            base_name: "a/b".into(),
            ..header()
        }
        .encode()
        .is_err());
    }

    #[test]
    fn scanner_reads_whole_points_only_and_applies_them() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j.cdp");
        let mut bytes = header().encode().unwrap().to_vec();
        let a = vec![1u8; 4096];
        let b = vec![2u8; 8192];
        bytes.extend(encode_point(101, &[(0, &a)]));
        bytes.extend(encode_point(102, &[(4096, &b), (65536, &a)]));
        bytes.extend(encode_point(103, &[]));
        let whole = bytes.len() as u64;
        // A partial group: the first record of a two-record point.
        let partial = encode_point(104, &[(0, &b), (8192, &a)]);
        bytes.extend(&partial[..partial.len() - 100]);
        std::fs::write(&p, &bytes).unwrap();
        let f = File::open(&p).unwrap();
        let (_, found) = spans(&f, bytes.len() as u64, true).unwrap();
        assert_eq!(
            found.iter().map(|s| s.time).collect::<Vec<_>>(),
            vec![101, 102, 103]
        );
        assert_eq!(found.last().unwrap().end, whole);
        let raw_p = dir.path().join("raw");
        std::fs::write(&raw_p, vec![0u8; 1 << 20]).unwrap();
        let raw = std::fs::OpenOptions::new()
            .write(true)
            .open(&raw_p)
            .unwrap();
        assert_eq!(apply(&f, whole, 102, &raw).unwrap(), (2, Some(102)));
        let img = std::fs::read(&raw_p).unwrap();
        assert_eq!(&img[0..4096], &a[..]);
        assert_eq!(&img[4096..12288], &b[..]);
        assert_eq!(&img[65536..69632], &a[..]);
        // Damage in a record's data is found when verifying.
        let mut damaged = bytes.clone();
        damaged[HEADER_LEN as usize + 100] ^= 0xff;
        std::fs::write(&p, &damaged).unwrap();
        let f = File::open(&p).unwrap();
        assert!(matches!(
            spans(&f, whole, true),
            Err(JournalError::Corrupt { .. })
        ));
        assert_eq!(spans(&f, whole, false).unwrap().1.len(), 3);
    }

    #[test]
    fn timestamps_must_increase() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j.cdp");
        let mut bytes = header().encode().unwrap().to_vec();
        bytes.extend(encode_point(105, &[]));
        bytes.extend(encode_point(105, &[]));
        std::fs::write(&p, &bytes).unwrap();
        let f = File::open(&p).unwrap();
        assert!(spans(&f, bytes.len() as u64, true).is_err());
        // Not after the start time either.
        let mut bytes = header().encode().unwrap().to_vec();
        bytes.extend(encode_point(100, &[]));
        std::fs::write(&p, &bytes).unwrap();
        let f = File::open(&p).unwrap();
        assert!(spans(&f, bytes.len() as u64, true).is_err());
    }
}
