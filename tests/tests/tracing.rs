//! Distributed tracing in the L7 proxy: pod a calls service b.test, whose
//! server (pod b) calls service c.test (pod c) with the trace headers it
//! received, as an instrumented app does. Both hops go through the agent's
//! L7 proxy, which continues the trace, writes its own span as the parent
//! of the next hop (W3C and B3), and exports its spans over OTLP/gRPC to a
//! collector of the test's own.
use std::time::Duration;

use serde_json::{Value, json};
use weir_tests::{
    AgentOptions, TestNode,
    http::{self, HttpServer},
    metric_sample,
    otlp_collector::{CollectedSpan, Collector, SPAN_KIND_CLIENT},
    wait_for,
};

const B_VIP: &str = "10.96.9.1";
const C_VIP: &str = "10.96.9.2";
/// The trace and parent span the caller (pod a) made up.
const T: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const P: &str = "00f067aa0ba902b7";

const TRACE_HEADERS: [&str; 8] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

struct Mesh {
    node: TestNode,
    b: HttpServer,
    c: HttpServer,
}

fn static_cluster(name: &str, address: &str) -> Value {
    let (ip, port) = address.rsplit_once(':').expect("ip:port");
    json!({
        "name": name,
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {
                "address": ip, "port_value": port.parse::<u32>().expect("port")}}}}]}]},
    })
}

fn route_config(service: &str, cluster: &str) -> Value {
    json!({
        "name": service,
        "virtual_hosts": [{"name": cluster, "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}],
    })
}

/// Pods a, b, c; services b.test and c.test (port 80 → 8080) with a route
/// configuration each; the agent's `tracing` section as given.
fn mesh(tracing: impl FnOnce(&TestNode) -> anyhow::Result<String>) -> anyhow::Result<Mesh> {
    let mut node = TestNode::new()?;
    node.add_pod("a")?;
    node.add_pod("b")?;
    node.add_pod("c")?;
    let b = HttpServer::start(node.pod("b"), 8080, "b")?;
    let c = HttpServer::start(node.pod("c"), 8080, "c")?;
    let routing = json!({
        "route_configs": [route_config("b.test", "b"), route_config("c.test", "c")],
        "clusters": [
            static_cluster("b", &format!("{}:8080", node.pod("b").ip)),
            static_cluster("c", &format!("{}:8080", node.pod("c").ip)),
        ],
    });
    let tracing = tracing(&node)?;
    let service = |host: &str, vip: &str| {
        format!(
            "{{namespace: test, hostname: {host}, vips: [{vip}], ports: [{{service_port: 80, target_port: 8080}}]}}"
        )
    };
    node.start_agent(&AgentOptions {
        services: vec![service("b.test", B_VIP), service("c.test", C_VIP)],
        backs: vec![
            ("b".into(), "test/b.test".into()),
            ("c".into(), "test/c.test".into()),
        ],
        extra_config: format!("routing: {routing}\ntracing: {tracing}\n"),
        ..AgentOptions::enroll(&["a", "b", "c"])
    })?;
    Ok(Mesh { node, b, c })
}

impl Mesh {
    /// a → b.test/x → (b forwards) → c.test/y, with `headers`; the
    /// response line.
    fn call_through(&self, headers: &[&str]) -> anyhow::Result<Value> {
        let url = format!("http://{B_VIP}/x?forward=http://{C_VIP}/y");
        let mut args = vec!["--url", url.as_str()];
        for header in headers {
            args.extend_from_slice(&["--header", header]);
        }
        http::get(self.node.pod("a"), &args)?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no response line"))
    }
}

fn status(line: &Value) -> u64 {
    line["status"].as_u64().unwrap_or(0)
}

/// The body's `forwarded` status (b's call to c).
fn forwarded(line: &Value) -> u64 {
    serde_json::from_str::<Value>(line["body"].as_str().unwrap_or_default())
        .ok()
        .and_then(|body| body["forwarded"].as_u64())
        .unwrap_or(0)
}

fn seen_header<'a>(request: &'a Value, name: &str) -> Option<&'a str> {
    request["headers"][name].as_str()
}

