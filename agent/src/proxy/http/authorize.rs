//! Inbound L7 authorization: a stream arriving for a pod whose policies
//! look at HTTP (methods, paths, hosts, headers) is parsed here, on the
//! destination's side, and every request is authorized before it reaches
//! the application. Denied requests get 403 (`PERMISSION_DENIED` for gRPC),
//! as Envoy's RBAC filter answers. A stream that turns out not to be HTTP is
//! authorized once with no request (HTTP-only ALLOW rules cannot match it).
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
    time::Instant,
};

use bytes::{Buf as _, Bytes, BytesMut};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::{body::Incoming, client::conn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

use super::{
    DETECTION_TIMEOUT, ProxyBody,
    body::RequestBody,
    detect, full,
    headers::{is_grpc, request_host, split_host_port},
    local_reply::grpc_reply,
    server::{serve_requests, stalled},
    upgrade::{is_upgrade, splice_upgrade},
    upstream::Io,
};
use crate::{
    proxy::{
        Outcome, PodHandle, ProxyContext, inbound::Arrival, limits::Phase, metered::Metered,
        relay_io,
    },
    security::authorization::RequestAttributes,
    telemetry::connection::ByteMeter,
};

/// Opens the connection to the application (inside the pod, from the
/// client's address).
pub type ConnectApp = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = std::io::Result<tokio::net::TcpStream>> + Send>>
        + Send
        + Sync,
>;

/// Connects to `target` inside `pod` (from `source`, the client's address,
/// when given), as every inbound delivery does.
pub fn app_connector(
    context: Arc<ProxyContext>,
    pod: Arc<PodHandle>,
    target: SocketAddr,
    source: Option<SocketAddr>,
) -> ConnectApp {
    Arc::new(move || {
        let context = context.clone();
        let pod = pod.clone();
        Box::pin(async move {
            crate::proxy::connect_from_pod(
                &context.home,
                &pod,
                target,
                weir_common::MARK_LOCAL,
                source,
            )
            .await
        })
    })
}

/// Serves `stream` for `arrival.pod`: HTTP is parsed and authorized per
/// request; anything else is authorized once and relayed (and watched for
/// policy changes, as any L4 connection). Its bytes are counted into
/// `bytes` as they flow.
pub async fn serve<S: Io>(
    context: Arc<ProxyContext>,
    arrival: Arc<Arrival>,
    mut stream: S,
    connect_app: ConnectApp,
    bytes: Arc<ByteMeter>,
) -> Outcome {
    let (prefix, protocol) = read_prefix(&mut stream).await;
    // Counted as the prefix is read again, once.
    let io = PrefixedIo {
        prefix: prefix.freeze(),
        inner: stream,
    };
    if protocol == detect::Protocol::Opaque {
        let mut registration = context.established.register(
            &arrival.pod,
            arrival.client,
            arrival.target,
            arrival.source_identity.as_ref(),
        );
        if let Err(policy) = context.authorize_request(
            &arrival.pod,
            arrival.client,
            arrival.target,
            arrival.source_identity.as_ref(),
            None,
        ) {
            return Outcome::Denied(format!("denied by policy {policy}"));
        }
        return match connect_app().await {
            Ok(app) => relay_io(&context, &bytes, Some(&mut registration), io, app).await,
            Err(error) => {
                context.stats.failed();
                Outcome::Failed(format!("deliver to {}: {error}", arrival.target))
            }
        };
    }
    let io = Metered::new(io, bytes);
    let app = Arc::new(AppConnection {
        http2: protocol == detect::Protocol::Http2,
        connect: connect_app,
        sender: tokio::sync::Mutex::new(None),
    });
    let http2 = protocol == detect::Protocol::Http2;
    let peer = arrival.client;
    let handler = {
        let context = context.clone();
        move |request| {
            let context = context.clone();
            let arrival = arrival.clone();
            let app = app.clone();
            async move { authorize_and_forward(&context, &arrival, &app, request).await }
        }
    };
    serve_requests(&context, io, http2, peer, handler).await
}

/// Reads the stream's first bytes, until they tell the protocol or the
/// client goes quiet.
async fn read_prefix<S: Io>(stream: &mut S) -> (BytesMut, detect::Protocol) {
    let mut prefix = BytesMut::with_capacity(detect::MAX_PREFIX);
    let deadline = tokio::time::Instant::now() + DETECTION_TIMEOUT;
    loop {
        let mut chunk = [0u8; detect::MAX_PREFIX];
        let wanted = detect::MAX_PREFIX - prefix.len().min(detect::MAX_PREFIX);
        let read =
            tokio::time::timeout_at(deadline, stream.read(&mut chunk[..wanted.max(1)])).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return (prefix, detect::Protocol::Opaque),
            Ok(Ok(n)) => prefix.extend_from_slice(&chunk[..n]),
        }
        if let Some(protocol) = detect::classify_prefix(&prefix) {
            return (prefix, protocol);
        }
    }
}

/// The application side of one arriving connection: opened at the first
/// allowed request, HTTP/1.1 or HTTP/2 as the client spoke.
struct AppConnection {
    http2: bool,
    connect: ConnectApp,
    sender: tokio::sync::Mutex<Option<AppSender>>,
}

enum AppSender {
    Http1(conn::http1::SendRequest<ProxyBody>),
    Http2(conn::http2::SendRequest<ProxyBody>),
}

