//! Routing one request: the route that matches, then what it says (a
//! direct response, a redirect, or forwarding to a weighted cluster with
//! the route's rewrites, timeout, retries, faults and mirrors).
use std::{sync::Arc, time::Duration};

use http::{HeaderValue, Method, Request, Response, header, request::Parts};
use hyper::body::Incoming;

use super::{
    Downstream, ProxyBody,
    body::{REPLAY_LIMIT, RequestBody},
    detect::Protocol,
    empty,
    fault::fault_reply,
    full,
    headers::{apply_header_ops, apply_response_ops, is_grpc, request_host, strip_hop_by_hop},
    local_reply::{LocalReply, local_reply},
    mirror::spawn_mirror,
    retry::send_with_retries,
    roll,
    telemetry::RequestLog,
    upgrade::is_upgrade,
};
use crate::{
    proxy::ProxyContext,
    routing::{
        ForwardAction, HashPolicy, HeaderOps, PathMatch, Redirect, RequestFacts, Route,
        RouteAction, VirtualHost, WeightedCluster, balance::hash_key,
    },
};

/// Envoy's default route timeout.
const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

pub(super) async fn route(
    context: &Arc<ProxyContext>,
    downstream: &Downstream,
    request: Request<Incoming>,
    log: &mut RequestLog,
) -> Response<ProxyBody> {
    let grpc = is_grpc(request.headers());
    let host = request_host(&request).unwrap_or_default();
    let selected = {
        let facts = RequestFacts {
            method: request.method(),
            host: &host,
            path: request.uri().path(),
            query: request.uri().query(),
            headers: request.headers(),
        };
        downstream.routes.select(&facts)
    };
    let Some((virtual_host, route)) = selected else {
        return local_reply(
            context,
            log,
            LocalReply::new(404, "NR", "route not found"),
            grpc,
        );
    };
    log.route = route.name.clone();
    match &route.action {
        RouteAction::DirectResponse { status, body } => {
            let body = body.clone().unwrap_or_default();
            let mut response = Response::new(full(body));
            *response.status_mut() = *status;
            apply_response_ops(&mut response, &[], route, virtual_host, &downstream.routes);
            response
        }
        RouteAction::Redirect(redirect) => redirect_response(redirect, &request, &host, route),
        RouteAction::Forward(action) => {
            forward(
                context,
                downstream,
                request,
                virtual_host,
                route,
                action,
                log,
            )
            .await
        }
    }
}

pub(super) fn redirect_response(
    redirect: &Redirect,
    request: &Request<Incoming>,
    host: &str,
    route: &Route,
) -> Response<ProxyBody> {
    let scheme = redirect.scheme.as_deref().unwrap_or("http");
    let (request_host, request_port) = split_host_port(host);
    let host = redirect.host.as_deref().unwrap_or(request_host);
    let port = match (redirect.port, &redirect.host) {
        (Some(port), _) => Some(port),
        // A new host drops the old port, as in Envoy.
        (None, Some(_)) => None,
        (None, None) => request_port,
    };
    let path = request.uri().path();
    let mut location_path = match (&redirect.path, &redirect.prefix_rewrite) {
        (Some(path), _) => path.clone(),
        (None, Some(rewrite)) => rewrite_prefix(&route.matcher.path, path, rewrite),
        (None, None) => path.to_string(),
    };
    if !redirect.strip_query
        && !location_path.contains('?')
        && let Some(query) = request.uri().query()
    {
        location_path = format!("{location_path}?{query}");
    }
    let location = match port {
        Some(port) => format!("{scheme}://{host}:{port}{location_path}"),
        None => format!("{scheme}://{host}{location_path}"),
    };
    let mut response = Response::new(empty());
    *response.status_mut() = redirect.status;
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
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

pub(super) fn split_host_port(host: &str) -> (&str, Option<u16>) {
    match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(']') || host.starts_with('[') => match port.parse() {
            Ok(port) => (name, Some(port)),
            Err(_) => (host, None),
        },
        _ => (host, None),
    }
}

