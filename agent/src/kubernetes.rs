//! Enrollment from the Kubernetes API (ambient mode, no pod restart).
//!
//! The agent watches its own node's pods (field selector on `spec.nodeName`)
//! and all namespaces. A pod is enrolled when its namespace carries Istio's
//! `istio.io/dataplane-mode=ambient` and the pod does not opt out with
//! `istio.io/dataplane-mode=none`; host-network pods never are. Each pod's
//! network namespace is found from the host, through a process of its
//! sandbox (`<proc>/<pid>/cgroup` names the pod's UID), so nothing in the pod
//! changes. Enrolled pods get Istio's `ambient.istio.io/redirection`
//! annotation, so `kubectl` shows who is in the mesh.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::watch;

use crate::config::{KubernetesConfig, MeshMode, PodConfig};

/// Istio's label, on namespaces (enroll) and pods (opt out).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Istio's annotation on the pods in the mesh.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// Istio's per-pod DNS capture switch (`"true"` or `"false"`; otherwise
/// the node's `dns.capture`).
pub const DNS_CAPTURE_ANNOTATION: &str = "ambient.istio.io/dns-capture";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("no Kubernetes API configuration (not in a cluster, no KUBECONFIG): {0}")]
    Infer(String),
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// What this agent knows of one pod of its node.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodView {
    uid: String,
    name: String,
    namespace: String,
    service_account: String,
    /// `status.podIPs` (every address; `podIP` when the list is absent).
    ips: Vec<IpAddr>,
    host_network: bool,
    opted_out: bool,
    annotated: bool,
    /// The pod's labels, for cluster subsets and telemetry.
    labels: std::collections::BTreeMap<String, String>,
    /// `ambient.istio.io/dns-capture`, when it says true or false.
    dns_capture: Option<bool>,
}

impl PodView {
    fn from_pod(pod: &Pod) -> Option<PodView> {
        let metadata = &pod.metadata;
        let spec = pod.spec.as_ref();
        let label = |key: &str| {
            metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get(key))
                .map(String::as_str)
        };
        Some(PodView {
            uid: metadata.uid.clone()?,
            name: metadata.name.clone()?,
            namespace: metadata.namespace.clone()?,
            service_account: spec
                .and_then(|spec| spec.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            ips: pod.status.as_ref().map(pod_ips).unwrap_or_default(),
            host_network: spec.and_then(|spec| spec.host_network).unwrap_or(false),
            opted_out: label(DATAPLANE_MODE_LABEL) == Some("none"),
            annotated: metadata
                .annotations
                .as_ref()
                .and_then(|annotations| annotations.get(REDIRECTION_ANNOTATION))
                .is_some_and(|value| value == "enabled"),
            dns_capture: metadata
                .annotations
                .as_ref()
                .and_then(|annotations| annotations.get(DNS_CAPTURE_ANNOTATION))
                .and_then(|value| match value.as_str() {
                    "true" => Some(true),
                    "false" => Some(false),
                    _ => None,
                }),
            labels: metadata.labels.clone().unwrap_or_default(),
        })
    }

    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A pod's addresses as the kubelet reports them: `podIPs` (one per
/// family on a dual-stack cluster), else the older single `podIP`. Kept
/// canonical, without repeats, at most one per family (the first).
fn pod_ips(status: &k8s_openapi::api::core::v1::PodStatus) -> Vec<IpAddr> {
    let listed: Vec<&str> = match status.pod_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(|ip| ip.ip.as_str()).collect(),
        _ => status.pod_ip.as_deref().into_iter().collect(),
    };
    let mut ips: Vec<IpAddr> = Vec::new();
    for ip in listed {
        let Ok(ip) = ip.parse::<IpAddr>().map(|ip| ip.to_canonical()) else {
            tracing::debug!(ip, "ignoring a pod IP that does not parse");
            continue;
        };
        if !ips.iter().any(|seen| seen.is_ipv4() == ip.is_ipv4()) {
            ips.push(ip);
        }
    }
    ips
}

