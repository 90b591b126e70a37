//! A user-space TCP proxy on loopback: counts the bytes crossing it in each
//! direction and can delay every chunk by a fixed time each way (WAN
//! emulation: this kernel has no netem). Throughput is preserved: chunks
//! are queued with a deadline, not forwarded one round trip at a time.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

pub struct Proxy {
    pub port: u16,
    pub up: Arc<AtomicU64>,
    pub down: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `127.0.0.1:target`.
    pub fn start(target: u16, delay: Duration) -> std::io::Result<Proxy> {
        Proxy::start_capped(target, delay, None)
    }

    /// As [`start`](Proxy::start), delivering at most `cap` bytes/s in
    /// each direction over all connections (a link of that bandwidth).
    pub fn start_capped(target: u16, delay: Duration, cap: Option<u64>) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let (up, down, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        {
            let (up, down, stop) = (up.clone(), down.clone(), stop.clone());
            let pace_up: Pace = Arc::default();
            let pace_down: Pace = Arc::default();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let _ = client.set_nonblocking(false);
                            let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                                continue;
                            };
                            let _ = client.set_nodelay(true);
                            let _ = server.set_nodelay(true);
                            pipe(
                                client.try_clone().unwrap(),
                                server.try_clone().unwrap(),
                                delay,
                                up.clone(),
                                cap.map(|c| (c, pace_up.clone())),
                            );
                            pipe(
                                server,
                                client,
                                delay,
                                down.clone(),
                                cap.map(|c| (c, pace_down.clone())),
                            );
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            });
        }
        Ok(Proxy {
            port,
            up,
            down,
            stop,
        })
    }

    pub fn bytes(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        )
    }

    pub fn reset(&self) {
        self.up.store(0, Ordering::Relaxed);
        self.down.store(0, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How much of the link's time a late writer may make up at once.
const CATCH_UP: Duration = Duration::from_millis(10);

/// When the link is next free, shared by the connections of one direction.
type Pace = Arc<std::sync::Mutex<Option<Instant>>>;

/// Copies `from` to `to`, each chunk delivered `delay` after it was read,
/// and with `cap`, no faster than `cap.0` bytes/s.
fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    delay: Duration,
    count: Arc<AtomicU64>,
    cap: Option<(u64, Pace)>,
) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    count.fetch_add(n as u64, Ordering::Relaxed);
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        while let Ok((at, data)) = rx.recv() {
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if let Some((rate, pace)) = &cap {
                let wait = {
                    let mut next = pace.lock().unwrap();
                    let now = Instant::now();
                    // The link was free to send this chunk from when it
                    // arrived (or when the previous one was sent): a thread
                    // that wakes late does not lose the link's time, up to
                    // CATCH_UP of it (a link's queue drains while the
                    // emulator sleeps; its own delays are not bandwidth).
                    let ready = at.max(now.checked_sub(CATCH_UP).unwrap_or(now));
                    let start = next.map_or(ready, |n| n.max(ready));
                    let done = start + Duration::from_secs_f64(data.len() as f64 / *rate as f64);
                    *next = Some(done);
                    done.saturating_duration_since(now)
                };
                std::thread::sleep(wait);
            }
            if to.write_all(&data).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// What a link emulated like [`Proxy::start_capped`] carries: MB/s of
/// `bytes` sent over one plain TCP connection through a fresh proxy of
/// that delay and cap to a sink, from the first byte received to the last.
pub fn capacity(delay: Duration, cap: Option<u64>, bytes: u64) -> std::io::Result<f64> {
    let sink = TcpListener::bind("127.0.0.1:0")?;
    let port = sink.local_addr()?.port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let run = || -> std::io::Result<Duration> {
            let mut c = sink.accept()?.0;
            let mut b = vec![0u8; 1 << 20];
            let (mut got, mut first) = (0u64, None);
            while got < bytes {
                let n = c.read(&mut b)?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                first.get_or_insert_with(Instant::now);
                got += n as u64;
            }
            Ok(first.map_or(Duration::ZERO, |f| f.elapsed()))
        };
        let _ = tx.send(run());
    });
    let p = Proxy::start_capped(port, delay, cap)?;
    let mut c = TcpStream::connect(("127.0.0.1", p.port))?;
    let buf = vec![0x5au8; 64 << 10];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(buf.len() as u64) as usize;
        c.write_all(&buf[..n])?;
        sent += n as u64;
    }
    let took = rx.recv().map_err(std::io::Error::other)??;
    Ok(bytes as f64 / took.as_secs_f64().max(1e-9) / 1e6)
}
