//! Weir next to a CNI's programs on the hooks they share, with the
//! stand-ins of `weir_tests::cni`: a socket balancer attached to the cgroup
//! Weir attaches to (the pods' parent), before and after the agent starts,
//! and to a cgroup below it, whose programs the kernel runs first unless
//! told otherwise; a tcx program that passes everything on a pod's
//! interface, after Weir's classifier and ahead of it; and a program
//! attached without `BPF_F_ALLOW_MULTI`, which the preflight refuses.
//!
//! The stand-in is a socket load balancer that sends web.test's VIP to b1
//! ("v1"); Weir's service web.test has b2 ("v2") as its one endpoint. A
//! pod Weir does not capture (c) reaches v1 through the stand-in, which
//! shows it is live; an enrolled pod (a) reaches v2, which shows Weir saw
//! the VIP the application dialled, ahead of the stand-in, in whichever
//! order the two were attached. Over IPv4 and IPv6.
use std::{
    net::{SocketAddrV4, SocketAddrV6},
    path::Path,
    time::Duration,
};

use serde_json::Value;
use weir_tests::{
    AgentOptions, Family, Server, TestNode,
    cni::{ForeignLink, ForeignProgram},
    http::{self, HttpServer},
    node::NsCommand,
    podtool, prereq,
};

const VIP: &str = "10.96.9.1";
const ALLOW_A: &str = "{name: allow-a, namespace: test, action: ALLOW, groups: [{rules: [{matches: [{principals: [cluster.local/ns/test/sa/a]}]}]}]}";
const VIP6: &str = "fd00:96::9:1";

struct Node {
    node: TestNode,
    _servers: Vec<HttpServer>,
}

/// Pods a (enrolled client), c (a client Weir leaves alone), b1 "v1" and
/// b2 "v2", each server on both families; no agent yet.
fn node() -> anyhow::Result<Node> {
    let mut node = TestNode::new()?;
    for pod in ["a", "c", "b1", "b2"] {
        node.add_pod(pod)?;
    }
    let mut servers = Vec::new();
    for (pod, name) in [("b1", "v1"), ("b2", "v2")] {
        let pod = node.pod(pod);
        servers.push(HttpServer::start(pod, 8080, name)?);
        servers.push(HttpServer::start_with(
            pod,
            &pod.ip6.to_string(),
            8080,
            name,
            &[],
        )?);
    }
    Ok(Node {
        node,
        _servers: servers,
    })
}

fn start_agent(node: &mut TestNode) -> anyhow::Result<()> {
    node.start_agent(&AgentOptions {
        services: vec![format!(
            "{{namespace: test, hostname: web.test, vips: [{VIP}, \"{VIP6}\"], ports: [{{service_port: 80, target_port: 8080}}]}}"
        )],
        backs: vec![("b2".into(), "test/web.test".into())],
        ..AgentOptions::enroll(&["a", "b1", "b2"])
    })
}

/// The stand-in balancer for both VIPs, sending them to b1, attached to
/// `cgroup`.
fn attach_balancer(node: &TestNode, cgroup: &Path) -> anyhow::Result<Vec<ForeignLink>> {
    balancers(node)?
        .iter()
        .map(|program| program.attach(cgroup))
        .collect()
}

/// The stand-in balancers for both VIPs, sending them to b1; not attached.
fn balancers(node: &TestNode) -> anyhow::Result<[ForeignProgram; 2]> {
    let b1 = node.pod("b1");
    Ok([
        ForeignProgram::service_balancer4(VIP.parse()?, 80, SocketAddrV4::new(b1.ip, 8080))?,
        ForeignProgram::service_balancer6(
            VIP6.parse()?,
            80,
            SocketAddrV6::new(b1.ip6, 8080, 0, 0),
        )?,
    ])
}

