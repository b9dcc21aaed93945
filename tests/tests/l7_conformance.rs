//! L7 conformance: Envoy route and cluster features checked end to end
//! (client in pod a → the agent's L7 proxy → httptool servers in b1 "v1"
//! and b2 "v2"), each assertion being something that would differ without
//! the feature: retry conditions, fault percentages, random and
//! hash-based balancing, CONNECT tunnels, and a stock client (Debian's
//! curl) over HTTP/1.1 and HTTP/2.
//!
//! Statistical assertions have margins that make a false failure less
//! likely than 1 in 10^6.
use std::time::Duration;

use serde_json::{Value, json};
use weir_tests::{
    http::{self, HttpServer},
    l7::{Mesh, VIP, backend, by_backend, mesh, mesh_with_clients, static_cluster, status},
    wait_for,
};

/// A route to `cluster` for paths under `prefix` with `retry_policy`
/// (a short back-off, so tests stay fast).
fn retry_route(prefix: &str, cluster: &str, mut policy: Value) -> Value {
    policy["retry_back_off"] = json!({"base_interval": "0.01s"});
    json!({"match": {"prefix": prefix}, "route": {"cluster": cluster, "retry_policy": policy}})
}

/// The requests `server` has seen whose query has `key=<key>`.
fn tries(server: &HttpServer, key: &str) -> usize {
    let wanted = format!("key={key}");
    server
        .requests()
        .iter()
        .filter(|request| {
            request["query"]
                .as_str()
                .is_some_and(|query| query.split('&').any(|pair| pair == wanted))
        })
        .count()
}

/// The number of tries of `key` that reached v1 (through `path`, a route
/// to v1), once every line v1 printed before a later marker request has
/// been read: a try that is not there by then was never sent (the proxy
/// answers the client only after its last try).
fn settled_tries(mesh: &Mesh, path: &str, key: &str) -> anyhow::Result<usize> {
    let marker = format!("{key}-marker");
    let line = mesh.get_one(&format!("{path}?key={marker}"), &[])?;
    anyhow::ensure!(status(&line) == 200, "marker request: {line}");
    wait_for(
        &format!("marker {marker} at v1"),
        Duration::from_secs(10),
        || (tries(&mesh.v1, &marker) == 1).then_some(()),
    )?;
    Ok(tries(&mesh.v1, key))
}

