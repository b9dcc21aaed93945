//! What happened, reported four ways: Prometheus metrics, access logs,
//! OpenTelemetry spans, and the kernel's flow events (`weir trace`).
pub mod access_log;
pub mod baggage;
pub mod burst;
pub mod connection;
pub mod flows;
pub mod hbone_metrics;
pub mod kernel_tcp;
pub mod log_writer;
pub mod metrics;
pub mod spans;

use std::sync::Arc;

/// Where the proxy reports what happened; the parts that report get this,
/// not the whole proxy.
pub struct Telemetry {
    pub metrics: Arc<metrics::Metrics>,
    /// Flow events for `weir trace`.
    pub flows: Arc<flows::FlowEvents>,
    /// Which connections get an access-log line.
    pub access_log: access_log::AccessLog,
    /// Trace headers and spans of L7 requests.
    pub spans: spans::Tracer,
    /// What the kernel measured of the proxy's connections (sock_ops).
    pub kernel_tcp: Option<Arc<crate::capture::datapath::TcpStatsTable>>,
}

impl Telemetry {
    /// Starts following `socket` in the kernel (see
    /// [`connection::OpenConnection::follow_socket`]): its cookie.
    pub fn follow_socket(&self, socket: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
        self.kernel_tcp.as_ref()?.follow(socket)
    }
}
