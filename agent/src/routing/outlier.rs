//! Envoy's consecutive-error outlier detection for one cluster: endpoints
//! that keep failing are taken out of load balancing for a while, longer
//! each time they are ejected again soon after.
//!
//! Semantics (Envoy's; `split_external_local_origin_errors` below):
//! - `consecutive_5xx` counts 5xx responses and local failures (connect
//!   failure, reset, timeout); `consecutive_gateway_failure` counts 502, 503,
//!   504 and local failures. Any other response resets both counters; a 5xx
//!   that is not a gateway error resets the gateway counter. A threshold of
//!   0 disables that detector.
//! - with `split_external_local_origin_errors`, local failures count only
//!   towards `consecutive_local_origin_failure`, and any response (the
//!   connection worked) resets that counter; the 5xx and gateway counters
//!   see responses only;
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
//! State is kept per endpoint address, so that it outlives a change of the
//! cluster's endpoint list: [`OutlierDetector::set_endpoints`] keeps the
//! state of the endpoints that stay, starts new ones clean and forgets the
//! ones that left. An address it does not watch is ignored.

use std::{
    collections::HashMap,
    net::SocketAddr,
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
    endpoints: Mutex<HashMap<SocketAddr, EndpointState>>,
}

#[derive(Debug, Clone, Default)]
struct EndpointState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// Local failures in a row, when they are counted apart.
    consecutive_local: u32,
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
    pub fn new(config: OutlierDetection, endpoints: &[SocketAddr]) -> OutlierDetector {
        OutlierDetector {
            config,
            endpoints: Mutex::new(
                endpoints
                    .iter()
                    .map(|address| (*address, EndpointState::default()))
                    .collect(),
            ),
        }
    }

    /// The cluster's endpoints changed: the ones that stay keep their
    /// counters and ejections, new ones start clean, the others are
    /// forgotten (and no longer count towards `max_ejection_percent`).
    pub fn set_endpoints(&self, endpoints: &[SocketAddr]) {
        let mut states = self.lock();
        let mut kept: HashMap<SocketAddr, EndpointState> = endpoints
            .iter()
            .map(|address| {
                let state = states.remove(address).unwrap_or_default();
                (*address, state)
            })
            .collect();
        std::mem::swap(&mut *states, &mut kept);
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, EndpointState>> {
        self.endpoints.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one attempt's outcome; may eject the endpoint. Returns true
    /// when this call ejected it (for logging and metrics).
    pub fn record(&self, endpoint: SocketAddr, result: UpstreamResult, now: Instant) -> bool {
        let local = matches!(
            result,
            UpstreamResult::ConnectFailure | UpstreamResult::Reset | UpstreamResult::Timeout
        );
        let (is_5xx, is_gateway) = match result {
            UpstreamResult::Success => (false, false),
            UpstreamResult::Http5xx(code) => {
                ((500..=599).contains(&code), matches!(code, 502..=504))
            }
            UpstreamResult::ConnectFailure | UpstreamResult::Reset | UpstreamResult::Timeout => {
                (true, true)
            }
        };
        let tripped = |count: u32, threshold: u32| threshold > 0 && count >= threshold;
        let mut endpoints = self.lock();
        let Some(state) = endpoints.get_mut(&endpoint) else {
            return false;
        };
        let trips = match self.config.consecutive_local_origin_failure {
            // Counted apart: a local failure touches only its own counter.
            Some(threshold) if local => {
                state.consecutive_local = state.consecutive_local.saturating_add(1);
                tripped(state.consecutive_local, threshold)
            }
            split => {
                if split.is_some() {
                    state.consecutive_local = 0;
                }
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
                tripped(state.consecutive_5xx, self.config.consecutive_5xx)
                    || tripped(
                        state.consecutive_gateway,
                        self.config.consecutive_gateway_failure,
                    )
            }
        };
        if state.is_ejected(now) || !trips {
            return false;
        }
        let ejected = endpoints.values().filter(|s| s.is_ejected(now)).count();
        let total = endpoints.len();
        let within_percent =
            (ejected as u64 + 1) * 100 <= self.config.max_ejection_percent as u64 * total as u64;
        if !(within_percent || ejected == 0) {
            return false;
        }
        let config = self.config;
        let Some(state) = endpoints.get_mut(&endpoint) else {
            return false;
        };
        state.eject(&config, now);
        true
    }

    /// Whether the endpoint is out of load balancing at `now`.
    pub fn is_ejected(&self, endpoint: SocketAddr, now: Instant) -> bool {
        self.lock()
            .get(&endpoint)
            .is_some_and(|s| s.is_ejected(now))
    }

    /// Endpoints ejected at `now`.
    pub fn ejected_count(&self, now: Instant) -> usize {
        self.lock().values().filter(|s| s.is_ejected(now)).count()
    }

    /// Ejections of this endpoint so far (metrics).
    pub fn ejections(&self, endpoint: SocketAddr) -> u64 {
        self.lock().get(&endpoint).map_or(0, |s| s.ejections)
    }

    /// Which of `endpoints` are ejected at `now`, one flag each: one lock
    /// for a whole balancing decision.
    pub fn ejected(&self, endpoints: &[SocketAddr], now: Instant) -> Vec<bool> {
        let states = self.lock();
        endpoints
            .iter()
            .map(|address| states.get(address).is_some_and(|s| s.is_ejected(now)))
            .collect()
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
        self.consecutive_local = 0;
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
            consecutive_local_origin_failure: None,
        }
    }

    fn endpoint(index: usize) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, index as u8 + 1], 8080))
    }

    fn endpoints(n: usize) -> Vec<SocketAddr> {
        (0..n).map(endpoint).collect()
    }

    fn fail(d: &OutlierDetector, index: usize, result: UpstreamResult, times: u32, now: Instant) {
        for _ in 0..times {
            d.record(endpoint(index), result, now);
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn ejects_after_consecutive_5xx() {
        let d = OutlierDetector::new(config(), &endpoints(4));
        let t = Instant::now();
        fail(&d, 0, UpstreamResult::Http5xx(500), 4, t);
        assert!(!d.is_ejected(endpoint(0), t));
        assert!(d.record(endpoint(0), UpstreamResult::Http5xx(500), t));
        assert!(d.is_ejected(endpoint(0), t));
        assert!(!d.is_ejected(endpoint(1), t));
        assert_eq!(d.ejected_count(t), 1);
        assert_eq!(d.ejections(endpoint(0)), 1);
    }

    #[test]
    fn gateway_failures_and_local_failures() {
        let d = OutlierDetector::new(config(), &endpoints(4));
        let t = Instant::now();
        d.record(endpoint(0), UpstreamResult::Http5xx(502), t);
        d.record(endpoint(0), UpstreamResult::ConnectFailure, t);
        assert!(!d.is_ejected(endpoint(0), t));
        d.record(endpoint(0), UpstreamResult::Timeout, t);
        assert!(d.is_ejected(endpoint(0), t));

        // A 500 breaks a gateway streak (but counts towards consecutive_5xx).
        d.record(endpoint(1), UpstreamResult::Http5xx(503), t);
        d.record(endpoint(1), UpstreamResult::Reset, t);
        d.record(endpoint(1), UpstreamResult::Http5xx(500), t);
        d.record(endpoint(1), UpstreamResult::Http5xx(504), t);
        assert!(!d.is_ejected(endpoint(1), t));
        d.record(endpoint(1), UpstreamResult::Http5xx(504), t);
        // 5 consecutive 5xx/local failures.
        assert!(d.is_ejected(endpoint(1), t));
    }

    #[test]
    fn success_resets_counters() {
        let d = OutlierDetector::new(config(), &endpoints(4));
        let t = Instant::now();
        fail(&d, 0, UpstreamResult::Http5xx(500), 4, t);
        d.record(endpoint(0), UpstreamResult::Success, t);
        fail(&d, 0, UpstreamResult::Http5xx(500), 4, t);
        assert!(!d.is_ejected(endpoint(0), t));
        // A non-5xx status counts as success.
        d.record(endpoint(0), UpstreamResult::Http5xx(404), t);
        fail(&d, 0, UpstreamResult::Http5xx(500), 4, t);
        assert!(!d.is_ejected(endpoint(0), t));
        d.record(endpoint(0), UpstreamResult::Http5xx(500), t);
        assert!(d.is_ejected(endpoint(0), t));
    }

    #[test]
    fn unejected_when_time_passes_and_intervals_grow() {
        let d = OutlierDetector::new(config(), &endpoints(4));
        let t0 = Instant::now();
        fail(&d, 0, UpstreamResult::ConnectFailure, 3, t0);
        assert!(d.is_ejected(endpoint(0), t0 + 29 * S));
        assert!(!d.is_ejected(endpoint(0), t0 + 30 * S));
        assert_eq!(d.ejected_count(t0 + 30 * S), 0);

        // Ejected again right away: twice the base.
        let t1 = t0 + 31 * S;
        fail(&d, 0, UpstreamResult::ConnectFailure, 3, t1);
        assert!(d.is_ejected(endpoint(0), t1 + 59 * S));
        assert!(!d.is_ejected(endpoint(0), t1 + 60 * S));

        // Third time: three times.
        let t2 = t1 + 61 * S;
        fail(&d, 0, UpstreamResult::ConnectFailure, 3, t2);
        assert!(d.is_ejected(endpoint(0), t2 + 89 * S));
        assert!(!d.is_ejected(endpoint(0), t2 + 90 * S));

        // Failures while ejected do not extend the ejection.
        fail(&d, 0, UpstreamResult::ConnectFailure, 10, t2 + 10 * S);
        assert!(!d.is_ejected(endpoint(0), t2 + 90 * S));
        assert_eq!(d.ejections(endpoint(0)), 3);
    }

    #[test]
    fn multiplier_decays_while_healthy() {
        let d = OutlierDetector::new(config(), &endpoints(4));
        let t0 = Instant::now();
        fail(&d, 0, UpstreamResult::ConnectFailure, 3, t0);
        fail(&d, 0, UpstreamResult::ConnectFailure, 3, t0 + 30 * S);
        // Multiplier 2, ejected until t0 + 90 s. Two intervals back in
        // service bring it back to 0, so the next ejection is the base.
        let t1 = t0 + 90 * S + 20 * S;
        fail(&d, 0, UpstreamResult::ConnectFailure, 3, t1);
        assert!(d.is_ejected(endpoint(0), t1 + 29 * S));
        assert!(!d.is_ejected(endpoint(0), t1 + 30 * S));
    }

    #[test]
    fn ejection_time_is_capped() {
        let d = OutlierDetector::new(
            OutlierDetection {
                base_ejection_time: Duration::from_secs(200),
                ..config()
            },
            &endpoints(4),
        );
        let t0 = Instant::now();
        fail(&d, 0, UpstreamResult::ConnectFailure, 3, t0);
        let t1 = t0 + 200 * S;
        fail(&d, 0, UpstreamResult::ConnectFailure, 3, t1);
        assert!(d.is_ejected(endpoint(0), t1 + 299 * S));
        assert!(!d.is_ejected(endpoint(0), t1 + 300 * S));
    }

    #[test]
    fn max_ejection_percent_is_respected() {
        // 50 % of 4: two endpoints at most.
        let d = OutlierDetector::new(config(), &endpoints(4));
        let t = Instant::now();
        for e in 0..4 {
            fail(&d, e, UpstreamResult::Http5xx(503), 3, t);
        }
        assert_eq!(d.ejected_count(t), 2);
        assert_eq!(d.ejected(&endpoints(4), t), vec![true, true, false, false]);

        // Once one returns, the next failure of a refused endpoint ejects
        // it (the streak was kept).
        let later = t + 31 * S;
        assert_eq!(d.ejected_count(later), 0);
        d.record(endpoint(2), UpstreamResult::Http5xx(503), later);
        assert!(d.is_ejected(endpoint(2), later));
    }

    #[test]
    fn one_ejection_is_always_allowed() {
        let d = OutlierDetector::new(
            OutlierDetection {
                max_ejection_percent: 10,
                ..config()
            },
            &endpoints(3),
        );
        let t = Instant::now();
        for e in 0..3 {
            fail(&d, e, UpstreamResult::Timeout, 3, t);
        }
        assert_eq!(d.ejected_count(t), 1);

        let single = OutlierDetector::new(config(), &endpoints(1));
        fail(&single, 0, UpstreamResult::Timeout, 3, t);
        assert!(single.is_ejected(endpoint(0), t));
    }

    /// `split_external_local_origin_errors`: connect failures eject only
    /// through their own threshold, and 5xx responses only through theirs;
    /// a response resets the local count.
    #[test]
    fn local_failures_count_apart_when_split() {
        let d = OutlierDetector::new(
            OutlierDetection {
                consecutive_5xx: 2,
                consecutive_gateway_failure: 0,
                consecutive_local_origin_failure: Some(3),
                ..config()
            },
            &endpoints(4),
        );
        let t = Instant::now();
        // Two local failures, a 503 (resets the local count, one 5xx),
        // two more local failures: neither detector trips.
        fail(&d, 0, UpstreamResult::ConnectFailure, 2, t);
        assert!(!d.record(endpoint(0), UpstreamResult::Http5xx(503), t));
        fail(&d, 0, UpstreamResult::Reset, 2, t);
        assert!(!d.is_ejected(endpoint(0), t));
        // The third local failure in a row does.
        assert!(d.record(endpoint(0), UpstreamResult::Timeout, t));
        // 5xx responses trip their own detector, however many local
        // failures come between them.
        assert!(!d.record(endpoint(1), UpstreamResult::Http5xx(500), t));
        fail(&d, 1, UpstreamResult::ConnectFailure, 2, t);
        assert!(d.record(endpoint(1), UpstreamResult::Http5xx(500), t));
    }

    #[test]
    fn zero_threshold_disables_and_unknown_addresses_are_ignored() {
        let d = OutlierDetector::new(
            OutlierDetection {
                consecutive_5xx: 0,
                consecutive_gateway_failure: 0,
                ..config()
            },
            &endpoints(2),
        );
        let t = Instant::now();
        fail(&d, 0, UpstreamResult::ConnectFailure, 100, t);
        assert!(!d.is_ejected(endpoint(0), t));
        assert!(!d.record(endpoint(7), UpstreamResult::ConnectFailure, t));
        assert!(!d.is_ejected(endpoint(7), t));
    }

    #[test]
    fn a_new_endpoint_list_keeps_the_state_of_those_that_stay() {
        let d = OutlierDetector::new(
            OutlierDetection {
                max_ejection_percent: 100,
                ..config()
            },
            &endpoints(4),
        );
        let t = Instant::now();
        fail(&d, 0, UpstreamResult::ConnectFailure, 3, t);
        fail(&d, 2, UpstreamResult::ConnectFailure, 3, t);
        fail(&d, 1, UpstreamResult::ConnectFailure, 2, t);
        // Endpoint 2 leaves, 4 joins, the order changes.
        d.set_endpoints(&[endpoint(4), endpoint(3), endpoint(1), endpoint(0)]);
        assert!(d.is_ejected(endpoint(0), t), "still ejected");
        assert!(!d.is_ejected(endpoint(2), t), "forgotten");
        assert_eq!(d.ejected_count(t), 1);
        // Endpoint 1 kept its streak: one more failure ejects it.
        assert!(d.record(endpoint(1), UpstreamResult::ConnectFailure, t));
        // The newcomer starts clean.
        fail(&d, 4, UpstreamResult::ConnectFailure, 2, t);
        assert!(!d.is_ejected(endpoint(4), t));
        // One that comes back starts clean too.
        d.set_endpoints(&endpoints(4));
        assert!(!d.is_ejected(endpoint(2), t));
        assert_eq!(d.ejections(endpoint(2)), 0);
        assert_eq!(d.ejections(endpoint(0)), 1);
    }

    #[test]
    fn shared_across_threads() {
        let d = std::sync::Arc::new(OutlierDetector::new(config(), &endpoints(2)));
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
        assert!(d.is_ejected(endpoint(1), t));
        assert_eq!(d.ejections(endpoint(1)), 1);
    }
}
