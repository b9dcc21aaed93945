//! The namespaced test node: node netns + bridge, pods, the agent.
use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    net::Ipv4Addr,
    os::{
        fd::AsRawFd,
        unix::process::{CommandExt as _, ExitStatusExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use weir_common::{EnrolledPod, counter, map_name};

use crate::{prereq, wait_for};

static NEXT_NODE: AtomicU32 = AtomicU32::new(0);
static LEFTOVERS: Once = Once::new();

/// Where test nodes keep configs and logs.
fn scratch_root() -> PathBuf {
    std::env::temp_dir().join("weir-tests")
}

/// The cgroup directory holding every test node's cgroups.
fn tests_cgroup_root() -> anyhow::Result<PathBuf> {
    Ok(prereq::cgroup2_root()?.join("weir-tests"))
}

fn bpffs_root() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/weir")
}

/// Runs a command to completion; an error carries its stderr.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    run("ip", args)
}

/// A command that runs inside network namespace `netns_path` (and, if
/// given, cgroup `cgroup`), entered between fork and exec.
pub struct NsCommand {
    pub command: Command,
    _netns: File,
    _procs: Option<File>,
}

impl NsCommand {
    pub fn new(
        program: &Path,
        netns_path: &Path,
        cgroup: Option<&Path>,
    ) -> anyhow::Result<NsCommand> {
        let netns =
            File::open(netns_path).with_context(|| format!("opening {}", netns_path.display()))?;
        let procs = match cgroup {
            Some(dir) => Some(
                OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))
                    .with_context(|| format!("opening {}/cgroup.procs", dir.display()))?,
            ),
            None => None,
        };
        let netns_fd = netns.as_raw_fd();
        let procs_fd = procs.as_ref().map(|file| file.as_raw_fd());
        let mut command = Command::new(program);
        // SAFETY: only async-signal-safe syscalls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if let Some(fd) = procs_fd {
                    // "0" moves the writing process into the cgroup.
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(NsCommand {
            command,
            _netns: netns,
            _procs: procs,
        })
    }

    pub fn arg(mut self, arg: impl AsRef<std::ffi::OsStr>) -> Self {
        self.command.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.command.args(args);
        self
    }

    pub fn envs<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<std::ffi::OsStr>,
        V: AsRef<std::ffi::OsStr>,
    {
        self.command.envs(vars);
        self
    }

    pub fn spawn(mut self) -> anyhow::Result<Child> {
        self.command.spawn().context("spawning in namespace")
    }

    pub fn output(mut self) -> anyhow::Result<Output> {
        self.command.output().context("running in namespace")
    }
}

/// An address family, for tests that run the same body over IPv4 and IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// Both, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The unspecified address of the family, for a server to bind.
    pub fn any(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0",
            Family::V6 => "::",
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// A pod: network namespace, `eth0` on the node's bridge, an IPv4 and an
/// IPv6 address (dual stack), a cgroup.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    /// Name under /run/netns.
    pub netns: String,
    pub ip: Ipv4Addr,
    /// `fd77:<node index>::<n>` on the same interface.
    pub ip6: std::net::Ipv6Addr,
    pub cgroup: PathBuf,
}

