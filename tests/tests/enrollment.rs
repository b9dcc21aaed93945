//! Enrollment changes a pod's kernel state (a tcx classifier, rules,
//! sysctls); release puts back what it changed, and only that, whichever
//! agent of the instance releases the pod.
use std::{path::Path, time::Duration};

use weir_tests::{AgentOptions, Pod, Server, TestNode, node::NsCommand, podtool};

const SYSCTLS: [&str; 4] = [
    "net/ipv4/tcp_fwmark_accept",
    "net/ipv4/fwmark_reflect",
    "net/ipv4/tcp_migrate_req",
    "net/ipv6/fwmark_reflect",
];

/// The pod's values of [`SYSCTLS`], read inside its namespace.
fn sysctls(pod: &Pod) -> anyhow::Result<Vec<String>> {
    let paths: Vec<String> = SYSCTLS.iter().map(|s| format!("/proc/sys/{s}")).collect();
    let output = NsCommand::new(Path::new("/bin/cat"), &pod.netns_path(), None)?
        .args(&paths)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "reading sysctls in {}: {}",
        pod.name,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

fn set_sysctl(pod: &Pod, sysctl: &str, value: &str) -> anyhow::Result<()> {
    let output = NsCommand::new(Path::new("/bin/sh"), &pod.netns_path(), None)?
        .args(["-c", &format!("echo {value} > /proc/sys/{sysctl}")])
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "{sysctl}={value} in {}: {}",
        pod.name,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

fn tc(pod: &Pod, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["-n", pod.netns.as_str()];
    all.extend_from_slice(args);
    weir_tests::node::run("tc", &all)
}

fn ip(pod: &Pod, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["-n", pod.netns.as_str()];
    all.extend_from_slice(args);
    weir_tests::node::run("ip", &all)
}

fn has_clsact(pod: &Pod) -> anyhow::Result<bool> {
    Ok(tc(pod, &["qdisc", "show", "dev", "eth0"])?.contains("clsact"))
}

/// The inbound classifiers `node`'s agent has pinned (one tcx link per
/// enrolled pod, by its namespace cookie), each checked to be a live link.
fn classifiers(node: &TestNode) -> anyhow::Result<usize> {
    let dir = node.pin_dir().join("links/tc");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(0);
    };
    let mut count = 0;
    for entry in entries {
        let path = entry?.path();
        let link = weir_tests::node::run(
            "bpftool",
            &["link", "show", "pinned", &path.to_string_lossy()],
        )?;
        anyhow::ensure!(link.contains(" prog "), "{}: {link}", path.display());
        count += 1;
    }
    Ok(count)
}

#[test]
fn release_by_a_successor_restores_sysctls_and_detaches_the_classifier() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    // A non-default value Weir also sets: release must put back what was
    // there, not the kernel's default.
    set_sysctl(&a, "net/ipv4/fwmark_reflect", "1")?;
    let before = sysctls(&a)?;
    assert_eq!(before, ["0", "1", "0", "0"], "{SYSCTLS:?}");
    assert!(!has_clsact(&a)?);

    node.start_agent(&AgentOptions::enroll(&["a"]))?;
    assert_eq!(
        sysctls(&a)?,
        ["1", "1", "1", "1"],
        "enrollment sets {SYSCTLS:?}"
    );
    assert_eq!(classifiers(&node)?, 1);
    // tcx needs no qdisc: none is added.
    assert!(!has_clsact(&a)?);
    // The steered packets' rule and local route, in both families.
    for family in ["-4", "-6"] {
        let rules = ip(&a, &[family, "rule", "show"])?;
        assert!(
            rules.contains("fwmark 0x53a lookup 1539"),
            "{family}: {rules}"
        );
        let routes = ip(&a, &[family, "route", "show", "table", "1539"])?;
        assert!(
            routes.contains("local default dev lo"),
            "{family}: {routes}"
        );
    }

    // A successor adopts the pod and sees it changed already; it must still
    // restore the values from before the first enrollment.
    node.start_successor()?;
    weir_tests::wait_for(
        "the first agent handing over",
        Duration::from_secs(10),
        || {
            node.previous_agent_log()
                .contains("handing over")
                .then_some(())
        },
    )?;
    node.signal_previous_agent()?;
    node.wait_previous_agent(Duration::from_secs(30))?;
    assert_eq!(sysctls(&a)?, ["1", "1", "1", "1"]);
    assert_eq!(
        classifiers(&node)?,
        1,
        "the predecessor left the pod to its successor"
    );

    node.reconfigure_agent(&AgentOptions::default())?;
    node.wait_for_log("pod released", 1, Duration::from_secs(10))?;
    assert_eq!(sysctls(&a)?, before, "{SYSCTLS:?} after release");
    assert_eq!(classifiers(&node)?, 0);
    for family in ["-4", "-6"] {
        let rules = ip(&a, &[family, "rule", "show"])?;
        assert!(!rules.contains("0x53a"), "{family}: {rules}");
        let routes = ip(&a, &[family, "route", "show", "table", "all"])?;
        assert!(!routes.contains("table 1539"), "{family}: {routes}");
    }
    Ok(())
}

