//! Per-connection kernel telemetry: `sock_ops` keeps what the kernel
//! measures of the proxy's connections (round trips, retransmits,
//! segments), and the proxy puts it next to its own view when a connection
//! ends: the flow event (`weir trace`), the access log, and Istio-labelled
//! metrics; for plaintext connections, HBONE streams sharing a tunnel, and
//! L7 requests sharing a pooled upstream connection. Each path loses a
//! random one in 64 packets ([`lossy_path`]), so the kernel retransmits.
use weir_tests::{
    AgentOptions, Family, Server, TestNode, cni::ForeignProgram, metric_sample, podtool, trace,
};

/// A lossy path from `from` into `into`: a stand-in tcx program on
/// `into`'s interface drops a random one in 64 packets, and `from` sends
/// one segment per packet (no GSO super-packets), so the loss hits ~1 in
/// 64 segments, not 1 in 64 bursts of 64 KiB. Lossy while the link lives.
fn lossy_path(
    from: &weir_tests::Pod,
    into: &weir_tests::Pod,
) -> anyhow::Result<weir_tests::cni::ForeignLink> {
    let lossy = ForeignProgram::tcx_lossy(63)?;
    let link = lossy.attach_tcx(into, "eth0")?;
    weir_tests::node::run(
        "ip",
        &[
            "-n",
            &from.netns,
            "link",
            "set",
            "eth0",
            "gso_max_size",
            "1500",
        ],
    )?;
    Ok(link)
}

fn kernel_figures(family: Family) -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let c = node.add_pod("c")?;
    let _c_server = Server::start_family(&c, family, 8080, "echo")?;
    let _b_server = Server::start_family(&b, family, 8080, "echo")?;
    node.start_agent(&AgentOptions::enroll(&["a", "b"]))?;
    // From a's namespace, where the agent's upstream socket sends.
    let _loss = lossy_path(&a, &c)?;

    // Outbound: a's connection to c leaves through the agent's upstream socket.
    let out = podtool::send(&a, &c.addr(family, 8080), 2 << 20)?;
    assert!(out.intact && out.captured(), "{out:?}");
    let outbound = trace::recent(&node, "test/a", "allowed", 1)?;
    let kernel = outbound
        .first()
        .and_then(|event| event.kernel)
        .ok_or_else(|| anyhow::anyhow!("{family}: no kernel figures in {outbound:?}"))?;
    assert!(
        kernel.srtt_us > 0 && kernel.min_rtt_us > 0 && kernel.segs_out > 100,
        "{family}: {kernel:?}"
    );
    // The upstream leg carried a's 2 MiB and their echo (the figures are
    // the last sample's, a little behind the end).
    assert!(
        kernel.bytes_acked > 1 << 20 && kernel.bytes_received > 1 << 20,
        "{family}: {kernel:?}"
    );
    assert!(
        kernel.retransmits > 0,
        "{family}: one in 64 packets lost and no retransmit: {kernel:?}"
    );

    // Inbound: c's plaintext connection to b, as the agent accepted it.
    let into_b = podtool::send(&c, &b.addr(family, 8080), 256 << 10)?;
    assert!(into_b.intact, "{into_b:?}");
    let inbound = trace::recent(&node, "test/b", "allowed", 1)?;
    let inbound_kernel = inbound
        .first()
        .and_then(|event| event.kernel)
        .ok_or_else(|| anyhow::anyhow!("{family}: no kernel figures in {inbound:?}"))?;
    assert!(
        inbound_kernel.srtt_us > 0 && inbound_kernel.segs_in > 10,
        "{family}: {inbound_kernel:?}"
    );

    eprintln!("{family}: a -> c: {kernel}; c -> b: {inbound_kernel}");

    // Metrics with Istio's labels: one round-trip sample per connection,
    // and the retransmits the kernel counted on a's.
    let (_, metrics) = node.http_get(15020, "/metrics")?;
    let from_a = ["reporter=\"source\"", "source_workload=\"a\""];
    let samples = metric_sample(&metrics, "weir_tcp_round_trip_seconds_count", &from_a);
    assert_eq!(samples, Some(1.0), "{family}");
    let retransmits = metric_sample(&metrics, "weir_tcp_retransmits_total", &from_a);
    assert_eq!(retransmits, Some(f64::from(kernel.retransmits)), "{family}");
    let into_b_samples = metric_sample(
        &metrics,
        "weir_tcp_round_trip_seconds_count",
        &["reporter=\"destination\"", "destination_workload=\"b\""],
    );
    assert_eq!(into_b_samples, Some(1.0), "{family}");

    // The access log carries them.
    let lines = node.log_lines(&["connection", "pod=test/a", "srtt_us="]);
    assert!(
        lines.iter().any(|line| line.contains("retransmits=")),
        "{family}: {lines:?}"
    );
    Ok(())
}

