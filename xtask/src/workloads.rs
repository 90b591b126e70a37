//! The workloads of issue 6: each generates its data, runs georep and rsync
//! on identical copies, alternating, and checks the targets.

use crate::bench::{copy_tree, empty_dir, verify_same, Ctx, Link, ToolResult};
use crate::data;
use serde::Serialize;
use std::path::Path;
use std::process::Command;

/// One target check, e.g. "time <= 0.5 x rsync".
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub what: String,
    pub value: f64,
    pub limit: f64,
    pub met: bool,
}

pub(crate) fn at_most(what: &str, value: f64, limit: f64) -> Check {
    Check {
        what: what.into(),
        value,
        limit,
        met: value <= limit,
    }
}

pub(crate) fn at_least(what: &str, value: f64, limit: f64) -> Check {
    Check {
        what: what.into(),
        value,
        limit,
        met: value >= limit,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub id: String,
    pub title: String,
    pub tools: Vec<ToolResult>,
    pub checks: Vec<Check>,
    pub notes: Vec<String>,
}

impl Outcome {
    pub(crate) fn tool(&self, name: &str) -> &ToolResult {
        self.tools
            .iter()
            .find(|t| t.tool == name)
            .expect("tool ran")
    }

    /// georep/rsync ratios of median time and bytes.
    pub fn ratios(&self) -> (f64, f64) {
        let (g, r) = (self.tool("georep"), self.tool("rsync"));
        (
            g.median_ms() / r.median_ms(),
            g.median_bytes() as f64 / r.median_bytes().max(1) as f64,
        )
    }
}

pub(crate) fn tool(name: &str, options: &str) -> ToolResult {
    ToolResult {
        tool: name.into(),
        options: options.into(),
        runs: Vec::new(),
    }
}

pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const GIB: u64 = 1 << 30;

/// W1: no-change re-sync of 100k entries in 1k directories.
pub fn w1(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let w = ctx.dir.join("w1");
    let (master, gs, rs, home) = (
        w.join("master"),
        w.join("georep-slave"),
        w.join("rsync-slave"),
        w.join("home"),
    );
    let (dirs, per) = if ctx.quick { (100, 99) } else { (1000, 99) };
    empty_dir(&master)?;
    data::wide_tree(&master, dirs, per)?;
    ctx.georep_session(
        &home,
        "w1",
        &master,
        &gs,
        Link::Local,
        &["--marker", "mark"],
    )?;
    ctx.georep_sync(&home, "w1", Link::Local)?;
    empty_dir(&rs)?;
    ctx.rsync(&["-a"], &master, &rs, Link::Local)?;
    let mut g = tool(
        "georep",
        "sync, marker = mark (writers call georep mark); 5 runs per repetition",
    );
    let mut r = tool("rsync", "-a");
    for rep in 0..ctx.reps {
        ctx.sampling(rep == 0);
        r.runs.push(ctx.rsync(&["-a"], &master, &rs, Link::Local)?);
        // A no-change sync lasts milliseconds, so one run is at the mercy
        // of the scheduler (the first after rsync's walk of 100k entries
        // is often several times slower); each repetition runs it 5 times.
        for _ in 0..5 {
            g.runs.push(ctx.georep_sync(&home, "w1", Link::Local)?);
        }
    }
    verify_same(&master, &gs)?;
    let mut o = Outcome {
        id: "W1".into(),
        title: format!(
            "no-change re-sync of {} entries in {dirs} dirs, local",
            dirs * (per + 1)
        ),
        tools: vec![g, r],
        checks: vec![],
        notes: vec![],
    };
    let (t, _) = o.ratios();
    o.checks.push(at_most("time georep/rsync", t, 0.01));
    Ok(o)
}

/// W2: 1 GiB image, 1% of 4 KiB blocks rewritten at random offsets, over
/// ssh. Two pairings, measured alternately on the same data: the atomic
/// one (georep's default, a new copy published by rename, against rsync's
/// default, which also builds a new copy) and the in-place one (georep
/// with `inplace_min_size`, against `rsync --inplace`).
pub fn w2(ctx: &Ctx) -> anyhow::Result<Vec<Outcome>> {
    let w = ctx.dir.join("w2");
    let (master, before, gs, gsi, rs, rsi, home) = (
        w.join("master"),
        w.join("before"),
        w.join("georep-slave"),
        w.join("georep-inplace-slave"),
        w.join("rsync-slave"),
        w.join("rsync-inplace-slave"),
        w.join("home"),
    );
    let size = if ctx.quick { 64 * MIB } else { GIB };
    empty_dir(&master)?;
    data::random_file(&master.join("disk0.img"), size, 2)?;
    copy_tree(&master, &before)?;
    let changed = data::rewrite_blocks(&master.join("disk0.img"), 0.01, 22)?;
    data::bump_mtime(&master.join("disk0.img"), 100)?;
    ctx.georep_session(&home, "w2", &master, &gs, Link::Ssh, &["--marker", "mark"])?;
    let min = (size / 2).to_string();
    ctx.georep_session(
        &home,
        "w2i",
        &master,
        &gsi,
        Link::Ssh,
        &["--marker", "mark", "--inplace-min-size", &min],
    )?;
    let opts = ["-a", "--no-whole-file"];
    let opts_i = ["-a", "--no-whole-file", "--inplace"];
    let mut g = tool("georep", "sync (file marked)");
    let mut r = tool("rsync", &opts.join(" "));
    let mut gi = tool(
        "georep",
        &format!("sync (file marked), inplace_min_size = {min}"),
    );
    let mut ri = tool("rsync", &opts_i.join(" "));
    let mark = || {
        crate::procs::setup(
            &mut ctx.georep(&home, &["mark", master.join("disk0.img").to_str().unwrap()]),
        )
    };
    for rep in 0..ctx.reps {
        ctx.sampling(rep == 0);
        for (name, slave, runs) in [("w2", &gs, &mut g), ("w2i", &gsi, &mut gi)] {
            copy_tree(&before, slave)?;
            if rep == 0 {
                // The first sync establishes the session (a full crawl); measure marked re-syncs.
                ctx.georep_sync(&home, name, Link::Ssh)?;
                copy_tree(&before, slave)?;
            }
            mark()?;
            runs.runs.push(ctx.georep_sync(&home, name, Link::Ssh)?);
            verify_same(&master, slave)?;
        }
        for (o, slave, runs) in [(&opts[..], &rs, &mut r), (&opts_i[..], &rsi, &mut ri)] {
            copy_tree(&before, slave)?;
            runs.runs.push(ctx.rsync(o, &master, slave, Link::Ssh)?);
            verify_same(&master, slave)?;
        }
    }
    let title = format!(
        "{} MiB image, {changed} random 4 KiB blocks (1%) rewritten, over ssh",
        size / MIB
    );
    let mut out = Vec::new();
    for (id, what, g, r) in [
        (
            "W2",
            "atomic publish: georep default vs rsync default",
            g,
            r,
        ),
        (
            "W2i",
            "in place: georep inplace_min_size vs rsync --inplace",
            gi,
            ri,
        ),
    ] {
        let mut o = Outcome {
            id: id.into(),
            title: format!("{title}; {what}"),
            tools: vec![g, r],
            checks: vec![],
            notes: vec![],
        };
        let (t, b) = o.ratios();
        o.checks.push(at_most("time georep/rsync", t, 0.5));
        o.checks.push(at_most("bytes georep/rsync", b, 1.1));
        out.push(o);
    }
    Ok(out)
}

/// W3t: a journal with data appended, replicated as a plain tree (for
/// comparison with W3, the catalog mode the journal format is made for).
pub fn w3_tree(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let w = ctx.dir.join("w3t");
    let (master, before, gs, rs, home) = (
        w.join("master"),
        w.join("before"),
        w.join("georep-slave"),
        w.join("rsync-slave"),
        w.join("home"),
    );
    let (size, appended) = if ctx.quick {
        (256 * MIB, 16 * MIB)
    } else {
        (4 * GIB, 64 * MIB)
    };
    empty_dir(&master)?;
    data::random_file(&master.join("journal.cdp"), size, 3)?;
    copy_tree(&master, &before)?;
    data::append(&master.join("journal.cdp"), appended, 33)?;
    data::bump_mtime(&master.join("journal.cdp"), 100)?;
    ctx.georep_session(
        &home,
        "w3t",
        &master,
        &gs,
        Link::Local,
        &["--marker", "mark"],
    )?;
    let opts = ["-a", "--no-whole-file", "--inplace"];
    let mut g = tool("georep", "sync (file marked)");
    let mut r = tool("rsync", &opts.join(" "));
    for rep in 0..ctx.reps {
        ctx.sampling(rep == 0);
        copy_tree(&before, &gs)?;
        if rep == 0 {
            ctx.georep_sync(&home, "w3t", Link::Local)?;
            copy_tree(&before, &gs)?;
        }
        crate::procs::setup(&mut ctx.georep(
            &home,
            &["mark", master.join("journal.cdp").to_str().unwrap()],
        ))?;
        g.runs.push(ctx.georep_sync(&home, "w3t", Link::Local)?);
        verify_same(&master, &gs)?;
        copy_tree(&before, &rs)?;
        r.runs.push(ctx.rsync(&opts, &master, &rs, Link::Local)?);
        verify_same(&master, &rs)?;
    }
    let mut o = Outcome {
        id: "W3t".into(),
        title: format!(
            "{} MiB file with {} MiB appended, local, plain-tree mode (informational)",
            size / MIB,
            appended / MIB
        ),
        tools: vec![g, r],
        checks: vec![],
        notes: vec![],
    };
    let (t, _) = o.ratios();
    let gb = o.tool("georep").median_bytes() as f64 / appended as f64;
    o.notes.push(format!("bytes georep/appended {gb:.3}, time georep/rsync {t:.3}: a plain tree publishes a new copy atomically; see W3 for journals"));
    Ok(o)
}

/// W5/W6: initial sync of 20k files of 1-64 KiB over ssh (W6: through 50 ms each way).
pub fn w5(ctx: &Ctx, link: Link) -> anyhow::Result<Outcome> {
    let id = if link == Link::Wan { "W6" } else { "W5" };
    let w = ctx.dir.join(id.to_lowercase());
    let (master, gs, rs, home) = (
        w.join("master"),
        w.join("georep-slave"),
        w.join("rsync-slave"),
        w.join("home"),
    );
    let files = if ctx.quick { 2000 } else { 20_000 };
    empty_dir(&master)?;
    let total = data::small_files(&master, 200, files, 5)?;
    empty_dir(&home)?;
    let opts = ["-a"];
    let mut g = tool("georep", "sync (initial, full crawl)");
    let mut r = tool("rsync", &opts.join(" "));
    let mut last = serde_json::Value::Null;
    for rep in 0..ctx.reps {
        ctx.sampling(rep == 0);
        empty_dir(&gs)?;
        let name = format!("{}-{rep}", id.to_lowercase());
        ctx.georep_session(&home, &name, &master, &gs, link, &[])?;
        let (run, summary) = ctx.georep_sync_summary(&home, &name, link)?;
        g.runs.push(run);
        last = summary;
        verify_same(&master, &gs)?;
        crate::procs::setup(&mut ctx.georep(&home, &["delete", &name]))?;
        empty_dir(&rs)?;
        r.runs.push(ctx.rsync(&opts, &master, &rs, link)?);
        verify_same(&master, &rs)?;
    }
    let mut o = Outcome {
        id: id.into(),
        title: format!(
            "initial sync of {files} files of 1-64 KiB ({} MiB) over ssh{}",
            total / MIB,
            if link == Link::Wan {
                ", 50 ms each way"
            } else {
                ""
            }
        ),
        tools: vec![g, r],
        checks: vec![],
        notes: vec![],
    };
    let (t, _) = o.ratios();
    // Issue 15's targets: W5 at most 0.7 x rsync, W6 (through latency) 0.3.
    let limit = if link == Link::Wan { 0.3 } else { 0.7 };
    o.checks.push(at_most("time georep/rsync", t, limit));
    o.notes.push(format!(
        "georep's last run: {} streams (rtt {:.1} ms), small files per stream {}",
        last["streams"],
        last["rtt_ms"].as_f64().unwrap_or(0.0),
        last["small_files_by_stream"]
    ));
    Ok(o)
}

fn allocated(p: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(p)?.blocks() * 512)
}

