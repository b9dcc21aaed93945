//! Workload identities (SPIFFE ids), their certificates, and the CAs that
//! sign them.
pub mod ca;
pub mod manager;

use std::{fmt, str::FromStr, sync::Arc, time::SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub use ca::{BuiltinCa, CaError, CertificateAuthority, IstioCaClient, IstioCaConfig};
pub use manager::{IdentityError, SecretManager};

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, kept as
/// its URI. Connections clone identities for their logs, metrics and flow
/// events, so a clone is a reference count rather than three strings (and
/// allocates nothing that could outlive the connection on a busy page).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    uri: Arc<str>,
    /// Where the namespace and the service account start in `uri`: a part
    /// may itself hold a `/` when it came from outside (xDS), so the parts
    /// are not found by splitting.
    namespace_at: u32,
    service_account_at: u32,
}

const SCHEME: &str = "spiffe://";

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Identity {
        let uri = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        let namespace_at = SCHEME.len() + trust_domain.len() + "/ns/".len();
        let service_account_at = namespace_at + namespace.len() + "/sa/".len();
        Identity {
            uri: uri.into(),
            namespace_at: namespace_at as u32,
            service_account_at: service_account_at as u32,
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..self.namespace_at as usize - "/ns/".len()]
    }

    pub fn namespace(&self) -> &str {
        &self.uri[self.namespace_at as usize..self.service_account_at as usize - "/sa/".len()]
    }

    pub fn service_account(&self) -> &str {
        &self.uri[self.service_account_at as usize..]
    }

    /// `<trust-domain>/ns/<namespace>/sa/<service-account>`: Istio's
    /// principal form, as authorization policies name sources.
    pub fn principal(&self) -> &str {
        &self.uri[SCHEME.len()..]
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.uri, f)
    }
}

impl FromStr for Identity {
    type Err = String;
    fn from_str(text: &str) -> Result<Identity, String> {
        let bad = || format!("{text:?} is not spiffe://<trust-domain>/ns/<ns>/sa/<sa>");
        let rest = text.strip_prefix(SCHEME).ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => {
                Ok(Identity::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }
}

/// A workload's certificate and key, as issued by the CA.
#[derive(Debug)]
pub struct WorkloadCertificate {
    pub identity: Identity,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The trust roots that came with it.
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Hex serial of the leaf, for logs.
    pub serial: String,
}

impl WorkloadCertificate {
    /// When to renew: half way through the certificate's life.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }

    pub fn is_expired(&self) -> bool {
        SystemTime::now() >= self.not_after
    }
}

/// URI SANs of a DER certificate.
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect()
}

/// The SPIFFE identity in a certificate's URI SAN, if there is exactly one.
pub fn certificate_identity(der: &[u8]) -> Option<Identity> {
    let sans = uri_sans(der);
    match sans.as_slice() {
        [one] => one.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip() {
        let id: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().expect("id");
        assert_eq!(id, Identity::new("cluster.local", "shop", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(
            (id.trust_domain(), id.namespace(), id.service_account()),
            ("cluster.local", "shop", "web")
        );
        assert_eq!(id.principal(), "cluster.local/ns/shop/sa/web");
        // Parts from outside keep their own bounds even when they hold a
        // separator, so they never read as another identity's parts.
        let odd = Identity::new("td", "a/sa/b", "c");
        assert_eq!((odd.namespace(), odd.service_account()), ("a/sa/b", "c"));
        assert_ne!(odd, Identity::new("td", "a", "b/sa/c"));
        assert!(
            "spiffe://cluster.local/ns/shop"
                .parse::<Identity>()
                .is_err()
        );
        assert!(
            "https://cluster.local/ns/a/sa/b"
                .parse::<Identity>()
                .is_err()
        );
    }
}
