//! The HBONE client's pool over time: certificate renewals, a peer that
//! goes silent, and pods released. Two nodes joined by a wire veth, each
//! with its own agent and a shared built-in CA root; the TLS connections
//! are counted as the kernel sees them (`ss` in the client pod's
//! namespace, where the tunnel's socket lives).
use std::{
    path::PathBuf,
    process::{Child, Output, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use weir_tests::{
    AgentOptions, Pod, RemoteWorkload, Server, TestNode, connect_nodes,
    node::{NsCommand, run},
    podtool::{self, Probe},
    wait_for,
};

/// `a` (and `c`) on node 1, `b` (echo server on 8080) on node 2.
struct TwoNodes {
    node1: TestNode,
    node2: TestNode,
    a: Pod,
    b: Pod,
    ca_dir: PathBuf,
    _server: Server,
}

impl TwoNodes {
    fn new() -> anyhow::Result<TwoNodes> {
        let mut node1 = TestNode::with_index(1)?;
        let mut node2 = TestNode::with_index(2)?;
        connect_nodes(&node1, &node2)?;
        let a = node1.add_pod("a")?;
        let b = node2.add_pod("b")?;
        let ca_dir = node1.dir.join("ca");
        TestNode::ca_init(&ca_dir)?;
        let server = Server::start(&b, 8080, "echo")?;
        Ok(TwoNodes {
            node1,
            node2,
            a,
            b,
            ca_dir,
            _server: server,
        })
    }

    /// Node 1 enrolls `pods` and knows `b`; certificates live `ttl` s.
    fn options1(&self, pods: &[&str], ttl: u64) -> AgentOptions {
        AgentOptions {
            remote: vec![RemoteWorkload::of(&self.b)],
            ca_dir: Some(self.ca_dir.clone()),
            cert_ttl_seconds: Some(ttl),
            ..AgentOptions::enroll(pods)
        }
    }

    fn start_node2(&mut self) -> anyhow::Result<()> {
        let options = AgentOptions {
            remote: vec![RemoteWorkload::of(&self.a)],
            ca_dir: Some(self.ca_dir.clone()),
            ..AgentOptions::enroll(&["b"])
        };
        self.node2.start_agent(&options)
    }

    fn target(&self) -> String {
        format!("{}:8080", self.b.ip)
    }
}

/// Local ports of the ESTABLISHED connections to a 15008 in `pod`'s
/// namespace: its HBONE tunnels' TLS connections.
fn tunnels(pod: &Pod) -> anyhow::Result<Vec<u16>> {
    let listing = run(
        "ss",
        &[
            "-N",
            &pod.netns,
            "-Htn",
            "state",
            "established",
            "( dport = :15008 )",
        ],
    )?;
    listing
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            columns
                .len()
                .checked_sub(2)
                .and_then(|local| columns[local].rsplit_once(':'))
                .and_then(|(_, port)| port.parse().ok())
                .with_context(|| format!("ss line {line:?}"))
        })
        .collect()
}

