//! Prometheus metrics on :15020 with Istio's names and labels, and the
//! agent's own.
use std::time::Duration;

use prost::Message as _;
use weir_agent::xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE, proto::istio::workload};
use weir_common::map_name;
use weir_tests::{
    AgentOptions, Family, Server, TestNode, podtool, wait_for, xds_server::XdsServer,
};

use weir_tests::metric_sample as sample;

#[test]
fn tcp_metrics_carry_istio_labels_and_the_agent_reports_its_own() -> anyhow::Result<()> {
    tcp_metrics(Family::V4)
}

#[test]
fn tcp_metrics_over_ipv6_carry_istio_labels() -> anyhow::Result<()> {
    tcp_metrics(Family::V6)
}

fn tcp_metrics(family: Family) -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _server = Server::start_family(&b, family, 8080, "echo")?;
    node.start_agent(&AgentOptions::enroll(&["a", "b"]))?;
    for _ in 0..2 {
        assert!(podtool::send(&a, &b.addr(family, 8080), 4096)?.intact);
    }
    node.wait_for_log(
        "direction=\"inbound\"",
        2,
        std::time::Duration::from_secs(5),
    )?;

    let (status, text) = node.http_get(15020, "/metrics")?;
    assert_eq!(status, 200);
    let source = [
        "reporter=\"source\"",
        "source_workload=\"a\"",
        "source_workload_namespace=\"test\"",
        "source_principal=\"spiffe://cluster.local/ns/test/sa/a\"",
        "destination_principal=\"spiffe://cluster.local/ns/test/sa/b\"",
        "connection_security_policy=\"mutual_tls\"",
        "response_flags=\"-\"",
    ];
    assert_eq!(
        sample(&text, "istio_tcp_connections_opened_total", &source),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &source),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "istio_tcp_sent_bytes_total", &source),
        Some(8192.0)
    );
    assert_eq!(
        sample(&text, "istio_tcp_received_bytes_total", &source),
        Some(8192.0)
    );
    // ztunnel's whole label set: canonical service and revision, cluster
    // and locality of each end (unknown where nothing says).
    let ztunnel_labels = [
        "reporter=\"source\"",
        "source_canonical_service=\"unknown\"",
        "source_cluster=\"Kubernetes\"",
        "source_region=\"unknown\"",
        "destination_canonical_revision=\"unknown\"",
        "destination_cluster=\"Kubernetes\"",
        "destination_zone=\"unknown\"",
    ];
    assert_eq!(
        sample(&text, "istio_tcp_connections_opened_total", &ztunnel_labels),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_tcp_sockets_open", &source),
        Some(0.0),
        "both closed: {text}"
    );
    assert_eq!(
        sample(
            &text,
            "istio_build",
            &["component=\"ztunnel\"", "tag=\"weir-"]
        ),
        Some(1.0),
        "{text}"
    );
    // The peer's workload name comes from the mesh state, on both sides.
    assert!(
        sample(
            &text,
            "istio_tcp_connections_opened_total",
            &["reporter=\"source\"", "destination_workload=\"b\""]
        )
        .is_some(),
        "{text}"
    );
    let destination = [
        "reporter=\"destination\"",
        "destination_workload=\"b\"",
        "source_workload=\"a\"",
        "source_principal=\"spiffe://cluster.local/ns/test/sa/a\"",
    ];
    assert_eq!(
        sample(&text, "istio_tcp_connections_opened_total", &destination),
        Some(2.0),
        "{text}"
    );

    assert_eq!(
        sample(
            &text,
            "weir_ebpf_events_total",
            &["counter=\"connect_captured\""]
        ),
        Some(2.0),
        "{text}"
    );
    // Meshed traffic between enrolled pods: the agent's own connects (its
    // delivery sockets into b) are counted apart; no application connect
    // was bypassed.
    assert_eq!(
        sample(
            &text,
            "weir_ebpf_events_total",
            &["counter=\"connect_bypassed\""]
        ),
        Some(0.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "weir_ebpf_events_total",
            &["counter=\"connect_agent\""]
        )
        .is_some_and(|value| value >= 2.0),
        "{text}"
    );
    // Every eBPF counter as the pinned per-CPU map holds it (summed over
    // CPUs, as `bpftool map dump` shows it), read after the scrape with no
    // traffic in between.
    for (name, value) in node.counters()? {
        let label = format!("counter=\"{name}\"");
        assert_eq!(
            sample(&text, "weir_ebpf_events_total", &[&label]).unwrap_or(0.0),
            value as f64,
            "{name}: {text}"
        );
    }
    assert_eq!(sample(&text, "weir_enrolled_pods", &[]), Some(2.0));
    let expiry = sample(
        &text,
        "weir_certificate_expiry_seconds",
        &["identity=\"spiffe://cluster.local/ns/test/sa/a\""],
    )
    .expect("certificate expiry");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as f64;
    assert!(expiry > now, "expiry {expiry} is not in the future");
    // No raw addresses or ports as label values.
    assert!(
        !text.contains(&a.ip_of(family).to_string()) && !text.contains(":8080"),
        "{text}"
    );
    Ok(())
}

