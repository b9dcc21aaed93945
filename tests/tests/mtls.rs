//! Identity, mTLS and HBONE between two nodes joined by a wire veth, each
//! with its own agent, and between pods of one node.
use std::{path::PathBuf, time::Duration};

use weir_tests::{
    AgentOptions, Family, Pod, RemoteWorkload, Server, TestNode, capture, connect_nodes, podtool,
};

/// Two connected nodes: `a` on node 1, `b` (echo server on 8080) on node 2,
/// both meshed, sharing a built-in CA root; traffic in one address family.
struct TwoNodes {
    node1: TestNode,
    node2: TestNode,
    a: Pod,
    b: Pod,
    ca_dir: PathBuf,
    server: Server,
    family: Family,
}

impl TwoNodes {
    fn new() -> anyhow::Result<TwoNodes> {
        TwoNodes::with_family(Family::V4)
    }

    fn with_family(family: Family) -> anyhow::Result<TwoNodes> {
        let mut node1 = TestNode::with_index(1)?;
        let mut node2 = TestNode::with_index(2)?;
        connect_nodes(&node1, &node2)?;
        let a = node1.add_pod("a")?;
        let b = node2.add_pod("b")?;
        let ca_dir = node1.dir.join("ca");
        TestNode::ca_init(&ca_dir)?;
        let server = Server::start_family(&b, family, 8080, "echo")?;
        Ok(TwoNodes {
            node1,
            node2,
            a,
            b,
            ca_dir,
            server,
            family,
        })
    }

    fn options(&self, pods: &[&str], remote: &Pod) -> AgentOptions {
        AgentOptions {
            remote: vec![RemoteWorkload::of(remote)],
            ca_dir: Some(self.ca_dir.clone()),
            ..AgentOptions::enroll(pods)
        }
    }

    fn start(&mut self) -> anyhow::Result<()> {
        let options1 = self.options(&["a"], &self.b);
        let options2 = self.options(&["b"], &self.a);
        self.node1.start_agent(&options1)?;
        self.node2.start_agent(&options2)
    }

    fn target(&self) -> String {
        self.b.addr(self.family, 8080)
    }
}

#[test]
fn cross_node_echo_goes_through_hbone_with_identities() -> anyhow::Result<()> {
    cross_node_echo_through_hbone(Family::V4)
}

/// HBONE to an IPv6 destination: the tunnel goes to `[b]:15008`, and b's
/// inbound record names a's SPIFFE identity and IPv6 address.
#[test]
fn cross_node_echo_over_ipv6_goes_through_hbone_with_identities() -> anyhow::Result<()> {
    cross_node_echo_through_hbone(Family::V6)
}

fn cross_node_echo_through_hbone(family: Family) -> anyhow::Result<()> {
    let mut nodes = TwoNodes::with_family(family)?;
    nodes.start()?;
    let report = podtool::send(&nodes.a, &nodes.target(), 1 << 20)?;
    assert!(report.intact && report.captured(), "{report:?}");
    let seen = nodes.server.wait_reports(1)?;
    assert_eq!(seen[0].peer_ip(), nodes.a.ip_of(family).to_string());

    nodes
        .node2
        .wait_for_log("protocol=\"hbone\"", 1, Duration::from_secs(5))?;
    let inbound = nodes
        .node2
        .log_lines(&["direction=\"inbound\"", "protocol=\"hbone\""]);
    assert!(
        inbound[0].contains("peer_identity=spiffe://cluster.local/ns/test/sa/a")
            && inbound[0].contains(&format!("src={}", nodes.a.addr_prefix(family)))
            && inbound[0].contains(&format!("orig_dst={}", nodes.target())),
        "{inbound:?}"
    );
    nodes.node1.wait_for_log(
        "direction=\"outbound\" protocol=\"hbone\"",
        1,
        Duration::from_secs(5),
    )?;
    let outbound = nodes.node1.log_lines(&["direction=\"outbound\""]);
    assert!(
        outbound[0].contains("peer_identity=spiffe://cluster.local/ns/test/sa/b"),
        "{outbound:?}"
    );
    // Node 2 steered nothing through its plaintext path.
    assert_eq!(nodes.node2.counter("inbound_steered")?, 0);

    // Later connections are new streams on the same mTLS connection.
    for _ in 0..3 {
        let again = podtool::send(&nodes.a, &nodes.target(), 1024)?;
        assert!(again.intact, "{again:?}");
    }
    nodes
        .node2
        .wait_for_log("protocol=\"hbone\"", 4, Duration::from_secs(5))?;
    let handshakes = nodes.node2.log_lines(&["HBONE connection accepted"]);
    assert_eq!(
        handshakes.len(),
        1,
        "the tunnel was not reused: {handshakes:?}"
    );
    Ok(())
}

