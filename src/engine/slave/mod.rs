//! The engine's view of the slave: typed operations over the protocol
//! client. Each call queues its request before returning, so calls made in
//! sequence reach the agent in that order; the returned [`Pending`] is
//! awaited only when the answer is needed. That is what keeps many
//! operations in flight over a high-latency link.

use crate::fs::meta::{Entry, Meta};
use crate::fs::relpath::RelPath;
use crate::protocol::{Client, Hash16, Hash32, ProtoError, Reply, Request, SlaveIdentity, Ticket};
use serde_bytes::ByteBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A request on its way, with the conversion of its reply.
pub struct Pending<T> {
    ticket: Ticket,
    convert: fn(Vec<Reply>) -> Result<T, ProtoError>,
}

impl<T> Pending<T> {
    pub async fn wait(self) -> Result<T, ProtoError> {
        (self.convert)(self.ticket.await?)
    }
}

fn unexpected(r: &[Reply]) -> ProtoError {
    ProtoError::Violation(format!("unexpected reply {:?}", r.first()))
}

fn done(r: Vec<Reply>) -> Result<(), ProtoError> {
    match r.as_slice() {
        [Reply::Done] => Ok(()),
        other => Err(unexpected(other)),
    }
}

fn committed(r: Vec<Reply>) -> Result<u64, ProtoError> {
    match r.as_slice() {
        [Reply::Committed { written }] => Ok(*written),
        other => Err(unexpected(other)),
    }
}

/// A quarantine step's answer: id, entries taken, directories to look up, done.
pub type QuarantineStepped = (
    String,
    Vec<crate::protocol::QuarantinedEntry>,
    Vec<RelPath>,
    bool,
);

/// The slave through one or more streams (see `transport::Connection::open_streams`).
/// Each value speaks on one stream, the group's first unless
/// [`pick`](Slave::pick) or [`on`](Slave::on) chose another; a file's
/// requests all go to the stream that opened it.
#[derive(Clone)]
pub struct Slave {
    client: Client,
    /// Which stream of the group this value speaks on.
    idx: usize,
    group: Arc<Group>,
}

struct Group {
    streams: Vec<Client>,
    next: AtomicUsize,
    /// Small files (sent whole, as a delta, or found equal by a probe)
    /// each stream carried to their answer.
    small: Vec<std::sync::atomic::AtomicU64>,
}

impl Slave {
    pub fn new(client: Client) -> Slave {
        Slave::group(vec![client])
    }

