//! A Kubernetes API server stand-in for tests: pods and namespaces held in
//! memory, served over plain HTTP inside a network namespace, with the
//! list/watch protocol kube-rs's `watcher` uses (lists, chunked watch streams
//! resumed from a resourceVersion, bookmarks, `timeoutSeconds`) and merge
//! PATCHes of pods, which it records.
//!
//! Objects are kept as JSON so merge patches are plain RFC 7386 merges. One
//! counter gives every change its resourceVersion, as in a real apiserver;
//! every change is kept in a history, so a watch from any resourceVersion can
//! be replayed (nothing is ever compacted, so no 410 Gone).
use std::{
    collections::BTreeMap,
    convert::Infallible,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use k8s_openapi::api::core::v1::{Container, Pod, PodIP, PodSpec, PodStatus};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

/// How often an idle watch gets a BOOKMARK (when it asked for them).
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Namespace,
    Pod,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Pod => "pods",
        }
    }
}

/// One change. `before`/`after` decide, per watcher's selectors, whether it
/// is an ADDED, MODIFIED or DELETED for that watcher (a pod that stops
/// matching is a DELETED to it, as with a real apiserver).
#[derive(Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    before: Option<Value>,
    after: Option<Value>,
}

/// (namespace, name); namespaces have an empty namespace.
type Key = (String, String);

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<(Kind, Key), Value>,
    history: Vec<Arc<Change>>,
}

struct Shared {
    store: Mutex<Store>,
    /// Sent to while holding `store`, so a watcher that subscribes under the
    /// same lock sees every change after its replay exactly once.
    changes: broadcast::Sender<Arc<Change>>,
    patches: Mutex<Vec<String>>,
    unhandled: Mutex<Vec<String>>,
    watchers: AtomicUsize,
    uids: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn new() -> Shared {
        Shared {
            store: Mutex::new(Store::default()),
            changes: broadcast::channel(4096).0,
            patches: Mutex::default(),
            unhandled: Mutex::default(),
            watchers: AtomicUsize::new(0),
            uids: AtomicU64::new(1),
        }
    }

    /// Stores `object` (or removes the key when `None`) as the next
    /// resourceVersion and tells watchers. Returns the stored object.
    fn write(&self, kind: Kind, key: Key, object: Option<Value>) -> Option<Value> {
        self.modify(kind, key, |_| Some(object)).1
    }

    /// Under the store lock: `change` gets the current object and returns
    /// `None` to leave it, or what to store (`Some(None)` removes it).
    /// Returns whether there was an object, and the stored one after.
    fn modify(
        &self,
        kind: Kind,
        key: Key,
        change: impl FnOnce(Option<&Value>) -> Option<Option<Value>>,
    ) -> (bool, Option<Value>) {
        let mut store = lock(&self.store);
        let map_key = (kind, key);
        let before = store.objects.get(&map_key).cloned();
        let existed = before.is_some();
        let Some(object) = change(before.as_ref()) else {
            return (existed, before);
        };
        if before.is_none() && object.is_none() {
            return (false, None);
        }
        store.rv += 1;
        let rv = store.rv;
        let after = object.map(|mut object| {
            self.fill_metadata(kind, &mut object, before.as_ref(), rv);
            object
        });
        match &after {
            Some(after) => store.objects.insert(map_key, after.clone()),
            None => store.objects.remove(&map_key),
        };
        let change = Arc::new(Change {
            rv,
            kind,
            before,
            after: after.clone(),
        });
        store.history.push(change.clone());
        let _ = self.changes.send(change);
        (existed, after)
    }

