//! From wire resources to the agent's types, validating as it goes: a
//! resource either converts whole or is rejected with the reason.
use std::net::IpAddr;

use prost::Message as _;

use super::proto::istio::{security, workload};
use crate::{
    security::authorization::{Action, Group, IpBlock, Match, Policy, Rule, Scope},
    security::identity::Identity,
    state::{
        BalanceMode, BalanceScope, LoadBalancing, Locality, Service, Source, Tunnel, Waypoint,
        Workload,
    },
};

/// A waypoint: the waypoint service by name, or one address.
fn gateway(address: Option<&workload::GatewayAddress>) -> Result<Option<Waypoint>, String> {
    use workload::gateway_address::Destination;
    let Some(address) = address else {
        return Ok(None);
    };
    let port = port(address.hbone_mtls_port, "hbone_mtls_port")?;
    match &address.destination {
        Some(Destination::Hostname(host)) => {
            if host.namespace.is_empty() || host.hostname.is_empty() {
                return Err("a hostname without namespace or name".into());
            }
            Ok(Some(Waypoint::Service {
                namespace: host.namespace.clone(),
                hostname: host.hostname.clone(),
                port,
            }))
        }
        Some(Destination::Address(network)) => Ok(Some(Waypoint::Address(
            std::net::SocketAddr::new(ip(&network.address)?, port),
        ))),
        None => Err("neither a hostname nor an address".into()),
    }
}

