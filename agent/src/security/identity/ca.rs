//! Certificate authorities: Istio's certificate service (gRPC over TLS, as
//! ztunnel calls it) and a built-in CA for local and test use. Both take a PEM
//! CSR for one identity and return a PEM chain: leaf, intermediates, and
//! root(s) last.
use std::{path::PathBuf, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use super::Identity;

pub mod proto {
    //! Generated from proto/istio/v1/auth/ca.proto.
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("istio.v1.auth");
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA unreachable at {address}: {message}")]
    Unreachable { address: String, message: String },
    #[error("CA refused the request: {0}")]
    Refused(String),
    #[error("CA answered with an unusable certificate chain: {0}")]
    BadResponse(String),
    #[error("CA configuration: {0}")]
    Config(String),
    #[error("signing: {0}")]
    Signing(String),
}

impl CaError {
    /// Worth retrying (the CA may come back), unlike a refusal of this CSR.
    pub fn is_transient(&self) -> bool {
        matches!(self, CaError::Unreachable { .. } | CaError::BadResponse(_))
    }

    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            CaError::Unreachable { .. } => "unreachable",
            CaError::Refused(_) => "refused",
            CaError::BadResponse(_) => "bad_response",
            CaError::Config(_) => "config",
            CaError::Signing(_) => "signing",
        }
    }
}

pub enum CertificateAuthority {
    Builtin(Box<BuiltinCa>),
    Istio(IstioCaClient),
}

impl CertificateAuthority {
    /// `istio` or `builtin`, as the `ca` metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            CertificateAuthority::Builtin(_) => "builtin",
            CertificateAuthority::Istio(_) => "istio",
        }
    }

    /// Signs `csr_pem` for `identity`; returns the PEM chain (root last).
    pub async fn sign(
        &self,
        identity: &Identity,
        csr_pem: &str,
        validity: Duration,
    ) -> Result<Vec<String>, CaError> {
        match self {
            CertificateAuthority::Builtin(ca) => ca.sign(identity, csr_pem, validity),
            CertificateAuthority::Istio(ca) => ca.sign(identity, csr_pem, validity).await,
        }
    }
}

/// A CA inside the agent: a root key and certificate, generated or loaded.
pub struct BuiltinCa {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
}

impl BuiltinCa {
    /// A new self-signed root (ECDSA P-256), valid ten years.
    pub fn generate(trust_domain: &str) -> Result<BuiltinCa, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, trust_domain);
        name.push(DnType::CommonName, "Weir built-in root CA");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        params.serial_number = Some(random_serial()?);
        let root = params
            .self_signed(&key)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let root_pem = root.pem();
        Ok(BuiltinCa {
            issuer: Issuer::new(params, key),
            root_pem,
        })
    }

    /// Loads a root certificate and its key (PEM files).
    pub fn load(cert: &std::path::Path, key: &std::path::Path) -> Result<BuiltinCa, CaError> {
        let read = |path: &std::path::Path| {
            std::fs::read_to_string(path)
                .map_err(|e| CaError::Config(format!("{}: {e}", path.display())))
        };
        let root_pem = read(cert)?;
        let key = KeyPair::from_pem(&read(key)?)
            .map_err(|e| CaError::Config(format!("{}: {e}", key.display())))?;
        let issuer = Issuer::from_ca_cert_pem(&root_pem, key)
            .map_err(|e| CaError::Config(format!("{}: {e}", cert.display())))?;
        Ok(BuiltinCa { issuer, root_pem })
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Signs a CSR whose only SAN must be `identity`'s SPIFFE URI.
    pub fn sign(
        &self,
        identity: &Identity,
        csr_pem: &str,
        validity: Duration,
    ) -> Result<Vec<String>, CaError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Refused(format!("unreadable CSR: {e}")))?;
        let expected = identity.to_string();
        let sans = csr_sans(&csr);
        if sans != [expected.clone()] {
            return Err(CaError::Refused(format!(
                "CSR SANs {sans:?} are not exactly [{expected}]"
            )));
        }
        let now = time::OffsetDateTime::now_utc();
        let params = &mut csr.params;
        // One second of slack: X.509 times are whole seconds.
        params.not_before = now - time::Duration::seconds(1);
        params.not_after = now
            + time::Duration::try_from(validity)
                .map_err(|e| CaError::Signing(format!("validity: {e}")))?;
        params.serial_number = Some(random_serial()?);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let leaf = csr
            .signed_by(&self.issuer)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        Ok(vec![leaf.pem(), self.root_pem.clone()])
    }
}

