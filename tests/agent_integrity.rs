//! What the agent writes is what was verified, where it may write, on
//! inodes it owns, with a safe policy for privileges: a hostile master (raw
//! frames over the real `georep agent` process) or a local user on the
//! slave changing the basis between hashing and copying, mounting a file
//! system under the root, planting hard links to files outside the root,
//! or sending setuid modes.

mod common;

use common::raw_agent::RawAgent as Agent;
use georep::fs::meta::Meta;
use georep::fs::relpath::RelPath;
use georep::hash::digest::{self, WINDOW};
use georep::protocol::{ErrorKind, Reply, Request};
use serde_bytes::ByteBuf;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

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

fn put(path: &str, data: &[u8], meta: Meta) -> Request {
    Request::PutFile {
        path: p(path),
        data: ByteBuf::from(data.to_vec()),
        digest: digest::digest_of(data),
        meta,
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

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(2654435761) >> 7) as u8 ^ seed | 1)
        .collect()
}

fn ok(a: &mut Agent, body: Request) -> Reply {
    let r = a.call(body);
    r.result.unwrap_or_else(|e| panic!("refused: {e:?}"))
}

/// The agent's settings file on the slave (`.georep/agent.toml`).
fn configure(root: &Path, toml: &str) {
    std::fs::create_dir_all(root.join(".georep")).unwrap();
    std::fs::write(root.join(".georep/agent.toml"), toml).unwrap();
}

#[test]
fn the_digest_covers_the_bytes_written_not_hashes_of_an_earlier_basis() {
    let (_base, root) = scratch("integrity-digest");
    let len = 3 * WINDOW as usize + 12345;
    let old = pattern(len, 1);
    let mut new = old.clone();
    new[WINDOW as usize + 100..WINDOW as usize + 200].fill(0x55);
    let mut a = Agent::start(&root);
    for (fid, in_place, with_blocks) in [(1, false, false), (2, false, true), (3, true, false)] {
        let name = format!("f{fid}");
        std::fs::write(root.join(&name), &old).unwrap();
        let target = if in_place {
            name.clone()
        } else {
            format!("t{fid}")
        };
        let r = if in_place {
            ok(
                &mut a,
                Request::OpenInPlace {
                    fid,
                    path: p(&target),
                    size: len as u64,
                },
            )
        } else {
            ok(
                &mut a,
                Request::OpenFile {
                    fid,
                    path: p(&target),
                    basis: Some(p(&name)),
                    size: len as u64,
                },
            )
        };
        assert!(
            !in_place || matches!(r, Reply::OpenedInPlace { in_place: true, .. }),
            "{r:?}"
        );
        // The master compares hashes of the basis as it is now...
        ok(
            &mut a,
            Request::WindowHashes {
                fid,
                offset: 0,
                len: len as u64,
                window: WINDOW as u32,
            },
        );
        if with_blocks {
            ok(
                &mut a,
                Request::BlockHashes {
                    fid,
                    offset: WINDOW,
                    len: WINDOW,
                    block: 4096,
                },
            );
        }
        // ...then a local process (or another transfer) changes the basis...
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(root.join(&name))
            .unwrap();
        f.write_all_at(&new[WINDOW as usize..2 * WINDOW as usize], WINDOW)
            .unwrap();
        drop(f);
        // ...and the master copies everything, vouching for the old content.
        a.post(Request::Copy {
            fid,
            offset: 0,
            len: len as u64,
        });
        let r = a.call(Request::Commit {
            fid,
            digest: digest::digest_of(&old),
            meta: meta(0o644),
        });
        match r.result {
            Err(e) => assert_eq!(e.kind, ErrorKind::Mismatch, "{fid}: {e:?}"),
            Ok(r) => panic!("{fid}: content other than the verified one published: {r:?}"),
        }
        ok(&mut a, Request::Barrier);
        if !in_place {
            assert!(!root.join(&target).exists(), "{fid}: published");
        }
    }
    // Copies of a basis that did not change still verify.
    std::fs::write(root.join("b"), &new).unwrap();
    ok(
        &mut a,
        Request::OpenFile {
            fid: 9,
            path: p("c"),
            basis: Some(p("b")),
            size: len as u64,
        },
    );
    ok(
        &mut a,
        Request::WindowHashes {
            fid: 9,
            offset: 0,
            len: len as u64,
            window: WINDOW as u32,
        },
    );
    a.post(Request::Copy {
        fid: 9,
        offset: 0,
        len: len as u64,
    });
    let r = ok(
        &mut a,
        Request::Commit {
            fid: 9,
            digest: digest::digest_of(&new),
            meta: meta(0o644),
        },
    );
    assert!(matches!(r, Reply::Committed { .. }), "{r:?}");
    assert!(std::fs::read(root.join("c")).unwrap() == new);
    a.finish();
}

