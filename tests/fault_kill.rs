//! Processes killed on their own, under a running daemon: the agent alone
//! (kill -9 of only the agent, local and SSH slaves, idle and in the middle
//! of a large transfer), and the monitor while a large transfer is in
//! flight. Nothing partial is ever visible on the slave, status tells the
//! truth, and replication converges.

mod common;

use common::daemon::{agent_pids, alive, pid, signal, wait_for, wait_same, Watch};
use common::sshd::Sshd;
use common::{mutate, tree, World};
use nix::sys::signal::Signal;

const BIG: usize = 48 << 20;

fn hash(d: &[u8]) -> [u8; 32] {
    *blake3::hash(d).as_bytes()
}

fn small_tree(w: &World) {
    for i in 0..12 {
        let d = w.master.join(format!("vm{}", i % 3));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join(format!("f{i}")),
            mutate::data(i, 10_000 + i as usize),
        )
        .unwrap();
    }
}

/// The one agent serving the slave.
fn the_agent(w: &World) -> u32 {
    wait_for("one agent serving the slave", || {
        let p = agent_pids(&w.slave);
        (p.len() == 1).then(|| p[0])
    })
    .unwrap_or_else(|| panic!("agents: {:?}", agent_pids(&w.slave)))
}

/// Waits until a temporary is visible on the slave (a transfer under way),
/// or the slave holds `name` with `want` (the transfer was too quick to see).
fn transfer_under_way(w: &World, name: &str, want: &[u8; 32]) -> bool {
    wait_for("a transfer under way", || {
        if !tree::temporaries(&w.slave).is_empty() {
            return Some(true);
        }
        let done = std::fs::read(w.slave.join(name)).is_ok_and(|d| &hash(&d) == want);
        done.then_some(false)
    })
    .expect("the big file neither started nor arrived")
}

fn faulty_because_the_agent_was_killed(w: &World, session: &str) -> serde_json::Value {
    w.wait_status(session, "Faulty: the agent was killed", |s| {
        let e = s["last_error"].as_str().unwrap_or_default();
        s["worker_status"] == "Faulty" && e.contains("agent") && e.contains("killed")
    })
}

/// Kills the agent alone, idle and mid-transfer, under a started daemon.
fn the_agent_alone_killed(w: &World, session: &str) {
    let _r = w.start(session);
    let st = w.wait_active(session);
    let worker = pid(&st, "worker_pid");
    wait_same(&w.master, &w.slave, "initial sync");

    // Idle: noticed without waiting for the next crawl.
    let agent = the_agent(w);
    signal(agent, Signal::SIGKILL);
    let st = faulty_because_the_agent_was_killed(w, session);
    eprintln!("idle: {}", st["last_error"]);
    w.wait_status(session, "Active again, through a new agent", |s| {
        s["worker_status"] == "Active" && agent_pids(&w.slave).iter().any(|&p| p != agent)
    });
    std::fs::write(w.master.join("vm0/after-idle-kill"), b"x").unwrap();
    wait_same(&w.master, &w.slave, "after the idle kill");

    // In the middle of large transfers: the file's final name never shows a partial copy.
    let mut versions = Vec::new();
    let mut mid = 0;
    for round in 0..3u64 {
        let data = mutate::data(1000 + round, BIG + round as usize * 4096);
        versions.push(hash(&data));
        let watch = Watch::start(&w.slave, vec![("big.img".into(), versions.clone())]);
        std::fs::write(w.master.join("big.img"), &data).unwrap();
        if transfer_under_way(w, "big.img", versions.last().unwrap()) {
            let agent = the_agent(w);
            signal(agent, Signal::SIGKILL);
            let st = faulty_because_the_agent_was_killed(w, session);
            eprintln!("mid-transfer: {}", st["last_error"]);
            mid += 1;
        }
        wait_same(&w.master, &w.slave, &format!("after kill {round}"));
        watch.check();
    }
    assert!(mid >= 1, "no kill hit a transfer in flight");
    let st = w.wait_active(session);
    assert!(tree::temporaries(&w.slave).is_empty());
    // The worker reconnected by itself (keeping its watcher): no restart was needed.
    assert_eq!(pid(&st, "worker_pid"), worker, "{st:#}");
    assert!(alive(worker));
}

#[test]
fn the_agent_alone_killed_on_a_local_slave_is_noticed_reported_and_replaced() {
    let w = World::new();
    small_tree(&w);
    w.create("local", &[]);
    the_agent_alone_killed(&w, "local");
}

#[test]
fn the_agent_alone_killed_on_an_ssh_slave_is_noticed_reported_and_replaced() {
    let sshd = Sshd::start();
    let w = World::new();
    small_tree(&w);
    w.create_ssh(&sshd, "remote", &[]);
    the_agent_alone_killed(&w, "remote");
}

#[test]
fn the_monitor_killed_mid_transfer_leaves_nothing_partial_and_no_false_active() {
    let w = World::new();
    small_tree(&w);
    w.create("m", &[]);
    let r = w.start("m");
    let st = w.wait_active("m");
    wait_same(&w.master, &w.slave, "initial sync");
    let (monitor, worker) = (pid(&st, "monitor_pid"), pid(&st, "worker_pid"));

    let data = mutate::data(77, BIG * 2);
    let want = hash(&data);
    let watch = Watch::start(&w.slave, vec![("big.img".into(), vec![want])]);
    std::fs::write(w.master.join("big.img"), &data).unwrap();
    let mid = transfer_under_way(&w, "big.img", &want);
    signal(monitor, Signal::SIGKILL);
    wait_for("the monitor to die", || (!alive(monitor)).then_some(())).unwrap();
    // From then on, while the orphaned worker and its agent finish, and after: never Active.
    wait_for("the orphaned worker and its agent to exit", || {
        let st = w.status("m");
        assert_ne!(st["worker_status"], "Active", "{st:#}");
        assert_ne!(st["monitor_status"], "Started", "{st:#}");
        (!alive(worker) && agent_pids(&w.slave).is_empty()).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "left running: worker {worker} {}, agents {:?}",
            alive(worker),
            agent_pids(&w.slave)
        )
    });
    let st = w.status("m");
    assert_eq!(st["worker_status"], "Stopped", "{st:#}");
    assert!(
        st["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("monitor")),
        "{st:#}"
    );
    // Only a kept partial (hidden, for resuming) may remain, never a
    // temporary of an abandoned publish.
    let left: Vec<_> = tree::temporaries(&w.slave)
        .into_iter()
        .filter(|p| !is_partial(p))
        .collect();
    assert!(left.is_empty(), "temporaries left: {left:?}");
    eprintln!("the kill hit a transfer in flight: {mid}");
    drop(r);

    // Started again: converges, and the partial is used up.
    let _r = w.start("m");
    wait_same(&w.master, &w.slave, "after the restart");
    w.wait_active("m");
    watch.check();
    wait_for("the kept partial to be used up", || {
        tree::temporaries(&w.slave).is_empty().then_some(())
    })
    .unwrap_or_else(|| panic!("left: {:?}", tree::temporaries(&w.slave)));
    assert!(
        mid,
        "the transfer finished before the monitor was killed: the test proves little"
    );
}

/// A partial transfer the agent keeps for the next sync to resume.
fn is_partial(p: &str) -> bool {
    std::path::Path::new(p).file_name().is_some_and(|n| {
        std::os::unix::ffi::OsStrExt::as_bytes(n).starts_with(georep::protocol::PARTIAL_PREFIX)
    })
}
