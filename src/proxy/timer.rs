//! Deadlines for the event loop (mio has no timers).
//!
//! A min-heap of `(Instant, Timer)`. Cancellation is lazy: an entry is not
//! removed when its owner goes away or moves its deadline; when it fires, the
//! owner checks whether the deadline still applies (a session compares its id
//! and its current deadline). So that dead entries cannot pile up (a session
//! that half-closes leaves a 60-second entry behind), the loop calls
//! [`Timers::retain`] when the heap outgrows the live sessions: timer memory
//! follows concurrency, not connection history. The poll timeout is the time
//! to the earliest entry.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// What a deadline belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Timer {
    /// A session's connect, wait or half-close deadline (slab key, id).
    Session(usize, u64),
    /// An admin connection's idle or refresh deadline (slab key, id).
    Admin(usize, u64),
    /// A health-listener connection's idle deadline (slab key, id).
    Health(usize, u64),
    /// An agent-check connection's deadline (slab key, id).
    Agent(usize, u64),
    /// Resume accepting after running out of file descriptors.
    AcceptResume,
    /// The same for the admin listener.
    AdminAcceptResume,
    /// Wakes the loop to accept health checks again after a pause.
    HealthAcceptResume,
    /// Once a second: staleness, dead updaters.
    Housekeeping,
    /// The SIGTERM drain deadline.
    Drain,
    /// A port's lag grace may run out (listener slab key).
    LagGrace(usize),
}

#[derive(Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, Timer)>>,
}

impl Timers {
    pub fn add(&mut self, at: Instant, t: Timer) {
        self.heap.push(Reverse((at, t)));
    }

    /// How long `poll` may sleep; `None` when nothing is due.
    pub fn next_timeout(&self, now: Instant) -> Option<Duration> {
        self.heap
            .peek()
            .map(|Reverse((at, _))| at.saturating_duration_since(now))
    }

    /// The timers due at `now`, earliest first.
    pub fn expired(&mut self, now: Instant) -> Vec<Timer> {
        let mut out = Vec::new();
        while let Some(Reverse((at, t))) = self.heap.peek() {
            if *at > now {
                break;
            }
            out.push(*t);
            self.heap.pop();
        }
        out
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Keeps only the entries `keep` approves, and gives back spare memory.
    pub fn retain(&mut self, mut keep: impl FnMut(Instant, Timer) -> bool) {
        let mut v = std::mem::take(&mut self.heap).into_vec();
        v.retain(|Reverse((at, t))| keep(*at, *t));
        v.shrink_to(v.len() * 2);
        self.heap = BinaryHeap::from(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_in_order_and_sets_the_timeout() {
        let now = Instant::now();
        let mut t = Timers::default();
        assert_eq!(t.next_timeout(now), None);
        t.add(now + Duration::from_secs(2), Timer::Drain);
        t.add(now + Duration::from_secs(1), Timer::Session(3, 9));
        t.add(now + Duration::from_secs(5), Timer::Housekeeping);
        assert_eq!(t.next_timeout(now), Some(Duration::from_secs(1)));
        assert_eq!(t.expired(now), vec![]);
        assert_eq!(
            t.expired(now + Duration::from_secs(2)),
            vec![Timer::Session(3, 9), Timer::Drain]
        );
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.next_timeout(now + Duration::from_secs(9)),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn retain_drops_dead_entries_and_keeps_order() {
        let now = Instant::now();
        let mut t = Timers::default();
        for i in 0..100u64 {
            t.add(
                now + Duration::from_millis(100 - i),
                Timer::Session(i as usize, i),
            );
        }
        t.retain(|_, timer| matches!(timer, Timer::Session(k, _) if k % 10 == 0));
        assert_eq!(t.len(), 10);
        let keys: Vec<usize> = t
            .expired(now + Duration::from_secs(1))
            .into_iter()
            .map(|f| {
                if let Timer::Session(k, _) = f {
                    k
                } else {
                    usize::MAX
                }
            })
            .collect();
        assert_eq!(
            keys,
            [90, 80, 70, 60, 50, 40, 30, 20, 10, 0],
            "earliest first"
        );
    }
}
