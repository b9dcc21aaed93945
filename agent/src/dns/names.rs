//! The names a node answers itself: the services it knows, by the rules
//! ztunnel's DNS proxy follows (istio/ztunnel `src/dns/server.rs`):
//! a service's hostname as asked, its Kubernetes short forms as a pod of
//! the client's namespace would write them, the same with one of the
//! client's search domains appended, and wildcard hosts (`*.example.com`).
//! A service with VIPs answers with them; a Kubernetes headless service
//! (no VIPs) with its endpoints' addresses; a service with neither is left
//! to the resolver.
use std::net::IpAddr;

use crate::state::Store;

/// TTL of the answers the node gives itself (ztunnel's 30 s).
pub const TTL_SECONDS: u32 = 30;

/// Kubernetes' default cluster domain (ztunnel's `CLUSTER_DOMAIN`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// A name the node knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    /// The service's hostname, when the name asked was that hostname with
    /// one of the client's search domains appended: the answer is then a
    /// CNAME to it, and the addresses are its.
    pub canonical: Option<String>,
    /// Every address of the service, both families; the answer keeps the
    /// asked one's.
    pub addresses: Vec<IpAddr>,
}

/// The search domains of a pod in `namespace`, as Kubernetes writes them
/// into its `resolv.conf` (and ztunnel assumes).
fn search_domains(namespace: &str, domain: &str) -> [String; 3] {
    [
        format!("{namespace}.svc.{domain}"),
        format!("svc.{domain}"),
        domain.to_string(),
    ]
}

/// The names `name` may stand for in a pod of `namespace`: itself, then
/// its Kubernetes expansions (`web` → `web.<ns>.svc.<domain>`, `web.ns` →
/// `web.ns.svc.<domain>`, `web.ns.svc` → `web.ns.svc.<domain>`).
fn kubernetes_forms(name: &str, namespace: &str, domain: &str) -> Vec<String> {
    let labels: Vec<&str> = name.split('.').collect();
    let mut forms = vec![name.to_string()];
    match labels.as_slice() {
        [_] => forms.push(format!("{name}.{namespace}.svc.{domain}")),
        [_, _] => forms.push(format!("{name}.svc.{domain}")),
        [_, _, "svc"] => forms.push(format!("{name}.{domain}")),
        _ => {}
    }
    forms
}

/// `a.b.c` → `*.b.c`, `*.c`.
fn wildcards(name: &str) -> impl Iterator<Item = String> + '_ {
    name.match_indices('.')
        .map(move |(at, _)| format!("*{}", &name[at..]))
}

/// Looks `name` (lowercase, without the trailing dot) up for a client in
/// `namespace`.
pub fn find(store: &Store, namespace: &str, domain: &str, name: &str) -> Option<Known> {
    // (alias, whether it came from stripping a search domain)
    let mut aliases: Vec<(String, bool)> = kubernetes_forms(name, namespace, domain)
        .into_iter()
        .map(|form| (form, false))
        .collect();
    for search in search_domains(namespace, domain) {
        if let Some(stripped) = name
            .strip_suffix(search.as_str())
            .and_then(|rest| rest.strip_suffix('.'))
            .filter(|rest| !rest.is_empty())
        {
            aliases.extend(
                kubernetes_forms(stripped, namespace, domain)
                    .into_iter()
                    .map(|form| (form, true)),
            );
        }
    }
    for (alias, stripped) in &aliases {
        let candidates = std::iter::once(alias.clone()).chain(wildcards(alias));
        for (index, candidate) in candidates.enumerate() {
            if let Some(addresses) = addresses_of(store, namespace, domain, &candidate) {
                // A wildcard's answer is under the name asked; a stripped
                // search domain's goes through a CNAME to the service.
                let canonical = (*stripped && index == 0).then(|| candidate.clone());
                return Some(Known {
                    canonical,
                    addresses,
                });
            }
        }
    }
    None
}

