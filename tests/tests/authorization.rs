//! L4 authorization with Istio's semantics, shown by connections that pass
//! or are refused: over HBONE between nodes, by same-node hand-off, and for
//! plaintext from outside the mesh.
use std::time::Duration;

use weir_tests::{AgentOptions, Family, RemoteWorkload, Server, TestNode, connect_nodes, podtool};

const ALLOW_A: &str = "{name: allow-a, namespace: test, action: ALLOW, groups: [{rules: [{matches: [{principals: [cluster.local/ns/test/sa/a]}]}]}]}";

#[test]
fn allow_by_principal_across_nodes_over_hbone() -> anyhow::Result<()> {
    allow_by_principal_across_nodes(Family::V4)
}

#[test]
fn allow_by_principal_across_nodes_over_hbone_over_ipv6() -> anyhow::Result<()> {
    allow_by_principal_across_nodes(Family::V6)
}

fn allow_by_principal_across_nodes(family: Family) -> anyhow::Result<()> {
    let mut node1 = TestNode::with_index(1)?;
    let mut node2 = TestNode::with_index(2)?;
    connect_nodes(&node1, &node2)?;
    let a = node1.add_pod("a")?;
    let c = node1.add_pod("c")?;
    let b = node2.add_pod("b")?;
    let server = Server::start_family(&b, family, 8080, "echo")?;
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
    let target = b.addr(family, 8080);

    let allowed = podtool::send(&a, &target, 4096)?;
    assert!(allowed.intact, "sa/a is allowed: {allowed:?}");
    let denied = podtool::send(&c, &target, 4096)?;
    assert!(!denied.intact, "sa/c is not allowed: {denied:?}");
    assert_eq!(server.wait_reports(1)?.len(), 1);
    node2.wait_for_log("connection denied by policy", 1, Duration::from_secs(5))?;
    let denial = node2.log_lines(&["connection denied by policy"]);
    assert!(
        denial[0].contains("peer_identity=spiffe://cluster.local/ns/test/sa/c")
            && denial[0].contains("policy=(no ALLOW policy matched)")
            && denial[0].contains(&format!("src={}", c.addr_prefix(family))),
        "{denial:?}"
    );
    node1.wait_for_log("answered 401", 1, Duration::from_secs(5))?;
    // Counted as ztunnel counts a denial.
    let (_, metrics) = node2.http_get(15020, "/metrics")?;
    assert_eq!(
        weir_tests::metric_sample(
            &metrics,
            "istio_tcp_connections_failed_total",
            &[
                "reporter=\"destination\"",
                "source_principal=\"spiffe://cluster.local/ns/test/sa/c\"",
                "response_flags=\"DENY\"",
            ]
        ),
        Some(1.0),
        "{metrics}"
    );
    Ok(())
}

#[test]
fn deny_by_namespace_port_scoped_policies_and_the_default_switch() -> anyhow::Result<()> {
    deny_allow_and_the_default_switch(Family::V4)
}

#[test]
fn deny_by_namespace_port_scoped_policies_and_the_default_switch_over_ipv6() -> anyhow::Result<()> {
    deny_allow_and_the_default_switch(Family::V6)
}

