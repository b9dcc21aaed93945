//! Routing one request: the route that matches, then what it says (a
//! direct response, a redirect, or forwarding to a weighted cluster with
//! the route's rewrites, timeout, retries, faults and mirrors).
use std::sync::Arc;

use http_body_util::BodyExt as _;

use http::{HeaderValue, Method, Request, Response, header, request::Parts};
use hyper::body::Incoming;

use super::{
    Downstream, ProxyBody,
    body::{REPLAY_LIMIT, RequestBody},
    clusters::ClusterRuntime,
    cors,
    deadline::{DeadlineBody, Limits},
    detect::Protocol,
    empty, fault, full,
    headers::{
        apply_response_ops, is_grpc, request_host, rewrite_prefix, rewrite_request, split_host_port,
    },
    local_reply::{LocalReply, local_reply},
    mirror::spawn_mirror,
    retry::{ATTEMPT_COUNT, Outgoing, send_with_retries},
    roll,
    server::stalled,
    session,
    telemetry::RequestLog,
    upgrade::is_upgrade,
};
use crate::{
    proxy::{ProxyContext, limits::Phase},
    routing::{
        ClusterEndpoints, CookieSpec, ForwardAction, HashPolicy, OriginalDst, Redirect,
        RequestFacts, Route, RouteAction, VirtualHost, WeightedCluster, balance::hash_key,
    },
};

/// Routes one request: a direct response, a redirect, or forwarding.
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
            &context.http.local_replies,
            log,
            LocalReply::new(404, "NR", "route not found"),
            grpc,
        );
    };
    log.route = route.name.clone();
    if virtual_host.require_tls
        && request
            .headers()
            .get("x-forwarded-proto")
            .is_none_or(|proto| !proto.as_bytes().eq_ignore_ascii_case(b"https"))
    {
        return https_redirect(&request, &host);
    }
    // The virtual host's policy is merged into the route's.
    let cors = route.cors.as_deref();
    let (cors, origin) = match cors::check(cors, request.method(), request.headers()) {
        cors::Verdict::None => (None, None),
        cors::Verdict::Preflight(response) => return response,
        cors::Verdict::Forward { cors, origin } => (Some(cors), origin),
    };
    let mut response = match &route.action {
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
    };
    if let (Some(cors), Some(origin)) = (cors, origin) {
        cors::decorate(cors, origin, &mut response);
    }
    response
}