fn scrape(node: &TestNode) -> anyhow::Result<String> {
    let (status, text) = node.http_get(15020, "/metrics")?;
    anyhow::ensure!(status == 200, "/metrics answered {status}: {text}");
    Ok(text)
}

/// Polls `/metrics` until `name{labels}` has the value `want`.
fn wait_for_sample(
    node: &TestNode,
    name: &str,
    labels: &[&str],
    want: f64,
) -> anyhow::Result<String> {
    wait_for(
        &format!("{name}{labels:?} = {want}"),
        Duration::from_secs(10),
        || {
            let text = scrape(node).ok()?;
            (sample(&text, name, labels) == Some(want)).then_some(text)
        },
    )
    .map_err(|error| {
        let text = scrape(node).unwrap_or_default();
        anyhow::anyhow!(
            "{error}; metrics:\n{text}\nagent log:\n{}",
            node.agent_log()
        )
    })
}

/// A workload on no pod of this node, with `addresses` as given.
fn remote_workload(name: &str, addresses: Vec<Vec<u8>>) -> Vec<u8> {
    workload::Address {
        r#type: Some(workload::address::Type::Workload(workload::Workload {
            uid: format!("Kubernetes//Pod/test/{name}"),
            name: name.into(),
            namespace: "test".into(),
            addresses,
            tunnel_protocol: workload::TunnelProtocol::Hbone as i32,
            service_account: name.into(),
            ..Default::default()
        })),
    }
    .encode_to_vec()
}

/// What istiod says of a workload fills ztunnel's labels: its workload
/// (Deployment) name, canonical service and revision (also `app` and
/// `version`), cluster and locality.
#[test]
fn a_control_plane_workload_fills_ztunnels_labels() -> anyhow::Result<()> {
    let mut node1 = TestNode::with_index(1)?;
    let mut node2 = TestNode::with_index(2)?;
    weir_tests::connect_nodes(&node1, &node2)?;
    let a = node1.add_pod("a")?;
    let b = node2.add_pod("b")?;
    let _server = Server::start(&b, 8080, "echo")?;
    let ca_dir = node1.dir.join("ca");
    TestNode::ca_init(&ca_dir)?;
    let xds = XdsServer::start(&node1.netns_path(), &node1.dir.join("xds"))?;
    let mut address =
        workload::Address::decode(&*remote_workload("b", vec![b.ip.octets().to_vec()]))?;
    if let Some(workload::address::Type::Workload(w)) = address.r#type.as_mut() {
        w.workload_name = "b-deploy".into();
        w.canonical_name = "b-app".into();
        w.canonical_revision = "v7".into();
        w.cluster_id = "east".into();
        w.locality = Some(workload::Locality {
            region: "r1".into(),
            zone: "z1".into(),
            subzone: String::new(),
        });
    }
    xds.push(
        ADDRESS_TYPE,
        "Kubernetes//Pod/test/b",
        address.encode_to_vec(),
    );
    node1.start_agent(&AgentOptions {
        ca_dir: Some(ca_dir.clone()),
        xds: Some(xds.endpoint.clone()),
        ..AgentOptions::enroll(&["a"])
    })?;
    node2.start_agent(&AgentOptions {
        ca_dir: Some(ca_dir),
        remote: vec![weir_tests::RemoteWorkload::of(&a)],
        ..AgentOptions::enroll(&["b"])
    })?;
    node1.wait_ready()?;
    assert!(podtool::send(&a, &format!("{}:8080", b.ip), 512)?.intact);
    let labels = [
        "reporter=\"source\"",
        "destination_workload=\"b-deploy\"",
        "destination_canonical_service=\"b-app\"",
        "destination_canonical_revision=\"v7\"",
        "destination_app=\"b-app\"",
        "destination_version=\"v7\"",
        "destination_cluster=\"east\"",
        "destination_region=\"r1\"",
        "destination_zone=\"z1\"",
        "destination_principal=\"spiffe://cluster.local/ns/test/sa/b\"",
    ];
    wait_for_sample(&node1, "istio_tcp_connections_closed_total", &labels, 1.0)?;
    Ok(())
}