fn deny_allow_and_the_default_switch(family: Family) -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let c = node.add_pod("c")?;
    let _web = Server::start_family(&b, family, 8080, "echo")?;
    let _admin = Server::start_family(&b, family, 9090, "echo")?;
    let mut options = AgentOptions::enroll(&["a", "b"]);
    node.start_agent(&options)?;
    let (web, admin) = (b.addr(family, 8080), b.addr(family, 9090));
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

    // DENY by source address block, in the family of the connection: the
    // pods' subnet is denied (c from outside the mesh, a through it); a
    // block of the other family matches nobody.
    let (subnet, other) = match family {
        Family::V4 => (
            format!("10.77.{}.0/24", node.index),
            "fd77::/16".to_string(),
        ),
        Family::V6 => (
            format!("fd77:{}::/64", node.index),
            "10.0.0.0/8".to_string(),
        ),
    };
    options.policies = vec![format!(
        "{{name: no-subnet, namespace: test, action: DENY, groups: [{{rules: [{{matches: [{{source_ips: ['{subnet}']}}]}}]}}]}}"
    )];
    node.reconfigure_agent(&options)?;
    assert!(!passes(&c, &web)?, "c is in {subnet}");
    assert!(!passes(&a, &web)?, "a is in {subnet}");
    options.policies = vec![format!(
        "{{name: no-other, namespace: test, action: DENY, groups: [{{rules: [{{matches: [{{source_ips: ['{other}']}}]}}]}}]}}"
    )];
    node.reconfigure_agent(&options)?;
    assert!(
        passes(&c, &web)? && passes(&a, &web)?,
        "{other} matches nobody"
    );
    let denial = node.log_lines(&["connection denied by policy", "policy=test/no-subnet"]);
    assert!(
        denial
            .iter()
            .any(|line| line.contains(&format!("src={}", c.addr_prefix(family)))),
        "{denial:?}"
    );
    Ok(())
}

/// HTTP attributes in policies: the destination's side parses the pod's
/// HTTP and authorizes every request (Envoy RBAC's 403 and gRPC
/// PERMISSION_DENIED), whether the stream came by hand-off, through the L7
/// proxy's routes, or through HBONE from another node.
const ALLOW_PUBLIC_READS: &str = "{name: public-reads, namespace: test, action: ALLOW, groups: [{rules: [{matches: [{methods: [GET, HEAD], paths: ['/public/*']}]}]}]}";
const DENY_DEBUG: &str = "{name: no-debug, namespace: test, action: DENY, groups: [{rules: [{matches: [{request_headers: {x-debug: ['*']}}]}]}]}";

fn status(line: &serde_json::Value) -> u64 {
    line["status"].as_u64().unwrap_or(0)
}

fn get(pod: &weir_tests::Pod, url: &str, extra: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut args = vec!["--url", url];
    args.extend_from_slice(extra);
    weir_tests::http::get(pod, &args)?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no response from {url}"))
}

#[test]
fn http_policies_authorize_each_request_on_the_same_node() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let server = weir_tests::http::HttpServer::start(&b, 8080, "b")?;
    let _echo = Server::start(&b, 9000, "echo")?;
    let routing = serde_json::json!({
        "route_configs": [{"name": "web.test", "virtual_hosts": [{"name": "web",
            "domains": ["*"], "routes": [{"match": {"prefix": "/"},
            "route": {"cluster": "outbound|80||web.test"}}]}]}],
    });
    node.start_agent(&AgentOptions {
        policies: vec![ALLOW_PUBLIC_READS.into(), DENY_DEBUG.into()],
        services: vec!["{namespace: test, hostname: web.test, vips: [10.96.8.1], ports: [{service_port: 80, target_port: 8080}]}".into()],
        backs: vec![("b".into(), "test/web.test".into())],
        extra_config: format!("routing: {routing}\n"),
        ..AgentOptions::enroll(&["a", "b"])
    })?;
    let direct = |path: &str| format!("http://{}:8080{path}", b.ip);

    // Hand-off of a plain (L4) client's connection: one keep-alive
    // connection per call, each request judged on its own.
    let line = get(&a, &direct("/public/x"), &[])?;
    assert_eq!(status(&line), 200, "{line}");
    let line = get(
        &a,
        &direct("/public/x"),
        &["--method", "POST", "--data", "x"],
    )?;
    assert_eq!(status(&line), 403, "{line}");
    assert_eq!(line["body"], "RBAC: access denied", "{line}");
    let line = get(&a, &direct("/admin"), &[])?;
    assert_eq!(status(&line), 403, "{line}");
    let line = get(&a, &direct("/public/x"), &["--header", "x-debug: 1"])?;
    assert_eq!(status(&line), 403, "DENY by header: {line}");
    // gRPC: PERMISSION_DENIED (its path is not under /public/).
    let calls =
        weir_tests::http::grpc(&a, &["--to", &format!("{}:8080", b.ip), "--message", "hi"])?;
    assert_eq!(calls[0]["code"], 7, "{calls:?}");
    // Through the L7 proxy's routes (the hand-off pipes into the same check).
    let line = get(&a, "http://10.96.8.1/public/y", &[])?;
    assert_eq!(status(&line), 200, "{line}");
    let line = get(&a, "http://10.96.8.1/private", &[])?;
    assert_eq!(status(&line), 403, "{line}");
    // Only the allowed requests reached the application.
    let seen = server.wait_requests(2)?;
    let paths: Vec<&str> = seen.iter().filter_map(|r| r["path"].as_str()).collect();
    assert_eq!(paths, ["/public/x", "/public/y"], "{seen:?}");
    // Not HTTP: the ALLOW needs HTTP, so the stream is refused.
    let report = podtool::send(&a, &format!("{}:9000", b.ip), 1024)?;
    assert!(!report.intact, "{report:?}");
    node.wait_for_log("connection denied by policy", 1, Duration::from_secs(5))?;
    let denials = node.log_lines(&["connection denied by policy", "path=/admin"]);
    assert_eq!(
        denials.len(),
        1,
        "the denied request is logged: {denials:?}"
    );
    Ok(())
}