/// `retry_on` conditions as Envoy defines them: `gateway-error` is 502,
/// 503 and 504 (not 500); `connect-failure` retries an endpoint that
/// refuses the connection but not an endpoint's 503;
/// `retriable-status-codes` retries exactly the listed codes.
#[test]
fn l7_retry_conditions_follow_envoy() -> anyhow::Result<()> {
    let mesh = mesh(
        vec![
            retry_route(
                "/gateway",
                "v1",
                json!({"retry_on": "gateway-error", "num_retries": 1}),
            ),
            retry_route(
                "/codes",
                "v1",
                json!({"retry_on": "retriable-status-codes", "num_retries": 1,
                    "retriable_status_codes": [409]}),
            ),
            retry_route(
                "/connect-retry",
                "half-dead-retry",
                json!({"retry_on": "connect-failure", "num_retries": 1}),
            ),
            json!({"match": {"prefix": "/connect-plain"}, "route": {"cluster": "half-dead"}}),
            retry_route(
                "/budget",
                "no-budget",
                json!({"retry_on": "5xx", "num_retries": 2}),
            ),
            retry_route(
                "/max-retries",
                "no-retries",
                json!({"retry_on": "5xx", "num_retries": 2}),
            ),
            json!({"match": {"prefix": "/"}, "route": {"cluster": "v1"}}),
        ],
        |node| {
            let live = format!("{}:8080", node.pod("b1").ip);
            // Nothing listens on b2:9999: every connect there is refused.
            let dead = format!("{}:9999", node.pod("b2").ip);
            vec![
                static_cluster("half-dead", &[live.clone(), dead.clone()], json!({})),
                static_cluster("half-dead-retry", &[live.clone(), dead], json!({})),
                // A budget of 0 % with no minimum allows no retry at all…
                static_cluster(
                    "no-budget",
                    std::slice::from_ref(&live),
                    json!({"circuit_breakers": {"thresholds": [{"retry_budget": {
                        "budget_percent": {"value": 0.0}, "min_retry_concurrency": 0}}]}}),
                ),
                // …as does `max_retries: 0`.
                static_cluster(
                    "no-retries",
                    std::slice::from_ref(&live),
                    json!({"circuit_breakers": {"thresholds": [{"max_retries": 0}]}}),
                ),
            ]
        },
    )?;

    // The retry circuit breaker: a budget that allows none, or
    // `max_retries: 0`, passes the first 503 on after one try, where the
    // same policy on v1 retries (below).
    for path in ["/budget", "/max-retries"] {
        let key = format!("limited{}", path.replace('/', "-"));
        let line = mesh.get_one(&format!("{path}?fail_first=1&key={key}"), &[])?;
        assert_eq!(status(&line), 503, "{path}: no retry allowed: {line}");
        assert_eq!(settled_tries(&mesh, "/gateway", &key)?, 1, "{path}");
    }

    // gateway-error: one failure with each gateway status, then success.
    for code in [502, 503, 504] {
        let key = format!("gateway-{code}");
        let line = mesh.get_one(
            &format!("/gateway?fail_first=1&fail_status={code}&key={key}"),
            &[],
        )?;
        assert_eq!(status(&line), 200, "{code} retried: {line}");
        assert_eq!(settled_tries(&mesh, "/gateway", &key)?, 2, "{code}");
    }
    let line = mesh.get_one("/gateway?fail_first=1&fail_status=500&key=gateway-500", &[])?;
    assert_eq!(status(&line), 500, "500 is not a gateway error: {line}");
    assert_eq!(backend(&line), "v1", "the backend's own 500: {line}");
    assert_eq!(settled_tries(&mesh, "/gateway", "gateway-500")?, 1);

    // retriable-status-codes: 409 listed, 404 and 503 not.
    let line = mesh.get_one("/codes?fail_first=1&fail_status=409&key=codes-409", &[])?;
    assert_eq!(status(&line), 200, "409 retried: {line}");
    assert_eq!(settled_tries(&mesh, "/codes", "codes-409")?, 2);
    for code in [404, 503] {
        let key = format!("codes-{code}");
        let line = mesh.get_one(
            &format!("/codes?fail_first=1&fail_status={code}&key={key}"),
            &[],
        )?;
        assert_eq!(status(&line), code, "{code} not listed: {line}");
        assert_eq!(settled_tries(&mesh, "/codes", &key)?, 1, "{code}");
    }

    // connect-failure: round robin over a live and a dead endpoint. Without
    // retries half the requests fail to connect…
    let url = mesh.url("/connect-plain");
    let lines = mesh.get(&["--url", &url, "--count", "20"])?;
    let summary = http::summary(&lines)?;
    let refused = summary["by_status"]["503"].as_u64().unwrap_or(0);
    assert!(refused >= 5, "without retries: {summary}");
    assert_eq!(by_backend(summary, "v1") + refused, 20, "{summary}");
    // …with `connect-failure` each is retried on the live endpoint.
    let url = mesh.url("/connect-retry");
    let lines = mesh.get(&["--url", &url, "--count", "20"])?;
    let summary = http::summary(&lines)?;
    assert_eq!(summary["by_status"]["200"], 20, "retried: {summary}");
    assert_eq!(by_backend(summary, "v1"), 20, "{summary}");
    // An endpoint's own 503 is not a connect failure: one try, the 503
    // passed on (whichever endpoint was picked first).
    let line = mesh.get_one("/connect-retry?fail_first=1&key=connect-503", &[])?;
    assert_eq!(status(&line), 503, "{line}");
    assert_eq!(backend(&line), "v1", "the backend's own 503: {line}");
    assert_eq!(settled_tries(&mesh, "/gateway", "connect-503")?, 1);
    Ok(())
}

fn fault_route(prefix: &str, fault: Value) -> Value {
    let mut config = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
    });
    if let (Some(config), Some(fault)) = (config.as_object_mut(), fault.as_object()) {
        config.extend(fault.clone());
    }
    json!({"match": {"prefix": prefix}, "route": {"cluster": "v1"},
        "typed_per_filter_config": {"envoy.filters.http.fault": config}})
}

