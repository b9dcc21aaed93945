//! Envoy's consecutive-error outlier detection for one cluster: endpoints
//! that keep failing are taken out of load balancing for a while, longer
//! each time they are ejected again soon after.
//!
//! Semantics (Envoy's, with `split_external_local_origin_errors` off):
//! - `consecutive_5xx` counts 5xx responses and local failures (connect
//!   failure, reset, timeout); `consecutive_gateway_failure` counts 502, 503,
//!   504 and local failures. Any other response resets both counters; a 5xx
//!   that is not a gateway error resets the gateway counter. A threshold of
//!   0 disables that detector.
//! - reaching a threshold ejects the endpoint for `base_ejection_time ×
//!   multiplier`, the multiplier growing by one per ejection and shrinking
//!   by one per `interval` spent not ejected; the ejection time is capped at
//!   Envoy's default `max_ejection_time` of 300 s (or the base, if longer).
//! - an ejection is refused when it would put more than
//!   `max_ejection_percent` of the endpoints out, except that one endpoint
//!   can always be ejected. A refused ejection is tried again on the next
//!   failure (Envoy would only retry after the counter restarts).
//! - there is no interval timer: an ejection ends exactly at its deadline,
//!   checked whenever the state is looked at (Envoy un-ejects at the next
//!   interval tick, so up to `interval` later). The counters restart at
//!   ejection, so an endpoint returns with a clean slate.
//!
//! Built for a fixed endpoint list; indices match the cluster's list (and
//! the [`Balancer`](super::balance::Balancer)'s). Out-of-range indices are
//! ignored.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use super::OutlierDetection;

/// Envoy's default `max_ejection_time`.
const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// The outcome of one upstream attempt, as the proxy saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamResult {
    /// Any non-5xx response.
    Success,
    /// A 5xx response with its status (a status outside 500..=599 counts as
    /// success).
    Http5xx(u16),
    ConnectFailure,
    /// The connection or stream was reset / closed before a response.
    Reset,
    Timeout,
}

#[derive(Debug)]
pub struct OutlierDetector {
    config: OutlierDetection,
    endpoints: Mutex<Vec<EndpointState>>,
}

#[derive(Debug, Clone, Default)]
struct EndpointState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// Deadline of the current or last ejection.
    ejected_until: Option<Instant>,
    /// Ejection time multiplier as of `ejected_until`.
    multiplier: u32,
    /// Ejections so far, for metrics.
    ejections: u64,
}

impl EndpointState {
    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }
}

impl OutlierDetector {
    pub fn new(config: OutlierDetection, endpoints: usize) -> OutlierDetector {
        OutlierDetector {
            config,
            endpoints: Mutex::new(vec![EndpointState::default(); endpoints]),
        }
    }

    pub fn config(&self) -> &OutlierDetection {
        &self.config
    }

    /// Number of endpoints watched.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<EndpointState>> {
        self.endpoints.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one attempt's outcome; may eject the endpoint. Returns true
    /// when this call ejected it (for logging and metrics).
    pub fn record(&self, endpoint: usize, result: UpstreamResult, now: Instant) -> bool {
        let (is_5xx, is_gateway) = match result {
            UpstreamResult::Success => (false, false),
            UpstreamResult::Http5xx(code) => {
                ((500..=599).contains(&code), matches!(code, 502..=504))
            }
            UpstreamResult::ConnectFailure | UpstreamResult::Reset | UpstreamResult::Timeout => {
                (true, true)
            }
        };
        let mut endpoints = self.lock();
        let Some(state) = endpoints.get_mut(endpoint) else {
            return false;
        };
        if !is_5xx {
            state.consecutive_5xx = 0;
            state.consecutive_gateway = 0;
            return false;
        }
        state.consecutive_5xx = state.consecutive_5xx.saturating_add(1);
        state.consecutive_gateway = if is_gateway {
            state.consecutive_gateway.saturating_add(1)
        } else {
            0
        };
        let tripped = |count: u32, threshold: u32| threshold > 0 && count >= threshold;
        if state.is_ejected(now)
            || !(tripped(state.consecutive_5xx, self.config.consecutive_5xx)
                || tripped(
                    state.consecutive_gateway,
                    self.config.consecutive_gateway_failure,
                ))
        {
            return false;
        }
        let ejected = endpoints.iter().filter(|s| s.is_ejected(now)).count();
        let total = endpoints.len();
        let within_percent =
            (ejected as u64 + 1) * 100 <= self.config.max_ejection_percent as u64 * total as u64;
        if !(within_percent || ejected == 0) {
            return false;
        }
        let config = self.config;
        let Some(state) = endpoints.get_mut(endpoint) else {
            return false;
        };
        state.eject(&config, now);
        true
    }

