//! The quarantine of a snapshot store's old master (catalog mode).
//!
//! Points are (host, disk, time) and never change once published, so the
//! last common point of a disk is the newest point this store (the old
//! master) holds that the new master holds too: the new master sends its
//! points in the failback claim. Per host snapshot (generation) here:
//!
//! - its image on some disk is newer than that disk's common point (or the
//!   new master has no point of the disk): **divergent**, removed from the
//!   store after the quarantine is published;
//! - its journals hold points after the common point: **divergent points**,
//!   each journal's storage record cut back to the common point (the bytes
//!   after it go; the reverse session appends the new master's points);
//! - none of its points is on the new master (history the replica never
//!   held, or that its retention deleted since): **absent**, left in place
//!   (the reverse session's retention removes it).
//!
//! Each such generation enters the quarantine whole, as a store of its
//! own: `store.json`, the host record, the generation's records, its
//! images and their backing chains (hard links: published images are never
//! written again), and its journals (copied: journals grow in place). So
//! `georep point list/restore/verify` work on `.georep-quarantine/ID/data`.
//! The changes to the store are listed in the manifest and done after it
//! is published, again by every later commit (they are idempotent), so a
//! kill at any moment converges.

use super::{io, Item, Manifest, StoreAction, StoreCut, DATA, MANIFEST};
use crate::catalog::cdp::{self, PointSpan};
use crate::catalog::record::{self, CdpStorage, StorageBody, StoreRecord};
use crate::catalog::store::{self, Catalog, Host};
use crate::fs::role::{self, format_time};
use crate::fs::xtime;
use crate::protocol::{ErrorKind, FailbackClaim, WireError};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use uuid::Uuid;

type WResult<T> = Result<T, WireError>;

/// Points a failback claim may name in all (a nanosecond time takes 9
/// bytes on the wire: about 9 MiB, within a frame).
pub const MAX_CLAIM_POINTS: usize = 1 << 20;
/// Longest backing chain of an image followed.
const MAX_CHAIN: usize = 4096;

pub(super) fn invalid(msg: String) -> WireError {
    WireError::new(ErrorKind::Invalid, msg)
}

/// The new master's points, by (host, disk).
pub type PeerPoints = BTreeMap<(String, String), BTreeSet<u64>>;

/// Journal spans within their published length, by journal file.
pub type Spans = BTreeMap<String, Vec<PointSpan>>;

/// The points of every disk of `h`, from its records and journal spans.
fn host_points(h: &Host, spans: &Spans) -> BTreeMap<String, BTreeSet<u64>> {
    let mut out: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for g in h.snapshots.values() {
        for (dn, d) in &g.disks {
            let set = out.entry(dn.clone()).or_default();
            set.extend(d.qcows().map(|q| q.time));
            if let Some(c) = d.cdp() {
                set.extend(spans.get(&c.file).into_iter().flatten().map(|s| s.time));
            }
        }
    }
    out
}

