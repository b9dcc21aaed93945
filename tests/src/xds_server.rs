//! A delta-ADS control plane for tests: serves resources it is given over
//! TLS (with a bearer token) inside a node's namespace, pushes changes to
//! connected agents, and records every request (ACKs, NACKs and their
//! `error_detail`, initial resource versions). It can be stopped and
//! restarted on the same port.
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::sync::mpsc;
use weir_agent::xds::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
};

use crate::ca_server::{SERVER_NAME, TOKEN, serving_identity};

/// What one request on the stream carried.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub type_url: String,
    pub node_id: Option<String>,
    pub response_nonce: String,
    pub error_detail: Option<String>,
    pub initial_resource_versions: HashMap<String, String>,
    /// Delta only: the names a request subscribes to (none: a wildcard or
    /// an ACK).
    pub resource_names_subscribe: Vec<String>,
}

type Sender = mpsc::Sender<Result<DeltaDiscoveryResponse, tonic::Status>>;
/// (type URL, name) → (version, encoded resource).
type Resources = BTreeMap<(String, String), (String, Vec<u8>)>;

#[derive(Default)]
struct Shared {
    resources: Mutex<Resources>,
    streams: Mutex<Vec<Sender>>,
    sotw_streams: Mutex<Vec<mpsc::Sender<Result<DiscoveryResponse, tonic::Status>>>>,
    requests: Mutex<Vec<SeenRequest>>,
    counter: AtomicU64,
}

impl Shared {
    fn next(&self) -> String {
        self.counter.fetch_add(1, Ordering::Relaxed).to_string()
    }

    fn response(
        &self,
        type_url: &str,
        resources: Vec<Resource>,
        removed: Vec<String>,
    ) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            system_version_info: self.next(),
            resources,
            type_url: type_url.to_string(),
            nonce: format!("nonce-{}", self.next()),
            removed_resources: removed,
        }
    }

    fn resource(type_url: &str, name: &str, version: &str, bytes: &[u8]) -> Resource {
        Resource {
            version: version.to_string(),
            resource: Some(prost_types::Any {
                type_url: type_url.to_string(),
                value: bytes.to_vec(),
            }),
            name: name.to_string(),
            aliases: Vec::new(),
        }
    }

    fn broadcast(&self, response: DeltaDiscoveryResponse) {
        let sotw = self.full_state(&response.type_url);
        let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        for stream in streams.iter() {
            let _ = stream.try_send(Ok(response.clone()));
        }
        let sotw_streams = self.sotw_streams.lock().unwrap_or_else(|e| e.into_inner());
        for stream in sotw_streams.iter() {
            let _ = stream.try_send(Ok(sotw.clone()));
        }
    }

    /// State of the world: every resource of `type_url`, in one response.
    fn full_state(&self, type_url: &str) -> DiscoveryResponse {
        let resources = self
            .resources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|((kind, _), _)| kind == type_url)
            .map(|(_, (_, bytes))| prost_types::Any {
                type_url: type_url.to_string(),
                value: bytes.clone(),
            })
            .collect();
        DiscoveryResponse {
            version_info: self.next(),
            resources,
            type_url: type_url.to_string(),
            nonce: format!("nonce-{}", self.next()),
        }
    }

    fn record(&self, request: SeenRequest) {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(request);
    }
}

