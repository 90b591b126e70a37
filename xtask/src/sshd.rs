//! A private sshd on 127.0.0.1 for benchmarks: temporary host key, a client
//! key in its authorized_keys, and an ssh_config that reaches it (directly
//! or through a proxy port).

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Sshd {
    pub port: u16,
    pub dir: PathBuf,
    child: Child,
}

fn keygen(path: &Path) -> anyhow::Result<()> {
    crate::procs::setup(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path),
    )?;
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Sshd {
    pub fn start(dir: &Path) -> anyhow::Result<Sshd> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir_all(dir)?;
        keygen(&dir.join("host_key"))?;
        keygen(&dir.join("client_key"))?;
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))?;
        std::fs::create_dir_all("/run/sshd").ok();
        let port = free_port()?;
        let cfg = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n\
             Ciphers aes128-gcm@openssh.com,chacha20-poly1305@openssh.com\nMaxStartups 100\nMaxSessions 100\nLogLevel ERROR\n",
            d = dir.display()
        );
        std::fs::write(dir.join("sshd_config"), cfg)?;
        let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("sshd not found: run packaging/setup.sh (installs openssh-server)")?;
        let child = Command::new(sshd)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(dir.join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "sshd did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Sshd {
            port,
            dir: dir.to_path_buf(),
            child,
        })
    }

    /// Writes an ssh_config with host alias `name` reaching this sshd
    /// through `port` (the sshd's own, or a proxy's); returns its path.
    pub fn client_config(&self, name: &str, port: u16) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(format!("ssh_config_{name}"));
        std::fs::write(
            &path,
            format!(
                "Host {name}\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {d}/client_key\n  IdentitiesOnly yes\n  \
                 StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  Ciphers aes128-gcm@openssh.com\n  \
                 ControlMaster no\n",
                d = self.dir.display()
            ),
        )?;
        Ok(path)
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client_key")
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
