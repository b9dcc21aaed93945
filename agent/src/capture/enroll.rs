//! Enrolling a pod (ambient: no restart, nothing changed in its processes):
//! listeners created inside its namespace, the inbound classifier on its
//! interface, a local route for steered traffic, and finally its namespace
//! cookie in the enrolled-pods map. Releasing undoes each step.
//!
//! The work inside a pod's namespace (setns, netlink, sysctls, sockets) runs
//! on blocking worker threads, [`WORKERS`] pods at once, so the agent's async
//! threads never wait on it; they only serve the listeners and write the
//! enrolled-pods map.
use std::{net::SocketAddr, sync::Arc};

use futures_util::{StreamExt as _, stream::FuturesUnordered};
use netlink_packet_route::AddressFamily;
use tokio::task::JoinHandle;
use weir_common::{
    DNS_LISTENER_PORT, EnrolledPod, INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, LOCAL_ROUTE_TABLE,
    LOCAL_RULE_PRIORITY, MARK_BYPASS, MARK_LOCAL, OUTBOUND_PORT, POD_FLAG_DNS, POD_FLAG_IPV6,
    PodRestore, RESTORE_CLSACT_CREATED, RESTORE_FWMARK_REFLECT, RESTORE_IPV6_FWMARK_REFLECT,
    RESTORE_TCP_FWMARK_ACCEPT, RESTORE_TCP_MIGRATE_REQ,
};

use crate::{
    capture::datapath::{Datapath, PodDatapath, TcFilter},
    capture::netlink::{self, CLSACT_EGRESS, CLSACT_INGRESS, RouteSocket},
    capture::netns::{self, NetNs, NetnsError},
    config::{MeshMode, PodConfig},
    proxy::{PodHandle, ProxyContext, hbone, inbound, outbound, socket},
    security::identity::Identity,
};

