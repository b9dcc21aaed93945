//! An OTLP/gRPC trace collector for tests: a tonic server implementing
//! `opentelemetry.proto.collector.trace.v1.TraceService/Export` on
//! 127.0.0.1 inside a node's namespace (where the agent runs), keeping
//! every span it receives for the test to look at.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
};

use crate::wait_for;

/// One span as received.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectedSpan {
    /// Lowercase hex, 32 digits.
    pub trace_id: String,
    /// Lowercase hex, 16 digits.
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// OTLP `SpanKind` (3 = CLIENT).
    pub kind: i32,
    /// Values rendered as text (ints in decimal).
    pub attributes: BTreeMap<String, String>,
    /// The resource's `service.name`.
    pub service_name: String,
    /// OTLP `StatusCode` (0 unset, 1 ok, 2 error).
    pub status_code: i32,
}

impl CollectedSpan {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

pub const SPAN_KIND_CLIENT: i32 = 3;

struct Service {
    spans: Arc<Mutex<Vec<CollectedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service_name = resource_spans
                .resource
                .as_ref()
                .and_then(|resource| attributes(&resource.attributes).remove("service.name"))
                .unwrap_or_default();
            for span in resource_spans
                .scope_spans
                .into_iter()
                .flat_map(|scope| scope.spans)
            {
                received.push(CollectedSpan {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name,
                    kind: span.kind,
                    attributes: attributes(&span.attributes),
                    service_name: service_name.clone(),
                    status_code: span.status.map_or(0, |status| status.code),
                });
            }
        }
        self.spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn attributes(list: &[KeyValue]) -> BTreeMap<String, String> {
    list.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.as_ref().map(text).unwrap_or_default(),
            )
        })
        .collect()
}

fn text(value: &AnyValue) -> String {
    match &value.value {
        Some(Value::StringValue(text)) => text.clone(),
        Some(Value::IntValue(number)) => number.to_string(),
        Some(Value::BoolValue(flag)) => flag.to_string(),
        Some(Value::DoubleValue(number)) => number.to_string(),
        other => format!("{other:?}"),
    }
}

/// A running collector; stops when dropped.
pub struct Collector {
    pub address: SocketAddr,
    spans: Arc<Mutex<Vec<CollectedSpan>>>,
    _server: crate::grpc_server::GrpcServer,
}

impl Collector {
    /// Listens on 127.0.0.1 (a free port) inside `netns`.
    pub fn start(netns: &Path) -> anyhow::Result<Collector> {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let service = Service {
            spans: spans.clone(),
        };
        let server =
            crate::grpc_server::GrpcServer::start(netns, "test OTLP collector", |builder| {
                let mut builder = builder;
                Ok(builder.add_service(TraceServiceServer::new(service)))
            })?;
        Ok(Collector {
            address: server.address,
            spans,
            _server: server,
        })
    }

    /// `http://127.0.0.1:<port>`, for the agent's `tracing.otlp_endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The spans received so far, in arrival order.
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.spans.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until at least `count` spans have arrived.
    pub fn wait_spans(
        &self,
        count: usize,
        deadline: Duration,
    ) -> anyhow::Result<Vec<CollectedSpan>> {
        wait_for(
            &format!("{count} span(s) at the collector"),
            deadline,
            || {
                let spans = self.spans();
                (spans.len() >= count).then_some(spans)
            },
        )
    }
}
