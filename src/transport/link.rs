//! A live connection to an agent: the protocol client, the agent's stderr
//! tail, and whatever keeps the transport alive.

use crate::protocol::Client;
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

/// A live connection: the protocol client and whatever keeps the
/// transport alive (a child process, a thread). Dropping it closes the
/// agent's input and kills a child that has not exited.
pub struct Connection {
    pub client: Client,
    pub stderr: StderrTail,
    pub(super) child: Option<tokio::process::Child>,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
    pub(super) link: Option<Box<dyn Link>>,
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
