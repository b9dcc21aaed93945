//! Envoy resources (from xDS) into the routing model.
//!
//! [`route_configuration`] and [`cluster`] decode xDS bytes;
//! [`convert_route_configuration`] and [`convert_cluster`] take the prost
//! structs, which the local file (`file.rs`) builds too: one validation
//! path. A resource converts whole or is rejected with the path of the
//! first problem, e.g. `route 'r1' in virtual host 'vh': unsupported field
//! route.host_rewrite_header`.
//!
//! Every message read here is taken apart by an exhaustive destructuring
//! (no `..`), so a newer `envoy-types` with new fields does not compile
//! until each one is classified: supported, ignored (with the reason next
//! to it) or rejected. A field that would change what Envoy does, and that
//! Weir does not do, is rejected rather than ignored.
//!
//! Weir's choices where it differs from Envoy or Envoy leaves room:
//! - header matchers may name `:method`, `:path` and `:authority` (the
//!   matcher reads them from the request); other pseudo-headers (`:scheme`)
//!   are rejected; a hash policy on `:authority` hashes `host`;
//! - regexes use Envoy's RE2 syntax through the `regex` crate, compiled as
//!   written (matching requires a whole-value match);
//! - header values with Envoy's `%...%` formatters are rejected (`%%` is a
//!   literal `%`); a header to add with an empty value is dropped unless
//!   `keep_empty_value`, as Envoy adds nothing then either;
//! - `retry_on`: `refused-stream` and `reset-before-request` count as
//!   `connect-failure`: in both the upstream did not process the request,
//!   so it is retried like a failed connect; `retry_host_predicate` may name
//!   only `envoy.retry_host_predicates.previous_hosts` (Istio sets it on
//!   every route): retries go to another endpoint when there is one;
//! - `idle_timeout` is accepted only as zero (disabled): Weir has no
//!   per-route stream idle timeout; a zero `per_try_timeout` is none;
//! - `max_grpc_timeout` (istiod sets `0s` on sidecar routes) makes a gRPC
//!   request's `grpc-timeout` the route timeout, capped by it unless 0, less
//!   `grpc_timeout_offset`; `max_stream_duration` bounds the whole
//!   exchange, response body included (408 `DT` before the response, a
//!   reset after), and its `grpc_timeout_header_max` does the same with
//!   the request's `grpc-timeout`; 0 is no limit;
//! - `include_request_attempt_count` and `include_attempt_count_in_response`
//!   send `x-envoy-attempt-count` upstream and to the client;
//! - `regex_rewrite` rewrites the path (not the query); `\1` in the
//!   substitution is a capture group, as in RE2;
//! - hash policies: the first that yields a value decides (Envoy's
//!   `terminal`; Envoy combines non-terminal ones);
//! - fault: an absent percentage is 0 %, as in Envoy; the `*_runtime` keys
//!   are ignored (Weir has no runtime, the configured values apply);
//! - mirrors: an absent `runtime_fraction` mirrors every request; the
//!   mirror's host gets Envoy's `-shadow` suffix, so
//!   `disable_shadow_host_suffix_append` is rejected;
//! - clusters: see [`convert_cluster`].
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3 as cluster_pb, core::v3 as core_pb, endpoint::v3 as endpoint_pb,
            route::v3 as route_pb,
        },
        extensions::{
            filters::{common::fault::v3 as fault_common_pb, http::fault::v3 as fault_pb},
            upstreams::http::v3 as upstream_pb,
        },
        r#type::{matcher::v3 as matcher_pb, v3 as type_pb},
    },
    google::protobuf,
};
use http::{HeaderName, HeaderValue, StatusCode};
use prost::Message as _;

/// The generated Envoy messages, for callers that build resources (tests,
/// the file's mirrors).
pub use envoy_types::pb;

use super::{
    Assignment, ClusterConfig, ClusterEndpoints, CookieSpec, Cors, DnsCluster, DnsFamily,
    DnsTarget, Fault, FaultAbort, ForwardAction, GrpcTimeout, HashPolicy, HeaderMatch, HeaderOps,
    LbAddress, LbPolicy, Mirror, OriginalDst, OutlierDetection, PathMatch, PoolSettings,
    QueryParameterMatch, Redirect, Regex, RetryBudget, RetryOn, RetryPolicy, Route, RouteAction,
    RouteConfig, RouteMatch, SessionState, SlowStart, StatefulSession, StreamDuration, StringMatch,
    StringMatcher, TcpKeepalive, Thresholds, UpstreamProtocol, VirtualHost, WeightedCluster,
    upstream_tls,
};

/// The stateful session filter's `typed_per_filter_config` key and type.
pub const STATEFUL_SESSION_FILTER: &str = "envoy.filters.http.stateful_session";
pub const STATEFUL_SESSION_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.stateful_session.v3.StatefulSessionPerRoute";

/// The CORS filter's `typed_per_filter_config` key and type.
pub const CORS_FILTER: &str = "envoy.filters.http.cors";
pub const CORS_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy";

/// A `typed_per_filter_config` key read on routes.
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";
pub const FAULT_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";
/// The only `typed_extension_protocol_options` key read (on clusters).
pub const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
pub const HTTP_PROTOCOL_OPTIONS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
/// The one retry host predicate accepted.
pub const PREVIOUS_HOSTS: &str = "envoy.retry_host_predicates.previous_hosts";
/// Envoy's default `max_direct_response_body_size_bytes`.
const MAX_DIRECT_RESPONSE_BODY: u32 = 4096;

/// Decodes and converts a `RouteConfiguration`.
pub fn route_configuration(bytes: &[u8]) -> Result<RouteConfig, String> {
    let decoded = route_pb::RouteConfiguration::decode(bytes)
        .map_err(|e| format!("undecodable RouteConfiguration: {e}"))?;
    convert_route_configuration(&decoded)
}

/// Decodes and converts a `Cluster`.
pub fn cluster(bytes: &[u8]) -> Result<ClusterConfig, String> {
    let decoded =
        cluster_pb::Cluster::decode(bytes).map_err(|e| format!("undecodable Cluster: {e}"))?;
    convert_cluster(&decoded)
}

/// Decodes and converts a `ClusterLoadAssignment` (EDS).
pub fn cluster_load_assignment(bytes: &[u8]) -> Result<Assignment, String> {
    let decoded = endpoint_pb::ClusterLoadAssignment::decode(bytes)
        .map_err(|e| format!("undecodable ClusterLoadAssignment: {e}"))?;
    convert_cluster_load_assignment(&decoded)
}

/// Envoy's `ClusterLoadAssignment`, as EDS delivers it.
pub fn convert_cluster_load_assignment(
    assignment: &endpoint_pb::ClusterLoadAssignment,
) -> Result<Assignment, String> {
    if assignment.cluster_name.is_empty() {
        return Err("a ClusterLoadAssignment without a cluster_name".into());
    }
    Ok(Assignment {
        cluster_name: assignment.cluster_name.clone(),
        endpoints: static_endpoints(assignment, "")?,
    })
}

/// `Err` naming the first of `fields` that is set; `at` prefixes the name.
pub(super) fn reject(at: &str, fields: &[(&str, bool)]) -> Result<(), String> {
    match fields.iter().find(|(_, set)| *set) {
        Some((field, _)) => Err(format!("unsupported field {at}{field}")),
        None => Ok(()),
    }
}

/// Per-filter configuration is read only on routes, for the fault filter.
fn no_filter_configs(at: &str, configs: &HashMap<String, protobuf::Any>) -> Result<(), String> {
    match configs.keys().min() {
        Some(key) => Err(format!(
            "unsupported field {at}typed_per_filter_config[\"{key}\"]"
        )),
        None => Ok(()),
    }
}

fn duration(value: &protobuf::Duration, at: &str) -> Result<Duration, String> {
    if value.seconds < 0 || !(0..1_000_000_000).contains(&value.nanos) {
        return Err(format!("{at}: invalid duration {value:?}"));
    }
    Ok(Duration::new(value.seconds as u64, value.nanos as u32))
}

/// A `FractionalPercent` as a fraction, capped at 1 as Envoy does.
fn fraction(value: &type_pb::FractionalPercent, at: &str) -> Result<f64, String> {
    use type_pb::fractional_percent::DenominatorType;
    let denominator = match DenominatorType::try_from(value.denominator) {
        Ok(DenominatorType::Hundred) => 100.0,
        Ok(DenominatorType::TenThousand) => 10_000.0,
        Ok(DenominatorType::Million) => 1_000_000.0,
        Err(_) => return Err(format!("{at}.denominator: unknown {}", value.denominator)),
    };
    Ok((f64::from(value.numerator) / denominator).min(1.0))
}

/// The regex error on one line (the crate's spans several).
fn regex(value: &matcher_pb::RegexMatcher, at: &str) -> Result<Regex, String> {
    // `engine_type` (deprecated) only ever names RE2, whose syntax the
    // `regex` crate shares for what routes use.
    let matcher_pb::RegexMatcher {
        regex,
        engine_type: _,
    } = value;
    regex::Regex::new(regex).map(Regex).map_err(|e| {
        let reason = e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        format!("{at}: regex {regex:?} does not compile: {reason}")
    })
}

fn header_name(name: &str, at: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{at}: invalid header name {name:?}"))
}

/// A header name in a matcher: lowercase, or one of the pseudo-headers
/// the matcher answers from the request.
fn matched_header_name(name: &str, at: &str) -> Result<String, String> {
    // The matcher reads :method, :path and :authority from the request
    // itself (HeaderMatch names are plain lowercase strings for that).
    match name {
        ":authority" | ":method" | ":path" => Ok(name.to_string()),
        pseudo if pseudo.starts_with(':') => Err(format!(
            "{at}: matching on pseudo-header {pseudo} is not supported"
        )),
        _ => header_name(name, at).map(|name| name.as_str().to_string()),
    }
}

/// A header to hash on; `:authority` is the `host` header.
fn header_name_for_hash(name: &str, at: &str) -> Result<HeaderName, String> {
    match name {
        ":authority" => Ok(http::header::HOST),
        pseudo if pseudo.starts_with(':') => Err(format!(
            "{at}: hashing on pseudo-header {pseudo} is not supported"
        )),
        _ => header_name(name, at),
    }
}

/// A header name Envoy lets configuration add or remove: not a
/// pseudo-header, not `host` (`host_rewrite_literal` does that).
fn mutable_header_name(name: &str, at: &str) -> Result<HeaderName, String> {
    let name = header_name(name, at)?;
    if name == http::header::HOST {
        return Err(format!("{at}: the host header cannot be added or removed"));
    }
    Ok(name)
}

/// A header value without Envoy's `%...%` formatters; `%%` is `%`.
fn literal_header_value(value: &[u8], at: &str) -> Result<HeaderValue, String> {
    let mut literal = Vec::with_capacity(value.len());
    let mut bytes = value.iter();
    while let Some(&byte) = bytes.next() {
        if byte == b'%' && bytes.next() != Some(&b'%') {
            return Err(format!(
                "{at}: header value formatters (%...%) are not supported; write %% for %"
            ));
        }
        literal.push(byte);
    }
    HeaderValue::from_bytes(&literal).map_err(|_| format!("{at}: invalid header value"))
}

/// `*_headers_to_add` and `*_headers_to_remove`; `at` names the pair,
/// e.g. `request_headers_to_`.
fn header_ops(
    add: &[core_pb::HeaderValueOption],
    remove: &[String],
    at: &str,
) -> Result<HeaderOps, String> {
    let mut ops = HeaderOps::default();
    for (index, option) in add.iter().enumerate() {
        if let Some(op) = header_to_add(option, &format!("{at}add[{index}]"))? {
            ops.add.push(op);
        }
    }
    for (index, name) in remove.iter().enumerate() {
        ops.remove
            .push(mutable_header_name(name, &format!("{at}remove[{index}]"))?);
    }
    Ok(ops)
}

#[allow(deprecated)]
fn header_to_add(
    option: &core_pb::HeaderValueOption,
    at: &str,
) -> Result<Option<(HeaderName, HeaderValue, bool)>, String> {
    use core_pb::header_value_option::HeaderAppendAction as Action;
    let core_pb::HeaderValueOption {
        header,
        append,
        append_action,
        keep_empty_value,
    } = option;
    let Some(core_pb::HeaderValue {
        key,
        value,
        raw_value,
    }) = header
    else {
        return Err(format!("{at}: no header"));
    };
    let name = mutable_header_name(key, &format!("{at}.header.key"))?;
    let bytes = match (value.is_empty(), raw_value.is_empty()) {
        (false, false) => return Err(format!("{at}.header: both value and raw_value")),
        (true, false) => raw_value.as_slice(),
        _ => value.as_bytes(),
    };
    let header_value = literal_header_value(bytes, &format!("{at}.header.value"))?;
    let append = match (append, Action::try_from(*append_action)) {
        (Some(_), Ok(action)) if action != Action::AppendIfExistsOrAdd => {
            return Err(format!("{at}: both append and append_action"));
        }
        (Some(append), _) => append.value,
        (None, Ok(Action::AppendIfExistsOrAdd)) => true,
        (None, Ok(Action::OverwriteIfExistsOrAdd)) => false,
        (None, Ok(action)) => {
            return Err(format!(
                "{at}.append_action: {} is not supported",
                action.as_str_name()
            ));
        }
        (None, Err(_)) => return Err(format!("{at}.append_action: unknown {append_action}")),
    };
    if header_value.is_empty() && !keep_empty_value {
        return Ok(None);
    }
    Ok(Some((name, header_value, append)))
}

#[allow(deprecated)]
pub fn convert_route_configuration(
    config: &route_pb::RouteConfiguration,
) -> Result<RouteConfig, String> {
    let route_pb::RouteConfiguration {
        name,
        virtual_hosts,
        vhds,
        internal_only_headers,
        response_headers_to_add,
        response_headers_to_remove,
        request_headers_to_add,
        request_headers_to_remove,
        most_specific_header_mutations_wins,
        // A load-time check of cluster names; Weir resolves them per request.
        validate_clusters: _,
        max_direct_response_body_size_bytes,
        cluster_specifier_plugins,
        request_mirror_policies,
        // Matching compares a port-less domain with the host without its
        // port and a domain with a port with the host as sent (matching.rs).
        ignore_port_in_host_matching: _,
        vhost_header,
        ignore_path_parameters_in_path_matching,
        typed_per_filter_config,
        metadata: _,
        route_specifiers,
    } = config;
    if name.is_empty() {
        return Err("a route configuration without a name".into());
    }
    reject(
        "",
        &[
            ("vhds", vhds.is_some()),
            ("internal_only_headers", !internal_only_headers.is_empty()),
            (
                "most_specific_header_mutations_wins",
                *most_specific_header_mutations_wins,
            ),
            (
                "cluster_specifier_plugins",
                !cluster_specifier_plugins.is_empty(),
            ),
            (
                "request_mirror_policies",
                !request_mirror_policies.is_empty(),
            ),
            ("vhost_header", !vhost_header.is_empty()),
            (
                "ignore_path_parameters_in_path_matching",
                *ignore_path_parameters_in_path_matching,
            ),
            ("route_specifiers", !route_specifiers.is_empty()),
        ],
    )?;
    no_filter_configs("", typed_per_filter_config)?;
    // Envoy refuses a domain that two virtual hosts claim.
    let mut domains = HashSet::new();
    let mut converted = Vec::with_capacity(virtual_hosts.len());
    for vhost in virtual_hosts {
        let vhost = virtual_host(vhost)?;
        if let Some(domain) = vhost
            .domains
            .iter()
            .find(|domain| !domains.insert(domain.to_ascii_lowercase()))
        {
            return Err(format!(
                "virtual host '{}': domain {domain:?} is in another virtual host too",
                vhost.name
            ));
        }
        converted.push(vhost);
    }
    let limit = max_direct_response_body_size_bytes
        .as_ref()
        .map_or(MAX_DIRECT_RESPONSE_BODY, |limit| limit.value);
    check_direct_response_bodies(&converted, limit)?;
    Ok(RouteConfig {
        name: name.clone(),
        virtual_hosts: converted,
        request_headers: header_ops(
            request_headers_to_add,
            request_headers_to_remove,
            "request_headers_to_",
        )?,
        response_headers: header_ops(
            response_headers_to_add,
            response_headers_to_remove,
            "response_headers_to_",
        )?,
    })
}

fn check_direct_response_bodies(vhosts: &[VirtualHost], limit: u32) -> Result<(), String> {
    for vhost in vhosts {
        for route in &vhost.routes {
            if let RouteAction::DirectResponse {
                body: Some(body), ..
            } = &route.action
                && body.len() > limit as usize
            {
                return Err(format!(
                    "route '{}' in virtual host '{}': a direct_response body of {} bytes is over max_direct_response_body_size_bytes ({limit})",
                    route.name,
                    vhost.name,
                    body.len()
                ));
            }
        }
    }
    Ok(())
}

/// Envoy's domain forms: a wildcard alone, first or last, once.
fn check_domain(domain: &str) -> Result<(), String> {
    let stars = domain.matches('*').count();
    let valid = !domain.is_empty()
        && (stars == 0
            || domain == "*"
            || (stars == 1 && (domain.starts_with('*') || domain.ends_with('*'))));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid domain {domain:?}: one wildcard, at the start or the end"
        ))
    }
}

#[allow(deprecated)]
fn virtual_host(vhost: &route_pb::VirtualHost) -> Result<VirtualHost, String> {
    let route_pb::VirtualHost {
        name,
        domains,
        routes,
        matcher,
        require_tls,
        virtual_clusters,
        rate_limits,
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
        cors,
        typed_per_filter_config,
        include_request_attempt_count,
        include_attempt_count_in_response,
        retry_policy,
        retry_policy_typed_config,
        hedge_policy,
        include_is_timeout_retry_header,
        // Buffering limits: the proxy keeps its own.
        per_request_buffer_limit_bytes: _,
        request_body_buffer_limit: _,
        request_mirror_policies,
        metadata: _,
        route_specifiers,
    } = vhost;
    let within = |e: String| format!("virtual host '{name}': {e}");
    reject(
        "",
        &[
            ("matcher", matcher.is_some()),
            // EXTERNAL_ONLY needs Envoy's internal/external request split.
            (
                "require_tls: EXTERNAL_ONLY",
                *require_tls == route_pb::virtual_host::TlsRequirementType::ExternalOnly as i32,
            ),
            ("virtual_clusters", !virtual_clusters.is_empty()),
            ("rate_limits", !rate_limits.is_empty()),
            (
                "retry_policy_typed_config",
                retry_policy_typed_config.is_some(),
            ),
            ("hedge_policy", hedge_policy.is_some()),
            (
                "include_is_timeout_retry_header",
                *include_is_timeout_retry_header,
            ),
            (
                "request_mirror_policies",
                !request_mirror_policies.is_empty(),
            ),
            ("route_specifiers", !route_specifiers.is_empty()),
        ],
    )
    .map_err(within)?;
    let cors = cors_of(cors.as_ref(), typed_per_filter_config, "").map_err(within)?;
    if domains.is_empty() {
        return Err(within("no domains".into()));
    }
    for domain in domains {
        check_domain(domain).map_err(within)?;
    }
    let mut converted = Vec::with_capacity(routes.len());
    for (index, pb) in routes.iter().enumerate() {
        let label = if pb.name.is_empty() {
            format!("route #{index}")
        } else {
            format!("route '{}'", pb.name)
        };
        let mut route = route(pb).map_err(|e| format!("{label} in virtual host '{name}': {e}"))?;
        // The route's CORS fields over the virtual host's.
        route.cors = match (route.cors.take(), &cors) {
            (Some(own), Some(host)) => Some(Arc::new(own.over(host))),
            (own, host) => own.or_else(|| host.clone()),
        };
        converted.push(route);
    }
    Ok(VirtualHost {
        name: name.clone(),
        domains: domains.clone(),
        routes: converted,
        retry_policy: retry_policy
            .as_ref()
            .map(|policy| retry(policy, "retry_policy."))
            .transpose()
            .map_err(within)?,
        request_headers: header_ops(
            request_headers_to_add,
            request_headers_to_remove,
            "request_headers_to_",
        )
        .map_err(within)?,
        response_headers: header_ops(
            response_headers_to_add,
            response_headers_to_remove,
            "response_headers_to_",
        )
        .map_err(within)?,
        attempt_count_to_upstream: *include_request_attempt_count,
        attempt_count_to_client: *include_attempt_count_in_response,
        cors,
        require_tls: match route_pb::virtual_host::TlsRequirementType::try_from(*require_tls) {
            Ok(route_pb::virtual_host::TlsRequirementType::All) => true,
            Ok(_) => false,
            Err(_) => return Err(within(format!("require_tls: unknown {require_tls}"))),
        },
    })
}

