//! The command line as a new operator meets it: the progress line of a
//! foreground sync under a real pseudo-terminal (`script`) and never in a
//! pipe, the final summary, the one-shot sync in the session's log, no
//! colour codes off a terminal (and none with NO_COLOR), a closed stdout
//! that ends quietly, the Nagios check answering UNKNOWN to bad
//! arguments, and bad input (read-only keys, port 0) refused in one line.

mod common;

use common::World;
use std::os::fd::OwnedFd;
use std::process::{Command, Output, Stdio};

/// A master worth a second of syncing: 96 MiB of incompressible data in one file, and small files.
fn big_master(w: &World) {
    let mut data = vec![0u8; 96 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(w.master.join("image.raw"), &data).unwrap();
    for i in 0..20 {
        std::fs::write(w.master.join(format!("small{i}")), format!("{i}")).unwrap();
    }
}

/// Runs georep under a pseudo-terminal (util-linux `script`); returns what the terminal showed.
fn on_terminal(w: &World, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut line = common::georep_bin().display().to_string();
    for a in args {
        line.push(' ');
        line.push_str(a);
    }
    let mut c = Command::new("script");
    c.args(["-qefc", &line, "/dev/null"])
        .env("GEOREP_HOME", &w.home)
        .env_remove("GEOREP_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c
        .output()
        .expect("run script (util-linux; packaging/setup.sh installs bsdutils)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// An SGR (colour) escape sequence anywhere in `s`.
fn has_colour(s: &str) -> bool {
    let b = s.as_bytes();
    (0..b.len()).any(|i| {
        b[i] == 0x1b && b.get(i + 1) == Some(&b'[') && {
            let rest = &b[i + 2..];
            let end = rest
                .iter()
                .position(|c| !(c.is_ascii_digit() || *c == b';'));
            end.is_some_and(|e| rest[e] == b'm')
        }
    })
}

#[test]
fn the_progress_line_shows_on_a_terminal_and_never_in_a_pipe() {
    let w = World::new();
    big_master(&w);
    w.create("p", &[]);
    let (code, screen) = on_terminal(&w, &["sync", "p"], &[]);
    assert_eq!(code, 0, "{screen}");
    // The live line: entries, files done of found, bytes, rate, ETA; redrawn in place.
    let live: Vec<&str> = screen
        .split(['\r', '\n'])
        .filter(|l| l.contains("full crawl:") && l.contains(" files, ") && l.contains("ETA"))
        .collect();
    assert!(
        !live.is_empty(),
        "no progress line on the terminal:\n{screen:?}"
    );
    assert!(
        live.iter()
            .any(|l| l.contains(" of 21 files") && l.contains("MiB of 96.0 MiB")),
        "the line does not say what is done of what was found: {live:?}"
    );
    assert!(
        screen.contains("\x1b[2K"),
        "the line is not redrawn in place"
    );
    // The summary: throughput and why the crawl was full.
    assert!(
        screen.contains("full crawl (full because: first sync")
            && screen.contains("96.0 MiB of file data in")
            && screen.contains("/s)"),
        "{screen}"
    );

    // In a pipe: the same sync prints the summary only, no line, no escape codes.
    std::fs::write(w.master.join("small0"), b"changed").unwrap();
    let out = w.run(&["sync", "p"]);
    assert!(out.status.success());
    let err = common::stderr(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !err.contains("ETA") && !err.contains('\x1b'),
        "progress in a pipe: {err:?}"
    );
    assert!(!stdout.contains('\x1b'), "{stdout:?}");
    assert!(stdout.contains("full crawl (full because:"), "{stdout}");

    // --no-progress on a terminal: no line; --progress into a pipe: the line.
    std::fs::write(w.master.join("small1"), b"changed").unwrap();
    let (_, screen) = on_terminal(&w, &["sync", "p", "--no-progress"], &[]);
    assert!(!screen.contains("ETA"), "{screen:?}");
    std::fs::remove_file(w.slave.join("image.raw")).unwrap();
    let out = w.run(&["sync", "p", "--progress", "--full"]);
    assert!(out.status.success());
    assert!(
        common::stderr(&out).contains("ETA"),
        "--progress drew nothing"
    );

    // Every one-shot sync is in the session's log.
    let log = w.log("p");
    assert_eq!(log.matches("one-shot sync started").count(), 4, "{log}");
    assert_eq!(log.matches("one-shot sync done").count(), 4, "{log}");
}

#[test]
fn log_lines_have_colour_only_on_a_terminal_without_no_color() {
    let w = World::new();
    std::fs::create_dir(w.master.join("d")).unwrap();
    std::fs::write(w.master.join("d/f"), b"x").unwrap();
    w.create("c", &[]);
    w.sync("c");
    let warn_env = [("GEOREP_LOG", "info")];
    let out = w
        .cmd(&["sync", "c"])
        .env("GEOREP_LOG", "info")
        .output()
        .unwrap();
    let err = common::stderr(&out);
    assert!(err.contains("INFO"), "no log line to look at: {err}");
    assert!(!has_colour(&err), "colour codes into a pipe: {err:?}");
    let (_, screen) = on_terminal(&w, &["sync", "c", "--no-progress"], &warn_env);
    assert!(
        has_colour(&screen),
        "a terminal should get colour: {screen:?}"
    );
    let (_, screen) = on_terminal(
        &w,
        &["sync", "c", "--no-progress"],
        &[("GEOREP_LOG", "info"), ("NO_COLOR", "1")],
    );
    assert!(screen.contains("INFO"), "{screen:?}");
    assert!(!has_colour(&screen), "NO_COLOR ignored: {screen:?}");
}

/// Runs georep with a stdout whose reader is already gone.
fn closed_stdout(w: &World, args: &[&str]) -> Output {
    let (r, wfd): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
    drop(r);
    w.cmd(args).stdout(Stdio::from(wfd)).output().unwrap()
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let w = World::new();
    std::fs::write(w.master.join("f"), b"x").unwrap();
    w.create("q", &[]);
    let other = w.dir.path().join("slave2");
    w.run_ok(&[
        "create",
        "q2",
        w.master.to_str().unwrap(),
        other.to_str().unwrap(),
    ]);
    for args in [
        &["sync", "q", "--json"][..],
        &["status"],
        &["status", "q", "--detail"],
        &["status", "--prometheus"],
        &["config", "q"],
        &["--help"],
    ] {
        let out = closed_stdout(&w, args);
        let err = common::stderr(&out);
        assert_eq!(out.status.code(), Some(0), "georep {args:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "georep {args:?}: {err}"
        );
    }
    // The sync did its work all the same.
    assert_eq!(std::fs::read(w.slave.join("f")).unwrap(), b"x");
}

#[test]
fn nagios_answers_unknown_to_bad_arguments_and_perfdata_stays_valid() {
    let w = World::new();
    w.create("n", &[]);
    for args in [
        &["status", "n", "--nagios", "--warning", "soon"][..],
        &["status", "n", "--nagios", "--critical", "-5"],
        &["status", "n", "--nagios", "--no-such-flag"],
        &["status", "--nagios"],
        &[
            "status",
            "n",
            "--nagios",
            "--warning",
            "100",
            "--critical",
            "10",
        ],
        &["status", "n", "--nagios", "--critical-failures", "0"],
        &["status", "nosuch", "--nagios"],
    ] {
        let out = w.run(args);
        let line = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{args:?}: {line} {}",
            common::stderr(&out)
        );
        assert!(line.starts_with("GEOREP UNKNOWN - "), "{args:?}: {line}");
        assert_eq!(line.trim().lines().count(), 1, "{line}");
    }
    // Without --nagios a bad argument is bad input (2), as documented.
    assert_eq!(
        w.run(&["status", "n", "--warning", "5"]).status.code(),
        Some(2)
    );
    // Never synced: the lag is unknown, and the perfdata says U.
    let out = w.run(&["status", "n", "--nagios"]);
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(out.status.code(), Some(2), "{line}");
    let perf = line.split_once(" | ").expect("perfdata").1;
    assert!(perf.starts_with("lag=U;300;1800;0; "), "{perf}");
    for item in perf.split(' ') {
        let value = item
            .split_once('=')
            .expect(item)
            .1
            .split(';')
            .next()
            .unwrap();
        let num = value.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        assert!(
            value == "U" || num.parse::<f64>().is_ok(),
            "bad perfdata {item:?}"
        );
    }
}

#[test]
fn bad_input_is_refused_in_one_line() {
    let w = World::new();
    // georep's own errors are one line; clap's (bad arguments) add the usage after their first line.
    let refused = |args: &[&str], want: &str| {
        let out = w.run(args);
        let err = common::stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        let first = err.lines().next().unwrap_or_default();
        assert!(first.contains(want), "{args:?}: {err}");
        if first.starts_with("georep: ") {
            assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        }
    };
    w.create("b", &[]);
    for key in ["master", "slave", "session_id"] {
        refused(&["config", "b", "set", key, "/elsewhere"], "is read-only");
    }
    refused(
        &["config", "b", "set", "ssh_port", "0"],
        "a port number, 1-65535",
    );
    refused(
        &[
            "create",
            "b2",
            w.master.to_str().unwrap(),
            "host:/x",
            "--ssh-port",
            "0",
            "--no-verify",
        ],
        "--ssh-port",
    );
    refused(
        &["config", "b", "set", "persistent_failure_crawls", "0"],
        "at least 1",
    );
    refused(
        &["config", "b", "set", "rpo_warning_secs", "soon"],
        "rpo_warning_secs",
    );
    assert!(!w.home.join("sessions/b2").exists());
    // The settings that are not read-only still change.
    w.run_ok(&["config", "b", "set", "on_event", "logger georep"]);
    let v = w.run_ok(&["config", "b", "get", "on_event"]);
    assert_eq!(String::from_utf8_lossy(&v.stdout).trim(), "logger georep");
    let help = w.run_ok(&["config", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("rpo_warning_secs") && help.contains("default 3"),
        "{help}"
    );
    let v = w.run_ok(&["--version"]);
    assert!(String::from_utf8_lossy(&v.stdout).contains("(protocol "));
}
