//! Envoy resources as istiod generates them (tests/fixtures/istiod/, taken
//! as data from istio/istio's test config dumps) are accepted on both of
//! Weir's paths with the same result:
//! - xDS: the resource's protobuf bytes, decoded and converted as an ADS
//!   response's resource is (`envoy::route_configuration`/`cluster`);
//! - the file: the same resource as `istioctl proxy-config … -o json`
//!   prints it, inside a whole agent config file's `routing:` section.
//!
//! Every one is accepted. tests/fixtures/istiod-refused/ holds what
//! istiod sent that Envoy would not take either; those are refused on both
//! paths alike, each with the reason in [`REFUSED`] (and in that folder's
//! README).
use std::path::{Path, PathBuf};

use prost::Message;
use weir_agent::{
    config::Config,
    routing::{
        envoy::{
            self,
            pb::envoy::config::{
                cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment,
                route::v3::RouteConfiguration,
            },
        },
        file, schema,
    },
};

/// The istiod resources Weir refuses (tests/fixtures/istiod-refused/):
/// (file name, what the refusal says, why).
const REFUSED: &[(&str, &str, &str)] = &[
    (
        "cluster__zirain-ambient2022-reviews-waypoint__0.0.0.0_80.json",
        "only connect_originate",
        "Istio 1.16's experimental waypoint: an internal listener holding L7 listener config",
    ),
    (
        "endpoint__zirain-se-eds-1.20__outbound_8000__httpbin.default.svc.cluster.local.json",
        "hostnames are resolved only for STRICT_DNS and LOGICAL_DNS clusters",
        "istio/istio#50688: a DNS name in EDS, which Envoy NACKs too (EDS endpoints are IP addresses)",
    ),
];

fn fixtures(folder: &str) -> anyhow::Result<Vec<PathBuf>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(folder);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|path| path.extension().is_some_and(|ext| ext == "json"));
    files.sort();
    anyhow::ensure!(!files.is_empty(), "no fixtures in {}", dir.display());
    Ok(files)
}

/// What one path made of a resource, for comparison (`Debug` of the
/// converted config).
fn by_xds(kind: &str, json: &str) -> Result<String, String> {
    match kind {
        "route" => {
            let message: RouteConfiguration = schema::from_json(json)?;
            envoy::route_configuration(&message.encode_to_vec()).map(|c| format!("{c:?}"))
        }
        "cluster" => {
            let message: Cluster = schema::from_json(json)?;
            envoy::cluster(&message.encode_to_vec()).map(|c| format!("{c:?}"))
        }
        "endpoint" => {
            let message: ClusterLoadAssignment = schema::from_json(json)?;
            envoy::cluster_load_assignment(&message.encode_to_vec()).map(|c| format!("{c:?}"))
        }
        other => Err(format!("unknown fixture kind {other}")),
    }
}

fn by_file(kind: &str, json: &str) -> Result<String, String> {
    let section = match kind {
        "route" => "route_configs",
        "cluster" => "clusters",
        "endpoint" => "endpoints",
        other => return Err(format!("unknown fixture kind {other}")),
    };
    // JSON is YAML: the resource goes into the file as printed.
    let text = format!(
        "node: n\nrouting:\n  {section}:\n  - {}\n",
        json.replace('\n', " ")
    );
    let config = Config::parse(&text, "fixture").map_err(|e| e.to_string())?;
    let table = file::table(&config.routing)?;
    Ok(match kind {
        "route" => table
            .route_configs
            .values()
            .map(|c| format!("{c:?}"))
            .collect(),
        "cluster" => table.clusters.values().map(|c| format!("{c:?}")).collect(),
        _ => table
            .assignments
            .values()
            .map(|c| format!("{c:?}"))
            .collect(),
    })
}

#[test]
fn every_istiod_resource_is_accepted_on_both_paths_alike() -> anyhow::Result<()> {
    corpus("istiod", &[])
}

/// What istiod sent that no proxy accepts (an Envoy NACK, a withdrawn
/// experimental format) is refused on both paths alike.
#[test]
fn istiod_resources_envoy_would_not_take_are_refused_alike() -> anyhow::Result<()> {
    corpus("istiod-refused", REFUSED)
}

