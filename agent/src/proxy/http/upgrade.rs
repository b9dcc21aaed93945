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

/// A CONNECT, or an HTTP/1.1 `Upgrade` other than `h2c`. An h2c upgrade
/// is not followed, as in Envoy: the request is served as HTTP/1.1 and its
/// `Upgrade`, `Connection` and `HTTP2-Settings` are stripped with the other
/// hop-by-hop headers.
pub(super) fn is_upgrade(request: &Request<Incoming>) -> bool {
    if request.method() == Method::CONNECT {
        return true;
    }
    if !request.headers().contains_key(header::UPGRADE) {
        return false;
    }
    let tokens = |name: header::HeaderName| {
        request
            .headers()
            .get_all(name)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(|token| token.trim().to_ascii_lowercase())
            .collect::<Vec<String>>()
    };
    let protocols = tokens(header::UPGRADE);
    !protocols.is_empty()
        && protocols.iter().any(|protocol| protocol != "h2c")
        && tokens(header::CONNECTION)
            .iter()
            .any(|token| token == "upgrade")
}
