//! The WAN workloads of issue 15: parallel streams (W9), bandwidth caps
//! and limits (W10, W14), interrupted transfers (W11), unchanged content
//! under new mtimes (W12) and compression (W13).

use crate::bench::{empty_dir, verify_same, Ctx, Link, ToolResult};
use crate::data;
use crate::procs;
use crate::workloads::{at_least, at_most, tool, Outcome, GIB, MIB};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The bandwidth of W10's link: 50 MB/s each way.
pub const CAP: u64 = 50_000_000;
/// The WAN links' delay each way (a 100 ms round trip).
pub const DELAY: Duration = Duration::from_millis(50);

/// MB/s of a run of `bytes`.
fn rate(bytes: u64, t: &ToolResult) -> f64 {
    bytes as f64 / (t.median_ms() / 1000.0) / 1e6
}

/// W9: a new incompressible file through 50 ms each way (streams = auto).
pub fn w9(ctx: &Ctx) -> anyhow::Result<Outcome> {
    wan_file(ctx, "W9", Link::Wan)
}

/// W10: W9 with the link capped at 50 MB/s.
pub fn w10(ctx: &Ctx) -> anyhow::Result<Outcome> {
    wan_file(ctx, "W10", Link::WanCapped)
}

fn wan_file(ctx: &Ctx, id: &str, link: Link) -> anyhow::Result<Outcome> {
    let w = ctx.dir.join(id.to_lowercase());
    let (master, gs, rs, home) = (
        w.join("master"),
        w.join("georep-slave"),
        w.join("rsync-slave"),
        w.join("home"),
    );
    let size = if ctx.quick { 256 * MIB } else { 2 * GIB };
    empty_dir(&master)?;
    data::random_file(&master.join("new.img"), size, 9)?;
    empty_dir(&home)?;
    let opts = ["-a", "--whole-file"];
    let mut g = tool("georep", "sync (new file), streams = auto");
    let mut r = tool("rsync", &opts.join(" "));
    let mut streams = 0;
    for rep in 0..ctx.reps {
        ctx.sampling(rep == 0);
        empty_dir(&gs)?;
        let name = format!("{}-{rep}", id.to_lowercase());
        ctx.georep_session(&home, &name, &master, &gs, link, &[])?;
        let (run, summary) = ctx.georep_sync_summary(&home, &name, link)?;
        streams = summary["streams"].as_u64().unwrap_or(0);
        g.runs.push(run);
        verify_same(&master, &gs)?;
        crate::procs::setup(&mut ctx.georep(&home, &["delete", &name]))?;
        empty_dir(&rs)?;
        r.runs.push(ctx.rsync(&opts, &master, &rs, link)?);
        verify_same(&master, &rs)?;
    }
    let capped = link == Link::WanCapped;
    let mut o = Outcome {
        id: id.into(),
        title: format!(
            "new {} MiB incompressible file through 50 ms each way{}",
            size / MIB,
            if capped {
                ", link capped at 50 MB/s"
            } else {
                ""
            }
        ),
        tools: vec![g, r],
        checks: vec![],
        notes: vec![],
    };
    let (t, _) = o.ratios();
    let g_rate = rate(size, o.tool("georep"));
    o.notes.push(format!(
        "georep {streams} streams (auto), {g_rate:.1} MB/s; rsync {:.1} MB/s",
        rate(size, o.tool("rsync"))
    ));
    if capped {
        // The emulator's own capacity, so that a shortfall is not blamed on
        // georep when the proxy (a user-space process on shared cores) is it.
        let probe = if ctx.quick { 50_000_000 } else { 200_000_000 };
        let link = crate::proxy::capacity(DELAY, Some(CAP), probe)?;
        o.notes.push(format!(
            "the emulated link carries plain TCP at {link:.1} MB/s ({:.2} of the cap); georep reached {:.2} of that",
            link * 1e6 / CAP as f64,
            g_rate / link
        ));
        o.checks.push(at_least(
            "georep rate / cap",
            g_rate * 1e6 / CAP as f64,
            0.9,
        ));
    } else {
        o.checks.push(at_most("time georep/rsync", t, 0.3));
    }
    Ok(o)
}

