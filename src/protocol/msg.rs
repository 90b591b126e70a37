//! Protocol messages.

use crate::fs::meta::{Entry, Meta};
use crate::fs::relpath::RelPath;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

pub use crate::hash::stream::{Item, Key};
pub use crate::hash::{Hash16, Hash32};

/// Which session a slave tree belongs to, and which full crawl it has seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlaveIdentity {
    pub session: uuid::Uuid,
    /// Changes whenever the slave is (re)populated by a full crawl.
    pub epoch: uuid::Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub id: u64,
    pub body: Request,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    Hello {
        version: u32,
        client: String,
    },
    /// A liveness check: answered at once by the agent's reader, even
    /// while a long request is being handled, so it is not a barrier
    /// (`Barrier`, or any other request, is answered in order).
    Ping,
    GetIdentity,
    SetIdentity(SlaveIdentity),
    /// Lists a directory; answered by one or more `Entries` frames.
    ListDir {
        path: RelPath,
    },
    Stat {
        path: RelPath,
    },
    /// Creates a directory (or fixes an existing one's mode and owner).
    Mkdir {
        path: RelPath,
        meta: Meta,
    },
    /// Removes an entry, recursively for directories; absence is success.
    Remove {
        path: RelPath,
    },
    /// Creates or atomically replaces a symlink.
    Symlink {
        path: RelPath,
        target: ByteBuf,
        meta: Meta,
    },
    /// Creates or atomically replaces `path` by a hard link to `target`.
    Link {
        path: RelPath,
        target: RelPath,
    },
    SetMeta {
        path: RelPath,
        meta: Meta,
    },
    /// Starts assembling file `path` of `size` bytes in a temporary file,
    /// with `basis` (default: the existing `path`) as the source of copies.
    OpenFile {
        fid: u64,
        path: RelPath,
        basis: Option<RelPath>,
        size: u64,
    },
    /// BLAKE3 of consecutive `window`-sized ranges of the basis in `[offset, offset+len)`.
    WindowHashes {
        fid: u64,
        offset: u64,
        len: u64,
        window: u32,
    },
    /// Comparison hashes of the basis's 4 KiB blocks in `[offset, offset+len)`:
    /// each block's BLAKE3 chaining value inside its digest window, truncated
    /// to 128 bits (`blocktree::key`). `block` must be 4096, `offset` aligned.
    BlockHashes {
        fid: u64,
        offset: u64,
        len: u64,
        block: u32,
    },
    /// An rsync signature (fast_rsync format) of a basis range.
    Signature {
        fid: u64,
        offset: u64,
        len: u64,
        block: u32,
    },
    /// Literal data at `offset` (sent with id 0).
    Write {
        fid: u64,
        offset: u64,
        data: ByteBuf,
    },
    /// Copies `[offset, offset+len)` of the basis to the same range (id 0).
    Copy {
        fid: u64,
        offset: u64,
        len: u64,
    },
    /// An rsync delta against basis `[basis_off, basis_off+basis_len)`,
    /// producing exactly `out_len` bytes at `offset` (id 0).
    Patch {
        fid: u64,
        offset: u64,
        out_len: u64,
        basis_off: u64,
        basis_len: u64,
        delta: ByteBuf,
    },
    /// Verifies the digest of what was written, applies `meta`, makes the
    /// file durable and renames it over its final name.
    Commit {
        fid: u64,
        digest: Hash32,
        meta: Meta,
    },
    Abort {
        fid: u64,
    },
    /// A whole small file in one frame: write, verify, publish.
    PutFile {
        path: RelPath,
        data: ByteBuf,
        digest: Hash32,
        meta: Meta,
    },
    /// Makes everything done so far durable (syncfs).
    Barrier,
    /// Space of the file system holding the root (checked by `create`).
    StatFs,
    /// Renames `from` to `to` (which must not exist) in one step and makes
    /// both directories durable: how a staged generation is published.
    Rename {
        from: RelPath,
        to: RelPath,
    },
    /// Reads at most `max` bytes of a regular file from `offset` (a whole
    /// catalog record, or an image's header).
    ReadFile {
        path: RelPath,
        offset: u64,
        max: u64,
    },
    /// The disk ranges written by the points of a CDP journal after time
    /// `after`, within its first `limit` bytes, merged and sorted.
    JournalExtents {
        path: RelPath,
        after: u64,
        limit: u64,
    },
    /// Appends `data` in place at offset `at` of an existing file, first
    /// cutting off anything beyond `at` (an unpublished tail); refused if
    /// the file is shorter than `at`. `digest` is BLAKE3 of `data`. With
    /// `sync`, the file is made durable; with `check = (from, hash)`, the
    /// agent then reads back `[from, at + len)` and compares its BLAKE3.
    AppendTail {
        path: RelPath,
        at: u64,
        data: ByteBuf,
        digest: Hash32,
        sync: bool,
        check: Option<(u64, Hash32)>,
    },
    /// As `OpenFile` with the existing `path` as basis, but patching that
    /// file in place (only changed ranges written, old contents saved to an
    /// undo log first) when it is a regular file with one link, writable,
    /// and not shrinking by much; otherwise a temporary file as `OpenFile`.
    /// Answered by `OpenedInPlace`.
    OpenInPlace {
        fid: u64,
        path: RelPath,
        size: u64,
    },
    /// What the agent's verification does: answered by `VerifyCaps`.
    VerifyCaps,
    /// Hashes the slave's stream items (`hash::stream`) in `(from, to]`,
    /// reading at most `rate` bytes/s (0: unlimited) on the agent's
    /// verification thread, so other requests are served meanwhile. Stops
    /// early at the agent's limits (entries, bytes, item bytes per range).
    /// With `owners` false, owners are left out of the items. Answered by
    /// `RangeHash`; the agent keeps the items of its last ranges for `VerifyItems`.
    VerifyRange {
        rid: u64,
        from: Key,
        to: Key,
        rate: u64,
        owners: bool,
    },
    /// The items of range `rid` as `VerifyRange` hashed them (hashed again
    /// if no longer kept), in one or more `Items` frames.
    VerifyItems {
        rid: u64,
        from: Key,
        to: Key,
        rate: u64,
        owners: bool,
    },
    /// Comparison hashes of the 4 KiB blocks of `[offset, offset+len)` of
    /// the slave's regular file `path`, opened read-only (`len` at most one
    /// window, `offset` block-aligned). Answered by `BlockHashes`.
    VerifyBlocks {
        path: RelPath,
        offset: u64,
        len: u64,
        rate: u64,
    },
    /// Checks the CDP journal `path` of the slave's store up to `length`
    /// (header, every record's checksum, whole points), read-only on the
    /// verification thread at `rate`. Answered by `Journal`.
    VerifyJournal {
        path: RelPath,
        length: u64,
        rate: u64,
    },
    /// Opens a group of parallel streams on this (primary) agent: writes a
    /// fresh token to the slave's state directory and answers it
    /// (`StreamToken`); further agents join with `HelloStream`.
    OpenStreams,
    /// The first request of an agent joining a stream group instead of
    /// `Hello`: admitted without the root's exclusive lock when `token`
    /// equals the one the group's primary agent wrote.
    HelloStream {
        version: u32,
        client: String,
        token: Hash16,
    },
    /// As `OpenFile`, for a file whose later windows other streams write
    /// (`OpenSegment`): answered by `OpenedShared` with the temporary's
    /// name. This agent writes `[0, s)`; `CommitShared` names the rest.
    OpenShared {
        fid: u64,
        path: RelPath,
        basis: Option<RelPath>,
        size: u64,
    },
    /// Writes windows `[start, end)` (window-aligned) of the shared
    /// temporary `tmp` (a `.georep-tmp-` file in `path`'s directory that
    /// another agent of the group created with `OpenShared`). Answered by
    /// `Opened`; finished by `FinishSegment`.
    OpenSegment {
        fid: u64,
        path: RelPath,
        tmp: ByteBuf,
        basis: Option<RelPath>,
        size: u64,
        start: u64,
        end: u64,
    },
    /// Ends a segment: answered by `SegmentRoots`, the BLAKE3 of each of
    /// its windows as this agent wrote them.
    FinishSegment {
        fid: u64,
    },
    /// As `Commit` for a shared file: `segments` are the other streams'
    /// `(start, window roots)` as their agents answered `FinishSegment`,
    /// tiling the file from where this agent's data ends.
    CommitShared {
        fid: u64,
        digest: Hash32,
        meta: Meta,
        segments: Vec<(u64, Vec<Hash32>)>,
    },
    /// A small file the slave may already have: the agent compares the
    /// digest of its file at `basis` (default: `path`; at most `MAX_DATA`
    /// bytes read) with `digest`. Same content: `meta` is applied (answered
    /// `Done`), or with another `basis` a copy is published at `path`
    /// (answered `Committed` once published). Otherwise answered `Probed`
    /// with an rsync signature (blocks of `block` bytes) of that file, empty
    /// when there is none; nothing is changed.
    ProbeFile {
        path: RelPath,
        basis: Option<RelPath>,
        digest: Hash32,
        meta: Meta,
        block: u32,
    },
    /// A whole small file as an rsync delta against the slave's file at
    /// `basis` (default: `path`), producing `size` bytes (at most
    /// `MAX_DATA`); verified against `digest` and published as `PutFile`.
    PutDelta {
        path: RelPath,
        basis: Option<RelPath>,
        size: u64,
        delta: ByteBuf,
        digest: Hash32,
        meta: Meta,
    },
    /// Settles the link's options after the handshake: the compression the
    /// worker wants to send with (`off`, `auto`, `zstd:LEVEL`). Answered by
    /// `Negotiated` with what the agent accepts; the worker compresses only
    /// if it was accepted.
    Negotiate {
        compression: String,
    },
    /// As `OpenFile`, for a transfer that can resume: the temporary is kept
    /// with a progress record when the connection ends, and a later
    /// `OpenResumable` of the same `path` and `key` (the master file's
    /// identity) continues after its verified durable prefix. Answered by
    /// `OpenedResumable`. A partial of another key is removed.
    OpenResumable {
        fid: u64,
        path: RelPath,
        basis: Option<RelPath>,
        size: u64,
        key: Hash16,
    },
    /// Removes the partials whose progress record is older than
    /// `max_age_secs` (and partials without a temporary).
    CleanPartials {
        max_age_secs: u64,
    },
    /// Declares the session and epoch of the worker. Refused (`Fenced`) when
    /// the root is a live (promoted) store or of a newer epoch; otherwise the
    /// root's role becomes (or stays) a replica of `session`. Answered by `Claimed`.
    Claim {
        session: uuid::Uuid,
        epoch: u64,
        /// The reverse session of a failback: the root is the old master.
        failback: Option<FailbackClaim>,
    },
    /// Records on the replica that a complete sync covered the master up to
    /// xtime `stime` at `at_ns` (what `promote` reports for a tree).
    Synced {
        stime: u64,
        at_ns: u64,
    },
    /// Promotes the agent's root (switchover): rolls back what is
    /// unfinished, verifies, raises the epoch. Only the session the root is
    /// a replica of may ask, with its epoch. Answered by `Promoted`.
    Promote {
        session: uuid::Uuid,
        epoch: u64,
    },
    /// One bounded step of moving the root's divergence (entries changed
    /// after the last common point) into a quarantine: at most `max_entries`
    /// entries and about `max_bytes` of data. `answers` tell, for changed
    /// directories a previous step asked about, what the new master holds
    /// there (None: no such directory, so it is taken whole, as it may be
    /// new or renamed here). Answered by `Quarantined`.
    QuarantineStep {
        max_entries: u32,
        max_bytes: u64,
        answers: Vec<(RelPath, Option<Vec<PeerEntry>>)>,
    },
    /// Refines the quarantine being built: `conflicts` were also changed
    /// on the new master (B wins, A's version is kept here); `same` equal the
    /// new master's version (nothing of them can be lost) and leave it.
    QuarantineResolve {
        conflicts: Vec<RelPath>,
        same: Vec<RelPath>,
    },
    /// Writes the manifest and publishes the quarantine (one rename).
    QuarantineCommit,
}

