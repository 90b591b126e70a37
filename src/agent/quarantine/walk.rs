//! What a quarantine walk takes from one directory of the old master: pure
//! planning over the old master's entries and the new master's listing.
//!
//! The rule is the crawl's, read backwards. An stime says what the replica
//! received; an entry stamped after the newest stime above it changed
//! after the last common point. A directory whose dirmark is newer than
//! its own stime was renamed into place or marked whole after its last
//! complete visit: its stimes (and the xtimes below it) describe another
//! name, so its subtree is compared with the new master entry by entry
//! (the crawl compares it in full for the same reason). Whatever of the old
//! master differs from the new master's current version and is not proven
//! common is taken: a version equal to the new master's cannot be lost.

use crate::fs::meta::{Kind, Timestamp};
use crate::protocol::PeerEntry;

/// How a directory is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Entries stamped at or before `eff` (the newest stime above and at the
    /// directory) are the common version unless the new master's differs
    /// and is unchanged since the promote.
    Stamped { eff: u64 },
    /// Below a dirmark newer than the stime: stimes prove nothing; an
    /// entry is taken when it differs from the new master's, when the new
    /// master changed it, or when it is stamped after `eff` (the proven
    /// stime above the marked directory).
    Full { eff: u64 },
    /// The new master has no such directory: everything is taken.
    Whole,
}

impl Mode {
    /// The mode of a directory entered from a parent in `self`, given its
    /// own stime and dirmark (read only in `Stamped`).
    pub fn enter(self, stime: u64, dirmark: u64) -> Mode {
        match self {
            Mode::Stamped { eff } if dirmark > stime => Mode::Full { eff },
            Mode::Stamped { eff } => Mode::Stamped {
                eff: eff.max(stime),
            },
            other => other,
        }
    }

    fn eff(self) -> u64 {
        match self {
            Mode::Stamped { eff } | Mode::Full { eff } => eff,
            Mode::Whole => 0,
        }
    }
}

/// An entry of the old master as the walk sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    pub name: Vec<u8>,
    pub kind: Kind,
    pub size: u64,
    pub mtime: Timestamp,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub target: Option<Vec<u8>>,
    /// Its xtime (0: never stamped; symlinks carry none).
    pub xtime: u64,
}

/// What to do with one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Copy it into the quarantine (a file or a symlink).
    Take,
    /// A directory both hold: ask the new master for its listing, then
    /// visit it in this mode (its own stamps still to be read).
    Ask(Mode),
    /// A directory the new master lacks (or holds as another type): take all of it.
    Whole,
    /// Nothing of it can be lost.
    Skip,
}

/// Whether the new master's version of `l` is another one than the old
/// master's, by what a listing shows (content by size and mtime, like the
/// crawl's quick check).
fn differs(l: &Local, b: &PeerEntry) -> bool {
    if b.kind != l.kind {
        return true;
    }
    let meta = b.mtime != l.mtime || (b.uid, b.gid) != (l.uid, l.gid);
    match l.kind {
        Kind::Symlink => meta || b.target.as_deref().map(|t| t.as_slice()) != l.target.as_deref(),
        Kind::File => meta || b.size != l.size || b.mode & 0o7777 != l.mode & 0o7777,
        _ => false,
    }
}