/// istiod's `LoadBalancing`, as ztunnel reads it: none is `Standard`.
fn load_balancing(lb: Option<&workload::LoadBalancing>) -> Result<LoadBalancing, String> {
    use workload::load_balancing::{HealthPolicy, Mode, Scope as S};
    let Some(lb) = lb else {
        return Ok(LoadBalancing::default());
    };
    let mode = match Mode::try_from(lb.mode) {
        Ok(Mode::UnspecifiedMode) => BalanceMode::Standard,
        Ok(Mode::Strict) => BalanceMode::Strict,
        Ok(Mode::Failover) => BalanceMode::Failover,
        Ok(Mode::Passthrough) => BalanceMode::Passthrough,
        Err(_) => return Err(format!("unknown mode {}", lb.mode)),
    };
    let scopes = lb
        .routing_preference
        .iter()
        .map(|scope| match S::try_from(*scope) {
            Ok(S::Region) => Ok(BalanceScope::Region),
            Ok(S::Zone) => Ok(BalanceScope::Zone),
            Ok(S::Subzone) => Ok(BalanceScope::Subzone),
            Ok(S::Node) => Ok(BalanceScope::Node),
            Ok(S::Cluster) => Ok(BalanceScope::Cluster),
            Ok(S::Network) => Ok(BalanceScope::Network),
            Ok(S::UnspecifiedScope) | Err(_) => Err(format!("unknown routing_preference {scope}")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let allow_unhealthy = match HealthPolicy::try_from(lb.health_policy) {
        Ok(HealthPolicy::OnlyHealthy) => false,
        Ok(HealthPolicy::AllowAll) => true,
        Err(_) => return Err(format!("unknown health_policy {}", lb.health_policy)),
    };
    Ok(LoadBalancing {
        mode,
        scopes,
        allow_unhealthy,
    })
}

/// An Address resource: a workload or a service, as the store holds them.
pub enum AddressResource {
    Workload(Box<Workload>),
    Service(Box<Service>),
}

fn ip(bytes: &[u8]) -> Result<IpAddr, String> {
    match bytes.len() {
        4 => Ok(IpAddr::from(
            <[u8; 4]>::try_from(bytes).map_err(|e| e.to_string())?,
        )),
        16 => Ok(IpAddr::from(
            <[u8; 16]>::try_from(bytes).map_err(|e| e.to_string())?,
        )),
        n => Err(format!("an address of {n} bytes (want 4 or 16)")),
    }
}

fn port(value: u32, what: &str) -> Result<u16, String> {
    u16::try_from(value)
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| format!("{what} {value} is not a port"))
}

/// (service port, target port) pairs, each a valid port.
fn port_pairs(ports: &[workload::Port]) -> Result<Vec<(u16, u16)>, String> {
    ports
        .iter()
        .map(|p| {
            Ok((
                port(p.service_port, "service_port")?,
                port(p.target_port, "target_port")?,
            ))
        })
        .collect()
}

/// What converting a workload needs to know of this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// For workloads that name none (istiod leaves the default out).
    pub trust_domain: String,
    /// This node's network: addresses on another are not reachable from
    /// here (ztunnel keys addresses by network).
    pub network: String,
}

impl NodeContext {
    pub fn new(trust_domain: &str, network: &str) -> NodeContext {
        NodeContext {
            trust_domain: trust_domain.to_string(),
            network: network.to_string(),
        }
    }

    pub fn of(config: &crate::config::Config) -> NodeContext {
        NodeContext::new(&config.trust_domain, &config.network)
    }
}

pub fn address(bytes: &[u8], node: &NodeContext) -> Result<AddressResource, String> {
    super::wire::check(bytes, &super::wire::WORKLOAD_ADDRESS)?;
    let decoded =
        workload::Address::decode(bytes).map_err(|e| format!("undecodable Address: {e}"))?;
    match decoded.r#type {
        Some(workload::address::Type::Workload(w)) => {
            if w.uid.is_empty() {
                return Err("workload without uid".into());
            }
            if w.namespace.is_empty() {
                return Err(format!("workload {}: no namespace", w.uid));
            }
            let refused = |why: &str| Err(format!("workload {}: {why}", w.uid));
            // What Weir cannot do for a workload is refused, never done
            // another way (dialling a gateway's workload directly, or a
            // PROXY-protocol app without the header).
            if w.network_gateway.is_some() {
                return refused(
                    "network_gateway: Weir does not reach other networks through their \
                     gateways (multi-network) and refuses rather than dial the workload directly",
                );
            }
            if let Some(tunnel) = &w.application_tunnel {
                if tunnel.protocol != workload::application_tunnel::Protocol::None as i32 {
                    return refused(
                        "application_tunnel: Weir speaks no PROXY protocol to applications",
                    );
                }
                if tunnel.port != 0 {
                    return refused(
                        "application_tunnel.port: Weir delivers to the port the client asked for",
                    );
                }
            }
            if !w.extensions.is_empty() {
                return refused("extensions: Weir runs none");
            }
            let ips = w
                .addresses
                .iter()
                .map(|bytes| ip(bytes))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("workload {}: {e}", w.uid))?;
            // On another network, its addresses are not this network's
            // (ztunnel keys them by network): it is known, by uid, but
            // never reached or found by address from here.
            let ips = if w.network == node.network {
                ips
            } else {
                Vec::new()
            };
            let trust_domain = if w.trust_domain.is_empty() {
                &node.trust_domain
            } else {
                &w.trust_domain
            };
            let service_account = if w.service_account.is_empty() {
                "default"
            } else {
                &w.service_account
            };
            let mut services = Vec::new();
            for (key, list) in &w.services {
                let ports = port_pairs(&list.ports)
                    .map_err(|e| format!("workload {} service {key}: {e}", w.uid))?;
                services.push((key.clone(), ports));
            }
            services.sort();
            let tunnel = match workload::TunnelProtocol::try_from(w.tunnel_protocol) {
                Ok(workload::TunnelProtocol::Hbone) => Tunnel::Hbone,
                Ok(workload::TunnelProtocol::None) => Tunnel::None,
                Err(_) => {
                    return Err(format!(
                        "workload {}: unknown tunnel_protocol {}",
                        w.uid, w.tunnel_protocol
                    ));
                }
            };
            let waypoint = gateway(w.waypoint.as_ref())
                .map_err(|e| format!("workload {}: waypoint: {e}", w.uid))?;
            let locality = w
                .locality
                .as_ref()
                .map(|l| Locality {
                    region: l.region.clone(),
                    zone: l.zone.clone(),
                    subzone: l.subzone.clone(),
                })
                .unwrap_or_default();
            let labels = [
                ("app", &w.canonical_name),
                ("version", &w.canonical_revision),
            ]
            .into_iter()
            .filter(|(_, value)| !value.is_empty())
            .map(|(key, value)| (key.to_string(), value.clone()))
            .collect();
            Ok(AddressResource::Workload(Box::new(Workload {
                source: Source::ControlPlane,
                labels,
                services,
                network: w.network.clone(),
                // istiod's default, as ztunnel fills it in.
                cluster_id: if w.cluster_id.is_empty() {
                    "Kubernetes".into()
                } else {
                    w.cluster_id.clone()
                },
                locality,
                identity: Identity::new(trust_domain, &w.namespace, service_account),
                uid: w.uid,
                workload_type: match workload::WorkloadType::try_from(w.workload_type) {
                    Ok(workload::WorkloadType::Cronjob) => "cronjob",
                    Ok(workload::WorkloadType::Pod) => "pod",
                    Ok(workload::WorkloadType::Job) => "job",
                    // istiod's default; an unknown kind is still named.
                    Ok(workload::WorkloadType::Deployment) | Err(_) => "deployment",
                },
                workload_name: if w.workload_name.is_empty() {
                    w.name.clone()
                } else {
                    w.workload_name
                },
                name: w.name,
                namespace: w.namespace,
                ips,
                hostname: w.hostname,
                node: w.node,
                authorization_policies: w.authorization_policies,
                healthy: w.status == workload::WorkloadStatus::Healthy as i32,
                tunnel,
                waypoint,
                host_network: w.network_mode == workload::NetworkMode::HostNetwork as i32,
                capacity: w.capacity.unwrap_or(1),
            })))
        }
        Some(workload::address::Type::Service(s)) => {
            if s.hostname.is_empty() || s.namespace.is_empty() {
                return Err("service without hostname or namespace".into());
            }
            if !s.extensions.is_empty() {
                return Err(format!(
                    "service {}/{}: extensions: Weir runs none",
                    s.namespace, s.hostname
                ));
            }
            // A VIP of another network is that network's (`remote/10.96.0.1`).
            let vips = s
                .addresses
                .iter()
                .map(|address| Ok((address.network == node.network, ip(&address.address)?)))
                .filter(|vip| !matches!(vip, Ok((false, _))))
                .map(|vip| vip.map(|(_, ip)| ip))
                .collect::<Result<Vec<_>, String>>()
                .map_err(|e| format!("service {}/{}: {e}", s.namespace, s.hostname))?;
            let ports = port_pairs(&s.ports)
                .map_err(|e| format!("service {}/{}: {e}", s.namespace, s.hostname))?;
            let waypoint = gateway(s.waypoint.as_ref())
                .map_err(|e| format!("service {}/{}: waypoint: {e}", s.namespace, s.hostname))?;
            let load_balancing = load_balancing(s.load_balancing.as_ref()).map_err(|e| {
                format!(
                    "service {}/{}: load_balancing: {e}",
                    s.namespace, s.hostname
                )
            })?;
            Ok(AddressResource::Service(Box::new(Service {
                source: Source::ControlPlane,
                app_protocols: Vec::new(),
                waypoint,
                load_balancing,
                namespace: s.namespace,
                hostname: s.hostname,
                vips,
                ports,
            })))
        }
        None => Err("Address with neither workload nor service".into()),
    }
}

