//! The quarantine of a failback's old master (DESIGN §10): before the
//! reverse session overwrites or deletes anything on the old master, its
//! divergent entries (changed after the last common point) are copied into
//! `ROOT/.georep-quarantine/ID/data/PATH`, with `manifest.json` naming each
//! (path, type, size, digest, xtime, reason). A quarantine is built in
//! `.georep-quarantine/.building-ID/` and published by one rename, before the
//! first write of the failback; nothing leaves it but `discard`.
//!
//! The build is [`build::Job`] (bounded steps driven by the worker); the
//! operator's side is [`list`], [`show`], [`restore`] and [`discard`].

mod beneath;
pub mod build;
mod copy;
pub mod store;
pub mod walk;

pub use build::Job;
pub use store::StoreJob;

/// A quarantine being built: of a tree, or of a snapshot store.
pub enum Building {
    Tree(Box<Job>),
    Store(Box<StoreJob>),
}

impl Building {
    pub fn id(&self) -> &str {
        match self {
            Building::Tree(j) => &j.id,
            Building::Store(j) => &j.id,
        }
    }
}

use serde::{Deserialize, Serialize};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The manifest's file name in a quarantine.
pub const MANIFEST: &str = "manifest.json";
/// Where a quarantine keeps the entries' copies.
pub const DATA: &str = "data";

/// `ROOT/.georep-quarantine`.
pub fn dir(root: &Path) -> PathBuf {
    root.join(std::ffi::OsStr::from_bytes(crate::protocol::QUARANTINE_DIR))
}

/// The id of a failback's quarantine, where it is built and published,
/// and whether it is published already; an unpublished attempt's leftovers
/// are removed and the build starts afresh.
pub(crate) fn start_dirs(
    root: &Path,
    session: &uuid::Uuid,
    epoch: u64,
) -> Result<(String, PathBuf, PathBuf, bool), crate::protocol::WireError> {
    let id = build::id_for(session, epoch);
    let qdir = dir(root);
    let building = qdir.join(format!(".building-{id}"));
    let published = qdir.join(&id);
    let committed = published.is_dir();
    if !committed {
        match std::fs::remove_dir_all(&building) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("removing", &building)(e)),
        }
        std::fs::create_dir_all(building.join(DATA)).map_err(io("creating", &building))?;
    }
    Ok((id, building, published, committed))
}

/// An I/O error of a quarantine's build, naming what was done to which path.
pub(super) fn io(
    what: &str,
    p: &Path,
) -> impl FnOnce(std::io::Error) -> crate::protocol::WireError {
    let msg = format!("quarantine: {what} {}", p.display());
    move |e| crate::protocol::WireError::new(crate::protocol::ErrorKind::Io, format!("{msg}: {e}"))
}

/// One quarantined entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Relative to the root (lossy UTF-8 for display; `path_hex` is exact).
    pub path: String,
    /// The exact path bytes, hex (names need not be UTF-8).
    pub path_hex: String,
    /// "file", "symlink" or "dir" (an empty directory).
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    /// Files: georep's digest (hex); symlinks: the target.
    pub digest: Option<String>,
    pub target: Option<String>,
    pub mode: u32,
    pub mtime_ns: i128,
    /// The entry's xtime on the old master (0: never stamped).
    pub xtime: u64,
    /// "divergent": changed here after the last common point, absent or
    /// different on the new master; "conflict": also changed there (it wins).
    pub reason: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub id: String,
    pub created: String,
    pub created_ns: u64,
    pub host: String,
    /// The reverse session that made it, and the session whose stimes are the common point.
    pub session: String,
    pub old_session: String,
    pub epoch: u64,
    /// How divergence was decided.
    pub rule: String,
    pub items: Vec<Item>,
    /// A snapshot store's: the changes made to the store once published.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub store: Vec<StoreAction>,
}

/// What a store's quarantine did with one host snapshot of the old master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreAction {
    pub host: String,
    pub snapshot: String,
    /// "divergent" (newer than the common point: removed), "divergent
    /// points" (journals cut back to it) or "absent" (none of its points on
    /// the new master: left to the reverse session's retention).
    pub reason: String,
    /// Removed from the store once the quarantine was published.
    pub remove: bool,
    pub cuts: Vec<StoreCut>,
}

/// A journal's storage record cut back to the last common point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreCut {
    /// The storage record, relative to the store root.
    pub record: String,
    pub length: u64,
    pub points: u64,
    pub end: u64,
    /// The record's (length, points, end) the cut was planned from: cut
    /// only while it is unchanged (a re-run after the reverse session
    /// appended must not cut again).
    pub from: (u64, u64, u64),
}

impl Manifest {
    pub fn bytes(&self) -> u64 {
        self.items.iter().map(|i| i.size).sum()
    }
}

/// Why a quarantine operation failed (a one-line message with the fix).
#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Io(String),
}

