//! L7 in the node proxy: a captured connection to a service port that has a
//! route configuration is parsed as HTTP (when it is HTTP), and every
//! request is routed on its own: matched, transformed, balanced over the
//! chosen cluster, retried, timed out, faulted, mirrored. Bodies stream
//! through; only a retry keeps a bounded copy.
pub mod body;
pub mod clusters;
pub mod detect;
pub mod inbound;
pub mod upstream;

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version, header,
    request::Parts,
};
use http_body_util::{BodyExt as _, Empty, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use self::{
    body::{REPLAY_LIMIT, RequestBody},
    clusters::{ClusterCache, ClusterRuntime},
    detect::Protocol,
    upstream::{Target, UpstreamError},
};
use super::{Outcome, PodHandle, ProxyContext};
use crate::{
    routing::{
        FaultAbort, ForwardAction, HashPolicy, HeaderOps, PathMatch, Redirect, RequestFacts,
        RetryPolicy, Route, RouteAction, RouteConfig, VirtualHost, WeightedCluster,
        balance::hash_key, outlier::UpstreamResult,
    },
    state::ServiceEntry,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy hands to hyper.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// How long the client may stay silent before the connection is treated as
/// opaque TCP (server-first protocols send nothing).
pub const DETECTION_TIMEOUT: Duration = Duration::from_millis(100);
/// Slow-header clients are closed after this (hyper answers 408).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Request header section limits: 60 KiB (Envoy's default) and 100 fields.
const MAX_HEADER_BYTES: usize = 60 * 1024;
const MAX_HEADERS: usize = 100;
/// Envoy's default route timeout.
const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

/// The proxy's L7 state shared by all connections.
#[derive(Default)]
pub struct HttpState {
    /// Per cluster: endpoints, balancing, limits, upstream connections.
    pub clusters: ClusterCache,
    pub requests: AtomicU64,
    /// Requests answered by the proxy itself (no route, overflow, fault…).
    pub local_replies: AtomicU64,
    pub retries: AtomicU64,
    pub mirrored: AtomicU64,
    /// Requests authorized and delivered by the inbound L7 path.
    pub inbound_requests: AtomicU64,
}

/// One downstream connection: who sent it, what it dialled.
pub struct Downstream {
    pub pod: Arc<PodHandle>,
    pub peer: SocketAddr,
    pub original: SocketAddr,
    pub service: Arc<ServiceEntry>,
    pub routes: Arc<RouteConfig>,
    pub protocol: Protocol,
}

/// Serves HTTP on a captured connection until the client closes it.
pub async fn serve_connection(
    context: Arc<ProxyContext>,
    downstream: Arc<Downstream>,
    client: TcpStream,
) -> Outcome {
    let counters = Arc::new(ByteCounters::default());
    let io = TokioIo::new(CountingIo {
        inner: client,
        counters: counters.clone(),
    });
    let service = {
        let context = context.clone();
        let downstream = downstream.clone();
        hyper::service::service_fn(move |request| {
            let context = context.clone();
            let downstream = downstream.clone();
            // Boxed: hyper moves each stream's future into its own task,
            // and `handle`'s state machine is large (a memmove per stream
            // was the top of an h2c profile).
            let handling = Box::pin(handle(context, downstream, request));
            async move { Ok::<_, Infallible>(handling.await) }
        })
    };
    context
        .stats
        .active_connections
        .fetch_add(1, Ordering::Relaxed);
    let result = match downstream.protocol {
        Protocol::Http2 => {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(MAX_HEADER_BYTES as u32)
                .serve_connection(io, service)
                .await
        }
        _ => {
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES.max(8192))
                .max_headers(MAX_HEADERS)
                .serve_connection(io, service)
                .with_upgrades()
                .await
        }
    };
    context
        .stats
        .active_connections
        .fetch_sub(1, Ordering::Relaxed);
    let sent = counters.read.load(Ordering::Relaxed);
    let received = counters.written.load(Ordering::Relaxed);
    context.stats.relayed(sent, received);
    match result {
        Ok(()) => Outcome::Closed { sent, received },
        // A client that hung up mid-request is an ordinary end.
        Err(error) if error.is_incomplete_message() || error.is_canceled() => {
            Outcome::Closed { sent, received }
        }
        Err(error) => Outcome::Failed(format!("HTTP: {error}")),
    }
}

/// What the access log says of one request.
#[derive(Default)]
struct RequestLog {
    route: String,
    cluster: String,
    upstream: Option<SocketAddr>,
    /// Envoy's response flags (`UF`, `UO`, `NR`…), `-` when none.
    flags: Vec<&'static str>,
    attempts: u32,
    /// The request body, once forwarding took it (to count its bytes).
    body: Option<RequestBody>,
}

impl RequestLog {
    fn flags(&self) -> String {
        if self.flags.is_empty() {
            "-".to_string()
        } else {
            self.flags.join(",")
        }
    }
}

async fn handle(
    context: Arc<ProxyContext>,
    downstream: Arc<Downstream>,
    mut request: Request<Incoming>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let started_at = std::time::SystemTime::now();
    context.http.requests.fetch_add(1, Ordering::Relaxed);
    let method = request.method().clone();
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let authority = request_host(&request).unwrap_or_default();
    let protocol = if is_grpc(request.headers()) {
        "grpc"
    } else {
        "http"
    };
    // Before routing, so that every attempt (and mirror) carries the
    // proxy's span as the upstream's parent.
    let span_name = format!("{authority}{}", request.uri().path());
    let mut span = context.spans.start(
        &span_name,
        request.headers_mut(),
        crate::telemetry::spans::SpanStart {
            method: method.as_str(),
            path: &path,
            authority: &authority,
            source_workload: &downstream.pod.id,
            destination_service: &downstream.service.name,
            protocol,
        },
    );
    let mut log = RequestLog::default();
    let response = route(&context, &downstream, request, &mut log).await;
    let flags = log.flags();
    // The span ends with the response body (see `RequestRecord::finish`),
    // so a gRPC status in the trailers is on it.
    span.set_upstream_cluster(&log.cluster);
    let trace_id = span.trace_id();
    // Written when the response body ends, with its bytes and final status.
    let access = context
        .access_log
        .sample(&downstream.pod.id)
        .then(|| AccessEntry {
            start_time: started_at,
            pod: downstream.pod.id.clone(),
            identity: downstream.pod.identity.to_string(),
            src: downstream.peer,
            orig_dst: downstream.original,
            service: downstream.service.name.clone(),
            method: method.to_string(),
            path: path.clone(),
            authority: authority.clone(),
            route: log.route.clone(),
            cluster: log.cluster.clone(),
            upstream_host: log.upstream,
            attempts: log.attempts,
            trace_id: trace_id.clone().unwrap_or_default(),
        });
    let labels = request_labels(&context, &downstream, &log, protocol, flags, &response);
    let metered = MeteredBody {
        record: Some(RequestRecord {
            context: context.clone(),
            labels,
            started,
            request_body: log.body.take(),
            response_bytes: 0,
            span: Some((span, log.upstream)),
            access,
        }),
    };
    response.map(|inner| metered.wrap(inner))
}

/// Istio's request labels, from the source's side (`reporter="source"`).
fn request_labels(
    context: &ProxyContext,
    downstream: &Downstream,
    log: &RequestLog,
    protocol: &'static str,
    flags: String,
    response: &Response<ProxyBody>,
) -> crate::telemetry::metrics::RequestLabels {
    let unknown = || "unknown".to_string();
    let pod = &downstream.pod;
    let upstream = log
        .upstream
        .and_then(|address| context.mesh.workload(address.ip()));
    let (namespace, host) = downstream
        .service
        .name
        .split_once('/')
        .unwrap_or(("unknown", downstream.service.name.as_str()));
    let source_app_version =
        crate::telemetry::metrics::app_and_version(context.mesh.workload(pod.ip).as_deref());
    let destination_app_version = crate::telemetry::metrics::app_and_version(upstream.as_deref());
    let grpc_response_status = if protocol == "grpc" {
        response
            .headers()
            .get("grpc-status")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string()
    } else {
        String::new()
    };
    crate::telemetry::metrics::RequestLabels {
        connection: crate::telemetry::metrics::TcpLabels {
            reporter: "source",
            source_workload: pod
                .id
                .split_once('/')
                .map_or_else(unknown, |(_, name)| name.to_string()),
            source_workload_namespace: pod.namespace.clone(),
            source_principal: crate::telemetry::metrics::principal(Some(&pod.identity)),
            source_app: source_app_version.0,
            source_version: source_app_version.1,
            destination_workload: upstream
                .as_ref()
                .and_then(|workload| workload.id.split_once('/'))
                .map_or_else(unknown, |(_, name)| name.to_string()),
            destination_workload_namespace: upstream
                .as_ref()
                .map_or_else(unknown, |workload| workload.identity.namespace.clone()),
            destination_principal: crate::telemetry::metrics::principal(
                upstream.as_ref().map(|workload| &workload.identity),
            ),
            destination_app: destination_app_version.0,
            destination_version: destination_app_version.1,
            destination_service: host.to_string(),
            destination_service_name: host.split('.').next().unwrap_or(host).to_string(),
            destination_service_namespace: namespace.to_string(),
            request_protocol: protocol,
            response_flags: flags,
            connection_security_policy: if upstream.is_some() {
                "mutual_tls"
            } else {
                "unknown"
            },
        },
        response_code: response.status().as_u16(),
        grpc_response_status,
    }
}

/// What is recorded once a response has been sent through.
struct RequestRecord {
    context: Arc<ProxyContext>,
    labels: crate::telemetry::metrics::RequestLabels,
    started: Instant,
    request_body: Option<RequestBody>,
    response_bytes: u64,
    /// The request's span and the endpoint that answered.
    span: Option<(crate::telemetry::spans::RequestSpan, Option<SocketAddr>)>,
    /// The access-log line, when this pod's requests are logged.
    access: Option<AccessEntry>,
}

/// The per-request access-log line (Envoy's fields, as far as they apply).
struct AccessEntry {
    start_time: std::time::SystemTime,
    pod: String,
    identity: String,
    src: SocketAddr,
    orig_dst: SocketAddr,
    service: String,
    method: String,
    path: String,
    authority: String,
    route: String,
    cluster: String,
    upstream_host: Option<SocketAddr>,
    attempts: u32,
    trace_id: String,
}

impl AccessEntry {
    fn write(
        &self,
        labels: &crate::telemetry::metrics::RequestLabels,
        request_bytes: u64,
        response_bytes: u64,
        duration: Duration,
    ) {
        let start_time = time::OffsetDateTime::from(self.start_time)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let connection = &labels.connection;
        tracing::info!(
            direction = "outbound",
            protocol = connection.request_protocol,
            start_time = %start_time,
            pod = %self.pod,
            identity = %self.identity,
            src = %self.src,
            orig_dst = %self.orig_dst,
            service = %self.service,
            method = %self.method,
            path = %self.path,
            authority = %self.authority,
            status = labels.response_code,
            grpc_status = %if labels.grpc_response_status.is_empty() { "-" } else { labels.grpc_response_status.as_str() },
            response_flags = %connection.response_flags,
            route = %self.route,
            cluster = %self.cluster,
            upstream_host = %self.upstream_host.map(|a| a.to_string()).unwrap_or_default(),
            upstream_identity = %connection.destination_principal,
            attempts = self.attempts,
            bytes_received = request_bytes,
            bytes_sent = response_bytes,
            duration_ms = duration.as_millis() as u64,
            trace_id = %self.trace_id,
            "request"
        );
    }
}

impl RequestRecord {
    fn finish(mut self) {
        if let Some((span, upstream)) = self.span.take() {
            let grpc_status = &self.labels.grpc_response_status;
            span.finish(
                self.labels.response_code,
                (!grpc_status.is_empty()).then_some(grpc_status.as_str()),
                upstream,
                &self.labels.connection.response_flags,
            );
        }
        let metrics = &self.context.metrics;
        let labels = &self.labels;
        let request_bytes = self.request_body.as_ref().map_or(0, RequestBody::received);
        if let Some(access) = &self.access {
            access.write(
                labels,
                request_bytes,
                self.response_bytes,
                self.started.elapsed(),
            );
        }
        if !metrics.record_requests.load(Ordering::Relaxed) {
            return;
        }
        metrics.requests.get_or_create(labels).inc();
        metrics
            .request_duration
            .get_or_create(labels)
            .observe(self.started.elapsed().as_secs_f64() * 1000.0);
        metrics
            .request_bytes
            .get_or_create(labels)
            .observe(request_bytes as f64);
        metrics
            .response_bytes
            .get_or_create(labels)
            .observe(self.response_bytes as f64);
    }
}

/// The response body on its way to the client: counts its bytes, reads
/// `grpc-status` from the trailers, and records the request's metrics when
/// it ends (or the client goes away).
struct MeteredBody {
    record: Option<RequestRecord>,
}

struct Metered {
    inner: ProxyBody,
    metered: MeteredBody,
}

impl MeteredBody {
    fn wrap(self, inner: ProxyBody) -> ProxyBody {
        Metered {
            inner,
            metered: self,
        }
        .boxed()
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            record.finish();
        }
    }
}