/// What the quarantine takes and changes, from this store's catalog, its
/// journals' spans and the new master's points (pure). `force`: every
/// generation is divergent.
pub fn plan(cat: &Catalog, spans: &Spans, peer: &PeerPoints, force: bool) -> Vec<StoreAction> {
    let mut out = Vec::new();
    let none = BTreeSet::new();
    for (hn, h) in &cat.hosts {
        let mine = host_points(h, spans);
        let common: BTreeMap<&str, Option<u64>> = mine
            .iter()
            .map(|(dn, pts)| {
                let theirs = peer.get(&(hn.clone(), dn.clone())).unwrap_or(&none);
                (dn.as_str(), pts.intersection(theirs).max().copied())
            })
            .collect();
        // The host's newest common point on any disk: a disk with none (B
        // never held it, e.g. detached before B's first sync) makes only
        // the host snapshots after that point divergent.
        let host_common = common.values().flatten().max().copied();
        for g in h.snapshots.values() {
            let action = |reason: &str, remove: bool, cuts: Vec<StoreCut>| StoreAction {
                host: hn.clone(),
                snapshot: g.dir.clone(),
                reason: reason.to_string(),
                remove,
                cuts,
            };
            let divergent = force
                || g.disks
                    .iter()
                    .any(|(dn, d)| match common.get(dn.as_str()).copied().flatten() {
                        None => host_common.is_none_or(|hc| g.record.time > hc),
                        Some(c) => d.record.time > c || d.qcows().any(|q| q.time > c),
                    });
            if divergent {
                out.push(action("divergent", true, Vec::new()));
                continue;
            }
            let mut cuts = Vec::new();
            for (dn, d) in &g.disks {
                let (Some(c), Some(j)) = (common.get(dn.as_str()).copied().flatten(), d.cdp())
                else {
                    continue;
                };
                if j.end <= c {
                    continue;
                }
                let kept: Vec<&PointSpan> = spans
                    .get(&j.file)
                    .into_iter()
                    .flatten()
                    .filter(|s| s.time <= c)
                    .collect();
                let storage = d
                    .storages
                    .iter()
                    .find(|s| matches!(s.record.body, StorageBody::Cdp(_)))
                    .map(|s| s.name.clone())
                    .unwrap_or_default();
                cuts.push(StoreCut {
                    record: format!("{}/{}/{storage}", record::snapshots_dir(hn), g.dir),
                    length: kept.last().map(|s| s.end).unwrap_or(cdp::HEADER_LEN),
                    points: kept.len() as u64,
                    end: kept.last().map(|s| s.time).unwrap_or(j.start),
                    from: (j.length, j.points, j.end),
                });
            }
            if !cuts.is_empty() {
                out.push(action("divergent points", false, cuts));
                continue;
            }
            let held = g.disks.iter().any(|(dn, d)| {
                let theirs = peer.get(&(hn.clone(), dn.clone())).unwrap_or(&none);
                d.qcows().any(|q| theirs.contains(&q.time))
                    || d.cdp().is_some_and(|j| {
                        spans
                            .get(&j.file)
                            .into_iter()
                            .flatten()
                            .any(|s| theirs.contains(&s.time))
                    })
            });
            if !held {
                out.push(action("absent", false, Vec::new()));
            }
        }
    }
    out
}

/// One bounded piece of the build.
enum Op {
    /// A small file (a record) copied whole.
    Copy { src: String, reason: String },
    /// An image hard-linked (its digest from its record, if any).
    Link {
        src: String,
        digest: Option<String>,
        reason: String,
    },
    /// Bytes `[from, len)` of a journal copied into its copy (hashed as copied).
    Journal {
        src: String,
        from: u64,
        len: u64,
        reason: String,
        digest: Box<crate::hash::digest::Digester>,
    },
    /// A written file: `store.json`.
    Write { dst: String, data: Vec<u8> },
}

/// The quarantine of a store being built for a failback connection.
pub struct StoreJob {
    pub id: String,
    root: PathBuf,
    building: PathBuf,
    published: PathBuf,
    peer: PeerPoints,
    force: bool,
    actions: Option<Vec<StoreAction>>,
    ops: VecDeque<Op>,
    items: BTreeMap<String, Item>,
    session: Uuid,
    old_session: Uuid,
    epoch: u64,
    committed: bool,
}

/// The backing file name in a qcow2 image's header (None: a full image).
pub(super) fn backing_name(p: &Path) -> std::io::Result<Option<String>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(p)?;
    let mut head = [0u8; 20];
    f.read_exact_at(&mut head, 0)?;
    if &head[0..4] != b"QFI\xfb" {
        return Err(std::io::Error::other("not a qcow2 image"));
    }
    let off = u64::from_be_bytes(head[8..16].try_into().expect("8 bytes"));
    let len = u32::from_be_bytes(head[16..20].try_into().expect("4 bytes")) as usize;
    if off == 0 || len == 0 {
        return Ok(None);
    }
    let mut name = vec![0u8; len.min(4096)];
    f.read_exact_at(&mut name, off)?;
    Ok(Some(String::from_utf8_lossy(&name).into_owned()))
}

/// Refuses a store path that is not a plain file or directory reached
/// through no symlink beneath the root.
pub(super) fn plain(root: &Path, rel: &str) -> WResult<PathBuf> {
    if !record::valid_rel(rel) {
        return Err(invalid(format!(
            "quarantine: {rel}: not a path inside the store"
        )));
    }
    let mut p = root.to_path_buf();
    for c in rel.split('/') {
        p.push(c);
        let md = p.symlink_metadata().map_err(io("reading", &p))?;
        if md.file_type().is_symlink() {
            return Err(invalid(format!(
                "quarantine: {} is a symlink: a store holds none; remove it",
                p.display()
            )));
        }
    }
    Ok(p)
}

