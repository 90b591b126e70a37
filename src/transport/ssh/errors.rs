//! What went wrong on the way to an SSH slave, as one line that says what
//! to fix, with a retry class. The classification of OpenSSH's messages is
//! a pure function of its stderr, tested with plain strings.

use crate::error::Retry;
use crate::protocol::ProtoError;
use std::path::PathBuf;

/// What OpenSSH's stderr says went wrong while connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The host presented a key other than the recorded one.
    HostKeyChanged,
    /// No key is recorded for the host and the policy forbids learning it now.
    HostKeyUnknown,
    /// The server refused every key offered.
    AuthRefused,
    /// Nothing listens on the port.
    ConnectionRefused,
    /// The host name does not resolve.
    HostNotFound,
    /// Timeouts, unreachable networks, resets: the line that said so.
    Unreachable(String),
    /// Anything else: the most telling line.
    Other(String),
}

/// Reads OpenSSH's stderr (client or master log) and says what it means.
pub fn classify(stderr: &str) -> Problem {
    let text = stderr.replace('\r', "");
    let has = |s: &str| text.contains(s);
    if has("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || has("has changed and you have requested strict checking")
    {
        return Problem::HostKeyChanged;
    }
    if (has("No ") && has("host key is known for")) || has("Host key verification failed") {
        return Problem::HostKeyUnknown;
    }
    if has("Permission denied (")
        || has("Too many authentication failures")
        || has("No more authentication methods")
    {
        return Problem::AuthRefused;
    }
    if has("Connection refused") {
        return Problem::ConnectionRefused;
    }
    if has("Name or service not known")
        || has("No address associated with hostname")
        || has("nodename nor servname")
    {
        return Problem::HostNotFound;
    }
    let line = telling_line(&text);
    for s in [
        "timed out",
        "No route to host",
        "Network is unreachable",
        "Connection reset",
        "Connection closed",
        "Broken pipe",
        "Temporary failure in name resolution",
        "kex_exchange_identification",
    ] {
        if has(s) {
            return Problem::Unreachable(line);
        }
    }
    Problem::Other(line)
}

/// The last line of `text` that is not an OpenSSH warning banner.
fn telling_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .rfind(|l| {
            !l.is_empty() && !l.starts_with("Warning: Permanently added") && !l.starts_with('@')
        })
        .unwrap_or("ssh exited without a message (killed, or the connection was cut)")
        .trim_start_matches("ssh: ")
        .to_string()
}

/// A failure reaching or setting up an SSH slave. Every message is one
/// line naming the problem and the fix.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("the host key of {target} changed since it was recorded in {known_hosts}: if the slave was re-installed, check its new key with its administrator and replace the old one (ssh-keygen -R '{host_pattern}' -f {known_hosts}); otherwise someone may be intercepting the connection")]
    HostKeyChanged {
        target: String,
        host_pattern: String,
        known_hosts: PathBuf,
    },
    #[error("the host key of {target} is not known (neither in {known_hosts} nor in ~/.ssh/known_hosts): check it and record it, e.g. by connecting once with ssh as this user, or create the session again (create records it)")]
    HostKeyUnknown {
        target: String,
        known_hosts: PathBuf,
    },
    #[error("{target} refused SSH authentication with {key}: {fix}")]
    AuthRefused {
        target: String,
        key: String,
        fix: String,
    },
    #[error("nothing accepts SSH connections on {target}: start sshd on the slave, or fix the port (--ssh-port / `georep config S set ssh_port N`)")]
    ConnectionRefused { target: String },
    #[error("host of {target} not found: fix the host name in the slave ({detail})")]
    HostNotFound { target: String, detail: String },
    #[error("cannot reach {target}: {detail}: check the network, it is retried")]
    Unreachable { target: String, detail: String },
    #[error("ssh to {target} failed: {detail}")]
    Other { target: String, detail: String },
    #[error("georep does not run on {target} ({said}): install the same georep version there, or give its full path (--remote-georep PATH at create, `georep config S set remote_georep PATH` later)")]
    NoGeorep { target: String, said: String },
    #[error("the agent on {target}: {error}{}", said_suffix(.said))]
    Agent {
        target: String,
        error: ProtoError,
        said: String,
    },
    #[error("the key used for {target} runs the agent on {got}, but this session replicates to {want}: create the session again with --push-pem to install a key for {want}")]
    WrongRoot {
        target: String,
        want: String,
        got: String,
    },
    #[error("slave {target} is not usable: {detail}")]
    Check { target: String, detail: String },
    #[error("{what}: {source}")]
    Local {
        what: String,
        source: std::io::Error,
    },
}

