//! A stalled link: the proxy between the worker's ssh and the slave's
//! sshd stops forwarding without closing anything (a far end that froze),
//! idle and in the middle of a large transfer. The worker's keep-alive
//! notices within `keepalive_secs` (long before the monitor's hang
//! detection would), the worker is Faulty with a reason naming the
//! stalled connection, and once the proxy forwards again it reconnects and
//! converges. Nothing partial is visible on the slave at any time.

mod common;

use common::daemon::{pid, wait_for, wait_same, Watch};
use common::proxy::Proxy;
use common::sshd::Sshd;
use common::{mutate, tree, World};
use std::time::Duration;

fn faulty_stalled(w: &World, session: &str) -> serde_json::Value {
    w.wait_status(session, "Faulty: the connection stalled", |s| {
        s["worker_status"] == "Faulty"
            && s["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("stalled") && e.contains("keep-alive"))
    })
}

#[test]
fn a_stalled_link_is_detected_by_the_keepalive_reported_and_reconnected() {
    let sshd = Sshd::start();
    let proxy = Proxy::start(sshd.port, Duration::ZERO);
    let w = World::new();
    for i in 0..10 {
        let d = w.master.join(format!("h{}", i % 2));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("f{i}")), mutate::data(i, 20_000)).unwrap();
    }
    let mut args = common::sshd::create_args(&sshd, "st", &w.master, &w.slave);
    let i = args.iter().position(|a| a == "--ssh-port").unwrap();
    args[i + 1] = proxy.port.to_string();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    w.run_ok(&a);
    // Well below PATIENCE; the monitor's hang detection (300 s) is far above it.
    w.run_ok(&["config", "st", "set", "keepalive_secs", "6"]);
    let _r = w.start("st");
    let st = w.wait_active("st");
    let worker = pid(&st, "worker_pid");
    wait_same(&w.master, &w.slave, "initial sync");

    // Idle: only keep-alives cross the link.
    let conns = proxy.connections().len();
    proxy.stall(true);
    let st = faulty_stalled(&w, "st");
    eprintln!("idle: {}", st["last_error"]);
    proxy.stall(false);
    w.wait_status("st", "Active again after the stall", |s| {
        s["worker_status"] == "Active"
    });
    assert!(
        proxy.connections().len() > conns,
        "no fresh connection after the stall"
    );
    std::fs::write(w.master.join("h0/after-idle-stall"), b"x").unwrap();
    wait_same(&w.master, &w.slave, "after the idle stall");

    // In the middle of a large transfer: the send budget is full when the link stops.
    let data = mutate::data(99, 64 << 20);
    let want = *blake3::hash(&data).as_bytes();
    let watch = Watch::start(&w.slave, vec![("big.img".into(), vec![want])]);
    std::fs::write(w.master.join("big.img"), &data).unwrap();
    wait_for("the big file's transfer to start", || {
        (!tree::temporaries(&w.slave).is_empty()).then_some(())
    })
    .expect("no transfer started");
    proxy.stall(true);
    let st = faulty_stalled(&w, "st");
    eprintln!("mid-transfer: {}", st["last_error"]);
    proxy.stall(false);
    wait_same(&w.master, &w.slave, "after the stall mid-transfer");
    watch.check();
    let st = w.wait_active("st");
    wait_for("temporaries cleaned up", || {
        tree::temporaries(&w.slave).is_empty().then_some(())
    })
    .unwrap_or_else(|| panic!("left: {:?}", tree::temporaries(&w.slave)));
    // The worker itself noticed and reconnected: the monitor never had to kill it.
    assert_eq!(st["restarts"], 0, "{st:#}");
    assert_eq!(pid(&st, "worker_pid"), worker, "{st:#}");
}
