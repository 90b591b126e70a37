//! Supervision and status side of georep: the monitor process's loop,
//! status and pid files that stay truthful when a process is killed, and
//! the readers monitoring uses (table, JSON, Prometheus, Nagios).

pub mod atomic;
pub mod backoff;
pub mod checkpoint;
pub mod events;
pub mod logfile;
pub mod nagios;
pub mod pidfile;
pub mod prometheus;
pub mod render;
pub mod report;
pub mod status;
pub mod supervise;
pub mod time;

pub use atomic::{write_atomic, write_atomic_volatile};
pub use pidfile::{PidFile, PidRecord, ProcessState};
