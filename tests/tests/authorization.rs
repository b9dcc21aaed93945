//! L4 authorization with Istio's semantics, shown by connections that pass
//! or are refused: over HBONE between nodes, by same-node hand-off, and for
//! plaintext from outside the mesh.
use std::time::Duration;

use weir_tests::{AgentOptions, RemoteWorkload, Server, TestNode, connect_nodes, podtool};

const ALLOW_A: &str = "{name: allow-a, namespace: test, action: ALLOW, groups: [{rules: [{matches: [{principals: [cluster.local/ns/test/sa/a]}]}]}]}";

#[test]
fn allow_by_principal_across_nodes_over_hbone() -> anyhow::Result<()> {
    let mut node1 = TestNode::with_index(1)?;
    let mut node2 = TestNode::with_index(2)?;
    connect_nodes(&node1, &node2)?;
    let a = node1.add_pod("a")?;
    let c = node1.add_pod("c")?;
    let b = node2.add_pod("b")?;
    let server = Server::start(&b, 8080, "echo")?;
    let ca_dir = node1.dir.join("ca");
    TestNode::ca_init(&ca_dir)?;
    node1.start_agent(&AgentOptions {
        remote: vec![RemoteWorkload::of(&b)],
        ca_dir: Some(ca_dir.clone()),
        ..AgentOptions::enroll(&["a", "c"])
    })?;
    node2.start_agent(&AgentOptions {
        remote: vec![RemoteWorkload::of(&a), RemoteWorkload::of(&c)],
        ca_dir: Some(ca_dir),
        policies: vec![ALLOW_A.into()],
        ..AgentOptions::enroll(&["b"])
    })?;
    let target = format!("{}:8080", b.ip);

    let allowed = podtool::send(&a, &target, 4096)?;
    assert!(allowed.intact, "sa/a is allowed: {allowed:?}");
    let denied = podtool::send(&c, &target, 4096)?;
    assert!(!denied.intact, "sa/c is not allowed: {denied:?}");
    assert_eq!(server.wait_reports(1)?.len(), 1);
    node2.wait_for_log("connection denied by policy", 1, Duration::from_secs(5))?;
    let denial = node2.log_lines(&["connection denied by policy"]);
    assert!(
        denial[0].contains("peer_identity=spiffe://cluster.local/ns/test/sa/c")
            && denial[0].contains("policy=(no ALLOW policy matched)"),
        "{denial:?}"
    );
    node1.wait_for_log("answered 401", 1, Duration::from_secs(5))?;
    Ok(())
}

#[test]
fn deny_by_namespace_port_scoped_policies_and_the_default_switch() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let c = node.add_pod("c")?;
    let _web = Server::start(&b, 8080, "echo")?;
    let _admin = Server::start(&b, 9090, "echo")?;
    let mut options = AgentOptions::enroll(&["a", "b"]);
    node.start_agent(&options)?;
    let (web, admin) = (format!("{}:8080", b.ip), format!("{}:9090", b.ip));
    let passes = |from: &weir_tests::Pod, to: &str| -> anyhow::Result<bool> {
        Ok(podtool::send(from, to, 1024)?.intact)
    };

    // No policy: everything passes (default allow).
    assert!(passes(&a, &web)? && passes(&a, &admin)? && passes(&c, &web)?);

    // DENY by namespace: meshed pods of `test` are refused; plaintext from c
    // has no namespace to match, so it still passes.
    options.policies = vec!["{name: deny-test, namespace: test, action: DENY, groups: [{rules: [{matches: [{namespaces: [test]}]}]}]}".into()];
    node.reconfigure_agent(&options)?;
    assert!(!passes(&a, &web)?, "a (namespace test) must be denied");
    assert!(passes(&c, &web)?, "plaintext c has no namespace");
    let denial = node.log_lines(&["connection denied by policy", "policy=test/deny-test"]);
    assert!(!denial.is_empty(), "{}", node.agent_log());

    // Port-scoped DENY: 9090 refused, 8080 still open.
    options.policies = vec!["{name: no-admin, namespace: test, action: DENY, groups: [{rules: [{matches: [{destination_ports: [9090]}]}]}]}".into()];
    node.reconfigure_agent(&options)?;
    assert!(passes(&a, &web)?);
    assert!(!passes(&a, &admin)?);
    assert!(!passes(&c, &admin)?);

    // An ALLOW policy switches the workload to default deny: only its
    // matches pass; an ALLOW with no rules allows nothing.
    options.policies = vec![ALLOW_A.into()];
    node.reconfigure_agent(&options)?;
    assert!(passes(&a, &web)?);
    assert!(!passes(&c, &web)?, "plaintext c is not sa/a");
    options.policies = vec!["{name: allow-nothing, namespace: test, action: ALLOW}".into()];
    node.reconfigure_agent(&options)?;
    assert!(!passes(&a, &web)?);
    Ok(())
}
