//! The node's flows at a glance (`weir trace`, like `hubble observe`): the
//! eBPF programs' capture/bypass/steer events from the `FLOW_EVENTS` ring
//! buffer, joined with the pods the agent knows, and the proxy's own
//! verdicts (allowed, denied by a policy, failed), streamed as JSON lines on
//! `127.0.0.1:15000/trace` with filters.
use std::{
    borrow::Cow,
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use weir_common::{
    AF_INET6, EVENT_CONNECT, FlowEvent, REASON_NAMES, VERDICT_BYPASSED, VERDICT_CAPTURED,
    VERDICT_DROPPED,
};

use crate::{proxy::ProxyContext, security::identity::Identity};

/// Events kept for a subscriber that joins late (`/trace?recent=true`).
const RECENT_EVENTS: usize = 512;

/// One flow event as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// RFC 3339, UTC.
    pub time: String,
    /// `ebpf` (a kernel hook) or `proxy` (the agent's own verdict).
    pub source: String,
    /// `outbound` (from the pod) or `inbound` (to the pod).
    pub direction: String,
    /// `captured`, `bypassed`, `error` (eBPF); `allowed`, `denied`, `failed`
    /// (proxy).
    pub verdict: String,
    /// Why, where there is more to say (bypass reason, policy, error).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The pod on this node (`namespace/name`), when known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub identity: String,
    /// The other end: the original destination (outbound) or the client
    /// (inbound).
    pub peer: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer_identity: String,
    /// The destination port of the flow.
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_received: Option<u64>,
    /// What the kernel measured of the connection's network leg.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<super::kernel_tcp::KernelTcp>,
}

impl FlowRecord {
    /// One line for a terminal.
    pub fn line(&self) -> String {
        let arrow = if self.direction == "inbound" {
            "<-"
        } else {
            "->"
        };
        let pod = if self.pod.is_empty() { "?" } else { &self.pod };
        let mut line = format!(
            "{} {:<5} {:<8} {:<8} {pod} {arrow} {}",
            self.time, self.source, self.direction, self.verdict, self.peer
        );
        if !self.peer_identity.is_empty() {
            line.push_str(&format!(" ({})", self.peer_identity));
        }
        if !self.reason.is_empty() {
            line.push_str(&format!(" reason={}", self.reason));
        }
        if let (Some(sent), Some(received)) = (self.bytes_sent, self.bytes_received) {
            line.push_str(&format!(" sent={sent} received={received}"));
        }
        if let Some(kernel) = &self.kernel {
            line.push_str(&format!(" {kernel}"));
        }
        line
    }
}

/// One flow event as the agent keeps it (`FlowRecord` is how it is shown).
/// It holds no allocation of its own on the common path: names and
/// identities are shared with the pod and the store, verdicts are static
/// and the time is formatted only when shown. Every connection makes one or
/// two of these, and the last `RECENT_EVENTS` stay: as strings they were
/// ten small allocations each, scattered over the pages a burst of
/// connections used, so those pages stayed resident after the burst.
#[derive(Debug, Clone)]
pub struct Flow {
    pub time: SystemTime,
    pub source: &'static str,
    pub direction: &'static str,
    pub verdict: &'static str,
    pub reason: Cow<'static, str>,
    pub pod: Option<Arc<str>>,
    pub identity: Option<Identity>,
    pub peer: SocketAddr,
    pub peer_identity: Option<Identity>,
    pub port: u16,
    /// Sent and received.
    pub bytes: Option<(u64, u64)>,
    pub kernel: Option<super::kernel_tcp::KernelTcp>,
}

impl Flow {
    /// The namespace part of `pod`.
    pub fn namespace(&self) -> &str {
        self.pod
            .as_deref()
            .and_then(|pod| pod.split_once('/'))
            .map_or("", |(namespace, _)| namespace)
    }

    pub fn record(&self) -> FlowRecord {
        FlowRecord {
            time: time::OffsetDateTime::from(self.time)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            source: self.source.into(),
            direction: self.direction.into(),
            verdict: self.verdict.into(),
            reason: self.reason.to_string(),
            pod: self.pod.as_deref().unwrap_or_default().into(),
            identity: self
                .identity
                .as_ref()
                .map(Identity::to_string)
                .unwrap_or_default(),
            peer: self.peer.to_string(),
            peer_identity: self
                .peer_identity
                .as_ref()
                .map(Identity::to_string)
                .unwrap_or_default(),
            port: self.port,
            bytes_sent: self.bytes.map(|(sent, _)| sent),
            bytes_received: self.bytes.map(|(_, received)| received),
            kernel: self.kernel,
        }
    }
}

/// What a subscriber wants to see; empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowFilter {
    pub pod: Option<String>,
    pub namespace: Option<String>,
    pub port: Option<u16>,
    pub verdict: Option<String>,
}

