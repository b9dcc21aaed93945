//! The admin endpoints: `127.0.0.1:15000/config_dump` (the agent's current
//! state as JSON, with the version of each resource type) and readiness on
//! `:15021/healthz/ready` (200 once the first full state is applied and every
//! pod of the local file is enrolled; otherwise 503 with the reasons).
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};

use crate::{
    capture::bpfinfo::MapFill,
    proxy::{
        ProxyContext,
        accept::Acceptor,
        http::server::{Served, serve_http1},
        limits::{ADMIN_MAX_CONNECTIONS, Listener, Refusal, Slot},
    },
};

pub const ADMIN_ADDRESS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15000);
pub const READINESS_ADDRESS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 15021);
pub const METRICS_ADDRESS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 15020);

type LogFilterHandle =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

static LOG_FILTER: std::sync::OnceLock<LogFilterHandle> = std::sync::OnceLock::new();

/// Registers the reload handle of the log filter, for `/logging`.
pub fn set_log_filter_handle(handle: LogFilterHandle) {
    let _ = LOG_FILTER.set(handle);
}

/// `/logging?level=<filter>`: changes the log filter at run time (any
/// `RUST_LOG`-style directive, e.g. `debug` or `info,weir_agent::xds=debug`).
fn logging(query: Option<&str>) -> Response<Full<Bytes>> {
    let Some(handle) = LOG_FILTER.get() else {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"error": "no log filter"}),
        );
    };
    let level = query
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("level="));
    match level {
        None => {
            let current = handle
                .with_current(|filter| filter.to_string())
                .unwrap_or_default();
            json(StatusCode::OK, &serde_json::json!({"level": current}))
        }
        Some(level) => match tracing_subscriber::EnvFilter::try_new(level) {
            Ok(filter) => match handle.reload(filter) {
                Ok(()) => {
                    tracing::info!(level, "log filter changed");
                    json(StatusCode::OK, &serde_json::json!({"level": level}))
                }
                Err(error) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({"error": error.to_string()}),
                ),
            },
            Err(error) => json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": error.to_string()}),
            ),
        },
    }
}

/// What the admin endpoints report besides the proxy's state.
#[derive(Default)]
pub struct AdminState {
    pub ready: AtomicBool,
    /// Bumped each time a new configuration is applied.
    pub config_version: AtomicU64,
    pub config_source: std::sync::Mutex<String>,
    /// What the control plane sent, when there is one.
    pub xds: std::sync::Mutex<Option<Arc<crate::xds::XdsState>>>,
    /// The eBPF counters, read at scrape time.
    pub counters: std::sync::Mutex<Option<Arc<crate::capture::datapath::Counters>>>,
    /// Where the datapath's objects are pinned (`<bpffs>/weir/<instance>`):
    /// map fill is read from there (see [`MapFillCache`]).
    pub pin_dir: std::sync::Mutex<Option<std::path::PathBuf>>,
    pub map_fill: MapFillCache,
    /// Wanted pods that are not enrolled, and why (the agent retries them).
    pub not_enrolled: std::sync::Mutex<Vec<NotEnrolled>>,
    /// The cgroup Weir's socket hooks are attached to (`cgroup.pods_parent`).
    pub pods_parent: std::sync::Mutex<Option<std::path::PathBuf>>,
    /// Each enrolled pod's tcx ingress chain (interface, program ids in
    /// order), as the last classifier check found it.
    pub classifier_chains: std::sync::Mutex<std::collections::BTreeMap<String, (String, Vec<u32>)>>,
}

/// A pod the agent should enroll but has not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotEnrolled {
    /// `namespace/name`.
    pub pod: String,
    pub netns: std::path::PathBuf,
    /// Listed in the local file (else it came from the Kubernetes API).
    pub from_file: bool,
    pub reason: String,
    /// When it was first found not enrolled.
    pub since: std::time::SystemTime,
}

