//! Marker continuity: whether this crawl may trust xtimes, or must
//! compare every entry (a full crawl), and why. Pure: decided from the
//! session's state, the slave's identity and the sync's options.

use crate::engine::outcome::SyncOptions;
use crate::protocol::SlaveIdentity;
use crate::session::{MarkerPolicy, Session, State};

/// Decides whether xtimes can be trusted; `Some(reason)` when a full crawl is needed.
pub fn full_reason(
    session: &Session,
    state: &State,
    ident: &Option<SlaveIdentity>,
    master_id: &uuid::Uuid,
    opts: &SyncOptions,
) -> Option<String> {
    if opts.full {
        return Some("requested".into());
    }
    let Some(epoch) = state.epoch else {
        return Some("first sync".into());
    };
    if state.full_pending {
        return Some("the previous full crawl did not complete".into());
    }
    if state.master_id.as_ref() != Some(master_id) {
        return Some("the master root is new or was replaced".into());
    }
    match ident {
        None => return Some("the slave carries no georep identity (new or wiped)".into()),
        Some(i) if i.session != session.config.session_id => {
            return Some(format!(
                "the slave belongs to another session ({})",
                i.session
            ));
        }
        Some(i) if i.epoch != epoch => return Some("the slave was replaced or restored".into()),
        _ => {}
    }
    if session.config.marker == MarkerPolicy::Auto && !opts.marker_continuous {
        return Some(MARKER_GAP.into());
    }
    None
}

/// The reason of a full crawl needed only because no marker ran: the
/// slave is the one last synced, so directories whose entries are as
/// recorded then need no comparison (see `Master::dir_digest`).
pub const MARKER_GAP: &str = "no marker watched the master since the last crawl (marker = auto)";
