//! The engine: one sync of a session, on the master's side. The worker
//! connects to the slave, decides whether xtimes can be trusted, and runs
//! either the tree crawl (`crawl`, shipping files with `transfer`) or
//! catalog mode (`catalog_mode`); stimes advance only after the slave made
//! the data durable. Uses `transport`, `protocol`, `catalog`, `session`
//! and the layers below; never `daemon` or `cli`.

pub mod bandwidth;
pub mod catalog_mode;
pub mod context;
pub mod continuity;
pub mod crawl;
pub mod delta;
pub mod lineage;
pub mod link;
pub mod links;
pub mod master;
pub mod outcome;
pub mod progress;
pub mod slave;
pub mod transfer;
pub mod verify;
pub mod worker;
