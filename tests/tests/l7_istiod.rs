//! The Envoy fields istiod sets, each shown end to end through the node
//! proxy (client in pod a → the agent's L7 proxy → httptool servers in b1
//! "v1" and b2 "v2"), over web.test's IPv4 and IPv6 VIPs: attempt counts,
//! gRPC deadlines and stream durations, `cluster_not_found_response_code`,
//! `regex_rewrite`, EDS subsets (from the file and over ADS), the upstream
//! protocol per cluster, h2c upgrades, no timeout where Istio sets none, a
//! waypoint's HBONE hop, the pool's keepalive, idle timeout and maximum
//! connection age, TLS origination (a DestinationRule's SIMPLE and
//! MUTUAL), each weighted destination's host rewrite, locality weights,
//! local-origin failures counted apart, and retries that leave a failed
//! priority.
use std::time::Duration;

use prost::Message as _;
use serde_json::{Value, json};
use weir_tests::{
    http::HttpServer,
    l7::{
        H1_VIP, H1_VIP6, Mesh, VIP, VIP6, backend, by_backend, header, mesh_with_routing, status,
    },
    wait_for,
};

/// `http://<vip><path>`, bracketing IPv6.
fn url(vip: &str, path: &str) -> String {
    if vip.contains(':') {
        format!("http://[{vip}]{path}")
    } else {
        format!("http://{vip}{path}")
    }
}

/// One request from pod a; its response line.
fn get(mesh: &Mesh, vip: &str, path: &str, extra: &[&str]) -> anyhow::Result<Value> {
    let url = url(vip, path);
    let mut args = vec!["--url", url.as_str()];
    args.extend_from_slice(extra);
    mesh.get(&args)?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no response line for {path}"))
}

/// `count` requests from pod a, with `extra` arguments: the summary line.
fn summary_of(
    mesh: &Mesh,
    vip: &str,
    path: &str,
    count: u32,
    extra: &[&str],
) -> anyhow::Result<Value> {
    let url = url(vip, path);
    let count = count.to_string();
    let mut args = vec!["--url", url.as_str(), "--count", count.as_str()];
    args.extend_from_slice(extra);
    let lines = mesh.get(&args)?;
    lines
        .last()
        .map(|line| line["summary"].clone())
        .ok_or_else(|| anyhow::anyhow!("no summary for {path}"))
}

/// The requests `server` saw whose query has `key=<key>`.
fn with_key(server: &HttpServer, key: &str) -> Vec<Value> {
    let wanted = format!("key={key}");
    server
        .requests()
        .into_iter()
        .filter(|request| {
            request["query"]
                .as_str()
                .is_some_and(|query| query.split('&').any(|pair| pair == wanted))
        })
        .collect()
}

fn plain_mesh(routes: Vec<Value>, virtual_host: Value) -> anyhow::Result<Mesh> {
    mesh_with_routing(routes, |_| vec![], virtual_host, |_| json!({}), false)
}

fn plain_mesh_with_clusters(
    routes: Vec<Value>,
    clusters: impl FnOnce(&weir_tests::TestNode) -> Vec<Value>,
) -> anyhow::Result<Mesh> {
    mesh_with_routing(routes, clusters, json!({}), |_| json!({}), false)
}

/// `include_request_attempt_count` sends each try's number upstream;
/// `include_attempt_count_in_response` tells the client how many there were.
#[test]
fn attempt_counts_go_upstream_and_back_to_the_client() -> anyhow::Result<()> {
    let mesh = plain_mesh(
        vec![
            json!({"match": {"prefix": "/"}, "route": {"cluster": "v1", "retry_policy": {
            "retry_on": "retriable-status-codes", "retriable_status_codes": [503],
            "num_retries": 2, "retry_back_off": {"base_interval": "0.01s"}}}}),
        ],
        json!({"include_request_attempt_count": true, "include_attempt_count_in_response": true}),
    )?;
    for vip in [VIP, VIP6] {
        let key = format!("attempts-{}", vip.len());
        let line = get(&mesh, vip, &format!("/?fail_first=1&key={key}"), &[])?;
        assert_eq!(status(&line), 200, "{vip}: {line}");
        assert_eq!(header(&line, "x-envoy-attempt-count"), "2", "{vip}: {line}");
        let seen = with_key(&mesh.v1, &key);
        let counts: Vec<&str> = seen
            .iter()
            .map(|request| {
                request["headers"]["x-envoy-attempt-count"]
                    .as_str()
                    .unwrap_or("")
            })
            .collect();
        assert_eq!(counts, ["1", "2"], "{vip}: {seen:?}");
    }
    Ok(())
}