/// Pods whose namespace work runs at once. The kernel serialises route,
/// rule and qdisc changes (RTNL), so more threads would mostly wait.
pub const WORKERS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("creating listener {addr} in the pod: {source}")]
    Listener {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Datapath(#[from] crate::capture::datapath::DatapathError),
    /// A netlink request in the pod, named as `ip` would write it.
    #[error("{operation} in the pod failed: {source}")]
    Netlink {
        operation: String,
        source: std::io::Error,
    },
    #[error("writing /proc/sys/{path} = 1 in the pod failed: {source}")]
    Sysctl {
        path: &'static str,
        source: std::io::Error,
    },
    /// The worker thread doing the pod's namespace work panicked.
    #[error("enrollment worker failed: {0}")]
    Worker(String),
}

fn netlink_error(operation: impl Into<String>) -> impl FnOnce(std::io::Error) -> EnrollError {
    let operation = operation.into();
    move |source| EnrollError::Netlink { operation, source }
}

/// A failed enrollment step, with whatever the pod had set up by then (to
/// release before the pod is retried).
pub struct EnrollFailure {
    pub error: EnrollError,
    pub partial: Option<Enrollment>,
}

impl From<EnrollError> for Box<EnrollFailure> {
    fn from(error: EnrollError) -> Self {
        Box::new(EnrollFailure {
            error,
            partial: None,
        })
    }
}

/// Everything enrollment set up for one pod, so release can undo it.
pub struct Enrollment {
    pub config: PodConfig,
    pub pod: Arc<PodHandle>,
    tc_filter: Option<TcFilter>,
    tasks: Vec<JoinHandle<()>>,
    routing_installed: bool,
    in_map: bool,
}

/// A pod's listeners in one address family.
struct FamilyListeners {
    outbound: std::net::TcpListener,
    inbound: std::net::TcpListener,
    hbone: std::net::TcpListener,
    /// The DNS listener, where the pod's DNS is captured.
    dns: Option<std::net::UdpSocket>,
}

struct PodListeners {
    ipv4: FamilyListeners,
    /// `None` where IPv6 is off in the pod (no `::1`): nothing reaches it
    /// over IPv6 then, and its connects cannot use IPv6 either.
    ipv6: Option<FamilyListeners>,
}

/// The addresses of a family's listeners: outbound on loopback, the
/// transparent inbound ones on every address.
fn listener_addresses(ipv6: bool) -> [SocketAddr; 3] {
    let (loopback, any): (std::net::IpAddr, std::net::IpAddr) = if ipv6 {
        (
            std::net::Ipv6Addr::LOCALHOST.into(),
            std::net::Ipv6Addr::UNSPECIFIED.into(),
        )
    } else {
        (
            std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::Ipv4Addr::UNSPECIFIED.into(),
        )
    };
    [
        SocketAddr::new(loopback, OUTBOUND_PORT),
        SocketAddr::new(any, INBOUND_PLAINTEXT_PORT),
        SocketAddr::new(any, INBOUND_HBONE_PORT),
    ]
}

fn create_listeners(dns: bool) -> Result<PodListeners, EnrollError> {
    let listen = |addr: SocketAddr, transparent: bool, mark: Option<u32>| {
        socket::listener(addr, transparent, mark)
            .map_err(|source| EnrollError::Listener { addr, source })
    };
    let dns_listener = |ipv6: bool| {
        let [outbound, _, _] = listener_addresses(ipv6);
        let addr = SocketAddr::new(outbound.ip(), DNS_LISTENER_PORT);
        dns.then(|| socket::udp_listener(addr))
            .transpose()
            .map_err(|source| EnrollError::Listener { addr, source })
    };
    // The transparent listeners carry MARK_BYPASS so their accepted sockets
    // (which inherit it) are routed normally, not by the MARK_LOCAL rule.
    let rest = |outbound: std::net::TcpListener, ipv6: bool| {
        let [_, inbound, hbone] = listener_addresses(ipv6);
        Ok::<_, EnrollError>(FamilyListeners {
            outbound,
            inbound: listen(inbound, true, Some(MARK_BYPASS))?,
            hbone: listen(hbone, true, Some(MARK_BYPASS))?,
            dns: dns_listener(ipv6)?,
        })
    };
    let [outbound4, _, _] = listener_addresses(false);
    let ipv4 = rest(listen(outbound4, false, None)?, false)?;
    // IPv6 only where the pod has ::1 (IPv6 may be disabled there). Where
    // it has, every IPv6 listener must come up: a pod reachable over IPv6
    // without its inbound listeners would be reachable around the mesh.
    let [outbound6, _, _] = listener_addresses(true);
    let ipv6 = match socket::listener(outbound6, false, None) {
        Ok(outbound) => Some(rest(outbound, true)?),
        Err(error) => {
            tracing::debug!(%error, "no IPv6 in the pod; IPv4 only");
            None
        }
    };
    Ok(PodListeners { ipv4, ipv6 })
}

/// A sysctl enrollment sets to 1 in the pod, and where release finds its
/// earlier value.
struct PodSysctl {
    /// Under `/proc/sys`.
    path: &'static str,
    /// `RESTORE_*` bit of the recorded value.
    bit: u32,
    /// Enrollment fails without it (the others are best effort).
    required: bool,
    field: fn(&mut PodRestore) -> &mut i32,
}

const POD_SYSCTLS: [PodSysctl; 4] = [
    // Connections queued on a listener that closes (an agent handing over)
    // move to the successor's listener in the same reuseport group instead
    // of being reset. Linux 5.14 and later.
    PodSysctl {
        path: "net/ipv4/tcp_migrate_req",
        bit: RESTORE_TCP_MIGRATE_REQ,
        required: false,
        field: |record| &mut record.tcp_migrate_req,
    },
    // The kernel's own replies (a RST from a closed port) carry the mark of
    // the packet they answer, so a hand-off connect to a closed port is
    // refused at once instead of its RST leaving the pod unmarked.
    PodSysctl {
        path: "net/ipv4/fwmark_reflect",
        bit: RESTORE_FWMARK_REFLECT,
        required: false,
        field: |record| &mut record.fwmark_reflect,
    },
    // The same for IPv6 (its own switch).
    PodSysctl {
        path: "net/ipv6/fwmark_reflect",
        bit: RESTORE_IPV6_FWMARK_REFLECT,
        required: false,
        field: |record| &mut record.ipv6_fwmark_reflect,
    },
    // The application's replies to a delivery socket carry MARK_LOCAL, and
    // so follow the rule back to the proxy instead of out of the pod.
    PodSysctl {
        path: "net/ipv4/tcp_fwmark_accept",
        bit: RESTORE_TCP_FWMARK_ACCEPT,
        required: true,
        field: |record| &mut record.tcp_fwmark_accept,
    },
];

/// Reads a sysctl of the calling thread's network namespace (`/proc/sys/net`
/// follows the thread's namespace); `None` where the kernel lacks it.
fn read_sysctl(path: &str) -> Option<i32> {
    std::fs::read_to_string(std::path::Path::new("/proc/sys").join(path))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn write_sysctl(path: &str, value: i32) -> std::io::Result<()> {
    std::fs::write(
        std::path::Path::new("/proc/sys").join(path),
        value.to_string(),
    )
}

/// Records the pod's sysctls before their first change by any run of this
/// instance (an agent adopting the pod sees them changed already, and keeps
/// the record its predecessor made). The calling thread is in the pod's
/// namespace.
fn record_sysctls(netns_cookie: u64, pods: &PodDatapath) -> Result<(), EnrollError> {
    let before = POD_SYSCTLS.map(|sysctl| read_sysctl(sysctl.path));
    let recorded = pods
        .restore_record(netns_cookie)
        .map_or(0, |record| record.flags);
    let new: Vec<(&PodSysctl, i32)> = POD_SYSCTLS
        .iter()
        .zip(before)
        .filter(|(sysctl, _)| recorded & sysctl.bit == 0)
        .filter_map(|(sysctl, value)| Some((sysctl, value?)))
        .collect();
    if new.is_empty() {
        return Ok(());
    }
    pods.update_restore_record(netns_cookie, |record| {
        for (sysctl, value) in new {
            record.flags |= sysctl.bit;
            *(sysctl.field)(record) = value;
        }
    })?;
    Ok(())
}

/// The address families enrollment routes in, with how `ip` names them.
fn families(ipv6: bool) -> impl Iterator<Item = (AddressFamily, &'static str, &'static str)> {
    [
        (AddressFamily::Inet, "ip", "0.0.0.0/0"),
        (AddressFamily::Inet6, "ip -6", "::/0"),
    ]
    .into_iter()
    .take(if ipv6 { 2 } else { 1 })
}

/// The route and rule steered packets need (in each family the pod has),
/// and the pod sysctls above. What the sysctls were is recorded first (a
/// full record map fails enrollment before anything changed), so release
/// can put them back. The calling thread is in the pod's namespace.
fn install_routing(netns_cookie: u64, pods: &PodDatapath, ipv6: bool) -> Result<(), EnrollError> {
    record_sysctls(netns_cookie, pods)?;
    let mut socket = RouteSocket::open().map_err(netlink_error("opening a netlink socket"))?;
    let loopback = netlink::interface_index("lo").map_err(netlink_error("finding interface lo"))?;
    for (family, ip, any) in families(ipv6) {
        socket
            .replace_local_default_route(family, LOCAL_ROUTE_TABLE, loopback)
            .map_err(netlink_error(format!(
                "`{ip} route replace local {any} dev lo table {LOCAL_ROUTE_TABLE}`"
            )))?;
        // Idempotent, never removed first: an agent adopting the pod from an
        // earlier one must not open a gap where replies miss the rule.
        let present = socket
            .fwmark_rule_present(family, LOCAL_RULE_PRIORITY, MARK_LOCAL, LOCAL_ROUTE_TABLE)
            .unwrap_or_else(|error| {
                tracing::debug!(%error, "listing the pod's rules; adding ours");
                false
            });
        if !present {
            socket
                .add_fwmark_rule(family, LOCAL_RULE_PRIORITY, MARK_LOCAL, LOCAL_ROUTE_TABLE)
                .map_err(netlink_error(format!(
                    "`{ip} rule add pref {LOCAL_RULE_PRIORITY} fwmark {MARK_LOCAL:#x} lookup {LOCAL_ROUTE_TABLE}`"
                )))?;
        }
    }
    let written = POD_SYSCTLS.map(|sysctl| write_sysctl(sysctl.path, 1));
    for (sysctl, result) in POD_SYSCTLS.iter().zip(written) {
        match result {
            Ok(()) => {}
            Err(source) if sysctl.required => {
                return Err(EnrollError::Sysctl {
                    path: sysctl.path,
                    source,
                });
            }
            Err(error) => tracing::debug!(sysctl = sysctl.path, %error, "sysctl unavailable"),
        }
    }
    Ok(())
}

/// `ip [-6] rule del` and `ip [-6] route flush` of what [`install_routing`]
/// added, in both families (IPv6 may have been turned off since, or an
/// earlier run may have added it); the calling thread is in the pod's
/// namespace. Failures mean it is gone.
fn remove_routing() {
    let Ok(mut socket) = RouteSocket::open() else {
        return;
    };
    for (family, _, _) in families(true) {
        let rule = socket.delete_rule(family, LOCAL_RULE_PRIORITY);
        let removed = socket.flush_table(family, LOCAL_ROUTE_TABLE).and(rule);
        if let Err(error) = removed {
            tracing::debug!(?family, %error, "removing the pod's rule and route");
        }
    }
}

/// Puts back the sysctls `record` holds (values from before the pod's first
/// enrollment); the others were never changed, or not by Weir. The calling
/// thread is in the pod's namespace.
fn restore_sysctls(pod: &PodHandle, record: &PodRestore) {
    let mut record = *record;
    for sysctl in &POD_SYSCTLS {
        if record.flags & sysctl.bit != 0 {
            let value = *(sysctl.field)(&mut record);
            if let Err(error) = write_sysctl(sysctl.path, value) {
                tracing::warn!(pod = %pod.id, sysctl = sysctl.path, %error, "restoring a sysctl");
            }
        }
    }
}

/// Removes the `clsact` qdisc Weir added to the pod's interface, once no
/// filter is left on it: one another program attached since (a CNI's) keeps
/// it, with its filters. The calling thread is in the pod's namespace.
fn remove_clsact(interface: &str) {
    // The interface is gone, and the qdisc with it.
    let Ok(ifindex) = netlink::interface_index(interface) else {
        return;
    };
    let Ok(mut socket) = RouteSocket::open() else {
        return;
    };
    let ingress = socket.filter_count(ifindex, CLSACT_INGRESS).ok();
    let egress = socket.filter_count(ifindex, CLSACT_EGRESS).ok();
    match (ingress, egress) {
        (Some(0), Some(0)) => {
            if let Err(error) = socket.delete_clsact(ifindex) {
                tracing::warn!(interface, %error, "removing the clsact qdisc Weir added");
            }
        }
        (Some(_), Some(_)) => {
            tracing::info!(interface, "leaving the clsact qdisc: other filters use it");
        }
        _ => {}
    }
}

/// The pod's IPv4 address as a network-order word (zero if it has none).
fn ipv4_word(ips: &[std::net::IpAddr]) -> u32 {
    ips.iter()
        .find_map(|ip| match ip {
            std::net::IpAddr::V4(ip) => Some(u32::from_ne_bytes(ip.octets())),
            std::net::IpAddr::V6(_) => None,
        })
        .unwrap_or(0)
}

/// The pod's own IPv6 address as network-order words (zero if none): its
/// configured IPv6 address, else the first global address on its
/// interface (what the kernel would pick as the source of its connects).
/// The calling thread is in the pod's namespace.
fn ipv6_words(ips: &[std::net::IpAddr], interface: &str) -> [u32; 4] {
    let words = |ip: std::net::Ipv6Addr| {
        let octets = ip.octets();
        std::array::from_fn(|i| {
            u32::from_ne_bytes([
                octets[i * 4],
                octets[i * 4 + 1],
                octets[i * 4 + 2],
                octets[i * 4 + 3],
            ])
        })
    };
    if let Some(std::net::IpAddr::V6(ip)) = ips.iter().find(|ip| ip.is_ipv6()) {
        return words(*ip);
    }
    // `thread-self`: the namespace this thread has entered, not the agent's.
    let table = std::fs::read_to_string("/proc/thread-self/net/if_inet6").unwrap_or_default();
    global_ipv6(&table, interface).map_or([0; 4], words)
}

/// The first global-scope, usable IPv6 address of `interface` in an
/// `if_inet6` table (`address ifindex prefix scope flags name`).
fn global_ipv6(table: &str, interface: &str) -> Option<std::net::Ipv6Addr> {
    const SCOPE_GLOBAL: u32 = 0;
    const IFA_F_DEPRECATED: u32 = 0x20;
    const IFA_F_TENTATIVE: u32 = 0x40;
    table.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [address, _, _, scope, flags, name] = fields.as_slice() else {
            return None;
        };
        let scope = u32::from_str_radix(scope, 16).ok()?;
        let flags = u32::from_str_radix(flags, 16).ok()?;
        if *name != interface
            || scope != SCOPE_GLOBAL
            || flags & (IFA_F_DEPRECATED | IFA_F_TENTATIVE) != 0
        {
            return None;
        }
        u128::from_str_radix(address, 16)
            .ok()
            .map(std::net::Ipv6Addr::from)
    })
}

