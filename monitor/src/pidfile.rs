//! Pid files that identify a process by pid, start time and boot, so a
//! stale file left by kill -9 or a reboot is never mistaken for a live
//! process, even when the pid has been reused.

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// What a pid file says about its process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PidRecord {
    pub pid: u32,
    /// Start time of the process in clock ticks since boot (/proc/PID/stat field 22).
    pub start_ticks: u64,
    /// The kernel's boot id when the record was written.
    pub boot_id: String,
}

/// Whether the process a record names is still the one running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessState {
    Running,
    /// Dead, rebooted since, or the pid now belongs to another process.
    Gone,
}

impl PidRecord {
    /// The record of the calling process.
    pub fn current() -> io::Result<PidRecord> {
        let pid = std::process::id();
        Ok(PidRecord {
            pid,
            start_ticks: start_ticks(pid)?,
            boot_id: boot_id()?,
        })
    }

    /// The record of another running process.
    pub fn of(pid: u32) -> io::Result<PidRecord> {
        Ok(PidRecord {
            pid,
            start_ticks: start_ticks(pid)?,
            boot_id: boot_id()?,
        })
    }

    pub fn state(&self) -> ProcessState {
        match (boot_id(), start_ticks(self.pid)) {
            (Ok(b), Ok(t))
                if b == self.boot_id && t == self.start_ticks && !is_zombie(self.pid) =>
            {
                ProcessState::Running
            }
            _ => ProcessState::Gone,
        }
    }

    pub fn read(path: &Path) -> io::Result<Option<PidRecord>> {
        match fs::read(path) {
            Ok(b) => Ok(serde_json::from_slice(&b).ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads `path` and returns the record only if its process still runs.
    pub fn read_live(path: &Path) -> io::Result<Option<PidRecord>> {
        Ok(Self::read(path)?.filter(|r| r.state() == ProcessState::Running))
    }
}

fn start_ticks(pid: u32) -> io::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses: parse after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other("malformed /proc stat"))?;
    rest.split_whitespace()
        .nth(19)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| io::Error::other("malformed /proc stat"))
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn boot_id() -> io::Result<String> {
    Ok(fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_string())
}

/// A pid file held under an exclusive `flock`: while the holder lives, no
/// other process can take it, and the lock vanishes with the process.
pub struct PidFile {
    path: PathBuf,
    _file: Flock<File>,
}

impl PidFile {
    /// Takes the lock and writes the calling process's record. Returns
    /// `Ok(Err(holder))` when another live process holds it.
    pub fn acquire(path: &Path) -> io::Result<Result<PidFile, Option<PidRecord>>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(Err(PidRecord::read(path)?)),
            Err((_, e)) => return Err(e.into()),
        };
        let rec = PidRecord::current()?;
        let data = serde_json::to_vec(&rec).map_err(io::Error::other)?;
        file.set_len(0)?;
        use std::os::unix::fs::FileExt;
        // Not fsynced: the lock, not the file, says who runs, and after a
        // crash the record is checked against the process table anyway.
        file.write_all_at(&data, 0)?;
        Ok(Ok(PidFile {
            path: path.to_path_buf(),
            _file: file,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_process_is_running_and_fake_record_is_gone() {
        let me = PidRecord::current().unwrap();
        assert_eq!(me.state(), ProcessState::Running);
        let reused = PidRecord {
            start_ticks: me.start_ticks + 1,
            ..me.clone()
        };
        assert_eq!(reused.state(), ProcessState::Gone);
        let rebooted = PidRecord {
            boot_id: "other".into(),
            ..me
        };
        assert_eq!(rebooted.state(), ProcessState::Gone);
    }

    #[test]
    fn second_acquire_reports_holder() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.pid");
        let held = PidFile::acquire(&p).unwrap().unwrap();
        let holder = PidFile::acquire(&p).unwrap().err().unwrap().unwrap();
        assert_eq!(holder.pid, std::process::id());
        drop(held);
        assert!(!p.exists());
        assert!(PidFile::acquire(&p).unwrap().is_ok());
    }
}
