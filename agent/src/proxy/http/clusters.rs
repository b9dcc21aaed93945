//! A cluster as the request path uses it: its endpoints resolved against the
//! mesh, with its balancer, outlier detector, circuit breaker and upstream
//! connections.
//!
//! State is kept per cluster name and lives as long as the cluster's own
//! config: an update elsewhere (another service, another cluster, a mesh
//! rebuilt whole) leaves it as it was. When only the cluster's endpoints
//! change, the circuit breaker, the connection pool and the outlier state
//! of the endpoints that stay are kept (Envoy's counts are per cluster),
//! and only the balancer is made again. Endpoints are compared by value:
//! address and the identity expected there.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use super::upstream::UpstreamPool;
use crate::{
    routing::{
        Assignment, ClusterConfig, ClusterEndpoints, LbAddress, RouteTable, UpstreamProtocol,
        balance::Balancer,
        limits::CircuitBreaker,
        outlier::{OutlierDetector, UpstreamResult},
    },
    security::identity::Identity,
    state::{ServiceEntry, Store, Workload},
};

/// One endpoint of a cluster.
pub struct ClusterEndpoint {
    pub address: SocketAddr,
    /// The meshed workload behind the address, if any (its identity is
    /// checked over HBONE).
    pub workload: Option<Arc<Workload>>,
    /// Requests in flight to it (least request), kept while it stays in
    /// the cluster.
    pub active_requests: Arc<AtomicU64>,
    /// Its EDS priority (failover level; 0 for a service's endpoints).
    pub priority: u32,
    /// Its locality and that locality's weight, when the assignment
    /// weighs localities ([`crate::routing::LbAddress::locality`]).
    pub locality: Option<(u32, u32)>,
    /// When it joined the cluster (slow start), kept while it stays.
    pub joined: Instant,
}

impl ClusterEndpoint {
    /// The identity that must answer at this endpoint.
    pub fn identity(&self) -> Option<&Identity> {
        self.workload.as_deref().map(|workload| &workload.identity)
    }

    /// The same endpoint: the same address, answered by the same identity,
    /// at the same priority.
    fn same_as(&self, other: &ClusterEndpoint) -> bool {
        self.address == other.address
            && self.identity() == other.identity()
            && self.priority == other.priority
    }
}

/// One cluster's endpoints and the state requests share. Immutable: a new
/// endpoint list makes a new one, sharing the rest.
pub struct ClusterRuntime {
    pub config: Arc<ClusterConfig>,
    pub endpoints: Vec<ClusterEndpoint>,
    balancer: Balancer,
    /// Per endpoint address, so it survives a new endpoint list.
    outlier: Option<Arc<OutlierDetector>>,
    pub breaker: Arc<CircuitBreaker>,
    /// The cluster's upstream connections (they count against `breaker`).
    pub pool: Arc<UpstreamPool>,
}

impl ClusterRuntime {
    /// An endpoint for the next request, skipping ejected ones.
    pub fn pick(&self, hash: Option<u64>) -> Option<usize> {
        self.pick_avoiding(hash, &[])
    }

    /// The same, the priority load leaving out the priorities in `avoid`
    /// (a retry's `previous_priorities`), unless that leaves none.
    pub fn pick_avoiding(&self, hash: Option<u64>, avoid: &[u32]) -> Option<usize> {
        let now = Instant::now();
        let avoid = if self
            .endpoints
            .iter()
            .all(|endpoint| avoid.contains(&endpoint.priority))
        {
            &[][..]
        } else {
            avoid
        };
        let healthy = |index: usize| match (&self.outlier, self.endpoints.get(index)) {
            (_, Some(endpoint)) if avoid.contains(&endpoint.priority) => false,
            (Some(outlier), Some(endpoint)) => !outlier.is_ejected(endpoint.address, now),
            _ => true,
        };
        let active = |index: usize| {
            self.endpoints.get(index).map_or(0, |endpoint| {
                endpoint.active_requests.load(Ordering::Relaxed)
            })
        };
        let priority = self.choose_priority(hash, &healthy);
        if priority.is_none() && !self.config.locality_weighted {
            return self
                .warming(&healthy, now)
                .unwrap_or_else(|| self.balancer.pick(hash, &healthy, &active));
        }
        // Within the chosen level (every endpoint when there is one level):
        // its healthy endpoints, or all of them when none is.
        let in_level = |index: usize| {
            priority.is_none_or(|priority| {
                self.endpoints
                    .get(index)
                    .is_some_and(|endpoint| endpoint.priority == priority)
            })
        };
        let level_healthy = (0..self.endpoints.len()).any(|i| in_level(i) && healthy(i));
        // A chosen locality has a healthy endpoint (its availability is
        // above 0).
        let locality = self.choose_locality(hash, &in_level, &healthy);
        let in_locality = |index: usize| {
            locality.is_none_or(|chosen| {
                self.endpoints
                    .get(index)
                    .is_some_and(|endpoint| endpoint.locality.map(|(at, _)| at) == Some(chosen))
            })
        };
        let candidate = |index: usize| {
            in_level(index) && in_locality(index) && (healthy(index) || !level_healthy)
        };
        self.warming(&candidate, now)
            .unwrap_or_else(|| self.balancer.pick(hash, &candidate, &active))
    }

