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
        for _ in 0..200 {
            match RawAgent::try_start(root) {
                Ok(a) => return a,
                Err(e) if e.kind == georep::protocol::ErrorKind::Busy => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                Err(e) => panic!("agent refused the handshake: {e:?}"),
            }
        }
        panic!("the slave root stayed busy");
    }

    fn try_start(root: &Path) -> Result<RawAgent, georep::protocol::WireError> {
        RawAgent::start_with(
            root,
            Request::Hello {
                version: georep::protocol::PROTOCOL_VERSION,
                client: "test".into(),
            },
        )
    }

    /// Starts an agent whose first request is `hello` (e.g. a
    /// `HelloStream` joining a stream group); its error if refused.
    pub fn start_with(
        root: &Path,
        hello: Request,
    ) -> Result<RawAgent, georep::protocol::WireError> {
        let mut child = Command::new(super::georep_bin())
            .args(["agent", "--root"])
            .arg(root)
            .args(["--keepalive", "60"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
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
        let r = a.call(hello);
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
        let id = self.next_id;
        self.next_id += 1;
        let f = self.frame(body, id);
        self.send_raw(&f);
        self.reply_to(id).expect("a reply")
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