impl Body for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(record) = this.metered.record.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        record.response_bytes += data.len() as u64;
                    }
                    if let Some(status) = frame
                        .trailers_ref()
                        .and_then(|trailers| trailers.get("grpc-status"))
                        .and_then(|value| value.to_str().ok())
                    {
                        record.labels.grpc_response_status = status.to_string();
                    }
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                if let Some(record) = this.metered.record.take() {
                    record.finish();
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

async fn route(
    context: &Arc<ProxyContext>,
    downstream: &Downstream,
    request: Request<Incoming>,
    log: &mut RequestLog,
) -> Response<ProxyBody> {
    let grpc = is_grpc(request.headers());
    let host = request_host(&request).unwrap_or_default();
    let selected = {
        let facts = RequestFacts {
            method: request.method(),
            host: &host,
            path: request.uri().path(),
            query: request.uri().query(),
            headers: request.headers(),
        };
        downstream.routes.select(&facts)
    };
    let Some((virtual_host, route)) = selected else {
        return local_reply(
            context,
            log,
            LocalReply::new(404, "NR", "route not found"),
            grpc,
        );
    };
    log.route = route.name.clone();
    match &route.action {
        RouteAction::DirectResponse { status, body } => {
            let body = body.clone().unwrap_or_default();
            let mut response = Response::new(full(body));
            *response.status_mut() = *status;
            apply_response_ops(&mut response, &[], route, virtual_host, &downstream.routes);
            response
        }
        RouteAction::Redirect(redirect) => redirect_response(redirect, &request, &host, route),
        RouteAction::Forward(action) => {
            forward(
                context,
                downstream,
                request,
                virtual_host,
                route,
                action,
                log,
            )
            .await
        }
    }
}

/// A reply the proxy makes itself.
struct LocalReply {
    status: StatusCode,
    flag: &'static str,
    message: &'static str,
    /// `x-weir-overflow`: which circuit-breaker limit was hit.
    overflow: Option<&'static str>,
}

impl LocalReply {
    fn new(status: u16, flag: &'static str, message: &'static str) -> LocalReply {
        LocalReply {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            flag,
            message,
            overflow: None,
        }
    }

    fn overflow(limit: crate::routing::limits::Overflow) -> LocalReply {
        LocalReply {
            overflow: Some(limit.reason()),
            ..LocalReply::new(503, "UO", "upstream overflow")
        }
    }
}

/// gRPC status for an HTTP status the proxy answers with (Envoy's mapping).
fn grpc_status_for(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 => 14,
        504 => 4,
        _ => 2,
    }
}

