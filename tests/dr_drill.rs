//! The disaster drill, a property test over random activity: site A
//! replicates to B; A is lost at a random moment (the worker SIGKILLed in
//! the middle of a sync) and goes on diverging; B is promoted and lives on;
//! then B fails back onto A. After it: B's data is unchanged by the
//! failback; A equals B outside the quarantine; the quarantine holds A's
//! divergent and conflicting versions byte for byte and nothing that B
//! keeps anyway; nothing of A's is lost; the failback sent no more than the
//! data that differs (by delta, never a resend). Local and SSH slaves.

mod common;

use common::dr::{self, Tree};
use common::sshd::Sshd;
use common::tree::Node;
use common::{mutate, n, World};
use proptest::prelude::*;
use std::path::Path;

fn apply_marked(root: &Path, ops: &[mutate::Op], mark: bool) {
    for op in ops {
        for p in mutate::apply(root, op) {
            if mark {
                common::mark(&p);
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Case {
    initial: Vec<mutate::Op>,
    rounds: Vec<Vec<mutate::Op>>,
    lost: Vec<mutate::Op>,
    kill_ms: u64,
    divergent: Vec<mutate::Op>,
    on_b: Vec<mutate::Op>,
    mark_b: bool,
}

fn drill(c: &Case, sshd: Option<&Sshd>) {
    let w = World::new();
    let (a, b) = (w.master.clone(), w.slave.clone());
    match sshd {
        None => w.create("s1", &["--marker", "mark"]),
        Some(s) => {
            w.create_ssh(s, "s1", &["--marker", "mark"]);
        }
    }
    apply_marked(&a, &c.initial, true);
    w.sync("s1");
    for r in &c.rounds {
        apply_marked(&a, r, true);
        w.sync("s1");
    }
    // A is lost in the middle of a sync.
    apply_marked(&a, &c.lost, true);
    dr::kill_after(&w, &["sync", "s1"], c.kill_ms);
    // A goes on without B (it was cut off, not destroyed).
    apply_marked(&a, &c.divergent, true);

    let report = dr::promote(&w, &b);
    assert_eq!(report["already"], false, "{report}");
    assert_eq!(report["epoch"], 1, "{report}");
    assert!(
        common::tree::temporaries(&b).is_empty(),
        "promote left temporaries"
    );
    let b_promote = dr::snap(&b);
    apply_marked(&b, &c.on_b, c.mark_b);
    let b_final = dr::snap(&b);
    let a_before = dr::snap(&a);

    // Fail back from B onto A.
    let b_str = b.to_str().unwrap();
    match sshd {
        None => {
            w.run_ok(&["create", "back", b_str, a.to_str().unwrap(), "--failback"]);
        }
        Some(s) => {
            let mut args = common::sshd::create_args(s, "back", &b, &a);
            args.push("--failback".into());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            w.run_ok(&args);
        }
    }
    let s = w.sync("back");
    assert_eq!(s["crawl"], "full", "{s}");

    // B's data unchanged by the failback; A equals B outside the quarantine.
    dr::assert_same_versions(&b_final, &dr::snap(&b), "B changed by the failback");
    common::tree::assert_same(&b, &a);

    // The quarantine: A's versions, byte for byte, none that B keeps anyway.
    let qs = dr::quarantines(&w, &a);
    assert_eq!(qs.len(), 1, "{qs:?}");
    let q = &qs[0];
    let id = q["id"].as_str().unwrap();
    let data = a.join(".georep-quarantine").join(id).join("data");
    let held: Tree = dr::snap(&data);
    let mut in_q = std::collections::BTreeSet::new();
    for item in q["items"].as_array().unwrap() {
        let p = dr::item_path(item);
        let mine = a_before.get(&p);
        assert!(
            dr::same_version(mine, held.get(&p)),
            "quarantine holds {} not as A had it: {:?} vs {:?}",
            String::from_utf8_lossy(&p),
            mine.map(dr::version),
            held.get(&p).map(dr::version)
        );
        assert!(
            !dr::same_version(mine, b_final.get(&p)),
            "quarantined {} although B keeps the same version",
            String::from_utf8_lossy(&p)
        );
        if item["reason"] == "divergent" {
            assert!(
                !dr::same_version(mine, b_promote.get(&p)) || !b_final.contains_key(&p),
                "{} is the common version, not A's divergence",
                String::from_utf8_lossy(&p)
            );
        } else {
            assert_eq!(item["reason"], "conflict");
            assert!(b_final.contains_key(&p));
        }
        in_q.insert(p);
    }
    // Nothing of A's lost: every version A had that is neither the common
    // one (B at promote) nor B's is in the quarantine.
    for (p, s) in &a_before {
        // Directories count when empty (their content is checked entry by entry).
        let keep = match &s.node {
            Node::Dir => {
                let mut prefix = p.clone();
                prefix.push(b'/');
                !a_before.keys().any(|k| k.starts_with(&prefix))
                    && !b_final.get(p).is_some_and(|b| b.node == Node::Dir)
            }
            _ => true,
        };
        if keep
            && !dr::same_version(Some(s), b_promote.get(p))
            && !dr::same_version(Some(s), b_final.get(p))
        {
            assert!(
                in_q.contains(p),
                "A's version of {} was lost: not on B and not in the quarantine",
                String::from_utf8_lossy(p)
            );
        }
    }

    // Only differences travelled.
    let must = dr::differing_bytes(&a_before, &b_final);
    let sent = n(&s, "bytes_sent");
    assert!(
        sent as f64 <= 1.1 * must as f64 + 65536.0,
        "failback sent {sent} bytes for {must} bytes that differ: {s}"
    );
    let again = w.sync("back");
    assert_eq!(n(&again, "bytes_sent"), 0, "{again}");
    assert_eq!(n(&again, "files_synced"), 0, "{again}");

    // The old direction is fenced both ways: A is demoted, B is live.
    let old = w.run(&["sync", "s1"]);
    assert_eq!(old.status.code(), Some(4), "{}", common::stderr(&old));
    assert!(
        common::stderr(&old).contains("demoted"),
        "{}",
        common::stderr(&old)
    );
    assert_eq!(common::stderr(&old).trim().lines().count(), 1);
}

fn ops(lo: usize, hi: usize) -> impl Strategy<Value = Vec<mutate::Op>> {
    prop::collection::vec(mutate::op(), lo..hi)
}

fn case() -> impl Strategy<Value = Case> {
    (
        ops(5, 30),
        prop::collection::vec(ops(1, 8), 0..3),
        ops(1, 10),
        0..400u64,
        ops(0, 10),
        ops(0, 10),
        any::<bool>(),
    )
        .prop_map(
            |(initial, rounds, lost, kill_ms, divergent, on_b, mark_b)| Case {
                initial,
                rounds,
                lost,
                kill_ms,
                divergent,
                on_b,
                mark_b,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("GEOREP_DRILL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(6),
        max_shrink_iters: 100,
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    #[test]
    fn disaster_drill_local(c in case()) {
        drill(&c, None);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("GEOREP_DRILL_SSH_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2),
        max_shrink_iters: 20,
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    #[test]
    fn disaster_drill_over_ssh(c in case()) {
        let sshd = Sshd::start();
        drill(&c, Some(&sshd));
    }
}
