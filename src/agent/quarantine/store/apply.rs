//! The changes a published store quarantine lists, made to the store.

use super::{backing_name, invalid, io, plain, WResult};
use crate::agent::quarantine::{StoreAction, StoreCut};
use crate::catalog::record::{self, StorageBody, StorageRecord};
use crate::catalog::store;
use std::collections::BTreeSet;
use std::path::Path;

/// Refuses an action naming anything but a host snapshot of the store.
fn check(a: &StoreAction) -> WResult<()> {
    let snap_ok = !a.snapshot.is_empty()
        && !a.snapshot.starts_with('.')
        && a.snapshot
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.');
    if !record::valid_name(&a.host) || !snap_ok {
        return Err(invalid(format!(
            "quarantine manifest: {}/{}: not a host snapshot of the store",
            a.host, a.snapshot
        )));
    }
    let dir = format!("{}/{}/", record::snapshots_dir(&a.host), a.snapshot);
    for c in &a.cuts {
        if !c.record.starts_with(&dir) || c.record[dir.len()..].contains('/') {
            return Err(invalid(format!(
                "quarantine manifest: {}: not a record of {dir}",
                c.record
            )));
        }
    }
    Ok(())
}

/// Every file the host's records need: named by a record, or in the
/// backing chain of an image one names.
fn used(root: &Path, host: &str) -> WResult<BTreeSet<String>> {
    let h = store::load_host(root, host).map_err(|e| invalid(format!("quarantine: {e}")))?;
    let mut named = Vec::new();
    for g in h.snapshots.values() {
        for d in g.disks.values() {
            for s in &d.storages {
                named.push(s.record.body.file().to_string());
                if let StorageBody::Cdp(c) = &s.record.body {
                    named.push(c.base_file.clone());
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    while let Some(f) = named.pop() {
        if !out.insert(f.clone()) || !f.ends_with(".qcow2") {
            continue;
        }
        let Ok(p) = plain(root, &f) else { continue };
        if let Ok(Some(b)) = backing_name(&p) {
            if !b.contains('/') {
                if let Some((dir, _)) = f.rsplit_once('/') {
                    named.push(format!("{dir}/{b}"));
                }
            }
        }
    }
    Ok(out)
}

/// Makes the store's changes a published quarantine lists: divergent
/// generations hidden and removed with the files nothing else needs,
/// journals cut back to their common point. Idempotent: run again after a
/// kill, or after the reverse session appended, it changes nothing more.
pub fn apply(root: &Path, actions: &[StoreAction]) -> WResult<()> {
    for a in actions {
        check(a)?;
    }
    for a in actions.iter().filter(|a| a.remove) {
        let sdir = root.join(record::snapshots_dir(&a.host));
        let live = sdir.join(&a.snapshot);
        let gone = sdir.join(format!(".deleting-{}", a.snapshot));
        let mut files = BTreeSet::new();
        let disks = record::disk_dir(&a.host, "");
        if live.is_dir() {
            if let Ok(h) = store::load_host(root, &a.host) {
                if let Some(g) = h.snapshots.values().find(|g| g.dir == a.snapshot) {
                    for d in g.disks.values() {
                        for s in &d.storages {
                            files.insert(s.record.body.file().to_string());
                        }
                    }
                }
            }
            std::fs::rename(&live, &gone).map_err(io("hiding", &live))?;
            std::fs::File::open(&sdir)
                .and_then(|d| d.sync_all())
                .map_err(io("syncing", &sdir))?;
        }
        if gone.exists() {
            std::fs::remove_dir_all(&gone).map_err(io("removing", &gone))?;
        }
        // Files of the removed generation nothing left needs (only the
        // host's own disk files: a record naming others is not followed).
        let needed = used(root, &a.host)?;
        for f in files.difference(&needed) {
            if !f.starts_with(&disks) {
                continue;
            }
            if let Ok(p) = plain(root, f) {
                match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io("removing", &p)(e)),
                }
            }
        }
    }
    for a in actions {
        for c in &a.cuts {
            cut(root, &a.host, c)?;
        }
    }
    Ok(())
}

/// Cuts a journal's record back to the common point, if it is still the
/// record the cut was planned from; then no journal byte after the
/// record's length stays (they are no longer the store's).
fn cut(root: &Path, host: &str, c: &StoreCut) -> WResult<()> {
    let p = match plain(root, &c.record) {
        Ok(p) => p,
        // Gone since (retention of the reverse session): nothing to cut.
        Err(_) if !root.join(&c.record).exists() => return Ok(()),
        Err(e) => return Err(e),
    };
    let b = std::fs::read(&p).map_err(io("reading", &p))?;
    let mut r: StorageRecord = record::parse(&p, &b, record::kind::STORAGE)
        .map_err(|e| invalid(format!("quarantine: {e}")))?;
    let StorageBody::Cdp(j) = &mut r.body else {
        return Err(invalid(format!(
            "quarantine: {}: not a journal's record",
            p.display()
        )));
    };
    if !j.file.starts_with(&record::disk_dir(host, "")) {
        return Err(invalid(format!(
            "quarantine: {}: its journal {} is not the host's",
            p.display(),
            j.file
        )));
    }
    let journal = plain(root, &j.file)?;
    if (j.length, j.points, j.end) == c.from {
        j.length = c.length;
        j.points = c.points;
        j.end = c.end;
        let tmp = p.with_file_name(format!(
            ".georep-cut-{}",
            p.file_name().unwrap_or_default().to_string_lossy()
        ));
        let write = || -> std::io::Result<()> {
            let f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut &f, &record::to_json(&r))?;
            f.sync_all()?;
            std::fs::rename(&tmp, &p)?;
            std::fs::File::open(p.parent().expect("in a directory"))?.sync_all()
        };
        write().map_err(io("cutting the journal's record", &p))?;
    }
    let length = match &r.body {
        StorageBody::Cdp(j) => j.length,
        StorageBody::Qcow(_) => unreachable!("checked above"),
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&journal)
        .map_err(io("opening", &journal))?;
    let size = f.metadata().map_err(io("reading", &journal))?.len();
    if size > length {
        f.set_len(length).map_err(io("cutting", &journal))?;
        f.sync_all().map_err(io("cutting", &journal))?;
    }
    Ok(())
}
