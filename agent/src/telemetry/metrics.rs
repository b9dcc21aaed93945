//! Prometheus metrics (`:15020/metrics`, prometheus-client): Istio's
//! standard TCP metrics with Istio's label names, so existing dashboards
//! work, and the agent's own (eBPF counters, certificates, pods). Labels
//! never carry raw IPs or ports, so cardinality stays bounded by workloads.
use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::security::identity::{CaError, Identity};

/// The labels of Istio's TCP metrics, in ztunnel's order.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: Label,
    pub source_canonical_service: Label,
    pub source_canonical_revision: Label,
    pub source_workload_namespace: Label,
    pub source_principal: Label,
    pub source_app: Label,
    pub source_version: Label,
    pub source_cluster: Label,
    pub source_region: Label,
    pub source_zone: Label,
    pub destination_service: Label,
    pub destination_service_namespace: Label,
    pub destination_service_name: Label,
    pub destination_workload: Label,
    pub destination_canonical_service: Label,
    pub destination_canonical_revision: Label,
    pub destination_workload_namespace: Label,
    pub destination_principal: Label,
    pub destination_app: Label,
    pub destination_version: Label,
    pub destination_cluster: Label,
    pub destination_region: Label,
    pub destination_zone: Label,
    pub request_protocol: &'static str,
    pub response_flags: Label,
    pub connection_security_policy: &'static str,
}

/// One end of a connection as Istio's labels describe it; `unknown` for
/// what is not known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub workload: Label,
    pub namespace: Label,
    pub principal: Label,
    /// Istio's canonical service and revision, which are also `app` and
    /// `version` (as ztunnel reports them).
    pub canonical_service: Label,
    pub canonical_revision: Label,
    pub cluster: Label,
    pub region: Label,
    pub zone: Label,
}

/// A label value: `unknown` and other fixed values borrowed, the rest
/// owned (a connection's labels live as long as it does).
pub type Label = std::borrow::Cow<'static, str>;

pub const UNKNOWN: Label = Label::Borrowed("unknown");

pub(crate) fn known(value: &str) -> Label {
    if value.is_empty() {
        UNKNOWN
    } else {
        Label::Owned(value.to_string())
    }
}

impl Peer {
    /// A pod this agent enrolled: its workload in the store, else what
    /// its handle says of it.
    pub fn local(pod: &crate::proxy::PodHandle, store: &crate::state::Store) -> Peer {
        match pod.primary_ip().and_then(|ip| store.workload(ip)) {
            Some(workload) => Peer::of(&workload, Some(&pod.identity)),
            None => Peer {
                workload: pod
                    .id
                    .split_once('/')
                    .map_or(UNKNOWN, |(_, name)| name.to_string().into()),
                namespace: pod.namespace.clone().into(),
                principal: principal(Some(&pod.identity)),
                ..Peer::unknown()
            },
        }
    }

    pub fn unknown() -> Peer {
        Peer {
            workload: UNKNOWN,
            namespace: UNKNOWN,
            principal: UNKNOWN,
            canonical_service: UNKNOWN,
            canonical_revision: UNKNOWN,
            cluster: UNKNOWN,
            region: UNKNOWN,
            zone: UNKNOWN,
        }
    }

    /// A workload of the mesh state; the principal is the identity the
    /// connection proved, when it proved one (`identity`).
    pub fn of(workload: &crate::state::Workload, identity: Option<&Identity>) -> Peer {
        let (canonical_service, canonical_revision) = app_and_version(Some(workload));
        Peer {
            workload: known(&workload.workload_name),
            namespace: known(&workload.namespace),
            principal: principal(identity),
            canonical_service: canonical_service.into(),
            canonical_revision: canonical_revision.into(),
            cluster: known(&workload.cluster_id),
            region: known(&workload.locality.region),
            zone: known(&workload.locality.zone),
        }
    }
}

