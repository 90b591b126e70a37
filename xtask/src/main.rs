//! Project tasks. `cargo run --release -p xtask -- bench [--quick] [--json FILE]`
//! runs georep and rsync side by side on generated workloads (see docs/benchmarks.md);
//! `cargo run -p xtask -- arch` checks the crate's layering;
//! `cargo run -p xtask -- deb` builds the Debian package (`assets`: only
//! the man pages and completions);
//! `cargo run -p xtask -- fuzz [--secs N]` runs the AFL++ fuzz targets.

mod arch;
mod bench;
mod catalog;
mod data;
mod dist;
mod fuzz;
mod procs;
mod proxy;
mod sshd;
mod verify;
mod wan;
mod workloads;

use anyhow::Context;
use bench::{Ctx, Link};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;
use workloads::Outcome;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check the crate's layers: no module names a higher layer, no import cycles, no overlong file.
    Arch,
    /// Generate the man pages and shell completions from the CLI definition.
    Assets {
        /// Output directory (man/ and completions/ are made in it).
        #[arg(long, default_value = dist::ASSETS)]
        out: PathBuf,
    },
    /// Build the Debian package into target/debian/ (installs cargo-deb if missing).
    Deb {
        /// Package this georep binary instead of building a release one.
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Run the AFL++ fuzz targets (see docs/fuzzing.md), all at once.
    Fuzz {
        /// Seconds each target runs.
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// Only these targets (frame, agent, delta, journal).
        #[arg(long, value_delimiter = ',')]
        target: Vec<String>,
        /// Output directory (default: fuzz/out); an existing one is resumed.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Benchmark georep against rsync (and the link's limits).
    Bench {
        /// Small sizes: the whole run in about two minutes.
        #[arg(long)]
        quick: bool,
        /// Also write the results as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Only these workloads (comma-separated ids, e.g. W2,W8).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Repetitions of each tool per workload (median reported).
        #[arg(long)]
        reps: Option<usize>,
        /// Scratch directory (default: target/bench); needs ~25 GiB for the full run.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Drop the page cache before each timed run of each tool, where a
        /// workload supports it (V1): reads then come from the disk (needs root).
        #[arg(long)]
        drop_caches: bool,
    },
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn build_georep() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = std::process::Command::new(cargo)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "georep",
            "--bin",
            "georep",
        ])
        .current_dir(workspace_root())
        .status()?;
    anyhow::ensure!(st.success(), "building georep failed");
    Ok(workspace_root().join("target/release/georep"))
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn print_table(outcomes: &[Outcome], m: &workloads::Check) {
    println!(
        "\n(peak RSS: /proc sampled every 5 ms in the first repetition; \
         median time: of the other repetitions, which run unsampled)"
    );
    println!(
        "\n{:<4} {:<9} {:>10} {:>12}  {:<44} options",
        "id", "tool", "median s", "wire MB", "peak RSS MiB"
    );
    for o in outcomes {
        println!("-- {} : {}", o.id, o.title);
        for t in &o.tools {
            let peaks: Vec<String> = t
                .peaks()
                .iter()
                .map(|(k, v)| format!("{k} {}", mib(*v)))
                .collect();
            println!(
                "{:<4} {:<9} {:>10.3} {:>12.2}  {:<44} {}",
                o.id,
                t.tool,
                t.median_ms() / 1000.0,
                t.median_bytes() as f64 / 1e6,
                peaks.join(", "),
                t.options
            );
        }
        if o.tools.iter().any(|t| t.tool == "rsync") {
            let (rt, rb) = o.ratios();
            println!("     georep/rsync: time {rt:.3}, bytes {rb:.3}");
        }
        for c in &o.checks {
            println!(
                "     target {}: {:.3} (limit {}) {}",
                c.what,
                c.value,
                c.limit,
                if c.met { "MET" } else { "MISSED" }
            );
        }
        for n in &o.notes {
            println!("     note: {n}");
        }
    }
    println!(
        "-- M : {}: {:.1} (limit {}) {}",
        m.what,
        m.value,
        m.limit,
        if m.met { "MET" } else { "MISSED" }
    );
}

