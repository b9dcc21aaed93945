//! The HTTP/1.1, HTTP/2 and gRPC workloads themselves, pod to pod without
//! the agent: what the L7 proxy's tests rely on them to do.
use serde_json::Value;
use weir_tests::{
    TestNode,
    http::{self, HttpServer},
};

/// The one line of a single request or call, which must not be an error.
fn only(lines: &[Value]) -> &Value {
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].get("error").is_none(), "{lines:?}");
    &lines[0]
}

/// The JSON body `httptool serve` answers plain requests with.
fn body(response: &Value) -> Value {
    let text = response["body"].as_str().unwrap_or_default();
    serde_json::from_str(text).unwrap_or_else(|e| panic!("body of {response}: {e}"))
}

#[test]
fn http_grpc_and_upgrade_between_pods() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let server = HttpServer::start(&b, 8080, "b-v1")?;
    let base = format!("http://{}:8080", b.ip);
    let to = format!("{}:8080", b.ip);

    // HTTP/1.1, with a header the server must see.
    let lines = http::get(
        &a,
        &[
            "--url",
            &format!("{base}/hello?x=y"),
            "--header",
            "x-test: one",
        ],
    )?;
    let response = only(&lines);
    assert_eq!(response["status"], 200, "{response}");
    assert_eq!(response["version"], "HTTP/1.1", "{response}");
    assert_eq!(response["headers"]["x-backend"], "b-v1", "{response}");
    let echoed = body(response);
    assert_eq!(echoed["backend"], "b-v1", "{echoed}");
    assert_eq!(
        (&echoed["path"], &echoed["query"]),
        (&"/hello".into(), &"x=y".into())
    );
    let seen = server.wait_requests(1)?;
    assert_eq!(seen[0]["headers"]["x-test"], "one", "{seen:?}");
    assert_eq!(seen[0]["version"], "HTTP/1.1", "{seen:?}");
    assert!(
        seen[0]["peer"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&format!("{}:", a.ip)),
        "{seen:?}"
    );

    // HTTP/2 prior knowledge on the same port.
    let lines = http::get(&a, &["--url", &format!("{base}/two"), "--h2"])?;
    let response = only(&lines);
    assert_eq!(response["status"], 200, "{response}");
    assert_eq!(response["version"], "HTTP/2.0", "{response}");
    assert_eq!(body(response)["version"], "HTTP/2.0", "{response}");

    let lines = http::get(&a, &["--url", &format!("{base}/x?status=503")])?;
    assert_eq!(only(&lines)["status"], 503, "{lines:?}");

    // fail_first counts per key, across requests of one connection.
    let lines = http::get(
        &a,
        &[
            "--url",
            &format!("{base}/retry?fail_first=2&key=k"),
            "--count",
            "3",
        ],
    )?;
    let statuses: Vec<_> = lines
        .iter()
        .filter_map(|line| line["status"].as_u64())
        .collect();
    assert_eq!(statuses, [503, 503, 200], "{lines:?}");
    let summary = http::summary(&lines)?;
    assert_eq!(summary["by_backend"]["b-v1"], 3, "{summary}");
    assert_eq!(summary["errors"], 0, "{summary}");

    // gRPC on the same port: a call, a requested failure, a stream.
    let lines = http::grpc(
        &a,
        &["--to", &to, "--message", "hi", "--metadata", "x-call=1"],
    )?;
    let call = only(&lines);
    assert_eq!(call["code"], 0, "{call}");
    assert_eq!(
        (&call["message"], &call["backend"]),
        (&"hi".into(), &"b-v1".into())
    );
    assert_eq!(call["metadata"]["x-call"], "1", "{call}");

    let lines = http::grpc(&a, &["--to", &to, "--message", "no", "--fail-code", "14"])?;
    let failed = only(&lines);
    assert_eq!(failed["code"], 14, "{failed}");
    assert_eq!(failed["message"], "requested failure", "{failed}");
    assert_eq!(failed["backend"], "b-v1", "{failed}");

    let lines = http::grpc(&a, &["--to", &to, "--message", "s", "--stream", "3"])?;
    let stream = only(&lines);
    assert_eq!(
        (&stream["code"], &stream["replies"]),
        (&0.into(), &3.into()),
        "{stream}"
    );
    let grpc_seen = server
        .wait_requests(9)?
        .into_iter()
        .filter(|request| request["path"] == "/weir.test.Echo/Call")
        .count();
    assert_eq!(grpc_seen, 2, "{:?}", server.requests());

    // Upgrade: after the 101 the stream is echoed byte for byte.
    let lines = http::upgrade(&a, &["--to", &to, "--bytes", "262144"])?;
    let upgraded = only(&lines);
    assert_eq!(upgraded["status"], 101, "{upgraded}");
    assert_eq!(
        (&upgraded["echoed"], &upgraded["intact"]),
        (&262144.into(), &true.into())
    );
    Ok(())
}

/// `close=1` is a transport error for the client (HTTP/1.1: the connection
/// drops; HTTP/2: the stream is reset), and the server goes on serving.
#[test]
fn close_is_a_transport_error() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _server = HttpServer::start(&b, 8080, "b")?;
    for h2 in [false, true] {
        let url = format!("http://{}:8080/c?close=1", b.ip);
        let mut args = vec!["--url", url.as_str(), "--count", "2"];
        if h2 {
            args.push("--h2");
        }
        let lines = http::get(&a, &args)?;
        assert!(
            lines[..2].iter().all(|line| line.get("error").is_some()),
            "{lines:?}"
        );
        assert_eq!(http::summary(&lines)?["errors"], 2, "{lines:?}");
    }
    let lines = http::get(&a, &["--url", &format!("http://{}:8080/after", b.ip)])?;
    assert_eq!(only(&lines)["status"], 200, "{lines:?}");
    Ok(())
}
