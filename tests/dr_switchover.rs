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

/// One site of the SSH switchover: its tree, its georep home and the sshd
/// that stands for its host (whose sessions run with that home).
struct Site {
    root: PathBuf,
    home: PathBuf,
    sshd: common::sshd::Sshd,
}

impl Site {
    fn run(&self, w: &World, args: &[&str]) -> std::process::Output {
        w.cmd(args).env("GEOREP_HOME", &self.home).output().unwrap()
    }

    fn spec(&self) -> String {
        self.sshd.spec(&self.root)
    }
}

/// `switchover SESSION --reverse NEXT` run on `here`, whose slave is on `there`.
fn ssh_switchover_args(session: &str, next: &str, here: &Site, there: &Site) -> Vec<String> {
    [
        "switchover",
        session,
        "--reverse",
        next,
        "--wait-quiet",
        "1",
        "--identity",
        there.sshd.operator_key.to_str().unwrap(),
        "--reverse-slave",
        &here.spec(),
        "--push-pem",
        "--reverse-ssh-port",
        &here.sshd.port.to_string(),
        "--reverse-identity",
        here.sshd.operator_key.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn ssh_switchover_there_and_back_twice_loses_nothing() {
    let w = World::new();
    let home_b = w.dir.path().join("home-b");
    std::fs::create_dir_all(&home_b).unwrap();
    std::fs::create_dir_all(&w.slave).unwrap();
    let a = Site {
        root: w.master.clone(),
        home: w.home.clone(),
        sshd: common::sshd::Sshd::start_with_env(&[("GEOREP_HOME", &w.home)]),
    };
    let b = Site {
        root: w.slave.clone(),
        home: home_b.clone(),
        sshd: common::sshd::Sshd::start_with_env(&[("GEOREP_HOME", &home_b)]),
    };
    w.create_ssh(&b.sshd, "s0", &["--marker", "mark"]);
    for i in 0..20 {
        write_marked(&a.root, &format!("d{}/f{i}", i % 4), i);
    }
    std::os::unix::fs::symlink("d1/f1", a.root.join("link")).unwrap();
    w.sync("s0");

    // Refused, nothing done: the access to B runs only the agent (here:
    // the session's own key, a forced command).
    let key = a.home.join("sessions/s0/ssh_key");
    let mut args = ssh_switchover_args("s0", "s1", &a, &b);
    let at = args.iter().position(|x| x == "--identity").unwrap();
    args[at + 1] = key.display().to_string();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = a.run(&w, &args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("forced command"), "{err}");
    assert!(err.contains("--peer-admin"), "{err}");
    assert!(
        err.contains(&format!("georep promote {}", b.root.display())),
        "{err}"
    );
    assert_eq!(
        georep::fs::role::read(&b.root).unwrap().unwrap().role,
        georep::fs::role::Role::Replica
    );
    assert!(georep::fs::role::read(&a.root).unwrap().is_none());
    // Without --reverse-slave: refused too, naming it.
    let out = a.run(&w, &["switchover", "s0", "--reverse", "s1", "--force"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--reverse-slave"), "{}", stderr(&out));
    let s = w.sync("s0");
    assert_eq!(common::n(&s, "bytes_sent"), 0, "{s}");

    let sites = [&a, &b];
    let mut session = "s0".to_string();
    let mut written: Vec<String> = Vec::new();
    for round in 1..=4usize {
        let (here, there) = (sites[(round + 1) % 2], sites[round % 2]);
        // The master changed right up to the switchover.
        let name = format!("round{round}/new");
        write_marked(&here.root, &name, 100 + round as u64);
        written.push(name);
        std::fs::remove_file(here.root.join(format!("d{}/f{round}", round % 4))).unwrap();
        common::mark(&here.root.join(format!("d{}", round % 4)));
        let next = format!("s{round}");
        let mut args = ssh_switchover_args(&session, &next, here, there);
        if round == 1 {
            // Killed at moments through it (the final sync, the promote,
            // the steps on B); the run after converges.
            let mut forced = args.clone();
            forced.push("--force".into());
            let forced: Vec<&str> = forced.iter().map(String::as_str).collect();
            for ms in [300u64, 1200, 2500, 4000] {
                dr::kill_after(&w, &forced, ms);
            }
        }
        if round >= 3 {
            args.extend([
                "--peer-admin".into(),
                format!("{}@127.0.0.1", there.sshd.user),
            ]);
        }
        if round == 4 {
            args.push("--start".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = here.run(&w, &args);
        assert!(out.status.success(), "round {round}: {}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("switched over"), "round {round}: {text}");
        // RPO 0: content and metadata equal, everything written is there.
        let d = tree::differences(&here.root, &there.root);
        assert!(
            d.is_empty(),
            "round {round}: {d:?} {:?} {:?}",
            std::fs::metadata(&here.root).unwrap().modified(),
            std::fs::metadata(&there.root).unwrap().modified()
        );
        for n in &written {
            assert!(there.root.join(n).is_file(), "round {round}: {n} lost");
        }
        let (live, demoted) = (
            georep::fs::role::read(&there.root).unwrap().unwrap(),
            georep::fs::role::read(&here.root).unwrap().unwrap(),
        );
        assert!(live.is_live(), "round {round}");
        assert_eq!(live.epoch, round as u64);
        assert_eq!(demoted.role, georep::fs::role::Role::Demoted);
        // The old direction is fenced: its master is demoted.
        let old = here.run(&w, &["sync", &session]);
        assert_eq!(
            old.status.code(),
            Some(4),
            "round {round}: {}",
            stderr(&old)
        );
        // Run again: it says where things stand and changes nothing.
        if round == 1 || round == 4 {
            let mut again = ssh_switchover_args(&session, &next, here, there);
            again.push("--force".into());
            let again: Vec<&str> = again.iter().map(String::as_str).collect();
            let out = here.run(&w, &again);
            assert!(out.status.success(), "round {round}: {}", stderr(&out));
        }
        if round == 4 {
            let st = there.run(&w, &["stop", &next]);
            assert!(st.status.success(), "{}", stderr(&st));
        }
        // The reverse session lives on the other site and has nothing to send.
        let out = there.run(&w, &["sync", &next, "--json"]);
        assert!(out.status.success(), "round {round}: {}", stderr(&out));
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(common::n(&s, "bytes_sent"), 0, "round {round}: {s}");
        assert_eq!(common::n(&s, "deletes"), 0, "round {round}: {s}");
        // A write on the new master travels with the next round.
        let n = format!("after{round}");
        write_marked(&there.root, &n, 200 + round as u64);
        written.push(n);
        session = next;
    }
    // Back on A, which holds everything written on either side.
    let out = a.run(&w, &["sync", &session, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    tree::assert_same(&a.root, &b.root);
    for n in &written {
        assert!(a.root.join(n).is_file(), "{n} lost");
    }
}
