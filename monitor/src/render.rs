//! Human output of `georep status`: the table and `--detail`.

use crate::status::{CrawlProgress, MonitorStatus, Status, WorkerStatus};

/// The one-word state an operator reads first: an Active worker with
/// entries failing in every crawl is `Degraded`, not Active.
pub fn headline(s: &Status) -> &'static str {
    match s.monitor_status {
        MonitorStatus::Started
            if s.worker_status == WorkerStatus::Active && s.persistent_failures > 0 =>
        {
            "Degraded"
        }
        MonitorStatus::Started => s.worker_status.as_str(),
        other => other.as_str(),
    }
}

/// Bytes for people: 1.5 GiB, 320 KiB.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Seconds for people: 45 s, 3 min 20 s, 2 h 05 min.
pub fn human_secs(s: u64) -> String {
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, (s % 3600) / 60),
    }
}

/// One line about a crawl in progress: done / found, rate, ETA.
pub fn progress_text(p: &CrawlProgress) -> String {
    let of = |done: String, total: Option<String>| match total {
        Some(t) => format!("{done} of {t}"),
        None => done,
    };
    format!(
        "{} entries, {} files, {}, {}/s, ETA {}",
        p.entries_visited,
        of(
            p.files_done.to_string(),
            p.files_total.map(|t| t.to_string())
        ),
        of(human_bytes(p.bytes_done), p.bytes_total.map(human_bytes)),
        human_bytes(p.rate_bytes_per_sec as u64),
        p.eta_seconds
            .map(human_secs)
            .unwrap_or_else(|| "unknown".into())
    )
}

/// One line per session: SESSION, MASTER, SLAVE, STATUS, CRAWL STATUS, LAST SYNCED.
pub fn table(rows: &[Status]) -> String {
    let header = [
        "SESSION",
        "MASTER",
        "SLAVE",
        "STATUS",
        "CRAWL STATUS",
        "LAST SYNCED",
    ];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|s| {
            [
                s.session.clone(),
                s.master.clone(),
                s.slave.clone(),
                headline(s).to_string(),
                s.crawl_status.clone().unwrap_or_else(|| "N/A".into()),
                s.last_synced.clone().unwrap_or_else(|| "N/A".into()),
            ]
        })
        .collect();
    let mut width = header.map(str::len);
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: Vec<&str>| {
        let mut out = String::new();
        for (i, (c, w)) in cols.iter().zip(width).enumerate() {
            if i + 1 == cols.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(header.to_vec());
    for row in &cells {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `--detail`: every field, one per line.
pub fn detail(s: &Status) -> String {
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "N/A".into());
    let pid = |v: Option<u32>| v.map(|p| p.to_string()).unwrap_or_else(|| "N/A".into());
    let rows: Vec<(&str, String)> = vec![
        ("session", s.session.clone()),
        ("master", s.master.clone()),
        ("slave", s.slave.clone()),
        ("status", headline(s).into()),
        ("monitor status", s.monitor_status.as_str().into()),
        ("worker status", s.worker_status.as_str().into()),
        ("crawl status", opt(&s.crawl_status)),
        ("last synced", opt(&s.last_synced)),
        (
            "lag",
            s.lag_seconds
                .map(|l| format!("{l} s"))
                .unwrap_or_else(|| "N/A".into()),
        ),
        ("pending entry", s.entry.to_string()),
        ("pending data", s.data.to_string()),
        ("pending meta", s.meta.to_string()),
        ("failures", s.failures.to_string()),
        ("restarts", s.restarts.to_string()),
        ("bytes sent", s.bytes_sent.to_string()),
        ("files synced", s.files_synced.to_string()),
        ("checkpoint time", opt(&s.checkpoint_time)),
        (
            "checkpoint completed",
            if s.checkpoint_time.is_none() {
                "N/A".into()
            } else if s.checkpoint_completed {
                "Yes".into()
            } else {
                "No".into()
            },
        ),
        (
            "checkpoint completion time",
            opt(&s.checkpoint_completion_time),
        ),
        ("full crawl reason", opt(&s.full_crawl_reason)),
        ("streams", s.streams.map_or("N/A".into(), |n| n.to_string())),
        (
            "bandwidth limit",
            s.bwlimit.map_or("none".into(), |b| format!("{b} B/s")),
        ),
        ("rate", s.rate.map_or("N/A".into(), |r| format!("{r} B/s"))),
        (
            "compression ratio",
            s.compression_ratio
                .map_or("N/A".into(), |r| format!("{r:.3}")),
        ),
        ("monitor pid", pid(s.monitor_pid)),
        ("worker pid", pid(s.worker_pid)),
        ("last error", opt(&s.last_error)),
        ("last error time", opt(&s.last_error_time)),
        ("status updated", opt(&s.updated)),
        ("role", opt(&s.role)),
        (
            "epoch",
            s.epoch
                .map(|e| e.to_string())
                .unwrap_or_else(|| "N/A".into()),
        ),
        ("slave role", opt(&s.slave_role)),
        (
            "crawl progress",
            s.crawl_progress
                .as_ref()
                .map(progress_text)
                .unwrap_or_else(|| "N/A".into()),
        ),
        (
            "bytes remaining",
            s.crawl_progress
                .as_ref()
                .and_then(|p| p.bytes_remaining)
                .map(human_bytes)
                .unwrap_or_else(|| "N/A".into()),
        ),
        (
            "eta",
            s.crawl_progress
                .as_ref()
                .and_then(|p| p.eta_seconds)
                .map(human_secs)
                .unwrap_or_else(|| "N/A".into()),
        ),
        ("failing entries", s.failing_entries.to_string()),
        ("persistent failures", s.persistent_failures.to_string()),
        ("verify last", opt(&s.verify_last)),
        (
            "verify coverage",
            s.verify_coverage
                .map(|c| {
                    format!(
                        "{:.1}%{}",
                        c * 100.0,
                        if s.verify_behind {
                            " (behind schedule)"
                        } else {
                            ""
                        }
                    )
                })
                .unwrap_or_else(|| "N/A".into()),
        ),
        ("verify mismatches", s.verify_mismatches.to_string()),
        (
            "verify mismatch paths",
            if s.verify_mismatch_paths.is_empty() {
                "N/A".into()
            } else {
                s.verify_mismatch_paths.join(", ")
            },
        ),
    ];
    let mut rows = rows;
    for e in &s.persistent_failure_entries {
        rows.push((
            "persistent failure",
            format!("{}: {} ({} crawls in a row)", e.path, e.error, e.crawls),
        ));
    }
    for h in &s.hosts {
        rows.push((
            "newest point",
            format!(
                "{}: {}{}",
                h.host,
                opt(&h.newest_complete),
                h.age_seconds
                    .map(|a| format!(" (age {})", human_secs(a)))
                    .unwrap_or_default()
            ),
        ));
    }
    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<w$}: {v}\n"))
        .collect()
}
