//! Random corruption of a slave tree, as bit rot, a careless operator or a
//! broken disk would make it, with the differences `georep verify` must
//! report. Parent directories keep their mtime (and a flipped byte keeps
//! the file's mtime and size), so each corruption is exactly one difference.

use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// One expected difference: path relative to the root, what, and for a
/// flipped byte its offset.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Expect {
    pub path: String,
    pub what: &'static str,
    pub offset: Option<u64>,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    for p in v {
        if p.parent() == Some(root) && p.file_name().unwrap() == ".georep" {
            continue;
        }
        let md = std::fs::symlink_metadata(&p).unwrap();
        out.push(p.clone());
        if md.is_dir() {
            walk(root, &p, out);
        }
    }
}

fn times(p: &Path) -> (TimeSpec, TimeSpec) {
    let md = std::fs::symlink_metadata(p).unwrap();
    (
        TimeSpec::new(md.atime(), md.atime_nsec()),
        TimeSpec::new(md.mtime(), md.mtime_nsec()),
    )
}

fn restore(p: &Path, t: (TimeSpec, TimeSpec)) {
    utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &t.0,
        &t.1,
        UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

/// Runs `f` on the entries of `p`'s parent, keeping the parent's mtime.
fn in_parent(p: &Path, f: impl FnOnce()) {
    let parent = p.parent().unwrap().to_path_buf();
    let t = times(&parent);
    f();
    restore(&parent, t);
}

fn rel(root: &Path, p: &Path) -> String {
    String::from_utf8_lossy(p.strip_prefix(root).unwrap().as_os_str().as_bytes()).into_owned()
}

/// A directory, or a file with one name (a change shows at one path only).
fn single(p: &Path) -> bool {
    let m = std::fs::symlink_metadata(p).unwrap();
    m.is_dir() || (m.is_file() && m.nlink() == 1)
}

fn conflicts(used: &[PathBuf], p: &Path) -> bool {
    used.iter().any(|u| u.starts_with(p) || p.starts_with(u))
}

/// Applies up to `n` corruptions to the slave tree at `root`, on distinct
/// entries; returns what verification must find.
pub fn corrupt(root: &Path, seed: u64, n: usize) -> Vec<Expect> {
    let mut rng = Rng(seed | 1);
    let mut entries = Vec::new();
    walk(root, root, &mut entries);
    let mut used: Vec<PathBuf> = Vec::new();
    let mut out = Vec::new();
    let mut tries = 0;
    while out.len() < n && tries < 50 * n {
        tries += 1;
        let kind = rng.below(10);
        // Directories to add into (the root too), entries to change.
        let all_dirs: Vec<PathBuf> = std::iter::once(root.to_path_buf())
            .chain(entries.iter().cloned())
            .filter(|p| {
                std::fs::symlink_metadata(p)
                    .map(|m| m.is_dir())
                    .unwrap_or(false)
            })
            .collect();
        let dirs: Vec<&PathBuf> = all_dirs.iter().collect();
        let live: Vec<PathBuf> = entries
            .iter()
            .filter(|p| std::fs::symlink_metadata(p).is_ok() && !conflicts(&used, p))
            .cloned()
            .collect();
        let files: Vec<&PathBuf> = live
            .iter()
            .filter(|p| {
                let m = std::fs::symlink_metadata(p).unwrap();
                m.is_file() && m.nlink() == 1
            })
            .collect();
        let pick = |v: &[&PathBuf], rng: &mut Rng| -> Option<PathBuf> {
            (!v.is_empty()).then(|| v[rng.below(v.len())].clone())
        };
        match kind {
            // A flipped bit, mtime and size kept: bit rot.
            0..=2 => {
                let nonempty: Vec<&PathBuf> = files
                    .iter()
                    .copied()
                    .filter(|p| std::fs::metadata(p).unwrap().len() > 0)
                    .collect();
                let Some(p) = pick(&nonempty, &mut rng) else {
                    continue;
                };
                let len = std::fs::metadata(&p).unwrap().len();
                let off = rng.next() % len;
                let t = times(&p);
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&p)
                    .unwrap();
                let mut b = [0u8];
                f.read_exact_at(&mut b, off).unwrap();
                b[0] ^= 1 << (rng.next() % 8);
                f.write_all_at(&b, off).unwrap();
                drop(f);
                restore(&p, t);
                out.push(Expect {
                    path: rel(root, &p),
                    what: "content",
                    offset: Some(off),
                });
                used.push(p);
            }
            3 => {
                let nonempty: Vec<&PathBuf> = files
                    .iter()
                    .copied()
                    .filter(|p| std::fs::metadata(p).unwrap().len() > 0)
                    .collect();
                let Some(p) = pick(&nonempty, &mut rng) else {
                    continue;
                };
                let len = std::fs::metadata(&p).unwrap().len();
                let t = times(&p);
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_len(rng.next() % len)
                    .unwrap();
                restore(&p, t);
                out.push(Expect {
                    path: rel(root, &p),
                    what: "size",
                    offset: None,
                });
                used.push(p);
            }
            4 => {
                // Deleted: a file, a symlink or a whole directory.
                let cands: Vec<&PathBuf> = live
                    .iter()
                    .filter(|p| {
                        std::fs::symlink_metadata(p).unwrap().nlink() == 1
                            || std::fs::symlink_metadata(p).unwrap().is_dir()
                    })
                    .collect();
                let Some(p) = pick(&cands, &mut rng) else {
                    continue;
                };
                // A directory holding hard-linked files would lose links a repair cannot rebuild.
                let mut below = Vec::new();
                if p.is_dir() && !p.is_symlink() {
                    walk(root, &p, &mut below);
                    if below.iter().any(|b| {
                        let m = std::fs::symlink_metadata(b).unwrap();
                        m.is_file() && m.nlink() > 1
                    }) {
                        continue;
                    }
                }
                in_parent(&p, || {
                    if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                        std::fs::remove_dir_all(&p).unwrap()
                    } else {
                        std::fs::remove_file(&p).unwrap()
                    }
                });
                out.push(Expect {
                    path: rel(root, &p),
                    what: "missing",
                    offset: None,
                });
                used.push(p);
            }
            5 => {
                let Some(d) = pick(&dirs, &mut rng) else {
                    continue;
                };
                if conflicts(&used, &d) && d != root {
                    continue;
                }
                let p = d.join(format!("rot-{}", rng.next() % 1000));
                if std::fs::symlink_metadata(&p).is_ok() || conflicts(&used, &p) {
                    continue;
                }
                in_parent(&p, || {
                    if rng.next() % 2 == 0 {
                        std::fs::write(&p, b"not on the master").unwrap();
                    } else {
                        std::fs::create_dir(&p).unwrap();
                        std::fs::write(p.join("inside"), b"x").unwrap();
                    }
                });
                out.push(Expect {
                    path: rel(root, &p),
                    what: "extra",
                    offset: None,
                });
                used.push(p);
            }
            6 => {
                let cands: Vec<&PathBuf> = live.iter().filter(|p| single(p)).collect();
                let Some(p) = pick(&cands, &mut rng) else {
                    continue;
                };
                let md = std::fs::metadata(&p).unwrap();
                let mode = (md.mode() & 0o7777) ^ 0o004;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
                out.push(Expect {
                    path: rel(root, &p),
                    what: "metadata",
                    offset: None,
                });
                used.push(p);
            }
            // A flipped bit and a mode change on one file: two differences.
            9 => {
                let big: Vec<&PathBuf> = files
                    .iter()
                    .copied()
                    .filter(|p| std::fs::metadata(p).unwrap().len() > 0)
                    .collect();
                let Some(p) = pick(&big, &mut rng) else {
                    continue;
                };
                let len = std::fs::metadata(&p).unwrap().len();
                // Late in the file: with small ranges, beyond its first range.
                let off = len - 1 - rng.next() % len.min(4096);
                let t = times(&p);
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&p)
                    .unwrap();
                let mut b = [0u8];
                f.read_exact_at(&mut b, off).unwrap();
                b[0] ^= 0x80;
                f.write_all_at(&b, off).unwrap();
                drop(f);
                restore(&p, t);
                let mode = (std::fs::metadata(&p).unwrap().mode() & 0o7777) ^ 0o020;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
                out.push(Expect {
                    path: rel(root, &p),
                    what: "content",
                    offset: Some(off),
                });
                out.push(Expect {
                    path: rel(root, &p),
                    what: "metadata",
                    offset: None,
                });
                used.push(p);
            }
            7 => {
                let cands: Vec<&PathBuf> = live.iter().filter(|p| single(p)).collect();
                let Some(p) = pick(&cands, &mut rng) else {
                    continue;
                };
                xattr::set(&p, "user.rot", format!("{}", rng.next()).as_bytes()).unwrap();
                out.push(Expect {
                    path: rel(root, &p),
                    what: "metadata",
                    offset: None,
                });
                used.push(p);
            }
            _ => {
                let links: Vec<&PathBuf> = live.iter().filter(|p| p.is_symlink()).collect();
                let Some(p) = pick(&links, &mut rng) else {
                    continue;
                };
                let md = std::fs::symlink_metadata(&p).unwrap();
                let t = times(&p);
                let old = std::fs::read_link(&p).unwrap();
                let mut new = old.clone().into_os_string();
                new.push("-rot");
                in_parent(&p, || {
                    std::fs::remove_file(&p).unwrap();
                    std::os::unix::fs::symlink(&new, &p).unwrap();
                    std::os::unix::fs::lchown(&p, Some(md.uid()), Some(md.gid())).unwrap();
                    restore(&p, t);
                });
                out.push(Expect {
                    path: rel(root, &p),
                    what: "target",
                    offset: None,
                });
                used.push(p);
            }
        }
    }
    out.sort();
    out
}
