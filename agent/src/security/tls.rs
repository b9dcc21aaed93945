//! mTLS for HBONE: TLS 1.3 only, ALPN `h2`, no SNI. Each side checks the
//! peer's chain against the trust roots; the client also checks that the
//! server's SPIFFE URI SAN is the identity it expects, the server that the
//! client's trust domain is its own (and records the client's identity).
use std::sync::Arc;

use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ParsedCertificate,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use crate::security::identity::{Identity, WorkloadCertificate, certificate_identity};

pub const ALPN_H2: &[u8] = b"h2";

/// ring, with the two AES-GCM TLS 1.3 suites ztunnel offers (no ChaCha20).
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.retain(|suite| {
        matches!(
            suite.suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
                | rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        )
    });
    Arc::new(provider)
}

fn roots(cert: &WorkloadCertificate) -> Result<RootCertStore, rustls::Error> {
    let mut store = RootCertStore::empty();
    for root in &cert.roots {
        store.add(root.clone())?;
    }
    Ok(store)
}

/// The name rustls needs for the peer; it is not sent (SNI is off) and not
/// checked (the SPIFFE verifier replaces name checks).
pub fn peer_name(ip: std::net::IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(ip.into())
}

/// Client side: present `cert`, accept only a server presenting `expected`.
pub fn client_config(
    cert: &WorkloadCertificate,
    expected: Identity,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        checks: PeerChecks {
            roots: roots(cert)?,
            algorithms: provider.signature_verification_algorithms,
        },
        expected,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Server side: present `cert`, require a client certificate from our roots
/// and our trust domain.
pub fn server_config(cert: &WorkloadCertificate) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(SpiffeClientVerifier {
        checks: PeerChecks {
            roots: roots(cert)?,
            algorithms: provider.signature_verification_algorithms,
        },
        trust_domain: cert.identity.trust_domain().to_string(),
        subjects: Vec::new(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// What both verifiers share: the roots, and checks of chains and
/// handshake signatures.
#[derive(Debug)]
struct PeerChecks {
    roots: RootCertStore,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PeerChecks {
    /// Verifies the chain against the roots (no name check) and returns the
    /// peer's SPIFFE identity.
    fn identity(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<Identity, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        certificate_identity(end_entity).ok_or_else(|| {
            rustls::Error::General("peer certificate carries no SPIFFE identity".into())
        })
    }

    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    checks: PeerChecks,
    expected: Identity,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = self.checks.identity(end_entity, intermediates, now)?;
        if presented != self.expected {
            return Err(rustls::Error::General(format!(
                "identity mismatch: expected {}, peer presented {presented}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.checks.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.checks.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.checks.algorithms.supported_schemes()
    }
}

#[derive(Debug)]
struct SpiffeClientVerifier {
    checks: PeerChecks,
    trust_domain: String,
    subjects: Vec<DistinguishedName>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.subjects
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let presented = self.checks.identity(end_entity, intermediates, now)?;
        if presented.trust_domain() != self.trust_domain {
            return Err(rustls::Error::General(format!(
                "client {presented} is outside trust domain {}",
                self.trust_domain
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.checks.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.checks.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.checks.algorithms.supported_schemes()
    }
}

/// The identity in the peer's certificate of an established TLS session.
pub fn peer_identity(certificates: Option<&[CertificateDer<'_>]>) -> Option<Identity> {
    certificates
        .and_then(|chain| chain.first())
        .and_then(|leaf| certificate_identity(leaf))
}