/// The addresses DNS gives for the service named `hostname`: its VIPs, or
/// a Kubernetes headless service's endpoints; `None` when there is no such
/// service or it has neither. Among services of one hostname, the client's
/// namespace's first.
fn addresses_of(
    store: &Store,
    namespace: &str,
    domain: &str,
    hostname: &str,
) -> Option<Vec<IpAddr>> {
    let mut services = store.services_named(hostname);
    services.sort_by_key(|(service, _)| service.namespace != namespace);
    let kubernetes = format!(".svc.{domain}");
    services.into_iter().find_map(|(service, entry)| {
        if !service.vips.is_empty() {
            return Some(service.vips.clone());
        }
        if !hostname.ends_with(&kubernetes) {
            return None;
        }
        let mut addresses: Vec<IpAddr> = entry
            .iter()
            .flat_map(|entry| entry.endpoints.iter())
            .flat_map(|endpoint| endpoint.workload.ips.iter().copied())
            .collect();
        addresses.sort();
        addresses.dedup();
        Some(addresses)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Service, Source};

    fn service(namespace: &str, hostname: &str, vips: &[&str]) -> Service {
        Service {
            source: Source::ControlPlane,
            namespace: namespace.into(),
            hostname: hostname.into(),
            vips: vips.iter().map(|vip| vip.parse().unwrap()).collect(),
            ports: vec![(80, 8080)],
            app_protocols: Vec::new(),
            waypoint: None,
            load_balancing: Default::default(),
        }
    }

    fn store(services: Vec<Service>) -> Store {
        let store = Store::default();
        store.update(|update| {
            for service in services {
                update.upsert_service(service);
            }
        });
        store
    }

    fn addresses(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    #[test]
    fn kubernetes_forms_of_a_service() {
        let store = store(vec![service(
            "test",
            "web.test.svc.cluster.local",
            &["10.96.0.10", "fd00:96::10"],
        )]);
        let plain = Some(Known {
            canonical: None,
            addresses: addresses(&["10.96.0.10", "fd00:96::10"]),
        });
        for name in ["web.test.svc.cluster.local", "web.test.svc", "web.test"] {
            assert_eq!(find(&store, "other", CLUSTER_DOMAIN, name), plain, "{name}");
        }
        // The bare name only from its own namespace.
        assert_eq!(find(&store, "test", CLUSTER_DOMAIN, "web"), plain);
        assert_eq!(find(&store, "other", CLUSTER_DOMAIN, "web"), None);
        assert_eq!(find(&store, "test", CLUSTER_DOMAIN, "db"), None);
    }

    #[test]
    fn a_search_domain_appended_by_the_resolver_gives_a_cname() {
        let store = store(vec![service(
            "test",
            "web.test.svc.cluster.local",
            &["10.96.0.10"],
        )]);
        let via = |name| find(&store, "test", CLUSTER_DOMAIN, name);
        // glibc with ndots:5 asks `web.test` + `test.svc.cluster.local` first.
        for name in [
            "web.test.test.svc.cluster.local",
            "web.test.svc.cluster.local",
            "web.test.cluster.local",
            "web.test.svc.test.svc.cluster.local",
        ] {
            let known = via(name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(known.addresses, addresses(&["10.96.0.10"]), "{name}");
        }
        assert_eq!(
            via("web.test.test.svc.cluster.local")
                .unwrap()
                .canonical
                .as_deref(),
            Some("web.test.svc.cluster.local")
        );
        // The hostname itself is no detour.
        assert_eq!(via("web.test.svc.cluster.local").unwrap().canonical, None);
        // Another namespace's search domain is not the client's.
        assert_eq!(via("web.test.other.svc.cluster.local"), None);
    }

    #[test]
    fn service_entries_wildcards_and_services_without_addresses() {
        let mut headless = service("test", "db.test.svc.cluster.local", &[]);
        headless.ports = vec![(5432, 5432)];
        let store = store(vec![
            service("test", "api.example.com", &["240.240.0.1"]),
            service("test", "*.wild.example", &["240.240.0.2"]),
            service("test", "vipless.example.com", &[]),
            headless,
        ]);
        let via = |name| find(&store, "test", CLUSTER_DOMAIN, name).map(|known| known.addresses);
        assert_eq!(via("api.example.com"), Some(addresses(&["240.240.0.1"])));
        assert_eq!(via("a.b.wild.example"), Some(addresses(&["240.240.0.2"])));
        assert_eq!(via("wild.example"), None);
        // No VIP and not Kubernetes: the resolver's to answer.
        assert_eq!(via("vipless.example.com"), None);
        // Kubernetes headless: its endpoints (none ready here).
        assert_eq!(via("db.test.svc.cluster.local"), Some(Vec::new()));
    }

    #[test]
    fn the_clients_namespace_wins_a_shared_hostname() {
        let store = store(vec![
            service("a", "shared.example.com", &["240.240.0.1"]),
            service("b", "shared.example.com", &["240.240.0.2"]),
        ]);
        let via = |namespace| {
            find(&store, namespace, CLUSTER_DOMAIN, "shared.example.com")
                .map(|known| known.addresses)
        };
        assert_eq!(via("b"), Some(addresses(&["240.240.0.2"])));
        assert_eq!(via("a"), Some(addresses(&["240.240.0.1"])));
    }
}
