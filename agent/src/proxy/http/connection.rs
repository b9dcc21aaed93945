//! One client connection served as HTTP: hyper's server with the proxy's
//! limits, each request handed to the router with its telemetry around it,
//! and the bytes counted both ways into the connection's record.
use std::{
    convert::Infallible,
    sync::{Arc, atomic::Ordering},
};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::{
    Downstream, HEADER_READ_TIMEOUT, MAX_HEADER_BYTES, MAX_HEADERS, ProxyBody,
    detect::Protocol,
    dispatch::route,
    telemetry::{RequestLog, RequestTelemetry, Sinks},
};
use crate::{
    proxy::{Outcome, ProxyContext, metered::Metered},
    telemetry::connection::ByteMeter,
};

/// Serves HTTP on a captured connection until the client closes it; its
/// bytes are counted into `bytes` as they flow.
pub async fn serve_connection(
    context: Arc<ProxyContext>,
    downstream: Arc<Downstream>,
    client: TcpStream,
    bytes: Arc<ByteMeter>,
) -> Outcome {
    let io = TokioIo::new(Metered::new(client, bytes));
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
    match result {
        Ok(()) => Outcome::Closed,
        // A client that hung up mid-request is an ordinary end.
        Err(error) if error.is_incomplete_message() || error.is_canceled() => Outcome::Closed,
        Err(error) => Outcome::Failed(format!("HTTP: {error}")),
    }
}

/// One request: counted, routed, and observed until its response body
/// ends.
async fn handle(
    context: Arc<ProxyContext>,
    downstream: Arc<Downstream>,
    mut request: Request<Incoming>,
) -> Response<ProxyBody> {
    context.http.requests.fetch_add(1, Ordering::Relaxed);
    let telemetry = RequestTelemetry::start(&context.telemetry.spans, &downstream, &mut request);
    let mut log = RequestLog::default();
    let response = route(&context, &downstream, request, &mut log).await;
    let sinks = Sinks {
        access_log: &context.telemetry.access_log,
        metrics: &context.telemetry.metrics,
        store: &context.store,
    };
    telemetry.finish(sinks, &downstream, log, response)
}
