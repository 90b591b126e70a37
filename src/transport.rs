//! Transports: how the worker reaches an agent. Every transport yields a
//! byte stream pair for the same protocol; only the way of getting it
//! differs (a local child process, SSH, an in-process thread for tests).

use crate::agent::AgentOptions;
use crate::protocol::{Client, ProtoError};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

/// Failures setting up or keeping a transport, with what the child said.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("starting {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{error}{}", stderr_suffix(.stderr))]
    Protocol { error: ProtoError, stderr: String },
    #[error(transparent)]
    Ssh(#[from] crate::ssh::SshError),
}

fn stderr_suffix(s: &str) -> String {
    if s.trim().is_empty() {
        String::new()
    } else {
        format!(" (the agent said: {})", s.trim().replace('\n', " | "))
    }
}

impl TransportError {
    pub fn retry(&self) -> crate::error::Retry {
        match self {
            TransportError::Spawn { .. } => crate::error::Retry::Permanent,
            TransportError::Protocol { error, .. } => error.retry(),
            TransportError::Ssh(e) => e.retry(),
        }
    }
}

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
}

/// A live connection: the protocol client and whatever keeps the
/// transport alive (a child process, a thread). Dropping it closes the
/// agent's input and kills a child that has not exited.
pub struct Connection {
    pub client: Client,
    pub stderr: StderrTail,
    child: Option<tokio::process::Child>,
    thread: Option<std::thread::JoinHandle<()>>,
    link: Option<Box<dyn Link>>,
}

impl Connection {
    /// A connection kept alive by `link` (see [`Link`]).
    pub fn with_link(client: Client, stderr: StderrTail, link: Box<dyn Link>) -> Connection {
        Connection {
            client,
            stderr,
            child: None,
            thread: None,
            link: Some(link),
        }
    }

    /// Closes the agent's input (the caller must have dropped its other
    /// client clones) and waits for the agent to publish and exit; kills
    /// it after `timeout`.
    pub async fn close(mut self, timeout: Duration) {
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

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// Starts `georep agent --root ROOT` as a local child speaking over pipes.
pub async fn local_child(
    exe: &Path,
    root: &Path,
    keepalive: Duration,
) -> Result<Connection, TransportError> {
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("agent")
        .arg("--root")
        .arg(root)
        .arg("--keepalive")
        .arg((keepalive.as_secs() * 2).max(2).to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| TransportError::Spawn {
        what: format!("{} agent", exe.display()),
        source,
    })?;
    let stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let stderr = StderrTail::default();
    stderr.collect(child.stderr.take().expect("piped"), "local agent");
    connect(stdout, stdin, keepalive, stderr, Some(child), None).await
}

/// Runs the agent on a thread of this process over a socket pair: the
/// in-memory transport used by tests of the engine.
pub async fn in_process(root: PathBuf, keepalive: Duration) -> Result<Connection, TransportError> {
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|source| TransportError::Spawn {
            what: "socket pair".into(),
            source,
        })?;
    let opts = AgentOptions {
        root,
        keepalive: keepalive * 2,
    };
    let theirs_w = theirs.try_clone().map_err(|source| TransportError::Spawn {
        what: "socket pair".into(),
        source,
    })?;
    let thread = std::thread::spawn(move || {
        let _ = crate::agent::serve(&opts, theirs, theirs_w);
    });
    ours.set_nonblocking(true)
        .map_err(|source| TransportError::Spawn {
            what: "socket pair".into(),
            source,
        })?;
    let ours = tokio::net::UnixStream::from_std(ours).map_err(|source| TransportError::Spawn {
        what: "socket pair".into(),
        source,
    })?;
    let (r, w) = ours.into_split();
    connect(r, w, keepalive, StderrTail::default(), None, Some(thread)).await
}

async fn connect<R, W>(
    r: R,
    w: W,
    keepalive: Duration,
    stderr: StderrTail,
    child: Option<tokio::process::Child>,
    thread: Option<std::thread::JoinHandle<()>>,
) -> Result<Connection, TransportError>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match Client::connect(r, w, keepalive).await {
        Ok(client) => Ok(Connection {
            client,
            stderr,
            child,
            thread,
            link: None,
        }),
        Err(error) => {
            // Give the child a moment to print why it failed.
            tokio::time::sleep(Duration::from_millis(100)).await;
            Err(TransportError::Protocol {
                error,
                stderr: stderr.text(),
            })
        }
    }
}