    /// What the apiserver sets itself: kind, resourceVersion, and uid and
    /// creationTimestamp (given, else kept from the previous version, else
    /// made up).
    fn fill_metadata(&self, kind: Kind, object: &mut Value, before: Option<&Value>, rv: u64) {
        object["apiVersion"] = json!("v1");
        object["kind"] = json!(kind.name());
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        let metadata = &mut object["metadata"];
        metadata["resourceVersion"] = json!(rv.to_string());
        for field in ["uid", "creationTimestamp"] {
            let previous = before.map(|b| &b["metadata"][field]);
            match previous {
                _ if !metadata[field].is_null() => {}
                Some(value) if !value.is_null() => metadata[field] = value.clone(),
                _ if field == "uid" => {
                    let n = self.uids.fetch_add(1, Ordering::Relaxed);
                    metadata[field] = json!(format!("00000000-0000-4000-8000-{n:012x}"));
                }
                _ => {
                    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        k8s_openapi::jiff::Timestamp::now(),
                    );
                    metadata[field] = serde_json::to_value(now).unwrap_or(Value::Null);
                }
            }
        }
    }

    fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        lock(&self.store)
            .objects
            .get(&(kind, (namespace.to_string(), name.to_string())))
            .cloned()
    }
}

/// A running stand-in apiserver.
pub struct KubeApi {
    shared: Arc<Shared>,
    kubeconfig: PathBuf,
    url: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl KubeApi {
    /// Serves plain HTTP on 127.0.0.1:<ephemeral> inside the network
    /// namespace `netns` (a path such as /run/netns/x or
    /// /proc/self/ns/net), and writes a kubeconfig for it to
    /// `dir/kubeconfig`.
    pub fn start(netns: &Path, dir: &Path) -> anyhow::Result<KubeApi> {
        std::fs::create_dir_all(dir)?;
        let netns_file =
            std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        // A socket belongs to the namespace it was created in, so only the
        // binding thread enters `netns`. It is a thread of its own, not a
        // runtime worker reached with `block_on`, so that `start` also works
        // from async tests.
        let listener = std::thread::scope(|scope| {
            scope
                .spawn(|| -> anyhow::Result<std::net::TcpListener> {
                    use std::os::fd::AsRawFd as _;
                    // SAFETY: a plain syscall on an open fd; it changes only
                    // this short-lived thread.
                    if unsafe { libc::setns(netns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error())
                            .with_context(|| format!("entering {}", netns.display()));
                    }
                    let listener = std::net::TcpListener::bind("127.0.0.1:0")
                        .context("binding the kube API server")?;
                    listener.set_nonblocking(true)?;
                    Ok(listener)
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the binding thread panicked"))?
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kube-api")
            .enable_all()
            .build()?;
        let listener = {
            let _runtime = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let url = format!("http://{}", listener.local_addr()?);
        let shared = Arc::new(Shared::new());
        let serving = shared.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // E.g. out of fds: wait rather than spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let shared = serving.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(&shared, request).await) }
                    });
                    // Errors here are clients going away mid-stream.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&url))?;
        Ok(KubeApi {
            shared,
            kubeconfig,
            url,
            runtime: Some(runtime),
        })
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Creates the namespace, or replaces its labels.
    pub fn put_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        // Kubernetes labels every namespace with its own name.
        let mut all = vec![("kubernetes.io/metadata.name", name)];
        all.extend_from_slice(labels);
        self.shared.modify(
            Kind::Namespace,
            (String::new(), name.to_string()),
            |current| {
                let mut object = current.cloned().unwrap_or_else(|| {
                    json!({
                        "metadata": {"name": name},
                        "spec": {"finalizers": ["kubernetes"]},
                        "status": {"phase": "Active"},
                    })
                });
                object["metadata"]["labels"] = labels_json(&all);
                Some(Some(object))
            },
        );
    }

    /// Creates or replaces a pod, whole: annotations a client patched in
    /// are gone unless `pod` has them. Its resourceVersion is the server's;
    /// its uid and creationTimestamp are its own, else the stored pod's,
    /// else made up.
    pub fn put_pod(&self, pod: Pod) {
        let mut object = serde_json::to_value(&pod).expect("a Pod serializes");
        let key = (
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string(),
            object["metadata"]["name"]
                .as_str()
                .expect("a pod has a name")
                .to_string(),
        );
        object["metadata"]["namespace"] = json!(key.0);
        self.shared.write(Kind::Pod, key, Some(object));
    }

    /// Replaces a stored pod's labels, keeping the rest (such as
    /// annotations a client patched in). Panics if there is no such pod.
    pub fn set_pod_labels(&self, namespace: &str, name: &str, labels: &[(&str, &str)]) {
        let key = (namespace.to_string(), name.to_string());
        let (existed, _) = self.shared.modify(Kind::Pod, key, |current| {
            let mut object = current?.clone();
            object["metadata"]["labels"] = labels_json(labels);
            Some(Some(object))
        });
        assert!(existed, "no pod {namespace}/{name}");
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) {
        self.shared
            .write(Kind::Pod, (namespace.to_string(), name.to_string()), None);
    }

    /// The stored pod, e.g. to read annotations a client patched.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.shared
            .get(Kind::Pod, namespace, name)
            .map(|object| serde_json::from_value(object).expect("a stored pod parses"))
    }

    /// `<ns>/<name> <content-type> <body>` of every PATCH received, in order.
    pub fn patches(&self) -> Vec<String> {
        lock(&self.shared.patches).clone()
    }

    /// `<status> <method> <path>[?<query>]` of requests failed for any reason
    /// but a missing object (unknown paths, methods, patch types), to
    /// explain a failing test.
    pub fn unhandled(&self) -> Vec<String> {
        lock(&self.shared.unhandled).clone()
    }

    /// Watch streams currently open.
    pub fn watchers(&self) -> usize {
        self.shared.watchers.load(Ordering::SeqCst)
    }

    /// Closes every connection and stops listening.
    pub fn stop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Waiting for the threads would panic inside an async context
            // (an async test dropping the server); the tasks stop either way.
            if tokio::runtime::Handle::try_current().is_ok() {
                runtime.shutdown_background();
            } else {
                runtime.shutdown_timeout(Duration::from_secs(1));
            }
        }
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A test pod: Running on `node` with one IP and one container.
pub fn pod(
    name: &str,
    namespace: &str,
    node: &str,
    uid: &str,
    ip: &str,
    service_account: &str,
) -> Pod {
    dual_stack_pod(name, namespace, node, uid, &[ip], service_account)
}

/// A test pod with every address in `ips` (`status.podIPs`; `podIP` is
/// the first), as a dual-stack cluster reports them.
pub fn dual_stack_pod(
    name: &str,
    namespace: &str,
    node: &str,
    uid: &str,
    ips: &[&str],
    service_account: &str,
) -> Pod {
    Pod {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            uid: Some(uid.into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            service_account_name: Some(service_account.into()),
            containers: vec![Container {
                name: "app".into(),
                image: Some("app:1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: ips.first().map(|ip| ip.to_string()),
            pod_ips: Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect()),
            ..Default::default()
        }),
    }
}

fn labels_json(labels: &[(&str, &str)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect(),
    )
}

fn kubeconfig_yaml(url: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: weir-test
  cluster:
    server: {url}
users:
- name: weir-test
  user: {{}}
contexts:
- name: weir-test
  context:
    cluster: weir-test
    user: weir-test
    namespace: default
current-context: weir-test
"
    )
}

// ---------------------------------------------------------------- requests

type Body = BoxBody<Bytes, Infallible>;

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .expect("a valid response")
}

fn status_response(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    json_response(
        code,
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        }),
    )
}

