//! Capture: the eBPF programs and their pinned maps (`datapath`), putting
//! pods under the mesh and taking them out (`enroll`), network namespaces,
//! the rtnetlink requests enrollment makes in them (`netlink`), and the
//! checks run before anything is loaded (`preflight`).
pub mod bpfinfo;
pub mod cgroup_link;
pub mod chain;
pub mod datapath;
pub mod enroll;
pub mod netlink;
pub mod netns;
pub mod preflight;
