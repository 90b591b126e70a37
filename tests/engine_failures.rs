//! Failures: kill -9 in the middle of transfers, files changing while
//! read, and bad input. Nothing partial is ever visible under a final name.

mod common;

use common::{n, stderr, tree, World};
use std::os::unix::process::CommandExt;
use std::time::Duration;

fn version(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 4096) as u8).wrapping_mul(31) | 1)
        .collect()
}

/// Each slave file is absent or exactly one of the versions the master
/// had: content and metadata (mode, owner, mtime, xattrs) of the same one.
fn only_whole_versions(w: &World, names: &[String], versions: &[Vec<tree::FileState>]) {
    for (name, vs) in names.iter().zip(versions) {
        if let Some(s) = tree::file_state(&w.slave.join(name)) {
            assert!(
                vs.contains(&s),
                "{name}: partial or mixed content or metadata on the slave: {s:?}"
            );
        }
    }
}

#[test]
fn sigkill_at_random_moments_never_exposes_a_partial_file_and_the_next_sync_converges() {
    let w = World::new();
    let names: Vec<String> = (0..4).map(|i| format!("disk{i}.img")).collect();
    let len = 24 << 20;
    let mut versions: Vec<Vec<tree::FileState>> = names.iter().map(|_| Vec::new()).collect();
    for (i, name) in names.iter().enumerate() {
        let v = version(i as u8, len);
        versions[i].push(tree::write_version(&w.master.join(name), &v, 0));
    }
    w.create("c", &[]);
    w.sync("c");
    let mut rng_state = 0x9e3779b97f4a7c15u64;
    let mut rand = move |m: u64| {
        rng_state ^= rng_state << 7;
        rng_state ^= rng_state >> 9;
        rng_state % m
    };
    let mut interrupted = 0;
    for round in 0..6u8 {
        // New versions: rewritten in the middle, appended, or replaced.
        for (i, name) in names.iter().enumerate() {
            let v = version(round * 10 + i as u8 + 1, len + (round as usize) * 100_000);
            versions[i].push(tree::write_version(
                &w.master.join(name),
                &v,
                round as u32 + 1,
            ));
        }
        let mut child = w.cmd(&["sync", "c"]).process_group(0).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(5 + rand(400)));
        // The whole group: worker and agent die at once, as in a crash.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let status = child.wait().unwrap();
        if !status.success() {
            interrupted += 1;
        }
        only_whole_versions(&w, &names, &versions);
    }
    assert!(
        interrupted >= 3,
        "only {interrupted} of 6 syncs were killed before finishing"
    );
    let s = w.sync("c");
    assert_eq!(n(&s, "failures"), 0);
    tree::assert_same(&w.master, &w.slave);
    assert!(
        tree::temporaries(&w.slave).is_empty(),
        "stale temporaries left: {:?}",
        tree::temporaries(&w.slave)
    );
}

#[test]
fn a_file_changing_while_read_is_reported_retried_and_never_published_torn() {
    let w = World::new();
    let path = w.master.join("busy.img");
    let len = 16 << 20;
    std::fs::write(&path, version(0, len)).unwrap();
    w.create("b", &[]);
    w.sync("b");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let path = path.clone();
        std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let mut k = 1u8;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Rewrites the file in place, one uniform byte value per pass.
                for off in (0..len).step_by(1 << 20) {
                    f.write_all_at(&vec![k; 1 << 20], off as u64).unwrap();
                }
                k = k.wrapping_add(1).max(1);
            }
        })
    };
    let mut saw_failure = false;
    for _ in 0..5 {
        let out = w.run(&["sync", "b", "--json"]);
        let code = out.status.code();
        assert!(
            code == Some(0) || code == Some(1),
            "exit {code:?}: {}",
            stderr(&out)
        );
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if code == Some(1) {
            assert!(n(&s, "failures") >= 1);
            assert!(
                s["errors"][0]["error"]
                    .as_str()
                    .unwrap()
                    .contains("changed while being read"),
                "{s}"
            );
            saw_failure = true;
        }
        // Whatever is published is one whole pass of the writer.
        let data = std::fs::read(w.slave.join("busy.img")).unwrap();
        assert!(
            data.iter().all(|&b| b == data[0]) || data == version(0, len),
            "torn file published"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert!(
        saw_failure,
        "a file rewritten continuously should have been caught changing"
    );
    w.sync("b");
    tree::assert_same(&w.master, &w.slave);
}

fn expect_usage_error(w: &World, args: &[&str], needle: &str) {
    let out = w.run(args);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: {err:?} does not mention {needle:?}"
    );
}

