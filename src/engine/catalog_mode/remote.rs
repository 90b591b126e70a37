//! The slave's catalog read through the agent: listings of its store,
//! its hosts, and one host's snapshots assembled from their records.

use super::*;

/// Lists a directory of the slave's store (a missing one lists as empty).
pub(crate) async fn slave_list(
    slave: &Slave,
    dir: &str,
) -> Result<Vec<crate::fs::meta::Entry>, ProtoError> {
    let p =
        RelPath::new(dir.as_bytes().to_vec()).map_err(|e| ProtoError::Violation(e.to_string()))?;
    match slave.list(p).await?.wait().await {
        Ok(l) => Ok(l),
        Err(e) if is_not_found(&e) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The hosts of the slave's store.
pub(crate) async fn slave_host_names(slave: &Slave) -> Result<Vec<String>, ProtoError> {
    Ok(slave_list(slave, record::HOSTS)
        .await?
        .into_iter()
        .filter(|e| e.kind == Kind::Dir)
        .filter_map(|e| String::from_utf8(e.name.into_vec()).ok())
        .filter(|n| record::valid_name(n))
        .collect())
}

/// Reads one host of the slave's catalog through the agent, counting the records read.
pub(crate) async fn read_slave_host(
    slave: &Slave,
    host: &str,
    records_read: &mut u64,
) -> Result<Host, ProtoError> {
    let mut h = Host {
        name: host.to_string(),
        ..Host::default()
    };
    for e in slave_list(slave, &record::snapshots_dir(host)).await? {
        let Ok(name) = String::from_utf8(e.name.to_vec()) else {
            continue;
        };
        if name.starts_with('.') {
            h.hidden.push(name);
            continue;
        }
        if e.kind != Kind::Dir {
            continue;
        }
        let dir = format!("{}/{name}", record::snapshots_dir(host));
        let mut pending = Vec::new();
        for f in slave_list(slave, &dir).await? {
            let Ok(fname) = String::from_utf8(f.name.to_vec()) else {
                continue;
            };
            if f.kind == Kind::File && fname.ends_with(".json") {
                let p = RelPath::new(format!("{dir}/{fname}").into_bytes())
                    .map_err(|e| ProtoError::Violation(e.to_string()))?;
                pending.push((fname, slave.read_file(p, 0, MAX_RECORD).await?));
            }
        }
        let mut files = BTreeMap::new();
        for (fname, p) in pending {
            match p.wait().await {
                Ok(b) => {
                    *records_read += 1;
                    files.insert(fname, b);
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e),
            }
        }
        match store::assemble(host, &name, &files) {
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
