//! The node proxy: per-pod listeners created inside each pod's namespace
//! (outbound 15001, plaintext inbound 15006, HBONE 15008), and the
//! per-connection handlers: outbound relays as plaintext L4, through an HBONE
//! tunnel, by the same-node hand-off or through L7 routing (`http`); inbound
//! authorizes and delivers to the application.
pub use crate::telemetry::connection::{ConnectionLog, OpenConnection, Outcome};

pub mod accept;
pub mod established;
pub mod h2;
pub mod hbone;
pub mod http;
pub mod idle;
pub mod inbound;
pub mod limits;
pub mod metered;
pub mod outbound;
pub mod pool;
pub mod relay;
pub mod single_flight;
pub mod socket;
pub mod splice;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use crate::{
    capture::datapath::OrigDstTable,
    capture::netns::NetNs,
    security::identity::{Identity, SecretManager},
    state::Store,
};

/// How long an upstream connect may take before the client is closed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection handler needs.
pub struct ProxyContext {
    /// The node's namespace, where worker threads return after `setns`.
    pub home: NetNs,
    pub origdst: Arc<OrigDstTable>,
    pub stats: ProxyStats,
    /// Certificates of the node's workloads.
    pub secrets: Arc<SecretManager>,
    /// Which addresses belong to meshed workloads, and their identities.
    pub store: Arc<Store>,
    pub hbone: pool::HbonePool,
    /// Enrolled pods by each of their IPs, for same-node hand-off.
    pub local_pods: std::sync::RwLock<std::collections::HashMap<std::net::IpAddr, Arc<PodHandle>>>,
    /// How traffic between two meshed pods of this node travels.
    pub same_node: crate::config::SameNode,
    pub policies: crate::security::authorization::Policies,
    /// Where this node is, which services' load balancing compares
    /// endpoints with.
    pub placement: crate::state::Placement,
    /// L7 routes and clusters (xDS and the file), swapped whole.
    pub routes: Arc<crate::routing::Routes>,
    /// Upstream HTTP connections and per-cluster state.
    pub http: http::HttpState,
    /// Where what happened is reported: metrics, flow events, access
    /// log, spans.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// Inbound L4 connections, re-checked when the policies change.
    pub established: established::Established,
    /// Timeouts and connection limits of the listeners (`proxy:`).
    pub limits: limits::Limits,
}

impl ProxyContext {
    /// Counts a connection as opened; its bytes and its end go to the
    /// returned record.
    pub fn open_connection(&self, log: ConnectionLog) -> OpenConnection {
        log.open(&self.telemetry, &self.store)
    }

    /// Closes a connection's record with `outcome`.
    pub fn close_connection(&self, connection: OpenConnection, outcome: &Outcome) {
        let (sent, received) = connection.close(outcome);
        self.stats.relayed(sent, received);
    }

    pub fn local_pod(&self, ip: std::net::IpAddr) -> Option<Arc<PodHandle>> {
        let pods = self.local_pods.read().unwrap_or_else(|e| e.into_inner());
        pods.get(&ip.to_canonical()).cloned()
    }

    /// Every enrolled pod once (`local_pods` lists a pod per address).
    pub fn enrolled_pods(&self) -> Vec<Arc<PodHandle>> {
        let pods = self.local_pods.read().unwrap_or_else(|e| e.into_inner());
        let mut seen = std::collections::HashSet::new();
        pods.values()
            .filter(|pod| seen.insert(pod.netns_cookie))
            .cloned()
            .collect()
    }

    /// Authorizes a connection arriving at `pod`; a denial is logged with
    /// the policy and counted, and `Err` carries the policy.
    pub fn authorize(
        &self,
        pod: &PodHandle,
        source: SocketAddr,
        destination: SocketAddr,
        source_identity: Option<&Identity>,
    ) -> Result<(), String> {
        self.authorize_request(pod, source, destination, source_identity, None)
    }

    /// Whether `pod`'s policies look at HTTP, so that its inbound streams
    /// are parsed and each request authorized.
    pub fn needs_http_authorization(&self, pod: &PodHandle) -> bool {
        self.policies
            .snapshot()
            .needs_http(&pod.namespace, &pod.authorization_policies)
    }

