//! Logging a burst of like events once: a dead or hostile peer can cause
//! thousands a second, and a line each would cost more than the events
//! (and drown the log). The first event of a burst is logged at once; the
//! ones that follow within the window are only counted, and the next line
//! says how many there were.
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// One kind of event's burst state.
pub struct Burst {
    window: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    logged_at: Option<Instant>,
    suppressed: u64,
}

impl Burst {
    /// Events within `window` of the last logged one are counted, not
    /// logged.
    pub fn new(window: Duration) -> Burst {
        Burst {
            window,
            state: Mutex::default(),
        }
    }

    /// `Some(n)`: log this event now, with `n` like events not logged since
    /// the last line; `None`: it was counted, stay quiet.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.logged_at {
            Some(at) if now.saturating_duration_since(at) < self.window => {
                state.suppressed += 1;
                None
            }
            _ => {
                state.logged_at = Some(now);
                Some(std::mem::take(&mut state.suppressed))
            }
        }
    }
}

impl Default for Burst {
    /// Ten seconds: long enough to absorb a storm, short enough that a
    /// problem that persists keeps showing.
    fn default() -> Self {
        Burst::new(Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_a_burst_is_logged_and_the_rest_counted_into_the_next_line() {
        let burst = Burst::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(burst.admit_at(start), Some(0));
        for second in 1..=5 {
            assert_eq!(burst.admit_at(start + Duration::from_secs(second)), None);
        }
        assert_eq!(burst.admit_at(start + Duration::from_secs(11)), Some(5));
        assert_eq!(burst.admit_at(start + Duration::from_secs(12)), None);
    }
}