/// istiod's `max_grpc_timeout: 0s` (with `timeout: 0s`) makes a gRPC
/// request's own deadline the route timeout; a plain request is not bound
/// by a `grpc-timeout` header. `max_stream_duration` bounds the exchange:
/// 408 `DT` (DEADLINE_EXCEEDED for gRPC).
#[test]
fn grpc_deadlines_and_stream_durations_bound_requests() -> anyhow::Result<()> {
    let mesh = plain_mesh(
        vec![
            json!({"match": {"prefix": "/deadline"}, "route": {"cluster": "v1",
                "timeout": "0s", "max_grpc_timeout": "0s"}}),
            json!({"match": {"prefix": "/stream-limit"}, "route": {"cluster": "v1",
                "max_stream_duration": {"max_stream_duration": "0.3s"}}}),
            json!({"match": {"prefix": "/grpc-stream-limit"}, "route": {"cluster": "v1",
                "max_stream_duration": {"max_stream_duration": "0s", "grpc_timeout_header_max": "0s"}}}),
        ],
        json!({}),
    )?;
    let grpc = [
        "--h2",
        "--header",
        "content-type: application/grpc",
        "--header",
        "grpc-timeout: 300m",
    ];
    let elapsed = |line: &Value| line["elapsed_ms"].as_f64().unwrap_or(f64::MAX);
    for vip in [VIP, VIP6] {
        let line = get(&mesh, vip, "/deadline?delay_ms=3000", &grpc)?;
        assert_eq!(status(&line), 200, "{vip}: {line}");
        assert_eq!(header(&line, "grpc-status"), "4", "{vip}: {line}");
        assert_eq!(
            header(&line, "grpc-message"),
            "upstream request timeout",
            "{vip}: {line}"
        );
        assert!(
            elapsed(&line) < 2500.0,
            "{vip}: bounded by the deadline: {line}"
        );

        // The same header without gRPC's content type: no deadline.
        let line = get(
            &mesh,
            vip,
            "/deadline?delay_ms=1000",
            &["--header", "grpc-timeout: 300m"],
        )?;
        assert_eq!(
            (status(&line), backend(&line)),
            (200, "v1"),
            "{vip}: {line}"
        );

        let line = get(&mesh, vip, "/stream-limit?delay_ms=3000", &[])?;
        assert_eq!(status(&line), 408, "{vip}: {line}");
        assert!(elapsed(&line) < 2500.0, "{vip}: {line}");

        let line = get(&mesh, vip, "/grpc-stream-limit?delay_ms=3000", &grpc)?;
        assert_eq!(
            (
                status(&line),
                header(&line, "grpc-status"),
                header(&line, "grpc-message")
            ),
            (200, "4", "downstream duration timeout"),
            "{vip}: {line}"
        );
        assert!(elapsed(&line) < 2500.0, "{vip}: {line}");
    }
    // Two stream-duration replies per family, counted with Envoy's flag.
    wait_for("DT in the request metrics", Duration::from_secs(5), || {
        let (_, text) = mesh.node.http_get(15020, "/metrics").ok()?;
        let dt: f64 = text
            .lines()
            .filter(|line| {
                line.starts_with("istio_requests_total{") && line.contains("response_flags=\"DT\"")
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        (dt == 4.0).then_some(())
    })?;
    Ok(())
}

/// `cluster_not_found_response_code` (Gateway API routes set it) and
/// `regex_rewrite`.
#[test]
fn missing_clusters_answer_as_configured_and_paths_are_rewritten() -> anyhow::Result<()> {
    let mesh = plain_mesh(
        vec![
            json!({"match": {"prefix": "/gone"}, "route": {"cluster": "nowhere",
                "cluster_not_found_response_code": "NOT_FOUND"}}),
            json!({"match": {"prefix": "/unavailable"}, "route": {"cluster": "nowhere"}}),
            json!({"match": {"safe_regex": {"regex": "/v1/.*"}}, "route": {"cluster": "v1",
                "regex_rewrite": {"pattern": {"regex": "^/v1/(.*)$"}, "substitution": "/api/\\1"}}}),
        ],
        json!({}),
    )?;
    for vip in [VIP, VIP6] {
        assert_eq!(status(&get(&mesh, vip, "/gone", &[])?), 404, "{vip}");
        assert_eq!(status(&get(&mesh, vip, "/unavailable", &[])?), 503, "{vip}");
        let key = format!("rewrite-{}", vip.len());
        let line = get(&mesh, vip, &format!("/v1/items?key={key}"), &[])?;
        assert_eq!(status(&line), 200, "{vip}: {line}");
        let seen = with_key(&mesh.v1, &key);
        assert_eq!(seen.len(), 1, "{vip}: {seen:?}");
        assert_eq!(
            seen[0]["path"], "/api/items",
            "{vip}: the query is kept: {seen:?}"
        );
    }
    Ok(())
}

const SUBSET_V1: &str = "outbound|80|v1|web.test";
const SUBSET_V2: &str = "outbound|80|v2|web.test";

/// A subset cluster as istiod writes it (EDS, `istio.subset` metadata).
fn subset_cluster(name: &str, subset: &str) -> Value {
    json!({"name": name, "type": "EDS",
        "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}, "service_name": name},
        "metadata": {"filter_metadata": {"istio": {"subset": subset,
            "services": [{"host": "web.test", "name": "web", "namespace": "test"}]}}}})
}

/// A `ClusterLoadAssignment` for `cluster` with `addresses` (`ip`, port).
fn assignment(cluster: &str, addresses: &[(String, u16)]) -> Value {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|(ip, port)| {
            json!({"endpoint": {"address": {"socket_address": {
            "address": ip, "port_value": port}}}, "health_status": "HEALTHY",
            "load_balancing_weight": 1})
        })
        .collect();
    json!({"cluster_name": cluster, "endpoints": [{"locality": {}, "lb_endpoints": endpoints}]})
}

/// A subset's traffic goes only to the endpoints EDS gives it, from the
/// file or over ADS; until an assignment arrives there are none (503),
/// never the whole service.
#[test]
fn eds_subsets_reach_only_their_own_endpoints() -> anyhow::Result<()> {
    let mesh = mesh_with_routing(
        vec![
            json!({"match": {"prefix": "/v1"}, "route": {"cluster": SUBSET_V1}}),
            json!({"match": {"prefix": "/v2"}, "route": {"cluster": SUBSET_V2}}),
        ],
        |_| {
            vec![
                subset_cluster(SUBSET_V1, "v1"),
                subset_cluster(SUBSET_V2, "v2"),
            ]
        },
        json!({}),
        // The file gives v1 both of b1's addresses (port 8083: a server
        // for both families, started below); v2 comes over ADS.
        |node| {
            let b1 = node.pod("b1");
            json!({"endpoints": [assignment(SUBSET_V1, &[
                (b1.ip.to_string(), 8083), (b1.ip6.to_string(), 8083)])]})
        },
        true,
    )?;
    let dual = HttpServer::start_with(mesh.node.pod("b1"), "::", 8083, "v1-dual", &[])?;
    for vip in [VIP, VIP6] {
        let summary = &summary_of(&mesh, vip, "/v1", 20, &[])?;
        assert_eq!(by_backend(summary, "v1-dual"), 20, "{vip}: {summary}");
        let line = get(&mesh, vip, "/v2", &[])?;
        assert_eq!(status(&line), 503, "{vip}: no assignment yet: {line}");
    }

    let b2 = mesh.node.pod("b2").ip.to_string();
    let xds = mesh
        .xds
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no control plane"))?;
    let resource: weir_agent::routing::envoy::pb::envoy::config::endpoint::v3::ClusterLoadAssignment =
        weir_agent::routing::schema::from_json(&assignment(SUBSET_V2, &[(b2, 8080)]).to_string())
            .map_err(anyhow::Error::msg)?;
    xds.push(
        weir_agent::xds::ENDPOINT_TYPE,
        SUBSET_V2,
        resource.encode_to_vec(),
    );
    wait_for("v2's assignment over ADS", Duration::from_secs(10), || {
        let line = get(&mesh, VIP, "/v2", &[]).ok()?;
        (status(&line) == 200).then_some(())
    })?;
    for vip in [VIP, VIP6] {
        let summary = &summary_of(&mesh, vip, "/v2", 20, &[])?;
        assert_eq!(by_backend(summary, "v2"), 20, "{vip}: {summary}");
    }
    // Both of the assignment's addresses served v1's subset.
    let peers: std::collections::BTreeSet<bool> = dual
        .requests()
        .iter()
        .filter_map(|request| {
            request["peer"]
                .as_str()
                .map(|peer| peer.contains("::ffff:") || !peer.contains('['))
        })
        .collect();
    assert_eq!(
        peers.len(),
        2,
        "IPv4 and IPv6 endpoints both used: {:?}",
        dual.requests()
    );
    Ok(())
}

/// A port declared `http` gets HTTP/1.1 upstream, as istiod's cluster for
/// it says, whatever the client speaks: an HTTP/2 client reaches an
/// HTTP/1.1-only server. An h2c upgrade is served as HTTP/1.1 without its
/// hop-by-hop headers. And no timeout applies where Istio sets none.
#[test]
fn declared_http_ports_speak_http1_upstream_with_no_default_timeout() -> anyhow::Result<()> {
    let mesh = plain_mesh(
        vec![json!({"match": {"prefix": "/"}, "route": {"cluster": "v1"}})],
        json!({}),
    )?;
    let h1 = HttpServer::start_with(mesh.node.pod("b1"), "::", 8081, "h1", &["--http1-only"])?;
    for vip in [H1_VIP, H1_VIP6] {
        let line = get(&mesh, vip, "/h2-client", &["--h2"])?;
        assert_eq!(
            (status(&line), backend(&line)),
            (200, "h1"),
            "{vip}: {line}"
        );
        assert_eq!(
            line["version"], "HTTP/2.0",
            "{vip}: the client spoke HTTP/2: {line}"
        );

        let line = get(
            &mesh,
            vip,
            "/upgrade",
            &[
                "--header",
                "connection: Upgrade, HTTP2-Settings",
                "--header",
                "upgrade: h2c",
                "--header",
                "http2-settings: AAMAAABkAAQCAAAAAAIAAAAA",
            ],
        )?;
        assert_eq!(
            (status(&line), line["version"].as_str()),
            (200, Some("HTTP/1.1")),
            "{vip}: {line}"
        );
    }
    let seen = h1.requests();
    let h2 = seen
        .iter()
        .filter(|request| request["path"] == "/h2-client")
        .count();
    assert_eq!(h2, 2, "{seen:?}");
    for request in seen.iter().filter(|request| request["path"] == "/upgrade") {
        for name in ["upgrade", "connection", "http2-settings"] {
            assert!(
                request["headers"].get(name).is_none(),
                "{name} stripped: {request}"
            );
        }
    }
    assert_eq!(
        seen.iter()
            .filter(|request| request["path"] == "/upgrade")
            .count(),
        2
    );

    // Envoy's default route timeout is 15 s; istiod's routes, and Weir's
    // for a declared port without a route configuration, set none.
    let line = get(
        &mesh,
        H1_VIP,
        "/slow?delay_ms=16000",
        &["--timeout-ms", "25000"],
    )?;
    assert_eq!((status(&line), backend(&line)), (200, "h1"), "{line}");
    Ok(())
}

/// DestinationRule's `maxRequestsPerConnection` (istiod writes it in the
/// cluster's `HttpProtocolOptions`): a connection serves that many
/// requests, then a new one is opened. The endpoint sees one source port
/// per connection.
#[test]
fn max_requests_per_connection_bounds_each_upstream_connection() -> anyhow::Result<()> {
    let options = |max: u32| {
        json!({"typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "common_http_protocol_options": {"max_requests_per_connection": max,
                    "idle_timeout": "300s"},
                "explicit_http_config": {"http_protocol_options": {}}}}})
    };
    let mesh = plain_mesh_with_clusters(
        vec![
            json!({"match": {"prefix": "/one"}, "route": {"cluster": "one-per-connection"}}),
            json!({"match": {"prefix": "/many"}, "route": {"cluster": "kept-alive"}}),
        ],
        move |node| {
            let b1 = format!("{}:8080", node.pod("b1").ip);
            vec![
                weir_tests::l7::static_cluster(
                    "one-per-connection",
                    std::slice::from_ref(&b1),
                    options(1),
                ),
                weir_tests::l7::static_cluster("kept-alive", &[b1], options(100)),
            ]
        },
    )?;
    let connections = |prefix: &str| -> std::collections::BTreeSet<String> {
        mesh.v1
            .requests()
            .iter()
            .filter(|request| {
                request["path"]
                    .as_str()
                    .is_some_and(|path| path.starts_with(prefix))
            })
            .filter_map(|request| request["peer"].as_str().map(str::to_owned))
            .collect()
    };
    for vip in [VIP, VIP6] {
        for path in ["/one", "/many"] {
            let summary = &summary_of(&mesh, vip, path, 5, &[])?;
            assert_eq!(summary["by_status"]["200"], 5, "{vip}{path}: {summary}");
        }
    }
    let one = connections("/one");
    let many = connections("/many");
    assert_eq!(one.len(), 10, "a connection per request: {one:?}");
    assert!(
        many.len() <= 2,
        "kept alive, one connection per family at most: {many:?}"
    );
    Ok(())
}

