//! Authorization with Istio's semantics, evaluated where a connection
//! arrives (the destination's side): `DENY` policies first, then `ALLOW`; if
//! any `ALLOW` policy applies to the workload, only matching connections
//! pass. Matches may look at HTTP (methods, paths, hosts, headers): a pod
//! with such a policy gets its HTTP parsed and every request checked; on a
//! stream that is not HTTP, an `ALLOW` match that needs HTTP never matches
//! and a `DENY` match applies on its other fields (ztunnel's rule: fail
//! closed). The policy shape follows `istio.security.Authorization`: a policy
//! matches when any group matches; a group when all its rules match; a rule
//! when any of its matches matches; a match when every field it sets
//! matches and none of its `not_*` fields do.
use std::{collections::HashMap, net::IpAddr, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::security::identity::Identity;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Allow,
    Deny,
}

/// Which workloads a policy applies to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Scope {
    /// Every workload of the mesh.
    Global,
    /// Every workload in the policy's namespace.
    #[default]
    Namespace,
    /// The workloads that list the policy (as Istio's workload API does
    /// once istiod has resolved the selector).
    WorkloadSelector,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub scope: Scope,
    pub action: Action,
    /// Any group may match; an empty list matches nothing.
    #[serde(default)]
    pub groups: Vec<Group>,
    /// Evaluated, logged and counted, never enforced (Istio's
    /// `istio.io/dry-run`, the shadow rules of Envoy's RBAC filter).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

impl Policy {
    /// `namespace/name`, as workloads refer to policies.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// All rules must match.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Any match may match.
    #[serde(default)]
    pub matches: Vec<Match>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// `<trust-domain>/ns/<ns>/sa/<sa>` (Istio's principal form), `*` allowed
    /// as a prefix or suffix wildcard.
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// `<namespace>/<service-account>`, exact (Istio's
    /// `source.serviceAccounts`, any trust domain).
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    #[serde(default)]
    pub source_ips: Vec<IpBlock>,
    #[serde(default)]
    pub not_source_ips: Vec<IpBlock>,
    /// The address the client connected to (the workload's own; Istio's
    /// `destination.ip`), IPv4 or IPv6 CIDRs.
    #[serde(default)]
    pub destination_ips: Vec<IpBlock>,
    #[serde(default)]
    pub not_destination_ips: Vec<IpBlock>,
    #[serde(default)]
    pub destination_ports: Vec<u16>,
    #[serde(default)]
    pub not_destination_ports: Vec<u16>,
    /// HTTP methods (`GET`…); Istio's `to.operation.methods`.
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// Request paths without the query, `*` allowed as a prefix or suffix
    /// wildcard; Istio's `to.operation.paths`.
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
    /// The request's host without a port, case-insensitive; Istio's
    /// `to.operation.hosts`.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// `request.headers[<name>]` conditions: the header must have one of
    /// the values (globs); Istio's `when`.
    #[serde(default)]
    pub request_headers: std::collections::BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub not_request_headers: std::collections::BTreeMap<String, Vec<String>>,
    /// Authenticated end-user principals (`iss/sub`). Weir validates no
    /// JWTs (no RequestAuthentication), so requests have none: a match that
    /// needs one never matches, a `not_` one always does.
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
}

/// What an HTTP request adds to the facts of its connection.
#[derive(Debug, Clone)]
pub struct RequestAttributes<'a> {
    pub method: &'a str,
    /// Without the query.
    pub path: &'a str,
    /// Without the port.
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// An address block (`10.0.0.0/8`, `fd00::/8`, or a single address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpBlock {
    pub address: IpAddr,
    pub prefix_len: u8,
}

impl IpBlock {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let bits = u32::from(self.prefix_len.min(32));
                let mask = if bits == 0 {
                    0
                } else {
                    u32::MAX << (32 - bits)
                };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let bits = u32::from(self.prefix_len.min(128));
                let mask = if bits == 0 {
                    0
                } else {
                    u128::MAX << (128 - bits)
                };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for IpBlock {
    type Err = String;
    fn from_str(text: &str) -> Result<IpBlock, String> {
        let (address, len) = match text.split_once('/') {
            Some((address, len)) => (address, Some(len)),
            None => (text, None),
        };
        let address: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not an address or CIDR"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            Some(len) => len
                .parse::<u8>()
                .ok()
                .filter(|len| *len <= max)
                .ok_or_else(|| format!("{text:?}: prefix length must be 0..={max}"))?,
            None => max,
        };
        Ok(IpBlock {
            address,
            prefix_len,
        })
    }
}

