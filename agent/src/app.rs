//! `weir run`: preflight, load the datapath, enroll the configured pods, keep
//! them in step with the config file, and undo everything on exit.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use futures_util::{StreamExt as _, stream::FuturesUnordered};
use tokio::signal::unix::{Signal, SignalKind, signal};
use weir_common::counter;

use tokio::sync::mpsc;

use crate::{
    admin::{ADMIN_ADDRESS, AdminState, METRICS_ADDRESS, READINESS_ADDRESS},
    capture::datapath::{Counters, Datapath, DatapathOptions},
    capture::enroll::{self, Enrollment},
    capture::netns::NetNs,
    capture::preflight,
    config::{Config, DEMO_CONFIG, PodConfig},
    proxy::pool::HbonePool,
    proxy::{ProxyContext, ProxyStats},
    security::identity::{
        BuiltinCa, CertificateAuthority, Identity, IstioCaClient, IstioCaConfig, SecretManager,
    },
    state::Store,
    xds::{XdsSettings, XdsState, XdsUpdate},
};

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    Embedded,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, crate::config::ConfigError> {
        match self {
            ConfigSource::File(path) => Config::load(path),
            ConfigSource::Embedded => Config::parse(DEMO_CONFIG, "embedded demo config"),
        }
    }
}

pub struct RunOptions {
    pub source: ConfigSource,
    /// aya-log level for the programs' own logs (0 off, 4 debug).
    pub bpf_log_level: u8,
    /// How often the config file is checked for changes.
    pub reload_interval: Duration,
}

/// Resolved cgroup paths.
pub struct Cgroups {
    pub pods_parent: PathBuf,
    pub agent: PathBuf,
}

/// Checks the machine and moves the process into its cgroup. Runs before the
/// async runtime starts, so before any socket exists.
pub fn prepare(config: &Config) -> anyhow::Result<Cgroups> {
    preflight::check_capabilities()?;
    preflight::check_btf()?;
    let root = preflight::cgroup2_root()?;
    preflight::ensure_bpffs(&config.bpffs)?;
    match preflight::raise_open_files_limit() {
        Ok(limit) => tracing::debug!(limit, "open descriptors limit"),
        Err(error) => tracing::warn!(%error, "could not raise the open descriptors limit"),
    }
    let pods_parent = config
        .cgroup
        .pods_parent
        .as_deref()
        .map(|path| preflight::resolve_cgroup(&root, path))
        .unwrap_or_else(|| root.clone());
    let stay = config.cgroup.agent.as_deref() == Some(Path::new(crate::config::CURRENT_CGROUP));
    let agent = match config.cgroup.agent.as_deref() {
        _ if stay => preflight::own_cgroup(&root)?,
        Some(path) => preflight::resolve_cgroup(&root, path),
        None => root.join(format!("weir-agent-{}", config.instance)),
    };
    if !pods_parent.is_dir() {
        anyhow::bail!(
            "pods cgroup parent {} does not exist: create it or fix cgroup.pods_parent",
            pods_parent.display()
        );
    }
    preflight::check_cgroup_neighbours(&root, &pods_parent)?;
    if !stay {
        preflight::enter_cgroup(&agent)?;
    }
    Ok(Cgroups { pods_parent, agent })
}

