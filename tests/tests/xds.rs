//! Configuration over delta xDS from a test control plane: workloads that
//! become meshed, NACKs that keep the last good state, policies that change
//! under traffic, a control plane that restarts, and Envoy's routing
//! resources in both modes.
use std::{net::IpAddr, time::Duration};

use prost::Message as _;
use weir_agent::{
    routing::{
        envoy::pb::envoy::config::{
            cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment,
            route::v3::RouteConfiguration,
        },
        schema,
    },
    xds::{
        ADDRESS_TYPE, AUTHORIZATION_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_CONFIGURATION_TYPE,
        proto::istio::{security, workload},
    },
};
use weir_tests::{
    AgentOptions, Family, Pod, Server, TestNode, connect_nodes, podtool, wait_for,
    xds_server::XdsServer,
};

fn workload_resource(pod: &Pod, addresses: Vec<Vec<u8>>) -> Vec<u8> {
    workload::Address {
        r#type: Some(workload::address::Type::Workload(workload::Workload {
            uid: format!("Kubernetes//Pod/test/{}", pod.name),
            name: pod.name.clone(),
            namespace: "test".into(),
            addresses,
            tunnel_protocol: workload::TunnelProtocol::Hbone as i32,
            service_account: pod.name.clone(),
            ..Default::default()
        })),
    }
    .encode_to_vec()
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    }
}