/// W7: a new sparse image, 25% allocated, over ssh.
pub fn w7(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let w = ctx.dir.join("w7");
    let (master, gs, rs, home) = (
        w.join("master"),
        w.join("georep-slave"),
        w.join("rsync-slave"),
        w.join("home"),
    );
    let size = if ctx.quick { 256 * MIB } else { 4 * GIB };
    empty_dir(&master)?;
    data::sparse_file(&master.join("sparse.img"), size, size / 4, 7)?;
    let alloc = allocated(&master.join("sparse.img"))?;
    empty_dir(&home)?;
    let opts = ["-a", "-S"];
    let mut g = tool("georep", "sync (new file)");
    let mut r = tool("rsync", &opts.join(" "));
    let mut slave_alloc = 0;
    for rep in 0..ctx.reps {
        ctx.sampling(rep == 0);
        empty_dir(&gs)?;
        let name = format!("w7-{rep}");
        ctx.georep_session(&home, &name, &master, &gs, Link::Ssh, &[])?;
        g.runs.push(ctx.georep_sync(&home, &name, Link::Ssh)?);
        verify_same(&master, &gs)?;
        crate::procs::setup(&mut ctx.georep(&home, &["delete", &name]))?;
        slave_alloc = slave_alloc.max(allocated(&gs.join("sparse.img"))?);
        empty_dir(&rs)?;
        r.runs.push(ctx.rsync(&opts, &master, &rs, Link::Ssh)?);
        verify_same(&master, &rs)?;
    }
    let mut o = Outcome {
        id: "W7".into(),
        title: format!(
            "new {} MiB sparse image, {} MiB allocated, over ssh",
            size / MIB,
            alloc / MIB
        ),
        tools: vec![g, r],
        checks: vec![],
        notes: vec![format!(
            "allocated on georep's slave: {} MiB (master: {} MiB)",
            slave_alloc / MIB,
            alloc / MIB
        )],
    };
    let gb = o.tool("georep").median_bytes() as f64 / alloc as f64;
    o.checks.push(at_most("bytes georep/allocated", gb, 1.01));
    o.checks.push(at_most(
        "allocated on slave/master",
        slave_alloc as f64 / alloc as f64,
        1.01,
    ));
    Ok(o)
}

