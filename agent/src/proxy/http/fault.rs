//! Fault injection: a route's delay, then its abort, each drawn with its
//! own probability.
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::Response;

use super::{
    ProxyBody, full,
    local_reply::{grpc_reply, grpc_status_for},
    roll,
    telemetry::RequestLog,
};
use crate::routing::{Fault, FaultAbort};

/// Waits out an injected delay, then answers for an injected abort
/// (counted in `local_replies`); `None` lets the request go on.
pub(super) async fn inject(
    fault: &Fault,
    local_replies: &AtomicU64,
    log: &mut RequestLog,
    grpc: bool,
) -> Option<Response<ProxyBody>> {
    if let Some((delay, fraction)) = fault.delay
        && roll(fraction)
    {
        log.flags.push("DI");
        tokio::time::sleep(delay).await;
    }
    if let Some((abort, fraction)) = fault.abort
        && roll(fraction)
    {
        local_replies.fetch_add(1, Ordering::Relaxed);
        log.flags.push("FI");
        return Some(abort_reply(abort, grpc));
    }
    None
}

fn abort_reply(abort: FaultAbort, grpc: bool) -> Response<ProxyBody> {
    match abort {
        FaultAbort::Grpc(code) => grpc_reply(code, "fault filter abort"),
        FaultAbort::Http(status) if grpc => {
            grpc_reply(grpc_status_for(status), "fault filter abort")
        }
        FaultAbort::Http(status) => {
            let mut response = Response::new(full(Bytes::from_static(b"fault filter abort\n")));
            *response.status_mut() = status;
            response
        }
    }
}
