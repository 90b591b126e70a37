//! The worker: one crawl of a session, from connecting to the slave to
//! recording what is now durable there.

use crate::engine::context::{CrawlKind, Engine};
use crate::engine::continuity::full_reason;
use crate::engine::crawl::CrawlError;
use crate::engine::link::{streams_for, LinkConfig, LinkStart, LinkState};
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
    connect_with(
        session,
        Duration::from_secs(session.config.keepalive_secs.max(3)),
    )
    .await
}

/// Opens a connection to the session's slave with keep-alive `keepalive`.
pub async fn connect_with(
    session: &Session,
    keepalive: Duration,
) -> Result<Connection, WorkerError> {
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
    /// The link settings `conn` was made with.
    conn_cfg: Option<LinkConfig>,
    /// The engine of the crawl in progress, for live progress reports.
    pub live: Arc<Mutex<Option<Arc<Engine>>>>,
    /// `georep pause`: crawls wait while it says true.
    pub pause: Option<tokio::sync::watch::Receiver<bool>>,
    /// The link's live settings, limit and counters.
    pub link: Arc<LinkState>,
    /// Re-reads the config file for the live settings.
    watch: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Worker<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.watch.take() {
            w.abort();
        }
    }
}

/// How often a worker re-reads its config for the live settings.
const CONFIG_POLL: Duration = Duration::from_secs(2);

