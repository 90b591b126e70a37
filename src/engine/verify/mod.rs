//! Verification of a replica against its master without moving its data
//! (`georep verify` and the daemon's scrub).
//!
//! Both sides hash the canonical stream of their tree (`hash::stream`:
//! entries with their metadata, and each file's 4 MiB windows) range by
//! range, at the same time: the worker cuts the master's stream into
//! ranges from a metadata walk (`walk`), sends each range's bounds to the
//! agent, which hashes its side on its verification thread, while the
//! worker hashes the master's. Equal ranges cost one request and one
//! 32-byte hash. Where the hashes differ, the agent's items of that range
//! are compared with the master's (`compare`, pure), and the windows that
//! differ block by block (`range`), giving byte ranges. A difference in a
//! directory whose stime does not cover its xtime is a change on its way
//! to the slave (pending), and one in a file that changed while read is
//! "changed, verify later"; neither is a mismatch. `repair` ships what
//! differs through the session's publish; `session` runs it all for a
//! session and keeps its progress, so an interrupted verification resumes.

pub mod cache;
mod compare;
pub mod progress;
mod range;
pub mod repair;
pub mod session;
pub mod store;
mod walk;

pub use compare::{Finding, What};

use crate::engine::master::{Master, MasterError};
use crate::engine::slave::{Slave, VerifyCaps};
use crate::fs::relpath::RelPath;
use crate::fs::throttle::Throttle;
use crate::hash::digest::WINDOW;
use crate::hash::stream::Key;
use crate::protocol::ProtoError;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
pub use walk::tree_bytes;
use walk::{Budget, Own, Planned, Planner};

/// Paths listed per kind of result at most (all are counted).
pub const MAX_LISTED: usize = 1000;
/// Ranges the worker cuts: at most this many entries, bytes of content
/// and bytes of items (well within the agent's limits, so it rarely stops early).
const RANGE_ENTRIES: u64 = 2048;
const RANGE_BYTES: u64 = 256 << 20;
const RANGE_ITEM_BYTES: usize = 1 << 20;
/// With a rate, a range takes about this long to read.
const RANGE_TIME: Duration = Duration::from_secs(2);
/// Ranges in flight: one hashed by both sides while the next is queued.
const IN_FLIGHT: usize = 2;

/// What a verification counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Master entries and content bytes verified.
    pub entries: u64,
    pub bytes: u64,
    pub ranges: u64,
    pub ranges_differing: u64,
    pub mismatches: u64,
    /// Files that changed on the master while read ("changed, verify later").
    pub changed: u64,
    /// Differences in directories whose changes are not replicated yet.
    pub pending: u64,
    /// Master files that could not be read.
    pub failures: u64,
    /// Master content read to hash it (windows, and the blocks of differing
    /// windows); the rest of `bytes` came from the cache of master hashes.
    #[serde(default)]
    pub master_bytes_read: u64,
    #[serde(default)]
    pub master_bytes_cached: u64,
}

/// Where a verification got to: every key of the scopes before `scope`,
/// and of scope `scope` up to `key`, is verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub scope: usize,
    pub key: Key,
}

/// What to verify, how fast, for how long.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Subtrees (the whole tree when empty).
    pub scope: Vec<RelPath>,
    /// Bytes per second each side reads at most (0: unlimited).
    pub rate: u64,
    pub deadline: Option<Instant>,
    pub resume: Option<Cursor>,
    /// Entries whose own item only is verified too, after the scopes (the
    /// directories a repair changed).
    pub headers: Vec<RelPath>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Complete,
    /// `deadline` passed; resume from the cursor.
    Deadline,
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Slave(ProtoError),
    #[error(transparent)]
    Master(#[from] MasterError),
}

