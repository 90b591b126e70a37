//! In-place mode (`inplace_min_size`): large files that exist on the slave
//! are patched where they are, under an undo log. Real processes, real
//! file system: random image-style changes converge; a crash at any moment
//! leaves every file its old or its new version once an agent has started;
//! a transfer that fails its digest or is aborted rolls the file back.

mod common;

use common::mutate::data as bytes;
use common::raw_agent::RawAgent;
use common::{mutate, n, stderr, tree, World};
use georep::fs::meta::Meta;
use georep::fs::relpath::RelPath;
use georep::protocol::{ErrorKind, Reply, Request};
use proptest::prelude::*;
use serde_bytes::ByteBuf;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// Undo logs left in the slave's state directory.
fn undo_logs(slave: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(slave.join(".georep/undo"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// How a writer changes a disk image.
#[derive(Debug, Clone)]
enum ImgOp {
    /// Rewrites `n` scattered 4 KiB blocks.
    Blocks {
        f: u16,
        n: u16,
        seed: u64,
    },
    /// Writes zeros over a range (blocks that were data become zeros).
    Zeros {
        f: u16,
        at: u16,
        len: u32,
    },
    /// Punches a hole.
    Punch {
        f: u16,
        at: u16,
        len: u32,
    },
    Append {
        f: u16,
        len: u32,
        seed: u64,
    },
    /// Cuts the file to a fraction of its size.
    Shrink {
        f: u16,
        frac: u16,
    },
    /// Extends the file with a hole.
    Grow {
        f: u16,
        len: u32,
    },
    /// Inserts bytes in the middle: everything after moves.
    Insert {
        f: u16,
        at: u16,
        len: u16,
        seed: u64,
    },
    /// Anything a writer may do to the tree.
    Tree(mutate::Op),
}

fn img_op() -> impl Strategy<Value = ImgOp> {
    prop_oneof![
        6 => (any::<u16>(), 1..200u16, any::<u64>()).prop_map(|(f, n, seed)| ImgOp::Blocks { f, n, seed }),
        2 => (any::<u16>(), any::<u16>(), 1..3_000_000u32).prop_map(|(f, at, len)| ImgOp::Zeros { f, at, len }),
        2 => (any::<u16>(), any::<u16>(), 1..3_000_000u32).prop_map(|(f, at, len)| ImgOp::Punch { f, at, len }),
        2 => (any::<u16>(), 1..5_000_000u32, any::<u64>()).prop_map(|(f, len, seed)| ImgOp::Append { f, len, seed }),
        2 => (any::<u16>(), any::<u16>()).prop_map(|(f, frac)| ImgOp::Shrink { f, frac }),
        1 => (any::<u16>(), 1..6_000_000u32).prop_map(|(f, len)| ImgOp::Grow { f, len }),
        1 => (any::<u16>(), any::<u16>(), 1..5000u16, any::<u64>()).prop_map(|(f, at, len, seed)| ImgOp::Insert { f, at, len, seed }),
        3 => mutate::op().prop_map(ImgOp::Tree),
    ]
}

/// The master's files of at least `min` bytes.
fn large_files(root: &Path, min: u64) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut es: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        es.sort();
        for p in es {
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file() && md.len() >= min {
                out.push(p);
            }
        }
    }
    out
}

/// Applies `op`; returns the paths to mark.
fn apply(root: &Path, op: &ImgOp) -> Vec<PathBuf> {
    let ImgOp::Tree(t) = op else {
        let files = large_files(root, MIB);
        let f = match op {
            ImgOp::Blocks { f, .. }
            | ImgOp::Zeros { f, .. }
            | ImgOp::Punch { f, .. }
            | ImgOp::Append { f, .. }
            | ImgOp::Shrink { f, .. }
            | ImgOp::Grow { f, .. }
            | ImgOp::Insert { f, .. } => *f,
            ImgOp::Tree(_) => unreachable!(),
        };
        let Some(p) = (!files.is_empty()).then(|| files[f as usize % files.len()].clone()) else {
            return vec![];
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let len = file.metadata().unwrap().len();
        let at = |frac: u16| len * frac as u64 / u16::MAX as u64;
        match *op {
            ImgOp::Blocks { n, seed, .. } => {
                for k in 0..n as u64 {
                    let block = (seed.wrapping_mul(k + 7) >> 7) % len.div_ceil(4096);
                    let data = bytes(seed ^ k, 4096);
                    let end = (block * 4096 + 4096).min(len);
                    file.write_all_at(&data[..(end - block * 4096) as usize], block * 4096)
                        .unwrap();
                }
            }
            ImgOp::Zeros { at: a, len: l, .. } => {
                let o = at(a);
                let l = (l as u64).min(len - o);
                file.write_all_at(&vec![0u8; l as usize], o).unwrap();
            }
            ImgOp::Punch { at: a, len: l, .. } => {
                let o = at(a);
                let l = (l as u64).min(len - o);
                if l > 0 {
                    nix::fcntl::fallocate(
                        &file,
                        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                        o as i64,
                        l as i64,
                    )
                    .unwrap();
                }
            }
            ImgOp::Append { len: l, seed, .. } => {
                file.write_all_at(&bytes(seed, l as usize), len).unwrap();
            }
            ImgOp::Shrink { frac, .. } => file.set_len(at(frac).max(MIB)).unwrap(),
            ImgOp::Grow { len: l, .. } => file.set_len(len + l as u64).unwrap(),
            ImgOp::Insert {
                at: a,
                len: l,
                seed,
                ..
            } => {
                let o = at(a);
                let mut rest = vec![0u8; (len - o) as usize];
                file.read_exact_at(&mut rest, o).unwrap();
                file.write_all_at(&bytes(seed, l as usize), o).unwrap();
                file.write_all_at(&rest, o + l as u64).unwrap();
            }
            ImgOp::Tree(_) => unreachable!(),
        }
        return vec![p];
    };
    mutate::apply(root, t)
}

/// A slave file that must be patched in place by the next sync: its
/// inode and the master file's size.
fn in_place_candidates(w: &World, min: u64) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    for m in large_files(&w.master, min) {
        let rel = m.strip_prefix(&w.master).unwrap();
        let mmd = std::fs::symlink_metadata(&m).unwrap();
        let Ok(smd) = std::fs::symlink_metadata(w.slave.join(rel)) else {
            continue;
        };
        // One name on both sides (several: the links logic re-links them),
        // not shrinking past the limit, writable by the agent.
        let writable = nix::unistd::geteuid().is_root() || smd.mode() & 0o200 != 0;
        if smd.is_file()
            && smd.nlink() == 1
            && mmd.nlink() == 1
            && mmd.len() + 16 * MIB >= smd.len()
            && writable
        {
            out.push((rel.to_path_buf(), smd.ino()));
        }
    }
    out
}

fn run_case(use_marks: bool, initial: &[(u32, u64, bool)], rounds: &[Vec<ImgOp>]) {
    let w = World::new();
    for (i, &(len, seed, sparse)) in initial.iter().enumerate() {
        let p = w.master.join(format!("disk{i}.img"));
        let f = std::fs::File::create(&p).unwrap();
        if sparse {
            f.set_len(len as u64).unwrap();
            for k in 0..4u64 {
                let o = (seed.wrapping_mul(k + 3) >> 3) % (len as u64 - 70_000);
                f.write_all_at(&bytes(seed + k, 65536), o).unwrap();
            }
        } else {
            f.write_all_at(&bytes(seed, len as usize), 0).unwrap();
        }
    }
    let marker = ["--marker", if use_marks { "mark" } else { "auto" }];
    w.create("ip", &[&marker[..], &["--inplace-min-size", "1M"]].concat());
    w.sync("ip");
    tree::assert_same(&w.master, &w.slave);
    for (i, round) in rounds.iter().enumerate() {
        for op in round {
            for p in apply(&w.master, op) {
                if use_marks {
                    common::mark(&p);
                }
            }
        }
        let candidates = in_place_candidates(&w, MIB);
        let s = w.sync("ip");
        assert_eq!(n(&s, "failures"), 0, "round {i}: {s}");
        tree::assert_same(&w.master, &w.slave);
        assert!(
            undo_logs(&w.slave).is_empty(),
            "undo logs left: {:?}",
            undo_logs(&w.slave)
        );
        for (rel, ino) in &candidates {
            let now = std::fs::metadata(w.slave.join(rel)).unwrap().ino();
            assert_eq!(
                now,
                *ino,
                "round {i}: {} was not patched in place: {s}",
                rel.display()
            );
        }
    }
    let s = w.sync("ip");
    assert_eq!(n(&s, "bytes_sent"), 0, "{s}");
    assert_eq!(n(&s, "files_synced"), 0, "{s}");
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("GEOREP_INPLACE_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(8),
        max_shrink_iters: 50,
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    /// Random image writes, zeroing, holes, appends, truncations, shifts
    /// and tree changes: after every sync the slave equals the master, the
    /// large files that qualify kept their inode (patched in place), and no
    /// undo log is left.
    #[test]
    fn in_place_syncs_converge_after_random_image_changes(
        use_marks in any::<bool>(),
        initial in prop::collection::vec((1_000_000..9_000_000u32, any::<u64>(), any::<bool>()), 1..4),
        rounds in prop::collection::vec(prop::collection::vec(img_op(), 1..8), 1..4),
    ) {
        run_case(use_marks, &initial, &rounds);
    }
}

/// (content hash, mtime) of a file.
/// Content and metadata (mode, owner, mtime, xattrs) of a file.
fn state(p: &Path) -> tree::FileState {
    tree::file_state(p).unwrap()
}

#[test]
fn sigkill_during_in_place_syncs_leaves_old_or_new_once_an_agent_started() {
    let w = World::new();
    let names: Vec<String> = (0..4).map(|i| format!("disk{i}.img")).collect();
    for (i, name) in names.iter().enumerate() {
        std::fs::write(w.master.join(name), bytes(i as u64 + 1, (12 + 4 * i) << 20)).unwrap();
    }
    w.create("k", &["--inplace-min-size", "1M"]);
    w.sync("k");
    let rng = std::cell::Cell::new(0x9e3779b97f4a7c15u64);
    let rand = |m: u64| {
        let mut r = rng.get();
        r ^= r << 7;
        r ^= r >> 9;
        rng.set(r);
        r % m
    };
    // New versions: a third of the blocks rewritten (so groups of changes
    // are flushed under the log mid-transfer), grown or shrunk.
    let change = |round: u64| {
        for (i, name) in names.iter().enumerate() {
            let p = w.master.join(name);
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            let len = f.metadata().unwrap().len();
            for b in (0..len / 4096).filter(|b| (b + round + i as u64) % 3 == 0) {
                f.write_all_at(&bytes(round * 1000 + b, 4096), b * 4096)
                    .unwrap();
            }
            match rand(3) {
                0 => f.write_all_at(&bytes(round, 300_000), len).unwrap(),
                1 => f.set_len(len - rand(2 * MIB)).unwrap(),
                _ => {}
            }
            // Metadata of the new version too: a mode and an xattr naming it.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                &p,
                std::fs::Permissions::from_mode(0o600 | ((round % 8) as u32) << 3),
            )
            .unwrap();
            xattr::set(&p, "user.version", round.to_string().as_bytes()).unwrap();
        }
    };
    // How long such a sync takes here, to kill at moments spread over it.
    change(0);
    let started = std::time::Instant::now();
    w.sync("k");
    let span = started.elapsed().as_millis() as u64 * 5 / 4 + 50;
    let (mut killed, mut with_logs) = (0, 0);
    let mut round = 0u64;
    while round < 30 && (killed < 4 || with_logs < 2) {
        round += 1;
        let old: Vec<_> = names.iter().map(|n| state(&w.slave.join(n))).collect();
        change(round);
        let new: Vec<_> = names.iter().map(|n| state(&w.master.join(n))).collect();
        let mut child = w.cmd(&["sync", "k"]).process_group(0).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(rand(span)));
        // Worker and agent die at once, as in a crash.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        if !child.wait().unwrap().success() {
            killed += 1;
        }
        if !undo_logs(&w.slave).is_empty() {
            with_logs += 1;
        }
        // An agent starting rolls back what the crash interrupted, before serving anything.
        let mut a = RawAgent::start(&w.slave);
        assert!(matches!(a.call(Request::Ping).result, Ok(Reply::Pong)));
        a.finish();
        assert!(
            undo_logs(&w.slave).is_empty(),
            "round {round}: undo logs left after an agent started"
        );
        for (i, name) in names.iter().enumerate() {
            let now = state(&w.slave.join(name));
            assert!(
                now == old[i] || now == new[i],
                "round {round}: {name} is neither its old nor its new version (content and metadata)"
            );
        }
    }
    assert!(
        killed >= 4,
        "only {killed} syncs were killed before finishing"
    );
    assert!(
        with_logs >= 2,
        "only {with_logs} kills interrupted an in-place update"
    );
    let s = w.sync("k");
    assert_eq!(n(&s, "failures"), 0, "{s}");
    tree::assert_same(&w.master, &w.slave);
    assert!(undo_logs(&w.slave).is_empty());
    assert!(tree::temporaries(&w.slave).is_empty());
}

