//! The pipelined client side of the protocol: any number of requests in
//! flight over one byte stream, replies matched by id.

use super::{
    encode_frame, encode_frame_sized, Envelope, Hash16, Reply, Request, Response, WireError,
    BANNER, MAX_FRAME, PROTOCOL_VERSION,
};
mod writer;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use writer::write_loop;

/// Bytes of encoded frames queued for the transport at most: bounds the
/// worker's memory whatever the number of requests in flight.
const SEND_BUDGET: usize = 8 << 20;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProtoError {
    #[error("connection to the agent lost: {0}")]
    Lost(String),
    #[error("the connection to the agent stalled: a keep-alive went unanswered and nothing moved in either direction for {0} s (keep-alive timeout)")]
    Timeout(u64),
    #[error("{0}")]
    Remote(#[from] WireError),
    #[error("protocol violation: {0}")]
    Violation(String),
}

impl ProtoError {
    pub fn retry(&self) -> crate::error::Retry {
        use crate::error::Retry;
        match self {
            ProtoError::Lost(_) | ProtoError::Timeout(_) => Retry::Temporary,
            ProtoError::Remote(w) => w.retry(),
            ProtoError::Violation(_) => Retry::Permanent,
        }
    }

    /// Whether the connection itself is gone (as opposed to one request failing).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, ProtoError::Remote(_))
    }
}

/// Bytes that crossed the transport, counted at the frame level.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub frames_out: AtomicU64,
    /// What `bytes_out` would have been without compression.
    pub raw_out: AtomicU64,
}

type Slot = (oneshot::Sender<Result<Vec<Reply>, ProtoError>>, Vec<Reply>);

/// An encoded frame and its share of the send budget (none for pings).
type Frame = (Vec<u8>, Option<OwnedSemaphorePermit>);

struct Inner {
    budget: Arc<Semaphore>,
    /// Bytes of frames this client queued and the writer has not written.
    queued: AtomicUsize,
    pending: Mutex<HashMap<u64, Slot>>,
    closed: Mutex<Option<ProtoError>>,
    /// Woken when `closed` is set.
    on_close: tokio::sync::Notify,
    /// When bytes last moved in either direction (ms since `epoch`).
    moved_ms: AtomicU64,
    epoch: tokio::time::Instant,
    next_id: AtomicU64,
    stats: Arc<ClientStats>,
    agent: String,
    root: String,
    /// The handshake's round trip (the link's latency plus the agent's answer).
    rtt: Duration,
    /// The worker's bandwidth limit, shared by its streams (`bwlimit`).
    throttle: Mutex<Option<Arc<super::throttle::Throttle>>>,
    /// How frames are compressed (see `compress`), once negotiated.
    compression: Mutex<super::compress::Mode>,
    /// The writer task: aborted when the connection fails, so the frames
    /// it still queues give their share of the (possibly shared) send
    /// budget back even if the transport never drains.
    writer: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Inner {
    fn fail_all(&self, err: ProtoError) {
        let mut closed = self.closed.lock().unwrap();
        if closed.is_none() {
            *closed = Some(err.clone());
        }
        let reason = closed.clone().unwrap();
        drop(closed);
        self.on_close.notify_waiters();
        // The budget may be shared by a stream group: it is not closed
        // (waiters of this client fail in `send`), but the frames this
        // client still queues are dropped with the writer, so the other
        // streams get their room back even if this link never drains.
        if let Some(w) = self.writer.lock().unwrap().take() {
            w.abort();
        }
        let pending: Vec<Slot> = self
            .pending
            .lock()
            .unwrap()
            .drain()
            .map(|(_, s)| s)
            .collect();
        for (tx, _) in pending {
            let _ = tx.send(Err(reason.clone()));
        }
    }

    /// Records that bytes moved on the transport.
    fn moved(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.moved_ms.fetch_max(now, Ordering::Relaxed);
    }

    /// How long nothing has moved on the transport in either direction.
    fn still_for(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.moved_ms.load(Ordering::Relaxed)))
    }

    fn check_open(&self) -> Result<(), ProtoError> {
        match &*self.closed.lock().unwrap() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

/// A connected, handshaken protocol client. Cloning shares the connection;
/// dropping the last clone closes the agent's input, which makes it exit.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    tx: Arc<mpsc::UnboundedSender<Frame>>,
}

/// How an agent joins a stream group: the group's token, and the send
/// budget all its streams share (so memory does not grow with streams).
#[derive(Clone)]
pub struct Join {
    pub token: Hash16,
    pub budget: Arc<Semaphore>,
}

/// A reply on its way; await it when the answer is needed.
pub struct Ticket {
    rx: oneshot::Receiver<Result<Vec<Reply>, ProtoError>>,
}