/// What phase one set up inside the pod's namespace once its listeners
/// exist (before, it has changed nothing there).
struct InPod {
    netns_cookie: u64,
    listeners: PodListeners,
    ifindex: u32,
    ipv6: [u32; 4],
    routing_installed: bool,
    tc_filter: Option<TcFilter>,
}

/// The rest of phase one's namespace work, recorded in `in_pod` step by
/// step so that a failure part-way is undone exactly. The calling thread is
/// in the pod's namespace.
fn finish_in_pod(
    config: &PodConfig,
    pods: &PodDatapath,
    in_pod: &mut InPod,
) -> Result<(), EnrollError> {
    let ipv6 = in_pod.listeners.ipv6.is_some();
    if !ipv6 && let Some(ip) = config.ips.iter().find(|ip| ip.is_ipv6()) {
        tracing::warn!(pod = %config.id(), %ip, "the pod lists an IPv6 address but IPv6 is off in its namespace");
    }
    install_routing(in_pod.netns_cookie, pods, ipv6)?;
    in_pod.routing_installed = true;
    in_pod.tc_filter = Some(pods.attach_tc(&config.interface, in_pod.netns_cookie)?);
    in_pod.ipv6 = ipv6_words(&config.ips, &config.interface);
    Ok(())
}

/// A pod whose namespace is set up (listeners, routing, classifier) but
/// whose listeners are not served yet.
struct SetUp {
    enrollment: Enrollment,
    listeners: PodListeners,
    ifindex: u32,
    ipv6: [u32; 4],
}

