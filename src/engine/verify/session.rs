//! `georep verify SESSION`: verification of a session's replica in the
//! foreground, its report, resumption after an interruption (progress in
//! `verify.json`), and `--repair` followed by a verification of what was
//! repaired.

use super::cache::WindowCache;
use super::progress::Progress;
use super::repair::{self, Repaired};
use super::{scopes, Counts, End, Options, Verifier, VerifyError};
use crate::engine::context::{CrawlKind, Engine, Failure};
use crate::engine::links::Links;
use crate::engine::master::Master;
use crate::engine::outcome::WorkerError;
use crate::engine::slave::Slave;
use crate::engine::worker::{connect, Worker};
use crate::fs::meta::Kind;
use crate::fs::relpath::RelPath;
use crate::fs::xtime::now_ns;
use crate::protocol::ProtoError;
use crate::session::{Layout, Session};
use crate::user_err;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// What `georep verify` was asked.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// Subtrees: relative to the master root, or absolute paths below it.
    pub paths: Vec<PathBuf>,
    /// Bytes per second each side reads at most (0: unlimited).
    pub rate: u64,
    pub max_duration: Option<Duration>,
    pub repair: bool,
    /// Start over instead of resuming an interrupted verification.
    pub restart: bool,
    /// Read and hash every master file, not taking the hashes of unchanged
    /// ones from the cache (which is refreshed).
    pub no_cache: bool,
}

/// The cache of master window hashes of a session (see `cache`), in its
/// state directory; `use_hits` false reads every master file again.
pub fn window_cache(session: &Session, use_hits: bool) -> Arc<WindowCache> {
    use std::os::unix::ffi::OsStrExt;
    let mut owner = session.config.session_id.as_bytes().to_vec();
    owner.extend_from_slice(session.config.master.as_os_str().as_bytes());
    Arc::new(WindowCache::load(
        &session.dir.join(super::cache::FILE),
        &owner,
        use_hits,
    ))
}

/// One difference, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct Difference {
    pub path: String,
    pub what: &'static str,
    pub kind: &'static str,
    /// Byte ranges `[start, end)` that differ.
    pub ranges: Vec<[u64; 2]>,
    pub fields: Vec<String>,
    /// Entries below a missing or extra directory.
    pub below: u64,
    pub master_size: Option<u64>,
    pub slave_size: Option<u64>,
}

/// What a verification found (`georep verify --json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub session: String,
    /// Every entry of the scope was compared.
    pub complete: bool,
    /// Complete and no mismatch.
    pub equal: bool,
    /// Went on from an interrupted verification.
    pub resumed: bool,
    /// Where an incomplete verification stopped (it resumes there).
    pub stopped_at: Option<String>,
    pub scope: Vec<String>,
    /// Owners are compared only when the agent runs as root.
    pub owners_compared: bool,
    #[serde(flatten)]
    pub counts: Counts,
    pub differences: Vec<Difference>,
    /// Changed on the master while verified: verify later.
    pub changed_paths: Vec<String>,
    /// In directories whose changes are not replicated yet.
    pub pending_paths: Vec<String>,
    pub failed: Vec<Failure>,
    pub wire_bytes_out: u64,
    pub wire_bytes_in: u64,
    pub duration_ms: u64,
    pub repair: Option<RepairReport>,
}

/// What `--repair` did, and the verification of what it repaired.
#[derive(Debug, Clone, Serialize)]
pub struct RepairReport {
    #[serde(flatten)]
    pub done: Repaired,
    pub wire_bytes_out: u64,
    pub wire_bytes_in: u64,
    pub after: Box<Report>,
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::File => "file",
        Kind::Dir => "directory",
        Kind::Symlink => "symlink",
        Kind::Other => "special",
    }
}

/// A path as reported: its bytes (lossy UTF-8), `/` for the root.
fn show(p: &RelPath) -> String {
    if p.is_root() {
        "/".into()
    } else {
        String::from_utf8_lossy(p.as_bytes()).into_owned()
    }
}

/// The master-relative path of `p` (relative, or absolute below the master).
fn relative(session: &Session, p: &std::path::Path) -> Result<RelPath, WorkerError> {
    let root = &session.config.master;
    let rel = if p.is_absolute() {
        RelPath::from_local(root, p).ok_or_else(|| {
            user_err!(
                "--path {}: not below the master {}: give a path relative to the master or below it",
                p.display(),
                root.display()
            )
        })?
    } else {
        use std::os::unix::ffi::OsStrExt;
        let bytes = p.as_os_str().as_bytes();
        let bytes = bytes.strip_suffix(b"/").unwrap_or(bytes);
        RelPath::new(bytes.to_vec()).map_err(|e| {
            user_err!(
                "--path {}: {e}: give a path relative to the master, without . or ..",
                p.display()
            )
        })?
    };
    Ok(rel)
}

