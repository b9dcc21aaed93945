//! Certificates from a CA speaking Istio's certificate service (gRPC over
//! TLS, bearer token, impersonation metadata), including a CA that fails.
use std::time::Duration;

use weir_tests::{
    AgentOptions, Server, TestNode,
    ca_server::{Fault, TOKEN, TestCa},
    podtool,
};

fn meshed_pair(
    fault: Fault,
    faults: usize,
) -> anyhow::Result<(TestNode, TestCa, weir_tests::Pod, weir_tests::Pod, Server)> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let server = Server::start(&b, 8080, "echo")?;
    let ca = TestCa::start(&node.netns_path(), &node.dir.join("istiod"), fault, faults)?;
    // The local mTLS hop, so the Istio-issued certificates are used on both ends.
    node.start_agent(&AgentOptions {
        istio_ca: Some(ca.config.clone()),
        same_node_mtls: true,
        ..AgentOptions::enroll(&["a", "b"])
    })?;
    Ok((node, ca, a, b, server))
}

#[test]
fn certificates_come_from_the_istio_ca_protocol() -> anyhow::Result<()> {
    let (mut node, ca, a, b, server) = meshed_pair(Fault::Unavailable, 0)?;
    let report = podtool::send(&a, &format!("{}:8080", b.ip), 64 * 1024)?;
    assert!(report.intact && report.captured(), "{report:?}");
    assert_eq!(server.wait_reports(1)?[0].peer_ip(), a.ip.to_string());

    let requests = ca.requests();
    for identity in [
        "spiffe://cluster.local/ns/test/sa/a",
        "spiffe://cluster.local/ns/test/sa/b",
    ] {
        let request = requests
            .iter()
            .find(|request| request.impersonated.as_deref() == Some(identity))
            .unwrap_or_else(|| panic!("no request impersonating {identity}: {requests:?}"));
        assert_eq!(
            request.authorization.as_deref(),
            Some(format!("Bearer {TOKEN}").as_str())
        );
        assert_eq!(request.cluster_id.as_deref(), Some("Kubernetes"));
        assert_eq!(request.csr_sans, vec![identity.to_string()], "CSR SANs");
        assert!(request.csr_key_is_p256, "CSR key is not ECDSA P-256");
        assert_eq!(request.validity_seconds, 24 * 3600);
    }
    // One CSR per identity, however many connections needed it.
    assert_eq!(requests.len(), 2, "{requests:?}");
    // The record is written when the connection has closed on both sides,
    // which can be after the server reported.
    node.wait_for_log(
        "direction=\"inbound\" protocol=\"hbone\"",
        1,
        Duration::from_secs(5),
    )?;
    let inbound = node.log_lines(&["direction=\"inbound\"", "protocol=\"hbone\""]);
    assert!(
        inbound[0].contains("peer_identity=spiffe://cluster.local/ns/test/sa/a"),
        "{inbound:?}"
    );
    Ok(())
}

#[test]
fn a_ca_answering_garbage_is_reported_and_retried() -> anyhow::Result<()> {
    let (mut node, ca, a, b, _server) = meshed_pair(Fault::Garbage, 2)?;
    let report = podtool::send(&a, &format!("{}:8080", b.ip), 1024)?;
    assert!(report.intact, "{report:?}");
    node.wait_for_log(
        "CA answered with an unusable certificate chain",
        1,
        Duration::from_secs(5),
    )?;
    assert!(ca.requests().len() >= 4, "{:?}", ca.requests());
    Ok(())
}

#[test]
fn an_unavailable_ca_is_retried_with_backoff() -> anyhow::Result<()> {
    let (mut node, ca, a, b, _server) = meshed_pair(Fault::Unavailable, 3)?;
    let report = podtool::send(&a, &format!("{}:8080", b.ip), 1024)?;
    assert!(report.intact, "{report:?}");
    node.wait_for_log("CA request failed; retrying", 1, Duration::from_secs(5))?;
    let retries = node.log_lines(&["CA request failed; retrying"]);
    assert!(
        retries[0].contains("CA unreachable") || retries[0].contains("CA warming up"),
        "{retries:?}"
    );
    assert!(ca.requests().len() >= 5, "{:?}", ca.requests());
    Ok(())
}

/// istiod refuses to sign for a workload when the agent may not act for
/// it (its service account is not in CA_TRUSTED_NODE_ACCOUNTS); the agent
/// says what that takes, and the connection that needed the certificate
/// fails instead of going without mTLS.
#[test]
fn a_refused_impersonation_names_what_istiod_requires() -> anyhow::Result<()> {
    let (mut node, _ca, a, b, server) = meshed_pair(Fault::RefuseImpersonation, usize::MAX)?;
    let report = podtool::send(&a, &format!("{}:8080", b.ip), 1024)?;
    assert!(!report.intact, "no certificate, no connection: {report:?}");
    node.wait_for_log("CA_TRUSTED_NODE_ACCOUNTS", 1, Duration::from_secs(5))?;
    let lines = node.log_lines(&["request impersonation authentication failure"]);
    assert!(
        lines
            .iter()
            .any(|line| line.contains("istio-system/ztunnel") && line.contains("sa/")),
        "{lines:?}"
    );
    assert!(server.reports().is_empty(), "nothing reached b");
    Ok(())
}