#[test]
fn the_kernels_round_trips_and_retransmits_join_each_connection_over_ipv4() -> anyhow::Result<()> {
    kernel_figures(Family::V4)
}

#[test]
fn the_kernels_round_trips_and_retransmits_join_each_connection_over_ipv6() -> anyhow::Result<()> {
    kernel_figures(Family::V6)
}

/// The total retransmits the kernel reports (`ss -ti`: `retrans:N/TOTAL`)
/// of the established connections to a 15008 in `pod`'s namespace.
fn tunnel_retransmits(pod: &weir_tests::Pod) -> anyhow::Result<u32> {
    let listing = weir_tests::node::run(
        "ss",
        &[
            "-N",
            &pod.netns,
            "-Htni",
            "state",
            "established",
            "( dport = :15008 )",
        ],
    )?;
    Ok(listing
        .split_whitespace()
        .filter_map(|field| field.strip_prefix("retrans:"))
        .filter_map(|counts| counts.rsplit_once('/'))
        .filter_map(|(_, total)| total.parse::<u32>().ok())
        .sum())
}

/// HBONE: each stream's record gets its part of the tunnel socket's
/// figures, on both ends; the tunnel's retransmits are counted once across
/// the records of its streams.
fn tunnel_figures(family: Family) -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _b_server = Server::start_family(&b, family, 8080, "echo")?;
    // a's connections to b through b's HBONE listener: one tunnel, whose
    // socket is in a's namespace and its peer's in b's.
    node.start_agent(&AgentOptions {
        same_node_mtls: true,
        ..AgentOptions::enroll(&["a", "b"])
    })?;
    let _loss = lossy_path(&a, &b)?;

    for _ in 0..2 {
        let out = podtool::send(&a, &b.addr(family, 8080), 2 << 20)?;
        assert!(out.intact && out.captured(), "{family}: {out:?}");
    }
    let outbound = trace::recent(&node, "test/a", "allowed", 2)?;
    let inbound = trace::recent(&node, "test/b", "allowed", 2)?;
    assert_eq!(outbound.len(), 2, "{family}: {outbound:?}");
    assert_eq!(inbound.len(), 2, "{family}: {inbound:?}");
    let figures = |events: &[weir_agent::telemetry::flows::FlowRecord]| {
        events
            .iter()
            .map(|event| event.kernel)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| anyhow::anyhow!("{family}: no kernel figures in {events:?}"))
    };
    let sent = figures(&outbound)?;
    let received = figures(&inbound)?;
    for kernel in &sent {
        // Each stream's share: the tunnel's round trips, and what the
        // tunnel carried while the stream lasted: its 2 MiB, in TLS
        // records, and not the other stream's too. (The kernel's figures
        // are as of its last sample, an ACK of the socket's own data: the
        // last bytes of a stream may not be in them yet.)
        assert!(kernel.shared && kernel.srtt_us > 0, "{family}: {kernel:?}");
        assert!(
            kernel.bytes_acked > 1 << 20 && kernel.bytes_acked < 3 << 20,
            "{family}: {kernel:?}"
        );
    }
    for kernel in &received {
        assert!(kernel.shared && kernel.srtt_us > 0, "{family}: {kernel:?}");
        assert!(
            kernel.bytes_received > 1 << 20 && kernel.bytes_received < 3 << 20,
            "{family}: {kernel:?}"
        );
    }
    // One tunnel, whose retransmits (one in 64 packets into b lost) are
    // shared out, none twice: at most what the kernel counted in all.
    let attributed: u32 = sent.iter().map(|kernel| kernel.retransmits).sum();
    let total = tunnel_retransmits(&a)?;
    assert!(
        attributed > 0,
        "{family}: no retransmit attributed: {sent:?}"
    );
    assert!(
        attributed <= total,
        "{family}: {attributed} retransmits attributed, the tunnel had {total}"
    );
    eprintln!(
        "{family}: a's streams: {} / {}; b's: {} / {}; tunnel retransmits {total}",
        sent[0], sent[1], received[0], received[1]
    );

    let (_, metrics) = node.http_get(15020, "/metrics")?;
    let from_a = ["reporter=\"source\"", "source_workload=\"a\""];
    let samples = metric_sample(&metrics, "weir_tcp_round_trip_seconds_count", &from_a);
    assert_eq!(samples, Some(2.0), "{family}");
    let retransmits = metric_sample(&metrics, "weir_tcp_retransmits_total", &from_a);
    assert_eq!(retransmits, Some(f64::from(attributed)), "{family}");
    let into_b = metric_sample(
        &metrics,
        "weir_tcp_round_trip_seconds_count",
        &["reporter=\"destination\"", "destination_workload=\"b\""],
    );
    assert_eq!(into_b, Some(2.0), "{family}");
    // The access log is written every 20 ms: its lines may follow the
    // metrics by that much.
    node.wait_for_log("tcp_leg_shared=true", 1, std::time::Duration::from_secs(5))?;
    let lines = node.log_lines(&["connection", "pod=test/a", "protocol=\"hbone\""]);
    assert!(
        lines
            .iter()
            .any(|line| line.contains("tcp_leg_shared=true")),
        "{family}: {lines:?}"
    );
    Ok(())
}