/// Runs `cmd` in its own process group and kills the group once `proxy`
/// carried `bytes` upwards; returns whether it was still running then.
fn kill_after(ctx: &Ctx, link: Link, mut cmd: Command, bytes: u64) -> anyhow::Result<bool> {
    let p = ctx.proxy(link).expect("an ssh link");
    p.reset();
    let mut child = cmd
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .env(
            ctx.marker.split('=').next().unwrap(),
            ctx.marker.split('=').nth(1).unwrap(),
        )
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if child.try_wait()?.is_some() {
            return Ok(false);
        }
        if p.bytes().0 >= bytes || Instant::now() > deadline {
            let pg = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(pg, nix::sys::signal::SIGKILL);
            let _ = child.wait();
            // Let killed ssh processes and the agent go.
            std::thread::sleep(Duration::from_millis(500));
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// W11: a new 1 GiB file's transfer killed at about half, then synced
/// again: bytes sent again (both directions) over the size; `rsync
/// --partial` killed and run again beside it.
pub fn w11(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let w = ctx.dir.join("w11");
    let (master, gs, rs, home) = (
        w.join("master"),
        w.join("georep-slave"),
        w.join("rsync-slave"),
        w.join("home"),
    );
    let size = if ctx.quick { 256 * MIB } else { GIB };
    empty_dir(&master)?;
    data::random_file(&master.join("image.raw"), size, 11)?;
    empty_dir(&home)?;
    let opts = ["-a", "--partial", "--whole-file"];
    let mut g = tool(
        "georep",
        "sync killed at half, then sync (resumes the durable prefix)",
    );
    let mut r = tool(
        "rsync",
        &format!("{} killed at half, then run again", opts.join(" ")),
    );
    let mut kills = 0;
    for rep in 0..ctx.reps {
        ctx.sampling(rep == 0);
        empty_dir(&gs)?;
        let name = format!("w11-{rep}");
        ctx.georep_session(&home, &name, &master, &gs, Link::Ssh, &[])?;
        kills += kill_after(
            ctx,
            Link::Ssh,
            ctx.georep(&home, &["sync", &name]),
            size / 2,
        )? as u32;
        let (run, s) = ctx.georep_sync_summary(&home, &name, Link::Ssh)?;
        let resumed = s["bytes_resumed"].as_u64().unwrap_or(0);
        eprintln!("bench: W11 georep resumed {} MiB", resumed / MIB);
        g.runs.push(run);
        verify_same(&master, &gs)?;
        procs::setup(&mut ctx.georep(&home, &["delete", &name]))?;
        empty_dir(&rs)?;
        let mut c = Command::new("rsync");
        c.args(opts)
            .arg("-e")
            .arg(format!("ssh -F {}", ctx.ssh_config(Link::Ssh)?.display()))
            .arg(format!("{}/", master.display()))
            .arg(format!("bench:{}/", rs.display()));
        kills += kill_after(ctx, Link::Ssh, c, size / 2)? as u32;
        r.runs.push(ctx.rsync(&opts, &master, &rs, Link::Ssh)?);
        verify_same(&master, &rs)?;
    }
    let mut o = Outcome {
        id: "W11".into(),
        title: format!(
            "new {} MiB file over ssh, transfer killed at about half, then synced again",
            size / MIB
        ),
        tools: vec![g, r],
        checks: vec![],
        notes: vec![format!(
            "{kills} of {} transfers were killed in flight",
            2 * ctx.reps
        )],
    };
    let resent = |t: &ToolResult| t.median_bytes() as f64 / size as f64;
    let (gr, rr) = (resent(o.tool("georep")), resent(o.tool("rsync")));
    o.notes.push(format!(
        "bytes re-sent / size (both directions): georep {gr:.3}, rsync --partial {rr:.3}"
    ));
    o.checks.push(at_most("bytes re-sent / size", gr, 0.55));
    Ok(o)
}

/// Touches every file of `root` (mtime + `secs`) and edits `share` of
/// them by a few lines (an insertion and an overwrite).
fn touch_and_edit(root: &Path, secs: i64, share: u64, seed: u64) -> anyhow::Result<u64> {
    let mut rng = data::Rng::new(seed);
    let mut edited = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                stack.push(p);
                continue;
            }
            if rng.below(1000) < share * 10 {
                let mut b = std::fs::read(&p)?;
                let at = rng.below(b.len() as u64) as usize;
                b.splice(at..at, format!("an edited line {seed}\n").bytes());
                let at2 = rng.below(b.len() as u64 - 20) as usize;
                b[at2..at2 + 12].copy_from_slice(b"CHANGED LINE");
                std::fs::write(&p, b)?;
                edited += 1;
            }
            data::bump_mtime(&p, secs)?;
        }
    }
    Ok(edited)
}

