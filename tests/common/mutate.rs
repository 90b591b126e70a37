//! Random mutations of a master tree, as a writer would make them, with
//! the paths a writer integrated with georep would `mark`.

use proptest::prelude::*;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy)]
pub enum Size {
    Empty,
    Small,
    Medium,
    /// Crosses delta windows (4 MiB).
    Large,
}

#[derive(Debug, Clone)]
pub enum Op {
    Create {
        dir: u16,
        name: u8,
        size: Size,
        seed: u64,
    },
    Overwrite {
        f: u16,
        size: Size,
        seed: u64,
    },
    ModifyMiddle {
        f: u16,
        at: u16,
        len: u32,
        seed: u64,
    },
    Append {
        f: u16,
        len: u32,
        seed: u64,
    },
    Truncate {
        f: u16,
        frac: u16,
    },
    Delete {
        e: u16,
    },
    Rename {
        e: u16,
        dir: u16,
        name: u8,
    },
    Chmod {
        e: u16,
        mode: u16,
    },
    SetXattr {
        e: u16,
        k: u8,
        v: u8,
    },
    RemoveXattr {
        e: u16,
    },
    Symlink {
        dir: u16,
        name: u8,
        target: u16,
    },
    TypeChange {
        e: u16,
    },
    Mkdir {
        dir: u16,
        name: u8,
    },
    Deep {
        dir: u16,
        depth: u8,
    },
    Sparse {
        dir: u16,
        name: u8,
        seed: u64,
    },
    Hardlink {
        f: u16,
        dir: u16,
        name: u8,
    },
    Touch {
        e: u16,
        secs: u32,
        nsec: u32,
    },
    Chown {
        e: u16,
        who: u8,
    },
}

fn size() -> impl Strategy<Value = Size> {
    prop_oneof![2 => Just(Size::Empty), 10 => Just(Size::Small), 6 => Just(Size::Medium), 1 => Just(Size::Large)]
}

pub fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (any::<u16>(), any::<u8>(), size(), any::<u64>()).prop_map(|(dir, name, size, seed)| Op::Create { dir, name, size, seed }),
        2 => (any::<u16>(), size(), any::<u64>()).prop_map(|(f, size, seed)| Op::Overwrite { f, size, seed }),
        3 => (any::<u16>(), any::<u16>(), 1..20000u32, any::<u64>()).prop_map(|(f, at, len, seed)| Op::ModifyMiddle { f, at, len, seed }),
        3 => (any::<u16>(), 1..100_000u32, any::<u64>()).prop_map(|(f, len, seed)| Op::Append { f, len, seed }),
        2 => (any::<u16>(), any::<u16>()).prop_map(|(f, frac)| Op::Truncate { f, frac }),
        3 => any::<u16>().prop_map(|e| Op::Delete { e }),
        2 => (any::<u16>(), any::<u16>(), any::<u8>()).prop_map(|(e, dir, name)| Op::Rename { e, dir, name }),
        2 => (any::<u16>(), any::<u16>()).prop_map(|(e, mode)| Op::Chmod { e, mode }),
        2 => (any::<u16>(), any::<u8>(), any::<u8>()).prop_map(|(e, k, v)| Op::SetXattr { e, k, v }),
        1 => any::<u16>().prop_map(|e| Op::RemoveXattr { e }),
        2 => (any::<u16>(), any::<u8>(), any::<u16>()).prop_map(|(dir, name, target)| Op::Symlink { dir, name, target }),
        2 => any::<u16>().prop_map(|e| Op::TypeChange { e }),
        3 => (any::<u16>(), any::<u8>()).prop_map(|(dir, name)| Op::Mkdir { dir, name }),
        1 => (any::<u16>(), 2..12u8).prop_map(|(dir, depth)| Op::Deep { dir, depth }),
        1 => (any::<u16>(), any::<u8>(), any::<u64>()).prop_map(|(dir, name, seed)| Op::Sparse { dir, name, seed }),
        2 => (any::<u16>(), any::<u16>(), any::<u8>()).prop_map(|(f, dir, name)| Op::Hardlink { f, dir, name }),
        2 => (any::<u16>(), any::<u32>(), 0..1_000_000_000u32).prop_map(|(e, secs, nsec)| Op::Touch { e, secs, nsec }),
        1 => (any::<u16>(), any::<u8>()).prop_map(|(e, who)| Op::Chown { e, who }),
    ]
}

/// Names with spaces, newlines, non-UTF-8 bytes and near-maximal length.
fn name(n: u8) -> Vec<u8> {
    let base: &[&[u8]] = &[
        b"a",
        b"b c",
        b"new\nline",
        b"\xff\xfe\x80bin",
        b"disk0.qcow2",
        b"journal.cdp",
        b"-dash",
        b" lead space",
        b"tab\there",
        b"quote'\"",
        b"\xe2\x82\xac-euro",
        b"UPPER",
    ];
    let mut v = base[n as usize % base.len()].to_vec();
    if n as usize / base.len() % 5 == 4 {
        v = vec![b'L'; 240];
    }
    v.extend_from_slice(format!("{}", n % 7).as_bytes());
    v
}

