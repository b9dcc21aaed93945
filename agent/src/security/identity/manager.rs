//! The certificates of the node's workloads: fetched on first need
//! (concurrent requests for one identity share one CSR), cached, renewed at
//! half their lifetime in the background. A CA that is down is retried with
//! backoff; certificates already issued stay in use until they expire. An
//! identity no local pod uses any more is forgotten after a grace period
//! (`ca.keep_unused_seconds`): its certificate and its renewals stop.
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant, SystemTime},
};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject as _};
use tokio::sync::{Notify, watch};

use super::{CaError, CertificateAuthority, Identity, WorkloadCertificate, certificate_identity};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate for {identity}: {source}")]
    Ca { identity: Identity, source: CaError },
    #[error("certificate for {identity}: {message}")]
    Invalid { identity: Identity, message: String },
}

struct Entry {
    current: RwLock<Option<Arc<WorkloadCertificate>>>,
    /// One CSR in flight per identity.
    fetching: tokio::sync::Mutex<()>,
    renewing: std::sync::atomic::AtomicBool,
    /// The serial of the current certificate: connections made with an
    /// older one retire. Dropped with the entry, which tells them the
    /// identity was forgotten.
    serial: watch::Sender<String>,
    /// Since when no local pod uses the identity; `None` while one does
    /// (and for a new entry, until the next [`SecretManager::retain`]).
    unused_since: Mutex<Option<Instant>>,
    /// Wakes the renewal loop when `unused_since` changes.
    use_changed: Notify,
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            current: RwLock::default(),
            fetching: tokio::sync::Mutex::default(),
            renewing: Default::default(),
            serial: watch::Sender::new(String::new()),
            unused_since: Mutex::default(),
            use_changed: Notify::new(),
        }
    }
}

