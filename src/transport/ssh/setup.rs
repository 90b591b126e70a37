//! `georep create` for an SSH slave: the session's own key pair
//! (`--push-pem`), its installation on the slave as a forced command
//! through the operator's existing access, and the check of the slave
//! before the session is written.

use super::{HostKeys, SshError, SshTarget};
use crate::fs::relpath::RelPath;
use crate::protocol::{ErrorKind, ProtoError, Reply, Request};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The session's private key, in its state directory (mode 600).
pub const KEY_FILE: &str = "ssh_key";
/// The host keys this session trusts, recorded at create.
pub const KNOWN_HOSTS_FILE: &str = "known_hosts";
/// Options of the installed key: it can run the agent on its root and nothing else.
pub const KEY_OPTIONS: &str =
    "no-pty,no-port-forwarding,no-X11-forwarding,no-agent-forwarding,no-user-rc";

/// What `create` checked on the slave.
#[derive(Debug, Clone)]
pub struct SlaveCheck {
    pub agent_version: String,
    pub root: String,
    pub avail_bytes: u64,
    pub total_bytes: u64,
}

/// How to set the slave up.
#[derive(Debug, Clone)]
pub struct SetupOptions {
    /// Generate and install a session key.
    pub push_pem: bool,
    /// Check the slave before the session is created.
    pub verify: bool,
    /// The name that tags the installed key line (`georep:SESSION@HOST:HOME`).
    pub tag: String,
    /// Seconds the forced command's agent waits for a frame before exiting.
    pub agent_keepalive_secs: u64,
    pub keepalive: Duration,
    /// The session and epoch of a plain session from a promoted store: when
    /// the write check is fenced (the slave is a root demoted by a
    /// switchover, unclaimed by this session yet), the check claims the
    /// root for the session, as its first sync would, and tries again.
    /// A failback session's claim carries its failback (without points:
    /// only its first sync builds the quarantine).
    pub claim: Option<(uuid::Uuid, u64, Option<crate::protocol::FailbackClaim>)>,
}

/// Prepares the SSH side of a new session whose files are being assembled
/// in `staging` (renamed to `final_dir` once everything succeeded).
/// `target` names the operator's access (their `--identity` or default
/// keys). Returns the identity the worker will use and what was checked.
/// On failure, a key installed here is removed again (best effort).
pub fn prepare(
    staging: &Path,
    final_dir: &Path,
    mut target: SshTarget,
    opts: &SetupOptions,
) -> Result<(Option<PathBuf>, Option<SlaveCheck>), SshError> {
    target.known_hosts = staging.join(KNOWN_HOSTS_FILE);
    if !opts.push_pem {
        let check = if opts.verify {
            Some(run(verify(&target, HostKeys::LearnNew, opts))?)
        } else {
            None
        };
        return Ok((target.identity, check));
    }
    let key = staging.join(KEY_FILE);
    generate_key(&key, &opts.tag)?;
    let public =
        std::fs::read_to_string(key.with_extension("pub")).map_err(|source| SshError::Local {
            what: format!("reading {}.pub", key.display()),
            source,
        })?;
    let line = authorized_line(&target, opts.agent_keepalive_secs, public.trim());
    install(&target, &opts.tag, &line, Op::Install)?;
    let mut worker = target.clone();
    worker.identity = Some(key);
    worker.session_key = true;
    let check = if opts.verify {
        match run(verify(&worker, HostKeys::Pinned, opts)) {
            Ok(c) => Some(c),
            Err(e) => {
                if let Err(undo) = install(&target, &opts.tag, &line, Op::Remove) {
                    tracing::warn!(error = %undo, "could not remove the key installed on the slave");
                }
                return Err(e);
            }
        }
    } else {
        None
    };
    Ok((Some(final_dir.join(KEY_FILE)), check))
}

fn run<T>(f: impl std::future::Future<Output = Result<T, SshError>>) -> Result<T, SshError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| SshError::Local {
            what: "starting the async runtime".into(),
            source,
        })?
        .block_on(f)
}

