//! Shared helpers of the integration tests: real georep processes on real
//! directories with real xattrs, and a comparison of whole trees.
#![allow(dead_code)]

pub mod catalog;
pub mod daemon;
pub mod dr;
pub mod mount;
pub mod mutate;
pub mod proxy;
pub mod raw_agent;
pub mod rot;
pub mod sshd;
pub mod tree;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn georep_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_georep"))
}

/// A scratch world: a master, a slave and a georep home in one temp dir.
pub struct World {
    pub dir: tempfile::TempDir,
    pub master: PathBuf,
    pub slave: PathBuf,
    pub home: PathBuf,
}

impl World {
    pub fn new() -> World {
        let dir = tempfile::Builder::new()
            .prefix("georep-test")
            .tempdir_in(scratch_base())
            .unwrap();
        let master = dir.path().join("master");
        let slave = dir.path().join("slave");
        let home = dir.path().join("home");
        std::fs::create_dir_all(&master).unwrap();
        std::fs::create_dir_all(&home).unwrap();
        World {
            dir,
            master,
            slave,
            home,
        }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(georep_bin());
        c.args(args)
            .env("GEOREP_HOME", &self.home)
            .env_remove("GEOREP_LOG");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run georep")
    }

    /// Runs georep and insists on exit code `code`.
    pub fn run_ok(&self, args: &[&str]) -> Output {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "georep {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn create(&self, session: &str, extra: &[&str]) {
        let mut args = vec![
            "create",
            session,
            self.master.to_str().unwrap(),
            self.slave.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.run_ok(&args);
    }

    /// Creates `session` replicating to `self.slave` through `sshd` (push-pem).
    pub fn create_ssh(&self, sshd: &sshd::Sshd, session: &str, extra: &[&str]) -> Output {
        let mut args = sshd::create_args(sshd, session, &self.master, &self.slave);
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run_ok(&args)
    }

    /// `georep sync SESSION --json`, which must exit 0; returns the summary.
    pub fn sync(&self, session: &str) -> Value {
        let out = self.run(&["sync", session, "--json"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "sync failed ({}):\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("bad JSON {stdout:?}: {e}"))
    }
}

/// Where test trees live: on the same file system as the build (real
/// ext4-or-whatever with user xattrs), not necessarily /tmp.
pub fn scratch_base() -> PathBuf {
    let base = std::env::var_os("GEOREP_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(&base).unwrap();
    base
}

pub fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("summary has no numeric {key}: {v}"))
}

pub fn mark(p: &Path) {
    georep::fs::xtime::mark(p).unwrap_or_else(|e| panic!("mark {}: {e}", p.display()));
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
