//! Everything the eBPF programs and the agent both need to agree on: ports,
//! marks, map key/value layouts and counter indices. One definition each.
//!
//! Byte order convention: IPv4 addresses are stored as the kernel hands them to
//! the programs (network order in a `u32`); ports are stored in host order.
#![no_std]

/// Pod-local outbound listener (captured connects are rewritten to it).
pub const OUTBOUND_PORT: u16 = 15001;
/// Transparent inbound listener for plaintext traffic.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// Transparent inbound listener for HBONE (HTTP/2 CONNECT over mTLS).
pub const INBOUND_HBONE_PORT: u16 = 15008;
/// DNS: queries to this port from pods with DNS capture go to the agent.
pub const DNS_PORT: u16 = 53;
/// Pod-local DNS listener (UDP, on loopback): captured queries are sent
/// there. ztunnel's DNS proxy port.
pub const DNS_LISTENER_PORT: u16 = 15053;

/// `SO_MARK` of the agent's upstream sockets: never captured, routed normally.
pub const MARK_BYPASS: u32 = 0x539;
/// `skb->mark` of steered inbound packets and `SO_MARK` of inbound delivery
/// sockets: never captured, and routed through the pod's local route table
/// (so replies to a spoofed source come back to the proxy).
pub const MARK_LOCAL: u32 = 0x53a;
/// Route table holding `local 0.0.0.0/0 dev lo` inside each enrolled pod.
pub const LOCAL_ROUTE_TABLE: u32 = 1539;
/// Priority of the `ip rule` for `MARK_LOCAL` inside each enrolled pod.
pub const LOCAL_RULE_PRIORITY: u32 = 1539;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Value of the enrolled-pods map, keyed by network-namespace cookie (`u64`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledPod {
    /// The pod's IPv4 address (network order), for operators reading the map.
    pub ipv4: u32,
    /// Index of the pod's interface inside its namespace.
    pub ifindex: u32,
    /// `POD_FLAG_*` bits.
    pub flags: u32,
    pub _pad: u32,
    /// The pod's own IPv6 address (network-order words), all zero if it has
    /// none: what `getsockname` shows on a captured IPv6 socket.
    pub ipv6: [u32; 4],
}

/// The pod has an IPv6 outbound listener on `[::1]:15001`; capture IPv6 connects.
pub const POD_FLAG_IPV6: u32 = 1;
/// The pod's DNS is captured: UDP to port 53 goes to its DNS listener on
/// `DNS_LISTENER_PORT` (TCP to port 53 is captured as any TCP is).
pub const POD_FLAG_DNS: u32 = 2;

/// An address as the programs see it: IPv4 in `ip[0]` (network order) with the
/// rest zero, or IPv6 in all four words (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpAddr {
    pub ip: [u32; 4],
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub _pad: u16,
}

/// Where a captured connect was going. Value of both the by-socket map
/// (keyed by the client socket's cookie, used by `getpeername`) and the
/// by-client map (keyed by [`ClientKey`], read by the proxy on accept).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Network namespace of the client.
    pub netns_cookie: u64,
    pub addr: IpAddr,
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}

/// What the proxy knows about an accepted outbound connection: the client's
/// namespace and its address as seen from the listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub netns_cookie: u64,
    pub addr: IpAddr,
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}

/// Key of the acceleration sockhash: a socket's own view of its connection
/// (IPv4 in the first address word, the rest zero; IPv6 in all four). A
/// message sent on one socket is redirected to the socket whose key is the
/// reverse.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
    /// Host order.
    pub local_port: u32,
    /// Host order.
    pub remote_port: u32,
    /// `AF_INET` or `AF_INET6`, so an IPv4 key never equals an IPv6 one.
    pub family: u32,
}

impl SockKey {
    pub const fn reversed(&self) -> SockKey {
        SockKey {
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
            family: self.family,
        }
    }
}

/// Run-time switches, one entry in an array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureSettings {
    /// 1 when `sk_msg` acceleration between the agent's sockets is on.
    pub accelerate: u32,
    /// 1 when `sock_ops` keeps `TCP_STATS` (kernel telemetry) current.
    pub tcp_stats: u32,
}

/// Value of the excluded-ports map (keyed by port, host order `u16`) and the
/// excluded-CIDRs LPM trie: which directions the exclusion applies to.
pub const EXCLUDE_OUTBOUND: u8 = 1;
pub const EXCLUDE_INBOUND: u8 = 2;

