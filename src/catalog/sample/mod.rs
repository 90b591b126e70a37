//! Sample snapshot stores: a small model of the backup appliance, used by
//! `georep sample-store`, the tests, the benchmarks and the demo. It writes
//! stores the way an appliance does: images with qemu-img (backing chains,
//! and on qcow hosts one disk of full images), journals appended a point at
//! a time, host snapshots published by one rename, retention and
//! reclamation honouring georep's point locks.

mod maintenance;

use super::record::{
    self, kind, CdpStorage, DiskRef, DiskSnapshotRecord, HostRecord, HostSnapshotRecord,
    QcowStorage, StorageBody, StorageRecord, StoreRecord,
};
use super::store::{self, Host};
use super::{cdp, locks, points, qcow, time, CatalogError};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const BLOCK: u64 = 4096;

/// What `georep sample-store DIR` makes.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    pub hosts: usize,
    pub seed: u64,
    /// Disks per host (odd-numbered hosts get one more).
    pub disks: usize,
    pub disk_size: u64,
    /// Host snapshots per host.
    pub snapshots: usize,
    /// CDP points appended to each journal after its snapshot.
    pub points: usize,
    /// Share of a disk's blocks rewritten between two qcow snapshots.
    pub change: f64,
    /// Share of a new disk's blocks written before its first snapshot.
    pub fill: f64,
    /// Largest write of one CDP record, in blocks.
    pub max_write_blocks: u64,
    /// Which hosts get journals.
    pub kinds: Kinds,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kinds {
    /// Even hosts qcow only, odd hosts qcow + cdp.
    Mixed,
    Qcow,
    Cdp,
}

impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions {
            hosts: 2,
            seed: 1,
            disks: 2,
            disk_size: 16 << 20,
            snapshots: 3,
            points: 20,
            change: 0.02,
            fill: 0.33,
            max_write_blocks: 16,
            kinds: Kinds::Mixed,
        }
    }
}

/// A deterministic generator: SplitMix64 for choices, BLAKE3's XOF for data.
pub struct Rng {
    state: u64,
    key: [u8; 32],
    stream: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng {
            state: seed ^ 0x9e37_79b9_7f4a_7c15,
            key: *blake3::hash(&seed.to_le_bytes()).as_bytes(),
            stream: 0,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Pseudo-random, incompressible bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        self.stream += 1;
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&self.stream.to_le_bytes());
        h.finalize_xof().fill(buf);
    }
}

/// The appliance: operations on one store.
pub struct Appliance {
    root: PathBuf,
    pub rng: Rng,
    last_time: u64,
    pub max_write_blocks: u64,
    pub change: f64,
    pub fill: f64,
    /// One line per operation done or skipped.
    pub log: Vec<String>,
}

fn io<'a>(op: &'static str, p: &'a Path) -> impl FnOnce(std::io::Error) -> CatalogError + 'a {
    move |e| CatalogError::io(op, p, e)
}

fn write_file(p: &Path, data: &[u8]) -> Result<(), CatalogError> {
    georep_monitor::write_atomic(p, data).map_err(io("write", p))
}

fn storage(host: &str, snap: &str, disk: &str, body: StorageBody) -> StorageRecord {
    StorageRecord {
        record: kind::STORAGE.into(),
        host: host.into(),
        snapshot: snap.into(),
        disk: disk.into(),
        body,
    }
}

/// Parses sizes such as `16M`, `512K`, `4G` or plain bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1u64 << 10),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        'g' | 'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

