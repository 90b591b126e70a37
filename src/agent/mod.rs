//! The slave-side agent, `georep agent --root DIR`: serves the protocol on
//! any byte stream (stdin/stdout under SSH or as a local child, a socket in
//! tests) and confines every operation to its root.

mod basis;
mod catalog;
mod conn;
mod dr;
mod files;
mod inplace;
mod meta;
pub mod promote;
pub mod quarantine;
mod queue;
mod remove;
pub mod role;
mod root;
mod settings;
mod streams;
mod sys;
mod transfers;
mod undo;
mod verify;

pub use root::Root;
pub use settings::Policy;

use crate::protocol::{
    Envelope, ErrorKind, Reply, Request, Response, WireError, MAX_FRAME, PROTOCOL_VERSION,
};
use conn::{Conn, Incoming, Replies};
use files::Files;
use nix::fcntl::{Flock, FlockArg};
use queue::TryPop;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Settings of one agent run.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub root: PathBuf,
    /// Exit when no frame arrives for this long (the worker pings well within it).
    pub keepalive: Duration,
}

/// Why an agent run ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("reading requests: {0}")]
    Input(std::io::Error),
    #[error("writing replies: {0}")]
    Output(std::io::Error),
    #[error("no request for {0} s: the worker is gone (keep-alive timeout)")]
    KeepAlive(u64),
    #[error("{0}")]
    Refused(String),
}

/// Serves one connection until the input ends. Frames that cannot be
/// decoded are answered with an error and the connection is closed;
/// nothing outside `opts.root` is ever touched.
pub fn serve<R, W>(opts: &AgentOptions, input: R, output: W) -> Result<(), AgentError>
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    let (conn, writer) = conn::start(input, output);
    let result = run(opts, &conn);
    conn.requests.close();
    conn.replies.close();
    let written = writer.join().unwrap_or(Ok(()));
    result?;
    written.map_err(AgentError::Output)
}

/// How long idle input is waited for before the files waiting are
/// published (more files in the batch, fewer syncs).
const BATCH_WAIT: std::time::Duration = std::time::Duration::from_millis(3);
/// How long a file waits for its batch while input keeps coming.
const MAX_HOLD: std::time::Duration = std::time::Duration::from_millis(50);

struct Agent<'a> {
    root: Root,
    files: Files,
    out: &'a Replies,
    /// Verification requests, served on a thread of their own.
    verify: verify::Verifier,
    /// Other agents of a stream group share the root: temporaries that
    /// are not this agent's may be theirs.
    grouped: bool,
    /// Holds the root's lock (not an agent that joined a group).
    primary: bool,
    /// The root's role and the worker's claim: writes of a fenced writer are refused.
    fence: role::Fence,
    /// A failback's quarantine being built (see `quarantine`).
    quarantine: Option<quarantine::Building>,
}

