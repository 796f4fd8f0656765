//! The client's view of each storage node it talks to (DESIGN.md §6, slow disk / flapping
//! link): requests in flight, a moving average of answer times, and counts of requests that
//! failed or got no answer within [`LINK_TIMEOUT`].
//!
//! Reads use it to avoid a member that answers slowly (a slow disk or a flapping link): a
//! member above [`SLOW_LINK`] is tried after the others. A member that does not answer within
//! [`LINK_TIMEOUT`] is treated as failed, and a write reports it (it leaves the group's active
//! set until it has caught up).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foldhash::HashMap;

/// A member that has not answered a request in this long is treated as failed.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(3);
/// A member whose answers take this long on average is warned about and read from last.
pub const SLOW_LINK: Duration = Duration::from_millis(25);

#[derive(Debug, Default)]
pub struct Link {
    inflight: AtomicU64,
    /// Moving average of answer times over about the last 16 answers, microseconds.
    ewma_us: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
    timeouts: AtomicU64,
}

/// A snapshot of one link, for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStats {
    pub addr: String,
    pub inflight: u64,
    pub ewma_us: u64,
    pub requests: u64,
    pub failures: u64,
    pub timeouts: u64,
}

pub enum Outcome {
    Answered(Duration),
    Failed,
    TimedOut,
}

impl Link {
    pub fn inflight(&self) -> u64 {
        self.inflight.load(Ordering::Relaxed)
    }

    pub fn slow(&self) -> bool {
        self.ewma_us.load(Ordering::Relaxed) >= SLOW_LINK.as_micros() as u64
    }

    pub fn start(&self) {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Records how a request ended; returns true when this answer made the link slow.
    pub fn finish(&self, o: Outcome) -> bool {
        self.inflight.fetch_sub(1, Ordering::Relaxed);
        let took = match o {
            Outcome::Answered(d) => d,
            Outcome::Failed => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            // A request with no answer counts as one that took the whole timeout.
            Outcome::TimedOut => {
                self.timeouts.fetch_add(1, Ordering::Relaxed);
                LINK_TIMEOUT
            }
        };
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let was_slow = self.slow();
        // Lost updates between racing requests only blur an average.
        let old = self.ewma_us.load(Ordering::Relaxed);
        let new = if old == 0 { us } else { (old * 15 + us) / 16 };
        self.ewma_us.store(new, Ordering::Relaxed);
        !was_slow && self.slow()
    }
}

#[derive(Debug, Default)]
pub struct Links(Mutex<HashMap<String, Arc<Link>>>);

impl Links {
    pub fn get(&self, addr: &str) -> Arc<Link> {
        self.0
            .lock()
            .expect("links lock")
            .entry(addr.to_owned())
            .or_default()
            .clone()
    }

    pub fn stats(&self) -> Vec<LinkStats> {
        let mut v: Vec<LinkStats> = self
            .0
            .lock()
            .expect("links lock")
            .iter()
            .map(|(addr, l)| LinkStats {
                addr: addr.clone(),
                inflight: l.inflight(),
                ewma_us: l.ewma_us.load(Ordering::Relaxed),
                requests: l.requests.load(Ordering::Relaxed),
                failures: l.failures.load(Ordering::Relaxed),
                timeouts: l.timeouts.load(Ordering::Relaxed),
            })
            .collect();
        v.sort_by(|a, b| a.addr.cmp(&b.addr));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_turns_slow_and_recovers() {
        let l = Link::default();
        l.start();
        assert!(!l.finish(Outcome::Answered(Duration::from_micros(200))));
        assert!(!l.slow());
        // A request with no answer weighs as the whole timeout: slow at once.
        l.start();
        assert!(l.finish(Outcome::TimedOut));
        assert!(l.slow());
        // Fast answers bring it back.
        for _ in 0..200 {
            l.start();
            l.finish(Outcome::Answered(Duration::from_micros(200)));
        }
        assert!(!l.slow());
        assert_eq!(l.inflight(), 0);
    }
}
