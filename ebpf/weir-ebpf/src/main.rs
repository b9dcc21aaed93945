//! Weir's eBPF programs.
//!
//! - `weir_connect4` / `weir_connect6` (cgroup, attached once to the pods'
//!   cgroup parent): TCP connects from enrolled network namespaces are
//!   rewritten to the pod-local outbound listener; the original destination is
//!   remembered by socket cookie.
//! - `weir_sockops` (same cgroup): once a captured socket is established, its
//!   original destination is re-keyed by (netns, client address, client port),
//!   which is what the proxy sees on accept.
//! - The same connect hooks and `weir_sendmsg4` / `6`: UDP queries to port 53
//!   from pods with DNS capture go to the pod's DNS listener;
//!   `weir_recvmsg4` / `6` show its replies as the resolver's.
//! - `weir_getpeername4` / `6`: applications see the address they connected to.
//! - `weir_getsockname4` / `6`: and their own address as the pod's, not the
//!   proxy listener's loopback one.
//! - `weir_tc_ingress` (clsact ingress on each enrolled pod's interface):
//!   inbound SYNs are assigned to the transparent inbound listener.
//! - `weir_sockops_accel` (agent's cgroup) + `weir_sk_msg`: data between two of
//!   the agent's own sockets on this node skips the TCP stack and the veths.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RETRANS_CB, BPF_SOCK_OPS_RETRANS_CB_FLAG,
        BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_sock, bpf_sock_tuple,
        sk_action,
    },
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockHash},
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_boot_ns, bpf_sk_assign,
        bpf_sk_release, bpf_skc_lookup_tcp,
    },
    macros::{btf_map, cgroup_sock_addr, classifier, sk_msg, sock_ops},
    maps::lpm_trie::Key,
    programs::{SkMsgContext, SockAddrContext, SockOpsContext, TcContext},
};
use aya_log_ebpf::debug;
use weir_common::{
    AF_INET, AF_INET6, CaptureSettings, ClientKey, DNS_LISTENER_PORT, DNS_PORT, EVENT_CONNECT,
    EVENT_INBOUND, EXCLUDE_INBOUND, EXCLUDE_OUTBOUND, EnrolledPod, FLOW_EVENTS_BYTES, FlowEvent,
    INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, IpAddr, Ipv6Payload, MARK_BYPASS, MARK_LOCAL,
    MAX_ACCEL_SOCKETS, MAX_ENROLLED_PODS, MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS, MAX_TCP_STATS,
    MAX_TRACKED_CONNECTIONS, OUTBOUND_PORT, OrigDst, POD_FLAG_DNS, POD_FLAG_IPV6, PodRestore,
    REASON_AGENT_SOCKET, REASON_EXCLUDED_CIDR, REASON_EXCLUDED_PORT, REASON_FRAGMENT,
    REASON_LOOPBACK, REASON_MAP_FULL, REASON_NO_IPV6_LISTENER, REASON_NO_LISTENER, REASON_NONE,
    REASON_PROXY_PORT, SockKey, TcpStats, VERDICT_BYPASSED, VERDICT_CAPTURED, VERDICT_DROPPED,
    VERDICT_ERROR, counter, ipv6_payload,
};

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const TCP_LISTEN: u32 = 10;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_HDR_LEN: usize = 14;
/// IPv4 `frag_off`: more fragments, and the fragment offset.
const IP_MF_AND_OFFSET: u16 = 0x3fff;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// Enrolled pods by network-namespace cookie. Enrolling is inserting here.
#[btf_map]
static ENROLLED_PODS: HashMap<u64, EnrolledPod, { MAX_ENROLLED_PODS as usize }> = HashMap::new();

/// Original destination of captured sockets, by socket cookie (for getpeername).
#[btf_map]
static ORIGDST_BY_SOCKET: LruHashMap<u64, OrigDst, { MAX_TRACKED_CONNECTIONS as usize }> =
    LruHashMap::new();

/// Original destination of captured sockets, by what the proxy sees on accept.
#[btf_map]
static ORIGDST_BY_CLIENT: LruHashMap<ClientKey, OrigDst, { MAX_TRACKED_CONNECTIONS as usize }> =
    LruHashMap::new();

/// Ports never captured (host order), with `EXCLUDE_*` direction bits.
#[btf_map]
static EXCLUDED_PORTS: HashMap<u16, u8, { MAX_EXCLUDED_PORTS as usize }> = HashMap::new();

/// IPv4 destinations never captured (network-order address), `EXCLUDE_*` bits.
#[btf_map]
static EXCLUDED_CIDRS: LpmTrie<u32, u8, { MAX_EXCLUDED_CIDRS as usize }> = LpmTrie::new();

/// IPv6 destinations never captured (network-order words), `EXCLUDE_*` bits.
#[btf_map]
static EXCLUDED_CIDRS6: LpmTrie<[u32; 4], u8, { MAX_EXCLUDED_CIDRS as usize }> = LpmTrie::new();

#[btf_map]
static SETTINGS: Array<CaptureSettings, 1> = Array::new();

#[btf_map]
static COUNTERS: PerCpuArray<u64, { counter::COUNT as usize }> = PerCpuArray::new();

/// The agent's established sockets, for `sk_msg` redirection.
#[btf_map]
static ACCEL_SOCKETS: SockHash<SockKey, { MAX_ACCEL_SOCKETS as usize }> = SockHash::new();

