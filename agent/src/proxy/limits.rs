//! Timeouts and connection limits of every listener the agent serves, as
//! the `proxy:` section of the config sets them (live: a reload applies to
//! connections accepted after it), with what they refuse or cut counted in
//! metrics and logged once per burst.
//!
//! - a cap on the connections the node's listeners hold, per node and per
//!   pod: past it a new connection is closed at accept ([`Limits::admit`]);
//! - the timeouts each phase of a connection runs under ([`Settings`]),
//!   applied by the listeners (`hbone.rs`, `http/server.rs`) and the relay
//!   (`idle.rs`).
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use super::PodHandle;
use crate::{config::ProxyConfig, telemetry::burst::Burst};

/// How long a peer has to answer an HTTP/2 PING on an HBONE connection
/// before the connection is closed, and how often one is sent (ztunnel's
/// HBONE pings: every 10 s, 20 s to answer).
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// After a GOAWAY for an idle HTTP/2 connection, how long the peer has to
/// finish before the connection is dropped (Envoy's `drain_timeout`).
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Connections each admin port holds at once (15020 and 15021 face the
/// network; 15000 serves `weir trace` streams).
pub const ADMIN_MAX_CONNECTIONS: usize = 1024;

/// The limits in force, from the `proxy:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub handshake_timeout: Duration,
    pub request_headers_timeout: Duration,
    /// `None`: relays and idle HTTP/2 connections stay open.
    pub idle_timeout: Option<Duration>,
    pub stream_idle_timeout: Option<Duration>,
    pub max_connections: usize,
    pub max_connections_per_pod: usize,
}

impl From<&ProxyConfig> for Settings {
    fn from(config: &ProxyConfig) -> Self {
        let optional = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
        let count = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Settings {
            handshake_timeout: Duration::from_millis(config.handshake_timeout_ms),
            request_headers_timeout: Duration::from_millis(config.request_headers_timeout_ms),
            idle_timeout: optional(config.idle_timeout_ms),
            stream_idle_timeout: optional(config.stream_idle_timeout_ms),
            max_connections: count(config.max_connections),
            max_connections_per_pod: count(config.max_connections_per_pod),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings::from(&ProxyConfig::default())
    }
}

/// Which listener a connection came to (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Listener {
    Outbound,
    Inbound,
    Hbone,
    Admin,
}

impl Listener {
    pub fn name(self) -> &'static str {
        match self {
            Listener::Outbound => "outbound",
            Listener::Inbound => "inbound",
            Listener::Hbone => "hbone",
            Listener::Admin => "admin",
        }
    }
}

/// The phase a connection was cut in for taking too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// HBONE: the TLS handshake (with the certificate it needs).
    TlsHandshake,
    /// HBONE: the HTTP/2 preface and first complete CONNECT after TLS.
    HboneHeaders,
    /// L7 or admin HTTP: a request's headers.
    RequestHeaders,
    /// A relay or an HTTP/2 connection with nothing moving.
    Idle,
    /// L7: a request whose bodies stopped moving.
    StreamIdle,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::TlsHandshake => "tls_handshake",
            Phase::HboneHeaders => "hbone_headers",
            Phase::RequestHeaders => "request_headers",
            Phase::Idle => "idle",
            Phase::StreamIdle => "stream_idle",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    listener: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

/// `weir_connections_refused_total{listener,reason}`,
/// `weir_accept_errors_total{listener}` and
/// `weir_connection_timeouts_total{phase}`.
#[derive(Clone, Default)]
pub struct LimitMetrics {
    refused: Family<RefusedLabels, Counter>,
    accept_errors: Family<ListenerLabels, Counter>,
    timeouts: Family<PhaseLabels, Counter>,
}

impl LimitMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "weir_connections_refused",
            "Connections closed at accept: a connection limit was reached",
            self.refused.clone(),
        );
        registry.register(
            "weir_accept_errors",
            "Failed accepts (out of descriptors or buffers), each followed by a pause",
            self.accept_errors.clone(),
        );
        registry.register(
            "weir_connection_timeouts",
            "Connections or requests ended for taking too long, by phase",
            self.timeouts.clone(),
        );
    }
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NodeLimit,
    PodLimit,
    /// An admin port's own limit.
    ListenerLimit,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Refusal::NodeLimit => "node_limit",
            Refusal::PodLimit => "pod_limit",
            Refusal::ListenerLimit => "listener_limit",
        }
    }
}

/// The node's limits and what they refused.
pub struct Limits {
    settings: ArcSwap<Settings>,
    node_connections: Arc<AtomicUsize>,
    metrics: LimitMetrics,
    /// `weir_connection_timeouts_total` by phase, in [`Phase`] order.
    timeout_counters: [Counter; 5],
    refused: Burst,
    accept_errors: [Burst; 4],
    timeouts: Burst,
}

impl Limits {
    pub fn new(settings: Settings, metrics: LimitMetrics) -> Limits {
        let timeout_counters = [
            Phase::TlsHandshake,
            Phase::HboneHeaders,
            Phase::RequestHeaders,
            Phase::Idle,
            Phase::StreamIdle,
        ]
        .map(|phase| {
            metrics
                .timeouts
                .get_or_create(&PhaseLabels {
                    phase: phase.name(),
                })
                .clone()
        });
        Limits {
            settings: ArcSwap::from_pointee(settings),
            node_connections: Arc::default(),
            metrics,
            timeout_counters,
            refused: Burst::default(),
            accept_errors: Default::default(),
            timeouts: Burst::default(),
        }
    }