impl AppConnection {
    async fn send(&self, request: Request<ProxyBody>) -> Result<Response<Incoming>, String> {
        let mut slot = self.sender.lock().await;
        let reusable = match slot.as_mut() {
            Some(AppSender::Http1(sender)) => sender.ready().await.is_ok(),
            Some(AppSender::Http2(sender)) => !sender.is_closed(),
            None => false,
        };
        if !reusable {
            *slot = Some(self.open().await?);
        }
        match slot.as_mut() {
            Some(AppSender::Http1(sender)) => sender.send_request(request).await,
            Some(AppSender::Http2(sender)) => {
                let mut sender = sender.clone();
                drop(slot);
                sender.send_request(request).await
            }
            None => return Err("no application connection".into()),
        }
        .map_err(|error| error.to_string())
    }

    async fn open(&self) -> Result<AppSender, String> {
        let tcp = (self.connect)().await.map_err(|error| error.to_string())?;
        let _ = tcp.set_nodelay(true);
        if self.http2 {
            let (sender, connection) = conn::http2::Builder::new(TokioExecutor::new())
                .handshake(TokioIo::new(tcp))
                .await
                .map_err(|error| error.to_string())?;
            tokio::spawn(connection);
            Ok(AppSender::Http2(sender))
        } else {
            let (sender, connection) = conn::http1::Builder::new()
                .handshake(TokioIo::new(tcp))
                .await
                .map_err(|error| error.to_string())?;
            tokio::spawn(connection.with_upgrades());
            Ok(AppSender::Http1(sender))
        }
    }
}

async fn authorize_and_forward(
    context: &Arc<ProxyContext>,
    arrival: &Arrival,
    app: &AppConnection,
    mut request: Request<Incoming>,
) -> Response<ProxyBody> {
    let grpc = is_grpc(request.headers());
    let host = request_host(&request).unwrap_or_default();
    let (host_name, _) = split_host_port(&host);
    let method = request.method().as_str().to_string();
    let verdict = context.authorize_request(
        &arrival.pod,
        arrival.client,
        arrival.target,
        arrival.source_identity.as_ref(),
        Some(RequestAttributes {
            method: &method,
            path: request.uri().path(),
            host: host_name,
            headers: request.headers(),
        }),
    );
    if verdict.is_err() {
        return denied(grpc);
    }
    context
        .http
        .inbound_requests
        .fetch_add(1, Ordering::Relaxed);
    let upgrade = !app.http2 && is_upgrade(&request);
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let (parts, body) = request.into_parts();
    // Read through a RequestBody (nothing kept) to tell the client's body
    // errors from the application's.
    let body = RequestBody::new(body, 0);
    let mut forwarded = Request::from_parts(parts, body.attempt(0).boxed());
    if app.http2 {
        // The client's :authority stays; hyper needs the absolute form.
        let path = forwarded
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let authority = if host.is_empty() {
            arrival.target.to_string()
        } else {
            host.clone()
        };
        if let Ok(uri) = format!("http://{authority}{path}").parse() {
            *forwarded.uri_mut() = uri;
        }
    }
    let started = Instant::now();
    let stream_idle = context.limits.settings().stream_idle_timeout;
    let sent = tokio::select! {
        sent = app.send(forwarded) => sent,
        () = stalled(stream_idle, || body.received()) => {
            context.limits.timeout_counter(Phase::StreamIdle).inc();
            return plain_reply(StatusCode::GATEWAY_TIMEOUT, "stream timeout\n");
        }
    };
    match sent {
        Ok(mut response) => {
            if response.status() == StatusCode::SWITCHING_PROTOCOLS
                && let Some(downstream_upgrade) = downstream_upgrade
            {
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                let idle = context.limits.settings().idle_timeout;
                tokio::spawn(splice_upgrade(downstream_upgrade, upstream_upgrade, idle));
            }
            response.map(|body| body.map_err(Into::into).boxed())
        }
        // The client broke its own body: its fault, not the application's.
        Err(_) if body.client_error().is_some() => {
            plain_reply(StatusCode::BAD_REQUEST, "bad request: malformed body\n")
        }
        Err(error) => {
            context.stats.failed();
            tracing::warn!(
                pod = %arrival.pod.id,
                target = %arrival.target,
                %error,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "delivering a request to the application failed"
            );
            plain_reply(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error\n")
        }
    }
}

fn plain_reply(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(full(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
}

/// Envoy RBAC's answer to a denied request.
fn denied(grpc: bool) -> Response<ProxyBody> {
    if grpc {
        return grpc_reply(7, "RBAC: access denied");
    }
    let mut response = Response::new(full(Bytes::from_static(b"RBAC: access denied")));
    *response.status_mut() = StatusCode::FORBIDDEN;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// A stream whose first bytes were already read (for detection): they are
/// read again first.
struct PrefixedIo<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: Io> AsyncRead for PrefixedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: Io> AsyncWrite for PrefixedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Lets the L7 proxy hand a request stream to a same-node pod that needs
/// per-request authorization: one end of an in-memory pipe is served here,
/// the other returned as the upstream connection.
pub fn pipe_to(
    context: Arc<ProxyContext>,
    arrival: Arc<Arrival>,
    connect_app: ConnectApp,
) -> Box<dyn Io> {
    let (near, far) = tokio::io::duplex(256 * 1024);
    let connection = crate::proxy::inbound::open_record(&context, &arrival, None);
    tokio::spawn(async move {
        let bytes = connection.bytes().clone();
        let outcome = serve(context.clone(), arrival.clone(), far, connect_app, bytes).await;
        context.close_connection(connection, &outcome);
    });
    Box::new(near)
}