impl AdminState {
    /// Why the agent is not ready; empty when it is. A pod of the local file
    /// that is not enrolled counts (the operator named it for this node and
    /// it is unprotected); a Kubernetes pod does not: it may never start,
    /// and it must not hold back the rollout of a DaemonSet.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if !self.ready.load(Ordering::Relaxed) {
            reasons.push("waiting for the first full state of every configuration source".into());
        }
        let pending = self.not_enrolled.lock().unwrap_or_else(|e| e.into_inner());
        reasons.extend(
            pending
                .iter()
                .filter(|pod| pod.from_file)
                .map(|pod| format!("pod {} not enrolled: {}", pod.pod, pod.reason)),
        );
        reasons
    }
}

/// How old the map fill that `/metrics` reports may be.
pub const MAP_FILL_MAX_AGE: Duration = Duration::from_secs(5);

/// The last map fill read. Reading it walks every key of each map, one
/// syscall per entry (the connection maps hold up to 65,536), so it runs on
/// the blocking pool, at most once per `max_age` however often `/metrics` is
/// scraped: a scrape that finds the last reading older waits for a new one
/// (concurrent scrapes share it), the others reuse it.
pub struct MapFillCache {
    max_age: Duration,
    last: Arc<tokio::sync::Mutex<Option<MapFillReading>>>,
}

/// When map fill was read, and what it was.
type MapFillReading = (Instant, Arc<[MapFill]>);

impl Default for MapFillCache {
    fn default() -> MapFillCache {
        MapFillCache::new(MAP_FILL_MAX_AGE)
    }
}

impl MapFillCache {
    pub fn new(max_age: Duration) -> MapFillCache {
        MapFillCache {
            max_age,
            last: Default::default(),
        }
    }

    /// The last reading if recent enough, else a new one made by `read`.
    pub async fn get(
        &self,
        read: impl FnOnce() -> Vec<MapFill> + Send + 'static,
    ) -> Option<Arc<[MapFill]>> {
        let mut last = self.last.clone().lock_owned().await;
        if let Some((read_at, maps)) = last.as_ref()
            && read_at.elapsed() < self.max_age
        {
            return Some(maps.clone());
        }
        // A task of its own: a reading is kept even if the scrape that
        // asked for it goes away first.
        let refresh = tokio::spawn(async move {
            match tokio::task::spawn_blocking(read).await {
                Ok(maps) => {
                    let maps: Arc<[MapFill]> = maps.into();
                    *last = Some((Instant::now(), maps.clone()));
                    Some(maps)
                }
                Err(error) => {
                    tracing::warn!(%error, "reading eBPF map fill");
                    last.as_ref().map(|(_, maps)| maps.clone())
                }
            }
        });
        refresh.await.ok().flatten()
    }
}

