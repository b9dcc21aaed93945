//! Warnings that a hostile peer or an exhausted resource can repeat
//! thousands of times a second (accept errors, refused connections,
//! handshake timeouts) are logged once per burst: the first event of a
//! burst is logged, later ones are only counted, and the next line (at most
//! one per window) says how many were left out.
use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// How long after a logged line the same warning stays quiet.
pub const BURST_WINDOW: Duration = Duration::from_secs(10);

/// One kind of warning, rate-limited to a line per window.
pub struct Burst {
    epoch: Instant,
    window_ms: u64,
    /// When the last line was logged, in ms since `epoch` plus one (0: never).
    last_logged: AtomicU64,
    /// Events since the last line that were not logged.
    suppressed: AtomicU64,
}

impl Default for Burst {
    fn default() -> Self {
        Burst::new(BURST_WINDOW)
    }
}

impl Burst {
    pub fn new(window: Duration) -> Burst {
        Burst {
            epoch: Instant::now(),
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            last_logged: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Records one event. `Some(n)` means: log this one now, noting the `n`
    /// events left out since the last line; `None`: stay quiet.
    pub fn hit(&self) -> Option<u64> {
        let now = u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let last = self.last_logged.load(Ordering::Relaxed);
        let quiet = last != 0 && now.saturating_sub(last) < self.window_ms;
        if !quiet
            && self
                .last_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_logged_once_per_window_with_the_count_left_out() {
        let burst = Burst::new(Duration::from_millis(200));
        assert_eq!(burst.hit(), Some(0));
        for _ in 0..1000 {
            assert_eq!(burst.hit(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(burst.hit(), Some(1000));
        assert_eq!(burst.hit(), None);
    }

    #[test]
    fn concurrent_events_log_one_line() {
        let burst = std::sync::Arc::new(Burst::new(Duration::from_secs(60)));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let burst = burst.clone();
                std::thread::spawn(move || (0..1000).filter(|_| burst.hit().is_some()).count())
            })
            .collect();
        let logged: usize = threads
            .into_iter()
            .map(|thread| thread.join().unwrap_or(0))
            .sum();
        assert_eq!(logged, 1);
    }
}