impl Serialize for IpBlock {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{}/{}", self.address, self.prefix_len))
    }
}

impl<'de> Deserialize<'de> for IpBlock {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What is known about a connection when it arrives.
#[derive(Debug, Clone)]
pub struct ConnectionFacts<'a> {
    /// The client's identity, when it came through the mesh.
    pub source_identity: Option<&'a Identity>,
    pub source_ip: IpAddr,
    /// The workload's address the client connected to.
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    /// The request, when the stream is HTTP and the policies look at it.
    pub request: Option<RequestAttributes<'a>>,
}

impl ConnectionFacts<'_> {
    fn principal(&self) -> Option<&str> {
        self.source_identity.map(|id| id.principal())
    }

    /// Whether the source is `<namespace>/<service-account>`.
    fn is_service_account(&self, value: &str) -> bool {
        self.source_identity.is_some_and(|id| {
            value.split_once('/').is_some_and(|(namespace, account)| {
                id.namespace() == namespace && id.service_account() == account
            })
        })
    }
}

/// A `service_accounts` entry is `<namespace>/<service-account>`, both
/// non-empty and without wildcards (Istio allows none there).
pub fn check_service_account(value: &str) -> Result<(), String> {
    match value.split_once('/') {
        Some((namespace, account))
            if !namespace.is_empty()
                && !account.is_empty()
                && !account.contains('/')
                && !value.contains('*') =>
        {
            Ok(())
        }
        _ => Err(format!(
            "service account {value:?} is not <namespace>/<service-account>"
        )),
    }
}

fn glob(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else {
        pattern == value
    }
}

impl Match {
    /// Whether this match needs the request (HTTP) to be decided.
    pub fn needs_http(&self) -> bool {
        !(self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.request_headers.is_empty()
            && self.not_request_headers.is_empty()
            && self.request_principals.is_empty()
            && self.not_request_principals.is_empty())
    }

    /// The HTTP fields against `request`; without one, `unknown` decides.
    fn matches_request(&self, request: Option<&RequestAttributes<'_>>, unknown: bool) -> bool {
        if !self.needs_http() {
            return true;
        }
        let Some(request) = request else {
            return unknown;
        };
        let host = request.host.to_ascii_lowercase();
        let glob_any = |patterns: &[String], value: &str| patterns.iter().any(|p| glob(p, value));
        let positive =
            |patterns: &[String], value: &str| patterns.is_empty() || glob_any(patterns, value);
        let lowercase = |patterns: &[String]| -> Vec<String> {
            patterns.iter().map(|p| p.to_ascii_lowercase()).collect()
        };
        let header_values = |name: &str| -> Vec<&str> {
            request
                .headers
                .get_all(name)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .collect()
        };
        let header_matches = |name: &String, patterns: &Vec<String>| {
            header_values(name)
                .iter()
                .any(|value| glob_any(patterns, value))
        };
        positive(&self.methods, request.method)
            && !glob_any(&self.not_methods, request.method)
            && positive(&self.paths, request.path)
            && !glob_any(&self.not_paths, request.path)
            && positive(&lowercase(&self.hosts), &host)
            && !glob_any(&lowercase(&self.not_hosts), &host)
            && self
                .request_headers
                .iter()
                .all(|(name, patterns)| header_matches(name, patterns))
            && !self
                .not_request_headers
                .iter()
                .any(|(name, patterns)| header_matches(name, patterns))
            // No request carries an authenticated principal (see the field).
            && self.request_principals.is_empty()
    }

    fn matches(&self, facts: &ConnectionFacts<'_>, action: Action) -> bool {
        // Without the request, an ALLOW that needs it does not match and a
        // DENY does: the stricter reading either way.
        let unknown = action == Action::Deny;
        self.matches_l4(facts) && self.matches_request(facts.request.as_ref(), unknown)
    }

