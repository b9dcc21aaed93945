//! The agent's configuration: parsed once from YAML into typed values.
//!
//! ```yaml
//! node: demo-node
//! instance: demo                 # pins live in <bpffs>/weir/<instance>
//! cgroup:
//!   pods_parent: /sys/fs/cgroup/unified/kubepods   # default: the cgroup v2 root
//!   agent: /sys/fs/cgroup/unified/weir-agent       # default: a child of the v2 root
//! capture:
//!   exclude_ports: [22]
//!   exclude_inbound_ports: [9100]
//!   exclude_cidrs: [169.254.0.0/16, "fd00:ec2::/32"]
//!   accelerate: false
//! pods:                          # every address (`ips`), or one (`ip: 10.0.1.2`)
//!   - { name: a, namespace: default, service_account: default, netns: /run/netns/a, ips: [10.0.1.2, "fd00::2"] }
//! routing:                       # L7: Envoy's RouteConfiguration and Cluster, as istioctl prints them (routing/file.rs)
//!   route_configs:
//!     - name: echo.default.svc.cluster.local       # the service it applies to
//!       virtual_hosts:
//!         - name: echo
//!           domains: ["*"]
//!           routes:
//!             - match: { prefix: /v2 }
//!               route: { cluster: "outbound|80|v2|echo.default.svc.cluster.local", timeout: 2s }
//!             - match: { prefix: / }
//!               route: { cluster: "outbound|80||echo.default.svc.cluster.local" }
//!   clusters:
//!     - name: "outbound|80|v2|echo.default.svc.cluster.local"
//!       metadata: { filter_metadata: { istio: { subset_labels: { version: v2 } } } }
//! tracing:                       # spans of L7 requests (telemetry/spans.rs), OTLP/gRPC
//!   otlp_endpoint: http://10.0.0.1:4317   # none: no spans, headers pass through
//!   sampling: 1.0                # percent of new traces (Istio's default)
//!   service_name: weir
//! proxy:                         # timeouts and limits of the listeners (proxy/limits.rs)
//!   handshake_timeout_ms: 10000
//!   max_connections_per_pod: 20000
//! ```
use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

use serde::Deserialize;

/// The embedded default: the demo node that `cargo xtask demo` builds.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.yaml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {source}")]
    Parse {
        origin: String,
        source: serde_yaml::Error,
    },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's name. Default: `$NODE_NAME` (the DaemonSet sets it from
    /// `spec.nodeName`).
    #[serde(default)]
    pub node: String,
    /// Names this agent's pin directory; two agents on one machine need two.
    #[serde(default = "default_instance")]
    pub instance: String,
    /// Where bpffs is mounted.
    #[serde(default = "default_bpffs")]
    pub bpffs: PathBuf,
    #[serde(default)]
    pub cgroup: CgroupConfig,
    #[serde(default)]
    pub capture: CaptureConfig,
    #[serde(default)]
    pub pods: Vec<PodConfig>,
    /// SPIFFE trust domain of this mesh.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default)]
    pub ca: CaConfig,
    /// Meshed workloads on other nodes: traffic to them goes through HBONE.
    #[serde(default)]
    pub workloads: Vec<WorkloadConfig>,
    /// How traffic between two meshed pods of this node travels.
    #[serde(default)]
    pub same_node: SameNode,
    /// L4 authorization policies (Istio's semantics), enforced where
    /// connections arrive.
    #[serde(default)]
    pub policies: Vec<crate::security::authorization::Policy>,
    /// An Istio-compatible control plane; workloads and policies it sends
    /// add to the ones in this file.
    pub xds: Option<XdsConfig>,
    /// A file in ztunnel's local config format (its `LOCAL_XDS_PATH`):
    /// workloads, services and policies, taken as a control plane's are
    /// and followed as it changes. Instead of `xds`, not beside it.
    pub local_xds_path: Option<PathBuf>,
    /// Services (VIPs and ports); pods and workloads name the ones they back.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// This node's region, zone and subzone, which services' load
    /// balancing compares endpoints with (ztunnel's are the node's labels).
    #[serde(default)]
    pub locality: crate::state::Locality,
    /// The network this node's pods are on (ztunnel's `NETWORK`; istiod's
    /// workloads carry theirs). Empty: the default network.
    #[serde(default)]
    pub network: String,
    /// Enroll the pods of this node from the Kubernetes API: a pod is
    /// enrolled when its namespace is labelled
    /// `istio.io/dataplane-mode=ambient` and it does not opt out.
    pub kubernetes: Option<KubernetesConfig>,
    /// The per-connection access log: on/off and sampling, per namespace or
    /// pod (metrics and `weir trace` are not sampled).
    #[serde(default)]
    pub access_log: AccessLogConfig,
    /// Which metrics are recorded (the agent's own always are).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// DNS capture: the node-wide default (a pod's `dns_capture`, or
    /// Istio's `ambient.istio.io/dns-capture` annotation, decides for it).
    #[serde(default)]
    pub dns: DnsConfig,
    /// L7 routes and clusters, in Envoy's `RouteConfiguration` and
    /// `Cluster` form; the control plane's replace these by name.
    #[serde(default)]
    pub routing: crate::routing::file::FileRouting,
    /// Spans of L7 requests, exported over OTLP/gRPC; trace headers.
    #[serde(default)]
    pub tracing: TracingConfig,
    /// The HBONE client: a bound on each phase of opening a tunnel, and
    /// how pooled connections are kept alive and retired.
    #[serde(default)]
    pub hbone_client: HboneClientConfig,
    /// Timeouts and connection limits of the agent's listeners.
    #[serde(default)]
    pub proxy: ProxyConfig,
}

