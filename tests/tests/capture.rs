//! Capture and L4 proxying between pods of one namespaced node.
use std::time::Duration;

use weir_tests::{AgentOptions, Family, Server, TestNode, podtool, wait_for};

const MIB: u64 = 1 << 20;

#[test]
fn pod_to_pod_through_the_agent_keeps_data_and_source() -> anyhow::Result<()> {
    pod_to_pod_keeps_data_and_source(Family::V4)
}

/// Meshed a→b over IPv6: the same hand-off, and b's inbound record names
/// a's SPIFFE identity.
#[test]
fn pod_to_pod_over_ipv6_keeps_data_source_and_identity() -> anyhow::Result<()> {
    pod_to_pod_keeps_data_and_source(Family::V6)
}

fn pod_to_pod_keeps_data_and_source(family: Family) -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let server = Server::start_family(&b, family, 8080, "echo")?;
    node.start_agent(&AgentOptions::enroll(&["a", "b"]))?;

    let target = b.addr(family, 8080);
    let report = podtool::send(&a, &target, MIB)?;
    assert!(report.intact, "data corrupted or cut: {report:?}");
    assert_eq!((report.sent, report.received), (MIB, MIB));
    assert!(report.captured(), "connection was not captured: {report:?}");
    // The getpeername hook shows the application where it connected to.
    assert_eq!(report.peer, target);

    let seen = server.wait_reports(1)?;
    assert_eq!(
        seen[0].peer_ip(),
        a.ip_of(family).to_string(),
        "server saw {seen:?}"
    );
    assert_eq!(seen[0].bytes, MIB);

    let counters = node.counters()?;
    assert!(counters["connect_captured"] >= 1, "{counters:?}");
    assert!(counters["origdst_recorded"] >= 1, "{counters:?}");
    assert!(counters["peername_rewritten"] >= 1, "{counters:?}");
    // Both pods are meshed and on this node: the agent hands the connection
    // from a to b itself, not through b's plaintext steering.
    assert_eq!(counters["inbound_steered"], 0, "{counters:?}");
    // Between a's socket to the proxy and the proxy's to b the kernel
    // splices the bytes: no copy through the agent, and still counted (the
    // log line's bytes_sent below).
    let (_, metrics) = node.http_get(15020, "/metrics")?;
    let relays = |relay: &str| {
        weir_tests::metric_sample(
            &metrics,
            "weir_relays_total",
            &[&format!("relay=\"{relay}\"")],
        )
    };
    assert_eq!(relays("splice"), Some(1.0), "{metrics}");
    assert_eq!(relays("copy"), Some(0.0), "{metrics}");
    node.wait_for_log(
        "direction=\"outbound\" protocol=\"handoff\" pod=test/a",
        1,
        Duration::from_secs(5),
    )?;
    node.wait_for_log(
        "direction=\"inbound\" protocol=\"handoff\" pod=test/b",
        1,
        Duration::from_secs(5),
    )?;
    let log = node.agent_log();
    let line = log
        .lines()
        .find(|line| line.contains("direction=\"outbound\""))
        .unwrap_or_default();
    assert!(line.contains(&format!("orig_dst={target}")), "{line}");
    assert!(line.contains(&format!("bytes_sent={MIB}")), "{line}");
    let loopback = match family {
        Family::V4 => "src=127.0.0.1:",
        Family::V6 => "src=[::1]:",
    };
    assert!(line.contains(loopback), "{line}");
    // The receiving side records the client's SPIFFE identity.
    let inbound = log
        .lines()
        .find(|line| line.contains("direction=\"inbound\""))
        .unwrap_or_default();
    assert!(
        inbound.contains("peer_identity=spiffe://cluster.local/ns/test/sa/a"),
        "{inbound}"
    );
    assert!(
        inbound.contains(&format!("src={}", a.addr_prefix(family))),
        "{inbound}"
    );
    Ok(())
}

