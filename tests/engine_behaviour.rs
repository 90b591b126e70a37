//! Crawl behaviour with exact counters: convergence, cost of a deep
//! change, unmarked changes, wiped or foreign slaves.

mod common;

use common::{mark, n, tree, World};
use std::path::Path;

/// `dirs` directories of `files` files each, under `root`.
fn wide_tree(root: &Path, dirs: usize, files: usize) {
    for d in 0..dirs {
        let dir = root.join(format!("dir{d:04}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..files {
            std::fs::write(dir.join(format!("f{f:03}")), format!("{d}/{f}")).unwrap();
        }
    }
}

/// Directories of 99 files in `second_sync_of_a_large_tree_…`: 200 (20,000
/// entries) by default, `GEOREP_TEST_BIG_TREE=1` for 1,000 (100,000 entries;
/// minutes in a debug build, so not in the default suite; the F1 benchmark
/// times 100,000 entries in release).
fn big_tree_dirs() -> usize {
    if std::env::var_os("GEOREP_TEST_BIG_TREE").is_some() {
        1000
    } else {
        200
    }
}

#[test]
fn second_sync_of_a_large_tree_visits_only_the_root_and_sends_nothing() {
    let w = World::new();
    let dirs = big_tree_dirs();
    wide_tree(&w.master, dirs, 99);
    w.create("big", &["--marker", "mark"]);
    let first = w.sync("big");
    assert_eq!(first["crawl"], "full");
    assert_eq!(n(&first, "entries_visited"), 1 + dirs as u64 * 100);
    assert_eq!(n(&first, "files_synced"), dirs as u64 * 99);
    let second = w.sync("big");
    assert_eq!(second["crawl"], "xtime");
    assert!(n(&second, "entries_visited") <= 2, "{second}");
    assert_eq!(n(&second, "bytes_sent"), 0);
    assert_eq!(
        n(&second, "stimes_written"),
        0,
        "a quiet crawl stamps nothing"
    );
    tree::assert_same(&w.master, &w.slave);
}

#[test]
fn without_a_marker_a_quiet_full_crawl_still_sends_and_stamps_nothing() {
    let w = World::new();
    wide_tree(&w.master, 20, 50);
    w.create("auto", &[]);
    w.sync("auto");
    let s = w.sync("auto");
    assert_eq!(
        s["crawl"], "full",
        "marker = auto with no watcher running: xtimes are not trusted"
    );
    assert_eq!(n(&s, "entries_visited"), 1 + 20 + 20 * 50);
    assert_eq!(n(&s, "bytes_sent"), 0);
    assert_eq!(n(&s, "files_synced"), 0);
    assert_eq!(n(&s, "stimes_written"), 0);
    assert_eq!(n(&s, "meta_updates"), 0);
}

#[test]
fn a_deep_change_costs_the_directories_on_its_path_not_the_tree() {
    // The same path a/b/c/.../leaf in a small and in a large tree.
    let mut visited = Vec::new();
    for extra_dirs in [5, 200] {
        let w = World::new();
        wide_tree(&w.master, extra_dirs, 20);
        let mut deep = w.master.clone();
        let mut sizes = vec![];
        for level in 0..8 {
            deep = deep.join(format!("level{level}"));
            std::fs::create_dir(&deep).unwrap();
            for s in 0..level {
                std::fs::write(deep.join(format!("sibling{s}")), b"x").unwrap();
            }
            sizes.push(level + 1); // siblings + the next level (or the leaf)
        }
        std::fs::write(deep.join("leaf"), b"v1").unwrap();
        w.create("d", &["--marker", "mark"]);
        w.sync("d");
        std::fs::write(deep.join("leaf"), b"version 2").unwrap();
        mark(&deep.join("leaf"));
        let s = w.sync("d");
        // root itself + the root's entries + every directory listed on the path.
        let root_entries = extra_dirs as u64 + 1;
        let expected = 1 + root_entries + sizes.iter().map(|&s| s as u64).sum::<u64>();
        assert_eq!(n(&s, "entries_visited"), expected, "{s}");
        assert_eq!(n(&s, "files_synced"), 1);
        assert_eq!(n(&s, "bytes_literal"), 9);
        tree::assert_same(&w.master, &w.slave);
        visited.push(n(&s, "entries_visited"));
    }
    // The bigger tree only adds its root entries, not its 200 x 20 files.
    assert_eq!(visited[1] - visited[0], 195);
}

#[test]
fn changes_made_with_no_mark_and_no_georep_running_are_replicated() {
    let w = World::new();
    wide_tree(&w.master, 10, 10);
    w.create("u", &[]);
    w.sync("u");
    // An unintegrated writer, while no georep process runs.
    std::fs::write(w.master.join("dir0003/f005"), b"rewritten without mark").unwrap();
    std::fs::write(w.master.join("dir0007/new"), b"new").unwrap();
    std::fs::remove_file(w.master.join("dir0001/f000")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        w.master.join("dir0002/f002"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    xattr::set(w.master.join("dir0004"), "user.comment", b"set later").unwrap();
    let s = w.sync("u");
    assert_eq!(s["crawl"], "full");
    assert!(s["full_reason"].as_str().unwrap().contains("marker"), "{s}");
    assert_eq!(n(&s, "files_synced"), 2);
    assert_eq!(n(&s, "deletes"), 1);
    tree::assert_same(&w.master, &w.slave);
}

#[test]
fn a_wiped_or_foreign_slave_triggers_a_full_crawl() {
    let w = World::new();
    wide_tree(&w.master, 3, 3);
    w.create("a", &["--marker", "mark"]);
    w.sync("a");
    assert_eq!(w.sync("a")["crawl"], "xtime");
    // Wiped: the slave is emptied behind georep's back.
    for e in std::fs::read_dir(&w.slave).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p).unwrap()
        } else {
            std::fs::remove_file(&p).unwrap()
        }
    }
    let s = w.sync("a");
    assert_eq!(s["crawl"], "full");
    assert!(
        s["full_reason"].as_str().unwrap().contains("identity"),
        "{s}"
    );
    tree::assert_same(&w.master, &w.slave);
    assert_eq!(w.sync("a")["crawl"], "xtime");
    // Replaced by an older copy of itself (a restore): the epoch no longer matches.
    let backup = w.dir.path().join("backup");
    std::process::Command::new("cp")
        .args(["-a"])
        .arg(&w.slave)
        .arg(&backup)
        .status()
        .unwrap();
    std::fs::write(w.master.join("dir0000/f000"), b"changed").unwrap();
    mark(&w.master.join("dir0000/f000"));
    w.sync("a");
    std::fs::write(w.master.join("dir0001/f001"), b"changed too").unwrap();
    // Georep is told nothing about this change, but the full crawl finds it.
    w.run_ok(&["sync", "a", "--full"]);
    std::fs::remove_dir_all(&w.slave).unwrap();
    std::fs::rename(&backup, &w.slave).unwrap();
    std::fs::write(w.slave.join(".georep/identity.json"), br#"{"session":"00000000-0000-0000-0000-000000000001","epoch":"00000000-0000-0000-0000-000000000002"}"#).unwrap();
    let s = w.sync("a");
    assert_eq!(s["crawl"], "full");
    assert!(
        s["full_reason"]
            .as_str()
            .unwrap()
            .contains("another session"),
        "{s}"
    );
    tree::assert_same(&w.master, &w.slave);
}

#[test]
fn sync_json_has_the_documented_keys() {
    let w = World::new();
    std::fs::write(w.master.join("f"), b"hello").unwrap();
    w.create("k", &[]);
    let s = w.sync("k");
    for key in [
        "entries_visited",
        "files_synced",
        "bytes_sent",
        "bytes_literal",
        "deletes",
        "failures",
        "duration_ms",
    ] {
        assert!(s[key].is_u64(), "missing {key}: {s}");
    }
    assert!(s["crawl"] == "full" || s["crawl"] == "xtime");
    assert_eq!(n(&s, "bytes_sent"), 5);
    assert_eq!(n(&s, "entries_visited"), 2);
}
