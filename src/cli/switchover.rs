//! `georep switchover S --reverse R`: a planned change of direction with
//! no loss (DESIGN §10). It refuses unless the master has been quiet (no
//! entry moved) for `--wait-quiet` seconds, or `--force`; then it stops the
//! session, runs a final sync and a second one that must find nothing to do
//! (the verification), promotes the slave through its agent, creates the
//! reverse session R (slave -> master), demotes the master (a replica of R,
//! so a stray worker of the old direction is fenced) and with `--start`
//! starts R. Every step is idempotent: a switchover killed at any moment
//! and run again converges.

use crate::engine::outcome::SyncOptions;
use crate::error::exit;
use crate::fs::role::{self, Role, RoleRecord};
use crate::session::{Session, SlaveSpec};
use crate::user_err;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Options of `georep switchover`.
pub struct SwitchoverOptions {
    pub wait_quiet: u64,
    pub force: bool,
    pub start: bool,
    /// A slave reached over SSH: the other site's steps.
    pub ssh: crate::cli::peer::SshOptions,
}

/// What every entry of a tree looks like now (kind, size, mtime, ctime, inode).
fn fingerprint(root: &Path) -> BTreeMap<PathBuf, (u32, u64, i64, i64, i64, u64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if d == root
                && crate::protocol::reserved_at_root(std::os::unix::ffi::OsStrExt::as_bytes(
                    e.file_name().as_os_str(),
                ))
            {
                continue;
            }
            let Ok(md) = p.symlink_metadata() else {
                continue;
            };
            if md.is_dir() {
                stack.push(p.clone());
            }
            out.insert(
                p,
                (
                    md.mode() & libc::S_IFMT,
                    md.len(),
                    md.mtime_nsec() + md.mtime() * 1_000_000_000,
                    md.ctime(),
                    md.ctime_nsec(),
                    md.ino(),
                ),
            );
        }
    }
    out
}

