//! ztunnel's local config file (its `LOCAL_XDS_PATH`), read as ztunnel
//! writes it: camelCase, `workloadIps`, `protocol: HBONE|TCP`, a workload's
//! `services` as a port map, VIPs as `network/ip`, policies as three levels
//! of lists with `!Exact` string matches. Each entry becomes the workload
//! API resource istiod would send for it, and goes through the same
//! conversion as a control plane's (convert.rs): one set of checks, one
//! meaning. A file loads whole or not at all.
//!
//! Where ztunnel is looser, Weir refuses rather than widen or guess: an
//! unknown key inside a policy match (ztunnel ignores it, which would match
//! more than written), a uid listed twice (ztunnel keeps the last), and a
//! service's explicit `endpoints` (list the workload under its `services`).
//! Where ztunnel leaves a field empty, the defaults are those of istiod's
//! workloads: the node's trust domain and the `default` service account.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use prost::Message as _;
use serde::Deserialize;

use super::{
    convert,
    proto::{
        envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource},
        istio::{security, workload},
    },
};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalConfig {
    #[serde(default)]
    workloads: Vec<LocalWorkload>,
    #[serde(default)]
    policies: Vec<LocalPolicy>,
    #[serde(default)]
    services: Vec<LocalService>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalWorkload {
    workload_ips: Vec<IpAddr>,
    #[serde(default)]
    waypoint: Option<Gateway>,
    #[serde(default)]
    network_gateway: Option<Gateway>,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    network_mode: NetworkMode,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    name: String,
    namespace: String,
    #[serde(default)]
    trust_domain: String,
    #[serde(default)]
    service_account: String,
    #[serde(default)]
    network: String,
    #[serde(default)]
    workload_name: String,
    #[serde(default)]
    workload_type: String,
    #[serde(default)]
    canonical_name: String,
    #[serde(default)]
    canonical_revision: String,
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    node: String,
    #[serde(default)]
    native_tunnel: bool,
    #[serde(default)]
    application_tunnel: Option<ApplicationTunnel>,
    #[serde(default)]
    authorization_policies: Vec<String>,
    #[serde(default)]
    status: Health,
    #[serde(default)]
    cluster_id: String,
    #[serde(default)]
    locality: Option<Locality>,
    #[serde(default = "one")]
    capacity: u32,
    /// `namespace/hostname` → service port → target port.
    services: BTreeMap<String, BTreeMap<u16, u16>>,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize, Default, Clone, Copy)]
#[allow(clippy::upper_case_acronyms)]
enum Protocol {
    #[default]
    TCP,
    HBONE,
}

#[derive(Deserialize, Default, Clone, Copy)]
enum NetworkMode {
    #[default]
    Standard,
    HostNetwork,
}