/// (trace id, parent id, flags) of a traceparent.
fn traceparent(value: &str) -> (String, String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {value:?}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

fn span_for<'a>(spans: &'a [CollectedSpan], path: &str) -> &'a CollectedSpan {
    spans
        .iter()
        .find(|span| span.attribute("url.path") == Some(path))
        .unwrap_or_else(|| panic!("no span for {path}: {spans:#?}"))
}

#[test]
fn tracing_continues_the_trace_across_two_hops() -> anyhow::Result<()> {
    let mut collector_slot = None;
    let mesh = mesh(|node| {
        let collector = Collector::start(&node.netns_path())?;
        let tracing = format!(
            "{{otlp_endpoint: \"{}\", sampling: 100}}",
            collector.endpoint()
        );
        collector_slot = Some(collector);
        Ok(tracing)
    })?;
    let collector = collector_slot.expect("collector");
    let line = mesh.call_through(&[
        &format!("traceparent: 00-{T}-{P}-01"),
        "tracestate: vendor=opaque",
        "x-request-id: trace-test-1",
    ])?;
    assert_eq!(status(&line), 200, "{line}");
    assert_eq!(forwarded(&line), 200, "b reached c: {line}");

    let spans = collector.wait_spans(2, Duration::from_secs(20))?;
    assert_eq!(spans.len(), 2, "one span per hop: {spans:#?}");
    let (first, second) = (span_for(&spans, "/x"), span_for(&spans, "/y"));
    for span in [first, second] {
        assert_eq!(span.trace_id, T, "the caller's trace: {span:#?}");
        assert_eq!(span.kind, SPAN_KIND_CLIENT, "{span:#?}");
        assert_eq!(span.service_name, "weir", "{span:#?}");
        assert_eq!(span.attribute("http.request.method"), Some("GET"));
        assert_eq!(span.attribute("http.response.status_code"), Some("200"));
    }
    assert_eq!(
        first.parent_span_id, P,
        "hop 1's parent is the caller's span"
    );
    assert_eq!(
        second.parent_span_id, first.span_id,
        "hop 2's parent is hop 1's span (through b's copied headers)"
    );
    assert_eq!(first.attribute("server.address"), Some(B_VIP));
    assert_eq!(first.attribute("upstream_cluster"), Some("b"));
    assert_eq!(
        first.attribute("guid:x-request-id"),
        Some("trace-test-1"),
        "{first:#?}"
    );
    assert_eq!(second.attribute("server.address"), Some(C_VIP));

    // What the servers saw: the proxy's span as the parent, in both formats.
    let at_b = &mesh.b.wait_requests(1)?[0];
    let (trace, parent, flags) = traceparent(seen_header(at_b, "traceparent").unwrap_or(""));
    assert_eq!(
        (trace.as_str(), parent.as_str(), flags.as_str()),
        (T, first.span_id.as_str(), "01")
    );
    assert_eq!(
        seen_header(at_b, "tracestate"),
        Some("vendor=opaque"),
        "{at_b}"
    );
    assert_eq!(
        seen_header(at_b, "x-request-id"),
        Some("trace-test-1"),
        "{at_b}"
    );
    assert_eq!(seen_header(at_b, "x-b3-parentspanid"), Some(P), "{at_b}");
    let at_c = &mesh.c.wait_requests(1)?[0];
    let (trace, parent, _) = traceparent(seen_header(at_c, "traceparent").unwrap_or(""));
    assert_eq!(trace, T, "{at_c}");
    assert_eq!(parent, second.span_id, "c's parent is hop 2's span: {at_c}");
    assert_eq!(seen_header(at_c, "x-b3-traceid"), Some(T), "{at_c}");
    assert_eq!(
        seen_header(at_c, "x-b3-spanid"),
        Some(second.span_id.as_str())
    );
    assert_eq!(
        seen_header(at_c, "x-b3-parentspanid"),
        Some(first.span_id.as_str())
    );
    assert_eq!(seen_header(at_c, "x-b3-sampled"), Some("1"), "{at_c}");

    // The access log carries the trace id (both hops are in trace T).
    let needle = format!("trace_id={T}");
    let logged = wait_for(
        "access-log lines with the trace id",
        Duration::from_secs(5),
        || {
            let lines = mesh.node.log_lines(&["request", &needle]);
            (lines.len() >= 2).then_some(lines)
        },
    )
    .map_err(|error| anyhow::anyhow!("{error}; log:\n{}", mesh.node.agent_log()))?;
    assert!(
        logged.iter().any(|line| line.contains("path=/x")),
        "{logged:#?}"
    );
    Ok(())
}

