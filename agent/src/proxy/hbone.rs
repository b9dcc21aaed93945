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
use h2::{RecvStream, server::SendResponse};
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpStream;
use weir_common::{INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

use super::{
    Outcome, PodHandle, ProxyContext,
    h2::{H2Stream, Keepalive},
    idle::{Activity, StreamGuard, Streams, Unused, Watched},
    inbound,
    limits::{CLOSE_GRACE, Listener, PING_INTERVAL, PING_TIMEOUT, Phase},
    pool::{CONNECTION_WINDOW, MAX_CONCURRENT_STREAMS, MAX_FRAME, MAX_HEADER_LIST, STREAM_WINDOW},
};
use crate::{
    security::identity::{Identity, WorkloadCertificate},
    security::tls,
    telemetry::burst::Burst,
};

/// At most this many streams the server resets for a protocol error before
/// it drops the connection (hyper's default, kept).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// Bytes buffered per stream for sending (hyper's server default, kept).
const SERVER_SEND_BUFFER: usize = 400 << 10;

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
    // The tunnel's socket: its streams' records share its figures.
    let kernel_leg = crate::telemetry::kernel_tcp::SharedLeg::follow(
        &context.telemetry,
        std::os::fd::AsFd::as_fd(&tcp),
    );
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
    // The preface and a first complete CONNECT within the handshake
    // timeout; later, no open stream for the idle timeout ends it.
    let unused = streams.unused(settings.handshake_timeout, settings.idle_timeout);
    tokio::pin!(unused);
    let heard = Activity::new();
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        // The limits hyper's HTTP/2 server set, kept as they were.
        .max_header_list_size(MAX_HEADER_LIST)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .max_send_buffer_size(SERVER_SEND_BUFFER);
    let handshake = builder.handshake::<_, Bytes>(Watched::reads(tls, heard.clone(), ()));
    let mut connection = tokio::select! {
        handshake = handshake => match handshake {
            Ok(connection) => connection,
            Err(error) => {
                tracing::debug!(%error, src = %peer, "HBONE connection ended");
                return;
            }
        },
        _ = &mut unused => {
            context.limits.timed_out(Phase::HboneHeaders, Listener::Hbone.name(), &peer);
            return;
        }
    };
    // Pings find a peer that went away without a word (ztunnel's HBONE
    // server pings too).
    let keepalive = Keepalive {
        interval: PING_INTERVAL,
        timeout: PING_TIMEOUT,
    };
    let pings = keepalive.run(connection.ping_pong(), &heard);
    tokio::pin!(pings);
    // Accepting also drives the connection: every stream's bytes move
    // while this loop runs.
    let stream = |(request, respond)| {
        tokio::spawn(handle_stream(
            context.clone(),
            pod.clone(),
            request,
            respond,
            peer,
            local.ip(),
            peer_identity.clone(),
            streams.open(),
            kernel_leg.clone(),
        ));
    };
    loop {
        tokio::select! {
            accepted = connection.accept() => match accepted {
                Some(Ok(accepted)) => stream(accepted),
                Some(Err(error)) => {
                    tracing::debug!(%error, src = %peer, "HBONE connection ended");
                    return;
                }
                None => return,
            },
            () = &mut pings => {
                tracing::debug!(src = %peer, "HBONE peer stopped answering pings; connection closed");
                return;
            }
            why = &mut unused => {
                match why {
                    Unused::NoFirstStream => context.limits.timed_out(
                        Phase::HboneHeaders,
                        Listener::Hbone.name(),
                        &peer,
                    ),
                    Unused::Idle => {
                        context.limits.timeout_counter(Phase::Idle).inc();
                    }
                }
                // A GOAWAY, and a short grace for streams already on
                // their way; then the connection is dropped (a hostile
                // peer never answers).
                connection.graceful_shutdown();
                let _ = tokio::time::timeout(CLOSE_GRACE, async {
                    while let Some(Ok(accepted)) = connection.accept().await {
                        stream(accepted);
                    }
                })
                .await;
                return;
            }
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

fn status(code: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = code;
    response
}

/// Answers a refused `CONNECT`: the status ends the stream.
fn refuse(mut respond: SendResponse<Bytes>, code: StatusCode) {
    // Fails only if the client already reset the stream: nobody to tell.
    let _ = respond.send_response(status(code), true);
}

/// The client address from `forwarded: for="ip:port"`, else the TCP peer.
fn forwarded_for(request: &Request<RecvStream>, tcp_peer: SocketAddr) -> SocketAddr {
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
#[allow(clippy::too_many_arguments)]
async fn handle_stream(
    context: Arc<ProxyContext>,
    pod: Arc<PodHandle>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    tcp_peer: SocketAddr,
    local_ip: IpAddr,
    peer_identity: Identity,
    stream: StreamGuard,
    kernel_leg: Option<Arc<crate::telemetry::kernel_tcp::SharedLeg>>,
) {
    let started = Instant::now();
    if request.method() != Method::CONNECT {
        return refuse(respond, StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(target) = request
        .uri()
        .authority()
        .and_then(|authority| authority.as_str().parse::<SocketAddr>().ok())
    else {
        return refuse(respond, StatusCode::BAD_REQUEST);
    };
    // The tunnel may only reach the pod it arrived at, never the proxy itself.
    if target.ip() != local_ip
        || [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT].contains(&target.port())
    {
        return refuse(respond, StatusCode::BAD_REQUEST);
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
    let baggage = crate::telemetry::baggage::Baggage::parse(
        request
            .headers()
            .get_all(crate::telemetry::baggage::HEADER)
            .iter(),
    )
    .map(Box::new);
    let mut connection = inbound::open_record(&context, &arrival, baggage);
    connection.share_kernel_leg(kernel_leg.as_ref().map(|leg| leg.begin()));
    let admitted = match inbound::admit(&context, &arrival).await {
        Ok(admitted) => admitted,
        Err(refused) => {
            let code = match refused {
                inbound::Refused::Denied(_) => StatusCode::UNAUTHORIZED,
                inbound::Refused::Unreachable(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            context.close_connection(connection, &refused.outcome());
            return refuse(respond, code);
        }
    };
    // The 200 says who answered, as ztunnel's does, for a client that
    // does not have this pod in its state.
    let mut ok = status(StatusCode::OK);
    if let Some(baggage) = context
        .store
        .workload(target.ip())
        .and_then(|workload| crate::telemetry::baggage::Baggage::of(&workload).header())
    {
        ok.headers_mut()
            .insert(crate::telemetry::baggage::HEADER, baggage);
    }
    let outcome = match respond.send_response(ok, false) {
        Ok(send) => {
            let stream = H2Stream::new(send, request.into_body());
            inbound::deliver(&context, &arrival, admitted, stream, &connection).await
        }
        Err(error) => Outcome::Failed(format!("CONNECT response: {error}")),
    };
    context.close_connection(connection, &outcome);
    drop(stream);
}
