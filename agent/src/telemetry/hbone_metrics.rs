//! The HBONE client's own metrics: tunnel openings that timed out, by
//! phase, and its TLS connections (open now, opened, closed and why).
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// `tcp_connect`, `tls_handshake`, `http2_handshake` or `connect` (the
/// `CONNECT` until its answer).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

/// Why a client connection closed: `idle`, `renewed` (the source's
/// certificate was renewed or forgotten), `released` (its pod was),
/// `keepalive` (no answer to a PING), `peer` (the peer closed it) or
/// `error`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    pub reason: &'static str,
}

#[derive(Clone, Default)]
pub struct HboneClientMetrics {
    pub timeouts: Family<PhaseLabels, Counter>,
    pub connections: Gauge,
    pub opened: Counter,
    pub closed: Family<CloseLabels, Counter>,
}

impl HboneClientMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "weir_hbone_client_timeouts",
            "HBONE tunnel openings that timed out, by phase",
            self.timeouts.clone(),
        );
        registry.register(
            "weir_hbone_client_connections",
            "HBONE client connections (mTLS to a peer's 15008) open now",
            self.connections.clone(),
        );
        registry.register(
            "weir_hbone_client_connections_opened",
            "HBONE client connections opened (TLS handshake done)",
            self.opened.clone(),
        );
        registry.register(
            "weir_hbone_client_connections_closed",
            "HBONE client connections closed, by reason",
            self.closed.clone(),
        );
    }

    pub fn timed_out(&self, phase: &'static str) {
        self.timeouts.get_or_create(&PhaseLabels { phase }).inc();
    }
}
