//! Points of a store: listing them, restoring one as an image, verifying
//! records against data, and the newest complete point of each host (the
//! RPO by data time). Works the same on the master and on a replica.

use super::record::{self, StorageBody};
use super::store::{self, Catalog, Disk, Host};
use super::{cdp, qcow, time, CatalogError};
use serde::Serialize;
use std::fs::File;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PointKind {
    Qcow,
    Cdp,
}

/// One restorable point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Point {
    pub host: String,
    pub disk: String,
    /// Nanoseconds since the epoch.
    pub time: u64,
    pub time_utc: String,
    #[serde(rename = "type")]
    pub kind: PointKind,
    /// The snapshot file holding it, relative to the store root.
    pub file: String,
    /// The host snapshot it belongs to.
    pub snapshot: String,
}

/// Which points to list.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub host: Option<String>,
    pub disk: Option<String>,
}

fn disk_points(
    root: &Path,
    host: &str,
    snap: &str,
    d: &Disk,
    out: &mut Vec<Point>,
) -> Result<(), CatalogError> {
    let mk = |t: u64, kind, file: &str| Point {
        host: host.to_string(),
        disk: d.record.disk.clone(),
        time: t,
        time_utc: time::rfc3339(t),
        kind,
        file: file.to_string(),
        snapshot: snap.to_string(),
    };
    for q in d.qcows() {
        out.push(mk(q.time, PointKind::Qcow, &q.file));
    }
    if let Some(c) = d.cdp() {
        if c.points > 0 {
            let p = root.join(&c.file);
            let f = File::open(&p).map_err(|e| CatalogError::io("open", &p, e))?;
            let (_, spans) =
                cdp::spans(&f, c.length, false).map_err(|e| CatalogError::invalid(&p, e))?;
            for s in spans {
                out.push(mk(s.time, PointKind::Cdp, &c.file));
            }
        }
    }
    Ok(())
}

/// Every point of the store matching `filter`, sorted by host, disk and
/// time. (A point is never held twice: replication ships each once.)
pub fn list(root: &Path, cat: &Catalog, filter: &Filter) -> Result<Vec<Point>, CatalogError> {
    let mut out = Vec::new();
    for (name, h) in &cat.hosts {
        if filter.host.as_ref().is_some_and(|f| f != name) {
            continue;
        }
        for s in h.snapshots.values() {
            for (dname, d) in &s.disks {
                if filter.disk.as_ref().is_some_and(|f| f != dname) {
                    continue;
                }
                disk_points(root, name, &s.dir, d, &mut out)?;
            }
        }
    }
    out.sort_by(|a, b| (&a.host, &a.disk, a.time, a.kind).cmp(&(&b.host, &b.disk, b.time, b.kind)));
    Ok(out)
}

/// Per host: the newest time at which every disk of its newest host
/// snapshot can be restored, and how old that is.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct HostRpo {
    pub host: String,
    pub newest_complete: Option<u64>,
    pub newest_complete_utc: Option<String>,
    pub age_secs: Option<f64>,
    pub snapshots: usize,
}

/// The newest complete restorable point of a host: the oldest of the
/// newest points of the disks of its newest host snapshot.
pub fn newest_complete(h: &Host) -> Option<u64> {
    let s = h.newest()?;
    s.disks
        .values()
        .map(|d| d.newest_point())
        .min()
        .or(Some(s.record.time))
}

/// [`newest_complete`] for every host, with its age now (RPO by data time).
pub fn rpo(cat: &Catalog) -> Vec<HostRpo> {
    let now = time::now();
    cat.hosts
        .values()
        .map(|h| {
            let t = newest_complete(h);
            HostRpo {
                host: h.name.clone(),
                newest_complete: t,
                newest_complete_utc: t.map(time::rfc3339),
                age_secs: t.map(|t| now.saturating_sub(t) as f64 / 1e9),
                snapshots: h.snapshots.len(),
            }
        })
        .collect()
}

/// The newest complete point and its age for every host of a local store
/// (what `status` shows as the replica's RPO).
pub fn store_rpo(root: &Path) -> Result<Vec<HostRpo>, CatalogError> {
    Ok(rpo(&store::load(root)?))
}

/// A point named on the command line: `HOST/DISK@TIME`, TIME as listed, in
/// nanoseconds, or `latest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointRef {
    pub host: String,
    pub disk: String,
    pub time: Option<u64>,
}

