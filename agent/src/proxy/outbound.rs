//! Outbound: connections captured by connect4/6 arrive at the pod-local
//! listener; the original destination comes from the map sock_ops filled in,
//! and the upstream connection is opened from inside the pod's namespace so
//! the destination sees the pod's own address.
use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use tokio::net::{TcpListener, TcpStream};
use weir_common::{AF_INET, AF_INET6, ClientKey, MARK_BYPASS, OrigDst};

use super::{ConnectionLog, Outcome, PodHandle, ProxyContext, connect_from_pod, relay_io};
use crate::state::{Waypoint, Workload};

pub async fn serve(context: Arc<ProxyContext>, pod: Arc<PodHandle>, listener: TcpListener) {
    super::accept_loop(
        super::limits::Listener::Outbound,
        context,
        pod,
        listener,
        handle,
    )
    .await
}

fn client_key(netns_cookie: u64, peer: SocketAddr) -> ClientKey {
    let mut key = ClientKey {
        netns_cookie,
        port: peer.port(),
        ..Default::default()
    };
    match peer.ip().to_canonical() {
        IpAddr::V4(ip) => {
            key.addr.family = AF_INET;
            key.addr.ip[0] = u32::from_ne_bytes(ip.octets());
        }
        IpAddr::V6(ip) => {
            key.addr.family = AF_INET6;
            let octets = ip.octets();
            let (chunks, _) = octets.as_chunks::<4>();
            for (word, chunk) in key.addr.ip.iter_mut().zip(chunks) {
                *word = u32::from_ne_bytes(*chunk);
            }
        }
    }
    key
}

