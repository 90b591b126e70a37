//! A user-space TCP proxy that delays every chunk by a fixed time in each
//! direction (a WAN on loopback, no netem), and measures the causal depth
//! of the traffic it carries.
//!
//! Causal depth: each chunk read from one side gets a hop number, one more
//! than the highest hop delivered to that side before it was read (what
//! that side could have known when it sent it). A conversation of one
//! request/response round trip per file needs at least two hops per file;
//! a pipelined one needs a few per dependency (handshakes, listings,
//! barriers), however many files it carries. A hop takes at least the
//! delay, so the count never exceeds elapsed time / delay either.
//!
//! A stall switch ([`Proxy::stall`]) makes it stop forwarding in both
//! directions without closing anything, as a link whose far end froze:
//! what was read stays held, nothing more is read (so the senders' TCP
//! windows fill), until the switch is turned off again.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default, Debug)]
pub struct ConnStats {
    /// Highest hop delivered towards the server (0) and towards the client (1).
    delivered: [AtomicU64; 2],
    pub max_hop: AtomicU64,
    pub bytes: [AtomicU64; 2],
}

pub struct Proxy {
    pub port: u16,
    conns: Arc<Mutex<Vec<Arc<ConnStats>>>>,
    stop: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
}

impl Proxy {
    /// Listens on 127.0.0.1 and forwards to `target_port`, `delay` each way.
    pub fn start(target_port: u16, delay: Duration) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<Arc<ConnStats>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let stalled = Arc::new(AtomicBool::new(false));
        {
            let conns = conns.clone();
            let stop = stop.clone();
            let stalled = stalled.clone();
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let stats = Arc::new(ConnStats::default());
                    conns.lock().unwrap().push(stats.clone());
                    pump(&client, &server, 0, delay, stats.clone(), stalled.clone());
                    pump(&server, &client, 1, delay, stats, stalled.clone());
                }
            });
        }
        Proxy {
            port,
            conns,
            stop,
            stalled,
        }
    }

    /// Stops (true) or resumes (false) forwarding on every connection,
    /// present and future, without closing any.
    pub fn stall(&self, on: bool) {
        self.stalled.store(on, Ordering::SeqCst);
    }

    /// Every connection carried so far, oldest first.
    pub fn connections(&self) -> Vec<Arc<ConnStats>> {
        self.conns.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Waits while the stall switch is on.
fn hold(stalled: &AtomicBool) {
    while stalled.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Forwards `from` -> `to` (direction `dir`) through a delay line.
fn pump(
    from: &TcpStream,
    to: &TcpStream,
    dir: usize,
    delay: Duration,
    stats: Arc<ConnStats>,
    stalled: Arc<AtomicBool>,
) {
    let held = stalled.clone();
    let mut from = from.try_clone().unwrap();
    let mut to = to.try_clone().unwrap();
    let (tx, rx) = mpsc::channel::<(Instant, u64, Vec<u8>)>();
    let reader_stats = stats.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            hold(&held);
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            hold(&held);
            // What this side could know: the highest hop delivered to it.
            let hop = reader_stats.delivered[1 - dir].load(Ordering::SeqCst) + 1;
            reader_stats.bytes[dir].fetch_add(n as u64, Ordering::Relaxed);
            if tx
                .send((Instant::now() + delay, hop, buf[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
        let _ = from.shutdown(Shutdown::Read);
    });
    std::thread::spawn(move || {
        while let Ok((due, hop, data)) = rx.recv() {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            hold(&stalled);
            if to.write_all(&data).is_err() {
                break;
            }
            stats.delivered[dir].fetch_max(hop, Ordering::SeqCst);
            stats.max_hop.fetch_max(hop, Ordering::SeqCst);
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