/// What the kernel measured of one of the agent's TCP connections, kept
/// by `sock_ops` (on each RTT sample, retransmit and at close) for the
/// sockets the proxy asked for (keyed by socket cookie; the proxy inserts
/// a zeroed entry, the program only updates entries that exist).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpStats {
    /// Smoothed round-trip time, microseconds (the kernel's `srtt_us >> 3`).
    pub srtt_us: u32,
    /// The lowest round-trip time seen, microseconds.
    pub min_rtt_us: u32,
    /// Segments retransmitted.
    pub total_retrans: u32,
    /// Congestion window, in segments.
    pub snd_cwnd: u32,
    pub segs_in: u32,
    pub segs_out: u32,
    pub bytes_acked: u64,
    pub bytes_received: u64,
    /// Updates so far (0: the kernel has said nothing yet).
    pub samples: u32,
    pub _pad: u32,
}

/// Sockets whose kernel statistics the proxy follows at once.
pub const MAX_TCP_STATS: u32 = 65536;

/// Per-CPU counters, indexed by these constants.
pub mod counter {
    /// connect4/6: a connect from an enrolled pod rewritten to the proxy.
    pub const CONNECT_CAPTURED: u32 = 0;
    /// connect4/6: an application's connect from an enrolled pod left alone
    /// (excluded port or CIDR, loopback, proxy port, no IPv6 listener): what
    /// `weir trace --verdict bypassed` shows.
    pub const CONNECT_BYPASSED: u32 = 1;
    /// connect4/6: a map update failed.
    pub const CONNECT_ERRORS: u32 = 2;
    /// sock_ops: original destination recorded for an established captured socket.
    pub const ORIGDST_RECORDED: u32 = 3;
    /// getpeername4/6: the original destination shown to the application.
    pub const PEERNAME_REWRITTEN: u32 = 4;
    /// TC: a SYN to an enrolled pod assigned to the transparent listener.
    pub const INBOUND_STEERED: u32 = 5;
    /// TC: a TCP packet to an enrolled pod left to the stack.
    pub const INBOUND_PASSED: u32 = 6;
    /// TC: a SYN that could not be steered (listener missing, assign
    /// failed), dropped.
    pub const INBOUND_ERRORS: u32 = 7;
    /// sock_ops: an agent socket added to the acceleration sockhash.
    pub const ACCEL_SOCKETS_ADDED: u32 = 8;
    /// sk_msg: a message redirected to the peer socket.
    pub const ACCEL_REDIRECTED: u32 = 9;
    /// sk_msg: a message passed to TCP (no peer socket in the sockhash).
    pub const ACCEL_PASSED: u32 = 10;
    /// connect4/6: one of the agent's own (marked) sockets in an enrolled pod,
    /// never captured and not a flow of the pod. Appended after the older
    /// counters so their indices keep their meaning.
    pub const CONNECT_AGENT: u32 = 11;
    /// getsockname4/6: the pod's own address shown to the application.
    pub const SOCKNAME_REWRITTEN: u32 = 12;
    /// TC: a packet to an enrolled pod that might carry a TCP segment the
    /// program cannot steer (a fragment, an IPv6 header chain too long to
    /// follow), dropped rather than delivered around the proxy.
    pub const INBOUND_DROPPED: u32 = 13;
    /// connect4/6, sendmsg4/6: a UDP query to port 53 from a pod with DNS
    /// capture sent to its DNS listener.
    pub const DNS_CAPTURED: u32 = 14;
    /// recvmsg4/6: a reply of the DNS listener shown as coming from the
    /// resolver the application asked.
    pub const DNS_REPLY_REWRITTEN: u32 = 15;
    /// Number of counters (size of the counters array).
    pub const COUNT: u32 = 16;

    /// Names, in index order, as the agent reports them.
    pub const NAMES: [&str; COUNT as usize] = [
        "connect_captured",
        "connect_bypassed",
        "connect_errors",
        "origdst_recorded",
        "peername_rewritten",
        "inbound_steered",
        "inbound_passed",
        "inbound_errors",
        "accel_sockets_added",
        "accel_redirected",
        "accel_passed",
        "connect_agent",
        "sockname_rewritten",
        "inbound_dropped",
        "dns_captured",
        "dns_reply_rewritten",
    ];
}

