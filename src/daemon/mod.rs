//! The daemon: `start` (the monitor, daemonised or in the foreground),
//! `stop`, `pause`, `resume`, and the hidden `worker` subcommand the
//! monitor spawns; the worker's loop ([`continuous`]: when to crawl, with
//! what continuity), the inotify [`watcher`], and [`status`] and
//! checkpoints. Uses `engine`, the `georep-monitor` crate and the layers
//! below; never `cli`.

pub mod continuous;
pub mod failures;
pub mod status;
pub mod watcher;

use crate::error::{exit, UserError};
use crate::session::Session;
use crate::user_err;
use anyhow::Context;
use georep_monitor::backoff::Backoff;
use georep_monitor::logfile::{LogFile, LogWriter};
use georep_monitor::status::{MonitorStatus, Status, WorkerStatus};
use georep_monitor::supervise::{Files, Identity, Settings, Supervisor};
use georep_monitor::{PidFile, PidRecord, ProcessState};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use std::io::BufRead;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long a stopping worker may take before the monitor kills it.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

fn identity(s: &Session) -> Identity {
    Identity {
        session: s.name.clone(),
        master: s.config.master.display().to_string(),
        slave: s.config.slave.clone(),
    }
}

fn settings(s: &Session) -> Settings {
    Settings {
        hang_timeout: Duration::from_secs(s.config.hang_timeout_secs.max(5)),
        backoff: Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
        },
        stop_timeout: STOP_TIMEOUT,
        stable_after: Duration::from_secs(60),
        events: georep_monitor::events::EventSettings {
            command: s.config.on_event.clone(),
            timeout: Duration::from_secs(s.config.on_event_timeout_secs.max(1)),
            rpo_warning_secs: s.config.rpo_warning_secs,
        },
    }
}

fn live(path: &std::path::Path) -> Option<PidRecord> {
    PidRecord::read_live(path).ok().flatten()
}

/// `georep start SESSION`: starts the monitor in the background and
/// returns once it is up (its pid file held, status Started).
pub fn start(name: &str) -> anyhow::Result<i32> {
    let s = Session::load(name)?;
    if let Some(r) = live(&s.monitor_pid_path()) {
        crate::outln!("session {name} is already running (monitor pid {})", r.pid);
        return Ok(exit::OK);
    }
    let exe = std::env::current_exe().context("locating the georep binary")?;
    let mut child = std::process::Command::new(&exe)
        .args(["start", name, "--foreground", "--detach"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting the monitor ({})", exe.display()))?;
    let mut line = String::new();
    let _ = std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line);
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some("started"), Some(pid)) => {
            crate::outln!("started session {name} (monitor pid {pid})");
            Ok(exit::OK)
        }
        (Some("running"), pid) => {
            let _ = child.wait();
            crate::outln!(
                "session {name} is already running (monitor pid {})",
                pid.unwrap_or("?")
            );
            Ok(exit::OK)
        }
        _ => {
            let out = child
                .wait_with_output()
                .context("waiting for the monitor")?;
            let err = String::from_utf8_lossy(&out.stderr);
            let err = err.trim().trim_start_matches("georep: ");
            anyhow::bail!(
                "the monitor of session {name} did not start ({}): {}",
                out.status,
                if err.is_empty() { "no message" } else { err }
            )
        }
    }
}

