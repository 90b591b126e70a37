//! SSH slaves end to end against a real sshd on 127.0.0.1: push-pem and
//! the forced command, failures as one line with their exit code, and an
//! ssh killed in the middle of a transfer.

mod common;

use common::sshd::Sshd;
use common::{n, stderr, tree, World};
use std::path::Path;
use std::time::Duration;

fn tagged(sshd: &Sshd, session: &str) -> Vec<String> {
    sshd.authorized_lines()
        .into_iter()
        .filter(|l| {
            l.split_whitespace()
                .last()
                .is_some_and(|c| c.starts_with(&format!("georep:{session}@")))
        })
        .collect()
}

/// Runs `ssh` with `key` asking for `remote`, and returns what came back
/// on stdout within a few seconds (stdin stays open, then is closed).
fn ssh_stdout(sshd: &Sshd, key: &Path, extra: &[&str], remote: &str) -> Vec<u8> {
    let out = sshd
        .ssh(key)
        .args(extra)
        .arg(remote)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    out.stdout
}

#[test]
fn push_pem_installs_a_key_that_runs_the_agent_on_its_root_and_nothing_else() {
    let sshd = Sshd::start();
    let w = World::new();
    std::fs::create_dir_all(w.master.join("d")).unwrap();
    std::fs::write(w.master.join("d/f"), b"data").unwrap();
    let out = w.create_ssh(&sshd, "s", &[]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("slave checked"),
        "{out:?}"
    );
    // The session's own key, private to the session.
    let key = w.home.join("sessions/s/ssh_key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        std::fs::read_to_string(w.home.join("sessions/s/known_hosts"))
            .unwrap()
            .contains("ssh-ed25519")
    );
    let lines = tagged(&sshd, "s");
    assert_eq!(lines.len(), 1, "{lines:?}");
    let pubkey = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let blob = pubkey.split_whitespace().nth(1).unwrap();
    assert!(lines[0].contains(blob));
    for opt in [
        "no-pty",
        "no-port-forwarding",
        "no-X11-forwarding",
        "no-agent-forwarding",
    ] {
        assert!(lines[0].contains(opt), "{opt} missing: {}", lines[0]);
    }
    let config = std::fs::read_to_string(w.home.join("sessions/s/config.toml")).unwrap();
    assert!(config.contains(&key.display().to_string()), "{config}");

    // Whatever command is asked for, the key runs the agent: never a shell.
    for (extra, remote) in [
        (&[][..], "sh -c id"),
        (&["-tt"][..], "id; echo pwned > /tmp/georep-pwned"),
        (&[][..], "cat /etc/passwd"),
    ] {
        let got = ssh_stdout(&sshd, &key, extra, remote);
        // With a forced pty request (-tt) the client gives up at the
        // refused pty; without, the forced command answers.
        assert!(
            got.starts_with(b"GEOREP1\n") || (extra == ["-tt"] && got.is_empty()),
            "{remote:?} did not get the agent: {:?}",
            String::from_utf8_lossy(&got)
        );
        let text = String::from_utf8_lossy(&got);
        assert!(
            !text.contains("uid=") && !text.contains("root:x:"),
            "{text}"
        );
    }
    assert!(!Path::new("/tmp/georep-pwned").exists());
    // Asking for another root still gets the one in authorized_keys.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let root = rt.block_on(async {
        let mut child = tokio::process::Command::from(sshd.ssh(&key))
            .arg("georep agent --root /etc")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let client = georep::protocol::Client::connect(stdout, stdin, Duration::from_secs(30))
            .await
            .unwrap();
        client.agent_root().to_string()
    });
    assert_eq!(root, w.slave.display().to_string());

    let s = w.sync("s");
    assert_eq!(n(&s, "files_synced"), 1);
    tree::assert_same(&w.master, &w.slave);

    // Creating the session again replaces its line: no duplicate.
    w.run_ok(&["delete", "s"]);
    w.create_ssh(&sshd, "s", &[]);
    let again = tagged(&sshd, "s");
    assert_eq!(again.len(), 1, "{again:?}");
    assert!(!again[0].contains(blob), "the old key is still installed");
    assert_eq!(
        sshd.authorized_lines().len(),
        2,
        "operator key + session key"
    );
    w.sync("s");
    tree::assert_same(&w.master, &w.slave);
}

