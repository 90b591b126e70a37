//! A hostile master: a client speaking the agent protocol directly (raw
//! frames over the real `georep agent` process's pipes) tries to escape the
//! root, write through symlinks, race a directory swap, and sends huge,
//! truncated and garbage frames and malformed deltas. Nothing outside the
//! root changes, and the agent answers with errors or closes cleanly: it
//! never crashes.

mod common;

use common::raw_agent::RawAgent as Agent;
use georep::fs::meta::Meta;
use georep::fs::relpath::RelPath;
use georep::protocol::{encode_frame, Envelope, Reply, Request};
use serde_bytes::ByteBuf;
use std::path::PathBuf;

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

fn put(path: RelPath, data: &[u8]) -> Request {
    Request::PutFile {
        path,
        data: ByteBuf::from(data.to_vec()),
        digest: georep::hash::digest::digest_of(data),
        meta: meta(0o644),
    }
}

/// A frame whose path is `evil`, which the library refuses to build: the
/// request is encoded with a placeholder of the same length, then patched.
fn evil_frame(evil: &[u8], make: impl Fn(RelPath) -> Request) -> Vec<u8> {
    let placeholder = vec![b'Q'; evil.len()];
    let f = encode_frame(&Envelope {
        id: 99,
        body: make(RelPath::new(placeholder.clone()).unwrap()),
    })
    .unwrap();
    let at = f
        .windows(placeholder.len())
        .position(|w| w == placeholder.as_slice())
        .unwrap();
    let mut out = f.clone();
    out[at..at + evil.len()].copy_from_slice(evil);
    out
}