fn deny_namespace_test() -> Vec<u8> {
    security::Authorization {
        name: "deny-test".into(),
        namespace: "test".into(),
        scope: security::Scope::Namespace as i32,
        action: security::Action::Deny as i32,
        groups: vec![security::Group {
            rules: vec![security::Rules {
                matches: vec![security::Match {
                    namespaces: vec![security::StringMatch {
                        match_type: Some(security::string_match::MatchType::Exact("test".into())),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

struct Mesh {
    node1: TestNode,
    node2: TestNode,
    a: Pod,
    b: Pod,
    xds1: XdsServer,
    xds2: XdsServer,
    _server: Server,
    family: Family,
}

/// Two nodes; each agent knows only its own pod from the file, and learns
/// the other node's pod (both its addresses) from its control plane.
fn mesh() -> anyhow::Result<Mesh> {
    mesh_over(Family::V4)
}

fn mesh_over(family: Family) -> anyhow::Result<Mesh> {
    let mut node1 = TestNode::with_index(1)?;
    let mut node2 = TestNode::with_index(2)?;
    connect_nodes(&node1, &node2)?;
    let a = node1.add_pod("a")?;
    let b = node2.add_pod("b")?;
    let server = Server::start_family(&b, family, 8080, "echo")?;
    let ca_dir = node1.dir.join("ca");
    TestNode::ca_init(&ca_dir)?;
    let xds1 = XdsServer::start(&node1.netns_path(), &node1.dir.join("xds"))?;
    let xds2 = XdsServer::start(&node2.netns_path(), &node2.dir.join("xds"))?;
    xds1.push(
        ADDRESS_TYPE,
        "Kubernetes//Pod/test/b",
        workload_resource(&b, vec![octets(b.ip.into()), octets(b.ip6.into())]),
    );
    xds2.push(
        ADDRESS_TYPE,
        "Kubernetes//Pod/test/a",
        workload_resource(&a, vec![octets(a.ip.into()), octets(a.ip6.into())]),
    );
    node1.start_agent(&AgentOptions {
        ca_dir: Some(ca_dir.clone()),
        xds: Some(xds1.endpoint.clone()),
        ..AgentOptions::enroll(&["a"])
    })?;
    node2.start_agent(&AgentOptions {
        ca_dir: Some(ca_dir),
        xds: Some(xds2.endpoint.clone()),
        ..AgentOptions::enroll(&["b"])
    })?;
    Ok(Mesh {
        node1,
        node2,
        a,
        b,
        xds1,
        xds2,
        _server: server,
        family,
    })
}

impl Mesh {
    fn target(&self) -> String {
        self.b.addr(self.family, 8080)
    }

    fn hbone_streams(&self) -> usize {
        self.node2
            .log_lines(&["direction=\"inbound\"", "protocol=\"hbone\"", "sa/a"])
            .len()
    }
}

#[test]
fn workloads_pushed_over_delta_xds_are_reached_through_hbone() -> anyhow::Result<()> {
    reached_through_hbone(Family::V4)
}

/// A workload's IPv6 address from the workload API is meshed like its
/// IPv4 one.
#[test]
fn workloads_pushed_over_delta_xds_are_reached_through_hbone_over_ipv6() -> anyhow::Result<()> {
    reached_through_hbone(Family::V6)
}

fn reached_through_hbone(family: Family) -> anyhow::Result<()> {
    let mut mesh = mesh_over(family)?;
    // Ready once the first full state is applied.
    mesh.node1
        .wait_ready()
        .map_err(|error| anyhow::anyhow!("{error}; agent log:\n{}", mesh.node1.agent_log()))?;
    let report = podtool::send(&mesh.a, &mesh.target(), 64 * 1024)?;
    assert!(report.intact && report.captured(), "{report:?}");
    mesh.node2
        .wait_for_log("protocol=\"hbone\"", 1, Duration::from_secs(5))?;
    assert_eq!(mesh.hbone_streams(), 1);

    // The client subscribed to both types, identified its node, and ACKed.
    let requests = mesh.xds1.requests();
    for type_url in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
        assert!(
            requests
                .iter()
                .any(|r| r.type_url == type_url && r.response_nonce.is_empty()),
            "{requests:?}"
        );
        assert!(
            requests.iter().any(|r| r.type_url == type_url
                && !r.response_nonce.is_empty()
                && r.error_detail.is_none()),
            "{requests:?}"
        );
    }
    assert!(
        requests[0]
            .node_id
            .as_deref()
            .is_some_and(|id| id.starts_with("ztunnel~")),
        "{requests:?}"
    );
    let (_, dump) = mesh.node1.http_get(15000, "/config_dump")?;
    assert!(dump.contains("Kubernetes//Pod/test/b"), "{dump}");
    Ok(())
}

#[test]
fn an_invalid_resource_is_nacked_and_the_last_good_state_serves() -> anyhow::Result<()> {
    let mut mesh = mesh()?;
    assert!(podtool::send(&mesh.a, &mesh.target(), 1024)?.intact);
    // b's workload again, now with a 3-byte address.
    mesh.xds1.push(
        ADDRESS_TYPE,
        "Kubernetes//Pod/test/b",
        workload_resource(&mesh.b, vec![vec![10, 77, 2]]),
    );
    let nack = wait_for("a NACK", Duration::from_secs(10), || {
        mesh.xds1
            .requests()
            .into_iter()
            .find_map(|r| r.error_detail)
    })?;
    assert!(
        nack.contains("Kubernetes//Pod/test/b") && nack.contains("3 bytes"),
        "{nack}"
    );
    mesh.node1
        .wait_for_log("xDS NACK", 1, Duration::from_secs(5))?;
    // Still meshed with the previous version of b.
    assert!(podtool::send(&mesh.a, &mesh.target(), 1024)?.intact);
    mesh.node2
        .wait_for_log("protocol=\"hbone\"", 2, Duration::from_secs(5))?;
    Ok(())
}

#[test]
fn a_policy_change_closes_established_connections_it_now_denies() -> anyhow::Result<()> {
    let mut mesh = mesh()?;
    let a = mesh.a.clone();
    let target = mesh.target();
    // An established connection, exchanging for 6 s while the policy
    // changes, as ztunnel re-checks every connection on a change.
    let long_lived = std::thread::spawn(move || podtool::stream(&a, &target, 6));
    wait_for(
        "the connection delivered to b",
        Duration::from_secs(10),
        || (mesh.b.connections_to_port(8080).ok()? == 1).then_some(()),
    )?;
    mesh.xds2
        .push(AUTHORIZATION_TYPE, "test/deny-test", deny_namespace_test());
    let stream = long_lived
        .join()
        .map_err(|_| anyhow::anyhow!("stream thread panicked"))?;
    assert!(
        stream.is_err(),
        "the established connection is denied now and must be closed: {stream:?}"
    );
    mesh.node2.wait_for_log(
        "connection closed: no longer allowed after a policy change",
        1,
        Duration::from_secs(5),
    )?;
    let closed = mesh
        .node2
        .log_lines(&["no longer allowed after a policy change"]);
    assert!(
        closed[0].contains("policy=test/deny-test") && closed[0].contains("sa/a"),
        "{closed:?}"
    );
    let (_, metrics) = mesh.node2.http_get(15020, "/metrics")?;
    assert_eq!(
        weir_tests::metric_sample(&metrics, "weir_connections_closed_by_policy_total", &[]),
        Some(1.0),
        "{metrics}"
    );
    // New connections are refused too, until the policy goes.
    assert!(!podtool::send(&mesh.a, &mesh.target(), 64)?.intact);
    mesh.xds2.remove(AUTHORIZATION_TYPE, "test/deny-test");
    wait_for("the DENY policy to go", Duration::from_secs(10), || {
        podtool::send(&mesh.a, &mesh.target(), 64)
            .ok()?
            .intact
            .then_some(())
    })?;
    Ok(())
}

/// An authorization for namespace `test` as istiod writes an
/// AuthorizationPolicy whose `from.source.serviceAccounts` is `accounts`.
fn service_account_policy(
    name: &str,
    action: security::Action,
    accounts: &[&str],
    dry_run: bool,
) -> Vec<u8> {
    security::Authorization {
        name: name.into(),
        namespace: "test".into(),
        scope: security::Scope::Namespace as i32,
        action: action as i32,
        groups: vec![security::Group {
            rules: vec![security::Rules {
                matches: vec![security::Match {
                    service_accounts: accounts
                        .iter()
                        .map(|account| security::ServiceAccountMatch {
                            namespace: "test".into(),
                            service_account: (*account).into(),
                        })
                        .collect(),
                    ..Default::default()
                }],
            }],
        }],
        dry_run,
    }
    .encode_to_vec()
}

/// The bypass istiod's service-account policies opened: an ALLOW for
/// another account refuses a, one for a admits it; a dry-run DENY is
/// counted and logged, never enforced; a match field Weir does not know is
/// NACKed by name and the last good policies stay.
#[test]
fn service_account_policies_over_xds_admit_only_that_account_and_dry_runs_are_only_reported()
-> anyhow::Result<()> {
    let mut mesh = mesh()?;
    let reaches_b = |mesh: &Mesh| {
        podtool::send(&mesh.a, &mesh.target(), 64)
            .map(|out| out.intact)
            .unwrap_or(false)
    };
    assert!(reaches_b(&mesh));
    mesh.xds2.push(
        AUTHORIZATION_TYPE,
        "test/allow",
        service_account_policy("allow", security::Action::Allow, &["other"], false),
    );
    wait_for(
        "a refused: it is not test/other",
        Duration::from_secs(10),
        || (!reaches_b(&mesh)).then_some(()),
    )?;
    // The policy is in force now (the refusal above may have been a
    // connection that its arrival closed): a new connection is denied.
    assert!(!reaches_b(&mesh));
    mesh.node2
        .wait_for_log("connection denied by policy", 1, Duration::from_secs(5))?;
    mesh.xds2.push(
        AUTHORIZATION_TYPE,
        "test/allow",
        service_account_policy("allow", security::Action::Allow, &["other", "a"], false),
    );
    wait_for("a admitted as test/a", Duration::from_secs(10), || {
        reaches_b(&mesh).then_some(())
    })?;

    mesh.xds2.push(
        AUTHORIZATION_TYPE,
        "test/deny-a-dry-run",
        service_account_policy("deny-a-dry-run", security::Action::Deny, &["a"], true),
    );
    wait_for("a dry-run verdict", Duration::from_secs(10), || {
        if !reaches_b(&mesh) {
            return None;
        }
        let (_, metrics) = mesh.node2.http_get(15020, "/metrics").ok()?;
        weir_tests::metric_sample(
            &metrics,
            "weir_policy_dry_run_verdicts_total",
            &["result=\"denied\""],
        )
        .filter(|count| *count >= 1.0)
    })?;
    let lines = mesh
        .node2
        .log_lines(&["dry run: a dry-run policy would deny"]);
    assert!(
        lines
            .iter()
            .any(|line| line.contains("policy=test/deny-a-dry-run") && line.contains("sa/a")),
        "{lines:?}"
    );

    // A match field 14, unknown to Weir: refused by name, nothing changes.
    let mut unknown = service_account_policy("allow", security::Action::Allow, &["other"], false);
    let mut m = security::Match::default().encode_to_vec();
    prost::encoding::string::encode(14, &"x".to_string(), &mut m);
    let mut rules = Vec::new();
    prost::encoding::bytes::encode(2, &m, &mut rules);
    let mut group = Vec::new();
    prost::encoding::bytes::encode(1, &rules, &mut group);
    prost::encoding::bytes::encode(5, &group, &mut unknown);
    mesh.xds2.push(AUTHORIZATION_TYPE, "test/allow", unknown);
    let nack = nack_of(&mesh.xds2, AUTHORIZATION_TYPE)?;
    assert!(
        nack.contains("test/allow") && nack.contains("field 14 is not known to Weir"),
        "{nack}"
    );
    assert!(reaches_b(&mesh), "the last good policies still admit a");
    Ok(())
}

#[test]
fn the_agent_rides_out_a_control_plane_restart_and_resumes() -> anyhow::Result<()> {
    let mut mesh = mesh()?;
    assert!(podtool::send(&mesh.a, &mesh.target(), 1024)?.intact);
    let streams_before = mesh
        .xds2
        .requests()
        .iter()
        .filter(|r| r.node_id.is_some())
        .count();
    mesh.xds2.stop();
    mesh.node2.wait_for_log(
        "reconnecting to the control plane",
        1,
        Duration::from_secs(10),
    )?;
    // Serving from the last good state meanwhile.
    assert!(podtool::send(&mesh.a, &mesh.target(), 1024)?.intact);
    mesh.xds2.restart()?;
    let resumed = wait_for("a resumed subscription", Duration::from_secs(20), || {
        let requests = mesh.xds2.requests();
        let opened = requests.iter().filter(|r| r.node_id.is_some()).count();
        (opened > streams_before).then(|| {
            requests
                .iter()
                .rfind(|r| r.type_url == ADDRESS_TYPE && r.response_nonce.is_empty())
                .cloned()
        })?
    })?;
    assert_eq!(
        resumed
            .initial_resource_versions
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        vec!["Kubernetes//Pod/test/a".to_string()],
        "the agent resumes with the versions it holds"
    );
    // And it converges on what changes after the restart.
    mesh.xds2
        .push(AUTHORIZATION_TYPE, "test/deny-test", deny_namespace_test());
    wait_for("the post-restart policy", Duration::from_secs(10), || {
        (!podtool::send(&mesh.a, &mesh.target(), 64).ok()?.intact).then_some(())
    })?;
    Ok(())
}

fn service_resource(vip: IpAddr, port: u32, target: u32) -> Vec<u8> {
    workload::Address {
        r#type: Some(workload::address::Type::Service(workload::Service {
            name: "echo".into(),
            namespace: "test".into(),
            hostname: "echo.test.svc.cluster.local".into(),
            addresses: vec![workload::NetworkAddress {
                network: String::new(),
                address: octets(vip),
            }],
            ports: vec![workload::Port {
                service_port: port,
                target_port: target,
                ..Default::default()
            }],
            ..Default::default()
        })),
    }
    .encode_to_vec()
}

fn endpoint_resource(pod: &Pod, node: &str) -> Vec<u8> {
    let mut address =
        workload::Address::decode(&*workload_resource(pod, vec![octets(pod.ip.into())]))
            .expect("own encoding");
    if let Some(workload::address::Type::Workload(w)) = address.r#type.as_mut() {
        w.node = node.into();
        w.services.insert(
            "test/echo.test.svc.cluster.local".into(),
            workload::PortList {
                ports: vec![workload::Port {
                    service_port: 80,
                    target_port: 8080,
                    ..Default::default()
                }],
            },
        );
    }
    address.encode_to_vec()
}

/// Two connected nodes, a on the first and b (an echo server on 8080) on
/// the second, a CA, and a control plane for the first node; no agent yet.
struct Pair {
    node1: TestNode,
    node2: TestNode,
    a: Pod,
    b: Pod,
    ca_dir: std::path::PathBuf,
    xds1: XdsServer,
    _server: Server,
}

fn pair() -> anyhow::Result<Pair> {
    let mut node1 = TestNode::with_index(1)?;
    let mut node2 = TestNode::with_index(2)?;
    connect_nodes(&node1, &node2)?;
    let a = node1.add_pod("a")?;
    let b = node2.add_pod("b")?;
    let server = Server::start(&b, 8080, "echo")?;
    let ca_dir = node1.dir.join("ca");
    TestNode::ca_init(&ca_dir)?;
    let xds1 = XdsServer::start(&node1.netns_path(), &node1.dir.join("xds"))?;
    Ok(Pair {
        node1,
        node2,
        a,
        b,
        ca_dir,
        xds1,
        _server: server,
    })
}

/// istiod marks a workload it knows outside the ambient mesh
/// `tunnel_protocol: NONE`. It is reached in plaintext on its own port,
/// directly or as a service's endpoint, as ztunnel reaches it; before, Weir
/// tunnelled to its port 15008, where nothing answers.
#[test]
fn a_workload_marked_none_is_reached_in_plaintext_directly_and_behind_a_vip() -> anyhow::Result<()>
{
    // No agent on node 2 (yet): b is outside the mesh.
    let Pair {
        mut node1,
        node2,
        a,
        b,
        ca_dir,
        xds1,
        _server,
    } = pair()?;
    let mut address = workload::Address::decode(&*endpoint_resource(&b, &node2.id))?;
    if let Some(workload::address::Type::Workload(w)) = address.r#type.as_mut() {
        w.tunnel_protocol = workload::TunnelProtocol::None as i32;
    }
    xds1.push(
        ADDRESS_TYPE,
        "Kubernetes//Pod/test/b",
        address.encode_to_vec(),
    );
    let vip: IpAddr = "10.96.0.12".parse()?;
    xds1.push(
        ADDRESS_TYPE,
        "test/echo.test.svc.cluster.local",
        service_resource(vip, 80, 8080),
    );
    node1.start_agent(&AgentOptions {
        ca_dir: Some(ca_dir),
        xds: Some(xds1.endpoint.clone()),
        ..AgentOptions::enroll(&["a"])
    })?;
    node1.wait_ready()?;
    for target in [b.addr(Family::V4, 8080), format!("{vip}:80")] {
        let report = podtool::send(&a, &target, 1024)?;
        assert!(report.intact && report.captured(), "{target}: {report:?}");
    }
    node1.wait_for_log("protocol=\"tcp\"", 2, Duration::from_secs(5))?;
    let plain = node1.log_lines(&[
        "direction=\"outbound\"",
        "protocol=\"tcp\"",
        "end=\"closed\"",
    ]);
    assert_eq!(plain.len(), 2, "both went as plain TCP: {plain:?}");
    assert!(
        node1.log_lines(&["protocol=\"hbone\""]).is_empty(),
        "no tunnel was opened"
    );
    Ok(())
}

/// istiod binds a workload or a service to a waypoint, where its L7
/// policies are enforced. Weir sends such traffic to the waypoint over
/// HBONE as ztunnel does: the `CONNECT` names what the client dialled (the
/// pod's address, or the service VIP), carries the client's identity (its
/// certificate), `baggage`, `traceparent` and `forwarded`, and the tunnel
/// expects the waypoint's identity. The waypoint here is a stand-in HBONE
/// server (`tests/src/bin/waypoint.rs`) that forwards what it receives. A
/// waypoint that has no endpoint fails the connection; it is never
/// bypassed.
#[test]
fn a_destination_bound_to_a_waypoint_is_reached_through_it_never_around_it() -> anyhow::Result<()> {
    let mut mesh = mesh_over(Family::V6)?;
    let wp = mesh.node2.add_pod("wp")?;
    let vip: IpAddr = "10.96.0.13".parse()?;
    let waypoint = weir_tests::waypoint::Waypoint::start(
        &wp,
        &mesh.node1.dir.join("ca"),
        "spiffe://cluster.local/ns/test/sa/wp",
        15008,
        &[(format!("{vip}:80"), mesh.b.addr(Family::V4, 8080))],
    )?;
    // The waypoint: a service on 15008 and its pod.
    let mut waypoint_service =
        workload::Address::decode(&*service_resource("10.96.0.99".parse()?, 15008, 15008))?;
    if let Some(workload::address::Type::Service(s)) = waypoint_service.r#type.as_mut() {
        s.name = "waypoint".into();
        s.hostname = "waypoint.test.svc.cluster.local".into();
    }
    mesh.xds1.push(
        ADDRESS_TYPE,
        "test/waypoint.test.svc.cluster.local",
        waypoint_service.encode_to_vec(),
    );
    let mut wp_workload = workload::Address::decode(&*workload_resource(
        &wp,
        vec![octets(wp.ip.into()), octets(wp.ip6.into())],
    ))?;
    if let Some(workload::address::Type::Workload(w)) = wp_workload.r#type.as_mut() {
        w.services.insert(
            "test/waypoint.test.svc.cluster.local".into(),
            workload::PortList {
                ports: vec![workload::Port {
                    service_port: 15008,
                    target_port: 15008,
                    ..Default::default()
                }],
            },
        );
    }
    mesh.xds1.push(
        ADDRESS_TYPE,
        "Kubernetes//Pod/test/wp",
        wp_workload.encode_to_vec(),
    );

    // b bound to the waypoint by name.
    let by_name = workload::GatewayAddress {
        destination: Some(workload::gateway_address::Destination::Hostname(
            workload::NamespacedHostname {
                namespace: "test".into(),
                hostname: "waypoint.test.svc.cluster.local".into(),
            },
        )),
        hbone_mtls_port: 15008,
    };
    let mut b = workload::Address::decode(&*workload_resource(
        &mesh.b,
        vec![octets(mesh.b.ip.into()), octets(mesh.b.ip6.into())],
    ))?;
    if let Some(workload::address::Type::Workload(w)) = b.r#type.as_mut() {
        w.waypoint = Some(by_name);
    }
    mesh.xds1
        .push(ADDRESS_TYPE, "Kubernetes//Pod/test/b", b.encode_to_vec());
    wait_for("b's waypoint to apply", Duration::from_secs(10), || {
        podtool::send(&mesh.a, &mesh.b.addr(Family::V4, 8080), 64).ok()?;
        (!waypoint.connects().is_empty()).then_some(())
    })?;
    for family in [Family::V4, Family::V6] {
        let target = mesh.b.addr(family, 8080);
        let before = waypoint.connects().len();
        let report = podtool::send(&mesh.a, &target, 4096)?;
        assert!(report.intact, "{target} through the waypoint: {report:?}");
        // This connection's own CONNECT: it went through the waypoint.
        let connect = wait_for("the waypoint's CONNECT", Duration::from_secs(5), || {
            waypoint.connects().get(before).cloned()
        })?;
        assert_eq!(connect["authority"], target.as_str(), "{connect}");
        assert_eq!(connect["method"], "CONNECT");
        assert_eq!(connect["client"], "spiffe://cluster.local/ns/test/sa/a");
        let baggage = connect["baggage"].as_str().unwrap_or_default();
        assert!(
            baggage.contains("k8s.namespace.name=test") && baggage.contains("k8s.pod.name=a"),
            "{connect}"
        );
        assert!(
            connect["traceparent"]
                .as_str()
                .is_some_and(|t| t.starts_with("00-")),
            "{connect}"
        );
        let a_address = mesh.a.ip_of(family).to_string();
        assert!(
            connect["forwarded"]
                .as_str()
                .is_some_and(|f| f.contains(&a_address)),
            "{connect}"
        );
    }

    // A service bound to the waypoint by address: its VIP goes there too.
    mesh.xds1.push(
        ADDRESS_TYPE,
        "Kubernetes//Pod/test/b",
        endpoint_resource(&mesh.b, &mesh.node2.id),
    );
    let mut service = workload::Address::decode(&*service_resource(vip, 80, 8080))?;
    if let Some(workload::address::Type::Service(s)) = service.r#type.as_mut() {
        s.waypoint = Some(workload::GatewayAddress {
            destination: Some(workload::gateway_address::Destination::Address(
                workload::NetworkAddress {
                    network: String::new(),
                    address: octets(wp.ip.into()),
                },
            )),
            hbone_mtls_port: 15008,
        });
    }
    mesh.xds1.push(
        ADDRESS_TYPE,
        "test/echo.test.svc.cluster.local",
        service.encode_to_vec(),
    );
    wait_for(
        "the VIP through the waypoint",
        Duration::from_secs(10),
        || {
            podtool::send(&mesh.a, &format!("{vip}:80"), 256)
                .ok()?
                .intact
                .then_some(())?;
            waypoint
                .connects()
                .iter()
                .any(|c| c["authority"] == format!("{vip}:80").as_str())
                .then_some(())
        },
    )?;

    // The waypoint's pod goes away: the VIP fails rather than skip it.
    mesh.xds1.remove(ADDRESS_TYPE, "Kubernetes//Pod/test/wp");
    wait_for("the VIP to fail closed", Duration::from_secs(10), || {
        (!podtool::send(&mesh.a, &format!("{vip}:80"), 64)
            .ok()?
            .intact)
            .then_some(())
    })?;
    mesh.node1.wait_for_log(
        "is no workload Weir knows, so its identity cannot be checked",
        1,
        Duration::from_secs(5),
    )?;
    Ok(())
}

