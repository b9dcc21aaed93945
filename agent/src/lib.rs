//! Weir's node agent: eBPF capture of ambient pods into a per-node proxy.
//! ARCHITECTURE.md walks the data path through these modules.
pub mod admin;
/// The agent's run: startup, the control loop, hand-over and shutdown.
pub mod app;
/// eBPF programs, pod enrollment and network namespaces.
pub mod capture;
pub mod config;
/// When an edit of the config file is whole enough to apply.
pub mod config_watch;
/// DNS for pods with DNS capture: names the node knows, the rest forwarded.
pub mod dns;
pub mod kubernetes;
pub mod memory;
pub mod proxy;
pub mod routing;
/// Identity, certificates, TLS and authorization.
pub mod security;
/// What the mesh holds: workloads and services.
pub mod state;
/// Metrics, access logs, spans and kernel flow events.
pub mod telemetry;
pub mod xds;
