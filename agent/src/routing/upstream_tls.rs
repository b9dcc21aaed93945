//! A cluster's transport socket: whether the proxy originates TLS to its
//! endpoints (Istio's DestinationRule `tls.mode: SIMPLE` or `MUTUAL`), or
//! its connections travel as Weir's other upstream connections do.
//!
//! istiod puts a transport socket on nearly every cluster. Istio's own
//! mutual TLS (ISTIO_MUTUAL, and auto mTLS's `tlsMode-istio` match) names
//! the SDS secrets `default` and `ROOTCA` from istio-agent: Weir carries
//! meshed traffic in its own mTLS (HBONE), so those are [`UpstreamTls::Mesh`].
//! Any other TLS context originates TLS, with Envoy's semantics:
//! - no validation context: the server's certificate is not verified, as
//!   in Envoy (istiod's `insecureSkipVerify`);
//! - trusted CAs: the chain is verified; the name is checked only against
//!   the SAN matchers (Envoy checks no hostname by itself), and SAN matchers
//!   without a trusted CA are refused, as Envoy refuses them;
//! - istio-agent's SDS names are read as istio-agent serves them:
//!   `file-root:<ca path>`, `file-cert:<cert path>~<key path>`; secrets of
//!   Kubernetes (`kubernetes://`, a DestinationRule's `credentialName`,
//!   which istiod serves as SDS over ADS) and any other SDS are refused:
//!   Weir has no SDS client.
//!
//! Files are read when a connection is opened (and again when they
//! change), not here: conversion runs on the config path, and istio-agent's
//! SDS serves file secrets late too.
use std::sync::Arc;

use envoy_types::pb::envoy::{
    config::{cluster::v3 as cluster_pb, core::v3 as core_pb},
    extensions::transport_sockets::{
        internal_upstream::v3 as internal_pb, proxy_protocol::v3 as proxy_pb,
        raw_buffer::v3 as raw_pb, tls::v3 as tls_pb,
    },
};
use prost::Message as _;

use super::{StringMatcher, envoy};

/// How a cluster's upstream connections are secured.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum UpstreamTls {
    /// As Weir's L4 traffic travels: HBONE (mTLS) to a meshed workload,
    /// plain TCP otherwise. No transport socket, `raw_buffer`, an internal
    /// upstream, or Istio's own mutual TLS.
    #[default]
    Mesh,
    /// TLS the proxy originates, inside whatever carries the connection.
    Originate(Arc<TlsOrigination>),
}

/// The PROXY protocol header the proxy sends first on each upstream
/// connection (a DestinationRule's `proxyProtocol`, Envoy's
/// `upstream_proxy_protocol` socket): the client's address and the address
/// it dialled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyProtocol {
    V1,
    V2,
}

/// What a cluster's transport socket asks of its upstream connections.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UpstreamTransport {
    pub tls: UpstreamTls,
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// An `UpstreamTlsContext` the proxy originates.
#[derive(Debug, Clone)]
pub struct TlsOrigination {
    /// `sni`; `None`: no SNI is sent.
    pub sni: Option<String>,
    /// `auto_host_sni`: the request's host (without a port) is the SNI,
    /// when `sni` is not set.
    pub auto_host_sni: bool,
    /// `auto_sni_san_validation`: the server's certificate must carry the
    /// SNI sent as a DNS SAN.
    pub auto_sni_san_validation: bool,
    pub alpn: Vec<String>,
    /// Whose signature the server's chain must carry; `None`: not verified.
    pub trust: Option<PemSource>,
    /// At least one SAN must match one of these (any, when empty).
    pub subject_alt_names: Vec<SanMatcher>,
    /// The client's certificate chain and key (Istio's MUTUAL).
    pub client_certificate: Option<(PemSource, PemSource)>,
    /// TLS 1.2 allowed (TLS 1.3 always is).
    pub tls12: bool,
    /// TLS 1.3 allowed.
    pub tls13: bool,
    /// What it was made from, for equality: the same context is the same
    /// origination.
    source: tls_pb::UpstreamTlsContext,
}

