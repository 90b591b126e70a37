//! `georep verify` of a snapshot store's replica (catalog mode): every
//! point's records and files are checked on both sides; a rotted image
//! (bit flipped, mtime and size kept), a truncated one, a deleted one and a
//! damaged journal are found and named, the images the master holds byte
//! for byte are shipped again by `--repair`, and status names what failed.

mod common;

use common::World;
use serde_json::Value;
use std::os::unix::fs::{FileExt, MetadataExt};

fn verify(w: &World, args: &[&str]) -> (i32, Value) {
    let mut a = vec!["verify", "c", "--json"];
    a.extend_from_slice(args);
    let out = w.run(&a);
    let v =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", common::stderr(&out)));
    (out.status.code().unwrap(), v)
}

fn flip(p: &std::path::Path, off: u64) {
    let md = std::fs::metadata(p).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 4;
    f.write_all_at(&b, off).unwrap();
    let t = nix::sys::time::TimeSpec::new(md.mtime(), md.mtime_nsec());
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

#[test]
fn every_point_is_checked_on_both_sides_and_failures_are_named_and_shipped_again() {
    let w = World::new();
    common::catalog::sample(&w, &["--hosts", "4"]);
    w.create("c", &["--mode", "continuous"]);
    w.sync("c");
    // Journal points after the first sync travel as cdp appends.
    common::catalog::advance(&w, &["--only", "cdp"]);
    w.sync("c");
    let (code, v) = verify(&w, &[]);
    assert_eq!(code, 0, "{v}");
    assert!(
        v["entries"].as_u64().unwrap() > 2 && v["bytes"].as_u64().unwrap() > 0,
        "{v}"
    );
    let wire = v["wire_bytes_out"].as_u64().unwrap() + v["wire_bytes_in"].as_u64().unwrap();
    assert!(
        wire * 100 < v["bytes"].as_u64().unwrap(),
        "hashes only: {wire} bytes for {v}"
    );

    // Images the master holds byte for byte (the even host's qcow chain) and a journal.
    let qcows = common::catalog::files_with(&w.slave, "qcow2");
    let masters: Vec<_> = qcows
        .iter()
        .filter(|p| {
            let m = w.master.join(p.strip_prefix(&w.slave).unwrap());
            m.exists() && std::fs::read(&m).unwrap() == std::fs::read(p).unwrap()
        })
        .cloned()
        .collect();
    assert!(masters.len() >= 2, "copied images: {masters:?}");
    let rotted = &masters[0];
    flip(rotted, std::fs::metadata(rotted).unwrap().len() / 2);
    let cut = &masters[1];
    let f = std::fs::OpenOptions::new().write(true).open(cut).unwrap();
    f.set_len(f.metadata().unwrap().len() - 512).unwrap();
    drop(f);
    let journals = common::catalog::files_with(&w.slave, "cdp");
    let journal = journals
        .iter()
        .find(|j| std::fs::metadata(j).unwrap().len() > 4096)
        .expect("a journal with points");
    // Inside the first published point: a record header or its data.
    flip(journal, 200);
    let rel = |p: &std::path::Path| p.strip_prefix(&w.slave).unwrap().display().to_string();

    let (code, v) = verify(&w, &[]);
    assert_eq!(code, 1, "{v}");
    let mut found: Vec<(String, String)> = v["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["path"].as_str().unwrap().to_string(),
                d["what"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    found.sort();
    let mut want = vec![
        (rel(rotted), "content".to_string()),
        (rel(cut), "size".to_string()),
        (rel(journal), "content".to_string()),
    ];
    want.sort();
    assert_eq!(found, want, "{v}");
    // Each names its point.
    for d in v["differences"].as_array().unwrap() {
        assert!(
            d["fields"][0].as_str().unwrap().contains("of snapshot"),
            "{d}"
        );
    }
    let s = w.status("c");
    assert_eq!(s["verify_mismatches"], 3, "{s:#}");
    let named: Vec<&str> = s["verify_mismatch_paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(named.contains(&rel(rotted).as_str()), "{s:#}");

    // Repair: the images come back from the master; the journal is reported.
    let (code, v) = verify(&w, &["--repair"]);
    assert_eq!(code, 1, "the journal is left: {v}");
    let r = &v["repair"];
    assert_eq!(r["repaired"], 2, "{v}");
    assert_eq!(r["failed"].as_array().unwrap().len(), 1, "{v}");
    let left: Vec<&str> = r["after"]["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap())
        .collect();
    assert_eq!(left, [rel(journal).as_str()], "{v}");
    for p in [rotted, cut] {
        assert_eq!(
            std::fs::read(p).unwrap(),
            std::fs::read(w.master.join(p.strip_prefix(&w.slave).unwrap())).unwrap()
        );
    }
    let out = w.run(&["point", "verify", w.slave.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the damaged journal still fails"
    );
    let s = w.status("c");
    assert_eq!(s["verify_mismatches"], 1, "{s:#}");
    assert_eq!(
        s["verify_mismatch_paths"][0],
        rel(journal).as_str(),
        "{s:#}"
    );
}

#[test]
fn the_scrub_of_a_store_finds_a_rotted_image_and_ships_it_again() {
    let w = World::new();
    common::catalog::sample(&w, &["--hosts", "2"]);
    w.create("c", &["--mode", "continuous"]);
    w.run_ok(&["config", "c", "set", "scrub_rate", "50M"]);
    w.run_ok(&["config", "c", "set", "scrub_period", "6"]);
    let _run = w.start("c");
    w.wait_active("c");
    w.wait_status("c", "a first scrub pass", |s| s["verify_last"].is_string());
    let copied = common::catalog::files_with(&w.slave, "qcow2")
        .into_iter()
        .find(|p| {
            let m = w.master.join(p.strip_prefix(&w.slave).unwrap());
            m.exists() && std::fs::read(&m).unwrap() == std::fs::read(p).unwrap()
        })
        .expect("a copied image");
    flip(&copied, 1000);
    let rel = copied.strip_prefix(&w.slave).unwrap().display().to_string();
    let s = w.wait_status("c", "the rotted point named", |s| {
        s["verify_mismatches"].as_u64() > Some(0)
    });
    assert_eq!(s["verify_mismatch_paths"][0], rel.as_str(), "{s:#}");
    let master = std::fs::read(w.master.join(&rel)).unwrap();
    common::daemon::wait_for("the image shipped again", || {
        (std::fs::read(&copied).unwrap() == master).then_some(())
    })
    .expect("shipped again");
    w.wait_status("c", "a clean pass", |s| s["verify_mismatches"] == 0);
}
