//! The scrub: the daemon's worker verifies the replica in the background
//! (`scrub_rate`, `scrub_period`), over the connection replication uses
//! (the agent verifies on a thread of its own, so replication is not held
//! up; both sides read at most `scrub_rate`).
//!
//! A pass verifies the whole tree in stream order; its cursor and findings
//! are kept in `scrub.json`, so a killed worker or a rebooted machine goes
//! on where it was. The pass runs in chunks of [`CHUNK`]; after each, what
//! it found is repaired (shipped again) at once. A new pass starts once the
//! previous one ended and half a period has passed since it started, so a
//! pass that takes at most half the period verifies every byte at least
//! once per period. The status readers turn `scrub.json` into
//! `verify_last`, `verify_coverage` (the share of the data verified within
//! the last period) and `verify_mismatches` ([`fill_status`]). For a
//! snapshot store (catalog mode) a pass checks every point's records and
//! files on both sides in one go and ships failing images again.

use crate::engine::context::{CrawlKind, Engine};
use crate::engine::links::Links;
use crate::engine::master::Master;
use crate::engine::slave::Slave;
use crate::engine::verify::cache::WindowCache;
use crate::engine::verify::progress::Progress;
use crate::engine::verify::{repair, tree_bytes, End, Options, Verifier};
use crate::fs::xtime::now_ns;
use crate::protocol::Client;
use crate::session::{Layout, Session, DEFAULT_SCRUB_PERIOD};
use georep_monitor::status::Status;
use georep_monitor::time::format_rfc3339;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Where the worker puts its connection's client for the scrub.
pub type Slot = Arc<Mutex<Option<Client>>>;

/// A pass runs this long between two repairs and saves.
const CHUNK: Duration = Duration::from_secs(30);
/// Progress is written at least this often within a chunk.
const SAVE: Duration = Duration::from_secs(1);
/// Mismatch paths kept for status.
const PATHS: usize = 10;

/// A completed pass.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pass {
    pub started_ns: u64,
    pub finished_ns: u64,
    pub bytes: u64,
    pub mismatches: u64,
    pub paths: Vec<String>,
}

/// `scrub.json`: the pass in progress and the last completed one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScrubState {
    /// When the scrub started with its current rate and period (coverage
    /// is expected to reach 100% one period later).
    pub enabled_ns: u64,
    pub rate: u64,
    pub period_secs: u64,
    /// The pass in progress.
    pub pass: Option<Progress>,
    /// Bytes of the master tree when the pass started.
    pub pass_total: u64,
    /// Findings of the pass in progress already repaired.
    pub repaired_upto: usize,
    /// Repairs made, over the scrub's life.
    pub repaired: u64,
    pub mismatches_total: u64,
    pub last: Option<Pass>,
    pub last_error: Option<String>,
}

pub fn path(session: &Session) -> PathBuf {
    session.dir.join("scrub.json")
}

pub fn load(session: &Session) -> Option<ScrubState> {
    serde_json::from_slice(&std::fs::read(path(session)).ok()?).ok()
}

fn save(session: &Session, st: &ScrubState) {
    let data = serde_json::to_vec(st).expect("scrub state serializes");
    if let Err(e) = georep_monitor::write_atomic_volatile(&path(session), &data) {
        tracing::warn!(error = %e, "cannot save the scrub's progress");
    }
}

/// Coverage and schedule, computed by the reader.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Coverage {
    /// Share of the data verified within the last period (0-1).
    pub coverage: f64,
    /// Less than the schedule says should be verified by now.
    pub behind: bool,
}

/// The share of the data verified within `[now - period, now]`: the current
/// pass's bytes (pro rata if it started before the window), plus the part
/// of the last pass beyond the current cursor that it verified within the
/// window, assuming each pass went at an even pace. Pure, for tests.
pub fn coverage(st: &ScrubState, now: u64) -> Coverage {
    let period = st.period_secs.max(1) * 1_000_000_000;
    let window = now.saturating_sub(period);
    let total = st
        .pass_total
        .max(st.last.as_ref().map_or(0, |l| l.bytes))
        .max(1) as f64;
    let (done, started) = match &st.pass {
        Some(p) => (p.counts.bytes as f64, p.started_ns),
        None => (0.0, now),
    };
    let done = done.min(total);
    let mut covered = if started >= window {
        done
    } else {
        done * (now - window) as f64 / (now - started).max(1) as f64
    };
    if let Some(l) = &st.last {
        if l.finished_ns >= window {
            let span = l.finished_ns.saturating_sub(l.started_ns).max(1) as f64;
            let from = if l.started_ns >= window {
                0.0
            } else {
                (window - l.started_ns) as f64 / span
            };
            let cursor = done / total;
            covered += total * (1.0 - cursor.max(from)).max(0.0);
        }
    }
    let coverage = (covered / total).clamp(0.0, 1.0);
    let expected = (now.saturating_sub(st.enabled_ns) as f64 / period as f64).min(1.0);
    Coverage {
        coverage,
        behind: coverage + 0.01 < expected,
    }
}

