//! What `georep status --detail` shows of a catalog-mode session: the
//! point locks held on the master, and per host the newest complete point
//! on the slave and its age (the RPO by data time).

use super::locks::{self, LockInfo};
use super::points::{self, HostRpo};
use super::{time, CatalogError};
use crate::session::{Layout, Session, SlaveSpec};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct CatalogStatus {
    /// This session's point locks on the master (`live`: its holder runs).
    pub locks: Vec<LockInfo>,
    /// Per host: the newest complete point on the slave and its age now.
    pub newest: Vec<HostRpo>,
    /// Where `newest` comes from: `slave` (a local slave, read now) or
    /// `last-sync` (what the last sync saw on the slave).
    pub newest_from: &'static str,
}

/// The catalog side of a session's status; None for a tree session.
pub fn session_status(session: &Session) -> Result<Option<CatalogStatus>, CatalogError> {
    if session.config.layout != Layout::Store {
        return Ok(None);
    }
    let name = &session.name;
    let locks: Vec<LockInfo> = locks::list(&session.config.master)?
        .into_iter()
        .filter(|l| &l.record.session == name)
        .collect();
    if let Ok(SlaveSpec::Local(root)) = session.slave_spec() {
        if root.join(super::record::STORE_FILE).exists() {
            return Ok(Some(CatalogStatus {
                locks,
                newest: points::store_rpo(&root)?,
                newest_from: "slave",
            }));
        }
    }
    // A remote slave: what the last sync saw there, aged to now.
    let mut newest: Vec<HostRpo> = std::fs::read(session.dir.join("last-sync.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| serde_json::from_value(v["catalog"]["newest"].clone()).ok())
        .unwrap_or_default();
    let now = time::now();
    for r in &mut newest {
        r.age_secs = r
            .newest_complete
            .map(|t| now.saturating_sub(t) as f64 / 1e9);
    }
    Ok(Some(CatalogStatus {
        locks,
        newest,
        newest_from: "last-sync",
    }))
}