#[allow(deprecated)]
fn route(route: &route_pb::Route) -> Result<Route, String> {
    use route_pb::route::Action;
    let route_pb::Route {
        name,
        r#match,
        metadata: _,
        // Tracing and stats settings: Weir has neither per route yet.
        decorator: _,
        tracing: _,
        stat_prefix: _,
        typed_per_filter_config,
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
        // Buffering limits: the proxy keeps its own.
        per_request_buffer_limit_bytes: _,
        request_body_buffer_limit: _,
        route_specifiers,
        action,
    } = route;
    reject("", &[("route_specifiers", !route_specifiers.is_empty())])?;
    let matcher = route_match(r#match.as_ref().ok_or("no match")?)?;
    #[allow(deprecated)]
    let legacy_cors = match action {
        Some(Action::Route(forward)) => forward.cors.as_ref(),
        _ => None,
    };
    let action = match action {
        Some(Action::Route(forward)) => RouteAction::Forward(Box::new(forward_action(forward)?)),
        Some(Action::Redirect(redirect)) => RouteAction::Redirect(redirect_action(redirect)?),
        Some(Action::DirectResponse(direct)) => direct_response(direct)?,
        Some(Action::FilterAction(_)) => return Err("unsupported field filter_action".into()),
        Some(Action::NonForwardingAction(_)) => {
            return Err("unsupported field non_forwarding_action".into());
        }
        None => return Err("no action: give route, redirect or direct_response".into()),
    };
    let mut configs: Vec<(&String, &protobuf::Any)> = typed_per_filter_config.iter().collect();
    configs.sort_by_key(|(key, _)| *key);
    let mut fault = None;
    let mut session = None;
    for (key, any) in configs {
        let at = format!("typed_per_filter_config[\"{key}\"]");
        match key.as_str() {
            FAULT_FILTER => fault = fault_config(any, &at)?,
            STATEFUL_SESSION_FILTER => session = stateful_session(any, &at)?,
            // Read with the route action's `cors` below.
            CORS_FILTER => {}
            _ => return Err(format!("unsupported field {at}")),
        }
    }
    let cors = cors_of(legacy_cors, typed_per_filter_config, "route.")?;
    Ok(Route {
        name: name.clone(),
        matcher,
        action,
        request_headers: header_ops(
            request_headers_to_add,
            request_headers_to_remove,
            "request_headers_to_",
        )?,
        response_headers: header_ops(
            response_headers_to_add,
            response_headers_to_remove,
            "response_headers_to_",
        )?,
        fault,
        session,
        cors,
    })
}

fn route_match(matcher: &route_pb::RouteMatch) -> Result<RouteMatch, String> {
    use route_pb::route_match::PathSpecifier;
    let route_pb::RouteMatch {
        case_sensitive,
        runtime_fraction,
        headers,
        query_parameters,
        cookies,
        grpc,
        tls_context,
        dynamic_metadata,
        filter_state,
        path_specifier,
    } = matcher;
    reject(
        "match.",
        &[
            ("runtime_fraction", runtime_fraction.is_some()),
            ("cookies", !cookies.is_empty()),
            ("tls_context", tls_context.is_some()),
            ("dynamic_metadata", !dynamic_metadata.is_empty()),
            ("filter_state", !filter_state.is_empty()),
        ],
    )?;
    let path = match path_specifier {
        None => PathMatch::Any,
        Some(PathSpecifier::Prefix(prefix)) => PathMatch::Prefix(prefix.clone()),
        Some(PathSpecifier::Path(path)) => PathMatch::Exact(path.clone()),
        Some(PathSpecifier::SafeRegex(matcher)) => {
            PathMatch::Regex(regex(matcher, "match.safe_regex")?)
        }
        Some(PathSpecifier::PathSeparatedPrefix(prefix)) => {
            // Envoy's constraints: a path, without a trailing '/', query or
            // fragment.
            if !prefix.starts_with('/')
                || (prefix.len() > 1 && prefix.ends_with('/'))
                || prefix.contains(['?', '#'])
            {
                return Err(format!(
                    "match.path_separated_prefix {prefix:?}: starts with '/', no trailing '/', '?' or '#'"
                ));
            }
            PathMatch::SeparatedPrefix(prefix.clone())
        }
        Some(PathSpecifier::ConnectMatcher(_)) => PathMatch::Connect,
        Some(PathSpecifier::PathMatchPolicy(_)) => {
            return Err("unsupported field match.path_match_policy".into());
        }
    };
    Ok(RouteMatch {
        path,
        case_sensitive: case_sensitive.as_ref().is_none_or(|value| value.value),
        headers: headers
            .iter()
            .enumerate()
            .map(|(index, header)| header_match(header, &format!("match.headers[{index}]")))
            .collect::<Result<_, _>>()?,
        query_parameters: query_parameters
            .iter()
            .enumerate()
            .map(|(index, parameter)| {
                query_parameter_match(parameter, &format!("match.query_parameters[{index}]"))
            })
            .collect::<Result<_, _>>()?,
        grpc: grpc.is_some(),
    })
}

fn non_empty(value: &str, at: &str) -> Result<String, String> {
    if value.is_empty() {
        return Err(format!("{at}: empty"));
    }
    Ok(value.to_string())
}

pub(super) fn string_matcher(
    matcher: &matcher_pb::StringMatcher,
    at: &str,
) -> Result<StringMatcher, String> {
    use matcher_pb::string_matcher::MatchPattern;
    let matcher_pb::StringMatcher {
        ignore_case,
        match_pattern,
    } = matcher;
    let kind = match match_pattern {
        Some(MatchPattern::Exact(value)) => StringMatch::Exact(value.clone()),
        Some(MatchPattern::Prefix(value)) => {
            StringMatch::Prefix(non_empty(value, &format!("{at}.prefix"))?)
        }
        Some(MatchPattern::Suffix(value)) => {
            StringMatch::Suffix(non_empty(value, &format!("{at}.suffix"))?)
        }
        Some(MatchPattern::Contains(value)) => {
            StringMatch::Contains(non_empty(value, &format!("{at}.contains"))?)
        }
        Some(MatchPattern::SafeRegex(matcher)) => {
            StringMatch::Regex(regex(matcher, &format!("{at}.safe_regex"))?)
        }
        Some(MatchPattern::Custom(_)) => return Err(format!("unsupported field {at}.custom")),
        None => {
            return Err(format!(
                "{at}: give exact, prefix, suffix, contains or safe_regex"
            ));
        }
    };
    Ok(StringMatcher {
        kind,
        ignore_case: *ignore_case,
    })
}

#[allow(deprecated)]
fn header_match(matcher: &route_pb::HeaderMatcher, at: &str) -> Result<HeaderMatch, String> {
    use route_pb::header_matcher::HeaderMatchSpecifier as Specifier;
    let route_pb::HeaderMatcher {
        name,
        invert_match,
        treat_missing_header_as_empty,
        header_match_specifier,
    } = matcher;
    let case_sensitive = |kind| {
        Some(StringMatcher {
            kind,
            ignore_case: false,
        })
    };
    // (value matcher, whether the header must be present): without a
    // specifier Envoy checks presence; `present_match: false` asks for
    // absence, which is presence inverted.
    let (value, present) = match header_match_specifier {
        None => (None, true),
        Some(Specifier::StringMatch(matcher)) => (
            Some(string_matcher(matcher, &format!("{at}.string_match"))?),
            true,
        ),
        Some(Specifier::ExactMatch(value)) => {
            (case_sensitive(StringMatch::Exact(value.clone())), true)
        }
        Some(Specifier::PrefixMatch(value)) => (
            case_sensitive(StringMatch::Prefix(non_empty(
                value,
                &format!("{at}.prefix_match"),
            )?)),
            true,
        ),
        Some(Specifier::SuffixMatch(value)) => (
            case_sensitive(StringMatch::Suffix(non_empty(
                value,
                &format!("{at}.suffix_match"),
            )?)),
            true,
        ),
        Some(Specifier::ContainsMatch(value)) => (
            case_sensitive(StringMatch::Contains(non_empty(
                value,
                &format!("{at}.contains_match"),
            )?)),
            true,
        ),
        Some(Specifier::SafeRegexMatch(matcher)) => (
            case_sensitive(StringMatch::Regex(regex(
                matcher,
                &format!("{at}.safe_regex_match"),
            )?)),
            true,
        ),
        Some(Specifier::PresentMatch(present)) => (None, *present),
        Some(Specifier::RangeMatch(_)) => {
            return Err(format!("unsupported field {at}.range_match"));
        }
    };
    Ok(HeaderMatch {
        name: matched_header_name(name, &format!("{at}.name"))?,
        value,
        invert: *invert_match != !present,
        missing_as_empty: *treat_missing_header_as_empty,
    })
}

fn query_parameter_match(
    matcher: &route_pb::QueryParameterMatcher,
    at: &str,
) -> Result<QueryParameterMatch, String> {
    use route_pb::query_parameter_matcher::QueryParameterMatchSpecifier as Specifier;
    let route_pb::QueryParameterMatcher {
        name,
        query_parameter_match_specifier,
    } = matcher;
    let value = match query_parameter_match_specifier {
        Some(Specifier::StringMatch(matcher)) => {
            Some(string_matcher(matcher, &format!("{at}.string_match"))?)
        }
        Some(Specifier::PresentMatch(true)) | None => None,
        Some(Specifier::PresentMatch(false)) => {
            return Err(format!("{at}.present_match: false is not supported"));
        }
    };
    Ok(QueryParameterMatch {
        name: non_empty(name, &format!("{at}.name"))?,
        value,
    })
}

fn is_nonzero(value: &Option<protobuf::Duration>) -> bool {
    value
        .as_ref()
        .is_some_and(|value| value.seconds != 0 || value.nanos != 0)
}

#[allow(deprecated)]
fn forward_action(action: &route_pb::RouteAction) -> Result<ForwardAction, String> {
    use route_pb::route_action::{ClusterSpecifier, HostRewriteSpecifier};
    let route_pb::RouteAction {
        cluster_not_found_response_code,
        metadata_match,
        prefix_rewrite,
        regex_rewrite,
        path_rewrite_policy,
        path_rewrite,
        append_x_forwarded_host,
        timeout,
        idle_timeout,
        flush_timeout,
        early_data_policy,
        retry_policy,
        retry_policy_typed_config,
        request_mirror_policies,
        priority,
        rate_limits,
        // Only meaningful with rate limits, which are rejected.
        include_vh_rate_limits: _,
        hash_policy,
        // Read by `route` with the CORS filter's config.
        cors: _,
        max_grpc_timeout,
        grpc_timeout_offset,
        upgrade_configs,
        internal_redirect_policy,
        internal_redirect_action,
        max_internal_redirects,
        hedge_policy,
        max_stream_duration,
        cluster_specifier,
        host_rewrite_specifier,
    } = action;
    reject(
        "route.",
        &[
            ("metadata_match", metadata_match.is_some()),
            ("path_rewrite_policy", path_rewrite_policy.is_some()),
            ("path_rewrite", !path_rewrite.is_empty()),
            ("append_x_forwarded_host", *append_x_forwarded_host),
            ("idle_timeout", is_nonzero(idle_timeout)),
            ("flush_timeout", flush_timeout.is_some()),
            ("early_data_policy", early_data_policy.is_some()),
            (
                "retry_policy_typed_config",
                retry_policy_typed_config.is_some(),
            ),
            // HIGH priority selects the HIGH circuit-breaker thresholds.
            ("priority", *priority != 0),
            ("rate_limits", !rate_limits.is_empty()),
            (
                "internal_redirect_policy",
                internal_redirect_policy.is_some(),
            ),
            ("internal_redirect_action", *internal_redirect_action != 0),
            ("max_internal_redirects", max_internal_redirects.is_some()),
            ("hedge_policy", hedge_policy.is_some()),
        ],
    )?;
    let cluster_not_found = {
        use route_pb::route_action::ClusterNotFoundResponseCode as Code;
        match Code::try_from(*cluster_not_found_response_code) {
            Ok(Code::ServiceUnavailable) => StatusCode::SERVICE_UNAVAILABLE,
            Ok(Code::NotFound) => StatusCode::NOT_FOUND,
            Ok(Code::InternalServerError) => StatusCode::INTERNAL_SERVER_ERROR,
            Err(_) => {
                return Err(format!(
                    "route.cluster_not_found_response_code: unknown {cluster_not_found_response_code}"
                ));
            }
        }
    };
    let grpc_timeout = max_grpc_timeout
        .as_ref()
        .map(|max| {
            grpc_timeout_of(
                max,
                grpc_timeout_offset.as_ref(),
                "route.max_grpc_timeout",
                "route.grpc_timeout_offset",
            )
        })
        .transpose()?;
    if grpc_timeout.is_none() && grpc_timeout_offset.is_some() {
        return Err("route.grpc_timeout_offset: only with max_grpc_timeout".into());
    }
    let max_stream_duration = max_stream_duration
        .as_ref()
        .map(stream_duration)
        .transpose()?
        .filter(|limit| limit.max.is_some() || limit.grpc.is_some());
    let regex_rewrite = regex_rewrite
        .as_ref()
        .map(|rewrite| {
            let matcher_pb::RegexMatchAndSubstitute {
                pattern,
                substitution,
            } = rewrite;
            let pattern = pattern
                .as_ref()
                .ok_or("route.regex_rewrite.pattern: required")?;
            Ok::<_, String>((
                regex(pattern, "route.regex_rewrite.pattern")?,
                substitution_of(substitution),
            ))
        })
        .transpose()?;
    for (index, upgrade) in upgrade_configs.iter().enumerate() {
        let route_pb::route_action::UpgradeConfig {
            upgrade_type: _,
            enabled,
            connect_config,
        } = upgrade;
        reject(
            &format!("route.upgrade_configs[{index}]."),
            &[
                ("enabled", enabled.as_ref().is_some_and(|e| !e.value)),
                ("connect_config", connect_config.is_some()),
            ],
        )?;
    }
    let clusters = match cluster_specifier {
        Some(ClusterSpecifier::Cluster(name)) => vec![WeightedCluster {
            name: non_empty(name, "route.cluster")?,
            weight: 1,
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
            host_rewrite: None,
        }],
        Some(ClusterSpecifier::WeightedClusters(weighted)) => {
            weighted_clusters(weighted, "route.weighted_clusters")?
        }
        Some(ClusterSpecifier::ClusterHeader(_)) => {
            return Err("unsupported field route.cluster_header".into());
        }
        Some(ClusterSpecifier::ClusterSpecifierPlugin(_)) => {
            return Err("unsupported field route.cluster_specifier_plugin".into());
        }
        Some(ClusterSpecifier::InlineClusterSpecifierPlugin(_)) => {
            return Err("unsupported field route.inline_cluster_specifier_plugin".into());
        }
        None => return Err("route: give cluster or weighted_clusters".into()),
    };
    let host_rewrite = match host_rewrite_specifier {
        None => None,
        Some(HostRewriteSpecifier::HostRewriteLiteral(host)) => Some(
            HeaderValue::from_str(host)
                .map_err(|_| format!("route.host_rewrite_literal {host:?}: not a header value"))?,
        ),
        Some(HostRewriteSpecifier::AutoHostRewrite(auto)) if !auto.value => None,
        Some(HostRewriteSpecifier::AutoHostRewrite(_)) => {
            return Err("unsupported field route.auto_host_rewrite".into());
        }
        Some(HostRewriteSpecifier::HostRewriteHeader(_)) => {
            return Err("unsupported field route.host_rewrite_header".into());
        }
        Some(HostRewriteSpecifier::HostRewritePathRegex(_)) => {
            return Err("unsupported field route.host_rewrite_path_regex".into());
        }
        Some(HostRewriteSpecifier::HostRewrite(_)) => {
            return Err("unsupported field route.host_rewrite".into());
        }
    };
    let mut hash_policies = Vec::new();
    for (index, policy) in hash_policy.iter().enumerate() {
        hash_policies.extend(hash(policy, &format!("route.hash_policy[{index}]"))?);
    }
    Ok(ForwardAction {
        clusters,
        timeout: timeout
            .as_ref()
            .map(|value| duration(value, "route.timeout"))
            .transpose()?,
        retry_policy: retry_policy
            .as_ref()
            .map(|policy| retry(policy, "route.retry_policy."))
            .transpose()?,
        prefix_rewrite: (!prefix_rewrite.is_empty()).then(|| prefix_rewrite.clone()),
        host_rewrite,
        mirrors: request_mirror_policies
            .iter()
            .enumerate()
            .map(|(index, policy)| {
                mirror(policy, &format!("route.request_mirror_policies[{index}]"))
            })
            .collect::<Result<_, _>>()?,
        hash_policies,
        grpc_timeout,
        max_stream_duration,
        cluster_not_found,
        regex_rewrite,
    })
}

/// The CORS policy of a virtual host or route: the CORS filter's
/// `typed_per_filter_config`, or the older `cors` field (`legacy`), not
/// both.
fn cors_of(
    legacy: Option<&route_pb::CorsPolicy>,
    configs: &HashMap<String, protobuf::Any>,
    legacy_at: &str,
) -> Result<Option<Arc<Cors>>, String> {
    use crate::routing::envoy::pb::envoy::extensions::filters::http::cors::v3 as cors_pb;
    let typed = configs.get(CORS_FILTER);
    match (legacy, typed) {
        (Some(_), Some(_)) => Err(format!(
            "{legacy_at}cors and typed_per_filter_config[\"{CORS_FILTER}\"]: give one"
        )),
        (None, None) => Ok(None),
        (Some(policy), None) => {
            // The older field's policy, as the filter's message (the same
            // fields under other numbers), so one conversion reads both.
            #[allow(deprecated)]
            let route_pb::CorsPolicy {
                allow_origin_string_match,
                allow_methods,
                allow_headers,
                expose_headers,
                max_age,
                allow_credentials,
                shadow_enabled,
                allow_private_network_access,
                forward_not_matching_preflights,
                enabled_specifier,
            } = policy.clone();
            let filter_enabled = enabled_specifier
                .map(|route_pb::cors_policy::EnabledSpecifier::FilterEnabled(enabled)| enabled);
            let policy = cors_pb::CorsPolicy {
                allow_origin_string_match,
                allow_methods,
                allow_headers,
                expose_headers,
                max_age,
                allow_credentials,
                filter_enabled,
                shadow_enabled,
                allow_private_network_access,
                forward_not_matching_preflights,
            };
            cors(&policy, &format!("{legacy_at}cors.")).map(|cors| Some(Arc::new(cors)))
        }
        (None, Some(any)) => {
            let at = format!("typed_per_filter_config[\"{CORS_FILTER}\"]");
            if any.type_url != CORS_TYPE {
                return Err(format!("{at}: type {:?}, want {CORS_TYPE}", any.type_url));
            }
            let decoded = cors_pb::CorsPolicy::decode(any.value.as_slice())
                .map_err(|e| format!("{at}: undecodable CorsPolicy: {e}"))?;
            cors(&decoded, &format!("{at}.")).map(|cors| Some(Arc::new(cors)))
        }
    }
}

fn cors(
    policy: &pb::envoy::extensions::filters::http::cors::v3::CorsPolicy,
    at: &str,
) -> Result<Cors, String> {
    let pb::envoy::extensions::filters::http::cors::v3::CorsPolicy {
        allow_origin_string_match,
        allow_methods,
        allow_headers,
        expose_headers,
        max_age,
        allow_credentials,
        filter_enabled,
        shadow_enabled,
        allow_private_network_access,
        forward_not_matching_preflights,
    } = policy;
    // Shadow mode only counts what it would have done: stats Weir lacks.
    // Off (0 %, as Envoy's CORS example writes it) is accepted.
    let shadowing = match shadow_enabled {
        None => false,
        Some(core_pb::RuntimeFractionalPercent { default_value, .. }) => default_value
            .as_ref()
            .is_none_or(|percent| percent.numerator > 0),
    };
    reject(at, &[("shadow_enabled", shadowing)])?;
    let value = |text: &str, what: &str| {
        HeaderValue::from_str(text)
            .map(|_| text.to_string())
            .map_err(|_| format!("{at}{what} {text:?}: not a header value"))
    };
    let enabled = match filter_enabled {
        None => 1.0,
        // No runtime: the default value applies.
        Some(core_pb::RuntimeFractionalPercent {
            default_value,
            runtime_key: _,
        }) => match default_value {
            Some(value) => fraction(value, &format!("{at}filter_enabled.default_value"))?,
            None => return Err(format!("{at}filter_enabled.default_value: required")),
        },
    };
    let flag = |value: &Option<protobuf::BoolValue>| value.as_ref().map(|b| b.value);
    Ok(Cors {
        allow_origins: allow_origin_string_match
            .iter()
            .enumerate()
            .map(|(index, matcher)| {
                string_matcher(matcher, &format!("{at}allow_origin_string_match[{index}]"))
            })
            .collect::<Result<_, _>>()?,
        allow_methods: value(allow_methods, "allow_methods")?,
        allow_headers: value(allow_headers, "allow_headers")?,
        max_age: value(max_age, "max_age")?,
        expose_headers: value(expose_headers, "expose_headers")?,
        allow_credentials: flag(allow_credentials),
        allow_private_network_access: flag(allow_private_network_access),
        forward_not_matching_preflights: flag(forward_not_matching_preflights),
        enabled,
    })
}

/// A `grpc-timeout` rule from its cap (0: uncapped) and offset.
fn grpc_timeout_of(
    max: &protobuf::Duration,
    offset: Option<&protobuf::Duration>,
    max_at: &str,
    offset_at: &str,
) -> Result<GrpcTimeout, String> {
    let max = duration(max, max_at)?;
    Ok(GrpcTimeout {
        max: (!max.is_zero()).then_some(max),
        offset: offset
            .map(|offset| duration(offset, offset_at))
            .transpose()?
            .unwrap_or_default(),
    })
}

/// Envoy's route `max_stream_duration`.
fn stream_duration(
    limit: &route_pb::route_action::MaxStreamDuration,
) -> Result<StreamDuration, String> {
    const AT: &str = "route.max_stream_duration.";
    let route_pb::route_action::MaxStreamDuration {
        max_stream_duration,
        grpc_timeout_header_max,
        grpc_timeout_header_offset,
    } = limit;
    let max = max_stream_duration
        .as_ref()
        .map(|max| duration(max, &format!("{AT}max_stream_duration")))
        .transpose()?
        .filter(|max| !max.is_zero());
    let grpc = grpc_timeout_header_max
        .as_ref()
        .map(|max| {
            grpc_timeout_of(
                max,
                grpc_timeout_header_offset.as_ref(),
                &format!("{AT}grpc_timeout_header_max"),
                &format!("{AT}grpc_timeout_header_offset"),
            )
        })
        .transpose()?;
    if grpc.is_none() && grpc_timeout_header_offset.is_some() {
        return Err(format!(
            "{AT}grpc_timeout_header_offset: only with grpc_timeout_header_max"
        ));
    }
    Ok(StreamDuration { max, grpc })
}

/// Envoy's (RE2) substitution, `\1` for a group, in the `regex` crate's
/// syntax (`${1}`), with a literal `$` escaped.
fn substitution_of(substitution: &str) -> String {
    let mut out = String::with_capacity(substitution.len());
    let mut chars = substitution.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' => match chars.peek() {
                Some(digit) if digit.is_ascii_digit() => {
                    out.push_str(&format!("${{{digit}}}"));
                    chars.next();
                }
                Some('\\') => {
                    out.push('\\');
                    chars.next();
                }
                _ => out.push('\\'),
            },
            c => out.push(c),
        }
    }
    out
}

