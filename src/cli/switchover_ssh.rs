//! `georep switchover` of a session whose slave is reached over SSH: the
//! reverse session lives on the slave's site B, reaching this site A over
//! SSH. Run on A: the final sync and the promote of B go through the
//! session's agent as for a local slave; the steps on B (reading its role,
//! creating the reverse session, starting it) are `georep …` commands run
//! there over the operator's own SSH access (see [`crate::cli::peer`]).
//! Each step looks first whether it is done, so a switchover killed at any
//! moment and run again converges.

use super::peer::{Peer, PeerError, SshOptions};
use super::switchover::{demote, final_sync_and_promote, SwitchoverOptions};
use crate::error::{exit, UserError};
use crate::session::{Config, Layout, MarkerPolicy, Session, SlaveSpec, SyncMode};
use crate::transport::ssh::{self, setup, SshTarget};
use crate::user_err;
use std::path::Path;

/// `[user@]host` of an option, checked as ssh would take it.
fn user_host(s: &str, what: &str) -> Result<(Option<String>, String), UserError> {
    let (user, host) = match s.rsplit_once('@') {
        Some((u, h)) => (Some(u.to_string()), h.to_string()),
        None => (None, s.to_string()),
    };
    ssh::check_host(&host).map_err(|e| user_err!("{what}: {e}"))?;
    if let Some(u) = &user {
        ssh::check_user(u).map_err(|e| user_err!("{what}: {e}"))?;
    }
    Ok((user, host))
}

/// The reverse session's slave: this master, over SSH, as the slave's site
/// names it; `[user@]host:root` as `create` records it.
fn reverse_slave(s: &Session, spec: Option<&str>, b_host: &str) -> Result<String, UserError> {
    let master = &s.config.master;
    let Some(spec) = spec else {
        return Err(user_err!(
            "switchover of session {}: its slave is on {b_host}, so the reverse session is created there and reaches this site over SSH: give --reverse-slave [USER@]HOST:{} (this site as {b_host} reaches it; add --push-pem to install a key for it)",
            s.name,
            master.display()
        ));
    };
    let SlaveSpec::Ssh { user, host, path } = SlaveSpec::parse(spec)? else {
        return Err(user_err!(
            "--reverse-slave {spec:?}: give this site as the slave's site reaches it over SSH: [USER@]HOST:{}",
            master.display()
        ));
    };
    ssh::check_host(&host)?;
    if let Some(u) = &user {
        ssh::check_user(u)?;
    }
    let root = ssh::check_remote_path(&path)?;
    if Path::new(&root) != master.as_path() {
        return Err(user_err!(
            "--reverse-slave {spec:?}: its path must be this session's master {}: the reverse session replicates onto it",
            master.display()
        ));
    }
    Ok(match user {
        Some(u) => format!("{u}@{host}:{root}"),
        None => format!("{host}:{root}"),
    })
}

fn mode_arg(m: SyncMode) -> &'static str {
    match m {
        SyncMode::Continuous => "continuous",
        SyncMode::Interval => "interval",
    }
}

fn marker_arg(m: MarkerPolicy) -> &'static str {
    match m {
        MarkerPolicy::Auto => "auto",
        MarkerPolicy::Mark => "mark",
    }
}

/// `georep create REVERSE B_ROOT A_SPEC …` as run on the slave's site.
fn create_args(
    s: &Session,
    reverse: &str,
    b_root: &str,
    a_spec: &str,
    o: &SshOptions,
) -> Vec<String> {
    let georep = o.reverse_remote_georep.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| ssh::DEFAULT_REMOTE_GEOREP.to_string())
    });
    let mut a: Vec<String> = vec![
        "create".into(),
        reverse.into(),
        b_root.into(),
        a_spec.into(),
        "--mode".into(),
        mode_arg(s.config.mode).into(),
        "--interval".into(),
        s.config.interval_secs.to_string(),
        "--marker".into(),
        marker_arg(s.config.marker).into(),
        "--layout".into(),
        match s.config.layout {
            Layout::Tree => "tree",
            Layout::Store => "store",
        }
        .into(),
        "--remote-georep".into(),
        georep,
    ];
    if let Some(n) = s.config.inplace_min_size {
        a.extend(["--inplace-min-size".into(), n.to_string()]);
    }
    if s.config.layout == Layout::Store {
        // See `switchover::reverse_options`.
        a.push("--failback".into());
    }
    if o.push_pem {
        a.push("--push-pem".into());
    }
    if let Some(p) = o.reverse_ssh_port {
        a.extend(["--ssh-port".into(), p.to_string()]);
    }
    if let Some(i) = &o.reverse_identity {
        a.extend(["--identity".into(), i.clone()]);
    }
    a
}

