//! A CA for tests that speaks Istio's `IstioCertificateService` over TLS, as
//! istiod does, and records what each request carried. It signs with the
//! agent's built-in CA code (the wire protocol is what is under test here).
use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use weir_agent::security::identity::{
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
    /// istiod's answer to a caller outside its CA_TRUSTED_NODE_ACCOUNTS.
    RefuseImpersonation,
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
        let csr_sans = weir_agent::security::identity::ca::csr_sans(&csr);
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
                // The status and message istiod's CA server sends.
                Fault::RefuseImpersonation => Err(tonic::Status::unauthenticated(
                    "request impersonation authentication failure",
                )),
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
    _server: crate::grpc_server::GrpcServer,
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
        let server = crate::grpc_server::GrpcServer::start(netns, "test CA", move |builder| {
            let mut builder =
                builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
            Ok(builder.add_service(IstioCertificateServiceServer::new(service)))
        })?;
        let address = server.address;
        Ok(TestCa {
            config: IstioCa {
                address: format!("https://{address}"),
                root_cert,
                token_file,
                server_name: SERVER_NAME.into(),
            },
            seen,
            _server: server,
        })
    }

    pub fn requests(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
