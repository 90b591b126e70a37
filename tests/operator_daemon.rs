//! Status that tells the truth, with the real daemon: a paused session
//! says Paused and goes on counting changes; an idle master's lag stays
//! near 0; quiet crawls are not logged at info; `delete` names the
//! running monitor; a catalog session shows its points and their age; a
//! path that fails in every crawl (a slave directory made immutable with
//! chattr +i) is a persistent failure in status, JSON, Prometheus and
//! Nagios, counted once; and the `on_event` hook hears each event once.

mod common;

use common::daemon::{alive, pid, state, wait_for, wait_same};
use common::World;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v:#}"))
}

#[test]
fn a_paused_session_says_paused_and_keeps_counting_changes() {
    let w = World::new();
    std::fs::write(w.master.join("f"), b"x").unwrap();
    w.create("p", &[]);
    let _r = w.start("p");
    let st = w.wait_active("p");
    let worker = pid(&st, "worker_pid");
    w.run_ok(&["pause", "p"]);
    let st = w.wait_status("p", "the worker Paused", |s| s["worker_status"] == "Paused");
    assert_eq!(st["monitor_status"], "Paused");
    // The worker is not stopped by a signal: it holds its crawls and its watcher runs.
    assert_ne!(state(worker), Some('T'), "the worker was SIGSTOPped");
    for i in 0..5 {
        std::fs::write(w.master.join(format!("new{i}")), b"while paused").unwrap();
    }
    std::fs::write(w.master.join("f"), b"rewritten").unwrap();
    let st = w.wait_status("p", "pending changes counted while paused", |s| {
        s["entry"].as_u64() >= Some(5) && s["data"].as_u64() >= Some(1)
    });
    assert_eq!(st["worker_status"], "Paused");
    std::thread::sleep(Duration::from_secs(2));
    assert!(!w.slave.join("new0").exists(), "synced while paused");
    assert_eq!(std::fs::read(w.slave.join("f")).unwrap(), b"x");
    let table = String::from_utf8(w.run_ok(&["status"]).stdout).unwrap();
    assert!(table.contains("Paused"), "{table}");
    let prom = String::from_utf8(w.run_ok(&["status", "--prometheus"]).stdout).unwrap();
    assert!(
        prom.contains("georep_worker_status{session=\"p\",status=\"Paused\"} 1"),
        "{prom}"
    );
    w.run_ok(&["resume", "p"]);
    wait_same(&w.master, &w.slave, "changes made while paused");
    let st = w.wait_status("p", "nothing pending after resume", |s| {
        s["worker_status"] == "Active" && n(s, "entry") + n(s, "data") + n(s, "meta") == 0
    });
    assert_eq!(
        pid(&st, "worker_pid"),
        worker,
        "pause must not restart the worker"
    );
    assert_eq!(st["restarts"], 0);
}

#[test]
fn an_idle_master_has_no_lag_quiet_crawls_are_debug_and_delete_names_the_monitor() {
    let w = World::new();
    std::fs::write(w.master.join("f"), b"x").unwrap();
    w.create("i", &[]);
    let _r = w.start("i");
    let st = w.wait_active("i");
    let monitor = pid(&st, "monitor_pid");
    // Between quiet crawls (one a minute) the lag used to climb towards 60 s.
    std::thread::sleep(Duration::from_secs(8));
    for _ in 0..3 {
        let st = w.status("i");
        let lag = n(&st, "lag_seconds");
        assert!(
            lag <= 3,
            "an idle master with nothing pending has lag {lag}: {st:#}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    // A change is a crawl logged at info; a crawl that changes nothing (the
    // checkpoint's) is logged at debug only.
    let crawls = |w: &World| w.log("i").matches("crawl done").count();
    let before = crawls(&w);
    assert!(before >= 1, "the first crawl is not in the log");
    w.run_ok(&["checkpoint", "i", "now"]);
    w.wait_status("i", "the checkpoint completed", |s| {
        s["checkpoint_completed"] == true
    });
    std::fs::write(w.master.join("g"), b"y").unwrap();
    wait_same(&w.master, &w.slave, "a new file");
    wait_for("its crawl in the log", || {
        (crawls(&w) == before + 1).then_some(())
    })
    .unwrap_or_else(|| panic!("expected one more crawl line:\n{}", w.log("i")));

    let out = w.run(&["delete", "i"]);
    let err = common::stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("monitor pid {monitor}")), "{err}");
}