impl Future for Ticket {
    type Output = Result<Vec<Reply>, ProtoError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Err(ProtoError::Lost("client shut down".into()))))
    }
}

impl Ticket {
    /// The reply of a single-frame request.
    pub async fn one(self) -> Result<Reply, ProtoError> {
        let mut v = self.await?;
        match v.len() {
            1 => Ok(v.pop().unwrap()),
            n => Err(ProtoError::Violation(format!(
                "expected one reply frame, got {n}"
            ))),
        }
    }
}

impl Client {
    /// Reads the agent's banner, starts the reader, writer and keep-alive
    /// tasks, and runs the versioned handshake.
    pub async fn connect<R, W>(
        reader: R,
        writer: W,
        keepalive: Duration,
    ) -> Result<Client, ProtoError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        Client::connect_as(reader, writer, keepalive, None).await
    }

    /// As [`connect`](Self::connect); with `token`, the agent joins the
    /// stream group of that token (`HelloStream`) instead of taking the root.
    pub async fn connect_as<R, W>(
        reader: R,
        writer: W,
        keepalive: Duration,
        join: Option<Join>,
    ) -> Result<Client, ProtoError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut reader = BufReader::with_capacity(256 << 10, reader);
        let mut banner = [0u8; 8];
        let n = read_up_to(&mut reader, &mut banner).await;
        if n != 8 || &banner != BANNER {
            let mut rest = [0u8; 200];
            let m = if n == 8 {
                tokio::time::timeout(
                    Duration::from_millis(300),
                    read_up_to(&mut reader, &mut rest),
                )
                .await
                .unwrap_or(0)
            } else {
                0
            };
            let mut text = banner[..n].to_vec();
            text.extend_from_slice(&rest[..m]);
            let text = String::from_utf8_lossy(&text).trim().replace('\n', " | ");
            return Err(if text.is_empty() {
                ProtoError::Lost("the agent exited before speaking the protocol".into())
            } else {
                ProtoError::Violation(format!(
                    "the slave did not answer with the georep protocol but with {text:?}"
                ))
            });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(ClientStats::default());
        let (token, budget) = match join {
            Some(j) => (Some(j.token), j.budget),
            None => (None, Arc::new(Semaphore::new(SEND_BUDGET))),
        };
        let mut inner = Inner {
            budget,
            queued: AtomicUsize::new(0),
            pending: Mutex::new(HashMap::new()),
            closed: Mutex::new(None),
            on_close: tokio::sync::Notify::new(),
            moved_ms: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
            next_id: AtomicU64::new(1),
            stats: stats.clone(),
            agent: String::new(),
            root: String::new(),
            rtt: Duration::ZERO,
            throttle: Mutex::new(None),
            compression: Mutex::new(super::compress::Mode::Off),
            writer: Mutex::new(None),
        };
        // Handshake before the tasks exist, so the agent's identity is immutable afterwards.
        let mut writer = BufWriter::with_capacity(256 << 10, writer);
        let body = match token {
            None => Request::Hello {
                version: PROTOCOL_VERSION,
                client: client_name(),
            },
            Some(token) => Request::HelloStream {
                version: PROTOCOL_VERSION,
                client: client_name(),
                token,
            },
        };
        let hello = Envelope { id: 1, body };
        let frame = encode_frame(&hello).map_err(|e| ProtoError::Violation(e.to_string()))?;
        let sent = std::time::Instant::now();
        writer.write_all(&frame).await.map_err(lost)?;
        writer.flush().await.map_err(lost)?;
        let resp = read_response(&mut reader, &stats).await?;
        inner.rtt = sent.elapsed();
        match resp.result {
            Ok(Reply::HelloOk { version, agent, root }) if version == PROTOCOL_VERSION => {
                inner.agent = agent;
                inner.root = root;
            }
            Ok(Reply::HelloOk { version, agent, .. }) => {
                return Err(ProtoError::Remote(WireError::new(
                    super::ErrorKind::Version,
                    format!("the slave's georep {agent} speaks protocol {version}, this one {PROTOCOL_VERSION}: install the same georep version on both sites"),
                )))
            }
            Ok(other) => return Err(ProtoError::Violation(format!("unexpected handshake reply {other:?}"))),
            Err(e) => return Err(ProtoError::Remote(e)),
        }
        inner.next_id.store(2, Ordering::Relaxed);
        let inner = Arc::new(inner);
        let w = tokio::spawn(write_loop(writer, rx, inner.clone()));
        *inner.writer.lock().unwrap() = Some(w.abort_handle());
        if inner.closed.lock().unwrap().is_some() {
            w.abort();
        }
        tokio::spawn(read_loop(reader, inner.clone()));
        let client = Client {
            inner: inner.clone(),
            tx: Arc::new(tx),
        };
        tokio::spawn(keepalive_loop(inner, Arc::downgrade(&client.tx), keepalive));
        Ok(client)
    }

    /// Sends a request and returns its reply ticket. The request is queued
    /// in call order before this returns, so requests issued one after
    /// another reach the agent in that order.
    pub async fn request(&self, body: Request) -> Result<Ticket, ProtoError> {
        self.inner.check_open()?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.inner
            .pending
            .lock()
            .unwrap()
            .insert(id, (tx, Vec::new()));
        let sent = if matches!(body, Request::Ping) {
            self.send_unbudgeted(Envelope { id, body })
        } else {
            self.send(Envelope { id, body }).await
        };
        if let Err(e) = sent {
            self.inner.pending.lock().unwrap().remove(&id);
            return Err(e);
        }
        Ok(Ticket { rx })
    }

    /// Sends a request that gets no reply (id 0).
    pub async fn post(&self, body: Request) -> Result<(), ProtoError> {
        self.inner.check_open()?;
        self.send(Envelope { id: 0, body }).await
    }

    /// Sends a request and waits for its single reply.
    pub async fn call(&self, body: Request) -> Result<Reply, ProtoError> {
        self.request(body).await?.one().await
    }

    async fn send(&self, env: Envelope) -> Result<(), ProtoError> {
        // Budget first, then encode: a request waiting for room holds its
        // data once, not twice.
        let payload = env.body.payload_len();
        let want = (payload + 64).min(SEND_BUDGET) as u32;
        self.inner.check_open()?;
        // The budget may be shared with other streams: waiting for room
        // ends when this client's connection fails, not only when room frees.
        let permit = tokio::select! {
            p = self.inner.budget.clone().acquire_many_owned(want) => {
                p.map_err(|_| self.closed_error())?
            }
            e = self.lost() => return Err(e),
        };
        let mut frame =
            encode_frame_sized(&env, payload).map_err(|e| ProtoError::Violation(e.to_string()))?;
        drop(env);
        self.inner
            .stats
            .raw_out
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        let mode = *self.inner.compression.lock().unwrap();
        if let Some(z) = super::compress::compress_frame(&frame, payload, mode) {
            frame = z;
        }
        let throttle = self.inner.throttle.lock().unwrap().clone();
        if let Some(t) = throttle {
            t.take(frame.len() as u64).await;
        }
        self.inner
            .stats
            .bytes_out
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        self.inner.stats.frames_out.fetch_add(1, Ordering::Relaxed);
        self.inner.queued.fetch_add(frame.len(), Ordering::Relaxed);
        self.tx
            .send((frame, Some(permit)))
            .map_err(|_| self.closed_error())
    }

    /// Queues a small frame without waiting for the send budget: a
    /// keep-alive must go out even while the budget is full (a stalled
    /// link fills it), or the stall would never be detected.
    fn send_unbudgeted(&self, env: Envelope) -> Result<(), ProtoError> {
        let frame = encode_frame(&env).map_err(|e| ProtoError::Violation(e.to_string()))?;
        self.inner
            .stats
            .bytes_out
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        self.inner.stats.frames_out.fetch_add(1, Ordering::Relaxed);
        self.inner.queued.fetch_add(frame.len(), Ordering::Relaxed);
        self.tx.send((frame, None)).map_err(|_| self.closed_error())
    }

    fn closed_error(&self) -> ProtoError {
        self.inner
            .closed
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| ProtoError::Lost("writer stopped".into()))
    }

    pub fn stats(&self) -> &ClientStats {
        &self.inner.stats
    }

    /// The counters, to read after the client is gone (holding them does
    /// not keep the connection open).
    pub fn stats_handle(&self) -> Arc<ClientStats> {
        self.inner.stats.clone()
    }

    /// The agent's version string from the handshake.
    pub fn agent_version(&self) -> &str {
        &self.inner.agent
    }

    /// The slave root as the agent names it.
    pub fn agent_root(&self) -> &str {
        &self.inner.root
    }

    /// The round trip time measured at the handshake.
    pub fn handshake_rtt(&self) -> Duration {
        self.inner.rtt
    }

    /// Bytes of frames queued for the transport and not yet written: how
    /// busy this connection is (streams are picked by it).
    pub fn queued_bytes(&self) -> usize {
        self.inner.queued.load(Ordering::Relaxed)
    }

    /// Asks the agent to accept frames compressed as `mode`; from then on
    /// frames are compressed as the agent accepted. Returns that mode.
    pub async fn negotiate(
        &self,
        mode: super::compress::Mode,
    ) -> Result<super::compress::Mode, ProtoError> {
        use super::compress::Mode;
        if mode == Mode::Off {
            return Ok(Mode::Off);
        }
        let accepted = match self
            .call(Request::Negotiate {
                compression: mode.name(),
            })
            .await?
        {
            Reply::Negotiated { compression } => Mode::parse(&compression).unwrap_or(Mode::Off),
            other => {
                return Err(ProtoError::Violation(format!(
                    "unexpected reply to Negotiate: {other:?}"
                )))
            }
        };
        *self.inner.compression.lock().unwrap() = accepted;
        Ok(accepted)
    }

    /// Charges every frame sent from now on to `throttle` (see `bwlimit`).
    pub fn set_throttle(&self, throttle: Arc<super::throttle::Throttle>) {
        *self.inner.throttle.lock().unwrap() = Some(throttle);
    }

    /// The send budget, to be shared by the other streams of a group.
    pub fn budget(&self) -> Arc<Semaphore> {
        self.inner.budget.clone()
    }

    /// The reason the connection closed, if it did.
    pub fn closed(&self) -> Option<ProtoError> {
        self.inner.closed.lock().unwrap().clone()
    }

    /// Resolves with the reason once the connection closes (the agent
    /// exited, the link broke, a keep-alive expired), so an idle worker
    /// notices at once. Holding it does not keep the connection open.
    pub fn lost(&self) -> impl Future<Output = ProtoError> + Send + 'static {
        let inner = self.inner.clone();
        async move {
            loop {
                let woken = inner.on_close.notified();
                if let Some(e) = inner.closed.lock().unwrap().clone() {
                    return e;
                }
                woken.await;
            }
        }
    }
}

