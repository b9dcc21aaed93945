//! Protocol detection on a captured connection: HTTP/1.x, HTTP/2 with prior
//! knowledge, or anything else (TLS from the app, databases…), decided from
//! the first bytes the client sends, without consuming them (`peek`).
use std::time::Duration;

use tokio::net::TcpStream;

/// What the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// Anything else, or nothing before the timeout (server-first protocols
    /// such as MySQL or SMTP): relayed as opaque TCP.
    Opaque,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http1 => "http/1.1",
            Protocol::Http2 => "http/2",
            Protocol::Opaque => "tcp",
        }
    }
}

/// HTTP/2's connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Request methods recognised as HTTP/1.x (RFC 9110 plus PATCH); each is
/// followed by a space on the wire.
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

/// What the bytes so far say.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Known(Protocol),
    /// A prefix of something recognisable: wait for more.
    NeedMore,
}

fn classify(bytes: &[u8]) -> Verdict {
    if bytes.is_empty() {
        return Verdict::NeedMore;
    }
    let prefix_of = |pattern: &[u8]| {
        let n = bytes.len().min(pattern.len());
        bytes[..n] == pattern[..n]
    };
    if prefix_of(H2_PREFACE) {
        return if bytes.len() >= H2_PREFACE.len() {
            Verdict::Known(Protocol::Http2)
        } else {
            Verdict::NeedMore
        };
    }
    for method in METHODS {
        if prefix_of(method) {
            return if bytes.len() >= method.len() {
                Verdict::Known(Protocol::Http1)
            } else {
                Verdict::NeedMore
            };
        }
    }
    Verdict::Known(Protocol::Opaque)
}

/// The protocol the first bytes show, or `None` while they are a prefix of
/// something recognisable.
pub fn classify_prefix(bytes: &[u8]) -> Option<Protocol> {
    match classify(bytes) {
        Verdict::Known(protocol) => Some(protocol),
        Verdict::NeedMore => None,
    }
}

/// The longest prefix detection needs.
pub const MAX_PREFIX: usize = H2_PREFACE.len();

/// Peeks at the client's first bytes for up to `timeout`.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> Protocol {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buffer = [0u8; H2_PREFACE.len()];
    let mut seen = 0;
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buffer)).await;
        let n = match peeked {
            Ok(Ok(n)) => n,
            // Timed out, or the socket failed: let the relay see what it is.
            Ok(Err(_)) | Err(_) => return Protocol::Opaque,
        };
        if n == 0 {
            // EOF before a byte: nothing to parse.
            return Protocol::Opaque;
        }
        match classify(&buffer[..n]) {
            Verdict::Known(protocol) => return protocol,
            Verdict::NeedMore if n == seen => {
                // No new bytes since the last peek: `peek` returns at once
                // while data is queued, so wait a little before asking again.
                if tokio::time::Instant::now() >= deadline {
                    return Protocol::Opaque;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Verdict::NeedMore => seen = n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\n"),
            Verdict::Known(Protocol::Http1)
        );
        assert_eq!(classify(b"POST /x"), Verdict::Known(Protocol::Http1));
        assert_eq!(classify(H2_PREFACE), Verdict::Known(Protocol::Http2));
        assert_eq!(classify(b"PRI * HT"), Verdict::NeedMore);
        assert_eq!(classify(b"GE"), Verdict::NeedMore);
        // TLS ClientHello, a MySQL-style binary greeting, lowercase "get".
        assert_eq!(
            classify(&[0x16, 0x03, 0x01]),
            Verdict::Known(Protocol::Opaque)
        );
        assert_eq!(classify(b"\x00\x01"), Verdict::Known(Protocol::Opaque));
        assert_eq!(classify(b"get / "), Verdict::Known(Protocol::Opaque));
        assert_eq!(classify(b"GETX"), Verdict::Known(Protocol::Opaque));
    }

    #[tokio::test]
    async fn silent_client_is_opaque_after_the_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(address).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let started = std::time::Instant::now();
        assert_eq!(
            detect(&server, Duration::from_millis(50)).await,
            Protocol::Opaque
        );
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn split_preface_waits_for_the_rest() {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr");
        let mut client = TcpStream::connect(address).await.expect("connect");
        client.set_nodelay(true).expect("nodelay");
        let (server, _) = listener.accept().await.expect("accept");
        client.write_all(&H2_PREFACE[..5]).await.expect("write");
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(&H2_PREFACE[5..]).await.expect("write");
            client
        });
        assert_eq!(
            detect(&server, Duration::from_secs(5)).await,
            Protocol::Http2
        );
        let _client = writer.await.expect("writer");
    }
}
