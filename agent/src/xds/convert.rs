//! From wire resources to the agent's types, validating as it goes: a
//! resource either converts whole or is rejected with the reason.
use std::net::IpAddr;

use prost::Message as _;

use super::proto::istio::{security, workload};
use crate::{
    security::authorization::{Action, Group, IpBlock, Match, Policy, Rule, Scope},
    security::identity::Identity,
    state::{Locality, Service, Source, Workload},
};

/// An Address resource: a workload or a service, as the store holds them.
pub enum AddressResource {
    Workload(Box<Workload>),
    Service(Service),
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

pub fn address(bytes: &[u8], trust_domain: &str) -> Result<AddressResource, String> {
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
            let ips = w
                .addresses
                .iter()
                .map(|bytes| ip(bytes))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("workload {}: {e}", w.uid))?;
            let trust_domain = if w.trust_domain.is_empty() {
                trust_domain
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
            let locality = w
                .locality
                .as_ref()
                .map(|l| Locality {
                    region: l.region.clone(),
                    zone: l.zone.clone(),
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
                locality,
                identity: Identity::new(trust_domain, &w.namespace, service_account),
                uid: w.uid,
                name: w.name,
                namespace: w.namespace,
                ips,
                node: w.node,
                authorization_policies: w.authorization_policies,
                healthy: w.status == workload::WorkloadStatus::Healthy as i32,
            })))
        }
        Some(workload::address::Type::Service(s)) => {
            if s.hostname.is_empty() || s.namespace.is_empty() {
                return Err("service without hostname or namespace".into());
            }
            let vips = s
                .addresses
                .iter()
                .map(|address| ip(&address.address))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("service {}/{}: {e}", s.namespace, s.hostname))?;
            let ports = port_pairs(&s.ports)
                .map_err(|e| format!("service {}/{}: {e}", s.namespace, s.hostname))?;
            Ok(AddressResource::Service(Service {
                source: Source::ControlPlane,
                app_protocols: Vec::new(),
                namespace: s.namespace,
                hostname: s.hostname,
                vips,
                ports,
            }))
        }
        None => Err("Address with neither workload nor service".into()),
    }
}

fn strings(matches: &[security::StringMatch]) -> Vec<String> {
    matches
        .iter()
        .filter_map(|m| match m.match_type.as_ref()? {
            security::string_match::MatchType::Exact(text) => Some(text.clone()),
            security::string_match::MatchType::Prefix(text) => Some(format!("{text}*")),
            security::string_match::MatchType::Suffix(text) => Some(format!("*{text}")),
            security::string_match::MatchType::Presence(_) => Some("*".into()),
        })
        .collect()
}

fn blocks(addresses: &[security::Address]) -> Result<Vec<IpBlock>, String> {
    addresses
        .iter()
        .map(|address| {
            let ip = ip(&address.address)?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len = if address.length == 0 {
                max
            } else {
                address.length
            };
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
    let mut groups = Vec::new();
    for group in &decoded.groups {
        let mut rules = Vec::new();
        for rule in &group.rules {
            let mut matches = Vec::new();
            for m in &rule.matches {
                let at = |e: String| format!("policy {key}: {e}");
                if !m.destination_ips.is_empty() || !m.not_destination_ips.is_empty() {
                    // Would change who is allowed: refuse rather than ignore.
                    return Err(at("destination_ips are not supported".into()));
                }
                matches.push(Match {
                    namespaces: strings(&m.namespaces),
                    not_namespaces: strings(&m.not_namespaces),
                    principals: strings(&m.principals),
                    not_principals: strings(&m.not_principals),
                    source_ips: blocks(&m.source_ips).map_err(at)?,
                    not_source_ips: blocks(&m.not_source_ips).map_err(at)?,
                    destination_ports: ports(&m.destination_ports).map_err(at)?,
                    not_destination_ports: ports(&m.not_destination_ports).map_err(at)?,
                    // Istio's workload API carries L4 matches only.
                    ..Default::default()
                });
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
    })
}
