//! One client connection served as HTTP: hyper's server with the proxy's
//! limits, each request handed to the router with its telemetry around it,
//! and the bytes counted both ways into the connection's record.
use std::{
    convert::Infallible,
    sync::{Arc, atomic::Ordering},
};

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpStream;

use super::{
    Downstream, ProxyBody,
    detect::Protocol,
    dispatch::route,
    server::{Served, serve_http1, serve_http2, served_response},
    telemetry::{RequestLog, RequestTelemetry, Sinks},
};
use crate::{
    proxy::{Outcome, ProxyContext, idle::Streams, metered::Metered},
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
    let settings = context.limits.settings();
    let streams = Streams::default();
    let service = {
        let context = context.clone();
        let downstream = downstream.clone();
        let settings = settings.clone();
        let streams = streams.clone();
        hyper::service::service_fn(move |request| {
            let context = context.clone();
            let downstream = downstream.clone();
            let settings = settings.clone();
            let stream = streams.open();
            // Boxed: hyper moves each stream's future into its own task,
            // and `handle`'s state machine is large (a memmove per stream
            // was the top of an h2c profile).
            let handling = Box::pin(handle(context.clone(), downstream, request));
            async move {
                let response = handling.await;
                Ok::<_, Infallible>(served_response(
                    response,
                    Some(stream),
                    &settings,
                    &context.limits,
                ))
            }
        })
    };
    let served = Served {
        limits: &context.limits,
        settings: &settings,
        listener: "http",
        peer: downstream.peer,
    };
    let result = match downstream.protocol {
        Protocol::Http2 => serve_http2(io, service, &streams, served).await,
        _ => serve_http1(io, service, served).await,
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