/// W12: 20k small files whose mtimes all changed, 2% edited by a few
/// lines (a release unpacked over a tree), over ssh: wire bytes both ways.
pub fn w12(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let w = ctx.dir.join("w12");
    let (master, gs, rs, home) = (
        w.join("master"),
        w.join("georep-slave"),
        w.join("rsync-slave"),
        w.join("home"),
    );
    let files = if ctx.quick { 2000 } else { 20_000 };
    empty_dir(&master)?;
    let total = data::text_files(&master, 200, files, 12)?;
    empty_dir(&home)?;
    empty_dir(&gs)?;
    ctx.georep_session(&home, "w12", &master, &gs, Link::Ssh, &[])?;
    ctx.georep_sync(&home, "w12", Link::Ssh)?;
    empty_dir(&rs)?;
    ctx.rsync(&["-a"], &master, &rs, Link::Ssh)?;
    let mut g = tool("georep", "sync (full crawl: nothing watched the changes)");
    let mut r = tool("rsync", "-a");
    let mut edited = 0;
    for rep in 0..ctx.reps {
        ctx.sampling(rep == 0);
        edited = touch_and_edit(&master, 100 * (rep as i64 + 1), 2, 120 + rep as u64)?;
        g.runs.push(ctx.georep_sync(&home, "w12", Link::Ssh)?);
        verify_same(&master, &gs)?;
        r.runs.push(ctx.rsync(&["-a"], &master, &rs, Link::Ssh)?);
        verify_same(&master, &rs)?;
    }
    let mut o = Outcome {
        id: "W12".into(),
        title: format!(
            "{files} text files ({} MiB), every mtime changed, {edited} (2%) edited by a few lines, ssh",
            total / MIB
        ),
        tools: vec![g, r],
        checks: vec![],
        notes: vec![],
    };
    let (_, b) = o.ratios();
    o.checks.push(at_most("wire bytes georep/rsync", b, 0.7));
    Ok(o)
}

/// W13: images of typical guest content over ssh, `compression = auto`
/// against `compression = off` (same run, alternating).
pub fn w13(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let w = ctx.dir.join("w13");
    let (master, gs, gso, rs, home) = (
        w.join("master"),
        w.join("georep-slave"),
        w.join("georep-off-slave"),
        w.join("rsync-slave"),
        w.join("home"),
    );
    let (n, size) = if ctx.quick {
        (2, 64 * MIB)
    } else {
        (4, 256 * MIB)
    };
    empty_dir(&master)?;
    for i in 0..n {
        data::guest_image(&master.join(format!("disk{i}.img")), size, 130 + i)?;
    }
    empty_dir(&home)?;
    let mut g = tool("georep", "sync, compression = auto");
    let mut go = tool("georep off", "sync, compression = off");
    let mut r = tool("rsync", "-a (no -z)");
    let mut ratio = 0.0;
    for rep in 0..ctx.reps {
        ctx.sampling(rep == 0);
        for (off, slave, runs) in [(false, &gs, &mut g), (true, &gso, &mut go)] {
            empty_dir(slave)?;
            let name = format!("w13-{}-{rep}", if off { "off" } else { "auto" });
            ctx.georep_session(&home, &name, &master, slave, Link::Ssh, &[])?;
            procs::setup(&mut ctx.georep(
                &home,
                &[
                    "config",
                    &name,
                    "set",
                    "compression",
                    if off { "off" } else { "auto" },
                ],
            ))?;
            let (run, s) = ctx.georep_sync_summary(&home, &name, Link::Ssh)?;
            if !off {
                ratio = s["compression_ratio"].as_f64().unwrap_or(1.0);
            }
            runs.runs.push(run);
            verify_same(&master, slave)?;
            procs::setup(&mut ctx.georep(&home, &["delete", &name]))?;
        }
        empty_dir(&rs)?;
        r.runs.push(ctx.rsync(&["-a"], &master, &rs, Link::Ssh)?);
    }
    let mut o = Outcome {
        id: "W13".into(),
        title: format!(
            "{n} new images of {} MiB of guest content (35% zeros, 30% text, 20% structured binary, 15% random), ssh",
            size / MIB
        ),
        tools: vec![g, r, go],
        checks: vec![],
        notes: vec![format!("compression ratio reported by sync --json: {ratio:.3}")],
    };
    let (a, f) = (o.tool("georep"), o.tool("georep off"));
    let bytes = a.median_bytes() as f64 / f.median_bytes().max(1) as f64;
    let time = a.median_ms() / f.median_ms();
    o.checks.push(at_most("wire bytes auto/off", bytes, 0.6));
    o.checks.push(at_most("time auto/off", time, 1.0));
    Ok(o)
}

