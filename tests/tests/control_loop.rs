//! The agent's control loop as a new user meets it: a pod whose namespace
//! does not exist yet, a reload that cannot apply everything, a config file
//! caught half written, the order in which a batch of pods is enrolled, and
//! a hand-over that drains what is in flight.
use std::{process::Command, time::Duration};

use weir_tests::{AgentOptions, Server, TestNode, podtool, prereq, wait_for};

#[test]
fn check_config_refuses_a_pod_whose_netns_is_missing() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    node.add_pod("a")?;
    let b = node.declare_pod("b");
    let config = node.dir.join("check.yaml");
    std::fs::write(
        &config,
        node.config_yaml(&AgentOptions::enroll(&["a", "b"])),
    )?;
    let check = || {
        Command::new(prereq::agent_binary()?)
            .arg("check-config")
            .arg(&config)
            .output()
            .map_err(anyhow::Error::from)
    };
    let output = check()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "accepted: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    let path = b.netns_path().display().to_string();
    for text in ["pods[1] (test/b)", &path, "does not exist"] {
        assert!(stderr.contains(text), "{text:?} not in {stderr}");
    }
    assert!(!stderr.contains("test/a"), "{stderr}");

    node.create_pod(&b)?;
    let output = check()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.starts_with("ok:"), "{stdout}");
    Ok(())
}

/// Readiness and the config dump while the pod is pending, then its
/// enrollment once the namespace exists, with no edit of the file.
#[test]
fn a_pod_is_enrolled_when_its_netns_appears() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.declare_pod("b");
    let path = b.netns_path().display().to_string();
    node.start_agent(&AgentOptions::enroll(&["a", "b"]))?;

    let (status, body) = node.http_get(15021, "/healthz/ready")?;
    assert_eq!(status, 503, "{body}");
    let readiness: serde_json::Value = serde_json::from_str(&body)?;
    let reasons = readiness["reasons"].to_string();
    assert!(
        reasons.contains("test/b") && reasons.contains(&path) && reasons.contains("does not exist"),
        "{body}"
    );
    let (_, body) = node.http_get(15000, "/config_dump")?;
    let dump: serde_json::Value = serde_json::from_str(&body)?;
    let pending = dump["not_enrolled"].as_array().expect("not_enrolled");
    assert_eq!(pending.len(), 1, "{dump:#}");
    assert_eq!(pending[0]["id"], "test/b");
    assert_eq!(pending[0]["netns"], path.as_str());
    assert_eq!(pending[0]["source"], "file");
    assert!(
        pending[0]["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("does not exist")),
        "{dump:#}"
    );
    assert_eq!(dump["pods"].as_array().map(Vec::len), Some(1), "{dump:#}");

    node.create_pod(&b)?;
    let _server = Server::start(&b, 8080, "echo")?;
    wait_for("readiness 200", Duration::from_secs(15), || {
        matches!(node.http_get(15021, "/healthz/ready"), Ok((200, _))).then_some(())
    })
    .map_err(|error| anyhow::anyhow!("{error}; agent log:\n{}", node.agent_log()))?;
    let (_, body) = node.http_get(15000, "/config_dump")?;
    let dump: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(
        dump["not_enrolled"].as_array().map(Vec::len),
        Some(0),
        "{dump:#}"
    );
    assert_eq!(dump["pods"].as_array().map(Vec::len), Some(2), "{dump:#}");
    let enrolled = node.log_lines(&["pod enrolled", "test/b"]);
    assert_eq!(enrolled.len(), 1, "{enrolled:?}");
    // Waited for with one warning, not one per reload tick.
    let waited = node.log_lines(&["pod not enrolled", "test/b", "namespace appears"]);
    assert_eq!(waited.len(), 1, "{waited:?}");

    // Its traffic goes through the mesh: a's connect is captured and b's
    // side records a's identity.
    let report = podtool::send(&a, &format!("{}:8080", b.ip), 4096)?;
    assert!(report.intact && report.captured(), "{report:?}");
    let inbound = wait_for("b's inbound record", Duration::from_secs(5), || {
        let lines = node.log_lines(&[
            "direction=\"inbound\"",
            "pod=test/b",
            "peer_identity=spiffe://cluster.local/ns/test/sa/a",
        ]);
        (!lines.is_empty()).then_some(lines)
    })
    .map_err(|error| anyhow::anyhow!("{error}; agent log:\n{}", node.agent_log()))?;
    assert_eq!(inbound.len(), 1, "{inbound:?}");
    assert!(inbound[0].contains("bytes_received=4096"), "{inbound:?}");
    Ok(())
}

