//! The bodies of georep's fuzz targets (each `src/bin/NAME.rs` hands AFL's
//! input to the function of the same name). Each panics on a broken
//! property, which AFL records as a crash.

use georep::agent::{serve, AgentOptions};
use georep::fs::meta::{Meta, Timestamp};
use georep::fs::relpath::RelPath;
use georep::protocol::{encode_frame, read_frame, Envelope, Request, Response, PROTOCOL_VERSION};
use serde_bytes::ByteBuf;
use std::io::Cursor;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The frame decoder: frames split from arbitrary bytes decode as
/// requests or replies or fail cleanly, and what decodes re-encodes to a
/// fixed point.
pub fn frame(data: &[u8]) {
    let mut r = Cursor::new(data);
    let mut buf = Vec::new();
    while let Ok(Some(())) = read_frame(&mut r, &mut buf) {
        assert!(buf.len() <= georep::protocol::MAX_FRAME);
        if let Ok(env) = postcard::from_bytes::<Envelope>(&buf) {
            let once = encode_frame(&env).expect("a decoded request encodes");
            let mut again = Vec::new();
            read_frame(&mut Cursor::new(&once), &mut again).unwrap();
            let env2: Envelope = postcard::from_bytes(&again).expect("re-decodes");
            assert_eq!(encode_frame(&env2).unwrap(), once, "request round trip");
        }
        if let Ok(resp) = postcard::from_bytes::<Response>(&buf) {
            let once = encode_frame(&resp).expect("a decoded reply encodes");
            let resp2: Response = postcard::from_bytes(&once[4..]).expect("re-decodes");
            assert_eq!(encode_frame(&resp2).unwrap(), once, "reply round trip");
        }
    }
}

/// The rsync delta applier as the agent uses it: arbitrary deltas against
/// a basis never produce more than the limit; and a delta computed from a
/// signature reproduces the new data exactly.
pub fn delta(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let split = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let limit = data[2] as usize * 64;
    let (basis, rest) = data[3..].split_at(split.min(data.len() - 3));
    let mut out = Vec::new();
    if fast_rsync::apply_limited(basis, rest, &mut out, limit).is_ok() {
        assert!(
            out.len() <= limit,
            "applied {} bytes past a limit of {limit}",
            out.len()
        );
    }
    let block = 64 << (data[2] % 4);
    let sig = fast_rsync::Signature::calculate(
        basis,
        fast_rsync::SignatureOptions {
            block_size: block,
            crypto_hash_size: 8,
        },
    );
    let mut d = Vec::new();
    fast_rsync::diff(&sig.index(), rest, &mut d).expect("diff");
    let mut back = Vec::new();
    fast_rsync::apply_limited(basis, &d, &mut back, rest.len()).expect("own delta applies");
    assert!(back == rest, "a delta did not reproduce its data");
}

/// An in-memory file holding `data`.
fn memfile(data: &[u8]) -> std::fs::File {
    let fd = nix::sys::memfd::memfd_create(c"georep-fuzz", nix::sys::memfd::MFdFlags::empty())
        .expect("memfd");
    let f = std::fs::File::from(fd);
    f.write_all_at(data, 0).unwrap();
    f
}

/// The CDP journal parser: any bytes give whole points in increasing time
/// order inside the limit, or an error; applying them stays on the disk.
/// (The first byte: bit 0 verifies record checksums, bit 1 leaves the
/// header's checksum as it is instead of fixing it.)
pub fn journal(data: &[u8]) {
    use georep::catalog::cdp;
    if data.is_empty() {
        return;
    }
    let verify = data[0] & 1 == 1;
    let mut body = data[1..].to_vec();
    // Mostly a header whose checksum holds, so mutations reach the records.
    if data[0] & 2 == 0 && body.len() >= cdp::HEADER_LEN as usize {
        let sum = blake3::hash(&body[..112]);
        body[112..128].copy_from_slice(&sum.as_bytes()[..16]);
    }
    let f = memfile(&body);
    let limit = (data.len() - 1) as u64;
    if let Ok((header, spans)) = cdp::spans(&f, limit, verify) {
        let mut last = header.start;
        let mut end = cdp::HEADER_LEN;
        for s in &spans {
            assert!(s.time > last, "times increase");
            assert_eq!(s.start, end, "points are contiguous");
            assert!(s.end > s.start && s.end <= limit, "inside the limit");
            last = s.time;
            end = s.end;
        }
        if header.disk_size <= 16 << 20 {
            let raw = memfile(&[]);
            raw.set_len(header.disk_size).unwrap();
            if let Ok((n, t)) = cdp::apply(&f, limit, u64::MAX, &raw) {
                assert!(n as usize <= spans.len());
                assert!(t.is_none_or(|t| spans.iter().any(|s| s.time == t)));
                assert_eq!(
                    raw.metadata().unwrap().len(),
                    header.disk_size,
                    "stays on the disk"
                );
            }
        }
    }
}

