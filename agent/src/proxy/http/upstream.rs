//! Upstream HTTP connections from a pod to an endpoint: opened the way an
//! L4 connection would be (HBONE to a meshed workload, hand-off on this
//! node, plain TCP otherwise) and pooled per cluster, as Envoy's are, then
//! per (pod, endpoint, peer identity, HTTP version): one multiplexed HTTP/2
//! connection, or idle HTTP/1.1 keep-alive ones.
//!
//! A cluster's pool lives as long as its circuit breaker (one build of the
//! cluster's config), since its connections count against that breaker's
//! limits: a new config gets a new pool, and the old one's idle connections
//! close with it.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use hyper::{Request, Response, body::Incoming, client::conn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use weir_common::MARK_BYPASS;

use super::ProxyBody;
use crate::{
    proxy::{PodHandle, ProxyContext, connect_from_pod},
    routing::limits::{Admission, CircuitBreaker, ConnectionGuard, PendingGuard},
    routing::{
        PoolSettings, TcpKeepalive,
        upstream_tls::{ProxyProtocol, UpstreamTls},
    },
    security::{identity::Identity, origination::Originator},
    state::Workload,
    telemetry::kernel_tcp::{LegShare, SharedLeg},
};

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 32;

pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A connection's socket on the network, followed in the kernel
/// (`capture.tcp_stats`): the plain TCP socket, or the HBONE tunnel's.
type KernelLeg = Option<Arc<SharedLeg>>;

/// The request's part of the kernel's figures of the connection that
/// carried it, from when it was sent; found in the response's extensions.
#[derive(Clone)]
pub struct UpstreamLeg(pub Arc<LegShare>);

/// Marks `response` with the part of `leg` that began at `share`.
fn with_leg(mut response: Response<Incoming>, share: Option<LegShare>) -> Response<Incoming> {
    if let Some(share) = share {
        response
            .extensions_mut()
            .insert(UpstreamLeg(Arc::new(share)));
    }
    response
}

/// Why no response came back.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {endpoint}: {reason}")]
    Connect {
        endpoint: SocketAddr,
        reason: String,
        /// Cut by the cluster's `connect_timeout`.
        timed_out: bool,
    },
    #[error("{endpoint} reset the request: {source}")]
    Reset {
        endpoint: SocketAddr,
        source: hyper::Error,
    },
    /// A circuit-breaker limit (connections, or requests waiting for one).
    #[error("cluster limit reached: {0}")]
    Overflow(crate::routing::limits::Overflow),
}

/// Opens a byte stream from `pod` to `endpoint` the way its L4 traffic
/// would travel.
pub async fn open(
    context: &Arc<ProxyContext>,
    pod: &PodHandle,
    endpoint: SocketAddr,
    workload: Option<&Workload>,
    keepalive: Option<&TcpKeepalive>,
) -> Result<(Box<dyn Io>, KernelLeg), String> {
    // Outside the mesh (no workload, or `tunnel_protocol: NONE`): as it is.
    let Some(workload) = workload.filter(|workload| workload.meshed()) else {
        let tcp = connect_from_pod(&context.home, pod, endpoint, MARK_BYPASS, None)
            .await
            .map_err(|error| error.to_string())?;
        let _ = tcp.set_nodelay(true);
        if let Some(keepalive) = keepalive {
            set_keepalive(&tcp, keepalive).map_err(|error| format!("TCP keepalive: {error}"))?;
        }
        let leg = SharedLeg::follow(&context.telemetry, std::os::fd::AsFd::as_fd(&tcp));
        return Ok((Box::new(tcp), leg));
    };
    let handoff = (context.same_node == crate::config::SameNode::Handoff)
        .then(|| context.local_pod(endpoint.ip()))
        .flatten();
    if let Some(target) = handoff {
        // Both ends are this agent's: delivered inside the destination pod
        // from the source pod's address by the one inbound path (per request
        // when the destination's policies look at HTTP).
        let source = SocketAddr::new(pod.ip_like(endpoint.ip()), 0);
        let arrival = Arc::new(crate::proxy::inbound::Arrival {
            pod: target,
            client: source,
            target: endpoint,
            source_identity: Some(pod.identity.clone()),
            bind: source,
            protocol: "handoff",
            started: std::time::Instant::now(),
        });
        return match crate::proxy::inbound::admit(context, &arrival).await {
            Ok(crate::proxy::inbound::Admitted::Relay(tcp, registration)) => {
                let _ = tcp.set_nodelay(true);
                // A policy change that denies this pod's client closes the
                // pooled connection, as it would an L4 one.
                Ok((
                    Box::new(crate::proxy::established::Revocable::new(tcp, registration)),
                    None,
                ))
            }
            Ok(crate::proxy::inbound::Admitted::Http(connector)) => Ok((
                super::authorize::pipe_to(context.clone(), arrival, connector),
                None,
            )),
            Err(refused) => Err(refused.reason()),
        };
    }
    let tunnel = context
        .hbone
        .connect(
            context,
            pod,
            &pod.identity,
            crate::proxy::pool::TunnelTarget::workload(&workload.identity, endpoint),
            SocketAddr::new(pod.ip_like(endpoint.ip()), 0),
        )
        .await
        .map_err(|error| error.to_string())?;
    let leg = tunnel.kernel_leg();
    Ok((Box::new(tunnel), leg))
}

