//! A service as every source describes it (the file's `services`, Istio's
//! workload API), and the table entry the proxy balances over: one per
//! service port, with its healthy endpoints.
use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use super::workload::{Locality, Source, Workload};
use crate::config::Config;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub source: Source,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    /// Service port → default target port.
    pub ports: Vec<(u16, u16)>,
    /// Declared protocols by service port (only the file declares them:
    /// Istio's workload API carries none).
    pub app_protocols: Vec<(u16, AppProtocol)>,
    /// The waypoint istiod binds the service to (`istio.io/use-waypoint`):
    /// traffic to its VIPs goes through it.
    pub waypoint: Option<super::workload::Waypoint>,
    pub load_balancing: LoadBalancing,
}

/// How a service's endpoints are chosen: istiod's `LoadBalancing` (set by
/// a Service's `trafficDistribution`, e.g. `PreferClose`), read as ztunnel
/// reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadBalancing {
    pub mode: BalanceMode,
    /// Compared in order with where the client is; the more leading scopes
    /// an endpoint shares, the better it ranks.
    pub scopes: Vec<BalanceScope>,
    /// `health_policy: ALLOW_ALL`: endpoints that are not ready are
    /// candidates too.
    pub allow_unhealthy: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BalanceMode {
    /// Every endpoint, by capacity; the scopes are ignored.
    #[default]
    Standard,
    /// Only endpoints that share every scope; none: the connection fails.
    Strict,
    /// The best-ranked endpoints; the others only when there are none.
    Failover,
    /// No endpoint is chosen: the connection goes to the address dialled.
    Passthrough,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalanceScope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

/// Where this agent's clients are, which load balancing compares endpoints
/// with. ztunnel compares the client workload's; every client of this
/// agent runs on this node, so the node's are theirs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    pub node: String,
    pub locality: Locality,
    pub network: String,
    pub cluster_id: String,
}

impl LoadBalancing {
    /// The file's services: this node's region, zone and node first, then
    /// anywhere.
    pub fn nearest() -> LoadBalancing {
        LoadBalancing {
            mode: BalanceMode::Failover,
            scopes: vec![BalanceScope::Region, BalanceScope::Zone, BalanceScope::Node],
            allow_unhealthy: false,
        }
    }

    /// How many leading scopes `target` shares with `here`; `None` when
    /// the mode excludes it.
    fn rank(&self, here: &Placement, target: &Workload) -> Option<usize> {
        if !matches!(self.mode, BalanceMode::Strict | BalanceMode::Failover) {
            return Some(0);
        }
        let rank = self
            .scopes
            .iter()
            .take_while(|scope| match scope {
                BalanceScope::Region => here.locality.region == target.locality.region,
                BalanceScope::Zone => here.locality.zone == target.locality.zone,
                BalanceScope::Subzone => here.locality.subzone == target.locality.subzone,
                BalanceScope::Node => here.node == target.node,
                BalanceScope::Cluster => here.cluster_id == target.cluster_id,
                BalanceScope::Network => here.network == target.network,
            })
            .count();
        (self.mode == BalanceMode::Failover || rank == self.scopes.len()).then_some(rank)
    }
}

impl Service {
    /// `namespace/hostname`: how workloads name the services they back,
    /// and the service's resource name in Istio's workload API.
    pub fn name(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }

    /// The file's services.
    pub fn from_file(config: &Config) -> Vec<Service> {
        config
            .services
            .iter()
            .map(|service| Service {
                source: Source::File,
                namespace: service.namespace.clone(),
                hostname: service.hostname.clone(),
                vips: service.vips.iter().map(|vip| vip.to_canonical()).collect(),
                ports: service
                    .ports
                    .iter()
                    .map(|p| (p.service_port, p.target_port))
                    .collect(),
                app_protocols: service
                    .ports
                    .iter()
                    .filter_map(|p| Some((p.service_port, p.protocol()?)))
                    .collect(),
                waypoint: None,
                load_balancing: LoadBalancing::nearest(),
            })
            .collect()
    }
}

