//! The appliance's space management: reclamation splits and retention
//! deletes, both honouring georep's point locks.

use super::*;

impl Appliance {
    /// Space reclamation: splits the journal of one disk (or of every disk,
    /// at the same time) of one host snapshot into an image of a middle
    /// point plus a shorter journal starting at that point. Returns the
    /// split time, or None when nothing qualifies or a lock forbids it.
    pub fn reclaim(&mut self, host: &str, all_disks: bool) -> Result<Option<u64>, CatalogError> {
        self.reclaim_where(host, all_disks, false, 0.5)
    }

    /// Reclamation of the newest host snapshot's journals, at the point
    /// `at` (0.0-1.0) of the way through them: the points most likely not
    /// replicated yet.
    pub fn reclaim_newest(
        &mut self,
        host: &str,
        all_disks: bool,
        at: f64,
    ) -> Result<Option<u64>, CatalogError> {
        self.reclaim_where(host, all_disks, true, at)
    }

    fn reclaim_where(
        &mut self,
        host: &str,
        all_disks: bool,
        newest: bool,
        at: f64,
    ) -> Result<Option<u64>, CatalogError> {
        let h = self.host(host)?;
        let mut cands: Vec<_> = h
            .snapshots
            .values()
            .filter(|s| {
                s.disks
                    .values()
                    .any(|d| d.cdp().is_some_and(|c| c.points >= 3))
            })
            .collect();
        if newest {
            cands.retain(|s| Some(s.record.time) == h.newest().map(|n| n.record.time));
        }
        if cands.is_empty() {
            self.log
                .push(format!("{host}: reclamation: no journal with 3 points"));
            return Ok(None);
        }
        let s = cands[self.rng.below(cands.len() as u64) as usize];
        let mut disks: Vec<_> = s
            .disks
            .values()
            .filter(|d| d.cdp().is_some_and(|c| c.points >= 3))
            .collect();
        if !all_disks {
            let i = self.rng.below(disks.len() as u64) as usize;
            disks = vec![disks[i]];
        }
        // The split point: one of the first disk's points that every chosen journal has.
        let spans_of = |d: &store::Disk| -> Result<Vec<cdp::PointSpan>, CatalogError> {
            let c = d.cdp().unwrap();
            let p = self.root.join(&c.file);
            let f = File::open(&p).map_err(io("open", &p))?;
            Ok(cdp::spans(&f, c.length, true)
                .map_err(|e| CatalogError::invalid(&p, e))?
                .1)
        };
        let first = spans_of(disks[0])?;
        let idx = ((first.len() as f64 * at.clamp(0.0, 1.0)) as usize).min(first.len() - 2);
        let m = first[idx].time;
        for d in &disks[1..] {
            if !spans_of(d)?.iter().any(|sp| sp.time == m) {
                disks.truncate(1);
                break;
            }
        }
        let scratch = self.scratch()?;
        let mut prepared = Vec::new();
        for d in &disks {
            let c = d.cdp().unwrap().clone();
            let disk = &d.record.disk;
            let spans = spans_of(d)?;
            let src = points::source(&self.root, &h, disk, m, scratch.path())?;
            let qfile = record::qcow_file(host, disk, m);
            let jfile = record::cdp_file(host, disk, m);
            let dir = self.root.join(record::disk_dir(host, disk));
            let qtmp = dir.join(format!(".new-{}", record::base_name(&qfile)));
            let base = self.root.join(&c.base_file);
            qcow::materialise(
                src.path(),
                src.format(),
                Some((&base, "qcow2")),
                Some(record::base_name(&c.base_file)),
                &qtmp,
            )?;
            let (qsize, qdigest) = points::file_digest(&qtmp)?;
            // The shorter journal: a new header, then the points after m, byte for byte.
            let jp = self.root.join(&c.file);
            let jf = File::open(&jp).map_err(io("open", &jp))?;
            let hdr = cdp::Header {
                block_size: BLOCK as u32,
                disk_size: d.record.virtual_size,
                start: m,
                base_time: m,
                base_name: record::base_name(&qfile).to_string(),
            };
            let mut bytes = hdr
                .encode()
                .map_err(|e| CatalogError::invalid(&jp, e))?
                .to_vec();
            let after: Vec<_> = spans.iter().filter(|sp| sp.time > m).collect();
            if let Some(a) = after.first() {
                let mut tail = vec![0u8; (c.length - a.start) as usize];
                jf.read_exact_at(&mut tail, a.start)
                    .map_err(io("read", &jp))?;
                bytes.extend(tail);
            }
            let jtmp = dir.join(format!(".new-{}", record::base_name(&jfile)));
            write_file(&jtmp, &bytes)?;
            let newc = CdpStorage {
                file: jfile.clone(),
                base: m,
                base_file: qfile.clone(),
                start: m,
                end: after.last().map(|a| a.time).unwrap_or(m),
                length: bytes.len() as u64,
                points: after.len() as u64,
            };
            let newq = QcowStorage {
                file: qfile.clone(),
                time: m,
                parent: Some(c.base),
                backing: Some(record::base_name(&c.base_file).to_string()),
                size: qsize,
                digest: record::hex(&qdigest),
            };
            prepared.push(((*d).clone(), c, newq, newc, qtmp, jtmp));
        }
        let doomed: Vec<String> = prepared.iter().map(|p| p.1.file.clone()).collect();
        let root = self.root.clone();
        let sdir = root.join(record::snapshots_dir(host)).join(&s.dir);
        let commit = || -> Result<(), CatalogError> {
            for (d, old, q, c, qtmp, jtmp) in &prepared {
                let disk = &d.record.disk;
                std::fs::rename(qtmp, root.join(&q.file)).map_err(io("rename", qtmp))?;
                std::fs::rename(jtmp, root.join(&c.file)).map_err(io("rename", jtmp))?;
                // Fresh record names: never one the disk snapshot uses (or used).
                let mut n0 = d.storages.len();
                while sdir.join(record::storage_record_name(disk, n0)).exists()
                    || sdir
                        .join(record::storage_record_name(disk, n0 + 1))
                        .exists()
                {
                    n0 += 1;
                }
                let (qn, cn) = (
                    record::storage_record_name(disk, n0),
                    record::storage_record_name(disk, n0 + 1),
                );
                write_file(
                    &sdir.join(&qn),
                    &record::to_json(&storage(host, &s.dir, disk, StorageBody::Qcow(q.clone()))),
                )?;
                write_file(
                    &sdir.join(&cn),
                    &record::to_json(&storage(host, &s.dir, disk, StorageBody::Cdp(c.clone()))),
                )?;
                let old_name = d.storages.last().unwrap().name.clone();
                let mut drec = d.record.clone();
                drec.storages.retain(|n| n != &old_name);
                drec.storages.push(qn);
                drec.storages.push(cn);
                write_file(
                    &sdir.join(record::disk_record_name(disk)),
                    &record::to_json(&drec),
                )?;
                let _ = std::fs::remove_file(sdir.join(&old_name));
                let _ = std::fs::remove_file(root.join(&old.file));
            }
            Ok(())
        };
        match locks::unless_locked(&self.root, &doomed, commit)? {
            Ok(r) => {
                r?;
                self.log.push(format!(
                    "{host}: reclaimed {} journal(s) of {} at {}",
                    prepared.len(),
                    s.dir,
                    time::name(m)
                ));
                Ok(Some(m))
            }
            Err(l) => {
                for p in &prepared {
                    let _ = std::fs::remove_file(&p.4);
                    let _ = std::fs::remove_file(&p.5);
                }
                self.log.push(format!(
                    "{host}: reclamation skipped: {} is locked by {} (pid {})",
                    l.record.files.join(", "),
                    l.record.session,
                    l.record.holder.pid
                ));
                Ok(None)
            }
        }
    }