impl FlowFilter {
    /// From `pod=ns/name&namespace=ns&port=N&verdict=v`.
    pub fn from_query(query: &str) -> Result<FlowFilter, String> {
        let mut filter = FlowFilter::default();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = value.replace("%2F", "/").replace("%2f", "/");
            match key {
                "pod" => filter.pod = Some(value),
                "namespace" => filter.namespace = Some(value),
                "port" => {
                    filter.port = Some(
                        value
                            .parse()
                            .map_err(|_| format!("port: {value:?} is not a port"))?,
                    )
                }
                "verdict" => filter.verdict = Some(value),
                "recent" => {}
                other => return Err(format!("unknown filter {other:?}")),
            }
        }
        Ok(filter)
    }

    pub fn to_query(&self) -> String {
        let mut parts = Vec::new();
        if let Some(pod) = &self.pod {
            parts.push(format!("pod={}", pod.replace('/', "%2F")));
        }
        if let Some(namespace) = &self.namespace {
            parts.push(format!("namespace={namespace}"));
        }
        if let Some(port) = self.port {
            parts.push(format!("port={port}"));
        }
        if let Some(verdict) = &self.verdict {
            parts.push(format!("verdict={verdict}"));
        }
        parts.join("&")
    }

    pub fn matches(&self, event: &Flow) -> bool {
        self.pod
            .as_deref()
            .is_none_or(|pod| event.pod.as_deref() == Some(pod))
            && self
                .namespace
                .as_ref()
                .is_none_or(|namespace| event.namespace() == namespace)
            && self.port.is_none_or(|port| event.port == port)
            && self
                .verdict
                .as_ref()
                .is_none_or(|verdict| event.verdict == verdict)
    }
}

/// Fans events out to `/trace` subscribers and keeps the latest few.
pub struct FlowEvents {
    sender: broadcast::Sender<Arc<Flow>>,
    /// Allocated once, whole: a new event takes the oldest one's slot.
    recent: Mutex<VecDeque<Flow>>,
}

impl Default for FlowEvents {
    fn default() -> Self {
        FlowEvents {
            sender: broadcast::channel(4096).0,
            recent: Mutex::new(VecDeque::with_capacity(RECENT_EVENTS)),
        }
    }
}

impl FlowEvents {
    pub fn publish(&self, event: Flow) {
        // Only a subscriber (a `weir trace`) costs an allocation.
        if self.sender.receiver_count() > 0 {
            let _ = self.sender.send(Arc::new(event.clone()));
        }
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT_EVENTS {
            recent.pop_front();
        }
        recent.push_back(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Flow>> {
        self.sender.subscribe()
    }

    pub fn recent(&self) -> Vec<Flow> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.iter().cloned().collect()
    }

    /// A proxy verdict on a connection of `pod`.
    #[allow(clippy::too_many_arguments)]
    pub fn proxy_event(
        &self,
        direction: &'static str,
        verdict: &'static str,
        reason: Cow<'static, str>,
        pod: &crate::proxy::PodHandle,
        peer: SocketAddr,
        port: u16,
        peer_identity: Option<&Identity>,
        bytes: Option<(u64, u64)>,
        kernel: Option<super::kernel_tcp::KernelTcp>,
    ) {
        self.publish(Flow {
            time: SystemTime::now(),
            source: "proxy",
            direction,
            verdict,
            reason,
            pod: Some(pod.id.clone()),
            identity: Some(pod.identity.clone()),
            peer,
            peer_identity: peer_identity.cloned(),
            port,
            bytes,
            kernel,
        });
    }
}

/// Wall-clock time of a `bpf_ktime_get_boot_ns` stamp.
fn boot_ns_to_time(boot_ns: u64) -> SystemTime {
    let mut boottime = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut boottime) };
    let now_boot = boottime.tv_sec as i128 * 1_000_000_000 + boottime.tv_nsec as i128;
    let age = (now_boot - boot_ns as i128).clamp(0, u64::MAX as i128) as u64;
    SystemTime::now() - Duration::from_nanos(age)
}

fn address(addr: &weir_common::IpAddr) -> IpAddr {
    if addr.family == AF_INET6 {
        let mut octets = [0u8; 16];
        for (chunk, word) in octets.chunks_mut(4).zip(addr.ip) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::from(octets)
    } else {
        IpAddr::from(addr.ip[0].to_ne_bytes())
    }
}