    /// [`ProxyContext::authorize`] for one request of a connection (or,
    /// with `None`, a stream that is not HTTP).
    pub fn authorize_request(
        &self,
        pod: &PodHandle,
        source: SocketAddr,
        destination: SocketAddr,
        source_identity: Option<&Identity>,
        request: Option<crate::security::authorization::RequestAttributes<'_>>,
    ) -> Result<(), String> {
        use crate::security::authorization::{ConnectionFacts, Verdict};
        let facts = ConnectionFacts {
            source_identity,
            source_ip: source.ip(),
            destination_ip: destination.ip(),
            destination_port: destination.port(),
            request,
        };
        let (method, path) = facts
            .request
            .as_ref()
            .map_or(("", ""), |request| (request.method, request.path));
        let policies = self.policies.snapshot();
        let (namespace, selected) = (&pod.namespace, &pod.authorization_policies);
        if let Some(shadow) = policies.evaluate_dry_run(namespace, selected, &facts) {
            let result = match &shadow {
                Verdict::Allow => "allowed",
                Verdict::Deny { .. } => "denied",
            };
            self.telemetry.metrics.dry_run(result);
            if let Verdict::Deny { policy } = shadow {
                tracing::info!(
                    pod = %pod.id,
                    src = %source,
                    orig_dst = %destination,
                    peer_identity = %source_identity.map(|id| id.to_string()).unwrap_or_default(),
                    policy = %policy,
                    method = %method,
                    path = %path,
                    "dry run: a dry-run policy would deny this connection (not enforced)"
                );
            }
        }
        match policies.evaluate(namespace, selected, &facts) {
            Verdict::Allow => Ok(()),
            Verdict::Deny { policy } => {
                self.stats.policy_denials.fetch_add(1, Ordering::Relaxed);
                self.telemetry.metrics.policy_denials.inc();
                tracing::warn!(
                    pod = %pod.id,
                    src = %source,
                    orig_dst = %destination,
                    peer_identity = %source_identity.map(|id| id.to_string()).unwrap_or_default(),
                    policy = %policy,
                    method = %method,
                    path = %path,
                    "connection denied by policy"
                );
                self.telemetry.flows.proxy_event(
                    "inbound",
                    "denied",
                    format!("policy {policy}").into(),
                    pod,
                    source,
                    destination.port(),
                    source_identity,
                    None,
                    None,
                );
                Err(policy)
            }
        }
    }
}

/// The proxy's own counters.
#[derive(Default)]
pub struct ProxyStats {
    pub outbound_connections: AtomicU64,
    pub inbound_connections: AtomicU64,
    pub failed_connections: AtomicU64,
    pub bytes_from_clients: AtomicU64,
    pub bytes_to_clients: AtomicU64,
    /// mTLS handshakes that failed (wrong identity, untrusted root, …).
    pub tls_failures: AtomicU64,
    /// Plaintext connections refused by a STRICT workload.
    pub strict_refusals: AtomicU64,
    /// Connections denied by an authorization policy.
    pub policy_denials: AtomicU64,
}

impl ProxyStats {
    /// Counts a connection that could not be proxied.
    pub fn failed(&self) {
        self.failed_connections.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts the bytes a finished connection carried each way.
    pub fn relayed(&self, from_client: u64, to_client: u64) {
        self.bytes_from_clients
            .fetch_add(from_client, Ordering::Relaxed);
        self.bytes_to_clients
            .fetch_add(to_client, Ordering::Relaxed);
    }
}

/// A pod as the proxy sees it.
pub struct PodHandle {
    /// `namespace/name`.
    pub id: Arc<str>,
    pub netns: NetNs,
    pub netns_cookie: u64,
    /// Every address of the pod, at most one per family.
    pub ips: Vec<std::net::IpAddr>,
    pub identity: Identity,
    pub namespace: String,
    /// WORKLOAD_SELECTOR policies that select this pod.
    pub authorization_policies: Vec<String>,
    /// STRICT: plaintext inbound from outside the mesh is refused.
    pub strict: bool,
    /// Connections its listeners hold now (under `max_connections_per_pod`).
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    /// Its DNS is captured: queries to port 53 are the agent's to answer.
    pub dns: bool,
}

impl PodHandle {
    /// The pod's own address in the family of `peer`: the source its
    /// connections to `peer` have. A pod without an address of that
    /// family gets the unspecified one (the kernel picks).
    pub fn ip_like(&self, peer: std::net::IpAddr) -> std::net::IpAddr {
        crate::config::same_family(&self.ips, peer).unwrap_or(if peer.to_canonical().is_ipv4() {
            std::net::IpAddr::from([0, 0, 0, 0])
        } else {
            std::net::IpAddr::from([0u16; 8])
        })
    }