/// Faults applied to a percentage of requests: the rest are untouched.
#[test]
fn l7_faults_apply_to_their_percentage() -> anyhow::Result<()> {
    let mesh = mesh(
        vec![
            fault_route(
                "/abort",
                json!({"abort": {"http_status": 418, "percentage": {"numerator": 50}}}),
            ),
            fault_route(
                "/delay",
                json!({"delay": {"fixed_delay": "0.2s", "percentage": {"numerator": 50}}}),
            ),
        ],
        |_| vec![],
    )?;
    let url = mesh.url("/abort");
    let lines = mesh.get(&["--url", &url, "--count", "200"])?;
    let summary = http::summary(&lines)?;
    let aborted = lines
        .iter()
        .filter(|line| status(line) == 418 && backend(line).is_empty())
        .count();
    let served = lines
        .iter()
        .filter(|line| status(line) == 200 && backend(line) == "v1")
        .count();
    assert_eq!(aborted + served, 200, "{summary}");
    // Binomial(200, 1/2): σ ≈ 7.1; 60..=140 is beyond 5.6σ.
    assert!((60..=140).contains(&aborted), "{summary}");
    // Only the requests let through reached the backend.
    let reached = wait_for("the served requests at v1", Duration::from_secs(10), || {
        let reached = mesh.v1.requests().len();
        (reached >= served).then_some(reached)
    })?;
    assert_eq!(reached, served, "{summary}");

    // 24 requests one after another: 2^-23 that all fall on one side.
    let url = mesh.url("/delay");
    let lines = mesh.get(&["--url", &url, "--count", "24"])?;
    let elapsed: Vec<f64> = lines
        .iter()
        .filter(|line| line.get("summary").is_none())
        .map(|line| {
            assert_eq!(status(line), 200, "{line}");
            line["elapsed_ms"].as_f64().unwrap_or(f64::NAN)
        })
        .collect();
    assert_eq!(elapsed.len(), 24, "{lines:?}");
    let slow = elapsed.iter().filter(|&&ms| ms >= 200.0).count();
    let fast = elapsed.iter().filter(|&&ms| ms < 200.0).count();
    assert!(slow > 0 && fast > 0, "delayed some, not all: {elapsed:?}");
    assert_eq!(slow + fast, 24, "{elapsed:?}");
    Ok(())
}

/// The backends of a sequential run's response lines, in order.
fn sequence(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .filter(|line| line.get("summary").is_none())
        .map(|line| backend(line).to_owned())
        .collect()
}

/// `lb_policy: RANDOM` picks per request at random; round robin (the
/// control) alternates exactly.
#[test]
fn l7_random_balancing_is_not_round_robin() -> anyhow::Result<()> {
    let mesh = mesh(
        vec![
            json!({"match": {"prefix": "/random"}, "route": {"cluster": "random"}}),
            json!({"match": {"prefix": "/rr"}, "route": {"cluster": "rr"}}),
        ],
        |node| {
            let endpoints = [
                format!("{}:8080", node.pod("b1").ip),
                format!("{}:8080", node.pod("b2").ip),
            ];
            vec![
                static_cluster("random", &endpoints, json!({"lb_policy": "RANDOM"})),
                static_cluster("rr", &endpoints, json!({"lb_policy": "ROUND_ROBIN"})),
            ]
        },
    )?;
    // 200 requests on one keep-alive connection each.
    let url = mesh.url("/rr");
    let lines = mesh.get(&["--url", &url, "--count", "200"])?;
    let rr = sequence(&lines);
    assert_eq!(rr.len(), 200, "{lines:?}");
    assert!(
        rr.windows(2)
            .all(|pair| pair[0] != pair[1] && !pair[0].is_empty()),
        "round robin alternates: {rr:?}"
    );

    let url = mesh.url("/random");
    let lines = mesh.get(&["--url", &url, "--count", "200"])?;
    let summary = http::summary(&lines)?;
    // Binomial(200, 1/2): σ ≈ 7.1; 40 is 8.5σ below the mean.
    assert!(by_backend(summary, "v1") >= 40, "{summary}");
    assert!(by_backend(summary, "v2") >= 40, "{summary}");
    assert_eq!(
        by_backend(summary, "v1") + by_backend(summary, "v2"),
        200,
        "{summary}"
    );
    let random = sequence(&lines);
    // Strict alternation by chance: 2^-199.
    assert!(
        random.windows(2).any(|pair| pair[0] == pair[1]),
        "random is not round robin: {random:?}"
    );
    Ok(())
}

