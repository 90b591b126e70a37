//! Stream groups: several agents on one slave root serving one worker in
//! parallel (one per SSH channel). The first agent holds the root's
//! exclusive lock; on `OpenStreams` it writes a fresh random token to the
//! state directory, and an agent whose `HelloStream` presents that token
//! joins the group without the lock. A new primary (a new worker) writes a
//! new token, so the agents of a dead group cannot join another (and the
//! primary removes any token left when it takes the lock). Each joiner
//! holds one of `MAX_JOINERS` slot locks (`streams.slot.N`, flock) while
//! it serves: more joiners are refused.

use super::root::{errno_err, io_err, open_nofollow, Root, WResult};
use crate::protocol::{ErrorKind, Hash16, WireError};
use nix::fcntl::{openat, Flock, FlockArg, OFlag};
use nix::sys::stat::Mode;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;

const TOKEN_FILE: &str = "streams.token";
/// Joiners of a group at once, at most (a worker's streams, as
/// `session::MAX_STREAMS`, less the primary's).
const MAX_JOINERS: usize = 15;

/// Takes a free joiner slot, held while the returned lock lives.
pub fn take_slot(root: &Root) -> WResult<Flock<File>> {
    let state = root.state_dir()?;
    for i in 0..MAX_JOINERS {
        let name = format!("streams.slot.{i}");
        let Ok(fd) = openat(
            state.as_fd(),
            OsStr::new(&name),
            OFlag::O_CREAT | OFlag::O_RDWR | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::from_bits_truncate(0o600),
        ) else {
            continue;
        };
        if let Ok(lock) = Flock::lock(File::from(fd), FlockArg::LockExclusiveNonblock) {
            return Ok(lock);
        }
    }
    Err(WireError::new(
        ErrorKind::Busy,
        format!("stream group full: {MAX_JOINERS} agents already joined; use fewer streams"),
    ))
}

/// Writes a fresh token for this primary agent's group and returns it.
pub fn open_group(root: &Root) -> WResult<Hash16> {
    // 122 random bits from the OS (uuid v4 draws them from getrandom).
    let token: Hash16 = uuid::Uuid::new_v4().into_bytes();
    let state = root.state_dir()?;
    let _ = nix::unistd::unlinkat(
        state.as_fd(),
        OsStr::new(TOKEN_FILE),
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    );
    let fd = openat(
        state.as_fd(),
        OsStr::new(TOKEN_FILE),
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| errno_err(e, "write", &"stream token"))?;
    File::from(fd)
        .write_all(&token)
        .map_err(|e| io_err(e, "write", &"stream token"))?;
    Ok(token)
}

/// Admits a joining agent if `token` is the group's current token.
pub fn check_token(root: &Root, token: &Hash16) -> WResult<()> {
    let refuse = || {
        WireError::new(
            ErrorKind::Busy,
            "stream token refused: the group's primary agent is gone or another worker owns the slave root",
        )
    };
    let state = root.state_dir()?;
    let fd = open_nofollow(state.as_fd(), OsStr::new(TOKEN_FILE), false).map_err(|_| refuse())?;
    let mut have = Vec::new();
    File::from(fd)
        .take(64)
        .read_to_end(&mut have)
        .map_err(|e| io_err(e, "read", &"stream token"))?;
    // Compared in full whatever differs first: nothing to learn from timing.
    let same = have.len() == 16 && have.iter().zip(token).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0;
    if same {
        Ok(())
    } else {
        Err(refuse())
    }
}

/// Removes the group's token (the primary agent is exiting).
pub fn close_group(root: &Root) {
    if let Ok(state) = root.state_dir() {
        let _ = nix::unistd::unlinkat(
            state.as_fd(),
            OsStr::new(TOKEN_FILE),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }
}