/// Which pooled connections a request may use, by value: from this pod's
/// namespace, to this endpoint, answered by this identity (none for plain
/// TCP), in this HTTP version. The cluster is the pool's own.
#[derive(Clone, PartialEq, Eq, Hash)]
struct UpstreamKey {
    pod: Arc<str>,
    /// The pod's network namespace: a pod of the same name made again is
    /// another namespace, whose connections are not these.
    netns_cookie: u64,
    endpoint: SocketAddr,
    /// The identity the connection was opened to expect: an address that
    /// now belongs to another workload gets new connections.
    peer: Option<Identity>,
    http2: bool,
    /// The SNI of the TLS the proxy originates, when it depends on the
    /// request's host.
    sni: Option<Arc<str>>,
    /// The (client, dialled) addresses a PROXY protocol header names: a
    /// connection carries only its own client's requests.
    proxied: Option<(SocketAddr, SocketAddr)>,
}

/// One cluster's upstream HTTP connections.
pub struct UpstreamPool {
    /// The cluster's limits: a request waiting for a connection holds a
    /// pending slot, and the connection a connection slot while it lives.
    breaker: Arc<CircuitBreaker>,
    /// The cluster's `connect_timeout`, for opening a connection (the
    /// tunnel's too).
    connect_timeout: Duration,
    /// The cluster's connection-pool settings.
    settings: PoolSettings,
    /// TLS the proxy originates to the endpoints (a DestinationRule's
    /// SIMPLE or MUTUAL), inside whatever carries the connection.
    originator: Option<Originator>,
    /// The PROXY protocol header sent first on each connection.
    proxy_protocol: Option<ProxyProtocol>,
    http1: Mutex<HashMap<UpstreamKey, Vec<IdleHttp1>>>,
    http2: Mutex<HashMap<UpstreamKey, SharedHttp2>>,
    /// Names pooled HTTP/2 connections, so a timer can find the one it
    /// watches.
    next_id: AtomicU64,
    /// Whether the idle HTTP/1.1 sweeper runs.
    sweeping: AtomicBool,
    /// One HTTP/2 handshake at a time per key, so that concurrent first
    /// requests share one connection instead of racing to open several.
    http2_opening: crate::proxy::single_flight::OpenTurns<UpstreamKey>,
}

/// An idle HTTP/1.1 connection, how many requests it has served, and
/// since when it is idle.
struct IdleHttp1 {
    sender: conn::http1::SendRequest<ProxyBody>,
    served: u32,
    since: tokio::time::Instant,
    leg: KernelLeg,
    /// When it was opened (`max_connection_duration`).
    opened: tokio::time::Instant,
}

/// An HTTP/1.1 connection taken for a request: its sender, the requests
/// it has served, its kernel leg and when it was opened.
type Http1Taken = (
    conn::http1::SendRequest<ProxyBody>,
    u32,
    KernelLeg,
    tokio::time::Instant,
);

/// The HTTP/2 connection to an endpoint, with the streams it has carried
/// and when the last one started (for `idle_timeout`).
#[derive(Clone)]
struct SharedHttp2 {
    sender: conn::http2::SendRequest<ProxyBody>,
    streams: Arc<AtomicU32>,
    last_used: Arc<Mutex<tokio::time::Instant>>,
    id: u64,
    leg: KernelLeg,
    opened: tokio::time::Instant,
}