impl StoreJob {
    pub fn start(root: &Path, session: Uuid, epoch: u64, fb: &FailbackClaim) -> WResult<StoreJob> {
        let total: usize = fb.points.iter().map(|p| p.2.len()).sum();
        if total > MAX_CLAIM_POINTS {
            return Err(invalid(format!(
                "failback claim: {total} points, at most {MAX_CLAIM_POINTS}"
            )));
        }
        let mut peer = PeerPoints::new();
        for (h, d, ts) in &fb.points {
            peer.entry((h.clone(), d.clone()))
                .or_default()
                .extend(ts.iter().copied());
        }
        let (id, building, published, committed) = super::start_dirs(root, &session, epoch)?;
        Ok(StoreJob {
            id,
            root: root.to_path_buf(),
            building,
            published,
            peer,
            force: fb.force,
            actions: None,
            ops: VecDeque::new(),
            items: BTreeMap::new(),
            session,
            old_session: fb.old_session,
            epoch,
            committed,
        })
    }

    /// Reads the store and plans the quarantine (first step).
    fn prepare(&mut self) -> WResult<()> {
        let cat = store::load(&self.root).map_err(|e| invalid(format!("quarantine: {e}")))?;
        let mut spans = Spans::new();
        let mut digests: BTreeMap<String, String> = BTreeMap::new();
        for h in cat.hosts.values() {
            for g in h.snapshots.values() {
                for d in g.disks.values() {
                    for q in d.qcows() {
                        digests.insert(q.file.clone(), q.digest.clone());
                    }
                    if let Some(j) = d.cdp() {
                        spans.insert(j.file.clone(), self.spans(j)?);
                    }
                }
            }
        }
        for (hn, h) in &cat.hosts {
            let disks = record::disk_dir(hn, "");
            for d in h.snapshots.values().flat_map(|g| g.disks.values()) {
                for s in &d.storages {
                    let base = match &s.record.body {
                        StorageBody::Cdp(c) => Some(c.base_file.as_str()),
                        StorageBody::Qcow(_) => None,
                    };
                    for f in std::iter::once(s.record.body.file()).chain(base) {
                        if !f.starts_with(&disks) || f[disks.len()..].split('/').count() != 2 {
                            return Err(invalid(format!(
                                "quarantine: host {hn}'s records name {f}, not a file of its disks ({disks}DISK/FILE): fix the record"
                            )));
                        }
                    }
                }
            }
        }
        let actions = plan(&cat, &spans, &self.peer, self.force);
        // A store even when empty, so that the point commands read it.
        let mut ops = VecDeque::from([Op::Write {
            dst: record::STORE_FILE.to_string(),
            data: record::to_json(&StoreRecord::default()),
        }]);
        let mut hosts = BTreeSet::new();
        let mut linked = BTreeSet::new();
        for a in &actions {
            let reason = a.reason.clone();
            let h = &cat.hosts[&a.host];
            let g = h
                .snapshots
                .values()
                .find(|g| g.dir == a.snapshot)
                .expect("planned from it");
            if hosts.insert(a.host.clone()) && h.record.is_some() {
                ops.push_back(Op::Copy {
                    src: record::host_file(&a.host),
                    reason: reason.clone(),
                });
            }
            let sdir = format!("{}/{}", record::snapshots_dir(&a.host), g.dir);
            ops.push_back(Op::Copy {
                src: format!("{sdir}/snapshot.json"),
                reason: reason.clone(),
            });
            for (dn, d) in &g.disks {
                ops.push_back(Op::Copy {
                    src: format!("{sdir}/{}", record::disk_record_name(dn)),
                    reason: reason.clone(),
                });
                for s in &d.storages {
                    ops.push_back(Op::Copy {
                        src: format!("{sdir}/{}", s.name),
                        reason: reason.clone(),
                    });
                    let images: Vec<&str> = match &s.record.body {
                        StorageBody::Qcow(q) => vec![q.file.as_str()],
                        StorageBody::Cdp(c) => {
                            ops.push_back(Op::Journal {
                                src: c.file.clone(),
                                from: 0,
                                len: c.length,
                                reason: reason.clone(),
                                digest: Box::default(),
                            });
                            vec![c.base_file.as_str()]
                        }
                    };
                    for img in images {
                        for f in self.chain(img, &linked)? {
                            if linked.insert(f.clone()) {
                                ops.push_back(Op::Link {
                                    digest: digests.get(&f).cloned(),
                                    src: f,
                                    reason: reason.clone(),
                                });
                            }
                        }
                    }
                }
            }
        }
        self.ops = ops;
        self.actions = Some(actions);
        Ok(())
    }

