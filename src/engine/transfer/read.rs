//! Reading a master file by windows and ranges, holes as zeros (holes are
//! never read: only the data extents found with SEEK_DATA/SEEK_HOLE).

use crate::engine::master::MasterError;
use crate::hash::digest::WINDOW;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::merr;

/// A window of the master file as read: zeros where the file has holes.
pub(super) struct Window {
    pub(super) index: usize,
    pub(super) data: Vec<u8>,
}

/// Reads the requested windows in order on a blocking thread, one ahead:
/// a window is read only once the channel has room for it, so a reader
/// holds at most one window besides the one its consumer works on.
pub(super) fn spawn_reader(
    file: std::sync::Arc<File>,
    extents: std::sync::Arc<Vec<(u64, u64)>>,
    size: u64,
    wanted: Vec<usize>,
    path: PathBuf,
) -> tokio::sync::mpsc::Receiver<Result<Window, MasterError>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Handle::current();
        for index in wanted {
            let Ok(room) = rt.block_on(tx.reserve()) else {
                return;
            };
            let res = read_window(&file, &extents, size, index)
                .map(|data| Window { index, data })
                .map_err(merr("read", &path));
            let stop = res.is_err();
            room.send(res);
            if stop {
                return;
            }
        }
    });
    rx
}

pub(super) fn window_range(size: u64, index: usize) -> (u64, u64) {
    let off = index as u64 * WINDOW;
    (off, WINDOW.min(size - off))
}

pub(super) fn read_window(
    file: &File,
    extents: &[(u64, u64)],
    size: u64,
    index: usize,
) -> std::io::Result<Vec<u8>> {
    let (off, len) = window_range(size, index);
    read_range(file, extents, off, len)
}

/// Reads `[off, off+len)`, reading only the data extents (holes are zeros).
pub(super) fn read_range(
    file: &File,
    extents: &[(u64, u64)],
    off: u64,
    len: u64,
) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    read_range_into(file, extents, off, len, &mut buf)?;
    Ok(buf)
}

pub(super) fn read_range_into(
    file: &File,
    extents: &[(u64, u64)],
    off: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    buf.clear();
    buf.resize(len as usize, 0);
    let end = off + len;
    // The extents are sorted: start at the first that may overlap.
    let first = extents.partition_point(|&(eo, el)| eo + el <= off);
    for &(eo, el) in &extents[first..] {
        if eo >= end {
            break;
        }
        let (s, t) = (eo.max(off), (eo + el).min(end));
        if s < t {
            file.read_exact_at(&mut buf[(s - off) as usize..(t - off) as usize], s)?;
        }
    }
    Ok(())
}

pub(super) fn all_hole(extents: &[(u64, u64)], off: u64, len: u64) -> bool {
    let first = extents.partition_point(|&(eo, el)| eo + el <= off);
    extents.get(first).is_none_or(|&(eo, _)| eo >= off + len)
}
