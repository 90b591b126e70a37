//! Disaster-recovery commands (DESIGN §10; docs/disaster-recovery.md):
//! `promote`, `quarantine`, and what `create --failback` checks.

use crate::agent::promote::{self, PromoteError, PromoteReport};
use crate::agent::quarantine::{self, QuarantineError};
use crate::error::{exit, UserError};
use crate::fs::role::{self, Role};
use crate::session::Failback;
use crate::user_err;
use std::path::Path;

/// The epoch of a new session of `master`, and for `--failback` what the
/// promote it reverses says.
pub fn lineage(
    master: &Path,
    failback: bool,
    force: bool,
) -> Result<(u64, Option<Failback>), UserError> {
    let r = role::read(master).map_err(|e| user_err!("master: {e}"))?;
    if let Some(r) = &r {
        if r.role == Role::Demoted {
            return Err(user_err!(
                "master {} is {}: it is written by that session; create sessions from the live store, or promote this root first",
                master.display(),
                r.describe()
            ));
        }
    }
    if force && !failback {
        return Err(user_err!("--force goes with --failback"));
    }
    if !failback {
        return Ok((r.map(|r| r.epoch).unwrap_or(0), None));
    }
    let Some(r) = r.filter(|r| r.is_live()) else {
        return Err(user_err!(
            "--failback: {} is not a promoted replica: promote it first (`georep promote {}`), on this site",
            master.display(),
            master.display()
        ));
    };
    let Some(old_session) = r.session else {
        return Err(user_err!(
            "--failback: {}'s role names no session it was a replica of: without it there is no common point; create a plain session instead",
            master.display()
        ));
    };
    Ok((
        r.epoch,
        Some(Failback {
            old_session,
            promote_stamp: r.promote_stamp.unwrap_or(0),
            promoted_at_ns: r.at_ns,
            force,
        }),
    ))
}

/// A local failback slave must be the old master (unless forced); a plain
/// session of a promoted store must not take an old master without the
/// quarantine (the agent refuses it as well, for SSH slaves).
pub fn check_failback_slave(
    slave: &Path,
    master: &Path,
    fb: Option<&Failback>,
) -> Result<(), UserError> {
    match fb {
        Some(fb) if !fb.force => {
            if !crate::agent::role::was_master_of(slave, &fb.old_session) {
                return Err(user_err!(
                    "--failback: {} was never the master of session {} (it holds none of its sync times): give the old master's directory, or add --force to treat everything there as divergent",
                    slave.display(),
                    fb.old_session
                ));
            }
            Ok(())
        }
        Some(_) => Ok(()),
        None => {
            if role::read(slave).is_ok_and(|r| r.is_some_and(|r| r.role == Role::Demoted)) {
                return Ok(()); // demoted by a switchover: equal to the master, nothing to keep
            }
            if let Ok(Some(r)) = role::read(master) {
                if let Some(old) = r.session.filter(|_| r.is_live()) {
                    if crate::agent::role::was_master_of(slave, &old) {
                        return Err(user_err!(
                            "{} is the old master of this promoted store: create the session with --failback, so that what changed there is quarantined before it is overwritten",
                            slave.display()
                        ));
                    }
                }
            }
            Ok(())
        }
    }
}

fn age(secs: Option<f64>) -> String {
    match secs {
        Some(s) if s < 120.0 => format!("{s:.0} s"),
        Some(s) if s < 7200.0 => format!("{:.0} min", s / 60.0),
        Some(s) => format!("{:.1} h", s / 3600.0),
        None => "?".into(),
    }
}

