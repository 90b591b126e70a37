//! The other site of a switchover (DESIGN §10): `georep …` commands run
//! there over the operator's own SSH access (the system ssh client with
//! their config, keys and ssh-agent, or `--identity`), never through a
//! session key: the key `create --push-pem` installs runs only the agent
//! (a forced command), and the agent writes nothing outside its root, so it
//! cannot create a session there.

use crate::error::Retry;
use crate::fs::role::RoleRecord;
use crate::session::Config;
use crate::transport::ssh::{setup, SshError, SshTarget};
use std::path::PathBuf;
use std::process::{Output, Stdio};

/// What the probe prints first when the access runs commands.
const PROBE: &str = "georep-peer-admin-ok";

/// Set for a `georep` command run there: it exits when its input (the
/// ssh channel) reaches EOF, i.e. when the ssh client goes away (killed,
/// or the connection cut), so that a killed switchover leaves no step
/// running on its own on the other site while it is run again.
pub const TIE_ENV: &str = "GEOREP_EXIT_ON_EOF";

/// Why a step on the other site failed; one line naming the fix.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// ssh itself failed (connection, host key, authentication).
    #[error("{0}")]
    Ssh(#[from] SshError),
    /// The access runs a forced command (georep's agent), not commands.
    #[error("{target} runs only a forced command (georep's agent key) with this access, not commands: {fix}")]
    Restricted { target: String, fix: String },
    /// The command ran there and failed.
    #[error("`{command}` on {target} failed (exit {code}): {said}")]
    Failed {
        target: String,
        command: String,
        code: i32,
        said: String,
    },
}

impl PeerError {
    pub fn retry(&self) -> Retry {
        match self {
            PeerError::Ssh(e) => e.retry(),
            PeerError::Restricted { .. } => Retry::Permanent,
            PeerError::Failed { code, .. } if *code == crate::error::exit::TEMPORARY => {
                Retry::Temporary
            }
            PeerError::Failed { code, .. } if *code < 0 || *code == 255 => Retry::Temporary,
            PeerError::Failed { .. } => Retry::Permanent,
        }
    }

    /// Bad input or configuration (exit 2 there, or a restricted access).
    pub fn is_usage(&self) -> bool {
        matches!(self, PeerError::Restricted { .. })
            || matches!(self, PeerError::Failed { code, .. } if *code == crate::error::exit::USAGE)
    }
}

/// The operator's access to the other site, and georep there.
pub struct Peer {
    target: SshTarget,
}

fn last_line(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    s.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("(no message)")
        .to_string()
}

impl Peer {
    /// `target`'s user, host, port, identity and known_hosts are the
    /// operator's access; `remote_georep` the program there.
    pub fn new(target: SshTarget) -> Peer {
        Peer { target }
    }

    pub fn display(&self) -> String {
        match &self.target.user {
            Some(u) => format!("{u}@{}", self.target.host),
            None => self.target.host.clone(),
        }
    }

