//! `cargo xtask bench http` (`weir-bench http`): HTTP requests/s, latency percentiles and the
//! agent's CPU per request on one namespaced node, in three modes measured
//! in the same run against the same server:
//!
//! - direct: pod a to pod b's address, neither enrolled (no agent);
//! - L4: both enrolled, a calls service VIP 10.96.9.1:80 (backed by b), which
//!   the agent relays as TCP (no route configuration);
//! - L7: the same with a route configuration for the service, so every
//!   request is parsed and routed (`/` to `outbound|80||web.test`), with
//!   telemetry off (no request metrics, no access log, no tracing);
//! - L7+tel: the same with telemetry on: Istio's request metrics, an
//!   access-log line per request and spans sampled at 1 % exported to an
//!   OTLP collector (the tests' own).
//!
//! The load is h2load (nghttp2-client) inside pod a: HTTP/1.1 keep-alive and
//! h2c, first at saturation, then at a fixed total rate (latency without
//! queueing). Percentiles come from h2load's per-request log. Not a test:
//! nothing here asserts a timing, but every request must succeed with a 2xx
//! and reach the server, or the bench fails naming the mode.
use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::json;
use weir_tests::{AgentOptions, Pod, TestNode, wait_for};

use weir_tests::step;

const VIP: &str = "10.96.9.1";
const SERVICE: &str = "test/web.test";
const SERVER_PORT: u16 = 8080;
/// HTTP/1.1: keep-alive connections, one request in flight on each.
const H1_CONNECTIONS: u64 = 8;
/// HTTP/2: connections, and concurrent streams on each.
const H2_CONNECTIONS: u64 = 4;
const H2_STREAMS: u64 = 16;

#[derive(Clone, Copy, PartialEq, PartialOrd)]
enum Mode {
    Direct,
    L4,
    L7,
    L7Telemetry,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::L4 => "L4",
            Mode::L7 => "L7",
            Mode::L7Telemetry => "L7+tel",
        }
    }
}

#[derive(Clone, Copy, PartialEq, PartialOrd)]
enum Protocol {
    Http1,
    Http2,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Http1 => "http/1.1",
            Protocol::Http2 => "h2c",
        }
    }

    fn connections(self) -> u64 {
        match self {
            Protocol::Http1 => H1_CONNECTIONS,
            Protocol::Http2 => H2_CONNECTIONS,
        }
    }

    /// h2load's arguments for this protocol's connection shape.
    fn args(self) -> Vec<String> {
        match self {
            Protocol::Http1 => vec!["--h1".into(), "-c".into(), H1_CONNECTIONS.to_string()],
            Protocol::Http2 => vec![
                "-c".into(),
                H2_CONNECTIONS.to_string(),
                "-m".into(),
                H2_STREAMS.to_string(),
            ],
        }
    }
}

#[derive(Clone, Copy, PartialEq, PartialOrd)]
enum Load {
    Saturated,
    /// Total requests/s.
    Rate(u64),
}

impl Load {
    fn name(self) -> String {
        match self {
            Load::Saturated => "max".into(),
            Load::Rate(rate) => format!("{rate}/s"),
        }
    }
}

/// One h2load run, as measured.
struct Run {
    mode: Mode,
    protocol: Protocol,
    load: Load,
    requests_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    /// Agent CPU (user + system) per 10,000 requests; `None` without an agent.
    agent_cpu_s_per_10k: Option<f64>,
}

/// `httptool serve` in pod b. Its one-JSON-line-per-request output is only
/// counted, not parsed and kept as `weir_tests::http::HttpServer` does: at
/// hundreds of thousands of requests that would cost this process a core's
/// share and hundreds of MiB, on the same two cores as what is measured.
struct Backend {
    child: Child,
    served: Arc<AtomicU64>,
}

