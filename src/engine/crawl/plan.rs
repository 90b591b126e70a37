//! The pure part of the crawl: given one directory's master and slave
//! listings and its stime, decide what to remove, create, ship and descend
//! into. No I/O here, so every rule is tested with plain data.

use crate::engine::context::CrawlKind;
use crate::engine::master::MEntry;
use crate::fs::meta::{Entry, Kind};

/// What to do with one master entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create the directory on the slave, then visit it (the slave side is empty).
    CreateDir,
    /// Visit the existing slave directory.
    Visit,
    /// Ship file content; `basis` when the slave has a regular file there.
    Ship { basis: bool },
    /// Ship a new file diffed against slave file `from` of the same
    /// directory and size, removed afterwards (a rename: usually nothing
    /// but metadata travels).
    Moved { from: Vec<u8> },
    /// (Re)create the symlink.
    Symlink,
    /// Only metadata differs.
    Meta,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DirPlan {
    /// Slave names to remove first (absent on the master, or of another type).
    pub remove: Vec<Vec<u8>>,
    /// Slave names to remove after the actions: the sources of `Moved`.
    pub remove_after: Vec<Vec<u8>>,
    /// Master entries (by index into the master listing) and what to do.
    pub actions: Vec<(usize, Action)>,
    /// Master entries that are not replicated (FIFOs, sockets, devices, reserved names).
    pub skipped: Vec<usize>,
}

fn same_kind(m: Kind, s: Kind) -> bool {
    m == s && m != Kind::Other
}

/// Whether file content may be assumed equal without reading it (rsync's quick check).
pub fn quick_equal(m: &Entry, s: &Entry) -> bool {
    m.size == s.size && m.meta.mtime == s.meta.mtime
}

/// Whether the replicated metadata of two same-kind entries differs. A
/// symlink's mode and xattrs are not replicated (Linux gives it none).
pub fn meta_differs(m: &Entry, s: &Entry) -> bool {
    let (a, b) = (&m.meta, &s.meta);
    if m.kind == Kind::Symlink {
        return a.uid != b.uid || a.gid != b.gid || a.mtime != b.mtime;
    }
    a.mode != b.mode
        || a.uid != b.uid
        || a.gid != b.gid
        || a.xattrs != b.xattrs
        || (m.kind == Kind::File && a.mtime != b.mtime)
}

/// Plans one directory. `slave` is `None` when the slave directory was
/// just created (so it is empty). `stime` is the directory's stime.
pub fn plan_dir(
    kind: CrawlKind,
    master: &[MEntry],
    slave: Option<&[Entry]>,
    stime: u64,
    reserved: impl Fn(&[u8]) -> bool,
) -> DirPlan {
    let mut plan = DirPlan::default();
    let empty: &[Entry] = &[];
    let slave = slave.unwrap_or(empty);
    // Both listings are sorted by name: merge them.
    let (mut i, mut j) = (0, 0);
    while i < master.len() || j < slave.len() {
        let ord = match (master.get(i), slave.get(j)) {
            (Some(m), Some(s)) => m.entry.name.cmp(&s.name),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, _) => std::cmp::Ordering::Greater,
        };
        match ord {
            std::cmp::Ordering::Greater => {
                plan.remove.push(slave[j].name.to_vec());
                j += 1;
            }
            std::cmp::Ordering::Less => {
                plan_entry(&mut plan, kind, i, &master[i], None, stime, &reserved);
                i += 1;
            }
            std::cmp::Ordering::Equal => {
                let (m, s) = (&master[i], &slave[j]);
                if !same_kind(m.entry.kind, s.kind) || reserved(&m.entry.name) {
                    plan.remove.push(s.name.to_vec());
                    plan_entry(&mut plan, kind, i, m, None, stime, &reserved);
                } else {
                    plan_entry(&mut plan, kind, i, m, Some(s), stime, &reserved);
                }
                i += 1;
                j += 1;
            }
        }
    }
    pair_moves(&mut plan, master, slave);
    plan
}

/// New files smaller than this are sent whole rather than looked for
/// among the removed ones (see `Action::Moved`).
const MOVE_MIN: u64 = 256;

