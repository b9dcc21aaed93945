//! What one request leaves behind: Istio's request metrics, the access-log
//! line and the span, recorded when the response body ends.
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::Response;
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, SizeHint};

use super::{BoxError, Downstream, ProxyBody, body::RequestBody};
use crate::proxy::ProxyContext;

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
pub(super) fn request_labels(
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
pub(super) struct RequestRecord {
    pub(super) context: Arc<ProxyContext>,
    pub(super) labels: crate::telemetry::metrics::RequestLabels,
    pub(super) started: Instant,
    pub(super) request_body: Option<RequestBody>,
    pub(super) response_bytes: u64,
    /// The request's span and the endpoint that answered.
    pub(super) span: Option<(crate::telemetry::spans::RequestSpan, Option<SocketAddr>)>,
    /// The access-log line, when this pod's requests are logged.
    pub(super) access: Option<AccessEntry>,
}

/// The per-request access-log line (Envoy's fields, as far as they apply).
pub(super) struct AccessEntry {
    pub(super) start_time: std::time::SystemTime,
    pub(super) pod: String,
    pub(super) identity: String,
    pub(super) src: SocketAddr,
    pub(super) orig_dst: SocketAddr,
    pub(super) service: String,
    pub(super) method: String,
    pub(super) path: String,
    pub(super) authority: String,
    pub(super) route: String,
    pub(super) cluster: String,
    pub(super) upstream_host: Option<SocketAddr>,
    pub(super) attempts: u32,
    pub(super) trace_id: String,
}

impl AccessEntry {
    pub(super) fn write(
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
    pub(super) fn finish(mut self) {
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
pub(super) struct MeteredBody {
    pub(super) record: Option<RequestRecord>,
}

pub(super) struct Metered {
    pub(super) inner: ProxyBody,
    pub(super) metered: MeteredBody,
}

impl MeteredBody {
    pub(super) fn wrap(self, inner: ProxyBody) -> ProxyBody {
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
