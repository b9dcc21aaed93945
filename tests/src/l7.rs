//! The L7 test harness: pods a (the client), b1 and b2 on one node, an
//! `httptool serve` on port 8080 of b1 ("v1") and of b2 ("v2"), and the
//! agent configured with Envoy `RouteConfiguration`/`Cluster` resources for
//! the service web.test (VIP [`VIP`], port 80 → 8080, port 90 → 9000).
//! Used by tests/l7.rs and tests/l7_conformance.rs; [`mesh_with_xds`] adds a
//! test control plane.
use std::time::Duration;

use serde_json::{Value, json};

use crate::{
    AgentOptions, TestNode,
    http::{self, HttpServer},
    wait_for,
    xds_server::XdsServer,
};

/// The VIP of web.test (backed by b1 and b2).
pub const VIP: &str = "10.96.7.1";
/// web.test's IPv6 VIP.
pub const VIP6: &str = "fd00:96::7:1";
/// h1.test: port 80 declared `http` (→ 8081 on b1), no route
/// configuration; dual stack. Its server is the test's to start.
pub const H1_VIP: &str = "10.96.7.4";
pub const H1_VIP6: &str = "fd00:96::7:4";
/// web.test's `namespace/hostname`.
pub const SERVICE: &str = "test/web.test";
/// A service whose port is declared gRPC (`app_protocol: grpc`).
pub const GRPC_VIP: &str = "10.96.7.2";
/// A service declared by port names alone (Istio's convention): port 80 is
/// `http-web`, port 90 `tcp-raw`; no route configuration.
pub const NAMED_VIP: &str = "10.96.7.3";

/// A running node with the agent, the client pod(s) and both servers.
pub struct Mesh {
    pub node: TestNode,
    /// The server in b1, answering as backend "v1".
    pub v1: HttpServer,
    /// The server in b2, answering as backend "v2".
    pub v2: HttpServer,
    /// The control plane, for meshes made by [`mesh_with_xds`].
    pub xds: Option<XdsServer>,
}

impl Mesh {
    /// `http://VIP<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{VIP}{path}")
    }

    /// `httptool get` in pod a with `args`: its JSON lines.
    pub fn get(&self, args: &[&str]) -> anyhow::Result<Vec<Value>> {
        http::get(self.node.pod("a"), args)
    }

    /// Pushes a workload `other/<name>` at `ip`, backing no service, from
    /// the control plane ([`mesh_with_xds`]), and waits until the agent's
    /// mesh lists it (`/config_dump`'s workloads): the push has been
    /// applied, with the mesh view rebuilt around it.
    pub fn push_unrelated_workload(&mut self, name: &str, ip: [u8; 4]) -> anyhow::Result<()> {
        use prost::Message as _;
        use weir_agent::xds::{ADDRESS_TYPE, proto::istio::workload};
        let xds = self
            .xds
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("this mesh has no control plane"))?;
        let uid = format!("Kubernetes//Pod/other/{name}");
        let resource = workload::Address {
            r#type: Some(workload::address::Type::Workload(workload::Workload {
                uid: uid.clone(),
                name: name.into(),
                namespace: "other".into(),
                addresses: vec![ip.to_vec()],
                tunnel_protocol: workload::TunnelProtocol::Hbone as i32,
                service_account: name.into(),
                ..Default::default()
            })),
        }
        .encode_to_vec();
        xds.push(ADDRESS_TYPE, &uid, resource);
        let id = format!("other/{name}");
        wait_for(
            &format!("workload {id} in the mesh"),
            Duration::from_secs(10),
            || {
                let (_, dump) = self.node.http_get(15000, "/config_dump").ok()?;
                let dump: Value = serde_json::from_str(&dump).ok()?;
                dump["workloads"]
                    .as_array()?
                    .iter()
                    .any(|workload| workload["id"] == id.as_str())
                    .then_some(())
            },
        )
    }

    /// One request; its response line.
    pub fn get_one(&self, path: &str, extra: &[&str]) -> anyhow::Result<Value> {
        let url = self.url(path);
        let mut args = vec!["--url", url.as_str()];
        args.extend_from_slice(extra);
        let lines = self.get(&args)?;
        lines
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no response line for {path}"))
    }
}