/// A service port's declared protocol (Kubernetes' `appProtocol`, or
/// Istio's port-name convention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppProtocol {
    /// Opaque: never parsed (also TLS from the app and the databases Istio
    /// names: `https`, `tls`, `mongo`, `mysql`, `redis`).
    Tcp,
    /// HTTP/1.1, or HTTP/2 with prior knowledge if that is what arrives.
    Http,
    Http2,
    Grpc,
}

/// What `app_protocol` accepts, for the error message.
const PROTOCOLS: &str = "http, http2, grpc, grpc-web, tcp, https, tls, mongo, mysql, redis, \
                         kubernetes.io/h2c, kubernetes.io/ws, kubernetes.io/wss";

impl AppProtocol {
    /// Istio's protocol names (case-insensitive), as `appProtocol` values.
    pub fn from_name(name: &str) -> Option<AppProtocol> {
        Some(match name.to_ascii_lowercase().as_str() {
            "http" | "grpc-web" | "kubernetes.io/ws" => AppProtocol::Http,
            "http2" | "kubernetes.io/h2c" => AppProtocol::Http2,
            "grpc" => AppProtocol::Grpc,
            "tcp" | "https" | "tls" | "mongo" | "mysql" | "redis" | "kubernetes.io/wss" => {
                AppProtocol::Tcp
            }
            _ => return None,
        })
    }

    /// Istio's port-name convention: `<protocol>[-<suffix>]` (`http-web`,
    /// `grpc`, `tcp-db`); other names declare nothing and traffic is
    /// sniffed.
    pub fn from_port_name(port_name: &str) -> Option<AppProtocol> {
        if let Some(protocol) = AppProtocol::from_name(port_name) {
            return Some(protocol);
        }
        let (prefix, _) = port_name.split_once('-')?;
        // `grpc-web-…` before `grpc-…`.
        if port_name.to_ascii_lowercase().starts_with("grpc-web") {
            return Some(AppProtocol::Http);
        }
        AppProtocol::from_name(prefix)
    }
}

impl<'de> serde::Deserialize<'de> for AppProtocol {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        AppProtocol::from_name(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown app_protocol {name:?} (one of {PROTOCOLS})"
            ))
        })
    }
}

impl AppProtocol {
    pub fn is_http(self) -> bool {
        self != AppProtocol::Tcp
    }
}

/// One endpoint of a service port: a healthy workload and the port it
/// listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    pub target_port: u16,
}

impl Endpoint {
    /// The workload's address to dial for a destination of `family_of`'s
    /// family (a VIP, or a pod's address); another family when it has none.
    pub fn address_for(&self, family_of: IpAddr) -> IpAddr {
        let workload = &self.workload;
        workload
            .ips
            .iter()
            .find(|ip| ip.is_ipv4() == family_of.is_ipv4())
            .or(workload.ips.first())
            .copied()
            .unwrap_or(family_of)
    }

    /// The address to dial when no destination family applies (an L7
    /// cluster): IPv4 first, as Kubernetes lists dual-stack pods' IPs.
    pub fn address(&self) -> Option<IpAddr> {
        let ips = &self.workload.ips;
        ips.iter().find(|ip| ip.is_ipv4()).or(ips.first()).copied()
    }
}

/// A service port and its endpoints (the ready ones, unless the service
/// allows all), balanced by the service's load balancing. Replaced (a new
/// `Arc`) only when the service or one of its endpoints changes.
#[derive(Debug)]
pub struct ServiceEntry {
    /// `namespace/hostname`.
    pub name: String,
    pub port: u16,
    pub endpoints: Vec<Endpoint>,
    /// The port's declared protocol, when there is one.
    pub app_protocol: Option<AppProtocol>,
    /// The service's waypoint, if it has one.
    pub waypoint: Option<super::workload::Waypoint>,
    pub load_balancing: LoadBalancing,
    next: AtomicUsize,
}

impl PartialEq for ServiceEntry {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.port == other.port
            && self.endpoints == other.endpoints
            && self.app_protocol == other.app_protocol
            && self.waypoint == other.waypoint
            && self.load_balancing == other.load_balancing
    }
}

