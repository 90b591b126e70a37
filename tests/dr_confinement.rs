//! The agent's disaster-recovery state (role, last complete sync) is
//! read and written beneath its root, through no symlink: a `.georep`
//! replaced by a symlink to a directory outside the root once the agent
//! serves a worker, or a role file that is a symlink to a planted record,
//! is refused; nothing outside the root is written or believed.

mod common;

use common::raw_agent::RawAgent;
use common::World;
use georep::protocol::{Reply, Request};

fn listing(d: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_state_directory_swapped_for_a_symlink_outside_is_never_written_through() {
    let w = World::new();
    std::fs::create_dir_all(&w.slave).unwrap();
    let outside = w.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let mut a = RawAgent::start(&w.slave);
    // Once the agent serves, a local user swaps the state directory.
    std::fs::rename(w.slave.join(".georep"), w.dir.path().join("moved")).unwrap();
    std::os::unix::fs::symlink(&outside, w.slave.join(".georep")).unwrap();
    let claim = a.call(Request::Claim {
        session: uuid::Uuid::new_v4(),
        epoch: 0,
        failback: None,
    });
    assert!(claim.result.is_err(), "{claim:?}");
    let synced = a.call(Request::Synced { stime: 5, at_ns: 6 });
    let msg = format!("{:?}", synced.result);
    assert!(synced.result.is_err(), "{msg}");
    assert!(msg.contains(".georep"), "{msg}");
    a.kill();
    assert_eq!(
        listing(&outside),
        Vec::<String>::new(),
        "written outside the root"
    );
}

#[test]
fn a_role_file_that_is_a_symlink_is_not_believed_and_writes_are_refused() {
    let w = World::new();
    std::fs::create_dir_all(w.slave.join(".georep")).unwrap();
    let outside = w.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    // A planted record outside: "a replica of this session, epoch 0".
    let session = uuid::Uuid::new_v4();
    let planted = georep::fs::role::RoleRecord {
        role: georep::fs::role::Role::Replica,
        epoch: 0,
        session: Some(session),
        at_ns: 1,
        host: "elsewhere".into(),
        promote_stamp: None,
        report: None,
    };
    let rec = outside.join("role.json");
    std::fs::write(&rec, serde_json::to_vec(&planted).unwrap()).unwrap();
    std::os::unix::fs::symlink(&rec, w.slave.join(".georep/role.json")).unwrap();
    let before = std::fs::read(&rec).unwrap();
    let mut a = RawAgent::start(&w.slave);
    let claim = a.call(Request::Claim {
        session,
        epoch: 0,
        failback: None,
    });
    assert!(
        !matches!(claim.result, Ok(Reply::Claimed { .. })),
        "{claim:?}"
    );
    let mkdir = a.call(Request::Mkdir {
        path: georep::fs::relpath::RelPath::new(b"d".to_vec()).unwrap(),
        meta: georep::fs::meta::Meta {
            mode: 0o755,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            mtime: georep::fs::meta::Timestamp { sec: 1, nsec: 0 },
            xattrs: Vec::new(),
        },
    });
    let msg = format!("{:?}", mkdir.result);
    assert!(msg.contains("role file cannot be read"), "{msg}");
    a.kill();
    assert!(!w.slave.join("d").exists());
    assert_eq!(std::fs::read(&rec).unwrap(), before);
    assert_eq!(listing(&outside), ["role.json"]);
}

/// Copies a directory tree (files and directories) with `cp -a`.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

/// A store replicated to the slave, and a directory outside both roots.
fn replicated_store() -> (World, std::path::PathBuf) {
    let w = World::new();
    common::catalog::sample(&w, &[]);
    w.create("s1", &["--layout", "store"]);
    w.sync("s1");
    let outside = w.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    (w, outside)
}

fn promote(w: &World) {
    let out = w.run(&["promote", w.slave.to_str().unwrap(), "--json"]);
    assert!(
        matches!(out.status.code(), Some(0) | Some(1)),
        "{}",
        common::stderr(&out)
    );
}

// What a hostile master can send, as symlinks are replicated data: a
// host's disk directory replaced by a symlink to a copy elsewhere that
// holds one more snapshot file no record needs; a journal replaced by a
// symlink to a longer file elsewhere. Promote cleans a store up (files no
// record needs, journal bytes beyond their records): never there.

#[test]
fn promote_of_a_store_removes_nothing_through_a_symlinked_disk_directory() {
    let (w, outside) = replicated_store();
    let host = std::fs::read_dir(w.slave.join("hosts"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let disks = host.join("disks");
    copy_tree(&disks, &outside.join("disks"));
    let disk = std::fs::read_dir(outside.join("disks"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let bait = disk.join("123.qcow2");
    std::fs::write(&bait, b"not the replica's").unwrap();
    std::fs::remove_dir_all(&disks).unwrap();
    std::os::unix::fs::symlink(outside.join("disks"), &disks).unwrap();
    let before = common::tree::snapshot(&outside);
    promote(&w);
    assert!(bait.exists(), "promote removed a file outside the root");
    assert_eq!(
        common::tree::snapshot(&outside),
        before,
        "promote changed something outside the root"
    );
}

#[test]
fn promote_of_a_store_cuts_no_journal_through_a_symlink() {
    let (w, outside) = replicated_store();
    let journals = common::catalog::files_with(&w.slave, "cdp");
    assert!(!journals.is_empty(), "the sample store has journals");
    let long = outside.join("long.cdp");
    let mut data = std::fs::read(&journals[0]).unwrap();
    data.extend_from_slice(&[7u8; 1 << 16]);
    std::fs::write(&long, &data).unwrap();
    std::fs::remove_file(&journals[0]).unwrap();
    std::os::unix::fs::symlink(&long, &journals[0]).unwrap();
    promote(&w);
    assert_eq!(
        std::fs::read(&long).unwrap(),
        data,
        "promote cut a file outside the root"
    );
}
