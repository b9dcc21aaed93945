//! L7 routing state: what Envoy's `RouteConfiguration` and `Cluster`
//! resources say, parsed once into typed values. The proxy reads a snapshot
//! per request (arc-swap); xDS and the local file replace it whole.
//!
//! Binding (Weir's convention, documented in the README):
//! - a `RouteConfiguration` named `<service hostname>` applies to every port
//!   of that service, one named `<hostname>:<port>` to that port only (it
//!   wins over the hostname-wide one);
//! - a route's cluster is looked up by name among the `Cluster` resources;
//!   a name in Istio's form `outbound|<port>|<subset>|<hostname>` that has no
//!   `Cluster` resource means "the endpoints of that service port" with
//!   default settings.
pub mod balance;
pub mod envoy;
pub mod file;
pub mod limits;
pub mod matching;
pub mod outlier;
pub mod schema;
pub mod upstream_tls;

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use http::{HeaderName, HeaderValue, Method, StatusCode};

/// Every route configuration and cluster, keyed for the request path.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// By `hostname` or `hostname:port`.
    pub route_configs: HashMap<String, Arc<RouteConfig>>,
    pub clusters: HashMap<String, Arc<ClusterConfig>>,
    /// EDS: the endpoints of `ClusterEndpoints::Eds` clusters, by the
    /// `ClusterLoadAssignment`'s `cluster_name`.
    pub assignments: HashMap<String, Arc<Assignment>>,
}

/// Envoy's `ClusterLoadAssignment` (EDS), converted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub cluster_name: String,
    /// The endpoints Envoy would send to (not unhealthy or draining).
    pub endpoints: Vec<LbAddress>,
}

/// Envoy's `original_dst_lb_config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginalDst {
    /// `use_http_header`: the destination is the `ip:port` in this header
    /// (Envoy's `x-envoy-original-dst-host` unless renamed) when present.
    pub header: Option<HeaderName>,
    /// `upstream_port_override`.
    pub port: Option<u16>,
}

/// A DNS cluster's names and how they are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsCluster {
    pub targets: Vec<DnsTarget>,
    /// `LOGICAL_DNS`: only the first address of a name is used.
    pub logical: bool,
    /// `dns_refresh_rate` (Envoy's default 5 s).
    pub refresh: Duration,
    pub family: DnsFamily,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsTarget {
    pub host: String,
    pub port: u16,
    pub priority: u32,
    /// As [`LbAddress::locality`].
    pub locality: Option<(u32, u32)>,
}

/// Envoy's `dns_lookup_family`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsFamily {
    /// IPv6 addresses if there are any, else IPv4 (Envoy's default).
    Auto,
    V4Only,
    V6Only,
    /// IPv4 addresses if there are any, else IPv6.
    V4Preferred,
    All,
}

impl DnsFamily {
    /// The addresses of one answer this family keeps.
    pub fn keep(self, addresses: Vec<SocketAddr>) -> Vec<SocketAddr> {
        let (v4, v6): (Vec<SocketAddr>, Vec<SocketAddr>) =
            addresses.into_iter().partition(SocketAddr::is_ipv4);
        match self {
            DnsFamily::Auto if v6.is_empty() => v4,
            DnsFamily::Auto | DnsFamily::V6Only => v6,
            DnsFamily::V4Preferred if v4.is_empty() => v6,
            DnsFamily::V4Preferred | DnsFamily::V4Only => v4,
            DnsFamily::All => v4.into_iter().chain(v6).collect(),
        }
    }
}

/// An endpoint's address and its priority: Envoy's failover level, 0 first
/// (istiod's locality failover).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LbAddress {
    pub address: SocketAddr,
    pub priority: u32,
    /// Its locality (index in the assignment) and that locality's
    /// `load_balancing_weight` (0 when unset), when the assignment weighs
    /// its localities.
    pub locality: Option<(u32, u32)>,
}