#[test]
fn a_catalog_session_shows_its_points_and_their_age() {
    let w = World::new();
    common::catalog::sample(&w, &["--hosts", "2"]);
    w.create("c", &[]);
    let st = w.status("c");
    assert!(st["last_synced"].is_null());
    w.sync("c");
    let st = w.status("c");
    assert!(
        st["last_synced"].is_string(),
        "a catalog sync sets last synced: {st:#}"
    );
    let hosts = st["hosts"].as_array().expect("hosts");
    assert_eq!(hosts.len(), 2, "{st:#}");
    for h in hosts {
        assert!(h["newest_complete"].is_string(), "{h}");
        assert!(h["age_seconds"].is_u64(), "{h}");
    }
    let detail = String::from_utf8(w.run_ok(&["status", "c", "--detail"]).stdout).unwrap();
    let host = hosts[0]["host"].as_str().unwrap();
    assert!(
        detail
            .lines()
            .any(|l| l.starts_with("newest point") && l.contains(&format!(": {host}: ")))
            && detail.contains("(age "),
        "{detail}"
    );
    let prom = String::from_utf8(w.run_ok(&["status", "--prometheus"]).stdout).unwrap();
    assert!(
        prom.contains(&format!(
            "georep_point_age_seconds{{session=\"c\",host=\"{host}\"}} "
        )),
        "{prom}"
    );
    // The daemon reports them too.
    let _r = w.start("c");
    let st = w.wait_active("c");
    assert!(
        st["last_synced"].is_string() && st["hosts"].as_array().is_some_and(|h| h.len() == 2),
        "{st:#}"
    );
}

/// Clears the immutable flag even when the test fails, so the temp dir can go.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(p: &Path) -> Immutable {
        let out = std::process::Command::new("chattr")
            .arg("+i")
            .arg(p)
            .output()
            .expect("run chattr (e2fsprogs; packaging/setup.sh installs it)");
        assert!(
            out.status.success(),
            "chattr +i {} failed (needs root and ext4/xfs/btrfs): {}",
            p.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Immutable(p.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

fn events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("hook got bad JSON {l:?}: {e}")))
        .collect()
}

fn count(ev: &[Value], name: &str) -> usize {
    ev.iter().filter(|e| e["event"] == name).count()
}

