//! Growing a slave journal in place by whole points: from a master
//! journal, or a point the master now holds as an image.

use super::*;

impl Run {
    /// Appends the planned points to a slave journal, then advances its record.
    pub(super) async fn append(&mut self, m: &Host, a: &AppendPlan) -> Result<(), StepError> {
        let mut files = Vec::new();
        for s in &a.sources {
            match s {
                AppendSource::Journal { file, .. } => files.push(file.clone()),
                AppendSource::Image { time: t, .. } => files.extend(point_files(m, &a.disk, *t)),
            }
        }
        let sources = a.sources.clone();
        let disk = a.disk.clone();
        let _lock = self
            .lock(
                &a.host,
                &a.disk,
                a.journal.end,
                files,
                "cdp-append",
                move |h| {
                    let disks: Vec<_> = h
                        .snapshots
                        .values()
                        .filter_map(|s| s.disks.get(&disk))
                        .collect();
                    for s in &sources {
                        let ok = match s {
                            AppendSource::Journal { file, length, .. } => disks.iter().any(|d| {
                                d.cdp()
                                    .is_some_and(|c| &c.file == file && c.length >= *length)
                            }),
                            AppendSource::Image { chain, .. } => chain
                                .iter()
                                .all(|f| disks.iter().any(|d| d.qcows().any(|q| &q.file == f))),
                        };
                        if !ok {
                            return Err(format!(
                                "a source of {disk}'s points was changed or deleted"
                            ));
                        }
                    }
                    Ok(())
                },
            )
            .await?;
        let path = rel(&a.journal.file)?;
        let mut j = a.journal.clone();
        let start_len = j.length;
        let mut hasher = blake3::Hasher::new();
        let mut inflight = std::collections::VecDeque::new();
        for s in &a.sources {
            let tail = match s {
                AppendSource::Journal {
                    file,
                    length,
                    after,
                } => {
                    let (p, length, after) = (self.root.join(file), *length, *after);
                    blocking(move || Tail::journal(&p, length, after)).await?
                }
                AppendSource::Image {
                    time: t,
                    chain,
                    since,
                    full,
                } => {
                    let extents = if *full {
                        vec![(0, a.virtual_size)]
                    } else {
                        self.e
                            .slave
                            .journal_extents(path.clone(), *since, j.length)
                            .await?
                    };
                    let (root, tmp, h, disk, t, chain, size, full) = (
                        self.root.clone(),
                        self.tmp.clone(),
                        m.clone(),
                        a.disk.clone(),
                        *t,
                        chain.clone(),
                        a.virtual_size,
                        *full,
                    );
                    let tail = blocking(move || {
                        image_point(&root, &tmp, &h, &disk, t, &chain, extents, full, size)
                    })
                    .await?;
                    self.sum.cdp_points_from_images += 1;
                    tail
                }
            };
            let mut tail = Some(tail);
            loop {
                let mut t = tail.take().expect("put back below");
                let (chunk, t) = blocking(move || (t.next_chunk(APPEND_CHUNK), t)).await;
                tail = Some(t);
                let Some((data, points, last)) = chunk? else {
                    break;
                };
                hasher.update(&data);
                let len = data.len() as u64;
                inflight.push_back(
                    self.e
                        .slave
                        .append_tail(path.clone(), j.length, data, false, None)
                        .await?,
                );
                j.length += len;
                j.points += points;
                if let Some(t) = last {
                    j.end = t;
                }
                self.sum.cdp_points += points;
                self.e.stats.bytes_literal.fetch_add(len, Ordering::Relaxed);
                while inflight.len() > APPEND_WINDOW {
                    inflight.pop_front().expect("non-empty").wait().await?;
                }
            }
        }
        if j.length == start_len {
            return Ok(());
        }
        // Durable, and read back equal to what was sent, before the record says so.
        let check = Some((start_len, *hasher.finalize().as_bytes()));
        inflight.push_back(
            self.e
                .slave
                .append_tail(path.clone(), j.length, Vec::new(), true, check)
                .await?,
        );
        while let Some(p) = inflight.pop_front() {
            p.wait().await?;
        }
        self.sum.cdp_bytes += j.length - start_len;
        let rp = rel(&format!(
            "{}/{}/{}",
            record::snapshots_dir(&a.host),
            a.snapshot,
            a.storage
        ))?;
        let rec = storage_record(&a.host, &a.snapshot, &a.disk, StorageBody::Cdp(j));
        self.put(rp, record::to_json(&rec)).await?;
        Ok(())
    }
}

/// Bytes to append to a slave journal: whole points of a master journal
/// (checksums verified), or a point made from an image (in a temporary
/// file), read in chunks so memory stays bounded whatever their size.
struct Tail {
    file: std::fs::File,
    path: PathBuf,
    pos: u64,
    end: u64,
    /// End offset and time of each point still to send, in order.
    points: std::collections::VecDeque<(u64, u64)>,
    _tmp: Option<tempfile::TempPath>,
}

/// A chunk of a [`Tail`]: bytes, points completed in it, the last one's time.
type Chunk = (Vec<u8>, u64, Option<u64>);