/// A client process that predates enrollment: no restart needed either way.
#[test]
fn a_running_client_is_captured_after_enrollment_and_released_after() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _server = Server::start(&b, 8080, "echo")?;
    node.start_agent(&AgentOptions::default())?;

    let mut probe = podtool::Probe::start(&a, &format!("{}:8080", b.ip), 50)?;
    let pid = probe.child().id();
    // Waits for a successful exchange after `from`, captured or not.
    let wait_probe = |probe: &podtool::Probe, from: usize, captured: bool| {
        wait_for(
            &format!("a probe with captured={captured}"),
            Duration::from_secs(10),
            || {
                let lines = probe.lines();
                lines.iter().skip(from).find_map(|line| {
                    (line["ok"] == true && podtool::Probe::captured(line) == captured)
                        .then(|| lines.len())
                })
            },
        )
    };

    let seen = wait_probe(&probe, 0, false)?;
    node.reconfigure_agent(&AgentOptions::enroll(&["a"]))?;
    let seen = wait_probe(&probe, seen, true)?;
    node.reconfigure_agent(&AgentOptions::default())?;
    wait_probe(&probe, seen, false)?;

    // Same process throughout.
    assert!(
        probe.child().try_wait()?.is_none(),
        "the probe process exited"
    );
    assert_eq!(probe.child().id(), pid);
    let failures = probe
        .lines()
        .iter()
        .filter(|line| line["ok"] == false)
        .count();
    assert_eq!(failures, 0, "probes failed while enrolling/releasing");
    Ok(())
}

#[test]
fn a_pod_that_is_not_enrolled_is_never_captured() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _c = node.add_pod("c")?;
    let server = Server::start(&b, 8080, "echo")?;
    node.start_agent(&AgentOptions::enroll(&["c"]))?;

    let report = podtool::send(&a, &format!("{}:8080", b.ip), 64 * 1024)?;
    assert!(report.intact, "{report:?}");
    assert!(!report.captured(), "{report:?}");
    assert_eq!(
        report.local.split(':').next(),
        Some(a.ip.to_string().as_str())
    );
    assert_eq!(server.wait_reports(1)?[0].peer_ip(), a.ip.to_string());
    let counters = node.counters()?;
    assert_eq!(counters["connect_captured"], 0, "{counters:?}");
    assert_eq!(counters["inbound_steered"], 0, "{counters:?}");
    assert!(
        !node.agent_log().contains("direction="),
        "{}",
        node.agent_log()
    );
    Ok(())
}

#[test]
fn inbound_from_an_outside_pod_goes_through_the_inbound_listener() -> anyhow::Result<()> {
    inbound_from_an_outside_pod(Family::V4)
}

#[test]
fn inbound_over_ipv6_from_an_outside_pod_goes_through_the_inbound_listener() -> anyhow::Result<()> {
    inbound_from_an_outside_pod(Family::V6)
}

fn inbound_from_an_outside_pod(family: Family) -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let server = Server::start_family(&b, family, 8080, "echo")?;
    node.start_agent(&AgentOptions::enroll(&["b"]))?;

    let report = podtool::send(&a, &b.addr(family, 8080), 256 * 1024)?;
    assert!(report.intact, "{report:?}");
    assert!(!report.captured(), "a is not enrolled: {report:?}");
    let seen = server.wait_reports(1)?;
    assert_eq!(
        seen[0].peer_ip(),
        a.ip_of(family).to_string(),
        "true source lost: {seen:?}"
    );
    assert!(node.counter("inbound_steered")? >= 1);
    node.wait_for_log(
        "direction=\"inbound\" protocol=\"tcp\" pod=test/b",
        1,
        Duration::from_secs(5),
    )?;
    let log = node.agent_log();
    let line = log
        .lines()
        .find(|line| line.contains("direction=\"inbound\""))
        .unwrap_or_default();
    assert!(
        line.contains(&format!("src={}", a.addr_prefix(family))),
        "{line}"
    );
    assert!(
        line.contains(&format!("orig_dst={}", b.addr(family, 8080))),
        "{line}"
    );
    Ok(())
}