/// Brings scrape-time metrics up to date and renders them.
async fn metrics(context: &ProxyContext, admin: &AdminState) -> String {
    let metrics = &context.telemetry.metrics;
    if let Some(counters) = admin
        .counters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        metrics.observe_ebpf(&counters.read());
    }
    let held = context.secrets.held();
    // Forgotten identities leave the family: it is rebuilt each scrape.
    metrics.certificate_expiry.clear();
    metrics.certificates_held.set(held.len() as i64);
    for cert in held {
        let expiry = cert
            .not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        metrics
            .certificate_expiry
            .get_or_create(&crate::telemetry::metrics::IdentityLabels {
                identity: cert.identity.to_string(),
            })
            .set(expiry);
    }
    let pods = context.enrolled_pods().len();
    metrics.enrolled_pods.set(pods as i64);
    metrics.runtime_tasks.set(
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks() as i64,
    );
    let xds = admin.xds.lock().unwrap_or_else(|e| e.into_inner()).clone();
    metrics
        .xds_ready
        .set(i64::from(xds.as_ref().is_some_and(|state| state.ready())));
    if let Some(xds) = &xds {
        metrics.observe_xds(&xds.stats);
    }
    metrics.attach_ca(&context.secrets.ca_metrics);
    let pin_dir = admin
        .pin_dir
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let Some(pin_dir) = pin_dir
        && let Some(maps) = admin
            .map_fill
            .get(move || crate::capture::bpfinfo::map_fill(&pin_dir))
            .await
    {
        metrics.observe_bpf_maps(&maps);
    }
    metrics.encode()
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(
        serde_json::to_vec_pretty(value).unwrap_or_default(),
    )));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn config_dump(context: &ProxyContext, admin: &AdminState) -> serde_json::Value {
    let version = admin.config_version.load(Ordering::Relaxed).to_string();
    let pods: Vec<serde_json::Value> = {
        let mut pods: Vec<serde_json::Value> = context
            .enrolled_pods()
            .iter()
            .map(|pod| {
                serde_json::json!({
                    "id": &*pod.id, "ips": pod.ips, "identity": pod.identity.to_string(),
                    "netns_cookie": pod.netns_cookie,
                    "mesh_mode": if pod.strict { "STRICT" } else { "PERMISSIVE" },
                    "authorization_policies": pod.authorization_policies,
                })
            })
            .collect();
        pods.sort_by_key(|pod| pod["id"].to_string());
        pods
    };
    let workloads: Vec<serde_json::Value> = context
        .store
        .listed()
        .iter()
        .map(|(ip, w)| serde_json::json!({"id": w.id(), "ip": ip, "identity": w.identity.to_string(), "healthy": w.healthy}))
        .collect();
    let certificates: Vec<serde_json::Value> = context
        .secrets
        .held()
        .iter()
        .map(|cert| {
            let seconds = |t: std::time::SystemTime| {
                t.duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            };
            serde_json::json!({
                "identity": cert.identity.to_string(), "serial": cert.serial,
                "not_before": seconds(cert.not_before), "not_after": seconds(cert.not_after),
            })
        })
        .collect();
    let not_enrolled: Vec<serde_json::Value> = admin
        .not_enrolled
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|pod| {
            serde_json::json!({
                "id": pod.pod, "netns": pod.netns, "reason": pod.reason,
                "source": if pod.from_file { "file" } else { "kubernetes" },
                "since": pod.since.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            })
        })
        .collect();
    serde_json::json!({
        "source": *admin.config_source.lock().unwrap_or_else(|e| e.into_inner()),
        "versions": {"pods": version, "workloads": version, "policies": version},
        "pods": pods,
        "not_enrolled": not_enrolled,
        "workloads": workloads,
        "policies": context.policies.listed(),
        "certificates": certificates,
        "xds": admin
            .xds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|state| state.summary()),
    })
}

/// Every chain Weir's programs are in: its cgroup hooks as they run for the
/// pods (others' programs included), then each pod's tcx ingress. Blocking.
fn chains(admin: &AdminState) -> std::io::Result<Vec<crate::capture::chain::Chain>> {
    use crate::capture::chain;
    let pin_dir = admin
        .pin_dir
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let ours = pin_dir
        .as_deref()
        .map(chain::pinned_program_ids)
        .unwrap_or_default();
    let pods_parent = admin
        .pods_parent
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut chains = match pods_parent {
        Some(parent) => chain::cgroup_chains(&parent, &ours)?,
        None => Vec::new(),
    };
    let pods = admin
        .classifier_chains
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for (pod, (interface, ids)) in pods {
        chains.push(chain::Chain {
            hook: "tcx ingress".into(),
            target: format!("{pod} {interface}"),
            programs: chain::chain_programs(&ids, &ours),
        });
    }
    Ok(chains)
}

