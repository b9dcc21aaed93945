//! The HTTP servers the agent runs on client connections (outbound L7,
//! inbound per-request authorization, the admin ports), with the limits
//! of the `proxy:` config:
//!
//! - HTTP/1.1: at most 100 header fields and 60 KiB of headers (431), a
//!   request's headers within `request_headers_timeout` (a client that sent
//!   part of them then gets 408; an idle keep-alive connection is just
//!   closed);
//! - HTTP/2: the same header size, and a connection closed with a GOAWAY
//!   when its first request does not come within `request_headers_timeout`
//!   or it has no open stream for the idle timeout;
//! - either: a response body that stops moving for `stream_idle_timeout`
//!   is ended.
use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    service::HttpService,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};

use super::{BoxError, ProxyBody, upstream::Io};
use crate::proxy::{
    Outcome, ProxyContext,
    idle::{StreamGuard, Streams, Unused},
    limits::{CLOSE_GRACE, Limits, Phase, Settings},
};

/// Request header section limits: 60 KiB (Envoy's default) and 100 fields.
pub const MAX_HEADER_BYTES: usize = 60 * 1024;
pub const MAX_HEADERS: usize = 100;

/// What a slow client gets once it has started but not finished its
/// headers in time.
const REQUEST_TIMEOUT_RESPONSE: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// Who is served, for the counters and the log.
pub struct Served<'a> {
    pub limits: &'a Limits,
    pub settings: &'a Settings,
    /// `http` (L7), `admin`…
    pub listener: &'static str,
    pub peer: SocketAddr,
}

/// Serves HTTP/1.1 on `io` until the client closes it (upgrades allowed).
pub async fn serve_http1<I, S, B>(io: I, service: S, served: Served<'_>) -> hyper::Result<()>
where
    I: Io,
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let shared = Arc::new(SharedIo {
        io: Mutex::new(io),
        partial_head: AtomicBool::new(false),
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(served.settings.request_headers_timeout)
        .max_headers(MAX_HEADERS)
        .max_header_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(ServerIo(shared.clone())), service)
        .with_upgrades()
        .await;
    // hyper closes a slow client without a word; one that started a
    // request is told why (an idle keep-alive connection is just closed).
    if let Err(error) = &result
        && error.is_timeout()
        && shared.partial_head.load(Ordering::Relaxed)
    {
        served
            .limits
            .timed_out(Phase::RequestHeaders, served.listener, &served.peer);
        let mut io = ServerIo(shared);
        let reply = async {
            let _ = io.write_all(REQUEST_TIMEOUT_RESPONSE).await;
            let _ = io.shutdown().await;
        };
        let _ = tokio::time::timeout(CLOSE_GRACE, reply).await;
    }
    result
}

/// Serves HTTP/2 on `io` until the client closes it, it sends no request
/// within the header timeout, or it stays without an open stream for the
/// idle timeout. Each stream must hold a guard of `streams`.
pub async fn serve_http2<I, S, B>(
    io: I,
    service: S,
    streams: &Streams,
    served: Served<'_>,
) -> hyper::Result<()>
where
    I: Io,
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .serve_connection(TokioIo::new(io), service);
    let ended = drive_http2(
        connection,
        streams,
        served.settings.request_headers_timeout,
        served.settings.idle_timeout,
        |connection| connection.graceful_shutdown(),
    )
    .await;
    match ended {
        Ok(result) => result,
        Err(unused) => {
            let phase = match unused {
                Unused::NoFirstStream => Phase::RequestHeaders,
                Unused::Idle => Phase::Idle,
            };
            served
                .limits
                .timed_out(phase, served.listener, &served.peer);
            Ok(())
        }
    }
}

