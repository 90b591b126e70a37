//! Disaster recovery of a snapshot store (catalog mode), with real
//! processes on real stores made by `georep sample-store`: a failback after
//! divergent activity on both sides (killed at several moments and run
//! again), a switchover A -> B -> A of a store with no loss, locally and
//! over SSH, and the disaster drill of a store (a property test; its
//! failback killed at a random moment and run again).

mod common;

use common::catalog::{keyed, points, Key};
use common::{dr, n, stderr, World};
use georep::catalog::points::{self as gpoints, PointKind};
use georep::catalog::store;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn advance(w: &World, store: &Path, only: &str, seed: &str) {
    w.run_ok(&[
        "sample-store",
        store.to_str().unwrap(),
        "--advance",
        "--only",
        only,
        "--points",
        "4",
        "--seed",
        seed,
    ]);
}

/// A copy of `root` as it is now (`cp -a`), beside it.
fn copy_of(w: &World, root: &Path) -> std::path::PathBuf {
    let to = w.dir.path().join("a-before");
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(root)
        .arg(&to)
        .status()
        .unwrap();
    assert!(cp.success(), "cp -a {}", root.display());
    to
}

fn point_keys(root: &Path) -> BTreeSet<Key> {
    keyed(&points(root)).into_keys().collect()
}

/// The per-disk newest time of `keys`.
fn newest(keys: &BTreeSet<Key>) -> BTreeMap<(String, String), u64> {
    let mut m = BTreeMap::new();
    for (h, d, t) in keys {
        let e = m.entry((h.clone(), d.clone())).or_insert(0);
        *e = (*e).max(*t);
    }
    m
}

/// Restores point `k` from two stores and compares the images' content.
fn same_content(a: &Path, b: &Path, k: &Key, scratch: &Path) {
    let r = gpoints::PointRef {
        host: k.0.clone(),
        disk: k.1.clone(),
        time: Some(k.2),
    };
    let (ia, ib) = (scratch.join("a.qcow2"), scratch.join("b.qcow2"));
    for (root, img) in [(a, &ia), (b, &ib)] {
        let cat = store::load(root).unwrap();
        gpoints::restore(root, &cat, &r, img)
            .unwrap_or_else(|e| panic!("restore {k:?} from {}: {e}", root.display()));
    }
    assert!(
        georep::catalog::qcow::same_content(&ia, &ib).unwrap(),
        "point {k:?} differs between {} and {}",
        a.display(),
        b.display()
    );
}

/// A store's tree without the lock directory (the reverse session locks
/// the points it reads there, as the lock protocol has it).
fn store_files(root: &Path) -> common::dr::Tree {
    let mut t = dr::snap(root);
    t.retain(|p, _| !p.starts_with(b".georep-locks"));
    t
}

/// B's store is as it was: every entry, by content and metadata (not by
/// its allocation, which delayed allocation may still change).
fn assert_unchanged(before: &common::dr::Tree, after: &common::dr::Tree) {
    let mut diff = Vec::new();
    for (p, s) in before {
        match after.get(p) {
            Some(a) if dr::version(a) == dr::version(s) => {}
            a => diff.push(format!("{}: {s:?} -> {a:?}", String::from_utf8_lossy(p))),
        }
    }
    for p in after.keys().filter(|p| !before.contains_key(*p)) {
        diff.push(format!("{}: new", String::from_utf8_lossy(p)));
    }
    assert!(diff.is_empty(), "the failback changed B: {diff:#?}");
}

fn verifies(root: &Path) {
    let problems = gpoints::verify(root).unwrap();
    assert!(problems.is_empty(), "{}: {problems:#?}", root.display());
}

fn quarantine_data(w: &World, root: &Path) -> (Value, std::path::PathBuf) {
    let qs = dr::quarantines(w, root);
    assert_eq!(qs.len(), 1, "one quarantine: {qs:#?}");
    let id = qs[0]["id"].as_str().unwrap().to_string();
    let data = root.join(".georep-quarantine").join(&id).join("data");
    (qs[0].clone(), data)
}

