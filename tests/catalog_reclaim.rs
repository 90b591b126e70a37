//! Reclamation splits (a journal replaced by an image of one of its points
//! plus a shorter journal starting there) in continuous cdp mode: a point is
//! identified by (disk, time), so whether the split falls before or after
//! the slave's last point, every point arrives once and none is lost.

mod common;

use common::catalog as cat;
use common::World;
use georep::catalog::sample::Appliance;
use std::collections::BTreeSet;

fn sync(w: &World) -> serde_json::Value {
    let s = w.sync("c");
    assert_eq!(common::n(&s, "failures"), 0, "{s}");
    cat::replica_consistent(&w.master, &w.slave);
    s
}

/// Every master point from `from` on is on the slave (and none twice: `keyed` checks).
fn all_points_from(w: &World, from: u64) {
    let m: BTreeSet<_> = cat::keyed(&cat::points(&w.master))
        .into_keys()
        .filter(|k| k.2 >= from)
        .collect();
    let s: BTreeSet<_> = cat::keyed(&cat::points(&w.slave))
        .into_keys()
        .filter(|k| k.2 >= from)
        .collect();
    let missing: Vec<_> = m.difference(&s).collect();
    assert!(
        missing.is_empty(),
        "points missing on the slave: {missing:?}"
    );
}

fn setup() -> (World, Appliance, u64) {
    let w = World::new();
    cat::sample(&w, &["--hosts", "1", "--kinds", "cdp"]);
    w.create("c", &["--mode", "continuous"]);
    sync(&w);
    let first = cat::generations(&w.slave, "host01")[0];
    let a = Appliance::open(&w.master, 3).unwrap();
    (w, a, first)
}

#[test]
fn a_split_after_the_slaves_last_point_sends_the_split_point_as_one_point() {
    let (w, mut a, _) = setup();
    // A host snapshot the slave mirrors: its journal starts where the master's does.
    a.snapshot("host01").unwrap();
    a.cdp_append("host01", 4, false).unwrap();
    sync(&w);
    let mirrored = *cat::generations(&w.slave, "host01").last().unwrap();
    a.cdp_append("host01", 9, true).unwrap();
    let m = a
        .reclaim_newest("host01", true, 0.7)
        .unwrap()
        .expect("split");
    let last_synced = cat::points(&w.slave).iter().map(|p| p.time).max().unwrap();
    assert!(
        m > last_synced,
        "the split falls after the slave's last point"
    );
    let s = sync(&w);
    assert_eq!(
        s["catalog"]["cdp_points_from_images"], 2,
        "one point per disk: {s}"
    );
    assert_eq!(s["catalog"]["generations_published"], 0, "{s}");
    all_points_from(&w, mirrored);
    let tmp = tempfile::tempdir_in(&w.dir).unwrap();
    for disk in ["disk0", "disk1"] {
        cat::same_point(
            &w.master,
            &w.slave,
            &("host01".into(), disk.into(), m),
            tmp.path(),
        );
    }
    cat::same_points(&w.master, &w.slave, 6, tmp.path());
    // A split before the slave's last point changes nothing on the slave.
    a.cdp_append("host01", 3, false).unwrap();
    sync(&w);
    let before = cat::points(&w.slave);
    a.reclaim_newest("host01", false, 0.5)
        .unwrap()
        .expect("split");
    let s = sync(&w);
    assert_eq!(common::n(&s, "bytes_sent"), 0, "nothing resent: {s}");
    assert_eq!(cat::points(&w.slave), before);
    a.cdp_append("host01", 3, false).unwrap();
    sync(&w);
    all_points_from(&w, mirrored);
    cat::same_points(&w.master, &w.slave, 6, tmp.path());
}

#[test]
fn a_split_on_a_replica_started_from_a_journal_point_sends_every_block_of_the_split_point() {
    let (w, mut a, first) = setup();
    a.cdp_append("host01", 9, false).unwrap();
    // One disk only: the other keeps its journal as it was.
    let m = a
        .reclaim_newest("host01", false, 0.8)
        .unwrap()
        .expect("split");
    let s = sync(&w);
    assert_eq!(s["catalog"]["cdp_points_from_images"], 1, "{s}");
    all_points_from(&w, first);
    let tmp = tempfile::tempdir_in(&w.dir).unwrap();
    let split: Vec<_> = cat::points(&w.master)
        .into_iter()
        .filter(|p| p.time == m && p.kind == georep::catalog::points::PointKind::Qcow)
        .collect();
    assert_eq!(split.len(), 1);
    cat::same_point(
        &w.master,
        &w.slave,
        &(split[0].host.clone(), split[0].disk.clone(), m),
        tmp.path(),
    );
    cat::same_points(&w.master, &w.slave, 8, tmp.path());
}
