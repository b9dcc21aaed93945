//! The accounting of a connection, from the moment it opens: Istio's TCP
//! metrics (opened at once, bytes as they flow, closed with how it ended),
//! the active-connection count the hand-over drain waits on, and at its
//! end a flow event for `weir trace` and a sampled access-log line.
use std::{
    borrow::Cow,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use prometheus_client::metrics::counter::Counter;

use super::{
    Telemetry,
    metrics::{Hashed, TcpLabels},
};
use crate::{proxy::PodHandle, security::identity::Identity, state::Store};

/// The target of the connection lines ([`super::access_log::TARGETS`]).
pub(crate) const LOG_TARGET: &str = module_path!();

/// How a proxied connection ended, for the connection log. The bytes are
/// the connection's [`ByteMeter`]'s, whichever way it ended.
pub enum Outcome {
    Closed,
    /// Refused by authorization (`response_flags="DENY"`, as ztunnel's).
    Denied(String),
    /// Anything else that ended it in an error (`"CONNECT"`).
    Failed(String),
}

/// One connection as the record describes it. `protocol`: `tcp`
/// (plaintext), `hbone` (mTLS tunnel), `handoff` (same-node, inside the
/// agent), or the HTTP version of an L7 connection.
pub struct ConnectionLog {
    pub direction: &'static str,
    pub protocol: &'static str,
    pub pod: Arc<PodHandle>,
    pub source: SocketAddr,
    pub original_destination: SocketAddr,
    pub started: Instant,
    /// The other end's identity, when it is a meshed workload.
    pub peer_identity: Option<Identity>,
    /// The other end's workload when the proxy chose it (a service's
    /// endpoint); otherwise it is looked up by address.
    pub peer_workload: Option<Arc<crate::state::Workload>>,
    /// What the other end said of itself (an HBONE client's `baggage`),
    /// for the labels when the mesh state does not know it.
    pub peer_baggage: Option<Box<super::baggage::Baggage>>,
}

/// The bytes of one connection, counted as they flow: into the record and
/// into Istio's byte counters at once, so a live connection's bytes show
/// and a connection that ends in an error keeps what it carried.
#[derive(Default)]
pub struct ByteMeter {
    /// From the client.
    sent: AtomicU64,
    /// To the client.
    received: AtomicU64,
    sent_metric: Counter,
    received_metric: Counter,
}

impl ByteMeter {
    pub fn add_sent(&self, bytes: u64) {
        if bytes > 0 {
            self.sent.fetch_add(bytes, Ordering::Relaxed);
            self.sent_metric.inc_by(bytes);
        }
    }

    pub fn add_received(&self, bytes: u64) {
        if bytes > 0 {
            self.received.fetch_add(bytes, Ordering::Relaxed);
            self.received_metric.inc_by(bytes);
        }
    }

    /// (sent, received) so far.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }
}

/// A connection counted as opened and not yet closed. Closing it (or
/// dropping it, when its task is cancelled) writes the record once.
pub struct OpenConnection {
    log: ConnectionLog,
    labels: Hashed<TcpLabels>,
    bytes: Arc<ByteMeter>,
    telemetry: Arc<Telemetry>,
    closed: bool,
    /// The network-facing socket whose kernel figures (`TCP_STATS`) the
    /// record takes at its end.
    kernel: KernelSource,
}

/// Where a record's kernel figures come from.
enum KernelSource {
    None,
    /// A socket of its own, by cookie: its figures are taken at the end.
    Own(u64),
    /// Its part of a socket it shares.
    Shared(super::kernel_tcp::LegShare),
}

impl OpenConnection {
    /// The meter the connection's bytes go to.
    pub fn bytes(&self) -> &Arc<ByteMeter> {
        &self.bytes
    }

    /// Follows `socket` (the connection's network leg: the upstream of an
    /// outbound connection, the client's of an inbound one) in the kernel:
    /// its round trips and retransmits join the record at its end.
    pub fn follow_socket(&mut self, socket: std::os::fd::BorrowedFd<'_>) {
        let cookie = self.telemetry.follow_socket(socket);
        self.set_kernel_socket(cookie);
    }

    /// The same, for a socket the caller started following
    /// ([`Telemetry::follow_socket`]).
    pub fn set_kernel_socket(&mut self, cookie: Option<u64>) {
        self.kernel = cookie.map_or(KernelSource::None, KernelSource::Own);
    }

    /// The connection rides a socket it shares (an HBONE tunnel): its
    /// part of that socket's figures joins the record.
    pub fn share_kernel_leg(&mut self, share: Option<super::kernel_tcp::LegShare>) {
        self.kernel = share.map_or(KernelSource::None, KernelSource::Shared);
    }

    /// Closes the record with `outcome`; the bytes carried, (sent,
    /// received).
    pub fn close(mut self, outcome: &Outcome) -> (u64, u64) {
        self.finish(outcome)
    }

    fn finish(&mut self, outcome: &Outcome) -> (u64, u64) {
        self.closed = true;
        let metrics = &self.telemetry.metrics;
        metrics.tcp_sockets_open.get_or_create(&self.labels).dec();
        let flags = match outcome {
            Outcome::Closed => "-",
            Outcome::Denied(_) => "DENY",
            Outcome::Failed(_) => "CONNECT",
        };
        // A clean close keeps the labels it opened with (flags `-`).
        let ended;
        let labels = if flags == self.labels.labels().response_flags {
            &self.labels
        } else {
            ended = Hashed::new(TcpLabels {
                response_flags: crate::telemetry::metrics::Label::Borrowed(flags),
                ..self.labels.labels().clone()
            });
            &ended
        };
        metrics.tcp_closed.get_or_create(labels).inc();
        if !matches!(outcome, Outcome::Closed) {
            metrics.tcp_failed.get_or_create(labels).inc();
        }
        let kernel = match std::mem::replace(&mut self.kernel, KernelSource::None) {
            KernelSource::None => None,
            KernelSource::Own(cookie) => self
                .telemetry
                .kernel_tcp
                .as_ref()
                .and_then(|table| table.take(cookie))
                .map(super::kernel_tcp::KernelTcp::from),
            KernelSource::Shared(share) => share.end(),
        };
        if let Some(kernel) = kernel {
            metrics
                .tcp_round_trip
                .get_or_create(labels)
                .observe(f64::from(kernel.srtt_us) / 1e6);
            metrics
                .tcp_retransmits
                .get_or_create(labels)
                .inc_by(u64::from(kernel.retransmits));
        }
        let totals = self.bytes.totals();
        self.log.write(&self.telemetry, outcome, totals, kernel);
        // Last: a drain that sees no connection left finds every record
        // written.
        metrics.active_connections.dec();
        totals
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if !self.closed {
            self.finish(&Outcome::Failed("cancelled".into()));
        }
    }
}

impl ConnectionLog {
    /// Counts the connection as opened (and active) now; its bytes and its
    /// end go to the returned record.
    pub fn open(mut self, telemetry: &Arc<Telemetry>, store: &Store) -> OpenConnection {
        let labels = Hashed::new(self.labels(store));
        // Needed for the labels only: not held for the connection's life.
        self.peer_workload = None;
        self.peer_baggage = None;
        let metrics = &telemetry.metrics;
        metrics.tcp_opened.get_or_create(&labels).inc();
        metrics.tcp_sockets_open.get_or_create(&labels).inc();
        metrics.active_connections.inc();
        // Fetched once: each chunk then costs an atomic add, not a lookup.
        let bytes = Arc::new(ByteMeter {
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            sent_metric: metrics.tcp_sent.get_or_create(&labels).clone(),
            received_metric: metrics.tcp_received.get_or_create(&labels).clone(),
        });
        OpenConnection {
            log: self,
            labels,
            bytes,
            telemetry: telemetry.clone(),
            closed: false,
            kernel: KernelSource::None,
        }
    }

    /// The other end: the original destination of an outbound connection,
    /// the client of an inbound one.
    fn peer(&self) -> SocketAddr {
        if self.direction == "inbound" {
            self.source
        } else {
            self.original_destination
        }
    }

    /// Istio's TCP metric labels for this connection, from the reporter's
    /// side; `response_flags` is `-` until it ends.
    fn labels(&self, store: &Store) -> TcpLabels {
        use crate::telemetry::metrics::{Peer, service_labels};
        let local = Peer::local(&self.pod, store);
        // The other end, when the mesh knows its address (an outbound
        // connection to a service VIP names the service instead).
        let peer = match self
            .peer_workload
            .clone()
            .or_else(|| store.workload(self.peer().ip()))
        {
            Some(workload) => Peer::of(&workload, self.peer_identity.as_ref()),
            None if let Some(baggage) = &self.peer_baggage => {
                baggage.peer(self.peer_identity.as_ref())
            }
            None => Peer {
                namespace: self
                    .peer_identity
                    .as_ref()
                    .map_or(crate::telemetry::metrics::UNKNOWN, |id| {
                        id.namespace().to_string().into()
                    }),
                principal: crate::telemetry::metrics::principal(self.peer_identity.as_ref()),
                ..Peer::unknown()
            },
        };
        // Istio's destination_service labels: the service the client dialled.
        let service = (self.direction == "outbound")
            .then(|| store.service(self.original_destination))
            .flatten();
        let service = service_labels(service.as_ref().map(|service| service.name.as_str()));
        let (reporter, source, destination) = if self.direction == "outbound" {
            ("source", local, peer)
        } else {
            ("destination", peer, local)
        };
        let policy = if self.peer_identity.is_some() {
            "mutual_tls"
        } else {
            "none"
        };
        TcpLabels::new(reporter, source, destination, service, "tcp", policy)
    }

    /// The end of the connection: a flow event and (when sampled) its
    /// access-log line, with the bytes it carried.
    fn write(
        &self,
        telemetry: &Telemetry,
        outcome: &Outcome,
        (sent, received): (u64, u64),
        kernel: Option<super::kernel_tcp::KernelTcp>,
    ) {
        let ConnectionLog {
            direction,
            protocol,
            ref pod,
            source,
            original_destination,
            started,
            ref peer_identity,
            peer_workload: _,
            peer_baggage: _,
        } = *self;
        let duration_ms = started.elapsed().as_millis() as u64;
        let peer = self.peer();
        let (verdict, reason) = match outcome {
            Outcome::Closed => ("allowed", Cow::Borrowed("")),
            // The denial itself was its own flow event, when authorized.
            Outcome::Denied(error) | Outcome::Failed(error) => {
                ("failed", Cow::Owned(error.clone()))
            }
        };
        telemetry.flows.proxy_event(
            direction,
            verdict,
            reason,
            pod,
            peer,
            original_destination.port(),
            peer_identity.as_ref(),
            Some((sent, received)),
            kernel,
        );
        if !telemetry.access_log.sample(&pod.id) {
            return;
        }
        let peer_identity = peer_identity
            .as_ref()
            .map(|id| id.to_string())
            .unwrap_or_default();
        match outcome {
            Outcome::Closed => tracing::info!(
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
                srtt_us = kernel.map(|k| k.srtt_us),
                min_rtt_us = kernel.map(|k| k.min_rtt_us),
                retransmits = kernel.map(|k| k.retransmits),
                tcp_leg_shared = kernel.map(|k| k.shared),
                end = "closed",
                "connection"
            ),
            Outcome::Denied(error) | Outcome::Failed(error) => tracing::warn!(
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
                srtt_us = kernel.map(|k| k.srtt_us),
                min_rtt_us = kernel.map(|k| k.min_rtt_us),
                retransmits = kernel.map(|k| k.retransmits),
                tcp_leg_shared = kernel.map(|k| k.shared),
                end = "error",
                %error,
                "connection"
            ),
        }
    }
}