    /// Slow start: while a `candidate` endpoint is younger than the
    /// window, the pick is drawn by each candidate's weight factor
    /// (`Some`); otherwise (`None`) the balancer picks as usual.
    fn warming(&self, candidate: &dyn Fn(usize) -> bool, now: Instant) -> Option<Option<usize>> {
        let slow_start = self.config.slow_start?;
        let weights: Vec<(usize, f64)> = (0..self.endpoints.len())
            .filter(|index| candidate(*index))
            .map(|index| {
                let age = now.saturating_duration_since(self.endpoints[index].joined);
                (index, slow_start.factor(age))
            })
            .collect();
        // All alike (none warming, or all joined together): as usual.
        let first = weights.first().map_or(1.0, |(_, weight)| *weight);
        if weights
            .iter()
            .all(|(_, weight)| (weight - first).abs() < 1e-9)
        {
            return None;
        }
        let total: f64 = weights.iter().map(|(_, weight)| weight).sum();
        let mut draw = fastrand::f64() * total;
        for (index, weight) in &weights {
            if draw < *weight {
                return Some(Some(*index));
            }
            draw -= weight;
        }
        Some(weights.last().map(|(index, _)| *index))
    }

    /// Envoy's locality-weighted balancing (`locality_weighted_lb_config`):
    /// within the level `in_level`, each locality's effective weight is its
    /// weight × its availability (1.4 × its healthy share, at most 1); one
    /// is drawn by those weights (by the request's hash for hash-based
    /// balancers). `None`: localities are not weighted, or none has weight
    /// left.
    fn choose_locality(
        &self,
        hash: Option<u64>,
        in_level: &dyn Fn(usize) -> bool,
        healthy: &dyn Fn(usize) -> bool,
    ) -> Option<u32> {
        if !self.config.locality_weighted {
            return None;
        }
        let mut localities: Vec<(u32, u64, u64, u64)> = Vec::new(); // (index, weight, total, healthy)
        for (index, endpoint) in self.endpoints.iter().enumerate() {
            let Some((at, weight)) = endpoint.locality.filter(|_| in_level(index)) else {
                continue;
            };
            let up = u64::from(healthy(index));
            match localities.iter_mut().find(|(other, ..)| *other == at) {
                Some(locality) => {
                    locality.2 += 1;
                    locality.3 += up;
                }
                None => localities.push((at, u64::from(weight), 1, up)),
            }
        }
        // Weights in thousandths of availability.
        let effective: Vec<(u32, u64)> = localities
            .iter()
            .map(|(at, weight, total, up)| (*at, weight * (1400 * up / total).min(1000)))
            .collect();
        let sum: u64 = effective.iter().map(|(_, weight)| weight).sum();
        if sum == 0 {
            return None;
        }
        let mut draw = hash.unwrap_or_else(|| fastrand::u64(..)) % sum;
        for (at, weight) in effective {
            if draw < weight {
                return Some(at);
            }
            draw -= weight;
        }
        None
    }

