//! A live connection to an agent: the protocol client, the agent's stderr
//! tail, and whatever keeps the transport alive.

use super::TransportError;
use crate::protocol::{Client, Join, Reply, Request};
use futures::future::BoxFuture;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

/// The last lines a child wrote to stderr, kept for error messages.
#[derive(Clone, Default)]
pub struct StderrTail(Arc<Mutex<VecDeque<String>>>);

impl StderrTail {
    pub fn push(&self, line: String) {
        let mut q = self.0.lock().unwrap();
        if q.len() >= 20 {
            q.pop_front();
        }
        q.push_back(line);
    }

    pub fn text(&self) -> String {
        self.0
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Collects a child's stderr lines (also logged) until it closes.
    pub fn collect<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
        &self,
        stderr: R,
        who: &'static str,
    ) {
        let tail = self.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!(target: "georep::agent", who, "{line}");
                tail.push(line);
            }
        });
    }
}

/// Whatever else keeps a transport alive (an SSH session and its remote
/// process): closed after the agent's input, or dropped with the connection.
pub trait Link: Send {
    /// Waits up to `timeout` for the agent to exit, then tears the link down.
    fn close(
        self: Box<Self>,
        timeout: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

    /// After the connection was lost: how the agent ended, as far as the
    /// link can tell within `timeout` (None: it cannot tell); then tears
    /// the link down.
    fn ended(
        self: Box<Self>,
        timeout: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send>>;
}

/// How a local agent process ended, in words.
pub fn describe_exit(pid: Option<u32>, status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    let who = match pid {
        Some(p) => format!("the agent (pid {p})"),
        None => "the agent".to_string(),
    };
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("{who} exited with code {c}"),
        (_, Some(sig)) => format!(
            "{who} was killed by signal {}",
            nix::sys::signal::Signal::try_from(sig)
                .map(|s| s.as_str())
                .unwrap_or("?")
        ),
        _ => format!("{who} ended"),
    }
}

/// Starts one more agent on the same slave, joining the stream group of
/// the token, over the same transport (a new SSH channel, a new child).
pub type Spawn = Arc<
    dyn Fn(Join, Duration) -> BoxFuture<'static, Result<Connection, TransportError>> + Send + Sync,
>;

/// A live connection: the protocol client and whatever keeps the
/// transport alive (a child process, a thread), and the other streams of
/// its group. Dropping it closes the agents' input and kills children
/// that have not exited.
pub struct Connection {
    pub client: Client,
    pub stderr: StderrTail,
    pub(super) child: Option<tokio::process::Child>,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
    pub(super) link: Option<Box<dyn Link>>,
    pub(super) spawn: Option<Spawn>,
    /// The other streams of this connection's group (see [`Connection::open_streams`]).
    streams: Vec<Connection>,
}

impl Connection {
    pub(super) fn new(
        client: Client,
        stderr: StderrTail,
        child: Option<tokio::process::Child>,
        thread: Option<std::thread::JoinHandle<()>>,
    ) -> Connection {
        Connection {
            client,
            stderr,
            child,
            thread,
            link: None,
            spawn: None,
            streams: Vec::new(),
        }
    }

    /// A connection kept alive by `link` (see [`Link`]).
    pub fn with_link(client: Client, stderr: StderrTail, link: Box<dyn Link>) -> Connection {
        let mut c = Connection::new(client, stderr, None, None);
        c.link = Some(link);
        c
    }

    /// The same connection, able to open more streams with `spawn`.
    pub(super) fn spawning(mut self, spawn: Spawn) -> Connection {
        self.spawn = Some(spawn);
        self
    }

    /// Opens streams until this connection has `n` (itself included): asks
    /// its agent for a group token and starts agents that join with it.
    /// Returns how many streams there are; fewer than `n` when the
    /// transport cannot start more (the error is logged, not fatal).
    pub async fn open_streams(&mut self, n: usize, keepalive: Duration) -> usize {
        let have = 1 + self.streams.len();
        if n <= have {
            return have;
        }
        let Some(spawn) = self.spawn.clone() else {
            return have;
        };
        let token = match self.client.call(Request::OpenStreams).await {
            Ok(Reply::StreamToken(t)) => t,
            Ok(other) => {
                tracing::warn!(reply = ?other, "the agent did not open streams");
                return have;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the agent did not open streams: one stream");
                return have;
            }
        };
        let join = Join {
            token,
            budget: self.client.budget(),
        };
        let started =
            futures::future::join_all((have..n).map(|_| spawn(join.clone(), keepalive))).await;
        for s in started {
            match s {
                Ok(c) => self.streams.push(c),
                Err(e) => tracing::warn!(error = %e, "could not open a stream"),
            }
        }
        1 + self.streams.len()
    }

    /// Whether the agent is reached over a network (SSH), not a local pipe.
    pub fn remote(&self) -> bool {
        self.link.is_some()
    }

    /// The round trip to the agent: the least of the handshake's and of a
    /// few pings' (one slow answer of a starting agent is not the link).
    pub async fn measure_rtt(&self) -> Duration {
        // The pings travel together: one round trip, not three.
        let pings = (0..3).map(|_| async {
            let t = std::time::Instant::now();
            self.client
                .call(Request::Ping)
                .await
                .ok()
                .map(|_| t.elapsed())
        });
        futures::future::join_all(pings)
            .await
            .into_iter()
            .flatten()
            .fold(self.client.handshake_rtt(), Duration::min)
    }

    /// The clients of every stream, this connection's first.
    pub fn clients(&self) -> Vec<Client> {
        std::iter::once(self.client.clone())
            .chain(self.streams.iter().map(|s| s.client.clone()))
            .collect()
    }

    /// Why a stream's connection was lost, the first found (None: all up).
    pub fn closed_error(&self) -> Option<crate::protocol::ProtoError> {
        std::iter::once(&self.client)
            .chain(self.streams.iter().map(|s| &s.client))
            .find_map(|c| c.closed())
    }

    /// Resolves when any stream's connection is lost.
    pub fn lost(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let all: Vec<_> = self.clients().iter().map(|c| Box::pin(c.lost())).collect();
        async move {
            futures::future::select_all(all).await;
        }
    }

    /// Whether any stream's connection was lost.
    pub fn broken(&self) -> bool {
        self.client.closed().is_some() || self.streams.iter().any(|s| s.client.closed().is_some())
    }

    /// Closes the agent's input (the caller must have dropped its other
    /// client clones) and waits for the agent to publish and exit; kills
    /// it after `timeout`. The other streams are closed first.
    pub async fn close(mut self, timeout: Duration) {
        let streams = std::mem::take(&mut self.streams);
        if !streams.is_empty() {
            futures::future::join_all(streams.into_iter().map(|s| s.close(timeout))).await;
            tracing::debug!("streams closed");
        }
        self.spawn = None;
        let child = self.child.take();
        let thread = self.thread.take();
        let link = self.link.take();
        drop(self);
        if let Some(link) = link {
            link.close(timeout).await;
        }
        if let Some(mut child) = child {
            if tokio::time::timeout(timeout, child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

impl Connection {
    /// After the connection was lost (the client is closed): how the agent
    /// ended — its exit status, or what the link can tell — waiting up to
    /// `timeout` for it; then tears everything down. None: nothing known.
    pub async fn ended(mut self, timeout: Duration) -> Option<String> {
        let child = self.child.take();
        let link = self.link.take();
        drop(self);
        if let Some(link) = link {
            return link.ended(timeout).await;
        }
        let mut child = child?;
        let pid = child.id();
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) => Some(describe_exit(pid, status)),
            _ => {
                let _ = child.kill().await;
                None
            }
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}
