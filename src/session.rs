//! Sessions: a named master -> slave pairing with a TOML config and a
//! state directory under the georep home.
//!
//! Layout: `$GEOREP_HOME/sessions/NAME/{config.toml, state.json,
//! worker.pid, links.json, last-sync.json}`, and for the daemon
//! `{monitor.pid, status.json, checkpoint.json, georep.log}`.

use crate::error::UserError;
use crate::user_err;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// The georep home: `GEOREP_HOME`, else `/var/lib/georep` for root, else
/// `$XDG_STATE_HOME/georep` (default `~/.local/state/georep`).
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("GEOREP_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/georep");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(x).join("georep");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/state/georep")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Crawl in a loop: every point is replicated in order.
    #[default]
    Continuous,
    /// One pass per interval: only the newest point is replicated.
    Interval,
}

/// What the master is: any tree (mirrored entry by entry), or a snapshot
/// store replicated point by point in catalog mode (see `catalog`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    #[default]
    Tree,
    Store,
}

/// What the worker may assume about xtimes between two crawls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MarkerPolicy {
    /// Trust xtimes only while georep's own watcher provably ran since the
    /// last crawl; otherwise (a one-shot `sync`, a restart) do a full crawl.
    #[default]
    Auto,
    /// Every writer of the master calls `georep mark` (an integrated
    /// appliance): xtimes are trusted across gaps.
    Mark,
}

/// Where the slave is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlaveSpec {
    Local(PathBuf),
    Ssh {
        user: Option<String>,
        host: String,
        path: PathBuf,
    },
}

impl SlaveSpec {
    /// `[user@]host:/path` is an SSH slave (as rsync and scp read it); anything else a local path.
    pub fn parse(s: &str) -> Result<SlaveSpec, UserError> {
        if s.is_empty() {
            return Err(user_err!(
                "empty slave: give a directory or [user@]host:/path"
            ));
        }
        if let Some((hostpart, path)) = s.split_once(':') {
            if !hostpart.is_empty() && !hostpart.contains('/') {
                let (user, host) = match hostpart.split_once('@') {
                    Some((u, h)) => (Some(u.to_string()), h.to_string()),
                    None => (None, hostpart.to_string()),
                };
                if host.is_empty() || user.as_deref() == Some("") {
                    return Err(user_err!("slave {s:?}: expected [user@]host:/path"));
                }
                if !path.starts_with('/') {
                    return Err(user_err!("slave {s:?}: the remote path must be absolute, e.g. {hostpart}:/srv/replica"));
                }
                return Ok(SlaveSpec::Ssh {
                    user,
                    host,
                    path: PathBuf::from(path),
                });
            }
        }
        Ok(SlaveSpec::Local(PathBuf::from(s)))
    }
}

