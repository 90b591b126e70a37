//! Planned switchover: A -> B -> A, twice, with zero loss; refused while
//! writers are active; a killed switchover run again converges; the old
//! direction is fenced after each.

mod common;

use common::{dr, mutate, stderr, tree, World};
use std::path::PathBuf;

fn write_marked(root: &std::path::Path, name: &str, seed: u64) {
    let p = root.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, mutate::data(seed, 20_000 + seed as usize * 100)).unwrap();
    common::mark(&p);
}

#[test]
fn switchover_there_and_back_twice_loses_nothing() {
    let w = World::new();
    w.create("s0", &["--marker", "mark"]);
    for i in 0..30 {
        write_marked(&w.master, &format!("d{}/f{i}", i % 5), i);
    }
    w.sync("s0");
    let mut cur = ("s0".to_string(), w.master.clone(), w.slave.clone());
    let mut written: Vec<(PathBuf, String)> = Vec::new();
    for round in 1..=4u64 {
        let (session, master, slave) = cur.clone();
        // The master changed right up to the switchover.
        let name = format!("round{round}/new");
        write_marked(&master, &name, 100 + round);
        written.push((master.clone(), name.clone()));
        std::fs::remove_file(master.join(format!("d{}/f{round}", round % 5))).unwrap();
        common::mark(&master.join(format!("d{}", round % 5)));
        let next = format!("s{round}");
        let out = w.run(&[
            "switchover",
            &session,
            "--reverse",
            &next,
            "--wait-quiet",
            "1",
        ]);
        assert!(out.status.success(), "round {round}: {}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("switched over"), "{text}");
        // RPO 0: both sides equal, everything ever written is there.
        tree::assert_same(&master, &slave);
        for (_, n) in &written {
            assert!(slave.join(n).is_file(), "round {round}: {n} lost");
        }
        let roles = (
            georep::fs::role::read(&slave).unwrap().unwrap(),
            georep::fs::role::read(&master).unwrap().unwrap(),
        );
        assert!(roles.0.is_live(), "round {round}");
        assert_eq!(roles.0.epoch, round);
        assert_eq!(roles.1.role, georep::fs::role::Role::Demoted);
        // The old direction is fenced.
        let old = w.run(&["sync", &session]);
        assert_eq!(
            old.status.code(),
            Some(4),
            "round {round}: {}",
            stderr(&old)
        );
        // The reverse session runs and has nothing to send.
        let s = w.sync(&next);
        assert_eq!(common::n(&s, "bytes_sent"), 0, "round {round}: {s}");
        assert_eq!(common::n(&s, "deletes"), 0, "round {round}: {s}");
        cur = (next, slave, master);
    }
    assert_eq!(cur.1, w.master, "back on A after four switchovers");
}

#[test]
fn switchover_is_refused_while_writers_are_active_and_converges_when_killed() {
    let w = World::new();
    w.create("s0", &[]);
    for i in 0..10 {
        write_marked(&w.master, &format!("f{i}"), i);
    }
    w.sync("s0");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, p) = (stop.clone(), w.master.join("busy.log"));
        std::thread::spawn(move || {
            let mut k = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::fs::write(&p, k.to_le_bytes()).unwrap();
                k += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        })
    };
    let out = w.run(&["switchover", "s0", "--reverse", "back", "--wait-quiet", "1"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("busy.log"), "{}", stderr(&out));
    assert!(stderr(&out).contains("not quiet"), "{}", stderr(&out));
    assert_eq!(stderr(&out).trim().lines().count(), 1);
    assert!(
        georep::fs::role::read(&w.slave).unwrap().unwrap().role == georep::fs::role::Role::Replica
    );
    // Killed at moments through the switchover; each run again converges.
    for ms in [5u64, 40, 90, 150, 300] {
        dr::kill_after(
            &w,
            &["switchover", "s0", "--reverse", "back", "--force"],
            ms,
        );
    }
    w.run_ok(&["switchover", "s0", "--reverse", "back", "--force"]);
    tree::assert_same(&w.master, &w.slave);
    assert!(georep::fs::role::read(&w.slave).unwrap().unwrap().is_live());
    let s = w.sync("back");
    assert_eq!(common::n(&s, "bytes_sent"), 0, "{s}");
    // A second switchover of the old session says where things stand.
    let again = w.run(&["switchover", "s0", "--reverse", "back", "--force"]);
    assert!(again.status.success(), "{}", stderr(&again));
}