/// Fills the verification fields of a session's status from `scrub.json`
/// and `verify.json` (the last `georep verify`).
pub fn fill_status(s: &Session, st: &mut Status, now: u64) {
    let scrub = load(s).filter(|_| s.config.scrub_rate.is_some());
    let once = Progress::load(&s.dir.join("verify.json")).filter(|p| p.finished_ns.is_some());
    let mut last: Option<(u64, u64, Vec<String>)> = scrub
        .as_ref()
        .and_then(|c| c.last.as_ref())
        .map(|l| (l.finished_ns, l.mismatches, l.paths.clone()));
    if let Some(o) = &once {
        let t = o.finished_ns.unwrap_or(0);
        if last.as_ref().is_none_or(|l| t > l.0) {
            let paths = o
                .findings
                .iter()
                .take(PATHS)
                .map(|f| show(&f.path))
                .collect();
            last = Some((t, o.counts.mismatches, paths));
        }
    }
    st.verify_last = last.as_ref().map(|l| format_rfc3339(l.0));
    (st.verify_mismatches, st.verify_mismatch_paths) = last.map(|l| (l.1, l.2)).unwrap_or_default();
    if let Some(c) = &scrub {
        if let Some(p) = c.pass.as_ref().filter(|p| p.counts.mismatches > 0) {
            st.verify_mismatches = p.counts.mismatches;
            st.verify_mismatch_paths = p
                .findings
                .iter()
                .take(PATHS)
                .map(|f| show(&f.path))
                .collect();
        }
        let cov = coverage(c, now);
        st.verify_coverage = Some(cov.coverage);
        st.verify_behind = cov.behind;
    } else if s.config.scrub_rate.is_some() {
        st.verify_coverage = Some(0.0);
    }
}

fn show(p: &crate::fs::relpath::RelPath) -> String {
    String::from_utf8_lossy(p.as_bytes()).into_owned()
}

/// Runs the scrub of `session` until `shutdown`, over the client the
/// worker puts in `slot`.
pub async fn run(
    session: &Session,
    slot: Slot,
    master_id: uuid::Uuid,
    shutdown: CancellationToken,
) {
    let Some(rate) = session.config.scrub_rate else {
        return;
    };
    let period = session.config.scrub_period.unwrap_or(DEFAULT_SCRUB_PERIOD);
    let mut st = load(session).unwrap_or_default();
    if st.rate != rate || st.period_secs != period || st.enabled_ns == 0 {
        (st.rate, st.period_secs, st.enabled_ns) = (rate, period, now_ns());
        save(session, &st);
    }
    let master = Arc::new(Master::new(
        session.config.master.clone(),
        &master_id,
        &session.config.session_id,
    ));
    // Hashes of unchanged master files: after the first pass, only the
    // slave reads its data (see `engine::verify::cache`).
    let cache = crate::engine::verify::session::window_cache(session, true);
    let mut backoff = Duration::from_secs(1);
    loop {
        let pause = match step(
            session, &slot, &master, &cache, master_id, &mut st, &shutdown,
        )
        .await
        {
            Ok(Some(wait)) => wait,
            Ok(None) => Duration::ZERO,
            Err(e) => {
                tracing::warn!(session = %session.name, error = %e, retry_in_secs = backoff.as_secs(), "scrub interrupted; it resumes where it was");
                st.last_error = Some(e);
                save(session, &st);
                let b = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(60));
                b
            }
        };
        if pause.is_zero() {
            backoff = Duration::from_secs(1);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        if shutdown.is_cancelled() {
            return;
        }
    }
}