/// Flow events for `weir trace`. When nobody reads, it fills and further
/// events are dropped (`bpf_ringbuf_output` fails); capture is unaffected.
#[btf_map]
static FLOW_EVENTS: RingBuf<FlowEvent, { FLOW_EVENTS_BYTES as usize }> = RingBuf::new();

/// Sockets that sent data through TCP (their peer was not in the sockhash
/// yet): they keep using TCP, or redirected data could overtake it.
#[btf_map]
static ACCEL_TCP_ONLY: LruHashMap<SockKey, u8, { MAX_ACCEL_SOCKETS as usize }> = LruHashMap::new();

/// The kernel's view of the proxy's connections, by socket cookie (see
/// `TcpStats`).
#[btf_map]
static TCP_STATS: LruHashMap<u64, TcpStats, { MAX_TCP_STATS as usize }> = LruHashMap::new();

/// What enrollment changed in each pod (netns cookie), for release. Only
/// the agent reads and writes it; it lives here to be pinned and adopted
/// with the other shared maps.
#[btf_map]
static POD_RESTORE: HashMap<u64, PodRestore, { MAX_ENROLLED_PODS as usize }> = HashMap::new();

#[inline(always)]
fn count(index: u32) {
    if let Some(value) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, the program is not preempted on this CPU.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
fn ipv4(addr: u32) -> IpAddr {
    IpAddr {
        ip: [addr, 0, 0, 0],
        family: AF_INET,
        _pad: 0,
    }
}

/// Publishes one flow event; dropped if the ring buffer is full.
#[inline(always)]
fn emit(
    netns_cookie: u64,
    kind: u8,
    verdict: u8,
    reason: u8,
    peer: IpAddr,
    peer_port: u16,
    local: IpAddr,
    local_port: u16,
) {
    let event = FlowEvent {
        // SAFETY: helper without arguments, valid in every program type.
        boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        netns_cookie,
        peer,
        local,
        peer_port,
        local_port,
        kind,
        verdict,
        reason,
        _pad: 0,
    };
    let _ = FLOW_EVENTS.output(&event, 0);
}

/// First octet of a network-order IPv4 address held in a `u32`.
#[inline(always)]
fn first_octet(addr: u32) -> u8 {
    addr.to_ne_bytes()[0]
}

#[inline(always)]
fn is_proxy_port(port: u16) -> bool {
    port == OUTBOUND_PORT || port == INBOUND_PLAINTEXT_PORT || port == INBOUND_HBONE_PORT
}

#[inline(always)]
fn port_excluded(port: u16, direction: u8) -> bool {
    // SAFETY: the value is a plain u8 copied out at once.
    matches!(unsafe { EXCLUDED_PORTS.get(&port) }, Some(bits) if *bits & direction != 0)
}

#[inline(always)]
fn cidr_excluded(addr: u32) -> bool {
    matches!(EXCLUDED_CIDRS.get(&Key::new(32, addr)), Some(bits) if *bits & EXCLUDE_OUTBOUND != 0)
}

#[inline(always)]
fn cidr6_excluded(addr: [u32; 4]) -> bool {
    matches!(EXCLUDED_CIDRS6.get(&Key::new(128, addr)), Some(bits) if *bits & EXCLUDE_OUTBOUND != 0)
}

/// The agent's own sockets carry one of its marks and are never captured.
#[inline(always)]
fn is_agent_socket(sk: *mut bpf_sock) -> bool {
    if sk.is_null() {
        return false;
    }
    // SAFETY: non-null socket pointer handed to us by the kernel.
    let mark = unsafe { (*sk).mark };
    mark == MARK_BYPASS || mark == MARK_LOCAL
}

// ---------------------------------------------------------------------------
// Outbound capture
// ---------------------------------------------------------------------------

#[cgroup_sock_addr(connect4)]
pub fn weir_connect4(ctx: SockAddrContext) -> i32 {
    capture_connect4(&ctx);
    1 // always let the connect proceed (rewritten or not)
}

#[inline(always)]
fn capture_connect4(ctx: &SockAddrContext) {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol == IPPROTO_UDP {
        capture_dns4(ctx);
        return;
    }
    if sa.protocol != IPPROTO_TCP {
        return;
    }
    // SAFETY: helper valid for cgroup sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: value copied out at once.
    if unsafe { ENROLLED_PODS.get(&netns) }.is_none() {
        return;
    }
    let dst_ip = sa.user_ip4;
    let dst_port = u16::from_be(sa.user_port as u16);
    // SAFETY: reading the union's socket pointer; checked for null inside.
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let bypass = if is_agent_socket(sk) {
        REASON_AGENT_SOCKET
    } else if first_octet(dst_ip) == 127 {
        REASON_LOOPBACK
    } else if is_proxy_port(dst_port) {
        REASON_PROXY_PORT
    } else if port_excluded(dst_port, EXCLUDE_OUTBOUND) {
        REASON_EXCLUDED_PORT
    } else if cidr_excluded(dst_ip) {
        REASON_EXCLUDED_CIDR
    } else {
        REASON_NONE
    };
    // The agent's own connects are not flows of the pod: counted apart, so
    // `connect_bypassed` matches what `weir trace` shows as bypassed.
    if bypass == REASON_AGENT_SOCKET {
        count(counter::CONNECT_AGENT);
        return;
    }
    if bypass != REASON_NONE {
        count(counter::CONNECT_BYPASSED);
        emit(
            netns,
            EVENT_CONNECT,
            VERDICT_BYPASSED,
            bypass,
            ipv4(dst_ip),
            dst_port,
            IpAddr::default(),
            0,
        );
        return;
    }
    let orig = OrigDst {
        addr: ipv4(dst_ip),
        port: dst_port,
        _pad: 0,
        netns_cookie: netns,
    };
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIGDST_BY_SOCKET.insert(&cookie, &orig, 0).is_err() {
        // Without a record the proxy could not forward: leave it uncaptured.
        count(counter::CONNECT_ERRORS);
        emit(
            netns,
            EVENT_CONNECT,
            VERDICT_ERROR,
            REASON_MAP_FULL,
            orig.addr,
            dst_port,
            IpAddr::default(),
            0,
        );
        return;
    }
    sa.user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
    sa.user_port = u32::from(OUTBOUND_PORT.to_be());
    count(counter::CONNECT_CAPTURED);
    emit(
        netns,
        EVENT_CONNECT,
        VERDICT_CAPTURED,
        REASON_NONE,
        orig.addr,
        dst_port,
        IpAddr::default(),
        0,
    );
    debug!(ctx, "connect4 captured cookie={} port={}", cookie, dst_port);
}

#[cgroup_sock_addr(connect6)]
pub fn weir_connect6(ctx: SockAddrContext) -> i32 {
    capture_connect6(&ctx);
    1
}

const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[inline(always)]
fn capture_connect6(ctx: &SockAddrContext) {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol == IPPROTO_UDP {
        capture_dns6(ctx);
        return;
    }
    if sa.protocol != IPPROTO_TCP {
        return;
    }
    // SAFETY: helper valid for cgroup sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: value copied out at once.
    let Some(pod) = (unsafe { ENROLLED_PODS.get(&netns) }).copied() else {
        return;
    };
    let ip6 = sa.user_ip6;
    let dst_port = u16::from_be(sa.user_port as u16);
    let mapped = ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_PREFIX;
    // SAFETY: reading the union's socket pointer; checked for null inside.
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let loopback = if mapped {
        first_octet(ip6[3]) == 127
    } else {
        ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == u32::from_ne_bytes([0, 0, 0, 1])
    };
    let addr = if mapped {
        ipv4(ip6[3])
    } else {
        IpAddr {
            ip: ip6,
            family: AF_INET6,
            _pad: 0,
        }
    };
    let bypass = if is_agent_socket(sk) {
        REASON_AGENT_SOCKET
    } else if loopback {
        REASON_LOOPBACK
    } else if mapped && cidr_excluded(ip6[3]) || !mapped && cidr6_excluded(ip6) {
        REASON_EXCLUDED_CIDR
    } else if !mapped && pod.flags & POD_FLAG_IPV6 == 0 {
        REASON_NO_IPV6_LISTENER
    } else if is_proxy_port(dst_port) {
        REASON_PROXY_PORT
    } else if port_excluded(dst_port, EXCLUDE_OUTBOUND) {
        REASON_EXCLUDED_PORT
    } else {
        REASON_NONE
    };
    if bypass == REASON_AGENT_SOCKET {
        count(counter::CONNECT_AGENT);
        return;
    }
    if bypass != REASON_NONE {
        count(counter::CONNECT_BYPASSED);
        emit(
            netns,
            EVENT_CONNECT,
            VERDICT_BYPASSED,
            bypass,
            addr,
            dst_port,
            IpAddr::default(),
            0,
        );
        return;
    }
    let orig = OrigDst {
        addr,
        port: dst_port,
        _pad: 0,
        netns_cookie: netns,
    };
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIGDST_BY_SOCKET.insert(&cookie, &orig, 0).is_err() {
        count(counter::CONNECT_ERRORS);
        emit(
            netns,
            EVENT_CONNECT,
            VERDICT_ERROR,
            REASON_MAP_FULL,
            addr,
            dst_port,
            IpAddr::default(),
            0,
        );
        return;
    }
    if mapped {
        // A dual-stack socket reaching an IPv4 peer: the IPv4 listener.
        sa.user_ip6 = [0, 0, V4_MAPPED_PREFIX, u32::from_ne_bytes([127, 0, 0, 1])];
    } else {
        sa.user_ip6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
    }
    sa.user_port = u32::from(OUTBOUND_PORT.to_be());
    count(counter::CONNECT_CAPTURED);
    emit(
        netns,
        EVENT_CONNECT,
        VERDICT_CAPTURED,
        REASON_NONE,
        addr,
        dst_port,
        IpAddr::default(),
        0,
    );
}

// ---------------------------------------------------------------------------
// DNS capture (UDP; TCP to port 53 is captured as any TCP is)
// ---------------------------------------------------------------------------

/// The pod (by netns cookie) of a UDP query to port 53 this program should
/// send to the pod's DNS listener: the pod captures DNS, the socket is not
/// the agent's and the port is not excluded.
#[inline(always)]
fn dns_pod(ctx: &SockAddrContext) -> Option<(u64, EnrolledPod)> {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &*ctx.sock_addr };
    // SAFETY: a volatile read, so the verifier sees one load of the field
    // (it refuses the narrower loads the optimiser may split it into).
    let user_port = unsafe { core::ptr::read_volatile(&sa.user_port) };
    if u16::from_be(user_port as u16) != DNS_PORT {
        return None;
    }
    // SAFETY: helper valid for cgroup sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: value copied out at once.
    let pod = (unsafe { ENROLLED_PODS.get(&netns) }).copied()?;
    // SAFETY: reading the union's socket pointer; checked for null inside.
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if pod.flags & POD_FLAG_DNS == 0
        || is_agent_socket(sk)
        || port_excluded(DNS_PORT, EXCLUDE_OUTBOUND)
    {
        return None;
    }
    Some((netns, pod))
}

