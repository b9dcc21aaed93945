//! The accounting phase of a connection: one record, as Istio's TCP
//! metrics, a flow event for `weir trace`, and a sampled access-log line.
use std::{net::SocketAddr, time::Instant};

use super::Telemetry;
use crate::{proxy::PodHandle, security::identity::Identity, state::Store};

/// How a proxied connection ended, for the connection log.
pub enum Outcome {
    Closed { sent: u64, received: u64 },
    Failed(String),
}

/// One structured line per connection. `protocol`: `tcp` (plaintext),
/// `hbone` (mTLS tunnel) or `handoff` (same-node, inside the agent).
pub struct ConnectionLog<'a> {
    pub direction: &'static str,
    pub protocol: &'static str,
    pub pod: &'a PodHandle,
    pub source: SocketAddr,
    pub original_destination: SocketAddr,
    pub started: Instant,
    /// The other end's identity, when it is a meshed workload.
    pub peer_identity: Option<&'a Identity>,
}

impl ConnectionLog<'_> {
    /// The other end: the original destination of an outbound connection,
    /// the client of an inbound one.
    fn peer(&self) -> SocketAddr {
        if self.direction == "inbound" {
            self.source
        } else {
            self.original_destination
        }
    }

    /// Istio's TCP metrics for this connection, from the reporter's side.
    fn count(&self, telemetry: &Telemetry, store: &Store, outcome: &Outcome) {
        use crate::telemetry::metrics::{TcpLabels, principal};
        let unknown = || "unknown".to_string();
        let local_name = self
            .pod
            .id
            .split_once('/')
            .map(|(_, name)| name.to_string())
            .unwrap_or_else(unknown);
        let local = (
            local_name,
            self.pod.namespace.clone(),
            self.pod.identity.to_string(),
            crate::telemetry::metrics::app_and_version(
                self.pod
                    .primary_ip()
                    .and_then(|ip| store.workload(ip))
                    .as_deref(),
            ),
        );
        // The other end's workload name, when the mesh knows its address
        // (an outbound connection to a service VIP names the service).
        let peer_workload = store.workload(self.peer().ip());
        let peer = (
            peer_workload
                .as_ref()
                .map(|workload| workload.name.clone())
                .unwrap_or_else(unknown),
            self.peer_identity
                .map(|id| id.namespace.clone())
                .unwrap_or_else(unknown),
            principal(self.peer_identity),
            crate::telemetry::metrics::app_and_version(peer_workload.as_deref()),
        );
        // Istio's destination_service labels: the service the client dialled.
        let service = if self.direction == "outbound" {
            store
                .service(self.original_destination)
                .map(|service| service.name.clone())
        } else {
            None
        };
        let (service_host, service_name, service_namespace) =
            match service.as_deref().and_then(|key| key.split_once('/')) {
                Some((namespace, host)) => (
                    host.to_string(),
                    host.split('.').next().unwrap_or(host).to_string(),
                    namespace.to_string(),
                ),
                None => (unknown(), unknown(), unknown()),
            };
        let (reporter, source, destination) = if self.direction == "outbound" {
            ("source", local, peer)
        } else {
            ("destination", peer, local)
        };
        let labels = TcpLabels {
            reporter,
            source_workload: source.0,
            source_workload_namespace: source.1,
            source_principal: source.2,
            source_app: source.3.0,
            source_version: source.3.1,
            destination_workload: destination.0,
            destination_workload_namespace: destination.1,
            destination_principal: destination.2,
            destination_app: destination.3.0,
            destination_version: destination.3.1,
            destination_service: service_host,
            destination_service_name: service_name,
            destination_service_namespace: service_namespace,
            request_protocol: "tcp",
            response_flags: match outcome {
                Outcome::Closed { .. } => "-",
                Outcome::Failed(_) => "UF",
            }
            .to_string(),
            connection_security_policy: if self.peer_identity.is_some() {
                "mutual_tls"
            } else {
                "none"
            },
        };
        let metrics = &telemetry.metrics;
        metrics.tcp_opened.get_or_create(&labels).inc();
        metrics.tcp_closed.get_or_create(&labels).inc();
        if let Outcome::Closed { sent, received } = outcome {
            metrics.tcp_sent.get_or_create(&labels).inc_by(*sent);
            metrics
                .tcp_received
                .get_or_create(&labels)
                .inc_by(*received);
        }
    }

    /// Accounts for the connection: metrics, a flow event, and (when
    /// sampled) its access-log line.
    pub fn write(&self, telemetry: &Telemetry, store: &Store, outcome: &Outcome) {
        self.count(telemetry, store, outcome);
        let ConnectionLog {
            direction,
            protocol,
            pod,
            source,
            original_destination,
            started,
            peer_identity,
        } = *self;
        let duration_ms = started.elapsed().as_millis() as u64;
        let peer_identity = peer_identity.map(|id| id.to_string()).unwrap_or_default();
        let peer = self.peer();
        let (verdict, reason, bytes) = match outcome {
            Outcome::Closed { sent, received } => {
                ("allowed", String::new(), Some((*sent, *received)))
            }
            Outcome::Failed(error) => ("failed", error.clone(), None),
        };
        telemetry.flows.proxy_event(
            direction,
            verdict,
            reason,
            pod,
            peer,
            original_destination.port(),
            peer_identity.clone(),
            bytes,
        );
        if !telemetry.access_log.sample(&pod.id) {
            return;
        }
        match outcome {
            Outcome::Closed { sent, received } => tracing::info!(
                direction,
                protocol,
                pod = %pod.id,
                identity = %pod.identity,
                peer_identity = %peer_identity,
                src = %source,
                orig_dst = %original_destination,
                bytes_sent = sent,
                bytes_received = received,
                duration_ms,
                end = "closed",
                "connection"
            ),
            Outcome::Failed(error) => tracing::warn!(
                direction,
                protocol,
                pod = %pod.id,
                identity = %pod.identity,
                peer_identity = %peer_identity,
                src = %source,
                orig_dst = %original_destination,
                duration_ms,
                end = "error",
                %error,
                "connection"
            ),
        }
    }
}