/// With its agent killed (no cleanup, its classifier still attached), an
/// enrolled pod is not reachable around the proxy: a new connection's SYN
/// finds no listener to go to and is dropped, in either family.
#[test]
fn inbound_fails_closed_while_the_agent_is_down() -> anyhow::Result<()> {
    inbound_fails_closed(Family::V4)
}

#[test]
fn inbound_over_ipv6_fails_closed_while_the_agent_is_down() -> anyhow::Result<()> {
    inbound_fails_closed(Family::V6)
}

fn inbound_fails_closed(family: Family) -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let server = Server::start_family(&b, family, 8080, "echo")?;
    node.start_agent(&AgentOptions::enroll(&["b"]))?;
    let target = b.addr(family, 8080);
    let steered = podtool::send(&a, &target, 1024)?;
    assert!(steered.intact, "{steered:?}");

    node.kill_agent()?;
    let refused = podtool::send(&a, &target, 1024)?;
    assert!(!refused.intact, "reached b around the proxy: {refused:?}");
    assert_eq!(server.reports().len(), 1, "{:?}", server.reports());
    assert!(node.counter("inbound_errors")? >= 1);
    Ok(())
}

/// A SYN behind an IPv6 extension header (Destination Options) is steered
/// like any other: the stack would deliver it, so the mesh must see it.
#[test]
fn an_ipv6_syn_behind_an_extension_header_is_steered() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let server = Server::start_family(&b, Family::V6, 8080, "echo")?;
    node.start_agent(&AgentOptions::enroll(&["b"]))?;

    let report = podtool::send_with_dstopts(&a, &b.addr(Family::V6, 8080), 64 * 1024)?;
    assert!(report.intact, "{report:?}");
    assert_eq!(server.wait_reports(1)?[0].peer_ip(), a.ip6.to_string());
    assert_eq!(node.counter("inbound_steered")?, 1);
    assert_eq!(node.counter("inbound_dropped")?, 0);
    node.wait_for_log(
        "direction=\"inbound\" protocol=\"tcp\" pod=test/b",
        1,
        Duration::from_secs(5),
    )?;
    Ok(())
}

#[test]
fn the_agents_own_connections_are_not_captured_again() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _server = Server::start(&b, 8080, "echo")?;
    node.start_agent(&AgentOptions::enroll(&["a", "b"]))?;

    let report = podtool::send(&a, &format!("{}:8080", b.ip), 1024)?;
    assert!(report.intact, "{report:?}");
    node.wait_for_log("direction=\"inbound\"", 1, Duration::from_secs(5))?;
    node.wait_for_log("direction=\"outbound\"", 1, Duration::from_secs(5))?;
    let counters = node.counters()?;
    // One application connect captured; the agent's delivery socket (in b)
    // is seen by connect4 and left alone, counted as the agent's own: no
    // application connect was bypassed.
    assert_eq!(counters["connect_captured"], 1, "{counters:?}");
    assert!(counters["connect_agent"] >= 1, "{counters:?}");
    assert_eq!(counters["connect_bypassed"], 0, "{counters:?}");
    let log = node.agent_log();
    assert_eq!(log.matches("direction=\"outbound\"").count(), 1, "{log}");
    assert_eq!(log.matches("direction=\"inbound\"").count(), 1, "{log}");
    Ok(())
}

#[test]
fn excluded_ports_are_never_captured() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _excluded = Server::start(&b, 8080, "echo")?;
    let _meshed = Server::start(&b, 9090, "echo")?;
    node.start_agent(&AgentOptions {
        exclude_ports: vec![8080],
        ..AgentOptions::enroll(&["a", "b"])
    })?;

    let excluded = podtool::send(&a, &format!("{}:8080", b.ip), 1024)?;
    assert!(excluded.intact && !excluded.captured(), "{excluded:?}");
    assert_eq!(node.counter("inbound_steered")?, 0);
    let meshed = podtool::send(&a, &format!("{}:9090", b.ip), 1024)?;
    assert!(meshed.intact && meshed.captured(), "{meshed:?}");
    assert_eq!(node.counter("connect_captured")?, 1);
    Ok(())
}

#[test]
fn excluded_cidrs_are_never_captured() -> anyhow::Result<()> {
    excluded_cidrs(Family::V4)
}

