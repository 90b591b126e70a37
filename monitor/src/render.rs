//! Human output of `georep status`: the table and `--detail`.

use crate::status::{MonitorStatus, Status};

/// The one-word state an operator reads first.
pub fn headline(s: &Status) -> &'static str {
    match s.monitor_status {
        MonitorStatus::Started => s.worker_status.as_str(),
        other => other.as_str(),
    }
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
    ];
    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<w$}: {v}\n"))
        .collect()
}
