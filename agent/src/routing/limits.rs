//! Envoy's circuit breakers for one cluster: caps on connections, pending
//! requests, active requests and concurrent retries, so that a slow or
//! failing upstream sheds load at the proxy instead of queueing without
//! bound.
//!
//! Each admission is a guard that gives its slot back on drop. Guards own an
//! `Arc` of the counters, so they are `'static` and can move into spawned
//! tasks. Admission is exact: a compare-and-swap loop never lets a counter
//! pass its limit, even under contention.
//!
//! On overflow the proxy answers 503 with `x-weir-overflow:
//! <`[`Overflow::reason`]`>` and Envoy's response flag `UO`, except for
//! retries: an overflowing retry is simply not made and the last upstream
//! response is returned (Envoy's `upstream_rq_retry_overflow`).

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use super::Thresholds;

/// Envoy's response flag for a request refused by a circuit breaker.
pub const OVERFLOW_RESPONSE_FLAG: &str = "UO";

/// Header naming the limit that refused a request.
pub const OVERFLOW_HEADER: &str = "x-weir-overflow";

/// Which limit refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Overflow {
    Connections,
    PendingRequests,
    Requests,
    Retries,
}

impl Overflow {
    /// Short value for the `x-weir-overflow` header and logs: the Envoy
    /// threshold's name.
    pub fn reason(&self) -> &'static str {
        match self {
            Overflow::Connections => "max_connections",
            Overflow::PendingRequests => "max_pending_requests",
            Overflow::Requests => "max_requests",
            Overflow::Retries => "max_retries",
        }
    }

    /// Envoy's response flag (`UO`, upstream overflow).
    pub fn response_flag(&self) -> &'static str {
        OVERFLOW_RESPONSE_FLAG
    }
}

impl std::fmt::Display for Overflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "circuit breaker overflow: {}", self.reason())
    }
}

impl std::error::Error for Overflow {}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    pending: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
    /// Signalled when a connection closes or goes back idle, for requests
    /// waiting for one.
    released: tokio::sync::Notify,
}

/// What a request waiting for a connection got.
#[derive(Debug)]
pub enum Admission<T> {
    /// A connection someone else freed.
    Reuse(T),
    /// A connection slot, to open a new connection with; the request stays
    /// pending while it opens.
    Open(ConnectionGuard, PendingGuard),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Connections,
    Pending,
    Requests,
    Retries,
}

impl Counters {
    fn get(&self, kind: Kind) -> &AtomicU64 {
        match kind {
            Kind::Connections => &self.connections,
            Kind::Pending => &self.pending,
            Kind::Requests => &self.requests,
            Kind::Retries => &self.retries,
        }
    }
}

/// One cluster's limits and live counts.
#[derive(Debug)]
pub struct CircuitBreaker {
    thresholds: Thresholds,
    counters: Arc<Counters>,
}

impl CircuitBreaker {
    /// Shared by every task of the cluster, hence the `Arc`.
    pub fn new(thresholds: Thresholds) -> Arc<CircuitBreaker> {
        Arc::new(CircuitBreaker {
            thresholds,
            counters: Arc::default(),
        })
    }

    pub fn thresholds(&self) -> &Thresholds {
        &self.thresholds
    }

    /// A request sent (or about to be sent) upstream: `max_requests`.
    pub fn try_request(&self) -> Result<RequestGuard, Overflow> {
        self.acquire(Kind::Requests, u64::from(self.thresholds.max_requests))
            .map(|_slot| RequestGuard { _slot })
            .ok_or(Overflow::Requests)
    }

    /// A request waiting for a connection: `max_pending_requests`.
    pub fn try_pending(&self) -> Result<PendingGuard, Overflow> {
        self.acquire(
            Kind::Pending,
            u64::from(self.thresholds.max_pending_requests),
        )
        .map(|_slot| PendingGuard { _slot })
        .ok_or(Overflow::PendingRequests)
    }

    /// An upstream connection: `max_connections`.
    pub fn try_connection(&self) -> Result<ConnectionGuard, Overflow> {
        self.acquire(
            Kind::Connections,
            u64::from(self.thresholds.max_connections),
        )
        .map(|_slot| ConnectionGuard { _slot })
        .ok_or(Overflow::Connections)
    }

    /// For a request that found no free connection: a connection slot, or
    /// else a wait until `reuse` finds a freed connection or a slot comes
    /// back (Envoy's pending request), all the while holding one of
    /// `max_pending_requests`. Without a pending slot the request overflows
    /// at once. `make_room` runs only when every connection slot is taken,
    /// before waiting: it may close an idle connection that holds one.
    pub async fn connection_or_wait<T>(
        &self,
        mut reuse: impl FnMut() -> Option<T>,
        mut make_room: impl FnMut(),
    ) -> Result<Admission<T>, Overflow> {
        let pending = self.try_pending()?;
        loop {
            // Registered before looking, so a release in between is not
            // missed.
            let released = self.counters.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(found) = reuse() {
                return Ok(Admission::Reuse(found));
            }
            if let Ok(connection) = self.try_connection() {
                return Ok(Admission::Open(connection, pending));
            }
            make_room();
            released.await;
        }
    }

