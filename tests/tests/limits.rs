//! Timeouts and limits on every listener the agent serves: hostile clients
//! that connect and say nothing (or too little) are closed after the
//! configured timeouts and the agent's descriptors come back, while a
//! legitimate client keeps being served; the connection caps refuse and
//! count; an accept that fails for lack of descriptors does not spin; the
//! L7 server answers client errors itself (400, 431, 408) and never blames
//! the endpoint.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use serde_json::{Value, json};
use weir_agent::security::identity::{BuiltinCa, CertificateAuthority, Identity, SecretManager};
use weir_tests::{
    AgentOptions, TestNode,
    l7::{VIP, backend, mesh_with, static_cluster, status},
    metric_sample,
    node::{NsCommand, run},
    podtool::{self, Probe},
    silent::{self, Opening},
    wait_for,
};

/// A client config for the mesh: pod a's identity, signed by the node's
/// built-in CA root in `ca_dir`, expecting `server`'s identity.
fn mesh_client(ca_dir: &Path, server: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let ca = BuiltinCa::load(&ca_dir.join("root.pem"), &ca_dir.join("root-key.pem"))?;
    let secrets = SecretManager::new(
        CertificateAuthority::Builtin(Box::new(ca)),
        Duration::from_secs(3600),
        Duration::from_secs(60),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let certificate =
        runtime.block_on(secrets.fetch(&Identity::new("cluster.local", "test", "a")))?;
    Ok(weir_agent::security::tls::client_config(
        &certificate,
        Identity::new("cluster.local", "test", server),
    )?)
}

/// The agent's `/metrics` (from the node's namespace).
fn metrics(node: &TestNode) -> anyhow::Result<String> {
    let (code, body) = node.http_get(15020, "/metrics")?;
    anyhow::ensure!(code == 200, "/metrics: {code}");
    Ok(body)
}

fn counter(text: &str, name: &str, labels: &[&str]) -> f64 {
    metric_sample(text, name, labels).unwrap_or(0.0)
}

/// Silent and half-open connections to every listener of pod b: 15008
/// (plain TCP, a ClientHello fragment, TLS then nothing, HTTP/2 preface
/// and a HEADERS frame never finished), 15006 directly, b's captured app
/// port (through 15006), and pod a's outbound 15001 (idle after one
/// exchange). All are closed after the test's short timeouts and the
/// agent's descriptors come back to where they were, while probes through
/// HBONE (a → b, same node over mTLS) and plaintext (c → b) keep being
/// served throughout.
#[test]
fn silent_connections_are_closed_and_descriptors_come_back() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let c = node.add_pod("c")?;
    let ca_dir = node.dir.join("ca");
    TestNode::ca_init(&ca_dir)?;
    node.start_agent(&AgentOptions {
        same_node_mtls: true,
        ca_dir: Some(ca_dir.clone()),
        extra_config: "proxy: {handshake_timeout_ms: 2000, request_headers_timeout_ms: 2000, idle_timeout_ms: 3000}\n".into(),
        ..AgentOptions::enroll(&["a", "b"])
    })?;
    let pid = node.agent_pid().context("agent pid")?;
    let _echo = podtool::Server::start(&b, 7000, "echo")?;
    // The silent ones go to an application of their own: the flood fills
    // this test server's accept queue (128), which the probes must not
    // share.
    let _flooded = podtool::Server::start(&b, 7001, "echo")?;
    let app = SocketAddr::from((b.ip, 7000));
    let flooded_app = SocketAddr::from((b.ip, 7001));
    let through_hbone = Probe::start(&a, &app.to_string(), 50)?;
    let through_plaintext = Probe::start(&c, &app.to_string(), 50)?;
    let ok_lines = |probe: &Probe| probe.lines().iter().filter(|l| l["ok"] == true).count();
    wait_for("both probes served", Duration::from_secs(10), || {
        (ok_lines(&through_hbone) >= 3 && ok_lines(&through_plaintext) >= 3).then_some(())
    })?;
    let baseline = silent::open_descriptors(pid)?;

    let client = mesh_client(&ca_dir, "b")?;
    let hbone = SocketAddr::from((b.ip, 15008));
    let node_ns = node.netns_path();
    let mut groups = Vec::new();
    for (name, to, count, opening) in [
        ("15008 plain", hbone, 250, Opening::Nothing),
        (
            "15008 ClientHello fragment",
            hbone,
            250,
            Opening::Bytes(silent::CLIENT_HELLO_FRAGMENT.to_vec()),
        ),
        ("15008 TLS only", hbone, 250, Opening::Tls(client.clone())),
        (
            "15008 HEADERS without END_HEADERS",
            hbone,
            250,
            Opening::TlsHttp2PartialHeaders(client.clone()),
        ),
        (
            "15006",
            SocketAddr::from((b.ip, 15006)),
            100,
            Opening::Nothing,
        ),
        ("app port", flooded_app, 1000, Opening::Nothing),
    ] {
        groups.push((name, silent::open(&node_ns, to, count, &opening)?));
    }
    let open_per_group = |groups: &[(&str, Vec<TcpStream>)]| -> String {
        groups
            .iter()
            .map(|(name, streams)| format!("{name}: {}", streams.len() - silent::closed(streams)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // Pod a's own application: 200 connections through its outbound
    // listener, one exchange each, then idle.
    let mut hold = a
        .podtool()?
        .args(["hold", "--to", &flooded_app.to_string(), "--count", "200"]);
    hold.command.stdout(std::process::Stdio::piped());
    let mut hold = hold.spawn()?;
    let mut hold_line = String::new();
    if let Some(stdout) = hold.stdout.as_mut() {
        let mut byte = [0u8; 1];
        while stdout.read(&mut byte)? == 1 && byte[0] != b'\n' {
            hold_line.push(byte[0] as char);
        }
    }
    anyhow::ensure!(
        hold_line.contains("\"held\":200"),
        "podtool hold: {hold_line:?}"
    );

    let total: usize = groups.iter().map(|(_, streams)| streams.len()).sum();
    let opened = std::time::Instant::now();
    let peak = silent::open_descriptors(pid)?;
    let closed = wait_for(
        "every silent connection closed by the agent",
        Duration::from_secs(60),
        || {
            let closed: usize = groups
                .iter()
                .map(|(_, streams)| silent::closed(streams))
                .sum();
            (closed == total).then_some(())
        },
    );
    let descriptors = wait_for(
        "the agent's descriptors back near their baseline",
        Duration::from_secs(30),
        || {
            let now = silent::open_descriptors(pid).ok()?;
            (now <= baseline + 40).then_some(now)
        },
    );
    let _ = hold.kill();
    let _ = hold.wait();
    eprintln!(
        "{total} silent connections held; agent descriptors: {baseline} before, {peak} with them open, {} {:.1} s later",
        silent::open_descriptors(pid).unwrap_or(0),
        opened.elapsed().as_secs_f64()
    );
    closed.with_context(|| {
        format!(
            "still open: {}; {} descriptors (baseline {baseline})",
            open_per_group(&groups),
            silent::open_descriptors(pid).unwrap_or(0)
        )
    })?;
    descriptors.with_context(|| format!("baseline {baseline}"))?;

    // Each closed for its timeout, not for another reason.
    let text = metrics(&node)?;
    let timeouts = |phase: &str| {
        counter(
            &text,
            "weir_connection_timeouts_total",
            &[&format!("phase=\"{phase}\"")],
        )
    };
    assert!(timeouts("tls_handshake") >= 500.0, "{text}");
    assert!(timeouts("hbone_headers") >= 500.0, "{text}");
    assert!(timeouts("idle") >= 1200.0, "{text}");
    // Logged once per burst, not once per connection.
    let logged = node
        .log_lines(&["timed out before its first request"])
        .len();
    assert!((1..=10).contains(&logged), "{logged} timeout lines");

    // The legitimate clients were served throughout.
    for (name, probe) in [
        ("a -> b (HBONE)", &through_hbone),
        ("c -> b (plaintext)", &through_plaintext),
    ] {
        let lines = probe.lines();
        let failed: Vec<&Value> = lines.iter().filter(|line| line["ok"] != true).collect();
        assert!(failed.is_empty(), "{name}: {failed:?}");
        assert!(lines.len() >= 20, "{name}: {} probes", lines.len());
    }
    Ok(())
}

/// Exchanges a byte on `stream`: `true` if it echoed (the connection is
/// held open), `false` if the other side closed it.
fn echoed(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    stream.write_all(b"x").is_ok() && matches!(stream.read(&mut byte), Ok(1))
}

/// A connection to a pod's 15006 itself is refused, and the proxy's side
/// of it stays in TIME_WAIT; a second connection from the same address and
/// port to the pod's application must still be steered to the proxy (here:
/// refused, the pod is STRICT), not reach the application around it.
#[test]
fn a_refused_connection_to_15006_opens_no_way_around_the_proxy() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let b = node.add_pod("b")?;
    node.start_agent(&AgentOptions {
        strict: vec!["b".into()],
        ..AgentOptions::enroll(&["b"])
    })?;
    let _echo = podtool::Server::start(&b, 7000, "echo")?;
    let mut stream = silent::reuse_source_port(
        &node.netns_path(),
        SocketAddr::from((b.ip, 15006)),
        SocketAddr::from((b.ip, 7000)),
    )?;
    assert!(
        !echoed(&mut stream),
        "plaintext from outside the mesh reached the STRICT pod's application"
    );
    node.wait_for_log("plaintext to a STRICT workload", 1, Duration::from_secs(5))?;
    Ok(())
}

/// The caps: a pod's listeners hold at most `max_connections_per_pod`
/// connections and the node's at most `max_connections`; the rest are
/// closed at accept, counted by reason, and the refusal logged once for the
/// burst. Once connections end, new ones are served again.
#[test]
fn connection_caps_refuse_count_and_recover() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let b = node.add_pod("b")?;
    let c = node.add_pod("c")?;
    node.start_agent(&AgentOptions {
        extra_config: "proxy: {max_connections_per_pod: 20, max_connections: 30}\n".into(),
        ..AgentOptions::enroll(&["b", "c"])
    })?;
    let _echo_b = podtool::Server::start(&b, 7000, "echo")?;
    let _echo_c = podtool::Server::start(&c, 7000, "echo")?;
    let node_ns = node.netns_path();
    let outcomes = |to: SocketAddr, count: usize| -> anyhow::Result<(Vec<TcpStream>, usize)> {
        let mut streams = silent::open(&node_ns, to, count, &Opening::Nothing)?;
        let mut held = Vec::new();
        let mut refused = 0;
        for mut stream in streams.drain(..) {
            if echoed(&mut stream) {
                held.push(stream);
            } else {
                refused += 1;
            }
        }
        Ok((held, refused))
    };
    // b: 20 of 25 (its own cap); c: 10 of 15 (the node's cap of 30).
    let (held_b, refused_b) = outcomes(SocketAddr::from((b.ip, 7000)), 25)?;
    let (held_c, refused_c) = outcomes(SocketAddr::from((c.ip, 7000)), 15)?;
    assert_eq!((held_b.len(), refused_b), (20, 5), "pod b");
    assert_eq!((held_c.len(), refused_c), (10, 5), "pod c");

    let text = metrics(&node)?;
    let refused = |reason: &str| {
        counter(
            &text,
            "weir_connections_refused_total",
            &["listener=\"inbound\"", &format!("reason=\"{reason}\"")],
        )
    };
    assert_eq!(refused("pod_limit"), 5.0, "{text}");
    assert_eq!(refused("node_limit"), 5.0, "{text}");
    let logged = node.log_lines(&["connection refused: connection limit reached"]);
    assert!(
        (1..=2).contains(&logged.len()),
        "once per burst: {logged:?}"
    );

    // The held ones end: new connections are served again.
    drop(held_b);
    drop(held_c);
    wait_for(
        "a new connection to b served",
        Duration::from_secs(10),
        || {
            let mut streams = silent::open(
                &node_ns,
                SocketAddr::from((b.ip, 7000)),
                1,
                &Opening::Nothing,
            )
            .ok()?;
            streams.first_mut().is_some_and(echoed).then_some(())
        },
    )?;
    Ok(())
}

/// Out of descriptors, an admin listener whose accept fails pauses instead
/// of spinning: over the few seconds a client waits, the agent uses little
/// CPU and logs the failure a bounded number of times; once descriptors
/// are free again a waiting client is served.
#[test]
fn out_of_descriptors_the_admin_accept_does_not_spin() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    node.start_agent(&AgentOptions::default())?;
    let pid = node.agent_pid().context("agent pid")?;
    let open = silent::open_descriptors(pid)?;
    // No descriptor left for an accepted connection (below the count: the
    // agent opens and closes files now and then, its config among them).
    let limit = open.saturating_sub(4);
    let pid_text = pid.to_string();
    run(
        "prlimit",
        &["--pid", &pid_text, &format!("--nofile={limit}:")],
    )?;
    let curl = |max_time: &str| -> anyhow::Result<std::process::Child> {
        let mut client = NsCommand::new(Path::new("/usr/bin/curl"), &node.netns_path(), None)?
            .args(["-sS", "--max-time", max_time, "-o", "/dev/null"])
            .args(["-w", "%{http_code}", "http://127.0.0.1:15000/certs"]);
        client.command.stdout(std::process::Stdio::piped());
        client.command.stderr(std::process::Stdio::null());
        client.spawn()
    };
    // The window: a client that waits 4 s for an answer that cannot come.
    let before = silent::cpu_time(pid)?;
    let waiting = curl("4")?.wait_with_output()?;
    let used = silent::cpu_time(pid)?.saturating_sub(before);
    assert_eq!(
        String::from_utf8_lossy(&waiting.stdout),
        "000",
        "nothing can be accepted"
    );
    let failures = node.log_lines(&["accept failed", "admin"]);
    eprintln!(
        "out of descriptors for 4 s: {used:?} of agent CPU, {} accept-failure line(s)",
        failures.len()
    );
    assert!(
        (1..=2).contains(&failures.len()),
        "logged once per burst: {failures:?}\n{}",
        node.agent_log()
    );
    assert!(
        used < Duration::from_millis(1000),
        "{used:?} of CPU in a 4 s wait: the accept loop spins"
    );
    // The soft limit back up (the hard one was never lowered).
    run("prlimit", &["--pid", &pid_text, "--nofile=1024:"])?;
    let served = curl("20")?.wait_with_output()?;
    assert_eq!(String::from_utf8_lossy(&served.stdout), "200");
    Ok(())
}