/// One chunk of scrubbing; `Some(wait)` when there is nothing to do for that long.
async fn step(
    session: &Session,
    slot: &Slot,
    master: &Arc<Master>,
    cache: &Arc<WindowCache>,
    master_id: uuid::Uuid,
    st: &mut ScrubState,
    shutdown: &CancellationToken,
) -> Result<Option<Duration>, String> {
    let client = slot
        .lock()
        .unwrap()
        .clone()
        .filter(|c| c.closed().is_none());
    let Some(client) = client else {
        return Ok(Some(Duration::from_secs(1)));
    };
    let slave = Slave::new(client);
    if session.config.layout == Layout::Store {
        return store_step(session, &slave, master_id, st, shutdown).await;
    }
    // Only a replica this session made and synced is verified.
    let state = session.state();
    let ident = slave.identity().await.map_err(|e| e.to_string())?;
    let ours = ident
        .is_some_and(|i| i.session == session.config.session_id && Some(i.epoch) == state.epoch)
        && state.last_synced_xtime.is_some()
        && !state.full_pending;
    if !ours {
        return Ok(Some(Duration::from_secs(5)));
    }
    let now = now_ns();
    if st.pass.is_none() {
        if let Some(l) = &st.last {
            let next = l
                .finished_ns
                .max(l.started_ns + st.period_secs * 500_000_000);
            if now < next {
                return Ok(Some(
                    Duration::from_nanos(next - now).min(Duration::from_secs(10)),
                ));
            }
        }
        let m = master.clone();
        st.pass_total = tokio::task::spawn_blocking(move || tree_bytes(m))
            .await
            .expect("walk panicked")
            .map_err(|e| e.to_string())?;
        st.pass = Some(Progress::new(now, Vec::new()));
        st.repaired_upto = 0;
        save(session, st);
        tracing::info!(session = %session.name, bytes = st.pass_total, "scrub pass started");
    }
    let mut pass = st.pass.clone().expect("set above");
    let mut v = Verifier::new(master.clone(), slave.clone(), st.rate)
        .await
        .map_err(|e| e.to_string())?;
    v.set_cache(cache.clone());
    pass.restore(&mut v);
    let opts = Options {
        scope: Vec::new(),
        rate: st.rate,
        deadline: Some(Instant::now() + CHUNK),
        resume: pass.cursor.clone(),
        headers: Vec::new(),
    };
    let mut saving = (st.clone(), pass.clone(), Instant::now());
    let res = v
        .run(&opts, shutdown, &mut |v| {
            if saving.2.elapsed() >= SAVE {
                saving.1.record(v);
                saving.0.pass = Some(saving.1.clone());
                save(session, &saving.0);
                saving.2 = Instant::now();
            }
        })
        .await;
    cache.save();
    pass.record(&v);
    st.pass = Some(pass.clone());
    let end = match res {
        Ok(end) => end,
        Err(e) => {
            save(session, st);
            return Err(e.to_string());
        }
    };
    // What this chunk found is shipped again now.
    if v.findings.len() > st.repaired_upto && end != End::Shutdown {
        let new = &v.findings[st.repaired_upto..];
        for f in new {
            tracing::warn!(session = %session.name, path = %f.path, what = f.what.as_str(), "scrub: the slave differs from the master; shipping it again");
        }
        let engine = Engine::new(
            Master::new(
                session.config.master.clone(),
                &master_id,
                &session.config.session_id,
            ),
            slave.clone(),
            CrawlKind::Full,
            Links::load(session.dir.join("links.json")),
            shutdown.clone(),
        );
        engine.set_inplace_min_size(session.config.inplace_min_size);
        let done = repair::repair(&engine, new).await;
        for (p, e) in &done.failed {
            tracing::warn!(session = %session.name, path = %p, error = %e, "scrub: repair failed; the next pass finds it again");
        }
        st.repaired += done.repaired;
        st.repaired_upto = v.findings.len();
    }
    if end == End::Complete {
        let p = st.pass.take().expect("in progress");
        st.mismatches_total += p.counts.mismatches;
        st.last = Some(Pass {
            started_ns: p.started_ns,
            finished_ns: now_ns(),
            bytes: p.counts.bytes,
            mismatches: p.counts.mismatches,
            paths: p
                .findings
                .iter()
                .take(PATHS)
                .map(|f| show(&f.path))
                .collect(),
        });
        st.last_error = None;
        tracing::info!(session = %session.name, bytes = p.counts.bytes, mismatches = p.counts.mismatches, "scrub pass completed");
    }
    save(session, st);
    Ok(None)
}

