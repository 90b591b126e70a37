//! The role of a root georep writes, and its epoch (DESIGN §10): a replica
//! of a session, a promoted (live) store, or a demoted one (a former live
//! store that is a replica again). Kept in `ROOT/.georep/role.json`.
//!
//! The epoch orders the lineage of live stores: `promote` raises it, and
//! the agent refuses writers of an older epoch (fencing), so a returning old
//! master never overwrites the live data. A root without a role file is a
//! live store of epoch 0 (a master that was never a replica) or a slave no
//! worker has claimed yet.
//!
//! [`read`] is the library entry point other layers use (e.g. to refuse a
//! repair of a promoted root): `role::read(root)?.is_some_and(|r| r.is_live())`.

use serde::{Deserialize, Serialize};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// The agent's state directory at a root (the same as `protocol::STATE_DIR`).
pub const STATE_DIR: &str = ".georep";
/// The role file's name in [`STATE_DIR`].
pub const ROLE_FILE: &str = "role.json";

/// What a root is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Written by `session` (the slave of that session).
    Replica,
    /// Turned into a live store by `georep promote` (it was a replica of `session`).
    Promoted,
    /// A former live store that is a replica of `session` again (failback,
    /// switchover): a worker that still uses it as its master is fenced.
    Demoted,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Replica, Role::Promoted, Role::Demoted];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Replica => "replica",
            Role::Promoted => "promoted",
            Role::Demoted => "demoted",
        }
    }
}

/// The content of `role.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleRecord {
    pub role: Role,
    /// Raised by every promote; writers of an older epoch are refused.
    pub epoch: u64,
    /// Replica and demoted: the session that writes the root. Promoted: the
    /// session it was a replica of.
    pub session: Option<Uuid>,
    /// When the root took this role (ns since the Unix epoch).
    pub at_ns: u64,
    /// The host that gave it this role.
    pub host: String,
    /// Promoted: the xtime stamped on the root at promote; every change on
    /// it marked later is newer (change tracking from the moment of promote).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote_stamp: Option<u64>,
    /// Promoted: what promote recovered (its JSON report), for a second promote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<serde_json::Value>,
}

impl RoleRecord {
    /// A live store: writes only through its own users, never by a session.
    pub fn is_live(&self) -> bool {
        self.role == Role::Promoted
    }

    /// One line for operators: what the root is and since when.
    pub fn describe(&self) -> String {
        let at = format_time(self.at_ns);
        let session = self.session.map(|s| s.to_string()).unwrap_or("?".into());
        match self.role {
            Role::Replica => format!("a replica of session {session} (epoch {})", self.epoch),
            Role::Promoted => format!(
                "promoted at {at} on {} (epoch {}; it was a replica of session {session})",
                self.host, self.epoch
            ),
            Role::Demoted => format!(
                "demoted at {at} on {}: a replica of session {session} (epoch {})",
                self.host, self.epoch
            ),
        }
    }

    /// The one line a writer of `root` is refused with, if it is fenced:
    /// the root is live, or of a newer epoch than the writer's.
    pub fn fence(&self, root: &str, writer_epoch: u64) -> Option<String> {
        if self.is_live() {
            return Some(format!(
                "{root} was promoted at {} on {}: it is a live store now (epoch {}); fail back with `georep create SESSION {root} OLD_MASTER --failback` there",
                format_time(self.at_ns),
                self.host,
                self.epoch
            ));
        }
        (self.epoch > writer_epoch).then(|| {
            format!(
                "{root} is {}: this session is of the older epoch {writer_epoch}, superseded by a promote; create a session from the live store instead",
                self.describe()
            )
        })
    }
}

/// `ROOT/.georep/role.json`.
pub fn path(root: &Path) -> PathBuf {
    root.join(STATE_DIR).join(ROLE_FILE)
}

/// Why a role file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a georep role file ({source}): move it away if it is not georep's")]
    Malformed {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl RoleError {
    pub fn retry(&self) -> crate::error::Retry {
        match self {
            RoleError::Io { .. } => crate::error::Retry::Temporary,
            RoleError::Malformed { .. } => crate::error::Retry::Permanent,
        }
    }
}

/// The role of `root`; `None` when it has none (a plain master, or a slave
/// not claimed yet).
pub fn read(root: &Path) -> Result<Option<RoleRecord>, RoleError> {
    let p = path(root);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|source| RoleError::Malformed { path: p, source }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RoleError::Io { path: p, source }),
    }
}

/// Writes the role of `root` durably (temporary file, fsync, rename, fsync
/// of the directory), creating the state directory if needed.
pub fn write(root: &Path, rec: &RoleRecord) -> Result<(), RoleError> {
    let dir = root.join(STATE_DIR);
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RoleError::Io { path, source }
    };
    let before = std::fs::metadata(root).map_err(err(root))?;
    match std::fs::create_dir(&dir) {
        Ok(()) => {
            // A root's mtime is replicated data: creating georep's own
            // directory must not move it.
            use std::os::unix::fs::MetadataExt;
            let at = nix::sys::time::TimeSpec::new(before.atime(), before.atime_nsec());
            let mt = nix::sys::time::TimeSpec::new(before.mtime(), before.mtime_nsec());
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                root,
                &at,
                &mt,
                nix::sys::stat::UtimensatFlags::FollowSymlink,
            )
            .map_err(|e| err(root)(e.into()))?;
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(err(&dir)(e)),
    }
    let p = dir.join(ROLE_FILE);
    let tmp = dir.join(format!(".{ROLE_FILE}.tmp{}", std::process::id()));
    let data = serde_json::to_vec_pretty(rec).expect("role serializes");
    (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &p)?;
        std::fs::File::open(&dir)?.sync_all()
    })()
    .map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(&p)(e)
    })
}

/// This host's name, as recorded in role files.
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// RFC 3339 UTC with seconds (for messages).
pub fn format_time(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(role: Role, epoch: u64) -> RoleRecord {
        RoleRecord {
            role,
            epoch,
            session: Some(Uuid::nil()),
            at_ns: 1_700_000_000_000_000_000,
            host: "siteb".into(),
            promote_stamp: None,
            report: None,
        }
    }

    #[test]
    fn round_trip_and_absence() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read(d.path()).unwrap(), None);
        let r = rec(Role::Promoted, 3);
        write(d.path(), &r).unwrap();
        assert_eq!(read(d.path()).unwrap(), Some(r));
        std::fs::write(path(d.path()), b"{nonsense").unwrap();
        assert!(matches!(read(d.path()), Err(RoleError::Malformed { .. })));
    }

    #[test]
    fn fencing_rules() {
        let live = rec(Role::Promoted, 1);
        let msg = live.fence("/srv/replica", 5).unwrap();
        assert!(msg.starts_with("/srv/replica was promoted at 2023-11-14T22:13:20Z on siteb"));
        assert!(msg.contains("--failback"), "{msg}");
        let replica = rec(Role::Replica, 2);
        assert!(replica.fence("/r", 2).is_none());
        assert!(replica.fence("/r", 3).is_none());
        assert!(replica.fence("/r", 1).unwrap().contains("older epoch 1"));
        assert!(rec(Role::Demoted, 1).fence("/r", 1).is_none());
    }
}