/// The cluster as the watchers last saw it.
#[derive(Debug, Default)]
struct ClusterView {
    /// Namespaces whose dataplane-mode label is `ambient`.
    ambient_namespaces: BTreeSet<String>,
    pods: BTreeMap<String, PodView>,
    namespaces_synced: bool,
    pods_synced: bool,
}

impl ClusterView {
    fn wants(&self, pod: &PodView) -> bool {
        !pod.host_network && !pod.opted_out && self.ambient_namespaces.contains(&pod.namespace)
    }
}

/// The pods of this node that belong in the mesh, kept current by two
/// watches; `changed()` wakes the agent when they may have changed.
pub struct KubeSource {
    client: Client,
    view: Arc<Mutex<ClusterView>>,
    changes: watch::Receiver<u64>,
    /// Wakes `changed()`: the watches, and a failed annotation patch (so it
    /// is retried without a reconcile per tick).
    notify: Arc<watch::Sender<u64>>,
    finder: NetnsFinder,
    pod_interface: String,
    /// The annotation value last sent per pod UID, so a patch is sent once.
    /// Shared with the patch tasks: a failed patch forgets its entry.
    sent_annotations: Arc<Mutex<HashMap<String, bool>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A pod this agent should enroll, and the UID it came from.
pub struct WantedPod {
    pub uid: String,
    pub config: PodConfig,
}

impl KubeSource {
    pub async fn start(settings: &KubernetesConfig, node: &str) -> Result<KubeSource, KubeError> {
        let config = match &settings.kubeconfig {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|error| {
                    KubeError::Kubeconfig {
                        path: path.clone(),
                        message: error.to_string(),
                    }
                })?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                    .await
                    .map_err(|error| KubeError::Kubeconfig {
                        path: path.clone(),
                        message: error.to_string(),
                    })?
            }
            None => kube::Config::infer()
                .await
                .map_err(|error| KubeError::Infer(error.to_string()))?,
        };
        tracing::info!(api = %config.cluster_url, node, "pods from the Kubernetes API");
        let client = Client::try_from(config)?;
        let view = Arc::new(Mutex::new(ClusterView::default()));
        let (notify, changes) = watch::channel(0u64);
        let notify = Arc::new(notify);
        let pods: Api<Pod> = Api::all(client.clone());
        let pods_config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let tasks = vec![
            tokio::spawn(watch_pods(pods, pods_config, view.clone(), notify.clone())),
            tokio::spawn(watch_namespaces(namespaces, view.clone(), notify.clone())),
        ];
        Ok(KubeSource {
            client,
            view,
            changes,
            notify,
            finder: NetnsFinder::new(settings)?,
            pod_interface: settings.pod_interface.clone(),
            sent_annotations: Default::default(),
            tasks,
        })
    }

    /// Resolves when the watched pods or namespaces may have changed.
    pub async fn changed(&mut self) {
        if self.changes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Whether both watches have listed everything once.
    pub fn synced(&self) -> bool {
        let view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        view.namespaces_synced && view.pods_synced
    }

    /// Whether a wanted pod's sandbox was not found and is due to be
    /// searched for again (with backoff: each search reads every process's
    /// cgroup under `/proc`).
    pub fn sandbox_search_due(&self) -> bool {
        self.finder.search_due(Instant::now())
    }

    /// The pods to enroll now. A pod whose IP is not there yet is left out
    /// until an update brings it; one whose sandbox is not found yet, until
    /// a later call finds it (see [`Self::sandbox_search_due`]).
    pub fn wanted_pods(&mut self) -> Vec<WantedPod> {
        let candidates: Vec<PodView> = {
            let view = self.view.lock().unwrap_or_else(|e| e.into_inner());
            view.pods
                .values()
                .filter(|pod| view.wants(pod) && !pod.ips.is_empty())
                .cloned()
                .collect()
        };
        let uids: Vec<&str> = candidates.iter().map(|pod| pod.uid.as_str()).collect();
        let netns = self.finder.find(&uids, Instant::now());
        candidates
            .into_iter()
            .filter_map(|pod| {
                let netns = netns.get(&pod.uid)?.clone();
                Some(WantedPod {
                    uid: pod.uid,
                    config: PodConfig {
                        name: pod.name,
                        namespace: pod.namespace,
                        service_account: pod.service_account,
                        netns,
                        ips: pod.ips,
                        interface: self.pod_interface.clone(),
                        mesh_mode: MeshMode::Permissive,
                        authorization_policies: Vec::new(),
                        services: Vec::new(),
                        labels: pod.labels,
                        dns_capture: pod.dns_capture,
                    },
                })
            })
            .collect()
    }

    /// Brings the redirection annotation in line with what is enrolled
    /// (`enrolled` holds pod UIDs). Patches run in the background; a failed
    /// one is logged and tried again on a later call.
    pub fn annotate(&mut self, enrolled: &BTreeSet<String>) {
        let pods: Vec<PodView> = {
            let view = self.view.lock().unwrap_or_else(|e| e.into_inner());
            view.pods.values().cloned().collect()
        };
        let mut sent = self
            .sent_annotations
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        sent.retain(|uid, _| pods.iter().any(|pod| &pod.uid == uid));
        for pod in pods {
            let want = enrolled.contains(&pod.uid);
            if pod.annotated == want {
                sent.remove(&pod.uid);
                continue;
            }
            if sent.get(&pod.uid) == Some(&want) {
                continue;
            }
            sent.insert(pod.uid.clone(), want);
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
            let value = if want {
                serde_json::Value::from("enabled")
            } else {
                serde_json::Value::Null
            };
            let patch = serde_json::json!({
                "metadata": { "annotations": { REDIRECTION_ANNOTATION: value } }
            });
            let sent_annotations = self.sent_annotations.clone();
            let notify = self.notify.clone();
            tokio::spawn(async move {
                match api
                    .patch(&pod.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => tracing::debug!(pod = %pod.key(), annotated = want, "pod annotated"),
                    Err(error) => {
                        tracing::warn!(pod = %pod.key(), %error, "cannot annotate pod");
                        // Forget the attempt so the next call retries, and
                        // make that call (nothing else may come to).
                        sent_annotations
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&pod.uid);
                        tokio::time::sleep(ANNOTATION_RETRY).await;
                        notify.send_modify(|version| *version += 1);
                    }
                }
            });
        }
    }
}