/// `ssh-keygen -t ed25519` without a passphrase: the worker runs unattended.
fn generate_key(key: &Path, tag: &str) -> Result<(), SshError> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", tag, "-f"])
        .arg(key)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| SshError::Local {
            what: "running ssh-keygen (install openssh-client)".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(SshError::Local {
            what: format!("ssh-keygen for {}", key.display()),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        });
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        SshError::Local {
            what: format!("chmod 600 {}", key.display()),
            source,
        }
    })
}

/// Quotes `s` for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The authorized_keys line: the session key may run the agent on its root, nothing else.
pub fn authorized_line(target: &SshTarget, agent_keepalive_secs: u64, public_key: &str) -> String {
    let command = format!(
        "{} agent --root {} --keepalive {agent_keepalive_secs}",
        sh_quote(&target.remote_georep),
        sh_quote(&target.root)
    );
    // sshd un-escapes only \" inside command="...".
    format!(
        "command=\"{}\",{KEY_OPTIONS} {public_key}",
        command.replace('"', "\\\"")
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Install,
    Remove,
}

/// Run with the operator's access: creates the root if missing, and
/// replaces any line tagged `$1` in the slave user's authorized_keys by the
/// line on stdin (so a second create leaves one line, not two).
/// `GEOREP_AUTHORIZED_KEYS` (set on the slave, e.g. by sshd's SetEnv)
/// names the file when sshd's AuthorizedKeysFile is not the default.
const INSTALL_SCRIPT: &str = r#"set -eu
tag=$1 root=$2
IFS= read -r line
[ -d "$root" ] || mkdir -- "$root"
f=${GEOREP_AUTHORIZED_KEYS:-$HOME/.ssh/authorized_keys}
d=$(dirname -- "$f")
[ -d "$d" ] || { mkdir -p -- "$d"; chmod 700 -- "$d"; }
umask 077
if [ -f "$f" ] && awk -v t="$tag" '$NF == t { found = 1 } END { exit !found }' "$f"; then
  tmp="$f.georep-tmp.$$"
  awk -v t="$tag" '$NF != t' "$f" > "$tmp"
  printf '%s\n' "$line" >> "$tmp"
  mv -f -- "$tmp" "$f"
else
  if [ -s "$f" ] && [ -n "$(tail -c 1 -- "$f")" ]; then printf '\n' >> "$f"; fi
  printf '%s\n' "$line" >> "$f"
fi
"#;

/// Removes the line on stdin (matched by tag and whole content), if present.
const REMOVE_SCRIPT: &str = r#"set -eu
tag=$1
IFS= read -r line
f=${GEOREP_AUTHORIZED_KEYS:-$HOME/.ssh/authorized_keys}
[ -f "$f" ] || exit 0
umask 077
tmp="$f.georep-tmp.$$"
awk -v t="$tag" -v l="$line" '!($NF == t && $0 == l)' "$f" > "$tmp"
mv -f -- "$tmp" "$f"
"#;

/// An `ssh` command with the operator's own set-up (their config, default
/// keys, ssh-agent, or `target.identity`), in batch mode, ending with
/// `-- HOST`: append the remote command line.
pub fn operator_ssh(target: &SshTarget) -> Command {
    let mut cmd = Command::new("ssh");
    for o in [
        "BatchMode=yes",
        "StrictHostKeyChecking=accept-new",
        "ConnectTimeout=20",
        "ServerAliveInterval=10",
        "ForwardAgent=no",
        "ForwardX11=no",
        "ClearAllForwardings=yes",
        "RequestTTY=no",
        "LogLevel=ERROR",
    ] {
        cmd.arg("-o").arg(o);
    }
    cmd.arg("-o").arg(format!(
        "UserKnownHostsFile=\"{}\" ~/.ssh/known_hosts",
        target.known_hosts.display()
    ));
    if let Some(id) = &target.identity {
        cmd.arg("-o").arg("IdentitiesOnly=yes").arg("-i").arg(id);
    }
    if let Some(p) = target.port {
        cmd.arg("-p").arg(p.to_string());
    }
    if let Some(u) = &target.user {
        cmd.arg("-l").arg(u);
    }
    cmd.arg("--").arg(&target.host);
    cmd
}

/// Runs the install (or removal) script on the slave with the operator's
/// own ssh set-up (their config, default keys, ssh-agent, or `--identity`).
fn install(target: &SshTarget, tag: &str, line: &str, op: Op) -> Result<(), SshError> {
    let script = if op == Op::Install {
        INSTALL_SCRIPT
    } else {
        REMOVE_SCRIPT
    };
    let remote = format!(
        "sh -c {} georep-setup {} {}",
        sh_quote(script),
        sh_quote(tag),
        sh_quote(&target.root)
    );
    let mut cmd = operator_ssh(target);
    cmd.arg(remote);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| SshError::Local {
        what: "running ssh (install openssh-client)".into(),
        source,
    })?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("piped");
        let _ = stdin.write_all(format!("{line}\n").as_bytes());
    }
    let out = child.wait_with_output().map_err(|source| SshError::Local {
        what: "waiting for ssh".into(),
        source,
    })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut t = target.error_target();
    t.auth_fix = "the key is installed with your own access to the slave: make `ssh` to it work without a password first (a key in ssh-agent, or --identity FILE)".into();
    if out.status.code() == Some(255) {
        return Err(SshError::from_ssh(&t, &stderr));
    }
    Err(SshError::Check {
        target: t.display,
        detail: format!(
            "installing the session key failed: {}: check that the slave user can create {} and write its ~/.ssh/authorized_keys",
            stderr.trim().replace('\n', " | "),
            target.root
        ),
    })
}