/// W14: W8 (a new incompressible file over ssh) with `bwlimit 20M`.
pub fn w14(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let w = ctx.dir.join("w14");
    let (master, gs, rs, home) = (
        w.join("master"),
        w.join("georep-slave"),
        w.join("rsync-slave"),
        w.join("home"),
    );
    let size = if ctx.quick { 256 * MIB } else { 2 * GIB };
    let limit = 20u64 << 20;
    empty_dir(&master)?;
    data::random_file(&master.join("new.img"), size, 14)?;
    empty_dir(&home)?;
    let opts = ["-a", "--whole-file", "--bwlimit=20M"];
    let mut g = tool("georep", "sync, bwlimit = 20M (20 MiB/s)");
    let mut r = tool("rsync", &opts.join(" "));
    for rep in 0..ctx.reps {
        ctx.sampling(rep == 0);
        empty_dir(&gs)?;
        let name = format!("w14-{rep}");
        ctx.georep_session(&home, &name, &master, &gs, Link::Ssh, &[])?;
        procs::setup(&mut ctx.georep(&home, &["config", &name, "set", "bwlimit", "20M"]))?;
        g.runs.push(ctx.georep_sync(&home, &name, Link::Ssh)?);
        verify_same(&master, &gs)?;
        procs::setup(&mut ctx.georep(&home, &["delete", &name]))?;
        empty_dir(&rs)?;
        r.runs.push(ctx.rsync(&opts, &master, &rs, Link::Ssh)?);
    }
    let mut o = Outcome {
        id: "W14".into(),
        title: format!(
            "W8 ({} MiB new file, ssh) with a limit of 20 MiB/s",
            size / MIB
        ),
        tools: vec![g, r],
        checks: vec![],
        notes: vec![],
    };
    let (gr, rr) = (
        size as f64 / (o.tool("georep").median_ms() / 1000.0),
        size as f64 / (o.tool("rsync").median_ms() / 1000.0),
    );
    o.notes.push(format!(
        "rate / limit: georep {:.3}, rsync --bwlimit {:.3}",
        gr / limit as f64,
        rr / limit as f64
    ));
    o.checks.push(at_most(
        "|rate / limit - 1|",
        (gr / limit as f64 - 1.0).abs(),
        0.1,
    ));
    Ok(o)
}

