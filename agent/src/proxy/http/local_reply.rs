//! Replies the proxy makes itself (no route, overflow, timeouts…), in
//! plain text or as a trailers-only gRPC response, with Envoy's flags.
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use super::{ProxyBody, empty, full, telemetry::RequestLog};

/// A reply the proxy makes itself.
pub(super) struct LocalReply {
    status: StatusCode,
    flag: &'static str,
    message: &'static str,
    /// `x-weir-overflow`: which circuit-breaker limit was hit.
    overflow: Option<&'static str>,
    /// The gRPC status, where Envoy names one instead of mapping the HTTP
    /// status.
    grpc_status: Option<u32>,
}

impl LocalReply {
    pub(super) fn new(status: u16, flag: &'static str, message: &'static str) -> LocalReply {
        LocalReply {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            flag,
            message,
            overflow: None,
            grpc_status: None,
        }
    }

    /// Any status given explicitly (a route's `cluster_not_found_response_code`).
    pub(super) fn with_status(
        status: StatusCode,
        flag: &'static str,
        message: &'static str,
    ) -> LocalReply {
        LocalReply {
            status,
            ..LocalReply::new(503, flag, message)
        }
    }

    /// The stream's maximum duration ran out before the response: Envoy's
    /// 408 `DT`, DEADLINE_EXCEEDED for gRPC.
    pub(super) fn stream_duration() -> LocalReply {
        LocalReply {
            grpc_status: Some(4),
            ..LocalReply::new(408, "DT", "downstream duration timeout")
        }
    }

    pub(super) fn overflow(limit: crate::routing::limits::Overflow) -> LocalReply {
        LocalReply {
            overflow: Some(limit.reason()),
            ..LocalReply::new(503, "UO", "upstream overflow")
        }
    }
}

/// gRPC status for an HTTP status the proxy answers with (Envoy's mapping).
pub(super) fn grpc_status_for(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 => 14,
        504 => 4,
        _ => 2,
    }
}

/// The response for `reply` (gRPC's form when the request is gRPC), its
/// flag logged and counted in `local_replies`.
pub(super) fn local_reply(
    local_replies: &AtomicU64,
    log: &mut RequestLog,
    reply: LocalReply,
    grpc: bool,
) -> Response<ProxyBody> {
    local_replies.fetch_add(1, Ordering::Relaxed);
    log.flags.push(reply.flag);
    let mut response = if grpc {
        grpc_reply(
            reply
                .grpc_status
                .unwrap_or_else(|| grpc_status_for(reply.status)),
            reply.message,
        )
    } else {
        let mut response = Response::new(full(Bytes::from(format!("{}\n", reply.message))));
        *response.status_mut() = reply.status;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        response
    };
    if let Some(limit) = reply.overflow {
        response
            .headers_mut()
            .insert("x-weir-overflow", HeaderValue::from_static(limit));
    }
    response
}

/// A trailers-only gRPC response: HTTP 200 with the gRPC status and
/// message in the headers.
pub(super) fn grpc_reply(code: u32, message: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(empty());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(code));
    headers.insert("grpc-message", HeaderValue::from_static(message));
    response
}
