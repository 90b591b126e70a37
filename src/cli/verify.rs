//! `georep verify`: runs the verification of a session's replica in the
//! foreground and prints its report (text or JSON); the exit code says
//! equal (0), differences found (1) or stopped before the end (3).

use crate::engine::verify::session::{self, Report, Request};
use crate::error::exit;
use crate::session::Session;
use std::time::Duration;

fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn print_differences(r: &Report, indent: &str) {
    for d in &r.differences {
        let mut detail = Vec::new();
        if !d.ranges.is_empty() {
            let shown: Vec<String> = d
                .ranges
                .iter()
                .take(8)
                .map(|[a, b]| format!("{a}-{}", b - 1))
                .collect();
            let more = d.ranges.len().saturating_sub(8);
            detail.push(format!(
                "bytes {}{}",
                shown.join(", "),
                if more > 0 {
                    format!(" and {more} more ranges")
                } else {
                    String::new()
                }
            ));
        }
        if let (Some(m), Some(s)) = (d.master_size, d.slave_size) {
            if m != s {
                detail.push(format!("{m} bytes on the master, {s} on the slave"));
            }
        }
        detail.extend(d.fields.iter().cloned());
        if d.below > 0 {
            detail.push(format!("{} entries below it", d.below));
        }
        let detail = if detail.is_empty() {
            format!(" ({})", d.kind)
        } else {
            format!(" ({}): {}", d.kind, detail.join("; "))
        };
        println!("{indent}{:<9} {}{detail}", d.what, d.path.escape_debug());
    }
    let more = r
        .counts
        .mismatches
        .saturating_sub(r.differences.len() as u64);
    if more > 0 {
        println!("{indent}... and {more} more differences (see --json for the first ones)");
    }
}

fn summary(r: &Report) -> String {
    let wire = r.wire_bytes_out + r.wire_bytes_in;
    let share = if r.counts.bytes > 0 {
        format!(
            " ({:.4}% of the data)",
            wire as f64 * 100.0 / r.counts.bytes as f64
        )
    } else {
        String::new()
    };
    let cached = if r.counts.master_bytes_cached > 0 {
        format!(
            "; master: {} read, {} of unchanged files from the cache of their hashes",
            human(r.counts.master_bytes_read),
            human(r.counts.master_bytes_cached)
        )
    } else {
        String::new()
    };
    format!(
        "{} entries and {} verified in {:.1} s, {} on the wire{share}{cached}",
        r.counts.entries,
        human(r.counts.bytes),
        r.duration_ms as f64 / 1000.0,
        human(wire)
    )
}

fn print_text(r: &Report) {
    print_differences(r, "");
    for p in &r.changed_paths {
        println!(
            "changed   {}: changed on the master while verified; verify later",
            p.escape_debug()
        );
    }
    for p in &r.pending_paths {
        println!(
            "pending   {}: changed on the master, not replicated yet",
            p.escape_debug()
        );
    }
    for f in &r.failed {
        eprintln!("failed: {}: {}", f.path, f.error);
    }
    let head = if !r.complete {
        format!(
            "verify {}: stopped at {} before the end{}; run it again to resume",
            r.session,
            r.stopped_at.as_deref().unwrap_or("the start"),
            if r.counts.mismatches > 0 {
                format!(", {} differences so far", r.counts.mismatches)
            } else {
                String::new()
            }
        )
    } else if r.equal {
        format!("verify {}: equal", r.session)
    } else {
        format!("verify {}: {} differences", r.session, r.counts.mismatches)
    };
    println!(
        "{head}: {}{}",
        summary(r),
        if r.resumed { " (resumed)" } else { "" }
    );
    if r.counts.changed + r.counts.pending > 0 {
        println!(
            "  not judged: {} changed while verified, {} not replicated yet",
            r.counts.changed, r.counts.pending
        );
    }
    if let Some(rep) = &r.repair {
        println!(
            "repair: {} repaired ({} files from their differing blocks), {} failed, {} of file data sent, {} on the wire",
            rep.done.repaired,
            rep.done.files_by_blocks,
            rep.done.failed.len(),
            human(rep.done.bytes_sent),
            human(rep.wire_bytes_out + rep.wire_bytes_in)
        );
        for (p, e) in &rep.done.failed {
            eprintln!("repair failed: {p}: {e}");
        }
        print_differences(&rep.after, "  ");
        println!(
            "verified again: {}: {}",
            if rep.after.equal {
                "equal".to_string()
            } else {
                format!("{} differences", rep.after.counts.mismatches)
            },
            summary(&rep.after)
        );
    }
}

/// The exit code of a report: 0 equal (after repair, if asked), 1
/// differences remain, 3 stopped before the end.
pub fn exit_code(r: &Report) -> i32 {
    if !r.complete {
        return if r.counts.mismatches > 0 {
            exit::PARTIAL
        } else {
            exit::TEMPORARY
        };
    }
    match &r.repair {
        Some(rep) if rep.after.equal && rep.done.failed.is_empty() => exit::OK,
        Some(_) => exit::PARTIAL,
        None if r.equal => exit::OK,
        None => exit::PARTIAL,
    }
}

/// `georep verify SESSION ...`.
pub fn run(name: &str, req: &Request, json: bool) -> anyhow::Result<i32> {
    let s = Session::load(name)?;
    let rt = crate::engine::worker::runtime()?;
    let report = rt.block_on(async {
        let shutdown = super::shutdown_on_signal();
        session::verify(&s, req, shutdown).await
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    let report = report?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_text(&report);
    }
    Ok(exit_code(&report))
}
