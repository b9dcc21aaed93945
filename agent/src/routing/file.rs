//! Routes and clusters written in the local config file.
//!
//! The file speaks Envoy's YAML: proto field names in snake_case (the
//! proto3 JSON camelCase names are accepted too), durations as `"1.5s"`,
//! enums by name. `envoy-types` has no serde, so the structs here mirror
//! the subset of `RouteConfiguration` and `Cluster` that Weir supports and
//! build the prost messages, which then go through
//! [`envoy::convert_route_configuration`] and [`envoy::convert_cluster`]:
//! the file and xDS share one validation path. An unknown field is an
//! error naming it.
//!
//! ```yaml
//! routing:
//!   route_configs:
//!   - name: reviews.default.svc.cluster.local      # binds to that service
//!     virtual_hosts:
//!     - name: reviews
//!       domains: ["*"]
//!       routes:
//!       - match:
//!           prefix: /api
//!           headers: [{name: x-canary, string_match: {exact: "1"}}]
//!         route:
//!           weighted_clusters:
//!             clusters:
//!             - {name: "outbound|9080|v1|reviews.default.svc.cluster.local", weight: 90}
//!             - {name: "outbound|9080|v2|reviews.default.svc.cluster.local", weight: 10}
//!           timeout: 2s
//!           retry_policy: {retry_on: "5xx,connect-failure", num_retries: 2}
//!   clusters:
//!   - name: "outbound|9080|v2|reviews.default.svc.cluster.local"
//!     lb_policy: LEAST_REQUEST
//!     metadata: {filter_metadata: {istio: {subset_labels: {version: v2}}}}
//! ```
use std::{collections::BTreeMap, sync::Arc};

use serde::{Deserialize, Deserializer};

use super::{
    RouteTable, envoy,
    envoy::pb::{
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
    },
};

/// `routing:` in the config file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRouting {
    #[serde(default, alias = "routeConfigs")]
    pub route_configs: Vec<RouteConfigurationYaml>,
    #[serde(default)]
    pub clusters: Vec<ClusterYaml>,
}

// Percentages are finite numbers from YAML; nothing compares NaNs.
impl Eq for FileRouting {}

/// Converts and validates the whole section; errors name the entry, e.g.
/// `route_configs[0] (reviews): route 'r1' in virtual host 'vh': ...`.
pub fn table(file: &FileRouting) -> Result<RouteTable, String> {
    let mut table = RouteTable::default();
    for (index, config) in file.route_configs.iter().enumerate() {
        let at = format!("route_configs[{index}] ({})", config.name);
        let converted = config
            .to_proto()
            .and_then(|pb| envoy::convert_route_configuration(&pb))
            .map_err(|e| format!("{at}: {e}"))?;
        if table
            .route_configs
            .insert(converted.name.clone(), Arc::new(converted))
            .is_some()
        {
            return Err(format!("{at}: a second route configuration of that name"));
        }
    }
    for (index, cluster) in file.clusters.iter().enumerate() {
        let at = format!("clusters[{index}] ({})", cluster.name);
        let converted = cluster
            .to_proto()
            .and_then(|pb| envoy::convert_cluster(&pb))
            .map_err(|e| format!("{at}: {e}"))?;
        if table
            .clusters
            .insert(converted.name.clone(), Arc::new(converted))
            .is_some()
        {
            return Err(format!("{at}: a second cluster of that name"));
        }
    }
    Ok(table)
}

/// Envoy's JSON duration: seconds with an optional fraction, then `s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationYaml(pub protobuf::Duration);

impl std::str::FromStr for DurationYaml {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("duration {text:?}: seconds then 's', like \"1.5s\"");
        let number = text.strip_suffix('s').ok_or_else(invalid)?;
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !digits(whole) || !digits(fraction) || fraction.len() > 9 {
            return Err(invalid());
        }
        let seconds: i64 = whole.parse().map_err(|_| invalid())?;
        let nanos: i32 = format!("{fraction:0<9}").parse().map_err(|_| invalid())?;
        Ok(DurationYaml(protobuf::Duration { seconds, nanos }))
    }
}

