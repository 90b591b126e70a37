//! Property: after random trees and rounds of random mutations, each
//! followed by `georep sync`, the slave equals the master byte for byte
//! and metadata for metadata. Real processes, real file system, real xattrs.

mod common;

use common::{mutate, n, tree, World};
use proptest::prelude::*;

/// One case; with `ssh`, the slave is reached through a real sshd.
fn run_case(
    use_marks: bool,
    initial: &[mutate::Op],
    rounds: &[Vec<mutate::Op>],
    ssh: Option<&common::sshd::Sshd>,
) {
    let w = World::new();
    let marker = ["--marker", if use_marks { "mark" } else { "auto" }];
    match ssh {
        None => w.create("p", &marker),
        Some(sshd) => {
            w.create_ssh(sshd, "p", &marker);
        }
    }
    for op in initial {
        mutate::apply(&w.master, op);
    }
    let first = w.sync("p");
    assert_eq!(first["crawl"], "full");
    tree::assert_same(&w.master, &w.slave);
    for (i, round) in rounds.iter().enumerate() {
        for op in round {
            let changed = mutate::apply(&w.master, op);
            if use_marks {
                for p in changed {
                    common::mark(&p);
                }
            }
        }
        let s = w.sync("p");
        assert_eq!(n(&s, "failures"), 0, "round {i}: {s}");
        assert_eq!(
            s["crawl"],
            if use_marks { "xtime" } else { "full" },
            "round {i}"
        );
        tree::assert_same(&w.master, &w.slave);
    }
    // Converged: nothing left to send.
    let s = w.sync("p");
    assert_eq!(n(&s, "bytes_sent"), 0, "{s}");
    assert_eq!(n(&s, "files_synced"), 0, "{s}");
    if use_marks {
        assert!(n(&s, "entries_visited") <= 2, "{s}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("GEOREP_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(12),
        max_shrink_iters: 200,
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    #[test]
    fn slave_equals_master_after_every_round(
        use_marks in any::<bool>(),
        initial in prop::collection::vec(mutate::op(), 5..40),
        rounds in prop::collection::vec(prop::collection::vec(mutate::op(), 1..12), 1..5),
    ) {
        run_case(use_marks, &initial, &rounds, None);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("GEOREP_PROPTEST_SSH_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(6),
        max_shrink_iters: 50,
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    /// The same property with the slave behind a real sshd (push-pem key, forced command).
    #[test]
    fn slave_over_ssh_equals_master_after_every_round(
        use_marks in any::<bool>(),
        initial in prop::collection::vec(mutate::op(), 5..40),
        rounds in prop::collection::vec(prop::collection::vec(mutate::op(), 1..12), 1..4),
    ) {
        let sshd = common::sshd::Sshd::start();
        run_case(use_marks, &initial, &rounds, Some(&sshd));
    }
}