/// Istio's string matches as the authorizer's patterns (`*` at either end
/// is a wildcard). A value that would read differently as a pattern, or a
/// match with no value, is refused: either would match more than istiod
/// meant.
fn strings(matches: &[security::StringMatch], field: &str) -> Result<Vec<String>, String> {
    use security::string_match::MatchType;
    matches
        .iter()
        .map(|m| {
            let literal = |text: &String| {
                if text.contains('*') {
                    Err(format!(
                        "{field}: {text:?} holds a `*`, which Weir would read as a wildcard"
                    ))
                } else {
                    Ok(text.clone())
                }
            };
            match m.match_type.as_ref() {
                Some(MatchType::Exact(text)) => literal(text),
                Some(MatchType::Prefix(text)) => Ok(format!("{}*", literal(text)?)),
                Some(MatchType::Suffix(text)) => Ok(format!("*{}", literal(text)?)),
                Some(MatchType::Presence(_)) => Ok("*".into()),
                None => Err(format!("{field}: a string match with no value")),
            }
        })
        .collect()
}

fn service_accounts(
    matches: &[security::ServiceAccountMatch],
    field: &str,
) -> Result<Vec<String>, String> {
    matches
        .iter()
        .map(|m| {
            let value = format!("{}/{}", m.namespace, m.service_account);
            crate::security::authorization::check_service_account(&value)
                .map_err(|e| format!("{field}: {e}"))?;
            Ok(value)
        })
        .collect()
}

fn blocks(addresses: &[security::Address]) -> Result<Vec<IpBlock>, String> {
    addresses
        .iter()
        .map(|address| {
            let ip = ip(&address.address)?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            // istiod writes a single address with its full length, so 0 is
            // `/0`: every address, as ztunnel reads it.
            let len = address.length;
            if len > max {
                return Err(format!("prefix length {len} for {ip}"));
            }
            Ok(IpBlock {
                address: ip,
                prefix_len: len as u8,
            })
        })
        .collect()
}

fn ports(values: &[u32]) -> Result<Vec<u16>, String> {
    values.iter().map(|value| port(*value, "port")).collect()
}