/// The HBONE client's timeouts and pool lifecycle (`proxy/pool/`). Read
/// at start. Defaults are ztunnel's where ztunnel has the setting.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HboneClientConfig {
    /// The TLS handshake with the peer's 15008, once TCP is connected.
    pub tls_handshake_timeout_seconds: u64,
    /// The HTTP/2 handshake over that TLS connection.
    pub http2_handshake_timeout_seconds: u64,
    /// A `CONNECT` until the peer answers it. Longer than the peer's own
    /// connect to its application (10 s), whose failure it answers 503.
    pub connect_timeout_seconds: u64,
    /// An HTTP/2 PING on a pooled connection that has heard nothing from
    /// its peer for this long (ztunnel: 10 s)...
    pub keepalive_interval_seconds: u64,
    /// ...and no answer within this closes it (ztunnel: 20 s).
    pub keepalive_timeout_seconds: u64,
    /// TCP keepalive on the tunnel's socket: idle time before the first
    /// probe, time between probes, probes before the kernel gives up
    /// (ztunnel: 180 s, 180 s, 9).
    pub tcp_keepalive_seconds: u64,
    pub tcp_keepalive_interval_seconds: u64,
    pub tcp_keepalive_retries: u32,
    /// A pooled connection that carried no stream for this long is closed
    /// (ztunnel's `POOL_UNUSED_RELEASE_TIMEOUT`: 5 min).
    pub idle_timeout_seconds: u64,
}

impl Default for HboneClientConfig {
    fn default() -> Self {
        HboneClientConfig {
            tls_handshake_timeout_seconds: 10,
            http2_handshake_timeout_seconds: 10,
            connect_timeout_seconds: 15,
            keepalive_interval_seconds: 10,
            keepalive_timeout_seconds: 20,
            tcp_keepalive_seconds: 180,
            tcp_keepalive_interval_seconds: 180,
            tcp_keepalive_retries: 9,
            idle_timeout_seconds: 300,
        }
    }
}

/// Timeouts and limits of every listener the agent serves (15001, 15006,
/// 15008, the L7 servers behind them, and the admin ports). Live: a reload
/// applies to connections accepted after it. Defaults follow ztunnel and
/// Envoy (see the README's configuration reference).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// HBONE (15008): the TLS handshake, and then the HTTP/2 preface and
    /// first complete `CONNECT`, each within this (ztunnel's TLS listener:
    /// 10 s).
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// L7 and admin HTTP: a request's headers (and an HTTP/2 connection's
    /// first request) within this; a slow HTTP/1.1 client gets 408.
    #[serde(default = "default_request_headers_timeout_ms")]
    pub request_headers_timeout_ms: u64,
    /// A relayed TCP connection with no byte either way, or an HTTP/2
    /// connection (HBONE or L7) with no open stream, is closed after this
    /// (Envoy's TCP proxy and HTTP connection idle timeout, Istio's TCP
    /// default: 1 h). 0: never.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// L7: a request whose bodies move no byte either way for this long is
    /// ended (Envoy's `stream_idle_timeout`: 5 min). 0: never.
    #[serde(default = "default_stream_idle_timeout_ms")]
    pub stream_idle_timeout_ms: u64,
    /// Connections the node's listeners hold at once; past it new ones are
    /// closed at accept, counted and logged.
    #[serde(default = "default_max_connections")]
    pub max_connections: u64,
    /// The same, per pod: its outbound connections and those arriving at it.
    #[serde(default = "default_max_connections_per_pod")]
    pub max_connections_per_pod: u64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            handshake_timeout_ms: default_handshake_timeout_ms(),
            request_headers_timeout_ms: default_request_headers_timeout_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            stream_idle_timeout_ms: default_stream_idle_timeout_ms(),
            max_connections: default_max_connections(),
            max_connections_per_pod: default_max_connections_per_pod(),
        }
    }
}

impl HboneClientConfig {
    fn validate(&self) -> Result<(), String> {
        let fields = [
            (
                "tls_handshake_timeout_seconds",
                self.tls_handshake_timeout_seconds,
            ),
            (
                "http2_handshake_timeout_seconds",
                self.http2_handshake_timeout_seconds,
            ),
            ("connect_timeout_seconds", self.connect_timeout_seconds),
            (
                "keepalive_interval_seconds",
                self.keepalive_interval_seconds,
            ),
            ("keepalive_timeout_seconds", self.keepalive_timeout_seconds),
            ("tcp_keepalive_seconds", self.tcp_keepalive_seconds),
            (
                "tcp_keepalive_interval_seconds",
                self.tcp_keepalive_interval_seconds,
            ),
            (
                "tcp_keepalive_retries",
                u64::from(self.tcp_keepalive_retries),
            ),
            ("idle_timeout_seconds", self.idle_timeout_seconds),
        ];
        match fields.iter().find(|(_, value)| *value == 0) {
            // Zero would mean "never" for some and "at once" for others.
            Some((name, _)) => Err(format!("hbone_client.{name}: at least 1")),
            None => Ok(()),
        }
    }
}

fn default_handshake_timeout_ms() -> u64 {
    10_000
}
fn default_request_headers_timeout_ms() -> u64 {
    10_000
}
fn default_idle_timeout_ms() -> u64 {
    3_600_000
}
fn default_stream_idle_timeout_ms() -> u64 {
    300_000
}
fn default_max_connections() -> u64 {
    100_000
}
fn default_max_connections_per_pod() -> u64 {
    20_000
}

/// Distributed tracing in the L7 proxy (see `telemetry/spans.rs`). Read at start: a
/// change applies on restart.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The OTLP/gRPC collector, `http://host:4317`. Without it no span is
    /// made or exported; incoming trace headers still pass through.
    pub otlp_endpoint: Option<String>,
    /// Percent (0 to 100) of requests without an incoming sampling decision
    /// that start a sampled trace; an incoming decision is followed.
    #[serde(default = "default_sampling")]
    pub sampling: f64,
    /// `service.name` of the exported spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            sampling: default_sampling(),
            service_name: default_service_name(),
        }
    }
}

