//! Fencing (DESIGN §10): the agent knows its root's role and epoch, takes
//! the worker's claim (session, epoch), and refuses every writing request
//! when the root is a live store or of a newer epoch than the writer's. So
//! a returning old master, or a stray worker of an old direction, is told
//! why in one line and the promoted store is never touched.

use super::root::{Root, WResult};
use crate::fs::role::{self, Role, RoleRecord};
use crate::protocol::{ErrorKind, FailbackClaim, Reply, Request, WireError};
use uuid::Uuid;

/// The agent's view of its root's role and of the connected worker.
pub struct Fence {
    root: String,
    role: Option<RoleRecord>,
    /// A role file that cannot be read: every write is refused.
    broken: Option<String>,
    claimed: Option<(Uuid, u64)>,
    failback: Option<FailbackClaim>,
}

fn fenced(msg: String) -> WireError {
    WireError::new(ErrorKind::Fenced, msg)
}

/// Whether a request changes anything under the root.
fn writes(req: &Request) -> bool {
    use Request::*;
    matches!(
        req,
        SetIdentity(_)
            | Mkdir { .. }
            | Remove { .. }
            | Symlink { .. }
            | Link { .. }
            | SetMeta { .. }
            | OpenFile { .. }
            | OpenInPlace { .. }
            | Write { .. }
            | Copy { .. }
            | Patch { .. }
            | Commit { .. }
            | PutFile { .. }
            | Rename { .. }
            | AppendTail { .. }
            | Synced { .. }
            | QuarantineStep { .. }
            | QuarantineResolve { .. }
            | QuarantineCommit
            | OpenStreams
            | OpenShared { .. }
            | OpenSegment { .. }
            | FinishSegment { .. }
            | CommitShared { .. }
            | ProbeFile { .. }
            | PutDelta { .. }
            | OpenResumable { .. }
            | CleanPartials { .. }
    )
}

/// The xattr that proves `root` was the master of `session`: its root stime.
pub fn was_master_of(root: &std::path::Path, session: &Uuid) -> bool {
    crate::fs::xtime::read(root, &crate::fs::xtime::stime_attr(session)).unwrap_or(0) > 0
}

/// A root that is a georep master some session synced from (and not a
/// replica): what it is, in words.
fn live_master(root: &std::path::Path) -> Option<String> {
    crate::fs::xtime::master_id(root).ok().flatten()?;
    let f = found(root, None);
    f.starts_with("the master of").then_some(f)
}