/// `len` pseudo-random bytes from `seed` (xorshift): reproducible test data.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn len_of(size: Size, seed: u64) -> usize {
    match size {
        Size::Empty => 0,
        Size::Small => (seed % 4096) as usize,
        Size::Medium => 4096 + (seed % 200_000) as usize,
        Size::Large => (4 << 20) + (seed % (3 << 20)) as usize,
    }
}

/// The tree as the interpreter sees it: directories, files, everything.
struct View {
    dirs: Vec<PathBuf>,
    files: Vec<PathBuf>,
    all: Vec<PathBuf>,
}

fn view(root: &Path) -> View {
    let mut v = View {
        dirs: vec![root.to_path_buf()],
        files: vec![],
        all: vec![],
    };
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut es: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        es.sort();
        for p in es {
            // georep's own directories at a root (a replica's state, a quarantine).
            if d == root
                && p.file_name()
                    .is_some_and(|n| n == ".georep" || n == ".georep-quarantine")
            {
                continue;
            }
            let md = std::fs::symlink_metadata(&p).unwrap();
            v.all.push(p.clone());
            if md.is_dir() {
                v.dirs.push(p.clone());
                stack.push(p);
            } else if md.is_file() {
                v.files.push(p);
            }
        }
    }
    v
}

fn pick<T: Clone>(v: &[T], i: u16) -> Option<T> {
    (!v.is_empty()).then(|| v[i as usize % v.len()].clone())
}

fn child(dir: &Path, n: u8) -> PathBuf {
    dir.join(OsStr::from_bytes(&name(n)))
}

fn write_new(p: &Path, bytes: &[u8]) {
    let _ = std::fs::remove_dir_all(p);
    let _ = std::fs::remove_file(p);
    std::fs::write(p, bytes).unwrap();
}

