//! Error classification shared by the worker, the monitor and the CLI.

use serde::{Deserialize, Serialize};

/// Whether retrying the same operation later can succeed without an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Retry {
    /// Connection lost, slave busy or full, a file changed while read: retry with backoff.
    Temporary,
    /// Bad configuration, version mismatch, refused authentication: needs a fix.
    Permanent,
}

/// Bad input from the operator: a one-line message naming the problem and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UserError(pub String);

impl UserError {
    pub fn new(msg: impl Into<String>) -> UserError {
        UserError(msg.into())
    }
}

/// Shorthand for returning a [`UserError`].
#[macro_export]
macro_rules! user_err {
    ($($arg:tt)*) => { $crate::error::UserError(format!($($arg)*)) };
}

/// Documented process exit codes.
pub mod exit {
    /// Success: the slave equals the master (for `sync`), or the command did what it said.
    pub const OK: i32 = 0;
    /// The sync finished but some entries failed; they are retried by the next sync.
    pub const PARTIAL: i32 = 1;
    /// Bad arguments, configuration or input: fix what the message says.
    pub const USAGE: i32 = 2;
    /// A temporary failure (slave unreachable, connection lost, session busy): retry later.
    pub const TEMPORARY: i32 = 3;
    /// A permanent failure that is not bad input (version mismatch, internal error).
    pub const PERMANENT: i32 = 4;
}