fn expect_failure(w: &World, args: &[String], code: i32, needle: &str) -> String {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = w.run(&args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
    assert!(err.contains(needle), "{err:?} does not mention {needle:?}");
    err
}

fn no_session_left(w: &World) {
    let left: Vec<_> = std::fs::read_dir(w.home.join("sessions"))
        .map(|rd| rd.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "a failed create left {left:?}");
}

#[test]
fn ssh_failures_are_one_line_saying_what_to_fix_with_their_exit_code() {
    let mut sshd = Sshd::start();
    let w = World::new();
    std::fs::write(w.master.join("f"), b"x").unwrap();
    let base = common::sshd::create_args(&sshd, "e", &w.master, &w.slave);
    let with = |f: &dyn Fn(&mut Vec<String>)| {
        let mut a = base.clone();
        f(&mut a);
        a
    };
    let set = |a: &mut Vec<String>, flag: &str, v: String| {
        let i = a.iter().position(|x| x == flag).unwrap();
        a[i + 1] = v;
    };
    // Nothing listens: temporary.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    expect_failure(
        &w,
        &with(&|a| set(a, "--ssh-port", closed.to_string())),
        3,
        "nothing accepts SSH connections",
    );
    no_session_left(&w);
    // A key the slave does not accept: permanent.
    let stranger = sshd.dir.path().join("stranger");
    common::sshd::keygen(&stranger, "stranger");
    expect_failure(
        &w,
        &with(&|a| set(a, "--identity", stranger.display().to_string())),
        4,
        "refused SSH authentication",
    );
    no_session_left(&w);
    // No georep on the slave: permanent, and the installed key is taken back.
    expect_failure(
        &w,
        &with(&|a| set(a, "--remote-georep", "/nonexistent/georep".into())),
        4,
        "georep does not run",
    );
    no_session_left(&w);
    assert!(
        tagged(&sshd, "e").is_empty(),
        "{:?}",
        sshd.authorized_lines()
    );
    // A slave speaking another protocol version: permanent.
    let fake = sshd.dir.path().join("fake-georep");
    let frame = georep::protocol::encode_frame(&georep::protocol::Response {
        id: 1,
        last: true,
        result: Ok(georep::protocol::Reply::HelloOk {
            version: 999,
            agent: "9.9.9".into(),
            root: w.slave.display().to_string(),
        }),
    })
    .unwrap();
    std::fs::write(sshd.dir.path().join("hello.bin"), frame).unwrap();
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nprintf 'GEOREP1\\n'; cat {}; sleep 2\n",
            sshd.dir.path().join("hello.bin").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    expect_failure(
        &w,
        &with(&|a| set(a, "--remote-georep", fake.display().to_string())),
        4,
        "speaks protocol 999",
    );
    no_session_left(&w);

    // A good session, then its slave changes under it.
    let args: Vec<&str> = base.iter().map(String::as_str).collect();
    w.run_ok(&args);
    w.sync("e");
    let sync = vec!["sync".to_string(), "e".to_string()];
    sshd.restart_with_new_host_key();
    expect_failure(&w, &sync, 4, "host key");
    std::fs::write(
        w.home.join("sessions/e/known_hosts"),
        "", // forget it: the unknown-host case
    )
    .unwrap();
    expect_failure(&w, &sync, 4, "is not known");
    // Re-creating records the new key.
    w.run_ok(&["delete", "e"]);
    w.run_ok(&args);
    // The key removed from authorized_keys: permanent, says to push it again.
    std::fs::copy(
        sshd.operator_key.with_extension("pub"),
        &sshd.authorized_keys,
    )
    .unwrap();
    expect_failure(&w, &sync, 4, "--push-pem");
    // The slave down: temporary.
    sshd.stop();
    expect_failure(&w, &sync, 3, "nothing accepts SSH connections");
}

fn version(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 4096) as u8).wrapping_mul(31) | 1)
        .collect()
}

