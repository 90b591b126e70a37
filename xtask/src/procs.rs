//! Running a measured command: wall time, and the peak RSS (VmHWM) of every
//! process taking part, sampled from /proc while it runs and grouped by role
//! (worker, agent, rsync sender/receiver, ssh, sshd).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Role name -> peak resident set in KiB.
pub type Peaks = BTreeMap<String, u64>;

pub struct Measured {
    pub wall: Duration,
    pub peaks: Peaks,
    pub stdout: String,
}

fn role(cmdline: &str) -> Option<&'static str> {
    let mut args = cmdline.split('\0');
    let exe = args.next().unwrap_or("");
    let base = exe.rsplit('/').next().unwrap_or(exe);
    let rest: Vec<&str> = args.collect();
    match base {
        "georep" => match rest.first().copied() {
            Some("agent") => Some("georep agent"),
            Some("sync") | Some("worker") | Some("verify") => Some("georep worker"),
            _ => None,
        },
        "rsync" if rest.contains(&"--server") => Some("rsync receiver"),
        "rsync" => Some("rsync sender"),
        "ssh" => Some("ssh"),
        "cat" => Some("cat"),
        "cp" => Some("cp"),
        _ => None,
    }
}

/// Whether process `pid` belongs to this benchmark run: it carries the
/// run's marker in its environment, or names the run's directory.
fn ours(pid: &str, cmdline: &str, marker: &str, dir: &str) -> bool {
    if cmdline.contains(dir) {
        return true;
    }
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|e| e.split(|&b| b == 0).any(|kv| kv == marker.as_bytes()))
        .unwrap_or(false)
}

fn vm_hwm(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn sample(peaks: &Mutex<Peaks>, marker: &str, dir: &str) {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        let Some(r) = role(&cmd) else { continue };
        if !ours(pid, &cmd, marker, dir) {
            continue;
        }
        if let Some(kb) = vm_hwm(pid) {
            let mut p = peaks.lock().unwrap();
            let e = p.entry(r.to_string()).or_insert(0);
            *e = (*e).max(kb);
        }
    }
}

/// Runs `cmd` (given the run marker in its environment) to completion,
/// failing on an exit code not in `ok` (usually `[0]`; verify's 1 says
/// differences were found); samples /proc every 5 ms meanwhile if `sample`.
pub fn run_allowing(
    mut cmd: Command,
    marker: &str,
    dir: &Path,
    sample: bool,
    ok: &[i32],
) -> anyhow::Result<Measured> {
    let (k, v) = marker.split_once('=').expect("marker is K=V");
    cmd.env(k, v);
    let peaks = Arc::new(Mutex::new(Peaks::new()));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peaks, done, marker, dir) = (
            peaks.clone(),
            done.clone(),
            marker.to_string(),
            dir.display().to_string(),
        );
        std::thread::spawn(move || {
            while sample && !done.load(Ordering::Relaxed) {
                self::sample(&peaks, &marker, &dir);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let start = Instant::now();
    let out = cmd.stderr(std::process::Stdio::piped()).output();
    let wall = start.elapsed();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let out = out?;
    if !out.status.code().is_some_and(|c| ok.contains(&c)) {
        anyhow::bail!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let peaks = peaks.lock().unwrap().clone();
    Ok(Measured {
        wall,
        peaks,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    })
}

/// Runs a set-up command (not measured), failing loudly.
pub fn setup(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output()?;
    if !out.status.success() {
        anyhow::bail!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