/// What a root holds, for the message refusing a failback onto it.
fn found(root: &std::path::Path, rec: Option<&RoleRecord>) -> String {
    if let Some(r) = rec {
        return r.describe();
    }
    let sessions: Vec<String> = xattr::list(root)
        .map(|names| {
            names
                .filter_map(|n| {
                    let n = n.to_str()?.strip_prefix("user.georep.")?;
                    n.strip_suffix(".stime").map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    if !sessions.is_empty() {
        return format!("the master of other sessions ({})", sessions.join(", "));
    }
    if crate::fs::xtime::master_id(root).ok().flatten().is_some() {
        return "a georep master that no session ever synced".into();
    }
    match std::fs::read_dir(root).map(|mut d| d.next().is_none()) {
        Ok(true) => "an empty directory".into(),
        _ => "a directory georep never replicated from".into(),
    }
}

impl Fence {
    /// Reads the role of `root` (at agent start).
    pub fn load(root: &Root) -> Fence {
        let (role, broken) = match read_role(root) {
            Ok(r) => (r, None),
            Err(e) => (None, Some(e)),
        };
        Fence {
            root: root.path().display().to_string(),
            role,
            broken,
            claimed: None,
            failback: None,
        }
    }

    /// The fence of an agent that joined a stream group: its primary
    /// passed this fence to open the group (`OpenStreams` writes), so the
    /// joiner writes as the root's current writer; a live store still
    /// refuses it everything.
    pub fn joined(mut self) -> Fence {
        if let Some(r) = &self.role {
            self.claimed = r.session.map(|s| (s, r.epoch));
        }
        self
    }

    /// The failback claim of this connection, if any.
    pub fn failback(&self) -> Option<&FailbackClaim> {
        self.failback.as_ref()
    }

    /// The claimed session and epoch of this connection.
    pub fn claimed(&self) -> Option<(Uuid, u64)> {
        self.claimed
    }

    pub fn role(&self) -> Option<&RoleRecord> {
        self.role.as_ref()
    }

    /// Refuses `req` if it writes and the writer is fenced.
    pub fn check(&self, req: &Request) -> WResult<()> {
        if !writes(req) {
            return Ok(());
        }
        if let Some(b) = &self.broken {
            return Err(fenced(format!(
                "{}: the role file cannot be read ({b}); nothing is written until it is fixed",
                self.root
            )));
        }
        let epoch = self.claimed.map(|c| c.1).unwrap_or(0);
        match self.role.as_ref().and_then(|r| r.fence(&self.root, epoch)) {
            Some(msg) => Err(fenced(msg)),
            None => Ok(()),
        }
    }

    /// Takes a worker's claim; records the root's new role durably.
    pub fn claim(
        &mut self,
        root: &Root,
        session: Uuid,
        epoch: u64,
        failback: Option<FailbackClaim>,
    ) -> WResult<Reply> {
        if let Some(b) = &self.broken {
            return Err(fenced(format!("{}: {b}", self.root)));
        }
        if let Some(msg) = self.role.as_ref().and_then(|r| r.fence(&self.root, epoch)) {
            return Err(fenced(msg));
        }
        if let Some(fb) = &failback {
            if !fb.force && !was_master_of(root.path(), &fb.old_session) {
                return Err(WireError::new(
                    ErrorKind::Invalid,
                    format!(
                        "{} was never the master of session {} (it holds none of its sync times; found {}): give the old master's directory, or create the session with --force to treat all of it as divergent",
                        self.root,
                        fb.old_session,
                        found(root.path(), self.role.as_ref())
                    ),
                ));
            }
        }
        if failback.is_none() && epoch > 0 && self.role.is_none() {
            if let Some(m) = live_master(root.path()) {
                return Err(fenced(format!(
                    "{} is a live master ({m}) and this session comes from a promoted store: create it with --failback, so that what changed here since the last common point is quarantined before anything is overwritten",
                    self.root
                )));
            }
        }
        let kind = match (&failback, self.role.as_ref().map(|r| r.role)) {
            (Some(_), _) | (_, Some(Role::Demoted)) => Role::Demoted,
            _ => Role::Replica,
        };
        let same = self
            .role
            .as_ref()
            .is_some_and(|r| r.role == kind && r.session == Some(session) && r.epoch == epoch);
        if !same {
            let rec = RoleRecord {
                role: kind,
                epoch,
                session: Some(session),
                at_ns: crate::fs::xtime::now_ns(),
                host: role::host_name(),
                promote_stamp: None,
                report: None,
            };
            write_role(root, &rec).map_err(|e| {
                WireError::new(e.kind, format!("recording the root's role: {}", e.message))
            })?;
            tracing::info!(root = %self.root, role = kind.as_str(), epoch, %session, "root claimed");
            self.role = Some(rec);
        }
        self.claimed = Some((session, epoch));
        self.failback = failback;
        let r = self.role.as_ref().expect("set above");
        Ok(Reply::Claimed {
            role: r.role,
            epoch: r.epoch,
            describe: r.describe(),
        })
    }

    /// The role after a promote of this root by the agent.
    pub fn promoted(&mut self, rec: RoleRecord) {
        self.role = Some(rec);
    }
}

/// `.georep/synced.json`: the last complete sync a replica received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Synced {
    /// The master xtime the sync covered (its root stime).
    pub stime: u64,
    /// When it completed (ns since the Unix epoch).
    pub at_ns: u64,
}

pub const SYNCED_FILE: &str = "synced.json";

/// The role of the agent's root, read beneath it through no symlink (see
/// [`Root::read_state`]); the error says what is wrong in one line.
pub fn read_role(root: &Root) -> Result<Option<RoleRecord>, String> {
    match root.read_state(role::ROLE_FILE) {
        Ok(None) => Ok(None),
        Ok(Some(b)) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            format!(
                "{} is not a georep role file ({e}): move it away if it is not georep's",
                role::path(root.path()).display()
            )
        }),
        Err(e) => Err(format!("{}: {}", root.path().display(), e.message)),
    }
}

/// Records the role of the agent's root durably, beneath it.
pub fn write_role(root: &Root, rec: &RoleRecord) -> WResult<()> {
    root.write_state(
        role::ROLE_FILE,
        &serde_json::to_vec_pretty(rec).expect("role serializes"),
    )
}

/// Records the last complete sync (durably; small), beneath the root.
pub fn record_synced(root: &Root, s: Synced) -> WResult<()> {
    let data = serde_json::to_vec(&s).expect("serializes");
    root.write_state(SYNCED_FILE, &data)
        .map_err(|e| WireError::new(e.kind, format!("recording the sync time: {}", e.message)))
}

/// The last complete sync recorded on a replica root.
pub fn read_synced(root: &Root) -> Option<Synced> {
    let b = root.read_state(SYNCED_FILE).ok()??;
    serde_json::from_slice(&b).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::meta::Meta;
    use crate::fs::relpath::RelPath;

    fn fence(role: Role, epoch: u64) -> Fence {
        Fence {
            root: "/r".into(),
            role: Some(RoleRecord {
                role,
                epoch,
                session: Some(Uuid::nil()),
                at_ns: 0,
                host: "h".into(),
                promote_stamp: None,
                report: None,
            }),
            broken: None,
            claimed: None,
            failback: None,
        }
    }

    /// The requests of the WAN transfers write: a fenced writer (a stale
    /// direction, anything on a live store) may send none of them.
    fn wan_writes() -> Vec<Request> {
        let p = RelPath::new(b"f".to_vec()).unwrap();
        vec![
            Request::OpenStreams,
            Request::OpenShared {
                fid: 1,
                path: p.clone(),
                basis: None,
                size: 1,
            },
            Request::OpenSegment {
                fid: 1,
                path: p.clone(),
                tmp: serde_bytes::ByteBuf::from(b".georep-tmp-x".to_vec()),
                basis: None,
                size: 1,
                start: 0,
                end: 1,
            },
            Request::FinishSegment { fid: 1 },
            Request::CommitShared {
                fid: 1,
                digest: [0; 32],
                meta: Meta::default(),
                segments: Vec::new(),
            },
            Request::ProbeFile {
                path: p.clone(),
                basis: None,
                digest: [0; 32],
                meta: Meta::default(),
                block: 256,
            },
            Request::PutDelta {
                path: p.clone(),
                basis: None,
                size: 0,
                delta: Default::default(),
                digest: [0; 32],
                meta: Meta::default(),
            },
            Request::OpenResumable {
                fid: 1,
                path: p,
                basis: None,
                size: 1,
                key: [0; 16],
            },
            Request::CleanPartials { max_age_secs: 0 },
        ]
    }

    #[test]
    fn a_live_store_refuses_every_wan_write_and_reads_stay_allowed() {
        let live = fence(Role::Promoted, 2).joined();
        for r in wan_writes() {
            let e = live.check(&r).expect_err("written to a live store");
            assert_eq!(e.kind, ErrorKind::Fenced, "{r:?}");
        }
        assert!(live.check(&Request::Ping).is_ok());
        assert!(live.check(&Request::StatFs).is_ok());
    }

    #[test]
    fn a_joiner_writes_as_the_current_epoch_and_an_unclaimed_primary_does_not() {
        let replica = fence(Role::Replica, 3);
        let put = &wan_writes()[6];
        assert_eq!(
            replica.check(put).expect_err("epoch 0 against 3").kind,
            ErrorKind::Fenced
        );
        assert!(fence(Role::Replica, 3).joined().check(put).is_ok());
    }
}