/// The wait before a failed annotation patch is sent again.
const ANNOTATION_RETRY: Duration = Duration::from_secs(1);

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn watch_pods(
    api: Api<Pod>,
    config: watcher::Config,
    view: Arc<Mutex<ClusterView>>,
    notify: Arc<watch::Sender<u64>>,
) {
    // Backoff between retries while the API server is unreachable.
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut listing: Option<BTreeMap<String, PodView>> = None;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(%error, "pod watch failed; retrying with backoff");
                continue;
            }
        };
        let mut view = view.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            watcher::Event::Init => listing = Some(BTreeMap::new()),
            watcher::Event::InitApply(pod) => {
                if let (Some(listing), Some(pod)) = (listing.as_mut(), PodView::from_pod(&pod)) {
                    listing.insert(pod.uid.clone(), pod);
                }
            }
            watcher::Event::InitDone => {
                // A relist replaces everything: pods deleted meanwhile go.
                view.pods = listing.take().unwrap_or_default();
                view.pods_synced = true;
            }
            watcher::Event::Apply(pod) => {
                if let Some(pod) = PodView::from_pod(&pod) {
                    view.pods.insert(pod.uid.clone(), pod);
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some(uid) = pod.metadata.uid.as_ref() {
                    view.pods.remove(uid);
                }
            }
        }
        drop(view);
        notify.send_modify(|version| *version += 1);
    }
}

