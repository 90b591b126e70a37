//! A tmpfs mounted for one test (the tests run as root): a second file
//! system under a slave root, or one whose files take large user xattrs.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted tmpfs, unmounted (lazily) when dropped.
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_mib` MiB on `path` (created if missing).
    pub fn mount(path: &Path, size_mib: u64) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_mib}m,mode=0755"))
            .arg("tmpfs")
            .arg(path)
            .output()
            .expect("running mount (util-linux)");
        assert!(
            out.status.success(),
            "mounting a tmpfs on {} failed: {}: this test needs root (it mounts file systems)",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
