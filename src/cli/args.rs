//! The command-line definition (clap): every subcommand, argument and
//! flag, with its help text.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "georep",
    version,
    about = "Geo-replication of snapshot stores: xtime crawl, rsync deltas, SSH"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Create a session replicating MASTER to SLAVE (a directory, or [user@]host:/path).
    Create {
        session: String,
        master: PathBuf,
        slave: String,
        #[arg(long, value_enum, default_value = "continuous")]
        mode: ModeArg,
        /// Seconds between passes in interval mode.
        #[arg(long)]
        interval: Option<u64>,
        /// auto: trust xtimes only while georep's watcher runs; mark: every writer calls `georep mark`.
        #[arg(long, value_enum, default_value = "auto")]
        marker: MarkerArg,
        /// SSH port of the slave.
        #[arg(long)]
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
        /// Patch files of at least SIZE bytes (e.g. 1G) in place on the slave instead of rewriting them (see README: in-place mode).
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
        session: String,
        /// Print a JSON summary on stdout.
        #[arg(long)]
        json: bool,
        /// Compare every entry, whatever the xtimes say.
        #[arg(long)]
        full: bool,
    },
    /// Stamp PATHs as changed (for writers that integrate with georep).
    Mark {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Delete a stopped session.
    Delete {
        session: String,
        /// Also remove the session's stime xattrs from the master.
        #[arg(long)]
        reset_sync_time: bool,
    },
    /// Show or change a session's settings.
    Config {
        session: String,
        #[command(subcommand)]
        op: Option<ConfigOp>,
    },
    /// Start the session's monitor (daemonised; --foreground for systemd); it runs the worker.
    Start {
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
        session: String,
        #[arg(long)]
        force: bool,
    },
    /// Suspend the session's worker (the monitor keeps running).
    Pause { session: String },
    /// Continue a paused worker.
    Resume { session: String },
    /// Show sessions' status: a table, --detail, --json, --prometheus, or a --nagios check.
    Status {
        session: Option<String>,
        #[arg(long, group = "format")]
        json: bool,
        #[arg(long, group = "format")]
        prometheus: bool,
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
    },
    /// Set a checkpoint: `now`, an RFC 3339 time or @SECONDS; status says when it completes.
    Checkpoint { session: String, when: String },
    /// Internal: the worker the monitor runs.
    #[command(hide = true)]
    Worker { session: String },
    /// Restorable points of a snapshot store (master or replica).
    Point {
        #[command(subcommand)]
        op: PointOp,
    },
    /// Make a sample snapshot store (hosts, qcow2 chains, CDP journals, records), or add activity to one.
    SampleStore {
        dir: PathBuf,
        #[arg(long, default_value_t = 2)]
        hosts: usize,
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
        dir: PathBuf,
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
    },
    /// The slave-side agent (started by the worker, locally or through SSH).
    Agent {
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
        store: PathBuf,
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        disk: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Materialise POINT (HOST/DISK@TIME, TIME as listed or `latest`) as a qcow2 image.
    Restore {
        store: PathBuf,
        point: String,
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
    },
    /// Check every record against its data; exit 1 if any does not verify.
    Verify {
        store: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show the point locks held on a master store (and stale ones).
    Locks {
        store: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum QuarantineOp {
    /// The quarantines of a store or tree.
    List {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// What a quarantine holds: path, type, size, digest, xtime, reason.
    Show {
        dir: PathBuf,
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Copy entries back (all, or PATHs and what is below them); the quarantine keeps them.
    Restore {
        dir: PathBuf,
        id: String,
        paths: Vec<String>,
        /// Restore into this directory instead of DIR itself.
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// Remove a quarantine for good.
    Discard { dir: PathBuf, id: String },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LayoutArg {
    Auto,
    Tree,
    Store,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum KindsArg {
    Mixed,
    Qcow,
    Cdp,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ActivityArg {
    Snapshot,
    Cdp,
    Reclaim,
    Retention,
}

pub fn parse_nonzero_size(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err("must be at least 1 byte".into()),
        n => Ok(n),
    }
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    crate::catalog::sample::parse_size(s)
        .ok_or_else(|| format!("bad size {s:?}: use bytes or a number with K, M or G"))
}

#[derive(Subcommand)]
pub enum ConfigOp {
    Get { key: String },
    Set { key: String, value: String },
    Reset { key: String },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ModeArg {
    Continuous,
    Interval,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum MarkerArg {
    Auto,
    Mark,
}