    /// A connection went back idle: a waiting request may take it.
    pub fn connection_idle(&self) {
        self.counters.released.notify_waiters();
    }

    /// A retry in flight: limited by [`retry_limit`](Self::retry_limit).
    pub fn try_retry(&self) -> Result<RetryGuard, Overflow> {
        self.acquire(Kind::Retries, self.retry_limit())
            .map(|_slot| RetryGuard { _slot })
            .ok_or(Overflow::Retries)
    }

    /// Concurrent retries allowed now. With a retry budget, as in Envoy:
    /// `max(min_retry_concurrency, budget_percent % of (active + pending
    /// requests))`, rounded down; otherwise `max_retries`.
    pub fn retry_limit(&self) -> u64 {
        match self.thresholds.retry_budget {
            None => u64::from(self.thresholds.max_retries),
            Some(budget) => {
                let active = self.active_requests() + self.pending_requests();
                // `as` saturates: a negative or NaN percent gives 0.
                let share = (budget.budget_percent / 100.0 * active as f64) as u64;
                share.max(u64::from(budget.min_retry_concurrency))
            }
        }
    }

    pub fn active_requests(&self) -> u64 {
        self.counters.requests.load(Ordering::Relaxed)
    }

    pub fn pending_requests(&self) -> u64 {
        self.counters.pending.load(Ordering::Relaxed)
    }

    pub fn active_connections(&self) -> u64 {
        self.counters.connections.load(Ordering::Relaxed)
    }

    pub fn active_retries(&self) -> u64 {
        self.counters.retries.load(Ordering::Relaxed)
    }

    fn acquire(&self, kind: Kind, limit: u64) -> Option<Slot> {
        let counter = self.counters.get(kind);
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        Some(Slot {
            counters: self.counters.clone(),
            kind,
        })
    }
}

/// One taken slot; gives it back on drop.
#[derive(Debug)]
struct Slot {
    counters: Arc<Counters>,
    kind: Kind,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counters.get(self.kind).fetch_sub(1, Ordering::AcqRel);
        if self.kind == Kind::Connections {
            self.counters.released.notify_waiters();
        }
    }
}

/// Holds one of `max_requests` until dropped.
#[derive(Debug)]
pub struct RequestGuard {
    _slot: Slot,
}

/// Holds one of `max_pending_requests` until dropped.
#[derive(Debug)]
pub struct PendingGuard {
    _slot: Slot,
}

/// Holds one of `max_connections` until dropped.
#[derive(Debug)]
pub struct ConnectionGuard {
    _slot: Slot,
}

/// Holds one concurrent retry until dropped.
#[derive(Debug)]
pub struct RetryGuard {
    _slot: Slot,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::RetryBudget;

    fn thresholds(n: u32) -> Thresholds {
        Thresholds {
            max_connections: n,
            max_pending_requests: n,
            max_requests: n,
            max_retries: n,
            retry_budget: None,
        }
    }

    #[tokio::test]
    async fn a_request_waits_for_a_connection_within_the_pending_limit() {
        let cb = CircuitBreaker::new(Thresholds {
            max_connections: 1,
            max_pending_requests: 1,
            ..thresholds(10)
        });
        let first = cb.try_connection().unwrap();
        // One may wait; a second waiter overflows on pending.
        let waiter = {
            let cb = cb.clone();
            tokio::spawn(async move {
                match cb.connection_or_wait(|| None::<()>, || {}).await {
                    Ok(Admission::Open(connection, pending)) => Some((connection, pending)),
                    _ => None,
                }
            })
        };
        while cb.pending_requests() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            cb.connection_or_wait(|| None::<()>, || {})
                .await
                .unwrap_err(),
            Overflow::PendingRequests
        );
        // The first connection closes: the waiter gets its slot.
        drop(first);
        let connection = waiter.await.unwrap();
        assert!(connection.is_some());
        assert_eq!(cb.active_connections(), 1);
        assert_eq!(cb.pending_requests(), 1, "pending while it opens");
        drop(connection);

