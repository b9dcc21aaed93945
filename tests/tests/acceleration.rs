//! sk_msg acceleration between the agent's own sockets: correctness with a
//! plain blocking client and server, and same-node bulk data kept off the veths.
use weir_tests::{AgentOptions, Family, Server, TestNode, podtool};

const PAYLOAD: u64 = 4 << 20;

/// Sends PAYLOAD from a to b's echo server and returns the bytes that crossed
/// a's eth0 (tx + rx) while doing it.
fn echo_through_agent(accelerate: bool, family: Family) -> anyhow::Result<(u64, TestNode)> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let server = Server::start_family(&b, family, 8080, "echo")?;
    // Acceleration works between the agent's own sockets: the local mTLS
    // hop (the in-process hand-off has no such pair).
    node.start_agent(&AgentOptions {
        accelerate,
        same_node_mtls: true,
        ..AgentOptions::enroll(&["a", "b"])
    })?;
    let (tx_before, rx_before) = a.eth0_bytes()?;
    // podtool uses plain blocking sockets: the EAGAIN hazard would show here.
    let report = podtool::send(&a, &b.addr(family, 8080), PAYLOAD)?;
    assert!(report.intact, "accelerate={accelerate}: {report:?}");
    assert!(report.captured(), "{report:?}");
    assert_eq!(server.wait_reports(1)?[0].bytes, PAYLOAD);
    let (tx_after, rx_after) = a.eth0_bytes()?;
    Ok(((tx_after - tx_before) + (rx_after - rx_before), node))
}

#[test]
fn accelerated_bulk_data_is_intact_and_does_not_cross_the_veth() -> anyhow::Result<()> {
    accelerated_bulk_data(Family::V4)
}

#[test]
fn accelerated_bulk_data_over_ipv6_is_intact_and_does_not_cross_the_veth() -> anyhow::Result<()> {
    accelerated_bulk_data(Family::V6)
}

fn accelerated_bulk_data(family: Family) -> anyhow::Result<()> {
    let (veth_bytes, node) = echo_through_agent(true, family)?;
    let counters = node.counters()?;
    assert!(counters["accel_sockets_added"] >= 2, "{counters:?}");
    assert!(counters["accel_redirected"] > 0, "{counters:?}");
    // Handshakes and FINs only: far below the 8 MiB that would cross otherwise.
    assert!(
        veth_bytes < 64 * 1024,
        "{veth_bytes} bytes crossed the veth with acceleration on; {counters:?}"
    );
    Ok(())
}

#[test]
fn without_acceleration_bulk_data_crosses_the_veth() -> anyhow::Result<()> {
    let (veth_bytes, node) = echo_through_agent(false, Family::V4)?;
    let counters = node.counters()?;
    assert_eq!(counters["accel_sockets_added"], 0, "{counters:?}");
    assert_eq!(counters["accel_redirected"], 0, "{counters:?}");
    assert!(
        veth_bytes >= 2 * PAYLOAD,
        "only {veth_bytes} bytes crossed the veth"
    );
    Ok(())
}

#[test]
fn accelerated_blocking_exchanges_survive_many_short_connections() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let server = Server::start(&b, 8080, "echo")?;
    node.start_agent(&AgentOptions {
        accelerate: true,
        same_node_mtls: true,
        ..AgentOptions::enroll(&["a", "b"])
    })?;
    for size in [1u64, 100, 4096, 65536, 300_000] {
        let report = podtool::send(&a, &format!("{}:8080", b.ip), size)?;
        assert!(report.intact, "size {size}: {report:?}");
    }
    assert_eq!(server.wait_reports(5)?.len(), 5);
    Ok(())
}
