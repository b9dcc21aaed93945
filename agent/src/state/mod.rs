//! Which addresses belong to meshed workloads, and who they are: the local
//! pods and the workloads the config lists on other nodes. Read on every
//! outbound connection; replaced whole when the config changes.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;

use crate::{
    config::Config,
    security::identity::Identity,
    xds::convert::{Locality, XdsService, XdsWorkload},
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// `namespace/name`.
    pub id: String,
    pub ip: IpAddr,
    pub identity: Identity,
    /// Workload labels that cluster subsets select on (`app`, `version`…).
    pub labels: BTreeMap<String, String>,
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

/// One endpoint of a service: where to connect and who must answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    pub target_port: u16,
    pub node: String,
    pub locality: Locality,
}

/// A service VIP:port and its healthy endpoints, balanced round robin with
/// a preference for endpoints on this node.
#[derive(Debug)]
pub struct ServiceEntry {
    /// `namespace/hostname`.
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    /// The port's declared protocol, when there is one.
    pub app_protocol: Option<AppProtocol>,
    next: std::sync::atomic::AtomicUsize,
}

impl ServiceEntry {
    /// The next endpoint, round robin within the nearest non-empty tier:
    /// this node, then this zone, then this region, then anywhere.
    pub fn pick(&self, local_node: &str, local: &Locality) -> Option<&Endpoint> {
        let same_region =
            |e: &&Endpoint| !local.region.is_empty() && e.locality.region == local.region;
        let same_zone = |e: &&Endpoint| {
            same_region(e) && !local.zone.is_empty() && e.locality.zone == local.zone
        };
        let same_node = |e: &&Endpoint| e.node == local_node;
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
        let turn = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(pool[turn % pool.len()])
    }
}

/// A workload backing a service: itself, its port overrides, its node.
type Member<'a> = (Arc<Workload>, &'a [(u16, u16)], &'a str, &'a Locality);

/// Readers on the connection path load a snapshot without locking
/// (arc-swap); an update builds new tables and swaps them in whole.
#[derive(Default)]
pub struct Mesh {
    by_ip: ArcSwap<HashMap<IpAddr, Arc<Workload>>>,
    services: ArcSwap<HashMap<std::net::SocketAddr, Arc<ServiceEntry>>>,
    /// The same entries by (hostname, service port), for L7 clusters.
    by_hostname: ArcSwap<HashMap<(String, u16), Arc<ServiceEntry>>>,
    /// This node's pods that the Kubernetes API enrolled, by IP. They are
    /// workloads even without a control plane, and their own labels reach
    /// subsets: Istio's workload API carries only the canonical app and
    /// version.
    kubernetes_pods: Mutex<HashMap<IpAddr, crate::config::PodConfig>>,
}

impl Mesh {
    pub fn from_config(config: &Config) -> Mesh {
        let mesh = Mesh::default();
        mesh.rebuild(config, &[], &[]);
        mesh
    }

    /// Rebuilds workloads and services from the file and what the control
    /// plane sent.
    pub fn rebuild(&self, config: &Config, workloads: &[XdsWorkload], services: &[XdsService]) {
        self.update(config, workloads);
        let (mut all_services, mut all_workloads) = file_services(config);
        all_services.extend_from_slice(services);
        all_workloads.extend_from_slice(workloads);
        self.update_services(&all_services, &all_workloads);
    }

    /// Replaces the Kubernetes-enrolled pods; whether anything the mesh
    /// shows changed (the caller then rebuilds).
    pub fn set_kubernetes_pods(&self, pods: &[crate::config::PodConfig]) -> bool {
        let pods: HashMap<IpAddr, crate::config::PodConfig> = pods
            .iter()
            .map(|pod| (pod.ip.to_canonical(), pod.clone()))
            .collect();
        let mut current = self
            .kubernetes_pods
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let changed = *current != pods;
        *current = pods;
        changed
    }

    pub fn workload(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.by_ip.load().get(&ip.to_canonical()).cloned()
    }

    /// The service behind a VIP:port, if any.
    pub fn service(&self, address: std::net::SocketAddr) -> Option<Arc<ServiceEntry>> {
        self.services
            .load()
            .get(&std::net::SocketAddr::new(
                address.ip().to_canonical(),
                address.port(),
            ))
            .cloned()
    }

