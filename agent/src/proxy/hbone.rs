//! The HBONE server: a pod's listener on 15008. It terminates mutual TLS
//! with the pod's certificate, and each HTTP/2 `CONNECT` stream becomes an
//! arrival on the one inbound path (`inbound.rs`).
use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use weir_common::{INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

use super::{
    Outcome, PodHandle, ProxyContext, inbound,
    pool::{CONNECTION_WINDOW, MAX_CONCURRENT_STREAMS, MAX_FRAME, STREAM_WINDOW},
};
use crate::{security::identity::Identity, security::tls};

/// Serves one pod's HBONE listener.
pub async fn serve(
    context: Arc<ProxyContext>,
    pod: Arc<PodHandle>,
    listener: tokio::net::TcpListener,
) {
    super::accept_loop("hbone", context, pod, listener, handle_connection).await
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
    let certificate = match context.secrets.fetch(&pod.identity).await {
        Ok(certificate) => certificate,
        Err(error) => {
            tracing::error!(pod = %pod.id, %error, "no certificate; refusing HBONE");
            return;
        }
    };
    let config = match tls::server_config(&certificate) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(pod = %pod.id, %error, "TLS configuration");
            return;
        }
    };
    let tls = match tokio_rustls::TlsAcceptor::from(config).accept(tcp).await {
        Ok(tls) => tls,
        Err(error) => {
            context.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
            context.telemetry.metrics.tls_failures.inc();
            tracing::warn!(pod = %pod.id, identity = %pod.identity, src = %peer, %error, "HBONE handshake refused");
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
    let service = hyper::service::service_fn(move |request| {
        let context = context.clone();
        let pod = pod.clone();
        let peer_identity = peer_identity.clone();
        async move {
            Ok::<_, std::convert::Infallible>(
                handle_stream(context, pod, request, peer, local.ip(), peer_identity).await,
            )
        }
    });
    let result = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .serve_connection(TokioIo::new(tls), service)
        .await;
    if let Err(error) = result {
        tracing::debug!(%error, src = %peer, "HBONE connection ended");
    }
}

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

async fn handle_stream(
    context: Arc<ProxyContext>,
    pod: Arc<PodHandle>,
    request: Request<hyper::body::Incoming>,
    tcp_peer: SocketAddr,
    local_ip: IpAddr,
    peer_identity: Identity,
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
    });
    status(StatusCode::OK)
}
