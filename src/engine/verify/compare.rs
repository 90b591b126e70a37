//! The pure part of verification: the differences between the master's
//! and the slave's items of one range, and the byte ranges of differing
//! blocks. No I/O, so every rule is tested with plain data.

use crate::fs::meta::{Kind, Meta};
use crate::fs::relpath::RelPath;
use crate::hash::blocktree::BLOCK;
use crate::hash::digest::WINDOW;
use crate::hash::stream::{self, Item};
use crate::protocol::{Hash16, Hash32};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::cmp::Ordering;

/// What differs at one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum What {
    /// On the master, not on the slave.
    Missing,
    /// On the slave, not on the master.
    Extra,
    /// Another type on each side.
    Type,
    /// Same size, bytes differ (see `ranges`).
    Content,
    /// Sizes differ (`ranges`: the bytes only one side has, and any below that differ).
    Size,
    /// Mode, owner, mtime or xattrs (see `fields`).
    Metadata,
    /// A symlink pointing elsewhere.
    Target,
}

impl What {
    pub fn as_str(self) -> &'static str {
        match self {
            What::Missing => "missing",
            What::Extra => "extra",
            What::Type => "type",
            What::Content => "content",
            What::Size => "size",
            What::Metadata => "metadata",
            What::Target => "target",
        }
    }
}

/// One difference found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub path: RelPath,
    pub what: What,
    /// The entry's kind on the master (on the slave for an extra entry).
    pub kind: Kind,
    /// Byte ranges `[start, end)` that differ, once blocks were compared
    /// (before that, whole windows).
    pub ranges: Vec<(u64, u64)>,
    /// Metadata that differs: `mode`, `owner`, `mtime`, `xattrs`.
    pub fields: Vec<String>,
    /// Entries below a missing or extra directory (reported once, at the top).
    pub below: u64,
    /// Sizes on each side, for files.
    pub master_size: Option<u64>,
    pub slave_size: Option<u64>,
    /// Windows whose hashes differ, still to be compared block by block.
    #[serde(skip)]
    pub windows: Vec<u64>,
}

impl Finding {
    fn new(path: &RelPath, what: What, kind: Kind) -> Finding {
        Finding {
            path: path.clone(),
            what,
            kind,
            ranges: Vec::new(),
            fields: Vec::new(),
            below: 0,
            master_size: None,
            slave_size: None,
            windows: Vec::new(),
        }
    }
}

/// Subtrees already reported as missing or extra, carried from range to
/// range so that what lies below them is counted, not reported again.
#[derive(Debug, Default, Clone)]
pub struct Fold {
    /// The top of the subtree and, if found by this call of [`diff`], its
    /// index in that call's output.
    missing: Option<(RelPath, Option<usize>)>,
    extra: Option<(RelPath, Option<usize>)>,
    /// Entries counted below tops found by earlier calls.
    carried: Vec<(RelPath, u64)>,
}

impl Fold {
    /// Entries found below subtrees reported by earlier calls, per subtree.
    pub fn carried(&mut self) -> Vec<(RelPath, u64)> {
        std::mem::take(&mut self.carried)
    }
}

/// Counts `path` under the subtree `top` if it lies below it.
fn fold_into(
    top: &Option<(RelPath, Option<usize>)>,
    carried: &mut Vec<(RelPath, u64)>,
    path: &RelPath,
    out: &mut [Finding],
) -> bool {
    let Some((top, at)) = top else { return false };
    if !below(path, top) {
        return false;
    }
    match at.and_then(|i| out.get_mut(i)) {
        Some(f) => f.below += 1,
        None => match carried.last_mut() {
            Some((t, n)) if t == top => *n += 1,
            _ => carried.push((top.clone(), 1)),
        },
    }
    true
}

fn below(p: &RelPath, top: &RelPath) -> bool {
    let (a, b) = (p.as_bytes(), top.as_bytes());
    a.len() > b.len() && a.starts_with(b) && a[b.len()] == b'/'
}

struct Header<'a> {
    kind: Kind,
    size: u64,
    meta: &'a Meta,
    target: &'a Option<ByteBuf>,
}

/// One path's items on one side.
#[derive(Default)]
struct Side<'a> {
    header: Option<Header<'a>>,
    windows: Vec<(u64, &'a Hash32)>,
}