/// A VirtualService `corsPolicy`, as istiod writes it (the CORS filter's
/// per-route config): the proxy answers an allowed origin's preflight and
/// decorates its actual responses; other origins get nothing.
#[test]
fn cors_policies_answer_preflights_and_decorate_responses() -> anyhow::Result<()> {
    let mesh = plain_mesh(
        vec![json!({"match": {"prefix": "/"}, "route": {"cluster": "v1"},
            "typed_per_filter_config": {"envoy.filters.http.cors": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
                "allow_origin_string_match": [{"exact": "https://a.example"}],
                "allow_methods": "GET,POST", "allow_headers": "x-custom", "max_age": "600",
                "expose_headers": "x-backend", "allow_credentials": true,
                "filter_enabled": {"default_value": {"numerator": 100}}}}})],
        json!({}),
    )?;
    for vip in [VIP, VIP6] {
        let line = get(
            &mesh,
            vip,
            "/preflight",
            &[
                "--method",
                "OPTIONS",
                "--header",
                "origin: https://a.example",
                "--header",
                "access-control-request-method: POST",
            ],
        )?;
        assert_eq!(
            (status(&line), backend(&line)),
            (200, ""),
            "{vip}: the proxy answers: {line}"
        );
        for (name, value) in [
            ("access-control-allow-origin", "https://a.example"),
            ("access-control-allow-methods", "GET,POST"),
            ("access-control-allow-headers", "x-custom"),
            ("access-control-max-age", "600"),
            ("access-control-allow-credentials", "true"),
        ] {
            assert_eq!(header(&line, name), value, "{vip}: {line}");
        }
        let line = get(
            &mesh,
            vip,
            "/actual",
            &["--header", "origin: https://a.example"],
        )?;
        assert_eq!(
            (status(&line), backend(&line)),
            (200, "v1"),
            "{vip}: {line}"
        );
        assert_eq!(
            header(&line, "access-control-allow-origin"),
            "https://a.example"
        );
        assert_eq!(header(&line, "access-control-expose-headers"), "x-backend");

        let line = get(
            &mesh,
            vip,
            "/actual",
            &["--header", "origin: https://b.example"],
        )?;
        assert_eq!(
            (status(&line), backend(&line)),
            (200, "v1"),
            "{vip}: {line}"
        );
        assert_eq!(
            header(&line, "access-control-allow-origin"),
            "",
            "{vip}: {line}"
        );
        // Another origin's preflight goes on to the endpoint (Envoy's
        // forward_not_matching_preflights default).
        let line = get(
            &mesh,
            vip,
            "/preflight",
            &[
                "--method",
                "OPTIONS",
                "--header",
                "origin: https://b.example",
                "--header",
                "access-control-request-method: POST",
            ],
        )?;
        assert_eq!(backend(&line), "v1", "{vip}: {line}");
    }
    Ok(())
}

/// A consistent-hash cookie with a ttl (DestinationRule `httpCookie`): the
/// proxy makes the cookie up for a client without one, sets it, and the
/// client's later requests with it stay on one endpoint, with a ring hash
/// and with Maglev.
#[test]
fn hash_cookies_with_a_ttl_are_made_up_and_stick() -> anyhow::Result<()> {
    let cookie_route = |prefix: &str, cluster: &str| {
        json!({"match": {"prefix": prefix}, "route": {"cluster": cluster,
            "hash_policy": [{"cookie": {"name": "affinity", "ttl": "60s", "path": "/"}}]}})
    };
    let mesh = plain_mesh_with_clusters(
        vec![
            cookie_route("/ring", "ring"),
            cookie_route("/maglev", "maglev"),
        ],
        |node| {
            let endpoints = [
                format!("{}:8080", node.pod("b1").ip),
                format!("{}:8080", node.pod("b2").ip),
            ];
            vec![
                weir_tests::l7::static_cluster(
                    "ring",
                    &endpoints,
                    json!({"lb_policy": "RING_HASH"}),
                ),
                weir_tests::l7::static_cluster(
                    "maglev",
                    &endpoints,
                    json!({"lb_policy": "MAGLEV"}),
                ),
            ]
        },
    )?;
    for vip in [VIP, VIP6] {
        for path in ["/ring", "/maglev"] {
            let line = get(&mesh, vip, path, &[])?;
            assert_eq!(status(&line), 200, "{vip}{path}: {line}");
            let set = header(&line, "set-cookie").to_owned();
            assert!(
                set.starts_with("affinity=\"") && set.ends_with("\"; Max-Age=60; Path=/; HttpOnly"),
                "{vip}{path}: {set:?}"
            );
            let value = set
                .split(';')
                .next()
                .unwrap_or_default()
                .trim_start_matches("affinity=")
                .to_owned();
            let cookie = format!("cookie: affinity={value}");
            let summary = &summary_of(&mesh, vip, path, 10, &["--header", &cookie])?;
            let sticky = by_backend(summary, "v1") == 10 || by_backend(summary, "v2") == 10;
            assert!(
                sticky,
                "{vip}{path}: one endpoint for the cookie: {summary}"
            );
            // A request that brings the cookie gets no new one.
            let line = get(&mesh, vip, path, &["--header", &cookie])?;
            assert_eq!(header(&line, "set-cookie"), "", "{vip}{path}: {line}");
        }
    }
    Ok(())
}

