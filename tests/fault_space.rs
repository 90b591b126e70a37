//! A DR site whose disk fills: the slave is a small tmpfs (real user
//! xattrs, a real ENOSPC). One clear line names the space problem, the
//! daemon's worker is Faulty "slave full", nothing partial or corrupt is
//! visible, and replication converges once space is freed.

mod common;

use common::daemon::wait_same;
use common::{mutate, stderr, tree, World};
use std::path::Path;
use std::process::Command;

/// A tmpfs of `mib` MiB mounted on `dir`; unmounted when dropped.
struct Tmpfs<'a> {
    dir: &'a Path,
}

impl<'a> Tmpfs<'a> {
    fn mount(dir: &'a Path, mib: u64) -> Tmpfs<'a> {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test mounts a tmpfs as the slave: run it as root (packaging/test.sh does)"
        );
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=755"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .expect("mount: install util-linux");
        assert!(out.status.success(), "mount tmpfs: {}", stderr(&out));
        Tmpfs { dir }
    }

    fn resize(&self, mib: u64) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(self.dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "remount: {}", stderr(&out));
    }
}

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir).status();
    }
}

/// Every slave file is absent or byte for byte the master's, and no temporary is visible.
fn nothing_partial(w: &World) {
    assert!(
        tree::temporaries(&w.slave).is_empty(),
        "temporaries visible: {:?}",
        tree::temporaries(&w.slave)
    );
    let m = tree::snapshot(&w.master);
    for (path, snap) in tree::snapshot(&w.slave) {
        let Some(ms) = m.get(&path) else {
            panic!("extra on slave: {}", String::from_utf8_lossy(&path));
        };
        assert_eq!(
            snap.node,
            ms.node,
            "{}: corrupt or partial on the slave",
            String::from_utf8_lossy(&path)
        );
    }
}

fn fill_master(w: &World) {
    for d in 0..3 {
        let dir = w.master.join(format!("host{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..3 {
            let seed = (d * 10 + f) as u64;
            std::fs::write(
                dir.join(format!("disk{f}.img")),
                mutate::data(seed, 700_000),
            )
            .unwrap();
        }
    }
}

#[test]
fn a_full_slave_is_one_clear_line_faulty_slave_full_nothing_partial_and_converges_once_freed() {
    let w = World::new();
    let fs = Tmpfs::mount(&w.slave, 3);
    fill_master(&w);
    w.create("full", &[]);

    // One-shot sync: exit 3 (temporary), one line naming the problem.
    let out = w.run(&["sync", "full"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
    assert!(
        err.contains("slave full") && err.contains("No space left") && err.contains("free space"),
        "{err}"
    );
    nothing_partial(&w);
    let shipped = tree::snapshot(&w.slave).len();
    assert!(shipped > 0, "nothing fitted at all: the test proves little");

    // The daemon: Faulty, saying why, retrying by itself.
    let _r = w.start("full");
    let st = w.wait_status("full", "Faulty: slave full", |s| {
        s["worker_status"] == "Faulty"
            && s["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("slave full"))
    });
    assert_eq!(
        st["restarts"], 0,
        "a full slave is retried by the worker: {st:#}"
    );
    nothing_partial(&w);

    // Space freed: it converges without anyone restarting anything.
    fs.resize(64);
    wait_same(&w.master, &w.slave, "after space was freed");
    w.wait_status("full", "Active again", |s| s["worker_status"] == "Active");
    assert!(tree::temporaries(&w.slave).is_empty());
}
