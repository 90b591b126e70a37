//! An explicit-state model of georep's change-detection protocol (xtime,
//! stime, markers, the crawl), checked with `stateright`. See
//! docs/model.md for what it covers, its bounds and how it maps onto the
//! code.
//!
//! The model is a state machine whose actions interleave freely: writers
//! changing files (and swapping two directories by renames), the marker
//! (the watcher's batches, or an integrated writer's `georep mark`)
//! writing stamps one entry at a time, the crawl reading and shipping one
//! entry at a time, worker crashes at any step, watcher gaps, and slave
//! power losses. Two properties are checked in every reachable state:
//!
//! - **no lost change**: once the master was quiet during a whole crawl
//!   that completed, the slave equals the master;
//! - **stime safety**: a directory's stime never covers a change (a marked
//!   write below it, stamped at or before the stime) that is not durable
//!   on the slave.

pub mod crawl;
pub mod tree;

use crawl::Crawl;
use stateright::{Model, Property};
use tree::{Order, FILES, NODES, ROOT};

/// What keeps xtimes current (the session's `marker` setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Policy {
    /// The built-in watcher, a thread of the worker: batches of events,
    /// gaps, and it dies with the worker; the first crawl of every worker
    /// is a full crawl.
    Auto,
    /// An integrated writer runs `georep mark PATH` after each change
    /// (retrying a mark that was interrupted); no watcher, no gaps.
    Mark,
}

/// The variant of the protocol to check and the bounds of the run.
#[derive(Debug, Clone)]
pub struct Config {
    pub policy: Policy,
    pub order: Order,
    /// The stamp clock persists each stamp it issues before writing it
    /// anywhere (georep's fix); without it, a stamp is `root xtime + 1`
    /// (what a clock stepped back gives) and a marker interrupted before
    /// it reached the root can have its stamp issued again.
    pub reserved_clock: bool,
    /// `georep mark DIR` also records the stamp as the directory's
    /// dirmark, and a visit compares in full every directory whose dirmark
    /// is newer than its stime (georep's fix); without it, a directory
    /// renamed into place keeps the stime it had under its old name, and
    /// its unchanged-looking subtree is never compared with the slave's.
    pub dir_marks: bool,
    /// A visit reads the directory's xtime and lists it through one open
    /// directory, and writes its stime only if the path still names that
    /// directory. georep does not do this (off in [`Config::fixed`]): with
    /// dirmarks and the watcher's walk of directories that move in, the
    /// model finds no loss without it (a directory renamed during its
    /// visit gets the stime of the one listed, but its new name is marked
    /// after the rename, so it is compared again).
    pub pinned_dirs: bool,
    /// Every crawl ends with a barrier, even when no stime moved (georep's
    /// fix); without it, a removal the slave acknowledged (by this crawl,
    /// or by an earlier one that was killed) can be lost by a slave power
    /// loss after a crawl that found nothing left to do completed.
    pub final_barrier: bool,
    /// An xtime crawl compares each file of a directory it visits by size
    /// and mtime (every write changes them), as georep does. Off, the
    /// files stand for subdirectories, which an xtime crawl enters only
    /// when their xtime is newer than the stime: the case where a missed
    /// stamp loses a whole subtree.
    pub quick_check: bool,
    /// Writer operations (writes, deletes, directory swaps) in a run.
    pub writes: u8,
    /// Whether writers may swap the two directories (two renames).
    pub swaps: bool,
    pub worker_crashes: u8,
    pub gaps: u8,
    pub slave_crashes: u8,
}

impl Config {
    /// The protocol as georep implements it now, with short bounds.
    pub fn fixed(policy: Policy) -> Config {
        Config {
            policy,
            order: Order::DeepestFirst,
            reserved_clock: true,
            dir_marks: true,
            pinned_dirs: false,
            final_barrier: true,
            quick_check: true,
            writes: 2,
            swaps: true,
            worker_crashes: 1,
            gaps: 1,
            slave_crashes: 1,
        }
    }
}

