//! xtime and stime stamps kept in `user.` extended attributes.
//!
//! - `user.georep.master` on the master root holds the master's uuid.
//! - `user.georep.<master-uuid>.xtime` on every marked entry: the newest
//!   change at or below it (the marker invariant: parent >= child).
//! - `user.georep.<session-uuid>.stime` on master directories: the xtime up
//!   to which that subtree is known to be on the session's slave.
//! - `user.georep.<master-uuid>.clock` on the master root: the newest stamp
//!   issued, written before the stamp is written anywhere, so a marker
//!   killed before it reached the root never has its stamp issued again.
//! - `user.georep.<master-uuid>.dirmark` on a directory given to
//!   [`mark`] itself: the crawl compares that directory's whole subtree
//!   until a stime of at least this stamp is recorded (a directory renamed
//!   into place keeps the stimes and xtimes of its old name).
//!
//! Stamps are nanoseconds since the epoch, 8 bytes big-endian, issued by a
//! hybrid logical clock (max(now, newest + 1)) so they never go backwards.

use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use uuid::Uuid;

pub const MASTER_ID_ATTR: &str = "user.georep.master";

pub fn xtime_attr(master: &Uuid) -> String {
    format!("user.georep.{master}.xtime")
}

pub fn stime_attr(session: &Uuid) -> String {
    format!("user.georep.{session}.stime")
}

pub fn clock_attr(master: &Uuid) -> String {
    format!("user.georep.{master}.clock")
}

pub fn dirmark_attr(master: &Uuid) -> String {
    format!("user.georep.{master}.dirmark")
}

/// The attribute holding a directory's entry digest for a session (see
/// `engine::master::Master::dir_digest`).
pub fn digest_attr(session: &Uuid) -> String {
    format!("user.georep.{session}.entries")
}

/// Decodes a stamp; anything malformed reads as absent (0), which only
/// makes the crawl look at more, never at less.
pub fn decode(v: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(v).ok().map(u64::from_be_bytes)
}

/// Reads a stamp without following a final symlink; absent or unreadable is 0.
pub fn read(path: &Path, attr: &str) -> io::Result<u64> {
    match xattr::get(path, attr) {
        Ok(v) => Ok(v.as_deref().and_then(decode).unwrap_or(0)),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(0),
        Err(e) => Err(e),
    }
}

/// A stamp's value as stored (0 when absent or malformed).
pub fn decode_stamp(v: Option<&[u8]>) -> u64 {
    v.and_then(decode).unwrap_or(0)
}

pub fn write(path: &Path, attr: &str, stamp: u64) -> io::Result<()> {
    xattr::set(path, attr, &stamp.to_be_bytes())
}

pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Reads the master id of `root`, if it is a master root.
pub fn master_id(root: &Path) -> io::Result<Option<Uuid>> {
    match xattr::get(root, MASTER_ID_ATTR) {
        Ok(Some(v)) => Ok(std::str::from_utf8(&v)
            .ok()
            .and_then(|s| Uuid::parse_str(s.trim()).ok())),
        Ok(None) => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Returns the master id of `root`, creating one on first use. Fails
/// clearly when the file system does not support `user.` xattrs.
pub fn ensure_master_id(root: &Path) -> io::Result<Uuid> {
    if let Some(id) = master_id(root)? {
        return Ok(id);
    }
    let id = Uuid::new_v4();
    xattr::set(root, MASTER_ID_ATTR, id.to_string().as_bytes())?;
    Ok(id)
}

/// Holds the master's marker lock (an `flock` on the root directory) so
/// that concurrent markers never lose a stamp in a read-modify-write race.
pub struct MarkerLock {
    _dir: Flock<File>,
}

impl MarkerLock {
    pub fn take(root: &Path) -> io::Result<MarkerLock> {
        let dir = Flock::lock(File::open(root)?, FlockArg::LockExclusive)
            .map_err(|(_, e)| io::Error::from(e))?;
        Ok(MarkerLock { _dir: dir })
    }
}

/// Issues a new stamp for the master at `root` (call it under the
/// [`MarkerLock`]): later than every stamp issued before (the root's
/// reserved clock, and its xtime, the newest in the tree) and than the
/// wall clock. The stamp is reserved on the root before it is returned:
/// stamps are written leaf to root, so a marker killed half-way leaves
/// entries newer than the root's xtime, and only the reservation keeps
/// the next stamp above them when the wall clock is behind (stepped back).
pub fn next_stamp(root: &Path, master: &Uuid) -> io::Result<u64> {
    let newest = read(root, &xtime_attr(master))?.max(read(root, &clock_attr(master))?);
    let stamp = now_ns().max(newest.saturating_add(1));
    write(root, &clock_attr(master), stamp)?;
    Ok(stamp)
}

/// What a call to [`mark`] stamped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marked {
    pub master_root: PathBuf,
    pub master: Uuid,
    pub stamp: u64,
    /// Entries stamped, from the path up to the master root.
    pub entries: usize,
}

/// Marks `path` changed: stamps it (or, if it is gone or a symlink, its
/// nearest directory) and every ancestor up to each master root above it,
/// keeping the marker invariant. A directory given itself (not a master
/// root) also gets a dirmark: its whole subtree is compared by the next
/// crawl, as after a rename into place. Returns one record per master.
pub fn mark(path: &Path) -> io::Result<Vec<Marked>> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    let abs = normalize(&abs);
    // The first entry that can carry a user xattr: an existing file or directory.
    let mut start = abs.clone();
    loop {
        match std::fs::symlink_metadata(&start) {
            Ok(md) if md.is_dir() || md.is_file() => break,
            _ => {
                if !start.pop() {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        "no existing ancestor",
                    ));
                }
            }
        }
    }
    let mut chain = Vec::new();
    let mut p = start.clone();
    loop {
        chain.push(p.clone());
        if !p.pop() {
            break;
        }
    }
    let mut out = Vec::new();
    for (i, candidate) in chain.iter().enumerate() {
        let Some(id) = master_id(candidate).unwrap_or(None) else {
            continue;
        };
        let _lock = MarkerLock::take(candidate)?;
        let attr = xtime_attr(&id);
        let stamp = next_stamp(candidate, &id)?;
        if start == abs && i > 0 && std::fs::symlink_metadata(&start)?.is_dir() {
            // Before its xtime: a crawl that sees the new xtime sees the dirmark.
            write(&start, &dirmark_attr(&id), stamp)?;
        }
        for entry in &chain[..=i] {
            write(entry, &attr, stamp)?;
        }
        out.push(Marked {
            master_root: candidate.clone(),
            master: id,
            stamp,
            entries: i + 1,
        });
    }
    if out.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} is not inside a georep master (no {MASTER_ID_ATTR} xattr on it or any parent): create a session for its tree first",
                abs.display()
            ),
        ));
    }
    Ok(out)
}

