//! Catalog-mode workloads: W3 (a CDP journal grows) and W4 (a new full
//! image whose parent point is already on the slave), on sample stores made
//! by `georep sample-store`, local slave.

use crate::bench::{copy_file, copy_tree, Ctx, Link};
use crate::procs;
use crate::workloads::{at_most, tool, Outcome, GIB, MIB};
use std::path::{Path, PathBuf};
use std::process::Command;

fn georep_json(ctx: &Ctx, home: &Path, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = procs::setup(&mut ctx.georep(home, args))?;
    Ok(serde_json::from_str(out.trim()).unwrap_or_default())
}

fn only_file(dir: &Path, ext: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    v.sort();
    Ok(v)
}

/// W3: a CDP journal of 4 GiB gets 64 MiB of new points.
pub fn w3(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let w = ctx.dir.join("w3");
    let (store, replica, before, rs, home) = (
        w.join("store"),
        w.join("replica"),
        w.join("replica-before"),
        w.join("rsync"),
        w.join("home"),
    );
    let (size, points) = if ctx.quick {
        (256 * MIB, 10)
    } else {
        (4 * GIB, 42)
    };
    let g = |args: &[&str]| procs::setup(&mut ctx.georep(&home, args));
    std::fs::create_dir_all(&w)?;
    g(&[
        "sample-store",
        store.to_str().unwrap(),
        "--hosts",
        "1",
        "--kinds",
        "cdp",
        "--disks",
        "1",
        "--disk-size",
        "1G",
        "--snapshots",
        "1",
        "--points",
        "4",
        "--max-write",
        "1M",
    ])?;
    g(&[
        "create",
        "w3",
        store.to_str().unwrap(),
        replica.to_str().unwrap(),
        "--mode",
        "continuous",
    ])?;
    g(&["sync", "w3"])?;
    let disk = store.join("hosts/host01/disks/disk0");
    let journal = only_file(&disk, "cdp")?
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no journal in the sample store"))?;
    while std::fs::metadata(&journal)?.len() < size {
        g(&[
            "sample-store",
            store.to_str().unwrap(),
            "--advance",
            "--only",
            "cdp",
            "--points",
            "700",
            "--max-write",
            "1M",
        ])?;
        g(&["sync", "w3"])?;
    }
    copy_tree(&replica, &before)?;
    std::fs::create_dir_all(&rs)?;
    let rs_before = rs.join("before.cdp");
    copy_file(&journal, &rs_before)?;
    let old = std::fs::metadata(&journal)?.len();
    g(&[
        "sample-store",
        store.to_str().unwrap(),
        "--advance",
        "--only",
        "cdp",
        "--points",
        &points.to_string(),
        "--max-write",
        "1M",
    ])?;
    let appended = std::fs::metadata(&journal)?.len() - old;
    let opts = ["--append-verify"];
    let mut gt = tool(
        "georep",
        "sync, layout = store, continuous mode (points appended in place)",
    );
    let mut rt = tool("rsync", &opts.join(" "));
    let target = rs.join(journal.file_name().unwrap());
    for rep in 0..ctx.reps {
        ctx.sampling(rep == 0);
        copy_tree(&before, &replica)?;
        gt.runs.push(ctx.georep_sync(&home, "w3", Link::Local)?);
        let v = georep_json(
            ctx,
            &home,
            &["point", "list", replica.to_str().unwrap(), "--json"],
        )?;
        anyhow::ensure!(v.to_string().len() > 2, "no points on the replica");
        copy_file(&rs_before, &target)?;
        let mut c = Command::new("rsync");
        c.args(opts)
            .arg("--stats")
            .arg(&journal)
            .arg(format!("{}/", rs.display()));
        rt.runs
            .push(ctx.measure(Link::Local, c, crate::bench::rsync_bytes)?.0);
        procs::setup(Command::new("cmp").arg(&journal).arg(&target))?;
    }
    let mut o = Outcome {
        id: "W3".into(),
        title: format!(
            "{} MiB CDP journal, {} MiB of new points appended, local, catalog mode",
            old / MIB,
            appended / MIB
        ),
        tools: vec![gt, rt],
        checks: vec![],
        notes: vec!["page cache warm for both tools".into()],
    };
    let (t, _) = o.ratios();
    let gb = o.tools[0].median_bytes() as f64 / appended as f64;
    o.checks
        .push(at_most("wire bytes georep/appended", gb, 1.01));
    o.checks.push(at_most("time georep/rsync", t, 0.05));
    Ok(o)
}

/// W4: a new full image, 90% equal to its parent point, which the slave has.
pub fn w4(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let w = ctx.dir.join("w4");
    let (store, replica, before, rs, home) = (
        w.join("store"),
        w.join("replica"),
        w.join("replica-before"),
        w.join("rsync"),
        w.join("home"),
    );
    let disk_size = if ctx.quick { "128M" } else { "1G" };
    let g = |args: &[&str]| procs::setup(&mut ctx.georep(&home, args));
    std::fs::create_dir_all(&w)?;
    g(&[
        "sample-store",
        store.to_str().unwrap(),
        "--hosts",
        "1",
        "--kinds",
        "qcow",
        "--disks",
        "1",
        "--disk-size",
        disk_size,
        "--fill",
        "1",
        "--snapshots",
        "1",
    ])?;
    g(&[
        "create",
        "w4",
        store.to_str().unwrap(),
        replica.to_str().unwrap(),
        "--mode",
        "continuous",
    ])?;
    g(&["sync", "w4"])?;
    copy_tree(&replica, &before)?;
    g(&[
        "sample-store",
        store.to_str().unwrap(),
        "--advance",
        "--only",
        "snapshot",
        "--change",
        "0.10",
    ])?;
    let new = only_file(&store.join("hosts/host01/disks/disk0"), "qcow2")?
        .pop()
        .unwrap();
    let parent = only_file(&before.join("hosts/host01/disks/disk0"), "qcow2")?
        .pop()
        .unwrap();
    let size = std::fs::metadata(&new)?.len();
    let mut gt = tool(
        "georep",
        "sync, layout = store (the parent point is the delta basis)",
    );
    let mut rt = tool(
        "rsync",
        "--no-whole-file -I, with the parent copied under the new name as its basis",
    );
    std::fs::create_dir_all(&rs)?;
    let target = rs.join(new.file_name().unwrap());
    for rep in 0..ctx.reps {
        ctx.sampling(rep == 0);
        copy_tree(&before, &replica)?;
        gt.runs.push(ctx.georep_sync(&home, "w4", Link::Local)?);
        let got = only_file(&replica.join("hosts/host01/disks/disk0"), "qcow2")?
            .pop()
            .unwrap();
        procs::setup(Command::new("cmp").arg(&new).arg(&got))?;
        copy_file(&parent, &target)?;
        let mut c = Command::new("rsync");
        c.args(["--no-whole-file", "--ignore-times", "--stats"])
            .arg(&new)
            .arg(format!("{}/", rs.display()));
        rt.runs
            .push(ctx.measure(Link::Local, c, crate::bench::rsync_bytes)?.0);
        procs::setup(Command::new("cmp").arg(&new).arg(&target))?;
    }
    let mut o = Outcome {
        id: "W4".into(),
        title: format!("new {} MiB image, 10% of blocks rewritten from its parent on the slave, local, catalog mode", size / MIB),
        tools: vec![gt, rt],
        checks: vec![],
        notes: vec![],
    };
    let gb = o.tools[0].median_bytes() as f64 / size as f64;
    o.checks.push(at_most("wire bytes georep/size", gb, 0.15));
    Ok(o)
}