/// One master entry, by path. A swap moves entries (inodes) between paths
/// with their xattrs, as rename(2) does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Entry {
    pub xtime: u8,
    pub stime: u8,
    /// Directories: the stamp of the newest `georep mark` of the directory itself.
    pub dirmark: u8,
    /// Files: the content, as the number of the write that made it.
    pub seq: u8,
    pub exists: bool,
    /// The inode: which entry this is, wherever renames put it.
    pub ino: u8,
    /// Ghost: a directory renamed since its stime was written. Its stime
    /// describes the subtree it had under its old name, so it claims
    /// nothing about its new path until a visit writes it again.
    pub moved: bool,
}

/// A slave file (by path).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlaveFile {
    pub seq: u8,
    pub exists: bool,
}

impl SlaveFile {
    /// Whether this is the content `(seq, exists)` (all absences are alike).
    pub fn is(&self, (seq, exists): (u8, bool)) -> bool {
        self.exists == exists && (!exists || self.seq == seq)
    }
}

/// A marker writing one batch's stamp, entry by entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Marking {
    pub stamp: u8,
    pub order: Vec<u8>,
    pub next: u8,
    /// Mark policy: the path being marked (put back if the mark is killed).
    pub batch: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct State {
    pub m: [Entry; NODES],
    /// The reserved clock (the newest stamp issued), kept on the root.
    pub clock: u8,
    /// Per file path: its contents so far, (seq, exists) by path version (ghost).
    pub history: [Vec<(u8, bool)>; 2],
    /// Per file path: (stamp, path version) of each marked change (ghost).
    pub marked: [Vec<(u8, u8)>; 2],
    pub published: [SlaveFile; 2],
    pub durable: [SlaveFile; 2],
    /// The newest write number.
    pub seq: u8,
    pub writes_left: u8,
    pub crashes_left: u8,
    pub gaps_left: u8,
    pub slave_crashes_left: u8,
    /// Changed paths not yet taken by a marker (a bit per node).
    pub pending: u8,
    pub marking: Option<Marking>,
    /// The watcher's gap counter.
    pub gaps: u8,
    /// Gaps when this worker's previous crawl started (None: no crawl yet).
    pub gaps_at_start: Option<u8>,
    /// The previous full crawl did not complete (persisted by the worker).
    pub full_pending: bool,
    pub crawl: Option<Crawl>,
    /// Ghost: a crawl completed while the master was quiet throughout,
    /// and nothing changed since.
    pub converged: bool,
}

pub struct ProtocolModel {
    pub cfg: Config,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    Write(usize),
    Delete(usize),
    SwapDirs,
    /// A marker takes the pending changes and picks a stamp.
    MarkBegin,
    /// The marker writes the next entry's xtime.
    MarkStep,
    Gap,
    WorkerCrash,
    /// Mark policy: a `georep mark` killed mid-way (the writer runs it again).
    MarkerKilled,
    SlaveCrash,
    StartCrawl,
    Crawl(crawl::Step),
}

impl ProtocolModel {
    fn initial(&self) -> State {
        // A steady state: everything synced by a complete full crawl at stamp 1.
        let dir = |n: usize| Entry {
            xtime: 1,
            stime: 1,
            dirmark: 0,
            seq: 0,
            exists: true,
            ino: n as u8,
            moved: false,
        };
        let file = |n: usize, seq: u8| Entry {
            xtime: 1,
            stime: 0,
            dirmark: 0,
            seq,
            exists: true,
            ino: n as u8,
            moved: false,
        };
        let synced = |seq: u8| SlaveFile { seq, exists: true };
        State {
            m: [dir(0), dir(1), dir(2), file(3, 1), file(4, 2)],
            clock: 1,
            history: [vec![(1, true)], vec![(2, true)]],
            marked: [vec![(1, 0)], vec![(1, 0)]],
            published: [synced(1), synced(2)],
            durable: [synced(1), synced(2)],
            seq: 2,
            writes_left: self.cfg.writes,
            crashes_left: self.cfg.worker_crashes,
            gaps_left: self.cfg.gaps,
            slave_crashes_left: self.cfg.slave_crashes,
            pending: 0,
            marking: None,
            gaps: 0,
            gaps_at_start: Some(0),
            full_pending: false,
            crawl: None,
            converged: true,
        }
    }

