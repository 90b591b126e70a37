//! The `georep` command line.

use anyhow::Context;
use clap::{Parser, Subcommand};
use georep::error::{exit, Retry, UserError};
use georep::session::{MarkerPolicy, Session, SyncMode};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "georep",
    version,
    about = "Geo-replication of snapshot stores: xtime crawl, rsync deltas, SSH"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
enum PointOp {
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

#[derive(Clone, Copy, clap::ValueEnum)]
enum LayoutArg {
    Auto,
    Tree,
    Store,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KindsArg {
    Mixed,
    Qcow,
    Cdp,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ActivityArg {
    Snapshot,
    Cdp,
    Reclaim,
    Retention,
}

fn parse_nonzero_size(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err("must be at least 1 byte".into()),
        n => Ok(n),
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    georep::catalog::sample::parse_size(s)
        .ok_or_else(|| format!("bad size {s:?}: use bytes or a number with K, M or G"))
}

#[derive(Subcommand)]
enum ConfigOp {
    Get { key: String },
    Set { key: String, value: String },
    Reset { key: String },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ModeArg {
    Continuous,
    Interval,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MarkerArg {
    Auto,
    Mark,
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GEOREP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Maps an error to its documented exit code.
fn exit_code(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if cause.downcast_ref::<UserError>().is_some() {
            return exit::USAGE;
        }
        if let Some(e) = cause.downcast_ref::<georep::ssh::SshError>() {
            return match e.retry() {
                Retry::Temporary => exit::TEMPORARY,
                Retry::Permanent => exit::PERMANENT,
            };
        }
        if let Some(c) = cause.downcast_ref::<georep::catalog::CatalogError>() {
            return match c {
                _ if c.is_usage() => exit::USAGE,
                _ if c.retry() == Retry::Temporary => exit::TEMPORARY,
                _ => exit::PERMANENT,
            };
        }
        if let Some(w) = cause.downcast_ref::<georep::worker::WorkerError>() {
            return match w {
                georep::worker::WorkerError::Config(_) => exit::USAGE,
                _ if w.retry() == Retry::Temporary => exit::TEMPORARY,
                _ => exit::PERMANENT,
            };
        }
    }
    exit::PERMANENT
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    georep::worker::runtime().context("starting the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.cmd {
        Cmd::Create {
            session,
            master,
            slave,
            mode,
            interval,
            marker,
            ssh_port,
            identity,
            push_pem,
            no_verify,
            remote_georep,
            layout,
            inplace_min_size,
        } => {
            let opts = georep::admin::CreateOptions {
                inplace_min_size,
                layout: match layout {
                    LayoutArg::Auto => None,
                    LayoutArg::Tree => Some(georep::session::Layout::Tree),
                    LayoutArg::Store => Some(georep::session::Layout::Store),
                },
                mode: match mode {
                    ModeArg::Continuous => SyncMode::Continuous,
                    ModeArg::Interval => SyncMode::Interval,
                },
                interval_secs: interval,
                marker: match marker {
                    MarkerArg::Auto => MarkerPolicy::Auto,
                    MarkerArg::Mark => MarkerPolicy::Mark,
                },
                ssh_port,
                identity,
                push_pem,
                no_verify,
                remote_georep,
            };
            let created = match georep::admin::create(&session, &master, &slave, &opts) {
                Ok(c) => c,
                Err(georep::admin::CreateError::User(e)) => return Err(e.into()),
                Err(georep::admin::CreateError::Ssh(e)) => return Err(e.into()),
            };
            let s = &created.session;
            if let Some(c) = &created.check {
                println!(
                    "slave checked: georep {} agent runs on {}, writable, {:.1} GiB free of {:.1} GiB",
                    c.agent_version,
                    c.root,
                    c.avail_bytes as f64 / (1u64 << 30) as f64,
                    c.total_bytes as f64 / (1u64 << 30) as f64
                );
            }
            println!(
                "created session {} : {} -> {} ({}){}",
                s.name,
                s.config.master.display(),
                s.config.slave,
                s.dir.display(),
                if s.config.layout == georep::session::Layout::Store {
                    ", a snapshot store: catalog mode"
                } else {
                    ""
                }
            );
            Ok(exit::OK)
        }
        Cmd::Sync {
            session,
            json,
            full,
        } => {
            let s = Session::load(&session)?;
            let rt = runtime()?;
            let summary = rt.block_on(async {
                let shutdown = tokio_util::sync::CancellationToken::new();
                let on_signal = shutdown.clone();
                tokio::spawn(async move {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                            .expect("signal handler");
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                    on_signal.cancel();
                });
                georep::worker::sync_once(
                    &s,
                    &georep::worker::SyncOptions {
                        full,
                        marker_continuous: false,
                    },
                    shutdown,
                )
                .await
            });
            rt.shutdown_timeout(Duration::from_secs(5));
            let summary = summary?;
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            } else if let Some(c) = &summary.catalog {
                georep::catalog::cli::print_sync(&summary, c);
            } else {
                println!(
                    "{} crawl: {} entries visited, {} files synced, {} bytes sent ({} literal, {} delta), {} deleted, {} failures, {} ms",
                    summary.crawl,
                    summary.entries_visited,
                    summary.files_synced,
                    summary.bytes_sent,
                    summary.bytes_literal,
                    summary.bytes_delta,
                    summary.deletes,
                    summary.failures,
                    summary.duration_ms
                );
                for f in &summary.errors {
                    eprintln!("failed: {}: {}", f.path, f.error);
                }
            }
            Ok(if summary.complete {
                exit::OK
            } else {
                exit::PARTIAL
            })
        }
        Cmd::Mark { paths } => {
            for p in &paths {
                georep::xtime::mark(p)
                    .map_err(|e| UserError::new(format!("mark {}: {e}", p.display())))?;
            }
            Ok(exit::OK)
        }
        Cmd::Delete {
            session,
            reset_sync_time,
        } => {
            let n = georep::admin::delete(&session, reset_sync_time)?;
            if reset_sync_time {
                println!(
                    "deleted session {session}; removed its sync time from {n} master directories"
                );
            } else {
                println!("deleted session {session}");
            }
            Ok(exit::OK)
        }
        Cmd::Config { session, op } => {
            let mut s = Session::load(&session)?;
            let changes = matches!(op, Some(ConfigOp::Set { .. } | ConfigOp::Reset { .. }));
            match op {
                None => print!("{}", std::fs::read_to_string(s.config_path())?),
                Some(ConfigOp::Get { key }) => println!("{}", georep::admin::config_get(&s, &key)?),
                Some(ConfigOp::Set { key, value }) => {
                    georep::admin::config_set(&mut s, &key, Some(&value))?
                }
                Some(ConfigOp::Reset { key }) => georep::admin::config_set(&mut s, &key, None)?,
            }
            if changes {
                georep::daemon::note_config_change(&s);
            }
            Ok(exit::OK)
        }
        Cmd::Start {
            session,
            foreground,
            detach,
        } => {
            if foreground || detach {
                georep::daemon::run_monitor(&session, detach)
            } else {
                georep::daemon::start(&session)
            }
        }
        Cmd::Stop { session, force } => georep::daemon::stop(&session, force),
        Cmd::Pause { session } => georep::daemon::pause(&session, false),
        Cmd::Resume { session } => georep::daemon::pause(&session, true),
        Cmd::Status {
            session,
            json,
            prometheus,
            detail,
            nagios,
            warning,
            critical,
        } => {
            use georep::daemon::status::Format;
            let format = match (json, prometheus, detail, nagios) {
                (true, ..) => Format::Json,
                (_, true, ..) => Format::Prometheus,
                (_, _, true, _) => Format::Detail,
                (.., true) => Format::Nagios,
                _ => Format::Table,
            };
            georep::daemon::status::status(session.as_deref(), format, warning, critical)
        }
        Cmd::Checkpoint { session, when } => {
            georep::daemon::status::set_checkpoint(&session, &when)
        }
        Cmd::Worker { session } => georep::daemon::run_worker(&session),
        Cmd::Point { op } => {
            use georep::catalog::cli;
            match op {
                PointOp::List {
                    store,
                    host,
                    disk,
                    json,
                } => cli::point_list(
                    &store,
                    &georep::catalog::points::Filter { host, disk },
                    json,
                )?,
                PointOp::Restore {
                    store,
                    point,
                    output,
                } => cli::point_restore(&store, &point, &output)?,
                PointOp::Verify { store, json } => {
                    if !cli::point_verify(&store, json)? {
                        return Ok(exit::PARTIAL);
                    }
                }
                PointOp::Locks { store, json } => cli::point_locks(&store, json)?,
            }
            Ok(exit::OK)
        }
        Cmd::SampleStore {
            dir,
            hosts,
            seed,
            disks,
            disk_size,
            snapshots,
            points,
            change,
            fill,
            max_write,
            kinds,
            advance,
            only,
        } => {
            use georep::catalog::sample::{Activity, Kinds, SampleOptions};
            let o = SampleOptions {
                hosts,
                seed,
                disks,
                disk_size,
                snapshots,
                points,
                change: change.clamp(0.0, 1.0),
                fill: fill.clamp(0.0, 1.0),
                max_write_blocks: (max_write / georep::catalog::sample::BLOCK).max(1),
                kinds: match kinds {
                    KindsArg::Mixed => Kinds::Mixed,
                    KindsArg::Qcow => Kinds::Qcow,
                    KindsArg::Cdp => Kinds::Cdp,
                },
            };
            let only = only.map(|a| match a {
                ActivityArg::Snapshot => Activity::Snapshot,
                ActivityArg::Cdp => Activity::Cdp,
                ActivityArg::Reclaim => Activity::Reclaim,
                ActivityArg::Retention => Activity::Retention,
            });
            georep::catalog::cli::sample_store(&dir, &o, advance, only)?;
            Ok(exit::OK)
        }
        Cmd::Agent { root, keepalive } => {
            let opts = georep::agent::AgentOptions {
                root,
                keepalive: Duration::from_secs(keepalive.max(1)),
            };
            georep::agent::run_stdio(&opts).map_err(|e| anyhow::anyhow!("georep agent: {e}"))?;
            Ok(exit::OK)
        }
    }
}

/// The error and its causes on one line, leaving out causes whose text an
/// outer message already includes.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
    }
    msg.replace('\n', " | ")
}

fn main() {
    let cli = Cli::parse();
    // The monitor and the worker set up their own logging.
    let own_logging = matches!(
        &cli.cmd,
        Cmd::Worker { .. }
            | Cmd::Start {
                foreground: true,
                ..
            }
            | Cmd::Start { detach: true, .. }
    );
    if !own_logging {
        init_logging("warn");
    }
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("georep: {}", one_line(&e));
            exit_code(&e)
        }
    };
    std::process::exit(code);
}
