//! A read-rate limit: a token bucket that callers draw bytes from before
//! reading, sleeping when they run ahead of the rate. Verification on
//! both sides reads through one, so a background scrub stays gentle.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most this much credit accumulates while nobody reads, so a pause
/// is not followed by a burst above the rate.
const BURST: Duration = Duration::from_millis(250);
/// Sleeps are cut into slices this long so a stop request is seen soon.
const SLICE: Duration = Duration::from_millis(100);

/// Bytes per second (0: unlimited), shared by the threads that read.
#[derive(Debug)]
pub struct Throttle {
    rate: u64,
    /// When the bytes drawn so far are paid for.
    due: Mutex<Instant>,
}

impl Throttle {
    pub fn new(rate: u64) -> Throttle {
        Throttle {
            rate,
            due: Mutex::new(Instant::now()),
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// The time `n` bytes take at the rate.
    fn cost(&self, n: u64) -> Duration {
        Duration::from_nanos(((n as u128 * 1_000_000_000) / self.rate as u128) as u64)
    }

    /// Draws `n` bytes, sleeping until the rate allows them; returns early
    /// (false) when `stop` is set.
    pub fn take(&self, n: u64, stop: &AtomicBool) -> bool {
        if self.rate == 0 || n == 0 {
            return !stop.load(Ordering::Relaxed);
        }
        let wake = {
            let mut due = self.due.lock().unwrap();
            let now = Instant::now();
            let floor = now.checked_sub(BURST).unwrap_or(now);
            if *due < floor {
                *due = floor;
            }
            *due += self.cost(n);
            *due
        };
        loop {
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            let now = Instant::now();
            if now >= wake {
                return true;
            }
            std::thread::sleep((wake - now).min(SLICE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_is_held_to_the_rate_and_stops_on_request() {
        let t = Throttle::new(10 << 20);
        let stop = AtomicBool::new(false);
        let start = Instant::now();
        for _ in 0..10 {
            assert!(t.take(1 << 20, &stop));
        }
        // 10 MiB at 10 MiB/s, less the burst credit.
        assert!(
            start.elapsed() >= Duration::from_millis(700),
            "{:?}",
            start.elapsed()
        );
        let unlimited = Throttle::new(0);
        let start = Instant::now();
        assert!(unlimited.take(1 << 40, &stop));
        assert!(start.elapsed() < Duration::from_millis(50));
        stop.store(true, Ordering::Relaxed);
        let slow = Throttle::new(1);
        let start = Instant::now();
        assert!(!slow.take(1 << 20, &stop));
        assert!(start.elapsed() < Duration::from_millis(200));
    }
}
