//! L7 in the node proxy: real HTTP/1.1, HTTP/2 and gRPC clients in pod a
//! call a service (VIP 10.96.7.1:80) backed by pods b1 ("v1") and b2
//! ("v2"); Envoy `RouteConfiguration`/`Cluster` resources from the agent's
//! file decide what happens to each request. Every assertion is something
//! that would differ without the feature: which backend answered, what it
//! saw, the status, a header, the time taken.
use std::time::Duration;

use serde_json::{Value, json};
use weir_tests::{
    AgentOptions, TestNode,
    http::{self, HttpServer},
    l7::{
        GRPC_VIP, NAMED_VIP, VIP, backend, by_backend, header, mesh, mesh_with, mesh_with_xds,
        static_cluster, status,
    },
    metric_sample, podtool, wait_for,
};

#[test]
fn l7_routes_by_path_and_header_and_splits_by_weight() -> anyhow::Result<()> {
    let mesh = mesh(
        vec![
            json!({"match": {"prefix": "/v2/"}, "route": {"cluster": "v2", "prefix_rewrite": "/"}}),
            json!({"match": {"prefix": "/", "headers": [
                {"name": "x-canary", "string_match": {"exact": "yes"}}]},
                "route": {"cluster": "v2"}}),
            json!({"match": {"prefix": "/", "headers": [
                {"name": ":method", "string_match": {"exact": "DELETE"}}]},
                "direct_response": {"status": 405}}),
            json!({"match": {"safe_regex": {"regex": "/items/[0-9]+"}, "query_parameters": [
                {"name": "canary", "string_match": {"exact": "1"}}]},
                "route": {"cluster": "v2"}}),
            json!({"match": {"prefix": "/"}, "route": {"weighted_clusters": {"clusters": [
                {"name": "v1", "weight": 75}, {"name": "v2", "weight": 25}]}}}),
        ],
        |_| vec![],
    )?;
    let line = mesh.get_one("/v2/hello", &[])?;
    assert_eq!(status(&line), 200, "{line}");
    assert_eq!(backend(&line), "v2", "{line}");
    let seen = mesh.v2.wait_requests(1)?;
    assert_eq!(seen[0]["path"], "/hello", "prefix rewritten: {seen:?}");

    let line = mesh.get_one("/anything", &["--header", "x-canary: yes"])?;
    assert_eq!(backend(&line), "v2", "header match: {line}");
    let line = mesh.get_one("/anything", &["--method", "DELETE"])?;
    assert_eq!(status(&line), 405, "method match: {line}");
    // Regex path and query parameter, both required.
    let line = mesh.get_one("/items/42?canary=1", &[])?;
    assert_eq!(backend(&line), "v2", "regex + query match: {line}");
    let summary_of = |path: &str| -> anyhow::Result<Value> {
        let url = mesh.url(path);
        let lines = mesh.get(&["--url", &url, "--count", "20"])?;
        Ok(http::summary(&lines)?.clone())
    };
    // Either one alone falls through to the 75/25 split (20 of 20 on v2
    // would be a 1-in-10^12 chance).
    for path in ["/items/x?canary=1", "/items/42?canary=0"] {
        let summary = summary_of(path)?;
        assert!(by_backend(&summary, "v1") > 0, "{path}: {summary}");
    }

    // 400 requests on one keep-alive connection, each routed on its own.
    let url = mesh.url("/split");
    let lines = mesh.get(&["--url", &url, "--count", "400"])?;
    let summary = http::summary(&lines)?;
    let (v1, v2) = (by_backend(summary, "v1"), by_backend(summary, "v2"));
    assert_eq!(v1 + v2, 400, "{summary}");
    // 75/25: 300 expected for v1 (σ ≈ 8.7); 240..360 is beyond 6σ.
    assert!((240..=360).contains(&v1), "weighted split: {summary}");
    Ok(())
}

