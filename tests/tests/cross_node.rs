//! Two nodes joined by a wire veth, each with its own agent, neither knowing
//! the other's pods: the connection leaves node 1's proxy as plaintext L4
//! (its destination is no known mesh workload) and is steered into node 2's.
//! HBONE between nodes is tested in mtls.rs.
use weir_tests::{AgentOptions, Server, TestNode, connect_nodes, podtool};

#[test]
fn a_pod_reaches_a_pod_on_another_node_through_both_agents() -> anyhow::Result<()> {
    let mut node1 = TestNode::with_index(1)?;
    let mut node2 = TestNode::with_index(2)?;
    connect_nodes(&node1, &node2)?;
    let a = node1.add_pod("a")?;
    let b = node2.add_pod("b")?;
    let server = Server::start(&b, 8080, "echo")?;
    node1.start_agent(&AgentOptions::enroll(&["a"]))?;
    node2.start_agent(&AgentOptions::enroll(&["b"]))?;

    let report = podtool::send(&a, &format!("{}:8080", b.ip), 1 << 20)?;
    assert!(report.intact && report.captured(), "{report:?}");
    assert_eq!(server.wait_reports(1)?[0].peer_ip(), a.ip.to_string());
    assert_eq!(node1.counter("connect_captured")?, 1);
    assert_eq!(node2.counter("inbound_steered")?, 1);
    assert_eq!(node1.counter("inbound_steered")?, 0);
    Ok(())
}
