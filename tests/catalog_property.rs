//! Property: random appliance activity (host snapshots across several
//! disks, CDP appends with torn tails, reclamation splits, retention
//! deletes) interleaved with syncs and with syncs killed (SIGKILL of the
//! worker and its agent) at random moments. After every sync, and after
//! every kill: every host snapshot on the slave is complete and its records
//! verify against the data, every image passes `qemu-img check`, no point
//! is held twice; after every sync the replicated points restore to the
//! same bytes as on the master, and (continuous mode) no master point
//! inside the replicated range is missing and each disk's newest master
//! point arrived, (interval mode) the newest point is there.
//! `GEOREP_CATALOG_CASES` sets the number of cases.

mod common;

use common::catalog as cat;
use common::World;
use georep::catalog::sample::Appliance;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::time::Duration;

/// One step of the story. Host 0 keeps qcow images only, host 1 has journals.
#[derive(Debug, Clone)]
enum Act {
    Snapshot(usize),
    /// Points appended to host 1's journals; with a torn record after them.
    Cdp(usize, bool),
    /// Reclamation on host 1: of every disk or one; of the newest snapshot
    /// late in its journal (likely past the slave's last point), or anywhere.
    Reclaim {
        all: bool,
        newest: bool,
    },
    Retention(usize),
    Sync,
    /// A sync killed (worker and agent, SIGKILL) after this many ms.
    Kill(u64),
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        2 => (0..2usize).prop_map(Act::Snapshot),
        3 => (1..8usize, any::<bool>()).prop_map(|(n, p)| Act::Cdp(n, p)),
        2 => (any::<bool>(), any::<bool>()).prop_map(|(all, newest)| Act::Reclaim { all, newest }),
        1 => (0..2usize).prop_map(Act::Retention),
        3 => Just(Act::Sync),
        2 => (0..900u64).prop_map(Act::Kill),
    ]
}

fn host(i: usize) -> String {
    format!("host{:02}", i + 1)
}

fn killed_sync(w: &World, delay_ms: u64) {
    let mut child = w
        .cmd(&["sync", "c"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(delay_ms));
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    child.wait().unwrap();
}

/// Continuous mode: between the oldest and the newest point the slave has
/// of a disk, it has every point the master has.
fn nothing_skipped(w: &World) {
    let m = cat::keyed(&cat::points(&w.master));
    let s = cat::keyed(&cat::points(&w.slave));
    let mut range: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for k in s.keys() {
        let r = range
            .entry((k.0.clone(), k.1.clone()))
            .or_insert((k.2, k.2));
        r.0 = r.0.min(k.2);
        r.1 = r.1.max(k.2);
    }
    for k in m.keys() {
        if let Some(&(lo, hi)) = range.get(&(k.0.clone(), k.1.clone())) {
            assert!(
                k.2 < lo || k.2 > hi || s.contains_key(k),
                "master point {}/{}@{} inside the replicated range is missing on the slave",
                k.0,
                k.1,
                k.2
            );
        }
    }
}

/// Continuous mode: a sync replicates every point up to the newest, so
/// each disk's newest master point is on the slave (a stalled replica,
/// one that stops short of the newest, fails here).
fn newest_arrived(w: &World) {
    let m = cat::keyed(&cat::points(&w.master));
    let s = cat::keyed(&cat::points(&w.slave));
    let mut newest: BTreeMap<(String, String), u64> = BTreeMap::new();
    for k in m.keys() {
        let t = newest.entry((k.0.clone(), k.1.clone())).or_insert(k.2);
        *t = (*t).max(k.2);
    }
    assert!(!newest.is_empty(), "the master has no point");
    for ((h, d), t) in newest {
        assert!(
            s.contains_key(&(h.clone(), d.clone(), t)),
            "the newest master point {h}/{d}@{t} did not arrive on the slave"
        );
    }
}

/// Interval mode: each host's newest complete point is on the slave.
fn newest_there(w: &World) {
    let m = georep::catalog::store::load(&w.master).unwrap();
    for (name, h) in &m.hosts {
        let t = georep::catalog::points::newest_complete(h).unwrap();
        let gens: BTreeSet<u64> = cat::generations(&w.slave, name).into_iter().collect();
        assert!(
            gens.contains(&t),
            "{name}: newest point {t} missing on the slave ({gens:?})"
        );
    }
}

fn run_case(continuous: bool, seed: u64, acts: &[Act]) {
    let w = World::new();
    cat::sample(&w, &["--hosts", "2", "--seed", &seed.to_string()]);
    w.create(
        "c",
        &["--mode", if continuous { "continuous" } else { "interval" }],
    );
    let tmp = tempfile::tempdir_in(&w.dir).unwrap();
    let mut a = Appliance::open(&w.master, seed).unwrap();
    let totals = std::cell::RefCell::new(BTreeMap::<String, u64>::new());
    let check_sync = |w: &World| {
        let m = georep::catalog::store::load(&w.master).unwrap();
        for h in m.hosts.values() {
            assert!(
                h.problems.is_empty(),
                "the appliance model broke its store: {:?}",
                h.problems
            );
        }
        let s = w.sync("c");
        for (k, v) in s["catalog"].as_object().unwrap() {
            if let Some(n) = v.as_u64() {
                *totals.borrow_mut().entry(k.clone()).or_default() += n;
            }
        }
        assert_eq!(common::n(&s, "failures"), 0, "{s}");
        cat::replica_consistent(&w.master, &w.slave);
        cat::same_points(&w.master, &w.slave, 3, tmp.path());
        if continuous {
            nothing_skipped(w);
            newest_arrived(w);
        } else {
            newest_there(w);
        }
        s
    };
    check_sync(&w);
    for x in acts {
        match x {
            Act::Snapshot(h) => {
                a.snapshot(&host(*h)).unwrap();
            }
            Act::Cdp(n, partial) => {
                a.cdp_append(&host(1), *n, *partial).unwrap();
            }
            Act::Reclaim { all, newest } => {
                if *newest {
                    a.reclaim_newest(&host(1), *all, 0.75).unwrap();
                } else {
                    a.reclaim(&host(1), *all).unwrap();
                }
            }
            Act::Retention(h) => {
                a.retention(&host(*h)).unwrap();
            }
            Act::Sync => {
                check_sync(&w);
            }
            Act::Kill(ms) => {
                killed_sync(&w, *ms);
                // Killed anywhere: still nothing partial visible.
                cat::replica_consistent(&w.master, &w.slave);
            }
        }
    }
    check_sync(&w);
    // Converged: a quiet sync ships nothing.
    let s = check_sync(&w);
    assert_eq!(common::n(&s, "bytes_sent"), 0, "{s}");
    assert_eq!(s["catalog"]["generations_published"], 0, "{s}");
    eprintln!(
        "case continuous={continuous} seed={seed} {acts:?}: {:?}",
        totals.borrow()
    );
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("GEOREP_CATALOG_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2),
        max_shrink_iters: 8,
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    #[test]
    fn replica_stays_restorable_through_appliance_activity_and_kills(
        continuous in any::<bool>(),
        seed in 1..1000u64,
        acts in prop::collection::vec(act(), 6..14),
    ) {
        run_case(continuous, seed, &acts);
    }
}