// The sampling percentage is finite (checked in `validate`).
impl Eq for TracingConfig {}

/// Istio's default sampling: 1 %.
fn default_sampling() -> f64 {
    1.0
}

fn default_service_name() -> String {
    "weir".into()
}

/// Istio's Telemetry API can turn metrics off per workload; Weir has one
/// switch for the per-request ones (the busiest).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `istio_requests_total` and the request histograms. Default on.
    #[serde(default = "default_true")]
    pub requests: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { requests: true }
    }
}

/// `dns:`. On by default, as Istio ambient's (`AMBIENT_DNS_CAPTURE`,
/// on since Istio 1.25).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Pods' queries to port 53 (UDP and TCP) go to the agent, which
    /// answers the services it knows and forwards the rest.
    #[serde(default = "default_true")]
    pub capture: bool,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig { capture: true }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Fraction of connections logged, 0.0 to 1.0.
    #[serde(default = "default_sample_rate")]
    pub sample_rate: f64,
    /// The first override naming the pod (`pod: ns/name`) or its
    /// namespace wins; a pod override beats a namespace one.
    #[serde(default)]
    pub overrides: Vec<AccessLogOverride>,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            enabled: true,
            sample_rate: 1.0,
            overrides: Vec::new(),
        }
    }
}

// Sample rates are finite fractions (checked in `validate`).
impl Eq for AccessLogConfig {}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogOverride {
    /// `namespace/name` of one pod.
    pub pod: Option<String>,
    /// Every pod of a namespace.
    pub namespace: Option<String>,
    pub enabled: Option<bool>,
    pub sample_rate: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// A kubeconfig file. Default: the in-cluster service account, then
    /// `$KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// The host's `/proc`: each pod's network namespace is found through a
    /// process of its sandbox.
    #[serde(default = "default_proc_root")]
    pub proc_root: PathBuf,
    /// The pods' interface inside their namespace.
    #[serde(default = "default_interface")]
    pub pod_interface: String,
    /// On SIGTERM, how long to keep serving while a successor takes over and
    /// connections in flight end (keep it below the pod's
    /// `terminationGracePeriodSeconds`).
    #[serde(default = "default_drain_seconds")]
    pub drain_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
}

impl ServiceConfig {
    /// `namespace/hostname`, as workloads refer to services.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    pub service_port: u16,
    pub target_port: u16,
    /// The declared protocol (Kubernetes' `appProtocol`): `http`, `http2`,
    /// `grpc`, `tcp` and Istio's other names. It overrides sniffing; an
    /// HTTP port gets L7 routing (per-request balancing) even without a
    /// route configuration.
    #[serde(default)]
    pub app_protocol: Option<crate::state::AppProtocol>,
    /// The port's name; by Istio's convention `http-web`, `grpc`, `tcp-db`…
    /// declare the protocol when `app_protocol` does not.
    #[serde(default)]
    pub name: Option<String>,
}

impl ServicePort {
    /// The declared protocol: `app_protocol`, else the port name's.
    pub fn protocol(&self) -> Option<crate::state::AppProtocol> {
        self.app_protocol.or_else(|| {
            self.name
                .as_deref()
                .and_then(crate::state::AppProtocol::from_port_name)
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XdsConfig {
    /// `https://host:port` (`http://` only for local testing).
    pub address: String,
    /// PEM roots that sign the control plane's certificate.
    pub root_cert: Option<PathBuf>,
    /// Bearer token (a Kubernetes service-account token).
    pub token_file: Option<PathBuf>,
    /// TLS name to check, when it differs from the address's host.
    pub server_name: Option<String>,
    /// `delta` (default, what istiod serves ztunnel) or `sotw`.
    #[serde(default)]
    pub mode: crate::xds::XdsMode,
}

/// Same-node meshed traffic: handed from one pod's namespace to the other's
/// inside the agent (both identities are the agent's own, so nothing is
/// learnt from a handshake; measured 2.3x the throughput of the mTLS hop),
/// or through the destination pod's HBONE listener (a local mTLS hop).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SameNode {
    #[default]
    Handoff,
    Mtls,
}

/// Where workload certificates come from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    /// Istio's certificate service; without it, the built-in CA signs.
    pub istio: Option<IstioCaSettings>,
    /// Root certificate and key of the built-in CA (PEM). Without them a new
    /// root is generated at start (fine for one node; nodes that talk to
    /// each other need a shared root: `weir ca init`).
    pub root_cert: Option<PathBuf>,
    pub root_key: Option<PathBuf>,
    /// Lifetime of workload certificates; renewed at half of it.
    #[serde(default = "default_cert_ttl")]
    pub cert_ttl_seconds: u64,
    /// How long the certificate of an identity no local pod uses any more
    /// is kept (and renewed) before it is forgotten: a pod made again
    /// soon after (a restart, a rollout) finds it still there.
    #[serde(default = "default_keep_unused")]
    pub keep_unused_seconds: u64,
}

impl Default for CaConfig {
    fn default() -> Self {
        CaConfig {
            istio: None,
            root_cert: None,
            root_key: None,
            cert_ttl_seconds: default_cert_ttl(),
            keep_unused_seconds: default_keep_unused(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IstioCaSettings {
    /// `https://host:port`.
    pub address: String,
    /// PEM roots that sign the CA's serving certificate.
    pub root_cert: PathBuf,
    /// Bearer token (a Kubernetes service-account token).
    pub token_file: Option<PathBuf>,
    /// TLS name to check, when it differs from the address's host.
    pub server_name: Option<String>,
    #[serde(default = "default_cluster_id")]
    pub cluster_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "WorkloadFields")]
pub struct WorkloadConfig {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Every address of the workload, IPv4 and IPv6: `ips: [10.0.0.2,
    /// "fd00::2"]` in the file, or one as `ip: 10.0.0.2`.
    pub ips: Vec<IpAddr>,
    /// Services this workload backs (`namespace/hostname`).
    pub services: Vec<String>,
    /// Labels cluster subsets select on and telemetry reports (`app`,
    /// `version`).
    pub labels: std::collections::BTreeMap<String, String>,
}

/// A workload as the file writes it: its addresses as `ips` or `ip`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadFields {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default = "default_service_account")]
    service_account: String,
    ip: Option<IpAddr>,
    ips: Option<Vec<IpAddr>>,
    #[serde(default)]
    services: Vec<String>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
}

impl TryFrom<WorkloadFields> for WorkloadConfig {
    type Error = String;
    fn try_from(fields: WorkloadFields) -> Result<Self, String> {
        Ok(WorkloadConfig {
            ips: addresses(&fields.name, fields.ip, fields.ips)?,
            name: fields.name,
            namespace: fields.namespace,
            service_account: fields.service_account,
            services: fields.services,
            labels: fields.labels,
        })
    }
}

/// The addresses a pod or workload lists, from `ips` or the older single
/// `ip` (exactly one of the two), canonical (an IPv4-mapped IPv6 address
/// is the IPv4 one) and without repeats.
fn addresses(
    name: &str,
    ip: Option<IpAddr>,
    ips: Option<Vec<IpAddr>>,
) -> Result<Vec<IpAddr>, String> {
    let listed = match (ip, ips) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "{name}: give either `ips` (every address) or `ip` (one), not both"
            ));
        }
        (None, None) => {
            return Err(format!(
                "{name}: no address: give `ips: [<IPv4>, <IPv6>]` or `ip: <address>`"
            ));
        }
        (Some(ip), None) => vec![ip],
        (None, Some(ips)) => ips,
    };
    if listed.is_empty() {
        return Err(format!("{name}: `ips` is empty"));
    }
    let mut unique: Vec<IpAddr> = Vec::with_capacity(listed.len());
    for ip in listed {
        let ip = ip.to_canonical();
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(format!("{name}: {ip} is not a workload address"));
        }
        if unique.contains(&ip) {
            return Err(format!("{name}: address {ip} is listed twice"));
        }
        unique.push(ip);
    }
    Ok(unique)
}

