//! Upgrades (WebSocket) and CONNECT: recognised, then spliced byte for
//! byte between the client and the endpoint.
use http::{Method, Request, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// Copies both ways between the client's and the endpoint's upgraded
/// connections (WebSocket, CONNECT).
pub(super) async fn splice_upgrade(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
) {
    match tokio::try_join!(downstream, upstream) {
        Ok((downstream, upstream)) => {
            let mut downstream = TokioIo::new(downstream);
            let mut upstream = TokioIo::new(upstream);
            let copied = crate::proxy::relay::copy_both_ways(&mut downstream, &mut upstream).await;
            if let Some(error) = copied.error {
                tracing::debug!(%error, "upgraded connection ended");
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
