//! The SSH transport: `georep agent` started on the slave through the
//! system OpenSSH client, one master connection per worker (the `openssh`
//! crate's native multiplexing, control socket in a private temporary
//! directory), the protocol spoken over the remote process's stdin/stdout.
//!
//! The worker's ssh reads nothing but the configuration georep writes for
//! it (`-F`): host keys are checked strictly against the session's
//! `known_hosts` (then `~/.ssh/known_hosts`), only the session's key is
//! offered, AES-GCM is preferred where the CPU has AES instructions, and
//! keep-alives run both at the SSH level and in the protocol.

pub mod errors;
pub mod setup;

pub use errors::SshError;

use super::link::{Connection, Link, StderrTail};
use crate::error::UserError;
use crate::protocol::Client;
use crate::session::{Session, SlaveSpec};
use crate::user_err;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The remote program run when the session names none (found on the slave user's PATH).
pub const DEFAULT_REMOTE_GEOREP: &str = "georep";
/// Seconds ssh waits for the TCP connection and the SSH handshake.
const CONNECT_TIMEOUT_SECS: u64 = 20;
/// The master connection exits this long after its last client went away,
/// so that a killed worker leaves no ssh process behind for long.
const MASTER_LINGER_SECS: usize = 15;

/// How the host key is checked on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKeys {
    /// `StrictHostKeyChecking=yes`: the key must already be recorded (the worker).
    Pinned,
    /// `accept-new`: an unknown host's key is recorded in the session's
    /// `known_hosts`; a changed key is still refused (`georep create` only).
    LearnNew,
}

/// Everything needed to reach one SSH slave.
#[derive(Debug, Clone)]
pub struct SshTarget {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    /// The slave root, an absolute path on the slave.
    pub root: String,
    /// The private key offered; `None`: ssh's default keys and agent.
    pub identity: Option<PathBuf>,
    /// The session's own known_hosts file (consulted first, and where
    /// `accept-new` records keys).
    pub known_hosts: PathBuf,
    /// The georep program on the slave.
    pub remote_georep: String,
    /// Whether `identity` is a key georep installed (`--push-pem`).
    pub session_key: bool,
}

/// Refuses host names that ssh would read as options or that could not be one host.
pub fn check_host(host: &str) -> Result<(), UserError> {
    if host.starts_with('-')
        || host.is_empty()
        || host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "'\"\\;&|`$".contains(c))
    {
        return Err(user_err!(
            "invalid slave host {host:?}: give a host name or address"
        ));
    }
    Ok(())
}

/// Refuses user names that ssh would read as options or that a shell would split.
pub fn check_user(user: &str) -> Result<(), UserError> {
    if user.starts_with('-')
        || user
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "'\"\\;&|`$@:".contains(c))
    {
        return Err(user_err!(
            "invalid slave user {user:?}: give a plain user name"
        ));
    }
    Ok(())
}

/// The slave root must be absolute UTF-8 without control characters: it is
/// written into a forced command in authorized_keys.
pub fn check_remote_path(path: &Path) -> Result<String, UserError> {
    let s = path.to_str().ok_or_else(|| {
        user_err!(
            "slave path {} is not UTF-8: choose a plain path",
            path.display()
        )
    })?;
    if !s.starts_with('/') || s.chars().any(|c| c.is_control()) || s.split('/').any(|c| c == "..") {
        return Err(user_err!(
            "invalid slave path {s:?}: give an absolute path without control characters or '..'"
        ));
    }
    Ok(s.trim_end_matches('/').to_string()).map(|t| if t.is_empty() { "/".to_string() } else { t })
}

impl SshTarget {
    /// The target of a session whose slave is `[user@]host:/path`.
    pub fn from_session(session: &Session) -> Result<SshTarget, UserError> {
        let SlaveSpec::Ssh { user, host, path } = session.slave_spec()? else {
            return Err(user_err!(
                "slave {} is not an SSH slave",
                session.config.slave
            ));
        };
        check_host(&host)?;
        if let Some(u) = &user {
            check_user(u)?;
        }
        let root = check_remote_path(&path)?;
        let identity = session.config.identity.clone();
        let session_key = identity.as_deref() == Some(session.dir.join(setup::KEY_FILE).as_path());
        Ok(SshTarget {
            user,
            host,
            port: session.config.ssh_port,
            root,
            identity,
            known_hosts: session.dir.join(setup::KNOWN_HOSTS_FILE),
            remote_georep: session
                .config
                .remote_georep
                .clone()
                .unwrap_or_else(|| DEFAULT_REMOTE_GEOREP.to_string()),
            session_key,
        })
    }

    /// `user@host port N`, for messages.
    pub fn display(&self) -> String {
        let who = match &self.user {
            Some(u) => format!("{u}@{}", self.host),
            None => self.host.clone(),
        };
        format!("{who} port {}", self.port.unwrap_or(22))
    }