/// One flow event of the eBPF layer, for `weir trace`: a connect from an
/// enrolled pod (captured or bypassed, and why) or a new inbound connection
/// to one (steered to the proxy, or passed, and why). Written to the
/// `FLOW_EVENTS` ring buffer; the agent reads it and joins pod names.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_boot_ns`: nanoseconds since boot.
    pub boot_ns: u64,
    /// The pod's network namespace (connect events; 0 for inbound ones,
    /// which name the pod by `local` address).
    pub netns_cookie: u64,
    /// Outbound: the original destination. Inbound: the client.
    pub peer: IpAddr,
    /// Inbound: the pod's address. Outbound: unspecified.
    pub local: IpAddr,
    pub peer_port: u16,
    pub local_port: u16,
    /// `EVENT_*`.
    pub kind: u8,
    /// `VERDICT_*`.
    pub verdict: u8,
    /// `REASON_*`.
    pub reason: u8,
    pub _pad: u8,
}

pub const EVENT_CONNECT: u8 = 1;
pub const EVENT_INBOUND: u8 = 2;

/// Sent to the proxy (connect rewritten, or SYN assigned to its listener).
pub const VERDICT_CAPTURED: u8 = 1;
/// Left to the kernel as it was.
pub const VERDICT_BYPASSED: u8 = 2;
/// Meant for the proxy but a map update or the listener lookup failed.
pub const VERDICT_ERROR: u8 = 3;
/// Dropped: it could not be steered and must not bypass the proxy.
pub const VERDICT_DROPPED: u8 = 4;

pub const REASON_NONE: u8 = 0;
pub const REASON_AGENT_SOCKET: u8 = 1;
pub const REASON_LOOPBACK: u8 = 2;
pub const REASON_PROXY_PORT: u8 = 3;
pub const REASON_EXCLUDED_PORT: u8 = 4;
pub const REASON_EXCLUDED_CIDR: u8 = 5;
pub const REASON_NO_IPV6_LISTENER: u8 = 6;
pub const REASON_MAP_FULL: u8 = 7;
pub const REASON_NO_LISTENER: u8 = 8;
/// A TCP segment in IP fragments (TC cannot read or steer it).
pub const REASON_FRAGMENT: u8 = 9;
/// An IPv6 header chain longer than TC follows.
pub const REASON_EXTENSION_HEADERS: u8 = 10;

/// Names of `REASON_*`, by value.
pub const REASON_NAMES: [&str; 11] = [
    "",
    "agent_socket",
    "loopback",
    "proxy_port",
    "excluded_port",
    "excluded_cidr",
    "no_ipv6_listener",
    "map_full",
    "no_listener",
    "fragment",
    "extension_headers",
];

/// IPv6 next-header values the inbound classifier knows.
pub mod ipproto {
    pub const HOPOPTS: u8 = 0;
    pub const TCP: u8 = 6;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const AH: u8 = 51;
    pub const DSTOPTS: u8 = 60;
}

/// Extension headers the inbound classifier follows before it gives up on
/// a packet (and drops it). Real traffic carries one or two.
pub const IPV6_MAX_EXTENSION_HEADERS: usize = 8;

/// What an IPv6 packet carries, as far as inbound steering is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv6Payload {
    /// A TCP segment whose header starts this many bytes after the start
    /// of the IPv6 header.
    Tcp(usize),
    /// Not TCP (UDP, ICMPv6, ESP, no next header, a header the kernel has
    /// no handler for): not the classifier's business.
    Other,
    /// Possibly TCP but not steerable: a fragment (the TCP header may not
    /// be in this packet at all), or more extension headers than
    /// [`IPV6_MAX_EXTENSION_HEADERS`]. `REASON_*` says which.
    Unsteerable(u8),
}

