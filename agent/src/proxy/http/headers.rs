//! Header handling: the route's header operations, hop-by-hop headers,
//! and the request as the endpoint gets it.
use std::net::SocketAddr;

use http::{HeaderMap, HeaderName, Method, Request, Response, Version, header, request::Parts};

use super::ProxyBody;
use crate::routing::{HeaderOps, Route, RouteConfig, VirtualHost};

/// The request as the endpoint gets it, for one attempt.
pub(super) fn upstream_request(
    parts: &Parts,
    mut headers: HeaderMap,
    body: ProxyBody,
    http2: bool,
    endpoint: SocketAddr,
) -> Request<ProxyBody> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let (uri, version) = if parts.method == Method::CONNECT {
        // Authority form (`host:port`), after any host rewrite.
        let authority = headers
            .get(header::HOST)
            .and_then(|host| host.to_str().ok().map(str::to_string))
            .or_else(|| parts.uri.authority().map(|a| a.to_string()))
            .unwrap_or_else(|| endpoint.to_string());
        (authority, Version::HTTP_11)
    } else if http2 {
        // HTTP/2 carries the host as :authority.
        let authority = headers
            .remove(header::HOST)
            .and_then(|host| host.to_str().ok().map(str::to_string))
            .unwrap_or_else(|| endpoint.to_string());
        (format!("http://{authority}{path}"), Version::HTTP_2)
    } else {
        headers.remove(header::TE);
        (path.to_string(), Version::HTTP_11)
    };
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    if let Ok(uri) = uri.parse() {
        *request.uri_mut() = uri;
    }
    request
}

pub(super) fn apply_header_ops(headers: &mut HeaderMap, ops: &HeaderOps) {
    for name in &ops.remove {
        headers.remove(name);
    }
    for (name, value, append) in &ops.add {
        if *append {
            headers.append(name.clone(), value.clone());
        } else {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// Response header ops, most specific first so that the route
/// configuration's own have the last word (Envoy's default order).
pub(super) fn apply_response_ops(
    response: &mut Response<ProxyBody>,
    extra: &[&HeaderOps],
    route: &Route,
    virtual_host: &VirtualHost,
    config: &RouteConfig,
) {
    for op in extra {
        apply_header_ops(response.headers_mut(), op);
    }
    apply_header_ops(response.headers_mut(), &route.response_headers);
    apply_header_ops(response.headers_mut(), &virtual_host.response_headers);
    apply_header_ops(response.headers_mut(), &config.response_headers);
}

/// Connection-specific headers never cross the proxy (RFC 9110 §7.6.1);
/// an upgrade keeps `Connection`/`Upgrade` so the endpoint sees it.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !(upgrade && name == header::UPGRADE))
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection", "transfer-encoding"] {
        headers.remove(name);
    }
    headers.remove(header::PROXY_AUTHORIZATION);
    if !upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    // `te: trailers` is the one TE value HTTP/2 allows (gRPC sends it).
    if headers
        .get(header::TE)
        .is_some_and(|te| te.as_bytes() != b"trailers")
    {
        headers.remove(header::TE);
    }
}

pub(super) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

/// `:authority` for HTTP/2 and absolute-form requests, else `Host`.
pub(super) fn request_host<B>(request: &Request<B>) -> Option<String> {
    request
        .uri()
        .authority()
        .map(|authority| authority.as_str().to_string())
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|host| host.to_str().ok())
                .map(str::to_string)
        })
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers, false);
        assert!(headers.get("x-secret").is_none());
        assert!(headers.get(header::CONNECTION).is_none());
        assert!(headers.get("keep-alive").is_none());
        assert_eq!(
            headers.get(header::TE).map(|v| v.as_bytes()),
            Some(&b"trailers"[..])
        );
        assert!(headers.get("x-kept").is_some());
    }
}
