//! Prometheus metrics on :15020 with Istio's names and labels, and the
//! agent's own.
use weir_tests::{AgentOptions, Server, TestNode, podtool};

/// The value of the first sample of `name` whose labels contain all of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| line.starts_with(name) && !line.starts_with('#'))
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

#[test]
fn tcp_metrics_carry_istio_labels_and_the_agent_reports_its_own() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _server = Server::start(&b, 8080, "echo")?;
    node.start_agent(&AgentOptions::enroll(&["a", "b"]))?;
    for _ in 0..2 {
        assert!(podtool::send(&a, &format!("{}:8080", b.ip), 4096)?.intact);
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
    let destination = [
        "reporter=\"destination\"",
        "destination_workload=\"b\"",
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
        !text.contains(&a.ip.to_string()) && !text.contains(":8080"),
        "{text}"
    );
    Ok(())
}
