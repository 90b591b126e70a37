//! Planning catalog replication for one host: pure, from the master's and
//! the slave's catalogs to the steps that bring the slave forward.
//!
//! Points are identified by (disk, time). The slave's last point of a disk
//! is read from its own catalog, so a plan never ships a point twice, even
//! after the master renamed or split the files holding it. The matrix of
//! DESIGN §6:
//!
//! | source | interval | continuous |
//! |---|---|---|
//! | qcow | the newest host snapshot, as qcow | every host snapshot, in order, as qcow |
//! | cdp  | the newest point, as a qcow image | first: the newest point as qcow; then every following point, appended as cdp |
//!
//! A host's newest point is the newest time every disk of its newest
//! snapshot reaches (disks of one host may stop at different points).

use super::record::{self, CdpStorage, StorageBody};
use super::store::{Disk, Host, Snapshot};
use crate::session::SyncMode;

/// Where a new slave image's content comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// The master's image, byte for byte: it is full, or its backing file is
    /// already on the slave under the same name.
    Copy { file: String, digest: String },
    /// Built from the master's content of the point, holding only what
    /// differs from `base` (a point both sides have), or standalone.
    Build { base: Option<BaseRef> },
}

/// A slave image used as the backing of a built image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseRef {
    pub time: u64,
    /// The slave's file (store-relative).
    pub file: String,
}

/// One disk of a new generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlan {
    pub disk: String,
    /// The point: exact for images; for journals the newest point at or
    /// before it (resolved when the journal is read).
    pub point: u64,
    pub virtual_size: u64,
    pub how: ImageSource,
    /// The master image's parent point (for the record), when copied.
    pub parent: Option<u64>,
    /// Also start an empty journal based on this image (continuous cdp).
    pub journal: bool,
}

/// A new host snapshot on the slave, published at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenPlan {
    pub host: String,
    pub time: u64,
    /// The master host snapshot it comes from.
    pub source: String,
    pub disks: Vec<DiskPlan>,
}

/// Where appended points come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendSource {
    /// Points of a master journal after `after`, up to its published length.
    Journal {
        file: String,
        length: u64,
        after: u64,
    },
    /// A point the master now holds as an image (made by reclamation):
    /// sent as one point of the blocks that can differ. `chain`: the master
    /// images from the point down to (excluding) `since`, the newest image
    /// at or before the slave's last point; `full`: no such image, send
    /// every block.
    Image {
        time: u64,
        chain: Vec<String>,
        since: u64,
        full: bool,
    },
}

/// Points appended to a slave journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendPlan {
    pub host: String,
    pub disk: String,
    /// The slave generation holding the journal, and its storage record's name.
    pub snapshot: String,
    pub storage: String,
    /// The slave journal's record before the append.
    pub journal: CdpStorage,
    pub virtual_size: u64,
    pub sources: Vec<AppendSource>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Generation(GenPlan),
    Append(AppendPlan),
    /// Removes a slave generation whose master host snapshot is gone.
    Delete {
        snapshot: String,
    },
}

/// The slave's images as they will be after earlier steps of the plan.
struct SlaveImages {
    /// (disk, time, store-relative file)
    images: Vec<(String, u64, String)>,
}

impl SlaveImages {
    fn of(s: Option<&Host>) -> SlaveImages {
        let mut images = Vec::new();
        for snap in s.into_iter().flat_map(|h| h.snapshots.values()) {
            for (name, d) in &snap.disks {
                for q in d.qcows() {
                    images.push((name.clone(), q.time, q.file.clone()));
                }
            }
        }
        SlaveImages { images }
    }

    fn named(&self, disk: &str, base_name: &str) -> bool {
        self.images
            .iter()
            .any(|(d, _, f)| d == disk && record::base_name(f) == base_name)
    }

    /// The newest slave image of `disk` before `t` that the master can also
    /// restore (so the difference can be computed on the master).
    fn base(&self, m: &Host, disk: &str, t: u64) -> Option<BaseRef> {
        self.images
            .iter()
            .filter(|(d, bt, _)| d == disk && *bt < t && m.disk_covering(disk, *bt).is_some())
            .max_by_key(|(_, bt, _)| *bt)
            .map(|(_, bt, f)| BaseRef {
                time: *bt,
                file: f.clone(),
            })
    }
}

fn source_of(g: &Snapshot) -> &str {
    g.record.source.as_deref().unwrap_or(&g.dir)
}