fn not_found(kind: Kind, name: &str) -> Response<Body> {
    status_response(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{} \"{name}\" not found", kind.plural()),
    )
}

/// What a list or watch asked for.
struct Query {
    params: BTreeMap<String, String>,
}

impl Query {
    fn parse(query: Option<&str>) -> Query {
        let params = query
            .unwrap_or("")
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect();
        Query { params }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (bytes[i], escaped) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 2;
            }
            (byte, _) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Field and label selectors, and the namespace of a namespaced list.
#[derive(Clone, Default)]
struct Selector {
    namespace: Option<String>,
    fields: Vec<Requirement>,
    labels: Vec<Requirement>,
}

#[derive(Clone)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

impl Requirement {
    fn parse_all(selector: Option<&str>) -> Vec<Requirement> {
        selector
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|term| !term.is_empty())
            .map(|term| {
                if let Some((k, v)) = term.split_once("!=") {
                    Requirement::NotEquals(k.trim().into(), v.trim().into())
                } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('='))
                {
                    Requirement::Equals(k.trim().into(), v.trim().into())
                } else if let Some(k) = term.strip_prefix('!') {
                    Requirement::NotExists(k.trim().into())
                } else {
                    Requirement::Exists(term.into())
                }
            })
            .collect()
    }

    /// `value` looks a key up (`None` when absent).
    fn matches<'a>(&self, value: impl Fn(&str) -> Option<&'a str>) -> bool {
        match self {
            Requirement::Equals(k, v) => value(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => value(k) != Some(v.as_str()),
            Requirement::Exists(k) => value(k).is_some(),
            Requirement::NotExists(k) => value(k).is_none(),
        }
    }
}