    /// Envoy's priority load: each level's health is 1.4 × its healthy
    /// share (the overprovisioning factor), at most 100 %; level 0 takes
    /// its health's worth of the load, the next levels the rest in order,
    /// normalized when the levels' health adds up to less than 100 %. The
    /// level is drawn from that load by `hash % 100` (hash-based balancers,
    /// as Envoy does) or at random. `None` when there is only one level.
    fn choose_priority(&self, hash: Option<u64>, healthy: &dyn Fn(usize) -> bool) -> Option<u32> {
        // The common case costs one comparison per endpoint, no allocation.
        let first = self.endpoints.first()?.priority;
        if self
            .endpoints
            .iter()
            .all(|endpoint| endpoint.priority == first)
        {
            return None;
        }
        let mut levels: Vec<(u32, u64, u64)> = Vec::new(); // (priority, total, healthy)
        for (index, endpoint) in self.endpoints.iter().enumerate() {
            let up = u64::from(healthy(index));
            match levels
                .iter_mut()
                .find(|(priority, _, _)| *priority == endpoint.priority)
            {
                Some(level) => {
                    level.1 += 1;
                    level.2 += up;
                }
                None => levels.push((endpoint.priority, 1, up)),
            }
        }
        if levels.len() <= 1 {
            return None;
        }
        levels.sort_unstable_by_key(|(priority, _, _)| *priority);
        let health: Vec<u64> = levels
            .iter()
            .map(|(_, total, up)| (140 * up / total).min(100))
            .collect();
        let total_health = health.iter().sum::<u64>().min(100);
        if total_health == 0 {
            return levels.first().map(|(priority, _, _)| *priority);
        }
        let draw = hash.unwrap_or_else(|| fastrand::u64(..)) % 100;
        let mut remaining = 100u64;
        let mut cumulative = 0u64;
        for ((priority, _, _), health) in levels.iter().zip(&health) {
            let load = (health * 100 / total_health).min(remaining);
            remaining -= load;
            cumulative += load;
            if draw < cumulative {
                return Some(*priority);
            }
        }
        // Rounding left a little load: the healthiest level takes it.
        levels
            .iter()
            .zip(&health)
            .max_by_key(|(_, health)| **health)
            .map(|((priority, _, _), _)| *priority)
    }

    /// This ORIGINAL_DST cluster for one request: its endpoint is
    /// `destination`, with the workload behind it, or when `destination`
    /// is a service's VIP the endpoints of that service port (what the
    /// network would pick, reached here over HBONE as the mesh's L4 path
    /// would, instead of plaintext to the VIP); the breaker, the pool and
    /// the outlier state are the cluster's.
    pub fn for_destination(&self, store: &Store, destination: SocketAddr) -> ClusterRuntime {
        let endpoints: Vec<ClusterEndpoint> = match store.service(destination) {
            Some(service) => service
                .endpoints
                .iter()
                // The dialled VIP's family first, as the L4 path dials.
                .filter(|endpoint| !endpoint.workload.ips.is_empty())
                .map(|endpoint| ClusterEndpoint {
                    address: SocketAddr::new(
                        endpoint.address_for(destination.ip()),
                        endpoint.target_port,
                    ),
                    workload: Some(endpoint.workload.clone()),
                    active_requests: Arc::default(),
                    priority: 0,
                    locality: None,
                    joined: Instant::now(),
                })
                .collect(),
            None => vec![ClusterEndpoint {
                address: destination,
                workload: store.workload(destination.ip()),
                active_requests: Arc::default(),
                priority: 0,
                locality: None,
                joined: Instant::now(),
            }],
        };
        let addresses: Vec<SocketAddr> = endpoints.iter().map(|e| e.address).collect();
        // A runtime per request keeps no round-robin position: a VIP's
        // endpoints are drawn at random, as kube-proxy draws them.
        let policy = if addresses.len() > 1 {
            crate::routing::LbPolicy::Random
        } else {
            self.config.lb_policy
        };
        ClusterRuntime {
            config: self.config.clone(),
            balancer: Balancer::new(policy, &addresses),
            outlier: self.outlier.clone(),
            breaker: self.breaker.clone(),
            pool: self.pool.clone(),
            endpoints,
        }
    }

    /// Whether endpoint `index` is in service (not ejected).
    pub fn is_healthy(&self, index: usize) -> bool {
        match (&self.outlier, self.endpoints.get(index)) {
            (Some(outlier), Some(endpoint)) => {
                !outlier.is_ejected(endpoint.address, Instant::now())
            }
            (None, Some(_)) => true,
            (_, None) => false,
        }
    }

    /// Feeds outlier detection with how a request to `index` went.
    pub fn record(&self, index: usize, result: UpstreamResult) {
        if let (Some(outlier), Some(endpoint)) = (&self.outlier, self.endpoints.get(index)) {
            outlier.record(endpoint.address, result, Instant::now());
        }
    }