/// Istio's `destination_service` labels: (host, name, namespace) of the
/// service `namespace/host`, or unknown.
pub fn service_labels(service: Option<&str>) -> (Label, Label, Label) {
    match service.and_then(|key| key.split_once('/')) {
        Some((namespace, host)) => (
            host.to_string().into(),
            host.split('.').next().unwrap_or(host).to_string().into(),
            namespace.to_string().into(),
        ),
        None => (UNKNOWN, UNKNOWN, UNKNOWN),
    }
}

impl TcpLabels {
    pub fn new(
        reporter: &'static str,
        source: Peer,
        destination: Peer,
        (service_host, service_name, service_namespace): (Label, Label, Label),
        request_protocol: &'static str,
        connection_security_policy: &'static str,
    ) -> TcpLabels {
        TcpLabels {
            reporter,
            source_workload: source.workload,
            source_app: source.canonical_service.clone(),
            source_version: source.canonical_revision.clone(),
            source_canonical_service: source.canonical_service,
            source_canonical_revision: source.canonical_revision,
            source_workload_namespace: source.namespace,
            source_principal: source.principal,
            source_cluster: source.cluster,
            source_region: source.region,
            source_zone: source.zone,
            destination_service: service_host,
            destination_service_namespace: service_namespace,
            destination_service_name: service_name,
            destination_workload: destination.workload,
            destination_app: destination.canonical_service.clone(),
            destination_version: destination.canonical_revision.clone(),
            destination_canonical_service: destination.canonical_service,
            destination_canonical_revision: destination.canonical_revision,
            destination_workload_namespace: destination.namespace,
            destination_principal: destination.principal,
            destination_cluster: destination.cluster,
            destination_region: destination.region,
            destination_zone: destination.zone,
            request_protocol,
            response_flags: Label::Borrowed("-"),
            connection_security_policy,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    tag: &'static str,
}

/// The labels of Istio's request metrics: the TCP ones plus the response.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Hashed once: a request's own labels hash as this number and two
    /// small fields.
    #[prometheus(flatten)]
    pub connection: Hashed<TcpLabels>,
    pub response_code: u16,
    /// The gRPC status (from the trailers, or a trailers-only response);
    /// empty for plain HTTP, as in Istio.
    pub grpc_response_status: String,
}

/// Istio's default buckets for `istio_request_duration_milliseconds`.
const DURATION_MS_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's default buckets for the request and response size histograms.
const SIZE_BUCKETS: [f64; 8] = [
    1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_MS_BUCKETS)
}

fn rtt_histogram() -> Histogram {
    Histogram::new(super::kernel_tcp::RTT_SECONDS_BUCKETS)
}

fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS)
}

type HistogramFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// A label set with its hash taken once. Istio's label sets are 27
/// strings, which a family lookup would hash with SipHash each time: about
/// eight lookups per connection, four per request, 2 % of the agent's CPU
/// on new connections. This key hashes as the one number computed when it
/// was made; equality still compares every label, so two label sets that
/// share a hash share a bucket, never a series.
#[derive(Clone, Debug)]
pub struct Hashed<L> {
    labels: L,
    hash: u64,
}

/// One seed per process, as a `HashMap`'s own: label values come from
/// peers (baggage), so their hashes must not be predictable.
static LABEL_HASHER: std::sync::LazyLock<std::hash::RandomState> =
    std::sync::LazyLock::new(std::hash::RandomState::new);

impl<L: std::hash::Hash> Hashed<L> {
    pub fn new(labels: L) -> Hashed<L> {
        let hash = std::hash::BuildHasher::hash_one(&*LABEL_HASHER, &labels);
        Hashed { labels, hash }
    }
}

impl<L> Hashed<L> {
    pub fn labels(&self) -> &L {
        &self.labels
    }
}

impl<L> std::hash::Hash for Hashed<L> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl<L: PartialEq> PartialEq for Hashed<L> {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.labels == other.labels
    }
}

impl<L: Eq> Eq for Hashed<L> {}

