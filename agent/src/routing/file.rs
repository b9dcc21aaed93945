//! Routes and clusters written in the local config file.
//!
//! The `routing:` section holds Envoy resources exactly as
//! `istioctl proxy-config route|cluster … -o json|yaml` prints them
//! (proto3 JSON, or the same in YAML; either field spelling). Each entry is
//! read by Envoy's own descriptors into the prost message xDS decodes
//! (routing/schema.rs), then goes through [`envoy::convert_route_configuration`]
//! and [`envoy::convert_cluster`]: the file and xDS share one schema and one
//! validation path. An unknown field is an error naming it.
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
use std::sync::Arc;

use serde::{Deserialize, Deserializer};

use super::{
    RouteTable, envoy,
    envoy::pb::envoy::config::{
        cluster::v3 as cluster_pb, endpoint::v3 as endpoint_pb, route::v3 as route_pb,
    },
    schema,
};

/// `routing:` in the config file: Envoy's messages, read and checked for
/// their schema when the file is parsed, converted by [`table`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileRouting {
    pub route_configs: Vec<route_pb::RouteConfiguration>,
    pub clusters: Vec<cluster_pb::Cluster>,
    /// `ClusterLoadAssignment`s for `type: EDS` clusters, as EDS would
    /// deliver them.
    pub endpoints: Vec<endpoint_pb::ClusterLoadAssignment>,
}

// Percentages are finite numbers from YAML; nothing compares NaNs.
impl Eq for FileRouting {}

impl<'de> Deserialize<'de> for FileRouting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Sections {
            #[serde(default, alias = "routeConfigs")]
            route_configs: Vec<serde_yaml::Value>,
            #[serde(default)]
            clusters: Vec<serde_yaml::Value>,
            #[serde(default)]
            endpoints: Vec<serde_yaml::Value>,
        }
        let sections = Sections::deserialize(deserializer)?;
        Ok(FileRouting {
            route_configs: messages("route_configs", sections.route_configs)
                .map_err(serde::de::Error::custom)?,
            clusters: messages("clusters", sections.clusters).map_err(serde::de::Error::custom)?,
            endpoints: messages("endpoints", sections.endpoints)
                .map_err(serde::de::Error::custom)?,
        })
    }
}

/// Each of `values` as the Envoy message `M`; an error names the entry,
/// e.g. `clusters[2]: unknown field "foo"`.
fn messages<M: prost::Message + Default + prost::Name>(
    section: &str,
    values: Vec<serde_yaml::Value>,
) -> Result<Vec<M>, String> {
    values
        .into_iter()
        .enumerate()
        .map(|(index, value)| schema::read(value).map_err(|e| format!("{section}[{index}]: {e}")))
        .collect()
}

/// Converts and validates the whole section; errors name the entry, e.g.
/// `route_configs[0] (reviews): route 'r1' in virtual host 'vh': ...`.
pub fn table(file: &FileRouting) -> Result<RouteTable, String> {
    let mut table = RouteTable::default();
    for (index, config) in file.route_configs.iter().enumerate() {
        let at = format!("route_configs[{index}] ({})", config.name);
        let converted =
            envoy::convert_route_configuration(config).map_err(|e| format!("{at}: {e}"))?;
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
        let converted = envoy::convert_cluster(cluster).map_err(|e| format!("{at}: {e}"))?;
        if table
            .clusters
            .insert(converted.name.clone(), Arc::new(converted))
            .is_some()
        {
            return Err(format!("{at}: a second cluster of that name"));
        }
    }
    for (index, assignment) in file.endpoints.iter().enumerate() {
        let at = format!("endpoints[{index}] ({})", assignment.cluster_name);
        let converted =
            envoy::convert_cluster_load_assignment(assignment).map_err(|e| format!("{at}: {e}"))?;
        if table
            .assignments
            .insert(converted.cluster_name.clone(), Arc::new(converted))
            .is_some()
        {
            return Err(format!("{at}: a second assignment for that cluster"));
        }
    }
    Ok(table)
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
      match: {prefix: ""}
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
        assert!(matches!(&vhost.routes[2].matcher.path, PathMatch::Prefix(p) if p.is_empty()));
        assert!(matches!(
            &vhost.routes[2].action,
            RouteAction::DirectResponse { status, body: Some(body) } if status.as_u16() == 404 && body == "nothing here"
        ));

        let v2 = &table.clusters["outbound|9080|v2|reviews.default.svc.cluster.local"];
        assert_eq!(v2.lb_policy, LbPolicy::LeastRequest { choice_count: 2 });
        assert_eq!(v2.connect_timeout, Duration::from_secs(1));
        assert_eq!(v2.protocol, crate::routing::UpstreamProtocol::Http2);
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
            ClusterEndpoints::Static(addresses) if addresses == &[crate::routing::LbAddress::from("10.0.0.9:8080".parse::<std::net::SocketAddr>().expect("address"))]
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
            error.contains("route_configs[0]: ") && error.contains("retry_host_predicates"),
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
        assert!(
            error.starts_with("route_configs[0]: ") && error.contains("path_specifier"),
            "{error}"
        );
        let error = parse(&DOCUMENT.replace("timeout: 2.5s", "timeout: 2500ms")).unwrap_err();
        assert!(
            error.starts_with("route_configs[0]: ") && error.contains("duration"),
            "{error}"
        );
        let error = parse(&DOCUMENT.replace("address: 10.0.0.9", "address: legacy.example.com"))
            .unwrap_err();
        assert!(error.starts_with("clusters[1] (legacy): "), "{error}");
    }
}