/// A step on the other site failed: one line, what is done, and what to do.
fn step(what: &str, done: &str) -> impl FnOnce(PeerError) -> anyhow::Error {
    let (what, done) = (what.to_string(), done.to_string());
    move |e| {
        let fix = match e.retry() {
            crate::error::Retry::Temporary => "run the switchover again",
            crate::error::Retry::Permanent => "fix that and run the switchover again",
        };
        let line = format!("switchover: {what}: {e}{done}; {fix}");
        anyhow::Error::new(e).context(line)
    }
}

/// `georep switchover SESSION --reverse REVERSE`: over SSH here, for a
/// local slave in [`super::switchover`].
pub fn run(name: &str, reverse: &str, o: &SwitchoverOptions) -> anyhow::Result<i32> {
    let s = Session::load(name)?;
    match s.slave_spec()? {
        SlaveSpec::Ssh { .. } => {
            crate::session::check_name(reverse)?;
            switchover(&s, reverse, o)
        }
        _ => super::switchover::switchover(name, reverse, o),
    }
}

/// The switchover of `s`, whose slave is reached over SSH.
fn switchover(s: &Session, reverse: &str, o: &SwitchoverOptions) -> anyhow::Result<i32> {
    let name = &s.name;
    let slave = SshTarget::from_session(s)?;
    let b_root = slave.root.clone();
    let a_spec = reverse_slave(s, o.ssh.reverse_slave.as_deref(), &slave.host)?;
    let (user, host) = match &o.ssh.peer_admin {
        Some(pa) => user_host(pa, "--peer-admin")?,
        None => (slave.user.clone(), slave.host.clone()),
    };
    let identity = match &o.ssh.identity {
        Some(id) => Some(std::fs::canonicalize(id).map_err(|e| {
            user_err!(
                "--identity {}: {e}: give your private key for {host}",
                id.display()
            )
        })?),
        None => None,
    };
    let port = (host == slave.host).then_some(slave.port).flatten();
    let peer = Peer::new(SshTarget {
        user,
        host,
        port,
        root: b_root.clone(),
        identity,
        known_hosts: s.dir.join(setup::KNOWN_HOSTS_FILE),
        remote_georep: slave.remote_georep.clone(),
        session_key: false,
    });
    let b = peer.display();
    // Nothing is done before the other site is known to take commands.
    let fix = format!(
        "give --peer-admin USER@HOST with your own shell access to it (and --identity FILE), or switch over by hand: here `georep stop {name}` and `georep sync {name}` until it ships nothing, then on {b}: `georep promote {b_root}` and `georep create {reverse} {b_root} {a_spec} --failback`"
    );
    let nothing = " (nothing was changed)";
    peer.probe(&fix)
        .map_err(step(&format!("checking the access to {b}"), nothing))?;
    let existing = peer.session(reverse).map_err(step(
        &format!("looking for session {reverse} on {b}"),
        nothing,
    ))?;
    if let Some(c) = &existing {
        check_existing(c, reverse, &b, &b_root, &a_spec)?;
    }
    let read_role = |done: &str| {
        peer.role(&b_root)
            .map_err(step(&format!("reading the role of {b_root} on {b}"), done))
    };
    let b_role = read_role(nothing)?;
    let promoted = b_role
        .as_ref()
        .is_some_and(|r| r.is_live() && r.session == Some(s.config.session_id));
    if !promoted {
        final_sync_and_promote(s, o)?;
    }
    let promoted_only = &format!(" ({b_root} on {b} is promoted, nothing else changed)");
    let b_role = read_role(promoted_only)?
        .filter(|r| r.is_live())
        .ok_or_else(|| user_err!("{b_root} on {b} was not promoted"))?;
    let master = s.config.master.clone();
    let demoted = &format!(
        " ({b_root} on {b} is promoted and {} demoted; a stray worker of {name} is fenced on both)",
        master.display()
    );
    let rev = match existing {
        Some(c) => c,
        None => {
            demote(&master, uuid::Uuid::nil(), b_role.epoch, false)?;
            let args = create_args(s, reverse, &b_root, &a_spec, &o.ssh);
            match peer.georep(&args) {
                Ok(_) => {}
                // A create of a killed earlier run finished meanwhile.
                Err(PeerError::Failed { code: 2, said, .. }) if said.contains("already exists") => {
                }
                Err(e) => {
                    return Err(step(
                        &format!("creating the reverse session {reverse} on {b}"),
                        demoted,
                    )(e))
                }
            }
            let c = peer
                .session(reverse)
                .map_err(step(&format!("reading session {reverse} on {b}"), demoted))?
                .ok_or_else(|| user_err!("session {reverse} on {b} was not created"))?;
            check_existing(&c, reverse, &b, &b_root, &a_spec)?;
            c
        }
    };
    // The create's write check (a file opened and dropped at this root)
    // moved its mtime: equal to B's again, as the reverse session's first
    // sync would make it. (Every run: one killed after the create may not
    // have got here, and the role alone cannot tell.)
    align_root_mtime(s, &master)?;
    demote(&master, rev.session_id, b_role.epoch, true)?;
    println!(
        "switched over: {b_root} on {b} is the live store (epoch {}); {} is a replica of session {reverse} there (demoted)",
        b_role.epoch,
        master.display()
    );
    if o.start {
        let out = peer
            .georep(&["start".into(), reverse.into()])
            .map_err(step(
                &format!("starting session {reverse} on {b}"),
                " (the switchover is done)",
            ))?;
        print!("{b}: {out}");
    }
    Ok(exit::OK)
}