#[allow(deprecated)]
fn weighted_clusters(
    weighted: &route_pb::WeightedCluster,
    at: &str,
) -> Result<Vec<WeightedCluster>, String> {
    use route_pb::weighted_cluster::RandomValueSpecifier;
    let route_pb::WeightedCluster {
        clusters,
        total_weight,
        runtime_key_prefix,
        random_value_specifier,
    } = weighted;
    let random = match random_value_specifier {
        Some(RandomValueSpecifier::HeaderName(_)) => "header_name",
        Some(RandomValueSpecifier::UseHashPolicy(_)) => "use_hash_policy",
        None => "",
    };
    reject(
        &format!("{at}."),
        &[
            ("runtime_key_prefix", !runtime_key_prefix.is_empty()),
            (random, random_value_specifier.is_some()),
        ],
    )?;
    if clusters.is_empty() {
        return Err(format!("{at}.clusters: empty"));
    }
    let converted = clusters
        .iter()
        .enumerate()
        .map(|(index, cluster)| cluster_weight(cluster, &format!("{at}.clusters[{index}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let total: u64 = converted.iter().map(|c| u64::from(c.weight)).sum();
    if total == 0 {
        return Err(format!("{at}: the weights add up to 0"));
    }
    if total > u64::from(u32::MAX) {
        return Err(format!("{at}: the weights add up to more than 2^32 - 1"));
    }
    if let Some(expected) = total_weight
        && u64::from(expected.value) != total
    {
        return Err(format!(
            "{at}.total_weight {} but the weights add up to {total}",
            expected.value
        ));
    }
    Ok(converted)
}

fn cluster_weight(
    cluster: &route_pb::weighted_cluster::ClusterWeight,
    at: &str,
) -> Result<WeightedCluster, String> {
    let route_pb::weighted_cluster::ClusterWeight {
        name,
        cluster_header,
        weight,
        metadata_match,
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
        typed_per_filter_config,
        host_rewrite_specifier,
    } = cluster;
    let fields = format!("{at}.");
    reject(
        &fields,
        &[
            ("cluster_header", !cluster_header.is_empty()),
            ("metadata_match", metadata_match.is_some()),
        ],
    )?;
    no_filter_configs(&fields, typed_per_filter_config)?;
    let host_rewrite = match host_rewrite_specifier {
        None => None,
        Some(
            route_pb::weighted_cluster::cluster_weight::HostRewriteSpecifier::HostRewriteLiteral(
                host,
            ),
        ) => {
            Some(HeaderValue::from_str(host).map_err(|_| {
                format!("{fields}host_rewrite_literal {host:?}: not a header value")
            })?)
        }
    };
    Ok(WeightedCluster {
        name: non_empty(name, &format!("{at}.name"))?,
        // Envoy counts an absent weight as 0.
        weight: weight.as_ref().map_or(0, |weight| weight.value),
        request_headers: header_ops(
            request_headers_to_add,
            request_headers_to_remove,
            &format!("{fields}request_headers_to_"),
        )?,
        response_headers: header_ops(
            response_headers_to_add,
            response_headers_to_remove,
            &format!("{fields}response_headers_to_"),
        )?,
        host_rewrite,
    })
}

/// Envoy's `retry_on` names and what they set; the gRPC ones add their
/// `grpc-status`.
fn retry_condition(on: &mut RetryOn, condition: &str) -> bool {
    match condition {
        "5xx" => on.five_xx = true,
        "gateway-error" => on.gateway_error = true,
        "reset" => on.reset = true,
        // See the module doc.
        "connect-failure" | "refused-stream" | "reset-before-request" => on.connect_failure = true,
        "retriable-status-codes" => on.retriable_status_codes = true,
        "cancelled" => on.grpc_statuses.push(1),
        "deadline-exceeded" => on.grpc_statuses.push(4),
        "resource-exhausted" => on.grpc_statuses.push(8),
        "internal" => on.grpc_statuses.push(13),
        "unavailable" => on.grpc_statuses.push(14),
        _ => return false,
    }
    true
}

fn retry(policy: &route_pb::RetryPolicy, at: &str) -> Result<RetryPolicy, String> {
    let route_pb::RetryPolicy {
        retry_on,
        num_retries,
        per_try_timeout,
        per_try_idle_timeout,
        retry_priority,
        retry_host_predicate,
        retry_options_predicates,
        host_selection_retry_max_attempts,
        retriable_status_codes,
        retry_back_off,
        rate_limited_retry_back_off,
        retriable_headers,
        retriable_request_headers,
        refresh_cluster_on_retry,
    } = policy;
    reject(
        at,
        &[
            ("per_try_idle_timeout", per_try_idle_timeout.is_some()),
            (
                "retry_options_predicates",
                !retry_options_predicates.is_empty(),
            ),
            (
                "rate_limited_retry_back_off",
                rate_limited_retry_back_off.is_some(),
            ),
            ("retriable_headers", !retriable_headers.is_empty()),
            (
                "retriable_request_headers",
                !retriable_request_headers.is_empty(),
            ),
            ("refresh_cluster_on_retry", *refresh_cluster_on_retry),
        ],
    )?;
    if let Some(predicate) = retry_host_predicate
        .iter()
        .find(|predicate| predicate.name != PREVIOUS_HOSTS)
    {
        return Err(format!(
            "unsupported field {at}retry_host_predicate: {:?} (only {PREVIOUS_HOSTS})",
            predicate.name
        ));
    }
    let mut on = RetryOn::default();
    for condition in retry_on.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        if !retry_condition(&mut on, condition) {
            return Err(format!(
                "{at}retry_on: {condition:?} is not supported (5xx, gateway-error, reset, connect-failure, refused-stream, retriable-status-codes, cancelled, deadline-exceeded, internal, resource-exhausted, unavailable)"
            ));
        }
    }
    on.grpc_statuses.sort_unstable();
    on.grpc_statuses.dedup();
    on.status_codes = retriable_status_codes
        .iter()
        .map(|code| {
            u16::try_from(*code)
                .ok()
                .filter(|code| (100..=599).contains(code))
                .ok_or_else(|| format!("{at}retriable_status_codes: {code} is not a status"))
        })
        .collect::<Result<_, _>>()?;
    let (backoff_base, backoff_max) = match retry_back_off {
        None => (Duration::from_millis(25), Duration::from_millis(250)),
        Some(route_pb::retry_policy::RetryBackOff {
            base_interval,
            max_interval,
        }) => {
            let base = match base_interval {
                Some(base) => duration(base, &format!("{at}retry_back_off.base_interval"))?,
                None => return Err(format!("{at}retry_back_off.base_interval: required")),
            };
            let max = max_interval
                .as_ref()
                .map(|max| duration(max, &format!("{at}retry_back_off.max_interval")))
                .transpose()?
                .unwrap_or(base * 10);
            if base.is_zero() || max < base {
                return Err(format!(
                    "{at}retry_back_off: base_interval above 0 and max_interval at least base_interval"
                ));
            }
            (base, max)
        }
    };
    Ok(RetryPolicy {
        retry_on: on,
        num_retries: num_retries.as_ref().map_or(1, |n| n.value),
        per_try_timeout: per_try_timeout
            .as_ref()
            .map(|value| duration(value, &format!("{at}per_try_timeout")))
            .transpose()?
            .filter(|timeout| !timeout.is_zero()),
        backoff_base,
        backoff_max,
        host_selection_attempts: match *host_selection_retry_max_attempts {
            0 => 1,
            attempts => u32::try_from(attempts).unwrap_or(u32::MAX).min(16),
        },
        previous_priorities: retry_priority
            .as_ref()
            .map(|priority| previous_priorities(priority, &format!("{at}retry_priority")))
            .transpose()?,
    })
}

/// `retry_priority`: only Envoy's `previous_priorities`, as istiod writes
/// it for `retryRemoteLocalities`; its `update_frequency` (above 0).
fn previous_priorities(
    priority: &route_pb::retry_policy::RetryPriority,
    at: &str,
) -> Result<u32, String> {
    use envoy_types::pb::envoy::extensions::retry::priority::previous_priorities::v3::PreviousPrioritiesConfig;
    use route_pb::retry_policy::retry_priority::ConfigType;
    let route_pb::retry_policy::RetryPriority { name, config_type } = priority;
    let Some(ConfigType::TypedConfig(any)) = config_type else {
        return Err(format!("{at}: {name:?} without a typed_config"));
    };
    let wanted = format!(
        "type.googleapis.com/{}",
        <PreviousPrioritiesConfig as prost::Name>::full_name()
    );
    if any.type_url != wanted {
        return Err(format!(
            "unsupported field {at}: {:?} (only previous_priorities)",
            any.type_url
        ));
    }
    let config = PreviousPrioritiesConfig::decode(any.value.as_slice())
        .map_err(|e| format!("{at}: undecodable PreviousPrioritiesConfig: {e}"))?;
    u32::try_from(config.update_frequency)
        .ok()
        .filter(|frequency| *frequency > 0)
        .ok_or_else(|| format!("{at}.update_frequency {}: above 0", config.update_frequency))
}

fn mirror(
    policy: &route_pb::route_action::RequestMirrorPolicy,
    at: &str,
) -> Result<Mirror, String> {
    let route_pb::route_action::RequestMirrorPolicy {
        cluster,
        cluster_header,
        runtime_fraction,
        // Tracing: Weir has none yet.
        trace_sampled: _,
        disable_shadow_host_suffix_append,
        request_headers_mutations,
        host_rewrite_literal,
    } = policy;
    reject(
        &format!("{at}."),
        &[
            ("cluster_header", !cluster_header.is_empty()),
            (
                "disable_shadow_host_suffix_append",
                *disable_shadow_host_suffix_append,
            ),
            (
                "request_headers_mutations",
                !request_headers_mutations.is_empty(),
            ),
            ("host_rewrite_literal", !host_rewrite_literal.is_empty()),
        ],
    )?;
    let fraction = match runtime_fraction {
        None => 1.0,
        // The runtime key has no runtime to read: the default applies.
        Some(core_pb::RuntimeFractionalPercent {
            default_value,
            runtime_key: _,
        }) => match default_value {
            Some(value) => fraction(value, &format!("{at}.runtime_fraction.default_value"))?,
            None => return Err(format!("{at}.runtime_fraction.default_value: required")),
        },
    };
    Ok(Mirror {
        cluster: non_empty(cluster, &format!("{at}.cluster"))?,
        fraction,
    })
}

/// `None`: a policy that never yields a hash (`source_ip: false`).
fn hash(
    policy: &route_pb::route_action::HashPolicy,
    at: &str,
) -> Result<Option<HashPolicy>, String> {
    use route_pb::route_action::hash_policy::{
        ConnectionProperties, Cookie, Header, PolicySpecifier, QueryParameter,
    };
    // See the module doc.
    let route_pb::route_action::HashPolicy {
        terminal: _,
        policy_specifier,
    } = policy;
    Ok(match policy_specifier {
        Some(PolicySpecifier::Header(Header {
            header_name,
            regex_rewrite,
        })) => {
            reject(
                &format!("{at}.header."),
                &[("regex_rewrite", regex_rewrite.is_some())],
            )?;
            Some(HashPolicy::Header(header_name_for_hash(
                header_name,
                &format!("{at}.header.header_name"),
            )?))
        }
        // `ttl` asks the proxy to make up the cookie when absent.
        Some(PolicySpecifier::Cookie(Cookie {
            name,
            ttl,
            path,
            attributes,
        })) => {
            let attributes: Vec<(&str, &str)> = attributes
                .iter()
                .map(|attribute| (attribute.name.as_str(), attribute.value.as_str()))
                .collect();
            Some(HashPolicy::Cookie(cookie_spec(
                name,
                ttl.as_ref(),
                path,
                &attributes,
                &format!("{at}.cookie"),
            )?))
        }
        Some(PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip })) => {
            source_ip.then_some(HashPolicy::SourceIp)
        }
        Some(PolicySpecifier::QueryParameter(QueryParameter { name })) => Some(
            HashPolicy::QueryParameter(non_empty(name, &format!("{at}.query_parameter.name"))?),
        ),
        Some(PolicySpecifier::FilterState(_)) => {
            return Err(format!("unsupported field {at}.filter_state"));
        }
        None => return Err(format!("{at}: no policy")),
    })
}

/// A cookie's name, ttl, path and attributes, each a valid cookie token.
fn cookie_spec(
    name: &str,
    ttl: Option<&protobuf::Duration>,
    path: &str,
    attributes: &[(&str, &str)],
    at: &str,
) -> Result<CookieSpec, String> {
    let name = non_empty(name, &format!("{at}.name"))?;
    let cookie_safe = |text: &str, what: &str| {
        if text
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b';' && b != b',')
        {
            Ok(())
        } else {
            Err(format!("{at}.{what} {text:?}: not a cookie token"))
        }
    };
    cookie_safe(&name, "name")?;
    if !path.is_empty() {
        cookie_safe(path, "path")?;
    }
    let attributes = attributes
        .iter()
        .map(|(name, value)| {
            cookie_safe(name, "attributes.name")?;
            if !value.is_empty() {
                cookie_safe(value, "attributes.value")?;
            }
            Ok((name.to_string(), value.to_string()))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(CookieSpec {
        name,
        ttl: ttl
            .map(|ttl| duration(ttl, &format!("{at}.ttl")))
            .transpose()?,
        path: path.to_string(),
        attributes,
    })
}

/// `typed_per_filter_config["envoy.filters.http.stateful_session"]`:
/// `None` when it turns sessions off.
fn stateful_session(any: &protobuf::Any, at: &str) -> Result<Option<StatefulSession>, String> {
    use pb::envoy::extensions::{
        filters::http::stateful_session::v3 as session_pb,
        http::stateful_session::{cookie::v3 as cookie_pb, header::v3 as header_pb},
    };
    use session_pb::stateful_session_per_route::Override;
    if any.type_url != STATEFUL_SESSION_TYPE {
        return Err(format!(
            "{at}: type {:?}, want {STATEFUL_SESSION_TYPE}",
            any.type_url
        ));
    }
    let decoded = session_pb::StatefulSessionPerRoute::decode(any.value.as_slice())
        .map_err(|e| format!("{at}: undecodable StatefulSessionPerRoute: {e}"))?;
    let session = match decoded.r#override {
        None | Some(Override::Disabled(_)) => return Ok(None),
        Some(Override::StatefulSession(session)) => session,
    };
    let session_pb::StatefulSession {
        session_state,
        strict,
        // Stats names.
        stat_prefix: _,
        status_on_strict_destination_not_found,
    } = session;
    let not_found = match status_on_strict_destination_not_found {
        0 => StatusCode::SERVICE_UNAVAILABLE,
        code => u16::try_from(code)
            .ok()
            .and_then(|code| StatusCode::from_u16(code).ok())
            .ok_or_else(|| {
                format!("{at}.status_on_strict_destination_not_found {code}: not a status")
            })?,
    };
    let at = format!("{at}.stateful_session.session_state");
    let Some(core_pb::TypedExtensionConfig {
        name: _,
        typed_config: Some(config),
    }) = session_state
    else {
        return Err(format!("{at}: required"));
    };
    let state = match config.type_url.as_str() {
        "type.googleapis.com/envoy.extensions.http.stateful_session.header.v3.HeaderBasedSessionState" =>
        {
            let header_pb::HeaderBasedSessionState { name } =
                header_pb::HeaderBasedSessionState::decode(config.value.as_slice())
                    .map_err(|e| format!("{at}: undecodable HeaderBasedSessionState: {e}"))?;
            SessionState::Header(mutable_header_name(&name, &format!("{at}.name"))?)
        }
        "type.googleapis.com/envoy.extensions.http.stateful_session.cookie.v3.CookieBasedSessionState" =>
        {
            let cookie_pb::CookieBasedSessionState { cookie } =
                cookie_pb::CookieBasedSessionState::decode(config.value.as_slice())
                    .map_err(|e| format!("{at}: undecodable CookieBasedSessionState: {e}"))?;
            let cookie = cookie.ok_or_else(|| format!("{at}.cookie: required"))?;
            let attributes: Vec<(&str, &str)> = cookie
                .attributes
                .iter()
                .map(|attribute| (attribute.name.as_str(), attribute.value.as_str()))
                .collect();
            SessionState::Cookie(cookie_spec(
                &cookie.name,
                cookie.ttl.as_ref(),
                &cookie.path,
                &attributes,
                &format!("{at}.cookie"),
            )?)
        }
        other => return Err(format!("unsupported field {at} ({other})")),
    };
    Ok(Some(StatefulSession {
        state,
        strict,
        not_found,
    }))
}

fn redirect_action(redirect: &route_pb::RedirectAction) -> Result<Redirect, String> {
    use route_pb::redirect_action::{
        PathRewriteSpecifier, RedirectResponseCode as Code, SchemeRewriteSpecifier,
    };
    let route_pb::RedirectAction {
        host_redirect,
        port_redirect,
        response_code,
        strip_query,
        scheme_rewrite_specifier,
        path_rewrite_specifier,
    } = redirect;
    let status = match Code::try_from(*response_code) {
        Ok(Code::MovedPermanently) => StatusCode::MOVED_PERMANENTLY,
        Ok(Code::Found) => StatusCode::FOUND,
        Ok(Code::SeeOther) => StatusCode::SEE_OTHER,
        Ok(Code::TemporaryRedirect) => StatusCode::TEMPORARY_REDIRECT,
        Ok(Code::PermanentRedirect) => StatusCode::PERMANENT_REDIRECT,
        Err(_) => {
            return Err(format!("redirect.response_code: unknown {response_code}"));
        }
    };
    let scheme = match scheme_rewrite_specifier {
        None | Some(SchemeRewriteSpecifier::HttpsRedirect(false)) => None,
        Some(SchemeRewriteSpecifier::HttpsRedirect(true)) => Some("https".to_string()),
        Some(SchemeRewriteSpecifier::SchemeRedirect(scheme)) => {
            Some(non_empty(scheme, "redirect.scheme_redirect")?.to_ascii_lowercase())
        }
    };
    let (path, prefix_rewrite) = match path_rewrite_specifier {
        None => (None, None),
        Some(PathRewriteSpecifier::PathRedirect(path)) => (Some(path.clone()), None),
        Some(PathRewriteSpecifier::PrefixRewrite(prefix)) => (None, Some(prefix.clone())),
        Some(PathRewriteSpecifier::RegexRewrite(_)) => {
            return Err("unsupported field redirect.regex_rewrite".into());
        }
        Some(PathRewriteSpecifier::PathRewrite(_)) => {
            return Err("unsupported field redirect.path_rewrite".into());
        }
    };
    let port = match *port_redirect {
        0 => None,
        port => Some(
            u16::try_from(port)
                .map_err(|_| format!("redirect.port_redirect {port}: not a port"))?,
        ),
    };
    Ok(Redirect {
        scheme,
        host: (!host_redirect.is_empty()).then(|| host_redirect.clone()),
        port,
        path,
        prefix_rewrite,
        status,
        strip_query: *strip_query,
    })
}

fn direct_response(direct: &route_pb::DirectResponseAction) -> Result<RouteAction, String> {
    let route_pb::DirectResponseAction {
        status,
        body,
        body_format,
    } = direct;
    reject(
        "direct_response.",
        &[("body_format", body_format.is_some())],
    )?;
    // Envoy's range: a final status.
    let status = u16::try_from(*status)
        .ok()
        .filter(|status| (200..=599).contains(status))
        .and_then(|status| StatusCode::from_u16(status).ok())
        .ok_or_else(|| format!("direct_response.status {status}: between 200 and 599"))?;
    let body = body
        .as_ref()
        .map(|body| data_source(body, "direct_response.body"))
        .transpose()?;
    Ok(RouteAction::DirectResponse { status, body })
}

fn data_source(source: &core_pb::DataSource, at: &str) -> Result<Bytes, String> {
    use core_pb::data_source::Specifier;
    let core_pb::DataSource {
        watched_directory,
        specifier,
    } = source;
    reject(
        &format!("{at}."),
        &[("watched_directory", watched_directory.is_some())],
    )?;
    match specifier {
        Some(Specifier::InlineString(text)) => Ok(Bytes::from(text.clone())),
        Some(Specifier::InlineBytes(bytes)) => Ok(Bytes::from(bytes.clone())),
        Some(Specifier::Filename(_)) => Err(format!("unsupported field {at}.filename")),
        Some(Specifier::EnvironmentVariable(_)) => {
            Err(format!("unsupported field {at}.environment_variable"))
        }
        None => Ok(Bytes::new()),
    }
}

/// `typed_per_filter_config["envoy.filters.http.fault"]`; `None` when it
/// injects nothing.
fn fault_config(any: &protobuf::Any, at: &str) -> Result<Option<Fault>, String> {
    if any.type_url != FAULT_TYPE {
        return Err(format!("{at}: type {:?}, want {FAULT_TYPE}", any.type_url));
    }
    let decoded = fault_pb::HttpFault::decode(any.value.as_slice())
        .map_err(|e| format!("{at}: undecodable HTTPFault: {e}"))?;
    let fault_pb::HttpFault {
        delay,
        abort,
        upstream_cluster,
        headers,
        downstream_nodes,
        max_active_faults,
        response_rate_limit,
        // Weir has no runtime: the configured values apply.
        delay_percent_runtime: _,
        abort_percent_runtime: _,
        delay_duration_runtime: _,
        abort_http_status_runtime: _,
        max_active_faults_runtime: _,
        response_rate_limit_percent_runtime: _,
        abort_grpc_status_runtime: _,
        disable_downstream_cluster_stats: _,
        filter_metadata: _,
    } = decoded;
    reject(
        &format!("{at}."),
        &[
            ("upstream_cluster", !upstream_cluster.is_empty()),
            ("headers", !headers.is_empty()),
            ("downstream_nodes", !downstream_nodes.is_empty()),
            ("max_active_faults", max_active_faults.is_some()),
            ("response_rate_limit", response_rate_limit.is_some()),
        ],
    )?;
    let delay = delay
        .as_ref()
        .map(|delay| fault_delay(delay, &format!("{at}.delay")))
        .transpose()?;
    let abort = abort
        .as_ref()
        .map(|abort| fault_abort(abort, &format!("{at}.abort")))
        .transpose()?;
    Ok((delay.is_some() || abort.is_some()).then_some(Fault { delay, abort }))
}

/// Envoy's default percentage for a fault is 0.
fn fault_percentage(value: &Option<type_pb::FractionalPercent>, at: &str) -> Result<f64, String> {
    value.as_ref().map_or(Ok(0.0), |value| {
        fraction(value, &format!("{at}.percentage"))
    })
}

fn fault_delay(delay: &fault_common_pb::FaultDelay, at: &str) -> Result<(Duration, f64), String> {
    use fault_common_pb::fault_delay::FaultDelaySecifier as Specifier;
    let fault_common_pb::FaultDelay {
        percentage,
        fault_delay_secifier,
    } = delay;
    let fixed = match fault_delay_secifier {
        Some(Specifier::FixedDelay(fixed)) => duration(fixed, &format!("{at}.fixed_delay"))?,
        Some(Specifier::HeaderDelay(_)) => {
            return Err(format!("unsupported field {at}.header_delay"));
        }
        None => return Err(format!("{at}.fixed_delay: required")),
    };
    Ok((fixed, fault_percentage(percentage, at)?))
}

