//! Catalog mode in O(changes): with xtimes to be trusted (`marker =
//! mark`, the appliance marks what it writes), a sync reads only the hosts
//! whose xtime is newer than their stime, as the tree crawl prunes
//! directories; stimes advance only after the slave made the data durable.

mod common;

use common::{catalog, n, World};

/// Marks every file under `dir` (what an integrated appliance does as it writes).
fn mark_tree(dir: &std::path::Path) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            mark_tree(&p);
        }
        common::mark(&p);
    }
}

#[test]
fn a_no_change_catalog_sync_reads_no_host_and_a_change_reads_its_host_only() {
    let w = World::new();
    catalog::sample(&w, &["--hosts", "6"]);
    w.create("c", &["--marker", "mark"]);
    let first = w.sync("c");
    assert_eq!(first["crawl"], "catalog", "{first}");
    let quiet = w.sync("c");
    assert_eq!(quiet["crawl"], "catalog-xtime", "{quiet}");
    assert_eq!(quiet["catalog"]["hosts_unchanged"], 6, "{quiet}");
    assert_eq!(n(&quiet, "entries_visited"), 0, "no record read: {quiet}");
    // One host gets new points, marked as the appliance writes them.
    let before = catalog::generations(&w.slave, "host01");
    catalog::advance(&w, &["--only", "snapshot"]);
    mark_tree(&w.master.join("hosts/host01"));
    let s = w.sync("c");
    assert_eq!(s["catalog"]["hosts_unchanged"], 5, "{s}");
    assert!(n(&s, "entries_visited") > 0, "{s}");
    catalog::replica_consistent(&w.master, &w.slave);
    let m = catalog::generations(&w.master, "host01");
    let now = catalog::generations(&w.slave, "host01");
    assert!(
        now.len() > before.len(),
        "the marked host got its new generation: {now:?}"
    );
    assert_eq!(now.last(), m.last(), "the newest point is on the slave");
    let again = w.sync("c");
    assert_eq!(
        again["catalog"]["hosts_unchanged"], 6,
        "its stime covers it now: {again}"
    );
    // Without a mark there is no continuity to trust: every host is read.
    let full = w.run_ok(&["sync", "c", "--full", "--json"]);
    let full: serde_json::Value = serde_json::from_slice(&full.stdout).unwrap();
    assert_eq!(full["crawl"], "catalog", "{full}");
    assert_eq!(full["catalog"]["hosts_unchanged"], 0, "{full}");
    catalog::replica_consistent(&w.master, &w.slave);
}