/// An existing reverse session on the other site must be this one.
fn check_existing(
    c: &Config,
    reverse: &str,
    b: &str,
    b_root: &str,
    a_spec: &str,
) -> Result<(), UserError> {
    if c.master != Path::new(b_root) || c.slave != a_spec {
        return Err(user_err!(
            "session {reverse:?} already exists on {b} and is not {b_root} -> {a_spec} (it is {} -> {}): choose another name for the reverse session",
            c.master.display(),
            c.slave
        ));
    }
    Ok(())
}

/// Gives `master`'s root the mtime of the slave's root (read through the
/// session's agent: a read, which the promoted store allows).
fn align_root_mtime(s: &Session, master: &Path) -> anyhow::Result<()> {
    let rt = crate::engine::worker::runtime()?;
    let entry = rt.block_on(async {
        let conn = crate::engine::worker::connect(s).await?;
        let sl = crate::engine::slave::Slave::new(conn.client.clone());
        let r = sl.stat(crate::fs::relpath::RelPath::root()).await;
        drop(sl);
        conn.close(std::time::Duration::from_secs(10)).await;
        r.map_err(|e| {
            anyhow::anyhow!(
                "switchover: reading the slave root's mtime: {e}; run the switchover again"
            )
        })
    })?;
    if let Some(e) = entry {
        let t = std::time::UNIX_EPOCH
            + std::time::Duration::new(e.meta.mtime.sec.max(0) as u64, e.meta.mtime.nsec);
        std::fs::File::open(master)
            .and_then(|f| f.set_modified(t))
            .map_err(|e| anyhow::anyhow!("setting the mtime of {}: {e}", master.display()))?;
    }
    Ok(())
}