/// Remembers the resolver a socket asked (by socket cookie: `recvmsg` and
/// `getpeername` show it back, the DNS listener forwards to it); false if
/// the map refused it (the query then goes where it was going).
#[inline(always)]
fn remember_resolver(ctx: &SockAddrContext, netns: u64, addr: IpAddr) -> bool {
    let orig = OrigDst {
        addr,
        port: DNS_PORT,
        _pad: 0,
        netns_cookie: netns,
    };
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIGDST_BY_SOCKET.insert(&cookie, &orig, 0).is_err() {
        count(counter::CONNECT_ERRORS);
        return false;
    }
    count(counter::DNS_CAPTURED);
    true
}

#[inline(always)]
fn capture_dns4(ctx: &SockAddrContext) {
    let Some((netns, _)) = dns_pod(ctx) else {
        return;
    };
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst_ip = sa.user_ip4;
    // A resolver inside the pod (loopback) is the pod's own business.
    if first_octet(dst_ip) == 127 || cidr_excluded(dst_ip) {
        return;
    }
    if remember_resolver(ctx, netns, ipv4(dst_ip)) {
        sa.user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
        sa.user_port = u32::from(DNS_LISTENER_PORT.to_be());
    }
}

#[inline(always)]
fn capture_dns6(ctx: &SockAddrContext) {
    let Some((netns, pod)) = dns_pod(ctx) else {
        return;
    };
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip6 = sa.user_ip6;
    let mapped = ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_PREFIX;
    let (addr, leave) = if mapped {
        (
            ipv4(ip6[3]),
            first_octet(ip6[3]) == 127 || cidr_excluded(ip6[3]),
        )
    } else {
        let loopback =
            ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == u32::from_ne_bytes([0, 0, 0, 1]);
        (
            IpAddr {
                ip: ip6,
                family: AF_INET6,
                _pad: 0,
            },
            // No IPv6 in the pod: no IPv6 listener either.
            loopback || cidr6_excluded(ip6) || pod.flags & POD_FLAG_IPV6 == 0,
        )
    };
    if leave || !remember_resolver(ctx, netns, addr) {
        return;
    }
    sa.user_ip6 = if mapped {
        [0, 0, V4_MAPPED_PREFIX, u32::from_ne_bytes([127, 0, 0, 1])]
    } else {
        [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
    };
    sa.user_port = u32::from(DNS_LISTENER_PORT.to_be());
}

/// An unconnected UDP socket's `sendto`: the same capture as a connect.
#[cgroup_sock_addr(sendmsg4)]
pub fn weir_sendmsg4(ctx: SockAddrContext) -> i32 {
    capture_dns4(&ctx);
    1
}

#[cgroup_sock_addr(sendmsg6)]
pub fn weir_sendmsg6(ctx: SockAddrContext) -> i32 {
    capture_dns6(&ctx);
    1
}

/// The resolver a captured socket asked, if this datagram is a reply of
/// the pod's DNS listener to it (source port `DNS_LISTENER_PORT`).
#[inline(always)]
fn dns_reply_origin(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &*ctx.sock_addr };
    // SAFETY: see `dns_pod`.
    let user_port = unsafe { core::ptr::read_volatile(&sa.user_port) };
    if u16::from_be(user_port as u16) != DNS_LISTENER_PORT {
        return None;
    }
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: value copied out at once.
    let orig = (unsafe { ORIGDST_BY_SOCKET.get(&cookie) }).copied()?;
    (orig.port == DNS_PORT).then_some(orig)
}

