//! A blocking queue bounded by bytes, between the agent's reader, handler
//! and writer threads: a full queue makes its producer wait, so a master
//! that stops reading replies stops the agent reading requests instead of
//! growing its memory (back-pressure end to end).

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Each item counts at least this much, so that tiny items (pongs, data
/// ops) are bounded by number too.
pub const MIN_COST: usize = 128;

struct State<T> {
    items: VecDeque<(T, usize)>,
    used: usize,
    closed: bool,
}

pub struct Bounded<T> {
    state: Mutex<State<T>>,
    changed: Condvar,
    budget: usize,
}

/// What a non-blocking pop found.
pub enum TryPop<T> {
    Item(T),
    Empty,
    Closed,
}

impl<T> Bounded<T> {
    pub fn new(budget: usize) -> Bounded<T> {
        Bounded {
            state: Mutex::new(State {
                items: VecDeque::new(),
                used: 0,
                closed: false,
            }),
            changed: Condvar::new(),
            budget,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        // A panicking peer leaves consistent state: every update is one statement.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `item` of `bytes`, waiting while the queue is over its
    /// budget (an empty queue takes any item). Gives the item back if the
    /// queue is closed.
    pub fn push(&self, item: T, bytes: usize) -> Result<(), T> {
        let cost = bytes.max(MIN_COST);
        let mut s = self.lock();
        while !s.closed && !s.items.is_empty() && s.used + cost > self.budget {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if s.closed {
            return Err(item);
        }
        s.used += cost;
        s.items.push_back((item, cost));
        self.changed.notify_all();
        Ok(())
    }

    /// Waits until the queue is under its budget (or closed): true if open.
    pub fn wait_room(&self) -> bool {
        let mut s = self.lock();
        while !s.closed && s.used >= self.budget {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        !s.closed
    }

    fn take(&self, s: &mut State<T>) -> Option<T> {
        let (item, cost) = s.items.pop_front()?;
        s.used -= cost;
        self.changed.notify_all();
        Some(item)
    }

    /// The next item, waiting for one; None once closed and drained.
    pub fn pop(&self) -> Option<T> {
        let mut s = self.lock();
        loop {
            if let Some(item) = self.take(&mut s) {
                return Some(item);
            }
            if s.closed {
                return None;
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// As [`pop`](Self::pop), giving up after `timeout` (`Err(())`).
    pub fn pop_timeout(&self, timeout: Duration) -> Result<Option<T>, ()> {
        let mut s = self.lock();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(item) = self.take(&mut s) {
                return Ok(Some(item));
            }
            if s.closed {
                return Ok(None);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(());
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub fn try_pop(&self) -> TryPop<T> {
        let mut s = self.lock();
        match self.take(&mut s) {
            Some(item) => TryPop::Item(item),
            None if s.closed => TryPop::Closed,
            None => TryPop::Empty,
        }
    }

    /// Refuses further items; waiting producers and consumers wake up
    /// (consumers still get what is queued).
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_full_queue_blocks_its_producer_until_drained_and_close_releases_everyone() {
        let q = Arc::new(Bounded::<usize>::new(1000));
        q.push(1, 600).unwrap();
        q.push(2, 300).unwrap();
        // Over the budget: this push waits for a pop.
        let (tx, rx) = std::sync::mpsc::channel();
        let p = {
            let q = q.clone();
            std::thread::spawn(move || {
                q.push(3, 600).unwrap();
                tx.send(()).unwrap();
            })
        };
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        assert_eq!(q.pop(), Some(1));
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        p.join().unwrap();
        // An item larger than the whole budget still goes into an empty queue.
        assert_eq!(q.pop(), Some(2));
        assert_eq!(q.pop(), Some(3));
        q.push(4, 5000).unwrap();
        assert!(matches!(
            q.pop_timeout(Duration::from_millis(10)),
            Ok(Some(4))
        ));
        assert!(q.pop_timeout(Duration::from_millis(10)).is_err());
        q.push(5, 10).unwrap();
        q.close();
        assert_eq!(q.push(6, 10), Err(6));
        assert_eq!(q.pop(), Some(5));
        assert_eq!(q.pop(), None);
        assert!(!q.wait_room());
    }
}
