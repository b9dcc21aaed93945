//! What an operator sees and relies on: bpftool output, a clean exit, and a
//! clear refusal when the machine lacks what the agent needs.
use std::{path::Path, process::Command};

use weir_tests::{AgentOptions, Server, TestNode, node::run, podtool, prereq};

fn bpftool(args: &[&str]) -> anyhow::Result<String> {
    run("bpftool", args)
}

#[test]
fn bpftool_shows_programs_by_name_and_enrolled_pods_with_field_names() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    node.start_agent(&AgentOptions::enroll(&["a"]))?;

    let programs = bpftool(&["prog", "show"])?;
    for name in [
        "weir_connect4",
        "weir_connect6",
        "weir_sendmsg4",
        "weir_sendmsg6",
        "weir_recvmsg4",
        "weir_recvmsg6",
        "weir_getpeername4",
        "weir_getpeername6",
        "weir_getsockname4",
        "weir_getsockname6",
        "weir_sockops",
        "weir_sockops_accel",
        "weir_sk_msg",
        "weir_tc_ingress",
    ] {
        assert!(
            programs.contains(&format!("name {name} ")),
            "{name} missing:\n{programs}"
        );
    }

    let pinned = node.pin_dir().join("maps").join("ENROLLED_PODS");
    let dump = bpftool(&["map", "dump", "pinned", &pinned.to_string_lossy()])?;
    let ipv4 = u32::from_ne_bytes(a.ip.octets());
    assert!(
        dump.contains("\"ipv4\": ") && dump.contains("\"ifindex\": "),
        "{dump}"
    );
    assert!(
        dump.contains(&ipv4.to_string()),
        "pod a ({ipv4}) not in:\n{dump}"
    );
    let enrolled = node.enrolled_pods()?;
    assert_eq!(enrolled.len(), 1, "{enrolled:?}");

    // Cgroup programs on the pods' parent, visible to bpftool.
    let cgroup = bpftool(&["cgroup", "show", &node.cgroup.to_string_lossy()])?;
    for name in [
        "weir_connect4",
        "weir_sockops",
        "weir_getpeername4",
        "weir_getsockname4",
        "weir_getsockname6",
    ] {
        assert!(cgroup.contains(name), "{name} not on the cgroup:\n{cgroup}");
    }
    // The classifier is a tcx link on the pod's eth0, pinned by the pod's
    // namespace cookie, which bpftool shows.
    let cookie = enrolled
        .keys()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no enrolled pod"))?;
    let tc_pin = node.pin_dir().join("links/tc").join(cookie.to_string());
    let link = bpftool(&["link", "show", "pinned", &tc_pin.to_string_lossy()])?;
    // bpftool 7.1 knows no tcx links by name ("type 11"), but shows the
    // program: Weir's pinned classifier.
    let program_id = classifier_id(&node)?;
    assert!(
        !program_id.is_empty() && link.contains(&format!("prog {program_id} ")),
        "{link}\n{program_id}"
    );
    // `weir bpf` summarises the same, with map fill and bpftool commands.
    let output = Command::new(prereq::agent_binary()?)
        .args(["bpf", "--instance", &node.id])
        .output()?;
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        summary.contains("weir_tc_ingress") && summary.contains("bpftool prog show pinned"),
        "{summary}"
    );
    let enrolled_line = summary
        .lines()
        .find(|line| line.trim_start().starts_with("ENROLLED_PODS"))
        .unwrap_or_default();
    assert!(enrolled_line.contains(" 1 / 1024"), "{summary}");
    // The getsockname programs, pinned and attached (a link each).
    for name in ["weir_getsockname4", "weir_getsockname6"] {
        assert_eq!(
            summary.matches(&format!("  {name} ")).count(),
            2,
            "{summary}"
        );
    }
    // One pod's restore record (what enrollment changed).
    let restore_line = summary
        .lines()
        .find(|line| line.trim_start().starts_with("POD_RESTORE"))
        .unwrap_or_default();
    assert!(restore_line.contains(" 1 / 1024"), "{summary}");
    Ok(())
}

#[test]
fn bpf_debug_forwards_the_programs_logs() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _server_a = Server::start(&a, 8080, "echo")?;
    let _server_b = Server::start(&b, 8080, "echo")?;
    // Only b is meshed: a -> b is steered by TC, b -> a is captured by connect4.
    node.start_agent(&AgentOptions {
        bpf_debug: true,
        ..AgentOptions::enroll(&["b"])
    })?;
    let inbound = podtool::send(&a, &format!("{}:8080", b.ip), 16)?;
    let outbound = podtool::send(&b, &format!("{}:8080", a.ip), 16)?;
    assert!(
        inbound.intact && outbound.intact,
        "{inbound:?} {outbound:?}"
    );
    node.wait_for_log(
        "connect4 captured cookie=",
        1,
        std::time::Duration::from_secs(5),
    )?;
    node.wait_for_log(
        "tc steered SYN to port 8080",
        1,
        std::time::Duration::from_secs(5),
    )?;
    Ok(())
}

