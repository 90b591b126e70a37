//! Event hooks (`on_event`): the monitor turns changes of a session's
//! status into events — the worker turned Faulty, it recovered, a
//! checkpoint completed, the lag went above `rpo_warning_secs`, entries
//! started failing in every crawl — and runs the operator's command once
//! per event, with the event as JSON on stdin and in environment
//! variables, under a timeout; a hook that fails or hangs is logged and
//! never blocks supervision (as GlusterFS's events API and PBS's
//! notifications do).
//!
//! Detection ([`Detector`]) is pure and tested with plain data; running a
//! hook ([`Hooks`]) is a queue served by one task, so hooks run one at a
//! time, in order.

use crate::status::{Status, WorkerStatus};
use crate::time::format_rfc3339;
use serde::Serialize;
use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// What the operator configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventSettings {
    /// A shell command (`sh -c`); None: no hook.
    pub command: Option<String>,
    /// A hook still running after this long is killed.
    pub timeout: Duration,
    /// Lag above which the `rpo_warning` event fires; None: never.
    pub rpo_warning_secs: Option<u64>,
}

/// Event names, as the hook sees them in `event` and `GEOREP_EVENT`.
pub const FAULTY: &str = "faulty";
pub const RECOVERED: &str = "recovered";
pub const CHECKPOINT_COMPLETED: &str = "checkpoint_completed";
pub const RPO_WARNING: &str = "rpo_warning";
pub const PERSISTENT_FAILURES: &str = "persistent_failures";

/// One event, as written to the hook's stdin.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub event: &'static str,
    pub session: String,
    /// When it was detected (RFC 3339 UTC).
    pub time: String,
    /// One line for people.
    pub message: String,
    pub master: String,
    pub slave: String,
    pub last_error: Option<String>,
    pub lag_seconds: Option<u64>,
    pub checkpoint_time: Option<String>,
    /// For `persistent_failures`: the entries that became persistent.
    pub paths: Vec<String>,
}

/// Remembers what was already announced, so each event fires once.
#[derive(Debug, Default)]
pub struct Detector {
    started: bool,
    in_fault: bool,
    checkpoint_announced: Option<String>,
    rpo_high: bool,
    persistent: BTreeSet<String>,
}

impl Detector {
    /// The events that `st` (as the monitor is about to write it) raises.
    pub fn observe(&mut self, st: &Status, rpo_warning_secs: Option<u64>, now: u64) -> Vec<Event> {
        let mut out = Vec::new();
        let lag = st
            .last_synced_ns()
            .map(|t| now.saturating_sub(t) / 1_000_000_000);
        let event = |name: &'static str, message: String, paths: Vec<String>| Event {
            event: name,
            session: st.session.clone(),
            time: format_rfc3339(now),
            message,
            master: st.master.clone(),
            slave: st.slave.clone(),
            last_error: st.last_error.clone(),
            lag_seconds: lag,
            checkpoint_time: st.checkpoint_time.clone(),
            paths,
        };
        // A checkpoint already complete when the monitor starts was announced before.
        if !self.started {
            self.started = true;
            if st.checkpoint_completed {
                self.checkpoint_announced = st.checkpoint_time.clone();
            }
        }
        match st.worker_status {
            WorkerStatus::Faulty if !self.in_fault => {
                self.in_fault = true;
                let why = st.last_error.as_deref().unwrap_or("no error recorded");
                out.push(event(FAULTY, format!("worker Faulty: {why}"), vec![]));
            }
            WorkerStatus::Active if self.in_fault => {
                self.in_fault = false;
                out.push(event(RECOVERED, "worker Active again".into(), vec![]));
            }
            _ => {}
        }
        if st.checkpoint_completed && st.checkpoint_time != self.checkpoint_announced {
            self.checkpoint_announced = st.checkpoint_time.clone();
            let t = st.checkpoint_time.clone().unwrap_or_default();
            out.push(event(
                CHECKPOINT_COMPLETED,
                format!("checkpoint {t} completed"),
                vec![],
            ));
        }
        match (rpo_warning_secs, lag) {
            (Some(limit), Some(l)) if l > limit && !self.rpo_high => {
                self.rpo_high = true;
                out.push(event(
                    RPO_WARNING,
                    format!("lag {l} s is above rpo_warning_secs {limit} s"),
                    vec![],
                ));
            }
            (Some(limit), Some(l)) if l <= limit => self.rpo_high = false,
            _ => {}
        }
        let now_persistent: BTreeSet<String> = st
            .persistent_failure_entries
            .iter()
            .map(|e| e.path.clone())
            .collect();
        let new: Vec<String> = now_persistent
            .difference(&self.persistent)
            .cloned()
            .collect();
        if !new.is_empty() {
            let first = st
                .persistent_failure_entries
                .iter()
                .find(|e| e.path == new[0]);
            out.push(event(
                PERSISTENT_FAILURES,
                format!(
                    "{} entries failing in every crawl, newly: {}{}",
                    st.persistent_failures,
                    new.join(", "),
                    first
                        .map(|e| format!(" ({}, {} crawls in a row)", e.error, e.crawls))
                        .unwrap_or_default()
                ),
                new,
            ));
        }
        self.persistent = now_persistent;
        out
    }
}