/// Turns new single-link files that have the size of a removed slave file
/// into `Moved` from it (each removed file is the source of one at most):
/// a file renamed within a directory then costs its digest, not its data.
fn pair_moves(plan: &mut DirPlan, master: &[MEntry], slave: &[Entry]) {
    let mut sources: Vec<(u64, Vec<u8>)> = plan
        .remove
        .iter()
        .filter_map(|name| {
            let s = slave
                .binary_search_by(|e| e.name.as_slice().cmp(name))
                .ok()
                .map(|i| &slave[i])?;
            (s.kind == Kind::File && s.nlink == 1 && s.size >= MOVE_MIN)
                .then(|| (s.size, name.clone()))
        })
        .collect();
    if sources.is_empty() {
        return;
    }
    for (i, action) in plan.actions.iter_mut() {
        let m = &master[*i].entry;
        if *action != (Action::Ship { basis: false }) || m.nlink != 1 || m.size < MOVE_MIN {
            continue;
        }
        if let Some(k) = sources.iter().position(|(size, _)| *size == m.size) {
            let (_, from) = sources.swap_remove(k);
            plan.remove.retain(|n| *n != from);
            plan.remove_after.push(from.clone());
            *action = Action::Moved { from };
        }
    }
}

fn plan_entry(
    plan: &mut DirPlan,
    kind: CrawlKind,
    i: usize,
    m: &MEntry,
    s: Option<&Entry>,
    stime: u64,
    reserved: &impl Fn(&[u8]) -> bool,
) {
    if m.entry.kind == Kind::Other || reserved(&m.entry.name) {
        plan.skipped.push(i);
        return;
    }
    let changed = kind == CrawlKind::Full || m.xtime > stime;
    let action = match (m.entry.kind, s) {
        (Kind::Dir, None) => Some(Action::CreateDir),
        (Kind::Dir, Some(_)) => changed.then_some(Action::Visit),
        (Kind::File, None) => Some(Action::Ship { basis: false }),
        (Kind::File, Some(s)) => {
            // A marked file is compared by content (hashes); an unmarked one
            // by size and mtime, so an unmarked writer is still caught here.
            // A link count that differs means a hard link to (re)make.
            if (kind == CrawlKind::Xtime && m.xtime > stime)
                || !quick_equal(&m.entry, s)
                || m.entry.nlink != s.nlink
            {
                Some(Action::Ship { basis: true })
            } else if meta_differs(&m.entry, s) {
                Some(Action::Meta)
            } else {
                None
            }
        }
        (Kind::Symlink, None) => Some(Action::Symlink),
        (Kind::Symlink, Some(s)) => {
            if s.target != m.entry.target {
                Some(Action::Symlink)
            } else if meta_differs(&m.entry, s) {
                Some(Action::Meta)
            } else {
                None
            }
        }
        (Kind::Other, _) => unreachable!(),
    };
    if let Some(a) = action {
        plan.actions.push((i, a));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::meta::{Meta, Timestamp};
    use serde_bytes::ByteBuf;

    fn e(name: &str, kind: Kind, size: u64, mtime: i64) -> Entry {
        Entry {
            name: ByteBuf::from(name.as_bytes().to_vec()),
            kind,
            size,
            meta: Meta {
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime: Timestamp {
                    sec: mtime,
                    nsec: 0,
                },
                xattrs: vec![],
            },
            dev: 1,
            ino: 1,
            nlink: 1,
            target: (kind == Kind::Symlink).then(|| ByteBuf::from(b"t".to_vec())),
        }
    }

    fn m(name: &str, kind: Kind, size: u64, mtime: i64, xtime: u64) -> MEntry {
        MEntry {
            entry: e(name, kind, size, mtime),
            xtime,
        }
    }

    fn none(_: &[u8]) -> bool {
        false
    }

    #[test]
    fn xtime_crawl_ships_only_marked_or_differing() {
        let master = [
            m("a", Kind::File, 1, 1, 5),  // unmarked, equal
            m("b", Kind::File, 1, 1, 20), // marked
            m("c", Kind::File, 2, 1, 5),  // unmarked but differs from the slave
            m("d", Kind::Dir, 0, 1, 5),   // unmarked dir
            m("e", Kind::Dir, 0, 1, 20),  // marked dir
            m("f", Kind::File, 1, 1, 0),  // never marked, new on the slave
        ];
        let slave = [
            e("a", Kind::File, 1, 1),
            e("b", Kind::File, 1, 1),
            e("c", Kind::File, 1, 1),
            e("d", Kind::Dir, 0, 1),
            e("e", Kind::Dir, 0, 1),
            e("z", Kind::File, 1, 1),
        ];
        let p = plan_dir(CrawlKind::Xtime, &master, Some(&slave), 10, none);
        assert_eq!(p.remove, vec![b"z".to_vec()]);
        assert_eq!(
            p.actions,
            vec![
                (1, Action::Ship { basis: true }),
                (2, Action::Ship { basis: true }),
                (4, Action::Visit),
                (5, Action::Ship { basis: false })
            ]
        );
    }

    #[test]
    fn full_crawl_compares_everything() {
        let master = [m("a", Kind::File, 1, 1, 0), m("d", Kind::Dir, 0, 1, 0)];
        let mut sa = e("a", Kind::File, 1, 1);
        sa.meta.mode = 0o600;
        let slave = [sa, e("d", Kind::Dir, 0, 1)];
        let p = plan_dir(CrawlKind::Full, &master, Some(&slave), 10, none);
        assert_eq!(p.actions, vec![(0, Action::Meta), (1, Action::Visit)]);
        let p = plan_dir(CrawlKind::Xtime, &master, Some(&slave), 10, none);
        assert_eq!(
            p.actions,
            vec![(0, Action::Meta)],
            "unmarked dir is pruned, visible meta drift still fixed"
        );
    }

    #[test]
    fn type_changes_remove_then_create() {
        let master = [
            m("x", Kind::Dir, 0, 1, 20),
            m("y", Kind::Symlink, 0, 1, 0),
            m("p", Kind::Other, 0, 1, 0),
        ];
        let slave = [
            e("p", Kind::File, 0, 1),
            e("x", Kind::File, 3, 1),
            e("y", Kind::Dir, 0, 1),
        ];
        let p = plan_dir(CrawlKind::Xtime, &master, Some(&slave), 10, none);
        assert_eq!(p.remove, vec![b"p".to_vec(), b"x".to_vec(), b"y".to_vec()]);
        assert_eq!(
            p.actions,
            vec![(0, Action::CreateDir), (1, Action::Symlink)]
        );
        assert_eq!(p.skipped, vec![2]);
    }

    #[test]
    fn new_directory_gets_everything_and_reserved_names_are_skipped() {
        let master = [
            m(".georep-tmp-x", Kind::File, 1, 1, 0),
            m("b", Kind::File, 1, 1, 0),
            m("s", Kind::Symlink, 0, 1, 0),
        ];
        let p = plan_dir(CrawlKind::Xtime, &master, None, 0, |n| {
            n.starts_with(b".georep-tmp-")
        });
        assert_eq!(
            p.actions,
            vec![(1, Action::Ship { basis: false }), (2, Action::Symlink)]
        );
        assert_eq!(p.skipped, vec![0]);
    }

    #[test]
    fn link_count_mismatch_reships_through_the_link_logic() {
        let mut a = m("a", Kind::File, 1, 1, 0);
        a.entry.nlink = 2;
        let p = plan_dir(
            CrawlKind::Xtime,
            &[a],
            Some(&[e("a", Kind::File, 1, 1)]),
            10,
            none,
        );
        assert_eq!(p.actions, vec![(0, Action::Ship { basis: true })]);
    }

    #[test]
    fn a_rename_in_a_directory_ships_from_the_old_name() {
        let master = [
            m("new", Kind::File, 5000, 2, 20),
            m("other", Kind::File, 7000, 2, 20),
            m("tiny", Kind::File, 10, 2, 20),
        ];
        let slave = [
            e("old", Kind::File, 5000, 1),
            e("small", Kind::File, 10, 1),
            e("x", Kind::Dir, 5000, 1),
        ];
        let p = plan_dir(CrawlKind::Xtime, &master, Some(&slave), 10, none);
        assert_eq!(
            p.actions,
            vec![
                (
                    0,
                    Action::Moved {
                        from: b"old".to_vec()
                    }
                ),
                (1, Action::Ship { basis: false }),
                (2, Action::Ship { basis: false }),
            ]
        );
        assert_eq!(p.remove_after, vec![b"old".to_vec()]);
        assert_eq!(p.remove, vec![b"small".to_vec(), b"x".to_vec()]);
    }

    #[test]
    fn symlink_target_change_is_recreated() {
        let master = [m("s", Kind::Symlink, 0, 1, 0)];
        let mut s = e("s", Kind::Symlink, 0, 1);
        s.target = Some(ByteBuf::from(b"other".to_vec()));
        let p = plan_dir(CrawlKind::Xtime, &master, Some(&[s]), 10, none);
        assert_eq!(p.actions, vec![(0, Action::Symlink)]);
    }
}
