//! `georep verify`: random trees synced, random corruption on the slave
//! (flipped bits with mtime and size kept, truncation, deletion, additions,
//! modes, xattrs, symlink targets): verify finds exactly those, `--repair`
//! fixes them, and the trees then compare equal byte for byte and metadata
//! for metadata. Equal trees cost at most 0.01% of their data on the wire
//! (counted exactly). Bad input and faults: a session never synced, paths
//! outside the master, a slave lost mid-verify (resumed), a deadline, files
//! changing or vanishing while verified, a slave that is not this
//! session's replica.

mod common;

use common::{mutate, rot, tree, World};
use proptest::prelude::*;
use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::time::Duration;

fn verify(w: &World, args: &[&str], env: &[(&str, &str)]) -> (i32, Value, String) {
    let mut a = vec!["verify", "v", "--json"];
    a.extend_from_slice(args);
    let mut c = w.cmd(&a);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = common::stderr(&out);
    let v = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), v, stderr)
}

fn found(v: &Value) -> Vec<(String, String)> {
    let mut f: Vec<(String, String)> = v["differences"]
        .as_array()
        .unwrap_or_else(|| panic!("no differences in {v}"))
        .iter()
        .map(|d| {
            (
                d["path"].as_str().unwrap().to_string(),
                d["what"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    f.sort();
    f
}

/// Small ranges: files cut over several ranges, and the agent stopping
/// ranges early (its limit below the worker's), so every path is taken.
const SMALL: &[(&str, &str)] = &[
    ("GEOREP_VERIFY_RANGE_ENTRIES", "3"),
    ("GEOREP_VERIFY_RANGE_BYTES", "4194304"),
    ("GEOREP_AGENT_VERIFY_MAX_ENTRIES", "2"),
];

fn run_case(
    initial: &[mutate::Op],
    seed: u64,
    nrot: usize,
    small: bool,
    ssh: Option<&common::sshd::Sshd>,
) {
    let w = World::new();
    match ssh {
        None => w.create("v", &[]),
        Some(sshd) => {
            w.create_ssh(sshd, "v", &[]);
        }
    }
    for op in initial {
        mutate::apply(&w.master, op);
    }
    w.sync("v");
    tree::assert_same(&w.master, &w.slave);
    let env = if small { SMALL } else { &[] };
    let (code, v, err) = verify(&w, &[], env);
    assert_eq!(code, 0, "equal trees: {v} {err}");
    assert!(found(&v).is_empty(), "{v}");

    let expect = rot::corrupt(&w.slave, seed, nrot);
    let (code, v, err) = verify(&w, &[], env);
    let want: Vec<(String, String)> = expect
        .iter()
        .map(|e| (e.path.clone(), e.what.to_string()))
        .collect();
    let mut want = want;
    want.sort();
    assert_eq!(found(&v), want, "corruptions {expect:?}\nreport {v}\n{err}");
    assert_eq!(code, if want.is_empty() { 0 } else { 1 }, "{v}");
    assert_eq!(
        (v["changed"].as_u64(), v["pending"].as_u64()),
        (Some(0), Some(0)),
        "{v}"
    );
    // Each flipped byte lies in a range reported, and only blocks are reported.
    for e in expect.iter().filter(|e| e.offset.is_some()) {
        let off = e.offset.unwrap();
        let d = v["differences"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["path"] == e.path.as_str() && d["what"] == e.what)
            .unwrap();
        let ranges: Vec<(u64, u64)> = d["ranges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
            .collect();
        assert!(
            ranges.iter().any(|&(a, b)| a <= off && off < b),
            "{off} not in {ranges:?}"
        );
        assert!(
            ranges.iter().all(|&(a, b)| b - a <= 4096),
            "one flipped bit, one block: {ranges:?}"
        );
    }

    let (code, v, err) = verify(&w, &["--repair"], env);
    assert_eq!(code, 0, "repair: {v}\n{err}");
    if !want.is_empty() {
        let r = &v["repair"];
        assert_eq!(r["repaired"].as_u64(), Some(want.len() as u64), "{v}");
        assert_eq!(r["after"]["equal"], true, "{v}");
    }
    tree::assert_same(&w.master, &w.slave);
    let (code, v, _) = verify(&w, &[], env);
    assert_eq!(code, 0, "after repair: {v}");
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("GEOREP_VERIFY_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(8),
        max_shrink_iters: 50,
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    #[test]
    fn verify_finds_exactly_the_corruptions_and_repair_fixes_them(
        initial in prop::collection::vec(mutate::op(), 5..40),
        seed in any::<u64>(),
        nrot in 0usize..7,
        small in any::<bool>(),
    ) {
        run_case(&initial, seed, nrot, small, None);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("GEOREP_VERIFY_SSH_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2),
        max_shrink_iters: 10,
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    /// The same over a real sshd (push-pem key, forced command).
    #[test]
    fn verify_over_ssh_finds_and_repairs_corruption(
        initial in prop::collection::vec(mutate::op(), 5..30),
        seed in any::<u64>(),
        nrot in 1usize..6,
    ) {
        let sshd = common::sshd::Sshd::start();
        run_case(&initial, seed, nrot, false, Some(&sshd));
    }
}

fn fill(w: &World, files: usize, size: usize, seed: u64) -> u64 {
    let mut total = 0;
    for i in 0..files {
        let d = w.master.join(format!("d{:02}", i % 20));
        std::fs::create_dir_all(&d).unwrap();
        let data = mutate::data(seed + i as u64, size);
        std::fs::write(d.join(format!("f{i:04}")), &data).unwrap();
        total += size as u64;
    }
    total
}

#[test]
fn equal_trees_cost_at_most_a_ten_thousandth_of_their_data_on_the_wire() {
    let w = World::new();
    w.create("v", &[]);
    let mut total = fill(&w, 400, 256 << 10, 7);
    let big = mutate::data(99, 30 << 20);
    std::fs::write(w.master.join("big"), &big).unwrap();
    total += big.len() as u64;
    w.sync("v");
    for env in [
        &[][..],
        &[
            ("GEOREP_VERIFY_RANGE_ENTRIES", "50"),
            ("GEOREP_VERIFY_RANGE_BYTES", "16777216"),
        ][..],
    ] {
        let (code, v, err) = verify(&w, &[], env);
        assert_eq!(code, 0, "{v} {err}");
        assert_eq!(v["equal"], true);
        assert_eq!(v["bytes"].as_u64(), Some(total), "every byte verified: {v}");
        assert_eq!(
            v["entries"].as_u64(),
            Some(422),
            "root, 20 dirs, 401 files: {v}"
        );
        let wire = v["wire_bytes_out"].as_u64().unwrap() + v["wire_bytes_in"].as_u64().unwrap();
        assert!(
            wire > 0 && wire * 10_000 <= total,
            "{wire} bytes on the wire for {total} verified: {v}"
        );
        assert!(v["ranges"].as_u64().unwrap() >= 1);
    }
}

#[test]
fn bad_input_is_refused_with_one_line() {
    let w = World::new();
    w.create("v", &[]);
    std::fs::write(w.master.join("a"), b"x").unwrap();
    let (code, _, err) = verify(&w, &[], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("never completed a sync") && err.contains("georep sync v"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    w.sync("v");
    let (code, _, err) = verify(&w, &["--path", "/etc"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not below the master"), "{err}");
    let (code, _, err) = verify(&w, &["--path", "../x"], &[]);
    assert_eq!(code, 2, "{err}");
    let out = w.run(&["verify", "v", "--max-duration", "soon"]);
    assert_eq!(out.status.code(), Some(2));
    // A slave that is not this session's replica: refused, nothing written.
    let ident = w.slave.join(".georep/identity.json");
    let saved = std::fs::read(&ident).unwrap();
    std::fs::write(
        &ident,
        br#"{"session":"00000000-0000-0000-0000-000000000001","epoch":"00000000-0000-0000-0000-000000000002"}"#,
    )
    .unwrap();
    std::fs::write(w.slave.join("a"), b"y").unwrap();
    let (code, _, err) = verify(&w, &["--repair"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("does not hold this session's replica"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(w.slave.join("a")).unwrap(),
        b"y",
        "nothing repaired"
    );
    std::fs::write(&ident, saved).unwrap();
}

#[test]
fn repair_of_a_promoted_replica_is_refused_and_leaves_it_untouched() {
    let w = World::new();
    w.create("v", &[]);
    std::fs::write(w.master.join("a"), b"master").unwrap();
    w.sync("v");
    // Site A lost: B's replica is promoted and lives on.
    w.run_ok(&["promote", w.slave.to_str().unwrap()]);
    std::fs::write(w.slave.join("a"), b"live data").unwrap();
    let (code, _, err) = verify(&w, &["--repair"], &[]);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("promoted") && err.contains("live store"),
        "says why: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(
        std::fs::read(w.slave.join("a")).unwrap(),
        b"live data",
        "the live store is untouched"
    );
}

/// The agent process serving `home`'s verification, once it runs.
fn agent_of(home: &std::path::Path) -> Option<u32> {
    common::daemon::processes_with_env(&format!("GEOREP_HOME={}", home.display()))
        .into_iter()
        .find(|&p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("agent"))
                .unwrap_or(false)
        })
}

#[test]
fn a_slave_lost_mid_verify_is_a_clear_error_and_the_next_run_resumes() {
    let w = World::new();
    w.create("v", &[]);
    let total = fill(&w, 40, 1 << 20, 3);
    w.sync("v");
    // 40 MiB at 8 MiB/s per side, in ranges of 4 MiB: about 5 s.
    let env = [("GEOREP_VERIFY_RANGE_BYTES", "4194304")];
    let mut c = w.cmd(&["verify", "v", "--json", "--rate", "8M"]);
    c.envs(env)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = c.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(2000));
    let agent = common::daemon::wait_for("the verification's agent", || agent_of(&w.home)).unwrap();
    common::daemon::signal(agent, nix::sys::signal::Signal::SIGKILL);
    let out = child.wait_with_output().unwrap();
    let err = common::stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("verified up to") && err.contains("again to resume"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let progress: Value =
        serde_json::from_slice(&std::fs::read(w.home.join("sessions/v/verify.json")).unwrap())
            .unwrap();
    let done = progress["counts"]["bytes"].as_u64().unwrap();
    assert!(done > 0 && done < total, "{progress}");
    let (code, v, err) = verify(&w, &[], &env);
    assert_eq!(code, 0, "{v} {err}");
    assert_eq!(v["resumed"], true);
    assert_eq!(
        v["bytes"].as_u64(),
        Some(total),
        "both parts together cover everything once: {v}"
    );
    // A deadline stops it the same way; the next run goes on.
    let (code, v, _) = verify(&w, &["--rate", "8M", "--max-duration", "1"], &env);
    assert_eq!(code, 3, "{v}");
    assert!(v["stopped_at"].is_string() && v["complete"] == false, "{v}");
    let (code, v, _) = verify(&w, &[], &env);
    assert_eq!(
        (code, v["resumed"].clone(), v["bytes"].as_u64()),
        (0, Value::Bool(true), Some(total)),
        "{v}"
    );
    // --restart starts over.
    let (code, v, _) = verify(&w, &["--restart"], &env);
    assert_eq!((code, v["resumed"].clone()), (0, Value::Bool(false)));
}

#[test]
fn files_changing_or_vanishing_while_verified_are_verify_later_never_mismatches() {
    let w = World::new();
    w.create("v", &[]);
    fill(&w, 20, 1 << 20, 5);
    w.sync("v");
    let mut c = w.cmd(&["verify", "v", "--json", "--rate", "4M"]);
    c.stdout(std::process::Stdio::piped());
    // Ranges of 8 MiB (two seconds at the rate): the last is planned after
    // the change, the others before it; either way it is "verify later".
    let child = c.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // The last files in stream order are read last.
    let gone = w.master.join("d19/f0019");
    let grown = w.master.join("d18/f0018");
    std::fs::remove_file(&gone).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&grown)
        .unwrap();
    f.write_all_at(b"changed", 12345).unwrap();
    drop(f);
    let out = child.wait_with_output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{v}");
    assert_eq!(v["mismatches"].as_u64(), Some(0), "{v}");
    let mut changed: Vec<&str> = v["changed_paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    changed.sort();
    assert_eq!(changed, ["d18/f0018", "d19/f0019"], "{v}");
}

/// Writes `data` at `off` in `p`, keeping its size and mtime (and atime).
fn write_keeping_times(p: &std::path::Path, off: u64, data: &[u8]) {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(p).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(data, off).unwrap();
    drop(f);
    let (a, m) = (
        TimeSpec::new(md.atime(), md.atime_nsec()),
        TimeSpec::new(md.mtime(), md.mtime_nsec()),
    );
    utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &a,
        &m,
        UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
    let now = std::fs::metadata(p).unwrap();
    assert_eq!((now.len(), now.mtime_nsec()), (md.len(), md.mtime_nsec()));
}

fn master_read(v: &Value) -> (u64, u64) {
    (
        v["master_bytes_read"].as_u64().unwrap(),
        v["master_bytes_cached"].as_u64().unwrap(),
    )
}

/// The master's window hashes are kept between verifications: a second
/// verification of an unchanged master reads none of its content (files
/// below 1 MiB excepted), yet finds rot on the slave; a master file whose
/// content changed under a restored mtime and size is read again (its
/// ctime moved) and reported; `--no-cache` and a damaged cache file read
/// everything again.
#[test]
fn kept_master_hashes_spare_reading_the_master_but_never_hide_a_difference() {
    const MIB: u64 = 1 << 20;
    let w = World::new();
    w.create("v", &[]);
    let files = fill(&w, 6, 2 << 20, 11);
    std::fs::write(w.master.join("big"), mutate::data(12, 9 << 20)).unwrap();
    std::fs::write(w.master.join("small"), mutate::data(13, 1000)).unwrap();
    let total = files + (9 << 20) + 1000;
    w.sync("v");
    // Hashes taken within 2 s of a file's ctime are not kept (a write in
    // the same clock tick would leave the stamp as it was).
    std::thread::sleep(Duration::from_millis(2200));
    let run = |args: &[&str], want: i32| {
        let (code, v, err) = verify(&w, args, &[]);
        assert_eq!(code, want, "{v} {err}");
        assert_eq!(v["bytes"].as_u64(), Some(total), "{v}");
        (v, err)
    };
    let (v, _) = run(&[], 0);
    assert_eq!(master_read(&v), (total, 0), "first run: all read: {v}");
    let (v, _) = run(&[], 0);
    assert_eq!(
        master_read(&v),
        (1000, total - 1000),
        "second run: only the small file read: {v}"
    );
    let (v, _) = run(&["--no-cache"], 0);
    assert_eq!(master_read(&v), (total, 0), "--no-cache reads all: {v}");

    // Rot on the slave, mtime and size kept: found; the master reads only
    // the differing window (2 MiB, compared block by block) and the small file.
    let rotted = w.slave.join("d01/f0001");
    let mut b = [0u8];
    std::fs::File::open(&rotted)
        .unwrap()
        .read_exact_at(&mut b, 12345)
        .unwrap();
    write_keeping_times(&rotted, 12345, &[b[0] ^ 0x40]);
    let (v, _) = run(&[], 1);
    assert_eq!(found(&v), [("d01/f0001".into(), "content".into())], "{v}");
    assert_eq!(master_read(&v), (1000 + 2 * MIB, total - 1000), "{v}");

    // The master's content changes, mtime and size restored: its ctime
    // moved, so it is read, and reported (it differs from the slave's).
    write_keeping_times(&w.master.join("big"), 5 * MIB + 7, b"changed");
    let (v, _) = run(&[], 1);
    let want: Vec<(String, String)> = vec![
        ("big".into(), "content".into()),
        ("d01/f0001".into(), "content".into()),
    ];
    assert_eq!(found(&v), want, "{v}");
    // big read whole, then its differing window (4 MiB) block by block.
    assert_eq!(
        master_read(&v),
        (1000 + 9 * MIB + 4 * MIB + 2 * MIB, files),
        "{v}"
    );

    // A damaged cache file is ignored with a warning, never an error.
    let cache = w.home.join("sessions/v/verify-cache");
    let mut data = std::fs::read(&cache).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 1;
    std::fs::write(&cache, &data).unwrap();
    let (v, err) = run(&[], 1);
    assert_eq!(found(&v), want, "{v}");
    assert_eq!(master_read(&v).1, 0, "nothing from a damaged cache: {v}");
    assert!(err.contains("ignoring the verification's cache"), "{err}");
    std::fs::write(&cache, b"not a cache").unwrap();
    let (v, err) = run(&[], 1);
    assert_eq!(found(&v), want, "{v}");
    assert_eq!(master_read(&v).1, 0, "{v}");
    assert!(err.contains("ignoring"), "{err}");
    // It was rebuilt: the next run takes the unchanged files from it again
    // (and big too once its new ctime is 2 s older than its hashing).
    let (v, _) = run(&[], 1);
    let cached = master_read(&v).1;
    assert!(cached == files || cached == total - 1000, "{v}");
}