/// Re-reads `session`'s config file every [`CONFIG_POLL`] and applies
/// its live settings (an unreadable or invalid file changes nothing).
fn watch_config(session: &Session, link: Arc<LinkState>) -> Option<tokio::task::JoinHandle<()>> {
    let handle = tokio::runtime::Handle::try_current().ok()?;
    let path = session.config_path();
    Some(handle.spawn(async move {
        let mut seen: Option<Vec<u8>> = None;
        loop {
            tokio::time::sleep(CONFIG_POLL).await;
            let Ok(text) = tokio::fs::read(&path).await else {
                continue;
            };
            // Re-evaluated each time even when unchanged: a schedule moves with the clock.
            let parsed = String::from_utf8(text.clone())
                .ok()
                .and_then(|t| crate::session::parse_config(&path, &t).ok());
            if let Some(c) = parsed {
                if seen.as_ref() != Some(&text) {
                    tracing::debug!("config re-read");
                }
                link.apply(&c);
                seen = Some(text);
            }
        }
    }))
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
        let link = LinkState::new(&session.config);
        let watch = watch_config(session, link.clone());
        Ok(Worker {
            session,
            _lock: lock,
            root,
            master_id,
            conn: None,
            conn_cfg: None,
            live: Arc::default(),
            pause: None,
            link,
            watch,
        })
    }

    pub fn master_id(&self) -> uuid::Uuid {
        self.master_id
    }

    /// The connection's client while it is up, for the scrub, which
    /// shares the connection (the agent verifies on a thread of its own).
    pub fn client(&self) -> Option<crate::protocol::Client> {
        self.conn
            .as_ref()
            .filter(|c| c.client.closed().is_none())
            .map(|c| c.client.clone())
    }

    /// Closes the connection, waiting for the agent to publish and exit.
    pub async fn close(mut self) {
        if let Some(conn) = self.conn.take() {
            conn.close(Duration::from_secs(30)).await;
            tracing::debug!("connection closed");
        }
    }

    /// Resolves when the kept connection is lost (never while there is
    /// none), so that an idle worker notices a dead agent at once.
    pub fn connection_lost(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let lost = self.conn.as_ref().map(|c| c.lost());
        async move {
            match lost {
                Some(l) => {
                    l.await;
                }
                None => std::future::pending().await,
            }
        }
    }

    /// If the kept connection was lost: drops it and returns the error
    /// that says why (see [`Worker::lost`]).
    pub async fn take_lost(&mut self) -> Option<WorkerError> {
        let e = self.conn.as_ref()?.closed_error()?;
        let source = self.lost(e).await;
        Some(WorkerError::Slave {
            slave: self.session.config.slave.clone(),
            source,
        })
    }

    /// Drops the kept connection after `e` ended it, and completes `e`
    /// with what is known of why: the agent's last stderr lines and how
    /// it ended (killed by a signal, exited, the link gone).
    async fn lost(&mut self, e: ProtoError) -> ProtoError {
        let Some(conn) = self.conn.take() else {
            return e;
        };
        let said = conn.stderr.text();
        let how = conn.ended(Duration::from_secs(3)).await;
        let mut extra: Vec<String> = how.into_iter().collect();
        if !said.trim().is_empty() {
            extra.push(format!(
                "the agent said: {}",
                said.trim().replace('\n', " | ")
            ));
        }
        if extra.is_empty() {
            return e;
        }
        let extra = extra.join("; ");
        match e {
            ProtoError::Lost(m) => ProtoError::Lost(format!("{m}: {extra}")),
            ProtoError::Violation(m) => ProtoError::Violation(format!("{m}: {extra}")),
            // A keep-alive timeout says what happened: the link stalled.
            other => other,
        }
    }

    /// Drops the connection after `e` (recording a complete pass failed);
    /// a slave error is completed with what is known of why the link ended.
    async fn lost_worker(&mut self, e: WorkerError) -> WorkerError {
        match e {
            WorkerError::Slave { slave, source } => WorkerError::Slave {
                slave,
                source: self.lost(source).await,
            },
            other => {
                self.conn = None;
                other
            }
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
        if self.conn.as_ref().is_some_and(|c| c.broken()) {
            self.conn = None;
        }
        let cfg = self.link.config.lock().unwrap().clone();
        if self.conn.is_some() && self.conn_cfg.as_ref() != Some(&cfg) {
            // The link's settings changed: a new connection, same watcher.
            tracing::info!(session = %session.name, "link settings changed: reconnecting");
            if let Some(c) = self.conn.take() {
                c.close(Duration::from_secs(30)).await;
            }
        }
        if self.conn.is_none() {
            let mut conn = connect_with(session, cfg.keepalive).await?;
            // Fencing: the agent refuses a session of an older epoch, or a live slave.
            crate::engine::lineage::claim(session, &Slave::new(conn.client.clone()), &mut state)
                .await?;
            let rtt = conn.measure_rtt().await;
            self.link.set_rtt(rtt);
            // Auto: a local slave has no window to fill.
            let want = match (cfg.streams, conn.remote()) {
                (None, false) => 1,
                (c, _) => streams_for(c, rtt),
            };
            let got = conn.open_streams(want, cfg.keepalive).await;
            let clients = conn.clients();
            // Every stream at once: one round trip, not one per stream.
            let mut compression = cfg.compression;
            for r in futures::future::join_all(clients.iter().map(|c| c.negotiate(cfg.compression)))
                .await
            {
                compression = r.map_err(|e| WorkerError::Slave {
                    slave: session.config.slave.clone(),
                    source: e,
                })?;
            }
            self.link.connected(&clients);
            tracing::info!(
                session = %session.name,
                rtt_ms = rtt.as_secs_f64() * 1000.0,
                streams = got,
                compression = %compression.name(),
                "connected"
            );
            self.conn = Some(conn);
            self.conn_cfg = Some(cfg);
        }
        let conn = self.conn.as_ref().expect("connected above");
        let slave = Slave::group(conn.clients());
        let wire_start = slave.wire_totals();
        let link_start = LinkStart::now(&slave, &self.link);
        // Partials of interrupted transfers too old to be worth resuming.
        if let Err(e) = slave
            .clean_partials(session.config.partial_max_age_secs)
            .await
        {
            if e.is_fatal() {
                let e = self.lost(e).await;
                return Err(WorkerError::Slave {
                    slave: session.config.slave.clone(),
                    source: e,
                });
            }
            tracing::warn!(error = %e, "could not clean the slave's stale partial transfers");
        }
        let slave_err = |source| WorkerError::Slave {
            slave: session.config.slave.clone(),
            source,
        };
        let ident = match slave.identity().await {
            Ok(i) => i,
            Err(e) => {
                drop(slave);
                let e = self.lost(e).await;
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
        if session.config.layout == crate::session::Layout::Store {
            let catalog_started = xtime::now_ns();
            // Catalog mode: points and generations instead of the tree
            // crawl, hosts pruned by xtime when continuity is proven.
            let res = crate::engine::catalog_mode::sync_store(
                session, &slave, &master_id, kind, shutdown,
            )
            .await;
            if let Some(e) = slave.closed_error() {
                drop(slave);
                let e = self.lost(e).await;
                return Err(WorkerError::Slave {
                    slave: session.config.slave.clone(),
                    source: e,
                });
            }
            let summary = res?;
            if summary.complete {
                // The root's stime marks this master as the session's (a failback's proof).
                let stamp = root_xtime.max(1);
                Master::new(root.clone(), &master_id, &session.config.session_id)
                    .set_stime(&crate::fs::relpath::RelPath::root(), stamp)
                    .map_err(|e| WorkerError::Master {
                        path: root.clone(),
                        source: e.source,
                    })?;
                if let Err(e) = record_complete(session, &slave, kind, &mut state, stamp).await {
                    drop(slave);
                    return Err(self.lost_worker(e).await);
                }
                // Everything the store held when this sync started is on the slave.
                state.last_synced_xtime = Some(catalog_started.max(root_xtime));
                let _ = session.save_state_volatile(&state);
            }
            let wire = slave.wire_totals();
            return Ok(Summary {
                full_reason: reason,
                wire_bytes_out: wire.0 - wire_start.0,
                wire_bytes_in: wire.1 - wire_start.1,
                link: link_start.summary(
                    &slave,
                    &self.link,
                    (summary.link.files_split, summary.link.bytes_resumed),
                ),
                ..summary
            }
            .with_duration(started.elapsed()));
        }
        let master = Master::new(root.clone(), &master_id, &session.config.session_id);
        let links = Links::load(session.dir.join("links.json"));
        let engine = Engine::new(master, slave.clone(), kind, links, shutdown.clone());
        engine.set_inplace_min_size(session.config.inplace_min_size);
        if let Some(p) = &self.pause {
            engine.set_pause(p.clone());
        }
        engine.set_trust_digests(reason.as_deref() == Some(crate::engine::continuity::MARKER_GAP));
        *self.live.lock().unwrap() = Some(engine.clone());
        let outcome = engine.run().await;
        tracing::debug!("crawl ended");
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
                let e = self.lost(e).await;
                return Err(slave_err(e));
            }
        };
        let complete = outcome.complete && outcome.failure_count == 0;
        if complete {
            if let Err(e) = record_complete(session, &slave, kind, &mut state, root_xtime).await {
                drop(engine);
                drop(slave);
                return Err(self.lost_worker(e).await);
            }
            tracing::debug!("completion recorded");
        }
        let s = &engine.stats;
        let wire = slave.wire_totals();
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
            wire_bytes_out: wire.0 - wire_start.0,
            wire_bytes_in: wire.1 - wire_start.1,
            deletes: s.deletes.load(Ordering::Relaxed),
            dirs_created: s.dirs_created.load(Ordering::Relaxed),
            symlinks: s.symlinks.load(Ordering::Relaxed),
            hardlinks: s.hardlinks.load(Ordering::Relaxed),
            meta_updates: s.meta_updates.load(Ordering::Relaxed),
            stimes_written: s.stimes_written.load(Ordering::Relaxed),
            dirs_unchanged: s.dirs_unchanged.load(Ordering::Relaxed),
            skipped: s.skipped.load(Ordering::Relaxed),
            failures: outcome.failure_count,
            errors: outcome.failures,
            duration_ms: 0,
            catalog: None,
            link: link_start.summary(
                &slave,
                &self.link,
                (
                    s.files_split.load(Ordering::Relaxed),
                    s.bytes_resumed.load(Ordering::Relaxed),
                ),
            ),
            bytes_processed: engine.work.bytes_done.load(Ordering::Relaxed),
            throughput_bytes_per_sec: 0.0,
            failed: engine.failed_entries(),
        };
        Ok(summary.with_duration(started.elapsed()))
    }
}