    /// The service `hostname` on `port`, for clusters that name it.
    pub fn service_by_hostname(&self, hostname: &str, port: u16) -> Option<Arc<ServiceEntry>> {
        self.by_hostname
            .load()
            .get(&(hostname.to_string(), port))
            .cloned()
    }

    /// Rebuilds the services from what the control plane sent.
    pub fn update_services(&self, services: &[XdsService], workloads: &[XdsWorkload]) {
        // One pass over the workloads: service name -> its endpoints (with
        // their per-port overrides), so the whole rebuild is linear.
        let mut members: HashMap<&str, Vec<Member<'_>>> = HashMap::new();
        let kubernetes = self
            .kubernetes_pods
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for w in workloads.iter().filter(|w| w.healthy) {
            let Some(ip) = w.ips.first() else { continue };
            // What the config or control plane gave, under the Kubernetes
            // pod's own labels when it is one of this node's.
            let mut labels = w.labels.clone();
            if let Some(pod) = kubernetes.get(&ip.to_canonical()) {
                labels.extend(pod.labels.clone());
            }
            let workload = Arc::new(Workload {
                id: format!("{}/{}", w.namespace, w.name),
                ip: *ip,
                identity: w.identity.clone(),
                labels,
            });
            for (name, ports) in &w.services {
                members.entry(name.as_str()).or_default().push((
                    workload.clone(),
                    ports.as_slice(),
                    w.node.as_str(),
                    &w.locality,
                ));
            }
        }
        drop(kubernetes);
        let mut table = HashMap::new();
        let mut by_hostname = HashMap::new();
        for service in services {
            let name = format!("{}/{}", service.namespace, service.hostname);
            let backing = members
                .get(name.as_str())
                .map(Vec::as_slice)
                .unwrap_or_default();
            for (service_port, default_target) in &service.ports {
                let endpoints: Vec<Endpoint> = backing
                    .iter()
                    .map(|(workload, ports, node, locality)| Endpoint {
                        workload: workload.clone(),
                        target_port: ports
                            .iter()
                            .find(|(port, _)| port == service_port)
                            .map(|(_, target)| *target)
                            .unwrap_or(*default_target),
                        node: node.to_string(),
                        locality: (*locality).clone(),
                    })
                    .collect();
                let entry = Arc::new(ServiceEntry {
                    name: name.clone(),
                    endpoints,
                    app_protocol: service
                        .app_protocols
                        .iter()
                        .find(|(port, _)| port == service_port)
                        .map(|(_, protocol)| *protocol),
                    next: Default::default(),
                });
                for vip in &service.vips {
                    table.insert(
                        std::net::SocketAddr::new(*vip, *service_port),
                        entry.clone(),
                    );
                }
                by_hostname.insert((service.hostname.clone(), *service_port), entry);
            }
        }
        self.services.store(Arc::new(table));
        self.by_hostname.store(Arc::new(by_hostname));
    }

    /// Every workload, sorted by IP, for `/config_dump`.
    pub fn listed(&self) -> Vec<Arc<Workload>> {
        let by_ip = self.by_ip.load();
        let mut workloads: Vec<Arc<Workload>> = by_ip.values().cloned().collect();
        workloads.sort_by_key(|workload| workload.ip);
        workloads
    }