    fn spans(&self, j: &CdpStorage) -> WResult<Vec<PointSpan>> {
        let p = plain(&self.root, &j.file)?;
        let f = std::fs::File::open(&p).map_err(io("opening", &p))?;
        let (_, spans) = cdp::spans(&f, j.length, false)
            .map_err(|e| invalid(format!("quarantine: {}: {e}", p.display())))?;
        Ok(spans)
    }

    /// An image and its backing files not in `seen` yet (siblings, as the
    /// store's format has them).
    fn chain(&self, file: &str, seen: &BTreeSet<String>) -> WResult<Vec<String>> {
        let mut out = Vec::new();
        let mut mine = BTreeSet::new();
        let mut cur = Some(file.to_string());
        while let Some(f) = cur.take() {
            if seen.contains(&f) || !mine.insert(f.clone()) {
                break;
            }
            if out.len() >= MAX_CHAIN {
                return Err(invalid(format!(
                    "quarantine: {file}: a backing chain of more than {MAX_CHAIN} images"
                )));
            }
            let p = plain(&self.root, &f)?;
            cur = backing_name(&p)
                .map_err(io("reading the header of", &p))?
                .filter(|b| !b.contains('/') && !b.starts_with('.'))
                .map(|b| match f.rsplit_once('/') {
                    Some((dir, _)) => format!("{dir}/{b}"),
                    None => b,
                });
            out.push(f);
        }
        Ok(out)
    }

    fn item(&mut self, rel: &str, md: &std::fs::Metadata, digest: String, reason: &str) {
        self.items.insert(
            rel.to_string(),
            Item {
                path: rel.to_string(),
                path_hex: record::hex(rel.as_bytes()),
                kind: "file".into(),
                size: md.len(),
                digest: Some(digest),
                target: None,
                mode: md.permissions().mode() & 0o7777,
                mtime_ns: md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128,
                xtime: 0,
                reason: reason.to_string(),
            },
        );
    }

    fn dst(&self, rel: &str) -> WResult<PathBuf> {
        let d = self.building.join(DATA).join(rel);
        if let Some(parent) = d.parent() {
            std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
        }
        Ok(d)
    }

