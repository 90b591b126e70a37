//! `cargo run -p xtask -- fuzz [--secs N] [--target T]... [--out DIR]`:
//! builds the AFL++ targets of `fuzz/` with cargo-afl (stable Rust; see
//! docs/fuzzing.md) and runs each for N seconds from its seed corpus,
//! all at once (each `nice`d), then reports executions, crashes and
//! hangs per target. With an existing `--out`, runs resume where they
//! stopped. A crash found is kept under `OUT/TARGET/default/crashes/`.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The targets: the frame decoder, the agent's request handler against a
/// temporary root, the rsync delta applier and the CDP journal parser.
pub const TARGETS: [&str; 4] = ["frame", "agent", "delta", "journal"];

/// What one target's run did.
#[derive(Debug, Clone)]
pub struct Run {
    pub target: String,
    pub secs: u64,
    pub execs: u64,
    pub crashes: u64,
    pub hangs: u64,
    pub corpus: u64,
}

fn fuzz_dir() -> PathBuf {
    crate::workspace_root().join("fuzz")
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Whether cargo-afl is installed (packaging/setup.sh installs it).
fn check_cargo_afl() -> anyhow::Result<()> {
    let ok = Command::new(cargo())
        .args(["afl", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    anyhow::ensure!(
        ok,
        "cargo-afl is not installed: run packaging/setup.sh (it runs `cargo install cargo-afl` and `cargo afl config --build`)"
    );
    Ok(())
}

/// Builds the targets with AFL's instrumentation; returns their directory.
pub fn build() -> anyhow::Result<PathBuf> {
    check_cargo_afl()?;
    let st = Command::new(cargo())
        .args(["afl", "build", "--release", "--quiet"])
        .current_dir(fuzz_dir())
        .env_remove("RUSTFLAGS")
        .status()
        .context("running cargo afl build")?;
    anyhow::ensure!(st.success(), "building the fuzz targets failed");
    Ok(fuzz_dir().join("target/release"))
}

fn stat(stats: &str, key: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}

fn count_files(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name() != "README.txt")
                .count() as u64
        })
        .unwrap_or(0)
}

/// Runs every target in `targets` for `secs` seconds at once, results in `out`.
pub fn run(bins: &Path, targets: &[String], secs: u64, out: &Path) -> anyhow::Result<Vec<Run>> {
    std::fs::create_dir_all(out)?;
    let mut children = Vec::new();
    for t in targets {
        let o = out.join(t);
        let resume = o.join("default/fuzzer_stats").exists();
        let seeds = fuzz_dir().join("corpus").join(t);
        let mut c = Command::new("nice");
        c.args(["-n", "10"])
            .arg(cargo())
            .args(["afl", "fuzz", "-V", &secs.to_string(), "-t", "10000", "-i"])
            .arg(if resume { PathBuf::from("-") } else { seeds })
            .arg("-o")
            .arg(&o)
            .arg("--")
            .arg(bins.join(t))
            .env("AFL_NO_UI", "1")
            .env("AFL_SKIP_CPUFREQ", "1")
            .env("AFL_NO_AFFINITY", "1")
            .env("AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES", "1")
            .env("AFL_SKIP_CRASHES", "1")
            .stdout(std::fs::File::create(out.join(format!("{t}.log")))?)
            .stderr(std::process::Stdio::inherit());
        children.push((t.clone(), c.spawn().context("starting afl-fuzz")?));
    }
    let mut runs = Vec::new();
    for (t, mut child) in children {
        let st = child.wait()?;
        let dir = out.join(&t).join("default");
        let stats = std::fs::read_to_string(dir.join("fuzzer_stats")).with_context(|| {
            format!(
                "afl-fuzz for {t} left no statistics (exit {st}); see {}",
                out.join(format!("{t}.log")).display()
            )
        })?;
        runs.push(Run {
            target: t.clone(),
            secs,
            execs: stat(&stats, "execs_done"),
            crashes: count_files(&dir.join("crashes")),
            hangs: count_files(&dir.join("hangs")),
            corpus: stat(&stats, "corpus_count"),
        });
    }
    Ok(runs)
}

pub fn print(runs: &[Run]) {
    println!(
        "{:<8} {:>7} {:>12} {:>8} {:>6} {:>7}",
        "target", "seconds", "executions", "crashes", "hangs", "corpus"
    );
    for r in runs {
        println!(
            "{:<8} {:>7} {:>12} {:>8} {:>6} {:>7}",
            r.target, r.secs, r.execs, r.crashes, r.hangs, r.corpus
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every target for 15 s (60 s in all) from the seed corpus: it runs,
    /// and finds no crash. Longer runs: `cargo run -p xtask -- fuzz --secs 1800`.
    #[test]
    fn every_fuzz_target_runs_for_a_while_without_a_crash() {
        let bins = build().unwrap();
        let out = tempfile::tempdir().unwrap();
        let targets: Vec<String> = TARGETS.iter().map(|t| t.to_string()).collect();
        let runs = run(&bins, &targets, 15, out.path()).unwrap();
        print(&runs);
        for r in &runs {
            assert!(r.execs > 0, "{}: no execution", r.target);
        }
        let crashed: Vec<&Run> = runs.iter().filter(|r| r.crashes > 0).collect();
        if !crashed.is_empty() {
            panic!(
                "crashes found: {crashed:?}, kept in {}",
                out.keep().display()
            );
        }
    }
}
