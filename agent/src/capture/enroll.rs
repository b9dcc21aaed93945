//! Enrolling a pod (ambient: no restart, nothing changed in its processes):
//! listeners created inside its namespace, the inbound classifier on its
//! interface, a local route for steered traffic, and finally its namespace
//! cookie in the enrolled-pods map. Releasing undoes each step.
use std::{net::SocketAddr, sync::Arc};

use aya::programs::tc::SchedClassifierLinkId;
use tokio::task::JoinHandle;
use weir_common::{
    EnrolledPod, INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, LOCAL_ROUTE_TABLE,
    LOCAL_RULE_PRIORITY, MARK_BYPASS, MARK_LOCAL, OUTBOUND_PORT, POD_FLAG_IPV6, PodRestore,
    RESTORE_CLSACT_CREATED, RESTORE_FWMARK_REFLECT, RESTORE_TCP_FWMARK_ACCEPT,
    RESTORE_TCP_MIGRATE_REQ,
};

use crate::{
    capture::datapath::Datapath,
    capture::netns::NetNs,
    config::{MeshMode, PodConfig},
    proxy::{PodHandle, ProxyContext, hbone, inbound, outbound, socket},
    security::identity::Identity,
};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Netns(#[from] crate::capture::netns::NetnsError),
    #[error("creating listener {addr} in the pod: {source}")]
    Listener {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Datapath(#[from] crate::capture::datapath::DatapathError),
    #[error("`{command}` in the pod failed: {message}")]
    Command { command: String, message: String },
}

/// Everything enrollment set up for one pod, so release can undo it.
pub struct Enrollment {
    pub config: PodConfig,
    pub pod: Arc<PodHandle>,
    tc_link: Option<SchedClassifierLinkId>,
    tasks: Vec<JoinHandle<()>>,
    routing_installed: bool,
    in_map: bool,
}

struct PodListeners {
    outbound4: std::net::TcpListener,
    outbound6: Option<std::net::TcpListener>,
    inbound: std::net::TcpListener,
    hbone: std::net::TcpListener,
}

fn create_listeners() -> Result<PodListeners, EnrollError> {
    let listen = |addr: SocketAddr, transparent: bool, mark: Option<u32>| {
        socket::listener(addr, transparent, mark)
            .map_err(|source| EnrollError::Listener { addr, source })
    };
    let outbound4 = listen(
        SocketAddr::from(([127, 0, 0, 1], OUTBOUND_PORT)),
        false,
        None,
    )?;
    // IPv6 capture only where the pod has ::1 (IPv6 may be disabled).
    let outbound6 = listen(
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, OUTBOUND_PORT)),
        false,
        None,
    )
    .ok();
    // The transparent listeners carry MARK_BYPASS so their accepted sockets
    // (which inherit it) are routed normally, not by the MARK_LOCAL rule.
    let inbound = listen(
        SocketAddr::from(([0, 0, 0, 0], INBOUND_PLAINTEXT_PORT)),
        true,
        Some(MARK_BYPASS),
    )?;
    let hbone = listen(
        SocketAddr::from(([0, 0, 0, 0], INBOUND_HBONE_PORT)),
        true,
        Some(MARK_BYPASS),
    )?;
    Ok(PodListeners {
        outbound4,
        outbound6,
        inbound,
        hbone,
    })
}

