//! ztunnel's local config file (`local_xds_path`): its format read as it
//! is, its workloads, services and policies taken as a control plane's
//! resources, and the file followed as it changes; a broken file is
//! refused and the last good one keeps serving.
use std::{path::Path, time::Duration};

use weir_tests::{
    AgentOptions, Family, Pod, Server, TestNode, connect_nodes, metric_sample, podtool, prereq,
    wait_for,
};

/// ztunnel's own example (istio/ztunnel examples/localhost.yaml), from the
/// conformance material beside the repository (`../shared/conformance`, or
/// `$WEIR_SHARED_DIR/conformance`).
fn ztunnel_example() -> anyhow::Result<std::path::PathBuf> {
    let shared = std::env::var_os("WEIR_SHARED_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"),
        std::path::PathBuf::from,
    );
    let path = shared.join("conformance/ztunnel-local/localhost.yaml");
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: the conformance material lives in ../shared beside the repository \
         (or set WEIR_SHARED_DIR to the directory that holds conformance/)",
        path.display()
    );
    Ok(path)
}

/// The "done when" of the drop-in: `weir check-config` takes ztunnel's
/// example file as it is.
#[test]
fn check_config_accepts_ztunnels_example_file_as_it_is() -> anyhow::Result<()> {
    let example = ztunnel_example()?;
    let dir = std::env::temp_dir().join(format!("weir-ztunnel-local-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("agent.yaml");
    std::fs::write(
        &config,
        format!("node: local\nlocal_xds_path: {}\n", example.display()),
    )?;
    let output = std::process::Command::new(prereq::agent_binary()?)
        .arg("check-config")
        .arg(&config)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let output = output?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("2 workload(s), 2 service(s), 1 policy(ies)"),
        "{stdout}"
    );
    Ok(())
}

/// `pod` as ztunnel's local file writes a workload, both its addresses.
fn workload(pod: &Pod, services: &str) -> String {
    format!(
        r#"- uid: cluster1//v1/Pod/test/{name}
  name: {name}
  namespace: test
  serviceAccount: {name}
  trustDomain: cluster.local
  workloadIps: ["{ip}", "{ip6}"]
  protocol: HBONE
  node: elsewhere
  network: ""
  services: {services}
"#,
        name = pod.name,
        ip = pod.ip,
        ip6 = pod.ip6,
    )
}

/// ztunnel's example policy (examples/localhost.yaml: ALLOW everything but
/// port 9999, written without `dryRun`, as the example is), or the same as
/// a dry run.
fn policy(dry_run: Option<bool>) -> String {
    let dry_run = dry_run.map_or(String::new(), |dry| format!("    dryRun: {dry}\n"));
    format!(
        r#"policies:
  - action: Allow
    rules:
    - - - notDestinationPorts:
          - 9999
    name: deny-9999
    namespace: test
    scope: Namespace
{dry_run}"#
    )
}

/// Replaces the file at once (written aside, renamed into place).
fn replace(path: &Path, content: &str) -> anyhow::Result<()> {
    let next = path.with_extension("next");
    std::fs::write(&next, content)?;
    std::fs::rename(&next, path)?;
    Ok(())
}

fn nacks(node: &TestNode) -> f64 {
    node.http_get(15020, "/metrics")
        .ok()
        .and_then(|(_, text)| {
            metric_sample(
                &text,
                "weir_xds_nacks_total",
                &["istio.security.Authorization"],
            )
        })
        .unwrap_or(0.0)
}

#[test]
fn ztunnels_local_file_is_the_mesh_state_and_is_followed_as_it_changes() -> anyhow::Result<()> {
    let mut node1 = TestNode::with_index(1)?;
    let mut node2 = TestNode::with_index(2)?;
    connect_nodes(&node1, &node2)?;
    let a = node1.add_pod("a")?;
    let b = node2.add_pod("b")?;
    let _echo = Server::start_family(&b, Family::V6, 8080, "echo")?;
    let _other = Server::start_family(&b, Family::V6, 9999, "echo")?;
    let ca_dir = node1.dir.join("ca");
    TestNode::ca_init(&ca_dir)?;

    // Node 1 learns b, and a service b backs, from ztunnel's format only.
    let file1 = node1.dir.join("ztunnel-local.yaml");
    std::fs::write(
        &file1,
        format!(
            "workloads:\n{}services:\n- name: echo\n  namespace: test\n  hostname: echo.test.svc.cluster.local\n  vips: [\"/10.96.0.40\"]\n  ports: {{80: 8080}}\n  canonical: true\n",
            workload(&b, "{\"test/echo.test.svc.cluster.local\": {80: 8080}}")
        ),
    )?;
    // Node 2 learns a, and ztunnel's example policy.
    let file2 = node2.dir.join("ztunnel-local.yaml");
    let workloads2 = format!("workloads:\n{}", workload(&a, "{}"));
    std::fs::write(&file2, format!("{workloads2}{}", policy(None)))?;
    for (node, pod, file) in [(&mut node1, "a", &file1), (&mut node2, "b", &file2)] {
        node.start_agent(&AgentOptions {
            ca_dir: Some(ca_dir.clone()),
            extra_config: format!("local_xds_path: {}\n", file.display()),
            ..AgentOptions::enroll(&[pod])
        })?;
    }

    // A meshed workload of the file, over both families, through HBONE
    // with a's identity; and the file's service VIP.
    for target in [
        b.addr(Family::V4, 8080),
        b.addr(Family::V6, 8080),
        "10.96.0.40:80".to_string(),
    ] {
        let report = podtool::send(&a, &target, 2048)?;
        assert!(report.intact && report.captured(), "{target}: {report:?}");
    }
    // The connection lines only (other lines name sa/a too).
    node2.wait_for_log(
        "direction=\"inbound\" protocol=\"hbone\"",
        3,
        Duration::from_secs(5),
    )?;
    let tunnelled = node2.log_lines(&["direction=\"inbound\"", "protocol=\"hbone\"", "sa/a"]);
    assert_eq!(tunnelled.len(), 3, "{tunnelled:?}");

    // The example's policy: everything but port 9999.
    let denied = podtool::send(&a, &b.addr(Family::V4, 9999), 512)?;
    assert!(!denied.intact, "port 9999 is denied: {denied:?}");
    node2.wait_for_log("connection denied by policy", 1, Duration::from_secs(5))?;
    // An ALLOW that matches nothing denies: the workload has an ALLOW.
    assert!(
        !node2
            .log_lines(&["connection denied by policy", "no ALLOW policy matched"])
            .is_empty(),
        "denied by the file's ALLOW policy: {:?}",
        node2.log_lines(&["connection denied by policy"])
    );

    // The same policy as a dry run, replaced at once: reported, not enforced.
    replace(&file2, &format!("{workloads2}{}", policy(Some(true))))?;
    node2.wait_for_log("local xds file reloaded", 1, Duration::from_secs(5))?;
    wait_for("port 9999 allowed", Duration::from_secs(5), || {
        podtool::send(&a, &b.addr(Family::V6, 9999), 512)
            .ok()
            .filter(|report| report.intact)
    })?;

    // A broken file is refused, counted, and the last good one serves.
    let before = nacks(&node2);
    replace(
        &file2,
        &format!(
            "{workloads2}{}",
            policy(Some(true)).replace("notDestinationPorts", "notDestinationPort")
        ),
    )?;
    node2.wait_for_log("local xds file refused", 1, Duration::from_secs(5))?;
    let refusal = node2.log_lines(&["local xds file refused"]);
    assert!(
        refusal
            .iter()
            .any(|line| line.contains("unknown field `notDestinationPort`")),
        "the refusal says what is wrong: {refusal:?}"
    );
    assert!(nacks(&node2) > before, "the refusal is counted");
    for port in [8080, 9999] {
        let report = podtool::send(&a, &b.addr(Family::V4, port), 512)?;
        assert!(
            report.intact,
            "the last good file serves: {port}: {report:?}"
        );
    }
    Ok(())
}