#[test]
fn a_reload_names_the_settings_that_apply_on_restart() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    node.add_pod("a")?;
    let mut options = AgentOptions::enroll(&["a"]);
    node.start_agent(&options)?;

    // same_node (read at start) and a policy (re-applied) in one edit.
    options.same_node_mtls = true;
    options.policies = vec!["{name: no-ssh, namespace: test, action: DENY, groups: [{rules: [{matches: [{destination_ports: [22]}]}]}]}".into()];
    node.reconfigure_agent(&options)?;
    let warnings = node.log_lines(&["WARN", "on restart"]);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("same_node changed; it applies on restart"),
        "{warnings:?}"
    );
    assert!(!warnings[0].contains("policies"), "{warnings:?}");
    let (_, body) = node.http_get(15000, "/config_dump")?;
    let dump: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(dump["policies"][0]["name"], "no-ssh", "{dump:#}");

    // A change that applies now says nothing more.
    options.policies.clear();
    node.reconfigure_agent(&options)?;
    assert_eq!(node.log_lines(&["WARN", "on restart"]).len(), 1);

    // Several at once are named in one line.
    options.extra_config = "trust_domain: example.org\n".into();
    options.same_node_mtls = false;
    node.reconfigure_agent(&options)?;
    let warnings = node.log_lines(&["WARN", "on restart"]);
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings[1].contains("trust_domain, same_node changed; they apply on restart"),
        "{warnings:?}"
    );
    Ok(())
}

/// A client in pod `a` connects to pod `z` in a loop while the agent starts
/// and enrolls both (and pods between them, which are enrolled in between
/// when pods are enrolled one by one). Each connection must succeed: direct
/// before `a` is captured, through the mesh after, never to a listener of
/// `z` that does not exist yet.
#[test]
fn a_batch_of_pods_has_every_inbound_side_up_before_any_capture() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let between: Vec<String> = (1..=8).map(|n| format!("m{n}")).collect();
    for name in &between {
        node.add_pod(name)?;
    }
    let z = node.add_pod("z")?;
    let _server = Server::start(&z, 8080, "echo")?;

    let probe = podtool::Probe::start(&a, &format!("{}:8080", z.ip), 2)?;
    let count = |captured: bool| {
        probe
            .lines()
            .iter()
            .filter(|line| line["ok"] == true && podtool::Probe::captured(line) == captured)
            .count()
    };
    wait_for("direct probes", Duration::from_secs(10), || {
        (count(false) >= 5).then_some(())
    })?;

    let mut enrolled = vec!["a", "z"];
    enrolled.extend(between.iter().map(String::as_str));
    let started = node.start_agent(&AgentOptions::enroll(&enrolled));
    let captured = wait_for("captured probes", Duration::from_secs(10), || {
        (count(true) >= 50).then_some(())
    })
    .map_err(|error| {
        let lines = probe.lines();
        let last: Vec<_> = lines.iter().rev().take(3).collect();
        anyhow::anyhow!("{error}: {} probes, the last {last:?}", lines.len())
    });
    started?;
    captured?;

    let lines = probe.lines();
    let failures: Vec<&serde_json::Value> =
        lines.iter().filter(|line| line["ok"] != true).collect();
    assert!(
        failures.is_empty(),
        "{} of {} connections failed across the agent's start: {failures:?}",
        failures.len(),
        lines.len()
    );
    Ok(())
}

/// SIGTERM as soon as a reload enrolling a large batch has changed its
/// first pod (while the rest are being enrolled, when it lands in time): the
/// agent exits cleanly and releases every pod it changed, so nothing is
/// left in any of them.
#[test]
fn a_stop_during_a_large_enrollment_leaves_no_pod_changed() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let names: Vec<String> = (1..=60).map(|n| format!("p{n}")).collect();
    let mut pods = Vec::new();
    for name in &names {
        pods.push(node.add_pod(name)?);
    }
    node.start_agent(&AgentOptions::default())?;
    let config = node.dir.join("agent.yaml");
    let enrolled: Vec<&str> = names.iter().map(String::as_str).collect();
    std::fs::write(&config, node.config_yaml(&AgentOptions::enroll(&enrolled)))?;
    // Stopped as soon as enrollment has changed the first pod of the batch.
    let rule_in = |pod: &weir_tests::Pod| {
        weir_tests::node::run("ip", &["-n", &pod.netns, "rule", "show"])
            .is_ok_and(|rules| rules.contains("0x53a"))
    };
    wait_for("the first pod's rule", Duration::from_secs(20), || {
        rule_in(&pods[0]).then_some(())
    })?;
    let status = node.stop_agent()?;
    assert!(status.success(), "agent exit status {status:?}");
    let log = node.agent_log();
    assert!(log.contains("SIGTERM: shutting down"), "{log}");
    assert_eq!(
        log.matches("pod enrolled").count(),
        log.matches("pod released").count(),
        "{log}"
    );
    for pod in &pods {
        assert!(!rule_in(pod), "rule left in {}", pod.name);
        let filters =
            weir_tests::node::run("tc", &["-n", &pod.netns, "qdisc", "show", "dev", "eth0"])?;
        assert!(!filters.contains("clsact"), "{}: {filters}", pod.name);
    }
    Ok(())
}