pub fn original_destination(orig: &OrigDst) -> SocketAddr {
    let ip = if orig.addr.family == AF_INET6 {
        let mut octets = [0u8; 16];
        let (chunks, _) = octets.as_chunks_mut::<4>();
        for (chunk, word) in chunks.iter_mut().zip(orig.addr.ip) {
            *chunk = word.to_ne_bytes();
        }
        IpAddr::from(octets)
    } else {
        IpAddr::from(orig.addr.ip[0].to_ne_bytes())
    };
    SocketAddr::new(ip, orig.port)
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
        .outbound_connections
        .fetch_add(1, Ordering::Relaxed);
    let Some(orig) = context.origdst.take(&client_key(pod.netns_cookie, peer)) else {
        context.stats.failed();
        tracing::warn!(pod = %pod.id, src = %peer, "no original destination recorded; closing");
        return;
    };
    let original = original_destination(&orig);
    // DNS over TCP from a pod whose DNS is captured: the agent's to
    // answer, as its queries over UDP are.
    if pod.dns && original.port() == weir_common::DNS_PORT {
        crate::dns::serve_tcp(&context, &pod, client, original).await;
        return;
    }
    // What the client dialled, looked up once: a service VIP:port, or else
    // a workload's own address.
    let service = context.store.service(original);
    let addressed = match service {
        Some(_) => None,
        None => context.store.workload(original.ip()),
    };
    // A destination bound to a waypoint is reached through it, where its
    // L7 policies are enforced, as ztunnel sends it. A service's traffic
    // follows the service's waypoint only; a workload's own address, the
    // workload's.
    let waypoint = match &service {
        Some(service) => service.waypoint.as_ref(),
        None => addressed
            .as_ref()
            .and_then(|workload| workload.waypoint.as_ref()),
    };
    if let Some(waypoint) = waypoint {
        let waypoint = waypoint.clone();
        Box::pin(through_waypoint(
            context, pod, client, peer, original, &waypoint, started,
        ))
        .await;
        return;
    }
    // A service port with a route configuration, or declared HTTP, gets L7
    // routing when the client speaks HTTP.
    if let Some(service) = &service
        && let Some(routes) = route_config(&context, service, original.port())
    {
        use super::http::detect::{Protocol, detect};
        use crate::state::AppProtocol;
        let protocol = match service.app_protocol {
            // Declared: no sniffing (and no wait for server-first clients).
            Some(AppProtocol::Http2 | AppProtocol::Grpc) => Protocol::Http2,
            // HTTP/1.1 or h2c: wait for the request as long as a client
            // may take to send its headers.
            Some(AppProtocol::Http) => {
                match detect(&client, context.limits.settings().request_headers_timeout).await {
                    Protocol::Opaque => Protocol::Http1,
                    protocol => protocol,
                }
            }
            Some(AppProtocol::Tcp) => Protocol::Opaque,
            None => detect(&client, super::http::DETECTION_TIMEOUT).await,
        };
        if protocol != Protocol::Opaque {
            let downstream = Arc::new(super::http::Downstream {
                pod: pod.clone(),
                // The pod's own address (the capture leg is loopback), with
                // its port, as its upstream connections are sourced.
                peer: SocketAddr::new(pod.ip_like(original.ip()), peer.port()),
                original,
                service: service.clone(),
                routes,
                protocol,
            });
            let connection = context.open_connection(ConnectionLog {
                direction: "outbound",
                protocol: protocol.name(),
                pod: pod.clone(),
                source: peer,
                original_destination: original,
                started,
                peer_identity: None,
                peer_workload: None,
                peer_baggage: None,
            });
            let bytes = connection.bytes().clone();
            // Boxed, as every phase below that ends before the relay: the
            // task of a long-lived L4 connection keeps only the relay's
            // state, not the largest phase it could have gone through.
            let outcome = Box::pin(super::http::serve_connection(
                context.clone(),
                downstream,
                client,
                bytes,
            ))
            .await;
            context.close_connection(connection, &outcome);
            return;
        }
    }
    // A service VIP:port goes to one of its endpoints (its target port, its
    // identity expected); a pod address to that pod. A workload outside the
    // mesh (`tunnel_protocol: NONE`) is reached as it is, as ztunnel does.
    // A service in `PASSTHROUGH` mode is dialled as it is.
    let (destination, target) = match service.filter(|service| !service.passthrough()) {
        Some(service) => match service.pick(&context.placement) {
            Some(endpoint) if endpoint.workload.ips.is_empty() => {
                let workload = endpoint.workload.clone();
                let port = endpoint.target_port;
                match Box::pin(resolve(&workload.hostname, port, original.ip())).await {
                    Ok(address) => (address, Some(workload)),
                    Err(error) => {
                        context.stats.failed();
                        tracing::warn!(pod = %pod.id, service = %service.name, orig_dst = %original, %error, "cannot resolve the endpoint's hostname; closing");
                        return;
                    }
                }
            }
            Some(endpoint) => (
                SocketAddr::new(endpoint.address_for(original.ip()), endpoint.target_port),
                Some(endpoint.workload.clone()),
            ),
            None => {
                context.stats.failed();
                tracing::warn!(pod = %pod.id, service = %service.name, orig_dst = %original, "no healthy endpoint the service's load balancing allows; closing");
                return;
            }
        },
        None => (original, addressed),
    };
    let meshed = target.clone().filter(|workload| workload.meshed());
    // A meshed destination is reached through HBONE (or, on this node, by
    // hand-off); anything else as is.
    let handoff_to = (context.same_node == crate::config::SameNode::Handoff)
        .then(|| context.local_pod(destination.ip()))
        .flatten();
    let protocol = match &meshed {
        Some(_) if handoff_to.is_some() => "handoff",
        Some(_) => "hbone",
        None => "tcp",
    };
    // Counted as opened now, before the upstream connect: a connection
    // that fails to connect is one that opened and failed.
    let mut connection = context.open_connection(ConnectionLog {
        direction: "outbound",
        protocol,
        pod: pod.clone(),
        source: peer,
        original_destination: original,
        started,
        peer_identity: meshed.as_ref().map(|workload| workload.identity.clone()),
        // The endpoint, not the VIP: what the labels describe, as ztunnel's.
        peer_workload: target,
        peer_baggage: None,
    });
    let outcome = match meshed {
        Some(_) if let Some(target_pod) = handoff_to => {
            // Both ends are this agent's: delivered inside the destination
            // pod from the source pod's address, no TLS needed, by the one
            // inbound path, whose record names the client's identity as its
            // HBONE listener's would.
            let source_ip = pod.ip_like(destination.ip());
            let arrival = super::inbound::Arrival {
                pod: target_pod.clone(),
                client: SocketAddr::new(source_ip, peer.port()),
                target: destination,
                source_identity: Some(pod.identity.clone()),
                bind: SocketAddr::new(source_ip, 0),
                protocol: "handoff",
                started,
            };
            let client = super::metered::Metered::new(client, connection.bytes().clone());
            Box::pin(super::inbound::handle(&context, arrival, client, None)).await
        }
        Some(workload) => {
            let client_addr = SocketAddr::new(pod.ip_like(destination.ip()), peer.port());
            let to = super::pool::TunnelTarget::workload(&workload.identity, destination);
            relay_through_hbone(
                &context,
                &pod,
                client,
                client_addr,
                to,
                &mut connection,
                destination,
            )
            .await
        }
        None => match Box::pin(connect_from_pod(
            &context.home,
            &pod,
            destination,
            MARK_BYPASS,
            None,
        ))
        .await
        {
            Ok(upstream) => {
                // The leg on the network: the kernel's view of it joins the
                // record.
                connection.follow_socket(std::os::fd::AsFd::as_fd(&upstream));
                relay_io(&context, connection.bytes(), None, client, upstream).await
            }
            Err(error) => {
                context.stats.failed();
                Outcome::Failed(format!("connect {destination}: {error}"))
            }
        },
    };
    context.close_connection(connection, &outcome);
}

