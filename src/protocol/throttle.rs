//! A token bucket over every stream of a worker: `bwlimit`. Frames are
//! charged when they are queued, so a sender waits (and memory stays
//! bounded) rather than the link being flooded. The rate can change at
//! any time (`bwlimit_schedule`); 0 means no limit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The bucket's depth in seconds of the rate: how much may go at once
/// after a pause.
const BURST_SECS: f64 = 0.1;
/// The bucket is never shallower than this (one large frame).
const MIN_BURST: f64 = 1.1 * (1 << 20) as f64;

/// The pure bucket: tokens in bytes, refilled at `rate` bytes/s up to the burst.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
    /// The rate the bucket filled at since `last`.
    rate: f64,
}

impl Bucket {
    pub fn new(now: Instant) -> Bucket {
        Bucket {
            tokens: 0.0,
            last: now,
            rate: 0.0,
        }
    }

    /// Charges `n` bytes at time `now` and returns how long the sender must
    /// wait before sending them, for a limit of `rate` bytes/s (the time
    /// since the last charge fills at the rate in force then).
    pub fn charge(&mut self, n: u64, rate: u64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        let refill = elapsed * self.rate;
        let rate = rate as f64;
        self.rate = rate;
        let burst = (rate * BURST_SECS).max(MIN_BURST);
        self.tokens = (self.tokens + refill).min(burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }
}

/// A worker's shared limit: the rate in force, the bucket, and counters.
#[derive(Debug)]
pub struct Throttle {
    rate: AtomicU64,
    bucket: Mutex<Bucket>,
    /// Bytes charged (every frame queued while a limit is in force or not).
    charged: AtomicU64,
    /// Bytes charged while a limit was in force.
    limited: AtomicU64,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            rate: AtomicU64::new(0),
            bucket: Mutex::new(Bucket::new(Instant::now())),
            charged: AtomicU64::new(0),
            limited: AtomicU64::new(0),
        }
    }
}

impl Throttle {
    /// Sets the limit in bytes/s (0: none); takes effect for the next frame.
    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
    }

    /// The limit in force, bytes/s (0: none).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Bytes charged so far, and those charged under a limit.
    pub fn charged(&self) -> (u64, u64) {
        (
            self.charged.load(Ordering::Relaxed),
            self.limited.load(Ordering::Relaxed),
        )
    }

    /// Waits until `n` more bytes may be sent.
    pub async fn take(&self, n: u64) {
        self.charged.fetch_add(n, Ordering::Relaxed);
        let rate = self.rate();
        if rate == 0 {
            return;
        }
        self.limited.fetch_add(n, Ordering::Relaxed);
        let wait =
            self.bucket
                .lock()
                .unwrap()
                .charge(n, rate, tokio::time::Instant::now().into_std());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_lets_through_the_rate_and_no_more() {
        let t0 = Instant::now();
        let mut b = Bucket::new(t0);
        let rate = 20_000_000;
        // 1 GB charged at once in 1 MiB frames, sent when told: the last
        // frame leaves after (size - burst) / rate.
        let mut now = t0;
        let mut sent = 0u64;
        while sent < 1_000_000_000 {
            let wait = b.charge(1 << 20, rate, now);
            now += wait;
            sent += 1 << 20;
        }
        let secs = now.duration_since(t0).as_secs_f64();
        let expect = sent as f64 / rate as f64;
        assert!((secs - expect).abs() < 0.2, "{secs} s for {expect} s");
        // After a pause, at most a burst goes without waiting.
        now += Duration::from_secs(10);
        let mut free = 0u64;
        while b.charge(1 << 16, rate, now).is_zero() {
            free += 1 << 16;
        }
        assert!(free as f64 <= (rate as f64 * BURST_SECS).max(MIN_BURST) + 65536.0);
        assert!(free as f64 >= (rate as f64 * BURST_SECS).max(MIN_BURST) - 65536.0 * 2.0);
    }

    #[test]
    fn a_lower_rate_takes_effect_at_once() {
        let t0 = Instant::now();
        let mut b = Bucket::new(t0);
        let w = b.charge(10_000_000, 10_000_000, t0);
        assert!((w.as_secs_f64() - 1.0).abs() < 0.01, "{w:?}");
        let w2 = b.charge(1_000_000, 1_000_000, t0 + w);
        assert!((w2.as_secs_f64() - 1.0).abs() < 0.01, "{w2:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn every_byte_is_counted_and_limited_bytes_wait() {
        let t = Throttle::default();
        t.take(5000).await;
        assert_eq!(t.charged(), (5000, 0));
        t.set_rate(1_000_000);
        let start = tokio::time::Instant::now();
        for _ in 0..30 {
            t.take(100_000).await;
        }
        // 3 MB at 1 MB/s after a full burst of at most 1.1 MiB.
        let took = start.elapsed().as_secs_f64();
        assert!((1.8..=3.1).contains(&took), "{took}");
        assert_eq!(t.charged(), (3_005_000, 3_000_000));
    }
}