impl From<SocketAddr> for LbAddress {
    fn from(address: SocketAddr) -> LbAddress {
        LbAddress {
            address,
            priority: 0,
            locality: None,
        }
    }
}

impl RouteTable {
    /// The route configuration for a service port: `hostname:port` first,
    /// then `hostname`.
    pub fn for_service(&self, hostname: &str, port: u16) -> Option<Arc<RouteConfig>> {
        self.route_configs
            .get(&format!("{hostname}:{port}"))
            .or_else(|| self.route_configs.get(hostname))
            .cloned()
    }
}

/// The current table, swapped whole on every update.
#[derive(Default)]
pub struct Routes {
    table: ArcSwap<RouteTable>,
}

impl Routes {
    pub fn snapshot(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    pub fn replace(&self, table: RouteTable) {
        self.table.store(Arc::new(table));
    }
}

/// Envoy's `RouteConfiguration`.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
    /// Applied to every response / request of every route, after the
    /// virtual host's and the route's own.
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
}

impl RouteConfig {
    /// Every request to the service port itself: what a port declared HTTP
    /// gets without a route configuration. As in the route istiod writes
    /// for a service port, there is no timeout (`timeout: 0s`) and a gRPC
    /// request's own `grpc-timeout` applies (`max_grpc_timeout: 0s`).
    pub fn to_service(hostname: &str, port: u16) -> RouteConfig {
        let cluster = format!("outbound|{port}||{hostname}");
        RouteConfig {
            name: format!("{hostname}:{port}"),
            virtual_hosts: vec![VirtualHost {
                name: "default".into(),
                domains: vec!["*".into()],
                routes: vec![Route {
                    name: "default".into(),
                    matcher: RouteMatch::default(),
                    action: RouteAction::Forward(Box::new(ForwardAction {
                        clusters: vec![WeightedCluster {
                            name: cluster,
                            weight: 1,
                            request_headers: HeaderOps::default(),
                            response_headers: HeaderOps::default(),
                            host_rewrite: None,
                        }],
                        timeout: Some(Duration::ZERO),
                        retry_policy: None,
                        prefix_rewrite: None,
                        host_rewrite: None,
                        mirrors: Vec::new(),
                        hash_policies: Vec::new(),
                        grpc_timeout: Some(GrpcTimeout {
                            max: None,
                            offset: Duration::ZERO,
                        }),
                        max_stream_duration: None,
                        cluster_not_found: StatusCode::SERVICE_UNAVAILABLE,
                        regex_rewrite: None,
                    })),
                    request_headers: HeaderOps::default(),
                    response_headers: HeaderOps::default(),
                    fault: None,
                    session: None,
                    cors: None,
                }],
                retry_policy: None,
                request_headers: HeaderOps::default(),
                response_headers: HeaderOps::default(),
                attempt_count_to_upstream: false,
                attempt_count_to_client: false,
                require_tls: false,
                cors: None,
            }],
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct VirtualHost {
    pub name: String,
    /// Envoy's domain forms: exact, `*.suffix`, `prefix*`, `*`; matched
    /// against the request's host without port, case-insensitively.
    pub domains: Vec<String>,
    /// First match wins.
    pub routes: Vec<Route>,
    /// Used by routes that have no retry policy of their own.
    pub retry_policy: Option<RetryPolicy>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    /// Envoy's `include_request_attempt_count`: `x-envoy-attempt-count` on
    /// each upstream request (1 for the first try).
    pub attempt_count_to_upstream: bool,
    /// `include_attempt_count_in_response`: the same header on the
    /// response to the client.
    pub attempt_count_to_client: bool,
    /// Its CORS policy, already merged under each route's.
    pub cors: Option<Arc<Cors>>,
    /// `require_tls: ALL` (istiod's Gateway `httpsRedirect`): every request,
    /// plaintext as all that reach the node proxy are, gets a 301 to
    /// `https://` instead of a route.
    pub require_tls: bool,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub matcher: RouteMatch,
    pub action: RouteAction,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    /// `typed_per_filter_config["envoy.filters.http.fault"]`.
    pub fault: Option<Fault>,
    /// `typed_per_filter_config["envoy.filters.http.stateful_session"]`.
    pub session: Option<StatefulSession>,
    /// `typed_per_filter_config["envoy.filters.http.cors"]` (or the older
    /// `cors` field), over the virtual host's.
    pub cors: Option<Arc<Cors>>,
}

/// Envoy's stateful session (Istio's persistent sessions): the endpoint a
/// client was sent to travels in a header or a cookie (base64 of its
/// `ip:port`), and later requests that bring it go to that endpoint.
#[derive(Debug, Clone)]
pub struct StatefulSession {
    pub state: SessionState,
    /// That endpoint ejected: 503 instead of another endpoint; not in the
    /// cluster: `not_found`.
    pub strict: bool,
    pub not_found: StatusCode,
}

#[derive(Debug, Clone)]
pub enum SessionState {
    /// `HeaderBasedSessionState`: the request header, and the response
    /// header that names a new endpoint.
    Header(HeaderName),
    /// `CookieBasedSessionState`: the cookie, set when the endpoint changes.
    Cookie(CookieSpec),
}

/// Envoy's CORS policy (Istio's VirtualService `corsPolicy`). A route's
/// policy is merged over its virtual host's field by field, as Envoy's
/// filter reads them ([`Cors::over`]): an empty list or string, or `None`,
/// is a field the policy does not set.
#[derive(Debug, Clone)]
pub struct Cors {
    /// A request's `Origin` is allowed if one matches it (or matches `*`).
    pub allow_origins: Vec<StringMatcher>,
    /// Header values for a preflight's answer (empty: not sent).
    pub allow_methods: String,
    pub allow_headers: String,
    pub max_age: String,
    /// Sent on actual responses.
    pub expose_headers: String,
    pub allow_credentials: Option<bool>,
    /// Answer `Access-Control-Request-Private-Network` preflights.
    pub allow_private_network_access: Option<bool>,
    /// A preflight whose origin is not allowed goes on to the route
    /// (Envoy's default) instead of getting an empty 200.
    pub forward_not_matching_preflights: Option<bool>,
    /// `filter_enabled`: the fraction of requests the policy applies to;
    /// the most specific policy's decides.
    pub enabled: f64,
}

impl Cors {
    /// This (more specific) policy over `other`: each field from the first
    /// of the two that sets it.
    pub fn over(&self, other: &Cors) -> Cors {
        let text = |mine: &String, theirs: &String| {
            if mine.is_empty() {
                theirs.clone()
            } else {
                mine.clone()
            }
        };
        Cors {
            allow_origins: if self.allow_origins.is_empty() {
                other.allow_origins.clone()
            } else {
                self.allow_origins.clone()
            },
            allow_methods: text(&self.allow_methods, &other.allow_methods),
            allow_headers: text(&self.allow_headers, &other.allow_headers),
            max_age: text(&self.max_age, &other.max_age),
            expose_headers: text(&self.expose_headers, &other.expose_headers),
            allow_credentials: self.allow_credentials.or(other.allow_credentials),
            allow_private_network_access: self
                .allow_private_network_access
                .or(other.allow_private_network_access),
            forward_not_matching_preflights: self
                .forward_not_matching_preflights
                .or(other.forward_not_matching_preflights),
            enabled: self.enabled,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RouteMatch {
    pub path: PathMatch,
    /// Path matching is case-sensitive unless this is false.
    pub case_sensitive: bool,
    /// All must match. `:method` is matched here, as in Envoy.
    pub headers: Vec<HeaderMatch>,
    /// All must match.
    pub query_parameters: Vec<QueryParameterMatch>,
    /// Only gRPC requests (`content-type: application/grpc*`).
    pub grpc: bool,
}

impl Default for RouteMatch {
    /// Matches everything; paths case-sensitively, as in Envoy.
    fn default() -> Self {
        RouteMatch {
            path: PathMatch::Any,
            case_sensitive: true,
            headers: Vec::new(),
            query_parameters: Vec::new(),
            grpc: false,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub enum PathMatch {
    /// No path specifier: every path (Envoy requires one; the file may omit).
    #[default]
    Any,
    Prefix(String),
    Exact(String),
    /// Must match the whole path (without the query).
    Regex(Regex),
    /// Envoy's `path_separated_prefix`: `/api` matches `/api` and `/api/x`,
    /// not `/apix`.
    SeparatedPrefix(String),
    /// Envoy's `connect_matcher`: CONNECT requests only (whose HTTP/1.1
    /// target has no path for the others to match).
    Connect,
}

/// A compiled regex that still prints its source.
#[derive(Clone)]
pub struct Regex(pub regex::Regex);

impl std::fmt::Debug for Regex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "/{}/", self.0.as_str())
    }
}

#[derive(Debug, Clone)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    /// Anchored: must match the whole value.
    Regex(Regex),
}

#[derive(Debug, Clone)]
pub struct StringMatcher {
    pub kind: StringMatch,
    pub ignore_case: bool,
}

#[derive(Debug, Clone)]
pub struct HeaderMatch {
    /// Lowercase; may be a pseudo-header (`:method`, `:path`,
    /// `:authority`), which `HeaderName` cannot hold.
    pub name: String,
    /// `None`: the header must be present (`present_match: true`); with
    /// `invert`, absent.
    pub value: Option<StringMatcher>,
    pub invert: bool,
    /// Envoy's `treat_missing_header_as_empty`.
    pub missing_as_empty: bool,
}

#[derive(Debug, Clone)]
pub struct QueryParameterMatch {
    pub name: String,
    /// `None`: present with any value.
    pub value: Option<StringMatcher>,
}

#[derive(Debug, Clone)]
pub enum RouteAction {
    Forward(Box<ForwardAction>),
    Redirect(Redirect),
    DirectResponse {
        status: StatusCode,
        body: Option<bytes::Bytes>,
    },
}

#[derive(Debug, Clone)]
pub struct ForwardAction {
    /// One entry with weight 1 for a plain `cluster`; weighted otherwise.
    pub clusters: Vec<WeightedCluster>,
    /// Whole request, including retries. `None`: Envoy's default of 15 s;
    /// `Some(Duration::ZERO)`: no timeout.
    pub timeout: Option<Duration>,
    pub retry_policy: Option<RetryPolicy>,
    pub prefix_rewrite: Option<String>,
    pub host_rewrite: Option<HeaderValue>,
    pub mirrors: Vec<Mirror>,
    /// First one that yields a value decides (ring hash clusters only).
    pub hash_policies: Vec<HashPolicy>,
    /// `max_grpc_timeout`/`grpc_timeout_offset`: a gRPC request's
    /// `grpc-timeout` replaces the route timeout.
    pub grpc_timeout: Option<GrpcTimeout>,
    /// `max_stream_duration`: the whole exchange, response body included.
    pub max_stream_duration: Option<StreamDuration>,
    /// `cluster_not_found_response_code`: 503 (Envoy's default), 404 or 500.
    pub cluster_not_found: StatusCode,
    /// `regex_rewrite`: the path (not the query) rewritten by a regex,
    /// every match replaced; the substitution in `regex` crate syntax.
    pub regex_rewrite: Option<(Regex, String)>,
}

/// How a request's `grpc-timeout` header becomes a timeout (Envoy's
/// `max_grpc_timeout` and `grpc_timeout_header_max`): the header's value
/// less `offset`, at most `max` (`None`: uncapped). A header of 0 means no
/// timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcTimeout {
    pub max: Option<Duration>,
    pub offset: Duration,
}

/// Envoy's route `max_stream_duration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamDuration {
    /// `None`: no limit of its own (0 or unset).
    pub max: Option<Duration>,
    /// `grpc_timeout_header_max`/`_offset`: a gRPC request's own deadline
    /// becomes the stream's limit.
    pub grpc: Option<GrpcTimeout>,
}

#[derive(Debug, Clone)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u32,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    /// `host_rewrite_literal` for this cluster's share (istiod's
    /// `headers.request.set.host` on a weighted destination); wins over
    /// the route's.
    pub host_rewrite: Option<HeaderValue>,
}

#[derive(Debug, Clone)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub prefix_rewrite: Option<String>,
    /// 301, 302, 303, 307 or 308.
    pub status: StatusCode,
    pub strip_query: bool,
}

#[derive(Debug, Clone)]
pub struct Mirror {
    pub cluster: String,
    /// Fraction of requests mirrored, 0.0 to 1.0.
    pub fraction: f64,
}

#[derive(Debug, Clone)]
pub enum HashPolicy {
    Header(HeaderName),
    Cookie(CookieSpec),
    SourceIp,
    QueryParameter(String),
}

/// A cookie as Envoy's cookie hash policy and cookie-based sessions
/// describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieSpec {
    pub name: String,
    /// With a ttl, a request without the cookie gets one made up by the
    /// proxy (from the client's address, as Envoy does), hashed at once and
    /// set on the response with this `Max-Age` (0: a session cookie).
    pub ttl: Option<Duration>,
    pub path: String,
    /// More `Set-Cookie` attributes: (name, value; empty for a flag).
    pub attributes: Vec<(String, String)>,
}

