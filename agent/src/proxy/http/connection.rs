//! One client connection served as HTTP: hyper's server with the proxy's
//! limits, each request handed to the router with its telemetry around it,
//! and the bytes counted both ways for the connection log.
use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{
    Downstream, HEADER_READ_TIMEOUT, MAX_HEADER_BYTES, MAX_HEADERS, ProxyBody,
    detect::Protocol,
    dispatch::route,
    headers::{is_grpc, request_host},
    telemetry::{AccessEntry, MeteredBody, RequestLog, RequestRecord, request_labels},
};
use crate::proxy::{Outcome, ProxyContext};

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

pub(super) async fn handle(
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

#[derive(Default)]
pub(super) struct ByteCounters {
    /// From the client.
    pub(super) read: AtomicU64,
    /// To the client.
    pub(super) written: AtomicU64,
}

/// The client connection, counting bytes both ways for the connection log.
pub(super) struct CountingIo {
    pub(super) inner: TcpStream,
    pub(super) counters: Arc<ByteCounters>,
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
