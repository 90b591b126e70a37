//! The command line: parses the arguments, runs the subcommand, and maps
//! errors to the documented exit codes ([`crate::error::exit`]). Session
//! administration (`create`, `delete`, `config`) is [`admin`], the store
//! commands (`point`, `sample-store`) [`catalog`]. The top layer: may use
//! every other.

pub mod admin;
pub mod args;
pub mod catalog;
pub mod dr;
pub mod peer;
pub mod switchover;
pub mod switchover_ssh;
pub mod sync;
pub mod verify;

use crate::error::{exit, Retry, UserError};
use crate::session::{MarkerPolicy, Session, SyncMode};
use anyhow::Context;
use args::*;
use clap::Parser;
use std::time::Duration;

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GEOREP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(sync::stderr_colour())
        .with_target(false)
        .try_init();
}

/// Maps an error to its documented exit code.
fn exit_code(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if cause.downcast_ref::<UserError>().is_some() {
            return exit::USAGE;
        }
        if cause
            .downcast_ref::<crate::cli::dr::TemporaryError>()
            .is_some()
        {
            return exit::TEMPORARY;
        }
        if let Some(e) = cause.downcast_ref::<crate::cli::peer::PeerError>() {
            return match e {
                _ if e.is_usage() => exit::USAGE,
                _ if e.retry() == Retry::Temporary => exit::TEMPORARY,
                _ => exit::PERMANENT,
            };
        }
        if let Some(e) = cause.downcast_ref::<crate::transport::ssh::SshError>() {
            return match e.retry() {
                Retry::Temporary => exit::TEMPORARY,
                Retry::Permanent => exit::PERMANENT,
            };
        }
        if let Some(c) = cause.downcast_ref::<crate::catalog::CatalogError>() {
            return match c {
                _ if c.is_usage() => exit::USAGE,
                _ if c.retry() == Retry::Temporary => exit::TEMPORARY,
                _ => exit::PERMANENT,
            };
        }
        if let Some(w) = cause.downcast_ref::<crate::engine::outcome::WorkerError>() {
            return match w {
                crate::engine::outcome::WorkerError::Config(_) => exit::USAGE,
                _ if w.retry() == Retry::Temporary => exit::TEMPORARY,
                _ => exit::PERMANENT,
            };
        }
    }
    exit::PERMANENT
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    crate::engine::worker::runtime().context("starting the async runtime")
}

