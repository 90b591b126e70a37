//! Disaster recovery, the bad inputs and the faults: promote of what is not
//! a replica, promote rolling back unfinished work and killed at random
//! moments, a returning old master fenced (status Faulty, the promoted store
//! byte for byte untouched), failback onto a stranger, failback killed at
//! random moments, and the quarantine's restore and discard.

mod common;

use common::dr::{self, Tree};
use common::{n, stderr, World};
use georep::protocol::{Reply, Request};
use std::path::Path;

fn write(p: &Path, data: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
    common::mark(p);
}

/// A replicated tree: A with a few files, synced to B.
fn replicated(w: &World) {
    w.create("s1", &["--marker", "mark"]);
    for i in 0..20u64 {
        write(
            &w.master.join(format!("d{}/f{i}", i % 4)),
            &common::mutate::data(i, 5000 + i as usize * 3000),
        );
    }
    w.sync("s1");
}

#[test]
fn promote_refuses_what_is_not_a_replica_and_a_second_promote_says_so() {
    let w = World::new();
    std::fs::write(w.master.join("x"), b"x").unwrap();
    let out = w.run(&["promote", w.master.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is not a georep replica"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).trim().lines().count(), 1);
    let out = w.run(&["promote", "/nonexistent/replica"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    replicated(&w);
    let r = dr::promote(&w, &w.slave);
    assert_eq!(r["already"], false);
    assert!(r["last_synced"].is_string(), "{r}");
    let again = w.run_ok(&["promote", w.slave.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(text.contains("is already promoted"), "{text}");
    let r2 = dr::promote(&w, &w.slave);
    assert_eq!(r2["already"], true);
    assert_eq!(r2["epoch"], r["epoch"]);
}

#[test]
fn promote_rolls_back_unfinished_work_and_converges_when_killed() {
    let w = World::new();
    replicated(&w);
    let img = w.slave.join("d0/f0");
    let old = std::fs::read(&img).unwrap();
    for round in 0..12u64 {
        // Unfinished work of a dead worker: an in-place update cut short
        // (undo log), temporaries, beside the data.
        let mut a = common::raw_agent::RawAgent::start(&w.slave);
        let r = a.call(Request::OpenInPlace {
            fid: 1,
            path: georep::fs::relpath::RelPath::new(b"d0/f0".to_vec()).unwrap(),
            size: old.len() as u64,
        });
        if round == 0 {
            assert!(
                matches!(r.result, Ok(Reply::OpenedInPlace { in_place: true, .. })),
                "{r:?}"
            );
        }
        a.post(Request::Write {
            fid: 1,
            offset: 0,
            data: serde_bytes::ByteBuf::from(vec![0xAB; 4096]),
        });
        assert!(matches!(a.call(Request::Ping).result, Ok(Reply::Pong)));
        a.kill();
        std::fs::write(w.slave.join("d1/.georep-tmp-0123456789abcdef"), b"partial").unwrap();
        if round < 11 {
            // Killed somewhere: the root is a replica or promoted, never half of it.
            dr::kill_after(&w, &["promote", w.slave.to_str().unwrap()], round * 3);
            if georep::fs::role::read(&w.slave).unwrap().unwrap().is_live() {
                // Promoted already: put it back as a replica for the next round.
                let mut r = georep::fs::role::read(&w.slave).unwrap().unwrap();
                r.role = georep::fs::role::Role::Replica;
                r.epoch = 0;
                georep::fs::role::write(&w.slave, &r).unwrap();
            }
            continue;
        }
        let rep = dr::promote(&w, &w.slave);
        assert_eq!(rep["epoch"], 1, "{rep}");
        assert!(n(&rep["cleaned"], "temporaries") >= 1, "{rep}");
    }
    assert_eq!(
        std::fs::read(&img).unwrap(),
        old,
        "the in-place update was rolled back"
    );
    assert!(common::tree::temporaries(&w.slave).is_empty());
    assert!(std::fs::read_dir(w.slave.join(".georep/undo"))
        .map(|d| d.count() == 0)
        .unwrap_or(true));
    // Only the directory where the test planted temporaries moved (its mtime).
    let diffs = common::tree::differences(&w.master, &w.slave);
    assert!(
        diffs.iter().all(|d| d.starts_with("d1: mtime")),
        "{diffs:?}"
    );
}

#[test]
fn a_returning_old_master_is_fenced_and_the_promoted_store_untouched() {
    let w = World::new();
    w.create("s1", &[]);
    write(&w.master.join("a/f"), b"first");
    {
        let _r = w.start("s1");
        common::daemon::wait_same(&w.master, &w.slave, "initial replication");
        w.wait_active("s1");
    }
    // The disaster: B is promoted and lives on.
    dr::promote(&w, &w.slave);
    std::fs::write(w.slave.join("a/f"), b"written on B after promote").unwrap();
    let before = dr::snap(&w.slave);
    let role = std::fs::read(w.slave.join(".georep/role.json")).unwrap();
    // A comes back with its old session.
    write(&w.master.join("a/f"), b"A's late write");
    write(&w.master.join("a/g"), b"A's new file");
    let _r = w.start("s1");
    let st = w.wait_status("s1", "the old worker fenced", |s| {
        s["worker_status"] == "Faulty"
            && s["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("was promoted at"))
    });
    let e = st["last_error"].as_str().unwrap();
    assert!(e.contains("it is a live store now"), "{e}");
    assert!(e.contains("--failback"), "{e}");
    assert!(!e.contains('\n'));
    assert_eq!(st["role"], "master");
    let prom = w.run_ok(&["status", "--prometheus"]);
    let prom = String::from_utf8_lossy(&prom.stdout);
    assert!(
        prom.contains("georep_role{session=\"s1\",role=\"master\"} 1"),
        "{prom}"
    );
    assert!(
        prom.contains("georep_role{session=\"s1\",role=\"promoted\"} 0"),
        "{prom}"
    );
    // A one-shot sync gets the same one line.
    drop(_r);
    let out = w.run(&["sync", "s1"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("was promoted at"));
    // Byte for byte and metadata for metadata, B is as it was.
    let after = dr::snap(&w.slave);
    assert_eq!(before, after);
    assert_eq!(
        std::fs::read(w.slave.join(".georep/role.json")).unwrap(),
        role
    );
}

/// A replicated, then diverged pair: B promoted and changed, A diverged.
fn diverged(w: &World) -> (Tree, Tree, Tree) {
    replicated(w);
    write(&w.master.join("d0/f0"), b"A changed f0 after the last sync");
    write(&w.master.join("new/onA"), b"A's new file");
    write(&w.master.join("d1/f1"), b"A changed f1 too");
    dr::promote(w, &w.slave);
    let b_promote = dr::snap(&w.slave);
    std::fs::write(w.slave.join("d1/f1"), b"B changed f1: a conflict").unwrap();
    std::fs::write(w.slave.join("d2/onB"), common::mutate::data(7, 300_000)).unwrap();
    (b_promote, dr::snap(&w.slave), dr::snap(&w.master))
}

#[test]
fn failback_onto_a_stranger_is_refused_unless_forced_and_a_plain_session_onto_the_old_master_too() {
    let w = World::new();
    diverged(&w);
    let b = w.slave.to_str().unwrap();
    let stranger = w.dir.path().join("stranger");
    std::fs::create_dir_all(&stranger).unwrap();
    std::fs::write(stranger.join("precious"), b"not georep's").unwrap();
    let out = w.run(&[
        "create",
        "back",
        b,
        stranger.to_str().unwrap(),
        "--failback",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("was never the master of session"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    let out = w.run(&["create", "plain", b, w.master.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("with --failback"), "{}", stderr(&out));
    let out = w.run(&[
        "create",
        "back",
        w.master.to_str().unwrap(),
        b,
        "--failback",
    ]);
    assert_eq!(out.status.code(), Some(2), "not promoted: {}", stderr(&out));
    // Forced: everything of the stranger that differs goes into the quarantine first.
    w.run_ok(&[
        "create",
        "back",
        b,
        stranger.to_str().unwrap(),
        "--failback",
        "--force",
    ]);
    w.sync("back");
    common::tree::assert_same(&w.slave, &stranger);
    let qs = dr::quarantines(&w, &stranger);
    let items = qs[0]["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["path"], "precious");
    let id = qs[0]["id"].as_str().unwrap();
    let kept = stranger
        .join(".georep-quarantine")
        .join(id)
        .join("data/precious");
    assert_eq!(std::fs::read(kept).unwrap(), b"not georep's");
}

#[test]
fn failback_killed_at_random_moments_converges_and_loses_nothing() {
    let w = World::new();
    let (b_promote, b_final, a_before) = diverged(&w);
    let b = w.slave.to_str().unwrap();
    w.run_ok(&[
        "create",
        "back",
        b,
        w.master.to_str().unwrap(),
        "--failback",
    ]);
    let divergent: Vec<Vec<u8>> = a_before
        .iter()
        .filter(|(p, s)| {
            !matches!(s.node, common::tree::Node::Dir)
                && !dr::same_version(Some(s), b_promote.get(*p))
                && !dr::same_version(Some(s), b_final.get(*p))
        })
        .map(|(p, _)| p.clone())
        .collect();
    assert_eq!(divergent.len(), 3, "the fixture's divergence");
    for k in 0..15u64 {
        dr::kill_after(&w, &["sync", "back"], k * 7);
        // Every divergent version is still in place on A, or in a published quarantine.
        let qs = dr::quarantines(&w, &w.master);
        let now = dr::snap(&w.master);
        for p in &divergent {
            let in_place = dr::same_version(now.get(p), a_before.get(p));
            let kept = qs.iter().any(|q| {
                q["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|i| &dr::item_path(i) == p)
            });
            assert!(
                in_place || kept,
                "kill {k}: A's version of {} is neither in place nor quarantined",
                String::from_utf8_lossy(p)
            );
        }
        assert!(qs.len() <= 1, "one quarantine per failback: {qs:?}");
    }
    let s = w.sync("back");
    assert!(s["complete"].as_bool().unwrap());
    common::tree::assert_same(&w.slave, &w.master);
    dr::assert_same_versions(&b_final, &dr::snap(&w.slave), "B changed by the failback");
    let qs = dr::quarantines(&w, &w.master);
    assert_eq!(qs.len(), 1);
    let mut held: Vec<Vec<u8>> = qs[0]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(dr::item_path)
        .collect();
    held.sort();
    assert_eq!(held, divergent, "exactly A's divergence");
    let conflict: Vec<&serde_json::Value> = qs[0]["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["reason"] == "conflict")
        .collect();
    assert_eq!(conflict.len(), 1);
    assert_eq!(conflict[0]["path"], "d1/f1");
}

#[test]
fn quarantine_restore_copies_out_and_only_discard_removes() {
    let w = World::new();
    diverged(&w);
    let (a, b) = (w.master.to_str().unwrap(), w.slave.to_str().unwrap());
    w.run_ok(&["create", "back", b, a, "--failback"]);
    w.sync("back");
    let id = dr::quarantines(&w, &w.master)[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let show = w.run_ok(&["quarantine", "show", a, &id]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains("new/onA") && text.contains("conflict"),
        "{text}"
    );
    // Not into the replica itself: the next sync would undo it.
    let out = w.run(&["quarantine", "restore", a, &id]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--to"), "{}", stderr(&out));
    let to = w.dir.path().join("restored");
    w.run_ok(&[
        "quarantine",
        "restore",
        a,
        &id,
        "new",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(to.join("new/onA")).unwrap(), b"A's new file");
    assert!(!to.join("d1/f1").exists(), "only what was asked for");
    let out = w.run(&[
        "quarantine",
        "restore",
        a,
        &id,
        "new",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an existing target is not replaced"
    );
    assert_eq!(
        dr::quarantines(&w, &w.master).len(),
        1,
        "restore keeps the quarantine"
    );
    w.run_ok(&["quarantine", "discard", a, &id]);
    assert!(dr::quarantines(&w, &w.master).is_empty());
    let out = w.run(&["quarantine", "show", a, &id]);
    assert_eq!(out.status.code(), Some(2));
}