/// F1: a no-change full crawl (worker start, or a gap in the watch) of
/// 100k entries, local.
pub fn f1(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let w = ctx.dir.join("f1");
    let (master, gs, rs, home) = (
        w.join("master"),
        w.join("georep-slave"),
        w.join("rsync-slave"),
        w.join("home"),
    );
    let (dirs, per) = if ctx.quick { (100, 99) } else { (1000, 99) };
    empty_dir(&master)?;
    data::wide_tree(&master, dirs, per)?;
    ctx.georep_session(&home, "f1", &master, &gs, Link::Local, &[])?;
    ctx.georep_sync(&home, "f1", Link::Local)?;
    empty_dir(&rs)?;
    ctx.rsync(&["-a"], &master, &rs, Link::Local)?;
    let mut g = tool(
        "georep",
        "sync, marker = auto with no watcher: a full crawl",
    );
    let mut r = tool("rsync", "-a");
    let mut unchanged = 0;
    for rep in 0..ctx.reps {
        ctx.sampling(rep == 0);
        r.runs.push(ctx.rsync(&["-a"], &master, &rs, Link::Local)?);
        let (run, s) = ctx.georep_sync_summary(&home, "f1", Link::Local)?;
        anyhow::ensure!(s["crawl"] == "full", "F1 expects full crawls: {s}");
        unchanged = s["dirs_unchanged"].as_u64().unwrap_or(0);
        g.runs.push(run);
    }
    verify_same(&master, &gs)?;
    let mut o = Outcome {
        id: "F1".into(),
        title: format!(
            "no-change full crawl of {} entries in {dirs} dirs, local",
            dirs * (per + 1)
        ),
        tools: vec![g, r],
        checks: vec![],
        notes: vec![format!(
            "directories found as last synced (entry digest): {unchanged}"
        )],
    };
    let (t, _) = o.ratios();
    o.checks.push(at_most("time georep/rsync", t, 0.7));
    Ok(o)
}

/// C1: a no-change catalog sync (`marker = mark`) of stores of 100 and
/// 1,000 hosts: flat in the number of hosts.
pub fn c1(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let w = ctx.dir.join("c1");
    let sizes: [usize; 2] = if ctx.quick { [30, 300] } else { [100, 1000] };
    let mut tools = Vec::new();
    let mut medians = Vec::new();
    for hosts in sizes {
        let (store, replica, home) = (
            w.join(format!("store{hosts}")),
            w.join(format!("replica{hosts}")),
            w.join(format!("home{hosts}")),
        );
        std::fs::create_dir_all(&home)?;
        let g = |args: &[&str]| procs::setup(&mut ctx.georep(&home, args));
        g(&[
            "sample-store",
            store.to_str().unwrap(),
            "--hosts",
            &hosts.to_string(),
            "--disks",
            "1",
            "--disk-size",
            "1M",
            "--snapshots",
            "1",
            "--points",
            "2",
        ])?;
        g(&[
            "create",
            "c1",
            store.to_str().unwrap(),
            replica.to_str().unwrap(),
            "--marker",
            "mark",
        ])?;
        g(&["sync", "c1"])?;
        let mut t = tool(
            if hosts == sizes[0] {
                "georep"
            } else {
                "georep big"
            },
            &format!("sync of {hosts} hosts, marker = mark"),
        );
        for rep in 0..ctx.reps {
            ctx.sampling(rep == 0);
            let (run, s) = ctx.georep_sync_summary(&home, "c1", Link::Local)?;
            anyhow::ensure!(
                s["catalog"]["hosts_unchanged"].as_u64() == Some(hosts as u64),
                "C1 expects every host pruned: {s}"
            );
            t.runs.push(run);
        }
        medians.push(t.median_ms());
        tools.push(t);
    }
    let per_host = (medians[1] - medians[0]) / (sizes[1] - sizes[0]) as f64;
    let mut o = Outcome {
        id: "C1".into(),
        title: format!(
            "no-change catalog sync of stores of {} and {} hosts, local",
            sizes[0], sizes[1]
        ),
        tools,
        checks: vec![],
        notes: vec![format!(
            "{:.1} ms at {} hosts, {:.1} ms at {} hosts: {per_host:.4} ms more per host (was ~3.4)",
            medians[0], sizes[0], medians[1], sizes[1]
        )],
    };
    o.checks.push(at_most(
        "seconds at the larger store",
        medians[1] / 1000.0,
        0.05,
    ));
    o.checks.push(at_most("ms per added host", per_host, 0.05));
    Ok(o)
}