/// The HBONE `baggage` header, in ztunnel's keys: an agent that does not
/// have the client in its state labels it with what the client said of
/// itself (its workload, cluster and canonical service), and with the
/// identity it proved.
#[test]
fn a_client_the_destination_does_not_know_is_labelled_from_its_baggage() -> anyhow::Result<()> {
    let mut node1 = TestNode::with_index(1)?;
    let mut node2 = TestNode::with_index(2)?;
    weir_tests::connect_nodes(&node1, &node2)?;
    let a = node1.add_pod("a")?;
    let b = node2.add_pod("b")?;
    let _server = Server::start(&b, 8080, "echo")?;
    let ca_dir = node1.dir.join("ca");
    TestNode::ca_init(&ca_dir)?;
    node1.start_agent(&AgentOptions {
        ca_dir: Some(ca_dir.clone()),
        remote: vec![weir_tests::RemoteWorkload::of(&b)],
        labels: vec![("a".into(), "{app: shop, version: v3}".into())],
        ..AgentOptions::enroll(&["a"])
    })?;
    // Node 2 knows nothing of a.
    node2.start_agent(&AgentOptions {
        ca_dir: Some(ca_dir),
        ..AgentOptions::enroll(&["b"])
    })?;
    assert!(podtool::send(&a, &format!("{}:8080", b.ip), 512)?.intact);
    let labels = [
        "reporter=\"destination\"",
        "source_workload=\"a\"",
        "source_canonical_service=\"shop\"",
        "source_canonical_revision=\"v3\"",
        "source_app=\"shop\"",
        "source_cluster=\"Kubernetes\"",
        "source_workload_namespace=\"test\"",
        "source_principal=\"spiffe://cluster.local/ns/test/sa/a\"",
        "destination_workload=\"b\"",
    ];
    wait_for_sample(&node2, "istio_tcp_connections_closed_total", &labels, 1.0)?;
    Ok(())
}

fn type_label(type_url: &str) -> String {
    format!("type_url=\"{type_url}\"")
}

