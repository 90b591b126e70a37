//! Publishing a generation: its images shipped (copied, or built on the
//! slave's base) and verified, then its records staged and renamed into
//! place; and removing one.

use super::*;

impl Run {
    /// Builds, ships and publishes one generation. Returns true when a
    /// journal point resolved differently from the plan (plan again).
    pub(super) async fn generation(&mut self, m: &Host, g: &GenPlan) -> Result<bool, StepError> {
        let host = g.host.clone();
        let snap = time::name(g.time);
        let mut refs = Vec::new();
        let mut records: Vec<(String, Vec<u8>)> = Vec::new();
        let mut moved = false;
        let mut held = Vec::new();
        for dp in &g.disks {
            let md = m
                .snapshots
                .values()
                .rev()
                .find_map(|s| s.disks.get(&dp.disk).filter(|d| d.covers(dp.point)))
                .ok_or_else(|| {
                    StepError::Replan(format!(
                        "{}/{} no longer has a point at {}",
                        host,
                        dp.disk,
                        time::name(dp.point)
                    ))
                })?;
            let block = md.cdp().map(|c| {
                let p = self.root.join(&c.file);
                std::fs::File::open(&p)
                    .ok()
                    .and_then(|f| {
                        cdp::Scanner::new(&f, c.length, false)
                            .ok()
                            .map(|s| s.header.block_size)
                    })
                    .unwrap_or(sample_block())
            });
            let (qrec, point) = match &dp.how {
                ImageSource::Copy { file, digest } => {
                    let files = vec![file.clone()];
                    let (f2, d2, disk) = (file.clone(), digest.clone(), dp.disk.clone());
                    held.push(
                        self.lock(&host, &dp.disk, dp.point, files, "qcow", move |h| {
                            let ok = h
                                .snapshots
                                .values()
                                .filter_map(|s| s.disks.get(&disk))
                                .flat_map(|d| d.qcows())
                                .any(|q| q.file == f2 && q.digest == d2);
                            if ok {
                                Ok(())
                            } else {
                                Err(format!("{f2} was changed or deleted"))
                            }
                        })
                        .await?,
                    );
                    (self.copy_image(&host, dp, file, digest).await?, dp.point)
                }
                ImageSource::Build { base } => {
                    let mut files = point_files(m, &dp.disk, dp.point);
                    if let Some(b) = base {
                        files.extend(point_files(m, &dp.disk, b.time));
                    }
                    let (disk, pt, bt) = (dp.disk.clone(), dp.point, base.as_ref().map(|b| b.time));
                    held.push(
                        self.lock(&host, &dp.disk, dp.point, files, "materialise", move |h| {
                            for t in std::iter::once(pt).chain(bt) {
                                if h.disk_covering(&disk, t).is_none() {
                                    return Err(format!(
                                        "{disk} no longer has a point at {}",
                                        time::name(t)
                                    ));
                                }
                            }
                            Ok(())
                        })
                        .await?,
                    );
                    self.build_image(m, &host, dp, base.as_ref()).await?
                }
            };
            moved |= point != dp.point;
            let (qname, jname) = plan::slave_storage_names(&dp.disk);
            let mut names = vec![qname.clone()];
            records.push((
                qname,
                record::to_json(&storage_record(
                    &host,
                    &snap,
                    &dp.disk,
                    StorageBody::Qcow(qrec.clone()),
                )),
            ));
            if dp.journal {
                let mut dpp = dp.clone();
                dpp.point = point;
                let j = plan::empty_journal(&host, &dpp);
                let hdr = cdp::Header {
                    block_size: block.unwrap_or(sample_block()),
                    disk_size: dp.virtual_size,
                    start: point,
                    base_time: point,
                    base_name: record::base_name(&j.base_file).to_string(),
                };
                let bytes = hdr
                    .encode()
                    .map_err(|e| StepError::Other(e.to_string()))?
                    .to_vec();
                self.put(rel(&j.file)?, bytes).await?;
                names.push(jname.clone());
                records.push((
                    jname,
                    record::to_json(&storage_record(&host, &snap, &dp.disk, StorageBody::Cdp(j))),
                ));
            }
            let drec = DiskSnapshotRecord {
                record: kind::DISK_SNAPSHOT.into(),
                host: host.clone(),
                snapshot: snap.clone(),
                disk: dp.disk.clone(),
                time: point,
                virtual_size: dp.virtual_size,
                storages: names,
            };
            let dname = record::disk_record_name(&dp.disk);
            records.push((dname.clone(), record::to_json(&drec)));
            refs.push(DiskRef {
                disk: dp.disk.clone(),
                record: dname,
            });
        }
        // Everything referenced is on the slave and verified: stage the records, then publish.
        let stage = format!("{}/.staging-{snap}", record::snapshots_dir(&host));
        let stage_rel = rel(&stage)?;
        self.e.slave.remove(stage_rel.clone()).await?.wait().await?;
        self.e
            .slave
            .mkdir(stage_rel.clone(), meta(0o755))
            .await?
            .wait()
            .await?;
        let srec = HostSnapshotRecord {
            record: kind::HOST_SNAPSHOT.into(),
            host: host.clone(),
            snapshot: snap.clone(),
            time: g.time,
            time_utc: time::rfc3339(g.time),
            disks: refs,
            source: Some(g.source.clone()),
        };
        records.push((record::SNAPSHOT_FILE.to_string(), record::to_json(&srec)));
        let mut pending = Vec::new();
        for (name, data) in records {
            let digest = crate::hash::digest::digest_of(&data);
            pending.push(
                self.e
                    .slave
                    .put_file(rel(&format!("{stage}/{name}"))?, data, digest, meta(0o644))
                    .await?,
            );
        }
        for p in pending {
            p.wait().await?;
        }
        let fin = rel(&record::snapshot_dir(&host, g.time))?;
        self.e.slave.rename(stage_rel, fin).await?.wait().await?;
        self.sum.generations_published += 1;
        tracing::info!(host = %host, snapshot = %snap, source = %g.source, "generation published");
        drop(held);
        Ok(moved)
    }