#[test]
fn persistent_failures_tell_the_truth_and_each_event_reaches_the_hook_once() {
    let w = World::new();
    std::fs::create_dir(w.master.join("d")).unwrap();
    std::fs::write(w.master.join("d/old"), b"old").unwrap();
    std::fs::write(w.master.join("f"), b"x").unwrap();
    w.create("e", &[]);
    let log = w.dir.path().join("events.jsonl");
    let env_log = w.dir.path().join("events.env");
    let hook = format!(
        "cat >> '{}'; echo \"$GEOREP_EVENT $GEOREP_SESSION\" >> '{}'",
        log.display(),
        env_log.display()
    );
    w.run_ok(&["config", "e", "set", "on_event", &hook]);
    w.run_ok(&["config", "e", "set", "persistent_failure_crawls", "2"]);
    w.run_ok(&["config", "e", "set", "rpo_warning_secs", "5"]);
    let _r = w.start("e");
    w.wait_active("e");

    // checkpoint_completed.
    w.run_ok(&["checkpoint", "e", "now"]);
    wait_for("the checkpoint event", || {
        (count(&events(&log), "checkpoint_completed") == 1).then_some(())
    })
    .expect("checkpoint_completed reached the hook");

    // A path that fails in every crawl: the slave's d is immutable.
    let immutable = Immutable::set(&w.slave.join("d"));
    std::fs::write(w.master.join("d/new"), b"cannot land").unwrap();
    let st = w.wait_status("e", "a persistent failure", |s| {
        s["persistent_failures"].as_u64() >= Some(1)
    });
    let paths: Vec<&str> = st["persistent_failure_entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert!(paths.iter().any(|p| p.starts_with("d")), "{st:#}");
    assert_eq!(st["worker_status"], "Active", "{st:#}");
    let failing = n(&st, "failing_entries");
    // Retried crawl after crawl, each failing entry counts once.
    let failed_lines = |w: &World| w.log("e").matches("entry failed").count();
    let seen = failed_lines(&w);
    wait_for("two more failing crawls", || {
        (failed_lines(&w) >= seen + 2 * failing as usize).then_some(())
    })
    .expect("the entry is retried");
    let st = w.status("e");
    assert_eq!(
        n(&st, "failures"),
        failing,
        "failures counted retries: {st:#}"
    );
    let table = String::from_utf8(w.run_ok(&["status"]).stdout).unwrap();
    assert!(table.contains("Degraded"), "{table}");
    let detail = String::from_utf8(w.run_ok(&["status", "e", "--detail"]).stdout).unwrap();
    assert!(
        detail.contains("persistent failure  ") && detail.contains("crawls in a row"),
        "{detail}"
    );
    let prom = String::from_utf8(w.run_ok(&["status", "--prometheus"]).stdout).unwrap();
    assert!(
        prom.contains("georep_persistent_failures{session=\"e\"} "),
        "{prom}"
    );
    assert!(
        !prom.contains("georep_persistent_failures{session=\"e\"} 0"),
        "{prom}"
    );
    let out = w.run(&["status", "e", "--nagios"]);
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{line}");
    assert!(line.contains("failing in every crawl"), "{line}");
    let out = w.run(&["status", "e", "--nagios", "--critical-failures", "1"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    wait_for("the persistent_failures event", || {
        (count(&events(&log), "persistent_failures") >= 1).then_some(())
    })
    .expect("persistent_failures reached the hook");

    // Fixed: it converges and the status is healthy again.
    drop(immutable);
    wait_same(&w.master, &w.slave, "after chattr -i");
    let st = w.wait_status("e", "no persistent failure", |s| {
        s["persistent_failures"] == 0 && s["failing_entries"] == 0
    });
    assert_eq!(n(&st, "failures"), failing, "{st:#}");
    let out = w.run(&["status", "e", "--nagios"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Faulty (the slave root replaced by a file), the RPO warning while it
    // lasts, then recovered. (The failing crawls above may have raised an
    // RPO warning of their own: lag grew while they could not complete.)
    let rpo_before = count(&events(&log), "rpo_warning");
    assert!(rpo_before <= 1, "{:?}", events(&log));
    std::fs::rename(&w.slave, w.dir.path().join("slave.moved")).unwrap();
    std::fs::write(&w.slave, b"not a directory").unwrap();
    w.run_ok(&["checkpoint", "e", "now"]);
    wait_for("faulty and rpo_warning events", || {
        let ev = events(&log);
        (count(&ev, "faulty") == 1 && count(&ev, "rpo_warning") == rpo_before + 1).then_some(())
    })
    .unwrap_or_else(|| panic!("events so far: {:?}", events(&log)));
    std::fs::remove_file(&w.slave).unwrap();
    std::fs::rename(w.dir.path().join("slave.moved"), &w.slave).unwrap();
    wait_for("the recovered event", || {
        (count(&events(&log), "recovered") == 1).then_some(())
    })
    .unwrap_or_else(|| panic!("events so far: {:?}", events(&log)));
    w.wait_status("e", "the second checkpoint", |s| {
        s["checkpoint_completed"] == true
    });
    wait_for("the second checkpoint event", || {
        (count(&events(&log), "checkpoint_completed") == 2).then_some(())
    })
    .expect("the second checkpoint reached the hook");

    // Settle, then every event was heard exactly once.
    std::thread::sleep(Duration::from_secs(3));
    let ev = events(&log);
    for (name, want) in [
        ("faulty", 1),
        ("recovered", 1),
        ("rpo_warning", rpo_before + 1),
        ("checkpoint_completed", 2),
    ] {
        assert_eq!(count(&ev, name), want, "{name}: {ev:#?}");
    }
    let mut announced: Vec<&str> = ev
        .iter()
        .filter(|e| e["event"] == "persistent_failures")
        .flat_map(|e| {
            e["paths"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap())
        })
        .collect();
    let total = announced.len();
    announced.sort();
    announced.dedup();
    assert_eq!(
        announced.len(),
        total,
        "a persistent failure announced twice: {ev:#?}"
    );
    for e in &ev {
        assert_eq!(e["session"], "e", "{e}");
        assert!(e["time"].is_string() && e["message"].is_string(), "{e}");
    }
    // The same events in the environment, one line per hook run.
    let env = std::fs::read_to_string(&env_log).unwrap();
    assert_eq!(env.lines().count(), ev.len(), "{env}");
    assert!(env.lines().all(|l| l.ends_with(" e")), "{env}");
    let monitor = pid(&w.status("e"), "monitor_pid");
    assert!(alive(monitor));
}

/// A sample from `status --prometheus` text.
fn metric(text: &str, name: &str, session: &str) -> Option<f64> {
    let prefix = format!("{name}{{session=\"{session}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.parse().unwrap())
}

#[test]
fn status_shows_a_crawl_in_progress_with_what_is_left_and_when_it_ends() {
    let w = World::new();
    // 320 MiB of incompressible data: a crawl of a few seconds.
    let mut data = vec![0u8; 320 << 20];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(w.master.join("image.raw"), &data).unwrap();
    drop(data);
    w.create("g", &[]);
    let _r = w.start("g");
    w.wait_status("g", "a crawl with a rate and an ETA", |s| {
        let p = &s["crawl_progress"];
        p["bytes_remaining"].as_u64().is_some_and(|r| r > 0)
            && p["eta_seconds"].is_u64()
            && p["rate_bytes_per_sec"].as_f64().is_some_and(|r| r > 0.0)
    });
    // Hold it there: the crawl waits at its next window, its progress stays
    // visible, and the ETA (at the rate it had) says what it needs once resumed.
    w.run_ok(&["pause", "g"]);
    let st = w.wait_status("g", "a held crawl with a rate and an ETA", |s| {
        let p = &s["crawl_progress"];
        s["worker_status"] == "Paused"
            && p["bytes_remaining"].as_u64().is_some_and(|r| r > 0)
            && p["eta_seconds"].is_u64()
            && p["rate_bytes_per_sec"].as_f64().is_some_and(|r| r > 0.0)
    });
    let p = &st["crawl_progress"];
    assert_eq!(n(p, "bytes_total"), 320 << 20, "{st:#}");
    assert_eq!(n(p, "files_total"), 1, "{st:#}");
    assert_eq!(
        n(p, "bytes_done") + n(p, "bytes_remaining"),
        320 << 20,
        "{st:#}"
    );
    let prom = String::from_utf8(w.run_ok(&["status", "--prometheus"]).stdout).unwrap();
    let left = metric(&prom, "georep_bytes_remaining", "g").expect("georep_bytes_remaining");
    assert!(left > 0.0, "{prom}");
    assert!(
        metric(&prom, "georep_files_remaining", "g") == Some(1.0),
        "{prom}"
    );
    assert!(metric(&prom, "georep_eta_seconds", "g").is_some(), "{prom}");
    let detail = String::from_utf8(w.run_ok(&["status", "g", "--detail"]).stdout).unwrap();
    let line = detail
        .lines()
        .find(|l| l.starts_with("crawl progress"))
        .unwrap()
        .to_string();
    assert!(
        line.contains("of 320.0 MiB") && line.contains("ETA"),
        "{detail}"
    );
    // Paused mid-crawl, nothing more is handled (once the window in hand is done
    // and the status, rewritten every second, has caught up).
    std::thread::sleep(Duration::from_secs(2));
    let held = n(&w.status("g")["crawl_progress"], "bytes_done");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(n(&w.status("g")["crawl_progress"], "bytes_done"), held);
    w.run_ok(&["resume", "g"]);
    wait_same(&w.master, &w.slave, "the image");
    let st = w.wait_status("g", "idle again", |s| s["crawl_status"] == "Idle");
    assert!(st["crawl_progress"].is_null(), "{st:#}");
    let prom = String::from_utf8(w.run_ok(&["status", "--prometheus"]).stdout).unwrap();
    assert_eq!(
        metric(&prom, "georep_bytes_remaining", "g"),
        Some(0.0),
        "{prom}"
    );
    assert_eq!(
        metric(&prom, "georep_eta_seconds", "g"),
        Some(0.0),
        "{prom}"
    );
}

#[test]
fn a_failing_or_hanging_hook_is_logged_and_killed() {
    let w = World::new();
    std::fs::write(w.master.join("f"), b"x").unwrap();
    w.create("h", &[]);
    w.run_ok(&[
        "config",
        "h",
        "set",
        "on_event",
        "echo hook-says-oops >&2; exit 7",
    ]);
    let _r = w.start("h");
    w.wait_active("h");
    w.run_ok(&["checkpoint", "h", "now"]);
    wait_for("the failed hook in the log", || {
        let log = w.log("h");
        (log.contains("event hook failed") && log.contains("hook-says-oops")).then_some(())
    })
    .unwrap_or_else(|| panic!("{}", w.log("h")));
    assert!(w.log("h").contains("exit status: 7"), "{}", w.log("h"));
    // A hook that hangs is killed after on_event_timeout_secs; supervision goes on.
    let marker = w.dir.path().join("hook-ran");
    let hook = format!("touch '{}'; sleep 600", marker.display());
    w.run_ok(&["config", "h", "set", "on_event", &hook]);
    w.run_ok(&["config", "h", "set", "on_event_timeout_secs", "1"]);
    w.wait_status("h", "the worker restarted with the new settings", |s| {
        s["worker_status"] == "Active" && s["crawl_status"] == "Idle"
    });
    std::thread::sleep(Duration::from_secs(2));
    w.run_ok(&["checkpoint", "h", "now"]);
    wait_for("the hung hook killed", || {
        w.log("h").contains("event hook timed out").then_some(())
    })
    .unwrap_or_else(|| panic!("{}", w.log("h")));
    assert!(marker.exists(), "the hook never ran");
    assert!(
        common::daemon::processes_with_env("GEOREP_EVENT=checkpoint_completed").is_empty(),
        "the hung hook is still running"
    );
    let st = w.wait_status("h", "the checkpoint completed", |s| {
        s["checkpoint_completed"] == true
    });
    assert_eq!(st["monitor_status"], "Started");
}
