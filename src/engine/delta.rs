//! Pure delta planning: which ranges of a window are copied from the
//! slave's basis, sent as literals, or sent as an rsync delta. No I/O.

use crate::fs::sparse::nonzero_runs;
use crate::hash::digest::WINDOW;

/// One operation on the file being assembled, in increasing offset order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Copy `[offset, offset+len)` from the basis.
    Copy { offset: u64, len: u64 },
    /// Send these bytes of the window.
    Literal { offset: u64, len: u64 },
    /// An rsync delta against basis `[basis_off, basis_off+basis_len)`.
    Patch {
        offset: u64,
        out_len: u64,
        basis_off: u64,
        basis_len: u64,
        delta: Vec<u8>,
    },
}

/// Literal ops for `data` at file offset `off`, leaving all-zero 4 KiB
/// blocks out (the slave's file is pre-sized, so they read as zeros).
pub fn literal_ops(off: u64, data: &[u8]) -> Vec<Op> {
    nonzero_runs(off, data, 4096)
        .into_iter()
        .map(|(at, r)| Op::Literal {
            offset: at,
            len: r.len() as u64,
        })
        .collect()
}

/// The first `ov` bytes equal the basis; the rest is new.
pub fn copy_then_literal(off: u64, data: &[u8], ov: u64) -> Vec<Op> {
    let mut ops = vec![Op::Copy {
        offset: off,
        len: ov,
    }];
    ops.extend(literal_ops(off + ov, &data[ov as usize..]));
    ops
}

/// Copies for the blocks of `[off, off + ov)` whose comparison hashes
/// match the basis's, literals for the others (whole blocks, not yet split
/// at all-zero blocks: see [`literal_ops`]). Adjacent ops are merged.
pub fn block_plan(
    off: u64,
    ov: u64,
    block: u32,
    local: &[[u8; 16]],
    remote: &[[u8; 16]],
) -> Vec<Op> {
    let b = block as u64;
    let mut ops: Vec<Op> = Vec::new();
    for (k, lh) in local.iter().enumerate() {
        let start = off + k as u64 * b;
        let len = b.min(off + ov - start);
        let copy = remote.get(k) == Some(lh);
        match (ops.last_mut(), copy) {
            (Some(Op::Copy { offset, len: l }), true)
            | (Some(Op::Literal { offset, len: l }), false)
                if *offset + *l == start =>
            {
                *l += len
            }
            (_, true) => ops.push(Op::Copy { offset: start, len }),
            (_, false) => ops.push(Op::Literal { offset: start, len }),
        }
    }
    ops
}

/// [`block_plan`] with the window's bytes at hand: literals split at
/// all-zero blocks, and the part of the window beyond the basis (`ov`) as
/// literals too.
pub fn block_ops(
    off: u64,
    data: &[u8],
    ov: u64,
    block: u32,
    local: &[[u8; 16]],
    remote: &[[u8; 16]],
) -> Vec<Op> {
    let mut ops: Vec<Op> = Vec::new();
    let push = |ops: &mut Vec<Op>, op: Op| match (ops.last_mut(), &op) {
        (
            Some(Op::Literal { offset, len }),
            Op::Literal {
                offset: o2,
                len: l2,
            },
        ) if *offset + *len == *o2 => *len += l2,
        _ => ops.push(op),
    };
    for op in block_plan(off, ov, block, local, remote) {
        match op {
            Op::Literal { offset, len } => {
                let s = (offset - off) as usize;
                for l in literal_ops(offset, &data[s..s + len as usize]) {
                    push(&mut ops, l);
                }
            }
            other => ops.push(other),
        }
    }
    for l in literal_ops(off + ov, &data[ov as usize..]) {
        push(&mut ops, l);
    }
    ops
}

/// Literal bytes a plan would send.
pub fn literal_bytes(ops: &[Op]) -> u64 {
    ops.iter()
        .map(|o| {
            if let Op::Literal { len, .. } = o {
                *len
            } else {
                0
            }
        })
        .sum()
}

/// The basis range a rolling delta for window `[off, off+len)` may match
/// against: the same range widened by half a window each side, so data
/// shifted by up to that much is still found.
pub fn rolling_basis(off: u64, len: u64, basis_size: u64) -> (u64, u64) {
    let start = off.saturating_sub(WINDOW / 2).min(basis_size);
    let end = (off + len + WINDOW / 2).min(basis_size);
    (start, end - start)
}

/// An rsync delta of `data` against a serialized fast_rsync signature.
pub fn rolling_delta(signature: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    let sig = fast_rsync::Signature::deserialize(signature.to_vec()).ok()?;
    let mut out = Vec::new();
    fast_rsync::diff(&sig.index(), data, &mut out).ok()?;
    Some(out)
}

