//! Topologies a DR design uses: fan-out (one master, two sessions, two
//! slaves) and a cascade (A -> B -> C: B's replica is the master of a
//! second session). Real daemons with their watchers, real file systems.

mod common;

use common::daemon::wait_same;
use common::{mutate, tree, World};
use proptest::strategy::{Strategy, ValueTree};
use std::time::Duration;

fn stime_attrs(p: &std::path::Path) -> Vec<String> {
    xattr::list(p)
        .unwrap()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".stime"))
        .collect()
}

fn mutate_rounds(master: &std::path::Path, seed: u64, rounds: usize, mut check: impl FnMut(usize)) {
    let mut runner = proptest::test_runner::TestRunner::new_with_rng(
        Default::default(),
        proptest::test_runner::TestRng::from_seed(
            proptest::test_runner::RngAlgorithm::ChaCha,
            &[seed as u8; 32],
        ),
    );
    let ops = proptest::collection::vec(mutate::op(), 20);
    for round in 0..rounds {
        for op in ops.new_tree(&mut runner).unwrap().current() {
            mutate::apply(master, &op);
        }
        check(round);
    }
}

#[test]
fn fan_out_two_sessions_two_slaves_each_with_its_own_stimes_neither_triggering_the_other() {
    let w = World::new();
    let slave2 = w.dir.path().join("slave2");
    for i in 0..20 {
        let d = w.master.join(format!("h{}", i % 4));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join(format!("f{i}")),
            mutate::data(i, 3000 + 100 * i as usize),
        )
        .unwrap();
    }
    w.create("one", &[]);
    w.run_ok(&[
        "create",
        "two",
        w.master.to_str().unwrap(),
        slave2.to_str().unwrap(),
    ]);
    let _a = w.start("one");
    let _b = w.start("two");
    w.wait_active("one");
    w.wait_active("two");
    wait_same(&w.master, &w.slave, "slave one");
    wait_same(&w.master, &slave2, "slave two");
    mutate_rounds(&w.master, 7, 2, |round| {
        wait_same(&w.master, &w.slave, &format!("slave one, round {round}"));
        wait_same(&w.master, &slave2, &format!("slave two, round {round}"));
    });
    // Each session keeps its own stime on the master directories.
    let st = stime_attrs(&w.master);
    assert_eq!(st.len(), 2, "one stime per session on the root: {st:?}");
    // Quiet: neither session's stimes or stamps trigger crawls of the other.
    w.wait_active("one");
    w.wait_active("two");
    let crawls = |s: &str| w.log(s).matches("crawl done").count();
    let before = (crawls("one"), crawls("two"));
    std::thread::sleep(Duration::from_secs(4));
    let after = (crawls("one"), crawls("two"));
    assert!(
        after.0 <= before.0 + 1 && after.1 <= before.1 + 1,
        "crawls on a quiet master: {before:?} -> {after:?}"
    );
    for s in ["one", "two"] {
        assert_eq!(w.status(s)["restarts"], 0);
    }
}

#[test]
fn a_cascade_a_to_b_to_c_makes_c_equal_a() {
    let w = World::new();
    let c = w.dir.path().join("c");
    for i in 0..15 {
        let d = w.master.join(format!("vm{}/disk", i % 3));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join(format!("p{i}.qcow2")),
            mutate::data(i + 50, 5000 * (i as usize + 1)),
        )
        .unwrap();
    }
    // A -> B (w.slave), then B -> C: B's replica is the master of the second session.
    w.create("ab", &[]);
    w.sync("ab");
    w.run_ok(&[
        "create",
        "bc",
        w.slave.to_str().unwrap(),
        c.to_str().unwrap(),
    ]);
    w.sync("bc");
    tree::assert_same(&w.master, &c);
    mutate_rounds(&w.master, 3, 3, |round| {
        let s = w.sync("ab");
        assert_eq!(common::n(&s, "failures"), 0, "round {round}: {s}");
        tree::assert_same(&w.master, &w.slave);
        let s = w.sync("bc");
        assert_eq!(common::n(&s, "failures"), 0, "round {round}: {s}");
        tree::assert_same(&w.master, &c);
    });
    // Converged along the chain: nothing more to send on either hop.
    for s in ["ab", "bc"] {
        let r = w.sync(s);
        assert_eq!(common::n(&r, "bytes_sent"), 0, "{s}: {r}");
    }
}

#[test]
fn a_cascade_of_two_daemons_a_to_b_to_c_makes_c_equal_a() {
    let w = World::new();
    let c = w.dir.path().join("c");
    for i in 0..15 {
        let d = w.master.join(format!("vm{}/disk", i % 3));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join(format!("p{i}.qcow2")),
            mutate::data(i + 70, 4000 * (i as usize + 1)),
        )
        .unwrap();
    }
    // B (w.slave) is the slave root of "ab" (its agent holds it for as long
    // as the daemon runs) and the master root of "bc" (its watcher stamps it).
    w.create("ab", &[]);
    std::fs::create_dir_all(&w.slave).unwrap();
    w.run_ok(&[
        "create",
        "bc",
        w.slave.to_str().unwrap(),
        c.to_str().unwrap(),
    ]);
    let _ab = w.start("ab");
    let _bc = w.start("bc");
    wait_same(&w.master, &w.slave, "B after the first sync");
    wait_same(&w.master, &c, "C after the first sync");
    mutate_rounds(&w.master, 11, 3, |round| {
        wait_same(&w.master, &w.slave, &format!("B, round {round}"));
        wait_same(&w.master, &c, &format!("C, round {round}"));
    });
    // Neither daemon was ever restarted ("bc" may have retried files that
    // "ab" replaced while it read them: B is a live master).
    for s in ["ab", "bc"] {
        let st = w.wait_active(s);
        assert_eq!(st["restarts"], 0, "{s}: {st:#}");
    }
    // A stamp on B while its agent runs (it used to wait for the agent's lock forever).
    let mut mark = w
        .cmd(&["mark", w.slave.join("vm0").to_str().unwrap()])
        .spawn()
        .unwrap();
    let done = common::daemon::wait_for("georep mark on B", || mark.try_wait().unwrap());
    if done.is_none() {
        let _ = mark.kill();
        panic!("georep mark on B never returned: it waits for the agent's lock");
    }
    assert!(done.unwrap().success());
    std::fs::write(w.master.join("vm0/last"), b"last").unwrap();
    wait_same(&w.master, &c, "C after a last change");
}
