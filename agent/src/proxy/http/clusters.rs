//! A cluster as the request path uses it: its endpoints resolved against the
//! mesh, with the balancer, outlier detector and circuit breaker that live
//! as long as the cluster's config and endpoint set stay the same.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    routing::{
        ClusterConfig, ClusterEndpoints, LbPolicy, RouteTable, Thresholds,
        balance::Balancer,
        limits::CircuitBreaker,
        outlier::{OutlierDetector, UpstreamResult},
    },
    state::{ServiceEntry, Store as Mesh, Workload},
};

/// One endpoint of a cluster.
pub struct ClusterEndpoint {
    pub address: SocketAddr,
    /// The meshed workload behind the address, if any (its identity is
    /// checked over HBONE).
    pub workload: Option<Arc<Workload>>,
    pub active_requests: AtomicU64,
}

pub struct ClusterRuntime {
    pub config: Arc<ClusterConfig>,
    pub endpoints: Vec<ClusterEndpoint>,
    balancer: Balancer,
    outlier: Option<OutlierDetector>,
    pub breaker: Arc<CircuitBreaker>,
    /// What the endpoints were resolved from, to notice a change.
    source: Option<Arc<ServiceEntry>>,
}

impl ClusterRuntime {
    /// An endpoint for the next request, skipping ejected ones.
    pub fn pick(&self, hash: Option<u64>) -> Option<usize> {
        let now = Instant::now();
        let healthy = |index: usize| {
            self.outlier
                .as_ref()
                .is_none_or(|outlier| !outlier.is_ejected(index, now))
        };
        let active = |index: usize| {
            self.endpoints.get(index).map_or(0, |endpoint| {
                endpoint.active_requests.load(Ordering::Relaxed)
            })
        };
        self.balancer.pick(hash, &healthy, &active)
    }

    /// Feeds outlier detection with how a request to `index` went.
    pub fn record(&self, index: usize, result: UpstreamResult) {
        if let Some(outlier) = &self.outlier {
            outlier.record(index, result, Instant::now());
        }
    }

    pub fn is_ring_hash(&self) -> bool {
        matches!(self.config.lb_policy, LbPolicy::RingHash { .. })
    }
}

/// The default config for an Istio-named cluster that no `Cluster`
/// resource describes: the service port's endpoints, Envoy's defaults.
fn implicit_cluster(name: &str) -> Option<ClusterConfig> {
    let (hostname, port, _subset) = crate::routing::envoy::istio_cluster_name(name)?;
    Some(ClusterConfig {
        name: name.to_string(),
        endpoints: ClusterEndpoints::Service {
            hostname: hostname.to_string(),
            port,
            subset: Vec::new(),
        },
        lb_policy: LbPolicy::RoundRobin,
        connect_timeout: Duration::from_secs(5),
        http2: false,
        circuit_breakers: Thresholds::default(),
        outlier_detection: None,
    })
}

/// Runtime state per cluster name, rebuilt when its config or endpoints
/// change (and with them its ejections and counters).
#[derive(Default)]
pub struct ClusterCache {
    by_name: Mutex<HashMap<String, Arc<ClusterRuntime>>>,
    /// Configs made for Istio-named clusters without a resource.
    implicit: Mutex<HashMap<String, Arc<ClusterConfig>>>,
}

impl ClusterCache {
    pub fn get(&self, mesh: &Mesh, table: &RouteTable, name: &str) -> Option<Arc<ClusterRuntime>> {
        let config = match table.clusters.get(name) {
            Some(config) => config.clone(),
            None => {
                let mut implicit = self.implicit.lock().unwrap_or_else(|e| e.into_inner());
                match implicit.get(name) {
                    Some(config) => config.clone(),
                    None => {
                        let config = Arc::new(implicit_cluster(name)?);
                        implicit.insert(name.to_string(), config.clone());
                        config
                    }
                }
            }
        };
        let source = match &config.endpoints {
            ClusterEndpoints::Service { hostname, port, .. } => {
                Some(mesh.service_by_hostname(hostname, *port)?)
            }
            ClusterEndpoints::Static(_) => None,
        };
        let mut by_name = self.by_name.lock().unwrap_or_else(|e| e.into_inner());
        // Compared by value: every xDS update rebuilds the table, and a
        // cluster that did not change keeps its ejections and counters.
        if let Some(runtime) = by_name.get(name)
            && *runtime.config == *config
            && match (&runtime.source, &source) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
        {
            return Some(runtime.clone());
        }
        let runtime = Arc::new(build(mesh, config, source));
        by_name.insert(name.to_string(), runtime.clone());
        Some(runtime)
    }
}

