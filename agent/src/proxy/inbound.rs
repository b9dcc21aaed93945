//! Inbound: the one path by which a connection reaches a pod's application,
//! however it arrived (plaintext captured by TC, an HBONE stream, or the
//! same-node hand-off), in phases:
//!
//! 1. **admit**: the pod's policies decide (per request, when they look at
//!    HTTP), and the proxy connects to the application from the client's
//!    address (IP_TRANSPARENT; MARK_LOCAL routes the replies back), so the
//!    application sees the true source;
//! 2. **deliver**: the bytes (or the requests) are carried;
//! 3. **record**: one connection record, counted as opened when the
//!    connection arrives and closed with how it ended.
//!
//! An L4 connection stays registered with the policy watch
//! (`established.rs`) while it lives: a policy change that denies it closes
//! it.
//!
//! The plaintext listener is here too: TC assigned the SYN to it, so the
//! accepted socket's local address is the original destination.
use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use tokio::net::{TcpListener, TcpStream};
use weir_common::{INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, MARK_LOCAL, OUTBOUND_PORT};

use super::{
    ConnectionLog, OpenConnection, Outcome, PodHandle, ProxyContext, connect_from_pod,
    established::Registration, http, relay_io,
};
use crate::security::identity::Identity;

/// A connection arriving at a pod.
pub struct Arrival {
    pub pod: Arc<PodHandle>,
    /// The client's address, as the application must see it.
    pub client: SocketAddr,
    /// The pod's address and port the client asked for.
    pub target: SocketAddr,
    /// The client's identity, when it came through the mesh.
    pub source_identity: Option<Identity>,
    /// The address the connection to the application is made from.
    pub bind: SocketAddr,
    /// How it arrived, for the record: `tcp`, `hbone` or `handoff`.
    pub protocol: &'static str,
    pub started: Instant,
}

/// An admitted arrival, ready for its bytes.
pub enum Admitted {
    /// Authorized at L4 and connected to the application; watched for
    /// policy changes while the registration lives.
    Relay(TcpStream, Registration),
    /// The pod's policies look at HTTP: each request is authorized, and
    /// the application connected to when the first one is.
    Http(http::authorize::ConnectApp),
}

/// Why an arrival was not admitted.
pub enum Refused {
    /// A policy denied it (the denial is logged and counted already).
    Denied(String),
    /// The application could not be reached.
    Unreachable(String),
}

impl Refused {
    pub fn reason(&self) -> String {
        match self {
            Refused::Denied(policy) => format!("denied by policy {policy}"),
            Refused::Unreachable(reason) => reason.clone(),
        }
    }

    pub fn outcome(&self) -> Outcome {
        match self {
            Refused::Denied(_) => Outcome::Denied(self.reason()),
            Refused::Unreachable(_) => Outcome::Failed(self.reason()),
        }
    }
}

/// Phase one: authorize, and connect to the application.
pub async fn admit(context: &Arc<ProxyContext>, arrival: &Arrival) -> Result<Admitted, Refused> {
    context
        .stats
        .inbound_connections
        .fetch_add(1, Ordering::Relaxed);
    let pod = &arrival.pod;
    if context.needs_http_authorization(pod) {
        let connector = http::authorize::app_connector(
            context.clone(),
            pod.clone(),
            arrival.target,
            Some(arrival.bind),
        );
        return Ok(Admitted::Http(connector));
    }
    // Registered before it is authorized: a policy change from here on
    // is either seen by the check below or re-checks this connection.
    let registration = context.established.register(
        pod,
        arrival.client,
        arrival.target,
        arrival.source_identity.as_ref(),
    );
    context
        .authorize(
            pod,
            arrival.client,
            arrival.target,
            arrival.source_identity.as_ref(),
        )
        .map_err(Refused::Denied)?;
    // Boxed: a task keeps only the relay's state once this is done.
    match Box::pin(connect_from_pod(
        &context.home,
        pod,
        arrival.target,
        MARK_LOCAL,
        Some(arrival.bind),
    ))
    .await
    {
        Ok(upstream) => Ok(Admitted::Relay(upstream, registration)),
        Err(error) => {
            context.stats.failed();
            Err(Refused::Unreachable(format!(
                "deliver to {}: {error}",
                arrival.target
            )))
        }
    }
}

