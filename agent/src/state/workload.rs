//! A workload as every source describes it: the file's pods and remote
//! workloads, the Kubernetes API's pods of this node, and Istio's workload
//! API all produce this one type.
use std::{collections::BTreeMap, net::IpAddr};

use crate::{
    config::{Config, PodConfig, WorkloadConfig},
    security::identity::Identity,
};

/// Who said a workload exists. When two sources claim one address, the
/// lower wins: the file is the operator's word, the Kubernetes API knows
/// this node's pods first-hand, the control plane knows the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    File,
    Kubernetes,
    ControlPlane,
}

/// Where a workload runs, for endpoint preference.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Locality {
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub subzone: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Unique within the store: Istio's uid for the control plane's,
    /// `file/<namespace>/<name>` and `kubernetes/<namespace>/<name>` for
    /// the others.
    pub uid: String,
    pub source: Source,
    pub name: String,
    /// What telemetry calls it (`source_workload`): istiod's
    /// `workload_name` (the Deployment's name), the pod's name otherwise.
    pub workload_name: String,
    /// What `workload_name` names: `deployment`, `cronjob`, `job` or `pod`
    /// (istiod's `workload_type`; a pod of the file or the Kubernetes API
    /// is named as itself).
    pub workload_type: &'static str,
    pub namespace: String,
    /// Every address, IPv4 and IPv6.
    pub ips: Vec<IpAddr>,
    /// istiod's `hostname`: a workload known by name only (a DNS
    /// ServiceEntry's endpoint) has no `ips` and is resolved when dialled.
    pub hostname: String,
    pub identity: Identity,
    /// The node it runs on; empty when unknown.
    pub node: String,
    /// WORKLOAD_SELECTOR policies selecting it (`namespace/name`).
    pub authorization_policies: Vec<String>,
    /// Not ready (xDS `UNHEALTHY`): still resolved by address, so traffic
    /// to it stays in the mesh, but never picked as a service endpoint.
    pub healthy: bool,
    /// Services it is an endpoint of (`namespace/hostname`), with per-port
    /// target overrides (service port → target port).
    pub services: Vec<(String, Vec<(u16, u16)>)>,
    pub network: String,
    /// The cluster it runs in (istiod's `cluster_id`).
    pub cluster_id: String,
    pub locality: Locality,
    /// `app` and `version` (from Istio's canonical name and revision, or
    /// the file's or the pod's labels): what cluster subsets select and
    /// telemetry reports.
    pub labels: BTreeMap<String, String>,
    /// How it is reached: through HBONE (it is in the mesh), or as it is
    /// (xDS `tunnel_protocol: NONE`, a workload istiod knows outside the
    /// mesh), as ztunnel does.
    pub tunnel: Tunnel,
    /// The waypoint istiod binds the workload to: traffic to its own
    /// address goes through it.
    pub waypoint: Option<Waypoint>,
    /// xDS `network_mode: HOST_NETWORK`: its addresses are the node's,
    /// shared with other workloads, so it is never looked up by address
    /// (traffic to the node's IP is not its); it is still a service
    /// endpoint.
    pub host_network: bool,
    /// Its weight among a service's endpoints (istiod's `capacity`, 1 by
    /// default; 0: never picked).
    pub capacity: u32,
}

/// A waypoint istiod binds a workload or service to (`istio.io/use-waypoint`):
/// the waypoint service by name, or one address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Waypoint {
    /// `namespace/hostname`, and the port its pods take HBONE on.
    Service {
        namespace: String,
        hostname: String,
        port: u16,
    },
    Address(std::net::SocketAddr),
}

impl std::fmt::Display for Waypoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Waypoint::Service {
                namespace,
                hostname,
                port,
            } => write!(f, "{namespace}/{hostname}:{port}"),
            Waypoint::Address(address) => write!(f, "{address}"),
        }
    }
}

/// Istio's `TunnelProtocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Tunnel {
    #[default]
    Hbone,
    /// Plaintext to the workload's own address and port.
    None,
}

impl Workload {
    /// In the mesh: reached through HBONE, its identity verified.
    pub fn meshed(&self) -> bool {
        self.tunnel == Tunnel::Hbone
    }

    /// `namespace/name`, how workloads are named in logs and metrics.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// A pod this node enrolls, as the file or the Kubernetes API lists it.
    pub fn from_pod(pod: &PodConfig, source: Source, config: &Config) -> Workload {
        let prefix = match source {
            Source::Kubernetes => "kubernetes",
            _ => "file",
        };
        Workload {
            uid: format!("{prefix}/{}/{}", pod.namespace, pod.name),
            source,
            name: pod.name.clone(),
            workload_name: pod.name.clone(),
            workload_type: "pod",
            namespace: pod.namespace.clone(),
            ips: pod.ips.clone(),
            hostname: String::new(),
            identity: Identity::new(&config.trust_domain, &pod.namespace, &pod.service_account),
            node: config.node.clone(),
            authorization_policies: pod.authorization_policies.clone(),
            healthy: true,
            services: member_of(&pod.services),
            network: config.network.clone(),
            cluster_id: config.cluster_id().to_string(),
            locality: config.locality.clone(),
            labels: pod.labels.clone(),
            tunnel: Tunnel::Hbone,
            waypoint: None,
            host_network: false,
            capacity: 1,
        }
    }

    /// A workload on another node that the file lists.
    pub fn from_file(workload: &WorkloadConfig, config: &Config) -> Workload {
        Workload {
            uid: format!("file/{}/{}", workload.namespace, workload.name),
            source: Source::File,
            name: workload.name.clone(),
            workload_name: workload.name.clone(),
            workload_type: "pod",
            namespace: workload.namespace.clone(),
            ips: workload.ips.clone(),
            hostname: String::new(),
            identity: Identity::new(
                &config.trust_domain,
                &workload.namespace,
                &workload.service_account,
            ),
            node: String::new(),
            authorization_policies: Vec::new(),
            healthy: true,
            services: member_of(&workload.services),
            network: config.network.clone(),
            cluster_id: config.cluster_id().to_string(),
            locality: Locality::default(),
            labels: workload.labels.clone(),
            tunnel: Tunnel::Hbone,
            waypoint: None,
            host_network: false,
            capacity: 1,
        }
    }
}

/// Services named in the file, with no per-port overrides.
fn member_of(services: &[String]) -> Vec<(String, Vec<(u16, u16)>)> {
    services
        .iter()
        .map(|name| (name.clone(), Vec::new()))
        .collect()
}