/// A reply's source as the application expects it (glibc drops a reply
/// that does not come from the nameserver it asked).
#[cgroup_sock_addr(recvmsg4)]
pub fn weir_recvmsg4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = dns_reply_origin(&ctx)
        && orig.addr.family == AF_INET
    {
        // SAFETY: the context pointer is valid for the program's run.
        let sa = unsafe { &mut *ctx.sock_addr };
        if first_octet(sa.user_ip4) == 127 {
            sa.user_ip4 = orig.addr.ip[0];
            sa.user_port = u32::from(DNS_PORT.to_be());
            count(counter::DNS_REPLY_REWRITTEN);
        }
    }
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn weir_recvmsg6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = dns_reply_origin(&ctx) {
        // SAFETY: the context pointer is valid for the program's run.
        let sa = unsafe { &mut *ctx.sock_addr };
        let ip6 = sa.user_ip6;
        let from_listener = ip6[0] == 0
            && ip6[1] == 0
            && (ip6[2] == V4_MAPPED_PREFIX && first_octet(ip6[3]) == 127
                || ip6[2] == 0 && ip6[3] == u32::from_ne_bytes([0, 0, 0, 1]));
        if from_listener {
            sa.user_ip6 = if orig.addr.family == AF_INET {
                [0, 0, V4_MAPPED_PREFIX, orig.addr.ip[0]]
            } else {
                orig.addr.ip
            };
            sa.user_port = u32::from(DNS_PORT.to_be());
            count(counter::DNS_REPLY_REWRITTEN);
        }
    }
    1
}