    fn matches_l4(&self, facts: &ConnectionFacts<'_>) -> bool {
        let namespace = facts.source_identity.map(|id| id.namespace());
        let principal = facts.principal();
        // A set field needs a value to match; an unknown value never does.
        let any_of = |patterns: &[String], value: Option<&str>| {
            value.is_some_and(|value| patterns.iter().any(|pattern| glob(pattern, value)))
        };
        let positive = |patterns: &[String], value: Option<&str>| {
            patterns.is_empty() || any_of(patterns, value)
        };
        positive(&self.namespaces, namespace)
            && !any_of(&self.not_namespaces, namespace)
            && positive(&self.principals, principal)
            && !any_of(&self.not_principals, principal)
            && (self.service_accounts.is_empty()
                || self
                    .service_accounts
                    .iter()
                    .any(|value| facts.is_service_account(value)))
            && !self
                .not_service_accounts
                .iter()
                .any(|value| facts.is_service_account(value))
            && (self.source_ips.is_empty()
                || self
                    .source_ips
                    .iter()
                    .any(|block| block.contains(facts.source_ip)))
            && !self
                .not_source_ips
                .iter()
                .any(|block| block.contains(facts.source_ip))
            && (self.destination_ips.is_empty()
                || self
                    .destination_ips
                    .iter()
                    .any(|block| block.contains(facts.destination_ip)))
            && !self
                .not_destination_ips
                .iter()
                .any(|block| block.contains(facts.destination_ip))
            && (self.destination_ports.is_empty()
                || self.destination_ports.contains(&facts.destination_port))
            && !self.not_destination_ports.contains(&facts.destination_port)
    }
}

impl Policy {
    fn matches(&self, facts: &ConnectionFacts<'_>) -> bool {
        self.groups.iter().any(|group| {
            group
                .rules
                .iter()
                .all(|rule| rule.matches.iter().any(|m| m.matches(facts, self.action)))
        })
    }

    /// Whether any match of this policy looks at HTTP.
    pub fn needs_http(&self) -> bool {
        self.groups
            .iter()
            .flat_map(|group| &group.rules)
            .flat_map(|rule| &rule.matches)
            .any(Match::needs_http)
    }
}

/// The verdict for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Denied, by this policy (`namespace/name`), or by the absence of a
    /// matching ALLOW policy.
    Deny {
        policy: String,
    },
}

/// The policies, ready to be evaluated. Replaced whole on change.
#[derive(Debug, Default)]
pub struct PolicyStore {
    global: Vec<Arc<Policy>>,
    by_namespace: HashMap<String, Vec<Arc<Policy>>>,
    by_key: HashMap<String, Arc<Policy>>,
    /// The dry-run policies, evaluated on their own as if they were the
    /// only ones (as Envoy's shadow rules are).
    dry_run: Option<Box<PolicyStore>>,
}

impl PolicyStore {
    pub fn new(policies: &[Policy]) -> PolicyStore {
        let (dry_run, enforced): (Vec<&Policy>, Vec<&Policy>) =
            policies.iter().partition(|policy| policy.dry_run);
        let mut store = PolicyStore::enforcing(&enforced);
        if !dry_run.is_empty() {
            store.dry_run = Some(Box::new(PolicyStore::enforcing(&dry_run)));
        }
        store
    }

    fn enforcing(policies: &[&Policy]) -> PolicyStore {
        let mut store = PolicyStore::default();
        for &policy in policies {
            let policy = Arc::new(policy.clone());
            match policy.scope {
                Scope::Global => store.global.push(policy.clone()),
                Scope::Namespace => store
                    .by_namespace
                    .entry(policy.namespace.clone())
                    .or_default()
                    .push(policy.clone()),
                Scope::WorkloadSelector => {}
            }
            store.by_key.insert(policy.key(), policy);
        }
        store
    }

    /// The policies that apply to a workload in `namespace` that lists
    /// `selected` (policy keys) as its own.
    fn applicable(&self, namespace: &str, selected: &[String]) -> Vec<&Arc<Policy>> {
        self.global
            .iter()
            .chain(self.by_namespace.get(namespace).into_iter().flatten())
            .chain(selected.iter().filter_map(|key| self.by_key.get(key)))
            .filter(|policy| {
                policy.scope != Scope::WorkloadSelector || selected.contains(&policy.key())
            })
            .collect()
    }

    /// Whether a policy that applies to the workload looks at HTTP: then
    /// its streams are parsed and every request authorized.
    pub fn needs_http(&self, namespace: &str, selected: &[String]) -> bool {
        self.applicable(namespace, selected)
            .iter()
            .any(|policy| policy.needs_http())
    }

