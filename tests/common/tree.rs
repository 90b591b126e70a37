//! Whole-tree comparison: kind, bytes, mode, owner, mtime (ns), user
//! xattrs, symlink targets, hard-link structure, and sparseness. A slave's
//! files never carry setuid/setgid bits on disk (the agent's default
//! policy): their mode is compared with the bits the agent recorded.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    File { len: u64, hash: [u8; 32] },
    Symlink(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snap {
    pub node: Node,
    /// The mode as replicated: on disk, with the setuid/setgid bits the
    /// agent recorded (`*.georep.setid`) for a file it stripped them from.
    pub mode: u32,
    /// The mode on disk.
    pub disk_mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// (sec, nsec); directories included.
    pub mtime: (i64, i64),
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Allocated bytes (st_blocks * 512) for files.
    pub allocated: u64,
    pub ino: u64,
}

/// Snapshots every entry below `root` (relative path bytes -> state),
/// skipping the slave's `.georep` directory at the top.
pub fn snapshot(root: &Path) -> BTreeMap<Vec<u8>, Snap> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<Vec<u8>, Snap>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let rel = p
            .strip_prefix(root)
            .unwrap()
            .as_os_str()
            .as_bytes()
            .to_vec();
        if rel == b".georep" || rel == b".georep-quarantine" {
            continue;
        }
        let md = std::fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let node = if ft.is_symlink() {
            Node::Symlink(
                std::fs::read_link(&p)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            )
        } else if ft.is_dir() {
            Node::Dir
        } else if ft.is_file() {
            let data = std::fs::read(&p).unwrap();
            Node::File {
                len: data.len() as u64,
                hash: *blake3::hash(&data).as_bytes(),
            }
        } else {
            continue; // special files are not replicated
        };
        let xattrs = if ft.is_symlink() {
            Vec::new()
        } else {
            let mut v: Vec<(Vec<u8>, Vec<u8>)> = xattr::list(&p)
                .unwrap()
                .filter(|n| {
                    n.as_bytes().starts_with(b"user.") && !n.as_bytes().starts_with(b"user.georep.")
                })
                .map(|n| {
                    (
                        n.as_bytes().to_vec(),
                        xattr::get(&p, &n).unwrap().unwrap_or_default(),
                    )
                })
                .collect();
            v.sort();
            v
        };
        let disk_mode = if ft.is_symlink() {
            0
        } else {
            md.mode() & 0o7777
        };
        let recorded = ["trusted.georep.setid", "user.georep.setid"]
            .iter()
            .filter_map(|a| xattr::get(&p, a).ok().flatten())
            .filter_map(|v| u32::from_str_radix(std::str::from_utf8(&v).ok()?, 8).ok())
            .fold(0, |a, b| a | b);
        out.insert(
            rel,
            Snap {
                node: node.clone(),
                mode: disk_mode | recorded,
                disk_mode,
                uid: md.uid(),
                gid: md.gid(),
                mtime: (md.mtime(), md.mtime_nsec()),
                xattrs,
                allocated: md.blocks() * 512,
                ino: md.ino(),
            },
        );
        if node == Node::Dir {
            walk(root, &p, out);
        }
    }
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).escape_debug().to_string()
}

/// Groups of paths sharing an inode (only groups of two or more).
fn link_groups(s: &BTreeMap<Vec<u8>, Snap>) -> Vec<Vec<Vec<u8>>> {
    let mut by: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
    for (p, snap) in s {
        if matches!(snap.node, Node::File { .. }) {
            by.entry(snap.ino).or_default().push(p.clone());
        }
    }
    let mut groups: Vec<Vec<Vec<u8>>> = by.into_values().filter(|g| g.len() > 1).collect();
    for g in &mut groups {
        g.sort();
    }
    groups.sort();
    groups
}

/// Asserts that `slave` equals `master` entry for entry: content, type,
/// mode, owner, mtime with nanoseconds, user xattrs, symlink targets,
/// hard-link groups, and that sparse master files stay sparse.
pub fn assert_same(master: &Path, slave: &Path) {
    let problems = differences(master, slave);
    assert!(
        problems.is_empty(),
        "slave differs from master:\n  {}",
        problems.join("\n  ")
    );
}

