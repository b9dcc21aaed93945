//! The HBONE client's connection pool: each proxied connection is one
//! HTTP/2 `CONNECT` stream (not extended CONNECT) over mutual TLS to the
//! destination pod's IP on port 15008, `:authority` = the original
//! destination `ip:port`. Connections are pooled per (source identity,
//! destination identity, destination address, source certificate), up to
//! `MAX_STREAMS_PER_CONNECTION` streams each; the pool owns their
//! lifecycle: opening (one at a time per key), reuse, and retirement.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo};
use weir_common::{INBOUND_HBONE_PORT, MARK_BYPASS};

use super::{PodHandle, ProxyContext, connect_from_pod};
use crate::{security::identity::Identity, security::tls};

/// A client pools up to this many streams on one connection (as ztunnel).
pub const MAX_STREAMS_PER_CONNECTION: usize = 100;
/// A server accepts at most this many concurrent streams per connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 200;
pub(super) const STREAM_WINDOW: u32 = 4 << 20;
pub(super) const CONNECTION_WINDOW: u32 = 16 << 20;
pub(super) const MAX_FRAME: u32 = 1 << 20;

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
        source: hyper::Error,
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
    destination: Identity,
    address: SocketAddr,
    /// A renewed certificate opens new connections; old ones drain.
    certificate: String,
}

struct PooledConnection {
    sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    streams: Arc<AtomicUsize>,
}

/// The client side's connection pool.
#[derive(Default)]
pub struct HbonePool {
    connections: Mutex<HashMap<TunnelKey, Vec<PooledConnection>>>,
    /// Concurrent first connects to a peer share one TLS connection.
    opening: super::single_flight::OpenTurns<TunnelKey>,
    /// TLS connections opened (for tests and metrics).
    pub handshakes: std::sync::atomic::AtomicU64,
}

/// One counted stream of a pooled connection; uncounted when dropped.
struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A tunnel stream; its connection's stream count drops with it.
pub struct Tunnel {
    pub io: TokioIo<Upgraded>,
    _slot: StreamSlot,
}

impl tokio::io::AsyncRead for Tunnel {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Tunnel {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl HbonePool {
    fn checkout(
        &self,
        key: &TunnelKey,
    ) -> Option<(
        hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
        Arc<AtomicUsize>,
    )> {
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        let list = connections.get_mut(key)?;
        list.retain(|connection| !connection.sender.is_closed());
        list.iter()
            .find(|connection| {
                connection.sender.is_ready()
                    && connection.streams.load(Ordering::Relaxed) < MAX_STREAMS_PER_CONNECTION
            })
            .map(|connection| {
                connection.streams.fetch_add(1, Ordering::Relaxed);
                (connection.sender.clone(), connection.streams.clone())
            })
    }

    /// Opens a tunnel from `pod` (as `source`) to `target`, whose workload
    /// must present `destination`.
    pub async fn connect(
        &self,
        context: &ProxyContext,
        pod: &PodHandle,
        source: &Identity,
        destination: &Identity,
        target: SocketAddr,
        client: SocketAddr,
    ) -> Result<Tunnel, HboneError> {
        let certificate = context.secrets.fetch(source).await?;
        let address = SocketAddr::new(target.ip(), INBOUND_HBONE_PORT);
        let key = TunnelKey {
            source: source.clone(),
            destination: destination.clone(),
            address,
            certificate: certificate.serial.clone(),
        };
        let (mut sender, streams) = match self.checkout(&key) {
            Some(found) => found,
            None => {
                let turn = self
                    .opening
                    .take(&key)
                    .await
                    .map_err(|_| HboneError::ConcurrentOpenFailed { address })?;
                // Whoever had the turn before may have opened one.
                match self.checkout(&key) {
                    Some(found) => found,
                    None => {
                        let sender = self
                            .open(context, pod, &certificate, destination, address)
                            .await
                            .inspect_err(|_| turn.failed())?;
                        let streams = Arc::new(AtomicUsize::new(1));
                        self.connections
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .entry(key.clone())
                            .or_default()
                            .push(PooledConnection {
                                sender: sender.clone(),
                                streams: streams.clone(),
                            });
                        (sender, streams)
                    }
                }
            }
        };
        // From here the stream is counted; dropping the slot uncounts it.
        let slot = StreamSlot(streams);
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header("forwarded", format!("for=\"{client}\""))
            .body(Empty::<Bytes>::new())
            .map_err(|_| HboneError::Refused {
                target,
                status: StatusCode::BAD_REQUEST,
            })?;
        sender
            .ready()
            .await
            .map_err(|source| HboneError::Http { address, source })?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|source| HboneError::Http { address, source })?;
        if response.status() != StatusCode::OK {
            return Err(HboneError::Refused {
                target,
                status: response.status(),
            });
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|source| HboneError::Http { address, source })?;
        Ok(Tunnel {
            io: TokioIo::new(upgraded),
            _slot: slot,
        })
    }

    async fn open(
        &self,
        context: &ProxyContext,
        pod: &PodHandle,
        certificate: &crate::security::identity::WorkloadCertificate,
        destination: &Identity,
        address: SocketAddr,
    ) -> Result<hyper::client::conn::http2::SendRequest<Empty<Bytes>>, HboneError> {
        let config = tls::client_config(certificate, destination.clone())?;
        let tcp = connect_from_pod(&context.home, pod, address, MARK_BYPASS, None)
            .await
            .map_err(|source| HboneError::Connect { address, source })?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(tls::peer_name(address.ip()), tcp)
            .await
            .map_err(|source| {
                context.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                context.telemetry.metrics.tls_failures.inc();
                tracing::warn!(
                    pod = %pod.id,
                    peer = %address,
                    expected = %destination,
                    error = %source,
                    "HBONE handshake failed"
                );
                HboneError::Handshake { address, source }
            })?;
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|source| HboneError::Http { address, source })?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, peer = %address, "HBONE connection ended");
            }
        });
        Ok(sender)
    }
}