impl ClusterCache {
    /// Forgets clusters `table` no longer names (and implicit ones whose
    /// service is gone from `mesh`), so that removed clusters don't keep
    /// their state for ever. Called whenever the route table is replaced (a
    /// request still on the old table may bring one back until the next).
    pub fn prune(&self, mesh: &Mesh, table: &RouteTable) {
        let still_wanted = |name: &str| {
            table.clusters.contains_key(name)
                || crate::routing::envoy::istio_cluster_name(name).is_some_and(
                    |(hostname, port, _)| mesh.service_by_hostname(hostname, port).is_some(),
                )
        };
        self.by_name
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, _| still_wanted(name));
        self.implicit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, _| still_wanted(name));
    }

    #[cfg(test)]
    fn cached(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .by_name
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }
}

fn build(
    mesh: &Mesh,
    config: Arc<ClusterConfig>,
    source: Option<Arc<ServiceEntry>>,
) -> ClusterRuntime {
    let endpoints: Vec<ClusterEndpoint> = match (&config.endpoints, &source) {
        (ClusterEndpoints::Service { subset, .. }, Some(service)) => service
            .endpoints
            .iter()
            .filter(|endpoint| {
                subset
                    .iter()
                    .all(|(key, value)| endpoint.workload.labels.get(key) == Some(value))
            })
            .filter_map(|endpoint| {
                Some(ClusterEndpoint {
                    address: SocketAddr::new(endpoint.address()?, endpoint.target_port),
                    workload: Some(endpoint.workload.clone()),
                    active_requests: AtomicU64::new(0),
                })
            })
            .collect(),
        (ClusterEndpoints::Static(addresses), _) => addresses
            .iter()
            .map(|address| ClusterEndpoint {
                address: *address,
                workload: mesh.workload(address.ip()),
                active_requests: AtomicU64::new(0),
            })
            .collect(),
        (ClusterEndpoints::Service { .. }, None) => Vec::new(),
    };
    let addresses: Vec<SocketAddr> = endpoints.iter().map(|endpoint| endpoint.address).collect();
    ClusterRuntime {
        balancer: Balancer::new(config.lb_policy, &addresses),
        outlier: config
            .outlier_detection
            .map(|outlier| OutlierDetector::new(outlier, endpoints.len())),
        breaker: CircuitBreaker::new(config.circuit_breakers),
        endpoints,
        config,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(names: &[&str]) -> RouteTable {
        let clusters = names
            .iter()
            .map(|name| {
                let config = ClusterConfig {
                    name: name.to_string(),
                    endpoints: ClusterEndpoints::Static(vec!["10.0.0.1:80".parse().unwrap()]),
                    lb_policy: LbPolicy::RoundRobin,
                    connect_timeout: Duration::from_secs(1),
                    http2: false,
                    circuit_breakers: Thresholds::default(),
                    outlier_detection: None,
                };
                (name.to_string(), Arc::new(config))
            })
            .collect();
        RouteTable {
            clusters,
            ..RouteTable::default()
        }
    }

    #[test]
    fn a_cluster_keeps_its_state_while_named_and_is_forgotten_when_removed() {
        let mesh = Mesh::default();
        let cache = ClusterCache::default();
        let first = table(&["a", "b"]);
        let a = cache.get(&mesh, &first, "a").unwrap();
        cache.get(&mesh, &first, "b").unwrap();
        // The same config in a new table: the same runtime (ejections and
        // counters survive an unrelated update).
        let second = table(&["a", "b"]);
        cache.prune(&mesh, &second);
        assert!(Arc::ptr_eq(&a, &cache.get(&mesh, &second, "a").unwrap()));
        assert_eq!(cache.cached(), ["a", "b"]);
        // `b` removed: forgotten when the table is replaced.
        let third = table(&["a"]);
        cache.prune(&mesh, &third);
        assert_eq!(cache.cached(), ["a"]);
        assert!(Arc::ptr_eq(&a, &cache.get(&mesh, &third, "a").unwrap()));
        assert!(cache.get(&mesh, &third, "b").is_none());
        // An Istio-named cluster of a service that doesn't exist is not made.
        assert!(cache.get(&mesh, &third, "outbound|80||gone.test").is_none());
    }
}
