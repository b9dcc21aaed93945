//! A pooled connection's life after its handshakes: its stream count and
//! idle clock, and the task that drives it and retires it from the pool
//! when its source's certificate is renewed (or forgotten) or it has been
//! idle for the idle timeout. A retired connection takes no new streams
//! and closes when its last stream ends (h2 sends GOAWAY once no request
//! handle and no stream is left). Dead peers are found by the driver's
//! HTTP/2 PINGs, sent idle or not.
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::Connection;
use tokio::sync::{Notify, watch};

use super::{IdleCheck, Shared, TunnelKey, open::Io};
#[cfg(doc)]
use crate::proxy::idle::Watched;
use crate::proxy::{h2::Keepalive, idle::Activity};
use crate::telemetry::{
    burst::Burst,
    hbone_metrics::{CloseLabels, HboneClientMetrics},
    kernel_tcp::SharedLeg,
};

/// What the pool, the streams and the driver share of one connection.
pub(super) struct ConnectionState {
    streams: AtomicUsize,
    /// When its last stream ended (or it opened): the idle clock.
    idle_since: Mutex<Instant>,
    /// Its last stream ended: the driver looks at the idle clock again.
    stream_ended: Notify,
    closing: Mutex<Closing>,
    /// Its driver has returned: no stream can be opened on it.
    ended: AtomicBool,
    /// When the peer last sent anything: the keepalive PINGs only a
    /// connection quiet for its interval.
    pub(super) heard: Arc<Activity>,
    metrics: HboneClientMetrics,
    /// The kernel's figures of its socket, shared by its streams' records.
    pub(super) kernel_leg: Option<Arc<SharedLeg>>,
}

/// A close is counted once both its reason and the socket's end are known,
/// which come in either order.
#[derive(Default)]
struct Closing {
    reason: Option<&'static str>,
    io_closed: bool,
    counted: bool,
}

impl ConnectionState {
    pub(super) fn new(
        metrics: HboneClientMetrics,
        kernel_leg: Option<Arc<SharedLeg>>,
    ) -> Arc<ConnectionState> {
        Arc::new(ConnectionState {
            streams: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            stream_ended: Notify::new(),
            closing: Mutex::default(),
            ended: AtomicBool::new(false),
            heard: Activity::new(),
            metrics,
            kernel_leg,
        })
    }

    /// Whether its connection is gone (the pool skips it until its
    /// driver has taken it out).
    pub(super) fn is_ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    pub(super) fn streams(&self) -> usize {
        self.streams.load(Ordering::SeqCst)
    }

    /// Counts a stream; called with the pool locked, so a connection found
    /// idle there cannot gain one while it is being removed.
    pub(super) fn begin_stream(&self) {
        self.streams.fetch_add(1, Ordering::SeqCst);
    }

    pub(super) fn end_stream(&self) {
        if self.streams.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
            self.stream_ended.notify_one();
        }
    }

    /// Whether it has carried no stream for `idle_timeout`.
    pub(super) fn idle_for(&self, idle_timeout: Duration) -> bool {
        self.streams() == 0 && self.idle_deadline(idle_timeout) <= Instant::now()
    }

    fn idle_deadline(&self, idle_timeout: Duration) -> Instant {
        *self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) + idle_timeout
    }

    /// Why it closes; the first reason given stands (a retired
    /// connection's end is its retirement, not how the connection ends).
    pub(super) fn close_as(&self, reason: &'static str) {
        let mut closing = self.closing.lock().unwrap_or_else(|e| e.into_inner());
        closing.reason.get_or_insert(reason);
        self.count_close(&mut closing);
    }

    fn io_closed(&self) {
        let mut closing = self.closing.lock().unwrap_or_else(|e| e.into_inner());
        closing.io_closed = true;
        self.count_close(&mut closing);
    }

    fn count_close(&self, closing: &mut Closing) {
        if let (Some(reason), true, false) = (closing.reason, closing.io_closed, closing.counted) {
            closing.counted = true;
            self.metrics
                .closed
                .get_or_create(&CloseLabels { reason })
                .inc();
        }
    }
}

/// Counts its connection open until it is dropped with the connection's
/// socket (it rides in the socket's [`Watched`] wrapper).
pub(super) struct OpenGuard(Arc<ConnectionState>);

impl OpenGuard {
    pub(super) fn new(state: Arc<ConnectionState>) -> OpenGuard {
        state.metrics.opened.inc();
        state.metrics.connections.inc();
        OpenGuard(state)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.metrics.connections.dec();
        self.0.io_closed();
    }
}

/// Everything the driver of one pooled connection needs.
pub(super) struct Driver {
    pub shared: Arc<Shared>,
    pub key: TunnelKey,
    pub id: u64,
    pub state: Arc<ConnectionState>,
    /// The source certificate's serial it was opened with: it retires
    /// when the current one differs or the identity is forgotten.
    pub serial: String,
    pub idle_timeout: Duration,
    pub keepalive_failures: Arc<Burst>,
}

