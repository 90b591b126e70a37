//! The worker: one crawl of a session, from connecting to the slave to
//! recording what is now durable there.

use crate::engine::context::{CrawlKind, Engine};
use crate::engine::continuity::full_reason;
use crate::engine::crawl::CrawlError;
use crate::engine::links::Links;
use crate::engine::master::Master;
use crate::engine::outcome::{Summary, SyncOptions, WorkerError};
use crate::engine::slave::Slave;
use crate::fs::xtime;
use crate::protocol::{ProtoError, SlaveIdentity};
use crate::session::{Session, SlaveSpec, State};
use crate::transport::{self, Connection};
use georep_monitor::PidFile;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

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
        SlaveSpec::Ssh { .. } => crate::transport::ssh::connect_session(session, keepalive)
            .await
            .map_err(|source| WorkerError::Connect {
                slave: session.config.slave.clone(),
                source: source.into(),
            }),
    }
}

/// Runs one crawl of `session` to its end: opens a [`Worker`], crawls
/// once and closes the connection (waiting for the agent to publish).
pub async fn sync_once(
    session: &Session,
    opts: &SyncOptions,
    shutdown: CancellationToken,
) -> Result<Summary, WorkerError> {
    sync_once_live(session, opts, shutdown, Arc::default()).await
}

/// [`sync_once`], with the crawl's engine put in `live` while it runs (for a progress line).
pub async fn sync_once_live(
    session: &Session,
    opts: &SyncOptions,
    shutdown: CancellationToken,
    live: Arc<Mutex<Option<Arc<Engine>>>>,
) -> Result<Summary, WorkerError> {
    let started = Instant::now();
    let mut worker = Worker::open(session)?;
    worker.live = live;
    let summary = worker.crawl(opts, shutdown).await;
    worker.close().await;
    let summary = summary?.with_duration(started.elapsed());
    let _ = georep_monitor::write_atomic_volatile(
        &session.dir.join("last-sync.json"),
        &serde_json::to_vec_pretty(&summary).unwrap_or_default(),
    );
    Ok(summary)
}

/// A session's worker: holds the session's worker lock for its life and
/// keeps one connection to the slave across crawls (reconnecting when it
/// was lost), so a continuous worker pays the connection set-up once.
pub struct Worker<'a> {
    session: &'a Session,
    _lock: PidFile,
    root: PathBuf,
    master_id: uuid::Uuid,
    conn: Option<Connection>,
    /// The engine of the crawl in progress, for live progress reports.
    pub live: Arc<Mutex<Option<Arc<Engine>>>>,
    /// `georep pause`: crawls wait while it says true.
    pub pause: Option<tokio::sync::watch::Receiver<bool>>,
}