/// A workload istiod knows by hostname only (a DNS ServiceEntry's
/// endpoint: `hostname`, no addresses) is resolved when a connection to
/// its service is made, as ztunnel resolves it. Here the hostname is b's
/// address written as a name, so no DNS server is needed; one that does not
/// resolve fails the connection with the reason.
#[test]
fn a_hostname_only_endpoint_is_resolved_when_dialled() -> anyhow::Result<()> {
    let Pair {
        mut node1,
        node2: _node2,
        a,
        b,
        ca_dir,
        xds1,
        _server,
    } = pair()?;
    let endpoint = |hostname: &str| {
        workload::Address {
            r#type: Some(workload::address::Type::Workload(workload::Workload {
                uid: "Kubernetes/networking.istio.io/ServiceEntry/test/external/ext".into(),
                name: "ext".into(),
                namespace: "test".into(),
                hostname: hostname.into(),
                tunnel_protocol: workload::TunnelProtocol::None as i32,
                services: [(
                    "test/echo.test.svc.cluster.local".to_string(),
                    workload::PortList {
                        ports: vec![workload::Port {
                            service_port: 80,
                            target_port: 8080,
                            ..Default::default()
                        }],
                    },
                )]
                .into_iter()
                .collect(),
                ..Default::default()
            })),
        }
        .encode_to_vec()
    };
    let vip: IpAddr = "10.96.0.77".parse()?;
    xds1.push(
        ADDRESS_TYPE,
        "test/echo.test.svc.cluster.local",
        service_resource(vip, 80, 8080),
    );
    xds1.push(
        ADDRESS_TYPE,
        "Kubernetes/networking.istio.io/ServiceEntry/test/external/ext",
        endpoint(&b.ip.to_string()),
    );
    node1.start_agent(&AgentOptions {
        ca_dir: Some(ca_dir),
        xds: Some(xds1.endpoint.clone()),
        ..AgentOptions::enroll(&["a"])
    })?;
    node1.wait_ready()?;
    let report = podtool::send(&a, &format!("{vip}:80"), 2048)?;
    assert!(report.intact && report.captured(), "{report:?}");
    assert_eq!(
        report.peer,
        format!("{vip}:80"),
        "the application sees the VIP"
    );

    xds1.push(
        ADDRESS_TYPE,
        "Kubernetes/networking.istio.io/ServiceEntry/test/external/ext",
        endpoint("no-such-host.invalid"),
    );
    wait_for("the unresolvable endpoint", Duration::from_secs(20), || {
        (!podtool::send(&a, &format!("{vip}:80"), 64).ok()?.intact).then_some(())
    })?;
    node1.wait_for_log(
        "cannot resolve the endpoint's hostname",
        1,
        Duration::from_secs(10),
    )?;
    Ok(())
}

