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
