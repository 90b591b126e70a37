//! georep: continuous asynchronous replication of a backup appliance's
//! snapshot store from a master tree to a slave, driven by xtime stamps
//! in extended attributes and shipping rsync-style deltas through an agent
//! on the slave (see DESIGN.md in the shared folder, and README.md).

pub mod admin;
pub mod agent;
pub mod blocktree;
pub mod catalog;
pub mod continuous;
pub mod crawl;
pub mod daemon;
pub mod delta;
pub mod digest;
pub mod error;
pub mod links;
pub mod master;
pub mod meta;
pub mod protocol;
pub mod relpath;
pub mod session;
pub mod slave;
pub mod sparse;
pub mod ssh;
pub mod transfer;
pub mod transport;
pub mod watcher;
pub mod worker;
pub mod xtime;