    /// Carries out ops until about `max_bytes` are copied or `max_ops`
    /// done; returns whether the build is finished.
    pub fn step(&mut self, max_ops: usize, max_bytes: u64) -> WResult<bool> {
        if self.committed {
            return Ok(true);
        }
        if self.actions.is_none() {
            self.prepare()?;
        }
        let (mut n, mut bytes) = (0usize, 0u64);
        while n < max_ops.max(1) && bytes < max_bytes.max(1) {
            let Some(op) = self.ops.pop_front() else {
                return Ok(true);
            };
            n += 1;
            match op {
                Op::Write { dst, data } => {
                    let d = self.dst(&dst)?;
                    std::fs::write(&d, data).map_err(io("writing", &d))?;
                }
                Op::Copy { src, reason } => {
                    let s = plain(&self.root, &src)?;
                    let data = std::fs::read(&s).map_err(io("reading", &s))?;
                    let md = s.symlink_metadata().map_err(io("reading", &s))?;
                    let d = self.dst(&src)?;
                    std::fs::write(&d, &data).map_err(io("writing", &d))?;
                    bytes += data.len() as u64;
                    let digest = record::hex(&crate::hash::digest::digest_of(&data));
                    self.item(&src, &md, digest, &reason);
                }
                Op::Link {
                    src,
                    digest,
                    reason,
                } => {
                    let s = plain(&self.root, &src)?;
                    let d = self.dst(&src)?;
                    // A published image is never written again (catalog mode
                    // patches nothing in place), so a link holds it. One with
                    // links georep did not make is copied, not blessed.
                    let sf = std::fs::File::open(&s).map_err(io("opening", &s))?;
                    let foreign = super::super::meta::foreign_links(std::os::fd::AsFd::as_fd(&sf));
                    let linked = !foreign
                        && match std::fs::hard_link(&s, &d) {
                            Ok(()) => true,
                            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => true,
                            Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => false,
                            Err(e) => return Err(io("linking", &s)(e)),
                        };
                    if linked {
                        // The agent refuses inodes with links it did not make.
                        super::super::meta::mark_links(
                            std::os::fd::AsFd::as_fd(&sf),
                            &d.display(),
                        )?;
                    } else {
                        std::fs::copy(&s, &d).map_err(io("copying", &s))?;
                        bytes += sf.metadata().map(|m| m.len()).unwrap_or(0);
                    }
                    let md = s.symlink_metadata().map_err(io("reading", &s))?;
                    let digest = match digest {
                        Some(x) => x,
                        None => {
                            let (_, dg) = crate::catalog::points::file_digest(&s)
                                .map_err(|e| invalid(format!("quarantine: {e}")))?;
                            bytes += md.len();
                            record::hex(&dg)
                        }
                    };
                    self.item(&src, &md, digest, &reason);
                }
                Op::Journal {
                    src,
                    from,
                    len,
                    reason,
                    mut digest,
                } => {
                    use std::os::unix::fs::FileExt;
                    let s = plain(&self.root, &src)?;
                    let d = self.dst(&src)?;
                    let sf = std::fs::File::open(&s).map_err(io("opening", &s))?;
                    let df = std::fs::OpenOptions::new()
                        .create(true)
                        .write(true)
                        .truncate(false)
                        .open(&d)
                        .map_err(io("creating", &d))?;
                    let chunk = (len - from).min(8 << 20).min(max_bytes.max(1 << 20));
                    let mut buf = vec![0u8; chunk as usize];
                    sf.read_exact_at(&mut buf, from)
                        .map_err(io("reading", &s))?;
                    df.write_all_at(&buf, from).map_err(io("writing", &d))?;
                    digest.feed(&buf);
                    bytes += chunk;
                    if from + chunk < len {
                        self.ops.push_front(Op::Journal {
                            src,
                            from: from + chunk,
                            len,
                            reason,
                            digest,
                        });
                    } else {
                        df.set_len(len).map_err(io("writing", &d))?;
                        df.sync_all().map_err(io("writing", &d))?;
                        let md = d.symlink_metadata().map_err(io("reading", &d))?;
                        self.item(&src, &md, record::hex(&digest.finish()), &reason);
                    }
                }
            }
        }
        Ok(self.ops.is_empty())
    }

    /// Publishes the quarantine (once), then makes the store's changes it
    /// lists (every time: they are idempotent).
    pub fn commit(&mut self, root_fd: std::os::fd::BorrowedFd<'_>) -> WResult<String> {
        if !self.committed {
            if self.actions.is_none() || !self.ops.is_empty() {
                return Err(invalid("quarantine commit before its build is done".into()));
            }
            let now = xtime::now_ns();
            let m = Manifest {
                id: self.id.clone(),
                created: format_time(now),
                created_ns: now,
                host: role::host_name(),
                session: self.session.to_string(),
                old_session: self.old_session.to_string(),
                epoch: self.epoch,
                rule: if self.force {
                    "forced: every host snapshot of the store".into()
                } else {
                    "store: per disk, points after the newest point the new master also holds; host snapshots holding none of its points".into()
                },
                items: self.items.values().cloned().collect(),
                store: self.actions.clone().unwrap_or_default(),
            };
            let mp = self.building.join(MANIFEST);
            std::fs::write(&mp, serde_json::to_vec_pretty(&m).expect("serializes"))
                .map_err(io("writing", &mp))?;
            nix::unistd::syncfs(root_fd)
                .map_err(|e| WireError::new(ErrorKind::Io, format!("quarantine: syncfs: {e}")))?;
            std::fs::rename(&self.building, &self.published)
                .map_err(io("publishing", &self.published))?;
            // Durable before anything in the store changes.
            if let Some(parent) = self.published.parent() {
                std::fs::File::open(parent)
                    .and_then(|d| d.sync_all())
                    .map_err(io("publishing", &self.published))?;
            }
            self.committed = true;
            tracing::info!(id = %self.id, items = m.items.len(), bytes = m.bytes(), "store quarantine published");
        }
        let m = super::show(&self.root, &self.id).map_err(|e| invalid(e.to_string()))?;
        apply(&self.root, &m.store)?;
        nix::unistd::syncfs(root_fd)
            .map_err(|e| WireError::new(ErrorKind::Io, format!("quarantine: syncfs: {e}")))?;
        Ok(self.id.clone())
    }
}

mod apply;
#[cfg(test)]
mod tests;

pub use apply::apply;