fn main() -> anyhow::Result<()> {
    let (quick, json, only, reps, dir, drop_caches) = match Cli::parse().cmd {
        Cmd::Arch => {
            let root = workspace_root();
            let report = arch::check(&root.join("src")).context("reading src/")?;
            if !arch::print(&report, &root) {
                std::process::exit(1);
            }
            return Ok(());
        }
        Cmd::Assets { out } => {
            let root = workspace_root();
            for p in dist::assets(&root.join(out))? {
                println!("{}", p.display());
            }
            return Ok(());
        }
        Cmd::Deb { binary } => {
            let deb = dist::deb(&workspace_root(), binary.as_deref())?;
            println!("{}", deb.display());
            return Ok(());
        }
        Cmd::Fuzz { secs, target, out } => {
            let targets: Vec<String> = if target.is_empty() {
                fuzz::TARGETS.iter().map(|t| t.to_string()).collect()
            } else {
                target
            };
            if let Some(t) = targets
                .iter()
                .find(|t| !fuzz::TARGETS.contains(&t.as_str()))
            {
                anyhow::bail!(
                    "unknown fuzz target {t}: the targets are {:?}",
                    fuzz::TARGETS
                );
            }
            let bins = fuzz::build()?;
            let out = out.unwrap_or_else(|| workspace_root().join("fuzz/out"));
            let runs = fuzz::run(&bins, &targets, secs, &out)?;
            fuzz::print(&runs);
            if runs.iter().any(|r| r.crashes > 0) {
                eprintln!(
                    "crashes found: see {}/TARGET/default/crashes/",
                    out.display()
                );
                std::process::exit(1);
            }
            return Ok(());
        }
        Cmd::Bench {
            quick,
            json,
            only,
            reps,
            dir,
            drop_caches,
        } => (quick, json, only, reps, dir, drop_caches),
    };
    let georep = build_georep()?;
    let dir = dir.unwrap_or_else(|| workspace_root().join("target/bench"));
    std::fs::create_dir_all(&dir)?;
    let dir = std::fs::canonicalize(&dir)?;
    let sshd = sshd::Sshd::start(&dir.join("sshd")).context("starting the benchmark sshd")?;
    let lan = proxy::Proxy::start(sshd.port, Duration::ZERO)?;
    let wan = proxy::Proxy::start(sshd.port, wan::DELAY)?;
    let wan_capped = proxy::Proxy::start_capped(sshd.port, wan::DELAY, Some(wan::CAP))?;
    let ctx = Ctx {
        dir: dir.clone(),
        georep,
        quick,
        reps: reps.unwrap_or(if quick { 2 } else { 3 }),
        marker: format!("GEOREP_BENCH_RUN={}", std::process::id()),
        sshd,
        lan,
        wan,
        wan_capped,
        sample: Default::default(),
        drop_caches,
    };
    let want = |id: &str| only.is_empty() || only.iter().any(|o| o.eq_ignore_ascii_case(id));
    let mut outcomes = Vec::new();
    type Runner = fn(&Ctx) -> anyhow::Result<Vec<Outcome>>;
    let all: [(&str, Runner); 18] = [
        ("W1", |c| Ok(vec![workloads::w1(c)?])),
        // W2 reports two pairings: W2 (atomic publish) and W2i (in place).
        ("W2", workloads::w2),
        ("W3", |c| Ok(vec![catalog::w3(c)?])),
        ("W3t", |c| Ok(vec![workloads::w3_tree(c)?])),
        ("W4", |c| Ok(vec![catalog::w4(c)?])),
        ("W5", |c| Ok(vec![workloads::w5(c, Link::Ssh)?])),
        ("W6", |c| Ok(vec![workloads::w5(c, Link::Wan)?])),
        ("W7", |c| Ok(vec![workloads::w7(c)?])),
        ("W8", |c| Ok(vec![workloads::w8(c)?])),
        // V1 reports V1 (equal trees) and V1r (rotted files, then repair).
        ("V1", verify::v1),
        ("W9", |c| Ok(vec![wan::w9(c)?])),
        ("W10", |c| Ok(vec![wan::w10(c)?])),
        ("W11", |c| Ok(vec![wan::w11(c)?])),
        ("W12", |c| Ok(vec![wan::w12(c)?])),
        ("W13", |c| Ok(vec![wan::w13(c)?])),
        ("W14", |c| Ok(vec![wan::w14(c)?])),
        ("F1", |c| Ok(vec![wan::f1(c)?])),
        ("C1", |c| Ok(vec![wan::c1(c)?])),
    ];
    for (id, run) in all {
        if !want(id) {
            continue;
        }
        eprintln!("bench: {id} ...");
        let _ = std::fs::remove_dir_all(dir.join(id.to_lowercase()));
        let o = run(&ctx).with_context(|| format!("workload {id}"))?;
        let _ = std::fs::remove_dir_all(dir.join(id.to_lowercase()));
        outcomes.extend(o);
    }
    let m = workloads::memory_check(&outcomes);
    print_table(&outcomes, &m);
    if let Some(path) = json {
        let doc = serde_json::json!({ "quick": quick, "reps": ctx.reps, "workloads": outcomes, "memory": m });
        std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)?;
        eprintln!("bench: results written to {}", path.display());
    }
    Ok(())
}