pub async fn run(options: RunOptions, config: Config, cgroups: Cgroups) -> anyhow::Result<()> {
    let home = NetNs::current()?;
    let pin_dir = config.bpffs.join("weir").join(&config.instance);
    let mut datapath = Datapath::load(DatapathOptions {
        pin_dir: pin_dir.clone(),
        pods_parent: cgroups.pods_parent.clone(),
        agent_cgroup: cgroups.agent.clone(),
        capture: &config.capture,
        bpf_log_level: options.bpf_log_level,
    })?;
    if let Some(logger) = datapath.take_logger() {
        tokio::spawn(forward_bpf_logs(logger));
    }
    tokio::spawn(crate::memory::return_freed_memory());
    tracing::info!(
        node = %config.node,
        pins = %pin_dir.display(),
        pods_parent = %cgroups.pods_parent.display(),
        agent_cgroup = %cgroups.agent.display(),
        accelerate = config.capture.accelerate,
        "eBPF programs loaded and attached"
    );

    let secrets = SecretManager::new(
        certificate_authority(&config)?,
        Duration::from_secs(config.ca.cert_ttl_seconds),
        Duration::from_secs(config.ca.keep_unused_seconds),
    );
    let metrics = Arc::new(crate::telemetry::metrics::Metrics::new());
    let tracer =
        crate::telemetry::spans::Tracer::new(&config.tracing, metrics.trace_spans_dropped.clone());
    let store = Arc::new(Store::default());
    store.set_file(&config);
    let limits = crate::proxy::limits::Limits::new(
        crate::proxy::limits::Settings::from(&config.proxy),
        metrics.limits.clone(),
    );
    let context = Arc::new(ProxyContext {
        home,
        origdst: datapath.origdst.clone(),
        stats: ProxyStats::default(),
        secrets,
        store: store.clone(),
        hbone: HbonePool::new(&config.hbone_client),
        local_pods: Default::default(),
        same_node: config.same_node,
        policies: Default::default(),
        placement: crate::state::Placement {
            node: config.node.clone(),
            locality: config.locality.clone(),
            network: config.network.clone(),
            cluster_id: config.cluster_id().to_string(),
        },
        telemetry: Arc::new(crate::telemetry::Telemetry {
            metrics,
            flows: Default::default(),
            access_log: crate::telemetry::access_log::AccessLog::new(&config.access_log),
            spans: tracer,
            kernel_tcp: Some(datapath.tcp_stats.clone()),
        }),
        routes: Default::default(),
        http: Default::default(),
        established: Default::default(),
        limits,
    });
    if let Some(ring) = datapath.take_flow_events() {
        tokio::spawn(crate::telemetry::flows::read_flow_events(
            ring,
            context.clone(),
        ));
    }
    context.policies.replace(&config.policies);
    tokio::spawn(crate::proxy::established::watch(context.clone()));
    context.telemetry.metrics.record_requests.store(
        config.metrics.requests,
        std::sync::atomic::Ordering::Relaxed,
    );
    apply_routes(&context, &config, None);
    // ztunnel's local file, loaded before any pod is enrolled: its policies
    // hold from the first connection, and a file that does not load stops
    // the start, as it stops ztunnel's.
    let local_xds = start_local_xds(&config, &store, &context, options.reload_interval)?;
    let admin = Arc::new(AdminState::default());
    *admin
        .config_source
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = match &options.source {
        ConfigSource::File(path) => format!("file:{}", path.display()),
        ConfigSource::Embedded => "embedded".into(),
    };
    *admin.counters.lock().unwrap_or_else(|e| e.into_inner()) = Some(datapath.counters.clone());
    *admin.pin_dir.lock().unwrap_or_else(|e| e.into_inner()) = Some(pin_dir.clone());
    *admin.pods_parent.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(cgroups.pods_parent.clone());
    let admin_tasks: Vec<tokio::task::JoinHandle<()>> =
        [ADMIN_ADDRESS, READINESS_ADDRESS, METRICS_ADDRESS]
            .into_iter()
            .map(|address| tokio::spawn(serve_admin(address, context.clone(), admin.clone())))
            .collect();
    let mut kube = match &config.kubernetes {
        Some(settings) => Some(
            crate::kubernetes::KubeSource::start(settings, &config.node)
                .await
                .context("starting Kubernetes enrollment")?,
        ),
        None => None,
    };
    let mut node = NodeState {
        enrolled: BTreeMap::new(),
        pending: BTreeMap::new(),
        kube_uids: BTreeMap::new(),
        pruned: false,
        admin: admin.clone(),
        // Before the first enrollment, which can be long: a stop during it
        // is handled, not fatal.
        signals: StopSignals::install()?,
        shadowed: BTreeMap::new(),
        cgroup_ahead: BTreeMap::new(),
    };
    node.reconcile(&config, kube.as_mut(), &context, &mut datapath)
        .await;
    admin
        .config_version
        .store(1, std::sync::atomic::Ordering::Relaxed);
    let xds = match local_xds {
        Some(local) => {
            *admin.xds.lock().unwrap_or_else(|e| e.into_inner()) = Some(local.0.clone());
            Some(local)
        }
        None => start_xds(&config, &admin, &store),
    };
    update_readiness(
        &admin,
        xds.as_ref().map(|(state, _)| &**state),
        kube.as_ref(),
    );
    tracing::info!(
        pods = node.enrolled.len(),
        not_enrolled = node.pending.len(),
        "agent ready"
    );

    let result = watch(
        &options,
        config,
        &mut node,
        kube.as_mut(),
        &context,
        &mut datapath,
        &admin,
        xds,
        admin_tasks,
    )
    .await;
    drop(kube);

    if let Ok(Shutdown::Superseded { drain }) = result {
        // The successor owns the kernel state; only connections in flight
        // are this process's, and they end on their own or at the deadline.
        drain_connections(&context, drain).await;
        flush_spans(&context).await;
        log_counters(&datapath.counters, &context.stats);
        datapath.abandon();
        tracing::info!("agent stopped; its successor keeps the eBPF programs and pods");
        return Ok(());
    }
    let cleanups: Vec<enroll::PodCleanup> = std::mem::take(&mut node.enrolled)
        .into_values()
        .map(|enrollment| enroll::release(enrollment, &context, &mut datapath))
        .collect();
    let released: Vec<String> = cleanups
        .iter()
        .map(|cleanup| cleanup.pod_id().to_string())
        .collect();
    enroll::clean_up(cleanups).await;
    for id in released {
        tracing::info!(pod = %id, "pod released");
    }
    flush_spans(&context).await;
    log_counters(&datapath.counters, &context.stats);
    datapath.shutdown();
    tracing::info!("agent stopped; eBPF programs detached and pins removed");
    result.map(|_| ())
}

/// Exports the spans still queued, waiting 2 s at most; the SDK blocks, so
/// it runs off the runtime's threads.
async fn flush_spans(context: &Arc<ProxyContext>) {
    if !context.telemetry.spans.exporting() {
        return;
    }
    let context = context.clone();
    let _ = tokio::task::spawn_blocking(move || context.telemetry.spans.shutdown()).await;
}

/// How the watch loop ended.
enum Shutdown {
    /// Release everything and remove the pins.
    Release,
    /// A newer agent took over: drain connections in flight, touch nothing.
    Superseded { drain: Duration },
}