/// Removes `.` and `..` lexically (the path may no longer exist).
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_keeps_invariant_and_is_monotonic() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("m");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), b"x").unwrap();
        let id = ensure_master_id(&root).unwrap();
        assert_eq!(ensure_master_id(&root).unwrap(), id);
        let attr = xtime_attr(&id);
        let m1 = mark(&root.join("a/b/f")).unwrap();
        assert_eq!(m1.len(), 1);
        assert_eq!(m1[0].entries, 4);
        for p in ["", "a", "a/b", "a/b/f"] {
            assert_eq!(read(&root.join(p), &attr).unwrap(), m1[0].stamp);
        }
        // A clock far in the future on the root: the next stamp still goes up.
        write(&root, &attr, u64::MAX / 2).unwrap();
        let m2 = mark(&root.join("a/gone/file")).unwrap();
        assert_eq!(m2[0].stamp, u64::MAX / 2 + 1);
        assert_eq!(read(&root.join("a"), &attr).unwrap(), m2[0].stamp);
        assert_eq!(read(&root.join("a/b/f"), &attr).unwrap(), m1[0].stamp);
        // Only a directory marked itself gets a dirmark; the root never does.
        assert_eq!(read(&root.join("a"), &dirmark_attr(&id)).unwrap(), 0);
        let m3 = mark(&root.join("a/b")).unwrap();
        assert_eq!(
            read(&root.join("a/b"), &dirmark_attr(&id)).unwrap(),
            m3[0].stamp
        );
        mark(&root).unwrap();
        assert_eq!(read(&root, &dirmark_attr(&id)).unwrap(), 0);
    }

    #[test]
    fn a_stamp_is_reserved_before_it_is_written_so_an_interrupted_marker_never_gets_it_again() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("m");
        std::fs::create_dir_all(root.join("a")).unwrap();
        let id = ensure_master_id(&root).unwrap();
        let attr = xtime_attr(&id);
        // A clock far behind the stamps (stepped back): stamps are root + 1.
        write(&root, &attr, u64::MAX / 2).unwrap();
        // A marker that issued a stamp and was killed after writing the leaf only.
        let s1 = next_stamp(&root, &id).unwrap();
        write(&root.join("a"), &attr, s1).unwrap();
        let s2 = next_stamp(&root, &id).unwrap();
        assert!(s2 > s1, "stamp {s1} issued twice");
        let m = mark(&root.join("a")).unwrap();
        assert!(m[0].stamp > s2);
        assert_eq!(read(&root, &attr).unwrap(), m[0].stamp);
    }

    #[test]
    fn mark_outside_master_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let e = mark(d.path()).unwrap_err();
        assert!(e.to_string().contains("not inside a georep master"), "{e}");
    }
}