    /// A writer changed `paths`: the watcher sees it, or the writer marks it.
    fn changed(&self, s: &mut State, paths: u8) {
        s.pending |= paths;
        s.converged = false;
        if let Some(c) = &mut s.crawl {
            c.quiet = false;
        }
    }

    fn begin_marking(&self, s: &mut State) {
        // The Mark policy marks one path per `georep mark`; the watcher takes the whole batch.
        let batch = match self.cfg.policy {
            Policy::Auto => s.pending,
            Policy::Mark => 1 << s.pending.trailing_zeros(),
        };
        s.pending &= !batch;
        let root = s.m[ROOT].xtime;
        let stamp = if self.cfg.reserved_clock {
            s.clock.max(root) + 1
        } else {
            root + 1
        };
        s.clock = s.clock.max(stamp);
        for f in FILES {
            if batch & (1 << f) != 0 {
                let i = tree::file_index(f);
                s.marked[i].push((stamp, s.history[i].len() as u8 - 1));
            }
        }
        let order = tree::stamp_order(batch, |n| s.m[n].exists, self.cfg.order);
        s.marking = Some(Marking {
            stamp,
            order,
            next: 0,
            batch,
        });
    }

    fn mark_step(&self, s: &mut State) {
        let mk = s.marking.as_mut().expect("marking");
        let n = mk.order[mk.next as usize] as usize;
        mk.next += 1;
        let stamp = mk.stamp;
        let dir_mark = self.cfg.policy == Policy::Mark && mk.batch == 1 << n && tree::is_dir(n);
        if mk.next as usize == mk.order.len() {
            s.marking = None;
        }
        // Writing the xattr of a file deleted since fails (ENOENT) and is skipped.
        if s.m[n].exists {
            s.m[n].xtime = stamp;
        }
        // `georep mark DIR` (not the chain above a marked path).
        if self.cfg.dir_marks && dir_mark {
            s.m[n].dirmark = stamp;
        }
    }

    fn worker_crash(&self, s: &mut State) {
        s.crawl = None;
        s.gaps_at_start = None;
        if self.cfg.policy == Policy::Auto {
            // The watcher is a thread of the worker: its events and the
            // marking it was writing die with it.
            s.pending = 0;
            if let Some(mk) = s.marking.take() {
                forget_stamp(s, mk.stamp);
            }
        }
    }
}

/// An interrupted marking did not stamp its changes: they are covered by
/// the retried mark (Mark policy) or the full crawl that follows (Auto).
fn forget_stamp(s: &mut State, stamp: u8) {
    for m in &mut s.marked {
        m.retain(|&(st, _)| st != stamp);
    }
}

/// Whether the slave holds what the master holds, path by path.
pub fn slave_equals_master(s: &State) -> bool {
    FILES
        .iter()
        .all(|&f| s.published[tree::file_index(f)].is((s.m[f].seq, s.m[f].exists)))
}

/// Whether every stime covers only changes that are durable on the slave:
/// for each directory and each file below it, the slave's durable copy is
/// the path's content at the newest marked change the stime covers, or
/// at a later one. A directory whose dirmark is newer than its stime is
/// compared in full by the next visit: its stime claims nothing.
pub fn stimes_safe(cfg: &Config, s: &State) -> bool {
    (0..NODES).filter(|&d| tree::is_dir(d)).all(|d| {
        let e = &s.m[d];
        if e.moved || (cfg.dir_marks && e.dirmark > e.stime) {
            return true;
        }
        FILES.iter().filter(|&&f| tree::below(f, d)).all(|&f| {
            let i = tree::file_index(f);
            let claimed = s.marked[i]
                .iter()
                .filter(|(stamp, _)| *stamp <= e.stime)
                .map(|&(_, pv)| pv as usize)
                .max();
            claimed.is_none_or(|pv| s.history[i][pv..].iter().any(|&c| s.durable[i].is(c)))
        })
    })
}

