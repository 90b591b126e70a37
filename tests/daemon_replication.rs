//! The daemon replicating: a plain writer (never calling `mark`) reaching
//! the slave through the watcher, checkpoints, and a stop in the middle of
//! a large transfer. Real processes and file systems; polls, no timings.

mod common;

use common::daemon::{wait_for, wait_same};
use common::{mutate, tree, World};
use proptest::strategy::{Strategy, ValueTree};
use std::io::Write;
use std::time::{Duration, Instant};

#[test]
fn a_plain_writer_reaches_the_slave_without_marks_and_without_loops() {
    let w = World::new();
    for i in 0..30 {
        let d = w.master.join(format!("hosts/h{}", i % 3));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("disk{i}.img")), vec![i as u8; 5000 * i]).unwrap();
    }
    w.create("c", &[]);
    let _r = w.start("c");
    w.wait_active("c");
    wait_same(&w.master, &w.slave, "initial sync");

    // Latency of one unmarked write (reported, never asserted).
    let t = Instant::now();
    std::fs::write(w.master.join("hosts/h1/new.qcow2"), b"fresh data").unwrap();
    wait_for("the new file on the slave", || {
        (std::fs::read(w.slave.join("hosts/h1/new.qcow2")).ok()? == b"fresh data").then_some(())
    })
    .expect("an unmarked write reaches the slave");
    eprintln!(
        "latency of one unmarked write to the slave: {:?}",
        t.elapsed()
    );

    // Rounds of random mutations by a writer that never marks anything.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let ops = proptest::collection::vec(mutate::op(), 25);
    let rounds: usize = std::env::var("GEOREP_DAEMON_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    for round in 0..rounds {
        for op in ops.new_tree(&mut runner).unwrap().current() {
            mutate::apply(&w.master, &op);
        }
        wait_same(&w.master, &w.slave, &format!("round {round}"));
    }
    let st = w.wait_active("c");
    assert_eq!(st["restarts"], 0, "{st:#}");

    // Converged and quiet: georep's own stamps and stimes trigger no crawls.
    let crawls = |w: &World| w.log("c").matches("crawl done").count();
    let before = crawls(&w);
    std::thread::sleep(Duration::from_secs(3));
    let after = crawls(&w);
    assert!(
        after <= before + 1,
        "{} crawls on a quiet master: georep reacts to its own writes\n{}",
        after - before,
        w.log("c")
    );
}

fn checkpoint_state(w: &World, s: &str) -> (bool, Option<String>, Option<String>) {
    let st = w.status(s);
    (
        st["checkpoint_completed"].as_bool().unwrap(),
        st["checkpoint_time"].as_str().map(String::from),
        st["checkpoint_completion_time"].as_str().map(String::from),
    )
}

#[test]
fn a_checkpoint_completes_only_once_its_data_is_on_the_slave() {
    let w = World::new();
    std::fs::write(w.master.join("base"), b"base").unwrap();
    w.create("k", &[]);
    let _r = w.start("k");
    w.wait_active("k");
    // Paused, nothing moves: changes made now cannot reach the slave yet.
    w.run_ok(&["pause", "k"]);
    let data: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("snap{i}.qcow2"), vec![b'a' + i as u8; 3 << 20]))
        .collect();
    for (name, bytes) in &data {
        std::fs::write(w.master.join(name), bytes).unwrap();
    }
    w.run_ok(&["checkpoint", "k", "now"]);
    let (done, time, _) = checkpoint_state(&w, "k");
    assert!(!done, "completed while paused with its data missing");
    let t = time.expect("checkpoint_time set");
    assert!(!w.slave.join("snap0.qcow2").exists());
    w.run_ok(&["resume", "k"]);
    let completion = wait_for("the checkpoint to complete", || {
        let (done, _, when) = checkpoint_state(&w, "k");
        if !done {
            return None;
        }
        // Completed: everything written before it must be on the slave now.
        for (name, bytes) in &data {
            assert_eq!(
                std::fs::read(w.slave.join(name)).ok().as_ref(),
                Some(bytes),
                "checkpoint completed but {name} is not on the slave"
            );
        }
        when
    })
    .expect("the checkpoint completes");
    assert!(
        completion >= t,
        "completed at {completion}, before its time {t}"
    );
    let detail = String::from_utf8(w.run_ok(&["status", "k", "--detail"]).stdout).unwrap();
    assert!(
        detail.contains("checkpoint completed      : Yes"),
        "{detail}"
    );

    // A checkpoint a few seconds ahead completes once its time has come.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3;
    w.run_ok(&["checkpoint", "k", &format!("@{secs}")]);
    let (done, _, _) = checkpoint_state(&w, "k");
    assert!(!done, "a future checkpoint cannot be complete yet");
    let when = wait_for("the future checkpoint to complete", || {
        let (done, _, when) = checkpoint_state(&w, "k");
        done.then_some(when).flatten()
    })
    .unwrap();
    let when_ns = georep_monitor::time::parse_rfc3339(&when).unwrap();
    assert!(
        when_ns >= secs * 1_000_000_000,
        "completed at {when}, before @{secs}"
    );

    let out = w.run(&["checkpoint", "k", "tomorrow"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        common::stderr(&out).contains("RFC 3339"),
        "{}",
        common::stderr(&out)
    );
}