impl Selector {
    fn matches(&self, object: &Value) -> bool {
        if let Some(namespace) = &self.namespace
            && object["metadata"]["namespace"].as_str() != Some(namespace)
        {
            return false;
        }
        // A field is a dotted path into the object; a missing one is "", as
        // the apiserver compares it.
        let field = |path: &str| {
            Some(
                path.split('.')
                    .try_fold(object, |value, part| value.get(part))
                    .and_then(Value::as_str)
                    .unwrap_or(""),
            )
        };
        let labels = &object["metadata"]["labels"];
        let label = |key: &str| labels.get(key).and_then(Value::as_str);
        self.fields.iter().all(|r| r.matches(field)) && self.labels.iter().all(|r| r.matches(label))
    }
}

async fn handle(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = Query::parse(request.uri().query());
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let response = match (&method, segments.as_slice()) {
        (&Method::GET, ["api", "v1", "namespaces"]) => {
            collection(shared, Kind::Namespace, None, &query)
        }
        (&Method::GET, ["api", "v1", "pods"]) => collection(shared, Kind::Pod, None, &query),
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods"]) => {
            collection(shared, Kind::Pod, Some(ns), &query)
        }
        (&Method::GET, ["api", "v1", "namespaces", name]) => {
            match shared.get(Kind::Namespace, "", name) {
                Some(object) => json_response(StatusCode::OK, &object),
                None => not_found(Kind::Namespace, name),
            }
        }
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods", name]) => {
            match shared.get(Kind::Pod, ns, name) {
                Some(object) => json_response(StatusCode::OK, &object),
                None => not_found(Kind::Pod, name),
            }
        }
        (&Method::PATCH, ["api", "v1", "namespaces", ns, "pods", name]) => {
            let (ns, name) = (ns.to_string(), name.to_string());
            patch_pod(shared, &ns, &name, request).await
        }
        (_, ["api", "v1", "namespaces", ..] | ["api", "v1", "pods"]) => status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} {path} is not supported by the test apiserver"),
        ),
        _ => status_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the test apiserver does not serve {path}"),
        ),
    };
    // A 404 for an object is a normal answer; other failures mean a
    // request this stand-in does not understand.
    let missing_object = response.status() == StatusCode::NOT_FOUND
        && matches!(
            segments.as_slice(),
            ["api", "v1", "namespaces", _] | ["api", "v1", "namespaces", _, "pods", _]
        );
    if !response.status().is_success() && !missing_object {
        let query = query
            .params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let query = if query.is_empty() {
            query
        } else {
            format!("?{query}")
        };
        lock(&shared.unhandled).push(format!(
            "{} {method} {path}{query}",
            response.status().as_u16()
        ));
    }
    response
}

