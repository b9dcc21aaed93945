//! `weir trace`: the eBPF programs' flow events (captured, bypassed and why,
//! inbound SYNs steered) joined with pod names, and the proxy's verdicts,
//! from a running agent, with filters, both recent and live.
use std::time::Duration;

use weir_tests::{
    AgentOptions, Family, Server, TestNode, podtool,
    trace::{events, finish, spawn as spawn_trace},
    wait_for,
};

/// Runs `weir trace <args>` in the node's namespace until it exits (it is
/// given `--count`); fails if it has not printed that many by the deadline.
fn trace(node: &TestNode, args: &[&str]) -> anyhow::Result<String> {
    let mut child = spawn_trace(node, args)?;
    finish(&mut child)
}

#[test]
fn weir_trace_shows_captured_bypassed_and_steered_flows_with_pod_names() -> anyhow::Result<()> {
    captured_bypassed_and_steered(Family::V4)
}

/// The same flows over IPv6: the IPv6 steer and the proxy's verdict carry
/// the client's IPv6 address.
#[test]
fn weir_trace_shows_ipv6_flows_the_same() -> anyhow::Result<()> {
    captured_bypassed_and_steered(Family::V6)
}

fn captured_bypassed_and_steered(family: Family) -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let c = node.add_pod("c")?;
    let _to_c = Server::start_family(&c, family, 8080, "echo")?;
    let _to_b = Server::start_family(&b, family, 8080, "echo")?;
    node.start_agent(&AgentOptions {
        exclude_ports: vec![7777],
        ..AgentOptions::enroll(&["a", "b"])
    })?;

    // a (meshed) -> c (not meshed): captured. c -> b (meshed): steered.
    // a -> c:7777 (excluded port): bypassed, whatever the connect's fate.
    let out = podtool::send(&a, &c.addr(family, 8080), 1024)?;
    assert!(out.intact && out.captured(), "{out:?}");
    let into_b = podtool::send(&c, &b.addr(family, 8080), 1024)?;
    assert!(into_b.intact, "{into_b:?}");
    let _ = podtool::send(&a, &c.addr(family, 7777), 16);

    let captured = events(&trace(
        &node,
        &[
            "--recent",
            "--pod",
            "test/a",
            "--verdict",
            "captured",
            "--count",
            "1",
            "--output",
            "json",
        ],
    )?);
    assert_eq!(captured.len(), 1, "{captured:?}");
    let event = &captured[0];
    assert_eq!(
        (event.source.as_str(), event.direction.as_str()),
        ("ebpf", "outbound")
    );
    assert_eq!(event.peer, c.addr(family, 8080));
    assert_eq!(event.port, 8080);
    assert_eq!(event.identity, "spiffe://cluster.local/ns/test/sa/a");

    let bypassed = events(&trace(
        &node,
        &[
            "--recent",
            "--verdict",
            "bypassed",
            "--count",
            "1",
            "--output",
            "json",
        ],
    )?);
    assert_eq!(bypassed[0].pod, "test/a");
    assert_eq!(bypassed[0].reason, "excluded_port");
    assert_eq!(bypassed[0].port, 7777);

    // Inbound to b: the kernel's steer and the proxy's verdict, both naming
    // the client c and b's port.
    let inbound = events(&trace(
        &node,
        &[
            "--recent", "--pod", "test/b", "--port", "8080", "--count", "2", "--output", "json",
        ],
    )?);
    let steered = inbound
        .iter()
        .find(|event| event.source == "ebpf")
        .ok_or_else(|| anyhow::anyhow!("no eBPF event for b: {inbound:?}"))?;
    assert_eq!(
        (steered.direction.as_str(), steered.verdict.as_str()),
        ("inbound", "captured")
    );
    assert!(
        steered.peer.starts_with(&c.addr_prefix(family)),
        "{steered:?}"
    );
    let allowed = inbound
        .iter()
        .find(|event| event.source == "proxy")
        .ok_or_else(|| anyhow::anyhow!("no proxy event for b: {inbound:?}"))?;
    assert_eq!(allowed.verdict, "allowed");
    assert!(
        allowed.peer.starts_with(&c.addr_prefix(family)),
        "{allowed:?}"
    );
    assert_eq!(allowed.bytes_received, Some(1024), "{allowed:?}");

    // Live: a follower sees a new flow as it happens (text output). The
    // kernel's verdict only: the proxy's (connection refused, nothing
    // listens on 9090) may reach the follower first.
    let mut live = spawn_trace(
        &node,
        &[
            "--pod",
            "test/a",
            "--port",
            "9090",
            "--verdict",
            "captured",
            "--count",
            "1",
        ],
    )?;
    wait_for(
        "the live trace to see a flow",
        Duration::from_secs(10),
        || {
            let _ = podtool::send(&a, &c.addr(family, 9090), 16);
            matches!(live.try_wait(), Ok(Some(_))).then_some(())
        },
    )?;
    let line = finish(&mut live)?;
    assert!(
        line.contains("ebpf") && line.contains(&format!("test/a -> {}", c.addr(family, 9090))),
        "{line}"
    );
    Ok(())
}

#[test]
fn weir_trace_names_a_bad_filter_and_a_missing_agent() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    node.add_pod("a")?;
    let mut child = spawn_trace(&node, &["--count", "1"])?;
    let error = finish(&mut child).expect_err("no agent is running");
    assert!(error.to_string().contains("is it running"), "{error}");

    node.start_agent(&AgentOptions::enroll(&["a"]))?;
    let (status, body) = node.http_get(15000, "/trace?colour=red")?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("colour"), "{body}");
    Ok(())
}

/// `connect_bypassed` counts the applications' connects that skipped the
/// mesh, the ones `weir trace` shows as bypassed; the agent's own connects in
/// the pods have their own counter.
#[test]
fn connect_bypassed_counts_what_trace_shows_bypassed_not_the_agents_own_connects()
-> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _meshed = Server::start(&b, 8080, "echo")?;
    let _excluded = Server::start(&b, 7777, "echo")?;
    node.start_agent(&AgentOptions {
        exclude_ports: vec![7777],
        ..AgentOptions::enroll(&["a", "b"])
    })?;

    for _ in 0..3 {
        let meshed = podtool::send(&a, &format!("{}:8080", b.ip), 1024)?;
        assert!(meshed.intact && meshed.captured(), "{meshed:?}");
    }
    node.wait_for_log("direction=\"inbound\"", 3, Duration::from_secs(5))?;
    let counters = node.counters()?;
    assert_eq!(counters["connect_captured"], 3, "{counters:?}");
    // The agent's delivery sockets into b.
    assert!(counters["connect_agent"] >= 3, "{counters:?}");
    assert_eq!(counters["connect_bypassed"], 0, "{counters:?}");

    let excluded = podtool::send(&a, &format!("{}:7777", b.ip), 16)?;
    assert!(excluded.intact && !excluded.captured(), "{excluded:?}");
    assert_eq!(node.counter("connect_bypassed")?, 1);
    let bypassed = events(&trace(
        &node,
        &[
            "--recent",
            "--pod",
            "test/a",
            "--verdict",
            "bypassed",
            "--count",
            "1",
            "--output",
            "json",
        ],
    )?);
    assert_eq!(bypassed.len(), 1, "{bypassed:?}");
    assert_eq!(
        (
            bypassed[0].pod.as_str(),
            bypassed[0].reason.as_str(),
            bypassed[0].port
        ),
        ("test/a", "excluded_port", 7777),
    );
    Ok(())
}