/// What istiod writes for each VirtualService and DestinationRule feature
/// Weir implements, built from istiod's own translation code and the
/// values its unit tests assert (tests/fixtures/istiod-derived/; the
/// folder's README names the function and commit behind each file): istiod
/// cannot run here, and no public config dump shows every feature.
#[test]
fn istiod_translations_of_each_feature_are_accepted_on_both_paths_alike() -> anyhow::Result<()> {
    corpus("istiod-derived", DERIVED_REFUSED)
}

/// Derived resources Weir refuses: (file name, what the refusal says, why).
const DERIVED_REFUSED: &[(&str, &str, &str)] = &[
    (
        "cluster__dr-tls-mutual-credential-name-workload-selector__outbound_9080__reviews.default.svc.cluster.local.json",
        "kubernetes://reviews-client",
        "credentialName: Weir does not fetch SDS secrets (kubernetes://) over ADS; files are read (caCertificates, clientCertificate, privateKey)",
    ),
    (
        "cluster__dr-tls-simple-credential-name-workload-selector__outbound_9080__reviews.default.svc.cluster.local.json",
        "kubernetes://reviews-tls-cacert",
        "credentialName: Weir does not fetch SDS secrets (kubernetes://) over ADS",
    ),
];

/// The same for the resources of Envoy's own examples
/// (tests/fixtures/envoy-examples/).
#[test]
fn envoy_examples_are_read_alike_on_both_paths() -> anyhow::Result<()> {
    corpus("envoy-examples", EXAMPLES_REFUSED)
}

/// Envoy's examples Weir refuses: (file name, what the refusal says, why).
const EXAMPLES_REFUSED: &[(&str, &str, &str)] = &[
    (
        "cluster__http-protocol-versions__google_http3.json",
        "http3_protocol_options",
        "HTTP/3 upstream: Weir's upstreams are HTTP/1.1 and HTTP/2 over TCP",
    ),
    (
        "cluster__locality-load-balancing__backend.envoy-proxy.json",
        "unsupported field health_checks",
        "active health checking: Weir has outlier detection only, as Istio does",
    ),
    (
        "cluster__locality-load-balancing__backend.json",
        "unsupported field health_checks",
        "active health checking",
    ),
    (
        "route__csrf-samesite__local_route.json",
        "typed_per_filter_config[\"envoy.filters.http.csrf\"]",
        "the CSRF filter is not implemented",
    ),
    (
        "route__lua__local_route.json",
        "typed_per_filter_config[\"lua_filter_with_custom_name_1\"]",
        "Lua filters are not run",
    ),
];

/// Feeds every fixture of `folder` through both paths: each must be
/// accepted alike, or refused alike as `refused` lists.
fn corpus(folder: &str, refused_list: &[(&str, &str, &str)]) -> anyhow::Result<()> {
    let mut failures = Vec::new();
    let files = fixtures(folder)?;
    for path in &files {
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let kind = name.split("__").next().unwrap_or_default();
        let json = std::fs::read_to_string(path)?;
        let refused = refused_list.iter().find(|(file, _, _)| *file == name);
        match (by_xds(kind, &json), by_file(kind, &json), refused) {
            (Ok(xds), Ok(file), None) if xds == file => {}
            (Ok(xds), Ok(file), None) => {
                failures.push(format!("{name}: the paths differ:\n{xds}\n{file}"))
            }
            (Err(xds), Err(file), Some((_, says, _)))
                if xds.contains(says) && file.contains(&xds) => {}
            (xds, file, refused) => failures.push(format!(
                "{name} (expected {}):\n  xds: {xds:?}\n  file: {file:?}",
                refused.map_or("accepted".to_string(), |(_, says, _)| format!(
                    "refused: {says}"
                ))
            )),
        }
    }
    for (file, _, _) in refused_list {
        if !files.iter().any(|path| path.ends_with(file)) {
            failures.push(format!("{file}: listed as refused, but not a fixture"));
        }
    }
    anyhow::ensure!(
        failures.is_empty(),
        "{} of {} resources failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
    Ok(())
}
