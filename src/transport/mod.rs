//! Transports: how the worker reaches an agent. Every transport yields a
//! byte-stream pair for the same protocol; only the way of getting it
//! differs (a local child process, an in-process thread for tests, SSH).
//! Uses `agent` (run locally), `protocol`, `session` and the layers below.

pub mod error;
pub mod link;
pub mod local;
pub mod ssh;

pub use error::TransportError;
pub use link::{Connection, Link, StderrTail};
pub use local::{in_process, local_child};