/// Phase one's blocking part, on a worker thread: the pod's namespace
/// entered once for all of it.
fn set_up(
    config: &PodConfig,
    trust_domain: &str,
    home: &NetNs,
    pods: &PodDatapath,
) -> Result<SetUp, Box<EnrollFailure>> {
    let netns = NetNs::open(&config.netns).map_err(EnrollError::from)?;
    let (in_pod, result) = netns
        .run(home, || -> Result<_, EnrollError> {
            let netns_cookie = netns::current_cookie().map_err(|source| NetnsError::Cookie {
                path: config.netns.clone(),
                source,
            })?;
            let mut in_pod = InPod {
                netns_cookie,
                listeners: create_listeners(config.dns_capture.unwrap_or(true))?,
                ifindex: netlink::interface_index(&config.interface).unwrap_or(0),
                ipv6: [0; 4],
                routing_installed: false,
                tc_filter: None,
            };
            let result = finish_in_pod(config, pods, &mut in_pod);
            Ok((in_pod, result))
        })
        .map_err(EnrollError::from)??;
    let InPod {
        netns_cookie,
        listeners,
        ifindex,
        ipv6,
        routing_installed,
        tc_filter,
    } = in_pod;
    let pod = Arc::new(PodHandle {
        id: config.id().into(),
        netns,
        netns_cookie,
        ips: config.ips.clone(),
        identity: Identity::new(trust_domain, &config.namespace, &config.service_account),
        namespace: config.namespace.clone(),
        authorization_policies: config.authorization_policies.clone(),
        strict: config.mesh_mode == MeshMode::Strict,
        connections: Default::default(),
        dns: config.dns_capture.unwrap_or(true),
    });
    let enrollment = Enrollment {
        config: config.clone(),
        pod,
        tc_filter,
        tasks: Vec::new(),
        routing_installed,
        in_map: false,
    };
    match result {
        Ok(()) => Ok(SetUp {
            enrollment,
            listeners,
            ifindex,
            ipv6,
        }),
        Err(error) => Err(Box::new(EnrollFailure {
            error,
            partial: Some(enrollment),
        })),
    }
}