#[test]
fn nothing_is_left_after_the_agent_exits_and_after_the_test() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _server = Server::start(&b, 8080, "echo")?;
    node.start_agent(&AgentOptions::enroll(&["a", "b"]))?;
    let report = podtool::send(&a, &format!("{}:8080", b.ip), 4096)?;
    assert!(report.intact && report.captured(), "{report:?}");
    assert!(node.pin_dir().exists());

    let status = node.stop_agent()?;
    assert!(status.success(), "agent exit status {status:?}");
    assert!(
        !node.pin_dir().exists(),
        "pins left in {}",
        node.pin_dir().display()
    );
    let cgroup = bpftool(&["cgroup", "show", &node.cgroup.to_string_lossy()])?;
    assert!(
        !cgroup.contains("weir_"),
        "programs still attached:\n{cgroup}"
    );
    for pod in [&a, &b] {
        let filters = run(
            "tc",
            &["-n", &pod.netns, "filter", "show", "dev", "eth0", "ingress"],
        )?;
        assert!(
            filters.trim().is_empty(),
            "filter left on {}: {filters}",
            pod.name
        );
        for family in ["-4", "-6"] {
            let rules = run("ip", &["-n", &pod.netns, family, "rule", "show"])?;
            assert!(
                !rules.contains("0x53a"),
                "rule left in {}: {rules}",
                pod.name
            );
            let routes = run(
                "ip",
                &["-n", &pod.netns, family, "route", "show", "table", "all"],
            )?;
            assert!(
                !routes.contains("table 1539"),
                "route left in {}: {routes}",
                pod.name
            );
        }
    }
    // After the agent, an unmeshed connection goes straight through.
    let direct = podtool::send(&a, &format!("{}:8080", b.ip), 4096)?;
    assert!(direct.intact && !direct.captured(), "{direct:?}");

    let names: Vec<String> = vec![node.netns.clone(), a.netns.clone(), b.netns.clone()];
    let cgroup_dir = node.cgroup.clone();
    node.teardown()?;
    for name in names {
        assert!(
            !Path::new("/run/netns").join(&name).exists(),
            "netns {name} left"
        );
    }
    assert!(!cgroup_dir.exists(), "cgroup {} left", cgroup_dir.display());
    Ok(())
}

#[test]
fn a_killed_agent_is_cleaned_up_by_the_next_one() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _server = Server::start(&b, 8080, "echo")?;
    node.start_agent(&AgentOptions::enroll(&["a"]))?;
    let before = classifier_id(&node)?;
    node.kill_agent()?;
    // Pinned links outlive the process: captured connects now fail closed.
    assert!(node.pin_dir().join("links").join("weir_connect4").exists());
    let closed = podtool::send(&a, &format!("{}:8080", b.ip), 16)?;
    assert!(
        !closed.intact,
        "expected fail-closed while the agent is down: {closed:?}"
    );

    node.start_agent(&AgentOptions::enroll(&["a"]))?;
    assert!(
        node.agent_log()
            .contains("adopting pins left by an earlier run")
    );
    let report = podtool::send(&a, &format!("{}:8080", b.ip), 4096)?;
    assert!(report.intact && report.captured(), "{report:?}");
    // The pod's classifier is the new run's program, attached once: the
    // earlier run's tcx link went when its pin was replaced.
    let links = bpftool(&["link", "show"])?;
    let attached = |program: &str| links.matches(&format!("prog {program} ")).count();
    let now = classifier_id(&node)?;
    assert_ne!(before, now, "the program was reloaded");
    assert_eq!((attached(&before), attached(&now)), (0, 1), "{links}");
    Ok(())
}

/// The id of the inbound classifier program `node`'s agent pinned.
fn classifier_id(node: &TestNode) -> anyhow::Result<String> {
    let program = bpftool(&[
        "prog",
        "show",
        "pinned",
        &node
            .pin_dir()
            .join("progs/weir_tc_ingress")
            .to_string_lossy(),
    ])?;
    Ok(program
        .split(':')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned())
}

/// Starts the agent under `wrapper` (which takes away something it needs)
/// and checks the refusal: non-zero exit, one line naming each of
/// `expected`, nothing pinned.
fn assert_refused(wrapper: &[&str], expected: &[&str]) -> anyhow::Result<()> {
    let node = TestNode::new()?;
    let config = node.dir.join("agent.yaml");
    std::fs::write(&config, node.config_yaml(&AgentOptions::default()))?;
    let wrapper: Vec<String> = wrapper
        .iter()
        .map(|arg| arg.replace("{node}", &node.netns))
        .collect();
    let output = Command::new(&wrapper[0])
        .args(&wrapper[1..])
        .arg(prereq::agent_binary()?)
        .args(["run", "--config"])
        .arg(&config)
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    for text in expected {
        assert!(stderr.contains(text), "{text:?} not in {stderr}");
    }
    assert!(!node.pin_dir().exists());
    Ok(())
}

