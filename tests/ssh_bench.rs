//! Rough benchmarks for SSH slaves (ignored by default; numbers are
//! printed, never asserted). Run on a quiet machine with
//!
//!     cargo test --release --test ssh_bench -- --ignored --nocapture
//!
//! - a new 1 GiB file over ssh on loopback: georep vs `rsync -a` vs the
//!   link's limit (`cat file | ssh host 'cat > file'`), all with aes128-gcm;
//! - 5,000 files of 1-64 KiB through a 50 ms-each-way proxy: georep vs rsync.

mod common;

use common::proxy::Proxy;
use common::sshd::Sshd;
use common::World;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn fill(path: &Path, len: usize, mut seed: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for c in buf.chunks_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            c.copy_from_slice(&seed.to_le_bytes()[..c.len()]);
        }
        let n = left.min(buf.len());
        f.write_all(&buf[..n]).unwrap();
        left -= n;
    }
}

fn ssh_cmd(sshd: &Sshd, port: u16) -> String {
    format!(
        "ssh -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -c aes128-gcm@openssh.com -i {} -p {port}",
        sshd.operator_key.display()
    )
}

fn timed(what: &str, bytes: u64, f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    let d = t.elapsed();
    println!(
        "{what:<44} {:>8.2} s {:>8.1} MB/s",
        d.as_secs_f64(),
        bytes as f64 / d.as_secs_f64() / 1e6
    );
    d
}

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "{cmd}");
}

#[test]
#[ignore]
fn bench_one_gib_file_over_loopback_ssh() {
    let sshd = Sshd::start();
    let w = World::new();
    let len = 1usize << 30;
    fill(&w.master.join("big.img"), len, 0x9e3779b97f4a7c15);
    let ssh = ssh_cmd(&sshd, sshd.port);
    let dst = |name: &str| {
        let d = w.dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    println!("new 1 GiB file, ssh on loopback (cipher aes128-gcm):");
    let (rs, ct) = (dst("rsync"), dst("cat"));
    timed("cat file | ssh host 'cat > file'", len as u64, || {
        sh(&format!(
            "cat {} | {ssh} {}@127.0.0.1 'cat > {}/big.img'",
            w.master.join("big.img").display(),
            sshd.user,
            ct.display()
        ))
    });
    timed("rsync -a", len as u64, || {
        sh(&format!(
            "rsync -a -e '{ssh}' {} {}@127.0.0.1:{}/",
            w.master.join("big.img").display(),
            sshd.user,
            rs.display()
        ))
    });
    let args = common::sshd::create_args(&sshd, "b", &w.master, &w.slave);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    w.run_ok(&args);
    let t = Instant::now();
    let s = w.sync("b");
    let d = t.elapsed();
    println!(
        "{:<44} {:>8.2} s {:>8.1} MB/s  (wire out {} bytes)",
        "georep sync (create excluded)",
        d.as_secs_f64(),
        len as f64 / d.as_secs_f64() / 1e6,
        s["wire_bytes_out"]
    );
}

#[test]
#[ignore]
fn bench_five_thousand_files_through_a_50ms_proxy() {
    let sshd = Sshd::start();
    let proxy = Proxy::start(sshd.port, Duration::from_millis(50));
    let w = World::new();
    let mut total = 0u64;
    let mut seed = 0x2545f4914f6cdd1du64;
    for i in 0..5000 {
        let dir = w.master.join(format!("h{:02}", i % 50));
        std::fs::create_dir_all(&dir).unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = 1024 + (seed % (63 * 1024)) as usize;
        fill(&dir.join(format!("f{i:05}")), len, seed);
        total += len as u64;
    }
    println!(
        "5,000 files of 1-64 KiB ({:.0} MB) through a 50 ms-each-way proxy:",
        total as f64 / 1e6
    );
    let rs = w.dir.path().join("rsync");
    std::fs::create_dir_all(&rs).unwrap();
    let ssh = ssh_cmd(&sshd, proxy.port);
    timed("rsync -a", total, || {
        sh(&format!(
            "rsync -a -e '{ssh}' {}/ {}@127.0.0.1:{}/",
            w.master.display(),
            sshd.user,
            rs.display()
        ))
    });
    let mut args = common::sshd::create_args(&sshd, "p", &w.master, &w.slave);
    let i = args.iter().position(|a| a == "--ssh-port").unwrap();
    args[i + 1] = proxy.port.to_string();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    w.run_ok(&args);
    timed("georep sync (create excluded)", total, || {
        let s = w.sync("p");
        assert_eq!(s["files_synced"], 5000);
    });
}