/// Where the agent target's slave root and the tree outside it live
/// (tmpfs when there is one: syncs cost nothing there).
fn arena() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!("georep-fuzz-{}", std::process::id()))
}

fn reset(arena: &Path) -> (PathBuf, PathBuf) {
    let root = arena.join("root");
    let outside = arena.join("outside");
    let _ = std::fs::remove_dir_all(arena);
    std::fs::create_dir_all(root.join("d/e")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"secret").unwrap();
    std::fs::write(root.join("a"), vec![7u8; 10000]).unwrap();
    std::fs::write(root.join("d/b"), b"bbbb").unwrap();
    std::os::unix::fs::symlink(&outside, root.join("l")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), root.join("d/s")).unwrap();
    std::fs::hard_link(outside.join("secret"), root.join("h")).unwrap();
    (root, outside)
}

const NAMES: &[&str] = &[
    "a", "b", "c", "d", "d/b", "d/e", "d/e/f", "d/s", "l", "l/secret", "h", "j", "g/x", "d/e/g",
];

/// One step of the agent target's input.
enum Item {
    Env(Envelope),
    Raw(Vec<u8>),
}

/// Reads the fuzz input as a little program of requests.
struct Ops<'a> {
    data: &'a [u8],
    /// The content each fid is meant to have, while the ops allow knowing it.
    model: std::collections::HashMap<u64, Option<Vec<u8>>>,
}

impl Ops<'_> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    fn num(&mut self) -> u64 {
        // Mostly small values, sometimes huge ones.
        match self.byte() % 8 {
            0 => u64::MAX - self.byte() as u64,
            1 => 1 << (self.byte() % 48),
            2 => u16::from_le_bytes([self.byte(), self.byte()]) as u64 * 4096,
            _ => u16::from_le_bytes([self.byte(), self.byte()]) as u64,
        }
    }

    fn bytes(&mut self) -> Vec<u8> {
        let n = (self.byte() as usize * 37).min(self.data.len());
        let (b, rest) = self.data.split_at(n);
        self.data = rest;
        b.to_vec()
    }

    fn path(&mut self) -> RelPath {
        RelPath::new(
            NAMES[self.byte() as usize % NAMES.len()]
                .as_bytes()
                .to_vec(),
        )
        .unwrap()
    }

    fn meta(&mut self) -> Meta {
        let b = self.byte();
        Meta {
            mode: [0o644, 0o755, 0o4755, 0o2775, 0o7777, 0o000][b as usize % 6],
            uid: if b & 0x40 != 0 { 4242 } else { 0 },
            gid: 0,
            mtime: Timestamp {
                sec: self.byte() as i64 * 1000,
                nsec: 0,
            },
            xattrs: if b & 0x80 != 0 {
                vec![(
                    ByteBuf::from(b"user.k".to_vec()),
                    ByteBuf::from(self.bytes()),
                )]
            } else {
                Vec::new()
            },
        }
    }

    fn next(&mut self) -> Option<Item> {
        if self.data.is_empty() {
            return None;
        }
        let op = self.byte();
        let fid = (self.byte() % 4) as u64;
        let body = match op % 28 {
            0 => Request::ListDir { path: self.path() },
            1 => Request::Stat { path: self.path() },
            2 => Request::Mkdir {
                path: self.path(),
                meta: self.meta(),
            },
            3 => Request::Remove { path: self.path() },
            4 => Request::Symlink {
                path: self.path(),
                target: ByteBuf::from(self.bytes()),
                meta: self.meta(),
            },
            5 => Request::Link {
                path: self.path(),
                target: self.path(),
            },
            6 => Request::SetMeta {
                path: self.path(),
                meta: self.meta(),
            },
            7 | 8 => {
                let size = self.num() % (1 << 20);
                self.model.insert(fid, Some(vec![0; size as usize]));
                let path = self.path();
                if op % 28 == 7 {
                    let basis = (self.byte() & 1 == 1).then(|| self.path());
                    Request::OpenFile {
                        fid,
                        path,
                        basis,
                        size,
                    }
                } else {
                    Request::OpenInPlace { fid, path, size }
                }
            }
            9 => Request::WindowHashes {
                fid,
                offset: self.num(),
                len: self.num(),
                window: self.num() as u32,
            },
            10 => Request::BlockHashes {
                fid,
                offset: self.num(),
                len: self.num(),
                block: [4096, 512, 0][self.byte() as usize % 3],
            },
            11 => Request::Signature {
                fid,
                offset: self.num(),
                len: self.num(),
                block: self.num() as u32,
            },
            12 | 13 => {
                let offset = self.num();
                let data = self.bytes();
                if let Some(Some(m)) = self.model.get_mut(&fid) {
                    let end = offset.saturating_add(data.len() as u64);
                    if end <= m.len() as u64 {
                        m[offset as usize..end as usize].copy_from_slice(&data);
                    }
                }
                return Some(Item::Env(Envelope {
                    id: 0,
                    body: Request::Write {
                        fid,
                        offset,
                        data: ByteBuf::from(data),
                    },
                }));
            }
            14 => {
                self.model.insert(fid, None);
                return Some(Item::Env(Envelope {
                    id: 0,
                    body: Request::Copy {
                        fid,
                        offset: self.num(),
                        len: self.num(),
                    },
                }));
            }
            15 => {
                self.model.insert(fid, None);
                return Some(Item::Env(Envelope {
                    id: 0,
                    body: Request::Patch {
                        fid,
                        offset: self.num(),
                        out_len: self.num(),
                        basis_off: self.num(),
                        basis_len: self.num(),
                        delta: ByteBuf::from(self.bytes()),
                    },
                }));
            }
            16 => {
                let digest = match self.model.remove(&fid).flatten() {
                    Some(m) if self.byte() & 1 == 1 => georep::hash::digest::digest_of(&m),
                    _ => [self.byte(); 32],
                };
                Request::Commit {
                    fid,
                    digest,
                    meta: self.meta(),
                }
            }
            17 => Request::Abort { fid },
            18 => {
                let data = self.bytes();
                let digest = if self.byte() & 1 == 1 {
                    georep::hash::digest::digest_of(&data)
                } else {
                    [0; 32]
                };
                Request::PutFile {
                    path: self.path(),
                    data: ByteBuf::from(data),
                    digest,
                    meta: self.meta(),
                }
            }
            19 => Request::Barrier,
            20 => Request::Rename {
                from: self.path(),
                to: self.path(),
            },
            21 => Request::ReadFile {
                path: self.path(),
                offset: self.num(),
                max: self.num(),
            },
            22 => Request::JournalExtents {
                path: self.path(),
                after: self.num(),
                limit: self.num(),
            },
            23 => {
                let data = self.bytes();
                let digest = *blake3::hash(&data).as_bytes();
                let check = (self.byte() & 1 == 1).then(|| (self.num(), [self.byte(); 32]));
                Request::AppendTail {
                    path: self.path(),
                    at: self.num(),
                    data: ByteBuf::from(data),
                    digest,
                    sync: self.byte() & 1 == 1,
                    check,
                }
            }
            24 => Request::GetIdentity,
            25 => Request::StatFs,
            26 => Request::Ping,
            _ => {
                // A raw frame: whatever bytes follow, behind a length.
                let b = self.bytes();
                let mut f = (b.len() as u32).to_le_bytes().to_vec();
                f.extend(b);
                return Some(Item::Raw(f));
            }
        };
        Some(Item::Env(Envelope { id: 1, body }))
    }
}