#[test]
fn the_agent_does_not_cross_into_another_file_system_unless_configured() {
    let (_base, root) = scratch("integrity-xdev");
    std::fs::create_dir_all(root.join("d")).unwrap();
    std::fs::write(root.join("d/plain"), b"p").unwrap();
    let fs = common::mount::Tmpfs::mount(&root.join("d/m"), 16);
    std::fs::create_dir(fs.path().join("sub")).unwrap();
    std::fs::write(fs.path().join("keep"), b"keep").unwrap();
    std::fs::write(fs.path().join("sub/keep2"), b"keep").unwrap();
    let mut a = Agent::start(&root);
    a.refused(put("d/m/x", b"x", meta(0o644)), "write into a mount");
    a.refused(Request::ListDir { path: p("d/m") }, "list a mount");
    a.refused(
        Request::Remove {
            path: p("d/m/keep"),
        },
        "remove in a mount",
    );
    a.refused(
        Request::Remove { path: p("d") },
        "remove a tree holding a mount",
    );
    a.refused(Request::Remove { path: p("d/m") }, "remove a mount point");
    assert_eq!(std::fs::read(fs.path().join("keep")).unwrap(), b"keep");
    assert_eq!(std::fs::read(fs.path().join("sub/keep2")).unwrap(), b"keep");
    assert!(!fs.path().join("x").exists());
    a.finish();

    configure(&root, "cross_mounts = true\n");
    let mut a = Agent::start(&root);
    ok(&mut a, put("d/m/x", b"x", meta(0o644)));
    ok(&mut a, Request::Barrier);
    assert_eq!(std::fs::read(fs.path().join("x")).unwrap(), b"x");
    a.finish();

    configure(&root, "cross_mounts = maybe\n");
    match Agent::try_start(&root, None) {
        Err(e) => assert!(e.message.contains("agent.toml"), "{e:?}"),
        Ok(a) => {
            a.kill();
            panic!("a bad settings file was accepted");
        }
    }
}

/// Plants `root/name` as a hard link to `outside` (a local user's doing).
fn plant(root: &Path, name: &str, outside: &Path) {
    let _ = std::fs::remove_file(root.join(name));
    std::fs::hard_link(outside, root.join(name)).unwrap();
}

#[test]
fn inodes_with_hard_links_georep_did_not_make_are_never_read_or_written() {
    let (base, root) = scratch("integrity-links");
    let outside = base.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let secret = outside.join("secret");
    std::fs::write(&secret, b"secret").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let journal = outside.join("journal");
    std::fs::write(&journal, vec![3u8; 100]).unwrap();
    let before = common::tree::snapshot(&outside);
    let (uid0, mode0) = {
        let m = std::fs::metadata(&secret).unwrap();
        (m.uid(), m.mode())
    };
    let mut a = Agent::start(&root);

    plant(&root, "x", &secret);
    a.refused(
        Request::ReadFile {
            path: p("x"),
            offset: 0,
            max: 100,
        },
        "read through a planted link",
    );
    let mut m = meta(0o666);
    m.uid = 4242;
    m.gid = 4242;
    let r = a.call(Request::SetMeta {
        path: p("x"),
        meta: m,
    });
    assert!(r.result.is_err(), "{r:?}");
    assert!(!root.join("x").exists(), "the planted link is broken");

    plant(&root, "j", &journal);
    let r = a.call(Request::AppendTail {
        path: p("j"),
        at: 100,
        data: ByteBuf::from(b"tail".to_vec()),
        digest: *blake3::hash(b"tail").as_bytes(),
        sync: true,
        check: None,
    });
    assert!(r.result.is_err(), "{r:?}");
    assert!(!root.join("j").exists(), "the planted link is broken");

    // Not a basis either (hashes and copies would read it), nor a link target.
    plant(&root, "y", &secret);
    let r = ok(
        &mut a,
        Request::OpenFile {
            fid: 1,
            path: p("y"),
            basis: None,
            size: 6,
        },
    );
    assert!(matches!(r, Reply::Opened { basis_size: None }), "{r:?}");
    ok(&mut a, Request::Abort { fid: 1 });
    a.refused(
        Request::OpenFile {
            fid: 2,
            path: p("z"),
            basis: Some(p("y")),
            size: 6,
        },
        "a planted link as basis",
    );
    a.refused(
        Request::Link {
            path: p("v"),
            target: p("y"),
        },
        "a planted link as link target",
    );
    assert_eq!(common::tree::snapshot(&outside), before, "outside changed");
    let m = std::fs::metadata(&secret).unwrap();
    assert_eq!((m.uid(), m.mode()), (uid0, mode0));

    // Links georep made itself are written through as before.
    ok(&mut a, put("a", b"0123456789", meta(0o644)));
    ok(&mut a, Request::Barrier);
    ok(
        &mut a,
        Request::Link {
            path: p("b"),
            target: p("a"),
        },
    );
    ok(
        &mut a,
        Request::SetMeta {
            path: p("b"),
            meta: meta(0o640),
        },
    );
    let r = ok(
        &mut a,
        Request::AppendTail {
            path: p("b"),
            at: 10,
            data: ByteBuf::from(b"ab".to_vec()),
            digest: *blake3::hash(b"ab").as_bytes(),
            sync: true,
            check: None,
        },
    );
    assert!(matches!(r, Reply::Committed { written: 12 }), "{r:?}");
    match ok(
        &mut a,
        Request::ReadFile {
            path: p("a"),
            offset: 0,
            max: 100,
        },
    ) {
        Reply::Data(d) => assert_eq!(&d[..], b"0123456789ab"),
        other => panic!("{other:?}"),
    }
    let m = std::fs::metadata(root.join("a")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.nlink()), (0o640, 2));
    a.finish();
}