impl PartialEq for TlsOrigination {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// Where PEM data comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PemSource {
    File(std::path::PathBuf),
    Inline(Vec<u8>),
    /// The system's trust store (`system_root_certs`, istio-agent's
    /// `file-root:system`).
    System,
}

/// Envoy's `SubjectAltNameMatcher`; `kind` `None` (the deprecated
/// `match_subject_alt_names`): a SAN of any type.
#[derive(Debug, Clone)]
pub struct SanMatcher {
    pub kind: Option<SanKind>,
    pub value: StringMatcher,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SanKind {
    Dns,
    Uri,
    Email,
    IpAddress,
}

const TLS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

fn type_url<M: prost::Name>() -> String {
    format!("type.googleapis.com/{}", M::full_name())
}

/// A cluster's `transport_socket`, `transport_socket_matches` and
/// `transport_socket_matcher`, with the `upstream_http_protocol_options`
/// of its HTTP options (the SNI from the request's host, which istiod sets
/// for a DestinationRule's TLS without `sni`).
pub fn convert(
    socket: Option<&core_pb::TransportSocket>,
    matches: &[cluster_pb::cluster::TransportSocketMatch],
    matcher_set: bool,
    auto_sni: Option<&core_pb::UpstreamHttpProtocolOptions>,
) -> Result<UpstreamTransport, String> {
    if matcher_set {
        return Err("unsupported field transport_socket_matcher".into());
    }
    let (host_sni, san_validation) = match auto_sni {
        None => (false, false),
        Some(core_pb::UpstreamHttpProtocolOptions {
            auto_sni,
            auto_san_validation,
            override_auto_sni_header,
        }) => {
            if !override_auto_sni_header.is_empty() {
                return Err(
                    "unsupported field upstream_http_protocol_options.override_auto_sni_header"
                        .into(),
                );
            }
            (*auto_sni, *auto_san_validation)
        }
    };
    // Per-endpoint sockets (istiod's auto mTLS, a waypoint's HBONE match):
    // only Weir's own ways of travelling are accepted there, and one PROXY
    // protocol setting for them all (istiod wraps every match alike).
    let mut proxy_protocol = None;
    for (index, matched) in matches.iter().enumerate() {
        let at = format!("transport_socket_matches[{index}] ({:?})", matched.name);
        let (tls, proxy) = transport_socket(matched.transport_socket.as_ref(), &at)?;
        if let UpstreamTls::Originate(_) = tls {
            return Err(format!(
                "{at}: TLS origination chosen per endpoint is not supported (only for the whole cluster)"
            ));
        }
        if index > 0 && proxy != proxy_protocol {
            return Err(format!(
                "{at}: a PROXY protocol setting that differs from the other matches'"
            ));
        }
        proxy_protocol = proxy;
    }
    let (tls, proxy) = transport_socket(socket, "transport_socket")?;
    if socket.is_some() && !matches.is_empty() && proxy != proxy_protocol {
        return Err(
            "transport_socket: a PROXY protocol setting that differs from transport_socket_matches'"
                .into(),
        );
    }
    let proxy_protocol = proxy.or(proxy_protocol);
    let tls = match tls {
        UpstreamTls::Originate(origination) if host_sni || san_validation => {
            let mut origination = TlsOrigination::clone(&origination);
            origination.auto_host_sni |= host_sni;
            origination.auto_sni_san_validation |= san_validation;
            if origination.auto_sni_san_validation && origination.trust.is_none() {
                return Err("upstream_http_protocol_options.auto_san_validation without a trusted CA, which Envoy refuses as insecure".into());
            }
            UpstreamTls::Originate(Arc::new(origination))
        }
        // Without TLS to originate, nothing to name or check.
        other => other,
    };
    Ok(UpstreamTransport {
        tls,
        proxy_protocol,
    })
}

/// One transport socket: its TLS, and the PROXY protocol it wraps that in.
fn transport_socket(
    socket: Option<&core_pb::TransportSocket>,
    at: &str,
) -> Result<(UpstreamTls, Option<ProxyProtocol>), String> {
    use core_pb::transport_socket::ConfigType;
    let Some(core_pb::TransportSocket { name, config_type }) = socket else {
        return Ok((UpstreamTls::Mesh, None));
    };
    let any = match config_type {
        Some(ConfigType::TypedConfig(any)) => any,
        None if matches!(
            name.as_str(),
            "envoy.transport_sockets.raw_buffer" | "raw_buffer"
        ) =>
        {
            return Ok((UpstreamTls::Mesh, None));
        }
        // Envoy's TLS socket with its defaults: TLS, nothing checked.
        None if matches!(name.as_str(), "envoy.transport_sockets.tls" | "tls") => {
            return Ok((
                upstream_tls_context(tls_pb::UpstreamTlsContext::default(), at)?,
                None,
            ));
        }
        None => {
            return Err(format!(
                "{at}: transport socket {name:?} without a typed_config"
            ));
        }
    };
    let at = format!("{at}.typed_config");
    match any.type_url.as_str() {
        TLS_TYPE => {
            let context = tls_pb::UpstreamTlsContext::decode(any.value.as_slice())
                .map_err(|e| format!("{at}: undecodable UpstreamTlsContext: {e}"))?;
            Ok((upstream_tls_context(context, &at)?, None))
        }
        url if url == type_url::<raw_pb::RawBuffer>() => Ok((UpstreamTls::Mesh, None)),
        url if url == type_url::<proxy_pb::ProxyProtocolUpstreamTransport>() => {
            let proxy = proxy_pb::ProxyProtocolUpstreamTransport::decode(any.value.as_slice())
                .map_err(|e| format!("{at}: undecodable ProxyProtocolUpstreamTransport: {e}"))?;
            let proxy_pb::ProxyProtocolUpstreamTransport {
                config,
                transport_socket: inner,
                // Weir's source and destination are always addresses.
                allow_unspecified_address: _,
                // Connections are pooled per (client, dialled address)
                // with the header anyway.
                tlv_as_pool_key: _,
            } = proxy;
            let core_pb::ProxyProtocolConfig {
                version,
                pass_through_tlvs,
                added_tlvs,
            } = config.unwrap_or_default();
            envoy::reject(
                &format!("{at}.config."),
                &[
                    ("pass_through_tlvs", pass_through_tlvs.is_some()),
                    ("added_tlvs", !added_tlvs.is_empty()),
                ],
            )?;
            let version = match core_pb::proxy_protocol_config::Version::try_from(version) {
                Ok(core_pb::proxy_protocol_config::Version::V1) => ProxyProtocol::V1,
                Ok(core_pb::proxy_protocol_config::Version::V2) => ProxyProtocol::V2,
                Err(_) => return Err(format!("{at}.config.version: unknown {version}")),
            };
            let (tls, nested) =
                transport_socket(inner.as_ref(), &format!("{at}.transport_socket"))?;
            if nested.is_some() {
                return Err(format!("{at}: a PROXY protocol socket inside another"));
            }
            Ok((tls, Some(version)))
        }
        url if url == type_url::<internal_pb::InternalUpstreamTransport>() => {
            // A waypoint's hop to its own internal listener: what it wraps
            // decides (istiod wraps raw_buffer).
            let internal = internal_pb::InternalUpstreamTransport::decode(any.value.as_slice())
                .map_err(|e| format!("{at}: undecodable InternalUpstreamTransport: {e}"))?;
            transport_socket(
                internal.transport_socket.as_ref(),
                &format!("{at}.transport_socket"),
            )
        }
        other => Err(format!("{at}: unsupported transport socket type {other:?}")),
    }
}

/// Istio's mutual TLS names istio-agent's workload certificate `default`
/// and its mesh roots `ROOTCA`.
fn istio_mutual(common: &tls_pb::CommonTlsContext) -> bool {
    use tls_pb::common_tls_context::ValidationContextType as Validation;
    let certificate = common
        .tls_certificate_sds_secret_configs
        .iter()
        .any(|sds| sds.name == "default");
    let roots = match &common.validation_context_type {
        Some(Validation::ValidationContextSdsSecretConfig(sds)) => sds.name == "ROOTCA",
        Some(Validation::CombinedValidationContext(combined)) => combined
            .validation_context_sds_secret_config
            .as_ref()
            .is_some_and(|sds| sds.name == "ROOTCA"),
        _ => false,
    };
    certificate && roots
}

#[allow(deprecated)]
fn upstream_tls_context(
    context: tls_pb::UpstreamTlsContext,
    at: &str,
) -> Result<UpstreamTls, String> {
    let common = context.common_tls_context.clone().unwrap_or_default();
    if istio_mutual(&common) {
        return Ok(UpstreamTls::Mesh);
    }
    let tls_pb::UpstreamTlsContext {
        common_tls_context: _,
        sni,
        auto_host_sni,
        auto_sni_san_validation,
        allow_renegotiation,
        // Session resumption: rustls keeps its own cache.
        max_session_keys: _,
        enforce_rsa_key_usage,
    } = &context;
    let at_context = format!("{at}.");
    envoy::reject(
        &at_context,
        &[
            ("allow_renegotiation", *allow_renegotiation),
            // rustls (webpki) checks key usage; turning that off is not
            // offered.
            (
                "enforce_rsa_key_usage",
                enforce_rsa_key_usage
                    .as_ref()
                    .is_some_and(|value| !value.value),
            ),
        ],
    )?;
    let common_at = format!("{at}.common_tls_context");
    let mut origination = common_tls_context(common, &common_at)?;
    origination.sni = (!sni.is_empty()).then(|| sni.clone());
    origination.auto_host_sni = *auto_host_sni;
    origination.auto_sni_san_validation = *auto_sni_san_validation;
    if origination.trust.is_none()
        && (!origination.subject_alt_names.is_empty() || origination.auto_sni_san_validation)
    {
        return Err(format!(
            "{common_at}: SAN verification without a trusted CA, which Envoy refuses as insecure"
        ));
    }
    origination.source = context;
    Ok(UpstreamTls::Originate(Arc::new(origination)))
}

#[allow(deprecated)]
fn common_tls_context(
    common: tls_pb::CommonTlsContext,
    at: &str,
) -> Result<TlsOrigination, String> {
    use tls_pb::common_tls_context::ValidationContextType as Validation;
    let tls_pb::CommonTlsContext {
        tls_params,
        tls_certificates,
        tls_certificate_sds_secret_configs,
        tls_certificate_provider_instance,
        custom_tls_certificate_selector,
        tls_certificate_certificate_provider,
        tls_certificate_certificate_provider_instance,
        alpn_protocols,
        custom_handshaker,
        key_log,
        validation_context_type,
    } = common;
    let at_dot = format!("{at}.");
    envoy::reject(
        &at_dot,
        &[
            (
                "tls_certificate_provider_instance",
                tls_certificate_provider_instance.is_some(),
            ),
            (
                "custom_tls_certificate_selector",
                custom_tls_certificate_selector.is_some(),
            ),
            (
                "tls_certificate_certificate_provider",
                tls_certificate_certificate_provider.is_some(),
            ),
            (
                "tls_certificate_certificate_provider_instance",
                tls_certificate_certificate_provider_instance.is_some(),
            ),
            ("custom_handshaker", custom_handshaker.is_some()),
            ("key_log", key_log.is_some()),
        ],
    )?;
    let (tls12, tls13) = match tls_params {
        Some(params) => versions(params, &format!("{at}.tls_params"))?,
        None => (true, true),
    };
    let mut certificates = Vec::new();
    for (index, certificate) in tls_certificates.into_iter().enumerate() {
        certificates.push(tls_certificate(
            certificate,
            &format!("{at}.tls_certificates[{index}]"),
        )?);
    }
    for (index, sds) in tls_certificate_sds_secret_configs.iter().enumerate() {
        let at = format!("{at}.tls_certificate_sds_secret_configs[{index}]");
        certificates.push(certificate_secret(&sds.name, &at)?);
    }
    if certificates.len() > 1 {
        return Err(format!(
            "{at}: more than one client certificate (Weir presents one)"
        ));
    }
    let (trust, subject_alt_names) = match validation_context_type {
        None => (None, Vec::new()),
        Some(Validation::ValidationContext(context)) => {
            validation_context(context, &format!("{at}.validation_context"))?
        }
        Some(Validation::ValidationContextSdsSecretConfig(sds)) => (
            Some(root_secret(
                &sds.name,
                &format!("{at}.validation_context_sds_secret_config"),
            )?),
            Vec::new(),
        ),
        Some(Validation::CombinedValidationContext(combined)) => {
            let tls_pb::common_tls_context::CombinedCertificateValidationContext {
                default_validation_context,
                validation_context_sds_secret_config,
                validation_context_certificate_provider,
                validation_context_certificate_provider_instance,
            } = combined;
            let at = format!("{at}.combined_validation_context");
            envoy::reject(
                &format!("{at}."),
                &[
                    (
                        "validation_context_certificate_provider",
                        validation_context_certificate_provider.is_some(),
                    ),
                    (
                        "validation_context_certificate_provider_instance",
                        validation_context_certificate_provider_instance.is_some(),
                    ),
                ],
            )?;
            let (default_trust, names) = match default_validation_context {
                Some(context) => {
                    validation_context(context, &format!("{at}.default_validation_context"))?
                }
                None => (None, Vec::new()),
            };
            // The SDS context is merged over the default one: its roots win.
            let trust = match validation_context_sds_secret_config {
                Some(sds) => Some(root_secret(
                    &sds.name,
                    &format!("{at}.validation_context_sds_secret_config"),
                )?),
                None => default_trust,
            };
            (trust, names)
        }
        Some(Validation::ValidationContextCertificateProvider(_)) => {
            return Err(format!(
                "unsupported field {at}.validation_context_certificate_provider"
            ));
        }
        Some(Validation::ValidationContextCertificateProviderInstance(_)) => {
            return Err(format!(
                "unsupported field {at}.validation_context_certificate_provider_instance"
            ));
        }
    };
    Ok(TlsOrigination {
        sni: None,
        auto_host_sni: false,
        auto_sni_san_validation: false,
        alpn: alpn_protocols,
        trust,
        subject_alt_names,
        client_certificate: certificates.pop(),
        tls12,
        tls13,
        source: tls_pb::UpstreamTlsContext::default(),
    })
}

/// `tls_params`: the versions; Weir offers no choice of ciphers, curves or
/// signature algorithms (rustls's safe defaults).
fn versions(params: tls_pb::TlsParameters, at: &str) -> Result<(bool, bool), String> {
    use tls_pb::tls_parameters::TlsProtocol;
    let tls_pb::TlsParameters {
        tls_minimum_protocol_version,
        tls_maximum_protocol_version,
        cipher_suites,
        ecdh_curves,
        signature_algorithms,
        compliance_policies,
    } = params;
    envoy::reject(
        &format!("{at}."),
        &[
            ("cipher_suites", !cipher_suites.is_empty()),
            ("ecdh_curves", !ecdh_curves.is_empty()),
            ("signature_algorithms", !signature_algorithms.is_empty()),
            ("compliance_policies", !compliance_policies.is_empty()),
        ],
    )?;
    let version = |value: i32, field: &str| {
        TlsProtocol::try_from(value).map_err(|_| format!("{at}.{field}: unknown version {value}"))
    };
    // Envoy's client defaults: TLS 1.2 to 1.3. Below 1.2 rustls speaks
    // nothing, so a minimum of 1.0 or 1.1 still begins at 1.2.
    let minimum = version(tls_minimum_protocol_version, "tls_minimum_protocol_version")?;
    let maximum = version(tls_maximum_protocol_version, "tls_maximum_protocol_version")?;
    if matches!(maximum, TlsProtocol::TlSv10 | TlsProtocol::TlSv11) {
        return Err(format!(
            "{at}.tls_maximum_protocol_version: {} (Weir speaks TLS 1.2 and 1.3)",
            maximum.as_str_name()
        ));
    }
    let tls12 = minimum != TlsProtocol::TlSv13;
    let tls13 = maximum != TlsProtocol::TlSv12;
    if !tls12 && !tls13 {
        return Err(format!("{at}: no TLS version left"));
    }
    Ok((tls12, tls13))
}

fn tls_certificate(
    certificate: tls_pb::TlsCertificate,
    at: &str,
) -> Result<(PemSource, PemSource), String> {
    let tls_pb::TlsCertificate {
        certificate_chain,
        private_key,
        pkcs12,
        watched_directory,
        private_key_provider,
        password,
        ocsp_staple,
        signed_certificate_timestamp,
        tls_params,
    } = certificate;
    envoy::reject(
        &format!("{at}."),
        &[
            ("pkcs12", pkcs12.is_some()),
            ("watched_directory", watched_directory.is_some()),
            ("private_key_provider", private_key_provider.is_some()),
            ("password", password.is_some()),
            ("ocsp_staple", ocsp_staple.is_some()),
            (
                "signed_certificate_timestamp",
                !signed_certificate_timestamp.is_empty(),
            ),
            ("tls_params", tls_params.is_some()),
        ],
    )?;
    let chain = certificate_chain
        .ok_or_else(|| format!("{at}: no certificate_chain"))
        .and_then(|source| pem_source(source, &format!("{at}.certificate_chain")))?;
    let key = private_key
        .ok_or_else(|| format!("{at}: no private_key"))
        .and_then(|source| pem_source(source, &format!("{at}.private_key")))?;
    Ok((chain, key))
}

fn pem_source(source: core_pb::DataSource, at: &str) -> Result<PemSource, String> {
    use core_pb::data_source::Specifier;
    let core_pb::DataSource {
        watched_directory,
        specifier,
    } = source;
    envoy::reject(
        &format!("{at}."),
        &[("watched_directory", watched_directory.is_some())],
    )?;
    match specifier {
        Some(Specifier::Filename(path)) if !path.is_empty() => Ok(PemSource::File(path.into())),
        Some(Specifier::InlineString(text)) => Ok(PemSource::Inline(text.into_bytes())),
        Some(Specifier::InlineBytes(bytes)) => Ok(PemSource::Inline(bytes)),
        Some(Specifier::EnvironmentVariable(_)) => {
            Err(format!("unsupported field {at}.environment_variable"))
        }
        _ => Err(format!("{at}: empty")),
    }
}

/// istio-agent's SDS name for a client certificate: `file-cert:<chain>~<key>`.
fn certificate_secret(name: &str, at: &str) -> Result<(PemSource, PemSource), String> {
    if let Some(files) = name.strip_prefix("file-cert:") {
        let (chain, key) = files
            .split_once('~')
            .filter(|(chain, key)| !chain.is_empty() && !key.is_empty())
            .ok_or_else(|| format!("{at}: {name:?}: want file-cert:<chain path>~<key path>"))?;
        return Ok((PemSource::File(chain.into()), PemSource::File(key.into())));
    }
    Err(unsupported_secret(name, at))
}

/// istio-agent's SDS name for trusted CAs: `file-root:<path>`, or
/// `file-root:system` for the system's.
fn root_secret(name: &str, at: &str) -> Result<PemSource, String> {
    match name.strip_prefix("file-root:") {
        Some("system") => Ok(PemSource::System),
        Some(path) if !path.is_empty() => Ok(PemSource::File(path.into())),
        _ => Err(unsupported_secret(name, at)),
    }
}

fn unsupported_secret(name: &str, at: &str) -> String {
    if name.starts_with("kubernetes://") {
        format!(
            "{at}: SDS secret {name:?} (a DestinationRule's credentialName): Weir does not fetch SDS secrets over ADS; give the files (caCertificates, clientCertificate, privateKey)"
        )
    } else {
        format!(
            "{at}: SDS secret {name:?}: Weir has no SDS client, only istio-agent's file-root: and file-cert: names"
        )
    }
}

#[allow(deprecated)]
fn validation_context(
    context: tls_pb::CertificateValidationContext,
    at: &str,
) -> Result<(Option<PemSource>, Vec<SanMatcher>), String> {
    use tls_pb::{
        certificate_validation_context::TrustChainVerification, subject_alt_name_matcher::SanType,
    };
    let tls_pb::CertificateValidationContext {
        trusted_ca,
        ca_certificate_provider_instance,
        system_root_certs,
        watched_directory,
        verify_certificate_spki,
        verify_certificate_hash,
        match_typed_subject_alt_names,
        match_subject_alt_names,
        require_signed_certificate_timestamp,
        crl,
        allow_expired_certificate,
        trust_chain_verification,
        custom_validator_config,
        only_verify_leaf_cert_crl,
        max_verify_depth,
        // A server's setting.
        suppress_client_ca_list: _,
    } = context;
    envoy::reject(
        &format!("{at}."),
        &[
            (
                "ca_certificate_provider_instance",
                ca_certificate_provider_instance.is_some(),
            ),
            ("watched_directory", watched_directory.is_some()),
            (
                "verify_certificate_spki",
                !verify_certificate_spki.is_empty(),
            ),
            (
                "verify_certificate_hash",
                !verify_certificate_hash.is_empty(),
            ),
            (
                "require_signed_certificate_timestamp",
                require_signed_certificate_timestamp.is_some_and(|value| value.value),
            ),
            ("crl", crl.is_some()),
            ("allow_expired_certificate", allow_expired_certificate),
            (
                "trust_chain_verification",
                trust_chain_verification != TrustChainVerification::VerifyTrustChain as i32,
            ),
            ("custom_validator_config", custom_validator_config.is_some()),
            ("only_verify_leaf_cert_crl", only_verify_leaf_cert_crl),
            ("max_verify_depth", max_verify_depth.is_some()),
        ],
    )?;
    let trust = match (trusted_ca, system_root_certs) {
        (Some(source), _) => Some(pem_source(source, &format!("{at}.trusted_ca"))?),
        (None, Some(_)) => Some(PemSource::System),
        (None, None) => None,
    };
    let mut names = Vec::new();
    for (index, matcher) in match_typed_subject_alt_names.iter().enumerate() {
        let at = format!("{at}.match_typed_subject_alt_names[{index}]");
        let kind = match SanType::try_from(matcher.san_type) {
            Ok(SanType::Dns) => SanKind::Dns,
            Ok(SanType::Uri) => SanKind::Uri,
            Ok(SanType::Email) => SanKind::Email,
            Ok(SanType::IpAddress) => SanKind::IpAddress,
            _ => return Err(format!("{at}.san_type: {} not supported", matcher.san_type)),
        };
        let value = matcher
            .matcher
            .as_ref()
            .ok_or_else(|| format!("{at}: no matcher"))
            .and_then(|value| envoy::string_matcher(value, &format!("{at}.matcher")))?;
        names.push(SanMatcher {
            kind: Some(kind),
            value,
        });
    }
    for (index, matcher) in match_subject_alt_names.iter().enumerate() {
        names.push(SanMatcher {
            kind: None,
            value: envoy::string_matcher(
                matcher,
                &format!("{at}.match_subject_alt_names[{index}]"),
            )?,
        });
    }
    Ok((trust, names))
}

#[cfg(test)]
pub(crate) mod tests_support {
    /// TLS with no SNI, no checks and no client certificate.
    pub fn plain() -> super::TlsOrigination {
        super::TlsOrigination {
            sni: None,
            auto_host_sni: false,
            auto_sni_san_validation: false,
            alpn: Vec::new(),
            trust: None,
            subject_alt_names: Vec::new(),
            client_certificate: None,
            tls12: true,
            tls13: true,
            source: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::Any;

    fn socket(context: tls_pb::UpstreamTlsContext) -> core_pb::TransportSocket {
        core_pb::TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(core_pb::transport_socket::ConfigType::TypedConfig(Any {
                type_url: TLS_TYPE.into(),
                value: context.encode_to_vec(),
            })),
        }
    }

    fn sds(name: &str) -> tls_pb::SdsSecretConfig {
        tls_pb::SdsSecretConfig {
            name: name.into(),
            sds_config: None,
        }
    }

    fn combined(
        names: Vec<tls_pb::SubjectAltNameMatcher>,
        root: &str,
    ) -> tls_pb::common_tls_context::ValidationContextType {
        tls_pb::common_tls_context::ValidationContextType::CombinedValidationContext(
            tls_pb::common_tls_context::CombinedCertificateValidationContext {
                default_validation_context: Some(tls_pb::CertificateValidationContext {
                    match_typed_subject_alt_names: names,
                    ..Default::default()
                }),
                validation_context_sds_secret_config: Some(sds(root)),
                ..Default::default()
            },
        )
    }

    fn converted(context: tls_pb::UpstreamTlsContext) -> Result<UpstreamTls, String> {
        convert(Some(&socket(context)), &[], false, None).map(|transport| transport.tls)
    }

    #[test]
    fn istio_mutual_is_the_mesh() {
        let context = tls_pb::UpstreamTlsContext {
            common_tls_context: Some(tls_pb::CommonTlsContext {
                tls_certificate_sds_secret_configs: vec![sds("default")],
                validation_context_type: Some(combined(Vec::new(), "ROOTCA")),
                alpn_protocols: vec!["istio-peer-exchange".into(), "istio".into()],
                ..Default::default()
            }),
            sni: "outbound_.9080_._.reviews.default.svc.cluster.local".into(),
            ..Default::default()
        };
        assert_eq!(converted(context), Ok(UpstreamTls::Mesh));
        assert_eq!(
            convert(None, &[], false, None),
            Ok(UpstreamTransport::default())
        );
    }

    #[test]
    fn simple_and_mutual_originate_with_istio_agents_file_names() {
        let context = tls_pb::UpstreamTlsContext {
            common_tls_context: Some(tls_pb::CommonTlsContext {
                tls_certificate_sds_secret_configs: vec![sds(
                    "file-cert:/certs/client.pem~/certs/key.pem",
                )],
                validation_context_type: Some(combined(
                    vec![tls_pb::SubjectAltNameMatcher {
                        san_type: tls_pb::subject_alt_name_matcher::SanType::Dns as i32,
                        matcher: Some(envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher {
                            match_pattern: Some(
                                envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern::Exact(
                                    "api.example.com".into(),
                                ),
                            ),
                            ignore_case: false,
                        }),
                        oid: String::new(),
                    }],
                    "file-root:/certs/ca.pem",
                )),
                ..Default::default()
            }),
            sni: "api.example.com".into(),
            ..Default::default()
        };
        let Ok(UpstreamTls::Originate(origination)) = converted(context) else {
            panic!("not an origination");
        };
        assert_eq!(origination.sni.as_deref(), Some("api.example.com"));
        assert_eq!(
            origination.trust,
            Some(PemSource::File("/certs/ca.pem".into()))
        );
        assert_eq!(
            origination.client_certificate,
            Some((
                PemSource::File("/certs/client.pem".into()),
                PemSource::File("/certs/key.pem".into())
            ))
        );
        assert_eq!(origination.subject_alt_names.len(), 1);
        assert!(origination.tls12 && origination.tls13);
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        let with_validation = |validation| tls_pb::UpstreamTlsContext {
            common_tls_context: Some(tls_pb::CommonTlsContext {
                validation_context_type: Some(validation),
                ..Default::default()
            }),
            ..Default::default()
        };
        let credential = with_validation(
            tls_pb::common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(
                sds("kubernetes://my-secret-cacert"),
            ),
        );
        let error = converted(credential).expect_err("refused");
        assert!(error.contains("credentialName"), "{error}");
        let unverified_names = with_validation(combined(
            vec![tls_pb::SubjectAltNameMatcher {
                san_type: tls_pb::subject_alt_name_matcher::SanType::Dns as i32,
                matcher: Some(Default::default()),
                oid: String::new(),
            }],
            "ROOTCA-not",
        ));
        assert!(converted(unverified_names).is_err());
        let no_validation = converted(tls_pb::UpstreamTlsContext {
            auto_sni_san_validation: true,
            ..Default::default()
        })
        .expect_err("refused");
        assert!(
            no_validation.contains("without a trusted CA"),
            "{no_validation}"
        );
        let spki = with_validation(
            tls_pb::common_tls_context::ValidationContextType::ValidationContext(
                tls_pb::CertificateValidationContext {
                    verify_certificate_spki: vec!["abc".into()],
                    ..Default::default()
                },
            ),
        );
        assert_eq!(
            converted(spki),
            Err("unsupported field transport_socket.typed_config.common_tls_context.validation_context.verify_certificate_spki".into())
        );
        // Chosen per endpoint: refused.
        let matched = cluster_pb::cluster::TransportSocketMatch {
            name: "tls".into(),
            r#match: None,
            transport_socket: Some(socket(tls_pb::UpstreamTlsContext::default())),
        };
        assert!(convert(None, &[matched], false, None).is_err());
    }
}
