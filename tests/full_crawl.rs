//! A full crawl after a gap in the marker's watch compares only the
//! directories whose entries changed since the last sync (each directory
//! records a digest of its entries' stat, ctime included, once synced);
//! a requested full crawl or a new slave compares everything.

mod common;

use common::{n, tree, World};
use std::os::unix::fs::PermissionsExt;

fn tree20(w: &World) {
    for d in 0..20 {
        let dir = w.master.join(format!("d{d:02}"));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        for f in 0..20 {
            std::fs::write(dir.join(format!("f{f:02}")), format!("{d}/{f}")).unwrap();
        }
    }
}

#[test]
fn a_quiet_full_crawl_compares_no_directory_and_a_changed_one_is_compared() {
    let w = World::new();
    tree20(&w);
    w.create("f", &[]);
    w.sync("f");
    let quiet = w.sync("f");
    assert_eq!(quiet["crawl"], "full", "{quiet}");
    assert_eq!(
        n(&quiet, "dirs_unchanged"),
        41,
        "root, 20 dirs, 20 subdirs: {quiet}"
    );
    assert_eq!(n(&quiet, "bytes_sent"), 0, "{quiet}");
    assert_eq!(n(&quiet, "meta_updates"), 0, "{quiet}");
    assert!(
        n(&quiet, "wire_bytes_in") < 1000,
        "no listing came back: {quiet}"
    );
    assert_eq!(
        n(&quiet, "entries_visited"),
        1 + 20 + 20 * 21,
        "every entry was stat'ed: {quiet}"
    );
    // Changes while nothing watched: content, mode of a file, mode and an
    // attribute of a directory, a new file deep down.
    std::fs::write(w.master.join("d03/f04"), "changed").unwrap();
    std::fs::set_permissions(
        w.master.join("d05/f01"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::set_permissions(w.master.join("d07"), std::fs::Permissions::from_mode(0o750)).unwrap();
    xattr::set(w.master.join("d09/sub"), "user.tag", b"x").unwrap();
    std::fs::write(w.master.join("d11/sub/new"), "new").unwrap();
    let s = w.sync("f");
    assert_eq!(n(&s, "failures"), 0, "{s}");
    tree::assert_same(&w.master, &w.slave);
    assert!(
        n(&s, "dirs_unchanged") >= 41 - 8,
        "only the changed ones compared: {s}"
    );
    assert!(n(&s, "dirs_unchanged") < 41, "{s}");
    // Asked for, a full crawl compares everything.
    let out = w.run_ok(&["sync", "f", "--full", "--json"]);
    let full: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(n(&full, "dirs_unchanged"), 0, "{full}");
    assert_eq!(n(&full, "bytes_sent"), 0, "{full}");
    let quiet = w.sync("f");
    assert_eq!(n(&quiet, "dirs_unchanged"), 41, "{quiet}");
}