/// Sets a namespaced sysctl (`net.…`) inside the namespace at `netns`.
fn sysctl_in(netns: &Path, key: &str, value: &str) -> anyhow::Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let output = NsCommand::new(Path::new("/bin/sh"), netns, None)?
        .args(["-c", &format!("echo {value} > {path}")])
        .output()?;
    if !output.status.success() {
        bail!(
            "sysctl {key}={value} in {}: {}",
            netns.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

impl Pod {
    /// Sets a sysctl of the pod's network namespace (`net.…`).
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        sysctl_in(&self.netns_path(), key, value)
    }

    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    /// The pod's address in `family`.
    pub fn ip_of(&self, family: Family) -> std::net::IpAddr {
        match family {
            Family::V4 => self.ip.into(),
            Family::V6 => self.ip6.into(),
        }
    }

    /// `ip:port` (`[ip]:port` for IPv6) of the pod's address in `family`.
    pub fn addr(&self, family: Family, port: u16) -> String {
        std::net::SocketAddr::new(self.ip_of(family), port).to_string()
    }

    /// How a socket address of the pod in `family` starts, up to its port:
    /// `10.77.0.2:` or `[fd77:0::2]:` (to find `src=…` in a log line).
    pub fn addr_prefix(&self, family: Family) -> String {
        let addr = self.addr(family, 0);
        addr.strip_suffix('0').unwrap_or(&addr).to_string()
    }

    /// A command run inside the pod (its namespace and its cgroup), as a
    /// container's process would be.
    pub fn command(&self, program: impl AsRef<Path>) -> anyhow::Result<NsCommand> {
        NsCommand::new(program.as_ref(), &self.netns_path(), Some(&self.cgroup))
    }

    /// The test workload tool, inside the pod.
    pub fn podtool(&self) -> anyhow::Result<NsCommand> {
        self.command(prereq::podtool_binary()?)
    }

    /// Established TCP connections in the pod whose remote port is `port`:
    /// with an agent, its deliveries to the application listening there.
    pub fn connections_to_port(&self, port: u16) -> anyhow::Result<usize> {
        let filter = format!("( dport = :{port} )");
        let out = run(
            "ss",
            &["-N", &self.netns, "-Htn", "state", "established", &filter],
        )?;
        Ok(out.lines().filter(|line| !line.trim().is_empty()).count())
    }

    /// The `eth0` byte and packet counters: (tx_bytes, rx_bytes).
    pub fn eth0_bytes(&self) -> anyhow::Result<(u64, u64)> {
        let json = ip(&["-n", &self.netns, "-j", "-s", "link", "show", "eth0"])?;
        let value: serde_json::Value = serde_json::from_str(&json)?;
        let stats = &value[0]["stats64"];
        let tx = stats["tx"]["bytes"].as_u64().context("tx bytes")?;
        let rx = stats["rx"]["bytes"].as_u64().context("rx bytes")?;
        Ok((tx, rx))
    }
}

#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Names of the pods to enroll.
    pub enrolled: Vec<String>,
    pub accelerate: bool,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<String>,
    /// `--bpf-debug`: the programs' own logs in the agent's log.
    pub bpf_debug: bool,
    /// Pods (of `enrolled`) in STRICT mode.
    pub strict: Vec<String>,
    /// Meshed workloads elsewhere (pods of other nodes), with the service
    /// account this agent believes they have.
    pub remote: Vec<RemoteWorkload>,
    /// Built-in CA root (`weir ca init`); without it each agent makes its own.
    pub ca_dir: Option<PathBuf>,
    /// Istio CA instead of the built-in one.
    pub istio_ca: Option<IstioCa>,
    pub cert_ttl_seconds: Option<u64>,
    /// `ca.keep_unused_seconds`: how long a released pod's certificate stays.
    pub cert_keep_unused_seconds: Option<u64>,
    /// Services, as YAML entries under `services:`.
    pub services: Vec<String>,
    /// (pod, `namespace/hostname`): the pod backs that service.
    pub backs: Vec<(String, String)>,
    /// A control plane to take workloads and policies from.
    pub xds: Option<crate::xds_server::XdsEndpoint>,
    /// State-of-the-world instead of delta xDS.
    pub xds_sotw: bool,
    /// Authorization policies, as the YAML list under `policies:`.
    pub policies: Vec<String>,
    /// `same_node: mtls`: same-node meshed traffic through the destination's
    /// HBONE listener instead of the agent's default in-process hand-off.
    pub same_node_mtls: bool,
    /// Enroll pods from this Kubernetes API (a kubeconfig file).
    pub kubeconfig: Option<PathBuf>,
    /// `kubernetes.drain_seconds`.
    pub drain_seconds: Option<u64>,
    /// Top-level YAML appended to the config as is.
    pub extra_config: String,
    /// (pod, YAML map): the pod's labels, e.g. `{app: web, version: v1}`.
    pub labels: Vec<(String, String)>,
    /// `--reload-interval-ms` (default 100): how often the agent looks at
    /// its file, and whether a successor took its pins.
    pub reload_interval_ms: Option<u64>,
    /// Environment variables set for the agent's process (e.g. a `PATH`
    /// without iproute2).
    pub agent_env: Vec<(String, String)>,
    /// Enrolled pods whose DNS is not captured (`dns_capture: false`).
    pub dns_off: Vec<String>,
    /// `capture.tcp_stats: false`: no per-connection kernel telemetry.
    pub tcp_stats_off: bool,
    /// Another build of the agent to run (a benchmark's baseline), instead
    /// of the workspace's.
    pub agent_binary: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct RemoteWorkload {
    pub name: String,
    pub service_account: String,
    pub ips: Vec<std::net::IpAddr>,
}

impl RemoteWorkload {
    /// `pod` as a workload of the mesh (both its addresses), with its own
    /// service account.
    pub fn of(pod: &Pod) -> RemoteWorkload {
        RemoteWorkload {
            name: pod.name.clone(),
            service_account: pod.name.clone(),
            ips: vec![pod.ip.into(), pod.ip6.into()],
        }
    }
}

#[derive(Debug, Clone)]
pub struct IstioCa {
    pub address: String,
    pub root_cert: PathBuf,
    pub token_file: PathBuf,
    pub server_name: String,
}

impl AgentOptions {
    pub fn enroll(pods: &[&str]) -> AgentOptions {
        AgentOptions {
            enrolled: pods.iter().map(|pod| pod.to_string()).collect(),
            ..Default::default()
        }
    }
}

pub struct Agent {
    child: Child,
    pub log_path: PathBuf,
    pub config_path: PathBuf,
}

/// One node: a network namespace with a bridge, pods, maybe an agent.
pub struct TestNode {
    /// Unique per node in this machine: `wt<pid>x<n>`.
    pub id: String,
    /// Pods get `10.77.<index>.<n>`.
    pub index: u8,
    pub netns: String,
    pub cgroup: PathBuf,
    pub dir: PathBuf,
    pods: Vec<Pod>,
    agent: Option<Agent>,
    /// Agents a successor took over from, still draining.
    previous_agents: Vec<Agent>,
    torn_down: bool,
}

impl TestNode {
    /// A node whose pods are on `10.77.0.0/24`.
    pub fn new() -> anyhow::Result<TestNode> {
        TestNode::with_index(0)
    }

    pub fn with_index(index: u8) -> anyhow::Result<TestNode> {
        prereq::check()?;
        LEFTOVERS.call_once(remove_leftovers);
        let id = format!(
            "wt{}x{}",
            std::process::id(),
            NEXT_NODE.fetch_add(1, Ordering::Relaxed)
        );
        let cgroup = tests_cgroup_root()?.join(&id);
        let dir = scratch_root().join(&id);
        let mut node = TestNode {
            netns: format!("{id}-node"),
            id,
            index,
            cgroup,
            dir,
            pods: Vec::new(),
            agent: None,
            previous_agents: Vec::new(),
            torn_down: false,
        };
        node.build()
            .with_context(|| format!("building test node {}", node.id))?;
        Ok(node)
    }

    fn build(&mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        std::fs::create_dir_all(self.cgroup.join("pods"))?;
        let ns = self.netns.as_str();
        ip(&["netns", "add", ns])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("10.77.{}.1/24", self.index),
            "dev",
            "br0",
        ])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("fd77:{}::1/64", self.index),
            "dev",
            "br0",
            "nodad",
        ])?;
        ip(&["-n", ns, "link", "set", "br0", "up"])?;
        self.sysctl("net.ipv4.ip_forward", "1")?;
        self.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        Ok(())
    }

    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        sysctl_in(&self.netns_path(), key, value)
    }

    /// Adds a pod on the bridge. Pods are numbered from `.2`.
    pub fn add_pod(&mut self, name: &str) -> anyhow::Result<Pod> {
        let pod = self.declare_pod(name);
        self.create_pod(&pod)?;
        Ok(pod)
    }

    /// A pod with its name, addresses and namespace path, but no namespace
    /// yet (a pod the runtime has not created): [`Self::create_pod`] makes it.
    pub fn declare_pod(&mut self, name: &str) -> Pod {
        let number = self.pods.len() + 2;
        let pod = Pod {
            name: name.to_string(),
            netns: format!("{}-{name}", self.id),
            ip: Ipv4Addr::new(10, 77, self.index, number as u8),
            ip6: std::net::Ipv6Addr::new(
                0xfd77,
                u16::from(self.index),
                0,
                0,
                0,
                0,
                0,
                number as u16,
            ),
            cgroup: self.cgroup.join("pods").join(name),
        };
        // Listed now so that teardown removes whatever gets created.
        self.pods.push(pod.clone());
        pod
    }

    /// Creates a declared pod: its namespace, `eth0` on the bridge with its
    /// addresses and default route, and its cgroup.
    pub fn create_pod(&self, pod: &Pod) -> anyhow::Result<()> {
        let number = self
            .pods
            .iter()
            .position(|declared| declared.name == pod.name)
            .with_context(|| format!("pod {} was not declared", pod.name))?
            + 2;
        let node = self.netns.as_str();
        let veth = format!("vp{number}");
        let pod_ns = pod.netns.as_str();
        ip(&["netns", "add", pod_ns])?;
        ip(&[
            "-n", node, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
            pod_ns,
        ])?;
        ip(&["-n", node, "link", "set", &veth, "master", "br0", "up"])?;
        ip(&["-n", pod_ns, "link", "set", "lo", "up"])?;
        ip(&["-n", pod_ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            pod_ns,
            "addr",
            "add",
            &format!("{}/24", pod.ip),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            pod_ns,
            "route",
            "add",
            "default",
            "via",
            &format!("10.77.{}.1", self.index),
        ])?;
        // nodad: usable at once, no duplicate address detection delay.
        let ip6 = format!("{}/64", pod.ip6);
        ip(&["-n", pod_ns, "addr", "add", &ip6, "dev", "eth0", "nodad"])?;
        ip(&[
            "-n",
            pod_ns,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd77:{}::1", self.index),
        ])?;
        std::fs::create_dir_all(&pod.cgroup)?;
        Ok(())
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|pod| pod.name == name)
            .unwrap_or_else(|| panic!("no pod {name} on node {}", self.id))
    }

    /// The running agent's process id.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|agent| agent.child.id())
    }

    pub fn pin_dir(&self) -> PathBuf {
        bpffs_root().join(&self.id)
    }

    pub fn agent_cgroup(&self) -> PathBuf {
        self.cgroup.join("agent")
    }

    pub fn config_yaml(&self, options: &AgentOptions) -> String {
        let mut yaml = format!(
            "node: {id}\ninstance: {id}\ncgroup:\n  pods_parent: {parent}\n  agent: {agent}\ncapture:\n  accelerate: {accelerate}\n  tcp_stats: {tcp_stats}\n  exclude_ports: {ports:?}\n  exclude_cidrs: {cidrs:?}\npods:\n",
            id = self.id,
            parent = self.cgroup.display(),
            agent = self.agent_cgroup().display(),
            accelerate = options.accelerate,
            tcp_stats = !options.tcp_stats_off,
            ports = options.exclude_ports,
            cidrs = options.exclude_cidrs,
        );
        for name in &options.enrolled {
            let pod = self.pod(name);
            let mode = if options.strict.contains(name) {
                "STRICT"
            } else {
                "PERMISSIVE"
            };
            let backs: Vec<&String> = options
                .backs
                .iter()
                .filter(|(backer, _)| backer == name)
                .map(|(_, service)| service)
                .collect();
            let labels = options
                .labels
                .iter()
                .find(|(pod, _)| pod == name)
                .map_or("{}", |(_, labels)| labels.as_str());
            let dns = if options.dns_off.contains(name) {
                ", dns_capture: false"
            } else {
                ""
            };
            yaml.push_str(&format!(
                "  - {{name: {}, namespace: test, service_account: {}, netns: {}, ips: [{}, \"{}\"], mesh_mode: {mode}, services: {backs:?}, labels: {labels}{dns}}}\n",
                pod.name,
                pod.name,
                pod.netns_path().display(),
                pod.ip,
                pod.ip6
            ));
        }
        if options.same_node_mtls {
            yaml.push_str("same_node: mtls\n");
        }
        if let Some(xds) = &options.xds {
            yaml.push_str(&format!(
                "xds: {{address: \"{}\", root_cert: {}, token_file: {}, server_name: {}, mode: {}}}\n",
                xds.address,
                xds.root_cert.display(),
                xds.token_file.display(),
                xds.server_name,
                if options.xds_sotw { "sotw" } else { "delta" }
            ));
        }
        yaml.push_str("services:\n");
        for service in &options.services {
            yaml.push_str(&format!("  - {service}\n"));
        }
        yaml.push_str("policies:\n");
        for policy in &options.policies {
            yaml.push_str(&format!("  - {policy}\n"));
        }
        yaml.push_str("workloads:\n");
        for workload in &options.remote {
            yaml.push_str(&format!(
                "  - {{name: {}, namespace: test, service_account: {}, ips: {:?}}}\n",
                workload.name,
                workload.service_account,
                workload
                    .ips
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
            ));
        }
        if let Some(kubeconfig) = &options.kubeconfig {
            yaml.push_str(&format!(
                "kubernetes: {{kubeconfig: {}, proc_root: /proc, drain_seconds: {}}}\n",
                kubeconfig.display(),
                options.drain_seconds.unwrap_or(20)
            ));
        }
        yaml.push_str("ca:\n");
        if let Some(dir) = &options.ca_dir {
            yaml.push_str(&format!(
                "  root_cert: {}\n  root_key: {}\n",
                dir.join("root.pem").display(),
                dir.join("root-key.pem").display()
            ));
        }
        if let Some(ttl) = options.cert_ttl_seconds {
            yaml.push_str(&format!("  cert_ttl_seconds: {ttl}\n"));
        }
        if let Some(keep) = options.cert_keep_unused_seconds {
            yaml.push_str(&format!("  keep_unused_seconds: {keep}\n"));
        }
        if let Some(istio) = &options.istio_ca {
            yaml.push_str(&format!(
                "  istio: {{address: \"{}\", root_cert: {}, token_file: {}, server_name: {}}}\n",
                istio.address,
                istio.root_cert.display(),
                istio.token_file.display(),
                istio.server_name
            ));
        }
        yaml.push_str(&options.extra_config);
        yaml
    }

    /// Starts the agent in the node's namespace and waits until it is ready.
    pub fn start_agent(&mut self, options: &AgentOptions) -> anyhow::Result<()> {
        if self.agent.is_some() {
            bail!("agent already running on {}", self.id);
        }
        let config_path = self.dir.join("agent.yaml");
        std::fs::write(&config_path, self.config_yaml(options))?;
        let log_path = self.dir.join("agent.log");
        let log = File::create(&log_path)?;
        let reload_interval = options.reload_interval_ms.unwrap_or(100).to_string();
        let binary = match &options.agent_binary {
            Some(binary) => binary.clone(),
            None => prereq::agent_binary()?,
        };
        let child = NsCommand::new(&binary, &self.netns_path(), None)?
            .args(["run", "--config"])
            .arg(&config_path)
            .args(["--reload-interval-ms", &reload_interval])
            .args(options.bpf_debug.then_some("--bpf-debug"))
            .envs(options.agent_env.iter().map(|(key, value)| (key, value)))
            .spawn_with_output(log)?;
        self.agent = Some(Agent {
            child,
            log_path,
            config_path,
        });
        self.wait_for_log("agent ready", 1, Duration::from_secs(20))
    }

    /// Starts a second agent of the same instance beside the running one (a
    /// hand-over, as a DaemonSet update with surge does) and waits until it
    /// is ready. The first keeps draining; see [`Self::stop_previous_agent`].
    pub fn start_successor(&mut self) -> anyhow::Result<()> {
        let previous = self.agent.take().context("no agent running")?;
        let config_path = previous.config_path.clone();
        self.previous_agents.push(previous);
        let log_path = self
            .dir
            .join(format!("agent-{}.log", self.previous_agents.len() + 1));
        let child = NsCommand::new(&prereq::agent_binary()?, &self.netns_path(), None)?
            .args(["run", "--config"])
            .arg(&config_path)
            .args(["--reload-interval-ms", "100"])
            .spawn_with_output(File::create(&log_path)?)?;
        self.agent = Some(Agent {
            child,
            log_path,
            config_path,
        });
        self.wait_for_log("agent ready", 1, Duration::from_secs(20))
    }

    /// The log of the agent a successor took over from.
    pub fn previous_agent_log(&self) -> String {
        self.previous_agents
            .last()
            .and_then(|agent| std::fs::read_to_string(&agent.log_path).ok())
            .unwrap_or_default()
    }

    /// Whether the agent a successor took over from is still running.
    pub fn previous_agent_running(&mut self) -> bool {
        self.previous_agents
            .last_mut()
            .is_some_and(|agent| matches!(agent.child.try_wait(), Ok(None)))
    }

    /// Sends SIGTERM to the agent a successor took over from, without
    /// waiting for it to exit (it drains first).
    pub fn signal_previous_agent(&self) -> anyhow::Result<()> {
        let agent = self.previous_agents.last().context("no previous agent")?;
        // SAFETY: sending a signal to our own child.
        if unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) } != 0 {
            bail!("SIGTERM: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits for the agent a successor took over from to exit.
    pub fn wait_previous_agent(&mut self, deadline: Duration) -> anyhow::Result<ExitStatus> {
        let agent = self
            .previous_agents
            .last_mut()
            .context("no previous agent")?;
        wait_for("the previous agent to exit", deadline, || {
            agent.child.try_wait().ok().flatten()
        })
    }

    /// A pod sandbox as a container runtime makes one: a process in the
    /// pod's network namespace, in a cgroup whose path names the pod's UID
    /// (kubelet's cgroupfs layout), which is how the agent finds the pod.
    pub fn start_sandbox(&self, pod: &Pod, uid: &str) -> anyhow::Result<Child> {
        let cgroup = self
            .cgroup
            .join("kubepods")
            .join("besteffort")
            .join(format!("pod{uid}"));
        std::fs::create_dir_all(&cgroup)?;
        NsCommand::new(Path::new("/bin/sleep"), &pod.netns_path(), Some(&cgroup))?
            .arg("infinity")
            .spawn()
    }

    /// Replaces the agent's config (atomically: written beside it, then
    /// renamed into place, as a ConfigMap update or an editor does, so the
    /// agent applies it at once) and waits until it has been applied.
    pub fn reconfigure_agent(&mut self, options: &AgentOptions) -> anyhow::Result<()> {
        let agent = self.agent.as_ref().context("no agent running")?;
        let before = self.agent_log().matches("config reloaded").count();
        let next = agent.config_path.with_extension("yaml.next");
        std::fs::write(&next, self.config_yaml(options))?;
        std::fs::rename(&next, &agent.config_path)?;
        self.wait_for_log("config reloaded", before + 1, Duration::from_secs(10))
    }

    /// Waits until `needle` appears `times` times in the agent's log; fails at
    /// once if the agent exits.
    pub fn wait_for_log(
        &mut self,
        needle: &str,
        times: usize,
        deadline: Duration,
    ) -> anyhow::Result<()> {
        let what = format!("{needle:?} x{times} in the agent log");
        let mut exited = None;
        let found = wait_for(&what, deadline, || {
            if self.agent_log().matches(needle).count() >= times {
                return Some(true);
            }
            if let Some(agent) = self.agent.as_mut()
                && let Ok(Some(status)) = agent.child.try_wait()
            {
                exited = Some(status);
                return Some(false);
            }
            None
        });
        match found {
            Ok(true) => Ok(()),
            Ok(false) => bail!(
                "the agent exited ({:?}) before {what}; log:\n{}",
                exited,
                self.agent_log()
            ),
            Err(error) => bail!("{error}; agent log:\n{}", self.agent_log()),
        }
    }

    pub fn agent_log(&self) -> String {
        self.agent
            .as_ref()
            .and_then(|agent| std::fs::read_to_string(&agent.log_path).ok())
            .or_else(|| std::fs::read_to_string(self.dir.join("agent.log")).ok())
            .unwrap_or_default()
    }

    /// The agent's resident memory, in KiB (VmRSS).
    pub fn agent_rss_kib(&self) -> anyhow::Result<u64> {
        let agent = self.agent.as_ref().context("no agent running")?;
        let status = std::fs::read_to_string(format!("/proc/{}/status", agent.child.id()))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.split_whitespace().next()?.parse().ok())
            .context("VmRSS")
    }

    /// Stops the agent with SIGTERM and returns its exit status.
    pub fn stop_agent(&mut self) -> anyhow::Result<ExitStatus> {
        let mut agent = self.agent.take().context("no agent running")?;
        stop_child(&mut agent.child, Duration::from_secs(10))
    }

    /// Kills the agent with SIGKILL (no cleanup on its side).
    pub fn kill_agent(&mut self) -> anyhow::Result<()> {
        let mut agent = self.agent.take().context("no agent running")?;
        agent.child.kill()?;
        agent.child.wait()?;
        Ok(())
    }

    /// Waits until the agent reports ready (`:15021/healthz/ready` is 200:
    /// its control plane's first state has arrived).
    pub fn wait_ready(&self) -> anyhow::Result<()> {
        crate::wait_for("readiness", Duration::from_secs(10), || {
            matches!(self.http_get(15021, "/healthz/ready"), Ok((200, _))).then_some(())
        })
    }

    /// An HTTP/1.1 GET to `127.0.0.1:<port><path>` inside the node's
    /// namespace (the agent's admin endpoints): (status, body).
    pub fn http_get(&self, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
        use std::io::{Read as _, Write as _};
        let netns = File::open(self.netns_path())?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        std::thread::spawn(move || -> anyhow::Result<(u16, String)> {
            // SAFETY: only this thread enters the namespace.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
            stream.write_all(request.as_bytes())?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            let status = response
                .split_whitespace()
                .nth(1)
                .and_then(|code| code.parse().ok())
                .context("no HTTP status")?;
            let body = response
                .split_once("\r\n\r\n")
                .map(|(_, body)| body.to_string())
                .unwrap_or_default();
            Ok((status, body))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("http thread panicked"))?
    }

    /// Writes `text` as the agent's config file in place, as an operator's
    /// edit would (the agent applies it once it has settled).
    pub fn write_agent_config(&self, text: &str) -> anyhow::Result<()> {
        let agent = self.agent.as_ref().context("no agent running")?;
        std::fs::write(&agent.config_path, text)?;
        Ok(())
    }

    /// Creates a built-in CA root in `dir` with `weir ca init`.
    pub fn ca_init(dir: &Path) -> anyhow::Result<()> {
        let output = Command::new(prereq::agent_binary()?)
            .args(["ca", "init"])
            .arg(dir)
            .output()?;
        if !output.status.success() {
            bail!("weir ca init: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(())
    }

    /// Lines of the agent's log that contain every one of `needles`.
    pub fn log_lines(&self, needles: &[&str]) -> Vec<String> {
        self.agent_log()
            .lines()
            .filter(|line| needles.iter().all(|needle| line.contains(needle)))
            .map(str::to_string)
            .collect()
    }

    /// The eBPF counters, read from the agent's pinned map.
    pub fn counters(&self) -> anyhow::Result<BTreeMap<&'static str, u64>> {
        let path = self.pin_dir().join("maps").join(map_name::COUNTERS);
        let data = aya::maps::MapData::from_pin(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let map: aya::maps::PerCpuArray<_, u64> =
            aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?;
        let mut counters = BTreeMap::new();
        for (index, name) in counter::NAMES.iter().enumerate() {
            let values = map.get(&(index as u32), 0)?;
            counters.insert(*name, values.iter().sum());
        }
        Ok(counters)
    }

    pub fn counter(&self, name: &str) -> anyhow::Result<u64> {
        self.counters()?
            .get(name)
            .copied()
            .with_context(|| format!("no counter {name}"))
    }

    /// The enrolled-pods map: netns cookie → entry.
    pub fn enrolled_pods(&self) -> anyhow::Result<BTreeMap<u64, EnrolledPod>> {
        let path = self.pin_dir().join("maps").join(map_name::ENROLLED_PODS);
        let data = aya::maps::MapData::from_pin(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let map: aya::maps::HashMap<_, u64, EnrolledPod> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))?;
        Ok(map.iter().filter_map(Result::ok).collect())
    }

    /// Removes everything this node created; `Drop` calls it too.
    pub fn teardown(&mut self) -> anyhow::Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let mut errors = Vec::new();
        for mut agent in self.previous_agents.drain(..).chain(self.agent.take()) {
            if let Err(error) = stop_child(&mut agent.child, Duration::from_secs(10)) {
                errors.push(format!("stopping agent: {error}"));
            }
        }
        let mut namespaces: Vec<String> = self.pods.iter().map(|pod| pod.netns.clone()).collect();
        namespaces.push(self.netns.clone());
        if let Err(error) = remove_node_resources(&self.id, &self.cgroup, &namespaces) {
            errors.push(error.to_string());
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("teardown of {}: {}", self.id, errors.join("; "))
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Err(error) = self.teardown() {
            eprintln!("{error}");
        }
    }
}

trait SpawnWithOutput {
    fn spawn_with_output(self, log: File) -> anyhow::Result<Child>;
}

impl SpawnWithOutput for NsCommand {
    fn spawn_with_output(mut self, log: File) -> anyhow::Result<Child> {
        let stderr = log.try_clone()?;
        self.command
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .stdin(Stdio::null());
        self.spawn()
    }
}

/// SIGTERM, then SIGKILL if it has not exited by `deadline`.
pub fn stop_child(child: &mut Child, deadline: Duration) -> anyhow::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    match wait_for("agent exit", deadline, || child.try_wait().ok().flatten()) {
        Ok(status) => Ok(status),
        Err(_) => {
            child.kill()?;
            let status = child.wait()?;
            bail!(
                "agent ignored SIGTERM for {deadline:?}; killed ({:?})",
                status.signal()
            )
        }
    }
}

/// Kills the processes of a cgroup tree, then removes it bottom-up.
fn remove_cgroup_tree(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let mut children: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.is_dir())
        .collect();
    children.sort();
    for child in children {
        remove_cgroup_tree(&child)?;
    }
    wait_for(
        &format!("{} to empty", dir.display()),
        Duration::from_secs(5),
        || {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            procs.trim().is_empty().then_some(())
        },
    )?;
    std::fs::remove_dir(dir).with_context(|| format!("rmdir {}", dir.display()))
}

