//! Name resolution for `STRICT_DNS` and `LOGICAL_DNS` clusters: one task
//! per cluster resolves its names with the system's resolver (on tokio's
//! blocking pool) at once and then every `dns_refresh_rate`, and publishes
//! the addresses for the request path to read without waiting. A name that
//! fails to resolve keeps its last addresses, as Envoy's do.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwapOption;

use crate::routing::{ClusterEndpoints, DnsCluster, DnsTarget, LbAddress, RouteTable};

/// How long one lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The resolved addresses of one DNS cluster.
pub type Resolved = Arc<Vec<LbAddress>>;

struct Resolving {
    config: DnsCluster,
    addresses: Arc<ArcSwapOption<Vec<LbAddress>>>,
    task: tokio::task::AbortHandle,
}

impl Drop for Resolving {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Every DNS cluster's resolution, by cluster name.
#[derive(Default)]
pub struct DnsClusters {
    by_name: Mutex<HashMap<String, Resolving>>,
}

impl DnsClusters {
    /// Starts resolving the DNS clusters `table` has that are new or
    /// changed, and stops those it no longer has.
    pub fn sync(&self, table: &RouteTable) {
        let mut by_name = self.by_name.lock().unwrap_or_else(|e| e.into_inner());
        by_name.retain(|name, resolving| {
            matches!(
                table.clusters.get(name).map(|cluster| &cluster.endpoints),
                Some(ClusterEndpoints::Dns(config)) if *config == resolving.config
            )
        });
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for (name, cluster) in &table.clusters {
            let ClusterEndpoints::Dns(config) = &cluster.endpoints else {
                continue;
            };
            if by_name.contains_key(name) {
                continue;
            }
            let addresses = Arc::new(ArcSwapOption::empty());
            let task = runtime
                .spawn(resolve_forever(
                    name.clone(),
                    config.clone(),
                    addresses.clone(),
                ))
                .abort_handle();
            by_name.insert(
                name.clone(),
                Resolving {
                    config: config.clone(),
                    addresses,
                    task,
                },
            );
        }
    }

    /// The cluster's addresses as last resolved; `None` before the first
    /// answer.
    pub fn resolved(&self, name: &str) -> Option<Resolved> {
        self.by_name
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .and_then(|resolving| resolving.addresses.load_full())
    }
}

async fn resolve_forever(
    cluster: String,
    config: DnsCluster,
    published: Arc<ArcSwapOption<Vec<LbAddress>>>,
) {
    // Per name, the last good answer.
    let mut last: Vec<Vec<SocketAddr>> = vec![Vec::new(); config.targets.len()];
    loop {
        for (index, target) in config.targets.iter().enumerate() {
            match lookup(target, &config).await {
                Ok(addresses) => last[index] = addresses,
                Err(error) => tracing::warn!(
                    %cluster, host = %target.host, %error,
                    "DNS cluster: resolution failed; keeping the last addresses"
                ),
            }
        }
        let addresses: Vec<LbAddress> = config
            .targets
            .iter()
            .zip(&last)
            .flat_map(|(target, addresses)| {
                addresses.iter().map(|address| LbAddress {
                    address: *address,
                    priority: target.priority,
                    locality: target.locality,
                })
            })
            .collect();
        let changed = published
            .load()
            .as_deref()
            .is_none_or(|old| *old != addresses);
        if changed {
            tracing::debug!(%cluster, addresses = addresses.len(), "DNS cluster resolved");
            published.store(Some(Arc::new(addresses)));
        }
        tokio::time::sleep(config.refresh).await;
    }
}

/// One name's addresses in the cluster's family (the first only for
/// `LOGICAL_DNS`).
async fn lookup(target: &DnsTarget, config: &DnsCluster) -> Result<Vec<SocketAddr>, String> {
    let answer = tokio::time::timeout(
        LOOKUP_TIMEOUT,
        tokio::net::lookup_host((target.host.as_str(), target.port)),
    )
    .await
    .map_err(|_| format!("no answer within {LOOKUP_TIMEOUT:?}"))?
    .map_err(|error| error.to_string())?;
    let mut addresses = config.family.keep(answer.collect());
    addresses.dedup();
    if config.logical {
        addresses.truncate(1);
    }
    if addresses.is_empty() {
        return Err(format!("no address of family {:?}", config.family));
    }
    Ok(addresses)
}