pub fn parse_point(s: &str) -> Result<PointRef, CatalogError> {
    let bad = || {
        CatalogError::Usage(format!(
            "bad point {s:?}: write HOST/DISK@TIME (TIME as `georep point list` shows it, in nanoseconds, or `latest`)"
        ))
    };
    let (hd, t) = s.split_once('@').ok_or_else(bad)?;
    let (host, disk) = hd.split_once('/').ok_or_else(bad)?;
    if !record::valid_name(host) || !record::valid_name(disk) {
        return Err(bad());
    }
    let time = if t == "latest" {
        None
    } else {
        Some(time::parse(t).ok_or_else(bad)?)
    };
    Ok(PointRef {
        host: host.into(),
        disk: disk.into(),
        time,
    })
}

/// Resolves a point reference against a store's points.
pub fn resolve(root: &Path, cat: &Catalog, r: &PointRef) -> Result<Point, CatalogError> {
    let pts = list(
        root,
        cat,
        &Filter {
            host: Some(r.host.clone()),
            disk: Some(r.disk.clone()),
        },
    )?;
    let found = match r.time {
        None => pts.last().cloned(),
        Some(t) => pts.iter().find(|p| p.time == t).cloned(),
    };
    found.ok_or_else(|| {
        CatalogError::NotFound(format!(
            "no point {}/{}@{} in {}: see `georep point list {} --host {} --disk {}`",
            r.host,
            r.disk,
            r.time.map(time::name).unwrap_or_else(|| "latest".into()),
            root.display(),
            root.display(),
            r.host,
            r.disk
        ))
    })
}

/// Where a point's content can be read by qemu-img.
pub enum Source {
    /// An image (with its chain) in the store.
    Image(PathBuf),
    /// A raw image restored into a temporary file.
    Raw(tempfile::TempPath),
}

impl Source {
    pub fn path(&self) -> &Path {
        match self {
            Source::Image(p) => p,
            Source::Raw(t) => t,
        }
    }

    pub fn format(&self) -> &'static str {
        match self {
            Source::Image(_) => "qcow2",
            Source::Raw(_) => "raw",
        }
    }
}

/// Makes the content of point (host, disk, t) readable: the qcow image
/// itself, or a raw image restored from a journal into `tmp_dir`.
pub fn source(
    root: &Path,
    h: &Host,
    disk: &str,
    t: u64,
    tmp_dir: &Path,
) -> Result<Source, CatalogError> {
    let (_, d) = h.disk_covering(disk, t).ok_or_else(|| {
        CatalogError::NotFound(format!(
            "no point {}/{disk}@{} in {}",
            h.name,
            time::name(t),
            root.display()
        ))
    })?;
    if let Some(q) = d.qcow_at(t) {
        return Ok(Source::Image(root.join(&q.file)));
    }
    let c = d.cdp().expect("covers() found it in the journal");
    let base = d.qcow_at(c.base).expect("checked by assembly");
    let raw = tempfile::Builder::new()
        .prefix(".georep-restore-")
        .tempfile_in(tmp_dir)
        .map_err(|e| CatalogError::io("create temporary in", tmp_dir, e))?
        .into_temp_path();
    qcow::convert(&root.join(&base.file), "qcow2", &raw, "raw")?;
    let jp = root.join(&c.file);
    let jf = File::open(&jp).map_err(|e| CatalogError::io("open", &jp, e))?;
    let rf = std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .map_err(|e| CatalogError::io("open", &raw, e))?;
    let (_, last) = cdp::apply(&jf, c.length, t, &rf).map_err(|e| CatalogError::invalid(&jp, e))?;
    if last != Some(t) {
        return Err(CatalogError::NotFound(format!(
            "{}: no point at {} in the journal",
            jp.display(),
            time::name(t)
        )));
    }
    Ok(Source::Raw(raw))
}

