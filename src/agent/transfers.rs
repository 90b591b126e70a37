//! Requests of WAN transfers: stream groups, shared files, small files
//! probed by digest and sent as deltas, compression, resumable transfers.

use super::{files, streams, Agent};
use crate::protocol::{ErrorKind, Reply, Request, WireError};

impl Agent<'_> {
    /// Handles the requests above; `None` when the answer comes later
    /// (with the file's publication).
    pub(super) fn handle_transfer(
        &mut self,
        id: u64,
        body: Request,
    ) -> Option<Result<Reply, WireError>> {
        Some(match body {
            Request::OpenStreams if self.primary => {
                self.grouped = true;
                streams::open_group(&self.root).map(Reply::StreamToken)
            }
            Request::OpenStreams => Err(WireError::new(
                ErrorKind::Invalid,
                "only the group's primary agent opens streams",
            )),
            Request::OpenShared {
                fid,
                path,
                basis,
                size,
            } => {
                self.flush_if(|p| p == &path);
                self.files
                    .open_shared(&self.root, fid, &path, basis.as_ref(), size)
                    .map(|(basis_size, tmp)| Reply::OpenedShared {
                        basis_size,
                        tmp: tmp.into(),
                    })
            }
            Request::OpenSegment {
                fid,
                path,
                tmp,
                basis,
                size,
                start,
                end,
            } => self
                .files
                .open_segment(
                    &self.root,
                    fid,
                    &path,
                    &tmp,
                    basis.as_ref(),
                    size,
                    start,
                    end,
                )
                .map(|basis_size| Reply::Opened { basis_size }),
            Request::FinishSegment { fid } => self
                .files
                .finish_segment(fid)
                .map(|(roots, written)| Reply::SegmentRoots { roots, written }),
            Request::Negotiate { compression } => Ok(Reply::Negotiated {
                compression: match crate::protocol::compress::Mode::parse(&compression) {
                    Some(m) => m.name(),
                    None => "off".into(),
                },
            }),
            Request::OpenResumable {
                fid,
                path,
                basis,
                size,
                key,
            } => {
                self.flush_if(|p| p == &path);
                self.files
                    .open_resumable(&self.root, fid, &path, basis.as_ref(), size, &key)
                    .map(|(basis_size, resumed, roots)| Reply::OpenedResumable {
                        basis_size,
                        resumed,
                        roots,
                    })
            }
            Request::CleanPartials { max_age_secs } => self
                .files
                .clean_partials(&self.root, max_age_secs)
                .map(|_| Reply::Done),
            Request::ProbeFile {
                path,
                basis,
                digest,
                meta,
                block,
            } => {
                self.flush_if(|p| p == &path || Some(p) == basis.as_ref());
                match self
                    .files
                    .probe(&self.root, id, &path, basis.as_ref(), &digest, &meta, block)
                {
                    Ok(files::Probe::Same) => Ok(Reply::Done),
                    Ok(files::Probe::Later) => return None,
                    Ok(files::Probe::Differs(sig)) => Ok(Reply::Probed {
                        signature: sig.into(),
                    }),
                    Err(e) => Err(e),
                }
            }
            Request::PutDelta {
                path,
                basis,
                size,
                delta,
                digest,
                meta,
            } => {
                self.flush_if(|p| p == &path || Some(p) == basis.as_ref());
                match self.files.put_delta(
                    &self.root,
                    id,
                    &path,
                    basis.as_ref(),
                    size,
                    &delta,
                    &digest,
                    &meta,
                ) {
                    Ok(()) => return None,
                    Err(e) => Err(e),
                }
            }
            Request::CommitShared {
                fid,
                digest,
                meta,
                segments,
            } => match self.files.commit_shared(id, fid, &digest, &meta, &segments) {
                Ok(()) => return None,
                Err(e) => Err(e),
            },
            _ => Err(WireError::new(ErrorKind::Invalid, "unexpected request")),
        })
    }
}