/// The connection's byte counters at a moment, to count what came after.
struct Wire(u64, u64);

impl Wire {
    fn start(slave: &Slave) -> Wire {
        let s = slave.client().stats();
        Wire(
            s.bytes_out.load(Ordering::Relaxed),
            s.bytes_in.load(Ordering::Relaxed),
        )
    }

    fn since(&self, slave: &Slave) -> (u64, u64) {
        let s = slave.client().stats();
        (
            s.bytes_out.load(Ordering::Relaxed) - self.0,
            s.bytes_in.load(Ordering::Relaxed) - self.1,
        )
    }
}

/// The differences of findings, as reported.
fn differences(findings: &[super::Finding]) -> Vec<Difference> {
    findings
        .iter()
        .map(|f| Difference {
            path: show(&f.path),
            what: f.what.as_str(),
            kind: kind_name(f.kind),
            ranges: f.ranges.iter().map(|&(a, b)| [a, b]).collect(),
            fields: f.fields.clone(),
            below: f.below,
            master_size: f.master_size,
            slave_size: f.slave_size,
        })
        .collect()
}

/// Builds the report of a verifier's findings.
fn report(session: &Session, v: &Verifier, scope: &[RelPath], complete: bool) -> Report {
    Report {
        session: session.name.clone(),
        complete,
        equal: complete && v.counts.mismatches == 0,
        resumed: false,
        stopped_at: v.cursor.as_ref().map(|c| c.key.to_string()),
        scope: scopes(scope).iter().map(show).collect(),
        owners_compared: v.owners(),
        counts: v.counts.clone(),
        differences: differences(&v.findings),
        changed_paths: v.changed.iter().map(show).collect(),
        pending_paths: v.pending.iter().map(show).collect(),
        failed: v
            .failures
            .iter()
            .map(|(p, e)| Failure {
                path: show(p),
                error: e.clone(),
            })
            .collect(),
        wire_bytes_out: 0,
        wire_bytes_in: 0,
        duration_ms: 0,
        repair: None,
    }
}

fn verify_err(session: &Session, e: VerifyError, at: Option<String>) -> WorkerError {
    let resume = at
        .map(|k| {
            format!(
                "; verified up to {k}: run `georep verify {}` again to resume",
                session.name
            )
        })
        .unwrap_or_default();
    match e {
        VerifyError::Slave(p) => WorkerError::Slave {
            slave: session.config.slave.clone(),
            source: match p {
                ProtoError::Lost(m) => ProtoError::Lost(format!("{m}{resume}")),
                ProtoError::Timeout(_) | ProtoError::Violation(_) | ProtoError::Remote(_) => {
                    ProtoError::Lost(format!("{p}{resume}"))
                }
            },
        },
        VerifyError::Master(m) => WorkerError::Master {
            path: m.path.clone(),
            source: std::io::Error::new(m.source.kind(), format!("{} {}{resume}", m.op, m.source)),
        },
    }
}

/// Verifies `session`'s replica (and repairs it with `req.repair`).
pub async fn verify(
    session: &Session,
    req: &Request,
    shutdown: CancellationToken,
) -> Result<Report, WorkerError> {
    let state = session.state();
    // A store's replica is known by its store.json (checked once connected).
    if session.config.layout == Layout::Tree && state.last_synced_xtime.is_none() {
        return Err(user_err!(
            "session {} has never completed a sync, so its slave holds no replica to verify yet: run `georep sync {}` first",
            session.name,
            session.name
        )
        .into());
    }
    let scope = req
        .paths
        .iter()
        .map(|p| relative(session, p))
        .collect::<Result<Vec<_>, _>>()?;
    if session.config.layout == Layout::Store && !scope.is_empty() {
        return Err(user_err!(
            "--path: session {} replicates a snapshot store, whose every point is verified; leave --path out",
            session.name
        )
        .into());
    }
    let worker = Worker::open(session)?;
    let conn = connect(session).await?;
    if req.repair {
        // Repairs write: the agent fences them as the worker's (a promoted,
        // live slave refuses them; a slave of this session's epoch takes them).
        let mut state = session.state();
        if let Err(e) =
            crate::engine::lineage::claim(session, &Slave::new(conn.client.clone()), &mut state)
                .await
        {
            conn.close(Duration::from_secs(30)).await;
            return Err(e);
        }
    }
    let res = if session.config.layout == Layout::Store {
        run_store(session, &worker, &conn.client, req, shutdown).await
    } else {
        run(session, &worker, &conn.client, &scope, req, shutdown).await
    };
    conn.close(Duration::from_secs(30)).await;
    res
}

