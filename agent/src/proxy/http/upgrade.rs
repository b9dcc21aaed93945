//! Upgrades (WebSocket) and CONNECT: recognised, then spliced byte for
//! byte between the client and the endpoint.
use http::{Method, Request, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::proxy::idle::{Copied, copy};

/// Copies both ways between the client's and the endpoint's upgraded
/// connections (WebSocket, CONNECT), until both end or nothing moved for
/// `idle` (the relays' idle timeout: the upgraded stream is a byte stream).
pub(super) async fn splice_upgrade(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    idle: Option<std::time::Duration>,
) {
    match tokio::try_join!(downstream, upstream) {
        Ok((downstream, upstream)) => {
            let mut downstream = TokioIo::new(downstream);
            let mut upstream = TokioIo::new(upstream);
            match copy(&mut downstream, &mut upstream, idle).await {
                Copied::Done(Ok(_)) => {}
                Copied::Done(Err(error)) => {
                    tracing::debug!(%error, "upgraded connection ended");
                }
                Copied::Idle(after) => {
                    tracing::debug!(idle_s = after.as_secs(), "upgraded connection idle: closed");
                }
            }
        }
        Err(error) => tracing::debug!(%error, "upgrade failed"),
    }
}

pub(super) fn is_upgrade(request: &Request<Incoming>) -> bool {
    request.method() == Method::CONNECT
        || (request.headers().contains_key(header::UPGRADE)
            && request
                .headers()
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .any(|value| {
                    value
                        .split(',')
                        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
                }))
}
