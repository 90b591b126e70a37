//! The WAN workloads of issue 15: parallel streams (W9), bandwidth caps
//! and limits (W10, W14), interrupted transfers (W11), unchanged content
//! under new mtimes (W12) and compression (W13).

use crate::bench::{empty_dir, verify_same, Ctx, Link, ToolResult};
use crate::data;
use crate::workloads::{at_least, at_most, tool, Outcome, GIB, MIB};

/// MB/s of a run of `bytes`.
fn rate(bytes: u64, t: &ToolResult) -> f64 {
    bytes as f64 / (t.median_ms() / 1000.0) / 1e6
}

/// W9: a new incompressible file through 50 ms each way (streams = auto).
pub fn w9(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let w = ctx.dir.join("w9");
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
        let name = format!("w9-{rep}");
        ctx.georep_session(&home, &name, &master, &gs, Link::Wan, &[])?;
        let (run, summary) = ctx.georep_sync_summary(&home, &name, Link::Wan)?;
        streams = summary["streams"].as_u64().unwrap_or(0);
        g.runs.push(run);
        verify_same(&master, &gs)?;
        crate::procs::setup(&mut ctx.georep(&home, &["delete", &name]))?;
        empty_dir(&rs)?;
        r.runs.push(ctx.rsync(&opts, &master, &rs, Link::Wan)?);
        verify_same(&master, &rs)?;
    }
    let mut o = Outcome {
        id: "W9".into(),
        title: format!(
            "new {} MiB incompressible file through 50 ms each way",
            size / MIB
        ),
        tools: vec![g, r],
        checks: vec![],
        notes: vec![],
    };
    let (t, _) = o.ratios();
    o.notes.push(format!(
        "georep {streams} streams (auto), {:.0} MB/s; rsync {:.0} MB/s",
        rate(size, o.tool("georep")),
        rate(size, o.tool("rsync"))
    ));
    o.checks.push(at_most("time georep/rsync", t, 0.3));
    Ok(o)
}

#[allow(dead_code)]
fn unused(_: f64) -> crate::workloads::Check {
    at_least("", 0.0, 0.0)
}