/// The image plan of master disk `d`'s point `p` (an image or a journal point).
fn image(m: &Host, slave: &SlaveImages, d: &Disk, p: u64) -> (ImageSource, Option<u64>) {
    let disk = &d.record.disk;
    if let Some(q) = d.qcow_at(p) {
        let copyable = match &q.backing {
            None => true,
            Some(b) => slave.named(disk, b),
        };
        if copyable
            && record::base_name(&q.file)
                == record::base_name(&record::qcow_file(&d.record.host, disk, p))
        {
            return (
                ImageSource::Copy {
                    file: q.file.clone(),
                    digest: q.digest.clone(),
                },
                q.parent,
            );
        }
    }
    (
        ImageSource::Build {
            base: slave.base(m, disk, p),
        },
        None,
    )
}

/// A generation of the master's newest point, if the slave lacks it.
fn newest(m: &Host, s: Option<&Host>, slave: &SlaveImages, journals: bool) -> Option<GenPlan> {
    let snap = m.newest()?;
    let t = snap.disks.values().map(|d| d.newest_point()).min()?;
    // The slave has it: as its newest generation's point, or within it
    // (a failback's old master holds the point in its own journal).
    let held = |g: &Snapshot| {
        g.record.time >= t
            || snap
                .disks
                .keys()
                .all(|dn| g.disks.get(dn).is_some_and(|d| d.covers(t)))
    };
    if s.and_then(|s| s.newest()).is_some_and(held) {
        return None;
    }
    let disks = snap
        .disks
        .values()
        .map(|d| {
            let p = d.point_at_or_before(t).unwrap_or(d.record.time);
            let (how, parent) = image(m, slave, d, p);
            DiskPlan {
                disk: d.record.disk.clone(),
                point: p,
                virtual_size: d.record.virtual_size,
                how,
                parent,
                journal: journals && d.cdp().is_some(),
            }
        })
        .collect();
    Some(GenPlan {
        host: m.name.clone(),
        time: t,
        source: snap.dir.clone(),
        disks,
    })
}

/// Where the points of master disk snapshot `d` after `after` come from.
fn append_sources(d: &Disk, after: u64, slave_base: u64) -> Vec<AppendSource> {
    let mut out = Vec::new();
    let qcows: Vec<_> = d.qcows().collect();
    for q in qcows.iter().skip(1).filter(|q| q.time > after) {
        let mut chain = vec![q.file.clone()];
        let mut parent = q.parent;
        let mut since = None;
        while let Some(pt) = parent {
            if pt <= after {
                since = Some(pt);
                break;
            }
            match qcows.iter().find(|x| x.time == pt) {
                Some(x) => {
                    chain.push(x.file.clone());
                    parent = x.parent;
                }
                None => break,
            }
        }
        let full = since.is_none_or(|s| s < slave_base);
        out.push(AppendSource::Image {
            time: q.time,
            chain,
            since: since.unwrap_or(0),
            full,
        });
    }
    if let Some(c) = d.cdp() {
        if c.points > 0 && c.end > after {
            out.push(AppendSource::Journal {
                file: c.file.clone(),
                length: c.length,
                after: after.max(c.start),
            });
        }
    }
    out
}

/// The empty journal a generation step starts for disk plan `dp`.
pub fn empty_journal(host: &str, dp: &DiskPlan) -> CdpStorage {
    CdpStorage {
        file: record::cdp_file(host, &dp.disk, dp.point),
        base: dp.point,
        base_file: record::qcow_file(host, &dp.disk, dp.point),
        start: dp.point,
        end: dp.point,
        length: super::cdp::HEADER_LEN,
        points: 0,
    }
}

/// The storage record names a slave generation uses for a disk.
pub fn slave_storage_names(disk: &str) -> (String, String) {
    (
        record::storage_record_name(disk, 0),
        record::storage_record_name(disk, 1),
    )
}

/// Appends of the points of generation `g`'s master source after the slave's
/// last point of each disk. A generation still being planned is given as
/// `planned` (its journals start empty at its disks' points).
fn appends_after(
    m: &Host,
    host: &str,
    snapshot: &str,
    source: &str,
    journals: &[Journal],
) -> Vec<Step> {
    let Some(src) = m.snapshots.values().find(|s| s.dir == source) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (disk, j, size, storage) in journals {
        let Some(md) = src.disks.get(disk) else {
            continue;
        };
        let sources = append_sources(md, j.end, j.base);
        if !sources.is_empty() {
            out.push(Step::Append(AppendPlan {
                host: host.to_string(),
                disk: disk.clone(),
                snapshot: snapshot.to_string(),
                storage: storage.clone(),
                journal: j.clone(),
                virtual_size: *size,
                sources,
            }));
        }
    }
    out
}

/// A slave journal: its disk, record, disk size and storage record's name.
type Journal = (String, CdpStorage, u64, String);