impl Tail {
    /// The points of `[0, length)` of a master journal after time `after`.
    fn journal(p: &Path, length: u64, after: u64) -> Result<Tail, CatalogError> {
        let file = std::fs::File::open(p).map_err(|e| CatalogError::io("open", p, e))?;
        let bad = |e: cdp::JournalError| CatalogError::invalid(p, e);
        let mut s = cdp::Scanner::new(&file, length, false).map_err(bad)?;
        let mut first = None;
        while let Some(sp) = s.next_span().map_err(bad)? {
            if sp.time > after {
                first = Some(sp);
                break;
            }
        }
        let mut points = std::collections::VecDeque::new();
        let (mut pos, mut end) = (length, length);
        if let Some(f) = first {
            // Verify every record to be sent (reads the data, then again from cache).
            let mut v = cdp::Scanner::new(&file, length, true).map_err(bad)?;
            v.resume(f.start, after);
            while let Some(sp) = v.next_span().map_err(bad)? {
                points.push_back((sp.end, sp.time));
            }
            pos = f.start;
            end = points.back().map(|x| x.0).unwrap_or(f.start);
        }
        Ok(Tail {
            file,
            path: p.to_path_buf(),
            pos,
            end,
            points,
            _tmp: None,
        })
    }

    fn next_chunk(&mut self, max: usize) -> Result<Option<Chunk>, CatalogError> {
        use std::os::unix::fs::FileExt;
        if self.pos >= self.end {
            return Ok(None);
        }
        let n = (self.end - self.pos).min(max as u64);
        let mut buf = vec![0u8; n as usize];
        self.file
            .read_exact_at(&mut buf, self.pos)
            .map_err(|e| CatalogError::io("read", &self.path, e))?;
        self.pos += n;
        let (mut done, mut last) = (0, None);
        while let Some(&(e, t)) = self.points.front() {
            if e > self.pos {
                break;
            }
            done += 1;
            last = Some(t);
            self.points.pop_front();
        }
        Ok(Some((buf, done, last)))
    }
}

/// One point made from a master image: the blocks that can differ from the
/// replica's last point, with the point's content.
#[allow(clippy::too_many_arguments)]
fn image_point(
    root: &Path,
    tmp: &Path,
    h: &Host,
    disk: &str,
    t: u64,
    chain: &[String],
    extents: Vec<(u64, u64)>,
    full: bool,
    size: u64,
) -> Result<Tail, CatalogError> {
    use std::os::unix::fs::FileExt;
    let mut ext = extents;
    if !full {
        for f in chain {
            ext.extend(qcow::top_extents(&root.join(f))?);
        }
    }
    let block = crate::catalog::sample::BLOCK;
    let ext: Vec<(u64, u64)> = crate::catalog::merge_extents(ext)
        .into_iter()
        .map(|(o, l)| {
            let s = o / block * block;
            let e = (o + l).div_ceil(block) * block;
            (s, e.min(size) - s)
        })
        .collect();
    let ext = crate::catalog::merge_extents(ext);
    let src = points::source(root, h, disk, t, tmp)?;
    let raw = tempfile::Builder::new()
        .prefix("point-")
        .tempfile_in(tmp)
        .map_err(|e| CatalogError::io("create temporary in", tmp, e))?
        .into_temp_path();
    let _ = std::fs::remove_file(&raw);
    qcow::convert(src.path(), src.format(), &raw, "raw")?;
    let f = std::fs::File::open(&raw).map_err(|e| CatalogError::io("open", &raw, e))?;
    let out = tempfile::Builder::new()
        .prefix("point-")
        .tempfile_in(tmp)
        .map_err(|e| CatalogError::io("create temporary in", tmp, e))?;
    let outp = out.path().to_path_buf();
    let werr = |e| CatalogError::io("write", &outp, e);
    let mut w = std::io::BufWriter::new(out.as_file());
    let mut pieces = Vec::new();
    for (o, l) in ext {
        let mut at = o;
        while at < o + l {
            let n = (o + l - at).min(IMAGE_RECORD);
            pieces.push((at, n));
            at += n;
        }
    }
    let mut buf = Vec::new();
    for (i, (at, n)) in pieces.iter().enumerate() {
        buf.resize(*n as usize, 0);
        f.read_exact_at(&mut buf, *at)
            .map_err(|e| CatalogError::io("read", &raw, e))?;
        let flags = if i + 1 < pieces.len() {
            cdp::CONTINUED
        } else {
            0
        };
        std::io::Write::write_all(&mut w, &cdp::encode_record(t, flags, *at, &buf))
            .map_err(werr)?;
    }
    if pieces.is_empty() {
        std::io::Write::write_all(&mut w, &cdp::encode_record(t, 0, 0, &[])).map_err(werr)?;
    }
    std::io::Write::flush(&mut w).map_err(werr)?;
    drop(w);
    let path = out.into_temp_path();
    let file = std::fs::File::open(&path).map_err(|e| CatalogError::io("open", &path, e))?;
    let end = file
        .metadata()
        .map_err(|e| CatalogError::io("stat", &path, e))?
        .len();
    Ok(Tail {
        file,
        path: path.to_path_buf(),
        pos: 0,
        end,
        points: [(end, t)].into_iter().collect(),
        _tmp: Some(path),
    })
}
