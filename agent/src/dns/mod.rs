//! DNS for pods with DNS capture, as ztunnel's DNS proxy serves ambient
//! pods: the capture programs send a pod's queries to port 53 (UDP, and
//! TCP through the outbound listener) to the agent, which answers the
//! names of the services it knows from its store (A and AAAA, TTL 30 s)
//! and forwards everything else, unchanged, to the resolver the
//! application asked, from the pod's own address.
//!
//! - `names`: which names are answered, and with what;
//! - `origin`: which resolver a UDP query was meant for;
//! - `forward`: the resolver's answer, over UDP or TCP;
//! - `metrics`: ztunnel's DNS metrics.
pub mod forward;
pub mod metrics;
pub mod names;
pub mod origin;

use std::{
    borrow::Cow,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, ResponseCode},
    rr::{
        DNSClass, Name, RData, Record, RecordType,
        rdata::{A, AAAA, CNAME},
    },
};
use tokio::net::{TcpStream, UdpSocket};

use crate::{
    proxy::{PodHandle, ProxyContext},
    state::Store,
    telemetry::{flows::Flow, metrics::Peer},
};

/// Queries of one pod's listener in flight at once; more are dropped
/// unread (counted in `weir_dns_dropped_total`), and the client retries.
const MAX_IN_FLIGHT: usize = 256;

/// How long a TCP client may take to send its next query (ztunnel's 5 s).
const TCP_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest UDP datagram: a query read into less would be cut.
const MAX_DATAGRAM: usize = 65_535;

/// The node's own answer to `request`, or `None` when it goes to the
/// resolver: only A and AAAA queries for names [`names::find`] knows are
/// answered here (authoritative, as ztunnel's are); a known name without
/// an address of the asked family gets an empty answer, not NXDOMAIN.
pub fn local_reply(store: &Store, namespace: &str, request: &Message) -> Option<Message> {
    let id = request.metadata.id;
    if request.metadata.message_type != MessageType::Query {
        return Some(Message::error_msg(
            id,
            request.metadata.op_code,
            ResponseCode::FormErr,
        ));
    }
    if request.metadata.op_code != OpCode::Query {
        return Some(Message::error_msg(
            id,
            request.metadata.op_code,
            ResponseCode::NotImp,
        ));
    }
    let [query] = request.queries.as_slice() else {
        return None;
    };
    if query.query_class != DNSClass::IN
        || !matches!(query.query_type, RecordType::A | RecordType::AAAA)
    {
        return None;
    }
    let asked = query.name.to_ascii().to_ascii_lowercase();
    let asked = asked.strip_suffix('.').unwrap_or(&asked);
    let known = names::find(store, namespace, names::CLUSTER_DOMAIN, asked)?;
    let mut reply = Message::response(id, OpCode::Query);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.queries = request.queries.clone();
    let owner = match &known.canonical {
        Some(canonical) => {
            let target = Name::from_ascii(format!("{canonical}.")).ok()?;
            reply.add_answer(Record::from_rdata(
                query.name.clone(),
                names::TTL_SECONDS,
                RData::CNAME(CNAME(target.clone())),
            ));
            target
        }
        None => query.name.clone(),
    };
    for address in known.addresses {
        let rdata = match (query.query_type, address.to_canonical()) {
            (RecordType::A, IpAddr::V4(ip)) => RData::A(A(ip)),
            (RecordType::AAAA, IpAddr::V6(ip)) => RData::AAAA(AAAA(ip)),
            _ => continue,
        };
        reply.add_answer(Record::from_rdata(owner.clone(), names::TTL_SECONDS, rdata));
    }
    if let Some(edns) = &request.edns {
        let mut answer_edns = Edns::new();
        answer_edns.set_max_payload(edns.max_payload().max(512));
        reply.set_edns(answer_edns);
    }
    Some(reply)
}

