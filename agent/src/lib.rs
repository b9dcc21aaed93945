//! Weir's node agent: eBPF capture of ambient pods into a per-node proxy.
pub mod admin;
pub mod agent;
pub mod authorization;
pub mod bpfinfo;
pub mod config;
pub mod datapath;
pub mod enroll;
pub mod identity;
pub mod kubernetes;
pub mod mesh;
pub mod metrics;
pub mod netns;
pub mod proxy;
pub mod system;
pub mod tls;
pub mod trace;
pub mod xds;
