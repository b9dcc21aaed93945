//! DNS for the DNS capture tests: dnsmasq as the resolver pods ask, and
//! clients run with a `resolv.conf` of the test's own (bind-mounted in a
//! mount namespace of their own, as a container runtime gives a pod one).
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{node::Pod, wait_for};

/// Search domains and options as the kubelet writes them for a pod of
/// namespace `test` (ndots:5: a short name is tried with each search
/// domain first).
pub const SEARCH: &str = "search test.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:2 attempts:2\n";

/// dnsmasq answering from a hosts file on both of a pod's addresses,
/// port 53, logging every query (with the client's address) to a file.
pub struct Resolver {
    child: Child,
    pub log: PathBuf,
}

impl Resolver {
    /// `hosts` in `/etc/hosts` form. Names it does not know under `local`
    /// and `test` get NXDOMAIN (no upstream).
    pub fn start(pod: &Pod, dir: &Path, hosts: &str) -> anyhow::Result<Resolver> {
        if std::process::Command::new("dnsmasq")
            .arg("--version")
            .output()
            .map(|output| !output.status.success())
            .unwrap_or(true)
        {
            bail!(
                "`dnsmasq` is missing: `cargo xtask setup` installs it (Debian: apt-get install dnsmasq-base)"
            );
        }
        std::fs::create_dir_all(dir)?;
        let hosts_file = dir.join(format!("hosts-{}", pod.name));
        std::fs::write(&hosts_file, hosts)?;
        let log = dir.join(format!("dnsmasq-{}.log", pod.name));
        let _ = std::fs::remove_file(&log);
        let child = pod
            .command("dnsmasq")?
            .args([
                "--keep-in-foreground".to_string(),
                "--conf-file=/dev/null".into(),
                "--no-resolv".into(),
                "--no-hosts".into(),
                format!("--addn-hosts={}", hosts_file.display()),
                "--local=/local/".into(),
                "--local=/test/".into(),
                "--bind-interfaces".into(),
                format!("--listen-address={}", pod.ip),
                format!("--listen-address={}", pod.ip6),
                "--port=53".into(),
                "--log-queries".into(),
                format!("--log-facility={}", log.display()),
                "--pid-file=".into(),
                "--user=root".into(),
                "--group=root".into(),
            ])
            .spawn()?;
        let resolver = Resolver { child, log };
        wait_for("dnsmasq to start", Duration::from_secs(10), || {
            resolver
                .queries()
                .contains("started, version")
                .then_some(())
        })?;
        Ok(resolver)
    }

    /// Its log so far.
    pub fn queries(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `program args` in `pod` with a `resolv.conf` naming `nameserver`
/// (and [`SEARCH`]); its output.
pub fn with_nameserver(
    pod: &Pod,
    dir: &Path,
    nameserver: IpAddr,
    program: &str,
    args: &[&str],
) -> anyhow::Result<Output> {
    let conf = dir.join(format!("resolv-{}-{nameserver}.conf", pod.name));
    std::fs::write(&conf, format!("nameserver {nameserver}\n{SEARCH}"))?;
    let mut command = pod.command("unshare")?.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"",
    ]);
    command = command.arg(&conf).arg(program).args(args);
    command.command.stdin(Stdio::null());
    command
        .output()
        .with_context(|| format!("{program} {args:?} in pod {}", pod.name))
}