fn fault_abort(abort: &fault_pb::FaultAbort, at: &str) -> Result<(FaultAbort, f64), String> {
    use fault_pb::fault_abort::ErrorType;
    let fault_pb::FaultAbort {
        percentage,
        response_body,
        error_type,
    } = abort;
    reject(
        &format!("{at}."),
        &[("response_body", !response_body.is_empty())],
    )?;
    let kind = match error_type {
        Some(ErrorType::HttpStatus(status)) => FaultAbort::Http(
            u16::try_from(*status)
                .ok()
                .filter(|status| (200..=599).contains(status))
                .and_then(|status| StatusCode::from_u16(status).ok())
                .ok_or_else(|| format!("{at}.http_status {status}: between 200 and 599"))?,
        ),
        Some(ErrorType::GrpcStatus(status)) => FaultAbort::Grpc(*status),
        Some(ErrorType::HeaderAbort(_)) => {
            return Err(format!("unsupported field {at}.header_abort"));
        }
        None => return Err(format!("{at}: give http_status or grpc_status")),
    };
    Ok((kind, fault_percentage(percentage, at)?))
}

/// Istio's cluster name `outbound|<port>|<subset>|<hostname>`: (hostname,
/// port, subset name, empty when none).
pub fn istio_cluster_name(name: &str) -> Option<(&str, u16, &str)> {
    let mut parts = name.split('|');
    let (Some("outbound"), Some(port), Some(subset), Some(hostname), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let port: u16 = port.parse().ok().filter(|port| *port != 0)?;
    (!hostname.is_empty()).then_some((hostname, port, subset))
}

/// Envoy's `Cluster`.
///
/// Weir's conventions:
/// - endpoints: `type: EDS` takes the `ClusterLoadAssignment` of its
///   service name; STRICT_DNS/LOGICAL_DNS resolve the names of their
///   `load_assignment`; other types with a `load_assignment` take its IP
///   addresses; without one, a name in Istio's form
///   `outbound|<port>|<subset>|<hostname>` means the endpoints of that
///   service port, narrowed to the workloads whose labels contain
///   `metadata.filter_metadata["istio"].subset_labels` (a struct of string
///   values, Weir's convention: Istio itself only names the subset, and
///   such a cluster must be EDS); any other cluster is rejected;
/// - `transport_socket` (and its matches): Istio's own mutual TLS is Weir's
///   own mTLS (HBONE); any other TLS context makes the proxy originate TLS
///   (a DestinationRule's SIMPLE or MUTUAL): see `upstream_tls.rs`;
/// - the upstream protocol is the cluster's (HTTP/1.1 unless it says
///   otherwise); `max_requests_per_connection`, the idle timeout and TCP
///   keepalive apply to its pool; other buffer and pool tuning is ignored:
///   Weir's pool keeps its own settings; of `common_lb_config`, the panic
///   threshold applies;
/// - `MAGLEV` builds Envoy's Maglev table (`maglev_lb_config.table_size`,
///   65537 by default) over the endpoints;
/// - circuit breakers: only the DEFAULT-priority thresholds apply (routes
///   of HIGH priority are rejected);
/// - outlier detection: `consecutive_5xx` (5) is enforced unless
///   `enforcing_consecutive_5xx` is 0, as in Envoy. Envoy's
///   `enforcing_consecutive_gateway_failure` defaults to 0 %, so the
///   gateway detector is off unless asked for; Weir enforces it when
///   `consecutive_gateway_failure` or `enforcing_consecutive_gateway_failure`
///   (100) is set explicitly. A detector that is off has threshold 0.
///   Enforcement is all or nothing (0 or 100). With
///   `split_external_local_origin_errors`, local failures count towards
///   `consecutive_local_origin_failure` (5) instead. The success-rate and
///   failure-percentage detectors are not implemented: setting any of
///   their fields (other than a zero enforcement) is rejected.
#[allow(deprecated)]
pub fn convert_cluster(cluster: &cluster_pb::Cluster) -> Result<ClusterConfig, String> {
    let cluster_pb::Cluster {
        transport_socket_matches,
        transport_socket_matcher,
        transport_socket,
        upstream_http_protocol_options,
        name,
        // Stats and load reporting.
        alt_stat_name: _,
        stats_matcher: _,
        track_cluster_stats: _,
        track_timeout_budgets: _,
        lrs_server: _,
        lrs_report_endpoint_metrics: _,
        eds_cluster_config,
        connect_timeout,
        // Pool, buffer and balancer tuning: see the doc above.
        per_connection_buffer_limit_bytes: _,
        per_connection_buffer_high_watermark_timeout: _,
        max_requests_per_connection,
        common_http_protocol_options,
        http_protocol_options: _,
        upstream_connection_options,
        preconnect_policy: _,
        common_lb_config,
        lb_policy,
        load_assignment,
        health_checks,
        circuit_breakers,
        http2_protocol_options,
        typed_extension_protocol_options,
        // DNS clusters resolve with the system's resolver every
        // `dns_refresh_rate`; the rest of Envoy's resolver tuning has no
        // counterpart there.
        dns_refresh_rate,
        dns_jitter: _,
        dns_failure_refresh_rate: _,
        respect_dns_ttl: _,
        dns_lookup_family,
        dns_resolvers,
        use_tcp_for_dns_lookups: _,
        dns_resolution_config,
        typed_dns_resolver_config,
        // Start-up ordering: a cluster here is usable at once.
        wait_for_warm_on_init: _,
        outlier_detection,
        // ORIGINAL_DST's idle-host cleanup: Weir keeps no per-destination
        // hosts, only the pool's idle connections (closed by idle_timeout).
        cleanup_interval: _,
        upstream_bind_config,
        lb_subset_config,
        metadata,
        protocol_selection,
        // Health checks are rejected, so these never apply.
        close_connections_on_host_health_failure: _,
        ignore_health_on_host_removal: _,
        filters,
        load_balancing_policy,
        upstream_config,
        connection_pool_per_downstream_connection,
        queuing_policies,
        cluster_discovery_type,
        lb_config,
    } = cluster;
    if name.is_empty() {
        return Err("a cluster without a name".into());
    }
    reject(
        "",
        &[
            ("health_checks", !health_checks.is_empty()),
            ("lb_subset_config", lb_subset_config.is_some()),
            ("load_balancing_policy", load_balancing_policy.is_some()),
            ("upstream_config", upstream_config.is_some()),
            (
                "connection_pool_per_downstream_connection",
                *connection_pool_per_downstream_connection,
            ),
            ("queuing_policies", queuing_policies.is_some()),
        ],
    )?;
    for (index, filter) in filters.iter().enumerate() {
        upstream_network_filter(filter, &format!("filters[{index}]"))?;
    }
    reject(
        "",
        &[
            ("dns_resolvers", !dns_resolvers.is_empty()),
            ("dns_resolution_config", dns_resolution_config.is_some()),
            (
                "typed_dns_resolver_config",
                typed_dns_resolver_config.is_some(),
            ),
        ],
    )?;
    let dns = DnsSettings {
        refresh: match dns_refresh_rate {
            Some(rate) => duration(rate, "dns_refresh_rate")?.max(Duration::from_millis(1)),
            None => Duration::from_secs(5),
        },
        family: {
            use cluster_pb::cluster::DnsLookupFamily as Family;
            match Family::try_from(*dns_lookup_family) {
                Ok(Family::Auto) => DnsFamily::Auto,
                Ok(Family::V4Only) => DnsFamily::V4Only,
                Ok(Family::V6Only) => DnsFamily::V6Only,
                Ok(Family::V4Preferred) => DnsFamily::V4Preferred,
                Ok(Family::All) => DnsFamily::All,
                Err(_) => return Err(format!("dns_lookup_family: unknown {dns_lookup_family}")),
            }
        },
    };
    if let Some(bind) = upstream_bind_config {
        sidecar_bind_config(bind)?;
    }
    let connect_timeout = match connect_timeout {
        None => Duration::from_secs(5),
        Some(value) => duration(value, "connect_timeout")?,
    };
    if connect_timeout.is_zero() {
        return Err("connect_timeout: above 0".into());
    }
    let mut explicit = None;
    let mut pool = pool_settings(
        max_requests_per_connection.as_ref().map(|n| n.value),
        common_http_protocol_options.as_ref(),
        upstream_connection_options.as_ref(),
        "",
    )?;
    let mut auto_sni = upstream_http_protocol_options.clone();
    let mut options: Vec<(&String, &protobuf::Any)> =
        typed_extension_protocol_options.iter().collect();
    options.sort_by_key(|(key, _)| *key);
    for (key, any) in options {
        let at = format!("typed_extension_protocol_options[\"{key}\"]");
        if key != HTTP_PROTOCOL_OPTIONS {
            return Err(format!("unsupported field {at}"));
        }
        let (protocol, common, sni) = upstream_http(any, &at)?;
        explicit = protocol;
        // The typed options win over the deprecated cluster field.
        if sni.is_some() {
            auto_sni = sni;
        }
        // The typed options win over the deprecated cluster fields.
        if let Some(common) = common {
            let typed = pool_settings(None, Some(&common), None, &format!("{at}."))?;
            pool.idle_timeout = typed.idle_timeout.or(pool.idle_timeout);
            pool.max_requests_per_connection = typed
                .max_requests_per_connection
                .or(pool.max_requests_per_connection);
            pool.max_connection_duration = typed
                .max_connection_duration
                .or(pool.max_connection_duration);
        }
    }
    // The deprecated cluster-level fields, which older istiod still writes.
    let legacy = match (
        http2_protocol_options.is_some(),
        cluster_pb::cluster::ClusterProtocolSelection::try_from(*protocol_selection),
    ) {
        (_, Err(_)) => return Err(format!("protocol_selection: unknown {protocol_selection}")),
        (_, Ok(cluster_pb::cluster::ClusterProtocolSelection::UseDownstreamProtocol)) => {
            Some(UpstreamProtocol::Downstream)
        }
        (true, _) => Some(UpstreamProtocol::Http2),
        (false, _) => None,
    };
    let protocol = match (legacy, explicit) {
        (Some(legacy), Some(explicit)) if legacy != explicit => {
            return Err(format!(
                "the cluster's protocol is {legacy:?} by http2_protocol_options/protocol_selection, but {explicit:?} by typed_extension_protocol_options"
            ));
        }
        (legacy, explicit) => explicit.or(legacy).unwrap_or(UpstreamProtocol::Http1),
    };
    let transport = upstream_tls::convert(
        transport_socket.as_ref(),
        transport_socket_matches,
        transport_socket_matcher.is_some(),
        auto_sni.as_ref(),
    )?;
    Ok(ClusterConfig {
        name: name.clone(),
        endpoints: endpoints(
            name,
            cluster_discovery_type.as_ref(),
            eds_cluster_config.as_ref(),
            load_assignment.as_ref(),
            metadata.as_ref(),
            dns,
            match lb_config {
                Some(cluster_pb::cluster::LbConfig::OriginalDstLbConfig(config)) => Some(config),
                _ => None,
            },
        )?,
        lb_policy: lb_policy_of(
            *lb_policy,
            lb_config.as_ref(),
            matches!(
                cluster_discovery_type,
                Some(cluster_pb::cluster::ClusterDiscoveryType::Type(kind))
                    if *kind == cluster_pb::cluster::DiscoveryType::OriginalDst as i32
            ),
        )?,
        connect_timeout,
        protocol,
        pool,
        panic_threshold: common_lb_config
            .as_ref()
            .map(common_lb)
            .transpose()?
            .flatten(),
        slow_start: slow_start(*lb_policy, lb_config.as_ref())?,
        locality_weighted: common_lb_config.as_ref().is_some_and(|config| {
            matches!(
                config.locality_config_specifier,
                Some(cluster_pb::cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
            )
        }),
        circuit_breakers: thresholds(circuit_breakers.as_ref())?,
        outlier_detection: outlier_detection.as_ref().map(outlier).transpose()?,
        tls: transport.tls,
        proxy_protocol: transport.proxy_protocol,
    })
}

/// What a cluster's `HttpProtocolOptions` say: the protocol it names, its
/// common options, and the SNI options of TLS origination.
type UpstreamHttp = (
    Option<UpstreamProtocol>,
    Option<core_pb::HttpProtocolOptions>,
    Option<core_pb::UpstreamHttpProtocolOptions>,
);

/// `typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]`:
/// the protocol it names, if any, and its common options.
fn upstream_http(any: &protobuf::Any, at: &str) -> Result<UpstreamHttp, String> {
    use upstream_pb::http_protocol_options::{
        UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
    };
    if any.type_url != HTTP_PROTOCOL_OPTIONS_TYPE {
        return Err(format!(
            "{at}: type {:?}, want {HTTP_PROTOCOL_OPTIONS_TYPE}",
            any.type_url
        ));
    }
    let decoded = upstream_pb::HttpProtocolOptions::decode(any.value.as_slice())
        .map_err(|e| format!("{at}: undecodable HttpProtocolOptions: {e}"))?;
    let upstream_pb::HttpProtocolOptions {
        common_http_protocol_options,
        // The SNI and SAN check of TLS origination (upstream_tls.rs).
        upstream_http_protocol_options,
        http_filters,
        header_validation_config,
        outlier_detection,
        request_mirror_policies,
        hash_policy,
        retry_policy,
        upstream_protocol_options,
    } = decoded;
    let fields = format!("{at}.");
    reject(
        &fields,
        &[
            ("http_filters", !http_filters.is_empty()),
            (
                "header_validation_config",
                header_validation_config.is_some(),
            ),
            ("outlier_detection", outlier_detection.is_some()),
            (
                "request_mirror_policies",
                !request_mirror_policies.is_empty(),
            ),
            ("hash_policy", !hash_policy.is_empty()),
            ("retry_policy", retry_policy.is_some()),
        ],
    )?;
    let protocol = match upstream_protocol_options {
        None => None,
        Some(UpstreamProtocolOptions::ExplicitHttpConfig(explicit)) => {
            match explicit.protocol_config {
                Some(ProtocolConfig::HttpProtocolOptions(_)) => Some(UpstreamProtocol::Http1),
                Some(ProtocolConfig::Http2ProtocolOptions(_)) => Some(UpstreamProtocol::Http2),
                Some(ProtocolConfig::Http3ProtocolOptions(_)) => {
                    return Err(format!(
                        "unsupported field {fields}explicit_http_config.http3_protocol_options"
                    ));
                }
                None => return Err(format!("{fields}explicit_http_config: name a protocol")),
            }
        }
        // Each version keeps its options (tuning, not semantics).
        Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(downstream)) => {
            if downstream.http3_protocol_options.is_some() {
                return Err(format!(
                    "unsupported field {fields}use_downstream_protocol_config.http3_protocol_options"
                ));
            }
            Some(UpstreamProtocol::Downstream)
        }
        Some(UpstreamProtocolOptions::AutoConfig(_)) => {
            return Err(format!("unsupported field {fields}auto_config"));
        }
    };
    Ok((
        protocol,
        common_http_protocol_options,
        upstream_http_protocol_options,
    ))
}

/// cncf/xds `TypedStruct` (`udpa.type.v1` and `xds.type.v3` alike): a
/// config given as a Struct, with the type it stands for.
#[derive(Clone, PartialEq, prost::Message)]
struct TypedStruct {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(message, optional, tag = "2")]
    value: Option<protobuf::Struct>,
}

const TYPED_STRUCT_TYPES: [&str; 2] = [
    "type.googleapis.com/udpa.type.v1.TypedStruct",
    "type.googleapis.com/xds.type.v3.TypedStruct",
];

/// The type an `Any` configures: its own, or the one a `TypedStruct` in it
/// stands for.
fn configured_type(any: &protobuf::Any, at: &str) -> Result<String, String> {
    if TYPED_STRUCT_TYPES.contains(&any.type_url.as_str()) {
        let typed = TypedStruct::decode(any.value.as_slice())
            .map_err(|e| format!("{at}: undecodable TypedStruct: {e}"))?;
        return Ok(typed.type_url);
    }
    Ok(any.type_url.clone())
}

/// A cluster's upstream network filter: only Istio's metadata exchange
/// (as its own type or in a `TypedStruct`), which Weir does not need:
/// peers learn each other's workload from HBONE's `baggage` and the
/// verified identity, not from an exchange inside the connection.
fn upstream_network_filter(filter: &cluster_pb::Filter, at: &str) -> Result<(), String> {
    const METADATA_EXCHANGE_TYPE: &str =
        "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange";
    let cluster_pb::Filter {
        name,
        typed_config,
        config_discovery,
    } = filter;
    if config_discovery.is_some() {
        return Err(format!("unsupported field {at}.config_discovery"));
    }
    let Some(any) = typed_config else {
        return Err(format!(
            "unsupported field {at} ({name:?}): no typed_config"
        ));
    };
    let kind = configured_type(any, &format!("{at}.typed_config"))?;
    if kind != METADATA_EXCHANGE_TYPE {
        return Err(format!(
            "unsupported field {at} ({name:?}, {kind}): only Istio's metadata exchange"
        ));
    }
    Ok(())
}

/// `upstream_bind_config` as istiod writes it for a sidecar's inbound and
/// passthrough clusters: a loopback source (127.0.0.6, ::6) that only
/// marks the sidecar's own connections for its iptables rules. Weir has
/// no such rules and connects from the address its data path chooses, so
/// that is accepted and unused; any other source address would change
/// who the endpoint sees, and is refused.
#[allow(deprecated)]
fn sidecar_bind_config(bind: &core_pb::BindConfig) -> Result<(), String> {
    let core_pb::BindConfig {
        source_address,
        freebind,
        socket_options,
        extra_source_addresses,
        additional_source_addresses,
        local_address_selector,
        // Only with network_namespace_filepath addresses, which are refused.
        validate_network_namespaces: _,
    } = bind;
    const AT: &str = "upstream_bind_config.";
    reject(
        AT,
        &[
            ("freebind", freebind.is_some()),
            ("socket_options", !socket_options.is_empty()),
            (
                "additional_source_addresses",
                !additional_source_addresses.is_empty(),
            ),
            ("local_address_selector", local_address_selector.is_some()),
        ],
    )?;
    let loopback = |address: &core_pb::SocketAddress, at: &str| {
        let ip: IpAddr = address
            .address
            .parse()
            .map_err(|_| format!("{AT}{at} {:?}: not an IP address", address.address))?;
        // istiod's ::6 is written as an IPv6 address outside ::1/128.
        let marker =
            ip.is_loopback() || ip == IpAddr::from(std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6));
        if marker {
            Ok(())
        } else {
            Err(format!(
                "unsupported field {AT}{at} {ip}: only a sidecar's loopback marker (127.0.0.6, ::6)"
            ))
        }
    };
    if let Some(address) = source_address {
        loopback(address, "source_address")?;
    }
    for (index, extra) in extra_source_addresses.iter().enumerate() {
        let core_pb::ExtraSourceAddress {
            address,
            socket_options,
        } = extra;
        let at = format!("extra_source_addresses[{index}]");
        reject(
            &format!("{AT}{at}."),
            &[("socket_options", socket_options.is_some())],
        )?;
        match address {
            Some(address) => loopback(address, &format!("{at}.address"))?,
            None => return Err(format!("{AT}{at}.address: required")),
        }
    }
    Ok(())
}

fn endpoints(
    name: &str,
    discovery: Option<&cluster_pb::cluster::ClusterDiscoveryType>,
    eds: Option<&cluster_pb::cluster::EdsClusterConfig>,
    load_assignment: Option<&endpoint_pb::ClusterLoadAssignment>,
    metadata: Option<&core_pb::Metadata>,
    dns: DnsSettings,
    original_dst_lb_config: Option<&cluster_pb::cluster::OriginalDstLbConfig>,
) -> Result<ClusterEndpoints, String> {
    use cluster_pb::cluster::{ClusterDiscoveryType, DiscoveryType};
    let dns_kind = match discovery {
        Some(ClusterDiscoveryType::Type(kind)) if *kind == DiscoveryType::StrictDns as i32 => {
            Some(false)
        }
        Some(ClusterDiscoveryType::Type(kind)) if *kind == DiscoveryType::LogicalDns as i32 => {
            Some(true)
        }
        _ => None,
    };
    if let (Some(logical), Some(assignment)) = (dns_kind, load_assignment)
        && !assignment.endpoints.is_empty()
    {
        let targets = assignment_targets(assignment, "load_assignment.", true)?
            .into_iter()
            .map(|(target, priority, locality)| match target {
                Target::Ip(address) => Ok(DnsTarget {
                    host: address.ip().to_string(),
                    port: address.port(),
                    priority,
                    locality,
                }),
                Target::Name(host, port) => Ok(DnsTarget {
                    host,
                    port,
                    priority,
                    locality,
                }),
                Target::Original => Err(ORIGINAL_ONLY.to_string()),
            })
            .collect::<Result<Vec<_>, String>>()?;
        if logical && targets.len() != 1 {
            return Err("load_assignment: a LOGICAL_DNS cluster has exactly one endpoint".into());
        }
        return Ok(ClusterEndpoints::Dns(DnsCluster {
            targets,
            logical,
            refresh: dns.refresh,
            family: dns.family,
        }));
    }
    match discovery {
        None => {}
        Some(ClusterDiscoveryType::Type(kind)) => match DiscoveryType::try_from(*kind) {
            Ok(DiscoveryType::Eds) => {
                // Where the assignment comes from (`eds_config`: ADS for
                // istiod) is the one stream Weir has; only the name counts.
                let service_name = eds
                    .map(|eds| eds.service_name.as_str())
                    .filter(|service_name| !service_name.is_empty())
                    .unwrap_or(name);
                return Ok(ClusterEndpoints::Eds(service_name.to_string()));
            }
            Ok(DiscoveryType::Static | DiscoveryType::StrictDns | DiscoveryType::LogicalDns) => {}
            Ok(DiscoveryType::OriginalDst) => {
                return original_dst(original_dst_lb_config).map(ClusterEndpoints::OriginalDst);
            }
            Err(_) => return Err(format!("type: unknown {kind}")),
        },
        Some(ClusterDiscoveryType::ClusterType(_)) => {
            return Err("unsupported field cluster_type".into());
        }
    }
    if let Some(assignment) = load_assignment
        && !assignment.endpoints.is_empty()
    {
        // A waypoint's `encap`: its one endpoint is the internal listener
        // that tunnels to where the client was going.
        if let [(Target::Original, _, _)] =
            assignment_targets(assignment, "load_assignment.", false)?.as_slice()
        {
            return Ok(ClusterEndpoints::OriginalDst(OriginalDst {
                header: None,
                port: None,
            }));
        }
        return static_endpoints(assignment, "load_assignment.").map(ClusterEndpoints::Static);
    }
    let explicitly_static = matches!(
        discovery,
        Some(ClusterDiscoveryType::Type(kind)) if *kind == DiscoveryType::Static as i32
    );
    let Some((hostname, port, _)) = istio_cluster_name(name) else {
        // A STATIC cluster with no endpoints, as Envoy takes it (istiod's
        // BlackHoleCluster): every request to it gets 503 `UH`.
        if explicitly_static {
            return Ok(ClusterEndpoints::Static(Vec::new()));
        }
        return Err(format!(
            "cluster {name} has no endpoints: give load_assignment, type EDS, or an Istio outbound|port|subset|host name"
        ));
    };
    let subset = subset_labels(metadata)?;
    // istiod names a subset and sends its endpoints over EDS; without EDS
    // or Weir's labels, every endpoint of the service would get the
    // subset's traffic.
    if subset.is_empty() && named_subset(metadata).is_some() {
        return Err(format!(
            "metadata.filter_metadata[\"istio\"].subset {:?}: a subset cluster needs type EDS (its endpoints) or subset_labels",
            named_subset(metadata).unwrap_or_default()
        ));
    }
    Ok(ClusterEndpoints::Service {
        hostname: hostname.to_string(),
        port,
        subset,
    })
}