/// Sends 5 requests with each of `headers` (one key each) to `url`: every
/// key stays on one endpoint, and the keys use both endpoints.
fn assert_keys_stick(mesh: &Mesh, url: &str, headers: &[String]) -> anyhow::Result<()> {
    let mut homes = std::collections::BTreeSet::new();
    for header in headers {
        let lines = mesh.get(&["--url", url, "--count", "5", "--header", header])?;
        let summary = http::summary(&lines)?;
        let (v1, v2) = (by_backend(summary, "v1"), by_backend(summary, "v2"));
        assert!(
            (v1, v2) == (5, 0) || (v1, v2) == (0, 5),
            "{header:?} moved between endpoints: {summary}"
        );
        homes.insert(if v1 == 5 { "v1" } else { "v2" });
    }
    assert_eq!(homes.len(), 2, "{} keys all on one endpoint", headers.len());
    Ok(())
}

/// Ring hash keyed on a header, a cookie and the client's address: each key
/// stays on one endpoint; without a key (the control) requests spread.
#[test]
fn l7_ring_hash_on_header_cookie_and_source_ip() -> anyhow::Result<()> {
    let mesh = mesh_with_clients(
        vec![
            json!({"match": {"prefix": "/header"}, "route": {"cluster": "sticky",
                "hash_policy": [{"header": {"header_name": "x-user"}}]}}),
            json!({"match": {"prefix": "/cookie"}, "route": {"cluster": "sticky",
                "hash_policy": [{"cookie": {"name": "session"}}]}}),
            json!({"match": {"prefix": "/source"}, "route": {"cluster": "sticky",
                "hash_policy": [{"connection_properties": {"source_ip": true}}]}}),
            json!({"match": {"prefix": "/unhashed"}, "route": {"cluster": "sticky"}}),
        ],
        |node| {
            let endpoints = [
                format!("{}:8080", node.pod("b1").ip),
                format!("{}:8080", node.pod("b2").ip),
            ];
            vec![static_cluster(
                "sticky",
                &endpoints,
                json!({"lb_policy": "RING_HASH"}),
            )]
        },
        "",
        &["c"],
    )?;
    // Each user header, and each session cookie (among others), sticks;
    // 32 keys use both endpoints (all on one: 2^-31 for an even ring).
    let users: Vec<String> = (0..32).map(|user| format!("x-user: user-{user}")).collect();
    assert_keys_stick(&mesh, &mesh.url("/header"), &users)?;
    let sessions: Vec<String> = (0..32)
        .map(|session| format!("cookie: theme=dark; session=s-{session}; lang=en"))
        .collect();
    assert_keys_stick(&mesh, &mesh.url("/cookie"), &sessions)?;

    // The source address: 40 requests over 4 connections (4 source ports)
    // from each client pod, each pod on one endpoint.
    let url = mesh.url("/source");
    for pod in ["a", "c"] {
        let lines = http::get(
            mesh.node.pod(pod),
            &["--url", &url, "--count", "40", "--concurrency", "4"],
        )?;
        let summary = http::summary(&lines)?;
        let (v1, v2) = (by_backend(summary, "v1"), by_backend(summary, "v2"));
        assert!(
            (v1, v2) == (40, 0) || (v1, v2) == (0, 40),
            "pod {pod} moved between endpoints: {summary}"
        );
    }
    // The control: no hash policy, a random point on the ring per request
    // (all 40 on one endpoint: 2^-39).
    let url = mesh.url("/unhashed");
    let lines = mesh.get(&["--url", &url, "--count", "40", "--concurrency", "4"])?;
    let summary = http::summary(&lines)?;
    assert!(by_backend(summary, "v1") > 0, "{summary}");
    assert!(by_backend(summary, "v2") > 0, "{summary}");
    Ok(())
}