/// Locality failover as istiod writes it: the assignment puts the local
/// endpoints at priority 0 and the others at 1. All traffic stays at
/// priority 0 while it is healthy; once outlier detection ejects it, the
/// traffic fails over to priority 1.
#[test]
fn priorities_fail_over_when_the_first_level_is_ejected() -> anyhow::Result<()> {
    let mesh = mesh_with_routing(
        vec![json!({"match": {"prefix": "/failover"}, "route": {"cluster": "failover"}})],
        |_| {
            vec![json!({"name": "failover", "type": "EDS",
                "eds_cluster_config": {"eds_config": {"ads": {}}},
                "outlier_detection": {"consecutive_5xx": 1, "interval": "10s",
                    "base_ejection_time": "60s", "max_ejection_percent": 100}})]
        },
        json!({}),
        |node| {
            let endpoint = |ip: String| json!({"endpoint": {"address": {"socket_address": {"address": ip, "port_value": 8080}}}});
            json!({"endpoints": [{"cluster_name": "failover", "endpoints": [
                {"locality": {"zone": "local"}, "priority": 0,
                 "lb_endpoints": [endpoint(node.pod("b1").ip.to_string())]},
                {"locality": {"zone": "remote"}, "priority": 1,
                 "lb_endpoints": [endpoint(node.pod("b2").ip.to_string())]}]}]})
        },
        false,
    )?;
    let spread =
        |vip: &str, key: &str| summary_of(&mesh, vip, &format!("/failover?key={key}"), 10, &[]);
    for vip in [VIP, VIP6] {
        let summary = spread(vip, "healthy")?;
        assert_eq!(
            by_backend(&summary, "v1"),
            10,
            "{vip}: priority 0 only: {summary}"
        );
    }
    // One 5xx from b1 ejects it (consecutive_5xx: 1).
    let line = get(&mesh, VIP, "/failover?fail_first=1&key=boom", &[])?;
    assert_eq!((status(&line), backend(&line)), (503, "v1"), "{line}");
    for vip in [VIP, VIP6] {
        let summary = spread(vip, "failed-over")?;
        assert_eq!(
            by_backend(&summary, "v2"),
            10,
            "{vip}: priority 1 took over: {summary}"
        );
    }
    Ok(())
}

/// Istio's persistent sessions (the stateful session filter, header- and
/// cookie-based): the proxy names the endpoint it chose, a request that
/// brings the name goes there, and a strict session refuses an endpoint
/// that is not in the cluster.
#[test]
fn stateful_sessions_keep_a_client_on_its_endpoint() -> anyhow::Result<()> {
    let session = |state: Value, strict: bool| {
        json!({"envoy.filters.http.stateful_session": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.stateful_session.v3.StatefulSessionPerRoute",
            "stateful_session": {"strict": strict, "session_state": state}}})
    };
    let by_header = json!({"name": "envoy.http.stateful_session.header", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.http.stateful_session.header.v3.HeaderBasedSessionState",
        "name": "x-session"}});
    let by_cookie = json!({"name": "envoy.http.stateful_session.cookie", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.http.stateful_session.cookie.v3.CookieBasedSessionState",
        "cookie": {"name": "session", "path": "/", "ttl": "120s"}}});
    let mesh = plain_mesh_with_clusters(
        vec![
            json!({"match": {"prefix": "/header"}, "route": {"cluster": "both"},
                "typed_per_filter_config": session(by_header.clone(), false)}),
            json!({"match": {"prefix": "/cookie"}, "route": {"cluster": "both"},
                "typed_per_filter_config": session(by_cookie, false)}),
            json!({"match": {"prefix": "/strict"}, "route": {"cluster": "both"},
                "typed_per_filter_config": session(by_header, true)}),
        ],
        |node| {
            let endpoints = [
                format!("{}:8080", node.pod("b1").ip),
                format!("{}:8080", node.pod("b2").ip),
            ];
            vec![weir_tests::l7::static_cluster(
                "both",
                &endpoints,
                json!({}),
            )]
        },
    )?;
    for vip in [VIP, VIP6] {
        // Header-based.
        let first = get(&mesh, vip, "/header", &[])?;
        let named = header(&first, "x-session").to_owned();
        assert!(
            !named.is_empty(),
            "{vip}: the chosen endpoint is named: {first}"
        );
        let sent = format!("x-session: {named}");
        let summary = &summary_of(&mesh, vip, "/header", 10, &["--header", &sent])?;
        assert_eq!(by_backend(summary, backend(&first)), 10, "{vip}: {summary}");
        let again = get(&mesh, vip, "/header", &["--header", &sent])?;
        assert_eq!(
            header(&again, "x-session"),
            "",
            "{vip}: same endpoint, nothing new: {again}"
        );

        // Cookie-based.
        let first = get(&mesh, vip, "/cookie", &[])?;
        let set = header(&first, "set-cookie").to_owned();
        assert!(
            set.starts_with("session=\"") && set.ends_with("\"; Max-Age=120; Path=/; HttpOnly"),
            "{vip}: {set:?}"
        );
        let value = set.split(';').next().unwrap_or_default().to_owned();
        let sent = format!("cookie: {value}");
        let summary = &summary_of(&mesh, vip, "/cookie", 10, &["--header", &sent])?;
        assert_eq!(by_backend(summary, backend(&first)), 10, "{vip}: {summary}");

        // Strict: an endpoint outside the cluster (10.0.0.1:80) is refused.
        let line = get(
            &mesh,
            vip,
            "/strict",
            &["--header", "x-session: MTAuMC4wLjE6ODA="],
        )?;
        assert_eq!((status(&line), backend(&line)), (503, ""), "{vip}: {line}");
    }
    Ok(())
}

/// A Gateway's `httpsRedirect` (istiod: the virtual host's `require_tls:
/// ALL`): a plaintext request gets a 301 to the same URL over https; one
/// that says it came over TLS (`x-forwarded-proto: https`) is routed.
#[test]
fn require_tls_redirects_plaintext_requests_to_https() -> anyhow::Result<()> {
    let mesh = plain_mesh(
        vec![json!({"match": {"prefix": "/"}, "route": {"cluster": "v1"}})],
        json!({"require_tls": "ALL"}),
    )?;
    for vip in [VIP, VIP6] {
        let line = get(&mesh, vip, "/shop?item=1", &[])?;
        let host = if vip.contains(':') {
            format!("[{vip}]")
        } else {
            vip.to_string()
        };
        assert_eq!(status(&line), 301, "{vip}: {line}");
        assert_eq!(
            header(&line, "location"),
            format!("https://{host}/shop?item=1"),
            "{vip}: {line}"
        );
        let line = get(
            &mesh,
            vip,
            "/shop",
            &["--header", "x-forwarded-proto: https"],
        )?;
        assert_eq!(
            (status(&line), backend(&line)),
            (200, "v1"),
            "{vip}: {line}"
        );
    }
    Ok(())
}