/// Accepted pushes count as updates of their type and stamp its last
/// update; a rejected resource is one NACK; a control plane that goes away
/// leaves the client disconnected and reconnecting.
fn xds_metrics_follow_the_stream(sotw: bool) -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    node.add_pod("a")?;
    let mut xds = XdsServer::start(&node.netns_path(), &node.dir.join("xds"))?;
    xds.push(
        ADDRESS_TYPE,
        "Kubernetes//Pod/test/r1",
        remote_workload("r1", vec![vec![10, 77, node.index, 200]]),
    );
    node.start_agent(&AgentOptions {
        xds: Some(xds.endpoint.clone()),
        xds_sotw: sotw,
        ..AgentOptions::enroll(&["a"])
    })?;
    let address = type_label(ADDRESS_TYPE);
    let authorization = type_label(AUTHORIZATION_TYPE);
    // One response per type on subscription, both ACKed.
    wait_for_sample(&node, "weir_xds_updates_total", &[&authorization], 1.0)?;
    let text = wait_for_sample(&node, "weir_xds_updates_total", &[&address], 1.0)?;
    assert_eq!(
        sample(&text, "weir_xds_connected", &[]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "weir_xds_reconnects_total", &[]), Some(0.0));
    for labels in [&address, &authorization] {
        assert_eq!(
            sample(&text, "weir_xds_nacks_total", &[labels]),
            Some(0.0),
            "{text}"
        );
    }
    let first_update =
        sample(&text, "weir_xds_last_update_timestamp_seconds", &[&address]).expect("last update");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    assert!(
        first_update > 0.0 && first_update <= now,
        "last update {first_update}, now {now}"
    );

    // An accepted push: one more update of its type, none of the other.
    std::thread::sleep(Duration::from_millis(20));
    xds.push(
        ADDRESS_TYPE,
        "Kubernetes//Pod/test/r2",
        remote_workload("r2", vec![vec![10, 77, node.index, 201]]),
    );
    let text = wait_for_sample(&node, "weir_xds_updates_total", &[&address], 2.0)?;
    assert_eq!(
        sample(&text, "weir_xds_updates_total", &[&authorization]),
        Some(1.0)
    );
    let second_update =
        sample(&text, "weir_xds_last_update_timestamp_seconds", &[&address]).expect("last update");
    assert!(
        second_update > first_update,
        "{second_update} after {first_update}"
    );

    // A malformed resource (a 3-byte address): exactly one NACK, no update.
    xds.push(
        ADDRESS_TYPE,
        "Kubernetes//Pod/test/r3",
        remote_workload("r3", vec![vec![10, 77, node.index]]),
    );
    wait_for_sample(&node, "weir_xds_nacks_total", &[&address], 1.0)?;
    std::thread::sleep(Duration::from_millis(500));
    let text = scrape(&node)?;
    assert_eq!(
        sample(&text, "weir_xds_nacks_total", &[&address]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "weir_xds_nacks_total", &[&authorization]),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "weir_xds_updates_total", &[&address]),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "weir_xds_last_update_timestamp_seconds", &[&address]),
        Some(second_update),
        "a NACK is not an update"
    );
    // No type URL other than the two subscribed ones, no resource names.
    assert!(!text.contains("Kubernetes//Pod"), "{text}");

    // The control plane goes away: disconnected, and retrying.
    xds.stop();
    wait_for_sample(&node, "weir_xds_connected", &[], 0.0)?;
    wait_for("a reconnect attempt", Duration::from_secs(10), || {
        let text = scrape(&node).ok()?;
        (sample(&text, "weir_xds_reconnects_total", &[])? >= 1.0).then_some(())
    })?;
    Ok(())
}

#[test]
fn xds_metrics_follow_a_delta_stream() -> anyhow::Result<()> {
    xds_metrics_follow_the_stream(false)
}

#[test]
fn xds_metrics_follow_a_state_of_the_world_stream() -> anyhow::Result<()> {
    xds_metrics_follow_the_stream(true)
}

/// Certificate requests to the built-in CA are timed, and the pinned maps
/// report their fill against their capacity.
#[test]
fn ca_latency_and_bpf_map_fill_are_reported() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    for name in ["a", "b", "c"] {
        node.add_pod(name)?;
    }
    node.start_agent(&AgentOptions::enroll(&["a", "b", "c"]))?;
    // One CSR per identity, fetched when its pod enrolls.
    let ok = ["ca=\"builtin\"", "outcome=\"ok\""];
    let text = wait_for_sample(&node, "weir_ca_request_duration_seconds_count", &ok, 3.0)?;
    let sum = sample(&text, "weir_ca_request_duration_seconds_sum", &ok).expect("sum");
    assert!(sum > 0.0 && sum < 30.0, "{sum}");
    assert_eq!(
        sample(
            &text,
            "weir_ca_request_duration_seconds_bucket",
            &[ok[0], ok[1], "le=\"+Inf\""]
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "weir_ca_request_duration_seconds_count",
            &["outcome=\"error\""]
        ),
        None,
        "{text}"
    );
    assert_eq!(sample(&text, "weir_ca_request_failures_total", &[]), None);

    let enrolled = format!("map=\"{}\"", map_name::ENROLLED_PODS);
    let text = wait_for_sample(&node, "weir_bpf_map_entries", &[&enrolled], 3.0)?;
    assert_eq!(node.enrolled_pods()?.len(), 3);
    // Capacity as bpftool reports it.
    let pinned = node.pin_dir().join("maps").join(map_name::ENROLLED_PODS);
    let show = weir_tests::node::run(
        "bpftool",
        &["-j", "map", "show", "pinned", &pinned.to_string_lossy()],
    )?;
    let show: serde_json::Value = serde_json::from_str(&show)?;
    let max_entries = show["max_entries"].as_f64().expect("max_entries");
    assert_eq!(max_entries, 1024.0);
    assert_eq!(
        sample(&text, "weir_bpf_map_capacity", &[&enrolled]),
        Some(max_entries),
        "{text}"
    );
    // Every pinned map has a capacity; entries never exceed it.
    for entry in std::fs::read_dir(node.pin_dir().join("maps"))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let label = format!("map=\"{name}\"");
        let capacity = sample(&text, "weir_bpf_map_capacity", &[&label]);
        assert!(capacity.is_some_and(|c| c > 0.0), "{name}: {text}");
        if let Some(entries) = sample(&text, "weir_bpf_map_entries", &[&label]) {
            assert!(entries <= capacity.unwrap_or_default(), "{name}: {text}");
        }
    }

    // One pod fewer: one entry fewer.
    node.reconfigure_agent(&AgentOptions::enroll(&["a", "b"]))?;
    wait_for_sample(&node, "weir_bpf_map_entries", &[&enrolled], 2.0)?;
    Ok(())
}