/// The client's own address as the proxy's listener will see it.
#[inline(always)]
fn client_addr(ctx: &SockOpsContext) -> IpAddr {
    if ctx.family() == u32::from(AF_INET6) {
        let ip6 = ctx.local_ip6();
        if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_PREFIX {
            return ipv4(ip6[3]);
        }
        return IpAddr {
            ip: ip6,
            family: AF_INET6,
            _pad: 0,
        };
    }
    ipv4(ctx.local_ip4())
}

#[sock_ops]
pub fn weir_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        record_origdst(&ctx);
    }
    1
}

#[inline(always)]
fn record_origdst(ctx: &SockOpsContext) {
    // SAFETY: helper valid for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: value copied out at once.
    let Some(orig) = (unsafe { ORIGDST_BY_SOCKET.get(&cookie) }).copied() else {
        return;
    };
    let key = ClientKey {
        netns_cookie: orig.netns_cookie,
        addr: client_addr(ctx),
        port: ctx.local_port() as u16,
        _pad: 0,
    };
    if ORIGDST_BY_CLIENT.insert(&key, &orig, 0).is_ok() {
        count(counter::ORIGDST_RECORDED);
    } else {
        count(counter::CONNECT_ERRORS);
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn weir_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: value copied out at once.
    if let Some(orig) = (unsafe { ORIGDST_BY_SOCKET.get(&cookie) }).copied()
        && orig.addr.family == AF_INET
    {
        // SAFETY: the context pointer is valid for the program's run.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = orig.addr.ip[0];
        sa.user_port = u32::from(orig.port.to_be());
        count(counter::PEERNAME_REWRITTEN);
    }
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn weir_getpeername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: value copied out at once.
    if let Some(orig) = (unsafe { ORIGDST_BY_SOCKET.get(&cookie) }).copied() {
        // SAFETY: the context pointer is valid for the program's run.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip6 = if orig.addr.family == AF_INET {
            [0, 0, V4_MAPPED_PREFIX, orig.addr.ip[0]]
        } else {
            orig.addr.ip
        };
        sa.user_port = u32::from(orig.port.to_be());
        count(counter::PEERNAME_REWRITTEN);
    }
    1
}

/// The original destination and enrolled pod of the socket, if it is a
/// captured one.
#[inline(always)]
fn captured_socket_pod(ctx: &SockAddrContext) -> Option<(OrigDst, EnrolledPod)> {
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: values copied out at once.
    let orig = (unsafe { ORIGDST_BY_SOCKET.get(&cookie) }).copied()?;
    let pod = (unsafe { ENROLLED_PODS.get(&orig.netns_cookie) }).copied()?;
    Some((orig, pod))
}

/// A captured socket is bound to the proxy listener's loopback address; the
/// application sees the pod's own address (the source it would have had),
/// with the socket's real port, which the kernel already put there.
#[cgroup_sock_addr(getsockname4)]
pub fn weir_getsockname4(ctx: SockAddrContext) -> i32 {
    if let Some((orig, pod)) = captured_socket_pod(&ctx)
        && orig.addr.family == AF_INET
        && pod.ipv4 != 0
    {
        // SAFETY: the context pointer is valid for the program's run.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = pod.ipv4;
        count(counter::SOCKNAME_REWRITTEN);
    }
    1
}

#[cgroup_sock_addr(getsockname6)]
pub fn weir_getsockname6(ctx: SockAddrContext) -> i32 {
    if let Some((orig, pod)) = captured_socket_pod(&ctx) {
        // A dual-stack socket that reached an IPv4 peer shows the pod's IPv4
        // address, mapped; an IPv6 one the pod's IPv6 address, if it has one
        // (else `::1` stays: there is no truer answer).
        let own = if orig.addr.family == AF_INET {
            (pod.ipv4 != 0).then_some([0, 0, V4_MAPPED_PREFIX, pod.ipv4])
        } else {
            let ip6 = pod.ipv6;
            (ip6[0] | ip6[1] | ip6[2] | ip6[3] != 0).then_some(ip6)
        };
        if let Some(own) = own {
            // SAFETY: the context pointer is valid for the program's run.
            let sa = unsafe { &mut *ctx.sock_addr };
            sa.user_ip6 = own;
            count(counter::SOCKNAME_REWRITTEN);
        }
    }
    1
}

// ---------------------------------------------------------------------------
// Inbound steering
// ---------------------------------------------------------------------------

#[classifier]
pub fn weir_tc_ingress(ctx: TcContext) -> i32 {
    match steer_inbound(&ctx) {
        Ok(Verdict::Drop) => TC_ACT_SHOT,
        // Let later filters on this hook (a CNI's) run whatever we decided.
        _ => TC_ACT_UNSPEC,
    }
}

/// What becomes of a packet to an enrolled pod.
enum Verdict {
    /// Steered, or left to the stack (not new TCP, excluded, not TCP).
    Continue,
    /// Possibly TCP that cannot be steered: it must not reach the pod
    /// around the proxy.
    Drop,
}

/// A packet's TCP header, where TC found it.
struct Segment {
    /// The lookup tuple (addresses and ports, network order) and its length.
    tuple: bpf_sock_tuple,
    tuple_len: u32,
    peer: IpAddr,
    local: IpAddr,
    /// Offset of the TCP header in the packet.
    tcp: usize,
}