impl<'de> Deserialize<'de> for DurationYaml {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

fn duration(value: &Option<DurationYaml>) -> Option<protobuf::Duration> {
    value.map(|value| value.0)
}

fn u32_value(value: Option<u32>) -> Option<protobuf::UInt32Value> {
    value.map(|value| protobuf::UInt32Value { value })
}

fn any<M: prost::Message + prost::Name>(message: &M) -> protobuf::Any {
    protobuf::Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

/// The one value of a proto `oneof` that is set: `Err` when several are.
fn one_of<T>(at: &str, set: Vec<(&str, Option<T>)>) -> Result<Option<T>, String> {
    let names: Vec<&str> = set
        .iter()
        .filter(|(_, value)| value.is_some())
        .map(|(name, _)| *name)
        .collect();
    if names.len() > 1 {
        return Err(format!("{at}: only one of {}", names.join(", ")));
    }
    Ok(set.into_iter().find_map(|(_, value)| value))
}

/// `{}`: a message whose presence is what counts (`grpc: {}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmptyYaml {}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderValueYaml {
    pub key: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderValueOptionYaml {
    pub header: HeaderValueYaml,
    /// Deprecated in Envoy; `append_action` replaces it.
    pub append: Option<bool>,
    /// `APPEND_IF_EXISTS_OR_ADD` or `OVERWRITE_IF_EXISTS_OR_ADD`.
    #[serde(alias = "appendAction")]
    pub append_action: Option<String>,
    #[serde(default, alias = "keepEmptyValue")]
    pub keep_empty_value: bool,
}

impl HeaderValueOptionYaml {
    #[allow(deprecated)]
    fn to_proto(&self) -> Result<core_pb::HeaderValueOption, String> {
        use core_pb::header_value_option::HeaderAppendAction;
        let append_action = match &self.append_action {
            None => 0,
            Some(name) => HeaderAppendAction::from_str_name(name)
                .ok_or_else(|| format!("append_action: unknown {name}"))?
                as i32,
        };
        Ok(core_pb::HeaderValueOption {
            header: Some(core_pb::HeaderValue {
                key: self.header.key.clone(),
                value: self.header.value.clone(),
                raw_value: Vec::new(),
            }),
            append: self.append.map(|value| protobuf::BoolValue { value }),
            append_action,
            keep_empty_value: self.keep_empty_value,
        })
    }
}

fn headers_to_add(
    options: &[HeaderValueOptionYaml],
    at: &str,
) -> Result<Vec<core_pb::HeaderValueOption>, String> {
    options
        .iter()
        .enumerate()
        .map(|(index, option)| option.to_proto().map_err(|e| format!("{at}[{index}].{e}")))
        .collect()
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfigurationYaml {
    pub name: String,
    #[serde(default, alias = "virtualHosts")]
    pub virtual_hosts: Vec<VirtualHostYaml>,
    #[serde(default, alias = "requestHeadersToAdd")]
    pub request_headers_to_add: Vec<HeaderValueOptionYaml>,
    #[serde(default, alias = "requestHeadersToRemove")]
    pub request_headers_to_remove: Vec<String>,
    #[serde(default, alias = "responseHeadersToAdd")]
    pub response_headers_to_add: Vec<HeaderValueOptionYaml>,
    #[serde(default, alias = "responseHeadersToRemove")]
    pub response_headers_to_remove: Vec<String>,
}

impl RouteConfigurationYaml {
    /// The prost message, for [`envoy::convert_route_configuration`] (or
    /// to serve over xDS in tests).
    pub fn to_proto(&self) -> Result<route_pb::RouteConfiguration, String> {
        Ok(route_pb::RouteConfiguration {
            name: self.name.clone(),
            virtual_hosts: self
                .virtual_hosts
                .iter()
                .map(|vhost| {
                    vhost
                        .to_proto()
                        .map_err(|e| format!("virtual host '{}': {e}", vhost.name))
                })
                .collect::<Result<_, _>>()?,
            request_headers_to_add: headers_to_add(
                &self.request_headers_to_add,
                "request_headers_to_add",
            )?,
            request_headers_to_remove: self.request_headers_to_remove.clone(),
            response_headers_to_add: headers_to_add(
                &self.response_headers_to_add,
                "response_headers_to_add",
            )?,
            response_headers_to_remove: self.response_headers_to_remove.clone(),
            ..Default::default()
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualHostYaml {
    pub name: String,
    pub domains: Vec<String>,
    #[serde(default)]
    pub routes: Vec<RouteYaml>,
    #[serde(alias = "retryPolicy")]
    pub retry_policy: Option<RetryPolicyYaml>,
    #[serde(default, alias = "requestHeadersToAdd")]
    pub request_headers_to_add: Vec<HeaderValueOptionYaml>,
    #[serde(default, alias = "requestHeadersToRemove")]
    pub request_headers_to_remove: Vec<String>,
    #[serde(default, alias = "responseHeadersToAdd")]
    pub response_headers_to_add: Vec<HeaderValueOptionYaml>,
    #[serde(default, alias = "responseHeadersToRemove")]
    pub response_headers_to_remove: Vec<String>,
}

impl VirtualHostYaml {
    fn to_proto(&self) -> Result<route_pb::VirtualHost, String> {
        Ok(route_pb::VirtualHost {
            name: self.name.clone(),
            domains: self.domains.clone(),
            routes: self
                .routes
                .iter()
                .enumerate()
                .map(|(index, route)| {
                    route.to_proto().map_err(|e| match route.name.is_empty() {
                        true => format!("route #{index}: {e}"),
                        false => format!("route '{}': {e}", route.name),
                    })
                })
                .collect::<Result<_, _>>()?,
            retry_policy: self
                .retry_policy
                .as_ref()
                .map(|policy| policy.to_proto())
                .transpose()
                .map_err(|e| format!("retry_policy.{e}"))?,
            request_headers_to_add: headers_to_add(
                &self.request_headers_to_add,
                "request_headers_to_add",
            )?,
            request_headers_to_remove: self.request_headers_to_remove.clone(),
            response_headers_to_add: headers_to_add(
                &self.response_headers_to_add,
                "response_headers_to_add",
            )?,
            response_headers_to_remove: self.response_headers_to_remove.clone(),
            ..Default::default()
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteYaml {
    #[serde(default)]
    pub name: String,
    /// Optional here: no match is every request.
    #[serde(default, rename = "match")]
    pub matcher: RouteMatchYaml,
    pub route: Option<RouteActionYaml>,
    pub redirect: Option<RedirectYaml>,
    #[serde(alias = "directResponse")]
    pub direct_response: Option<DirectResponseYaml>,
    #[serde(default, alias = "requestHeadersToAdd")]
    pub request_headers_to_add: Vec<HeaderValueOptionYaml>,
    #[serde(default, alias = "requestHeadersToRemove")]
    pub request_headers_to_remove: Vec<String>,
    #[serde(default, alias = "responseHeadersToAdd")]
    pub response_headers_to_add: Vec<HeaderValueOptionYaml>,
    #[serde(default, alias = "responseHeadersToRemove")]
    pub response_headers_to_remove: Vec<String>,
    /// Only `envoy.filters.http.fault` (checked by the conversion).
    #[serde(default, alias = "typedPerFilterConfig")]
    pub typed_per_filter_config: BTreeMap<String, HttpFaultYaml>,
}

impl RouteYaml {
    fn to_proto(&self) -> Result<route_pb::Route, String> {
        use route_pb::route::Action;
        let action = one_of(
            "action",
            vec![
                (
                    "route",
                    self.route
                        .as_ref()
                        .map(|a| a.to_proto().map(Action::Route))
                        .transpose()
                        .map_err(|e| format!("route.{e}"))?,
                ),
                (
                    "redirect",
                    self.redirect
                        .as_ref()
                        .map(|r| r.to_proto().map(Action::Redirect))
                        .transpose()
                        .map_err(|e| format!("redirect.{e}"))?,
                ),
                (
                    "direct_response",
                    self.direct_response
                        .as_ref()
                        .map(|d| Action::DirectResponse(d.to_proto())),
                ),
            ],
        )?;
        let typed_per_filter_config = self
            .typed_per_filter_config
            .iter()
            .map(|(key, fault)| Ok((key.clone(), fault.to_any()?)))
            .collect::<Result<_, String>>()
            .map_err(|e| format!("typed_per_filter_config.{e}"))?;
        Ok(route_pb::Route {
            name: self.name.clone(),
            r#match: Some(self.matcher.to_proto().map_err(|e| format!("match.{e}"))?),
            action,
            request_headers_to_add: headers_to_add(
                &self.request_headers_to_add,
                "request_headers_to_add",
            )?,
            request_headers_to_remove: self.request_headers_to_remove.clone(),
            response_headers_to_add: headers_to_add(
                &self.response_headers_to_add,
                "response_headers_to_add",
            )?,
            response_headers_to_remove: self.response_headers_to_remove.clone(),
            typed_per_filter_config,
            ..Default::default()
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegexMatcherYaml {
    pub regex: String,
    /// Envoy's (deprecated) engine choice: RE2 is the only one.
    #[serde(alias = "googleRe2")]
    pub google_re2: Option<EmptyYaml>,
}

impl RegexMatcherYaml {
    fn to_proto(&self) -> matcher_pb::RegexMatcher {
        matcher_pb::RegexMatcher {
            regex: self.regex.clone(),
            engine_type: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatchYaml {
    pub prefix: Option<String>,
    pub path: Option<String>,
    #[serde(alias = "safeRegex")]
    pub safe_regex: Option<RegexMatcherYaml>,
    #[serde(alias = "pathSeparatedPrefix")]
    pub path_separated_prefix: Option<String>,
    #[serde(alias = "connectMatcher")]
    pub connect_matcher: Option<EmptyYaml>,
    #[serde(alias = "caseSensitive")]
    pub case_sensitive: Option<bool>,
    #[serde(default)]
    pub headers: Vec<HeaderMatcherYaml>,
    #[serde(default, alias = "queryParameters")]
    pub query_parameters: Vec<QueryParameterMatcherYaml>,
    pub grpc: Option<EmptyYaml>,
}

impl RouteMatchYaml {
    fn to_proto(&self) -> Result<route_pb::RouteMatch, String> {
        use route_pb::route_match::PathSpecifier;
        let path_specifier = one_of(
            "path specifier",
            vec![
                ("prefix", self.prefix.clone().map(PathSpecifier::Prefix)),
                ("path", self.path.clone().map(PathSpecifier::Path)),
                (
                    "safe_regex",
                    self.safe_regex
                        .as_ref()
                        .map(|r| PathSpecifier::SafeRegex(r.to_proto())),
                ),
                (
                    "path_separated_prefix",
                    self.path_separated_prefix
                        .clone()
                        .map(PathSpecifier::PathSeparatedPrefix),
                ),
                (
                    "connect_matcher",
                    self.connect_matcher.map(|_| {
                        PathSpecifier::ConnectMatcher(route_pb::route_match::ConnectMatcher {})
                    }),
                ),
            ],
        )?;
        Ok(route_pb::RouteMatch {
            case_sensitive: self
                .case_sensitive
                .map(|value| protobuf::BoolValue { value }),
            headers: self
                .headers
                .iter()
                .enumerate()
                .map(|(index, header)| {
                    header
                        .to_proto()
                        .map_err(|e| format!("headers[{index}].{e}"))
                })
                .collect::<Result<_, _>>()?,
            query_parameters: self
                .query_parameters
                .iter()
                .enumerate()
                .map(|(index, parameter)| {
                    parameter
                        .to_proto()
                        .map_err(|e| format!("query_parameters[{index}].{e}"))
                })
                .collect::<Result<_, _>>()?,
            grpc: self
                .grpc
                .map(|_| route_pb::route_match::GrpcRouteMatchOptions {}),
            path_specifier,
            ..Default::default()
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StringMatcherYaml {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub suffix: Option<String>,
    pub contains: Option<String>,
    #[serde(alias = "safeRegex")]
    pub safe_regex: Option<RegexMatcherYaml>,
    #[serde(default, alias = "ignoreCase")]
    pub ignore_case: bool,
}

impl StringMatcherYaml {
    fn to_proto(&self) -> Result<matcher_pb::StringMatcher, String> {
        use matcher_pb::string_matcher::MatchPattern;
        let match_pattern = one_of(
            "string matcher",
            vec![
                ("exact", self.exact.clone().map(MatchPattern::Exact)),
                ("prefix", self.prefix.clone().map(MatchPattern::Prefix)),
                ("suffix", self.suffix.clone().map(MatchPattern::Suffix)),
                (
                    "contains",
                    self.contains.clone().map(MatchPattern::Contains),
                ),
                (
                    "safe_regex",
                    self.safe_regex
                        .as_ref()
                        .map(|r| MatchPattern::SafeRegex(r.to_proto())),
                ),
            ],
        )?;
        Ok(matcher_pb::StringMatcher {
            ignore_case: self.ignore_case,
            match_pattern,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatcherYaml {
    pub name: String,
    #[serde(alias = "stringMatch")]
    pub string_match: Option<StringMatcherYaml>,
    #[serde(alias = "exactMatch")]
    pub exact_match: Option<String>,
    #[serde(alias = "prefixMatch")]
    pub prefix_match: Option<String>,
    #[serde(alias = "suffixMatch")]
    pub suffix_match: Option<String>,
    #[serde(alias = "containsMatch")]
    pub contains_match: Option<String>,
    #[serde(alias = "safeRegexMatch")]
    pub safe_regex_match: Option<RegexMatcherYaml>,
    #[serde(alias = "presentMatch")]
    pub present_match: Option<bool>,
    #[serde(default, alias = "invertMatch")]
    pub invert_match: bool,
    #[serde(default, alias = "treatMissingHeaderAsEmpty")]
    pub treat_missing_header_as_empty: bool,
}

impl HeaderMatcherYaml {
    #[allow(deprecated)]
    fn to_proto(&self) -> Result<route_pb::HeaderMatcher, String> {
        use route_pb::header_matcher::HeaderMatchSpecifier as Specifier;
        let specifier = one_of(
            "header matcher",
            vec![
                (
                    "string_match",
                    self.string_match
                        .as_ref()
                        .map(|m| m.to_proto().map(Specifier::StringMatch))
                        .transpose()
                        .map_err(|e| format!("string_match.{e}"))?,
                ),
                (
                    "exact_match",
                    self.exact_match.clone().map(Specifier::ExactMatch),
                ),
                (
                    "prefix_match",
                    self.prefix_match.clone().map(Specifier::PrefixMatch),
                ),
                (
                    "suffix_match",
                    self.suffix_match.clone().map(Specifier::SuffixMatch),
                ),
                (
                    "contains_match",
                    self.contains_match.clone().map(Specifier::ContainsMatch),
                ),
                (
                    "safe_regex_match",
                    self.safe_regex_match
                        .as_ref()
                        .map(|r| Specifier::SafeRegexMatch(r.to_proto())),
                ),
                (
                    "present_match",
                    self.present_match.map(Specifier::PresentMatch),
                ),
            ],
        )?;
        Ok(route_pb::HeaderMatcher {
            name: self.name.clone(),
            invert_match: self.invert_match,
            treat_missing_header_as_empty: self.treat_missing_header_as_empty,
            header_match_specifier: specifier,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryParameterMatcherYaml {
    pub name: String,
    #[serde(alias = "stringMatch")]
    pub string_match: Option<StringMatcherYaml>,
    #[serde(alias = "presentMatch")]
    pub present_match: Option<bool>,
}

impl QueryParameterMatcherYaml {
    fn to_proto(&self) -> Result<route_pb::QueryParameterMatcher, String> {
        use route_pb::query_parameter_matcher::QueryParameterMatchSpecifier as Specifier;
        let specifier = one_of(
            "query parameter matcher",
            vec![
                (
                    "string_match",
                    self.string_match
                        .as_ref()
                        .map(|m| m.to_proto().map(Specifier::StringMatch))
                        .transpose()
                        .map_err(|e| format!("string_match.{e}"))?,
                ),
                (
                    "present_match",
                    self.present_match.map(Specifier::PresentMatch),
                ),
            ],
        )?;
        Ok(route_pb::QueryParameterMatcher {
            name: self.name.clone(),
            query_parameter_match_specifier: specifier,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteActionYaml {
    pub cluster: Option<String>,
    #[serde(alias = "weightedClusters")]
    pub weighted_clusters: Option<WeightedClustersYaml>,
    /// Absent: Envoy's 15 s; `0s`: none.
    pub timeout: Option<DurationYaml>,
    #[serde(alias = "retryPolicy")]
    pub retry_policy: Option<RetryPolicyYaml>,
    #[serde(alias = "prefixRewrite")]
    pub prefix_rewrite: Option<String>,
    #[serde(alias = "hostRewriteLiteral")]
    pub host_rewrite_literal: Option<String>,
    #[serde(default, alias = "requestMirrorPolicies")]
    pub request_mirror_policies: Vec<MirrorPolicyYaml>,
    #[serde(default, alias = "hashPolicy")]
    pub hash_policy: Vec<HashPolicyYaml>,
}

impl RouteActionYaml {
    fn to_proto(&self) -> Result<route_pb::RouteAction, String> {
        use route_pb::route_action::{ClusterSpecifier, HostRewriteSpecifier};
        let cluster_specifier = one_of(
            "cluster",
            vec![
                (
                    "cluster",
                    self.cluster.clone().map(ClusterSpecifier::Cluster),
                ),
                (
                    "weighted_clusters",
                    self.weighted_clusters
                        .as_ref()
                        .map(|w| w.to_proto().map(ClusterSpecifier::WeightedClusters))
                        .transpose()
                        .map_err(|e| format!("weighted_clusters.{e}"))?,
                ),
            ],
        )?;
        Ok(route_pb::RouteAction {
            cluster_specifier,
            timeout: duration(&self.timeout),
            retry_policy: self
                .retry_policy
                .as_ref()
                .map(|policy| policy.to_proto())
                .transpose()
                .map_err(|e| format!("retry_policy.{e}"))?,
            prefix_rewrite: self.prefix_rewrite.clone().unwrap_or_default(),
            host_rewrite_specifier: self
                .host_rewrite_literal
                .clone()
                .map(HostRewriteSpecifier::HostRewriteLiteral),
            request_mirror_policies: self
                .request_mirror_policies
                .iter()
                .enumerate()
                .map(|(index, mirror)| {
                    mirror
                        .to_proto()
                        .map_err(|e| format!("request_mirror_policies[{index}].{e}"))
                })
                .collect::<Result<_, _>>()?,
            hash_policy: self
                .hash_policy
                .iter()
                .enumerate()
                .map(|(index, policy)| {
                    policy
                        .to_proto()
                        .map_err(|e| format!("hash_policy[{index}].{e}"))
                })
                .collect::<Result<_, _>>()?,
            ..Default::default()
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedClustersYaml {
    pub clusters: Vec<ClusterWeightYaml>,
}

impl WeightedClustersYaml {
    fn to_proto(&self) -> Result<route_pb::WeightedCluster, String> {
        Ok(route_pb::WeightedCluster {
            clusters: self
                .clusters
                .iter()
                .enumerate()
                .map(|(index, cluster)| {
                    cluster
                        .to_proto()
                        .map_err(|e| format!("clusters[{index}].{e}"))
                })
                .collect::<Result<_, _>>()?,
            ..Default::default()
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterWeightYaml {
    pub name: String,
    pub weight: Option<u32>,
    #[serde(default, alias = "requestHeadersToAdd")]
    pub request_headers_to_add: Vec<HeaderValueOptionYaml>,
    #[serde(default, alias = "requestHeadersToRemove")]
    pub request_headers_to_remove: Vec<String>,
    #[serde(default, alias = "responseHeadersToAdd")]
    pub response_headers_to_add: Vec<HeaderValueOptionYaml>,
    #[serde(default, alias = "responseHeadersToRemove")]
    pub response_headers_to_remove: Vec<String>,
}

impl ClusterWeightYaml {
    fn to_proto(&self) -> Result<route_pb::weighted_cluster::ClusterWeight, String> {
        Ok(route_pb::weighted_cluster::ClusterWeight {
            name: self.name.clone(),
            weight: u32_value(self.weight),
            request_headers_to_add: headers_to_add(
                &self.request_headers_to_add,
                "request_headers_to_add",
            )?,
            request_headers_to_remove: self.request_headers_to_remove.clone(),
            response_headers_to_add: headers_to_add(
                &self.response_headers_to_add,
                "response_headers_to_add",
            )?,
            response_headers_to_remove: self.response_headers_to_remove.clone(),
            ..Default::default()
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicyYaml {
    #[serde(default, alias = "retryOn")]
    pub retry_on: String,
    #[serde(alias = "numRetries")]
    pub num_retries: Option<u32>,
    #[serde(alias = "perTryTimeout")]
    pub per_try_timeout: Option<DurationYaml>,
    #[serde(alias = "retryBackOff")]
    pub retry_back_off: Option<RetryBackOffYaml>,
    #[serde(default, alias = "retriableStatusCodes")]
    pub retriable_status_codes: Vec<u32>,
}

impl RetryPolicyYaml {
    fn to_proto(&self) -> Result<route_pb::RetryPolicy, String> {
        Ok(route_pb::RetryPolicy {
            retry_on: self.retry_on.clone(),
            num_retries: u32_value(self.num_retries),
            per_try_timeout: duration(&self.per_try_timeout),
            retry_back_off: self.retry_back_off.as_ref().map(|backoff| {
                route_pb::retry_policy::RetryBackOff {
                    base_interval: duration(&backoff.base_interval),
                    max_interval: duration(&backoff.max_interval),
                }
            }),
            retriable_status_codes: self.retriable_status_codes.clone(),
            ..Default::default()
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBackOffYaml {
    #[serde(alias = "baseInterval")]
    pub base_interval: Option<DurationYaml>,
    #[serde(alias = "maxInterval")]
    pub max_interval: Option<DurationYaml>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FractionalPercentYaml {
    #[serde(default)]
    pub numerator: u32,
    /// `HUNDRED` (default), `TEN_THOUSAND` or `MILLION`.
    pub denominator: Option<String>,
}

impl FractionalPercentYaml {
    fn to_proto(&self) -> Result<type_pb::FractionalPercent, String> {
        use type_pb::fractional_percent::DenominatorType;
        let denominator = match &self.denominator {
            None => DenominatorType::Hundred,
            Some(name) => DenominatorType::from_str_name(name)
                .ok_or_else(|| format!("denominator: unknown {name}"))?,
        };
        Ok(type_pb::FractionalPercent {
            numerator: self.numerator,
            denominator: denominator as i32,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeFractionYaml {
    #[serde(alias = "defaultValue")]
    pub default_value: FractionalPercentYaml,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorPolicyYaml {
    pub cluster: String,
    /// Absent: every request.
    #[serde(alias = "runtimeFraction")]
    pub runtime_fraction: Option<RuntimeFractionYaml>,
}

impl MirrorPolicyYaml {
    fn to_proto(&self) -> Result<route_pb::route_action::RequestMirrorPolicy, String> {
        Ok(route_pb::route_action::RequestMirrorPolicy {
            cluster: self.cluster.clone(),
            runtime_fraction: self
                .runtime_fraction
                .as_ref()
                .map(|fraction| {
                    Ok::<_, String>(core_pb::RuntimeFractionalPercent {
                        default_value: Some(fraction.default_value.to_proto()?),
                        runtime_key: String::new(),
                    })
                })
                .transpose()
                .map_err(|e| format!("runtime_fraction.default_value.{e}"))?,
            ..Default::default()
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashHeaderYaml {
    #[serde(alias = "headerName")]
    pub header_name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameYaml {
    pub name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionPropertiesYaml {
    #[serde(default, alias = "sourceIp")]
    pub source_ip: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashPolicyYaml {
    pub header: Option<HashHeaderYaml>,
    pub cookie: Option<NameYaml>,
    #[serde(alias = "connectionProperties")]
    pub connection_properties: Option<ConnectionPropertiesYaml>,
    #[serde(alias = "queryParameter")]
    pub query_parameter: Option<NameYaml>,
    #[serde(default)]
    pub terminal: bool,
}

impl HashPolicyYaml {
    fn to_proto(&self) -> Result<route_pb::route_action::HashPolicy, String> {
        use route_pb::route_action::hash_policy::{
            ConnectionProperties, Cookie, Header, PolicySpecifier, QueryParameter,
        };
        let policy_specifier = one_of(
            "hash policy",
            vec![
                (
                    "header",
                    self.header.as_ref().map(|h| {
                        PolicySpecifier::Header(Header {
                            header_name: h.header_name.clone(),
                            regex_rewrite: None,
                        })
                    }),
                ),
                (
                    "cookie",
                    self.cookie.as_ref().map(|c| {
                        PolicySpecifier::Cookie(Cookie {
                            name: c.name.clone(),
                            ..Default::default()
                        })
                    }),
                ),
                (
                    "connection_properties",
                    self.connection_properties.as_ref().map(|c| {
                        PolicySpecifier::ConnectionProperties(ConnectionProperties {
                            source_ip: c.source_ip,
                        })
                    }),
                ),
                (
                    "query_parameter",
                    self.query_parameter.as_ref().map(|q| {
                        PolicySpecifier::QueryParameter(QueryParameter {
                            name: q.name.clone(),
                        })
                    }),
                ),
            ],
        )?;
        Ok(route_pb::route_action::HashPolicy {
            terminal: self.terminal,
            policy_specifier,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectYaml {
    #[serde(alias = "schemeRedirect")]
    pub scheme_redirect: Option<String>,
    #[serde(alias = "httpsRedirect")]
    pub https_redirect: Option<bool>,
    #[serde(alias = "hostRedirect")]
    pub host_redirect: Option<String>,
    #[serde(alias = "portRedirect")]
    pub port_redirect: Option<u32>,
    #[serde(alias = "pathRedirect")]
    pub path_redirect: Option<String>,
    #[serde(alias = "prefixRewrite")]
    pub prefix_rewrite: Option<String>,
    /// `MOVED_PERMANENTLY` (default), `FOUND`, `SEE_OTHER`,
    /// `TEMPORARY_REDIRECT` or `PERMANENT_REDIRECT`.
    #[serde(alias = "responseCode")]
    pub response_code: Option<String>,
    #[serde(default, alias = "stripQuery")]
    pub strip_query: bool,
}

impl RedirectYaml {
    fn to_proto(&self) -> Result<route_pb::RedirectAction, String> {
        use route_pb::redirect_action::{
            PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier,
        };
        let response_code = match &self.response_code {
            None => 0,
            Some(name) => RedirectResponseCode::from_str_name(name)
                .ok_or_else(|| format!("response_code: unknown {name}"))?
                as i32,
        };
        Ok(route_pb::RedirectAction {
            host_redirect: self.host_redirect.clone().unwrap_or_default(),
            port_redirect: self.port_redirect.unwrap_or(0),
            response_code,
            strip_query: self.strip_query,
            scheme_rewrite_specifier: one_of(
                "scheme",
                vec![
                    (
                        "scheme_redirect",
                        self.scheme_redirect
                            .clone()
                            .map(SchemeRewriteSpecifier::SchemeRedirect),
                    ),
                    (
                        "https_redirect",
                        self.https_redirect
                            .map(SchemeRewriteSpecifier::HttpsRedirect),
                    ),
                ],
            )?,
            path_rewrite_specifier: one_of(
                "path",
                vec![
                    (
                        "path_redirect",
                        self.path_redirect
                            .clone()
                            .map(PathRewriteSpecifier::PathRedirect),
                    ),
                    (
                        "prefix_rewrite",
                        self.prefix_rewrite
                            .clone()
                            .map(PathRewriteSpecifier::PrefixRewrite),
                    ),
                ],
            )?,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSourceYaml {
    #[serde(alias = "inlineString")]
    pub inline_string: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectResponseYaml {
    pub status: u32,
    pub body: Option<DataSourceYaml>,
}

impl DirectResponseYaml {
    fn to_proto(&self) -> route_pb::DirectResponseAction {
        route_pb::DirectResponseAction {
            status: self.status,
            body: self.body.as_ref().map(|body| core_pb::DataSource {
                watched_directory: None,
                specifier: Some(core_pb::data_source::Specifier::InlineString(
                    body.inline_string.clone(),
                )),
            }),
            body_format: None,
        }
    }
}

/// `typed_per_filter_config["envoy.filters.http.fault"]`: Envoy's `HTTPFault`
/// with its `@type`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpFaultYaml {
    #[serde(rename = "@type")]
    pub type_url: String,
    pub delay: Option<FaultDelayYaml>,
    pub abort: Option<FaultAbortYaml>,
}

impl HttpFaultYaml {
    fn to_any(&self) -> Result<protobuf::Any, String> {
        if self.type_url != envoy::FAULT_TYPE {
            return Err(format!(
                "@type {:?}: only {} is supported",
                self.type_url,
                envoy::FAULT_TYPE
            ));
        }
        let percentage = |value: &Option<FractionalPercentYaml>| {
            value
                .as_ref()
                .map(FractionalPercentYaml::to_proto)
                .transpose()
                .map_err(|e| format!("percentage.{e}"))
        };
        let delay = self
            .delay
            .as_ref()
            .map(|delay| {
                Ok::<_, String>(fault_common_pb::FaultDelay {
                    percentage: percentage(&delay.percentage)?,
                    fault_delay_secifier: Some(
                        fault_common_pb::fault_delay::FaultDelaySecifier::FixedDelay(
                            delay.fixed_delay.0,
                        ),
                    ),
                })
            })
            .transpose()
            .map_err(|e| format!("delay.{e}"))?;
        let abort = self
            .abort
            .as_ref()
            .map(|abort| {
                use fault_pb::fault_abort::ErrorType;
                Ok::<_, String>(fault_pb::FaultAbort {
                    percentage: percentage(&abort.percentage)?,
                    response_body: String::new(),
                    error_type: one_of(
                        "error",
                        vec![
                            ("http_status", abort.http_status.map(ErrorType::HttpStatus)),
                            ("grpc_status", abort.grpc_status.map(ErrorType::GrpcStatus)),
                        ],
                    )?,
                })
            })
            .transpose()
            .map_err(|e| format!("abort.{e}"))?;
        Ok(any(&fault_pb::HttpFault {
            delay,
            abort,
            ..Default::default()
        }))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultDelayYaml {
    #[serde(alias = "fixedDelay")]
    pub fixed_delay: DurationYaml,
    /// Absent: 0 %, as in Envoy.
    pub percentage: Option<FractionalPercentYaml>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultAbortYaml {
    #[serde(alias = "httpStatus")]
    pub http_status: Option<u32>,
    #[serde(alias = "grpcStatus")]
    pub grpc_status: Option<u32>,
    /// Absent: 0 %, as in Envoy.
    pub percentage: Option<FractionalPercentYaml>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterYaml {
    pub name: String,
    /// Envoy's discovery type: `STATIC` (default), `STRICT_DNS`,
    /// `LOGICAL_DNS` or `EDS` (see `envoy::convert_cluster`).
    #[serde(rename = "type")]
    pub discovery_type: Option<String>,
    /// `ROUND_ROBIN` (default), `LEAST_REQUEST`, `RANDOM`, `RING_HASH` or
    /// `MAGLEV`.
    #[serde(alias = "lbPolicy")]
    pub lb_policy: Option<String>,
    #[serde(alias = "connectTimeout")]
    pub connect_timeout: Option<DurationYaml>,
    #[serde(alias = "leastRequestLbConfig")]
    pub least_request_lb_config: Option<LeastRequestLbConfigYaml>,
    #[serde(alias = "ringHashLbConfig")]
    pub ring_hash_lb_config: Option<RingHashLbConfigYaml>,
    #[serde(alias = "loadAssignment")]
    pub load_assignment: Option<LoadAssignmentYaml>,
    #[serde(alias = "http2ProtocolOptions")]
    pub http2_protocol_options: Option<EmptyYaml>,
    #[serde(default, alias = "typedExtensionProtocolOptions")]
    pub typed_extension_protocol_options: BTreeMap<String, HttpProtocolOptionsYaml>,
    #[serde(alias = "circuitBreakers")]
    pub circuit_breakers: Option<CircuitBreakersYaml>,
    #[serde(alias = "outlierDetection")]
    pub outlier_detection: Option<OutlierDetectionYaml>,
    pub metadata: Option<MetadataYaml>,
}

impl Eq for ClusterYaml {}

impl ClusterYaml {
    /// The prost message, for [`envoy::convert_cluster`] (or to serve over
    /// xDS in tests).
    #[allow(deprecated)]
    pub fn to_proto(&self) -> Result<cluster_pb::Cluster, String> {
        use cluster_pb::cluster::{ClusterDiscoveryType, DiscoveryType, LbConfig, LbPolicy};
        let cluster_discovery_type = match &self.discovery_type {
            None => None,
            Some(name) => Some(ClusterDiscoveryType::Type(
                DiscoveryType::from_str_name(name).ok_or_else(|| format!("type: unknown {name}"))?
                    as i32,
            )),
        };
        let lb_policy = match &self.lb_policy {
            None => LbPolicy::RoundRobin,
            Some(name) => {
                LbPolicy::from_str_name(name).ok_or_else(|| format!("lb_policy: unknown {name}"))?
            }
        };
        let lb_config = one_of(
            "lb config",
            vec![
                (
                    "least_request_lb_config",
                    self.least_request_lb_config.as_ref().map(|config| {
                        LbConfig::LeastRequestLbConfig(cluster_pb::cluster::LeastRequestLbConfig {
                            choice_count: u32_value(config.choice_count),
                            ..Default::default()
                        })
                    }),
                ),
                (
                    "ring_hash_lb_config",
                    self.ring_hash_lb_config.as_ref().map(|config| {
                        LbConfig::RingHashLbConfig(cluster_pb::cluster::RingHashLbConfig {
                            minimum_ring_size: config
                                .minimum_ring_size
                                .map(|value| protobuf::UInt64Value { value }),
                            ..Default::default()
                        })
                    }),
                ),
            ],
        )?;
        Ok(cluster_pb::Cluster {
            name: self.name.clone(),
            cluster_discovery_type,
            lb_policy: lb_policy as i32,
            lb_config,
            connect_timeout: duration(&self.connect_timeout),
            load_assignment: self
                .load_assignment
                .as_ref()
                .map(|assignment| assignment.to_proto(&self.name)),
            http2_protocol_options: self
                .http2_protocol_options
                .map(|_| core_pb::Http2ProtocolOptions::default()),
            typed_extension_protocol_options: self
                .typed_extension_protocol_options
                .iter()
                .map(|(key, options)| Ok((key.clone(), options.to_any()?)))
                .collect::<Result<_, String>>()
                .map_err(|e| format!("typed_extension_protocol_options.{e}"))?,
            circuit_breakers: self
                .circuit_breakers
                .as_ref()
                .map(CircuitBreakersYaml::to_proto)
                .transpose()
                .map_err(|e| format!("circuit_breakers.{e}"))?,
            outlier_detection: self.outlier_detection.as_ref().map(|o| o.to_proto()),
            metadata: self.metadata.as_ref().map(MetadataYaml::to_proto),
            ..Default::default()
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeastRequestLbConfigYaml {
    #[serde(alias = "choiceCount")]
    pub choice_count: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingHashLbConfigYaml {
    #[serde(alias = "minimumRingSize")]
    pub minimum_ring_size: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadAssignmentYaml {
    #[serde(default, alias = "clusterName")]
    pub cluster_name: String,
    #[serde(default)]
    pub endpoints: Vec<LocalityLbEndpointsYaml>,
}

impl LoadAssignmentYaml {
    fn to_proto(&self, cluster: &str) -> endpoint_pb::ClusterLoadAssignment {
        use core_pb::{address::Address, socket_address::PortSpecifier};
        let endpoint = |e: &LbEndpointYaml| endpoint_pb::LbEndpoint {
            host_identifier: Some(endpoint_pb::lb_endpoint::HostIdentifier::Endpoint(
                endpoint_pb::Endpoint {
                    address: Some(core_pb::Address {
                        address: Some(Address::SocketAddress(core_pb::SocketAddress {
                            address: e.endpoint.address.socket_address.address.clone(),
                            port_specifier: Some(PortSpecifier::PortValue(
                                e.endpoint.address.socket_address.port_value,
                            )),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        endpoint_pb::ClusterLoadAssignment {
            cluster_name: if self.cluster_name.is_empty() {
                cluster.to_string()
            } else {
                self.cluster_name.clone()
            },
            endpoints: self
                .endpoints
                .iter()
                .map(|locality| endpoint_pb::LocalityLbEndpoints {
                    lb_endpoints: locality.lb_endpoints.iter().map(endpoint).collect(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalityLbEndpointsYaml {
    #[serde(default, alias = "lbEndpoints")]
    pub lb_endpoints: Vec<LbEndpointYaml>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbEndpointYaml {
    pub endpoint: EndpointYaml,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointYaml {
    pub address: AddressYaml,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressYaml {
    #[serde(alias = "socketAddress")]
    pub socket_address: SocketAddressYaml,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketAddressYaml {
    /// An IP address: hostnames are not resolved.
    pub address: String,
    #[serde(alias = "portValue")]
    pub port_value: u32,
}

/// `typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProtocolOptionsYaml {
    #[serde(rename = "@type")]
    pub type_url: String,
    #[serde(alias = "explicitHttpConfig")]
    pub explicit_http_config: Option<ExplicitHttpConfigYaml>,
}

impl HttpProtocolOptionsYaml {
    fn to_any(&self) -> Result<protobuf::Any, String> {
        use upstream_pb::http_protocol_options::{
            ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
        };
        if self.type_url != envoy::HTTP_PROTOCOL_OPTIONS_TYPE {
            return Err(format!(
                "@type {:?}: only {} is supported",
                self.type_url,
                envoy::HTTP_PROTOCOL_OPTIONS_TYPE
            ));
        }
        let upstream_protocol_options = match &self.explicit_http_config {
            None => None,
            Some(explicit) => Some(UpstreamProtocolOptions::ExplicitHttpConfig(
                ExplicitHttpConfig {
                    protocol_config: one_of(
                        "explicit_http_config",
                        vec![
                            (
                                "http_protocol_options",
                                explicit.http_protocol_options.map(|_| {
                                    ProtocolConfig::HttpProtocolOptions(Default::default())
                                }),
                            ),
                            (
                                "http2_protocol_options",
                                explicit.http2_protocol_options.map(|_| {
                                    ProtocolConfig::Http2ProtocolOptions(Default::default())
                                }),
                            ),
                        ],
                    )?,
                },
            )),
        };
        Ok(any(&upstream_pb::HttpProtocolOptions {
            upstream_protocol_options,
            ..Default::default()
        }))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplicitHttpConfigYaml {
    #[serde(alias = "httpProtocolOptions")]
    pub http_protocol_options: Option<EmptyYaml>,
    #[serde(alias = "http2ProtocolOptions")]
    pub http2_protocol_options: Option<EmptyYaml>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakersYaml {
    #[serde(default)]
    pub thresholds: Vec<ThresholdsYaml>,
}

impl CircuitBreakersYaml {
    fn to_proto(&self) -> Result<cluster_pb::CircuitBreakers, String> {
        Ok(cluster_pb::CircuitBreakers {
            thresholds: self
                .thresholds
                .iter()
                .enumerate()
                .map(|(index, t)| t.to_proto().map_err(|e| format!("thresholds[{index}].{e}")))
                .collect::<Result<_, _>>()?,
            per_host_thresholds: Vec::new(),
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdsYaml {
    /// `DEFAULT` (default) or `HIGH`.
    pub priority: Option<String>,
    #[serde(alias = "maxConnections")]
    pub max_connections: Option<u32>,
    #[serde(alias = "maxPendingRequests")]
    pub max_pending_requests: Option<u32>,
    #[serde(alias = "maxRequests")]
    pub max_requests: Option<u32>,
    #[serde(alias = "maxRetries")]
    pub max_retries: Option<u32>,
    #[serde(alias = "retryBudget")]
    pub retry_budget: Option<RetryBudgetYaml>,
}

impl ThresholdsYaml {
    fn to_proto(&self) -> Result<cluster_pb::circuit_breakers::Thresholds, String> {
        let priority = match &self.priority {
            None => core_pb::RoutingPriority::Default,
            Some(name) => core_pb::RoutingPriority::from_str_name(name)
                .ok_or_else(|| format!("priority: unknown {name}"))?,
        };
        Ok(cluster_pb::circuit_breakers::Thresholds {
            priority: priority as i32,
            max_connections: u32_value(self.max_connections),
            max_pending_requests: u32_value(self.max_pending_requests),
            max_requests: u32_value(self.max_requests),
            max_retries: u32_value(self.max_retries),
            retry_budget: self.retry_budget.as_ref().map(|budget| {
                cluster_pb::circuit_breakers::thresholds::RetryBudget {
                    budget_percent: budget.budget_percent.as_ref().map(|percent| {
                        type_pb::Percent {
                            value: percent.value,
                        }
                    }),
                    budget_interval: None,
                    min_retry_concurrency: u32_value(budget.min_retry_concurrency),
                }
            }),
            ..Default::default()
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudgetYaml {
    /// `{value: 20.0}`, as Envoy's `Percent`.
    #[serde(alias = "budgetPercent")]
    pub budget_percent: Option<PercentYaml>,
    #[serde(alias = "minRetryConcurrency")]
    pub min_retry_concurrency: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PercentYaml {
    pub value: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetectionYaml {
    #[serde(alias = "consecutive5xx")]
    pub consecutive_5xx: Option<u32>,
    #[serde(alias = "consecutiveGatewayFailure")]
    pub consecutive_gateway_failure: Option<u32>,
    #[serde(alias = "enforcingConsecutive5xx")]
    pub enforcing_consecutive_5xx: Option<u32>,
    #[serde(alias = "enforcingConsecutiveGatewayFailure")]
    pub enforcing_consecutive_gateway_failure: Option<u32>,
    pub interval: Option<DurationYaml>,
    #[serde(alias = "baseEjectionTime")]
    pub base_ejection_time: Option<DurationYaml>,
    #[serde(alias = "maxEjectionPercent")]
    pub max_ejection_percent: Option<u32>,
}

impl OutlierDetectionYaml {
    fn to_proto(&self) -> cluster_pb::OutlierDetection {
        cluster_pb::OutlierDetection {
            consecutive_5xx: u32_value(self.consecutive_5xx),
            consecutive_gateway_failure: u32_value(self.consecutive_gateway_failure),
            enforcing_consecutive_5xx: u32_value(self.enforcing_consecutive_5xx),
            enforcing_consecutive_gateway_failure: u32_value(
                self.enforcing_consecutive_gateway_failure,
            ),
            interval: duration(&self.interval),
            base_ejection_time: duration(&self.base_ejection_time),
            max_ejection_percent: u32_value(self.max_ejection_percent),
            ..Default::default()
        }
    }
}

/// `metadata.filter_metadata`: any JSON-like values, kept as protobuf
/// `Struct`s (Weir reads `istio.subset_labels`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataYaml {
    #[serde(default, alias = "filterMetadata")]
    pub filter_metadata: BTreeMap<String, serde_json::Map<String, serde_json::Value>>,
}

impl MetadataYaml {
    fn to_proto(&self) -> core_pb::Metadata {
        core_pb::Metadata {
            filter_metadata: self
                .filter_metadata
                .iter()
                .map(|(key, fields)| (key.clone(), json_struct(fields)))
                .collect(),
            typed_filter_metadata: Default::default(),
        }
    }
}

fn json_struct(fields: &serde_json::Map<String, serde_json::Value>) -> protobuf::Struct {
    protobuf::Struct {
        fields: fields
            .iter()
            .map(|(key, value)| (key.clone(), json_value(value)))
            .collect(),
    }
}

fn json_value(value: &serde_json::Value) -> protobuf::Value {
    use protobuf::value::Kind;
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(items) => Kind::ListValue(protobuf::ListValue {
            values: items.iter().map(json_value).collect(),
        }),
        serde_json::Value::Object(fields) => Kind::StructValue(json_struct(fields)),
    };
    protobuf::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::routing::{
        ClusterEndpoints, FaultAbort, LbPolicy, PathMatch, RouteAction, StringMatch,
    };

    const DOCUMENT: &str = r#"
route_configs:
- name: reviews.default.svc.cluster.local
  response_headers_to_add:
  - header: {key: x-mesh, value: weir}
  virtual_hosts:
  - name: reviews
    domains: ["reviews", "reviews.default.svc.cluster.local:9080"]
    retry_policy: {retry_on: connect-failure}
    request_headers_to_remove: [x-debug]
    routes:
    - name: canary
      match:
        prefix: /api
        headers:
        - name: x-canary
          string_match: {exact: "1"}
        - {name: ":method", exact_match: GET}
      route:
        weighted_clusters:
          clusters:
          - name: "outbound|9080|v1|reviews.default.svc.cluster.local"
            weight: 90
          - name: "outbound|9080|v2|reviews.default.svc.cluster.local"
            weight: 10
            request_headers_to_add:
            - header: {key: x-subset, value: v2}
              append_action: OVERWRITE_IF_EXISTS_OR_ADD
        timeout: 2.5s
        retry_policy:
          retry_on: 5xx,unavailable
          num_retries: 3
          per_try_timeout: 0.5s
          retry_back_off: {base_interval: 0.1s}
      typed_per_filter_config:
        envoy.filters.http.fault:
          "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
          delay:
            fixed_delay: 1s
            percentage: {numerator: 5}
          abort:
            http_status: 503
            percentage: {numerator: 1000, denominator: TEN_THOUSAND}
    - name: moved
      match: {path: /old}
      redirect: {path_redirect: /new, response_code: FOUND}
    - name: fallback
      direct_response: {status: 404, body: {inline_string: nothing here}}
clusters:
- name: "outbound|9080|v2|reviews.default.svc.cluster.local"
  lb_policy: LEAST_REQUEST
  connect_timeout: 1s
  typed_extension_protocol_options:
    envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
      "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
      explicit_http_config: {http2_protocol_options: {}}
  circuit_breakers:
    thresholds:
    - {max_requests: 100, retry_budget: {budget_percent: {value: 25.0}}}
  outlier_detection: {consecutive_5xx: 3, interval: 5s}
  metadata: {filter_metadata: {istio: {subset_labels: {version: v2}}}}
- name: legacy
  type: STATIC
  loadAssignment:
    endpoints:
    - lb_endpoints:
      - endpoint: {address: {socket_address: {address: 10.0.0.9, port_value: 8080}}}
"#;

    fn parse(text: &str) -> Result<RouteTable, String> {
        let file: FileRouting = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        table(&file)
    }

    #[test]
    fn a_document_parses_into_the_model() {
        let table = parse(DOCUMENT).expect("valid");
        let config = &table.route_configs["reviews.default.svc.cluster.local"];
        assert_eq!(config.response_headers.add[0].0.as_str(), "x-mesh");
        let vhost = &config.virtual_hosts[0];
        assert_eq!(
            vhost.domains,
            ["reviews", "reviews.default.svc.cluster.local:9080"]
        );
        assert!(
            vhost
                .retry_policy
                .as_ref()
                .is_some_and(|p| p.retry_on.connect_failure)
        );
        assert_eq!(vhost.request_headers.remove[0].as_str(), "x-debug");

        let canary = &vhost.routes[0];
        assert!(matches!(&canary.matcher.path, PathMatch::Prefix(p) if p == "/api"));
        assert_eq!(canary.matcher.headers.len(), 2);
        assert!(matches!(
            &canary.matcher.headers[0].value,
            Some(m) if matches!(&m.kind, StringMatch::Exact(v) if v == "1")
        ));
        assert_eq!(canary.matcher.headers[1].name, ":method");
        let RouteAction::Forward(forward) = &canary.action else {
            panic!("{:?}", canary.action)
        };
        let weights: Vec<u32> = forward.clusters.iter().map(|c| c.weight).collect();
        assert_eq!(weights, [90, 10]);
        assert!(!forward.clusters[1].request_headers.add[0].2, "overwrite");
        assert_eq!(forward.timeout, Some(Duration::from_millis(2500)));
        let retry = forward.retry_policy.as_ref().expect("retry policy");
        assert!(retry.retry_on.five_xx);
        assert_eq!(retry.retry_on.grpc_statuses, [14]);
        assert_eq!(retry.num_retries, 3);
        assert_eq!(retry.per_try_timeout, Some(Duration::from_millis(500)));
        assert_eq!(retry.backoff_base, Duration::from_millis(100));
        let fault = canary.fault.as_ref().expect("fault");
        assert!(
            matches!(fault.delay, Some((d, f)) if d == Duration::from_secs(1) && (f - 0.05).abs() < 1e-9)
        );
        assert!(
            matches!(fault.abort, Some((FaultAbort::Http(s), f)) if s.as_u16() == 503 && (f - 0.1).abs() < 1e-9)
        );

        let RouteAction::Redirect(redirect) = &vhost.routes[1].action else {
            panic!("not a redirect")
        };
        assert_eq!(
            (redirect.path.as_deref(), redirect.status.as_u16()),
            (Some("/new"), 302)
        );
        assert!(matches!(vhost.routes[2].matcher.path, PathMatch::Any));
        assert!(matches!(
            &vhost.routes[2].action,
            RouteAction::DirectResponse { status, body: Some(body) } if status.as_u16() == 404 && body == "nothing here"
        ));

        let v2 = &table.clusters["outbound|9080|v2|reviews.default.svc.cluster.local"];
        assert_eq!(v2.lb_policy, LbPolicy::LeastRequest { choice_count: 2 });
        assert_eq!(v2.connect_timeout, Duration::from_secs(1));
        assert!(v2.http2);
        assert_eq!(v2.circuit_breakers.max_requests, 100);
        assert_eq!(
            v2.circuit_breakers.retry_budget.map(|b| b.budget_percent),
            Some(25.0)
        );
        let outlier = v2.outlier_detection.expect("outlier detection");
        assert_eq!(
            (outlier.consecutive_5xx, outlier.interval),
            (3, Duration::from_secs(5))
        );
        assert!(matches!(
            &v2.endpoints,
            ClusterEndpoints::Service { hostname, port: 9080, subset }
                if hostname == "reviews.default.svc.cluster.local"
                    && subset == &[("version".to_string(), "v2".to_string())]
        ));
        assert!(matches!(
            &table.clusters["legacy"].endpoints,
            ClusterEndpoints::Static(addresses) if addresses == &["10.0.0.9:8080".parse().expect("address")]
        ));
    }

    #[test]
    fn an_unknown_field_is_rejected_with_its_name() {
        let error = parse(&DOCUMENT.replace(
            "num_retries: 3",
            "num_retries: 3\n          retry_host_predicates: []",
        ))
        .unwrap_err();
        assert!(
            error.contains("unknown field `retry_host_predicates`"),
            "{error}"
        );
    }

    #[test]
    fn conversion_errors_name_the_entry() {
        let error = parse(
            &DOCUMENT
                .replace("weight: 90", "weight: 0")
                .replace("weight: 10", "weight: 0"),
        )
        .unwrap_err();
        assert!(
            error.starts_with("route_configs[0] (reviews.default.svc.cluster.local): route 'canary' in virtual host 'reviews': route.weighted_clusters"),
            "{error}"
        );
        let error =
            parse(&DOCUMENT.replace("prefix: /api", "prefix: /api\n        path: /x")).unwrap_err();
        assert!(error.contains("only one of prefix, path"), "{error}");
        let error = parse(&DOCUMENT.replace("timeout: 2.5s", "timeout: 2500ms")).unwrap_err();
        assert!(error.contains("\"2500ms\""), "{error}");
        let error = parse(&DOCUMENT.replace("address: 10.0.0.9", "address: legacy.example.com"))
            .unwrap_err();
        assert!(error.starts_with("clusters[1] (legacy): "), "{error}");
    }

    #[test]
    fn durations_in_envoy_json_form() {
        let parsed = |text: &str| {
            text.parse::<DurationYaml>()
                .map(|d| (d.0.seconds, d.0.nanos))
        };
        assert_eq!(parsed("1.5s"), Ok((1, 500_000_000)));
        assert_eq!(parsed("0.000000001s"), Ok((0, 1)));
        assert_eq!(parsed("30s"), Ok((30, 0)));
        for bad in ["1", "s", ".5s", "-1s", "1.0000000001s", "1ms"] {
            assert!(parsed(bad).is_err(), "{bad}");
        }
    }
}
