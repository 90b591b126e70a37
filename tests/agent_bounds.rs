//! Every request has a bounded cost: a hostile master (raw frames over the
//! real `georep agent` process's pipes) that stops reading replies, floods
//! pings, asks for journals of huge records, lists directories of files
//! with large xattrs, removes trees deeper than the agent's fds and stack,
//! hashes a huge sparse basis or patches a sparse file in place cannot make
//! the agent's memory grow without bound, wedge it, or crash it. Peak
//! memory is read from /proc (VmHWM), bytes written from /proc/PID/io.

mod common;

use common::raw_agent::RawAgent as Agent;
use georep::fs::meta::Meta;
use georep::fs::relpath::RelPath;
use georep::hash::digest::{self, WINDOW};
use georep::protocol::{encode_frame, Envelope, Reply, Request, MAX_FRAME};
use serde_bytes::ByteBuf;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn p(s: &str) -> RelPath {
    RelPath::new(s.as_bytes().to_vec()).unwrap()
}

fn meta(mode: u32) -> Meta {
    Meta {
        mode,
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        ..Meta::default()
    }
}

fn scratch(prefix: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let base = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(common::scratch_base())
        .unwrap();
    let root = base.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    (base, root)
}

/// Data without zero blocks, different at every offset.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(2654435761) >> 7) as u8 | 1)
        .collect()
}

/// Peak memory of the agent in MiB.
fn peak_mib(a: &Agent) -> u64 {
    a.status_kib("VmHWM") / 1024
}