#[inline(always)]
fn steer_inbound(ctx: &TcContext) -> Result<Verdict, i64> {
    let ether_type = u16::from_be(ctx.load::<u16>(12)?);
    let segment = if ether_type == ETH_P_IP {
        ipv4_segment(ctx)?
    } else if ether_type == ETH_P_IPV6 {
        ipv6_segment(ctx)?
    } else {
        return Ok(Verdict::Continue);
    };
    match segment {
        Ok(Some(segment)) => steer_segment(ctx, segment),
        Ok(None) => Ok(Verdict::Continue),
        Err((peer, local, reason)) => {
            count(counter::INBOUND_DROPPED);
            emit(0, EVENT_INBOUND, VERDICT_DROPPED, reason, peer, 0, local, 0);
            Ok(Verdict::Drop)
        }
    }
}

/// An IPv4 packet's TCP segment; `Ok(None)` for anything but TCP, `Err`
/// for a TCP fragment (the first fragment's header could be steered, but
/// not what reassembly makes of it; Linux TCP never fragments: DF).
#[inline(always)]
fn ipv4_segment(ctx: &TcContext) -> Result<Result<Option<Segment>, (IpAddr, IpAddr, u8)>, i64> {
    let version_ihl: u8 = ctx.load(ETH_HDR_LEN)?;
    let protocol: u8 = ctx.load(ETH_HDR_LEN + 9)?;
    if u32::from(protocol) != IPPROTO_TCP {
        return Ok(Ok(None));
    }
    let saddr: u32 = ctx.load(ETH_HDR_LEN + 12)?;
    let daddr: u32 = ctx.load(ETH_HDR_LEN + 16)?;
    let frag_off = u16::from_be(ctx.load::<u16>(ETH_HDR_LEN + 6)?);
    if frag_off & IP_MF_AND_OFFSET != 0 {
        return Ok(Err((ipv4(saddr), ipv4(daddr), REASON_FRAGMENT)));
    }
    let tcp = ETH_HDR_LEN + usize::from(version_ihl & 0x0f) * 4;
    // SAFETY: plain old data, all-zero is valid.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    // Writing a union field is safe; only reading one is not.
    tuple.__bindgen_anon_1.ipv4.saddr = saddr;
    tuple.__bindgen_anon_1.ipv4.daddr = daddr;
    tuple.__bindgen_anon_1.ipv4.sport = ctx.load(tcp)?;
    tuple.__bindgen_anon_1.ipv4.dport = ctx.load(tcp + 2)?;
    Ok(Ok(Some(Segment {
        tuple,
        tuple_len: (size_of::<u32>() * 2 + size_of::<u16>() * 2) as u32,
        peer: ipv4(saddr),
        local: ipv4(daddr),
        tcp,
    })))
}

/// An IPv6 packet's TCP segment, found behind its extension headers
/// (`weir_common::ipv6_payload`); `Err` where it may hide one that cannot
/// be steered.
#[inline(always)]
fn ipv6_segment(ctx: &TcContext) -> Result<Result<Option<Segment>, (IpAddr, IpAddr, u8)>, i64> {
    let mut saddr = [0u32; 4];
    let mut daddr = [0u32; 4];
    for i in 0..4 {
        saddr[i] = ctx.load(ETH_HDR_LEN + 8 + i * 4)?;
        daddr[i] = ctx.load(ETH_HDR_LEN + 24 + i * 4)?;
    }
    let peer = IpAddr {
        ip: saddr,
        family: AF_INET6,
        _pad: 0,
    };
    let local = IpAddr {
        ip: daddr,
        family: AF_INET6,
        _pad: 0,
    };
    let tcp = match ipv6_payload(|offset| ctx.load::<[u8; 2]>(ETH_HDR_LEN + offset))? {
        Ipv6Payload::Tcp(offset) => ETH_HDR_LEN + offset,
        Ipv6Payload::Other => return Ok(Ok(None)),
        Ipv6Payload::Unsteerable(reason) => return Ok(Err((peer, local, reason))),
    };
    // SAFETY: plain old data, all-zero is valid.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv6.saddr = saddr;
    tuple.__bindgen_anon_1.ipv6.daddr = daddr;
    tuple.__bindgen_anon_1.ipv6.sport = ctx.load(tcp)?;
    tuple.__bindgen_anon_1.ipv6.dport = ctx.load(tcp + 2)?;
    Ok(Ok(Some(Segment {
        tuple,
        tuple_len: (size_of::<u32>() * 8 + size_of::<u16>() * 2) as u32,
        peer,
        local,
        tcp,
    })))
}

