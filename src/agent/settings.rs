//! The slave operator's settings for the agent, in `.georep/agent.toml`
//! under the slave root: decided on the slave, never by the master (the
//! state directory is reserved, so no request can write it).
//!
//! ```toml
//! preserve_setuid = false   # true: keep setuid/setgid bits on files
//! cross_mounts = false      # true: follow paths into other file systems under the root
//! ```

use crate::protocol::{ErrorKind, WireError};
use serde::Deserialize;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};

/// The settings file's name, in the state directory.
pub const FILE: &str = "agent.toml";

/// What the agent may do beyond its defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Keep setuid and setgid bits on files (they are stripped, and
    /// recorded, by default).
    pub preserve_setuid: bool,
    /// Resolve paths into file systems mounted under the root, and remove
    /// trees that hold them (refused by default).
    pub cross_mounts: bool,
}

impl Policy {
    /// Reads the settings from the state directory `state` (defaults when absent).
    pub fn load(state: BorrowedFd<'_>) -> Result<Policy, WireError> {
        let shown = format!(".georep/{FILE}");
        let fd = match super::sys::open_nofollow(state.as_fd(), OsStr::new(FILE), false) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::ENOENT) => return Ok(Policy::default()),
            Err(e) => return Err(super::sys::errno_err(e, "open", &shown)),
        };
        let mut text = String::new();
        use std::io::Read;
        std::fs::File::from(fd)
            .take(64 << 10)
            .read_to_string(&mut text)
            .map_err(|e| super::sys::io_err(e, "read", &shown))?;
        toml::from_str(&text).map_err(|e| {
            WireError::new(
                ErrorKind::Invalid,
                format!(
                    "the slave's {shown}: {}: fix it (keys: preserve_setuid, cross_mounts; true or false)",
                    e.message()
                ),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_default_to_the_safe_side_and_refuse_unknown_keys() {
        let d = tempfile::tempdir().unwrap();
        let fd = nix::fcntl::open(
            d.path(),
            nix::fcntl::OFlag::O_RDONLY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        assert_eq!(Policy::load(fd.as_fd()).unwrap(), Policy::default());
        std::fs::write(d.path().join(FILE), "preserve_setuid = true\n").unwrap();
        let p = Policy::load(fd.as_fd()).unwrap();
        assert!(p.preserve_setuid && !p.cross_mounts);
        std::fs::write(d.path().join(FILE), "cross_mount = true\n").unwrap();
        let e = Policy::load(fd.as_fd()).unwrap_err();
        assert!(
            e.message.contains("agent.toml") && e.message.contains("cross_mount"),
            "{e:?}"
        );
    }
}
