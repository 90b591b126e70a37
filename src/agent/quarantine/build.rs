//! Building a quarantine on the old master, in bounded steps.
//!
//! The last common point of a tree is what the old session's stimes say:
//! an entry whose xtime is newer than the newest stime of its ancestors was
//! changed after the promoted replica last received it (its divergence).
//! Directories whose xtime is not newer than that are skipped whole (the
//! marker invariant), so the walk costs O(divergence). A changed
//! directory is first looked up on the new master (the worker answers in
//! the next step): one it lacks may be new or renamed here, and is taken
//! whole, whatever the stamps of what it holds. Symlinks carry no stamp:
//! those in a changed directory are taken, and the worker drops what equals
//! the new master's version (`QuarantineResolve`). With `force` (a root
//! that was never the session's master) everything is taken.

use super::{Item, Manifest, DATA, MANIFEST};
use crate::fs::meta::Kind;
use crate::fs::relpath::RelPath;
use crate::fs::role::{self, format_time};
use crate::fs::xtime;
use crate::protocol::{ErrorKind, FailbackClaim, PeerEntry, QuarantinedEntry, WireError};
use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use uuid::Uuid;

type WResult<T> = Result<T, WireError>;

fn io(what: &str, p: &Path) -> impl FnOnce(std::io::Error) -> WireError {
    let msg = format!("quarantine: {what} {}", p.display());
    move |e| WireError::new(ErrorKind::Io, format!("{msg}: {e}"))
}

/// A file being copied in, across steps.
struct Copying {
    rel: Vec<u8>,
    src: std::fs::File,
    dst: std::fs::File,
    md: std::fs::Metadata,
    xtime: u64,
    digest: crate::hash::digest::Digester,
}

/// One quarantine being built for a failback connection.
pub struct Job {
    pub id: String,
    root: PathBuf,
    building: PathBuf,
    published: PathBuf,
    xtime_attr: Option<String>,
    stime_attr: String,
    force: bool,
    /// Directories to list: (path, effective stime of the parent, the new
    /// master's listing there; None: it has none, everything is taken).
    dirs: Vec<(Vec<u8>, u64, Option<Vec<PeerEntry>>)>,
    /// Changed directories waiting for the new master's listing, with the
    /// effective stime of their parent.
    asking: BTreeMap<Vec<u8>, u64>,
    pending: VecDeque<Vec<u8>>,
    copying: Option<Copying>,
    items: BTreeMap<Vec<u8>, Item>,
    session: Uuid,
    old_session: Uuid,
    epoch: u64,
    committed: bool,
}

fn join(root: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(OsStr::from_bytes(rel))
    }
}

fn child(rel: &[u8], name: &[u8]) -> Vec<u8> {
    let mut c = rel.to_vec();
    if !c.is_empty() {
        c.push(b'/');
    }
    c.extend_from_slice(name);
    c
}

/// The id of the quarantine of a failback: the same for every attempt.
pub fn id_for(session: &Uuid, epoch: u64) -> String {
    format!("epoch{epoch}-{}", &session.simple().to_string()[..8])
}

impl Job {
    /// Starts (or finds published) the quarantine of the connection's failback.
    pub fn start(root: &Path, session: Uuid, epoch: u64, fb: &FailbackClaim) -> WResult<Job> {
        let id = id_for(&session, epoch);
        let qdir = super::dir(root);
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
        let master = xtime::master_id(root).map_err(io("reading the master id of", root))?;
        let stime_attr = xtime::stime_attr(&fb.old_session);
        Ok(Job {
            id,
            root: root.to_path_buf(),
            building,
            published,
            xtime_attr: master.map(|m| xtime::xtime_attr(&m)),
            stime_attr,
            force: fb.force,
            dirs: if committed || !fb.force {
                Vec::new()
            } else {
                vec![(Vec::new(), 0, None)]
            },
            // The root is compared with the new master's root listing first.
            asking: if committed || fb.force {
                BTreeMap::new()
            } else {
                [(Vec::new(), 0)].into_iter().collect()
            },
            pending: VecDeque::new(),
            copying: None,
            items: BTreeMap::new(),
            session,
            old_session: fb.old_session,
            epoch,
            committed,
        })
    }

    fn xtime(&self, p: &Path) -> u64 {
        match &self.xtime_attr {
            Some(a) => xtime::read(p, a).unwrap_or(0),
            None => 0,
        }
    }