/// Materialises a point as a standalone qcow2 image at `out` (written
/// beside it first, then renamed, so `out` is never partial).
pub fn restore(
    root: &Path,
    cat: &Catalog,
    r: &PointRef,
    out: &Path,
) -> Result<Point, CatalogError> {
    let p = resolve(root, cat, r)?;
    let h = &cat.hosts[&p.host];
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let src = source(root, h, &p.disk, p.time, dir)?;
    let tmp = tempfile::Builder::new()
        .prefix(".georep-restore-")
        .tempfile_in(dir)
        .map_err(|e| CatalogError::io("create temporary in", dir, e))?
        .into_temp_path();
    qcow::convert(src.path(), src.format(), &tmp, "qcow2")?;
    tmp.persist(out)
        .map_err(|e| CatalogError::io("rename to", out, e.error))?;
    Ok(p)
}

/// Checks every published record of a store against the data: files
/// present, sizes and digests equal, backing files as recorded and
/// present, journals whole up to their recorded length with the recorded
/// points. Returns the problems found (empty: the store verifies).
pub fn verify(root: &Path) -> Result<Vec<String>, CatalogError> {
    let cat = store::load(root)?;
    let mut problems = Vec::new();
    for h in cat.hosts.values() {
        problems.extend(h.problems.iter().cloned());
        for s in h.snapshots.values() {
            for d in s.disks.values() {
                for st in &d.storages {
                    let what = format!("{}/{}/{}", h.name, s.dir, st.name);
                    if let Err(e) = verify_storage(root, &st.record.body) {
                        problems.push(format!("{what}: {e}"));
                    }
                }
            }
        }
    }
    Ok(problems)
}

fn verify_storage(root: &Path, body: &StorageBody) -> Result<(), String> {
    match body {
        StorageBody::Qcow(q) => {
            let p = root.join(&q.file);
            let (size, digest) = file_digest(&p).map_err(|e| e.to_string())?;
            if size != q.size {
                return Err(format!(
                    "{}: {size} bytes, the record says {}",
                    q.file, q.size
                ));
            }
            if record::hex(&digest) != q.digest {
                return Err(format!(
                    "{}: content does not match the record's digest",
                    q.file
                ));
            }
            let info = qcow::info(&p).map_err(|e| e.to_string())?;
            if info.backing != q.backing {
                return Err(format!(
                    "{}: backing {:?}, the record says {:?}",
                    q.file, info.backing, q.backing
                ));
            }
            if let Some(b) = &info.backing {
                let bp = p.parent().unwrap_or(root).join(b);
                if !bp.is_file() {
                    return Err(format!(
                        "{}: backing file {} is missing",
                        q.file,
                        bp.display()
                    ));
                }
            }
            Ok(())
        }
        StorageBody::Cdp(c) => {
            let p = root.join(&c.file);
            let f = File::open(&p).map_err(|e| format!("{}: {e}", c.file))?;
            let len = f.metadata().map_err(|e| e.to_string())?.len();
            if len < c.length {
                return Err(format!(
                    "{}: {len} bytes, shorter than the recorded {}",
                    c.file, c.length
                ));
            }
            let (hdr, spans) =
                cdp::spans(&f, c.length, true).map_err(|e| format!("{}: {e}", c.file))?;
            let end = spans.last().map(|s| s.end).unwrap_or(cdp::HEADER_LEN);
            if end != c.length {
                return Err(format!(
                    "{}: whole points end at {end}, the record says {}",
                    c.file, c.length
                ));
            }
            if spans.len() as u64 != c.points
                || spans.last().map(|s| s.time).unwrap_or(c.start) != c.end
            {
                return Err(format!(
                    "{}: {} points, the record says {} ending at {}",
                    c.file,
                    spans.len(),
                    c.points,
                    c.end
                ));
            }
            if hdr.start != c.start
                || hdr.base_time != c.base
                || hdr.base_name != record::base_name(&c.base_file)
            {
                return Err(format!("{}: header does not match the record", c.file));
            }
            Ok(())
        }
    }
}

/// Size and georep digest of a local file, read window by window.
pub fn file_digest(p: &Path) -> Result<(u64, [u8; 32]), CatalogError> {
    use std::os::unix::fs::FileExt;
    let f = File::open(p).map_err(|e| CatalogError::io("open", p, e))?;
    let size = f
        .metadata()
        .map_err(|e| CatalogError::io("stat", p, e))?
        .len();
    let mut d = crate::hash::digest::Digester::new();
    let mut buf = vec![0u8; crate::hash::digest::WINDOW as usize];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], off)
            .map_err(|e| CatalogError::io("read", p, e))?;
        d.feed(&buf[..n]);
        off += n as u64;
    }
    Ok((size, d.finish()))
}
