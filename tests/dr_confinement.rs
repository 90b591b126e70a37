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
