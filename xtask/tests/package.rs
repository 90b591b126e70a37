//! The Debian package, as an operator installs it: built by `xtask deb`
//! from the georep binary this test suite built (the debug build, so the
//! suite does not compile a release one), installed with dpkg on this
//! machine, its files checked, its units verified by `systemd-analyze
//! verify`, lintian without errors, the completions loaded in bash, the
//! man pages read by man, and removed again with nothing left.
//!
//! Needs root (dpkg) and lintian, systemd and dpkg-dev, which
//! `packaging/setup.sh` installs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (packaging/setup.sh installs it)"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// dpkg, waiting for the lock when another apt or dpkg holds it.
fn dpkg(args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let out = run(Command::new("dpkg").args(args));
        let err = text(&out.stderr);
        if out.status.success() {
            return text(&out.stdout);
        }
        if err.contains("lock") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_secs(2));
            continue;
        }
        panic!("dpkg {args:?} failed ({}): {err}", out.status);
    }
}

fn installed() -> bool {
    let out = run(Command::new("dpkg-query").args(["-W", "-f", "${Status}", "georep"]));
    out.status.success() && text(&out.stdout).contains("ok installed")
}

/// Purges the package even when the test fails half-way.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "georep"]).output();
    }
}

fn georep_binary() -> PathBuf {
    let xtask = PathBuf::from(env!("CARGO_BIN_EXE_xtask"));
    let b = xtask.with_file_name("georep");
    assert!(
        b.is_file(),
        "{} is missing: build it first (`cargo build -p georep`; `cargo test --workspace` does)",
        b.display()
    );
    b
}

#[test]
fn the_package_installs_verifies_and_removes_cleanly() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "installing the package needs root: run the suite as root"
    );
    let deb = ok(Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["deb", "--binary"])
        .arg(georep_binary()));
    let deb = PathBuf::from(deb.trim());
    assert!(deb.is_file(), "{}", deb.display());

    // Control data: dependencies as the issue asks.
    let control = ok(Command::new("dpkg-deb").arg("-f").arg(&deb));
    assert!(control.contains("Package: georep"), "{control}");
    let depends = control
        .lines()
        .find(|l| l.starts_with("Depends:"))
        .unwrap_or_default();
    assert!(
        depends.contains("openssh-client") && depends.contains("libc6"),
        "{control}"
    );
    let recommends = control
        .lines()
        .find(|l| l.starts_with("Recommends:"))
        .unwrap_or_default();
    assert!(
        recommends.contains("openssh-server") && recommends.contains("qemu-utils"),
        "{control}"
    );

    // lintian: no errors (warnings such as "initial upload closes no bugs" are fine).
    let lint = run(Command::new("lintian").arg(&deb));
    let report = text(&lint.stdout) + &text(&lint.stderr);
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{report}");
    assert!(
        lint.status.success(),
        "lintian failed ({}):\n{report}",
        lint.status
    );

    let _purge = Purge;
    dpkg(&["-i", deb.to_str().unwrap()]);
    assert!(installed());
    let files = dpkg(&["-L", "georep"]);
    for f in [
        "/usr/bin/georep",
        "/lib/systemd/system/georep@.service",
        "/lib/systemd/system/georep-textfile.service",
        "/lib/systemd/system/georep-textfile.timer",
        "/usr/share/georep/georep-textfile.sh",
        "/etc/logrotate.d/georep",
        "/usr/share/man/man1/georep.1.gz",
        "/usr/share/man/man1/georep-sync.1.gz",
        "/usr/share/man/man1/georep-point-restore.1.gz",
        "/usr/share/bash-completion/completions/georep",
        "/usr/share/zsh/vendor-completions/_georep",
        "/usr/share/fish/vendor_completions.d/georep.fish",
        "/usr/share/doc/georep/README.md",
        "/usr/share/doc/georep/copyright",
        "/usr/share/doc/georep/changelog.Debian.gz",
        "/usr/share/doc/georep/docs/architecture.md",
        "/usr/share/doc/georep/examples/nagios-georep.cfg",
    ] {
        assert!(
            files.lines().any(|l| l == f),
            "{f} not in the package:\n{files}"
        );
        assert!(Path::new(f).exists(), "{f} not installed");
    }
    // A man page for every visible subcommand.
    for sub in [
        "create",
        "start",
        "stop",
        "status",
        "config",
        "checkpoint",
        "pause",
        "resume",
        "delete",
        "mark",
        "agent",
        "point",
    ] {
        let page = format!("/usr/share/man/man1/georep-{sub}.1.gz");
        assert!(Path::new(&page).exists(), "{page} missing");
    }
    let conffiles = dpkg(&["-s", "georep"]);
    assert!(conffiles.contains("/etc/logrotate.d/georep"), "{conffiles}");

    // The installed program runs and says its protocol version.
    let v = ok(Command::new("/usr/bin/georep").arg("--version"));
    assert!(v.starts_with("georep ") && v.contains("(protocol "), "{v}");
    let man = ok(Command::new("man")
        .args(["-P", "cat", "georep-sync"])
        .env("MANWIDTH", "100"));
    assert!(man.contains("--no-progress"), "{man}");

    // Every installed unit verifies cleanly (no warnings either).
    let out = run(Command::new("systemd-analyze").args([
        "verify",
        "/lib/systemd/system/georep@.service",
        "georep@s1.service",
        "/lib/systemd/system/georep-textfile.service",
        "/lib/systemd/system/georep-textfile.timer",
    ]));
    assert!(
        out.status.success() && text(&out.stderr).trim().is_empty(),
        "systemd-analyze verify ({}): {}",
        out.status,
        text(&out.stderr)
    );
    let unit = std::fs::read_to_string("/lib/systemd/system/georep@.service").unwrap();
    for want in [
        "StateDirectory=georep",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "ProtectSystem=full",
    ] {
        assert!(unit.contains(want), "the unit lacks {want}");
    }

    // bash completion: the file loads, registers _georep and completes subcommands and flags.
    let comp = ok(Command::new("bash").arg("-c").arg(
        r#"set -e
        source /usr/share/bash-completion/completions/georep
        complete -p georep
        COMP_WORDS=(georep sta); COMP_CWORD=1; _georep georep sta georep
        echo "subcommands: ${COMPREPLY[*]}"
        COMP_WORDS=(georep sync --n); COMP_CWORD=2; _georep georep --n sync
        echo "flags: ${COMPREPLY[*]}""#,
    ));
    assert!(comp.contains("-F _georep georep"), "{comp}");
    assert!(comp.contains("subcommands: start status"), "{comp}");
    assert!(comp.contains("flags: --no-progress"), "{comp}");

    // Removal: nothing of the package is left, not even its conffile.
    dpkg(&["--purge", "georep"]);
    assert!(!installed(), "still installed after --purge");
    for f in files.lines().filter(|l| l.contains("georep")) {
        assert!(!Path::new(f).exists(), "{f} left after --purge");
    }
}