/// Whether a workload accepts plaintext from outside the mesh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MeshMode {
    /// Plaintext inbound is accepted (Istio's default).
    #[default]
    Permissive,
    /// Only mTLS (HBONE) inbound.
    Strict,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupConfig {
    /// Cgroup v2 directory whose descendants hold the pods' processes; the
    /// capture programs are attached here once. Default: the v2 root.
    /// Relative paths here and in `agent` are under the v2 root.
    pub pods_parent: Option<PathBuf>,
    /// Cgroup v2 directory the agent moves itself into before opening any
    /// socket. Default: `<v2 root>/weir-agent-<instance>`. `current` keeps
    /// the agent where it was started (in a container: its pod's cgroup, so
    /// the pod's resource limits keep applying).
    pub agent: Option<PathBuf>,
}

/// `cgroup.agent` value: stay in the cgroup the agent was started in.
pub const CURRENT_CGROUP: &str = "current";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    /// Destination ports never captured, outbound or inbound.
    #[serde(default)]
    pub exclude_ports: BTreeSet<u16>,
    /// Pod ports whose inbound traffic is never steered to the proxy.
    #[serde(default)]
    pub exclude_inbound_ports: BTreeSet<u16>,
    /// Destinations never captured, IPv4 and IPv6 blocks.
    #[serde(default)]
    pub exclude_cidrs: Vec<Cidr>,
    /// Redirect data between the agent's own sockets with `sk_msg` instead of
    /// the TCP stack (same-node pod-to-pod traffic skips the veths).
    #[serde(default)]
    pub accelerate: bool,
    /// Per-connection kernel telemetry: `sock_ops` keeps the round trips
    /// and retransmits of the proxy's connections, which join their
    /// records (flow events, access log, metrics).
    #[serde(default = "default_true")]
    pub tcp_stats: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            exclude_ports: BTreeSet::new(),
            exclude_inbound_ports: BTreeSet::new(),
            exclude_cidrs: Vec::new(),
            accelerate: false,
            tcp_stats: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "PodFields")]
pub struct PodConfig {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// The pod's network namespace: a path (`/run/netns/x`, `/proc/<pid>/ns/net`).
    pub netns: PathBuf,
    /// The pod's addresses, at most one per family (as Kubernetes'
    /// `status.podIPs`): `ips: [10.0.0.2, "fd00::2"]` in the file, or one
    /// as `ip: 10.0.0.2`.
    pub ips: Vec<IpAddr>,
    /// The pod's interface inside its namespace.
    pub interface: String,
    pub mesh_mode: MeshMode,
    /// WORKLOAD_SELECTOR policies that select this pod (`namespace/name`).
    pub authorization_policies: Vec<String>,
    /// Services this pod backs (`namespace/hostname`).
    pub services: Vec<String>,
    /// Labels cluster subsets select on and telemetry reports (`app`,
    /// `version`).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Whether its DNS is captured; `None`: the node's `dns.capture`.
    pub dns_capture: Option<bool>,
}

/// A pod as the file writes it: its addresses as `ips` or `ip`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PodFields {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default = "default_service_account")]
    service_account: String,
    netns: PathBuf,
    ip: Option<IpAddr>,
    ips: Option<Vec<IpAddr>>,
    #[serde(default = "default_interface")]
    interface: String,
    #[serde(default)]
    mesh_mode: MeshMode,
    #[serde(default)]
    authorization_policies: Vec<String>,
    #[serde(default)]
    services: Vec<String>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    dns_capture: Option<bool>,
}

