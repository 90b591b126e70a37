//! Many small files over SSH through a 50 ms-each-way proxy: the sync is
//! pipelined, not one round trip per file. Asserted on the causal depth
//! the proxy measured (see `common::proxy`), never on elapsed time.

mod common;

use common::proxy::Proxy;
use common::sshd::Sshd;
use common::{n, tree, World};
use std::sync::atomic::Ordering;
use std::time::Duration;

const FILES: usize = 5000;

#[test]
fn five_thousand_small_files_are_not_bound_by_one_round_trip_each() {
    let sshd = Sshd::start();
    let proxy = Proxy::start(sshd.port, Duration::from_millis(50));
    let w = World::new();
    let mut seed = 0x2545f4914f6cdd1du64;
    for i in 0..FILES {
        let dir = w.master.join(format!("h{:02}", i % 50));
        std::fs::create_dir_all(&dir).unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = 1024 + (seed % 3072) as usize;
        let data: Vec<u8> = (0..len)
            .map(|j| (seed >> (j % 57)) as u8 ^ j as u8)
            .collect();
        std::fs::write(dir.join(format!("f{i:05}")), data).unwrap();
    }
    let mut args = common::sshd::create_args(&sshd, "wan", &w.master, &w.slave);
    let i = args.iter().position(|a| a == "--ssh-port").unwrap();
    args[i + 1] = proxy.port.to_string();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    w.run_ok(&args);
    let before = proxy.connections().len();
    let s = w.sync("wan");
    assert_eq!(n(&s, "files_synced"), FILES as u64, "{s}");
    tree::assert_same(&w.master, &w.slave);
    let conns = proxy.connections();
    assert_eq!(conns.len(), before + 1, "one connection per sync");
    let c = conns.last().unwrap();
    let hops = c.max_hop.load(Ordering::SeqCst);
    println!(
        "{FILES} files: causal depth {hops} hops ({} bytes up, {} down)",
        c.bytes[0].load(Ordering::Relaxed),
        c.bytes[1].load(Ordering::Relaxed)
    );
    // One round trip per file would need at least 2 * FILES hops.
    assert!(
        hops < (FILES / 2) as u64,
        "causal depth {hops}: the sync waits for round trips file by file"
    );
    assert!(hops >= 4, "the proxy saw no conversation ({hops} hops)");
}
