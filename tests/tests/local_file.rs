//! The local file as the source of mesh state, as xDS would be: services
//! balanced across the pods that back them.
use std::time::Duration;

use weir_tests::{AgentOptions, Server, TestNode, podtool, wait_for};

#[test]
fn a_service_from_the_file_is_balanced_across_its_pods() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b1 = node.add_pod("b1")?;
    let b2 = node.add_pod("b2")?;
    let server1 = Server::start(&b1, 8080, "echo")?;
    let server2 = Server::start(&b2, 8080, "echo")?;
    let service = "test/web.test.svc.cluster.local";
    node.start_agent(&AgentOptions {
        services: vec!["{namespace: test, hostname: web.test.svc.cluster.local, vips: [10.96.1.1], ports: [{service_port: 80, target_port: 8080}]}".into()],
        backs: vec![("b1".into(), service.into()), ("b2".into(), service.into())],
        ..AgentOptions::enroll(&["a", "b1", "b2"])
    })?;
    for _ in 0..6 {
        let report = podtool::send(&a, "10.96.1.1:80", 128)?;
        assert!(report.intact, "{report:?}");
        assert_eq!(report.peer, "10.96.1.1:80");
    }
    let counts = wait_for("6 reports", Duration::from_secs(5), || {
        let counts = (server1.reports().len(), server2.reports().len());
        (counts.0 + counts.1 == 6).then_some(counts)
    })?;
    assert_eq!(counts, (3, 3));
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
    Ok(())
}