#[test]
fn tracing_unsampled_requests_export_nothing_and_invent_nothing() -> anyhow::Result<()> {
    let mut collector_slot = None;
    let mesh = mesh(|node| {
        let collector = Collector::start(&node.netns_path())?;
        let tracing = format!(
            "{{otlp_endpoint: \"{}\", sampling: 0}}",
            collector.endpoint()
        );
        collector_slot = Some(collector);
        Ok(tracing)
    })?;
    let collector = collector_slot.expect("collector");

    // No context, 0 %: no span, and no trace header appears anywhere.
    let line = mesh.call_through(&[])?;
    assert_eq!(status(&line), 200, "{line}");
    assert_eq!(forwarded(&line), 200, "{line}");
    let at_b = &mesh.b.wait_requests(1)?[0];
    let at_c = &mesh.c.wait_requests(1)?[0];
    for (who, seen) in [("b", at_b), ("c", at_c)] {
        for name in TRACE_HEADERS {
            assert_eq!(
                seen_header(seen, name),
                None,
                "{name} invented for {who}: {seen}"
            );
        }
    }
    // The caller said "not sampled": its headers pass through unchanged.
    let unsampled = format!("00-{T}-{P}-00");
    let line = mesh.call_through(&[&format!("traceparent: {unsampled}")])?;
    assert_eq!(status(&line), 200, "{line}");
    let at_c = &mesh.c.wait_requests(2)?[1];
    assert_eq!(
        seen_header(at_c, "traceparent"),
        Some(unsampled.as_str()),
        "{at_c}"
    );
    assert_eq!(seen_header(at_c, "x-b3-traceid"), None, "{at_c}");

    // A sampled caller is followed despite the 0 %. Its two spans are queued
    // after anything the requests above could have made, so once they are
    // in, the collector has everything it will get from those.
    let sampled = "11111111111111111111111111111111";
    let line = mesh.call_through(&[&format!("traceparent: 00-{sampled}-{P}-01")])?;
    assert_eq!(status(&line), 200, "{line}");
    let spans = collector.wait_spans(2, Duration::from_secs(20))?;
    assert!(
        spans.iter().all(|span| span.trace_id == sampled),
        "only the sampled request made spans: {spans:#?}"
    );
    assert_eq!(spans.len(), 2, "{spans:#?}");
    Ok(())
}

#[test]
fn tracing_collector_down_drops_and_counts_spans() -> anyhow::Result<()> {
    // Nothing listens on this port in the node's fresh namespace.
    let mesh = mesh(|_| Ok("{otlp_endpoint: \"http://127.0.0.1:4317\", sampling: 100}".into()))?;
    for _ in 0..3 {
        let line = mesh.call_through(&[])?;
        assert_eq!(status(&line), 200, "requests are unaffected: {line}");
        assert_eq!(forwarded(&line), 200, "{line}");
    }
    // Trace headers still go upstream: sampled, with a new trace.
    let at_c = &mesh.c.wait_requests(1)?[0];
    assert!(seen_header(at_c, "traceparent").is_some(), "{at_c}");
    let dropped = wait_for(
        "weir_trace_spans_dropped_total > 0",
        Duration::from_secs(30),
        || {
            let (_, text) = mesh.node.http_get(15020, "/metrics").ok()?;
            metric_sample(&text, "weir_trace_spans_dropped_total", &[])
                .filter(|dropped| *dropped > 0.0)
        },
    )?;
    assert!(dropped <= 6.0, "at most the 6 spans made: {dropped}");
    Ok(())
}
