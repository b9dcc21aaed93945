//! `cargo xtask bench`: pod-to-pod TCP throughput and 1-byte round-trip
//! latency on a namespaced node, in three modes measured in the same run:
//! direct (no agent), through the agent, through the agent with sk_msg
//! acceleration. Printed as ratios against direct. Not a test: nothing here
//! asserts a timing.
use anyhow::{Context as _, bail};
use std::io::{BufRead as _, BufReader};

use weir_tests::{AgentOptions, Pod, RemoteWorkload, Server, TestNode, connect_nodes};

use weir_tests::step;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Direct,
    Proxied,
    Accelerated,
    HandOff,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Proxied => "mTLS hop",
            Mode::Accelerated => "mTLS+accel",
            Mode::HandOff => "hand-off",
        }
    }
}

struct Result {
    mode: Mode,
    gbit_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

/// `count` 1-byte round trips from `pod` to the echo server at `to`:
/// podtool's report (`p50_us`, `p99_us`, `max_us`).
pub fn pingpong(pod: &Pod, to: &str, count: u64) -> anyhow::Result<serde_json::Value> {
    podtool_json(
        pod,
        &["pingpong", "--to", to, "--count", &count.to_string()],
    )
}

pub fn podtool_json(pod: &Pod, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let output = pod.podtool()?.args(args).output()?;
    if !output.status.success() {
        bail!(
            "podtool {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .with_context(|| format!("podtool output {stdout:?}"))
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn measure(mode: Mode, bytes: u64, round_trips: u64, repeat: usize) -> anyhow::Result<Result> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("client")?;
    let b = node.add_pod("server")?;
    let _sink = Server::start(&b, 9000, "sink")?;
    let _echo = Server::start(&b, 9001, "echo")?;
    if mode != Mode::Direct {
        node.start_agent(&AgentOptions {
            accelerate: mode == Mode::Accelerated,
            same_node_mtls: mode != Mode::HandOff,
            ..AgentOptions::enroll(&["client", "server"])
        })?;
    }
    let sink = format!("{}:9000", b.ip);
    let echo = format!("{}:9001", b.ip);
    let (mut throughput, mut p50, mut p99) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeat {
        let bulk = podtool_json(&a, &["bulk", "--to", &sink, "--bytes", &bytes.to_string()])?;
        throughput.push(bulk["gbit_per_s"].as_f64().unwrap_or(0.0));
        let ping = pingpong(&a, &echo, round_trips)?;
        p50.push(ping["p50_us"].as_f64().unwrap_or(0.0));
        p99.push(ping["p99_us"].as_f64().unwrap_or(0.0));
    }
    if mode != Mode::Direct {
        let captured = node.counter("connect_captured")?;
        if captured < 2 * repeat as u64 {
            bail!("{}: only {captured} connections were captured", mode.name());
        }
        if mode == Mode::Accelerated && node.counter("accel_redirected")? == 0 {
            bail!("agent+accel: no message was redirected");
        }
    }
    Ok(Result {
        mode,
        gbit_per_s: median(throughput),
        p50_us: median(p50),
        p99_us: median(p99),
    })
}

/// Points the harness at the release builds of the agent, podtool and httptool.
pub fn use_release_binaries() -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let release = exe
        .parent()
        .and_then(|profile| profile.parent())
        .map(|target| target.join("release"))
        .context("locating target/release")?;
    // SAFETY: set before any thread is started.
    unsafe {
        std::env::set_var("WEIR_BIN", release.join("weir"));
        std::env::set_var("PODTOOL_BIN", release.join("podtool"));
        std::env::set_var("HTTPTOOL_BIN", release.join("httptool"));
    }
    Ok(())
}

pub fn run(bytes: u64, round_trips: u64, repeat: usize) -> anyhow::Result<()> {
    use_release_binaries()?;
    run_same_node(bytes, round_trips, repeat)?;
    run_cross_node(bytes, round_trips, repeat)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| value.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Applying a full push of 10,000 workloads and 1,000 services, then a
/// single-workload delta, through the agent's own xDS state and mesh tables.
pub fn run_state_scale() -> anyhow::Result<()> {
    use prost::Message as _;
    use weir_agent::xds::{
        ADDRESS_TYPE, XdsState,
        proto::{
            envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource},
            istio::workload,
        },
    };
    const WORKLOADS: usize = 10_000;
    const SERVICES: usize = 1_000;
    step(&format!(
        "state scale: {WORKLOADS} workloads and {SERVICES} services"
    ));
    let resource = |name: String, address: workload::Address| Resource {
        version: "1".into(),
        resource: Some(prost_types::Any {
            type_url: ADDRESS_TYPE.into(),
            value: address.encode_to_vec(),
        }),
        name,
        aliases: Vec::new(),
    };
    let service_name = |i: usize| format!("bench/svc-{i}.bench.svc.cluster.local");
    let workload_address = |i: usize, generation: u8| workload::Address {
        r#type: Some(workload::address::Type::Workload(workload::Workload {
            uid: format!("Kubernetes//Pod/bench/pod-{i}"),
            name: format!("pod-{i}"),
            namespace: "bench".into(),
            addresses: vec![vec![10, 100 + (i >> 16) as u8, (i >> 8) as u8, i as u8]],
            service_account: format!("sa-{}", i % 100),
            node: format!("node-{}", i % 50),
            services: [(
                service_name(i % SERVICES),
                workload::PortList {
                    ports: vec![workload::Port {
                        service_port: 80,
                        target_port: 8080 + u32::from(generation),
                        ..Default::default()
                    }],
                },
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        })),
    };
    let mut resources: Vec<Resource> = (0..WORKLOADS)
        .map(|i| {
            resource(
                format!("Kubernetes//Pod/bench/pod-{i}"),
                workload_address(i, 0),
            )
        })
        .collect();
    resources.extend((0..SERVICES).map(|i| {
        resource(
            service_name(i),
            workload::Address {
                r#type: Some(workload::address::Type::Service(workload::Service {
                    name: format!("svc-{i}"),
                    namespace: "bench".into(),
                    hostname: format!("svc-{i}.bench.svc.cluster.local"),
                    addresses: vec![workload::NetworkAddress {
                        network: String::new(),
                        address: vec![10, 96, (i >> 8) as u8, i as u8],
                    }],
                    ports: vec![workload::Port {
                        service_port: 80,
                        target_port: 8080,
                        ..Default::default()
                    }],
                    ..Default::default()
                })),
            },
        )
    }));
    let full = DeltaDiscoveryResponse {
        resources,
        type_url: ADDRESS_TYPE.into(),
        nonce: "1".into(),
        ..Default::default()
    };
    let store = std::sync::Arc::new(weir_agent::state::Store::default());
    let state = XdsState::new(
        &weir_agent::xds::convert::NodeContext::new("cluster.local", ""),
        store.clone(),
    );

    let rss_before = rss_kib();
    let started = std::time::Instant::now();
    let outcome = state.apply(&full);
    let full_time = started.elapsed();
    let rss_after = rss_kib();
    if !outcome.errors.is_empty() || outcome.applied != WORKLOADS + SERVICES {
        bail!(
            "full push: {} applied, errors {:?}",
            outcome.applied,
            outcome.errors.first()
        );
    }
    drop(full);

    let delta = DeltaDiscoveryResponse {
        resources: vec![resource(
            "Kubernetes//Pod/bench/pod-7".into(),
            workload_address(7, 1),
        )],
        type_url: ADDRESS_TYPE.into(),
        nonce: "2".into(),
        ..Default::default()
    };
    // The median of many deltas, alternating the workload's target port so
    // each one is a real change.
    let mut deltas: Vec<std::time::Duration> = (0..201u8)
        .map(|round| {
            let delta = DeltaDiscoveryResponse {
                resources: vec![resource(
                    "Kubernetes//Pod/bench/pod-7".into(),
                    workload_address(7, 1 + round % 2),
                )],
                ..delta.clone()
            };
            let started = std::time::Instant::now();
            state.apply(&delta);
            started.elapsed()
        })
        .collect();
    deltas.sort();
    let delta_time = deltas[deltas.len() / 2];
    let vip = "10.96.0.7:80".parse()?;
    let lookups = 1_000_000u32;
    let started = std::time::Instant::now();
    for i in 0..lookups {
        let ip = std::net::IpAddr::from([10, 100, (i >> 8) as u8 & 0x1f, i as u8]);
        std::hint::black_box(store.workload(ip));
    }
    let lookup_time = started.elapsed() / lookups;
    let endpoints = store
        .service(vip)
        .map(|service| service.endpoints.len())
        .unwrap_or(0);
    if endpoints != WORKLOADS / SERVICES {
        bail!("service 7 has {endpoints} endpoints");
    }
    println!(
        "\nstate scale ({WORKLOADS} workloads, {SERVICES} services; xDS apply into the store, indexes included)"
    );
    println!(
        "  full push:             {:>8.1} ms (target < 100 ms), resident memory +{:.1} MiB (target < 64 MiB)",
        full_time.as_secs_f64() * 1e3,
        (rss_after.saturating_sub(rss_before)) as f64 / 1024.0
    );
    println!(
        "  single-workload delta: {:>8.3} ms (target < 1 ms; median of {})",
        delta_time.as_secs_f64() * 1e3,
        deltas.len()
    );
    println!(
        "  address lookup:        {:>8.0} ns (the connection path's read)",
        lookup_time.as_secs_f64() * 1e9
    );
    Ok(())
}