#[test]
fn access_logs_are_sampled_per_pod_while_metrics_count_everything() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _server = Server::start(&b, 8080, "echo")?;
    node.start_agent(&AgentOptions {
        extra_config:
            "access_log:\n  sample_rate: 0.5\n  overrides:\n    - {pod: test/b, enabled: false}\n"
                .into(),
        ..AgentOptions::enroll(&["a", "b"])
    })?;
    for _ in 0..4 {
        assert!(podtool::send(&a, &format!("{}:8080", b.ip), 512)?.intact);
    }
    // Metrics are never sampled: all four connections, on both sides.
    wait_for(
        "four closed connections on both sides",
        Duration::from_secs(10),
        || {
            let (_, text) = node.http_get(15020, "/metrics").ok()?;
            let closed = |reporter: &str| {
                sample(
                    &text,
                    "istio_tcp_connections_closed_total",
                    &[&format!("reporter=\"{reporter}\"")],
                )
            };
            (closed("source")? == 4.0 && closed("destination")? == 4.0).then_some(())
        },
    )?;
    // Half of a's connections are logged, none of b's. A record's metrics
    // are counted just before its line is written: wait for the lines.
    let logged_a = wait_for("two access-log lines of a", Duration::from_secs(5), || {
        let lines = node.log_lines(&["connection", "pod=test/a"]);
        (lines.len() >= 2).then_some(lines)
    })?;
    assert_eq!(logged_a.len(), 2, "{logged_a:#?}");
    assert!(logged_a[0].contains("bytes_sent=512") && logged_a[0].contains("orig_dst="));
    assert!(node.log_lines(&["connection", "pod=test/b"]).is_empty());
    Ok(())
}

/// A `podtool` process killed when dropped (the test may fail first).
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Istio's TCP metrics are honest about a connection that is still open:
/// opened (on both sides) as it opens, its bytes so far, not closed; the
/// active connections gauge counts both of its records.
#[test]
fn a_live_connection_shows_as_opened_with_the_bytes_it_carried() -> anyhow::Result<()> {
    use std::io::BufRead as _;
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _server = Server::start(&b, 8080, "echo")?;
    node.start_agent(&AgentOptions::enroll(&["a", "b"]))?;
    // One connection, a 1-byte exchange, then held open.
    let mut command =
        a.podtool()?
            .args(["hold", "--to", &format!("{}:8080", b.ip), "--count", "1"]);
    command.command.stdout(std::process::Stdio::piped());
    let mut hold = Running(command.spawn()?);
    let stdout = hold
        .0
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("hold's stdout"))?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    assert!(line.contains("\"held\":1"), "{line}");

    let source = [
        "reporter=\"source\"",
        "source_workload=\"a\"",
        "destination_workload=\"b\"",
    ];
    let destination = [
        "reporter=\"destination\"",
        "source_workload=\"a\"",
        "destination_workload=\"b\"",
    ];
    let text = scrape(&node)?;
    for labels in [&source, &destination] {
        assert_eq!(
            sample(&text, "istio_tcp_connections_opened_total", labels),
            Some(1.0),
            "{labels:?}: {text}"
        );
        assert_eq!(
            sample(&text, "istio_tcp_connections_closed_total", labels),
            None,
            "{text}"
        );
        assert_eq!(
            sample(&text, "istio_tcp_sent_bytes_total", labels),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "istio_tcp_received_bytes_total", labels),
            Some(1.0),
            "{text}"
        );
    }
    assert_eq!(sample(&text, "weir_active_connections", &[]), Some(2.0));

    drop(hold);
    wait_for_sample(&node, "istio_tcp_connections_closed_total", &source, 1.0)?;
    wait_for_sample(&node, "weir_active_connections", &[], 0.0)?;
    Ok(())
}

