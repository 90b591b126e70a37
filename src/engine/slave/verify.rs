//! The slave's requests of verification (see `engine::verify`): hash
//! ranges, their items, block hashes, and journal checks, all answered on
//! the agent's verification thread.

use super::{unexpected, Pending, Slave};
use crate::fs::relpath::RelPath;
use crate::protocol::{Hash16, Hash32, Item, Key, ProtoError, Reply, Request};

/// The agent's answer to a range of verification (see `Request::VerifyRange`).
#[derive(Debug, Clone)]
pub struct RangeReply {
    pub hash: Hash32,
    pub items: u64,
    pub entries: u64,
    pub bytes: u64,
    /// The last key hashed when the agent's limits ended the range early.
    pub stopped: Option<Key>,
}

/// What the agent's verification does (see `Reply::VerifyCaps`).
#[derive(Debug, Clone, Copy)]
pub struct VerifyCaps {
    pub owners: bool,
    pub max_entries: u64,
    pub max_bytes: u64,
}

/// What the agent found checking a journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalCheck {
    pub end: u64,
    pub points: u64,
    pub last: u64,
    pub start: u64,
    pub base: u64,
    pub base_name: String,
}

impl Slave {
    pub async fn verify_caps(&self) -> Result<VerifyCaps, ProtoError> {
        self.req(Request::VerifyCaps, |r| match r.as_slice() {
            [Reply::VerifyCaps {
                owners,
                max_entries,
                max_bytes,
            }] => Ok(VerifyCaps {
                owners: *owners,
                max_entries: *max_entries,
                max_bytes: *max_bytes,
            }),
            other => Err(unexpected(other)),
        })
        .await?
        .wait()
        .await
    }

    /// Hashes the slave's stream in `(from, to]` (see `Request::VerifyRange`).
    pub async fn verify_range(
        &self,
        rid: u64,
        from: Key,
        to: Key,
        rate: u64,
        owners: bool,
    ) -> Result<Pending<RangeReply>, ProtoError> {
        self.req(
            Request::VerifyRange {
                rid,
                from,
                to,
                rate,
                owners,
            },
            |r| match r.as_slice() {
                [Reply::RangeHash {
                    hash,
                    items,
                    entries,
                    bytes,
                    stopped,
                }] => Ok(RangeReply {
                    hash: *hash,
                    items: *items,
                    entries: *entries,
                    bytes: *bytes,
                    stopped: stopped.clone(),
                }),
                other => Err(unexpected(other)),
            },
        )
        .await
    }

    /// The items of a range asked for with the same arguments before.
    pub async fn verify_items(
        &self,
        rid: u64,
        from: Key,
        to: Key,
        rate: u64,
        owners: bool,
    ) -> Result<Pending<Vec<Item>>, ProtoError> {
        self.req(
            Request::VerifyItems {
                rid,
                from,
                to,
                rate,
                owners,
            },
            |r| {
                let mut out = Vec::new();
                for reply in r {
                    match reply {
                        Reply::Items(i) => out.extend(i),
                        other => return Err(unexpected(&[other])),
                    }
                }
                Ok(out)
            },
        )
        .await
    }

    /// Block hashes of a range of the slave file `path`, read-only.
    pub async fn verify_blocks(
        &self,
        path: RelPath,
        offset: u64,
        len: u64,
        rate: u64,
    ) -> Result<Pending<Vec<Hash16>>, ProtoError> {
        self.req(
            Request::VerifyBlocks {
                path,
                offset,
                len,
                rate,
            },
            |mut r| match r.pop() {
                Some(Reply::BlockHashes(h)) if r.is_empty() => Ok(h),
                other => Err(ProtoError::Violation(format!("unexpected reply {other:?}"))),
            },
        )
        .await
    }

    /// Checks a journal of the slave's store up to `length` (see `Request::VerifyJournal`).
    pub async fn verify_journal(
        &self,
        path: RelPath,
        length: u64,
        rate: u64,
    ) -> Result<Pending<JournalCheck>, ProtoError> {
        self.req(Request::VerifyJournal { path, length, rate }, |r| {
            match r.as_slice() {
                [Reply::Journal {
                    end,
                    points,
                    last,
                    start,
                    base,
                    base_name,
                }] => Ok(JournalCheck {
                    end: *end,
                    points: *points,
                    last: *last,
                    start: *start,
                    base: *base,
                    base_name: base_name.clone(),
                }),
                other => Err(unexpected(other)),
            }
        })
        .await
    }
}