    /// Retention: deletes the host's oldest snapshot when it has at least
    /// three, first making the next snapshot's images standalone where
    /// they were backed by it. Returns the deleted snapshot's time.
    pub fn retention(&mut self, host: &str) -> Result<Option<u64>, CatalogError> {
        let h = self.host(host)?;
        if h.snapshots.len() < 3 {
            self.log
                .push(format!("{host}: retention: fewer than 3 snapshots"));
            return Ok(None);
        }
        let mut it = h.snapshots.values();
        let (old, next) = (it.next().unwrap(), it.next().unwrap());
        let old_files: Vec<String> = old
            .disks
            .values()
            .flat_map(|d| d.storages.iter().map(|s| s.record.body.file().to_string()))
            .collect();
        let scratch = self.scratch()?;
        let mut rebased = Vec::new();
        for d in next.disks.values() {
            let (st, q) = match d.storages.first().map(|s| (s, &s.record.body)) {
                Some((s, StorageBody::Qcow(q))) => (s, q),
                _ => continue,
            };
            let Some(b) = &q.backing else { continue };
            let backing_file = format!("{}/{b}", record::disk_dir(host, &d.record.disk));
            if !old_files.contains(&backing_file) {
                continue;
            }
            let src = self.root.join(&q.file);
            let tmp = scratch.path().join(format!("{}.qcow2", d.record.disk));
            std::fs::copy(&src, &tmp).map_err(io("copy", &src))?;
            // The copy's relative backing name resolves beside the original.
            qcow::set_backing(
                &tmp,
                &self.root.join(&backing_file).display().to_string(),
                "qcow2",
            )?;
            qcow::flatten(&tmp)?;
            let (size, digest) = points::file_digest(&tmp)?;
            let newq = QcowStorage {
                parent: None,
                backing: None,
                size,
                digest: record::hex(&digest),
                ..q.clone()
            };
            rebased.push((st.name.clone(), d.record.disk.clone(), newq, tmp));
        }
        let mut guarded = old_files.clone();
        guarded.extend(rebased.iter().map(|r| r.2.file.clone()));
        let root = self.root.clone();
        let sroot = root.join(record::snapshots_dir(host));
        let commit = || -> Result<(), CatalogError> {
            let gone = sroot.join(format!(".deleted-{}", old.dir));
            std::fs::rename(sroot.join(&old.dir), &gone).map_err(io("rename", &gone))?;
            for (name, disk, q, tmp) in &rebased {
                let dst = root.join(&q.file);
                // Same directory as the original: copy next to it, then rename.
                let near = dst.with_file_name(format!(".new-{}", record::base_name(&q.file)));
                std::fs::copy(tmp, &near).map_err(io("copy", tmp))?;
                std::fs::rename(&near, &dst).map_err(io("rename", &dst))?;
                let rec = storage(host, &next.dir, disk, StorageBody::Qcow(q.clone()));
                write_file(&sroot.join(&next.dir).join(name), &record::to_json(&rec))?;
            }
            for f in &old_files {
                let _ = std::fs::remove_file(root.join(f));
            }
            std::fs::remove_dir_all(&gone).map_err(io("remove", &gone))
        };
        match locks::unless_locked(&self.root, &guarded, commit)? {
            Ok(r) => {
                r?;
                self.log.push(format!(
                    "{host}: retention deleted host snapshot {}",
                    old.dir
                ));
                Ok(Some(old.record.time))
            }
            Err(l) => {
                self.log.push(format!(
                    "{host}: retention skipped: {} is locked by {} (pid {})",
                    l.record.files.join(", "),
                    l.record.session,
                    l.record.holder.pid
                ));
                Ok(None)
            }
        }
    }
}