async fn watch_namespaces(
    api: Api<Namespace>,
    view: Arc<Mutex<ClusterView>>,
    notify: Arc<watch::Sender<u64>>,
) {
    let is_ambient = |namespace: &Namespace| {
        namespace
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(DATAPLANE_MODE_LABEL))
            .is_some_and(|mode| mode == "ambient")
    };
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut listing: Option<BTreeSet<String>> = None;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(%error, "namespace watch failed; retrying with backoff");
                continue;
            }
        };
        let mut view = view.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            watcher::Event::Init => listing = Some(BTreeSet::new()),
            watcher::Event::InitApply(namespace) => {
                if let (Some(listing), Some(name)) =
                    (listing.as_mut(), namespace.metadata.name.as_ref())
                    && is_ambient(&namespace)
                {
                    listing.insert(name.clone());
                }
            }
            watcher::Event::InitDone => {
                view.ambient_namespaces = listing.take().unwrap_or_default();
                view.namespaces_synced = true;
            }
            watcher::Event::Apply(namespace) => {
                if let Some(name) = namespace.metadata.name.clone() {
                    if is_ambient(&namespace) {
                        view.ambient_namespaces.insert(name);
                    } else {
                        view.ambient_namespaces.remove(&name);
                    }
                }
            }
            watcher::Event::Delete(namespace) => {
                if let Some(name) = namespace.metadata.name.as_ref() {
                    view.ambient_namespaces.remove(name);
                }
            }
        }
        drop(view);
        notify.send_modify(|version| *version += 1);
    }
}

/// Finds pods' network namespaces from the host: a process whose cgroup path
/// names the pod's UID (`pod<uid>` with the cgroupfs driver,
/// `pod<uid_with_underscores>` with systemd's) and whose network namespace is
/// not the host's. `/proc` is read only for pods not found yet, each again
/// with backoff while it stays missing.
pub struct NetnsFinder {
    proc_root: PathBuf,
    host_netns_inode: u64,
    /// Found namespaces, kept while their process lives.
    cache: HashMap<String, PathBuf>,
    /// Pods whose sandbox was not found: when to search again.
    unfound: HashMap<String, Search>,
}

/// Searches for one pod's sandbox that found nothing.
#[derive(Debug, Clone, Copy)]
struct Search {
    failed: u32,
    next: Instant,
}

/// The wait after a first search that found nothing (a sandbox is there
/// before its pod has an IP, so this is rare: a completed pod, a slow
/// runtime); it doubles while the pod stays missing.
const SANDBOX_SEARCH_RETRY: Duration = Duration::from_millis(500);
const MAX_SANDBOX_SEARCH_RETRY: Duration = Duration::from_secs(30);

impl NetnsFinder {
    pub fn new(settings: &KubernetesConfig) -> Result<NetnsFinder, KubeError> {
        let host_netns_inode = std::fs::metadata("/proc/self/ns/net")
            .map(|metadata| metadata.ino())
            .unwrap_or(0);
        Ok(NetnsFinder {
            proc_root: settings.proc_root.clone(),
            host_netns_inode,
            cache: HashMap::new(),
            unfound: HashMap::new(),
        })
    }

    /// The namespace path of each pod UID found (`<proc>/<pid>/ns/net`).
    /// Searches `/proc` for the pods not found yet whose search is due.
    pub fn find(&mut self, uids: &[&str], now: Instant) -> HashMap<String, PathBuf> {
        self.cache
            .retain(|uid, path| uids.contains(&uid.as_str()) && path.exists());
        self.unfound.retain(|uid, _| uids.contains(&uid.as_str()));
        let due: Vec<&str> = uids
            .iter()
            .copied()
            .filter(|uid| {
                !self.cache.contains_key(*uid)
                    && self
                        .unfound
                        .get(*uid)
                        .is_none_or(|search| search.next <= now)
            })
            .collect();
        if !due.is_empty() {
            self.scan(&due);
        }
        for uid in due {
            if self.cache.contains_key(uid) {
                self.unfound.remove(uid);
                continue;
            }
            let search = self.unfound.entry(uid.to_string()).or_insert(Search {
                failed: 0,
                next: now,
            });
            search.failed += 1;
            let wait = SANDBOX_SEARCH_RETRY
                .saturating_mul(1 << (search.failed - 1).min(8))
                .min(MAX_SANDBOX_SEARCH_RETRY);
            search.next = now + wait;
        }
        self.cache.clone()
    }