fn io_err(what: &str, p: &Path) -> impl FnOnce(std::io::Error) -> QuarantineError {
    let msg = format!("{what} {}", p.display());
    move |e| QuarantineError::Io(format!("{msg}: {e}"))
}

/// Every published quarantine of `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<Manifest>, QuarantineError> {
    let d = dir(root);
    let rd = match std::fs::read_dir(&d) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("listing", &d)(e)),
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name();
        if name.as_bytes().starts_with(b".") {
            continue;
        }
        out.push(show(root, &name.to_string_lossy())?);
    }
    out.sort_by_key(|m| (m.created_ns, m.id.clone()));
    Ok(out)
}

fn check_id(id: &str) -> Result<(), QuarantineError> {
    if id.is_empty() || id.starts_with('.') || id.contains('/') {
        return Err(QuarantineError::Usage(format!(
            "bad quarantine id {id:?}: give one that `georep quarantine list` shows"
        )));
    }
    Ok(())
}

/// The manifest of quarantine `id`.
pub fn show(root: &Path, id: &str) -> Result<Manifest, QuarantineError> {
    check_id(id)?;
    let p = dir(root).join(id).join(MANIFEST);
    let b = std::fs::read(&p).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => QuarantineError::Usage(format!(
            "no quarantine {id:?} in {}: `georep quarantine list {}` shows those there are",
            root.display(),
            root.display()
        )),
        _ => QuarantineError::Io(format!("reading {}: {e}", p.display())),
    })?;
    serde_json::from_slice(&b).map_err(|e| {
        QuarantineError::Io(format!("{}: not a quarantine manifest: {e}", p.display()))
    })
}

fn hex_path(h: &str) -> Option<Vec<u8>> {
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Copies entries of quarantine `id` (all, or those at or below `paths`)
/// back to `to` (default: the root itself) at their paths. The quarantine
/// keeps them (only `discard` removes it). Refuses to replace anything
/// that exists, and to write into a replica (the next sync would undo it).
pub fn restore(
    root: &Path,
    id: &str,
    paths: &[String],
    to: Option<&Path>,
) -> Result<Vec<String>, QuarantineError> {
    let m = show(root, id)?;
    let target = to.unwrap_or(root);
    if to.is_none() {
        if let Ok(Some(r)) = crate::fs::role::read(root) {
            if !r.is_live() {
                return Err(QuarantineError::Usage(format!(
                    "{} is {}: what is restored into it would be overwritten by the next sync; restore with --to ANOTHER_DIR, or promote it first",
                    root.display(),
                    r.describe()
                )));
            }
        }
    }
    let wanted = |p: &str| {
        paths.is_empty()
            || paths.iter().any(|w| {
                let w = w.trim_end_matches('/');
                p == w || p.starts_with(&format!("{w}/"))
            })
    };
    let items: Vec<&Item> = m.items.iter().filter(|i| wanted(&i.path)).collect();
    if items.is_empty() {
        return Err(QuarantineError::Usage(format!(
            "nothing in quarantine {id} matches {paths:?}: `georep quarantine show {} {id}` lists what it holds",
            root.display()
        )));
    }
    let data = dir(root).join(id).join(DATA);
    for i in &items {
        let rel = hex_path(&i.path_hex).unwrap_or_else(|| i.path.as_bytes().to_vec());
        let dst = target.join(std::ffi::OsStr::from_bytes(&rel));
        if dst.symlink_metadata().is_ok() && i.kind != "dir" {
            return Err(QuarantineError::Usage(format!(
                "{} exists: move it away first, or restore with --to ANOTHER_DIR",
                dst.display()
            )));
        }
    }
    let mut done = Vec::new();
    for i in items {
        let rel = hex_path(&i.path_hex).unwrap_or_else(|| i.path.as_bytes().to_vec());
        let src = data.join(std::ffi::OsStr::from_bytes(&rel));
        let dst = target.join(std::ffi::OsStr::from_bytes(&rel));
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
        }
        copy::copy_entry(&src, &dst).map_err(io_err("restoring", &dst))?;
        done.push(i.path.clone());
    }
    Ok(done)
}

/// Removes quarantine `id` for good (a rename out of sight, then removal,
/// so a killed discard leaves nothing that looks like a quarantine).
pub fn discard(root: &Path, id: &str) -> Result<Manifest, QuarantineError> {
    let m = show(root, id)?;
    let d = dir(root);
    // Leftovers of discards killed half-way.
    for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
        if e.file_name().as_bytes().starts_with(b".discarding-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let gone = d.join(format!(".discarding-{id}"));
    std::fs::rename(d.join(id), &gone).map_err(io_err("discarding", &d.join(id)))?;
    std::fs::remove_dir_all(&gone).map_err(io_err("removing", &gone))?;
    Ok(m)
}
