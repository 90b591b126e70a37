//! The slave's requests of WAN transfers: shared files written over
//! several streams, small files probed by digest and sent as deltas, and
//! resumable transfers (see `engine::transfer`).

use super::{committed, done, unexpected, Pending, Slave};
use crate::fs::meta::Meta;
use crate::fs::relpath::RelPath;
use crate::protocol::{Hash16, Hash32, ProtoError, Reply, Request};
use serde_bytes::ByteBuf;

impl Slave {
    /// Opens `path` as a shared file other streams write segments of
    /// (`Request::OpenShared`); answers the basis size and the temporary.
    pub async fn open_shared(
        &self,
        fid: u64,
        path: RelPath,
        basis: Option<RelPath>,
        size: u64,
    ) -> Result<Pending<(Option<u64>, Vec<u8>)>, ProtoError> {
        self.req(
            Request::OpenShared {
                fid,
                path,
                basis,
                size,
            },
            |r| match r.as_slice() {
                [Reply::OpenedShared { basis_size, tmp }] => Ok((*basis_size, tmp.to_vec())),
                other => Err(unexpected(other)),
            },
        )
        .await
    }

    /// Attaches to a shared temporary for windows `[start, end)` (`Request::OpenSegment`).
    #[allow(clippy::too_many_arguments)]
    pub async fn open_segment(
        &self,
        fid: u64,
        path: RelPath,
        tmp: Vec<u8>,
        basis: Option<RelPath>,
        size: u64,
        start: u64,
        end: u64,
    ) -> Result<Pending<Option<u64>>, ProtoError> {
        self.req(
            Request::OpenSegment {
                fid,
                path,
                tmp: ByteBuf::from(tmp),
                basis,
                size,
                start,
                end,
            },
            |r| match r.as_slice() {
                [Reply::Opened { basis_size }] => Ok(*basis_size),
                other => Err(unexpected(other)),
            },
        )
        .await
    }

    /// Ends a segment: the agent's hash of each of its windows.
    pub async fn finish_segment(&self, fid: u64) -> Result<Pending<Vec<Hash32>>, ProtoError> {
        self.req(Request::FinishSegment { fid }, |r| match r.as_slice() {
            [Reply::SegmentRoots { roots, .. }] => Ok(roots.clone()),
            other => Err(unexpected(other)),
        })
        .await
    }

    /// Commits a shared file with the other streams' window hashes.
    pub async fn commit_shared(
        &self,
        fid: u64,
        digest: Hash32,
        meta: Meta,
        segments: Vec<(u64, Vec<Hash32>)>,
    ) -> Result<Pending<u64>, ProtoError> {
        self.req(
            Request::CommitShared {
                fid,
                digest,
                meta,
                segments,
            },
            committed,
        )
        .await
    }
}

/// What a probe of a small file found (see `Request::ProbeFile`).
pub enum Probed {
    /// The slave has this content: its metadata was applied (or a copy of
    /// another basis was published at the path).
    Same,
    /// It differs: the rsync signature of the slave's file (empty: no basis).
    Differs(Vec<u8>),
}

impl Slave {
    /// Asks whether the slave has `digest` at `basis` (default: `path`).
    pub async fn probe(
        &self,
        path: RelPath,
        basis: Option<RelPath>,
        digest: Hash32,
        meta: Meta,
        block: u32,
    ) -> Result<Pending<Probed>, ProtoError> {
        self.req(
            Request::ProbeFile {
                path,
                basis,
                digest,
                meta,
                block,
            },
            |mut r| match r.pop() {
                Some(Reply::Done | Reply::Committed { .. }) if r.is_empty() => Ok(Probed::Same),
                Some(Reply::Probed { signature }) if r.is_empty() => {
                    Ok(Probed::Differs(signature.into_vec()))
                }
                other => Err(ProtoError::Violation(format!("unexpected reply {other:?}"))),
            },
        )
        .await
    }

    /// Sends a small file as a delta against the slave's copy.
    #[allow(clippy::too_many_arguments)]
    pub async fn put_delta(
        &self,
        path: RelPath,
        basis: Option<RelPath>,
        size: u64,
        delta: Vec<u8>,
        digest: Hash32,
        meta: Meta,
    ) -> Result<Pending<u64>, ProtoError> {
        self.req(
            Request::PutDelta {
                path,
                basis,
                size,
                delta: ByteBuf::from(delta),
                digest,
                meta,
            },
            committed,
        )
        .await
    }
}

impl Slave {
    /// Opens a resumable transfer (`Request::OpenResumable`): answers the
    /// basis size, the kept prefix's length and its window hashes.
    pub async fn open_resumable(
        &self,
        fid: u64,
        path: RelPath,
        basis: Option<RelPath>,
        size: u64,
        key: Hash16,
    ) -> Result<Pending<(Option<u64>, u64, Vec<Hash32>)>, ProtoError> {
        self.req(
            Request::OpenResumable {
                fid,
                path,
                basis,
                size,
                key,
            },
            |mut r| match r.pop() {
                Some(Reply::OpenedResumable {
                    basis_size,
                    resumed,
                    roots,
                }) if r.is_empty() => Ok((basis_size, resumed, roots)),
                other => Err(ProtoError::Violation(format!("unexpected reply {other:?}"))),
            },
        )
        .await
    }

    /// Removes the slave's partials older than `max_age_secs`.
    pub async fn clean_partials(&self, max_age_secs: u64) -> Result<(), ProtoError> {
        self.req(Request::CleanPartials { max_age_secs }, done)
            .await?
            .wait()
            .await
    }
}