    /// The slave file to diff a new image against.
    pub(super) async fn basis_for(
        &self,
        dest: &RelPath,
        fallback: Option<String>,
    ) -> Result<Basis, StepError> {
        if let Some(e) = self.e.slave.stat(dest.clone()).await? {
            if e.kind == Kind::File {
                return Ok(Basis::Dest);
            }
        }
        if let Some(f) = fallback {
            let p = rel(&f)?;
            if self
                .e
                .slave
                .stat(p.clone())
                .await?
                .is_some_and(|e| e.kind == Kind::File)
            {
                return Ok(Basis::Other(p));
            }
        }
        Ok(Basis::None)
    }

    pub(super) async fn ship(
        &mut self,
        src: &Path,
        dest: &str,
        basis: Basis,
    ) -> Result<(u64, [u8; 32]), StepError> {
        let size = std::fs::metadata(src)
            .map_err(|e| CatalogError::io("stat", src, e))?
            .len();
        let (shipped, digest) = transfer::ship_from(&self.e, src, &rel(dest)?, size, basis).await?;
        match shipped {
            Shipped::Sent => self.e.stats.files_synced.fetch_add(1, Ordering::Relaxed),
            Shipped::Unchanged | Shipped::Updated => {
                self.sum.images_unchanged += 1;
                self.e.stats.files_unchanged.fetch_add(1, Ordering::Relaxed)
            }
        };
        Ok((size, digest))
    }

    pub(super) async fn copy_image(
        &mut self,
        host: &str,
        dp: &plan::DiskPlan,
        file: &str,
        digest: &str,
    ) -> Result<QcowStorage, StepError> {
        let src = self.root.join(file);
        let dest = record::qcow_file(host, &dp.disk, dp.point);
        let info = {
            let src = src.clone();
            blocking(move || qcow::info(&src)).await?
        };
        // A full image mostly equals its parent: diff it against the parent's replica.
        let fallback = match (&info.backing, dp.parent) {
            (None, Some(p)) => Some(record::qcow_file(host, &dp.disk, p)),
            _ => None,
        };
        let basis = self.basis_for(&rel(&dest)?, fallback).await?;
        let (size, got) = self.ship(&src, &dest, basis).await?;
        if record::hex(&got) != digest {
            return Err(StepError::Replan(format!(
                "{file} does not match its record's digest"
            )));
        }
        self.sum.images_copied += 1;
        Ok(QcowStorage {
            file: dest,
            time: dp.point,
            parent: dp.parent,
            backing: info.backing,
            size,
            digest: digest.to_string(),
        })
    }

