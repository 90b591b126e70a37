//! Failures of a transport, with what the child process said.

use crate::protocol::ProtoError;

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
    Ssh(#[from] super::ssh::SshError),
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