#[test]
fn missing_privileges_are_named_in_one_line() -> anyhow::Result<()> {
    assert_refused(
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ],
        &["CAP_BPF", "run the agent as root"],
    )
}

#[test]
fn a_missing_cgroup_v2_mount_is_named_in_one_line() -> anyhow::Result<()> {
    // `ip netns exec` runs in a new mount namespace with a fresh /sys: no
    // cgroup mounts there.
    assert_refused(
        &["ip", "netns", "exec", "{node}"],
        &["no cgroup v2 hierarchy"],
    )
}

#[test]
fn a_bad_config_is_rejected_with_the_field() -> anyhow::Result<()> {
    let agent = prereq::agent_binary()?;
    let dir = tempdir()?;
    let config = dir.join("bad.yaml");
    // Each bad config must fail `weir check-config` naming all of `expected`.
    let check = |yaml: &str, expected: &[&str]| -> anyhow::Result<()> {
        std::fs::write(&config, yaml)?;
        let output = Command::new(&agent)
            .arg("check-config")
            .arg(&config)
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "accepted: {yaml}");
        for text in expected {
            assert!(stderr.contains(text), "{text:?} not in {stderr}");
        }
        Ok(())
    };
    check(
        "node: n\npods:\n  - {name: a, netns: relative/path, ip: 10.0.0.1}\n",
        &["pods[0]", "absolute"],
    )?;
    check(
        "node: n\ncapture: {acclerate: true}\n",
        &["acclerate", "line"],
    )?;
    check(
        "node: n\npods:\n  - {name: a, netns: /run/netns/a, ip: 10.0.0.1, mesh_mode: STRICTER}\n",
        &["STRICTER"],
    )?;
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("weir-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[test]
fn admin_endpoints_dump_the_state_and_report_readiness() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _server = Server::start(&b, 8080, "echo")?;
    let mut options = AgentOptions::enroll(&["a", "b"]);
    options.policies = vec!["{name: no-ssh, namespace: test, action: DENY, groups: [{rules: [{matches: [{destination_ports: [22]}]}]}]}".into()];
    node.start_agent(&options)?;
    assert!(podtool::send(&a, &format!("{}:8080", b.ip), 64)?.intact);

    let (status, _) = node.http_get(15021, "/healthz/ready")?;
    assert_eq!(status, 200);
    let (status, body) = node.http_get(15000, "/config_dump")?;
    assert_eq!(status, 200, "{body}");
    let dump: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(dump["versions"]["policies"], "1", "{dump:#}");
    let pods = dump["pods"].as_array().expect("pods");
    assert_eq!(pods.len(), 2, "{dump:#}");
    assert_eq!(pods[0]["identity"], "spiffe://cluster.local/ns/test/sa/a");
    assert_eq!(dump["policies"][0]["name"], "no-ssh");
    // b's certificate is fetched ahead of its first connection, in the
    // background (a's same-node connection to it needs none): it shows
    // once fetched.
    weir_tests::wait_for(
        "b's certificate in /config_dump",
        std::time::Duration::from_secs(10),
        || {
            let (_, body) = node.http_get(15000, "/config_dump").ok()?;
            let dump: serde_json::Value = serde_json::from_str(&body).ok()?;
            dump["certificates"]
                .as_array()?
                .iter()
                .any(|c| c["identity"] == "spiffe://cluster.local/ns/test/sa/b")
                .then_some(())
        },
    )?;

    // A reload bumps the version; a broken edit is refused, named, and the
    // last good state keeps serving.
    options.policies.clear();
    node.reconfigure_agent(&options)?;
    let (_, body) = node.http_get(15000, "/config_dump")?;
    let dump: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(dump["versions"]["policies"], "2");
    assert_eq!(dump["policies"].as_array().map(Vec::len), Some(0));

    let good = node.config_yaml(&options);
    node.write_agent_config(&good.replace(
        "pods:",
        "pods:\n  - {name: x, netns: relative, ip: 10.0.0.9}\n  # broken",
    ))?;
    node.wait_for_log(
        "config rejected; keeping the last good one",
        1,
        std::time::Duration::from_secs(5),
    )?;
    let rejected = node.log_lines(&["config rejected"]);
    assert!(
        rejected[0].contains("pods[0]") && rejected[0].contains("absolute"),
        "{rejected:?}"
    );
    node.write_agent_config(&good.replace("capture:", "capture:\n  acelerate: true"))?;
    node.wait_for_log(
        "config rejected; keeping the last good one",
        2,
        std::time::Duration::from_secs(5),
    )?;
    let rejected = node.log_lines(&["config rejected"]);
    assert!(
        rejected[1].contains("acelerate") && rejected[1].contains("line"),
        "{rejected:?}"
    );
    assert!(podtool::send(&a, &format!("{}:8080", b.ip), 64)?.intact);
    let (_, body) = node.http_get(15000, "/config_dump")?;
    let dump: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(dump["versions"]["policies"], "2");
    assert_eq!(dump["pods"].as_array().map(Vec::len), Some(2));

    // /certs, /stats, and the log level changed at run time.
    let (_, certs) = node.http_get(15000, "/certs")?;
    assert!(
        certs.contains("spiffe://cluster.local/ns/test/sa/a"),
        "{certs}"
    );
    let (_, stats) = node.http_get(15000, "/stats")?;
    let stats: serde_json::Value = serde_json::from_str(&stats)?;
    assert!(stats["outbound_connections"].as_u64() >= Some(2), "{stats}");
    assert!(
        stats["ebpf"]["connect_captured"].as_u64() >= Some(2),
        "{stats}"
    );
    let (status, _) = node.http_get(15000, "/logging?level=debug")?;
    assert_eq!(status, 200);
    let (_, level) = node.http_get(15000, "/logging")?;
    assert!(level.contains("debug"), "{level}");
    node.wait_for_log("log filter changed", 1, std::time::Duration::from_secs(5))?;
    let (status, _) = node.http_get(15000, "/logging?level=not%20a%20level[")?;
    assert_eq!(status, 400);
    Ok(())
}