#[test]
fn store_failback_quarantines_the_old_masters_divergence_then_ships_only_the_new_masters_points() {
    let w = World::new();
    let (a, b) = (w.master.clone(), w.slave.clone());
    common::catalog::sample(&w, &[]);
    w.create("s1", &["--mode", "continuous"]);
    w.sync("s1");
    advance(&w, &a, "cdp", "2");
    advance(&w, &a, "snapshot", "3");
    w.sync("s1");
    let replicated = point_keys(&b);
    // Site A lives on after the last sync (its points are lost to B) ...
    advance(&w, &a, "cdp", "4");
    advance(&w, &a, "snapshot", "5");
    advance(&w, &a, "cdp", "6");
    let a_before = point_keys(&a);
    // Points after each disk's newest replicated one (older ones B never
    // held are history: B's first sync took the newest point only).
    let common_newest = newest(&replicated);
    let divergent: BTreeSet<Key> = a_before
        .iter()
        .filter(|k| k.2 > common_newest[&(k.0.clone(), k.1.clone())])
        .cloned()
        .collect();
    assert!(!divergent.is_empty());
    let a_copy = copy_of(&w, &a);
    // ... and is lost: B is promoted and takes new points.
    let report = dr::promote(&w, &b);
    assert_eq!(report["layout"], "store", "{report:#}");
    advance(&w, &b, "cdp", "7");
    advance(&w, &b, "snapshot", "8");
    advance(&w, &b, "cdp", "9");
    let b_points = point_keys(&b);
    let b_tree = store_files(&b);
    // The old session is fenced on both sides.
    let out = w.run(&["sync", "s1"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("was promoted at"), "{}", stderr(&out));

    // Failback, killed at several moments, then run to its end.
    let (bs, as_) = (b.to_str().unwrap(), a.to_str().unwrap());
    w.run_ok(&[
        "create",
        "back",
        bs,
        as_,
        "--failback",
        "--mode",
        "continuous",
    ]);
    for ms in [150, 400, 900] {
        dr::kill_after(&w, &["sync", "back"], ms);
        verifies(&b);
    }
    let s = w.sync("back");
    assert!(s["complete"].as_bool().unwrap(), "{s:#}");
    let again = w.sync("back");
    assert_eq!(
        n(&again["catalog"], "generations_published") + n(&again["catalog"], "cdp_points"),
        0,
        "a second sync finds nothing to do: {again:#}"
    );

    // B is untouched by the failback, byte for byte.
    assert!(
        store_files(&b) == b_tree,
        "the failback changed the new master"
    );
    // A holds every point of B, with B's content.
    verifies(&a);
    let a_after = point_keys(&a);
    let missing: Vec<_> = b_points.difference(&a_after).collect();
    assert!(missing.is_empty(), "points of B missing on A: {missing:?}");
    let scratch = tempfile::tempdir_in(w.dir.path()).unwrap();
    let b_new: Vec<&Key> = b_points.difference(&replicated).collect();
    assert!(!b_new.is_empty());
    for k in b_new.iter().copied().chain(replicated.iter().take(3)) {
        same_content(&b, &a, k, scratch.path());
    }
    // What A holds beyond B is history older than each disk's common point:
    // none of A's divergent points is left outside the quarantine.
    for k in a_after.difference(&b_points) {
        let c = common_newest[&(k.0.clone(), k.1.clone())];
        assert!(
            k.2 <= c,
            "A holds {k:?}, newer than its common point {c}, outside the quarantine"
        );
    }
    // The quarantine is a store holding every divergent point, with A's content.
    let (q, data) = quarantine_data(&w, &a);
    assert!(
        q["items"].as_array().is_some_and(|i| !i.is_empty()),
        "{q:#}"
    );
    verifies(&data);
    let held = point_keys(&data);
    let lost: Vec<_> = divergent.difference(&held).collect();
    assert!(
        lost.is_empty(),
        "divergent points not in the quarantine: {lost:?}"
    );
    for k in &divergent {
        same_content(&a_copy, &data, k, scratch.path());
    }
    // Only B's new data crossed: every point of A it already had stays.
    let b_size = dr::snap(&b)
        .values()
        .map(|e| match e.node {
            common::tree::Node::File { len, .. } => len,
            _ => 0,
        })
        .sum::<u64>();
    let out = n(&s, "wire_bytes_out");
    eprintln!("failback: {out} bytes out for a store of {b_size} bytes");
    assert!(
        out < b_size / 2,
        "{out} bytes sent for a {b_size}-byte store"
    );
    // The quarantine lists what was changed in the store.
    let shown = w.run_ok(&[
        "quarantine",
        "show",
        as_,
        q["id"].as_str().unwrap(),
        "--json",
    ]);
    let m: Value = serde_json::from_slice(&shown.stdout).unwrap();
    let reasons: BTreeSet<&str> = m["store"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["reason"].as_str().unwrap())
        .collect();
    assert!(reasons.contains("divergent"), "{m:#}");
    assert!(
        reasons.contains("divergent points"),
        "A's journal went on after the common point: {m:#}"
    );
    // A journal point kind survives in the quarantine as a journal point.
    assert!(points(&data).iter().any(|p| p.kind == PointKind::Cdp));
}

#[test]
fn a_store_switches_over_and_back_with_no_loss() {
    let w = World::new();
    let (a, b) = (w.master.clone(), w.slave.clone());
    common::catalog::sample(&w, &[]);
    w.create("s1", &["--mode", "continuous"]);
    w.sync("s1");
    advance(&w, &a, "cdp", "2");
    let a_points = point_keys(&a);
    // Killed at random moments first (printed, to replay one), then run to its end.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    for i in 0..3u64 {
        let ms = (nanos / (i + 1)) % 1500;
        eprintln!("switchover killed after {ms} ms");
        dr::kill_after(
            &w,
            &["switchover", "s1", "--reverse", "back", "--force"],
            ms,
        );
    }
    w.run_ok(&["switchover", "s1", "--reverse", "back", "--force"]);
    let b_points = point_keys(&b);
    assert!(b_points.is_subset(&a_points));
    assert_eq!(
        newest(&b_points),
        newest(&a_points),
        "RPO 0: B has A's newest points"
    );
    // The reverse session's first sync sets A's history aside, changes nothing else.
    let s = w.sync("back");
    assert!(s["complete"].as_bool().unwrap(), "{s:#}");
    verifies(&a);
    let (q, data) = quarantine_data(&w, &a);
    let m: Value = serde_json::from_slice(
        &w.run_ok(&[
            "quarantine",
            "show",
            a.to_str().unwrap(),
            q["id"].as_str().unwrap(),
            "--json",
        ])
        .stdout,
    )
    .unwrap();
    let acts = m["store"].as_array().expect("A's history B never held");
    assert!(!acts.is_empty());
    for act in acts {
        assert_eq!(act["reason"], "absent", "nothing diverged: {m:#}");
    }
    let a_now = point_keys(&a);
    assert!(b_points.is_subset(&a_now));
    let held = point_keys(&data);
    let gone: Vec<_> = a_points
        .iter()
        .filter(|k| !a_now.contains(*k) && !held.contains(*k))
        .collect();
    assert!(
        gone.is_empty(),
        "points of A neither kept nor quarantined: {gone:?}"
    );
    // B lives on; A follows; then back to A.
    advance(&w, &b, "cdp", "3");
    advance(&w, &b, "snapshot", "4");
    w.sync("back");
    let b_points = point_keys(&b);
    assert!(b_points.is_subset(&point_keys(&a)));
    w.run_ok(&["switchover", "back", "--reverse", "again", "--force"]);
    let s = w.sync("again");
    assert!(s["complete"].as_bool().unwrap(), "{s:#}");
    verifies(&b);
    let out = w.run(&["sync", "s1"]);
    assert_ne!(out.status.code(), Some(0), "the first session is fenced");
    advance(&w, &a, "cdp", "5");
    w.sync("again");
    let a_points = point_keys(&a);
    let b_now = point_keys(&b);
    assert_eq!(newest(&a_points), newest(&b_now), "B follows A again");
    let scratch = tempfile::tempdir_in(w.dir.path()).unwrap();
    for k in newest(&a_points).into_iter().map(|((h, d), t)| (h, d, t)) {
        same_content(&a, &b, &k, scratch.path());
    }
}

