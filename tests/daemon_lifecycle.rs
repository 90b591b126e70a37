//! The daemon's life: start, faults and restarts, a killed monitor, hung
//! workers, pause and resume, config changes, racing starts and stop.
//! Real processes, checked by pid; every wait is a poll with a generous
//! deadline, never a timed assertion.

mod common;

use common::daemon::{alive, pid, signal, state, wait_for, wait_same};
use common::World;
use nix::sys::signal::Signal;

const FIELDS: &[&str] = &[
    "session",
    "master",
    "slave",
    "monitor_status",
    "worker_status",
    "crawl_status",
    "last_synced",
    "last_error",
    "monitor_pid",
    "worker_pid",
    "entry",
    "data",
    "meta",
    "failures",
    "restarts",
    "bytes_sent",
    "files_synced",
    "checkpoint_time",
    "checkpoint_completed",
    "checkpoint_completion_time",
];

#[test]
fn start_fault_restart_monitor_death_and_stop() {
    let w = World::new();
    for i in 0..20 {
        std::fs::create_dir_all(w.master.join(format!("d{}", i % 4))).unwrap();
        std::fs::write(
            w.master.join(format!("d{}/f{i}", i % 4)),
            vec![i as u8; 1000 * i],
        )
        .unwrap();
    }
    w.create("s", &[]);
    let before = w.status("s");
    assert_eq!(before["monitor_status"], "Created");
    let out = w.run_ok(&["start", "s"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("started session s"));
    let running = common::daemon::Running {
        w: &w,
        session: "s".into(),
    };
    let st = w.wait_active("s");
    for f in FIELDS {
        assert!(st.get(*f).is_some(), "status --json lacks {f}: {st:#}");
    }
    assert!(st["last_synced"].is_string(), "{st:#}");
    assert_eq!(st["files_synced"], 20, "{st:#}");
    assert_eq!(st["restarts"], 0);
    wait_same(&w.master, &w.slave, "initial sync");
    let (monitor, worker) = (pid(&st, "monitor_pid"), pid(&st, "worker_pid"));
    assert!(alive(monitor) && alive(worker));

    // kill -9 of the worker: Faulty with the reason, then restarted and Active.
    signal(worker, Signal::SIGKILL);
    let faulty = w.wait_status("s", "Faulty after kill -9 of the worker", |s| {
        let reason = s["last_error"].as_str().unwrap_or_default();
        (s["worker_status"] == "Faulty" && reason.contains("SIGKILL")) || s["restarts"] == 1
    });
    let err = faulty["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(err.contains("killed by signal SIGKILL"), "{faulty:#}");
    let st = w.wait_status("s", "a restarted Active worker", |s| {
        s["worker_status"] == "Active" && s["restarts"] == 1 && s["worker_pid"] != worker
    });
    assert!(!alive(worker));
    assert_eq!(pid(&st, "monitor_pid"), monitor);
    // A new worker's watcher cannot vouch for the time it was down: a full crawl.
    assert!(
        st["full_crawl_reason"]
            .as_str()
            .is_some_and(|r| r.contains("no marker watched")),
        "{st:#}"
    );
    assert!(w.log("s").contains("worker faulty"));

    // kill -9 of the monitor: never reported running, and its worker leaves too.
    let worker = pid(&st, "worker_pid");
    signal(monitor, Signal::SIGKILL);
    wait_for("the monitor to die", || (!alive(monitor)).then_some(())).unwrap();
    let st = w.status("s");
    assert_ne!(st["worker_status"], "Active", "{st:#}");
    assert_eq!(st["monitor_status"], "Stopped", "{st:#}");
    assert!(st["monitor_pid"].is_null(), "{st:#}");
    assert!(
        st["last_error"].as_str().unwrap().contains("monitor"),
        "{st:#}"
    );
    let table = String::from_utf8(w.run_ok(&["status"]).stdout).unwrap();
    assert!(!table.contains("Active"), "{table}");
    wait_for("the orphaned worker to exit", || {
        (!alive(worker)).then_some(())
    })
    .unwrap();
    let st = w.status("s");
    assert_eq!(st["worker_status"], "Stopped", "{st:#}");

    // Started again; then stopped: Stopped, pid files gone, no process left.
    w.run_ok(&["start", "s"]);
    let st = w.wait_active("s");
    let (monitor, worker) = (pid(&st, "monitor_pid"), pid(&st, "worker_pid"));
    let out = w.run_ok(&["stop", "s"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("stopped session s"));
    let st = w.status("s");
    assert_eq!(st["monitor_status"], "Stopped", "{st:#}");
    assert_eq!(st["worker_status"], "Stopped", "{st:#}");
    assert!(!alive(monitor) && !alive(worker));
    let dir = w.home.join("sessions/s");
    assert!(!dir.join("monitor.pid").exists() && !dir.join("worker.pid").exists());
    wait_for("every georep process of the session to exit", || {
        w.processes().is_empty().then_some(())
    })
    .unwrap_or_else(|| panic!("left behind: {:?}", w.processes()));
    // Stopping a stopped session is fine; deleting it works.
    w.run_ok(&["stop", "s"]);
    drop(running);
    w.run_ok(&["delete", "s"]);
}

#[test]
fn racing_starts_give_exactly_one_monitor() {
    let w = World::new();
    std::fs::write(w.master.join("f"), b"x").unwrap();
    w.create("r", &[]);
    let _guard = common::daemon::Running {
        w: &w,
        session: "r".into(),
    };
    let children: Vec<_> = (0..4)
        .map(|_| {
            w.cmd(&["start", "r"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let mut started = 0;
    for o in &outs {
        assert!(o.status.success(), "{}", common::stderr(o));
        let text = String::from_utf8_lossy(&o.stdout);
        if text.contains("started session r") {
            started += 1;
        } else {
            assert!(text.contains("already running"), "{text}");
        }
    }
    assert_eq!(started, 1, "{outs:?}");
    let st = w.wait_active("r");
    let monitor = pid(&st, "monitor_pid");
    // Exactly one monitor process (the `start --detach` children that lost have exited).
    let monitors = wait_for("the losing starters to exit", || {
        let m: Vec<u32> = w
            .processes()
            .into_iter()
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == b"--detach"))
            })
            .collect();
        (m.len() == 1).then_some(m)
    })
    .expect("exactly one monitor");
    assert_eq!(monitors, vec![monitor]);
}

#[test]
fn a_hung_worker_is_killed_and_restarted() {
    let w = World::new();
    std::fs::write(w.master.join("f"), b"x").unwrap();
    w.create("h", &[]);
    w.run_ok(&["config", "h", "set", "hang_timeout_secs", "5"]);
    let _r = w.start("h");
    let st = w.wait_active("h");
    let worker = pid(&st, "worker_pid");
    // Frozen without the monitor knowing: no heartbeat any more.
    signal(worker, Signal::SIGSTOP);
    let st = w.wait_status("h", "the hung worker to be replaced", |s| {
        s["worker_status"] == "Active" && s["restarts"] == 1 && s["worker_pid"] != worker
    });
    assert!(
        st["last_error"]
            .as_str()
            .unwrap()
            .contains("killed as hung"),
        "{st:#}"
    );
    wait_for("the hung worker to be gone", || {
        (!alive(worker)).then_some(())
    })
    .unwrap();
}

#[test]
fn pause_resume_config_change_and_delete_refused() {
    let w = World::new();
    std::fs::write(w.master.join("f"), b"x").unwrap();
    w.create("p", &[]);
    let _r = w.start("p");
    let st = w.wait_active("p");
    let worker = pid(&st, "worker_pid");

    let out = w.run(&["delete", "p"]);
    assert_eq!(out.status.code(), Some(2), "{}", common::stderr(&out));
    assert!(common::stderr(&out).contains("is running"));

    w.run_ok(&["pause", "p"]);
    let st = w.status("p");
    assert_eq!(st["monitor_status"], "Paused");
    // Paused cooperatively: the worker holds its crawls, it is not SIGSTOPped.
    w.wait_status("p", "the worker Paused", |s| s["worker_status"] == "Paused");
    assert_ne!(state(worker), Some('T'));
    let table = String::from_utf8(w.run_ok(&["status"]).stdout).unwrap();
    assert!(table.contains("Paused"), "{table}");
    std::fs::write(w.master.join("while-paused"), b"later").unwrap();
    w.run_ok(&["resume", "p"]);
    assert_eq!(w.status("p")["monitor_status"], "Started");
    wait_same(&w.master, &w.slave, "changes made while paused");
    assert_eq!(
        pid(&w.status("p"), "worker_pid"),
        worker,
        "pause must not restart the worker"
    );

    // A config change restarts the worker (not counted as a fault).
    w.run_ok(&["config", "p", "set", "interval_secs", "77"]);
    let st = w.wait_status("p", "a worker restarted for the new config", |s| {
        s["worker_status"] == "Active" && s["worker_pid"] != worker && s["worker_pid"].is_u64()
    });
    assert_eq!(st["restarts"], 0, "{st:#}");
    assert!(w.log("p").contains("configuration changed"));
}

#[test]
fn foreground_monitor_for_systemd_reopens_its_log_on_sighup_and_stops_on_sigterm() {
    let w = World::new();
    std::fs::write(w.master.join("f"), b"x").unwrap();
    w.create("fg", &[]);
    let _guard = common::daemon::Running {
        w: &w,
        session: "fg".into(),
    };
    // What georep@.service runs.
    let child = w
        .cmd(&["start", "fg", "--foreground"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let st = w.wait_active("fg");
    assert_eq!(pid(&st, "monitor_pid"), child.id());
    let dup = w.run(&["start", "fg", "--foreground"]);
    assert_eq!(dup.status.code(), Some(2), "{}", common::stderr(&dup));
    assert!(common::stderr(&dup).contains("already running"));

    // logrotate: the file is moved away, SIGHUP makes the monitor open a new one.
    let log = w.home.join("sessions/fg/georep.log");
    std::fs::rename(&log, log.with_extension("log.1")).unwrap();
    signal(child.id(), Signal::SIGHUP);
    wait_for("the reopened log", || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("log reopened"))
    })
    .expect("a new log after SIGHUP");
    assert!(std::fs::read_to_string(log.with_extension("log.1"))
        .unwrap()
        .contains("monitor started"));

    signal(child.id(), Signal::SIGTERM);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("monitor stopped"),
        "the foreground monitor logs to stderr too"
    );
    let st = w.status("fg");
    assert_eq!(st["monitor_status"], "Stopped", "{st:#}");
    wait_for("no process left", || w.processes().is_empty().then_some(()))
        .unwrap_or_else(|| panic!("left behind: {:?}", w.processes()));
}
