//! Point locks: a point being shipped is locked on the master, so the
//! appliance's retention cannot delete or rewrite its files meanwhile; the
//! lock goes when the transfer ends, and a worker killed with SIGKILL
//! leaves a stale lock that binds no one and is cleared by the next sync.

mod common;

use common::catalog as cat;
use common::World;
use georep::catalog::locks::{self, LockInfo};
use georep::catalog::sample::Appliance;
use georep::catalog::store;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A store whose newest host snapshot takes a while to ship: its chained
/// disk is built from a chain reaching the oldest snapshot.
fn world() -> World {
    let w = World::new();
    w.run_ok(&[
        "sample-store",
        w.master.to_str().unwrap(),
        "--hosts",
        "1",
        "--kinds",
        "qcow",
        "--disk-size",
        "256M",
        "--snapshots",
        "3",
    ]);
    w.create("c", &[]);
    w
}

fn status(w: &World) -> georep::catalog::status::CatalogStatus {
    let dir = w.home.join("sessions/c");
    let path = dir.join("config.toml");
    let config =
        georep::session::parse_config(&path, &std::fs::read_to_string(&path).unwrap()).unwrap();
    let s = georep::session::Session {
        name: "c".into(),
        dir,
        config,
    };
    georep::catalog::status::session_status(&s)
        .unwrap()
        .expect("a store session")
}

fn oldest_files(w: &World) -> Vec<String> {
    let h = store::load_host(&w.master, "host01").unwrap();
    let s = h.snapshots.values().next().unwrap();
    s.disks
        .values()
        .flat_map(|d| d.storages.iter().map(|x| x.record.body.file().to_string()))
        .collect()
}

fn start_sync(w: &World) -> Child {
    w.cmd(&["sync", "c", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap()
}

/// Waits until the worker holds a live lock naming one of `files`.
fn wait_for_lock(w: &World, child: &mut Child, files: &[String]) -> LockInfo {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(l) = locks::list(&w.master)
            .unwrap()
            .into_iter()
            .find(|l| l.live && l.record.files.iter().any(|f| files.contains(f)))
        {
            return l;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the sync ended without ever holding a lock on the chain it ships"
        );
        assert!(Instant::now() < deadline, "no lock after 300 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Stops the worker (SIGSTOP) at a moment it does not hold the store's
/// MUTEX (it takes it briefly to write a lock file): stopped inside, it
/// would keep the appliance out for as long as it is stopped.
fn stop_outside_mutex(w: &World, child: &Child) {
    let pid = Pid::from_raw(child.id() as i32);
    for _ in 0..1000 {
        kill(pid, Signal::SIGSTOP).unwrap();
        // Wait until the stop took effect (state T in /proc/PID/stat).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap()
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('T'))
        {
            assert!(Instant::now() < deadline, "SIGSTOP did not stop the worker");
            std::thread::sleep(Duration::from_millis(1));
        }
        if locks::mutex_within(&w.master, Duration::ZERO).is_ok() {
            return;
        }
        kill(pid, Signal::SIGCONT).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("the worker held the store's MUTEX at every one of 1000 stops");
}

#[test]
fn a_point_is_locked_while_it_is_shipped_and_retention_waits_for_it() {
    let w = world();
    let old = oldest_files(&w);
    let mut child = start_sync(&w);
    let lock = wait_for_lock(&w, &mut child, &old);
    // Freeze the worker while it holds the lock: the appliance must keep off.
    stop_outside_mutex(&w, &child);
    assert_eq!(lock.record.holder.pid, child.id());
    assert_eq!(lock.record.session, "c");
    assert_eq!(lock.record.host, "host01");
    let mut a = Appliance::open(&w.master, 7).unwrap();
    assert_eq!(a.retention("host01").unwrap(), None, "{:?}", a.log);
    assert!(a.log.last().unwrap().contains("locked by c"), "{:?}", a.log);
    assert!(
        old.iter().all(|f| w.master.join(f).exists()),
        "retention deleted a locked file"
    );
    let listed = w.run_ok(&["point", "locks", w.master.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("held"),
        "{listed:?}"
    );
    kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(s["catalog"]["locks_taken"].as_u64().unwrap() >= 2, "{s}");
    assert!(
        locks::list(&w.master).unwrap().is_empty(),
        "locks left after the sync"
    );
    cat::replica_consistent(&w.master, &w.slave);
    // Released: now retention proceeds.
    assert!(a.retention("host01").unwrap().is_some(), "{:?}", a.log);
}

#[test]
fn a_killed_worker_leaves_a_stale_lock_that_binds_no_one_and_is_cleared() {
    let w = world();
    let old = oldest_files(&w);
    let mut child = start_sync(&w);
    let lock = wait_for_lock(&w, &mut child, &old);
    killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    let l = locks::list(&w.master).unwrap();
    assert!(!l.is_empty(), "the lock file stays after kill -9");
    assert!(
        l.iter().all(|x| !x.live),
        "a dead worker's lock is stale: {l:?}"
    );
    assert!(l.iter().any(|x| x.path == lock.path));
    let listed = w.run_ok(&["point", "locks", w.master.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("stale"));
    // What `status --detail` gets from the library.
    let st = status(&w);
    assert!(
        !st.locks.is_empty() && st.locks.iter().all(|l| !l.live),
        "{st:?}"
    );
    cat::replica_consistent(&w.master, &w.slave);
    // The appliance ignores the stale lock.
    let mut a = Appliance::open(&w.master, 7).unwrap();
    assert!(a.retention("host01").unwrap().is_some(), "{:?}", a.log);
    // The next sync clears it and converges.
    let s = w.sync("c");
    assert_eq!(common::n(&s, "failures"), 0, "{s}");
    assert!(
        s["catalog"]["stale_locks_cleared"].as_u64().unwrap() >= 1,
        "{s}"
    );
    assert!(locks::list(&w.master).unwrap().is_empty());
    cat::replica_consistent(&w.master, &w.slave);
    let st = status(&w);
    assert!(st.locks.is_empty());
    assert_eq!(st.newest_from, "slave");
    let m = store::load_host(&w.master, "host01").unwrap();
    assert_eq!(
        st.newest[0].newest_complete,
        georep::catalog::points::newest_complete(&m)
    );
    let tmp = tempfile::tempdir_in(&w.dir).unwrap();
    cat::same_points(&w.master, &w.slave, 0, tmp.path());
}