    /// Ring hash or Maglev: the request's hash picks the endpoint.
    pub fn is_hash_based(&self) -> bool {
        self.config.lb_policy.is_hash_based()
    }

    /// A new runtime for `config` (a new config: nothing is kept).
    fn new(config: Arc<ClusterConfig>, endpoints: Vec<ClusterEndpoint>) -> ClusterRuntime {
        let addresses = addresses(&endpoints);
        let breaker = CircuitBreaker::new(config.circuit_breakers);
        ClusterRuntime {
            balancer: Balancer::new(config.lb_policy, &addresses)
                .with_panic_threshold(config.panic_threshold),
            outlier: config
                .outlier_detection
                .map(|outlier| Arc::new(OutlierDetector::new(outlier, &addresses))),
            pool: Arc::new(UpstreamPool::new(
                breaker.clone(),
                config.connect_timeout,
                config.pool,
                &config.tls,
                config.proxy_protocol,
            )),
            breaker,
            endpoints,
            config,
        }
    }

    /// The same cluster with `endpoints`: the breaker, the pool and the
    /// outlier state of endpoints that stay are kept, with the in-flight
    /// counts of those endpoints; the balancer is made for the new list.
    fn with_endpoints(&self, endpoints: Vec<ClusterEndpoint>) -> ClusterRuntime {
        let endpoints: Vec<ClusterEndpoint> = endpoints
            .into_iter()
            .map(|mut endpoint| {
                if let Some(old) = self.endpoints.iter().find(|old| old.same_as(&endpoint)) {
                    endpoint.active_requests = old.active_requests.clone();
                    endpoint.joined = old.joined;
                }
                endpoint
            })
            .collect();
        let addresses = addresses(&endpoints);
        if let Some(outlier) = &self.outlier {
            outlier.set_endpoints(&addresses);
        }
        let wanted: Vec<(SocketAddr, Option<&Identity>)> = endpoints
            .iter()
            .map(|endpoint| (endpoint.address, endpoint.identity()))
            .collect();
        self.pool.retain_endpoints(&wanted);
        ClusterRuntime {
            config: self.config.clone(),
            balancer: Balancer::new(self.config.lb_policy, &addresses)
                .with_panic_threshold(self.config.panic_threshold),
            outlier: self.outlier.clone(),
            breaker: self.breaker.clone(),
            pool: self.pool.clone(),
            endpoints,
        }
    }

    fn same_endpoints(&self, endpoints: &[ClusterEndpoint]) -> bool {
        self.endpoints.len() == endpoints.len()
            && self
                .endpoints
                .iter()
                .zip(endpoints)
                .all(|(old, new)| old.same_as(new))
    }
}

fn addresses(endpoints: &[ClusterEndpoint]) -> Vec<SocketAddr> {
    endpoints.iter().map(|endpoint| endpoint.address).collect()
}

/// The upstream protocol istiod would give the cluster of a service port,
/// by the port's declared protocol: HTTP/1.1 for `http`, HTTP/2 for
/// `http2` and `grpc`, and the client's own for a port whose protocol is
/// sniffed (`use_downstream_protocol_config`).
fn implicit_protocol(store: &Store, name: &str) -> UpstreamProtocol {
    use crate::state::AppProtocol;
    let declared = crate::routing::envoy::istio_cluster_name(name)
        .and_then(|(hostname, port, _)| store.service_by_hostname(hostname, port))
        .and_then(|service| service.app_protocol);
    match declared {
        Some(AppProtocol::Http) => UpstreamProtocol::Http1,
        Some(AppProtocol::Http2 | AppProtocol::Grpc) => UpstreamProtocol::Http2,
        Some(AppProtocol::Tcp) | None => UpstreamProtocol::Downstream,
    }
}

/// The default config for an Istio-named cluster that no `Cluster`
/// resource describes: the service port's endpoints, Envoy's defaults, and
/// the protocol istiod would choose.
fn implicit_cluster(name: &str, protocol: UpstreamProtocol) -> Option<ClusterConfig> {
    let (hostname, port, _subset) = crate::routing::envoy::istio_cluster_name(name)?;
    Some(ClusterConfig::with_defaults(
        name,
        ClusterEndpoints::Service {
            hostname: hostname.to_string(),
            port,
            subset: Vec::new(),
        },
        protocol,
    ))
}