/// Assigns a new connection's SYN to the pod's plaintext listener of its
/// family; everything else of TCP stays with the stack. A SYN that finds
/// no listener (the agent is gone) is dropped: the pod is not reachable
/// around the proxy, whatever its mode, until an agent serves it again.
#[inline(always)]
fn steer_segment(ctx: &TcContext, segment: Segment) -> Result<Verdict, i64> {
    let Segment {
        mut tuple,
        tuple_len,
        peer,
        local,
        tcp,
    } = segment;
    let ipv6 = peer.family == AF_INET6;
    // SAFETY: reading back the ports just written for this family.
    let (sport, dport) = unsafe {
        if ipv6 {
            (
                tuple.__bindgen_anon_1.ipv6.sport,
                tuple.__bindgen_anon_1.ipv6.dport,
            )
        } else {
            (
                tuple.__bindgen_anon_1.ipv4.sport,
                tuple.__bindgen_anon_1.ipv4.dport,
            )
        }
    };
    let flags: u8 = ctx.load(tcp + 13)?;
    let dport_host = u16::from_be(dport);
    let new_connection = flags & TCP_FLAG_SYN != 0 && flags & TCP_FLAG_ACK == 0;
    // Events for new connections only: one per flow, not per packet.
    let inbound_event = |verdict: u8, reason: u8| {
        if new_connection {
            emit(
                0,
                EVENT_INBOUND,
                verdict,
                reason,
                peer,
                u16::from_be(sport),
                local,
                dport_host,
            );
        }
    };
    if is_proxy_port(dport_host) || port_excluded(dport_host, EXCLUDE_INBOUND) {
        count(counter::INBOUND_PASSED);
        let reason = if is_proxy_port(dport_host) {
            REASON_PROXY_PORT
        } else {
            REASON_EXCLUDED_PORT
        };
        inbound_event(VERDICT_BYPASSED, reason);
        return Ok(Verdict::Continue);
    }

    // An existing connection (established, or a handshake in progress) keeps
    // going to its socket: only new connections are steered. `skc` (not `sk`)
    // lookup so a request socket is found and the final ACK is not lost.
    // SAFETY: valid context and tuple; the result is released below.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            tuple_len,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if !sk.is_null() {
        // SAFETY: non-null socket from the lookup, released at once.
        let state = unsafe { (*sk).state };
        unsafe { bpf_sk_release(sk.cast()) };
        if state != TCP_LISTEN {
            count(counter::INBOUND_PASSED);
            return Ok(Verdict::Continue);
        }
    }
    if !new_connection {
        count(counter::INBOUND_PASSED);
        return Ok(Verdict::Continue);
    }

    // Only the listener may match: with the client's address and port, a
    // connection of that client to 15006 itself (in TIME_WAIT after the
    // proxy refused it) would be found instead, and the SYN would reach the
    // application unsteered. The listener of the packet's family:
    // `0.0.0.0:15006` or `[::]:15006`.
    if ipv6 {
        tuple.__bindgen_anon_1.ipv6.dport = INBOUND_PLAINTEXT_PORT.to_be();
        tuple.__bindgen_anon_1.ipv6.saddr = [0; 4];
        tuple.__bindgen_anon_1.ipv6.sport = 0;
    } else {
        tuple.__bindgen_anon_1.ipv4.dport = INBOUND_PLAINTEXT_PORT.to_be();
        tuple.__bindgen_anon_1.ipv4.saddr = 0;
        tuple.__bindgen_anon_1.ipv4.sport = 0;
    }
    // SAFETY: valid context and tuple; the result is released below.
    let listener = unsafe {
        bpf_skc_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            tuple_len,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if listener.is_null() {
        count(counter::INBOUND_ERRORS);
        inbound_event(VERDICT_DROPPED, REASON_NO_LISTENER);
        return Ok(Verdict::Drop);
    }
    // SAFETY: non-null socket from the lookup.
    let state = unsafe { (*listener).state };
    let assigned = if state == TCP_LISTEN {
        // SAFETY: valid context and a referenced socket.
        unsafe { bpf_sk_assign(ctx.as_ptr(), listener.cast(), 0) }
    } else {
        -1
    };
    // SAFETY: releasing the reference taken by the lookup.
    unsafe { bpf_sk_release(listener.cast()) };
    if assigned != 0 {
        count(counter::INBOUND_ERRORS);
        inbound_event(VERDICT_DROPPED, REASON_NO_LISTENER);
        return Ok(Verdict::Drop);
    }
    // The pod's `ip [-6] rule fwmark MARK_LOCAL lookup LOCAL_ROUTE_TABLE`
    // delivers it locally.
    ctx.set_mark(MARK_LOCAL);
    count(counter::INBOUND_STEERED);
    inbound_event(VERDICT_CAPTURED, REASON_NONE);
    debug!(ctx, "tc steered SYN to port {}", dport_host);
    Ok(Verdict::Continue)
}

// ---------------------------------------------------------------------------
// Acceleration between the agent's own sockets
// ---------------------------------------------------------------------------

#[inline(always)]
fn accelerate_enabled() -> bool {
    matches!(SETTINGS.get(0), Some(settings) if settings.accelerate == 1)
}

#[inline(always)]
fn tcp_stats_enabled() -> bool {
    matches!(SETTINGS.get(0), Some(settings) if settings.tcp_stats == 1)
}

/// One word of a program's context, read where it is: volatile, so the
/// compiler never merges the reads of two branches into one load through a
/// computed context pointer (the verifier refuses those).
#[inline(always)]
fn context_word(field: &u32) -> u32 {
    // SAFETY: a reference into the context, valid for the program's run.
    unsafe { core::ptr::read_volatile(field) }
}

#[inline(always)]
fn context_words(field: &[u32; 4]) -> [u32; 4] {
    [
        context_word(&field[0]),
        context_word(&field[1]),
        context_word(&field[2]),
        context_word(&field[3]),
    ]
}

/// The sockhash key of the socket a family's addresses and ports describe;
/// `None` for a family other than IPv4 and IPv6.
#[inline(always)]
fn sock_key(
    family: u32,
    local_ip4: &u32,
    remote_ip4: &u32,
    local_ip6: &[u32; 4],
    remote_ip6: &[u32; 4],
    local_port: &u32,
    remote_port: &u32,
) -> Option<SockKey> {
    let (local_ip, remote_ip) = if family == u32::from(AF_INET) {
        (
            [context_word(local_ip4), 0, 0, 0],
            [context_word(remote_ip4), 0, 0, 0],
        )
    } else if family == u32::from(AF_INET6) {
        (context_words(local_ip6), context_words(remote_ip6))
    } else {
        return None;
    };
    Some(SockKey {
        local_ip,
        remote_ip,
        local_port: context_word(local_port),
        remote_port: u32::from_be(context_word(remote_port)),
        family,
    })
}

