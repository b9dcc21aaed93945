//! What the control plane has told the agent: resources by name with their
//! versions. Applying a response changes it whole or per resource, never
//! half a resource.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::SystemTime,
};

use super::{
    ADDRESS_TYPE, AUTHORIZATION_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_CONFIGURATION_TYPE, TYPES,
    convert::{self, AddressResource},
    proto::envoy::service::discovery::v3::DeltaDiscoveryResponse,
};
use crate::{
    routing::{Assignment, ClusterConfig, RouteConfig},
    security::authorization::Policy,
    state::{Source, Store},
};

/// Sent after each applied response.
#[derive(Debug, Clone)]
pub struct XdsUpdate {
    pub type_url: String,
}

#[derive(Debug, Default)]
pub struct ApplyOutcome {
    pub applied: usize,
    pub removed: usize,
    /// One line per rejected resource.
    pub errors: Vec<String>,
}

/// What an Address resource is in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AddressKey {
    /// By uid.
    Workload(String),
    /// By `namespace/hostname`.
    Service(String),
}

#[derive(Default)]
struct Inner {
    /// Address resources by xDS name: the workloads and services
    /// themselves live in the store.
    addresses: BTreeMap<String, (String, AddressKey)>,
    policies: BTreeMap<String, (String, Policy)>,
    /// Envoy's L7 resources, by name (which is their xDS resource name).
    route_configs: BTreeMap<String, (String, Arc<RouteConfig>)>,
    clusters: BTreeMap<String, (String, Arc<ClusterConfig>)>,
    /// EDS, by cluster name.
    assignments: BTreeMap<String, (String, Arc<Assignment>)>,
    /// Types for which a response has been applied (readiness).
    received: BTreeSet<String>,
}

/// The client's own counters, rendered on `/metrics` at scrape time.
#[derive(Default)]
pub struct XdsStats {
    connected: AtomicBool,
    reconnects: AtomicU64,
    /// Per type URL (the known ones, or "other": bounded).
    by_type: Mutex<BTreeMap<&'static str, TypeStats>>,
}

/// What happened to the responses of one type.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TypeStats {
    /// Responses applied and ACKed.
    pub updates: u64,
    /// Responses NACKed (one or more resources rejected).
    pub nacks: u64,
    /// Unix time (seconds) of the last ACKed response; 0 before one.
    pub last_update: f64,
}

impl XdsStats {
    /// The type URL as a bounded label value.
    fn label(type_url: &str) -> &'static str {
        TYPES
            .iter()
            .find(|known| **known == type_url)
            .copied()
            .unwrap_or("other")
    }

    /// Records a response: ACKed when `accepted`, NACKed otherwise.
    pub fn record_response(&self, type_url: &str, accepted: bool) {
        let mut by_type = self.by_type.lock().unwrap_or_else(|e| e.into_inner());
        let stats = by_type.entry(Self::label(type_url)).or_default();
        if accepted {
            stats.updates += 1;
            stats.last_update = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
        } else {
            stats.nacks += 1;
        }
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Counts a new stream attempt after one ended or failed.
    pub fn record_reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Per type URL, the subscribed types always present.
    pub fn by_type(&self) -> BTreeMap<&'static str, TypeStats> {
        let mut all: BTreeMap<&'static str, TypeStats> =
            TYPES.iter().map(|t| (*t, TypeStats::default())).collect();
        all.extend(
            self.by_type
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(t, s)| (*t, *s)),
        );
        all
    }
}

pub struct XdsState {
    node: convert::NodeContext,
    /// Where workloads and services go, as they arrive.
    store: Arc<Store>,
    inner: Mutex<Inner>,
    /// Connection state and per-type counts, for `/metrics`.
    pub stats: XdsStats,
}

