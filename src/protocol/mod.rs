//! The agent protocol: one versioned, pipelined request/response protocol
//! for every transport (local pipes, SSH, in-process).
//!
//! On the wire: the agent first writes the 8-byte banner [`BANNER`]; then
//! both directions carry frames of a 4-byte little-endian length followed by
//! a postcard-encoded [`Envelope`] or [`Response`]. Frames larger than
//! [`MAX_FRAME`] are refused. Requests carry an id chosen by the client;
//! id 0 asks for no reply (data writes), their errors are reported by the
//! file's `Commit`. A reply may span several frames (`last = false`).

pub mod client;
pub mod compress;
pub mod msg;
pub mod throttle;

pub use client::{Client, ClientStats, Join, ProtoError, Ticket};
pub use msg::*;

use std::io::{self, Read, Write};

/// Bumped on every incompatible change; the handshake refuses a mismatch.
/// 4: StatFs (SSH set-up checks) and the catalog requests (Rename, ReadFile,
/// JournalExtents, AppendTail). 5: block hashes are BLAKE3 chaining values of
/// 4 KiB blocks (see `blocktree`), OpenInPlace. 6: verification
/// (VerifyCaps, VerifyRange, VerifyItems, VerifyBlocks, VerifyJournal; see
/// `hash::stream`).
/// 7: parallel streams
/// (OpenStreams, HelloStream) and shared temporaries (OpenShared,
/// OpenSegment, FinishSegment, CommitShared); small files compared by
/// digest and sent as deltas (ProbeFile, PutDelta); compression
/// (Negotiate, compressed frames: see `compress`); resumable transfers
/// (OpenResumable, CleanPartials).
/// 8: roles and epochs (Claim, Synced, Promote, the quarantine requests,
/// ErrorKind::Fenced).
pub const PROTOCOL_VERSION: u32 = 8;
/// Written by the agent before anything else, so noise from a login shell
/// (motd, "command not found") is recognised instead of misparsed.
pub const BANNER: &[u8; 8] = b"GEOREP1\n";
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 16 << 20;
/// Largest data payload in one `Write` frame.
pub const MAX_DATA: usize = 1 << 20;
/// Name of the agent's own directory at the slave root (identity, staging):
/// reserved, never listed, never replicated.
pub const STATE_DIR: &[u8] = b".georep";
/// Prefix of the agent's temporary files: reserved like [`STATE_DIR`],
/// hidden from listings, removed when stale.
pub const TMP_PREFIX: &[u8] = b".georep-tmp-";
/// Prefix of the temporaries of resumable transfers (a kind of
/// [`TMP_PREFIX`]): kept across connections with a progress record in the
/// state directory, removed when stale by age or superseded.
pub const PARTIAL_PREFIX: &[u8] = b".georep-tmp-part-";

/// Most window hashes an agent keeps for one file being assembled (a
/// resumable file's progress record, a segment's roots): 65536 windows,
/// files of 256 GiB, 2 MiB of hashes. Larger files are not resumed nor
/// split in segments: the worker sends them whole in one stream.
pub const MAX_KEPT_WINDOWS: u64 = 1 << 16;

/// The quarantine of a failback's old master (`.georep-quarantine/ID/`),
/// at the root: reserved like [`STATE_DIR`], so no crawl lists, ships or
/// removes it.
pub const QUARANTINE_DIR: &[u8] = b".georep-quarantine";

/// Whether `name`, directly at a root, is one of georep's own directories.
pub fn reserved_at_root(name: &[u8]) -> bool {
    name == STATE_DIR || name == QUARANTINE_DIR
}

/// Reads one frame; `Ok(None)` on a clean EOF between frames.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<Option<()>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "truncated frame header",
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_le_bytes(len);
    let compressed = len & compress::COMPRESSED != 0;
    let len = (len & !compress::COMPRESSED) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit"),
        ));
    }
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf)
        .map_err(|e| io::Error::new(e.kind(), format!("truncated frame: {e}")))?;
    if compressed {
        let body = std::mem::take(buf);
        compress::decompress_body(&body, buf)?;
    }
    Ok(Some(()))
}

/// Encodes `msg` as one frame (length prefix included).
pub fn encode_frame<T: serde::Serialize>(msg: &T) -> io::Result<Vec<u8>> {
    encode_frame_sized(msg, 0)
}

/// Encodes `msg` into a buffer pre-sized for `payload` bytes of data, so
/// large frames are not left with the slack of repeated doubling.
pub fn encode_frame_sized<T: serde::Serialize>(msg: &T, payload: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(payload + 256);
    out.extend_from_slice(&[0u8; 4]);
    let body = postcard::to_extend(msg, out).map_err(io::Error::other)?;
    let len = body.len() - 4;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frame of {len} bytes too large"),
        ));
    }
    let mut body = body;
    body[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(body)
}

pub fn write_frame<T: serde::Serialize>(w: &mut impl Write, msg: &T) -> io::Result<()> {
    w.write_all(&encode_frame(msg)?)
}
