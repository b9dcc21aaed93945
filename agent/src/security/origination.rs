//! TLS the proxy originates to a cluster's endpoints (a DestinationRule's
//! SIMPLE or MUTUAL), with Envoy's checks (routing/upstream_tls.rs has the
//! config side):
//! - the chain is verified against the trusted CAs when the config names
//!   some, and not at all when it names none;
//! - the server's name is checked only against the SAN matchers, or
//!   against the SNI sent with `auto_sni_san_validation`; a DNS SAN may be
//!   a wildcard (`*.example.com`) as Envoy's DNS name match allows.
//!
//! The PEM files are read when a connection needs them and read again
//! when one of them changes (istio-agent's file secrets rotate the same
//! way), asynchronously: never on the config path.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::SystemTime};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
    server::ParsedCertificate,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::client::TlsStream;

use crate::routing::{
    StringMatch,
    upstream_tls::{PemSource, SanKind, SanMatcher, TlsOrigination},
};

/// Where distributions keep the system's CA bundle, in the order
/// istio-agent looks for it.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// One cluster's TLS origination: its config and the client config built
/// from the files it names.
pub struct Originator {
    spec: Arc<TlsOrigination>,
    built: tokio::sync::Mutex<Option<Built>>,
}

struct Built {
    config: Arc<ClientConfig>,
    /// The files read and their modification times then.
    stamps: Vec<(PathBuf, Option<SystemTime>)>,
}

impl Originator {
    pub fn new(spec: Arc<TlsOrigination>) -> Originator {
        Originator {
            spec,
            built: tokio::sync::Mutex::new(None),
        }
    }

    /// The SNI for a request to `host` (its authority; a port is dropped).
    pub fn sni(&self, host: Option<&str>) -> Option<Arc<str>> {
        if let Some(sni) = &self.spec.sni {
            return Some(sni.as_str().into());
        }
        if !self.spec.auto_host_sni {
            return None;
        }
        let host = host?;
        let name = match host.strip_prefix('[') {
            // An IP literal is no SNI.
            Some(_) => return None,
            None => host.rsplit_once(':').map_or(host, |(name, _)| name),
        };
        (!name.is_empty() && name.parse::<std::net::IpAddr>().is_err()).then(|| name.into())
    }

    /// TLS over `io` to `endpoint`, sending `sni` if any.
    pub async fn connect<IO>(
        &self,
        io: IO,
        endpoint: SocketAddr,
        sni: Option<&str>,
    ) -> Result<TlsStream<IO>, String>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let config = self.config().await?;
        let name = match sni {
            Some(sni) => ServerName::try_from(sni.to_owned())
                .map_err(|_| format!("SNI {sni:?} is not a DNS name"))?,
            // An IP address sends no SNI.
            None => ServerName::IpAddress(endpoint.ip().into()),
        };
        tokio_rustls::TlsConnector::from(config)
            .connect(name, io)
            .await
            .map_err(|error| format!("TLS handshake: {error}"))
    }

    /// The client config, rebuilt when a file it came from has changed.
    async fn config(&self) -> Result<Arc<ClientConfig>, String> {
        let mut built = self.built.lock().await;
        let stamps = stamps(&self.spec).await;
        if let Some(current) = built.as_ref().filter(|current| current.stamps == stamps) {
            return Ok(current.config.clone());
        }
        let config = client_config(&self.spec).await?;
        *built = Some(Built {
            config: config.clone(),
            stamps,
        });
        Ok(config)
    }
}

fn files(spec: &TlsOrigination) -> Vec<PathBuf> {
    let mut sources: Vec<&PemSource> = spec.trust.iter().collect();
    if let Some((chain, key)) = &spec.client_certificate {
        sources.extend([chain, key]);
    }
    sources
        .into_iter()
        .filter_map(|source| match source {
            PemSource::File(path) => Some(path.clone()),
            PemSource::System => system_bundle().map(PathBuf::from),
            PemSource::Inline(_) => None,
        })
        .collect()
}

fn system_bundle() -> Option<&'static str> {
    SYSTEM_BUNDLES
        .iter()
        .copied()
        .find(|path| std::path::Path::new(path).exists())
}

async fn stamps(spec: &TlsOrigination) -> Vec<(PathBuf, Option<SystemTime>)> {
    let mut stamps = Vec::new();
    for path in files(spec) {
        let modified = tokio::fs::metadata(&path)
            .await
            .and_then(|metadata| metadata.modified())
            .ok();
        stamps.push((path, modified));
    }
    stamps
}

async fn read(source: &PemSource, what: &str) -> Result<Vec<u8>, String> {
    let path = match source {
        PemSource::Inline(bytes) => return Ok(bytes.clone()),
        PemSource::File(path) => path.clone(),
        PemSource::System => PathBuf::from(system_bundle().ok_or_else(|| {
            format!(
                "{what}: no system CA bundle (looked for {})",
                SYSTEM_BUNDLES.join(", ")
            )
        })?),
    };
    tokio::fs::read(&path)
        .await
        .map_err(|error| format!("{what} {}: {error}", path.display()))
}

fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("{what}: {error}"))?;
    if certificates.is_empty() {
        return Err(format!("{what}: no PEM certificate"));
    }
    Ok(certificates)
}

