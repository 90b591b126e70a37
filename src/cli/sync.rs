//! `georep sync`: one crawl in the foreground, with a live progress line
//! on a terminal (entries, files and bytes done of those found, rate,
//! ETA), nothing when stderr is not one (`--progress` / `--no-progress`
//! override), the summary with its throughput at the end, and the run
//! logged to the session's log as well as to stderr.

use crate::engine::context::{CrawlKind, Engine};
use crate::engine::outcome::{Summary, SyncOptions};
use crate::engine::progress::{self, Rate};
use crate::error::exit;
use crate::session::Session;
use georep_monitor::logfile::{LogFile, LogWriter};
use georep_monitor::render::{human_bytes, human_secs};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The live line, while a sync shows one: log lines are printed above it.
static BAR: OnceLock<ProgressBar> = OnceLock::new();

/// Whether stderr may carry colour: a terminal, and `NO_COLOR` unset.
pub fn stderr_colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Stderr for log lines: each event written whole, above the progress line.
#[derive(Clone, Copy)]
pub struct Stderr;

pub struct StderrEvent(Vec<u8>);

impl Write for StderrEvent {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for StderrEvent {
    fn drop(&mut self) {
        let write = || {
            let _ = std::io::stderr().write_all(&self.0);
        };
        match BAR.get() {
            Some(bar) if !bar.is_hidden() => bar.suspend(write),
            _ => write(),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = StderrEvent;
    fn make_writer(&'a self) -> StderrEvent {
        StderrEvent(Vec::new())
    }
}

/// Logging of a one-shot sync: stderr at `GEOREP_LOG` (default warn) and
/// the session's log at info, so the log tells of every sync.
fn init_logging(s: &Session) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let env = |default: &str| {
        EnvFilter::try_from_env("GEOREP_LOG").unwrap_or_else(|_| EnvFilter::new(default))
    };
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(Stderr)
        .with_ansi(stderr_colour())
        .with_target(false)
        .with_filter(env("warn"));
    let file = LogFile::open(&s.log_path(), false).ok().map(|log| {
        tracing_subscriber::fmt::layer()
            .with_writer(LogWriter(log))
            .with_ansi(false)
            .with_target(false)
            .with_filter(env("info"))
    });
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .try_init();
}

/// Whether to show the progress line: the flags, else whether stderr is a terminal.
fn wants_progress(progress: bool, no_progress: bool) -> bool {
    match (progress, no_progress) {
        (_, true) => false,
        (true, _) => true,
        _ => std::io::stderr().is_terminal(),
    }
}

fn bar(forced: bool) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() || !forced {
        ProgressDrawTarget::stderr_with_hz(4)
    } else {
        // --progress into a pipe or a file: draw anyway.
        ProgressDrawTarget::term_like_with_hz(Box::new(console::Term::stderr()), 4)
    };
    let pb = ProgressBar::with_draw_target(None, target);
    pb.set_style(ProgressStyle::with_template("{wide_msg}").expect("a valid template"));
    pb
}

type Live = Arc<Mutex<Option<Arc<Engine>>>>;

/// The rate of `e`'s crawl, started anew for a new crawl.
fn rate_of<'a>(slot: &'a mut Option<(usize, Rate)>, e: &Arc<Engine>) -> &'a mut Rate {
    let id = Arc::as_ptr(e) as usize;
    if slot.as_ref().is_none_or(|(i, _)| *i != id) {
        *slot = Some((id, Rate::since(e.started)));
    }
    &mut slot.as_mut().expect("set above").1
}

/// Updates the line four times a second from the live engine.
async fn show(pb: ProgressBar, live: Live, started: Instant, store: bool) {
    let mut rate: Option<(usize, Rate)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let engine = live.lock().unwrap().clone();
        let msg = match engine {
            Some(e) => {
                let kind = match e.kind {
                    CrawlKind::Full => "full",
                    CrawlKind::Xtime => "xtime",
                };
                progress::line(
                    kind,
                    &progress::snapshot(&e, rate_of(&mut rate, &e), false),
                    started.elapsed(),
                )
            }
            // Catalog mode reports its work when it is done, not as it goes.
            None if store => format!(
                "syncing the store (points and generations)… {}",
                human_secs(started.elapsed().as_secs())
            ),
            None => format!(
                "connecting to the slave… {}",
                human_secs(started.elapsed().as_secs())
            ),
        };
        pb.set_message(msg);
    }
}

/// `georep sync SESSION [--json] [--full] [--progress|--no-progress]`.
pub fn run(
    session: &str,
    json: bool,
    full: bool,
    progress: bool,
    no_progress: bool,
) -> anyhow::Result<i32> {
    let s = Session::load(session)?;
    init_logging(&s);
    let show_progress = wants_progress(progress, no_progress);
    let rt = super::runtime()?;
    let started = Instant::now();
    let summary = rt.block_on(async {
        let shutdown = super::shutdown_on_signal();
        let live: Live = Arc::default();
        let shower = show_progress.then(|| {
            let pb = BAR.get_or_init(|| bar(progress)).clone();
            let store = s.config.layout == crate::session::Layout::Store;
            tokio::spawn(show(pb, live.clone(), started, store))
        });
        tracing::info!(session = %s.name, full, "one-shot sync started");
        let r = crate::engine::worker::sync_once_live(
            &s,
            &SyncOptions {
                full,
                marker_continuous: false,
            },
            shutdown,
            live,
        )
        .await;
        if let Some(t) = shower {
            t.abort();
        }
        if let Some(pb) = BAR.get() {
            pb.finish_and_clear();
        }
        r
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    let summary = summary?;
    tracing::info!(
        session = %s.name,
        crawl = summary.crawl,
        complete = summary.complete,
        files_synced = summary.files_synced,
        bytes_sent = summary.bytes_sent,
        failures = summary.failures,
        duration_ms = summary.duration_ms,
        "one-shot sync done"
    );
    if json {
        crate::outln!("{}", serde_json::to_string(&summary)?);
    } else if let Some(c) = &summary.catalog {
        crate::cli::catalog::print_sync(&summary, c);
        crate::outln!("{}", throughput(&summary));
    } else {
        crate::outln!("{}", text(&summary));
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

fn throughput(s: &Summary) -> String {
    let took = if s.duration_ms < 60_000 {
        format!("{:.1} s", s.duration_ms as f64 / 1000.0)
    } else {
        human_secs(s.duration_ms / 1000)
    };
    format!(
        "{} of file data in {took} ({}/s), {} sent",
        human_bytes(s.bytes_processed),
        human_bytes(s.throughput_bytes_per_sec as u64),
        human_bytes(s.bytes_sent)
    )
}

/// The summary line of a tree sync.
fn text(s: &Summary) -> String {
    let why = s
        .full_reason
        .as_deref()
        .map(|r| format!(" (full because: {r})"))
        .unwrap_or_default();
    format!(
        "{} crawl{why}: {} entries visited, {} files synced, {} bytes sent ({} literal, {} delta), {} deleted, {} failures, {} ms; {}",
        s.crawl,
        s.entries_visited,
        s.files_synced,
        s.bytes_sent,
        s.bytes_literal,
        s.bytes_delta,
        s.deletes,
        s.failures,
        s.duration_ms,
        throughput(s)
    )
}
