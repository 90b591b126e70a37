//! The benchmark context and the two tools' runners.

use crate::procs::{self, Measured, Peaks};
use crate::proxy::Proxy;
use crate::sshd::Sshd;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Where a workload's slave lives.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Link {
    Local,
    /// Over SSH through the byte-counting proxy.
    Ssh,
    /// Over SSH through the proxy adding 50 ms each way.
    Wan,
    /// As `Wan`, the proxy delivering at most 50 MB/s each way.
    WanCapped,
}

pub struct Ctx {
    pub dir: PathBuf,
    pub georep: PathBuf,
    pub quick: bool,
    pub reps: usize,
    pub marker: String,
    pub sshd: Sshd,
    pub lan: Proxy,
    pub wan: Proxy,
    pub wan_capped: Proxy,
    /// Whether measured runs sample /proc (see [`Ctx::sampling`]).
    pub sample: std::sync::atomic::AtomicBool,
    /// `--drop-caches`: workloads that support it drop the page cache
    /// before each timed run (see [`Ctx::cold`]).
    pub drop_caches: bool,
}

impl Ctx {
    /// With `--drop-caches`, writes dirty pages out and drops the page
    /// cache, so the next run reads from the disk; otherwise nothing.
    pub fn cold(&self) -> anyhow::Result<()> {
        if !self.drop_caches {
            return Ok(());
        }
        procs::setup(&mut Command::new("sync"))?;
        std::fs::write("/proc/sys/vm/drop_caches", "3\n").map_err(|e| {
            anyhow::anyhow!("--drop-caches: writing /proc/sys/vm/drop_caches: {e} (run the bench as root, or leave the option out)")
        })
    }
}

/// One measured run of one tool.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub wall_ms: f64,
    pub wire_bytes: u64,
    pub peaks_kib: Peaks,
    /// Whether /proc was sampled during this run (its peaks are real; its
    /// time is left out of the median when unsampled runs exist).
    pub sampled: bool,
}

/// A tool's results on a workload.
#[derive(Debug, Clone, Serialize)]
pub struct ToolResult {
    pub tool: String,
    pub options: String,
    pub runs: Vec<Run>,
}

impl ToolResult {
    /// The median wall time of the runs made without /proc sampling (all
    /// runs if every one was sampled): on two cores the sampler's scans of
    /// /proc slow short runs down by several milliseconds.
    pub fn median_ms(&self) -> f64 {
        let timed = self.runs.iter().any(|r| !r.sampled);
        let mut v: Vec<f64> = self
            .runs
            .iter()
            .filter(|r| !timed || !r.sampled)
            .map(|r| r.wall_ms)
            .collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if v.is_empty() {
            return f64::NAN;
        }
        v[v.len() / 2]
    }

    pub fn median_bytes(&self) -> u64 {
        let mut v: Vec<u64> = self.runs.iter().map(|r| r.wire_bytes).collect();
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or(0)
    }

    pub fn peaks(&self) -> Peaks {
        let mut out = Peaks::new();
        for r in &self.runs {
            for (k, v) in &r.peaks_kib {
                let e = out.entry(k.clone()).or_insert(0);
                *e = (*e).max(*v);
            }
        }
        out
    }
}

