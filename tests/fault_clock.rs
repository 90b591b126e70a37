//! The master's clock stepped back an hour between syncs (libfaketime
//! under real georep processes): stamps stay monotonic (a hybrid logical
//! clock reserved on the root), so changes still replicate.

mod common;

use common::{n, tree, World};
use std::process::Command;

/// `georep ARGS` with its wall clock an hour behind (monotonic clocks untouched).
fn georep_an_hour_ago(w: &World, args: &[&str]) -> std::process::Output {
    let out = Command::new("faketime")
        .args(["-f", "-1h"])
        .arg(common::georep_bin())
        .args(args)
        .env("GEOREP_HOME", &w.home)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env_remove("GEOREP_LOG")
        .output()
        .expect("faketime: install faketime (packaging/setup.sh does)");
    assert!(
        out.status.success(),
        "georep {args:?} an hour ago: {}\n{}",
        out.status,
        common::stderr(&out)
    );
    out
}

fn root_xtime(w: &World) -> u64 {
    let id = georep::fs::xtime::master_id(&w.master).unwrap().unwrap();
    georep::fs::xtime::read(&w.master, &georep::fs::xtime::xtime_attr(&id)).unwrap()
}

#[test]
fn a_clock_stepped_back_an_hour_between_syncs_still_replicates_every_change() {
    let w = World::new();
    std::fs::create_dir_all(w.master.join("h/d")).unwrap();
    std::fs::write(w.master.join("h/d/disk.img"), b"version 1").unwrap();
    w.create("k", &["--marker", "mark"]);
    w.sync("k");
    common::mark(&w.master.join("h/d/disk.img"));
    w.sync("k");
    let before = root_xtime(&w);
    // The clock now reads an hour earlier than every stamp so far.
    let faked = Command::new("faketime")
        .args(["-f", "-1h", "date", "+%s"])
        .output()
        .expect("faketime: install faketime (packaging/setup.sh does)");
    let faked: u64 = String::from_utf8_lossy(&faked.stdout)
        .trim()
        .parse()
        .unwrap();
    assert!(
        faked * 1_000_000_000 + 3_000_000_000_000 < before,
        "faketime does not step the clock back"
    );
    for round in 0..3 {
        let f = w.master.join(format!("h/d/new{round}.img"));
        std::fs::write(&f, format!("written with the clock behind, round {round}")).unwrap();
        std::fs::write(
            w.master.join("h/d/disk.img"),
            format!("version {}", round + 2),
        )
        .unwrap();
        georep_an_hour_ago(
            &w,
            &[
                "mark",
                f.to_str().unwrap(),
                w.master.join("h/d/disk.img").to_str().unwrap(),
            ],
        );
        let after = root_xtime(&w);
        assert!(after > before, "stamp went backwards: {after} <= {before}");
        let out = georep_an_hour_ago(&w, &["sync", "k", "--json"]);
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(s["crawl"], "xtime", "{s}");
        assert_eq!(n(&s, "files_synced"), 2, "round {round}: {s}");
        tree::assert_same(&w.master, &w.slave);
    }
    // The clock back to normal: still converged, and new changes still go.
    let s = w.sync("k");
    assert_eq!(n(&s, "files_synced"), 0, "{s}");
    std::fs::write(w.master.join("h/d/disk.img"), b"final").unwrap();
    common::mark(&w.master.join("h/d/disk.img"));
    let s = w.sync("k");
    assert_eq!(n(&s, "files_synced"), 1, "{s}");
    tree::assert_same(&w.master, &w.slave);
}