/// How a query reached the agent, and so where it would be forwarded.
enum Transport<'a> {
    /// A datagram to the pod's DNS listener at `listener` from `client`.
    Udp {
        listener: SocketAddr,
        client: SocketAddr,
    },
    /// A captured TCP connection to `resolver`, and the agent's own
    /// connection to it once a query needed it.
    Tcp {
        resolver: SocketAddr,
        upstream: &'a mut Option<forward::TcpUpstream>,
    },
}

impl Transport<'_> {
    fn protocol(&self) -> &'static str {
        match self {
            Transport::Udp { .. } => "udp",
            Transport::Tcp { .. } => "tcp",
        }
    }
}

/// The reply to one query (its bytes), or `None` when there is nothing to
/// say (a datagram too short to carry a query id).
async fn answer(
    context: &ProxyContext,
    pod: &PodHandle,
    transport: &mut Transport<'_>,
    query: &[u8],
) -> Option<Vec<u8>> {
    let started = Instant::now();
    let request = match Message::from_vec(query) {
        Ok(request) => request,
        Err(error) => {
            tracing::debug!(pod = %pod.id, %error, "unreadable DNS query");
            // The id and opcode are the first three bytes.
            let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
            let reply = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
            return reply.to_vec().ok();
        }
    };
    let question = request.queries.first();
    let source = Peer::local(pod, &context.store);
    let labels = metrics::DnsLabels {
        request_query_type: question.map_or("other", |query| metrics::query_type(query.query_type)),
        request_protocol: transport.protocol(),
        source_canonical_service: source.canonical_service,
        source_canonical_revision: source.canonical_revision,
    };
    let dns = &context.telemetry.metrics.dns;
    dns.requests.get_or_create(&labels).inc();
    let asked = question.map_or_else(String::new, |query| {
        format!("{} {}", query.query_type, query.name.to_ascii())
    });
    let resolver = match transport {
        Transport::Udp { listener, client } => {
            let (listener, client) = (*listener, *client);
            let cookie = pod
                .netns
                .run(&context.home, || origin::client_cookie(listener, client))
                .map_err(std::io::Error::other)
                .flatten();
            match cookie {
                Ok(cookie) => context
                    .origdst
                    .of_socket(cookie)
                    .filter(|orig| orig.port == weir_common::DNS_PORT)
                    .map(|orig| crate::proxy::outbound::original_destination(&orig)),
                Err(error) => {
                    tracing::debug!(pod = %pod.id, %client, %error, "which socket sent a DNS query");
                    None
                }
            }
        }
        Transport::Tcp { resolver, .. } => Some(*resolver),
    };
    // Over UDP the client takes at most its EDNS size (512 without).
    let limit = match transport {
        Transport::Udp { .. } => usize::from(request.max_payload()),
        Transport::Tcp { .. } => usize::from(u16::MAX),
    };
    let flow = |verdict: &'static str, reason: String| Flow {
        time: SystemTime::now(),
        source: "dns",
        direction: "outbound",
        verdict,
        reason: Cow::Owned(reason),
        pod: Some(pod.id.clone()),
        identity: Some(pod.identity.clone()),
        peer: resolver.unwrap_or_else(|| SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 53)),
        peer_identity: None,
        port: weir_common::DNS_PORT,
        bytes: None,
        kernel: None,
    };

    if let Some(reply) = local_reply(&context.store, &pod.namespace, &request) {
        dns.answered.get_or_create(&labels).inc();
        let records = reply.answers.len();
        context
            .telemetry
            .flows
            .publish(flow("answered", format!("{asked} ({records} records)")));
        return encode(&reply, limit);
    }

    let Some(resolver) = resolver else {
        // Sent to the listener directly, or by a socket already gone:
        // nowhere to forward.
        dns.upstream_failures.get_or_create(&labels).inc();
        context.telemetry.flows.publish(flow(
            "failed",
            format!("{asked}: no resolver known for the query"),
        ));
        return encode(&servfail(&request), limit);
    };
    dns.upstream_requests.get_or_create(&labels).inc();
    let forwarded = match transport {
        Transport::Udp { .. } => forward::udp(context, pod, resolver, query, limit).await,
        Transport::Tcp { upstream, .. } => {
            let exchanged = async {
                if upstream.is_none() {
                    **upstream = Some(forward::TcpUpstream::connect(context, pod, resolver).await?);
                }
                match upstream.as_mut() {
                    Some(upstream) => upstream.exchange(query).await,
                    None => Err(std::io::Error::from(std::io::ErrorKind::NotConnected)),
                }
            }
            .await;
            if exchanged.is_err() {
                // A broken connection is not reused.
                **upstream = None;
            }
            exchanged
        }
    };
    dns.upstream_duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    match forwarded {
        Ok(reply) => {
            context.telemetry.flows.publish(flow("forwarded", asked));
            Some(reply)
        }
        Err(error) => {
            dns.upstream_failures.get_or_create(&labels).inc();
            tracing::debug!(pod = %pod.id, %resolver, %error, "forwarding a DNS query");
            context
                .telemetry
                .flows
                .publish(flow("failed", format!("{asked}: {error}")));
            encode(&servfail(&request), limit)
        }
    }
}

