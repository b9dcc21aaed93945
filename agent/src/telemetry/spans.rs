//! Distributed tracing in the L7 proxy: trace context propagation (W3C
//! `traceparent`/`tracestate` and B3, multi-header and single `b3`) and one
//! CLIENT span per request, exported over OTLP/gRPC with the OpenTelemetry
//! SDK.
//!
//! ```yaml
//! tracing:
//!   otlp_endpoint: http://10.0.0.1:4317   # without it: no spans
//!   sampling: 1.0                         # percent of new traces
//!   service_name: weir
//! ```
//!
//! Per request ([`Tracer::start`]):
//! - the parent is the incoming W3C context, else the B3 one (single `b3`
//!   before the `x-b3-*` headers); an invalid header counts as absent;
//! - an incoming sampling decision is followed (parent-based); without one
//!   (no context, or B3 that defers) the trace is sampled with probability
//!   `sampling / 100`;
//! - a sampled request gets a span with a fresh span id, and the request
//!   sent upstream carries that span as the parent in both formats
//!   (`traceparent` rewritten, `tracestate` kept, `x-b3-*` set, `b3`
//!   rewritten when it came in); `x-request-id` is left alone;
//! - anything else (exporting off, not sampled) leaves the headers exactly
//!   as they came: no context is invented.
//!
//! Export: the SDK's batch processor (its own thread) sends up to 512
//! spans per OTLP request, at least every second; at most [`QUEUE_SPANS`]
//! spans wait or are in flight, so memory stays bounded while the
//! collector is down. Spans that do not fit, and the spans of a batch whose
//! export failed (after the exporter's retries, within [`EXPORT_TIMEOUT`]),
//! are dropped and counted in `weir_trace_spans_dropped_total`. The SDK
//! counts its own queue-full drops but does not expose them, so a gate in
//! front of it ([`BoundedProcessor`]) keeps the queue bound itself, counting
//! spans from `on_end` until the exporter has returned for them: the SDK's
//! queue (same size) then never fills, and every drop is ours to count.
use std::{
    borrow::Cow,
    fmt,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::{
    Context, InstrumentationScope, KeyValue,
    trace::{
        Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags,
        TraceId, TraceState, Tracer as _, TracerProvider as _,
    },
};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    trace::{
        BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
        SpanExporter, SpanProcessor,
    },
};
use prometheus_client::metrics::counter::Counter;

use crate::config::TracingConfig;

/// Spans waiting for export or being exported, at most (about 1 KiB each).
pub const QUEUE_SPANS: usize = 2048;
/// Spans per OTLP export request.
const BATCH_SPANS: usize = 512;
/// A span waits at most this long for its batch.
const EXPORT_INTERVAL: Duration = Duration::from_secs(1);
/// One export, retries included, gives up after this.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for the last export.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// Which header format a parent came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    W3c,
    B3Single,
    B3Multi,
}

/// The trace context of an incoming request.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    /// Trace and span id of the caller's span, when there is one (B3 may
    /// carry a sampling decision alone).
    pub parent: Option<(TraceId, SpanId)>,
    /// The caller's decision; `None` defers it to us.
    pub sampled: Option<bool>,
    /// B3 debug: sampled, and said so downstream.
    pub debug: bool,
    pub format: Format,
}

/// Reads the incoming context: W3C first, then single `b3`, then `x-b3-*`.
/// Headers that do not parse are ignored (as if absent).
pub fn extract(headers: &HeaderMap) -> Option<Incoming> {
    let mut traceparents = headers.get_all(TRACEPARENT).iter();
    // Several traceparent headers are invalid (W3C §3.2).
    if let (Some(value), None) = (traceparents.next(), traceparents.next())
        && let Some((trace_id, span_id, sampled)) = value.to_str().ok().and_then(parse_traceparent)
    {
        return Some(Incoming {
            parent: Some((trace_id, span_id)),
            sampled: Some(sampled),
            debug: false,
            format: Format::W3c,
        });
    }
    if let Some(incoming) = headers
        .get(B3)
        .and_then(|value| value.to_str().ok())
        .and_then(parse_b3_single)
    {
        return Some(incoming);
    }
    parse_b3_multi(headers)
}

