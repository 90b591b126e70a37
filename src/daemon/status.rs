//! `georep status` and `georep checkpoint`: they read (and for a
//! checkpoint, write) only files, so they answer even when a process is
//! wedged, and they report a dead or reused pid as not running.

use crate::error::{exit, UserError};
use crate::fs::xtime;
use crate::session::{Session, SyncMode};
use crate::user_err;
use georep_monitor::checkpoint::{self, Checkpoint};
use georep_monitor::nagios::{self, Thresholds};
use georep_monitor::status::{effective, Status};
use georep_monitor::time::{format_rfc3339, now_ns, parse_rfc3339};
use georep_monitor::{prometheus, render, PidRecord};

/// Output formats of `georep status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Detail,
    Json,
    Prometheus,
    Nagios,
}

pub fn created(s: &Session) -> Status {
    Status::created(
        &s.name,
        &s.config.master.display().to_string(),
        &s.config.slave,
    )
}

/// A session's status: its status file corrected by its pid files, its
/// state (a one-shot `sync` moves `last_synced`) and its checkpoint.
pub fn collect(s: &Session) -> Status {
    let mut st = Status::read(&s.status_path())
        .ok()
        .flatten()
        .unwrap_or_else(|| created(s));
    st.session = s.name.clone();
    st.master = s.config.master.display().to_string();
    st.slave = s.config.slave.clone();
    let monitor_alive = PidRecord::read_live(&s.monitor_pid_path())
        .ok()
        .flatten()
        .is_some();
    // Only the monitor's own worker counts: a one-shot `sync` holds the same lock.
    let worker_alive = PidRecord::read_live(&s.worker_pid_path())
        .ok()
        .flatten()
        .is_some_and(|r| st.worker_pid == Some(r.pid));
    let state = s.state();
    if let Some(x) = state.last_synced_xtime {
        if st.last_synced_ns().is_none_or(|t| t < x) {
            st.last_synced = Some(format_rfc3339(x));
        }
    }
    let cp = Checkpoint::read(&s.checkpoint_path());
    st.checkpoint_time = cp.map(|c| format_rfc3339(c.time_ns));
    st.checkpoint_completed = false;
    st.checkpoint_completion_time = None;
    if let Some(c) = cp {
        if let Some(t) = c.completed_at_ns {
            st.checkpoint_completed = true;
            st.checkpoint_completion_time = Some(format_rfc3339(t));
        } else if state.last_synced_xtime.is_some_and(|x| c.reached(x)) {
            // Reached by a crawl that did not record it (a one-shot sync).
            st.checkpoint_completed = true;
            st.checkpoint_completion_time = state.last_complete_ns.map(format_rfc3339);
        }
    }
    st.role = Some(
        match crate::fs::role::read(&s.config.master) {
            Ok(Some(r)) => r.role.as_str(),
            Ok(None) => "master",
            Err(_) => "unknown",
        }
        .to_string(),
    );
    st.epoch = Some(s.config.epoch);
    st.slave_role = state.slave_role.clone();
    if s.config.layout == crate::session::Layout::Store && st.hosts.is_empty() {
        // No monitor has reported the points: read them (a local slave) or take the last sync's.
        if let Ok(Some(c)) = crate::catalog::status::session_status(s) {
            st.hosts = c
                .newest
                .iter()
                .map(|h| georep_monitor::status::HostPoint {
                    host: h.host.clone(),
                    newest_complete: h.newest_complete.map(format_rfc3339),
                    age_seconds: None,
                })
                .collect();
        }
    }
    crate::daemon::scrub::fill_status(s, &mut st, now_ns());
    effective(st, monitor_alive, worker_alive, now_ns())
}

/// Default lag thresholds: continuous sessions sync within a minute or
/// so; interval sessions are allowed two (warning) and four (critical) intervals.
pub fn default_thresholds(s: &Session) -> (u64, u64) {
    match s.config.mode {
        SyncMode::Continuous => (300, 1800),
        SyncMode::Interval => (
            s.config.interval_secs.saturating_mul(2).max(300),
            s.config.interval_secs.saturating_mul(4).max(1800),
        ),
    }
}