impl<L: EncodeLabelSet> EncodeLabelSet for Hashed<L> {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder,
    ) -> Result<(), std::fmt::Error> {
        self.labels.encode(encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CounterLabels {
    pub counter: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

/// An outcome (`allowed`, `denied`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// How a relay moves an L4 connection's bytes (`splice`: by the kernel,
/// between two plain TCP sockets; `copy`: through the agent's memory).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelayLabels {
    pub relay: &'static str,
}

/// The subscribed type URL ("other" for anything else: bounded).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeUrlLabels {
    pub type_url: &'static str,
}

/// A pinned eBPF map, by name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaRequestLabels {
    /// `istio` or `builtin`.
    pub ca: &'static str,
    /// `ok` or `error`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaFailureLabels {
    pub ca: &'static str,
    /// [`CaError::reason`]: unreachable, refused, bad_response, config, signing.
    pub reason: &'static str,
}

/// Upper bounds (seconds) of the CA latency buckets: a local signature
/// takes about a millisecond, a round trip to istiod tens to hundreds.
const CA_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

fn ca_histogram() -> Histogram {
    Histogram::new(CA_BUCKETS)
}

/// Certificate requests, owned by the `SecretManager` (which exists before
/// the metrics do) and registered with [`Metrics::attach_ca`]: both hold
/// the same families, so nothing observed before the first scrape is lost.
#[derive(Clone)]
pub struct CaMetrics {
    pub duration: Family<CaRequestLabels, Histogram, fn() -> Histogram>,
    pub failures: Family<CaFailureLabels, Counter>,
}

impl Default for CaMetrics {
    fn default() -> Self {
        CaMetrics {
            duration: Family::new_with_constructor(ca_histogram as fn() -> Histogram),
            failures: Family::default(),
        }
    }
}

