//! The HBONE server: a pod's listener on 15008. It terminates mutual TLS
//! with the pod's certificate, and each HTTP/2 `CONNECT` stream becomes an
//! arrival on the one inbound path (`inbound.rs`). Every phase is bounded:
//! the handshake and the first CONNECT by the handshake timeout, an
//! established connection by pings and the idle timeout, each tunnel by
//! the relay's idle timeout.
use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, LazyLock, atomic::Ordering},
    time::Instant,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use weir_common::{INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

use super::{
    Outcome, PodHandle, ProxyContext,
    http::server::drive_http2,
    idle::{StreamGuard, Streams, Unused},
    inbound,
    limits::{Listener, PING_INTERVAL, PING_TIMEOUT, Phase},
    pool::{CONNECTION_WINDOW, MAX_CONCURRENT_STREAMS, MAX_FRAME, STREAM_WINDOW},
};
use crate::{
    security::identity::{Identity, WorkloadCertificate},
    security::tls,
    telemetry::burst::Burst,
};

/// Serves one pod's HBONE listener.
pub async fn serve(
    context: Arc<ProxyContext>,
    pod: Arc<PodHandle>,
    listener: tokio::net::TcpListener,
) {
    super::accept_loop(
        super::limits::Listener::Hbone,
        context,
        pod,
        listener,
        handle_connection,
    )
    .await
}

async fn handle_connection(
    context: Arc<ProxyContext>,
    pod: Arc<PodHandle>,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let local = match tcp.local_addr() {
        Ok(local) => local,
        Err(_) => return,
    };
    let settings = context.limits.settings();
    // The certificate (a first fetch may wait for the CA) and the
    // handshake both within the handshake timeout: a silent or slow
    // client holds a descriptor and a task for no longer.
    let handshake = tokio::time::timeout(
        settings.handshake_timeout,
        accept_tls(&context, &pod, tcp, peer),
    );
    let (tls, certificate) = match handshake.await {
        Ok(Some(accepted)) => accepted,
        Ok(None) => return,
        Err(_) => {
            context
                .limits
                .timed_out(Phase::TlsHandshake, Listener::Hbone.name(), &peer);
            return;
        }
    };
    let peer_certificates = tls.get_ref().1.peer_certificates();
    let Some(peer_identity) = tls::peer_identity(peer_certificates) else {
        return;
    };
    let peer_certificate = peer_certificates
        .and_then(|chain| chain.first())
        .and_then(|leaf| x509_parser::parse_x509_certificate(leaf).ok())
        .map(|(_, cert)| cert.raw_serial_as_string())
        .unwrap_or_default();
    tracing::info!(
        pod = %pod.id,
        src = %peer,
        peer_identity = %peer_identity,
        peer_certificate = %peer_certificate,
        local_certificate = %certificate.serial,
        "HBONE connection accepted"
    );
    let streams = Streams::default();
    let service = {
        let context = context.clone();
        let streams = streams.clone();
        hyper::service::service_fn(move |request| {
            let context = context.clone();
            let pod = pod.clone();
            let peer_identity = peer_identity.clone();
            let stream = streams.open();
            async move {
                Ok::<_, std::convert::Infallible>(
                    handle_stream(
                        context,
                        pod,
                        request,
                        peer,
                        local.ip(),
                        peer_identity,
                        stream,
                    )
                    .await,
                )
            }
        })
    };
    // Pings find a peer that went away without a word (ztunnel's HBONE
    // server pings too).
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(PING_INTERVAL)
        .keep_alive_timeout(PING_TIMEOUT)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .serve_connection(TokioIo::new(tls), service);
    // The preface and a first complete CONNECT within the handshake
    // timeout; later, no open stream for the idle timeout ends it.
    let ended = drive_http2(
        connection,
        &streams,
        settings.handshake_timeout,
        settings.idle_timeout,
        |connection| connection.graceful_shutdown(),
    )
    .await;
    match ended {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::debug!(%error, src = %peer, "HBONE connection ended"),
        Err(Unused::NoFirstStream) => {
            context
                .limits
                .timed_out(Phase::HboneHeaders, Listener::Hbone.name(), &peer)
        }
        Err(Unused::Idle) => {
            context.limits.timeout_counter(Phase::Idle).inc();
        }
    }
}

/// The TLS handshake with the pod's certificate; `None` (logged once per
/// burst, counted) when it fails.
async fn accept_tls(
    context: &ProxyContext,
    pod: &PodHandle,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<(
    tokio_rustls::server::TlsStream<TcpStream>,
    Arc<WorkloadCertificate>,
)> {
    let certificate = match context.secrets.fetch(&pod.identity).await {
        Ok(certificate) => certificate,
        Err(error) => {
            if let Some(suppressed) = NO_CERTIFICATE.hit() {
                tracing::error!(pod = %pod.id, %error, suppressed, "no certificate; refusing HBONE");
            }
            return None;
        }
    };
    let config = match tls::server_config(&certificate) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(pod = %pod.id, %error, "TLS configuration");
            return None;
        }
    };
    match tokio_rustls::TlsAcceptor::from(config).accept(tcp).await {
        Ok(tls) => Some((tls, certificate)),
        Err(error) => {
            context.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
            context.telemetry.metrics.tls_failures.inc();
            if let Some(suppressed) = HANDSHAKE_REFUSED.hit() {
                tracing::warn!(pod = %pod.id, identity = %pod.identity, src = %peer, %error, suppressed, "HBONE handshake refused (further refusals in the next 10 s are counted, not logged)");
            }
            None
        }
    }
}

