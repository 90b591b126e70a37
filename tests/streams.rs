//! Parallel streams: a stream that dies in the middle of a sync fails only
//! the files it carried (never exposing a partial file), and the next sync
//! converges; agents joining a group need the group's token.

mod common;

use common::{n, tree, World};
use std::time::{Duration, Instant};

/// The `georep agent` processes serving `root`, oldest first.
fn agents_of(root: &std::path::Path) -> Vec<i32> {
    let want = root.to_str().unwrap();
    let mut found: Vec<(u64, i32)> = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if args.get(1) == Some(&&b"agent"[..]) && args.contains(&want.as_bytes()) {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let start = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().nth(19))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            found.push((start, pid));
        }
    }
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn a_stream_killed_mid_sync_fails_its_files_and_the_next_sync_converges() {
    let w = World::new();
    for i in 0..60 {
        let dir = w.master.join(format!("d{}", i % 6));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("f{i}")), data(i, 3 << 20)).unwrap();
    }
    std::fs::write(w.master.join("big.img"), data(99, 40 << 20)).unwrap();
    // Small files (sent whole, in the agents' batches) in every directory.
    for i in 0..600u64 {
        let dir = w
            .master
            .join(format!("d{}", i % 6))
            .join(format!("s{}", i % 4));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(format!("t{i}")),
            data(1000 + i, 4096 + (i as usize % 7) * 3000),
        )
        .unwrap();
    }
    w.create("s", &[]);
    w.run_ok(&["config", "s", "set", "streams", "4"]);
    let child = w
        .cmd(&["sync", "s", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the four agents, then kill one that joined the group.
    let deadline = Instant::now() + Duration::from_secs(30);
    let agents = loop {
        let a = agents_of(&w.slave);
        if a.len() == 4 || Instant::now() > deadline {
            break a;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(agents.len(), 4, "four agents serve the slave root");
    std::thread::sleep(Duration::from_millis(30));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agents[2]),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let s: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(n(&s, "streams"), 4, "{s}");
    assert!(
        n(&s, "failures") >= 1 && s["complete"] == false,
        "the killed stream carried files that failed: {s}"
    );
    assert_eq!(out.status.code(), Some(georep::error::exit::PARTIAL), "{s}");
    // No directory above a failed file has an stime: it advances only
    // once everything beneath it is durable, whichever stream carried it.
    let has_stime = |p: &std::path::Path| {
        xattr::list(p)
            .unwrap()
            .any(|n| n.to_string_lossy().ends_with(".stime"))
    };
    assert!(!has_stime(&w.master), "the root's stime advanced: {s}");
    let errors = s["errors"].as_array().unwrap();
    assert!(!errors.is_empty(), "{s}");
    for e in errors {
        let failed = std::path::Path::new(e["path"].as_str().unwrap());
        for dir in failed.ancestors().skip(1) {
            assert!(
                !has_stime(&w.master.join(dir)),
                "{} has an stime though {} failed: {s}",
                dir.display(),
                failed.display()
            );
        }
    }
    // Whatever reached the slave is whole.
    for e in walk(&w.slave) {
        let rel = e.strip_prefix(&w.slave).unwrap();
        if rel.starts_with(".georep") {
            continue;
        }
        let name = rel.file_name().unwrap().to_string_lossy();
        if e.is_file() && !name.starts_with(".georep-tmp-") {
            assert_eq!(
                std::fs::read(&e).unwrap(),
                std::fs::read(w.master.join(rel)).unwrap(),
                "{} is partial on the slave",
                rel.display()
            );
        }
    }
    let s = w.sync("s");
    assert_eq!(n(&s, "failures"), 0, "{s}");
    // The killed agent's temporaries may stay for up to an hour (a young
    // temporary may be another agent's of the stream group: see
    // `agent::root::Root::list`); never under a final name, and everything
    // else is equal.
    let diffs: Vec<String> = tree::differences(&w.master, &w.slave)
        .into_iter()
        .filter(|d| !d.contains(".georep-tmp-"))
        .collect();
    assert!(diffs.is_empty(), "slave differs from master: {diffs:#?}");
    let s = w.sync("s");
    assert_eq!(n(&s, "bytes_sent"), 0, "{s}");
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let path = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(path.clone());
            }
            out.push(path);
        }
    }
    out
}

#[test]
fn an_agent_without_the_group_token_is_refused() {
    use georep::protocol::{ErrorKind, Reply, Request, PROTOCOL_VERSION};
    let w = World::new();
    std::fs::create_dir_all(&w.slave).unwrap();
    let join = |token| Request::HelloStream {
        version: PROTOCOL_VERSION,
        client: "test".into(),
        token,
    };
    // No group yet: nobody joins.
    let e = common::raw_agent::RawAgent::start_as(&w.slave, join([7; 16])).err();
    assert_eq!(e.map(|e| e.kind), Some(ErrorKind::Busy));
    let mut primary = common::raw_agent::RawAgent::start(&w.slave);
    let token = match primary.call(Request::OpenStreams).result {
        Ok(Reply::StreamToken(t)) => t,
        other => panic!("{other:?}"),
    };
    let e = common::raw_agent::RawAgent::start_as(&w.slave, join([7; 16])).err();
    assert_eq!(
        e.map(|e| e.kind),
        Some(ErrorKind::Busy),
        "a wrong token is refused"
    );
    let mut member = common::raw_agent::RawAgent::start_as(&w.slave, join(token))
        .unwrap_or_else(|e| panic!("the group's token is admitted: {e:?}"));
    // A member cannot open another group, and works on the root.
    assert!(member.call(Request::OpenStreams).result.is_err());
    assert!(member.call(Request::Ping).result.is_ok());
    // Once the primary is gone, its token admits nobody.
    primary.finish();
    let e = common::raw_agent::RawAgent::start_as(&w.slave, join(token)).err();
    assert_eq!(
        e.map(|e| e.kind),
        Some(ErrorKind::Busy),
        "a dead group's token is refused"
    );
}
