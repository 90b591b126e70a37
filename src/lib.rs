//! georep: continuous asynchronous replication of a backup appliance's
//! snapshot store from a master tree to a slave, driven by xtime stamps in
//! extended attributes and shipping rsync-style deltas through an agent on
//! the slave.
//!
//! The crate is layered; each layer is a folder and may use only the
//! layers below it (`docs/architecture.md` has the picture, and
//! `cargo run -p xtask -- arch` checks the rule):
//!
//! | layer | what it does |
//! |---|---|
//! | [`cli`] | the command line: arguments, dispatch, session administration |
//! | [`daemon`] | `start`/`stop`/`status`, the daemon's worker loop, the watcher |
//! | [`engine`] | one sync: the worker, the crawl, shipping files, catalog mode |
//! | [`transport`] | reaching an agent: a local child, an in-process thread, SSH |
//! | [`agent`] | the slave side, confined to its root |
//! | [`protocol`] | messages, framing, the pipelined client |
//! | [`catalog`] | the snapshot store's formats and pure planning |
//! | [`session`] | a session's configuration and state on disk |
//! | [`fs`], [`hash`] | paths, metadata, holes and stamps; content digests |
//! | [`error`] | retry classes, operator errors, exit codes |
//!
//! The supervision and status side (pid files, status files and their
//! readers) is the separate `georep-monitor` crate, used by `daemon` and
//! `engine`.

pub mod agent;
pub mod catalog;
pub mod cli;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod fs;
pub mod hash;
pub mod protocol;
pub mod session;
pub mod transport;