/// Applies `op` to the tree at `root`; returns the paths an integrated
/// writer would mark (including vanished ones: their parent is marked).
pub fn apply(root: &Path, op: &Op) -> Vec<PathBuf> {
    let v = view(root);
    let is_root = |p: &Path| p == root;
    match *op {
        Op::Create {
            dir,
            name,
            size,
            seed,
        } => {
            let Some(d) = pick(&v.dirs, dir) else {
                return vec![];
            };
            let p = child(&d, name);
            write_new(&p, &data(seed, len_of(size, seed)));
            vec![p]
        }
        Op::Overwrite { f, size, seed } => {
            let Some(p) = pick(&v.files, f) else {
                return vec![];
            };
            // In place (same inode), as a writer rewriting a file does.
            let bytes = data(seed, len_of(size, seed));
            let file = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&p)
                .unwrap();
            file.write_all_at(&bytes, 0).unwrap();
            vec![p]
        }
        Op::ModifyMiddle { f, at, len, seed } => {
            let Some(p) = pick(&v.files, f) else {
                return vec![];
            };
            let flen = std::fs::metadata(&p).unwrap().len();
            let off = flen * at as u64 / u16::MAX as u64;
            let file = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            file.write_all_at(&data(seed, len as usize), off).unwrap();
            vec![p]
        }
        Op::Append { f, len, seed } => {
            let Some(p) = pick(&v.files, f) else {
                return vec![];
            };
            let file = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
            use std::io::Write;
            (&file).write_all(&data(seed, len as usize)).unwrap();
            vec![p]
        }
        Op::Truncate { f, frac } => {
            let Some(p) = pick(&v.files, f) else {
                return vec![];
            };
            let flen = std::fs::metadata(&p).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(flen * frac as u64 / u16::MAX as u64)
                .unwrap();
            vec![p]
        }
        Op::Delete { e } => {
            let Some(p) = pick(&v.all, e) else {
                return vec![];
            };
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                std::fs::remove_dir_all(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
            vec![p]
        }
        Op::Rename { e, dir, name } => {
            let (Some(p), Some(d)) = (pick(&v.all, e), pick(&v.dirs, dir)) else {
                return vec![];
            };
            let to = child(&d, name);
            if to.starts_with(&p) || p.starts_with(&to) {
                return vec![];
            }
            if let Ok(md) = std::fs::symlink_metadata(&to) {
                if md.is_dir() {
                    std::fs::remove_dir_all(&to).unwrap();
                } else {
                    std::fs::remove_file(&to).unwrap();
                }
            }
            std::fs::rename(&p, &to).unwrap();
            vec![p, to]
        }
        Op::Chmod { e, mode } => {
            let Some(p) = pick(&v.all, e) else {
                return vec![];
            };
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.file_type().is_symlink() {
                return vec![];
            }
            // Keep directories traversable so the test can read them back.
            let m = if md.is_dir() {
                (mode as u32 & 0o7777) | 0o700
            } else {
                mode as u32 & 0o7777
            };
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
            vec![p]
        }
        Op::SetXattr { e, k, v: val } => {
            let Some(p) = pick(&v.all, e) else {
                return vec![];
            };
            if std::fs::symlink_metadata(&p)
                .unwrap()
                .file_type()
                .is_symlink()
            {
                return vec![];
            }
            xattr::set(
                &p,
                format!("user.test{}", k % 4),
                &data(val as u64, val as usize % 300),
            )
            .unwrap();
            vec![p]
        }
        Op::RemoveXattr { e } => {
            let Some(p) = pick(&v.all, e) else {
                return vec![];
            };
            if std::fs::symlink_metadata(&p)
                .unwrap()
                .file_type()
                .is_symlink()
            {
                return vec![];
            }
            for n in xattr::list(&p).unwrap() {
                if n.as_bytes().starts_with(b"user.test") {
                    xattr::remove(&p, &n).unwrap();
                }
            }
            vec![p]
        }
        Op::Symlink { dir, name, target } => {
            let Some(d) = pick(&v.dirs, dir) else {
                return vec![];
            };
            let p = child(&d, name);
            let t: Vec<u8> = match target % 3 {
                0 => b"/nonexistent/absolute".to_vec(),
                1 => b"../dangling target".to_vec(),
                _ => pick(&v.all, target)
                    .map(|t| {
                        t.strip_prefix(root)
                            .unwrap()
                            .as_os_str()
                            .as_bytes()
                            .to_vec()
                    })
                    .unwrap_or(b"x".to_vec()),
            };
            let _ = std::fs::remove_dir_all(&p);
            let _ = std::fs::remove_file(&p);
            std::os::unix::fs::symlink(OsStr::from_bytes(&t), &p).unwrap();
            vec![p]
        }
        Op::TypeChange { e } => {
            let Some(p) = pick(&v.all, e) else {
                return vec![];
            };
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                std::fs::remove_dir_all(&p).unwrap();
                std::fs::write(&p, b"was a directory").unwrap();
            } else if md.is_file() {
                std::fs::remove_file(&p).unwrap();
                std::fs::create_dir(&p).unwrap();
                std::fs::write(p.join("inside"), b"was a file").unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
                std::fs::write(&p, b"was a symlink").unwrap();
            }
            vec![p]
        }
        Op::Mkdir { dir, name } => {
            let Some(d) = pick(&v.dirs, dir) else {
                return vec![];
            };
            let p = child(&d, name);
            if std::fs::symlink_metadata(&p).is_ok() {
                return vec![];
            }
            std::fs::create_dir(&p).unwrap();
            vec![p]
        }
        Op::Deep { dir, depth } => {
            let Some(mut p) = pick(&v.dirs, dir) else {
                return vec![];
            };
            for i in 0..depth {
                p = p.join(format!("d{i}"));
                if std::fs::symlink_metadata(&p).is_ok_and(|m| !m.is_dir()) {
                    return vec![];
                }
            }
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("leaf"), b"deep").unwrap();
            vec![p.join("leaf")]
        }
        Op::Sparse { dir, name, seed } => {
            let Some(d) = pick(&v.dirs, dir) else {
                return vec![];
            };
            let p = child(&d, name);
            let _ = std::fs::remove_dir_all(&p);
            let _ = std::fs::remove_file(&p);
            let f = std::fs::File::create(&p).unwrap();
            let len = (6 << 20) + seed % (1 << 20);
            f.set_len(len).unwrap();
            for k in 0..3u64 {
                f.write_all_at(
                    &data(seed + k, 10_000),
                    (seed.wrapping_mul(k + 1)) % (len - 10_000),
                )
                .unwrap();
            }
            vec![p]
        }
        Op::Hardlink { f, dir, name } => {
            let (Some(src), Some(d)) = (pick(&v.files, f), pick(&v.dirs, dir)) else {
                return vec![];
            };
            let p = child(&d, name);
            if std::fs::symlink_metadata(&p).is_ok() {
                return vec![];
            }
            std::fs::hard_link(&src, &p).unwrap();
            // Both names are marked: the link changed the source's inode too.
            vec![src, p]
        }
        Op::Touch { e, secs, nsec } => {
            let Some(p) = pick(&v.all, e) else {
                return vec![];
            };
            let t = nix::sys::time::TimeSpec::new(secs as i64, nsec as i64);
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                &p,
                &t,
                &t,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .unwrap();
            vec![p]
        }
        Op::Chown { e, who } => {
            let Some(p) = pick(&v.all, e) else {
                return vec![];
            };
            if is_root(&p) || !nix::unistd::geteuid().is_root() {
                return vec![];
            }
            let id = [0u32, 1000, 65534][who as usize % 3];
            std::os::unix::fs::lchown(&p, Some(id), Some(id)).unwrap();
            vec![p]
        }
    }
}
