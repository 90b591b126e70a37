//! Removing slave snapshot files no published record needs.

use super::*;

impl Run {
    /// The backing file name in a slave image's qcow2 header.
    pub(super) async fn slave_backing(&self, file: &str) -> Result<Option<String>, StepError> {
        let head = self
            .e
            .slave
            .read_file(rel(file)?, 0, 64 << 10)
            .await?
            .wait()
            .await?;
        if head.len() < 20 || &head[0..4] != b"QFI\xfb" {
            return Err(StepError::Other(format!("{file}: not a qcow2 image")));
        }
        let off = u64::from_be_bytes(head[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as u64;
        if off == 0 || len == 0 {
            return Ok(None);
        }
        let name = if off + len <= head.len() as u64 {
            head[off as usize..(off + len) as usize].to_vec()
        } else {
            self.e
                .slave
                .read_file(rel(file)?, off, len.min(4096))
                .await?
                .wait()
                .await?
        };
        Ok(Some(String::from_utf8_lossy(&name).into_owned()))
    }

    /// Removes snapshot files no published record needs (directly, or as
    /// a backing file): those of deleted generations and of interrupted
    /// attempts. Files newer than the newest generation are kept: they may
    /// be a retry's basis.
    pub(super) async fn gc(&mut self, host: &str) -> Result<(), StepError> {
        let s = self.load_slave_host(host).await?;
        let master_has_host = self.root.join(record::host_file(host)).exists();
        let limit = match s.newest() {
            Some(g) => g.record.time,
            None if !master_has_host => u64::MAX,
            None => return Ok(()),
        };
        let mut referenced = BTreeSet::new();
        for g in s.snapshots.values() {
            for d in g.disks.values() {
                for st in &d.storages {
                    referenced.insert(st.record.body.file().to_string());
                    if let StorageBody::Cdp(c) = &st.record.body {
                        referenced.insert(c.base_file.clone());
                    }
                }
            }
        }
        let disks_dir = format!("{}/{}", record::host_dir(host), record::DISKS);
        let mut candidates = Vec::new();
        for d in self.list(&disks_dir).await? {
            if d.kind != Kind::Dir {
                continue;
            }
            let Ok(dn) = String::from_utf8(d.name.into_vec()) else {
                continue;
            };
            for f in self.list(&format!("{disks_dir}/{dn}")).await? {
                let Ok(fname) = String::from_utf8(f.name.to_vec()) else {
                    continue;
                };
                let path = format!("{disks_dir}/{dn}/{fname}");
                if f.kind == Kind::File
                    && !fname.starts_with('.')
                    && !referenced.contains(&path)
                    && record::time_of_file(&fname).is_some_and(|t| t <= limit)
                {
                    candidates.push(path);
                }
            }
        }
        if candidates.is_empty() {
            return Ok(());
        }
        // Backing files of kept images are kept too.
        let mut keep = BTreeSet::new();
        let mut stack: Vec<String> = referenced
            .into_iter()
            .filter(|f| f.ends_with(".qcow2"))
            .collect();
        while let Some(f) = stack.pop() {
            if !keep.insert(f.clone()) {
                continue;
            }
            match self.slave_backing(&f).await {
                Ok(Some(b)) if !b.contains('/') => {
                    let dir = f.rsplit_once('/').map(|x| x.0).unwrap_or("");
                    stack.push(format!("{dir}/{b}"));
                }
                Ok(Some(_)) => return Ok(()), // a backing elsewhere: keep everything
                Ok(None) => {}
                Err(StepError::Slave(e)) if is_not_found(&e) => {}
                Err(e) => return Err(e),
            }
        }
        for c in candidates {
            if !keep.contains(&c) {
                self.e.slave.remove(rel(&c)?).await?.wait().await?;
                self.sum.files_removed += 1;
            }
        }
        Ok(())
    }
}