/// One verification over one connection, with what it found so far.
pub struct Verifier {
    master: Arc<Master>,
    slave: Slave,
    caps: VerifyCaps,
    rate: u64,
    throttle: Arc<Throttle>,
    stop: Arc<AtomicBool>,
    rid: u64,
    fold: compare::Fold,
    /// The master's window hashes kept between verifications.
    cache: Option<Arc<cache::WindowCache>>,
    /// When this run started (ns): a master entry whose ctime is later
    /// changed during the verification.
    started_ns: u64,
    /// The path last counted as changed or pending (counted once per path).
    last_counted: Option<RelPath>,
    pub findings: Vec<Finding>,
    pub changed: Vec<RelPath>,
    pub pending: Vec<RelPath>,
    pub failures: Vec<(RelPath, String)>,
    pub counts: Counts,
    /// Everything up to here is verified (None before the first range and
    /// after the last).
    pub cursor: Option<Cursor>,
}

/// The scopes in stream order, without those inside another; the root
/// when there are none.
pub fn scopes(scope: &[RelPath]) -> Vec<RelPath> {
    let mut v: Vec<RelPath> = scope.to_vec();
    if v.is_empty() || v.iter().any(|p| p.is_root()) {
        return vec![RelPath::root()];
    }
    v.sort_by(|a, b| crate::hash::stream::cmp(&Key::before(a), &Key::before(b)));
    v.dedup();
    let mut out: Vec<RelPath> = Vec::new();
    for p in v {
        let inside = out.last().is_some_and(|q| {
            let (a, b) = (p.as_bytes(), q.as_bytes());
            a.starts_with(b) && a.get(b.len()) == Some(&b'/')
        });
        if !inside {
            out.push(p);
        }
    }
    out
}

impl Verifier {
    /// Asks the agent what it can do (one round trip).
    pub async fn new(master: Arc<Master>, slave: Slave, rate: u64) -> Result<Verifier, ProtoError> {
        let caps = slave.verify_caps().await?;
        Ok(Verifier {
            master,
            slave,
            caps,
            rate,
            throttle: Arc::new(Throttle::new(rate)),
            stop: Arc::new(AtomicBool::new(false)),
            rid: 0,
            fold: compare::Fold::default(),
            cache: None,
            started_ns: crate::fs::xtime::now_ns(),
            last_counted: None,
            findings: Vec::new(),
            changed: Vec::new(),
            pending: Vec::new(),
            failures: Vec::new(),
            counts: Counts::default(),
            cursor: None,
        })
    }

    /// Takes the hashes of unchanged master files from `c` (and keeps there
    /// those it reads); without, every master file is read.
    pub fn set_cache(&mut self, c: Arc<cache::WindowCache>) {
        self.cache = Some(c);
    }

    /// Whether owners are compared (the agent runs as root and keeps them).
    pub fn owners(&self) -> bool {
        self.caps.owners
    }

    pub fn slave(&self) -> &Slave {
        &self.slave
    }

    fn next_rid(&mut self) -> u64 {
        self.rid += 1;
        self.rid
    }

    fn budget(&self) -> Budget {
        let mut bytes = RANGE_BYTES.min(self.caps.max_bytes / 2).max(WINDOW);
        if self.rate > 0 {
            let timed = (self.rate as u128 * RANGE_TIME.as_millis() / 1000) as u64;
            bytes = bytes.min(timed.max(WINDOW));
        }
        let mut b = Budget {
            entries: RANGE_ENTRIES.min(self.caps.max_entries / 2).max(1),
            bytes,
            item_bytes: RANGE_ITEM_BYTES,
        };
        // Test knobs: small ranges, to cut files and trees at many places.
        let knob = |name| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        if let Some(n) = knob("GEOREP_VERIFY_RANGE_ENTRIES") {
            b.entries = n.max(1);
        }
        if let Some(n) = knob("GEOREP_VERIFY_RANGE_BYTES") {
            b.bytes = n.max(1);
        }
        b
    }

    /// Verifies `opts.scope` from `opts.resume` on; `on_range` is called
    /// after every range (to save progress).
    pub async fn run(
        &mut self,
        opts: &Options,
        shutdown: &CancellationToken,
        on_range: &mut (dyn FnMut(&Verifier) + Send),
    ) -> Result<End, VerifyError> {
        let stop = self.stop.clone();
        let token = shutdown.clone();
        let watch = tokio::spawn(async move {
            token.cancelled().await;
            stop.store(true, Ordering::Relaxed);
        });
        let res = self.run_scopes(opts, shutdown, on_range).await;
        watch.abort();
        res
    }

