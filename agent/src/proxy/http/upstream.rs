//! Upstream HTTP connections from a pod to an endpoint: opened the way an
//! L4 connection would be (HBONE to a meshed workload, hand-off on this
//! node, plain TCP otherwise) and pooled per (pod, endpoint, HTTP version):
//! one multiplexed HTTP/2 connection, or idle HTTP/1.1 keep-alive ones.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper::{Request, Response, body::Incoming, client::conn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use weir_common::{MARK_BYPASS, MARK_LOCAL};

use super::ProxyBody;
use crate::{
    proxy::{PodHandle, ProxyContext, connect_from_pod},
    routing::limits::{Admission, CircuitBreaker, ConnectionGuard, PendingGuard},
    state::Workload,
};

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 32;

pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

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
) -> Result<Box<dyn Io>, String> {
    let Some(workload) = workload else {
        let tcp = connect_from_pod(context, pod, endpoint, MARK_BYPASS, None)
            .await
            .map_err(|error| error.to_string())?;
        let _ = tcp.set_nodelay(true);
        return Ok(Box::new(tcp));
    };
    let handoff = (context.same_node == crate::config::SameNode::Handoff)
        .then(|| context.local_pod(endpoint.ip()))
        .flatten();
    if let Some(target) = handoff {
        // Both ends are this agent's: deliver inside the destination pod from
        // the source pod's address, after the destination's policy (per
        // request when it looks at HTTP).
        let source = SocketAddr::new(pod.ip, 0);
        if context.needs_http_authorization(&target) {
            let arrival = Arc::new(super::inbound::Arrival {
                pod: target.clone(),
                client: source,
                target: endpoint,
                source_identity: Some(pod.identity.clone()),
            });
            let connector =
                super::inbound::app_connector(context.clone(), target, endpoint, Some(source));
            return Ok(super::inbound::pipe_to(context.clone(), arrival, connector));
        }
        context
            .authorize(&target, source, endpoint, Some(&pod.identity))
            .map_err(|policy| format!("denied by policy {policy}"))?;
        let tcp = connect_from_pod(context, &target, endpoint, MARK_LOCAL, Some(source))
            .await
            .map_err(|error| error.to_string())?;
        let _ = tcp.set_nodelay(true);
        return Ok(Box::new(tcp));
    }
    let tunnel = context
        .hbone
        .connect(
            context,
            pod,
            &pod.identity,
            &workload.identity,
            endpoint,
            SocketAddr::new(pod.ip, 0),
        )
        .await
        .map_err(|error| error.to_string())?;
    Ok(Box::new(tunnel))
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    pod: String,
    endpoint: SocketAddr,
    http2: bool,
    /// The cluster's circuit breaker (by address): connections count
    /// against one cluster's limits, so pools are per cluster, as Envoy's.
    cluster: usize,
}

/// The node's upstream HTTP connections.
#[derive(Default)]
pub struct UpstreamPool {
    http1: Mutex<HashMap<PoolKey, Vec<conn::http1::SendRequest<ProxyBody>>>>,
    http2: Mutex<HashMap<PoolKey, conn::http2::SendRequest<ProxyBody>>>,
    /// One HTTP/2 handshake at a time per key, so that concurrent first
    /// requests share one connection instead of racing to open several.
    http2_opening: crate::proxy::single_flight::OpenTurns<PoolKey>,
}

/// Everything needed to reach one endpoint.
pub struct Target<'a> {
    pub context: &'a Arc<ProxyContext>,
    pub pod: &'a PodHandle,
    pub endpoint: SocketAddr,
    pub workload: Option<&'a Workload>,
    pub http2: bool,
    /// The cluster's limits: a request waiting for a connection holds a
    /// pending slot, and the connection a connection slot while it lives.
    pub breaker: &'a Arc<CircuitBreaker>,
    /// The cluster's `connect_timeout`, for opening a connection (the
    /// tunnel's too).
    pub connect_timeout: Duration,
}

