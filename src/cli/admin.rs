//! Session administration: create, delete, config.

use crate::error::UserError;
use crate::fs::xtime;
use crate::session::{
    check_name, sessions_dir, Config, Layout, MarkerPolicy, Session, SlaveSpec, SyncMode,
    CONFIG_KEYS,
};
use crate::user_err;
use std::path::{Path, PathBuf};

/// Options of `georep create` beyond the three positional arguments.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    pub mode: SyncMode,
    pub interval_secs: Option<u64>,
    pub marker: MarkerPolicy,
    pub ssh_port: Option<u16>,
    pub identity: Option<PathBuf>,
    /// SSH slave: generate a session key and install it as a forced command.
    pub push_pem: bool,
    /// SSH slave: skip the checks of the slave.
    pub no_verify: bool,
    /// SSH slave: the georep program there.
    pub remote_georep: Option<String>,
    /// None: a snapshot store if the master has a `store.json`, else a tree.
    pub layout: Option<Layout>,
    /// Files at least this big are patched in place on the slave.
    pub inplace_min_size: Option<u64>,
    /// The reverse session of a failback: MASTER is a promoted store, SLAVE its old master.
    pub failback: bool,
    /// With `failback`: the slave need not be proven to be the old master.
    pub force: bool,
}

/// Why `create` failed: bad input, or the SSH slave (with its retry class).
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("{0}")]
    User(#[from] UserError),
    #[error("{0}")]
    Ssh(#[from] crate::transport::ssh::SshError),
}

/// A new session, and what was checked on an SSH slave.
pub struct Created {
    pub session: Session,
    pub check: Option<crate::transport::ssh::setup::SlaveCheck>,
}

/// Resolves the layout of `master` (see [`CreateOptions::layout`]).
fn resolve_layout(master: &Path, want: Option<Layout>) -> Result<Layout, UserError> {
    let is_store = master.join(crate::catalog::record::STORE_FILE).exists();
    match want {
        None if is_store => Ok(Layout::Store),
        None | Some(Layout::Tree) => Ok(Layout::Tree),
        Some(Layout::Store) => crate::catalog::store::check_store(master)
            .map(|_| Layout::Store)
            .map_err(|e| user_err!("{e}")),
    }
}

fn check_master(master: &Path) -> Result<PathBuf, UserError> {
    let abs = std::fs::canonicalize(master).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => user_err!(
            "master {} does not exist: create it or fix the path",
            master.display()
        ),
        _ => user_err!("master {}: {e}", master.display()),
    })?;
    if !abs.is_dir() {
        return Err(user_err!(
            "master {} is not a directory: give the directory to replicate",
            abs.display()
        ));
    }
    std::fs::read_dir(&abs).map_err(|e| {
        user_err!(
            "master {} is not readable ({e}): run georep as a user that can read it",
            abs.display()
        )
    })?;
    Ok(abs)
}

fn check_local_slave(slave: &Path, master: &Path) -> Result<PathBuf, UserError> {
    let abs = if slave.is_absolute() {
        slave.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| user_err!("current directory: {e}"))?
            .join(slave)
    };
    if !abs.exists() {
        let parent = abs.parent().unwrap_or(Path::new("/"));
        if !parent.is_dir() {
            return Err(user_err!(
                "slave {}: its parent {} does not exist: create it first",
                abs.display(),
                parent.display()
            ));
        }
        std::fs::create_dir(&abs)
            .map_err(|e| user_err!("cannot create slave {}: {e}", abs.display()))?;
    }
    let abs = std::fs::canonicalize(&abs).map_err(|e| user_err!("slave {}: {e}", abs.display()))?;
    if !abs.is_dir() {
        return Err(user_err!("slave {} is not a directory", abs.display()));
    }
    if abs == master {
        return Err(user_err!(
            "slave and master are the same directory {}: choose a separate slave directory",
            abs.display()
        ));
    }
    if abs.starts_with(master) {
        return Err(user_err!("slave {} is inside master {}: it would replicate into itself; choose a slave outside the master", abs.display(), master.display()));
    }
    if master.starts_with(&abs) {
        return Err(user_err!("master {} is inside slave {}: the slave would overwrite the master; choose a slave outside the master", master.display(), abs.display()));
    }
    Ok(abs)
}

