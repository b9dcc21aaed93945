//! Fault injection: a route's delay and abort.
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::Response;

use super::{
    ProxyBody, full,
    local_reply::{grpc_reply, grpc_status_for},
    telemetry::RequestLog,
};
use crate::{proxy::ProxyContext, routing::FaultAbort};

pub(super) fn fault_reply(
    context: &ProxyContext,
    log: &mut RequestLog,
    abort: FaultAbort,
    grpc: bool,
) -> Response<ProxyBody> {
    context.http.local_replies.fetch_add(1, Ordering::Relaxed);
    log.flags.push("FI");
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
