//! Small files the slave may already have: compared by digest before any
//! data travels (`ProbeFile`), and rebuilt from an rsync delta against the
//! slave's copy (`PutDelta`). The slave file read is bounded by
//! `MAX_DATA`; a bigger or missing one is "no basis".

use super::*;
use crate::protocol::MAX_DATA;
use std::io::Read;

/// What a probe found.
pub enum Probe {
    /// Same content; metadata applied (answer now).
    Same,
    /// Same content at another basis; a copy waits for publication (answer later).
    Later,
    /// Different: the signature of the slave's file (empty: none usable).
    Differs(Vec<u8>),
}

/// Reads the regular file `basis` (or `path`) whole if it is at most
/// `MAX_DATA` bytes. Never an inode a local user linked from elsewhere: an
/// explicit basis with foreign links is refused, the default one is none.
fn read_small(root: &Root, path: &RelPath, basis: Option<&RelPath>) -> WResult<Option<Vec<u8>>> {
    let at = basis.unwrap_or(path);
    let (dir, name) = root.parent(at)?;
    let Ok(f) = open_regular(root, &dir, name) else {
        return Ok(None);
    };
    if foreign_links(f.as_fd()) {
        return match basis {
            Some(b) => Err(super::super::meta::foreign_links_error(b, false)),
            None => Ok(None),
        };
    }
    let len = f.metadata().map_err(|e| io_err(e, "stat", at))?.len();
    if len > MAX_DATA as u64 {
        return Ok(None);
    }
    let mut data = Vec::with_capacity(len as usize);
    (&f).take(MAX_DATA as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| io_err(e, "read", at))?;
    if data.len() > MAX_DATA {
        return Ok(None);
    }
    Ok(Some(data))
}

impl Files {
    /// See `Request::ProbeFile`.
    #[allow(clippy::too_many_arguments)]
    pub fn probe(
        &mut self,
        root: &Root,
        id: u64,
        path: &RelPath,
        basis: Option<&RelPath>,
        want: &Hash32,
        meta: &Meta,
        block: u32,
    ) -> WResult<Probe> {
        if !(256..=65536).contains(&block) {
            return Err(invalid("bad signature block size"));
        }
        let Some(data) = read_small(root, path, basis)? else {
            return Ok(Probe::Differs(Vec::new()));
        };
        if &digest::digest_of(&data) != want {
            let sig = fast_rsync::Signature::calculate(
                &data,
                fast_rsync::SignatureOptions {
                    block_size: block,
                    crypto_hash_size: 8,
                },
            );
            return Ok(Probe::Differs(sig.into_serialized()));
        }
        match basis {
            None => root.set_meta(path, meta).map(|_| Probe::Same),
            Some(_) => self
                .put_file(root, id, path, &data, want, meta)
                .map(|_| Probe::Later),
        }
    }

    /// See `Request::PutDelta`.
    #[allow(clippy::too_many_arguments)]
    pub fn put_delta(
        &mut self,
        root: &Root,
        id: u64,
        path: &RelPath,
        basis: Option<&RelPath>,
        size: u64,
        delta: &[u8],
        want: &Hash32,
        meta: &Meta,
    ) -> WResult<()> {
        if size > MAX_DATA as u64 {
            return Err(invalid(format!(
                "{path}: delta output above {MAX_DATA} bytes"
            )));
        }
        let Some(base) = read_small(root, path, basis)? else {
            return Err(WireError::new(
                ErrorKind::NotFound,
                format!("{path}: the basis of the delta is gone; the file is sent again by the next crawl"),
            ));
        };
        let mut out = Vec::with_capacity(size as usize);
        fast_rsync::apply_limited(&base, delta, &mut out, size as usize)
            .map_err(|e| invalid(format!("{path}: bad delta: {e}")))?;
        if out.len() as u64 != size {
            return Err(WireError::new(
                ErrorKind::Mismatch,
                format!(
                    "{path}: the delta made {} bytes, not {size}: the slave's copy changed",
                    out.len()
                ),
            ));
        }
        self.put_file(root, id, path, &out, want, meta)
    }
}