fn p(s: &str) -> RelPath {
    RelPath::new(s.as_bytes().to_vec()).unwrap()
}

fn open_in_place(a: &mut RawAgent, fid: u64, path: &str, size: u64) -> bool {
    match a
        .call(Request::OpenInPlace {
            fid,
            path: p(path),
            size,
        })
        .result
    {
        Ok(Reply::OpenedInPlace { in_place, .. }) => in_place,
        other => panic!("open in place: {other:?}"),
    }
}

fn write(a: &mut RawAgent, fid: u64, offset: u64, data: Vec<u8>) {
    a.post(Request::Write {
        fid,
        offset,
        data: ByteBuf::from(data),
    });
}

#[test]
fn a_failed_digest_an_abort_or_a_crash_rolls_the_file_back() {
    let w = World::new();
    std::fs::create_dir_all(&w.slave).unwrap();
    let f = w.slave.join("img");
    let old = bytes(5, (20 << 20) + 1234);
    std::fs::write(&f, &old).unwrap();
    xattr::set(&f, "user.kept", b"old").unwrap();
    let t = nix::sys::time::TimeSpec::new(1_000_000, 5);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        &f,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::FollowSymlink,
    )
    .unwrap();
    let before = (state(&f), std::fs::metadata(&f).unwrap().ino());
    let meta = Meta {
        mode: 0o600,
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        ..Meta::default()
    };
    let unchanged = |what: &str| {
        assert_eq!(
            (state(&f), std::fs::metadata(&f).unwrap().ino()),
            before,
            "{what}: not rolled back"
        );
        assert_eq!(
            xattr::get(&f, "user.kept").unwrap().as_deref(),
            Some(&b"old"[..]),
            "{what}"
        );
        assert!(undo_logs(&w.slave).is_empty(), "{what}: undo log left");
    };

    // A digest that does not match: the agent rolls back and says so.
    let mut a = RawAgent::start(&w.slave);
    assert!(open_in_place(&mut a, 1, "img", old.len() as u64 + 5000));
    for k in 0..12u64 {
        write(&mut a, 1, k * MIB, bytes(k, 4096));
    }
    write(&mut a, 1, old.len() as u64, bytes(9, 5000));
    let r = a.call(Request::Commit {
        fid: 1,
        digest: [7; 32],
        meta: meta.clone(),
    });
    match r.result {
        Err(e) => {
            assert_eq!(e.kind, ErrorKind::Mismatch, "{e:?}");
            assert!(e.message.contains("rolled back"), "{}", e.message);
        }
        other => panic!("a wrong digest was accepted: {other:?}"),
    }
    unchanged("digest mismatch");

    // An abort, after more than a group of changes was written in place.
    assert!(open_in_place(&mut a, 2, "img", old.len() as u64 - 100_000));
    for k in 0..12u64 {
        write(&mut a, 2, k * MIB, bytes(k + 50, MIB as usize));
    }
    assert!(matches!(
        a.call(Request::Abort { fid: 2 }).result,
        Ok(Reply::Done)
    ));
    unchanged("abort");

    // The worker's connection lost mid-file: the agent rolls back as it exits.
    assert!(open_in_place(&mut a, 3, "img", old.len() as u64));
    for k in 0..10u64 {
        write(&mut a, 3, k * MIB, bytes(k + 70, MIB as usize));
    }
    assert!(matches!(a.call(Request::Ping).result, Ok(Reply::Pong)));
    a.finish();
    unchanged("connection closed");

    // A crash after changes reached the file: the log rolls it back at the next start.
    let mut a = RawAgent::start(&w.slave);
    assert!(open_in_place(&mut a, 4, "img", old.len() as u64 + MIB));
    for k in 0..12u64 {
        write(&mut a, 4, k * MIB, bytes(k + 90, MIB as usize));
    }
    // A request the handler answers in order (pings are answered at once).
    assert!(matches!(
        a.call(Request::Stat { path: p("img") }).result,
        Ok(Reply::Stat(_))
    ));
    a.kill();
    assert_ne!(
        state(&f),
        before.0,
        "the crash came after changes were written"
    );
    assert_eq!(undo_logs(&w.slave).len(), 1);
    let mut a = RawAgent::start(&w.slave);
    assert!(matches!(a.call(Request::Ping).result, Ok(Reply::Pong)));
    unchanged("crash, then an agent start");

    // And a correct digest commits in place: same inode, new content and metadata.
    let mut new = old.clone();
    new[4096..8192].copy_from_slice(&bytes(3, 4096));
    new.extend_from_slice(&bytes(4, 3000));
    assert!(open_in_place(&mut a, 5, "img", new.len() as u64));
    a.post(Request::Copy {
        fid: 5,
        offset: 0,
        len: 4096,
    });
    write(&mut a, 5, 4096, new[4096..8192].to_vec());
    a.post(Request::Copy {
        fid: 5,
        offset: 8192,
        len: old.len() as u64 - 8192,
    });
    write(&mut a, 5, old.len() as u64, new[old.len()..].to_vec());
    let r = a.call(Request::Commit {
        fid: 5,
        digest: georep::hash::digest::digest_of(&new),
        meta: meta.clone(),
    });
    assert!(
        matches!(r.result, Ok(Reply::Committed { written: 7096 })),
        "{r:?}"
    );
    a.finish();
    assert_eq!(std::fs::read(&f).unwrap(), new);
    assert_eq!(std::fs::metadata(&f).unwrap().ino(), before.1);
    assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o7777, 0o600);
    assert!(
        xattr::get(&f, "user.kept").unwrap().is_none(),
        "metadata applied"
    );
    assert!(undo_logs(&w.slave).is_empty());
}