fn servfail(request: &Message) -> Message {
    let mut reply = Message::error_msg(
        request.metadata.id,
        request.metadata.op_code,
        ResponseCode::ServFail,
    );
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.queries = request.queries.clone();
    reply
}

/// The reply's bytes, cut to the question with TC set when it is longer
/// than the client takes (it then asks again over TCP).
fn encode(reply: &Message, limit: usize) -> Option<Vec<u8>> {
    let bytes = reply.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    reply.truncate().to_vec().ok()
}

/// Serves one of a pod's DNS listeners (UDP, inside its namespace).
pub async fn serve_udp(context: Arc<ProxyContext>, pod: Arc<PodHandle>, socket: UdpSocket) {
    let socket = Arc::new(socket);
    let listener = match socket.local_addr() {
        Ok(listener) => listener,
        Err(error) => {
            tracing::warn!(pod = %pod.id, %error, "DNS listener without an address");
            return;
        }
    };
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    loop {
        let (size, client) = match socket.recv_from(&mut buffer).await {
            Ok(received) => received,
            Err(error) => {
                // UDP receive errors are per datagram (a truncated one,
                // a queued ICMP error); the listener goes on.
                tracing::debug!(pod = %pod.id, %error, "DNS listener receive");
                continue;
            }
        };
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            context.telemetry.metrics.dns.dropped.inc();
            continue;
        };
        let query = buffer[..size].to_vec();
        let (context, pod, socket) = (context.clone(), pod.clone(), socket.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut transport = Transport::Udp { listener, client };
            if let Some(reply) = answer(&context, &pod, &mut transport, &query).await
                && let Err(error) = socket.send_to(&reply, client).await
            {
                tracing::debug!(pod = %pod.id, %client, %error, "sending a DNS reply");
            }
        });
    }
}

