//! What the node knows of the mesh: one store of workloads and services
//! that the file, the Kubernetes API and the control plane all feed, with
//! the indexes the proxy reads on every connection.
mod service;
mod store;
mod workload;

pub use service::{
    AppProtocol, BalanceMode, BalanceScope, Endpoint, LoadBalancing, Placement, Service,
    ServiceEntry,
};
pub use store::{Store, Update};
pub use workload::{Locality, Source, Tunnel, Waypoint, Workload};