/// Decides each of `local` (one directory, in `mode`) against the new
/// master's listing `peer` (sorted by name; empty in `Whole`).
pub fn plan(mode: Mode, local: &[Local], peer: &[PeerEntry]) -> Vec<Decision> {
    let find = |n: &[u8]| {
        peer.binary_search_by(|e| e.name.as_slice().cmp(n))
            .ok()
            .map(|i| &peer[i])
    };
    local
        .iter()
        .map(|l| {
            if mode == Mode::Whole {
                return match l.kind {
                    Kind::Dir => Decision::Whole,
                    Kind::File | Kind::Symlink => Decision::Take,
                    Kind::Other => Decision::Skip,
                };
            }
            let b = find(&l.name);
            let stamped = l.xtime > mode.eff();
            match l.kind {
                Kind::Other => Decision::Skip,
                Kind::Dir => match b {
                    Some(b) if b.kind == Kind::Dir => match mode {
                        Mode::Full { .. } => Decision::Ask(mode),
                        _ if stamped => Decision::Ask(mode),
                        _ => Decision::Skip,
                    },
                    _ => Decision::Whole,
                },
                // Symlinks carry no stamp: any difference may be the old
                // master's own (a conflict if the new master changed it too).
                Kind::Symlink => match b {
                    Some(b) if !differs(l, b) => Decision::Skip,
                    _ => Decision::Take,
                },
                Kind::File => {
                    let take = match b {
                        None => true,
                        Some(b) if b.kind != Kind::File => true,
                        Some(b) => {
                            let d = differs(l, b);
                            match mode {
                                Mode::Full { .. } => d || b.changed || stamped,
                                _ => (d && !b.changed) || stamped,
                            }
                        }
                    };
                    if take {
                        Decision::Take
                    } else {
                        Decision::Skip
                    }
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_bytes::ByteBuf;

    fn ts(sec: i64) -> Timestamp {
        Timestamp { sec, nsec: 0 }
    }

    fn local(name: &str, kind: Kind, xtime: u64) -> Local {
        Local {
            name: name.as_bytes().to_vec(),
            kind,
            size: 10,
            mtime: ts(100),
            mode: 0o644,
            uid: 0,
            gid: 0,
            target: (kind == Kind::Symlink).then(|| b"t".to_vec()),
            xtime,
        }
    }

    fn peer_of(l: &Local, changed: bool) -> PeerEntry {
        PeerEntry {
            name: ByteBuf::from(l.name.clone()),
            kind: l.kind,
            size: l.size,
            mtime: l.mtime,
            target: l.target.clone().map(ByteBuf::from),
            changed,
            mode: l.mode,
            uid: l.uid,
            gid: l.gid,
        }
    }

    #[test]
    fn a_dirmark_newer_than_the_stime_compares_the_subtree_in_full() {
        let m = Mode::Stamped { eff: 50 };
        assert_eq!(m.enter(40, 0), Mode::Stamped { eff: 50 });
        assert_eq!(m.enter(60, 55), Mode::Stamped { eff: 60 });
        assert_eq!(m.enter(60, 70), Mode::Full { eff: 50 });
        assert_eq!(Mode::Full { eff: 50 }.enter(99, 0), Mode::Full { eff: 50 });
        assert_eq!(Mode::Whole.enter(99, 100), Mode::Whole);
    }

    #[test]
    fn an_unstamped_file_the_new_master_changed_is_taken_under_a_dirmark_only() {
        // A directory made on both sides (a file turned into one, say): the
        // entry inside was never stamped, the new master's copy is its own.
        let mut a = local("inside", Kind::File, 0);
        let mut b = peer_of(&a, true);
        b.mtime = ts(200);
        assert_eq!(
            plan(
                Mode::Stamped { eff: 50 },
                std::slice::from_ref(&a),
                &[b.clone()]
            ),
            [Decision::Skip]
        );
        assert_eq!(
            plan(
                Mode::Full { eff: 50 },
                std::slice::from_ref(&a),
                &[b.clone()]
            ),
            [Decision::Take]
        );
        // Equal and unchanged there: nothing can be lost, whatever the mode.
        let same = peer_of(&a, false);
        assert_eq!(
            plan(Mode::Full { eff: 50 }, std::slice::from_ref(&a), &[same]),
            [Decision::Skip]
        );
        // Stamped after the common point: taken in both modes.
        a.xtime = 60;
        assert_eq!(
            plan(
                Mode::Stamped { eff: 50 },
                std::slice::from_ref(&a),
                &[b.clone()]
            ),
            [Decision::Take]
        );
        assert_eq!(plan(Mode::Full { eff: 50 }, &[a], &[b]), [Decision::Take]);
    }

    #[test]
    fn symlinks_are_compared_by_target_mtime_and_owner() {
        let a = local("l", Kind::Symlink, 0);
        let m = Mode::Stamped { eff: 50 };
        assert_eq!(
            plan(m, std::slice::from_ref(&a), &[peer_of(&a, false)]),
            [Decision::Skip]
        );
        let mut b = peer_of(&a, false);
        b.mtime = ts(7);
        assert_eq!(plan(m, std::slice::from_ref(&a), &[b]), [Decision::Take]);
        let mut b = peer_of(&a, false);
        b.uid = 1000;
        assert_eq!(plan(m, std::slice::from_ref(&a), &[b]), [Decision::Take]);
        let mut b = peer_of(&a, false);
        b.target = Some(ByteBuf::from(b"u".to_vec()));
        assert_eq!(plan(m, std::slice::from_ref(&a), &[b]), [Decision::Take]);
        assert_eq!(plan(m, &[a], &[]), [Decision::Take]);
    }

    #[test]
    fn files_differing_in_mode_or_owner_from_an_unchanged_peer_are_taken() {
        let a = local("f", Kind::File, 10);
        let m = Mode::Stamped { eff: 50 };
        let mut b = peer_of(&a, false);
        b.mode = 0o600;
        assert_eq!(
            plan(m, std::slice::from_ref(&a), &[b.clone()]),
            [Decision::Take]
        );
        // Changed there too and not stamped here: the new master's own change.
        b.changed = true;
        assert_eq!(plan(m, &[a], &[b]), [Decision::Skip]);
    }

    #[test]
    fn directories_are_asked_when_stamped_or_compared_in_full_and_taken_whole_when_absent() {
        let old = local("d", Kind::Dir, 10);
        let new = local("e", Kind::Dir, 60);
        let peer = [peer_of(&old, false), peer_of(&new, false)];
        let m = Mode::Stamped { eff: 50 };
        assert_eq!(
            plan(m, &[old.clone(), new.clone()], &peer),
            [Decision::Skip, Decision::Ask(m)]
        );
        let f = Mode::Full { eff: 50 };
        assert_eq!(
            plan(f, &[old.clone(), new.clone()], &peer),
            [Decision::Ask(f), Decision::Ask(f)]
        );
        let mut as_file = peer_of(&old, false);
        as_file.kind = Kind::File;
        assert_eq!(
            plan(m, std::slice::from_ref(&old), &[as_file]),
            [Decision::Whole]
        );
        assert_eq!(plan(m, std::slice::from_ref(&old), &[]), [Decision::Whole]);
        assert_eq!(
            plan(Mode::Whole, &[old, local("f", Kind::File, 0)], &[]),
            [Decision::Whole, Decision::Take]
        );
    }
}