/// Creates a session: validates master and slave (for an SSH slave:
/// installs the session key and checks the slave), stamps the master's id,
/// writes the config. The session directory is assembled aside and renamed
/// into place last, so nothing is left behind if a step fails.
pub fn create(
    name: &str,
    master: &Path,
    slave: &str,
    opts: &CreateOptions,
) -> Result<Created, CreateError> {
    check_name(name)?;
    let dir = sessions_dir().join(name);
    if dir.join("config.toml").exists() {
        return Err(user_err!("session {name:?} already exists ({}): choose another name or `georep delete {name}` first", dir.display()).into());
    }
    let master = check_master(master)?;
    let layout = resolve_layout(&master, opts.layout)?;
    let (epoch, failback) = crate::cli::dr::lineage(&master, opts.failback, opts.force)?;
    let (slave, ssh) = match SlaveSpec::parse(slave)? {
        SlaveSpec::Local(p) => {
            if opts.push_pem {
                return Err(user_err!("--push-pem is for SSH slaves ([user@]host:/path); {slave:?} is a local directory").into());
            }
            let slave = check_local_slave(&p, &master)?;
            crate::cli::dr::check_failback_slave(&slave, &master, failback.as_ref())?;
            (slave.display().to_string(), None)
        }
        SlaveSpec::Ssh { user, host, path } => {
            crate::transport::ssh::check_host(&host)?;
            if let Some(u) = &user {
                crate::transport::ssh::check_user(u)?;
            }
            let root = crate::transport::ssh::check_remote_path(&path)?;
            let identity = match &opts.identity {
                Some(id) => Some(std::fs::canonicalize(id).map_err(|e| {
                    user_err!(
                        "identity {}: {e}: give the private key file to connect with",
                        id.display()
                    )
                })?),
                None => None,
            };
            let spec = match &user {
                Some(u) => format!("{u}@{host}:{root}"),
                None => format!("{host}:{root}"),
            };
            let target = crate::transport::ssh::SshTarget {
                user,
                host,
                port: opts.ssh_port,
                root,
                identity,
                known_hosts: PathBuf::new(),
                remote_georep: opts
                    .remote_georep
                    .clone()
                    .unwrap_or_else(|| crate::transport::ssh::DEFAULT_REMOTE_GEOREP.to_string()),
                session_key: false,
            };
            (spec, Some(target))
        }
    };
    for other in Session::all().into_iter().flatten() {
        // A session of an older epoch is fenced (superseded by a promote): it does not count.
        if other.config.master == master
            && other.config.slave == slave
            && other.config.epoch >= epoch
        {
            return Err(user_err!(
                "session {:?} already replicates {} to {}: use it, or delete it first",
                other.name,
                master.display(),
                slave
            )
            .into());
        }
    }
    xtime::ensure_master_id(&master).map_err(|e| {
        user_err!(
            "cannot store georep's xattrs on master {} ({e}): georep needs a file system with user extended attributes (ext4, xfs, btrfs, tmpfs; not mounted with nouser_xattr) and write access to the master",
            master.display()
        )
    })?;
    let mut config = Config {
        session_id: uuid::Uuid::new_v4(),
        master,
        slave,
        mode: opts.mode,
        interval_secs: opts.interval_secs.unwrap_or(3600),
        marker: opts.marker,
        keepalive_secs: 30,
        hang_timeout_secs: crate::session::default_hang_timeout(),
        ssh_port: opts.ssh_port,
        identity: opts.identity.clone(),
        remote_georep: opts.remote_georep.clone(),
        layout,
        inplace_min_size: opts.inplace_min_size,
        epoch,
        failback,
        on_event: None,
        on_event_timeout_secs: crate::session::default_event_timeout(),
        rpo_warning_secs: None,
        persistent_failure_crawls: crate::session::default_persistent_failure_crawls(),
        scrub_rate: None,
        scrub_period: None,
        streams: None,
        bwlimit: None,
        bwlimit_schedule: None,
        compression: None,
        partial_max_age_secs: 3 * 86400,
    };
    let staging = sessions_dir().join(format!(".{name}.creating-{}", config.session_id));
    std::fs::create_dir_all(&staging).map_err(|e| {
        user_err!(
            "cannot create session directory {}: {e}: set GEOREP_HOME to a writable directory",
            staging.display()
        )
    })?;
    let result = (|| {
        let mut check = None;
        if let Some(target) = ssh {
            let setup = crate::transport::ssh::setup::SetupOptions {
                push_pem: opts.push_pem,
                verify: !opts.no_verify,
                tag: key_tag(name),
                agent_keepalive_secs: (config.keepalive_secs * 2).max(120),
                keepalive: std::time::Duration::from_secs(config.keepalive_secs),
                claim: (config.epoch > 0).then(|| {
                    let failback =
                        config
                            .failback
                            .as_ref()
                            .map(|f| crate::protocol::FailbackClaim {
                                old_session: f.old_session,
                                force: f.force,
                                store: config.layout == Layout::Store,
                                points: Vec::new(),
                            });
                    (config.session_id, config.epoch, failback)
                }),
            };
            let (identity, c) =
                crate::transport::ssh::setup::prepare(&staging, &dir, target, &setup)?;
            config.identity = identity;
            check = c;
        }
        let session = Session {
            name: name.to_string(),
            dir: staging.clone(),
            config: config.clone(),
        };
        session
            .save_config()
            .map_err(|e| user_err!("cannot write {}: {e}", session.config_path().display()))?;
        std::fs::rename(&staging, &dir).map_err(|e| {
            user_err!(
                "cannot create session directory {}: {e}: is another create of {name:?} running?",
                dir.display()
            )
        })?;
        Ok::<_, CreateError>(check)
    })();
    match result {
        Ok(check) => Ok(Created {
            session: Session {
                name: name.to_string(),
                dir,
                config,
            },
            check,
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

/// The comment of a session's key in the slave's authorized_keys: names
/// the session, this host and this georep home, so that creating the same
/// session again replaces its line instead of adding one.
fn key_tag(name: &str) -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-._".contains(*c))
        .collect();
    let home = crate::session::home();
    let h = blake3::hash(home.as_os_str().as_encoded_bytes()).to_hex();
    format!("georep:{name}@{host}:{}", &h[..8])
}

/// Deletes a stopped session; with `reset_sync_time`, also removes its
/// stimes and directory entry digests from the master so nothing of it is
/// left there.
pub fn delete(name: &str, reset_sync_time: bool) -> Result<u64, UserError> {
    let session = Session::load(name)?;
    let live = |p: &Path| {
        georep_monitor::PidRecord::read_live(p)
            .ok()
            .flatten()
            .map(|r| r.pid)
    };
    if let Some(pid) = live(&session.monitor_pid_path()) {
        return Err(user_err!(
            "session {name:?} is running (monitor pid {pid}): `georep stop {name}` first"
        ));
    }
    if let Some(pid) = live(&session.worker_pid_path()) {
        return Err(user_err!(
            "session {name:?} is being synced (georep sync, pid {pid}): wait for it to end, or stop it"
        ));
    }
    let mut removed = 0;
    if reset_sync_time {
        let attr = xtime::stime_attr(&session.config.session_id);
        removed = remove_attr_tree(&session.config.master, &attr);
        // The directories' entry digests are the session's too.
        remove_attr_tree(
            &session.config.master,
            &xtime::digest_attr(&session.config.session_id),
        );
    }
    std::fs::remove_dir_all(&session.dir)
        .map_err(|e| user_err!("cannot remove {}: {e}", session.dir.display()))?;
    Ok(removed)
}

/// Removes xattr `attr` from every directory below `root`; returns how many had it.
fn remove_attr_tree(root: &Path, attr: &str) -> u64 {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        if xattr::remove(&d, attr).is_ok() {
            n += 1;
        }
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(e.path());
                }
            }
        }
    }
    n
}

