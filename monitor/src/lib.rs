//! Supervision and status side of georep: status and pid files that stay
//! truthful when a process is killed, and the readers monitoring uses.

pub mod atomic;
pub mod pidfile;

pub use atomic::{write_atomic, write_atomic_volatile};
pub use pidfile::{PidFile, PidRecord, ProcessState};