impl ServiceEntry {
    pub fn new(
        name: String,
        port: u16,
        endpoints: Vec<Endpoint>,
        app_protocol: Option<AppProtocol>,
        waypoint: Option<super::workload::Waypoint>,
        load_balancing: LoadBalancing,
    ) -> ServiceEntry {
        ServiceEntry {
            name,
            port,
            endpoints,
            app_protocol,
            waypoint,
            load_balancing,
            next: AtomicUsize::new(0),
        }
    }

    /// `PASSTHROUGH`: the connection goes to the address dialled.
    pub fn passthrough(&self) -> bool {
        self.load_balancing.mode == BalanceMode::Passthrough
    }

    /// The next endpoint: among the best-ranked ones for a client at
    /// `here`, in turn, each as often as its capacity says.
    pub fn pick(&self, here: &Placement) -> Option<&Endpoint> {
        let lb = &self.load_balancing;
        let candidates = || {
            self.endpoints
                .iter()
                .filter(|e| e.workload.capacity > 0)
                .filter_map(|e| Some((lb.rank(here, &e.workload)?, e)))
        };
        let best = candidates().map(|(rank, _)| rank).max()?;
        let total: u64 = candidates()
            .filter(|(rank, _)| *rank == best)
            .map(|(_, e)| u64::from(e.workload.capacity))
            .sum();
        let mut turn = self.next.fetch_add(1, Ordering::Relaxed) as u64 % total;
        candidates()
            .filter(|(rank, _)| *rank == best)
            .find(|(_, e)| {
                let weight = u64::from(e.workload.capacity);
                if turn < weight {
                    return true;
                }
                turn -= weight;
                false
            })
            .map(|(_, e)| e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::identity::Identity;

    #[test]
    fn protocols_by_istio_names_and_port_names() {
        use AppProtocol::*;
        for (name, protocol) in [
            ("http", Some(Http)),
            ("HTTP", Some(Http)),
            ("http-web", Some(Http)),
            ("http2-api", Some(Http2)),
            ("grpc", Some(Grpc)),
            ("grpc-echo", Some(Grpc)),
            ("grpc-web", Some(Http)),
            ("grpc-web-ui", Some(Http)),
            ("tcp-db", Some(Tcp)),
            ("mysql", Some(Tcp)),
            ("https-admin", Some(Tcp)),
            ("web", None),
            ("httpx-web", None),
            ("-http", None),
        ] {
            assert_eq!(AppProtocol::from_port_name(name), protocol, "{name}");
        }
        assert_eq!(AppProtocol::from_name("kubernetes.io/h2c"), Some(Http2));
        assert_eq!(AppProtocol::from_name("http-web"), None);
        let error = serde_yaml::from_str::<AppProtocol>("\"thrift\"").unwrap_err();
        assert!(
            error.to_string().contains("unknown app_protocol"),
            "{error}"
        );
    }

    fn endpoint(ip: [u8; 4], node: &str, zone: &str) -> Endpoint {
        Endpoint {
            workload: Arc::new(Workload {
                uid: format!("test/{node}/{ip:?}"),
                source: Source::ControlPlane,
                name: node.into(),
                workload_name: String::new(),
                workload_type: "pod",
                namespace: "test".into(),
                ips: vec![IpAddr::from(ip)],
                hostname: String::new(),
                identity: Identity::new("cluster.local", "test", "web"),
                node: node.into(),
                authorization_policies: Vec::new(),
                healthy: true,
                services: Vec::new(),
                network: String::new(),
                cluster_id: "Kubernetes".into(),
                locality: Locality {
                    region: "eu".into(),
                    zone: zone.into(),
                    subzone: String::new(),
                },
                labels: Default::default(),
                tunnel: Default::default(),
                waypoint: None,
                host_network: false,
                capacity: 1,
            }),
            target_port: 8080,
        }
    }

    fn entry(endpoints: Vec<Endpoint>, load_balancing: LoadBalancing) -> ServiceEntry {
        ServiceEntry::new("test/web".into(), 80, endpoints, None, None, load_balancing)
    }

    /// n1 in zone a; two endpoints on n2 in zone b.
    fn three() -> Vec<Endpoint> {
        vec![
            endpoint([10, 0, 0, 1], "n1", "a"),
            endpoint([10, 0, 0, 2], "n2", "b"),
            endpoint([10, 0, 0, 3], "n2", "b"),
        ]
    }

    fn at(node: &str, zone: &str) -> Placement {
        Placement {
            node: node.into(),
            locality: Locality {
                region: "eu".into(),
                zone: zone.into(),
                subzone: String::new(),
            },
            network: String::new(),
            cluster_id: "Kubernetes".into(),
        }
    }

    fn picks(service: &ServiceEntry, here: &Placement, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                service
                    .pick(here)
                    .and_then(|e| e.address())
                    .map_or("none".into(), |ip| ip.to_string())
            })
            .collect()
    }