    /// The address the mesh knows the pod by first (IPv4 first, as
    /// Kubernetes lists a dual-stack pod's), for lookups of the pod's own
    /// workload.
    pub fn primary_ip(&self) -> Option<std::net::IpAddr> {
        self.ips.first().copied()
    }
}

/// Accepts forever, handing each connection to `handle` on its own task,
/// under the node's and the pod's connection limits (a connection past
/// them is closed at once); accept errors pause the listener
/// ([`accept::Acceptor`]).
pub async fn accept_loop<F, Fut>(
    kind: limits::Listener,
    context: Arc<ProxyContext>,
    pod: Arc<PodHandle>,
    listener: TcpListener,
    handle: F,
) where
    F: Fn(Arc<ProxyContext>, Arc<PodHandle>, TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut acceptor = accept::Acceptor::new(&listener, kind, &context.limits);
    loop {
        let (client, peer) = acceptor.next().await;
        let Ok(permit) = context.limits.admit(&pod, kind) else {
            continue;
        };
        // Small writes (HTTP/2 frames, 1-byte request/response) go
        // out at once rather than waiting for an ACK (Nagle).
        let _ = client.set_nodelay(true);
        let handling = handle(context.clone(), pod.clone(), client, peer);
        tokio::spawn(async move {
            handling.await;
            drop(permit);
        });
    }
}

/// Connects to `destination` from a socket created inside the pod's
/// namespace, carrying `mark` and optionally bound to `source`; `home` is
/// the node's namespace, where the worker thread returns.
pub async fn connect_from_pod(
    home: &NetNs,
    pod: &PodHandle,
    destination: SocketAddr,
    mark: u32,
    source: Option<SocketAddr>,
) -> std::io::Result<TcpStream> {
    let socket = pod
        .netns
        .run(home, || socket::upstream(destination, mark, source))
        .map_err(std::io::Error::other)??;
    tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(destination))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Copies both ways until both sides are done, half-closing each direction
/// as its source reaches EOF, or until nothing moved for the idle timeout;
/// counts the bytes into `bytes` as they flow (the downstream's reads are
/// sent, its writes received). With a `registration`, a policy change that
/// denies the connection ends it. Any pair of streams: TCP, an HBONE
/// tunnel, an in-memory pipe; two plain TCP sockets are spliced by the
/// kernel ([`splice`]).
pub async fn relay_io<D, U>(
    context: &ProxyContext,
    bytes: &Arc<crate::telemetry::connection::ByteMeter>,
    registration: Option<&mut established::Registration>,
    mut downstream: D,
    mut upstream: U,
) -> Outcome
where
    D: AsyncRead + AsyncWrite + Unpin + 'static,
    U: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let limits = &context.limits;
    let metrics = &context.telemetry.metrics;
    let idle = limits.settings().idle_timeout;
    let copy = async {
        if let Some((client, outer, server)) = tcp_pair(&downstream, &upstream) {
            metrics.spliced_relays.inc();
            let mut meters = vec![bytes.clone()];
            meters.extend(outer.cloned());
            return idle::splice(client, server, &meters, idle).await;
        }
        metrics.copied_relays.inc();
        let mut downstream = metered::Metered::new(&mut downstream, bytes.clone());
        idle::copy(&mut downstream, &mut upstream, idle).await
    };
    let revoked = async {
        match registration {
            Some(registration) => registration.revoked().await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        copied = copy => match copied {
            idle::Copied::Done(result) => result.map(|_| ()),
            idle::Copied::Idle(after) => {
                limits.timeout_counter(limits::Phase::Idle).inc();
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("idle for {} s: closed", after.as_secs()),
                ))
            }
        },
        policy = revoked => Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            format!("closed by policy {policy} after a policy change"),
        )),
    };
    let _ = downstream.shutdown().await;
    let _ = upstream.shutdown().await;
    match result {
        Ok(()) => Outcome::Closed,
        Err(error) => Outcome::Failed(error.to_string()),
    }
}

/// The TCP sockets under a relay's two streams, when both are plain
/// sockets (the client's maybe metered for an outer record, as the
/// hand-off's is): (client, the outer record's meter, server). Recognised
/// by type because [`relay_io`] takes any pair of streams and only these
/// can be spliced.
fn tcp_pair<'a, D: 'static, U: 'static>(
    downstream: &'a D,
    upstream: &'a U,
) -> Option<(
    &'a TcpStream,
    Option<&'a Arc<crate::telemetry::connection::ByteMeter>>,
    &'a TcpStream,
)> {
    let server = (upstream as &dyn std::any::Any).downcast_ref::<TcpStream>()?;
    let downstream = downstream as &dyn std::any::Any;
    if let Some(client) = downstream.downcast_ref::<TcpStream>() {
        return Some((client, None, server));
    }
    let metered = downstream.downcast_ref::<metered::Metered<TcpStream>>()?;
    let (client, meter) = metered.parts();
    Some((client, Some(meter), server))
}