    /// Evaluates a connection (or, with `facts.request`, one request of it)
    /// to a workload in `namespace` that lists `selected` as its own.
    pub fn evaluate(
        &self,
        namespace: &str,
        selected: &[String],
        facts: &ConnectionFacts<'_>,
    ) -> Verdict {
        let applicable = self.applicable(namespace, selected);
        if let Some(deny) = applicable
            .iter()
            .find(|policy| policy.action == Action::Deny && policy.matches(facts))
        {
            return Verdict::Deny { policy: deny.key() };
        }
        let allows: Vec<&&Arc<Policy>> = applicable
            .iter()
            .filter(|policy| policy.action == Action::Allow)
            .collect();
        if allows.is_empty() || allows.iter().any(|policy| policy.matches(facts)) {
            Verdict::Allow
        } else {
            Verdict::Deny {
                policy: "(no ALLOW policy matched)".into(),
            }
        }
    }

    /// Every policy, enforced or dry-run.
    fn all(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.by_key.values().chain(
            self.dry_run
                .iter()
                .flat_map(|shadow| shadow.by_key.values()),
        )
    }

    fn get(&self, key: &str) -> Option<&Arc<Policy>> {
        self.by_key
            .get(key)
            .or_else(|| self.dry_run.as_ref()?.by_key.get(key))
    }

    /// What the dry-run policies that apply to the workload would decide,
    /// or `None` when none applies. Never enforced.
    pub fn evaluate_dry_run(
        &self,
        namespace: &str,
        selected: &[String],
        facts: &ConnectionFacts<'_>,
    ) -> Option<Verdict> {
        let shadow = self.dry_run.as_ref()?;
        if shadow.applicable(namespace, selected).is_empty() {
            return None;
        }
        Some(shadow.evaluate(namespace, selected, facts))
    }
}

/// Shared, replaceable policies: readers load a snapshot without locking;
/// watchers learn of each change (established connections are re-checked).
pub struct Policies {
    current: arc_swap::ArcSwap<PolicyStore>,
    /// Bumped when the policies change.
    generation: tokio::sync::watch::Sender<u64>,
}