fn local_reply(
    context: &ProxyContext,
    log: &mut RequestLog,
    reply: LocalReply,
    grpc: bool,
) -> Response<ProxyBody> {
    context.http.local_replies.fetch_add(1, Ordering::Relaxed);
    log.flags.push(reply.flag);
    let mut response = if grpc {
        grpc_reply(grpc_status_for(reply.status), reply.message)
    } else {
        let mut response = Response::new(full(Bytes::from(format!("{}\n", reply.message))));
        *response.status_mut() = reply.status;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        response
    };
    if let Some(limit) = reply.overflow {
        response
            .headers_mut()
            .insert("x-weir-overflow", HeaderValue::from_static(limit));
    }
    response
}

/// A trailers-only gRPC response: HTTP 200 with the gRPC status and
/// message in the headers.
fn grpc_reply(code: u32, message: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(empty());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(code));
    headers.insert("grpc-message", HeaderValue::from_static(message));
    response
}

fn fault_reply(
    context: &ProxyContext,
    log: &mut RequestLog,
    abort: FaultAbort,
    grpc: bool,
) -> Response<ProxyBody> {
    context.http.local_replies.fetch_add(1, Ordering::Relaxed);
    log.flags.push("FI");
    match abort {
        FaultAbort::Grpc(code) => grpc_reply(code, "fault filter abort"),
        FaultAbort::Http(status) if grpc => {
            grpc_reply(grpc_status_for(status), "fault filter abort")
        }
        FaultAbort::Http(status) => {
            let mut response = Response::new(full(Bytes::from_static(b"fault filter abort\n")));
            *response.status_mut() = status;
            response
        }
    }
}