/// A cluster's current runtime and what its endpoints were resolved from.
struct Cached {
    runtime: Arc<ClusterRuntime>,
    /// The service entry or EDS assignment last resolved: while the mesh
    /// or the route table hands out this same one, nothing needs resolving
    /// again (a shortcut only; whether the endpoints changed is decided by
    /// value).
    resolved_from: Option<Source>,
}

/// Where a cluster's endpoints come from, when not from its own config.
#[derive(Clone)]
enum Source {
    Service(Arc<ServiceEntry>),
    Eds(Arc<Assignment>),
    Dns(super::dns::Resolved),
}

impl Source {
    fn same_as(&self, other: &Source) -> bool {
        match (self, other) {
            (Source::Service(a), Source::Service(b)) => Arc::ptr_eq(a, b),
            (Source::Eds(a), Source::Eds(b)) => Arc::ptr_eq(a, b),
            (Source::Dns(a), Source::Dns(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// Runtime state per cluster name.
#[derive(Default)]
pub struct ClusterCache {
    by_name: Mutex<HashMap<String, Cached>>,
    /// Configs made for Istio-named clusters without a resource.
    implicit: Mutex<HashMap<String, Arc<ClusterConfig>>>,
    /// The DNS clusters' resolution.
    dns: super::dns::DnsClusters,
}

impl ClusterCache {
    pub fn get(
        &self,
        store: &Store,
        table: &RouteTable,
        name: &str,
    ) -> Option<Arc<ClusterRuntime>> {
        let config = match table.clusters.get(name) {
            Some(config) => config.clone(),
            None => {
                let protocol = implicit_protocol(store, name);
                let mut implicit = self.implicit.lock().unwrap_or_else(|e| e.into_inner());
                match implicit.get(name) {
                    Some(config) if config.protocol == protocol => config.clone(),
                    // New, or the port's declared protocol changed.
                    _ => {
                        let config = Arc::new(implicit_cluster(name, protocol)?);
                        implicit.insert(name.to_string(), config.clone());
                        config
                    }
                }
            }
        };
        let source = match &config.endpoints {
            ClusterEndpoints::Service { hostname, port, .. } => {
                Some(Source::Service(store.service_by_hostname(hostname, *port)?))
            }
            // Static, or one endpoint per request (`for_destination`).
            ClusterEndpoints::Static(_) | ClusterEndpoints::OriginalDst(_) => None,
            // None yet: no endpoints (503 UH) until EDS delivers them.
            ClusterEndpoints::Eds(name) => table.assignments.get(name).cloned().map(Source::Eds),
            // Likewise until the first answer.
            ClusterEndpoints::Dns(_) => self.dns.resolved(name).map(Source::Dns),
        };
        let mut by_name = self.by_name.lock().unwrap_or_else(|e| e.into_inner());
        // Configs are compared by value: every update makes a new table,
        // and a cluster whose config did not change keeps its state.
        let current = by_name.get_mut(name).filter(|cached| {
            Arc::ptr_eq(&cached.runtime.config, &config) || *cached.runtime.config == *config
        });
        let Some(cached) = current else {
            let endpoints = resolve(store, &config, source.as_ref());
            let runtime = Arc::new(ClusterRuntime::new(config, endpoints));
            by_name.insert(
                name.to_string(),
                Cached {
                    runtime: runtime.clone(),
                    resolved_from: source,
                },
            );
            return Some(runtime);
        };
        let unchanged_source = match (&cached.resolved_from, &source) {
            (Some(a), Some(b)) => a.same_as(b),
            (None, None) => true,
            _ => false,
        };
        if !unchanged_source {
            let endpoints = resolve(store, &config, source.as_ref());
            if !cached.runtime.same_endpoints(&endpoints) {
                cached.runtime = Arc::new(cached.runtime.with_endpoints(endpoints));
            }
            cached.resolved_from = source;
        }
        Some(cached.runtime.clone())
    }
}

impl ClusterCache {
    /// Forgets clusters `table` no longer names (and implicit ones whose
    /// service is gone from `mesh`), so that removed clusters don't keep
    /// their state for ever. Called whenever the route table is replaced (a
    /// request still on the old table may bring one back until the next).
    pub fn prune(&self, store: &Store, table: &RouteTable) {
        self.dns.sync(table);
        let still_wanted = |name: &str| {
            table.clusters.contains_key(name)
                || crate::routing::envoy::istio_cluster_name(name).is_some_and(
                    |(hostname, port, _)| store.service_by_hostname(hostname, port).is_some(),
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

    /// Closes the idle upstream connections of pods no longer enrolled
    /// (`live`: the enrolled pods' namespace cookies), in every cluster.
    pub fn retain_pods(&self, live: &std::collections::HashSet<u64>) {
        let by_name = self.by_name.lock().unwrap_or_else(|e| e.into_inner());
        for cached in by_name.values() {
            cached.runtime.pool.retain_pods(live);
        }
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

/// The cluster's endpoints: its service's (those of its subset), or its
/// static or EDS addresses with the workloads behind them.
fn resolve(store: &Store, config: &ClusterConfig, source: Option<&Source>) -> Vec<ClusterEndpoint> {
    let by_address = |addresses: &[LbAddress]| {
        addresses
            .iter()
            .map(|endpoint| ClusterEndpoint {
                address: endpoint.address,
                workload: store.workload(endpoint.address.ip()),
                active_requests: Arc::default(),
                priority: endpoint.priority,
                locality: endpoint.locality,
                joined: Instant::now(),
            })
            .collect()
    };
    match (&config.endpoints, source) {
        (ClusterEndpoints::Service { subset, .. }, Some(Source::Service(service))) => service
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
                    active_requests: Arc::default(),
                    priority: 0,
                    locality: None,
                    joined: Instant::now(),
                })
            })
            .collect(),
        (ClusterEndpoints::Static(addresses), _) => by_address(addresses),
        (ClusterEndpoints::Eds(_), Some(Source::Eds(assignment))) => {
            by_address(&assignment.endpoints)
        }
        (ClusterEndpoints::Dns(_), Some(Source::Dns(addresses))) => by_address(addresses),
        (
            ClusterEndpoints::Service { .. }
            | ClusterEndpoints::Eds(_)
            | ClusterEndpoints::Dns(_)
            | ClusterEndpoints::OriginalDst(_),
            _,
        ) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::Thresholds;
    use std::time::Duration;

    fn table(names: &[&str]) -> RouteTable {
        let clusters = names
            .iter()
            .map(|name| {
                let config = ClusterConfig {
                    connect_timeout: Duration::from_secs(1),
                    ..ClusterConfig::with_defaults(
                        name,
                        ClusterEndpoints::Static(vec![
                            "10.0.0.1:80".parse::<SocketAddr>().unwrap().into(),
                        ]),
                        crate::routing::UpstreamProtocol::Http1,
                    )
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
        let store = Store::default();
        let cache = ClusterCache::default();
        let first = table(&["a", "b"]);
        let a = cache.get(&store, &first, "a").unwrap();
        cache.get(&store, &first, "b").unwrap();
        // The same config in a new table: the same runtime (ejections and
        // counters survive an unrelated update).
        let second = table(&["a", "b"]);
        cache.prune(&store, &second);
        assert!(Arc::ptr_eq(&a, &cache.get(&store, &second, "a").unwrap()));
        assert_eq!(cache.cached(), ["a", "b"]);
        // `b` removed: forgotten when the table is replaced.
        let third = table(&["a"]);
        cache.prune(&store, &third);
        assert_eq!(cache.cached(), ["a"]);
        assert!(Arc::ptr_eq(&a, &cache.get(&store, &third, "a").unwrap()));
        assert!(cache.get(&store, &third, "b").is_none());
        // An Istio-named cluster of a service that doesn't exist is not made.
        assert!(
            cache
                .get(&store, &third, "outbound|80||gone.test")
                .is_none()
        );
    }

    fn workload(ip: &str, service_account: &str) -> Arc<Workload> {
        Arc::new(Workload {
            uid: format!("test/{service_account}"),
            source: crate::state::Source::ControlPlane,
            name: service_account.into(),
            workload_name: String::new(),
            workload_type: "pod",
            namespace: "test".into(),
            ips: vec![ip.parse().unwrap()],
            hostname: String::new(),
            identity: Identity::new("cluster.local", "test", service_account),
            node: String::new(),
            authorization_policies: Vec::new(),
            healthy: true,
            services: Vec::new(),
            network: String::new(),
            locality: Default::default(),
            labels: Default::default(),
            tunnel: Default::default(),
            waypoint: None,
            host_network: false,
            cluster_id: String::new(),
            capacity: 1,
        })
    }

    fn endpoint(ip: &str, service_account: &str) -> ClusterEndpoint {
        ClusterEndpoint {
            address: SocketAddr::new(ip.parse().unwrap(), 8080),
            workload: Some(workload(ip, service_account)),
            active_requests: Arc::default(),
            priority: 0,
            locality: None,
            joined: Instant::now(),
        }
    }

    #[test]
    fn a_new_endpoint_list_keeps_the_breaker_the_pool_and_the_ejections_of_those_that_stay() {
        let config = Arc::new(ClusterConfig {
            circuit_breakers: Thresholds {
                max_requests: 1,
                ..Thresholds::default()
            },
            outlier_detection: Some(crate::routing::OutlierDetection {
                consecutive_5xx: 1,
                consecutive_gateway_failure: 1,
                interval: Duration::from_secs(10),
                base_ejection_time: Duration::from_secs(60),
                max_ejection_percent: 100,
                consecutive_local_origin_failure: None,
            }),
            ..ClusterConfig::with_defaults(
                "outbound|80||web.test",
                ClusterEndpoints::Service {
                    hostname: "web.test".into(),
                    port: 80,
                    subset: Vec::new(),
                },
                crate::routing::UpstreamProtocol::Http1,
            )
        });
        let first = ClusterRuntime::new(
            config,
            vec![endpoint("10.0.0.1", "a"), endpoint("10.0.0.2", "b")],
        );
        first.record(0, UpstreamResult::ConnectFailure);
        assert_eq!(first.pick(None), Some(1), "10.0.0.1 ejected");
        let _held = first.breaker.try_request().unwrap();
        first.endpoints[1]
            .active_requests
            .fetch_add(1, Ordering::Relaxed);

        // New workload objects, the same values: the same endpoints.
        assert!(first.same_endpoints(&[endpoint("10.0.0.1", "a"), endpoint("10.0.0.2", "b")]));
        // Another identity at an address is another endpoint.
        assert!(!first.same_endpoints(&[endpoint("10.0.0.1", "a"), endpoint("10.0.0.2", "c")]));

        // 10.0.0.2 stays, 10.0.0.3 joins, in another order.
        let second = first.with_endpoints(vec![
            endpoint("10.0.0.3", "c"),
            endpoint("10.0.0.1", "a"),
            endpoint("10.0.0.2", "b"),
        ]);
        assert!(Arc::ptr_eq(&first.breaker, &second.breaker));
        assert!(Arc::ptr_eq(&first.pool, &second.pool));
        assert!(
            second.breaker.try_request().is_err(),
            "the held request still counts"
        );
        for _ in 0..10 {
            assert_ne!(second.pick(None), Some(1), "10.0.0.1 is still ejected");
        }
        assert_eq!(
            second.endpoints[2].active_requests.load(Ordering::Relaxed),
            1,
            "in-flight count kept"
        );
        assert_eq!(
            second.endpoints[0].active_requests.load(Ordering::Relaxed),
            0
        );
    }
    /// Slow start (Istio's `warmupDurationSecs`): an endpoint that joins a
    /// warm cluster gets its minimum share (10 % weight: 1 in 11) at first
    /// and keeps its join time across endpoint lists; the one there before
    /// gets the rest.
    #[test]
    fn a_joining_endpoint_warms_up_slowly() {
        let config = Arc::new(ClusterConfig {
            slow_start: Some(crate::routing::SlowStart {
                window: Duration::from_secs(600),
                aggression: 1.0,
                min_weight: 0.1,
            }),
            ..ClusterConfig::with_defaults(
                "warm",
                ClusterEndpoints::Static(Vec::new()),
                crate::routing::UpstreamProtocol::Http1,
            )
        });
        let mut old = endpoint("10.0.0.1", "a");
        old.joined = Instant::now() - Duration::from_secs(3600);
        let first = ClusterRuntime::new(config, vec![old]);
        let second =
            first.with_endpoints(vec![endpoint("10.0.0.1", "a"), endpoint("10.0.0.2", "b")]);
        let newcomer = (0..11_000).filter(|_| second.pick(None) == Some(1)).count();
        // 1,000 expected (σ ≈ 30).
        assert!((800..1200).contains(&newcomer), "{newcomer}");
        assert_eq!(
            crate::routing::SlowStart {
                window: Duration::from_secs(100),
                aggression: 2.0,
                min_weight: 0.1,
            }
            .factor(Duration::from_secs(25)),
            0.5,
            "(25/100)^(1/2)"
        );
    }
}