impl<'a> Worker<'a> {
    /// Takes the session's worker lock and checks the master.
    pub fn open(session: &'a Session) -> Result<Worker<'a>, WorkerError> {
        let lock = match PidFile::acquire(&session.worker_pid_path()) {
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
        crate::engine::lineage::check_master(session)?;
        let master_id = xtime::ensure_master_id(&root).map_err(master_err)?;
        Ok(Worker {
            session,
            _lock: lock,
            root,
            master_id,
            conn: None,
            live: Arc::default(),
            pause: None,
        })
    }

    pub fn master_id(&self) -> uuid::Uuid {
        self.master_id
    }

    /// Closes the connection, waiting for the agent to publish and exit.
    pub async fn close(mut self) {
        if let Some(conn) = self.conn.take() {
            conn.close(Duration::from_secs(30)).await;
        }
    }

    /// Runs one crawl to its end over the kept connection.
    pub async fn crawl(
        &mut self,
        opts: &SyncOptions,
        shutdown: CancellationToken,
    ) -> Result<Summary, WorkerError> {
        let started = Instant::now();
        let session = self.session;
        let root = self.root.clone();
        let master_id = self.master_id;
        let master_err = |source| WorkerError::Master {
            path: root.clone(),
            source,
        };
        let mut state = session.state();
        if self
            .conn
            .as_ref()
            .is_some_and(|c| c.client.closed().is_some())
        {
            self.conn = None;
        }
        if self.conn.is_none() {
            let conn = connect(session).await?;
            // Fencing: the agent refuses a session of an older epoch, or a live slave.
            crate::engine::lineage::claim(session, &Slave::new(conn.client.clone()), &mut state)
                .await?;
            self.conn = Some(conn);
        }
        let conn = self.conn.as_ref().expect("connected above");
        let agent_stderr = conn.stderr.clone();
        let slave = Slave::new(conn.client.clone());
        let wire_start = {
            let w = slave.client().stats();
            (
                w.bytes_out.load(Ordering::Relaxed),
                w.bytes_in.load(Ordering::Relaxed),
            )
        };
        if session.config.layout == crate::session::Layout::Store {
            let catalog_started = xtime::now_ns();
            // Catalog mode: points and generations instead of the tree crawl.
            let root_xtime =
                xtime::read(&root, &xtime::xtime_attr(&master_id)).map_err(master_err)?;
            let res =
                crate::engine::catalog_mode::sync_store(session, &slave, &master_id, shutdown)
                    .await;
            if slave.client().closed().is_some() {
                self.conn = None;
            }
            if res.as_ref().is_ok_and(|s| s.complete) {
                // The root's stime marks this master as the session's (a failback's proof).
                let stamp = root_xtime.max(1);
                Master::new(root.clone(), &master_id, &session.config.session_id)
                    .set_stime(&crate::fs::relpath::RelPath::root(), stamp)
                    .map_err(|e| WorkerError::Master {
                        path: root.clone(),
                        source: e.source,
                    })?;
                let _ = slave.synced(stamp, xtime::now_ns()).await;
            }
            let res = res.map(|summary| summary.with_duration(started.elapsed()));
            if let Ok(s) = &res {
                if s.complete {
                    // Everything the store held when this sync started is on the slave.
                    state.last_complete_ns = Some(xtime::now_ns());
                    state.last_synced_xtime = Some(catalog_started);
                    let _ = session.save_state_volatile(&state);
                }
            }
            return res;
        }
        let slave_err = |source| WorkerError::Slave {
            slave: session.config.slave.clone(),
            source,
        };
        let ident = match slave.identity().await {
            Ok(i) => i,
            Err(e) => {
                self.conn = None;
                return Err(slave_err(e));
            }
        };
        if let Err(e) = crate::engine::lineage::quarantine(session, &slave, &mut state).await {
            if slave.client().closed().is_some() {
                self.conn = None;
            }
            return Err(e);
        }
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
        engine.set_inplace_min_size(session.config.inplace_min_size);
        if let Some(p) = &self.pause {
            engine.set_pause(p.clone());
        }
        *self.live.lock().unwrap() = Some(engine.clone());
        let outcome = engine.run().await;
        *self.live.lock().unwrap() = None;
        if let Err(e) = engine.links().save() {
            tracing::warn!(error = %e, "could not save the hard-link map");
        }
        let outcome = match outcome {
            Ok(o) => o,
            Err(CrawlError::Shutdown) => return Err(WorkerError::Shutdown),
            Err(CrawlError::SlaveFull(detail)) => {
                return Err(WorkerError::SlaveFull {
                    slave: session.config.slave.clone(),
                    detail,
                })
            }
            Err(CrawlError::Slave(e)) => {
                drop(slave);
                drop(engine);
                self.conn = None;
                let stderr = agent_stderr.text();
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
                    .map_err(|e| {
                        self.conn = None;
                        slave_err(e)
                    })?;
                state.full_pending = false;
            }
            state.last_complete_ns = Some(xtime::now_ns());
            state.last_synced_xtime = Some(root_xtime);
            // What a promote of the replica reports as recovered.
            slave
                .synced(root_xtime, xtime::now_ns())
                .await
                .map_err(|e| {
                    self.conn = None;
                    slave_err(e)
                })?;
            if kind == CrawlKind::Full {
                save_state(&state)?;
            } else {
                // Only the sync times changed: not worth a disk flush.
                session
                    .save_state_volatile(&state)
                    .map_err(|source| WorkerError::State {
                        path: session.dir.join("state.json"),
                        source,
                    })?;
            }
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
            files_in_place: s.files_in_place.load(Ordering::Relaxed),
            bytes_sent: s.bytes_literal.load(Ordering::Relaxed)
                + s.bytes_delta.load(Ordering::Relaxed),
            bytes_literal: s.bytes_literal.load(Ordering::Relaxed),
            bytes_delta: s.bytes_delta.load(Ordering::Relaxed),
            wire_bytes_out: wire.bytes_out.load(Ordering::Relaxed) - wire_start.0,
            wire_bytes_in: wire.bytes_in.load(Ordering::Relaxed) - wire_start.1,
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
            bytes_processed: engine.work.bytes_done.load(Ordering::Relaxed),
            throughput_bytes_per_sec: 0.0,
            failed: engine.failed_entries(),
        };
        Ok(summary.with_duration(started.elapsed()))
    }
}

/// The runtime a worker runs on. Blocking master reads are few at a time by
/// design (budgets in the crawl), so a small blocking pool bounds thread
/// stacks and allocator arenas, which are most of a worker's memory.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(8)
        .enable_all()
        .build()
}