#[test]
fn http_policies_apply_inside_hbone_tunnels() -> anyhow::Result<()> {
    let mut node1 = TestNode::with_index(1)?;
    let mut node2 = TestNode::with_index(2)?;
    connect_nodes(&node1, &node2)?;
    let a = node1.add_pod("a")?;
    let b = node2.add_pod("b")?;
    let server = weir_tests::http::HttpServer::start(&b, 8080, "b")?;
    let ca_dir = node1.dir.join("ca");
    TestNode::ca_init(&ca_dir)?;
    node1.start_agent(&AgentOptions {
        remote: vec![RemoteWorkload::of(&b)],
        ca_dir: Some(ca_dir.clone()),
        ..AgentOptions::enroll(&["a"])
    })?;
    node2.start_agent(&AgentOptions {
        remote: vec![RemoteWorkload::of(&a)],
        ca_dir: Some(ca_dir),
        policies: vec![ALLOW_PUBLIC_READS.into()],
        ..AgentOptions::enroll(&["b"])
    })?;
    let url = |path: &str| format!("http://{}:8080{path}", b.ip);
    let line = get(&a, &url("/public/z"), &["--h2"])?;
    assert_eq!(status(&line), 200, "{line}");
    let line = get(&a, &url("/secret"), &["--h2"])?;
    assert_eq!(status(&line), 403, "{line}");
    let seen = server.wait_requests(1)?;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0]["peer"]
            .as_str()
            .is_some_and(|peer| peer.starts_with(&format!("{}:", a.ip))),
        "the application still sees the client: {seen:?}"
    );
    Ok(())
}