/// A session's configuration file. Unknown keys are refused.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The session's identity: in stime xattr names and on the slave root.
    pub session_id: Uuid,
    pub master: PathBuf,
    pub slave: String,
    #[serde(default)]
    pub mode: SyncMode,
    /// Seconds between passes in interval mode.
    #[serde(default = "default_interval")]
    pub interval_secs: u64,
    #[serde(default)]
    pub marker: MarkerPolicy,
    /// Seconds without an answer before the connection is declared dead.
    #[serde(default = "default_keepalive")]
    pub keepalive_secs: u64,
    /// A worker that reports nothing, or makes no progress in a crawl, for this long is killed and restarted.
    #[serde(default = "default_hang_timeout")]
    pub hang_timeout_secs: u64,
    #[serde(default)]
    pub ssh_port: Option<u16>,
    #[serde(default)]
    pub identity: Option<PathBuf>,
    /// The georep program on an SSH slave (default `georep`, on the PATH).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_georep: Option<String>,
    /// `store`: replicate the master as a snapshot store (catalog mode).
    #[serde(default)]
    pub layout: Layout,
    /// Files of at least this many bytes that exist on the slave are patched
    /// in place (only changed ranges written, under an undo log) instead of
    /// being assembled in a temporary file and renamed. None: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inplace_min_size: Option<u64>,
    /// The epoch of the master's lineage when the session was created (0:
    /// a master never promoted). The agent refuses this session on a slave
    /// of a newer epoch, and on a live (promoted) slave.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
    /// A shell command run for each event (Faulty, recovered, checkpoint
    /// completed, RPO warning, persistent failures), the event as JSON on stdin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_event: Option<String>,
    /// An `on_event` command still running after this many seconds is killed.
    #[serde(default = "default_event_timeout")]
    pub on_event_timeout_secs: u64,
    /// Lag (seconds) above which the `rpo_warning` event fires; None: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_warning_secs: Option<u64>,
    /// An entry failing in this many complete crawls in a row is a persistent failure.
    #[serde(default = "default_persistent_failure_crawls")]
    pub persistent_failure_crawls: u32,
    /// Bytes per second the daemon's background verification (the scrub)
    /// reads at most on each side. None: no scrub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrub_rate: Option<u64>,
    /// Seconds within which the scrub verifies every byte at least once
    /// (default [`DEFAULT_SCRUB_PERIOD`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrub_period: Option<u64>,
    /// Parallel streams to the slave (agents over SSH channels of one
    /// connection). None: auto, from the round trip measured at the handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<u32>,
    /// Bytes/s over all streams (None: no limit); applied live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bwlimit: Option<u64>,
    /// Rules overriding `bwlimit` by day and time, e.g.
    /// `Mon-Fri 08:00-18:00 20M, * off` (see `engine::bandwidth`); applied live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bwlimit_schedule: Option<String>,
    /// `off`, `zstd[:LEVEL]` or `auto` (None: auto); see `protocol::compress`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// Partial transfers kept on the slave for resuming are removed after
    /// this many seconds without progress.
    #[serde(default = "default_partial_max_age")]
    pub partial_max_age_secs: u64,
    /// A failback's reverse session: the slave is the old master (last, as
    /// a TOML table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failback: Option<Failback>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a failback session knows of the promote it reverses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failback {
    /// The session that replicated the old master to this (promoted) master:
    /// its stimes on the old master are the last common point.
    pub old_session: Uuid,
    /// The xtime stamped on this master at promote: entries marked later changed here.
    pub promote_stamp: u64,
    /// When the promote happened (ns): entries whose ctime is later changed here.
    pub promoted_at_ns: u64,
    /// The slave was not proven to be the old master: everything of it that differs is quarantined.
    #[serde(default)]
    pub force: bool,
}

/// The scrub's period when `scrub_period` is not set: 30 days.
pub const DEFAULT_SCRUB_PERIOD: u64 = 30 * 86400;

/// Parses a duration: seconds, or a number with s, m, h, d or w.
pub fn parse_duration(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = match s.chars().last()? {
        's' => (&s[..s.len() - 1], 1u64),
        'm' => (&s[..s.len() - 1], 60),
        'h' => (&s[..s.len() - 1], 3600),
        'd' => (&s[..s.len() - 1], 86400),
        'w' => (&s[..s.len() - 1], 7 * 86400),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mul)
}

fn default_partial_max_age() -> u64 {
    3 * 86400
}

/// Most streams a session may configure.
pub const MAX_STREAMS: u32 = 16;

fn default_interval() -> u64 {
    3600
}

fn default_keepalive() -> u64 {
    30
}

pub fn default_hang_timeout() -> u64 {
    300
}

pub fn default_event_timeout() -> u64 {
    30
}

pub fn default_persistent_failure_crawls() -> u32 {
    3
}