/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`: (trace id,
/// parent id, sampled). A later version may append fields.
pub fn parse_traceparent(value: &str) -> Option<(TraceId, SpanId, bool)> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let more = parts.next().is_some();
    if !is_hex(version, 2, false) || version == "ff" || (version == "00" && more) {
        return None;
    }
    if !is_hex(flags, 2, false) {
        return None;
    }
    let (trace_id, span_id) = (trace_id(trace, false)?, span_id(span, false)?);
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((trace_id, span_id, flags & 1 == 1))
}

/// `b3: {trace}-{span}[-{sampling}[-{parent}]]` or `b3: {sampling}`.
pub fn parse_b3_single(value: &str) -> Option<Incoming> {
    let value = value.trim();
    let sampling = |state: &str| match state {
        "0" => Some((Some(false), false)),
        "1" => Some((Some(true), false)),
        "d" => Some((Some(true), true)),
        _ => None,
    };
    let parts: Vec<&str> = value.split('-').collect();
    let (parent, (sampled, debug)) = match parts.as_slice() {
        [state] => (None, sampling(state)?),
        [trace, span] => (
            Some((b3_trace_id(trace)?, span_id(span, true)?)),
            (None, false),
        ),
        [trace, span, state] => (
            Some((b3_trace_id(trace)?, span_id(span, true)?)),
            sampling(state)?,
        ),
        [trace, span, state, parent] => {
            span_id(parent, true)?;
            (
                Some((b3_trace_id(trace)?, span_id(span, true)?)),
                sampling(state)?,
            )
        }
        _ => return None,
    };
    Some(Incoming {
        parent,
        sampled,
        debug,
        format: Format::B3Single,
    })
}

/// `x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled`, `x-b3-flags` (the parent
/// span id is not needed to continue the trace).
pub fn parse_b3_multi(headers: &HeaderMap) -> Option<Incoming> {
    let text = |name: &HeaderName| headers.get(name).and_then(|value| value.to_str().ok());
    let debug = text(&B3_FLAGS).map(str::trim) == Some("1");
    let sampled = match text(&B3_SAMPLED).map(str::trim) {
        _ if debug => Some(true),
        Some("1") | Some("true") => Some(true),
        Some("0") | Some("false") => Some(false),
        _ => None,
    };
    let parent = match (text(&B3_TRACE_ID), text(&B3_SPAN_ID)) {
        (None, None) => None,
        (Some(trace), Some(span)) => {
            Some((b3_trace_id(trace.trim())?, span_id(span.trim(), true)?))
        }
        // Half a context is no context.
        _ => return None,
    };
    if parent.is_none() && sampled.is_none() {
        return None;
    }
    Some(Incoming {
        parent,
        sampled,
        debug,
        format: Format::B3Multi,
    })
}

fn is_hex(text: &str, len: usize, any_case: bool) -> bool {
    text.len() == len
        && text.bytes().all(|byte| {
            byte.is_ascii_digit()
                || (b'a'..=b'f').contains(&byte)
                || (any_case && (b'A'..=b'F').contains(&byte))
        })
}

/// 32 hex digits, not all zero (W3C wants lowercase; B3 is read leniently).
fn trace_id(text: &str, any_case: bool) -> Option<TraceId> {
    if !is_hex(text, 32, any_case) {
        return None;
    }
    TraceId::from_hex(text)
        .ok()
        .filter(|id| *id != TraceId::INVALID)
}

/// B3 trace ids may be 64-bit: the high half is then zero.
fn b3_trace_id(text: &str) -> Option<TraceId> {
    if text.len() == 16 {
        return trace_id(&format!("{:0>32}", text), true);
    }
    trace_id(text, true)
}

fn span_id(text: &str, any_case: bool) -> Option<SpanId> {
    if !is_hex(text, 16, any_case) {
        return None;
    }
    SpanId::from_hex(text)
        .ok()
        .filter(|id| *id != SpanId::INVALID)
}

/// Follows the incoming decision; without one, samples with `probability`
/// (`draw` is uniform in [0, 1)).
pub fn decide(incoming: Option<&Incoming>, probability: f64, draw: f64) -> bool {
    incoming
        .and_then(|incoming| incoming.sampled)
        .unwrap_or(draw < probability)
}

/// What the request sent upstream carries.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing {
    pub trace_id: TraceId,
    /// The proxy's span: the upstream's parent.
    pub span_id: SpanId,
    /// The proxy span's own parent, for `x-b3-parentspanid`.
    pub parent_span_id: Option<SpanId>,
    pub debug: bool,
}

/// Writes `outgoing` (sampled) in both formats. `tracestate` belongs to
/// the W3C parent: kept when the parent was W3C, else removed, as the
/// vendors' entries in it describe another trace.
pub fn inject(headers: &mut HeaderMap, outgoing: &Outgoing, incoming: Option<&Incoming>) {
    let Outgoing {
        trace_id,
        span_id,
        parent_span_id,
        debug,
    } = *outgoing;
    let mut set = |name: HeaderName, value: String| {
        if let Ok(value) = HeaderValue::try_from(value) {
            headers.insert(name, value);
        }
    };
    set(TRACEPARENT, format!("00-{trace_id}-{span_id}-01"));
    set(B3_TRACE_ID, trace_id.to_string());
    set(B3_SPAN_ID, span_id.to_string());
    if debug {
        // Debug implies sampled; B3 sends only the flag then.
        set(B3_FLAGS, "1".into());
    } else {
        set(B3_SAMPLED, "1".into());
    }
    if headers.contains_key(B3) {
        let state = if debug { "d" } else { "1" };
        let value = match parent_span_id {
            Some(parent) => format!("{trace_id}-{span_id}-{state}-{parent}"),
            None => format!("{trace_id}-{span_id}-{state}"),
        };
        if let Ok(value) = HeaderValue::try_from(value) {
            headers.insert(B3, value);
        }
    }
    if debug {
        headers.remove(B3_SAMPLED);
    } else {
        headers.remove(B3_FLAGS);
    }
    match parent_span_id {
        Some(parent) => {
            if let Ok(value) = HeaderValue::try_from(parent.to_string()) {
                headers.insert(B3_PARENT_SPAN_ID, value);
            }
        }
        None => {
            headers.remove(B3_PARENT_SPAN_ID);
        }
    }
    if incoming.is_none_or(|incoming| incoming.format != Format::W3c) {
        headers.remove(TRACESTATE);
    }
}

/// What the proxy knows of a request when its span starts.
#[derive(Debug, Clone, Copy)]
pub struct SpanStart<'a> {
    pub method: &'a str,
    /// Path and query as requested (only the path is recorded).
    pub path: &'a str,
    pub authority: &'a str,
    /// `namespace/name` of the calling pod.
    pub source_workload: &'a str,
    /// `namespace/hostname` of the service called.
    pub destination_service: &'a str,
    /// `http` or `grpc`.
    pub protocol: &'a str,
}

/// Makes the proxy's spans; see the module doc.
pub struct Tracer {
    /// Chance that a request without a decision is sampled (0 to 1).
    probability: f64,
    exporting: Option<Exporting>,
}

struct Exporting {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl fmt::Debug for Tracer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracer")
            .field("probability", &self.probability)
            .field("exporting", &self.exporting.is_some())
            .finish()
    }
}

impl Default for Tracer {
    fn default() -> Self {
        Tracer::disabled()
    }
}

impl Tracer {
    /// Makes no spans; headers pass through untouched.
    pub fn disabled() -> Tracer {
        Tracer {
            probability: 0.0,
            exporting: None,
        }
    }

    /// Exports to `config.otlp_endpoint` when set; spans that cannot be
    /// exported are counted in `dropped`. Must run inside a tokio runtime
    /// (the gRPC channel lives on it); otherwise, or when the exporter
    /// cannot be built, tracing is off and an error is logged.
    pub fn new(config: &TracingConfig, dropped: Counter) -> Tracer {
        let Some(endpoint) = &config.otlp_endpoint else {
            return Tracer::disabled();
        };
        if tokio::runtime::Handle::try_current().is_err() {
            tracing::error!("tracing needs a tokio runtime; spans are off");
            return Tracer::disabled();
        }
        use opentelemetry_otlp::WithExportConfig as _;
        let exporter = match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
        {
            Ok(exporter) => exporter,
            Err(error) => {
                tracing::error!(%error, endpoint = %endpoint, "OTLP exporter; spans are off");
                return Tracer::disabled();
            }
        };
        tracing::info!(
            endpoint = %endpoint,
            sampling = config.sampling,
            "exporting spans over OTLP/gRPC"
        );
        Tracer::with_exporter(config, exporter, dropped, QUEUE_SPANS)
    }

    /// A tracer exporting to `exporter`, with at most `queue` spans waiting.
    pub fn with_exporter<E: SpanExporter + 'static>(
        config: &TracingConfig,
        exporter: E,
        dropped: Counter,
        queue: usize,
    ) -> Tracer {
        let queue = queue.max(1);
        let queued = Arc::new(AtomicUsize::new(0));
        let exporter = CountingExporter {
            inner: exporter,
            queued: queued.clone(),
            dropped: dropped.clone(),
            failing: AtomicBool::new(false),
        };
        // The gate holds the bound; the SDK's queue is at least as large
        // (so it never drops) and never smaller than a batch (a batch must
        // fit in it).
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(queue.max(BATCH_SPANS))
            .with_max_export_batch_size(BATCH_SPANS)
            .with_scheduled_delay(EXPORT_INTERVAL)
            .build();
        let processor = BoundedProcessor {
            inner: BatchSpanProcessor::new(exporter, batch),
            queued,
            capacity: queue,
            dropped,
        };
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            // The decision is made in `start`; only sampled spans are built.
            .with_sampler(Sampler::AlwaysOn)
            .with_resource(
                Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer_with_scope(
            InstrumentationScope::builder("weir")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        Tracer {
            probability: config.sampling / 100.0,
            exporting: Some(Exporting { provider, tracer }),
        }
    }

    /// Whether spans are made at all (an endpoint is configured).
    pub fn exporting(&self) -> bool {
        self.exporting.is_some()
    }

    /// Reads the parent from `headers`, decides sampling, writes the
    /// outgoing context into `headers` (W3C + B3), returns the span.
    pub fn start(
        &self,
        name: &str,
        headers: &mut HeaderMap,
        attributes: SpanStart<'_>,
    ) -> RequestSpan {
        let incoming = extract(headers);
        let incoming_trace = incoming
            .as_ref()
            .and_then(|incoming| incoming.parent)
            .map(|(trace_id, _)| trace_id);
        let Some(exporting) = &self.exporting else {
            return RequestSpan::passed_through(incoming_trace);
        };
        if !decide(incoming.as_ref(), self.probability, fastrand::f64()) {
            return RequestSpan::passed_through(incoming_trace);
        }
        let debug = incoming.as_ref().is_some_and(|incoming| incoming.debug);
        let parent = incoming.as_ref().and_then(|incoming| incoming.parent);
        let parent_context = match parent {
            Some((trace_id, span_id)) => {
                let state = match incoming.as_ref().map(|incoming| incoming.format) {
                    Some(Format::W3c) => headers
                        .get(TRACESTATE)
                        .and_then(|value| value.to_str().ok())
                        .and_then(|value| value.parse::<TraceState>().ok())
                        .unwrap_or_default(),
                    _ => TraceState::default(),
                };
                Context::new().with_remote_span_context(SpanContext::new(
                    trace_id,
                    span_id,
                    TraceFlags::SAMPLED,
                    true,
                    state,
                ))
            }
            None => Context::new(),
        };
        let span = exporting
            .tracer
            .span_builder(name.to_string())
            .with_kind(SpanKind::Client)
            .with_attributes(start_attributes(&attributes, headers))
            .start_with_context(&exporting.tracer, &parent_context);
        let context = span.span_context();
        let outgoing = Outgoing {
            trace_id: context.trace_id(),
            span_id: context.span_id(),
            parent_span_id: parent.map(|(_, span_id)| span_id),
            debug,
        };
        inject(headers, &outgoing, incoming.as_ref());
        RequestSpan {
            trace_id: Some(outgoing.trace_id),
            span: Some(span),
        }
    }

    /// Exports what is queued now (tests).
    pub fn flush(&self) -> OTelSdkResult {
        match &self.exporting {
            Some(exporting) => exporting.provider.force_flush(),
            None => Ok(()),
        }
    }

    /// Exports what is queued and stops, waiting at most 2 s (blocks: call
    /// it from a blocking context).
    pub fn shutdown(&self) {
        if let Some(exporting) = &self.exporting
            && let Err(error) = exporting.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT)
        {
            tracing::warn!(%error, "span exporter shutdown");
        }
    }
}

/// Attributes known when the request arrives (OpenTelemetry HTTP semantic
/// conventions, plus Envoy's tags where it has one).
fn start_attributes(start: &SpanStart<'_>, headers: &HeaderMap) -> Vec<KeyValue> {
    let path = start.path.split('?').next().unwrap_or(start.path);
    let mut attributes = vec![
        KeyValue::new("http.request.method", start.method.to_string()),
        KeyValue::new("url.path", path.to_string()),
        KeyValue::new("network.protocol.name", "http"),
        KeyValue::new("component", "proxy"),
        KeyValue::new("weir.source_workload", start.source_workload.to_string()),
        KeyValue::new(
            "weir.destination_service",
            start.destination_service.to_string(),
        ),
    ];
    let (host, port) = split_authority(start.authority);
    attributes.push(KeyValue::new("server.address", host.to_string()));
    if let Some(port) = port {
        attributes.push(KeyValue::new("server.port", i64::from(port)));
    }
    if start.protocol == "grpc" {
        attributes.push(KeyValue::new("rpc.system", "grpc"));
    }
    if let Some(id) = headers
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
    {
        attributes.push(KeyValue::new("guid:x-request-id", id.to_string()));
    }
    attributes
}

/// `host[:port]`, `[v6][:port]`.
fn split_authority(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') || host.ends_with(']') => match port.parse() {
            Ok(port) => (host, Some(port)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    }
}

/// The span of one request (or nothing, when not sampled).
pub struct RequestSpan {
    /// The request's trace: ours, or the caller's when we made no span.
    trace_id: Option<TraceId>,
    span: Option<opentelemetry_sdk::trace::Span>,
}

impl RequestSpan {
    fn passed_through(trace_id: Option<TraceId>) -> RequestSpan {
        RequestSpan {
            trace_id,
            span: None,
        }
    }

    /// The trace id (32 hex digits), for the access log.
    pub fn trace_id(&self) -> Option<String> {
        self.trace_id.map(|id| id.to_string())
    }

    /// Whether a span is being recorded (sampled, exporting).
    pub fn recording(&self) -> bool {
        self.span.is_some()
    }

    /// Names the cluster the request was routed to (Envoy's
    /// `upstream_cluster` tag).
    pub fn set_upstream_cluster(&mut self, cluster: &str) {
        if let Some(span) = self.span.as_mut()
            && !cluster.is_empty()
        {
            span.set_attribute(KeyValue::new("upstream_cluster", cluster.to_string()));
        }
    }

    /// Ends the span with the response: an error status for 5xx and for a
    /// gRPC status other than OK.
    pub fn finish(
        self,
        status: u16,
        grpc_status: Option<&str>,
        upstream: Option<SocketAddr>,
        response_flags: &str,
    ) {
        let Some(mut span) = self.span else {
            return;
        };
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        span.set_attribute(KeyValue::new("response_flags", response_flags.to_string()));
        let grpc_code = grpc_status.and_then(|code| code.trim().parse::<i64>().ok());
        if let Some(code) = grpc_code {
            span.set_attribute(KeyValue::new("rpc.grpc.status_code", code));
        }
        if let Some(upstream) = upstream {
            span.set_attribute(KeyValue::new(
                "network.peer.address",
                upstream.ip().to_string(),
            ));
            span.set_attribute(KeyValue::new(
                "network.peer.port",
                i64::from(upstream.port()),
            ));
        }
        if status >= 500 {
            span.set_attribute(KeyValue::new("error.type", status.to_string()));
        }
        if status >= 500 || grpc_code.is_some_and(|code| code != 0) {
            span.set_status(Status::error(Cow::Borrowed("")));
        }
        span.end();
    }
}

/// Keeps the batch processor's queue bounded and counts what it refuses:
/// `queued` holds every span handed on until the exporter has returned for
/// it, so the SDK's own queue (of the same capacity) never overflows.
#[derive(Debug)]
struct BoundedProcessor {
    inner: BatchSpanProcessor,
    queued: Arc<AtomicUsize>,
    capacity: usize,
    dropped: Counter,
}

impl SpanProcessor for BoundedProcessor {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, context: &Context) {
        self.inner.on_start(span, context);
    }

    fn on_end(&self, span: SpanData) {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.dropped.inc();
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, counting the spans of batches it could not deliver
/// and logging when exports start and stop failing (not every failure).
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    queued: Arc<AtomicUsize>,
    dropped: Counter,
    failing: AtomicBool,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        self.queued.fetch_sub(spans, Ordering::AcqRel);
        match &result {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("span export recovered");
                }
            }
            Err(error) => {
                self.dropped.inc_by(spans as u64);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        %error,
                        spans,
                        "span export failed; dropping spans until it recovers"
                    );
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use opentelemetry::Value;
    use opentelemetry_sdk::error::OTelSdkError;

    use super::*;

    const T: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const P: &str = "00f067aa0ba902b7";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    fn header<'a>(map: &'a HeaderMap, name: &str) -> Option<&'a str> {
        map.get(name).and_then(|value| value.to_str().ok())
    }

    fn ids(trace: &str, span: &str) -> Option<(TraceId, SpanId)> {
        Some((
            TraceId::from_hex(trace).expect("trace"),
            SpanId::from_hex(span).expect("span"),
        ))
    }

    #[test]
    fn traceparent_parses_and_rejects() {
        let (trace, span, sampled) = parse_traceparent(&format!("00-{T}-{P}-01")).expect("valid");
        assert_eq!(trace.to_string(), T);
        assert_eq!(span.to_string(), P);
        assert!(sampled);
        assert!(
            !parse_traceparent(&format!("00-{T}-{P}-00"))
                .expect("valid")
                .2
        );
        // A later version may add fields; version 00 may not.
        assert!(parse_traceparent(&format!("01-{T}-{P}-01-extra")).is_some());
        for bad in [
            format!("00-{T}-{P}-01-extra"),
            format!("ff-{T}-{P}-01"),
            format!("00-{}-{P}-01", "0".repeat(32)),
            format!("00-{T}-{}-01", "0".repeat(16)),
            format!("00-{}-{P}-01", T.to_uppercase()),
            format!("00-{}-{P}-01", &T[1..]),
            format!("00-{T}-{P}-1"),
            format!("00-{T}-{P}"),
            format!("00-{T}-+0f067aa0ba902b-01"),
            "garbage".to_string(),
            String::new(),
        ] {
            assert!(parse_traceparent(&bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn b3_single_parses() {
        let single = parse_b3_single(&format!("{T}-{P}-1-{}", "05e3ac9a4f6e3b90")).expect("b3");
        assert_eq!(single.parent, ids(T, P));
        assert_eq!(single.sampled, Some(true));
        let single = parse_b3_single(&format!("{T}-{P}")).expect("b3");
        assert_eq!(single.sampled, None, "deferred");
        let single = parse_b3_single(&format!("{T}-{P}-d")).expect("b3");
        assert!(single.debug && single.sampled == Some(true));
        // 64-bit trace ids are padded.
        let single = parse_b3_single(&format!("a3ce929d0e0e4736-{P}-0")).expect("b3");
        assert_eq!(
            single.parent.map(|(trace, _)| trace.to_string()),
            Some(format!("{}a3ce929d0e0e4736", "0".repeat(16)))
        );
        assert_eq!(single.sampled, Some(false));
        let alone = parse_b3_single("0").expect("sampling only");
        assert_eq!((alone.parent, alone.sampled), (None, Some(false)));
        for bad in [
            format!("{T}-{P}-x"),
            format!("{T}-short"),
            format!("{T}-{P}-1-bad"),
            format!("{T}-{P}-1-{P}-more"),
            "2".to_string(),
        ] {
            assert!(parse_b3_single(&bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn b3_multi_parses() {
        let multi = extract(&headers(&[
            ("x-b3-traceid", T),
            ("x-b3-spanid", P),
            ("x-b3-sampled", "1"),
        ]))
        .expect("b3");
        assert_eq!(multi.format, Format::B3Multi);
        assert_eq!(multi.parent, ids(T, P));
        assert_eq!(multi.sampled, Some(true));
        let deferred = extract(&headers(&[("x-b3-traceid", T), ("x-b3-spanid", P)])).expect("b3");
        assert_eq!(deferred.sampled, None);
        let debug = extract(&headers(&[
            ("x-b3-traceid", T),
            ("x-b3-spanid", P),
            ("x-b3-flags", "1"),
        ]))
        .expect("b3");
        assert!(debug.debug && debug.sampled == Some(true));
        // Half a context, or a bad id, is none.
        assert!(extract(&headers(&[("x-b3-traceid", T)])).is_none());
        assert!(extract(&headers(&[("x-b3-traceid", "xyz"), ("x-b3-spanid", P)])).is_none());
    }

    #[test]
    fn w3c_wins_over_b3_and_invalid_headers_are_ignored() {
        let other = "11111111111111111111111111111111";
        let both = extract(&headers(&[
            ("traceparent", &format!("00-{T}-{P}-01")),
            ("x-b3-traceid", other),
            ("x-b3-spanid", P),
        ]))
        .expect("context");
        assert_eq!(both.format, Format::W3c);
        assert_eq!(both.parent, ids(T, P));
        // An invalid traceparent falls back to B3 …
        let fallback = extract(&headers(&[
            ("traceparent", "00-nonsense"),
            ("b3", &format!("{other}-{P}-1")),
        ]))
        .expect("b3");
        assert_eq!(fallback.format, Format::B3Single);
        // … and with nothing valid there is no context: a new trace starts.
        assert!(extract(&headers(&[("traceparent", "00-nonsense"), ("b3", "junk")])).is_none());
        let twice = format!("00-{T}-{P}-01");
        assert!(
            extract(&headers(&[
                ("traceparent", &twice),
                ("traceparent", &twice)
            ]))
            .is_none()
        );
    }

    #[test]
    fn sampling_follows_the_caller_else_the_rate() {
        let sampled = |flag| Incoming {
            parent: ids(T, P),
            sampled: flag,
            debug: false,
            format: Format::W3c,
        };
        assert!(!decide(None, 0.0, 0.0));
        assert!(decide(None, 1.0, 0.999_999));
        assert!(decide(None, 0.5, 0.25) && !decide(None, 0.5, 0.75));
        // The caller's flag wins over the rate, both ways.
        assert!(decide(Some(&sampled(Some(true))), 0.0, 0.5));
        assert!(!decide(Some(&sampled(Some(false))), 1.0, 0.0));
        // Deferred (B3 without a flag): the rate decides.
        assert!(!decide(Some(&sampled(None)), 0.0, 0.0));
        assert!(decide(Some(&sampled(None)), 1.0, 0.5));
    }

    #[test]
    fn inject_writes_both_formats() {
        let mut map = headers(&[
            ("traceparent", &format!("00-{T}-{P}-01")),
            ("tracestate", "vendor=x"),
            ("x-request-id", "abc"),
            ("b3", "stale"),
            ("x-b3-flags", "0"),
        ]);
        let incoming = extract(&map);
        let outgoing = Outgoing {
            trace_id: TraceId::from_hex(T).expect("trace"),
            span_id: SpanId::from_hex("1111111111111111").expect("span"),
            parent_span_id: SpanId::from_hex(P).ok(),
            debug: false,
        };
        inject(&mut map, &outgoing, incoming.as_ref());
        assert_eq!(
            header(&map, "traceparent"),
            Some(format!("00-{T}-1111111111111111-01").as_str())
        );
        assert_eq!(header(&map, "tracestate"), Some("vendor=x"));
        assert_eq!(header(&map, "x-request-id"), Some("abc"));
        assert_eq!(header(&map, "x-b3-traceid"), Some(T));
        assert_eq!(header(&map, "x-b3-spanid"), Some("1111111111111111"));
        assert_eq!(header(&map, "x-b3-parentspanid"), Some(P));
        assert_eq!(header(&map, "x-b3-sampled"), Some("1"));
        assert_eq!(header(&map, "x-b3-flags"), None);
        assert_eq!(
            header(&map, "b3"),
            Some(format!("{T}-1111111111111111-1-{P}").as_str())
        );
        // A B3 parent: its tracestate-less world stays so.
        let mut map = headers(&[
            ("x-b3-traceid", T),
            ("x-b3-spanid", P),
            ("tracestate", "orphan=1"),
        ]);
        let incoming = extract(&map);
        inject(&mut map, &outgoing, incoming.as_ref());
        assert_eq!(header(&map, "tracestate"), None);
        assert_eq!(header(&map, "b3"), None, "single b3 only when it came in");
        // The injected headers read back as the same context.
        let back = extract(&map).expect("context");
        assert_eq!(back.parent, ids(T, "1111111111111111"));
        assert_eq!(back.sampled, Some(true));
    }

    /// Collects exported spans, or fails every export.
    #[derive(Debug, Clone, Default)]
    struct TestExporter {
        spans: Arc<Mutex<Vec<SpanData>>>,
        fail: bool,
    }

    impl SpanExporter for TestExporter {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if self.fail {
                return Err(OTelSdkError::InternalFailure("collector down".into()));
            }
            self.spans
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(batch);
            Ok(())
        }
    }

    fn config(sampling: f64) -> TracingConfig {
        TracingConfig {
            otlp_endpoint: Some("http://127.0.0.1:4317".into()),
            sampling,
            service_name: "weir-test".into(),
        }
    }

    const START: SpanStart<'static> = SpanStart {
        method: "GET",
        path: "/x?y=1",
        authority: "web.test:8080",
        source_workload: "test/a",
        destination_service: "test/web.test",
        protocol: "http",
    };

    #[test]
    fn spans_continue_the_incoming_trace_and_are_exported() {
        let exporter = TestExporter::default();
        let dropped = Counter::default();
        let tracer = Tracer::with_exporter(&config(0.0), exporter.clone(), dropped.clone(), 16);
        let mut map = headers(&[("traceparent", &format!("00-{T}-{P}-01"))]);
        let mut span = tracer.start("web.test/x", &mut map, START);
        assert_eq!(span.trace_id().as_deref(), Some(T));
        span.set_upstream_cluster("v1");
        let (_, ours, sampled) =
            parse_traceparent(header(&map, "traceparent").expect("rewritten")).expect("valid");
        assert!(sampled);
        assert_ne!(ours.to_string(), P, "a fresh span id");
        span.finish(
            503,
            None,
            Some("10.0.0.9:8080".parse().expect("addr")),
            "UF",
        );
        tracer.flush().expect("flush");
        let spans = exporter.spans.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(spans.len(), 1);
        let data = &spans[0];
        assert_eq!(data.span_context.trace_id().to_string(), T);
        assert_eq!(data.span_context.span_id(), ours);
        assert_eq!(data.parent_span_id.to_string(), P);
        assert_eq!(data.span_kind, SpanKind::Client);
        assert_eq!(data.name, "web.test/x");
        assert!(matches!(data.status, Status::Error { .. }));
        let attribute = |key: &str| {
            data.attributes
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.clone())
        };
        assert_eq!(attribute("url.path"), Some(Value::from("/x")));
        assert_eq!(attribute("server.address"), Some(Value::from("web.test")));
        assert_eq!(attribute("server.port"), Some(Value::I64(8080)));
        assert_eq!(
            attribute("http.response.status_code"),
            Some(Value::I64(503))
        );
        assert_eq!(attribute("response_flags"), Some(Value::from("UF")));
        assert_eq!(attribute("upstream_cluster"), Some(Value::from("v1")));
        assert_eq!(
            attribute("network.peer.address"),
            Some(Value::from("10.0.0.9"))
        );
        assert_eq!(dropped.get(), 0);
    }

    #[test]
    fn unsampled_requests_pass_through_untouched() {
        let exporter = TestExporter::default();
        let tracer = Tracer::with_exporter(&config(0.0), exporter.clone(), Counter::default(), 16);
        // No context and 0 %: nothing invented.
        let mut map = headers(&[("x-request-id", "r1")]);
        let span = tracer.start("n", &mut map, START);
        assert!(!span.recording());
        assert_eq!(span.trace_id(), None);
        span.finish(200, None, None, "-");
        assert_eq!(map, headers(&[("x-request-id", "r1")]));
        // The caller said no: its headers go on as they are.
        let not_sampled = [("traceparent", format!("00-{T}-{P}-00"))];
        let mut map = headers(&[("traceparent", not_sampled[0].1.as_str())]);
        let span = tracer.start("n", &mut map, START);
        assert_eq!(span.trace_id().as_deref(), Some(T), "still logged");
        span.finish(200, None, None, "-");
        assert_eq!(header(&map, "traceparent"), Some(not_sampled[0].1.as_str()));
        tracer.flush().expect("flush");
        assert!(
            exporter
                .spans
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
        );
        // Exporting off: even a sampled context passes through unchanged.
        let disabled = Tracer::disabled();
        let original = headers(&[("traceparent", &format!("00-{T}-{P}-01"))]);
        let mut map = original.clone();
        let span = disabled.start("n", &mut map, START);
        assert_eq!(span.trace_id().as_deref(), Some(T));
        assert_eq!(map, original);
    }

    #[test]
    fn a_new_trace_starts_at_100_percent_with_b3_and_w3c_out() {
        let exporter = TestExporter::default();
        let tracer =
            Tracer::with_exporter(&config(100.0), exporter.clone(), Counter::default(), 16);
        let mut map = headers(&[("traceparent", "00-invalid-01")]);
        let span = tracer.start("n", &mut map, START);
        let trace = span.trace_id().expect("a new trace");
        assert_ne!(trace, T);
        let (written, span_id, _) =
            parse_traceparent(header(&map, "traceparent").expect("traceparent")).expect("valid");
        assert_eq!(written.to_string(), trace);
        assert_eq!(header(&map, "x-b3-traceid"), Some(trace.as_str()));
        assert_eq!(
            header(&map, "x-b3-spanid"),
            Some(span_id.to_string().as_str())
        );
        assert_eq!(header(&map, "x-b3-parentspanid"), None, "a root span");
        span.finish(200, Some("0"), None, "-");
        tracer.flush().expect("flush");
        let spans = exporter.spans.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].parent_span_id, SpanId::INVALID);
        assert!(matches!(spans[0].status, Status::Unset));
    }

    #[test]
    fn failed_exports_and_a_full_queue_are_counted() {
        let failing = TestExporter {
            fail: true,
            ..Default::default()
        };
        let dropped = Counter::default();
        let tracer = Tracer::with_exporter(&config(100.0), failing, dropped.clone(), 4);
        // Spans wait for the first tick (1 s) or a flush: two past the
        // queue's 4 are refused (at least two, even if a tick came first,
        // as spans count until their export has returned).
        for _ in 0..6 {
            tracer
                .start("n", &mut HeaderMap::new(), START)
                .finish(200, None, None, "-");
        }
        assert!(dropped.get() >= 2, "queue full: {}", dropped.get());
        // The 4 queued fail to export: counted too, and the queue frees up.
        let _ = tracer.flush();
        assert_eq!(dropped.get(), 6, "failed export");
        tracer
            .start("n", &mut HeaderMap::new(), START)
            .finish(200, None, None, "-");
        let _ = tracer.flush();
        assert_eq!(dropped.get(), 7);
    }

    /// Per-request cost of `start` + `finish` (run with `--release
    /// --ignored --nocapture`): sampled and exported, unsampled, disabled.
    /// Measured here: about 5 µs sampled, 0.2 µs unsampled, 0.4 µs with
    /// exporting off (each with a header-map clone).
    #[test]
    #[ignore]
    fn cost_per_request() {
        #[derive(Debug)]
        struct Discard;
        impl SpanExporter for Discard {
            async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
                Ok(())
            }
        }
        let incoming = headers(&[
            ("traceparent", &format!("00-{T}-{P}-01")),
            ("x-request-id", "r1"),
        ]);
        let measure = |what: &str, tracer: &Tracer, rounds: u32| {
            let begin = std::time::Instant::now();
            for _ in 0..rounds {
                let mut map = incoming.clone();
                tracer.start("web.test/x", &mut map, START).finish(
                    200,
                    None,
                    Some("10.0.0.9:8080".parse().expect("addr")),
                    "-",
                );
            }
            let each = begin.elapsed() / rounds;
            let _ = tracer.flush();
            println!("{what}: {each:?} per request");
        };
        let exporting =
            Tracer::with_exporter(&config(100.0), Discard, Counter::default(), QUEUE_SPANS);
        // Rounds below the queue size: every span is exported, none dropped.
        for _ in 0..5 {
            measure("sampled", &exporting, 2000);
        }
        let tracer = Tracer::with_exporter(&config(0.0), Discard, Counter::default(), QUEUE_SPANS);
        let mut plain = HeaderMap::new();
        plain.insert("x-request-id", HeaderValue::from_static("r1"));
        let begin = std::time::Instant::now();
        for _ in 0..100_000 {
            let mut map = plain.clone();
            tracer
                .start("web.test/x", &mut map, START)
                .finish(200, None, None, "-");
        }
        println!("unsampled: {:?} per request", begin.elapsed() / 100_000);
        let disabled = Tracer::disabled();
        measure("disabled (with a context)", &disabled, 100_000);
    }

    #[test]
    fn authority_splits() {
        assert_eq!(split_authority("a.b:80"), ("a.b", Some(80)));
        assert_eq!(split_authority("a.b"), ("a.b", None));
        assert_eq!(split_authority("[::1]:8080"), ("[::1]", Some(8080)));
        assert_eq!(split_authority("::1"), ("::1", None));
    }
}