fn redirect_response(
    redirect: &Redirect,
    request: &Request<Incoming>,
    host: &str,
    route: &Route,
) -> Response<ProxyBody> {
    let scheme = redirect.scheme.as_deref().unwrap_or("http");
    let (request_host, request_port) = split_host_port(host);
    let host = redirect.host.as_deref().unwrap_or(request_host);
    let port = match (redirect.port, &redirect.host) {
        (Some(port), _) => Some(port),
        // A new host drops the old port, as in Envoy.
        (None, Some(_)) => None,
        (None, None) => request_port,
    };
    let path = request.uri().path();
    let mut location_path = match (&redirect.path, &redirect.prefix_rewrite) {
        (Some(path), _) => path.clone(),
        (None, Some(rewrite)) => rewrite_prefix(&route.matcher.path, path, rewrite),
        (None, None) => path.to_string(),
    };
    if !redirect.strip_query
        && !location_path.contains('?')
        && let Some(query) = request.uri().query()
    {
        location_path = format!("{location_path}?{query}");
    }
    let location = match port {
        Some(port) => format!("{scheme}://{host}:{port}{location_path}"),
        None => format!("{scheme}://{host}{location_path}"),
    };
    let mut response = Response::new(empty());
    *response.status_mut() = redirect.status;
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// Replaces the matched prefix of `path` with `rewrite`.
fn rewrite_prefix(matcher: &PathMatch, path: &str, rewrite: &str) -> String {
    let prefix = match matcher {
        PathMatch::Prefix(prefix) | PathMatch::SeparatedPrefix(prefix) => prefix.as_str(),
        PathMatch::Exact(exact) => exact.as_str(),
        _ => "",
    };
    match path.get(..prefix.len()) {
        Some(head) if head.eq_ignore_ascii_case(prefix) => {
            format!("{rewrite}{}", &path[prefix.len()..])
        }
        _ => path.to_string(),
    }
}

fn split_host_port(host: &str) -> (&str, Option<u16>) {
    match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(']') || host.starts_with('[') => match port.parse() {
            Ok(port) => (name, Some(port)),
            Err(_) => (host, None),
        },
        _ => (host, None),
    }
}

/// Draws true with probability `fraction`.
fn roll(fraction: f64) -> bool {
    fraction >= 1.0 || (fraction > 0.0 && fastrand::f64() < fraction)
}