impl CaMetrics {
    /// One CSR round trip to `ca` that took `elapsed` and ended in `error`
    /// (or succeeded).
    pub fn observe(&self, ca: &'static str, elapsed: Duration, error: Option<&CaError>) {
        let outcome = if error.is_some() { "error" } else { "ok" };
        self.duration
            .get_or_create(&CaRequestLabels { ca, outcome })
            .observe(elapsed.as_secs_f64());
        if let Some(error) = error {
            self.failures
                .get_or_create(&CaFailureLabels {
                    ca,
                    reason: error.reason(),
                })
                .inc();
        }
    }
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub tcp_opened: Family<Hashed<TcpLabels>, Counter>,
    pub tcp_closed: Family<Hashed<TcpLabels>, Counter>,
    /// Connections that ended in a denial or an error (ztunnel's).
    pub tcp_failed: Family<Hashed<TcpLabels>, Counter>,
    /// Connections open now.
    pub tcp_sockets_open: Family<Hashed<TcpLabels>, Gauge>,
    pub tcp_sent: Family<Hashed<TcpLabels>, Counter>,
    pub tcp_received: Family<Hashed<TcpLabels>, Counter>,
    /// The kernel's smoothed round-trip time of a connection's network
    /// leg, at its end (sock_ops): one sample per connection, and per
    /// request of an HTTP one (its upstream connection's, labelled with the
    /// request's protocol).
    pub tcp_round_trip: Family<Hashed<TcpLabels>, Histogram, fn() -> Histogram>,
    /// Segments the kernel retransmitted on connections' network legs.
    pub tcp_retransmits: Family<Hashed<TcpLabels>, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily,
    pub request_bytes: HistogramFamily,
    pub response_bytes: HistogramFamily,
    ebpf: Family<CounterLabels, Counter>,
    ebpf_seen: Mutex<Vec<u64>>,
    pub certificate_expiry: Family<IdentityLabels, Gauge>,
    /// Workload certificates held (one per identity a local pod uses, or
    /// used within `ca.keep_unused_seconds`).
    pub certificates_held: Gauge,
    /// The HBONE client's timeouts and pool.
    pub hbone_client: super::hbone_metrics::HboneClientMetrics,
    pub enrolled_pods: Gauge,
    /// Enrolled pods whose inbound classifier has another tcx program
    /// ahead of it (`capture::chain`).
    pub classifier_shadowed_pods: Gauge,
    /// Others' programs that run ahead of Weir's on `connect4/6` and
    /// `sendmsg4/6` for the pods (`capture::chain::DESTINATION_HOOKS`).
    pub cgroup_programs_ahead: Gauge,
    pub active_connections: Gauge,
    pub runtime_tasks: Gauge,
    pub policy_denials: Counter,
    /// What dry-run policies would have decided, by result.
    dry_run_verdicts: Family<ResultLabels, Counter>,
    /// L4 relays started, by how they move bytes; the two counters are
    /// fetched once so a connection costs no label lookup.
    relays: Family<RelayLabels, Counter>,
    pub spliced_relays: Counter,
    pub copied_relays: Counter,
    /// Established connections closed because a policy change denies them.
    pub connections_closed_by_policy: Counter,
    pub tls_failures: Counter,
    /// `metrics.requests`: whether request metrics are recorded.
    pub record_requests: AtomicBool,
    /// Spans refused by the full export queue or lost in a failed export.
    pub trace_spans_dropped: Counter,
    pub xds_ready: Gauge,
    xds_connected: Gauge,
    xds_last_update: Family<TypeUrlLabels, Gauge<f64, AtomicU64>>,
    xds_updates: Family<TypeUrlLabels, Counter>,
    xds_nacks: Family<TypeUrlLabels, Counter>,
    xds_reconnects: Counter,
    bpf_map_entries: Family<MapLabels, Gauge>,
    bpf_map_capacity: Family<MapLabels, Gauge>,
    ca_attached: AtomicBool,
    scrapes: AtomicU64,
    /// Refusals, accept errors and timeouts of the listeners.
    pub limits: crate::proxy::limits::LimitMetrics,
    /// Captured DNS queries, answered and forwarded.
    pub dns: crate::dns::metrics::DnsMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Counts what the dry-run policies would have decided.
    pub fn dry_run(&self, result: &'static str) {
        self.dry_run_verdicts
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let relays = Family::<RelayLabels, Counter>::default();
        let spliced_relays = relays
            .get_or_create(&RelayLabels { relay: "splice" })
            .clone();
        let copied_relays = relays.get_or_create(&RelayLabels { relay: "copy" }).clone();
        let metrics = Metrics {
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_failed: Family::default(),
            tcp_sockets_open: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            tcp_round_trip: Family::new_with_constructor(rtt_histogram as fn() -> Histogram),
            tcp_retransmits: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            request_bytes: Family::new_with_constructor(size_histogram as fn() -> Histogram),
            response_bytes: Family::new_with_constructor(size_histogram as fn() -> Histogram),
            ebpf: Family::default(),
            ebpf_seen: Mutex::new(Vec::new()),
            certificate_expiry: Family::default(),
            certificates_held: Gauge::default(),
            hbone_client: Default::default(),
            enrolled_pods: Gauge::default(),
            classifier_shadowed_pods: Gauge::default(),
            cgroup_programs_ahead: Gauge::default(),
            active_connections: Gauge::default(),
            runtime_tasks: Gauge::default(),
            policy_denials: Counter::default(),
            dry_run_verdicts: Family::default(),
            relays,
            spliced_relays,
            copied_relays,
            connections_closed_by_policy: Counter::default(),
            tls_failures: Counter::default(),
            record_requests: AtomicBool::new(true),
            trace_spans_dropped: Counter::default(),
            xds_ready: Gauge::default(),
            xds_connected: Gauge::default(),
            xds_last_update: Family::default(),
            xds_updates: Family::default(),
            xds_nacks: Family::default(),
            xds_reconnects: Counter::default(),
            bpf_map_entries: Family::default(),
            bpf_map_capacity: Family::default(),
            ca_attached: AtomicBool::new(false),
            scrapes: AtomicU64::new(0),
            limits: Default::default(),
            dns: Default::default(),
            registry: Mutex::new(Registry::default()),
        };
        // prometheus-client appends `_total` to counters.
        metrics.limits.register(&mut registry);
        metrics.dns.register(&mut registry);
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
            "istio_tcp_connections_failed",
            "TCP connections that ended denied (DENY) or in an error (CONNECT)",
            metrics.tcp_failed.clone(),
        );
        registry.register(
            "weir_tcp_round_trip_seconds",
            "The kernel's smoothed round-trip time of each proxied connection's network leg (or, for an HTTP request, of its upstream connection) at its end (sock_ops), with Istio's TCP labels",
            metrics.tcp_round_trip.clone(),
        );
        registry.register(
            "weir_tcp_retransmits",
            "Segments the kernel retransmitted on proxied connections' network legs, each counted once (on a shared socket, with the connection or request that ended first after it), with Istio's TCP labels",
            metrics.tcp_retransmits.clone(),
        );
        registry.register(
            "istio_tcp_sockets_open",
            "TCP connections open now",
            metrics.tcp_sockets_open.clone(),
        );
        // Istio's build gauge, under ztunnel's component name so that its
        // dashboards count Weir's nodes.
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                component: "ztunnel",
                tag: concat!("weir-", env!("CARGO_PKG_VERSION")),
            })
            .set(1);
        registry.register("istio_build", "Istio component build info", build);
        registry.register(
            "istio_requests",
            "Requests (HTTP, HTTP/2, gRPC) through the L7 proxy",
            metrics.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration, from the request's headers to the response's end",
            metrics.request_duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes",
            metrics.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            metrics.response_bytes.clone(),
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
            "weir_certificates_held",
            "Workload certificates held",
            metrics.certificates_held.clone(),
        );
        metrics.hbone_client.register(&mut registry);
        registry.register(
            "weir_enrolled_pods",
            "Pods enrolled on this node",
            metrics.enrolled_pods.clone(),
        );
        registry.register(
            "weir_classifier_shadowed_pods",
            "Enrolled pods whose inbound classifier has another tcx program ahead of it (one that passes packets bypasses Weir)",
            metrics.classifier_shadowed_pods.clone(),
        );
        registry.register(
            "weir_cgroup_programs_ahead",
            "Others' programs that run ahead of Weir's on connect4/6 and sendmsg4/6 for the pods (one that rewrites the destination hides service VIPs from Weir)",
            metrics.cgroup_programs_ahead.clone(),
        );
        registry.register(
            "weir_active_connections",
            "Connections open: each outbound and inbound record not yet closed",
            metrics.active_connections.clone(),
        );
        registry.register(
            "weir_runtime_tasks",
            "Tasks alive in the agent's async runtime (connections, streams, timers' owners)",
            metrics.runtime_tasks.clone(),
        );
        registry.register(
            "weir_policy_denials",
            "Connections denied by an authorization policy",
            metrics.policy_denials.clone(),
        );
        registry.register(
            "weir_relays",
            "L4 relays started, by how they move bytes: relay=\"splice\" (by the kernel, between two plain TCP sockets) or \"copy\" (through the agent: TLS and HBONE streams; upgraded HTTP connections are not counted)",
            metrics.relays.clone(),
        );
        registry.register(
            "weir_policy_dry_run_verdicts",
            "Connections and requests that dry-run policies would have allowed or denied (never enforced)",
            metrics.dry_run_verdicts.clone(),
        );
        registry.register(
            "weir_connections_closed_by_policy",
            "Established connections closed because a policy change denies them",
            metrics.connections_closed_by_policy.clone(),
        );
        registry.register(
            "weir_tls_failures",
            "mTLS handshakes that failed",
            metrics.tls_failures.clone(),
        );
        registry.register(
            "weir_trace_spans_dropped",
            "Spans dropped: export queue full, or the collector unreachable",
            metrics.trace_spans_dropped.clone(),
        );
        registry.register(
            "weir_xds_ready",
            "1 once the control plane's first full state is applied",
            metrics.xds_ready.clone(),
        );
        registry.register(
            "weir_xds_connected",
            "1 while a stream to the control plane is open",
            metrics.xds_connected.clone(),
        );
        registry.register(
            "weir_xds_last_update_timestamp_seconds",
            "Unix time of the last response of each type applied and ACKed",
            metrics.xds_last_update.clone(),
        );
        registry.register(
            "weir_xds_updates",
            "Responses of each type applied and ACKed",
            metrics.xds_updates.clone(),
        );
        registry.register(
            "weir_xds_nacks",
            "Responses of each type NACKed (a resource rejected)",
            metrics.xds_nacks.clone(),
        );
        registry.register(
            "weir_xds_reconnects",
            "New streams to the control plane after one ended or failed",
            metrics.xds_reconnects.clone(),
        );
        registry.register(
            "weir_bpf_map_entries",
            "Entries held in each pinned eBPF hash map",
            metrics.bpf_map_entries.clone(),
        );
        registry.register(
            "weir_bpf_map_capacity",
            "Capacity (max_entries) of each pinned eBPF map",
            metrics.bpf_map_capacity.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            ..metrics
        }
    }

    /// Registers the certificate-request metrics the `SecretManager` keeps
    /// (once; later calls do nothing).
    pub fn attach_ca(&self, ca: &CaMetrics) {
        if self.ca_attached.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        registry.register(
            "weir_ca_request_duration_seconds",
            "Latency of certificate requests (CSR to parsed chain), by CA and outcome",
            ca.duration.clone(),
        );
        registry.register(
            "weir_ca_request_failures",
            "Certificate requests that failed, by CA and reason",
            ca.failures.clone(),
        );
    }

    /// Brings the xDS client's state up to date (read at scrape time).
    pub fn observe_xds(&self, stats: &crate::xds::XdsStats) {
        self.xds_connected.set(i64::from(stats.connected()));
        self.xds_reconnects
            .inner()
            .store(stats.reconnects(), Ordering::Relaxed);
        for (type_url, counts) in stats.by_type() {
            let labels = TypeUrlLabels { type_url };
            self.xds_updates
                .get_or_create(&labels)
                .inner()
                .store(counts.updates, Ordering::Relaxed);
            self.xds_nacks
                .get_or_create(&labels)
                .inner()
                .store(counts.nacks, Ordering::Relaxed);
            self.xds_last_update
                .get_or_create(&labels)
                .set(counts.last_update);
        }
    }

    /// Brings map fill up to date (read at scrape time).
    pub fn observe_bpf_maps(&self, maps: &[crate::capture::bpfinfo::MapFill]) {
        for map in maps {
            let labels = MapLabels {
                map: map.name.clone(),
            };
            self.bpf_map_capacity
                .get_or_create(&labels)
                .set(i64::from(map.capacity));
            if let Some(entries) = map.entries {
                self.bpf_map_entries
                    .get_or_create(&labels)
                    .set(entries as i64);
            }
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
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
            text.clear();
        }
        text
    }
}

