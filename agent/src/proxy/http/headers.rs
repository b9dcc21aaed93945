//! Header handling: the route's header operations and path and host
//! rewrites, hop-by-hop headers, and the request as the endpoint gets it.
use std::net::SocketAddr;

use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Version, header, request::Parts,
};

use super::ProxyBody;
use crate::routing::{ForwardAction, HeaderOps, PathMatch, Route, RouteConfig, VirtualHost};

/// The route's changes to a request on its way upstream: hop-by-hop
/// headers dropped, the header operations (`ops`, most specific first),
/// the path and host rewrites, an `x-request-id` when it has none, and
/// `Host` from the authority (HTTP/2 carries it there).
pub(super) fn rewrite_request(
    parts: &mut Parts,
    ops: [&HeaderOps; 4],
    route: &Route,
    action: &ForwardAction,
    host_rewrite: Option<&HeaderValue>,
    upgrade: bool,
) {
    strip_hop_by_hop(&mut parts.headers, upgrade);
    for op in ops {
        apply_header_ops(&mut parts.headers, op);
    }
    if let Some(rewrite) = &action.prefix_rewrite {
        let path = rewrite_prefix(&route.matcher.path, parts.uri.path(), rewrite);
        let path_and_query = match parts.uri.query() {
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
        if let Ok(uri) = path_and_query.parse() {
            parts.uri = uri;
        }
    }
    if let Some((pattern, substitution)) = &action.regex_rewrite {
        let path = pattern
            .0
            .replace_all(parts.uri.path(), substitution.as_str());
        let path_and_query = match parts.uri.query() {
            Some(query) => format!("{path}?{query}"),
            None => path.into_owned(),
        };
        if let Ok(uri) = path_and_query.parse() {
            parts.uri = uri;
        }
    }
    if let Some(host) = host_rewrite {
        parts.headers.insert(header::HOST, host.clone());
        // A CONNECT's target is its authority, taken from Host upstream.
        if parts.method != Method::CONNECT
            && let Ok(uri) = http::Uri::builder()
                .path_and_query(parts.uri.path_and_query().map_or("/", |p| p.as_str()))
                .build()
        {
            parts.uri = uri;
        }
    }
    if !parts.headers.contains_key("x-request-id") {
        let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        if let Ok(value) = HeaderValue::from_str(&id) {
            parts.headers.insert("x-request-id", value);
        }
    }
    // Requests keep their authority when they travel as HTTP/2.
    if !parts.headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
        && let Ok(value) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, value);
    }
}

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

fn apply_header_ops(headers: &mut HeaderMap, ops: &HeaderOps) {
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
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
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
        // Hop-by-hop even when a client forgets to list it (RFC 9113 3.2.1).
        headers.remove("http2-settings");
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

/// Replaces the matched prefix of `path` with `rewrite`.
pub(super) fn rewrite_prefix(matcher: &PathMatch, path: &str, rewrite: &str) -> String {
    let prefix = match matcher {
        PathMatch::Prefix(prefix) | PathMatch::SeparatedPrefix(prefix) => prefix.as_str(),
        PathMatch::Exact(exact) => exact.as_str(),
        _ => "",
    };
    match path.get(..prefix.len()) {
        Some(head) if head.eq_ignore_ascii_case(prefix) => {
            format!("{rewrite}{}", &path[prefix.len()..])
        }
        _ => path.to_string(),
    }
}

/// `host[:port]` (an IPv6 literal keeps its brackets).
pub(super) fn split_host_port(host: &str) -> (&str, Option<u16>) {
    match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(']') || host.starts_with('[') => match port.parse() {
            Ok(port) => (name, Some(port)),
            Err(_) => (host, None),
        },
        _ => (host, None),
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn prefix_rewrite_replaces_the_matched_prefix() {
        let prefix = PathMatch::Prefix("/api/".into());
        assert_eq!(rewrite_prefix(&prefix, "/api/users", "/v2/"), "/v2/users");
        assert_eq!(rewrite_prefix(&prefix, "/other", "/v2/"), "/other");
    }

    #[test]
    fn host_and_port_split() {
        assert_eq!(split_host_port("web.test:8080"), ("web.test", Some(8080)));
        assert_eq!(split_host_port("web.test"), ("web.test", None));
        assert_eq!(split_host_port("[::1]:80"), ("[::1]", Some(80)));
    }
}
