//! Resumable transfers: a large file whose transfer is killed (worker and
//! agent at once, at random moments) or stopped resumes on the next sync
//! from the verified durable prefix the agent kept; the resumed file is
//! the master's byte for byte, the bytes not sent again are counted
//! exactly, and partials of a changed master file or past their age are
//! removed.

mod common;

use common::{n, tree, World};
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

const SIZE: usize = 150 << 20;

fn random(len: usize, mut x: u64) -> Vec<u8> {
    x |= 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Bytes of window hashes in the slave's progress records (0: none kept yet).
fn recorded(w: &World) -> u64 {
    std::fs::read_dir(w.slave.join(".georep/partial"))
        .map(|d| {
            d.flatten()
                .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// The slave's temporaries and progress records.
fn partials(w: &World) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(&w.slave)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".georep-tmp-"))
        .collect();
    if let Ok(d) = std::fs::read_dir(w.slave.join(".georep/partial")) {
        names.extend(
            d.flatten()
                .map(|e| format!("record {}", e.file_name().to_string_lossy())),
        );
    }
    names
}

/// Starts a sync in its own process group and waits until the agent has
/// recorded a durable prefix (so the interruption lands mid-transfer).
fn sync_until_recorded(w: &World, session: &str) -> std::process::Child {
    let child = w
        .cmd(&["sync", session])
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while recorded(w) < 100 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(recorded(w) >= 100, "no progress record within two minutes");
    child
}

#[test]
fn killed_transfers_resume_from_the_verified_durable_prefix() {
    let w = World::new();
    w.create("r", &[]);
    // A limit makes a transfer last long enough to be interrupted in the middle.
    w.run_ok(&["config", "r", "set", "bwlimit", "100M"]);
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut rand = move |m: u64| {
        seed ^= seed << 7;
        seed ^= seed >> 9;
        seed % m
    };
    let mut resumed_total = 0;
    for round in 0..4u64 {
        // A new image each round (sent as literals: what resuming is for).
        // Odd seeds, each its own (`random` sets the low bit).
        let data = random(SIZE, 2 * round + 1);
        let _ = std::fs::remove_file(w.master.join(format!("disk{}.img", round.wrapping_sub(1))));
        let name = format!("disk{round}.img");
        std::fs::write(w.master.join(&name), &data).unwrap();
        let before = std::fs::read(w.slave.join(&name)).ok();
        let mut child = sync_until_recorded(&w, "r");
        std::thread::sleep(Duration::from_millis(rand(400)));
        let pg = nix::unistd::Pid::from_raw(child.id() as i32);
        if round == 3 {
            // A stop, as `georep stop` or systemd would: the worker ends the
            // transfer and the agent keeps it for the next run.
            nix::sys::signal::killpg(pg, nix::sys::signal::SIGTERM).unwrap();
        } else {
            nix::sys::signal::killpg(pg, nix::sys::signal::SIGKILL).unwrap();
        }
        let _ = child.wait();
        std::thread::sleep(Duration::from_millis(200));
        // Nothing partial under the final name.
        let now = std::fs::read(w.slave.join(&name)).ok();
        assert!(
            now == before || now.as_deref() == Some(&data[..]),
            "round {round}: a partial file is visible"
        );
        let s = w.sync("r");
        assert_eq!(n(&s, "failures"), 0, "{s}");
        let resumed = n(&s, "bytes_resumed");
        let sent = n(&s, "bytes_literal");
        if now.as_deref() != Some(&data[..]) {
            assert_eq!(
                sent + resumed,
                SIZE as u64,
                "every byte is sent or resumed: {s}"
            );
            assert!(resumed > 0, "round {round}: the kept prefix was used: {s}");
            assert_eq!(resumed % (4 << 20), 0, "whole windows: {s}");
        }
        resumed_total += resumed;
        assert_eq!(
            std::fs::read(w.slave.join(&name)).unwrap(),
            data,
            "round {round}"
        );
        assert_eq!(
            partials(&w),
            Vec::<String>::new(),
            "round {round}: nothing left behind"
        );
    }
    assert!(resumed_total > 0);
    tree::assert_same(&w.master, &w.slave);
}

#[test]
fn stale_partials_are_removed_when_the_master_changed_or_by_age() {
    let w = World::new();
    w.create("p", &[]);
    w.run_ok(&["config", "p", "set", "bwlimit", "100M"]);
    // The master file changes after the interruption: its partial is dropped.
    std::fs::write(w.master.join("disk.img"), random(SIZE, 11)).unwrap();
    let mut c = sync_until_recorded(&w, "p");
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    let _ = c.wait();
    assert_eq!(
        partials(&w).len(),
        2,
        "a temporary and its record are kept: {:?}",
        partials(&w)
    );
    let changed = random(SIZE, 12);
    std::fs::write(w.master.join("disk.img"), &changed).unwrap();
    w.run_ok(&["config", "p", "reset", "bwlimit"]);
    let s = w.sync("p");
    assert_eq!(n(&s, "bytes_resumed"), 0, "another master file: {s}");
    assert_eq!(n(&s, "bytes_literal"), SIZE as u64, "{s}");
    assert_eq!(std::fs::read(w.slave.join("disk.img")).unwrap(), changed);
    assert_eq!(partials(&w), Vec::<String>::new());

    // Past the configured age, a partial is removed at the next sync's start.
    w.run_ok(&["config", "p", "set", "bwlimit", "100M"]);
    std::fs::write(w.master.join("other.img"), random(SIZE, 13)).unwrap();
    let mut c = sync_until_recorded(&w, "p");
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    let _ = c.wait();
    assert_eq!(partials(&w).len(), 2, "{:?}", partials(&w));
    w.run_ok(&["config", "p", "reset", "bwlimit"]);
    w.run_ok(&["config", "p", "set", "partial_max_age_secs", "0"]);
    let s = w.sync("p");
    assert_eq!(n(&s, "bytes_resumed"), 0, "too old to resume: {s}");
    assert_eq!(partials(&w), Vec::<String>::new());
    tree::assert_same(&w.master, &w.slave);
}