impl Ctx {
    /// Workloads sample /proc (for peak RSS) in their first repetition only
    /// and take times from the others; set-up runs are not sampled.
    pub fn sampling(&self, on: bool) {
        self.sample.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn proxy(&self, link: Link) -> Option<&Proxy> {
        match link {
            Link::Local => None,
            Link::Ssh => Some(&self.lan),
            Link::Wan => Some(&self.wan),
            Link::WanCapped => Some(&self.wan_capped),
        }
    }

    pub fn ssh_config(&self, link: Link) -> anyhow::Result<PathBuf> {
        let port = self.proxy(link).map(|p| p.port).unwrap_or(self.sshd.port);
        self.sshd.client_config("bench", port)
    }

    /// Runs `cmd` measured; wire bytes are the proxy's count for SSH links,
    /// else what `local_bytes` extracts from the command's stdout.
    pub fn measure(
        &self,
        link: Link,
        cmd: Command,
        local_bytes: impl Fn(&str) -> u64,
    ) -> anyhow::Result<(Run, Measured)> {
        self.measure_allowing(link, cmd, local_bytes, &[0])
    }

    /// As [`measure`](Self::measure), accepting the exit codes `ok`.
    pub fn measure_allowing(
        &self,
        link: Link,
        cmd: Command,
        local_bytes: impl Fn(&str) -> u64,
        ok: &[i32],
    ) -> anyhow::Result<(Run, Measured)> {
        if let Some(p) = self.proxy(link) {
            p.reset();
        }
        let sample = self.sample.load(std::sync::atomic::Ordering::Relaxed);
        let m = procs::run_allowing(cmd, &self.marker, &self.dir, sample, ok)?;
        // Let the proxy drain its queues before reading its counters.
        if matches!(link, Link::Wan | Link::WanCapped) {
            std::thread::sleep(Duration::from_millis(150));
        }
        let wire = match self.proxy(link) {
            Some(p) => {
                let (u, d) = p.bytes();
                u + d
            }
            None => local_bytes(&m.stdout),
        };
        Ok((
            Run {
                wall_ms: m.wall.as_secs_f64() * 1000.0,
                wire_bytes: wire,
                peaks_kib: m.peaks.clone(),
                sampled: sample,
            },
            m,
        ))
    }

    /// A `georep` command with this workload's home.
    pub fn georep(&self, home: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(&self.georep);
        c.args(args).env("GEOREP_HOME", home);
        c
    }

    /// Creates a georep session from `master` to `slave_path` over `link`.
    pub fn georep_session(
        &self,
        home: &Path,
        name: &str,
        master: &Path,
        slave_path: &Path,
        link: Link,
        extra: &[&str],
    ) -> anyhow::Result<()> {
        std::fs::create_dir_all(home)?;
        std::fs::create_dir_all(slave_path)?;
        let m = master.to_str().unwrap();
        let mut args: Vec<String> = vec!["create".into(), name.into(), m.into()];
        match link {
            Link::Local => args.push(slave_path.display().to_string()),
            Link::Ssh | Link::Wan | Link::WanCapped => {
                let port = self.proxy(link).unwrap().port;
                args.push(format!("root@127.0.0.1:{}", slave_path.display()));
                args.extend([
                    "--ssh-port".into(),
                    port.to_string(),
                    "--identity".into(),
                    self.sshd.client_key().display().to_string(),
                    // The "remote" side is this machine: run the same build there.
                    "--remote-georep".into(),
                    self.georep.display().to_string(),
                ]);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        procs::setup(&mut self.georep(home, &args))?;
        Ok(())
    }

    /// The measured `georep sync NAME --json`; wire bytes from its summary for local links.
    pub fn georep_sync(&self, home: &Path, name: &str, link: Link) -> anyhow::Result<Run> {
        Ok(self.georep_sync_summary(home, name, link)?.0)
    }

    /// [`georep_sync`](Self::georep_sync), with the sync's JSON summary.
    pub fn georep_sync_summary(
        &self,
        home: &Path,
        name: &str,
        link: Link,
    ) -> anyhow::Result<(Run, serde_json::Value)> {
        let cmd = self.georep(home, &["sync", name, "--json"]);
        let (run, m) = self.measure(link, cmd, |out| {
            let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
            v["wire_bytes_out"].as_u64().unwrap_or(0) + v["wire_bytes_in"].as_u64().unwrap_or(0)
        })?;
        let v = serde_json::from_str(m.stdout.trim()).unwrap_or_default();
        Ok((run, v))
    }

    /// The measured `rsync OPTS src/ dst/` (over ssh for SSH links).
    pub fn rsync(&self, opts: &[&str], src: &Path, dst: &Path, link: Link) -> anyhow::Result<Run> {
        let mut c = Command::new("rsync");
        c.args(opts).arg("--stats");
        let dst_arg = match link {
            Link::Local => format!("{}/", dst.display()),
            _ => {
                c.arg("-e")
                    .arg(format!("ssh -F {}", self.ssh_config(link)?.display()));
                format!("bench:{}/", dst.display())
            }
        };
        c.arg(format!("{}/", src.display())).arg(dst_arg);
        let (run, _) = self.measure(link, c, rsync_bytes)?;
        Ok(run)
    }
}

/// Total bytes sent plus received, from `rsync --stats`.
pub fn rsync_bytes(out: &str) -> u64 {
    let field = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.split_whitespace().next().unwrap_or("0").replace(',', ""))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field("Total bytes sent") + field("Total bytes received")
}

/// Fails unless the two trees are equal (content, not metadata), ignoring georep's own directory.
pub fn verify_same(a: &Path, b: &Path) -> anyhow::Result<()> {
    procs::setup(
        Command::new("diff")
            .args(["-r", "-q", "--exclude=.georep"])
            .arg(a)
            .arg(b),
    )?;
    Ok(())
}

/// Empties a directory (keeps it).
pub fn empty_dir(p: &Path) -> anyhow::Result<()> {
    if p.exists() {
        std::fs::remove_dir_all(p)?;
    }
    std::fs::create_dir_all(p)?;
    Ok(())
}

/// `cp -a` then `sync` (restores a slave to its before-state between repetitions).
pub fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    if to.exists() {
        std::fs::remove_dir_all(to)?;
    }
    procs::setup(
        Command::new("cp")
            .arg("-a")
            .arg("--sparse=always")
            .arg(from)
            .arg(to),
    )?;
    // Flush the copy now, so no tool measured next pays for writing it back.
    procs::setup(&mut Command::new("sync"))?;
    Ok(())
}

/// Copies one file and flushes it (see [`copy_tree`]).
pub fn copy_file(from: &Path, to: &Path) -> anyhow::Result<()> {
    procs::setup(Command::new("cp").arg("--sparse=always").arg(from).arg(to))?;
    procs::setup(&mut Command::new("sync"))?;
    Ok(())
}
