//! The scrub: with `scrub_rate` and `scrub_period` set, the daemon verifies
//! the replica in the background, finds a byte rotted on the slave (mtime
//! and size kept) within a period, ships it again, says so in status (JSON,
//! Prometheus, Nagios), resumes its pass after the worker is killed, and
//! starts a pass at least every period, each covering every byte once.

mod common;

use common::{mutate, World};
use serde_json::Value;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::{Duration, Instant};

fn scrub_state(w: &World) -> Value {
    std::fs::read(w.home.join("sessions/s/scrub.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

fn fill(w: &World, files: usize, size: usize) -> u64 {
    for i in 0..files {
        std::fs::write(
            w.master.join(format!("f{i:03}")),
            mutate::data(i as u64 + 1, size),
        )
        .unwrap();
    }
    (files * size) as u64
}

fn rot(path: &std::path::Path, off: u64) {
    let md = std::fs::metadata(path).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, off).unwrap();
    drop(f);
    let t = nix::sys::time::TimeSpec::new(md.mtime(), md.mtime_nsec());
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

#[test]
fn the_scrub_finds_rot_within_a_period_repairs_it_and_reports_it() {
    let w = World::new();
    w.create("s", &["--marker", "mark"]);
    fill(&w, 12, 1 << 20);
    w.run_ok(&["config", "s", "set", "scrub_rate", "20M"]);
    w.run_ok(&["config", "s", "set", "scrub_period", "8"]);
    let _run = w.start("s");
    w.wait_active("s");
    let s = w.wait_status("s", "a first scrub pass", |s| s["verify_last"].is_string());
    assert_eq!(s["verify_mismatches"], 0, "{s:#}");
    assert!(s["verify_coverage"].as_f64().unwrap() > 0.0, "{s:#}");
    let out = w.run(&["status", "s", "--nagios"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Rot under an unchanged mtime and size: the crawl cannot see it; the scrub does.
    let victim = w.slave.join("f007");
    rot(&victim, 300_000);
    let started = Instant::now();
    let s = w.wait_status("s", "the rot found", |s| {
        s["verify_mismatches"].as_u64() > Some(0)
    });
    assert!(
        started.elapsed() < Duration::from_secs(8 + 30),
        "found within a period (plus slack)"
    );
    assert_eq!(s["verify_mismatch_paths"][0], "f007", "{s:#}");
    let out = w.run(&["status", "s", "--nagios"]);
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{line}");
    assert!(
        line.contains("mismatches") && line.contains("f007"),
        "{line}"
    );
    let prom = String::from_utf8_lossy(&w.run_ok(&["status", "--prometheus"]).stdout).to_string();
    assert!(
        prom.contains("georep_verify_mismatches{session=\"s\"} 1"),
        "{prom}"
    );
    assert!(
        prom.contains("georep_verify_coverage{session=\"s\"}"),
        "{prom}"
    );
    assert!(
        prom.contains("georep_verify_last_timestamp_seconds{session=\"s\"}"),
        "{prom}"
    );
    // Shipped again: the slave's copy is the master's once more.
    common::daemon::wait_for("the rotted file repaired", || {
        (std::fs::read(&victim).unwrap() == std::fs::read(w.master.join("f007")).unwrap())
            .then_some(())
    })
    .expect("repaired");
    // A later pass finds nothing: the warning clears.
    w.wait_status("s", "a clean pass", |s| {
        s["verify_mismatches"] == 0 && s["verify_last"].is_string()
    });
    let out = w.run(&["status", "s", "--nagios"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    common::tree::assert_same(&w.master, &w.slave);
}

#[test]
fn a_killed_worker_resumes_its_pass_and_passes_come_every_period() {
    let w = World::new();
    w.create("s", &["--marker", "mark"]);
    let total = fill(&w, 24, 1 << 20);
    // 24 MiB at 6 MiB/s: about 4 s a pass; a period of 12 s.
    w.run_ok(&["config", "s", "set", "scrub_rate", "6M"]);
    w.run_ok(&["config", "s", "set", "scrub_period", "12"]);
    // Ranges of one window: the pass's cursor moves every 4 MiB.
    let out = w
        .cmd(&["start", "s"])
        .env("GEOREP_VERIFY_RANGE_BYTES", "4194304")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let _run = common::daemon::Running {
        w: &w,
        session: "s".into(),
    };
    w.wait_active("s");
    let progress = common::daemon::wait_for("a pass under way", || {
        let st = scrub_state(&w);
        let done = st["pass"]["counts"]["bytes"].as_u64()?;
        (done > 0 && done < total).then(|| (st["pass"]["started_ns"].as_u64().unwrap(), done))
    })
    .expect("progress");
    let s = w.status("s");
    let pid = common::daemon::pid(&s, "worker_pid");
    common::daemon::signal(pid, nix::sys::signal::Signal::SIGKILL);
    w.wait_status("s", "a new worker", |s| {
        s["worker_pid"].as_u64().is_some_and(|p| p != pid as u64) && s["worker_status"] == "Active"
    });
    // The same pass goes on from where it was, and covers every byte once.
    let last = common::daemon::wait_for("the pass completed", || {
        let st = scrub_state(&w);
        (st["last"]["started_ns"].as_u64() == Some(progress.0)).then(|| st["last"].clone())
    })
    .expect("completed");
    assert_eq!(
        last["bytes"].as_u64(),
        Some(total),
        "every byte once: {last}"
    );
    assert_eq!(last["mismatches"], 0);
    let s = w.status("s");
    assert!(s["verify_coverage"].as_f64().unwrap() > 0.99, "{s:#}");
    assert_eq!(s["verify_behind"], false, "{s:#}");
    // Further passes: each starts within a period of the previous one and
    // verifies every byte.
    let mut starts = vec![progress.0];
    while starts.len() < 3 {
        let st = common::daemon::wait_for("another pass", || {
            let st = scrub_state(&w);
            let s = st["last"]["started_ns"].as_u64()?;
            (s != *starts.last().unwrap()).then_some(st)
        })
        .expect("pass");
        assert_eq!(st["last"]["bytes"].as_u64(), Some(total), "{st}");
        starts.push(st["last"]["started_ns"].as_u64().unwrap());
    }
    for pair in starts.windows(2) {
        let gap = Duration::from_nanos(pair[1] - pair[0]);
        assert!(
            gap <= Duration::from_secs(12),
            "passes {gap:?} apart, period 12 s"
        );
        assert!(
            gap >= Duration::from_secs(5),
            "not more often than every half period: {gap:?}"
        );
    }
}

#[test]
fn a_scrub_too_slow_for_its_period_is_behind_schedule() {
    let w = World::new();
    w.create("s", &["--marker", "mark"]);
    fill(&w, 10, 4 << 20);
    // 40 MiB at 1 MiB/s cannot be verified in 10 s.
    w.run_ok(&["config", "s", "set", "scrub_rate", "1M"]);
    w.run_ok(&["config", "s", "set", "scrub_period", "10"]);
    let _run = w.start("s");
    w.wait_active("s");
    let s = w.wait_status("s", "behind schedule", |s| s["verify_behind"] == true);
    assert!(s["verify_coverage"].as_f64().unwrap() < 0.5, "{s:#}");
    let out = w.run(&["status", "s", "--nagios"]);
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{line}");
    assert!(line.contains("behind schedule"), "{line}");
    let detail =
        String::from_utf8_lossy(&w.run_ok(&["status", "s", "--detail"]).stdout).to_string();
    assert!(
        detail.contains("verify coverage") && detail.contains("behind schedule"),
        "{detail}"
    );
}