/// A workload that is not ready (istiod's `status: UNHEALTHY`, as for a
/// pod failing its readiness probe) is still a mesh member for traffic to
/// its own address: a headless service's or a StatefulSet's client reaches
/// it over HBONE with its identity checked (its STRICT mode would refuse
/// plaintext). Only a service VIP skips it.
#[test]
fn a_workload_that_is_not_ready_stays_in_the_mesh_but_no_vip_picks_it() -> anyhow::Result<()> {
    let mut node1 = TestNode::with_index(1)?;
    let mut node2 = TestNode::with_index(2)?;
    connect_nodes(&node1, &node2)?;
    let a = node1.add_pod("a")?;
    let sick = node2.add_pod("sick")?;
    let well = node2.add_pod("well")?;
    let sick_server = Server::start(&sick, 8080, "echo")?;
    let well_server = Server::start(&well, 8080, "echo")?;
    let ca_dir = node1.dir.join("ca");
    TestNode::ca_init(&ca_dir)?;
    let xds1 = XdsServer::start(&node1.netns_path(), &node1.dir.join("xds"))?;
    xds1.push(
        ADDRESS_TYPE,
        "test/echo.test.svc.cluster.local",
        service_resource("10.96.0.11".parse()?, 80, 8080),
    );
    let mut not_ready = workload::Address::decode(&*endpoint_resource(&sick, &node2.id))?;
    if let Some(workload::address::Type::Workload(w)) = not_ready.r#type.as_mut() {
        w.status = workload::WorkloadStatus::Unhealthy as i32;
    }
    xds1.push(
        ADDRESS_TYPE,
        "Kubernetes//Pod/test/sick",
        not_ready.encode_to_vec(),
    );
    xds1.push(
        ADDRESS_TYPE,
        "Kubernetes//Pod/test/well",
        endpoint_resource(&well, &node2.id),
    );
    node1.start_agent(&AgentOptions {
        ca_dir: Some(ca_dir.clone()),
        xds: Some(xds1.endpoint.clone()),
        ..AgentOptions::enroll(&["a"])
    })?;
    node2.start_agent(&AgentOptions {
        ca_dir: Some(ca_dir),
        remote: vec![weir_tests::RemoteWorkload::of(&a)],
        strict: vec!["sick".into()],
        ..AgentOptions::enroll(&["sick", "well"])
    })?;
    node1.wait_ready()?;
    let (_, dump) = node1.http_get(15000, "/config_dump")?;
    let dump: serde_json::Value = serde_json::from_str(&dump)?;
    let listed = |id: &str| {
        dump["workloads"]
            .as_array()
            .and_then(|all| all.iter().find(|w| w["id"] == id))
            .map(|w| w["healthy"].clone())
    };
    assert_eq!(listed("test/sick"), Some(false.into()), "{dump:#}");
    assert_eq!(listed("test/well"), Some(true.into()), "{dump:#}");

    // Its own address: through HBONE, a's identity seen by sick's side.
    let report = podtool::send(&a, &format!("{}:8080", sick.ip), 1024)?;
    assert!(report.intact && report.captured(), "{report:?}");
    node2.wait_for_log("direction=\"inbound\"", 1, Duration::from_secs(5))?;
    let inbound = node2.log_lines(&["direction=\"inbound\"", "pod=test/sick"]);
    assert_eq!(inbound.len(), 1, "{}", node2.agent_log());
    assert!(
        inbound[0].contains("protocol=\"hbone\"")
            && inbound[0].contains("peer_identity=spiffe://cluster.local/ns/test/sa/a")
            && inbound[0].contains("end=\"closed\""),
        "{inbound:?}"
    );

    // The VIP: every connection to the ready endpoint.
    for _ in 0..4 {
        let report = podtool::send(&a, "10.96.0.11:80", 256)?;
        assert!(report.intact, "{report:?}");
    }
    well_server.wait_reports(4)?;
    assert_eq!(sick_server.wait_reports(1)?.len(), 1);
    assert_eq!(well_server.reports().len(), 4);
    Ok(())
}