/// Failed handshakes are logged once per burst: a peer can make many.
static HANDSHAKE_REFUSED: LazyLock<Burst> = LazyLock::new(Burst::default);
static NO_CERTIFICATE: LazyLock<Burst> = LazyLock::new(Burst::default);

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = code;
    response
}

/// The client address from `forwarded: for="ip:port"`, else the TCP peer.
fn forwarded_for(request: &Request<hyper::body::Incoming>, tcp_peer: SocketAddr) -> SocketAddr {
    request
        .headers()
        .get("forwarded")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            value
                .split(';')
                .find_map(|part| part.trim().strip_prefix("for="))
                .map(|addr| addr.trim_matches('"').to_string())
        })
        .and_then(|addr| addr.parse::<SocketAddr>().ok())
        .filter(|addr| addr.ip() == tcp_peer.ip())
        .unwrap_or(tcp_peer)
}

/// One CONNECT stream; `stream` keeps the connection in use until the
/// tunnel ends.
async fn handle_stream(
    context: Arc<ProxyContext>,
    pod: Arc<PodHandle>,
    request: Request<hyper::body::Incoming>,
    tcp_peer: SocketAddr,
    local_ip: IpAddr,
    peer_identity: Identity,
    stream: StreamGuard,
) -> Response<Empty<Bytes>> {
    let started = Instant::now();
    if request.method() != Method::CONNECT {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(target) = request
        .uri()
        .authority()
        .and_then(|authority| authority.as_str().parse::<SocketAddr>().ok())
    else {
        return status(StatusCode::BAD_REQUEST);
    };
    // The tunnel may only reach the pod it arrived at, never the proxy itself.
    if target.ip() != local_ip
        || [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT].contains(&target.port())
    {
        return status(StatusCode::BAD_REQUEST);
    }
    let client = forwarded_for(&request, tcp_peer);
    let arrival = Arc::new(inbound::Arrival {
        client,
        bind: SocketAddr::new(client.ip(), 0),
        pod,
        target,
        source_identity: Some(peer_identity),
        protocol: "hbone",
        started,
    });
    // The answer to CONNECT says whether the stream was admitted; its bytes
    // flow once the client has it.
    let connection = inbound::open_record(&context, &arrival);
    let admitted = match inbound::admit(&context, &arrival).await {
        Ok(admitted) => admitted,
        Err(refused) => {
            let code = match refused {
                inbound::Refused::Denied(_) => StatusCode::UNAUTHORIZED,
                inbound::Refused::Unreachable(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            context.close_connection(connection, &refused.outcome());
            return status(code);
        }
    };
    tokio::spawn(async move {
        let outcome = match hyper::upgrade::on(request).await {
            Ok(upgraded) => {
                inbound::deliver(
                    &context,
                    &arrival,
                    admitted,
                    TokioIo::new(upgraded),
                    &connection,
                )
                .await
            }
            Err(error) => Outcome::Failed(format!("upgrade: {error}")),
        };
        context.close_connection(connection, &outcome);
        drop(stream);
    });
    status(StatusCode::OK)
}
