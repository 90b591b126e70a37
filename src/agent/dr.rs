//! The agent's disaster-recovery requests: the worker's claim (fencing),
//! the record of a complete sync, a promote for a switchover, and the
//! steps of a failback's quarantine. Kept apart from the file requests.

use super::quarantine::{Building, Job, StoreJob};
use super::role::{record_synced, Synced};
use super::Agent;
use crate::protocol::{ErrorKind, Reply, Request, WireError};

fn invalid(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorKind::Invalid, msg)
}

/// Largest number of paths one `QuarantineResolve` may carry.
const MAX_RESOLVE: usize = 10_000;

impl Agent<'_> {
    pub(super) fn handle_dr(&mut self, body: Request) -> Result<Reply, WireError> {
        match body {
            Request::Claim {
                session,
                epoch,
                failback,
            } => {
                // Commits accepted under the previous claim are published first.
                self.flush();
                self.quarantine = None;
                self.fence.claim(&self.root, session, epoch, failback)
            }
            Request::Synced { stime, at_ns } => {
                self.flush();
                record_synced(&self.root, Synced { stime, at_ns }).map(|_| Reply::Done)
            }
            Request::Promote { session, epoch } => {
                if self.fence.claimed() != Some((session, epoch)) {
                    return Err(invalid(
                        "Promote: claim the root for that session and epoch first",
                    ));
                }
                self.flush();
                self.files.abort_all();
                let report = super::promote::promote(&self.root, Some((session, epoch)))
                    .map_err(|e| WireError::new(ErrorKind::Invalid, e.to_string()))?;
                if let Ok(Some(r)) = super::role::read_role(&self.root) {
                    self.fence.promoted(r);
                }
                Ok(Reply::Promoted {
                    report: serde_json::to_string(&report).expect("serializes"),
                })
            }
            Request::QuarantineStep {
                max_entries,
                max_bytes,
                answers,
            } => {
                // The walk reads what is published, not what is being renamed.
                self.flush();
                if answers.len() > MAX_RESOLVE {
                    return Err(invalid(format!(
                        "QuarantineStep: at most {MAX_RESOLVE} answers per request"
                    )));
                }
                let (Some((session, epoch)), Some(fb)) =
                    (self.fence.claimed(), self.fence.failback().cloned())
                else {
                    return Err(invalid(
                        "QuarantineStep: only the reverse session of a failback builds a quarantine",
                    ));
                };
                if self.quarantine.is_none() {
                    self.quarantine = Some(if fb.store {
                        Building::Store(Box::new(StoreJob::start(
                            self.root.path(),
                            session,
                            epoch,
                            &fb,
                        )?))
                    } else {
                        Building::Tree(Box::new(Job::start(&self.root, session, epoch, &fb)?))
                    });
                }
                let (max_entries, max_bytes) = (max_entries.min(4096), max_bytes.min(256 << 20));
                match self.quarantine.as_mut().expect("set above") {
                    Building::Tree(job) => {
                        let (entries, ask, done) = job.step(max_entries, max_bytes, answers)?;
                        Ok(Reply::Quarantined {
                            id: job.id.clone(),
                            entries,
                            ask,
                            done,
                        })
                    }
                    Building::Store(job) => {
                        if !answers.is_empty() {
                            return Err(invalid(
                                "QuarantineStep: a store's quarantine asks nothing",
                            ));
                        }
                        let done = job.step(max_entries as usize, max_bytes)?;
                        Ok(Reply::Quarantined {
                            id: job.id.clone(),
                            entries: Vec::new(),
                            ask: Vec::new(),
                            done,
                        })
                    }
                }
            }
            Request::QuarantineResolve { conflicts, same } => {
                if conflicts.len() + same.len() > MAX_RESOLVE {
                    return Err(invalid(format!(
                        "QuarantineResolve: at most {MAX_RESOLVE} paths per request"
                    )));
                }
                match self.quarantine.as_mut() {
                    Some(Building::Tree(job)) => {
                        job.resolve(&conflicts, &same).map(|_| Reply::Done)
                    }
                    Some(Building::Store(_)) => Err(invalid(
                        "QuarantineResolve: a store's quarantine has nothing to resolve",
                    )),
                    None => Err(invalid("QuarantineResolve: no quarantine is being built")),
                }
            }
            Request::QuarantineCommit => {
                self.flush();
                let fd = self.root.fd();
                match self.quarantine.as_mut() {
                    Some(Building::Tree(job)) => job.commit(fd).map(|_| Reply::Done),
                    Some(Building::Store(job)) => job.commit(fd).map(|_| Reply::Done),
                    None => Err(invalid("QuarantineCommit: no quarantine is being built")),
                }
            }
            _ => Err(invalid("not a disaster-recovery request")),
        }
    }
}
