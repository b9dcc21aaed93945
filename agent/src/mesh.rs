//! Which addresses belong to meshed workloads, and who they are: the local
//! pods and the workloads the config lists on other nodes. Read on every
//! outbound connection; replaced whole when the config changes.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

use crate::{config::Config, identity::Identity, xds::convert::XdsWorkload};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// `namespace/name`.
    pub id: String,
    pub ip: IpAddr,
    pub identity: Identity,
}

#[derive(Default)]
pub struct Mesh {
    by_ip: RwLock<Arc<HashMap<IpAddr, Arc<Workload>>>>,
}

impl Mesh {
    pub fn from_config(config: &Config) -> Mesh {
        let mesh = Mesh::default();
        mesh.update(config, &[]);
        mesh
    }

    pub fn workload(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        let by_ip = self.by_ip.read().unwrap_or_else(|e| e.into_inner()).clone();
        by_ip.get(&ip.to_canonical()).cloned()
    }

    /// Every workload, sorted by IP, for `/config_dump`.
    pub fn listed(&self) -> Vec<Arc<Workload>> {
        let by_ip = self.by_ip.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut workloads: Vec<Arc<Workload>> = by_ip.values().cloned().collect();
        workloads.sort_by_key(|workload| workload.ip);
        workloads
    }

    /// Replaces the whole table: the config's pods and workloads, then what
    /// the control plane sent (the config wins for an IP both name).
    pub fn update(&self, config: &Config, learnt: &[XdsWorkload]) {
        let mut by_ip = HashMap::new();
        let pods = config
            .pods
            .iter()
            .map(|pod| (pod.id(), pod.ip, &pod.namespace, &pod.service_account));
        let remote = config.workloads.iter().map(|workload| {
            (
                format!("{}/{}", workload.namespace, workload.name),
                workload.ip,
                &workload.namespace,
                &workload.service_account,
            )
        });
        for (id, ip, namespace, service_account) in pods.chain(remote) {
            let identity = Identity::new(&config.trust_domain, namespace, service_account);
            by_ip.insert(ip, Arc::new(Workload { id, ip, identity }));
        }
        for workload in learnt.iter().filter(|workload| workload.healthy) {
            for ip in &workload.ips {
                by_ip.entry(*ip).or_insert_with(|| {
                    Arc::new(Workload {
                        id: format!("{}/{}", workload.namespace, workload.name),
                        ip: *ip,
                        identity: workload.identity.clone(),
                    })
                });
            }
        }
        *self.by_ip.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(by_ip);
    }
}