/// Refuses a slave that does not carry this session's identity and epoch.
async fn check_ours(session: &Session, slave: &Slave) -> Result<(), WorkerError> {
    let ident = slave
        .identity()
        .await
        .map_err(|source| WorkerError::Slave {
            slave: session.config.slave.clone(),
            source,
        })?;
    let state = session.state();
    let ours = ident
        .as_ref()
        .is_some_and(|i| i.session == session.config.session_id && Some(i.epoch) == state.epoch);
    if !ours && session.config.layout == Layout::Tree {
        return Err(user_err!(
            "the slave {} does not hold this session's replica (it was wiped, replaced or restored, or belongs to another session): run `georep sync {}` to repopulate it, then verify",
            session.config.slave,
            session.name
        )
        .into());
    }
    Ok(())
}

/// A snapshot store's replica: every point against its records, both sides.
async fn run_store(
    session: &Session,
    worker: &Worker<'_>,
    client: &crate::protocol::Client,
    req: &Request,
    shutdown: CancellationToken,
) -> Result<Report, WorkerError> {
    use super::store;
    let started = Instant::now();
    let slave = Slave::new(client.clone());
    let slave_err = |source| WorkerError::Slave {
        slave: session.config.slave.clone(),
        source,
    };
    check_ours(session, &slave).await?;
    let store_file =
        RelPath::new(crate::catalog::record::STORE_FILE.as_bytes().to_vec()).expect("a valid name");
    match slave.read_file(store_file, 0, 4096).await.map_err(slave_err)?.wait().await {
        Ok(_) => {}
        Err(ProtoError::Remote(e)) if e.kind == crate::protocol::ErrorKind::NotFound => {
            return Err(user_err!(
                "session {} has never completed a sync: the slave holds no store to verify yet; run `georep sync {}` first",
                session.name,
                session.name
            )
            .into())
        }
        Err(e) => return Err(slave_err(e)),
    }
    let root = session.config.master.clone();
    let wire = Wire::start(&slave);
    let c = store::check(&slave, &root, req.rate)
        .await
        .map_err(slave_err)?;
    let counts = |c: &store::StoreCheck| Counts {
        entries: c.entries,
        bytes: c.bytes,
        mismatches: c.findings.len() as u64,
        failures: c.master_problems.len() as u64,
        ..Counts::default()
    };
    let build = |c: &store::StoreCheck| Report {
        session: session.name.clone(),
        complete: true,
        equal: c.findings.is_empty(),
        resumed: false,
        stopped_at: None,
        scope: vec!["/".into()],
        owners_compared: false,
        counts: counts(c),
        differences: differences(&c.findings),
        changed_paths: Vec::new(),
        pending_paths: Vec::new(),
        failed: c
            .master_problems
            .iter()
            .map(|p| Failure {
                path: "(master store)".into(),
                error: p.clone(),
            })
            .collect(),
        wire_bytes_out: 0,
        wire_bytes_in: 0,
        duration_ms: 0,
        repair: None,
    };
    let mut rep = build(&c);
    (rep.wire_bytes_out, rep.wire_bytes_in) = wire.since(&slave);
    let path = session.dir.join("verify.json");
    let mut progress = Progress::new(now_ns(), Vec::new());
    progress.counts = rep.counts.clone();
    progress.findings = c.findings.clone();
    progress.finished_ns = Some(now_ns());
    let _ = progress.save(&path);
    if req.repair && !c.findings.is_empty() {
        let wire = Wire::start(&slave);
        let digests = store::recorded_digests(&slave, &c.findings)
            .await
            .map_err(slave_err)?;
        let engine = Engine::new(
            Master::new(
                root.clone(),
                &worker.master_id(),
                &session.config.session_id,
            ),
            slave.clone(),
            CrawlKind::Full,
            Links::load(session.dir.join("links.json")),
            shutdown.clone(),
        );
        let r = root.clone();
        let mcat = tokio::task::spawn_blocking(move || crate::catalog::store::load(&r))
            .await
            .expect("load panicked")
            .unwrap_or_default();
        let done = store::repair(&engine, &mcat, &digests).await;
        slave.barrier().await.map_err(slave_err)?;
        let (out, inb) = wire.since(&slave);
        let left = store::recheck(&slave, &digests, req.rate)
            .await
            .map_err(slave_err)?;
        let after = store::StoreCheck {
            entries: digests.len() as u64,
            findings: left,
            ..store::StoreCheck::default()
        };
        let mut after = build(&after);
        after.failed.clear();
        progress.findings = after
            .differences
            .is_empty()
            .then(Vec::new)
            .unwrap_or_else(|| {
                c.findings
                    .iter()
                    .filter(|f| after.differences.iter().any(|d| d.path == show(&f.path)))
                    .cloned()
                    .collect()
            });
        progress.counts.mismatches = progress.findings.len() as u64;
        let _ = progress.save(&path);
        rep.repair = Some(RepairReport {
            done,
            wire_bytes_out: out,
            wire_bytes_in: inb,
            after: Box::new(after),
        });
    }
    rep.duration_ms = started.elapsed().as_millis() as u64;
    Ok(rep)
}