/// Serves a captured TCP connection to a resolver's port 53: each query
/// answered or forwarded in turn, until the client closes or is idle for
/// [`TCP_REQUEST_TIMEOUT`].
pub async fn serve_tcp(
    context: &ProxyContext,
    pod: &PodHandle,
    mut client: TcpStream,
    resolver: SocketAddr,
) {
    let mut upstream = None;
    loop {
        let query =
            match tokio::time::timeout(TCP_REQUEST_TIMEOUT, forward::read_message(&mut client))
                .await
            {
                Ok(Ok(Some(query))) => query,
                Ok(Ok(None)) => break,
                Ok(Err(error)) => {
                    tracing::debug!(pod = %pod.id, %error, "reading a DNS query over TCP");
                    break;
                }
                Err(_) => break,
            };
        let mut transport = Transport::Tcp {
            resolver,
            upstream: &mut upstream,
        };
        let Some(reply) = answer(context, pod, &mut transport, &query).await else {
            break;
        };
        if forward::write_message(&mut client, &reply).await.is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Service, Source};
    use hickory_proto::op::Query;

    fn store() -> Store {
        let store = Store::default();
        store.update(|update| {
            update.upsert_service(Service {
                source: Source::ControlPlane,
                namespace: "test".into(),
                hostname: "web.test.svc.cluster.local".into(),
                vips: vec![
                    "10.96.0.10".parse().unwrap(),
                    "fd00:96::10".parse().unwrap(),
                ],
                ports: vec![(80, 8080)],
                app_protocols: Vec::new(),
                waypoint: None,
                load_balancing: Default::default(),
            });
        });
        store
    }

    fn request(name: &str, query_type: RecordType) -> Message {
        let mut request = Message::query();
        request.metadata.id = 4242;
        request.metadata.recursion_desired = true;
        request.add_query(Query::query(Name::from_ascii(name).unwrap(), query_type));
        request
    }

    fn addresses(reply: &Message) -> Vec<String> {
        reply
            .answers
            .iter()
            .map(|record| record.data.to_string())
            .collect()
    }

    #[test]
    fn a_and_aaaa_of_a_known_service() {
        let store = store();
        let a = local_reply(
            &store,
            "test",
            &request("web.test.svc.cluster.local.", RecordType::A),
        )
        .unwrap();
        assert_eq!(a.metadata.id, 4242);
        assert!(a.metadata.authoritative && a.metadata.recursion_available);
        assert_eq!(a.metadata.response_code, ResponseCode::NoError);
        assert_eq!(addresses(&a), ["10.96.0.10"]);
        assert!(
            a.answers
                .iter()
                .all(|record| record.ttl == names::TTL_SECONDS)
        );
        let aaaa = local_reply(&store, "test", &request("web.", RecordType::AAAA)).unwrap();
        assert_eq!(addresses(&aaaa), ["fd00:96::10"]);
        // Through a search domain: a CNAME, then the address.
        let searched = local_reply(
            &store,
            "test",
            &request("web.test.test.svc.cluster.local.", RecordType::A),
        )
        .unwrap();
        assert_eq!(
            addresses(&searched),
            ["web.test.svc.cluster.local.", "10.96.0.10"]
        );
        // The bytes read back as the same message.
        let bytes = encode(&searched, 512).unwrap();
        assert_eq!(Message::from_vec(&bytes).unwrap().answers.len(), 2);
    }

    #[test]
    fn what_the_node_does_not_answer_goes_to_the_resolver() {
        let store = store();
        for (name, query_type) in [
            ("example.com.", RecordType::A),
            ("web.test.svc.cluster.local.", RecordType::TXT),
            ("web.test.svc.cluster.local.", RecordType::SRV),
        ] {
            assert!(
                local_reply(&store, "test", &request(name, query_type)).is_none(),
                "{name} {query_type}"
            );
        }
        // Not a query: refused here.
        let mut notify = request("web.", RecordType::A);
        notify.metadata.op_code = OpCode::Notify;
        assert_eq!(
            local_reply(&store, "test", &notify)
                .unwrap()
                .metadata
                .response_code,
            ResponseCode::NotImp
        );
    }

    #[test]
    fn an_answer_too_long_for_udp_is_truncated() {
        let mut reply = local_reply(&store(), "test", &request("web.", RecordType::A)).unwrap();
        for octet in 0..60u8 {
            reply.add_answer(Record::from_rdata(
                Name::from_ascii("web.").unwrap(),
                30,
                RData::A(A([10, 0, 0, octet].into())),
            ));
        }
        let bytes = encode(&reply, 512).unwrap();
        let cut = Message::from_vec(&bytes).unwrap();
        assert!(cut.metadata.truncation && cut.answers.is_empty(), "{cut:?}");
        assert_eq!(cut.metadata.id, 4242);
    }
}