/// Records a complete pass: after a full one, the slave's identity (the
/// slave now holds this epoch) and the end of the pending full crawl;
/// then the sync times.
async fn record_complete(
    session: &Session,
    slave: &Slave,
    kind: CrawlKind,
    state: &mut State,
    root_xtime: u64,
) -> Result<(), WorkerError> {
    let state_err = |source| WorkerError::State {
        path: session.dir.join("state.json"),
        source,
    };
    if kind == CrawlKind::Full {
        let epoch = state.epoch.expect("set when the full crawl started");
        slave
            .set_identity(SlaveIdentity {
                session: session.config.session_id,
                epoch,
            })
            .await
            .map_err(|source| WorkerError::Slave {
                slave: session.config.slave.clone(),
                source,
            })?;
        state.full_pending = false;
    }
    state.last_complete_ns = Some(xtime::now_ns());
    state.last_synced_xtime = Some(root_xtime);
    // What a promote of the replica reports as recovered.
    slave
        .synced(root_xtime, xtime::now_ns())
        .await
        .map_err(|source| WorkerError::Slave {
            slave: session.config.slave.clone(),
            source,
        })?;
    if kind == CrawlKind::Full {
        session.save_state(state).map_err(state_err)
    } else {
        // Only the sync times changed: not worth a disk flush.
        session.save_state_volatile(state).map_err(state_err)
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