/// An Envoy `Cluster` named `name` with static endpoints `addresses`
/// (each `ip:port` or `[ip6]:port`), plus the top-level fields of `extra` (an object, e.g.
/// `{"lb_policy": "RING_HASH"}`).
pub fn static_cluster(name: &str, addresses: &[String], extra: Value) -> Value {
    let lb_endpoints: Vec<Value> = addresses
        .iter()
        .map(|address| {
            let (ip, port) = address.rsplit_once(':').expect("ip:port");
            // `[v6]:port`: Envoy's address is the bare IP.
            let ip = ip.trim_start_matches('[').trim_end_matches(']');
            json!({"endpoint": {"address": {"socket_address": {
                "address": ip, "port_value": port.parse::<u32>().expect("port")}}}})
        })
        .collect();
    let mut cluster = json!({
        "name": name,
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": lb_endpoints}]},
    });
    if let (Some(cluster), Some(extra)) = (cluster.as_object_mut(), extra.as_object()) {
        for (key, value) in extra {
            cluster.insert(key.clone(), value.clone());
        }
    }
    cluster
}

/// Pods a, b1, b2 on one node, servers on b1 and b2, the agent configured
/// with `routes` (for web.test) and the clusters v1, v2 and those that
/// `clusters` makes from the node (whose pod addresses it needs).
pub fn mesh(
    routes: Vec<Value>,
    clusters: impl FnOnce(&TestNode) -> Vec<Value>,
) -> anyhow::Result<Mesh> {
    mesh_with(routes, clusters, "")
}

/// [`mesh`] with more top-level YAML for the agent.
pub fn mesh_with(
    routes: Vec<Value>,
    clusters: impl FnOnce(&TestNode) -> Vec<Value>,
    extra: &str,
) -> anyhow::Result<Mesh> {
    mesh_with_clients(routes, clusters, extra, &[])
}

/// [`mesh_with`] with more enrolled client pods besides a (`more_clients`,
/// labelled `{app: client}`), e.g. to tell clients apart by source address.
pub fn mesh_with_clients(
    routes: Vec<Value>,
    clusters: impl FnOnce(&TestNode) -> Vec<Value>,
    extra: &str,
    more_clients: &[&str],
) -> anyhow::Result<Mesh> {
    build(
        Layout {
            routes,
            extra,
            more_clients,
            ..Layout::default()
        },
        clusters,
    )
}

/// [`mesh`] whose routing also has `more` (the file's `routing:` keys, e.g.
/// `endpoints`) and whose virtual host has the fields of `virtual_host`;
/// with a control plane if `with_xds` (see [`mesh_with_xds`]).
pub fn mesh_with_routing(
    routes: Vec<Value>,
    clusters: impl FnOnce(&TestNode) -> Vec<Value>,
    virtual_host: Value,
    more: impl FnOnce(&TestNode) -> Value,
    with_xds: bool,
) -> anyhow::Result<Mesh> {
    let mut mesh = build(
        Layout {
            routes,
            virtual_host,
            more_routing: Some(Box::new(more)),
            with_xds,
            ..Layout::default()
        },
        clusters,
    )?;
    if with_xds {
        settle(&mut mesh)?;
    }
    Ok(mesh)
}

/// [`mesh`] whose agent also follows a test control plane ([`Mesh::xds`],
/// serving nothing at first), to push resources while traffic runs.
/// Returns once the agent has applied the first state of all four types
/// (each one rebuilds the mesh view), so that later pushes are the test's.
pub fn mesh_with_xds(
    routes: Vec<Value>,
    clusters: impl FnOnce(&TestNode) -> Vec<Value>,
) -> anyhow::Result<Mesh> {
    let mut mesh = build(
        Layout {
            routes,
            with_xds: true,
            ..Layout::default()
        },
        clusters,
    )?;
    settle(&mut mesh)?;
    Ok(mesh)
}

/// Waits until the agent has applied the control plane's first state.
fn settle(mesh: &mut Mesh) -> anyhow::Result<()> {
    // Addresses (workloads and services), authorization, route
    // configurations and clusters (EDS is subscribed by name, later).
    mesh.node.wait_for_log(
        "xDS ACK",
        weir_agent::xds::WILDCARD_TYPES.len(),
        Duration::from_secs(10),
    )?;
    // Updates apply in order: once this one shows, the first ones have.
    mesh.push_unrelated_workload("settled", [10, 99, 0, 1])
}

/// More `routing:` keys, made from the node (its pods' addresses).
type MoreRouting<'a> = Box<dyn FnOnce(&TestNode) -> Value + 'a>;

/// What [`build`] makes.
#[derive(Default)]
struct Layout<'a> {
    routes: Vec<Value>,
    /// More fields of the virtual host.
    virtual_host: Value,
    /// More keys of `routing:`, made from the node.
    more_routing: Option<MoreRouting<'a>>,
    /// More top-level YAML for the agent.
    extra: &'a str,
    more_clients: &'a [&'a str],
    with_xds: bool,
}

