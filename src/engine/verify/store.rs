//! Verification of a snapshot store's replica (`layout = store`). The
//! replica is not a mirror of the master (interval mode keeps the newest
//! point only, a journal's points become an image, chains are rebuilt on
//! the slave's base), so instead of comparing trees every point is checked
//! on both sides against its records: on the master locally (as `point
//! verify` does), on the slave through the agent, without moving the data
//! — an image's size and digest from its window hashes (the same items as
//! a tree verification, 40 bytes per 4 MiB), a journal's header, checksums
//! and whole points by `VerifyJournal`. A slave image that fails and that
//! the master holds byte for byte (same file, same recorded digest) is
//! shipped again by delta and verified against its record.

use super::compare::{Finding, What};
use super::repair::Repaired;
use crate::catalog::record::{self, StorageBody};
use crate::catalog::store::Catalog;
use crate::engine::catalog_mode::{read_slave_host, slave_host_names};
use crate::engine::context::Engine;
use crate::engine::slave::Slave;
use crate::engine::transfer::{self, Basis};
use crate::fs::meta::Kind;
use crate::fs::relpath::RelPath;
use crate::hash::stream::{Item, Key};
use crate::hash::Hash32;
use crate::protocol::{ErrorKind, ProtoError};
use std::path::Path;

/// What checking a store found.
#[derive(Debug, Default)]
pub struct StoreCheck {
    /// Slave storages (images and journals) checked, and their bytes.
    pub entries: u64,
    pub bytes: u64,
    pub findings: Vec<Finding>,
    /// The master's own records that do not verify against its data.
    pub master_problems: Vec<String>,
}

fn rel(p: &str) -> Result<RelPath, ProtoError> {
    RelPath::new(p.as_bytes().to_vec()).map_err(|e| ProtoError::Violation(format!("{p}: {e}")))
}

/// Size and digest (see `hash::digest`) of a slave file from its window
/// hashes; None when it is not a regular file there.
pub async fn slave_digest(
    slave: &Slave,
    path: &RelPath,
    rate: u64,
    rid: &mut u64,
) -> Result<Option<(u64, Hash32)>, ProtoError> {
    let (mut from, to) = (Key::before(path), Key::after(path));
    let mut size = None;
    let mut outer = blake3::Hasher::new();
    loop {
        *rid += 1;
        let reply = slave
            .verify_range(*rid, from.clone(), to.clone(), rate, false)
            .await?
            .wait()
            .await?;
        let items = slave
            .verify_items(*rid, from.clone(), to.clone(), rate, false)
            .await?
            .wait()
            .await?;
        for i in &items {
            match i {
                Item::Entry { kind, size: s, .. } if i.path() == path && *kind == Kind::File => {
                    size = Some(*s)
                }
                Item::Window { hash, .. } if i.path() == path => {
                    outer.update(hash);
                }
                _ => {}
            }
        }
        match reply.stopped {
            Some(s) => from = s,
            None => break,
        }
    }
    Ok(size.map(|s| {
        outer.update(&s.to_le_bytes());
        (s, *outer.finalize().as_bytes())
    }))
}

fn finding(path: &RelPath, what: What, why: String) -> Finding {
    Finding {
        path: path.clone(),
        what,
        kind: Kind::File,
        ranges: Vec::new(),
        fields: vec![why],
        below: 0,
        master_size: None,
        slave_size: None,
        windows: Vec::new(),
    }
}

/// Checks one storage of the slave against its record; None when it verifies.
async fn check_storage(
    slave: &Slave,
    body: &StorageBody,
    point: &str,
    rate: u64,
    rid: &mut u64,
    bytes: &mut u64,
) -> Result<Option<Finding>, ProtoError> {
    match body {
        StorageBody::Qcow(q) => {
            let p = rel(&q.file)?;
            Ok(match slave_digest(slave, &p, rate, rid).await? {
                None => Some(finding(
                    &p,
                    What::Missing,
                    format!("{point}: its image is missing"),
                )),
                Some((size, _)) if size != q.size => {
                    *bytes += size;
                    let mut f = finding(
                        &p,
                        What::Size,
                        format!("{point}: {size} bytes, its record says {}", q.size),
                    );
                    (f.master_size, f.slave_size) = (Some(q.size), Some(size));
                    Some(f)
                }
                Some((size, d)) => {
                    *bytes += size;
                    (record::hex(&d) != q.digest).then(|| {
                        finding(
                            &p,
                            What::Content,
                            format!("{point}: the image does not match its record's digest"),
                        )
                    })
                }
            })
        }
        StorageBody::Cdp(c) => {
            let p = rel(&c.file)?;
            let res = slave
                .verify_journal(p.clone(), c.length, rate)
                .await?
                .wait()
                .await;
            *bytes += c.length;
            Ok(match res {
                Err(ProtoError::Remote(e)) if e.kind == ErrorKind::NotFound => Some(finding(
                    &p,
                    What::Missing,
                    format!("{point}: its journal is missing"),
                )),
                Err(ProtoError::Remote(e)) => Some(finding(
                    &p,
                    What::Content,
                    format!("{point}: {}", e.message),
                )),
                Err(e) => return Err(e),
                Ok(j) => {
                    let wrong = if j.end != c.length {
                        Some(format!(
                            "whole points end at {}, the record says {}",
                            j.end, c.length
                        ))
                    } else if j.points != c.points || j.last != c.end {
                        Some(format!(
                            "{} points ending at {}, the record says {} ending at {}",
                            j.points, j.last, c.points, c.end
                        ))
                    } else if j.start != c.start
                        || j.base != c.base
                        || j.base_name != record::base_name(&c.base_file)
                    {
                        Some("the journal's header does not match its record".to_string())
                    } else {
                        None
                    };
                    wrong.map(|w| finding(&p, What::Content, format!("{point}: {w}")))
                }
            })
        }
    }
}