#[test]
fn a_hostile_master_changes_nothing_outside_the_root_and_never_crashes_the_agent() {
    let base = tempfile::Builder::new()
        .prefix("hostile")
        .tempdir_in(common::scratch_base())
        .unwrap();
    let root = base.path().join("root");
    let outside = base.path().join("outside");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(outside.join("sub")).unwrap();
    std::fs::write(outside.join("secret"), b"do not touch").unwrap();
    std::fs::write(outside.join("sub/file"), b"nor this").unwrap();
    std::fs::write(root.join("base"), vec![7u8; 8192]).unwrap();
    let before = common::tree::snapshot(&outside);
    let outside_s = outside.display().to_string();
    let secret: PathBuf = outside.join("secret");

    // Escapes the library cannot even encode: each closes the connection.
    let evil_paths: Vec<Vec<u8>> = vec![
        b"../outside/secret".to_vec(),
        secret.display().to_string().into_bytes(),
        b"a/../../outside/secret".to_vec(),
        b"a\0b".to_vec(),
        b"./x".to_vec(),
    ];
    for evil in &evil_paths {
        for make in [
            (|p| Request::Remove { path: p }) as fn(RelPath) -> Request,
            |p| put(p, b"pwned"),
            |p| Request::Mkdir {
                path: p,
                meta: meta(0o777),
            },
            |p| Request::ListDir { path: p },
        ] {
            Agent::start(&root).expect_close(&evil_frame(evil, make), "escape");
        }
    }

    let mut a = Agent::start(&root);
    // Reserved names.
    a.refused(put(p(".georep/identity.json"), b"{}"), "state dir");
    a.refused(put(p(".georep-tmp-0000"), b"x"), "temporary name");
    // A symlink (legitimate data) pointing outside, then writes through it.
    let r = a.call(Request::Symlink {
        path: p("ln"),
        target: ByteBuf::from(outside_s.as_bytes().to_vec()),
        meta: meta(0o777),
    });
    assert!(r.result.is_ok(), "{r:?}");
    a.refused(put(p("ln/pwned"), b"pwned"), "write through symlink");
    a.refused(put(p("ln/secret"), b"pwned"), "overwrite through symlink");
    a.refused(
        Request::Mkdir {
            path: p("ln/d"),
            meta: meta(0o755),
        },
        "mkdir through symlink",
    );
    a.refused(
        Request::Remove {
            path: p("ln/secret"),
        },
        "remove through symlink",
    );
    a.refused(
        Request::Link {
            path: p("hl"),
            target: p("ln/secret"),
        },
        "hard link through symlink",
    );
    a.refused(
        Request::OpenFile {
            fid: 1,
            path: p("f"),
            basis: Some(p("ln/secret")),
            size: 4,
        },
        "basis through symlink",
    );
    a.refused(Request::ListDir { path: p("ln") }, "list through symlink");
    // Stat through a symlink reveals nothing: an error or "absent".
    let r = a.call(Request::Stat {
        path: p("ln/secret"),
    });
    assert!(!matches!(r.result, Ok(Reply::Stat(Some(_)))), "{r:?}");
    // Metadata on the symlink applies to the link, never to its target
    // (the directory outside, whose own metadata no snapshot below it shows).
    let target_meta = |p: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(p).unwrap();
        (m.mode(), m.uid(), m.gid(), m.mtime(), m.mtime_nsec())
    };
    let (outside_before, secret_before) = (target_meta(&outside), target_meta(&secret));
    let r = a.call(Request::SetMeta {
        path: p("ln"),
        meta: meta(0o777),
    });
    assert!(r.result.is_ok(), "{r:?}");
    assert_eq!(
        target_meta(&outside),
        outside_before,
        "SetMeta went through the symlink"
    );
    assert_eq!(
        std::fs::symlink_metadata(root.join("ln"))
            .unwrap()
            .modified()
            .unwrap(),
        std::time::UNIX_EPOCH,
        "the link itself got the metadata"
    );
    // A symlink to a file outside, replaced by a write: the link goes, the target stays.
    let r = a.call(Request::Symlink {
        path: p("ln2"),
        target: ByteBuf::from(secret.display().to_string().into_bytes()),
        meta: meta(0o777),
    });
    assert!(r.result.is_ok());
    let _ = a.call(Request::SetMeta {
        path: p("ln2"),
        meta: meta(0o600),
    });
    assert_eq!(
        target_meta(&secret),
        secret_before,
        "SetMeta went through the symlink"
    );
    assert!(a.call(put(p("ln2"), b"replaced")).result.is_ok());
    assert!(a.call(Request::Barrier).result.is_ok());
    assert!(std::fs::symlink_metadata(root.join("ln2"))
        .unwrap()
        .file_type()
        .is_file());

    // A directory swapped for a symlink between two calls.
    assert!(a
        .call(Request::Mkdir {
            path: p("d"),
            meta: meta(0o755),
        })
        .result
        .is_ok());
    let r = a.call(Request::OpenFile {
        fid: 7,
        path: p("d/f"),
        basis: None,
        size: 5,
    });
    assert!(r.result.is_ok(), "{r:?}");
    std::fs::rename(root.join("d"), root.join("d.old")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("d")).unwrap();
    let w = a.frame(
        Request::Write {
            fid: 7,
            offset: 0,
            data: ByteBuf::from(b"hello".to_vec()),
        },
        0,
    );
    a.send_raw(&w);
    let _ = a.call(Request::Commit {
        fid: 7,
        digest: georep::hash::digest::digest_of(b"hello"),
        meta: meta(0o644),
    });
    a.refused(put(p("d/g"), b"pwned"), "write into swapped directory");
    a.refused(Request::ListDir { path: p("d") }, "list swapped directory");
    a.refused(
        Request::OpenFile {
            fid: 8,
            path: p("d/secret"),
            basis: None,
            size: 1,
        },
        "open in swapped directory",
    );
    // Removing the swapped name removes the link, not what it points to.
    assert!(a.call(Request::Remove { path: p("d") }).result.is_ok());

    // Malformed data operations: errors at commit, bounded output.
    let open = |a: &mut Agent, fid: u64, size: u64| {
        let r = a.call(Request::OpenFile {
            fid,
            path: p(&format!("t{fid}")),
            basis: Some(p("base")),
            size,
        });
        assert!(r.result.is_ok(), "{r:?}");
    };
    let commit = |a: &mut Agent, fid: u64, what: &str| {
        a.refused(
            Request::Commit {
                fid,
                digest: [0; 32],
                meta: meta(0o644),
            },
            what,
        )
    };
    // A delta that would produce more than announced.
    let sig = fast_rsync::Signature::calculate(
        &[7u8; 8192],
        fast_rsync::SignatureOptions {
            block_size: 1024,
            crypto_hash_size: 8,
        },
    );
    let mut big_delta = Vec::new();
    fast_rsync::diff(&sig.index(), &vec![9u8; 1 << 20], &mut big_delta).unwrap();
    for (fid, body) in [
        (
            20,
            Request::Patch {
                fid: 20,
                offset: 0,
                out_len: 4096,
                basis_off: 0,
                basis_len: 8192,
                delta: ByteBuf::from(big_delta.clone()),
            },
        ),
        (
            21,
            Request::Patch {
                fid: 21,
                offset: 0,
                out_len: 4096,
                basis_off: 0,
                basis_len: 8192,
                delta: ByteBuf::from(vec![0x72, 0x73, 0x02, 0x36, 0x41, 0xff, 0xff, 0xff]),
            },
        ),
        (
            22,
            Request::Patch {
                fid: 22,
                offset: 0,
                out_len: 1 << 40,
                basis_off: 0,
                basis_len: 8192,
                delta: ByteBuf::from(big_delta.clone()),
            },
        ),
        (
            23,
            Request::Write {
                fid: 23,
                offset: 4000,
                data: ByteBuf::from(vec![1u8; 200]),
            },
        ),
        (
            24,
            Request::Copy {
                fid: 24,
                offset: 0,
                len: 1 << 30,
            },
        ),
        (
            25,
            Request::Patch {
                fid: 25,
                offset: 0,
                out_len: 4096,
                basis_off: u64::MAX - 10,
                basis_len: 100,
                delta: ByteBuf::from(big_delta.clone()),
            },
        ),
    ] {
        open(&mut a, fid, 4096);
        let f = a.frame(body, 0);
        a.send_raw(&f);
        commit(&mut a, fid, &format!("bad data op {fid}"));
    }
    a.refused(
        Request::WindowHashes {
            fid: 999,
            offset: 0,
            len: 4096,
            window: 4096,
        },
        "hashes of unknown file",
    );
    // A real file: 2^40 bytes of hashes is refused by the length check.
    open(&mut a, 29, 4096);
    for window in [4096u32, 4 << 20] {
        let r = a.call(Request::WindowHashes {
            fid: 29,
            offset: 0,
            len: 1 << 40,
            window,
        });
        match r.result {
            Err(e) => assert!(
                e.message.contains("1099511627776 bytes in steps"),
                "not the length check: {e:?}"
            ),
            Ok(r) => panic!("2^40 bytes of window hashes accepted: {r:?}"),
        }
    }
    assert!(a.call(Request::Abort { fid: 29 }).result.is_ok());
    open(&mut a, 30, 4096);
    a.refused(
        Request::BlockHashes {
            fid: 30,
            offset: 0,
            len: 1 << 40,
            block: 1,
        },
        "absurd block hashes",
    );
    a.refused(
        Request::Signature {
            fid: 30,
            offset: u64::MAX,
            len: u64::MAX,
            block: 1,
        },
        "absurd signature",
    );
    a.refused(
        Request::OpenFile {
            fid: 31,
            path: p("huge"),
            basis: None,
            size: u64::MAX,
        },
        "absurd size",
    );
    // The connection still works after all that.
    assert!(matches!(a.call(Request::Ping).result, Ok(Reply::Pong)));
    a.finish();

    // Broken framing: each gets an error or a clean close.
    let mut huge = vec![0xff, 0xff, 0xff, 0x7f];
    huge.extend_from_slice(&[0u8; 64]);
    Agent::start(&root).expect_close(&huge, "huge frame");
    let mut truncated = 100u32.to_le_bytes().to_vec();
    truncated.extend_from_slice(&[1u8; 10]);
    Agent::start(&root).expect_close(&truncated, "truncated");
    let mut garbage = 64u32.to_le_bytes().to_vec();
    garbage.extend((0..64u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 | 0x80));
    Agent::start(&root).expect_close(&garbage, "garbage");
    Agent::start(&root).expect_close(b"GET / HTTP/1.1\r\n\r\n", "not the protocol");

    // Nothing outside the root changed; no temporary is left inside.
    assert_eq!(common::tree::snapshot(&outside), before, "outside changed");
    assert!(!outside.join("pwned").exists() && !outside.join("g").exists());
    assert_eq!(std::fs::read(root.join("d.old/f")).unwrap(), b"hello");
    let mut a = Agent::start(&root);
    let _ = a.call(Request::ListDir {
        path: RelPath::root(),
    });
    a.finish();
    assert!(
        common::tree::temporaries(&root)
            .iter()
            .all(|t| t.starts_with("d.old")),
        "{:?}",
        common::tree::temporaries(&root)
    );
}