/// One site of the SSH switchover: its store, its georep home and the sshd
/// that stands for its host.
struct Site {
    root: std::path::PathBuf,
    home: std::path::PathBuf,
    sshd: common::sshd::Sshd,
}

impl Site {
    fn run(&self, w: &World, args: &[&str]) -> std::process::Output {
        w.cmd(args).env("GEOREP_HOME", &self.home).output().unwrap()
    }
}

#[test]
fn a_store_switches_over_ssh_there_and_back_twice() {
    let w = World::new();
    let home_b = w.dir.path().join("home-b");
    std::fs::create_dir_all(&home_b).unwrap();
    std::fs::create_dir_all(&w.slave).unwrap();
    let a = Site {
        root: w.master.clone(),
        home: w.home.clone(),
        sshd: common::sshd::Sshd::start_with_env(&[("GEOREP_HOME", &w.home)]),
    };
    let b = Site {
        root: w.slave.clone(),
        home: home_b.clone(),
        sshd: common::sshd::Sshd::start_with_env(&[("GEOREP_HOME", &home_b)]),
    };
    common::catalog::sample(&w, &[]);
    w.create_ssh(&b.sshd, "s0", &["--mode", "continuous"]);
    w.sync("s0");
    let sites = [&a, &b];
    let mut session = "s0".to_string();
    for round in 1..=4usize {
        let (here, there) = (sites[(round + 1) % 2], sites[round % 2]);
        advance(&w, &here.root, "cdp", &format!("{}", 10 + round));
        let all = point_keys(&here.root);
        let next = format!("s{round}");
        let args: Vec<String> = [
            "switchover",
            &session,
            "--reverse",
            &next,
            "--force",
            "--identity",
            there.sshd.operator_key.to_str().unwrap(),
            "--reverse-slave",
            &here.sshd.spec(&here.root),
            "--push-pem",
            "--reverse-ssh-port",
            &here.sshd.port.to_string(),
            "--reverse-identity",
            here.sshd.operator_key.to_str().unwrap(),
            "--peer-admin",
            &format!("{}@127.0.0.1", there.sshd.user),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = here.run(&w, &args);
        assert!(out.status.success(), "round {round}: {}", stderr(&out));
        // RPO 0: the new master has the old one's newest points, same content.
        let (h, t) = (point_keys(&here.root), point_keys(&there.root));
        assert_eq!(newest(&h), newest(&t), "round {round}");
        let scratch = tempfile::tempdir_in(w.dir.path()).unwrap();
        for ((host, disk), time) in newest(&h) {
            same_content(&here.root, &there.root, &(host, disk, time), scratch.path());
        }
        assert!(georep::fs::role::read(&there.root)
            .unwrap()
            .unwrap()
            .is_live());
        let old = here.run(&w, &["sync", &session]);
        assert_eq!(
            old.status.code(),
            Some(4),
            "round {round}: {}",
            stderr(&old)
        );
        // The reverse session, on the other site, sets aside only history.
        let out = there.run(&w, &["sync", &next, "--json"]);
        assert!(out.status.success(), "round {round}: {}", stderr(&out));
        verifies(&here.root);
        // One quarantine per reverse session there: this round's is the newest.
        let qs = dr::quarantines(&w, &here.root);
        assert_eq!(qs.len(), round.div_ceil(2), "round {round}: {qs:#?}");
        if let Some(q) = qs.last() {
            let id = q["id"].as_str().unwrap();
            let shown = w.run_ok(&[
                "quarantine",
                "show",
                here.root.to_str().unwrap(),
                id,
                "--json",
            ]);
            let m: Value = serde_json::from_slice(&shown.stdout).unwrap();
            for act in m["store"].as_array().into_iter().flatten() {
                assert_eq!(act["reason"], "absent", "round {round}: {m:#}");
            }
        }
        let kept: BTreeSet<Key> = point_keys(&here.root)
            .into_iter()
            .chain(dr::quarantines(&w, &here.root).iter().flat_map(|q| {
                point_keys(
                    &here
                        .root
                        .join(".georep-quarantine")
                        .join(q["id"].as_str().unwrap())
                        .join("data"),
                )
            }))
            .collect();
        let lost: Vec<_> = all.iter().filter(|k| !kept.contains(*k)).collect();
        assert!(
            lost.is_empty(),
            "round {round}: points lost on the old master: {lost:?}"
        );
        session = next;
    }
}

/// One activity of the appliance, as `sample-store --advance --only` has them.
#[derive(Debug, Clone, Copy)]
enum Act {
    Cdp,
    Snapshot,
    Reclaim,
    Retention,
}

impl Act {
    fn name(self) -> &'static str {
        match self {
            Act::Cdp => "cdp",
            Act::Snapshot => "snapshot",
            Act::Reclaim => "reclaim",
            Act::Retention => "retention",
        }
    }
}