#[test]
fn hbone_streams_share_their_tunnels_kernel_figures_over_ipv4() -> anyhow::Result<()> {
    tunnel_figures(Family::V4)
}

#[test]
fn hbone_streams_share_their_tunnels_kernel_figures_over_ipv6() -> anyhow::Result<()> {
    tunnel_figures(Family::V6)
}

/// `capture.tcp_stats: false`: the records carry no kernel figures.
#[test]
fn without_kernel_telemetry_records_carry_no_kernel_figures() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let c = node.add_pod("c")?;
    let _c_server = Server::start_family(&c, Family::V4, 8080, "echo")?;
    node.start_agent(&AgentOptions {
        tcp_stats_off: true,
        ..AgentOptions::enroll(&["a"])
    })?;
    let out = podtool::send(&a, &c.addr(Family::V4, 8080), 256 << 10)?;
    assert!(out.intact && out.captured(), "{out:?}");
    let events = trace::recent(&node, "test/a", "allowed", 1)?;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].kernel, None, "{events:?}");
    let (_, metrics) = node.http_get(15020, "/metrics")?;
    assert_eq!(
        metric_sample(
            &metrics,
            "weir_tcp_round_trip_seconds_count",
            &["source_workload=\"a\""]
        ),
        None
    );
    Ok(())
}

