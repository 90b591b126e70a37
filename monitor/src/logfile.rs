//! The per-session log file: appended to by the monitor (its own tracing
//! events and the worker's stderr lines), reopened on SIGHUP so logrotate
//! can move it away, and copied to stderr in the foreground.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub struct LogFile {
    path: PathBuf,
    file: Mutex<File>,
    tee_stderr: bool,
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl LogFile {
    pub fn open(path: &Path, tee_stderr: bool) -> io::Result<Arc<LogFile>> {
        Ok(Arc::new(LogFile {
            path: path.to_path_buf(),
            file: Mutex::new(open(path)?),
            tee_stderr,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the path anew (after logrotate renamed the old file).
    pub fn reopen(&self) -> io::Result<()> {
        let f = open(&self.path)?;
        *self.file.lock().unwrap() = f;
        Ok(())
    }

    /// Appends whole bytes (one or more complete lines) in one write.
    pub fn write_all(&self, buf: &[u8]) {
        let _ = self.file.lock().unwrap().write_all(buf);
        if self.tee_stderr {
            let _ = io::stderr().write_all(buf);
        }
    }
}

/// A tracing writer for one event: buffers it and appends it whole on drop.
pub struct EventWriter {
    log: Arc<LogFile>,
    buf: Vec<u8>,
}

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.log.write_all(&self.buf);
        }
    }
}

/// Hands [`EventWriter`]s to a tracing subscriber.
#[derive(Clone)]
pub struct LogWriter(pub Arc<LogFile>);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = EventWriter;
    fn make_writer(&'a self) -> EventWriter {
        EventWriter {
            log: self.0.clone(),
            buf: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopen_follows_a_rotation() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("georep.log");
        let log = LogFile::open(&p, false).unwrap();
        log.write_all(b"one\n");
        std::fs::rename(&p, d.path().join("georep.log.1")).unwrap();
        log.write_all(b"two\n");
        log.reopen().unwrap();
        log.write_all(b"three\n");
        assert_eq!(
            std::fs::read_to_string(d.path().join("georep.log.1")).unwrap(),
            "one\ntwo\n"
        );
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "three\n");
    }
}