fn run_same_node(bytes: u64, round_trips: u64, repeat: usize) -> anyhow::Result<()> {
    let mut results = Vec::new();
    for mode in [
        Mode::Direct,
        Mode::Proxied,
        Mode::Accelerated,
        Mode::HandOff,
    ] {
        step(&format!(
            "measuring {} ({repeat} x {} MiB bulk, {repeat} x {round_trips} round trips)",
            mode.name(),
            bytes >> 20
        ));
        results.push(measure(mode, bytes, round_trips, repeat)?);
    }
    let direct = &results[0];
    println!(
        "\nsame node, pod to pod, both meshed (mTLS hop: through the server pod's HBONE listener; hand-off: inside the agent, the default)"
    );
    println!(
        "{:<12} {:>10} {:>8} {:>10} {:>8} {:>10} {:>8}",
        "mode", "Gbit/s", "ratio", "p50 µs", "ratio", "p99 µs", "ratio"
    );
    for result in &results {
        println!(
            "{:<12} {:>10.2} {:>8.2} {:>10.1} {:>8.2} {:>10.1} {:>8.2}",
            result.mode.name(),
            result.gbit_per_s,
            result.gbit_per_s / direct.gbit_per_s,
            result.p50_us,
            result.p50_us / direct.p50_us,
            result.p99_us,
            result.p99_us / direct.p99_us,
        );
    }
    println!(
        "\nratios are against `direct` (pod to pod, no agent) measured in this run; medians of {repeat}."
    );
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum CrossMode {
    Direct,
    Plaintext,
    /// The same without per-connection kernel telemetry
    /// (`capture.tcp_stats: false`): what the telemetry costs.
    PlaintextNoStats,
    Hbone,
    HboneNoStats,
}

impl CrossMode {
    fn name(self) -> &'static str {
        match self {
            CrossMode::Direct => "direct",
            CrossMode::Plaintext => "plaintext L4",
            CrossMode::PlaintextNoStats => "plaintext -ktel",
            CrossMode::Hbone => "HBONE",
            CrossMode::HboneNoStats => "HBONE -ktel",
        }
    }

    fn hbone(self) -> bool {
        matches!(self, CrossMode::Hbone | CrossMode::HboneNoStats)
    }

    fn tcp_stats(self) -> bool {
        matches!(self, CrossMode::Plaintext | CrossMode::Hbone)
    }
}