/// Policies apply to established connections, as ztunnel's do: a reload
/// re-checks every open inbound connection. An L4 connection the new
/// policies deny is closed (logged, counted, its record names the policy);
/// one they still allow carries on; an HTTP connection stays up and its
/// next request meets the new policies.
#[test]
fn a_policy_reload_closes_established_connections_it_now_denies() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    // c is outside the mesh: plaintext, no namespace to match.
    let c = node.add_pod("c")?;
    let _echo = Server::start(&b, 9000, "echo")?;
    let http = weir_tests::http::HttpServer::start(&b, 8080, "b")?;
    const ALLOW_PORT_9000: &str = "{name: tcp-9000, namespace: test, action: ALLOW, groups: [{rules: [{matches: [{destination_ports: [9000]}]}]}]}";
    let mut options = AgentOptions {
        policies: vec![ALLOW_PUBLIC_READS.into(), ALLOW_PORT_9000.into()],
        ..AgentOptions::enroll(&["a", "b"])
    };
    node.start_agent(&options)?;
    let echo = format!("{}:9000", b.ip);
    let streams: Vec<_> = [&a, &c]
        .into_iter()
        .map(|pod| {
            let (pod, echo) = (pod.clone(), echo.clone());
            std::thread::spawn(move || podtool::stream(&pod, &echo, 8))
        })
        .collect();
    weir_tests::wait_for("both streams delivered", Duration::from_secs(10), || {
        (b.connections_to_port(9000).ok()? == 2).then_some(())
    })?;
    // One kept-alive HTTP connection, a request every 300 ms.
    let url = format!("http://{}:8080/public/x?delay_ms=300", b.ip);
    let client = {
        let a = a.clone();
        std::thread::spawn(move || weir_tests::http::get(&a, &["--url", &url, "--count", "20"]))
    };
    http.wait_requests(2)?;

    // Pod a's namespace is now denied port 9000, and only /other/* may be
    // read over HTTP.
    options.policies = vec![
        "{name: other-reads, namespace: test, action: ALLOW, groups: [{rules: [{matches: [{methods: [GET], paths: ['/other/*']}]}]}]}".into(),
        ALLOW_PORT_9000.into(),
        "{name: no-test-9000, namespace: test, action: DENY, groups: [{rules: [{matches: [{namespaces: [test], destination_ports: [9000]}]}]}]}".into(),
    ];
    node.reconfigure_agent(&options)?;

    let mut streams = streams.into_iter().map(|stream| {
        stream
            .join()
            .map_err(|_| anyhow::anyhow!("stream thread panicked"))
    });
    let from_a = streams.next().ok_or_else(|| anyhow::anyhow!("a"))??;
    let from_c = streams.next().ok_or_else(|| anyhow::anyhow!("c"))??;
    assert!(
        from_a.is_err(),
        "a's connection is denied now and must be closed: {from_a:?}"
    );
    let exchanges = from_c?;
    assert!(exchanges >= 30, "c's connection was disturbed: {exchanges}");

    node.wait_for_log(
        "connection closed: no longer allowed after a policy change",
        1,
        Duration::from_secs(5),
    )?;
    let closed = node.log_lines(&["no longer allowed after a policy change"]);
    assert_eq!(closed.len(), 1, "{closed:#?}");
    assert!(
        closed[0].contains("policy=test/no-test-9000") && closed[0].contains("sa/a"),
        "{closed:?}"
    );
    // The connection's own record, in the access log (written every 20 ms).
    node.wait_for_log(
        "closed by policy test/no-test-9000",
        1,
        Duration::from_secs(5),
    )?;
    let record = node.log_lines(&[
        "direction=\"inbound\"",
        "end=\"error\"",
        "closed by policy test/no-test-9000",
    ]);
    assert_eq!(record.len(), 1, "{}", node.agent_log());
    let (_, metrics) = node.http_get(15020, "/metrics")?;
    assert_eq!(
        weir_tests::metric_sample(&metrics, "weir_connections_closed_by_policy_total", &[]),
        Some(1.0),
        "{metrics}"
    );

    // The HTTP connection stayed up: its later requests were refused by
    // the new policy, on the same connection, never reaching b.
    let lines = client
        .join()
        .map_err(|_| anyhow::anyhow!("http client thread panicked"))??;
    let summary = weir_tests::http::summary(&lines)?;
    assert_eq!(summary["errors"], 0, "{summary}");
    let allowed = summary["by_status"]["200"].as_u64().unwrap_or(0);
    let refused = summary["by_status"]["403"].as_u64().unwrap_or(0);
    assert!(
        allowed >= 2 && refused >= 1 && allowed + refused == 20,
        "{summary}"
    );
    assert_eq!(http.requests().len() as u64, allowed);
    let http_record = [
        "end=".to_string(),
        "direction=\"inbound\"".to_string(),
        format!("orig_dst={}:8080", b.ip),
    ];
    let http_record: Vec<&str> = http_record.iter().map(String::as_str).collect();
    let http_connections = weir_tests::wait_for(
        "the HTTP connection's record",
        Duration::from_secs(5),
        || Some(node.log_lines(&http_record)).filter(|lines| !lines.is_empty()),
    )?;
    assert_eq!(http_connections.len(), 1, "{http_connections:#?}");
    Ok(())
}

