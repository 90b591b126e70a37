//! Helpers of the catalog-mode tests: sample stores made by the real
//! binary, and checks of a replica against its master (records verify,
//! images pass `qemu-img check`, host snapshots complete, points restore
//! to the same bytes on both sides).

use super::World;
use georep::catalog::points::{self, Point, PointKind, PointRef};
use georep::catalog::{qcow, record, store};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Makes a small sample store in the world's master with `georep sample-store`.
pub fn sample(w: &World, extra: &[&str]) {
    let mut args = vec![
        "sample-store",
        w.master.to_str().unwrap(),
        "--disk-size",
        "2M",
        "--snapshots",
        "3",
        "--points",
        "6",
    ];
    args.extend_from_slice(extra);
    w.run_ok(&args);
}

pub fn advance(w: &World, extra: &[&str]) {
    let mut args = vec![
        "sample-store",
        w.master.to_str().unwrap(),
        "--advance",
        "--points",
        "5",
    ];
    args.extend_from_slice(extra);
    w.run_ok(&args);
}

pub type Key = (String, String, u64);

pub fn points(root: &Path) -> Vec<Point> {
    let cat = store::load(root).unwrap_or_else(|e| panic!("loading {}: {e}", root.display()));
    points::list(root, &cat, &points::Filter::default()).unwrap()
}

pub fn keyed(pts: &[Point]) -> BTreeMap<Key, Point> {
    let mut m = BTreeMap::new();
    for p in pts {
        let k = (p.host.clone(), p.disk.clone(), p.time);
        assert!(
            m.insert(k.clone(), p.clone()).is_none(),
            "point {k:?} held twice"
        );
        m.insert(k, p.clone());
    }
    m
}

/// The generation times of a host on a store.
pub fn generations(root: &Path, host: &str) -> Vec<u64> {
    store::load_host(root, host)
        .unwrap()
        .snapshots
        .keys()
        .copied()
        .collect()
}

/// Every file of a replica's snapshot files, by extension.
pub fn files_with(root: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.join("hosts")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == ext) {
                out.push(p);
            }
        }
    }
    out
}

/// Restores point `k` from both stores and compares the images' content.
pub fn same_point(master: &Path, slave: &Path, k: &Key, scratch: &Path) {
    let r = PointRef {
        host: k.0.clone(),
        disk: k.1.clone(),
        time: Some(k.2),
    };
    let a = scratch.join("master.qcow2");
    let b = scratch.join("slave.qcow2");
    points::restore(master, &store::load(master).unwrap(), &r, &a)
        .unwrap_or_else(|e| panic!("restore {k:?} on the master: {e}"));
    points::restore(slave, &store::load(slave).unwrap(), &r, &b)
        .unwrap_or_else(|e| panic!("restore {k:?} on the slave: {e}"));
    assert!(
        qcow::same_content(&a, &b).unwrap(),
        "point {}/{}@{} differs between master and slave",
        k.0,
        k.1,
        k.2
    );
}

/// The replica's invariants after a sync, or after a worker was killed:
/// records verify against the data, every image passes `qemu-img check`
/// with its backing files present, every host snapshot holds every disk
/// of the master snapshot it comes from, and no point is held twice.
pub fn replica_consistent(master: &Path, slave: &Path) {
    if !slave.join(record::STORE_FILE).exists() {
        return;
    }
    let problems = points::verify(slave).unwrap();
    assert!(
        problems.is_empty(),
        "replica records do not verify: {problems:#?}"
    );
    for img in files_with(slave, "qcow2") {
        let name = img.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-q"])
            .arg(&img)
            .output()
            .expect("qemu-img (install qemu-utils; packaging/setup.sh does)");
        assert!(
            out.status.success(),
            "qemu-img check {}: {}",
            img.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let m = store::load(master).unwrap();
    let s = store::load(slave).unwrap();
    for (name, h) in &s.hosts {
        assert!(
            h.problems.is_empty(),
            "replica host {name}: {:?}",
            h.problems
        );
        for g in h.snapshots.values() {
            let src = g
                .record
                .source
                .as_deref()
                .expect("replicas name their source");
            if let Some(ms) = m
                .hosts
                .get(name)
                .and_then(|mh| mh.snapshots.values().find(|x| x.dir == src))
            {
                let want: BTreeSet<_> = ms.disks.keys().collect();
                let have: BTreeSet<_> = g.disks.keys().collect();
                assert_eq!(have, want, "replica {name}/{} is not complete", g.dir);
            }
        }
    }
    keyed(&points(slave));
}

/// Compares the content of the replica's points that the master still has:
/// every qcow point and up to `cdp_sample` cdp points (spread evenly).
pub fn same_points(master: &Path, slave: &Path, cdp_sample: usize, scratch: &Path) -> usize {
    let m = keyed(&points(master));
    let s = keyed(&points(slave));
    let common: Vec<_> = s.iter().filter(|(k, _)| m.contains_key(*k)).collect();
    let cdp: Vec<_> = common
        .iter()
        .filter(|(_, p)| p.kind == PointKind::Cdp)
        .collect();
    let step = (cdp.len() / cdp_sample.max(1)).max(1);
    let mut n = 0;
    for (k, p) in &common {
        let pick = p.kind == PointKind::Qcow
            || cdp
                .iter()
                .position(|(x, _)| x == k)
                .is_some_and(|i| i % step == 0);
        if pick {
            same_point(master, slave, k, scratch);
            n += 1;
        }
    }
    n
}
