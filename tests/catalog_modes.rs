//! The sync-mode matrix of DESIGN §6, each cell checked on a real sample
//! store (qemu-img images, CDP journals) replicated by the real binary:
//! which points reach the slave, as which file type, with equal content.

mod common;

use common::catalog::{self as cat, Key};
use common::World;
use georep::catalog::points::PointKind;
use std::collections::BTreeSet;

fn create(w: &World, mode: &str) {
    w.create("c", &["--mode", mode]);
    let cfg = std::fs::read_to_string(w.home.join("sessions/c/config.toml")).unwrap();
    assert!(
        cfg.contains("layout = \"store\""),
        "a store is detected: {cfg}"
    );
}

fn sync(w: &World) -> serde_json::Value {
    let s = w.sync("c");
    assert_eq!(s["crawl"], "catalog", "{s}");
    assert_eq!(common::n(&s, "failures"), 0, "{s}");
    cat::replica_consistent(&w.master, &w.slave);
    s
}

fn keys(pts: &[georep::catalog::points::Point], host: &str) -> BTreeSet<Key> {
    pts.iter()
        .filter(|p| p.host == host)
        .map(|p| (p.host.clone(), p.disk.clone(), p.time))
        .collect()
}

/// The master's points at one time (all disks of a host snapshot).
fn at(pts: &[georep::catalog::points::Point], host: &str, t: u64) -> BTreeSet<Key> {
    keys(pts, host).into_iter().filter(|k| k.2 == t).collect()
}

fn newest_host_time(w: &World, host: &str) -> u64 {
    let h = georep::catalog::store::load_host(&w.master, host).unwrap();
    georep::catalog::points::newest_complete(&h).unwrap()
}

#[test]
fn qcow_interval_replicates_only_the_newest_host_snapshot_as_qcow() {
    let w = World::new();
    cat::sample(&w, &["--hosts", "1", "--kinds", "qcow"]);
    create(&w, "interval");
    sync(&w);
    let m = cat::points(&w.master);
    let gens = cat::generations(&w.master, "host01");
    assert_eq!(
        cat::generations(&w.slave, "host01"),
        vec![*gens.last().unwrap()]
    );
    assert_eq!(
        keys(&cat::points(&w.slave), "host01"),
        at(&m, "host01", *gens.last().unwrap())
    );
    // Two new host snapshots: only the newest is replicated.
    cat::advance(&w, &["--only", "snapshot"]);
    cat::advance(&w, &["--only", "snapshot"]);
    sync(&w);
    let gens2 = cat::generations(&w.master, "host01");
    assert_eq!(
        cat::generations(&w.slave, "host01"),
        vec![*gens.last().unwrap(), *gens2.last().unwrap()],
        "interval mode skips the middle snapshot"
    );
    let s = cat::points(&w.slave);
    assert!(s.iter().all(|p| p.kind == PointKind::Qcow));
    assert!(cat::files_with(&w.slave, "cdp").is_empty());
    let tmp = tempfile::tempdir_in(&w.dir).unwrap();
    assert_eq!(cat::same_points(&w.master, &w.slave, 0, tmp.path()), 4);
    // Quiet: nothing more to send.
    let s = sync(&w);
    assert_eq!(common::n(&s, "bytes_sent"), 0, "{s}");
}

#[test]
fn qcow_continuous_replicates_every_host_snapshot_in_order() {
    let w = World::new();
    cat::sample(&w, &["--hosts", "1", "--kinds", "qcow"]);
    create(&w, "continuous");
    sync(&w);
    let first = *cat::generations(&w.master, "host01").last().unwrap();
    assert_eq!(
        cat::generations(&w.slave, "host01"),
        vec![first],
        "the newest first"
    );
    cat::advance(&w, &["--only", "snapshot"]);
    cat::advance(&w, &["--only", "snapshot"]);
    let s = sync(&w);
    let want: Vec<u64> = cat::generations(&w.master, "host01")
        .into_iter()
        .filter(|&t| t >= first)
        .collect();
    assert_eq!(want.len(), 3);
    assert_eq!(
        cat::generations(&w.slave, "host01"),
        want,
        "then every following one"
    );
    // The chained disk's images went as they are (their parents were there).
    assert!(s["catalog"]["images_copied"].as_u64().unwrap() >= 4, "{s}");
    let m = cat::points(&w.master);
    let expect: BTreeSet<Key> = keys(&m, "host01")
        .into_iter()
        .filter(|k| k.2 >= first)
        .collect();
    assert_eq!(keys(&cat::points(&w.slave), "host01"), expect);
    assert!(cat::points(&w.slave)
        .iter()
        .all(|p| p.kind == PointKind::Qcow));
    let tmp = tempfile::tempdir_in(&w.dir).unwrap();
    assert_eq!(cat::same_points(&w.master, &w.slave, 0, tmp.path()), 6);
}