/// The L7 proxy keeps its upstream connections to a pod of this node (the
/// hand-off, authorized at L4 when it opened): a policy change that denies
/// the client pod closes them too, so no later request rides an old one.
#[test]
fn a_policy_reload_closes_the_l7_proxys_pooled_connection_to_a_denied_pod() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let server = weir_tests::http::HttpServer::start(&b, 8080, "b")?;
    let routing = serde_json::json!({
        "route_configs": [{"name": "web.test", "virtual_hosts": [{"name": "web",
            "domains": ["*"], "routes": [{"match": {"prefix": "/"},
            "route": {"cluster": "outbound|80||web.test"}}]}]}],
    });
    let mut options = AgentOptions {
        services: vec!["{namespace: test, hostname: web.test, vips: [10.96.8.2], ports: [{service_port: 80, target_port: 8080}]}".into()],
        backs: vec![("b".into(), "test/web.test".into())],
        extra_config: format!("routing: {routing}\n"),
        ..AgentOptions::enroll(&["a", "b"])
    };
    node.start_agent(&options)?;
    let client = {
        let a = a.clone();
        std::thread::spawn(move || {
            weir_tests::http::get(
                &a,
                &["--url", "http://10.96.8.2/x?delay_ms=300", "--count", "20"],
            )
        })
    };
    server.wait_requests(2)?;
    options.policies = vec!["{name: deny-test, namespace: test, action: DENY, groups: [{rules: [{matches: [{namespaces: [test]}]}]}]}".into()];
    node.reconfigure_agent(&options)?;
    let lines = client
        .join()
        .map_err(|_| anyhow::anyhow!("http client thread panicked"))??;
    let summary = weir_tests::http::summary(&lines)?;
    let allowed = summary["by_status"]["200"].as_u64().unwrap_or(0);
    let refused = summary["by_status"]["503"].as_u64().unwrap_or(0);
    assert!(
        allowed >= 1 && refused >= 1 && allowed + refused == 20,
        "{summary}"
    );
    // Nothing reached b after the change: the later requests were refused
    // on their way, none rode the connection opened before it (the one in
    // flight as it closed may have reached b, unanswered).
    let reached = server.requests().len() as u64;
    assert!(
        reached == allowed || reached == allowed + 1,
        "{reached}: {summary}"
    );
    node.wait_for_log(
        "connection closed: no longer allowed after a policy change",
        1,
        Duration::from_secs(5),
    )?;
    Ok(())
}

/// Istio's `destination.ip` (istiod's `destination_ips`): a DENY of one of
/// a dual-stack pod's addresses refuses connections to that address and
/// lets those to its other one pass, in either family.
#[test]
fn a_deny_on_one_destination_address_refuses_that_address_only() -> anyhow::Result<()> {
    for denied in [Family::V4, Family::V6] {
        let mut node = TestNode::new()?;
        let a = node.add_pod("a")?;
        let b = node.add_pod("b")?;
        let _server = Server::start_family(&b, Family::V6, 8080, "echo")?;
        let prefix = match denied {
            Family::V4 => 32,
            Family::V6 => 128,
        };
        node.start_agent(&AgentOptions {
            policies: vec![format!(
                "{{name: one-address, namespace: test, action: DENY, groups: [{{rules: [{{matches: [{{destination_ips: ['{}/{prefix}']}}]}}]}}]}}",
                b.ip_of(denied)
            )],
            ..AgentOptions::enroll(&["a", "b"])
        })?;
        let other = match denied {
            Family::V4 => Family::V6,
            Family::V6 => Family::V4,
        };
        let refused = podtool::send(&a, &b.addr(denied, 8080), 512)?;
        assert!(!refused.intact, "{denied:?} address denied: {refused:?}");
        let passed = podtool::send(&a, &b.addr(other, 8080), 512)?;
        assert!(passed.intact, "{other:?} address passes: {passed:?}");
        node.wait_for_log("policy=test/one-address", 1, Duration::from_secs(5))?;
    }
    Ok(())
}
