//! Request bodies that a retry can replay: the first attempt streams the
//! client's body upstream while keeping a copy of up to `limit` bytes; a
//! later attempt replays the copy, then continues with whatever the client
//! has not sent yet. A body larger than the limit is never retried.
use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::BoxError;

/// Bodies up to this size can be replayed (Envoy's default
/// `per_request_buffer_limit_bytes` is 1 MiB; retries of bigger uploads are
/// rare and the copy costs memory per request).
pub const REPLAY_LIMIT: usize = 64 * 1024;

struct Shared {
    source: Incoming,
    /// What the client has sent so far, while it fits the limit.
    chunks: Vec<Bytes>,
    kept: usize,
    /// Every body byte read from the client (for `istio_request_bytes`).
    received: u64,
    overflowed: bool,
    source_done: bool,
    trailers: Option<HeaderMap>,
    /// Only the newest attempt reads on; an abandoned one sees the end.
    current_attempt: u32,
    /// Reading the client's body failed: the client's fault (a framing
    /// error, a reset, a hang-up), never the endpoint's.
    client_error: Option<ClientError>,
}

/// How reading a client's body failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientError {
    /// The client went away mid-body.
    Disconnected,
    /// The body broke the protocol (e.g. a bad chunk size).
    Malformed,
}

/// The client's body, shared by the attempts of one request.
#[derive(Clone)]
pub struct RequestBody {
    shared: Arc<Mutex<Shared>>,
    limit: usize,
    hint: SizeHint,
}

impl RequestBody {
    pub fn new(source: Incoming, limit: usize) -> RequestBody {
        let hint = source.size_hint();
        let source_done = source.is_end_stream();
        RequestBody {
            shared: Arc::new(Mutex::new(Shared {
                source,
                chunks: Vec::new(),
                kept: 0,
                received: 0,
                overflowed: false,
                source_done,
                trailers: None,
                current_attempt: 0,
                client_error: None,
            })),
            limit,
            hint,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Body bytes read from the client so far.
    pub fn received(&self) -> u64 {
        self.lock().received
    }

    /// Whether reading the client's body failed, and how.
    pub fn client_error(&self) -> Option<ClientError> {
        self.lock().client_error
    }

    /// Whether another attempt can send the whole body again.
    pub fn replayable(&self) -> bool {
        !self.lock().overflowed
    }

    /// The whole body, when the client has finished sending and it fit the
    /// limit (for mirroring).
    pub fn complete_copy(&self) -> Option<Bytes> {
        let shared = self.lock();
        if shared.overflowed || !shared.source_done {
            return None;
        }
        Some(shared.chunks.concat().into())
    }

    /// The body for attempt `attempt` (0 for the first); earlier attempts'
    /// bodies stop reading from the client.
    pub fn attempt(&self, attempt: u32) -> AttemptBody {
        self.lock().current_attempt = attempt;
        AttemptBody {
            body: self.clone(),
            attempt,
            replayed: 0,
            trailers_sent: false,
        }
    }
}

/// One attempt's view of the body.
pub struct AttemptBody {
    body: RequestBody,
    attempt: u32,
    /// Chunks of the copy already sent by this attempt.
    replayed: usize,
    trailers_sent: bool,
}

impl Body for AttemptBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut shared = this.body.lock();
        if shared.current_attempt != this.attempt {
            return Poll::Ready(Some(Err("request superseded by a retry".into())));
        }
        if this.replayed < shared.chunks.len() && !shared.overflowed {
            let chunk = shared.chunks[this.replayed].clone();
            this.replayed += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if shared.source_done {
            if !this.trailers_sent
                && let Some(trailers) = shared.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            return Poll::Ready(None);
        }
        match Pin::new(&mut shared.source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                shared.source_done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => {
                shared.client_error = Some(if error.is_incomplete_message() {
                    ClientError::Disconnected
                } else {
                    ClientError::Malformed
                });
                Poll::Ready(Some(Err(Box::new(error))))
            }
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    shared.received += data.len() as u64;
                    if !shared.overflowed {
                        if shared.kept + data.len() <= this.body.limit {
                            shared.kept += data.len();
                            shared.chunks.push(data.clone());
                            this.replayed += 1;
                        } else {
                            // Too big to keep: this request won't be retried.
                            shared.overflowed = true;
                            shared.chunks.clear();
                        }
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => {
                        shared.source_done = true;
                        shared.trailers = Some(trailers.clone());
                        this.trailers_sent = true;
                        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                    }
                    // Unknown frame kinds are dropped, as hyper does.
                    Err(_) => {
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.body.lock();
        shared.source_done
            && self.replayed >= shared.chunks.len()
            && (shared.trailers.is_none() || self.trailers_sent)
    }

    fn size_hint(&self) -> SizeHint {
        self.body.hint
    }
}