#[derive(Debug, Clone, Default)]
pub struct RetryPolicy {
    pub retry_on: RetryOn,
    /// Retries after the first try (Envoy's default: 1).
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    /// Envoy's defaults: 25 ms base, 10 × base max; full jitter.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// `host_selection_retry_max_attempts`: how many more picks a retry
    /// makes to find an endpoint it has not tried (Envoy's default 1;
    /// istiod sets 5).
    pub host_selection_attempts: u32,
    /// `retry_priority` `envoy.retry_priorities.previous_priorities`
    /// (Istio's `retryRemoteLocalities`): its `update_frequency`. Attempts
    /// go in blocks of that many; each block's priority load leaves out
    /// the priorities the earlier blocks went to (all of them again once
    /// every priority has been tried).
    pub previous_priorities: Option<u32>,
}

/// Envoy's `retry_on` conditions that Weir supports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// Any 5xx response, a reset, a connect failure or a per-try timeout.
    pub five_xx: bool,
    /// 502, 503, 504, a reset or connect failure.
    pub gateway_error: bool,
    /// The upstream reset / closed before a response.
    pub reset: bool,
    pub connect_failure: bool,
    /// Statuses listed in `retriable_status_codes`.
    pub retriable_status_codes: bool,
    pub status_codes: Vec<u16>,
    /// gRPC `grpc-status` values: cancelled (1), deadline-exceeded (4),
    /// resource-exhausted (8), unavailable (14), internal (13).
    pub grpc_statuses: Vec<u32>,
}

