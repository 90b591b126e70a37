//! Changing the link's settings of a running session (bandwidth limit and
//! schedule, streams, compression, keep-alive) restarts nothing: the
//! worker applies the limit within seconds and reconnects between crawls
//! for the rest, so its watcher keeps marker continuity and the next crawl
//! is an xtime crawl, not a full crawl. Status shows the limit and rate.

mod common;

use common::daemon::wait_for;
use common::World;

fn crawls(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("crawl done")).collect()
}

#[test]
fn link_settings_change_live_and_keep_continuity() {
    let w = World::new();
    std::fs::write(w.master.join("first"), b"one").unwrap();
    w.create("l", &[]);
    let _r = w.start("l");
    let st = w.wait_active("l");
    let worker = st["worker_pid"].as_u64().unwrap();
    assert_eq!(st["streams"], 1, "{st:#}");
    assert!(st["bwlimit"].is_null(), "{st:#}");
    assert!(st["rate"].is_u64(), "{st:#}");

    // A limit: in force within seconds, same worker.
    w.run_ok(&["config", "l", "set", "bwlimit", "5M"]);
    let st = w.wait_status("l", "the limit in force", |s| s["bwlimit"] == 5 << 20);
    assert_eq!(st["worker_pid"], worker, "{st:#}");

    // Link settings: the worker reconnects between crawls, keeps its watcher.
    let full_before = w.log("l").matches("full crawl").count();
    w.run_ok(&["config", "l", "set", "streams", "2"]);
    w.run_ok(&["config", "l", "set", "compression", "zstd:3"]);
    w.run_ok(&["config", "l", "set", "keepalive_secs", "40"]);
    w.run_ok(&["config", "l", "reset", "bwlimit"]);
    // Let the worker read the new settings before the change it syncs.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let text: Vec<u8> = b"compressible line of text\n".repeat(40_000);
    std::fs::write(w.master.join("second"), &text).unwrap();
    wait_for("the change on the slave", || {
        (std::fs::read(w.slave.join("second")).ok()? == text).then_some(())
    })
    .expect("the change reached the slave");
    let st = w.wait_status("l", "two streams and no limit", |s| {
        s["streams"] == 2 && s["bwlimit"].is_null() && s["crawl_status"] == "Idle"
    });
    assert_eq!(st["worker_pid"], worker, "no restart: {st:#}");
    assert_eq!(st["restarts"], 0, "{st:#}");
    assert!(
        st["compression_ratio"].as_f64().is_some_and(|r| r < 0.5),
        "compressed: {st:#}"
    );
    let log = w.log("l");
    assert!(log.contains("link settings changed"), "{log}");
    assert!(log.contains("applied by the running worker"), "{log}");
    assert_eq!(
        log.matches("full crawl").count(),
        full_before,
        "no full crawl after the change: {log}"
    );
    let after: Vec<&str> = crawls(&log)
        .into_iter()
        .filter(|l| l.contains("streams=2"))
        .collect();
    assert!(!after.is_empty(), "{log}");
    assert!(after.iter().all(|l| l.contains("xtime")), "{after:?}");
    assert!(
        after.iter().any(|l| l.contains("files_synced=1")),
        "the change went by an xtime crawl over two streams: {after:?}"
    );

    // A setting that is not live still restarts the worker.
    w.run_ok(&["config", "l", "set", "interval_secs", "99"]);
    w.wait_status("l", "a new worker", |s| {
        s["worker_pid"] != worker && s["worker_status"] == "Active"
    });
}

#[test]
fn a_limited_sync_charges_every_byte_it_sends_to_the_bucket() {
    let w = World::new();
    let mut x = 9u64;
    let data: Vec<u8> = (0..(20 << 20))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(w.master.join("random.img"), &data).unwrap();
    w.create("b", &[]);
    w.run_ok(&["config", "b", "set", "bwlimit", "40M"]);
    assert_eq!(
        String::from_utf8(w.run_ok(&["config", "b", "get", "bwlimit"]).stdout)
            .unwrap()
            .trim(),
        (40u64 << 20).to_string()
    );
    let s = w.sync("b");
    assert_eq!(s["bwlimit"], 40 << 20, "{s}");
    assert_eq!(
        s["bwlimit_bytes"], s["wire_bytes_out"],
        "every frame is charged: {s}"
    );
    assert!(common::n(&s, "wire_bytes_out") > 20 << 20, "{s}");
    common::tree::assert_same(&w.master, &w.slave);
    // A schedule that covers every day and hour overrides it.
    w.run_ok(&[
        "config",
        "b",
        "set",
        "bwlimit_schedule",
        "* 00:00-24:00 off",
    ]);
    std::fs::write(w.master.join("more"), &data[..1 << 20]).unwrap();
    let s = w.sync("b");
    assert!(s["bwlimit"].is_null(), "{s}");
    assert_eq!(s["bwlimit_bytes"], 0, "{s}");
    let bad = w.run(&["config", "b", "set", "bwlimit_schedule", "weekdays 20M"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        common::stderr(&bad).contains("DAYS [HH:MM-HH:MM] LIMIT"),
        "{}",
        common::stderr(&bad)
    );
}
