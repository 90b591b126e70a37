//! The slave's side of verification (`georep verify` and the scrub): the
//! stream of `hash::stream` hashed by ranges, the items of a range that
//! differs, and the block hashes of a window, all read-only.
//!
//! The work runs on one thread of its own, fed through a short queue, so
//! the agent keeps serving replication and keep-alives meanwhile. Each
//! request is bounded: a range stops early at [`MAX_ENTRIES`] entries,
//! [`MAX_BYTES`] bytes of content or [`MAX_ITEM_BYTES`] of items, reading
//! is paced to the rate the request names, and the items of the last
//! [`KEPT`] ranges are kept (so a range that differs is not read twice).
//! A file's windows are hashed two at a time (the second on a scoped
//! thread), as the slave's reading is the critical path once the master's
//! hashes come from its cache (`engine::verify::cache`).

use super::conn::Replies;
use super::root::{errno_err, io_err, open_nofollow, Root, WResult};
use crate::fs::meta::{Entry, Kind};
use crate::fs::relpath::RelPath;
use crate::fs::throttle::Throttle;
use crate::hash::blocktree::{self, BLOCK};
use crate::hash::digest::WINDOW;
use crate::hash::stream::{self, Item, Key, RangeHash, Tree, Walk, AFTER, HEADER};
use crate::protocol::{ErrorKind, Hash16, Reply, Request, Response, WireError};
use nix::fcntl::OFlag;
use std::cmp::Ordering;
use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

/// Entries one range holds at most.
pub const MAX_ENTRIES: u64 = 16384;

/// The entries limit: [`MAX_ENTRIES`], or lower with the test knob
/// `GEOREP_AGENT_VERIFY_MAX_ENTRIES` (it can only lower it).
fn max_entries() -> u64 {
    std::env::var("GEOREP_AGENT_VERIFY_MAX_ENTRIES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(MAX_ENTRIES, |n| n.clamp(1, MAX_ENTRIES))
}
/// Content bytes one range covers at most.
pub const MAX_BYTES: u64 = 1 << 30;
/// Encoded items one range holds at most (and so what is kept of it).
pub const MAX_ITEM_BYTES: usize = 4 << 20;
/// Ranges whose items are kept for `VerifyItems`.
const KEPT: usize = 2;
/// Verification requests waiting at most.
const QUEUE: usize = 8;
/// Items per reply frame, by encoded size.
const FRAME_BYTES: usize = 1 << 20;

type Job = (u64, Request);

/// The verification thread, started by the first request.
pub struct Verifier {
    out: Replies,
    worker: Option<(mpsc::SyncSender<Job>, JoinHandle<()>)>,
    stop: Arc<AtomicBool>,
}

/// The answer to `VerifyCaps`.
pub fn caps() -> Reply {
    Reply::VerifyCaps {
        owners: super::root::is_root_user(),
        max_entries: max_entries(),
        max_bytes: MAX_BYTES,
    }
}

impl Verifier {
    pub fn new(out: Replies) -> Verifier {
        Verifier {
            out,
            worker: None,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Queues a verification request; its answer is sent by the thread.
    pub fn submit(&mut self, root: &Root, id: u64, req: Request) -> WResult<()> {
        if self.worker.is_none() {
            let root = root
                .try_clone()
                .map_err(|e| io_err(e, "duplicate", &"the slave root"))?;
            let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE);
            let (out, stop) = (self.out.clone(), self.stop.clone());
            let handle = std::thread::Builder::new()
                .name("agent-verify".into())
                .spawn(move || serve(root, rx, out, stop))
                .map_err(|e| io_err(e, "start", &"the verification thread"))?;
            self.worker = Some((tx, handle));
        }
        let (tx, _) = self.worker.as_ref().expect("started above");
        match tx.try_send((id, req)) {
            Ok(()) => Ok(()),
            Err(mpsc::TrySendError::Full(_)) => Err(WireError::new(
                ErrorKind::Busy,
                format!("more than {QUEUE} verification requests waiting: wait for their answers"),
            )),
            Err(mpsc::TrySendError::Disconnected(_)) => Err(WireError::new(
                ErrorKind::Io,
                "the verification thread ended",
            )),
        }
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        self.stop.store(true, AtomicOrdering::Relaxed);
        if let Some((tx, handle)) = self.worker.take() {
            drop(tx);
            let _ = handle.join();
        }
    }
}

/// The slave tree as the walk reads it: listings through the confined root.
struct SlaveTree<'a> {
    root: &'a Root,
}

impl Tree for SlaveTree<'_> {
    type Entry = Entry;
    type Error = WireError;
    fn list(&mut self, dir: &RelPath) -> WResult<Vec<Entry>> {
        // Temporaries count as in use: verification never removes anything.
        let mut v = Vec::new();
        match self.root.list(dir, &|_| true, false, &mut |e| {
            v.push(e);
            Ok(())
        }) {
            Err(e) if e.kind == ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
            Ok(()) => Ok(v),
        }
    }
    fn root(&mut self) -> WResult<Entry> {
        self.root
            .stat(&RelPath::root())?
            .ok_or_else(|| WireError::new(ErrorKind::NotFound, "the slave root is gone"))
    }
    fn entry(e: &Entry) -> &Entry {
        e
    }
}