impl UpstreamPool {
    /// Sends `request` on a pooled connection, opening one when none is free.
    pub async fn send(
        self: &Arc<Self>,
        target: Target<'_>,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let key = PoolKey {
            pod: target.pod.id.clone(),
            endpoint: target.endpoint,
            http2: target.http2,
            cluster: Arc::as_ptr(target.breaker) as usize,
        };
        if target.http2 {
            let mut sender = match self.idle_http2(&key) {
                Some(sender) => sender,
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
                        Some(sender) => sender,
                        None => {
                            let sender = self.open_http2(&target).await.inspect_err(|error| {
                                // A circuit breaker's refusal says
                                // nothing of the endpoint.
                                if !matches!(error, UpstreamError::Overflow(_)) {
                                    turn.failed();
                                }
                            })?;
                            self.http2
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(key.clone(), sender.clone());
                            sender
                        }
                    }
                }
            };
            return sender
                .send_request(request)
                .await
                .map_err(|source| UpstreamError::Reset {
                    endpoint: target.endpoint,
                    source,
                });
        }
        let mut sender = match self.idle_http1(&key) {
            Some(sender) => sender,
            // HTTP/1.1 needs a connection per request in flight: at
            // `max_connections` the request waits (pending) for one to go
            // idle or close, as Envoy's does.
            None => match target
                .breaker
                .connection_or_wait(
                    || self.idle_http1(&key),
                    // At the limit, a slot held by an idle connection to
                    // another of the cluster's endpoints is freed for this
                    // one.
                    || self.close_idle_of_cluster(&key),
                )
                .await
                .map_err(UpstreamError::Overflow)?
            {
                Admission::Reuse(sender) => sender,
                Admission::Open(connection, pending) => {
                    self.open_http1_with(&target, connection, pending).await?
                }
            },
        };
        let response =
            sender
                .send_request(request)
                .await
                .map_err(|source| UpstreamError::Reset {
                    endpoint: target.endpoint,
                    source,
                })?;
        // Back to the pool once the response body has been read through.
        let pool = self.clone();
        let breaker = target.breaker.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                {
                    let mut idle = pool.http1.lock().unwrap_or_else(|e| e.into_inner());
                    let list = idle.entry(key).or_default();
                    if list.len() < MAX_IDLE_PER_ENDPOINT {
                        list.push(sender);
                    }
                }
                breaker.connection_idle();
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
        let mut sender = self.open_http1(&target).await?;
        sender
            .send_request(request)
            .await
            .map_err(|source| UpstreamError::Reset {
                endpoint: target.endpoint,
                source,
            })
    }

    fn idle_http2(&self, key: &PoolKey) -> Option<conn::http2::SendRequest<ProxyBody>> {
        let mut connections = self.http2.lock().unwrap_or_else(|e| e.into_inner());
        match connections.get(key) {
            Some(sender) if !sender.is_closed() => Some(sender.clone()),
            Some(_) => {
                connections.remove(key);
                None
            }
            None => None,
        }
    }

    fn idle_http1(&self, key: &PoolKey) -> Option<conn::http1::SendRequest<ProxyBody>> {
        let mut idle = self.http1.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(key)?;
        while let Some(sender) = list.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    /// A connection slot at once (or overflow), for HTTP/2 and upgrades.
    fn admit(target: &Target<'_>) -> Result<(ConnectionGuard, PendingGuard), UpstreamError> {
        // Envoy's pending requests: those waiting for a connection.
        let pending = target
            .breaker
            .try_pending()
            .map_err(UpstreamError::Overflow)?;
        let connection = target
            .breaker
            .try_connection()
            .map_err(UpstreamError::Overflow)?;
        Ok((connection, pending))
    }

    /// Opens the byte stream within the cluster's `connect_timeout`; the
    /// request stays pending until then.
    /// Closes one idle HTTP/1.1 connection of `key`'s cluster to another
    /// endpoint or pod; its connection slot comes back when it has closed.
    fn close_idle_of_cluster(&self, key: &PoolKey) {
        let mut idle = self.http1.lock().unwrap_or_else(|e| e.into_inner());
        let victim = idle
            .iter_mut()
            .find(|(other, list)| other.cluster == key.cluster && *other != key && !list.is_empty())
            .and_then(|(_, list)| list.pop());
        // Dropping the last sender ends the connection's task.
        drop(victim);
    }

    async fn connect(
        target: &Target<'_>,
        _pending: PendingGuard,
    ) -> Result<Box<dyn Io>, UpstreamError> {
        let opening = open(target.context, target.pod, target.endpoint, target.workload);
        match tokio::time::timeout(target.connect_timeout, opening).await {
            Ok(Ok(io)) => Ok(io),
            Ok(Err(reason)) => Err(UpstreamError::Connect {
                endpoint: target.endpoint,
                reason,
                timed_out: false,
            }),
            Err(_) => Err(UpstreamError::Connect {
                endpoint: target.endpoint,
                reason: format!("no connection within {:?}", target.connect_timeout),
                timed_out: true,
            }),
        }
    }

    async fn open_http1(
        &self,
        target: &Target<'_>,
    ) -> Result<conn::http1::SendRequest<ProxyBody>, UpstreamError> {
        let (connection, pending) = Self::admit(target)?;
        self.open_http1_with(target, connection, pending).await
    }

    async fn open_http1_with(
        &self,
        target: &Target<'_>,
        guard: ConnectionGuard,
        pending: PendingGuard,
    ) -> Result<conn::http1::SendRequest<ProxyBody>, UpstreamError> {
        let io = Self::connect(target, pending).await?;
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
        Ok(sender)
    }

    async fn open_http2(
        &self,
        target: &Target<'_>,
    ) -> Result<conn::http2::SendRequest<ProxyBody>, UpstreamError> {
        let (guard, pending) = Self::admit(target)?;
        let io = Self::connect(target, pending).await?;
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
        Ok(sender)
    }
}