/// Serves one admin endpoint. While an earlier agent of the node still holds
/// the port (a hand-over), binding is retried until it lets go.
async fn serve_admin(
    address: std::net::SocketAddr,
    context: Arc<ProxyContext>,
    admin: Arc<AdminState>,
) {
    let mut warned = false;
    loop {
        match crate::admin::serve(address, context.clone(), admin.clone()).await {
            Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {
                if !warned {
                    tracing::info!(%address, "admin port in use (an earlier agent?); retrying");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => {
                tracing::error!(%address, %error, "admin endpoint unavailable");
                return;
            }
            Ok(()) => return,
        }
    }
}

/// Waits until no proxied connection is left (every kind: each open
/// connection record counts, L4 and L7, outbound and inbound), or
/// `deadline` passes.
async fn drain_connections(context: &ProxyContext, deadline: Duration) {
    let start = tokio::time::Instant::now();
    let mut logged = false;
    loop {
        let active = context.telemetry.metrics.active_connections.get();
        if active == 0 {
            tracing::info!("drained: no connection left");
            return;
        }
        if start.elapsed() >= deadline {
            tracing::warn!(
                active,
                "drain deadline reached; closing the connections left"
            );
            return;
        }
        if !logged {
            tracing::info!(
                active,
                deadline_seconds = deadline.as_secs(),
                "draining connections"
            );
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ready once every configured source has delivered its first full state.
fn update_readiness(
    admin: &AdminState,
    xds: Option<&XdsState>,
    kube: Option<&crate::kubernetes::KubeSource>,
) {
    let ready = xds.is_none_or(XdsState::ready) && kube.is_none_or(|kube| kube.synced());
    if ready && !admin.ready.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::info!("every configuration source delivered; ready");
    }
}

/// Waits for a signal, reloading the config file when it changes, following
/// the control plane and the Kubernetes API, and handing over to a newer
/// agent of this instance when one takes the pins.
#[allow(clippy::too_many_arguments)]
async fn watch(
    options: &RunOptions,
    mut config: Config,
    node: &mut NodeState,
    mut kube: Option<&mut crate::kubernetes::KubeSource>,
    context: &Arc<ProxyContext>,
    datapath: &mut Datapath,
    admin: &AdminState,
    mut xds: Option<(Arc<XdsState>, mpsc::Receiver<XdsUpdate>)>,
    admin_tasks: Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<Shutdown> {
    let mut ticker = tokio::time::interval(options.reload_interval);
    let mut chain_check = tokio::time::interval(CLASSIFIER_CHECK);
    let mut config_file = match &options.source {
        ConfigSource::File(path) => Some(crate::config_watch::ConfigFile::new(
            path,
            crate::config_watch::SETTLE,
        )),
        ConfigSource::Embedded => None,
    };
    let mut superseded = false;
    let drain = Duration::from_secs(
        config
            .kubernetes
            .as_ref()
            .map_or(crate::config::DEFAULT_DRAIN_SECONDS, |kube| {
                kube.drain_seconds
            }),
    );
    let ended = |superseded: bool| {
        if superseded {
            Shutdown::Superseded { drain }
        } else {
            Shutdown::Release
        }
    };
    loop {
        if node.signals.received {
            break;
        }
        tokio::select! {
            () = node.signals.recv() => break,
            _ = ticker.tick() => {}
            _ = chain_check.tick(), if !superseded => {
                node.check_classifiers(context, datapath, admin).await;
                node.check_cgroup_chains(context, admin).await;
                continue;
            }
            _ = async {
                match kube.as_mut() {
                    Some(kube) if !superseded => kube.changed().await,
                    _ => std::future::pending().await,
                }
            } => {
                node.reconcile(&config, kube.as_deref_mut(), context, datapath)
                    .await;
                update_readiness(admin, xds.as_ref().map(|(state, _)| &**state), kube.as_deref());
                continue;
            }
            Some(update) = async {
                match xds.as_mut() {
                    Some((_, updates)) => updates.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                // Workloads and services are in the store already.
                if let Some((state, _)) = &xds
                    && update.type_url != crate::xds::ADDRESS_TYPE
                {
                    apply_learnt(context, &config, state);
                } else {
                    // A service gone takes its implicit clusters' state.
                    context.http.clusters.prune(&context.store, &context.routes.snapshot());
                }
                update_readiness(admin, xds.as_ref().map(|(state, _)| &**state), kube.as_deref());
                tracing::debug!(type_url = %update.type_url, "control plane update applied");
                continue;
            }
        }
        if superseded {
            continue;
        }
        if datapath.superseded() {
            superseded = true;
            hand_over(node, admin, &admin_tasks);
            continue;
        }
        // Pods whose sandbox was not found yet are looked for again, and
        // pods that failed to enroll are retried, when due; Kubernetes
        // changes are reconciled as they come (above), not per tick.
        let sandbox_search_due = kube
            .as_deref()
            .is_some_and(crate::kubernetes::KubeSource::sandbox_search_due);
        if sandbox_search_due || node.retry_due() {
            node.reconcile(&config, kube.as_deref_mut(), context, datapath)
                .await;
        }
        // Only a file that is whole: replaced at once, or settled.
        let Some(text) = config_file
            .as_mut()
            .and_then(|file| file.poll(std::time::Instant::now()))
        else {
            continue;
        };
        let origin = match &options.source {
            ConfigSource::File(path) => path.display().to_string(),
            ConfigSource::Embedded => "embedded demo config".into(),
        };
        let loaded = text
            .map_err(|error| format!("cannot read {origin}: {error}"))
            .and_then(|text| Config::parse(&text, &origin).map_err(|error| error.to_string()));
        match loaded {
            Ok(new_config) => {
                let unapplied = config.restart_only_changes(&new_config);
                if !unapplied.is_empty() {
                    let verb = if unapplied.len() == 1 {
                        "it applies"
                    } else {
                        "they apply"
                    };
                    tracing::warn!(
                        fields = %unapplied.join(","),
                        "{} changed; {verb} on restart (the rest of the file is applied now)",
                        unapplied.join(", ")
                    );
                }
                context.store.set_file(&new_config);
                match &xds {
                    Some((state, _)) => apply_learnt(context, &new_config, state),
                    None => {
                        context.policies.replace(&new_config.policies);
                        apply_routes(context, &new_config, None);
                    }
                }
                context.telemetry.access_log.set(&new_config.access_log);
                context
                    .limits
                    .set(crate::proxy::limits::Settings::from(&new_config.proxy));
                context.telemetry.metrics.record_requests.store(
                    new_config.metrics.requests,
                    std::sync::atomic::Ordering::Relaxed,
                );
                node.reconcile(&new_config, kube.as_deref_mut(), context, datapath)
                    .await;
                admin
                    .config_version
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(
                    pods = node.enrolled.len(),
                    not_enrolled = node.pending.len(),
                    "config reloaded"
                );
                config = new_config;
            }
            Err(error) => {
                tracing::error!(%error, "config rejected; keeping the last good one");
            }
        }
    }
    // A successor may have taken the pins since the last tick; releasing now
    // would tear down the pods and pins that are its own.
    if !superseded && datapath.superseded() {
        superseded = true;
        hand_over(node, admin, &admin_tasks);
    }
    Ok(ended(superseded))
}

/// A newer agent of this instance took the pins: it has its own listeners
/// in every pod (same reuseport groups) and its own admin ports to bind.
/// This one stops accepting and keeps serving only what it has accepted.
fn hand_over(
    node: &mut NodeState,
    admin: &AdminState,
    admin_tasks: &[tokio::task::JoinHandle<()>],
) {
    tracing::warn!("a newer agent took over this node's pins; handing over and draining");
    admin
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    for task in admin_tasks {
        task.abort();
    }
    for enrollment in node.enrolled.values_mut() {
        enrollment.stop_listening();
    }
}

/// The pods this agent has enrolled, and where they came from.
struct NodeState {
    enrolled: BTreeMap<PathBuf, Enrollment>,
    /// Wanted pods that are not enrolled, retried when due.
    pending: BTreeMap<PathBuf, Pending>,
    /// Kubernetes pod UID by namespace path, for the pods the API asked for.
    kube_uids: BTreeMap<PathBuf, String>,
    /// Whether enrolled-pods entries of an earlier run that nobody wants any
    /// more have been removed (once the first full state is known).
    pruned: bool,
    /// Where pending pods are reported (config dump, readiness).
    admin: Arc<AdminState>,
    /// Watched during enrollment too, which stops early on one.
    signals: StopSignals,
    /// The programs found ahead of each pod's inbound classifier at the
    /// last check (pods with none are absent).
    shadowed: BTreeMap<PathBuf, Vec<u32>>,
    /// Others' programs that run ahead of Weir's on the hooks where Weir
    /// reads the destination, by hook, as last reported.
    cgroup_ahead: BTreeMap<String, Vec<u32>>,
}

/// SIGTERM and SIGINT, either of which stops the agent.
struct StopSignals {
    terminate: Signal,
    interrupt: Signal,
    /// One has arrived: the agent is stopping.
    received: bool,
}

impl StopSignals {
    fn install() -> anyhow::Result<StopSignals> {
        Ok(StopSignals {
            terminate: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            received: false,
        })
    }

    /// Waits for a signal and logs it. Cancel-safe.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = self.interrupt.recv() => tracing::info!("SIGINT: shutting down"),
        }
        self.received = true;
    }
}

/// A wanted pod that is not enrolled.
struct Pending {
    /// The pod as it was wanted when it failed.
    config: PodConfig,
    reason: String,
    /// Its namespace did not exist: retried as soon as it does (a stat per
    /// reload tick, nothing else).
    missing_netns: bool,
    /// Failed attempts in a row, for the backoff of other failures.
    failures: u32,
    retry_at: std::time::Instant,
    since: std::time::SystemTime,
}

/// The longest wait between two attempts at a pod whose enrollment failed
/// for another reason than a missing namespace (each attempt changes the
/// pod's namespace).
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(30);

impl Pending {
    /// Whether to try `wanted` (the pod as wanted now) again.
    fn due(&self, wanted: &PodConfig) -> bool {
        if *wanted != self.config {
            return true;
        }
        if self.missing_netns {
            return wanted.netns.exists();
        }
        std::time::Instant::now() >= self.retry_at
    }
}

/// How often each enrolled pod's tcx chain is checked for programs ahead
/// of Weir's classifier: one namespace entry and one query per pod.
const CLASSIFIER_CHECK: Duration = Duration::from_secs(5);

impl NodeState {
    /// Looks for programs that run ahead of Weir's on the cgroup hooks
    /// where it reads what the application dialled (`connect4/6`,
    /// `sendmsg4/6`) for the pods: attached with `BPF_F_PREORDER` on an
    /// ancestor, or inserted before Weir's with `BPF_F_BEFORE`. One that
    /// rewrites the destination (a socket load balancer) hides the service
    /// VIP from Weir. Named once per change, counted in
    /// `weir_cgroup_programs_ahead`; never moved.
    async fn check_cgroup_chains(
        &mut self,
        context: &Arc<ProxyContext>,
        admin: &crate::admin::AdminState,
    ) {
        use crate::capture::chain;
        let pin_dir = admin
            .pin_dir
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let pods_parent = admin
            .pods_parent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (Some(pin_dir), Some(pods_parent)) = (pin_dir, pods_parent) else {
            return;
        };
        let chains = tokio::task::spawn_blocking(move || {
            chain::cgroup_chains(&pods_parent, &chain::pinned_program_ids(&pin_dir))
        })
        .await;
        let chains = match chains {
            Ok(Ok(chains)) => chains,
            Ok(Err(error)) => {
                tracing::debug!(%error, "reading the pods' cgroup chains");
                return;
            }
            Err(_) => return,
        };
        let mut total = 0;
        for chain in chains
            .iter()
            .filter(|chain| chain::DESTINATION_HOOKS.contains(&chain.hook.as_str()))
        {
            let ahead: Vec<u32> = chain
                .programs
                .iter()
                .take_while(|program| !program.weir)
                .map(|program| program.id)
                .collect();
            total += ahead.len();
            let before = self.cgroup_ahead.get(&chain.hook);
            if before == Some(&ahead) || (before.is_none() && ahead.is_empty()) {
                continue;
            }
            if ahead.is_empty() {
                tracing::info!(hook = %chain.hook, "Weir's program runs first on the hook again");
                self.cgroup_ahead.remove(&chain.hook);
            } else {
                tracing::warn!(
                    hook = %chain.hook,
                    cgroup = %chain.target,
                    programs = %chain::describe(&ahead),
                    "programs run ahead of Weir's on a hook where it reads the destination the application dialled: one that rewrites it (a socket load balancer) hides service VIPs from Weir (no service routing, no L7); attach them without BPF_F_PREORDER, or after Weir's"
                );
                self.cgroup_ahead.insert(chain.hook.clone(), ahead);
            }
        }
        context
            .telemetry
            .metrics
            .cgroup_programs_ahead
            .set(total as i64);
    }

    /// Looks for tcx programs another agent put ahead of Weir's inbound
    /// classifier on each enrolled pod's interface, names them once per
    /// change, and sets `weir_classifier_shadowed_pods`. Weir leaves them
    /// where they are: it never reorders others' programs.
    async fn check_classifiers(
        &mut self,
        context: &Arc<ProxyContext>,
        datapath: &Datapath,
        admin: &crate::admin::AdminState,
    ) {
        let Some(ours) = datapath.pods().classifier_id() else {
            return;
        };
        let pods: Vec<(PathBuf, Arc<crate::proxy::PodHandle>, String)> = self
            .enrolled
            .iter()
            .map(|(key, enrollment)| {
                (
                    key.clone(),
                    enrollment.pod.clone(),
                    enrollment.config.interface.clone(),
                )
            })
            .collect();
        let worker_context = context.clone();
        let checked = tokio::task::spawn_blocking(move || {
            pods.into_iter()
                .map(|(key, pod, interface)| {
                    let chain =
                        crate::capture::enroll::tcx_chain(&pod, &interface, &worker_context.home);
                    (key, pod, interface, chain)
                })
                .collect::<Vec<_>>()
        })
        .await;
        let Ok(checked) = checked else {
            return;
        };
        let mut chains = std::collections::BTreeMap::new();
        for (key, pod, interface, chain) in checked {
            let chain = match chain {
                Ok(chain) => chain,
                Err(error) => {
                    tracing::debug!(pod = %pod.id, %error, "checking the classifier's place");
                    continue;
                }
            };
            let ahead = crate::capture::chain::ahead_of(&chain, ours).to_vec();
            chains.insert(pod.id.to_string(), (interface.clone(), chain));
            let before = self.shadowed.get(&key);
            if before == Some(&ahead) || (before.is_none() && ahead.is_empty()) {
                continue;
            }
            if ahead.is_empty() {
                tracing::info!(pod = %pod.id, interface, "Weir's inbound classifier is first on the pod's interface again");
                self.shadowed.remove(&key);
            } else {
                tracing::warn!(
                    pod = %pod.id,
                    interface,
                    programs = %crate::capture::chain::describe(&ahead),
                    "tcx programs run ahead of Weir's inbound classifier: one that returns TCX_PASS lets the pod's inbound traffic past Weir (mTLS, STRICT, policy); attach them after Weir's"
                );
                self.shadowed.insert(key, ahead);
            }
        }
        self.shadowed
            .retain(|key, _| self.enrolled.contains_key(key));
        // What `weir bpf` shows of each pod's chain (admin `/bpf/chains`).
        *admin
            .classifier_chains
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = chains;
        context
            .telemetry
            .metrics
            .classifier_shadowed_pods
            .set(self.shadowed.len() as i64);
    }

    /// Enrolls what the file and the Kubernetes API want, releases the rest,
    /// and brings the pods' annotations in line; the Kubernetes pods go to
    /// the store as workloads.
    async fn reconcile(
        &mut self,
        config: &Config,
        kube: Option<&mut crate::kubernetes::KubeSource>,
        context: &Arc<ProxyContext>,
        datapath: &mut Datapath,
    ) {
        let mut pods: Vec<PodConfig> = config.pods.clone();
        let mut complete = true;
        let mut kube = kube;
        if let Some(kube) = kube.as_deref_mut() {
            complete = kube.synced();
            self.kube_uids.clear();
            let file_netns: std::collections::BTreeSet<PathBuf> =
                pods.iter().map(|pod| pod.netns.clone()).collect();
            for wanted in kube.wanted_pods() {
                if file_netns.contains(&wanted.config.netns) {
                    continue;
                }
                self.kube_uids
                    .insert(wanted.config.netns.clone(), wanted.uid);
                pods.push(wanted.config);
            }
        }
        // The node's DNS default, decided per pod here: a change of it
        // re-enrolls the pods it changes.
        for pod in &mut pods {
            pod.dns_capture.get_or_insert(config.dns.capture);
        }
        let kubernetes_pods = &pods[config.pods.len()..];
        context.store.set_kubernetes_pods(kubernetes_pods, config);
        reconcile(
            &pods,
            &config.trust_domain,
            &mut self.enrolled,
            &mut self.pending,
            context,
            datapath,
            &mut self.signals,
        )
        .await;
        self.publish_pending(config);
        self.forget_released(context);
        if let Some(kube) = kube {
            let enrolled_uids = self
                .kube_uids
                .iter()
                .filter(|(netns, _)| self.enrolled.contains_key(*netns))
                .map(|(_, uid)| uid.clone())
                .collect();
            if complete {
                kube.annotate(&enrolled_uids);
            }
        }
        if complete && !self.pruned {
            self.pruned = true;
            prune_adopted(&self.enrolled, datapath);
            // Serving every pod now: an earlier agent may let go.
            if let Err(error) = datapath.claim_ownership() {
                tracing::warn!(%error, "cannot mark this agent as the pins' owner");
            }
        }
    }

    /// What only released pods used: their identities' certificates (after
    /// a grace period), their pooled tunnels and upstream connections.
    fn forget_released(&self, context: &ProxyContext) {
        let pods = self.enrolled.values().map(|enrollment| &enrollment.pod);
        let identities = pods.clone().map(|pod| pod.identity.clone()).collect();
        context.secrets.retain(&identities);
        let cookies = pods.map(|pod| pod.netns_cookie).collect();
        context.hbone.retain_pods(&cookies);
        context.http.clusters.retain_pods(&cookies);
    }

    /// Whether a pending pod is due for another attempt.
    fn retry_due(&self) -> bool {
        self.pending
            .values()
            .any(|pending| pending.due(&pending.config))
    }

    /// Reports the pending pods on the admin endpoints.
    fn publish_pending(&self, config: &Config) {
        let listed: Vec<crate::admin::NotEnrolled> = self
            .pending
            .iter()
            .map(|(netns, pending)| crate::admin::NotEnrolled {
                pod: pending.config.id(),
                netns: netns.clone(),
                from_file: config.pods.iter().any(|pod| pod.netns == *netns),
                reason: pending.reason.clone(),
                since: pending.since,
            })
            .collect();
        *self
            .admin
            .not_enrolled
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = listed;
    }
}

/// Removes enrolled-pods entries an earlier run left for pods this agent
/// does not enroll (their capture would fail closed for nothing).
fn prune_adopted(enrolled: &BTreeMap<PathBuf, Enrollment>, datapath: &mut Datapath) {
    if !datapath.adopted {
        return;
    }
    let ours: std::collections::BTreeSet<u64> = enrolled
        .values()
        .map(|enrollment| enrollment.pod.netns_cookie)
        .collect();
    for cookie in datapath.enrolled_cookies() {
        if !ours.contains(&cookie) {
            tracing::info!(
                netns_cookie = cookie,
                "releasing a pod the earlier run enrolled"
            );
            if let Err(error) = datapath.unenroll(cookie) {
                tracing::warn!(%error, "removing an adopted enrolled-pods entry");
            }
        }
    }
}

/// Brings the enrolled set in line with `pods`: releases pods no longer
/// listed (or changed), enrolls new ones. A pod that fails to enroll stays
/// pending with its reason and is retried when due; the others are
/// unaffected. Every new pod's inbound side is up before any new pod is
/// captured (see `enroll::prepare`). The pods' namespace work runs on
/// blocking workers, several pods at once; a stop signal ends phase one
/// early (pods not started are left for the shutdown to skip).
async fn reconcile(
    pods: &[PodConfig],
    trust_domain: &str,
    enrolled: &mut BTreeMap<PathBuf, Enrollment>,
    pending: &mut BTreeMap<PathBuf, Pending>,
    context: &Arc<ProxyContext>,
    datapath: &mut Datapath,
    signals: &mut StopSignals,
) {
    let wanted: BTreeMap<&Path, &PodConfig> =
        pods.iter().map(|pod| (pod.netns.as_path(), pod)).collect();
    pending.retain(|netns, _| wanted.contains_key(netns.as_path()));
    // Labels don't change how a pod is enrolled (only what the mesh shows
    // of it), so relabelling a pod never re-enrolls it.
    let unlabelled = |pod: &PodConfig| PodConfig {
        labels: Default::default(),
        ..pod.clone()
    };
    let stale: Vec<PathBuf> = enrolled
        .iter()
        .filter(|(netns, enrollment)| {
            wanted
                .get(netns.as_path())
                .is_none_or(|pod| unlabelled(pod) != unlabelled(&enrollment.config))
        })
        .map(|(netns, _)| netns.clone())
        .collect();
    let mut released = Vec::new();
    let mut cleanups = Vec::new();
    for netns in stale {
        if let Some(enrollment) = enrolled.remove(&netns) {
            released.push((enrollment.pod.id.clone(), netns));
            cleanups.push(enroll::release(enrollment, context, datapath));
        }
    }
    // Done before any enrollment: a changed pod is enrolled anew only once
    // its old enrollment is undone.
    enroll::clean_up(cleanups).await;
    for (id, netns) in released {
        tracing::info!(pod = %id, netns = %netns.display(), "pod released");
    }
    let mut to_prepare = Vec::new();
    for (netns, pod) in wanted {
        if enrolled.contains_key(netns)
            || pending.get(netns).is_some_and(|pending| !pending.due(pod))
        {
            continue;
        }
        // Checked first: a namespace that is not there yet (its pod is
        // still being created) is waited for, not tried and failed.
        if !netns.exists() {
            let reason = format!("netns {} does not exist", netns.display());
            set_pending(pending, pod, reason, true);
            continue;
        }
        to_prepare.push(pod.clone());
    }
    // Phase one: the inbound side of every pod to enroll.
    let pod_datapath = datapath.pods();
    let mut queue = to_prepare.into_iter();
    let mut running = FuturesUnordered::new();
    let mut prepared = Vec::new();
    let mut failed = Vec::new();
    loop {
        while !signals.received && running.len() < enroll::WORKERS {
            let Some(pod) = queue.next() else {
                break;
            };
            let preparing = enroll::prepare(
                pod.clone(),
                trust_domain.to_string(),
                context.clone(),
                pod_datapath.clone(),
            );
            running.push(async move { (pod, preparing.await) });
        }
        if running.is_empty() {
            break;
        }
        let stopping = signals.received;
        tokio::select! {
            () = signals.recv(), if !stopping => {}
            Some((pod, result)) = running.next() => match result {
                Ok(ready) => {
                    prefetch_certificate(context, &ready.pod().identity);
                    prepared.push(ready);
                }
                Err(failure) => failed.push((pod, failure)),
            }
        }
    }
    set_failed_pending(failed, pending, context, datapath).await;
    // Phase two: capture on (the enrolled-pods map; nothing slow), in the
    // order pods were listed.
    prepared.sort_by(|a, b| a.config().netns.cmp(&b.config().netns));
    let mut failed = Vec::new();
    for ready in prepared {
        let pod = ready.config().clone();
        match ready.capture(context, datapath) {
            Ok(enrollment) => {
                tracing::info!(
                    pod = %pod.id(),
                    netns = %pod.netns.display(),
                    netns_cookie = enrollment.pod.netns_cookie,
                    ips = ?pod.ips,
                    "pod enrolled"
                );
                pending.remove(&pod.netns);
                enrolled.insert(pod.netns.clone(), enrollment);
            }
            Err(failure) => failed.push((pod, failure)),
        }
    }
    set_failed_pending(failed, pending, context, datapath).await;
}

/// Releases what the failed pods had set up, then records them as pending.
async fn set_failed_pending(
    failed: Vec<(PodConfig, Box<enroll::EnrollFailure>)>,
    pending: &mut BTreeMap<PathBuf, Pending>,
    context: &Arc<ProxyContext>,
    datapath: &mut Datapath,
) {
    let mut cleanups = Vec::new();
    let mut reasons = Vec::new();
    for (pod, failure) in failed {
        let enroll::EnrollFailure { error, partial } = *failure;
        if let Some(partial) = partial {
            cleanups.push(enroll::release(partial, context, datapath));
        }
        reasons.push((pod, error.to_string()));
    }
    enroll::clean_up(cleanups).await;
    for (pod, reason) in reasons {
        set_pending(pending, &pod, reason, false);
    }
}

/// Records why `pod` is not enrolled; logged when the reason is new.
fn set_pending(
    pending: &mut BTreeMap<PathBuf, Pending>,
    pod: &PodConfig,
    reason: String,
    missing_netns: bool,
) {
    let now = std::time::Instant::now();
    let earlier = pending.remove(&pod.netns);
    let failures = earlier.as_ref().map_or(0, |earlier| earlier.failures) + 1;
    let backoff = Duration::from_secs(1)
        .saturating_mul(1 << (failures - 1).min(5))
        .min(MAX_RETRY_BACKOFF);
    let since = earlier
        .as_ref()
        .map_or_else(std::time::SystemTime::now, |earlier| earlier.since);
    let repeated = earlier
        .as_ref()
        .is_some_and(|earlier| earlier.reason == reason && earlier.config == *pod);
    if repeated {
        tracing::debug!(pod = %pod.id(), %reason, failures, "pod still not enrolled");
    } else if missing_netns {
        tracing::warn!(
            pod = %pod.id(),
            %reason,
            "pod not enrolled; enrolling it when its network namespace appears"
        );
    } else {
        tracing::error!(
            pod = %pod.id(),
            netns = %pod.netns.display(),
            %reason,
            retry_in_seconds = backoff.as_secs(),
            "pod not enrolled; retrying"
        );
    }
    pending.insert(
        pod.netns.clone(),
        Pending {
            config: pod.clone(),
            reason,
            missing_netns,
            failures,
            retry_at: now + backoff,
            since,
        },
    );
}

/// Starts the xDS client when the config names a control plane.
fn start_xds(
    config: &Config,
    admin: &AdminState,
    store: &Arc<Store>,
) -> Option<(Arc<XdsState>, mpsc::Receiver<XdsUpdate>)> {
    let settings = config.xds.as_ref()?;
    let state = Arc::new(XdsState::new(
        &crate::xds::convert::NodeContext::of(config),
        store.clone(),
    ));
    let (updates, receiver) = mpsc::channel(64);
    let settings = XdsSettings {
        address: settings.address.clone(),
        root_cert: settings.root_cert.clone(),
        token_file: settings.token_file.clone(),
        server_name: settings.server_name.clone(),
        node_id: format!(
            "ztunnel~0.0.0.0~weir-{0}.weir~weir.svc.cluster.local",
            config.node
        ),
        node_name: config.node.clone(),
        mode: settings.mode,
    };
    tracing::info!(address = %settings.address, "configuration from the control plane");
    *admin.xds.lock().unwrap_or_else(|e| e.into_inner()) = Some(state.clone());
    tokio::spawn(crate::xds::run(settings, state.clone(), updates));
    Some((state, receiver))
}

/// Loads ztunnel's local file, when the config names one, into a state of
/// its own, as a control plane's responses would fill it, and follows the
/// file from then on.
fn start_local_xds(
    config: &Config,
    store: &Arc<Store>,
    context: &ProxyContext,
    interval: Duration,
) -> anyhow::Result<Option<(Arc<XdsState>, mpsc::Receiver<XdsUpdate>)>> {
    let Some(path) = &config.local_xds_path else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("local_xds_path {}", path.display()))?;
    let node = crate::xds::convert::NodeContext::of(config);
    let resources = crate::xds::local::parse(&text, &node)
        .map_err(|error| anyhow::anyhow!("local_xds_path {}: {error}", path.display()))?;
    let state = Arc::new(XdsState::new(&node, store.clone()));
    crate::xds::local::apply(&state, &resources, "local-1");
    apply_learnt(context, config, &state);
    tracing::info!(
        path = %path.display(),
        workloads = resources.workloads(),
        services = resources.services(),
        policies = resources.authorizations.len(),
        "configuration from ztunnel's local file"
    );
    let (updates, receiver) = mpsc::channel(64);
    tokio::spawn(crate::xds::local::follow(
        path.clone(),
        node,
        state.clone(),
        updates,
        interval,
    ));
    Ok(Some((state, receiver)))
}

/// Replaces the policies and routes: the file's and the control plane's.
fn apply_learnt(context: &ProxyContext, config: &Config, state: &XdsState) {
    let mut policies = config.policies.clone();
    policies.extend(state.policies());
    context.policies.replace(&policies);
    apply_routes(context, config, Some(state));
}

/// Swaps in the route table: the file's route configurations and clusters,
/// each replaced by the control plane's of the same name.
fn apply_routes(context: &ProxyContext, config: &Config, xds: Option<&XdsState>) {
    let mut table = match crate::routing::file::table(&config.routing) {
        Ok(table) => table,
        // Config::parse validated it; kept safe should that ever change.
        Err(error) => {
            tracing::error!(%error, "routing section rejected; using the control plane's only");
            crate::routing::RouteTable::default()
        }
    };
    if let Some(state) = xds {
        table.route_configs.extend(state.route_configs());
        table.clusters.extend(state.clusters());
        table.assignments.extend(state.assignments());
    }
    tracing::debug!(
        route_configs = table.route_configs.len(),
        clusters = table.clusters.len(),
        assignments = table.assignments.len(),
        "route table replaced"
    );
    // Clusters the new table no longer names lose their state.
    context.http.clusters.prune(&context.store, &table);
    context.routes.replace(table);
}

/// Fetches a pod's certificate ahead of its first connection; failures are
/// reported here and retried by the connection that needs it.
fn prefetch_certificate(context: &Arc<ProxyContext>, identity: &Identity) {
    let secrets = context.secrets.clone();
    let identity = identity.clone();
    tokio::spawn(async move {
        if let Err(error) = secrets.fetch(&identity).await {
            tracing::error!(%identity, %error, "cannot get a certificate");
        }
    });
}

/// The CA the config names: Istio's, or the built-in one.
fn certificate_authority(config: &Config) -> anyhow::Result<CertificateAuthority> {
    if let Some(istio) = &config.ca.istio {
        let client = IstioCaClient::new(IstioCaConfig {
            address: istio.address.clone(),
            root_cert: istio.root_cert.clone(),
            token_file: istio.token_file.clone(),
            server_name: istio.server_name.clone(),
            cluster_id: istio.cluster_id.clone(),
        })?;
        tracing::info!(address = %istio.address, "certificates from Istio's CA");
        return Ok(CertificateAuthority::Istio(client));
    }
    let ca = match (&config.ca.root_cert, &config.ca.root_key) {
        (Some(cert), Some(key)) => BuiltinCa::load(cert, key)?,
        _ => {
            tracing::warn!("no CA configured: generated a root for this agent only");
            BuiltinCa::generate(&config.trust_domain)?
        }
    };
    Ok(CertificateAuthority::Builtin(Box::new(ca)))
}

fn log_counters(counters: &Counters, stats: &ProxyStats) {
    use std::sync::atomic::Ordering::Relaxed;
    let values = counters.read();
    let summary: Vec<String> = counter::NAMES
        .iter()
        .zip(values)
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    tracing::info!(
        ebpf = %summary.join(" "),
        outbound = stats.outbound_connections.load(Relaxed),
        inbound = stats.inbound_connections.load(Relaxed),
        failed = stats.failed_connections.load(Relaxed),
        tls_failures = stats.tls_failures.load(Relaxed),
        strict_refusals = stats.strict_refusals.load(Relaxed),
        policy_denials = stats.policy_denials.load(Relaxed),
        "final counters"
    );
}

async fn forward_bpf_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's fd for its whole life and
    // always reports the same fd.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut logger = match registered {
        Ok(logger) => logger,
        Err(error) => {
            tracing::warn!(%error, "cannot poll eBPF logs");
            return;
        }
    };
    loop {
        match logger.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(error) => {
                tracing::warn!(%error, "eBPF log reader stopped");
                return;
            }
        }
    }
}