fn remove_netns(name: &str) -> anyhow::Result<()> {
    if !Path::new("/run/netns").join(name).exists() {
        return Ok(());
    }
    if let Ok(pids) = ip(&["netns", "pids", name]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|pid| pid.parse::<i32>().ok())
        {
            // SAFETY: killing a leftover test process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    ip(&["netns", "del", name]).map(|_| ())
}

fn remove_node_resources(id: &str, cgroup: &Path, namespaces: &[String]) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    if let Err(error) = remove_cgroup_tree(cgroup) {
        errors.push(error.to_string());
    }
    for name in namespaces {
        if let Err(error) = remove_netns(name) {
            errors.push(error.to_string());
        }
    }
    let pins = bpffs_root().join(id);
    if pins.exists()
        && let Err(error) = std::fs::remove_dir_all(&pins)
    {
        errors.push(format!("removing {}: {error}", pins.display()));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("{}", errors.join("; "))
    }
}

/// The pid in a `wt<pid>x<n>` name.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix("wt")?.split('x').next()?.parse().ok()
}

fn is_leftover(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| !Path::new("/proc").join(pid.to_string()).exists())
}

/// Removes what a killed test run left behind (its pid is gone).
fn remove_leftovers() {
    let list = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|entry| entry.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut ids: Vec<String> = list(Path::new("/run/netns"))
        .into_iter()
        .filter_map(|name| name.split('-').next().map(str::to_string))
        .collect();
    if let Ok(root) = tests_cgroup_root() {
        ids.extend(list(&root));
    }
    ids.extend(list(&bpffs_root()));
    ids.sort();
    ids.dedup();
    for id in ids.into_iter().filter(|id| is_leftover(id)) {
        let namespaces: Vec<String> = list(Path::new("/run/netns"))
            .into_iter()
            .filter(|name| name.starts_with(&format!("{id}-")))
            .collect();
        let cgroup = tests_cgroup_root()
            .map(|root| root.join(&id))
            .unwrap_or_default();
        eprintln!("removing leftovers of a killed test run: {id}");
        if let Err(error) = remove_node_resources(&id, &cgroup, &namespaces) {
            eprintln!("  {error}");
        }
    }
}