    /// Whether a pod not found at the last search is due to be searched
    /// for again.
    pub fn search_due(&self, now: Instant) -> bool {
        self.unfound.values().any(|search| search.next <= now)
    }

    fn scan(&mut self, uids: &[&str]) {
        let tokens: Vec<(String, String)> = uids
            .iter()
            .map(|uid| (uid.to_string(), format!("pod{}", uid.replace('-', "_"))))
            .collect();
        let Ok(entries) = std::fs::read_dir(&self.proc_root) else {
            tracing::warn!(proc = %self.proc_root.display(), "cannot read the host's /proc");
            return;
        };
        let mut pids: Vec<u32> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
            .collect();
        // The sandbox (pause) process starts first: the lowest pid of a pod.
        pids.sort_unstable();
        for pid in pids {
            let dir = self.proc_root.join(pid.to_string());
            let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) else {
                continue;
            };
            let Some((uid, _)) = tokens.iter().find(|(uid, systemd)| {
                !self.cache.contains_key(uid)
                    && (cgroup.contains(&format!("pod{uid}")) || cgroup.contains(systemd.as_str()))
            }) else {
                continue;
            };
            let netns = dir.join("ns").join("net");
            match std::fs::metadata(&netns) {
                Ok(metadata) if metadata.ino() != self.host_netns_inode => {
                    self.cache.insert(uid.clone(), netns);
                }
                _ => {}
            }
            if self.cache.len() >= uids.len() && uids.iter().all(|u| self.cache.contains_key(*u)) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(labels: &[(&str, &str)], host_network: bool) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "p", "namespace": "ns", "uid": "u-1",
                "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
            },
            "spec": { "containers": [], "hostNetwork": host_network, "serviceAccountName": "sa" },
            "status": { "podIP": "10.0.0.5" }
        }))
        .expect("pod json")
    }

    #[test]
    fn enrollment_follows_istio_labels() {
        let mut view = ClusterView::default();
        let plain = PodView::from_pod(&pod(&[], false)).expect("view");
        assert!(!view.wants(&plain), "namespace not labelled");
        view.ambient_namespaces.insert("ns".into());
        assert!(view.wants(&plain));
        assert_eq!(plain.service_account, "sa");
        let opted_out = PodView::from_pod(&pod(&[(DATAPLANE_MODE_LABEL, "none")], false));
        assert!(!view.wants(&opted_out.expect("view")));
        let host = PodView::from_pod(&pod(&[], true)).expect("view");
        assert!(!view.wants(&host), "host-network pods are never enrolled");
    }

    #[test]
    fn istios_dns_capture_annotation_decides_for_the_pod() {
        let annotated = |value: &str| {
            let mut pod = pod(&[], false);
            pod.metadata.annotations = Some(
                [(DNS_CAPTURE_ANNOTATION.to_string(), value.to_string())]
                    .into_iter()
                    .collect(),
            );
            PodView::from_pod(&pod).expect("view").dns_capture
        };
        assert_eq!(annotated("true"), Some(true));
        assert_eq!(annotated("false"), Some(false));
        // Anything else, or no annotation: the node's default.
        assert_eq!(annotated("maybe"), None);
        assert_eq!(
            PodView::from_pod(&pod(&[], false))
                .expect("view")
                .dns_capture,
            None
        );
    }

    #[test]
    fn a_pod_has_every_address_of_its_status() {
        let status = |value: serde_json::Value| {
            serde_json::from_value::<k8s_openapi::api::core::v1::PodStatus>(value)
                .expect("status json")
        };
        let v4: IpAddr = [10, 0, 0, 5].into();
        let v6: IpAddr = "fd00::5".parse().expect("v6");
        let dual = status(serde_json::json!({
            "podIP": "10.0.0.5",
            "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}],
        }));
        assert_eq!(pod_ips(&dual), vec![v4, v6]);
        let v6_first = status(serde_json::json!({
            "podIP": "fd00::5",
            "podIPs": [{"ip": "fd00::5"}, {"ip": "10.0.0.5"}],
        }));
        assert_eq!(pod_ips(&v6_first), vec![v6, v4]);
        // An older API server: podIP alone.
        assert_eq!(
            pod_ips(&status(serde_json::json!({"podIP": "fd00::5"}))),
            vec![v6]
        );
        // Garbage and a second address of one family are left out.
        let odd = status(serde_json::json!({
            "podIPs": [{"ip": "nonsense"}, {"ip": "10.0.0.5"}, {"ip": "10.0.0.6"}],
        }));
        assert_eq!(pod_ips(&odd), vec![v4]);
        assert!(pod_ips(&status(serde_json::json!({}))).is_empty());
        let view = PodView::from_pod(&pod(&[], false)).expect("view");
        assert_eq!(view.ips, vec![v4]);
    }

    /// A stand-in for the host's `/proc`: one process per pod UID, in the
    /// pod's cgroup, its `ns/net` a file (so not the host's namespace).
    struct FakeProc(PathBuf);

    impl FakeProc {
        fn new(name: &str) -> FakeProc {
            let root = std::env::temp_dir().join(format!("weir-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root).expect("fake proc");
            FakeProc(root)
        }

        fn start_sandbox(&self, pid: u32, uid: &str) -> PathBuf {
            let dir = self.0.join(pid.to_string());
            std::fs::create_dir_all(dir.join("ns")).expect("pid dir");
            std::fs::write(
                dir.join("cgroup"),
                format!("0::/kubepods/besteffort/pod{uid}/sandbox\n"),
            )
            .expect("cgroup");
            std::fs::write(dir.join("ns").join("net"), "").expect("ns/net");
            dir.join("ns").join("net")
        }

        fn finder(&self) -> NetnsFinder {
            NetnsFinder {
                proc_root: self.0.clone(),
                host_netns_inode: 0,
                cache: HashMap::new(),
                unfound: HashMap::new(),
            }
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_missing_sandbox_is_searched_for_again_with_backoff_not_at_every_call() {
        let proc = FakeProc::new("backoff");
        let found = proc.start_sandbox(7, "u-found");
        let mut finder = proc.finder();
        let start = Instant::now();
        let at = |millis: u64| start + Duration::from_millis(millis);

        let netns = finder.find(&["u-found", "u-late"], at(0));
        assert_eq!(netns.get("u-found"), Some(&found));
        assert!(!netns.contains_key("u-late"));
        assert!(!finder.search_due(at(499)));
        assert!(finder.search_due(at(500)));

        // Its sandbox appears, but the next search is not due: /proc is not
        // read (the found pod is cached, the other waits).
        let late = proc.start_sandbox(9, "u-late");
        let netns = finder.find(&["u-found", "u-late"], at(100));
        assert!(!netns.contains_key("u-late"), "/proc was read before due");
        let netns = finder.find(&["u-found", "u-late"], at(500));
        assert_eq!(netns.get("u-late"), Some(&late));
        assert!(!finder.search_due(at(60_000)), "nothing left to search for");

        // A pod that stays missing: 0.5 s, 1 s, 2 s, … between searches.
        finder.find(&["u-never"], at(0));
        finder.find(&["u-never"], at(500));
        assert!(!finder.search_due(at(1_499)));
        assert!(finder.search_due(at(1_500)));
        finder.find(&["u-never"], at(1_500));
        assert!(!finder.search_due(at(3_499)));
        assert!(finder.search_due(at(3_500)));
        // No longer wanted: no longer searched for.
        finder.find(&[], at(3_500));
        assert!(!finder.search_due(at(60_000)));
    }
}