#[test]
fn a_master_that_stops_reading_replies_cannot_grow_the_agent_and_is_no_longer_read() {
    let (_base, root) = scratch("bound-replies");
    let data = pattern(64 << 20);
    std::fs::write(root.join("big"), &data).unwrap();
    let mut a = Agent::start(&root);
    // 48 reads of 8 MiB each, none of the replies read yet.
    let ids: Vec<(u64, usize)> = (0..48)
        .map(|i| {
            let off = (i % 8) * (8 << 20);
            let id = a.send(Request::ReadFile {
                path: p("big"),
                offset: off as u64,
                max: 8 * MIB,
            });
            (id, off)
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let peak = peak_mib(&a);
    assert!(
        peak < 128,
        "48 unread 8 MiB replies took the agent to {peak} MiB"
    );
    for (id, off) in ids {
        match a.reply_to(id).expect("a reply").result {
            Ok(Reply::Data(d)) => assert!(d[..] == data[off..off + (8 << 20)], "read at {off}"),
            other => panic!("ReadFile at {off}: {other:?}"),
        }
    }

    // A flood of pings while nobody reads: the agent stops reading its
    // input once its replies are behind, so the flood stalls.
    let ping = encode_frame(&Envelope {
        id: 1,
        body: Request::Ping,
    })
    .unwrap();
    let chunk = ping.repeat(50_000);
    let rounds = 20; // 1M pings
    let written = Arc::new(AtomicU64::new(0));
    let flood = {
        let mut input = a.input();
        let written = written.clone();
        std::thread::spawn(move || {
            for _ in 0..rounds {
                input.write_all(&chunk).unwrap();
                written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    let took = written.load(Ordering::Relaxed);
    let total = (ping.len() * 50_000 * rounds) as u64;
    assert!(
        took < total / 2,
        "the agent read {took} of {total} bytes of pings while its replies were not read"
    );
    let peak = peak_mib(&a);
    assert!(peak < 128, "the ping flood took the agent to {peak} MiB");
    // Everything is answered once the replies are read.
    let mut pongs = 0;
    a.responses(50_000 * rounds, |r| {
        assert!(matches!(r.result, Ok(Reply::Pong)), "{r:?}");
        pongs += 1;
    });
    flood.join().unwrap();
    assert_eq!(pongs, 50_000 * rounds);
    assert!(matches!(a.call(Request::Ping).result, Ok(Reply::Pong)));
    a.finish();
}

#[test]
fn journal_extents_of_huge_records_read_record_headers_only() {
    use georep::catalog::cdp;
    let (_base, root) = scratch("bound-journal");
    let header = cdp::Header {
        block_size: 4096,
        disk_size: 1 << 30,
        start: 100,
        base_time: 100,
        base_name: "base.qcow2".into(),
    };
    let f = std::fs::File::create(root.join("j.cdp")).unwrap();
    f.write_all_at(&header.encode().unwrap(), 0).unwrap();
    // Eight records of 64 MiB (their data left as holes: headers only are read).
    let mut pos = cdp::HEADER_LEN;
    let len = cdp::MAX_RECORD as u64;
    for i in 0..8u64 {
        let mut head = Vec::new();
        head.extend_from_slice(&(101 + i).to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        head.extend_from_slice(&(len as u32).to_le_bytes());
        head.extend_from_slice(&(i * len).to_le_bytes());
        head.extend_from_slice(&[0u8; 32]);
        f.write_all_at(&head, pos).unwrap();
        pos += cdp::RECORD_HEADER_LEN + len;
    }
    f.set_len(pos).unwrap();
    let mut a = Agent::start(&root);
    let r = a.call(Request::JournalExtents {
        path: p("j.cdp"),
        after: 102,
        limit: pos,
    });
    match r.result {
        Ok(Reply::Extents(e)) => assert_eq!(e, vec![(2 * len, 6 * len)]),
        other => panic!("{other:?}"),
    }
    let peak = peak_mib(&a);
    assert!(peak < 100, "JournalExtents took the agent to {peak} MiB");
    a.finish();
}

#[test]
fn a_directory_of_files_with_large_xattrs_lists_in_frames_of_bounded_size() {
    let (base, root) = scratch("bound-xattrs");
    // tmpfs takes user xattrs of 64 KiB, many per file (as XFS does).
    let fs = common::mount::Tmpfs::mount(&root, 512);
    let d = fs.path().join("d");
    std::fs::create_dir(&d).unwrap();
    let value = pattern(60_000);
    for i in 0..600 {
        let f = d.join(format!("f{i:04}"));
        std::fs::write(&f, b"x").unwrap();
        xattr::set(&f, "user.DosStream.big", &value).unwrap();
    }
    // One file whose xattrs alone exceed a frame.
    let e = fs.path().join("e");
    std::fs::create_dir(&e).unwrap();
    std::fs::write(e.join("huge"), b"x").unwrap();
    for k in 0..300 {
        xattr::set(e.join("huge"), format!("user.part{k:03}"), &value).unwrap();
    }
    let mut a = Agent::start(&root);
    let id = a.send(Request::ListDir { path: p("d") });
    let frames = a.frames_of(id);
    let mut names = Vec::new();
    for f in &frames {
        match &f.result {
            Ok(Reply::Entries(es)) => {
                for e in es {
                    assert_eq!(e.meta.xattrs.len(), 1, "{:?}", e.name);
                    assert!(e.meta.xattrs[0].1[..] == value[..]);
                    names.push(String::from_utf8(e.name.to_vec()).unwrap());
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(names.len(), 600);
    assert!(frames.len() >= 3, "{} frames", frames.len());
    // Too big for any frame: an error reply naming the file, and the agent goes on.
    let r = a.call(Request::ListDir { path: p("e") });
    match r.result {
        Err(e) => assert!(e.message.contains("huge"), "{e:?}"),
        other => panic!("a listing larger than {MAX_FRAME} bytes in one entry: {other:?}"),
    }
    assert!(matches!(a.call(Request::Ping).result, Ok(Reply::Pong)));
    a.finish();
    drop(fs);
    drop(base);
}

#[test]
fn a_tree_deeper_than_the_agents_fds_and_stack_is_removed() {
    let (_base, root) = scratch("bound-deep");
    // 30000 levels, built by renames so that no path is ever long.
    let deep = root.join("deep");
    let tmp = root.join("tmp");
    /// Removes what is left with rm(1) should the agent fail (std's
    /// recursive removal would overflow the test's own stack).
    struct Rm(std::path::PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::process::Command::new("rm")
                .arg("-rf")
                .arg(&self.0)
                .status();
        }
    }
    let _rm = Rm(root.clone());
    std::fs::create_dir(&deep).unwrap();
    std::fs::write(deep.join("bottom"), b"x").unwrap();
    for i in 0..30_000 {
        std::fs::create_dir(&tmp).unwrap();
        if i % 1000 == 0 {
            std::fs::write(tmp.join("file"), b"y").unwrap();
        }
        std::fs::rename(&deep, tmp.join("d")).unwrap();
        std::fs::rename(&tmp, &deep).unwrap();
    }
    // 64 fds: the process's own, a few for the root, and little else.
    let mut a = Agent::start_with(&root, Some(64));
    let r = a.call(Request::Remove { path: p("deep") });
    assert!(r.result.is_ok(), "{:?}", r.result);
    assert!(!deep.exists());
    assert!(matches!(a.call(Request::Ping).result, Ok(Reply::Pong)));
    a.finish();
}

#[test]
fn hashing_a_huge_sparse_basis_is_bounded_and_pings_are_answered_during_long_requests() {
    let (_base, root) = scratch("bound-sparse");
    // 8 TiB of holes: two million digest windows.
    let huge = std::fs::File::create(root.join("huge")).unwrap();
    huge.set_len(8 << 40).unwrap();
    let mut a = Agent::start(&root);
    let r = a.call(Request::OpenFile {
        fid: 1,
        path: p("t"),
        basis: Some(p("huge")),
        size: 4096,
    });
    assert!(r.result.is_ok(), "{r:?}");
    let per = 65536u64;
    let zero = digest::zero_hash(WINDOW);
    for k in 0..(8u64 << 40) / (per * WINDOW) {
        let r = a.call(Request::WindowHashes {
            fid: 1,
            offset: k * per * WINDOW,
            len: per * WINDOW,
            window: WINDOW as u32,
        });
        match r.result {
            Ok(Reply::Hashes(h)) => {
                assert_eq!(h.len() as u64, per);
                assert!(h.iter().all(|x| *x == zero));
            }
            other => panic!("{other:?}"),
        }
    }
    let peak = peak_mib(&a);
    assert!(
        peak < 64,
        "window hashes of a sparse basis took the agent to {peak} MiB"
    );

    // A long request (128 MiB hashed) does not hold up a ping sent after it.
    let data = pattern(128 << 20);
    std::fs::write(root.join("data"), &data).unwrap();
    let r = a.call(Request::OpenFile {
        fid: 2,
        path: p("t2"),
        basis: Some(p("data")),
        size: 4096,
    });
    assert!(r.result.is_ok(), "{r:?}");
    let long = a.send(Request::WindowHashes {
        fid: 2,
        offset: 0,
        len: data.len() as u64,
        window: WINDOW as u32,
    });
    let ping = a.send(Request::Ping);
    let first = a.next_response().expect("a reply");
    assert_eq!(
        first.id, ping,
        "the ping waited for the long request: {first:?}"
    );
    match a.reply_to(long).unwrap().result {
        Ok(Reply::Hashes(h)) => {
            assert_eq!(h.len(), 32);
            assert_eq!(h[5], digest::hash(&data[5 << 22..6 << 22]));
        }
        other => panic!("{other:?}"),
    }
    a.finish();
}

#[test]
fn in_place_holes_are_saved_as_holes_and_restored_as_holes() {
    let (_base, root) = scratch("bound-inplace");
    let size = 64 * MIB;
    let f = std::fs::File::create(root.join("img")).unwrap();
    f.set_len(size).unwrap();
    let head = pattern(4096);
    f.write_all_at(&head, 0).unwrap();
    drop(f);
    let mut a = Agent::start(&root);
    let r = a.call(Request::OpenInPlace {
        fid: 1,
        path: p("img"),
        size,
    });
    assert!(
        matches!(r.result, Ok(Reply::OpenedInPlace { in_place: true, .. })),
        "{r:?}"
    );
    let w0 = a.wchar();
    // One byte at the end: the rest is copied (the head) or a hole.
    let mut new = vec![0u8; size as usize];
    new[..4096].copy_from_slice(&head);
    new[size as usize - 1] = 1;
    a.post(Request::Copy {
        fid: 1,
        offset: 0,
        len: 4096,
    });
    a.post(Request::Write {
        fid: 1,
        offset: size - 1,
        data: ByteBuf::from(vec![1u8]),
    });
    let r = a.call(Request::Commit {
        fid: 1,
        digest: digest::digest_of(&new),
        meta: meta(0o644),
    });
    assert!(matches!(r.result, Ok(Reply::Committed { .. })), "{r:?}");
    let wrote = a.wchar() - w0;
    assert!(
        wrote < 8 * MIB,
        "one byte patched in a sparse file wrote {wrote} bytes"
    );
    assert!(std::fs::read(root.join("img")).unwrap() == new);
    let f = std::fs::File::open(root.join("img")).unwrap();
    let data: u64 = georep::fs::sparse::data_ranges(&f, 0, size)
        .unwrap()
        .iter()
        .map(|r| r.1)
        .sum();
    assert!(
        data <= 64 << 10,
        "{data} bytes of data: the holes were filled"
    );

    // Scattered one-byte writes into holes, then an abort: the roll-back
    // leaves the file all holes again (hole records by whole blocks).
    let size = 64 * MIB;
    let f = std::fs::File::create(root.join("img2")).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    let r = a.call(Request::OpenInPlace {
        fid: 2,
        path: p("img2"),
        size,
    });
    assert!(
        matches!(r.result, Ok(Reply::OpenedInPlace { in_place: true, .. })),
        "{r:?}"
    );
    let mut frames = Vec::new();
    for k in 0..(size / 8192) {
        frames.extend(
            encode_frame(&Envelope {
                id: 0,
                body: Request::Write {
                    fid: 2,
                    offset: k * 8192,
                    data: ByteBuf::from(vec![1u8]),
                },
            })
            .unwrap(),
        );
    }
    a.send_raw(&frames);
    // A request the handler answers itself: everything before it was applied.
    assert!(a.call(Request::Abort { fid: 2 }).result.is_ok());
    let f = std::fs::File::open(root.join("img2")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), size);
    assert!(
        georep::fs::sparse::data_ranges(&f, 0, size)
            .unwrap()
            .is_empty(),
        "the roll-back left data where there were holes"
    );
    a.finish();
}