/// An application's `CONNECT host:port` through a port with routes: the
/// proxy forwards it, in authority form, to the routed endpoint and relays
/// the tunnel both ways once the endpoint answers 200.
#[test]
fn l7_connect_from_an_application_is_tunnelled() -> anyhow::Result<()> {
    let mesh = mesh(
        vec![
            // CONNECT's authority-form target has no path: Envoy's
            // `connect_matcher` catches it, and `prefix: /` does not.
            json!({"match": {"prefix": "/"}, "route": {"cluster": "v1"}}),
            json!({"match": {"connect_matcher": {}}, "route": {"cluster": "v2"}}),
        ],
        |_| vec![],
    )?;
    let connect = |to: &str| {
        http::upgrade(
            mesh.node.pod("a"),
            &[
                "--to",
                to,
                "--connect",
                "tunnel.test:443",
                "--bytes",
                "65536",
            ],
        )
    };
    // The control: straight to b1's server (relayed as plain TCP), the
    // tunnel works and the server sees the authority form (no path).
    let direct = connect(&format!("{}:8080", mesh.node.pod("b1").ip))?;
    assert_eq!(direct[0]["intact"], true, "without the proxy: {direct:?}");
    let seen = mesh.v1.wait_requests(1)?;
    assert_eq!(seen[0]["path"], "", "authority form: {seen:?}");

    let lines = connect(&format!("{VIP}:80"))?;
    assert_eq!(lines[0]["status"], 200, "{lines:?}");
    let seen = mesh.v2.wait_requests(1)?;
    assert_eq!(seen[0]["method"], "CONNECT", "routed to v2: {seen:?}");
    assert_eq!(seen[0]["authority"], "tunnel.test:443", "{seen:?}");
    assert_eq!(
        seen[0]["path"], "",
        "forwarded as `CONNECT tunnel.test:443` (authority form): {seen:?}"
    );
    assert_eq!(mesh.v1.requests().len(), 1, "{:?}", mesh.v1.requests());
    assert_eq!(lines[0]["echoed"], 65536, "the tunnel relayed: {lines:?}");
    assert_eq!(lines[0]["intact"], true, "{lines:?}");

    // An HTTP/2 client's CONNECT stream (prior knowledge) becomes the
    // tunnel the same way; upstream it is an HTTP/1.1 CONNECT.
    let lines = http::upgrade(
        mesh.node.pod("a"),
        &[
            "--to",
            &format!("{VIP}:80"),
            "--connect",
            "tunnel2.test:443",
            "--h2",
            "--bytes",
            "65536",
        ],
    )?;
    assert_eq!(lines[0]["status"], 200, "{lines:?}");
    let seen = mesh.v2.wait_requests(2)?;
    assert_eq!(seen[1]["method"], "CONNECT", "{seen:?}");
    assert_eq!(seen[1]["authority"], "tunnel2.test:443", "{seen:?}");
    assert_eq!(
        lines[0]["echoed"], 65536,
        "the h2 tunnel relayed: {lines:?}"
    );
    assert_eq!(lines[0]["intact"], true, "{lines:?}");
    Ok(())
}

/// What curl printed: the response head and its `-w` line.
struct CurlResult {
    /// The final response's, e.g. `HTTP/1.1 200 OK` or `HTTP/2 200`.
    status_line: String,
    /// Those of interim responses (`HTTP/1.1 100 Continue`).
    interim: Vec<String>,
    /// (lowercase name, value), in order.
    headers: Vec<(String, String)>,
    /// `<http_code> <size_download>` from `-w`.
    written: String,
    /// Seconds from start to end.
    seconds: f64,
}

impl CurlResult {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map_or("", |(_, value)| value.as_str())
    }
}

/// Debian's curl in pod a, the response head on stdout (`-D -`), the body
/// discarded and counted (`-w`).
fn curl(mesh: &Mesh, args: &[&str]) -> anyhow::Result<CurlResult> {
    let output = mesh
        .node
        .pod("a")
        .command("/usr/bin/curl")?
        .args(["-sS", "--noproxy", "*", "--max-time", "10"])
        .args(["-D", "-", "-o", "/dev/null"])
        .args(["-w", "\\n%{http_code} %{size_download} %{time_total}"])
        .args(args)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    anyhow::ensure!(
        output.status.success(),
        "curl {args:?}: {}, stdout {stdout:?}, stderr {:?}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let mut result = CurlResult {
        status_line: String::new(),
        interim: Vec::new(),
        headers: Vec::new(),
        written: String::new(),
        seconds: f64::NAN,
    };
    for line in stdout.lines().map(|line| line.trim_end_matches('\r')) {
        if line.starts_with("HTTP/") {
            // A later response: the one before was interim.
            let previous = std::mem::replace(&mut result.status_line, line.to_owned());
            if !previous.is_empty() {
                result.interim.push(previous);
            }
            result.headers.clear();
        } else if let Some((name, value)) = line.split_once(':') {
            result
                .headers
                .push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        } else if let Some((written, seconds)) = line.rsplit_once(' ') {
            result.written = written.to_owned();
            result.seconds = seconds.parse().unwrap_or(f64::NAN);
        }
    }
    Ok(result)
}

