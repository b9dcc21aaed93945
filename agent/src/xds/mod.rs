//! The xDS client: delta ADS (what istiod serves ztunnel) for Istio's
//! workload API (`istio.workload.Address`) and `istio.security.Authorization`,
//! and for L7 routing Envoy's `RouteConfiguration` and `Cluster`
//! (routing/envoy.rs), all four subscribed as wildcards.
//! Resources are validated one by one: valid ones apply, invalid ones are
//! NACKed with an `error_detail` naming them, and nothing is half-applied.
//! On a broken stream the agent keeps serving its last good state,
//! reconnects with backoff and jitter, and resumes with the versions it has.
pub mod convert;
pub mod local;
mod sotw;
pub mod state;
mod wire;

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::mpsc;

pub use state::{TypeStats, XdsState, XdsStats, XdsUpdate};

pub mod proto {
    //! Generated from proto/ (wire-compatible subsets of the published schemas).
    #![allow(clippy::all, missing_docs)]
    pub mod envoy {
        pub mod config {
            pub mod core {
                pub mod v3 {
                    tonic::include_proto!("envoy.config.core.v3");
                }
            }
        }
        pub mod service {
            pub mod discovery {
                pub mod v3 {
                    tonic::include_proto!("envoy.service.discovery.v3");
                }
            }
        }
    }
    pub mod google {
        pub mod rpc {
            tonic::include_proto!("google.rpc");
        }
    }
    pub mod istio {
        pub mod workload {
            tonic::include_proto!("istio.workload");
        }
        pub mod security {
            tonic::include_proto!("istio.security");
        }
    }
}

use proto::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        DeltaDiscoveryRequest,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};

pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
pub const ROUTE_CONFIGURATION_TYPE: &str =
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const TYPES: [&str; 5] = [
    ADDRESS_TYPE,
    AUTHORIZATION_TYPE,
    ROUTE_CONFIGURATION_TYPE,
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
];
/// The types subscribed as wildcards at the start of a delta stream. EDS is
/// subscribed by name, as istiod serves it: the names of the EDS clusters
/// held, once there are some.
pub const WILDCARD_TYPES: [&str; 4] = [
    ADDRESS_TYPE,
    AUTHORIZATION_TYPE,
    ROUTE_CONFIGURATION_TYPE,
    CLUSTER_TYPE,
];

/// Where the control plane is.
#[derive(Debug, Clone)]
pub struct XdsSettings {
    /// `https://host:port` (or `http://` without TLS, for local use).
    pub address: String,
    pub root_cert: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub server_name: Option<String>,
    /// Node id, as ztunnel's: `ztunnel~<node-ip>~<pod>.<ns>~<ns>.svc.cluster.local`.
    pub node_id: String,
    pub node_name: String,
    /// Delta (istiod's protocol for ztunnel) or state-of-the-world.
    pub mode: XdsMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdsMode {
    #[default]
    Delta,
    Sotw,
}

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("control plane address {0}: {1}")]
    Address(String, String),
    #[error("control plane TLS: {0}")]
    Tls(String),
    #[error("connecting to {address}: {message}")]
    Connect { address: String, message: String },
    #[error("stream: {0}")]
    Stream(String),
}

pub(crate) fn channel(settings: &XdsSettings) -> Result<tonic::transport::Channel, XdsError> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(settings.address.clone())
        .map_err(|e| XdsError::Address(settings.address.clone(), e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30));
    if let Some(root) = &settings.root_cert {
        let pem =
            std::fs::read(root).map_err(|e| XdsError::Tls(format!("{}: {e}", root.display())))?;
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(pem));
        if let Some(name) = &settings.server_name {
            tls = tls.domain_name(name.clone());
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| XdsError::Tls(e.to_string()))?;
    }
    Ok(endpoint.connect_lazy())
}

/// `authorization: Bearer <token file>` on the stream, when configured.
pub(crate) fn authorize<T>(
    settings: &XdsSettings,
    request: &mut tonic::Request<T>,
) -> Result<(), XdsError> {
    let Some(path) = &settings.token_file else {
        return Ok(());
    };
    let token = std::fs::read_to_string(path).map_err(|e| XdsError::Connect {
        address: settings.address.clone(),
        message: format!("token {}: {e}", path.display()),
    })?;
    if let Ok(value) = format!("Bearer {}", token.trim()).parse() {
        request.metadata_mut().insert("authorization", value);
    }
    Ok(())
}

/// The `error_detail` of a NACK: one line per rejected resource.
pub(crate) fn nack_detail(errors: &[String]) -> Option<proto::google::rpc::Status> {
    (!errors.is_empty()).then(|| proto::google::rpc::Status {
        code: tonic::Code::InvalidArgument as i32,
        message: errors.join("; "),
        details: Vec::new(),
    })
}

pub(crate) fn node(settings: &XdsSettings) -> Node {
    use prost_types::{Struct, Value, value::Kind};
    let metadata = Struct {
        fields: [(
            "NODE_NAME".to_string(),
            Value {
                kind: Some(Kind::StringValue(settings.node_name.clone())),
            },
        )]
        .into_iter()
        .collect(),
    };
    Node {
        id: settings.node_id.clone(),
        cluster: "Kubernetes".into(),
        metadata: Some(metadata),
    }
}