/// The pids of ssh client processes talking to `port`.
fn ssh_pids(port: u16) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        let is_ssh = args.first().is_some_and(|a| *a == b"ssh");
        let port = port.to_string();
        if is_ssh
            && args
                .windows(2)
                .any(|w| w[0] == b"-p" && w[1] == port.as_bytes())
        {
            out.push(pid);
        }
    }
    out
}

/// The pids of `georep agent` processes serving `root`.
fn agent_pids(root: &Path) -> Vec<i32> {
    let root = root.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if args.contains(&&b"agent"[..]) && args.contains(&root.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn ssh_killed_mid_transfer_exposes_no_partial_file_and_the_next_sync_converges() {
    let sshd = Sshd::start();
    let w = World::new();
    let names: Vec<String> = (0..3).map(|i| format!("disk{i}.img")).collect();
    let len = 24 << 20;
    let mut versions: Vec<Vec<tree::FileState>> = names.iter().map(|_| Vec::new()).collect();
    for (i, name) in names.iter().enumerate() {
        let v = version(i as u8, len);
        versions[i].push(tree::write_version(&w.master.join(name), &v, 0));
    }
    w.create_ssh(&sshd, "k", &[]);
    w.sync("k");
    let mut killed = 0;
    for round in 0..4u8 {
        for (i, name) in names.iter().enumerate() {
            let v = version(round * 10 + i as u8 + 1, len + round as usize * 100_000);
            versions[i].push(tree::write_version(
                &w.master.join(name),
                &v,
                round as u32 + 1,
            ));
        }
        let mut child = w
            .cmd(&["sync", "k"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Wait for the transfer to be under way (a temporary on the
        // slave), then kill the ssh client.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while tree::temporaries(&w.slave).is_empty()
            && std::time::Instant::now() < deadline
            && child.try_wait().unwrap().is_none()
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50 * round as u64));
        for p in ssh_pids(sshd.port) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let status = child.wait_with_output().unwrap().status;
        // The remote agent saw EOF and exited: no orphan holds the root.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !agent_pids(&w.slave).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "agent left running after ssh was killed"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        if status.code() == Some(3) {
            killed += 1;
        } else {
            assert_eq!(status.code(), Some(0), "sync ended with {status:?}");
        }
        for (name, vs) in names.iter().zip(&versions) {
            let s = tree::file_state(&w.slave.join(name)).unwrap();
            assert!(
                vs.contains(&s),
                "{name}: partial or mixed content or metadata on the slave: {s:?}"
            );
        }
    }
    assert!(killed >= 3, "only {killed} of 4 syncs were cut by the kill");
    let s = w.sync("k");
    assert_eq!(n(&s, "failures"), 0);
    tree::assert_same(&w.master, &w.slave);
    // The agent cleans up after itself: no temporary survives a listing.
    assert!(tree::temporaries(&w.slave).is_empty());
}

#[test]
fn no_verify_creates_without_checking_and_the_worker_reports_what_is_wrong() {
    let sshd = Sshd::start();
    let w = World::new();
    std::fs::write(w.master.join("f"), b"x").unwrap();
    // Push-pem without checks: a wrong remote program is only found by the worker.
    let mut args = common::sshd::create_args(&sshd, "nv", &w.master, &w.slave);
    let i = args.iter().position(|a| a == "--remote-georep").unwrap();
    args[i + 1] = "/nonexistent/georep".into();
    args.push("--no-verify".into());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    w.run_ok(&a);
    expect_failure(&w, &["sync".into(), "nv".into()], 4, "georep does not run");
    // Without push-pem nor checks, nothing recorded the host key: the worker refuses it.
    let other = w.dir.path().join("other");
    let out = w.run(&[
        "create",
        "plain",
        w.master.to_str().unwrap(),
        &sshd.spec(&other),
        "--ssh-port",
        &sshd.port.to_string(),
        "--identity",
        sshd.operator_key.to_str().unwrap(),
        "--no-verify",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    expect_failure(&w, &["sync".into(), "plain".into()], 4, "is not known");
}