/// Which servers answered 10 requests from `pod` to `vip`.
fn answered(node: &TestNode, pod: &str, vip: &str) -> anyhow::Result<Value> {
    let url = if vip.contains(':') {
        format!("http://[{vip}]/")
    } else {
        format!("http://{vip}/")
    };
    let lines = http::get(node.pod(pod), &["--url", &url, "--count", "10"])?;
    lines
        .last()
        .map(|line| line["summary"]["by_backend"].clone())
        .ok_or_else(|| anyhow::anyhow!("no summary from {pod} to {vip}"))
}

fn assert_weir_sees_the_vip(node: &TestNode) -> anyhow::Result<()> {
    for vip in [VIP, VIP6] {
        let outside = answered(node, "c", vip)?;
        assert_eq!(
            outside,
            serde_json::json!({"v1": 10}),
            "{vip}: the stand-in balancer sends pods Weir leaves alone to b1"
        );
        let captured = answered(node, "a", vip)?;
        assert_eq!(
            captured,
            serde_json::json!({"v2": 10}),
            "{vip}: Weir sends its pods to the service's endpoint\n{}",
            node.agent_log()
        );
    }
    Ok(())
}

/// A balancer attached first (as a CNI running before Weir is installed):
/// Weir's hooks still run ahead of it.
#[test]
fn weir_sees_the_vip_when_a_socket_balancer_was_attached_first() -> anyhow::Result<()> {
    let mut node = node()?;
    let _balancer = attach_balancer(&node.node, &node.node.cgroup)?;
    start_agent(&mut node.node)?;
    assert_weir_sees_the_vip(&node.node)?;
    // `weir bpf` shows the chain as the kernel runs it: Weir's first.
    let shown = weir_bpf(&node.node)?;
    for (hook, theirs) in [("connect4", "cni_sock_lb4"), ("connect6", "cni_sock_lb6")] {
        let line = shown
            .lines()
            .find(|line| line.trim_start().starts_with(&format!("{hook} ")))
            .ok_or_else(|| anyhow::anyhow!("no {hook} chain in:\n{shown}"))?;
        let ours = line.find(&format!("weir_{hook}"));
        let others = line.find(theirs);
        assert!(
            ours.is_some() && others.is_some() && ours < others && line.contains(" *"),
            "{line}"
        );
    }
    Ok(())
}