#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    /// `append_if_exists_or_add` (true) or `overwrite_if_exists_or_add`.
    pub add: Vec<(HeaderName, HeaderValue, bool)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<(FaultAbort, f64)>,
}

#[derive(Debug, Clone, Copy)]
pub enum FaultAbort {
    Http(StatusCode),
    Grpc(u32),
}

/// Envoy's `Cluster`, the parts Weir uses.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    pub name: String,
    pub endpoints: ClusterEndpoints,
    pub lb_policy: LbPolicy,
    pub connect_timeout: Duration,
    /// What to speak to the endpoints.
    pub protocol: UpstreamProtocol,
    /// How the cluster's upstream connections are kept.
    pub pool: PoolSettings,
    /// `common_lb_config.healthy_panic_threshold` (percent): below this
    /// share of healthy endpoints, all are candidates; 0 never. `None`:
    /// Weir's default, all are candidates only when none is healthy.
    pub panic_threshold: Option<f64>,
    /// `common_lb_config.locality_weighted_lb_config`: within a priority,
    /// a locality is chosen first by its weight and health, then an
    /// endpoint in it (Envoy ignores locality weights otherwise).
    pub locality_weighted: bool,
    /// Round robin's or least request's `slow_start_config` (Istio's
    /// `warmupDurationSecs`).
    pub slow_start: Option<SlowStart>,
    pub circuit_breakers: Thresholds,
    pub outlier_detection: Option<OutlierDetection>,
    /// Whether the proxy originates TLS to the endpoints.
    pub tls: upstream_tls::UpstreamTls,
    /// The PROXY protocol header sent first on each upstream connection.
    pub proxy_protocol: Option<upstream_tls::ProxyProtocol>,
}

