//! Catalog records: the small JSON files describing a snapshot store, and
//! the store's layout (where each record and snapshot file lives).
//!
//! ```text
//! STORE/store.json                                   {"format":"georep-store","version":1}
//! STORE/hosts/H/host.json                            host record
//! STORE/hosts/H/snapshots/TIME/snapshot.json         host snapshot record (names its disk records)
//! STORE/hosts/H/snapshots/TIME/disk-D.json           disk snapshot record (names its storage records)
//! STORE/hosts/H/snapshots/TIME/storage-D-N.json      storage record (names its snapshot file and parent point)
//! STORE/hosts/H/disks/D/TIME.qcow2                   qcow snapshot file (backing: its parent's file name)
//! STORE/hosts/H/disks/D/TIME.cdp                     cdp journal (see cdp.rs)
//! ```
//!
//! A host snapshot directory is one generation: it appears (by one rename)
//! with every record inside, or not at all. Names starting with `.` are
//! work in progress or being deleted and are ignored by every reader.

use super::time;
use super::CatalogError;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const STORE_FILE: &str = "store.json";
pub const FORMAT: &str = "georep-store";
pub const VERSION: u32 = 1;
pub const HOSTS: &str = "hosts";
pub const HOST_FILE: &str = "host.json";
pub const SNAPSHOTS: &str = "snapshots";
pub const SNAPSHOT_FILE: &str = "snapshot.json";
pub const DISKS: &str = "disks";

/// `store.json` at the store's root: marks a directory as a snapshot store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreRecord {
    pub format: String,
    pub version: u32,
}

impl Default for StoreRecord {
    fn default() -> Self {
        StoreRecord {
            format: FORMAT.into(),
            version: VERSION,
        }
    }
}

/// A protected host and its disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub record: String,
    pub host: String,
    pub disks: Vec<String>,
}

/// One host snapshot: the consistency group of its disk snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSnapshotRecord {
    pub record: String,
    pub host: String,
    /// The snapshot directory's name: [`time::name`] of `time`.
    pub snapshot: String,
    /// Nanoseconds since the epoch.
    pub time: u64,
    /// `time` in RFC 3339, for people reading the file.
    pub time_utc: String,
    /// The disk snapshot records of this snapshot (file names in its directory).
    pub disks: Vec<DiskRef>,
    /// On a replica: the master host snapshot this one was made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRef {
    pub disk: String,
    pub record: String,
}

/// One disk of a host snapshot and the storages holding its points.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSnapshotRecord {
    pub record: String,
    pub host: String,
    pub snapshot: String,
    pub disk: String,
    /// The disk's point in this snapshot (its first qcow storage's time).
    pub time: u64,
    /// The disk's size in bytes.
    pub virtual_size: u64,
    /// Storage records, in time order: qcow images, then at most one cdp journal.
    pub storages: Vec<String>,
}