/// The monitor process: `georep start SESSION --foreground` (for systemd),
/// or the daemonised child of `start` (`detach`: new session, readiness
/// reported on stdout, then stdio closed).
pub fn run_monitor(name: &str, detach: bool) -> anyhow::Result<i32> {
    let s = Session::load(name)?;
    if detach {
        let _ = nix::unistd::setsid();
    }
    let pidfile = match PidFile::acquire(&s.monitor_pid_path())
        .with_context(|| format!("taking {}", s.monitor_pid_path().display()))?
    {
        Ok(p) => p,
        Err(holder) => {
            let pid = holder
                .map(|h| h.pid.to_string())
                .unwrap_or_else(|| "?".into());
            if detach {
                crate::outln!("running {pid}");
                return Ok(exit::OK);
            }
            return Err(UserError::new(format!(
                "session {name} is already running (monitor pid {pid}): `georep stop {name}` first"
            ))
            .into());
        }
    };
    let log = LogFile::open(&s.log_path(), !detach)
        .with_context(|| format!("opening the log {}", s.log_path().display()))?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("GEOREP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LogWriter(log.clone()))
        .with_ansi(false)
        .with_target(false)
        .try_init();
    let exe = std::env::current_exe().context("locating the georep binary")?;
    let reload_name = name.to_string();
    let sup = Supervisor {
        identity: identity(&s),
        settings: settings(&s),
        program: exe,
        args: vec!["worker".into(), name.into()],
        files: Files {
            status: s.status_path(),
            checkpoint: s.checkpoint_path(),
            config: s.config_path(),
        },
        reload: Box::new(move || {
            let s = Session::load(&reload_name).map_err(|e| e.to_string())?;
            Ok((identity(&s), settings(&s)))
        }),
        log,
        last_synced_ns: s.state().last_synced_xtime,
        detector: Default::default(),
        hooks: None,
    };
    let on_ready: Box<dyn FnOnce() + Send> = Box::new(move || {
        if detach {
            use std::io::Write;
            let mut out = std::io::stdout();
            let _ = writeln!(out, "started {}", std::process::id());
            let _ = out.flush();
            if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
                let _ = nix::unistd::dup2_stdout(&null);
                let _ = nix::unistd::dup2_stderr(&null);
            }
        }
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = rt.block_on(sup.run(on_ready));
    drop(pidfile);
    result.context("running the monitor")?;
    Ok(exit::OK)
}

/// The hidden `georep worker SESSION`: the continuous worker, spawned by
/// the monitor. Stops on SIGTERM/SIGINT and when its stdin (a pipe from
/// the monitor) closes, so a killed monitor leaves no orphan behind.
pub fn run_worker(name: &str) -> anyhow::Result<i32> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GEOREP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .try_init();
    let s = match Session::load(name) {
        Ok(s) => s,
        Err(e) => {
            let r = georep_monitor::report::WorkerReport {
                fatal: Some(e.to_string()),
                ..Default::default()
            };
            crate::outln!("{}", serde_json::to_string(&r)?);
            return Err(e.into());
        }
    };
    let rt = crate::engine::worker::runtime().context("starting the async runtime")?;
    let result = rt.block_on(async {
        let shutdown = CancellationToken::new();
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("signal handler");
            let mut int = signal(SignalKind::interrupt()).expect("signal handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            on_signal.cancel();
        });
        let on_eof = shutdown.clone();
        let (pause_tx, pause) = tokio::sync::watch::channel(false);
        // The monitor's commands, one per line; EOF: the monitor is gone.
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                match line.trim() {
                    "pause" => {
                        tracing::info!("paused");
                        let _ = pause_tx.send(true);
                    }
                    "resume" => {
                        tracing::info!("resumed");
                        let _ = pause_tx.send(false);
                    }
                    other => tracing::warn!(command = other, "unknown command from the monitor"),
                }
            }
            tracing::warn!("the monitor is gone (stdin closed): stopping");
            on_eof.cancel();
        });
        use tracing::Instrument;
        crate::daemon::continuous::run(&s, shutdown, pause)
            .instrument(tracing::info_span!("worker", session = %s.name))
            .await
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    result?;
    Ok(exit::OK)
}

/// After `config set`: tells whether the running monitor picks the change up.
pub fn note_config_change(s: &Session) {
    if let Some(r) = live(&s.monitor_pid_path()) {
        crate::outln!(
            "session {} is running: its monitor (pid {}) restarts the worker with the new settings",
            s.name,
            r.pid
        );
    }
}

