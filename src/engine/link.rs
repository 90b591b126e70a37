//! The worker's link to the slave as it runs: the settings it applies
//! without a restart (`session::LIVE_KEYS`), the shared bandwidth limit,
//! and what status shows of it (streams, limit in force, rate, compression).

use crate::engine::bandwidth;
use crate::protocol::compress::Mode;
use crate::protocol::throttle::Throttle;
use crate::protocol::{Client, ClientStats};
use crate::session::Config;
use serde::Serialize;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The settings of a connection: a change takes effect by reconnecting
/// between crawls (the watcher keeps running, so continuity is kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    pub streams: Option<u32>,
    pub compression: Mode,
    pub keepalive: Duration,
}

impl LinkConfig {
    pub fn of(c: &Config) -> LinkConfig {
        LinkConfig {
            streams: c.streams,
            compression: Mode::of_config(c.compression.as_deref()),
            keepalive: Duration::from_secs(c.keepalive_secs.max(3)),
        }
    }
}

/// What status shows of the link.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkReport {
    pub streams: u64,
    /// The limit in force, bytes/s (None: none).
    pub bwlimit: Option<u64>,
    /// Bytes/s sent over the last few seconds.
    pub rate: u64,
    /// Wire bytes over uncompressed bytes sent (None: nothing sent yet).
    pub compression_ratio: Option<f64>,
}

/// The link state shared by the worker, its config watcher and its reporter.
pub struct LinkState {
    pub throttle: Arc<Throttle>,
    /// The settings read from the config file most recently.
    pub config: Mutex<LinkConfig>,
    /// The counters of the current connection's streams (not the clients:
    /// those would keep the agents' input open).
    clients: Mutex<Vec<Arc<ClientStats>>>,
    /// (when, bytes charged then, rate computed then).
    meter: Mutex<(Instant, u64, u64)>,
    /// The round trip measured when the connection was made.
    rtt: Mutex<Duration>,
}

impl LinkState {
    pub fn new(config: &Config) -> Arc<LinkState> {
        let s = Arc::new(LinkState {
            throttle: Arc::default(),
            config: Mutex::new(LinkConfig::of(config)),
            clients: Mutex::new(Vec::new()),
            meter: Mutex::new((Instant::now(), 0, 0)),
            rtt: Mutex::new(Duration::ZERO),
        });
        s.apply(config);
        s
    }

    /// Applies a (re-read) config: the bandwidth limit now, the link's
    /// settings at the next connection.
    pub fn apply(&self, config: &Config) {
        let limit = bandwidth::limit_now(config.bwlimit, config.bwlimit_schedule.as_deref());
        let rate = limit.unwrap_or(0);
        if self.throttle.rate() != rate {
            tracing::info!(bwlimit = rate, "bandwidth limit in force");
        }
        self.throttle.set_rate(rate);
        *self.config.lock().unwrap() = LinkConfig::of(config);
    }

    pub fn set_rtt(&self, rtt: Duration) {
        *self.rtt.lock().unwrap() = rtt;
    }

    pub fn rtt(&self) -> Duration {
        *self.rtt.lock().unwrap()
    }

    /// Records the streams of a new connection (for status) and makes them
    /// share the limit.
    pub fn connected(&self, clients: &[Client]) {
        for c in clients {
            c.set_throttle(self.throttle.clone());
        }
        *self.clients.lock().unwrap() = clients.iter().map(Client::stats_handle).collect();
    }

    pub fn report(&self) -> LinkReport {
        let clients = self.clients.lock().unwrap().clone();
        let (wire, raw) = clients.iter().fold((0u64, 0u64), |(w, r), s| {
            (
                w + s.bytes_out.load(Ordering::Relaxed),
                r + s.raw_out.load(Ordering::Relaxed),
            )
        });
        let charged = self.throttle.charged().0;
        let rate = {
            let mut m = self.meter.lock().unwrap();
            let dt = m.0.elapsed().as_secs_f64();
            if dt >= 2.0 {
                m.2 = ((charged.saturating_sub(m.1)) as f64 / dt) as u64;
                *m = (Instant::now(), charged, m.2);
            }
            m.2
        };
        let limit = self.throttle.rate();
        LinkReport {
            streams: clients.len() as u64,
            bwlimit: (limit > 0).then_some(limit),
            rate,
            compression_ratio: (raw > 0).then(|| wire as f64 / raw as f64),
        }
    }
}

/// Counters of the link at the start of a sync, to report the sync's share.
pub struct LinkStart {
    wire_out: u64,
    raw_out: u64,
    limited: u64,
}

impl LinkStart {
    pub fn now(slave: &crate::engine::slave::Slave, link: &LinkState) -> LinkStart {
        LinkStart {
            wire_out: slave.wire_totals().0,
            raw_out: slave.raw_out_total(),
            limited: link.throttle.charged().1,
        }
    }

    pub fn summary(
        &self,
        slave: &crate::engine::slave::Slave,
        link: &LinkState,
        (split, resumed): (u64, u64),
    ) -> crate::engine::outcome::LinkSummary {
        let wire = slave.wire_totals().0 - self.wire_out;
        let raw = slave.raw_out_total() - self.raw_out;
        let limit = link.throttle.rate();
        crate::engine::outcome::LinkSummary {
            streams: slave.streams() as u64,
            small_files_by_stream: slave.small_by_stream(),
            files_split: split,
            bytes_resumed: resumed,
            rtt_ms: link.rtt().as_secs_f64() * 1000.0,
            compression_ratio: if raw == 0 {
                1.0
            } else {
                wire as f64 / raw as f64
            },
            bwlimit: (limit > 0).then_some(limit),
            bwlimit_bytes: link.throttle.charged().1 - self.limited,
        }
    }
}

/// Streams wanted for a link of round trip `rtt`: `configured`, or (auto)
/// enough for OpenSSH's fixed 2 MiB channel window to carry
/// [`AUTO_TARGET_RATE`] at that round trip, at most [`MAX_AUTO_STREAMS`].
pub fn streams_for(configured: Option<u32>, rtt: Duration) -> usize {
    if let Some(n) = configured {
        return n.clamp(1, crate::session::MAX_STREAMS) as usize;
    }
    let per_stream = CHANNEL_WINDOW as f64 / rtt.as_secs_f64().max(1e-6);
    ((AUTO_TARGET_RATE / per_stream).ceil() as usize).clamp(1, MAX_AUTO_STREAMS)
}

/// What `streams = auto` aims to fill: 1 Gbit/s.
pub const AUTO_TARGET_RATE: f64 = 125e6;
/// `streams = auto` opens at most this many.
pub const MAX_AUTO_STREAMS: usize = 8;
/// OpenSSH's window per channel: one stream carries at most this per round trip.
const CHANNEL_WINDOW: u64 = 2 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_streams_follow_the_round_trip() {
        let ms = Duration::from_millis;
        assert_eq!(streams_for(None, Duration::from_micros(200)), 1);
        assert_eq!(streams_for(None, ms(5)), 1);
        assert_eq!(streams_for(None, ms(20)), 2);
        assert_eq!(streams_for(None, ms(100)), 6);
        assert_eq!(streams_for(None, ms(400)), MAX_AUTO_STREAMS);
        assert_eq!(streams_for(Some(4), ms(0)), 4);
        assert_eq!(streams_for(Some(0), ms(100)), 1);
    }
}