/// Follows an IPv6 packet's header chain to its transport header.
/// `read(offset)` returns the two bytes at `offset` from the start of the
/// IPv6 header (the fixed 40-byte header, then the extension headers).
/// Hop-by-hop, routing, destination options and AH headers are skipped by
/// their length fields, so a SYN behind them is steered like any other.
#[inline(always)]
pub fn ipv6_payload<E>(
    mut read: impl FnMut(usize) -> Result<[u8; 2], E>,
) -> Result<Ipv6Payload, E> {
    const FIXED_HEADER: usize = 40;
    let mut next = read(6)?[0];
    let mut offset = FIXED_HEADER;
    let mut headers = 0;
    while headers < IPV6_MAX_EXTENSION_HEADERS {
        match next {
            ipproto::TCP => return Ok(Ipv6Payload::Tcp(offset)),
            ipproto::HOPOPTS | ipproto::ROUTING | ipproto::DSTOPTS => {
                let [following, length] = read(offset)?;
                next = following;
                offset += (usize::from(length) + 1) * 8;
            }
            ipproto::AH => {
                let [following, length] = read(offset)?;
                next = following;
                offset += (usize::from(length) + 2) * 4;
            }
            ipproto::FRAGMENT => {
                // What follows a fragment header is the fragmentable part:
                // TCP, or headers that may lead to it.
                let [following, _] = read(offset)?;
                return Ok(match following {
                    ipproto::TCP
                    | ipproto::HOPOPTS
                    | ipproto::ROUTING
                    | ipproto::DSTOPTS
                    | ipproto::AH
                    | ipproto::FRAGMENT => Ipv6Payload::Unsteerable(REASON_FRAGMENT),
                    _ => Ipv6Payload::Other,
                });
            }
            _ => return Ok(Ipv6Payload::Other),
        }
        headers += 1;
    }
    Ok(if next == ipproto::TCP {
        Ipv6Payload::Tcp(offset)
    } else if matches!(
        next,
        ipproto::HOPOPTS | ipproto::ROUTING | ipproto::DSTOPTS | ipproto::AH | ipproto::FRAGMENT
    ) {
        Ipv6Payload::Unsteerable(REASON_EXTENSION_HEADERS)
    } else {
        Ipv6Payload::Other
    })
}

/// What enrolling changed in a pod that was not Weir's to begin with, so
/// release can put it back. Value of the `POD_RESTORE` map (keyed by netns
/// cookie), written by the agent only (the programs never read it); pinned
/// with the shared maps so a restarted or successor agent releases the pod
/// as it was before the first enrollment, not as its predecessor left it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodRestore {
    /// `RESTORE_*` bits: which of the fields below hold a recorded value.
    pub flags: u32,
    /// `net.ipv4.tcp_fwmark_accept` before enrollment.
    pub tcp_fwmark_accept: i32,
    /// `net.ipv4.fwmark_reflect` before enrollment.
    pub fwmark_reflect: i32,
    /// `net.ipv4.tcp_migrate_req` before enrollment.
    pub tcp_migrate_req: i32,
    /// `net.ipv6.fwmark_reflect` before enrollment.
    pub ipv6_fwmark_reflect: i32,
}

/// Weir added the pod interface's `clsact` qdisc (none was there before).
pub const RESTORE_CLSACT_CREATED: u32 = 1;
pub const RESTORE_TCP_FWMARK_ACCEPT: u32 = 2;
pub const RESTORE_FWMARK_REFLECT: u32 = 4;
pub const RESTORE_TCP_MIGRATE_REQ: u32 = 8;
pub const RESTORE_IPV6_FWMARK_REFLECT: u32 = 16;

/// Size of the flow-event ring buffer (a power of two, in bytes).
pub const FLOW_EVENTS_BYTES: u32 = 256 * 1024;

// Map keys are compared bytewise: no implicit padding anywhere (its bytes
// would be whatever was on the eBPF stack).
const _: () = {
    assert!(core::mem::size_of::<IpAddr>() == 20);
    assert!(core::mem::size_of::<OrigDst>() == 32);
    assert!(core::mem::size_of::<ClientKey>() == 32);
    assert!(core::mem::size_of::<SockKey>() == 44);
    assert!(core::mem::size_of::<EnrolledPod>() == 32);
    assert!(core::mem::size_of::<PodRestore>() == 20);
    assert!(core::mem::size_of::<CaptureSettings>() == 8);
    assert!(core::mem::size_of::<FlowEvent>() == 64);
};

/// Map names, as declared in the eBPF object and pinned under
/// `<bpffs>/weir/<instance>/maps/`.
pub mod map_name {
    pub const ENROLLED_PODS: &str = "ENROLLED_PODS";
    pub const ORIGDST_BY_SOCKET: &str = "ORIGDST_BY_SOCKET";
    pub const ORIGDST_BY_CLIENT: &str = "ORIGDST_BY_CLIENT";
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    pub const EXCLUDED_CIDRS: &str = "EXCLUDED_CIDRS";
    pub const EXCLUDED_CIDRS6: &str = "EXCLUDED_CIDRS6";
    pub const SETTINGS: &str = "SETTINGS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const ACCEL_SOCKETS: &str = "ACCEL_SOCKETS";
    pub const ACCEL_TCP_ONLY: &str = "ACCEL_TCP_ONLY";
    pub const FLOW_EVENTS: &str = "FLOW_EVENTS";
    pub const POD_RESTORE: &str = "POD_RESTORE";
    pub const TCP_STATS: &str = "TCP_STATS";
}

