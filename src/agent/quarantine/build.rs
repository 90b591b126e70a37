//! Building a quarantine on the old master, in bounded steps.
//!
//! The last common point of a tree is what the old session's stimes say
//! (see [`super::walk`] for the rule, dirmarks included). Directories whose
//! xtime is not newer than the newest stime above them are skipped whole
//! (the marker invariant), so the walk costs O(divergence). A changed
//! directory is first looked up on the new master (the worker answers in
//! the next step): one it lacks may be new or renamed here, and is taken
//! whole, whatever the stamps of what it holds. Symlinks carry no stamp:
//! those that differ from the new master's are taken, and the worker drops
//! what equals the new master's version (`QuarantineResolve`). A file taken
//! that has other names (hard links) may have changed through one whose
//! directory was never stamped: once the walk is done, the tree is scanned
//! for those names, which enter the quarantine as links of the copy. The
//! same scan (one pass over the tree, as the failback's first crawl is a
//! full one anyway) adopts the old master's own hard links, so the crawl
//! does not take them for links a local user planted. With `force` (a root
//! that was never the session's master) everything is taken.

use super::beneath::{fd_path, Tree};
use super::copy::{apply_meta, copy_xattrs, symlink_meta};
use super::walk::{self, Decision, Local, Mode};
use super::{io, Item, Manifest, DATA, MANIFEST};
use crate::fs::meta::{Kind, Timestamp};
use crate::fs::relpath::RelPath;
use crate::fs::role::{self, format_time};
use crate::fs::xtime;
use crate::protocol::{ErrorKind, FailbackClaim, PeerEntry, QuarantinedEntry, WireError};
use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use uuid::Uuid;

type WResult<T> = Result<T, WireError>;

/// Entries the hard-link scan looks at per step.
const SCAN_PER_STEP: usize = 20_000;

/// A file being copied in, across steps.
struct Copying {
    rel: Vec<u8>,
    src: std::fs::File,
    dst: std::fs::File,
    md: std::fs::Metadata,
    xtime: u64,
    digest: crate::hash::digest::Digester,
}

/// A file taken that has other names: where its copy is, and its digest.
struct Linked {
    copy: Vec<u8>,
    digest: [u8; 32],
}

/// One quarantine being built for a failback connection.
pub struct Job {
    pub id: String,
    root: PathBuf,
    /// The old master's entries, reached beneath the root through no symlink.
    tree: Tree,
    building: PathBuf,
    published: PathBuf,
    xtime_attr: Option<String>,
    dirmark_attr: Option<String>,
    stime_attr: String,
    force: bool,
    /// Directories to list: (path, the mode of its parent, the new master's
    /// listing there; None: it has none, everything is taken).
    dirs: Vec<(Vec<u8>, Mode, Option<Vec<PeerEntry>>)>,
    /// Directories both hold, waiting for the new master's listing, with
    /// the mode of their parent.
    asking: BTreeMap<Vec<u8>, Mode>,
    pending: VecDeque<Vec<u8>>,
    copying: Option<Copying>,
    items: BTreeMap<Vec<u8>, Item>,
    /// Files taken with other names, by (device, inode).
    linked: BTreeMap<(u64, u64), Linked>,
    /// The hard-link scan: None until the walk is done, then the
    /// directories left to list (empty: finished).
    scan: Option<Vec<Vec<u8>>>,
    /// Every inode of the tree with several names: (links, names seen, one
    /// of them). Those whose names are all in the tree are adopted.
    names: BTreeMap<(u64, u64), (u64, u64, Vec<u8>)>,
    session: Uuid,
    old_session: Uuid,
    epoch: u64,
    committed: bool,
}

