//! Helpers of the disaster-recovery tests: promote, quarantines, snapshots
//! compared by content and metadata, sizes of what differs.

use super::tree::{self, Node, Snap};
use super::World;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub type Tree = BTreeMap<Vec<u8>, Snap>;

/// An entry's version: content, mode, owner, mtime, xattrs.
pub type Version = (Node, u32, u32, u32, (i64, i64), Vec<(Vec<u8>, Vec<u8>)>);

/// What an entry is, without where it lives on disk (inode, allocation).
pub fn version(s: &Snap) -> Version {
    (
        s.node.clone(),
        s.mode,
        s.uid,
        s.gid,
        s.mtime,
        s.xattrs.clone(),
    )
}

pub fn same_version(a: Option<&Snap>, b: Option<&Snap>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => version(a) == version(b),
        (None, None) => true,
        _ => false,
    }
}

/// Trees equal entry for entry, content and metadata (inodes aside).
pub fn assert_same_versions(a: &Tree, b: &Tree, what: &str) {
    let mut diffs = Vec::new();
    for (p, s) in a {
        if !same_version(Some(s), b.get(p)) {
            diffs.push(format!("{}", String::from_utf8_lossy(p)));
        }
    }
    for p in b.keys() {
        if !a.contains_key(p) {
            diffs.push(format!("only after: {}", String::from_utf8_lossy(p)));
        }
    }
    assert!(diffs.is_empty(), "{what}: {diffs:?}");
}

/// `georep promote DIR --json`, retried while an agent still holds the
/// root (exit 3); returns the report.
pub fn promote(w: &World, dir: &Path) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = w.run(&["promote", dir.to_str().unwrap(), "--json"]);
        let code = out.status.code();
        if code == Some(3) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        assert!(
            code == Some(0) || code == Some(1),
            "promote: {:?} {}",
            code,
            String::from_utf8_lossy(&out.stderr)
        );
        return serde_json::from_slice(&out.stdout).expect("promote --json");
    }
}

/// The quarantines of `dir` (`quarantine list --json`).
pub fn quarantines(w: &World, dir: &Path) -> Vec<Value> {
    let out = w.run_ok(&["quarantine", "list", dir.to_str().unwrap(), "--json"]);
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

/// Path bytes of a manifest item.
pub fn item_path(i: &Value) -> Vec<u8> {
    let h = i["path_hex"].as_str().unwrap();
    (0..h.len())
        .step_by(2)
        .map(|k| u8::from_str_radix(&h[k..k + 2], 16).unwrap())
        .collect()
}

/// Bytes of the files of `after` whose version differs from `before` (what a
/// sync from `after` onto `before` at most has to carry).
pub fn differing_bytes(before: &Tree, after: &Tree) -> u64 {
    after
        .iter()
        .filter(|(p, s)| match (&s.node, before.get(*p)) {
            (Node::File { .. }, Some(b)) => b.node != s.node,
            (Node::File { .. }, None) => true,
            _ => false,
        })
        .map(|(_, s)| match s.node {
            Node::File { len, .. } => len,
            _ => 0,
        })
        .sum()
}

/// Snapshot of a tree (georep's own directories left out).
pub fn snap(root: &Path) -> Tree {
    tree::snapshot(root)
}

/// Runs `georep ARGS` in its own process group and SIGKILLs the group
/// after `ms` (if still running); returns whether it was killed.
pub fn kill_after(w: &World, args: &[&str], ms: u64) -> bool {
    use std::os::unix::process::CommandExt;
    let mut c = w.cmd(args);
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn georep");
    let deadline = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
    true
}

/// A command line for `Command` (for messages).
pub fn show(c: &Command) -> String {
    format!("{c:?}")
}