/// What one range gave.
struct RangeOut {
    hash: crate::protocol::Hash32,
    entries: u64,
    bytes: u64,
    stopped: Option<Key>,
    items: Vec<Item>,
}

/// A range hashed earlier, kept for its items.
struct Kept {
    rid: u64,
    from: Key,
    to: Key,
    owners: bool,
    items: Vec<Item>,
}

/// A walk left where a range ended, for the range that starts there.
struct Cont {
    at: Key,
    walk: Walk<Entry>,
    /// Entries already taken from the walk that the next range starts with:
    /// a file the range's end cut, and the first entry beyond it.
    held: VecDeque<(RelPath, Entry)>,
    when: std::time::Instant,
}

/// A walk older than this is not continued (its listings may be stale).
const CONTINUE: std::time::Duration = std::time::Duration::from_secs(30);

struct State {
    root: Root,
    /// Where the last range ended, if it ran to its end.
    cont: Option<Cont>,
    kept: VecDeque<Kept>,
    buf: Vec<u8>,
    /// For the second of two windows hashed at once.
    buf2: Vec<u8>,
    stop: Arc<AtomicBool>,
}

fn send(out: &Replies, id: u64, last: bool, result: WResult<Reply>) {
    out.send(&Response { id, last, result });
}

fn stopped() -> WireError {
    WireError::new(ErrorKind::Io, "verification stopped: the agent is exiting")
}

fn serve(root: Root, rx: mpsc::Receiver<Job>, out: Replies, stop: Arc<AtomicBool>) {
    let mut st = State {
        root,
        cont: None,
        kept: VecDeque::new(),
        buf: Vec::new(),
        buf2: Vec::new(),
        stop,
    };
    while let Ok((id, req)) = rx.recv() {
        if st.stop.load(AtomicOrdering::Relaxed) {
            return;
        }
        match req {
            Request::VerifyRange {
                rid,
                from,
                to,
                rate,
                owners,
            } => {
                let res = st.range(&from, &to, rate, owners).map(|r| {
                    let reply = Reply::RangeHash {
                        hash: r.hash,
                        items: r.items.len() as u64,
                        entries: r.entries,
                        bytes: r.bytes,
                        stopped: r.stopped,
                    };
                    st.keep(Kept {
                        rid,
                        from,
                        to,
                        owners,
                        items: r.items,
                    });
                    reply
                });
                send(&out, id, true, res);
            }
            Request::VerifyItems {
                rid,
                from,
                to,
                rate,
                owners,
            } => match st.items(rid, &from, &to, rate, owners) {
                Ok(items) => send_items(&out, id, items),
                Err(e) => send(&out, id, true, Err(e)),
            },
            Request::VerifyBlocks {
                path,
                offset,
                len,
                rate,
            } => {
                let res = st.blocks(&path, offset, len, rate);
                send(&out, id, true, res.map(Reply::BlockHashes));
            }
            Request::VerifyJournal { path, length, rate } => {
                let res = st.journal(&path, length, rate);
                send(&out, id, true, res);
            }
            _ => send(
                &out,
                id,
                true,
                Err(WireError::new(
                    ErrorKind::Invalid,
                    "not a verification request",
                )),
            ),
        }
    }
}

/// Sends items in frames of bounded encoded size.
fn send_items(out: &Replies, id: u64, items: Vec<Item>) {
    let mut chunk = Vec::new();
    let mut size = 0;
    for item in items {
        size += item.encoded_len();
        chunk.push(item);
        if size >= FRAME_BYTES {
            send(out, id, false, Ok(Reply::Items(std::mem::take(&mut chunk))));
            size = 0;
        }
    }
    send(out, id, true, Ok(Reply::Items(chunk)));
}

/// Opens a regular file of the slave read-only, without following symlinks.
fn open_file(root: &Root, path: &RelPath) -> WResult<File> {
    let (dir, name) = root.parent(path)?;
    let fd = open_nofollow(dir.as_fd(), OsStr::from_bytes(name), false)
        .map_err(|e| errno_err(e, "open", path))?;
    let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| errno_err(e, "stat", path))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(WireError::new(
            ErrorKind::NotFound,
            format!("{path}: not a regular file"),
        ));
    }
    nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()))
        .map_err(|e| errno_err(e, "open", path))?;
    Ok(File::from(fd))
}

