//! What happened, reported four ways: Prometheus metrics, access logs,
//! OpenTelemetry spans, and the kernel's flow events (`weir trace`).
pub mod access_log;
pub mod flows;
pub mod metrics;
pub mod spans;