async fn run(
    session: &Session,
    worker: &Worker<'_>,
    client: &crate::protocol::Client,
    scope: &[RelPath],
    req: &Request,
    shutdown: CancellationToken,
) -> Result<Report, WorkerError> {
    let started = Instant::now();
    let slave = Slave::new(client.clone());
    let slave_err = |source| WorkerError::Slave {
        slave: session.config.slave.clone(),
        source,
    };
    check_ours(session, &slave).await?;
    let root = session.config.master.clone();
    let sid = session.config.session_id;
    let master = Arc::new(Master::new(root.clone(), &worker.master_id(), &sid));
    let path = session.dir.join("verify.json");
    let prev = Progress::load(&path).filter(|p| p.resumable() && p.scope == scope && !req.restart);
    let mut progress = prev
        .clone()
        .unwrap_or_else(|| Progress::new(now_ns(), scope.to_vec()));
    let wire = Wire::start(&slave);
    let mut v = Verifier::new(master.clone(), slave.clone(), req.rate)
        .await
        .map_err(slave_err)?;
    let cache = window_cache(session, !req.no_cache);
    v.set_cache(cache.clone());
    if let Some(p) = &prev {
        p.restore(&mut v);
        tracing::info!(session = %session.name, at = ?v.cursor, "resuming an interrupted verification");
    }
    let opts = Options {
        scope: scope.to_vec(),
        rate: req.rate,
        deadline: req.max_duration.map(|d| Instant::now() + d),
        resume: v.cursor.clone(),
        headers: Vec::new(),
    };
    let mut saving = (progress.clone(), Instant::now());
    let file = path.clone();
    let res = v
        .run(&opts, &shutdown, &mut |v| {
            if saving.1.elapsed() >= Duration::from_secs(1) {
                saving.0.record(v);
                let _ = saving.0.save(&file);
                saving.1 = Instant::now();
            }
        })
        .await;
    cache.save();
    progress.record(&v);
    let end = match res {
        Ok(end) => end,
        Err(e) => {
            let _ = progress.save(&path);
            return Err(verify_err(
                session,
                e,
                v.cursor.as_ref().map(|c| c.key.to_string()),
            ));
        }
    };
    if end == End::Complete {
        progress.finished_ns = Some(now_ns());
    }
    let _ = progress.save(&path);
    let mut rep = report(session, &v, scope, end == End::Complete);
    rep.resumed = prev.is_some();
    (rep.wire_bytes_out, rep.wire_bytes_in) = wire.since(&slave);
    if req.repair && end == End::Complete && !v.findings.is_empty() {
        let engine = Engine::new(
            Master::new(root.clone(), &worker.master_id(), &sid),
            slave.clone(),
            CrawlKind::Full,
            Links::load(session.dir.join("links.json")),
            shutdown.clone(),
        );
        engine.set_inplace_min_size(session.config.inplace_min_size);
        let wire = Wire::start(&slave);
        let done = repair::repair(&engine, &v.findings).await;
        if let Err(e) = engine.links().save() {
            tracing::warn!(error = %e, "could not save the hard-link map");
        }
        slave.barrier().await.map_err(slave_err)?;
        let (out, inb) = wire.since(&slave);
        let wire2 = Wire::start(&slave);
        let mut again = Verifier::new(master.clone(), slave.clone(), req.rate)
            .await
            .map_err(slave_err)?;
        again.set_cache(cache.clone());
        let again_scope = scopes(&done.paths);
        let opts = Options {
            scope: again_scope.clone(),
            rate: req.rate,
            deadline: None,
            resume: None,
            headers: done.dirs.clone(),
        };
        let end = again
            .run(&opts, &shutdown, &mut |_| {})
            .await
            .map_err(|e| verify_err(session, e, None))?;
        cache.save();
        let mut after = report(session, &again, &again_scope, end == End::Complete);
        (after.wire_bytes_out, after.wire_bytes_in) = wire2.since(&slave);
        if end == End::Complete && done.failed.is_empty() {
            // What the repair fixed is no longer a mismatch of the replica.
            progress.findings = again.findings.clone();
            progress.counts.mismatches = again.counts.mismatches;
            let _ = progress.save(&path);
        }
        rep.repair = Some(RepairReport {
            done,
            wire_bytes_out: out,
            wire_bytes_in: inb,
            after: Box::new(after),
        });
    }
    rep.duration_ms = started.elapsed().as_millis() as u64;
    Ok(rep)
}