    /// Makes the image of a point on the master side and ships it; returns
    /// its record and the point's actual time (a journal's newest point at
    /// or before the planned one).
    pub(super) async fn build_image(
        &mut self,
        m: &Host,
        host: &str,
        dp: &plan::DiskPlan,
        base: Option<&plan::BaseRef>,
    ) -> Result<(QcowStorage, u64), StepError> {
        let (root, tmp, h, disk, want) = (
            self.root.clone(),
            self.tmp.clone(),
            m.clone(),
            dp.disk.clone(),
            dp.point,
        );
        let base_t = base.map(|b| (b.time, record::base_name(&b.file).to_string()));
        let dest_of = {
            let (host, disk) = (host.to_string(), disk.clone());
            move |t: u64| record::qcow_file(&host, &disk, t)
        };
        let built = blocking(move || -> Result<(tempfile::TempPath, u64), CatalogError> {
            let t = resolve_at_or_before(&root, &h, &disk, want)?;
            let src = points::source(&root, &h, &disk, t, &tmp)?;
            let base_src = match &base_t {
                Some((bt, _)) => Some(points::source(&root, &h, &disk, *bt, &tmp)?),
                None => None,
            };
            let out = tempfile::Builder::new()
                .prefix("image-")
                .suffix(".qcow2")
                .tempfile_in(&tmp)
                .map_err(|e| CatalogError::io("create temporary in", &tmp, e))?
                .into_temp_path();
            let _ = std::fs::remove_file(&out);
            qcow::materialise(
                src.path(),
                src.format(),
                base_src.as_ref().map(|b| (b.path(), b.format())),
                base_t.as_ref().map(|b| b.1.as_str()),
                &out,
            )?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644))
                .map_err(|e| CatalogError::io("chmod", &out, e))?;
            Ok((out, t))
        })
        .await?;
        let (img, point) = built;
        let dest = dest_of(point);
        let fallback = match base {
            Some(_) => None,
            // A standalone image: the slave's newest image of the disk is the likeliest basis.
            None => self.newest_slave_image(host, &dp.disk).await,
        };
        let basis = self.basis_for(&rel(&dest)?, fallback).await?;
        let (size, digest) = self.ship(&img, &dest, basis).await?;
        self.sum.images_built += 1;
        Ok((
            QcowStorage {
                file: dest,
                time: point,
                parent: base.map(|b| b.time),
                backing: base.map(|b| record::base_name(&b.file).to_string()),
                size,
                digest: record::hex(&digest),
            },
            point,
        ))
    }

    pub(super) async fn newest_slave_image(&self, host: &str, disk: &str) -> Option<String> {
        let l = self.list(&record::disk_dir(host, disk)).await.ok()?;
        l.into_iter()
            .filter_map(|e| String::from_utf8(e.name.into_vec()).ok())
            .filter(|n| n.ends_with(".qcow2") && !n.starts_with('.'))
            .max_by_key(|n| record::time_of_file(n).unwrap_or(0))
            .map(|n| format!("{}/{n}", record::disk_dir(host, disk)))
    }

    /// Removes a generation: one rename hides it, then its records go.
    pub(super) async fn delete(&mut self, host: &str, snapshot: &str) -> Result<(), StepError> {
        let dir = rel(&format!("{}/{snapshot}", record::snapshots_dir(host)))?;
        let gone = rel(&format!(
            "{}/.deleting-{snapshot}",
            record::snapshots_dir(host)
        ))?;
        self.e.slave.remove(gone.clone()).await?.wait().await?;
        self.e.slave.rename(dir, gone.clone()).await?.wait().await?;
        self.e.slave.remove(gone).await?.wait().await?;
        self.sum.generations_deleted += 1;
        tracing::info!(
            host,
            snapshot,
            "generation deleted (its master host snapshot is gone)"
        );
        Ok(())
    }
}

/// The newest point of `disk` at or before `t` on the master (reads the journal).
pub fn resolve_at_or_before(
    root: &Path,
    h: &Host,
    disk: &str,
    t: u64,
) -> Result<u64, CatalogError> {
    let (_, d) = h.disk_covering(disk, t).ok_or_else(|| {
        CatalogError::NotFound(format!("{}/{disk}: no point at {}", h.name, time::name(t)))
    })?;
    if d.qcow_at(t).is_some() {
        return Ok(t);
    }
    let c = d.cdp().expect("covered by the journal");
    let p = root.join(&c.file);
    let f = std::fs::File::open(&p).map_err(|e| CatalogError::io("open", &p, e))?;
    let (_, spans) = cdp::spans(&f, c.length, false).map_err(|e| CatalogError::invalid(&p, e))?;
    Ok(spans
        .iter()
        .map(|s| s.time)
        .filter(|&x| x <= t)
        .max()
        .unwrap_or(c.base))
}
