//! One client connection served as HTTP by the proxy's server
//! (`server.rs`), each request handed to the router with its telemetry
//! around it, and the bytes counted both ways for the connection log.
use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{
    Downstream, ProxyBody,
    detect::Protocol,
    dispatch::route,
    server::{Served, serve_http1, serve_http2, served_response},
    telemetry::{RequestLog, RequestTelemetry, Sinks},
};
use crate::proxy::{Outcome, ProxyContext, idle::Streams};

/// Serves HTTP on a captured connection until the client closes it (or
/// the limits of [`super::server`] end it).
pub async fn serve_connection(
    context: Arc<ProxyContext>,
    downstream: Arc<Downstream>,
    client: TcpStream,
) -> Outcome {
    let counters = Arc::new(ByteCounters::default());
    let io = CountingIo {
        inner: client,
        counters: counters.clone(),
    };
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
    context
        .stats
        .active_connections
        .fetch_add(1, Ordering::Relaxed);
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