    /// Whether the endpoint is out of load balancing at `now`.
    pub fn is_ejected(&self, endpoint: usize, now: Instant) -> bool {
        self.lock().get(endpoint).is_some_and(|s| s.is_ejected(now))
    }

    /// Endpoints ejected at `now`.
    pub fn ejected_count(&self, now: Instant) -> usize {
        self.lock().iter().filter(|s| s.is_ejected(now)).count()
    }

    /// Ejections of this endpoint so far (metrics).
    pub fn ejections(&self, endpoint: usize) -> u64 {
        self.lock().get(endpoint).map_or(0, |s| s.ejections)
    }

    /// The ejected set at `now`, one flag per endpoint: one lock for a
    /// whole balancing decision.
    pub fn ejected(&self, now: Instant) -> Vec<bool> {
        self.lock().iter().map(|s| s.is_ejected(now)).collect()
    }
}

impl EndpointState {
    fn eject(&mut self, config: &OutlierDetection, now: Instant) {
        let base = config.base_ejection_time;
        let max = MAX_EJECTION_TIME.max(base);
        // The multiplier decays by one per interval spent back in service.
        let mut multiplier = self.multiplier;
        if let Some(until) = self.ejected_until {
            let back_for = now.saturating_duration_since(until);
            let decay = if config.interval.is_zero() {
                u128::from(u32::MAX)
            } else {
                back_for.as_nanos() / config.interval.as_nanos()
            };
            multiplier = multiplier.saturating_sub(u32::try_from(decay).unwrap_or(u32::MAX));
        }
        // Grow until the product first passes the cap (Envoy's rule).
        if base.saturating_mul(multiplier) < max.saturating_add(base) {
            multiplier = multiplier.saturating_add(1);
        }
        let duration = base.saturating_mul(multiplier).min(max);
        self.multiplier = multiplier;
        self.ejected_until = Some(now + duration);
        self.ejections += 1;
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: 5,
            consecutive_gateway_failure: 3,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 50,
        }
    }

    fn fail(
        d: &OutlierDetector,
        endpoint: usize,
        result: UpstreamResult,
        times: u32,
        now: Instant,
    ) {
        for _ in 0..times {
            d.record(endpoint, result, now);
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn ejects_after_consecutive_5xx() {
        let d = OutlierDetector::new(config(), 4);
        let t = Instant::now();
        fail(&d, 0, UpstreamResult::Http5xx(500), 4, t);
        assert!(!d.is_ejected(0, t));
        assert!(d.record(0, UpstreamResult::Http5xx(500), t));
        assert!(d.is_ejected(0, t));
        assert!(!d.is_ejected(1, t));
        assert_eq!(d.ejected_count(t), 1);
        assert_eq!(d.ejections(0), 1);
    }

    #[test]
    fn gateway_failures_and_local_failures() {
        let d = OutlierDetector::new(config(), 4);
        let t = Instant::now();
        d.record(0, UpstreamResult::Http5xx(502), t);
        d.record(0, UpstreamResult::ConnectFailure, t);
        assert!(!d.is_ejected(0, t));
        d.record(0, UpstreamResult::Timeout, t);
        assert!(d.is_ejected(0, t));

        // A 500 breaks a gateway streak (but counts towards consecutive_5xx).
        d.record(1, UpstreamResult::Http5xx(503), t);
        d.record(1, UpstreamResult::Reset, t);
        d.record(1, UpstreamResult::Http5xx(500), t);
        d.record(1, UpstreamResult::Http5xx(504), t);
        assert!(!d.is_ejected(1, t));
        d.record(1, UpstreamResult::Http5xx(504), t);
        // 5 consecutive 5xx/local failures.
        assert!(d.is_ejected(1, t));
    }

    #[test]
    fn success_resets_counters() {
        let d = OutlierDetector::new(config(), 4);
        let t = Instant::now();
        fail(&d, 0, UpstreamResult::Http5xx(500), 4, t);
        d.record(0, UpstreamResult::Success, t);
        fail(&d, 0, UpstreamResult::Http5xx(500), 4, t);
        assert!(!d.is_ejected(0, t));
        // A non-5xx status counts as success.
        d.record(0, UpstreamResult::Http5xx(404), t);
        fail(&d, 0, UpstreamResult::Http5xx(500), 4, t);
        assert!(!d.is_ejected(0, t));
        d.record(0, UpstreamResult::Http5xx(500), t);
        assert!(d.is_ejected(0, t));
    }

    #[test]
    fn unejected_when_time_passes_and_intervals_grow() {
        let d = OutlierDetector::new(config(), 4);
        let t0 = Instant::now();
        fail(&d, 0, UpstreamResult::ConnectFailure, 3, t0);
        assert!(d.is_ejected(0, t0 + 29 * S));
        assert!(!d.is_ejected(0, t0 + 30 * S));
        assert_eq!(d.ejected_count(t0 + 30 * S), 0);

        // Ejected again right away: twice the base.
        let t1 = t0 + 31 * S;
        fail(&d, 0, UpstreamResult::ConnectFailure, 3, t1);
        assert!(d.is_ejected(0, t1 + 59 * S));
        assert!(!d.is_ejected(0, t1 + 60 * S));

        // Third time: three times.
        let t2 = t1 + 61 * S;
        fail(&d, 0, UpstreamResult::ConnectFailure, 3, t2);
        assert!(d.is_ejected(0, t2 + 89 * S));
        assert!(!d.is_ejected(0, t2 + 90 * S));

        // Failures while ejected do not extend the ejection.
        fail(&d, 0, UpstreamResult::ConnectFailure, 10, t2 + 10 * S);
        assert!(!d.is_ejected(0, t2 + 90 * S));
        assert_eq!(d.ejections(0), 3);
    }

    #[test]
    fn multiplier_decays_while_healthy() {
        let d = OutlierDetector::new(config(), 4);
        let t0 = Instant::now();
        fail(&d, 0, UpstreamResult::ConnectFailure, 3, t0);
        fail(&d, 0, UpstreamResult::ConnectFailure, 3, t0 + 30 * S);
        // Multiplier 2, ejected until t0 + 90 s. Two intervals back in
        // service bring it back to 0, so the next ejection is the base.
        let t1 = t0 + 90 * S + 20 * S;
        fail(&d, 0, UpstreamResult::ConnectFailure, 3, t1);
        assert!(d.is_ejected(0, t1 + 29 * S));
        assert!(!d.is_ejected(0, t1 + 30 * S));
    }

    #[test]
    fn ejection_time_is_capped() {
        let d = OutlierDetector::new(
            OutlierDetection {
                base_ejection_time: Duration::from_secs(200),
                ..config()
            },
            4,
        );
        let t0 = Instant::now();
        fail(&d, 0, UpstreamResult::ConnectFailure, 3, t0);
        let t1 = t0 + 200 * S;
        fail(&d, 0, UpstreamResult::ConnectFailure, 3, t1);
        assert!(d.is_ejected(0, t1 + 299 * S));
        assert!(!d.is_ejected(0, t1 + 300 * S));
    }

    #[test]
    fn max_ejection_percent_is_respected() {
        // 50 % of 4: two endpoints at most.
        let d = OutlierDetector::new(config(), 4);
        let t = Instant::now();
        for e in 0..4 {
            fail(&d, e, UpstreamResult::Http5xx(503), 3, t);
        }
        assert_eq!(d.ejected_count(t), 2);
        assert_eq!(d.ejected(t), vec![true, true, false, false]);

        // Once one returns, the next failure of a refused endpoint ejects
        // it (the streak was kept).
        let later = t + 31 * S;
        assert_eq!(d.ejected_count(later), 0);
        d.record(2, UpstreamResult::Http5xx(503), later);
        assert!(d.is_ejected(2, later));
    }

    #[test]
    fn one_ejection_is_always_allowed() {
        let d = OutlierDetector::new(
            OutlierDetection {
                max_ejection_percent: 10,
                ..config()
            },
            3,
        );
        let t = Instant::now();
        for e in 0..3 {
            fail(&d, e, UpstreamResult::Timeout, 3, t);
        }
        assert_eq!(d.ejected_count(t), 1);

        let single = OutlierDetector::new(config(), 1);
        fail(&single, 0, UpstreamResult::Timeout, 3, t);
        assert!(single.is_ejected(0, t));
    }

    #[test]
    fn zero_threshold_disables_and_out_of_range_is_ignored() {
        let d = OutlierDetector::new(
            OutlierDetection {
                consecutive_5xx: 0,
                consecutive_gateway_failure: 0,
                ..config()
            },
            2,
        );
        let t = Instant::now();
        fail(&d, 0, UpstreamResult::ConnectFailure, 100, t);
        assert!(!d.is_ejected(0, t));
        assert!(!d.record(7, UpstreamResult::ConnectFailure, t));
        assert!(!d.is_ejected(7, t));
    }

    #[test]
    fn shared_across_threads() {
        let d = std::sync::Arc::new(OutlierDetector::new(config(), 2));
        let t = Instant::now();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let d = d.clone();
                std::thread::spawn(move || fail(&d, 1, UpstreamResult::Http5xx(502), 25, t))
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert!(d.is_ejected(1, t));
        assert_eq!(d.ejections(1), 1);
    }
}