    /// Takes in at most `max_entries` entries and about `max_bytes` of data,
    /// after the answers about the directories asked last time; returns the
    /// entries, the directories to ask about, and whether the walk is done.
    pub fn step(
        &mut self,
        max_entries: u32,
        max_bytes: u64,
        answers: Vec<(RelPath, Option<Vec<PeerEntry>>)>,
    ) -> WResult<(Vec<QuarantinedEntry>, Vec<RelPath>, bool)> {
        for (dir, listing) in answers {
            if let Some(eff) = self.asking.remove(dir.as_bytes()) {
                self.dirs.push((dir.as_bytes().to_vec(), eff, listing));
            }
        }
        let mut out = Vec::new();
        let mut bytes = 0u64;
        while out.len() < max_entries.max(1) as usize && bytes < max_bytes.max(1 << 20) {
            if let Some(c) = &mut self.copying {
                let mut buf = vec![0u8; 1 << 20];
                let n = c
                    .src
                    .read(&mut buf)
                    .map_err(io("reading", &join(&self.root, &c.rel)))?;
                if n > 0 {
                    c.digest.feed(&buf[..n]);
                    c.dst
                        .write_all(&buf[..n])
                        .map_err(io("writing a copy of", &join(&self.root, &c.rel)))?;
                    bytes += n as u64;
                    continue;
                }
                let c = self.copying.take().expect("copying");
                let dst = join(&self.building.join(DATA), &c.rel);
                copy_xattrs(&join(&self.root, &c.rel), &dst)?;
                apply_meta(&dst, &c.md).map_err(io("setting metadata of", &dst))?;
                let digest = c.digest.finish();
                out.push(self.item(&c.rel, Kind::File, &c.md, c.xtime, Some(digest), None));
                continue;
            }
            if let Some(rel) = self.pending.pop_front() {
                if let Some(e) = self.take(rel)? {
                    out.push(e);
                }
                continue;
            }
            if let Some((rel, eff, peer)) = self.dirs.pop() {
                self.visit(rel, eff, peer)?;
                continue;
            }
            break;
        }
        let idle = self.copying.is_none() && self.pending.is_empty() && self.dirs.is_empty();
        let ask = if idle {
            self.asking
                .keys()
                .take(1000)
                .map(|a| RelPath::new(a.clone()).expect("a path under the root"))
                .collect()
        } else {
            Vec::new()
        };
        Ok((out, ask, idle && self.asking.is_empty()))
    }

    fn item(
        &mut self,
        rel: &[u8],
        kind: Kind,
        md: &std::fs::Metadata,
        xt: u64,
        digest: Option<[u8; 32]>,
        target: Option<Vec<u8>>,
    ) -> QuarantinedEntry {
        let kind_s = match kind {
            Kind::File => "file",
            Kind::Symlink => "symlink",
            _ => "dir",
        };
        let size = if kind == Kind::File { md.len() } else { 0 };
        let xattrs = if kind == Kind::Symlink {
            Vec::new()
        } else {
            crate::fs::meta::read_xattrs(&join(&self.root, rel)).unwrap_or_default()
        };
        self.items.insert(
            rel.to_vec(),
            Item {
                path: String::from_utf8_lossy(rel).into_owned(),
                path_hex: crate::catalog::record::hex(rel),
                kind: kind_s.into(),
                size,
                digest: digest.map(|d| crate::catalog::record::hex(&d)),
                target: target
                    .as_ref()
                    .map(|t| String::from_utf8_lossy(t).into_owned()),
                mode: md.mode() & 0o7777,
                mtime_ns: md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128,
                xtime: xt,
                reason: "divergent".into(),
            },
        );
        QuarantinedEntry {
            path: RelPath::new(rel.to_vec()).expect("a path under the root"),
            kind,
            size,
            meta: crate::fs::meta::Meta::from_metadata(md, xattrs),
            digest,
            target: target.map(serde_bytes::ByteBuf::from),
        }
    }