/// W8: a new incompressible file over ssh, against the link's limit (`cat | ssh cat`).
pub fn w8(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let w = ctx.dir.join("w8");
    let (master, gs, rs, raw, home) = (
        w.join("master"),
        w.join("georep-slave"),
        w.join("rsync-slave"),
        w.join("raw-slave"),
        w.join("home"),
    );
    let size = if ctx.quick { 256 * MIB } else { 2 * GIB };
    empty_dir(&master)?;
    data::random_file(&master.join("new.img"), size, 8)?;
    empty_dir(&home)?;
    let opts = ["-a", "--whole-file"];
    let mut g = tool("georep", "sync (new file)");
    let mut r = tool("rsync", &opts.join(" "));
    let mut c = tool(
        "ssh cat",
        "cat FILE | ssh HOST 'cat > FILE' (the link's limit; no fsync)",
    );
    let cfg = ctx.ssh_config(Link::Ssh)?;
    for rep in 0..ctx.reps {
        ctx.sampling(rep == 0);
        empty_dir(&gs)?;
        let name = format!("w8-{rep}");
        ctx.georep_session(&home, &name, &master, &gs, Link::Ssh, &[])?;
        g.runs.push(ctx.georep_sync(&home, &name, Link::Ssh)?);
        verify_same(&master, &gs)?;
        crate::procs::setup(&mut ctx.georep(&home, &["delete", &name]))?;
        empty_dir(&rs)?;
        r.runs.push(ctx.rsync(&opts, &master, &rs, Link::Ssh)?);
        empty_dir(&raw)?;
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "cat '{}' | ssh -F '{}' bench 'cat > {}'",
            master.join("new.img").display(),
            cfg.display(),
            raw.join("new.img").display()
        ));
        c.runs.push(ctx.measure(Link::Ssh, cmd, |_| 0)?.0);
    }
    let mut o = Outcome {
        id: "W8".into(),
        title: format!("new {} MiB incompressible file over ssh", size / MIB),
        tools: vec![g, r, c],
        checks: vec![],
        notes: vec![],
    };
    let throughput = |t: &ToolResult| size as f64 / (t.median_ms() / 1000.0) / 1e6;
    let (gt, ct) = (throughput(o.tool("georep")), throughput(o.tool("ssh cat")));
    o.notes.push(format!(
        "throughput: georep {gt:.0} MB/s, rsync {:.0} MB/s, ssh cat {ct:.0} MB/s",
        throughput(o.tool("rsync"))
    ));
    o.checks
        .push(at_least("throughput georep/ssh cat", gt / ct, 0.9));
    Ok(o)
}

/// The memory target over every workload run: worker and agent peak RSS.
pub fn memory_check(outcomes: &[Outcome]) -> Check {
    let mut worst = 0u64;
    for o in outcomes {
        if let Some(g) = o.tools.iter().find(|t| t.tool == "georep") {
            for (role, kib) in g.peaks() {
                if role.starts_with("georep") {
                    worst = worst.max(kib);
                }
            }
        }
    }
    at_most(
        "peak RSS of worker and agent, MiB",
        worst as f64 / 1024.0,
        64.0,
    )
}