impl Appliance {
    /// Opens an existing store; new points are made after its newest time.
    pub fn open(root: &Path, seed: u64) -> Result<Appliance, CatalogError> {
        let cat = store::load(root)?;
        let mut last = 0;
        for h in cat.hosts.values() {
            for s in h.snapshots.values() {
                for d in s.disks.values() {
                    last = last.max(d.newest_point());
                }
            }
        }
        Ok(Appliance {
            root: root.to_path_buf(),
            rng: Rng::new(seed),
            last_time: last,
            max_write_blocks: 16,
            change: 0.02,
            fill: 0.33,
            log: Vec::new(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The next event time: after every point made so far, and not before `at_least`.
    fn next_time(&mut self, at_least: u64) -> u64 {
        self.last_time = (self.last_time + 1_000_000).max(at_least);
        self.last_time
    }

    fn host(&self, host: &str) -> Result<Host, CatalogError> {
        store::load_host(&self.root, host)
    }

    fn scratch(&self) -> Result<tempfile::TempDir, CatalogError> {
        tempfile::Builder::new()
            .prefix(".sample-")
            .tempdir_in(&self.root)
            .map_err(io("create a temporary directory in", &self.root))
    }

    /// Creates a host with `disks` disks of `size` bytes and its first snapshot.
    pub fn add_host(
        &mut self,
        host: &str,
        disks: usize,
        size: u64,
        cdp: bool,
        at: u64,
    ) -> Result<u64, CatalogError> {
        let rec = HostRecord {
            record: kind::HOST.into(),
            host: host.into(),
            disks: (0..disks).map(|i| format!("disk{i}")).collect(),
        };
        let hf = self.root.join(record::host_file(host));
        std::fs::create_dir_all(hf.parent().unwrap()).map_err(io("create", &hf))?;
        write_file(&hf, &record::to_json(&rec))?;
        self.snapshot_at(host, Some((size, cdp)), at)
    }

    /// A new host snapshot of every disk (qcow hosts: after rewriting a
    /// share of each disk; cdp hosts: the state the journals reached).
    pub fn snapshot(&mut self, host: &str) -> Result<u64, CatalogError> {
        let now = time::now();
        self.snapshot_at(host, None, now)
    }

    fn snapshot_at(
        &mut self,
        host: &str,
        new: Option<(u64, bool)>,
        at: u64,
    ) -> Result<u64, CatalogError> {
        let h = self.host(host)?;
        let hrec = h
            .record
            .clone()
            .ok_or_else(|| CatalogError::NotFound(format!("no host {host}")))?;
        let prev = h.newest();
        let is_cdp = match new {
            Some((_, c)) => c,
            None => prev.is_some_and(|s| s.disks.values().any(|d| d.cdp().is_some())),
        };
        let t = self.next_time(at);
        let snap = time::name(t);
        let scratch = self.scratch()?;
        let stage = self
            .root
            .join(record::snapshots_dir(host))
            .join(format!(".new-{snap}"));
        std::fs::create_dir_all(&stage).map_err(io("create", &stage))?;
        let mut refs = Vec::new();
        for (i, disk) in hrec.disks.iter().enumerate() {
            let pd = prev.and_then(|s| s.disks.get(disk));
            let size = pd
                .map(|d| d.record.virtual_size)
                .or(new.map(|n| n.0))
                .unwrap_or(16 << 20);
            let raw = scratch.path().join(format!("{disk}.raw"));
            match pd {
                Some(d) => {
                    let src =
                        points::source(&self.root, &h, disk, d.newest_point(), scratch.path())?;
                    qcow::convert(src.path(), src.format(), &raw, "raw")?;
                }
                None => {
                    let f = File::create(&raw).map_err(io("create", &raw))?;
                    f.set_len(size).map_err(io("size", &raw))?;
                    // A fresh disk: partly written.
                    let fill = self.fill;
                    self.write_random(&f, size, fill)?;
                }
            }
            if !is_cdp && pd.is_some() {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&raw)
                    .map_err(io("open", &raw))?;
                let change = self.change;
                self.write_random(&f, size, change)?;
            }
            let full = !is_cdp && i == 0;
            let dir = self.root.join(record::disk_dir(host, disk));
            std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
            let file = record::qcow_file(host, disk, t);
            let img = self.root.join(&file);
            let tmp = dir.join(format!(".new-{}", record::base_name(&file)));
            let parent = pd.and_then(|d| d.qcows().last().cloned());
            let (base, backing) = match (&parent, full) {
                (Some(p), false) => (
                    Some(self.root.join(&p.file)),
                    Some(record::base_name(&p.file).to_string()),
                ),
                _ => (None, None),
            };
            qcow::materialise(
                &raw,
                "raw",
                base.as_deref().map(|b| (b, "qcow2")),
                backing.as_deref(),
                &tmp,
            )?;
            std::fs::rename(&tmp, &img).map_err(io("rename", &img))?;
            let (fsize, digest) = points::file_digest(&img)?;
            let mut storages = vec![storage(
                host,
                &snap,
                disk,
                StorageBody::Qcow(QcowStorage {
                    file: file.clone(),
                    time: t,
                    parent: parent.as_ref().map(|p| p.time),
                    backing,
                    size: fsize,
                    digest: record::hex(&digest),
                }),
            )];
            if is_cdp {
                let jfile = record::cdp_file(host, disk, t);
                let hdr = cdp::Header {
                    block_size: BLOCK as u32,
                    disk_size: size,
                    start: t,
                    base_time: t,
                    base_name: record::base_name(&file).to_string(),
                };
                let jp = self.root.join(&jfile);
                let bytes = hdr.encode().map_err(|e| CatalogError::invalid(&jp, e))?;
                write_file(&jp, &bytes)?;
                storages.push(storage(
                    host,
                    &snap,
                    disk,
                    StorageBody::Cdp(CdpStorage {
                        file: jfile,
                        base: t,
                        base_file: file.clone(),
                        start: t,
                        end: t,
                        length: cdp::HEADER_LEN,
                        points: 0,
                    }),
                ));
            }
            let mut names = Vec::new();
            for (n, s) in storages.iter().enumerate() {
                let name = record::storage_record_name(disk, n);
                write_file(&stage.join(&name), &record::to_json(s))?;
                names.push(name);
            }
            let drec = DiskSnapshotRecord {
                record: kind::DISK_SNAPSHOT.into(),
                host: host.into(),
                snapshot: snap.clone(),
                disk: disk.clone(),
                time: t,
                virtual_size: size,
                storages: names,
            };
            let dname = record::disk_record_name(disk);
            write_file(&stage.join(&dname), &record::to_json(&drec))?;
            refs.push(DiskRef {
                disk: disk.clone(),
                record: dname,
            });
        }
        let srec = HostSnapshotRecord {
            record: kind::HOST_SNAPSHOT.into(),
            host: host.into(),
            snapshot: snap.clone(),
            time: t,
            time_utc: time::rfc3339(t),
            disks: refs,
            source: None,
        };
        write_file(&stage.join(record::SNAPSHOT_FILE), &record::to_json(&srec))?;
        let fin = self.root.join(record::snapshot_dir(host, t));
        std::fs::rename(&stage, &fin).map_err(io("publish", &fin))?;
        self.log.push(format!("{host}: new host snapshot {snap}"));
        Ok(t)
    }

    /// Rewrites about `share` of the blocks of a raw image, in runs.
    fn write_random(&mut self, f: &File, size: u64, share: f64) -> Result<(), CatalogError> {
        let blocks = size / BLOCK;
        let mut buf = Vec::new();
        if share >= 1.0 {
            // Every block.
            let mut at = 0;
            while at < size {
                buf.resize((size - at).min(4 << 20) as usize, 0);
                self.rng.fill(&mut buf);
                f.write_all_at(&buf, at)
                    .map_err(|e| CatalogError::Tool(format!("writing a raw image: {e}")))?;
                at += buf.len() as u64;
            }
            return Ok(());
        }
        let mut todo = ((blocks as f64) * share).ceil() as u64;
        while todo > 0 {
            let run = (1 + self.rng.below(16)).min(todo).min(blocks);
            let at = self.rng.below(blocks - run + 1) * BLOCK;
            buf.resize((run * BLOCK) as usize, 0);
            self.rng.fill(&mut buf);
            f.write_all_at(&buf, at)
                .map_err(|e| CatalogError::Tool(format!("writing a raw image: {e}")))?;
            todo -= run;
        }
        Ok(())
    }

    /// Appends `ticks` points to every journal of the host's newest
    /// snapshot, all disks sharing each point's time; then publishes the new
    /// lengths in the storage records. With `partial`, a torn record is left
    /// after the published length of one journal (an append in flight).
    pub fn cdp_append(
        &mut self,
        host: &str,
        ticks: usize,
        partial: bool,
    ) -> Result<usize, CatalogError> {
        self.cdp_append_at(host, ticks, partial, time::now(), 1_000_000)
    }

    /// [`cdp_append`](Self::cdp_append) with points from `first` on, `gap` apart.
    pub fn cdp_append_at(
        &mut self,
        host: &str,
        ticks: usize,
        partial: bool,
        first: u64,
        gap: u64,
    ) -> Result<usize, CatalogError> {
        let h = self.host(host)?;
        let Some(s) = h.newest() else { return Ok(0) };
        let mut journals = Vec::new();
        for d in s.disks.values() {
            let Some(st) = d
                .storages
                .iter()
                .find(|st| matches!(st.record.body, StorageBody::Cdp(_)))
            else {
                continue;
            };
            let StorageBody::Cdp(c) = &st.record.body else {
                unreachable!()
            };
            let p = self.root.join(&c.file);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .map_err(io("open", &p))?;
            // Whatever lies beyond the published length is a torn append: drop it.
            f.set_len(c.length).map_err(io("truncate", &p))?;
            journals.push((
                st.clone(),
                c.clone(),
                f,
                d.record.virtual_size,
                Vec::<u8>::new(),
            ));
        }
        if journals.is_empty() {
            return Ok(0);
        }
        let mut buf = Vec::new();
        for i in 0..ticks {
            let t = self.next_time(first + i as u64 * gap);
            for j in journals.iter_mut() {
                let size = j.3;
                let nwrites = self.rng.below(4);
                let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
                for _ in 0..nwrites {
                    let blocks =
                        (1 + self.rng.below(self.max_write_blocks.max(1))).min(size / BLOCK);
                    let at = self.rng.below(size / BLOCK - blocks + 1) * BLOCK;
                    buf.resize((blocks * BLOCK) as usize, 0);
                    self.rng.fill(&mut buf);
                    writes.push((at, buf.clone()));
                }
                let w: Vec<(u64, &[u8])> = writes.iter().map(|(o, d)| (*o, d.as_slice())).collect();
                j.4.extend(cdp::encode_point(t, &w));
                j.1.points += 1;
                j.1.end = t;
            }
        }
        for (st, c, f, _, bytes) in journals.iter_mut() {
            let p = self.root.join(&c.file);
            f.write_all_at(bytes, c.length)
                .map_err(io("append to", &p))?;
            f.sync_data().map_err(io("fsync", &p))?;
            c.length += bytes.len() as u64;
            let rec = storage(host, &s.dir, &st.record.disk, StorageBody::Cdp(c.clone()));
            let rp = self
                .root
                .join(record::snapshots_dir(host))
                .join(&s.dir)
                .join(&st.name);
            write_file(&rp, &record::to_json(&rec))?;
        }
        if partial {
            let (_, c, f, _, _) = &journals[0];
            let t = self.last_time + 1_000_000;
            let rec = cdp::encode_point(t, &[(0, &vec![7u8; BLOCK as usize][..])]);
            let len = f
                .metadata()
                .map_err(io("stat", &self.root.join(&c.file)))?
                .len();
            f.write_all_at(&rec[..rec.len() / 2], len)
                .map_err(io("append to", &self.root.join(&c.file)))?;
        }
        self.log.push(format!(
            "{host}: {ticks} cdp points appended to {} journals",
            journals.len()
        ));
        Ok(ticks)
    }
}

/// Creates a sample store in `dir` (which must be missing or empty).
pub fn create(dir: &Path, o: &SampleOptions) -> Result<Vec<String>, CatalogError> {
    if dir.join(record::STORE_FILE).exists() {
        return Err(CatalogError::Usage(format!(
            "{} is already a store: use --advance to add activity",
            dir.display()
        )));
    }
    if std::fs::read_dir(dir).is_ok_and(|mut rd| rd.next().is_some()) {
        return Err(CatalogError::Usage(format!(
            "{} is not empty: give a new or empty directory",
            dir.display()
        )));
    }
    if o.hosts == 0
        || o.disks == 0
        || o.snapshots == 0
        || o.disk_size < 1 << 20
        || o.disk_size % (1 << 20) != 0
    {
        return Err(CatalogError::Usage(
            "--hosts, --disks and --snapshots must be at least 1, --disk-size a multiple of 1M"
                .into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    write_file(
        &dir.join(record::STORE_FILE),
        &record::to_json(&StoreRecord::default()),
    )?;
    let mut a = Appliance::open(dir, o.seed)?;
    a.change = o.change;
    a.fill = o.fill;
    a.max_write_blocks = o.max_write_blocks;
    let now = time::now();
    let span = 86_400u64 * 1_000_000_000;
    let step = span / o.snapshots as u64;
    for i in 0..o.hosts {
        let host = format!("host{:02}", i + 1);
        let cdp = match o.kinds {
            Kinds::Mixed => i % 2 == 1,
            Kinds::Qcow => false,
            Kinds::Cdp => true,
        };
        let disks = o.disks + i % 2;
        a.last_time = 0;
        let start = now - span;
        a.add_host(&host, disks, o.disk_size, cdp, start)?;
        let gap = step / (o.points as u64 + 1);
        for k in 1..=o.snapshots {
            let t = start + (k - 1) as u64 * step;
            if cdp {
                a.cdp_append_at(&host, o.points, false, t + gap, gap)?;
            }
            if k < o.snapshots {
                a.snapshot_at(&host, None, start + k as u64 * step)?;
            }
        }
    }
    Ok(a.log)
}

/// What `--advance` does, per host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    Snapshot,
    Cdp,
    Reclaim,
    Retention,
}

/// Adds activity to every host: a new host snapshot, CDP appends (on cdp
/// hosts), a reclamation split and a retention delete, or only `only`.
pub fn advance(
    dir: &Path,
    o: &SampleOptions,
    only: Option<Activity>,
) -> Result<Vec<String>, CatalogError> {
    let mut a = Appliance::open(dir, o.seed)?;
    // Deterministic for a given store and seed, different at every advance.
    a.rng = Rng::new(o.seed ^ a.last_time);
    a.change = o.change;
    a.max_write_blocks = o.max_write_blocks;
    let points = o.points;
    let hosts: Vec<String> = store::load(dir)?.hosts.keys().cloned().collect();
    let on = |x: Activity| only.is_none_or(|o| o == x);
    for h in &hosts {
        if on(Activity::Cdp) {
            a.cdp_append(h, points, false)?;
        }
        if on(Activity::Snapshot) {
            a.snapshot(h)?;
        }
        if on(Activity::Cdp) {
            a.cdp_append(h, points, false)?;
        }
        if on(Activity::Reclaim) {
            a.reclaim(h, false)?;
        }
        if on(Activity::Retention) {
            a.retention(h)?;
        }
    }
    Ok(a.log)
}