impl ClusterConfig {
    /// A cluster of `endpoints` with Envoy's defaults (round robin, a 5 s
    /// connect timeout, default limits, nothing else set) speaking
    /// `protocol`: an Istio-named cluster no resource describes, and the
    /// base the others are read over.
    pub fn with_defaults(
        name: &str,
        endpoints: ClusterEndpoints,
        protocol: UpstreamProtocol,
    ) -> ClusterConfig {
        ClusterConfig {
            name: name.to_string(),
            endpoints,
            lb_policy: LbPolicy::RoundRobin,
            connect_timeout: Duration::from_secs(5),
            protocol,
            pool: PoolSettings::default(),
            panic_threshold: None,
            locality_weighted: false,
            slow_start: None,
            circuit_breakers: Thresholds::default(),
            outlier_detection: None,
            tls: upstream_tls::UpstreamTls::Mesh,
            proxy_protocol: None,
        }
    }
}

/// Envoy's slow start: an endpoint younger than `window` (since it joined
/// the cluster) gets a share of the traffic scaled by
/// `max(min_weight, (max(age, 1 s) / window) ^ (1 / aggression))`.
/// Endpoints there when the cluster is made join then, as in Envoy (a new
/// cluster's endpoints all warm alike, so none is favoured).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowStart {
    pub window: Duration,
    /// Envoy's default 1.0 (linear).
    pub aggression: f64,
    /// Envoy's default 10 %, as a fraction.
    pub min_weight: f64,
}

