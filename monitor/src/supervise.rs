//! The monitor process's loop: spawn the worker, read its reports, notice
//! when it dies or hangs, restart it with capped exponential backoff, and
//! record every state change (and the error behind it) in `status.json`.
//!
//! Signals: SIGTERM/SIGINT stop (the worker is asked to stop, then
//! killed after `stop_timeout`), SIGHUP reopens the log, SIGUSR1 pauses
//! and SIGUSR2 resumes: the monitor writes `pause` / `resume` lines to the
//! worker's stdin, and the worker holds its crawl while its watcher keeps
//! counting changes. A change of the config file restarts the worker with
//! the new settings. Every status written goes through the event
//! [`Detector`], which runs the `on_event` hook.

use crate::backoff::Backoff;
use crate::checkpoint::Checkpoint;
use crate::events::{Detector, EventSettings, Hooks};
use crate::logfile::LogFile;
use crate::report::WorkerReport;
use crate::status::{MonitorStatus, Status, WorkerStatus};
use crate::time::{format_rfc3339, now_ns};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::signal::unix::{signal, Signal as Stream, SignalKind};
use tokio::sync::mpsc;

/// What the status file says the session is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub session: String,
    pub master: String,
    pub slave: String,
}

/// Supervision settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// A worker that sends no report, or makes no progress in a crawl, for this long is killed.
    pub hang_timeout: Duration,
    pub backoff: Backoff,
    /// How long a stopping worker may take before it is killed.
    pub stop_timeout: Duration,
    /// A worker that ran this long before dying resets the backoff.
    pub stable_after: Duration,
    /// The `on_event` hook.
    pub events: EventSettings,
}

/// Files the monitor reads and writes.
#[derive(Debug, Clone)]
pub struct Files {
    pub status: PathBuf,
    pub checkpoint: PathBuf,
    /// Watched: a change restarts the worker.
    pub config: PathBuf,
}

/// Re-reads the configuration after the config file changed.
pub type Reload = Box<dyn FnMut() -> Result<(Identity, Settings), String> + Send>;

pub struct Supervisor {
    pub identity: Identity,
    pub settings: Settings,
    /// The worker's command line (the same binary, a hidden subcommand).
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub files: Files,
    pub reload: Reload,
    pub log: Arc<LogFile>,
    /// The root's stime when the monitor starts (from the session's state).
    pub last_synced_ns: Option<u64>,
    /// What the event hook was already told.
    pub detector: Mutex<Detector>,
    /// Started by [`Supervisor::run`].
    pub hooks: Option<Hooks>,
}

struct Signals {
    term: Stream,
    int: Stream,
    hup: Stream,
    usr1: Stream,
    usr2: Stream,
}

/// How a worker's run ended.
enum Outcome {
    Stop,
    Restart,
    Died { reason: String, ran_for: Duration },
}

/// What the worker's pipes carried.
enum Msg {
    Report(Box<WorkerReport>),
    Garbage(String),
}

const STDERR_TAIL: usize = 20;
/// The status file is rewritten at least this often, so a reader can tell a wedged monitor.
pub const STATUS_REFRESH: Duration = Duration::from_secs(15);

impl Supervisor {
    fn write(&self, st: &mut Status) {
        let cp = Checkpoint::read(&self.files.checkpoint);
        st.checkpoint_time = cp.map(|c| format_rfc3339(c.time_ns));
        st.checkpoint_completed = cp.is_some_and(|c| c.completed_at_ns.is_some());
        st.checkpoint_completion_time = cp.and_then(|c| c.completed_at_ns).map(format_rfc3339);
        st.updated = Some(format_rfc3339(now_ns()));
        if let Err(e) = st.write(&self.files.status) {
            tracing::error!(path = %self.files.status.display(), error = %e, "cannot write the status file");
        }
        let events = self.detector.lock().unwrap().observe(
            st,
            self.settings.events.rpo_warning_secs,
            now_ns(),
        );
        if let Some(h) = &self.hooks {
            for e in events {
                h.send(&self.settings.events, e);
            }
        }
    }

    fn initial_status(&self) -> Status {
        let old = Status::read(&self.files.status).ok().flatten();
        let mut st = Status::created(
            &self.identity.session,
            &self.identity.master,
            &self.identity.slave,
        );
        if let Some(o) = old {
            st.failures = o.failures;
            st.bytes_sent = o.bytes_sent;
            st.files_synced = o.files_synced;
            st.last_synced = o.last_synced;
        }
        if let Some(t) = self.last_synced_ns {
            st.last_synced = Some(format_rfc3339(t));
        }
        st.monitor_status = MonitorStatus::Started;
        st.monitor_pid = Some(std::process::id());
        st.worker_status = WorkerStatus::Initializing;
        st
    }

