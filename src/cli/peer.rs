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
use std::process::{Output, Stdio};

/// What the probe prints first when the access runs commands.
const PROBE: &str = "georep-peer-admin-ok";

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
    /// itself worked (whatever the command's exit code).
    fn ssh(&self, remote: &str) -> Result<Output, PeerError> {
        let mut cmd = setup::operator_ssh(&self.target);
        cmd.arg(remote)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = cmd.output().map_err(|source| SshError::Local {
            what: "running ssh (install openssh-client)".into(),
            source,
        })?;
        if out.status.code() == Some(255) || out.status.code().is_none() {
            let mut t = self.target.error_target();
            t.display = self.display();
            t.auth_fix = "the steps on the other site run with your own SSH access to it (not a session key): make `ssh` to it work without a password (a key in ssh-agent, or --identity FILE), or name another account with --peer-admin USER@HOST".into();
            return Err(SshError::from_ssh(&t, &String::from_utf8_lossy(&out.stderr)).into());
        }
        Ok(out)
    }

    fn line(&self, args: &[String]) -> String {
        std::iter::once(&self.target.remote_georep)
            .chain(args)
            .map(|a| setup::sh_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Checks that this access runs commands (and georep); `fix` is the
    /// line's advice when it runs only a forced command.
    pub fn probe(&self, fix: &str) -> Result<(), PeerError> {
        let out = self.ssh(&format!(
            "echo {PROBE}; exec {} --version",
            setup::sh_quote(&self.target.remote_georep)
        ))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if stdout.lines().next() != Some(PROBE) {
            return Err(PeerError::Restricted {
                target: self.display(),
                fix: fix.to_string(),
            });
        }
        if !out.status.success() {
            return Err(SshError::NoGeorep {
                target: self.display(),
                said: last_line(&out.stderr),
            }
            .into());
        }
        Ok(())
    }

    /// `georep ARGS` there; its stdout when it exits 0.
    pub fn georep(&self, args: &[String]) -> Result<String, PeerError> {
        let line = self.line(args);
        let out = self.ssh(&line)?;
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
        let out = self.ssh(&format!(
            "if [ -e {q} ]; then cat -- {q}; else echo none; fi"
        ))?;
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
