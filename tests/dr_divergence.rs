//! What a failback's quarantine must find of the old master's divergence,
//! case by case, deterministically (the disaster drill finds these at
//! random): entries written into a directory marked whole (`georep mark
//! DIR`, a dirmark) and never stamped themselves, a directory renamed into
//! place whose stimes describe its old name, symlinks changed in metadata
//! only (they carry no stamp), a hard-linked file changed through a
//! name whose directory was never stamped, and a hard link whose partner
//! the old master renamed (the link counts match, the partners differ).

mod common;

use common::dr;
use common::World;
use std::path::Path;

fn write(p: &Path, data: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

fn touch(p: &Path, sec: i64) {
    let t = nix::sys::time::TimeSpec::new(sec, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

/// Promotes B and fails back onto A; returns the one quarantine's items
/// (path -> reason) and its data directory.
fn fail_back(
    w: &World,
) -> (
    std::collections::BTreeMap<String, String>,
    std::path::PathBuf,
) {
    w.run_ok(&[
        "create",
        "back",
        w.slave.to_str().unwrap(),
        w.master.to_str().unwrap(),
        "--failback",
    ]);
    w.sync("back");
    common::tree::assert_same(&w.slave, &w.master);
    let qs = dr::quarantines(w, &w.master);
    assert_eq!(qs.len(), 1, "{qs:?}");
    let items = qs[0]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                String::from_utf8(dr::item_path(i)).unwrap(),
                i["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let data = w
        .master
        .join(".georep-quarantine")
        .join(qs[0]["id"].as_str().unwrap())
        .join("data");
    (items, data)
}

#[test]
fn entries_of_a_directory_marked_whole_are_kept_though_never_stamped() {
    let w = World::new();
    w.create("s1", &["--marker", "mark"]);
    write(&w.master.join("keep/f"), b"common");
    common::mark(&w.master.join("keep/f"));
    w.sync("s1");
    // A, cut off: a writer fills a new directory and marks the directory
    // (a dirmark); the files in it carry no stamp of their own.
    write(
        &w.master.join("new/report"),
        b"A's report, written after the loss",
    );
    common::mark(&w.master.join("new"));
    dr::promote(&w, &w.slave);
    // B, live: the same name is made there too (B wins it).
    write(&w.slave.join("new/report"), b"B's own report");
    common::mark(&w.slave.join("new/report"));
    let (items, data) = fail_back(&w);
    assert_eq!(
        items.get("new/report").map(String::as_str),
        Some("conflict"),
        "{items:?}"
    );
    assert_eq!(
        std::fs::read(data.join("new/report")).unwrap(),
        b"A's report, written after the loss"
    );
    assert!(!items.contains_key("keep/f"), "{items:?}");
    assert_eq!(
        std::fs::read(w.master.join("new/report")).unwrap(),
        b"B's own report"
    );
}

#[test]
fn a_directory_renamed_into_place_is_compared_in_full() {
    let w = World::new();
    w.create("s1", &["--marker", "mark"]);
    for d in ["x", "y"] {
        write(
            &w.master.join(format!("{d}/sub/g")),
            format!("{d}'s g").as_bytes(),
        );
        write(
            &w.master.join(format!("{d}/f")),
            format!("{d}'s f").as_bytes(),
        );
        common::mark(&w.master.join(format!("{d}/sub/g")));
        common::mark(&w.master.join(format!("{d}/f")));
    }
    w.sync("s1");
    // A swaps x and y (marked as an integrated writer does: both names, dirmarks).
    std::fs::rename(w.master.join("x"), w.master.join("t")).unwrap();
    std::fs::rename(w.master.join("y"), w.master.join("x")).unwrap();
    std::fs::rename(w.master.join("t"), w.master.join("y")).unwrap();
    common::mark(&w.master.join("x"));
    common::mark(&w.master.join("y"));
    dr::promote(&w, &w.slave);
    // B changes x/f: A's x/f (y's old one) looks older than the stime
    // it carries from its old name, yet it is not what B has at x/f.
    write(&w.slave.join("x/f"), b"B's new x/f");
    common::mark(&w.slave.join("x/f"));
    let (items, data) = fail_back(&w);
    for p in ["x/f", "x/sub/g", "y/f", "y/sub/g"] {
        assert!(items.contains_key(p), "{p} not quarantined: {items:?}");
    }
    assert_eq!(items["x/f"], "conflict");
    assert_eq!(std::fs::read(data.join("x/f")).unwrap(), b"y's f");
    assert_eq!(std::fs::read(data.join("x/sub/g")).unwrap(), b"y's g");
}

#[test]
fn a_symlink_changed_in_metadata_only_is_quarantined() {
    let w = World::new();
    w.create("s1", &["--marker", "mark"]);
    std::fs::create_dir(w.master.join("d")).unwrap();
    std::os::unix::fs::symlink("target", w.master.join("d/l")).unwrap();
    std::os::unix::fs::symlink("other", w.master.join("d/m")).unwrap();
    common::mark(&w.master.join("d/l"));
    w.sync("s1");
    touch(&w.master.join("d/l"), 1_000_000_000);
    common::mark(&w.master.join("d/l"));
    dr::promote(&w, &w.slave);
    let (items, data) = fail_back(&w);
    assert_eq!(
        items.get("d/l").map(String::as_str),
        Some("divergent"),
        "{items:?}"
    );
    assert!(!items.contains_key("d/m"), "{items:?}");
    let md = data.join("d/l").symlink_metadata().unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(md.mtime(), 1_000_000_000);
}

#[test]
fn every_name_of_a_hard_linked_file_changed_through_one_of_them_is_kept() {
    let w = World::new();
    w.create("s1", &["--marker", "mark"]);
    write(&w.master.join("a/img"), b"common content");
    std::fs::create_dir_all(w.master.join("b/deep")).unwrap();
    std::fs::hard_link(w.master.join("a/img"), w.master.join("b/deep/img")).unwrap();
    write(&w.master.join("b/other"), b"untouched");
    common::mark(&w.master.join("a/img"));
    common::mark(&w.master.join("b/deep/img"));
    common::mark(&w.master.join("b/other"));
    w.sync("s1");
    // Changed through a/img only: b/deep is never stamped.
    std::fs::write(w.master.join("a/img"), b"A's divergent content").unwrap();
    common::mark(&w.master.join("a/img"));
    dr::promote(&w, &w.slave);
    let (items, data) = fail_back(&w);
    for p in ["a/img", "b/deep/img"] {
        assert_eq!(
            items.get(p).map(String::as_str),
            Some("divergent"),
            "{items:?}"
        );
        assert_eq!(
            std::fs::read(data.join(p)).unwrap(),
            b"A's divergent content"
        );
    }
    assert!(!items.contains_key("b/other"), "{items:?}");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        data.join("a/img").metadata().unwrap().ino(),
        data.join("b/deep/img").metadata().unwrap().ino(),
        "the second name is a link of the copy, not a second copy"
    );
}

#[test]
fn a_hard_link_whose_partner_the_old_master_renamed_is_linked_again() {
    let w = World::new();
    w.create("s1", &["--marker", "mark"]);
    write(&w.master.join("e"), b"linked content");
    std::fs::create_dir_all(w.master.join("a")).unwrap();
    std::fs::create_dir_all(w.master.join("b/p/q/r")).unwrap();
    std::fs::hard_link(w.master.join("e"), w.master.join("a/f")).unwrap();
    for p in ["e", "a/f", "b"] {
        common::mark(&w.master.join(p));
    }
    w.sync("s1");
    // A, cut off, renames one name away: its inode keeps two names, so
    // the count matches B's, though the partners differ.
    std::fs::rename(w.master.join("e"), w.master.join("b/p/q/r/e2")).unwrap();
    common::mark(&w.master.join("e"));
    common::mark(&w.master.join("b/p/q/r/e2"));
    dr::promote(&w, &w.slave);
    // fail_back compares the trees, hard-link groups included.
    let (items, _) = fail_back(&w);
    assert!(items.contains_key("b/p/q/r/e2"), "{items:?}");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        w.master.join("e").metadata().unwrap().ino(),
        w.master.join("a/f").metadata().unwrap().ino()
    );
}