impl Model for ProtocolModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![self.initial()]
    }

    fn actions(&self, s: &State, out: &mut Vec<Action>) {
        if s.writes_left > 0 {
            for f in FILES {
                out.push(Action::Write(f));
                if s.m[f].exists {
                    out.push(Action::Delete(f));
                }
            }
            if self.cfg.swaps {
                out.push(Action::SwapDirs);
            }
        }
        match &s.marking {
            None if s.pending != 0 => out.push(Action::MarkBegin),
            Some(_) => out.push(Action::MarkStep),
            None => {}
        }
        if self.cfg.policy == Policy::Auto && s.gaps_left > 0 {
            out.push(Action::Gap);
        }
        if s.crashes_left > 0 {
            out.push(Action::WorkerCrash);
            if self.cfg.policy == Policy::Mark && s.marking.is_some() {
                out.push(Action::MarkerKilled);
            }
        }
        if s.slave_crashes_left > 0 {
            out.push(Action::SlaveCrash);
        }
        match &s.crawl {
            None => out.push(Action::StartCrawl),
            Some(c) => crawl::steps(&self.cfg, s, c, out),
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::Write(f) | Action::Delete(f) => {
                s.writes_left -= 1;
                s.seq += 1;
                s.m[f].seq = s.seq;
                s.m[f].exists = matches!(action, Action::Write(_));
                let (seq, exists) = (s.m[f].seq, s.m[f].exists);
                s.history[tree::file_index(f)].push((seq, exists));
                self.changed(&mut s, 1 << f);
            }
            Action::SwapDirs => {
                // mv c1 t; mv c2 c1; mv t c2: entries move with their xattrs.
                s.writes_left -= 1;
                s.m.swap(tree::C1, tree::C2);
                s.m[tree::C1].moved = true;
                s.m[tree::C2].moved = true;
                // Change records are about the content at a path: after a
                // rename the path's lineage starts again (renames are
                // covered end to end by "no lost change").
                s.marked = [Vec::new(), Vec::new()];
                s.m.swap(tree::F1, tree::F2);
                for f in tree::FILES {
                    let (seq, exists) = (s.m[f].seq, s.m[f].exists);
                    s.history[tree::file_index(f)].push((seq, exists));
                }
                // The watcher walks directories that moved in and stamps
                // all they hold; a writer marks the two paths it renamed.
                let paths = match self.cfg.policy {
                    Policy::Auto => {
                        (1 << tree::C1) | (1 << tree::C2) | (1 << tree::F1) | (1 << tree::F2)
                    }
                    Policy::Mark => (1 << tree::C1) | (1 << tree::C2),
                };
                self.changed(&mut s, paths);
            }
            Action::MarkBegin => self.begin_marking(&mut s),
            Action::MarkStep => self.mark_step(&mut s),
            Action::Gap => {
                // Events were lost (queue overflow): the next crawl is full.
                s.gaps_left -= 1;
                s.gaps += 1;
                s.pending = 0;
            }
            Action::WorkerCrash => {
                s.crashes_left -= 1;
                self.worker_crash(&mut s);
            }
            Action::MarkerKilled => {
                s.crashes_left -= 1;
                let mk = s.marking.take().expect("marking");
                s.pending |= mk.batch;
                forget_stamp(&mut s, mk.stamp);
            }
            Action::SlaveCrash => {
                // Power loss: the slave keeps what was durable; the
                // connection is lost and the crawl ends (the worker and
                // its watcher go on and reconnect).
                s.slave_crashes_left -= 1;
                s.published = s.durable;
                s.crawl = None;
            }
            Action::StartCrawl => crawl::start(&self.cfg, &mut s),
            Action::Crawl(step) => crawl::apply(&self.cfg, &mut s, step),
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("no lost change", |_, s: &State| {
                !s.converged || slave_equals_master(s)
            }),
            Property::always("stime safety", |m: &ProtocolModel, s: &State| {
                stimes_safe(&m.cfg, s)
            }),
            // Sanity: the checker does reach converged states after changes.
            Property::sometimes("converges after a change", |_, s: &State| {
                s.converged && s.writes_left == 0
            }),
        ]
    }
}