/// A pod whose inbound side is up (listeners, routing, classifier; a
/// hand-off target among the local pods) but whose own connects are not
/// captured yet: [`Prepared::capture`] finishes its enrollment.
pub struct Prepared {
    enrollment: Enrollment,
    /// Per family (IPv4, then IPv6 where the pod has it).
    outbound: Vec<tokio::net::TcpListener>,
    ifindex: u32,
    ipv6: [u32; 4],
}

/// Enrolling is two-phase so that a batch of pods (the agent's start, a
/// reconcile) brings up every pod's inbound side before any pod's capture:
/// a captured connect to a pod of the batch then never finds that pod's
/// listeners missing. Phase one for one pod: the namespace work on a
/// blocking worker, then its inbound listeners served. On error, what was
/// set up comes back with it, to [`release`].
pub async fn prepare(
    config: PodConfig,
    trust_domain: String,
    context: Arc<ProxyContext>,
    pods: Arc<PodDatapath>,
) -> Result<Prepared, Box<EnrollFailure>> {
    let worker_context = context.clone();
    let set_up = tokio::task::spawn_blocking(move || {
        set_up(&config, &trust_domain, &worker_context.home, &pods)
    })
    .await
    .map_err(|error| EnrollError::Worker(error.to_string()))??;
    serve_inbound(set_up, &context)
}

