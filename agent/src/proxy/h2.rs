//! HBONE over the `h2` crate: one CONNECT stream as a byte stream, and the
//! keepalive PINGs both ends of a connection send.
//!
//! Why not hyper's upgraded stream: it keeps the last DATA chunk it read as
//! an empty `Bytes` that still points into the HTTP/2 codec's read buffer,
//! so every idle tunnel pins a whole read-buffer block (about 64 KiB per
//! side on this machine, measured by `cargo xtask bench soak`). This one
//! lets go of a chunk as soon as it is read, and gives the flow-control
//! window back as the application reads.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Buf as _, Bytes};
use h2::{Ping, PingPong, Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::idle::Activity;
#[cfg(doc)]
use super::idle::Watched;

pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// The unread rest of the last DATA chunk; empty (and owning nothing)
    /// once read.
    pending: Bytes,
    /// End of stream sent.
    ended: bool,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> H2Stream {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            ended: false,
        }
    }
}

fn h2_to_io(error: h2::Error) -> io::Error {
    if error.is_io() {
        error
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else {
        io::Error::other(error)
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(chunk)) => self.pending = chunk,
                Some(Err(error)) => {
                    return Poll::Ready(match error.reason() {
                        // The peer ended or cancelled the stream: EOF.
                        Some(Reason::NO_ERROR) | Some(Reason::CANCEL) => Ok(()),
                        Some(Reason::STREAM_CLOSED) => {
                            Err(io::Error::new(io::ErrorKind::BrokenPipe, error))
                        }
                        _ => Err(h2_to_io(error)),
                    });
                }
            }
        }
        let count = self.pending.len().min(out.remaining());
        out.put_slice(&self.pending[..count]);
        self.pending.advance(count);
        if self.pending.is_empty() {
            // An empty slice still holds the codec's buffer: drop it.
            self.pending = Bytes::new();
        }
        let _ = self.recv.flow_control().release_capacity(count);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(data.len());
        let written = match ready!(self.send.poll_capacity(cx)) {
            Some(Ok(capacity)) => {
                let count = capacity.min(data.len());
                self.send
                    .send_data(Bytes::copy_from_slice(&data[..count]), false)
                    .ok()
                    .map(|()| count)
            }
            // No capacity will come (the stream is closing) or an error.
            None | Some(Err(_)) => None,
        };
        if let Some(count) = written {
            return Poll::Ready(Ok(count));
        }
        // Why the stream cannot take data: the peer's reset, if any.
        Poll::Ready(Err(match ready!(self.send.poll_reset(cx)) {
            Ok(Reason::NO_ERROR) | Ok(Reason::CANCEL) | Ok(Reason::STREAM_CLOSED) => {
                io::ErrorKind::BrokenPipe.into()
            }
            Ok(reason) => io::Error::other(h2::Error::from(reason)),
            Err(error) => h2_to_io(error),
        }))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Data is handed to the connection as it is written.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.ended {
            self.ended = true;
            // Fails only if the stream is already reset: nothing to end.
            let _ = self.send.send_data(Bytes::new(), true);
        }
        Poll::Ready(Ok(()))
    }
}

/// HTTP/2 keepalive: a PING after `interval` without a byte from the peer,
/// idle or not (a dead peer must not look alive), answered within
/// `timeout`.
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Keepalive {
    /// Returns when a PING went unanswered; never otherwise.
    /// `heard` marks when the peer last sent bytes ([`Watched::reads`]).
    pub async fn run(self, pings: Option<PingPong>, heard: &Activity) {
        // h2 hands the ping handle out once; whoever drives the connection
        // takes it first.
        let Some(mut pings) = pings else {
            return std::future::pending().await;
        };
        loop {
            let due = heard.last() + self.interval;
            if tokio::time::Instant::now() < due {
                tokio::time::sleep_until(due).await;
                continue;
            }
            match tokio::time::timeout(self.timeout, pings.ping(Ping::opaque())).await {
                Ok(Ok(_pong)) => {}
                // The connection is ending; its own result says how.
                Ok(Err(_)) => return std::future::pending().await,
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A CONNECT stream over an in-memory pipe: bytes both ways, EOF on
    /// end of stream, and no chunk kept once read.
    #[tokio::test]
    async fn carries_bytes_both_ways_and_ends() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(server_io).await.expect("server");
            let (request, mut respond) = connection
                .accept()
                .await
                .expect("a stream")
                .expect("accepted");
            let send = respond
                .send_response(http::Response::new(()), false)
                .expect("respond");
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            let mut stream = H2Stream::new(send, request.into_body());
            let mut received = Vec::new();
            stream.read_to_end(&mut received).await.expect("read");
            assert!(stream.pending.is_empty());
            stream.write_all(&received[..5]).await.expect("write");
            stream.shutdown().await.expect("shutdown");
            received.len()
        });
        let (sender, connection) = h2::client::handshake(client_io).await.expect("client");
        tokio::spawn(connection);
        let mut sender = sender.ready().await.expect("ready");
        let request = http::Request::connect("10.0.0.1:80")
            .body(())
            .expect("request");
        let (response, send) = sender.send_request(request, false).expect("send");
        let response = response.await.expect("response");
        assert_eq!(response.status(), 200);
        let mut stream = H2Stream::new(send, response.into_body());
        let payload = vec![9u8; 300_000];
        stream.write_all(&payload).await.expect("write");
        stream.shutdown().await.expect("shutdown");
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await.expect("read");
        assert_eq!(back, vec![9u8; 5]);
        assert_eq!(server.await.expect("join"), 300_000);
    }
}