impl Entry {
    fn valid(&self) -> Option<Arc<WorkloadCertificate>> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current.as_ref().filter(|cert| !cert.is_expired()).cloned()
    }

    fn set(&self, cert: Arc<WorkloadCertificate>) {
        let serial = cert.serial.clone();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(cert);
        self.serial.send_replace(serial);
    }

    fn unused_since(&self) -> Option<Instant> {
        *self.unused_since.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct SecretManager {
    ca: CertificateAuthority,
    validity: Duration,
    /// How long an identity no local pod uses keeps its certificate.
    keep_unused: Duration,
    entries: Mutex<HashMap<Identity, Arc<Entry>>>,
    /// Total CSRs sent (for tests and metrics).
    pub requests: std::sync::atomic::AtomicU64,
    /// Latency and failures of CA requests, registered with the agent's
    /// metrics at their first scrape (`Metrics::attach_ca`).
    pub ca_metrics: crate::telemetry::metrics::CaMetrics,
}

/// How long a first fetch keeps retrying a CA that is down before the
/// connection that needs the certificate gives up.
const FIRST_FETCH_DEADLINE: Duration = Duration::from_secs(10);

impl SecretManager {
    pub fn new(
        ca: CertificateAuthority,
        validity: Duration,
        keep_unused: Duration,
    ) -> Arc<SecretManager> {
        Arc::new(SecretManager {
            ca,
            validity,
            keep_unused,
            entries: Mutex::new(HashMap::new()),
            requests: Default::default(),
            ca_metrics: Default::default(),
        })
    }

    /// The certificates currently held, for `/config_dump`.
    pub fn held(&self) -> Vec<Arc<WorkloadCertificate>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut held: Vec<Arc<WorkloadCertificate>> =
            entries.values().filter_map(|entry| entry.valid()).collect();
        held.sort_by(|a, b| a.identity.cmp(&b.identity));
        held
    }

    fn entry(&self, identity: &Identity) -> Arc<Entry> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.entry(identity.clone()).or_default().clone()
    }

    /// The serial of `identity`'s current certificate, changing with each
    /// renewal; closed once the identity is forgotten. `None` when none is
    /// held.
    pub fn watch(&self, identity: &Identity) -> Option<watch::Receiver<String>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.get(identity).map(|entry| entry.serial.subscribe())
    }

    /// The identities local pods use now: the others start their grace
    /// period (and are forgotten at its end), these end theirs.
    pub fn retain(&self, in_use: &HashSet<Identity>) {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        // An entry whose fetch failed has no renewal loop to forget it.
        entries.retain(|identity, entry| {
            in_use.contains(identity)
                || entry.renewing.load(std::sync::atomic::Ordering::SeqCst)
                || Arc::strong_count(entry) > 1
        });
        for (identity, entry) in entries.iter() {
            let mut since = entry.unused_since.lock().unwrap_or_else(|e| e.into_inner());
            let used = in_use.contains(identity);
            if used == since.is_none() {
                continue;
            }
            *since = (!used).then_some(now);
            if !used {
                tracing::info!(
                    %identity,
                    forget_in_seconds = self.keep_unused.as_secs(),
                    "no local pod uses this identity; its certificate will be forgotten"
                );
            }
            entry.use_changed.notify_one();
        }
    }

    /// Removes `entry` if it is still `identity`'s; whether it was.
    fn forget(&self, identity: &Identity, entry: &Arc<Entry>) -> bool {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let still_unused = entry.unused_since().is_some();
        if still_unused && entries.get(identity).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            entries.remove(identity);
            return true;
        }
        false
    }

    /// The current certificate for `identity`, fetching it if needed.
    pub async fn fetch(
        self: &Arc<Self>,
        identity: &Identity,
    ) -> Result<Arc<WorkloadCertificate>, IdentityError> {
        let entry = self.entry(identity);
        if let Some(cert) = entry.valid() {
            return Ok(cert);
        }
        let _guard = entry.fetching.lock().await;
        if let Some(cert) = entry.valid() {
            return Ok(cert);
        }
        let started = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(100);
        let cert = loop {
            match self.issue(identity).await {
                Ok(cert) => break cert,
                Err(IdentityError::Ca { source, .. })
                    if source.is_transient() && started.elapsed() < FIRST_FETCH_DEADLINE =>
                {
                    tracing::warn!(%identity, error = %source, retry_in_ms = backoff.as_millis() as u64, "CA request failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(error) => return Err(error),
            }
        };
        entry.set(cert.clone());
        if !entry
            .renewing
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            tokio::spawn(self.clone().renew(identity.clone(), entry.clone()));
        }
        Ok(cert)
    }

    /// Renews at half life; on failure retries with backoff and keeps the
    /// current certificate until it expires. Ends when the identity has
    /// gone unused for `keep_unused`: no CSR for it is sent after that.
    async fn renew(self: Arc<Self>, identity: Identity, entry: Arc<Entry>) {
        let mut backoff = Duration::from_millis(500);
        let mut retry_at: Option<Instant> = None;
        loop {
            let forget_at = entry.unused_since().map(|since| since + self.keep_unused);
            if forget_at.is_some_and(|at| at <= Instant::now()) && self.forget(&identity, &entry) {
                tracing::info!(%identity, "certificate forgotten: no local pod uses this identity");
                return;
            }
            let refresh_in = entry
                .valid()
                .map(|cert| cert.refresh_at())
                .unwrap_or_else(SystemTime::now)
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            let renew_at = retry_at.unwrap_or_else(|| Instant::now() + refresh_in);
            let wake_at = forget_at.map_or(renew_at, |at| at.min(renew_at));
            tokio::select! {
                () = tokio::time::sleep_until(wake_at.into()) => {}
                // Used again, or not any more: look again.
                () = entry.use_changed.notified() => continue,
            }
            if Instant::now() < renew_at {
                continue;
            }
            match self.issue(&identity).await {
                Ok(cert) => {
                    tracing::info!(%identity, serial = %cert.serial, not_after = ?cert.not_after, "certificate renewed");
                    entry.set(cert);
                    backoff = Duration::from_millis(500);
                    retry_at = None;
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "certificate renewal failed; the current one stays in use");
                    retry_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// One CSR round trip.
    async fn issue(&self, identity: &Identity) -> Result<Arc<WorkloadCertificate>, IdentityError> {
        let invalid = |message: String| IdentityError::Invalid {
            identity: identity.clone(),
            message,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| invalid(format!("key generation: {e}")))?;
        let mut params = CertificateParams::default();
        let uri = rcgen::string::Ia5String::try_from(identity.to_string())
            .map_err(|e| invalid(format!("SPIFFE id: {e}")))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .map_err(|e| invalid(format!("CSR: {e}")))?;
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = std::time::Instant::now();
        let result = match self.ca.sign(identity, &csr, self.validity).await {
            Ok(chain) => {
                parse_chain(identity, &chain, key.serialize_der()).map_err(CaError::BadResponse)
            }
            Err(error) => Err(error),
        };
        self.ca_metrics
            .observe(self.ca.kind(), started.elapsed(), result.as_ref().err());
        let cert = result.map_err(|source| IdentityError::Ca {
            identity: identity.clone(),
            source,
        })?;
        tracing::info!(
            %identity,
            serial = %cert.serial,
            latency_ms = started.elapsed().as_millis() as u64,
            "certificate issued"
        );
        Ok(Arc::new(cert))
    }
}

fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("PEM: {e}"))
}

/// Leaf first, root(s) in the last entry; the leaf must carry `identity`.
fn parse_chain(
    identity: &Identity,
    chain: &[String],
    key_der: Vec<u8>,
) -> Result<WorkloadCertificate, String> {
    let [first, middle @ .., last] = chain else {
        return Err(format!(
            "{} PEM entries; need a leaf and a root",
            chain.len()
        ));
    };
    let leaf_and_intermediates: Vec<CertificateDer<'static>> = std::iter::once(first)
        .chain(middle)
        .map(|pem| pem_certs(pem))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    let roots = pem_certs(last)?;
    let leaf = leaf_and_intermediates
        .first()
        .ok_or_else(|| "no leaf certificate".to_string())?;
    if roots.is_empty() {
        return Err("no root certificate".into());
    }
    let presented = certificate_identity(leaf);
    if presented.as_ref() != Some(identity) {
        return Err(format!(
            "leaf identity {} is not the requested {identity}",
            presented
                .map(|id| id.to_string())
                .unwrap_or_else(|| "(none)".into())
        ));
    }
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| format!("leaf: {e}"))?;
    let validity = parsed.validity();
    let to_system = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    Ok(WorkloadCertificate {
        identity: identity.clone(),
        chain: leaf_and_intermediates.clone(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
        roots,
        not_before: to_system(validity.not_before),
        not_after: to_system(validity.not_after),
        serial: parsed.raw_serial_as_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::identity::BuiltinCa;

    fn manager(validity: Duration) -> Arc<SecretManager> {
        let ca = BuiltinCa::generate("cluster.local").expect("ca");
        SecretManager::new(
            CertificateAuthority::Builtin(Box::new(ca)),
            validity,
            Duration::from_millis(200),
        )
    }

    #[tokio::test]
    async fn concurrent_fetches_share_one_csr() {
        let secrets = manager(Duration::from_secs(3600));
        let id = Identity::new("cluster.local", "shop", "web");
        let (a, b) = tokio::join!(secrets.fetch(&id), secrets.fetch(&id));
        let (a, b) = (a.expect("a"), b.expect("b"));
        assert_eq!(a.serial, b.serial);
        assert_eq!(
            secrets.requests.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        let metrics = crate::telemetry::metrics::Metrics::new();
        metrics.attach_ca(&secrets.ca_metrics);
        let text = metrics.encode();
        assert!(
            text.lines().any(|line| line
                == "weir_ca_request_duration_seconds_count{ca=\"builtin\",outcome=\"ok\"} 1"),
            "{text}"
        );
        assert_eq!(certificate_identity(&a.chain[0]), Some(id));
        assert_eq!(a.roots.len(), 1);
    }

    #[tokio::test]
    async fn certificates_renew_at_half_life() {
        let secrets = manager(Duration::from_secs(4));
        let id = Identity::new("cluster.local", "shop", "web");
        let first = secrets.fetch(&id).await.expect("first");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let renewed = loop {
            let current = secrets.fetch(&id).await.expect("current");
            if current.serial != first.serial {
                break current;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not renewed in time"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(renewed.not_after >= first.not_after);
    }

    #[tokio::test]
    async fn an_unused_identity_is_forgotten_after_its_grace_and_renews_no_more() {
        let secrets = manager(Duration::from_secs(2));
        let (web, db) = (
            Identity::new("cluster.local", "shop", "web"),
            Identity::new("cluster.local", "shop", "db"),
        );
        let first = secrets.fetch(&db).await.expect("db");
        secrets.fetch(&web).await.expect("web");
        let mut serials = secrets.watch(&db).expect("watching db");
        assert_eq!(*serials.borrow_and_update(), first.serial);
        // Used again within the grace period (200 ms here): kept.
        secrets.retain(&HashSet::from([web.clone()]));
        secrets.retain(&HashSet::from([web.clone(), db.clone()]));
        // A renewal reaches the watchers.
        serials.changed().await.expect("renewed");
        assert_ne!(*serials.borrow(), first.serial);
        // Unused for good: forgotten. The watch closes when the entry is
        // dropped, which its renewal loop's end does: no CSR after that.
        secrets.retain(&HashSet::from([web.clone()]));
        let forgotten = async { while serials.changed().await.is_ok() {} };
        tokio::time::timeout(Duration::from_secs(10), forgotten)
            .await
            .expect("db forgotten");
        let held: Vec<Identity> = secrets.held().iter().map(|c| c.identity.clone()).collect();
        assert_eq!(held, vec![web.clone()]);
        assert!(secrets.watch(&db).is_none());
        // A pod using it again gets a new certificate.
        let again = secrets.fetch(&db).await.expect("db again");
        assert_ne!(again.serial, first.serial);
    }

    #[test]
    fn a_chain_for_another_identity_is_rejected() {
        let ca = BuiltinCa::generate("cluster.local").expect("ca");
        let other = Identity::new("cluster.local", "shop", "other");
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            rcgen::string::Ia5String::try_from(other.to_string()).expect("uri"),
        )];
        let csr = params
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        let chain = ca
            .sign(&other, &csr, Duration::from_secs(60))
            .expect("signed");
        let wanted = Identity::new("cluster.local", "shop", "web");
        let error = parse_chain(&wanted, &chain, key.serialize_der()).unwrap_err();
        assert!(error.contains("is not the requested"), "{error}");
        // And the built-in CA refuses a CSR for an identity it was not asked for.
        assert!(ca.sign(&wanted, &csr, Duration::from_secs(60)).is_err());
    }
}