fn pick_weighted(clusters: &[WeightedCluster]) -> Option<&WeightedCluster> {
    let total: u64 = clusters.iter().map(|c| u64::from(c.weight)).sum();
    if total == 0 {
        return clusters.first();
    }
    let mut draw = fastrand::u64(..total);
    for cluster in clusters {
        let weight = u64::from(cluster.weight);
        if draw < weight {
            return Some(cluster);
        }
        draw -= weight;
    }
    clusters.last()
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    context: &Arc<ProxyContext>,
    downstream: &Downstream,
    mut request: Request<Incoming>,
    virtual_host: &VirtualHost,
    route: &Route,
    action: &ForwardAction,
    log: &mut RequestLog,
) -> Response<ProxyBody> {
    let grpc = is_grpc(request.headers());
    if let Some(fault) = &route.fault {
        if let Some((delay, fraction)) = fault.delay
            && roll(fraction)
        {
            log.flags.push("DI");
            tokio::time::sleep(delay).await;
        }
        if let Some((abort, fraction)) = fault.abort
            && roll(fraction)
        {
            return fault_reply(context, log, abort, grpc);
        }
    }
    let Some(weighted) = pick_weighted(&action.clusters) else {
        return local_reply(context, log, LocalReply::new(503, "NC", "no cluster"), grpc);
    };
    log.cluster = weighted.name.clone();
    let table = context.routes.snapshot();
    let Some(cluster) = context
        .http
        .clusters
        .get(&context.mesh, &table, &weighted.name)
    else {
        return local_reply(
            context,
            log,
            LocalReply::new(503, "NC", "cluster not found"),
            grpc,
        );
    };
    // HTTP/1.1 upgrades (WebSocket) and CONNECT in either version (an
    // HTTP/2 CONNECT stream becomes the tunnel, RFC 9113 8.5); upstream
    // both travel as HTTP/1.1 on a dedicated connection.
    let upgrade = match downstream.protocol {
        Protocol::Http1 => is_upgrade(&request),
        _ => request.method() == Method::CONNECT,
    };
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let source_ip = downstream.peer.ip();
    let (mut parts, incoming) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    let ops: [&HeaderOps; 4] = [
        &weighted.request_headers,
        &route.request_headers,
        &virtual_host.request_headers,
        &downstream.routes.request_headers,
    ];
    for op in ops {
        apply_header_ops(&mut parts.headers, op);
    }
    if let Some(rewrite) = &action.prefix_rewrite {
        let path = rewrite_prefix(&route.matcher.path, parts.uri.path(), rewrite);
        let path_and_query = match parts.uri.query() {
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
        if let Ok(uri) = path_and_query.parse() {
            parts.uri = uri;
        }
    }
    if let Some(host) = &action.host_rewrite {
        parts.headers.insert(header::HOST, host.clone());
        // A CONNECT's target is its authority, taken from Host upstream.
        if parts.method != Method::CONNECT
            && let Ok(uri) = http::Uri::builder()
                .path_and_query(parts.uri.path_and_query().map_or("/", |p| p.as_str()))
                .build()
        {
            parts.uri = uri;
        }
    }
    if !parts.headers.contains_key("x-request-id") {
        let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        if let Ok(value) = HeaderValue::from_str(&id) {
            parts.headers.insert("x-request-id", value);
        }
    }
    // Requests keep their authority when they travel as HTTP/2.
    if !parts.headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
        && let Ok(value) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, value);
    }
    let hash = cluster
        .is_ring_hash()
        .then(|| request_hash(&action.hash_policies, &parts, source_ip))
        .flatten();
    let body = RequestBody::new(incoming, REPLAY_LIMIT);
    log.body = Some(body.clone());
    let policy = action
        .retry_policy
        .as_ref()
        .or(virtual_host.retry_policy.as_ref());
    let timeout = action.timeout.unwrap_or(DEFAULT_ROUTE_TIMEOUT);
    let attempts = send_with_retries(
        context,
        downstream,
        &cluster,
        &parts,
        &body,
        policy,
        hash,
        downstream_upgrade,
        log,
    );
    let result = if timeout.is_zero() {
        attempts.await
    } else {
        match tokio::time::timeout(timeout, attempts).await {
            Ok(result) => result,
            Err(_) => Err(LocalReply::new(504, "UT", "upstream request timeout")),
        }
    };
    let mut response = match result {
        Ok(response) => response,
        Err(reply) => return local_reply(context, log, reply, grpc),
    };
    apply_response_ops(
        &mut response,
        &[&weighted.response_headers],
        route,
        virtual_host,
        &downstream.routes,
    );
    for mirror in &action.mirrors {
        if roll(mirror.fraction) {
            spawn_mirror(context, downstream, &parts, &body, &mirror.cluster);
        }
    }
    response
}

/// Holds what must live as long as a response body: the circuit-breaker
/// slot and the endpoint's active-request count.
struct RequestSlot {
    cluster: Arc<ClusterRuntime>,
    endpoint: usize,
    _guard: crate::routing::limits::RequestGuard,
}