/// `weir bpf` of the node's agent.
fn weir_bpf(node: &TestNode) -> anyhow::Result<String> {
    let output = NsCommand::new(&prereq::agent_binary()?, &node.netns_path(), None)?
        .args(["bpf", "--instance", &node.id])
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "weir bpf: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A balancer attached while Weir runs (a CNI upgraded after Weir).
#[test]
fn weir_sees_the_vip_when_a_socket_balancer_is_attached_later() -> anyhow::Result<()> {
    let mut node = node()?;
    start_agent(&mut node.node)?;
    let _balancer = attach_balancer(&node.node, &node.node.cgroup)?;
    assert_weir_sees_the_vip(&node.node)
}

/// A balancer on a cgroup between Weir's and the pods' (the kernel runs a
/// child cgroup's programs before its parent's).
#[test]
fn weir_sees_the_vip_ahead_of_a_socket_balancer_closer_to_the_pods() -> anyhow::Result<()> {
    let mut node = node()?;
    start_agent(&mut node.node)?;
    let _balancer = attach_balancer(&node.node, &node.node.cgroup.join("pods"))?;
    assert_weir_sees_the_vip(&node.node)
}

/// A program put in front of Weir's on connect4/6 after the agent started
/// (preorder, before everything on Weir's own cgroup) is what Weir cannot
/// stand ahead of: it rewrites the VIP before Weir sees it, so pod a
/// reaches the balancer's choice. Weir leaves it where it is, names it in
/// its log (once) and counts it in `weir_cgroup_programs_ahead`; the count
/// goes back to 0 once it is gone.
#[test]
fn a_program_put_ahead_of_weirs_socket_hooks_is_named_and_counted() -> anyhow::Result<()> {
    let mut node = node()?;
    start_agent(&mut node.node)?;
    assert_eq!(programs_ahead(&node.node)?, 0.0);
    let programs = balancers(&node.node)?;
    let links = programs
        .iter()
        .map(|program| program.attach_ahead(&node.node.cgroup))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let needle = "programs run ahead of Weir's on a hook where it reads the destination";
    node.node.wait_for_log(needle, 2, Duration::from_secs(15))?;
    let warnings = node.node.log_lines(&[needle]).join("\n");
    assert!(
        warnings.contains("hook=connect4") && warnings.contains("cni_sock_lb4"),
        "{warnings}"
    );
    assert!(
        warnings.contains("hook=connect6") && warnings.contains("cni_sock_lb6"),
        "{warnings}"
    );
    assert_eq!(programs_ahead(&node.node)?, 2.0);
    // Why it is reported: the VIP never reaches Weir.
    assert_eq!(
        answered(&node.node, "a", VIP)?,
        serde_json::json!({"v1": 10})
    );
    drop(links);
    node.node.wait_for_log(
        "Weir's program runs first on the hook again",
        2,
        Duration::from_secs(15),
    )?;
    assert_eq!(programs_ahead(&node.node)?, 0.0);
    assert_eq!(
        answered(&node.node, "a", VIP)?,
        serde_json::json!({"v2": 10})
    );
    Ok(())
}

/// `weir_cgroup_programs_ahead` as the agent reports it now.
fn programs_ahead(node: &TestNode) -> anyhow::Result<f64> {
    let (_, text) = node.http_get(15020, "/metrics")?;
    weir_tests::metric_sample(&text, "weir_cgroup_programs_ahead", &[])
        .ok_or_else(|| anyhow::anyhow!("no weir_cgroup_programs_ahead in:\n{text}"))
}

/// A CNI's tcx program on a STRICT pod's interface that passes every
/// packet, attached before Weir enrolls the pod and after: Weir's
/// classifier runs first in the chain all the same, so a plaintext
/// connection from outside the mesh is still refused, the pod's
/// authorization policy (ALLOW sa/a only) still refuses meshed pod d, and
/// meshed pod a still arrives. Over IPv4 and IPv6.
#[test]
fn a_strict_pod_stays_closed_next_to_a_tcx_program_that_passes_everything() -> anyhow::Result<()> {
    for attached_first in [true, false] {
        let mut node = TestNode::new()?;
        let a = node.add_pod("a")?;
        let b = node.add_pod("b")?;
        let c = node.add_pod("c")?;
        let d = node.add_pod("d")?;
        let servers = [
            (
                Family::V4,
                8080,
                Server::start_family(&b, Family::V4, 8080, "echo")?,
            ),
            (
                Family::V6,
                8081,
                Server::start_family(&b, Family::V6, 8081, "echo")?,
            ),
        ];
        let pass = ForeignProgram::tcx_pass()?;
        let mut links = Vec::new();
        if attached_first {
            links.push(pass.attach_tcx(&b, "eth0")?);
        }
        node.start_agent(&AgentOptions {
            strict: vec!["b".into()],
            policies: vec![ALLOW_A.into()],
            ..AgentOptions::enroll(&["a", "b", "d"])
        })?;
        if !attached_first {
            links.push(pass.attach_tcx(&b, "eth0")?);
        }
        for (family, port, server) in &servers {
            let (family, port) = (*family, *port);
            let plaintext = podtool::send(&c, &b.addr(family, port), 1024)?;
            assert!(
                !plaintext.intact,
                "first={attached_first} {family:?}: plaintext reached a STRICT pod: {plaintext:?}"
            );
            let denied = podtool::send(&d, &b.addr(family, port), 1024)?;
            assert!(
                !denied.intact && denied.captured(),
                "first={attached_first} {family:?}: sa/d is not allowed: {denied:?}"
            );
            let meshed = podtool::send(&a, &b.addr(family, port), 1024)?;
            assert!(
                meshed.intact && meshed.captured(),
                "first={attached_first} {family:?}: {meshed:?}"
            );
            let seen = server.wait_reports(1)?;
            assert_eq!(
                seen[0].peer_ip(),
                a.ip_of(family).to_string(),
                "first={attached_first} {family:?}: {seen:?}"
            );
        }
        drop(links);
    }
    Ok(())
}

/// A tcx program another agent puts ahead of Weir's classifier after the
/// pod is enrolled (Weir never moves others' programs) is named in the
/// agent's log and counted in `weir_classifier_shadowed_pods`, and the
/// count goes back to 0 once it is gone.
#[test]
fn a_tcx_program_ahead_of_weirs_classifier_is_named_and_counted() -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let b = node.add_pod("b")?;
    node.start_agent(&AgentOptions::enroll(&["b"]))?;
    assert_eq!(shadowed_pods(&node)?, 0.0);
    let pass = ForeignProgram::tcx_pass()?;
    let link = pass.attach_tcx_first(&b, "eth0")?;
    node.wait_for_log(
        "tcx programs run ahead of Weir's inbound classifier",
        1,
        Duration::from_secs(15),
    )?;
    let warning = node
        .log_lines(&["tcx programs run ahead of Weir's inbound classifier"])
        .join("\n");
    assert!(
        warning.contains("cni_tcx_pass") && warning.contains("pod=test/b"),
        "{warning}"
    );
    assert_eq!(shadowed_pods(&node)?, 1.0);
    let shown = weir_bpf(&node)?;
    let line = shown
        .lines()
        .find(|line| line.contains("tcx ingress") && line.contains("test/b eth0"))
        .ok_or_else(|| anyhow::anyhow!("no tcx chain of test/b in:\n{shown}"))?;
    let (theirs, ours) = (line.find("cni_tcx_pass"), line.find("weir_tc_ingress"));
    assert!(
        theirs.is_some() && ours.is_some() && theirs < ours,
        "{line}"
    );
    drop(link);
    node.wait_for_log(
        "Weir's inbound classifier is first on the pod's interface again",
        1,
        Duration::from_secs(15),
    )?;
    assert_eq!(shadowed_pods(&node)?, 0.0);
    Ok(())
}