    /// The slave through `streams` (at least one; the first is the primary).
    pub fn group(streams: Vec<Client>) -> Slave {
        Slave {
            client: streams[0].clone(),
            idx: 0,
            group: Arc::new(Group {
                small: streams.iter().map(|_| Default::default()).collect(),
                streams,
                next: AtomicUsize::new(0),
            }),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The number of streams.
    pub fn streams(&self) -> usize {
        self.group.streams.len()
    }

    /// The same slave speaking on stream `k` (modulo the number of streams).
    pub fn on(&self, k: usize) -> Slave {
        let n = self.group.streams.len();
        Slave {
            client: self.group.streams[k % n].clone(),
            idx: k % n,
            group: self.group.clone(),
        }
    }

    /// The stream this value speaks on.
    pub fn index(&self) -> usize {
        self.idx
    }

    /// The same slave on the live stream with the fewest bytes waiting to
    /// be written (ties taken in turn), for the next file.
    pub fn pick(&self) -> Slave {
        let n = self.group.streams.len();
        if n == 1 {
            return self.clone();
        }
        let start = self.group.next.fetch_add(1, Ordering::Relaxed);
        let best = (0..n)
            .map(|j| (start + j) % n)
            .filter(|&k| self.group.streams[k].closed().is_none())
            .min_by_key(|&k| self.group.streams[k].queued_bytes())
            .unwrap_or(0);
        self.on(best)
    }

    /// Counts a small file this stream carried to its answer.
    pub fn carried_small(&self) {
        self.group.small[self.idx].fetch_add(1, Ordering::Relaxed);
    }

    /// Small files each stream carried so far (see [`carried_small`](Slave::carried_small)).
    pub fn small_by_stream(&self) -> Vec<u64> {
        self.group
            .small
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Bytes out and in over every stream so far.
    pub fn wire_totals(&self) -> (u64, u64) {
        self.group.streams.iter().fold((0, 0), |(o, i), c| {
            let s = c.stats();
            (
                o + s.bytes_out.load(Ordering::Relaxed),
                i + s.bytes_in.load(Ordering::Relaxed),
            )
        })
    }

    /// Bytes the frames sent so far had before compression, over every stream.
    pub fn raw_out_total(&self) -> u64 {
        self.group
            .streams
            .iter()
            .map(|c| c.stats().raw_out.load(Ordering::Relaxed))
            .sum()
    }

    /// Why the primary stream closed, if it did (the others may close
    /// without ending the pass: their files fail and are retried).
    pub fn closed(&self) -> Option<ProtoError> {
        self.group.streams[0].closed()
    }

    /// Whether any stream closed (the connection is to be made again).
    pub fn any_closed(&self) -> bool {
        self.group.streams.iter().any(|c| c.closed().is_some())
    }

    /// Why a stream's connection closed, the first found (None: all open).
    pub fn closed_error(&self) -> Option<ProtoError> {
        self.group.streams.iter().find_map(|c| c.closed())
    }

    async fn req<T>(
        &self,
        body: Request,
        convert: fn(Vec<Reply>) -> Result<T, ProtoError>,
    ) -> Result<Pending<T>, ProtoError> {
        Ok(Pending {
            ticket: self.client.request(body).await?,
            convert,
        })
    }

    pub async fn identity(&self) -> Result<Option<SlaveIdentity>, ProtoError> {
        self.req(Request::GetIdentity, |r| match r.as_slice() {
            [Reply::Identity(i)] => Ok(i.clone()),
            other => Err(unexpected(other)),
        })
        .await?
        .wait()
        .await
    }

    pub async fn set_identity(&self, id: SlaveIdentity) -> Result<(), ProtoError> {
        self.req(Request::SetIdentity(id), done).await?.wait().await
    }

    pub async fn list(&self, path: RelPath) -> Result<Pending<Vec<Entry>>, ProtoError> {
        self.req(Request::ListDir { path }, |r| {
            let mut out = Vec::new();
            for reply in r {
                match reply {
                    Reply::Entries(e) => out.extend(e),
                    other => return Err(unexpected(&[other])),
                }
            }
            Ok(out)
        })
        .await
    }

    pub async fn stat(&self, path: RelPath) -> Result<Option<Entry>, ProtoError> {
        self.req(Request::Stat { path }, |r| match r.as_slice() {
            [Reply::Stat(s)] => Ok(s.clone()),
            other => Err(unexpected(other)),
        })
        .await?
        .wait()
        .await
    }

    pub async fn mkdir(&self, path: RelPath, meta: Meta) -> Result<Pending<()>, ProtoError> {
        self.req(Request::Mkdir { path, meta }, done).await
    }

    pub async fn remove(&self, path: RelPath) -> Result<Pending<()>, ProtoError> {
        self.req(Request::Remove { path }, done).await
    }

    pub async fn symlink(
        &self,
        path: RelPath,
        target: Vec<u8>,
        meta: Meta,
    ) -> Result<Pending<()>, ProtoError> {
        self.req(
            Request::Symlink {
                path,
                target: ByteBuf::from(target),
                meta,
            },
            done,
        )
        .await
    }

    pub async fn link(&self, path: RelPath, target: RelPath) -> Result<Pending<()>, ProtoError> {
        self.req(Request::Link { path, target }, done).await
    }

    pub async fn set_meta(&self, path: RelPath, meta: Meta) -> Result<Pending<()>, ProtoError> {
        self.req(Request::SetMeta { path, meta }, done).await
    }

    pub async fn open_file(
        &self,
        fid: u64,
        path: RelPath,
        basis: Option<RelPath>,
        size: u64,
    ) -> Result<Pending<Option<u64>>, ProtoError> {
        self.req(
            Request::OpenFile {
                fid,
                path,
                basis,
                size,
            },
            |r| match r.as_slice() {
                [Reply::Opened { basis_size }] => Ok(*basis_size),
                other => Err(unexpected(other)),
            },
        )
        .await
    }

    pub async fn window_hashes(
        &self,
        fid: u64,
        offset: u64,
        len: u64,
        window: u32,
    ) -> Result<Pending<Vec<Hash32>>, ProtoError> {
        self.req(
            Request::WindowHashes {
                fid,
                offset,
                len,
                window,
            },
            |mut r| match r.pop() {
                Some(Reply::Hashes(h)) if r.is_empty() => Ok(h),
                other => Err(ProtoError::Violation(format!("unexpected reply {other:?}"))),
            },
        )
        .await
    }

    pub async fn block_hashes(
        &self,
        fid: u64,
        offset: u64,
        len: u64,
        block: u32,
    ) -> Result<Pending<Vec<Hash16>>, ProtoError> {
        self.req(
            Request::BlockHashes {
                fid,
                offset,
                len,
                block,
            },
            |mut r| match r.pop() {
                Some(Reply::BlockHashes(h)) if r.is_empty() => Ok(h),
                other => Err(ProtoError::Violation(format!("unexpected reply {other:?}"))),
            },
        )
        .await
    }

    pub async fn signature(
        &self,
        fid: u64,
        offset: u64,
        len: u64,
        block: u32,
    ) -> Result<Pending<Vec<u8>>, ProtoError> {
        self.req(
            Request::Signature {
                fid,
                offset,
                len,
                block,
            },
            |mut r| match r.pop() {
                Some(Reply::Signature(s)) if r.is_empty() => Ok(s.into_vec()),
                other => Err(ProtoError::Violation(format!("unexpected reply {other:?}"))),
            },
        )
        .await
    }

    pub async fn write(&self, fid: u64, offset: u64, data: Vec<u8>) -> Result<(), ProtoError> {
        self.client
            .post(Request::Write {
                fid,
                offset,
                data: ByteBuf::from(data),
            })
            .await
    }

    pub async fn copy(&self, fid: u64, offset: u64, len: u64) -> Result<(), ProtoError> {
        self.client.post(Request::Copy { fid, offset, len }).await
    }

    pub async fn patch(
        &self,
        fid: u64,
        offset: u64,
        out_len: u64,
        basis_off: u64,
        basis_len: u64,
        delta: Vec<u8>,
    ) -> Result<(), ProtoError> {
        self.client
            .post(Request::Patch {
                fid,
                offset,
                out_len,
                basis_off,
                basis_len,
                delta: ByteBuf::from(delta),
            })
            .await
    }

    pub async fn commit(
        &self,
        fid: u64,
        digest: Hash32,
        meta: Meta,
    ) -> Result<Pending<u64>, ProtoError> {
        self.req(Request::Commit { fid, digest, meta }, committed)
            .await
    }

    pub async fn abort(&self, fid: u64) -> Result<Pending<()>, ProtoError> {
        self.req(Request::Abort { fid }, done).await
    }

    pub async fn put_file(
        &self,
        path: RelPath,
        data: Vec<u8>,
        digest: Hash32,
        meta: Meta,
    ) -> Result<Pending<u64>, ProtoError> {
        self.req(
            Request::PutFile {
                path,
                data: ByteBuf::from(data),
                digest,
                meta,
            },
            committed,
        )
        .await
    }

    /// Makes everything the agent did so far durable.
    pub async fn barrier(&self) -> Result<(), ProtoError> {
        self.req(Request::Barrier, done).await?.wait().await
    }

    /// Renames `from` to `to` (which must not exist) durably.
    pub async fn rename(&self, from: RelPath, to: RelPath) -> Result<Pending<()>, ProtoError> {
        self.req(Request::Rename { from, to }, done).await
    }

    /// Reads at most `max` bytes of a file from `offset`.
    pub async fn read_file(
        &self,
        path: RelPath,
        offset: u64,
        max: u64,
    ) -> Result<Pending<Vec<u8>>, ProtoError> {
        self.req(Request::ReadFile { path, offset, max }, |r| {
            match r.as_slice() {
                [Reply::Data(d)] => Ok(d.to_vec()),
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    /// The disk ranges a journal's points after `after` write.
    pub async fn journal_extents(
        &self,
        path: RelPath,
        after: u64,
        limit: u64,
    ) -> Result<Vec<(u64, u64)>, ProtoError> {
        self.req(
            Request::JournalExtents { path, after, limit },
            |r| match r.as_slice() {
                [Reply::Extents(e)] => Ok(e.clone()),
                other => Err(unexpected(other)),
            },
        )
        .await?
        .wait()
        .await
    }

    /// Appends verified data in place at `at` (see `Request::AppendTail`).
    pub async fn append_tail(
        &self,
        path: RelPath,
        at: u64,
        data: Vec<u8>,
        sync: bool,
        check: Option<(u64, Hash32)>,
    ) -> Result<Pending<u64>, ProtoError> {
        let digest = *blake3::hash(&data).as_bytes();
        self.req(
            Request::AppendTail {
                path,
                at,
                data: ByteBuf::from(data),
                digest,
                sync,
                check,
            },
            committed,
        )
        .await
    }

    /// Opens `path` to be patched in place where the agent can (see
    /// `Request::OpenInPlace`); answers the basis size and whether it is in place.
    pub async fn open_in_place(
        &self,
        fid: u64,
        path: RelPath,
        size: u64,
    ) -> Result<Pending<(Option<u64>, bool)>, ProtoError> {
        self.req(Request::OpenInPlace { fid, path, size }, |r| {
            match r.as_slice() {
                [Reply::OpenedInPlace {
                    basis_size,
                    in_place,
                }] => Ok((*basis_size, *in_place)),
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    /// Declares this worker's session and epoch (fencing); answers the
    /// slave root's role now, as one line.
    pub async fn claim(
        &self,
        session: uuid::Uuid,
        epoch: u64,
        failback: Option<crate::protocol::FailbackClaim>,
    ) -> Result<(crate::fs::role::Role, String), ProtoError> {
        self.req(
            Request::Claim {
                session,
                epoch,
                failback,
            },
            |r| match r.as_slice() {
                [Reply::Claimed { role, describe, .. }] => Ok((*role, describe.clone())),
                other => Err(unexpected(other)),
            },
        )
        .await?
        .wait()
        .await
    }

    /// Records on the replica that a complete sync covered the master up to `stime`.
    pub async fn synced(&self, stime: u64, at_ns: u64) -> Result<(), ProtoError> {
        self.req(Request::Synced { stime, at_ns }, done)
            .await?
            .wait()
            .await
    }

    /// Promotes the slave root (switchover); answers the report as JSON text.
    pub async fn promote(&self, session: uuid::Uuid, epoch: u64) -> Result<String, ProtoError> {
        self.req(Request::Promote { session, epoch }, |r| {
            match r.as_slice() {
                [Reply::Promoted { report }] => Ok(report.clone()),
                other => Err(unexpected(other)),
            }
        })
        .await?
        .wait()
        .await
    }

    /// One bounded step of the failback's quarantine on the old master.
    pub async fn quarantine_step(
        &self,
        max_entries: u32,
        max_bytes: u64,
        answers: Vec<(RelPath, Option<Vec<crate::protocol::PeerEntry>>)>,
    ) -> Result<QuarantineStepped, ProtoError> {
        self.req(
            Request::QuarantineStep {
                max_entries,
                max_bytes,
                answers,
            },
            |r| match r.as_slice() {
                [Reply::Quarantined {
                    id,
                    entries,
                    ask,
                    done,
                }] => Ok((id.clone(), entries.clone(), ask.clone(), *done)),
                other => Err(unexpected(other)),
            },
        )
        .await?
        .wait()
        .await
    }

    pub async fn quarantine_resolve(
        &self,
        conflicts: Vec<RelPath>,
        same: Vec<RelPath>,
    ) -> Result<(), ProtoError> {
        self.req(Request::QuarantineResolve { conflicts, same }, done)
            .await?
            .wait()
            .await
    }

    pub async fn quarantine_commit(&self) -> Result<(), ProtoError> {
        self.req(Request::QuarantineCommit, done)
            .await?
            .wait()
            .await
    }
}

mod transfers;
mod verify;
pub use transfers::Probed;
pub use verify::{JournalCheck, RangeReply, VerifyCaps};