    /// Replaces the whole table: the config's pods and workloads, then what
    /// the control plane sent (the config wins for an IP both name).
    pub fn update(&self, config: &Config, learnt: &[XdsWorkload]) {
        let mut by_ip = HashMap::new();
        let pods = config.pods.iter().map(|pod| {
            (
                pod.id(),
                pod.ip,
                &pod.namespace,
                &pod.service_account,
                &pod.labels,
            )
        });
        let remote = config.workloads.iter().map(|workload| {
            (
                format!("{}/{}", workload.namespace, workload.name),
                workload.ip,
                &workload.namespace,
                &workload.service_account,
                &workload.labels,
            )
        });
        for (id, ip, namespace, service_account, labels) in pods.chain(remote) {
            let identity = Identity::new(&config.trust_domain, namespace, service_account);
            by_ip.insert(
                ip,
                Arc::new(Workload {
                    id,
                    ip,
                    identity,
                    labels: labels.clone(),
                }),
            );
        }
        // The Kubernetes API's pods of this node, then the control plane's
        // workloads (the file wins over both).
        let kubernetes: Vec<crate::config::PodConfig> = self
            .kubernetes_pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for pod in &kubernetes {
            by_ip.entry(pod.ip.to_canonical()).or_insert_with(|| {
                Arc::new(Workload {
                    id: pod.id(),
                    ip: pod.ip,
                    identity: Identity::new(
                        &config.trust_domain,
                        &pod.namespace,
                        &pod.service_account,
                    ),
                    labels: pod.labels.clone(),
                })
            });
        }
        for workload in learnt.iter().filter(|workload| workload.healthy) {
            for ip in &workload.ips {
                by_ip.entry(*ip).or_insert_with(|| {
                    Arc::new(Workload {
                        id: format!("{}/{}", workload.namespace, workload.name),
                        ip: *ip,
                        identity: workload.identity.clone(),
                        labels: workload.labels.clone(),
                    })
                });
            }
        }
        self.by_ip.store(Arc::new(by_ip));
    }
}

/// The file's services, and its pods and workloads as service members.
fn file_services(config: &Config) -> (Vec<XdsService>, Vec<XdsWorkload>) {
    let services = config
        .services
        .iter()
        .map(|service| XdsService {
            app_protocols: service
                .ports
                .iter()
                .filter_map(|p| Some((p.service_port, p.protocol()?)))
                .collect(),
            namespace: service.namespace.clone(),
            hostname: service.hostname.clone(),
            vips: service.vips.clone(),
            ports: service
                .ports
                .iter()
                .map(|p| (p.service_port, p.target_port))
                .collect(),
        })
        .collect();
    let member = |name: &str,
                  namespace: &str,
                  service_account: &str,
                  ip,
                  node: &str,
                  services: &[String],
                  labels: &std::collections::BTreeMap<String, String>| {
        XdsWorkload {
            labels: labels.clone(),
            uid: format!("file/{namespace}/{name}"),
            name: name.to_string(),
            namespace: namespace.to_string(),
            ips: vec![ip],
            identity: Identity::new(&config.trust_domain, namespace, service_account),
            node: node.to_string(),
            authorization_policies: Vec::new(),
            healthy: true,
            services: services
                .iter()
                .map(|key| (key.clone(), Vec::new()))
                .collect(),
            network: String::new(),
            locality: Locality::default(),
        }
    };
    let workloads = config
        .pods
        .iter()
        .filter(|pod| !pod.services.is_empty())
        .map(|pod| {
            member(
                &pod.name,
                &pod.namespace,
                &pod.service_account,
                pod.ip,
                &config.node,
                &pod.services,
                &pod.labels,
            )
        })
        .chain(
            config
                .workloads
                .iter()
                .filter(|w| !w.services.is_empty())
                .map(|w| {
                    member(
                        &w.name,
                        &w.namespace,
                        &w.service_account,
                        w.ip,
                        "",
                        &w.services,
                        &w.labels,
                    )
                }),
        )
        .collect();
    (services, workloads)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            locality: Locality {
                region: "eu".into(),
                zone: zone.into(),
            },
            workload: Arc::new(Workload {
                id: format!("test/{node}"),
                ip: IpAddr::from(ip),
                identity: Identity::new("cluster.local", "test", "web"),
                labels: Default::default(),
            }),
            target_port: 8080,
            node: node.into(),
        }
    }

    #[test]
    fn endpoints_are_preferred_by_node_then_zone_then_round_robin() {
        let service = ServiceEntry {
            name: "test/web".into(),
            endpoints: vec![
                endpoint([10, 0, 0, 1], "n1", "a"),
                endpoint([10, 0, 0, 2], "n2", "b"),
                endpoint([10, 0, 0, 3], "n2", "b"),
            ],
            app_protocol: None,
            next: Default::default(),
        };
        let local: Vec<IpAddr> = (0..4)
            .filter_map(|_| {
                service
                    .pick("n2", &Locality::default())
                    .map(|e| e.workload.ip)
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
            .filter_map(|_| service.pick("n9", &zone_a).map(|e| e.workload.ip))
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
                    .map(|e| e.workload.ip)
            })
            .collect();
        assert_eq!(anywhere.len(), 3);
    }
}