/// `georep status [SESSION]`; returns the exit code (the Nagios one with `--nagios`).
pub fn status(
    name: Option<&str>,
    format: Format,
    warning: Option<u64>,
    critical: Option<u64>,
    critical_failures: u64,
) -> anyhow::Result<i32> {
    if format == Format::Nagios {
        // A check answers in Nagios's terms even about its own arguments: UNKNOWN, never 2.
        let Some(name) = name else {
            crate::outln!("GEOREP UNKNOWN - --nagios checks one session: give its name");
            return Ok(nagios::UNKNOWN);
        };
        let s = match Session::load(name) {
            Ok(s) => s,
            Err(e) => {
                crate::outln!("GEOREP UNKNOWN - {e}");
                return Ok(nagios::UNKNOWN);
            }
        };
        let (dw, dc) = default_thresholds(&s);
        let t = Thresholds {
            warning: warning.unwrap_or(dw),
            critical: critical.unwrap_or(dc),
            stale: georep_monitor::supervise::STATUS_REFRESH.as_secs() * 8,
            failures_critical: critical_failures,
        };
        if t.warning > t.critical {
            crate::outln!(
                "GEOREP UNKNOWN - --warning {} is above --critical {}",
                t.warning,
                t.critical
            );
            return Ok(nagios::UNKNOWN);
        }
        let (code, line) = nagios::check(&collect(&s), &t, now_ns());
        crate::outln!("{line}");
        return Ok(code);
    }
    let mut rows = Vec::new();
    match name {
        Some(n) => rows.push(collect(&Session::load(n)?)),
        None => {
            for s in Session::all() {
                match s {
                    Ok(s) => rows.push(collect(&s)),
                    Err(e) => eprintln!("georep: {e}"),
                }
            }
        }
    }
    match format {
        Format::Json if name.is_some() => {
            crate::outln!("{}", serde_json::to_string_pretty(&rows[0])?)
        }
        Format::Json => crate::outln!("{}", serde_json::to_string_pretty(&rows)?),
        Format::Prometheus => crate::out!("{}", prometheus::render(&rows)),
        Format::Detail => {
            let texts: Vec<String> = rows.iter().map(render::detail).collect();
            crate::out!("{}", texts.join("\n"));
        }
        Format::Table if rows.is_empty() => {
            crate::outln!("no sessions: create one with `georep create SESSION MASTER SLAVE`")
        }
        Format::Table => crate::out!("{}", render::table(&rows)),
        Format::Nagios => unreachable!(),
    }
    Ok(exit::OK)
}

/// Parses `now`, an RFC 3339 time, or `@SECONDS` since the epoch.
pub fn parse_when(when: &str) -> Result<u64, UserError> {
    if when == "now" {
        return Ok(now_ns());
    }
    if let Some(secs) = when.strip_prefix('@') {
        return secs
            .parse::<u64>()
            .map(|s| s * 1_000_000_000)
            .map_err(|_| user_err!("checkpoint time {when:?}: expected @SECONDS since the epoch"));
    }
    parse_rfc3339(when)
        .map_err(|e| user_err!("checkpoint time: {e}; give `now`, an RFC 3339 time or @SECONDS"))
}

/// `georep checkpoint SESSION now|TIME`.
pub fn set_checkpoint(name: &str, when: &str) -> anyhow::Result<i32> {
    let s = Session::load(name)?;
    let t = parse_when(when)?;
    let now = now_ns();
    let state = s.state();
    let done = state.last_synced_xtime.is_some_and(|x| x >= t);
    checkpoint::update(&s.checkpoint_path(), |_| {
        (
            Some(Checkpoint {
                time_ns: t,
                set_at_ns: now,
                completed_at_ns: done.then_some(now),
            }),
            (),
        )
    })
    .map_err(|e| user_err!("cannot write {}: {e}", s.checkpoint_path().display()))?;
    if t <= now && !done {
        // The next crawl records a root stime past T even if nothing else changes.
        xtime::mark(&s.config.master).map_err(|e| {
            user_err!(
                "cannot stamp the master root {}: {e}",
                s.config.master.display()
            )
        })?;
    }
    crate::outln!(
        "checkpoint of session {name} set to {}{}",
        format_rfc3339(t),
        if done {
            " (already completed)"
        } else {
            "; `georep status NAME --detail` shows when it completes"
        }
    );
    Ok(exit::OK)
}