/// `weir_classifier_shadowed_pods` as the agent reports it now.
fn shadowed_pods(node: &TestNode) -> anyhow::Result<f64> {
    let (_, text) = node.http_get(15020, "/metrics")?;
    weir_tests::metric_sample(&text, "weir_classifier_shadowed_pods", &[])
        .ok_or_else(|| anyhow::anyhow!("no weir_classifier_shadowed_pods in:\n{text}"))
}

/// A program attached to the pods' parent cgroup without
/// `BPF_F_ALLOW_MULTI` (the old exclusive way) would be switched off for
/// the pods by Weir's attach, or refuse it: the agent refuses to start,
/// naming the cgroup, the program and the hook, and leaves nothing behind.
#[test]
fn an_exclusive_cgroup_program_is_named_and_weir_does_not_start() -> anyhow::Result<()> {
    let node = TestNode::new()?;
    let balancer = ForeignProgram::service_balancer4(
        VIP.parse()?,
        80,
        SocketAddrV4::new([10, 77, 0, 9].into(), 8080),
    )?;
    let _exclusive = balancer.attach_exclusive(&node.cgroup)?;
    let config = node.dir.join("agent.yaml");
    std::fs::write(&config, node.config_yaml(&AgentOptions::default()))?;
    let output = std::process::Command::new(weir_tests::prereq::agent_binary()?)
        .args(["run", "--config"])
        .arg(&config)
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    for text in [
        "without BPF_F_ALLOW_MULTI",
        "cni_sock_lb4",
        "on connect4",
        &node.cgroup.display().to_string(),
    ] {
        assert!(stderr.contains(text), "{text:?} not in {stderr}");
    }
    assert!(!node.pin_dir().exists());
    Ok(())
}