#[test]
fn a_service_vip_is_balanced_across_its_endpoints() -> anyhow::Result<()> {
    let mut node1 = TestNode::with_index(1)?;
    let mut node2 = TestNode::with_index(2)?;
    connect_nodes(&node1, &node2)?;
    let a = node1.add_pod("a")?;
    let b1 = node2.add_pod("b1")?;
    let b2 = node2.add_pod("b2")?;
    let server1 = Server::start(&b1, 8080, "echo")?;
    let server2 = Server::start(&b2, 8080, "echo")?;
    let ca_dir = node1.dir.join("ca");
    TestNode::ca_init(&ca_dir)?;
    let xds1 = XdsServer::start(&node1.netns_path(), &node1.dir.join("xds"))?;
    let vip: IpAddr = "10.96.0.10".parse()?;
    xds1.push(
        ADDRESS_TYPE,
        "test/echo.test.svc.cluster.local",
        service_resource(vip, 80, 8080),
    );
    for pod in [&b1, &b2] {
        xds1.push(
            ADDRESS_TYPE,
            &format!("Kubernetes//Pod/test/{}", pod.name),
            endpoint_resource(pod, &node2.id),
        );
    }
    node1.start_agent(&AgentOptions {
        ca_dir: Some(ca_dir.clone()),
        xds: Some(xds1.endpoint.clone()),
        ..AgentOptions::enroll(&["a"])
    })?;
    node2.start_agent(&AgentOptions {
        ca_dir: Some(ca_dir),
        remote: vec![weir_tests::RemoteWorkload::of(&a)],
        ..AgentOptions::enroll(&["b1", "b2"])
    })?;
    node1.wait_ready()?;
    for _ in 0..10 {
        let report = podtool::send(&a, "10.96.0.10:80", 256)?;
        assert!(report.intact, "{report:?}");
        assert_eq!(report.peer, "10.96.0.10:80", "the application sees the VIP");
    }
    let (one, two) = wait_for("10 connection reports", Duration::from_secs(5), || {
        let counts = (server1.reports().len(), server2.reports().len());
        (counts.0 + counts.1 == 10).then_some(counts)
    })?;
    assert_eq!((one, two), (5, 5), "round robin across the two endpoints");
    // Through HBONE to each endpoint's identity, on its target port.
    node2.wait_for_log("protocol=\"hbone\"", 10, Duration::from_secs(5))?;
    assert_eq!(
        node2
            .log_lines(&["protocol=\"hbone\"", "orig_dst=10.77.2.2:8080"])
            .len(),
        5
    );
    assert_eq!(
        node2
            .log_lines(&["protocol=\"hbone\"", "orig_dst=10.77.2.3:8080"])
            .len(),
        5
    );

    // A new endpoint joins and an old one leaves: new connections follow.
    let b3 = node2.add_pod("b3")?;
    let server3 = Server::start(&b3, 8080, "echo")?;
    let options2 = AgentOptions {
        ca_dir: Some(node1.dir.join("ca")),
        remote: vec![weir_tests::RemoteWorkload::of(&a)],
        ..AgentOptions::enroll(&["b1", "b2", "b3"])
    };
    node2.reconfigure_agent(&options2)?;
    xds1.push(
        ADDRESS_TYPE,
        "Kubernetes//Pod/test/b3",
        endpoint_resource(&b3, &node2.id),
    );
    xds1.remove(ADDRESS_TYPE, "Kubernetes//Pod/test/b1");
    wait_for("the new endpoint set", Duration::from_secs(10), || {
        let (_, dump) = node1.http_get(15000, "/config_dump").ok()?;
        (dump.contains("Kubernetes//Pod/test/b3") && !dump.contains("Kubernetes//Pod/test/b1"))
            .then_some(())
    })?;
    for _ in 0..6 {
        assert!(podtool::send(&a, "10.96.0.10:80", 256)?.intact);
    }
    let counts = wait_for("16 connection reports", Duration::from_secs(5), || {
        let counts = (
            server1.reports().len(),
            server2.reports().len(),
            server3.reports().len(),
        );
        (counts.0 + counts.1 + counts.2 == 16).then_some(counts)
    })?;
    assert_eq!(
        counts,
        (5, 8, 3),
        "b1 removed, b2 and b3 share the new connections"
    );
    Ok(())
}