pub fn authorization(bytes: &[u8]) -> Result<Policy, String> {
    let decoded = security::Authorization::decode(bytes)
        .map_err(|e| format!("undecodable Authorization: {e}"))?;
    if decoded.name.is_empty() || decoded.namespace.is_empty() {
        return Err("Authorization without name or namespace".into());
    }
    let key = format!("{}/{}", decoded.namespace, decoded.name);
    super::wire::check(bytes, &super::wire::AUTHORIZATION)
        .map_err(|e| format!("policy {key}: {e}"))?;
    let scope = match security::Scope::try_from(decoded.scope) {
        Ok(security::Scope::Global) => Scope::Global,
        Ok(security::Scope::Namespace) => Scope::Namespace,
        Ok(security::Scope::WorkloadSelector) => Scope::WorkloadSelector,
        Err(_) => return Err(format!("policy {key}: unknown scope {}", decoded.scope)),
    };
    let action = match security::Action::try_from(decoded.action) {
        Ok(security::Action::Allow) => Action::Allow,
        Ok(security::Action::Deny) => Action::Deny,
        Err(_) => return Err(format!("policy {key}: unknown action {}", decoded.action)),
    };
    let at = |e: String| format!("policy {key}: {e}");
    let mut groups = Vec::new();
    for group in &decoded.groups {
        let mut rules = Vec::new();
        for rule in &group.rules {
            // As ztunnel reads them: a clause with no matches matches
            // everything, a match that sets nothing matches nothing.
            let mut matches = Vec::new();
            if rule.matches.is_empty() {
                matches.push(Match::default());
            }
            for m in &rule.matches {
                let converted = Match {
                    namespaces: strings(&m.namespaces, "namespaces").map_err(at)?,
                    not_namespaces: strings(&m.not_namespaces, "not_namespaces").map_err(at)?,
                    principals: strings(&m.principals, "principals").map_err(at)?,
                    not_principals: strings(&m.not_principals, "not_principals").map_err(at)?,
                    service_accounts: service_accounts(&m.service_accounts, "service_accounts")
                        .map_err(at)?,
                    not_service_accounts: service_accounts(
                        &m.not_service_accounts,
                        "not_service_accounts",
                    )
                    .map_err(at)?,
                    source_ips: blocks(&m.source_ips).map_err(at)?,
                    not_source_ips: blocks(&m.not_source_ips).map_err(at)?,
                    destination_ips: blocks(&m.destination_ips).map_err(at)?,
                    not_destination_ips: blocks(&m.not_destination_ips).map_err(at)?,
                    destination_ports: ports(&m.destination_ports).map_err(at)?,
                    not_destination_ports: ports(&m.not_destination_ports).map_err(at)?,
                    // Istio's workload API carries L4 matches only.
                    ..Default::default()
                };
                if converted != Match::default() {
                    matches.push(converted);
                }
            }
            rules.push(Rule { matches });
        }
        groups.push(Group { rules });
    }
    Ok(Policy {
        name: decoded.name,
        namespace: decoded.namespace,
        scope,
        action,
        groups,
        dry_run: decoded.dry_run,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::authorization::{ConnectionFacts, PolicyStore, Verdict};

    fn policy(action: security::Action, matches: Vec<security::Match>) -> security::Authorization {
        security::Authorization {
            name: "p".into(),
            namespace: "shop".into(),
            scope: security::Scope::Namespace as i32,
            action: action as i32,
            groups: vec![security::Group {
                rules: vec![security::Rules { matches }],
            }],
            ..Default::default()
        }
    }

    fn convert(policy: &security::Authorization) -> Result<Policy, String> {
        authorization(&policy.encode_to_vec())
    }

    fn verdict(store: &PolicyStore, identity: Option<&str>, source: &str) -> Verdict {
        let identity = identity.map(|id| id.parse::<Identity>().expect("identity"));
        store.evaluate(
            "shop",
            &[],
            &ConnectionFacts {
                source_identity: identity.as_ref(),
                source_ip: source.parse().expect("ip"),
                destination_ip: "10.0.0.9".parse().expect("ip"),
                destination_port: 80,
                request: None,
            },
        )
    }

    fn service_account(namespace: &str, name: &str) -> security::ServiceAccountMatch {
        security::ServiceAccountMatch {
            namespace: namespace.into(),
            service_account: name.into(),
        }
    }

    fn exact(text: &str) -> security::StringMatch {
        use security::string_match::MatchType;
        security::StringMatch {
            match_type: Some(MatchType::Exact(text.into())),
        }
    }

    fn cidr(ip: [u8; 4], length: u32) -> security::Address {
        security::Address {
            address: ip.to_vec(),
            length,
        }
    }

    fn rule(m: security::Match) -> security::Group {
        security::Group {
            rules: vec![security::Rules { matches: vec![m] }],
        }
    }

    /// What istiod's ambient translation writes (the facts of istio/istio
    /// pilot/pkg/serviceregistry/kube/controller/ambient/testdata): an
    /// AuthorizationPolicy using every L4 field becomes one group per
    /// rule, each match kind as istiod encodes it, destination IPs
    /// included; and a STRICT PeerAuthentication with one port DISABLEd
    /// becomes a DENY of (no principal AND not that port). Both convert,
    /// and decide as Istio means them.
    #[test]
    fn istiods_translations_convert_and_decide_as_istio_means_them() {
        use security::string_match::MatchType;
        let presence = security::StringMatch {
            match_type: Some(MatchType::Presence(())),
        };
        let allow_full = security::Authorization {
            name: "allow".into(),
            namespace: "shop".into(),
            scope: security::Scope::Namespace as i32,
            action: security::Action::Allow as i32,
            groups: vec![
                rule(security::Match {
                    principals: vec![
                        exact("principal"),
                        security::StringMatch {
                            match_type: Some(MatchType::Prefix("principal-prefix-".into())),
                        },
                        security::StringMatch {
                            match_type: Some(MatchType::Suffix("-suffix-principal".into())),
                        },
                        presence.clone(),
                    ],
                    not_principals: vec![exact("not-principal"), presence.clone()],
                    ..Default::default()
                }),
                rule(security::Match {
                    service_accounts: vec![service_account("ns", "sa")],
                    not_service_accounts: vec![service_account("ns", "sa-not")],
                    ..Default::default()
                }),
                rule(security::Match {
                    namespaces: vec![exact("ns"), presence.clone()],
                    not_namespaces: vec![exact("not-ns"), presence],
                    ..Default::default()
                }),
                rule(security::Match {
                    source_ips: vec![cidr([1, 2, 3, 4], 32), cidr([5, 6, 0, 0], 16)],
                    not_source_ips: vec![cidr([2, 2, 3, 4], 32), cidr([6, 6, 0, 0], 16)],
                    ..Default::default()
                }),
                rule(security::Match {
                    destination_ports: vec![80, 90],
                    not_destination_ports: vec![800, 900],
                    ..Default::default()
                }),
                rule(security::Match {
                    destination_ips: vec![cidr([10, 10, 10, 10], 32), cidr([192, 168, 10, 0], 24)],
                    not_destination_ips: vec![
                        cidr([90, 10, 10, 10], 32),
                        cidr([90, 168, 10, 0], 24),
                    ],
                    ..Default::default()
                }),
            ],
            dry_run: false,
        };
        let store = PolicyStore::new(&[convert(&allow_full).expect("istiod's ALLOW converts")]);
        let decide = |source: &str, destination: &str, port: u16| {
            store.evaluate(
                "shop",
                &[],
                &ConnectionFacts {
                    source_identity: None,
                    source_ip: source.parse().expect("ip"),
                    destination_ip: destination.parse().expect("ip"),
                    destination_port: port,
                    request: None,
                },
            )
        };
        assert_eq!(decide("9.9.9.9", "10.0.0.9", 80), Verdict::Allow, "port 80");
        assert_eq!(
            decide("5.6.7.8", "10.0.0.9", 81),
            Verdict::Allow,
            "5.6.0.0/16"
        );
        assert_eq!(
            decide("9.9.9.9", "192.168.10.7", 81),
            Verdict::Allow,
            "destination 192.168.10.0/24"
        );
        assert!(
            matches!(decide("9.9.9.9", "10.0.0.9", 81), Verdict::Deny { .. }),
            "nothing matched"
        );

        // PeerAuthentication STRICT, port 9090 DISABLE.
        let strict = security::Authorization {
            name: "converted_peer_authentication_strict-and-disable-mtls".into(),
            namespace: "shop".into(),
            scope: security::Scope::WorkloadSelector as i32,
            action: security::Action::Deny as i32,
            groups: vec![security::Group {
                rules: vec![
                    security::Rules {
                        matches: vec![security::Match {
                            not_principals: vec![security::StringMatch {
                                match_type: Some(MatchType::Presence(())),
                            }],
                            ..Default::default()
                        }],
                    },
                    security::Rules {
                        matches: vec![security::Match {
                            not_destination_ports: vec![9090],
                            ..Default::default()
                        }],
                    },
                ],
            }],
            dry_run: false,
        };
        let store = PolicyStore::new(&[convert(&strict).expect("istiod's DENY converts")]);
        let selected = ["shop/converted_peer_authentication_strict-and-disable-mtls".to_string()];
        let mesh = "spiffe://cluster.local/ns/shop/sa/web"
            .parse::<Identity>()
            .expect("identity");
        let decide = |identity: Option<&Identity>, port: u16| {
            store.evaluate(
                "shop",
                &selected,
                &ConnectionFacts {
                    source_identity: identity,
                    source_ip: "10.0.0.1".parse().expect("ip"),
                    destination_ip: "10.0.0.9".parse().expect("ip"),
                    destination_port: port,
                    request: None,
                },
            )
        };
        assert!(
            matches!(decide(None, 8080), Verdict::Deny { .. }),
            "plaintext"
        );
        assert_eq!(decide(None, 9090), Verdict::Allow, "the DISABLEd port");
        assert_eq!(decide(Some(&mesh), 8080), Verdict::Allow, "mTLS");
    }

    /// istiod writes `source.serviceAccounts` into `service_accounts`:
    /// only that account is allowed, in any trust domain.
    #[test]
    fn a_service_account_allow_admits_that_account_only() {
        let allow = policy(
            security::Action::Allow,
            vec![security::Match {
                service_accounts: vec![service_account("shop", "web")],
                ..Default::default()
            }],
        );
        let store = PolicyStore::new(&[convert(&allow).expect("converts")]);
        let web = Some("spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(verdict(&store, web, "10.0.0.1"), Verdict::Allow);
        let other_domain = Some("spiffe://example.org/ns/shop/sa/web");
        assert_eq!(verdict(&store, other_domain, "10.0.0.1"), Verdict::Allow);
        for denied in [
            Some("spiffe://cluster.local/ns/shop/sa/api"),
            Some("spiffe://cluster.local/ns/web/sa/shop"),
            None,
        ] {
            assert!(
                matches!(verdict(&store, denied, "10.0.0.1"), Verdict::Deny { .. }),
                "{denied:?}"
            );
        }

        let deny_others = policy(
            security::Action::Deny,
            vec![security::Match {
                not_service_accounts: vec![service_account("shop", "web")],
                ..Default::default()
            }],
        );
        let store = PolicyStore::new(&[convert(&deny_others).expect("converts")]);
        assert_eq!(verdict(&store, web, "10.0.0.1"), Verdict::Allow);
        assert!(matches!(
            verdict(
                &store,
                Some("spiffe://cluster.local/ns/shop/sa/api"),
                "10.0.0.1"
            ),
            Verdict::Deny { .. }
        ));
        assert!(matches!(
            verdict(&store, None, "10.0.0.1"),
            Verdict::Deny { .. }
        ));
    }

    #[test]
    fn what_would_widen_a_policy_is_refused_with_the_reason() {
        use security::string_match::MatchType;
        let cases = [
            (
                security::Match {
                    principals: vec![security::StringMatch { match_type: None }],
                    ..Default::default()
                },
                "principals: a string match with no value",
            ),
            (
                security::Match {
                    not_namespaces: vec![security::StringMatch {
                        match_type: Some(MatchType::Exact("*".into())),
                    }],
                    ..Default::default()
                },
                "holds a `*`",
            ),
            (
                security::Match {
                    service_accounts: vec![service_account("", "web")],
                    ..Default::default()
                },
                "is not <namespace>/<service-account>",
            ),
        ];
        for (m, reason) in cases {
            let error = convert(&policy(security::Action::Allow, vec![m])).expect_err("refused");
            assert!(error.starts_with("policy shop/p: "), "{error}");
            assert!(error.contains(reason), "{error}");
        }
    }

    /// As ztunnel reads them: a match that sets nothing matches nothing (an
    /// ALLOW of it admits no one), a clause with no matches matches all.
    #[test]
    fn empty_matches_and_empty_clauses_read_as_ztunnel_reads_them() {
        let empty_match = policy(security::Action::Allow, vec![security::Match::default()]);
        let store = PolicyStore::new(&[convert(&empty_match).expect("converts")]);
        assert!(matches!(
            verdict(
                &store,
                Some("spiffe://cluster.local/ns/shop/sa/web"),
                "10.0.0.1"
            ),
            Verdict::Deny { .. }
        ));
        let empty_clause = policy(security::Action::Allow, Vec::new());
        let store = PolicyStore::new(&[convert(&empty_clause).expect("converts")]);
        assert_eq!(verdict(&store, None, "10.0.0.1"), Verdict::Allow);
    }

    /// `ipBlocks: [0.0.0.0/0]` arrives with length 0 and means every
    /// address: a DENY of it denies everyone.
    #[test]
    fn a_zero_prefix_length_is_every_address() {
        let deny_all = policy(
            security::Action::Deny,
            vec![security::Match {
                source_ips: vec![security::Address {
                    address: vec![0, 0, 0, 0],
                    length: 0,
                }],
                ..Default::default()
            }],
        );
        let store = PolicyStore::new(&[convert(&deny_all).expect("converts")]);
        assert!(matches!(
            verdict(&store, None, "10.1.2.3"),
            Verdict::Deny { .. }
        ));
    }

    /// A dry-run policy is decoded, never enforced, and its would-be
    /// verdict is available to report.
    #[test]
    fn a_dry_run_deny_is_reported_not_enforced() {
        let mut deny = policy(
            security::Action::Deny,
            vec![security::Match {
                service_accounts: vec![service_account("shop", "web")],
                ..Default::default()
            }],
        );
        deny.dry_run = true;
        let converted = convert(&deny).expect("converts");
        assert!(converted.dry_run);
        let store = PolicyStore::new(&[converted]);
        let web = "spiffe://cluster.local/ns/shop/sa/web"
            .parse::<Identity>()
            .expect("id");
        let facts = ConnectionFacts {
            source_identity: Some(&web),
            source_ip: "10.0.0.1".parse().expect("ip"),
            destination_ip: "10.0.0.9".parse().expect("ip"),
            destination_port: 80,
            request: None,
        };
        assert_eq!(store.evaluate("shop", &[], &facts), Verdict::Allow);
        assert_eq!(
            store.evaluate_dry_run("shop", &[], &facts),
            Some(Verdict::Deny {
                policy: "shop/p".into()
            })
        );
        assert_eq!(store.evaluate_dry_run("other", &[], &facts), None);
    }

    fn workload_with_tunnel(tunnel_protocol: i32) -> Vec<u8> {
        workload::Address {
            r#type: Some(workload::address::Type::Workload(workload::Workload {
                uid: "Kubernetes//Pod/shop/web".into(),
                name: "web".into(),
                namespace: "shop".into(),
                addresses: vec![vec![10, 0, 0, 7]],
                tunnel_protocol,
                ..Default::default()
            })),
        }
        .encode_to_vec()
    }

    #[test]
    fn tunnel_protocol_decides_whether_a_workload_is_meshed() {
        let meshed = |bytes: Vec<u8>| match address(&bytes, &NodeContext::new("cluster.local", ""))
        {
            Ok(AddressResource::Workload(w)) => Ok(w.meshed()),
            Ok(AddressResource::Service(_)) => Err("a service".to_string()),
            Err(e) => Err(e),
        };
        assert_eq!(
            meshed(workload_with_tunnel(workload::TunnelProtocol::Hbone as i32)),
            Ok(true)
        );
        assert_eq!(
            meshed(workload_with_tunnel(workload::TunnelProtocol::None as i32)),
            Ok(false)
        );
        let error = meshed(workload_with_tunnel(7)).expect_err("unknown protocol");
        assert!(error.contains("unknown tunnel_protocol 7"), "{error}");
    }

    fn converted(w: workload::Workload, network: &str) -> Result<Box<Workload>, String> {
        let bytes = workload::Address {
            r#type: Some(workload::address::Type::Workload(w)),
        }
        .encode_to_vec();
        match address(&bytes, &NodeContext::new("cluster.local", network))? {
            AddressResource::Workload(w) => Ok(w),
            AddressResource::Service(_) => Err("a service".into()),
        }
    }

    fn web() -> workload::Workload {
        let Ok(workload::Address {
            r#type: Some(workload::address::Type::Workload(w)),
        }) = workload::Address::decode(&*workload_with_tunnel(1))
        else {
            unreachable!("own encoding")
        };
        w
    }

    /// istiod has sent a `bool canonical` and a `Timestamp
    /// creation_timestamp` as a Service's field 11: both decode.
    #[test]
    fn either_field_11_of_a_service_decodes() {
        let service = workload::Service {
            name: "web".into(),
            namespace: "shop".into(),
            hostname: "web.shop.svc.cluster.local".into(),
            ..Default::default()
        };
        for field_11 in [&[0x58u8, 0x01][..], &[0x5a, 0x02, 0x08, 0x01][..]] {
            let mut inner = service.encode_to_vec();
            inner.extend_from_slice(field_11);
            let mut bytes = vec![0x12, inner.len() as u8];
            bytes.extend(inner);
            assert!(
                matches!(
                    address(&bytes, &NodeContext::default()),
                    Ok(AddressResource::Service(_))
                ),
                "{field_11:?}"
            );
        }
    }

    /// What Weir cannot do for a workload is refused (NACKed with the
    /// reason), never done another way.
    #[test]
    fn what_weir_cannot_do_for_a_workload_is_refused() {
        let gateway = workload::GatewayAddress {
            destination: Some(workload::gateway_address::Destination::Address(
                workload::NetworkAddress {
                    network: "west".into(),
                    address: vec![192, 0, 2, 1],
                },
            )),
            hbone_mtls_port: 15008,
        };
        for (w, expected) in [
            (
                workload::Workload {
                    network_gateway: Some(gateway),
                    ..web()
                },
                "network_gateway",
            ),
            (
                workload::Workload {
                    application_tunnel: Some(workload::ApplicationTunnel {
                        protocol: workload::application_tunnel::Protocol::Proxy as i32,
                        port: 0,
                    }),
                    ..web()
                },
                "PROXY protocol",
            ),
            (
                workload::Workload {
                    extensions: vec![workload::Extension::default()],
                    ..web()
                },
                "extensions",
            ),
        ] {
            let error = converted(w, "").expect_err(expected);
            assert!(error.contains(expected), "{expected:?} not in {error:?}");
        }
        let none = workload::Workload {
            application_tunnel: Some(workload::ApplicationTunnel::default()),
            ..web()
        };
        assert!(
            converted(none, "").is_ok(),
            "application_tunnel NONE is plain"
        );
        // Known by name only: resolved when dialled.
        let by_name = workload::Workload {
            addresses: Vec::new(),
            hostname: "db.example.com".into(),
            ..web()
        };
        assert!(
            converted(by_name, "")
                .is_ok_and(|w| w.ips.is_empty() && w.hostname == "db.example.com")
        );
    }

    /// ztunnel keys addresses by network: another network's workload is
    /// known by uid but has no address here, and another network's VIP is
    /// not this network's.
    #[test]
    fn another_networks_addresses_are_not_this_networks() {
        let w = workload::Workload {
            network: "west".into(),
            ..web()
        };
        assert!(converted(w.clone(), "").is_ok_and(|w| w.ips.is_empty()));
        assert!(converted(w, "west").is_ok_and(|w| w.ips.len() == 1));
        let service = workload::Address {
            r#type: Some(workload::address::Type::Service(workload::Service {
                name: "web".into(),
                namespace: "shop".into(),
                hostname: "web.shop.svc.cluster.local".into(),
                addresses: vec![
                    workload::NetworkAddress {
                        network: String::new(),
                        address: vec![10, 96, 0, 1],
                    },
                    workload::NetworkAddress {
                        network: "west".into(),
                        address: vec![10, 96, 0, 2],
                    },
                ],
                ..Default::default()
            })),
        }
        .encode_to_vec();
        let Ok(AddressResource::Service(converted)) =
            address(&service, &NodeContext::new("cluster.local", ""))
        else {
            panic!("converts");
        };
        assert_eq!(converted.vips, vec![IpAddr::from([10, 96, 0, 1])]);
    }

    #[test]
    fn waypoints_are_named_by_hostname_or_address_and_a_bad_one_is_refused() {
        use workload::gateway_address::Destination;
        let hostname = workload::GatewayAddress {
            destination: Some(Destination::Hostname(workload::NamespacedHostname {
                namespace: "shop".into(),
                hostname: "waypoint.shop.svc.cluster.local".into(),
            })),
            hbone_mtls_port: 15008,
        };
        assert_eq!(
            gateway(Some(&hostname)),
            Ok(Some(Waypoint::Service {
                namespace: "shop".into(),
                hostname: "waypoint.shop.svc.cluster.local".into(),
                port: 15008,
            }))
        );
        let address = workload::GatewayAddress {
            destination: Some(Destination::Address(workload::NetworkAddress {
                network: String::new(),
                address: "fd00::9"
                    .parse::<std::net::Ipv6Addr>()
                    .expect("ip")
                    .octets()
                    .to_vec(),
            })),
            hbone_mtls_port: 15008,
        };
        assert_eq!(
            gateway(Some(&address)),
            Ok(Some(Waypoint::Address(
                "[fd00::9]:15008".parse().expect("addr")
            )))
        );
        assert_eq!(gateway(None), Ok(None));
        let empty = workload::GatewayAddress {
            destination: None,
            hbone_mtls_port: 15008,
        };
        assert!(gateway(Some(&empty)).is_err());
        let bad_port = workload::GatewayAddress {
            hbone_mtls_port: 70_000,
            ..hostname
        };
        assert!(gateway(Some(&bad_port)).is_err());
    }
}