fn redirect_response(
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

/// Where an ORIGINAL_DST cluster sends a request: the `ip:port` its header
/// names when it has one (none if it is not an address), else the address
/// the client dialled; the port overridden if the cluster says so.
fn original_destination(
    original: &OriginalDst,
    headers: &http::HeaderMap,
    dialled: std::net::SocketAddr,
) -> Option<std::net::SocketAddr> {
    let mut destination = match original.header.as_ref().and_then(|name| headers.get(name)) {
        Some(value) => value.to_str().ok()?.trim().parse().ok()?,
        None => dialled,
    };
    if let Some(port) = original.port {
        destination.set_port(port);
    }
    Some(destination)
}

/// Envoy's answer on a virtual host with `require_tls: ALL` to a request
/// that did not come over TLS (by `x-forwarded-proto`): 301 to the same URL
/// over https.
fn https_redirect(request: &Request<Incoming>, host: &str) -> Response<ProxyBody> {
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |path| path.as_str());
    let mut response = Response::new(empty());
    *response.status_mut() = http::StatusCode::MOVED_PERMANENTLY;
    if let Ok(location) = HeaderValue::from_str(&format!("https://{host}{path}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

fn pick_weighted(clusters: &[WeightedCluster]) -> Option<&WeightedCluster> {
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

/// The cluster `name` of the current route table, resolved against the
/// mesh.
pub(super) fn cluster_named(context: &ProxyContext, name: &str) -> Option<Arc<ClusterRuntime>> {
    let table = context.routes.snapshot();
    context.http.clusters.get(&context.store, &table, name)
}

/// Sends the request to one of the route's clusters, as the route says.
async fn forward(
    context: &Arc<ProxyContext>,
    downstream: &Downstream,
    mut request: Request<Incoming>,
    virtual_host: &VirtualHost,
    route: &Route,
    action: &ForwardAction,
    log: &mut RequestLog,
) -> Response<ProxyBody> {
    let grpc = is_grpc(request.headers());
    let local_replies = &context.http.local_replies;
    if let Some(fault) = &route.fault
        && let Some(reply) = fault::inject(fault, local_replies, log, grpc).await
    {
        return reply;
    }
    let Some(weighted) = pick_weighted(&action.clusters) else {
        return local_reply(
            local_replies,
            log,
            LocalReply::new(503, "NC", "no cluster"),
            grpc,
        );
    };
    log.cluster = weighted.name.clone();
    let Some(cluster) = cluster_named(context, &weighted.name) else {
        return local_reply(
            local_replies,
            log,
            LocalReply::with_status(action.cluster_not_found, "NC", "cluster not found"),
            grpc,
        );
    };
    let cluster = match &cluster.config.endpoints {
        ClusterEndpoints::OriginalDst(original) => {
            match original_destination(original, request.headers(), downstream.original) {
                Some(destination) => Arc::new(cluster.for_destination(&context.store, destination)),
                None => {
                    return local_reply(
                        local_replies,
                        log,
                        LocalReply::new(503, "UH", "no healthy upstream"),
                        grpc,
                    );
                }
            }
        }
        _ => cluster,
    };
    // HTTP/1.1 upgrades (WebSocket) and CONNECT in either version (an
    // HTTP/2 CONNECT stream becomes the tunnel, RFC 9113 8.5); upstream
    // both travel as HTTP/1.1 on a dedicated connection.
    let upgrade = match downstream.protocol {
        Protocol::Http1 => is_upgrade(&request),
        _ => request.method() == Method::CONNECT,
    };
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let (mut parts, incoming) = request.into_parts();
    let ops = [
        &weighted.request_headers,
        &route.request_headers,
        &virtual_host.request_headers,
        &downstream.routes.request_headers,
    ];
    let host_rewrite = weighted
        .host_rewrite
        .as_ref()
        .or(action.host_rewrite.as_ref());
    rewrite_request(&mut parts, ops, route, action, host_rewrite, upgrade);
    let (hash, set_cookie) = if cluster.is_hash_based() {
        request_hash(&action.hash_policies, &parts, downstream.peer)
    } else {
        (None, None)
    };
    let session = route.session.as_ref();
    let requested = session.and_then(|session| session::requested(session, &parts.headers));
    let preferred = match (session, requested) {
        (Some(session), Some(requested)) => {
            match session::preferred(session, requested, &cluster) {
                Ok(preferred) => preferred,
                Err(reply) => return local_reply(local_replies, log, reply, grpc),
            }
        }
        _ => None,
    };
    let body = RequestBody::new(incoming, REPLAY_LIMIT);
    log.body = Some(body.clone());
    let policy = action
        .retry_policy
        .as_ref()
        .or(virtual_host.retry_policy.as_ref());
    let limits = Limits::of(action, grpc, &parts.headers);
    let stream_deadline = limits
        .stream
        .map(|limit| tokio::time::Instant::now() + limit);
    let client_http2 = downstream.protocol == Protocol::Http2;
    let outgoing = Outgoing {
        pod: &downstream.pod,
        parts: &parts,
        body: &body,
        // An upgrade (WebSocket, CONNECT) always travels as HTTP/1.1.
        http2: cluster.config.protocol.http2(client_http2) && downstream_upgrade.is_none(),
        policy,
        hash,
        upgrade: downstream_upgrade,
        attempt_count: virtual_host.attempt_count_to_upstream,
        preferred,
        downstream: (downstream.peer, downstream.original),
    };
    let attempts = send_with_retries(context, &cluster, outgoing, log);
    let attempts = async {
        match stream_deadline {
            None => attempts.await,
            Some(deadline) => tokio::time::timeout_at(deadline, attempts)
                .await
                .unwrap_or_else(|_| Err(LocalReply::stream_duration())),
        }
    };
    let timeout = limits.timeout;
    let result = if timeout.is_zero() {
        // No route timeout: the stream idle timeout still bounds the wait,
        // as long as the client's body does not move either.
        let stream_idle = context.limits.settings().stream_idle_timeout;
        tokio::select! {
            result = attempts => result,
            () = stalled(stream_idle, || body.received()) => {
                context.limits.timeout_counter(Phase::StreamIdle).inc();
                Err(LocalReply::new(504, "SI", "stream timeout"))
            }
        }
    } else {
        match tokio::time::timeout(timeout, attempts).await {
            Ok(result) => result,
            Err(_) => Err(LocalReply::new(504, "UT", "upstream request timeout")),
        }
    };
    let mut response = match result {
        Ok(response) => response,
        Err(reply) => return local_reply(local_replies, log, reply, grpc),
    };
    if let Some(cookie) = set_cookie {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    if let Some(session) = session {
        session::remember(session, requested, log.upstream, &mut response);
    }
    if virtual_host.attempt_count_to_client {
        response
            .headers_mut()
            .insert(ATTEMPT_COUNT, HeaderValue::from(log.attempts));
    }
    if let Some(deadline) = stream_deadline {
        response = response.map(|body| DeadlineBody::new(body, deadline).boxed());
    }
    apply_response_ops(
        &mut response,
        &[&weighted.response_headers],
        route,
        virtual_host,
        &downstream.routes,
    );
    for mirror in &action.mirrors {
        if roll(mirror.fraction) {
            spawn_mirror(
                context,
                &downstream.pod,
                (downstream.peer, downstream.original),
                client_http2,
                &parts,
                &body,
                &mirror.cluster,
            );
        }
    }
    response
}

/// The request's hash for ring hash: the first of the route's policies
/// that finds its value; and the `Set-Cookie` for a cookie the proxy made
/// up (a cookie policy with a ttl, the cookie absent).
fn request_hash(
    policies: &[HashPolicy],
    parts: &Parts,
    peer: std::net::SocketAddr,
) -> (Option<u64>, Option<HeaderValue>) {
    for policy in policies {
        let hash = match policy {
            HashPolicy::Header(name) => parts
                .headers
                .get(name)
                .map(|value| hash_key(value.as_bytes())),
            HashPolicy::Cookie(cookie) => match cookie_value(&parts.headers, &cookie.name) {
                Some(value) => Some(hash_key(value.as_bytes())),
                None => {
                    if let Some(ttl) = cookie.ttl {
                        // Envoy's made-up value: the client's address,
                        // hashed, so one client keeps one value.
                        let value = format!("{:016x}", hash_key(peer.to_string().as_bytes()));
                        return (
                            Some(hash_key(value.as_bytes())),
                            cookie_header(cookie, &value, ttl),
                        );
                    }
                    None
                }
            },
            HashPolicy::SourceIp => Some(match peer.ip().to_canonical() {
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
        };
        if hash.is_some() {
            return (hash, None);
        }
    }
    (None, None)
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub(super) fn cookie_value<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim_matches('"'))
}

/// Envoy's `Set-Cookie` for a cookie the proxy sets: quoted value,
/// `Max-Age` unless 0, `Path` if set, the extra attributes, `HttpOnly`.
pub(super) fn cookie_header(
    cookie: &CookieSpec,
    value: &str,
    ttl: std::time::Duration,
) -> Option<HeaderValue> {
    let mut text = format!("{}=\"{value}\"", cookie.name);
    if !ttl.is_zero() {
        text.push_str(&format!("; Max-Age={}", ttl.as_secs()));
    }
    if !cookie.path.is_empty() {
        text.push_str(&format!("; Path={}", cookie.path));
    }
    for (name, value) in &cookie.attributes {
        if value.is_empty() {
            text.push_str(&format!("; {name}"));
        } else {
            text.push_str(&format!("; {name}={value}"));
        }
    }
    text.push_str("; HttpOnly");
    HeaderValue::from_str(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::HeaderOps;

    #[test]
    fn weights_pick_in_proportion() {
        let cluster = |name: &str, weight| WeightedCluster {
            name: name.into(),
            weight,
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
            host_rewrite: None,
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