/// Connects with `target`'s key, runs the handshake, and checks that the
/// root is writable and how much space it has.
async fn verify(
    target: &SshTarget,
    keys: HostKeys,
    opts: &SetupOptions,
) -> Result<SlaveCheck, SshError> {
    let conn = target.connect(keys, opts.keepalive).await?;
    let display = target.display();
    let check = |detail: String| SshError::Check {
        target: display.clone(),
        detail,
    };
    let client = conn.client.clone();
    let (avail_bytes, total_bytes) = match client.call(Request::StatFs).await {
        Ok(Reply::StatFs { avail, total }) => (avail, total),
        Ok(other) => {
            return Err(check(format!(
                "unexpected answer {other:?} to a space query"
            )))
        }
        Err(e) => return Err(check(format!("space query: {e}"))),
    };
    let probe = RelPath::new(b"georep-write-check".to_vec()).expect("valid");
    let open = || {
        client.call(Request::OpenFile {
            fid: 1,
            path: probe.clone(),
            basis: None,
            size: 0,
        })
    };
    let mut opened = open().await;
    if let (Err(ProtoError::Remote(w)), Some((session, epoch, failback))) =
        (&opened, opts.claim.clone())
    {
        if w.kind == ErrorKind::Fenced {
            let claimed = client
                .call(Request::Claim {
                    session,
                    epoch,
                    failback,
                })
                .await;
            if let Err(e) = claimed {
                return Err(check(format!("{e}")));
            }
            opened = open().await;
        }
    }
    if let Err(e) = opened {
        return Err(check(format!(
            "root {} is not writable: {e}: give the slave user write access to it",
            target.root
        )));
    }
    let _ = client.call(Request::Abort { fid: 1 }).await;
    let agent_version = client.agent_version().to_string();
    drop(client);
    conn.close(Duration::from_secs(10)).await;
    Ok(SlaveCheck {
        agent_version,
        root: target.root.clone(),
        avail_bytes,
        total_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forced_command_line_quotes_the_root() {
        let t = SshTarget {
            user: None,
            host: "h".into(),
            port: None,
            root: "/srv/it's \"here\"".into(),
            identity: None,
            known_hosts: "/k".into(),
            remote_georep: "georep".into(),
            session_key: false,
        };
        let l = authorized_line(&t, 120, "ssh-ed25519 AAAA georep:s@m");
        assert_eq!(
            l,
            r#"command="'georep' agent --root '/srv/it'\''s \"here\"' --keepalive 120",no-pty,no-port-forwarding,no-X11-forwarding,no-agent-forwarding,no-user-rc ssh-ed25519 AAAA georep:s@m"#
        );
    }
}