        // A connection going back idle wakes a waiter that reuses it.
        let _busy = cb.try_connection().unwrap();
        let idle = Arc::new(std::sync::Mutex::new(None));
        let waiter = {
            let (cb, idle) = (cb.clone(), idle.clone());
            tokio::spawn(async move {
                match cb
                    .connection_or_wait(|| idle.lock().unwrap().take(), || {})
                    .await
                {
                    Ok(Admission::Reuse(value)) => Some(value),
                    _ => None,
                }
            })
        };
        while cb.pending_requests() == 0 {
            tokio::task::yield_now().await;
        }
        *idle.lock().unwrap() = Some(42);
        cb.connection_idle();
        assert_eq!(waiter.await.unwrap(), Some(42));
        assert_eq!(cb.pending_requests(), 0);
    }

    #[test]
    fn limits_are_exact_and_guards_release() {
        let cb = CircuitBreaker::new(thresholds(2));
        let a = cb.try_request().unwrap();
        let b = cb.try_request().unwrap();
        assert_eq!(cb.try_request().unwrap_err(), Overflow::Requests);
        assert_eq!(cb.active_requests(), 2);
        drop(a);
        assert_eq!(cb.active_requests(), 1);
        let c = cb.try_request().unwrap();
        assert!(cb.try_request().is_err());
        drop((b, c));
        assert_eq!(cb.active_requests(), 0);

        let p: Vec<_> = (0..2).map(|_| cb.try_pending().unwrap()).collect();
        assert_eq!(cb.try_pending().unwrap_err(), Overflow::PendingRequests);
        assert_eq!(cb.pending_requests(), 2);
        let k: Vec<_> = (0..2).map(|_| cb.try_connection().unwrap()).collect();
        assert_eq!(cb.try_connection().unwrap_err(), Overflow::Connections);
        assert_eq!(cb.active_connections(), 2);
        let r: Vec<_> = (0..2).map(|_| cb.try_retry().unwrap()).collect();
        assert_eq!(cb.try_retry().unwrap_err(), Overflow::Retries);
        assert_eq!(cb.active_retries(), 2);
        drop((p, k, r));
        assert_eq!(
            (
                cb.pending_requests(),
                cb.active_connections(),
                cb.active_retries()
            ),
            (0, 0, 0)
        );
    }

    #[test]
    fn zero_limit_refuses_everything() {
        let cb = CircuitBreaker::new(thresholds(0));
        assert!(cb.try_request().is_err());
        assert!(cb.try_retry().is_err());
        assert_eq!(cb.active_requests(), 0);
    }

    #[test]
    fn guards_outlive_the_breaker_and_move_into_tasks() {
        let cb = CircuitBreaker::new(thresholds(1));
        let guard = cb.try_request().unwrap();
        let handle = std::thread::spawn(move || drop(guard));
        handle.join().unwrap();
        assert_eq!(cb.active_requests(), 0);

        fn is_static<T: Send + Sync + 'static>(_: &T) {}
        let g = cb.try_request().unwrap();
        is_static(&g);
        drop(cb);
        drop(g);
    }

    #[test]
    fn retry_budget_arithmetic() {
        let cb = CircuitBreaker::new(Thresholds {
            max_retries: 1,
            retry_budget: Some(RetryBudget {
                budget_percent: 20.0,
                min_retry_concurrency: 3,
            }),
            ..Thresholds::default()
        });
        // Floor when idle.
        assert_eq!(cb.retry_limit(), 3);
        // 20 % of 19 is 3.8 → 3; of 20 is 4; pending requests count too.
        let requests: Vec<_> = (0..19).map(|_| cb.try_request().unwrap()).collect();
        assert_eq!(cb.retry_limit(), 3);
        let pending = cb.try_pending().unwrap();
        assert_eq!(cb.retry_limit(), 4);
        let retries: Vec<_> = (0..4).map(|_| cb.try_retry().unwrap()).collect();
        assert_eq!(cb.try_retry().unwrap_err(), Overflow::Retries);
        drop(retries);
        drop(pending);
        drop(requests);
        // Budget replaces max_retries (1) even when idle.
        let floor: Vec<_> = (0..3).map(|_| cb.try_retry().unwrap()).collect();
        assert!(cb.try_retry().is_err());
        drop(floor);

        let big = CircuitBreaker::new(Thresholds {
            max_requests: 1000,
            retry_budget: Some(RetryBudget {
                budget_percent: 50.0,
                min_retry_concurrency: 0,
            }),
            ..Thresholds::default()
        });
        let _r: Vec<_> = (0..101).map(|_| big.try_request().unwrap()).collect();
        assert_eq!(big.retry_limit(), 50);
    }

    #[test]
    fn exact_under_contention() {
        let cb = CircuitBreaker::new(thresholds(10));
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let cb = cb.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for _ in 0..100 {
                        if let Ok(g) = cb.try_request() {
                            held.push(g);
                        }
                    }
                    let n = held.len();
                    barrier.wait();
                    n
                })
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 10);
        assert_eq!(cb.active_requests(), 0);
    }

    #[test]
    fn reasons() {
        assert_eq!(Overflow::Connections.reason(), "max_connections");
        assert_eq!(Overflow::PendingRequests.reason(), "max_pending_requests");
        assert_eq!(Overflow::Requests.reason(), "max_requests");
        assert_eq!(Overflow::Retries.reason(), "max_retries");
        assert_eq!(Overflow::Requests.response_flag(), "UO");
    }
}