fn run_in_pod(netns: &NetNs, args: &[&str]) -> Result<(), EnrollError> {
    let output = netns
        .command(args[0])
        .args(&args[1..])
        .output()
        .map_err(|error| EnrollError::Command {
            command: args.join(" "),
            message: error.to_string(),
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(EnrollError::Command {
            command: args.join(" "),
            message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
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

const POD_SYSCTLS: [PodSysctl; 3] = [
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
/// the record its predecessor made).
fn record_sysctls(
    pod: &PodHandle,
    home: &NetNs,
    datapath: &mut Datapath,
) -> Result<(), EnrollError> {
    let before = pod
        .netns
        .run(home, || POD_SYSCTLS.map(|sysctl| read_sysctl(sysctl.path)))?;
    let recorded = datapath
        .restore_record(pod.netns_cookie)
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
    datapath.update_restore_record(pod.netns_cookie, |record| {
        for (sysctl, value) in new {
            record.flags |= sysctl.bit;
            *(sysctl.field)(record) = value;
        }
    })?;
    Ok(())
}

/// The route and rule steered packets need, and the pod sysctls above. What
/// the sysctls were is recorded first (a full record map fails enrollment
/// before anything changed), so release can put them back.
fn install_routing(
    pod: &PodHandle,
    home: &NetNs,
    datapath: &mut Datapath,
) -> Result<(), EnrollError> {
    record_sysctls(pod, home, datapath)?;
    let netns = &pod.netns;
    let table = LOCAL_ROUTE_TABLE.to_string();
    let priority = LOCAL_RULE_PRIORITY.to_string();
    let mark = format!("{MARK_LOCAL:#x}");
    run_in_pod(
        netns,
        &[
            "ip",
            "route",
            "replace",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            &table,
        ],
    )?;
    // Idempotent, never removed first: an agent adopting the pod from an
    // earlier one must not open a gap where replies miss the rule.
    let rule = [
        "ip", "rule", "add", "pref", &priority, "fwmark", &mark, "lookup", &table,
    ];
    if !rule_present(netns, &priority, &mark) {
        run_in_pod(netns, &rule)?;
    }
    let written = netns.run(home, || {
        POD_SYSCTLS.map(|sysctl| write_sysctl(sysctl.path, 1))
    })?;
    for (sysctl, result) in POD_SYSCTLS.iter().zip(written) {
        match result {
            Ok(()) => {}
            Err(error) if sysctl.required => {
                return Err(EnrollError::Command {
                    command: format!("writing /proc/sys/{} = 1", sysctl.path),
                    message: error.to_string(),
                });
            }
            Err(error) => tracing::debug!(sysctl = sysctl.path, %error, "sysctl unavailable"),
        }
    }
    Ok(())
}

/// Whether the pod already has our rule (at our priority, for our mark).
fn rule_present(netns: &NetNs, priority: &str, mark: &str) -> bool {
    netns
        .command("ip")
        .args(["rule", "show", "pref", priority])
        .output()
        .map(|output| {
            let text = String::from_utf8_lossy(&output.stdout);
            text.lines()
                .any(|line| line.contains(mark) && line.contains(&LOCAL_ROUTE_TABLE.to_string()))
        })
        .unwrap_or(false)
}

fn remove_routing(netns: &NetNs) {
    let table = LOCAL_ROUTE_TABLE.to_string();
    let priority = LOCAL_RULE_PRIORITY.to_string();
    let _ = run_in_pod(netns, &["ip", "rule", "del", "pref", &priority]);
    let _ = run_in_pod(netns, &["ip", "route", "flush", "table", &table]);
}

/// Puts back the sysctls `record` holds (values from before the pod's first
/// enrollment); the others were never changed, or not by Weir.
fn restore_sysctls(pod: &PodHandle, home: &NetNs, record: &PodRestore) {
    let mut record = *record;
    let restored = pod.netns.run(home, || {
        let mut results = Vec::new();
        for sysctl in &POD_SYSCTLS {
            if record.flags & sysctl.bit != 0 {
                let value = *(sysctl.field)(&mut record);
                results.push((sysctl.path, write_sysctl(sysctl.path, value)));
            }
        }
        results
    });
    match restored {
        Ok(results) => {
            for (path, result) in results {
                if let Err(error) = result {
                    tracing::warn!(pod = %pod.id, sysctl = path, %error, "restoring a sysctl");
                }
            }
        }
        Err(error) => {
            tracing::debug!(pod = %pod.id, %error, "pod namespace gone; nothing to restore");
        }
    }
}

/// Removes the `clsact` qdisc Weir added to the pod's interface, once no
/// filter is left on it: one another program attached since (a CNI's) keeps
/// it, with its filters.
fn remove_clsact(netns: &NetNs, interface: &str) {
    let filters = |direction: &str| {
        netns
            .command("tc")
            .args(["filter", "show", "dev", interface, direction])
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    match (filters("ingress"), filters("egress")) {
        (Some(ingress), Some(egress)) if ingress.is_empty() && egress.is_empty() => {
            if let Err(error) =
                run_in_pod(netns, &["tc", "qdisc", "del", "dev", interface, "clsact"])
            {
                tracing::warn!(interface, %error, "removing the clsact qdisc Weir added");
            }
        }
        (Some(_), Some(_)) => {
            tracing::info!(interface, "leaving the clsact qdisc: other filters use it");
        }
        // The namespace or interface is gone, and the qdisc with it.
        _ => {}
    }
}

fn ipv4_word(ip: std::net::IpAddr) -> u32 {
    match ip {
        std::net::IpAddr::V4(ip) => u32::from_ne_bytes(ip.octets()),
        std::net::IpAddr::V6(_) => 0,
    }
}

/// The pod's own IPv6 address as network-order words (zero if none): its
/// configured IP if that is IPv6, else the first global address on its
/// interface (what the kernel would pick as the source of its connects).
fn ipv6_words(pod: &PodHandle, home: &NetNs, interface: &str) -> [u32; 4] {
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
    if let std::net::IpAddr::V6(ip) = pod.ip {
        return words(ip);
    }
    // `thread-self`: the namespace this thread has entered, not the agent's.
    let table = pod
        .netns
        .run(home, || {
            std::fs::read_to_string("/proc/thread-self/net/if_inet6")
        })
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
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

fn ifindex(netns: &NetNs, home: &NetNs, interface: &str) -> u32 {
    let name = std::ffi::CString::new(interface).unwrap_or_default();
    // SAFETY: if_nametoindex reads a valid C string.
    netns
        .run(home, || unsafe { libc::if_nametoindex(name.as_ptr()) })
        .unwrap_or(0)
}

/// A pod whose inbound side is up (listeners, routing, classifier; a
/// hand-off target among the local pods) but whose own connects are not
/// captured yet: [`Prepared::capture`] finishes its enrollment.
pub struct Prepared {
    enrollment: Enrollment,
    outbound4: tokio::net::TcpListener,
    outbound6: Option<tokio::net::TcpListener>,
    ifindex: u32,
}

/// Enrolling is two-phase so that a batch of pods (the agent's start, a
/// reconcile) brings up every pod's inbound side before any pod's capture:
/// a captured connect to a pod of the batch then never finds that pod's
/// listeners missing. Phase one for one pod; on error whatever was set up
/// is undone.
pub fn prepare(
    config: &PodConfig,
    trust_domain: &str,
    context: &Arc<ProxyContext>,
    datapath: &mut Datapath,
) -> Result<Prepared, EnrollError> {
    let home = &context.home;
    let netns = NetNs::open(&config.netns)?;
    let netns_cookie = netns.cookie(home)?;
    let listeners = netns.run(home, create_listeners)??;
    let ifindex = ifindex(&netns, home, &config.interface);
    let pod = Arc::new(PodHandle {
        id: config.id(),
        netns,
        netns_cookie,
        ip: config.ip,
        identity: Identity::new(trust_domain, &config.namespace, &config.service_account),
        namespace: config.namespace.clone(),
        authorization_policies: config.authorization_policies.clone(),
        strict: config.mesh_mode == MeshMode::Strict,
    });
    let mut enrollment = Enrollment {
        config: config.clone(),
        pod: pod.clone(),
        tc_link: None,
        tasks: Vec::new(),
        routing_installed: false,
        in_map: false,
    };
    match finish_enroll(&mut enrollment, listeners, context, datapath) {
        Ok((outbound4, outbound6)) => Ok(Prepared {
            enrollment,
            outbound4,
            outbound6,
            ifindex,
        }),
        Err(error) => {
            release(enrollment, context, datapath);
            Err(error)
        }
    }
}

type OutboundListeners = (tokio::net::TcpListener, Option<tokio::net::TcpListener>);

/// Phase one's work: the inbound side served, the outbound listeners
/// returned unserved (connects queue in their backlog should capture be on
/// already, as after an earlier run's pins are adopted).
fn finish_enroll(
    enrollment: &mut Enrollment,
    listeners: PodListeners,
    context: &Arc<ProxyContext>,
    datapath: &mut Datapath,
) -> Result<OutboundListeners, EnrollError> {
    let pod = enrollment.pod.clone();
    let home = &context.home;
    let to_tokio = |listener: std::net::TcpListener, addr: SocketAddr| {
        tokio::net::TcpListener::from_std(listener)
            .map_err(|source| EnrollError::Listener { addr, source })
    };
    let outbound4 = to_tokio(
        listeners.outbound4,
        SocketAddr::from(([127, 0, 0, 1], OUTBOUND_PORT)),
    )?;
    let outbound6 = listeners
        .outbound6
        .map(|listener| {
            to_tokio(
                listener,
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, OUTBOUND_PORT)),
            )
        })
        .transpose()?;
    let inbound_listener = to_tokio(
        listeners.inbound,
        SocketAddr::from(([0, 0, 0, 0], INBOUND_PLAINTEXT_PORT)),
    )?;
    enrollment.tasks.push(tokio::spawn(inbound::serve(
        context.clone(),
        pod.clone(),
        inbound_listener,
    )));
    let hbone_listener = to_tokio(
        listeners.hbone,
        SocketAddr::from(([0, 0, 0, 0], INBOUND_HBONE_PORT)),
    )?;
    enrollment.tasks.push(tokio::spawn(hbone::serve(
        context.clone(),
        pod.clone(),
        hbone_listener,
    )));

    install_routing(&pod, home, datapath)?;
    enrollment.routing_installed = true;

    let interface = enrollment.config.interface.clone();
    let link = pod
        .netns
        .run(home, || datapath.attach_tc(&interface, pod.netns_cookie))??;
    enrollment.tc_link = Some(link);

    // Hand-offs from other pods may target it from here on: all they need
    // is its routing.
    context
        .local_pods
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(pod.ip, pod.clone());
    Ok((outbound4, outbound6))
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
    /// captured). On error the pod is released.
    pub fn capture(
        self,
        context: &Arc<ProxyContext>,
        datapath: &mut Datapath,
    ) -> Result<Enrollment, EnrollError> {
        let Prepared {
            mut enrollment,
            outbound4,
            outbound6,
            ifindex,
        } = self;
        let pod = enrollment.pod.clone();
        enrollment.tasks.push(tokio::spawn(outbound::serve(
            context.clone(),
            pod.clone(),
            outbound4,
        )));
        let mut flags = 0;
        if let Some(listener) = outbound6 {
            enrollment.tasks.push(tokio::spawn(outbound::serve(
                context.clone(),
                pod.clone(),
                listener,
            )));
            flags |= POD_FLAG_IPV6;
        }
        let entry = EnrolledPod {
            ipv4: ipv4_word(pod.ip),
            ifindex,
            flags,
            _pad: 0,
            ipv6: ipv6_words(&pod, &context.home, &enrollment.config.interface),
        };
        match datapath.enroll(pod.netns_cookie, entry) {
            Ok(()) => {
                enrollment.in_map = true;
                Ok(enrollment)
            }
            Err(error) => {
                release(enrollment, context, datapath);
                Err(error.into())
            }
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

/// Releases a pod: capture stops first (map entry), then the classifier,
/// routing and listeners go. Connections already proxied run to their end.
pub fn release(enrollment: Enrollment, context: &ProxyContext, datapath: &mut Datapath) {
    let Enrollment {
        config,
        pod,
        tc_link,
        tasks,
        routing_installed,
        in_map,
    } = enrollment;
    context
        .local_pods
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&pod.ip);
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
    let mut tc_link = tc_link;
    if tc_link.is_some() {
        let detached = pod.netns.run(&context.home, || {
            tc_link.take().map(|link| datapath.detach_tc(link))
        });
        match detached {
            Ok(Some(Err(error))) => {
                tracing::warn!(pod = %pod.id, %error, "detaching the inbound classifier");
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(pod = %pod.id, %error, "pod namespace unreachable; forgetting its classifier");
            }
        }
        if let Some(link) = tc_link {
            datapath.forget_tc(link);
        }
    }
    if routing_installed {
        remove_routing(&pod.netns);
    }
    if let Some(record) = restore {
        if record.flags & RESTORE_CLSACT_CREATED != 0 {
            remove_clsact(&pod.netns, &config.interface);
        }
        restore_sysctls(&pod, &context.home, &record);
        datapath.forget_restore_record(pod.netns_cookie);
    }
    for task in tasks {
        task.abort();
    }
}