    #[test]
    fn the_files_services_prefer_this_node_then_this_zone() {
        let service = entry(three(), LoadBalancing::nearest());
        assert_eq!(
            picks(&service, &at("n2", "b"), 4),
            ["10.0.0.2", "10.0.0.3", "10.0.0.2", "10.0.0.3"]
        );
        assert_eq!(picks(&service, &at("n9", "a"), 2), ["10.0.0.1", "10.0.0.1"]);
        let anywhere: std::collections::BTreeSet<String> =
            picks(&service, &at("n9", "c"), 3).into_iter().collect();
        assert_eq!(anywhere.len(), 3);
    }

    /// istiod's modes as ztunnel reads them: no load balancing spreads over
    /// every endpoint wherever the client is; FAILOVER keeps to the best
    /// rank; STRICT only to endpoints that share every scope.
    #[test]
    fn istiods_modes_rank_endpoints_as_ztunnel_does() {
        let standard = entry(three(), LoadBalancing::default());
        let all: std::collections::BTreeSet<String> =
            picks(&standard, &at("n2", "b"), 3).into_iter().collect();
        assert_eq!(all.len(), 3, "standard ignores where the client is");
        let zone = |mode| LoadBalancing {
            mode,
            scopes: vec![BalanceScope::Region, BalanceScope::Zone],
            allow_unhealthy: false,
        };
        let failover = entry(three(), zone(BalanceMode::Failover));
        assert_eq!(
            picks(&failover, &at("n9", "a"), 2),
            ["10.0.0.1", "10.0.0.1"]
        );
        assert_eq!(
            picks(&failover, &at("n9", "c"), 3).len(),
            3,
            "nothing in zone c: the next rank (the region) takes it"
        );
        let strict = entry(three(), zone(BalanceMode::Strict));
        assert_eq!(picks(&strict, &at("n9", "a"), 2), ["10.0.0.1", "10.0.0.1"]);
        assert_eq!(
            picks(&strict, &at("n9", "c"), 1),
            ["none"],
            "no endpoint in zone c"
        );
        // Scopes match in order: a different region stops the rank at 0
        // even when the zone is the same.
        let mut elsewhere = at("n9", "a");
        elsewhere.locality.region = "us".into();
        assert_eq!(picks(&strict, &elsewhere, 1), ["none"]);
        assert!(
            entry(
                three(),
                LoadBalancing {
                    mode: BalanceMode::Passthrough,
                    ..LoadBalancing::default()
                }
            )
            .passthrough()
        );
    }

    #[test]
    fn capacity_weighs_endpoints_and_zero_is_never_picked() {
        let mut endpoints = three();
        for (endpoint, capacity) in endpoints.iter_mut().zip([3, 1, 0]) {
            let mut workload = (*endpoint.workload).clone();
            workload.capacity = capacity;
            endpoint.workload = Arc::new(workload);
        }
        let service = entry(endpoints, LoadBalancing::default());
        let picked = picks(&service, &at("n2", "b"), 8);
        let count = |ip: &str| picked.iter().filter(|p| *p == ip).count();
        assert_eq!(
            (count("10.0.0.1"), count("10.0.0.2"), count("10.0.0.3")),
            (6, 2, 0)
        );
    }
}