/// Attached to the agent's own cgroup only, so application sockets never enter
/// the sockhash (a blocking reader on a sockhash socket can see spurious EAGAIN).
#[sock_ops]
pub fn weir_sockops_accel(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_RTT_CB || op == BPF_SOCK_OPS_RETRANS_CB || op == BPF_SOCK_OPS_STATE_CB {
        record_tcp_stats(&ctx);
        return 1;
    }
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return 1;
    }
    // The callbacks that keep TCP_STATS current, asked for on the sockets
    // the proxy may follow: its network legs, marked MARK_BYPASS (upstream
    // sockets and HBONE tunnels' from pods, and those accepted from the
    // transparent and HBONE listeners). Only followed ones are recorded.
    if tcp_stats_enabled() && telemetry_candidate(&ctx) {
        let _ = ctx.set_cb_flags(
            (BPF_SOCK_OPS_RTT_CB_FLAG | BPF_SOCK_OPS_RETRANS_CB_FLAG | BPF_SOCK_OPS_STATE_CB_FLAG)
                as i32,
        );
    }
    if !accelerate_enabled() {
        return 1;
    }
    // SAFETY: the context pointer is valid for the program's run.
    let fields = unsafe { &*ctx.ops };
    let Some(key) = sock_key(
        ctx.family(),
        &fields.local_ip4,
        &fields.remote_ip4,
        &fields.local_ip6,
        &fields.remote_ip6,
        &fields.local_port,
        &fields.remote_port,
    ) else {
        return 1;
    };
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // Only upstream sockets; inbound delivery sockets (MARK_LOCAL) share
        // their 4-tuple with the upstream socket in the client's namespace.
        // SAFETY: reading the union's socket pointer; checked below.
        let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
        if sk.is_null() {
            return 1;
        }
        // SAFETY: non-null socket pointer handed to us by the kernel.
        if unsafe { (*sk).mark } != MARK_BYPASS {
            return 1;
        }
    } else if key.local_port == u32::from(OUTBOUND_PORT) {
        // The app-facing leg of the outbound listener: its peer is an app socket.
        return 1;
    }
    // A new connection may reuse the 4-tuple of an old one.
    let _ = ACCEL_TCP_ONLY.remove(&key);
    // SAFETY: the context pointer is a valid bpf_sock_ops.
    let ops = unsafe { &mut *ctx.ops };
    let mut key = key;
    if ACCEL_SOCKETS.update(&mut key, ops, 0).is_ok() {
        count(counter::ACCEL_SOCKETS_ADDED);
    }
    1
}

/// A socket whose kernel figures the proxy may take (see the caller).
#[inline(always)]
fn telemetry_candidate(ctx: &SockOpsContext) -> bool {
    // SAFETY: reading the union's socket pointer; checked below.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: non-null socket pointer handed to us by the kernel.
    unsafe { (*sk).mark == MARK_BYPASS }
}

/// Copies what the kernel knows of the connection into its TCP_STATS
/// entry, if the proxy follows it.
#[inline(always)]
fn record_tcp_stats(ctx: &SockOpsContext) {
    // SAFETY: helper valid for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(stats) = TCP_STATS.get_ptr_mut(&cookie) else {
        return;
    };
    // SAFETY: the context pointer is valid for the program's run.
    let ops = unsafe { &*ctx.ops };
    // SAFETY: a map value the kernel keeps alive for the program's run;
    // a torn read by the agent at worst mixes two samples.
    let stats = unsafe { &mut *stats };
    stats.srtt_us = ops.srtt_us >> 3;
    stats.min_rtt_us = ops.rtt_min;
    stats.total_retrans = ops.total_retrans;
    stats.snd_cwnd = ops.snd_cwnd;
    stats.segs_in = ops.segs_in;
    stats.segs_out = ops.segs_out;
    stats.bytes_acked = ops.bytes_acked;
    stats.bytes_received = ops.bytes_received;
    stats.samples = stats.samples.wrapping_add(1);
}

#[sk_msg]
pub fn weir_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's run.
    let msg = unsafe { &*ctx.msg };
    let Some(own) = sock_key(
        context_word(&msg.family),
        &msg.local_ip4,
        &msg.remote_ip4,
        &msg.local_ip6,
        &msg.remote_ip6,
        &msg.local_port,
        &msg.remote_port,
    ) else {
        return sk_action::SK_PASS;
    };
    // SAFETY: value only tested for presence.
    if unsafe { ACCEL_TCP_ONLY.get(&own) }.is_some() {
        count(counter::ACCEL_PASSED);
        return sk_action::SK_PASS;
    }
    let mut peer = own.reversed();
    let verdict = ACCEL_SOCKETS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS));
    if verdict == i64::from(sk_action::SK_PASS) {
        count(counter::ACCEL_REDIRECTED);
    } else {
        // No peer socket here: this direction stays on TCP from now on.
        let _ = ACCEL_TCP_ONLY.insert(&own, &1u8, 0);
        count(counter::ACCEL_PASSED);
    }
    sk_action::SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