pub(super) fn pick_weighted(clusters: &[WeightedCluster]) -> Option<&WeightedCluster> {
    let total: u64 = clusters.iter().map(|c| u64::from(c.weight)).sum();
    if total == 0 {
        return clusters.first();
    }
    let mut draw = fastrand::u64(..total);
    for cluster in clusters {
        let weight = u64::from(cluster.weight);
        if draw < weight {
            return Some(cluster);
        }
        draw -= weight;
    }
    clusters.last()
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn forward(
    context: &Arc<ProxyContext>,
    downstream: &Downstream,
    mut request: Request<Incoming>,
    virtual_host: &VirtualHost,
    route: &Route,
    action: &ForwardAction,
    log: &mut RequestLog,
) -> Response<ProxyBody> {
    let grpc = is_grpc(request.headers());
    if let Some(fault) = &route.fault {
        if let Some((delay, fraction)) = fault.delay
            && roll(fraction)
        {
            log.flags.push("DI");
            tokio::time::sleep(delay).await;
        }
        if let Some((abort, fraction)) = fault.abort
            && roll(fraction)
        {
            return fault_reply(context, log, abort, grpc);
        }
    }
    let Some(weighted) = pick_weighted(&action.clusters) else {
        return local_reply(context, log, LocalReply::new(503, "NC", "no cluster"), grpc);
    };
    log.cluster = weighted.name.clone();
    let table = context.routes.snapshot();
    let Some(cluster) = context
        .http
        .clusters
        .get(&context.mesh, &table, &weighted.name)
    else {
        return local_reply(
            context,
            log,
            LocalReply::new(503, "NC", "cluster not found"),
            grpc,
        );
    };
    // HTTP/1.1 upgrades (WebSocket) and CONNECT in either version (an
    // HTTP/2 CONNECT stream becomes the tunnel, RFC 9113 8.5); upstream
    // both travel as HTTP/1.1 on a dedicated connection.
    let upgrade = match downstream.protocol {
        Protocol::Http1 => is_upgrade(&request),
        _ => request.method() == Method::CONNECT,
    };
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let source_ip = downstream.peer.ip();
    let (mut parts, incoming) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    let ops: [&HeaderOps; 4] = [
        &weighted.request_headers,
        &route.request_headers,
        &virtual_host.request_headers,
        &downstream.routes.request_headers,
    ];
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
    if let Some(host) = &action.host_rewrite {
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
    let hash = cluster
        .is_ring_hash()
        .then(|| request_hash(&action.hash_policies, &parts, source_ip))
        .flatten();
    let body = RequestBody::new(incoming, REPLAY_LIMIT);
    log.body = Some(body.clone());
    let policy = action
        .retry_policy
        .as_ref()
        .or(virtual_host.retry_policy.as_ref());
    let timeout = action.timeout.unwrap_or(DEFAULT_ROUTE_TIMEOUT);
    let attempts = send_with_retries(
        context,
        downstream,
        &cluster,
        &parts,
        &body,
        policy,
        hash,
        downstream_upgrade,
        log,
    );
    let result = if timeout.is_zero() {
        attempts.await
    } else {
        match tokio::time::timeout(timeout, attempts).await {
            Ok(result) => result,
            Err(_) => Err(LocalReply::new(504, "UT", "upstream request timeout")),
        }
    };
    let mut response = match result {
        Ok(response) => response,
        Err(reply) => return local_reply(context, log, reply, grpc),
    };
    apply_response_ops(
        &mut response,
        &[&weighted.response_headers],
        route,
        virtual_host,
        &downstream.routes,
    );
    for mirror in &action.mirrors {
        if roll(mirror.fraction) {
            spawn_mirror(context, downstream, &parts, &body, &mirror.cluster);
        }
    }
    response
}

pub(super) fn request_hash(
    policies: &[HashPolicy],
    parts: &Parts,
    source_ip: std::net::IpAddr,
) -> Option<u64> {
    policies.iter().find_map(|policy| match policy {
        HashPolicy::Header(name) => parts
            .headers
            .get(name)
            .map(|value| hash_key(value.as_bytes())),
        HashPolicy::Cookie(name) => parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(key, _)| key == name)
            .map(|(_, value)| hash_key(value.as_bytes())),
        HashPolicy::SourceIp => Some(match source_ip.to_canonical() {
            std::net::IpAddr::V4(ip) => hash_key(&ip.octets()),
            std::net::IpAddr::V6(ip) => hash_key(&ip.octets()),
        }),
        HashPolicy::QueryParameter(name) => parts
            .uri
            .query()
            .and_then(|query| {
                query
                    .split('&')
                    .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
                    .find(|(key, _)| key == name)
            })
            .map(|(_, value)| hash_key(value.as_bytes())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn weights_pick_in_proportion() {
        let cluster = |name: &str, weight| WeightedCluster {
            name: name.into(),
            weight,
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
        };
        let clusters = [cluster("a", 80), cluster("b", 20), cluster("c", 0)];
        let mut a = 0;
        for _ in 0..10_000 {
            match pick_weighted(&clusters).map(|c| c.name.as_str()) {
                Some("a") => a += 1,
                Some("b") => {}
                other => panic!("picked {other:?}"),
            }
        }
        assert!((7_500..8_500).contains(&a), "a picked {a} times");
    }
}
