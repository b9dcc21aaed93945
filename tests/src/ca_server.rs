//! A CA for tests that speaks Istio's `IstioCertificateService` over TLS, as
//! istiod does, and records what each request carried. It signs with the
//! agent's built-in CA code (the wire protocol is what is under test here).
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use weir_agent::identity::{
    BuiltinCa, Identity,
    ca::proto::{
        IstioCertificateRequest, IstioCertificateResponse,
        istio_certificate_service_server::{
            IstioCertificateService, IstioCertificateServiceServer,
        },
    },
};

use crate::IstioCa;

/// What one CreateCertificate call carried.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub authorization: Option<String>,
    pub cluster_id: Option<String>,
    pub impersonated: Option<String>,
    pub csr_sans: Vec<String>,
    pub csr_key_is_p256: bool,
    pub validity_seconds: i64,
}

/// How the CA misbehaves, for the first `count` requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answers `UNAVAILABLE`.
    Unavailable,
    /// Answers a chain that is not PEM.
    Garbage,
}

pub const TOKEN: &str = "test-service-account-token";
pub const SERVER_NAME: &str = "istiod.istio-system.svc";

struct Service {
    mesh_ca: BuiltinCa,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    faults_left: Arc<AtomicUsize>,
    fault: Fault,
}

#[tonic::async_trait]
impl IstioCertificateService for Service {
    async fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        let header = |name: &str| {
            request
                .metadata()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_string)
        };
        let (authorization, cluster_id) = (header("authorization"), header("clusterid"));
        let body = request.into_inner();
        let impersonated = body.metadata.as_ref().and_then(|metadata| {
            match metadata.fields.get("ImpersonatedIdentity")?.kind.as_ref()? {
                prost_types::value::Kind::StringValue(text) => Some(text.clone()),
                _ => None,
            }
        });
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&body.csr)
            .map_err(|e| tonic::Status::invalid_argument(format!("CSR: {e}")))?;
        let csr_sans = weir_agent::identity::ca::csr_sans(&csr);
        let csr_key_is_p256 = csr.public_key.algorithm() == &rcgen::PKCS_ECDSA_P256_SHA256;
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(SeenRequest {
                authorization: authorization.clone(),
                cluster_id,
                impersonated: impersonated.clone(),
                csr_sans,
                csr_key_is_p256,
                validity_seconds: body.validity_duration,
            });
        if self
            .faults_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return match self.fault {
                Fault::Unavailable => Err(tonic::Status::unavailable("CA warming up")),
                Fault::Garbage => Ok(tonic::Response::new(IstioCertificateResponse {
                    cert_chain: vec!["not a certificate".into(), "nor this".into()],
                })),
            };
        }
        if authorization.as_deref() != Some(&format!("Bearer {TOKEN}")) {
            return Err(tonic::Status::unauthenticated("bad token"));
        }
        let identity: Identity = impersonated
            .ok_or_else(|| tonic::Status::permission_denied("no ImpersonatedIdentity"))?
            .parse()
            .map_err(tonic::Status::invalid_argument)?;
        let chain = self
            .mesh_ca
            .sign(
                &identity,
                &body.csr,
                Duration::from_secs(body.validity_duration.max(60) as u64),
            )
            .map_err(|e| tonic::Status::permission_denied(e.to_string()))?;
        Ok(tonic::Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

/// A serving certificate for `SERVER_NAME` under a fresh root, as istiod
/// has; the root is written to `dir` for the agent to trust.
pub fn serving_identity(dir: &Path) -> anyhow::Result<(tonic::transport::Identity, PathBuf)> {
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut root_params = CertificateParams::new(Vec::<String>::new())?;
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root = root_params.self_signed(&root_key)?;
    let issuer = rcgen::Issuer::new(root_params, root_key);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let serving =
        CertificateParams::new(vec![SERVER_NAME.to_string()])?.signed_by(&key, &issuer)?;
    let root_cert = dir.join("istiod-root.pem");
    std::fs::write(&root_cert, root.pem())?;
    Ok((
        tonic::transport::Identity::from_pem(serving.pem(), key.serialize_pem()),
        root_cert,
    ))
}

/// A running test CA, listening on 127.0.0.1 inside a node's namespace.
pub struct TestCa {
    pub config: IstioCa,
    pub seen: Arc<Mutex<Vec<SeenRequest>>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestCa {
    /// Starts the CA in `netns`; it misbehaves (`fault`) for the first
    /// `faults` requests. Files go to `dir`.
    pub fn start(netns: &Path, dir: &Path, fault: Fault, faults: usize) -> anyhow::Result<TestCa> {
        std::fs::create_dir_all(dir)?;
        let (identity, root_cert) = serving_identity(dir)?;
        let token_file = dir.join("token");
        std::fs::write(&token_file, format!("{TOKEN}\n"))?;

        let service = Service {
            mesh_ca: BuiltinCa::generate("cluster.local").context("mesh CA")?,
            seen: Arc::new(Mutex::new(Vec::new())),
            faults_left: Arc::new(AtomicUsize::new(faults)),
            fault,
        };
        let seen = service.seen.clone();
        let netns = std::fs::File::open(netns)?;
        let (address_tx, address_rx) = std::sync::mpsc::channel::<anyhow::Result<SocketAddr>>();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let run = || -> anyhow::Result<()> {
                use std::os::fd::AsRawFd as _;
                // SAFETY: only this thread (and the runtime it builds) enters.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns: {}", std::io::Error::last_os_error());
                }
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    let _ = address_tx.send(Ok(listener.local_addr()?));
                    tonic::transport::Server::builder()
                        .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?
                        .add_service(IstioCertificateServiceServer::new(service))
                        .serve_with_incoming_shutdown(tokio_stream_from(listener), async {
                            let _ = shutdown_rx.await;
                        })
                        .await?;
                    Ok(())
                })
            };
            if let Err(error) = run() {
                eprintln!("test CA: {error:#}");
            }
        });
        let address = address_rx
            .recv_timeout(Duration::from_secs(10))
            .context("test CA did not start")??;
        Ok(TestCa {
            config: IstioCa {
                address: format!("https://{address}"),
                root_cert,
                token_file,
                server_name: SERVER_NAME.into(),
            },
            seen,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        })
    }

    pub fn requests(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The listener as the stream of connections tonic's server takes.
fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl futures_core::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::wrappers::TcpListenerStream::new(listener)
}