#[derive(Debug, Clone)]
struct Drill {
    continuous: bool,
    rounds: Vec<Vec<Act>>,
    lost: Vec<Act>,
    kill_ms: u64,
    /// On A after it was cut off (no retention: see docs/disaster-recovery.md, limits).
    divergent: Vec<Act>,
    on_b: Vec<Act>,
    /// The failback killed this many ms into its first run, then run again.
    failback_kill_ms: Option<u64>,
}

fn act_all(w: &World, root: &Path, acts: &[Act], seed: &mut u64) {
    for a in acts {
        *seed += 1;
        advance(w, root, a.name(), &seed.to_string());
    }
}

fn store_drill(c: &Drill) {
    let w = World::new();
    let (a, b) = (w.master.clone(), w.slave.clone());
    let mode = if c.continuous {
        "continuous"
    } else {
        "interval"
    };
    common::catalog::sample(&w, &[]);
    w.create("s1", &["--mode", mode]);
    w.sync("s1");
    let mut seed = 100;
    for r in &c.rounds {
        act_all(&w, &a, r, &mut seed);
        w.sync("s1");
    }
    // A is lost in the middle of a sync, and goes on without B.
    act_all(&w, &a, &c.lost, &mut seed);
    dr::kill_after(&w, &["sync", "s1"], c.kill_ms);
    act_all(&w, &a, &c.divergent, &mut seed);
    dr::promote(&w, &b);
    verifies(&b);
    let b_promote = store_files(&b);
    act_all(&w, &b, &c.on_b, &mut seed);
    let b_final = store_files(&b);
    let b_points = point_keys(&b);
    let a_before = point_keys(&a);
    let a_copy = copy_of(&w, &a);
    // Each disk's last common point: the newest point both hold.
    let mut common_point: BTreeMap<(String, String), u64> = BTreeMap::new();
    for k in a_before.intersection(&b_points) {
        let e = common_point.entry((k.0.clone(), k.1.clone())).or_insert(0);
        *e = (*e).max(k.2);
    }

    let (bs, as_) = (b.to_str().unwrap(), a.to_str().unwrap());
    w.run_ok(&["create", "back", bs, as_, "--failback", "--mode", mode]);
    let killed = c
        .failback_kill_ms
        .is_some_and(|ms| dr::kill_after(&w, &["sync", "back"], ms));
    // The killed worker's agent ends its step and exits (it reads EOF).
    let t0 = std::time::Instant::now();
    while !common::daemon::agent_pids(&a).is_empty() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "the killed failback's agent still runs after 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let s = w.sync("back");
    assert!(s["complete"].as_bool().unwrap(), "{s:#}");

    // B unchanged; A holds B's points with B's content.
    assert_unchanged(&b_final, &store_files(&b));
    verifies(&a);
    let a_after = point_keys(&a);
    let scratch = tempfile::tempdir_in(w.dir.path()).unwrap();
    if c.continuous {
        // Every point of B after the common one reached A. (A disk with no
        // common point, e.g. B's retention deleted it since the promote,
        // starts over as on a first sync: B's newest point, checked below.)
        for k in &b_points {
            let Some(&c) = common_point.get(&(k.0.clone(), k.1.clone())) else {
                continue;
            };
            assert!(
                k.2 <= c || a_after.contains(k),
                "B's point {k:?} did not reach A"
            );
        }
    }
    for ((h, d), t) in newest(&b_points) {
        let k = (h, d, t);
        assert!(a_after.contains(&k), "B's newest point {k:?} is not on A");
        same_content(&b, &a, &k, scratch.path());
    }
    // Outside the quarantine A holds nothing after a common point but B's.
    for k in a_after.difference(&b_points) {
        let c = common_point
            .get(&(k.0.clone(), k.1.clone()))
            .copied()
            .unwrap_or(0);
        assert!(
            k.2 <= c,
            "A holds {k:?} after its common point {c}, not B's"
        );
    }
    // Nothing of A lost: each of its points is on A still or in the quarantine,
    // and those after the common point are there with A's content.
    let (_, data) = quarantine_data(&w, &a);
    verifies(&data);
    let held = point_keys(&data);
    for k in &a_before {
        assert!(
            a_after.contains(k) || held.contains(k),
            "A's point {k:?} was lost"
        );
        let c = common_point
            .get(&(k.0.clone(), k.1.clone()))
            .copied()
            .unwrap_or(0);
        if k.2 > c {
            assert!(
                held.contains(k),
                "A's divergent point {k:?} is not in the quarantine"
            );
        }
    }
    for ((h, d), t) in newest(&held) {
        same_content(&a_copy, &data, &(h, d, t), scratch.path());
    }
    // Only B's changes travelled (journals counted whole: an upper bound).
    let must = dr::differing_bytes(&b_promote, &b_final);
    let out = n(&s, "wire_bytes_out");
    assert!(
        killed || out as f64 <= 1.1 * must as f64 + 256.0 * 1024.0,
        "failback sent {out} bytes for {must} bytes changed on B: {s:#}"
    );
    let again = w.sync("back");
    assert_eq!(
        n(&again["catalog"], "generations_published") + n(&again["catalog"], "cdp_points"),
        0,
        "{again:#}"
    );
    let old = w.run(&["sync", "s1"]);
    assert_eq!(old.status.code(), Some(4), "{}", stderr(&old));
}