/// Takes the items of the path at the front of `items`.
fn take<'a>(items: &mut &'a [Item]) -> (RelPath, Side<'a>) {
    let path = items[0].path().clone();
    let mut side = Side::default();
    while let Some(item) = items.first() {
        if item.path() != &path {
            break;
        }
        match item {
            Item::Entry {
                kind,
                size,
                meta,
                target,
                ..
            } => {
                side.header = Some(Header {
                    kind: *kind,
                    size: *size,
                    meta,
                    target,
                })
            }
            Item::Window { index, hash, .. } => side.windows.push((*index, hash)),
        }
        *items = &items[1..];
    }
    (path, side)
}

/// Metadata fields that differ between two entries of one kind.
pub fn meta_fields(kind: Kind, m: &Meta, s: &Meta) -> Vec<String> {
    let mut f = Vec::new();
    if kind != Kind::Symlink && m.mode != s.mode {
        f.push(format!(
            "mode {:o} on the master, {:o} on the slave",
            m.mode, s.mode
        ));
    }
    if (m.uid, m.gid) != (s.uid, s.gid) {
        f.push(format!(
            "owner {}:{} on the master, {}:{} on the slave",
            m.uid, m.gid, s.uid, s.gid
        ));
    }
    if m.mtime != s.mtime {
        f.push(format!(
            "mtime {}.{:09} on the master, {}.{:09} on the slave",
            m.mtime.sec, m.mtime.nsec, s.mtime.sec, s.mtime.nsec
        ));
    }
    if kind != Kind::Symlink && m.xattrs != s.xattrs {
        f.push("xattrs".into());
    }
    f
}

/// Windows below `limit` bytes whose hashes differ or that one side lacks.
fn differing_windows(m: &[(u64, &Hash32)], s: &[(u64, &Hash32)], limit: u64) -> Vec<u64> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < m.len() || j < s.len() {
        let k = match (m.get(i), s.get(j)) {
            (Some(a), Some(b)) if a.0 == b.0 => {
                i += 1;
                j += 1;
                if a.1 == b.1 {
                    continue;
                }
                a.0
            }
            (Some(a), Some(b)) if a.0 < b.0 => {
                i += 1;
                a.0
            }
            (Some(_), Some(b)) => {
                j += 1;
                b.0
            }
            (Some(a), None) => {
                i += 1;
                a.0
            }
            (None, Some(b)) => {
                j += 1;
                b.0
            }
            (None, None) => unreachable!(),
        };
        if k * WINDOW < limit {
            out.push(k);
        }
    }
    out
}

fn window_ranges(windows: &[u64], limit: u64) -> Vec<(u64, u64)> {
    merge(
        windows
            .iter()
            .map(|&k| (k * WINDOW, ((k + 1) * WINDOW).min(limit)))
            .collect(),
    )
}