/// Phase two: carry the client's bytes (or requests) to the application,
/// counting them into `connection`'s record.
pub async fn deliver<S>(
    context: &Arc<ProxyContext>,
    arrival: &Arc<Arrival>,
    admitted: Admitted,
    client: S,
    connection: &OpenConnection,
) -> Outcome
where
    S: http::upstream::Io,
{
    match admitted {
        Admitted::Relay(upstream, mut registration) => {
            relay_io(
                context,
                connection.bytes(),
                Some(&mut registration),
                client,
                upstream,
            )
            .await
        }
        // Boxed: an L4 connection's task is not sized for an HTTP server.
        Admitted::Http(connector) => {
            Box::pin(http::authorize::serve(
                context.clone(),
                arrival.clone(),
                client,
                connector,
                connection.bytes().clone(),
            ))
            .await
        }
    }
}

/// Phase three begins as the connection arrives: its record, from the
/// pod's side, counted as opened now and closed with its outcome.
/// `baggage`: what an HBONE client said of itself, for the labels only.
pub fn open_record(
    context: &ProxyContext,
    arrival: &Arrival,
    baggage: Option<Box<crate::telemetry::baggage::Baggage>>,
) -> OpenConnection {
    context.open_connection(ConnectionLog {
        direction: "inbound",
        protocol: arrival.protocol,
        pod: arrival.pod.clone(),
        source: arrival.client,
        original_destination: arrival.target,
        started: arrival.started,
        peer_identity: arrival.source_identity.clone(),
        peer_workload: None,
        peer_baggage: baggage,
    })
}

/// All three phases, for arrivals whose client stream is already there
/// (plaintext and the hand-off).
/// `kernel_socket`: the client socket's cookie when the kernel's figures of
/// it are followed ([`crate::telemetry::Telemetry::follow_socket`]).
pub async fn handle<S>(
    context: &Arc<ProxyContext>,
    arrival: Arrival,
    client: S,
    kernel_socket: Option<u64>,
) -> Outcome
where
    S: http::upstream::Io,
{
    let arrival = Arc::new(arrival);
    let mut connection = open_record(context, &arrival, None);
    connection.set_kernel_socket(kernel_socket);
    let outcome = match admit(context, &arrival).await {
        Ok(admitted) => deliver(context, &arrival, admitted, client, &connection).await,
        Err(refused) => refused.outcome(),
    };
    context.close_connection(connection, &outcome);
    outcome
}

pub async fn serve(context: Arc<ProxyContext>, pod: Arc<PodHandle>, listener: TcpListener) {
    super::accept_loop(
        super::limits::Listener::Inbound,
        context,
        pod,
        listener,
        accept_plaintext,
    )
    .await
}

/// A plaintext connection captured by TC.
async fn accept_plaintext(
    context: Arc<ProxyContext>,
    pod: Arc<PodHandle>,
    client: TcpStream,
    peer: SocketAddr,
) {
    let started = Instant::now();
    let destination = match client.local_addr() {
        Ok(addr) => addr,
        Err(error) => {
            tracing::warn!(pod = %pod.id, src = %peer, %error, "inbound: no local address");
            return;
        }
    };
    let arrival = Arrival {
        pod: pod.clone(),
        client: peer,
        target: destination,
        source_identity: None,
        bind: peer,
        protocol: "tcp",
        started,
    };
    let refusal = if [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT]
        .contains(&destination.port())
    {
        // A connection addressed to the proxy itself would loop.
        context.stats.failed();
        Some("refused: destination is a proxy port")
    } else if pod.strict {
        // STRICT: only mTLS (HBONE) inbound.
        context
            .stats
            .strict_refusals
            .fetch_add(1, Ordering::Relaxed);
        Some("refused: plaintext to a STRICT workload")
    } else {
        None
    };
    match refusal {
        Some(reason) => {
            context
                .stats
                .inbound_connections
                .fetch_add(1, Ordering::Relaxed);
            let connection = open_record(&context, &arrival, None);
            context.close_connection(connection, &Outcome::Failed(reason.into()));
        }
        None => {
            let kernel_socket = context
                .telemetry
                .follow_socket(std::os::fd::AsFd::as_fd(&client));
            handle(&context, arrival, client, kernel_socket).await;
        }
    }
}