/// Turns a kernel event into what operators read, naming the pod.
fn describe(event: &FlowEvent, context: &ProxyContext) -> Flow {
    let pods = context.local_pods.read().unwrap_or_else(|e| e.into_inner());
    let outbound = event.kind == EVENT_CONNECT;
    let pod = if outbound {
        pods.values()
            .find(|pod| pod.netns_cookie == event.netns_cookie)
            .cloned()
    } else {
        pods.get(&address(&event.local)).cloned()
    };
    let peer = SocketAddr::new(address(&event.peer), event.peer_port);
    Flow {
        time: boot_ns_to_time(event.boot_ns),
        source: "ebpf",
        direction: if outbound { "outbound" } else { "inbound" },
        verdict: match event.verdict {
            VERDICT_CAPTURED => "captured",
            VERDICT_BYPASSED => "bypassed",
            VERDICT_DROPPED => "dropped",
            _ => "error",
        },
        reason: Cow::Borrowed(
            REASON_NAMES
                .get(usize::from(event.reason))
                .copied()
                .unwrap_or("unknown"),
        ),
        pod: pod.as_ref().map(|pod| pod.id.clone()),
        identity: pod.as_ref().map(|pod| pod.identity.clone()),
        peer,
        peer_identity: context
            .store
            .workload(peer.ip())
            .map(|workload| workload.identity.clone()),
        port: if outbound {
            event.peer_port
        } else {
            event.local_port
        },
        bytes: None,
        kernel: None,
    }
}

/// Reads the `FLOW_EVENTS` ring buffer for the agent's life.
pub async fn read_flow_events(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    context: Arc<ProxyContext>,
) {
    // SAFETY: the ring buffer owns its map fd for its whole life and always
    // reports the same fd.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    };
    let mut ring = match registered {
        Ok(ring) => ring,
        Err(error) => {
            tracing::warn!(%error, "cannot poll the flow-event ring buffer; weir trace shows proxy events only");
            return;
        }
    };
    loop {
        let mut guard = match ring.readable_mut().await {
            Ok(guard) => guard,
            Err(error) => {
                tracing::warn!(%error, "flow-event reader stopped");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < size_of::<FlowEvent>() {
                continue;
            }
            // SAFETY: the programs write whole `FlowEvent`s (checked length);
            // read_unaligned copes with the ring's 8-byte alignment.
            let event: FlowEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            drop(item);
            context.telemetry.flows.publish(describe(&event, &context));
        }
        guard.clear_ready();
    }
}

/// How `weir trace` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowOutput {
    Text,
    Json,
}

/// `weir trace`: follows a running agent's `/trace` stream and prints each
/// event; stops after `count` events when given.
pub async fn follow(
    admin: SocketAddr,
    filter: &FlowFilter,
    recent: bool,
    output: FlowOutput,
    count: Option<u64>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use http_body_util::BodyExt as _;
    use std::io::Write as _;
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .with_context(|| format!("connecting to the agent's admin port {admin} (is it running, in this network namespace?)"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut query = filter.to_query();
    if recent {
        if !query.is_empty() {
            query.push('&');
        }
        query.push_str("recent=true");
    }
    let request = http::Request::get(format!("/trace?{query}"))
        .header(http::header::HOST, admin.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let text = body.collect().await?.to_bytes();
        anyhow::bail!(
            "agent answered {status}: {}",
            String::from_utf8_lossy(&text).trim()
        );
    }
    let mut pending = Vec::new();
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|byte| *byte == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            let mut out = stdout.lock();
            match serde_json::from_str::<FlowRecord>(text) {
                Ok(event) => {
                    match output {
                        FlowOutput::Json => writeln!(out, "{text}")?,
                        FlowOutput::Text => writeln!(out, "{}", event.line())?,
                    }
                    printed += 1;
                }
                // `{"lagged": N}`: say so, whatever the format.
                Err(_) => writeln!(out, "{text}")?,
            }
            out.flush()?;
            if count.is_some_and(|count| printed >= count) {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(pod: &str, port: u16, verdict: &'static str) -> Flow {
        Flow {
            time: SystemTime::now(),
            source: "ebpf",
            direction: "outbound",
            verdict,
            reason: Cow::Borrowed(""),
            pod: Some(pod.into()),
            identity: None,
            peer: "10.0.0.1:80".parse().expect("address"),
            peer_identity: None,
            port,
            bytes: None,
            kernel: None,
        }
    }

    #[test]
    fn filters_round_trip_through_the_query_and_match() {
        let filter = FlowFilter {
            pod: Some("apps/a".into()),
            namespace: None,
            port: Some(8080),
            verdict: Some("captured".into()),
        };
        let parsed = FlowFilter::from_query(&filter.to_query()).expect("query");
        assert_eq!(parsed, filter);
        assert!(filter.matches(&event("apps/a", 8080, "captured")));
        assert!(!filter.matches(&event("apps/b", 8080, "captured")));
        assert!(!filter.matches(&event("apps/a", 80, "captured")));
        assert!(!filter.matches(&event("apps/a", 8080, "bypassed")));
        let namespace = FlowFilter::from_query("namespace=apps").expect("query");
        assert!(namespace.matches(&event("apps/z", 1, "denied")));
        assert!(FlowFilter::from_query("colour=red").is_err());
        assert!(FlowFilter::from_query("port=x").is_err());
    }
}