/// Phase one's async part: the inbound side served, the outbound listeners
/// kept unserved (connects queue in their backlog should capture be on
/// already, as after an earlier run's pins are adopted).
fn serve_inbound(
    set_up: SetUp,
    context: &Arc<ProxyContext>,
) -> Result<Prepared, Box<EnrollFailure>> {
    let SetUp {
        mut enrollment,
        listeners,
        ifindex,
        ipv6,
    } = set_up;
    let pod = enrollment.pod.clone();
    let to_tokio = |listener: std::net::TcpListener, addr: SocketAddr| {
        tokio::net::TcpListener::from_std(listener)
            .map_err(|source| EnrollError::Listener { addr, source })
    };
    let PodListeners { ipv4, ipv6: v6 } = listeners;
    let families = std::iter::once((ipv4, false)).chain(v6.map(|listeners| (listeners, true)));
    let listeners = families
        .map(|(listeners, ipv6)| {
            let [outbound, inbound, hbone] = listener_addresses(ipv6);
            let dns = listeners
                .dns
                .map(|socket| {
                    let addr = SocketAddr::new(outbound.ip(), DNS_LISTENER_PORT);
                    tokio::net::UdpSocket::from_std(socket)
                        .map_err(|source| EnrollError::Listener { addr, source })
                })
                .transpose()?;
            Ok((
                to_tokio(listeners.outbound, outbound)?,
                to_tokio(listeners.inbound, inbound)?,
                to_tokio(listeners.hbone, hbone)?,
                dns,
            ))
        })
        .collect::<Result<Vec<_>, EnrollError>>();
    let listeners = match listeners {
        Ok(listeners) => listeners,
        Err(error) => {
            return Err(Box::new(EnrollFailure {
                error,
                partial: Some(enrollment),
            }));
        }
    };
    let mut outbound = Vec::new();
    for (outbound_listener, inbound_listener, hbone_listener, dns_listener) in listeners {
        if let Some(dns_listener) = dns_listener {
            enrollment.tasks.push(tokio::spawn(crate::dns::serve_udp(
                context.clone(),
                pod.clone(),
                dns_listener,
            )));
        }
        enrollment.tasks.push(tokio::spawn(inbound::serve(
            context.clone(),
            pod.clone(),
            inbound_listener,
        )));
        enrollment.tasks.push(tokio::spawn(hbone::serve(
            context.clone(),
            pod.clone(),
            hbone_listener,
        )));
        outbound.push(outbound_listener);
    }
    // Hand-offs from other pods may target it from here on: all they need
    // is its routing.
    let mut local_pods = context
        .local_pods
        .write()
        .unwrap_or_else(|e| e.into_inner());
    for ip in &pod.ips {
        local_pods.insert(*ip, pod.clone());
    }
    drop(local_pods);
    Ok(Prepared {
        enrollment,
        outbound,
        ifindex,
        ipv6,
    })
}

