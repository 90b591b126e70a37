//! A real OpenSSH server for tests: `sshd -D` on 127.0.0.1 on a free port,
//! with its own temporary host key, sshd_config and authorized_keys (an
//! "operator" key is authorized in it), killed on drop.

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// The operator's key: authorized for the test user, used for --push-pem.
    pub operator_key: PathBuf,
    pub authorized_keys: PathBuf,
    pub user: String,
    /// Extra `NAME=VALUE`s every session gets (sshd's SetEnv).
    env: Vec<String>,
    child: Option<Child>,
}

fn sshd_bin() -> PathBuf {
    for p in ["/usr/sbin/sshd", "/usr/bin/sshd", "/sbin/sshd"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("sshd not found: install openssh-server (packaging/setup.sh does)");
}

pub fn keygen(path: &Path, comment: &str) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen: install openssh-client (packaging/setup.sh does)");
    assert!(out.status.success(), "ssh-keygen: {out:?}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Sshd {
    /// Starts a server with a new host key.
    pub fn start() -> Sshd {
        Sshd::start_with_env(&[])
    }

    /// Starts a server whose sessions get `env` too, e.g. `GEOREP_HOME`
    /// of another "site" on this machine.
    pub fn start_with_env(env: &[(&str, &Path)]) -> Sshd {
        let dir = tempfile::Builder::new()
            .prefix("sshd")
            .tempdir_in(super::scratch_base())
            .unwrap();
        keygen(&dir.path().join("host_key"), "test host");
        let operator_key = dir.path().join("operator_key");
        keygen(&operator_key, "operator");
        let authorized_keys = dir.path().join("authorized_keys");
        std::fs::copy(operator_key.with_extension("pub"), &authorized_keys).unwrap();
        let user = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .unwrap()
            .expect("test user in passwd")
            .name;
        if nix::unistd::geteuid().is_root() {
            // sshd's privilege separation directory.
            let _ = std::fs::create_dir_all("/run/sshd");
        }
        let mut s = Sshd {
            dir,
            port: 0,
            operator_key,
            authorized_keys,
            user,
            env: env
                .iter()
                .map(|(k, v)| format!("{k}={}", v.display()))
                .collect(),
            child: None,
        };
        for _ in 0..5 {
            let port = free_port();
            if s.launch(port) {
                return s;
            }
        }
        panic!("sshd did not start: {}", s.log());
    }

    /// Stops the server and starts it again on the same port with a new host key.
    pub fn restart_with_new_host_key(&mut self) {
        self.stop();
        let hk = self.dir.path().join("host_key");
        std::fs::remove_file(&hk).unwrap();
        std::fs::remove_file(hk.with_extension("pub")).unwrap();
        keygen(&hk, "new test host");
        assert!(self.launch(self.port), "sshd restart: {}", self.log());
    }

    fn launch(&mut self, port: u16) -> bool {
        let d = self.dir.path();
        let config = d.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile none\n\
                 AuthorizedKeysFile {ak}\nStrictModes no\nPubkeyAuthentication yes\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\nUsePAM no\nPrintMotd no\n\
                 SetEnv GEOREP_AUTHORIZED_KEYS={ak}{env}\nMaxStartups 64:30:128\nMaxSessions 64\n\
                 LogLevel VERBOSE\n",
                hk = d.join("host_key").display(),
                ak = self.authorized_keys.display(),
                env = self.env.iter().map(|e| format!(" {e}")).collect::<String>(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(d.join("sshd.log")).unwrap();
        let child = Command::new(sshd_bin())
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sshd");
        self.child = Some(child);
        self.port = port;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false;
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut b = [0u8; 7];
                if s.read_exact(&mut b).is_ok() && &b == b"SSH-2.0" {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// `user@127.0.0.1:PATH`.
    pub fn spec(&self, path: &Path) -> String {
        format!("{}@127.0.0.1:{}", self.user, path.display())
    }

    /// Lines of authorized_keys.
    pub fn authorized_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.authorized_keys)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// A plain ssh client with `key`, accepting this server's key into a
    /// file of the test's own (never ~/.ssh).
    pub fn ssh(&self, key: &Path) -> Command {
        let mut c = Command::new("ssh");
        c.args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=accept-new",
        ])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            self.dir.path().join("client_known_hosts").display()
        ))
        .args(["-o", "IdentitiesOnly=yes", "-i"])
        .arg(key)
        .args(["-p", &self.port.to_string(), "-l", &self.user, "127.0.0.1"]);
        c
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `georep create` arguments for an SSH slave at `path`, with push-pem
/// through the operator's key and the test's georep binary on the slave.
pub fn create_args(sshd: &Sshd, session: &str, master: &Path, path: &Path) -> Vec<String> {
    vec![
        "create".into(),
        session.into(),
        master.display().to_string(),
        sshd.spec(path),
        "--push-pem".into(),
        "--ssh-port".into(),
        sshd.port.to_string(),
        "--identity".into(),
        sshd.operator_key.display().to_string(),
        "--remote-georep".into(),
        super::georep_bin().display().to_string(),
    ]
}
