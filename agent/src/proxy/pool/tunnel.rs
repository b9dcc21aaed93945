//! A tunnel stream as the proxy uses it: a byte stream that keeps its
//! connection's stream count (and so its idle clock) while it lives.
use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use super::lifecycle::ConnectionState;
use crate::proxy::h2::H2Stream;

/// One counted stream of a pooled connection; uncounted when dropped.
pub(super) struct StreamSlot(pub(super) Arc<ConnectionState>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.end_stream();
    }
}

/// A tunnel stream; its connection's stream count drops with it.
pub struct Tunnel {
    pub io: H2Stream,
    pub(super) slot: StreamSlot,
}

impl Tunnel {
    /// The stream's part of the kernel's figures of the tunnel's socket,
    /// from now.
    pub fn kernel_share(&self) -> Option<crate::telemetry::kernel_tcp::LegShare> {
        self.slot.0.kernel_leg.as_ref().map(|leg| leg.begin())
    }

    /// The tunnel's socket, for a user that shares it out further (the
    /// requests of a pooled upstream HTTP connection).
    pub fn kernel_leg(&self) -> Option<Arc<crate::telemetry::kernel_tcp::SharedLeg>> {
        self.slot.0.kernel_leg.clone()
    }
}

impl tokio::io::AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