    /// Runs until SIGTERM/SIGINT; `on_ready` is called once the status says Started.
    pub async fn run(mut self, on_ready: Box<dyn FnOnce() + Send>) -> std::io::Result<()> {
        let mut sig = Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        };
        self.hooks = Some(Hooks::start());
        let mut st = self.initial_status();
        self.write(&mut st);
        on_ready();
        tracing::info!(session = %self.identity.session, pid = std::process::id(), "monitor started");
        let mut paused = false;
        let mut faults_in_row = 0u32;
        let mut config_seen = std::fs::read(&self.files.config).ok();
        loop {
            match self
                .run_worker(&mut st, &mut sig, &mut paused, &mut config_seen)
                .await
            {
                Outcome::Stop => break,
                Outcome::Restart => continue,
                Outcome::Died { reason, ran_for } => {
                    if ran_for >= self.settings.stable_after {
                        faults_in_row = 0;
                    }
                    faults_in_row += 1;
                    let delay = self.settings.backoff.delay(faults_in_row);
                    tracing::warn!(session = %self.identity.session, error = %reason, restart_in_secs = delay.as_secs_f64(), "worker faulty");
                    st.worker_status = WorkerStatus::Faulty;
                    st.worker_pid = None;
                    st.crawl_status = None;
                    st.set_error(reason);
                    st.restarts += 1;
                    self.write(&mut st);
                    if !self
                        .wait_backoff(delay, &mut st, &mut sig, &mut paused, &mut config_seen)
                        .await
                    {
                        break;
                    }
                }
            }
        }
        st.monitor_status = MonitorStatus::Stopped;
        st.worker_status = WorkerStatus::Stopped;
        st.monitor_pid = None;
        st.worker_pid = None;
        st.crawl_status = None;
        st.entry = 0;
        st.data = 0;
        st.meta = 0;
        self.write(&mut st);
        tracing::info!(session = %self.identity.session, "monitor stopped");
        Ok(())
    }

    fn set_paused(&self, st: &mut Status, paused: bool) {
        st.monitor_status = if paused {
            MonitorStatus::Paused
        } else {
            MonitorStatus::Started
        };
        tracing::info!(session = %self.identity.session, "{}", if paused { "paused" } else { "resumed" });
    }

    /// Waits out a backoff delay; false when asked to stop. A config change ends the wait early.
    async fn wait_backoff(
        &mut self,
        delay: Duration,
        st: &mut Status,
        sig: &mut Signals,
        paused: &mut bool,
        config_seen: &mut Option<Vec<u8>>,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + delay;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut written = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return true,
                _ = sig.term.recv() => return false,
                _ = sig.int.recv() => return false,
                _ = sig.hup.recv() => self.reopen_log(),
                _ = sig.usr1.recv() => if !*paused { *paused = true; self.set_paused(st, true); self.write(st); },
                _ = sig.usr2.recv() => if *paused { *paused = false; self.set_paused(st, false); self.write(st); },
                _ = tick.tick() => {
                    if self.config_changed(st, config_seen) {
                        return true;
                    }
                    if written.elapsed() >= STATUS_REFRESH {
                        self.write(st);
                        written = Instant::now();
                    }
                }
            }
        }
    }

    fn reopen_log(&self) {
        match self.log.reopen() {
            Ok(()) => tracing::info!(path = %self.log.path().display(), "log reopened"),
            Err(e) => {
                tracing::error!(path = %self.log.path().display(), error = %e, "cannot reopen the log")
            }
        }
    }

    /// Whether the config file changed and was reloaded.
    fn config_changed(&mut self, st: &mut Status, seen: &mut Option<Vec<u8>>) -> bool {
        let now = std::fs::read(&self.files.config).ok();
        if now == *seen {
            return false;
        }
        *seen = now;
        match (self.reload)() {
            Ok((identity, settings)) => {
                tracing::info!(session = %self.identity.session, "configuration changed: restarting the worker");
                st.master = identity.master.clone();
                st.slave = identity.slave.clone();
                self.identity = identity;
                self.settings = settings;
                true
            }
            Err(e) => {
                tracing::error!(session = %self.identity.session, error = %e, "configuration changed but is invalid: keeping the running worker");
                st.set_error(format!(
                    "{e} (the running worker keeps the previous settings)"
                ));
                self.write(st);
                false
            }
        }
    }

    async fn run_worker(
        &mut self,
        st: &mut Status,
        sig: &mut Signals,
        paused: &mut bool,
        config_seen: &mut Option<Vec<u8>>,
    ) -> Outcome {
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let started = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return Outcome::Died {
                    reason: format!("cannot start the worker {}: {e}", self.program.display()),
                    ran_for: Duration::ZERO,
                }
            }
        };
        let pid = child.id().expect("a child that was just spawned has a pid");
        // Kept open: its EOF tells the worker that the monitor is gone; it
        // also carries `pause` and `resume`.
        let mut stdin = child.stdin.take();
        if *paused {
            tell(&mut stdin, "pause").await;
        }
        let tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let (tx, mut rx) = mpsc::channel::<Msg>(256);
        let stdout = child.stdout.take().expect("piped");
        let stdout_reader = tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let msg = match serde_json::from_str::<WorkerReport>(&line) {
                    Ok(r) => Msg::Report(Box::new(r)),
                    Err(_) => Msg::Garbage(line),
                };
                if tx.send(msg).await.is_err() {
                    break;
                }
            }
        });
        {
            let stderr = child.stderr.take().expect("piped");
            let tail = tail.clone();
            let log = self.log.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    log.write_all(format!("{line}\n").as_bytes());
                    let mut t = tail.lock().unwrap();
                    if t.len() >= STDERR_TAIL {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            });
        }
        tracing::info!(session = %self.identity.session, worker_pid = pid, "worker started");
        st.worker_pid = Some(pid);
        st.worker_status = WorkerStatus::Initializing;
        st.crawl_status = None;
        self.write(st);
        let base = (st.failures, st.bytes_sent, st.files_synced);
        let mut last = WorkerReport::default();
        let mut heard = Instant::now();
        let mut progress_at = Instant::now();
        let mut written = Instant::now();
        let mut dirty = false;
        let mut stdout_open = true;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let apply = |st: &mut Status, r: &WorkerReport| {
            if let Some(ws) = r.status {
                st.worker_status = ws;
            }
            st.crawl_status = r.crawl_status.clone();
            // Never backwards: an idle worker may have proven a later time.
            if let Some(t) = r.last_synced_ns {
                if st.last_synced_ns().is_none_or(|old| t > old) {
                    st.last_synced = Some(format_rfc3339(t));
                }
            }
            st.crawl_progress = r.crawl_progress.clone();
            st.failing_entries = r.failing_entries;
            st.persistent_failures = r.persistent_failures;
            st.persistent_failure_entries = r.persistent_failure_entries.clone();
            if let Some(h) = &r.hosts {
                st.hosts = h.clone();
            }
            st.entry = r.entry;
            st.data = r.data;
            st.meta = r.meta;
            st.failures = base.0 + r.failures;
            st.bytes_sent = base.1 + r.bytes_sent;
            st.files_synced = base.2 + r.files_synced;
            st.full_crawl_reason = r.full_crawl_reason.clone();
            if let Some(e) = &r.error {
                if st.last_error.as_ref() != Some(e) {
                    st.set_error(e.clone());
                }
            }
        };
        let died = loop {
            tokio::select! {
                msg = rx.recv(), if stdout_open => match msg {
                    Some(Msg::Report(r)) => {
                        heard = Instant::now();
                        if r.progress != last.progress || !r.busy {
                            progress_at = Instant::now();
                        }
                        let changed = r.status != last.status || r.crawl_status != last.crawl_status || r.error != last.error;
                        apply(st, &r);
                        last = *r;
                        dirty = true;
                        if changed || written.elapsed() >= Duration::from_secs(1) {
                            self.write(st);
                            written = Instant::now();
                            dirty = false;
                        }
                    }
                    Some(Msg::Garbage(line)) => {
                        tracing::warn!(line = %line, "unexpected output from the worker");
                    }
                    // stdout closed: the worker is exiting; its exit is awaited by the branch below.
                    None => stdout_open = false,
                },
                status = child.wait() => {
                    // Let the reader deliver the last lines (a fatal report).
                    let _ = tokio::time::timeout(Duration::from_secs(2), stdout_reader).await;
                    while let Ok(m) = rx.try_recv() {
                        if let Msg::Report(r) = m {
                            apply(st, &r);
                            last = *r;
                        }
                    }
                    break self.exit_reason(status, &last, &tail);
                }
                _ = sig.term.recv() => { self.terminate(&mut child, pid, &mut rx).await; return Outcome::Stop; }
                _ = sig.int.recv() => { self.terminate(&mut child, pid, &mut rx).await; return Outcome::Stop; }
                _ = sig.hup.recv() => self.reopen_log(),
                _ = sig.usr1.recv() => if !*paused {
                    tell(&mut stdin, "pause").await;
                    *paused = true;
                    self.set_paused(st, true);
                    self.write(st);
                },
                _ = sig.usr2.recv() => if *paused {
                    tell(&mut stdin, "resume").await;
                    *paused = false;
                    heard = Instant::now();
                    progress_at = Instant::now();
                    self.set_paused(st, false);
                    self.write(st);
                },
                _ = tick.tick() => {
                    if !*paused {
                        let limit = self.settings.hang_timeout;
                        let hung = if heard.elapsed() >= limit {
                            Some(format!("no report from the worker for {} s: killed as hung", limit.as_secs()))
                        } else if last.busy && progress_at.elapsed() >= limit {
                            Some(format!("no progress in the crawl for {} s: killed as hung", limit.as_secs()))
                        } else {
                            None
                        };
                        if let Some(reason) = hung {
                            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                            let _ = child.wait().await;
                            break reason;
                        }
                        if self.config_changed(st, config_seen) {
                            self.terminate(&mut child, pid, &mut rx).await;
                            st.worker_pid = None;
                            return Outcome::Restart;
                        }
                    }
                    if dirty || written.elapsed() >= STATUS_REFRESH {
                        self.write(st);
                        written = Instant::now();
                        dirty = false;
                    }
                }
            }
        };
        // Whatever the worker left in its group (a local agent) goes with it.
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        Outcome::Died {
            reason: died,
            ran_for: started.elapsed(),
        }
    }

    fn exit_reason(
        &self,
        status: std::io::Result<std::process::ExitStatus>,
        last: &WorkerReport,
        tail: &Mutex<VecDeque<String>>,
    ) -> String {
        use std::os::unix::process::ExitStatusExt;
        let how = match status {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(c), _) => format!("exited with code {c}"),
                (_, Some(sig)) => format!(
                    "killed by signal {}",
                    Signal::try_from(sig).map(|s| s.as_str()).unwrap_or("?")
                ),
                _ => "ended".to_string(),
            },
            Err(e) => format!("could not be waited for: {e}"),
        };
        if let Some(f) = &last.fatal {
            return format!("worker {how}: {f}");
        }
        let tail = tail.lock().unwrap();
        // The last line that is not routine logging (an error, a warning, a panic).
        let routine = |l: &str| {
            [" INFO ", " DEBUG ", " TRACE "]
                .iter()
                .any(|w| l.contains(w))
        };
        match tail
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty() && !routine(l))
        {
            Some(line) => format!("worker {how}; its last words: {}", line.trim()),
            None => format!("worker {how}"),
        }
    }

    /// Asks the worker to stop (SIGTERM), draining its output; kills its group after `stop_timeout`.
    async fn terminate(
        &self,
        child: &mut tokio::process::Child,
        pid: u32,
        rx: &mut mpsc::Receiver<Msg>,
    ) {
        let group = Pid::from_raw(pid as i32);
        tracing::info!(session = %self.identity.session, worker_pid = pid, "stopping the worker");
        let _ = kill(group, Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + self.settings.stop_timeout;
        loop {
            tokio::select! {
                _ = child.wait() => break,
                _ = rx.recv() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(worker_pid = pid, "the worker did not stop in time: killing it");
                    let _ = killpg(group, Signal::SIGKILL);
                    let _ = child.wait().await;
                    break;
                }
            }
        }
        let _ = killpg(group, Signal::SIGKILL);
    }
}

/// Writes one command line (`pause`, `resume`) to the worker's stdin.
async fn tell(stdin: &mut Option<tokio::process::ChildStdin>, what: &str) {
    use tokio::io::AsyncWriteExt;
    if let Some(w) = stdin.as_mut() {
        if let Err(e) = w.write_all(format!("{what}\n").as_bytes()).await {
            tracing::warn!(error = %e, command = what, "cannot tell the worker");
        }
    }
}