impl Drop for RequestSlot {
    fn drop(&mut self) {
        if let Some(endpoint) = self.cluster.endpoints.get(self.endpoint) {
            endpoint.active_requests.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A response body that releases its request slot when it ends.
struct SlotBody {
    inner: Incoming,
    _slot: Option<RequestSlot>,
}

impl Body for SlotBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                self._slot = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => {
                self._slot = None;
                Poll::Ready(Some(Err(Box::new(error))))
            }
            other => other.map_err(|error| Box::new(error) as BoxError),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How one attempt ended, as retry policy and outlier detection see it.
enum Attempt {
    Response(Response<Incoming>),
    Failed(UpstreamError),
    TimedOut,
}

#[allow(clippy::too_many_arguments)]
async fn send_with_retries(
    context: &Arc<ProxyContext>,
    downstream: &Downstream,
    cluster: &Arc<ClusterRuntime>,
    parts: &Parts,
    body: &RequestBody,
    policy: Option<&RetryPolicy>,
    hash: Option<u64>,
    mut downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
    log: &mut RequestLog,
) -> Result<Response<ProxyBody>, LocalReply> {
    // An upgrade (WebSocket, CONNECT) always travels as HTTP/1.1.
    let http2 = (cluster.config.http2 || downstream.protocol == Protocol::Http2)
        && downstream_upgrade.is_none();
    let max_retries = policy.map_or(0, |policy| policy.num_retries);
    let mut attempt: u32 = 0;
    let mut tried: Vec<usize> = Vec::new();
    // Held while a retry is in flight (the retry circuit breaker).
    let mut _retry_slot = None;
    loop {
        log.attempts = attempt + 1;
        let Some(mut index) = cluster.pick(hash) else {
            return Err(LocalReply::new(503, "UH", "no healthy upstream"));
        };
        // A retry goes elsewhere when it can (Envoy's previous_hosts
        // predicate, which istiod sets on every route): a few more picks.
        for _ in 0..3 {
            if !tried.contains(&index) || cluster.endpoints.len() <= tried.len() {
                break;
            }
            if let Some(other) = cluster.pick(hash) {
                index = other;
            }
        }
        tried.push(index);
        let guard = cluster
            .breaker
            .try_request()
            .map_err(LocalReply::overflow)?;
        let endpoint = &cluster.endpoints[index];
        endpoint.active_requests.fetch_add(1, Ordering::Relaxed);
        let slot = RequestSlot {
            cluster: cluster.clone(),
            endpoint: index,
            _guard: guard,
        };
        log.upstream = Some(endpoint.address);
        let request = upstream_request(
            parts,
            parts.headers.clone(),
            body.attempt(attempt).boxed(),
            http2,
            endpoint.address,
        );
        let target = Target {
            context,
            pod: &downstream.pod,
            endpoint: endpoint.address,
            workload: endpoint.workload.as_deref(),
            http2,
        };
        let pool = &cluster.pool;
        let outcome = if downstream_upgrade.is_some() {
            match pool.send_upgradable(target, request).await {
                Ok(response) => Attempt::Response(response),
                Err(error) => Attempt::Failed(error),
            }
        } else {
            let send = pool.send(target, request);
            match policy.and_then(|policy| policy.per_try_timeout) {
                Some(per_try) => match tokio::time::timeout(per_try, send).await {
                    Ok(Ok(response)) => Attempt::Response(response),
                    Ok(Err(error)) => Attempt::Failed(error),
                    Err(_) => Attempt::TimedOut,
                },
                None => match send.await {
                    Ok(response) => Attempt::Response(response),
                    Err(error) => Attempt::Failed(error),
                },
            }
        };
        let (result, retriable) = classify(&outcome, policy);
        cluster.record(index, result);
        let may_retry =
            retriable && attempt < max_retries && body.replayable() && downstream_upgrade.is_none();
        if may_retry {
            match cluster.breaker.try_retry() {
                Ok(retry) => {
                    _retry_slot = Some(retry);
                    context.http.retries.fetch_add(1, Ordering::Relaxed);
                    attempt += 1;
                    if let Some(policy) = policy {
                        tokio::time::sleep(backoff(policy, attempt)).await;
                    }
                    continue;
                }
                Err(_) => log.flags.push("UO"),
            }
        } else if retriable && attempt > 0 {
            log.flags.push("URX");
        }
        return match outcome {
            Attempt::Response(mut response) => {
                // A WebSocket switches on 101, a CONNECT on any 2xx.
                let upgraded = response.status() == StatusCode::SWITCHING_PROTOCOLS
                    || (parts.method == Method::CONNECT && response.status().is_success());
                if upgraded && let Some(downstream_upgrade) = downstream_upgrade.take() {
                    let upstream_upgrade = hyper::upgrade::on(&mut response);
                    tokio::spawn(splice_upgrade(downstream_upgrade, upstream_upgrade));
                }
                Ok(response.map(|inner| {
                    SlotBody {
                        inner,
                        _slot: Some(slot),
                    }
                    .boxed()
                }))
            }
            Attempt::Failed(UpstreamError::Overflow(limit)) => Err(LocalReply::overflow(limit)),
            Attempt::Failed(UpstreamError::Connect {
                endpoint,
                reason,
                timed_out,
            }) => {
                tracing::debug!(%endpoint, %reason, "upstream connect failed");
                // Envoy's wording, which clients and dashboards grep for.
                Err(LocalReply::new(
                    503,
                    "UF",
                    if timed_out {
                        "upstream connect error or disconnect/reset before headers. reset reason: connection timeout"
                    } else {
                        "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
                    },
                ))
            }
            Attempt::Failed(UpstreamError::Reset { endpoint, source }) => {
                tracing::debug!(%endpoint, error = %source, "upstream reset");
                Err(LocalReply::new(503, "UC", "upstream reset before response"))
            }
            Attempt::TimedOut => Err(LocalReply::new(504, "UT", "upstream request timeout")),
        };
    }
}

/// Outlier input and whether `policy` retries this outcome.
fn classify(outcome: &Attempt, policy: Option<&RetryPolicy>) -> (UpstreamResult, bool) {
    let on = policy.map(|policy| &policy.retry_on);
    let any = |check: &dyn Fn(&crate::routing::RetryOn) -> bool| on.is_some_and(check);
    match outcome {
        Attempt::Response(response) => {
            let status = response.status().as_u16();
            let grpc_status = response
                .headers()
                .get("grpc-status")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse::<u32>().ok());
            let retriable = any(&|on| {
                (on.five_xx && status >= 500)
                    || (on.gateway_error && matches!(status, 502..=504))
                    || (on.retriable_status_codes && on.status_codes.contains(&status))
                    || grpc_status.is_some_and(|code| on.grpc_statuses.contains(&code))
            });
            let result = if status >= 500 {
                UpstreamResult::Http5xx(status)
            } else {
                UpstreamResult::Success
            };
            (result, retriable)
        }
        Attempt::Failed(UpstreamError::Connect { .. }) => (
            UpstreamResult::ConnectFailure,
            any(&|on| on.connect_failure || on.five_xx || on.gateway_error),
        ),
        Attempt::Failed(UpstreamError::Reset { .. }) => (
            UpstreamResult::Reset,
            any(&|on| on.reset || on.five_xx || on.gateway_error),
        ),
        // The cluster's own limit, not the endpoint's fault.
        Attempt::Failed(UpstreamError::Overflow(_)) => (UpstreamResult::Success, false),
        Attempt::TimedOut => (
            UpstreamResult::Timeout,
            any(&|on| on.five_xx || on.gateway_error || on.reset),
        ),
    }
}

/// Envoy's fully jittered exponential backoff: uniform in
/// `[0, min(base × 2^(n-1), max))`.
fn backoff(policy: &RetryPolicy, retry: u32) -> Duration {
    let base = if policy.backoff_base.is_zero() {
        Duration::from_millis(25)
    } else {
        policy.backoff_base
    };
    let max = if policy.backoff_max.is_zero() {
        base * 10
    } else {
        policy.backoff_max
    };
    let ceiling = base
        .saturating_mul(1u32 << retry.saturating_sub(1).min(16))
        .min(max);
    ceiling.mul_f64(fastrand::f64())
}

/// The request as the endpoint gets it, for one attempt.
fn upstream_request(
    parts: &Parts,
    mut headers: HeaderMap,
    body: ProxyBody,
    http2: bool,
    endpoint: SocketAddr,
) -> Request<ProxyBody> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let (uri, version) = if parts.method == Method::CONNECT {
        // Authority form (`host:port`), after any host rewrite.
        let authority = headers
            .get(header::HOST)
            .and_then(|host| host.to_str().ok().map(str::to_string))
            .or_else(|| parts.uri.authority().map(|a| a.to_string()))
            .unwrap_or_else(|| endpoint.to_string());
        (authority, Version::HTTP_11)
    } else if http2 {
        // HTTP/2 carries the host as :authority.
        let authority = headers
            .remove(header::HOST)
            .and_then(|host| host.to_str().ok().map(str::to_string))
            .unwrap_or_else(|| endpoint.to_string());
        (format!("http://{authority}{path}"), Version::HTTP_2)
    } else {
        headers.remove(header::TE);
        (path.to_string(), Version::HTTP_11)
    };
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    if let Ok(uri) = uri.parse() {
        *request.uri_mut() = uri;
    }
    request
}

/// Copies both ways between the client's and the endpoint's upgraded
/// connections (WebSocket, CONNECT).
async fn splice_upgrade(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
) {
    match tokio::try_join!(downstream, upstream) {
        Ok((downstream, upstream)) => {
            let mut downstream = TokioIo::new(downstream);
            let mut upstream = TokioIo::new(upstream);
            if let Err(error) = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await
            {
                tracing::debug!(%error, "upgraded connection ended");
            }
        }
        Err(error) => tracing::debug!(%error, "upgrade failed"),
    }
}

/// Sends a copy of the request to `cluster` and forgets it; the answer is
/// discarded. Only requests whose whole body has arrived (and fit the replay
/// copy) are mirrored.
fn spawn_mirror(
    context: &Arc<ProxyContext>,
    downstream: &Downstream,
    parts: &Parts,
    body: &RequestBody,
    cluster_name: &str,
) {
    let Some(copy) = body.complete_copy() else {
        tracing::debug!(
            cluster = cluster_name,
            "request body not complete; not mirrored"
        );
        return;
    };
    let table = context.routes.snapshot();
    let Some(cluster) = context
        .http
        .clusters
        .get(&context.mesh, &table, cluster_name)
    else {
        return;
    };
    let Some(index) = cluster.pick(None) else {
        return;
    };
    let endpoint = cluster.endpoints[index].address;
    let workload = cluster.endpoints[index].workload.clone();
    let http2 = cluster.config.http2 || downstream.protocol == Protocol::Http2;
    let mut headers = parts.headers.clone();
    // Envoy marks shadowed requests by suffixing the host.
    if let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
        let (name, port) = split_host_port(host);
        let shadow = match port {
            Some(port) => format!("{name}-shadow:{port}"),
            None => format!("{name}-shadow"),
        };
        if let Ok(value) = HeaderValue::from_str(&shadow) {
            headers.insert(header::HOST, value);
        }
    }
    let request = upstream_request(parts, headers, full(copy), http2, endpoint);
    context.http.mirrored.fetch_add(1, Ordering::Relaxed);
    let pod = downstream.pod.clone();
    let context = context.clone();
    tokio::spawn(async move {
        let target = Target {
            context: &context,
            pod: &pod,
            endpoint,
            workload: workload.as_deref(),
            http2,
        };
        match cluster.pool.send(target, request).await {
            Ok(response) => {
                // Read the answer through so the connection can be reused.
                let _ = response.into_body().collect().await;
            }
            Err(error) => tracing::debug!(%error, %endpoint, "mirrored request failed"),
        }
    });
}

