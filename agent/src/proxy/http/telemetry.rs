//! What one request leaves behind: Istio's request metrics, the access-log
//! line and the span, recorded when the response body ends.
//! [`RequestTelemetry::start`] opens the span before routing (so that every
//! attempt carries it), [`RequestTelemetry::finish`] wraps the response.
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, SizeHint};

use super::{
    BoxError, Downstream, ProxyBody,
    body::RequestBody,
    headers::{is_grpc, request_host},
};
use crate::{
    state::Store,
    telemetry::{
        access_log::AccessLog,
        kernel_tcp::KernelTcp,
        metrics::Metrics,
        spans::{RequestSpan, SpanStart, Tracer},
    },
};

/// The target of the request lines ([`crate::telemetry::access_log::TARGETS`]).
pub(crate) const LOG_TARGET: &str = module_path!();

/// Where a request's telemetry goes.
pub(super) struct Sinks<'a> {
    pub(super) access_log: &'a AccessLog,
    pub(super) metrics: &'a Arc<Metrics>,
    /// To name the workloads in the metrics' labels.
    pub(super) store: &'a Store,
}

/// A request's telemetry while it is routed.
pub(super) struct RequestTelemetry {
    started: Instant,
    started_at: std::time::SystemTime,
    method: String,
    path: String,
    authority: String,
    protocol: &'static str,
    span: RequestSpan,
}

impl RequestTelemetry {
    /// Starts the request's span, writing its trace context into the
    /// request's headers, before routing so that every attempt (and
    /// mirror) carries the proxy's span as the upstream's parent.
    pub(super) fn start<B>(
        spans: &Tracer,
        downstream: &Downstream,
        request: &mut Request<B>,
    ) -> RequestTelemetry {
        let started = Instant::now();
        let started_at = std::time::SystemTime::now();
        let method = request.method().clone();
        let path = request
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let authority = request_host(request).unwrap_or_default();
        let protocol = if is_grpc(request.headers()) {
            "grpc"
        } else {
            "http"
        };
        let span_name = format!("{authority}{}", request.uri().path());
        let span = spans.start(
            &span_name,
            request.headers_mut(),
            SpanStart {
                method: method.as_str(),
                path: &path,
                authority: &authority,
                source_workload: &downstream.pod.id,
                destination_service: &downstream.service.name,
                protocol,
            },
        );
        RequestTelemetry {
            started,
            started_at,
            method: method.to_string(),
            path,
            authority,
            protocol,
            span,
        }
    }

    /// The response on its way to the client, recording the request's
    /// metrics, access-log line and span when its body ends.
    pub(super) fn finish(
        self,
        sinks: Sinks<'_>,
        downstream: &Downstream,
        mut log: RequestLog,
        response: Response<ProxyBody>,
    ) -> Response<ProxyBody> {
        let RequestTelemetry {
            started,
            started_at,
            method,
            path,
            authority,
            protocol,
            mut span,
        } = self;
        let flags = log.flags();
        // The span ends with the response body (see `RequestRecord::finish`),
        // so a gRPC status in the trailers is on it.
        span.set_upstream_cluster(&log.cluster);
        let trace_id = span.trace_id();
        // Written when the response body ends, with its bytes and final status.
        let access = sinks
            .access_log
            .sample(&downstream.pod.id)
            .then(|| AccessEntry {
                start_time: started_at,
                pod: downstream.pod.id.to_string(),
                identity: downstream.pod.identity.to_string(),
                src: downstream.peer,
                orig_dst: downstream.original,
                service: downstream.service.name.clone(),
                method,
                path,
                authority,
                route: log.route.clone(),
                cluster: log.cluster.clone(),
                upstream_host: log.upstream,
                attempts: log.attempts,
                trace_id: trace_id.unwrap_or_default(),
            });
        let labels = request_labels(sinks.store, downstream, &log, protocol, flags, &response);
        let metered = MeteredBody {
            record: Some(RequestRecord {
                metrics: sinks.metrics.clone(),
                labels,
                started,
                request_body: log.body.take(),
                response_bytes: 0,
                span: Some((span, log.upstream)),
                access,
                kernel: log.kernel.take(),
            }),
        };
        response.map(|inner| metered.wrap(inner))
    }
}