/// What a failback's reverse session tells the old master's agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailbackClaim {
    /// The session that replicated this root to the promoted store: its
    /// stimes here are the last common point.
    pub old_session: uuid::Uuid,
    /// Skip the check that this root was that session's master, and treat
    /// everything of it as divergent.
    pub force: bool,
    /// Layout of the stores: a snapshot store (catalog) or a tree.
    pub store: bool,
    /// Store: per (host, disk), the point times the promoted store holds and verified.
    pub points: Vec<(String, String, Vec<u64>)>,
}

/// An entry of the new master, as a quarantine step compares it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerEntry {
    pub name: ByteBuf,
    pub kind: crate::fs::meta::Kind,
    pub size: u64,
    pub mtime: crate::fs::meta::Timestamp,
    pub target: Option<ByteBuf>,
    /// Changed on the new master since the promote: a difference is its own
    /// (or a conflict), not proof of the old master's divergence.
    pub changed: bool,
    /// Permission bits and owner: a symlink carries no stamp, so its owner
    /// and mtime are how a change of it shows.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// An entry a quarantine step took in (what the worker compares with the new master).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantinedEntry {
    pub path: RelPath,
    pub kind: crate::fs::meta::Kind,
    pub size: u64,
    /// Mode, owner, mtime and user xattrs as the old master has them.
    pub meta: crate::fs::meta::Meta,
    /// Files: georep's digest of the content.
    pub digest: Option<Hash32>,
    /// Symlinks: the target.
    pub target: Option<ByteBuf>,
}

