//! Permission denied on either side, with real unprivileged processes:
//! the agent running as `nobody` (an SSH slave whose remote program is a
//! wrapper dropping privileges with setpriv) against slave entries it may
//! not write, and the worker running as `nobody` against master entries it
//! may not read. Each failing entry is one line naming the problem and the
//! fix, counted in failures and retried; nothing partial or corrupt is
//! published, the rest of the tree is replicated, and once the permissions
//! are fixed the next sync converges.

mod common;

use common::sshd::Sshd;
use common::{n, stderr, tree, World};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The unprivileged user the agent or worker runs as.
const NOBODY: u32 = 65534;

fn need_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests run georep as another user (setpriv): run them as root (packaging/test.sh does)"
    );
}

fn setpriv() -> &'static str {
    for p in ["/usr/bin/setpriv", "/bin/setpriv"] {
        if Path::new(p).exists() {
            return p;
        }
    }
    panic!("setpriv not found: install util-linux (packaging/setup.sh does)");
}

fn chown_tree(p: &Path, uid: u32) {
    let out = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{uid}"))
        .arg(p)
        .output()
        .unwrap();
    assert!(out.status.success(), "chown: {}", stderr(&out));
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn write(p: &Path, data: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

/// A world whose directories `nobody` can reach (tempdirs are mode 700).
fn open_world() -> World {
    need_root();
    let w = World::new();
    chmod(w.dir.path(), 0o755);
    w
}

/// `REMOTE_GEOREP`: runs the test's georep as `nobody`.
fn nobody_wrapper(w: &World) -> PathBuf {
    let p = w.dir.path().join("georep-as-nobody");
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\nexec {} --reuid={NOBODY} --regid={NOBODY} --clear-groups -- {} \"$@\"\n",
            setpriv(),
            common::georep_bin().display()
        ),
    )
    .unwrap();
    chmod(&p, 0o755);
    p
}

/// No temporary is visible, and every slave file is byte for byte the
/// master's or what the slave held before (`before`): nothing partial.
fn nothing_partial(w: &World, before: &Snapshot) {
    assert!(
        tree::temporaries(&w.slave).is_empty(),
        "temporaries visible: {:?}",
        tree::temporaries(&w.slave)
    );
    let m = tree::snapshot(&w.master);
    for (path, snap) in tree::snapshot(&w.slave) {
        if let tree::Node::File { .. } = &snap.node {
            let known = [m.get(&path), before.get(&path)];
            assert!(
                known.iter().flatten().any(|k| k.node == snap.node),
                "{}: corrupt or partial on the slave",
                String::from_utf8_lossy(&path)
            );
        }
    }
}

type Snapshot = std::collections::BTreeMap<Vec<u8>, tree::Snap>;

/// The subtree `rel` is equal on both sides.
fn same_below(w: &World, rel: &str) {
    tree::assert_same(&w.master.join(rel), &w.slave.join(rel));
}