#[test]
fn release_leaves_a_clsact_qdisc_that_was_there_before_with_its_filters() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    // A CNI's qdisc and filter (classic BPF that classifies nothing).
    weir_tests::cni::add_clsact_filter(&a)?;
    let foreign = tc(&a, &["filter", "show", "dev", "eth0", "ingress"])?;
    assert!(foreign.contains("pref 7 bpf"), "{foreign}");

    node.start_agent(&AgentOptions::enroll(&["a"]))?;
    let enrolled = tc(&a, &["filter", "show", "dev", "eth0", "ingress"])?;
    assert_eq!(enrolled, foreign, "Weir's classifier is a tcx link");
    assert_eq!(classifiers(&node)?, 1);
    assert_eq!(sysctls(&a)?, ["1", "1", "1", "1"]);

    // Stopping the agent releases every pod.
    node.stop_agent()?;
    assert!(has_clsact(&a)?, "the CNI's qdisc was removed");
    let after = tc(&a, &["filter", "show", "dev", "eth0", "ingress"])?;
    assert_eq!(after, foreign, "the filters other than Weir's changed");
    assert_eq!(sysctls(&a)?, ["0", "0", "0", "0"]);
    Ok(())
}

/// A predecessor stopped before its reload tick noticed the successor (a
/// DaemonSet update that kills the old pod at once) must still leave the
/// pods and pins to it: its SIGTERM path checks who owns the pins.
#[test]
fn a_predecessor_stopped_before_it_noticed_its_successor_leaves_it_the_pods() -> anyhow::Result<()>
{
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _server = weir_tests::Server::start(&b, 8080, "echo")?;
    // The first agent looks at its pins once a minute: it cannot have
    // noticed the successor by its tick when it gets SIGTERM.
    node.start_agent(&AgentOptions {
        reload_interval_ms: Some(60_000),
        ..AgentOptions::enroll(&["a", "b"])
    })?;
    node.start_successor()?;
    node.signal_previous_agent()?;
    node.wait_previous_agent(Duration::from_secs(30))?;
    let log = node.previous_agent_log();
    assert!(log.contains("handing over"), "{log}");
    assert!(!log.contains("pod released"), "{log}");
    assert!(node.pin_dir().exists(), "the successor's pins were removed");
    let report = weir_tests::podtool::send(&a, &format!("{}:8080", b.ip), 4096)?;
    assert!(report.intact && report.captured(), "{report:?}");
    Ok(())
}

/// Enrollment's route, rule and qdisc changes, and their removal, are
/// netlink requests: an agent with no iproute2 on its `PATH` enrolls pods
/// (with the rule and route `ip` would have added) and releases them
/// without a trace.
#[test]
fn enrollment_and_release_need_no_iproute2() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _server = Server::start(&b, 8080, "echo")?;
    let empty = node.dir.join("empty-bin");
    std::fs::create_dir_all(&empty)?;
    node.start_agent(&AgentOptions {
        agent_env: vec![("PATH".into(), empty.display().to_string())],
        ..AgentOptions::enroll(&["a", "b"])
    })?;
    let enrolled = node.log_lines(&["pod enrolled"]);
    assert_eq!(enrolled.len(), 2, "{}", node.agent_log());
    assert_eq!(classifiers(&node)?, 2);
    for pod in [&a, &b] {
        let rules = ip(pod, &["rule", "show", "pref", "1539"])?;
        assert!(
            rules.contains("from all fwmark 0x53a lookup 1539"),
            "{}: {rules}",
            pod.name
        );
        let routes = ip(pod, &["route", "show", "table", "1539"])?;
        assert_eq!(
            routes.trim(),
            "local default dev lo scope host",
            "{}",
            pod.name
        );
        assert_eq!(sysctls(pod)?, ["1", "1", "1", "1"], "{}", pod.name);
    }
    // The routing works: a's connect is captured and b's replies find
    // their way back through the local route.
    let report = podtool::send(&a, &format!("{}:8080", b.ip), 4096)?;
    assert!(report.intact && report.captured(), "{report:?}");

    let status = node.stop_agent()?;
    assert!(status.success(), "agent exit status {status:?}");
    assert_eq!(node.log_lines(&["pod released"]).len(), 2);
    assert_eq!(classifiers(&node)?, 0);
    for pod in [&a, &b] {
        let rules = ip(pod, &["rule", "show"])?;
        assert!(!rules.contains("0x53a"), "{}: {rules}", pod.name);
        let routes = ip(pod, &["route", "show", "table", "all"])?;
        assert!(!routes.contains("table 1539"), "{}: {routes}", pod.name);
        assert!(!has_clsact(pod)?, "{}", pod.name);
        assert_eq!(sysctls(pod)?, ["0", "0", "0", "0"], "{}", pod.name);
    }
    Ok(())
}
