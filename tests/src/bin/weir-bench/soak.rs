//! `cargo xtask bench soak`: connection churn through the agents for a long
//! while, then bursts of idle connections held and released. Samples each
//! agent's RSS, open descriptors and async tasks. Not a test: it prints the
//! figures and how they compare with the targets, and asserts nothing.
//!
//! Topology: two nodes on a wire. Pod `client` on node 1; on node 2 the
//! meshed pod `server` (reached over HBONE) and the pod `plain`, outside
//! the mesh (node 1's agent relays to it in plaintext).
use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use weir_tests::{AgentOptions, Pod, RemoteWorkload, Server, TestNode, connect_nodes, step};

use crate::tcp::use_release_binaries;

#[derive(clap::Args)]
pub struct Options {
    /// Seconds of connection churn.
    #[arg(long, default_value_t = 600)]
    pub seconds: u64,
    /// Of which the first are warm-up, not counted in growth.
    #[arg(long, default_value_t = 60)]
    pub warmup_seconds: u64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 30)]
    pub sample_seconds: u64,
    /// Idle connections per burst.
    #[arg(long, default_value_t = 2000)]
    pub idle: usize,
    /// Bytes echoed on each idle connection before it goes idle.
    #[arg(long, default_value_t = 65536)]
    pub idle_bytes: usize,
    /// The HBONE pool's idle timeout for this run (the default is 300 s):
    /// memory "after release" is measured once the pooled connections
    /// that carried a burst have closed too.
    #[arg(long, default_value_t = 15)]
    pub pool_idle_seconds: u64,
    /// Which idle bursts, in order: `tunnelled`, `relayed`.
    #[arg(long, value_delimiter = ',', default_value = "tunnelled,relayed")]
    pub bursts: Vec<String>,
}

/// One agent's footprint.
#[derive(Clone, Copy, Default)]
struct Sample {
    rss_kib: u64,
    descriptors: u64,
    tasks: u64,
}

fn sample(node: &TestNode) -> anyhow::Result<Sample> {
    let pid = node.agent_pid().context("no agent")?;
    let descriptors = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    let (_, metrics) = node.http_get(15020, "/metrics")?;
    let tasks = weir_tests::metric_sample(&metrics, "weir_runtime_tasks", &[]).unwrap_or(0.0);
    Ok(Sample {
        rss_kib: node.agent_rss_kib()?,
        descriptors,
        tasks: tasks as u64,
    })
}

struct Churn(Vec<Child>);

