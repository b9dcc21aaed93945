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
    /// The waypoint istiod binds the service to (`istio.io/use-waypoint`),
    /// as `namespace/hostname:port` or `ip:port`.
    pub waypoint: Option<String>,
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

    fn node(&self) -> &str {
        &self.workload.node
    }

    fn locality(&self) -> &Locality {
        &self.workload.locality
    }
}

/// A service port and its healthy endpoints, balanced round robin with a
/// preference for endpoints on this node. Replaced (a new `Arc`) only when
/// the service or one of its endpoints changes.
#[derive(Debug)]
pub struct ServiceEntry {
    /// `namespace/hostname`.
    pub name: String,
    pub port: u16,
    pub endpoints: Vec<Endpoint>,
    /// The port's declared protocol, when there is one.
    pub app_protocol: Option<AppProtocol>,
    /// The service's waypoint, if it has one.
    pub waypoint: Option<String>,
    next: AtomicUsize,
}

impl PartialEq for ServiceEntry {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.port == other.port
            && self.endpoints == other.endpoints
            && self.app_protocol == other.app_protocol
            && self.waypoint == other.waypoint
    }
}

impl ServiceEntry {
    pub fn new(
        name: String,
        port: u16,
        endpoints: Vec<Endpoint>,
        app_protocol: Option<AppProtocol>,
        waypoint: Option<String>,
    ) -> ServiceEntry {
        ServiceEntry {
            name,
            port,
            endpoints,
            app_protocol,
            waypoint,
            next: AtomicUsize::new(0),
        }
    }

    /// The next endpoint, round robin within the nearest non-empty tier:
    /// this node, then this zone, then this region, then anywhere.
    pub fn pick(&self, local_node: &str, local: &Locality) -> Option<&Endpoint> {
        let same_region =
            |e: &&Endpoint| !local.region.is_empty() && e.locality().region == local.region;
        let same_zone = |e: &&Endpoint| {
            same_region(e) && !local.zone.is_empty() && e.locality().zone == local.zone
        };
        let same_node = |e: &&Endpoint| e.node() == local_node;
        let anywhere = |_: &&Endpoint| true;
        let tiers: [&dyn Fn(&&Endpoint) -> bool; 4] =
            [&same_node, &same_zone, &same_region, &anywhere];
        let pool: Vec<&Endpoint> = tiers
            .iter()
            .map(|tier| {
                self.endpoints
                    .iter()
                    .filter(|e| tier(e))
                    .collect::<Vec<_>>()
            })
            .find(|pool| !pool.is_empty())?;
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        Some(pool[turn % pool.len()])
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
                namespace: "test".into(),
                ips: vec![IpAddr::from(ip)],
                identity: Identity::new("cluster.local", "test", "web"),
                node: node.into(),
                authorization_policies: Vec::new(),
                healthy: true,
                services: Vec::new(),
                network: String::new(),
                locality: Locality {
                    region: "eu".into(),
                    zone: zone.into(),
                },
                labels: Default::default(),
                tunnel: Default::default(),
                waypoint: None,
                host_network: false,
            }),
            target_port: 8080,
        }
    }

    #[test]
    fn endpoints_are_preferred_by_node_then_zone_then_round_robin() {
        let service = ServiceEntry::new(
            "test/web".into(),
            80,
            vec![
                endpoint([10, 0, 0, 1], "n1", "a"),
                endpoint([10, 0, 0, 2], "n2", "b"),
                endpoint([10, 0, 0, 3], "n2", "b"),
            ],
            None,
            None,
        );
        let local: Vec<IpAddr> = (0..4)
            .filter_map(|_| {
                service
                    .pick("n2", &Locality::default())
                    .and_then(|e| e.address())
            })
            .collect();
        assert_eq!(
            local,
            ["10.0.0.2", "10.0.0.3", "10.0.0.2", "10.0.0.3"]
                .map(|ip| ip.parse::<IpAddr>().expect("ip"))
        );
        // Not on this node: the same zone next.
        let zone_a = Locality {
            region: "eu".into(),
            zone: "a".into(),
        };
        let in_zone: Vec<IpAddr> = (0..2)
            .filter_map(|_| service.pick("n9", &zone_a).and_then(|e| e.address()))
            .collect();
        assert_eq!(
            in_zone,
            ["10.0.0.1", "10.0.0.1"].map(|ip| ip.parse::<IpAddr>().expect("ip"))
        );
        // Nothing near: all of them, in turn.
        let anywhere: std::collections::BTreeSet<IpAddr> = (0..3)
            .filter_map(|_| {
                service
                    .pick("n9", &Locality::default())
                    .and_then(|e| e.address())
            })
            .collect();
        assert_eq!(anywhere.len(), 3);
    }
}