/// A ServiceEntry with `resolution: DNS` (istiod: a `STRICT_DNS` cluster
/// whose endpoints are names; `LOGICAL_DNS` for `DNS_ROUND_ROBIN`): the
/// proxy resolves the names and balances over the answers. There is no DNS
/// server here, so the names are numeric; they go through the same
/// resolver call as any name.
#[test]
fn dns_clusters_are_resolved_and_balanced() -> anyhow::Result<()> {
    let mesh = plain_mesh_with_clusters(
        vec![
            json!({"match": {"prefix": "/strict"}, "route": {"cluster": "strict-dns"}}),
            json!({"match": {"prefix": "/logical"}, "route": {"cluster": "logical-dns"}}),
        ],
        |node| {
            let endpoint = |name: String| json!({"endpoint": {"address": {"socket_address": {"address": name, "port_value": 8080}}}});
            vec![
                json!({"name": "strict-dns", "type": "STRICT_DNS", "dns_lookup_family": "V4_ONLY",
                    "dns_refresh_rate": "1s",
                    "load_assignment": {"cluster_name": "strict-dns", "endpoints": [{"lb_endpoints": [
                        endpoint(node.pod("b1").ip.to_string()),
                        endpoint(node.pod("b2").ip.to_string())]}]}}),
                json!({"name": "logical-dns", "type": "LOGICAL_DNS",
                    "load_assignment": {"cluster_name": "logical-dns", "endpoints": [{"lb_endpoints": [
                        endpoint(node.pod("b2").ip.to_string())]}]}}),
            ]
        },
    )?;
    wait_for("the DNS clusters resolved", Duration::from_secs(10), || {
        let strict = get(&mesh, VIP, "/strict", &[]).ok()?;
        let logical = get(&mesh, VIP, "/logical", &[]).ok()?;
        (status(&strict) == 200 && status(&logical) == 200).then_some(())
    })?;
    for vip in [VIP, VIP6] {
        let summary = &summary_of(&mesh, vip, "/strict", 10, &[])?;
        assert_eq!(
            (by_backend(summary, "v1"), by_backend(summary, "v2")),
            (5, 5),
            "{vip}: both names' addresses, round robin: {summary}"
        );
        let summary = &summary_of(&mesh, vip, "/logical", 5, &[])?;
        assert_eq!(by_backend(summary, "v2"), 5, "{vip}: {summary}");
    }
    Ok(())
}

/// An `ORIGINAL_DST` cluster (istiod's passthrough clusters): a request goes
/// to the `ip:port` its `x-envoy-original-dst-host` names, with the
/// cluster's port override; a header that is not an address finds no
/// endpoint.
#[test]
fn original_destination_clusters_follow_the_request() -> anyhow::Result<()> {
    let mesh = plain_mesh_with_clusters(
        vec![
            json!({"match": {"prefix": "/passthrough"}, "route": {"cluster": "passthrough"}}),
            json!({"match": {"prefix": "/override"}, "route": {"cluster": "override"}}),
        ],
        |_| {
            vec![
                json!({"name": "passthrough", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                    "original_dst_lb_config": {"use_http_header": true}}),
                json!({"name": "override", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                    "original_dst_lb_config": {"use_http_header": true, "upstream_port_override": 8080}}),
            ]
        },
    )?;
    let b1 = mesh.node.pod("b1").ip;
    let b2 = mesh.node.pod("b2").ip;
    for vip in [VIP, VIP6] {
        let to_b2 = format!("x-envoy-original-dst-host: {b2}:8080");
        let line = get(&mesh, vip, "/passthrough", &["--header", &to_b2])?;
        assert_eq!(
            (status(&line), backend(&line)),
            (200, "v2"),
            "{vip}: {line}"
        );
        let to_b1 = format!("x-envoy-original-dst-host: {b1}:9999");
        let line = get(&mesh, vip, "/override", &["--header", &to_b1])?;
        assert_eq!(
            (status(&line), backend(&line)),
            (200, "v1"),
            "{vip}: port 8080: {line}"
        );
        let line = get(
            &mesh,
            vip,
            "/passthrough",
            &["--header", "x-envoy-original-dst-host: nowhere"],
        )?;
        assert_eq!((status(&line), backend(&line)), (503, ""), "{vip}: {line}");
    }
    Ok(())
}

/// A waypoint's HBONE hop as istiod writes it (Istio 1.26's `encap` and
/// `connect_originate` clusters, from the corpus): a request goes where its
/// client was going, here web.test's VIP, so to the endpoints of that
/// service port, which the network would not have reached (no proxy here
/// answers on the VIP).
#[test]
fn a_waypoints_hbone_hop_goes_to_the_original_destination() -> anyhow::Result<()> {
    let fixture = |name: &str| -> anyhow::Result<Value> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/istiod")
            .join(name);
        Ok(serde_json::from_str(&std::fs::read_to_string(&path)?)?)
    };
    let encap = fixture("cluster__zirain-waypoint-1.26-cluster__encap.json")?;
    let originate = fixture("cluster__zirain-waypoint-1.26-cluster__connect_originate.json")?;
    let mesh = plain_mesh_with_clusters(
        vec![
            json!({"match": {"prefix": "/encap"}, "route": {"cluster": "encap"}}),
            json!({"match": {"prefix": "/originate"}, "route": {"cluster": "connect_originate"}}),
        ],
        |_| vec![encap, originate],
    )?;
    // The mesh's servers listen on IPv4; the IPv6 VIP's endpoints are the
    // pods' IPv6 addresses.
    let _v6 = [("b1", "v1"), ("b2", "v2")]
        .into_iter()
        .map(|(pod, name)| {
            let pod = mesh.node.pod(pod);
            HttpServer::start_with(pod, &pod.ip6.to_string(), 8080, name, &[])
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for vip in [VIP, VIP6] {
        for path in ["/encap", "/originate"] {
            let summary = summary_of(&mesh, vip, path, 20, &[])?;
            let (v1, v2) = (by_backend(&summary, "v1"), by_backend(&summary, "v2"));
            assert!(v1 > 0 && v2 > 0 && v1 + v2 == 20, "{vip}{path}: {summary}");
        }
    }
    Ok(())
}

/// The pool's connection options on a plain upstream connection (to a pod
/// outside the mesh): `tcp_keepalive` shows on the socket the agent opened
/// in the client pod (the kernel's keepalive timer, counting down from the
/// cluster's 7 s instead of the kernel's 2 h), and `idle_timeout` closes it
/// once idle.
#[test]
fn pool_connections_keep_alive_and_close_when_idle() -> anyhow::Result<()> {
    let mut mesh = plain_mesh_with_clusters(
        vec![json!({"match": {"prefix": "/"}, "route": {"cluster": "outside"}})],
        |_| {
            vec![
                json!({"name": "outside", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                "original_dst_lb_config": {"use_http_header": true},
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                  "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                  "common_http_protocol_options": {"idle_timeout": "1s"},
                  "explicit_http_config": {"http_protocol_options": {}}}},
                "upstream_connection_options": {"tcp_keepalive": {
                  "keepalive_time": 7, "keepalive_interval": 3, "keepalive_probes": 2}}}),
            ]
        },
    )?;
    // Added after the agent started: not a workload it knows.
    let outside = mesh.node.add_pod("outside")?;
    let _servers = [
        HttpServer::start(&outside, 8080, "outside")?,
        HttpServer::start_with(&outside, &outside.ip6.to_string(), 8080, "outside", &[])?,
    ];
    let client = mesh.node.pod("a").netns.clone();
    // The client pod's connections to the outside pod's 8080, with timers.
    let connections = |address: &str| -> anyhow::Result<Vec<String>> {
        let listing = weir_tests::node::run(
            "ss",
            &[
                "-N",
                &client,
                "-Htno",
                "state",
                "established",
                "( dport = :8080 )",
            ],
        )?;
        Ok(listing
            .lines()
            .filter(|line| line.contains(address))
            .map(str::to_owned)
            .collect())
    };
    for (vip, address) in [
        (VIP, outside.ip.to_string()),
        (VIP6, format!("[{}]", outside.ip6)),
    ] {
        let to_outside = format!("x-envoy-original-dst-host: {address}:8080");
        let line = get(&mesh, vip, "/", &["--header", &to_outside])?;
        assert_eq!(
            (status(&line), backend(&line)),
            (200, "outside"),
            "{vip}: {line}"
        );
        let open = connections(&address)?;
        let [connection] = open.as_slice() else {
            anyhow::bail!("{vip}: one pooled connection expected: {open:?}");
        };
        // `timer:(keepalive,6.992ms,0)` (ss's way of writing 6 s 992 ms):
        // armed, and below the 7 s set.
        let seconds = connection
            .split("timer:(keepalive,")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .and_then(ss_seconds)
            .ok_or_else(|| anyhow::anyhow!("{vip}: no keepalive timer: {connection}"))?;
        assert!(seconds <= 7.0, "{vip}: {connection}");
        wait_for(
            "the idle pooled connection closed",
            Duration::from_secs(10),
            || connections(&address).ok().filter(Vec::is_empty),
        )?;
    }
    Ok(())
}