impl Default for Policies {
    fn default() -> Self {
        Policies {
            current: Default::default(),
            generation: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Policies {
    /// Wakes on each change of the policies.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn snapshot(&self) -> Arc<PolicyStore> {
        self.current.load_full()
    }

    /// The policies as configured, for `/config_dump`.
    pub fn listed(&self) -> Vec<Policy> {
        let store = self.snapshot();
        let mut policies: Vec<Policy> = store.all().map(|p| (**p).clone()).collect();
        policies.sort_by_key(Policy::key);
        policies
    }

    /// Puts `policies` in force; whether they differ from the ones before
    /// (only then are watchers told).
    pub fn replace(&self, policies: &[Policy]) -> bool {
        let next = PolicyStore::new(policies);
        let current = self.current.load();
        let same = current.all().count() == next.all().count()
            && next
                .all()
                .all(|policy| current.get(&policy.key()) == Some(policy));
        if same {
            return false;
        }
        self.current.store(Arc::new(next));
        self.generation.send_modify(|generation| *generation += 1);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Policy {
        serde_yaml::from_str(yaml).expect("policy")
    }

    fn facts<'a>(identity: Option<&'a Identity>, port: u16) -> ConnectionFacts<'a> {
        ConnectionFacts {
            source_identity: identity,
            source_ip: "10.0.0.5".parse().expect("ip"),
            destination_ip: "10.0.0.9".parse().expect("ip"),
            destination_port: port,
            request: None,
        }
    }

    #[test]
    fn watchers_hear_of_a_change_and_only_of_a_change() {
        let policies = Policies::default();
        let mut changes = policies.subscribe();
        let deny = policy("{name: d, namespace: test, action: DENY}");
        assert!(policies.replace(std::slice::from_ref(&deny)));
        assert!(changes.has_changed().unwrap_or(false));
        changes.mark_unchanged();
        // The same policies again (an xDS push of routes, a reload of
        // another field): nothing to re-check.
        assert!(!policies.replace(std::slice::from_ref(&deny)));
        assert!(!changes.has_changed().unwrap_or(true));
        // A dry-run policy is a change too, listed with the others.
        let dry_run = policy("{name: e, namespace: test, action: DENY, dry_run: true}");
        assert!(policies.replace(&[deny.clone(), dry_run.clone()]));
        assert_eq!(policies.listed(), vec![deny.clone(), dry_run.clone()]);
        assert!(!policies.replace(&[deny, dry_run]));
        assert!(policies.replace(&[]));
        assert!(changes.has_changed().unwrap_or(false));
    }

    #[test]
    fn http_fields_decide_per_request_and_fail_closed_without_one() {
        let store = PolicyStore::new(&[
            policy(
                "{name: allow-reads, namespace: test, action: ALLOW, groups: [{rules: [{matches: [{methods: [GET, HEAD], paths: [/public/*], hosts: [Web.Test]}]}]}]}",
            ),
            policy(
                "{name: deny-debug, namespace: test, action: DENY, groups: [{rules: [{matches: [{request_headers: {x-debug: ['*']}}]}]}]}",
            ),
        ]);
        assert!(store.needs_http("test", &[]));
        assert!(!store.needs_http("prod", &[]));
        let headers = http::HeaderMap::new();
        let mut debug = http::HeaderMap::new();
        debug.insert("x-debug", http::HeaderValue::from_static("1"));
        let request = |method, path, headers| RequestAttributes {
            method,
            path,
            host: "web.test",
            headers,
        };
        let with = |request| ConnectionFacts {
            request: Some(request),
            ..facts(None, 80)
        };
        assert_eq!(
            store.evaluate("test", &[], &with(request("GET", "/public/a", &headers))),
            Verdict::Allow
        );
        assert!(matches!(
            store.evaluate("test", &[], &with(request("POST", "/public/a", &headers))),
            Verdict::Deny { .. }
        ));
        assert!(matches!(
            store.evaluate("test", &[], &with(request("GET", "/admin", &headers))),
            Verdict::Deny { .. }
        ));
        assert_eq!(
            store.evaluate("test", &[], &with(request("GET", "/public/a", &debug))),
            Verdict::Deny {
                policy: "test/deny-debug".into()
            }
        );
        // Not HTTP: the ALLOW cannot match, the DENY applies.
        assert_eq!(
            store.evaluate("test", &[], &facts(None, 80)),
            Verdict::Deny {
                policy: "test/deny-debug".into()
            }
        );
    }

    #[test]
    fn deny_wins_then_allow_decides() {
        let a = Identity::new("cluster.local", "test", "a");
        let c = Identity::new("cluster.local", "other", "c");
        let store = PolicyStore::new(&[
            policy(
                "{name: allow-a, namespace: test, action: ALLOW, groups: [{rules: [{matches: [{principals: [cluster.local/ns/test/sa/a]}]}]}]}",
            ),
            policy(
                "{name: deny-other, namespace: test, action: DENY, groups: [{rules: [{matches: [{namespaces: [other]}]}]}]}",
            ),
        ]);
        assert_eq!(
            store.evaluate("test", &[], &facts(Some(&a), 80)),
            Verdict::Allow
        );
        assert_eq!(
            store.evaluate("test", &[], &facts(Some(&c), 80)),
            Verdict::Deny {
                policy: "test/deny-other".into()
            }
        );
        // An ALLOW policy exists: anything it does not match is denied.
        assert!(matches!(
            store.evaluate("test", &[], &facts(None, 80)),
            Verdict::Deny { .. }
        ));
        // Other namespaces are not affected by namespace-scoped policies.
        assert_eq!(
            store.evaluate("prod", &[], &facts(None, 80)),
            Verdict::Allow
        );
    }

    #[test]
    fn ports_negations_ip_blocks_and_selectors() {
        let store = PolicyStore::new(&[policy(
            "{name: p, namespace: test, scope: WORKLOAD_SELECTOR, action: DENY, groups: [{rules: [{matches: [{destination_ports: [22], not_source_ips: [10.1.0.0/16]}]}]}]}",
        )]);
        let selected = vec!["test/p".to_string()];
        assert!(matches!(
            store.evaluate("test", &selected, &facts(None, 22)),
            Verdict::Deny { .. }
        ));
        assert_eq!(
            store.evaluate("test", &selected, &facts(None, 80)),
            Verdict::Allow
        );
        assert_eq!(
            store.evaluate("test", &[], &facts(None, 22)),
            Verdict::Allow,
            "not selected"
        );
        let block: IpBlock = "10.0.0.0/8".parse().expect("block");
        assert!(block.contains("10.200.1.1".parse().expect("ip")));
        assert!(!block.contains("11.0.0.1".parse().expect("ip")));
        assert!("10.0.0.0/40".parse::<IpBlock>().is_err());
    }

    #[test]
    fn an_allow_policy_without_rules_allows_nothing() {
        let store = PolicyStore::new(&[policy(
            "{name: allow-nothing, namespace: test, action: ALLOW}",
        )]);
        let a = Identity::new("cluster.local", "test", "a");
        assert!(matches!(
            store.evaluate("test", &[], &facts(Some(&a), 80)),
            Verdict::Deny { .. }
        ));
    }
}
