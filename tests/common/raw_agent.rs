//! A client speaking the agent protocol directly over the real `georep
//! agent` process's pipes, for tests that need exact requests.

use georep::protocol::{encode_frame, Envelope, Request, Response, BANNER};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

pub struct RawAgent {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
    next_id: u64,
}

impl RawAgent {
    /// Starts `georep agent --root ROOT` and completes the handshake,
    /// retrying for a while if another agent (one being killed) still
    /// holds the root.
    pub fn start(root: &Path) -> RawAgent {
        RawAgent::start_with(root, None)
    }

    /// As [`start`](Self::start), with the agent's open-file limit set to
    /// `nofile` (soft and hard) when given.
    pub fn start_with(root: &Path, nofile: Option<u64>) -> RawAgent {
        for _ in 0..200 {
            match RawAgent::try_start(root, nofile) {
                Ok(a) => return a,
                Err(e) if e.kind == georep::protocol::ErrorKind::Busy => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                Err(e) => panic!("agent refused the handshake: {e:?}"),
            }
        }
        panic!("the slave root stayed busy");
    }

    /// Starts an agent and runs the handshake; its error if refused.
    pub fn try_start(
        root: &Path,
        nofile: Option<u64>,
    ) -> Result<RawAgent, georep::protocol::WireError> {
        let mut cmd = Command::new(super::georep_bin());
        cmd.args(["agent", "--root"])
            .arg(root)
            .args(["--keepalive", "60"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe and touches no memory
            // of the parent; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().unwrap();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let mut a = RawAgent {
            child,
            stdin,
            stdout,
            next_id: 1,
        };
        let mut banner = [0u8; 8];
        a.read_exact(&mut banner).expect("banner");
        assert_eq!(&banner, BANNER);
        let r = a.call(Request::Hello {
            version: georep::protocol::PROTOCOL_VERSION,
            client: "test".into(),
        });
        match r.result {
            Ok(_) => Ok(a),
            Err(e) => {
                a.kill();
                Err(e)
            }
        }
    }

    /// Reads exactly `buf.len()` bytes, failing after 60 s without data.
    fn read_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        let mut got = 0;
        while got < buf.len() {
            let mut fd = libc::pollfd {
                fd: self.stdout.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd on the stack, for the duration of the call.
            let n = unsafe { libc::poll(&mut fd, 1, 60_000) };
            assert!(n > 0, "the agent neither answered nor closed within 60 s");
            match self.stdout.read(&mut buf[got..])? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                m => got += m,
            }
        }
        Ok(())
    }

    fn read_response(&mut self) -> Option<Response> {
        let mut len = [0u8; 4];
        self.read_exact(&mut len).ok()?;
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        self.read_exact(&mut body).ok()?;
        Some(postcard::from_bytes(&body).expect("the agent's reply decodes"))
    }

    /// Sends a request that gets no reply (data writes: id 0).
    pub fn post(&mut self, body: Request) {
        let f = encode_frame(&Envelope { id: 0, body }).unwrap();
        let w = self.stdin.as_mut().unwrap();
        w.write_all(&f).unwrap();
        w.flush().unwrap();
    }

    /// Sends bytes as they are (frames or garbage).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stdin.as_mut().unwrap().write_all(bytes);
        let _ = self.stdin.as_mut().unwrap().flush();
    }

    /// The encoded frame of `body` with request id `id`.
    pub fn frame(&mut self, body: Request, id: u64) -> Vec<u8> {
        encode_frame(&Envelope { id, body }).unwrap()
    }

    /// Sends a request and returns its (last) reply.
    pub fn call(&mut self, body: Request) -> Response {
        let id = self.send(body);
        self.reply_to(id).expect("a reply")
    }

    /// Sends a request without waiting; returns its id.
    pub fn send(&mut self, body: Request) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let f = self.frame(body, id);
        self.send_raw(&f);
        id
    }

    /// The next reply frame, whatever it answers (None once the agent closed).
    pub fn next_response(&mut self) -> Option<Response> {
        self.read_response()
    }

    /// Every frame of the reply to `id` (the replies to other ids read on
    /// the way are dropped).
    pub fn frames_of(&mut self, id: u64) -> Vec<Response> {
        let mut out = Vec::new();
        loop {
            let r = self.read_response().expect("a reply");
            if r.id != id {
                continue;
            }
            let done = r.last || r.result.is_err();
            out.push(r);
            if done {
                return out;
            }
        }
    }

    /// Reads the next `n` reply frames in bulk (large reads, for floods),
    /// calling `f` on each.
    pub fn responses(&mut self, n: usize, mut f: impl FnMut(Response)) {
        let mut buf: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 1 << 20];
        let mut done = 0;
        let mut at = 0;
        while done < n {
            if buf.len() - at >= 4 {
                let len = u32::from_le_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
                if buf.len() - at >= 4 + len {
                    f(postcard::from_bytes(&buf[at + 4..at + 4 + len]).expect("decodes"));
                    at += 4 + len;
                    done += 1;
                    continue;
                }
            }
            buf.drain(..at);
            at = 0;
            let mut fd = libc::pollfd {
                fd: self.stdout.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd on the stack, for the duration of the call.
            let ready = unsafe { libc::poll(&mut fd, 1, 60_000) };
            assert!(
                ready > 0,
                "the agent stopped answering ({done} of {n} replies)"
            );
            let m = self.stdout.read(&mut chunk).unwrap();
            assert!(m > 0, "the agent closed after {done} of {n} replies");
            buf.extend_from_slice(&chunk[..m]);
        }
        assert_eq!(at, buf.len(), "more replies than expected");
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A field of the agent's /proc/PID/status in KiB (e.g. "VmHWM", its peak memory).
    pub fn status_kib(&self, field: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    /// Bytes the agent has written through write calls so far (/proc/PID/io `wchar`).
    pub fn wchar(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/io", self.pid())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("wchar: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("wchar in /proc io")
    }

    /// A writable duplicate of the agent's input, for a thread that floods it.
    pub fn input(&self) -> std::fs::File {
        let fd = self
            .stdin
            .as_ref()
            .unwrap()
            .as_fd()
            .try_clone_to_owned()
            .unwrap();
        std::fs::File::from(fd)
    }

    /// The last reply to request `id` (or its error), None once the agent closed.
    pub fn reply_to(&mut self, id: u64) -> Option<Response> {
        loop {
            let r = self.read_response()?;
            if r.id == id && (r.last || r.result.is_err()) {
                return Some(r);
            }
        }
    }

    /// A request that must be answered with an error.
    pub fn refused(&mut self, body: Request, what: &str) {
        let r = self.call(body);
        assert!(r.result.is_err(), "{what}: accepted: {r:?}");
    }

    /// Sends raw bytes that must make the agent answer an error and close
    /// (without a panic or a signal).
    pub fn expect_close(mut self, bytes: &[u8], what: &str) {
        self.send_raw(bytes);
        drop(self.stdin.take());
        let mut saw_error = false;
        while let Some(r) = self.read_response() {
            saw_error |= r.result.is_err();
        }
        let out = self.child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("panicked"),
            "{what}: the agent panicked: {err}"
        );
        assert!(
            out.status.code().is_some(),
            "{what}: killed by a signal: {:?}",
            out.status
        );
        assert!(saw_error || what == "truncated", "{what}: no error reply");
    }

    /// Closes the input and waits for a clean exit.
    pub fn finish(mut self) {
        drop(self.stdin.take());
        let out = self.child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "agent: {:?}: {err}", out.status);
    }

    /// Kills the agent where it stands (a crash).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
