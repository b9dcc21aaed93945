//! Enrolling a pod (ambient: no restart, nothing changed in its processes):
//! listeners created inside its namespace, the inbound classifier on its
//! interface, a local route for steered traffic, and finally its namespace
//! cookie in the enrolled-pods map. Releasing undoes each step.
use std::{net::SocketAddr, sync::Arc};

use aya::programs::tc::SchedClassifierLinkId;
use tokio::task::JoinHandle;
use weir_common::{
    EnrolledPod, INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, LOCAL_ROUTE_TABLE,
    LOCAL_RULE_PRIORITY, MARK_BYPASS, MARK_LOCAL, OUTBOUND_PORT, POD_FLAG_IPV6,
};

use crate::{
    config::{MeshMode, PodConfig},
    datapath::Datapath,
    identity::Identity,
    netns::NetNs,
    proxy::{PodHandle, ProxyContext, hbone, inbound, outbound, socket},
};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error("creating listener {addr} in the pod: {source}")]
    Listener {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Datapath(#[from] crate::datapath::DatapathError),
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

/// The route and rule steered packets need, and `tcp_fwmark_accept` so the
/// application's replies to a delivery socket carry MARK_LOCAL (and so follow
/// the rule back to the proxy instead of out of the pod).
fn install_routing(netns: &NetNs) -> Result<(), EnrollError> {
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
    // Connections queued on a listener that closes (an agent handing over)
    // move to the successor's listener in the same reuseport group instead
    // of being reset. Best effort: the sysctl exists since Linux 5.14.
    if run_in_pod(netns, &["sysctl", "-qw", "net.ipv4.tcp_migrate_req=1"]).is_err() {
        tracing::debug!("net.ipv4.tcp_migrate_req unavailable");
    }
    // The kernel's own replies (a RST from a closed port) carry the mark of
    // the packet they answer, so a hand-off connect to a closed port is
    // refused at once instead of its RST leaving the pod unmarked.
    if run_in_pod(netns, &["sysctl", "-qw", "net.ipv4.fwmark_reflect=1"]).is_err() {
        tracing::debug!("net.ipv4.fwmark_reflect unavailable");
    }
    run_in_pod(netns, &["sysctl", "-qw", "net.ipv4.tcp_fwmark_accept=1"]).or_else(|_| {
        run_in_pod(
            netns,
            &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/tcp_fwmark_accept"],
        )
    })
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

fn ipv4_word(ip: std::net::IpAddr) -> u32 {
    match ip {
        std::net::IpAddr::V4(ip) => u32::from_ne_bytes(ip.octets()),
        std::net::IpAddr::V6(_) => 0,
    }
}

fn ifindex(netns: &NetNs, home: &NetNs, interface: &str) -> u32 {
    let name = std::ffi::CString::new(interface).unwrap_or_default();
    // SAFETY: if_nametoindex reads a valid C string.
    netns
        .run(home, || unsafe { libc::if_nametoindex(name.as_ptr()) })
        .unwrap_or(0)
}

/// Enrolls one pod. On error, whatever was set up is undone.
pub fn enroll(
    config: &PodConfig,
    trust_domain: &str,
    context: &Arc<ProxyContext>,
    datapath: &mut Datapath,
) -> Result<Enrollment, EnrollError> {
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
    match finish_enroll(&mut enrollment, listeners, ifindex, context, datapath) {
        Ok(()) => Ok(enrollment),
        Err(error) => {
            release(enrollment, context, datapath);
            Err(error)
        }
    }
}

fn finish_enroll(
    enrollment: &mut Enrollment,
    listeners: PodListeners,
    ifindex: u32,
    context: &Arc<ProxyContext>,
    datapath: &mut Datapath,
) -> Result<(), EnrollError> {
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
    enrollment.tasks.push(tokio::spawn(outbound::serve(
        context.clone(),
        pod.clone(),
        outbound4,
    )));
    let mut flags = 0;
    if let Some(listener) = listeners.outbound6 {
        let listener = to_tokio(
            listener,
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, OUTBOUND_PORT)),
        )?;
        enrollment.tasks.push(tokio::spawn(outbound::serve(
            context.clone(),
            pod.clone(),
            listener,
        )));
        flags |= POD_FLAG_IPV6;
    }
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

    install_routing(&pod.netns)?;
    enrollment.routing_installed = true;

    let interface = enrollment.config.interface.clone();
    let link = pod.netns.run(home, || datapath.attach_tc(&interface))??;
    enrollment.tc_link = Some(link);

    // Last: from here on, connects in the pod are captured.
    datapath.enroll(
        pod.netns_cookie,
        EnrolledPod {
            ipv4: ipv4_word(pod.ip),
            ifindex,
            flags,
            _pad: 0,
        },
    )?;
    enrollment.in_map = true;
    context
        .local_pods
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(pod.ip, pod.clone());
    Ok(())
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
        pod,
        tc_link,
        tasks,
        routing_installed,
        in_map,
        ..
    } = enrollment;
    context
        .local_pods
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&pod.ip);
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
    for task in tasks {
        task.abort();
    }
}
