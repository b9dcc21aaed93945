//! Prerequisites of the namespaced tests. A missing one fails the test with a
//! message saying what is missing; nothing is skipped silently.
use std::path::PathBuf;

use anyhow::{Context as _, bail};

/// The cgroup v2 mount point, from /proc/mounts.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(target))
        })
        .context("no cgroup v2 hierarchy mounted (see /proc/mounts); the tests need one")
}

/// A workspace binary: `$<env_var>`, or `name` in the profile directory of
/// the running executable (`target/<profile>/deps/<test>` or
/// `target/<profile>/<bin>`), where cargo builds it.
fn workspace_binary(name: &str, env_var: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "`{name}` was not found beside {} (run the suite with `cargo xtask test`, which builds it, or set {env_var})",
        exe.display()
    )
}

/// The agent binary (`WEIR_BIN` overrides).
pub fn agent_binary() -> anyhow::Result<PathBuf> {
    workspace_binary("weir", "WEIR_BIN")
}

/// The test workload binary (`PODTOOL_BIN` overrides).
pub fn podtool_binary() -> anyhow::Result<PathBuf> {
    workspace_binary("podtool", "PODTOOL_BIN")
}

/// The stand-in waypoint (`WAYPOINT_BIN` overrides).
pub fn waypoint_binary() -> anyhow::Result<PathBuf> {
    workspace_binary("waypoint", "WAYPOINT_BIN")
}

/// Checks everything the namespaced tests need, once per process.
pub fn check() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("these tests need root (network namespaces, cgroups, eBPF): run them as root");
    }
    for tool in ["ip", "bpftool"] {
        let found = std::process::Command::new(tool)
            .arg("-V")
            .output()
            .map(|output| output.status.success())
            .unwrap_or(false);
        if !found {
            bail!(
                "`{tool}` is missing: `cargo xtask setup` installs it (Debian: apt-get install iproute2 bpftool)"
            );
        }
    }
    cgroup2_root()?;
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!(
            "kernel BTF (/sys/kernel/btf/vmlinux) is missing: the eBPF programs need CONFIG_DEBUG_INFO_BTF"
        );
    }
    agent_binary()?;
    podtool_binary()?;
    Ok(())
}
