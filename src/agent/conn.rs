//! The agent's connection: a reader thread decoding requests, the handler
//! (the caller's thread) and a writer thread, joined by queues bounded in
//! bytes. The writer falling behind (a master that does not read) fills the
//! reply queue, which stops the reader reading: memory stays bounded and
//! the master feels the back-pressure. Once the agent serves, the reader
//! answers pings itself, so a long request never makes the worker think
//! the agent is dead. A reply that cannot be encoded is answered with an
//! error; a failed write closes the queues, so nothing waits forever.

use super::queue::{Bounded, TryPop};
use crate::protocol::{
    encode_frame, read_frame, Envelope, ErrorKind, Reply, Request, Response, WireError, BANNER,
};
use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of encoded replies queued for the writer, at most.
pub const REPLY_BUDGET: usize = 32 << 20;
/// Bytes of decoded requests queued for the handler, at most (each counted
/// with its in-memory overhead).
pub const REQUEST_BUDGET: usize = 16 << 20;

pub enum Incoming {
    Frame(Envelope),
    Garbage(String),
}

/// Where replies go: encoded here, queued for the writer.
#[derive(Clone)]
pub struct Replies {
    q: Arc<Bounded<Vec<u8>>>,
}

impl Replies {
    /// Queues `resp` (waiting while the writer is behind). A reply too
    /// large to encode becomes an error reply. False once the writer is gone.
    pub fn send(&self, resp: &Response) -> bool {
        let frame = match encode_frame(resp) {
            Ok(f) => f,
            Err(e) => {
                let err = Response {
                    id: resp.id,
                    last: true,
                    result: Err(WireError::new(
                        ErrorKind::Invalid,
                        format!("the agent could not send its reply: {e}"),
                    )),
                };
                encode_frame(&err).expect("an error reply encodes")
            }
        };
        let n = frame.len();
        self.q.push(frame, n).is_ok()
    }

    /// Whether the writer stopped (the connection is gone).
    pub fn dead(&self) -> bool {
        self.q.is_closed()
    }

    /// No more replies: the writer ends once it wrote what is queued.
    pub fn close(&self) {
        self.q.close();
    }
}

/// The handler's side of a connection.
pub struct Conn {
    pub requests: Arc<Bounded<Incoming>>,
    pub replies: Replies,
    last_input: Arc<AtomicU64>,
    started: Instant,
    ready: Arc<AtomicBool>,
}

impl Conn {
    /// From now on the reader answers pings (the handshake and the start-up
    /// recovery are done).
    pub fn serving(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Milliseconds since the last frame arrived.
    fn idle_ms(&self) -> u64 {
        // Saturating: the reader may store a newer time than the one just read.
        (self.started.elapsed().as_millis() as u64)
            .saturating_sub(self.last_input.load(Ordering::Relaxed))
    }

    /// Waits for the next message, enforcing the keep-alive timeout:
    /// `Err` when nothing arrived for `keepalive`, `Ok(None)` at the end.
    pub fn recv(&self, keepalive: Duration) -> Result<Option<Incoming>, ()> {
        loop {
            match self.requests.pop_timeout(Duration::from_secs(1)) {
                Ok(m) => return Ok(m),
                Err(()) if self.idle_ms() > keepalive.as_millis() as u64 => return Err(()),
                Err(()) => {}
            }
        }
    }

    /// The next message if one arrives within `wait` (`Err`: none did).
    pub fn recv_within(&self, wait: Duration) -> Result<Option<Incoming>, ()> {
        self.requests.pop_timeout(wait)
    }

    pub fn try_recv(&self) -> TryPop<Incoming> {
        self.requests.try_pop()
    }
}

/// Starts the reader and writer threads on `input` and `output`; the
/// writer's result comes from the returned handle once the replies close.
pub fn start<R, W>(input: R, output: W) -> (Conn, std::thread::JoinHandle<std::io::Result<()>>)
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    let replies = Replies {
        q: Arc::new(Bounded::new(REPLY_BUDGET)),
    };
    let writer = {
        let q = replies.q.clone();
        std::thread::Builder::new()
            .name("agent-writer".into())
            .spawn(move || {
                let res = write_loop(output, &q);
                q.close();
                res
            })
            .expect("spawn writer")
    };
    let conn = Conn {
        requests: Arc::new(Bounded::new(REQUEST_BUDGET)),
        replies: replies.clone(),
        last_input: Arc::new(AtomicU64::new(0)),
        started: Instant::now(),
        ready: Arc::new(AtomicBool::new(false)),
    };
    {
        let (requests, last, ready, started) = (
            conn.requests.clone(),
            conn.last_input.clone(),
            conn.ready.clone(),
            conn.started,
        );
        std::thread::Builder::new()
            .name("agent-reader".into())
            .spawn(move || {
                read_loop(input, &requests, &replies, &last, &ready, started);
                requests.close();
            })
            .expect("spawn reader");
    }
    (conn, writer)
}

fn read_loop<R: Read>(
    input: R,
    requests: &Bounded<Incoming>,
    replies: &Replies,
    last: &AtomicU64,
    ready: &AtomicBool,
    started: Instant,
) {
    let mut r = BufReader::with_capacity(256 << 10, input);
    let mut buf = Vec::new();
    loop {
        // Back-pressure: nothing more is read while the writer is behind.
        if !replies.q.wait_room() || requests.is_closed() {
            return;
        }
        match read_frame(&mut r, &mut buf) {
            Ok(None) => return,
            Ok(Some(())) => {
                last.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                let env = match postcard::from_bytes::<Envelope>(&buf) {
                    Ok(env) => env,
                    Err(e) => {
                        let _ = requests
                            .push(Incoming::Garbage(format!("undecodable request: {e}")), 0);
                        return;
                    }
                };
                if matches!(env.body, Request::Ping) && ready.load(Ordering::Acquire) {
                    if env.id != 0 {
                        let pong = Response {
                            id: env.id,
                            last: true,
                            result: Ok(Reply::Pong),
                        };
                        if !replies.send(&pong) {
                            return;
                        }
                    }
                    continue;
                }
                let cost = buf.len() + std::mem::size_of::<Incoming>() + 64;
                if requests.push(Incoming::Frame(env), cost).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = requests.push(Incoming::Garbage(e.to_string()), 0);
                return;
            }
        }
    }
}

fn write_loop<W: Write>(output: W, q: &Bounded<Vec<u8>>) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(256 << 10, output);
    w.write_all(BANNER)?;
    w.flush()?;
    while let Some(frame) = q.pop() {
        w.write_all(&frame)?;
        while let TryPop::Item(frame) = q.try_pop() {
            w.write_all(&frame)?;
        }
        w.flush()?;
    }
    w.flush()
}