/// `metadata.filter_metadata["istio"].subset`: the subset istiod names.
fn named_subset(metadata: Option<&core_pb::Metadata>) -> Option<&str> {
    use protobuf::value::Kind;
    match &metadata?
        .filter_metadata
        .get("istio")?
        .fields
        .get("subset")?
        .kind
    {
        Some(Kind::StringValue(subset)) if !subset.is_empty() => Some(subset),
        _ => None,
    }
}

/// `metadata.filter_metadata["istio"].subset_labels`, sorted.
fn subset_labels(metadata: Option<&core_pb::Metadata>) -> Result<Vec<(String, String)>, String> {
    use protobuf::value::Kind;
    const AT: &str = "metadata.filter_metadata[\"istio\"].subset_labels";
    let labels = metadata
        .and_then(|metadata| metadata.filter_metadata.get("istio"))
        .and_then(|istio| istio.fields.get("subset_labels"));
    let Some(labels) = labels else {
        return Ok(Vec::new());
    };
    let Some(Kind::StructValue(labels)) = &labels.kind else {
        return Err(format!("{AT}: a struct of strings"));
    };
    let mut pairs = labels
        .fields
        .iter()
        .map(|(key, value)| match &value.kind {
            Some(Kind::StringValue(text)) => Ok((key.clone(), text.clone())),
            _ => Err(format!("{AT}.{key}: a string")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    pairs.sort();
    Ok(pairs)
}

/// The endpoints of `assignment` that Envoy would send to, with their
/// priorities; `prefix` names where it is (`load_assignment.` in a
/// cluster, nothing for EDS).
fn static_endpoints(
    assignment: &endpoint_pb::ClusterLoadAssignment,
    prefix: &str,
) -> Result<Vec<LbAddress>, String> {
    assignment_targets(assignment, prefix, false)?
        .into_iter()
        .map(|(target, priority, locality)| match target {
            Target::Ip(address) => Ok(LbAddress {
                address,
                priority,
                locality,
            }),
            Target::Name(host, _) => Err(format!(
                "{prefix}endpoints: {host:?}: an IP address (hostnames are resolved only for STRICT_DNS and LOGICAL_DNS clusters)"
            )),
            Target::Original => Err(format!("{prefix}endpoints: {ORIGINAL_ONLY}")),
        })
        .collect()
}

/// An ORIGINAL_DST cluster's `original_dst_lb_config`.
fn original_dst(
    config: Option<&cluster_pb::cluster::OriginalDstLbConfig>,
) -> Result<OriginalDst, String> {
    const AT: &str = "original_dst_lb_config.";
    let Some(config) = config else {
        return Ok(OriginalDst {
            header: None,
            port: None,
        });
    };
    let cluster_pb::cluster::OriginalDstLbConfig {
        use_http_header,
        http_header_name,
        upstream_port_override,
        metadata_key,
    } = config;
    if let Some(key) = metadata_key {
        return waypoint_originator(key, upstream_port_override.as_ref().map(|p| p.value));
    }
    let header = use_http_header
        .then(|| {
            let name = if http_header_name.is_empty() {
                "x-envoy-original-dst-host"
            } else {
                http_header_name.as_str()
            };
            header_name(name, &format!("{AT}http_header_name"))
        })
        .transpose()?;
    let port = upstream_port_override
        .as_ref()
        .map(|port| {
            u16::try_from(port.value)
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| format!("{AT}upstream_port_override {}: not a port", port.value))
        })
        .transpose()?;
    Ok(OriginalDst { header, port })
}

/// The cluster behind a waypoint's `connect_originate` listener
/// (`ORIGINAL_DST` by the original-destination listener filter's metadata,
/// to port 15008 over mTLS): it carries each connection in an HBONE tunnel
/// to where it was going. The metadata holds the address the client
/// dialled, which Weir has as the connection's original destination, and
/// Weir's upstream connections to meshed workloads are HBONE to their
/// port 15008 already; so this is `ORIGINAL_DST` to the dialled address.
/// Other metadata, or another port (not HBONE), is refused.
fn waypoint_originator(
    key: &pb::envoy::r#type::metadata::v3::MetadataKey,
    port_override: Option<u32>,
) -> Result<OriginalDst, String> {
    const AT: &str = "original_dst_lb_config.";
    const ORIGINAL_DST_FILTER: &str = "envoy.filters.listener.original_dst";
    if key.key != ORIGINAL_DST_FILTER || key.path.len() != 1 {
        return Err(format!(
            "{AT}metadata_key {:?}: only {ORIGINAL_DST_FILTER}'s (a waypoint's connect_originate)",
            key.key
        ));
    }
    if port_override.is_some_and(|port| port != 15008) {
        return Err(format!(
            "{AT}upstream_port_override with metadata_key: only 15008 (HBONE)"
        ));
    }
    Ok(OriginalDst {
        header: None,
        port: None,
    })
}

/// How a DNS cluster resolves its names.
#[derive(Clone, Copy)]
struct DnsSettings {
    refresh: Duration,
    family: DnsFamily,
}

/// An endpoint's address: an IP address, or a name for a DNS cluster.
enum Target {
    Ip(SocketAddr),
    Name(String, u16),
    /// The internal listener `connect_originate` with no `endpoint_id`:
    /// wherever the client was going (a waypoint's `encap` cluster).
    Original,
}

/// Why [`Target::Original`] is refused anywhere but alone in a STATIC
/// cluster.
const ORIGINAL_ONLY: &str = "an envoy_internal_address to connect_originate without endpoint_id (the original destination) is supported only as a STATIC cluster's one endpoint";

/// An assignment's endpoint, its priority, and its locality with that
/// locality's weight (see [`LbAddress::locality`]).
type Placed = (Target, u32, Option<(u32, u32)>);

/// The endpoints of `assignment` Envoy would use, as written (`names`:
/// hostnames allowed, for DNS clusters), with their priority and, when
/// the assignment weighs its localities, their locality and its weight.
fn assignment_targets(
    assignment: &endpoint_pb::ClusterLoadAssignment,
    prefix: &str,
    names: bool,
) -> Result<Vec<Placed>, String> {
    use core_pb::HealthStatus;
    let endpoint_pb::ClusterLoadAssignment {
        // The cluster's own name applies.
        cluster_name: _,
        endpoints,
        // Only referenced by `endpoint_name`, which is rejected.
        named_endpoints: _,
        policy,
    } = assignment;
    if let Some(policy) = policy
        && !policy.drop_overloads.is_empty()
    {
        return Err(format!("unsupported field {prefix}policy.drop_overloads"));
    }
    let mut addresses = Vec::new();
    let mut weights = HashSet::new();
    // Locality weights matter (to a cluster with
    // `locality_weighted_lb_config`) once any locality has one; a
    // locality without one then gets nothing, as in Envoy.
    let weighted = endpoints
        .iter()
        .any(|locality| locality.load_balancing_weight.is_some());
    for (index, locality) in endpoints.iter().enumerate() {
        let at = format!("{prefix}endpoints[{index}]");
        let endpoint_pb::LocalityLbEndpoints {
            // Where the endpoints are: the balancer does not prefer any.
            locality: _,
            metadata: _,
            load_balancing_weight,
            proximity: _,
            lb_config: _,
            lb_endpoints,
            priority,
        } = locality;
        let locality_index = u32::try_from(index).unwrap_or(u32::MAX);
        let locality_weight = weighted.then(|| {
            (
                locality_index,
                load_balancing_weight
                    .as_ref()
                    .map_or(0, |weight| weight.value),
            )
        });
        for (index, lb_endpoint) in lb_endpoints.iter().enumerate() {
            let at = format!("{at}.lb_endpoints[{index}]");
            let endpoint_pb::LbEndpoint {
                health_status,
                metadata: _,
                load_balancing_weight,
                host_identifier,
            } = lb_endpoint;
            weights.insert(load_balancing_weight.as_ref().map_or(1, |w| w.value));
            let endpoint = match host_identifier {
                Some(endpoint_pb::lb_endpoint::HostIdentifier::Endpoint(endpoint)) => endpoint,
                Some(endpoint_pb::lb_endpoint::HostIdentifier::EndpointName(_)) => {
                    return Err(format!("unsupported field {at}.endpoint_name"));
                }
                None => return Err(format!("{at}: no endpoint")),
            };
            let address = endpoint_address(endpoint, &format!("{at}.endpoint"), names)?;
            // Envoy sends nothing to these.
            if matches!(
                HealthStatus::try_from(*health_status),
                Ok(HealthStatus::Unhealthy | HealthStatus::Draining | HealthStatus::Timeout)
            ) {
                continue;
            }
            addresses.push((address, *priority, locality_weight));
        }
    }
    if weights.len() > 1 {
        return Err(format!(
            "{prefix}endpoints: endpoints of different load_balancing_weight are not supported"
        ));
    }
    Ok(addresses)
}

fn endpoint_address(
    endpoint: &endpoint_pb::Endpoint,
    at: &str,
    names: bool,
) -> Result<Target, String> {
    use core_pb::{address::Address, socket_address::PortSpecifier};
    let endpoint_pb::Endpoint {
        address,
        // Health checks are rejected; the hostname only serves
        // auto_host_rewrite, also rejected.
        health_check_config: _,
        hostname: _,
        observability_name: _,
        additional_addresses,
    } = endpoint;
    reject(
        &format!("{at}."),
        &[("additional_addresses", !additional_addresses.is_empty())],
    )?;
    let socket = match address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(Address::SocketAddress(socket)) => socket,
        Some(Address::Pipe(_)) => return Err(format!("unsupported field {at}.address.pipe")),
        Some(Address::EnvoyInternalAddress(internal)) => {
            return internal_endpoint(internal, &format!("{at}.address.envoy_internal_address"));
        }
        None => return Err(format!("{at}.address: required")),
    };
    let core_pb::SocketAddress {
        protocol,
        address,
        resolver_name,
        ipv4_compat: _,
        network_namespace_filepath,
        port_specifier,
    } = socket;
    let at = format!("{at}.address.socket_address");
    reject(
        &format!("{at}."),
        &[
            (
                "protocol",
                *protocol != core_pb::socket_address::Protocol::Tcp as i32,
            ),
            ("resolver_name", !resolver_name.is_empty()),
            (
                "network_namespace_filepath",
                !network_namespace_filepath.is_empty(),
            ),
        ],
    )?;
    let port = match port_specifier {
        Some(PortSpecifier::PortValue(port)) => u16::try_from(*port)
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| format!("{at}.port_value {port}: not a port"))?,
        Some(PortSpecifier::NamedPort(_)) => {
            return Err(format!("unsupported field {at}.named_port"));
        }
        None => return Err(format!("{at}.port_value: required")),
    };
    match address.parse::<IpAddr>() {
        Ok(ip) => Ok(Target::Ip(SocketAddr::new(ip, port))),
        Err(_) if names && is_hostname(address) => Ok(Target::Name(address.clone(), port)),
        Err(_) => Err(format!(
            "{at}.address {address:?}: an IP address (hostnames are resolved only for STRICT_DNS and LOGICAL_DNS clusters)"
        )),
    }
}

/// A DNS name as a resolver takes it: dot-separated labels of letters,
/// digits, `-` and `_`.
fn is_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `common_lb_config`: the panic threshold it sets, if any.
fn common_lb(config: &cluster_pb::cluster::CommonLbConfig) -> Result<Option<f64>, String> {
    use cluster_pb::cluster::common_lb_config::LocalityConfigSpecifier;
    const AT: &str = "common_lb_config.";
    let cluster_pb::cluster::CommonLbConfig {
        healthy_panic_threshold,
        // Batching of host-set updates: each update applies at once.
        update_merge_window: _,
        // Only with active health checks, which are refused.
        ignore_new_hosts_until_first_hc: _,
        close_connections_on_host_set_change,
        consistent_hashing_lb_config,
        // Only read by stateful sessions, which are refused on routes.
        override_host_status: _,
        locality_config_specifier,
    } = config;
    reject(
        AT,
        &[
            (
                "close_connections_on_host_set_change",
                *close_connections_on_host_set_change,
            ),
            (
                "consistent_hashing_lb_config",
                consistent_hashing_lb_config
                    .as_ref()
                    .is_some_and(|hashing| {
                        hashing.use_hostname_for_hashing || hashing.hash_balance_factor.is_some()
                    }),
            ),
            (
                "zone_aware_lb_config",
                matches!(
                    locality_config_specifier,
                    Some(LocalityConfigSpecifier::ZoneAwareLbConfig(_))
                ),
            ),
        ],
    )?;
    // `locality_weighted_lb_config`: read by `convert_cluster`.
    let Some(threshold) = healthy_panic_threshold else {
        return Ok(None);
    };
    if !(0.0..=100.0).contains(&threshold.value) {
        return Err(format!("{AT}healthy_panic_threshold: 0 to 100"));
    }
    Ok(Some(threshold.value))
}

/// Connection-pool settings from a cluster's fields (`max_requests`: the
/// deprecated cluster-level `max_requests_per_connection`).
fn pool_settings(
    max_requests: Option<u32>,
    common: Option<&core_pb::HttpProtocolOptions>,
    connection: Option<&cluster_pb::UpstreamConnectionOptions>,
    at: &str,
) -> Result<PoolSettings, String> {
    let mut pool = PoolSettings {
        max_requests_per_connection: max_requests.filter(|n| *n > 0),
        ..PoolSettings::default()
    };
    if let Some(common) = common {
        let core_pb::HttpProtocolOptions {
            idle_timeout,
            max_connection_duration,
            max_connection_duration_jitter,
            // Header limits: the proxy keeps its own (60 KiB, 100 fields).
            max_headers_count: _,
            max_response_headers_kb: _,
            max_stream_duration,
            headers_with_underscores_action,
            max_requests_per_connection,
        } = common;
        let at = format!("{at}common_http_protocol_options.");
        reject(
            &at,
            &[
                (
                    "max_connection_duration_jitter",
                    max_connection_duration_jitter.is_some(),
                ),
                ("max_stream_duration", is_nonzero(max_stream_duration)),
                (
                    "headers_with_underscores_action",
                    *headers_with_underscores_action != 0,
                ),
            ],
        )?;
        if let Some(idle) = idle_timeout {
            pool.idle_timeout = Some(duration(idle, &format!("{at}idle_timeout"))?);
        }
        // 0 (or unset): connections have no maximum age.
        if let Some(max) = max_connection_duration {
            let max = duration(max, &format!("{at}max_connection_duration"))?;
            pool.max_connection_duration = (!max.is_zero()).then_some(max);
        }
        if let Some(max) = max_requests_per_connection.as_ref().filter(|n| n.value > 0) {
            pool.max_requests_per_connection = Some(max.value);
        }
    }
    if let Some(connection) = connection {
        let cluster_pb::UpstreamConnectionOptions {
            tcp_keepalive,
            // An interface name for stats: nothing to do.
            set_local_interface_name_on_upstream_connections: _,
            happy_eyeballs_config,
        } = connection;
        reject(
            &format!("{at}upstream_connection_options."),
            &[("happy_eyeballs_config", happy_eyeballs_config.is_some())],
        )?;
        if let Some(keepalive) = tcp_keepalive {
            let seconds = |value: Option<u32>| value.map(|s| Duration::from_secs(u64::from(s)));
            pool.tcp_keepalive = Some(TcpKeepalive {
                probes: keepalive.keepalive_probes.as_ref().map(|n| n.value),
                time: seconds(keepalive.keepalive_time.as_ref().map(|n| n.value)),
                interval: seconds(keepalive.keepalive_interval.as_ref().map(|n| n.value)),
            });
        }
    }
    Ok(pool)
}

/// A waypoint's endpoint as istiod writes it: Envoy's internal listener
/// `connect_originate`, which opens an HBONE tunnel to `endpoint_id`
/// (`ip:port`), or with no id (the `encap` cluster) to the original
/// destination the waypoint's listener recorded. Weir's upstream
/// connections to meshed workloads are HBONE already, so the endpoint is
/// that address.
fn internal_endpoint(internal: &core_pb::EnvoyInternalAddress, at: &str) -> Result<Target, String> {
    use core_pb::envoy_internal_address::AddressNameSpecifier;
    let core_pb::EnvoyInternalAddress {
        endpoint_id,
        address_name_specifier,
    } = internal;
    match address_name_specifier {
        Some(AddressNameSpecifier::ServerListenerName(listener))
            if listener == CONNECT_ORIGINATE => {}
        Some(AddressNameSpecifier::ServerListenerName(listener)) => {
            return Err(format!(
                "{at}.server_listener_name {listener:?}: only {CONNECT_ORIGINATE}"
            ));
        }
        None => return Err(format!("{at}.server_listener_name: required")),
    }
    if endpoint_id.is_empty() {
        return Ok(Target::Original);
    }
    endpoint_id.parse().map(Target::Ip).map_err(|_| {
        format!("{at}.endpoint_id {endpoint_id:?}: an ip:port for {CONNECT_ORIGINATE}")
    })
}

/// The internal listener of Istio's waypoint that opens HBONE tunnels.
const CONNECT_ORIGINATE: &str = "connect_originate";

/// Round robin's or least request's `slow_start_config` (another
/// policy's config is ignored, as Envoy does).
fn slow_start(
    policy: i32,
    config: Option<&cluster_pb::cluster::LbConfig>,
) -> Result<Option<SlowStart>, String> {
    use cluster_pb::cluster::{LbConfig, LbPolicy as Policy};
    let (slow_start, at) = match (Policy::try_from(policy), config) {
        (Ok(Policy::RoundRobin), Some(LbConfig::RoundRobinLbConfig(config))) => {
            (config.slow_start_config.as_ref(), "round_robin_lb_config")
        }
        (Ok(Policy::LeastRequest), Some(LbConfig::LeastRequestLbConfig(config))) => {
            (config.slow_start_config.as_ref(), "least_request_lb_config")
        }
        _ => (None, ""),
    };
    let Some(cluster_pb::cluster::SlowStartConfig {
        slow_start_window,
        aggression,
        min_weight_percent,
    }) = slow_start
    else {
        return Ok(None);
    };
    let at = format!("{at}.slow_start_config");
    let window = slow_start_window
        .as_ref()
        .map(|window| duration(window, &format!("{at}.slow_start_window")))
        .transpose()?
        .ok_or_else(|| format!("{at}.slow_start_window: required"))?;
    // The runtime key has no runtime to read: the default applies.
    let aggression = aggression.as_ref().map_or(1.0, |value| value.default_value);
    if !(aggression.is_finite() && aggression > 0.0) {
        return Err(format!("{at}.aggression {aggression}: above 0"));
    }
    let min_weight = min_weight_percent
        .as_ref()
        .map_or(10.0, |value| value.value);
    if !(0.0..=100.0).contains(&min_weight) {
        return Err(format!("{at}.min_weight_percent {min_weight}: 0 to 100"));
    }
    Ok(Some(SlowStart {
        window,
        aggression,
        min_weight: min_weight / 100.0,
    }))
}

fn lb_policy_of(
    policy: i32,
    config: Option<&cluster_pb::cluster::LbConfig>,
    original_dst: bool,
) -> Result<LbPolicy, String> {
    use cluster_pb::cluster::{LbConfig, LbPolicy as Policy};
    // An ORIGINAL_DST cluster's one endpoint per request needs no balancer
    // (Envoy requires CLUSTER_PROVIDED there).
    if original_dst {
        return match Policy::try_from(policy) {
            Ok(Policy::ClusterProvided) => Ok(LbPolicy::RoundRobin),
            _ => Err("lb_policy: CLUSTER_PROVIDED for an ORIGINAL_DST cluster".into()),
        };
    }
    // A config for another policy is ignored, as Envoy does.
    Ok(match Policy::try_from(policy) {
        Ok(Policy::RoundRobin) => {
            // `slow_start_config`: see `slow_start`.
            LbPolicy::RoundRobin
        }
        Ok(Policy::LeastRequest) => {
            let mut choice_count = 2;
            if let Some(LbConfig::LeastRequestLbConfig(config)) = config {
                let cluster_pb::cluster::LeastRequestLbConfig {
                    choice_count: count,
                    // Only biases weighted endpoints, which are rejected.
                    active_request_bias: _,
                    // See `slow_start`.
                    slow_start_config: _,
                } = config;
                choice_count = count.as_ref().map_or(2, |count| count.value);
            }
            if choice_count < 2 {
                return Err("least_request_lb_config.choice_count: at least 2".into());
            }
            LbPolicy::LeastRequest { choice_count }
        }
        Ok(Policy::Random) => LbPolicy::Random,
        Ok(Policy::Maglev) => {
            let mut table_size = MAGLEV_TABLE_SIZE;
            // Another policy's config does not apply, as in Envoy.
            if let Some(LbConfig::MaglevLbConfig(config)) = config {
                let cluster_pb::cluster::MaglevLbConfig { table_size: size } = config;
                if let Some(size) = size {
                    table_size = size.value;
                }
            }
            // Envoy requires a prime below 5000011.
            if !(2..5_000_011).contains(&table_size) || !is_prime(table_size) {
                return Err(format!(
                    "maglev_lb_config.table_size {table_size}: a prime below 5000011"
                ));
            }
            LbPolicy::Maglev { table_size }
        }
        Ok(Policy::RingHash) => {
            let mut minimum_ring_size = 1024;
            if let Some(LbConfig::RingHashLbConfig(config)) = config {
                let cluster_pb::cluster::RingHashLbConfig {
                    minimum_ring_size: minimum,
                    // The hash function and the ring's upper bound are the
                    // balancer's business.
                    hash_function: _,
                    maximum_ring_size: _,
                } = config;
                minimum_ring_size = minimum.as_ref().map_or(1024, |minimum| minimum.value);
            }
            if !(1..=8_388_608).contains(&minimum_ring_size) {
                return Err("ring_hash_lb_config.minimum_ring_size: 1 to 8388608".into());
            }
            LbPolicy::RingHash { minimum_ring_size }
        }
        Ok(Policy::ClusterProvided | Policy::LoadBalancingPolicyConfig) | Err(_) => {
            return Err(format!("lb_policy {policy} is not supported"));
        }
    })
}