async fn route(
    request: Request<hyper::body::Incoming>,
    context: Arc<ProxyContext>,
    admin: Arc<AdminState>,
) -> Response<Full<Bytes>> {
    match request.uri().path() {
        "/config_dump" => json(StatusCode::OK, &config_dump(&context, &admin)),
        "/healthz/ready" => {
            let reasons = admin.not_ready_reasons();
            if reasons.is_empty() {
                json(StatusCode::OK, &serde_json::json!({"ready": true}))
            } else {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({"ready": false, "reasons": reasons}),
                )
            }
        }
        "/logging" => logging(request.uri().query()),
        "/bpf/chains" => {
            let admin = admin.clone();
            match tokio::task::spawn_blocking(move || chains(&admin)).await {
                Ok(Ok(chains)) => json(
                    StatusCode::OK,
                    &serde_json::to_value(chains).unwrap_or_default(),
                ),
                Ok(Err(error)) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({"error": error.to_string()}),
                ),
                Err(error) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({"error": error.to_string()}),
                ),
            }
        }
        "/certs" => json(
            StatusCode::OK,
            &config_dump(&context, &admin)["certificates"],
        ),
        "/stats" => {
            use std::sync::atomic::Ordering::Relaxed;
            let stats = &context.stats;
            let ebpf: serde_json::Map<String, serde_json::Value> = admin
                .counters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|counters| {
                    weir_common::counter::NAMES
                        .iter()
                        .zip(counters.read())
                        .map(|(name, value)| (name.to_string(), value.into()))
                        .collect()
                })
                .unwrap_or_default();
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "outbound_connections": stats.outbound_connections.load(Relaxed),
                    "inbound_connections": stats.inbound_connections.load(Relaxed),
                    "failed_connections": stats.failed_connections.load(Relaxed),
                    "active_connections": context.telemetry.metrics.active_connections.get(),
                    "tls_failures": stats.tls_failures.load(Relaxed),
                    "strict_refusals": stats.strict_refusals.load(Relaxed),
                    "policy_denials": stats.policy_denials.load(Relaxed),
                    "http": {
                        "requests": context.http.requests.load(Relaxed),
                        "local_replies": context.http.local_replies.load(Relaxed),
                        "retries": context.http.retries.load(Relaxed),
                        "mirrored": context.http.mirrored.load(Relaxed),
                        "inbound_requests": context.http.inbound_requests.load(Relaxed),
                    },
                    "ebpf": ebpf,
                }),
            )
        }
        "/metrics" | "/stats/prometheus" => {
            let text = metrics(&context, &admin).await;
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not found"}),
        ),
    }
}