/// Capacities, shared so the agent can report occupancy against them.
pub const MAX_ENROLLED_PODS: u32 = 1024;
pub const MAX_TRACKED_CONNECTIONS: u32 = 65536;
pub const MAX_EXCLUDED_PORTS: u32 = 256;
pub const MAX_EXCLUDED_CIDRS: u32 = 256;
pub const MAX_ACCEL_SOCKETS: u32 = 65536;

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are `repr(C)`, `Copy`, with explicit padding and no
    // pointers, so any bit pattern of their size is a valid value.
    unsafe impl aya::Pod for EnrolledPod {}
    unsafe impl aya::Pod for IpAddr {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for ClientKey {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for CaptureSettings {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for PodRestore {}
    unsafe impl aya::Pod for TcpStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packet's IPv6 header (next header `first`) and `extensions`, each
    /// `(next header, bytes)`.
    fn packet(first: u8, extensions: &[(u8, &[u8])]) -> [u8; 256] {
        let mut bytes = [0u8; 256];
        bytes[6] = first;
        let mut at = 40;
        for (next, header) in extensions {
            bytes[at..at + header.len()].copy_from_slice(header);
            bytes[at] = *next;
            at += header.len();
        }
        bytes
    }

    fn payload(bytes: &[u8]) -> Ipv6Payload {
        ipv6_payload(|at| {
            bytes
                .get(at..at + 2)
                .and_then(|pair| pair.try_into().ok())
                .ok_or(())
        })
        .unwrap_or(Ipv6Payload::Unsteerable(0))
    }

    #[test]
    fn tcp_is_found_behind_the_headers_the_stack_would_follow() {
        assert_eq!(payload(&packet(ipproto::TCP, &[])), Ipv6Payload::Tcp(40));
        // Destination options (8 bytes: length 0), then TCP.
        let dstopts = packet(
            ipproto::DSTOPTS,
            &[(ipproto::TCP, &[0, 0, 1, 4, 0, 0, 0, 0])],
        );
        assert_eq!(payload(&dstopts), Ipv6Payload::Tcp(48));
        // Hop-by-hop of 16 bytes (length 1), AH of 24 (length 4), TCP.
        let chain = packet(
            ipproto::HOPOPTS,
            &[
                (
                    ipproto::AH,
                    &[0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                ),
                (
                    ipproto::TCP,
                    &[
                        0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    ],
                ),
            ],
        );
        assert_eq!(payload(&chain), Ipv6Payload::Tcp(80));
    }

    #[test]
    fn fragments_and_long_chains_of_tcp_are_unsteerable_others_pass() {
        let fragment = packet(ipproto::FRAGMENT, &[(ipproto::TCP, &[0; 8])]);
        assert_eq!(
            payload(&fragment),
            Ipv6Payload::Unsteerable(REASON_FRAGMENT)
        );
        let udp_fragment = packet(ipproto::FRAGMENT, &[(17, &[0; 8])]);
        assert_eq!(payload(&udp_fragment), Ipv6Payload::Other);
        let long: [(u8, &[u8]); 9] = [(ipproto::DSTOPTS, &[0u8; 8]); 9];
        let mut chain = long;
        chain[8].0 = ipproto::TCP;
        assert_eq!(
            payload(&packet(ipproto::DSTOPTS, &chain)),
            Ipv6Payload::Unsteerable(REASON_EXTENSION_HEADERS)
        );
        // Exactly as many headers as followed, then TCP: steered.
        assert_eq!(
            payload(&packet(ipproto::DSTOPTS, &chain[1..])),
            Ipv6Payload::Tcp(40 + 8 * IPV6_MAX_EXTENSION_HEADERS)
        );
        assert_eq!(payload(&packet(58, &[])), Ipv6Payload::Other);
        assert_eq!(payload(&packet(17, &[])), Ipv6Payload::Other);
        assert_eq!(
            payload(&packet(ipproto::DSTOPTS, &[(59, &[0; 8])])),
            Ipv6Payload::Other
        );
    }
}
