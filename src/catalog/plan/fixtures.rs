//! Plain-data catalogs for planning tests (also the store quarantine's).

use crate::catalog::record::{
    self, kind, CdpStorage, DiskSnapshotRecord, HostSnapshotRecord, QcowStorage, StorageBody,
    StorageRecord,
};
use crate::catalog::store::{Disk, Host, Snapshot, Storage};
use crate::catalog::time;
use std::collections::BTreeMap;

pub(crate) const H: &str = "h";
pub(crate) const S: u64 = 1_000_000_000;

pub(crate) fn t(n: u64) -> u64 {
    1_700_000_000 * S + n * S
}

pub(crate) fn qcow(disk: &str, at: u64, parent: Option<u64>, chained: bool) -> StorageBody {
    StorageBody::Qcow(QcowStorage {
        file: record::qcow_file(H, disk, at),
        time: at,
        parent,
        backing: parent
            .filter(|_| chained)
            .map(|p| record::base_name(&record::qcow_file(H, disk, p)).to_string()),
        size: 1,
        digest: "d".into(),
    })
}

pub(crate) fn cdp(disk: &str, base: u64, end: u64, points: u64) -> StorageBody {
    StorageBody::Cdp(CdpStorage {
        file: record::cdp_file(H, disk, base),
        base,
        base_file: record::qcow_file(H, disk, base),
        start: base,
        end,
        length: 128 + points * 100,
        points,
    })
}

/// A host snapshot at `at` whose disks hold `storages`.
pub(crate) fn snap(at: u64, disks: &[(&str, Vec<StorageBody>)], source: Option<u64>) -> Snapshot {
    let dir = time::name(at);
    let mut map = BTreeMap::new();
    for (d, st) in disks {
        let first = match &st[0] {
            StorageBody::Qcow(q) => q.time,
            _ => unreachable!(),
        };
        map.insert(
            d.to_string(),
            Disk {
                record: DiskSnapshotRecord {
                    record: kind::DISK_SNAPSHOT.into(),
                    host: H.into(),
                    snapshot: dir.clone(),
                    disk: d.to_string(),
                    time: first,
                    virtual_size: 1 << 20,
                    storages: (0..st.len()).map(|i| format!("s{i}")).collect(),
                },
                storages: st
                    .iter()
                    .enumerate()
                    .map(|(i, b)| Storage {
                        name: format!("s{i}"),
                        record: StorageRecord {
                            record: kind::STORAGE.into(),
                            host: H.into(),
                            snapshot: dir.clone(),
                            disk: d.to_string(),
                            body: b.clone(),
                        },
                    })
                    .collect(),
            },
        );
    }
    Snapshot {
        dir: dir.clone(),
        record: HostSnapshotRecord {
            record: kind::HOST_SNAPSHOT.into(),
            host: H.into(),
            snapshot: dir,
            time: at,
            time_utc: String::new(),
            disks: Vec::new(),
            source: source.map(time::name),
        },
        disks: map,
    }
}

pub(crate) fn host(snaps: Vec<Snapshot>) -> Host {
    Host {
        name: H.into(),
        snapshots: snaps.into_iter().map(|s| (s.record.time, s)).collect(),
        ..Host::default()
    }
}

/// A qcow host: disk a of full images, disk b chained, snapshots at 1..=n.
pub(crate) fn qcow_master(n: u64) -> Host {
    host(
        (1..=n)
            .map(|i| {
                let parent = (i > 1).then(|| t(i - 1));
                snap(
                    t(i),
                    &[
                        ("a", vec![qcow("a", t(i), parent, false)]),
                        ("b", vec![qcow("b", t(i), parent, true)]),
                    ],
                    None,
                )
            })
            .collect(),
    )
}