/// Merges touching or overlapping ranges (sorted by start).
pub fn merge(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Appends the differences between the master's and the slave's items of
/// one range (each in stream order) to `out`.
pub fn diff(master: &[Item], slave: &[Item], fold: &mut Fold, out: &mut Vec<Finding>) {
    for (_, at) in [&mut fold.missing, &mut fold.extra].into_iter().flatten() {
        *at = None;
    }
    let (mut m, mut s) = (master, slave);
    while !m.is_empty() || !s.is_empty() {
        let ord = match (m.first(), s.first()) {
            (Some(a), Some(b)) => {
                if a.path() == b.path() {
                    Ordering::Equal
                } else {
                    stream::cmp(&a.key(), &b.key())
                }
            }
            (Some(_), None) => Ordering::Less,
            _ => Ordering::Greater,
        };
        let (path, ms, ss) = match ord {
            Ordering::Less => {
                let (p, side) = take(&mut m);
                (p, Some(side), None)
            }
            Ordering::Greater => {
                let (p, side) = take(&mut s);
                (p, None, Some(side))
            }
            Ordering::Equal => {
                let (p, a) = take(&mut m);
                let (_, b) = take(&mut s);
                (p, Some(a), Some(b))
            }
        };
        entry(&path, ms, ss, fold, out);
    }
}

fn entry(
    path: &RelPath,
    m: Option<Side>,
    s: Option<Side>,
    fold: &mut Fold,
    out: &mut Vec<Finding>,
) {
    let mh = m.as_ref().and_then(|x| x.header.as_ref());
    let sh = s.as_ref().and_then(|x| x.header.as_ref());
    // Below a subtree already reported: counted there.
    if s.is_none() && fold_into(&fold.missing, &mut fold.carried, path, out) {
        return;
    }
    if m.is_none() && fold_into(&fold.extra, &mut fold.carried, path, out) {
        return;
    }
    let empty = Side::default();
    let (mside, sside) = (m.as_ref().unwrap_or(&empty), s.as_ref().unwrap_or(&empty));
    match (mh, sh) {
        (Some(a), None) => {
            let mut f = Finding::new(path, What::Missing, a.kind);
            f.master_size = (a.kind == Kind::File).then_some(a.size);
            if a.kind == Kind::Dir {
                fold.missing = Some((path.clone(), Some(out.len())));
            }
            out.push(f);
        }
        (None, Some(b)) => {
            let mut f = Finding::new(path, What::Extra, b.kind);
            f.slave_size = (b.kind == Kind::File).then_some(b.size);
            if b.kind == Kind::Dir {
                fold.extra = Some((path.clone(), Some(out.len())));
            }
            out.push(f);
        }
        (Some(a), Some(b)) if a.kind != b.kind => {
            let mut f = Finding::new(path, What::Type, a.kind);
            f.fields.push(format!(
                "{:?} on the master, {:?} on the slave",
                a.kind, b.kind
            ));
            if a.kind == Kind::Dir {
                fold.missing = Some((path.clone(), Some(out.len())));
            }
            if b.kind == Kind::Dir {
                fold.extra = Some((path.clone(), Some(out.len())));
            }
            out.push(f);
        }
        (Some(a), Some(b)) => {
            if a.target != b.target {
                out.push(Finding::new(path, What::Target, a.kind));
            }
            let fields = meta_fields(a.kind, a.meta, b.meta);
            if !fields.is_empty() {
                let mut f = Finding::new(path, What::Metadata, a.kind);
                f.fields = fields;
                out.push(f);
            }
            if a.kind == Kind::File {
                let limit = a.size.min(b.size);
                let windows = differing_windows(&mside.windows, &sside.windows, limit);
                if a.size != b.size || !windows.is_empty() {
                    let what = if a.size != b.size {
                        What::Size
                    } else {
                        What::Content
                    };
                    let mut f = Finding::new(path, what, Kind::File);
                    f.master_size = Some(a.size);
                    f.slave_size = Some(b.size);
                    f.ranges = window_ranges(&windows, limit);
                    if a.size != b.size {
                        f.ranges.push((limit, a.size.max(b.size)));
                    }
                    f.windows = windows;
                    out.push(f);
                }
            }
        }
        // Windows of a file whose header lies in an earlier range.
        _ => {
            let windows = differing_windows(&mside.windows, &sside.windows, u64::MAX);
            if !windows.is_empty() {
                let mut f = Finding::new(path, What::Content, Kind::File);
                f.ranges = window_ranges(&windows, u64::MAX);
                f.windows = windows;
                out.push(f);
            }
        }
    }
}

/// The byte ranges of the blocks of a window at `offset` whose hashes
/// differ (or that one side lacks), in a file of `size` bytes on the side
/// that has more.
pub fn block_ranges(
    offset: u64,
    size: u64,
    local: &[Hash16],
    remote: &[Hash16],
) -> Vec<(u64, u64)> {
    let n = local.len().max(remote.len());
    let mut out = Vec::new();
    for i in 0..n {
        if local.get(i) != remote.get(i) {
            let s = offset + i as u64 * BLOCK;
            out.push((s, (s + BLOCK).min(size).max(s + 1)));
        }
    }
    merge(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::meta::Timestamp;

    fn p(s: &str) -> RelPath {
        RelPath::new(s.as_bytes().to_vec()).unwrap()
    }

    fn e(path: &str, kind: Kind, size: u64, mode: u32) -> Item {
        Item::Entry {
            path: p(path),
            kind,
            size,
            meta: Meta {
                mode,
                mtime: Timestamp { sec: 5, nsec: 0 },
                ..Meta::default()
            },
            target: None,
        }
    }

    fn w(path: &str, index: u64, h: u8) -> Item {
        Item::Window {
            path: p(path),
            index,
            hash: [h; 32],
        }
    }

    #[test]
    fn every_kind_of_difference_is_named_once() {
        let m = vec![
            e("a", Kind::Dir, 0, 0o755),
            e("a/gone", Kind::Dir, 0, 0o755),
            e("a/gone/x", Kind::File, 0, 0o644),
            e("a/gone/y", Kind::File, 0, 0o644),
            e("b", Kind::File, 2 * WINDOW, 0o644),
            w("b", 0, 1),
            w("b", 1, 2),
            e("c", Kind::File, 10, 0o600),
            w("c", 0, 3),
            e("d", Kind::File, 10, 0o644),
            w("d", 0, 4),
            e("f", Kind::Dir, 0, 0o755),
        ];
        let s = vec![
            e("a", Kind::Dir, 0, 0o755),
            e("b", Kind::File, 2 * WINDOW, 0o644),
            w("b", 0, 1),
            w("b", 1, 9),
            e("c", Kind::File, 10, 0o644),
            w("c", 0, 3),
            e("d", Kind::File, 4, 0o644),
            w("d", 0, 8),
            e("extra", Kind::Dir, 0, 0o755),
            e("extra/z", Kind::File, 0, 0o644),
            e("f", Kind::File, 0, 0o755),
        ];
        let mut out = Vec::new();
        diff(&m, &s, &mut Fold::default(), &mut out);
        let got: Vec<(String, What)> = out.iter().map(|f| (f.path.to_string(), f.what)).collect();
        assert_eq!(
            got,
            [
                ("a/gone".to_string(), What::Missing),
                ("b".into(), What::Content),
                ("c".into(), What::Metadata),
                ("d".into(), What::Size),
                ("extra".into(), What::Extra),
                ("f".into(), What::Type),
            ]
        );
        assert_eq!(out[0].below, 2);
        assert_eq!(out[1].windows, [1]);
        assert_eq!(out[1].ranges, [(WINDOW, 2 * WINDOW)]);
        assert!(
            out[2].fields[0].starts_with("mode 600"),
            "{:?}",
            out[2].fields
        );
        assert_eq!(out[3].ranges, [(0, 4), (4, 10)]);
        assert_eq!(out[4].below, 1);
        // Equal lists: nothing.
        let mut none = Vec::new();
        diff(&m, &m, &mut Fold::default(), &mut none);
        assert!(none.is_empty());
    }

    #[test]
    fn a_missing_subtree_split_over_ranges_is_reported_once() {
        let mut fold = Fold::default();
        let mut out = Vec::new();
        diff(
            &[e("d", Kind::Dir, 0, 0), e("d/1", Kind::File, 0, 0)],
            &[],
            &mut fold,
            &mut out,
        );
        diff(
            &[e("d/2", Kind::File, 0, 0), w("d/2", 0, 1)],
            &[],
            &mut fold,
            &mut out,
        );
        diff(&[e("e", Kind::File, 0, 0)], &[], &mut fold, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(
            (out[0].below, out[1].path.to_string()),
            (1, "e".to_string())
        );
        assert_eq!(fold.carried(), [(p("d"), 1)]);
        // A file split over ranges: windows alone still compare.
        let mut out = Vec::new();
        diff(
            &[w("big", 7, 1)],
            &[w("big", 7, 2)],
            &mut Fold::default(),
            &mut out,
        );
        assert_eq!(
            (out[0].what, out[0].windows.clone()),
            (What::Content, vec![7])
        );
    }

    #[test]
    fn block_ranges_merge_neighbours_and_cut_at_the_end() {
        let a = [[1u8; 16], [2; 16], [3; 16], [4; 16]];
        let b = [[1u8; 16], [9; 16], [9; 16]];
        assert_eq!(
            block_ranges(WINDOW, WINDOW + 3 * BLOCK + 7, &a, &b),
            [(WINDOW + BLOCK, WINDOW + 3 * BLOCK + 7)]
        );
        assert!(block_ranges(0, 100, &a, &a).is_empty());
    }
}