fn client_name() -> String {
    format!("georep {} worker", env!("CARGO_PKG_VERSION"))
}

fn lost(e: std::io::Error) -> ProtoError {
    ProtoError::Lost(e.to_string())
}

async fn read_up_to<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(m) => n += m,
        }
    }
    n
}

async fn read_response<R: AsyncRead + Unpin>(
    r: &mut R,
    stats: &ClientStats,
) -> Result<Response, ProtoError> {
    let len = match r.read_u32_le().await {
        Ok(l) => l as usize,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(ProtoError::Lost("the agent closed the connection".into()))
        }
        Err(e) => return Err(lost(e)),
    };
    if len > MAX_FRAME {
        return Err(ProtoError::Violation(format!(
            "reply frame of {len} bytes exceeds the limit"
        )));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.map_err(lost)?;
    stats.bytes_in.fetch_add(4 + len as u64, Ordering::Relaxed);
    postcard::from_bytes(&buf).map_err(|e| ProtoError::Violation(format!("undecodable reply: {e}")))
}

async fn read_loop<R: AsyncRead + Unpin>(mut r: R, inner: Arc<Inner>) {
    loop {
        let resp = match read_response(&mut r, &inner.stats).await {
            Ok(resp) => resp,
            Err(e) => {
                inner.fail_all(e);
                return;
            }
        };
        inner.moved();
        let mut pending = inner.pending.lock().unwrap();
        let Some(slot) = pending.get_mut(&resp.id) else {
            drop(pending);
            inner.fail_all(ProtoError::Violation(format!(
                "reply to unknown request id {}",
                resp.id
            )));
            return;
        };
        match resp.result {
            Ok(reply) => {
                slot.1.push(reply);
                if resp.last {
                    let (tx, acc) = pending.remove(&resp.id).unwrap();
                    let _ = tx.send(Ok(acc));
                }
            }
            Err(e) => {
                let (tx, _) = pending.remove(&resp.id).unwrap();
                let _ = tx.send(Err(ProtoError::Remote(e)));
            }
        }
    }
}

/// Pings the agent every third of `keepalive`, and declares the
/// connection stalled when a ping has gone unanswered for `keepalive`
/// while nothing moved in either direction for as long: a slow link
/// carrying a long queue ahead of the ping is busy, not stalled. Ends
/// when the client is dropped.
async fn keepalive_loop(
    inner: Arc<Inner>,
    tx: std::sync::Weak<mpsc::UnboundedSender<Frame>>,
    keepalive: Duration,
) {
    let period = keepalive / 3;
    loop {
        tokio::time::sleep(period).await;
        let Some(sender) = tx.upgrade() else { return };
        let client = Client {
            inner: inner.clone(),
            tx: sender,
        };
        let mut ticket = match client.request(Request::Ping).await {
            Ok(t) => t,
            Err(_) => return,
        };
        drop(client);
        let sent = tokio::time::Instant::now();
        loop {
            match tokio::time::timeout(period, &mut ticket).await {
                Ok(_) => break,
                Err(_) if tx.strong_count() == 0 => return,
                Err(_) => {
                    if sent.elapsed() >= keepalive && inner.still_for() >= keepalive {
                        inner.fail_all(ProtoError::Timeout(keepalive.as_secs()));
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod stall_tests;

#[cfg(test)]
mod handshake_tests;