#[test]
fn excluded_ipv6_cidrs_are_never_captured() -> anyhow::Result<()> {
    excluded_cidrs(Family::V6)
}

fn excluded_cidrs(family: Family) -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let c = node.add_pod("c")?;
    let _b_server = Server::start_family(&b, family, 8080, "echo")?;
    let _c_server = Server::start_family(&c, family, 8080, "echo")?;
    let host = match family {
        Family::V4 => 32,
        Family::V6 => 128,
    };
    node.start_agent(&AgentOptions {
        exclude_cidrs: vec![format!("{}/{host}", b.ip_of(family))],
        ..AgentOptions::enroll(&["a"])
    })?;
    let excluded = podtool::send(&a, &b.addr(family, 8080), 1024)?;
    assert!(excluded.intact && !excluded.captured(), "{excluded:?}");
    let meshed = podtool::send(&a, &c.addr(family, 8080), 1024)?;
    assert!(meshed.intact && meshed.captured(), "{meshed:?}");
    let counters = node.counters()?;
    assert_eq!(counters["connect_captured"], 1, "{counters:?}");
    assert!(counters["connect_bypassed"] >= 1, "{counters:?}");
    Ok(())
}

#[test]
fn ipv6_and_v4_mapped_connects_are_captured() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _server6 = Server::start_on(&b, "::", 8080, "echo")?;
    node.start_agent(&AgentOptions::enroll(&["a"]))?;

    let target = format!("[{}]:8080", b.ip6);
    let report = podtool::send(&a, &target, 256 * 1024)?;
    assert!(report.intact, "{report:?}");
    assert!(
        report.kernel_local.starts_with("[::1]:"),
        "not captured: {report:?}"
    );
    assert_eq!(report.peer, target, "getpeername6 not rewritten");

    // A dual-stack socket reaching an IPv4 peer goes to the IPv4 listener.
    let mapped = format!("[::ffff:{}]:8080", b.ip);
    let report = podtool::send(&a, &mapped, 4096)?;
    assert!(report.intact, "{report:?}");
    assert!(report.captured(), "{report:?}");
    assert_eq!(report.peer, mapped);
    assert_eq!(node.counter("connect_captured")?, 2);
    node.wait_for_log(
        &format!("orig_dst=[{}]:8080", b.ip6),
        1,
        Duration::from_secs(5),
    )?;
    Ok(())
}

/// The port of `ip:port` / `[ip]:port`.
fn port_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or("", |(_, port)| port)
}

/// A captured socket is bound to the proxy listener's loopback address, but
/// the application's `getsockname` shows the pod's own address (what it
/// would have had uncaptured) and the socket's real port.
#[test]
fn captured_sockets_show_the_pods_own_address_to_getsockname() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _server = Server::start_on(&b, "::", 8080, "echo")?;
    node.start_agent(&AgentOptions::enroll(&["a"]))?;

    let cases = [
        (format!("{}:8080", b.ip), a.ip.to_string(), "127.0.0.1"),
        (format!("[{}]:8080", b.ip6), format!("[{}]", a.ip6), "[::1]"),
        // A dual-stack socket reaching an IPv4 peer.
        (
            format!("[::ffff:{}]:8080", b.ip),
            format!("[::ffff:{}]", a.ip),
            "[::ffff:127.0.0.1]",
        ),
    ];
    for (target, own, loopback) in &cases {
        let report = podtool::send(&a, target, 4096)?;
        assert!(report.intact, "{report:?}");
        assert!(
            report.kernel_local.starts_with(&format!("{loopback}:")),
            "not captured: {report:?}"
        );
        assert_eq!(
            report.local,
            format!("{own}:{}", port_of(&report.kernel_local)),
            "getsockname to {target}"
        );
        assert_eq!(&report.peer, target, "getpeername");
    }
    let counters = node.counters()?;
    assert_eq!(counters["connect_captured"], 3, "{counters:?}");
    assert!(counters["sockname_rewritten"] >= 3, "{counters:?}");
    Ok(())
}