fn run(opts: &AgentOptions, conn: &Conn) -> Result<(), AgentError> {
    let out = &conn.replies;
    let send = |id: u64, result: Result<Reply, WireError>| {
        out.send(&Response {
            id,
            last: true,
            result,
        });
    };
    let keepalive = |_| AgentError::KeepAlive(opts.keepalive.as_secs());
    // The handshake comes first, whatever the root's state, so that the
    // worker always gets a reason rather than a closed pipe.
    let first = match conn.recv(opts.keepalive).map_err(keepalive)? {
        Some(Incoming::Frame(env)) => env,
        Some(Incoming::Garbage(why)) => return Err(AgentError::Refused(why)),
        None => return Ok(()),
    };
    let (version, token) = match first.body {
        Request::Hello { version, .. } => (version, None),
        Request::HelloStream { version, token, .. } => (version, Some(token)),
        _ => {
            send(
                first.id,
                Err(WireError::new(ErrorKind::Invalid, "expected Hello first")),
            );
            return Err(AgentError::Refused("no handshake".into()));
        }
    };
    if version != PROTOCOL_VERSION {
        let msg = format!(
            "the worker speaks protocol {version}, this agent (georep {}) speaks {PROTOCOL_VERSION}: install the same georep version on both sites",
            env!("CARGO_PKG_VERSION")
        );
        send(
            first.id,
            Err(WireError::new(ErrorKind::Version, msg.clone())),
        );
        return Err(AgentError::Refused(msg));
    }
    // The state directory exists before any crawl, so creating it never
    // moves the root's mtime after the worker has set it; the slave's
    // settings are in it. A primary agent takes the root's lock; an agent
    // joining a stream group shows the group's token instead.
    let opened = match token {
        None => open_root(&opts.root).map(|(r, l)| (r, Some(l))),
        Some(t) => Root::open(&opts.root)
            .map_err(|e| {
                WireError::new(
                    ErrorKind::NotFound,
                    format!("slave root {}: {e}", opts.root.display()),
                )
            })
            .and_then(|r| {
                streams::check_token(&r, &t)?;
                let slot = streams::take_slot(&r)?;
                Ok((r, Some(slot)))
            }),
    }
    .and_then(|(mut r, l)| {
        let state = r.state_dir()?;
        r.set_policy(Policy::load(std::os::fd::AsFd::as_fd(&state))?);
        Ok((r, l))
    });
    let (root, _lock) = match opened {
        Ok(r) => r,
        Err(e) => {
            send(first.id, Err(e.clone()));
            return Err(AgentError::Refused(e.message));
        }
    };
    send(
        first.id,
        Ok(Reply::HelloOk {
            version: PROTOCOL_VERSION,
            agent: env!("CARGO_PKG_VERSION").to_string(),
            root: opts.root.display().to_string(),
        }),
    );
    // Interrupted in-place updates are rolled back before anything is served.
    // A joining agent leaves that to the primary, which may be mid-update.
    let primary = token.is_none();
    let files = if primary {
        Files::start(&root)
    } else {
        Files::joiner(&root)
    };
    let fence = if primary {
        role::Fence::load(&root)
    } else {
        role::Fence::load(&root).joined()
    };
    conn.serving();
    let mut agent = Agent {
        root,
        files,
        out,
        verify: verify::Verifier::new(out.clone()),
        grouped: !primary,
        primary,
        fence,
        quarantine: None,
    };
    {
        let out = out.clone();
        agent.files.start_publisher(
            &agent.root,
            Box::new(move |id, res| {
                let result = res.map(|written| Reply::Committed { written });
                if id != 0 || result.is_err() {
                    out.send(&Response {
                        id,
                        last: true,
                        result,
                    });
                }
            }),
        );
    }
    let result = loop {
        let msg = match conn.try_recv() {
            TryPop::Item(m) => Some(m),
            TryPop::Empty => {
                // Input is idle. Files waiting to be published wait a
                // moment for more (a batch shares one sync), then go to the
                // publisher, and the next requests are served meanwhile.
                let more = if agent.files.has_pending() {
                    conn.recv_within(BATCH_WAIT).ok()
                } else {
                    None
                };
                match more {
                    Some(m) => m,
                    None => {
                        agent.publish_behind(true);
                        match conn.recv(opts.keepalive) {
                            Ok(m) => m,
                            Err(()) => break Err(keepalive(())),
                        }
                    }
                }
            }
            TryPop::Closed => None,
        };
        match msg {
            Some(Incoming::Frame(env)) => agent.handle(env),
            Some(Incoming::Garbage(why)) => {
                send(0, Err(WireError::new(ErrorKind::Invalid, why.clone())));
                break Err(AgentError::Refused(why));
            }
            None => break Ok(()),
        }
        if out.dead() {
            break Ok(()); // the writer's error says why
        }
        if agent.files.batch_full() {
            agent.publish_behind(true);
        } else if agent.files.pending_for(MAX_HOLD) {
            // Input keeps coming: what waits long enough goes now, if the
            // publisher is free.
            agent.publish_behind(false);
        }
    };
    agent.flush();
    agent.files.abort_all();
    if agent.primary && agent.grouped {
        streams::close_group(&agent.root);
    }
    result
}

/// Opens the root and takes its exclusive lock (held while the returned
/// lock lives). The lock is on the root's state directory, not on the
/// root itself: in a cascade (A -> B -> C) the root is also a master's
/// root, whose marker lock is an `flock` on that directory, and an agent
/// holding it for a daemon's whole life blocked every stamp there.
fn open_root(path: &Path) -> Result<(Root, Flock<std::fs::File>), WireError> {
    let root = Root::open(path).map_err(|e| {
        let fix = match e.kind() {
            std::io::ErrorKind::NotFound => {
                "create it on the slave or fix the session's slave path"
            }
            std::io::ErrorKind::PermissionDenied => "give the slave user access to it",
            _ => "check it on the slave",
        };
        WireError::new(
            ErrorKind::NotFound,
            format!("slave root {}: {e}: {fix}", path.display()),
        )
    })?;
    let dir = std::fs::File::from(root.state_dir()?);
    match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => {
            // A token left by a primary that died: its joiners join no more.
            streams::close_group(&root);
            Ok((root, lock))
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(WireError::new(
            ErrorKind::Busy,
            format!(
                "another georep agent is writing to {}: stop the other session or worker using it",
                path.display()
            ),
        )),
        Err((_, e)) => Err(WireError::new(
            ErrorKind::Io,
            format!("locking {}: {e}", path.display()),
        )),
    }
}