    /// The host as known_hosts names it.
    pub fn host_pattern(&self) -> String {
        match self.port {
            Some(p) if p != 22 => format!("[{}]:{p}", self.host),
            _ => self.host.clone(),
        }
    }

    pub(crate) fn error_target(&self) -> errors::Target {
        let (key, auth_fix) = match (&self.identity, self.session_key) {
            (Some(k), true) => (
                format!("the session key {}", k.display()),
                format!("its public key ({}.pub) is not (or no longer) in the slave user's authorized_keys: create the session again with --push-pem", k.display()),
            ),
            (Some(k), false) => (
                format!("key {}", k.display()),
                "add its public key to the slave user's authorized_keys, or use --push-pem".to_string(),
            ),
            (None, _) => (
                "the default keys and ssh-agent".to_string(),
                "give a key the slave accepts (--identity FILE), or install one with --push-pem".to_string(),
            ),
        };
        errors::Target {
            display: self.display(),
            host_pattern: self.host_pattern(),
            known_hosts: self.known_hosts.clone(),
            key,
            auth_fix,
        }
    }

    /// The ssh configuration of a worker connection: the only one ssh reads.
    pub fn config_text(&self, keys: HostKeys, keepalive: Duration) -> String {
        let mut c = String::from(
            "# Written by georep for one connection: ssh reads nothing else (-F).\nHost *\n",
        );
        let mut opt = |k: &str, v: &str| {
            c.push_str("    ");
            c.push_str(k);
            c.push(' ');
            c.push_str(v);
            c.push('\n');
        };
        opt("BatchMode", "yes");
        opt(
            "StrictHostKeyChecking",
            match keys {
                HostKeys::Pinned => "yes",
                HostKeys::LearnNew => "accept-new",
            },
        );
        opt(
            "UserKnownHostsFile",
            &format!("\"{}\" ~/.ssh/known_hosts", self.known_hosts.display()),
        );
        opt("HashKnownHosts", "no");
        if let Some(id) = &self.identity {
            opt("IdentityFile", &format!("\"{}\"", id.display()));
            opt("IdentitiesOnly", "yes");
        }
        opt("Ciphers", cipher_list());
        opt(
            "ServerAliveInterval",
            &(keepalive.as_secs() / 3).max(1).to_string(),
        );
        // SSH gives up after about 2 x keepalive, later than the protocol's
        // own keep-alive (1 to 1.3 x): a stalled link is reported as such.
        opt("ServerAliveCountMax", "6");
        opt("ConnectTimeout", &CONNECT_TIMEOUT_SECS.to_string());
        opt("PasswordAuthentication", "no");
        opt("KbdInteractiveAuthentication", "no");
        opt("ForwardAgent", "no");
        opt("ForwardX11", "no");
        opt("ClearAllForwardings", "yes");
        opt("RequestTTY", "no");
        opt("Compression", "no");
        opt("LogLevel", "ERROR");
        c
    }

    /// Starts the agent on the slave over a new master connection and runs
    /// the handshake. `agent_keepalive` is passed to the agent (a forced
    /// command in authorized_keys overrides the whole command line anyway).
    pub async fn connect(
        &self,
        keys: HostKeys,
        keepalive: Duration,
    ) -> Result<Connection, SshError> {
        let local = |what: &str| {
            let what = what.to_string();
            move |source| SshError::Local { what, source }
        };
        let dir = tempfile::Builder::new()
            .prefix("georep-ssh")
            .tempdir_in(socket_base())
            .map_err(local(
                "creating a private directory for the ssh control socket",
            ))?;
        let config = dir.path().join("config");
        std::fs::write(&config, self.config_text(keys, keepalive))
            .map_err(local("writing the ssh configuration"))?;
        let mut b = openssh::SessionBuilder::default();
        b.config_file(&config)
            .control_directory(dir.path())
            .control_persist(openssh::ControlPersist::IdleFor(
                std::num::NonZeroUsize::new(MASTER_LINGER_SECS).expect("non-zero"),
            ))
            .known_hosts_check(match keys {
                HostKeys::Pinned => openssh::KnownHosts::Strict,
                HostKeys::LearnNew => openssh::KnownHosts::Add,
            });
        if let Some(p) = self.port {
            b.port(p);
        }
        if let Some(u) = &self.user {
            b.user(u.clone());
        }
        let target = self.error_target();
        tracing::debug!(slave = %self.display(), "starting the ssh master connection");
        let session = match tokio::time::timeout(
            Duration::from_secs(CONNECT_TIMEOUT_SECS * 2),
            b.connect_mux(&self.host),
        )
        .await
        {
            Err(_) => {
                return Err(SshError::Unreachable {
                    target: target.display,
                    detail: format!("no SSH session after {} s", CONNECT_TIMEOUT_SECS * 2),
                })
            }
            Ok(Ok(s)) => Arc::new(s),
            Ok(Err(openssh::Error::Connect(e))) => {
                return Err(SshError::from_ssh(&target, &e.to_string()))
            }
            Ok(Err(e)) => {
                return Err(SshError::Other {
                    target: target.display,
                    detail: error_chain(&e),
                })
            }
        };
        self.start_agent(session, Some(dir), keepalive, None).await
    }

