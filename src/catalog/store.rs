//! The catalog of a snapshot store, assembled from its records. Assembly
//! is pure (records in, model out) so that the master (read locally) and
//! the slave (read through the agent) share it; a host snapshot whose
//! records are missing or inconsistent is left out and reported.

use super::record::{
    self, kind, CdpStorage, DiskSnapshotRecord, HostRecord, HostSnapshotRecord, QcowStorage,
    StorageBody, StorageRecord, StoreRecord,
};
use super::{time, CatalogError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub hosts: BTreeMap<String, Host>,
}

#[derive(Debug, Clone, Default)]
pub struct Host {
    pub name: String,
    pub record: Option<HostRecord>,
    /// Published host snapshots by time.
    pub snapshots: BTreeMap<u64, Snapshot>,
    /// Snapshot directories left out, with the reason.
    pub problems: Vec<String>,
    /// Their names: they exist but could not be read this time.
    pub unreadable: Vec<String>,
    /// Names starting with `.` under `snapshots/` (staging, deletion).
    pub hidden: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub dir: String,
    pub record: HostSnapshotRecord,
    pub disks: BTreeMap<String, Disk>,
}

#[derive(Debug, Clone)]
pub struct Disk {
    pub record: DiskSnapshotRecord,
    /// The storages, in the record's order (qcow images by time, then at most one journal).
    pub storages: Vec<Storage>,
}

#[derive(Debug, Clone)]
pub struct Storage {
    /// The storage record's file name in the snapshot directory.
    pub name: String,
    pub record: StorageRecord,
}

impl Disk {
    pub fn qcows(&self) -> impl Iterator<Item = &QcowStorage> {
        self.storages.iter().filter_map(|s| match &s.record.body {
            StorageBody::Qcow(q) => Some(q),
            _ => None,
        })
    }

    pub fn cdp(&self) -> Option<&CdpStorage> {
        self.storages.iter().find_map(|s| match &s.record.body {
            StorageBody::Cdp(c) => Some(c),
            _ => None,
        })
    }

    pub fn qcow_at(&self, t: u64) -> Option<&QcowStorage> {
        self.qcows().find(|q| q.time == t)
    }

    /// The newest point this disk snapshot holds.
    pub fn newest_point(&self) -> u64 {
        match self.cdp() {
            Some(c) => c.end,
            None => self
                .qcows()
                .map(|q| q.time)
                .max()
                .unwrap_or(self.record.time),
        }
    }

    /// Whether the state at `t` can be restored from this disk snapshot:
    /// a qcow point at `t`, or `t` inside the journal's range.
    pub fn covers(&self, t: u64) -> bool {
        self.qcow_at(t).is_some() || self.cdp().is_some_and(|c| c.start < t && t <= c.end)
    }

    /// The newest point at or before `t` this disk snapshot can name
    /// without reading its journal: a qcow time, or `t` itself inside the journal.
    pub fn point_at_or_before(&self, t: u64) -> Option<u64> {
        if let Some(c) = self.cdp() {
            if c.start < t && c.points > 0 {
                return Some(t.min(c.end));
            }
        }
        self.qcows().map(|q| q.time).filter(|&q| q <= t).max()
    }
}

impl Host {
    pub fn newest(&self) -> Option<&Snapshot> {
        self.snapshots.values().next_back()
    }

    /// The disk snapshot of `disk` able to restore time `t`, if any.
    pub fn disk_covering(&self, disk: &str, t: u64) -> Option<(&Snapshot, &Disk)> {
        self.snapshots
            .values()
            .rev()
            .filter_map(|s| s.disks.get(disk).map(|d| (s, d)))
            .find(|(_, d)| d.covers(t))
    }
}

