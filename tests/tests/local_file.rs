//! The local file as the source of mesh state, as xDS would be: services
//! balanced across the pods that back them.
use std::time::Duration;

use weir_tests::{AgentOptions, Family, Server, TestNode, podtool, wait_for};

#[test]
fn a_service_from_the_file_is_balanced_across_its_pods() -> anyhow::Result<()> {
    service_balanced_across_its_pods(Family::V4)
}

/// A dual-stack service: its IPv6 VIP reaches the endpoints' IPv6
/// addresses (the family of the destination the application chose).
#[test]
fn an_ipv6_service_vip_is_balanced_across_the_pods_ipv6_addresses() -> anyhow::Result<()> {
    service_balanced_across_its_pods(Family::V6)
}

fn service_balanced_across_its_pods(family: Family) -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b1 = node.add_pod("b1")?;
    let b2 = node.add_pod("b2")?;
    let server1 = Server::start_family(&b1, family, 8080, "echo")?;
    let server2 = Server::start_family(&b2, family, 8080, "echo")?;
    let service = "test/web.test.svc.cluster.local";
    node.start_agent(&AgentOptions {
        services: vec!["{namespace: test, hostname: web.test.svc.cluster.local, vips: [10.96.1.1, 'fd96::1'], ports: [{service_port: 80, target_port: 8080}]}".into()],
        backs: vec![("b1".into(), service.into()), ("b2".into(), service.into())],
        ..AgentOptions::enroll(&["a", "b1", "b2"])
    })?;
    let vip = match family {
        Family::V4 => "10.96.1.1:80",
        Family::V6 => "[fd96::1]:80",
    };
    for _ in 0..6 {
        let report = podtool::send(&a, vip, 128)?;
        assert!(report.intact, "{report:?}");
        assert_eq!(report.peer, vip);
    }
    let counts = wait_for("6 reports", Duration::from_secs(5), || {
        let counts = (server1.reports().len(), server2.reports().len());
        (counts.0 + counts.1 == 6).then_some(counts)
    })?;
    assert_eq!(counts, (3, 3));
    // Each endpoint dialled in the VIP's family, from a's address of it.
    for report in server1.reports().iter().chain(&server2.reports()) {
        assert_eq!(report.peer_ip(), a.ip_of(family).to_string(), "{report:?}");
    }
    // Both reached with the client's identity (same-node hand-off). A
    // connection's record is logged when the proxy sees it close, which
    // may be after the server's report.
    wait_for("6 inbound records", Duration::from_secs(5), || {
        let records = node.log_lines(&[
            "direction=\"inbound\"",
            "peer_identity=spiffe://cluster.local/ns/test/sa/a",
        ]);
        (records.len() == 6).then_some(())
    })?;
    for pod in [&b1, &b2] {
        let records = node.log_lines(&[
            "direction=\"inbound\"",
            &format!("orig_dst={}", pod.addr(family, 8080)),
        ]);
        assert_eq!(records.len(), 3, "{records:?}");
    }
    Ok(())
}
