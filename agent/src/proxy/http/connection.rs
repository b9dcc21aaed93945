//! One client connection served as HTTP: hyper's server with the proxy's
//! limits, each request handed to the router with its telemetry around it,
//! and the bytes counted both ways into the connection's record.
use std::sync::{Arc, atomic::Ordering};

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpStream;

use super::{
    Downstream, ProxyBody,
    detect::Protocol,
    dispatch::route,
    server::serve_requests,
    telemetry::{RequestLog, RequestTelemetry, Sinks},
};
use crate::{
    proxy::{Outcome, ProxyContext, metered::Metered},
    telemetry::connection::ByteMeter,
};

/// Serves HTTP on a captured connection until the client closes it (or
/// the limits of [`super::server`] end it); its bytes are counted into
/// `bytes` as they flow.
pub async fn serve_connection(
    context: Arc<ProxyContext>,
    downstream: Arc<Downstream>,
    client: TcpStream,
    bytes: Arc<ByteMeter>,
) -> Outcome {
    let io = Metered::new(client, bytes);
    let http2 = downstream.protocol == Protocol::Http2;
    let peer = downstream.peer;
    let handler = {
        let context = context.clone();
        move |request| handle(context.clone(), downstream.clone(), request)
    };
    serve_requests(&context, io, http2, peer, handler).await
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
