//! `cargo xtask bench rows` (`weir-bench rows`): the rows Weir is compared
//! with ztunnel on, with other people's tools and servers: wrk against
//! nginx (50 keep-alive connections; 1 connection, for latency; a new
//! connection per request on 10), iperf3 (1 and 4 streams) and h2load
//! (h2c, 4 connections of 16 streams) against nginx. Each row runs on two
//! topologies, direct (no agent) and through Weir, measured in the same
//! run: across two nodes (HBONE between the agents) and on one node (the
//! same-node hand-off). Printed as one table of ratios to direct on the
//! same topology, with the agents' CPU per request or per GB and their
//! memory. With `--baseline-agent`, Weir is also measured with that build
//! of the agent (`cargo xtask bench rows --baseline <rev>` builds it), in
//! the same run, so that a change's cost shows. The setups of a topology
//! are all up at once and take turns on each run of each row. Not a test: nothing here
//! asserts a timing, but every request must succeed, or the bench fails
//! naming the row.
use std::{
    path::{Path, PathBuf},
    process::{Child, Stdio},
};

use anyhow::{Context as _, bail};
use weir_tests::{AgentOptions, Pod, RemoteWorkload, TestNode, connect_nodes, step, wait_for};

use super::{cpu, http::check_h2load_output};

const HTTP_PORT: u16 = 8080;
const H2C_PORT: u16 = 8081;
const IPERF_PORT: u16 = 5201;

/// The bench's parameters.
#[derive(Clone, clap::Args)]
pub struct Options {
    /// Seconds per wrk and iperf3 run.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Requests per h2load run.
    #[arg(long, default_value_t = 50_000)]
    pub h2_requests: u64,
    /// Runs of each row on each setup (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Another build of the agent to measure too, as the baseline.
    #[arg(long)]
    pub baseline_agent: Option<PathBuf>,
    /// What the baseline is (a revision), for the table.
    #[arg(long, default_value = "baseline")]
    pub baseline_name: String,
    /// Only these rows (all when none is given), e.g. to profile one.
    #[arg(long = "row", value_enum)]
    pub rows: Vec<Row>,
    /// Only this topology (both when not given).
    #[arg(long, value_enum)]
    pub topology: Option<Topology>,
}

impl Options {
    fn selected_rows(&self) -> Vec<Row> {
        if self.rows.is_empty() {
            Row::ALL.to_vec()
        } else {
            Row::ALL
                .into_iter()
                .filter(|row| self.rows.contains(row))
                .collect()
        }
    }
}

/// How the client reaches the server.
#[derive(Clone)]
enum Through {
    Direct,
    /// Weir: the workspace's build, or another one.
    Weir(Option<PathBuf>),
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum Row {
    #[value(name = "keep-alive")]
    WrkKeepAlive,
    #[value(name = "one")]
    WrkOne,
    #[value(name = "close")]
    WrkClose,
    Iperf1,
    Iperf4,
    H2load,
}

impl Row {
    const ALL: [Row; 6] = [
        Row::WrkKeepAlive,
        Row::WrkOne,
        Row::WrkClose,
        Row::Iperf1,
        Row::Iperf4,
        Row::H2load,
    ];