/// A pass over a snapshot store's replica: every point's records and
/// files (see `engine::verify::store`), in one go (a killed pass starts
/// over); images the master holds byte for byte are shipped again.
async fn store_step(
    session: &Session,
    slave: &Slave,
    master_id: uuid::Uuid,
    st: &mut ScrubState,
    shutdown: &CancellationToken,
) -> Result<Option<Duration>, String> {
    use crate::engine::verify::store;
    // Nothing to verify before the first sync made the slave a store.
    let marker =
        crate::fs::relpath::RelPath::new(crate::catalog::record::STORE_FILE.as_bytes().to_vec())
            .expect("a valid name");
    let pending = slave
        .read_file(marker, 0, 4096)
        .await
        .map_err(|e| e.to_string())?;
    if pending.wait().await.is_err() {
        return Ok(Some(Duration::from_secs(5)));
    }
    let now = now_ns();
    if let Some(l) = &st.last {
        let next = l
            .finished_ns
            .max(l.started_ns + st.period_secs * 500_000_000);
        if now < next {
            return Ok(Some(
                Duration::from_nanos(next - now).min(Duration::from_secs(10)),
            ));
        }
    }
    let root = session.config.master.clone();
    let c = store::check(slave, &root, st.rate)
        .await
        .map_err(|e| e.to_string())?;
    if shutdown.is_cancelled() {
        return Ok(None);
    }
    for f in &c.findings {
        tracing::warn!(session = %session.name, path = %f.path, why = ?f.fields, "scrub: a point fails on the slave; shipping it again where the master holds it");
    }
    if !c.findings.is_empty() {
        let digests = store::recorded_digests(slave, &c.findings)
            .await
            .map_err(|e| e.to_string())?;
        let engine = Engine::new(
            Master::new(root.clone(), &master_id, &session.config.session_id),
            slave.clone(),
            CrawlKind::Full,
            Links::load(session.dir.join("links.json")),
            shutdown.clone(),
        );
        let r = root.clone();
        let cat = tokio::task::spawn_blocking(move || crate::catalog::store::load(&r))
            .await
            .expect("load panicked")
            .unwrap_or_default();
        let done = store::repair(&engine, &cat, &digests).await;
        for (p, e) in &done.failed {
            tracing::warn!(session = %session.name, path = %p, error = %e, "scrub: not shipped again");
        }
        st.repaired += done.repaired;
    }
    st.mismatches_total += c.findings.len() as u64;
    st.pass_total = c.bytes;
    st.last = Some(Pass {
        started_ns: now,
        finished_ns: now_ns(),
        bytes: c.bytes,
        mismatches: c.findings.len() as u64,
        paths: c
            .findings
            .iter()
            .take(PATHS)
            .map(|f| show(&f.path))
            .collect(),
    });
    st.last_error = None;
    save(session, st);
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn at(done: u64, started: u64, last: Option<(u64, u64)>) -> ScrubState {
        ScrubState {
            enabled_ns: 0,
            period_secs: 100,
            pass: Some(Progress {
                started_ns: started * S,
                counts: crate::engine::verify::Counts {
                    bytes: done,
                    ..Default::default()
                },
                ..Progress::default()
            }),
            pass_total: 1000,
            last: last.map(|(s, f)| Pass {
                started_ns: s * S,
                finished_ns: f * S,
                bytes: 1000,
                ..Pass::default()
            }),
            ..ScrubState::default()
        }
    }

    #[test]
    fn coverage_counts_what_was_verified_within_the_period() {
        // First pass, half done after half the period: on schedule.
        let c = coverage(&at(500, 0, None), 50 * S);
        assert!((c.coverage - 0.5).abs() < 1e-9 && !c.behind, "{c:?}");
        // A fifth done after half the period: behind.
        assert!(coverage(&at(200, 0, None), 50 * S).behind);
        // Second pass 30% in; the last pass (0..40 s) is all within the window.
        let c = coverage(&at(300, 40, Some((0, 40))), 60 * S);
        assert!((c.coverage - 1.0).abs() < 1e-9 && !c.behind, "{c:?}");
        // Later: the window starts at 50 s, the last pass covered 0..40 s:
        // only the current pass's 30% counts.
        let c = coverage(&at(300, 140, Some((100, 140))), 150 * S);
        assert!((c.coverage - 1.0).abs() < 1e-9, "{c:?}");
        // Window 120..220: the last pass verified fractions 0.5..1 within
        // it, the current one 0..0.3.
        let c = coverage(&at(300, 140, Some((100, 140))), 220 * S);
        assert!((c.coverage - 0.8).abs() < 1e-9 && c.behind, "{c:?}");
        // The window cuts the last pass at its middle; the cursor is before that.
        let c = coverage(&at(100, 200, Some((140, 200))), 270 * S);
        // Window 170..270: last pass verified fractions 0.5..1 within it; 0.1 now.
        assert!((c.coverage - 0.6).abs() < 1e-9, "{c:?}");
    }
}
