//! Envoy's resources read as proto3 JSON or YAML, by Envoy's own
//! descriptors, into the prost types the xDS path decodes.
//!
//! This is what `istioctl proxy-config … -o json|yaml` prints: field names
//! in either spelling (`virtual_hosts` or `virtualHosts`), 64-bit integers
//! as strings or numbers, durations as `"1.5s"`, enums by name, and `Any`
//! with its `@type`. An unknown field or `@type` is an error naming it.
//! The descriptors are compiled at build time from the `.proto` files
//! envoy-types was generated from (agent/build.rs), so a message read here
//! re-encodes into exactly the Rust type xDS would have produced.
use std::sync::LazyLock;

use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, Kind, MessageDescriptor};
use serde::Deserialize as _;

static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"));

static POOL: LazyLock<Result<DescriptorPool, String>> = LazyLock::new(|| {
    DescriptorPool::decode(DESCRIPTORS).map_err(|e| format!("Envoy's descriptors: {e}"))
});

/// Reads `value` (a serde document: YAML or JSON) as the Envoy message `M`.
pub fn read<'de, M, D>(deserializer: D) -> Result<M, String>
where
    M: Message + Default + prost::Name,
    D: serde::Deserializer<'de>,
{
    let pool = POOL.as_ref().map_err(Clone::clone)?;
    let name = M::full_name();
    let descriptor = pool
        .get_message_by_name(&name)
        .ok_or_else(|| format!("no descriptor for {name}"))?;
    // Envoy reads enum names case-insensitively (`lb_policy: round_robin`,
    // as its own examples write them): the names are put in their
    // declared case first.
    let mut value = serde_json::Value::deserialize(deserializer).map_err(|e| e.to_string())?;
    canonical_enums(&mut value, &descriptor, pool);
    let message = DynamicMessage::deserialize_with_options(
        descriptor,
        value,
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|e| e.to_string())?;
    M::decode(message.encode_to_vec().as_slice()).map_err(|e| format!("re-decoding {name}: {e}"))
}

/// Rewrites, in place, every enum value of `value` (a `message` in JSON
/// form) that names a value of its enum in another case to the declared
/// name. Nested messages and `Any` (by `@type`) are followed; anything
/// that does not fit the schema is left for the reader to refuse.
fn canonical_enums(
    value: &mut serde_json::Value,
    message: &MessageDescriptor,
    pool: &DescriptorPool,
) {
    let serde_json::Value::Object(fields) = value else {
        return;
    };
    if message.full_name() == "google.protobuf.Any" {
        let Some(inner) = fields
            .get("@type")
            .and_then(serde_json::Value::as_str)
            .and_then(|type_url| type_url.rsplit('/').next())
            .and_then(|name| pool.get_message_by_name(name))
        else {
            return;
        };
        canonical_enums(value, &inner, pool);
        return;
    }
    for (key, field_value) in fields.iter_mut() {
        let Some(field) = message
            .get_field_by_name(key)
            .or_else(|| message.get_field_by_json_name(key))
        else {
            continue;
        };
        let values: Vec<&mut serde_json::Value> = match field_value {
            serde_json::Value::Array(items) if field.is_list() => items.iter_mut().collect(),
            serde_json::Value::Object(entries) if field.is_map() => {
                // A map's values are the entry message's `value` field.
                let Kind::Message(entry) = field.kind() else {
                    continue;
                };
                let Some(value_field) = entry.map_entry_value_field().kind().as_message().cloned()
                else {
                    continue;
                };
                for item in entries.values_mut() {
                    canonical_enums(item, &value_field, pool);
                }
                continue;
            }
            other => vec![other],
        };
        for item in values {
            match field.kind() {
                Kind::Enum(kind) => {
                    if let serde_json::Value::String(name) = item
                        && kind.get_value_by_name(name).is_none()
                        && let Some(declared) = kind
                            .values()
                            .find(|declared| declared.name().eq_ignore_ascii_case(name))
                    {
                        *name = declared.name().to_string();
                    }
                }
                Kind::Message(inner) => canonical_enums(item, &inner, pool),
                _ => {}
            }
        }
    }
}

/// [`read`] from JSON text.
pub fn from_json<M: Message + Default + prost::Name>(text: &str) -> Result<M, String> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let message = read(&mut deserializer)?;
    deserializer.end().map_err(|e| e.to_string())?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::envoy::pb::envoy::config::{
        cluster::v3 as cluster_pb, route::v3 as route_pb,
    };

    #[test]
    fn both_spellings_strings_for_64_bit_integers_and_any() {
        let cluster: cluster_pb::Cluster = from_json(
            r#"{"name": "c", "connectTimeout": "1.5s", "lb_policy": "LEAST_REQUEST",
                "ring_hash_lb_config": {"minimum_ring_size": "1024"},
                "typed_extension_protocol_options": {
                  "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}}}"#,
        )
        .expect("valid");
        assert_eq!(cluster.name, "c");
        assert_eq!(
            cluster.connect_timeout.map(|d| (d.seconds, d.nanos)),
            Some((1, 500_000_000))
        );
        assert_eq!(
            cluster.lb_policy,
            cluster_pb::cluster::LbPolicy::LeastRequest as i32
        );
        assert!(cluster.typed_extension_protocol_options.values().all(|any| {
            any.type_url
                == "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
                && !any.value.is_empty()
        }));
    }

    #[test]
    fn unknown_fields_and_types_are_named() {
        let error =
            from_json::<route_pb::RouteConfiguration>(r#"{"name": "r", "virtual_hostz": []}"#)
                .unwrap_err();
        assert!(error.contains("virtual_hostz"), "{error}");
        let error = from_json::<route_pb::RouteConfiguration>(
            r#"{"name": "r", "typed_per_filter_config": {"x": {"@type": "type.googleapis.com/x.Unknown"}}}"#,
        )
        .unwrap_err();
        assert!(error.contains("x.Unknown"), "{error}");
    }

    #[test]
    fn enum_names_in_any_case_as_envoy_reads_them() {
        let cluster: cluster_pb::Cluster = from_json(
            r#"{"name": "c", "type": "strict_dns", "lb_policy": "round_robin",
                "typed_extension_protocol_options": {
                  "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http_protocol_options": {}}}}}"#,
        )
        .expect("valid");
        assert_eq!(
            cluster.cluster_discovery_type,
            Some(cluster_pb::cluster::ClusterDiscoveryType::Type(
                cluster_pb::cluster::DiscoveryType::StrictDns as i32
            ))
        );
        assert_eq!(
            cluster.lb_policy,
            cluster_pb::cluster::LbPolicy::RoundRobin as i32
        );
        let route: route_pb::RouteConfiguration = from_json(
            r#"{"name": "r", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, "route": {"cluster": "c"},
                 "typed_per_filter_config": {"envoy.filters.http.fault": {
                   "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                   "abort": {"http_status": 503, "percentage": {"numerator": 5, "denominator": "hundred"}}}}}]}]}"#,
        )
        .expect("valid");
        assert_eq!(route.virtual_hosts[0].routes.len(), 1);
        // A name that is no value in any case is still refused.
        assert!(
            from_json::<cluster_pb::Cluster>(r#"{"name": "c", "lb_policy": "fastest"}"#).is_err()
        );
    }
}