/// Parses and cross-checks one snapshot directory's records.
pub fn assemble(
    host: &str,
    dir: &str,
    files: &BTreeMap<String, Vec<u8>>,
) -> Result<Snapshot, String> {
    let at = |name: &str| PathBuf::from(format!("{}/{dir}/{name}", record::snapshots_dir(host)));
    let get = |name: &str| {
        files
            .get(name)
            .ok_or_else(|| format!("{}: missing", at(name).display()))
    };
    let snap: HostSnapshotRecord = record::parse(
        &at(record::SNAPSHOT_FILE),
        get(record::SNAPSHOT_FILE)?,
        kind::HOST_SNAPSHOT,
    )
    .map_err(|e| e.to_string())?;
    if snap.host != host || snap.snapshot != dir || time::name(snap.time) != dir {
        return Err(format!(
            "{}: host {:?}, snapshot {:?} and time {} do not match its place {host}/{dir}",
            at(record::SNAPSHOT_FILE).display(),
            snap.host,
            snap.snapshot,
            snap.time
        ));
    }
    let mut disks = BTreeMap::new();
    for d in &snap.disks {
        let rec: DiskSnapshotRecord =
            record::parse(&at(&d.record), get(&d.record)?, kind::DISK_SNAPSHOT)
                .map_err(|e| e.to_string())?;
        if rec.disk != d.disk
            || rec.host != host
            || rec.snapshot != dir
            || !record::valid_name(&d.disk)
        {
            return Err(format!(
                "{}: names another disk or snapshot",
                at(&d.record).display()
            ));
        }
        let mut storages = Vec::new();
        for s in &rec.storages {
            let sr: StorageRecord =
                record::parse(&at(s), get(s)?, kind::STORAGE).map_err(|e| e.to_string())?;
            if sr.disk != d.disk || sr.host != host || sr.snapshot != dir {
                return Err(format!(
                    "{}: names another disk or snapshot",
                    at(s).display()
                ));
            }
            if !record::valid_rel(sr.body.file()) {
                return Err(format!(
                    "{}: file {:?} leaves the store",
                    at(s).display(),
                    sr.body.file()
                ));
            }
            storages.push(Storage {
                name: s.clone(),
                record: sr,
            });
        }
        check_storages(&rec, &storages).map_err(|e| format!("{}: {e}", at(&d.record).display()))?;
        if disks
            .insert(
                d.disk.clone(),
                Disk {
                    record: rec,
                    storages,
                },
            )
            .is_some()
        {
            return Err(format!(
                "{}: disk {} listed twice",
                at(record::SNAPSHOT_FILE).display(),
                d.disk
            ));
        }
    }
    Ok(Snapshot {
        dir: dir.to_string(),
        record: snap,
        disks,
    })
}

/// The shape every disk snapshot has: qcow points in increasing time from
/// the disk snapshot's time, then at most one journal based on the last.
fn check_storages(rec: &DiskSnapshotRecord, storages: &[Storage]) -> Result<(), String> {
    let mut last_qcow: Option<&QcowStorage> = None;
    for (i, s) in storages.iter().enumerate() {
        match &s.record.body {
            StorageBody::Qcow(q) => {
                match last_qcow {
                    None if q.time != rec.time => {
                        return Err(format!(
                            "first image at {} but the disk snapshot is at {}",
                            q.time, rec.time
                        ))
                    }
                    Some(p) if q.time <= p.time => return Err("images not in time order".into()),
                    _ => {}
                }
                last_qcow = Some(q);
            }
            StorageBody::Cdp(c) => {
                let Some(base) = last_qcow else {
                    return Err("a journal before any image".into());
                };
                if i + 1 != storages.len() {
                    return Err("the journal is not the last storage".into());
                }
                if c.base != base.time
                    || c.base_file != base.file
                    || c.start < c.base
                    || c.end < c.start
                {
                    return Err(format!(
                        "journal {} does not follow its base image {}",
                        c.file, base.file
                    ));
                }
            }
        }
    }
    if last_qcow.is_none() {
        return Err("no image".into());
    }
    Ok(())
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CatalogError + 'a {
    move |source| CatalogError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that `root` is a snapshot store (its `store.json`).
pub fn check_store(root: &Path) -> Result<(), CatalogError> {
    let p = root.join(record::STORE_FILE);
    let bytes = std::fs::read(&p).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            CatalogError::NotAStore(root.to_path_buf())
        } else {
            CatalogError::Io {
                op: "read",
                path: p.clone(),
                source: e,
            }
        }
    })?;
    let s: StoreRecord =
        serde_json::from_slice(&bytes).map_err(|e| CatalogError::invalid(&p, e))?;
    if s.format != record::FORMAT || s.version != record::VERSION {
        return Err(CatalogError::invalid(
            &p,
            format!(
                "format {:?} version {} (this georep reads {:?} version {})",
                s.format,
                s.version,
                record::FORMAT,
                record::VERSION
            ),
        ));
    }
    Ok(())
}

