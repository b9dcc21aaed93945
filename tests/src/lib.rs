//! A test node built from namespaces, so tests never touch the host's own
//! networking:
//!
//! - the node is a network namespace with a bridge (`br0`, `10.77.<k>.1/24`);
//! - each pod is a network namespace with `eth0` (a veth into the bridge), an
//!   IP, and its own cgroup v2 directory under the test's cgroup;
//! - the agent runs in the node's namespace (entered with `setns`, not
//!   `ip netns exec`, which would hide the host's cgroup and bpf mounts);
//! - a second node can be joined on a "wire" veth.
//!
//! Names are unique per test (`wt<pid>x<n>`), so tests run in parallel.
//! Everything is removed on drop (also after a panic), and leftovers of a
//! killed run (whose pid is gone) are removed when the next run starts.
pub mod grpc_server;
pub mod http;
pub mod l7;
pub mod node;
pub mod podtool;
pub mod prereq;
pub mod silent;
pub mod waypoint;
pub mod xds_server;

pub mod ca_server;
pub mod capture;
pub mod cni;
pub mod dns;
pub mod kube_api;
pub mod otlp_collector;
pub mod trace;

pub use node::{
    Agent, AgentOptions, Family, IstioCa, Pod, RemoteWorkload, TestNode, connect_nodes,
};
pub use podtool::{ConnectionReport, SendReport, Server};
pub use trace::trace_events;

use std::time::{Duration, Instant};

/// Polls `condition` until it returns `Some`, or fails with `what` after `deadline`.
pub fn wait_for<T>(
    what: &str,
    deadline: Duration,
    mut condition: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(value) = condition() {
            return Ok(value);
        }
        if start.elapsed() > deadline {
            anyhow::bail!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of the first sample of metric `name` in Prometheus text whose
/// labels contain all of `labels` (each written `key="value"`).
pub fn metric_sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| line.starts_with(name) && !line.starts_with('#'))
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

/// Prints one step of a long run (demo, bench), in bold, on stderr.
pub fn step(message: &str) {
    eprintln!("\x1b[1mweir:\x1b[0m {message}");
}
