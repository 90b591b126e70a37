//! Bad input to the catalog commands: one line naming the problem and the
//! fix, exit code 2, nothing written.

mod common;

use common::{stderr, World};

fn refused(w: &World, args: &[&str], says: &str) {
    let out = w.run(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(
        err.trim().lines().count(),
        1,
        "{args:?}: one line, got {err:?}"
    );
    assert!(err.contains(says), "{args:?}: {err:?} should say {says:?}");
}

#[test]
fn bad_input_is_refused_with_one_line_and_exit_2() {
    let w = World::new();
    let m = w.master.to_str().unwrap().to_string();
    // Not a store (yet): the master is an empty directory.
    refused(&w, &["point", "list", &m], "not a snapshot store");
    refused(
        &w,
        &[
            "create",
            "c",
            &m,
            w.slave.to_str().unwrap(),
            "--layout",
            "store",
        ],
        "not a snapshot store",
    );
    assert!(!w.home.join("sessions/c").exists(), "nothing written");
    w.run_ok(&[
        "sample-store",
        &m,
        "--hosts",
        "1",
        "--disk-size",
        "1M",
        "--snapshots",
        "1",
        "--points",
        "2",
    ]);
    refused(&w, &["sample-store", &m], "already a store");
    refused(
        &w,
        &["point", "restore", &m, "nonsense", "-o", "/tmp/x.qcow2"],
        "HOST/DISK@TIME",
    );
    refused(
        &w,
        &[
            "point",
            "restore",
            &m,
            "host01/disk9@latest",
            "-o",
            w.dir.path().join("x.qcow2").to_str().unwrap(),
        ],
        "no point host01/disk9@latest",
    );
    refused(
        &w,
        &["point", "list", &m, "--host", "nohost"],
        "no host \"nohost\"",
    );
    refused(
        &w,
        &[
            "point",
            "restore",
            &m,
            "host01/disk0@latest",
            "-o",
            w.dir.path().to_str().unwrap(),
        ],
        "is a directory",
    );
    assert!(!w.dir.path().join("x.qcow2").exists());
    let other = w.dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("f"), b"x").unwrap();
    refused(&w, &["sample-store", other.to_str().unwrap()], "not empty");
    refused(
        &w,
        &[
            "sample-store",
            other.join("new").to_str().unwrap(),
            "--disk-size",
            "1500K",
        ],
        "multiple of 1M",
    );
    // A slave that holds something else is not mixed into.
    let w2 = World::new();
    let m2 = w2.master.to_str().unwrap().to_string();
    w2.run_ok(&[
        "sample-store",
        &m2,
        "--hosts",
        "1",
        "--disk-size",
        "1M",
        "--snapshots",
        "1",
        "--points",
        "2",
    ]);
    w2.create("c", &[]);
    std::fs::write(w2.slave.join("precious.txt"), b"keep me").unwrap();
    refused(&w2, &["sync", "c"], "not empty (precious.txt is there)");
    assert!(!w2.slave.join("store.json").exists() && !w2.slave.join("hosts").exists());
    // A session whose master stopped being a store.
    w.create("c", &[]);
    std::fs::remove_file(w.master.join("store.json")).unwrap();
    refused(&w, &["sync", "c"], "not a snapshot store");
}