impl SlowStart {
    /// The weight factor of an endpoint `age` old, 1 past the window.
    pub fn factor(&self, age: Duration) -> f64 {
        if age >= self.window || self.window.is_zero() {
            return 1.0;
        }
        // Envoy counts at least a second of membership.
        let time = age.as_secs_f64().max(1.0) / self.window.as_secs_f64();
        time.powf(1.0 / self.aggression).max(self.min_weight)
    }
}

/// Envoy's connection-pool settings (Istio's DestinationRule
/// `connectionPool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolSettings {
    /// `max_requests_per_connection`: a connection serves at most this many
    /// requests (streams on HTTP/2), then closes once idle.
    pub max_requests_per_connection: Option<u32>,
    /// `common_http_protocol_options.idle_timeout`: an idle connection is
    /// closed after this long (Envoy's default 1 h; 0: never).
    pub idle_timeout: Option<Duration>,
    /// `upstream_connection_options.tcp_keepalive`, on plain TCP upstream
    /// connections (HBONE tunnels keep their own keepalive).
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// `common_http_protocol_options.max_connection_duration` (Istio's
    /// `connectionPool.tcp.maxConnectionDuration`): a connection this old
    /// takes no new request and closes once its requests end.
    pub max_connection_duration: Option<Duration>,
}

/// TCP keepalive settings; `None` fields keep the kernel's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpKeepalive {
    pub probes: Option<u32>,
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
}