/// Checks every point of the slave's store against its records, and the
/// master's store against its own (locally).
pub async fn check(slave: &Slave, master: &Path, rate: u64) -> Result<StoreCheck, ProtoError> {
    let mut out = StoreCheck::default();
    let m = master.to_path_buf();
    out.master_problems = tokio::task::spawn_blocking(move || crate::catalog::points::verify(&m))
        .await
        .expect("verify panicked")
        .unwrap_or_else(|e| vec![e.to_string()]);
    let mut rid = 0;
    let mut records = 0;
    for host in slave_host_names(slave).await? {
        let h = read_slave_host(slave, &host, &mut records).await?;
        for p in &h.problems {
            let dir = rel(&record::snapshots_dir(&host))?;
            out.findings
                .push(finding(&dir, What::Metadata, format!("{host}: {p}")));
        }
        for s in h.snapshots.values() {
            for (disk, d) in &s.disks {
                for st in &d.storages {
                    let point = format!("{host}/{disk} of snapshot {} ({})", s.dir, st.name);
                    out.entries += 1;
                    if let Some(f) = check_storage(
                        slave,
                        &st.record.body,
                        &point,
                        rate,
                        &mut rid,
                        &mut out.bytes,
                    )
                    .await?
                    {
                        out.findings.push(f);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Ships again, from the master, each failing slave image the master
/// holds byte for byte (same file and recorded digest), checking the
/// result against the record; the others are reported as not repaired.
pub async fn repair(
    e: &Engine,
    master: &Catalog,
    slave_records: &[(Finding, Option<String>)],
) -> Repaired {
    let mut out = Repaired::default();
    for (f, digest) in slave_records {
        let file = String::from_utf8_lossy(f.path.as_bytes()).into_owned();
        let held = master
            .hosts
            .values()
            .flat_map(|h| h.snapshots.values())
            .flat_map(|s| s.disks.values())
            .flat_map(|d| d.qcows())
            .find(|q| q.file == file);
        let res = match (held, digest) {
            (Some(q), Some(want)) if &q.digest == want => {
                let src = e.master.path(&f.path);
                match transfer::ship_from(e, &src, &f.path, q.size, Basis::Dest).await {
                    Ok((_, got)) if &record::hex(&got) == want => Ok(()),
                    Ok(_) => Err("shipped, but the master's file no longer matches the record".to_string()),
                    Err(err) => Err(err.to_string()),
                }
            }
            _ => Err("not held by the master byte for byte (a journal, or an image built on the slave): restore the point from the master's store and sync, or delete the generation on the slave".to_string()),
        };
        match res {
            Ok(()) => {
                out.repaired += 1;
                out.paths.push(f.path.clone());
            }
            Err(err) => out.failed.push((file, err)),
        }
    }
    out
}

/// The recorded digest of each slave finding's image (for [`repair`]).
pub async fn recorded_digests(
    slave: &Slave,
    findings: &[Finding],
) -> Result<Vec<(Finding, Option<String>)>, ProtoError> {
    let mut records = 0;
    let mut out = Vec::new();
    let mut hosts = std::collections::BTreeMap::new();
    for f in findings {
        let file = String::from_utf8_lossy(f.path.as_bytes()).into_owned();
        let host = file.split('/').nth(1).unwrap_or("").to_string();
        if !hosts.contains_key(&host) && file.starts_with("hosts/") {
            hosts.insert(
                host.clone(),
                read_slave_host(slave, &host, &mut records).await?,
            );
        }
        let digest = hosts.get(&host).and_then(|h| {
            h.snapshots
                .values()
                .flat_map(|s| s.disks.values())
                .flat_map(|d| d.qcows())
                .find(|q| q.file == file)
                .map(|q| q.digest.clone())
        });
        out.push((f.clone(), digest));
    }
    Ok(out)
}

/// Checks the given slave images again (after a repair).
pub async fn recheck(
    slave: &Slave,
    digests: &[(Finding, Option<String>)],
    rate: u64,
) -> Result<Vec<Finding>, ProtoError> {
    let mut rid = 1 << 32;
    let mut out = Vec::new();
    for (f, want) in digests {
        match (slave_digest(slave, &f.path, rate, &mut rid).await?, want) {
            (Some((_, d)), Some(w)) if &record::hex(&d) == w => {}
            _ => out.push(f.clone()),
        }
    }
    Ok(out)
}
