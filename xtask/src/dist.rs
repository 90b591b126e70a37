//! Distribution: man pages and shell completions generated from the CLI
//! definition (`georep::cli::args::Cli`, with clap_mangen and
//! clap_complete), and the Debian package (cargo-deb, metadata in the
//! root `Cargo.toml`). `cargo run -p xtask -- deb` builds the release
//! binary and the package; `--binary PATH` packages an existing binary
//! instead (the test suite packages its debug build: cargo-deb refuses
//! the dev profile, so the binary is placed where the `deb-debug` profile
//! would build it and cargo-deb runs with `--no-build`).

use anyhow::{bail, Context};
use clap::CommandFactory;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The cargo-deb release the package is built with (installed if missing).
pub const CARGO_DEB_VERSION: &str = "3.6.4";
/// Where the generated assets go; `[package.metadata.deb]` names these paths.
pub const ASSETS: &str = "target/deb-assets";

/// Writes `man/*.1` (georep and every visible subcommand, nested ones as
/// `georep-point-list.1`) and `completions/{georep,_georep,georep.fish}`.
pub fn assets(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let man = out.join("man");
    let comp = out.join("completions");
    for d in [&man, &comp] {
        if d.exists() {
            std::fs::remove_dir_all(d).with_context(|| format!("clearing {}", d.display()))?;
        }
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut written = Vec::new();
    let mut cmd = georep::cli::args::Cli::command();
    cmd.build();
    man_pages(&cmd, "georep", &man, &mut written)?;
    for (shell, name) in [
        (clap_complete::Shell::Bash, "georep"),
        (clap_complete::Shell::Zsh, "_georep"),
        (clap_complete::Shell::Fish, "georep.fish"),
    ] {
        let path = comp.join(name);
        let mut buf = Vec::new();
        clap_complete::generate(
            shell,
            &mut georep::cli::args::Cli::command(),
            "georep",
            &mut buf,
        );
        std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

fn man_pages(
    cmd: &clap::Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    let page = cmd
        .clone()
        .name(name.to_string())
        .bin_name(name.replace('-', " "));
    let mut buf = Vec::new();
    clap_mangen::Man::new(page)
        .title(name.to_uppercase())
        .section("1")
        .source(format!("georep {}", env!("CARGO_PKG_VERSION")))
        .manual("georep manual")
        .render(&mut buf)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        man_pages(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Installs cargo-deb with `cargo install` unless this version is there.
fn ensure_cargo_deb() -> anyhow::Result<()> {
    let have = Command::new(cargo())
        .args(["deb", "--version"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if have
        .as_deref()
        .is_some_and(|v| v.contains(CARGO_DEB_VERSION))
    {
        return Ok(());
    }
    eprintln!("xtask deb: installing cargo-deb {CARGO_DEB_VERSION} (cargo install)");
    let st = Command::new(cargo())
        .args([
            "install",
            "--locked",
            "--quiet",
            "cargo-deb",
            "--version",
            CARGO_DEB_VERSION,
        ])
        .status()
        .context("running cargo install cargo-deb")?;
    if !st.success() {
        bail!(
            "cargo install cargo-deb {CARGO_DEB_VERSION} failed: install it by hand and run again"
        );
    }
    Ok(())
}

/// Builds `target/debian/georep_VERSION_ARCH.deb`; returns its path.
pub fn deb(root: &Path, binary: Option<&Path>) -> anyhow::Result<PathBuf> {
    ensure_cargo_deb()?;
    assets(&root.join(ASSETS))?;
    let profile = match binary {
        Some(b) => {
            let dir = root.join("target/deb-debug");
            std::fs::create_dir_all(&dir)?;
            let dest = dir.join("georep");
            let _ = std::fs::remove_file(&dest);
            std::fs::copy(b, &dest)
                .with_context(|| format!("copying {} to {}", b.display(), dest.display()))?;
            "deb-debug"
        }
        None => {
            let st = Command::new(cargo())
                .args([
                    "build",
                    "--release",
                    "--quiet",
                    "-p",
                    "georep",
                    "--bin",
                    "georep",
                ])
                .current_dir(root)
                .status()?;
            if !st.success() {
                bail!("building georep failed");
            }
            "release"
        }
    };
    let out_dir = root.join("target/debian");
    std::fs::create_dir_all(&out_dir)?;
    let out = Command::new(cargo())
        .args([
            "deb",
            "-p",
            "georep",
            "--no-build",
            "--profile",
            profile,
            "--fast",
            "-o",
        ])
        .arg(&out_dir)
        .current_dir(root)
        .output()
        .context("running cargo deb")?;
    if !out.status.success() {
        bail!(
            "cargo deb failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .trim()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    let path = PathBuf::from(path);
    if !path.is_file() {
        bail!(
            "cargo deb did not say where the package is: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(path)
}