#[test]
fn a_file_changing_during_an_in_place_transfer_is_rolled_back_and_retried() {
    let w = World::new();
    let path = w.master.join("busy.img");
    let len = 16 << 20;
    std::fs::write(&path, bytes(1, len)).unwrap();
    w.create("b", &["--inplace-min-size", "1M"]);
    w.sync("b");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, path) = (stop.clone(), path.clone());
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let mut k = 2u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for off in (0..len as u64).step_by(1 << 20) {
                    f.write_all_at(&bytes(k, 1 << 20), off).unwrap();
                }
                k += 1;
            }
        })
    };
    let mut saw_failure = false;
    for _ in 0..5 {
        let synced = std::fs::read(w.slave.join("busy.img")).unwrap();
        let out = w.run(&["sync", "b", "--json"]);
        let code = out.status.code();
        assert!(
            code == Some(0) || code == Some(1),
            "exit {code:?}: {}",
            stderr(&out)
        );
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if code == Some(1) {
            saw_failure = true;
            assert!(
                s["errors"][0]["error"]
                    .as_str()
                    .unwrap()
                    .contains("changed"),
                "{s}"
            );
            // Not published: the slave's copy is what it was, whole.
            assert_eq!(std::fs::read(w.slave.join("busy.img")).unwrap(), synced);
        }
        assert!(undo_logs(&w.slave).is_empty());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert!(
        saw_failure,
        "a file rewritten continuously should have been caught changing"
    );
    let s = w.sync("b");
    assert_eq!(n(&s, "files_in_place"), 1, "{s}");
    tree::assert_same(&w.master, &w.slave);
}