/// The path of `rel` under the root, for messages only.
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
    pub fn start(
        agent_root: &crate::agent::Root,
        session: Uuid,
        epoch: u64,
        fb: &FailbackClaim,
    ) -> WResult<Job> {
        let root = agent_root.path();
        let root_fd = agent_root
            .fd()
            .try_clone_to_owned()
            .map_err(io("opening", root))?;
        let (id, building, published, committed) = super::start_dirs(root, &session, epoch)?;
        let master = xtime::master_id(root).map_err(io("reading the master id of", root))?;
        let stime_attr = xtime::stime_attr(&fb.old_session);
        Ok(Job {
            id,
            root: root.to_path_buf(),
            tree: Tree::new(root, root_fd, agent_root.dev().is_some()),
            building,
            published,
            xtime_attr: master.map(|m| xtime::xtime_attr(&m)),
            dirmark_attr: master.map(|m| xtime::dirmark_attr(&m)),
            stime_attr,
            force: fb.force,
            dirs: if committed || !fb.force {
                Vec::new()
            } else {
                vec![(Vec::new(), Mode::Whole, None)]
            },
            // The root is compared with the new master's root listing first.
            asking: if committed || fb.force {
                BTreeMap::new()
            } else {
                [(Vec::new(), Mode::Stamped { eff: 0 })]
                    .into_iter()
                    .collect()
            },
            pending: VecDeque::new(),
            copying: None,
            items: BTreeMap::new(),
            linked: BTreeMap::new(),
            scan: committed.then(Vec::new),
            names: BTreeMap::new(),
            session,
            old_session: fb.old_session,
            epoch,
            committed,
        })
    }

    fn stamp(&self, p: &Path, attr: &Option<String>) -> u64 {
        match attr {
            Some(a) => xtime::read(p, a).unwrap_or(0),
            None => 0,
        }
    }

    fn xtime(&self, p: &Path) -> u64 {
        self.stamp(p, &self.xtime_attr)
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
            if let Some(mode) = self.asking.remove(dir.as_bytes()) {
                let mut listing = listing;
                if let Some(l) = &mut listing {
                    l.sort_by(|a, b| a.name.cmp(&b.name));
                }
                self.dirs.push((dir.as_bytes().to_vec(), mode, listing));
            }
        }
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let mut scanned = 0usize;
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
                if let Some(src) = self.tree.entry(&c.rel) {
                    copy_xattrs(&src.path, &dst)
                        .map_err(io("copying the xattrs of", &join(&self.root, &c.rel)))?;
                }
                apply_meta(&dst, &c.md).map_err(io("setting metadata of", &dst))?;
                let digest = c.digest.finish();
                self.saw_linked(&c.rel, &c.md, digest);
                out.push(self.item(&c.rel, Kind::File, &c.md, c.xtime, Some(digest), None));
                continue;
            }
            if let Some(rel) = self.pending.pop_front() {
                if let Some(e) = self.take(rel)? {
                    out.push(e);
                }
                continue;
            }
            if let Some((rel, mode, peer)) = self.dirs.pop() {
                self.visit(rel, mode, peer)?;
                continue;
            }
            if !self.asking.is_empty() {
                break;
            }
            // The walk is done: other names of the linked files taken,
            // and the tree's own hard links (see `adopt_links`).
            if self.scan.is_none() {
                self.scan = Some(vec![Vec::new()]);
            }
            if scanned >= SCAN_PER_STEP {
                break;
            }
            let Some(dir) = self.scan.as_mut().and_then(|s| s.pop()) else {
                break;
            };
            let (n, found) = self.scan_dir(&dir)?;
            scanned += n;
            out.extend(found);
        }
        let walking = self.copying.is_some() || !self.pending.is_empty() || !self.dirs.is_empty();
        let ask = if walking {
            Vec::new()
        } else {
            self.asking
                .keys()
                .take(1000)
                .map(|a| RelPath::new(a.clone()).expect("a path under the root"))
                .collect()
        };
        let scanned_all = self.scan.as_ref().is_some_and(|s| s.is_empty());
        Ok((out, ask, !walking && self.asking.is_empty() && scanned_all))
    }

    /// The old master's own hard links, made by its writers: an inode all
    /// of whose names are in the tree is recorded as georep's (the count
    /// the agent checks before it writes through a name, see
    /// `agent::meta::foreign_links`), so the failback's crawl patches it
    /// and links to it instead of breaking it and sending it whole. One
    /// with a name elsewhere (outside the root) stays foreign.
    fn adopt_links(&self) -> WResult<()> {
        for (nlink, seen, rel) in self.names.values() {
            if seen != nlink {
                continue;
            }
            let Some(p) = self.tree.entry(rel) else {
                continue;
            };
            xattr::set(
                &p.path,
                crate::agent::meta::links_attr(),
                nlink.to_string().as_bytes(),
            )
            .map_err(io("recording the hard links of", &join(&self.root, rel)))?;
        }
        Ok(())
    }

    /// Notes a file taken: one of its names, if it has several.
    fn saw_linked(&mut self, rel: &[u8], md: &std::fs::Metadata, digest: [u8; 32]) {
        if md.nlink() > 1 {
            self.linked.entry((md.dev(), md.ino())).or_insert(Linked {
                copy: rel.to_vec(),
                digest,
            });
        }
    }

    /// Lists one directory of the hard-link scan; enters the names of
    /// linked files taken that the quarantine lacks (as links of the copy).
    fn scan_dir(&mut self, rel: &[u8]) -> WResult<(usize, Vec<QuarantinedEntry>)> {
        let shown = join(&self.root, rel);
        let Some(dir) = self.tree.open_dir(rel) else {
            return Ok((0, Vec::new()));
        };
        let rd = match std::fs::read_dir(fd_path(&dir)) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, Vec::new())),
            Err(e) => return Err(io("listing", &shown)(e)),
        };
        let (mut n, mut out) = (0, Vec::new());
        for e in rd {
            let e = e.map_err(io("listing", &shown))?;
            n += 1;
            let name = e.file_name().as_bytes().to_vec();
            if (rel.is_empty() && crate::protocol::reserved_at_root(&name))
                || name.starts_with(crate::protocol::TMP_PREFIX)
            {
                continue;
            }
            let c = child(rel, &name);
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            if md.is_dir() {
                self.scan.as_mut().expect("scanning").push(c);
                continue;
            }
            if !md.is_file() || md.nlink() < 2 {
                continue;
            }
            self.names
                .entry((md.dev(), md.ino()))
                .or_insert((md.nlink(), 0, c.clone()))
                .1 += 1;
            if self.items.contains_key(&c) {
                continue;
            }
            let Some(l) = self.linked.get(&(md.dev(), md.ino())) else {
                continue;
            };
            let (copy, digest) = (join(&self.building.join(DATA), &l.copy), l.digest);
            let dst = join(&self.building.join(DATA), &c);
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
            }
            if std::fs::hard_link(&copy, &dst).is_err() {
                // Its copy left the quarantine (equal to the new master's there): copy it again.
                self.pending.push_back(c);
                continue;
            }
            let xt = self.xtime(&e.path());
            out.push(self.item(&c, Kind::File, &md, xt, Some(digest), None));
        }
        Ok((n, out))
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
        let ent = self.tree.entry(rel);
        let xattrs = match &ent {
            Some(e) if kind != Kind::Symlink => {
                crate::fs::meta::read_xattrs(&e.path).unwrap_or_default()
            }
            _ => Vec::new(),
        };
        let setid = ent
            .as_ref()
            .map_or(0, |e| crate::fs::meta::recorded_setid(&e.path, md));
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
            meta: crate::fs::meta::Meta {
                mode: md.mode() & 0o7777 | setid,
                ..crate::fs::meta::Meta::from_metadata(md, xattrs)
            },
            digest,
            target: target.map(serde_bytes::ByteBuf::from),
        }
    }

    /// Lists a directory that may hold divergence (entered from a parent in
    /// `parent_mode`) and queues what differs from the new master's listing
    /// `peer` (None: the new master has no such directory, all is taken).
    fn visit(
        &mut self,
        rel: Vec<u8>,
        parent_mode: Mode,
        peer: Option<Vec<PeerEntry>>,
    ) -> WResult<()> {
        let shown = join(&self.root, &rel);
        let (Some(ent), Some(dir)) = (self.tree.entry(&rel), self.tree.open_dir(&rel)) else {
            return Ok(()); // gone, or not beneath the root
        };
        let mode = match (&peer, parent_mode) {
            (None, _) | (_, Mode::Whole) => Mode::Whole,
            _ if self.force => Mode::Whole,
            (_, Mode::Stamped { .. }) => parent_mode.enter(
                xtime::read(&ent.path, &self.stime_attr).unwrap_or(0),
                self.stamp(&ent.path, &self.dirmark_attr),
            ),
            (_, m) => m,
        };
        let p = fd_path(&dir);
        let rd = match std::fs::read_dir(&p) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io("listing", &shown)(e)),
        };
        let mut names = Vec::new();
        for e in rd {
            let e = e.map_err(io("listing", &shown))?;
            let name = e.file_name().as_bytes().to_vec();
            if (rel.is_empty() && crate::protocol::reserved_at_root(&name))
                || name.starts_with(crate::protocol::TMP_PREFIX)
            {
                continue;
            }
            names.push(name);
        }
        names.sort();
        if names.is_empty() && mode == Mode::Whole && !rel.is_empty() {
            // An empty directory the new master lacks.
            self.pending.push_back(rel);
            return Ok(());
        }
        let mut locals = Vec::with_capacity(names.len());
        for n in names {
            let cp = p.join(OsStr::from_bytes(&n));
            let Ok(md) = cp.symlink_metadata() else {
                continue;
            };
            let kind = Kind::of(&md);
            locals.push(Local {
                kind,
                size: md.len(),
                mtime: Timestamp {
                    sec: md.mtime(),
                    nsec: md.mtime_nsec() as u32,
                },
                mode: md.mode() & 0o7777 | crate::fs::meta::recorded_setid(&cp, &md),
                uid: md.uid(),
                gid: md.gid(),
                target: (kind == Kind::Symlink)
                    .then(|| std::fs::read_link(&cp).ok())
                    .flatten()
                    .map(|t| t.as_os_str().as_bytes().to_vec()),
                xtime: if kind == Kind::Symlink {
                    0
                } else {
                    self.xtime(&cp)
                },
                name: n,
            });
        }
        let decisions = walk::plan(mode, &locals, peer.as_deref().unwrap_or_default());
        for (l, d) in locals.iter().zip(decisions).rev() {
            let c = child(&rel, &l.name);
            match d {
                Decision::Take => self.pending.push_back(c),
                Decision::Ask(m) => {
                    self.asking.insert(c, m);
                }
                Decision::Whole => self.dirs.push((c, Mode::Whole, None)),
                Decision::Skip => {}
            }
        }
        Ok(())
    }

    /// Copies one file (started here, finished by later steps), symlink or empty directory in.
    fn take(&mut self, rel: Vec<u8>) -> WResult<Option<QuarantinedEntry>> {
        let Some(ent) = self.tree.entry(&rel) else {
            return Ok(None);
        };
        let src = ent.path.clone();
        let shown = join(&self.root, &rel);
        let dst = join(&self.building.join(DATA), &rel);
        let Ok(md) = src.symlink_metadata() else {
            return Ok(None);
        };
        if self.items.contains_key(&rel) {
            return Ok(None);
        }
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
        }
        let xt = if md.is_symlink() { 0 } else { self.xtime(&src) };
        if md.is_symlink() {
            let t = std::fs::read_link(&src).map_err(io("reading", &shown))?;
            std::os::unix::fs::symlink(&t, &dst).map_err(io("copying", &shown))?;
            symlink_meta(&dst, &md).map_err(io("setting metadata of", &dst))?;
            let t = t.as_os_str().as_bytes().to_vec();
            return Ok(Some(self.item(&rel, Kind::Symlink, &md, xt, None, Some(t))));
        }
        if md.is_dir() {
            std::fs::create_dir_all(&dst).map_err(io("creating", &dst))?;
            copy_xattrs(&src, &dst).map_err(io("copying the xattrs of", &shown))?;
            apply_meta(&dst, &md).map_err(io("setting metadata of", &dst))?;
            return Ok(Some(self.item(&rel, Kind::Dir, &md, xt, None, None)));
        }
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&src)
            .map_err(io("opening", &shown))?;
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
        let scanning = !self.scan.as_ref().is_some_and(|s| s.is_empty());
        if self.copying.is_some()
            || !self.pending.is_empty()
            || !self.dirs.is_empty()
            || !self.asking.is_empty()
            || scanning
        {
            return Err(WireError::new(
                ErrorKind::Invalid,
                "quarantine commit before its walk is done",
            ));
        }
        self.adopt_links()?;
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
            store: Vec::new(),
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