    /// Lists a directory that may hold divergence and queues what differs
    /// from the new master's listing `peer` (None: the new master has no such
    /// directory, so everything is taken).
    fn visit(
        &mut self,
        rel: Vec<u8>,
        eff_parent: u64,
        peer: Option<Vec<PeerEntry>>,
    ) -> WResult<()> {
        let p = join(&self.root, &rel);
        let whole = peer.is_none() || self.force;
        let stime = if whole {
            0
        } else {
            xtime::read(&p, &self.stime_attr).unwrap_or(0)
        };
        let eff = eff_parent.max(stime);
        let rd = match std::fs::read_dir(&p) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io("listing", &p)(e)),
        };
        let mut names = Vec::new();
        for e in rd {
            let e = e.map_err(io("listing", &p))?;
            let name = e.file_name().as_bytes().to_vec();
            if (rel.is_empty() && crate::protocol::reserved_at_root(&name))
                || name.starts_with(crate::protocol::TMP_PREFIX)
            {
                continue;
            }
            names.push(name);
        }
        names.sort();
        if names.is_empty() && whole && !rel.is_empty() {
            // An empty directory the new master lacks.
            self.pending.push_back(rel);
            return Ok(());
        }
        let peer = peer.unwrap_or_default();
        let find = |n: &[u8]| {
            peer.binary_search_by(|e| e.name.as_slice().cmp(n))
                .ok()
                .map(|i| &peer[i])
        };
        for n in names.into_iter().rev() {
            let c = child(&rel, &n);
            let cp = join(&self.root, &c);
            let Ok(md) = cp.symlink_metadata() else {
                continue;
            };
            if whole {
                if md.is_dir() {
                    self.dirs.push((c, 0, None));
                } else if md.is_file() || md.is_symlink() {
                    self.pending.push_back(c);
                }
                continue;
            }
            let b = find(&n);
            if md.is_dir() {
                match b {
                    Some(b) if b.kind == Kind::Dir => {
                        if self.xtime(&cp) > eff {
                            self.asking.insert(c, eff);
                        }
                    }
                    _ => self.dirs.push((c, 0, None)),
                }
                continue;
            }
            let differs = match b {
                None => true,
                Some(b) if md.is_symlink() => {
                    b.kind != Kind::Symlink
                        || b.target.as_deref().map(|t| t.as_slice())
                            != std::fs::read_link(&cp)
                                .ok()
                                .as_deref()
                                .map(|t| t.as_os_str().as_bytes())
                }
                Some(b) => {
                    b.kind != Kind::File
                        || (!b.changed
                            && (b.size != md.len()
                                || (b.mtime.sec, b.mtime.nsec as i64)
                                    != (md.mtime(), md.mtime_nsec())))
                }
            };
            let marked = md.is_file() && self.xtime(&cp) > eff;
            if (md.is_file() || md.is_symlink()) && (differs || marked) {
                self.pending.push_back(c);
            }
        }
        Ok(())
    }

    /// Copies one file (started here, finished by later steps), symlink or empty directory in.
    fn take(&mut self, rel: Vec<u8>) -> WResult<Option<QuarantinedEntry>> {
        let src = join(&self.root, &rel);
        let dst = join(&self.building.join(DATA), &rel);
        let Ok(md) = src.symlink_metadata() else {
            return Ok(None);
        };
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
        }
        let xt = if md.is_symlink() { 0 } else { self.xtime(&src) };
        if md.is_symlink() {
            let t = std::fs::read_link(&src).map_err(io("reading", &src))?;
            std::os::unix::fs::symlink(&t, &dst).map_err(io("copying", &src))?;
            symlink_meta(&dst, &md).map_err(io("setting metadata of", &dst))?;
            let t = t.as_os_str().as_bytes().to_vec();
            return Ok(Some(self.item(&rel, Kind::Symlink, &md, xt, None, Some(t))));
        }
        if md.is_dir() {
            std::fs::create_dir_all(&dst).map_err(io("creating", &dst))?;
            copy_xattrs(&src, &dst)?;
            apply_meta(&dst, &md).map_err(io("setting metadata of", &dst))?;
            return Ok(Some(self.item(&rel, Kind::Dir, &md, xt, None, None)));
        }
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&src)
            .map_err(io("opening", &src))?;
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&dst)
            .map_err(io("creating", &dst))?;
        self.copying = Some(Copying {
            rel,
            src: file,
            dst: out,
            md,
            xtime: xt,
            digest: crate::hash::digest::Digester::new(),
        });
        Ok(None)
    }

    /// Marks conflicts, and drops entries equal to the new master's.
    pub fn resolve(&mut self, conflicts: &[RelPath], same: &[RelPath]) -> WResult<()> {
        for c in conflicts {
            if let Some(i) = self.items.get_mut(c.as_bytes()) {
                i.reason = "conflict".into();
            }
        }
        for s in same {
            if self.items.remove(s.as_bytes()).is_some() {
                let p = join(&self.building.join(DATA), s.as_bytes());
                let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir(&p));
            }
        }
        Ok(())
    }

    /// Writes the manifest, makes everything durable and publishes the
    /// quarantine with one rename. Idempotent once published.
    pub fn commit(&mut self, root_fd: std::os::fd::BorrowedFd<'_>) -> WResult<String> {
        if self.committed {
            return Ok(self.id.clone());
        }
        if self.copying.is_some() || !self.pending.is_empty() || !self.dirs.is_empty() {
            return Err(WireError::new(
                ErrorKind::Invalid,
                "quarantine commit before its walk is done",
            ));
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
                "forced: every file and symlink that differs from the new master".into()
            } else {
                format!(
                    "xtime newer than the newest stime of session {} above it",
                    self.old_session
                )
            },
            items: self.items.values().cloned().collect(),
        };
        let mp = self.building.join(MANIFEST);
        std::fs::write(&mp, serde_json::to_vec_pretty(&m).expect("serializes"))
            .map_err(io("writing", &mp))?;
        nix::unistd::syncfs(root_fd)
            .map_err(|e| WireError::new(ErrorKind::Io, format!("quarantine: syncfs: {e}")))?;
        std::fs::rename(&self.building, &self.published)
            .map_err(io("publishing", &self.published))?;
        if let Some(parent) = self.published.parent() {
            let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
        }
        self.committed = true;
        tracing::info!(id = %self.id, items = m.items.len(), bytes = m.bytes(), "quarantine published");
        Ok(self.id.clone())
    }
}