/// istiod's `load_balancing` (a Service's `trafficDistribution:
/// PreferClose` is FAILOVER over network, region, zone and subzone), as
/// ztunnel applies it: FAILOVER keeps to the client's zone while it has an
/// endpoint there and fails over when it has none; STRICT never leaves
/// the zone. Both families of VIP, both families of endpoint address.
#[test]
fn a_services_load_balancing_keeps_to_the_zone_and_strict_never_leaves_it() -> anyhow::Result<()> {
    let mut node1 = TestNode::with_index(1)?;
    let mut node2 = TestNode::with_index(2)?;
    connect_nodes(&node1, &node2)?;
    let a = node1.add_pod("a")?;
    let near = node2.add_pod("near")?;
    let far = node2.add_pod("far")?;
    let near_server = Server::start_family(&near, Family::V6, 8080, "echo")?;
    let far_server = Server::start_family(&far, Family::V6, 8080, "echo")?;
    let ca_dir = node1.dir.join("ca");
    TestNode::ca_init(&ca_dir)?;
    let xds1 = XdsServer::start(&node1.netns_path(), &node1.dir.join("xds"))?;
    let (vip, vip6): (IpAddr, IpAddr) = ("10.96.0.50".parse()?, "fd96::50".parse()?);
    let service = |mode: workload::load_balancing::Mode| {
        use workload::load_balancing::Scope;
        let mut address =
            workload::Address::decode(&*service_resource(vip, 80, 8080)).expect("own encoding");
        if let Some(workload::address::Type::Service(s)) = address.r#type.as_mut() {
            s.addresses.push(workload::NetworkAddress {
                network: String::new(),
                address: octets(vip6),
            });
            s.load_balancing = Some(workload::LoadBalancing {
                routing_preference: [Scope::Network, Scope::Region, Scope::Zone, Scope::Subzone]
                    .map(|scope| scope as i32)
                    .to_vec(),
                mode: mode as i32,
                health_policy: 0,
            });
        }
        address.encode_to_vec()
    };
    let endpoint = |pod: &Pod, zone: &str| {
        let mut address =
            workload::Address::decode(&*endpoint_resource(pod, &node2.id)).expect("own encoding");
        if let Some(workload::address::Type::Workload(w)) = address.r#type.as_mut() {
            w.addresses.push(octets(pod.ip6.into()));
            w.locality = Some(workload::Locality {
                region: "r1".into(),
                zone: zone.into(),
                subzone: String::new(),
            });
        }
        address.encode_to_vec()
    };
    xds1.push(
        ADDRESS_TYPE,
        "test/echo.test.svc.cluster.local",
        service(workload::load_balancing::Mode::Failover),
    );
    xds1.push(
        ADDRESS_TYPE,
        "Kubernetes//Pod/test/near",
        endpoint(&near, "z1"),
    );
    xds1.push(
        ADDRESS_TYPE,
        "Kubernetes//Pod/test/far",
        endpoint(&far, "z2"),
    );
    node1.start_agent(&AgentOptions {
        ca_dir: Some(ca_dir.clone()),
        xds: Some(xds1.endpoint.clone()),
        extra_config: "locality: {region: r1, zone: z1}\n".into(),
        ..AgentOptions::enroll(&["a"])
    })?;
    node2.start_agent(&AgentOptions {
        ca_dir: Some(ca_dir),
        remote: vec![weir_tests::RemoteWorkload::of(&a)],
        ..AgentOptions::enroll(&["near", "far"])
    })?;
    node1.wait_ready()?;
    let targets = [format!("{vip}:80"), format!("[{vip6}]:80")];
    let send_all = |count: usize| -> anyhow::Result<usize> {
        let mut intact = 0;
        for i in 0..count {
            let report = podtool::send(&a, &targets[i % 2], 256)?;
            intact += usize::from(report.intact);
        }
        Ok(intact)
    };
    assert_eq!(send_all(6)?, 6);
    let counts = wait_for("6 connection reports", Duration::from_secs(5), || {
        let counts = (near_server.reports().len(), far_server.reports().len());
        (counts.0 + counts.1 == 6).then_some(counts)
    })?;
    assert_eq!(counts, (6, 0), "FAILOVER keeps to the client's zone");
    // The source's metrics name the endpoint the VIP went to, as ztunnel's.
    let labels = [
        "reporter=\"source\"",
        "destination_workload=\"near\"",
        "destination_service=\"echo.test.svc.cluster.local\"",
        "destination_zone=\"z1\"",
    ];
    wait_for("the endpoint in the labels", Duration::from_secs(5), || {
        let (_, text) = node1.http_get(15020, "/metrics").ok()?;
        (weir_tests::metric_sample(&text, "istio_tcp_connections_closed_total", &labels)
            == Some(6.0))
        .then_some(())
    })?;
    let near_peers: Vec<String> = near_server
        .reports()
        .iter()
        .map(|r| r.peer.clone())
        .collect();
    assert!(
        near_peers
            .iter()
            .any(|peer| peer.contains(&a.ip6.to_string())),
        "the IPv6 VIP reached the endpoint's IPv6 address: {near_peers:?}"
    );

    // The zone loses its endpoint: FAILOVER goes to the next rank.
    xds1.remove(ADDRESS_TYPE, "Kubernetes//Pod/test/near");
    wait_for("near removed", Duration::from_secs(10), || {
        let (_, dump) = node1.http_get(15000, "/config_dump").ok()?;
        (!dump.contains("Kubernetes//Pod/test/near")).then_some(())
    })?;
    assert_eq!(send_all(4)?, 4);
    wait_for("failed over", Duration::from_secs(5), || {
        (far_server.reports().len() == 4).then_some(())
    })?;

    // STRICT: nothing in the zone, nothing at all.
    xds1.push(
        ADDRESS_TYPE,
        "test/echo.test.svc.cluster.local",
        service(workload::load_balancing::Mode::Strict),
    );
    // Until it applies, connections still fail over; each is counted.
    let mut failed_over = 4;
    wait_for("strict applied", Duration::from_secs(10), || {
        if send_all(1).ok()? == 1 {
            failed_over += 1;
            return None;
        }
        Some(())
    })?;
    node1.wait_for_log(
        "no healthy endpoint the service's load balancing allows",
        1,
        Duration::from_secs(5),
    )?;
    assert_eq!(send_all(3)?, 0, "STRICT: no endpoint in the zone");
    wait_for("the far endpoint's reports", Duration::from_secs(5), || {
        (far_server.reports().len() == failed_over).then_some(())
    })
    .map_err(|e| anyhow::anyhow!("{e}: STRICT sent to the far endpoint"))?;
    Ok(())
}

