//! Inbound (plaintext): TC assigned the SYN to the transparent listener, so the
//! accepted socket's local address is the original destination. The proxy
//! delivers to the application from a socket bound to the client's address
//! (IP_TRANSPARENT, MARK_LOCAL routes the replies back to it), so the
//! application sees the true source.
use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use tokio::net::{TcpListener, TcpStream};
use weir_common::{INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, MARK_LOCAL, OUTBOUND_PORT};

use super::{ConnectionLog, Outcome, PodHandle, ProxyContext, connect_from_pod, relay};

pub async fn serve(context: Arc<ProxyContext>, pod: Arc<PodHandle>, listener: TcpListener) {
    super::accept_loop("inbound", context, pod, listener, handle).await
}

async fn handle(
    context: Arc<ProxyContext>,
    pod: Arc<PodHandle>,
    client: TcpStream,
    peer: SocketAddr,
) {
    let started = Instant::now();
    context
        .stats
        .inbound_connections
        .fetch_add(1, Ordering::Relaxed);
    let destination = match client.local_addr() {
        Ok(addr) => addr,
        Err(error) => {
            tracing::warn!(pod = %pod.id, src = %peer, %error, "inbound: no local address");
            return;
        }
    };
    let outcome = if [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT]
        .contains(&destination.port())
    {
        // A connection addressed to the proxy itself would loop.
        context.stats.failed();
        Outcome::Failed("refused: destination is a proxy port".into())
    } else if pod.strict {
        // STRICT: only mTLS (HBONE) inbound.
        context
            .stats
            .strict_refusals
            .fetch_add(1, Ordering::Relaxed);
        Outcome::Failed("refused: plaintext to a STRICT workload".into())
    } else if context.needs_http_authorization(&pod) {
        let arrival = Arc::new(super::http::inbound::Arrival {
            pod: pod.clone(),
            client: peer,
            target: destination,
            source_identity: None,
        });
        let connector = super::http::inbound::app_connector(
            context.clone(),
            pod.clone(),
            destination,
            Some(peer),
        );
        super::http::inbound::serve(context.clone(), arrival, client, connector).await
    } else if let Err(policy) = context.authorize(&pod, peer, destination, None) {
        Outcome::Failed(format!("denied by policy {policy}"))
    } else {
        match connect_from_pod(&context, &pod, destination, MARK_LOCAL, Some(peer)).await {
            Ok(upstream) => relay(&context, client, upstream).await,
            Err(error) => {
                context.stats.failed();
                Outcome::Failed(format!("deliver to {destination}: {error}"))
            }
        }
    };
    ConnectionLog {
        direction: "inbound",
        protocol: "tcp",
        pod: &pod,
        source: peer,
        original_destination: destination,
        started,
        peer_identity: None,
    }
    .write(&context, &outcome);
}
