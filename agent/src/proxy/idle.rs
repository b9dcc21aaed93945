//! Idle timeouts: a relay that moves no byte either way for the idle
//! timeout is closed (Envoy's TCP proxy and Istio's TCP default: 1 h), and
//! an HTTP/2 connection that has no open stream is closed: before its first
//! stream after a short wait, later after the idle timeout.
use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::watch,
    time::Instant,
};

use crate::telemetry::connection::ByteMeter;

/// When bytes last moved on a connection (or, for a keepalive, came in).
pub struct Activity {
    epoch: Instant,
    /// Milliseconds since `epoch`.
    last: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
        })
    }

    pub(super) fn touch(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.fetch_max(now, Ordering::Relaxed);
    }

    /// When bytes last moved.
    pub fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }

    /// Returns once nothing has moved for `timeout`.
    pub async fn idle_for(&self, timeout: Duration) {
        loop {
            let deadline = self.last() + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A stream whose reads (and writes, unless made with
/// [`Watched::reads`]) mark `activity`; `G` is dropped with it (a guard
/// that counts the socket open).
pub struct Watched<S, G = ()> {
    inner: S,
    activity: Arc<Activity>,
    writes: bool,
    _guard: G,
}

impl<S> Watched<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Watched<S> {
        Watched {
            inner,
            activity,
            writes: true,
            _guard: (),
        }
    }
}

impl<S, G> Watched<S, G> {
    /// Marks only what comes in: when the peer was last heard from.
    pub fn reads(inner: S, activity: Arc<Activity>, guard: G) -> Watched<S, G> {
        Watched {
            inner,
            activity,
            writes: false,
            _guard: guard,
        }
    }
}

impl<S: AsyncRead + Unpin, G: Unpin> AsyncRead for Watched<S, G> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin, G: Unpin> AsyncWrite for Watched<S, G> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if self.writes && matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if self.writes && matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How a copy ended.
pub enum Copied {
    /// Both sides finished (or one failed): bytes each way, as
    /// `copy_bidirectional` reports them.
    Done(io::Result<(u64, u64)>),
    /// Nothing moved for the idle timeout.
    Idle(Duration),
}

/// Copies both ways (half-closing each direction at its EOF, with copy
/// buffers held only while bytes are in flight: [`super::relay`]) until
/// both sides are done or, with `idle`, until nothing has moved for that
/// long.
pub async fn copy<A, B>(a: &mut A, b: &mut B, idle: Option<Duration>) -> Copied
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let Some(idle) = idle else {
        return done(super::relay::copy_both_ways(a, b).await);
    };
    let activity = Activity::new();
    let mut a = Watched::new(a, activity.clone());
    let mut b = Watched::new(b, activity.clone());
    tokio::select! {
        copied = super::relay::copy_both_ways(&mut a, &mut b) => done(copied),
        () = activity.idle_for(idle) => Copied::Idle(idle),
    }
}

/// Splices two TCP sockets both ways ([`super::splice`]) until both sides
/// are done or, with `idle`, until nothing has moved for that long;
/// `meters` count the client's bytes.
pub async fn splice(
    client: &TcpStream,
    server: &TcpStream,
    meters: &[Arc<ByteMeter>],
    idle: Option<Duration>,
) -> Copied {
    let Some(idle) = idle else {
        return done(super::splice::splice_both_ways(client, server, meters, None).await);
    };
    let activity = Activity::new();
    tokio::select! {
        copied = super::splice::splice_both_ways(client, server, meters, Some(&activity)) => done(copied),
        () = activity.idle_for(idle) => Copied::Idle(idle),
    }
}

fn done(copied: super::relay::Copied) -> Copied {
    Copied::Done(match copied.error {
        None => Ok((copied.sent, copied.received)),
        Some(error) => Err(error),
    })
}

/// The streams of one HTTP/2 connection: how many are open, how many were.
#[derive(Clone)]
pub struct Streams(Arc<watch::Sender<(usize, u64)>>);

/// Why an HTTP/2 connection is to be closed.
#[derive(Debug, PartialEq, Eq)]
pub enum Unused {
    /// No stream came within the first wait.
    NoFirstStream,
    /// No stream was open for the idle timeout.
    Idle,
}

impl Default for Streams {
    fn default() -> Self {
        Streams(Arc::new(watch::Sender::new((0, 0))))
    }
}

impl Streams {
    /// A stream opens; it closes when the guard drops.
    pub fn open(&self) -> StreamGuard {
        self.0.send_modify(|(open, total)| {
            *open += 1;
            *total += 1;
        });
        StreamGuard(self.0.clone())
    }

    /// Returns when the connection has had no open stream for `first`
    /// since it started (no stream yet) or for `idle` since its last stream
    /// closed (`None`: never).
    pub async fn unused(&self, first: Duration, idle: Option<Duration>) -> Unused {
        let mut changes = self.0.subscribe();
        loop {
            let (open, total) = *changes.borrow_and_update();
            let wait = match (open, total, idle) {
                (0, 0, _) => Some(first),
                (0, _, idle) => idle,
                _ => None,
            };
            let changed = match wait {
                Some(wait) => match tokio::time::timeout(wait, changes.changed()).await {
                    Ok(changed) => changed,
                    Err(_) if total == 0 => return Unused::NoFirstStream,
                    Err(_) => return Unused::Idle,
                },
                None => changes.changed().await,
            };
            if changed.is_err() {
                // The sender lives as long as `self`; nothing left to watch.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// An open stream of a [`Streams`].
pub struct StreamGuard(Arc<watch::Sender<(usize, u64)>>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0
            .send_modify(|(open, _)| *open = open.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test(start_paused = true)]
    async fn a_copy_ends_after_the_idle_timeout_not_while_bytes_move() {
        let (mut client, mut near) = tokio::io::duplex(1024);
        let (mut far, mut server) = tokio::io::duplex(1024);
        let copying =
            tokio::spawn(
                async move { copy(&mut near, &mut far, Some(Duration::from_secs(10))).await },
            );
        // Bytes every 6 s keep it open past 10 s.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client.write_all(b"x").await.expect("write");
            let mut byte = [0u8; 1];
            server.read_exact(&mut byte).await.expect("read");
        }
        let started = Instant::now();
        let ended = copying.await.expect("copy task");
        assert!(matches!(ended, Copied::Idle(_)));
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_connection_is_unused_without_a_first_stream_or_when_idle() {
        let streams = Streams::default();
        let started = Instant::now();
        let unused = streams
            .unused(Duration::from_secs(2), Some(Duration::from_secs(60)))
            .await;
        assert_eq!(unused, Unused::NoFirstStream);
        assert_eq!(started.elapsed(), Duration::from_secs(2));

        let streams = Streams::default();
        let guard = streams.open();
        let watching = {
            let streams = streams.clone();
            tokio::spawn(async move {
                streams
                    .unused(Duration::from_secs(2), Some(Duration::from_secs(60)))
                    .await
            })
        };
        // Open for 100 s: not idle.
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(!watching.is_finished());
        let closed = Instant::now();
        drop(guard);
        assert_eq!(watching.await.expect("watch"), Unused::Idle);
        assert_eq!(closed.elapsed(), Duration::from_secs(60));
    }
}