async fn client_config(spec: &TlsOrigination) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match &spec.trust {
        None => None,
        Some(source) => {
            let pem = read(source, "trusted CA").await?;
            let mut store = RootCertStore::empty();
            let (added, _ignored) =
                store.add_parsable_certificates(certificates(&pem, "trusted CA")?);
            if added == 0 {
                return Err("trusted CA: no usable certificate".into());
            }
            Some(store)
        }
    };
    let verifier = Arc::new(EnvoyVerifier {
        roots,
        names: spec.subject_alt_names.clone(),
        sni_is_san: spec.auto_sni_san_validation,
        algorithms: provider.signature_verification_algorithms,
    });
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = [
        (spec.tls13, &rustls::version::TLS13),
        (spec.tls12, &rustls::version::TLS12),
    ]
    .into_iter()
    .filter_map(|(allowed, version)| allowed.then_some(version))
    .collect();
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .map_err(|error| format!("TLS versions: {error}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match &spec.client_certificate {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => {
            let chain = certificates(
                &read(chain, "client certificate").await?,
                "client certificate",
            )?;
            let key = PrivateKeyDer::from_pem_slice(&read(key, "private key").await?)
                .map_err(|error| format!("private key: {error}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|error| format!("client certificate: {error}"))?
        }
    };
    config.alpn_protocols = spec.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}

/// Envoy's certificate checks (see the module doc).
#[derive(Debug)]
struct EnvoyVerifier {
    roots: Option<RootCertStore>,
    names: Vec<SanMatcher>,
    sni_is_san: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for EnvoyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let parsed = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        if self.names.is_empty() && !self.sni_is_san {
            return Ok(ServerCertVerified::assertion());
        }
        let presented = subject_alt_names(end_entity)?;
        let sni_matches = |sni: &str| {
            presented
                .iter()
                .any(|(kind, san)| *kind == SanKind::Dns && dns_name_match(san, sni))
        };
        let ok = match server_name {
            ServerName::DnsName(sni) if self.sni_is_san => sni_matches(sni.as_ref()),
            // No SNI was sent: the configured matchers decide.
            _ => {
                self.names.is_empty()
                    || self
                        .names
                        .iter()
                        .any(|matcher| san_matches(matcher, &presented))
            }
        };
        if ok {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The certificate's SANs by kind (IP addresses in their text form).
fn subject_alt_names(
    certificate: &CertificateDer<'_>,
) -> Result<Vec<(SanKind, String)>, rustls::Error> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref())
        .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
    let Ok(Some(extension)) = parsed.subject_alternative_name() else {
        return Ok(Vec::new());
    };
    Ok(extension
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((SanKind::Dns, dns.to_string())),
            GeneralName::URI(uri) => Some((SanKind::Uri, uri.to_string())),
            GeneralName::RFC822Name(email) => Some((SanKind::Email, email.to_string())),
            GeneralName::IPAddress(bytes) => ip_text(bytes).map(|ip| (SanKind::IpAddress, ip)),
            _ => None,
        })
        .collect())
}

fn ip_text(bytes: &[u8]) -> Option<String> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes)
            .ok()
            .map(|octets| std::net::Ipv4Addr::from(octets).to_string()),
        16 => <[u8; 16]>::try_from(bytes)
            .ok()
            .map(|octets| std::net::Ipv6Addr::from(octets).to_string()),
        _ => None,
    }
}

/// Whether a presented SAN satisfies one matcher: of its kind (any kind
/// for the deprecated untyped matchers); an exact DNS matcher follows
/// Envoy's DNS name match, wildcards in the certificate included.
fn san_matches(matcher: &SanMatcher, presented: &[(SanKind, String)]) -> bool {
    presented.iter().any(|(kind, san)| {
        if matcher.kind.is_some_and(|wanted| wanted != *kind) {
            return false;
        }
        match (&matcher.value.kind, kind) {
            (StringMatch::Exact(name), SanKind::Dns) if !matcher.value.ignore_case => {
                dns_name_match(san, name)
            }
            _ => matcher.value.matches(san),
        }
    })
}

/// Envoy's `dnsNameMatch`: `san` equals `name` (case-insensitively), or is
/// `*.<rest>` and `name` is one more label before `<rest>`.
fn dns_name_match(san: &str, name: &str) -> bool {
    if san.eq_ignore_ascii_case(name) {
        return true;
    }
    let Some(rest) = san.strip_prefix("*.") else {
        return false;
    };
    name.split_once('.')
        .is_some_and(|(label, tail)| !label.is_empty() && tail.eq_ignore_ascii_case(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_match_as_envoy_matches_them() {
        assert!(dns_name_match("api.example.com", "API.example.com"));
        assert!(dns_name_match("*.example.com", "api.example.com"));
        assert!(!dns_name_match("*.example.com", "a.b.example.com"));
        assert!(!dns_name_match("*.example.com", "example.com"));
        assert!(!dns_name_match("api.example.com", "www.example.com"));
    }

    #[test]
    fn the_sni_is_the_configured_one_or_the_requests_host() {
        let spec = |sni: Option<&str>, auto: bool| {
            let mut spec = crate::routing::upstream_tls::tests_support::plain();
            spec.sni = sni.map(str::to_owned);
            spec.auto_host_sni = auto;
            Originator::new(Arc::new(spec))
        };
        assert_eq!(
            spec(Some("fixed.example"), true)
                .sni(Some("other:443"))
                .as_deref(),
            Some("fixed.example")
        );
        assert_eq!(
            spec(None, true)
                .sni(Some("api.example.com:8443"))
                .as_deref(),
            Some("api.example.com")
        );
        assert_eq!(spec(None, true).sni(Some("10.0.0.1:80")), None);
        assert_eq!(spec(None, true).sni(Some("[fd00::1]:80")), None);
        assert_eq!(spec(None, false).sni(Some("api.example.com")), None);
    }
}