impl Backend {
    fn start(pod: &Pod) -> anyhow::Result<Backend> {
        let mut command = weir_tests::http::httptool(pod)?.args([
            "serve",
            "--port",
            &SERVER_PORT.to_string(),
            "--name",
            "b",
        ]);
        command
            .command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let child = command.spawn().context("starting httptool serve")?;
        // Killed on drop, whatever fails from here.
        let mut backend = Backend {
            child,
            served: Arc::new(AtomicU64::new(0)),
        };
        let stdout = backend
            .child
            .stdout
            .take()
            .context("httptool serve stdout")?;
        let mut reader = BufReader::with_capacity(1 << 16, stdout);
        let mut first = String::new();
        reader
            .read_line(&mut first)
            .context("reading httptool serve's first line")?;
        if first.trim() != "listening" {
            bail!("httptool serve in {} did not start: {first:?}", pod.name);
        }
        let served = backend.served.clone();
        std::thread::spawn(move || {
            while let Ok(chunk) = reader.fill_buf() {
                if chunk.is_empty() {
                    break;
                }
                let lines = chunk.iter().filter(|&&byte| byte == b'\n').count();
                served.fetch_add(lines as u64, Ordering::Relaxed);
                let consumed = chunk.len();
                reader.consume(consumed);
            }
        });
        Ok(backend)
    }

    /// Requests the server has reported so far.
    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Waits until the server has reported `count` requests in all (its
    /// lines can trail the client's last response by a moment).
    fn wait_served(&self, count: u64) -> anyhow::Result<()> {
        wait_for(
            &format!("{count} requests at the server"),
            Duration::from_secs(10),
            || (self.served() >= count).then_some(()),
        )
        .with_context(|| {
            format!(
                "the server saw {} requests, h2load had {count} answered",
                self.served()
            )
        })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent's process: the one whose command line names this node's
/// config file. (`TestNode` keeps the agent's `Child` private.)
fn agent_pid(node: &TestNode) -> anyhow::Result<u32> {
    let config = node.dir.join("agent.yaml");
    let config = config.as_os_str().as_encoded_bytes();
    let entries = std::fs::read_dir("/proc").context("listing /proc")?;
    for entry in entries.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        // A process can exit while we look: skip what cannot be read.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let mut args = cmdline.split(|&byte| byte == 0);
        let is_weir = args
            .next()
            .is_some_and(|program| program.rsplit(|&byte| byte == b'/').next() == Some(b"weir"));
        if is_weir && args.any(|arg| arg == config) {
            return Ok(pid);
        }
    }
    bail!(
        "no agent process with --config {}",
        node.dir.join("agent.yaml").display()
    )
}

/// What h2load printed, and the per-request latencies it logged.
struct H2loadReport {
    requests_per_s: f64,
    latencies_us: Vec<u64>,
}

/// The `N word` counts of an h2load summary line such as
/// `requests: 10 total, 10 started, 10 done, 10 succeeded, 0 failed, …`.
fn counts<'a>(output: &'a str, prefix: &str) -> anyhow::Result<Vec<(&'a str, u64)>> {
    let line = output
        .lines()
        .find_map(|line| line.strip_prefix(prefix))
        .with_context(|| format!("no `{prefix}` line in h2load's output:\n{output}"))?;
    line.split(',')
        .map(|item| {
            let mut words = item.split_whitespace();
            match (words.next().and_then(|n| n.parse().ok()), words.next()) {
                (Some(count), Some(word)) => Ok((word, count)),
                _ => bail!("cannot read {item:?} in `{prefix}{line}`"),
            }
        })
        .collect()
}

fn count(counts: &[(&str, u64)], word: &str) -> u64 {
    counts
        .iter()
        .find(|(name, _)| *name == word)
        .map_or(0, |(_, count)| *count)
}

/// Checks every request succeeded with a 2xx; returns requests/s.
pub(crate) fn check_h2load_output(output: &str, requests: u64) -> anyhow::Result<f64> {
    let finished = output
        .lines()
        .find_map(|line| line.strip_prefix("finished in "))
        .with_context(|| format!("no `finished in` line in h2load's output:\n{output}"))?;
    let requests_per_s = finished
        .split(',')
        .find_map(|item| item.trim().strip_suffix(" req/s"))
        .and_then(|value| value.parse::<f64>().ok())
        .with_context(|| format!("no req/s in `finished in {finished}`"))?;
    let outcome = counts(output, "requests: ")?;
    let statuses = counts(output, "status codes: ")?;
    let failed =
        count(&outcome, "failed") + count(&outcome, "errored") + count(&outcome, "timeout");
    let non_2xx = count(&statuses, "3xx") + count(&statuses, "4xx") + count(&statuses, "5xx");
    let succeeded = count(&outcome, "succeeded");
    let ok = count(&statuses, "2xx");
    if failed > 0 || non_2xx > 0 || succeeded != requests || ok != requests {
        bail!(
            "{requests} requests: {succeeded} succeeded, {failed} failed/errored/timed out, {ok} 2xx, {non_2xx} non-2xx\n{output}"
        );
    }
    Ok(requests_per_s)
}

/// Latencies (µs) from h2load's `--log-file`: one line per request,
/// `start µs <TAB> status <TAB> µs to the end of the response`.
fn read_latencies(log: &Path, requests: u64) -> anyhow::Result<Vec<u64>> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let mut latencies = Vec::with_capacity(requests as usize);
    for line in text.lines() {
        let mut columns = line.split('\t');
        let (_, status, latency) = (columns.next(), columns.next(), columns.next());
        let status: i64 = status
            .and_then(|status| status.parse().ok())
            .with_context(|| format!("h2load log line {line:?}"))?;
        if !(200..300).contains(&status) {
            bail!("h2load logged status {status}: {line:?}");
        }
        latencies.push(
            latency
                .and_then(|latency| latency.parse().ok())
                .with_context(|| format!("h2load log line {line:?}"))?,
        );
    }
    if latencies.len() as u64 != requests {
        bail!(
            "h2load logged {} requests of {requests} ({})",
            latencies.len(),
            log.display()
        );
    }
    latencies.sort_unstable();
    Ok(latencies)
}