    fn name(self) -> &'static str {
        match self {
            Row::WrkKeepAlive => "wrk keep-alive, 50 connections",
            Row::WrkOne => "wrk, 1 connection (latency)",
            Row::WrkClose => "new connection per request, 10",
            Row::Iperf1 => "iperf3, 1 stream",
            Row::Iperf4 => "iperf3, 4 streams",
            Row::H2load => "h2load h2c, 4 x 16 streams",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Row::Iperf1 | Row::Iperf4 => "Gbit/s",
            _ => "req/s",
        }
    }
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum Topology {
    CrossNode,
    SameNode,
}

/// One row measured on one topology and path.
#[derive(Clone, Copy, Default)]
struct Measure {
    /// Requests/s or Gbit/s.
    rate: f64,
    /// wrk's median latency, µs (the 1-connection row).
    p50_us: Option<f64>,
    /// The agents' CPU: ms per 1,000 requests, or s per GB.
    agent_cpu: Option<f64>,
    /// The part of the agents' CPU spent in the kernel (system time).
    agent_kernel_share: Option<f64>,
    /// The whole machine's busy CPU (load generator, server, agents and
    /// the kernel's network work), in the same unit.
    machine_cpu: f64,
    /// How busy the machine was over the run: 1.0 is every core.
    busy: f64,
}

/// A server process, killed (and reaped) when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A server pod's nginx: HTTP/1.1 on 8080, h2c (prior knowledge) on 8081,
/// a 2-byte body, no access log; one process, so that killing it leaves
/// nothing behind.
fn start_nginx(pod: &Pod, dir: &Path) -> anyhow::Result<Running> {
    std::fs::create_dir_all(dir)?;
    let d = dir.display();
    let config = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
             client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             server {{ listen {HTTP_PORT}; listen {H2C_PORT} http2; location / {{ return 200 \"ok\"; }} }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, config)?;
    let mut command = pod.command("/usr/sbin/nginx")?.args([
        "-c",
        &path.to_string_lossy(),
        "-e",
        &format!("{d}/error.log"),
    ]);
    command
        .command
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let child = command
        .spawn()
        .context("starting nginx (cargo xtask setup installs nginx-light)")?;
    let nginx = Running(child);
    wait_listening(pod, HTTP_PORT)?;
    wait_listening(pod, H2C_PORT)?;
    Ok(nginx)
}

/// iperf3's server in a pod.
fn start_iperf(pod: &Pod) -> anyhow::Result<Running> {
    let mut command = pod
        .command("iperf3")?
        .args(["-s", "-p", &IPERF_PORT.to_string()]);
    command.command.stdout(Stdio::null()).stderr(Stdio::null());
    let child = command
        .spawn()
        .context("starting iperf3 -s (cargo xtask setup installs iperf3)")?;
    let server = Running(child);
    wait_listening(pod, IPERF_PORT)?;
    Ok(server)
}

fn wait_listening(pod: &Pod, port: u16) -> anyhow::Result<()> {
    let filter = format!("( sport = :{port} )");
    wait_for(
        &format!("a listener on port {port} in {}", pod.name),
        std::time::Duration::from_secs(10),
        || {
            weir_tests::node::run("ss", &["-N", &pod.netns, "-Htln", &filter])
                .ok()
                .filter(|listing| !listing.trim().is_empty())
        },
    )
    .map(|_| ())
}

/// A topology's nodes, its client and server pods and the servers, with
/// or without Weir.
struct Setup {
    // Dropped first: the servers, then the nodes.
    _nginx: Running,
    _iperf: Running,
    nodes: Vec<TestNode>,
    client: Pod,
    server: Pod,
}

impl Setup {
    fn new(topology: Topology, through: &Through) -> anyhow::Result<Setup> {
        let (weir, agent_binary) = match through {
            Through::Direct => (false, None),
            Through::Weir(binary) => (true, binary.clone()),
        };
        let (nodes, client, server) = match topology {
            Topology::SameNode => {
                let mut node = TestNode::new()?;
                let client = node.add_pod("client")?;
                let server = node.add_pod("server")?;
                if weir {
                    node.start_agent(&AgentOptions {
                        agent_binary,
                        ..AgentOptions::enroll(&["client", "server"])
                    })?;
                }
                (vec![node], client, server)
            }
            Topology::CrossNode => {
                let mut node1 = TestNode::with_index(1)?;
                let mut node2 = TestNode::with_index(2)?;
                connect_nodes(&node1, &node2)?;
                let client = node1.add_pod("client")?;
                let server = node2.add_pod("server")?;
                if weir {
                    let ca_dir = node1.dir.join("ca");
                    TestNode::ca_init(&ca_dir)?;
                    node1.start_agent(&AgentOptions {
                        remote: vec![RemoteWorkload::of(&server)],
                        ca_dir: Some(ca_dir.clone()),
                        agent_binary: agent_binary.clone(),
                        ..AgentOptions::enroll(&["client"])
                    })?;
                    node2.start_agent(&AgentOptions {
                        remote: vec![RemoteWorkload::of(&client)],
                        ca_dir: Some(ca_dir),
                        agent_binary,
                        ..AgentOptions::enroll(&["server"])
                    })?;
                }
                (vec![node1, node2], client, server)
            }
        };
        // The client connects 10,000 times a second and nginx closes first,
        // so TIME_WAIT fills both pods' ports within a run. Linux reuses
        // them for new connects by default only on loopback, which the
        // path through Weir takes (the pod to its proxy) and direct does
        // not: without this, every direct run after the first crawled at
        // 1,000-2,000 connections a second.
        for pod in [&client, &server] {
            pod.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        }
        let server_node = nodes.last().context("a node")?;
        let nginx = start_nginx(&server, &server_node.dir.join("nginx"))?;
        let iperf = start_iperf(&server)?;
        Ok(Setup {
            _nginx: nginx,
            _iperf: iperf,
            nodes,
            client,
            server,
        })
    }

    /// The agents' CPU time so far (none without Weir).
    fn agent_cpu(&self) -> anyhow::Result<Option<cpu::ProcessCpu>> {
        let pids: Vec<u32> = self.nodes.iter().filter_map(TestNode::agent_pid).collect();
        if pids.is_empty() {
            return Ok(None);
        }
        let mut total = cpu::ProcessCpu::default();
        for pid in pids {
            total = total + cpu::process(pid)?;
        }
        Ok(Some(total))
    }

    /// The agents' resident memory, MiB (none without Weir).
    fn agent_rss_mib(&self) -> Option<f64> {
        let kib: Option<Vec<u64>> = self
            .nodes
            .iter()
            .map(|node| node.agent_rss_kib().ok())
            .collect();
        kib.filter(|kib| !kib.is_empty())
            .map(|kib| kib.iter().sum::<u64>() as f64 / 1024.0)
    }

    fn measure(&self, row: Row, options: &Options) -> anyhow::Result<Measure> {
        let before = self.agent_cpu()?;
        let machine_before = cpu::machine_busy()?;
        let started = std::time::Instant::now();
        let (rate, p50_us, work) = match row {
            Row::WrkKeepAlive => self.wrk(options, &["-t2", "-c50"])?,
            Row::WrkOne => self.wrk(options, &["-t1", "-c1"])?,
            Row::WrkClose => self.wrk(options, &["-t2", "-c10", "-H", "Connection: close"])?,
            Row::Iperf1 => self.iperf(options, 1)?,
            Row::Iperf4 => self.iperf(options, 4)?,
            Row::H2load => self.h2load(options)?,
        };
        let after = self.agent_cpu()?;
        let machine = cpu::machine_busy()? - machine_before;
        let wall = started.elapsed().as_secs_f64();
        let per_unit = |seconds: f64| match row {
            // s per GB.
            Row::Iperf1 | Row::Iperf4 => seconds / (work / 1e9),
            // ms per 1,000 requests.
            _ => seconds * 1e3 / (work / 1e3),
        };
        let agents = before.zip(after).map(|(before, after)| after - before);
        Ok(Measure {
            rate,
            p50_us,
            agent_cpu: agents.map(|agents| per_unit(agents.total())),
            agent_kernel_share: agents
                .filter(|agents| agents.total() > 0.0)
                .map(|agents| agents.system / agents.total()),
            machine_cpu: per_unit(machine),
            busy: machine / (wall * cpu::cores() as f64),
        })
    }

    /// wrk with `args` for the run's seconds: (requests/s, p50 µs, requests).
    fn wrk(&self, options: &Options, args: &[&str]) -> anyhow::Result<(f64, Option<f64>, f64)> {
        let url = format!("http://{}:{HTTP_PORT}/", self.server.ip);
        let duration = format!("-d{}s", options.seconds);
        let output = self
            .client
            .command("wrk")?
            .args(args.iter().copied())
            .args([duration.as_str(), "--latency", url.as_str()])
            .output()
            .context("running wrk (cargo xtask setup installs it)")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "wrk {} failed: {}{stdout}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let wrk = parse_wrk(&stdout).with_context(|| format!("wrk {}", args.join(" ")))?;
        Ok((wrk.requests_per_s, Some(wrk.p50_us), wrk.requests))
    }

    /// iperf3 with `streams`: (Gbit/s received, -, bytes).
    fn iperf(&self, options: &Options, streams: u32) -> anyhow::Result<(f64, Option<f64>, f64)> {
        let output = self
            .client
            .command("iperf3")?
            .args([
                "-c",
                &self.server.ip.to_string(),
                "-p",
                &IPERF_PORT.to_string(),
                "-t",
                &options.seconds.to_string(),
                "-P",
                &streams.to_string(),
                "-J",
            ])
            .output()
            .context("running iperf3 (cargo xtask setup installs it)")?;
        let report: serde_json::Value =
            serde_json::from_slice(&output.stdout).with_context(|| {
                format!("iperf3's JSON: {}", String::from_utf8_lossy(&output.stdout))
            })?;
        if let Some(error) = report["error"].as_str() {
            bail!("iperf3 -P {streams}: {error}");
        }
        let received = &report["end"]["sum_received"];
        let bits = received["bits_per_second"]
            .as_f64()
            .context("iperf3: no end.sum_received.bits_per_second")?;
        let bytes = received["bytes"].as_f64().unwrap_or(0.0);
        Ok((bits / 1e9, None, bytes))
    }

    /// h2load over h2c: (requests/s, -, requests).
    fn h2load(&self, options: &Options) -> anyhow::Result<(f64, Option<f64>, f64)> {
        let url = format!("http://{}:{H2C_PORT}/", self.server.ip);
        let requests = options.h2_requests;
        let args = [
            "-n".to_string(),
            requests.to_string(),
            "-c4".into(),
            "-m16".into(),
            url,
        ];
        let output = self
            .client
            .command("h2load")?
            .args(args.iter().map(String::as_str))
            .output()
            .context("running h2load (cargo xtask setup installs nghttp2-client)")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let rate = check_h2load_output(&stdout, requests)
            .with_context(|| format!("h2load {}", args.join(" ")))?;
        Ok((rate, None, requests as f64))
    }
}

/// What wrk printed.
#[derive(Debug, PartialEq)]
struct Wrk {
    requests_per_s: f64,
    p50_us: f64,
    requests: f64,
}

/// wrk's summary; refuses a run with errors or non-2xx answers.
fn parse_wrk(output: &str) -> anyhow::Result<Wrk> {
    if let Some(line) = output.lines().find(|line| line.contains("Non-2xx")) {
        bail!("{}\n{output}", line.trim());
    }
    if let Some(line) = output.lines().find(|line| line.contains("Socket errors")) {
        bail!("{}\n{output}", line.trim());
    }
    let requests_per_s = output
        .lines()
        .find_map(|line| line.trim().strip_prefix("Requests/sec:"))
        .and_then(|value| value.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{output}"))?;
    let requests = output
        .lines()
        .find_map(|line| line.trim().split_once(" requests in "))
        .and_then(|(count, _)| count.trim().parse().ok())
        .with_context(|| format!("no request count in wrk's output:\n{output}"))?;
    let p50_us = output
        .lines()
        .find_map(|line| line.trim().strip_prefix("50%"))
        .and_then(|value| duration_us(value.trim()))
        .with_context(|| format!("no 50% latency in wrk's output:\n{output}"))?;
    Ok(Wrk {
        requests_per_s,
        p50_us,
        requests,
    })
}

/// A wrk duration (`812.00us`, `1.23ms`, `2.00s`), in µs.
fn duration_us(text: &str) -> Option<f64> {
    let (number, scale) = if let Some(us) = text.strip_suffix("us") {
        (us, 1.0)
    } else if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1e3)
    } else {
        (text.strip_suffix('s')?, 1e6)
    };
    number.parse::<f64>().ok().map(|value| value * scale)
}

/// Every row through each of `throughs` on `topology`, interleaved: each
/// run of a row goes through every setup in turn, so that a machine whose
/// speed drifts during the run slows them alike. Per setup: the median of
/// each row, and the agents' RSS idle and after the rows.
struct Measured {
    rows: Vec<Measure>,
    rss_idle_mib: Option<f64>,
    rss_after_mib: Option<f64>,
}

fn measure_interleaved(
    topology: Topology,
    throughs: &[Through],
    options: &Options,
) -> anyhow::Result<Vec<Measured>> {
    let mut setups = Vec::new();
    for through in throughs {
        setups.push(Setup::new(topology, through)?);
    }
    let idle: Vec<Option<f64>> = setups.iter().map(Setup::agent_rss_mib).collect();
    let mut rows: Vec<Vec<Measure>> = vec![Vec::new(); setups.len()];
    for row in options.selected_rows() {
        let mut runs: Vec<Vec<Measure>> = vec![Vec::new(); setups.len()];
        for _ in 0..options.repeat.max(1) {
            for (setup, runs) in setups.iter().zip(runs.iter_mut()) {
                runs.push(setup.measure(row, options).with_context(|| row.name())?);
            }
        }
        for (rows, runs) in rows.iter_mut().zip(runs) {
            rows.push(median_run(runs));
        }
    }
    Ok(rows
        .into_iter()
        .zip(idle)
        .zip(&setups)
        .map(|((rows, rss_idle_mib), setup)| Measured {
            rows,
            rss_idle_mib,
            rss_after_mib: setup.agent_rss_mib(),
        })
        .collect())
}

pub fn run(options: Options) -> anyhow::Result<()> {
    super::tcp::use_release_binaries()?;
    // Per topology: direct, Weir, and the baseline's Weir.
    let mut tables = Vec::new();
    let topologies = match options.topology {
        Some(topology) => vec![topology],
        None => vec![Topology::CrossNode, Topology::SameNode],
    };
    let selected = options.selected_rows();
    // (topology, the suffix of its columns)
    let topology_names: Vec<(Topology, &str)> = topologies
        .iter()
        .map(|topology| match topology {
            Topology::CrossNode => (*topology, "x2"),
            Topology::SameNode => (*topology, "1"),
        })
        .collect();
    for topology in topologies.iter().copied() {
        let name = match topology {
            Topology::CrossNode => "cross node",
            Topology::SameNode => "same node",
        };
        let mut throughs = vec![Through::Direct, Through::Weir(None)];
        if let Some(binary) = &options.baseline_agent {
            throughs.push(Through::Weir(Some(binary.clone())));
        }
        step(&format!(
            "{name}: the rows direct, through Weir{}, interleaved",
            options
                .baseline_agent
                .as_ref()
                .map(|_| format!(" and through Weir {}", options.baseline_name))
                .unwrap_or_default()
        ));
        let mut measured = measure_interleaved(topology, &throughs, &options)?.into_iter();
        let (Some(direct), Some(weir)) = (measured.next(), measured.next()) else {
            bail!("{name}: a setup was not measured");
        };
        let baseline = measured.next();
        tables.push((name, direct, weir, baseline));
    }
    println!(
        "\nrows (wrk, iperf3 and h2load against nginx and iperf3 -s; medians of {} runs of {} s; ratios to direct on the same topology, measured in this run)",
        options.repeat.max(1),
        options.seconds
    );
    let mut header = format!("{:<32} {:>7}", "row", "unit");
    for (_, suffix) in &topology_names {
        header.push_str(&format!(
            " | {:>10} {:>10} {:>6} {:>9}",
            format!("direct {suffix}"),
            format!("Weir {suffix}"),
            "ratio",
            "agent CPU"
        ));
    }
    println!("{header}");
    for (index, row) in selected.iter().enumerate() {
        let mut line = format!("{:<32} {:>7}", row.name(), row.unit());
        for (_, direct, weir, _) in &tables {
            let (direct, weir) = (direct.rows[index], weir.rows[index]);
            line.push_str(&format!(
                " | {:>10.2} {:>10.2} {:>6.2} {:>9}",
                direct.rate,
                weir.rate,
                weir.rate / direct.rate,
                cpu(&weir),
            ));
        }
        println!("{line}");
    }
    let wrk_one = selected.iter().position(|row| *row == Row::WrkOne);
    for (name, direct, weir, _) in &tables {
        if let Some(wrk_one) = wrk_one
            && let (Some(direct), Some(weir)) =
                (direct.rows[wrk_one].p50_us, weir.rows[wrk_one].p50_us)
        {
            println!(
                "{name}: wrk 1 connection p50 {direct:.0} µs direct, {weir:.0} µs through Weir (+{:.0} µs per round trip)",
                weir - direct
            );
        }
        println!(
            "{name}: agents' RSS {} MiB idle, {} MiB after the rows",
            mib(weir.rss_idle_mib),
            mib(weir.rss_after_mib)
        );
    }
    println!(
        "\nagent CPU: the agents' user + system CPU over the row (both agents across nodes): ms per 1,000 requests, or s per GB for iperf3."
    );
    print_bounds(&selected, &tables);
    if options.baseline_agent.is_some() {
        let base = &options.baseline_name;
        println!("\nagainst {base} (the same rows through that build of the agent, in this run)");
        let mut header = format!("{:<32} {:>7}", "row", "unit");
        for (_, suffix) in &topology_names {
            header.push_str(&format!(
                " | {:>10} {:>10} {:>7} {:>9}",
                format!("Weir {suffix}"),
                format!("base {suffix}"),
                "change",
                "base CPU"
            ));
        }
        println!("{header}");
        for (index, row) in selected.iter().enumerate() {
            let mut line = format!("{:<32} {:>7}", row.name(), row.unit());
            for (_, _, weir, baseline) in &tables {
                let Some(baseline) = baseline else { continue };
                let (weir, baseline) = (weir.rows[index], baseline.rows[index]);
                line.push_str(&format!(
                    " | {:>10.2} {:>10.2} {:>+6.1}% {:>9}",
                    weir.rate,
                    baseline.rate,
                    (weir.rate / baseline.rate - 1.0) * 100.0,
                    cpu(&baseline),
                ));
            }
            println!("{line}");
        }
    }
    Ok(())
}

/// What bounds each row: how busy the machine was, the whole machine's CPU
/// per unit of work direct and through Weir, and how much of the agents'
/// CPU was the kernel's. When both runs keep every core busy, the ratio
/// to direct is the ratio of the machine's CPU per unit ("if saturated"):
/// then only less CPU per request or per GB, not less latency, raises it.
/// "no agent user space" is that ratio with the agents' user-space CPU
/// taken away: the most that work in the agent's own code could reach.
fn print_bounds(selected: &[Row], tables: &[(&str, Measured, Measured, Option<Measured>)]) {
    println!(
        "\nwhat bounds the rows ({} cores; busy: share of all cores over the run; machine CPU: every process and the kernel, per unit as agent CPU)",
        cpu::cores()
    );
    println!(
        "{:<10} {:<32} {:>11} {:>9} {:>16} {:>16} {:>16} {:>13} {:>20}",
        "topology",
        "row",
        "busy direct",
        "busy Weir",
        "machine direct",
        "machine Weir",
        "agents",
        "if saturated",
        "no agent user space"
    );
    for (name, direct, weir, _) in tables {
        for (index, row) in selected.iter().enumerate() {
            let (direct, weir) = (direct.rows[index], weir.rows[index]);
            let (agents, agents_user) = match (weir.agent_cpu, weir.agent_kernel_share) {
                (Some(cpu), Some(kernel)) => (
                    format!("{cpu:.2} ({:.0} % k)", kernel * 100.0),
                    cpu * (1.0 - kernel),
                ),
                _ => ("-".into(), 0.0),
            };
            println!(
                "{:<10} {:<32} {:>10.0}% {:>8.0}% {:>16.2} {:>16.2} {:>16} {:>13.2} {:>20.2}",
                name,
                row.name(),
                direct.busy * 100.0,
                weir.busy * 100.0,
                direct.machine_cpu,
                weir.machine_cpu,
                agents,
                direct.machine_cpu / weir.machine_cpu,
                direct.machine_cpu / (weir.machine_cpu - agents_user),
            );
        }
    }
}

/// The run with the median rate (its latency and CPU with it).
fn median_run(mut runs: Vec<Measure>) -> Measure {
    runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    runs.get(runs.len() / 2).copied().unwrap_or_default()
}

fn cpu(measure: &Measure) -> String {
    measure
        .agent_cpu
        .map_or_else(|| "-".into(), |cpu| format!("{cpu:.2}"))
}

fn mib(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |mib| format!("{mib:.1}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output_and_refuses_errors() {
        let output = "Running 5s test @ http://10.77.2.3:8080/
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    61.17us   20.11us   1.20ms   94.60%
    Req/Sec    15.99k     1.02k   17.50k    72.55%
  Latency Distribution
     50%   57.00us
     75%   62.00us
     90%   71.00us
     99%  122.00us
  81135 requests in 5.10s, 12.61MB read
Requests/sec:  15909.20
Transfer/sec:      2.47MB
";
        assert_eq!(
            parse_wrk(output).ok(),
            Some(Wrk {
                requests_per_s: 15909.20,
                p50_us: 57.0,
                requests: 81135.0,
            })
        );
        let failed = output.replace(
            "Requests/sec",
            "  Socket errors: connect 0, read 3, write 0, timeout 0\nRequests/sec",
        );
        assert!(parse_wrk(&failed).is_err());
        assert_eq!(duration_us("1.50ms"), Some(1500.0));
        assert_eq!(duration_us("2.00s"), Some(2e6));
    }
}