/// Everything needed to reach one endpoint.
pub struct Target<'a> {
    pub context: &'a Arc<ProxyContext>,
    pub pod: &'a PodHandle,
    pub endpoint: SocketAddr,
    pub workload: Option<&'a Workload>,
    pub http2: bool,
    /// The client's address and the address it dialled, for a PROXY
    /// protocol header.
    pub downstream: (SocketAddr, SocketAddr),
}

impl Target<'_> {
    fn key(&self, sni: Option<Arc<str>>, proxied: bool) -> UpstreamKey {
        UpstreamKey {
            pod: self.pod.id.clone(),
            netns_cookie: self.pod.netns_cookie,
            endpoint: self.endpoint,
            peer: self
                .workload
                .filter(|workload| workload.meshed())
                .map(|workload| workload.identity.clone()),
            http2: self.http2,
            sni,
            proxied: proxied.then_some(self.downstream),
        }
    }
}

impl UpstreamPool {
    pub fn new(
        breaker: Arc<CircuitBreaker>,
        connect_timeout: Duration,
        settings: PoolSettings,
        tls: &UpstreamTls,
        proxy_protocol: Option<ProxyProtocol>,
    ) -> UpstreamPool {
        UpstreamPool {
            breaker,
            connect_timeout,
            settings,
            originator: match tls {
                UpstreamTls::Mesh => None,
                UpstreamTls::Originate(spec) => Some(Originator::new(spec.clone())),
            },
            proxy_protocol,
            http1: Mutex::default(),
            http2: Mutex::default(),
            next_id: AtomicU64::new(0),
            sweeping: AtomicBool::new(false),
            http2_opening: Default::default(),
        }
    }

    /// Envoy's default idle timeout is 1 h; 0 turns it off.
    fn idle_timeout(&self) -> Option<Duration> {
        match self.settings.idle_timeout {
            None => Some(Duration::from_secs(3600)),
            Some(timeout) if timeout.is_zero() => None,
            Some(timeout) => Some(timeout),
        }
    }

