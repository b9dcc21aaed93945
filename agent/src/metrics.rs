//! Prometheus metrics (`:15020/metrics`, prometheus-client): Istio's
//! standard TCP metrics with Istio's label names, so existing dashboards
//! work, and the agent's own (eBPF counters, certificates, pods). Labels
//! never carry raw IPs or ports, so cardinality stays bounded by workloads.
use std::sync::{
    Mutex,
    atomic::{AtomicU64, Ordering},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::identity::Identity;

/// The labels of Istio's TCP metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CounterLabels {
    pub counter: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

pub struct Metrics {
    registry: Registry,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_sent: Family<TcpLabels, Counter>,
    pub tcp_received: Family<TcpLabels, Counter>,
    ebpf: Family<CounterLabels, Counter>,
    ebpf_seen: Mutex<Vec<u64>>,
    pub certificate_expiry: Family<IdentityLabels, Gauge>,
    pub enrolled_pods: Gauge,
    pub active_connections: Gauge,
    pub policy_denials: Counter,
    pub tls_failures: Counter,
    pub xds_ready: Gauge,
    scrapes: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let metrics = Metrics {
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            ebpf: Family::default(),
            ebpf_seen: Mutex::new(Vec::new()),
            certificate_expiry: Family::default(),
            enrolled_pods: Gauge::default(),
            active_connections: Gauge::default(),
            policy_denials: Counter::default(),
            tls_failures: Counter::default(),
            xds_ready: Gauge::default(),
            scrapes: AtomicU64::new(0),
            registry: Registry::default(),
        };
        // prometheus-client appends `_total` to counters.
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            metrics.tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            metrics.tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the destination",
            metrics.tcp_sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the destination",
            metrics.tcp_received.clone(),
        );
        registry.register(
            "weir_ebpf_events",
            "Events counted by the eBPF programs",
            metrics.ebpf.clone(),
        );
        registry.register(
            "weir_certificate_expiry_seconds",
            "Expiry (Unix time) of each workload certificate held",
            metrics.certificate_expiry.clone(),
        );
        registry.register(
            "weir_enrolled_pods",
            "Pods enrolled on this node",
            metrics.enrolled_pods.clone(),
        );
        registry.register(
            "weir_active_connections",
            "Connections being proxied",
            metrics.active_connections.clone(),
        );
        registry.register(
            "weir_policy_denials",
            "Connections denied by an authorization policy",
            metrics.policy_denials.clone(),
        );
        registry.register(
            "weir_tls_failures",
            "mTLS handshakes that failed",
            metrics.tls_failures.clone(),
        );
        registry.register(
            "weir_xds_ready",
            "1 once the control plane's first full state is applied",
            metrics.xds_ready.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// Brings the eBPF counters up to date (they are read at scrape time).
    pub fn observe_ebpf(&self, values: &[u64]) {
        let mut seen = self.ebpf_seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.resize(values.len(), 0);
        for (index, (value, last)) in values.iter().zip(seen.iter_mut()).enumerate() {
            if let Some(name) = weir_common::counter::NAMES.get(index) {
                self.ebpf
                    .get_or_create(&CounterLabels { counter: name })
                    .inc_by(value.saturating_sub(*last));
            }
            *last = (*last).max(*value);
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        self.scrapes.fetch_add(1, Ordering::Relaxed);
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

/// Istio's principal label form: `spiffe://td/ns/x/sa/y`.
pub fn principal(identity: Option<&Identity>) -> String {
    identity
        .map(|id| id.to_string())
        .unwrap_or_else(|| "unknown".into())
}
