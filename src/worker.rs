//! The worker: one crawl of a session, from connecting to the slave to
//! recording what is now durable there.

use crate::crawl::plan::CrawlKind;
use crate::crawl::{CrawlError, Engine, Failure};
use crate::error::Retry;
use crate::links::Links;
use crate::master::Master;
use crate::protocol::{ProtoError, SlaveIdentity};
use crate::session::{MarkerPolicy, Session, SlaveSpec, State};
use crate::slave::Slave;
use crate::transport::{self, Connection, TransportError};
use crate::xtime;
use georep_monitor::PidFile;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("session {session:?} is already being synced by pid {pid}: wait for it, or stop it")]
    Busy { session: String, pid: u32 },
    #[error("{0}")]
    Config(#[from] crate::error::UserError),
    #[error("master {path}: {source}: check that the master is mounted and readable")]
    Master {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("connecting to slave {slave}: {source}")]
    Connect {
        slave: String,
        source: TransportError,
    },
    #[error("slave {slave}: {source}")]
    Slave { slave: String, source: ProtoError },
    #[error("session state in {path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("interrupted")]
    Shutdown,
}

impl WorkerError {
    /// What the monitor (and the exit code) should make of it.
    pub fn retry(&self) -> Retry {
        match self {
            WorkerError::Busy { .. } | WorkerError::Shutdown => Retry::Temporary,
            WorkerError::Config(_) => Retry::Permanent,
            WorkerError::Master { .. } => Retry::Temporary,
            WorkerError::Connect { source, .. } => source.retry(),
            WorkerError::Slave { source, .. } => source.retry(),
            WorkerError::State { .. } => Retry::Temporary,
        }
    }
}

/// What one sync did; printed by `georep sync --json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub session: String,
    /// "full" or "xtime".
    pub crawl: &'static str,
    /// Why a full crawl was needed.
    pub full_reason: Option<String>,
    /// Whether everything reached the slave (no failures, not interrupted).
    pub complete: bool,
    pub entries_visited: u64,
    pub files_synced: u64,
    pub files_unchanged: u64,
    /// File payload written to the transport: literal data plus delta instructions.
    pub bytes_sent: u64,
    pub bytes_literal: u64,
    pub bytes_delta: u64,
    /// Every byte written to / read from the transport, protocol overhead included.
    pub wire_bytes_out: u64,
    pub wire_bytes_in: u64,
    pub deletes: u64,
    pub dirs_created: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub meta_updates: u64,
    pub stimes_written: u64,
    pub skipped: u64,
    pub failures: u64,
    pub errors: Vec<Failure>,
    pub duration_ms: u64,
    /// Catalog mode (layout = store): generations, points, locks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub catalog: Option<crate::catalog::replicate::CatalogSummary>,
}

/// Options of one sync.
#[derive(Debug, Clone, Default)]
pub struct SyncOptions {
    /// Force a full crawl.
    pub full: bool,
    /// A marker (georep's watcher) ran without a gap since this process's
    /// previous crawl, so xtimes can be trusted under the `auto` policy.
    pub marker_continuous: bool,
}

/// Opens a connection to the session's slave.
pub async fn connect(session: &Session) -> Result<Connection, WorkerError> {
    let keepalive = Duration::from_secs(session.config.keepalive_secs.max(3));
    match session.slave_spec()? {
        SlaveSpec::Local(root) => {
            let exe = std::env::current_exe().map_err(|e| WorkerError::Master {
                path: "/proc/self/exe".into(),
                source: e,
            })?;
            transport::local_child(&exe, &root, keepalive)
                .await
                .map_err(|source| WorkerError::Connect {
                    slave: session.config.slave.clone(),
                    source,
                })
        }
        SlaveSpec::Ssh { .. } => Err(crate::user_err!(
            "slave {}: SSH slaves are not supported by this build",
            session.config.slave
        )
        .into()),
    }
}

/// Decides whether xtimes can be trusted; `Some(reason)` when a full crawl is needed.
fn full_reason(
    session: &Session,
    state: &State,
    ident: &Option<SlaveIdentity>,
    master_id: &uuid::Uuid,
    opts: &SyncOptions,
) -> Option<String> {
    if opts.full {
        return Some("requested".into());
    }
    let Some(epoch) = state.epoch else {
        return Some("first sync".into());
    };
    if state.full_pending {
        return Some("the previous full crawl did not complete".into());
    }
    if state.master_id.as_ref() != Some(master_id) {
        return Some("the master root is new or was replaced".into());
    }
    match ident {
        None => return Some("the slave carries no georep identity (new or wiped)".into()),
        Some(i) if i.session != session.config.session_id => {
            return Some(format!(
                "the slave belongs to another session ({})",
                i.session
            ));
        }
        Some(i) if i.epoch != epoch => return Some("the slave was replaced or restored".into()),
        _ => {}
    }
    if session.config.marker == MarkerPolicy::Auto && !opts.marker_continuous {
        return Some("no marker watched the master since the last crawl (marker = auto)".into());
    }
    None
}

