//! Helpers for tests of the daemon: started sessions that are killed when
//! the test ends (even on failure), status reads, polling with generous
//! deadlines (never timed assertions), and process checks by pid.

use super::World;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// A generous deadline for anything the daemon does.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// A started session; `georep stop --force` when dropped.
pub struct Running<'a> {
    pub w: &'a World,
    pub session: String,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let _ = self.w.run(&["stop", &self.session, "--force"]);
    }
}

impl World {
    /// `georep start SESSION`, which must exit 0.
    pub fn start(&self, session: &str) -> Running<'_> {
        self.run_ok(&["start", session]);
        Running {
            w: self,
            session: session.to_string(),
        }
    }

    /// `georep status SESSION --json`.
    pub fn status(&self, session: &str) -> Value {
        let out = self.run_ok(&["status", session, "--json"]);
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
    }

    /// Polls the status until `f` accepts it; panics with the last status after PATIENCE.
    pub fn wait_status(&self, session: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        wait_for(what, || {
            last = self.status(session);
            f(&last).then(|| last.clone())
        })
        .unwrap_or_else(|| panic!("timed out waiting for {what}; last status: {last:#}"))
    }

    /// Waits until the session's worker is Active and idle (a crawl done).
    pub fn wait_active(&self, session: &str) -> Value {
        self.wait_status(session, "an Active, idle worker", |s| {
            s["worker_status"] == "Active"
                && s["monitor_status"] == "Started"
                && s["crawl_status"] == "Idle"
        })
    }

    /// Every live process whose environment has this world's GEOREP_HOME.
    pub fn processes(&self) -> Vec<u32> {
        processes_with_env(&format!("GEOREP_HOME={}", self.home.display()))
    }

    pub fn log(&self, session: &str) -> String {
        std::fs::read_to_string(self.home.join("sessions").join(session).join("georep.log"))
            .unwrap_or_default()
    }
}

/// Polls `f` every 20 ms until it returns Some, for up to PATIENCE.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            eprintln!("gave up waiting for {what}");
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` is a live process (not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().to_string()))
        .is_some_and(|r| !r.starts_with('Z') && !r.starts_with('X'))
}

/// The state letter of a process (R, S, T for stopped, ...).
pub fn state(pid: u32) -> Option<char> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next())
        })
}

pub fn processes_with_env(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        if env.split(|&b| b == 0).any(|v| v == needle.as_bytes()) && alive(pid) {
            out.push(pid);
        }
    }
    out
}

pub fn pid(v: &Value, key: &str) -> u32 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("status has no {key}: {v:#}")) as u32
}

pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
        .unwrap_or_else(|e| panic!("signal {sig} to {pid}: {e}"));
}

/// Waits until the master and slave trees are equal.
pub fn wait_same(master: &Path, slave: &Path, what: &str) {
    let mut last = Vec::new();
    if wait_for(what, || {
        // The slave changes under the walk (temporaries come and go): a walk that trips retries.
        let walk = std::panic::catch_unwind(|| super::tree::differences(master, slave));
        last = walk.unwrap_or_else(|_| vec!["(the tree changed during the comparison)".into()]);
        last.is_empty().then_some(())
    })
    .is_none()
    {
        panic!(
            "{what}: the slave never converged:\n  {}",
            last.join("\n  ")
        );
    }
}

/// The pids of `georep agent` processes serving `root` (local or spawned by sshd).
pub fn agent_pids(root: &Path) -> Vec<u32> {
    let root = root.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if args.contains(&&b"agent"[..]) && args.contains(&root.as_bytes()) && alive(pid) {
            out.push(pid);
        }
    }
    out
}

/// Watches the final names of `files` on the slave from a thread until
/// dropped: each must always be absent or hold one of its `versions` in
/// full (never a partial file). Panics in `check` if one ever did not.
pub struct Watch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Watch {
    pub fn start(slave: &Path, files: Vec<(String, Vec<[u8; 32]>)>) -> Watch {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, slave) = (stop.clone(), slave.to_path_buf());
        let thread = std::thread::spawn(move || {
            let mut bad = Vec::new();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                for (name, versions) in &files {
                    if let Ok(data) = std::fs::read(slave.join(name)) {
                        if !versions.contains(blake3::hash(&data).as_bytes()) {
                            bad.push(format!("{name}: {} bytes, not a whole version", data.len()));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            bad
        });
        Watch {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops watching; panics if a partial file was ever seen.
    pub fn check(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let bad = self.thread.take().unwrap().join().unwrap();
        assert!(bad.is_empty(), "partial files seen: {bad:?}");
    }
}
