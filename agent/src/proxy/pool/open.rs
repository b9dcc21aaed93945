//! Opening a pooled connection: TCP from the source pod's namespace (with
//! TCP keepalive), mutual TLS, then HTTP/2 with keepalive PINGs. Each
//! phase has its own timeout, so a peer that accepts and then says nothing
//! fails the opening (and whoever waited on it) instead of holding it.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use weir_common::MARK_BYPASS;

use super::{
    CONNECTION_WINDOW, HboneError, HbonePool, MAX_FRAME, MAX_HEADER_LIST,
    MAX_STREAMS_PER_CONNECTION, STREAM_WINDOW,
    lifecycle::{ConnectionState, OpenGuard},
};
use crate::{
    proxy::{PodHandle, ProxyContext, connect_from_pod, idle::Watched},
    security::{identity::Identity, identity::WorkloadCertificate, tls},
};

/// The phases of opening a tunnel, as counted and logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    TcpConnect,
    TlsHandshake,
    Http2Handshake,
    /// The `CONNECT` of one stream, until the peer's answer.
    Connect,
}

impl Phase {
    pub const ALL: [Phase; 4] = [
        Phase::TcpConnect,
        Phase::TlsHandshake,
        Phase::Http2Handshake,
        Phase::Connect,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Phase::TcpConnect => "tcp_connect",
            Phase::TlsHandshake => "tls_handshake",
            Phase::Http2Handshake => "http2_handshake",
            Phase::Connect => "connect",
        }
    }
}

pub(super) type Io = Watched<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, OpenGuard>;

/// Bytes buffered per stream for sending (hyper's client default, kept).
const CLIENT_SEND_BUFFER: usize = 1 << 20;
/// At most this many streams reset for a protocol error before the
/// connection is dropped (hyper's default, kept).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// A connection with its handshakes done, not yet pooled.
pub(super) struct Opened {
    pub sender: h2::client::SendRequest<Bytes>,
    pub connection: h2::client::Connection<Io, Bytes>,
    pub state: Arc<ConnectionState>,
}