#[test]
fn setuid_and_setgid_are_stripped_from_files_unless_configured_and_ids_are_kept() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test checks the policy of an agent running as root: run the suite as root"
    );
    let (_base, root) = scratch("integrity-setid");
    let ids = |mode| Meta {
        mode,
        uid: 1234,
        gid: 2345,
        ..Meta::default()
    };
    let disk = |name: &str| {
        let m = std::fs::symlink_metadata(root.join(name)).unwrap();
        (m.mode() & 0o7777, m.uid(), m.gid())
    };
    let mut a = Agent::start(&root);
    let reported = |a: &mut Agent, name: &str| match ok(a, Request::Stat { path: p(name) }) {
        Reply::Stat(Some(e)) => e.meta.mode,
        other => panic!("{other:?}"),
    };
    ok(&mut a, put("s", b"#!/bin/sh\n", ids(0o4755)));
    ok(&mut a, Request::Barrier);
    assert_eq!(disk("s"), (0o755, 1234, 2345));
    // Reported as the master sent it, so that crawls converge.
    assert_eq!(reported(&mut a, "s"), 0o4755);
    ok(
        &mut a,
        Request::SetMeta {
            path: p("s"),
            meta: ids(0o6750),
        },
    );
    assert_eq!(disk("s"), (0o750, 1234, 2345));
    assert_eq!(reported(&mut a, "s"), 0o6750);
    ok(
        &mut a,
        Request::SetMeta {
            path: p("s"),
            meta: ids(0o700),
        },
    );
    assert_eq!((disk("s").0, reported(&mut a, "s")), (0o700, 0o700));
    // Directories keep setgid (group inheritance, no privilege).
    ok(
        &mut a,
        Request::Mkdir {
            path: p("g"),
            meta: ids(0o2775),
        },
    );
    assert_eq!(disk("g"), (0o2775, 1234, 2345));
    // In place too.
    std::fs::write(root.join("big"), vec![1u8; 8192]).unwrap();
    ok(
        &mut a,
        Request::OpenInPlace {
            fid: 1,
            path: p("big"),
            size: 8192,
        },
    );
    a.post(Request::Copy {
        fid: 1,
        offset: 0,
        len: 8192,
    });
    ok(
        &mut a,
        Request::Commit {
            fid: 1,
            digest: digest::digest_of(&[1u8; 8192]),
            meta: ids(0o2755),
        },
    );
    assert_eq!(disk("big"), (0o755, 1234, 2345));
    assert_eq!(reported(&mut a, "big"), 0o2755);
    a.finish();

    configure(&root, "preserve_setuid = true\n");
    let mut a = Agent::start(&root);
    ok(&mut a, put("s2", b"#!/bin/sh\n", ids(0o4755)));
    ok(&mut a, Request::Barrier);
    assert_eq!(disk("s2"), (0o4755, 1234, 2345));
    a.finish();
}