fn acts(
    lo: usize,
    hi: usize,
    retention: bool,
) -> impl proptest::strategy::Strategy<Value = Vec<Act>> {
    use proptest::prelude::*;
    let one = if retention {
        prop_oneof![
            3 => Just(Act::Cdp),
            2 => Just(Act::Snapshot),
            1 => Just(Act::Reclaim),
            1 => Just(Act::Retention),
        ]
        .boxed()
    } else {
        prop_oneof![3 => Just(Act::Cdp), 2 => Just(Act::Snapshot), 1 => Just(Act::Reclaim)].boxed()
    };
    prop::collection::vec(one, lo..hi)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: std::env::var("GEOREP_STORE_DRILL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3),
        max_shrink_iters: 20,
        failure_persistence: None,
        .. proptest::prelude::ProptestConfig::default()
    })]

    /// The disaster drill of a store: random appliance activity with syncs,
    /// A lost in the middle of one, random divergence on A and activity on
    /// B, failback.
    #[test]
    fn store_disaster_drill(
        continuous in proptest::prelude::any::<bool>(),
        rounds in proptest::collection::vec(acts(1, 4, true), 0..3),
        lost in acts(1, 3, true),
        kill_ms in 0..600u64,
        divergent in acts(0, 4, false),
        on_b in acts(0, 4, true),
        failback_kill_ms in proptest::option::of(0..1500u64),
    ) {
        store_drill(&Drill { continuous, rounds, lost, kill_ms, divergent, on_b, failback_kill_ms });
    }
}