/// The windows of a file of `n` windows at `path` that lie in `(from, to]`.
fn window_span(path: &RelPath, n: u64, from: &Key, to: &Key) -> (u64, u64) {
    let first = if &from.path == path {
        from.pos.saturating_sub(1)
    } else {
        0
    };
    let end = if &to.path == path && to.pos != AFTER {
        n.min(to.pos.saturating_sub(1))
    } else {
        n
    };
    (first, end)
}

impl State {
    fn keep(&mut self, k: Kept) {
        if self.kept.len() >= KEPT {
            self.kept.pop_front();
        }
        self.kept.push_back(k);
    }

    fn items(
        &mut self,
        rid: u64,
        from: &Key,
        to: &Key,
        rate: u64,
        owners: bool,
    ) -> WResult<Vec<Item>> {
        if let Some(i) = self
            .kept
            .iter()
            .position(|k| k.rid == rid && &k.from == from && &k.to == to && k.owners == owners)
        {
            return Ok(self.kept.remove(i).expect("found").items);
        }
        self.range(from, to, rate, owners).map(|r| r.items)
    }

    fn range(&mut self, from: &Key, to: &Key, rate: u64, owners: bool) -> WResult<RangeOut> {
        let throttle = Throttle::new(rate);
        let mut tree = SlaveTree { root: &self.root };
        // Going on from where the previous range ended (recently): the
        // directories on the way are not listed again.
        let (mut walk, mut held) = match self.cont.take() {
            Some(c) if &c.at == from && c.when.elapsed() < CONTINUE => (c.walk, c.held),
            _ => (Walk::new(from.clone()), VecDeque::new()),
        };
        // The last entry taken: a file `to` cuts is taken again next time.
        let mut last: Option<(RelPath, Entry)> = None;
        let mut out = RangeOut {
            hash: [0; 32],
            entries: 0,
            bytes: 0,
            stopped: None,
            items: Vec::new(),
        };
        let mut h = RangeHash::new();
        let mut item_bytes = 0usize;
        let max_entries = max_entries();
        let mut push = |out: &mut RangeOut, item: Item, item_bytes: &mut usize| {
            *item_bytes += item.encoded_len();
            h.add(&item);
            out.items.push(item);
        };
        'walk: loop {
            let next = match held.pop_front() {
                Some(x) => Some(x),
                None => walk.next(&mut tree)?.map(|(p, e)| (p, e.clone())),
            };
            let Some((path, e)) = next else { break };
            let header = Key::new(path.clone(), HEADER);
            if stream::cmp(&header, to) == Ordering::Greater {
                held.push_front((path, e));
                break;
            }
            last = Some((path.clone(), e.clone()));
            let (kind, size) = (e.kind, e.size);
            if stream::cmp(&header, from) == Ordering::Greater {
                if out.entries >= max_entries || item_bytes >= MAX_ITEM_BYTES {
                    out.stopped = out.items.last().map(Item::key);
                    break;
                }
                let item = Item::entry(path.clone(), &e, owners);
                push(&mut out, item, &mut item_bytes);
                out.entries += 1;
            }
            if kind != Kind::File || size == 0 {
                continue;
            }
            let (first, end) = window_span(&path, stream::windows(size), from, to);
            if first >= end {
                continue;
            }
            let file = match open_file(&self.root, &path) {
                Ok(f) => f,
                // Gone or replaced since listed: its windows are left out.
                Err(e) if e.kind == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            // Windows are hashed two at a time, the second on a thread of
            // its own: the slave's reading is the verification's critical
            // path (the master's hashes mostly come from its cache).
            let mut ahead: Option<std::io::Result<crate::hash::Hash32>> = None;
            for k in first..end {
                let (off, len) = stream::window_range(size, k);
                if (out.bytes + len > MAX_BYTES || item_bytes >= MAX_ITEM_BYTES)
                    && !out.items.is_empty()
                {
                    out.stopped = out.items.last().map(Item::key);
                    break 'walk;
                }
                let result = match ahead.take() {
                    Some(r) => r,
                    None => {
                        if !throttle.take(len, &self.stop) {
                            return Err(stopped());
                        }
                        let next = stream::window_range(size, k + 1);
                        let pair = k + 1 < end && out.bytes + len + next.1 <= MAX_BYTES;
                        if pair && !throttle.take(next.1, &self.stop) {
                            return Err(stopped());
                        }
                        let (buf, buf2, f) = (&mut self.buf, &mut self.buf2, &file);
                        std::thread::scope(|s| {
                            let second = pair.then(|| {
                                s.spawn(move || stream::window_hash(f, next.0, next.1, buf2))
                            });
                            let r = stream::window_hash(f, off, len, buf);
                            ahead = second.map(|t| t.join().expect("hashing panicked"));
                            r
                        })
                    }
                };
                let hash = match result {
                    Ok(hash) => hash,
                    // Shorter than listed (truncated meanwhile): no more windows.
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(io_err(e, "read", &path)),
                };
                let item = Item::Window {
                    path: path.clone(),
                    index: k,
                    hash,
                };
                push(&mut out, item, &mut item_bytes);
                out.bytes += len;
            }
        }
        out.hash = h.finish();
        if out.stopped.is_none() {
            if let Some((p, e)) = last.filter(|(p, e)| p == &to.path && e.kind == Kind::File) {
                held.push_front((p, e));
            }
            self.cont = Some(Cont {
                at: to.clone(),
                walk,
                held,
                when: std::time::Instant::now(),
            });
        }
        Ok(out)
    }