/// A CSR's SANs as text (URIs as themselves, anything else as debug).
pub fn csr_sans(csr: &CertificateSigningRequestParams) -> Vec<String> {
    csr.params
        .subject_alt_names
        .iter()
        .map(|san| match san {
            SanType::URI(uri) => uri.as_str().to_string(),
            other => format!("{other:?}"),
        })
        .collect()
}

fn random_serial() -> Result<SerialNumber, CaError> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CaError::Signing("no randomness".into()))?;
    bytes[0] &= 0x7f; // positive
    Ok(SerialNumber::from_slice(&bytes))
}

/// Where and how to reach Istio's CA.
#[derive(Debug, Clone)]
pub struct IstioCaConfig {
    /// `https://host:port`.
    pub address: String,
    /// PEM root(s) that sign the CA's own serving certificate.
    pub root_cert: PathBuf,
    /// Bearer token file (a service-account token in Kubernetes).
    pub token_file: Option<PathBuf>,
    /// TLS server name to check, when it differs from the address's host.
    pub server_name: Option<String>,
    pub cluster_id: String,
}

/// Client of `istio.v1.auth.IstioCertificateService`.
pub struct IstioCaClient {
    config: IstioCaConfig,
    channel: tonic::transport::Channel,
}

impl IstioCaClient {
    /// Sets up a lazy channel: nothing is dialled until the first request.
    pub fn new(config: IstioCaConfig) -> Result<IstioCaClient, CaError> {
        let root = std::fs::read(&config.root_cert)
            .map_err(|e| CaError::Config(format!("{}: {e}", config.root_cert.display())))?;
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(root));
        if let Some(name) = &config.server_name {
            tls = tls.domain_name(name.clone());
        }
        let channel = tonic::transport::Endpoint::from_shared(config.address.clone())
            .map_err(|e| CaError::Config(format!("CA address {}: {e}", config.address)))?
            .tls_config(tls)
            .map_err(|e| CaError::Config(format!("CA TLS: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        Ok(IstioCaClient { config, channel })
    }

    pub async fn sign(
        &self,
        identity: &Identity,
        csr_pem: &str,
        validity: Duration,
    ) -> Result<Vec<String>, CaError> {
        use prost_types::{Struct, Value, value::Kind};
        let metadata = Struct {
            fields: [(
                "ImpersonatedIdentity".to_string(),
                Value {
                    kind: Some(Kind::StringValue(identity.to_string())),
                },
            )]
            .into_iter()
            .collect(),
        };
        let mut request = tonic::Request::new(proto::IstioCertificateRequest {
            csr: csr_pem.to_string(),
            validity_duration: validity.as_secs() as i64,
            metadata: Some(metadata),
        });
        if let Some(path) = &self.config.token_file {
            let token = std::fs::read_to_string(path)
                .map_err(|e| CaError::Config(format!("token {}: {e}", path.display())))?;
            let bearer = format!("Bearer {}", token.trim())
                .parse()
                .map_err(|_| CaError::Config("token is not a valid header value".into()))?;
            request.metadata_mut().insert("authorization", bearer);
            if let Ok(cluster) = self.config.cluster_id.parse() {
                request.metadata_mut().insert("clusterid", cluster);
            }
        }
        let mut client =
            proto::istio_certificate_service_client::IstioCertificateServiceClient::new(
                self.channel.clone(),
            );
        let response =
            client
                .create_certificate(request)
                .await
                .map_err(|status| match status.code() {
                    tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Unknown => CaError::Unreachable {
                        address: self.config.address.clone(),
                        message: status.message().to_string(),
                    },
                    // istiod's answer when it will not let this caller
                    // impersonate: say what it takes.
                    tonic::Code::Unauthenticated if status.message().contains("impersonation") => {
                        CaError::Refused(format!(
                            "Unauthenticated: {}: istiod signs for {identity} on the agent's behalf only \
                             when the agent's service account is in istiod's CA_TRUSTED_NODE_ACCOUNTS \
                             (default istio-system/ztunnel), its token is a bound pod token, and a pod \
                             with that identity runs on this node; run the agent as such an account or \
                             add its own to CA_TRUSTED_NODE_ACCOUNTS",
                            status.message()
                        ))
                    }
                    code => CaError::Refused(format!("{code:?}: {}", status.message())),
                })?;
        let chain = response.into_inner().cert_chain;
        if chain.is_empty() {
            return Err(CaError::BadResponse("empty certificate chain".into()));
        }
        Ok(chain)
    }
}
