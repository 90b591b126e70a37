//! V1 (issue 13): verifying a replica over ssh, georep's hash-tree
//! comparison against `rsync -a -c --dry-run --itemize-changes` (rsync's
//! only way to see rot under an unchanged mtime and size), on the same
//! master and slave: equal trees, then with 10 rotted files; then
//! `georep verify --repair`, whose wire bytes are held against the rotted
//! blocks.

use crate::bench::{verify_same, Ctx, Link};
use crate::data;
use crate::workloads::{at_most, tool, Outcome, GIB, MIB};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const RSYNC: [&str; 4] = ["-a", "-c", "--dry-run", "--itemize-changes"];
const ROTTED: usize = 10;

/// The tree: a few large images and many 4 MiB files, `gib` GiB in all.
fn generate(master: &Path, gib: u64) -> anyhow::Result<(u64, Vec<PathBuf>)> {
    let images = (gib * 4 / 5).max(1);
    let image = gib * GIB * 4 / 5 / images;
    let small = (gib * GIB - images * image) / (4 * MIB);
    let mut files = Vec::new();
    std::fs::create_dir_all(master.join("images"))?;
    for i in 0..images {
        let p = master.join(format!("images/disk{i:02}.img"));
        data::random_file(&p, image, 100 + i)?;
        files.push(p);
    }
    for i in 0..small {
        let d = master.join(format!("files/{:02}", i % 32));
        std::fs::create_dir_all(&d)?;
        let p = d.join(format!("f{i:04}"));
        data::random_file(&p, 4 * MIB, 1000 + i)?;
        files.push(p);
    }
    Ok((images * image + small * 4 * MIB, files))
}

/// Flips one bit in each of `ROTTED` files of the slave, keeping mtime and size.
fn rot(master: &Path, slave: &Path, files: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut rng = data::Rng::new(13);
    let mut out = Vec::new();
    // Spread over the images and the small files.
    let step = (files.len() / ROTTED).max(1);
    for k in 0..ROTTED.min(files.len()) {
        let m = &files[(k * step + rng.below(step as u64) as usize).min(files.len() - 1)];
        let rel = m.strip_prefix(master)?.to_path_buf();
        let p = slave.join(&rel);
        let md = std::fs::metadata(&p)?;
        let off = rng.below(md.len());
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)?;
        let mut b = [0u8];
        f.read_exact_at(&mut b, off)?;
        b[0] ^= 0x10;
        f.write_all_at(&b, off)?;
        drop(f);
        let t = nix::sys::time::TimeSpec::new(md.mtime(), md.mtime_nsec());
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &p,
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )?;
        out.push(rel.display().to_string());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn rsync_cmd(ctx: &Ctx, master: &Path, slave: &Path) -> anyhow::Result<Command> {
    let mut c = Command::new("rsync");
    c.args(RSYNC)
        .arg("--stats")
        .arg("-e")
        .arg(format!("ssh -F {}", ctx.ssh_config(Link::Ssh)?.display()))
        .arg(format!("{}/", master.display()))
        .arg(format!("bench:{}/", slave.display()));
    Ok(c)
}

/// Files rsync says it would transfer (itemized `>f...`, or `<f...` when the receiver is remote).
fn rsync_listed(out: &str) -> Vec<String> {
    let mut v: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with(">f") || l.starts_with("<f"))
        .filter_map(|l| l.split_once(' ').map(|(_, p)| p.trim().to_string()))
        .collect();
    v.sort();
    v
}

