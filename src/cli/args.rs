//! The command-line definition (clap): every subcommand, argument and
//! flag, with its help text.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// `georep --version`: the program's version and the protocol version
/// both sites must speak.
pub fn version() -> String {
    format!(
        "{} (protocol {})",
        env!("CARGO_PKG_VERSION"),
        crate::protocol::PROTOCOL_VERSION
    )
}

#[derive(Parser)]
#[command(
    name = "georep",
    version = version(),
    about = "Geo-replication of snapshot stores: xtime crawl, rsync deltas, SSH",
    long_about = "Geo-replication of snapshot stores: a master directory is replicated to a slave \
(a local directory or [user@]host:/path over SSH) continuously and asynchronously, \
gsyncd-style: xtime stamps in extended attributes, a crawl that descends only where something \
changed, rsync-style deltas shipped through an agent on the slave.",
    after_help = "State lives under $GEOREP_HOME (default /var/lib/georep for root, \
~/.local/state/georep otherwise). Exit codes: 0 success, 1 some entries failed (retried), \
2 bad arguments or configuration, 3 temporary failure, 4 permanent failure."
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Create a session replicating MASTER to SLAVE (a directory, or [user@]host:/path).
    Create {
        /// The session's name (letters, digits, '-', '_', '.').
        session: String,
        /// The master directory to replicate.
        master: PathBuf,
        /// The slave: a local directory, or [user@]host:/path over SSH.
        slave: String,
        /// continuous: crawl whenever something changes; interval: one pass every --interval seconds.
        #[arg(long, value_enum, default_value = "continuous")]
        mode: ModeArg,
        /// Seconds between passes in interval mode.
        #[arg(long)]
        interval: Option<u64>,
        /// auto: trust xtimes only while georep's watcher runs; mark: every writer calls `georep mark`.
        #[arg(long, value_enum, default_value = "auto")]
        marker: MarkerArg,
        /// SSH port of the slave (1-65535).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        ssh_port: Option<u16>,
        /// SSH private key to connect with (with --push-pem: to install the session key).
        #[arg(long)]
        identity: Option<PathBuf>,
        /// Generate a key for the session and install it on the slave as a forced command.
        #[arg(long)]
        push_pem: bool,
        /// Do not check the SSH slave before creating the session.
        #[arg(long)]
        no_verify: bool,
        /// The georep program on the SSH slave (default: georep, on the PATH).
        #[arg(long)]
        remote_georep: Option<String>,
        /// tree: mirror any tree; store: a snapshot store replicated point by point (catalog mode); auto: store if MASTER/store.json exists.
        #[arg(long, value_enum, default_value = "auto")]
        layout: LayoutArg,
        /// Patch files of at least SIZE bytes (e.g. 1G) in place on the slave instead of rewriting them (see docs/operations.md, in-place mode).
        #[arg(long, value_name = "SIZE", value_parser = parse_nonzero_size)]
        inplace_min_size: Option<u64>,
        /// Fail back: MASTER is a promoted store, SLAVE its old master; what changed there since the last common point is quarantined first.
        #[arg(long)]
        failback: bool,
        /// With --failback: SLAVE need not be proven the old master (everything there that differs is quarantined).
        #[arg(long, requires = "failback")]
        force: bool,
    },
    /// Run one crawl in the foreground; exit 0 once the slave equals the master.
    Sync {
        /// The session to sync.
        session: String,
        /// Print a JSON summary on stdout.
        #[arg(long)]
        json: bool,
        /// Compare every entry, whatever the xtimes say.
        #[arg(long)]
        full: bool,
        /// Show a live progress line on stderr even when it is not a terminal.
        #[arg(long, overrides_with = "no_progress")]
        progress: bool,
        /// Never show the progress line (default: shown when stderr is a terminal).
        #[arg(long, overrides_with = "progress")]
        no_progress: bool,
    },
    /// Compare the slave with the master by hash trees; exit 0 equal, 1 differences found, 3 stopped before the end (run again to resume).
    Verify {
        /// The session whose master and slave to compare.
        session: String,
        /// Verify only this subtree (relative to the master, or below it); repeatable.
        #[arg(long = "path", value_name = "P")]
        paths: Vec<PathBuf>,
        /// Print a JSON report on stdout.
        #[arg(long)]
        json: bool,
        /// Stop after this long (e.g. 1h, 30m, 90s); the next run resumes where it stopped.
        #[arg(long, value_name = "D", value_parser = parse_duration_arg)]
        max_duration: Option<u64>,
        /// Ship what differs (only the differing blocks of a file), then verify it again.
        #[arg(long)]
        repair: bool,
        /// Read at most this many bytes per second on each side (e.g. 50M).
        #[arg(long, value_name = "RATE", value_parser = parse_nonzero_size)]
        rate: Option<u64>,
        /// Start over instead of resuming an interrupted verification.
        #[arg(long)]
        restart: bool,
        /// Read and hash every master file, to check the master's own data too (by default an unchanged master file's hashes come from the session's cache; the slave is always read).
        #[arg(long)]
        no_cache: bool,
    },
    /// Stamp PATHs as changed (for writers that integrate with georep).
    Mark {
        /// Files or directories just written (a vanished path stamps its directory).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Delete a stopped session.
    Delete {
        /// The session to delete (it must be stopped).
        session: String,
        /// Also remove the session's stime xattrs from the master.
        #[arg(long)]
        reset_sync_time: bool,
    },
    /// Show or change a session's settings (without KEY: print the config file).
    #[command(after_help = crate::session::config_keys_help())]
    Config {
        /// The session whose config to show or change.
        session: String,
        #[command(subcommand)]
        op: Option<ConfigOp>,
    },
    /// Start the session's monitor (daemonised; --foreground for systemd); it runs the worker.
    Start {
        /// The session to start.
        session: String,
        /// Stay in the foreground, logging to stderr too (for systemd).
        #[arg(long)]
        foreground: bool,
        /// Internal: the daemonised monitor started by `georep start`.
        #[arg(long, hide = true)]
        detach: bool,
    },
    /// Stop the session's monitor and worker cleanly (--force: kill them).
    Stop {
        /// The session to stop.
        session: String,
        /// Kill the monitor and the worker instead of asking them to stop.
        #[arg(long)]
        force: bool,
    },
    /// Hold the session's crawls (the monitor and the watcher keep running, pending changes are counted).
    Pause {
        /// The session to pause.
        session: String,
    },
    /// Let a paused session crawl again.
    Resume {
        /// The session to resume.
        session: String,
    },
    /// Show sessions' status: a table, --detail, --json, --prometheus, or a --nagios check.
    Status {
        /// One session (default: every session).
        session: Option<String>,
        /// One JSON object (an array without SESSION).
        #[arg(long, group = "format")]
        json: bool,
        /// Prometheus text format, for node_exporter's textfile collector.
        #[arg(long, group = "format")]
        prometheus: bool,
        /// Every field, one per line.
        #[arg(long, group = "format")]
        detail: bool,
        /// Nagios/Icinga check: exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
        #[arg(long, group = "format")]
        nagios: bool,
        /// With --nagios: lag (seconds) at which to warn.
        #[arg(long, requires = "nagios")]
        warning: Option<u64>,
        /// With --nagios: lag (seconds) that is critical.
        #[arg(long, requires = "nagios")]
        critical: Option<u64>,
        /// With --nagios: persistent failures (entries failing in every crawl) that are critical; fewer warn.
        #[arg(long, requires = "nagios", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        critical_failures: u64,
    },
    /// Set a checkpoint: `now`, an RFC 3339 time or @SECONDS; status says when it completes.
    Checkpoint {
        /// The session to set the checkpoint of.
        session: String,
        /// `now`, an RFC 3339 time (2026-01-31T12:00:00Z) or @SECONDS since the epoch.
        when: String,
    },
    /// Internal: the worker the monitor runs.
    #[command(hide = true)]
    Worker {
        /// The session to work for.
        session: String,
    },
    /// Restorable points of a snapshot store (master or replica).
    Point {
        #[command(subcommand)]
        op: PointOp,
    },
    /// Make a sample snapshot store (hosts, qcow2 chains, CDP journals, records), or add activity to one.
    SampleStore {
        /// The store's directory (created if missing).
        dir: PathBuf,
        /// Hosts to make.
        #[arg(long, default_value_t = 2)]
        hosts: usize,
        /// Seed of the random content, so a store can be made again identically.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Disks per host (odd-numbered hosts get one more).
        #[arg(long, default_value_t = 2)]
        disks: usize,
        /// Size of each disk, e.g. 16M or 1G.
        #[arg(long, default_value = "16M", value_parser = parse_size)]
        disk_size: u64,
        /// Host snapshots per host.
        #[arg(long, default_value_t = 3)]
        snapshots: usize,
        /// CDP points per journal (and per append with --advance).
        #[arg(long, default_value_t = 20)]
        points: usize,
        /// Share of a disk rewritten between two qcow snapshots (0.0-1.0).
        #[arg(long, default_value_t = 0.02)]
        change: f64,
        /// Share of a new disk written before its first snapshot (0.0-1.0).
        #[arg(long, default_value_t = 0.33)]
        fill: f64,
        /// Largest CDP write, e.g. 64K.
        #[arg(long, default_value = "64K", value_parser = parse_size)]
        max_write: u64,
        /// Which hosts keep CDP journals.
        #[arg(long, value_enum, default_value = "mixed")]
        kinds: KindsArg,
        /// Add activity to an existing store: CDP appends, a host snapshot, a reclamation split, a retention delete.
        #[arg(long)]
        advance: bool,
        /// With --advance: only this activity.
        #[arg(long, value_enum, requires = "advance")]
        only: Option<ActivityArg>,
    },
    /// Turn a replica into a live store (on the DR site, the master may be gone): roll back what is unfinished, verify, report what was recovered.
    Promote {
        /// The replica's directory (the slave root of a session).
        dir: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// What a failback set aside on the old master: list, show, restore, discard.
    Quarantine {
        #[command(subcommand)]
        op: QuarantineOp,
    },
    /// Planned switchover with no loss: final sync, promote the slave, demote the master, create (and start) the reverse session.
    Switchover {
        /// The session to switch over (its slave becomes the live store).
        session: String,
        /// Name of the reverse session (slave -> master) to create.
        #[arg(long)]
        reverse: String,
        /// Seconds the master must be quiet (no entry changed) first.
        #[arg(long, default_value_t = 10)]
        wait_quiet: u64,
        /// Do not wait for the master to be quiet.
        #[arg(long)]
        force: bool,
        /// Start the reverse session's monitor afterwards.
        #[arg(long)]
        start: bool,
        /// SSH slave: your own shell access to the slave's site, for the steps there (default: the slave's user@host).
        #[arg(long, value_name = "USER@HOST")]
        peer_admin: Option<String>,
        /// SSH slave: your private key for --peer-admin (default: ssh's config and agent).
        #[arg(long)]
        identity: Option<PathBuf>,
        /// SSH slave: this master as the slave's site reaches it ([user@]host:/path), the reverse session's slave.
        #[arg(long, value_name = "SPEC")]
        reverse_slave: Option<String>,
        /// SSH slave: install a key for the reverse session (its create --push-pem on the slave's site).
        #[arg(long)]
        push_pem: bool,
        /// SSH slave: this site's SSH port, as the slave's site reaches it.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        reverse_ssh_port: Option<u16>,
        /// SSH slave: the key on the slave's site to reach this one with (its create --identity).
        #[arg(long, value_name = "FILE")]
        reverse_identity: Option<String>,
        /// SSH slave: the georep program on this site (default: this program's path).
        #[arg(long, value_name = "PATH")]
        reverse_remote_georep: Option<String>,
    },
    /// The slave-side agent (started by the worker, locally or through SSH).
    Agent {
        /// The slave root: the agent touches nothing outside it.
        #[arg(long)]
        root: PathBuf,
        /// Exit when no request arrives for this many seconds.
        #[arg(long, default_value_t = 120)]
        keepalive: u64,
    },
}

#[derive(Subcommand)]
pub enum PointOp {
    /// List the restorable points (and each host's newest complete point).
    List {
        /// A snapshot store (a master, or a replica).
        store: PathBuf,
        /// Only this host.
        #[arg(long)]
        host: Option<String>,
        /// Only this disk.
        #[arg(long)]
        disk: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Materialise POINT (HOST/DISK@TIME, TIME as listed or `latest`) as a qcow2 image.
    Restore {
        /// A snapshot store (a master, or a replica).
        store: PathBuf,
        /// HOST/DISK@TIME, TIME as listed or `latest`.
        point: String,
        /// The qcow2 image to write.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
    },
    /// Check every record against its data; exit 1 if any does not verify.
    Verify {
        /// A snapshot store (a master, or a replica).
        store: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the point locks held on a master store (and stale ones).
    Locks {
        /// A master snapshot store.
        store: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum QuarantineOp {
    /// The quarantines of a store or tree.
    List {
        /// The old master's directory (where the failback put its quarantine).
        dir: PathBuf,
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
    /// What a quarantine holds: path, type, size, digest, xtime, reason.
    Show {
        /// The old master's directory.
        dir: PathBuf,
        /// The quarantine's id (from `quarantine list`).
        id: String,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy entries back (all, or PATHs and what is below them); the quarantine keeps them.
    Restore {
        /// The old master's directory.
        dir: PathBuf,
        /// The quarantine's id (from `quarantine list`).
        id: String,
        /// Entries to restore (with what is below them); none: all.
        paths: Vec<String>,
        /// Restore into this directory instead of DIR itself.
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// Remove a quarantine for good.
    Discard {
        /// The old master's directory.
        dir: PathBuf,
        /// The quarantine's id (from `quarantine list`).
        id: String,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LayoutArg {
    /// A store if MASTER/store.json exists, else a tree.
    Auto,
    /// Mirror any tree entry by entry.
    Tree,
    /// A snapshot store, replicated point by point (catalog mode).
    Store,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum KindsArg {
    /// Even-numbered hosts keep qcow images, odd-numbered ones CDP journals.
    Mixed,
    /// Every host keeps qcow images only.
    Qcow,
    /// Every host keeps CDP journals.
    Cdp,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ActivityArg {
    /// A new host snapshot.
    Snapshot,
    /// CDP journal appends.
    Cdp,
    /// A reclamation split of a journal.
    Reclaim,
    /// A retention delete of the oldest snapshot.
    Retention,
}

pub fn parse_nonzero_size(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err("must be at least 1 byte".into()),
        n => Ok(n),
    }
}

pub fn parse_duration_arg(s: &str) -> Result<u64, String> {
    crate::session::parse_duration(s)
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("bad duration {s:?}: use seconds or a number with s, m, h, d or w"))
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    crate::catalog::sample::parse_size(s)
        .ok_or_else(|| format!("bad size {s:?}: use bytes or a number with K, M or G"))
}

#[derive(Subcommand)]
pub enum ConfigOp {
    /// Print one key's value (empty when unset).
    #[command(after_help = crate::session::config_keys_help())]
    Get {
        /// The key (see `georep config --help`).
        key: String,
    },
    /// Change one key; a running session's monitor restarts its worker with it.
    #[command(after_help = crate::session::config_keys_help())]
    Set {
        /// The key (see `georep config --help`).
        key: String,
        /// Its new value.
        value: String,
    },
    /// Restore one key's default.
    #[command(after_help = crate::session::config_keys_help())]
    Reset {
        /// The key (see `georep config --help`).
        key: String,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ModeArg {
    /// Crawl whenever the watcher or a mark says something changed.
    Continuous,
    /// One pass every interval; only the newest point of a store.
    Interval,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum MarkerArg {
    /// Trust xtimes only while georep's own watcher ran since the last crawl.
    Auto,
    /// Every writer calls `georep mark`: xtimes are always trusted.
    Mark,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every subcommand says what it does and every argument what it is, so
    /// `--help`, the man pages and the completions never show a bare name.
    #[test]
    fn every_subcommand_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if a.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
                let values = if a.get_action().takes_values() {
                    a.get_possible_values()
                } else {
                    Vec::new()
                };
                for v in values {
                    if !v.is_hide_set() && v.get_help().is_none() {
                        missing.push(format!("{path} {id}={}", v.get_name()));
                    }
                }
            }
            for s in cmd.get_subcommands() {
                if s.is_hide_set() || s.get_name() == "help" {
                    continue;
                }
                let p = format!("{path} {}", s.get_name());
                if s.get_about().is_none() {
                    missing.push(p.clone());
                }
                walk(s, &p, missing);
            }
        }
        let mut missing = Vec::new();
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        walk(&cmd, "georep", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:?}");
    }

    #[test]
    fn version_names_the_protocol_and_config_help_lists_every_key() {
        assert!(version().contains(&format!("protocol {}", crate::protocol::PROTOCOL_VERSION)));
        let help = Cli::command()
            .find_subcommand_mut("config")
            .unwrap()
            .render_help()
            .to_string();
        for (k, _) in crate::session::CONFIG_KEYS {
            assert!(help.contains(k), "config --help lacks {k}: {help}");
        }
        assert!(
            help.contains("keepalive_secs             default 30"),
            "{help}"
        );
        assert!(help.contains("Read-only"), "{help}");
    }
}
