//! The demo node for the agent's embedded default config: a node namespace
//! (`weir-demo-node`, bridge 10.44.0.1/24) with two pods, `client`
//! (10.44.0.2) and `server` (10.44.0.3), each in its own cgroup under
//! `<cgroup v2 root>/weir-demo/`. The client calls the server every second.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use weir_tests::{node::NsCommand, prereq, step};

/// `weir-demo` (run by `cargo xtask demo`).
#[derive(Parser)]
#[command(
    name = "weir-demo",
    about = "A local demo node: the agent, two pods, traffic between them"
)]
struct Cli {
    /// How long to run the traffic; 0 runs until Ctrl-C.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
}

fn main() -> anyhow::Result<()> {
    run(Cli::parse().seconds)
}

const NODE: &str = "weir-demo-node";
const PODS: [(&str, &str); 2] = [("client", "10.44.0.2"), ("server", "10.44.0.3")];

fn ip(args: &[&str]) -> anyhow::Result<()> {
    weir_tests::node::run("ip", args).map(|_| ())
}

fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

fn pod_netns(pod: &str) -> String {
    format!("weir-demo-{pod}")
}

fn cgroup_dir() -> anyhow::Result<PathBuf> {
    Ok(prereq::cgroup2_root()?.join("weir-demo"))
}

fn teardown() {
    if let Ok(dir) = cgroup_dir()
        && dir.exists()
    {
        for pod in PODS.map(|(name, _)| name).iter().chain(&["agent"]) {
            let sub = dir.join(pod);
            let _ = std::fs::write(sub.join("cgroup.kill"), "1");
            let deadline = Instant::now() + Duration::from_secs(3);
            while std::fs::remove_dir(&sub).is_err() && sub.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_dir(&dir);
    }
    for (pod, _) in PODS {
        let _ = weir_tests::node::run("ip", &["netns", "del", &pod_netns(pod)]);
    }
    let _ = weir_tests::node::run("ip", &["netns", "del", NODE]);
}

fn build_node() -> anyhow::Result<()> {
    ip(&["netns", "add", NODE])?;
    ip(&["-n", NODE, "link", "set", "lo", "up"])?;
    ip(&["-n", NODE, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", NODE, "addr", "add", "10.44.0.1/24", "dev", "br0"])?;
    ip(&["-n", NODE, "link", "set", "br0", "up"])?;
    let cgroups = cgroup_dir()?;
    for (index, (pod, address)) in PODS.iter().enumerate() {
        let netns = pod_netns(pod);
        let veth = format!("veth{index}");
        ip(&["netns", "add", &netns])?;
        ip(&[
            "-n", NODE, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
            &netns,
        ])?;
        ip(&["-n", NODE, "link", "set", &veth, "master", "br0", "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &netns, "route", "add", "default", "via", "10.44.0.1"])?;
        std::fs::create_dir_all(cgroups.join(pod))?;
    }
    Ok(())
}

fn in_pod(pod: &str) -> anyhow::Result<NsCommand> {
    NsCommand::new(
        &prereq::podtool_binary()?,
        &netns_path(&pod_netns(pod)),
        Some(&cgroup_dir()?.join(pod)),
    )
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(seconds: u64) -> anyhow::Result<()> {
    prereq::check().context("the demo needs what the tests need")?;
    teardown();
    let result = run_demo(seconds);
    teardown();
    result
}

fn run_demo(seconds: u64) -> anyhow::Result<()> {
    step(
        "building the demo node: netns weir-demo-node, pods client (10.44.0.2) and server (10.44.0.3)",
    );
    build_node()?;
    let _server = KillOnDrop(
        in_pod("server")?
            .args(["serve", "--port", "8080"])
            .spawn_quiet()?,
    );

    let log_path = std::env::temp_dir().join("weir-demo-agent.log");
    step(&format!(
        "starting `weir run` (embedded demo config) in the node namespace; log: {}",
        log_path.display()
    ));
    let log = std::fs::File::create(&log_path)?;
    let mut agent = NsCommand::new(&prereq::agent_binary()?, &netns_path(NODE), None)?.arg("run");
    agent
        .command
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log));
    let mut agent = agent.spawn()?;
    let ready = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("agent ready") {
            break;
        }
        if let Some(status) = agent.try_wait()? {
            bail!("the agent exited ({status}):\n{text}");
        }
        if ready.elapsed() > Duration::from_secs(20) {
            let _ = agent.kill();
            bail!("the agent did not become ready:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let weir = prereq::agent_binary()?;
    println!();
    println!("Weir demo node is up. While traffic runs, in another terminal:");
    let node = format!("nsenter --net={}", netns_path(NODE).display());
    let binary = weir.display();
    let cgroups = cgroup_dir()?;
    let cgroups = cgroups.display();
    for (command, what) in [
        (
            format!("{node} {binary} trace"),
            "every flow, live: captured by eBPF, then the proxy's verdict",
        ),
        (
            format!("{binary} bpf --instance demo"),
            "what the agent loaded and pinned, with bpftool commands",
        ),
        (
            format!("{binary} counters --instance demo"),
            "the eBPF capture counters",
        ),
        (
            format!("tail -f {}", log_path.display()),
            "the agent's log: one line per proxied connection",
        ),
        (
            format!("bpftool cgroup show {cgroups}"),
            "the cgroup attachments",
        ),
        (
            "bpftool map dump pinned /sys/fs/bpf/weir/demo/maps/ENROLLED_PODS".into(),
            "the enrolled pods",
        ),
        (
            "tc -n weir-demo-server filter show dev eth0 ingress".into(),
            "the inbound classifier",
        ),
        (
            format!("{node} curl -s localhost:15000/config_dump"),
            "pods, identities, certificates",
        ),
    ] {
        println!("  {command}\n      # {what}");
    }
    println!();

    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let _ = ctrlc_flag(flag);
    let started = Instant::now();
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed)
        && (seconds == 0 || started.elapsed() < Duration::from_secs(seconds))
    {
        round += 1;
        let output = in_pod("client")?
            .args(["send", "--to", "10.44.0.3:8080", "--bytes", "65536"])
            .output()?;
        let line = String::from_utf8_lossy(&output.stdout);
        println!("client -> server #{round}: {}", line.trim());
        std::thread::sleep(Duration::from_secs(1));
    }

    let counters = Command::new(&weir)
        .args(["counters", "--instance", "demo"])
        .output()?;
    println!(
        "\neBPF counters:\n{}",
        String::from_utf8_lossy(&counters.stdout)
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.id() as libc::pid_t, libc::SIGTERM) };
    let status = agent.wait()?;
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    println!("agent log (last lines):");
    for line in log
        .lines()
        .rev()
        .take(6)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        println!("  {line}");
    }
    if !status.success() {
        bail!("the agent exited with {status}");
    }
    step("demo done; node, pods, cgroups and pins removed");
    Ok(())
}

trait SpawnQuiet {
    fn spawn_quiet(self) -> anyhow::Result<Child>;
}

impl SpawnQuiet for NsCommand {
    fn spawn_quiet(mut self) -> anyhow::Result<Child> {
        self.command.stdout(Stdio::null());
        self.spawn()
    }
}

/// Sets `flag` on SIGINT (the demo then stops cleanly).
fn ctrlc_flag(flag: Arc<AtomicBool>) -> anyhow::Result<()> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    let _ = FLAG.set(flag);
    extern "C" fn on_sigint(_: i32) {
        if let Some(flag) = FLAG.get() {
            flag.store(true, Ordering::Relaxed);
        }
    }
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    Ok(())
}