/// The route configuration bound to a service port: its own, or for a port
/// declared HTTP, one route to the service itself (per-request balancing).
/// A port declared TCP has none.
fn route_config(
    context: &ProxyContext,
    service: &crate::state::ServiceEntry,
    port: u16,
) -> Option<Arc<crate::routing::RouteConfig>> {
    if service.app_protocol == Some(crate::state::AppProtocol::Tcp) {
        return None;
    }
    let hostname = service
        .name
        .split_once('/')
        .map_or(service.name.as_str(), |(_, hostname)| hostname);
    context
        .routes
        .snapshot()
        .for_service(hostname, port)
        .or_else(|| {
            service
                .app_protocol
                .is_some_and(crate::state::AppProtocol::is_http)
                .then(|| Arc::new(crate::routing::RouteConfig::to_service(hostname, port)))
        })
}

/// An HBONE tunnel to the waypoint whose `CONNECT` names what the client
/// dialled: the waypoint applies its policies and picks the endpoint. A
/// waypoint Weir cannot find or verify fails the connection; it is never
/// bypassed.
async fn through_waypoint(
    context: Arc<ProxyContext>,
    pod: Arc<PodHandle>,
    client: TcpStream,
    peer: SocketAddr,
    original: SocketAddr,
    waypoint: &Waypoint,
    started: Instant,
) {
    let resolved = resolve_waypoint(&context, waypoint, original.ip());
    let mut connection = context.open_connection(ConnectionLog {
        direction: "outbound",
        protocol: "hbone",
        pod: pod.clone(),
        source: peer,
        original_destination: original,
        started,
        peer_identity: resolved
            .as_ref()
            .ok()
            .map(|(_, workload)| workload.identity.clone()),
        peer_workload: None,
        peer_baggage: None,
    });
    let outcome = match resolved {
        Err(reason) => {
            context.stats.failed();
            Outcome::Failed(reason)
        }
        Ok((server, workload)) => {
            let client_addr = SocketAddr::new(pod.ip_like(original.ip()), peer.port());
            let to = super::pool::TunnelTarget {
                identity: &workload.identity,
                server,
                authority: original,
            };
            let what = format!("waypoint {waypoint} at {server}");
            relay_through_hbone(
                &context,
                &pod,
                client,
                client_addr,
                to,
                &mut connection,
                what,
            )
            .await
        }
    };
    context.close_connection(connection, &outcome);
}