impl Request {
    /// Bytes of bulk data the request carries.
    pub fn payload_len(&self) -> usize {
        match self {
            Request::Write { data, .. } | Request::PutFile { data, .. } => data.len(),
            Request::Patch { delta, .. } | Request::PutDelta { delta, .. } => delta.len(),
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    HelloOk {
        version: u32,
        agent: String,
        root: String,
    },
    Pong,
    Identity(Option<SlaveIdentity>),
    Entries(Vec<Entry>),
    Stat(Option<Entry>),
    Done,
    Opened {
        basis_size: Option<u64>,
    },
    Hashes(Vec<Hash32>),
    BlockHashes(Vec<Hash16>),
    Signature(ByteBuf),
    Committed {
        written: u64,
    },
    /// Bytes available to the agent's user, and the file system's size.
    StatFs {
        avail: u64,
        total: u64,
    },
    Data(ByteBuf),
    Extents(Vec<(u64, u64)>),
    /// The answer to `OpenInPlace`: the basis size, and whether the file is
    /// patched in place (false: assembled in a temporary file).
    OpenedInPlace {
        basis_size: Option<u64>,
        in_place: bool,
    },
    /// Whether the agent keeps owners (it runs as root), and the most a
    /// range may hold before `VerifyRange` stops early.
    VerifyCaps {
        owners: bool,
        max_entries: u64,
        max_bytes: u64,
    },
    /// The hash of the items of `(from, stopped or to]`: `stopped` is the
    /// last key hashed when a limit was reached first.
    RangeHash {
        hash: Hash32,
        items: u64,
        entries: u64,
        bytes: u64,
        stopped: Option<Key>,
    },
    Items(Vec<Item>),
    /// What a journal holds up to the length asked: where its whole points
    /// end, how many, the newest one's time, and its header's fields.
    Journal {
        end: u64,
        points: u64,
        last: u64,
        start: u64,
        base: u64,
        base_name: String,
    },
    /// A stream group's token (see `Request::OpenStreams`).
    StreamToken(Hash16),
    /// The answer to `OpenShared`: the basis size and the temporary's name.
    OpenedShared {
        basis_size: Option<u64>,
        tmp: ByteBuf,
    },
    /// The answer to `FinishSegment`.
    SegmentRoots {
        roots: Vec<Hash32>,
        written: u64,
    },
    /// The answer to a `ProbeFile` whose content differs.
    Probed {
        signature: ByteBuf,
    },
    /// The answer to `Negotiate`: the compression accepted (`off` if none).
    Negotiated {
        compression: String,
    },
    /// The answer to `OpenResumable`: the basis size, and the durable
    /// prefix kept from an earlier attempt (bytes, window-aligned or the
    /// whole file) with the hash of each of its windows, verified by reading
    /// them again.
    OpenedResumable {
        basis_size: Option<u64>,
        resumed: u64,
        roots: Vec<Hash32>,
    },
    /// The answer to `Claim`: the root's role now.
    Claimed {
        role: crate::fs::role::Role,
        epoch: u64,
        describe: String,
    },
    /// The answer to `Promote`: the report as JSON text.
    Promoted {
        report: String,
    },
    /// The answer to `QuarantineStep`: the quarantine's id, the entries
    /// moved in by this step (path, kind, size), and whether the walk is done.
    Quarantined {
        id: String,
        entries: Vec<QuarantinedEntry>,
        /// Changed directories to look up on the new master (answered by the next step).
        ask: Vec<RelPath>,
        done: bool,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    /// False while more frames of the same reply follow.
    pub last: bool,
    pub result: Result<Reply, WireError>,
}

/// An error reported by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct WireError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    NotFound,
    Exists,
    NoSpace,
    Permission,
    /// A path the agent refuses (absolute, `..`, through a symlink, outside the root).
    InvalidPath,
    /// A malformed request: bad offsets, unknown file id, bad delta.
    Invalid,
    /// What was written does not hash to the master's digest.
    Mismatch,
    /// Another agent holds the slave root.
    Busy,
    Version,
    Io,
    /// The root is a live store, or of a newer epoch than the writer's.
    Fenced,
}

impl WireError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> WireError {
        WireError {
            kind,
            message: message.into(),
        }
    }

    pub fn retry(&self) -> crate::error::Retry {
        use crate::error::Retry;
        match self.kind {
            ErrorKind::Version
            | ErrorKind::InvalidPath
            | ErrorKind::Invalid
            | ErrorKind::Fenced => Retry::Permanent,
            _ => Retry::Temporary,
        }
    }
}
