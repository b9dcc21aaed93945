//! DNS capture: an enrolled pod's queries to port 53 go to the agent,
//! which answers the services it knows and forwards the rest to the
//! resolver the pod asked, from the pod's own address.
//!
//! The resolver is dnsmasq in pod r, which knows example.test and also has
//! its own (wrong) addresses for the service names, so an answer shows who
//! gave it. The clients are real: glibc's `getaddrinfo` (`getent ahosts`,
//! with a pod's `resolv.conf`: search domains, ndots:5), dig over UDP and
//! TCP, and an unconnected UDP socket (`podtool dns`). Pod c opts out.
//! With the resolver asked over IPv4 and over IPv6.
use weir_tests::{AgentOptions, Family, TestNode, dns, metric_sample, trace};

const VIP: &str = "10.96.53.1";
const VIP6: &str = "fd00:96::53:1";
const EXTERNAL_VIP: &str = "240.240.53.1";

/// The resolver's own records: example.test, and addresses of its own for
/// the names the node should answer.
const HOSTS: &str = "192.0.2.7 example.test\n2001:db8::7 example.test\n192.0.2.99 web.test.svc.cluster.local\n2001:db8::99 web.test.svc.cluster.local\n192.0.2.98 api.example.test\n";

fn output(output: std::process::Output) -> String {
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return format!(
            "{text}\n(exit {:?}: {})",
            output.status.code(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    text
}

fn dns_capture(family: Family) -> anyhow::Result<()> {
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let c = node.add_pod("c")?;
    let r = node.add_pod("r")?;
    let b = node.add_pod("b")?;
    let dir = node.dir.join("dns");
    let resolver = dns::Resolver::start(&r, &dir, HOSTS)?;
    node.start_agent(&AgentOptions {
        services: vec![
            format!(
                "{{namespace: test, hostname: web.test.svc.cluster.local, vips: [{VIP}, \"{VIP6}\"], ports: [{{service_port: 80, target_port: 8080}}]}}"
            ),
            format!(
                "{{namespace: test, hostname: api.example.test, vips: [{EXTERNAL_VIP}], ports: [{{service_port: 443, target_port: 443}}]}}"
            ),
        ],
        backs: vec![("b".into(), "test/web.test.svc.cluster.local".into())],
        dns_off: vec!["c".into()],
        labels: vec![("a".into(), "{app: client, version: v1}".into())],
        ..AgentOptions::enroll(&["a", "b", "c"])
    })?;
    let nameserver = r.ip_of(family);
    let server = r.addr(family, 53);

    // glibc's getaddrinfo: the short name through the search domains (the
    // first one asked, web.test.test.svc.cluster.local, gets a CNAME to the
    // service), A and AAAA on one socket.
    let web = output(dns::with_nameserver(
        &a,
        &dir,
        nameserver,
        "getent",
        &["ahosts", "web"],
    )?);
    assert!(
        web.contains(VIP) && web.contains(VIP6) && !web.contains("192.0.2.99"),
        "{family}: getent ahosts web:\n{web}"
    );
    let api = output(dns::with_nameserver(
        &a,
        &dir,
        nameserver,
        "getent",
        &["ahosts", "api.example.test"],
    )?);
    assert!(
        api.contains(EXTERNAL_VIP) && !api.contains("192.0.2.98"),
        "{family}: getent ahosts api.example.test:\n{api}"
    );
    // A name the node does not know: the pod's resolver answers, asked
    // from the pod's own address.
    let example = output(dns::with_nameserver(
        &a,
        &dir,
        nameserver,
        "getent",
        &["ahosts", "example.test"],
    )?);
    assert!(
        example.contains("192.0.2.7") && example.contains("2001:db8::7"),
        "{family}: getent ahosts example.test:\n{example}"
    );
    let queries = resolver.queries();
    assert!(
        queries.contains(&format!("query[A] example.test from {}", a.ip_of(family))),
        "{family}: the resolver did not see a's own address:\n{queries}"
    );
    assert!(
        !queries.contains("web.test") && !queries.contains("api.example.test"),
        "{family}: the node's names reached the resolver:\n{queries}"
    );

    // dig: connected UDP, then TCP (through the outbound listener).
    for transport in ["+notcp", "+tcp"] {
        let at = format!("@{}", r.ip_of(family));
        let dig = |name: &str, kind: &str| -> anyhow::Result<String> {
            Ok(output(
                a.command("dig")?
                    .args([&at, name, kind, transport, "+short", "+tries=1", "+time=3"])
                    .output()?,
            ))
        };
        assert_eq!(
            dig("web.test.svc.cluster.local", "A")?.trim(),
            VIP,
            "{family} {transport}"
        );
        assert_eq!(
            dig("web.test.svc.cluster.local", "AAAA")?.trim(),
            VIP6,
            "{family} {transport}"
        );
        assert_eq!(
            dig("example.test", "A")?.trim(),
            "192.0.2.7",
            "{family} {transport}"
        );
    }

    // An unconnected socket (sendto/recvfrom): the reply comes from the
    // resolver's address.
    for (name, expected) in [
        ("web.test.svc.cluster.local", VIP),
        ("example.test", "192.0.2.7"),
    ] {
        let out = output(
            a.podtool()?
                .args(["dns", "--to", &server, "--name", name])
                .output()?,
        );
        let report: serde_json::Value = serde_json::from_str(out.trim())
            .map_err(|error| anyhow::anyhow!("{family}: podtool dns {name}: {error}: {out}"))?;
        assert_eq!(report["from"], server.as_str(), "{family} {name}: {report}");
        assert_eq!(report["id_matches"], true, "{report}");
        assert_eq!(
            report["addresses"],
            serde_json::json!([expected]),
            "{family} {name}: {report}"
        );
    }

    // c opted out: the resolver's own answer.
    let opted_out = output(
        c.command("dig")?
            .args([
                &format!("@{}", r.ip_of(family)),
                "web.test.svc.cluster.local",
                "A",
                "+short",
                "+tries=1",
                "+time=3",
            ])
            .output()?,
    );
    assert_eq!(opted_out.trim(), "192.0.2.99", "{family}: pod c");

    // What happened, in the metrics and in `weir trace`.
    let (_, metrics) = node.http_get(15020, "/metrics")?;
    for (name, labels) in [
        (
            "weir_dns_answered_total",
            vec!["request_protocol=\"udp\"", "request_query_type=\"a\""],
        ),
        (
            "weir_dns_answered_total",
            vec!["request_protocol=\"tcp\"", "request_query_type=\"aaaa\""],
        ),
        (
            "istio_dns_upstream_requests_total",
            vec!["request_protocol=\"udp\""],
        ),
        (
            "istio_dns_upstream_requests_total",
            vec!["request_protocol=\"tcp\""],
        ),
        (
            "istio_dns_requests_total",
            vec![
                "source_canonical_service=\"client\"",
                "source_canonical_revision=\"v1\"",
            ],
        ),
        (
            "weir_ebpf_events_total",
            vec!["counter=\"dns_reply_rewritten\""],
        ),
    ] {
        let value = metric_sample(&metrics, name, &labels).unwrap_or(0.0);
        assert!(value >= 1.0, "{family}: {name}{labels:?} = {value}");
    }
    let answered = trace::recent(&node, "test/a", "answered", 1)?;
    assert_eq!(answered.len(), 1, "{answered:?}");
    assert_eq!(answered[0].source, "dns");
    assert_eq!(answered[0].port, 53);
    let forwarded = trace::recent(&node, "test/a", "forwarded", 1)?;
    assert_eq!(forwarded.len(), 1, "{forwarded:?}");
    assert_eq!(forwarded[0].peer, server, "{forwarded:?}");
    drop(b);
    Ok(())
}

#[test]
fn dns_is_answered_by_the_node_for_its_services_and_forwarded_otherwise_over_ipv4()
-> anyhow::Result<()> {
    dns_capture(Family::V4)
}

#[test]
fn dns_is_answered_by_the_node_for_its_services_and_forwarded_otherwise_over_ipv6()
-> anyhow::Result<()> {
    dns_capture(Family::V6)
}
