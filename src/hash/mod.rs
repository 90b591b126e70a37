//! Content digests both ends compute: the windowed BLAKE3 digest a
//! published file is verified against, and BLAKE3 trees of 4 KiB blocks
//! that give a window's hash and its blocks' hashes in one pass. Uses only
//! `fs`.

pub mod blocktree;
pub mod digest;
pub mod stream;

/// A full BLAKE3 hash.
pub type Hash32 = [u8; 32];
/// A block's comparison hash: its BLAKE3 chaining value truncated to 128 bits.
pub type Hash16 = [u8; 16];