/// Istio's principal label form: `spiffe://td/ns/x/sa/y`.
/// Istio's `*_app` and `*_version` labels: the workload's `app` and
/// `version` labels (its canonical service and revision), else `unknown`.
pub fn app_and_version(workload: Option<&crate::state::Workload>) -> (String, String) {
    // Istio's canonical service labels, in its order of preference.
    let label = |keys: &[&str]| {
        keys.iter()
            .find_map(|key| workload.and_then(|workload| workload.labels.get(*key)))
            .cloned()
            .unwrap_or_else(|| "unknown".to_string())
    };
    (
        label(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ]),
        label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ]),
    )
}

pub fn principal(identity: Option<&Identity>) -> Label {
    identity.map_or(UNKNOWN, |id| Label::Owned(id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE, XdsStats};

    fn has(text: &str, line: &str) -> bool {
        text.lines().any(|l| l == line)
    }

    /// Label sets made apart but equal are one series, rendered with every
    /// label as before; a set that differs in one label is another.
    #[test]
    fn hashed_label_sets_are_one_series_per_label_set() {
        let metrics = Metrics::new();
        let peer = |workload: &'static str| Peer {
            workload: Label::Borrowed(workload),
            ..Peer::unknown()
        };
        let labels = |destination: &'static str| {
            Hashed::new(TcpLabels::new(
                "source",
                peer("client"),
                peer(destination),
                service_labels(Some("test/web.test")),
                "tcp",
                "mutual_tls",
            ))
        };
        metrics.tcp_opened.get_or_create(&labels("server")).inc();
        metrics.tcp_opened.get_or_create(&labels("server")).inc();
        metrics.tcp_opened.get_or_create(&labels("other")).inc();
        let text = metrics.encode();
        let series: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("istio_tcp_connections_opened_total{"))
            .collect();
        assert_eq!(series.len(), 2, "{text}");
        assert!(
            series
                .iter()
                .any(|line| line.contains("destination_workload=\"server\"")
                    && line.contains("source_workload=\"client\"")
                    && line.contains("destination_service=\"web.test\"")
                    && line.ends_with(" 2")),
            "{text}"
        );
        assert!(
            series.iter().any(|line| line.contains("destination_workload=\"other\"")
                && line.ends_with(" 1")),
            "{text}"
        );
    }

    #[test]
    fn xds_ca_and_map_metrics_render_with_bounded_labels() {
        let metrics = Metrics::new();
        let stats = XdsStats::default();
        stats.set_connected(true);
        stats.record_response(ADDRESS_TYPE, true);
        stats.record_response(ADDRESS_TYPE, false);
        stats.record_response("type.googleapis.com/x.Unknown", true);
        stats.record_reconnect();
        metrics.observe_xds(&stats);
        // Values are copied, not added, at each scrape.
        metrics.observe_xds(&stats);

        let ca = CaMetrics::default();
        ca.observe("builtin", Duration::from_millis(2), None);
        metrics.attach_ca(&ca);
        metrics.attach_ca(&ca);
        // Observed after registration: the families are shared.
        ca.observe(
            "istio",
            Duration::from_secs(1),
            Some(&CaError::Refused("no".into())),
        );

        metrics.observe_bpf_maps(&[
            crate::capture::bpfinfo::MapFill {
                name: "ENROLLED_PODS".into(),
                entries: Some(3),
                capacity: 1024,
            },
            crate::capture::bpfinfo::MapFill {
                name: "COUNTERS".into(),
                entries: None,
                capacity: 16,
            },
        ]);
        let text = metrics.encode();
        let address = format!("type_url=\"{ADDRESS_TYPE}\"");
        let authorization = format!("type_url=\"{AUTHORIZATION_TYPE}\"");
        for line in [
            "weir_xds_connected 1".to_string(),
            "weir_xds_reconnects_total 1".to_string(),
            format!("weir_xds_updates_total{{{address}}} 1"),
            format!("weir_xds_nacks_total{{{address}}} 1"),
            format!("weir_xds_updates_total{{{authorization}}} 0"),
            "weir_xds_updates_total{type_url=\"other\"} 1".to_string(),
            "weir_ca_request_duration_seconds_count{ca=\"builtin\",outcome=\"ok\"} 1".to_string(),
            "weir_ca_request_duration_seconds_bucket{le=\"0.0025\",ca=\"builtin\",outcome=\"ok\"} 1"
                .to_string(),
            "weir_ca_request_duration_seconds_count{ca=\"istio\",outcome=\"error\"} 1".to_string(),
            "weir_ca_request_failures_total{ca=\"istio\",reason=\"refused\"} 1".to_string(),
            "weir_bpf_map_entries{map=\"ENROLLED_PODS\"} 3".to_string(),
            "weir_bpf_map_capacity{map=\"ENROLLED_PODS\"} 1024".to_string(),
            "weir_bpf_map_capacity{map=\"COUNTERS\"} 16".to_string(),
        ] {
            assert!(has(&text, &line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("weir_bpf_map_entries{map=\"COUNTERS\"}"));
        assert_eq!(
            text.matches("# TYPE weir_ca_request_duration_seconds ")
                .count(),
            1
        );
        assert!(text.contains("weir_xds_last_update_timestamp_seconds{"));
    }
}