struct CrossResult {
    mode: CrossMode,
    gbit_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    connections_per_s: f64,
    /// Agent memory (both nodes) per idle tunnelled connection, KiB.
    idle_kib_per_connection: Option<f64>,
}

const IDLE_CONNECTIONS: usize = 500;

fn measure_cross(
    mode: CrossMode,
    bytes: u64,
    round_trips: u64,
    repeat: usize,
) -> anyhow::Result<CrossResult> {
    let mut node1 = TestNode::with_index(1)?;
    let mut node2 = TestNode::with_index(2)?;
    connect_nodes(&node1, &node2)?;
    let a = node1.add_pod("client")?;
    let b = node2.add_pod("server")?;
    let _sink = Server::start(&b, 9000, "sink")?;
    let _echo = Server::start(&b, 9001, "echo")?;
    if mode != CrossMode::Direct {
        let ca_dir = node1.dir.join("ca");
        TestNode::ca_init(&ca_dir)?;
        // Plaintext L4: both pods enrolled, but neither agent knows the other
        // pod as a mesh workload, so the hop between nodes stays plaintext.
        let mesh = |remote: &Pod| {
            if mode.hbone() {
                vec![RemoteWorkload::of(remote)]
            } else {
                Vec::new()
            }
        };
        node1.start_agent(&AgentOptions {
            remote: mesh(&b),
            ca_dir: Some(ca_dir.clone()),
            tcp_stats_off: !mode.tcp_stats(),
            ..AgentOptions::enroll(&["client"])
        })?;
        node2.start_agent(&AgentOptions {
            remote: mesh(&a),
            ca_dir: Some(ca_dir),
            tcp_stats_off: !mode.tcp_stats(),
            ..AgentOptions::enroll(&["server"])
        })?;
    }
    let sink = format!("{}:9000", b.ip);
    let echo = format!("{}:9001", b.ip);
    let (mut throughput, mut p50, mut p99, mut rate) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeat {
        let bulk = podtool_json(&a, &["bulk", "--to", &sink, "--bytes", &bytes.to_string()])?;
        throughput.push(bulk["gbit_per_s"].as_f64().unwrap_or(0.0));
        let ping = pingpong(&a, &echo, round_trips)?;
        p50.push(ping["p50_us"].as_f64().unwrap_or(0.0));
        p99.push(ping["p99_us"].as_f64().unwrap_or(0.0));
        let connections = podtool_json(&a, &["connrate", "--to", &echo, "--seconds", "2"])?;
        rate.push(connections["per_second"].as_f64().unwrap_or(0.0));
    }
    let idle_kib_per_connection = if mode == CrossMode::Direct {
        None
    } else {
        let before = node1.agent_rss_kib()? + node2.agent_rss_kib()?;
        let mut hold = a.podtool()?.args([
            "hold",
            "--to",
            &echo,
            "--count",
            &IDLE_CONNECTIONS.to_string(),
        ]);
        hold.command.stdout(std::process::Stdio::piped());
        let mut child = hold.spawn()?;
        let stdout = child.stdout.take().context("hold stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if !line.contains("held") {
            let _ = child.kill();
            bail!("podtool hold: {line:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        let after = node1.agent_rss_kib()? + node2.agent_rss_kib()?;
        let _ = child.kill();
        let _ = child.wait();
        Some(after.saturating_sub(before) as f64 / IDLE_CONNECTIONS as f64)
    };
    if mode.hbone() && node2.log_lines(&["protocol=\"hbone\""]).is_empty() {
        bail!("HBONE mode: no HBONE connection was logged");
    }
    Ok(CrossResult {
        mode,
        gbit_per_s: median(throughput),
        p50_us: median(p50),
        p99_us: median(p99),
        connections_per_s: median(rate),
        idle_kib_per_connection,
    })
}

fn run_cross_node(bytes: u64, round_trips: u64, repeat: usize) -> anyhow::Result<()> {
    let mut results = Vec::new();
    for mode in [
        CrossMode::Direct,
        CrossMode::Plaintext,
        CrossMode::PlaintextNoStats,
        CrossMode::Hbone,
        CrossMode::HboneNoStats,
    ] {
        step(&format!("measuring cross-node {}", mode.name()));
        results.push(measure_cross(mode, bytes, round_trips, repeat)?);
    }
    let direct = &results[0];
    println!("\ncross node (two node namespaces on a wire veth, an agent on each)");
    println!(
        "{:<13} {:>8} {:>6} {:>9} {:>6} {:>9} {:>6} {:>10} {:>6} {:>14}",
        "mode",
        "Gbit/s",
        "ratio",
        "p50 µs",
        "ratio",
        "p99 µs",
        "ratio",
        "conn/s",
        "ratio",
        "KiB/idle conn"
    );
    for result in &results {
        println!(
            "{:<13} {:>8.2} {:>6.2} {:>9.1} {:>6.2} {:>9.1} {:>6.2} {:>10.0} {:>6.2} {:>14}",
            result.mode.name(),
            result.gbit_per_s,
            result.gbit_per_s / direct.gbit_per_s,
            result.p50_us,
            result.p50_us / direct.p50_us,
            result.p99_us,
            result.p99_us / direct.p99_us,
            result.connections_per_s,
            result.connections_per_s / direct.connections_per_s,
            result
                .idle_kib_per_connection
                .map(|kib| format!("{kib:.1}"))
                .unwrap_or_else(|| "-".into()),
        );
    }
    println!(
        "\nKiB/idle conn: growth of both agents' RSS with {IDLE_CONNECTIONS} idle connections open, per connection."
    );
    println!(
        "-ktel: the mode above it without per-connection kernel telemetry (capture.tcp_stats: false)."
    );
    Ok(())
}
