//! Queries the node does not answer go to the resolver the application
//! asked, from the pod's own namespace and address, as they would have
//! without the mesh: a socket of their own per query (a fresh source
//! port), the answer relayed unchanged.
use std::{net::SocketAddr, time::Duration};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use weir_common::MARK_BYPASS;

use crate::proxy::{PodHandle, ProxyContext};

/// How long a resolver may take to answer (ztunnel's and glibc's 5 s).
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `query` over UDP and returns the answer (at most `limit` bytes,
/// what the client accepts over UDP).
pub async fn udp(
    context: &ProxyContext,
    pod: &PodHandle,
    resolver: SocketAddr,
    query: &[u8],
    limit: usize,
) -> std::io::Result<Vec<u8>> {
    let socket = pod
        .netns
        .run(&context.home, || {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(resolver),
                socket2::Type::DGRAM,
                Some(socket2::Protocol::UDP),
            )?;
            socket.set_mark(MARK_BYPASS)?;
            socket.set_nonblocking(true)?;
            // Connected: the kernel drops datagrams from anyone else.
            socket.connect(&resolver.into())?;
            Ok::<_, std::io::Error>(std::net::UdpSocket::from(socket))
        })
        .map_err(std::io::Error::other)??;
    let socket = tokio::net::UdpSocket::from_std(socket)?;
    let id = query.get(..2);
    tokio::time::timeout(TIMEOUT, async {
        socket.send(query).await?;
        // One byte more than the client takes: a longer answer (which the
        // resolver should not send, as it read the client's size) shows.
        let limit = limit.max(512);
        let mut answer = vec![0; limit + 1];
        loop {
            let size = socket.recv(&mut answer).await?;
            // An answer to another query (same resolver, stale) is not ours.
            if size < 12 || answer.get(..2) != id {
                continue;
            }
            if size > limit {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the answer is larger than the client accepts over UDP",
                ));
            }
            answer.truncate(size);
            return Ok(answer);
        }
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "the resolver did not answer"))?
}

/// A TCP connection to the resolver, opened from the pod, for the
/// queries of one client connection.
pub struct TcpUpstream {
    stream: tokio::net::TcpStream,
}

impl TcpUpstream {
    pub async fn connect(
        context: &ProxyContext,
        pod: &PodHandle,
        resolver: SocketAddr,
    ) -> std::io::Result<TcpUpstream> {
        let stream = tokio::time::timeout(
            TIMEOUT,
            crate::proxy::connect_from_pod(&context.home, pod, resolver, MARK_BYPASS, None),
        )
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
        Ok(TcpUpstream { stream })
    }

    /// One query and its answer, in DNS-over-TCP framing.
    pub async fn exchange(&mut self, query: &[u8]) -> std::io::Result<Vec<u8>> {
        tokio::time::timeout(TIMEOUT, async {
            write_message(&mut self.stream, query).await?;
            read_message(&mut self.stream)
                .await?
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))
        })
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "the resolver did not answer")
        })?
    }
}

/// One DNS-over-TCP message (a 2-byte length, then the message); `None` at
/// a clean end of the stream.
pub async fn read_message<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut length = [0u8; 2];
    match reader.read_exact(&mut length).await {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let mut message = vec![0; usize::from(u16::from_be_bytes(length))];
    reader.read_exact(&mut message).await?;
    Ok(Some(message))
}

pub async fn write_message<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut W,
    message: &[u8],
) -> std::io::Result<()> {
    let length = u16::try_from(message.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "message over 64 KiB"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(message);
    writer.write_all(&framed).await
}
