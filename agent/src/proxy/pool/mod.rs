//! The HBONE client's connection pool: each proxied connection is one
//! HTTP/2 `CONNECT` stream (not extended CONNECT) over mutual TLS to the
//! destination pod's IP on port 15008, `:authority` = the original
//! destination `ip:port`. Connections are pooled per (source identity,
//! source pod, destination identity, destination address), up to
//! `MAX_STREAMS_PER_CONNECTION` streams each. The pool owns their
//! lifecycle: opening (one at a time per key, each phase bounded:
//! `open`), reuse, keepalive, and retirement (`lifecycle`).
mod lifecycle;
mod open;
mod tunnel;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use weir_common::INBOUND_HBONE_PORT;

pub use open::{Phase, Settings};
pub use tunnel::Tunnel;

use self::{
    lifecycle::{ConnectionState, Driver},
    tunnel::StreamSlot,
};
use super::{PodHandle, ProxyContext, h2::H2Stream};
use crate::{security::identity::Identity, telemetry::burst::Burst};

/// A client pools up to this many streams on one connection (as ztunnel).
pub const MAX_STREAMS_PER_CONNECTION: usize = 100;
/// A server accepts at most this many concurrent streams per connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 200;
pub(super) const STREAM_WINDOW: u32 = 4 << 20;
pub(super) const CONNECTION_WINDOW: u32 = 16 << 20;
pub(super) const MAX_FRAME: u32 = 1 << 20;
/// The largest header block either side accepts (hyper's default, kept).
pub(super) const MAX_HEADER_LIST: u32 = 16 << 10;

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error(transparent)]
    Identity(#[from] crate::security::identity::IdentityError),
    #[error("connect {address}: {source}")]
    Connect {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("mTLS handshake with {address}: {source}")]
    Handshake {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("HTTP/2 with {address}: {source}")]
    Http {
        address: SocketAddr,
        source: h2::Error,
    },
    #[error("{phase} with {address} timed out after {after:?}")]
    TimedOut {
        phase: &'static str,
        address: SocketAddr,
        after: Duration,
    },
    #[error("connecting to {address} failed for a concurrent connection")]
    ConcurrentOpenFailed { address: SocketAddr },
    #[error("CONNECT {target} answered {status}")]
    Refused {
        target: SocketAddr,
        status: StatusCode,
    },
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct TunnelKey {
    source: Identity,
    /// The source pod's namespace: a tunnel's socket lives there and
    /// leaves from that pod's address, which the peer reports as the
    /// client's. Pods sharing a service account share no tunnel.
    netns_cookie: u64,
    destination: Identity,
    address: SocketAddr,
}

struct PooledConnection {
    id: u64,
    sender: SendRequest<Bytes>,
    state: Arc<ConnectionState>,
}

/// The pooled connections, shared with their drivers. Removing one drops
/// the pool's request handle: it takes no new stream and h2 closes it
/// (GOAWAY) when its last stream ends.
#[derive(Default)]
struct Shared {
    connections: Mutex<HashMap<TunnelKey, Vec<PooledConnection>>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TunnelKey, Vec<PooledConnection>>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes connection `id` out of the pool (the caller drops it, outside
    /// the lock).
    fn remove(&self, key: &TunnelKey, id: u64) -> Option<PooledConnection> {
        let mut connections = self.lock();
        let list = connections.get_mut(key)?;
        let index = list.iter().position(|connection| connection.id == id)?;
        let removed = list.swap_remove(index);
        if list.is_empty() {
            connections.remove(key);
        }
        Some(removed)
    }

    /// Takes connection `id` out if it has carried no stream for
    /// `idle_timeout`; decided with the pool locked, where streams begin.
    fn remove_if_idle(&self, key: &TunnelKey, id: u64, idle_timeout: Duration) -> IdleCheck {
        let removed = {
            let mut connections = self.lock();
            let Some(list) = connections.get_mut(key) else {
                return IdleCheck::NotPooled;
            };
            let Some(index) = list.iter().position(|c| c.id == id) else {
                return IdleCheck::NotPooled;
            };
            if !list[index].state.idle_for(idle_timeout) {
                return IdleCheck::Busy;
            }
            let removed = list.swap_remove(index);
            if list.is_empty() {
                connections.remove(key);
            }
            removed
        };
        drop(removed);
        IdleCheck::Removed
    }
}

/// Where a tunnel goes.
#[derive(Debug, Clone, Copy)]
pub struct TunnelTarget<'a> {
    /// What the HBONE server must present.
    pub identity: &'a Identity,
    /// The HBONE server dialled.
    pub server: SocketAddr,
    /// The `CONNECT`'s `:authority`: where the server delivers the stream.
    pub authority: SocketAddr,
}

impl<'a> TunnelTarget<'a> {
    /// Straight to a workload: its own HBONE listener, for its own address.
    pub fn workload(identity: &'a Identity, target: SocketAddr) -> TunnelTarget<'a> {
        TunnelTarget {
            identity,
            server: SocketAddr::new(target.ip(), INBOUND_HBONE_PORT),
            authority: target,
        }
    }
}

/// What [`Shared::remove_if_idle`] found.
#[derive(Debug, PartialEq, Eq)]
enum IdleCheck {
    Removed,
    /// A stream began meanwhile.
    Busy,
    /// Someone else took it out (its pod was released).
    NotPooled,
}

/// The client side's connection pool.
pub struct HbonePool {
    shared: Arc<Shared>,
    /// Concurrent first connects to a peer share one TLS connection.
    opening: super::single_flight::OpenTurns<TunnelKey>,
    settings: Settings,
    next_id: AtomicU64,
    /// Timeouts logged once per burst, per phase (`Phase::ALL` order).
    timeouts: [Burst; 4],
    /// Failed TLS handshakes (a wrong identity, an untrusted root), logged
    /// once per burst.
    handshake_failures: Burst,
    keepalive_failures: Arc<Burst>,
}

impl Default for HbonePool {
    fn default() -> Self {
        HbonePool::new(&Default::default())
    }
}

impl HbonePool {
    pub fn new(config: &crate::config::HboneClientConfig) -> HbonePool {
        HbonePool {
            shared: Arc::default(),
            opening: Default::default(),
            settings: Settings::from(config),
            next_id: AtomicU64::new(0),
            timeouts: Default::default(),
            handshake_failures: Burst::default(),
            keepalive_failures: Arc::default(),
        }
    }

    /// Retires the tunnels of pods no longer enrolled (`live`: the enrolled
    /// pods' namespace cookies); their streams run to their end.
    pub fn retain_pods(&self, live: &HashSet<u64>) {
        let mut retired = Vec::new();
        {
            let mut connections = self.shared.lock();
            connections.retain(|key, list| {
                let keep = live.contains(&key.netns_cookie);
                if !keep {
                    retired.append(list);
                }
                keep
            });
        }
        for connection in retired {
            connection.state.close_as("released");
        }
    }

    fn checkout(&self, key: &TunnelKey) -> Option<(SendRequest<Bytes>, Arc<ConnectionState>)> {
        let connections = self.shared.lock();
        connections
            .get(key)?
            .iter()
            .find(|connection| {
                !connection.state.is_ended()
                    && connection.state.streams() < MAX_STREAMS_PER_CONNECTION
            })
            .map(|connection| {
                connection.state.begin_stream();
                (connection.sender.clone(), connection.state.clone())
            })
    }

    /// Pools a connection just opened, with its driver; its first stream
    /// is the caller's.
    fn pool(
        &self,
        context: &ProxyContext,
        key: TunnelKey,
        opened: open::Opened,
        serial: String,
    ) -> (SendRequest<Bytes>, Arc<ConnectionState>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let open::Opened {
            sender,
            connection,
            state,
        } = opened;
        state.begin_stream();
        // A forgotten identity (no receiver) retires it at once.
        let renewals = context
            .secrets
            .watch(&key.source)
            .unwrap_or_else(|| tokio::sync::watch::channel(String::new()).1);
        self.shared
            .lock()
            .entry(key.clone())
            .or_default()
            .push(PooledConnection {
                id,
                sender: sender.clone(),
                state: state.clone(),
            });
        let driver = Driver {
            shared: self.shared.clone(),
            key,
            id,
            state: state.clone(),
            serial,
            idle_timeout: self.settings.idle_timeout,
            keepalive_failures: self.keepalive_failures.clone(),
        };
        let keepalive = crate::proxy::h2::Keepalive {
            interval: self.settings.keepalive_interval,
            timeout: self.settings.keepalive_timeout,
        };
        tokio::spawn(driver.run(connection, renewals, keepalive));
        (sender, state)
    }

    /// Opens a tunnel from `pod` (as `source`) to `to`.
    pub async fn connect(
        &self,
        context: &ProxyContext,
        pod: &PodHandle,
        source: &Identity,
        to: TunnelTarget<'_>,
        client: SocketAddr,
    ) -> Result<Tunnel, HboneError> {
        let TunnelTarget {
            identity: destination,
            server: address,
            authority: target,
        } = to;
        let certificate = context.secrets.fetch(source).await?;
        let key = TunnelKey {
            source: source.clone(),
            netns_cookie: pod.netns_cookie,
            destination: destination.clone(),
            address,
        };
        let (sender, state) = match self.checkout(&key) {
            Some(found) => found,
            None => {
                // Bounded: each phase of the opener's `open` has a timeout,
                // and its failure fails those waiting here with it.
                let turn = self
                    .opening
                    .take(&key)
                    .await
                    .map_err(|_| HboneError::ConcurrentOpenFailed { address })?;
                // Whoever had the turn before may have opened one.
                match self.checkout(&key) {
                    Some(found) => found,
                    None => {
                        let opened = self
                            .open(context, pod, &certificate, destination, address)
                            .await
                            .inspect_err(|_| turn.failed())?;
                        self.pool(context, key, opened, certificate.serial.clone())
                    }
                }
            }
        };
        // From here the stream is counted; dropping the slot uncounts it.
        let slot = StreamSlot(state);
        // As ztunnel's CONNECT: who the client is (`baggage`, for a peer
        // that does not have it in its state) and a trace context of its
        // own (not sampled).
        let baggage = context
            .store
            .workload(client.ip())
            .and_then(|workload| crate::telemetry::baggage::Baggage::of(&workload).header());
        let traceparent = format!(
            "00-{:032x}-{:016x}-00",
            fastrand::u128(1..),
            fastrand::u64(1..)
        );
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header("forwarded", format!("for=\"{client}\""))
            .header("traceparent", traceparent);
        if let Some(baggage) = baggage {
            request = request.header(crate::telemetry::baggage::HEADER, baggage);
        }
        let request = request.body(()).map_err(|_| HboneError::Refused {
            target,
            status: StatusCode::BAD_REQUEST,
        })?;
        let exchange = async {
            let mut sender = sender
                .ready()
                .await
                .map_err(|source| HboneError::Http { address, source })?;
            let (response, send) = sender
                .send_request(request, false)
                .map_err(|source| HboneError::Http { address, source })?;
            let response = response
                .await
                .map_err(|source| HboneError::Http { address, source })?;
            if response.status() != StatusCode::OK {
                return Err(HboneError::Refused {
                    target,
                    status: response.status(),
                });
            }
            Ok(H2Stream::new(send, response.into_body()))
        };
        // A peer that stopped answering holds the stream no longer than
        // this (its connection is closed by the keepalive).
        match tokio::time::timeout(self.settings.connect, exchange).await {
            Ok(stream) => Ok(Tunnel { io: stream?, slot }),
            Err(_) => {
                self.timed_out(context, pod, Phase::Connect, address);
                Err(self.timeout_error(Phase::Connect, address))
            }
        }
    }
}
