//! The changes a published store quarantine lists, made to the store.

use super::{invalid, io, plain, WResult};
use crate::agent::quarantine::StoreAction;
use crate::catalog::record::{self, StorageBody, StorageRecord};
use crate::catalog::store;
use std::collections::BTreeSet;
use std::path::Path;

/// Makes the store's changes a published quarantine lists: divergent
/// generations hidden and removed with the files only they used, journals
/// cut back to their common point. Idempotent.
pub fn apply(root: &Path, actions: &[StoreAction]) -> WResult<()> {
    for a in actions.iter().filter(|a| a.remove) {
        let sdir = root.join(record::snapshots_dir(&a.host));
        let live = sdir.join(&a.snapshot);
        let gone = sdir.join(format!(".deleting-{}", a.snapshot));
        let mut files = BTreeSet::new();
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
            let _ = std::fs::File::open(&sdir).and_then(|d| d.sync_all());
        }
        if gone.exists() {
            std::fs::remove_dir_all(&gone).map_err(io("removing", &gone))?;
        }
        // Files of the removed generation no remaining record names.
        let h = store::load_host(root, &a.host).map_err(|e| invalid(format!("quarantine: {e}")))?;
        let mut used = BTreeSet::new();
        for g in h.snapshots.values() {
            for d in g.disks.values() {
                for s in &d.storages {
                    used.insert(s.record.body.file().to_string());
                    if let StorageBody::Cdp(c) = &s.record.body {
                        used.insert(c.base_file.clone());
                    }
                }
            }
        }
        for f in files.difference(&used) {
            let p = plain(root, f);
            if let Ok(p) = p {
                match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io("removing", &p)(e)),
                }
            }
        }
    }
    for c in actions.iter().flat_map(|a| a.cuts.iter()) {
        let p = plain(root, &c.record)?;
        let b = std::fs::read(&p).map_err(io("reading", &p))?;
        let mut r: StorageRecord = record::parse(&p, &b, record::kind::STORAGE)
            .map_err(|e| invalid(format!("quarantine: {e}")))?;
        let StorageBody::Cdp(j) = &mut r.body else {
            return Err(invalid(format!(
                "quarantine: {}: not a journal's record",
                p.display()
            )));
        };
        if j.length <= c.length && j.points <= c.points {
            continue;
        }
        j.length = c.length;
        j.points = c.points;
        j.end = c.end;
        let journal = plain(root, &j.file)?;
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
        // The bytes after the new length are no longer the store's.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&journal)
            .map_err(io("opening", &journal))?;
        f.set_len(c.length).map_err(io("cutting", &journal))?;
        f.sync_all().map_err(io("cutting", &journal))?;
    }
    Ok(())
}