fn collection(
    shared: &Arc<Shared>,
    kind: Kind,
    namespace: Option<&str>,
    query: &Query,
) -> Response<Body> {
    let selector = Selector {
        namespace: namespace.map(str::to_string),
        fields: Requirement::parse_all(query.get("fieldSelector")),
        labels: Requirement::parse_all(query.get("labelSelector")),
    };
    if query.flag("watch") {
        return watch(shared, kind, selector, query);
    }
    // `limit`/`continue` are ignored: everything fits in one page.
    let store = lock(&shared.store);
    let items: Vec<Value> = store
        .objects
        .iter()
        .filter(|((k, _), object)| *k == kind && selector.matches(object))
        .map(|(_, object)| object.clone())
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "apiVersion": "v1",
            "kind": format!("{}List", kind.name()),
            "metadata": {"resourceVersion": store.rv.to_string()},
            "items": items,
        }),
    )
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn bookmark(kind: Kind, rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"apiVersion": "v1", "kind": kind.name(), "metadata": metadata}),
    )
}

/// How one change looks to a watcher with `selector`, if at all.
fn view(change: &Change, selector: &Selector) -> Option<Bytes> {
    let was = change.before.as_ref().is_some_and(|o| selector.matches(o));
    let is = change.after.as_ref().is_some_and(|o| selector.matches(o));
    match (&change.before, &change.after) {
        (_, Some(after)) if is => Some(event_line(if was { "MODIFIED" } else { "ADDED" }, after)),
        (Some(before), _) if was => {
            // Deleted, or no longer selected: the last state this watcher
            // saw, at the change's resourceVersion (as an apiserver sends).
            let mut last = before.clone();
            last["metadata"]["resourceVersion"] = json!(change.rv.to_string());
            Some(event_line("DELETED", &last))
        }
        _ => None,
    }
}

/// Counts an open watch stream for as long as it lives.
struct WatcherGuard(Arc<Shared>);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::SeqCst);
    }
}

fn watch(shared: &Arc<Shared>, kind: Kind, selector: Selector, query: &Query) -> Response<Body> {
    let bookmarks = query.flag("allowWatchBookmarks");
    let initial_events = query.flag("sendInitialEvents");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    let since = query.get("resourceVersion").unwrap_or("");

    // Replay and subscription happen under one lock, so nothing is missed
    // or sent twice.
    let mut replay = Vec::new();
    let (mut live, mut last_rv) = {
        let store = lock(&shared.store);
        let live = shared.changes.subscribe();
        match since.parse::<u64>() {
            // "" and "0" mean "the current state, then changes" (as
            // synthetic ADDED events), like an apiserver.
            Ok(rv) if rv > 0 => {
                if rv > store.rv {
                    return status_response(
                        StatusCode::GATEWAY_TIMEOUT,
                        "Timeout",
                        format!("Too large resource version: {rv}, current: {}", store.rv),
                    );
                }
                replay.extend(
                    store
                        .history
                        .iter()
                        .filter(|change| change.rv > rv && change.kind == kind)
                        .filter_map(|change| view(change, &selector)),
                );
            }
            _ => {
                replay.extend(
                    store
                        .objects
                        .iter()
                        .filter(|((k, _), object)| *k == kind && selector.matches(object))
                        .map(|(_, object)| event_line("ADDED", object)),
                );
                if initial_events {
                    replay.push(bookmark(kind, store.rv, true));
                }
            }
        }
        (live, store.rv)
    };

    let (sender, receiver) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(256);
    shared.watchers.fetch_add(1, Ordering::SeqCst);
    let guard = WatcherGuard(shared.clone());
    tokio::spawn(async move {
        let _guard = guard;
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let ended = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(ended);
        for line in replay {
            if sender.send(Ok(Frame::data(line))).await.is_err() {
                return;
            }
        }
        let mut ticker = tokio::time::interval(BOOKMARK_INTERVAL);
        ticker.reset();
        loop {
            let line = tokio::select! {
                _ = &mut ended => return,
                _ = sender.closed() => return,
                _ = ticker.tick(), if bookmarks => Some(bookmark(kind, last_rv, false)),
                change = live.recv() => match change {
                    Ok(change) => {
                        last_rv = change.rv;
                        if change.kind == kind {
                            ticker.reset();
                            view(&change, &selector)
                        } else {
                            None
                        }
                    }
                    // Fell behind: end the stream; the client re-watches
                    // from its last resourceVersion, replayed from history.
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            if let Some(line) = line
                && sender.send(Ok(Frame::data(line))).await.is_err()
            {
                return;
            }
        }
    });
    // No content-length, so hyper sends it chunked.
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(receiver)).boxed())
        .expect("a valid response")
}

