//! Paths relative to a replication root, as raw bytes so that any name the
//! master can hold (spaces, newlines, non-UTF-8) travels unchanged.

use serde::{Deserialize, Serialize};
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Longest relative path accepted (Linux PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// Longest single name accepted (Linux NAME_MAX).
pub const MAX_NAME: usize = 255;

/// A validated path below a root: `/`-separated names, none empty, `.` or
/// `..`, no NUL byte. The empty path is the root itself.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(try_from = "Vec<u8>", into = "Vec<u8>")]
pub struct RelPath(Vec<u8>);

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("absolute path")]
    Absolute,
    #[error("empty path component")]
    EmptyComponent,
    #[error("'.' or '..' component")]
    DotComponent,
    #[error("NUL byte in path")]
    Nul,
    #[error("path longer than {MAX_PATH} bytes")]
    TooLong,
    #[error("name longer than {MAX_NAME} bytes")]
    NameTooLong,
}

/// Checks one name (a single path component).
pub fn check_name(name: &[u8]) -> Result<(), PathError> {
    if name.is_empty() {
        return Err(PathError::EmptyComponent);
    }
    if name == b"." || name == b".." {
        return Err(PathError::DotComponent);
    }
    if name.contains(&0) {
        return Err(PathError::Nul);
    }
    if name.contains(&b'/') {
        return Err(PathError::EmptyComponent);
    }
    if name.len() > MAX_NAME {
        return Err(PathError::NameTooLong);
    }
    Ok(())
}

impl RelPath {
    pub fn root() -> RelPath {
        RelPath(Vec::new())
    }

    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<RelPath, PathError> {
        let bytes = bytes.into();
        if bytes.is_empty() {
            return Ok(RelPath(bytes));
        }
        if bytes[0] == b'/' {
            return Err(PathError::Absolute);
        }
        if bytes.len() > MAX_PATH {
            return Err(PathError::TooLong);
        }
        for c in bytes.split(|&b| b == b'/') {
            check_name(c)?;
        }
        Ok(RelPath(bytes))
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The child `name` of this path.
    pub fn join(&self, name: &[u8]) -> Result<RelPath, PathError> {
        check_name(name)?;
        let mut v = Vec::with_capacity(self.0.len() + 1 + name.len());
        v.extend_from_slice(&self.0);
        if !v.is_empty() {
            v.push(b'/');
        }
        v.extend_from_slice(name);
        if v.len() > MAX_PATH {
            return Err(PathError::TooLong);
        }
        Ok(RelPath(v))
    }

    /// Parent and final name; `None` for the root.
    pub fn split_last(&self) -> Option<(RelPath, &[u8])> {
        if self.0.is_empty() {
            return None;
        }
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => Some((RelPath(self.0[..i].to_vec()), &self.0[i + 1..])),
            None => Some((RelPath::root(), &self.0[..])),
        }
    }

    pub fn parent(&self) -> Option<RelPath> {
        self.split_last().map(|(p, _)| p)
    }

    pub fn name(&self) -> Option<&[u8]> {
        self.split_last().map(|(_, n)| n)
    }

    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.0.split(|&b| b == b'/').filter(|c| !c.is_empty())
    }

    pub fn depth(&self) -> usize {
        self.components().count()
    }

    /// This path under a local directory.
    pub fn under(&self, base: &Path) -> PathBuf {
        if self.0.is_empty() {
            base.to_path_buf()
        } else {
            base.join(OsStr::from_bytes(&self.0))
        }
    }

    /// The path as an argument for `*at` system calls relative to a root fd.
    pub fn as_os_str(&self) -> &OsStr {
        if self.0.is_empty() {
            OsStr::new(".")
        } else {
            OsStr::from_bytes(&self.0)
        }
    }

    /// Makes `path` relative to `base`, if it lies below it.
    pub fn from_local(base: &Path, path: &Path) -> Option<RelPath> {
        let rel = path.strip_prefix(base).ok()?;
        RelPath::new(rel.as_os_str().as_bytes().to_vec()).ok()
    }
}

impl TryFrom<Vec<u8>> for RelPath {
    type Error = PathError;
    fn try_from(v: Vec<u8>) -> Result<Self, PathError> {
        RelPath::new(v)
    }
}

impl From<RelPath> for Vec<u8> {
    fn from(p: RelPath) -> Vec<u8> {
        p.0
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str(".")
        } else {
            write!(f, "{}", String::from_utf8_lossy(&self.0).escape_debug())
        }
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelPath({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_escapes() {
        for bad in [
            &b"/etc"[..],
            b"a/../b",
            b"..",
            b"a//b",
            b"a/",
            b"./a",
            b"a\0b",
        ] {
            assert!(RelPath::new(bad.to_vec()).is_err(), "{:?}", bad);
        }
        assert!(RelPath::new(vec![b'a'; MAX_PATH + 1]).is_err());
        assert!(RelPath::root().join(b"..").is_err());
        assert!(RelPath::root().join(b"a/b").is_err());
    }

    #[test]
    fn odd_names_round_trip() {
        let p = RelPath::new(b"dir with space/new\nline/\xff\xfe".to_vec()).unwrap();
        assert_eq!(p.depth(), 3);
        let (parent, name) = p.split_last().unwrap();
        assert_eq!(name, b"\xff\xfe");
        assert_eq!(parent.join(name).unwrap(), p);
        let bytes = postcard::to_allocvec(&p).unwrap();
        assert_eq!(postcard::from_bytes::<RelPath>(&bytes).unwrap(), p);
        assert!(postcard::from_bytes::<RelPath>(
            &postcard::to_allocvec(&b"../x".to_vec()).unwrap()
        )
        .is_err());
    }
}
