//! The modelled master tree and how a marker orders its stamp writes.
//!
//! A fixed shape, indexed by path (the slave is addressed by path too):
//!
//! ```text
//! ROOT ── C1 ── F1      ("", "c1", "c1/f")
//!     └── C2 ── F2      ("c2", "c2/f")
//! ```
//!
//! Two sibling directories with a file each is the smallest tree in which
//! a stamp can reach an ancestor before it reaches a sibling branch, and in
//! which two directories can be swapped by renames.

/// Node indices (paths).
pub const ROOT: usize = 0;
pub const C1: usize = 1;
pub const C2: usize = 2;
pub const F1: usize = 3;
pub const F2: usize = 4;
pub const NODES: usize = 5;
/// The files, and their index in per-file arrays.
pub const FILES: [usize; 2] = [F1, F2];

pub fn parent(n: usize) -> Option<usize> {
    [None, Some(ROOT), Some(ROOT), Some(C1), Some(C2)][n]
}

pub fn children(d: usize) -> &'static [usize] {
    match d {
        ROOT => &[C1, C2],
        C1 => &[F1],
        C2 => &[F2],
        _ => &[],
    }
}

pub fn is_dir(n: usize) -> bool {
    n <= C2
}

pub fn depth(n: usize) -> usize {
    [0, 1, 1, 2, 2][n]
}

/// Index of a file node in per-file arrays.
pub fn file_index(n: usize) -> usize {
    n - F1
}

/// Whether `n` is `d` or below it.
pub fn below(n: usize, d: usize) -> bool {
    let mut cur = Some(n);
    while let Some(c) = cur {
        if c == d {
            return true;
        }
        cur = parent(c);
    }
    false
}

/// Paths sort as the real marker sorts `PathBuf`s: "" < "c1" < "c1/f" < "c2" < "c2/f".
const SORTED: [usize; NODES] = [ROOT, C1, F1, C2, F2];

/// How a marker orders the stamp writes of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Order {
    /// `mark_many` before the fix: paths sorted, each path's chain written
    /// leaf to root, stopping at the first entry already in the batch. An
    /// ancestor can so be written before another branch below it.
    PerPathChains,
    /// Every entry of the batch after all of its descendants (deepest
    /// first): when an ancestor shows the new stamp, everything below it
    /// that gets the stamp already has it.
    DeepestFirst,
}

/// The entries a batch of changed paths stamps, in write order. `exists`
/// tells which files exist (a vanished file stamps its directory).
pub fn stamp_order(batch: u8, exists: impl Fn(usize) -> bool, order: Order) -> Vec<u8> {
    let mut seen = [false; NODES];
    let mut out = Vec::new();
    for &p in SORTED.iter().filter(|&&p| batch & (1 << p) != 0) {
        let mut cur = if is_dir(p) || exists(p) {
            Some(p)
        } else {
            parent(p)
        };
        while let Some(c) = cur {
            if seen[c] {
                break;
            }
            seen[c] = true;
            out.push(c as u8);
            cur = parent(c);
        }
    }
    if order == Order::DeepestFirst {
        // Stable: entries of equal depth keep the per-path order.
        out.sort_by_key(|&n| std::cmp::Reverse(depth(n as usize)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_path_chains_write_the_root_before_the_second_branch() {
        let both = (1 << F1) | (1 << F2);
        assert_eq!(
            stamp_order(both, |_| true, Order::PerPathChains),
            vec![F1 as u8, C1 as u8, ROOT as u8, F2 as u8, C2 as u8]
        );
        let fixed = stamp_order(both, |_| true, Order::DeepestFirst);
        assert_eq!(
            fixed,
            vec![F1 as u8, F2 as u8, C1 as u8, C2 as u8, ROOT as u8]
        );
        // A vanished file stamps its directory.
        assert_eq!(
            stamp_order(1 << F2, |n| n != F2, Order::DeepestFirst),
            vec![C2 as u8, ROOT as u8]
        );
    }
}