fn build(
    layout: Layout<'_>,
    clusters: impl FnOnce(&TestNode) -> Vec<Value>,
) -> anyhow::Result<Mesh> {
    let Layout {
        routes,
        virtual_host,
        more_routing,
        extra,
        more_clients,
        with_xds,
    } = layout;
    let mut node = TestNode::new()?;
    node.add_pod("a")?;
    node.add_pod("b1")?;
    node.add_pod("b2")?;
    for client in more_clients {
        node.add_pod(client)?;
    }
    let v1 = HttpServer::start(node.pod("b1"), 8080, "v1")?;
    let v2 = HttpServer::start(node.pod("b2"), 8080, "v2")?;
    let b1 = format!("{}:8080", node.pod("b1").ip);
    let b2 = format!("{}:8080", node.pod("b2").ip);
    let mut all_clusters = vec![
        static_cluster("v1", &[b1], json!({})),
        static_cluster("v2", &[b2], json!({})),
    ];
    all_clusters.extend(clusters(&node));
    let mut vhost = json!({"name": "web", "domains": ["*"], "routes": routes});
    if let (Some(vhost), Some(more)) = (vhost.as_object_mut(), virtual_host.as_object()) {
        vhost.extend(more.clone());
    }
    let mut routing = json!({
        "route_configs": [{"name": "web.test", "virtual_hosts": [vhost]}],
        "clusters": all_clusters,
    });
    if let (Some(routing), Some(more)) = (
        routing.as_object_mut(),
        more_routing
            .map(|more| more(&node))
            .as_ref()
            .and_then(Value::as_object),
    ) {
        routing.extend(more.clone());
    }
    let mut enrolled = vec!["a", "b1", "b2"];
    enrolled.extend_from_slice(more_clients);
    let mut labels = vec![
        ("a".into(), "{app: client, version: v0}".into()),
        ("b1".into(), "{app: web, version: v1}".into()),
        ("b2".into(), "{app: web, version: v2}".into()),
    ];
    labels.extend(
        more_clients
            .iter()
            .map(|client| ((*client).to_owned(), "{app: client}".to_owned())),
    );
    let xds = if with_xds {
        Some(XdsServer::start(&node.netns_path(), &node.dir.join("xds"))?)
    } else {
        None
    };
    node.start_agent(&AgentOptions {
        xds: xds.as_ref().map(|xds| xds.endpoint.clone()),
        services: vec![
            format!(
                "{{namespace: test, hostname: web.test, vips: [{VIP}, \"{VIP6}\"], ports: [{{service_port: 80, target_port: 8080}}, {{service_port: 90, target_port: 9000}}]}}"
            ),
            format!(
                "{{namespace: test, hostname: h1.test, vips: [{H1_VIP}, \"{H1_VIP6}\"], ports: [{{service_port: 80, target_port: 8081, app_protocol: http}}]}}"
            ),
            // Declared gRPC, no route configuration.
            format!(
                "{{namespace: test, hostname: grpc.test, vips: [{GRPC_VIP}], ports: [{{service_port: 80, target_port: 8080, app_protocol: grpc}}]}}"
            ),
            format!(
                "{{namespace: test, hostname: named.test, vips: [{NAMED_VIP}], ports: [{{service_port: 80, target_port: 8080, name: http-web}}, {{service_port: 90, target_port: 8080, name: tcp-raw}}]}}"
            ),
        ],
        backs: vec![
            ("b1".into(), SERVICE.into()),
            ("b2".into(), SERVICE.into()),
            ("b1".into(), "test/grpc.test".into()),
            ("b2".into(), "test/grpc.test".into()),
            ("b1".into(), "test/named.test".into()),
            ("b2".into(), "test/named.test".into()),
            ("b1".into(), "test/h1.test".into()),
        ],
        extra_config: format!("routing: {routing}\n{extra}"),
        labels,
        ..AgentOptions::enroll(&enrolled)
    })?;
    Ok(Mesh { node, v1, v2, xds })
}

/// A response line's status (0 for a transport error).
pub fn status(line: &Value) -> u64 {
    line["status"].as_u64().unwrap_or(0)
}

/// A response line's header `name` (lowercase), or "".
pub fn header<'a>(line: &'a Value, name: &str) -> &'a str {
    line["headers"][name].as_str().unwrap_or("")
}

/// Which server answered (its `x-backend`), or "" for the proxy itself.
pub fn backend(line: &Value) -> &str {
    header(line, "x-backend")
}

/// How many responses of a `get` summary came from backend `name`.
pub fn by_backend(summary: &Value, name: &str) -> u64 {
    summary["by_backend"][name].as_u64().unwrap_or(0)
}