#[test]
fn state_of_the_world_mode_applies_full_sets_and_nacks_bad_resources() -> anyhow::Result<()> {
    let Pair {
        mut node1,
        mut node2,
        a,
        b,
        ca_dir,
        xds1,
        _server,
    } = pair()?;
    xds1.push(
        ADDRESS_TYPE,
        "Kubernetes//Pod/test/b",
        workload_resource(&b, vec![octets(b.ip.into())]),
    );
    node1.start_agent(&AgentOptions {
        ca_dir: Some(ca_dir.clone()),
        xds: Some(xds1.endpoint.clone()),
        xds_sotw: true,
        ..AgentOptions::enroll(&["a"])
    })?;
    node2.start_agent(&AgentOptions {
        ca_dir: Some(ca_dir),
        remote: vec![weir_tests::RemoteWorkload::of(&a)],
        ..AgentOptions::enroll(&["b"])
    })?;
    node1.wait_ready()?;
    let target = format!("{}:8080", b.ip);
    assert!(podtool::send(&a, &target, 1024)?.intact);
    node2.wait_for_log("protocol=\"hbone\"", 1, Duration::from_secs(5))?;

    // A bad resource in the set is NACKed; b stays meshed.
    xds1.push(
        ADDRESS_TYPE,
        "Kubernetes//Pod/test/bad",
        workload_resource(&a, vec![vec![1, 2]]),
    );
    let nack = wait_for("a NACK", Duration::from_secs(10), || {
        xds1.requests().into_iter().find_map(|r| r.error_detail)
    })?;
    assert!(nack.contains("2 bytes"), "{nack}");
    assert!(podtool::send(&a, &target, 1024)?.intact);
    node2.wait_for_log("protocol=\"hbone\"", 2, Duration::from_secs(5))?;

    // b leaves the set: a reaches it in plaintext again.
    xds1.remove(ADDRESS_TYPE, "Kubernetes//Pod/test/bad");
    xds1.remove(ADDRESS_TYPE, "Kubernetes//Pod/test/b");
    wait_for("b to leave the mesh view", Duration::from_secs(10), || {
        let (_, dump) = node1.http_get(15000, "/config_dump").ok()?;
        (!dump.contains("Kubernetes//Pod/test/b")).then_some(())
    })?;
    assert!(podtool::send(&a, &target, 1024)?.intact);
    node2.wait_for_log("protocol=\"tcp\"", 1, Duration::from_secs(5))?;
    Ok(())
}

