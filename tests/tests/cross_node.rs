//! Two nodes joined by a wire veth, each with its own agent, neither knowing
//! the other's pods: the connection leaves node 1's proxy as plaintext L4
//! (its destination is no known mesh workload) and is steered into node 2's.
//! HBONE between nodes is tested in mtls.rs.
use weir_tests::{AgentOptions, Family, Server, TestNode, connect_nodes, metric_sample, podtool};

#[test]
fn a_pod_reaches_a_pod_on_another_node_through_both_agents() -> anyhow::Result<()> {
    a_pod_reaches_a_pod_on_another_node(Family::V4)
}

#[test]
fn a_pod_reaches_a_pod_on_another_node_over_ipv6() -> anyhow::Result<()> {
    a_pod_reaches_a_pod_on_another_node(Family::V6)
}

fn a_pod_reaches_a_pod_on_another_node(family: Family) -> anyhow::Result<()> {
    let mut node1 = TestNode::with_index(1)?;
    let mut node2 = TestNode::with_index(2)?;
    connect_nodes(&node1, &node2)?;
    let a = node1.add_pod("a")?;
    let b = node2.add_pod("b")?;
    let server = Server::start_family(&b, family, 8080, "echo")?;
    node1.start_agent(&AgentOptions::enroll(&["a"]))?;
    node2.start_agent(&AgentOptions::enroll(&["b"]))?;

    let report = podtool::send(&a, &b.addr(family, 8080), 1 << 20)?;
    assert!(report.intact && report.captured(), "{report:?}");
    assert_eq!(
        server.wait_reports(1)?[0].peer_ip(),
        a.ip_of(family).to_string()
    );
    assert_eq!(node1.counter("connect_captured")?, 1);
    assert_eq!(node2.counter("inbound_steered")?, 1);
    assert_eq!(node1.counter("inbound_steered")?, 0);
    // Both legs of each agent are plain TCP sockets: the kernel splices
    // the bytes between them, on the way out and on the way in.
    for node in [&node1, &node2] {
        let (_, metrics) = node.http_get(15020, "/metrics")?;
        let relays = |relay: &str| {
            metric_sample(
                &metrics,
                "weir_relays_total",
                &[&format!("relay=\"{relay}\"")],
            )
        };
        assert_eq!(relays("splice"), Some(1.0), "{metrics}");
        assert_eq!(relays("copy"), Some(0.0), "{metrics}");
    }
    Ok(())
}