#[test]
fn l7_retries_timeouts_and_faults() -> anyhow::Result<()> {
    let mut mesh = mesh(
        vec![
            json!({"match": {"prefix": "/retry"}, "route": {"cluster": "v1", "retry_policy": {
                "retry_on": "5xx", "num_retries": 3,
                "retry_back_off": {"base_interval": "0.01s"}}}}),
            json!({"match": {"prefix": "/slow"}, "route": {"cluster": "v1", "timeout": "0.3s"}}),
            json!({"match": {"prefix": "/per-try"}, "route": {"cluster": "v1", "timeout": "5s",
                "retry_policy": {"retry_on": "5xx", "num_retries": 2, "per_try_timeout": "0.2s",
                    "retry_back_off": {"base_interval": "0.01s"}}}}),
            json!({"match": {"prefix": "/reset"}, "route": {"cluster": "v1", "retry_policy": {
                "retry_on": "reset", "num_retries": 2,
                "retry_back_off": {"base_interval": "0.01s"}}}}),
            json!({"match": {"prefix": "/delayed"}, "route": {"cluster": "v1"},
                "typed_per_filter_config": {"envoy.filters.http.fault": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                    "delay": {"fixed_delay": "0.4s", "percentage": {"numerator": 100}}}}}),
            json!({"match": {"prefix": "/abort"}, "route": {"cluster": "v1"},
                "typed_per_filter_config": {"envoy.filters.http.fault": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                    "abort": {"http_status": 418, "percentage": {"numerator": 100}}}}}),
            json!({"match": {"prefix": "/"}, "route": {"cluster": "v1"}}),
        ],
        |_| vec![],
    )?;
    // Two failures, then success: the client sees only the success.
    let line = mesh.get_one("/retry?fail_first=2&key=r1", &[])?;
    assert_eq!(status(&line), 200, "{line}");
    let tries = mesh
        .v1
        .wait_requests(3)?
        .iter()
        .filter(|request| {
            request["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/retry"))
        })
        .count();
    assert_eq!(tries, 3, "three tries reached v1");
    // One access-log line for the request, written when its body ended.
    mesh.node
        .wait_for_log("key=r1", 1, Duration::from_secs(5))?;
    let logged = mesh.node.log_lines(&["request", "key=r1"]);
    assert_eq!(logged.len(), 1, "{logged:?}");
    for field in [
        "status=200",
        "attempts=3",
        "method=GET",
        "upstream_identity=spiffe://cluster.local/ns/test/sa/b1",
        "start_time=",
        "bytes_sent=",
        "trace_id=",
    ] {
        assert!(logged[0].contains(field), "{field} in {logged:?}");
    }
    // A body too big for the replay copy (64 KiB) is never retried: the
    // first 503 comes through; the same request small is retried.
    let big = "x".repeat(100 * 1024);
    let line = mesh.get_one("/retry?fail_first=1&key=big", &["--data", &big])?;
    assert_eq!(status(&line), 503, "not retried: {line}");
    let line = mesh.get_one("/retry?fail_first=1&key=small", &["--data", "small"])?;
    assert_eq!(status(&line), 200, "retried: {line}");
    // Without a retry policy the 503 comes through.
    let line = mesh.get_one("/plain?fail_first=1&key=p1", &[])?;
    assert_eq!(status(&line), 503, "{line}");
    assert_eq!(backend(&line), "v1", "the backend's own 503: {line}");

    // The route timeout answers 504 long before the backend would.
    let line = mesh.get_one("/slow?delay_ms=5000", &[])?;
    assert_eq!(status(&line), 504, "{line}");
    let elapsed = line["elapsed_ms"].as_f64().unwrap_or(f64::MAX);
    assert!(elapsed < 4000.0, "timed out by the proxy: {line}");

    // Each try is cut at 200 ms and retried; after three, 504.
    let line = mesh.get_one("/per-try?delay_ms=3000&key=pt", &[])?;
    assert_eq!(status(&line), 504, "{line}");
    // A reset (the backend drops the connection) is retried on `reset`.
    let line = mesh.get_one("/reset?close=1", &[])?;
    assert_eq!(status(&line), 503, "{line}");
    let count = |prefix: &str| {
        mesh.v1
            .requests()
            .iter()
            .filter(|request| {
                request["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(prefix))
            })
            .count()
    };
    wait_for("three tries of each", Duration::from_secs(5), || {
        (count("/per-try") == 3 && count("/reset") == 3).then_some(())
    })?;

    let line = mesh.get_one("/delayed", &[])?;
    assert_eq!(status(&line), 200, "{line}");
    assert!(
        line["elapsed_ms"].as_f64().unwrap_or(0.0) >= 400.0,
        "delay injected: {line}"
    );

    let before = mesh.v1.requests().len();
    let line = mesh.get_one("/abort", &[])?;
    assert_eq!(status(&line), 418, "{line}");
    assert_eq!(backend(&line), "", "answered by the proxy: {line}");
    let aborted_seen = mesh.v1.requests()[before..]
        .iter()
        .any(|request| request["path"] == "/abort");
    assert!(
        !aborted_seen,
        "an aborted request never reaches the backend"
    );
    Ok(())
}

