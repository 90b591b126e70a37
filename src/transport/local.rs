//! The local transports: `georep agent` as a child process over pipes (the
//! embedded default slave), and the agent on a thread of this process over
//! a socket pair (the in-memory transport of the engine's tests).

use super::error::TransportError;
use super::link::{Connection, StderrTail};
use crate::agent::AgentOptions;
use crate::protocol::Client;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Starts `georep agent --root ROOT` as a local child speaking over pipes.
pub async fn local_child(
    exe: &Path,
    root: &Path,
    keepalive: Duration,
) -> Result<Connection, TransportError> {
    let conn = child_agent(exe, root, keepalive, None).await?;
    let (exe, root) = (exe.to_path_buf(), root.to_path_buf());
    Ok(conn.spawning(std::sync::Arc::new(move |join, keepalive| {
        let (exe, root) = (exe.clone(), root.clone());
        Box::pin(async move { child_agent(&exe, &root, keepalive, Some(join)).await })
    })))
}

async fn child_agent(
    exe: &Path,
    root: &Path,
    keepalive: Duration,
    join: Option<crate::protocol::Join>,
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
    connect(stdout, stdin, keepalive, stderr, Some(child), None, join).await
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
    connect(
        r,
        w,
        keepalive,
        StderrTail::default(),
        None,
        Some(thread),
        None,
    )
    .await
}

async fn connect<R, W>(
    r: R,
    w: W,
    keepalive: Duration,
    stderr: StderrTail,
    child: Option<tokio::process::Child>,
    thread: Option<std::thread::JoinHandle<()>>,
    join: Option<crate::protocol::Join>,
) -> Result<Connection, TransportError>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match Client::connect_as(r, w, keepalive, join).await {
        Ok(client) => Ok(Connection::new(client, stderr, child, thread)),
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
