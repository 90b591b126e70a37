//! Compression of the frames the worker sends (`compression` in the
//! config): `off`, `zstd[:LEVEL]` (every frame of bulk data that shrinks),
//! or `auto` (level 1, and only frames whose first 16 KiB shrink by a
//! tenth: random or already compressed data is sent as it is, at the cost
//! of compressing 16 KiB per MiB). Negotiated after the handshake
//! (`Request::Negotiate`); the agent's replies are not compressed (they
//! are hashes and listings, and small).
//!
//! On the wire a compressed frame's length has its top bit set and its
//! body is the decompressed length (4 bytes, little endian, at most
//! `MAX_FRAME`) followed by one zstd frame.

use super::MAX_FRAME;
use std::io;

/// The flag in a frame's length that marks a compressed body.
pub const COMPRESSED: u32 = 1 << 31;
/// Frames with less bulk data than this are never compressed.
const MIN_PAYLOAD: usize = 4096;
/// What `auto` tries before compressing a whole frame.
const SAMPLE: usize = 16 << 10;
/// Level of `auto`: fast enough not to be the bottleneck on two cores.
const AUTO_LEVEL: i32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Off,
    Zstd(i32),
    Auto,
}

impl Mode {
    /// `off`, `auto`, `zstd` (level 3) or `zstd:LEVEL` (1-19).
    pub fn parse(s: &str) -> Option<Mode> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" | "none" => Some(Mode::Off),
            "auto" => Some(Mode::Auto),
            "zstd" => Some(Mode::Zstd(3)),
            v => {
                let level: i32 = v.strip_prefix("zstd:")?.parse().ok()?;
                (1..=19).contains(&level).then_some(Mode::Zstd(level))
            }
        }
    }

    /// The session's setting (None: auto).
    pub fn of_config(s: Option<&str>) -> Mode {
        s.and_then(Mode::parse).unwrap_or(Mode::Auto)
    }

    /// The name sent in `Negotiate`.
    pub fn name(self) -> String {
        match self {
            Mode::Off => "off".into(),
            Mode::Auto => "auto".into(),
            Mode::Zstd(l) => format!("zstd:{l}"),
        }
    }
}

/// Compresses an encoded frame (length prefix included) carrying
/// `payload` bytes of bulk data, if `mode` says so and it shrinks; returns
/// the compressed frame.
pub fn compress_frame(frame: &[u8], payload: usize, mode: Mode) -> Option<Vec<u8>> {
    let level = match mode {
        Mode::Off => return None,
        _ if payload < MIN_PAYLOAD => return None,
        Mode::Zstd(l) => l,
        Mode::Auto => {
            let body = &frame[4..];
            let sample = &body[body.len().saturating_sub(payload).min(body.len())..];
            let sample = &sample[..sample.len().min(SAMPLE)];
            let small = zstd::bulk::compress(sample, AUTO_LEVEL).ok()?;
            if small.len() * 10 > sample.len() * 9 {
                return None;
            }
            AUTO_LEVEL
        }
    };
    let body = &frame[4..];
    let z = zstd::bulk::compress(body, level).ok()?;
    if z.len() + 8 >= frame.len() {
        return None;
    }
    let mut out = Vec::with_capacity(z.len() + 8);
    out.extend_from_slice(&((4 + z.len()) as u32 | COMPRESSED).to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&z);
    Some(out)
}

/// Decompresses a compressed frame's body (after its length) into `buf`.
pub fn decompress_body(body: &[u8], buf: &mut Vec<u8>) -> io::Result<()> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    if body.len() < 4 {
        return Err(bad("compressed frame without its length".into()));
    }
    let raw = u32::from_le_bytes(body[..4].try_into().unwrap()) as usize;
    if raw > MAX_FRAME {
        return Err(bad(format!(
            "compressed frame of {raw} bytes exceeds the {MAX_FRAME}-byte limit"
        )));
    }
    let out = zstd::bulk::decompress(&body[4..], raw)
        .map_err(|e| bad(format!("undecodable compressed frame: {e}")))?;
    if out.len() != raw {
        return Err(bad("compressed frame of the wrong length".into()));
    }
    *buf = out;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn text_compresses_random_does_not_and_both_round_trip() {
        let text: Vec<u8> = b"guest filesystem block with repeated structure "
            .iter()
            .cycle()
            .take(1 << 20)
            .copied()
            .collect();
        let f = frame(&text);
        for mode in [Mode::Auto, Mode::Zstd(3), Mode::Zstd(19)] {
            let z = compress_frame(&f, text.len(), mode).expect("text shrinks");
            assert!(z.len() < f.len() / 10);
            let len = u32::from_le_bytes(z[..4].try_into().unwrap());
            assert!(len & COMPRESSED != 0);
            assert_eq!((len & !COMPRESSED) as usize, z.len() - 4);
            let mut out = Vec::new();
            decompress_body(&z[4..], &mut out).unwrap();
            assert_eq!(out, text);
        }
        let mut x = 1u64;
        let random: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let f = frame(&random);
        assert!(compress_frame(&f, random.len(), Mode::Auto).is_none());
        assert!(compress_frame(&f, random.len(), Mode::Zstd(3)).is_none());
        assert!(compress_frame(&frame(&text[..100]), 100, Mode::Zstd(3)).is_none());
        assert!(compress_frame(&frame(&text), text.len(), Mode::Off).is_none());
    }

    #[test]
    fn hostile_compressed_frames_are_refused() {
        let mut out = Vec::new();
        assert!(decompress_body(&[1, 2], &mut out).is_err());
        let mut big = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        big.extend_from_slice(&zstd::bulk::compress(&[0u8; 100], 1).unwrap());
        assert!(decompress_body(&big, &mut out).is_err());
        // A bomb: declares 100 bytes, expands to 1 MiB.
        let mut bomb = 100u32.to_le_bytes().to_vec();
        bomb.extend_from_slice(&zstd::bulk::compress(&vec![0u8; 1 << 20], 1).unwrap());
        assert!(decompress_body(&bomb, &mut out).is_err());
        let mut garbage = 100u32.to_le_bytes().to_vec();
        garbage.extend_from_slice(&[7u8; 50]);
        assert!(decompress_body(&garbage, &mut out).is_err());
        assert_eq!(Mode::parse("zstd:25"), None);
        assert_eq!(Mode::parse("zstd:5"), Some(Mode::Zstd(5)));
        assert_eq!(Mode::of_config(None), Mode::Auto);
    }
}