/// The agent's request handler in-process against a temporary root: any
/// sequence of requests leaves everything outside the root as it was,
/// and the agent ends cleanly at the end of its input (a panic, a hang or
/// an escape is a crash).
pub fn agent(data: &[u8]) {
    let arena = arena();
    let (root, outside) = reset(&arena);
    let before = std::fs::metadata(outside.join("secret")).unwrap();
    let mut input = encode_frame(&Envelope {
        id: 1,
        body: Request::Hello {
            version: PROTOCOL_VERSION,
            client: "fuzz".into(),
        },
    })
    .unwrap();
    let mut ops = Ops {
        data,
        model: Default::default(),
    };
    while let Some(item) = ops.next() {
        match item {
            Item::Env(env) => input.extend(encode_frame(&env).unwrap()),
            Item::Raw(bytes) => input.extend(bytes),
        }
    }
    let opts = AgentOptions {
        root: root.clone(),
        keepalive: std::time::Duration::from_secs(600),
    };
    let _ = serve(&opts, Cursor::new(input), std::io::sink());
    assert_eq!(
        std::fs::read(outside.join("secret")).unwrap(),
        b"secret",
        "a file outside the root changed"
    );
    let names: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names.len(),
        1,
        "something appeared outside the root: {names:?}"
    );
    let md = std::fs::metadata(outside.join("secret")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (md.mode(), md.uid(), md.gid(), md.mtime(), md.len()),
        (
            before.mode(),
            before.uid(),
            before.gid(),
            before.mtime(),
            before.len()
        ),
        "outside metadata changed"
    );
    let _ = std::fs::remove_dir_all(&arena);
}
