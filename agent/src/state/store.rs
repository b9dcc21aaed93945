//! The store: every workload and service the node knows, keyed by uid and
//! by name, with the indexes the proxy reads on each connection (address,
//! VIP:port, hostname:port) and the others (identity, node).
//!
//! Readers load a snapshot without locking (arc-swap). Writers take turns
//! (a mutex), change a copy of the snapshot whose persistent maps share
//! everything they don't touch, and swap it in once per batch: a
//! one-workload change costs O(log n) plus the service ports it backs,
//! never a rebuild of the whole table. A service port's entry is replaced
//! only when its own endpoints change, so what hangs off it (balancer
//! turns, cluster state) survives unrelated updates.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;

use super::{
    service::{Endpoint, Service, ServiceEntry},
    workload::{Source, Workload},
};
use crate::{config::Config, security::identity::Identity};

/// A service by who defined it and its `namespace/hostname`: the file and
/// the control plane may both define one; the file wins its VIPs.
type ServiceKey = (Source, String);

/// What readers see.
#[derive(Clone, Default)]
struct Snapshot {
    workloads: imbl::HashMap<String, Arc<Workload>>,
    /// The winning workload per address. A workload that is not ready
    /// still owns its addresses (traffic to it stays in the mesh); only
    /// service endpoint selection skips it.
    by_ip: imbl::HashMap<IpAddr, Arc<Workload>>,
    by_identity: imbl::HashMap<Identity, imbl::OrdSet<String>>,
    by_node: imbl::HashMap<String, imbl::OrdSet<String>>,
    services: imbl::HashMap<ServiceKey, Arc<Service>>,
    by_vip: imbl::HashMap<SocketAddr, Arc<ServiceEntry>>,
    by_hostname: imbl::HashMap<(String, u16), Arc<ServiceEntry>>,
    /// Services by hostname alone (every namespace and source), for DNS.
    by_name: imbl::HashMap<String, imbl::OrdSet<ServiceKey>>,
}

impl Snapshot {
    /// The workloads an index entry names.
    fn resolve(&self, uids: Option<&imbl::OrdSet<String>>) -> Vec<Arc<Workload>> {
        uids.into_iter()
            .flatten()
            .filter_map(|uid| self.workloads.get(uid).cloned())
            .collect()
    }
}

/// One workload's claim on an address: (unhealthy, source, uid), so that
/// the healthy claims sort first.
type AddressClaim = (bool, Source, String);

fn address_claim(workload: &Workload) -> AddressClaim {
    (!workload.healthy, workload.source, workload.uid.clone())
}

/// What only writers need: every claim, so that removing a winner brings
/// the next one back without a rescan.
#[derive(Default)]
struct Claims {
    /// Workloads claiming each address; the first wins (a healthy one
    /// before an unhealthy one, then by source and uid).
    ips: HashMap<IpAddr, BTreeSet<AddressClaim>>,
    /// Healthy workloads by the service they back.
    members: HashMap<String, BTreeSet<String>>,
    /// Each service port's entry.
    entries: HashMap<(ServiceKey, u16), Arc<ServiceEntry>>,
    vips: HashMap<SocketAddr, BTreeSet<ServiceKey>>,
    hostnames: HashMap<(String, u16), BTreeSet<ServiceKey>>,
    /// uids and service names per source, to replace one source whole.
    workloads_of: HashMap<Source, HashSet<String>>,
    services_of: HashMap<Source, HashSet<String>>,
}

#[derive(Default)]
pub struct Store {
    claims: Mutex<Claims>,
    snapshot: ArcSwap<Snapshot>,
}