/// A CNI stand-in, attached to the node of [`node`].
#[derive(Debug, Clone, Copy)]
enum StandIn {
    /// The socket balancer for web.test's VIPs, on Weir's own cgroup.
    Balancer,
    /// A tcx program on b2's interface that passes every packet.
    TcxPass,
    /// A clsact qdisc on b2's interface with a classic BPF filter at
    /// priority 7 that classifies nothing (as `tc` would add a CNI's).
    ClsactFilter,
}

/// Attaches `stand_in`; its links (none for the clsact filter, which lives
/// with the pod's namespace).
fn attach(node: &TestNode, stand_in: StandIn) -> anyhow::Result<Vec<ForeignLink>> {
    let b2 = node.pod("b2");
    Ok(match stand_in {
        StandIn::Balancer => attach_balancer(node, &node.cgroup)?,
        StandIn::TcxPass => vec![ForeignProgram::tcx_pass()?.attach_tcx(b2, "eth0")?],
        StandIn::ClsactFilter => {
            weir_tests::cni::add_clsact_filter(b2)?;
            Vec::new()
        }
    })
}

/// Next to each stand-in, attached before the agent starts and after:
/// capture (a's connections arrive from a's address), service routing
/// (web.test's VIPs reach b2, "v2"), STRICT (plaintext from c to b2 is
/// refused) and policy (b2 allows sa/a only: meshed pod d is refused),
/// over IPv4 and IPv6.
#[test]
fn capture_strict_policy_and_service_routing_hold_next_to_each_stand_in() -> anyhow::Result<()> {
    for stand_in in [StandIn::Balancer, StandIn::TcxPass, StandIn::ClsactFilter] {
        for attached_first in [true, false] {
            let case = format!("{stand_in:?}, attached first: {attached_first}");
            let mut node = node()?;
            let d = node.node.add_pod("d")?;
            let b2 = node.node.pod("b2").clone();
            let echo4 = Server::start_family(&b2, Family::V4, 9000, "echo")?;
            let echo6 = Server::start_family(&b2, Family::V6, 9001, "echo")?;
            let mut held = Vec::new();
            if attached_first {
                held.extend(attach(&node.node, stand_in)?);
            }
            node.node.start_agent(&AgentOptions {
                services: vec![format!(
                    "{{namespace: test, hostname: web.test, vips: [{VIP}, \"{VIP6}\"], ports: [{{service_port: 80, target_port: 8080}}]}}"
                )],
                backs: vec![("b2".into(), "test/web.test".into())],
                strict: vec!["b2".into()],
                policies: vec![ALLOW_A.into()],
                ..AgentOptions::enroll(&["a", "b1", "b2", "d"])
            })?;
            if !attached_first {
                held.extend(attach(&node.node, stand_in)?);
            }
            let (a, c) = (node.node.pod("a").clone(), node.node.pod("c").clone());
            for (family, port, echo) in [(Family::V4, 9000, &echo4), (Family::V6, 9001, &echo6)] {
                let to = b2.addr(family, port);
                let meshed = podtool::send(&a, &to, 1024)?;
                assert!(
                    meshed.intact && meshed.captured(),
                    "{case} {family}: {meshed:?}"
                );
                let seen = echo.wait_reports(1)?;
                assert_eq!(
                    seen[0].peer_ip(),
                    a.ip_of(family).to_string(),
                    "{case} {family}"
                );
                let plaintext = podtool::send(&c, &to, 1024)?;
                assert!(
                    !plaintext.intact,
                    "{case} {family}: plaintext reached STRICT b2"
                );
                let denied = podtool::send(&d, &to, 1024)?;
                assert!(
                    !denied.intact && denied.captured(),
                    "{case} {family}: sa/d is not allowed: {denied:?}"
                );
            }
            for vip in [VIP, VIP6] {
                assert_eq!(
                    answered(&node.node, "a", vip)?,
                    serde_json::json!({"v2": 10}),
                    "{case}: {vip}"
                );
            }
            drop(held);
        }
    }
    Ok(())
}
