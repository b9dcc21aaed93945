//! Stateful sessions (Envoy's `stateful_session` filter, Istio's persistent
//! sessions): a request that names an endpoint (base64 of its `ip:port`, in
//! a header or a cookie) goes there while it is in service, and a response
//! from another endpoint names the new one.
use std::net::SocketAddr;

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, Response, header};

use super::{
    ProxyBody,
    clusters::ClusterRuntime,
    dispatch::{cookie_header, cookie_value},
    local_reply::LocalReply,
};
use crate::routing::{SessionState, StatefulSession};

/// The endpoint a request's session names, if it names a valid one.
pub(super) fn requested(session: &StatefulSession, headers: &HeaderMap) -> Option<SocketAddr> {
    let encoded = match &session.state {
        SessionState::Header(name) => headers.get(name)?.to_str().ok()?.trim().to_owned(),
        SessionState::Cookie(cookie) => cookie_value(headers, &cookie.name)?.to_owned(),
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim_matches('"'))
        .ok()?;
    std::str::from_utf8(&decoded).ok()?.parse().ok()
}

/// The endpoint index for the first try: the requested one while it is in
/// service; with `strict`, a reply instead of another endpoint.
pub(super) fn preferred(
    session: &StatefulSession,
    requested: SocketAddr,
    cluster: &ClusterRuntime,
) -> Result<Option<usize>, LocalReply> {
    match cluster
        .endpoints
        .iter()
        .position(|endpoint| endpoint.address == requested)
    {
        Some(index) if cluster.is_healthy(index) => Ok(Some(index)),
        Some(_) if session.strict => Err(LocalReply::new(
            503,
            "UH",
            "the session's endpoint is not in service",
        )),
        None if session.strict => Err(LocalReply::with_status(
            session.not_found,
            "UH",
            "the session's endpoint is not in the cluster",
        )),
        _ => Ok(None),
    }
}

/// Names `upstream` in the response when it is not the endpoint the
/// request asked for.
pub(super) fn remember(
    session: &StatefulSession,
    requested: Option<SocketAddr>,
    upstream: Option<SocketAddr>,
    response: &mut Response<ProxyBody>,
) {
    let Some(upstream) = upstream.filter(|upstream| Some(*upstream) != requested) else {
        return;
    };
    let encoded = base64::engine::general_purpose::STANDARD.encode(upstream.to_string());
    match &session.state {
        SessionState::Header(name) => {
            if let Ok(value) = HeaderValue::from_str(&encoded) {
                response.headers_mut().insert(name.clone(), value);
            }
        }
        SessionState::Cookie(cookie) => {
            let ttl = cookie.ttl.unwrap_or_default();
            if let Some(value) = cookie_header(cookie, &encoded, ttl) {
                response.headers_mut().append(header::SET_COOKIE, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;

    fn header_session() -> StatefulSession {
        StatefulSession {
            state: SessionState::Header(http::HeaderName::from_static("x-session")),
            strict: false,
            not_found: StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    #[test]
    fn the_session_names_an_endpoint_in_base64() {
        let session = header_session();
        let mut headers = HeaderMap::new();
        // Envoy's documented example: 1.2.3.4:80.
        headers.insert("x-session", HeaderValue::from_static("MS4yLjMuNDo4MA=="));
        assert_eq!(requested(&session, &headers), "1.2.3.4:80".parse().ok());
        headers.insert("x-session", HeaderValue::from_static("not base64!"));
        assert_eq!(requested(&session, &headers), None);
    }
}