#[test]
fn which_files_are_patched_in_place_and_the_setting() {
    let w = World::new();
    let ino = |name: &str| std::fs::metadata(w.slave.join(name)).unwrap().ino();
    let change = |name: &str, at: u64| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(w.master.join(name))
            .unwrap()
            .write_all_at(&bytes(at, 1000), at)
            .unwrap();
        common::mark(&w.master.join(name));
    };
    std::fs::write(w.master.join("big"), bytes(1, 40 << 20)).unwrap();
    std::fs::write(w.master.join("linked"), bytes(2, 3 << 20)).unwrap();
    std::fs::write(w.master.join("small"), bytes(3, 300_000)).unwrap();
    w.create("s", &["--marker", "mark"]);
    w.sync("s");

    // Off by default: a changed file is a new inode.
    let before = ino("big");
    change("big", 5);
    let s = w.sync("s");
    assert_eq!(n(&s, "files_in_place"), 0, "{s}");
    assert_ne!(ino("big"), before);

    // The setting: sizes with units, refused when bad (one line, exit 2), reset below.
    let bad = w.run(&["config", "s", "set", "inplace_min_size", "lots"]);
    assert_eq!(bad.status.code(), Some(2));
    assert_eq!(stderr(&bad).trim().lines().count(), 1, "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("inplace_min_size"),
        "{}",
        stderr(&bad)
    );
    let other = w.dir.path().join("other");
    let zero = w.run(&[
        "create",
        "t",
        w.master.to_str().unwrap(),
        other.to_str().unwrap(),
        "--inplace-min-size",
        "0",
    ]);
    assert_eq!(zero.status.code(), Some(2), "{}", stderr(&zero));
    w.run_ok(&["config", "s", "set", "inplace_min_size", "1M"]);
    let got = w.run_ok(&["config", "s", "get", "inplace_min_size"]);
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "1048576");

    // Changed in the middle and grown: in place.
    let big = ino("big");
    change("big", 7 << 20);
    change("big", 40 << 20);
    std::fs::hard_link(w.master.join("linked"), w.master.join("linked2")).unwrap();
    common::mark(&w.master.join("linked"));
    common::mark(&w.master.join("linked2"));
    let s = w.sync("s");
    tree::assert_same(&w.master, &w.slave);
    assert_eq!(ino("big"), big, "{s}");
    assert!(n(&s, "files_in_place") >= 1, "{s}");

    // A slave file with two names is rewritten (its names re-linked by the
    // links logic); a file below the threshold too.
    let (linked, small) = (ino("linked"), ino("small"));
    change("linked", 5);
    common::mark(&w.master.join("linked2"));
    change("small", 5);
    let s = w.sync("s");
    tree::assert_same(&w.master, &w.slave);
    assert_eq!(n(&s, "files_in_place"), 0, "{s}");
    assert_ne!(ino("linked"), linked);
    assert_eq!(ino("linked"), ino("linked2"));
    assert_ne!(ino("small"), small);

    // Shrunk a little: in place.
    std::fs::OpenOptions::new()
        .write(true)
        .open(w.master.join("big"))
        .unwrap()
        .set_len((40 << 20) - 3_000_000)
        .unwrap();
    change("big", 100);
    let s = w.sync("s");
    tree::assert_same(&w.master, &w.slave);
    assert_eq!(ino("big"), big, "{s}");
    assert_eq!(n(&s, "files_in_place"), 1, "{s}");

    // Shrunk by more than the limit (16 MiB): a new file.
    std::fs::OpenOptions::new()
        .write(true)
        .open(w.master.join("big"))
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    common::mark(&w.master.join("big"));
    let s = w.sync("s");
    tree::assert_same(&w.master, &w.slave);
    assert_eq!(n(&s, "files_in_place"), 0, "{s}");
    assert_ne!(ino("big"), big);
    assert!(undo_logs(&w.slave).is_empty());

    // Reset: off again.
    w.run_ok(&["config", "s", "reset", "inplace_min_size"]);
    let got = w.run_ok(&["config", "s", "get", "inplace_min_size"]);
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "");
}