    /// Starts one agent over the master connection `session` (a new SSH
    /// channel) and runs the handshake; with `token`, it joins that stream
    /// group. The connection can start more agents the same way.
    fn start_agent(
        &self,
        session: Arc<openssh::Session>,
        dir: Option<tempfile::TempDir>,
        keepalive: Duration,
        join: Option<crate::protocol::Join>,
    ) -> futures::future::BoxFuture<'_, Result<Connection, SshError>> {
        Box::pin(self.start_agent_inner(session, dir, keepalive, join))
    }

    async fn start_agent_inner(
        &self,
        session: Arc<openssh::Session>,
        dir: Option<tempfile::TempDir>,
        keepalive: Duration,
        join: Option<crate::protocol::Join>,
    ) -> Result<Connection, SshError> {
        let target = self.error_target();
        let agent_keepalive = (keepalive.as_secs() * 2).max(2).to_string();
        let mut cmd = openssh::Session::to_command(session.clone(), self.remote_georep.clone());
        cmd.args([
            "agent",
            "--root",
            self.root.as_str(),
            "--keepalive",
            agent_keepalive.as_str(),
        ])
        .stdin(openssh::Stdio::piped())
        .stdout(openssh::Stdio::piped())
        .stderr(openssh::Stdio::piped());
        tracing::debug!(stream = join.is_some(), "starting an agent");
        let mut child = cmd.spawn().await.map_err(|e| SshError::Other {
            target: target.display.clone(),
            detail: format!("starting the agent: {}", error_chain(&e)),
        })?;
        let stdin = child.stdin().take().expect("piped");
        let stdout = child.stdout().take().expect("piped");
        let tail = StderrTail::default();
        tail.collect(child.stderr().take().expect("piped"), "ssh agent");
        let joined = join.is_some();
        tracing::debug!(stream = joined, "agent started: handshake");
        match Client::connect_as(stdout, stdin, keepalive, join).await {
            Ok(client) => {
                let link = Box::new(SshLink {
                    child: Some(child),
                    session: session.clone(),
                    _dir: dir,
                });
                if client.agent_root() != self.root {
                    return Err(SshError::WrongRoot {
                        target: target.display,
                        want: self.root.clone(),
                        got: client.agent_root().to_string(),
                    });
                }
                tracing::info!(slave = %self.display(), agent = client.agent_version(), stream = joined, "connected over ssh");
                let again = self.clone();
                let spawn: super::link::Spawn = Arc::new(move |join, keepalive| {
                    let (t, s) = (again.clone(), session.clone());
                    Box::pin(async move {
                        t.start_agent(s, None, keepalive, Some(join))
                            .await
                            .map_err(super::TransportError::from)
                    })
                });
                Ok(Connection::with_link(client, tail, link).spawning(spawn))
            }
            Err(error) => {
                let status = match tokio::time::timeout(Duration::from_secs(3), child.wait()).await
                {
                    Ok(Ok(s)) => s.code(),
                    _ => None,
                };
                tokio::time::sleep(Duration::from_millis(100)).await;
                let said = tail.text();
                drop(session);
                Err(match &error {
                    crate::protocol::ProtoError::Lost(_)
                        if errors::program_missing(&said, status) =>
                    {
                        SshError::NoGeorep {
                            target: target.display,
                            said: said.trim().replace('\n', " | "),
                        }
                    }
                    _ => SshError::Agent {
                        target: target.display,
                        error,
                        said,
                    },
                })
            }
        }
    }
}

/// The remote process and the master connection behind a [`Connection`].
struct SshLink {
    child: Option<openssh::Child<Arc<openssh::Session>>>,
    session: Arc<openssh::Session>,
    /// The control socket's directory (held by the first agent's link).
    _dir: Option<tempfile::TempDir>,
}