    /// Closes the idle connections to endpoints no longer in the cluster
    /// (`endpoints`: address and expected identity); those in use close
    /// when their request ends.
    pub fn retain_endpoints(&self, endpoints: &[(SocketAddr, Option<&Identity>)]) {
        let wanted = |key: &UpstreamKey| {
            endpoints
                .iter()
                .any(|(address, peer)| key.endpoint == *address && key.peer.as_ref() == *peer)
        };
        self.http1
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|key, _| wanted(key));
        self.http2
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|key, _| wanted(key));
    }

    /// Closes the idle connections of pods no longer enrolled (`live`:
    /// the enrolled pods' namespace cookies); those in use close when
    /// their request ends.
    pub fn retain_pods(&self, live: &std::collections::HashSet<u64>) {
        self.http1
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|key, _| live.contains(&key.netns_cookie));
        self.http2
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|key, _| live.contains(&key.netns_cookie));
    }

    /// Sends `request` on a pooled connection, opening one when none is free.
    pub async fn send(
        self: &Arc<Self>,
        target: Target<'_>,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let sni = self.sni(&request);
        let key = target.key(sni.clone(), self.proxy_protocol.is_some());
        let sni = sni.as_deref();
        if target.http2 {
            let shared = match self.idle_http2(&key) {
                Some(shared) => shared,
                None => {
                    let turn = self.http2_opening.take(&key).await.map_err(|failed| {
                        UpstreamError::Connect {
                            endpoint: target.endpoint,
                            reason: failed.to_string(),
                            timed_out: false,
                        }
                    })?;
                    // Whoever held the turn before may have opened it.
                    match self.idle_http2(&key) {
                        Some(shared) => shared,
                        None => {
                            let (sender, leg) =
                                self.open_http2(&target, sni).await.inspect_err(|error| {
                                    // A circuit breaker's refusal says
                                    // nothing of the endpoint.
                                    if !matches!(error, UpstreamError::Overflow(_)) {
                                        turn.failed();
                                    }
                                })?;
                            let shared = SharedHttp2 {
                                sender,
                                streams: Arc::default(),
                                last_used: Arc::new(Mutex::new(tokio::time::Instant::now())),
                                id: self.next_id.fetch_add(1, Ordering::Relaxed),
                                leg,
                                opened: tokio::time::Instant::now(),
                            };
                            self.http2
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(key.clone(), shared.clone());
                            self.watch_http2_idle(&key, &shared);
                            shared
                        }
                    }
                }
            };
            let streams = shared.streams.fetch_add(1, Ordering::Relaxed) + 1;
            *shared.last_used.lock().unwrap_or_else(|e| e.into_inner()) =
                tokio::time::Instant::now();
            // Its last stream: the next request opens another connection,
            // and this one closes once its streams end.
            if self
                .settings
                .max_requests_per_connection
                .is_some_and(|max| streams >= max)
            {
                self.forget_http2(&key, shared.id);
            }
            let share = shared.leg.as_ref().map(|leg| leg.begin());
            let mut sender = shared.sender;
            return sender
                .send_request(request)
                .await
                .map(|response| with_leg(response, share))
                .map_err(|source| UpstreamError::Reset {
                    endpoint: target.endpoint,
                    source,
                });
        }
        let (mut sender, served, leg, opened) = match self.idle_http1(&key) {
            Some(idle) => idle,
            // HTTP/1.1 needs a connection per request in flight: at
            // `max_connections` the request waits (pending) for one to go
            // idle or close, as Envoy's does.
            None => match self
                .breaker
                .connection_or_wait(
                    || self.idle_http1(&key),
                    // At the limit, a slot held by an idle connection to
                    // another of the cluster's endpoints is freed for this
                    // one.
                    || self.close_idle_other_than(&key),
                )
                .await
                .map_err(UpstreamError::Overflow)?
            {
                Admission::Reuse(idle) => idle,
                Admission::Open(connection, pending) => {
                    let (sender, leg) = self
                        .open_http1_with(&target, sni, connection, pending)
                        .await?;
                    (sender, 0, leg, tokio::time::Instant::now())
                }
            },
        };
        let served = served + 1;
        let share = leg.as_ref().map(|leg| leg.begin());
        let response =
            sender
                .send_request(request)
                .await
                .map_err(|source| UpstreamError::Reset {
                    endpoint: target.endpoint,
                    source,
                })?;
        let response = with_leg(response, share);
        // Back to the pool once the response body has been read through,
        // unless it has served its `max_requests_per_connection` (dropping
        // the sender closes it).
        let pool = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                let spent = pool
                    .settings
                    .max_requests_per_connection
                    .is_some_and(|max| served >= max)
                    || pool.past_max_duration(opened);
                if !spent {
                    let pooled = {
                        let mut idle = pool.http1.lock().unwrap_or_else(|e| e.into_inner());
                        let list = idle.entry(key).or_default();
                        let room = list.len() < MAX_IDLE_PER_ENDPOINT;
                        if room {
                            list.push(IdleHttp1 {
                                sender,
                                served,
                                since: tokio::time::Instant::now(),
                                leg,
                                opened,
                            });
                        }
                        room
                    };
                    if pooled {
                        pool.sweep_idle_http1();
                    }
                }
                pool.breaker.connection_idle();
            }
        });
        Ok(response)
    }

    /// A dedicated HTTP/1.1 connection that may be upgraded (WebSocket,
    /// CONNECT): never pooled.
    pub async fn send_upgradable(
        &self,
        target: Target<'_>,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let sni = self.sni(&request);
        let (mut sender, leg) = self.open_http1(&target, sni.as_deref()).await?;
        let share = leg.as_ref().map(|leg| leg.begin());
        sender
            .send_request(request)
            .await
            .map(|response| with_leg(response, share))
            .map_err(|source| UpstreamError::Reset {
                endpoint: target.endpoint,
                source,
            })
    }

    fn idle_http2(&self, key: &UpstreamKey) -> Option<SharedHttp2> {
        let mut connections = self.http2.lock().unwrap_or_else(|e| e.into_inner());
        match connections.get(key) {
            Some(shared)
                if !shared.sender.is_closed() && !self.past_max_duration(shared.opened) =>
            {
                Some(shared.clone())
            }
            // Closed, or past `max_connection_duration`: it takes no new
            // stream and closes once its streams end.
            Some(_) => {
                connections.remove(key);
                None
            }
            None => None,
        }
    }

    /// Stops handing out the HTTP/2 connection `id` (if it is still the
    /// one for `key`): it closes once its streams end.
    fn forget_http2(&self, key: &UpstreamKey, id: u64) {
        let mut connections = self.http2.lock().unwrap_or_else(|e| e.into_inner());
        if connections.get(key).is_some_and(|shared| shared.id == id) {
            connections.remove(key);
        }
    }

    /// Forgets the HTTP/2 connection once no stream has started on it for
    /// the idle timeout.
    fn watch_http2_idle(self: &Arc<Self>, key: &UpstreamKey, shared: &SharedHttp2) {
        let Some(timeout) = self.idle_timeout() else {
            return;
        };
        let pool = Arc::downgrade(self);
        let key = key.clone();
        let (id, last_used) = (shared.id, shared.last_used.clone());
        tokio::spawn(async move {
            loop {
                let since = *last_used.lock().unwrap_or_else(|e| e.into_inner());
                tokio::time::sleep_until(since + timeout).await;
                let Some(pool) = pool.upgrade() else { return };
                let still = *last_used.lock().unwrap_or_else(|e| e.into_inner());
                if still == since {
                    pool.forget_http2(&key, id);
                    return;
                }
            }
        });
    }

    /// Starts the pool's one sweeper of idle HTTP/1.1 connections, if it
    /// has none: every half idle timeout (at most 30 s) it closes those
    /// idle longer than the timeout or past `max_connection_duration`,
    /// until the pool is gone.
    fn sweep_idle_http1(self: &Arc<Self>) {
        let Some(timeout) = self.idle_timeout() else {
            return;
        };
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let period = (timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(pool) = pool.upgrade() else { return };
                let now = tokio::time::Instant::now();
                let mut idle = pool.http1.lock().unwrap_or_else(|e| e.into_inner());
                // Dropping a sender closes its connection.
                for list in idle.values_mut() {
                    list.retain(|entry| {
                        now.duration_since(entry.since) < timeout
                            && !pool.past_max_duration(entry.opened)
                    });
                }
                idle.retain(|_, list| !list.is_empty());
            }
        });
    }

    /// Whether a connection opened at `opened` has outlived the cluster's
    /// `max_connection_duration` (then it takes no new request).
    fn past_max_duration(&self, opened: tokio::time::Instant) -> bool {
        self.settings
            .max_connection_duration
            .is_some_and(|max| opened.elapsed() >= max)
    }

    fn idle_http1(&self, key: &UpstreamKey) -> Option<Http1Taken> {
        let mut idle = self.http1.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(key)?;
        let timeout = self.idle_timeout();
        while let Some(entry) = list.pop() {
            // Past its idle timeout (the sweeper has not come by yet): closed.
            let expired = timeout.is_some_and(|timeout| entry.since.elapsed() >= timeout)
                || self.past_max_duration(entry.opened);
            if !expired && entry.sender.is_ready() {
                return Some((entry.sender, entry.served, entry.leg, entry.opened));
            }
        }
        None
    }

    /// A connection slot at once (or overflow), for HTTP/2 and upgrades.
    fn admit(&self) -> Result<(ConnectionGuard, PendingGuard), UpstreamError> {
        // Envoy's pending requests: those waiting for a connection.
        let pending = self
            .breaker
            .try_pending()
            .map_err(UpstreamError::Overflow)?;
        let connection = self
            .breaker
            .try_connection()
            .map_err(UpstreamError::Overflow)?;
        Ok((connection, pending))
    }

    /// Closes one idle HTTP/1.1 connection of the cluster to another
    /// endpoint or pod than `key`'s; its connection slot comes back when it
    /// has closed.
    fn close_idle_other_than(&self, key: &UpstreamKey) {
        let mut idle = self.http1.lock().unwrap_or_else(|e| e.into_inner());
        let victim = idle
            .iter_mut()
            .find(|(other, list)| *other != key && !list.is_empty())
            .and_then(|(_, list)| list.pop());
        // Dropping the last sender ends the connection's task.
        drop(victim);
    }

    /// The SNI of the TLS originated for `request`, if any.
    fn sni<B>(&self, request: &Request<B>) -> Option<Arc<str>> {
        let originator = self.originator.as_ref()?;
        let host = request
            .uri()
            .authority()
            .map(|authority| authority.as_str())
            .or_else(|| {
                request
                    .headers()
                    .get(http::header::HOST)
                    .and_then(|host| host.to_str().ok())
            });
        originator.sni(host)
    }

    /// Opens the byte stream within the cluster's `connect_timeout`, the
    /// handshake of TLS the proxy originates included (a server that never
    /// finishes it is cut there too); the request stays pending until then.
    async fn connect(
        &self,
        target: &Target<'_>,
        sni: Option<&str>,
        _pending: PendingGuard,
    ) -> Result<(Box<dyn Io>, KernelLeg), UpstreamError> {
        let opening = async {
            let (io, leg) = open(
                target.context,
                target.pod,
                target.endpoint,
                target.workload,
                self.settings.tcp_keepalive.as_ref(),
            )
            .await?;
            // The header goes first, before any TLS, as Envoy's socket
            // writes it.
            let mut io = io;
            if let Some(version) = self.proxy_protocol {
                let (client, dialled) = target.downstream;
                let header = proxy_header(version, client, dialled)?;
                tokio::io::AsyncWriteExt::write_all(&mut io, &header)
                    .await
                    .map_err(|error| format!("PROXY protocol header: {error}"))?;
            }
            match &self.originator {
                None => Ok((io, leg)),
                Some(originator) => {
                    let tls = originator.connect(io, target.endpoint, sni).await?;
                    Ok((Box::new(tls) as Box<dyn Io>, leg))
                }
            }
        };
        match tokio::time::timeout(self.connect_timeout, opening).await {
            Ok(Ok(io)) => Ok(io),
            Ok(Err(reason)) => Err(UpstreamError::Connect {
                endpoint: target.endpoint,
                reason,
                timed_out: false,
            }),
            Err(_) => Err(UpstreamError::Connect {
                endpoint: target.endpoint,
                reason: format!("no connection within {:?}", self.connect_timeout),
                timed_out: true,
            }),
        }
    }

    async fn open_http1(
        &self,
        target: &Target<'_>,
        sni: Option<&str>,
    ) -> Result<(conn::http1::SendRequest<ProxyBody>, KernelLeg), UpstreamError> {
        let (connection, pending) = self.admit()?;
        self.open_http1_with(target, sni, connection, pending).await
    }

    async fn open_http1_with(
        &self,
        target: &Target<'_>,
        sni: Option<&str>,
        guard: ConnectionGuard,
        pending: PendingGuard,
    ) -> Result<(conn::http1::SendRequest<ProxyBody>, KernelLeg), UpstreamError> {
        let (io, leg) = self.connect(target, sni, pending).await?;
        let (sender, connection) = conn::http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| UpstreamError::Reset {
                endpoint: target.endpoint,
                source,
            })?;
        let endpoint = target.endpoint;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, %endpoint, "upstream HTTP/1.1 connection ended");
            }
            drop(guard);
        });
        Ok((sender, leg))
    }

    async fn open_http2(
        &self,
        target: &Target<'_>,
        sni: Option<&str>,
    ) -> Result<(conn::http2::SendRequest<ProxyBody>, KernelLeg), UpstreamError> {
        let (guard, pending) = self.admit()?;
        let (io, leg) = self.connect(target, sni, pending).await?;
        let (sender, connection) = conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| UpstreamError::Reset {
                endpoint: target.endpoint,
                source,
            })?;
        let endpoint = target.endpoint;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, %endpoint, "upstream HTTP/2 connection ended");
            }
            drop(guard);
        });
        Ok((sender, leg))
    }
}