fn list_names(dir: &Path) -> Result<Vec<String>, CatalogError> {
    let mut out = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(rd) => {
            for e in rd {
                let e = e.map_err(io_err("list", dir))?;
                if let Ok(n) = e.file_name().into_string() {
                    out.push(n);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("list", dir)(e)),
    }
    out.sort();
    Ok(out)
}

/// Loads one host of a local store.
pub fn load_host(root: &Path, host: &str) -> Result<Host, CatalogError> {
    let mut h = Host {
        name: host.to_string(),
        ..Host::default()
    };
    let hf = root.join(record::host_file(host));
    match std::fs::read(&hf) {
        Ok(b) => match record::parse::<HostRecord>(&hf, &b, kind::HOST) {
            Ok(r) => h.record = Some(r),
            Err(e) => h.problems.push(e.to_string()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("read", &hf)(e)),
    }
    let sdir = root.join(record::snapshots_dir(host));
    for name in list_names(&sdir)? {
        if name.starts_with('.') {
            h.hidden.push(name);
            continue;
        }
        let dir = sdir.join(&name);
        let mut files = BTreeMap::new();
        for f in list_names(&dir)? {
            if f.ends_with(".json") && !f.starts_with('.') {
                match std::fs::read(dir.join(&f)) {
                    Ok(b) => {
                        files.insert(f, b);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("read", &dir.join(&f))(e)),
                }
            }
        }
        match assemble(host, &name, &files) {
            Ok(s) => {
                h.snapshots.insert(s.record.time, s);
            }
            Err(e) => {
                h.problems.push(e);
                h.unreadable.push(name);
            }
        }
    }
    Ok(h)
}

/// The names of a local store's hosts (nothing of them read).
pub fn host_names(root: &Path) -> Result<Vec<String>, CatalogError> {
    check_store(root)?;
    Ok(list_names(&root.join(record::HOSTS))?
        .into_iter()
        .filter(|h| record::valid_name(h))
        .collect())
}

/// Loads every host of a local store.
pub fn load(root: &Path) -> Result<Catalog, CatalogError> {
    check_store(root)?;
    let mut c = Catalog::default();
    for host in list_names(&root.join(record::HOSTS))? {
        if record::valid_name(&host) {
            c.hosts.insert(host.clone(), load_host(root, &host)?);
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::record::{DiskRef, StorageRecord};

    fn files_for(cdp_base_ok: bool) -> BTreeMap<String, Vec<u8>> {
        let t = 1_000_000_000_000_000_000u64;
        let dir = time::name(t);
        let mut f = BTreeMap::new();
        f.insert(
            record::SNAPSHOT_FILE.to_string(),
            record::to_json(&HostSnapshotRecord {
                record: kind::HOST_SNAPSHOT.into(),
                host: "h".into(),
                snapshot: dir.clone(),
                time: t,
                time_utc: time::rfc3339(t),
                disks: vec![DiskRef {
                    disk: "d".into(),
                    record: "disk-d.json".into(),
                }],
                source: None,
            }),
        );
        f.insert(
            "disk-d.json".into(),
            record::to_json(&DiskSnapshotRecord {
                record: kind::DISK_SNAPSHOT.into(),
                host: "h".into(),
                snapshot: dir.clone(),
                disk: "d".into(),
                time: t,
                virtual_size: 1 << 20,
                storages: vec!["s0.json".into(), "s1.json".into()],
            }),
        );
        let st = |body| StorageRecord {
            record: kind::STORAGE.into(),
            host: "h".into(),
            snapshot: dir.clone(),
            disk: "d".into(),
            body,
        };
        let qfile = record::qcow_file("h", "d", t);
        f.insert(
            "s0.json".into(),
            record::to_json(&st(StorageBody::Qcow(QcowStorage {
                file: qfile.clone(),
                time: t,
                parent: None,
                backing: None,
                size: 1,
                digest: String::new(),
            }))),
        );
        f.insert(
            "s1.json".into(),
            record::to_json(&st(StorageBody::Cdp(CdpStorage {
                file: record::cdp_file("h", "d", t),
                base: if cdp_base_ok { t } else { t + 1 },
                base_file: qfile,
                start: t,
                end: t + 10,
                length: 500,
                points: 2,
            }))),
        );
        f
    }

    #[test]
    fn assembles_a_consistent_snapshot_and_refuses_broken_ones() {
        let f = files_for(true);
        let dir = time::name(1_000_000_000_000_000_000);
        let s = assemble("h", &dir, &f).unwrap();
        let d = &s.disks["d"];
        assert_eq!(d.newest_point(), 1_000_000_000_000_000_010);
        assert!(d.covers(1_000_000_000_000_000_005));
        assert!(!d.covers(1_000_000_000_000_000_011));
        assert!(assemble("h", &dir, &files_for(false)).is_err());
        let mut missing = f.clone();
        missing.remove("s1.json");
        assert!(assemble("h", &dir, &missing)
            .unwrap_err()
            .contains("missing"));
        assert!(assemble("other", &dir, &f).is_err());
    }
}