    async fn run_scopes(
        &mut self,
        opts: &Options,
        shutdown: &CancellationToken,
        on_range: &mut (dyn FnMut(&Verifier) + Send),
    ) -> Result<End, VerifyError> {
        let scopes = scopes(&opts.scope);
        let (first, start) = match &opts.resume {
            Some(c) if c.scope < scopes.len() => (c.scope, c.key.clone()),
            _ => (0, Key::before(&scopes[0])),
        };
        let budget = self.budget();
        let ended = |v: &Verifier| {
            if shutdown.is_cancelled() || v.stop.load(Ordering::Relaxed) {
                Some(End::Shutdown)
            } else if opts.deadline.is_some_and(|d| Instant::now() >= d) {
                Some(End::Deadline)
            } else {
                None
            }
        };
        let mut spans: Vec<(Key, Key)> = scopes
            .iter()
            .map(|s| (Key::before(s), Key::after(s)))
            .collect();
        spans.extend(opts.headers.iter().map(|p| {
            (
                Key::before(p),
                Key::new(p.clone(), crate::hash::stream::HEADER),
            )
        }));
        for (si, (from, to)) in spans.into_iter().enumerate().skip(first) {
            let from = if si == first { start.clone() } else { from };
            let mut planner = Some(Planner::new(self.master.clone(), from, to));
            let mut inflight: VecDeque<InFlight> = VecDeque::new();
            loop {
                if let Some(end) = ended(self) {
                    return Ok(end);
                }
                while inflight.len() < IN_FLIGHT {
                    let Some(mut p) = planner.take() else { break };
                    let (p, next) = tokio::task::spawn_blocking(move || {
                        let r = p.next(&budget);
                        (p, r)
                    })
                    .await
                    .expect("planning panicked");
                    let Some(planned) = next? else { break };
                    planner = Some(p);
                    inflight.push_back(self.start_range(planned).await?);
                }
                let Some(f) = inflight.pop_front() else { break };
                let (planned, own) = f.own.await.expect("hashing panicked");
                if shutdown.is_cancelled() {
                    return Ok(End::Shutdown);
                }
                let reply = f.reply.wait().await.map_err(VerifyError::Slave)?;
                let (differs, slave) = self
                    .slave_items(f.rid, &planned, &own.items, reply)
                    .await
                    .map_err(VerifyError::Slave)?;
                self.counts.ranges += 1;
                self.counts.entries += planned.entries.iter().filter(|e| e.header).count() as u64;
                self.counts.bytes += own.bytes;
                self.counts.master_bytes_read += own.read;
                self.counts.master_bytes_cached += own.cached;
                self.counts.failures += own.failures.len() as u64;
                if differs {
                    self.counts.ranges_differing += 1;
                    self.classify(&planned, &own, &slave).await?;
                }
                for f in &own.failures {
                    if self.failures.len() < MAX_LISTED {
                        self.failures.push(f.clone());
                    }
                }
                self.cursor = Some(Cursor {
                    scope: si,
                    key: planned.to.clone(),
                });
                on_range(self);
            }
        }
        self.cursor = None;
        Ok(End::Complete)
    }

    /// Sends a range to the agent and starts hashing the master's side.
    async fn start_range(&mut self, planned: Planned) -> Result<InFlight, VerifyError> {
        let rid = self.next_rid();
        let reply = self
            .slave
            .verify_range(
                rid,
                planned.from.clone(),
                planned.to.clone(),
                self.rate,
                self.caps.owners,
            )
            .await
            .map_err(VerifyError::Slave)?;
        let (m, t, s, owners, c) = (
            self.master.clone(),
            self.throttle.clone(),
            self.stop.clone(),
            self.caps.owners,
            self.cache.clone(),
        );
        let own = tokio::task::spawn_blocking(move || {
            let own = walk::hash_own(&m, &planned, owners, &t, &s, c.as_deref());
            (planned, own)
        });
        Ok(InFlight { rid, reply, own })
    }
}

struct InFlight {
    rid: u64,
    reply: crate::engine::slave::Pending<crate::engine::slave::RangeReply>,
    own: tokio::task::JoinHandle<(Planned, Own)>,
}