/// The PROXY protocol header naming `client` and the address it
/// `dialled` (IPv4 written as such when the socket saw it mapped into
/// IPv6).
fn proxy_header(
    version: ProxyProtocol,
    client: SocketAddr,
    dialled: SocketAddr,
) -> Result<Vec<u8>, String> {
    let canonical =
        |address: SocketAddr| SocketAddr::new(address.ip().to_canonical(), address.port());
    let (client, dialled) = (canonical(client), canonical(dialled));
    if client.is_ipv4() != dialled.is_ipv4() {
        return Err(format!(
            "PROXY protocol: {client} and {dialled} differ in family"
        ));
    }
    match version {
        ProxyProtocol::V1 => Ok(ppp::v1::Addresses::from((client, dialled))
            .to_string()
            .into_bytes()),
        ProxyProtocol::V2 => ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (client, dialled),
        )
        .build()
        .map_err(|error| format!("PROXY protocol header: {error}")),
    }
}

/// A cluster's `tcp_keepalive` on a plain upstream connection; unset
/// fields keep the kernel's values.
fn set_keepalive(tcp: &tokio::net::TcpStream, keepalive: &TcpKeepalive) -> std::io::Result<()> {
    let mut settings = socket2::TcpKeepalive::new();
    if let Some(time) = keepalive.time {
        settings = settings.with_time(time);
    }
    if let Some(interval) = keepalive.interval {
        settings = settings.with_interval(interval);
    }
    if let Some(probes) = keepalive.probes {
        settings = settings.with_retries(probes);
    }
    socket2::SockRef::from(tcp).set_tcp_keepalive(&settings)
}