#[test]
fn bad_input_gets_one_clear_line_exit_2_and_writes_nothing() {
    let w = World::new();
    let m = w.master.to_str().unwrap();
    let s = w.slave.to_str().unwrap();
    let missing = w.dir.path().join("nope");
    expect_usage_error(
        &w,
        &["create", "x", missing.to_str().unwrap(), s],
        "does not exist",
    );
    std::fs::write(w.dir.path().join("afile"), b"").unwrap();
    expect_usage_error(
        &w,
        &[
            "create",
            "x",
            w.dir.path().join("afile").to_str().unwrap(),
            s,
        ],
        "not a directory",
    );
    expect_usage_error(
        &w,
        &["create", "x", m, w.master.join("inner").to_str().unwrap()],
        "inside master",
    );
    std::fs::create_dir_all(w.dir.path().join("outer/m")).unwrap();
    expect_usage_error(
        &w,
        &[
            "create",
            "x",
            w.dir.path().join("outer/m").to_str().unwrap(),
            w.dir.path().join("outer").to_str().unwrap(),
        ],
        "inside slave",
    );
    expect_usage_error(&w, &["create", "x", m, m], "same directory");
    expect_usage_error(&w, &["create", "../evil", m, s], "invalid session name");
    expect_usage_error(&w, &["create", "x", m, "host:relative"], "must be absolute");
    assert!(
        !w.home.join("sessions/x").exists(),
        "a failed create left a session behind"
    );
    w.create("x", &[]);
    expect_usage_error(
        &w,
        &[
            "create",
            "x",
            m,
            w.dir.path().join("other").to_str().unwrap(),
        ],
        "already exists",
    );
    expect_usage_error(&w, &["sync", "nosuch"], "no session");
    let cfg = w.home.join("sessions/x/config.toml");
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{good}colour = \"blue\"\n")).unwrap();
    expect_usage_error(&w, &["sync", "x"], "unknown field `colour`");
    std::fs::write(
        &cfg,
        good.replace("mode = \"continuous\"", "mode = \"sometimes\""),
    )
    .unwrap();
    expect_usage_error(&w, &["sync", "x"], "mode");
    std::fs::write(&cfg, &good).unwrap();
    expect_usage_error(
        &w,
        &["config", "x", "set", "mode", "sometimes"],
        "continuous or interval",
    );
    expect_usage_error(
        &w,
        &["config", "x", "set", "colour", "blue"],
        "unknown config key",
    );
    expect_usage_error(
        &w,
        &["mark", w.dir.path().to_str().unwrap()],
        "not inside a georep master",
    );
    // Nothing reached the slave from any of this.
    assert_eq!(std::fs::read_dir(&w.slave).unwrap().count(), 0);
    // A master that disappears after create: a temporary error (exit 3), retried later.
    std::fs::rename(&w.master, w.dir.path().join("moved")).unwrap();
    let out = w.run(&["sync", "x"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("mounted and readable"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn delete_with_reset_sync_time_leaves_no_stime_on_the_master() {
    let w = World::new();
    std::fs::create_dir_all(w.master.join("a/b")).unwrap();
    std::fs::write(w.master.join("a/b/f"), b"x").unwrap();
    w.create("r", &["--marker", "mark"]);
    w.sync("r");
    common::mark(&w.master.join("a/b/f"));
    w.sync("r");
    let has = |p: &std::path::Path, suffix: &str| {
        xattr::list(p)
            .unwrap()
            .any(|n| n.to_string_lossy().ends_with(suffix))
    };
    assert!(has(&w.master.join("a/b"), ".stime"));
    // A full crawl records the directories' entry digests (also the session's).
    w.run_ok(&["sync", "r", "--full"]);
    assert!(has(&w.master.join("a/b"), ".entries"));
    let out = w.run_ok(&["delete", "r", "--reset-sync-time"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 master directories"));
    for p in ["", "a", "a/b"] {
        assert!(!has(&w.master.join(p), ".stime"), "stime left on {p:?}");
        assert!(
            !has(&w.master.join(p), ".entries"),
            "entry digest left on {p:?}"
        );
    }
    assert!(!w.home.join("sessions/r").exists());
}