/// Nearest-rank percentile of sorted values, in ms.
fn percentile_ms(sorted_us: &[u64], fraction: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = (fraction * sorted_us.len() as f64).ceil() as usize;
    sorted_us[rank.clamp(1, sorted_us.len()) - 1] as f64 / 1e3
}

/// Runs h2load in pod a: `requests` requests to `url` in `protocol`'s
/// connection shape, at `load`.
fn h2load(
    a: &Pod,
    url: &str,
    protocol: Protocol,
    load: Load,
    requests: u64,
    log: &Path,
) -> anyhow::Result<H2loadReport> {
    let mut args = protocol.args();
    args.extend(["-n".into(), requests.to_string()]);
    // Generous: a run that takes this long is broken, not slow.
    let mut deadline_s = 60 + requests / 500;
    if let Load::Rate(rate) = load {
        // h2load's rate is per connection.
        let per_client = (rate / protocol.connections()).max(1);
        args.extend(["--rps".into(), per_client.to_string()]);
        deadline_s += requests / (per_client * protocol.connections());
    }
    args.push(format!("--log-file={}", log.display()));
    args.push(url.into());
    let output = a
        .command("timeout")?
        .args(["--kill-after=5", &deadline_s.to_string(), "h2load"])
        .args(&args)
        .output()
        .context("running h2load (apt-get install nghttp2-client)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if output.status.code() == Some(124) {
        bail!(
            "h2load {} timed out after {deadline_s} s:\n{stdout}",
            args.join(" ")
        );
    }
    if !output.status.success() {
        bail!(
            "h2load {} failed ({}): {}\n{stdout}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let requests_per_s = check_h2load_output(&stdout, requests)
        .with_context(|| format!("h2load {}", args.join(" ")))?;
    let latencies_us = read_latencies(log, requests)?;
    let _ = std::fs::remove_file(log);
    Ok(H2loadReport {
        requests_per_s,
        latencies_us,
    })
}

/// The bench's parameters.
#[derive(Clone, Copy, clap::Args)]
pub struct Options {
    /// Requests per saturation run (each mode and protocol).
    #[arg(long, default_value_t = 100_000)]
    pub requests: u64,
    /// Total requests/s of the fixed-rate runs.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Requests per fixed-rate run.
    #[arg(long, default_value_t = 10_000)]
    pub rate_requests: u64,
}

/// The node, its server, and what has been measured on it.
struct Bench {
    // Dropped in this order: the server, then the node.
    backend: Backend,
    node: TestNode,
    options: Options,
    /// Requests the server should have seen so far.
    expected: u64,
    results: Vec<Run>,
}

impl Bench {
    /// Every protocol and load, in `mode`, from pod a to `url`; `agent`
    /// is the agent's pid, for its CPU time.
    fn measure(&mut self, mode: Mode, url: &str, agent: Option<u32>) -> anyhow::Result<()> {
        let options = self.options;
        for protocol in [Protocol::Http1, Protocol::Http2] {
            let a = self.node.pod("a");
            let log = self.node.dir.join(format!(
                "h2load-{}-{}.log",
                mode.name(),
                protocol.name().replace('/', "")
            ));
            // Warm-up (connections, the proxy's upstream pool), not recorded.
            let warm_up = (options.requests / 10).clamp(1000, 5000);
            let l7 = matches!(mode, Mode::L7 | Mode::L7Telemetry);
            let before = if l7 { l7_requests(&self.node) } else { None };
            h2load(a, url, protocol, Load::Saturated, warm_up, &log)
                .with_context(|| format!("{} {} warm-up", mode.name(), protocol.name()))?;
            self.expected += warm_up;
            if l7 {
                check_l7(&self.node, protocol, before.unwrap_or(0) + warm_up)?;
            }
            for (load, requests) in [
                (Load::Saturated, options.requests),
                (Load::Rate(options.rate), options.rate_requests),
            ] {
                let what = format!("{} {} {}", mode.name(), protocol.name(), load.name());
                step(&format!("{what}: {requests} requests"));
                let cpu_before = agent.map(crate::cpu::seconds).transpose()?;
                let report =
                    h2load(a, url, protocol, load, requests, &log).with_context(|| what.clone())?;
                let cpu = match (agent, cpu_before) {
                    (Some(pid), Some(before)) => Some(crate::cpu::seconds(pid)? - before),
                    _ => None,
                };
                self.expected += requests;
                self.backend
                    .wait_served(self.expected)
                    .with_context(|| what.clone())?;
                self.results.push(Run {
                    mode,
                    protocol,
                    load,
                    requests_per_s: report.requests_per_s,
                    p50_ms: percentile_ms(&report.latencies_us, 0.50),
                    p99_ms: percentile_ms(&report.latencies_us, 0.99),
                    p999_ms: percentile_ms(&report.latencies_us, 0.999),
                    agent_cpu_s_per_10k: cpu.map(|seconds| seconds / requests as f64 * 1e4),
                });
            }
        }
        Ok(())
    }
}

/// Requests the L7 proxy has handled (`/stats`: counted whatever telemetry
/// is on).
fn l7_requests(node: &TestNode) -> Option<u64> {
    let (_, text) = node.http_get(15000, "/stats").ok()?;
    let stats: serde_json::Value = serde_json::from_str(&text).ok()?;
    stats["http"]["requests"].as_u64()
}

/// The L7 path really parsed the warm-up's requests: the proxy's request
/// count reached `expected`.
fn check_l7(node: &TestNode, protocol: Protocol, expected: u64) -> anyhow::Result<()> {
    wait_for(
        &format!(
            "{expected} requests counted by the L7 proxy ({})",
            protocol.name()
        ),
        Duration::from_secs(5),
        || l7_requests(node).filter(|count| *count >= expected),
    )
    .map(|_| ())
    .context("L7: the proxy did not handle the requests as HTTP")
}

/// What the agent runs with: routes or not, and telemetry (`Some` OTLP
/// endpoint: access log on and 1 % tracing; `None`: access log off).
fn agent_options(routes: bool, telemetry: Option<&str>) -> AgentOptions {
    let routing = json!({
        "route_configs": [{
            "name": "web.test",
            "virtual_hosts": [{
                "name": "web",
                "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "outbound|80||web.test"}}],
            }],
        }],
    });
    AgentOptions {
        services: vec![format!(
            "{{namespace: test, hostname: web.test, vips: [{VIP}], ports: [{{service_port: 80, target_port: {SERVER_PORT}}}]}}"
        )],
        backs: vec![("b".into(), SERVICE.into())],
        extra_config: {
            let mut extra = String::new();
            if routes {
                extra.push_str(&format!("routing: {routing}\n"));
            }
            match telemetry {
                Some(endpoint) => extra.push_str(&format!(
                    "tracing: {{otlp_endpoint: \"{endpoint}\", sampling: 1.0}}\n"
                )),
                None if routes => {
                    extra.push_str("access_log: {enabled: false}\nmetrics: {requests: false}\n")
                }
                None => {}
            }
            extra
        },
        ..AgentOptions::enroll(&["a", "b"])
    }
}

pub fn run(options: Options) -> anyhow::Result<()> {
    // h2load needs at least one request per connection.
    let minimum = H1_CONNECTIONS.max(H2_CONNECTIONS);
    let options = Options {
        requests: options.requests.max(minimum),
        rate: options.rate.max(minimum),
        rate_requests: options.rate_requests.max(minimum),
    };
    crate::tcp::use_release_binaries()?;
    let mut node = TestNode::new()?;
    node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let mut bench = Bench {
        backend: Backend::start(&b)?,
        node,
        options,
        expected: 0,
        results: Vec::new(),
    };

    step("HTTP direct: pod a to pod b, no agent");
    bench.measure(
        Mode::Direct,
        &format!("http://{}:{SERVER_PORT}/", b.ip),
        None,
    )?;

    step("HTTP L4: both pods enrolled, the service VIP relayed as TCP");
    let vip_url = format!("http://{VIP}/");
    bench.node.start_agent(&agent_options(false, None))?;
    let pid = agent_pid(&bench.node)?;
    let captured = bench.node.counter("connect_captured")?;
    bench.measure(Mode::L4, &vip_url, Some(pid))?;
    let captured = bench.node.counter("connect_captured")? - captured;
    // Warm-up, saturated and fixed-rate runs of each protocol.
    let connections = 3 * (H1_CONNECTIONS + H2_CONNECTIONS);
    if captured < connections {
        bail!("L4: only {captured} of at least {connections} connections were captured");
    }
    if !bench.node.log_lines(&["protocol=\"http/"]).is_empty() {
        bail!("L4: the agent handled connections as HTTP without a route configuration");
    }

    step("HTTP L7: a route configuration for the service, every request routed");
    bench.node.reconfigure_agent(&agent_options(true, None))?;
    if agent_pid(&bench.node)? != pid {
        bail!("L7: the agent restarted on reconfiguration");
    }
    bench.measure(Mode::L7, &vip_url, Some(pid))?;

    step("HTTP L7 with telemetry: request metrics, access log, 1 % of requests traced over OTLP");
    // Tracing settings apply at start: a new agent with the same routes.
    let collector = weir_tests::otlp_collector::Collector::start(&bench.node.netns_path())?;
    bench.node.stop_agent()?;
    bench
        .node
        .start_agent(&agent_options(true, Some(&collector.endpoint())))?;
    let pid = agent_pid(&bench.node)?;
    bench.measure(Mode::L7Telemetry, &vip_url, Some(pid))?;
    let spans = collector.spans().len();
    step(&format!("the collector received {spans} spans"));
    if spans == 0 {
        bail!("L7+tel: no span reached the collector");
    }
    print_table(&bench.results, options);
    Ok(())
}

fn print_table(results: &[Run], options: Options) {
    println!(
        "\nHTTP, one node, pod a to b (httptool serve) through the service VIP; h2load in a, HTTP/1.1 on {H1_CONNECTIONS} keep-alive connections, h2c on {H2_CONNECTIONS} connections x {H2_STREAMS} streams"
    );
    println!(
        "{:<7} {:<9} {:>7} {:>9} {:>8} {:>8} {:>8} {:>10} {:>8} {:>8} {:>9} {:>9}",
        "mode",
        "protocol",
        "load",
        "req/s",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "CPU s/10k",
        "rps/dir",
        "p99/dir",
        "rps/base",
        "p99/base"
    );
    let find = |mode: Mode, run: &Run| {
        results.iter().find(|other| {
            other.mode == mode && other.protocol == run.protocol && other.load == run.load
        })
    };
    let mut sorted: Vec<&Run> = results.iter().collect();
    sorted.sort_by(|x, y| {
        (x.load == Load::Saturated)
            .cmp(&(y.load == Load::Saturated))
            .reverse()
            .then(
                x.protocol
                    .partial_cmp(&y.protocol)
                    .unwrap_or(std::cmp::Ordering::Equal),
            )
            .then(
                x.mode
                    .partial_cmp(&y.mode)
                    .unwrap_or(std::cmp::Ordering::Equal),
            )
    });
    let ratio = |value: f64, base: Option<f64>| match base {
        Some(base) if base > 0.0 => format!("{:.2}", value / base),
        _ => "-".into(),
    };
    for run in sorted {
        let direct = find(Mode::Direct, run).filter(|_| run.mode != Mode::Direct);
        // L7 against L4 (the cost of parsing and routing); L7 with telemetry
        // against L7 without (the cost of the access log and tracing).
        let l4 = match run.mode {
            Mode::L7 => find(Mode::L4, run),
            Mode::L7Telemetry => find(Mode::L7, run),
            _ => None,
        };
        println!(
            "{:<7} {:<9} {:>7} {:>9.0} {:>8.3} {:>8.3} {:>8.3} {:>10} {:>8} {:>8} {:>9} {:>9}",
            run.mode.name(),
            run.protocol.name(),
            run.load.name(),
            run.requests_per_s,
            run.p50_ms,
            run.p99_ms,
            run.p999_ms,
            run.agent_cpu_s_per_10k
                .map_or_else(|| "-".into(), |cpu| format!("{cpu:.3}")),
            ratio(run.requests_per_s, direct.map(|d| d.requests_per_s)),
            ratio(run.p99_ms, direct.map(|d| d.p99_ms)),
            ratio(run.requests_per_s, l4.map(|d| d.requests_per_s)),
            ratio(run.p99_ms, l4.map(|d| d.p99_ms)),
        );
    }
    println!(
        "\nmax: {} requests at saturation; {}/s: {} requests at a fixed total rate. Percentiles from h2load's per-request log;",
        options.requests, options.rate, options.rate_requests
    );
    println!(
        "CPU s/10k: the agent's user+system CPU seconds per 10,000 requests; ratios are against direct (rps/dir, p99/dir) and a base (L7: L4; L7+tel: L7 without request metrics, access log and tracing) in this run."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "finished in 82.84ms, 2414.38 req/s, 796.93KB/s
requests: 200 total, 200 started, 200 done, 200 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 200 2xx, 0 3xx, 0 4xx, 0 5xx
";

    #[test]
    fn reads_h2load_output_and_rejects_failures() {
        let rps = check_h2load_output(OUTPUT, 200).expect("all 2xx");
        assert!((rps - 2414.38).abs() < 1e-9);
        let non_2xx = OUTPUT.replace(
            "200 2xx, 0 3xx, 0 4xx, 0 5xx",
            "199 2xx, 0 3xx, 0 4xx, 1 5xx",
        );
        assert!(check_h2load_output(&non_2xx, 200).is_err());
        let errored = OUTPUT.replace(
            "200 succeeded, 0 failed, 0 errored",
            "199 succeeded, 1 failed, 1 errored",
        );
        assert!(check_h2load_output(&errored, 200).is_err());
        assert!(
            check_h2load_output(OUTPUT, 300).is_err(),
            "fewer than asked"
        );
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let sorted: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile_ms(&sorted, 0.5), 0.5);
        assert_eq!(percentile_ms(&sorted, 0.99), 0.99);
        assert_eq!(percentile_ms(&sorted, 0.999), 0.999);
        assert_eq!(percentile_ms(&[7000], 0.999), 7.0);
    }
}