/// Client errors in the L7 proxy, sent with raw sockets from pod a to the
/// service VIP: a bad chunk size is the client's fault (400, and neither
/// endpoint, under outlier detection that ejects at the first failure, is
/// ejected); headers over 60 KiB get 431; a client that starts its
/// headers and stalls gets 408 after the header timeout; an HTTP/2 client
/// that never finishes its first HEADERS is closed after it.
#[test]
fn l7_client_errors_are_answered_400_431_408() -> anyhow::Result<()> {
    let mesh = mesh_with(
        vec![json!({"match": {"prefix": "/"}, "route": {"cluster": "guarded"}})],
        |node| {
            let endpoints = ["b1", "b2"].map(|pod| format!("{}:8080", node.pod(pod).ip));
            vec![static_cluster(
                "guarded",
                &endpoints,
                json!({"outlier_detection": {"consecutive_5xx": 1,
                    "consecutive_gateway_failure": 1, "base_ejection_time": "60s",
                    "max_ejection_percent": 50}}),
            )]
        },
        "proxy: {request_headers_timeout_ms: 1500}\n",
    )?;
    let raw = |data: &str, wait_ms: u64| -> anyhow::Result<Value> {
        let output = mesh
            .node
            .pod("a")
            .podtool()?
            .args(["raw", "--to", &format!("{VIP}:80"), "--data", data])
            .args(["--wait-ms", &wait_ms.to_string()])
            .output()?;
        serde_json::from_slice(&output.stdout)
            .with_context(|| String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let status_line = |reply: &Value| reply["status_line"].as_str().unwrap_or("").to_string();

    let line = mesh.get_one("/before", &[])?;
    assert_eq!(status(&line), 200, "{line}");

    // A chunk size that is not hexadecimal.
    let reply = raw(
        "POST /upload HTTP/1.1\\r\\nHost: web\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\nzz\\r\\nhello\\r\\n0\\r\\n\\r\\n",
        5000,
    )?;
    assert!(status_line(&reply).starts_with("HTTP/1.1 400"), "{reply}");
    assert_eq!(reply["closed"], true, "{reply}");
    // Not counted against the endpoint that got it: neither is ejected
    // (an ejected one would get no request for 60 s).
    let mut backends = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let line = mesh.get_one("/after", &[])?;
        assert!(status(&line) == 200, "{line}");
        backends.insert(backend(&line).to_string());
    }
    assert!(backends.len() == 2, "both endpoints serve: {backends:?}");

    // 100 KB of headers: over the 60 KiB limit.
    let big = "b".repeat(100_000);
    let reply = raw(
        &format!("GET /big HTTP/1.1\\r\\nHost: web\\r\\nx-big: {big}\\r\\n\\r\\n"),
        5000,
    )?;
    assert!(status_line(&reply).starts_with("HTTP/1.1 431"), "{reply}");
    assert_eq!(reply["closed"], true, "{reply}");

    // Headers started, never finished: 408 after the header timeout.
    let reply = raw("GET /slow HTTP/1.1\\r\\nHost: web\\r\\nx-partial: ", 15_000)?;
    assert!(status_line(&reply).starts_with("HTTP/1.1 408"), "{reply}");
    assert_eq!(reply["closed"], true, "{reply}");

    // HTTP/2 (prior knowledge): a HEADERS frame without END_HEADERS whose
    // CONTINUATION never comes; closed after the header timeout.
    let reply = raw(
        "PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n\\x00\\x00\\x00\\x04\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x01\\x01\\x00\\x00\\x00\\x00\\x01\\x82",
        15_000,
    )?;
    assert_eq!(reply["closed"], true, "{reply}");
    let text = mesh.node.http_get(15020, "/metrics")?.1;
    assert!(
        counter(
            &text,
            "weir_connection_timeouts_total",
            &["phase=\"request_headers\""]
        ) >= 2.0,
        "{text}"
    );
    Ok(())
}