impl Link for SshLink {
    fn close(
        self: Box<Self>,
        timeout: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move {
            let SshLink {
                child,
                session,
                _dir,
            } = *self;
            if let Some(child) = child {
                // The agent publishes what is pending and exits on EOF.
                if tokio::time::timeout(timeout, child.wait()).await.is_err() {
                    tracing::warn!(
                        "the remote agent did not exit in time: closing the ssh connection"
                    );
                }
            }
            if let Ok(session) = Arc::try_unwrap(session) {
                let _ = session.close().await;
            }
        })
    }

    fn ended(
        self: Box<Self>,
        timeout: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send>> {
        Box::pin(async move {
            let SshLink {
                child,
                session,
                _dir,
            } = *self;
            let status = match child {
                Some(child) => tokio::time::timeout(timeout, child.wait()).await.ok(),
                None => None,
            };
            // The multiplexing protocol carries exit codes, not signals: a
            // remote process that ended without one while the master
            // connection is still up was killed on the slave.
            let up = tokio::time::timeout(timeout, session.check())
                .await
                .is_ok_and(|r| r.is_ok());
            let how = match status {
                Some(Ok(s)) => Some(match s.code() {
                    Some(c) => format!("the agent on the slave exited with code {c}"),
                    None => "the agent on the slave ended".to_string(),
                }),
                Some(Err(openssh::Error::RemoteProcessTerminated)) if up => Some(
                    "the agent on the slave was killed: it ended by a signal while the SSH connection stayed up"
                        .to_string(),
                ),
                _ if !up => Some("the SSH connection to the slave is gone".to_string()),
                _ => None,
            };
            if let Ok(session) = Arc::try_unwrap(session) {
                let _ = session.close().await;
            }
            how
        })
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s.replace('\n', " | ")
}

/// A short base directory for control sockets (sockets paths are limited to 108 bytes).
fn socket_base() -> PathBuf {
    let t = std::env::temp_dir();
    if t.as_os_str().len() <= 40 {
        t
    } else {
        PathBuf::from("/tmp")
    }
}

/// Ciphers in order of preference: AES-GCM first where the CPU has AES
/// instructions (the fastest by far there), ChaCha20-Poly1305 first otherwise.
pub fn cipher_list() -> &'static str {
    static AES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let aes = *AES.get_or_init(|| {
        std::fs::read_to_string("/proc/cpuinfo")
            .map(|s| cpu_has_aes(&s))
            .unwrap_or(false)
    });
    if aes {
        "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr"
    } else {
        "chacha20-poly1305@openssh.com,aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr"
    }
}

/// Whether /proc/cpuinfo lists AES instructions (x86 `flags`, arm64 `Features`).
fn cpu_has_aes(cpuinfo: &str) -> bool {
    cpuinfo.lines().any(|l| {
        let (k, v) = l.split_once(':').unwrap_or((l, ""));
        let k = k.trim();
        (k == "flags" || k == "Features") && v.split_whitespace().any(|f| f == "aes")
    })
}

/// Connects a session's worker to its SSH slave (host key pinned).
pub async fn connect_session(
    session: &Session,
    keepalive: Duration,
) -> Result<Connection, SshError> {
    let target = SshTarget::from_session(session).map_err(|e| SshError::Check {
        target: session.config.slave.clone(),
        detail: e.to_string(),
    })?;
    target.connect(HostKeys::Pinned, keepalive).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_detection_and_checks() {
        assert!(cpu_has_aes(
            "processor\t: 0\nflags\t\t: fpu vme sse2 aes avx\n"
        ));
        assert!(cpu_has_aes("Features\t: fp asimd aes pmull sha1\n"));
        assert!(!cpu_has_aes("flags\t\t: fpu vme sse2 avx aesx\n"));
        assert!(check_host("-oProxyCommand=x").is_err());
        assert!(check_host("drsite.example").is_ok());
        assert!(check_user("a b").is_err());
        assert_eq!(check_remote_path(Path::new("/srv/r/")).unwrap(), "/srv/r");
        assert!(check_remote_path(Path::new("/srv/../etc")).is_err());
        assert!(check_remote_path(Path::new("/srv/a\nb")).is_err());
    }

    #[test]
    fn worker_config_pins_host_keys_and_offers_only_the_session_key() {
        let t = SshTarget {
            user: Some("backup".into()),
            host: "dr".into(),
            port: Some(2222),
            root: "/srv/replica".into(),
            identity: Some("/s/ssh_key".into()),
            known_hosts: "/s/known_hosts".into(),
            remote_georep: "georep".into(),
            session_key: true,
        };
        let c = t.config_text(HostKeys::Pinned, Duration::from_secs(30));
        for line in [
            "StrictHostKeyChecking yes",
            "UserKnownHostsFile \"/s/known_hosts\" ~/.ssh/known_hosts",
            "IdentityFile \"/s/ssh_key\"",
            "IdentitiesOnly yes",
            "ServerAliveInterval 10",
            "BatchMode yes",
        ] {
            assert!(c.contains(line), "{line} missing from {c}");
        }
        assert_eq!(t.host_pattern(), "[dr]:2222");
        assert!(t
            .config_text(HostKeys::LearnNew, Duration::from_secs(30))
            .contains("accept-new"));
    }
}
