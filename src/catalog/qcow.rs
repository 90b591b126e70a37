//! qcow2 images through `qemu-img` (a real dependency: the qemu-utils
//! package). Every call captures the tool's stderr into its error, and the
//! child dies with its parent (PR_SET_PDEATHSIG) or when dropped.

use super::CatalogError;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// Kills the child if it is still running when dropped.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run(tool: &str, args: &[&std::ffi::OsStr]) -> Result<Output, CatalogError> {
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no
    // memory of the parent, so it is sound between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let describe = || {
        let a: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        format!("{tool} {}", a.join(" "))
    };
    let child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            CatalogError::Tool(format!(
                "{tool} not found: install qemu-utils (packaging/setup.sh does)"
            ))
        } else {
            CatalogError::Tool(format!("starting {}: {e}", describe()))
        }
    })?;
    let mut guard = ChildGuard(Some(child));
    let out = guard
        .0
        .take()
        .expect("just set")
        .wait_with_output()
        .map_err(|e| CatalogError::Tool(format!("{}: {e}", describe())))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(CatalogError::Tool(format!(
            "{} failed ({}): {}",
            describe(),
            out.status,
            err.trim().replace('\n', " | ")
        )));
    }
    Ok(out)
}

fn qemu_img(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Result<Output, CatalogError> {
    let a: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    run("qemu-img", &a)
}

/// What `qemu-img info` says about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub virtual_size: u64,
    pub format: String,
    /// The backing file name as written in the header.
    pub backing: Option<String>,
}

pub fn info(img: &Path) -> Result<Info, CatalogError> {
    let out = qemu_img(&[&"info", &"--output=json", &"-U", &img])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| CatalogError::Tool(format!("qemu-img info {}: {e}", img.display())))?;
    Ok(Info {
        virtual_size: v["virtual-size"].as_u64().unwrap_or(0),
        format: v["format"].as_str().unwrap_or("").to_string(),
        backing: v["backing-filename"].as_str().map(str::to_string),
    })
}

/// A new qcow2 image of `size` bytes, all zeros.
pub fn create(img: &Path, size: u64) -> Result<(), CatalogError> {
    qemu_img(&[&"create", &"-q", &"-f", &"qcow2", &img, &size.to_string()])?;
    Ok(())
}

/// Converts any image (its whole chain) to a standalone image.
pub fn convert(src: &Path, src_fmt: &str, dst: &Path, dst_fmt: &str) -> Result<(), CatalogError> {
    qemu_img(&[
        &"convert", &"-q", &"-U", &"-f", &src_fmt, &"-O", &dst_fmt, &src, &dst,
    ])?;
    Ok(())
}

/// Builds `out`: a qcow2 image with the content of `content` (any format)
/// holding only the clusters that differ from `base` (whose file is then
/// its backing), or a standalone image when there is no base. The backing
/// reference written is `backing_name` (relative to `out`'s final
/// directory, a qcow2 image there), so the image is valid where it will be
/// published; without a name the base stays the backing. The image passes
/// `qemu-img check` before its backing reference is renamed.
pub fn materialise(
    content: &Path,
    content_fmt: &str,
    base: Option<(&Path, &str)>,
    backing_name: Option<&str>,
    out: &Path,
) -> Result<(), CatalogError> {
    let Some((base, base_fmt)) = base else {
        convert(content, content_fmt, out, "qcow2")?;
        return check(out);
    };
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let content = abs(content);
    let base = abs(base);
    qemu_img(&[
        &"create",
        &"-q",
        &"-f",
        &"qcow2",
        &"-b",
        &content,
        &"-F",
        &content_fmt,
        &out,
    ])?;
    // Safe rebase: writes into `out` exactly the clusters where the old
    // backing (the content) and the new one (the base) differ.
    qemu_img(&[
        &"rebase", &"-q", &"-f", &"qcow2", &"-b", &base, &"-F", &base_fmt, &out,
    ])?;
    check(out)?;
    match backing_name {
        // Where it is published, the backing is a qcow2 image whatever the base was here.
        Some(name) => set_backing(out, name, "qcow2"),
        None => Ok(()),
    }
}

/// Rewrites the backing reference in the header only (no data changes).
pub fn set_backing(img: &Path, name: &str, fmt: &str) -> Result<(), CatalogError> {
    qemu_img(&[
        &"rebase", &"-q", &"-u", &"-f", &"qcow2", &"-b", &name, &"-F", &fmt, &img,
    ])?;
    Ok(())
}

/// Pulls every cluster of the backing chain into the image and drops the
/// backing reference: a standalone image with the same content.
pub fn flatten(img: &Path) -> Result<(), CatalogError> {
    qemu_img(&[&"rebase", &"-q", &"-f", &"qcow2", &"-b", &"", &img])?;
    Ok(())
}

/// Ranges `(offset, length)` allocated in the image's own (top) layer.
pub fn top_extents(img: &Path) -> Result<Vec<(u64, u64)>, CatalogError> {
    let out = qemu_img(&[&"map", &"--output=json", &"-U", &"-f", &"qcow2", &img])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| CatalogError::Tool(format!("qemu-img map {}: {e}", img.display())))?;
    let mut ext: Vec<(u64, u64)> = Vec::new();
    for m in v.as_array().into_iter().flatten() {
        let depth = m["depth"].as_u64().unwrap_or(u64::MAX);
        let present = m["present"].as_bool().unwrap_or(false);
        if depth == 0 && present {
            let (s, l) = (
                m["start"].as_u64().unwrap_or(0),
                m["length"].as_u64().unwrap_or(0),
            );
            match ext.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += l,
                _ => ext.push((s, l)),
            }
        }
    }
    Ok(ext)
}

/// `qemu-img check`: Ok when no error or leak is found.
pub fn check(img: &Path) -> Result<(), CatalogError> {
    qemu_img(&[&"check", &"-q", &"-U", &img])?;
    Ok(())
}

/// Whether two images (any formats, whole chains) have the same content.
pub fn same_content(a: &Path, b: &Path) -> Result<bool, CatalogError> {
    let a: &std::ffi::OsStr = a.as_ref();
    let b: &std::ffi::OsStr = b.as_ref();
    let mut cmd = Command::new("qemu-img");
    cmd.args(["compare", "-q", "-U"])
        .arg(a)
        .arg(b)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let out = cmd.output().map_err(|e| {
        CatalogError::Tool(format!(
            "qemu-img compare: {e}: install qemu-utils (packaging/setup.sh does)"
        ))
    })?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(CatalogError::Tool(format!(
            "qemu-img compare {} {}: {}",
            Path::new(a).display(),
            Path::new(b).display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}