/// HTTP: each request's record gets its part of the kernel's figures of
/// the pooled upstream connection that carried it (here an HBONE tunnel
/// to b1, `same_node: mtls`): the access-log line, and the round-trip and
/// retransmit metrics with the request's labels. The requests' 100 kB
/// bodies lose one packet in 64 on the way into b1. Then the same over a
/// plain upstream connection, to pod c, outside the mesh.
fn request_figures(family: Family) -> anyhow::Result<()> {
    use serde_json::json;
    use weir_tests::l7;
    const REQUESTS: usize = 20;
    let mut plain_address = None;
    let mut mesh = l7::mesh_with(
        vec![
            json!({"match": {"prefix": "/plain"}, "route": {"cluster": "plain"}}),
            json!({"match": {"prefix": "/"}, "route": {"cluster": "up"}}),
        ],
        |node| {
            let b1 = node.pod("b1");
            // c, made after the agent starts, comes after b2 (a, b1, b2).
            let mut c = node.pod("b2").clone();
            c.ip = std::net::Ipv4Addr::from(u32::from(c.ip) + 1);
            c.ip6 = std::net::Ipv6Addr::from(u128::from(c.ip6) + 1);
            let plain = c.addr(family, 8083);
            plain_address = Some(plain.clone());
            vec![
                l7::static_cluster("up", &[b1.addr(family, 8082)], json!({})),
                l7::static_cluster("plain", &[plain], json!({})),
            ]
        },
        "same_node: mtls\n",
    )?;
    let c = mesh.node.add_pod("c")?;
    assert_eq!(Some(c.addr(family, 8083)), plain_address, "c's address");
    let _plain = weir_tests::http::HttpServer::start_on(&c, "::", 8083, "plain")?;
    let _up = weir_tests::http::HttpServer::start_on(mesh.node.pod("b1"), "::", 8082, "up")?;
    let _loss = lossy_path(mesh.node.pod("a"), mesh.node.pod("b1"))?;

    let vip = match family {
        Family::V4 => l7::VIP.to_string(),
        Family::V6 => format!("[{}]", l7::VIP6),
    };
    let url = format!("http://{vip}/ktel?key=ktel-{family}");
    let data = "k".repeat(100_000);
    let count = REQUESTS.to_string();
    let lines = mesh.get(&["--url", &url, "--data", &data, "--count", &count])?;
    let summary = weir_tests::http::summary(&lines)?;
    assert_eq!(summary["by_status"]["200"], REQUESTS, "{family}: {summary}");

    let key = format!("key=ktel-{family}");
    mesh.node
        .wait_for_log(&key, REQUESTS, std::time::Duration::from_secs(10))?;
    let logged = mesh.node.log_lines(&["request", &key]);
    let field = |line: &str, name: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name))
            .and_then(|value| value.parse().ok())
    };
    let mut attributed = 0;
    for line in &logged {
        let srtt = field(line, "upstream_srtt_us=");
        assert!(srtt.is_some_and(|srtt| srtt > 0), "{family}: {line}");
        attributed += field(line, "upstream_retransmits=")
            .ok_or_else(|| anyhow::anyhow!("{family}: no retransmits in {line}"))?;
    }
    assert_eq!(logged.len(), REQUESTS, "{family}: {logged:?}");
    // The tunnel's retransmits, each given to one request.
    let total = tunnel_retransmits(mesh.node.pod("a"))?;
    assert!(
        attributed > 0,
        "{family}: no retransmit attributed: {logged:?}"
    );
    assert!(
        attributed <= u64::from(total),
        "{family}: {attributed} retransmits attributed, the tunnel had {total}"
    );
    eprintln!(
        "{family}: {REQUESTS} requests, {attributed} retransmits attributed of the tunnel's {total}"
    );

    let (_, metrics) = mesh.node.http_get(15020, "/metrics")?;
    let requests_of_a = [
        "reporter=\"source\"",
        "source_workload=\"a\"",
        "request_protocol=\"http\"",
    ];
    let samples = metric_sample(
        &metrics,
        "weir_tcp_round_trip_seconds_count",
        &requests_of_a,
    );
    assert_eq!(samples, Some(REQUESTS as f64), "{family}");
    let retransmits = metric_sample(&metrics, "weir_tcp_retransmits_total", &requests_of_a);
    assert_eq!(retransmits, Some(attributed as f64), "{family}");

    // A plain upstream connection: its socket is the agent's, in a's
    // namespace; each request on it gets a sample too.
    let url = format!("http://{vip}/plain?key=plain-{family}");
    let lines = mesh.get(&["--url", &url, "--count", "3"])?;
    let summary = weir_tests::http::summary(&lines)?;
    assert_eq!(summary["by_backend"]["plain"], 3, "{family}: {summary}");
    let key = format!("key=plain-{family}");
    mesh.node
        .wait_for_log(&key, 3, std::time::Duration::from_secs(10))?;
    let logged = mesh.node.log_lines(&["request", &key]);
    assert!(
        logged
            .iter()
            .all(|line| field(line, "upstream_srtt_us=").is_some_and(|srtt| srtt > 0)),
        "{family}: {logged:?}"
    );
    let (_, metrics) = mesh.node.http_get(15020, "/metrics")?;
    let to_c = [
        "reporter=\"source\"",
        "source_workload=\"a\"",
        "request_protocol=\"http\"",
        "destination_workload=\"unknown\"",
    ];
    let samples = metric_sample(&metrics, "weir_tcp_round_trip_seconds_count", &to_c);
    assert_eq!(samples, Some(3.0), "{family}");
    Ok(())
}

#[test]
fn http_requests_share_their_upstream_connections_kernel_figures_over_ipv4() -> anyhow::Result<()> {
    request_figures(Family::V4)
}

#[test]
fn http_requests_share_their_upstream_connections_kernel_figures_over_ipv6() -> anyhow::Result<()> {
    request_figures(Family::V6)
}
