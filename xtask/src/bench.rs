//! `cargo xtask bench`: pod-to-pod TCP throughput and 1-byte round-trip
//! latency on a namespaced node, in three modes measured in the same run:
//! direct (no agent), through the agent, through the agent with sk_msg
//! acceleration. Printed as ratios against direct. Not a test: nothing here
//! asserts a timing.
use anyhow::{Context as _, bail};
use weir_tests::{AgentOptions, Pod, Server, TestNode};

use crate::step;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Direct,
    Proxied,
    Accelerated,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Proxied => "agent",
            Mode::Accelerated => "agent+accel",
        }
    }
}

struct Result {
    mode: Mode,
    gbit_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

fn podtool_json(pod: &Pod, args: &[&str]) -> anyhow::Result<serde_json::Value> {
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

fn median(mut values: Vec<f64>) -> f64 {
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
            ..AgentOptions::enroll(&["client", "server"])
        })?;
    }
    let sink = format!("{}:9000", b.ip);
    let echo = format!("{}:9001", b.ip);
    let (mut throughput, mut p50, mut p99) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeat {
        let bulk = podtool_json(&a, &["bulk", "--to", &sink, "--bytes", &bytes.to_string()])?;
        throughput.push(bulk["gbit_per_s"].as_f64().unwrap_or(0.0));
        let ping = podtool_json(
            &a,
            &[
                "pingpong",
                "--to",
                &echo,
                "--count",
                &round_trips.to_string(),
            ],
        )?;
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

/// Points the harness at the release builds of the agent and podtool.
fn use_release_binaries() -> anyhow::Result<()> {
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
    }
    Ok(())
}

pub fn run(bytes: u64, round_trips: u64, repeat: usize) -> anyhow::Result<()> {
    use_release_binaries()?;
    let mut results = Vec::new();
    for mode in [Mode::Direct, Mode::Proxied, Mode::Accelerated] {
        step(&format!(
            "measuring {} ({repeat} x {} MiB bulk, {repeat} x {round_trips} round trips)",
            mode.name(),
            bytes >> 20
        ));
        results.push(measure(mode, bytes, round_trips, repeat)?);
    }
    let direct = &results[0];
    println!();
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