/// A timer as `ss -o` prints it (`2min`, `6sec`, `6.992ms`, `992ms`), in
/// seconds.
fn ss_seconds(timer: &str) -> Option<f64> {
    if timer.contains("min") {
        let minutes: f64 = timer.split("min").next()?.parse().ok()?;
        return Some(minutes * 60.0);
    }
    if let Some(seconds) = timer.strip_suffix("sec") {
        return seconds.parse().ok();
    }
    let milliseconds = timer.strip_suffix("ms")?;
    match milliseconds.split_once('.') {
        Some((seconds, milliseconds)) => {
            Some(seconds.parse::<f64>().ok()? + milliseconds.parse::<f64>().ok()? / 1000.0)
        }
        None => Some(milliseconds.parse::<f64>().ok()? / 1000.0),
    }
}

/// PEM files for TLS origination: a server certificate for
/// `api.example.test` under `trusted.pem`, another root (`untrusted.pem`),
/// and a client certificate under `client-ca.pem`.
fn tls_files(dir: &std::path::Path) -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let root = |name: &str| -> anyhow::Result<Issuer<'static, KeyPair>> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let certificate = params.self_signed(&key)?;
        std::fs::write(dir.join(format!("{name}.pem")), certificate.pem())?;
        Ok(Issuer::new(params, key))
    };
    let leaf = |issuer: &Issuer<'static, KeyPair>, san: &str, name: &str| -> anyhow::Result<()> {
        let key = KeyPair::generate()?;
        let certificate = CertificateParams::new(vec![san.to_string()])?.signed_by(&key, issuer)?;
        std::fs::write(dir.join(format!("{name}.pem")), certificate.pem())?;
        std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem())?;
        Ok(())
    };
    let trusted = root("trusted")?;
    root("untrusted")?;
    let client_ca = root("client-ca")?;
    leaf(&trusted, "api.example.test", "server")?;
    leaf(&client_ca, "client.example.test", "client")?;
    Ok(())
}

/// A DestinationRule's TLS as istiod writes it on a sidecar's cluster
/// (tests/fixtures/istiod-derived/cluster__dr-tls-*): an `ORIGINAL_DST`
/// cluster here, so the test picks the server by header.
fn tls_cluster(name: &str, common_tls_context: Value, sni: &str) -> Value {
    json!({"name": name, "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
        "original_dst_lb_config": {"use_http_header": true},
        "metadata": {"filter_metadata": {"istio": {"alpn_override": "false"}}},
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": common_tls_context,
            "sni": sni}}})
}

/// istio-agent's SDS reference for `name`, as istiod writes it.
fn sds(name: &str) -> Value {
    json!({"name": name, "sds_config": {"api_config_source": {"api_type": "GRPC",
        "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}],
        "set_node_on_first_message_only": true, "transport_api_version": "V3"},
        "resource_api_version": "V3"}})
}