/// Refuses unless nothing under `root` moved for `secs` seconds; names a path that did.
fn wait_quiet(root: &Path, secs: u64) -> anyhow::Result<()> {
    let before = fingerprint(root);
    std::thread::sleep(Duration::from_secs(secs));
    let after = fingerprint(root);
    let moved = after
        .iter()
        .find(|(p, v)| before.get(*p) != Some(v))
        .map(|(p, _)| p.clone())
        .or_else(|| before.keys().find(|p| !after.contains_key(*p)).cloned());
    match moved {
        Some(p) => Err(crate::cli::dr::TemporaryError(format!(
            "switchover refused: the master is not quiet: {} changed within the last {secs} s; stop its writers and run it again, or give --force",
            p.display()
        ))
        .into()),
        None => Ok(()),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(crate::engine::worker::runtime()?)
}

/// `georep switchover SESSION --reverse REVERSE`.
pub fn switchover(name: &str, reverse: &str, o: &SwitchoverOptions) -> anyhow::Result<i32> {
    let s = Session::load(name)?;
    crate::session::check_name(reverse)?;
    let slave = match s.slave_spec()? {
        SlaveSpec::Local(p) => p,
        SlaveSpec::Ssh { .. } => {
            return Err(user_err!(
                "switchover of session {name}: its slave is reached over SSH: run it as `georep switchover` (cli::switchover_ssh)"
            )
            .into())
        }
    };
    if o.ssh.any() {
        return Err(user_err!(
            "switchover of session {name}: its slave {} is a local directory: --peer-admin, --identity, --reverse-slave, --push-pem and the --reverse-* options are for a slave reached over SSH",
            slave.display()
        )
        .into());
    }
    let master = s.config.master.clone();
    let existing = Session::load(reverse).ok();
    if let Some(r) = &existing {
        if r.config.master != slave || Path::new(&r.config.slave) != master {
            return Err(user_err!(
                "session {reverse:?} already exists and is not {} -> {}: choose another name for the reverse session",
                slave.display(),
                master.display()
            )
            .into());
        }
    }
    let slave_role = role::read(&slave).map_err(|e| user_err!("slave: {e}"))?;
    let promoted = slave_role
        .as_ref()
        .is_some_and(|r| r.is_live() && r.session == Some(s.config.session_id));
    if !promoted {
        final_sync_and_promote(&s, o)?;
    }
    let b_role = role::read(&slave)
        .map_err(|e| user_err!("slave: {e}"))?
        .filter(|r| r.is_live())
        .ok_or_else(|| user_err!("{} was not promoted", slave.display()))?;
    // The reverse session, then the master demoted to its replica.
    let rev = match existing {
        Some(r) => r,
        None => {
            demote(&master, uuid::Uuid::nil(), b_role.epoch, false)?;
            let c = crate::cli::admin::create(
                reverse,
                &slave,
                &master.display().to_string(),
                &reverse_options(&s),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            c.session
        }
    };
    demote(&master, rev.config.session_id, b_role.epoch, true)?;
    println!(
        "switched over: {} is the live store (epoch {}); {} is a replica of session {reverse} (demoted)",
        slave.display(),
        b_role.epoch,
        master.display()
    );
    if o.start {
        crate::daemon::start(reverse)?;
    }
    Ok(exit::OK)
}

/// The settings of the reverse session: those of the session it reverses.
pub(crate) fn reverse_options(s: &Session) -> crate::cli::admin::CreateOptions {
    crate::cli::admin::CreateOptions {
        mode: s.config.mode,
        interval_secs: Some(s.config.interval_secs),
        marker: s.config.marker,
        layout: Some(s.config.layout),
        inplace_min_size: s.config.inplace_min_size,
        // A store's reverse session sets aside, in the old master's
        // quarantine, the points the replica never held before its
        // retention removes them.
        failback: s.config.layout == crate::session::Layout::Store,
        ..Default::default()
    }
}

/// Stops the session, waits for its master to be quiet (unless forced),
/// runs the final sync and the check that finds nothing to do, and
/// promotes the slave through its agent (which verifies and raises the
/// epoch); prints the promote's report.
pub(crate) fn final_sync_and_promote(s: &Session, o: &SwitchoverOptions) -> anyhow::Result<()> {
    let name = &s.name;
    if s.running_pid().is_some() {
        crate::daemon::stop(name, false)?;
    }
    if !o.force {
        println!("waiting {} s for the master to be quiet...", o.wait_quiet);
        wait_quiet(&s.config.master, o.wait_quiet)?;
    }
    let rt = runtime()?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let last = rt.block_on(async {
        let opts = SyncOptions::default();
        let first = crate::engine::worker::sync_once(s, &opts, shutdown.clone()).await?;
        if !first.complete {
            return Ok::<_, anyhow::Error>(Err(first));
        }
        // The verification: a second pass that finds nothing to do.
        let check = crate::engine::worker::sync_once(s, &opts, shutdown.clone()).await?;
        Ok(Ok(check))
    })?;
    let check = match last {
        Ok(c) => c,
        Err(first) => {
            return Err(crate::cli::dr::TemporaryError(format!(
                "switchover refused: the final sync did not complete ({} failures, first: {}); fix them and run it again",
                first.failures,
                first.errors.first().map(|e| format!("{}: {}", e.path, e.error)).unwrap_or_default()
            ))
            .into())
        }
    };
    if !check.complete || check.files_synced + check.deletes + check.bytes_sent + check.symlinks > 0
    {
        return Err(crate::cli::dr::TemporaryError(format!(
            "switchover refused: the master changed during the final sync ({} files, {} deletions in the check); stop its writers and run it again",
            check.files_synced, check.deletes
        ))
        .into());
    }
    let report = rt.block_on(async {
        let conn = crate::engine::worker::connect(s).await?;
        let sl = crate::engine::slave::Slave::new(conn.client.clone());
        let mut state = s.state();
        crate::engine::lineage::claim(s, &sl, &mut state).await?;
        let r = sl.promote(s.config.session_id, s.config.epoch).await;
        drop(sl); // the last client: its end closes the agent's input
        conn.close(Duration::from_secs(30)).await;
        r.map_err(|e| anyhow::anyhow!("promoting the slave: {e}"))
    })?;
    let report: crate::agent::promote::PromoteReport = serde_json::from_str(&report)?;
    crate::cli::dr::print_report(&report);
    Ok(())
}

/// Marks the old master a replica again: of `session` (nil while the
/// reverse session is being created: still demoted, so no worker of the old
/// direction runs meanwhile).
pub(crate) fn demote(
    root: &Path,
    session: uuid::Uuid,
    epoch: u64,
    final_: bool,
) -> anyhow::Result<()> {
    if let Ok(Some(r)) = role::read(root) {
        if r.role == Role::Demoted && r.epoch == epoch && (r.session == Some(session) || !final_) {
            return Ok(());
        }
    }
    role::write(
        root,
        &RoleRecord {
            role: Role::Demoted,
            epoch,
            session: (!session.is_nil()).then_some(session),
            at_ns: crate::fs::xtime::now_ns(),
            host: role::host_name(),
            promote_stamp: None,
            report: None,
        },
    )
    .map_err(|e| anyhow::anyhow!("demoting {}: {e}", root.display()))
}
