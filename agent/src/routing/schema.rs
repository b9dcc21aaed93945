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
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage};

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
    let message = DynamicMessage::deserialize_with_options(
        descriptor,
        deserializer,
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|e| e.to_string())?;
    M::decode(message.encode_to_vec().as_slice()).map_err(|e| format!("re-decoding {name}: {e}"))
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
}