/// Connections opened at the same instant to a peer with no tunnel yet
/// share one mTLS connection: the first opens it, the others wait for it.
#[test]
fn concurrent_first_connections_share_one_tunnel() -> anyhow::Result<()> {
    let mut nodes = TwoNodes::new()?;
    nodes.start()?;
    let ok = podtool::burst(&nodes.a, &nodes.target(), 8)?;
    assert_eq!(ok, 8, "all eight echoed");
    nodes
        .node2
        .wait_for_log("protocol=\"hbone\"", 8, Duration::from_secs(5))?;
    let handshakes = nodes.node2.log_lines(&["HBONE connection accepted"]);
    assert_eq!(handshakes.len(), 1, "one TLS connection: {handshakes:?}");
    Ok(())
}

#[test]
fn the_wire_carries_tls_not_the_payload() -> anyhow::Result<()> {
    the_wire_carries_tls(Family::V4)
}

#[test]
fn the_wire_carries_tls_not_the_payload_over_ipv6() -> anyhow::Result<()> {
    the_wire_carries_tls(Family::V6)
}

fn the_wire_carries_tls(family: Family) -> anyhow::Result<()> {
    let mut nodes = TwoNodes::with_family(family)?;
    let wire = format!("wire{}", nodes.node2.index);
    let needle = &podtool::pattern(4096, podtool::SEND_SEED)[1024..1088];

    // Control: without the mesh the payload is visible on the wire.
    let capture = capture::Capture::start(&nodes.node1.netns_path(), &wire)?;
    let plain = podtool::send(&nodes.a, &nodes.target(), 4096)?;
    let bytes = capture.finish()?;
    assert!(plain.intact && !plain.captured(), "{plain:?}");
    assert!(
        capture::contains(&bytes, needle),
        "control capture missed the payload"
    );

    nodes.start()?;
    let capture = capture::Capture::start(&nodes.node1.netns_path(), &wire)?;
    let meshed = podtool::send(&nodes.a, &nodes.target(), 4096)?;
    let bytes = capture.finish()?;
    assert!(meshed.intact && meshed.captured(), "{meshed:?}");
    assert!(bytes.len() > 4096, "captured only {} bytes", bytes.len());
    assert!(
        !capture::contains(&bytes, needle),
        "payload crossed the wire in clear"
    );
    Ok(())
}

#[test]
fn a_peer_with_the_wrong_identity_is_refused_and_counted() -> anyhow::Result<()> {
    let mut nodes = TwoNodes::new()?;
    // Node 1 believes b runs as "payments": b's certificate says "b".
    let mut options1 = nodes.options(&["a"], &nodes.b);
    options1.remote[0].service_account = "payments".into();
    let options2 = nodes.options(&["b"], &nodes.a);
    nodes.node1.start_agent(&options1)?;
    nodes.node2.start_agent(&options2)?;

    let report = podtool::send(&nodes.a, &nodes.target(), 1024)?;
    assert!(
        !report.intact,
        "connection to an impostor went through: {report:?}"
    );
    assert!(nodes.server.reports().is_empty(), "the server was reached");
    nodes
        .node1
        .wait_for_log("HBONE handshake failed", 1, Duration::from_secs(5))?;
    let failure = nodes.node1.log_lines(&["HBONE handshake failed"]);
    assert!(
        failure[0].contains("spiffe://cluster.local/ns/test/sa/payments")
            && failure[0].contains("spiffe://cluster.local/ns/test/sa/b"),
        "both identities should be named: {failure:?}"
    );
    nodes.node1.stop_agent()?;
    let totals = nodes.node1.log_lines(&["final counters"]);
    assert!(totals[0].contains("tls_failures=1"), "{totals:?}");
    Ok(())
}