/// Envoy's default Maglev table size.
const MAGLEV_TABLE_SIZE: u64 = 65537;

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

fn thresholds(breakers: Option<&cluster_pb::CircuitBreakers>) -> Result<Thresholds, String> {
    use cluster_pb::circuit_breakers::thresholds::RetryBudget as RetryBudgetPb;
    let mut limits = Thresholds::default();
    let Some(cluster_pb::CircuitBreakers {
        thresholds,
        per_host_thresholds,
    }) = breakers
    else {
        return Ok(limits);
    };
    reject(
        "circuit_breakers.",
        &[("per_host_thresholds", !per_host_thresholds.is_empty())],
    )?;
    let default = thresholds
        .iter()
        .enumerate()
        .find(|(_, t)| t.priority == core_pb::RoutingPriority::Default as i32);
    let Some((index, threshold)) = default else {
        return Ok(limits);
    };
    let at = format!("circuit_breakers.thresholds[{index}]");
    let cluster_pb::circuit_breakers::Thresholds {
        priority: _,
        max_connections,
        max_pending_requests,
        max_requests,
        max_retries,
        retry_budget,
        // Stats only.
        track_remaining: _,
        max_connection_pools,
    } = threshold;
    reject(
        &format!("{at}."),
        &[("max_connection_pools", max_connection_pools.is_some())],
    )?;
    let or = |value: &Option<protobuf::UInt32Value>, default: u32| {
        value.as_ref().map_or(default, |value| value.value)
    };
    limits.max_connections = or(max_connections, limits.max_connections);
    limits.max_pending_requests = or(max_pending_requests, limits.max_pending_requests);
    limits.max_requests = or(max_requests, limits.max_requests);
    limits.max_retries = or(max_retries, limits.max_retries);
    if let Some(RetryBudgetPb {
        budget_percent,
        budget_interval,
        min_retry_concurrency,
    }) = retry_budget
    {
        reject(
            &format!("{at}.retry_budget."),
            &[("budget_interval", budget_interval.is_some())],
        )?;
        let budget_percent = budget_percent
            .as_ref()
            .map_or(20.0, |percent| percent.value);
        if !(0.0..=100.0).contains(&budget_percent) {
            return Err(format!(
                "{at}.retry_budget.budget_percent {budget_percent}: 0 to 100"
            ));
        }
        limits.retry_budget = Some(RetryBudget {
            budget_percent,
            min_retry_concurrency: or(min_retry_concurrency, 3),
        });
    }
    Ok(limits)
}