/// `georep config SESSION get KEY`.
pub fn config_get(session: &Session, key: &str) -> Result<String, UserError> {
    let value = toml::Value::try_from(&session.config).map_err(|e| user_err!("{e}"))?;
    match value.get(key) {
        Some(toml::Value::String(s)) => Ok(s.clone()),
        Some(v) => Ok(v.to_string()),
        None if key == "streams" || key == "compression" => Ok("auto".into()),
        None if key == "bwlimit" || key == "bwlimit_schedule" => Ok("off".into()),
        None if CONFIG_KEYS.iter().any(|k| k.0 == key) => Ok(String::new()),
        None => Err(unknown_key(key)),
    }
}

fn unknown_key(key: &str) -> UserError {
    let keys: Vec<String> = CONFIG_KEYS
        .iter()
        .map(|(k, what)| format!("{k} ({what})"))
        .collect();
    user_err!("unknown config key {key:?}: use one of {}", keys.join(", "))
}

/// `georep config SESSION set KEY VALUE` / `reset KEY` (value None).
pub fn config_set(session: &mut Session, key: &str, value: Option<&str>) -> Result<(), UserError> {
    let c = &mut session.config;
    let bad = |what: &str| {
        user_err!(
            "invalid value {:?} for {key}: expected {what}",
            value.unwrap_or("")
        )
    };
    match key {
        "mode" => {
            c.mode = match value {
                None => SyncMode::default(),
                Some("continuous") => SyncMode::Continuous,
                Some("interval") => SyncMode::Interval,
                Some(_) => return Err(bad("continuous or interval")),
            }
        }
        "interval_secs" => {
            c.interval_secs = value
                .map(|v| v.parse().map_err(|_| bad("a number of seconds")))
                .transpose()?
                .unwrap_or(3600)
        }
        "marker" => {
            c.marker = match value {
                None => MarkerPolicy::default(),
                Some("auto") => MarkerPolicy::Auto,
                Some("mark") => MarkerPolicy::Mark,
                Some(_) => return Err(bad("auto or mark")),
            }
        }
        "keepalive_secs" => {
            c.keepalive_secs = value
                .map(|v| {
                    v.parse()
                        .ok()
                        .filter(|&n: &u64| n >= 3)
                        .ok_or_else(|| bad("a number of seconds, at least 3"))
                })
                .transpose()?
                .unwrap_or(30)
        }
        "hang_timeout_secs" => {
            c.hang_timeout_secs = value
                .map(|v| {
                    v.parse()
                        .ok()
                        .filter(|&n: &u64| n >= 5)
                        .ok_or_else(|| bad("a number of seconds, at least 5"))
                })
                .transpose()?
                .unwrap_or(crate::session::default_hang_timeout())
        }
        "ssh_port" => {
            c.ssh_port = value
                .map(|v| {
                    v.parse()
                        .ok()
                        .filter(|&p: &u16| p > 0)
                        .ok_or_else(|| bad("a port number, 1-65535"))
                })
                .transpose()?
        }
        "identity" => c.identity = value.map(PathBuf::from),
        "remote_georep" => c.remote_georep = value.map(str::to_string),
        "layout" => {
            c.layout = match value {
                None | Some("tree") => Layout::Tree,
                Some("store") => resolve_layout(&c.master, Some(Layout::Store))?,
                Some(_) => return Err(bad("tree or store")),
            }
        }
        "inplace_min_size" => {
            c.inplace_min_size = match value {
                None | Some("off") | Some("none") => None,
                Some(v) => Some(
                    crate::catalog::sample::parse_size(v)
                        .filter(|&n| n > 0)
                        .ok_or_else(|| bad("a size in bytes, e.g. 1073741824 or 1G (or off)"))?,
                ),
            }
        }
        "on_event" => c.on_event = value.filter(|v| !v.trim().is_empty()).map(str::to_string),
        "on_event_timeout_secs" => {
            c.on_event_timeout_secs = value
                .map(|v| {
                    v.parse()
                        .ok()
                        .filter(|&n: &u64| n >= 1)
                        .ok_or_else(|| bad("a number of seconds, at least 1"))
                })
                .transpose()?
                .unwrap_or(crate::session::default_event_timeout())
        }
        "rpo_warning_secs" => {
            c.rpo_warning_secs = match value {
                None | Some("off") | Some("none") => None,
                Some(v) => Some(
                    v.parse()
                        .ok()
                        .filter(|&n: &u64| n >= 1)
                        .ok_or_else(|| bad("a number of seconds, at least 1 (or off)"))?,
                ),
            }
        }
        "persistent_failure_crawls" => {
            c.persistent_failure_crawls = value
                .map(|v| {
                    v.parse()
                        .ok()
                        .filter(|&n: &u32| n >= 1)
                        .ok_or_else(|| bad("a number of crawls, at least 1"))
                })
                .transpose()?
                .unwrap_or(crate::session::default_persistent_failure_crawls())
        }
        k if crate::session::READ_ONLY_KEYS.contains(&k) => {
            return Err(user_err!(
                "config key {key} is read-only: it is set by `georep create`; to change it, `georep delete {}` and create the session again",
                session.name
            ))
        }
        "scrub_rate" => {
            c.scrub_rate = match value {
                None | Some("off") | Some("none") => None,
                Some(v) => Some(
                    crate::catalog::sample::parse_size(v)
                        .filter(|&n| n > 0)
                        .ok_or_else(|| bad("bytes per second, e.g. 52428800 or 50M (or off)"))?,
                ),
            }
        }
        "scrub_period" => {
            c.scrub_period = match value {
                None => None,
                Some(v) => Some(
                    crate::session::parse_duration(v)
                        .filter(|&n| n > 0)
                        .ok_or_else(|| bad("a duration, e.g. 30d, 12h or 3600 (seconds)"))?,
                ),
            }
        }
        "streams" => {
            c.streams = match value {
                None | Some("auto") => None,
                Some(v) => Some(
                    v.parse()
                        .ok()
                        .filter(|n| (1..=crate::session::MAX_STREAMS).contains(n))
                        .ok_or_else(|| bad("auto or a number of streams from 1 to 16"))?,
                ),
            }
        }
        "partial_max_age_secs" => {
            c.partial_max_age_secs = value
                .map(|v| v.parse().map_err(|_| bad("a number of seconds")))
                .transpose()?
                .unwrap_or(3 * 86400)
        }
        "bwlimit" => {
            c.bwlimit = match value {
                None => None,
                Some(v) => crate::engine::bandwidth::parse_limit(v)
                    .ok_or_else(|| bad("a rate in bytes/s such as 20M, 500K, or off"))?,
            }
        }
        "bwlimit_schedule" => {
            c.bwlimit_schedule = match value {
                None | Some("") | Some("off") => None,
                Some(v) => {
                    crate::engine::bandwidth::parse_schedule(v)
                        .map_err(|e| user_err!("invalid value for bwlimit_schedule: {e}"))?;
                    Some(v.to_string())
                }
            }
        }
        "compression" => {
            c.compression = match value {
                None => None,
                Some(v) => {
                    crate::protocol::compress::Mode::parse(v)
                        .ok_or_else(|| bad("off, auto, zstd or zstd:LEVEL (1-19)"))?;
                    Some(v.to_string())
                }
            }
        }
        _ => return Err(unknown_key(key)),
    }
    session
        .save_config()
        .map_err(|e| user_err!("cannot write {}: {e}", session.config_path().display()))
}