fn journals_of(g: &Snapshot) -> Vec<Journal> {
    g.disks
        .iter()
        .filter_map(|(n, d)| {
            d.storages.iter().find_map(|s| match &s.record.body {
                StorageBody::Cdp(c) => {
                    Some((n.clone(), c.clone(), d.record.virtual_size, s.name.clone()))
                }
                _ => None,
            })
        })
        .collect()
}

fn planned_journals(host: &str, g: &GenPlan) -> Vec<Journal> {
    g.disks
        .iter()
        .filter(|d| d.journal)
        .map(|d| {
            let storage = slave_storage_names(&d.disk).1;
            (
                d.disk.clone(),
                empty_journal(host, d),
                d.virtual_size,
                storage,
            )
        })
        .collect()
}

fn push_gen(steps: &mut Vec<Step>, slave: &mut SlaveImages, m: &Host, g: GenPlan) {
    for d in &g.disks {
        slave.images.push((
            d.disk.clone(),
            d.point,
            record::qcow_file(&m.name, &d.disk, d.point),
        ));
    }
    let journals = planned_journals(&m.name, &g);
    let (snapshot, source) = (super::time::name(g.time), g.source.clone());
    steps.push(Step::Generation(g));
    steps.extend(appends_after(m, &m.name, &snapshot, &source, &journals));
}

/// Plans one host. `m`: the master's view (None: the host is gone there);
/// `s`: the slave's (None: nothing replicated yet). Replicas of master
/// snapshots that exist but could not be read this time are kept.
pub fn plan_host(mode: SyncMode, name: &str, m: Option<&Host>, s: Option<&Host>) -> Vec<Step> {
    let mut steps = Vec::new();
    let empty = Host {
        name: name.to_string(),
        ..Host::default()
    };
    let m = m.unwrap_or(&empty);
    let mut slave = SlaveImages::of(s);
    let g = s.and_then(|s| s.newest());
    match (mode, g) {
        (SyncMode::Interval, _) | (SyncMode::Continuous, None) => {
            let journals = mode == SyncMode::Continuous;
            if let Some(gp) = newest(m, s, &slave, journals) {
                push_gen(&mut steps, &mut slave, m, gp);
            }
        }
        (SyncMode::Continuous, Some(g)) => {
            // The master's generation of the slave's newest: its source, or
            // one made from it (a failback's new master holds the old one's
            // generations under their point names).
            let src = m
                .snapshots
                .values()
                .find(|x| x.dir == source_of(g))
                .or_else(|| {
                    m.snapshots
                        .values()
                        .find(|x| x.record.source.as_deref() == Some(g.dir.as_str()))
                });
            let since = src.map_or(0, |x| x.record.time).max(g.record.time);
            let later: Vec<&Snapshot> = m.snapshots.range(since + 1..).map(|(_, v)| v).collect();
            // A disk whose master points go on as cdp but whose replica has no
            // journal (made in interval mode): start over as on a first sync.
            let restart = later.is_empty()
                && src.is_some_and(|src| {
                    g.disks.iter().any(|(n, d)| {
                        d.cdp().is_none()
                            && src
                                .disks
                                .get(n)
                                .and_then(|md| md.cdp())
                                .is_some_and(|c| c.points > 0 && c.end > d.newest_point())
                    })
                });
            if restart {
                if let Some(gp) = newest(m, s, &slave, true) {
                    push_gen(&mut steps, &mut slave, m, gp);
                }
            } else {
                steps.extend(appends_after(
                    m,
                    name,
                    &g.dir,
                    src.map_or(source_of(g), |x| x.dir.as_str()),
                    &journals_of(g),
                ));
                for ms in later {
                    let disks = ms
                        .disks
                        .values()
                        .map(|d| {
                            let (how, parent) = image(m, &slave, d, d.record.time);
                            DiskPlan {
                                disk: d.record.disk.clone(),
                                point: d.record.time,
                                virtual_size: d.record.virtual_size,
                                how,
                                parent,
                                journal: d.cdp().is_some(),
                            }
                        })
                        .collect();
                    let gp = GenPlan {
                        host: name.to_string(),
                        time: ms.record.time,
                        source: ms.dir.clone(),
                        disks,
                    };
                    push_gen(&mut steps, &mut slave, m, gp);
                }
            }
        }
    }
    // Deletions last: the slave never has fewer points than it needs meanwhile.
    for g in s.into_iter().flat_map(|h| h.snapshots.values()) {
        let src = source_of(g);
        // A master generation made from this one (a failback's new master
        // holds the old one's generations under their point names) keeps it.
        let gone = !m
            .snapshots
            .values()
            .any(|x| x.dir == src || x.record.source.as_deref() == Some(src))
            && !m.unreadable.iter().any(|u| u == src);
        if gone {
            steps.push(Step::Delete {
                snapshot: g.dir.clone(),
            });
        }
    }
    steps
}

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;