    /// Checks a journal up to `length` point by point (checksums
    /// included), keeping only counts: memory stays bounded whatever its size.
    fn journal(&mut self, path: &RelPath, length: u64, rate: u64) -> WResult<Reply> {
        use crate::catalog::cdp;
        let file = open_file(&self.root, path)?;
        let size = file.metadata().map_err(|e| io_err(e, "stat", path))?.len();
        if size < length {
            return Err(WireError::new(
                ErrorKind::Invalid,
                format!("{path}: {size} bytes, shorter than the {length} asked"),
            ));
        }
        let throttle = Throttle::new(rate);
        let bad =
            |e: cdp::JournalError| WireError::new(ErrorKind::Mismatch, format!("{path}: {e}"));
        let mut s = cdp::Scanner::new(&file, length, true).map_err(bad)?;
        let header = s.header.clone();
        let (mut end, mut points, mut last, mut paced) = (cdp::HEADER_LEN, 0u64, header.start, 0);
        while let Some(span) = s.next_span().map_err(bad)? {
            if !throttle.take(span.end - paced, &self.stop) {
                return Err(stopped());
            }
            paced = span.end;
            (end, last) = (span.end, span.time);
            points += 1;
        }
        Ok(Reply::Journal {
            end,
            points,
            last,
            start: header.start,
            base: header.base_time,
            base_name: header.base_name,
        })
    }

    fn blocks(&mut self, path: &RelPath, offset: u64, len: u64, rate: u64) -> WResult<Vec<Hash16>> {
        if len > WINDOW || offset % BLOCK != 0 || (offset % WINDOW) + len > WINDOW {
            return Err(WireError::new(
                ErrorKind::Invalid,
                format!("bad block request: {len} bytes at {offset} (at most one {WINDOW}-byte window, {BLOCK}-byte aligned)"),
            ));
        }
        let file = open_file(&self.root, path)?;
        let size = file.metadata().map_err(|e| io_err(e, "stat", path))?.len();
        let len = len.min(size.saturating_sub(offset));
        if !Throttle::new(rate).take(len, &self.stop) {
            return Err(stopped());
        }
        self.buf.clear();
        self.buf.resize(len as usize, 0);
        file.read_exact_at(&mut self.buf, offset)
            .map_err(|e| io_err(e, "read", path))?;
        let mut cvs = Vec::with_capacity(self.buf.len().div_ceil(BLOCK as usize));
        blocktree::block_cvs(offset % WINDOW, &self.buf, &mut cvs);
        Ok(cvs.iter().map(blocktree::key).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::stream::{window_pos, BEFORE};

    #[test]
    fn a_range_takes_exactly_the_windows_between_its_keys() {
        let p = RelPath::new(b"d/f".to_vec()).unwrap();
        let other = RelPath::new(b"d/e".to_vec()).unwrap();
        let at = |pos| Key::new(p.clone(), pos);
        assert_eq!(
            window_span(&p, 5, &Key::before(&other), &Key::after(&other)),
            (0, 5)
        );
        assert_eq!(window_span(&p, 5, &at(BEFORE), &at(AFTER)), (0, 5));
        assert_eq!(window_span(&p, 5, &at(HEADER), &at(window_pos(2))), (0, 3));
        assert_eq!(window_span(&p, 5, &at(window_pos(2)), &at(AFTER)), (3, 5));
        assert_eq!(
            window_span(&p, 5, &at(window_pos(1)), &at(window_pos(1))),
            (2, 2)
        );
        assert_eq!(window_span(&p, 5, &at(BEFORE), &at(HEADER)), (0, 0));
    }
}