/// `/trace?pod=&namespace=&port=&verdict=&recent=true`: flow events as JSON
/// lines, streamed until the client goes away. A subscriber that falls too
/// far behind gets a `{"lagged": N}` line saying how many it missed.
fn trace_stream(
    query: &str,
    context: &ProxyContext,
) -> Response<BoxBody<Bytes, std::convert::Infallible>> {
    use tokio::sync::broadcast::error::RecvError;
    type Frame = Result<hyper::body::Frame<Bytes>, std::convert::Infallible>;
    let filter = match crate::telemetry::flows::FlowFilter::from_query(query) {
        Ok(filter) => filter,
        Err(error) => {
            return json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({ "error": error }),
            )
            .map(BodyExt::boxed);
        }
    };
    let recent = if query.split('&').any(|pair| pair == "recent=true") {
        context.telemetry.flows.recent()
    } else {
        Vec::new()
    };
    let mut events = context.telemetry.flows.subscribe();
    let (frames, body) = tokio::sync::mpsc::channel::<Frame>(256);
    let line = |value: serde_json::Value| -> Frame {
        let mut text = value.to_string();
        text.push('\n');
        Ok(hyper::body::Frame::data(Bytes::from(text)))
    };
    // Ends when the client goes away (the body, and so the channel, drops).
    tokio::spawn(async move {
        for event in recent.into_iter().filter(|event| filter.matches(event)) {
            if frames
                .send(line(serde_json::json!(event.record())))
                .await
                .is_err()
            {
                return;
            }
        }
        loop {
            let frame = match events.recv().await {
                Ok(event) if filter.matches(&event) => line(serde_json::json!(event.record())),
                Ok(_) => continue,
                Err(RecvError::Lagged(missed)) => line(serde_json::json!({ "lagged": missed })),
                Err(RecvError::Closed) => return,
            };
            if frames.send(frame).await.is_err() {
                return;
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(body);
    let mut response = Response::new(BoxBody::new(http_body_util::StreamBody::new(stream)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// Which endpoints a listener serves. Only the loopback admin port serves
/// the state, the certificates, `/logging` and the flow stream; the ports
/// open to the network serve metrics (15020) and readiness (15021) alone, as
/// ztunnel's do.
fn served_on(address: SocketAddr, path: &str) -> bool {
    match address {
        ADMIN_ADDRESS => true,
        METRICS_ADDRESS => matches!(path, "/metrics" | "/stats/prometheus"),
        READINESS_ADDRESS => path == "/healthz/ready",
        _ => false,
    }
}

/// Serves `address` until the task is dropped.
pub async fn serve(
    address: SocketAddr,
    context: Arc<ProxyContext>,
    admin: Arc<AdminState>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let open = Arc::new(AtomicUsize::new(0));
    let mut acceptor = Acceptor::new(&listener, Listener::Admin, &context.limits);
    loop {
        let (stream, peer) = acceptor.next().await;
        let Some(slot) = Slot::take(&open, ADMIN_MAX_CONNECTIONS) else {
            context.limits.refuse(
                Listener::Admin,
                Refusal::ListenerLimit,
                "",
                ADMIN_MAX_CONNECTIONS,
            );
            continue;
        };
        let (context, admin) = (context.clone(), admin.clone());
        tokio::spawn(async move {
            let settings = context.limits.settings();
            let service = {
                let context = context.clone();
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let (context, admin) = (context.clone(), admin.clone());
                    async move {
                        let path = request.uri().path();
                        let response = if !served_on(address, path) {
                            json(
                                StatusCode::NOT_FOUND,
                                &serde_json::json!({"error": "not found"}),
                            )
                            .map(BodyExt::boxed)
                        } else if path == "/trace" {
                            trace_stream(request.uri().query().unwrap_or(""), &context)
                        } else {
                            route(request, context, admin).await.map(BodyExt::boxed)
                        };
                        Ok::<_, std::convert::Infallible>(response)
                    }
                })
            };
            let served = Served {
                limits: &context.limits,
                settings: &settings,
                listener: Listener::Admin.name(),
                peer,
            };
            let _ = serve_http1(stream, service, served).await;
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    fn reading(entries: usize) -> Vec<MapFill> {
        vec![MapFill {
            name: "ENROLLED_PODS".into(),
            entries: Some(entries),
            capacity: 1024,
        }]
    }

    #[tokio::test]
    async fn map_fill_is_read_off_the_async_thread_once_per_max_age() {
        let cache = MapFillCache::default();
        let reads = Arc::new(AtomicUsize::new(0));
        let reader_threads = Arc::new(Mutex::new(Vec::new()));
        let read = |entries: usize| {
            let (reads, threads) = (reads.clone(), reader_threads.clone());
            move || {
                reads.fetch_add(1, Ordering::SeqCst);
                threads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(std::thread::current().id());
                reading(entries)
            }
        };
        // Concurrent scrapes share one reading; later ones reuse it.
        let (first, second, third) =
            tokio::join!(cache.get(read(3)), cache.get(read(4)), cache.get(read(5)));
        let fourth = cache.get(read(6)).await;
        for maps in [first, second, third, fourth] {
            assert_eq!(maps.as_deref(), Some(&reading(3)[..]));
        }
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        let on_this_thread = reader_threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&std::thread::current().id());
        assert!(!on_this_thread, "map fill read on the async thread");

        // Older than the maximum age: read again.
        let stale = MapFillCache::new(Duration::ZERO);
        stale.get(read(7)).await;
        let maps = stale.get(read(8)).await;
        assert_eq!(maps.as_deref(), Some(&reading(8)[..]));
        assert_eq!(reads.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_map_fill_reading_outlives_the_scrape_that_asked_for_it() {
        let cache = MapFillCache::default();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let abandoned = cache.get(move || {
            let _ = released.recv();
            reading(3)
        });
        // The scrape goes away while its reading is under way.
        tokio::select! {
            _ = abandoned => panic!("the reading was released later"),
            _ = tokio::task::yield_now() => {}
        }
        let _ = release.send(());
        let maps = cache
            .get(|| panic!("a second reading while the first one is fresh"))
            .await;
        assert_eq!(maps.as_deref(), Some(&reading(3)[..]));
    }
}