impl TryFrom<PodFields> for PodConfig {
    type Error = String;
    fn try_from(fields: PodFields) -> Result<Self, String> {
        let ips = addresses(&fields.name, fields.ip, fields.ips)?;
        if ips.iter().filter(|ip| ip.is_ipv4()).count() > 1
            || ips.iter().filter(|ip| ip.is_ipv6()).count() > 1
        {
            return Err(format!(
                "{}: a pod has at most one IPv4 and one IPv6 address, got {ips:?}",
                fields.name
            ));
        }
        Ok(PodConfig {
            ips,
            name: fields.name,
            namespace: fields.namespace,
            service_account: fields.service_account,
            netns: fields.netns,
            interface: fields.interface,
            mesh_mode: fields.mesh_mode,
            authorization_policies: fields.authorization_policies,
            services: fields.services,
            labels: fields.labels,
            dns_capture: fields.dns_capture,
        })
    }
}

impl PodConfig {
    /// `namespace/name`, how pods are named in logs.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The pod's address in the family of `like`, if it has one.
    pub fn ip_like(&self, like: IpAddr) -> Option<IpAddr> {
        same_family(&self.ips, like)
    }
}

/// The first of `ips` in the family of `like`.
pub fn same_family(ips: &[IpAddr], like: IpAddr) -> Option<IpAddr> {
    ips.iter()
        .copied()
        .find(|ip| ip.is_ipv4() == like.to_canonical().is_ipv4())
}

/// An address block, IPv4 (`169.254.0.0/16`) or IPv6 (`fd00::/8`); a bare
/// address is a host (`/32`, `/128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr, len) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not a CIDR (a.b.c.d/n or an IPv6 address/n)"))?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len: u8 = match len {
            Some(len) => len
                .parse()
                .ok()
                .filter(|len| *len <= max)
                .ok_or_else(|| format!("{text:?}: prefix length must be 0..={max}"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix_len })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

fn default_instance() -> String {
    "default".into()
}
fn default_bpffs() -> PathBuf {
    PathBuf::from("/sys/fs/bpf")
}
fn default_namespace() -> String {
    "default".into()
}
fn default_service_account() -> String {
    "default".into()
}
fn default_interface() -> String {
    "eth0".into()
}
fn default_true() -> bool {
    true
}
fn default_sample_rate() -> f64 {
    1.0
}
fn default_proc_root() -> PathBuf {
    PathBuf::from("/proc")
}
/// How long a superseded agent drains its connections by default.
pub const DEFAULT_DRAIN_SECONDS: u64 = 20;
fn default_drain_seconds() -> u64 {
    DEFAULT_DRAIN_SECONDS
}
fn default_trust_domain() -> String {
    "cluster.local".into()
}
fn default_cert_ttl() -> u64 {
    24 * 3600
}
fn default_keep_unused() -> u64 {
    60
}
fn default_cluster_id() -> String {
    "Kubernetes".into()
}

/// Fields a reload re-applies (`agent::watch`); every other field is read
/// once at start.
pub const LIVE_FIELDS: &[&str] = &[
    "pods",
    "workloads",
    "policies",
    "services",
    "access_log",
    "metrics",
    "dns",
    "routing",
    "proxy",
];

/// Fields read only at start: a change in the file applies on restart.
pub const RESTART_FIELDS: &[&str] = &[
    "node",
    "instance",
    "bpffs",
    "cgroup",
    "capture",
    "trust_domain",
    "ca",
    "same_node",
    "xds",
    "local_xds_path",
    "locality",
    "network",
    "kubernetes",
    "tracing",
    "hbone_client",
];

impl Config {
    /// The restart-only fields that differ between `self` (running) and
    /// `new` (just loaded), in declaration order.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        // No `..`: a new field does not compile until it is sorted here as
        // live (and listed in LIVE_FIELDS) or restart-only (compared below).
        let Config {
            node,
            instance,
            bpffs,
            cgroup,
            capture,
            pods: _,
            trust_domain,
            ca,
            workloads: _,
            same_node,
            policies: _,
            xds,
            local_xds_path,
            services: _,
            locality,
            network,
            kubernetes,
            access_log: _,
            metrics: _,
            dns: _,
            routing: _,
            tracing,
            hbone_client,
            proxy: _,
        } = self;
        [
            ("node", *node != new.node),
            ("instance", *instance != new.instance),
            ("bpffs", *bpffs != new.bpffs),
            ("cgroup", *cgroup != new.cgroup),
            ("capture", *capture != new.capture),
            ("trust_domain", *trust_domain != new.trust_domain),
            ("ca", *ca != new.ca),
            ("same_node", *same_node != new.same_node),
            ("xds", *xds != new.xds),
            ("local_xds_path", *local_xds_path != new.local_xds_path),
            ("locality", *locality != new.locality),
            ("network", *network != new.network),
            ("kubernetes", *kubernetes != new.kubernetes),
            ("tracing", *tracing != new.tracing),
            ("hbone_client", *hbone_client != new.hbone_client),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }

    /// The cluster this node is in: the Istio CA's `cluster_id`, else
    /// istiod's default.
    pub fn cluster_id(&self) -> &str {
        self.ca
            .istio
            .as_ref()
            .map_or("Kubernetes", |istio| istio.cluster_id.as_str())
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut config: Config =
            serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
                origin: origin.to_string(),
                source,
            })?;
        if config.node.is_empty() {
            config.node = std::env::var("NODE_NAME").unwrap_or_default();
        }
        config.validate().map_err(|message| ConfigError::Invalid {
            origin: origin.to_string(),
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let valid_name = |name: &str| {
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        };
        if self.node.is_empty() {
            return Err("node: set it, or the NODE_NAME environment variable".into());
        }
        let valid_rate = |rate: f64| (0.0..=1.0).contains(&rate);
        if !valid_rate(self.access_log.sample_rate) {
            return Err("access_log.sample_rate: between 0.0 and 1.0".into());
        }
        for (index, entry) in self.access_log.overrides.iter().enumerate() {
            if entry.pod.is_some() == entry.namespace.is_some() {
                return Err(format!(
                    "access_log.overrides[{index}]: name either a pod or a namespace"
                ));
            }
            if entry.sample_rate.is_some_and(|rate| !valid_rate(rate)) {
                return Err(format!(
                    "access_log.overrides[{index}].sample_rate: between 0.0 and 1.0"
                ));
            }
        }
        if !(0.0..=100.0).contains(&self.tracing.sampling) {
            return Err("tracing.sampling: a percentage, 0 to 100".into());
        }
        if let Some(endpoint) = &self.tracing.otlp_endpoint {
            // Plaintext gRPC only: the exporter is built without TLS.
            let valid = endpoint
                .parse::<http::Uri>()
                .is_ok_and(|uri| uri.scheme_str() == Some("http") && uri.authority().is_some());
            if !valid {
                return Err(format!(
                    "tracing.otlp_endpoint {endpoint:?}: use http://host:port"
                ));
            }
        }
        let proxy = &self.proxy;
        for (name, value) in [
            ("handshake_timeout_ms", proxy.handshake_timeout_ms),
            (
                "request_headers_timeout_ms",
                proxy.request_headers_timeout_ms,
            ),
            ("max_connections", proxy.max_connections),
            ("max_connections_per_pod", proxy.max_connections_per_pod),
        ] {
            if value == 0 {
                return Err(format!("proxy.{name}: at least 1"));
            }
        }
        if self.xds.is_some() && self.local_xds_path.is_some() {
            return Err(
                "xds and local_xds_path: give one source of the mesh's workloads, not both".into(),
            );
        }
        if self.tracing.service_name.is_empty() {
            return Err("tracing.service_name: must not be empty".into());
        }
        if !valid_name(&self.instance) {
            return Err(format!(
                "instance {:?}: use letters, digits, '-', '_' or '.' (it names a directory)",
                self.instance
            ));
        }
        if self.ca.root_cert.is_some() != self.ca.root_key.is_some() {
            return Err("ca: root_cert and root_key go together".into());
        }
        if self.ca.cert_ttl_seconds < 10 {
            return Err("ca.cert_ttl_seconds: at least 10".into());
        }
        self.hbone_client.validate()?;
        if self.trust_domain.is_empty() || self.trust_domain.contains('/') {
            return Err(format!(
                "trust_domain {:?} is not a valid trust domain",
                self.trust_domain
            ));
        }
        let mut policy_keys = BTreeSet::new();
        for (index, policy) in self.policies.iter().enumerate() {
            if policy.name.is_empty() || policy.namespace.is_empty() {
                return Err(format!(
                    "policies[{index}]: name and namespace are required"
                ));
            }
            if !policy_keys.insert(policy.key()) {
                return Err(format!(
                    "policies[{index}]: duplicate policy {}",
                    policy.key()
                ));
            }
            let accounts = policy
                .groups
                .iter()
                .flat_map(|group| &group.rules)
                .flat_map(|rule| &rule.matches)
                .flat_map(|m| m.service_accounts.iter().chain(&m.not_service_accounts));
            for account in accounts {
                crate::security::authorization::check_service_account(account)
                    .map_err(|e| format!("policies[{index}] ({}): {e}", policy.key()))?;
            }
        }
        let service_keys: BTreeSet<String> = self.services.iter().map(ServiceConfig::key).collect();
        for (index, service) in self.services.iter().enumerate() {
            if service.vips.is_empty() || service.ports.is_empty() {
                return Err(format!(
                    "services[{index}] ({}): needs vips and ports",
                    service.key()
                ));
            }
        }
        // With a control plane, services may come from it instead.
        let unknown_service = |backs: &[String]| {
            backs
                .iter()
                .find(|key| self.xds.is_none() && !service_keys.contains(*key))
                .cloned()
        };
        for (index, workload) in self.workloads.iter().enumerate() {
            if let Some(key) = unknown_service(&workload.services) {
                return Err(format!(
                    "workloads[{index}] ({}): unknown service {key}",
                    workload.name
                ));
            }
        }
        // Converted again when the table is built; here only to refuse a
        // bad file up front.
        crate::routing::file::table(&self.routing).map_err(|e| format!("routing.{e}"))?;
        let mut seen_netns = BTreeSet::new();
        let mut seen_ids = BTreeSet::new();
        for (index, pod) in self.pods.iter().enumerate() {
            let at = format!("pods[{index}] ({})", pod.id());
            if !pod.netns.is_absolute() {
                return Err(format!("{at}: netns must be an absolute path"));
            }
            if !seen_netns.insert(pod.netns.clone()) {
                return Err(format!(
                    "{at}: netns {} is used by another pod",
                    pod.netns.display()
                ));
            }
            if !seen_ids.insert(pod.id()) {
                return Err(format!("{at}: duplicate pod"));
            }
            if let Some(key) = unknown_service(&pod.services) {
                return Err(format!("{at}: unknown service {key}"));
            }
            if let Some(unknown) = pod
                .authorization_policies
                .iter()
                .find(|key| !policy_keys.contains(*key))
            {
                return Err(format!(
                    "{at}: authorization_policies names unknown policy {unknown}"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_demo_config_parses() {
        let config = Config::parse(DEMO_CONFIG, "demo").expect("demo config");
        assert_eq!(config.pods.len(), 2);
        assert!(!config.capture.accelerate);
    }

    #[test]
    fn unknown_field_is_rejected_with_its_name() {
        let error = Config::parse("node: n\nnodez: x\n", "test").unwrap_err();
        assert!(error.to_string().contains("nodez"), "{error}");
    }

    #[test]
    fn bad_cidr_is_rejected() {
        let error = Config::parse("node: n\ncapture: {exclude_cidrs: [10.0.0.0/40]}\n", "t")
            .unwrap_err()
            .to_string();
        assert!(error.contains("prefix length"), "{error}");
    }

    #[test]
    fn duplicate_netns_is_rejected() {
        let text = "node: n\npods:\n- {name: a, netns: /run/netns/x, ip: 10.0.0.1}\n- {name: b, netns: /run/netns/x, ip: 10.0.0.2}\n";
        let error = Config::parse(text, "t").unwrap_err().to_string();
        assert!(error.contains("used by another pod"), "{error}");
    }

    #[test]
    fn the_module_doc_example_parses() {
        let source = include_str!("config.rs");
        let example: String = source
            .lines()
            .skip_while(|line| *line != "//! ```yaml")
            .skip(1)
            .take_while(|line| *line != "//! ```")
            .map(|line| {
                let text = line
                    .strip_prefix("//! ")
                    .unwrap_or(line.trim_start_matches("//!"));
                format!("{text}\n")
            })
            .collect();
        let config = Config::parse(&example, "doc").expect("doc example");
        assert_eq!(config.routing.route_configs.len(), 1);
        assert_eq!(config.routing.clusters.len(), 1);
    }

    #[test]
    fn routing_is_validated_with_the_entry_named() {
        let valid = "node: n\nrouting:\n  route_configs:\n  - name: svc\n    virtual_hosts:\n    - {name: vh, domains: ['*'], routes: [{match: {prefix: /}, route: {cluster: c, timeout: 1s}}]}\n";
        let config = Config::parse(valid, "t").expect("valid");
        assert_eq!(config.routing.route_configs.len(), 1);
        let error = Config::parse(&valid.replace("timeout: 1s", "host_rewrite_header: x"), "t")
            .unwrap_err()
            .to_string();
        assert!(error.contains("host_rewrite_header"), "{error}");
        let error = Config::parse(&format!("{valid}  - name: svc\n"), "t")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("routing.route_configs[1] (svc): a second"),
            "{error}"
        );
    }

    #[test]
    fn tracing_is_validated() {
        let config = Config::parse("node: n\n", "t").expect("defaults");
        assert_eq!(config.tracing, TracingConfig::default());
        assert_eq!(config.tracing.sampling, 1.0);
        let config = Config::parse(
            "node: n\ntracing: {otlp_endpoint: 'http://10.0.0.1:4317', sampling: 100}\n",
            "t",
        )
        .expect("valid");
        assert_eq!(config.tracing.sampling, 100.0);
        for bad in [
            "tracing: {sampling: 101}",
            "tracing: {sampling: -1}",
            "tracing: {otlp_endpoint: '10.0.0.1:4317'}",
            "tracing: {otlp_endpoint: 'https://collector:4317'}",
            "tracing: {samplng: 1}",
        ] {
            let error = Config::parse(&format!("node: n\n{bad}\n"), "t").unwrap_err();
            assert!(
                error.to_string().contains("tracing") || error.to_string().contains("samplng"),
                "{bad}: {error}"
            );
        }
    }

    /// Every field of `Config` is either re-applied on reload or reported as
    /// restart-only: the field names come from serde's own list, so a new
    /// field fails here until it is sorted into one of the two.
    #[test]
    fn every_config_field_is_live_or_restart_only() {
        let error = Config::parse("node: n\nno_such_field: 1\n", "t")
            .unwrap_err()
            .to_string();
        let expected = error
            .split_once("expected one of")
            .map(|(_, list)| list)
            .unwrap_or_else(|| panic!("no field list in {error}"));
        let fields: BTreeSet<&str> = expected.split('`').skip(1).step_by(2).collect();
        let live: BTreeSet<&str> = LIVE_FIELDS.iter().copied().collect();
        let restart: BTreeSet<&str> = RESTART_FIELDS.iter().copied().collect();
        assert!(live.is_disjoint(&restart), "{live:?} / {restart:?}");
        let sorted: BTreeSet<&str> = live.union(&restart).copied().collect();
        assert_eq!(fields, sorted, "sort each field into LIVE or RESTART");
    }

    #[test]
    fn a_reload_names_each_changed_restart_only_field() {
        let base = "node: n\n";
        let changes = [
            ("node", "node: m\n"),
            ("instance", "node: n\ninstance: other\n"),
            ("bpffs", "node: n\nbpffs: /tmp/bpf\n"),
            ("cgroup", "node: n\ncgroup: {pods_parent: kubepods}\n"),
            ("capture", "node: n\ncapture: {exclude_ports: [22]}\n"),
            ("trust_domain", "node: n\ntrust_domain: example.org\n"),
            ("ca", "node: n\nca: {cert_ttl_seconds: 60}\n"),
            ("same_node", "node: n\nsame_node: mtls\n"),
            ("xds", "node: n\nxds: {address: 'http://10.0.0.1:15010'}\n"),
            ("locality", "node: n\nlocality: {zone: z1}\n"),
            ("network", "node: n\nnetwork: net1\n"),
            (
                "local_xds_path",
                "node: n\nlocal_xds_path: /etc/ztunnel/local.yaml\n",
            ),
            ("kubernetes", "node: n\nkubernetes: {drain_seconds: 5}\n"),
            ("tracing", "node: n\ntracing: {sampling: 50}\n"),
            (
                "hbone_client",
                "node: n\nhbone_client: {idle_timeout_seconds: 30}\n",
            ),
            (
                "pods",
                "node: n\npods: [{name: a, netns: /run/netns/a, ip: 10.0.0.1}]\n",
            ),
            (
                "workloads",
                "node: n\nworkloads: [{name: w, ip: 10.0.0.2}]\n",
            ),
            (
                "policies",
                "node: n\npolicies: [{name: p, namespace: default, action: DENY}]\n",
            ),
            (
                "services",
                "node: n\nservices: [{hostname: s, vips: [10.96.0.1], ports: [{service_port: 80, target_port: 80}]}]\n",
            ),
            ("access_log", "node: n\naccess_log: {enabled: false}\n"),
            ("metrics", "node: n\nmetrics: {requests: false}\n"),
            ("dns", "node: n\ndns: {capture: false}\n"),
            (
                "routing",
                "node: n\nrouting: {clusters: [{name: 'outbound|80||s.default.svc.cluster.local', connect_timeout: 1s}]}\n",
            ),
            ("proxy", "node: n\nproxy: {idle_timeout_ms: 0}\n"),
        ];
        let covered: BTreeSet<&str> = changes.iter().map(|(name, _)| *name).collect();
        let all: BTreeSet<&str> = LIVE_FIELDS.iter().chain(RESTART_FIELDS).copied().collect();
        assert_eq!(covered, all, "one change per field");
        let old = Config::parse(base, "old").expect("base");
        assert!(old.restart_only_changes(&old).is_empty());
        for (name, text) in changes {
            let new = Config::parse(text, name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_ne!(old, new, "{name}: the change changes nothing");
            let expected: Vec<&str> = if RESTART_FIELDS.contains(&name) {
                vec![name]
            } else {
                Vec::new()
            };
            assert_eq!(old.restart_only_changes(&new), expected, "{name}");
        }
    }

    #[test]
    fn hbone_client_settings_default_to_ztunnels_and_refuse_zero() {
        let config = Config::parse(
            "node: n\nhbone_client: {keepalive_interval_seconds: 2}\n",
            "t",
        )
        .expect("parsed");
        assert_eq!(config.hbone_client.keepalive_interval_seconds, 2);
        assert_eq!(config.hbone_client.keepalive_timeout_seconds, 20);
        assert_eq!(config.hbone_client.idle_timeout_seconds, 300);
        let error = Config::parse("node: n\nhbone_client: {idle_timeout_seconds: 0}\n", "t")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("hbone_client.idle_timeout_seconds: at least 1"),
            "{error}"
        );
    }

    #[test]
    fn proxy_limits_default_and_are_validated() {
        let config = Config::parse("node: n\n", "t").expect("defaults");
        assert_eq!(config.proxy, ProxyConfig::default());
        assert_eq!(config.proxy.handshake_timeout_ms, 10_000);
        assert_eq!(config.proxy.stream_idle_timeout_ms, 300_000);
        for bad in [
            "proxy: {handshake_timeout_ms: 0}",
            "proxy: {request_headers_timeout_ms: 0}",
            "proxy: {max_connections: 0}",
            "proxy: {max_connections_per_pod: 0}",
            "proxy: {idle_timeout: 5}",
        ] {
            let error = Config::parse(&format!("node: n\n{bad}\n"), "t").unwrap_err();
            assert!(
                error.to_string().contains("proxy") || error.to_string().contains("idle_timeout"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn cidr_defaults_to_host_prefix() {
        let cidr: Cidr = "10.1.2.3".parse().expect("cidr");
        assert_eq!(cidr.prefix_len, 32);
        let cidr: Cidr = "fd00::1".parse().expect("cidr");
        assert_eq!(cidr.prefix_len, 128);
        let cidr: Cidr = "::ffff:10.1.0.0/16".parse().expect("cidr");
        assert_eq!(cidr.addr, IpAddr::from([10, 1, 0, 0]));
        let error = "fd00::/129".parse::<Cidr>().unwrap_err();
        assert!(error.contains("0..=128"), "{error}");
    }

    #[test]
    fn exclusions_take_both_families() {
        let config = Config::parse(
            "node: n\ncapture: {exclude_cidrs: [169.254.0.0/16, 'fd00:ec2::/32']}\n",
            "t",
        )
        .expect("config");
        assert_eq!(config.capture.exclude_cidrs.len(), 2);
        assert!(config.capture.exclude_cidrs[1].addr.is_ipv6());
    }

    #[test]
    fn a_pod_lists_every_address_or_the_older_single_one() {
        let pod = |addresses: &str| {
            Config::parse(
                &format!(
                    "node: n\npods:\n- {{name: a, netns: /run/netns/a, {addresses}}}\nworkloads:\n- {{name: w, {addresses}}}\n"
                ),
                "t",
            )
        };
        let config = pod("ips: [10.0.0.2, 'fd00::2']").expect("dual stack");
        let both: Vec<IpAddr> = vec![[10, 0, 0, 2].into(), "fd00::2".parse().expect("v6")];
        assert_eq!(config.pods[0].ips, both);
        assert_eq!(config.workloads[0].ips, both);
        // Unquoted in YAML too.
        assert_eq!(
            pod("ips: [10.0.0.2, fd00::2]").expect("plain").pods[0].ips,
            both
        );
        let config = pod("ip: 10.0.0.2").expect("single");
        assert_eq!(config.pods[0].ips, vec![IpAddr::from([10, 0, 0, 2])]);
        assert_eq!(
            pod("ip: 'fd00::2'").expect("v6 only").pods[0].ips,
            vec!["fd00::2".parse::<IpAddr>().expect("v6")]
        );
        for (bad, expected) in [
            ("ip: 10.0.0.2, ips: [10.0.0.3]", "not both"),
            ("interface: eth0", "no address"),
            ("ips: []", "empty"),
            ("ips: [10.0.0.2, 10.0.0.2]", "listed twice"),
            ("ips: [10.0.0.2, 10.0.0.3]", "at most one IPv4"),
            ("ips: [10.0.0.2, nonsense]", "invalid IP address"),
        ] {
            let error = pod(bad).unwrap_err().to_string();
            assert!(error.contains(expected), "{bad}: {error}");
        }
    }
}