/// Keys `georep config` can change, with their meaning.
pub const CONFIG_KEYS: &[(&str, &str)] = &[
    ("mode", "continuous | interval"),
    ("interval_secs", "seconds between passes in interval mode"),
    ("marker", "auto | mark (writers all call `georep mark`)"),
    (
        "keepalive_secs",
        "seconds without an answer before the slave is declared dead",
    ),
    (
        "hang_timeout_secs",
        "seconds without progress before the monitor kills a hung worker",
    ),
    ("ssh_port", "SSH port of the slave"),
    ("identity", "SSH private key file"),
    (
        "remote_georep",
        "georep program on an SSH slave (unset: georep, on the slave user's PATH)",
    ),
    (
        "layout",
        "tree | store (the master is a snapshot store: catalog mode)",
    ),
    (
        "inplace_min_size",
        "files at least this big (e.g. 1G) are patched in place on the slave",
    ),
    (
        "on_event",
        "shell command run for each event, the event as JSON on stdin",
    ),
    (
        "on_event_timeout_secs",
        "seconds after which a running on_event command is killed",
    ),
    (
        "rpo_warning_secs",
        "lag in seconds above which the rpo_warning event fires",
    ),
    (
        "persistent_failure_crawls",
        "complete crawls in a row an entry must fail to be a persistent failure",
    ),
    (
        "scrub_rate",
        "bytes/s (e.g. 50M) the daemon verifies the replica at in the background (off: no scrub)",
    ),
    (
        "scrub_period",
        "the scrub verifies every byte at least once within this time (e.g. 30d; in seconds)",
    ),
    (
        "streams",
        "parallel streams to the slave: auto (from the round trip) or 1-16",
    ),
    (
        "bwlimit",
        "bytes/s over all streams, e.g. 20M (MiB/s), or off; applied live",
    ),
    (
        "bwlimit_schedule",
        "limits by day and time, e.g. \"Mon-Fri 08:00-18:00 20M, * off\"; applied live",
    ),
    (
        "compression",
        "off | zstd[:LEVEL] | auto (compress where data shrinks)",
    ),
    (
        "partial_max_age_secs",
        "seconds a partial transfer is kept on the slave for resuming",
    ),
];

/// Keys a running worker applies without a restart (bandwidth) or by
/// reconnecting between crawls (the link's settings), keeping marker
/// continuity: changing them never forces a full crawl.
pub const LIVE_KEYS: &[&str] = &[
    "bwlimit",
    "bwlimit_schedule",
    "streams",
    "compression",
    "keepalive_secs",
];

/// Keys set by `georep create` that `config set` refuses.
pub const READ_ONLY_KEYS: &[&str] = &["session_id", "master", "slave"];

/// The settable keys with their defaults and meaning, for `config --help`.
/// Defaults come from the config type itself, so they cannot drift.
pub fn config_keys_help() -> String {
    let minimal =
        "session_id = \"00000000-0000-0000-0000-000000000000\"\nmaster = \"/\"\nslave = \"/\"\n";
    let defaults = toml::from_str::<Config>(minimal)
        .ok()
        .and_then(|c| toml::Value::try_from(c).ok());
    let default_of = |k: &str| match defaults.as_ref().and_then(|d| d.get(k)) {
        Some(toml::Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => "unset".into(),
    };
    let width = CONFIG_KEYS.iter().map(|k| k.0.len()).max().unwrap_or(0);
    let mut out =
        String::from("Keys (`config SESSION set KEY VALUE`, `reset KEY` restores the default):\n");
    for (k, what) in CONFIG_KEYS {
        out.push_str(&format!(
            "  {k:<width$}  default {}: {what}\n",
            default_of(k)
        ));
    }
    out.push_str(&format!(
        "Read-only (set by `georep create`): {}",
        READ_ONLY_KEYS.join(", ")
    ));
    out
}

/// Replication state kept between runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    /// The slave population this session trusts (see `SlaveIdentity`).
    pub epoch: Option<Uuid>,
    /// A full crawl started and has not completed yet.
    pub full_pending: bool,
    /// The master root's id when last synced; a new one means a new master.
    pub master_id: Option<Uuid>,
    /// When the last complete sync finished (ns since the epoch).
    pub last_complete_ns: Option<u64>,
    /// The root's xtime that last complete sync covered (everything changed before it is on the slave).
    pub last_synced_xtime: Option<u64>,
    /// A failback: the quarantine published on the old master before the first write.
    #[serde(default)]
    pub quarantine: Option<String>,
    /// The slave's role as its agent last reported it.
    #[serde(default)]
    pub slave_role: Option<String>,
}