fn georep_listed(out: &str) -> anyhow::Result<(serde_json::Value, Vec<String>)> {
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    let mut paths: Vec<String> = v["differences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d["path"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    paths.sort();
    Ok((v, paths))
}

/// V1: verify a tree over ssh, equal and with rot, against rsync -c.
pub fn v1(ctx: &Ctx) -> anyhow::Result<Vec<Outcome>> {
    let w = ctx.dir.join("v1");
    let (master, slave, home) = (w.join("master"), w.join("slave"), w.join("home"));
    let gib = std::env::var("GEOREP_BENCH_V1_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if ctx.quick { 1 } else { 10 });
    crate::bench::empty_dir(&master)?;
    let (total, files) = generate(&master, gib)?;
    ctx.georep_session(
        &home,
        "v1",
        &master,
        &slave,
        Link::Ssh,
        &["--marker", "mark"],
    )?;
    crate::procs::setup(&mut ctx.georep(&home, &["sync", "v1"]))?;
    crate::procs::setup(&mut Command::new("sync"))?;
    let verify = |args: &[&str], ok: i32| -> anyhow::Result<(crate::bench::Run, String)> {
        let mut a = vec!["verify", "v1", "--json"];
        a.extend_from_slice(args);
        ctx.cold()?;
        let (run, m) = ctx.measure_allowing(Link::Ssh, ctx.georep(&home, &a), |_| 0, &[ok])?;
        Ok((run, m.stdout))
    };
    let rsync = || -> anyhow::Result<(crate::bench::Run, String)> {
        ctx.cold()?;
        let (run, m) = ctx.measure(Link::Ssh, rsync_cmd(ctx, &master, &slave)?, |_| 0)?;
        Ok((run, m.stdout))
    };
    let options = RSYNC.join(" ");
    let mut outcomes = Vec::new();

    // Equal trees.
    let mut g = tool(
        "georep",
        "verify (hash tree by ranges, both sides hashing at once)",
    );
    let mut r = tool("rsync", &options);
    let mut notes = Vec::new();
    for rep in 0..ctx.reps {
        ctx.sampling(rep == 0);
        let (run, out) = verify(&[], 0)?;
        let (v, listed) = georep_listed(&out)?;
        anyhow::ensure!(
            v["equal"] == true && listed.is_empty(),
            "georep: not equal: {out}"
        );
        anyhow::ensure!(
            v["bytes"].as_u64() == Some(total),
            "georep verified {} of {total} bytes",
            v["bytes"]
        );
        if rep == 0 {
            notes.push(format!(
                "georep's own count of its wire bytes: {} out, {} in ({} ranges)",
                v["wire_bytes_out"], v["wire_bytes_in"], v["ranges"]
            ));
        }
        notes.push(master_note(rep, rep == 0, &run, &v));
        g.runs.push(run);
        let (run, out) = rsync()?;
        anyhow::ensure!(
            rsync_listed(&out).is_empty(),
            "rsync lists files on equal trees: {out}"
        );
        r.runs.push(run);
    }
    let mut o = Outcome {
        id: "V1".into(),
        title: format!(
            "verify a {gib} GiB tree ({} files), equal, over ssh",
            files.len()
        ),
        tools: vec![g, r],
        checks: vec![],
        notes,
    };
    let (t, _) = o.ratios();
    o.checks.push(at_most("time georep/rsync", t, 0.5));
    let wire = o.tools[0].median_bytes() as f64;
    o.checks.push(at_most(
        "wire bytes / data verified (equal)",
        wire / total as f64,
        1e-4,
    ));
    o.notes.push(if ctx.drop_caches {
        format!(
            "page cache: dropped before each run of each tool ({} GiB of master and slave read from the disk)",
            2 * gib
        )
    } else {
        format!(
            "page cache: warm (the tree was just written and synced; {} GiB of master and slave on a machine with {} GiB of RAM)",
            2 * gib,
            mem_gib()
        )
    });
    outcomes.push(o);

    // Ten rotted files.
    let rotted = rot(&master, &slave, &files)?;
    crate::procs::setup(&mut Command::new("sync"))?;
    let mut g = tool("georep", "verify");
    let mut r = tool("rsync", &options);
    let mut notes = Vec::new();
    for rep in 0..ctx.reps {
        ctx.sampling(rep == 0);
        let (run, out) = verify(&[], 1)?;
        let (v, listed) = georep_listed(&out)?;
        anyhow::ensure!(
            listed == rotted,
            "georep found {listed:?}, rotted {rotted:?}"
        );
        notes.push(master_note(rep, false, &run, &v));
        g.runs.push(run);
        let (run, out) = rsync()?;
        let listed = rsync_listed(&out);
        anyhow::ensure!(
            listed == rotted,
            "rsync found {listed:?}, rotted {rotted:?}"
        );
        r.runs.push(run);
    }
    notes.push(format!(
        "both found exactly the {} rotted files",
        rotted.len()
    ));
    let mut o = Outcome {
        id: "V1r".into(),
        title: format!(
            "the same with {} rotted files (a bit flipped, mtime and size kept)",
            rotted.len()
        ),
        tools: vec![g, r],
        checks: vec![],
        notes,
    };
    let (t, _) = o.ratios();
    o.checks.push(at_most("time georep/rsync", t, 0.5));
    // Repair: only the differing blocks travel.
    ctx.sampling(false);
    let (run, out) = verify(&["--repair"], 0)?;
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    let rep = &v["repair"];
    anyhow::ensure!(
        rep["after"]["equal"] == true,
        "repair left differences: {out}"
    );
    let repair_wire =
        rep["wire_bytes_out"].as_u64().unwrap_or(0) + rep["wire_bytes_in"].as_u64().unwrap_or(0);
    let blocks = (rotted.len() as u64) * 4096;
    o.checks.push(at_most(
        "repair wire bytes / rotted blocks",
        repair_wire as f64 / blocks as f64,
        1.1,
    ));
    o.notes.push(format!(
        "repair: {} file data bytes sent, {repair_wire} bytes on the wire for {} rotted 4 KiB blocks; \
         the whole verify --repair run (verify, repair, verify again): {:.1} s, {} bytes through the proxy; \
         rsync -c would send each rotted file again by delta",
        rep["bytes_sent"], rotted.len(), run.wall_ms / 1000.0, run.wire_bytes
    ));
    verify_same(&master, &slave)?;
    outcomes.push(o);
    Ok(outcomes)
}

/// What a georep run read of the master. The session's first verification
/// (V1's run 0) has no cache of master hashes and reads every master file;
/// later ones (the steady state) read only the slave's data. Run 0 of each
/// row is the sampled one, left out of the median.
fn master_note(rep: usize, cold: bool, run: &crate::bench::Run, v: &serde_json::Value) -> String {
    let gib = |k: &str| v[k].as_u64().unwrap_or(0) as f64 / GIB as f64;
    format!(
        "georep run {rep}{} (cache {}): {:.1} s, master read {:.2} GiB, {:.2} GiB taken from the cache of master hashes",
        if run.sampled { ", sampled, not in the median" } else { "" },
        if cold { "cold: the session's first verification" } else { "warm" },
        run.wall_ms / 1000.0,
        gib("master_bytes_read"),
        gib("master_bytes_cached"),
    )
}

fn mem_gib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or(0, |kib| (kib + (1 << 19)) >> 20)
}