/// Runs hooks one at a time from a bounded queue; a full queue drops the
/// event with a log line rather than slowing the monitor.
pub struct Hooks {
    tx: tokio::sync::mpsc::Sender<(EventSettings, Event)>,
}

impl Hooks {
    /// Starts the task that runs hooks (on the current tokio runtime).
    pub fn start() -> Hooks {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(EventSettings, Event)>(64);
        tokio::spawn(async move {
            while let Some((settings, event)) = rx.recv().await {
                if let Some(cmd) = &settings.command {
                    run_hook(cmd, settings.timeout, &event).await;
                }
            }
        });
        Hooks { tx }
    }

    pub fn send(&self, settings: &EventSettings, event: Event) {
        tracing::info!(event = event.event, session = %event.session, message = %event.message, "event");
        if settings.command.is_none() {
            return;
        }
        if let Err(e) = self.tx.try_send((settings.clone(), event)) {
            tracing::warn!(error = %e, "event hook queue full: event dropped");
        }
    }
}

/// Runs one hook: `sh -c COMMAND`, the event as JSON on stdin and as
/// `GEOREP_EVENT`, `GEOREP_SESSION`, `GEOREP_EVENT_TIME`,
/// `GEOREP_EVENT_MESSAGE`, `GEOREP_EVENT_JSON`. Its process group is
/// killed after `timeout`; failures are logged with its stderr.
pub async fn run_hook(cmd: &str, timeout: Duration, event: &Event) {
    let json = serde_json::to_string(event).expect("an event serializes");
    let mut c = tokio::process::Command::new("/bin/sh");
    c.arg("-c")
        .arg(cmd)
        .env("GEOREP_EVENT", event.event)
        .env("GEOREP_SESSION", &event.session)
        .env("GEOREP_EVENT_TIME", &event.time)
        .env("GEOREP_EVENT_MESSAGE", &event.message)
        .env("GEOREP_EVENT_JSON", &json)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match c.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(event = event.event, command = %cmd, error = %e, "event hook could not start");
            return;
        }
    };
    let pid = child.id();
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is fine: ignore EPIPE.
        let _ = stdin.write_all(json.as_bytes()).await;
        let _ = stdin.write_all(b"\n").await;
    }
    let mut stderr = child.stderr.take();
    let read_err = async {
        let mut buf = Vec::new();
        if let Some(e) = stderr.as_mut() {
            use tokio::io::AsyncReadExt;
            let _ = e.take(4096).read_to_end(&mut buf).await;
        }
        buf
    };
    match tokio::time::timeout(timeout, async { tokio::join!(child.wait(), read_err) }).await {
        Ok((Ok(status), _)) if status.success() => {
            tracing::debug!(event = event.event, "event hook done");
        }
        Ok((status, err)) => {
            let err = String::from_utf8_lossy(&err).trim().replace('\n', " | ");
            let how = match status {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            };
            tracing::warn!(event = event.event, command = %cmd, status = %how, stderr = %err, "event hook failed");
        }
        Err(_) => {
            if let Some(pid) = pid {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.wait().await;
            tracing::warn!(event = event.event, command = %cmd, timeout_secs = timeout.as_secs(), "event hook timed out: killed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{FailingEntry, MonitorStatus};

    const NOW: u64 = 1_750_000_000_000_000_000;

    fn st(ws: WorkerStatus) -> Status {
        Status {
            monitor_status: MonitorStatus::Started,
            worker_status: ws,
            last_synced: Some(format_rfc3339(NOW - 10_000_000_000)),
            ..Status::created("s1", "/m", "/s")
        }
    }

    fn names(v: &[Event]) -> Vec<&'static str> {
        v.iter().map(|e| e.event).collect()
    }

    #[test]
    fn each_event_fires_once_per_episode() {
        let mut d = Detector::default();
        assert!(d
            .observe(&st(WorkerStatus::Initializing), None, NOW)
            .is_empty());
        let faulty = Status {
            last_error: Some("slave gone".into()),
            ..st(WorkerStatus::Faulty)
        };
        let e = d.observe(&faulty, None, NOW);
        assert_eq!(names(&e), [FAULTY]);
        assert!(e[0].message.contains("slave gone"));
        // Restarts in the same fault episode: no second event.
        assert!(d
            .observe(&st(WorkerStatus::Initializing), None, NOW)
            .is_empty());
        assert!(d.observe(&faulty, None, NOW).is_empty());
        assert_eq!(
            names(&d.observe(&st(WorkerStatus::Active), None, NOW)),
            [RECOVERED]
        );
        assert!(d.observe(&st(WorkerStatus::Active), None, NOW).is_empty());
        assert_eq!(names(&d.observe(&faulty, None, NOW)), [FAULTY]);
    }

    #[test]
    fn checkpoints_rpo_and_persistent_failures() {
        let mut d = Detector::default();
        // Completed before this monitor started: not announced again.
        let done = Status {
            checkpoint_time: Some(format_rfc3339(NOW - 1)),
            checkpoint_completed: true,
            ..st(WorkerStatus::Active)
        };
        assert!(d.observe(&done, None, NOW).is_empty());
        let next = Status {
            checkpoint_time: Some(format_rfc3339(NOW)),
            checkpoint_completed: false,
            ..done.clone()
        };
        assert!(d.observe(&next, None, NOW).is_empty());
        let next_done = Status {
            checkpoint_completed: true,
            ..next.clone()
        };
        assert_eq!(
            names(&d.observe(&next_done, None, NOW)),
            [CHECKPOINT_COMPLETED]
        );
        assert!(d.observe(&next_done, None, NOW).is_empty());
        // Lag 10 s: above 5, once; below again re-arms it.
        assert_eq!(names(&d.observe(&next_done, Some(5), NOW)), [RPO_WARNING]);
        assert!(d.observe(&next_done, Some(5), NOW).is_empty());
        assert!(d.observe(&next_done, Some(60), NOW).is_empty());
        assert_eq!(names(&d.observe(&next_done, Some(5), NOW)), [RPO_WARNING]);
        let failing = |paths: &[&str]| Status {
            persistent_failures: paths.len() as u64,
            persistent_failure_entries: paths
                .iter()
                .map(|p| FailingEntry {
                    path: p.to_string(),
                    error: "EPERM".into(),
                    crawls: 3,
                })
                .collect(),
            ..st(WorkerStatus::Active)
        };
        let e = d.observe(&failing(&["a"]), None, NOW);
        assert_eq!(names(&e), [PERSISTENT_FAILURES]);
        assert_eq!(e[0].paths, ["a"]);
        assert!(d.observe(&failing(&["a"]), None, NOW).is_empty());
        let e = d.observe(&failing(&["a", "b"]), None, NOW);
        assert_eq!(e[0].paths, ["b"]);
        assert!(d.observe(&failing(&[]), None, NOW).is_empty());
        assert_eq!(d.observe(&failing(&["a"]), None, NOW)[0].paths, ["a"]);
    }
}