/// What a pod (or any host on the network) reaches of the agent: metrics on
/// 15020 and readiness on 15021, nothing else; the state, certificates,
/// `/logging` and the flow stream only on the node's loopback port 15000.
#[test]
fn the_ports_open_to_the_network_serve_only_metrics_and_readiness() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    node.start_agent(&AgentOptions::default())?;
    let agent = format!("10.77.{}.1", node.index);
    // Debian's curl in pod a: the status, or an error for a refused port.
    let status = |port: u16, path: &str| -> anyhow::Result<String> {
        let output = a
            .command("/usr/bin/curl")?
            .args(["-sS", "--noproxy", "*", "--max-time", "5"])
            .args(["-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://{agent}:{port}{path}"))
            .output()?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    assert_eq!(status(15020, "/metrics")?, "200");
    assert_eq!(status(15020, "/stats/prometheus")?, "200");
    assert_eq!(status(15021, "/healthz/ready")?, "200");
    for port in [15020, 15021] {
        for path in [
            "/config_dump",
            "/certs",
            "/stats",
            "/logging?level=off",
            "/trace?recent=true",
        ] {
            assert_eq!(status(port, path)?, "404", ":{port}{path}");
        }
    }
    // The loopback admin port is not reachable from the pod at all.
    assert_eq!(status(15000, "/config_dump")?, "000");
    // The admin port still serves them on the node itself.
    for path in ["/certs", "/stats", "/config_dump"] {
        let (code, body) = node.http_get(15000, path)?;
        assert_eq!(code, 200, "{path}: {body}");
    }
    Ok(())
}

/// The same boundary seen from another node: over the wire between two
/// nodes, node 1's agent answers metrics and readiness and nothing else,
/// and its admin port is not reachable at all.
#[test]
fn another_node_reaches_only_metrics_and_readiness() -> anyhow::Result<()> {
    let mut node1 = TestNode::with_index(1)?;
    let node2 = TestNode::with_index(2)?;
    weir_tests::connect_nodes(&node1, &node2)?;
    node1.start_agent(&AgentOptions::default())?;
    // From node 2's own namespace to node 1's address on the wire.
    let status = |port: u16, path: &str| -> anyhow::Result<String> {
        let mut curl = weir_tests::node::NsCommand::new(
            Path::new("/usr/bin/curl"),
            &node2.netns_path(),
            None,
        )?
        .args(["-sS", "--noproxy", "*", "--max-time", "5"])
        .args(["-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://192.168.77.1:{port}{path}"));
        curl.command.stdout(std::process::Stdio::piped());
        let output = curl.command.output()?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    assert_eq!(status(15020, "/metrics")?, "200");
    assert_eq!(status(15021, "/healthz/ready")?, "200");
    for port in [15020, 15021] {
        for path in ["/config_dump", "/certs", "/logging?level=off"] {
            assert_eq!(status(port, path)?, "404", ":{port}{path}");
        }
    }
    assert_eq!(status(15000, "/config_dump")?, "000");
    Ok(())
}
