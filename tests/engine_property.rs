//! Property: after random trees and rounds of random mutations, each
//! followed by `georep sync`, the slave equals the master byte for byte
//! and metadata for metadata. Real processes, real file system, real xattrs.

mod common;

use common::{mutate, n, tree, World};
use proptest::prelude::*;

/// How a case reaches its slave.
enum Via<'a> {
    Local,
    Ssh(&'a common::sshd::Sshd),
    /// Through a real sshd behind the latency proxy, with `streams = 4`.
    Wan(&'a common::sshd::Sshd, &'a common::proxy::Proxy),
}

/// One case; with `ssh`, the slave is reached through a real sshd.
fn run_case(use_marks: bool, initial: &[mutate::Op], rounds: &[Vec<mutate::Op>], via: Via) {
    let w = World::new();
    let marker = ["--marker", if use_marks { "mark" } else { "auto" }];
    let streams = match via {
        Via::Local => {
            w.create("p", &marker);
            1
        }
        Via::Ssh(sshd) => {
            w.create_ssh(sshd, "p", &marker);
            1
        }
        Via::Wan(sshd, proxy) => {
            let mut args = common::sshd::create_args(sshd, "p", &w.master, &w.slave);
            let i = args.iter().position(|a| a == "--ssh-port").unwrap();
            args[i + 1] = proxy.port.to_string();
            args.extend(marker.iter().map(|s| s.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            w.run_ok(&args);
            w.run_ok(&["config", "p", "set", "streams", "4"]);
            4
        }
    };
    for op in initial {
        mutate::apply(&w.master, op);
    }
    if streams > 1 {
        // A file of several windows, so that segments are exercised.
        let data: Vec<u8> = (0..(9u32 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(w.master.join("several-windows"), data).unwrap();
        // Small files in a few directories, so that several streams carry them.
        for i in 0..48u32 {
            let dir = w.master.join(format!("small{}", i % 3));
            std::fs::create_dir_all(&dir).unwrap();
            let len = 1000 + (i as usize * 677) % 9000;
            let body: Vec<u8> = (0..len)
                .map(|j| (j as u32 ^ i.wrapping_mul(97)) as u8)
                .collect();
            std::fs::write(dir.join(format!("s{i}")), body).unwrap();
        }
    }
    let first = w.sync("p");
    assert_eq!(first["crawl"], "full");
    assert_eq!(n(&first, "streams"), streams, "{first}");
    if streams > 1 {
        assert!(
            n(&first, "files_split") >= 1,
            "no file went in segments: {first}"
        );
        let carried: Vec<u64> = first["small_files_by_stream"]
            .as_array()
            .unwrap_or_else(|| panic!("small_files_by_stream: {first}"))
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(carried.len(), streams as usize, "{first}");
        assert!(
            carried.iter().sum::<u64>() >= 48,
            "every small file is counted on the stream that carried it: {first}"
        );
        assert!(
            carried.iter().filter(|&&c| c > 0).count() > 1,
            "small files went over one stream only: {carried:?}"
        );
    }
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
        run_case(use_marks, &initial, &rounds, Via::Local);
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
        run_case(use_marks, &initial, &rounds, Via::Ssh(&sshd));
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("GEOREP_PROPTEST_WAN_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3),
        max_shrink_iters: 20,
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    /// The same property over SSH through a 20 ms-each-way proxy with four
    /// streams: files and segments of large files spread over them, and
    /// stimes advanced only once everything below is durable on all.
    #[test]
    fn slave_over_four_streams_through_latency_equals_master(
        use_marks in any::<bool>(),
        initial in prop::collection::vec(mutate::op(), 5..40),
        rounds in prop::collection::vec(prop::collection::vec(mutate::op(), 1..12), 1..4),
    ) {
        let sshd = common::sshd::Sshd::start();
        let proxy = common::proxy::Proxy::start(sshd.port, std::time::Duration::from_millis(20));
        run_case(use_marks, &initial, &rounds, Via::Wan(&sshd, &proxy));
    }
}
