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

/// Writes command output to stdout. A closed stdout (`georep status |
/// head -1`) is not an error: the rest of the output is dropped quietly
/// and the command goes on to its end and its exit code.
pub fn print_stdout(args: std::fmt::Arguments<'_>, newline: bool) {
    use std::io::Write;
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let mut out = std::io::stdout().lock();
    let r = out
        .write_fmt(args)
        .and_then(|_| {
            if newline {
                out.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|_| out.flush());
    if let Err(e) = r {
        if e.kind() != std::io::ErrorKind::BrokenPipe
            && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            eprintln!("georep: cannot write the output: {e}");
        }
    }
}

/// `println!` that survives a closed stdout (see [`error::print_stdout`](crate::error::print_stdout)).
#[macro_export]
macro_rules! outln {
    () => { $crate::error::print_stdout(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::error::print_stdout(format_args!($($arg)*), true) };
}

/// `print!` that survives a closed stdout.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::error::print_stdout(format_args!($($arg)*), false) };
}
