//! Per-connection kernel telemetry: `sock_ops` keeps what the kernel
//! measures of the proxy's connections (round trips, retransmits,
//! segments), and the proxy puts it next to its own view when a connection
//! ends: the flow event (`weir trace`), the access log, and Istio-labelled
//! metrics. The path from a to c loses a random one in 64 packets (a
//! stand-in tcx program on c's interface), so the kernel retransmits.
use weir_tests::{
    AgentOptions, Family, Server, TestNode, cni::ForeignProgram, metric_sample, podtool,
    trace_events,
};

fn kernel_figures(family: Family) -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let c = node.add_pod("c")?;
    let _c_server = Server::start_family(&c, family, 8080, "echo")?;
    let _b_server = Server::start_family(&b, family, 8080, "echo")?;
    node.start_agent(&AgentOptions::enroll(&["a", "b"]))?;
    let lossy = ForeignProgram::tcx_lossy(63)?;
    let _loss = lossy.attach_tcx(&c, "eth0")?;
    // One segment per packet (no GSO super-packets) from a's namespace,
    // where the agent's upstream socket sends: the loss then hits ~1 in
    // 64 segments, not 1 in 64 bursts of 64 KiB.
    weir_tests::node::run(
        "ip",
        &[
            "-n",
            &a.netns,
            "link",
            "set",
            "eth0",
            "gso_max_size",
            "1500",
        ],
    )?;

    // Outbound: a's connection to c leaves through the agent's upstream socket.
    let out = podtool::send(&a, &c.addr(family, 8080), 2 << 20)?;
    assert!(out.intact && out.captured(), "{out:?}");
    let outbound = trace_events(
        &node,
        &[
            "--recent",
            "--pod",
            "test/a",
            "--verdict",
            "allowed",
            "--count",
            "1",
            "--output",
            "json",
        ],
    )?;
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
    let inbound = trace_events(
        &node,
        &[
            "--recent",
            "--pod",
            "test/b",
            "--verdict",
            "allowed",
            "--count",
            "1",
            "--output",
            "json",
        ],
    )?;
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
    let events = trace_events(
        &node,
        &[
            "--recent",
            "--pod",
            "test/a",
            "--verdict",
            "allowed",
            "--count",
            "1",
            "--output",
            "json",
        ],
    )?;
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
