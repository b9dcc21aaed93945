//! L7 in the node proxy: a captured connection to a service port that has a
//! route configuration is parsed as HTTP (when it is HTTP), and every
//! request is routed on its own: matched, transformed, balanced over the
//! chosen cluster, retried, timed out, faulted, mirrored. Bodies stream
//! through; only a retry keeps a bounded copy.
//!
//! One module per step: `connection` serves a client connection, `dispatch`
//! picks the route and forwards, `headers` rewrites, `fault` injects,
//! `retry` sends within the cluster's limits, `mirror` copies, `upgrade`
//! splices, `local_reply` answers for the proxy, `server` runs hyper with
//! the proxy's limits, and `telemetry` records a request's metrics, access
//! log and span. `clusters` and `upstream` hold
//! each cluster's state and connections.
pub mod authorize;
pub mod body;
pub mod clusters;
mod connection;
mod cors;
mod deadline;
pub mod detect;
mod dispatch;
pub mod dns;
mod fault;
mod headers;
mod local_reply;
mod mirror;
mod retry;
pub mod server;
mod session;
mod telemetry;
mod upgrade;
pub mod upstream;

/// The target of the request lines of the access log.
pub(crate) use telemetry::LOG_TARGET as ACCESS_LOG_TARGET;

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full, combinators::BoxBody};

pub use self::connection::serve_connection;
use self::{clusters::ClusterCache, detect::Protocol};
use super::PodHandle;
use crate::{routing::RouteConfig, state::ServiceEntry};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy hands to hyper.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// How long the client may stay silent before the connection is treated as
/// opaque TCP (server-first protocols send nothing).
pub const DETECTION_TIMEOUT: Duration = Duration::from_millis(100);

/// The proxy's L7 state shared by all connections.
#[derive(Default)]
pub struct HttpState {
    /// Per cluster: endpoints, balancing, limits, upstream connections.
    pub clusters: ClusterCache,
    pub requests: AtomicU64,
    /// Requests answered by the proxy itself (no route, overflow, fault…).
    pub local_replies: AtomicU64,
    pub retries: AtomicU64,
    pub mirrored: AtomicU64,
    /// Requests authorized and delivered by the inbound L7 path.
    pub inbound_requests: AtomicU64,
}

/// One downstream connection: who sent it, what it dialled.
pub struct Downstream {
    pub pod: Arc<PodHandle>,
    /// The client: its pod's address and its port (source-IP hashing, the
    /// PROXY protocol header, the access log).
    pub peer: SocketAddr,
    pub original: SocketAddr,
    pub service: Arc<ServiceEntry>,
    pub routes: Arc<RouteConfig>,
    pub protocol: Protocol,
}

/// Draws true with probability `fraction`.
fn roll(fraction: f64) -> bool {
    fraction >= 1.0 || (fraction > 0.0 && fastrand::f64() < fraction)
}

fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}