/// Opens the tunnel `to` for `pod`'s client at `client_addr` and relays the
/// client's bytes through it; `what` names the far end when that fails.
async fn relay_through_hbone(
    context: &Arc<ProxyContext>,
    pod: &PodHandle,
    client: TcpStream,
    client_addr: SocketAddr,
    to: super::pool::TunnelTarget<'_>,
    connection: &mut crate::telemetry::connection::OpenConnection,
    what: impl std::fmt::Display,
) -> Outcome {
    let tunnel = Box::pin(
        context
            .hbone
            .connect(context, pod, &pod.identity, to, client_addr),
    )
    .await;
    match tunnel {
        Ok(tunnel) => {
            connection.share_kernel_leg(tunnel.kernel_share());
            relay_io(context, connection.bytes(), None, client, tunnel).await
        }
        Err(error) => {
            context.stats.failed();
            Outcome::Failed(format!("HBONE to {what}: {error}"))
        }
    }
}

/// The waypoint's HBONE address (in the family of `family_of` when it has
/// one) and its workload, whose identity it must present.
fn resolve_waypoint(
    context: &ProxyContext,
    waypoint: &Waypoint,
    family_of: IpAddr,
) -> Result<(SocketAddr, Arc<Workload>), String> {
    match waypoint {
        Waypoint::Service {
            namespace,
            hostname,
            port,
        } => {
            let entry = context
                .store
                .service_by_hostname(hostname, *port)
                .filter(|entry| {
                    entry.name.split_once('/') == Some((namespace.as_str(), hostname.as_str()))
                })
                .ok_or_else(|| format!("waypoint {waypoint}: no such service and port"))?;
            let endpoint = entry
                .pick(&context.placement)
                .ok_or_else(|| format!("waypoint {waypoint}: no ready endpoint"))?;
            Ok((
                SocketAddr::new(endpoint.address_for(family_of), endpoint.target_port),
                endpoint.workload.clone(),
            ))
        }
        Waypoint::Address(address) => {
            let workload = context.store.workload(address.ip()).ok_or_else(|| {
                format!("waypoint {address} is no workload Weir knows, so its identity cannot be checked")
            })?;
            Ok((*address, workload))
        }
    }
}

/// How long resolving a hostname-only endpoint may take.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A hostname-only endpoint (istiod's workload with a `hostname` and no
/// addresses, as a DNS ServiceEntry's): resolved when dialled, as ztunnel
/// resolves it, an address of the family the client dialled first. The
/// resolver runs on the blocking pool (tokio's `lookup_host`).
async fn resolve(hostname: &str, port: u16, family_of: IpAddr) -> Result<SocketAddr, String> {
    let found = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((hostname, port)))
        .await
        .map_err(|_| format!("resolving {hostname}: no answer in {RESOLVE_TIMEOUT:?}"))?
        .map_err(|error| format!("resolving {hostname}: {error}"))?;
    let addresses: Vec<SocketAddr> = found.collect();
    addresses
        .iter()
        .find(|address| address.is_ipv4() == family_of.is_ipv4())
        .or(addresses.first())
        .copied()
        .ok_or_else(|| format!("{hostname} resolved to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_key_uses_network_order_words() {
        let key = client_key(7, "127.0.0.1:4242".parse().expect("addr"));
        assert_eq!(key.addr.ip[0].to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(key.port, 4242);
        assert_eq!(key.netns_cookie, 7);
    }

    #[test]
    fn original_destination_round_trips() {
        let orig = OrigDst {
            addr: weir_common::IpAddr {
                ip: [u32::from_ne_bytes([10, 0, 1, 3]), 0, 0, 0],
                family: AF_INET,
                _pad: 0,
            },
            port: 8080,
            ..Default::default()
        };
        assert_eq!(
            original_destination(&orig),
            "10.0.1.3:8080".parse::<SocketAddr>().expect("addr")
        );
    }
}