/// Joins two nodes with a "wire" veth and routes each node's pod subnet
/// through it.
pub fn connect_nodes(a: &TestNode, b: &TestNode) -> anyhow::Result<()> {
    let wire = format!("wire{}", b.index);
    let peer = format!("wire{}", a.index);
    ip(&[
        "-n", &a.netns, "link", "add", &wire, "type", "veth", "peer", "name", &peer, "netns",
        &b.netns,
    ])?;
    let (addr_a, addr_b) = ("192.168.77.1", "192.168.77.2");
    ip(&[
        "-n",
        &a.netns,
        "addr",
        "add",
        &format!("{addr_a}/30"),
        "dev",
        &wire,
    ])?;
    ip(&[
        "-n",
        &b.netns,
        "addr",
        "add",
        &format!("{addr_b}/30"),
        "dev",
        &peer,
    ])?;
    // IPv6 on the wire too, nodad: usable at once.
    let (addr6_a, addr6_b) = ("fd77:ffff::1", "fd77:ffff::2");
    for (netns, link, addr) in [(&a.netns, &wire, addr6_a), (&b.netns, &peer, addr6_b)] {
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{addr}/126"),
            "dev",
            link,
            "nodad",
        ])?;
    }
    ip(&["-n", &a.netns, "link", "set", &wire, "up"])?;
    ip(&["-n", &b.netns, "link", "set", &peer, "up"])?;
    ip(&[
        "-n",
        &a.netns,
        "-6",
        "route",
        "add",
        &format!("fd77:{}::/64", b.index),
        "via",
        addr6_b,
    ])?;
    ip(&[
        "-n",
        &b.netns,
        "-6",
        "route",
        "add",
        &format!("fd77:{}::/64", a.index),
        "via",
        addr6_a,
    ])?;
    ip(&[
        "-n",
        &a.netns,
        "route",
        "add",
        &format!("10.77.{}.0/24", b.index),
        "via",
        addr_b,
    ])?;
    ip(&[
        "-n",
        &b.netns,
        "route",
        "add",
        &format!("10.77.{}.0/24", a.index),
        "via",
        addr_a,
    ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_test_names() {
        assert_eq!(owner_pid("wt1234x7"), Some(1234));
        assert_eq!(owner_pid("wt1234x7-node"), Some(1234));
        assert_eq!(owner_pid("demo"), None);
    }
}
