//! The operator's commands on a store, on either site: `georep point
//! list|restore|verify|locks` and `georep sample-store`. Output goes to
//! stdout; errors are returned for the CLI to print.

use crate::catalog::points::{self, Filter};
use crate::catalog::sample::{self, Activity, SampleOptions};
use crate::catalog::{locks, store, time, CatalogError};
use std::path::Path;

/// `georep point list STORE [--host H] [--disk D] [--json]`.
pub fn point_list(root: &Path, filter: &Filter, json: bool) -> Result<(), CatalogError> {
    let cat = store::load(root)?;
    if let Some(h) = &filter.host {
        if !cat.hosts.contains_key(h) {
            return Err(CatalogError::NotFound(format!(
                "no host {h:?} in {}: hosts are {}",
                root.display(),
                cat.hosts.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
    }
    let pts = points::list(root, &cat, filter)?;
    let rpo: Vec<_> = points::rpo(&cat)
        .into_iter()
        .filter(|r| filter.host.as_ref().is_none_or(|h| h == &r.host))
        .collect();
    if json {
        let v = serde_json::json!({ "points": pts, "hosts": rpo });
        crate::outln!("{}", serde_json::to_string_pretty(&v).expect("serializes"));
        return Ok(());
    }
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<10} {:<31} {:<5} FILE",
        "HOST", "DISK", "TIME", "TYPE"
    );
    for p in &pts {
        let kind = match p.kind {
            points::PointKind::Qcow => "qcow",
            points::PointKind::Cdp => "cdp",
        };
        let _ = writeln!(
            out,
            "{:<12} {:<10} {:<31} {:<5} {}",
            p.host, p.disk, p.time_utc, kind, p.file
        );
    }
    for r in &rpo {
        let _ = match (r.newest_complete, r.age_secs) {
            (Some(t), Some(age)) => writeln!(
                out,
                "{}: newest complete point {} (age {}), {} host snapshots",
                r.host,
                time::rfc3339(t),
                time::age(age),
                r.snapshots
            ),
            _ => writeln!(out, "{}: no complete point", r.host),
        };
    }
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
    for h in cat.hosts.values() {
        for p in &h.problems {
            eprintln!("warning: left out: {p}");
        }
    }
    Ok(())
}

/// `georep point restore STORE POINT -o IMAGE`.
pub fn point_restore(root: &Path, point: &str, out: &Path) -> Result<(), CatalogError> {
    let r = points::parse_point(point)?;
    if out.is_dir() {
        return Err(CatalogError::Usage(format!(
            "{} is a directory: give the image file to write",
            out.display()
        )));
    }
    let cat = store::load(root)?;
    let p = points::restore(root, &cat, &r, out)?;
    eprintln!(
        "restored {}/{}@{} ({} point from {}) to {}",
        p.host,
        p.disk,
        time::name(p.time),
        match p.kind {
            points::PointKind::Qcow => "qcow",
            points::PointKind::Cdp => "cdp",
        },
        p.file,
        out.display()
    );
    Ok(())
}

/// `georep point verify STORE`: Ok(true) when every record verifies.
pub fn point_verify(root: &Path, json: bool) -> Result<bool, CatalogError> {
    let problems = points::verify(root)?;
    if json {
        crate::outln!(
            "{}",
            serde_json::json!({ "ok": problems.is_empty(), "problems": problems })
        );
    } else if problems.is_empty() {
        crate::outln!("{}: every record verifies against its data", root.display());
    } else {
        for p in &problems {
            crate::outln!("{p}");
        }
    }
    Ok(problems.is_empty())
}

/// `georep point locks STORE`: the point locks held on a master store.
pub fn point_locks(root: &Path, json: bool) -> Result<(), CatalogError> {
    let l = locks::list(root)?;
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(&l).expect("serializes"));
        return Ok(());
    }
    if l.is_empty() {
        crate::outln!("no point locks in {}", root.display());
    }
    for x in &l {
        crate::outln!(
            "{} {}/{}@{} session {} pid {} since {} ({}): {}",
            if x.live { "held " } else { "stale" },
            x.record.host,
            x.record.disk,
            time::name(x.record.time),
            x.record.session,
            x.record.holder.pid,
            time::rfc3339(x.record.since),
            x.record.purpose,
            x.record.files.join(", ")
        );
    }
    Ok(())
}

/// `georep sample-store DIR [...]` and `--advance`.
pub fn sample_store(
    dir: &Path,
    o: &SampleOptions,
    advance: bool,
    only: Option<Activity>,
) -> Result<(), CatalogError> {
    let log = if advance {
        store::check_store(dir)?;
        sample::advance(dir, o, only)?
    } else {
        sample::create(dir, o)?
    };
    for l in log {
        crate::outln!("{l}");
    }
    Ok(())
}

/// The text summary of a catalog-mode `georep sync`.
pub fn print_sync(s: &crate::engine::outcome::Summary, c: &crate::engine::outcome::CatalogSummary) {
    crate::outln!(
        "catalog sync: {} host snapshots published, {} deleted; images {} copied, {} built, {} already there; {} cdp points appended ({} bytes); {} bytes sent; {} failures; {} ms",
        c.generations_published,
        c.generations_deleted,
        c.images_copied,
        c.images_built,
        c.images_unchanged,
        c.cdp_points,
        c.cdp_bytes,
        s.bytes_sent,
        s.failures,
        s.duration_ms
    );
    for r in &c.newest {
        if let (Some(t), Some(age)) = (r.newest_complete, r.age_secs) {
            crate::outln!(
                "  {}: newest complete point on the slave {} (age {})",
                r.host,
                time::rfc3339(t),
                time::age(age)
            );
        }
    }
    for f in &s.errors {
        eprintln!("failed: {}: {}", f.path, f.error);
    }
}