#[test]
fn a_peer_from_an_untrusted_root_is_refused() -> anyhow::Result<()> {
    let mut nodes = TwoNodes::new()?;
    let options1 = nodes.options(&["a"], &nodes.b);
    // Node 2 has a root of its own.
    let mut options2 = nodes.options(&["b"], &nodes.a);
    let other_ca = nodes.node2.dir.join("other-ca");
    TestNode::ca_init(&other_ca)?;
    options2.ca_dir = Some(other_ca);
    nodes.node1.start_agent(&options1)?;
    nodes.node2.start_agent(&options2)?;

    let report = podtool::send(&nodes.a, &nodes.target(), 1024)?;
    assert!(!report.intact, "{report:?}");
    assert!(nodes.server.reports().is_empty());
    nodes
        .node1
        .wait_for_log("HBONE handshake failed", 1, Duration::from_secs(5))?;
    Ok(())
}

#[test]
fn strict_refuses_plaintext_and_permissive_accepts_it() -> anyhow::Result<()> {
    strict_and_permissive(Family::V4)
}

/// A pod outside the mesh reaching a STRICT pod over IPv6 is refused, with
/// or without an extension header before its TCP header.
#[test]
fn strict_refuses_plaintext_over_ipv6_and_permissive_accepts_it() -> anyhow::Result<()> {
    strict_and_permissive(Family::V6)
}

fn strict_and_permissive(family: Family) -> anyhow::Result<()> {
    // One node: meshed a, unmeshed c, and b in STRICT or PERMISSIVE mode.
    for strict in [true, false] {
        let mut node = TestNode::new()?;
        let a = node.add_pod("a")?;
        let b = node.add_pod("b")?;
        let c = node.add_pod("c")?;
        let server = Server::start_family(&b, family, 8080, "echo")?;
        let mut options = AgentOptions::enroll(&["a", "b"]);
        if strict {
            options.strict = vec!["b".into()];
        }
        node.start_agent(&options)?;
        let target = b.addr(family, 8080);

        let plaintext = podtool::send(&c, &target, 1024)?;
        assert_eq!(plaintext.intact, !strict, "strict={strict}: {plaintext:?}");
        let mut plaintext_arrivals = 1;
        if family == Family::V6 {
            let behind_header = podtool::send_with_dstopts(&c, &target, 1024)?;
            assert_eq!(
                behind_header.intact, !strict,
                "strict={strict}, Destination Options: {behind_header:?}"
            );
            plaintext_arrivals += 1;
        }
        // Meshed traffic (same node: identity and policy as across nodes).
        let meshed = podtool::send(&a, &target, 1024)?;
        assert!(
            meshed.intact && meshed.captured(),
            "strict={strict}: {meshed:?}"
        );
        let seen = server.wait_reports(if strict { 1 } else { 1 + plaintext_arrivals })?;
        assert!(
            seen.iter()
                .any(|r| r.peer_ip() == a.ip_of(family).to_string())
        );
        if strict {
            node.wait_for_log(
                "plaintext to a STRICT workload",
                plaintext_arrivals,
                Duration::from_secs(5),
            )?;
            // Only a's connection reached the application.
            assert_eq!(server.reports().len(), 1, "{:?}", server.reports());
        }
    }
    Ok(())
}

