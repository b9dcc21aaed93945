//! Inbound L4 connections that a policy admitted, re-checked whenever the
//! policies change, as ztunnel does: one that the new policies deny is
//! closed (logged, counted in `weir_connections_closed_by_policy_total`,
//! and its record ends with the policy's name). Connections whose requests
//! are authorized one by one (HTTP policies) need no watch: their next
//! request meets the new policies.
//!
//! A connection registers before it is authorized, so a change that lands
//! between the two is seen by one or the other.
use std::{
    collections::HashMap,
    future::poll_fn,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use tokio::sync::oneshot;

use super::{PodHandle, ProxyContext};
use crate::security::{
    authorization::{ConnectionFacts, Verdict},
    identity::Identity,
};

/// What the policies look at, kept for as long as the connection lives.
struct Facts {
    pod: Arc<PodHandle>,
    client: SocketAddr,
    target: SocketAddr,
    source_identity: Option<Identity>,
}

struct Entry {
    facts: Arc<Facts>,
    /// Sent the denying policy's name when the connection must close.
    close: oneshot::Sender<String>,
}

/// The registered connections.
#[derive(Default)]
pub struct Established {
    next_id: AtomicU64,
    entries: Arc<Mutex<HashMap<u64, Entry>>>,
}

impl Established {
    /// Registers an arriving connection; it is watched until the returned
    /// registration is dropped.
    pub fn register(
        &self,
        pod: &Arc<PodHandle>,
        client: SocketAddr,
        target: SocketAddr,
        source_identity: Option<&Identity>,
    ) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = oneshot::channel();
        let facts = Arc::new(Facts {
            pod: pod.clone(),
            client,
            target,
            source_identity: source_identity.cloned(),
        });
        self.lock().insert(id, Entry { facts, close });
        Registration {
            id,
            entries: self.entries.clone(),
            closed: Some(closed),
        }
    }

    /// How many connections are watched.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Re-evaluates every watched connection against the policies now in
    /// force and closes the ones they deny; how many it closed.
    pub fn revalidate(&self, context: &ProxyContext) -> usize {
        // Evaluated outside the lock: arrivals keep registering meanwhile.
        let watched: Vec<(u64, Arc<Facts>)> = self
            .lock()
            .iter()
            .map(|(id, entry)| (*id, entry.facts.clone()))
            .collect();
        let policies = context.policies.snapshot();
        let mut closed = 0;
        for (id, facts) in watched {
            let verdict = policies.evaluate(
                &facts.pod.namespace,
                &facts.pod.authorization_policies,
                &ConnectionFacts {
                    source_identity: facts.source_identity.as_ref(),
                    source_ip: facts.client.ip(),
                    destination_ip: facts.target.ip(),
                    destination_port: facts.target.port(),
                    request: None,
                },
            );
            let Verdict::Deny { policy } = verdict else {
                continue;
            };
            let Some(entry) = self.lock().remove(&id) else {
                continue;
            };
            tracing::warn!(
                pod = %facts.pod.id,
                src = %facts.client,
                orig_dst = %facts.target,
                peer_identity = %facts.source_identity.as_ref().map(|id| id.to_string()).unwrap_or_default(),
                policy = %policy,
                "connection closed: no longer allowed after a policy change"
            );
            context.telemetry.metrics.connections_closed_by_policy.inc();
            let _ = entry.close.send(policy);
            closed += 1;
        }
        closed
    }
}

/// One watched connection; dropping it ends the watch.
pub struct Registration {
    id: u64,
    entries: Arc<Mutex<HashMap<u64, Entry>>>,
    closed: Option<oneshot::Receiver<String>>,
}

impl Registration {
    /// Ready with the denying policy once the connection must close;
    /// pending forever otherwise.
    pub fn poll_revoked(&mut self, cx: &mut Context<'_>) -> Poll<String> {
        let Some(closed) = self.closed.as_mut() else {
            return Poll::Pending;
        };
        match std::pin::Pin::new(closed).poll(cx) {
            Poll::Ready(Ok(policy)) => {
                self.closed = None;
                Poll::Ready(policy)
            }
            // The entry is gone without a verdict: nothing will come.
            Poll::Ready(Err(_)) => {
                self.closed = None;
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// [`Registration::poll_revoked`] as a future.
    pub async fn revoked(&mut self) -> String {
        poll_fn(|cx| self.poll_revoked(cx)).await
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// Re-checks the watched connections each time the policies change, until
/// the agent stops.
pub async fn watch(context: Arc<ProxyContext>) {
    let mut changes = context.policies.subscribe();
    while changes.changed().await.is_ok() {
        if context.established.is_empty() {
            continue;
        }
        let closed = context.established.revalidate(&context);
        tracing::debug!(
            closed,
            watched = context.established.len(),
            "established connections re-checked after a policy change"
        );
    }
}

/// A stream whose reads and writes fail once its registration is revoked:
/// for connections that are not relayed by [`super::relay_io`] (an L7
/// client's pooled connection to a pod of this node), whose owner polls
/// them for reads even when idle.
pub struct Revocable<S> {
    inner: S,
    registration: Registration,
    revoked: Option<String>,
}

impl<S> Revocable<S> {
    pub fn new(inner: S, registration: Registration) -> Revocable<S> {
        Revocable {
            inner,
            registration,
            revoked: None,
        }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> Result<(), std::io::Error> {
        if self.revoked.is_none()
            && let Poll::Ready(policy) = self.registration.poll_revoked(cx)
        {
            self.revoked = Some(policy);
        }
        match &self.revoked {
            Some(policy) => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                format!("closed by policy {policy} after a policy change"),
            )),
            None => Ok(()),
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Revocable<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Err(error) = self.check(cx) {
            return Poll::Ready(Err(error));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Revocable<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Err(error) = self.check(cx) {
            return Poll::Ready(Err(error));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