impl Drop for Churn {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `count` connections from `pod` to `to`, each echoing `bytes`, held open
/// and idle until the returned child is killed.
fn hold(pod: &Pod, to: &str, count: usize, bytes: usize) -> anyhow::Result<Churn> {
    let mut hold = pod.podtool()?.args([
        "hold",
        "--to",
        to,
        "--count",
        &count.to_string(),
        "--bytes",
        &bytes.to_string(),
    ]);
    hold.command.stdout(Stdio::piped());
    let mut child = hold.spawn()?;
    let stdout = child.stdout.take().context("hold stdout")?;
    let churn = Churn(vec![child]);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if !line.contains("held") {
        bail!("podtool hold to {to}: {line:?}");
    }
    Ok(churn)
}

/// Samples both agents until `done` holds for them (closing is
/// asynchronous) or 60 s have passed; returns the last samples.
fn poll_until(
    nodes: [&TestNode; 2],
    done: impl Fn(&[Sample; 2]) -> bool,
) -> anyhow::Result<[Sample; 2]> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = [sample(nodes[0])?, sample(nodes[1])?];
        if done(&now) || Instant::now() > deadline {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Polls until both agents' descriptors are back near `baseline`.
fn settle(nodes: [&TestNode; 2], baseline: [Sample; 2]) -> anyhow::Result<[Sample; 2]> {
    poll_until(nodes, |now| {
        now.iter()
            .zip(baseline)
            .all(|(now, base)| now.descriptors <= base.descriptors + 10)
    })
}

/// Polls until the held connections are closed: both agents together hold
/// no more descriptors than before the burst plus the pooled connections
/// that carried it (one per 100 streams on each side) and some slack.
fn tunnels_closed(
    nodes: [&TestNode; 2],
    before: [Sample; 2],
    idle: usize,
) -> anyhow::Result<[Sample; 2]> {
    let limit = before[0].descriptors + before[1].descriptors + (idle as u64).div_ceil(50) + 10;
    poll_until(nodes, |now| {
        now[0].descriptors + now[1].descriptors <= limit
    })
}

fn total_rss(samples: &[Sample; 2]) -> u64 {
    samples[0].rss_kib + samples[1].rss_kib
}

pub fn run(options: Options) -> anyhow::Result<()> {
    use_release_binaries()?;
    let mut node1 = TestNode::with_index(1)?;
    let mut node2 = TestNode::with_index(2)?;
    connect_nodes(&node1, &node2)?;
    let client = node1.add_pod("client")?;
    let server = node2.add_pod("server")?;
    let plain = node2.add_pod("plain")?;
    let _server_echo = Server::start(&server, 9001, "echo")?;
    let _server_echo_2 = Server::start(&server, 9002, "echo")?;
    let _plain_echo = Server::start(&plain, 9001, "echo")?;
    let ca_dir = node1.dir.join("ca");
    TestNode::ca_init(&ca_dir)?;
    let pool = format!(
        "hbone_client: {{idle_timeout_seconds: {}}}\n",
        options.pool_idle_seconds
    );
    node1.start_agent(&AgentOptions {
        remote: vec![RemoteWorkload::of(&server)],
        ca_dir: Some(ca_dir.clone()),
        extra_config: pool.clone(),
        ..AgentOptions::enroll(&["client"])
    })?;
    node2.start_agent(&AgentOptions {
        remote: vec![RemoteWorkload::of(&client)],
        ca_dir: Some(ca_dir),
        extra_config: pool,
        ..AgentOptions::enroll(&["server"])
    })?;
    // One destination port per client: the proxy's side of each delivered
    // connection closes first and waits in TIME_WAIT for 60 s, so one
    // (source address, destination) pair carries at most about 28,000
    // connections a minute (the ephemeral port range), with a mesh or
    // without one.
    let tunnelled = format!("{}:9001", server.ip);
    let tunnelled_2 = format!("{}:9002", server.ip);
    let relayed = format!("{}:9001", plain.ip);
    let nodes = [&node1, &node2];
    let start = [sample(&node1)?, sample(&node2)?];

    step(&format!(
        "churn for {} s: two clients through HBONE, one in plaintext",
        options.seconds
    ));
    let seconds = options.seconds.to_string();
    let mut churn = Churn(Vec::new());
    for to in [&tunnelled, &tunnelled_2, &relayed] {
        let mut rate = client
            .podtool()?
            .args(["connrate", "--to", to, "--seconds", &seconds]);
        rate.command.stdout(Stdio::piped());
        churn.0.push(rate.spawn()?);
    }
    println!(
        "\n{:>6} | {:>9} {:>5} {:>6} | {:>9} {:>5} {:>6}",
        "s", "RSS1 KiB", "fds1", "tasks1", "RSS2 KiB", "fds2", "tasks2"
    );
    let started = Instant::now();
    let mut warm: Option<[Sample; 2]> = None;
    let mut last = start;
    let print = |at: u64, samples: &[Sample; 2]| {
        println!(
            "{:>6} | {:>9} {:>5} {:>6} | {:>9} {:>5} {:>6}",
            at,
            samples[0].rss_kib,
            samples[0].descriptors,
            samples[0].tasks,
            samples[1].rss_kib,
            samples[1].descriptors,
            samples[1].tasks
        );
    };
    print(0, &start);
    let end = Duration::from_secs(options.seconds);
    while started.elapsed() < end {
        let next = Duration::from_secs(options.sample_seconds).min(end - started.elapsed());
        std::thread::sleep(next);
        // Sampled while the churn runs: what a scrape sees under load.
        last = [sample(&node1)?, sample(&node2)?];
        print(started.elapsed().as_secs(), &last);
        if warm.is_none() && started.elapsed() >= Duration::from_secs(options.warmup_seconds) {
            warm = Some(last);
        }
    }
    let mut connections = 0u64;
    for child in &mut churn.0 {
        let status = child.wait()?;
        let mut output = String::new();
        if let Some(stdout) = child.stdout.as_mut() {
            std::io::Read::read_to_string(stdout, &mut output)?;
        }
        if !status.success() {
            bail!("a churn client failed ({status}): {output}");
        }
        let report: serde_json::Value =
            serde_json::from_str(output.lines().last().unwrap_or_default())?;
        connections += report["connections"].as_u64().unwrap_or(0);
    }
    drop(churn);
    let warm = warm.unwrap_or(start);
    println!(
        "\nchurn: {connections} connections in {} s ({:.0}/s)",
        options.seconds,
        connections as f64 / options.seconds as f64
    );
    for (index, (warm, last)) in warm.iter().zip(last).enumerate() {
        println!(
            "agent {}: after warm-up to the end, RSS {:+} KiB, descriptors {:+}, tasks {:+} (targets: under 1 MiB and 10 descriptors)",
            index + 1,
            last.rss_kib as i64 - warm.rss_kib as i64,
            last.descriptors as i64 - warm.descriptors as i64,
            last.tasks as i64 - warm.tasks as i64,
        );
    }

    let baseline = settle(nodes, start)?;
    for name in &options.bursts {
        let to = match name.as_str() {
            "tunnelled" => &tunnelled,
            "relayed" => &relayed,
            other => bail!("unknown burst {other:?}: tunnelled or relayed"),
        };
        step(&format!(
            "{} idle {name} connections, twice: held, then released",
            options.idle
        ));
        let before = settle(nodes, baseline)?;
        let mut during = before;
        let mut released = before;
        for _ in 0..2 {
            let held = hold(&client, to, options.idle, options.idle_bytes)?;
            during = [sample(&node1)?, sample(&node2)?];
            drop(held);
            // The connections are gone; pooled HBONE connections (one per
            // 100 streams on each side) stay until the pool's idle timeout.
            released = tunnels_closed(nodes, before, options.idle)?;
            settle(nodes, baseline)?;
        }
        // The allocator may take a moment to return pages.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut after = settle(nodes, baseline)?;
        while total_rss(&after) > total_rss(&before) * 11 / 10 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_secs(1));
            after = settle(nodes, baseline)?;
        }
        let percent = |samples: &[Sample; 2]| {
            (total_rss(samples) as f64 / total_rss(&before) as f64 - 1.0) * 100.0
        };
        println!(
            "{name}: {:.1} KiB per idle connection held after a previous burst (target ≤ 16), \
             RSS {} KiB before, {} KiB held, {} KiB when the connections closed ({:+.1} %), \
             {} KiB after release, the pool's idle connections closed too ({:+.1} %, target within 10 %); \
             descriptors {} → {} → {} → {}",
            (total_rss(&during) as f64 - total_rss(&before) as f64) / options.idle as f64,
            total_rss(&before),
            total_rss(&during),
            total_rss(&released),
            percent(&released),
            total_rss(&after),
            percent(&after),
            before[0].descriptors + before[1].descriptors,
            during[0].descriptors + during[1].descriptors,
            released[0].descriptors + released[1].descriptors,
            after[0].descriptors + after[1].descriptors,
        );
    }
    println!(
        "\nRSS, descriptors and tasks are each agent's own (/proc and weir_runtime_tasks); \
         per-connection memory is both agents' RSS growth while the second burst is held, \
         over the RSS before the first."
    );
    Ok(())
}