/// A cluster's upstream HTTP version, as Envoy (and so Istio) picks it per
/// cluster, never from the client alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// Envoy's default, and `explicit_http_config.http_protocol_options`.
    Http1,
    /// `http2_protocol_options` or `explicit_http_config.http2_protocol_options`:
    /// istiod's choice for ports declared `http2` or `grpc`.
    Http2,
    /// `use_downstream_protocol_config` (istiod's choice for a port whose
    /// protocol is sniffed): the client's version.
    Downstream,
}

impl UpstreamProtocol {
    /// Whether a request from a client speaking HTTP/2 (`client_http2`)
    /// goes upstream as HTTP/2.
    pub fn http2(self, client_http2: bool) -> bool {
        match self {
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Http2 => true,
            UpstreamProtocol::Downstream => client_http2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEndpoints {
    /// Istio's naming: the endpoints of a service port, optionally only the
    /// workloads whose labels contain `subset`.
    Service {
        hostname: String,
        port: u16,
        subset: Vec<(String, String)>,
    },
    /// `load_assignment` with literal addresses (STATIC clusters).
    Static(Vec<LbAddress>),
    /// `STRICT_DNS` / `LOGICAL_DNS`: names the proxy resolves.
    Dns(DnsCluster),
    /// `ORIGINAL_DST`: each request goes where its client was going (the
    /// address it dialled, or the one a header names), as the network
    /// would carry it.
    OriginalDst(OriginalDst),
    /// `type: EDS`: the endpoints of the `ClusterLoadAssignment` of this
    /// name (`eds_cluster_config.service_name`, else the cluster's name),
    /// none until one arrives.
    Eds(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    /// Power of `choice_count` choices (Envoy's default 2).
    LeastRequest {
        choice_count: u32,
    },
    Random,
    RingHash {
        minimum_ring_size: u64,
    },
    /// Envoy's Maglev: a lookup table of `table_size` (a prime) entries.
    Maglev {
        table_size: u64,
    },
}

impl LbPolicy {
    /// Balancers that choose by the request's hash.
    pub fn is_hash_based(self) -> bool {
        matches!(self, LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. })
    }
}

/// Envoy's `circuit_breakers.thresholds` (DEFAULT priority). Envoy's
/// defaults are 1024 for each limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
    /// `retry_budget`: retries allowed as a share of active requests, with
    /// a floor; replaces `max_retries` when set.
    pub retry_budget: Option<RetryBudget>,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            retry_budget: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    /// Percent of active requests (Envoy's default 20.0).
    pub budget_percent: f64,
    /// Always allowed (Envoy's default 3).
    pub min_retry_concurrency: u32,
}

/// Envoy's `outlier_detection`, the consecutive-error detectors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierDetection {
    /// 5xx (and locally originated failures) in a row. Envoy's default 5.
    /// 0: this detector is off (`enforcing_consecutive_5xx: 0`).
    pub consecutive_5xx: u32,
    /// 502/503/504 (and connect failures) in a row. Envoy's default 5.
    /// 0: off, which is Envoy's default (its enforcement defaults to 0 %);
    /// Weir turns it on when the threshold or its enforcement is set
    /// (see `envoy::convert_cluster`).
    pub consecutive_gateway_failure: u32,
    /// How often ejections are reviewed (default 10 s).
    pub interval: Duration,
    /// Ejected for `base_ejection_time × times ejected` (default 30 s).
    pub base_ejection_time: Duration,
    /// Up to this share of the endpoints ejected at once (default 10 %, at
    /// least one endpoint as in Envoy).
    pub max_ejection_percent: u32,
    /// `split_external_local_origin_errors` (Istio's
    /// `splitExternalLocalOriginErrors`): `Some(threshold)` counts local
    /// failures (connect failure, reset, timeout) apart, against
    /// `consecutive_local_origin_failure` (default 5; 0: that detector is
    /// off), and the 5xx and gateway detectors count responses only.
    /// `None`: local failures count as 5xx and gateway failures.
    pub consecutive_local_origin_failure: Option<u32>,
}

/// What a request carries that routing may look at. Built once per request.
pub struct RequestFacts<'a> {
    pub method: &'a Method,
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
}