/// One storage of a disk snapshot: a snapshot file and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageRecord {
    pub record: String,
    pub host: String,
    pub snapshot: String,
    pub disk: String,
    #[serde(flatten)]
    pub body: StorageBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum StorageBody {
    /// A qcow2 image: one point.
    Qcow(QcowStorage),
    /// A cdp journal: one point per record timestamp.
    Cdp(CdpStorage),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QcowStorage {
    /// The image, relative to the store root.
    pub file: String,
    /// The point's time.
    pub time: u64,
    /// The parent point's time (on the same disk), if any.
    pub parent: Option<u64>,
    /// The image's backing file as written in its header (relative to its
    /// directory): the parent point's file, or none for a full image.
    pub backing: Option<String>,
    /// File size in bytes.
    pub size: u64,
    /// georep's digest of the file (hex; see digest.rs).
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CdpStorage {
    /// The journal, relative to the store root.
    pub file: String,
    /// The base point: the qcow image (same disk snapshot) the records apply to.
    pub base: u64,
    pub base_file: String,
    /// The journal holds writes after this time.
    pub start: u64,
    /// Time of the newest point within `length` (`start` when there is none).
    pub end: u64,
    /// Bytes of the journal that are durable and published: header and whole records.
    pub length: u64,
    /// Points (record groups) within `length`.
    pub points: u64,
}

impl StorageBody {
    pub fn file(&self) -> &str {
        match self {
            StorageBody::Qcow(q) => &q.file,
            StorageBody::Cdp(c) => &c.file,
        }
    }
}

/// Record kinds, the value of each record's `record` field.
pub mod kind {
    pub const HOST: &str = "host";
    pub const HOST_SNAPSHOT: &str = "host_snapshot";
    pub const DISK_SNAPSHOT: &str = "disk_snapshot";
    pub const STORAGE: &str = "storage";
}

/// Host and disk names: 1-64 of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && !n.starts_with('.')
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub fn host_dir(host: &str) -> String {
    format!("{HOSTS}/{host}")
}

pub fn host_file(host: &str) -> String {
    format!("{HOSTS}/{host}/{HOST_FILE}")
}

pub fn snapshots_dir(host: &str) -> String {
    format!("{HOSTS}/{host}/{SNAPSHOTS}")
}

pub fn snapshot_dir(host: &str, t: u64) -> String {
    format!("{HOSTS}/{host}/{SNAPSHOTS}/{}", time::name(t))
}

pub fn disk_dir(host: &str, disk: &str) -> String {
    format!("{HOSTS}/{host}/{DISKS}/{disk}")
}

/// The conventional file of a qcow point.
pub fn qcow_file(host: &str, disk: &str, t: u64) -> String {
    format!("{}/{}.qcow2", disk_dir(host, disk), time::name(t))
}

/// The conventional file of a journal starting at `t`.
pub fn cdp_file(host: &str, disk: &str, t: u64) -> String {
    format!("{}/{}.cdp", disk_dir(host, disk), time::name(t))
}

pub fn disk_record_name(disk: &str) -> String {
    format!("disk-{disk}.json")
}

pub fn storage_record_name(disk: &str, n: usize) -> String {
    format!("storage-{disk}-{n}.json")
}

/// The last component of a store-relative path.
pub fn base_name(file: &str) -> &str {
    file.rsplit('/').next().unwrap_or(file)
}

/// The time a conventional snapshot file name stands for.
pub fn time_of_file(name: &str) -> Option<u64> {
    let stem = name
        .strip_suffix(".qcow2")
        .or_else(|| name.strip_suffix(".cdp"))?;
    time::parse(stem)
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parses one record, checking its `record` kind.
pub fn parse<T: for<'de> Deserialize<'de>>(
    path: &Path,
    bytes: &[u8],
    expect: &str,
) -> Result<T, CatalogError> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| CatalogError::invalid(path, e))?;
    if v.get("record").and_then(|k| k.as_str()) != Some(expect) {
        return Err(CatalogError::invalid(
            path,
            format!("not a {expect} record"),
        ));
    }
    serde_json::from_value(v).map_err(|e| CatalogError::invalid(path, e))
}

pub fn to_json<T: Serialize>(r: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec_pretty(r).expect("records serialize");
    v.push(b'\n');
    v
}

/// Checks that a store-relative path stays inside the store.
pub fn valid_rel(file: &str) -> bool {
    !file.is_empty()
        && !file.starts_with('/')
        && file
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_records_round_trip_with_their_type_tag() {
        let r = StorageRecord {
            record: kind::STORAGE.into(),
            host: "h".into(),
            snapshot: "s".into(),
            disk: "d".into(),
            body: StorageBody::Cdp(CdpStorage {
                file: "hosts/h/disks/d/x.cdp".into(),
                base: 1,
                base_file: "hosts/h/disks/d/y.qcow2".into(),
                start: 1,
                end: 5,
                length: 1000,
                points: 3,
            }),
        };
        let j = to_json(&r);
        let text = String::from_utf8(j.clone()).unwrap();
        assert!(text.contains("\"type\": \"cdp\""), "{text}");
        let back: StorageRecord = parse(Path::new("x"), &j, kind::STORAGE).unwrap();
        assert_eq!(back, r);
        assert!(parse::<StorageRecord>(Path::new("x"), &j, kind::HOST).is_err());
    }

    #[test]
    fn names_and_paths() {
        assert!(valid_name("web-01.example"));
        assert!(!valid_name(".hidden") && !valid_name("a/b") && !valid_name(""));
        assert!(
            valid_rel("hosts/a/b") && !valid_rel("../x") && !valid_rel("/x") && !valid_rel("a//b")
        );
        let t = 1_735_689_600_000_000_000;
        assert_eq!(time_of_file(base_name(&qcow_file("h", "d", t))), Some(t));
        assert_eq!(time_of_file(base_name(&cdp_file("h", "d", t))), Some(t));
    }
}