#[derive(Deserialize, Default, Clone, Copy)]
enum Health {
    #[default]
    Healthy,
    Unhealthy,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Gateway {
    /// `network/ip`, else `namespace/hostname`.
    destination: String,
    hbone_mtls_port: u16,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ApplicationTunnel {
    protocol: TunnelProtocol,
    #[serde(default)]
    port: Option<u16>,
}

#[derive(Deserialize, Clone, Copy)]
#[allow(clippy::upper_case_acronyms)]
enum TunnelProtocol {
    NONE,
    PROXY,
}

#[derive(Deserialize)]
struct Locality {
    region: String,
    zone: String,
    subzone: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalService {
    name: String,
    namespace: String,
    hostname: String,
    /// `network/ip`: `/10.96.0.1` on the default network.
    vips: Vec<String>,
    ports: BTreeMap<u16, u16>,
    #[serde(default)]
    endpoints: BTreeMap<String, serde_yaml::Value>,
    #[serde(default)]
    subject_alt_names: Vec<String>,
    #[serde(default)]
    waypoint: Option<Gateway>,
    #[serde(default)]
    load_balancer: Option<LoadBalancer>,
    #[serde(default)]
    ip_families: Option<IpFamilies>,
    /// Read (ztunnel's files carry it) and, like istiod's field 11, not
    /// acted on.
    #[serde(default, rename = "canonical")]
    _canonical: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LoadBalancer {
    routing_preferences: Vec<Scope>,
    mode: LoadBalancerMode,
    health_policy: HealthPolicy,
}

#[derive(Deserialize, Clone, Copy)]
enum Scope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

#[derive(Deserialize, Clone, Copy)]
enum LoadBalancerMode {
    Standard,
    Strict,
    Failover,
    Passthrough,
}

#[derive(Deserialize, Clone, Copy)]
enum HealthPolicy {
    OnlyHealthy,
    AllowAll,
}

#[derive(Deserialize, Clone, Copy)]
enum IpFamilies {
    Dual,
    IPv4,
    IPv6,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalPolicy {
    name: String,
    namespace: String,
    scope: PolicyScope,
    action: PolicyAction,
    /// Rules (any) of clauses (all) of matches (any).
    rules: Vec<Vec<Vec<LocalMatch>>>,
    /// Required by ztunnel's newest reader; its own example predates it.
    #[serde(default)]
    dry_run: bool,
}

#[derive(Deserialize, Clone, Copy)]
enum PolicyScope {
    Global,
    Namespace,
    WorkloadSelector,
}

#[derive(Deserialize, Clone, Copy)]
enum PolicyAction {
    Allow,
    Deny,
}

/// Unlike ztunnel, unknown keys are refused: a condition Weir did not read
/// would match more than written.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct LocalMatch {
    namespaces: Vec<StringMatch>,
    not_namespaces: Vec<StringMatch>,
    service_accounts: Vec<ServiceAccount>,
    not_service_accounts: Vec<ServiceAccount>,
    principals: Vec<StringMatch>,
    not_principals: Vec<StringMatch>,
    source_ips: Vec<String>,
    not_source_ips: Vec<String>,
    destination_ips: Vec<String>,
    not_destination_ips: Vec<String>,
    destination_ports: Vec<u16>,
    not_destination_ports: Vec<u16>,
}

/// Written as YAML tags, as ztunnel's serializer writes them:
/// `!Exact default`, `!Prefix cluster.local/`, `!Presence []`.
#[derive(Deserialize)]
enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence([(); 0]),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServiceAccount {
    namespace: String,
    service_account: String,
}

/// What a local file holds, as the workload API's resources by xDS name:
/// workloads by uid, services as `namespace/hostname`, policies as
/// `namespace/name`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LocalResources {
    pub addresses: BTreeMap<String, workload::Address>,
    pub authorizations: BTreeMap<String, security::Authorization>,
}

impl LocalResources {
    pub fn workloads(&self) -> usize {
        self.addresses
            .values()
            .filter(|a| matches!(a.r#type, Some(workload::address::Type::Workload(_))))
            .count()
    }

    pub fn services(&self) -> usize {
        self.addresses.len() - self.workloads()
    }

    /// A delta response of `type_url` that turns `held` (the names a state
    /// holds now) into these resources: every resource, and the removal of
    /// every held name that is gone.
    pub fn response(
        &self,
        type_url: &str,
        version: &str,
        held: impl IntoIterator<Item = String>,
    ) -> DeltaDiscoveryResponse {
        let resources: Vec<(String, Vec<u8>)> = match type_url {
            super::ADDRESS_TYPE => self
                .addresses
                .iter()
                .map(|(name, a)| (name.clone(), a.encode_to_vec()))
                .collect(),
            super::AUTHORIZATION_TYPE => self
                .authorizations
                .iter()
                .map(|(name, a)| (name.clone(), a.encode_to_vec()))
                .collect(),
            _ => Vec::new(),
        };
        let names: BTreeSet<&String> = resources.iter().map(|(name, _)| name).collect();
        let removed_resources = held
            .into_iter()
            .filter(|name| !names.contains(name))
            .collect();
        DeltaDiscoveryResponse {
            type_url: type_url.to_string(),
            system_version_info: version.to_string(),
            nonce: version.to_string(),
            removed_resources,
            resources: resources
                .into_iter()
                .map(|(name, value)| Resource {
                    version: version.to_string(),
                    resource: Some(prost_types::Any {
                        type_url: type_url.to_string(),
                        value,
                    }),
                    name,
                    aliases: Vec::new(),
                })
                .collect(),
        }
    }
}

/// Reads a file in ztunnel's local format and checks every resource it
/// yields as the xDS path would; every problem is reported, one per line.
pub fn parse(text: &str, node: &convert::NodeContext) -> Result<LocalResources, String> {
    // An empty file is an empty config, as for ztunnel.
    let config: LocalConfig = if text.trim().is_empty() {
        LocalConfig {
            workloads: Vec::new(),
            policies: Vec::new(),
            services: Vec::new(),
        }
    } else {
        serde_yaml::from_str(text).map_err(|e| e.to_string())?
    };
    let mut errors = Vec::new();
    let mut out = LocalResources::default();
    for (index, w) in config.workloads.into_iter().enumerate() {
        let at = format!("workloads[{index}] ({})", label(&w.uid, &w.name));
        match workload(w) {
            Ok((name, address)) => insert(&mut out.addresses, name, address, &at, &mut errors),
            Err(error) => errors.push(format!("{at}: {error}")),
        }
    }
    for (index, s) in config.services.into_iter().enumerate() {
        let at = format!("services[{index}] ({}/{})", s.namespace, s.hostname);
        match service(s) {
            Ok((name, address)) => insert(&mut out.addresses, name, address, &at, &mut errors),
            Err(error) => errors.push(format!("{at}: {error}")),
        }
    }
    for (index, p) in config.policies.into_iter().enumerate() {
        let at = format!("policies[{index}] ({}/{})", p.namespace, p.name);
        match policy(p) {
            Ok((name, authorization)) => insert(
                &mut out.authorizations,
                name,
                authorization,
                &at,
                &mut errors,
            ),
            Err(error) => errors.push(format!("{at}: {error}")),
        }
    }
    // The same checks as a control plane's resources get.
    for (name, address) in &out.addresses {
        if let Err(error) = convert::address(&address.encode_to_vec(), node) {
            errors.push(format!("{name}: {error}"));
        }
    }
    for (name, authorization) in &out.authorizations {
        if let Err(error) = convert::authorization(&authorization.encode_to_vec()) {
            errors.push(format!("{name}: {error}"));
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors.join("\n"))
    }
}

fn label<'a>(uid: &'a str, name: &'a str) -> &'a str {
    if uid.is_empty() { name } else { uid }
}

fn insert<T>(
    map: &mut BTreeMap<String, T>,
    name: String,
    value: T,
    at: &str,
    errors: &mut Vec<String>,
) {
    match map.entry(name) {
        std::collections::btree_map::Entry::Occupied(entry) => {
            errors.push(format!("{at}: {:?} is listed twice", entry.key()));
        }
        std::collections::btree_map::Entry::Vacant(entry) => {
            entry.insert(value);
        }
    }
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip.to_canonical() {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    }
}

/// `network/ip` (the network may be empty).
fn network_address(text: &str) -> Option<workload::NetworkAddress> {
    let (network, ip) = text.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    Some(workload::NetworkAddress {
        network: network.to_string(),
        address: octets(ip),
    })
}

fn gateway(gateway: Gateway) -> Result<workload::GatewayAddress, String> {
    use workload::gateway_address::Destination;
    let destination = match network_address(&gateway.destination) {
        Some(address) => Destination::Address(address),
        None => match gateway.destination.split_once('/') {
            Some((namespace, hostname)) => Destination::Hostname(workload::NamespacedHostname {
                namespace: namespace.to_string(),
                hostname: hostname.to_string(),
            }),
            None => {
                return Err(format!(
                    "destination {:?}: write network/ip or namespace/hostname",
                    gateway.destination
                ));
            }
        },
    };
    Ok(workload::GatewayAddress {
        destination: Some(destination),
        hbone_mtls_port: u32::from(gateway.hbone_mtls_port),
    })
}

fn port_list(ports: &BTreeMap<u16, u16>) -> Vec<workload::Port> {
    ports
        .iter()
        .map(|(service, target)| workload::Port {
            service_port: u32::from(*service),
            target_port: u32::from(*target),
            app_protocol: workload::AppProtocol::Unknown as i32,
        })
        .collect()
}

fn workload(w: LocalWorkload) -> Result<(String, workload::Address), String> {
    let uid = if w.uid.is_empty() {
        // ztunnel keys workloads by uid and lets those without one replace
        // each other; here each gets its own.
        if w.name.is_empty() {
            return Err("give it a uid or a name".into());
        }
        format!("local//{}/{}", w.namespace, w.name)
    } else {
        w.uid
    };
    let mut services = std::collections::HashMap::new();
    for (key, ports) in &w.services {
        if !key.contains('/') {
            return Err(format!("service {key:?}: write namespace/hostname"));
        }
        services.insert(
            key.clone(),
            workload::PortList {
                ports: port_list(ports),
            },
        );
    }
    let workload_type = match w.workload_type.as_str() {
        "" | "deployment" => workload::WorkloadType::Deployment,
        "cronjob" => workload::WorkloadType::Cronjob,
        "pod" => workload::WorkloadType::Pod,
        "job" => workload::WorkloadType::Job,
        other => {
            return Err(format!(
                "workloadType {other:?}: one of deployment, cronjob, pod, job"
            ));
        }
    };
    let workload = workload::Workload {
        uid: uid.clone(),
        name: w.name,
        namespace: w.namespace,
        addresses: w.workload_ips.into_iter().map(octets).collect(),
        hostname: w.hostname,
        network: w.network,
        tunnel_protocol: match w.protocol {
            Protocol::TCP => workload::TunnelProtocol::None,
            Protocol::HBONE => workload::TunnelProtocol::Hbone,
        } as i32,
        trust_domain: w.trust_domain,
        service_account: w.service_account,
        waypoint: w
            .waypoint
            .map(gateway)
            .transpose()
            .map_err(|e| format!("waypoint: {e}"))?,
        network_gateway: w
            .network_gateway
            .map(gateway)
            .transpose()
            .map_err(|e| format!("networkGateway: {e}"))?,
        node: w.node,
        canonical_name: w.canonical_name,
        canonical_revision: w.canonical_revision,
        workload_type: workload_type as i32,
        workload_name: w.workload_name,
        native_tunnel: w.native_tunnel,
        application_tunnel: w.application_tunnel.map(|t| workload::ApplicationTunnel {
            protocol: match t.protocol {
                TunnelProtocol::NONE => workload::application_tunnel::Protocol::None,
                TunnelProtocol::PROXY => workload::application_tunnel::Protocol::Proxy,
            } as i32,
            port: t.port.map_or(0, u32::from),
        }),
        services,
        authorization_policies: w.authorization_policies,
        status: match w.status {
            Health::Healthy => workload::WorkloadStatus::Healthy,
            Health::Unhealthy => workload::WorkloadStatus::Unhealthy,
        } as i32,
        cluster_id: w.cluster_id,
        locality: w.locality.map(|l| workload::Locality {
            region: l.region,
            zone: l.zone,
            subzone: l.subzone,
        }),
        network_mode: match w.network_mode {
            NetworkMode::Standard => workload::NetworkMode::Standard,
            NetworkMode::HostNetwork => workload::NetworkMode::HostNetwork,
        } as i32,
        extensions: Vec::new(),
        capacity: Some(w.capacity),
    };
    Ok((
        uid,
        workload::Address {
            r#type: Some(workload::address::Type::Workload(workload)),
        },
    ))
}

fn service(s: LocalService) -> Result<(String, workload::Address), String> {
    if !s.endpoints.is_empty() {
        return Err(
            "endpoints: list each workload's services under the workload (`services:`) instead"
                .into(),
        );
    }
    let addresses = s
        .vips
        .iter()
        .map(|vip| network_address(vip).ok_or_else(|| format!("vip {vip:?}: write network/ip")))
        .collect::<Result<Vec<_>, _>>()?;
    let load_balancing = s.load_balancer.map(|lb| {
        use workload::load_balancing::{HealthPolicy as H, Mode as M, Scope as S};
        workload::LoadBalancing {
            routing_preference: lb
                .routing_preferences
                .iter()
                .map(|scope| {
                    (match scope {
                        Scope::Region => S::Region,
                        Scope::Zone => S::Zone,
                        Scope::Subzone => S::Subzone,
                        Scope::Node => S::Node,
                        Scope::Cluster => S::Cluster,
                        Scope::Network => S::Network,
                    }) as i32
                })
                .collect(),
            mode: (match lb.mode {
                LoadBalancerMode::Standard => M::UnspecifiedMode,
                LoadBalancerMode::Strict => M::Strict,
                LoadBalancerMode::Failover => M::Failover,
                LoadBalancerMode::Passthrough => M::Passthrough,
            }) as i32,
            health_policy: (match lb.health_policy {
                HealthPolicy::OnlyHealthy => H::OnlyHealthy,
                HealthPolicy::AllowAll => H::AllowAll,
            }) as i32,
        }
    });
    let name = format!("{}/{}", s.namespace, s.hostname);
    let service = workload::Service {
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        addresses,
        ports: port_list(&s.ports),
        subject_alt_names: s.subject_alt_names,
        waypoint: s
            .waypoint
            .map(gateway)
            .transpose()
            .map_err(|e| format!("waypoint: {e}"))?,
        load_balancing,
        ip_families: (match s.ip_families {
            None => workload::IpFamilies::Automatic,
            Some(IpFamilies::IPv4) => workload::IpFamilies::Ipv4Only,
            Some(IpFamilies::IPv6) => workload::IpFamilies::Ipv6Only,
            Some(IpFamilies::Dual) => workload::IpFamilies::Dual,
        }) as i32,
        extensions: Vec::new(),
        ingress_use_waypoint: false,
    };
    Ok((
        name,
        workload::Address {
            r#type: Some(workload::address::Type::Service(service)),
        },
    ))
}

fn string_matches(matches: Vec<StringMatch>) -> Vec<security::StringMatch> {
    use security::string_match::MatchType;
    matches
        .into_iter()
        .map(|m| security::StringMatch {
            match_type: Some(match m {
                StringMatch::Exact(text) => MatchType::Exact(text),
                StringMatch::Prefix(text) => MatchType::Prefix(text),
                StringMatch::Suffix(text) => MatchType::Suffix(text),
                StringMatch::Presence(_) => MatchType::Presence(()),
            }),
        })
        .collect()
}

fn service_accounts(accounts: Vec<ServiceAccount>) -> Vec<security::ServiceAccountMatch> {
    accounts
        .into_iter()
        .map(|a| security::ServiceAccountMatch {
            namespace: a.namespace,
            service_account: a.service_account,
        })
        .collect()
}

/// A CIDR as ztunnel writes it (`10.0.0.0/8`; the length is required).
fn cidrs(texts: Vec<String>, field: &str) -> Result<Vec<security::Address>, String> {
    texts
        .into_iter()
        .map(|text| {
            let parsed = text.split_once('/').and_then(|(ip, len)| {
                let ip: IpAddr = ip.parse().ok()?;
                let len: u32 = len.parse().ok()?;
                let max = if ip.to_canonical().is_ipv4() { 32 } else { 128 };
                (len <= max).then(|| security::Address {
                    address: octets(ip),
                    length: len,
                })
            });
            parsed.ok_or_else(|| format!("{field}: {text:?} is not an address/length"))
        })
        .collect()
}

fn ports(values: Vec<u16>) -> Vec<u32> {
    values.into_iter().map(u32::from).collect()
}

fn policy(p: LocalPolicy) -> Result<(String, security::Authorization), String> {
    let mut groups = Vec::new();
    for rule in p.rules {
        let mut clauses = Vec::new();
        for clause in rule {
            let mut matches = Vec::new();
            for m in clause {
                matches.push(security::Match {
                    namespaces: string_matches(m.namespaces),
                    not_namespaces: string_matches(m.not_namespaces),
                    principals: string_matches(m.principals),
                    not_principals: string_matches(m.not_principals),
                    source_ips: cidrs(m.source_ips, "sourceIps")?,
                    not_source_ips: cidrs(m.not_source_ips, "notSourceIps")?,
                    destination_ips: cidrs(m.destination_ips, "destinationIps")?,
                    not_destination_ips: cidrs(m.not_destination_ips, "notDestinationIps")?,
                    destination_ports: ports(m.destination_ports),
                    not_destination_ports: ports(m.not_destination_ports),
                    service_accounts: service_accounts(m.service_accounts),
                    not_service_accounts: service_accounts(m.not_service_accounts),
                });
            }
            clauses.push(security::Rules { matches });
        }
        groups.push(security::Group { rules: clauses });
    }
    let name = format!("{}/{}", p.namespace, p.name);
    Ok((
        name,
        security::Authorization {
            name: p.name,
            namespace: p.namespace,
            scope: (match p.scope {
                PolicyScope::Global => security::Scope::Global,
                PolicyScope::Namespace => security::Scope::Namespace,
                PolicyScope::WorkloadSelector => security::Scope::WorkloadSelector,
            }) as i32,
            action: (match p.action {
                PolicyAction::Allow => security::Action::Allow,
                PolicyAction::Deny => security::Action::Deny,
            }) as i32,
            groups,
            dry_run: p.dry_run,
        },
    ))
}

/// Applies `resources` to `state` as one response of each type, replacing
/// whatever an earlier load of the file put there.
pub fn apply(state: &super::XdsState, resources: &LocalResources, version: &str) {
    for type_url in [super::ADDRESS_TYPE, super::AUTHORIZATION_TYPE] {
        let held = state.versions(type_url).into_keys();
        let outcome = state.apply(&resources.response(type_url, version, held));
        state
            .stats
            .record_response(type_url, outcome.errors.is_empty());
        // parse() ran the same conversion: nothing is left to refuse.
        for error in outcome.errors {
            tracing::error!(%error, "local xds resource not applied");
        }
    }
}

/// Follows the file: content that is whole (replaced at once, or settled)
/// and valid replaces the last; anything else is reported and counted, and
/// the last good content keeps serving.
pub async fn follow(
    path: std::path::PathBuf,
    node: convert::NodeContext,
    state: std::sync::Arc<super::XdsState>,
    updates: tokio::sync::mpsc::Sender<super::XdsUpdate>,
    interval: std::time::Duration,
) {
    let mut file = crate::config_watch::ConfigFile::new(&path, crate::config_watch::SETTLE);
    let mut ticker = tokio::time::interval(interval);
    let mut loads = 1u64;
    loop {
        ticker.tick().await;
        let Some(content) = file.poll(std::time::Instant::now()) else {
            continue;
        };
        let parsed = content
            .map_err(|error| format!("cannot read it: {error}"))
            .and_then(|text| parse(&text, &node));
        match parsed {
            Ok(resources) => {
                loads += 1;
                apply(&state, &resources, &format!("local-{loads}"));
                tracing::info!(
                    path = %path.display(),
                    workloads = resources.workloads(),
                    services = resources.services(),
                    policies = resources.authorizations.len(),
                    "local xds file reloaded"
                );
                for type_url in [super::ADDRESS_TYPE, super::AUTHORIZATION_TYPE] {
                    let _ = updates
                        .send(super::XdsUpdate {
                            type_url: type_url.to_string(),
                        })
                        .await;
                }
            }
            Err(error) => {
                for type_url in [super::ADDRESS_TYPE, super::AUTHORIZATION_TYPE] {
                    state.stats.record_response(type_url, false);
                }
                tracing::error!(
                    path = %path.display(),
                    %error,
                    "local xds file refused; the last good one stays"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(trust_domain: &str) -> convert::NodeContext {
        convert::NodeContext::new(trust_domain, "")
    }

    /// Written in ztunnel's format the way its serializer and its example
    /// write it: every kind of entry, with the shapes Weir must read.
    const FILE: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/local
  name: local
  namespace: default
  serviceAccount: local
  workloadIps: ["127.0.0.1", "::1"]
  protocol: HBONE
  node: local
  network: ""
  locality: {region: r1, zone: z1, subzone: s1}
  services:
    "default/example.com":
      80: 8080
- uid: cluster1//v1/Pod/default/local-tcp
  name: local-tcp
  namespace: default
  workloadIps: ["127.0.0.2"]
  protocol: TCP
  status: Unhealthy
  waypoint: {destination: "default/waypoint.default.svc.cluster.local", hboneMtlsPort: 15008}
  services: {}
policies:
- name: only-local
  namespace: default
  scope: Namespace
  action: Allow
  dryRun: true
  rules:
  - - - principals: [!Prefix "cluster.local/ns/default/"]
        sourceIps: ["127.0.0.0/8", "::1/128"]
      - namespaces: [!Exact default]
    - - notDestinationPorts: [9999]
  - - - serviceAccounts: [{namespace: default, serviceAccount: local}]
        notPrincipals:
        - !Presence
services:
- name: local
  namespace: default
  hostname: example.com
  vips: ["/127.10.0.1", "remote/127.10.0.2"]
  ports: {80: 8080}
  subjectAltNames: ["spiffe://cluster.local/ns/default/sa/local"]
  loadBalancer: {routingPreferences: [Network, Zone], mode: Failover, healthPolicy: OnlyHealthy}
  ipFamilies: Dual
  canonical: true
"#;

    fn workload_of<'a>(resources: &'a LocalResources, name: &str) -> &'a workload::Workload {
        match resources
            .addresses
            .get(name)
            .and_then(|a| a.r#type.as_ref())
        {
            Some(workload::address::Type::Workload(w)) => w,
            _ => panic!("no workload {name}"),
        }
    }

    #[test]
    fn ztunnel_format_becomes_the_resources_istiod_would_send() {
        let resources = parse(FILE, &ctx("cluster.local")).expect("parses");
        assert_eq!(
            (resources.workloads(), resources.services()),
            (2, 1),
            "{:?}",
            resources.addresses.keys()
        );
        let local = workload_of(&resources, "cluster1//v1/Pod/default/local");
        assert_eq!(
            local.tunnel_protocol,
            workload::TunnelProtocol::Hbone as i32
        );
        assert_eq!(
            local.addresses,
            vec![vec![127, 0, 0, 1], {
                let mut v6 = vec![0; 15];
                v6.push(1);
                v6
            }]
        );
        assert_eq!(local.services["default/example.com"].ports.len(), 1);
        assert_eq!(
            local.services["default/example.com"].ports[0].target_port,
            8080
        );
        assert_eq!(
            local.locality.as_ref().map(|l| l.subzone.as_str()),
            Some("s1")
        );
        assert_eq!(local.capacity, Some(1));
        let tcp = workload_of(&resources, "cluster1//v1/Pod/default/local-tcp");
        assert_eq!(tcp.tunnel_protocol, workload::TunnelProtocol::None as i32);
        assert_eq!(tcp.status, workload::WorkloadStatus::Unhealthy as i32);
        assert!(matches!(
            tcp.waypoint.as_ref().and_then(|w| w.destination.as_ref()),
            Some(workload::gateway_address::Destination::Hostname(h))
                if h.hostname == "waypoint.default.svc.cluster.local"
        ));
        let Some(workload::address::Type::Service(service)) = resources
            .addresses
            .get("default/example.com")
            .and_then(|a| a.r#type.clone())
        else {
            panic!("no service");
        };
        assert_eq!(service.addresses[1].network, "remote");
        assert_eq!(service.addresses[1].address, vec![127, 10, 0, 2]);
        let lb = service.load_balancing.expect("load balancing");
        assert_eq!(lb.mode, workload::load_balancing::Mode::Failover as i32);
        assert_eq!(lb.routing_preference.len(), 2);
        let policy = &resources.authorizations["default/only-local"];
        assert!(policy.dry_run);
        // Rules (any) → clauses (all) → matches (any).
        assert_eq!(policy.groups.len(), 2);
        assert_eq!(policy.groups[0].rules.len(), 2);
        assert_eq!(policy.groups[0].rules[0].matches.len(), 2);
        let first = &policy.groups[0].rules[0].matches[0];
        assert_eq!(first.source_ips[1].length, 128);
        assert_eq!(
            policy.groups[1].rules[0].matches[0].service_accounts.len(),
            1
        );
        assert!(matches!(
            policy.groups[1].rules[0].matches[0].not_principals[0].match_type,
            Some(security::string_match::MatchType::Presence(()))
        ));
    }

    #[test]
    fn what_ztunnel_leaves_empty_takes_istiods_defaults() {
        let text =
            "workloads:\n- {name: w, namespace: ns, workloadIps: [10.0.0.1], services: {}}\n";
        let resources = parse(text, &ctx("example.org")).expect("parses");
        // No uid: one of its own. No trust domain or account: the node's
        // trust domain and `default`, as the xDS path gives them.
        let w = workload_of(&resources, "local//ns/w");
        let bytes = workload::Address {
            r#type: Some(workload::address::Type::Workload(w.clone())),
        }
        .encode_to_vec();
        let Ok(convert::AddressResource::Workload(converted)) =
            convert::address(&bytes, &ctx("example.org"))
        else {
            panic!("converts");
        };
        assert_eq!(
            converted.identity.to_string(),
            "spiffe://example.org/ns/ns/sa/default"
        );
        assert!(parse("", &ctx("cluster.local")).is_ok_and(|r| r.addresses.is_empty()));
    }

    #[test]
    fn what_weir_cannot_read_exactly_is_refused_with_where_it_is() {
        let workload = |extra: &str| {
            format!(
                "workloads:\n- uid: u\n  namespace: ns\n  workloadIps: [10.0.0.1]\n  services: {{}}\n{extra}"
            )
        };
        let policy = |matches: &str| {
            format!(
                "policies:\n- {{name: p, namespace: ns, scope: Global, action: Deny, rules: [[[{matches}]]]}}\n"
            )
        };
        for (text, expected) in [
            // ztunnel ignores an unknown key in a match: it would widen.
            (policy("{sourceIp: [\"10.0.0.1/32\"]}"), "unknown field `sourceIp`"),
            (policy("{namespaces: [{Exact: ns}]}"), "namespaces"),
            (policy("{sourceIps: [\"10.0.0.1\"]}"), "not an address/length"),
            // The conversion a control plane's policy gets.
            (
                policy("{principals: [!Exact \"cluster.local/ns/*\"]}"),
                "which Weir would read as a wildcard",
            ),
            (
                "services:\n- {name: s, namespace: ns, hostname: h, vips: [10.96.0.1], ports: {}}\n"
                    .to_string(),
                "write network/ip",
            ),
            (
                "services:\n- {name: s, namespace: ns, hostname: h, vips: [], ports: {}, endpoints: {u: {}}}\n"
                    .to_string(),
                "endpoints",
            ),
            (
                "workloads:\n- {uid: u, namespace: ns, workloadIps: [10.0.0.1]}\n".to_string(),
                "missing field `services`",
            ),
            (
                format!("{}{}", workload(""), workload("").replace("workloads:\n", "")),
                "listed twice",
            ),
            (
                workload("  waypoint: {destination: waypoint, hboneMtlsPort: 15008}\n"),
                "namespace/hostname",
            ),
            (workload("  workloadType: daemonset\n"), "workloadType"),
            (workload("  protocol: hbone\n"), "protocol"),
            ("pods: []\n".to_string(), "unknown field `pods`"),
        ] {
            match parse(&text, &ctx("cluster.local")) {
                Ok(_) => panic!("accepted:\n{text}"),
                Err(error) => assert!(error.contains(expected), "{expected:?} not in {error:?}\n{text}"),
            }
        }
    }

    #[test]
    fn a_reload_removes_what_the_file_no_longer_holds() {
        let resources = parse(
            "workloads:\n- {uid: a, namespace: ns, workloadIps: [10.0.0.1], services: {}}\n",
            &ctx("cluster.local"),
        )
        .expect("parses");
        let response = resources.response(
            crate::xds::ADDRESS_TYPE,
            "local-2",
            ["a".to_string(), "b".to_string()],
        );
        assert_eq!(response.resources.len(), 1);
        assert_eq!(response.removed_resources, vec!["b".to_string()]);
    }
}
