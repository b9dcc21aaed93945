//! State-of-the-world ADS, the second mode: each response carries the whole
//! set of one type, so what is held and not in it is removed. Validation,
//! ACK/NACK and reconnection work as in delta.
use std::collections::HashMap;

use prost::Message as _;
use tokio::sync::mpsc;

use crate::routing::envoy::pb::envoy::config::{
    cluster::v3 as cluster_pb, endpoint::v3 as endpoint_pb, route::v3 as route_pb,
};

use super::{
    ADDRESS_TYPE, AUTHORIZATION_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_CONFIGURATION_TYPE, TYPES,
    XdsError, XdsSettings, XdsState, XdsUpdate, authorize, channel, nack_detail, node,
    proto::{
        envoy::service::discovery::v3::{
            DeltaDiscoveryResponse, DiscoveryRequest, Resource,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
        istio::{security, workload},
    },
};

/// The xDS name of a resource, which SotW does not send beside it.
fn resource_name(type_url: &str, bytes: &[u8]) -> Option<String> {
    match type_url {
        ADDRESS_TYPE => match workload::Address::decode(bytes).ok()?.r#type? {
            workload::address::Type::Workload(w) => Some(w.uid),
            workload::address::Type::Service(s) => Some(format!("{}/{}", s.namespace, s.hostname)),
        },
        AUTHORIZATION_TYPE => {
            let policy = security::Authorization::decode(bytes).ok()?;
            Some(format!("{}/{}", policy.namespace, policy.name))
        }
        ROUTE_CONFIGURATION_TYPE => Some(route_pb::RouteConfiguration::decode(bytes).ok()?.name),
        CLUSTER_TYPE => Some(cluster_pb::Cluster::decode(bytes).ok()?.name),
        ENDPOINT_TYPE => Some(
            endpoint_pb::ClusterLoadAssignment::decode(bytes)
                .ok()?
                .cluster_name,
        ),
        _ => None,
    }
}

pub(super) async fn stream_once(
    settings: &XdsSettings,
    state: &XdsState,
    updates: &mpsc::Sender<XdsUpdate>,
) -> Result<(), XdsError> {
    let (requests, outbound) = mpsc::channel::<DiscoveryRequest>(16);
    for (index, type_url) in TYPES.iter().enumerate() {
        requests
            .send(DiscoveryRequest {
                node: (index == 0).then(|| node(settings)),
                type_url: type_url.to_string(),
                ..Default::default()
            })
            .await
            .map_err(|e| XdsError::Stream(e.to_string()))?;
    }
    let mut client = AggregatedDiscoveryServiceClient::new(channel(settings)?);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(outbound));
    authorize(settings, &mut request)?;
    let mut responses = client
        .stream_aggregated_resources(request)
        .await
        .map_err(|status| XdsError::Connect {
            address: settings.address.clone(),
            message: status.message().to_string(),
        })?
        .into_inner();
    tracing::info!(address = %settings.address, "xDS (state of the world) stream open");
    state.stats.set_connected(true);
    let mut accepted: HashMap<String, String> = HashMap::new();
    while let Some(response) = responses
        .message()
        .await
        .map_err(|status| XdsError::Stream(format!("{}: {}", status.code(), status.message())))?
    {
        let mut errors = Vec::new();
        let mut resources = Vec::new();
        for any in &response.resources {
            match resource_name(&response.type_url, &any.value) {
                Some(name) => resources.push(Resource {
                    version: response.version_info.clone(),
                    resource: Some(any.clone()),
                    name,
                    aliases: Vec::new(),
                }),
                None => errors.push(format!(
                    "a {} resource that does not decode",
                    response.type_url
                )),
            }
        }
        // Whatever is held and absent from this full set goes.
        let present: Vec<&str> = resources.iter().map(|r| r.name.as_str()).collect();
        let removed: Vec<String> = state
            .versions(&response.type_url)
            .into_keys()
            .filter(|name| !present.contains(&name.as_str()))
            .collect();
        let outcome = state.apply(&DeltaDiscoveryResponse {
            system_version_info: response.version_info.clone(),
            resources,
            type_url: response.type_url.clone(),
            nonce: response.nonce.clone(),
            removed_resources: removed,
        });
        errors.extend(outcome.errors);
        let error_detail = nack_detail(&errors);
        state
            .stats
            .record_response(&response.type_url, error_detail.is_none());
        if error_detail.is_none() {
            accepted.insert(response.type_url.clone(), response.version_info.clone());
            tracing::info!(type_url = %response.type_url, version = %response.version_info, "xDS ACK");
        } else {
            tracing::warn!(type_url = %response.type_url, error = %errors.join("; "), "xDS NACK");
        }
        requests
            .send(DiscoveryRequest {
                // A NACK names the last version accepted, an ACK this one.
                version_info: accepted
                    .get(&response.type_url)
                    .cloned()
                    .unwrap_or_default(),
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                error_detail,
                ..Default::default()
            })
            .await
            .map_err(|e| XdsError::Stream(e.to_string()))?;
        let _ = updates
            .send(XdsUpdate {
                type_url: response.type_url.clone(),
            })
            .await;
    }
    Ok(())
}