impl Driver {
    /// Drives the connection until it ends, pinging it and retiring it
    /// from the pool when its time comes. `renewals` carries the serial of
    /// the source's current certificate; its sender is dropped when the
    /// identity is forgotten.
    pub(super) async fn run(
        self,
        mut connection: Connection<Io, Bytes>,
        mut renewals: watch::Receiver<String>,
        keepalive: Keepalive,
    ) {
        let pings = keepalive.run(connection.ping_pong(), &self.state.heard);
        tokio::pin!(pings);
        // Until it leaves the pool; then only its end is awaited.
        let mut pooled = true;
        let end = loop {
            let idle_candidate = pooled && self.state.streams() == 0;
            let idle_at = self.state.idle_deadline(self.idle_timeout);
            tokio::select! {
                result = &mut connection => {
                    break match result {
                        Ok(()) => End::Peer,
                        Err(error) => End::Error(error),
                    };
                }
                () = &mut pings => break End::Keepalive,
                _ = renewals.wait_for(|current| *current != self.serial), if pooled => {
                    pooled = false;
                    self.retire("renewed");
                }
                () = self.state.stream_ended.notified() => {}
                () = tokio::time::sleep_until(idle_at.into()), if idle_candidate => {
                    // Checked again with the pool locked: a stream may have
                    // just begun.
                    match self.shared.remove_if_idle(&self.key, self.id, self.idle_timeout) {
                        IdleCheck::Removed => {
                            pooled = false;
                            self.state.close_as("idle");
                            tracing::debug!(peer = %self.key.address, "HBONE connection idle; closed");
                        }
                        IdleCheck::NotPooled => pooled = false,
                        IdleCheck::Busy => {}
                    }
                }
            }
        };
        self.state.ended.store(true, Ordering::SeqCst);
        self.ended(&end);
        // Dropping the connection closes its socket and fails any stream
        // still on it.
        drop(connection);
    }

    /// No new streams; it closes when its last one ends.
    fn retire(&self, reason: &'static str) {
        self.state.close_as(reason);
        drop(self.shared.remove(&self.key, self.id));
        tracing::debug!(
            peer = %self.key.address,
            source = %self.key.source,
            streams = self.state.streams(),
            reason,
            "HBONE connection retired; it closes when its last stream ends"
        );
    }

    fn ended(&self, end: &End) {
        let reason = match end {
            End::Peer => "peer",
            End::Keepalive => "keepalive",
            End::Error(_) => "error",
        };
        self.state.close_as(reason);
        drop(self.shared.remove(&self.key, self.id));
        match end {
            End::Keepalive => {
                if let Some(suppressed) = self.keepalive_failures.hit() {
                    tracing::warn!(
                        peer = %self.key.address,
                        source = %self.key.source,
                        destination = %self.key.destination,
                        streams = self.state.streams(),
                        suppressed,
                        "HBONE peer stopped answering keepalive pings; connection closed"
                    );
                }
            }
            End::Error(error) => {
                tracing::debug!(%error, peer = %self.key.address, "HBONE connection ended")
            }
            End::Peer => tracing::debug!(peer = %self.key.address, "HBONE connection ended"),
        }
    }
}

/// How a pooled connection ended.
enum End {
    /// Closed cleanly (by the peer, or by us once retired and done).
    Peer,
    /// A PING went unanswered for the keepalive timeout.
    Keepalive,
    Error(h2::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed(metrics: &HboneClientMetrics, reason: &'static str) -> u64 {
        metrics.closed.get_or_create(&CloseLabels { reason }).get()
    }

    #[test]
    fn a_close_is_counted_once_with_its_first_reason_whichever_comes_first() {
        let metrics = HboneClientMetrics::default();
        // Retired, then its socket closes after its last stream.
        let retired = ConnectionState::new(metrics.clone(), None);
        let io = OpenGuard::new(retired.clone());
        assert_eq!(metrics.connections.get(), 1);
        retired.close_as("renewed");
        retired.close_as("peer");
        assert_eq!(closed(&metrics, "renewed"), 0, "still open");
        drop(io);
        assert_eq!(closed(&metrics, "renewed"), 1);
        assert_eq!(closed(&metrics, "peer"), 0);
        // Its socket closed first (a keepalive timeout), the reason after.
        let dead = ConnectionState::new(metrics.clone(), None);
        drop(OpenGuard::new(dead.clone()));
        dead.close_as("keepalive");
        dead.close_as("peer");
        assert_eq!(closed(&metrics, "keepalive"), 1);
        assert_eq!(metrics.connections.get(), 0);
        assert_eq!(metrics.opened.get(), 2);
    }

    #[test]
    fn a_connection_is_idle_only_without_streams_for_the_whole_timeout() {
        let state = ConnectionState::new(HboneClientMetrics::default(), None);
        assert!(state.idle_for(Duration::ZERO));
        assert!(!state.idle_for(Duration::from_secs(60)));
        state.begin_stream();
        assert!(!state.idle_for(Duration::ZERO), "a stream is open");
        state.end_stream();
        assert!(state.idle_for(Duration::ZERO));
        assert_eq!(state.streams(), 0);
    }
}