/// Drives an HTTP/2 server connection until it ends, or closes it when it
/// is unused: no stream within `first`, or none open for `idle`. It gets a
/// GOAWAY (a lazy but honest client reconnects when it has a request) and
/// [`CLOSE_GRACE`] to finish, then it is dropped (a hostile one never
/// answers).
pub async fn drive_http2<C>(
    connection: C,
    streams: &Streams,
    first: Duration,
    idle: Option<Duration>,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
) -> Result<hyper::Result<()>, Unused>
where
    C: Future<Output = hyper::Result<()>>,
{
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => Ok(result),
        unused = streams.unused(first, idle) => {
            graceful_shutdown(connection.as_mut());
            let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
            Err(unused)
        }
    }
}

/// The client connection shared with hyper, so that the proxy can still
/// answer 408 after hyper gave up on the headers; it notes whether bytes
/// came in since the proxy last wrote (part of the next request's head).
struct SharedIo<I> {
    io: Mutex<I>,
    partial_head: AtomicBool,
}

struct ServerIo<I>(Arc<SharedIo<I>>);

impl<I> ServerIo<I> {
    fn io(&self) -> std::sync::MutexGuard<'_, I> {
        self.0.io.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<I: Io> AsyncRead for ServerIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut *self.io()).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.0.partial_head.store(true, Ordering::Relaxed);
        }
        result
    }
}

impl<I: Io> AsyncWrite for ServerIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut *self.io()).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.0.partial_head.store(false, Ordering::Relaxed);
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut *self.io()).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.0.partial_head.store(false, Ordering::Relaxed);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io().is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io()).poll_shutdown(cx)
    }
}

/// A response body on its way to the client: it holds its stream open
/// (HTTP/2) until it ends, and ends with an error (the stream is reset)
/// when no frame came for the stream idle timeout.
pub struct ServedBody {
    inner: ProxyBody,
    _stream: Option<StreamGuard>,
    idle: Option<IdleTimer>,
}

struct IdleTimer {
    timeout: Duration,
    last_frame: tokio::time::Instant,
    sleep: Pin<Box<tokio::time::Sleep>>,
    expired: Counter,
}

impl ServedBody {
    pub fn new(
        inner: ProxyBody,
        stream: Option<StreamGuard>,
        settings: &Settings,
        limits: &Limits,
    ) -> ServedBody {
        let idle = settings.stream_idle_timeout.map(|timeout| IdleTimer {
            timeout,
            last_frame: tokio::time::Instant::now(),
            sleep: Box::pin(tokio::time::sleep(timeout)),
            expired: limits.timeout_counter(Phase::StreamIdle),
        });
        ServedBody {
            inner,
            _stream: stream,
            idle,
        }
    }
}