/// A stock client (Debian's curl) over HTTP/1.1 and prior-knowledge
/// HTTP/2 through the L7 path: routed by header, headers added both ways,
/// a 1 MB response body delivered whole.
#[test]
fn l7_interoperates_with_curl() -> anyhow::Result<()> {
    let mesh = mesh(
        vec![
            json!({"match": {"prefix": "/", "headers": [
                    {"name": "x-pick", "string_match": {"exact": "v2"}}]},
                "route": {"cluster": "v2"},
                "request_headers_to_add": [{"header": {"key": "x-added", "value": "by-weir"}}],
                "response_headers_to_add": [{"header": {"key": "x-route", "value": "picked"}}]}),
            json!({"match": {"prefix": "/"}, "route": {"cluster": "v1"}}),
        ],
        |_| vec![],
    )?;
    let url = mesh.url("/curl?body_bytes=1000000");
    let data = "d".repeat(60_000);
    for (version, flags) in [
        ("HTTP/1.1", &["--http1.1"][..]),
        ("HTTP/2", &["--http2-prior-knowledge"][..]),
    ] {
        let before = mesh.v2.requests().len();
        // A 60 000-byte POST; on HTTP/1.1 with `Expect: 100-continue`, for
        // which curl waits up to 5 s for the 100 before sending the body.
        // (Not on HTTP/2: hyper's HTTP/2 server, the proxy's as well as
        // httptool's, never sends a 100, so curl would wait it out.)
        let mut args = flags.to_vec();
        args.extend(["-H", "x-pick: v2", "--data", &data]);
        if version == "HTTP/1.1" {
            args.extend(["-H", "expect: 100-continue", "--expect100-timeout", "5"]);
        }
        args.push(url.as_str());
        let answer = curl(&mesh, &args)?;
        let head = format!("{} {:?}", answer.status_line, answer.headers);
        assert!(
            answer.status_line.starts_with(&format!("{version} 200")),
            "{version}: {head}"
        );
        assert_eq!(answer.header("x-backend"), "v2", "{head}");
        assert_eq!(answer.header("x-route"), "picked", "{head}");
        assert_eq!(answer.written, "200 1000000", "{version}: the whole body");
        if version == "HTTP/1.1" {
            assert_eq!(answer.interim, ["HTTP/1.1 100 Continue"], "{head}");
        }
        assert!(
            answer.seconds < 4.0,
            "{version}: no wait for a 100 Continue: {} s",
            answer.seconds
        );
        let seen = mesh.v2.wait_requests(before + 1)?;
        let request = &seen[before];
        assert_eq!(request["headers"]["x-added"], "by-weir", "{request}");
        assert_eq!(request["method"], "POST", "{request}");
        assert_eq!(request["body_len"], 60_000, "the whole request body");
        assert!(
            request["headers"]["user-agent"]
                .as_str()
                .is_some_and(|agent| agent.starts_with("curl/")),
            "{request}"
        );
        // Cluster v2 names no protocol: Envoy's (and Istio's) HTTP/1.1
        // upstream, whatever the client speaks.
        assert_eq!(request["version"], "HTTP/1.1", "{request}");

        // Without the header: the default route, nothing added.
        let mut args = flags.to_vec();
        args.push(url.as_str());
        let answer = curl(&mesh, &args)?;
        let head = format!("{} {:?}", answer.status_line, answer.headers);
        assert!(
            answer.status_line.starts_with(&format!("{version} 200")),
            "{head}"
        );
        assert_eq!(answer.header("x-backend"), "v1", "{head}");
        assert_eq!(answer.header("x-route"), "", "{head}");
    }
    Ok(())
}