    /// Runs `remote` (a shell command line) there; Ok(output) when ssh
    /// itself worked (whatever the command's exit code). With `tie`, the
    /// ssh client's input stays open while it runs (see [`TIE_ENV`]);
    /// without, it is closed at once (a forced command's agent that
    /// answers a probe ends on that EOF).
    fn ssh(&self, remote: &str, tie: bool) -> Result<Output, PeerError> {
        let local = |source| SshError::Local {
            what: "running ssh (install openssh-client)".into(),
            source,
        };
        let mut child = setup::operator_ssh(&self.target)
            .arg(remote)
            .stdin(if tie { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(local)?;
        let stdin = child.stdin.take();
        let read = |r: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut buf);
                }
                buf
            })
        };
        let out = read(child.stdout.take().map(|r| Box::new(r) as _));
        let err = read(child.stderr.take().map(|r| Box::new(r) as _));
        let status = child.wait().map_err(local)?;
        drop(stdin);
        let out = Output {
            status,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        };
        if out.status.code() == Some(255) || out.status.code().is_none() {
            return Err(self.ssh_error(&out.stderr));
        }
        Ok(out)
    }

    /// What ssh's stderr says went wrong, as one line.
    fn ssh_error(&self, stderr: &[u8]) -> PeerError {
        let mut t = self.target.error_target();
        t.display = self.display();
        t.auth_fix = "the steps on the other site run with your own SSH access to it (not a session key): make `ssh` to it work without a password (a key in ssh-agent, or --identity FILE), or name another account with --peer-admin USER@HOST".into();
        SshError::from_ssh(&t, &String::from_utf8_lossy(stderr)).into()
    }

    /// `georep ARGS` there, tied to this ssh client (see [`TIE_ENV`]).
    fn line(&self, args: &[String]) -> String {
        let mut line = format!(
            "env {TIE_ENV}=1 {}",
            setup::sh_quote(&self.target.remote_georep)
        );
        for a in args {
            line.push(' ');
            line.push_str(&setup::sh_quote(a));
        }
        line
    }

    /// Checks that this access runs commands (and georep); `fix` is the
    /// line's advice when it runs only a forced command. The first line
    /// decides: a forced command's agent answers with its greeting and
    /// waits, so ssh is ended as soon as the line is not the probe's.
    pub fn probe(&self, fix: &str) -> Result<(), PeerError> {
        use std::io::BufRead;
        let local = |source| SshError::Local {
            what: "running ssh (install openssh-client)".into(),
            source,
        };
        let remote = format!(
            "echo {PROBE}; exec {} --version",
            setup::sh_quote(&self.target.remote_georep)
        );
        let mut child = setup::operator_ssh(&self.target)
            .arg(remote)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(local)?;
        let mut stderr = child.stderr.take().expect("piped");
        let err = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = std::io::Read::read_to_end(&mut stderr, &mut buf);
            buf
        });
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let mut first = String::new();
        let _ = stdout.read_line(&mut first);
        let runs_commands = first.trim_end() == PROBE;
        if !runs_commands && !first.is_empty() {
            let _ = child.kill();
        }
        let mut rest = Vec::new();
        if runs_commands {
            let _ = std::io::Read::read_to_end(&mut stdout, &mut rest);
        }
        let status = child.wait().map_err(local)?;
        let stderr = err.join().unwrap_or_default();
        if first.is_empty() && matches!(status.code(), Some(255) | None) {
            return Err(self.ssh_error(&stderr));
        }
        if !runs_commands {
            return Err(PeerError::Restricted {
                target: self.display(),
                fix: fix.to_string(),
            });
        }
        if !status.success() {
            return Err(SshError::NoGeorep {
                target: self.display(),
                said: last_line(&stderr),
            }
            .into());
        }
        Ok(())
    }

    /// `georep ARGS` there; its stdout when it exits 0.
    pub fn georep(&self, args: &[String]) -> Result<String, PeerError> {
        let line = self.line(args);
        let out = self.ssh(&line, true)?;
        if !out.status.success() {
            return Err(PeerError::Failed {
                target: self.display(),
                command: format!("georep {}", args.join(" ")),
                code: out.status.code().unwrap_or(-1),
                said: last_line(&out.stderr),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The config of session `name` there, or None if it has none.
    pub fn session(&self, name: &str) -> Result<Option<Config>, PeerError> {
        match self.georep(&["config".into(), name.into()]) {
            Ok(text) => {
                let path = std::path::Path::new("config.toml");
                crate::session::parse_config(path, &text)
                    .map(Some)
                    .map_err(|e| PeerError::Failed {
                        target: self.display(),
                        command: format!("georep config {name}"),
                        code: 0,
                        said: e.to_string(),
                    })
            }
            Err(PeerError::Failed { code: 2, said, .. }) if said.contains("no session") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The role of `root` there (its `.georep/role.json`), None without one.
    pub fn role(&self, root: &str) -> Result<Option<RoleRecord>, PeerError> {
        let file = format!(
            "{}/{}/{}",
            root.trim_end_matches('/'),
            crate::fs::role::STATE_DIR,
            crate::fs::role::ROLE_FILE
        );
        let q = setup::sh_quote(&file);
        let out = self.ssh(
            &format!("if [ -e {q} ]; then cat -- {q}; else echo none; fi"),
            false,
        )?;
        let failed = |said: String| PeerError::Failed {
            target: self.display(),
            command: format!("cat {file}"),
            code: out.status.code().unwrap_or(-1),
            said,
        };
        if !out.status.success() {
            return Err(failed(last_line(&out.stderr)));
        }
        if out.stdout.trim_ascii() == b"none" {
            return Ok(None);
        }
        serde_json::from_slice(&out.stdout)
            .map(Some)
            .map_err(|e| failed(format!("not a georep role file: {e}")))
    }
}

/// The options of a switchover for the other site.
#[derive(Debug, Clone, Default)]
pub struct SshOptions {
    /// `[USER@]HOST`: the operator's shell access to the slave's site
    /// (default: the session's slave user and host).
    pub peer_admin: Option<String>,
    /// The operator's key for `peer_admin` (default: ssh's config and agent).
    pub identity: Option<PathBuf>,
    /// `[USER@]HOST:PATH`: this master as the slave's site reaches it.
    pub reverse_slave: Option<String>,
    /// Install a key for the reverse session (its `create --push-pem`).
    pub push_pem: bool,
    /// The SSH port of this site, as the slave's site reaches it.
    pub reverse_ssh_port: Option<u16>,
    /// A key on the slave's site for reaching this one (its `create --identity`).
    pub reverse_identity: Option<String>,
    /// The georep program on this site (default: this program's path).
    pub reverse_remote_georep: Option<String>,
}

impl SshOptions {
    pub fn any(&self) -> bool {
        self.peer_admin.is_some()
            || self.identity.is_some()
            || self.reverse_slave.is_some()
            || self.push_pem
            || self.reverse_ssh_port.is_some()
            || self.reverse_identity.is_some()
            || self.reverse_remote_georep.is_some()
    }
}