#[test]
fn cdp_interval_materialises_the_newest_point_as_a_qcow_image() {
    let w = World::new();
    cat::sample(&w, &["--hosts", "1", "--kinds", "cdp"]);
    create(&w, "interval");
    sync(&w);
    let t1 = newest_host_time(&w, "host01");
    assert_eq!(cat::generations(&w.slave, "host01"), vec![t1]);
    let m = cat::points(&w.master);
    assert!(at(&m, "host01", t1).iter().all(|k| m
        .iter()
        .any(|p| (p.disk.as_str(), p.time) == (k.1.as_str(), k.2) && p.kind == PointKind::Cdp)));
    assert_eq!(keys(&cat::points(&w.slave), "host01"), at(&m, "host01", t1));
    cat::advance(&w, &["--only", "cdp"]);
    sync(&w);
    let t2 = newest_host_time(&w, "host01");
    assert!(t2 > t1);
    assert_eq!(
        cat::generations(&w.slave, "host01"),
        vec![t1, t2],
        "only the newest point each time"
    );
    let s = cat::points(&w.slave);
    assert!(
        s.iter().all(|p| p.kind == PointKind::Qcow),
        "cdp points arrive as images"
    );
    assert!(
        cat::files_with(&w.slave, "cdp").is_empty(),
        "no journal on the slave"
    );
    let tmp = tempfile::tempdir_in(&w.dir).unwrap();
    assert_eq!(cat::same_points(&w.master, &w.slave, 0, tmp.path()), 4);
}

#[test]
fn cdp_continuous_starts_with_an_image_then_appends_every_following_point_as_cdp() {
    let w = World::new();
    cat::sample(&w, &["--hosts", "1", "--kinds", "cdp"]);
    create(&w, "continuous");
    sync(&w);
    let t1 = newest_host_time(&w, "host01");
    let s = cat::points(&w.slave);
    assert!(
        s.iter().all(|p| p.kind == PointKind::Qcow && p.time == t1),
        "first: the newest point as an image"
    );
    assert_eq!(
        cat::files_with(&w.slave, "cdp").len(),
        2,
        "and an empty journal per disk"
    );
    cat::advance(&w, &["--only", "cdp"]);
    let r = sync(&w);
    assert_eq!(r["catalog"]["cdp_points"].as_u64(), Some(2 * 10), "{r}");
    assert_eq!(r["catalog"]["images_built"].as_u64(), Some(0), "{r}");
    cat::advance(&w, &["--only", "snapshot"]);
    cat::advance(&w, &["--only", "cdp"]);
    sync(&w);
    let m = cat::points(&w.master);
    let s = cat::points(&w.slave);
    let expect: BTreeSet<Key> = keys(&m, "host01")
        .into_iter()
        .filter(|k| k.2 >= t1)
        .collect();
    assert_eq!(
        keys(&s, "host01"),
        expect,
        "every point after the first, none twice"
    );
    for p in &s {
        let mp = m
            .iter()
            .find(|x| (x.disk.as_str(), x.time) == (p.disk.as_str(), p.time))
            .unwrap();
        if p.time > t1 {
            assert_eq!(
                p.kind, mp.kind,
                "{p:?}: a cdp point stays cdp, a host snapshot stays qcow"
            );
        }
    }
    let tmp = tempfile::tempdir_in(&w.dir).unwrap();
    assert!(cat::same_points(&w.master, &w.slave, 8, tmp.path()) >= 8);
    // The JSON listing of both sides agrees on what was replicated.
    let list = |root: &std::path::Path| -> serde_json::Value {
        let o = w.run_ok(&["point", "list", root.to_str().unwrap(), "--json"]);
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let (mj, sj) = (list(&w.master), list(&w.slave));
    let pick = |v: &serde_json::Value| -> BTreeSet<(String, String, u64)> {
        v["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["host"].as_str().unwrap().into(),
                    p["disk"].as_str().unwrap().into(),
                    p["time"].as_u64().unwrap(),
                )
            })
            .filter(|k: &(String, String, u64)| k.2 >= t1)
            .collect()
    };
    assert_eq!(pick(&mj), pick(&sj));
    assert_eq!(
        sj["hosts"][0]["newest_complete"], mj["hosts"][0]["newest_complete"],
        "same RPO point on both sides"
    );
}

#[test]
fn a_store_replicates_over_ssh_with_the_same_points_and_content() {
    let w = World::new();
    cat::sample(&w, &["--hosts", "2"]);
    let sshd = common::sshd::Sshd::start();
    let mut args = common::sshd::create_args(&sshd, "c", &w.master, &w.slave);
    args.extend(["--mode".into(), "continuous".into()]);
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    w.run_ok(&args);
    sync(&w);
    cat::advance(&w, &[]);
    let s = sync(&w);
    assert!(common::n(&s, "bytes_sent") > 0, "{s}");
    let tmp = tempfile::tempdir_in(&w.dir).unwrap();
    assert!(cat::same_points(&w.master, &w.slave, 4, tmp.path()) > 0);
    let quiet = sync(&w);
    assert_eq!(common::n(&quiet, "bytes_sent"), 0, "{quiet}");
}