/// A shutdown token cancelled by Ctrl-C or SIGTERM (call inside the
/// runtime): a foreground sync or verification then ends cleanly.
fn shutdown_on_signal() -> tokio_util::sync::CancellationToken {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        on_signal.cancel();
    });
    shutdown
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
            failback,
            force,
        } => {
            let opts = crate::cli::admin::CreateOptions {
                inplace_min_size,
                failback,
                force,
                layout: match layout {
                    LayoutArg::Auto => None,
                    LayoutArg::Tree => Some(crate::session::Layout::Tree),
                    LayoutArg::Store => Some(crate::session::Layout::Store),
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
            let created = match crate::cli::admin::create(&session, &master, &slave, &opts) {
                Ok(c) => c,
                Err(crate::cli::admin::CreateError::User(e)) => return Err(e.into()),
                Err(crate::cli::admin::CreateError::Ssh(e)) => return Err(e.into()),
            };
            let s = &created.session;
            if let Some(c) = &created.check {
                crate::outln!(
                    "slave checked: georep {} agent runs on {}, writable, {:.1} GiB free of {:.1} GiB",
                    c.agent_version,
                    c.root,
                    c.avail_bytes as f64 / (1u64 << 30) as f64,
                    c.total_bytes as f64 / (1u64 << 30) as f64
                );
            }
            crate::outln!(
                "created session {} : {} -> {} ({}){}",
                s.name,
                s.config.master.display(),
                s.config.slave,
                s.dir.display(),
                if s.config.layout == crate::session::Layout::Store {
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
            progress,
            no_progress,
        } => sync::run(&session, json, full, progress, no_progress),
        Cmd::Verify {
            session,
            paths,
            json,
            max_duration,
            repair,
            rate,
            restart,
            no_cache,
        } => {
            let req = crate::engine::verify::session::Request {
                paths,
                rate: rate.unwrap_or(0),
                max_duration: max_duration.map(Duration::from_secs),
                repair,
                restart,
                no_cache,
            };
            crate::cli::verify::run(&session, &req, json)
        }
        Cmd::Mark { paths } => {
            for p in &paths {
                crate::fs::xtime::mark(p)
                    .map_err(|e| UserError::new(format!("mark {}: {e}", p.display())))?;
            }
            Ok(exit::OK)
        }
        Cmd::Delete {
            session,
            reset_sync_time,
        } => {
            let n = crate::cli::admin::delete(&session, reset_sync_time)?;
            if reset_sync_time {
                crate::outln!(
                    "deleted session {session}; removed its sync time from {n} master directories"
                );
            } else {
                crate::outln!("deleted session {session}");
            }
            Ok(exit::OK)
        }
        Cmd::Config { session, op } => {
            let mut s = Session::load(&session)?;
            let changes = match &op {
                Some(ConfigOp::Set { key, .. } | ConfigOp::Reset { key }) => Some(key.clone()),
                _ => None,
            };
            match op {
                None => crate::out!("{}", std::fs::read_to_string(s.config_path())?),
                Some(ConfigOp::Get { key }) => {
                    crate::outln!("{}", crate::cli::admin::config_get(&s, &key)?)
                }
                Some(ConfigOp::Set { key, value }) => {
                    crate::cli::admin::config_set(&mut s, &key, Some(&value))?
                }
                Some(ConfigOp::Reset { key }) => crate::cli::admin::config_set(&mut s, &key, None)?,
            }
            if let Some(key) = changes {
                crate::daemon::note_config_change(&s, &key);
            }
            Ok(exit::OK)
        }
        Cmd::Start {
            session,
            foreground,
            detach,
        } => {
            if foreground || detach {
                crate::daemon::run_monitor(&session, detach)
            } else {
                crate::daemon::start(&session)
            }
        }
        Cmd::Stop { session, force } => crate::daemon::stop(&session, force),
        Cmd::Pause { session } => crate::daemon::pause(&session, false),
        Cmd::Resume { session } => crate::daemon::pause(&session, true),
        Cmd::Status {
            session,
            json,
            prometheus,
            detail,
            nagios,
            warning,
            critical,
            critical_failures,
        } => {
            use crate::daemon::status::Format;
            let format = match (json, prometheus, detail, nagios) {
                (true, ..) => Format::Json,
                (_, true, ..) => Format::Prometheus,
                (_, _, true, _) => Format::Detail,
                (.., true) => Format::Nagios,
                _ => Format::Table,
            };
            crate::daemon::status::status(
                session.as_deref(),
                format,
                warning,
                critical,
                critical_failures,
            )
        }
        Cmd::Checkpoint { session, when } => crate::daemon::status::set_checkpoint(&session, &when),
        Cmd::Worker { session } => crate::daemon::run_worker(&session),
        Cmd::Point { op } => {
            match op {
                PointOp::List {
                    store,
                    host,
                    disk,
                    json,
                } => catalog::point_list(
                    &store,
                    &crate::catalog::points::Filter { host, disk },
                    json,
                )?,
                PointOp::Restore {
                    store,
                    point,
                    output,
                } => catalog::point_restore(&store, &point, &output)?,
                PointOp::Verify { store, json } => {
                    if !catalog::point_verify(&store, json)? {
                        return Ok(exit::PARTIAL);
                    }
                }
                PointOp::Locks { store, json } => catalog::point_locks(&store, json)?,
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
            use crate::catalog::sample::{Activity, Kinds, SampleOptions};
            let o = SampleOptions {
                hosts,
                seed,
                disks,
                disk_size,
                snapshots,
                points,
                change: change.clamp(0.0, 1.0),
                fill: fill.clamp(0.0, 1.0),
                max_write_blocks: (max_write / crate::catalog::sample::BLOCK).max(1),
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
            crate::cli::catalog::sample_store(&dir, &o, advance, only)?;
            Ok(exit::OK)
        }
        Cmd::Promote { dir, json } => crate::cli::dr::promote_cmd(&dir, json),
        Cmd::Quarantine { op } => crate::cli::dr::quarantine_cmd(op),
        Cmd::Switchover {
            session,
            reverse,
            wait_quiet,
            force,
            start,
            peer_admin,
            identity,
            reverse_slave,
            push_pem,
            reverse_ssh_port,
            reverse_identity,
            reverse_remote_georep,
        } => crate::cli::switchover_ssh::run(
            &session,
            &reverse,
            &crate::cli::switchover::SwitchoverOptions {
                wait_quiet,
                force,
                start,
                ssh: crate::cli::peer::SshOptions {
                    peer_admin,
                    identity,
                    reverse_slave,
                    push_pem,
                    reverse_ssh_port,
                    reverse_identity,
                    reverse_remote_georep,
                },
            },
        ),
        Cmd::Agent { root, keepalive } => {
            let opts = crate::agent::AgentOptions {
                root,
                keepalive: Duration::from_secs(keepalive.max(1)),
            };
            crate::agent::run_stdio(&opts).map_err(|e| anyhow::anyhow!("georep agent: {e}"))?;
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

/// Bad arguments: clap's message and exit 2, except for a Nagios check,
/// which must answer UNKNOWN (3) with one line on stdout, never 2 (CRITICAL).
fn parse_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    let nagios = std::env::args().any(|a| a == "--nagios");
    let info = matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion);
    if nagios && !info {
        let text = e.to_string();
        let first = text
            .lines()
            .map(|l| l.trim_start_matches("error: ").trim())
            .find(|l| !l.is_empty())
            .unwrap_or("bad arguments")
            .to_string();
        crate::outln!("GEOREP UNKNOWN - {first}");
        std::process::exit(georep_monitor::nagios::UNKNOWN);
    }
    e.exit()
}

/// Runs the command line and exits the process with its exit code.
pub fn main() -> ! {
    if std::env::var_os(crate::cli::peer::TIE_ENV).is_some() {
        // Not inherited by what this command starts (e.g. a monitor).
        std::env::remove_var(crate::cli::peer::TIE_ENV);
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            std::process::exit(exit::TEMPORARY);
        });
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => parse_error(e),
    };
    // The monitor, the worker and sync set up their own logging.
    let own_logging = matches!(
        &cli.cmd,
        Cmd::Worker { .. }
            | Cmd::Sync { .. }
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