fn request_hash(
    policies: &[HashPolicy],
    parts: &Parts,
    source_ip: std::net::IpAddr,
) -> Option<u64> {
    policies.iter().find_map(|policy| match policy {
        HashPolicy::Header(name) => parts
            .headers
            .get(name)
            .map(|value| hash_key(value.as_bytes())),
        HashPolicy::Cookie(name) => parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(key, _)| key == name)
            .map(|(_, value)| hash_key(value.as_bytes())),
        HashPolicy::SourceIp => Some(match source_ip.to_canonical() {
            std::net::IpAddr::V4(ip) => hash_key(&ip.octets()),
            std::net::IpAddr::V6(ip) => hash_key(&ip.octets()),
        }),
        HashPolicy::QueryParameter(name) => parts
            .uri
            .query()
            .and_then(|query| {
                query
                    .split('&')
                    .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
                    .find(|(key, _)| key == name)
            })
            .map(|(_, value)| hash_key(value.as_bytes())),
    })
}

fn apply_header_ops(headers: &mut HeaderMap, ops: &HeaderOps) {
    for name in &ops.remove {
        headers.remove(name);
    }
    for (name, value, append) in &ops.add {
        if *append {
            headers.append(name.clone(), value.clone());
        } else {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// Response header ops, most specific first so that the route
/// configuration's own have the last word (Envoy's default order).
fn apply_response_ops(
    response: &mut Response<ProxyBody>,
    extra: &[&HeaderOps],
    route: &Route,
    virtual_host: &VirtualHost,
    config: &RouteConfig,
) {
    for op in extra {
        apply_header_ops(response.headers_mut(), op);
    }
    apply_header_ops(response.headers_mut(), &route.response_headers);
    apply_header_ops(response.headers_mut(), &virtual_host.response_headers);
    apply_header_ops(response.headers_mut(), &config.response_headers);
}

/// Connection-specific headers never cross the proxy (RFC 9110 §7.6.1);
/// an upgrade keeps `Connection`/`Upgrade` so the endpoint sees it.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !(upgrade && name == header::UPGRADE))
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection", "transfer-encoding"] {
        headers.remove(name);
    }
    headers.remove(header::PROXY_AUTHORIZATION);
    if !upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    // `te: trailers` is the one TE value HTTP/2 allows (gRPC sends it).
    if headers
        .get(header::TE)
        .is_some_and(|te| te.as_bytes() != b"trailers")
    {
        headers.remove(header::TE);
    }
}

fn is_upgrade(request: &Request<Incoming>) -> bool {
    request.method() == Method::CONNECT
        || (request.headers().contains_key(header::UPGRADE)
            && request
                .headers()
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .any(|value| {
                    value
                        .split(',')
                        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
                }))
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

/// `:authority` for HTTP/2 and absolute-form requests, else `Host`.
fn request_host<B>(request: &Request<B>) -> Option<String> {
    request
        .uri()
        .authority()
        .map(|authority| authority.as_str().to_string())
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|host| host.to_str().ok())
                .map(str::to_string)
        })
}

fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

#[derive(Default)]
struct ByteCounters {
    /// From the client.
    read: AtomicU64,
    /// To the client.
    written: AtomicU64,
}

/// The client connection, counting bytes both ways for the connection log.
struct CountingIo {
    inner: TcpStream,
    counters: Arc<ByteCounters>,
}

impl AsyncRead for CountingIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.counters.read.fetch_add(read as u64, Ordering::Relaxed);
        result
    }
}

impl AsyncWrite for CountingIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result {
            self.counters
                .written
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_rewrite_replaces_the_matched_prefix() {
        let prefix = PathMatch::Prefix("/api/".into());
        assert_eq!(rewrite_prefix(&prefix, "/api/users", "/v2/"), "/v2/users");
        assert_eq!(rewrite_prefix(&prefix, "/other", "/v2/"), "/other");
    }

    #[test]
    fn host_and_port_split() {
        assert_eq!(split_host_port("web.test:8080"), ("web.test", Some(8080)));
        assert_eq!(split_host_port("web.test"), ("web.test", None));
        assert_eq!(split_host_port("[::1]:80"), ("[::1]", Some(80)));
    }

    #[test]
    fn weights_pick_in_proportion() {
        let cluster = |name: &str, weight| WeightedCluster {
            name: name.into(),
            weight,
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
        };
        let clusters = [cluster("a", 80), cluster("b", 20), cluster("c", 0)];
        let mut a = 0;
        for _ in 0..10_000 {
            match pick_weighted(&clusters).map(|c| c.name.as_str()) {
                Some("a") => a += 1,
                Some("b") => {}
                other => panic!("picked {other:?}"),
            }
        }
        assert!((7_500..8_500).contains(&a), "a picked {a} times");
    }

    #[test]
    fn backoff_stays_under_its_ceiling() {
        let policy = RetryPolicy {
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
            ..Default::default()
        };
        for retry in 1..8 {
            let ceiling = Duration::from_millis((10u64 << (retry - 1)).min(50));
            assert!(backoff(&policy, retry) <= ceiling);
        }
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers, false);
        assert!(headers.get("x-secret").is_none());
        assert!(headers.get(header::CONNECTION).is_none());
        assert!(headers.get("keep-alive").is_none());
        assert_eq!(
            headers.get(header::TE).map(|v| v.as_bytes()),
            Some(&b"trailers"[..])
        );
        assert!(headers.get("x-kept").is_some());
    }
}