impl HbonePool {
    pub(super) async fn open(
        &self,
        context: &ProxyContext,
        pod: &PodHandle,
        certificate: &WorkloadCertificate,
        destination: &Identity,
        address: SocketAddr,
    ) -> Result<Opened, HboneError> {
        let config = tls::client_config(certificate, destination.clone())?;
        let tcp = connect_from_pod(&context.home, pod, address, MARK_BYPASS, None)
            .await
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::TimedOut {
                    self.timed_out(context, pod, Phase::TcpConnect, address);
                }
                HboneError::Connect { address, source }
            })?;
        // A peer that vanished without a word is also found by the HTTP/2
        // PINGs; TCP keepalive keeps middleboxes from dropping a quiet
        // connection and catches a dead host at the socket level.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(self.settings.tcp_keepalive)
            .with_interval(self.settings.tcp_keepalive_interval)
            .with_retries(self.settings.tcp_keepalive_retries);
        if let Err(error) = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive) {
            tracing::debug!(%error, peer = %address, "TCP keepalive not set");
        }
        // The tunnel's socket: its streams' records share its figures.
        let kernel_leg = crate::telemetry::kernel_tcp::SharedLeg::follow(
            &context.telemetry,
            std::os::fd::AsFd::as_fd(&tcp),
        );
        let handshake =
            tokio_rustls::TlsConnector::from(config).connect(tls::peer_name(address.ip()), tcp);
        let tls = match tokio::time::timeout(self.settings.tls_handshake, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(source)) => {
                context
                    .stats
                    .tls_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                context.telemetry.metrics.tls_failures.inc();
                if let Some(suppressed) = self.handshake_failures.hit() {
                    tracing::warn!(
                        pod = %pod.id,
                        peer = %address,
                        expected = %destination,
                        error = %source,
                        suppressed,
                        "HBONE handshake failed"
                    );
                }
                return Err(HboneError::Handshake { address, source });
            }
            Err(_) => {
                self.timed_out(context, pod, Phase::TlsHandshake, address);
                return Err(self.timeout_error(Phase::TlsHandshake, address));
            }
        };
        let state =
            ConnectionState::new(context.telemetry.metrics.hbone_client.clone(), kernel_leg);
        let io = Watched::reads(tls, state.heard.clone(), OpenGuard::new(state.clone()));
        // Keepalive PINGs are the driver's (`lifecycle`), idle or not.
        let handshake = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .initial_max_send_streams(MAX_STREAMS_PER_CONNECTION)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(CLIENT_SEND_BUFFER)
            .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
            .enable_push(false)
            .handshake::<_, Bytes>(io);
        let (sender, connection) =
            match tokio::time::timeout(self.settings.http2_handshake, handshake).await {
                Ok(Ok(opened)) => opened,
                Ok(Err(source)) => {
                    state.close_as("error");
                    return Err(HboneError::Http { address, source });
                }
                Err(_) => {
                    state.close_as("error");
                    self.timed_out(context, pod, Phase::Http2Handshake, address);
                    return Err(self.timeout_error(Phase::Http2Handshake, address));
                }
            };
        Ok(Opened {
            sender,
            connection,
            state,
        })
    }

    pub(super) fn timeout_error(&self, phase: Phase, address: SocketAddr) -> HboneError {
        HboneError::TimedOut {
            phase: phase.label(),
            address,
            after: self.settings.timeout(phase),
        }
    }

    /// Counts a phase that timed out; logs it once per burst.
    pub(super) fn timed_out(
        &self,
        context: &ProxyContext,
        pod: &PodHandle,
        phase: Phase,
        address: SocketAddr,
    ) {
        context
            .telemetry
            .metrics
            .hbone_client
            .timed_out(phase.label());
        let burst = &self.timeouts[Phase::ALL.iter().position(|p| *p == phase).unwrap_or(0)];
        if let Some(suppressed) = burst.hit() {
            tracing::warn!(
                pod = %pod.id,
                peer = %address,
                phase = phase.label(),
                timeout_ms = self.settings.timeout(phase).as_millis() as u64,
                suppressed,
                "HBONE client timed out"
            );
        }
    }
}

/// The HBONE client's timeouts and keepalives (`hbone_client` in the
/// config), as durations.
#[derive(Clone, Debug)]
pub struct Settings {
    pub tls_handshake: Duration,
    pub http2_handshake: Duration,
    pub connect: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub tcp_keepalive: Duration,
    pub tcp_keepalive_interval: Duration,
    pub tcp_keepalive_retries: u32,
    pub idle_timeout: Duration,
}

impl Settings {
    pub fn timeout(&self, phase: Phase) -> Duration {
        match phase {
            Phase::TcpConnect => crate::proxy::CONNECT_TIMEOUT,
            Phase::TlsHandshake => self.tls_handshake,
            Phase::Http2Handshake => self.http2_handshake,
            Phase::Connect => self.connect,
        }
    }
}

impl From<&crate::config::HboneClientConfig> for Settings {
    fn from(config: &crate::config::HboneClientConfig) -> Settings {
        let seconds = Duration::from_secs;
        Settings {
            tls_handshake: seconds(config.tls_handshake_timeout_seconds),
            http2_handshake: seconds(config.http2_handshake_timeout_seconds),
            connect: seconds(config.connect_timeout_seconds),
            keepalive_interval: seconds(config.keepalive_interval_seconds),
            keepalive_timeout: seconds(config.keepalive_timeout_seconds),
            tcp_keepalive: seconds(config.tcp_keepalive_seconds),
            tcp_keepalive_interval: seconds(config.tcp_keepalive_interval_seconds),
            tcp_keepalive_retries: config.tcp_keepalive_retries,
            idle_timeout: seconds(config.idle_timeout_seconds),
        }
    }
}
