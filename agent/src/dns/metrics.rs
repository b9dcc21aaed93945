//! ztunnel's DNS metrics (names, labels and buckets as ztunnel's
//! `src/dns/metrics.rs` registers them), and Weir's count of the queries
//! the node answered itself.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use crate::telemetry::metrics::Label;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    /// Lowercase record type (`a`, `aaaa`, `srv`…; `other` beyond the
    /// common ones, so the label stays bounded).
    pub request_query_type: &'static str,
    /// `udp` or `tcp`.
    pub request_protocol: &'static str,
    pub source_canonical_service: Label,
    pub source_canonical_revision: Label,
}

/// ztunnel's upstream latency buckets, in seconds.
const UPSTREAM_SECONDS_BUCKETS: [f64; 6] = [0.001, 0.005, 0.01, 0.1, 1.0, 5.0];

fn upstream_histogram() -> Histogram {
    Histogram::new(UPSTREAM_SECONDS_BUCKETS)
}

pub struct DnsMetrics {
    /// Every query, answered or forwarded.
    pub requests: Family<DnsLabels, Counter>,
    /// Queries the node answered from what it knows.
    pub answered: Family<DnsLabels, Counter>,
    /// Queries forwarded to the resolver the application asked.
    pub upstream_requests: Family<DnsLabels, Counter>,
    /// Forwarded queries that got no answer (timeout, refused, unreadable).
    pub upstream_failures: Family<DnsLabels, Counter>,
    pub upstream_duration: Family<DnsLabels, Histogram, fn() -> Histogram>,
    /// Queries dropped unread because the pod had too many in flight.
    pub dropped: Counter,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        DnsMetrics {
            requests: Family::default(),
            answered: Family::default(),
            upstream_requests: Family::default(),
            upstream_failures: Family::default(),
            upstream_duration: Family::new_with_constructor(upstream_histogram),
            dropped: Counter::default(),
        }
    }
}

impl DnsMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "istio_dns_requests",
            "DNS queries from pods with DNS capture, answered or forwarded",
            self.requests.clone(),
        );
        registry.register(
            "istio_dns_upstream_requests",
            "DNS queries forwarded to the resolver the application asked",
            self.upstream_requests.clone(),
        );
        registry.register(
            "istio_dns_upstream_failures",
            "Forwarded DNS queries that got no answer",
            self.upstream_failures.clone(),
        );
        registry.register(
            "istio_dns_upstream_request_duration_seconds",
            "Time the resolver took to answer a forwarded DNS query",
            self.upstream_duration.clone(),
        );
        registry.register(
            "weir_dns_answered",
            "DNS queries the node answered from the services it knows",
            self.answered.clone(),
        );
        registry.register(
            "weir_dns_dropped",
            "DNS queries dropped because their pod had too many in flight",
            self.dropped.clone(),
        );
    }
}

/// The label of a record type.
pub fn query_type(record_type: hickory_proto::rr::RecordType) -> &'static str {
    use hickory_proto::rr::RecordType;
    match record_type {
        RecordType::A => "a",
        RecordType::AAAA => "aaaa",
        RecordType::CNAME => "cname",
        RecordType::HTTPS => "https",
        RecordType::MX => "mx",
        RecordType::NS => "ns",
        RecordType::PTR => "ptr",
        RecordType::SOA => "soa",
        RecordType::SRV => "srv",
        RecordType::SVCB => "svcb",
        RecordType::TXT => "txt",
        RecordType::ANY => "any",
        _ => "other",
    }
}