pub struct Session {
    pub name: String,
    pub dir: PathBuf,
    pub config: Config,
}

pub fn check_name(name: &str) -> Result<(), UserError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(user_err!("invalid session name {name:?}: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'"))
    }
}

pub fn sessions_dir() -> PathBuf {
    home().join("sessions")
}

/// Parses a config file's text; errors name the file, the problem and the line.
pub fn parse_config(path: &Path, text: &str) -> Result<Config, UserError> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| text[..s.start.min(text.len())].lines().count().max(1));
        let msg = e.message().replace('\n', " ");
        let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
        let known: Vec<&str> = CONFIG_KEYS.iter().map(|k| k.0).collect();
        user_err!(
            "invalid config {}{at}: {msg}; fix or remove it (settable keys: {}, plus session_id, master, slave)",
            path.display(),
            known.join(", ")
        )
    })
}

impl Session {
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    pub fn load(name: &str) -> Result<Session, UserError> {
        check_name(name)?;
        let dir = sessions_dir().join(name);
        let path = dir.join("config.toml");
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                user_err!("no session {name:?} (looked in {}): create it with `georep create {name} MASTER SLAVE`, or set GEOREP_HOME", dir.display())
            }
            _ => user_err!("cannot read {}: {e}", path.display()),
        })?;
        let config = parse_config(&path, &text)?;
        Ok(Session {
            name: name.to_string(),
            dir,
            config,
        })
    }

    /// Every session under the home, sorted by name; unreadable ones are reported as errors.
    pub fn all() -> Vec<Result<Session, UserError>> {
        let mut names: Vec<String> = std::fs::read_dir(sessions_dir())
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names.iter().map(|n| Session::load(n)).collect()
    }

    pub fn save_config(&self) -> std::io::Result<()> {
        let text = toml::to_string(&self.config).map_err(std::io::Error::other)?;
        georep_monitor::write_atomic(&self.config_path(), text.as_bytes())
    }

    pub fn slave_spec(&self) -> Result<SlaveSpec, UserError> {
        SlaveSpec::parse(&self.config.slave)
    }

    pub fn state(&self) -> State {
        std::fs::read(self.dir.join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Saves bookkeeping fields (last sync times) without waiting for the disk.
    pub fn save_state_volatile(&self, s: &State) -> std::io::Result<()> {
        georep_monitor::write_atomic_volatile(
            &self.dir.join("state.json"),
            &serde_json::to_vec_pretty(s).expect("state serializes"),
        )
    }

    /// Saves the state durably. Losing an update to a crash is safe anyway:
    /// every field only ever makes the next sync do more (a full crawl).
    pub fn save_state(&self, s: &State) -> std::io::Result<()> {
        georep_monitor::write_atomic(
            &self.dir.join("state.json"),
            &serde_json::to_vec_pretty(s).expect("state serializes"),
        )
    }

    pub fn worker_pid_path(&self) -> PathBuf {
        self.dir.join("worker.pid")
    }

    pub fn monitor_pid_path(&self) -> PathBuf {
        self.dir.join("monitor.pid")
    }

    pub fn status_path(&self) -> PathBuf {
        self.dir.join("status.json")
    }

    pub fn checkpoint_path(&self) -> PathBuf {
        self.dir.join("checkpoint.json")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("georep.log")
    }

    /// A live process of this session (worker or monitor), if any.
    pub fn running_pid(&self) -> Option<u32> {
        [self.worker_pid_path(), self.monitor_pid_path()]
            .iter()
            .find_map(|p| georep_monitor::PidRecord::read_live(p).ok().flatten())
            .map(|r| r.pid)
    }
}