/// Runs one crawl of `session` to its end.
pub async fn sync_once(
    session: &Session,
    opts: &SyncOptions,
    shutdown: CancellationToken,
) -> Result<Summary, WorkerError> {
    let started = Instant::now();
    let _lock = match PidFile::acquire(&session.worker_pid_path()) {
        Ok(Ok(lock)) => lock,
        Ok(Err(holder)) => {
            return Err(WorkerError::Busy {
                session: session.name.clone(),
                pid: holder.map(|h| h.pid).unwrap_or(0),
            })
        }
        Err(source) => {
            return Err(WorkerError::State {
                path: session.worker_pid_path(),
                source,
            })
        }
    };
    let root = session.config.master.clone();
    let master_err = |source| WorkerError::Master {
        path: root.clone(),
        source,
    };
    let md = std::fs::metadata(&root).map_err(master_err)?;
    if !md.is_dir() {
        return Err(master_err(std::io::Error::other("not a directory")));
    }
    let master_id = xtime::ensure_master_id(&root).map_err(master_err)?;
    let mut state = session.state();
    let conn = connect(session).await?;
    let slave = Slave::new(conn.client.clone());
    if session.config.layout == crate::session::Layout::Store {
        // Catalog mode: points and generations instead of the tree crawl.
        let summary =
            crate::catalog::replicate::sync_store(session, &slave, &master_id, shutdown).await;
        drop(slave);
        conn.close(Duration::from_secs(30)).await;
        let summary = Summary {
            duration_ms: started.elapsed().as_millis() as u64,
            ..summary?
        };
        let _ = georep_monitor::write_atomic(
            &session.dir.join("last-sync.json"),
            &serde_json::to_vec_pretty(&summary).unwrap_or_default(),
        );
        return Ok(summary);
    }
    let slave_err = |source| WorkerError::Slave {
        slave: session.config.slave.clone(),
        source,
    };
    let ident = slave.identity().await.map_err(slave_err)?;
    let reason = full_reason(session, &state, &ident, &master_id, opts);
    let kind = if reason.is_some() {
        CrawlKind::Full
    } else {
        CrawlKind::Xtime
    };
    let save_state = |s: &State| {
        session.save_state(s).map_err(|source| WorkerError::State {
            path: session.dir.join("state.json"),
            source,
        })
    };
    if let Some(r) = &reason {
        tracing::info!(session = %session.name, reason = %r, "full crawl");
        if ident
            .as_ref()
            .is_some_and(|i| i.session != session.config.session_id)
        {
            tracing::warn!(session = %session.name, "the slave root belongs to another session: it will be made equal to this master");
        }
        state.epoch = Some(uuid::Uuid::new_v4());
        state.full_pending = true;
        state.master_id = Some(master_id);
        save_state(&state)?;
        // A baseline stamp, so that the root's stime records this crawl.
        if xtime::read(&root, &xtime::xtime_attr(&master_id)).map_err(master_err)? == 0 {
            xtime::mark(&root).map_err(master_err)?;
        }
    }
    let root_xtime = xtime::read(&root, &xtime::xtime_attr(&master_id)).map_err(master_err)?;
    let master = Master::new(root.clone(), &master_id, &session.config.session_id);
    let links = Links::load(session.dir.join("links.json"));
    let engine = Engine::new(master, slave.clone(), kind, links, shutdown.clone());
    let outcome = engine.run().await;
    if let Err(e) = engine.links().save() {
        tracing::warn!(error = %e, "could not save the hard-link map");
    }
    let outcome = match outcome {
        Ok(o) => o,
        Err(CrawlError::Shutdown) => return Err(WorkerError::Shutdown),
        Err(CrawlError::Slave(e)) => {
            drop(slave);
            drop(engine);
            let stderr = conn.stderr.text();
            let e = if stderr.trim().is_empty() {
                e
            } else {
                ProtoError::Lost(format!(
                    "{e} (the agent said: {})",
                    stderr.trim().replace('\n', " | ")
                ))
            };
            return Err(slave_err(e));
        }
    };
    let complete = outcome.complete && outcome.failure_count == 0;
    if complete {
        if kind == CrawlKind::Full {
            let epoch = state.epoch.expect("set above");
            slave
                .set_identity(SlaveIdentity {
                    session: session.config.session_id,
                    epoch,
                })
                .await
                .map_err(slave_err)?;
            state.full_pending = false;
        }
        state.last_complete_ns = Some(xtime::now_ns());
        state.last_synced_xtime = Some(root_xtime);
        save_state(&state)?;
    }
    let s = &engine.stats;
    let wire = slave.client().stats();
    let summary = Summary {
        session: session.name.clone(),
        crawl: if kind == CrawlKind::Full {
            "full"
        } else {
            "xtime"
        },
        full_reason: reason,
        complete,
        entries_visited: s.entries_visited.load(Ordering::Relaxed),
        files_synced: s.files_synced.load(Ordering::Relaxed),
        files_unchanged: s.files_unchanged.load(Ordering::Relaxed),
        bytes_sent: s.bytes_literal.load(Ordering::Relaxed) + s.bytes_delta.load(Ordering::Relaxed),
        bytes_literal: s.bytes_literal.load(Ordering::Relaxed),
        bytes_delta: s.bytes_delta.load(Ordering::Relaxed),
        wire_bytes_out: wire.bytes_out.load(Ordering::Relaxed),
        wire_bytes_in: wire.bytes_in.load(Ordering::Relaxed),
        deletes: s.deletes.load(Ordering::Relaxed),
        dirs_created: s.dirs_created.load(Ordering::Relaxed),
        symlinks: s.symlinks.load(Ordering::Relaxed),
        hardlinks: s.hardlinks.load(Ordering::Relaxed),
        meta_updates: s.meta_updates.load(Ordering::Relaxed),
        stimes_written: s.stimes_written.load(Ordering::Relaxed),
        skipped: s.skipped.load(Ordering::Relaxed),
        failures: outcome.failure_count,
        errors: outcome.failures,
        duration_ms: 0,
        catalog: None,
    };
    drop(engine);
    drop(slave);
    conn.close(Duration::from_secs(30)).await;
    let summary = Summary {
        duration_ms: started.elapsed().as_millis() as u64,
        ..summary
    };
    let _ = georep_monitor::write_atomic(
        &session.dir.join("last-sync.json"),
        &serde_json::to_vec_pretty(&summary).unwrap_or_default(),
    );
    Ok(summary)
}