/// A sync that fails entries: exit 1 and its summary.
fn sync_failing(w: &World, session: &str) -> serde_json::Value {
    let out = w.run(&["sync", session, "--json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit 1 expected (entries failed): {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The error of each failed path, which must be one line.
fn errors(s: &serde_json::Value) -> Vec<(String, String)> {
    s["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let (p, m) = (
                e["path"].as_str().unwrap().to_string(),
                e["error"].as_str().unwrap().to_string(),
            );
            assert!(!m.contains('\n'), "{p}: not one line: {m}");
            (p, m)
        })
        .collect()
}

#[test]
fn an_agent_without_write_access_fails_those_entries_clearly_and_replicates_the_rest() {
    let sshd = Sshd::start();
    let w = open_world();
    for i in 0..4 {
        write(
            &w.master.join(format!("open/f{i}")),
            &common::mutate::data(i, 50_000),
        );
        write(
            &w.master.join(format!("open/sub/g{i}")),
            &common::mutate::data(i + 10, 3_000),
        );
        write(
            &w.master.join(format!("locked/c{i}")),
            &common::mutate::data(i + 20, 20_000),
        );
        write(
            &w.master.join(format!("closed/d{i}")),
            &common::mutate::data(i + 30, 1_000),
        );
    }
    std::os::unix::fs::symlink("open/f0", w.master.join("link")).unwrap();
    chown_tree(&w.master, NOBODY);
    // The slave root belongs to the agent's user; three entries in it do not.
    std::fs::create_dir_all(&w.slave).unwrap();
    chown_tree(&w.slave, NOBODY);
    // Root's, world-readable: listed, but nothing can be created in it.
    std::fs::create_dir(w.slave.join("locked")).unwrap();
    write(&w.slave.join("locked/c0"), b"an old copy");
    // Root's and closed: not even listed.
    std::fs::create_dir(w.slave.join("closed")).unwrap();
    chmod(&w.slave.join("closed"), 0o700);
    // Gone from the master, but its contents cannot be removed.
    write(&w.slave.join("stale/old"), b"stale");

    let wrapper = nobody_wrapper(&w);
    let mut args = common::sshd::create_args(&sshd, "p", &w.master, &w.slave);
    let i = args.iter().position(|a| a == "--remote-georep").unwrap();
    args[i + 1] = wrapper.display().to_string();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    w.run_ok(&a);

    let before = tree::snapshot(&w.slave);
    for round in 0..2 {
        let s = sync_failing(&w, "p");
        let errs = errors(&s);
        assert!(n(&s, "failures") >= 3, "round {round}: {s:#}");
        for (p, m) in &errs {
            assert!(
                m.contains("Permission denied") || m.contains("Operation not permitted"),
                "{p}: {m}"
            );
            assert!(
                m.contains("slave") && m.contains("access"),
                "{p}: no fix named: {m}"
            );
        }
        for bad in ["locked", "closed", "stale"] {
            assert!(
                errs.iter().any(|(p, _)| p.starts_with(bad)),
                "no failure for {bad}: {errs:?}"
            );
        }
        nothing_partial(&w, &before);
        same_below(&w, "open");
        assert_eq!(
            std::fs::read_link(w.slave.join("link")).unwrap(),
            Path::new("open/f0")
        );
        assert_eq!(
            std::fs::read(w.slave.join("locked/c0")).unwrap(),
            b"an old copy"
        );
    }
    // The slave's administrator gives the agent's user access: converged.
    chown_tree(&w.slave, NOBODY);
    let s = w.sync("p");
    assert_eq!(n(&s, "failures"), 0, "{s:#}");
    tree::assert_same(&w.master, &w.slave);
}

/// `georep ARGS` run as `nobody`, in this world's georep home.
fn as_nobody(w: &World, args: &[&str]) -> std::process::Output {
    Command::new(setpriv())
        .arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .args(["--clear-groups", "--"])
        .arg(common::georep_bin())
        .args(args)
        .env("GEOREP_HOME", &w.home)
        .env_remove("GEOREP_LOG")
        .output()
        .unwrap()
}

fn summary(out: &std::process::Output, code: i32) -> serde_json::Value {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_worker_that_cannot_read_master_entries_fails_those_alone_and_keeps_their_slave_copies() {
    let w = open_world();
    for i in 0..4 {
        write(
            &w.master.join(format!("open/f{i}")),
            &common::mutate::data(i + 40, 40_000),
        );
        write(
            &w.master.join(format!("secret/s{i}")),
            &common::mutate::data(i + 50, 2_000),
        );
        write(
            &w.master.join(format!("blind/b{i}")),
            &common::mutate::data(i + 60, 2_000),
        );
    }
    write(
        &w.master.join("closed.img"),
        &common::mutate::data(70, 300_000),
    );
    std::fs::create_dir_all(&w.slave).unwrap();
    for p in [&w.master, &w.slave, &w.home] {
        chown_tree(p, NOBODY);
    }
    let out = as_nobody(
        &w,
        &[
            "create",
            "m",
            w.master.to_str().unwrap(),
            w.slave.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let s = summary(&as_nobody(&w, &["sync", "m", "--json"]), 0);
    assert_eq!(n(&s, "failures"), 0, "{s:#}");
    tree::assert_same(&w.master, &w.slave);
    let before = tree::snapshot(&w.slave);

    // New contents everywhere, then three entries the worker may not read:
    // a file and a directory of mode 000, and a directory it may enter but not list.
    for i in 0..4 {
        write(
            &w.master.join(format!("open/f{i}")),
            &common::mutate::data(i + 80, 41_000),
        );
        write(
            &w.master.join(format!("secret/s{i}")),
            &common::mutate::data(i + 90, 2_100),
        );
        write(
            &w.master.join(format!("blind/b{i}")),
            &common::mutate::data(i + 100, 2_100),
        );
    }
    write(&w.master.join("open/new"), b"new");
    write(
        &w.master.join("closed.img"),
        &common::mutate::data(71, 310_000),
    );
    chown_tree(&w.master, NOBODY);
    chmod(&w.master.join("closed.img"), 0);
    chmod(&w.master.join("secret"), 0);
    chmod(&w.master.join("blind"), 0o300);
    for round in 0..2 {
        let s = summary(&as_nobody(&w, &["sync", "m", "--json"]), 1);
        let errs = errors(&s);
        assert_eq!(n(&s, "failures"), 3, "round {round}: {s:#}");
        for bad in ["closed.img", "secret", "blind"] {
            let (_, m) = errs
                .iter()
                .find(|(p, _)| p == bad)
                .unwrap_or_else(|| panic!("no failure for {bad}: {errs:?}"));
            assert!(
                m.contains("Permission denied") && m.contains("give the worker's user read access"),
                "{bad}: {m}"
            );
        }
        // The rest is replicated; what could not be read keeps its last copy.
        same_below(&w, "open");
        nothing_partial(&w, &before);
        let now = tree::snapshot(&w.slave);
        for p in ["closed.img", "secret/s0", "blind/b3"] {
            assert_eq!(
                now.get(p.as_bytes()).map(|s| &s.node),
                before.get(p.as_bytes()).map(|s| &s.node),
                "{p}: the slave copy changed though the master could not be read"
            );
        }
    }
    // Read access given back: converged.
    chmod(&w.master.join("closed.img"), 0o644);
    chmod(&w.master.join("secret"), 0o755);
    chmod(&w.master.join("blind"), 0o755);
    let s = summary(&as_nobody(&w, &["sync", "m", "--json"]), 0);
    assert_eq!(n(&s, "failures"), 0, "{s:#}");
    tree::assert_same(&w.master, &w.slave);
}