/// See [`convert_cluster`] for which detectors run.
fn outlier(detection: &cluster_pb::OutlierDetection) -> Result<OutlierDetection, String> {
    let cluster_pb::OutlierDetection {
        consecutive_5xx,
        interval,
        base_ejection_time,
        max_ejection_percent,
        enforcing_consecutive_5xx,
        enforcing_success_rate,
        success_rate_minimum_hosts,
        success_rate_request_volume,
        success_rate_stdev_factor,
        consecutive_gateway_failure,
        enforcing_consecutive_gateway_failure,
        split_external_local_origin_errors,
        consecutive_local_origin_failure,
        enforcing_consecutive_local_origin_failure,
        enforcing_local_origin_success_rate,
        failure_percentage_threshold,
        enforcing_failure_percentage,
        enforcing_failure_percentage_local_origin,
        failure_percentage_minimum_hosts,
        failure_percentage_request_volume,
        max_ejection_time,
        max_ejection_time_jitter,
        // Health checks are rejected.
        successful_active_health_check_uneject_host: _,
        monitors,
        always_eject_one_host,
        detect_degraded_hosts,
    } = detection;
    let set = |value: &Option<protobuf::UInt32Value>| value.is_some();
    let nonzero =
        |value: &Option<protobuf::UInt32Value>| value.as_ref().is_some_and(|v| v.value != 0);
    let flag = |value: &Option<protobuf::BoolValue>| value.as_ref().is_some_and(|v| v.value);
    reject(
        "outlier_detection.",
        &[
            ("enforcing_success_rate", nonzero(enforcing_success_rate)),
            (
                "success_rate_minimum_hosts",
                set(success_rate_minimum_hosts),
            ),
            (
                "success_rate_request_volume",
                set(success_rate_request_volume),
            ),
            ("success_rate_stdev_factor", set(success_rate_stdev_factor)),
            (
                "enforcing_local_origin_success_rate",
                nonzero(enforcing_local_origin_success_rate),
            ),
            (
                "failure_percentage_threshold",
                set(failure_percentage_threshold),
            ),
            (
                "enforcing_failure_percentage",
                nonzero(enforcing_failure_percentage),
            ),
            (
                "enforcing_failure_percentage_local_origin",
                nonzero(enforcing_failure_percentage_local_origin),
            ),
            (
                "failure_percentage_minimum_hosts",
                set(failure_percentage_minimum_hosts),
            ),
            (
                "failure_percentage_request_volume",
                set(failure_percentage_request_volume),
            ),
            ("max_ejection_time", max_ejection_time.is_some()),
            (
                "max_ejection_time_jitter",
                max_ejection_time_jitter.is_some(),
            ),
            ("monitors", !monitors.is_empty()),
            ("always_eject_one_host", flag(always_eject_one_host)),
            ("detect_degraded_hosts", flag(detect_degraded_hosts)),
        ],
    )?;
    // Enforcement is all (100) or nothing (0).
    let enforced = |value: &Option<protobuf::UInt32Value>, default: bool, at: &str| match value {
        None => Ok(default),
        Some(value) if value.value == 0 => Ok(false),
        Some(value) if value.value == 100 => Ok(true),
        Some(value) => Err(format!(
            "outlier_detection.{at} {}: only 0 or 100 is supported",
            value.value
        )),
    };
    let five_xx = enforced(enforcing_consecutive_5xx, true, "enforcing_consecutive_5xx")?;
    let gateway = enforced(
        enforcing_consecutive_gateway_failure,
        consecutive_gateway_failure.is_some(),
        "enforcing_consecutive_gateway_failure",
    )?;
    let threshold = |value: &Option<protobuf::UInt32Value>, on: bool| {
        if on {
            value.as_ref().map_or(5, |value| value.value)
        } else {
            0
        }
    };
    let positive = |value: &Option<protobuf::Duration>, default: u64, at: &str| {
        let value = value
            .as_ref()
            .map(|value| duration(value, &format!("outlier_detection.{at}")))
            .transpose()?
            .unwrap_or(Duration::from_secs(default));
        if value.is_zero() {
            return Err(format!("outlier_detection.{at}: above 0"));
        }
        Ok(value)
    };
    let max_ejection_percent = max_ejection_percent
        .as_ref()
        .map_or(10, |value| value.value);
    if max_ejection_percent > 100 {
        return Err(format!(
            "outlier_detection.max_ejection_percent {max_ejection_percent}: at most 100"
        ));
    }
    Ok(OutlierDetection {
        consecutive_5xx: threshold(consecutive_5xx, five_xx),
        consecutive_gateway_failure: threshold(consecutive_gateway_failure, gateway),
        interval: positive(interval, 10, "interval")?,
        base_ejection_time: positive(base_ejection_time, 30, "base_ejection_time")?,
        max_ejection_percent,
        // Envoy reads the local-origin detector only when local failures
        // are counted apart.
        consecutive_local_origin_failure: if *split_external_local_origin_errors {
            let on = enforced(
                enforcing_consecutive_local_origin_failure,
                true,
                "enforcing_consecutive_local_origin_failure",
            )?;
            Some(threshold(consecutive_local_origin_failure, on))
        } else {
            None
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use core_pb::header_value_option::HeaderAppendAction;
    use route_pb::{
        header_matcher::HeaderMatchSpecifier, route::Action, route_action::ClusterSpecifier,
        route_match::PathSpecifier,
    };

    fn prefix(path: &str) -> Option<route_pb::RouteMatch> {
        Some(route_pb::RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix(path.into())),
            ..Default::default()
        })
    }

    fn to_cluster(name: &str) -> Option<Action> {
        Some(Action::Route(route_pb::RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster(name.into())),
            ..Default::default()
        }))
    }

    fn config_with(route: route_pb::Route) -> route_pb::RouteConfiguration {
        route_pb::RouteConfiguration {
            name: "reviews.default.svc.cluster.local".into(),
            virtual_hosts: vec![route_pb::VirtualHost {
                name: "vh".into(),
                domains: vec!["*".into()],
                routes: vec![route],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn simple_route() -> route_pb::Route {
        route_pb::Route {
            name: "r1".into(),
            r#match: prefix("/"),
            action: to_cluster("backend"),
            ..Default::default()
        }
    }

    /// Through the wire: encode, then decode and convert.
    fn convert(route: route_pb::Route) -> Result<Route, String> {
        let config = route_configuration(&config_with(route).encode_to_vec())?;
        Ok(config.virtual_hosts[0].routes[0].clone())
    }

    fn forward(route: &Route) -> &ForwardAction {
        match &route.action {
            RouteAction::Forward(forward) => forward,
            other => panic!("not a forward: {other:?}"),
        }
    }

    fn header(key: &str, value: &str, action: HeaderAppendAction) -> core_pb::HeaderValueOption {
        core_pb::HeaderValueOption {
            header: Some(core_pb::HeaderValue {
                key: key.into(),
                value: value.into(),
                raw_value: Vec::new(),
            }),
            append_action: action as i32,
            ..Default::default()
        }
    }

    fn regex_matcher(regex: &str) -> matcher_pb::RegexMatcher {
        matcher_pb::RegexMatcher {
            regex: regex.into(),
            engine_type: None,
        }
    }

    fn percent(numerator: u32) -> Option<type_pb::FractionalPercent> {
        Some(type_pb::FractionalPercent {
            numerator,
            denominator: type_pb::fractional_percent::DenominatorType::Hundred as i32,
        })
    }

    #[test]
    fn a_plain_route_converts_with_envoy_defaults() {
        let route = convert(simple_route()).expect("converts");
        assert_eq!(route.name, "r1");
        assert!(matches!(&route.matcher.path, PathMatch::Prefix(p) if p == "/"));
        assert!(
            route.matcher.case_sensitive,
            "case_sensitive defaults to true"
        );
        let forward = forward(&route);
        assert_eq!(forward.clusters.len(), 1);
        assert_eq!(
            (
                forward.clusters[0].name.as_str(),
                forward.clusters[0].weight
            ),
            ("backend", 1)
        );
        assert_eq!(forward.timeout, None, "absent: Envoy's default");
        assert!(forward.retry_policy.is_none() && route.fault.is_none());
    }

    #[test]
    #[allow(deprecated)]
    fn match_forms_headers_and_query_parameters() {
        let mut route = simple_route();
        route.r#match = Some(route_pb::RouteMatch {
            path_specifier: Some(PathSpecifier::SafeRegex(regex_matcher("/users/[0-9]+"))),
            case_sensitive: Some(protobuf::BoolValue { value: false }),
            headers: vec![
                route_pb::HeaderMatcher {
                    name: "x-version".into(),
                    header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(
                        matcher_pb::StringMatcher {
                            ignore_case: true,
                            match_pattern: Some(matcher_pb::string_matcher::MatchPattern::Prefix(
                                "v2".into(),
                            )),
                        },
                    )),
                    ..Default::default()
                },
                route_pb::HeaderMatcher {
                    name: "x-legacy".into(),
                    header_match_specifier: Some(HeaderMatchSpecifier::ExactMatch("1".into())),
                    invert_match: true,
                    treat_missing_header_as_empty: true,
                },
                route_pb::HeaderMatcher {
                    name: "x-debug".into(),
                    header_match_specifier: Some(HeaderMatchSpecifier::PresentMatch(false)),
                    ..Default::default()
                },
                route_pb::HeaderMatcher {
                    name: ":authority".into(),
                    header_match_specifier: Some(HeaderMatchSpecifier::SuffixMatch(
                        ".example.com".into(),
                    )),
                    ..Default::default()
                },
            ],
            query_parameters: vec![
                route_pb::QueryParameterMatcher {
                    name: "debug".into(),
                    query_parameter_match_specifier: Some(
                        route_pb::query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(true),
                    ),
                },
                route_pb::QueryParameterMatcher {
                    name: "v".into(),
                    query_parameter_match_specifier: Some(
                        route_pb::query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
                            matcher_pb::StringMatcher {
                                ignore_case: false,
                                match_pattern: Some(
                                    matcher_pb::string_matcher::MatchPattern::SafeRegex(
                                        regex_matcher("[0-9]+"),
                                    ),
                                ),
                            },
                        ),
                    ),
                },
            ],
            grpc: Some(route_pb::route_match::GrpcRouteMatchOptions {}),
            ..Default::default()
        });
        let matcher = convert(route).expect("converts").matcher;
        assert!(matches!(&matcher.path, PathMatch::Regex(r) if r.0.as_str() == "/users/[0-9]+"));
        assert!(!matcher.case_sensitive && matcher.grpc);
        let [version, legacy, debug, authority] = &matcher.headers[..] else {
            panic!("{:?}", matcher.headers);
        };
        assert!(matches!(
            version.value,
            Some(StringMatcher { kind: StringMatch::Prefix(ref p), ignore_case: true }) if p == "v2"
        ));
        assert!(!version.invert);
        assert!(legacy.invert && legacy.missing_as_empty);
        assert!(
            matches!(legacy.value, Some(StringMatcher { kind: StringMatch::Exact(ref v), ignore_case: false }) if v == "1")
        );
        // present_match: false is "absent": presence, inverted.
        assert!(debug.value.is_none() && debug.invert);
        assert_eq!(authority.name, ":authority");
        assert!(matcher.query_parameters[0].value.is_none());
        assert!(matches!(
            matcher.query_parameters[1].value,
            Some(StringMatcher {
                kind: StringMatch::Regex(_),
                ..
            })
        ));
    }

    #[test]
    fn separated_prefix_and_exact_path() {
        let mut route = simple_route();
        route.r#match = Some(route_pb::RouteMatch {
            path_specifier: Some(PathSpecifier::PathSeparatedPrefix("/api".into())),
            ..Default::default()
        });
        assert!(
            matches!(convert(route.clone()).expect("converts").matcher.path, PathMatch::SeparatedPrefix(ref p) if p == "/api")
        );
        route.r#match = Some(route_pb::RouteMatch {
            path_specifier: Some(PathSpecifier::PathSeparatedPrefix("/api/".into())),
            ..Default::default()
        });
        assert!(
            convert(route.clone())
                .unwrap_err()
                .contains("path_separated_prefix")
        );
        route.r#match = Some(route_pb::RouteMatch {
            path_specifier: Some(PathSpecifier::Path("/exact".into())),
            ..Default::default()
        });
        assert!(
            matches!(convert(route).expect("converts").matcher.path, PathMatch::Exact(ref p) if p == "/exact")
        );
    }

    #[test]
    fn weighted_clusters_with_header_ops_and_the_action_settings() {
        use route_pb::route_action::{HashPolicy as HashPb, RequestMirrorPolicy, hash_policy};
        let mut route = simple_route();
        route.action = Some(Action::Route(route_pb::RouteAction {
            cluster_specifier: Some(ClusterSpecifier::WeightedClusters(
                route_pb::WeightedCluster {
                    clusters: vec![
                        route_pb::weighted_cluster::ClusterWeight {
                            name: "v1".into(),
                            weight: Some(protobuf::UInt32Value { value: 90 }),
                            request_headers_to_add: vec![header(
                                "x-subset",
                                "v1",
                                HeaderAppendAction::OverwriteIfExistsOrAdd,
                            )],
                            response_headers_to_remove: vec!["x-internal".into()],
                            ..Default::default()
                        },
                        route_pb::weighted_cluster::ClusterWeight {
                            name: "v2".into(),
                            weight: Some(protobuf::UInt32Value { value: 10 }),
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                },
            )),
            timeout: Some(protobuf::Duration {
                seconds: 1,
                nanos: 500_000_000,
            }),
            prefix_rewrite: "/v2/".into(),
            host_rewrite_specifier: Some(
                route_pb::route_action::HostRewriteSpecifier::HostRewriteLiteral(
                    "reviews.internal".into(),
                ),
            ),
            request_mirror_policies: vec![RequestMirrorPolicy {
                cluster: "shadow".into(),
                runtime_fraction: Some(core_pb::RuntimeFractionalPercent {
                    default_value: Some(type_pb::FractionalPercent {
                        numerator: 2500,
                        denominator: type_pb::fractional_percent::DenominatorType::TenThousand
                            as i32,
                    }),
                    runtime_key: String::new(),
                }),
                ..Default::default()
            }],
            hash_policy: vec![
                HashPb {
                    policy_specifier: Some(hash_policy::PolicySpecifier::Header(
                        hash_policy::Header {
                            header_name: "x-user".into(),
                            regex_rewrite: None,
                        },
                    )),
                    terminal: false,
                },
                HashPb {
                    policy_specifier: Some(hash_policy::PolicySpecifier::Cookie(
                        hash_policy::Cookie {
                            name: "session".into(),
                            ..Default::default()
                        },
                    )),
                    terminal: false,
                },
                HashPb {
                    policy_specifier: Some(hash_policy::PolicySpecifier::ConnectionProperties(
                        hash_policy::ConnectionProperties { source_ip: true },
                    )),
                    terminal: false,
                },
                HashPb {
                    policy_specifier: Some(hash_policy::PolicySpecifier::QueryParameter(
                        hash_policy::QueryParameter { name: "id".into() },
                    )),
                    terminal: true,
                },
            ],
            ..Default::default()
        }));
        let route = convert(route).expect("converts");
        let forward = forward(&route);
        let weights: Vec<(&str, u32)> = forward
            .clusters
            .iter()
            .map(|c| (c.name.as_str(), c.weight))
            .collect();
        assert_eq!(weights, [("v1", 90), ("v2", 10)]);
        let v1 = &forward.clusters[0];
        assert_eq!(v1.request_headers.add.len(), 1);
        assert_eq!(v1.request_headers.add[0].0.as_str(), "x-subset");
        assert!(!v1.request_headers.add[0].2, "overwrite");
        assert_eq!(v1.response_headers.remove[0].as_str(), "x-internal");
        assert_eq!(forward.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(forward.prefix_rewrite.as_deref(), Some("/v2/"));
        assert_eq!(
            forward.host_rewrite.as_ref().map(|h| h.as_bytes()),
            Some(&b"reviews.internal"[..])
        );
        assert_eq!(forward.mirrors.len(), 1);
        assert_eq!(forward.mirrors[0].cluster, "shadow");
        assert!((forward.mirrors[0].fraction - 0.25).abs() < 1e-9);
        assert!(matches!(
            &forward.hash_policies[..],
            [HashPolicy::Header(h), HashPolicy::Cookie(c), HashPolicy::SourceIp, HashPolicy::QueryParameter(q)]
                if h.as_str() == "x-user" && c.name == "session" && q == "id"
        ));
    }

    #[test]
    fn retry_policy_conditions_and_defaults() {
        let mut route = simple_route();
        let Some(Action::Route(action)) = route.action.as_mut() else {
            unreachable!()
        };
        action.retry_policy = Some(route_pb::RetryPolicy {
            retry_on: "5xx, gateway-error,reset,connect-failure,refused-stream,retriable-status-codes,unavailable,cancelled,deadline-exceeded,internal,resource-exhausted".into(),
            retriable_status_codes: vec![409],
            per_try_timeout: Some(protobuf::Duration { seconds: 2, nanos: 0 }),
            retry_host_predicate: vec![route_pb::retry_policy::RetryHostPredicate {
                name: PREVIOUS_HOSTS.into(),
                config_type: None,
            }],
            host_selection_retry_max_attempts: 5,
            ..Default::default()
        });
        let route = convert(route).expect("converts");
        let policy = forward(&route).retry_policy.clone().expect("a policy");
        let on = &policy.retry_on;
        assert!(on.five_xx && on.gateway_error && on.reset && on.connect_failure);
        assert!(on.retriable_status_codes);
        assert_eq!(on.status_codes, [409]);
        assert_eq!(on.grpc_statuses, [1, 4, 8, 13, 14]);
        assert_eq!(policy.num_retries, 1, "Envoy's default");
        assert_eq!(policy.per_try_timeout, Some(Duration::from_secs(2)));
        assert_eq!(policy.backoff_base, Duration::from_millis(25));
        assert_eq!(policy.backoff_max, Duration::from_millis(250));
    }

    #[test]
    fn a_virtual_host_retry_policy_with_backoff() {
        let mut config = config_with(simple_route());
        config.virtual_hosts[0].retry_policy = Some(route_pb::RetryPolicy {
            retry_on: "5xx".into(),
            num_retries: Some(protobuf::UInt32Value { value: 3 }),
            retry_back_off: Some(route_pb::retry_policy::RetryBackOff {
                base_interval: Some(protobuf::Duration {
                    seconds: 0,
                    nanos: 100_000_000,
                }),
                max_interval: None,
            }),
            ..Default::default()
        });
        let config = convert_route_configuration(&config).expect("converts");
        let policy = config.virtual_hosts[0]
            .retry_policy
            .clone()
            .expect("a policy");
        assert_eq!(policy.num_retries, 3);
        assert_eq!(policy.backoff_base, Duration::from_millis(100));
        assert_eq!(policy.backoff_max, Duration::from_secs(1), "10 x base");
    }

    #[test]
    fn an_unknown_retry_condition_is_refused() {
        let mut route = simple_route();
        if let Some(Action::Route(action)) = route.action.as_mut() {
            action.retry_policy = Some(route_pb::RetryPolicy {
                retry_on: "5xx,retriable-4xx".into(),
                ..Default::default()
            });
        }
        let error = convert(route).unwrap_err();
        assert!(
            error.contains("route.retry_policy.retry_on") && error.contains("retriable-4xx"),
            "{error}"
        );
    }

    #[test]
    #[allow(deprecated)]
    fn header_ops_at_every_level_and_append_semantics() {
        let mut route = simple_route();
        route.request_headers_to_add = vec![
            header("x-append", "a", HeaderAppendAction::AppendIfExistsOrAdd),
            header("x-set", "b", HeaderAppendAction::OverwriteIfExistsOrAdd),
            core_pb::HeaderValueOption {
                append: Some(protobuf::BoolValue { value: false }),
                ..header("x-legacy", "c", HeaderAppendAction::AppendIfExistsOrAdd)
            },
            header(
                "x-percent",
                "100%%",
                HeaderAppendAction::AppendIfExistsOrAdd,
            ),
            // Empty without keep_empty_value: nothing to add.
            header("x-empty", "", HeaderAppendAction::AppendIfExistsOrAdd),
        ];
        route.response_headers_to_remove = vec!["server".into()];
        let mut config = config_with(route);
        config.virtual_hosts[0].response_headers_to_add = vec![header(
            "x-vhost",
            "1",
            HeaderAppendAction::AppendIfExistsOrAdd,
        )];
        config.request_headers_to_remove = vec!["x-forwarded-client-cert".into()];
        let config = convert_route_configuration(&config).expect("converts");
        let route = &config.virtual_hosts[0].routes[0];
        let added: Vec<(&str, &[u8], bool)> = route
            .request_headers
            .add
            .iter()
            .map(|(n, v, a)| (n.as_str(), v.as_bytes(), *a))
            .collect();
        assert_eq!(
            added,
            [
                ("x-append", &b"a"[..], true),
                ("x-set", b"b", false),
                ("x-legacy", b"c", false),
                ("x-percent", b"100%", true),
            ]
        );
        assert_eq!(route.response_headers.remove[0].as_str(), "server");
        assert_eq!(
            config.virtual_hosts[0].response_headers.add[0].0.as_str(),
            "x-vhost"
        );
        assert_eq!(
            config.request_headers.remove[0].as_str(),
            "x-forwarded-client-cert"
        );

        for (option, expected) in [
            (
                header("x", "v", HeaderAppendAction::AddIfAbsent),
                "ADD_IF_ABSENT",
            ),
            (
                header("x", "v", HeaderAppendAction::OverwriteIfExists),
                "OVERWRITE_IF_EXISTS",
            ),
            (
                header("x", "%REQ(y)%", HeaderAppendAction::AppendIfExistsOrAdd),
                "formatters",
            ),
            (
                header("host", "v", HeaderAppendAction::AppendIfExistsOrAdd),
                "host header",
            ),
        ] {
            let mut route = simple_route();
            route.request_headers_to_add = vec![option];
            let error = convert(route).unwrap_err();
            assert!(
                error.contains("request_headers_to_add[0]") && error.contains(expected),
                "{error}"
            );
        }
    }

    #[test]
    fn redirect_and_direct_response() {
        use route_pb::redirect_action::{
            PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier,
        };
        let mut route = simple_route();
        route.action = Some(Action::Redirect(route_pb::RedirectAction {
            host_redirect: "new.example.com".into(),
            port_redirect: 8443,
            response_code: RedirectResponseCode::PermanentRedirect as i32,
            strip_query: true,
            scheme_rewrite_specifier: Some(SchemeRewriteSpecifier::HttpsRedirect(true)),
            path_rewrite_specifier: Some(PathRewriteSpecifier::PrefixRewrite("/new".into())),
        }));
        let RouteAction::Redirect(redirect) = convert(route).expect("converts").action else {
            panic!("not a redirect")
        };
        assert_eq!(redirect.scheme.as_deref(), Some("https"));
        assert_eq!(redirect.host.as_deref(), Some("new.example.com"));
        assert_eq!(redirect.port, Some(8443));
        assert_eq!(redirect.prefix_rewrite.as_deref(), Some("/new"));
        assert_eq!(redirect.path, None);
        assert_eq!(redirect.status, StatusCode::PERMANENT_REDIRECT);
        assert!(redirect.strip_query);

        let mut route = simple_route();
        route.action = Some(Action::Redirect(route_pb::RedirectAction::default()));
        let RouteAction::Redirect(redirect) = convert(route).expect("converts").action else {
            panic!("not a redirect")
        };
        assert_eq!(
            redirect.status,
            StatusCode::MOVED_PERMANENTLY,
            "Envoy's default"
        );

        let direct = |status, body: &str| {
            let mut route = simple_route();
            route.action = Some(Action::DirectResponse(route_pb::DirectResponseAction {
                status,
                body: Some(core_pb::DataSource {
                    watched_directory: None,
                    specifier: Some(core_pb::data_source::Specifier::InlineString(body.into())),
                }),
                body_format: None,
            }));
            convert(route)
        };
        let RouteAction::DirectResponse { status, body } =
            direct(503, "down").expect("converts").action
        else {
            panic!("not a direct response")
        };
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body.as_deref(), Some(&b"down"[..]));
        let error = direct(99, "").unwrap_err();
        assert!(error.contains("direct_response.status 99"), "{error}");
        let error = direct(200, &"x".repeat(5000)).unwrap_err();
        assert!(
            error.contains("max_direct_response_body_size_bytes"),
            "{error}"
        );
    }

    fn fault_any(fault: &fault_pb::HttpFault) -> protobuf::Any {
        protobuf::Any {
            type_url: FAULT_TYPE.into(),
            value: fault.encode_to_vec(),
        }
    }

    #[test]
    fn fault_delay_and_abort() {
        let mut route = simple_route();
        route.typed_per_filter_config.insert(
            FAULT_FILTER.into(),
            fault_any(&fault_pb::HttpFault {
                delay: Some(fault_common_pb::FaultDelay {
                    percentage: percent(10),
                    fault_delay_secifier: Some(
                        fault_common_pb::fault_delay::FaultDelaySecifier::FixedDelay(
                            protobuf::Duration {
                                seconds: 0,
                                nanos: 250_000_000,
                            },
                        ),
                    ),
                }),
                abort: Some(fault_pb::FaultAbort {
                    percentage: percent(50),
                    error_type: Some(fault_pb::fault_abort::ErrorType::HttpStatus(503)),
                    response_body: String::new(),
                }),
                ..Default::default()
            }),
        );
        let fault = convert(route).expect("converts").fault.expect("a fault");
        let (delay, delay_fraction) = fault.delay.expect("a delay");
        assert_eq!(delay, Duration::from_millis(250));
        assert!((delay_fraction - 0.1).abs() < 1e-9);
        let (abort, abort_fraction) = fault.abort.expect("an abort");
        assert!(
            matches!(abort, FaultAbort::Http(status) if status == StatusCode::SERVICE_UNAVAILABLE)
        );
        assert!((abort_fraction - 0.5).abs() < 1e-9);

        // gRPC abort, percentage absent: 0 as in Envoy.
        let mut route = simple_route();
        route.typed_per_filter_config.insert(
            FAULT_FILTER.into(),
            fault_any(&fault_pb::HttpFault {
                abort: Some(fault_pb::FaultAbort {
                    error_type: Some(fault_pb::fault_abort::ErrorType::GrpcStatus(14)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        );
        let fault = convert(route).expect("converts").fault.expect("a fault");
        assert!(matches!(fault.abort, Some((FaultAbort::Grpc(14), f)) if f == 0.0));

        let mut route = simple_route();
        route.typed_per_filter_config.insert(
            FAULT_FILTER.into(),
            fault_any(&fault_pb::HttpFault {
                abort: Some(fault_pb::FaultAbort {
                    error_type: Some(fault_pb::fault_abort::ErrorType::HttpStatus(42)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        );
        let error = convert(route).unwrap_err();
        assert!(error.contains("abort.http_status 42"), "{error}");
    }

    #[test]
    fn unsupported_fields_are_named() {
        let mut route = simple_route();
        if let Some(Action::Route(action)) = route.action.as_mut() {
            action.host_rewrite_specifier = Some(
                route_pb::route_action::HostRewriteSpecifier::HostRewriteHeader("x-host".into()),
            );
        }
        assert_eq!(
            convert(route).unwrap_err(),
            "route 'r1' in virtual host 'vh': unsupported field route.host_rewrite_header"
        );

        let mut route = simple_route();
        route
            .typed_per_filter_config
            .insert("envoy.filters.http.cors".into(), protobuf::Any::default());
        let error = convert(route).unwrap_err();
        assert!(
            error.contains("typed_per_filter_config[\"envoy.filters.http.cors\"]"),
            "{error}"
        );

        let mut route = simple_route();
        route.r#match = Some(route_pb::RouteMatch {
            runtime_fraction: Some(core_pb::RuntimeFractionalPercent::default()),
            ..prefix("/").unwrap_or_default()
        });
        assert!(
            convert(route)
                .unwrap_err()
                .ends_with("unsupported field match.runtime_fraction")
        );

        let mut route = simple_route();
        if let Some(Action::Route(action)) = route.action.as_mut() {
            action.idle_timeout = Some(protobuf::Duration {
                seconds: 0,
                nanos: 0,
            });
        }
        assert!(
            convert(route.clone()).is_ok(),
            "a zero idle_timeout is accepted"
        );
        if let Some(Action::Route(action)) = route.action.as_mut() {
            action.idle_timeout = Some(protobuf::Duration {
                seconds: 30,
                nanos: 0,
            });
        }
        assert!(
            convert(route)
                .unwrap_err()
                .ends_with("unsupported field route.idle_timeout")
        );

        let mut route = simple_route();
        if let Some(Action::Route(action)) = route.action.as_mut() {
            action.upgrade_configs = vec![route_pb::route_action::UpgradeConfig {
                upgrade_type: "websocket".into(),
                enabled: Some(protobuf::BoolValue { value: false }),
                connect_config: None,
            }];
        }
        assert!(
            convert(route)
                .unwrap_err()
                .ends_with("route.upgrade_configs[0].enabled")
        );

        let mut route = simple_route();
        if let Some(Action::Route(action)) = route.action.as_mut() {
            action.retry_policy = Some(route_pb::RetryPolicy {
                retry_on: "5xx".into(),
                retriable_headers: vec![route_pb::HeaderMatcher::default()],
                ..Default::default()
            });
        }
        assert!(
            convert(route)
                .unwrap_err()
                .ends_with("route.retry_policy.retriable_headers")
        );

        let mut config = config_with(simple_route());
        config.virtual_hosts[0].require_tls = 1;
        assert_eq!(
            convert_route_configuration(&config).unwrap_err(),
            "virtual host 'vh': unsupported field require_tls: EXTERNAL_ONLY"
        );
        let mut config = config_with(simple_route());
        config.vhds = Some(route_pb::Vhds::default());
        assert_eq!(
            convert_route_configuration(&config).unwrap_err(),
            "unsupported field vhds"
        );
    }

    #[test]
    #[allow(deprecated)]
    fn invalid_resources_are_refused() {
        let mut route = simple_route();
        route.r#match = Some(route_pb::RouteMatch {
            path_specifier: Some(PathSpecifier::SafeRegex(regex_matcher("/users/(["))),
            ..Default::default()
        });
        let error = convert(route).unwrap_err();
        assert!(
            error.contains("match.safe_regex") && error.contains("does not compile"),
            "{error}"
        );
        assert!(!error.contains('\n'), "one line: {error}");

        let mut route = simple_route();
        route.action = Some(Action::Route(route_pb::RouteAction {
            cluster_specifier: Some(ClusterSpecifier::WeightedClusters(
                route_pb::WeightedCluster {
                    clusters: vec![route_pb::weighted_cluster::ClusterWeight {
                        name: "v1".into(),
                        weight: Some(protobuf::UInt32Value { value: 0 }),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            ..Default::default()
        }));
        let error = convert(route).unwrap_err();
        assert!(
            error.contains("route.weighted_clusters: the weights add up to 0"),
            "{error}"
        );

        let mut route = simple_route();
        route.r#match = Some(route_pb::RouteMatch {
            headers: vec![route_pb::HeaderMatcher {
                name: ":scheme".into(),
                header_match_specifier: Some(HeaderMatchSpecifier::ExactMatch("https".into())),
                ..Default::default()
            }],
            ..Default::default()
        });
        let error = convert(route).unwrap_err();
        assert!(
            error.contains("match.headers[0].name") && error.contains(":scheme"),
            "{error}"
        );

        let mut config = config_with(simple_route());
        config.virtual_hosts.push(route_pb::VirtualHost {
            name: "other".into(),
            domains: vec!["*".into()],
            ..Default::default()
        });
        let error = convert_route_configuration(&config).unwrap_err();
        assert!(
            error.contains("domain \"*\" is in another virtual host"),
            "{error}"
        );

        let mut route = simple_route();
        route.action = None;
        assert!(convert(route).unwrap_err().contains("no action"));
        assert!(
            route_configuration(&[0xff, 0xff])
                .unwrap_err()
                .starts_with("undecodable")
        );
    }

    fn socket(address: &str, port: u32) -> endpoint_pb::LbEndpoint {
        endpoint_pb::LbEndpoint {
            host_identifier: Some(endpoint_pb::lb_endpoint::HostIdentifier::Endpoint(
                endpoint_pb::Endpoint {
                    address: Some(core_pb::Address {
                        address: Some(core_pb::address::Address::SocketAddress(
                            core_pb::SocketAddress {
                                address: address.into(),
                                port_specifier: Some(
                                    core_pb::socket_address::PortSpecifier::PortValue(port),
                                ),
                                ..Default::default()
                            },
                        )),
                    }),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }
    }

    fn static_cluster(endpoints: Vec<endpoint_pb::LbEndpoint>) -> cluster_pb::Cluster {
        cluster_pb::Cluster {
            name: "static-backend".into(),
            load_assignment: Some(endpoint_pb::ClusterLoadAssignment {
                cluster_name: "static-backend".into(),
                endpoints: vec![endpoint_pb::LocalityLbEndpoints {
                    lb_endpoints: endpoints,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_static_cluster_with_envoy_defaults() {
        let mut pb = static_cluster(vec![socket("10.0.0.1", 8080), socket("10.0.0.2", 8080)]);
        // A plain socket: the endpoints are reached as they are.
        pb.transport_socket = Some(core_pb::TransportSocket {
            name: "envoy.transport_sockets.raw_buffer".into(),
            config_type: None,
        });
        let cluster = cluster(&pb.encode_to_vec()).expect("converts");
        assert_eq!(cluster.name, "static-backend");
        let ClusterEndpoints::Static(addresses) = &cluster.endpoints else {
            panic!("{:?}", cluster.endpoints)
        };
        let expected: Vec<LbAddress> = ["10.0.0.1:8080", "10.0.0.2:8080"]
            .iter()
            .map(|address| address.parse::<SocketAddr>().expect("address").into())
            .collect();
        assert_eq!(addresses, &expected);
        assert_eq!(cluster.tls, upstream_tls::UpstreamTls::Mesh);
        assert_eq!(cluster.lb_policy, LbPolicy::RoundRobin);
        assert_eq!(cluster.connect_timeout, Duration::from_secs(5));
        assert_eq!(cluster.protocol, UpstreamProtocol::Http1);
        assert_eq!(cluster.circuit_breakers, Thresholds::default());
        assert!(cluster.outlier_detection.is_none());
    }

    #[test]
    fn an_istio_named_cluster_is_the_service_with_its_subset_labels() {
        let label = |value: &str| protobuf::Value {
            kind: Some(protobuf::value::Kind::StringValue(value.into())),
        };
        let labels = protobuf::Struct {
            fields: [
                ("version".to_string(), label("v2")),
                ("track".to_string(), label("canary")),
            ]
            .into_iter()
            .collect(),
        };
        let istio = protobuf::Struct {
            fields: [(
                "subset_labels".to_string(),
                protobuf::Value {
                    kind: Some(protobuf::value::Kind::StructValue(labels)),
                },
            )]
            .into_iter()
            .collect(),
        };
        let pb = cluster_pb::Cluster {
            name: "outbound|9080|v2|reviews.default.svc.cluster.local".into(),
            metadata: Some(core_pb::Metadata {
                filter_metadata: [("istio".to_string(), istio)].into_iter().collect(),
                typed_filter_metadata: Default::default(),
            }),
            ..Default::default()
        };
        let cluster = convert_cluster(&pb).expect("converts");
        let ClusterEndpoints::Service {
            hostname,
            port,
            subset,
        } = &cluster.endpoints
        else {
            panic!("{:?}", cluster.endpoints)
        };
        assert_eq!(
            (hostname.as_str(), *port),
            ("reviews.default.svc.cluster.local", 9080)
        );
        assert_eq!(
            subset,
            &[
                ("track".to_string(), "canary".to_string()),
                ("version".to_string(), "v2".to_string())
            ]
        );
        let plain = convert_cluster(&cluster_pb::Cluster {
            name: "outbound|80||web.default.svc.cluster.local".into(),
            ..Default::default()
        })
        .expect("converts");
        assert!(
            matches!(plain.endpoints, ClusterEndpoints::Service { ref subset, .. } if subset.is_empty())
        );
        assert_eq!(istio_cluster_name("outbound|0||x"), None);
        assert_eq!(istio_cluster_name("inbound|80||x"), None);
    }

    #[test]
    #[allow(deprecated)]
    fn load_balancing_protocol_and_limits() {
        use cluster_pb::cluster::{LbConfig, LbPolicy as Policy};
        let mut pb = static_cluster(vec![socket("10.0.0.1", 80)]);
        pb.lb_policy = Policy::LeastRequest as i32;
        assert_eq!(
            convert_cluster(&pb).expect("converts").lb_policy,
            LbPolicy::LeastRequest { choice_count: 2 }
        );
        pb.lb_config = Some(LbConfig::LeastRequestLbConfig(
            cluster_pb::cluster::LeastRequestLbConfig {
                choice_count: Some(protobuf::UInt32Value { value: 3 }),
                ..Default::default()
            },
        ));
        assert_eq!(
            convert_cluster(&pb).expect("converts").lb_policy,
            LbPolicy::LeastRequest { choice_count: 3 }
        );
        pb.lb_policy = Policy::RingHash as i32;
        assert_eq!(
            convert_cluster(&pb).expect("converts").lb_policy,
            LbPolicy::RingHash {
                minimum_ring_size: 1024
            }
        );
        pb.lb_config = Some(LbConfig::RingHashLbConfig(
            cluster_pb::cluster::RingHashLbConfig {
                minimum_ring_size: Some(protobuf::UInt64Value { value: 4096 }),
                ..Default::default()
            },
        ));
        assert_eq!(
            convert_cluster(&pb).expect("converts").lb_policy,
            LbPolicy::RingHash {
                minimum_ring_size: 4096
            }
        );
        pb.lb_policy = Policy::Maglev as i32;
        assert_eq!(
            convert_cluster(&pb).expect("converts").lb_policy,
            LbPolicy::Maglev { table_size: 65537 }
        );
        pb.lb_policy = Policy::Random as i32;
        assert_eq!(
            convert_cluster(&pb).expect("converts").lb_policy,
            LbPolicy::Random
        );

        pb.connect_timeout = Some(protobuf::Duration {
            seconds: 0,
            nanos: 250_000_000,
        });
        pb.http2_protocol_options = Some(core_pb::Http2ProtocolOptions::default());
        let converted = convert_cluster(&pb).expect("converts");
        assert_eq!(converted.connect_timeout, Duration::from_millis(250));
        assert_eq!(converted.protocol, UpstreamProtocol::Http2);

        let mut pb = static_cluster(vec![socket("10.0.0.1", 80)]);
        let options = upstream_pb::HttpProtocolOptions {
            upstream_protocol_options: Some(
                upstream_pb::http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                    upstream_pb::http_protocol_options::ExplicitHttpConfig {
                        protocol_config: Some(
                            upstream_pb::http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                                Default::default(),
                            ),
                        ),
                    },
                ),
            ),
            ..Default::default()
        };
        pb.typed_extension_protocol_options.insert(
            HTTP_PROTOCOL_OPTIONS.into(),
            protobuf::Any {
                type_url: HTTP_PROTOCOL_OPTIONS_TYPE.into(),
                value: options.encode_to_vec(),
            },
        );
        pb.circuit_breakers = Some(cluster_pb::CircuitBreakers {
            thresholds: vec![
                cluster_pb::circuit_breakers::Thresholds {
                    priority: core_pb::RoutingPriority::High as i32,
                    max_connections: Some(protobuf::UInt32Value { value: 1 }),
                    ..Default::default()
                },
                cluster_pb::circuit_breakers::Thresholds {
                    max_connections: Some(protobuf::UInt32Value { value: 100 }),
                    max_pending_requests: Some(protobuf::UInt32Value { value: 10 }),
                    max_requests: Some(protobuf::UInt32Value { value: 200 }),
                    max_retries: Some(protobuf::UInt32Value { value: 5 }),
                    retry_budget: Some(cluster_pb::circuit_breakers::thresholds::RetryBudget {
                        budget_percent: None,
                        budget_interval: None,
                        min_retry_concurrency: None,
                    }),
                    ..Default::default()
                },
            ],
            per_host_thresholds: Vec::new(),
        });
        let converted = convert_cluster(&pb).expect("converts");
        assert_eq!(converted.protocol, UpstreamProtocol::Http2);
        assert_eq!(
            converted.circuit_breakers,
            Thresholds {
                max_connections: 100,
                max_pending_requests: 10,
                max_requests: 200,
                max_retries: 5,
                retry_budget: Some(RetryBudget {
                    budget_percent: 20.0,
                    min_retry_concurrency: 3
                }),
            }
        );
    }

    #[test]
    fn outlier_detection_defaults_and_the_gateway_choice() {
        let u32v = |value| Some(protobuf::UInt32Value { value });
        let mut pb = static_cluster(vec![socket("10.0.0.1", 80)]);
        pb.outlier_detection = Some(cluster_pb::OutlierDetection::default());
        let detection = convert_cluster(&pb)
            .expect("converts")
            .outlier_detection
            .expect("set");
        assert_eq!(
            detection,
            OutlierDetection {
                consecutive_5xx: 5,
                consecutive_gateway_failure: 0,
                interval: Duration::from_secs(10),
                base_ejection_time: Duration::from_secs(30),
                max_ejection_percent: 10,
                consecutive_local_origin_failure: None,
            }
        );
        // Istio's translation of consecutiveGatewayErrors: 3, 5xx off.
        pb.outlier_detection = Some(cluster_pb::OutlierDetection {
            consecutive_5xx: u32v(0),
            enforcing_consecutive_5xx: u32v(0),
            consecutive_gateway_failure: u32v(3),
            enforcing_consecutive_gateway_failure: u32v(100),
            enforcing_success_rate: u32v(0),
            interval: Some(protobuf::Duration {
                seconds: 5,
                nanos: 0,
            }),
            max_ejection_percent: u32v(50),
            ..Default::default()
        });
        let detection = convert_cluster(&pb)
            .expect("converts")
            .outlier_detection
            .expect("set");
        assert_eq!(
            (
                detection.consecutive_5xx,
                detection.consecutive_gateway_failure
            ),
            (0, 3)
        );
        assert_eq!(detection.interval, Duration::from_secs(5));
        assert_eq!(detection.max_ejection_percent, 50);
        // Set explicitly without its enforcement: Weir enforces it.
        pb.outlier_detection = Some(cluster_pb::OutlierDetection {
            consecutive_gateway_failure: u32v(7),
            ..Default::default()
        });
        let detection = convert_cluster(&pb)
            .expect("converts")
            .outlier_detection
            .expect("set");
        assert_eq!(detection.consecutive_gateway_failure, 7);
        pb.outlier_detection = Some(cluster_pb::OutlierDetection {
            enforcing_consecutive_5xx: u32v(50),
            ..Default::default()
        });
        assert!(convert_cluster(&pb).unwrap_err().contains("only 0 or 100"));
        pb.outlier_detection = Some(cluster_pb::OutlierDetection {
            failure_percentage_threshold: u32v(85),
            ..Default::default()
        });
        assert_eq!(
            convert_cluster(&pb).unwrap_err(),
            "unsupported field outlier_detection.failure_percentage_threshold"
        );
    }

    #[test]
    fn clusters_weir_cannot_serve_are_refused() {
        let error = convert_cluster(&cluster_pb::Cluster {
            name: "nowhere".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(
            error,
            "cluster nowhere has no endpoints: give load_assignment, type EDS, or an Istio outbound|port|subset|host name"
        );
        let error =
            convert_cluster(&static_cluster(vec![socket("backend.example.com", 80)])).unwrap_err();
        assert!(
            error.contains("hostnames are resolved only for STRICT_DNS"),
            "{error}"
        );
        let mut pb = static_cluster(vec![socket("10.0.0.1", 80)]);
        pb.health_checks = vec![core_pb::HealthCheck::default()];
        assert_eq!(
            convert_cluster(&pb).unwrap_err(),
            "unsupported field health_checks"
        );
        let mut pb = static_cluster(vec![socket("10.0.0.1", 80)]);
        pb.cluster_discovery_type = Some(cluster_pb::cluster::ClusterDiscoveryType::Type(
            cluster_pb::cluster::DiscoveryType::OriginalDst as i32,
        ));
        assert!(convert_cluster(&pb).unwrap_err().contains("ORIGINAL_DST"));
        let mut pb = static_cluster(vec![socket("10.0.0.1", 80)]);
        pb.typed_extension_protocol_options.insert(
            "envoy.extensions.upstreams.tcp.v3.TcpProtocolOptions".into(),
            protobuf::Any::default(),
        );
        assert!(
            convert_cluster(&pb)
                .unwrap_err()
                .contains("TcpProtocolOptions")
        );
        let mut pb = static_cluster(vec![socket("10.0.0.1", 80)]);
        pb.lb_subset_config = Some(Default::default());
        assert_eq!(
            convert_cluster(&pb).unwrap_err(),
            "unsupported field lb_subset_config"
        );
    }

    fn route_from_json(json: &str) -> Result<RouteConfig, String> {
        let pb: route_pb::RouteConfiguration = crate::routing::schema::from_json(json)?;
        convert_route_configuration(&pb)
    }

    fn cluster_from_json(json: &str) -> Result<ClusterConfig, String> {
        let pb: cluster_pb::Cluster = crate::routing::schema::from_json(json)?;
        convert_cluster(&pb)
    }

    /// The route fields istiod sets on sidecar, gateway and waypoint routes.
    #[test]
    fn route_fields_istiod_sets() {
        let config = route_from_json(
            r#"{"name": "r", "virtual_hosts": [{"name": "vh", "domains": ["*"],
                "include_request_attempt_count": true,
                "include_attempt_count_in_response": true,
                "routes": [{"match": {"prefix": "/"}, "decorator": {"operation": "x"},
                  "route": {"cluster": "c", "timeout": "0s", "max_grpc_timeout": "0s",
                    "cluster_not_found_response_code": "NOT_FOUND",
                    "regex_rewrite": {"pattern": {"regex": "^/v1/(.*)$"}, "substitution": "/\\1?$"},
                    "max_stream_duration": {"max_stream_duration": "0s", "grpc_timeout_header_max": "2s",
                      "grpc_timeout_header_offset": "0.1s"}}}]}]}"#,
        )
        .expect("converts");
        let vhost = &config.virtual_hosts[0];
        assert!(vhost.attempt_count_to_upstream && vhost.attempt_count_to_client);
        let RouteAction::Forward(action) = &vhost.routes[0].action else {
            panic!("{:?}", vhost.routes[0].action)
        };
        assert_eq!(action.timeout, Some(Duration::ZERO));
        assert_eq!(
            action.grpc_timeout,
            Some(GrpcTimeout {
                max: None,
                offset: Duration::ZERO
            })
        );
        assert_eq!(
            action.max_stream_duration,
            Some(StreamDuration {
                max: None,
                grpc: Some(GrpcTimeout {
                    max: Some(Duration::from_secs(2)),
                    offset: Duration::from_millis(100)
                })
            })
        );
        assert_eq!(action.cluster_not_found, StatusCode::NOT_FOUND);
        let (pattern, substitution) = action.regex_rewrite.as_ref().expect("regex_rewrite");
        assert_eq!(
            pattern.0.replace_all("/v1/items", substitution.as_str()),
            "/items?$"
        );
        // Both limits zero: nothing to enforce.
        let config = route_from_json(
            r#"{"name": "r", "virtual_hosts": [{"name": "vh", "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c",
                  "max_stream_duration": {"max_stream_duration": "0s"}}}]}]}"#,
        )
        .expect("converts");
        let RouteAction::Forward(action) = &config.virtual_hosts[0].routes[0].action else {
            panic!("not forward")
        };
        assert_eq!(action.max_stream_duration, None);
        assert_eq!(action.grpc_timeout, None);
    }

    #[test]
    fn cluster_fields_istiod_sets() {
        // EDS, by its service name; sidecar metadata exchange in both forms;
        // a sidecar's loopback bind marker; the downstream's protocol.
        let cluster = cluster_from_json(
            r#"{"name": "outbound|9080|v1|reviews.default.svc.cluster.local", "type": "EDS",
                "eds_cluster_config": {"eds_config": {"ads": {}}, "service_name": "reviews-v1"},
                "metadata": {"filter_metadata": {"istio": {"subset": "v1"}}},
                "upstream_bind_config": {"source_address": {"address": "127.0.0.6", "port_value": 0},
                  "extra_source_addresses": [{"address": {"address": "::6", "port_value": 0}}]},
                "filters": [
                  {"name": "istio.metadata_exchange", "typed_config": {
                    "@type": "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange",
                    "protocol": "istio-peer-exchange"}},
                  {"name": "istio.metadata_exchange", "typed_config": {
                    "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                    "type_url": "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange",
                    "value": {"protocol": "istio-peer-exchange", "enable_discovery": true}}}],
                "typed_extension_protocol_options": {
                  "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "use_downstream_protocol_config": {"http_protocol_options": {}, "http2_protocol_options": {}}}}}"#,
        )
        .expect("converts");
        assert_eq!(
            cluster.endpoints,
            ClusterEndpoints::Eds("reviews-v1".into())
        );
        assert_eq!(cluster.protocol, UpstreamProtocol::Downstream);

        // Envoy's default protocol is HTTP/1.1, whatever the client speaks.
        let cluster = cluster_from_json(r#"{"name": "BlackHoleCluster", "type": "STATIC"}"#)
            .expect("converts");
        assert_eq!(cluster.protocol, UpstreamProtocol::Http1);
        assert_eq!(cluster.endpoints, ClusterEndpoints::Static(Vec::new()));

        for (json, refusal) in [
            (
                r#"{"name": "outbound|9080|v1|reviews.default.svc.cluster.local",
                    "metadata": {"filter_metadata": {"istio": {"subset": "v1"}}}}"#,
                "a subset cluster needs type EDS",
            ),
            (
                r#"{"name": "c", "type": "EDS", "filters": [{"name": "x", "typed_config": {
                    "@type": "type.googleapis.com/udpa.type.v1.TypedStruct", "type_url": "x.Other"}}]}"#,
                "unsupported field filters[0] (\"x\", x.Other)",
            ),
            (
                r#"{"name": "c", "type": "EDS", "upstream_bind_config": {
                    "source_address": {"address": "10.0.0.1", "port_value": 0}}}"#,
                "upstream_bind_config.source_address 10.0.0.1",
            ),
            (
                r#"{"name": "c", "type": "EDS", "protocol_selection": "USE_DOWNSTREAM_PROTOCOL",
                    "typed_extension_protocol_options": {
                      "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http_protocol_options": {}}}}}"#,
                "but Http1 by typed_extension_protocol_options",
            ),
        ] {
            let error = cluster_from_json(json).unwrap_err();
            assert!(error.contains(refusal), "{error}");
        }
    }

    #[test]
    fn eds_assignments_and_waypoint_endpoints() {
        let assignment = |json: &str| {
            crate::routing::schema::from_json::<endpoint_pb::ClusterLoadAssignment>(json)
                .and_then(|pb| convert_cluster_load_assignment(&pb))
        };
        let converted = assignment(
            r#"{"cluster_name": "inbound-vip|8000|http|httpbin.default.svc.cluster.local",
                "endpoints": [{"locality": {"zone": "z"}, "load_balancing_weight": 2, "lb_endpoints": [
                  {"endpoint": {"address": {"envoy_internal_address": {
                    "server_listener_name": "connect_originate", "endpoint_id": "10.0.0.7:8080"}}},
                   "health_status": "HEALTHY", "load_balancing_weight": 1},
                  {"endpoint": {"address": {"socket_address": {"address": "fd00::7", "port_value": 8080}}},
                   "load_balancing_weight": 1},
                  {"endpoint": {"address": {"socket_address": {"address": "10.0.0.8", "port_value": 8080}}},
                   "health_status": "DRAINING", "load_balancing_weight": 1}]}]}"#,
        )
        .expect("converts");
        let addresses: Vec<SocketAddr> = converted.endpoints.iter().map(|e| e.address).collect();
        assert_eq!(
            addresses,
            [
                "10.0.0.7:8080".parse::<SocketAddr>().expect("address"),
                "[fd00::7]:8080".parse().expect("address")
            ]
        );
        let error = assignment(
            r#"{"cluster_name": "c", "endpoints": [{"lb_endpoints": [
                  {"endpoint": {"address": {"envoy_internal_address": {
                    "server_listener_name": "encap", "endpoint_id": "10.0.0.7:8080"}}}}]}]}"#,
        )
        .unwrap_err();
        assert!(
            error.contains("\"encap\": only connect_originate"),
            "{error}"
        );
        assert!(assignment(r#"{"endpoints": []}"#).is_err());
        let localities = |first: u32, second: u32| {
            format!(
                r#"{{"cluster_name": "c", "endpoints": [
                  {{"locality": {{"zone": "a"}}, "load_balancing_weight": {first}, "lb_endpoints": [
                    {{"endpoint": {{"address": {{"socket_address": {{"address": "10.0.0.1", "port_value": 80}}}}}}}},
                    {{"endpoint": {{"address": {{"socket_address": {{"address": "10.0.0.2", "port_value": 80}}}}}}}}]}},
                  {{"locality": {{"zone": "b"}}, "load_balancing_weight": {second}, "lb_endpoints": [
                    {{"endpoint": {{"address": {{"socket_address": {{"address": "10.0.0.3", "port_value": 80}}}}}}}}]}}]}}"#
            )
        };
        // Each endpoint carries its locality and that locality's weight
        // (a distribute setting's shares), for the balancer.
        let weighted = assignment(&localities(80, 20)).expect("converts");
        let localities: Vec<_> = weighted
            .endpoints
            .iter()
            .map(|endpoint| endpoint.locality)
            .collect();
        assert_eq!(localities, [Some((0, 80)), Some((0, 80)), Some((1, 20))]);
    }

    #[test]
    fn envoy_substitutions_become_regex_crate_ones() {
        assert_eq!(substitution_of(r"/\1/\2"), "/${1}/${2}");
        assert_eq!(substitution_of(r"$5 \\ \x"), r"$$5 \ \x");
    }

    #[test]
    fn maglev_takes_a_prime_table_size() {
        let cluster = cluster_from_json(
            r#"{"name": "c", "type": "STATIC", "lb_policy": "MAGLEV",
                "maglev_lb_config": {"table_size": 7}}"#,
        )
        .expect("converts");
        assert_eq!(cluster.lb_policy, LbPolicy::Maglev { table_size: 7 });
        let cluster =
            cluster_from_json(r#"{"name": "c", "type": "STATIC", "lb_policy": "MAGLEV"}"#)
                .expect("converts");
        assert_eq!(cluster.lb_policy, LbPolicy::Maglev { table_size: 65537 });
        let error = cluster_from_json(
            r#"{"name": "c", "type": "STATIC", "lb_policy": "MAGLEV",
                "maglev_lb_config": {"table_size": 8}}"#,
        )
        .unwrap_err();
        assert!(error.contains("a prime"), "{error}");
    }

    #[test]
    fn dns_clusters_keep_their_names_for_the_resolver() {
        let cluster = cluster_from_json(
            r#"{"name": "outbound|443||api.example.com", "type": "STRICT_DNS",
                "dns_lookup_family": "V4_ONLY", "dns_refresh_rate": "30s",
                "load_assignment": {"cluster_name": "outbound|443||api.example.com", "endpoints": [
                  {"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "api.example.com", "port_value": 443}}}},
                    {"endpoint": {"address": {"socket_address": {"address": "10.0.0.5", "port_value": 8443}}}}]}]}}"#,
        )
        .expect("converts");
        let ClusterEndpoints::Dns(dns) = &cluster.endpoints else {
            panic!("{:?}", cluster.endpoints)
        };
        assert_eq!(
            dns.targets
                .iter()
                .map(|t| (t.host.as_str(), t.port))
                .collect::<Vec<_>>(),
            [("api.example.com", 443), ("10.0.0.5", 8443)]
        );
        assert_eq!(
            (dns.logical, dns.refresh, dns.family),
            (false, Duration::from_secs(30), DnsFamily::V4Only)
        );
        // A STATIC cluster still takes IP addresses only; a LOGICAL_DNS one
        // exactly one name; a name must be one.
        for (json, refusal) in [
            (
                r#"{"name": "c", "type": "STATIC", "load_assignment": {"endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "api.example.com", "port_value": 443}}}}]}]}}"#,
                "hostnames are resolved only for STRICT_DNS",
            ),
            (
                r#"{"name": "c", "type": "LOGICAL_DNS", "load_assignment": {"endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "a.example", "port_value": 1}}}},
                    {"endpoint": {"address": {"socket_address": {"address": "b.example", "port_value": 1}}}}]}]}}"#,
                "exactly one endpoint",
            ),
            (
                r#"{"name": "c", "type": "STRICT_DNS", "load_assignment": {"endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "not a name", "port_value": 1}}}}]}]}}"#,
                "an IP address",
            ),
        ] {
            let error = cluster_from_json(json).unwrap_err();
            assert!(error.contains(refusal), "{error}");
        }
        let v4: SocketAddr = "10.0.0.1:1".parse().expect("address");
        let v6: SocketAddr = "[fd00::1]:1".parse().expect("address");
        assert_eq!(DnsFamily::Auto.keep(vec![v4, v6]), [v6]);
        assert_eq!(DnsFamily::Auto.keep(vec![v4]), [v4]);
        assert_eq!(DnsFamily::V4Preferred.keep(vec![v6, v4]), [v4]);
        assert_eq!(DnsFamily::All.keep(vec![v6, v4]), [v4, v6]);
    }

    #[test]
    fn original_destination_clusters() {
        let cluster = cluster_from_json(
            r#"{"name": "PassthroughCluster", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                "original_dst_lb_config": {"use_http_header": true, "upstream_port_override": 15008}}"#,
        )
        .expect("converts");
        assert_eq!(
            cluster.endpoints,
            ClusterEndpoints::OriginalDst(OriginalDst {
                header: Some(HeaderName::from_static("x-envoy-original-dst-host")),
                port: Some(15008),
            })
        );
        for (json, refusal) in [
            (
                r#"{"name": "c", "type": "ORIGINAL_DST", "lb_policy": "ROUND_ROBIN"}"#,
                "CLUSTER_PROVIDED for an ORIGINAL_DST cluster",
            ),
            (
                r#"{"name": "c", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                    "original_dst_lb_config": {"metadata_key": {"key": "k", "path": [{"key": "waypoint"}]}}}"#,
                "original_dst_lb_config.metadata_key \"k\"",
            ),
            (
                r#"{"name": "c", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                    "original_dst_lb_config": {"upstream_port_override": 9999, "metadata_key": {
                      "key": "envoy.filters.listener.original_dst", "path": [{"key": "waypoint"}]}}}"#,
                "only 15008 (HBONE)",
            ),
            (
                r#"{"name": "c", "type": "STATIC", "lb_policy": "CLUSTER_PROVIDED"}"#,
                "lb_policy",
            ),
            // The original destination is a STATIC cluster's only endpoint.
            (
                r#"{"name": "c", "type": "STATIC", "load_assignment": {"endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"envoy_internal_address": {"server_listener_name": "connect_originate"}}}},
                    {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 80}}}}]}]}}"#,
                "only as a STATIC cluster's one endpoint",
            ),
        ] {
            let error = cluster_from_json(json).unwrap_err();
            assert!(error.contains(refusal), "{error}");
        }
        let eds = crate::routing::schema::from_json::<endpoint_pb::ClusterLoadAssignment>(
            r#"{"cluster_name": "c", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "envoy_internal_address": {"server_listener_name": "connect_originate"}}}}]}]}"#,
        )
        .and_then(|pb| convert_cluster_load_assignment(&pb));
        assert!(
            eds.as_ref()
                .is_err_and(|error| error.contains("only as a STATIC cluster's one endpoint")),
            "{eds:?}"
        );
    }

    /// A waypoint's HBONE hop as istiod writes it (Istio 1.26): `encap`
    /// goes to the internal listener `connect_originate`, whose cluster
    /// tunnels to the original destination on 15008. Both are where the
    /// client was going, which Weir's upstream reaches over HBONE itself.
    #[test]
    fn a_waypoints_hbone_hop_is_the_original_destination() {
        let original = ClusterEndpoints::OriginalDst(OriginalDst {
            header: None,
            port: None,
        });
        let encap = cluster_from_json(
            r#"{"name": "encap", "type": "STATIC", "load_assignment": {"cluster_name": "encap",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                  "envoy_internal_address": {"server_listener_name": "connect_originate"}}}}]}]}}"#,
        )
        .expect("converts");
        assert_eq!(encap.endpoints, original);
        let originate = cluster_from_json(
            r#"{"name": "connect_originate", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                "original_dst_lb_config": {"upstream_port_override": 15008, "metadata_key": {
                  "key": "envoy.filters.listener.original_dst", "path": [{"key": "waypoint"}]}}}"#,
        )
        .expect("converts");
        assert_eq!(originate.endpoints, original);
    }

    #[test]
    fn a_routes_cors_fields_go_over_its_virtual_hosts() {
        let config = route_from_json(
            r#"{"name": "r", "virtual_hosts": [{"name": "vh", "domains": ["*"],
                "typed_per_filter_config": {"envoy.filters.http.cors": {
                  "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
                  "allow_origin_string_match": [{"exact": "https://a.example"}],
                  "allow_methods": "GET", "allow_credentials": true}},
                "routes": [
                  {"match": {"prefix": "/own"}, "route": {"cluster": "c"},
                   "typed_per_filter_config": {"envoy.filters.http.cors": {
                     "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
                     "allow_methods": "POST", "filter_enabled": {"default_value": {"numerator": 0}}}}},
                  {"match": {"prefix": "/"}, "route": {"cluster": "c"}}]}]}"#,
        )
        .expect("converts");
        let routes = &config.virtual_hosts[0].routes;
        let own = routes[0].cors.as_ref().expect("merged");
        assert_eq!(own.allow_origins.len(), 1, "the host's origins");
        assert_eq!(own.allow_methods, "POST", "the route's methods");
        assert_eq!(own.allow_credentials, Some(true));
        assert_eq!(own.enabled, 0.0, "the route's switch");
        let inherited = routes[1].cors.as_ref().expect("the host's");
        assert_eq!(
            (inherited.allow_methods.as_str(), inherited.enabled),
            ("GET", 1.0)
        );
    }

    #[test]
    fn slow_start_is_read_for_round_robin_and_least_request() {
        // Every field set; the round-robin case below leaves them to
        // Envoy's defaults (aggression 1, 10 %).
        let cluster = cluster_from_json(
            r#"{"name": "c", "type": "STATIC", "lb_policy": "LEAST_REQUEST",
                "least_request_lb_config": {"slow_start_config": {"slow_start_window": "60s",
                  "aggression": {"default_value": 2, "runtime_key": "k"},
                  "min_weight_percent": {"value": 20}}}}"#,
        )
        .expect("converts");
        assert_eq!(
            cluster.slow_start,
            Some(SlowStart {
                window: Duration::from_secs(60),
                aggression: 2.0,
                min_weight: 0.2,
            })
        );
        let round_robin = cluster_from_json(
            r#"{"name": "c", "type": "STATIC",
                "round_robin_lb_config": {"slow_start_config": {"slow_start_window": "5s"}}}"#,
        )
        .expect("converts");
        assert_eq!(
            round_robin.slow_start,
            Some(SlowStart {
                window: Duration::from_secs(5),
                aggression: 1.0,
                min_weight: 0.1,
            })
        );
        let error = cluster_from_json(
            r#"{"name": "c", "type": "STATIC",
                "round_robin_lb_config": {"slow_start_config": {}}}"#,
        )
        .unwrap_err();
        assert!(error.contains("slow_start_window: required"), "{error}");
    }

    #[test]
    fn connection_pool_fields_reach_the_pool_settings() {
        let cluster = cluster_from_json(
            r#"{"name": "c", "type": "STATIC", "max_requests_per_connection": 7,
                "upstream_connection_options": {"tcp_keepalive": {
                  "keepalive_probes": 3, "keepalive_time": 30, "keepalive_interval": 5}},
                "typed_extension_protocol_options": {
                  "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "common_http_protocol_options": {"idle_timeout": "90s", "max_requests_per_connection": 1,
                      "max_connection_duration": "600s"},
                    "explicit_http_config": {"http_protocol_options": {}}}}}"#,
        )
        .expect("converts");
        // The typed options win over the deprecated cluster field.
        assert_eq!(
            cluster.pool,
            PoolSettings {
                max_requests_per_connection: Some(1),
                idle_timeout: Some(Duration::from_secs(90)),
                tcp_keepalive: Some(TcpKeepalive {
                    probes: Some(3),
                    time: Some(Duration::from_secs(30)),
                    interval: Some(Duration::from_secs(5)),
                }),
                max_connection_duration: Some(Duration::from_secs(600)),
            }
        );
        let error = cluster_from_json(
            r#"{"name": "c", "type": "STATIC", "common_http_protocol_options": {"max_connection_duration_jitter": {"value": 10}}}"#,
        )
        .unwrap_err();
        assert!(
            error.contains("common_http_protocol_options.max_connection_duration_jitter"),
            "{error}"
        );
    }
}