#[test]
fn certificates_rotate_under_a_long_lived_connection() -> anyhow::Result<()> {
    let mut nodes = TwoNodes::new()?;
    let mut options1 = nodes.options(&["a"], &nodes.b);
    let mut options2 = nodes.options(&["b"], &nodes.a);
    options1.cert_ttl_seconds = Some(10);
    options2.cert_ttl_seconds = Some(10);
    nodes.node1.start_agent(&options1)?;
    nodes.node2.start_agent(&options2)?;

    // One connection across at least two renewals (every ~5 s).
    let exchanges = podtool::stream(&nodes.a, &nodes.target(), 12)?;
    assert!(exchanges >= 80, "only {exchanges} exchanges");
    let renewals = nodes.node1.log_lines(&["certificate renewed", "sa/a"]);
    assert!(renewals.len() >= 2, "renewals: {renewals:?}");

    // A new connection presents the newest certificate.
    let report = podtool::send(&nodes.a, &nodes.target(), 1024)?;
    assert!(report.intact, "{report:?}");
    nodes
        .node2
        .wait_for_log("direction=\"inbound\"", 2, Duration::from_secs(5))?;
    let serial_of = |line: &str| {
        line.split_whitespace()
            .find_map(|field| {
                field
                    .strip_prefix("serial=")
                    .or_else(|| field.strip_prefix("peer_certificate="))
            })
            .map(str::to_string)
            .unwrap_or_default()
    };
    let renewed: Vec<String> = nodes
        .node1
        .log_lines(&["certificate renewed", "sa/a"])
        .iter()
        .map(|line| serial_of(line))
        .collect();
    let accepted = nodes.node2.log_lines(&["HBONE connection accepted"]);
    let (first, last) = (
        serial_of(&accepted[0]),
        serial_of(&accepted[accepted.len() - 1]),
    );
    assert_ne!(
        first, last,
        "the new connection reused the old certificate: {accepted:?}"
    );
    assert!(
        renewed.contains(&last),
        "the new connection's certificate {last} is not a renewed one: {renewed:?}"
    );
    Ok(())
}

#[test]
fn same_node_hand_off_is_the_default_and_keeps_identity_and_strict_mode() -> anyhow::Result<()> {
    same_node_hand_off(Family::V4)
}

#[test]
fn same_node_hand_off_over_ipv6_keeps_identity_and_strict_mode() -> anyhow::Result<()> {
    same_node_hand_off(Family::V6)
}

fn same_node_hand_off(family: Family) -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let c = node.add_pod("c")?;
    let server = Server::start_family(&b, family, 8080, "echo")?;
    node.start_agent(&AgentOptions {
        strict: vec!["b".into()],
        ..AgentOptions::enroll(&["a", "b"])
    })?;
    let target = b.addr(family, 8080);
    let meshed = podtool::send(&a, &target, 256 * 1024)?;
    assert!(meshed.intact && meshed.captured(), "{meshed:?}");
    assert_eq!(
        server.wait_reports(1)?[0].peer_ip(),
        a.ip_of(family).to_string()
    );
    node.wait_for_log("direction=\"outbound\"", 1, Duration::from_secs(5))?;
    let outbound = node.log_lines(&["direction=\"outbound\""]);
    assert!(
        outbound[0].contains("peer_identity=spiffe://cluster.local/ns/test/sa/b"),
        "{outbound:?}"
    );
    // Handed over inside the agent: no TLS hop was made, and b's side of the
    // record names the client's identity.
    assert!(node.log_lines(&["HBONE connection accepted"]).is_empty());
    let handoff = "direction=\"inbound\" protocol=\"handoff\" pod=test/b";
    node.wait_for_log(handoff, 1, Duration::from_secs(5))?;
    let inbound = node.log_lines(&[handoff]);
    assert!(
        inbound[0].contains("peer_identity=spiffe://cluster.local/ns/test/sa/a")
            && inbound[0].contains(&format!("src={}", a.addr_prefix(family))),
        "{inbound:?}"
    );
    // STRICT still refuses plaintext from outside the mesh.
    let plaintext = podtool::send(&c, &target, 1024)?;
    assert!(!plaintext.intact, "{plaintext:?}");
    Ok(())
}