/// A `key=value` field of a log line, as a number.
fn field(line: &str, key: &str) -> Option<u64> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// A pod whose policies look at HTTP has its inbound connections parsed
/// request by request; their records still carry the bytes each way, the
/// same the client's side counted.
#[test]
fn an_inbound_http_connection_reports_its_bytes() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _server = weir_tests::http::HttpServer::start(&b, 8080, "b")?;
    node.start_agent(&AgentOptions {
        policies: vec!["{name: reads, namespace: test, action: ALLOW, groups: [{rules: [{matches: [{methods: [GET]}]}]}]}".into()],
        ..AgentOptions::enroll(&["a", "b"])
    })?;
    let lines = weir_tests::http::get(&a, &["--url", &format!("http://{}:8080/x", b.ip)])?;
    assert_eq!(lines[0]["status"], 200, "{lines:?}");
    let record = |direction: &str| {
        let needles = [format!("direction=\"{direction}\""), "end=".to_string()];
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        wait_for(
            &format!("the {direction} record"),
            Duration::from_secs(5),
            || node.log_lines(&needles).into_iter().next(),
        )
    };
    let inbound = record("inbound")?;
    let outbound = record("outbound")?;
    let bytes = |line: &str| (field(line, "bytes_sent"), field(line, "bytes_received"));
    let (sent, received) = bytes(&inbound);
    assert!(
        sent.is_some_and(|n| n > 0) && received.is_some_and(|n| n > 0),
        "{inbound}"
    );
    assert_eq!(bytes(&outbound), (sent, received), "{outbound}\n{inbound}");
    let text = scrape(&node)?;
    let destination = ["reporter=\"destination\"", "destination_workload=\"b\""];
    assert_eq!(
        sample(&text, "istio_tcp_sent_bytes_total", &destination),
        sent.map(|n| n as f64),
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_tcp_received_bytes_total", &destination),
        received.map(|n| n as f64),
        "{text}"
    );
    Ok(())
}

/// A connection that ends in an error (the client resets it) keeps the
/// bytes it carried, in its record and in Istio's byte counters.
#[test]
fn a_connection_reset_mid_transfer_reports_the_bytes_that_flowed() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _server = Server::start(&b, 8080, "echo")?;
    node.start_agent(&AgentOptions::enroll(&["a", "b"]))?;
    let output = a
        .podtool()?
        .args([
            "reset",
            "--to",
            &format!("{}:8080", b.ip),
            "--bytes",
            "5000",
        ])
        .output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    node.wait_for_log("end=\"error\"", 2, Duration::from_secs(5))?;
    for direction in ["outbound", "inbound"] {
        let lines = node.log_lines(&[&format!("direction=\"{direction}\""), "end=\"error\""]);
        assert_eq!(lines.len(), 1, "{}", node.agent_log());
        assert_eq!(field(&lines[0], "bytes_sent"), Some(5000), "{}", lines[0]);
        assert_eq!(
            field(&lines[0], "bytes_received"),
            Some(5000),
            "{}",
            lines[0]
        );
    }
    let text = scrape(&node)?;
    let source = [
        "reporter=\"source\"",
        "source_workload=\"a\"",
        "destination_workload=\"b\"",
    ];
    assert_eq!(
        sample(&text, "istio_tcp_sent_bytes_total", &source),
        Some(5000.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_tcp_received_bytes_total", &source),
        Some(5000.0),
        "{text}"
    );
    // ztunnel's flag for a connection that ended in an error.
    let failed = [&source[..], &["response_flags=\"CONNECT\""]].concat();
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &failed),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_tcp_connections_failed_total", &failed),
        Some(1.0),
        "{text}"
    );
    Ok(())
}