/// Runs the client forever: one stream at a time, reconnecting with
/// exponential backoff and jitter. Every applied change is sent on `updates`.
pub async fn run(settings: XdsSettings, state: Arc<XdsState>, updates: mpsc::Sender<XdsUpdate>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = tokio::time::Instant::now();
        let result = match settings.mode {
            XdsMode::Delta => stream_once(&settings, &state, &updates).await,
            XdsMode::Sotw => sotw::stream_once(&settings, &state, &updates).await,
        };
        state.stats.set_connected(false);
        match result {
            Ok(()) => {
                tracing::warn!(address = %settings.address, "xDS stream closed by the control plane")
            }
            Err(error) => tracing::warn!(address = %settings.address, %error, "xDS stream failed"),
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        let jitter =
            Duration::from_millis(u64::from(jitter_ms()) % (backoff.as_millis() as u64 / 2 + 1));
        tracing::info!(
            retry_in_ms = (backoff + jitter).as_millis() as u64,
            "reconnecting to the control plane; serving the last good state"
        );
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(Duration::from_secs(15));
        state.stats.record_reconnect();
    }
}

fn jitter_ms() -> u32 {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 4];
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    u32::from_ne_bytes(bytes)
}

async fn stream_once(
    settings: &XdsSettings,
    state: &XdsState,
    updates: &mpsc::Sender<XdsUpdate>,
) -> Result<(), XdsError> {
    let (requests, outbound) = mpsc::channel::<DeltaDiscoveryRequest>(16);
    for (index, type_url) in WILDCARD_TYPES.iter().enumerate() {
        // Wildcard subscription; on a reconnect, the versions we hold so the
        // server sends only what changed.
        let initial: HashMap<String, String> = state.versions(type_url);
        let request = DeltaDiscoveryRequest {
            node: (index == 0).then(|| node(settings)),
            type_url: type_url.to_string(),
            initial_resource_versions: initial,
            ..Default::default()
        };
        requests
            .send(request)
            .await
            .map_err(|e| XdsError::Stream(e.to_string()))?;
    }
    let mut eds = EdsSubscription::default();
    if let Some(request) = eds.follow(state) {
        requests
            .send(request)
            .await
            .map_err(|e| XdsError::Stream(e.to_string()))?;
    }
    let mut client = AggregatedDiscoveryServiceClient::new(channel(settings)?);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(outbound));
    authorize(settings, &mut request)?;
    let mut responses = client
        .delta_aggregated_resources(request)
        .await
        .map_err(|status| XdsError::Connect {
            address: settings.address.clone(),
            message: status.message().to_string(),
        })?
        .into_inner();
    tracing::info!(address = %settings.address, "xDS stream open");
    state.stats.set_connected(true);
    while let Some(response) = responses
        .message()
        .await
        .map_err(|status| XdsError::Stream(format!("{}: {}", status.code(), status.message())))?
    {
        let outcome = state.apply(&response);
        let error_detail = nack_detail(&outcome.errors);
        state
            .stats
            .record_response(&response.type_url, error_detail.is_none());
        if let Some(detail) = &error_detail {
            tracing::warn!(type_url = %response.type_url, nonce = %response.nonce, error = %detail.message, "xDS NACK");
        } else {
            tracing::info!(type_url = %response.type_url, nonce = %response.nonce, applied = outcome.applied, removed = outcome.removed, "xDS ACK");
        }
        requests
            .send(DeltaDiscoveryRequest {
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                error_detail,
                ..Default::default()
            })
            .await
            .map_err(|e| XdsError::Stream(e.to_string()))?;
        if response.type_url == CLUSTER_TYPE
            && let Some(request) = eds.follow(state)
        {
            requests
                .send(request)
                .await
                .map_err(|e| XdsError::Stream(e.to_string()))?;
        }
        let _ = updates
            .send(XdsUpdate {
                type_url: response.type_url.clone(),
            })
            .await;
    }
    Ok(())
}

/// The EDS names subscribed on one delta stream.
#[derive(Default)]
struct EdsSubscription {
    /// `None` until the first EDS request of the stream.
    names: Option<std::collections::BTreeSet<String>>,
}

impl EdsSubscription {
    /// The request that brings the subscription to the EDS clusters held
    /// now, if it changed: the first carries the versions held (a
    /// reconnect), later ones only what is added and removed.
    fn follow(&mut self, state: &XdsState) -> Option<DeltaDiscoveryRequest> {
        let wanted = state.eds_names();
        match &self.names {
            None if wanted.is_empty() => None,
            None => {
                let held = state.versions(ENDPOINT_TYPE);
                let request = DeltaDiscoveryRequest {
                    type_url: ENDPOINT_TYPE.to_string(),
                    resource_names_subscribe: wanted.iter().cloned().collect(),
                    initial_resource_versions: held
                        .into_iter()
                        .filter(|(name, _)| wanted.contains(name))
                        .collect(),
                    ..Default::default()
                };
                self.names = Some(wanted);
                Some(request)
            }
            Some(names) if *names == wanted => None,
            Some(names) => {
                let request = DeltaDiscoveryRequest {
                    type_url: ENDPOINT_TYPE.to_string(),
                    resource_names_subscribe: wanted.difference(names).cloned().collect(),
                    resource_names_unsubscribe: names.difference(&wanted).cloned().collect(),
                    ..Default::default()
                };
                self.names = Some(wanted);
                Some(request)
            }
        }
    }
}