struct Service {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type StreamAggregatedResourcesStream =
        tokio_stream::wrappers::ReceiverStream<Result<DiscoveryResponse, tonic::Status>>;
    type DeltaAggregatedResourcesStream =
        tokio_stream::wrappers::ReceiverStream<Result<DeltaDiscoveryResponse, tonic::Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, tonic::Status> {
        let (sender, receiver) = mpsc::channel(64);
        self.shared
            .sotw_streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(sender.clone());
        let shared = self.shared.clone();
        let mut inbound = request.into_inner();
        tokio::spawn(async move {
            while let Ok(Some(request)) = inbound.message().await {
                shared.record(SeenRequest {
                    type_url: request.type_url.clone(),
                    node_id: request.node.as_ref().map(|node| node.id.clone()),
                    response_nonce: request.response_nonce.clone(),
                    error_detail: request
                        .error_detail
                        .as_ref()
                        .map(|status| status.message.clone()),
                    initial_resource_versions: HashMap::new(),
                    resource_names_subscribe: Vec::new(),
                });
                if request.response_nonce.is_empty()
                    && sender
                        .send(Ok(shared.full_state(&request.type_url)))
                        .await
                        .is_err()
                {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .map(str::to_string);
        if token.as_deref() != Some(&format!("Bearer {TOKEN}")) {
            return Err(tonic::Status::unauthenticated("bad token"));
        }
        let (sender, receiver) = mpsc::channel(64);
        self.shared
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(sender.clone());
        let shared = self.shared.clone();
        let mut inbound = request.into_inner();
        tokio::spawn(async move {
            while let Ok(Some(request)) = inbound.message().await {
                shared.record(SeenRequest {
                    type_url: request.type_url.clone(),
                    node_id: request.node.as_ref().map(|node| node.id.clone()),
                    response_nonce: request.response_nonce.clone(),
                    error_detail: request
                        .error_detail
                        .as_ref()
                        .map(|status| status.message.clone()),
                    initial_resource_versions: request.initial_resource_versions.clone(),
                    resource_names_subscribe: request.resource_names_subscribe.clone(),
                });
                if !request.response_nonce.is_empty() {
                    continue; // an ACK or NACK
                }
                // A subscription: everything of the type the client does
                // not already hold at the same version (for a subscription
                // by name, more than it asked for; the client keeps what it
                // looks for).
                let resources: Vec<Resource> = shared
                    .resources
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .filter(|((type_url, name), (version, _))| {
                        *type_url == request.type_url
                            && request.initial_resource_versions.get(name) != Some(version)
                    })
                    .map(|((type_url, name), (version, bytes))| {
                        Shared::resource(type_url, name, version, bytes)
                    })
                    .collect();
                let response = shared.response(&request.type_url, resources, Vec::new());
                if sender.send(Ok(response)).await.is_err() {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        ))
    }
}

/// Where agents find the server.
#[derive(Debug, Clone)]
pub struct XdsEndpoint {
    pub address: String,
    pub root_cert: PathBuf,
    pub token_file: PathBuf,
    pub server_name: String,
}

pub struct XdsServer {
    pub endpoint: XdsEndpoint,
    shared: Arc<Shared>,
    netns: PathBuf,
    dir: PathBuf,
    listen: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl XdsServer {
    /// Starts a server on 127.0.0.1 inside `netns`.
    pub fn start(netns: &Path, dir: &Path) -> anyhow::Result<XdsServer> {
        std::fs::create_dir_all(dir)?;
        let token_file = dir.join("xds-token");
        std::fs::write(&token_file, format!("{TOKEN}\n"))?;
        let mut server = XdsServer {
            endpoint: XdsEndpoint {
                address: String::new(),
                root_cert: PathBuf::new(),
                token_file,
                server_name: SERVER_NAME.into(),
            },
            shared: Arc::new(Shared::default()),
            netns: netns.to_path_buf(),
            dir: dir.to_path_buf(),
            listen: "127.0.0.1:0".parse()?,
            runtime: None,
        };
        server.serve()?;
        Ok(server)
    }

    fn serve(&mut self) -> anyhow::Result<()> {
        let (identity, root_cert) = serving_identity(&self.dir)?;
        let netns = std::fs::File::open(&self.netns)?;
        // The runtime's threads are created inside the node's namespace, so
        // the listener is too.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .on_thread_start(move || {
                use std::os::fd::AsRawFd as _;
                // SAFETY: each runtime thread enters the node's namespace once.
                unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
            })
            .build()?;
        let listen = self.listen;
        // Bound on a worker thread: `block_on` itself runs on this thread,
        // which is not in the node's namespace.
        let listener = runtime
            .block_on(runtime.spawn(async move {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.set_reuseaddr(true)?;
                socket.bind(listen)?;
                socket.listen(64)
            }))
            .context("xDS server task")?
            .context("binding the xDS server")?;
        self.listen = listener.local_addr()?;
        let service = Service {
            shared: self.shared.clone(),
        };
        runtime.spawn(async move {
            let result = tonic::transport::Server::builder()
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .map(|mut builder| {
                    builder
                        .add_service(AggregatedDiscoveryServiceServer::new(service))
                        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(
                            listener,
                        ))
                });
            match result {
                Ok(serving) => {
                    if let Err(error) = serving.await {
                        eprintln!("test xDS server: {error}");
                    }
                }
                Err(error) => eprintln!("test xDS server TLS: {error}"),
            }
        });
        self.endpoint.address = format!("https://{}", self.listen);
        self.endpoint.root_cert = root_cert;
        self.runtime = Some(runtime);
        Ok(())
    }

    /// Drops every stream and stops listening (a control plane going away).
    pub fn stop(&mut self) {
        self.shared
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }

    /// Serves again on the same port with the same resources (a new
    /// serving certificate; agents read the root file on each connect).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.runtime.is_some() {
            bail!("still running");
        }
        self.serve()
    }

    /// Adds or replaces a resource and pushes it to connected agents.
    pub fn push(&self, type_url: &str, name: &str, bytes: Vec<u8>) {
        let version = self.shared.next();
        let resource = Shared::resource(type_url, name, &version, &bytes);
        self.shared
            .resources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((type_url.to_string(), name.to_string()), (version, bytes));
        self.shared
            .broadcast(self.shared.response(type_url, vec![resource], Vec::new()));
    }

    /// Removes a resource and tells connected agents.
    pub fn remove(&self, type_url: &str, name: &str) {
        self.shared
            .resources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(type_url.to_string(), name.to_string()));
        self.shared.broadcast(
            self.shared
                .response(type_url, Vec::new(), vec![name.to_string()]),
        );
    }

    pub fn requests(&self) -> Vec<SeenRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for XdsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