fn said_suffix(s: &str) -> String {
    let s = s.trim();
    if s.is_empty() {
        String::new()
    } else {
        format!(" (the slave said: {})", s.replace('\n', " | "))
    }
}

impl SshError {
    /// Whether retrying later can help without an operator.
    pub fn retry(&self) -> Retry {
        match self {
            SshError::ConnectionRefused { .. }
            | SshError::Unreachable { .. }
            | SshError::Other { .. } => Retry::Temporary,
            SshError::Agent { error, .. } => error.retry(),
            _ => Retry::Permanent,
        }
    }

    /// Builds the error for a failed connection from OpenSSH's stderr.
    pub fn from_ssh(target: &Target, stderr: &str) -> SshError {
        let t = target.display.clone();
        match classify(stderr) {
            Problem::HostKeyChanged => SshError::HostKeyChanged {
                target: t,
                host_pattern: target.host_pattern.clone(),
                known_hosts: target.known_hosts.clone(),
            },
            Problem::HostKeyUnknown => SshError::HostKeyUnknown {
                target: t,
                known_hosts: target.known_hosts.clone(),
            },
            Problem::AuthRefused => SshError::AuthRefused {
                target: t,
                key: target.key.clone(),
                fix: target.auth_fix.clone(),
            },
            Problem::ConnectionRefused => SshError::ConnectionRefused { target: t },
            Problem::HostNotFound => SshError::HostNotFound {
                target: t,
                detail: telling_line(stderr),
            },
            Problem::Unreachable(detail) => SshError::Unreachable { target: t, detail },
            Problem::Other(detail) => SshError::Other { target: t, detail },
        }
    }
}

/// What an error message needs to know about the connection attempt.
#[derive(Debug, Clone)]
pub struct Target {
    /// `user@host port N`, as shown to the operator.
    pub display: String,
    /// The host as known_hosts names it: `host` or `[host]:port`.
    pub host_pattern: String,
    pub known_hosts: PathBuf,
    /// Which key was offered, in words.
    pub key: String,
    /// What to do when that key is refused.
    pub auth_fix: String,
}

/// Whether the remote shell said it could not run the program.
pub fn program_missing(stderr: &str, status: Option<i32>) -> bool {
    status == Some(127)
        || status == Some(126)
        || stderr.contains("not found")
        || stderr.contains("No such file or directory")
        || stderr.contains("Permission denied")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_openssh_messages() {
        let changed = "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n@@@@\nHost key for [127.0.0.1]:2222 has changed and you have requested strict checking.\nHost key verification failed.";
        assert_eq!(classify(changed), Problem::HostKeyChanged);
        assert_eq!(
            classify("No ED25519 host key is known for [127.0.0.1]:40000 and you have requested strict checking.\r\nHost key verification failed.\r\n"),
            Problem::HostKeyUnknown
        );
        assert_eq!(
            classify("Warning: Permanently added '[127.0.0.1]:4000' (ED25519) to the list of known hosts.\r\nroot@127.0.0.1: Permission denied (publickey).\r\n"),
            Problem::AuthRefused
        );
        assert_eq!(
            classify("ssh: connect to host 127.0.0.1 port 1: Connection refused\r\n"),
            Problem::ConnectionRefused
        );
        assert_eq!(
            classify(
                "ssh: Could not resolve hostname nosuch.invalid: Name or service not known\r\n"
            ),
            Problem::HostNotFound
        );
        assert_eq!(
            classify("ssh: connect to host 10.1.1.1 port 22: Connection timed out"),
            Problem::Unreachable("connect to host 10.1.1.1 port 22: Connection timed out".into())
        );
        assert_eq!(
            classify("something odd\n"),
            Problem::Other("something odd".into())
        );
    }

    #[test]
    fn messages_are_one_line_and_classed() {
        let t = Target {
            display: "root@h port 22".into(),
            host_pattern: "h".into(),
            known_hosts: "/s/known_hosts".into(),
            key: "the session key /s/ssh_key".into(),
            auth_fix: "run create --push-pem again".into(),
        };
        for (text, retry) in [
            (
                "Host key for h has changed and you have requested strict checking.",
                Retry::Permanent,
            ),
            ("Host key verification failed.", Retry::Permanent),
            ("root@h: Permission denied (publickey).", Retry::Permanent),
            (
                "connect to host h port 22: Connection refused",
                Retry::Temporary,
            ),
            (
                "connect to host h port 22: No route to host",
                Retry::Temporary,
            ),
        ] {
            let e = SshError::from_ssh(&t, text);
            assert_eq!(e.retry(), retry, "{e}");
            assert_eq!(e.to_string().lines().count(), 1, "{e}");
        }
        assert!(program_missing("sh: 1: georep: not found", Some(127)));
        assert!(!program_missing("", Some(0)));
    }
}