fn big_file(path: &std::path::Path, mib: u64, seed: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut block = vec![0u8; 1 << 20];
    for i in 0..mib {
        for (j, c) in block.chunks_mut(8).enumerate() {
            c.copy_from_slice(
                &(seed ^ (i << 20) ^ j as u64)
                    .wrapping_mul(0x9e3779b97f4a7c15)
                    .to_le_bytes(),
            );
        }
        f.write_all(&block).unwrap();
    }
    f.flush().unwrap();
}

#[test]
fn stop_with_a_large_file_in_flight_leaves_no_partial_file() {
    let w = World::new();
    let names: Vec<String> = (0..4).map(|i| format!("image{i}.raw")).collect();
    for (i, n) in names.iter().enumerate() {
        big_file(&w.master.join(n), 256, i as u64);
    }
    w.create("l", &[]);
    let running = w.start("l");
    wait_for(
        "a transfer in flight (a temporary file on the slave)",
        || (!tree::temporaries(&w.slave).is_empty()).then_some(()),
    )
    .expect("a large transfer to catch in flight");
    w.run_ok(&["stop", "l"]);
    let st = w.status("l");
    assert_eq!(st["monitor_status"], "Stopped", "{st:#}");
    assert!(w.processes().is_empty(), "left behind: {:?}", w.processes());
    let mut partial = 0;
    for n in &names {
        match std::fs::read(w.slave.join(n)) {
            Ok(data) => assert!(
                data == std::fs::read(w.master.join(n)).unwrap(),
                "{n}: partial content visible on the slave after stop"
            ),
            Err(_) => partial += 1,
        }
    }
    assert!(
        partial > 0,
        "every file was complete: the stop did not interrupt a transfer"
    );
    drop(running);
    // The next run converges and leaves no temporary behind.
    let _r = w.start("l");
    w.wait_active("l");
    wait_same(&w.master, &w.slave, "after restart");
    assert!(
        tree::temporaries(&w.slave).is_empty(),
        "{:?}",
        tree::temporaries(&w.slave)
    );
}

#[test]
fn interval_mode_passes_and_the_mark_policy_without_a_watcher() {
    // Interval mode: one pass per interval; unmarked changes still stamped by the watcher.
    let w = World::new();
    std::fs::write(w.master.join("a"), b"1").unwrap();
    w.create("i", &["--mode", "interval", "--interval", "2"]);
    let _r = w.start("i");
    w.wait_active("i");
    wait_same(&w.master, &w.slave, "first pass");
    let before = w.status("i");
    std::fs::write(w.master.join("b"), b"2").unwrap();
    wait_same(&w.master, &w.slave, "next pass");
    let after = w.wait_status("i", "last_synced to move", |s| {
        s["last_synced"] != before["last_synced"]
    });
    assert_eq!(after["restarts"], 0);

    // marker = mark: no watcher; a writer's `georep mark` triggers the crawl.
    let w = World::new();
    std::fs::write(w.master.join("a"), b"1").unwrap();
    w.create("m", &["--marker", "mark"]);
    let _r = w.start("m");
    w.wait_active("m");
    std::fs::create_dir(w.master.join("d")).unwrap();
    std::fs::write(w.master.join("d/new"), b"marked").unwrap();
    w.run_ok(&["mark", w.master.join("d/new").to_str().unwrap()]);
    wait_same(&w.master, &w.slave, "a marked change");
    assert!(
        !w.log("m").contains("watcher started"),
        "marker = mark runs no watcher"
    );
}