impl XdsState {
    pub fn new(node: &convert::NodeContext, store: Arc<Store>) -> XdsState {
        XdsState {
            node: node.clone(),
            store,
            inner: Mutex::new(Inner::default()),
            stats: XdsStats::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Name → version of what is held of `type_url`.
    pub fn versions(&self, type_url: &str) -> HashMap<String, String> {
        let inner = self.lock();
        match type_url {
            ADDRESS_TYPE => versions_of(&inner.addresses),
            AUTHORIZATION_TYPE => versions_of(&inner.policies),
            ROUTE_CONFIGURATION_TYPE => versions_of(&inner.route_configs),
            CLUSTER_TYPE => versions_of(&inner.clusters),
            ENDPOINT_TYPE => versions_of(&inner.assignments),
            _ => HashMap::new(),
        }
    }

    /// Both resource types of Istio's workload API have been received at
    /// least once. Routing types are not awaited: a control plane may serve
    /// none, and the agent routes at L4 until it does.
    pub fn ready(&self) -> bool {
        let inner = self.lock();
        inner.received.contains(ADDRESS_TYPE) && inner.received.contains(AUTHORIZATION_TYPE)
    }

    pub fn apply(&self, response: &DeltaDiscoveryResponse) -> ApplyOutcome {
        let mut outcome = ApplyOutcome::default();
        let mut inner = self.lock();
        match response.type_url.as_str() {
            ADDRESS_TYPE => {
                let addresses = &mut inner.addresses;
                // One batch: readers see the whole response or none of it.
                self.store.update(|update| {
                    for resource in &response.resources {
                        let Some(any) = &resource.resource else {
                            outcome
                                .errors
                                .push(format!("{}: no resource body", resource.name));
                            continue;
                        };
                        let key = match convert::address(&any.value, &self.node) {
                            Ok(AddressResource::Workload(workload)) => {
                                let key = AddressKey::Workload(workload.uid.clone());
                                update.upsert_workload(*workload);
                                key
                            }
                            Ok(AddressResource::Service(service)) => {
                                let key = AddressKey::Service(service.name());
                                update.upsert_service(*service);
                                key
                            }
                            Err(error) => {
                                outcome.errors.push(format!("{}: {error}", resource.name));
                                continue;
                            }
                        };
                        let earlier = addresses.insert(
                            resource.name.clone(),
                            (resource.version.clone(), key.clone()),
                        );
                        // A name that changed kind or key leaves its old self.
                        if let Some((_, old)) = earlier
                            && old != key
                        {
                            remove_address(update, &old);
                        }
                        outcome.applied += 1;
                    }
                    for name in &response.removed_resources {
                        if let Some((_, key)) = addresses.remove(name) {
                            remove_address(update, &key);
                            outcome.removed += 1;
                        }
                    }
                });
            }
            AUTHORIZATION_TYPE => {
                for resource in &response.resources {
                    let Some(any) = &resource.resource else {
                        outcome
                            .errors
                            .push(format!("{}: no resource body", resource.name));
                        continue;
                    };
                    match convert::authorization(&any.value) {
                        Ok(policy) => {
                            inner
                                .policies
                                .insert(resource.name.clone(), (resource.version.clone(), policy));
                            outcome.applied += 1;
                        }
                        Err(error) => outcome.errors.push(format!("{}: {error}", resource.name)),
                    }
                }
                for name in &response.removed_resources {
                    outcome.removed += usize::from(inner.policies.remove(name).is_some());
                }
            }
            ROUTE_CONFIGURATION_TYPE => {
                apply_named(&mut inner.route_configs, response, &mut outcome, |bytes| {
                    let config = crate::routing::envoy::route_configuration(bytes)?;
                    Ok((config.name.clone(), config))
                })
            }
            CLUSTER_TYPE => apply_named(&mut inner.clusters, response, &mut outcome, |bytes| {
                let cluster = crate::routing::envoy::cluster(bytes)?;
                Ok((cluster.name.clone(), cluster))
            }),
            ENDPOINT_TYPE => apply_named(&mut inner.assignments, response, &mut outcome, |bytes| {
                let assignment = crate::routing::envoy::cluster_load_assignment(bytes)?;
                Ok((assignment.cluster_name.clone(), assignment))
            }),
            other => outcome.errors.push(format!("unsupported type {other}")),
        }
        inner.received.insert(response.type_url.clone());
        outcome
    }

    pub fn policies(&self) -> Vec<Policy> {
        self.lock()
            .policies
            .values()
            .map(|(_, policy)| policy.clone())
            .collect()
    }

    /// Route configurations by name.
    pub fn route_configs(&self) -> HashMap<String, Arc<RouteConfig>> {
        self.lock()
            .route_configs
            .iter()
            .map(|(name, (_, config))| (name.clone(), config.clone()))
            .collect()
    }

    /// Clusters by name.
    pub fn clusters(&self) -> HashMap<String, Arc<ClusterConfig>> {
        self.lock()
            .clusters
            .iter()
            .map(|(name, (_, cluster))| (name.clone(), cluster.clone()))
            .collect()
    }

    /// The assignment names the EDS clusters held from the control plane
    /// look for.
    pub fn eds_names(&self) -> std::collections::BTreeSet<String> {
        self.lock()
            .clusters
            .values()
            .filter_map(|(_, cluster)| match &cluster.endpoints {
                crate::routing::ClusterEndpoints::Eds(name) => Some(name.clone()),
                _ => None,
            })
            .collect()
    }

    /// EDS assignments by cluster name.
    pub fn assignments(&self) -> HashMap<String, Arc<Assignment>> {
        self.lock()
            .assignments
            .iter()
            .map(|(name, (_, assignment))| (name.clone(), assignment.clone()))
            .collect()
    }

    /// Versions per type for `/config_dump`.
    pub fn summary(&self) -> serde_json::Value {
        let inner = self.lock();
        // BTreeMap keeps the dump sorted by name.
        let sorted = |versions: HashMap<String, String>| -> BTreeMap<String, String> {
            versions.into_iter().collect()
        };
        serde_json::json!({
            "workloads": sorted(versions_where(&inner.addresses, |key| matches!(key, AddressKey::Workload(_)))),
            "services": sorted(versions_where(&inner.addresses, |key| matches!(key, AddressKey::Service(_)))),
            "authorizations": sorted(versions_of(&inner.policies)),
            "route_configs": sorted(versions_of(&inner.route_configs)),
            "clusters": sorted(versions_of(&inner.clusters)),
            "endpoints": sorted(versions_of(&inner.assignments)),
        })
    }
}

/// Applies a response of a type whose resources convert whole and are
/// held by name; `convert` also returns the name the resource gives
/// itself, which must be its xDS name (removals go by that).
fn apply_named<T>(
    held: &mut BTreeMap<String, (String, Arc<T>)>,
    response: &DeltaDiscoveryResponse,
    outcome: &mut ApplyOutcome,
    convert: impl Fn(&[u8]) -> Result<(String, T), String>,
) {
    for resource in &response.resources {
        let Some(any) = &resource.resource else {
            outcome
                .errors
                .push(format!("{}: no resource body", resource.name));
            continue;
        };
        match convert(&any.value) {
            Ok((name, _)) if name != resource.name => outcome.errors.push(format!(
                "{}: the resource calls itself {name:?}",
                resource.name
            )),
            Ok((_, value)) => {
                held.insert(
                    resource.name.clone(),
                    (resource.version.clone(), Arc::new(value)),
                );
                outcome.applied += 1;
            }
            Err(error) => outcome.errors.push(format!("{}: {error}", resource.name)),
        }
    }
    for name in &response.removed_resources {
        outcome.removed += usize::from(held.remove(name).is_some());
    }
}

fn remove_address(update: &mut crate::state::Update<'_>, key: &AddressKey) {
    match key {
        AddressKey::Workload(uid) => update.remove_workload(uid),
        AddressKey::Service(name) => update.remove_service(Source::ControlPlane, name),
    };
}

/// Name → version of the Address resources whose key passes `keep`.
fn versions_where(
    map: &BTreeMap<String, (String, AddressKey)>,
    keep: impl Fn(&AddressKey) -> bool,
) -> HashMap<String, String> {
    map.iter()
        .filter(|(_, (_, key))| keep(key))
        .map(|(name, (version, _))| (name.clone(), version.clone()))
        .collect()
}

/// Name → version of the resources in `map`.
fn versions_of<T>(map: &BTreeMap<String, (String, T)>) -> HashMap<String, String> {
    map.iter()
        .map(|(name, (version, _))| (name.clone(), version.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::xds::proto::{envoy::service::discovery::v3::Resource, istio::workload};

    fn workload(uid: &str, ip: [u8; 4]) -> Resource {
        let address = workload::Address {
            r#type: Some(workload::address::Type::Workload(workload::Workload {
                uid: uid.into(),
                name: uid.into(),
                namespace: "test".into(),
                addresses: vec![ip.to_vec()],
                ..Default::default()
            })),
        };
        Resource {
            version: "1".into(),
            resource: Some(prost_types::Any {
                type_url: ADDRESS_TYPE.into(),
                value: address.encode_to_vec(),
            }),
            name: uid.into(),
            aliases: Vec::new(),
        }
    }

    fn response(resources: Vec<Resource>) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            resources,
            type_url: ADDRESS_TYPE.into(),
            nonce: "n".into(),
            ..Default::default()
        }
    }

    #[test]
    fn two_workloads_on_one_ip_resolve_to_the_lowest_uid_whatever_the_order() {
        for order in [["uid-b", "uid-a"], ["uid-a", "uid-b"]] {
            let state = XdsState::new(&convert::NodeContext::default(), Arc::new(Store::default()));
            let outcome = state.apply(&response(
                order
                    .iter()
                    .map(|uid| workload(uid, [10, 0, 0, 1]))
                    .collect(),
            ));
            assert!(outcome.errors.is_empty());
            let winner = state.store.workload([10, 0, 0, 1].into());
            assert_eq!(winner.map(|w| w.uid.clone()).as_deref(), Some("uid-a"));
            // The other is still held: removing the winner brings it back.
            let removed = DeltaDiscoveryResponse {
                removed_resources: vec!["uid-a".into()],
                ..response(Vec::new())
            };
            assert_eq!(state.apply(&removed).removed, 1);
            let winner = state.store.workload([10, 0, 0, 1].into());
            assert_eq!(winner.map(|w| w.uid.clone()).as_deref(), Some("uid-b"));
        }
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let state = XdsState::new(&convert::NodeContext::default(), Arc::new(Store::default()));
        let mut resource = workload("uid-a", [10, 0, 0, 1]);
        if let Some(any) = resource.resource.as_mut() {
            // Field 111 (varint 1), which this schema does not know.
            any.value.extend_from_slice(&[0xf8, 0x06, 0x01]);
        }
        let outcome = state.apply(&response(vec![resource]));
        assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
        assert_eq!(state.store.len(), (1, 0));
    }

    #[test]
    fn stats_count_acks_and_nacks_per_type_with_bounded_labels() {
        let stats = XdsStats::default();
        stats.record_response(ADDRESS_TYPE, true);
        stats.record_response(ADDRESS_TYPE, false);
        stats.record_response("type.googleapis.com/some.Other", false);
        let by_type = stats.by_type();
        let address = by_type[ADDRESS_TYPE];
        assert_eq!((address.updates, address.nacks), (1, 1));
        assert!(address.last_update > 0.0);
        assert_eq!(by_type[AUTHORIZATION_TYPE], TypeStats::default());
        assert_eq!(by_type["other"].nacks, 1);
        assert_eq!(by_type[CLUSTER_TYPE], TypeStats::default());
        assert_eq!(by_type.len(), 6);
    }

    fn route_configuration(name: &str, version: &str, regex: &str) -> Resource {
        use crate::routing::envoy::pb::envoy::{
            config::route::v3 as route_pb, r#type::matcher::v3 as matcher_pb,
        };
        let config = route_pb::RouteConfiguration {
            name: name.into(),
            virtual_hosts: vec![route_pb::VirtualHost {
                name: "vh".into(),
                domains: vec!["*".into()],
                routes: vec![route_pb::Route {
                    name: "r".into(),
                    r#match: Some(route_pb::RouteMatch {
                        path_specifier: Some(route_pb::route_match::PathSpecifier::SafeRegex(
                            matcher_pb::RegexMatcher {
                                regex: regex.into(),
                                engine_type: None,
                            },
                        )),
                        ..Default::default()
                    }),
                    action: Some(route_pb::route::Action::Route(route_pb::RouteAction {
                        cluster_specifier: Some(route_pb::route_action::ClusterSpecifier::Cluster(
                            "c".into(),
                        )),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        Resource {
            version: version.into(),
            resource: Some(prost_types::Any {
                type_url: ROUTE_CONFIGURATION_TYPE.into(),
                value: config.encode_to_vec(),
            }),
            name: name.into(),
            aliases: Vec::new(),
        }
    }

    #[test]
    fn route_configurations_apply_nack_and_go_by_name() {
        let state = XdsState::new(&convert::NodeContext::default(), Arc::new(Store::default()));
        let routes = |resources, removed: &[&str]| DeltaDiscoveryResponse {
            resources,
            type_url: ROUTE_CONFIGURATION_TYPE.into(),
            nonce: "n".into(),
            removed_resources: removed.iter().map(|name| name.to_string()).collect(),
            ..Default::default()
        };
        let outcome = state.apply(&routes(vec![route_configuration("svc", "1", "/a.*")], &[]));
        assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
        assert!(state.route_configs().contains_key("svc"));
        // A regex that does not compile: NACKed, version 1 kept.
        let outcome = state.apply(&routes(vec![route_configuration("svc", "2", "/a(")], &[]));
        assert_eq!(outcome.applied, 0);
        assert!(
            outcome.errors[0].starts_with("svc: route 'r' in virtual host 'vh': match.safe_regex"),
            "{:?}",
            outcome.errors
        );
        assert_eq!(state.versions(ROUTE_CONFIGURATION_TYPE)["svc"], "1");
        assert_eq!(state.summary()["route_configs"]["svc"], "1");
        // The xDS name and the resource's own must agree.
        let mut renamed = route_configuration("other", "3", "/b");
        renamed.name = "svc".into();
        assert!(state.apply(&routes(vec![renamed], &[])).errors[0].contains("calls itself"));
        assert_eq!(state.apply(&routes(Vec::new(), &["svc"])).removed, 1);
        assert!(state.route_configs().is_empty());
    }

    #[test]
    fn a_bad_resource_is_rejected_alone() {
        let state = XdsState::new(&convert::NodeContext::default(), Arc::new(Store::default()));
        let mut bad = workload("bad", [10, 0, 0, 2]);
        if let Some(any) = bad.resource.as_mut() {
            any.value = vec![0xff, 0xff, 0xff];
        }
        let outcome = state.apply(&response(vec![workload("good", [10, 0, 0, 1]), bad]));
        assert_eq!(outcome.applied, 1);
        assert_eq!(outcome.errors.len(), 1);
        assert!(
            outcome.errors[0].starts_with("bad:"),
            "{:?}",
            outcome.errors
        );
        assert_eq!(state.versions(ADDRESS_TYPE).len(), 1);
    }
}