impl Prepared {
    pub fn config(&self) -> &PodConfig {
        &self.enrollment.config
    }

    pub fn pod(&self) -> &Arc<PodHandle> {
        &self.enrollment.pod
    }

    /// Phase two: the outbound listeners served, then the pod's namespace
    /// cookie in the enrolled-pods map (from here on its connects are
    /// captured). On error the enrollment comes back, to [`release`].
    pub fn capture(
        self,
        context: &Arc<ProxyContext>,
        datapath: &mut Datapath,
    ) -> Result<Enrollment, Box<EnrollFailure>> {
        let Prepared {
            mut enrollment,
            outbound,
            ifindex,
            ipv6,
        } = self;
        let pod = enrollment.pod.clone();
        // The second outbound listener is the IPv6 one.
        let mut flags = if outbound.len() > 1 { POD_FLAG_IPV6 } else { 0 };
        if pod.dns {
            flags |= POD_FLAG_DNS;
        }
        for listener in outbound {
            enrollment.tasks.push(tokio::spawn(outbound::serve(
                context.clone(),
                pod.clone(),
                listener,
            )));
        }
        let entry = EnrolledPod {
            ipv4: ipv4_word(&pod.ips),
            ifindex,
            flags,
            _pad: 0,
            ipv6,
        };
        match datapath.enroll(pod.netns_cookie, entry) {
            Ok(()) => {
                enrollment.in_map = true;
                Ok(enrollment)
            }
            Err(error) => Err(Box::new(EnrollFailure {
                error: error.into(),
                partial: Some(enrollment),
            })),
        }
    }
}