impl Body for ServedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(idle) = &mut this.idle {
                    idle.last_frame = tokio::time::Instant::now();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(end) => {
                this._stream = None;
                this.idle = None;
                Poll::Ready(end)
            }
            Poll::Pending => {
                let Some(idle) = &mut this.idle else {
                    return Poll::Pending;
                };
                // The timer is moved only when it fires, not per frame.
                while idle.sleep.as_mut().poll(cx).is_ready() {
                    let deadline = idle.last_frame + idle.timeout;
                    if tokio::time::Instant::now() >= deadline {
                        idle.expired.inc();
                        this.idle = None;
                        return Poll::Ready(Some(Err("stream idle timeout".into())));
                    }
                    idle.sleep.as_mut().reset(deadline);
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves the proxy's requests on a client connection, HTTP/2 or
/// HTTP/1.1, until it ends: each request is answered by `handle`, its
/// response body served under the stream's limits. A client that hung up
/// mid-request is an ordinary end.
pub async fn serve_requests<I, F, Fut>(
    context: &Arc<ProxyContext>,
    io: I,
    http2: bool,
    peer: SocketAddr,
    handle: F,
) -> Outcome
where
    I: Io,
    F: Fn(Request<Incoming>) -> Fut + Send + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let settings = context.limits.settings();
    let streams = Streams::default();
    let service = {
        let context = context.clone();
        let settings = settings.clone();
        let streams = streams.clone();
        hyper::service::service_fn(move |request| {
            let context = context.clone();
            let settings = settings.clone();
            let stream = streams.open();
            // Boxed: hyper moves each stream's future into its own task,
            // and a request's state machine is large (a memmove per stream
            // was the top of an h2c profile).
            let handling = Box::pin(handle(request));
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
        peer,
    };
    let result = if http2 {
        serve_http2(io, service, &streams, served).await
    } else {
        serve_http1(io, service, served).await
    };
    match result {
        Ok(()) => Outcome::Closed,
        Err(error) if error.is_incomplete_message() || error.is_canceled() => Outcome::Closed,
        Err(error) => Outcome::Failed(format!("HTTP: {error}")),
    }
}

/// `response` with its body served under the stream's limits.
pub fn served_response(
    response: Response<ProxyBody>,
    stream: Option<StreamGuard>,
    settings: &Settings,
    limits: &Limits,
) -> Response<ServedBody> {
    response.map(|body| ServedBody::new(body, stream, settings, limits))
}

/// Waits until `progress` stops changing for `idle`, checking once per
/// `idle` (so it returns between `idle` and twice that after the last
/// change); never with `None`.
pub async fn stalled(idle: Option<Duration>, progress: impl Fn() -> u64) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    let mut seen = progress();
    loop {
        tokio::time::sleep(idle).await;
        let now = progress();
        if now == seen {
            return;
        }
        seen = now;
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt as _, StreamBody};
    use tokio::io::AsyncReadExt as _;

    use super::*;
    use crate::proxy::limits::LimitMetrics;

    fn limits() -> (Limits, Arc<Settings>) {
        let settings = Settings {
            request_headers_timeout: Duration::from_secs(10),
            stream_idle_timeout: Some(Duration::from_secs(300)),
            ..Settings::default()
        };
        let limits = Limits::new(settings, LimitMetrics::default());
        let settings = limits.settings();
        (limits, settings)
    }

    /// Serves one HTTP/1.1 connection (answering 200 to anything) on an
    /// in-memory pipe; returns the client's end.
    fn serve_pipe() -> tokio::io::DuplexStream {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let (limits, settings) = limits();
            let service = hyper::service::service_fn(|_request| async {
                Ok::<_, Infallible>(Response::new(super::super::empty()))
            });
            let served = Served {
                limits: &limits,
                settings: &settings,
                listener: "http",
                peer: SocketAddr::from(([127, 0, 0, 1], 1)),
            };
            let _ = serve_http1(server, service, served).await;
        });
        client
    }

    async fn read_all(client: &mut tokio::io::DuplexStream) -> String {
        let mut answer = Vec::new();
        let _ = client.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stalls_in_its_headers_gets_408() {
        let mut client = serve_pipe();
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-partial: ")
            .await
            .expect("write");
        let answer = read_all(&mut client).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_keep_alive_connection_is_closed_without_a_408() {
        let mut client = serve_pipe();
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let answer = read_all(&mut client).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        assert!(!answer.contains("408"), "{answer:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_body_that_stops_ends_after_the_stream_idle_timeout() {
        let (limits, settings) = limits();
        let (frames, receiver) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let inner = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(receiver)).boxed();
        let mut body = ServedBody::new(inner, None, &settings, &limits);
        frames
            .send(Ok(Frame::data(Bytes::from_static(b"first"))))
            .await
            .expect("send");
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().ok(), Some(Bytes::from_static(b"first")));
        let started = tokio::time::Instant::now();
        let ended = body.frame().await.expect("an end");
        assert!(ended.is_err());
        assert_eq!(started.elapsed(), Duration::from_secs(300));
        drop(frames);
    }

    #[tokio::test(start_paused = true)]
    async fn stalled_waits_for_progress_to_stop() {
        let progress = std::sync::atomic::AtomicU64::new(0);
        let started = tokio::time::Instant::now();
        let stalling = stalled(Some(Duration::from_secs(10)), || {
            // Moves for the first 25 s.
            let now = started.elapsed().as_secs();
            progress.store(now.min(25), Ordering::Relaxed);
            progress.load(Ordering::Relaxed)
        });
        stalling.await;
        assert_eq!(started.elapsed(), Duration::from_secs(40));
    }
}