fn wait_gone(rec: &PidRecord, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while rec.state() == ProcessState::Running {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// `georep stop SESSION [--force]`.
pub fn stop(name: &str, force: bool) -> anyhow::Result<i32> {
    let s = Session::load(name)?;
    let monitor = live(&s.monitor_pid_path());
    let worker = live(&s.worker_pid_path());
    if monitor.is_none() && worker.is_none() {
        crate::outln!("session {name} is not running");
        return Ok(exit::OK);
    }
    if force {
        for r in monitor.iter().chain(worker.iter()) {
            let _ = kill(Pid::from_raw(r.pid as i32), Signal::SIGKILL);
        }
        // The worker's process group holds its local agent too.
        if let Some(w) = &worker {
            let _ = killpg(Pid::from_raw(w.pid as i32), Signal::SIGKILL);
        }
        for r in monitor.iter().chain(worker.iter()) {
            wait_gone(r, Duration::from_secs(10));
        }
        let _ = std::fs::remove_file(s.monitor_pid_path());
        let _ = std::fs::remove_file(s.worker_pid_path());
        let mut st = Status::read(&s.status_path())
            .ok()
            .flatten()
            .unwrap_or_else(|| status::created(&s));
        st.monitor_status = MonitorStatus::Stopped;
        st.worker_status = WorkerStatus::Stopped;
        st.monitor_pid = None;
        st.worker_pid = None;
        st.crawl_status = None;
        st.set_error("stopped with --force (processes killed)");
        st.write(&s.status_path())
            .with_context(|| format!("writing {}", s.status_path().display()))?;
        crate::outln!("killed session {name}");
        return Ok(exit::OK);
    }
    let (target, what) = match (&monitor, &worker) {
        (Some(m), _) => (m, "monitor"),
        (None, Some(w)) => (w, "worker"),
        (None, None) => unreachable!(),
    };
    kill(Pid::from_raw(target.pid as i32), Signal::SIGTERM)
        .with_context(|| format!("signalling the {what} (pid {})", target.pid))?;
    let limit = STOP_TIMEOUT + Duration::from_secs(30);
    if !wait_gone(target, limit) {
        eprintln!(
            "georep: the {what} of session {name} (pid {}) did not stop within {} s: `georep stop {name} --force` kills it",
            target.pid,
            limit.as_secs()
        );
        return Ok(exit::TEMPORARY);
    }
    if let Some(w) = &worker {
        // Without a monitor nobody else stops an orphaned worker.
        if w.state() == ProcessState::Running {
            let _ = kill(Pid::from_raw(w.pid as i32), Signal::SIGTERM);
            wait_gone(w, limit);
        }
    }
    crate::outln!("stopped session {name}");
    Ok(exit::OK)
}

/// `georep pause` (`resume`): SIGUSR1 (SIGUSR2) to the monitor, which
/// stops (continues) the worker's process group; waits for the status.
pub fn pause(name: &str, resume: bool) -> anyhow::Result<i32> {
    let s = Session::load(name)?;
    let Some(m) = live(&s.monitor_pid_path()) else {
        return Err(user_err!("session {name} is not running: `georep start {name}` first").into());
    };
    let (sig, want) = if resume {
        (Signal::SIGUSR2, MonitorStatus::Started)
    } else {
        (Signal::SIGUSR1, MonitorStatus::Paused)
    };
    kill(Pid::from_raw(m.pid as i32), sig)
        .with_context(|| format!("signalling the monitor (pid {})", m.pid))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = Status::read(&s.status_path()).ok().flatten();
        if st.is_some_and(|st| st.monitor_status == want) {
            crate::outln!(
                "{} session {name}",
                if resume { "resumed" } else { "paused" }
            );
            return Ok(exit::OK);
        }
        if Instant::now() >= deadline || m.state() != ProcessState::Running {
            eprintln!("georep: the monitor of session {name} did not confirm within 30 s: see `georep status {name} --detail`");
            return Ok(exit::TEMPORARY);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