impl Enrollment {
    /// Closes this agent's listeners in the pod (a successor has its own in
    /// the same reuseport groups); connections already accepted go on.
    pub fn stop_listening(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

/// What is left of a release once capture is off: the pod's namespace to
/// put back as it was, on a worker ([`clean_up`]).
pub struct PodCleanup {
    interface: String,
    pod: Arc<PodHandle>,
    tc_filter: Option<TcFilter>,
    routing_installed: bool,
    restore: Option<PodRestore>,
    tasks: Vec<JoinHandle<()>>,
    context: Arc<ProxyContext>,
    pods: Arc<PodDatapath>,
}

/// Releases a pod: capture stops first (map entry, here), then the
/// classifier, routing and listeners go (the returned cleanup, which
/// [`clean_up`] runs). Connections already proxied run to their end.
pub fn release(
    enrollment: Enrollment,
    context: &Arc<ProxyContext>,
    datapath: &mut Datapath,
) -> PodCleanup {
    let Enrollment {
        config,
        pod,
        tc_filter,
        tasks,
        routing_installed,
        in_map,
    } = enrollment;
    let mut local_pods = context
        .local_pods
        .write()
        .unwrap_or_else(|e| e.into_inner());
    for ip in &pod.ips {
        // Only this pod's own entries: a pod enrolled since with one of its
        // addresses keeps it.
        if local_pods
            .get(ip)
            .is_some_and(|listed| Arc::ptr_eq(listed, &pod))
        {
            local_pods.remove(ip);
        }
    }
    drop(local_pods);
    // Read before `unenroll` drops it. An enrollment that failed while an
    // earlier run still serves the pod leaves the pod's state to that run.
    let restore = if in_map || !datapath.is_enrolled(pod.netns_cookie) {
        datapath.restore_record(pod.netns_cookie)
    } else {
        None
    };
    if in_map && let Err(error) = datapath.unenroll(pod.netns_cookie) {
        tracing::warn!(pod = %pod.id, %error, "removing the enrolled-pods entry");
    }
    PodCleanup {
        interface: config.interface,
        pod,
        tc_filter,
        routing_installed,
        restore,
        tasks,
        context: context.clone(),
        pods: datapath.pods(),
    }
}

/// The tcx ingress chain of `interface` in `pod`'s namespace, in the
/// order the kernel runs it ([`super::chain`]). Blocking: enters the pod's
/// namespace.
pub fn tcx_chain(pod: &PodHandle, interface: &str, home: &NetNs) -> Result<Vec<u32>, String> {
    pod.netns
        .run(home, || {
            let ifindex = netlink::interface_index(interface)
                .map_err(|error| format!("{interface}: {error}"))?;
            super::chain::tcx_ingress(ifindex)
                .map_err(|error| format!("{interface}: tcx chain: {error}"))
        })
        .map_err(|error| error.to_string())?
}

impl PodCleanup {
    pub fn pod_id(&self) -> &str {
        &self.pod.id
    }

    /// The release's namespace work, in reverse order of enrollment; the
    /// pod's namespace entered once for all of it. Blocking.
    fn run(self) {
        let PodCleanup {
            interface,
            pod,
            tc_filter,
            routing_installed,
            restore,
            tasks,
            context,
            pods,
        } = self;
        // A pinned link: no namespace needed, and its pin must go even when
        // the pod's namespace is gone.
        if let Some(filter) = tc_filter
            && let Err(error) = filter.detach()
        {
            tracing::warn!(pod = %pod.id, %error, "detaching the inbound classifier");
        }
        let in_pod = pod.netns.run(&context.home, || {
            if routing_installed {
                remove_routing();
            }
            if let Some(record) = &restore {
                if record.flags & RESTORE_CLSACT_CREATED != 0 {
                    remove_clsact(&interface);
                }
                restore_sysctls(&pod, record);
            }
        });
        if let Err(error) = in_pod {
            tracing::debug!(pod = %pod.id, %error, "pod namespace gone; nothing to restore");
        }
        if restore.is_some() {
            pods.forget_restore_record(pod.netns_cookie);
        }
        for task in tasks {
            task.abort();
        }
    }
}

/// Runs release cleanups on blocking workers, [`WORKERS`] at a time, and
/// returns once all are done.
pub async fn clean_up(cleanups: Vec<PodCleanup>) {
    let mut queue = cleanups.into_iter();
    let mut running = FuturesUnordered::new();
    loop {
        while running.len() < WORKERS {
            let Some(cleanup) = queue.next() else {
                break;
            };
            running.push(tokio::task::spawn_blocking(move || cleanup.run()));
        }
        match running.next().await {
            Some(Ok(())) => {}
            Some(Err(error)) => tracing::warn!(%error, "a pod's release worker failed"),
            None => return,
        }
    }
}