/// What the access log says of one request.
#[derive(Default)]
pub(super) struct RequestLog {
    pub(super) route: String,
    pub(super) cluster: String,
    pub(super) upstream: Option<SocketAddr>,
    /// Envoy's response flags (`UF`, `UO`, `NR`…), `-` when none.
    pub(super) flags: Vec<&'static str>,
    pub(super) attempts: u32,
    /// The request body, once forwarding took it (to count its bytes).
    pub(super) body: Option<RequestBody>,
    /// The request's part of the kernel's figures of the upstream
    /// connection that answered.
    pub(super) kernel: Option<super::upstream::UpstreamLeg>,
}

impl RequestLog {
    pub(super) fn flags(&self) -> String {
        if self.flags.is_empty() {
            "-".to_string()
        } else {
            self.flags.join(",")
        }
    }
}

/// Istio's request labels, from the source's side (`reporter="source"`).
fn request_labels(
    store: &Store,
    downstream: &Downstream,
    log: &RequestLog,
    protocol: &'static str,
    flags: String,
    response: &Response<ProxyBody>,
) -> crate::telemetry::metrics::RequestLabels {
    let pod = &downstream.pod;
    let upstream = log
        .upstream
        .and_then(|address| store.workload(address.ip()));
    use crate::telemetry::metrics::{Peer, service_labels};
    let source = Peer::local(pod, store);
    let destination = upstream.as_ref().map_or_else(Peer::unknown, |workload| {
        Peer::of(workload, Some(&workload.identity))
    });
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
    let policy = if upstream.is_some() {
        "mutual_tls"
    } else {
        "unknown"
    };
    crate::telemetry::metrics::RequestLabels {
        connection: crate::telemetry::metrics::Hashed::new(crate::telemetry::metrics::TcpLabels {
            response_flags: flags.into(),
            ..crate::telemetry::metrics::TcpLabels::new(
                "source",
                source,
                destination,
                service_labels(Some(&downstream.service.name)),
                protocol,
                policy,
            )
        }),
        response_code: response.status().as_u16(),
        grpc_response_status,
    }
}

/// What is recorded once a response has been sent through.
struct RequestRecord {
    metrics: Arc<Metrics>,
    labels: crate::telemetry::metrics::RequestLabels,
    started: Instant,
    request_body: Option<RequestBody>,
    response_bytes: u64,
    /// The request's span and the endpoint that answered.
    span: Option<(RequestSpan, Option<SocketAddr>)>,
    /// The access-log line, when this pod's requests are logged.
    access: Option<AccessEntry>,
    kernel: Option<super::upstream::UpstreamLeg>,
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
        kernel: Option<KernelTcp>,
    ) {
        let start_time = time::OffsetDateTime::from(self.start_time)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let connection = labels.connection.labels();
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
            upstream_srtt_us = kernel.map(|k| k.srtt_us),
            upstream_min_rtt_us = kernel.map(|k| k.min_rtt_us),
            upstream_retransmits = kernel.map(|k| k.retransmits),
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
                &self.labels.connection.labels().response_flags,
            );
        }
        let metrics = &self.metrics;
        let labels = &self.labels;
        let request_bytes = self.request_body.as_ref().map_or(0, RequestBody::received);
        // What the kernel measured of the upstream connection while the
        // request was on it, with the connection's TCP labels.
        let kernel = self.kernel.as_ref().and_then(|leg| leg.0.end());
        if let Some(kernel) = kernel {
            metrics
                .tcp_round_trip
                .get_or_create(&labels.connection)
                .observe(f64::from(kernel.srtt_us) / 1e6);
            metrics
                .tcp_retransmits
                .get_or_create(&labels.connection)
                .inc_by(u64::from(kernel.retransmits));
        }
        if let Some(access) = &self.access {
            access.write(
                labels,
                request_bytes,
                self.response_bytes,
                self.started.elapsed(),
                kernel,
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
