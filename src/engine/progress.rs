//! Progress of a crawl in progress, for the live line of a foreground
//! `sync` and for `status`: what was done, what the crawl found still to
//! do, the rate over the last seconds and the time left. The totals grow
//! as the crawl discovers work (like rsync's incremental recursion), so
//! the ETA is for the work found so far.

use crate::engine::context::Engine;
use georep_monitor::status::CrawlProgress;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The rate over a sliding window of samples.
#[derive(Debug)]
pub struct Rate {
    window: Duration,
    samples: VecDeque<(Instant, u64)>,
    last: f64,
}

impl Default for Rate {
    fn default() -> Self {
        Rate::new(Duration::from_secs(10))
    }
}

impl Rate {
    pub fn new(window: Duration) -> Rate {
        Rate {
            window,
            samples: VecDeque::new(),
            last: 0.0,
        }
    }

    /// A rate whose counter was 0 at `start` (a crawl's beginning), so the
    /// first sample already has a rate.
    pub fn since(start: Instant) -> Rate {
        let mut r = Rate::default();
        r.samples.push_back((start, 0));
        r
    }

    /// The rate the last sample gave.
    pub fn last(&self) -> f64 {
        self.last
    }

    /// Adds a sample of a growing counter; returns units per second over the window.
    pub fn sample(&mut self, at: Instant, value: u64) -> f64 {
        self.last = self.compute(at, value);
        self.last
    }

    fn compute(&mut self, at: Instant, value: u64) -> f64 {
        self.samples.push_back((at, value));
        while self.samples.len() > 2 && at.duration_since(self.samples[1].0) >= self.window {
            self.samples.pop_front();
        }
        let (t0, v0) = self.samples[0];
        let dt = at.duration_since(t0).as_secs_f64();
        if dt < 0.2 {
            return 0.0;
        }
        value.saturating_sub(v0) as f64 / dt
    }
}

/// Time left for `remaining` at `rate` per second; None without a rate.
pub fn eta(remaining: u64, rate: f64) -> Option<u64> {
    if remaining == 0 {
        return Some(0);
    }
    (rate >= 1.0).then(|| (remaining as f64 / rate).ceil() as u64)
}

/// A snapshot of `e` as status shows it, with the rate from `rate`
/// (sampled now; while `held`, a paused crawl, the last rate is kept, so
/// the ETA says how long the crawl needs once resumed).
pub fn snapshot(e: &Engine, rate: &mut Rate, held: bool) -> CrawlProgress {
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let w = &e.work;
    let planned = w.planned.load(Ordering::Relaxed);
    let bytes_done = l(&w.bytes_done);
    let files_done = l(&w.files_done);
    let per_sec = if held {
        rate.last()
    } else {
        rate.sample(Instant::now(), bytes_done)
    };
    let (files_total, bytes_total) = if planned {
        let ft = l(&w.files_found).max(files_done);
        let bt = l(&w.bytes_found).max(bytes_done);
        (Some(ft), Some(bt))
    } else {
        (None, None)
    };
    let bytes_remaining = bytes_total.map(|t| t - bytes_done);
    CrawlProgress {
        started: Some(georep_monitor::time::format_rfc3339(e.started_ns)),
        entries_visited: l(&e.stats.entries_visited),
        files_done,
        files_total,
        bytes_done,
        bytes_total,
        files_remaining: files_total.map(|t| t - files_done),
        bytes_remaining,
        rate_bytes_per_sec: per_sec,
        eta_seconds: bytes_remaining.and_then(|r| eta(r, per_sec)),
        bytes_sent: l(&e.stats.bytes_literal) + l(&e.stats.bytes_delta),
    }
}

/// The live line of a foreground sync.
pub fn line(kind: &str, p: &CrawlProgress, elapsed: Duration) -> String {
    format!(
        "{kind} crawl: {}, {}",
        georep_monitor::render::progress_text(p),
        georep_monitor::render::human_secs(elapsed.as_secs())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_follows_the_recent_window_and_eta_needs_a_rate() {
        let mut r = Rate::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(r.sample(t0, 0), 0.0);
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        assert!((r.sample(s(1), 100) - 100.0).abs() < 1e-9);
        // 100/s for 20 s, then 1000/s: the window forgets the slow start.
        for i in 2..=20 {
            r.sample(s(i), 100 * i);
        }
        let mut v = 2000;
        let mut last = 0.0;
        for i in 21..=40 {
            v += 1000;
            last = r.sample(s(i), v);
        }
        assert!((last - 1000.0).abs() < 1e-6, "{last}");
        assert_eq!(eta(5000, 1000.0), Some(5));
        assert_eq!(eta(0, 0.0), Some(0));
        assert_eq!(eta(10, 0.0), None);
    }
}