impl Agent<'_> {
    fn reply(&self, id: u64, result: Result<Reply, WireError>) {
        if id != 0 || result.is_err() {
            self.out.send(&Response {
                id,
                last: true,
                result,
            });
        }
    }

    fn flush(&mut self) {
        for (id, res) in self.files.flush(&self.root) {
            self.reply(id, res.map(|written| Reply::Committed { written }));
        }
    }

    /// Hands the pending commits to the publisher thread (see
    /// `files::publish`), which answers them once they are durable.
    fn publish_behind(&mut self, wait: bool) {
        for (id, res) in self.files.publish_behind(&self.root, wait) {
            self.reply(id, res.map(|written| Reply::Committed { written }));
        }
    }

    /// Publishes pending files first when `pred` says the next request depends on them.
    fn flush_if(&mut self, pred: impl Fn(&crate::fs::relpath::RelPath) -> bool) {
        if self.files.pending_matches(pred) {
            self.flush();
        }
    }

    fn handle(&mut self, env: Envelope) {
        let id = env.id;
        if self.files.needs_recovery() {
            self.files.recover(&self.root);
        }
        if let Err(e) = self.fence.check(&env.body) {
            return self.reply(id, Err(e));
        }
        let result = match env.body {
            Request::Hello { .. } | Request::HelloStream { .. } => {
                Err(WireError::new(ErrorKind::Invalid, "duplicate Hello"))
            }
            Request::Ping => Ok(Reply::Pong),
            Request::GetIdentity => self.root.identity().map(Reply::Identity),
            Request::SetIdentity(ident) => {
                self.flush();
                self.root.set_identity(&ident).map(|_| Reply::Done)
            }
            Request::ListDir { path } => {
                self.flush_if(|p| p.parent().as_ref() == Some(&path));
                return self.list(id, &path);
            }
            Request::Stat { path } => {
                self.flush_if(|p| p == &path);
                self.root.stat(&path).map(Reply::Stat)
            }
            Request::Mkdir { path, meta } => self.root.mkdir(&path, &meta).map(|_| Reply::Done),
            Request::Remove { path } => {
                self.flush_if(|p| p.as_bytes().starts_with(path.as_bytes()));
                self.root.remove(&path).map(|_| Reply::Done)
            }
            Request::Symlink { path, target, meta } => {
                self.flush_if(|p| p == &path);
                self.root
                    .symlink(&path, &target, &meta)
                    .map(|_| Reply::Done)
            }
            Request::Link { path, target } => {
                self.flush_if(|p| p == &path || p == &target);
                self.root.link(&path, &target).map(|_| Reply::Done)
            }
            Request::SetMeta { path, meta } => {
                self.flush_if(|p| p == &path || p.parent().as_ref() == Some(&path));
                self.root.set_meta(&path, &meta).map(|_| Reply::Done)
            }
            Request::OpenFile {
                fid,
                path,
                basis,
                size,
            } => {
                self.flush_if(|p| p == &path);
                self.files
                    .open(&self.root, fid, &path, basis.as_ref(), size)
                    .map(|basis_size| Reply::Opened { basis_size })
            }
            Request::OpenInPlace { fid, path, size } => {
                self.flush_if(|p| p == &path);
                self.files.open_in_place(&self.root, fid, &path, size).map(
                    |(basis_size, in_place)| Reply::OpenedInPlace {
                        basis_size,
                        in_place,
                    },
                )
            }
            Request::WindowHashes {
                fid,
                offset,
                len,
                window,
            } => self
                .files
                .window_hashes(fid, offset, len, window)
                .map(Reply::Hashes),
            Request::BlockHashes {
                fid,
                offset,
                len,
                block,
            } => self
                .files
                .block_hashes(fid, offset, len, block)
                .map(Reply::BlockHashes),
            Request::Signature {
                fid,
                offset,
                len,
                block,
            } => self
                .files
                .signature(fid, offset, len, block)
                .map(|s| Reply::Signature(s.into())),
            Request::Write { fid, offset, data } => {
                self.files.write(fid, offset, data.into_vec());
                return;
            }
            Request::Copy { fid, offset, len } => {
                self.files.copy(fid, offset, len);
                return;
            }
            Request::Patch {
                fid,
                offset,
                out_len,
                basis_off,
                basis_len,
                delta,
            } => {
                self.files
                    .patch(fid, offset, out_len, basis_off, basis_len, &delta);
                return;
            }
            Request::Commit { fid, digest, meta } => {
                match self.files.commit(id, fid, &digest, &meta) {
                    Ok(files::Committed::Later) => return, // answered when published
                    Ok(files::Committed::Now(written)) => Ok(Reply::Committed { written }),
                    Err(e) => Err(e),
                }
            }
            Request::Abort { fid } => {
                self.files.abort(fid);
                Ok(Reply::Done)
            }
            Request::PutFile {
                path,
                data,
                digest,
                meta,
            } => {
                self.flush_if(|p| p == &path);
                match self
                    .files
                    .put_file(&self.root, id, &path, &data, &digest, &meta)
                {
                    Ok(()) => return,
                    Err(e) => Err(e),
                }
            }
            // The casts are needed where the C types are narrower than u64.
            #[allow(clippy::unnecessary_cast)]
            Request::StatFs => nix::sys::statvfs::fstatvfs(self.root.fd())
                .map(|s| Reply::StatFs {
                    avail: s.blocks_available() as u64 * s.fragment_size() as u64,
                    total: s.blocks() as u64 * s.fragment_size() as u64,
                })
                .map_err(|e| WireError::new(ErrorKind::Io, format!("statfs: {e}"))),
            Request::Barrier => {
                self.flush();
                nix::unistd::syncfs(self.root.fd())
                    .map(|_| Reply::Done)
                    .map_err(|e| WireError::new(ErrorKind::Io, format!("syncfs: {e}")))
            }
            Request::Rename { from, to } => {
                self.flush_if(|p| {
                    p.as_bytes().starts_with(from.as_bytes())
                        || p.as_bytes().starts_with(to.as_bytes())
                });
                catalog::rename_noreplace(&self.root, &from, &to).map(|_| Reply::Done)
            }
            Request::ReadFile { path, offset, max } => {
                self.flush_if(|p| p == &path);
                catalog::read_file(&self.root, &path, offset, max).map(|d| Reply::Data(d.into()))
            }
            Request::JournalExtents { path, after, limit } => {
                self.flush_if(|p| p == &path);
                catalog::journal_extents(&self.root, &path, after, limit).map(Reply::Extents)
            }
            Request::AppendTail {
                path,
                at,
                data,
                digest,
                sync,
                check,
            } => {
                self.flush_if(|p| p == &path);
                catalog::append_tail(&self.root, &path, at, &data, &digest, sync, check)
                    .map(|written| Reply::Committed { written })
            }
            Request::VerifyCaps => Ok(verify::caps()),
            req @ (Request::VerifyRange { .. }
            | Request::VerifyItems { .. }
            | Request::VerifyBlocks { .. }
            | Request::VerifyJournal { .. }) => match self.verify.submit(&self.root, id, req) {
                Ok(()) => return, // answered by the verification thread
                Err(e) => Err(e),
            },
            body @ (Request::Claim { .. }
            | Request::Synced { .. }
            | Request::Promote { .. }
            | Request::QuarantineStep { .. }
            | Request::QuarantineResolve { .. }
            | Request::QuarantineCommit) => self.handle_dr(body),
            other => match self.handle_transfer(id, other) {
                Some(r) => r,
                None => return, // answered when published
            },
        };
        self.reply(id, result);
    }

    /// Sends a listing in frames of bounded encoded size, read entry by
    /// entry; an entry too large for any frame ends it with an error.
    fn list(&self, id: u64, path: &crate::fs::relpath::RelPath) {
        const FRAME_TARGET: usize = 4 << 20;
        let mut chunk: Vec<crate::fs::meta::Entry> = Vec::new();
        let mut size = 0;
        let files = &self.files;
        let res = self
            .root
            .list(path, &|n| files.in_use(n), self.grouped, &mut |e| {
                let n = postcard::to_stdvec(&e).map_or(usize::MAX, |v| v.len());
                if n > MAX_FRAME - (64 << 10) {
                    return Err(WireError::new(
                        ErrorKind::Invalid,
                        format!(
                            "{}: its metadata takes {n} bytes, more than a frame carries",
                            path.join(&e.name)
                                .map_or_else(|_| path.to_string(), |p| p.to_string())
                        ),
                    ));
                }
                if !chunk.is_empty() && size + n > FRAME_TARGET {
                    let sent = self.out.send(&Response {
                        id,
                        last: false,
                        result: Ok(Reply::Entries(std::mem::take(&mut chunk))),
                    });
                    if !sent {
                        return Err(WireError::new(ErrorKind::Io, "connection closed"));
                    }
                    size = 0;
                }
                size += n;
                chunk.push(e);
                Ok(())
            });
        match res {
            Ok(()) => self.reply(id, Ok(Reply::Entries(chunk))),
            Err(e) => self.reply(id, Err(e)),
        }
    }
}

/// Runs the agent on stdin/stdout (under SSH or as a local child).
pub fn run_stdio(opts: &AgentOptions) -> Result<(), AgentError> {
    raise_fd_limit();
    serve(opts, std::io::stdin(), std::io::stdout())
}

/// Raises the soft limit of open files to the hard one: up to 1,024 files
/// open plus two batches of pending commits (a file and its directory each)
/// exceed the soft limit of 1,024 that sshd's children often get. The agent
/// still bounds what it opens itself (`files::MAX_OPEN`, the batch sizes).
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::debug!(error = %e, soft, hard, "could not raise the open files limit");
            }
        }
    }
}
