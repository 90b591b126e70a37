//! The agent's verification requests against a hostile or careless
//! master (raw frames to the real `georep agent`): nothing outside the
//! root is read, symlinks are never followed, bad arguments are refused,
//! a flood of requests is turned away with Busy, and keep-alives are
//! answered while a slow range is hashed on the verification thread.

mod common;

use common::raw_agent::RawAgent as Agent;
use georep::fs::relpath::RelPath;
use georep::hash::stream::{Item, Key};
use georep::protocol::{ErrorKind, Reply, Request};

fn p(s: &str) -> RelPath {
    RelPath::new(s.as_bytes().to_vec()).unwrap()
}

fn whole() -> (Key, Key) {
    (Key::before(&RelPath::root()), Key::after(&RelPath::root()))
}

fn range(rid: u64, rate: u64) -> Request {
    let (from, to) = whole();
    Request::VerifyRange {
        rid,
        from,
        to,
        rate,
        owners: true,
    }
}

#[test]
fn verification_reads_nothing_outside_the_root_and_refuses_bad_arguments() {
    let base = tempfile::Builder::new()
        .prefix("agent-verify")
        .tempdir_in(common::scratch_base())
        .unwrap();
    let root = base.path().join("root");
    let outside = base.path().join("outside");
    std::fs::create_dir_all(root.join("d")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), vec![7u8; 10000]).unwrap();
    std::fs::write(root.join("d/f"), vec![1u8; 10000]).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("dirlink")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), root.join("filelink")).unwrap();
    let mut a = Agent::start(&root);
    // The whole stream: symlinks are items, never descended into or read.
    let r = a.call(range(1, 0));
    let Ok(Reply::RangeHash { entries, .. }) = r.result else {
        panic!("{r:?}")
    };
    assert_eq!(entries, 5, "root, d, d/f, dirlink, filelink");
    let (from, to) = whole();
    let r = a.call(Request::VerifyItems {
        rid: 1,
        from,
        to,
        rate: 0,
        owners: true,
    });
    let Ok(Reply::Items(items)) = r.result else {
        panic!("{r:?}")
    };
    let paths: Vec<String> = items.iter().map(|i| i.path().to_string()).collect();
    assert!(paths.iter().all(|p| !p.contains("secret")), "{paths:?}");
    let windows = items
        .iter()
        .filter(|i| matches!(i, Item::Window { .. }))
        .count();
    assert_eq!(windows, 1, "only d/f's content is read: {paths:?}");
    // The stream cut anywhere into consecutive ranges (the agent goes on
    // from where the previous one ended) gives the same items.
    for cut in ["d", "d/f", "dirlink"] {
        let mid = Key::new(p(cut), georep::hash::stream::HEADER);
        let (from, to) = whole();
        let mut parts = Vec::new();
        for (rid, (lo, hi)) in [(10, (from, mid.clone())), (11, (mid, to))] {
            let r = a.call(Request::VerifyRange {
                rid,
                from: lo.clone(),
                to: hi.clone(),
                rate: 0,
                owners: true,
            });
            assert!(r.result.is_ok(), "{r:?}");
            let r = a.call(Request::VerifyItems {
                rid,
                from: lo,
                to: hi,
                rate: 0,
                owners: true,
            });
            let Ok(Reply::Items(i)) = r.result else {
                panic!("{r:?}")
            };
            parts.extend(i);
        }
        assert_eq!(parts, items, "cut at {cut}");
    }
    // Blocks through symlinks, of a directory, of a missing file: refused.
    for (path, what) in [
        ("dirlink/secret", "a path through a symlink"),
        ("filelink", "a symlink to a file outside"),
        ("d", "a directory"),
        ("nothing", "a missing file"),
    ] {
        let r = a.call(Request::VerifyBlocks {
            path: p(path),
            offset: 0,
            len: 4096,
            rate: 0,
        });
        assert!(r.result.is_err(), "{what}: {r:?}");
    }
    for (offset, len, what) in [
        (1, 4096, "unaligned"),
        (0, (4 << 20) + 4096, "more than a window"),
        ((4 << 20) - 4096, 8192, "across windows"),
    ] {
        let r = a.call(Request::VerifyBlocks {
            path: p("d/f"),
            offset,
            len,
            rate: 0,
        });
        assert_eq!(r.result.unwrap_err().kind, ErrorKind::Invalid, "{what}");
    }
    let r = a.call(Request::VerifyBlocks {
        path: p("d/f"),
        offset: 0,
        len: 4 << 20,
        rate: 0,
    });
    let Ok(Reply::BlockHashes(h)) = r.result else {
        panic!("{r:?}")
    };
    assert_eq!(h.len(), 3, "10000 bytes are three blocks");
    // A path into georep's own state: refused like any other request.
    let r = a.call(Request::VerifyBlocks {
        path: p(".georep/identity.json"),
        offset: 0,
        len: 4096,
        rate: 0,
    });
    assert!(r.result.is_err(), "{r:?}");
    a.finish();
    assert_eq!(
        std::fs::read(outside.join("secret")).unwrap(),
        vec![7u8; 10000]
    );
}

#[test]
fn keepalives_are_answered_while_a_slow_range_is_hashed_and_floods_are_refused() {
    let base = tempfile::Builder::new()
        .prefix("agent-verify")
        .tempdir_in(common::scratch_base())
        .unwrap();
    let root = base.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("big"), common::mutate::data(1, 12 << 20)).unwrap();
    let mut a = Agent::start(&root);
    // 12 MiB at 2 MiB/s: seconds on the verification thread.
    let slow = a.frame(range(1, 2 << 20), 1000);
    a.send_raw(&slow);
    let ping = a.frame(Request::Ping, 1001);
    a.send_raw(&ping);
    let first = loop {
        let r = a.reply_to_any().expect("a reply");
        if r.id == 1000 || r.id == 1001 {
            break r;
        }
    };
    assert_eq!(first.id, 1001, "the ping is answered first: {first:?}");
    assert!(matches!(first.result, Ok(Reply::Pong)));
    // More requests than the queue holds: some are turned away, none lost.
    let mut ids = Vec::new();
    for i in 0..24 {
        let f = a.frame(range(10 + i, 2 << 20), 2000 + i);
        a.send_raw(&f);
        ids.push(2000 + i);
    }
    // The refusals come at once, from the main thread; the queued ranges
    // would take a minute, so the test stops reading there.
    let mut busy = 0;
    while busy < 12 {
        let r = a.reply_to_any().expect("a reply");
        if ids.contains(&r.id) {
            let e = r.result.expect_err("only refusals come this early");
            assert_eq!(e.kind, ErrorKind::Busy, "{e:?}");
            busy += 1;
        }
    }
    // Closing the input ends the agent even with ranges queued.
    a.finish();
}