/// What [`assert_same`] would complain about (empty when the trees are equal).
pub fn differences(master: &Path, slave: &Path) -> Vec<String> {
    let m = snapshot(master);
    let s = snapshot(slave);
    let mut problems = Vec::new();
    for (p, ms) in &m {
        match s.get(p) {
            None => problems.push(format!("missing on slave: {}", show(p))),
            Some(ss) => {
                if ms.node != ss.node {
                    problems.push(format!(
                        "{}: content/type differs: {:?} vs {:?}",
                        show(p),
                        ms.node,
                        ss.node
                    ));
                }
                if (ms.mode, ms.uid, ms.gid) != (ss.mode, ss.uid, ss.gid) {
                    problems.push(format!(
                        "{}: mode/owner {:o} {}:{} vs {:o} {}:{}",
                        show(p),
                        ms.mode,
                        ms.uid,
                        ms.gid,
                        ss.mode,
                        ss.uid,
                        ss.gid
                    ));
                }
                if matches!(ss.node, Node::File { .. }) && ss.disk_mode & 0o6000 != 0 {
                    problems.push(format!(
                        "{}: setuid/setgid on the slave's disk ({:o})",
                        show(p),
                        ss.disk_mode
                    ));
                }
                if ms.mtime != ss.mtime {
                    problems.push(format!(
                        "{}: mtime {:?} vs {:?}",
                        show(p),
                        ms.mtime,
                        ss.mtime
                    ));
                }
                if ms.xattrs != ss.xattrs {
                    problems.push(format!(
                        "{}: xattrs {:?} vs {:?}",
                        show(p),
                        ms.xattrs,
                        ss.xattrs
                    ));
                }
                if let Node::File { len, .. } = ms.node {
                    // Holes stay holes: the slave allocates no more than the master (plus a block of slack per MiB).
                    if len > 0
                        && ss.allocated > ms.allocated + 4096 * (1 + len / (1 << 20))
                        && ms.allocated < len
                    {
                        problems.push(format!(
                            "{}: sparse file not sparse on slave ({} allocated vs {})",
                            show(p),
                            ss.allocated,
                            ms.allocated
                        ));
                    }
                }
            }
        }
    }
    for p in s.keys() {
        if !m.contains_key(p) {
            problems.push(format!("extra on slave: {}", show(p)));
        }
        if p.split(|&b| b == b'/')
            .next_back()
            .is_some_and(|n| n.starts_with(b".georep-tmp-"))
        {
            problems.push(format!("temporary file visible: {}", show(p)));
        }
    }
    let (mg, sg) = (link_groups(&m), link_groups(&s));
    if mg != sg {
        problems.push(format!(
            "hard-link groups differ: master {:?} slave {:?}",
            mg.iter()
                .map(|g| g.iter().map(|p| show(p)).collect::<Vec<_>>())
                .collect::<Vec<_>>(),
            sg.iter()
                .map(|g| g.iter().map(|p| show(p)).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        ));
    }
    // Root directory metadata too.
    let (rm, rs) = (
        std::fs::metadata(master).unwrap(),
        std::fs::metadata(slave).unwrap(),
    );
    if (rm.mode() & 0o7777, rm.mtime(), rm.mtime_nsec())
        != (rs.mode() & 0o7777, rs.mtime(), rs.mtime_nsec())
    {
        problems.push("root directory mode/mtime differs".into());
    }
    problems
}

/// Names of temporary files left anywhere below `root`.
pub fn temporaries(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name();
            if name.as_bytes().starts_with(b".georep-tmp-") {
                out.push(e.path().display().to_string());
            }
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) && OsStr::new(".georep") != name {
                stack.push(e.path());
            }
        }
    }
    out
}

/// A file's whole replicated state: content, mode (with recorded
/// setuid/setgid bits), owner, mtime and user xattrs — what a kill test
/// compares against the versions the master had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileState {
    pub hash: [u8; 32],
    pub len: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The state of the file at `p`, None when it is absent.
pub fn file_state(p: &Path) -> Option<FileState> {
    let data = std::fs::read(p).ok()?;
    let md = std::fs::metadata(p).unwrap();
    let recorded = ["trusted.georep.setid", "user.georep.setid"]
        .iter()
        .filter_map(|a| xattr::get(p, a).ok().flatten())
        .filter_map(|v| u32::from_str_radix(std::str::from_utf8(&v).ok()?, 8).ok())
        .fold(0, |a, b| a | b);
    let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = xattr::list(p)
        .unwrap()
        .filter(|n| {
            n.as_bytes().starts_with(b"user.") && !n.as_bytes().starts_with(b"user.georep.")
        })
        .map(|n| {
            (
                n.as_bytes().to_vec(),
                xattr::get(p, &n).unwrap().unwrap_or_default(),
            )
        })
        .collect();
    xattrs.sort();
    Some(FileState {
        hash: *blake3::hash(&data).as_bytes(),
        len: data.len() as u64,
        mode: md.mode() & 0o7777 | recorded,
        uid: md.uid(),
        gid: md.gid(),
        mtime: (md.mtime(), md.mtime_nsec()),
        xattrs,
    })
}

/// Writes a new version of a master file: content, then a mode and an
/// xattr that name the version, so a replica mixing versions' data and
/// metadata is caught. Returns the version's state.
pub fn write_version(p: &Path, data: &[u8], version: u32) -> FileState {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(p, data).unwrap();
    std::fs::set_permissions(
        p,
        std::fs::Permissions::from_mode(0o600 | (version % 8) << 3),
    )
    .unwrap();
    xattr::set(p, "user.version", version.to_string().as_bytes()).unwrap();
    file_state(p).unwrap()
}