/// When the rolling search is worth its cost: only where aligned blocks
/// mostly failed (data may have shifted), and never again in a file where
/// it has failed to pay off twice (the data is simply new).
#[derive(Debug, Default)]
pub struct RollingPolicy {
    misses: u32,
}

impl RollingPolicy {
    pub fn worth_trying(&self, local: &[[u8; 16]], remote: &[[u8; 16]]) -> bool {
        if self.misses >= 2 || local.is_empty() {
            return false;
        }
        let matched = local.iter().zip(remote).filter(|(a, b)| a == b).count();
        matched * 2 < local.len()
    }

    /// Whether to use a delta of `delta_len` bytes instead of `literal_len`
    /// literal bytes; records a miss when it does not save 10%.
    pub fn accept(&mut self, delta_len: u64, literal_len: u64) -> bool {
        if delta_len * 10 < literal_len * 9 {
            self.misses = 0;
            true
        } else {
            self.misses += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Comparison hashes of a window's blocks, as both sides compute them.
    fn hashes(d: &[u8]) -> Vec<[u8; 16]> {
        let mut cvs = Vec::new();
        crate::hash::blocktree::block_cvs(0, d, &mut cvs);
        cvs.iter().map(crate::hash::blocktree::key).collect()
    }

    #[test]
    fn scattered_block_changes_send_only_those_blocks() {
        let basis: Vec<u8> = (0..64 * 4096).map(|i| (i % 253) as u8 + 1).collect();
        let mut data = basis.clone();
        data[5 * 4096 + 7] ^= 0xff;
        data[40 * 4096] ^= 0xff;
        let ops = block_ops(
            1 << 30,
            &data,
            data.len() as u64,
            4096,
            &hashes(&data),
            &hashes(&basis),
        );
        assert_eq!(literal_bytes(&ops), 2 * 4096);
        assert_eq!(
            ops,
            vec![
                Op::Copy {
                    offset: 1 << 30,
                    len: 5 * 4096
                },
                Op::Literal {
                    offset: (1 << 30) + 5 * 4096,
                    len: 4096
                },
                Op::Copy {
                    offset: (1 << 30) + 6 * 4096,
                    len: 34 * 4096
                },
                Op::Literal {
                    offset: (1 << 30) + 40 * 4096,
                    len: 4096
                },
                Op::Copy {
                    offset: (1 << 30) + 41 * 4096,
                    len: 23 * 4096
                },
            ]
        );
    }

    #[test]
    fn ops_cover_the_window_in_order_and_reassemble_it() {
        // Basis shorter than the window: tail is literal, zero blocks are skipped.
        let basis: Vec<u8> = (0..10 * 4096 + 100).map(|i| (i % 7) as u8 + 1).collect();
        let mut data = basis.clone();
        data.resize(20 * 4096, 0);
        data[15 * 4096] = 9;
        data[3 * 4096] = 0;
        let ov = basis.len() as u64;
        let ops = block_ops(
            0,
            &data,
            ov,
            4096,
            &hashes(&data[..ov as usize]),
            &hashes(&basis),
        );
        let mut out = vec![0u8; data.len()];
        let mut last = 0;
        for op in &ops {
            match op {
                Op::Copy { offset, len } => {
                    assert!(*offset >= last);
                    out[*offset as usize..(*offset + *len) as usize]
                        .copy_from_slice(&basis[*offset as usize..(*offset + *len) as usize]);
                    last = offset + len;
                }
                Op::Literal { offset, len } => {
                    assert!(*offset >= last);
                    out[*offset as usize..(*offset + *len) as usize]
                        .copy_from_slice(&data[*offset as usize..(*offset + *len) as usize]);
                    last = offset + len;
                }
                Op::Patch { .. } => unreachable!(),
            }
        }
        assert_eq!(out, data);
        assert!(literal_bytes(&ops) <= 2 * 4096);
    }

    #[test]
    fn rolling_delta_finds_shifted_data() {
        let basis: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut data = b"inserted at the front".to_vec();
        data.extend_from_slice(&basis);
        let sig = fast_rsync::Signature::calculate(
            &basis,
            fast_rsync::SignatureOptions {
                block_size: 2048,
                crypto_hash_size: 8,
            },
        );
        let d = rolling_delta(sig.serialized(), &data).unwrap();
        assert!(d.len() < 5000, "delta of {} bytes", d.len());
        let mut out = Vec::new();
        fast_rsync::apply(&basis, &d, &mut out).unwrap();
        assert_eq!(out, data);
        let mut p = RollingPolicy::default();
        assert!(p.worth_trying(&hashes(&data), &hashes(&basis)));
        assert!(p.accept(d.len() as u64, data.len() as u64));
        assert!(!p.accept(100, 100) && !p.accept(100, 100));
        assert!(
            !p.worth_trying(&hashes(&data), &hashes(&basis)),
            "disabled after two misses"
        );
    }
}