async fn patch_pod(
    shared: &Arc<Shared>,
    namespace: &str,
    name: &str,
    request: Request<Incoming>,
) -> Response<Body> {
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => {
            return status_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("reading the body: {error}"),
            );
        }
    };
    let text = String::from_utf8_lossy(&body).into_owned();
    lock(&shared.patches).push(format!("{namespace}/{name} {content_type} {text}"));
    let patch: Result<Value, String> = match content_type.split(';').next().unwrap_or("").trim() {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            serde_json::from_str(&text).map_err(|e| e.to_string())
        }
        // Close enough for tests: the applied fields win.
        "application/apply-patch+yaml" => serde_yaml::from_str(&text).map_err(|e| e.to_string()),
        other => {
            return status_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!("the test apiserver does not support patches of type {other:?}"),
            );
        }
    };
    let patch = match patch {
        Ok(patch) => patch,
        Err(error) => {
            return status_response(StatusCode::BAD_REQUEST, "BadRequest", error);
        }
    };
    // Read, merge and write under the store lock, so concurrent changes to
    // the same pod are not lost.
    let (existed, object) = shared.modify(
        Kind::Pod,
        (namespace.to_string(), name.to_string()),
        |current| {
            let mut object = current?.clone();
            merge_patch(&mut object, &patch);
            // Identity is not the patch's to change.
            object["metadata"]["name"] = json!(name);
            object["metadata"]["namespace"] = json!(namespace);
            Some(Some(object))
        },
    );
    match object {
        Some(object) if existed => json_response(StatusCode::OK, &object),
        _ => not_found(Kind::Pod, name),
    }
}

/// RFC 7386 JSON merge patch: objects merge, `null` removes, anything else
/// replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let target = target.as_object_mut().expect("just made an object");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut target = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut target, &json!({"a": "z", "c": {"f": null}, "h": [1]}));
        assert_eq!(target, json!({"a": "z", "c": {"d": "e"}, "h": [1]}));
    }

    #[test]
    fn query_is_decoded() {
        let query = Query::parse(Some(
            "fieldSelector=spec.nodeName%3Dnode-a&watch=true&x=a+b",
        ));
        assert_eq!(query.get("fieldSelector"), Some("spec.nodeName=node-a"));
        assert!(query.flag("watch"));
        assert_eq!(query.get("x"), Some("a b"));
    }

    #[test]
    fn selectors_match_fields_and_labels() {
        let object = json!({
            "metadata": {"name": "p", "namespace": "n", "labels": {"app": "x"}},
            "spec": {"nodeName": "node-a"},
        });
        let selector = |fields: &str, labels: &str| Selector {
            namespace: None,
            fields: Requirement::parse_all(Some(fields)),
            labels: Requirement::parse_all(Some(labels)),
        };
        assert!(selector("spec.nodeName=node-a,metadata.name=p", "app=x").matches(&object));
        assert!(!selector("spec.nodeName=node-b", "").matches(&object));
        assert!(!selector("", "app!=x").matches(&object));
        assert!(selector("spec.hostNetwork!=true", "app,!other").matches(&object));
    }
}