/// The sum of metric `name`'s samples whose labels contain all of
/// `labels` (0 when there are none).
fn metric(node: &TestNode, name: &str, labels: &[&str]) -> anyhow::Result<f64> {
    let (_, text) = node.http_get(15020, "/metrics")?;
    Ok(text
        .lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Runs `command`, which must end by itself within `deadline` (a hang is
/// the failure); its output whatever its exit status.
fn finishes(command: NsCommand, what: &str, deadline: Duration) -> anyhow::Result<Output> {
    let mut command = command;
    command
        .command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn()?;
    let ended = wait_for(what, deadline, || match child.try_wait() {
        Ok(Some(_)) | Err(_) => Some(()),
        Ok(None) => None,
    });
    if let Err(error) = ended {
        let _ = child.kill();
        let _ = child.wait();
        bail!("{error}: it hung");
    }
    Ok(child.wait_with_output()?)
}

fn last_json(output: &Output) -> anyhow::Result<serde_json::Value> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .with_context(|| format!("output {stdout:?}"))
}

/// A stopped process (SIGSTOP): its sockets stay open and its kernel still
/// answers TCP, but nothing above TCP answers. Continued on drop.
struct Stopped(i32);

impl Stopped {
    fn new(pid: u32) -> anyhow::Result<Stopped> {
        let pid = i32::try_from(pid)?;
        // SAFETY: signals a process this test started.
        if unsafe { libc::kill(pid, libc::SIGSTOP) } != 0 {
            bail!("SIGSTOP: {}", std::io::Error::last_os_error());
        }
        Ok(Stopped(pid))
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// After each renewal, new connections open a new TLS connection and the
/// old ones take no new streams and close when their last stream ends; a
/// stream started before the renewals keeps its connection and flows on.
#[test]
fn tls_connections_stay_bounded_across_renewals_and_an_older_stream_flows_on() -> anyhow::Result<()>
{
    let mut nodes = TwoNodes::new()?;
    let options1 = nodes.options1(&["a"], 10);
    nodes.node1.start_agent(&options1)?;
    nodes.start_node2()?;
    let target = nodes.target();
    let renewals = |node: &TestNode| node.log_lines(&["certificate renewed", "sa/a"]).len();
    let before = renewals(&nodes.node1);

    let mut stream: Child = {
        let mut command = nodes
            .a
            .podtool()?
            .args(["stream", "--to", &target, "--seconds", "26"]);
        command.command.stdout(Stdio::piped());
        command.spawn()?
    };
    let probe = Probe::start(&nodes.a, &target, 250)?;
    let succeeded = |probe: &Probe| probe.lines().iter().filter(|l| l["ok"] == true).count();
    for renewal in 1..=3 {
        wait_for(
            &format!("renewal {renewal} of a's certificate"),
            Duration::from_secs(20),
            || (renewals(&nodes.node1) >= before + renewal).then_some(()),
        )?;
        assert!(
            stream.try_wait()?.is_none(),
            "the long stream ended before renewal {renewal}"
        );
        // New connections after the renewal, then the old ones drained:
        // the long stream's connection and the current one remain.
        let probed = succeeded(&probe);
        wait_for(
            "two probes after the renewal",
            Duration::from_secs(10),
            || (succeeded(&probe) >= probed + 2).then_some(()),
        )?;
        let mut open = Vec::new();
        let bounded = wait_for(
            &format!("at most 2 TLS connections after renewal {renewal}"),
            Duration::from_secs(10),
            || {
                open = tunnels(&nodes.a).unwrap_or_default();
                (open.len() <= 2).then_some(())
            },
        );
        assert!(bounded.is_ok(), "after renewal {renewal}: {open:?}");
    }
    let pooled = metric(&nodes.node1, "weir_hbone_client_connections", &[])?;
    assert!(pooled <= 2.0, "weir_hbone_client_connections {pooled}");
    let retired = metric(
        &nodes.node1,
        "weir_hbone_client_connections_closed_total",
        &["reason=\"renewed\""],
    )?;
    assert!(retired >= 2.0, "closed after renewal: {retired}");

    let output = stream.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .with_context(|| format!("podtool stream output {stdout:?}"))?;
    assert!(
        report["ok"] == true && report["exchanges"].as_u64() > Some(0),
        "the stream across three renewals: {report}"
    );
    let lines = probe.lines().clone();
    assert!(
        lines.iter().all(|line| line["ok"] == true),
        "a new connection failed: {lines:?}"
    );
    Ok(())
}

/// A peer whose agent stops answering (SIGSTOP: its kernel still answers
/// TCP) is found out by the keepalive: its connection is closed, a new
/// connection meanwhile ends instead of hanging, and once the peer is
/// back new connections get a fresh tunnel.
#[test]
fn a_silent_peer_is_detected_and_new_connections_get_a_fresh_tunnel() -> anyhow::Result<()> {
    let mut nodes = TwoNodes::new()?;
    let mut options1 = nodes.options1(&["a"], 86400);
    options1.extra_config = "hbone_client: {keepalive_interval_seconds: 1, keepalive_timeout_seconds: 2, tls_handshake_timeout_seconds: 2, http2_handshake_timeout_seconds: 2, connect_timeout_seconds: 2}\n".into();
    nodes.node1.start_agent(&options1)?;
    nodes.start_node2()?;
    let target = nodes.target();
    let send = |pod: &Pod| -> anyhow::Result<serde_json::Value> {
        let command = pod
            .podtool()?
            .args(["send", "--to", &target, "--bytes", "1024"]);
        last_json(&finishes(command, "podtool send", Duration::from_secs(30))?)
    };

    assert_eq!(send(&nodes.a)?["intact"], true);
    let first = tunnels(&nodes.a)?;
    assert_eq!(first.len(), 1, "one tunnel: {first:?}");
    let silent = Stopped::new(nodes.node2.agent_pid().context("node 2's agent")?)?;

    // Opened while the peer is silent: it ends (the agent gives up and
    // closes it) rather than hanging on a CONNECT or a handshake.
    let during = send(&nodes.a)?;
    assert_eq!(during["intact"], false, "{during}");
    // The silent peer's connection is closed by the keepalive.
    wait_for(
        "the silent peer's connection to be closed",
        Duration::from_secs(30),
        || {
            tunnels(&nodes.a)
                .is_ok_and(|open| !open.contains(&first[0]))
                .then_some(())
        },
    )?;
    nodes.node1.wait_for_log(
        "HBONE peer stopped answering keepalive pings",
        1,
        Duration::from_secs(5),
    )?;
    // New connections now find no tunnel and open one; the TLS handshake
    // that the silent peer never answers times out, and those waiting on
    // that opening fail with it instead of hanging behind it.
    let burst = nodes
        .a
        .podtool()?
        .args(["burst", "--to", &target, "--count", "4"]);
    let burst = last_json(&finishes(burst, "podtool burst", Duration::from_secs(30))?)?;
    assert_eq!(burst["ok"], 0, "{burst}");
    let tls = metric(
        &nodes.node1,
        "weir_hbone_client_timeouts_total",
        &["phase=\"tls_handshake\""],
    )?;
    assert!(tls >= 1.0, "no TLS handshake timeout counted");
    nodes
        .node1
        .wait_for_log("phase=\"tls_handshake\"", 1, Duration::from_secs(5))?;

    drop(silent);
    let after = send(&nodes.a)?;
    assert_eq!(after["intact"], true, "{after}");
    let now = tunnels(&nodes.a)?;
    assert!(
        !now.is_empty() && !now.contains(&first[0]),
        "a fresh tunnel: before {first:?}, now {now:?}"
    );
    nodes
        .node2
        .wait_for_log("HBONE connection accepted", 2, Duration::from_secs(5))?;
    Ok(())
}

/// A tunnel's socket has TCP keepalive; a tunnel that carried nothing for
/// the idle timeout is closed, and the next connection opens a new one.
#[test]
fn an_idle_tunnel_is_closed_and_the_next_connection_opens_a_new_one() -> anyhow::Result<()> {
    let mut nodes = TwoNodes::new()?;
    let mut options1 = nodes.options1(&["a"], 86400);
    options1.extra_config = "hbone_client: {idle_timeout_seconds: 2}\n".into();
    nodes.node1.start_agent(&options1)?;
    nodes.start_node2()?;
    let report = podtool::send(&nodes.a, &nodes.target(), 1024)?;
    assert!(report.intact, "{report:?}");
    let first = tunnels(&nodes.a)?;
    assert_eq!(first.len(), 1, "{first:?}");
    // The tunnel's socket has TCP keepalive on (ss shows its timer).
    let timers = run(
        "ss",
        &[
            "-N",
            &nodes.a.netns,
            "-Htno",
            "state",
            "established",
            "( dport = :15008 )",
        ],
    )?;
    assert!(timers.contains("keepalive"), "no TCP keepalive: {timers}");
    wait_for("the idle tunnel to close", Duration::from_secs(15), || {
        tunnels(&nodes.a)
            .is_ok_and(|open| open.is_empty())
            .then_some(())
    })?;
    let idle = metric(
        &nodes.node1,
        "weir_hbone_client_connections_closed_total",
        &["reason=\"idle\""],
    )?;
    assert_eq!(idle, 1.0);
    let again = podtool::send(&nodes.a, &nodes.target(), 1024)?;
    assert!(again.intact, "{again:?}");
    nodes
        .node2
        .wait_for_log("HBONE connection accepted", 2, Duration::from_secs(5))?;
    Ok(())
}

/// A released pod's identity stops being renewed after its grace period,
/// leaves `/certs` and the metrics, and its tunnels are closed.
#[test]
fn a_released_pods_certificate_and_tunnels_are_forgotten() -> anyhow::Result<()> {
    let mut nodes = TwoNodes::new()?;
    let c = nodes.node1.add_pod("c")?;
    let mut options1 = nodes.options1(&["a", "c"], 10);
    options1.cert_keep_unused_seconds = Some(1);
    nodes.node1.start_agent(&options1)?;
    nodes.start_node2()?;
    let report = podtool::send(&c, &nodes.target(), 1024)?;
    assert!(report.intact && report.captured(), "{report:?}");
    assert_eq!(tunnels(&c)?.len(), 1, "c's tunnel");
    let certs = |node: &TestNode| -> String {
        node.http_get(15000, "/certs")
            .map(|(_, body)| body)
            .unwrap_or_default()
    };
    assert!(
        certs(&nodes.node1).contains("sa/c"),
        "{}",
        certs(&nodes.node1)
    );

    options1.enrolled = vec!["a".into()];
    nodes.node1.reconfigure_agent(&options1)?;
    let mut listed = String::new();
    let gone = wait_for(
        "c's certificate to leave /certs",
        Duration::from_secs(15),
        || {
            listed = certs(&nodes.node1);
            (!listed.contains("sa/c") && listed.contains("sa/a")).then_some(())
        },
    );
    assert!(gone.is_ok(), "/certs: {listed}");
    wait_for("c's tunnel to close", Duration::from_secs(10), || {
        tunnels(&c).is_ok_and(|open| open.is_empty()).then_some(())
    })?;
    nodes
        .node1
        .wait_for_log("certificate forgotten", 1, Duration::from_secs(5))?;

    // Two of a's renewals later, c's certificate was never requested again.
    let issued = |node: &TestNode| node.log_lines(&["certificate issued", "sa/c"]).len();
    let c_issued = issued(&nodes.node1);
    let a_renewed = nodes
        .node1
        .log_lines(&["certificate renewed", "sa/a"])
        .len();
    wait_for(
        "two renewals of a's certificate",
        Duration::from_secs(20),
        || {
            (nodes
                .node1
                .log_lines(&["certificate renewed", "sa/a"])
                .len()
                >= a_renewed + 2)
                .then_some(())
        },
    )?;
    assert_eq!(
        issued(&nodes.node1),
        c_issued,
        "c's certificate was renewed"
    );
    assert_eq!(metric(&nodes.node1, "weir_certificates_held", &[])?, 1.0);
    assert_eq!(
        metric(&nodes.node1, "weir_certificate_expiry_seconds", &["sa/c"])?,
        0.0,
        "c's expiry is still reported"
    );
    Ok(())
}