    /// The limits for a connection starting now.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.load_full()
    }

    /// A reload's `proxy:` section, for connections accepted from now on.
    pub fn set(&self, settings: Settings) {
        if *self.settings.load_full() != settings {
            tracing::info!(?settings, "proxy limits changed");
            self.settings.store(Arc::new(settings));
        }
    }

    /// Connections the node's listeners hold now.
    pub fn node_connections(&self) -> usize {
        self.node_connections.load(Ordering::Relaxed)
    }

    /// A permit for a connection `pod`'s listener just accepted, or the
    /// refusal (counted, and logged once per burst).
    pub fn admit(&self, pod: &Arc<PodHandle>, listener: Listener) -> Result<Permit, Refusal> {
        let settings = self.settings.load();
        let node = Slot::take(&self.node_connections, settings.max_connections);
        let pod_slot = Slot::take(&pod.connections, settings.max_connections_per_pod);
        match (node, pod_slot) {
            (Some(node), Some(pod_slot)) => Ok(Permit {
                _node: node,
                _pod: pod_slot,
            }),
            (node, _) => {
                let refusal = if node.is_none() {
                    Refusal::NodeLimit
                } else {
                    Refusal::PodLimit
                };
                self.refuse(listener, refusal, &pod.id, settings.max_connections_per_pod);
                Err(refusal)
            }
        }
    }

    /// Counts and logs (once per burst) a connection refused at accept.
    pub fn refuse(&self, listener: Listener, refusal: Refusal, pod: &str, pod_limit: usize) {
        self.metrics
            .refused
            .get_or_create(&RefusedLabels {
                listener: listener.name(),
                reason: refusal.reason(),
            })
            .inc();
        if let Some(suppressed) = self.refused.hit() {
            let settings = self.settings.load();
            tracing::warn!(
                listener = listener.name(),
                reason = refusal.reason(),
                pod,
                node_connections = self.node_connections(),
                max_connections = settings.max_connections,
                max_connections_per_pod = pod_limit,
                suppressed,
                "connection refused: connection limit reached (further refusals in the next 10 s are counted, not logged)"
            );
        }
    }

    /// Counts and logs (once per burst) an accept that failed.
    pub fn accept_failed(&self, listener: Listener, error: &std::io::Error, pause: Duration) {
        self.metrics
            .accept_errors
            .get_or_create(&ListenerLabels {
                listener: listener.name(),
            })
            .inc();
        let burst = &self.accept_errors[listener as usize];
        if let Some(suppressed) = burst.hit() {
            tracing::warn!(
                listener = listener.name(),
                %error,
                pause_ms = pause.as_millis() as u64,
                suppressed,
                "accept failed; pausing the listener (further failures in the next 10 s are counted, not logged)"
            );
        }
    }

    /// The counter of connections or requests cut in `phase`.
    pub fn timeout_counter(&self, phase: Phase) -> Counter {
        self.timeout_counters[phase as usize].clone()
    }

    /// Counts a connection or request cut in `phase`; hostile phases (a
    /// handshake or headers that never finish) are logged once per burst.
    pub fn timed_out(&self, phase: Phase, listener: &'static str, peer: &dyn std::fmt::Display) {
        self.timeout_counters[phase as usize].inc();
        let hostile = matches!(
            phase,
            Phase::TlsHandshake | Phase::HboneHeaders | Phase::RequestHeaders
        );
        if hostile && let Some(suppressed) = self.timeouts.hit() {
            tracing::warn!(
                listener,
                phase = phase.name(),
                src = %peer,
                suppressed,
                "connection timed out before its first request (further timeouts in the next 10 s are counted, not logged)"
            );
        }
    }
}

/// A connection's place under the node's and its pod's limits, given back
/// when the connection ends.
pub struct Permit {
    _node: Slot,
    _pod: Slot,
}

/// One unit of a shared count, released on drop.
pub struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// A unit of `count` if fewer than `max` are taken.
    pub fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |taken| {
                (taken < max).then_some(taken + 1)
            })
            .ok()
            .map(|_| Slot(count.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_stop_at_the_limit_and_come_back_on_drop() {
        let count = Arc::new(AtomicUsize::new(0));
        let first = Slot::take(&count, 2);
        let second = Slot::take(&count, 2);
        assert!(first.is_some() && second.is_some());
        assert!(Slot::take(&count, 2).is_none());
        assert_eq!(count.load(Ordering::Relaxed), 2);
        drop(first);
        assert!(Slot::take(&count, 2).is_some());
        drop(second);
        assert_eq!(count.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn settings_come_from_the_config_zero_meaning_never() {
        let settings = Settings::from(&ProxyConfig {
            idle_timeout_ms: 0,
            ..ProxyConfig::default()
        });
        assert_eq!(settings.idle_timeout, None);
        assert_eq!(settings.handshake_timeout, Duration::from_secs(10));
        assert_eq!(settings.stream_idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(settings.request_headers_timeout, Duration::from_secs(10));
    }
}