#[test]
fn l7_rewrites_headers_redirects_answers_and_mirrors() -> anyhow::Result<()> {
    let mesh = mesh(
        vec![
            json!({"match": {"prefix": "/headers"}, "route": {"cluster": "v1",
                    "host_rewrite_literal": "rewritten.test"},
                "request_headers_to_add": [{"header": {"key": "x-added", "value": "yes"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
                "request_headers_to_remove": ["x-secret"],
                "response_headers_to_add": [{"header": {"key": "x-route", "value": "headers"}}],
                "response_headers_to_remove": ["x-backend"]}),
            json!({"match": {"path": "/old"}, "redirect": {"path_redirect": "/new",
                "response_code": "MOVED_PERMANENTLY"}}),
            json!({"match": {"path": "/hello"}, "direct_response": {"status": 200,
                "body": {"inline_string": "hello from weir"}}}),
            json!({"match": {"prefix": "/mirror"}, "route": {"cluster": "v1",
                "request_mirror_policies": [{"cluster": "v2"}]}}),
        ],
        |_| vec![],
    )?;
    let line = mesh.get_one(
        "/headers",
        &[
            "--header",
            "x-secret: s3cret",
            "--header",
            "x-added: no",
            "--data",
            "abcd",
        ],
    )?;
    assert_eq!(status(&line), 200, "{line}");
    assert_eq!(
        header(&line, "x-route"),
        "headers",
        "response header added: {line}"
    );
    assert_eq!(
        header(&line, "x-backend"),
        "",
        "response header removed: {line}"
    );
    let seen = mesh.v1.wait_requests(1)?;
    let headers = &seen[0]["headers"];
    assert_eq!(headers["x-added"], "yes", "request header set: {seen:?}");
    assert!(
        headers.get("x-secret").is_none(),
        "request header removed: {seen:?}"
    );
    assert_eq!(
        headers["host"], "rewritten.test",
        "host rewritten: {seen:?}"
    );

    let line = mesh.get_one("/old?q=1", &[])?;
    assert_eq!(status(&line), 301, "{line}");
    assert_eq!(
        header(&line, "location"),
        format!("http://{VIP}/new?q=1"),
        "{line}"
    );

    let line = mesh.get_one("/hello", &[])?;
    assert_eq!(status(&line), 200, "{line}");
    assert_eq!(line["body"], "hello from weir", "{line}");

    let line = mesh.get_one("/mirror", &[])?;
    assert_eq!(backend(&line), "v1", "the primary answers: {line}");

    // The size histograms: two requests answered 200 by b1 (/headers with a
    // 4-byte body, /mirror with none); the direct response's 15 bytes.
    let to_b1 = ["destination_workload=\"b1\"", "response_code=\"200\""];
    let text = wait_for("size metrics", Duration::from_secs(5), || {
        let (_, text) = mesh.node.http_get(15020, "/metrics").ok()?;
        (metric_sample(&text, "istio_request_bytes_count{", &to_b1) == Some(2.0)).then_some(text)
    })?;
    assert_eq!(
        metric_sample(&text, "istio_request_bytes_sum{", &to_b1),
        Some(4.0),
        "{text}"
    );
    let direct = [
        "destination_workload=\"unknown\"",
        "response_code=\"200\"",
        "request_protocol=\"http\"",
    ];
    assert_eq!(
        metric_sample(&text, "istio_response_bytes_sum{", &direct),
        Some(15.0),
        "{text}"
    );
    let shadowed = mesh.v2.wait_requests(1)?;
    assert_eq!(shadowed[0]["path"], "/mirror", "{shadowed:?}");
    assert_eq!(
        shadowed[0]["headers"]["host"],
        format!("{VIP}-shadow"),
        "mirrored with a shadow host: {shadowed:?}"
    );
    Ok(())
}

#[test]
fn l7_grpc_and_http2_are_balanced_per_request() -> anyhow::Result<()> {
    let mesh = mesh(
        vec![
            json!({"match": {"prefix": "/weir.test.Echo/", "grpc": {}, "headers": [
                    {"name": "x-fail", "string_match": {"exact": "yes"}}]},
                "route": {"cluster": "outbound|80||web.test"},
                "typed_per_filter_config": {"envoy.filters.http.fault": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                    "abort": {"grpc_status": 14, "percentage": {"numerator": 100}}}}}),
            json!({"match": {"prefix": "/"}, "route": {"cluster": "outbound|80||web.test"}}),
        ],
        |_| vec![],
    )?;
    // One HTTP/2 connection from the client; the proxy spreads its calls.
    let to = format!("{VIP}:80");
    let lines = http::grpc(
        mesh.node.pod("a"),
        &["--to", &to, "--message", "hi", "--count", "20"],
    )?;
    let summary = http::summary(&lines)?;
    assert_eq!(summary["by_code"]["0"], 20, "{summary}");
    assert_eq!(
        by_backend(summary, "v1"),
        10,
        "round robin per call: {summary}"
    );
    assert_eq!(
        by_backend(summary, "v2"),
        10,
        "round robin per call: {summary}"
    );

    let lines = http::grpc(
        mesh.node.pod("a"),
        &["--to", &to, "--message", "hi", "--metadata", "x-fail=yes"],
    )?;
    assert_eq!(lines[0]["code"], 14, "gRPC fault abort: {lines:?}");

    // A failing backend's gRPC status comes through as it is.
    let lines = http::grpc(
        mesh.node.pod("a"),
        &["--to", &to, "--message", "hi", "--fail-code", "7"],
    )?;
    assert_eq!(lines[0]["code"], 7, "{lines:?}");

    // Istio's request metrics, from the client's side: per backend and
    // gRPC status, with a duration histogram.
    let ok_to_b1 = [
        "reporter=\"source\"",
        "source_workload=\"a\"",
        "destination_workload=\"b1\"",
        "destination_principal=\"spiffe://cluster.local/ns/test/sa/b1\"",
        "destination_service=\"web.test\"",
        "request_protocol=\"grpc\"",
        "response_code=\"200\"",
        "grpc_response_status=\"0\"",
    ];
    // Recorded when each response body ends, which can trail the client's
    // last read by a moment.
    let text = wait_for("request metrics", Duration::from_secs(5), || {
        let (_, text) = mesh.node.http_get(15020, "/metrics").ok()?;
        (metric_sample(&text, "istio_requests_total{", &ok_to_b1) == Some(10.0)).then_some(text)
    })?;
    assert_eq!(
        metric_sample(&text, "istio_requests_total{", &ok_to_b1),
        Some(10.0),
        "{text}"
    );
    assert_eq!(
        metric_sample(
            &text,
            "istio_request_duration_milliseconds_count{",
            &ok_to_b1
        ),
        Some(10.0),
        "{text}"
    );
    assert_eq!(
        metric_sample(
            &text,
            "istio_requests_total{",
            &["response_flags=\"FI\"", "grpc_response_status=\"14\""]
        ),
        Some(1.0),
        "the fault abort: {text}"
    );
    assert_eq!(
        metric_sample(
            &text,
            "istio_requests_total{",
            &["grpc_response_status=\"7\""]
        ),
        Some(1.0),
        "the backend's failure, from the trailers: {text}"
    );

    // A port declared gRPC gets per-call balancing with no route
    // configuration at all (as L4 it would pin the one connection to one
    // backend).
    let declared = format!("{GRPC_VIP}:80");
    let lines = http::grpc(
        mesh.node.pod("a"),
        &["--to", &declared, "--message", "hi", "--count", "20"],
    )?;
    let summary = http::summary(&lines)?;
    assert_eq!(by_backend(summary, "v1"), 10, "declared gRPC: {summary}");
    assert_eq!(by_backend(summary, "v2"), 10, "declared gRPC: {summary}");

    let url = mesh.url("/h2");
    let lines = mesh.get(&["--url", &url, "--h2", "--count", "20"])?;
    let summary = http::summary(&lines)?;
    assert_eq!(by_backend(summary, "v1"), 10, "{summary}");
    assert_eq!(by_backend(summary, "v2"), 10, "{summary}");
    let requests = mesh.v1.requests();
    assert!(
        requests
            .iter()
            .all(|request| request["version"] == "HTTP/2.0"),
        "HTTP/2 end to end: {requests:?}"
    );
    Ok(())
}

/// The client addresses (one per upstream connection) `server` saw for
/// paths under `prefix`.
fn peers_of(server: &HttpServer, prefix: &str) -> std::collections::BTreeSet<String> {
    server
        .requests()
        .iter()
        .filter(|request| {
            request["path"]
                .as_str()
                .is_some_and(|p| p.starts_with(prefix))
        })
        .filter_map(|request| request["peer"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn l7_circuit_breaker_and_outlier_detection() -> anyhow::Result<()> {
    let mesh = mesh(
        vec![
            json!({"match": {"prefix": "/limited"}, "route": {"cluster": "limited"}}),
            json!({"match": {"prefix": "/one-connection"}, "route": {"cluster": "one-connection"}}),
            json!({"match": {"prefix": "/queued"}, "route": {"cluster": "queued"}}),
            json!({"match": {"prefix": "/shared-slot"}, "route": {"cluster": "shared-slot",
                "timeout": "3s"}}),
            json!({"match": {"prefix": "/pair"}, "route": {"cluster": "pair"}}),
            json!({"match": {"prefix": "/unreachable"}, "route": {"cluster": "unreachable"}}),
            json!({"match": {"prefix": "/flaky"}, "route": {"cluster": "flaky"}}),
            json!({"match": {"prefix": "/plain-flaky"}, "route": {"cluster": "plain-flaky"}}),
        ],
        |node| {
            let b1 = format!("{}:8080", node.pod("b1").ip);
            // Nothing listens on b2:9999: every connect there fails.
            let dead = format!("{}:9999", node.pod("b2").ip);
            vec![
                static_cluster(
                    "limited",
                    std::slice::from_ref(&b1),
                    json!({"circuit_breakers": {"thresholds": [{"max_requests": 2}]}}),
                ),
                static_cluster(
                    "flaky",
                    &[b1.clone(), dead.clone()],
                    json!({"outlier_detection": {"consecutive_gateway_failure": 2,
                        "consecutive_5xx": 2, "base_ejection_time": "30s",
                        "max_ejection_percent": 50}}),
                ),
                static_cluster("plain-flaky", &[b1.clone(), dead], json!({})),
                static_cluster(
                    "one-connection",
                    std::slice::from_ref(&b1),
                    json!({"circuit_breakers": {"thresholds": [{"max_connections": 1,
                        "max_pending_requests": 1}]}}),
                ),
                // No host has .250 on the pods' bridge: the connect waits
                // for ARP (about 3 s) unless the cluster's timeout cuts it.
                static_cluster(
                    "unreachable",
                    &[format!(
                        "{}.250:8080",
                        node.pod("b1")
                            .ip
                            .to_string()
                            .rsplit_once('.')
                            .map_or("", |(net, _)| net)
                    )],
                    json!({"connect_timeout": "0.3s"}),
                ),
                static_cluster(
                    "shared-slot",
                    &[b1.clone(), format!("{}:8080", node.pod("b2").ip)],
                    json!({"circuit_breakers": {"thresholds": [{"max_connections": 1}]}}),
                ),
                static_cluster(
                    "pair",
                    &[b1.clone(), format!("{}:8080", node.pod("b2").ip)],
                    json!({}),
                ),
                static_cluster(
                    "queued",
                    std::slice::from_ref(&b1),
                    json!({"circuit_breakers": {"thresholds": [{"max_connections": 1}]}}),
                ),
            ]
        },
    )?;

    // 8 concurrent slow requests on HTTP/2, at most 2 allowed in flight.
    let url = mesh.url("/limited?delay_ms=500");
    let lines = mesh.get(&["--url", &url, "--h2", "--count", "8", "--concurrency", "8"])?;
    let overflowed: Vec<&Value> = lines.iter().filter(|line| status(line) == 503).collect();
    let served = lines.iter().filter(|line| status(line) == 200).count();
    assert!(served >= 2, "{lines:?}");
    assert!(!overflowed.is_empty(), "some requests overflow: {lines:?}");
    for line in &overflowed {
        assert_eq!(header(line, "x-weir-overflow"), "max_requests", "{line}");
    }

    // HTTP/1.1 needs a connection per request in flight. With one allowed,
    // requests beyond the first wait for it (Envoy's pending requests)…
    let url = mesh.url("/queued?delay_ms=200&key=queued");
    let lines = mesh.get(&["--url", &url, "--count", "4", "--concurrency", "4"])?;
    assert_eq!(
        http::summary(&lines)?["by_status"]["200"],
        4,
        "all wait their turn: {lines:?}"
    );
    let peers = peers_of(&mesh.v1, "/queued");
    assert_eq!(peers.len(), 1, "one upstream connection, reused: {peers:?}");
    // One connection for two endpoints: the idle connection to one is
    // closed to free the slot for the other (else each switch would wait
    // out the 3 s route timeout).
    let url = mesh.url("/shared-slot");
    let lines = mesh.get(&["--url", &url, "--count", "6"])?;
    let summary = http::summary(&lines)?;
    assert_eq!(summary["by_status"]["200"], 6, "{summary}");
    assert_eq!(
        (by_backend(summary, "v1"), by_backend(summary, "v2")),
        (3, 3),
        "{summary}"
    );
    // Below the limit nothing is closed: alternating requests keep one
    // connection to each endpoint.
    let url = mesh.url("/pair");
    let lines = mesh.get(&["--url", &url, "--count", "6"])?;
    assert_eq!(http::summary(&lines)?["by_status"]["200"], 6, "{lines:?}");
    for server in [&mesh.v1, &mesh.v2] {
        assert_eq!(
            peers_of(server, "/pair").len(),
            1,
            "{:?}",
            server.requests()
        );
    }
    // …and with one allowed to wait, the others overflow on pending. (The
    // pool is warmed first: a request waiting for its connection to open is
    // pending too, so from cold only the first would be served.)
    let warm = mesh.get_one("/one-connection", &[])?;
    assert_eq!(status(&warm), 200, "{warm}");
    let url = mesh.url("/one-connection?delay_ms=1000");
    let lines = mesh.get(&["--url", &url, "--count", "4", "--concurrency", "4"])?;
    let refused: Vec<&Value> = lines.iter().filter(|line| status(line) == 503).collect();
    let served = lines.iter().filter(|line| status(line) == 200).count();
    assert!(served >= 2, "one in flight and one waiting: {lines:?}");
    assert!(!refused.is_empty(), "{lines:?}");
    for line in refused {
        assert_eq!(
            header(line, "x-weir-overflow"),
            "max_pending_requests",
            "{line}"
        );
    }

    // The cluster's connect_timeout answers 503 in Envoy's words.
    let line = mesh.get_one("/unreachable", &[])?;
    assert_eq!(status(&line), 503, "{line}");
    assert!(
        line["body"]
            .as_str()
            .is_some_and(|body| body.contains("reset reason: connection timeout")),
        "{line}"
    );
    let elapsed = line["elapsed_ms"].as_f64().unwrap_or(f64::MAX);
    assert!(elapsed < 2000.0, "cut at 0.3 s, not ARP's 3 s: {line}");

    // Without outlier detection, round robin keeps sending half the
    // requests to the dead endpoint…
    let url = mesh.url("/plain-flaky");
    let lines = mesh.get(&["--url", &url, "--count", "20"])?;
    let summary = http::summary(&lines)?;
    assert_eq!(summary["by_status"]["503"], 10, "{summary}");
    // …with it, the endpoint is ejected after 2 failures in a row.
    let url = mesh.url("/flaky");
    let lines = mesh.get(&["--url", &url, "--count", "20"])?;
    let summary = http::summary(&lines)?;
    assert_eq!(
        summary["by_status"]["503"], 2,
        "ejected after two failures: {summary}"
    );
    assert_eq!(summary["by_status"]["200"], 18, "{summary}");
    Ok(())
}

#[test]
fn l7_passes_other_protocols_and_rejects_malformed_requests() -> anyhow::Result<()> {
    let mesh = mesh(
        vec![
            json!({"match": {"prefix": "/only"}, "route": {"cluster": "v1"}}),
            json!({"match": {"prefix": "/", "headers": [
                {"name": "upgrade", "present_match": true}]}, "route": {"cluster": "v1"}}),
        ],
        |_| vec![],
    )?;
    // A non-HTTP client on a port with routes: relayed as opaque TCP.
    let _echo = podtool::Server::start(mesh.node.pod("b1"), 9000, "echo")?;
    let report = podtool::send(mesh.node.pod("a"), &format!("{VIP}:90"), 64 * 1024)?;
    assert!(report.intact, "{report:?}");

    // No route: 404 from the proxy.
    let line = mesh.get_one("/elsewhere", &[])?;
    assert_eq!(status(&line), 404, "{line}");

    // A malformed header line: 400 and the connection closed.
    let output = mesh
        .node
        .pod("a")
        .podtool()?
        .args([
            "raw",
            "--to",
            &format!("{VIP}:80"),
            "--data",
            "GET /only HTTP/1.1\\r\\nHost: web\\r\\nno colon here\\r\\n\\r\\n",
        ])
        .output()?;
    let raw: Value = serde_json::from_slice(&output.stdout)?;
    assert!(
        raw["status_line"]
            .as_str()
            .is_some_and(|s| s.starts_with("HTTP/1.1 400")),
        "{raw}"
    );
    assert_eq!(raw["closed"], true, "{raw}");

    // Too many header fields: refused (431) and closed.
    let many: String = (0..150).map(|i| format!("x-h{i}: v\\r\\n")).collect();
    let output = mesh
        .node
        .pod("a")
        .podtool()?
        .args([
            "raw",
            "--to",
            &format!("{VIP}:80"),
            "--data",
            &format!("GET /only HTTP/1.1\\r\\nHost: web\\r\\n{many}\\r\\n"),
        ])
        .output()?;
    let raw: Value = serde_json::from_slice(&output.stdout)?;
    assert!(
        raw["status_line"]
            .as_str()
            .is_some_and(|s| s.starts_with("HTTP/1.1 431")),
        "{raw}"
    );
    assert_eq!(raw["closed"], true, "{raw}");

    // A client that never finishes its headers is closed after the 10 s
    // header timeout (not before: the proxy waited for the rest).
    let output = mesh
        .node
        .pod("a")
        .podtool()?
        .args([
            "raw",
            "--to",
            &format!("{VIP}:80"),
            "--data",
            "GET /only HTTP/1.1\\r\\nHost: web\\r\\n",
            "--wait-ms",
            "20000",
        ])
        .output()?;
    let raw: Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(raw["closed"], true, "{raw}");
    let waited = raw["elapsed_ms"].as_u64().unwrap_or(0);
    assert!(
        (9_000..19_000).contains(&waited),
        "closed by the header timeout: {raw}"
    );

    // An Upgrade passes through and the upgraded bytes are relayed.
    let to = format!("{VIP}:80");
    let lines = http::upgrade(mesh.node.pod("a"), &["--to", &to, "--bytes", "65536"])?;
    assert_eq!(lines[0]["status"], 101, "{lines:?}");
    assert_eq!(lines[0]["intact"], true, "{lines:?}");
    Ok(())
}

/// Across nodes: the client's agent routes each request and carries it to
/// the remote pods through HBONE (mTLS), HTTP/2 streams multiplexed over
/// the tunnels; the server sees the client pod's address.
#[test]
fn l7_routes_across_nodes_through_hbone() -> anyhow::Result<()> {
    use weir_tests::{RemoteWorkload, connect_nodes};
    let mut node1 = TestNode::with_index(1)?;
    let mut node2 = TestNode::with_index(2)?;
    connect_nodes(&node1, &node2)?;
    let a = node1.add_pod("a")?;
    let b1 = node2.add_pod("b1")?;
    let v1 = HttpServer::start(&b1, 8080, "v1")?;

    let ca_dir = node1.dir.join("ca");
    TestNode::ca_init(&ca_dir)?;
    let routing = json!({
        "route_configs": [{"name": "web.test", "virtual_hosts": [{"name": "web",
            "domains": ["*"], "routes": [
                {"match": {"prefix": "/v1"}, "route": {"cluster": "v1"}},
            ]}]}],
        "clusters": [static_cluster("v1", &[format!("{}:8080", b1.ip)], json!({}))],
    });

    node1.start_agent(&AgentOptions {
        services: vec![format!(
            "{{namespace: test, hostname: web.test, vips: [{VIP}], ports: [{{service_port: 80, target_port: 8080}}]}}"
        )],
        remote: vec![RemoteWorkload::of(&b1)],
        ca_dir: Some(ca_dir.clone()),
        extra_config: format!("routing: {routing}\n"),
        ..AgentOptions::enroll(&["a"])
    })?;
    node2.start_agent(&AgentOptions {
        ca_dir: Some(ca_dir),
        ..AgentOptions::enroll(&["b1"])
    })?;

    let url = format!("http://{VIP}/v1/x");
    let lines = http::get(
        &a,
        &["--url", &url, "--h2", "--count", "10", "--concurrency", "5"],
    )?;
    let summary = http::summary(&lines)?;
    assert_eq!(summary["by_status"]["200"], 10, "{summary}");
    assert_eq!(by_backend(summary, "v1"), 10, "{summary}");
    let seen = v1.wait_requests(10)?;
    assert!(
        seen.iter().all(|request| request["peer"]
            .as_str()
            .is_some_and(|peer| peer.starts_with(&format!("{}:", a.ip)))),
        "the server sees the client pod: {seen:?}"
    );
    assert!(node1.counter("connect_captured")? >= 1);
    // Ten requests, five at a time, over one HTTP/2 connection to the
    // endpoint inside one HBONE tunnel: one mTLS handshake at node 2.
    node2.wait_for_log("HBONE connection accepted", 1, Duration::from_secs(5))?;
    let handshakes = node2.log_lines(&["HBONE connection accepted"]);
    eprintln!("NODE1 {}", node1.log_lines(&["direction"]).join("\n"));
    assert_eq!(handshakes.len(), 1, "{handshakes:?}");
    assert!(
        handshakes[0].contains("spiffe://cluster.local/ns/test/sa/a"),
        "the client pod's identity: {handshakes:?}"
    );
    Ok(())
}

fn subset_cluster(version: &str) -> Value {
    json!({"name": format!("outbound|80|{version}|web.test"),
        "metadata": {"filter_metadata": {"istio": {"subset_labels": {"version": version}}}}})
}

/// Subsets by workload labels (Istio's DestinationRule subsets as istiod
/// names their clusters): a weighted split between versions, and a header
/// pinning one; the metrics name the versions.
#[test]
fn l7_splits_between_subsets_by_workload_labels() -> anyhow::Result<()> {
    let mesh = mesh(
        vec![
            json!({"match": {"prefix": "/", "headers": [
                {"name": "x-version", "string_match": {"exact": "v2"}}]},
                "route": {"cluster": "outbound|80|v2|web.test"}}),
            json!({"match": {"prefix": "/"}, "route": {"weighted_clusters": {"clusters": [
                {"name": "outbound|80|v1|web.test", "weight": 90},
                {"name": "outbound|80|v2|web.test", "weight": 10}]}}}),
        ],
        |_| vec![subset_cluster("v1"), subset_cluster("v2")],
    )?;
    for _ in 0..3 {
        let line = mesh.get_one("/pinned", &["--header", "x-version: v2"])?;
        assert_eq!(backend(&line), "v2", "{line}");
    }
    let url = mesh.url("/split");
    let lines = mesh.get(&["--url", &url, "--count", "300"])?;
    let summary = http::summary(&lines)?;
    let (v1, v2) = (by_backend(summary, "v1"), by_backend(summary, "v2"));
    assert_eq!(v1 + v2, 300, "{summary}");
    // 90/10: 30 expected on v2 (σ ≈ 5.2); 10..=55 is beyond 3.8σ.
    assert!((10..=55).contains(&v2), "subset split: {summary}");
    let v1_labels = [
        "source_app=\"client\"",
        "source_version=\"v0\"",
        "destination_app=\"web\"",
        "destination_version=\"v1\"",
        "response_code=\"200\"",
    ];
    let text = wait_for("request metrics", Duration::from_secs(5), || {
        let (_, text) = mesh.node.http_get(15020, "/metrics").ok()?;
        (metric_sample(&text, "istio_requests_total{", &v1_labels) == Some(v1 as f64))
            .then_some(text)
    })?;
    assert!(
        metric_sample(
            &text,
            "istio_requests_total{",
            &["destination_version=\"v2\""]
        )
        .is_some(),
        "{text}"
    );
    Ok(())
}

/// `metrics: {requests: false}` stops the request metrics (and
/// `access_log: {enabled: false}` the request lines); the requests are
/// still served and counted in `/stats`.
#[test]
fn l7_request_metrics_and_logs_can_be_turned_off() -> anyhow::Result<()> {
    let mesh = mesh_with(
        vec![json!({"match": {"prefix": "/"}, "route": {"cluster": "v1"}})],
        |_| vec![],
        "metrics: {requests: false}\naccess_log: {enabled: false}\n",
    )?;
    let url = mesh.url("/quiet");
    let lines = mesh.get(&["--url", &url, "--count", "5"])?;
    assert_eq!(http::summary(&lines)?["by_status"]["200"], 5, "{lines:?}");
    let stats = wait_for("five requests in /stats", Duration::from_secs(5), || {
        let (_, text) = mesh.node.http_get(15000, "/stats").ok()?;
        let stats: Value = serde_json::from_str(&text).ok()?;
        (stats["http"]["requests"] == 5).then_some(stats)
    })?;
    let (_, text) = mesh.node.http_get(15020, "/metrics")?;
    assert_eq!(
        metric_sample(&text, "istio_requests_total{", &[]),
        None,
        "{text}"
    );
    assert!(mesh.node.log_lines(&["path=/quiet"]).is_empty(), "{stats}");
    Ok(())
}

/// Least request (power of two choices) against round robin, with one
/// endpoint that accepts connections but never answers (a sink): round
/// robin keeps sending it half the requests, least request sees its
/// requests pile up and sends nearly everything to the endpoint that
/// answers.
#[test]
fn l7_least_request_avoids_a_stuck_endpoint() -> anyhow::Result<()> {
    let mesh = mesh(
        vec![
            json!({"match": {"prefix": "/lr"}, "route": {"cluster": "lr", "timeout": "1s"}}),
            json!({"match": {"prefix": "/rr"}, "route": {"cluster": "rr", "timeout": "1s"}}),
        ],
        |node| {
            let endpoints = [
                format!("{}:8080", node.pod("b1").ip),
                format!("{}:9000", node.pod("b2").ip),
            ];
            vec![
                static_cluster("lr", &endpoints, json!({"lb_policy": "LEAST_REQUEST"})),
                static_cluster("rr", &endpoints, json!({})),
            ]
        },
    )?;
    let _sink = podtool::Server::start(mesh.node.pod("b2"), 9000, "sink")?;
    let run = |path: &str| -> anyhow::Result<Value> {
        let url = mesh.url(path);
        let lines = mesh.get(&["--url", &url, "--h2", "--count", "40", "--concurrency", "4"])?;
        Ok(http::summary(&lines)?.clone())
    };
    let rr = run("/rr")?;
    let lr = run("/lr")?;
    let timeouts = |summary: &Value| summary["by_status"]["504"].as_u64().unwrap_or(0);
    assert!(timeouts(&rr) >= 15, "round robin: half to the sink: {rr}");
    assert!(
        timeouts(&lr) <= 5,
        "least request avoids the sink: {lr} (round robin {rr})"
    );
    assert_eq!(by_backend(&lr, "v1") + timeouts(&lr), 40, "{lr}");
    Ok(())
}

/// Istio's port-name convention declares a port's protocol: `http-web` is
/// routed per request (keep-alive requests spread over both endpoints),
/// `tcp-raw` is relayed as one opaque connection (all to one endpoint).
#[test]
fn l7_port_names_declare_protocols() -> anyhow::Result<()> {
    let mesh = mesh(vec![], |_| vec![])?;
    let run = |port: u16| -> anyhow::Result<Value> {
        let url = format!("http://{NAMED_VIP}:{port}/named");
        let lines = mesh.get(&["--url", &url, "--count", "10"])?;
        Ok(http::summary(&lines)?.clone())
    };
    let http_port = run(80)?;
    assert_eq!(http_port["by_status"]["200"], 10, "{http_port}");
    assert_eq!(
        (by_backend(&http_port, "v1"), by_backend(&http_port, "v2")),
        (5, 5),
        "balanced per request: {http_port}"
    );
    let tcp_port = run(90)?;
    assert_eq!(tcp_port["by_status"]["200"], 10, "{tcp_port}");
    let (v1, v2) = (by_backend(&tcp_port, "v1"), by_backend(&tcp_port, "v2"));
    assert!(
        (v1, v2) == (10, 0) || (v1, v2) == (0, 10),
        "one connection, one endpoint: {tcp_port}"
    );
    Ok(())
}

/// Cluster state belongs to the cluster, not to the mesh snapshot it was
/// resolved from: a control-plane push that changes nothing about a
/// service-backed cluster leaves its ejections and its circuit breaker's
/// counts as they were (the push rebuilds the mesh view around them).
#[test]
fn l7_an_ejection_and_a_breaker_count_survive_an_unrelated_xds_push() -> anyhow::Result<()> {
    let mut mesh = mesh_with_xds(
        vec![
            json!({"match": {"prefix": "/flaky"}, "route": {"cluster": "outbound|90||web.test"}}),
            json!({"match": {"prefix": "/held"}, "route": {"cluster": "outbound|80||web.test"}}),
        ],
        |_| {
            vec![
                // Both endpoints come from the service (Istio's cluster
                // names), so every mesh rebuild hands the proxy new entries.
                json!({"name": "outbound|90||web.test",
                    "outlier_detection": {"consecutive_gateway_failure": 2,
                        "consecutive_5xx": 2, "base_ejection_time": "60s",
                        "max_ejection_percent": 50}}),
                json!({"name": "outbound|80||web.test",
                    "circuit_breakers": {"thresholds": [{"max_requests": 1,
                        "max_pending_requests": 1}]}}),
            ]
        },
    )?;
    // Port 90 goes to 9000: only b1 listens there, so every request sent
    // to b2 fails to connect.
    let _port_90 = HttpServer::start(mesh.node.pod("b1"), 9000, "v1-90")?;
    let flaky = format!("http://{VIP}:90/flaky");
    let lines = mesh.get(&["--url", &flaky, "--count", "20"])?;
    let summary = http::summary(&lines)?;
    assert_eq!(summary["by_status"]["503"], 2, "b2 ejected: {summary}");
    assert_eq!(summary["by_status"]["200"], 18, "{summary}");

    // One request held in flight takes the cluster's one request slot
    // (for longer than the push below can take).
    let held = {
        let url = mesh.url("/held?delay_ms=8000");
        let pod = mesh.node.pod("a").clone();
        std::thread::spawn(move || http::get(&pod, &["--url", &url, "--timeout-ms", "20000"]))
    };
    wait_for("the held request upstream", Duration::from_secs(5), || {
        let seen = |server: &HttpServer| {
            server
                .requests()
                .iter()
                .any(|request| request["path"] == "/held")
        };
        (seen(&mesh.v1) || seen(&mesh.v2)).then_some(())
    })?;

    // A workload that has nothing to do with web.test.
    mesh.push_unrelated_workload("unrelated", [10, 99, 0, 9])?;

    // The breaker still counts the held request…
    let line = mesh.get_one("/held", &[])?;
    assert_eq!(status(&line), 503, "{line}");
    assert_eq!(header(&line, "x-weir-overflow"), "max_requests", "{line}");
    // …and b2 is still out: no request fails on it.
    let lines = mesh.get(&["--url", &flaky, "--count", "10"])?;
    let summary = http::summary(&lines)?;
    assert_eq!(summary["by_status"]["200"], 10, "still ejected: {summary}");

    let held = held
        .join()
        .map_err(|_| anyhow::anyhow!("the held request's thread panicked"))??;
    assert_eq!(held.first().map(status), Some(200), "{held:?}");
    Ok(())
}