/// A config file written in place in two halves, with a pause between
/// them (a slow or interrupted writer), is applied only once whole. The
/// first half is valid YAML listing pod a but not b: applied, it would
/// release b and cut b's established connection.
#[test]
fn a_half_written_config_file_is_never_applied() -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _server = Server::start(&b, 8080, "echo")?;
    let options = AgentOptions::enroll(&["a", "b"]);
    node.start_agent(&options)?;
    let target = format!("{}:8080", b.ip);
    let stream = {
        let (a, target) = (a.clone(), target.clone());
        std::thread::spawn(move || podtool::stream(&a, &target, 5))
    };
    wait_for(
        "the connection delivered to b",
        Duration::from_secs(10),
        || (b.connections_to_port(8080).ok()? == 1).then_some(()),
    )?;

    // The whole new file relabels a (applied without re-enrolling anyone).
    let whole = node.config_yaml(&AgentOptions {
        labels: vec![("a".into(), "{app: web}".into())],
        ..options.clone()
    });
    let cut = whole
        .find("  - {name: b,")
        .ok_or_else(|| anyhow::anyhow!("no pod b in {whole}"))?;
    let (first, rest) = whole.split_at(cut);
    let prefix = weir_agent::config::Config::parse(first, "prefix")?;
    assert!(
        prefix.pods.iter().all(|pod| pod.name != "b"),
        "the premise: the first half parses, without b"
    );
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(node.dir.join("agent.yaml"))?;
    file.write_all(first.as_bytes())?;
    // The writer's pause (the scenario itself, not a wait): several of the
    // agent's 100 ms polls see the first half alone.
    std::thread::sleep(Duration::from_millis(400));
    file.write_all(rest.as_bytes())?;
    drop(file);

    node.wait_for_log("config reloaded", 1, Duration::from_secs(10))?;
    let exchanges = stream
        .join()
        .map_err(|_| anyhow::anyhow!("stream thread panicked"))??;
    assert!(exchanges >= 30, "only {exchanges} exchanges");
    let log = node.agent_log();
    assert_eq!(log.matches("config reloaded").count(), 1, "{log}");
    assert!(!log.contains("pod released"), "{log}");
    Ok(())
}

/// Every kind of connection holds a hand-over's drain, an inbound HTTP one
/// (a pod whose policies look at requests) too: a request in flight when
/// the old agent is told to stop completes before it exits.
#[test]
fn a_hand_over_drain_waits_for_an_inbound_http_request_in_flight() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    // a is outside the mesh: its request reaches b's inbound HTTP path.
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let server = weir_tests::http::HttpServer::start(&b, 8080, "b")?;
    node.start_agent(&AgentOptions {
        policies: vec!["{name: reads, namespace: test, action: ALLOW, groups: [{rules: [{matches: [{methods: [GET]}]}]}]}".into()],
        ..AgentOptions::enroll(&["b"])
    })?;
    // Long enough to outlast the successor's start and the hand-over.
    let url = format!("http://{}:8080/slow?delay_ms=8000", b.ip);
    let client = std::thread::spawn(move || {
        weir_tests::http::get(&a, &["--url", &url, "--timeout-ms", "30000"])
    });
    server.wait_requests(1)?;

    node.start_successor()?;
    wait_for(
        "the first agent handing over",
        Duration::from_secs(10),
        || {
            node.previous_agent_log()
                .contains("handing over")
                .then_some(())
        },
    )?;
    node.signal_previous_agent()?;
    let lines = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    assert_eq!(lines[0]["status"], 200, "{lines:?}");
    let status = node.wait_previous_agent(Duration::from_secs(30))?;
    assert!(status.success(), "{status:?}");
    let old_log = node.previous_agent_log();
    assert!(old_log.contains("draining connections"), "{old_log}");
    assert!(old_log.contains("drained: no connection left"), "{old_log}");
    Ok(())
}
