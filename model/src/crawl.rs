//! The crawl, one master read or slave operation per step, as
//! `src/engine/crawl/mod.rs` does it (sequentially here: see
//! docs/model.md for what that leaves out).
//!
//! visit(dir): read xtime then stime; prune when an xtime crawl finds
//! xtime <= stime; list the children (each read separately, as readdir
//! and the per-entry xattr reads are); remove, ship or descend; when all
//! succeeded queue (dir, xtime read first) as the new stime. At the end
//! (or mid-crawl, when the queue is flushed early): a barrier makes the
//! slave durable, then the stimes are written one by one.

use crate::tree::{self, NODES, ROOT};
use crate::{Config, Policy, SlaveFile, State};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Full,
    Xtime,
}

/// A child as the listing saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Listed {
    pub xtime: u8,
    pub exists: bool,
    pub seq: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Read the directory's xtime and stime.
    Enter,
    /// List child i.
    List(u8),
    /// Act on child i.
    Act(u8),
    /// All children done: queue the stime and return.
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Frame {
    pub dir: u8,
    /// The directory's inode when its xtime was read.
    pub ino: u8,
    pub kind: Kind,
    pub phase: Phase,
    pub xtl: u8,
    pub stime: u8,
    pub listed: Vec<Listed>,
    pub ok: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Crawl {
    pub kind: Kind,
    pub frames: Vec<Frame>,
    /// Completed directories (path, new stime, inode), not yet written.
    pub queue: Vec<(u8, u8, u8)>,
    /// Stimes of the final flush still to write (after its barrier).
    pub writing: Option<Vec<(u8, u8, u8)>>,
    pub ok: bool,
    /// Ghost: nothing was pending or being marked at the start, and no writer acted since.
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// The next step of the innermost directory.
    Visit,
    /// Flush the stime queue mid-crawl: barrier, then write them.
    FlushEarly,
    /// Final flush: the barrier.
    Barrier,
    /// Final flush: write the next stime.
    WriteStime,
    Finish,
}

fn frame(dir: usize, kind: Kind) -> Frame {
    Frame {
        dir: dir as u8,
        ino: u8::MAX,
        kind,
        phase: Phase::Enter,
        xtl: 0,
        stime: 0,
        listed: Vec::new(),
        ok: true,
    }
}

/// A crawl starts: full unless continuity since the previous one is proven.
pub fn start(cfg: &Config, s: &mut State) {
    let gap = cfg.policy == Policy::Auto && s.gaps_at_start != Some(s.gaps);
    let worker_new = s.gaps_at_start.is_none();
    let kind = if s.full_pending || gap || (cfg.policy == Policy::Auto && worker_new) {
        Kind::Full
    } else {
        Kind::Xtime
    };
    s.gaps_at_start = Some(s.gaps);
    if kind == Kind::Full {
        s.full_pending = true;
    }
    s.crawl = Some(Crawl {
        kind,
        frames: vec![frame(ROOT, kind)],
        queue: Vec::new(),
        writing: None,
        ok: true,
        quiet: s.pending == 0 && s.marking.is_none(),
    });
}

pub fn steps(_cfg: &Config, _s: &State, c: &Crawl, out: &mut Vec<crate::Action>) {
    use crate::Action::Crawl as A;
    if !c.frames.is_empty() {
        out.push(A(Step::Visit));
        if !c.queue.is_empty() {
            out.push(A(Step::FlushEarly));
        }
    } else {
        match &c.writing {
            None => out.push(A(Step::Barrier)),
            Some(w) if !w.is_empty() => out.push(A(Step::WriteStime)),
            Some(_) => out.push(A(Step::Finish)),
        }
    }
}

fn write_stime(cfg: &Config, s: &mut State, (dir, stamp, ino): (u8, u8, u8)) {
    let e = &mut s.m[dir as usize];
    if cfg.pinned_dirs && e.ino != ino {
        return; // another directory is at this path now: not the one listed
    }
    e.stime = stamp;
    e.moved = false;
}

pub fn apply(cfg: &Config, s: &mut State, step: Step) {
    let mut c = s.crawl.take().expect("crawl");
    match step {
        Step::Visit => visit_step(cfg, s, &mut c),
        Step::FlushEarly => {
            s.durable = s.published;
            for q in std::mem::take(&mut c.queue) {
                write_stime(cfg, s, q);
            }
        }
        Step::Barrier => {
            if !c.queue.is_empty() || cfg.final_barrier {
                s.durable = s.published;
            }
            c.writing = Some(std::mem::take(&mut c.queue));
        }
        Step::WriteStime => {
            let w = c.writing.as_mut().expect("writing");
            let q = w.remove(0);
            write_stime(cfg, s, q);
        }
        Step::Finish => {
            if c.ok && c.kind == Kind::Full {
                s.full_pending = false;
            }
            if c.ok && c.quiet {
                s.converged = true;
            }
            return; // the crawl is over
        }
    }
    s.crawl = Some(c);
}

fn visit_step(cfg: &Config, s: &mut State, c: &mut Crawl) {
    let f = c.frames.last_mut().expect("frame");
    let dir = f.dir as usize;
    let kids = tree::children(dir);
    match f.phase {
        Phase::Enter => {
            let e = &s.m[dir];
            f.ino = e.ino;
            f.xtl = e.xtime;
            f.stime = e.stime;
            if cfg.dir_marks && e.dirmark > e.stime {
                // Marked as a whole (renamed into place): compare it all.
                f.kind = Kind::Full;
            }
            // The root always exists on the slave; so do the directories
            // (the model never removes them).
            if f.kind == Kind::Xtime && f.xtl <= f.stime {
                c.frames.pop();
                return;
            }
            f.phase = Phase::List(0);
        }
        Phase::List(i) => {
            // Pinned: the children of the directory whose xtime was read,
            // wherever it is now; else whatever the path holds now.
            let at = match (cfg.pinned_dirs, (0..NODES).find(|&n| s.m[n].ino == f.ino)) {
                (true, Some(at)) => at,
                _ => dir,
            };
            let n = tree::children(at)[i as usize];
            let e = &s.m[n];
            f.listed.push(Listed {
                xtime: e.xtime,
                exists: e.exists,
                seq: e.seq,
            });
            f.phase = if i as usize + 1 == kids.len() {
                Phase::Act(0)
            } else {
                Phase::List(i + 1)
            };
        }
        Phase::Act(i) => {
            let n = kids[i as usize];
            let l = f.listed[i as usize];
            let (kind, stime) = (f.kind, f.stime);
            f.phase = if i as usize + 1 == kids.len() {
                Phase::Done
            } else {
                Phase::Act(i + 1)
            };
            if tree::is_dir(n) {
                if kind == Kind::Full || l.xtime > stime {
                    c.frames.push(frame(n, kind));
                }
                return;
            }
            let fi = tree::file_index(n);
            let slave = s.published[fi];
            if !l.exists {
                if slave.exists {
                    s.published[fi] = SlaveFile {
                        seq: l.seq,
                        exists: false,
                    };
                }
                return;
            }
            // Both kinds compare by stat (size and mtime: every write
            // changes them); an xtime crawl also ships a marked file.
            // (Without `quick_check` the file stands for a subdirectory,
            // which an xtime crawl enters only when it is marked.)
            let ship = !slave.exists
                || (slave.seq != l.seq && (cfg.quick_check || kind == Kind::Full))
                || (kind == Kind::Xtime && l.xtime > stime);
            if ship {
                let e = &s.m[n];
                if !e.exists {
                    // Vanished since listed: this directory is incomplete.
                    f.ok = false;
                    return;
                }
                // Read whole (a torn read is refused), committed: durable.
                let shipped = SlaveFile {
                    seq: e.seq,
                    exists: true,
                };
                s.published[fi] = shipped;
                s.durable[fi] = shipped;
            }
        }
        Phase::Done => {
            let done = c.frames.pop().expect("frame");
            if done.ok && done.xtl > done.stime {
                c.queue.push((done.dir, done.xtl, done.ino));
            }
            match c.frames.last_mut() {
                Some(parent) => parent.ok &= done.ok,
                None => c.ok = done.ok,
            }
        }
    }
}