impl Store {
    /// Applies a batch of changes; readers see all of them or none.
    pub fn update<T>(&self, changes: impl FnOnce(&mut Update<'_>) -> T) -> T {
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        let mut update = Update {
            next: Snapshot::clone(&self.snapshot.load()),
            claims: &mut claims,
            dirty: Dirty::default(),
            changed: false,
        };
        let result = changes(&mut update);
        if update.changed {
            update.commit();
            self.snapshot.store(Arc::new(update.next));
        }
        result
    }

    /// Replaces the file's pods, workloads and services.
    pub fn set_file(&self, config: &Config) {
        let workloads = config
            .pods
            .iter()
            .map(|pod| Workload::from_pod(pod, Source::File, config))
            .chain(
                config
                    .workloads
                    .iter()
                    .map(|workload| Workload::from_file(workload, config)),
            )
            .collect();
        self.update(|update| {
            update.replace_source(Source::File, workloads, Service::from_file(config))
        });
    }

    /// Replaces the pods of this node the Kubernetes API enrolled. They are
    /// workloads even without a control plane, and their own labels reach
    /// the control plane's workload of the same address (Istio's workload
    /// API carries only the canonical app and version).
    pub fn set_kubernetes_pods(&self, pods: &[crate::config::PodConfig], config: &Config) {
        let workloads = pods
            .iter()
            .map(|pod| Workload::from_pod(pod, Source::Kubernetes, config))
            .collect();
        self.update(|update| update.replace_source(Source::Kubernetes, workloads, Vec::new()));
    }

    pub fn workload(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.snapshot.load().by_ip.get(&ip.to_canonical()).cloned()
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<Arc<Workload>> {
        self.snapshot.load().workloads.get(uid).cloned()
    }

    /// The service port behind a VIP:port, if any.
    pub fn service(&self, address: SocketAddr) -> Option<Arc<ServiceEntry>> {
        let key = SocketAddr::new(address.ip().to_canonical(), address.port());
        self.snapshot.load().by_vip.get(&key).cloned()
    }

    /// The service `hostname` on `port`, for clusters that name it.
    pub fn service_by_hostname(&self, hostname: &str, port: u16) -> Option<Arc<ServiceEntry>> {
        self.snapshot
            .load()
            .by_hostname
            .get(&(hostname.to_string(), port))
            .cloned()
    }

    /// The services named `hostname` (from any namespace or source; the
    /// file's first), each with one of its ports' entries (the endpoints of
    /// a service without VIPs), for DNS.
    pub fn services_named(&self, hostname: &str) -> Vec<(Arc<Service>, Option<Arc<ServiceEntry>>)> {
        let snapshot = self.snapshot.load();
        let Some(keys) = snapshot.by_name.get(hostname) else {
            return Vec::new();
        };
        keys.iter()
            .filter_map(|key| snapshot.services.get(key).cloned())
            .map(|service| {
                let entry = service
                    .ports
                    .first()
                    .and_then(|(port, _)| snapshot.by_hostname.get(&(hostname.to_string(), *port)))
                    .cloned();
                (service, entry)
            })
            .collect()
    }

    /// Workloads running as `identity`, by uid.
    pub fn workloads_with_identity(&self, identity: &Identity) -> Vec<Arc<Workload>> {
        let snapshot = self.snapshot.load();
        snapshot.resolve(snapshot.by_identity.get(identity))
    }

    /// Workloads on `node`, by uid.
    pub fn workloads_on_node(&self, node: &str) -> Vec<Arc<Workload>> {
        let snapshot = self.snapshot.load();
        snapshot.resolve(snapshot.by_node.get(node))
    }

    /// Every address and the workload it resolves to, sorted by address,
    /// for `/config_dump`.
    pub fn listed(&self) -> Vec<(IpAddr, Arc<Workload>)> {
        let snapshot = self.snapshot.load();
        let mut listed: Vec<(IpAddr, Arc<Workload>)> = snapshot
            .by_ip
            .iter()
            .map(|(ip, workload)| (*ip, workload.clone()))
            .collect();
        listed.sort_by_key(|(ip, _)| *ip);
        listed
    }

    /// How many workloads and services the store holds.
    pub fn len(&self) -> (usize, usize) {
        let snapshot = self.snapshot.load();
        (snapshot.workloads.len(), snapshot.services.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }
}

/// What a batch touched, recomputed when it commits.
#[derive(Default)]
struct Dirty {
    ips: HashSet<IpAddr>,
    /// Addresses a Kubernetes pod claimed or let go.
    pod_ips: HashSet<IpAddr>,
    services: HashSet<String>,
    vips: HashSet<SocketAddr>,
    hostnames: HashSet<(String, u16)>,
}

/// One batch of changes (see [`Store::update`]).
pub struct Update<'a> {
    next: Snapshot,
    claims: &'a mut Claims,
    dirty: Dirty,
    changed: bool,
}

impl Update<'_> {
    /// Adds or replaces a workload; whether anything changed.
    pub fn upsert_workload(&mut self, mut workload: Workload) -> bool {
        // IPv4-mapped IPv6 addresses are IPv4, as readers look them up.
        for ip in &mut workload.ips {
            *ip = ip.to_canonical();
        }
        if let Some(old) = self.next.workloads.get(&workload.uid) {
            if **old == workload {
                return false;
            }
            self.remove_workload(&workload.uid);
        }
        self.changed = true;
        let uid = workload.uid.clone();
        index_add(&mut self.next.by_identity, &workload.identity, &uid);
        index_add(&mut self.next.by_node, &workload.node, &uid);
        self.claims
            .workloads_of
            .entry(workload.source)
            .or_default()
            .insert(uid.clone());
        for ip in workload.ips.iter().filter(|_| !workload.host_network) {
            self.claims
                .ips
                .entry(*ip)
                .or_default()
                .insert(address_claim(&workload));
            self.dirty.ips.insert(*ip);
            if workload.source == Source::Kubernetes {
                self.dirty.pod_ips.insert(*ip);
            }
        }
        if workload.healthy {
            for (service, _) in &workload.services {
                self.claims
                    .members
                    .entry(service.clone())
                    .or_default()
                    .insert(uid.clone());
                self.dirty.services.insert(service.clone());
            }
        }
        self.next.workloads.insert(uid, Arc::new(workload));
        true
    }

    /// Removes a workload; whether it was there.
    pub fn remove_workload(&mut self, uid: &str) -> bool {
        let Some(old) = self.next.workloads.remove(uid) else {
            return false;
        };
        self.changed = true;
        index_remove(&mut self.next.by_identity, &old.identity, uid);
        index_remove(&mut self.next.by_node, &old.node, uid);
        if let Some(uids) = self.claims.workloads_of.get_mut(&old.source) {
            uids.remove(uid);
        }
        for ip in old.ips.iter().filter(|_| !old.host_network) {
            remove_claim(&mut self.claims.ips, ip, &address_claim(&old));
            self.dirty.ips.insert(*ip);
            if old.source == Source::Kubernetes {
                self.dirty.pod_ips.insert(*ip);
            }
        }
        if old.healthy {
            for (service, _) in &old.services {
                remove_claim(&mut self.claims.members, service, &uid.to_string());
                self.dirty.services.insert(service.clone());
            }
        }
        true
    }

    /// Adds or replaces a service; whether anything changed.
    pub fn upsert_service(&mut self, mut service: Service) -> bool {
        for vip in &mut service.vips {
            *vip = vip.to_canonical();
        }
        let key = (service.source, service.name());
        if let Some(old) = self.next.services.get(&key) {
            if **old == service {
                return false;
            }
            self.remove_service(service.source, &key.1);
        }
        self.changed = true;
        for (port, _) in &service.ports {
            for vip in &service.vips {
                let vip = SocketAddr::new(*vip, *port);
                self.claims.vips.entry(vip).or_default().insert(key.clone());
                self.dirty.vips.insert(vip);
            }
            let hostname = (service.hostname.clone(), *port);
            self.claims
                .hostnames
                .entry(hostname.clone())
                .or_default()
                .insert(key.clone());
            self.dirty.hostnames.insert(hostname);
        }
        self.claims
            .services_of
            .entry(service.source)
            .or_default()
            .insert(key.1.clone());
        self.dirty.services.insert(key.1.clone());
        let mut named = self
            .next
            .by_name
            .get(&service.hostname)
            .cloned()
            .unwrap_or_default();
        named.insert(key.clone());
        self.next.by_name.insert(service.hostname.clone(), named);
        self.next.services.insert(key, Arc::new(service));
        true
    }

    /// Removes a service; whether it was there.
    pub fn remove_service(&mut self, source: Source, name: &str) -> bool {
        let key = (source, name.to_string());
        let Some(old) = self.next.services.remove(&key) else {
            return false;
        };
        self.changed = true;
        for (port, _) in &old.ports {
            self.claims.entries.remove(&(key.clone(), *port));
            for vip in &old.vips {
                let vip = SocketAddr::new(*vip, *port);
                remove_claim(&mut self.claims.vips, &vip, &key);
                self.dirty.vips.insert(vip);
            }
            let hostname = (old.hostname.clone(), *port);
            remove_claim(&mut self.claims.hostnames, &hostname, &key);
            self.dirty.hostnames.insert(hostname);
        }
        if let Some(names) = self.claims.services_of.get_mut(&source) {
            names.remove(name);
        }
        if let Some(named) = self.next.by_name.get(&old.hostname) {
            let mut named = named.clone();
            named.remove(&key);
            if named.is_empty() {
                self.next.by_name.remove(&old.hostname);
            } else {
                self.next.by_name.insert(old.hostname.clone(), named);
            }
        }
        true
    }

    /// Makes `source`'s workloads and services exactly these: what is
    /// unchanged costs a comparison, nothing more.
    pub fn replace_source(
        &mut self,
        source: Source,
        workloads: Vec<Workload>,
        services: Vec<Service>,
    ) {
        let wanted: HashSet<&str> = workloads.iter().map(|w| w.uid.as_str()).collect();
        let gone: Vec<String> = self
            .claims
            .workloads_of
            .get(&source)
            .into_iter()
            .flatten()
            .filter(|uid| !wanted.contains(uid.as_str()))
            .cloned()
            .collect();
        for uid in gone {
            self.remove_workload(&uid);
        }
        let wanted: HashSet<String> = services.iter().map(Service::name).collect();
        let gone: Vec<String> = self
            .claims
            .services_of
            .get(&source)
            .into_iter()
            .flatten()
            .filter(|name| !wanted.contains(*name))
            .cloned()
            .collect();
        for name in gone {
            self.remove_service(source, &name);
        }
        for workload in workloads {
            self.upsert_workload(Workload { source, ..workload });
        }
        for service in services {
            self.upsert_service(Service { source, ..service });
        }
    }

    /// Recomputes what the batch touched: address winners, then the
    /// service ports whose endpoints changed, then VIP and hostname
    /// winners.
    fn commit(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        let mut services = dirty.services;
        for ip in dirty.ips {
            let claimants = self.claims.ips.get(&ip);
            let mut ranked = claimants.into_iter().flatten();
            let first = ranked.next();
            if let (Some(kept), Some(ignored)) = (first, ranked.next())
                && (kept.0, kept.1) == (ignored.0, ignored.1)
            {
                let (kept, ignored) = (&kept.2, &ignored.2);
                tracing::warn!(%ip, %kept, %ignored, "two workloads claim one IP");
            }
            match first.and_then(|(_, _, uid)| self.next.workloads.get(uid).cloned()) {
                Some(winner) => {
                    self.next.by_ip.insert(ip, winner);
                }
                None => {
                    self.next.by_ip.remove(&ip);
                }
            }
        }
        // A Kubernetes pod's labels reach the control plane's workload of
        // the same address: when one comes or goes, that workload's
        // services' endpoints change.
        for ip in dirty.pod_ips {
            for (_, _, uid) in self.claims.ips.get(&ip).into_iter().flatten() {
                if let Some(workload) = self.next.workloads.get(uid) {
                    services.extend(workload.services.iter().map(|(name, _)| name.clone()));
                }
            }
        }
        let mut vips = dirty.vips;
        let mut hostnames = dirty.hostnames;
        for name in services {
            for source in [Source::File, Source::ControlPlane] {
                let key = (source, name.clone());
                let Some(service) = self.next.services.get(&key).cloned() else {
                    continue;
                };
                for (port, default_target) in &service.ports {
                    let entry = ServiceEntry::new(
                        name.clone(),
                        *port,
                        self.endpoints(
                            &name,
                            *port,
                            *default_target,
                            service.load_balancing.allow_unhealthy,
                        ),
                        service
                            .app_protocols
                            .iter()
                            .find(|(p, _)| p == port)
                            .map(|(_, protocol)| *protocol),
                        service.waypoint.clone(),
                        service.load_balancing.clone(),
                    );
                    let slot = (key.clone(), *port);
                    if self
                        .claims
                        .entries
                        .get(&slot)
                        .is_some_and(|current| **current == entry)
                    {
                        continue;
                    }
                    self.claims.entries.insert(slot, Arc::new(entry));
                    vips.extend(service.vips.iter().map(|vip| SocketAddr::new(*vip, *port)));
                    hostnames.insert((service.hostname.clone(), *port));
                }
            }
        }
        for vip in vips {
            match self.winning_entry(self.claims.vips.get(&vip), vip.port()) {
                Some(entry) => {
                    self.next.by_vip.insert(vip, entry);
                }
                None => {
                    self.next.by_vip.remove(&vip);
                }
            }
        }
        for hostname in hostnames {
            let port = hostname.1;
            match self.winning_entry(self.claims.hostnames.get(&hostname), port) {
                Some(entry) => {
                    self.next.by_hostname.insert(hostname, entry);
                }
                None => {
                    self.next.by_hostname.remove(&hostname);
                }
            }
        }
    }

    fn winning_entry(
        &self,
        claimants: Option<&BTreeSet<ServiceKey>>,
        port: u16,
    ) -> Option<Arc<ServiceEntry>> {
        let key = claimants?.first()?;
        self.claims.entries.get(&(key.clone(), port)).cloned()
    }

    /// The healthy, addressed members of `service` on `port`, by uid.
    fn endpoints(
        &self,
        service: &str,
        port: u16,
        default_target: u16,
        allow_unhealthy: bool,
    ) -> Vec<Endpoint> {
        let Some(members) = self.claims.members.get(service) else {
            return Vec::new();
        };
        members
            .iter()
            .filter_map(|uid| self.next.workloads.get(uid))
            .filter(|workload| {
                (workload.healthy || allow_unhealthy)
                    && (!workload.ips.is_empty() || !workload.hostname.is_empty())
            })
            .map(|workload| {
                let target_port = workload
                    .services
                    .iter()
                    .find(|(name, _)| name == service)
                    .and_then(|(_, ports)| ports.iter().find(|(p, _)| *p == port))
                    .map_or(default_target, |(_, target)| *target);
                Endpoint {
                    workload: self.labelled(workload),
                    target_port,
                }
            })
            .collect()
    }

    /// `workload` with the labels of the Kubernetes pods of its addresses.
    fn labelled(&self, workload: &Arc<Workload>) -> Arc<Workload> {
        if workload.source == Source::Kubernetes {
            return workload.clone();
        }
        let pods: Vec<&Arc<Workload>> = workload
            .ips
            .iter()
            .flat_map(|ip| self.claims.ips.get(ip).into_iter().flatten())
            .filter(|(_, source, _)| *source == Source::Kubernetes)
            .filter_map(|(_, _, uid)| self.next.workloads.get(uid))
            .collect();
        if pods.is_empty() {
            return workload.clone();
        }
        let mut labels = workload.labels.clone();
        for pod in pods {
            labels.extend(pod.labels.clone());
        }
        if labels == workload.labels {
            return workload.clone();
        }
        Arc::new(Workload {
            labels,
            ..Workload::clone(workload)
        })
    }
}

fn index_add<K: std::hash::Hash + Eq + Clone>(
    index: &mut imbl::HashMap<K, imbl::OrdSet<String>>,
    key: &K,
    uid: &str,
) {
    // In place: a set this batch already copied is not copied again.
    match index.get_mut(key) {
        Some(uids) => {
            uids.insert(uid.to_string());
        }
        None => {
            index.insert(key.clone(), imbl::OrdSet::unit(uid.to_string()));
        }
    }
}

fn index_remove<K: std::hash::Hash + Eq + Clone>(
    index: &mut imbl::HashMap<K, imbl::OrdSet<String>>,
    key: &K,
    uid: &str,
) {
    let Some(uids) = index.get_mut(key) else {
        return;
    };
    uids.remove(uid);
    if uids.is_empty() {
        index.remove(key);
    }
}

fn remove_claim<K: std::hash::Hash + Eq, C: Ord>(
    claims: &mut HashMap<K, BTreeSet<C>>,
    key: &K,
    claim: &C,
) {
    if let Some(set) = claims.get_mut(key) {
        set.remove(claim);
        if set.is_empty() {
            claims.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Locality;

    fn workload(uid: &str, source: Source, ips: &[&str], services: &[&str]) -> Workload {
        Workload {
            uid: uid.into(),
            source,
            name: uid.rsplit('/').next().unwrap_or(uid).into(),
            workload_name: String::new(),
            workload_type: "pod",
            namespace: "test".into(),
            ips: ips.iter().filter_map(|ip| ip.parse().ok()).collect(),
            hostname: String::new(),
            identity: Identity::new("cluster.local", "test", uid),
            node: "n1".into(),
            authorization_policies: Vec::new(),
            healthy: true,
            services: services
                .iter()
                .map(|name| (name.to_string(), Vec::new()))
                .collect(),
            network: String::new(),
            cluster_id: "Kubernetes".into(),
            locality: Locality::default(),
            labels: Default::default(),
            tunnel: Default::default(),
            waypoint: None,
            host_network: false,
            capacity: 1,
        }
    }

    fn service(name: &str, vips: &[&str]) -> Service {
        Service {
            source: Source::ControlPlane,
            namespace: "test".into(),
            hostname: name.into(),
            vips: vips.iter().filter_map(|ip| ip.parse().ok()).collect(),
            ports: vec![(80, 8080)],
            app_protocols: Vec::new(),
            waypoint: None,
            load_balancing: Default::default(),
        }
    }

    fn vip(address: &str) -> SocketAddr {
        SocketAddr::new(address.parse().unwrap_or([0, 0, 0, 0].into()), 80)
    }

    fn uids(entry: Option<Arc<ServiceEntry>>) -> Vec<String> {
        entry
            .map(|entry| {
                entry
                    .endpoints
                    .iter()
                    .map(|e| e.workload.uid.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn every_address_resolves_and_endpoints_dial_the_destinations_family() {
        let store = Store::default();
        store.update(|u| {
            u.upsert_workload(workload(
                "a",
                Source::ControlPlane,
                &["10.0.0.1", "fd00::1"],
                &["test/web"],
            ));
            u.upsert_service(service("web", &["10.96.0.1", "fd96::1"]));
        });
        for ip in ["10.0.0.1", "fd00::1", "::ffff:10.0.0.1"] {
            let found = store.workload(ip.parse().unwrap_or([0, 0, 0, 0].into()));
            assert_eq!(found.map(|w| w.uid.clone()).as_deref(), Some("a"), "{ip}");
        }
        let v6 = store.service(vip("fd96::1")).expect("v6 VIP");
        let v4 = store.service(vip("10.96.0.1")).expect("v4 VIP");
        assert!(Arc::ptr_eq(&v4, &v6), "one entry per service port");
        let endpoint = &v6.endpoints[0];
        assert_eq!(
            endpoint
                .address_for("fd96::1".parse().unwrap_or([0; 16].into()))
                .to_string(),
            "fd00::1"
        );
        assert_eq!(
            endpoint
                .address_for("10.96.0.1".parse().unwrap_or([0; 4].into()))
                .to_string(),
            "10.0.0.1"
        );
        assert_eq!(
            endpoint.address().map(|ip| ip.to_string()).as_deref(),
            Some("10.0.0.1")
        );
    }

    /// istiod's `network_mode: HOST_NETWORK`: the node's address is not
    /// the workload's, but the workload still serves its services; and
    /// removing it leaves the pod that really has the address alone.
    #[test]
    fn a_host_network_workload_is_an_endpoint_never_an_address() {
        let store = Store::default();
        let node_ip: IpAddr = "10.0.0.9".parse().unwrap_or([0; 4].into());
        store.update(|u| {
            let mut host = workload("host", Source::ControlPlane, &["10.0.0.9"], &["test/web"]);
            host.host_network = true;
            u.upsert_workload(host);
            u.upsert_service(service("web", &["10.96.0.1"]));
        });
        assert!(store.workload(node_ip).is_none());
        let entry = store.service(vip("10.96.0.1")).expect("VIP");
        assert_eq!(entry.endpoints.len(), 1);
        assert_eq!(entry.endpoints[0].workload.uid, "host");
        store.update(|u| {
            u.upsert_workload(workload("pod", Source::ControlPlane, &["10.0.0.9"], &[]));
            u.remove_workload("host");
        });
        assert_eq!(
            store.workload(node_ip).map(|w| w.uid.clone()).as_deref(),
            Some("pod")
        );
    }

    #[test]
    fn a_change_replaces_only_the_entries_it_touches() {
        let store = Store::default();
        store.update(|u| {
            for i in 0..20 {
                let svc = format!("test/svc-{}", i % 2);
                u.upsert_workload(workload(
                    &format!("w{i:02}"),
                    Source::ControlPlane,
                    &[&format!("10.0.0.{i}")],
                    &[&svc],
                ));
            }
            u.upsert_service(service("svc-0", &["10.96.0.0"]));
            u.upsert_service(service("svc-1", &["10.96.0.1"]));
        });
        let (svc0, svc1) = (
            store.service(vip("10.96.0.0")),
            store.service(vip("10.96.0.1")),
        );
        assert_eq!(uids(svc0.clone()).len(), 10);
        // w03 backs svc-1 only: svc-0's entry is the same Arc afterwards.
        store.update(|u| {
            u.upsert_workload(workload(
                "w03",
                Source::ControlPlane,
                &["10.0.1.3"],
                &["test/svc-1"],
            ))
        });
        let svc0_after = store.service(vip("10.96.0.0")).expect("svc-0");
        assert!(svc0.is_some_and(|before| Arc::ptr_eq(&before, &svc0_after)));
        let svc1_after = store.service(vip("10.96.0.1")).expect("svc-1");
        assert!(!svc1.is_some_and(|before| Arc::ptr_eq(&before, &svc1_after)));
        assert!(
            store
                .workload("10.0.0.3".parse().unwrap_or([0; 4].into()))
                .is_none()
        );
        // An identical upsert changes nothing at all.
        store.update(|u| {
            assert!(!u.upsert_workload(workload(
                "w03",
                Source::ControlPlane,
                &["10.0.1.3"],
                &["test/svc-1"]
            )))
        });
        assert!(Arc::ptr_eq(
            &svc1_after,
            &store.service(vip("10.96.0.1")).expect("svc-1")
        ));
        // Removing a workload takes it out of its service.
        store.update(|u| u.remove_workload("w01"));
        assert!(!uids(store.service(vip("10.96.0.1"))).contains(&"w01".to_string()));
        store.update(|u| u.remove_service(Source::ControlPlane, "test/svc-1"));
        assert!(store.service(vip("10.96.0.1")).is_none());
        assert!(store.service_by_hostname("svc-1", 80).is_none());
        assert_eq!(uids(store.service_by_hostname("svc-0", 80)).len(), 10);
    }

    #[test]
    fn the_file_wins_an_address_and_the_next_claimant_returns_when_it_goes() {
        let store = Store::default();
        let ip = "10.0.0.9".parse().unwrap_or([0; 4].into());
        store.update(|u| {
            u.upsert_workload(workload("xds-b", Source::ControlPlane, &["10.0.0.9"], &[]));
            u.upsert_workload(workload("xds-a", Source::ControlPlane, &["10.0.0.9"], &[]));
            u.upsert_workload(workload("file/test/f", Source::File, &["10.0.0.9"], &[]));
        });
        let winner = |store: &Store| store.workload(ip).map(|w| w.uid.clone());
        assert_eq!(winner(&store).as_deref(), Some("file/test/f"));
        store.update(|u| u.replace_source(Source::File, Vec::new(), Vec::new()));
        assert_eq!(winner(&store).as_deref(), Some("xds-a"));
        store.update(|u| u.remove_workload("xds-a"));
        assert_eq!(winner(&store).as_deref(), Some("xds-b"));
        // Not ready: still the address's workload (its traffic stays in
        // the mesh), but a healthy claimant wins over it.
        let mut sick = workload("xds-b", Source::ControlPlane, &["10.0.0.9"], &[]);
        sick.healthy = false;
        store.update(|u| u.upsert_workload(sick.clone()));
        assert_eq!(winner(&store).as_deref(), Some("xds-b"));
        store.update(|u| {
            u.upsert_workload(workload("xds-c", Source::ControlPlane, &["10.0.0.9"], &[]))
        });
        assert_eq!(winner(&store).as_deref(), Some("xds-c"));
        store.update(|u| u.remove_workload("xds-c"));
        assert_eq!(winner(&store).as_deref(), Some("xds-b"));
    }

    #[test]
    fn a_workload_that_is_not_ready_keeps_its_address_but_is_no_endpoint() {
        let store = Store::default();
        let mut sick = workload("xds-b", Source::ControlPlane, &["10.0.0.7"], &["test/web"]);
        sick.healthy = false;
        store.update(|u| {
            u.upsert_workload(sick);
            u.upsert_workload(workload(
                "xds-c",
                Source::ControlPlane,
                &["10.0.0.8"],
                &["test/web"],
            ));
            u.upsert_service(service("web", &["10.96.0.5"]));
        });
        let ip = "10.0.0.7".parse().unwrap_or([0; 4].into());
        assert_eq!(
            store.workload(ip).map(|w| w.uid.clone()).as_deref(),
            Some("xds-b")
        );
        assert_eq!(uids(store.service(vip("10.96.0.5"))), ["xds-c"]);
    }

    #[test]
    fn a_kubernetes_pods_labels_reach_the_control_planes_endpoint() {
        let store = Store::default();
        store.update(|u| {
            u.upsert_workload(workload(
                "xds-web",
                Source::ControlPlane,
                &["10.0.0.5"],
                &["test/web"],
            ));
            u.upsert_service(service("web", &["10.96.0.5"]));
        });
        let mut pod = workload(
            "kubernetes/test/web",
            Source::Kubernetes,
            &["10.0.0.5"],
            &[],
        );
        pod.labels.insert("version".into(), "v2".into());
        store.update(|u| u.replace_source(Source::Kubernetes, vec![pod], Vec::new()));
        let entry = store.service(vip("10.96.0.5")).expect("web");
        assert_eq!(entry.endpoints[0].workload.uid, "xds-web");
        assert_eq!(
            entry.endpoints[0]
                .workload
                .labels
                .get("version")
                .map(String::as_str),
            Some("v2")
        );
        store.update(|u| u.replace_source(Source::Kubernetes, Vec::new(), Vec::new()));
        let entry = store.service(vip("10.96.0.5")).expect("web");
        assert!(entry.endpoints[0].workload.labels.is_empty());
    }

    #[test]
    fn workloads_are_indexed_by_identity_and_node() {
        let store = Store::default();
        let mut b = workload("b", Source::ControlPlane, &["10.0.0.2"], &[]);
        b.identity = Identity::new("cluster.local", "test", "a");
        b.node = "n2".into();
        store.update(|u| {
            u.upsert_workload(workload("a", Source::ControlPlane, &["10.0.0.1"], &[]));
            u.upsert_workload(b);
        });
        let identity = Identity::new("cluster.local", "test", "a");
        let names =
            |found: Vec<Arc<Workload>>| found.iter().map(|w| w.uid.clone()).collect::<Vec<_>>();
        assert_eq!(names(store.workloads_with_identity(&identity)), ["a", "b"]);
        assert_eq!(names(store.workloads_on_node("n2")), ["b"]);
        store.update(|u| u.remove_workload("b"));
        assert_eq!(names(store.workloads_with_identity(&identity)), ["a"]);
        assert!(store.workloads_on_node("n2").is_empty());
    }
}