/// The user xattrs of `src` (georep's own aside) onto `dst`.
fn copy_xattrs(src: &Path, dst: &Path) -> WResult<()> {
    for (n, v) in crate::fs::meta::read_xattrs(src).unwrap_or_default() {
        xattr::set(dst, OsStr::from_bytes(&n), &v).map_err(io("copying the xattrs of", src))?;
    }
    Ok(())
}

/// Owner (as root) and mtime of `md` onto the symlink `dst`.
fn symlink_meta(dst: &Path, md: &std::fs::Metadata) -> std::io::Result<()> {
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::lchown(dst, Some(md.uid()), Some(md.gid()))?;
    }
    let ts = nix::sys::time::TimeSpec::new(md.mtime(), md.mtime_nsec());
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        dst,
        &ts,
        &ts,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(std::io::Error::from)
}

/// Mode, owner (as root) and mtime of `md` onto `dst` (not a symlink).
fn apply_meta(dst: &Path, md: &std::fs::Metadata) -> std::io::Result<()> {
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(dst, Some(md.uid()), Some(md.gid()))?;
    }
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(md.mode() & 0o7777))?;
    let ts = nix::sys::time::TimeSpec::new(md.mtime(), md.mtime_nsec());
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        dst,
        &ts,
        &ts,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(std::io::Error::from)
}

/// Copies a quarantined entry to `dst` (which must not exist): a file
/// through a temporary beside it and a rename, a symlink, a directory.
pub fn copy_entry(src: &Path, dst: &Path) -> std::io::Result<()> {
    let md = src.symlink_metadata()?;
    if md.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(src)?, dst)?;
        return symlink_meta(dst, &md);
    }
    if md.is_dir() {
        match std::fs::create_dir(dst) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(e),
        }
        return apply_meta(dst, &md);
    }
    let mut tmp_name = crate::protocol::TMP_PREFIX.to_vec();
    tmp_name.extend_from_slice(b"restore-");
    tmp_name.extend_from_slice(dst.file_name().map(|n| n.as_bytes()).unwrap_or_default());
    let tmp = dst.with_file_name(OsStr::from_bytes(&tmp_name));
    let res = (|| {
        std::fs::copy(src, &tmp)?;
        for (n, v) in crate::fs::meta::read_xattrs(src)? {
            xattr::set(&tmp, OsStr::from_bytes(&n), &v)?;
        }
        apply_meta(&tmp, &md)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, dst)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}