const ROUTES: &str = "echo.test.svc.cluster.local";
const CLUSTER: &str = "outbound|80|v2|echo.test.svc.cluster.local";

/// A `RouteConfiguration` whose one route matches `regex`, written in the
/// file's YAML and encoded as the control plane sends it.
fn route_configuration(regex: &str) -> Vec<u8> {
    let yaml = format!(
        r#"
name: {ROUTES}
virtual_hosts:
- name: echo
  domains: ["*"]
  routes:
  - name: api
    match: {{safe_regex: {{regex: "{regex}"}}}}
    route: {{cluster: "{CLUSTER}", timeout: 2s}}
"#
    );
    let value: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("valid YAML");
    schema::read::<RouteConfiguration, _>(value)
        .expect("a message")
        .encode_to_vec()
}

/// A `ClusterLoadAssignment` for the cluster with one endpoint at `address`.
fn assignment(address: &str) -> Vec<u8> {
    let json = format!(
        r#"{{"cluster_name": "{CLUSTER}", "endpoints": [{{"lb_endpoints": [
            {{"endpoint": {{"address": {{"socket_address": {{"address": "{address}", "port_value": 8080}}}}}}}}]}}]}}"#
    );
    schema::from_json::<ClusterLoadAssignment>(&json)
        .expect("a message")
        .encode_to_vec()
}

fn cluster(health_checked: bool) -> Vec<u8> {
    let yaml = format!(
        r#"
name: "{CLUSTER}"
type: EDS
eds_cluster_config: {{eds_config: {{ads: {{}}}}}}
lb_policy: LEAST_REQUEST
metadata: {{filter_metadata: {{istio: {{subset: v2}}}}}}
"#
    );
    let value: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("valid YAML");
    let mut message = schema::read::<Cluster, _>(value).expect("a message");
    if health_checked {
        message.health_checks.push(Default::default());
    }
    message.encode_to_vec()
}

/// The `xds` part of `/config_dump`.
fn xds_dump(node: &TestNode) -> Option<serde_json::Value> {
    let (_, text) = node.http_get(15000, "/config_dump").ok()?;
    let dump: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(dump["xds"].clone())
}

/// The first NACK of `type_url`.
fn nack_of(xds: &XdsServer, type_url: &str) -> anyhow::Result<String> {
    wait_for("a NACK", Duration::from_secs(10), || {
        xds.requests()
            .into_iter()
            .filter(|r| r.type_url == type_url)
            .find_map(|r| r.error_detail)
    })
}

/// Route configurations, clusters and their EDS assignments are held by
/// name and listed in `/config_dump`; a bad one is NACKed with the reason
/// and the last good version stays; removal removes. Over delta, EDS is
/// subscribed by the EDS cluster's name.
fn routing_resources_over_xds(sotw: bool) -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    node.add_pod("a")?;
    let xds = XdsServer::start(&node.netns_path(), &node.dir.join("xds"))?;
    xds.push(
        ROUTE_CONFIGURATION_TYPE,
        ROUTES,
        route_configuration("/api/[0-9]+"),
    );
    xds.push(CLUSTER_TYPE, CLUSTER, cluster(false));
    xds.push(ENDPOINT_TYPE, CLUSTER, assignment("10.0.0.7"));
    node.start_agent(&AgentOptions {
        xds: Some(xds.endpoint.clone()),
        xds_sotw: sotw,
        ..AgentOptions::enroll(&["a"])
    })?;
    let dump = wait_for("routing in /config_dump", Duration::from_secs(10), || {
        let dump = xds_dump(&node)?;
        (dump["route_configs"].get(ROUTES).is_some()
            && dump["clusters"].get(CLUSTER).is_some()
            && dump["endpoints"].get(CLUSTER).is_some())
        .then_some(dump)
    })
    .map_err(|error| anyhow::anyhow!("{error}; agent log:\n{}", node.agent_log()))?;
    let routes_version = dump["route_configs"][ROUTES].clone();
    let cluster_version = dump["clusters"][CLUSTER].clone();
    let endpoints_version = dump["endpoints"][CLUSTER].clone();
    if !sotw {
        // Delta: EDS by the names of the EDS clusters held, as istiod serves it.
        let subscribed: Vec<Vec<String>> = xds
            .requests()
            .into_iter()
            .filter(|request| {
                request.type_url == ENDPOINT_TYPE && request.response_nonce.is_empty()
            })
            .map(|request| request.resource_names_subscribe)
            .collect();
        assert_eq!(subscribed, [vec![CLUSTER.to_string()]], "{subscribed:?}");
    }

    // A regex that does not compile, then a field Weir does not support.
    xds.push(
        ROUTE_CONFIGURATION_TYPE,
        ROUTES,
        route_configuration("/api/(["),
    );
    let nack = nack_of(&xds, ROUTE_CONFIGURATION_TYPE)?;
    assert!(
        nack.starts_with(&format!(
            "{ROUTES}: route 'api' in virtual host 'echo': match.safe_regex"
        )) && nack.contains("does not compile"),
        "{nack}"
    );
    xds.push(CLUSTER_TYPE, CLUSTER, cluster(true));
    let nack = nack_of(&xds, CLUSTER_TYPE)?;
    assert_eq!(nack, format!("{CLUSTER}: unsupported field health_checks"));
    // EDS endpoints are IP addresses, as in Envoy.
    xds.push(ENDPOINT_TYPE, CLUSTER, assignment("reviews.example"));
    let nack = nack_of(&xds, ENDPOINT_TYPE)?;
    assert!(nack.contains("an IP address"), "{nack}");
    node.wait_for_log("xDS NACK", 3, Duration::from_secs(5))?;
    let dump = xds_dump(&node).ok_or_else(|| anyhow::anyhow!("no /config_dump"))?;
    assert_eq!(dump["route_configs"][ROUTES], routes_version, "{dump}");
    assert_eq!(dump["clusters"][CLUSTER], cluster_version, "{dump}");
    assert_eq!(dump["endpoints"][CLUSTER], endpoints_version, "{dump}");

    xds.remove(CLUSTER_TYPE, CLUSTER);
    wait_for("the cluster to go", Duration::from_secs(10), || {
        let dump = xds_dump(&node)?;
        (dump["clusters"].get(CLUSTER).is_none() && dump["route_configs"].get(ROUTES).is_some())
            .then_some(())
    })?;
    Ok(())
}

#[test]
fn route_configurations_and_clusters_over_delta_xds() -> anyhow::Result<()> {
    routing_resources_over_xds(false)
}

#[test]
fn route_configurations_and_clusters_over_state_of_the_world_xds() -> anyhow::Result<()> {
    routing_resources_over_xds(true)
}
