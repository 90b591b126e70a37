//! Monitoring reads only files: the Prometheus output parsed by the
//! reference parser (Python's prometheus_client, installed by
//! packaging/setup.sh), and the Nagios check's exit code in every state.

mod common;

use common::daemon::{pid, signal, wait_for, Running};
use common::World;
use nix::sys::signal::Signal;
use serde_json::Value;
use std::io::Write;
use std::process::{Command, Stdio};

const PARSER: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append({"family": fam.name, "type": fam.type, "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

fn python_with_prometheus_client() -> String {
    for py in ["/usr/bin/python3", "python3"] {
        let ok = Command::new(py)
            .args(["-c", "import prometheus_client"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return py.to_string();
        }
    }
    panic!("no python3 with prometheus_client: run packaging/setup.sh (it installs python3-prometheus-client)");
}

/// Parses exposition text with the reference parser; returns its samples.
fn parse_prometheus(text: &str) -> Vec<Value> {
    let mut child = Command::new(python_with_prometheus_client())
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the exposition parser rejected georep's output: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

fn sample(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .and_then(|s| s["value"].as_f64())
}

#[test]
fn prometheus_output_parses_with_the_reference_parser() {
    let w = World::new();
    std::fs::write(w.master.join("disk.img"), vec![7u8; 100_000]).unwrap();
    w.create("run", &[]);
    // A second session, never started, with a name that needs no escaping and
    // a master path that does (quotes and a backslash in label values).
    let odd = w.dir.path().join("odd \"master\\");
    std::fs::create_dir_all(&odd).unwrap();
    w.run_ok(&[
        "create",
        "idle",
        odd.to_str().unwrap(),
        w.dir.path().join("slave2").to_str().unwrap(),
    ]);
    let _r = w.start("run");
    w.wait_active("run");
    w.run_ok(&["checkpoint", "run", "now"]);
    w.wait_status("run", "the checkpoint", |s| {
        s["checkpoint_completed"] == true
    });
    // The worker may be between two crawls of its idle master: read the
    // metrics again until it reports Idle (what the assertions below check).
    let run = [("session", "run")];
    let idle = [("session", "run"), ("status", "Idle")];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let samples = loop {
        let text = String::from_utf8(w.run_ok(&["status", "--prometheus"]).stdout).unwrap();
        let samples = parse_prometheus(&text);
        if sample(&samples, "georep_crawl_status", &idle) == Some(1.0)
            || std::time::Instant::now() > deadline
        {
            break samples;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(sample(&samples, "georep_up", &run), Some(1.0));
    assert_eq!(
        sample(&samples, "georep_up", &[("session", "idle")]),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &samples,
            "georep_worker_status",
            &[("session", "run"), ("status", "Active")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &samples,
            "georep_worker_status",
            &[("session", "run"), ("status", "Faulty")]
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &samples,
            "georep_monitor_status",
            &[("session", "idle"), ("status", "Created")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &samples,
            "georep_crawl_status",
            &[("session", "run"), ("status", "Idle")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&samples, "georep_files_synced_total", &run),
        Some(1.0)
    );
    assert_eq!(
        sample(&samples, "georep_bytes_sent_total", &run),
        Some(100_000.0)
    );
    assert_eq!(sample(&samples, "georep_failures_total", &run), Some(0.0));
    assert_eq!(sample(&samples, "georep_restarts_total", &run), Some(0.0));
    assert_eq!(
        sample(&samples, "georep_checkpoint_completed", &run),
        Some(1.0)
    );
    assert!(sample(&samples, "georep_lag_seconds", &run).is_some_and(|l| l >= 0.0));
    assert!(
        sample(&samples, "georep_last_synced_timestamp_seconds", &run).is_some_and(|t| t > 1.6e9)
    );
    assert!(sample(
        &samples,
        "georep_checkpoint_completion_timestamp_seconds",
        &run
    )
    .is_some());
    assert_eq!(
        sample(
            &samples,
            "georep_pending",
            &[("session", "run"), ("kind", "data")]
        ),
        Some(0.0)
    );
    let info = samples
        .iter()
        .find(|s| s["name"] == "georep_info" && s["labels"]["session"] == "idle")
        .expect("georep_info of idle");
    assert_eq!(info["labels"]["master"], odd.to_str().unwrap());
    let counter = samples
        .iter()
        .find(|s| s["name"] == "georep_bytes_sent_total")
        .unwrap();
    assert_eq!(counter["type"], "counter");
}

fn nagios(w: &World, s: &str, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["status", s, "--nagios"];
    args.extend_from_slice(extra);
    let out = w.run(&args);
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.code().expect("an exit code"), line)
}

/// Polls the check until it gives `code` (the state it reflects may still be settling).
fn nagios_until(w: &World, s: &str, extra: &[&str], code: i32) -> String {
    let mut last = (0, String::new());
    wait_for(&format!("nagios exit {code}"), || {
        last = nagios(w, s, extra);
        (last.0 == code).then(|| last.1.clone())
    })
    .unwrap_or_else(|| panic!("the check never exited {code}; last: {last:?}"))
}

#[test]
fn nagios_exit_codes_follow_the_state() {
    let w = World::new();
    std::fs::write(w.master.join("f"), b"x").unwrap();
    w.create("n", &[]);
    let (code, line) = nagios(&w, "n", &[]);
    assert_eq!(code, 2, "never started: {line}");
    assert_eq!(nagios(&w, "nosuch", &[]).0, 3);
    assert_eq!(
        nagios(&w, "n", &["--warning", "100", "--critical", "10"]).0,
        3
    );

    let _r = w.start("n");
    w.wait_active("n");
    let line = nagios_until(&w, "n", &[], 0);
    assert!(line.starts_with("GEOREP OK - n: Active"), "{line}");
    let perf = line.split_once(" | ").expect("perfdata").1;
    assert!(
        perf.starts_with("lag=") && perf.contains("failures=0c"),
        "{perf}"
    );
    // Lag thresholds: any lag is >= 0.
    assert_eq!(
        nagios(&w, "n", &["--warning", "0", "--critical", "100000"]).0,
        1
    );
    assert_eq!(nagios(&w, "n", &["--warning", "0", "--critical", "0"]).0, 2);

    w.run_ok(&["pause", "n"]);
    assert_eq!(nagios(&w, "n", &[]).0, 1);
    w.run_ok(&["resume", "n"]);
    nagios_until(&w, "n", &[], 0);

    // The slave replaced by a plain file: every attempt fails, the worker is Faulty.
    std::fs::rename(&w.slave, w.dir.path().join("slave.moved")).unwrap();
    std::fs::write(&w.slave, b"not a directory").unwrap();
    w.run_ok(&["checkpoint", "n", "now"]); // stamps the root: the worker must crawl again
    let line = nagios_until(&w, "n", &[], 2);
    assert!(line.contains("Faulty"), "{line}");
    std::fs::remove_file(&w.slave).unwrap();
    std::fs::rename(w.dir.path().join("slave.moved"), &w.slave).unwrap();
    nagios_until(&w, "n", &[], 0);

    // A killed monitor is critical, and so is a stopped session.
    let st = w.status("n");
    signal(pid(&st, "monitor_pid"), Signal::SIGKILL);
    let line = nagios_until(&w, "n", &[], 2);
    assert!(line.contains("not running"), "{line}");
    w.run_ok(&["start", "n"]);
    nagios_until(&w, "n", &[], 0);
    w.run_ok(&["stop", "n"]);
    assert_eq!(nagios(&w, "n", &[]).0, 2);
    drop(Running {
        w: &w,
        session: "n".into(),
    });
}