/// The text report of a promote.
pub fn print_report(r: &PromoteReport) {
    if r.already {
        println!(
            "{} is already promoted (at {} on {}, epoch {}): nothing to do",
            r.root, r.promoted_at, r.host, r.epoch
        );
    } else {
        println!(
            "promoted {} at {} on {}: a live store now (epoch {}); it was a replica of session {}",
            r.root,
            r.promoted_at,
            r.host,
            r.epoch,
            r.from_session.map(|s| s.to_string()).unwrap_or("?".into())
        );
        let c = &r.cleaned;
        println!(
            "rolled back or removed: {} interrupted in-place updates, {} temporaries, {} staged generations, {} journal tails, {} unreferenced files",
            c.undo_logs, c.temporaries, c.staging, c.journal_tails, c.unreferenced
        );
    }
    if r.layout == "tree" {
        match &r.last_synced {
            Some(t) => println!(
                "recovered: everything changed on the old master before {t} (age {}, the RPO achieved)",
                age(r.last_synced_age_secs)
            ),
            None => println!("recovered: no complete sync was recorded"),
        }
    }
    for h in &r.hosts {
        println!(
            "recovered: host {}: newest complete point {} (age {}, the RPO achieved), {} host snapshots",
            h.host,
            h.newest_complete_utc.as_deref().unwrap_or("none"),
            age(h.age_secs),
            h.snapshots
        );
    }
    if r.problems.is_empty() {
        println!("verified: everything recovered checks out");
    } else {
        for p in &r.problems {
            println!("does not verify: {p}");
        }
    }
}

/// `georep promote DIR [--json]`.
pub fn promote_cmd(dir: &Path, json: bool) -> anyhow::Result<i32> {
    let r = promote::promote_dir(dir).map_err(|e| -> anyhow::Error {
        match e {
            PromoteError::NotReplica(m) | PromoteError::Refused(m) => UserError(m).into(),
            PromoteError::Busy(m) => TemporaryError(m).into(),
            PromoteError::Io(m) => anyhow::anyhow!(m),
        }
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_report(&r);
    }
    Ok(if r.problems.is_empty() {
        exit::OK
    } else {
        exit::PARTIAL
    })
}

/// A temporary failure of a command (exit 3).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TemporaryError(pub String);

fn qerr(e: QuarantineError) -> anyhow::Error {
    match e {
        QuarantineError::Usage(m) => UserError(m).into(),
        QuarantineError::Io(m) => anyhow::anyhow!(m),
    }
}

/// `georep quarantine list|show|restore|discard`.
pub fn quarantine_cmd(op: crate::cli::args::QuarantineOp) -> anyhow::Result<i32> {
    use crate::cli::args::QuarantineOp;
    match op {
        QuarantineOp::List { dir, json } => {
            let all = quarantine::list(&dir).map_err(qerr)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("no quarantine in {}", dir.display());
            } else {
                println!(
                    "{:<24} {:<21} {:>7} {:>12}  REASONS",
                    "ID", "CREATED", "ENTRIES", "BYTES"
                );
                for m in &all {
                    let conflicts = m.items.iter().filter(|i| i.reason == "conflict").count();
                    println!(
                        "{:<24} {:<21} {:>7} {:>12}  {} divergent, {} conflicts",
                        m.id,
                        m.created,
                        m.items.len(),
                        m.bytes(),
                        m.items.len() - conflicts,
                        conflicts
                    );
                }
            }
        }
        QuarantineOp::Show { dir, id, json } => {
            let m = quarantine::show(&dir, &id).map_err(qerr)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                println!(
                    "quarantine {} of {} (created {} on {} by session {}; common point: {})",
                    m.id,
                    dir.display(),
                    m.created,
                    m.host,
                    m.session,
                    m.rule
                );
                for i in &m.items {
                    println!(
                        "{:<10} {:<8} {:>12} {:o} {}{}",
                        i.reason,
                        i.kind,
                        i.size,
                        i.mode,
                        i.path,
                        i.target
                            .as_ref()
                            .map(|t| format!(" -> {t}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        QuarantineOp::Restore { dir, id, paths, to } => {
            let done = quarantine::restore(&dir, &id, &paths, to.as_deref()).map_err(qerr)?;
            let target = to.as_deref().unwrap_or(&dir);
            println!(
                "restored {} entries of quarantine {id} into {} (the quarantine keeps them until `georep quarantine discard {} {id}`)",
                done.len(),
                target.display(),
                dir.display()
            );
        }
        QuarantineOp::Discard { dir, id } => {
            let m = quarantine::discard(&dir, &id).map_err(qerr)?;
            println!(
                "discarded quarantine {} ({} entries, {} bytes) from {}",
                m.id,
                m.items.len(),
                m.bytes(),
                dir.display()
            );
        }
    }
    Ok(exit::OK)
}