/// A DestinationRule's `tls` (SIMPLE, MUTUAL, insecureSkipVerify) makes the
/// proxy originate TLS to a server outside the mesh: the server sees the
/// SNI and, for MUTUAL, the client certificate; a server whose chain or
/// name does not pass gets no request (503 `UF`).
#[test]
fn destination_rule_tls_is_originated_and_checked() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("weir-tls-origination-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    tls_files(&dir)?;
    let file = |name: &str| dir.join(name).display().to_string();
    let params = json!({"tls_minimum_protocol_version": "TLSv1_2",
        "tls_maximum_protocol_version": "TLSv1_3"});
    let verified = |root: &str, san: &str| {
        json!({"tls_params": params, "combined_validation_context": {
            "default_validation_context": {"match_subject_alt_names": [{"exact": san}]},
            "validation_context_sds_secret_config": sds(&format!("file-root:{}", file(root)))}})
    };
    let mut mutual = verified("trusted.pem", "api.example.test");
    mutual["tls_certificate_sds_secret_configs"] = json!([sds(&format!(
        "file-cert:{}~{}",
        file("client.pem"),
        file("client-key.pem")
    ))]);
    let clusters = vec![
        tls_cluster(
            "simple",
            verified("trusted.pem", "api.example.test"),
            "api.example.test",
        ),
        tls_cluster("mutual", mutual, "api.example.test"),
        tls_cluster(
            "insecure",
            json!({"tls_params": params, "validation_context": {}}),
            "",
        ),
        tls_cluster(
            "wrong-root",
            verified("untrusted.pem", "api.example.test"),
            "api.example.test",
        ),
        tls_cluster(
            "wrong-name",
            verified("trusted.pem", "other.example.test"),
            "api.example.test",
        ),
    ];
    let routes = ["simple", "mutual", "insecure", "wrong-root", "wrong-name"]
        .iter()
        .map(|name| json!({"match": {"prefix": format!("/{name}")}, "route": {"cluster": name}}))
        .collect();
    let mut mesh = plain_mesh_with_clusters(routes, |_| clusters)?;
    let outside = mesh.node.add_pod("tlsserver")?;
    let tls_args = [
        "--tls-cert",
        &file("server.pem"),
        "--tls-key",
        &file("server-key.pem"),
        "--tls-client-ca",
        &file("client-ca.pem"),
    ];
    let servers = [
        HttpServer::start_with(&outside, "0.0.0.0", 8443, "tls", &tls_args)?,
        HttpServer::start_with(&outside, &outside.ip6.to_string(), 8443, "tls", &tls_args)?,
    ];
    for (vip, address, server) in [
        (VIP, outside.ip.to_string(), &servers[0]),
        (VIP6, format!("[{}]", outside.ip6), &servers[1]),
    ] {
        let to_server = format!("x-envoy-original-dst-host: {address}:8443");
        let seen = |path: &str| -> anyhow::Result<Value> {
            let line = get(
                &mesh,
                vip,
                &format!("/{path}?key={path}"),
                &["--header", &to_server],
            )?;
            anyhow::ensure!(
                (status(&line), backend(&line)) == (200, "tls"),
                "{vip} /{path}: {line}"
            );
            with_key(server, path)
                .pop()
                .map(|request| request["tls"].clone())
                .ok_or_else(|| anyhow::anyhow!("{vip} /{path}: the server saw no request"))
        };
        assert_eq!(
            seen("simple")?,
            json!({"sni": "api.example.test", "client_certificate": false}),
            "{vip}"
        );
        assert_eq!(
            seen("mutual")?,
            json!({"sni": "api.example.test", "client_certificate": true}),
            "{vip}"
        );
        // No validation context and no SNI: nothing checked, nothing named.
        assert_eq!(
            seen("insecure")?,
            json!({"sni": null, "client_certificate": false}),
            "{vip}"
        );
        for refused in ["wrong-root", "wrong-name"] {
            let line = get(
                &mesh,
                vip,
                &format!("/{refused}?key={refused}"),
                &["--header", &to_server],
            )?;
            assert_eq!(status(&line), 503, "{vip} /{refused}: {line}");
            assert!(with_key(server, refused).is_empty(), "{vip} /{refused}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// istiod's headers on weighted destinations (a VirtualService's
/// `headers.request.set.host` per destination): each cluster's share of
/// the traffic goes out with that cluster's `Host` and header operations.
#[test]
fn weighted_destinations_rewrite_the_host_each_their_own() -> anyhow::Result<()> {
    let share = |cluster: &str, host: &str| {
        json!({"name": cluster, "weight": 1, "host_rewrite_literal": host,
            "request_headers_to_add": [{"header": {"key": "x-share", "value": cluster},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]})
    };
    let mesh = plain_mesh(
        vec![json!({"match": {"prefix": "/"}, "route": {
            "host_rewrite_literal": "route.example.test",
            "weighted_clusters": {"clusters": [
                share("v1", "blue.example.test"), share("v2", "green.example.test")]}}})],
        json!({}),
    )?;
    for vip in [VIP, VIP6] {
        let key = format!("weighted-host-{}", vip.len());
        let summary = summary_of(&mesh, vip, &format!("/?key={key}"), 20, &[])?;
        assert_eq!(
            by_backend(&summary, "v1") + by_backend(&summary, "v2"),
            20,
            "{vip}: {summary}"
        );
        for (server, host, cluster) in [
            (&mesh.v1, "blue.example.test", "v1"),
            (&mesh.v2, "green.example.test", "v2"),
        ] {
            let seen = with_key(server, &key);
            assert!(!seen.is_empty(), "{vip}: {cluster} got none of 20");
            for request in seen {
                assert_eq!(
                    (
                        request["authority"].as_str(),
                        request["headers"]["x-share"].as_str()
                    ),
                    (Some(host), Some(cluster)),
                    "{vip}: {request}"
                );
            }
        }
    }
    Ok(())
}

/// A DestinationRule's `localityLbSetting.distribute` as istiod writes it:
/// the cluster asks for locality-weighted balancing and EDS weighs each
/// locality; traffic follows the weights (90/10 here). Without
/// `locality_weighted_lb_config`, Envoy ignores locality weights, and so
/// does Weir.
#[test]
fn locality_weights_share_the_traffic_when_the_cluster_asks() -> anyhow::Result<()> {
    const WEIGHTED: &str = "outbound|80|weighted|web.test";
    const PLAIN: &str = "outbound|80|plain|web.test";
    let eds = |name: &str, weighted: bool| {
        let mut cluster = json!({"name": name, "type": "EDS",
            "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"},
                "service_name": name}});
        if weighted {
            cluster["common_lb_config"] = json!({"locality_weighted_lb_config": {}});
        }
        cluster
    };
    let mesh = mesh_with_routing(
        vec![
            json!({"match": {"prefix": "/weighted"}, "route": {"cluster": WEIGHTED}}),
            json!({"match": {"prefix": "/plain"}, "route": {"cluster": PLAIN}}),
        ],
        |_| vec![eds(WEIGHTED, true), eds(PLAIN, false)],
        json!({}),
        |node| {
            let (b1, b2) = (node.pod("b1"), node.pod("b2"));
            let locality = |zone: &str, weight: u32, pod: &weir_tests::node::Pod| {
                let endpoints: Vec<Value> = [pod.ip.to_string(), pod.ip6.to_string()]
                    .iter()
                    .map(|ip| {
                        json!({"endpoint": {"address": {"socket_address": {
                            "address": ip, "port_value": 8083}}},
                        "health_status": "HEALTHY", "load_balancing_weight": 1})
                    })
                    .collect();
                json!({"locality": {"region": "r1", "zone": zone},
                    "load_balancing_weight": weight, "lb_endpoints": endpoints})
            };
            let assignment = |name: &str| {
                json!({"cluster_name": name,
                    "endpoints": [locality("a", 90, b1), locality("b", 10, b2)]})
            };
            json!({"endpoints": [assignment(WEIGHTED), assignment(PLAIN)]})
        },
        false,
    )?;
    let _servers = [
        HttpServer::start_with(mesh.node.pod("b1"), "::", 8083, "zone-a", &[])?,
        HttpServer::start_with(mesh.node.pod("b2"), "::", 8083, "zone-b", &[])?,
    ];
    for vip in [VIP, VIP6] {
        let summary = summary_of(&mesh, vip, "/weighted", 200, &[])?;
        let (a, b) = (
            by_backend(&summary, "zone-a"),
            by_backend(&summary, "zone-b"),
        );
        assert_eq!(a + b, 200, "{vip}: {summary}");
        // 180 expected (σ ≈ 4.2): 150 to 199 is beyond 7σ.
        assert!((150..200).contains(&a), "{vip}: weighted: {summary}");
        let summary = summary_of(&mesh, vip, "/plain", 200, &[])?;
        let a = by_backend(&summary, "zone-a");
        assert!((80..=120).contains(&a), "{vip}: weights ignored: {summary}");
    }
    Ok(())
}

/// A DestinationRule's `splitExternalLocalOriginErrors`: connect failures
/// count only towards `consecutiveLocalOriginFailures`, so an endpoint that
/// refuses connections is ejected by that threshold (1 here) and never by
/// the 5xx one; with the local detector off, the same failures eject
/// nothing, however low the 5xx threshold.
#[test]
fn local_origin_failures_are_counted_apart_when_split() -> anyhow::Result<()> {
    let outlier = |local: u32, enforced: u32| {
        json!({"outlier_detection": {"consecutive_5xx": 1, "interval": "10s",
            "base_ejection_time": "60s", "max_ejection_percent": 50,
            "split_external_local_origin_errors": true,
            "consecutive_local_origin_failure": local,
            "enforcing_consecutive_local_origin_failure": enforced}})
    };
    let mesh = plain_mesh_with_clusters(
        vec![
            json!({"match": {"prefix": "/ejecting4"}, "route": {"cluster": "ejecting4"}}),
            json!({"match": {"prefix": "/ejecting6"}, "route": {"cluster": "ejecting6"}}),
            json!({"match": {"prefix": "/keeping"}, "route": {"cluster": "keeping"}}),
        ],
        |node| {
            let b1 = node.pod("b1");
            // b1's 8083 answers (both families, started below); its port 9
            // refuses connections.
            let v4 = [format!("{}:8083", b1.ip), format!("{}:9", b1.ip)];
            let v6 = [format!("[{}]:8083", b1.ip6), format!("[{}]:9", b1.ip6)];
            vec![
                weir_tests::l7::static_cluster("ejecting4", &v4, outlier(1, 100)),
                weir_tests::l7::static_cluster("ejecting6", &v6, outlier(1, 100)),
                weir_tests::l7::static_cluster("keeping", &v4, outlier(5, 0)),
            ]
        },
    )?;
    let _dual = HttpServer::start_with(mesh.node.pod("b1"), "::", 8083, "v1-dual", &[])?;
    for (vip, path) in [(VIP, "/ejecting4"), (VIP6, "/ejecting6")] {
        let summary = summary_of(&mesh, vip, path, 20, &[])?;
        // Round robin meets the refusing endpoint once, then it is out.
        assert_eq!(summary["by_status"]["503"], 1, "{vip}: {summary}");
        assert_eq!(summary["by_status"]["200"], 19, "{vip}: {summary}");
    }
    let summary = summary_of(&mesh, VIP, "/keeping", 20, &[])?;
    assert_eq!(summary["by_status"]["503"], 10, "never ejected: {summary}");
    Ok(())
}

/// A DestinationRule's `connectionPool.tcp.maxConnectionDuration`
/// (`max_connection_duration`, 2 s here): a pooled upstream connection is
/// reused while young, and once older takes no new request, so a new one
/// opens (without it the idle pool would keep the first for an hour).
#[test]
fn pooled_connections_are_replaced_past_their_maximum_age() -> anyhow::Result<()> {
    let mesh = plain_mesh_with_clusters(
        vec![
            json!({"match": {"prefix": "/v4"}, "route": {"cluster": "aged4"}}),
            json!({"match": {"prefix": "/v6"}, "route": {"cluster": "aged6"}}),
        ],
        |node| {
            let b1 = node.pod("b1");
            let aged = json!({"typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "common_http_protocol_options": {"max_connection_duration": "2s"},
                "explicit_http_config": {"http_protocol_options": {}}}}});
            vec![
                weir_tests::l7::static_cluster("aged4", &[format!("{}:8083", b1.ip)], aged.clone()),
                weir_tests::l7::static_cluster("aged6", &[format!("[{}]:8083", b1.ip6)], aged),
            ]
        },
    )?;
    let server = HttpServer::start_with(mesh.node.pod("b1"), "::", 8083, "v1-dual", &[])?;
    for (vip, path) in [(VIP, "/v4"), (VIP6, "/v6")] {
        let key = format!("aged-{}", path.trim_start_matches('/'));
        let peers = || -> Vec<String> {
            with_key(&server, &key)
                .iter()
                .filter_map(|request| request["peer"].as_str().map(str::to_owned))
                .collect()
        };
        let path = format!("{path}?key={key}");
        for _ in 0..2 {
            let line = get(&mesh, vip, &path, &[])?;
            assert_eq!(status(&line), 200, "{vip}: {line}");
        }
        let first = peers();
        assert!(
            first.len() == 2 && first[0] == first[1],
            "{vip}: two quick requests share the pooled connection: {first:?}"
        );
        wait_for("a new upstream connection", Duration::from_secs(10), || {
            let line = get(&mesh, vip, &path, &[]).ok()?;
            (status(&line) == 200 && peers().iter().any(|peer| *peer != first[0])).then_some(())
        })?;
    }
    Ok(())
}

/// A VirtualService's `retryRemoteLocalities` as istiod writes it
/// (`retry_priority` `previous_priorities`, update frequency 1): a retry
/// leaves out the priority (locality) the failed try went to. Priority 0
/// here refuses connections, and still takes the first try of each request
/// (nothing ejects it); the retry goes to priority 1.
#[test]
fn retries_move_to_another_priority_with_previous_priorities() -> anyhow::Result<()> {
    let eds = |name: &str| {
        json!({"name": name, "type": "EDS",
            "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"},
                "service_name": name}})
    };
    let retry = json!({"retry_on": "connect-failure", "num_retries": 1,
        "retry_back_off": {"base_interval": "0.01s"},
        "retry_priority": {"name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                "update_frequency": 1}}});
    let mesh = mesh_with_routing(
        vec![
            json!({"match": {"prefix": "/v4"}, "route": {"cluster": "remote4", "retry_policy": retry}}),
            json!({"match": {"prefix": "/v6"}, "route": {"cluster": "remote6", "retry_policy": retry}}),
        ],
        |_| vec![eds("remote4"), eds("remote6")],
        json!({}),
        |node| {
            let (b1, b2) = (node.pod("b1"), node.pod("b2"));
            let level = |priority: u32, ip: String, port: u16| {
                json!({"priority": priority, "locality": {"zone": format!("z{priority}")},
                    "lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                        "address": ip, "port_value": port}}}, "health_status": "HEALTHY"}]})
            };
            // b1's port 9 refuses connections; b2's 8083 answers.
            json!({"endpoints": [
                {"cluster_name": "remote4", "endpoints": [
                    level(0, b1.ip.to_string(), 9), level(1, b2.ip.to_string(), 8083)]},
                {"cluster_name": "remote6", "endpoints": [
                    level(0, b1.ip6.to_string(), 9), level(1, b2.ip6.to_string(), 8083)]},
            ]})
        },
        false,
    )?;
    let _server = HttpServer::start_with(mesh.node.pod("b2"), "::", 8083, "remote", &[])?;
    for (vip, path) in [(VIP, "/v4"), (VIP6, "/v6")] {
        let summary = summary_of(&mesh, vip, path, 10, &[])?;
        assert_eq!(by_backend(&summary, "remote"), 10, "{vip}: {summary}");
    }
    Ok(())
}

/// A DestinationRule's `proxyProtocol` as istiod writes it (Envoy's
/// `upstream_proxy_protocol` socket around the cluster's own): each
/// upstream connection starts with a PROXY header, v1 or v2, naming the
/// client pod's address and the address it dialled.
#[test]
fn proxy_protocol_headers_name_the_client_and_what_it_dialled() -> anyhow::Result<()> {
    let proxied = |name: &str, version: &str, endpoint: String| {
        weir_tests::l7::static_cluster(
            name,
            &[endpoint],
            json!({"transport_socket": {"name": "envoy.transport_sockets.upstream_proxy_protocol",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.proxy_protocol.v3.ProxyProtocolUpstreamTransport",
                    "config": {"version": version},
                    "transport_socket": {"name": "envoy.transport_sockets.raw_buffer",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}}}}),
        )
    };
    let mesh = plain_mesh_with_clusters(
        ["v1-4", "v2-4", "v1-6", "v2-6"]
            .iter()
            .map(
                |name| json!({"match": {"prefix": format!("/{name}")}, "route": {"cluster": name}}),
            )
            .collect(),
        |node| {
            let b1 = node.pod("b1");
            let (v4, v6) = (format!("{}:8084", b1.ip), format!("[{}]:8084", b1.ip6));
            vec![
                proxied("v1-4", "V1", v4.clone()),
                proxied("v2-4", "V2", v4),
                proxied("v1-6", "V1", v6.clone()),
                proxied("v2-6", "V2", v6),
            ]
        },
    )?;
    let server = HttpServer::start_with(
        mesh.node.pod("b1"),
        "::",
        8084,
        "proxied",
        &["--proxy-protocol"],
    )?;
    let client = mesh.node.pod("a");
    for (vip, family, client_ip, dialled) in [
        (VIP, "4", client.ip.to_string(), format!("{VIP}:80")),
        (VIP6, "6", client.ip6.to_string(), format!("[{VIP6}]:80")),
    ] {
        for version in [1, 2] {
            let name = format!("v{version}-{family}");
            let line = get(&mesh, vip, &format!("/{name}?key={name}"), &[])?;
            assert_eq!(
                (status(&line), backend(&line)),
                (200, "proxied"),
                "{name}: {line}"
            );
            let seen = with_key(&server, &name);
            let proxy = &seen
                .first()
                .ok_or_else(|| anyhow::anyhow!("{name}: no request"))?["proxy"];
            assert_eq!(proxy["version"], version, "{name}: {proxy}");
            assert_eq!(proxy["destination"], dialled.as_str(), "{name}: {proxy}");
            let source: std::net::SocketAddr = proxy["source"]
                .as_str()
                .and_then(|source| source.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("{name}: {proxy}"))?;
            assert_eq!(source.ip().to_string(), client_ip, "{name}: {proxy}");
        }
    }
    Ok(())
}
