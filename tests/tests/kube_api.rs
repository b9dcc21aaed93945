//! The Kubernetes API stand-in, driven by a real kube-rs client the way the
//! agent drives an apiserver: lists and watches of pods (by node) and
//! namespaces, and merge PATCHes of pod annotations. It serves in the test's
//! own network namespace here, so no root is needed.
use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client, ResourceExt as _,
    api::{ListParams, Patch, PatchParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::watcher::{self, Event},
};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use weir_tests::kube_api::{KubeApi, pod};

const DEADLINE: Duration = Duration::from_secs(10);
const REDIRECTION: &str = "ambient.istio.io/redirection";

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "weir-kube-api-{}-{}-{name}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("creating the temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(name: &str) -> (KubeApi, TempDir) {
    let dir = TempDir::new(name);
    let api = KubeApi::start(Path::new("/proc/self/ns/net"), &dir.0).expect("starting the server");
    (api, dir)
}

async fn client(api: &KubeApi) -> Client {
    let kubeconfig = Kubeconfig::read_from(api.kubeconfig()).expect("reading the kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a config from the kubeconfig");
    assert_eq!(
        config.cluster_url.to_string().trim_end_matches('/'),
        api.url()
    );
    Client::try_from(config).expect("a client")
}

/// A `kube::runtime::watcher` polled in the background, as the agent runs
/// it (the watch after the initial list is only opened when polled).
struct Watch<K> {
    events: mpsc::UnboundedReceiver<Result<Event<K>, watcher::Error>>,
    task: tokio::task::JoinHandle<()>,
}

impl<K> Watch<K>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    fn start(api: Api<K>, config: watcher::Config) -> Watch<K> {
        let (sender, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut stream = Box::pin(watcher::watcher(api, config));
            while let Some(event) = stream.next().await {
                if sender.send(event).is_err() {
                    return;
                }
            }
        });
        Watch { events, task }
    }

    /// The next event, within the deadline.
    async fn next(&mut self) -> Event<K> {
        tokio::time::timeout(DEADLINE, self.events.recv())
            .await
            .expect("a watcher event before the deadline")
            .expect("the watcher stream goes on")
            .expect("a watcher event, not an error")
    }

    /// The initial list as the watcher reports it: `Init`, the objects,
    /// `InitDone`.
    async fn initial_names(&mut self) -> Vec<String> {
        assert!(matches!(self.next().await, Event::Init));
        let mut names = Vec::new();
        loop {
            match self.next().await {
                Event::InitApply(object) => names.push(object.meta().name.clone().unwrap()),
                Event::InitDone => return names,
                other => panic!("an event of the initial list, not {other:?}"),
            }
        }
    }
}

impl<K> Drop for Watch<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn wait_for_watchers(api: &KubeApi, count: usize) {
    tokio::time::timeout(DEADLINE, async {
        while api.watchers() != count {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} watchers, not {count}", api.watchers()));
}

fn with_labels(mut pod: Pod, labels: &[(&str, &str)]) -> Pod {
    pod.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    pod
}

#[tokio::test]
async fn lists_honour_field_and_label_selectors() {
    let (server, _dir) = start("list");
    server.put_pod(with_labels(
        pod("a1", "apps", "node-a", "uid-a1", "10.0.0.1", "sa"),
        &[("app", "one")],
    ));
    server.put_pod(pod("a2", "other", "node-a", "uid-a2", "10.0.0.2", "sa"));
    server.put_pod(pod("b1", "apps", "node-b", "uid-b1", "10.0.1.1", "sa"));
    server.put_namespace("apps", &[]);
    let client = client(&server).await;
    let pods = Api::<Pod>::all(client.clone());

    let on_a = pods
        .list(&ListParams::default().fields("spec.nodeName=node-a"))
        .await
        .expect("listing node-a's pods");
    let mut names: Vec<String> = on_a.items.iter().map(|p| p.name_any()).collect();
    names.sort();
    assert_eq!(names, ["a1", "a2"], "unhandled: {:?}", server.unhandled());
    assert!(
        on_a.metadata.resource_version.is_some_and(|rv| rv == "4"),
        "the list's resourceVersion is the last change's"
    );
    let a1 = &on_a.items.iter().find(|p| p.name_any() == "a1").unwrap();
    assert_eq!(a1.metadata.uid.as_deref(), Some("uid-a1"));
    let status = a1.status.as_ref().unwrap();
    assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.1"));
    assert_eq!(status.phase.as_deref(), Some("Running"));

    let labelled = pods
        .list(&ListParams::default().labels("app=one"))
        .await
        .unwrap();
    assert_eq!(
        labelled
            .items
            .iter()
            .map(|p| p.name_any())
            .collect::<Vec<_>>(),
        ["a1"]
    );
    let in_apps = Api::<Pod>::namespaced(client.clone(), "apps")
        .list(&ListParams::default().fields("spec.nodeName=node-a"))
        .await
        .unwrap();
    assert_eq!(
        in_apps
            .items
            .iter()
            .map(|p| p.name_any())
            .collect::<Vec<_>>(),
        ["a1"]
    );

    let namespace = Api::<Namespace>::all(client.clone())
        .get("apps")
        .await
        .unwrap();
    assert_eq!(
        namespace.labels().get("kubernetes.io/metadata.name"),
        Some(&"apps".to_string())
    );
    match Api::<Pod>::namespaced(client, "apps").get("nope").await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 404),
        other => panic!("a 404, not {other:?}"),
    }
    assert!(server.unhandled().is_empty(), "{:?}", server.unhandled());
}

#[tokio::test]
async fn pod_watcher_by_node_sees_adds_label_changes_and_deletes() {
    let (server, _dir) = start("watch-pods");
    server.put_pod(pod("a1", "apps", "node-a", "uid-a1", "10.0.0.1", "sa"));
    server.put_pod(pod("b1", "apps", "node-b", "uid-b1", "10.0.1.1", "sa"));
    let client = client(&server).await;
    let config = watcher::Config::default().fields("spec.nodeName=node-a");
    let mut events = Watch::start(Api::<Pod>::all(client), config);

    assert_eq!(events.initial_names().await, ["a1"]);
    // The watch after the list is open before anything changes (changes
    // in between would be replayed from its resourceVersion anyway).
    wait_for_watchers(&server, 1).await;

    server.put_pod(pod("a2", "apps", "node-a", "uid-a2", "10.0.0.2", "sa"));
    // On another node: never seen, so the next event is the label change.
    server.put_pod(pod("b2", "apps", "node-b", "uid-b2", "10.0.1.2", "sa"));
    server.set_pod_labels("apps", "a1", &[("app", "one")]);
    server.delete_pod("apps", "a2");

    match events.next().await {
        Event::Apply(pod) => {
            assert_eq!(pod.name_any(), "a2");
            assert_eq!(pod.metadata.uid.as_deref(), Some("uid-a2"));
        }
        other => panic!("a2 added, not {other:?}"),
    }
    match events.next().await {
        Event::Apply(pod) => {
            assert_eq!(pod.name_any(), "a1");
            assert_eq!(pod.labels().get("app"), Some(&"one".to_string()));
        }
        other => panic!("a1 relabelled, not {other:?}"),
    }
    match events.next().await {
        Event::Delete(pod) => assert_eq!(pod.name_any(), "a2"),
        other => panic!("a2 deleted, not {other:?}"),
    }

    // A closed watch is noticed.
    drop(events);
    wait_for_watchers(&server, 0).await;
    assert!(server.unhandled().is_empty(), "{:?}", server.unhandled());
}

#[tokio::test]
async fn watcher_survives_watch_timeouts() {
    let (server, _dir) = start("watch-timeout");
    server.put_pod(pod("a1", "apps", "node-a", "uid-a1", "10.0.0.1", "sa"));
    let client = client(&server).await;
    // The server ends each watch after a second; the watcher re-watches
    // from the last resourceVersion it saw, so nothing is lost or repeated.
    let config = watcher::Config::default()
        .fields("spec.nodeName=node-a")
        .timeout(1);
    let mut events = Watch::start(Api::<Pod>::all(client), config);
    assert_eq!(events.initial_names().await, ["a1"]);
    for n in 2..5 {
        server.put_pod(pod(
            &format!("a{n}"),
            "apps",
            "node-a",
            &format!("uid-a{n}"),
            &format!("10.0.0.{n}"),
            "sa",
        ));
        match events.next().await {
            Event::Apply(pod) => assert_eq!(pod.name_any(), format!("a{n}")),
            other => panic!("a{n} added, not {other:?}"),
        }
        // Outlive the current watch, so the next change comes on a new one.
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    assert!(server.unhandled().is_empty(), "{:?}", server.unhandled());
}

#[tokio::test]
async fn streaming_list_watcher_gets_initial_events() {
    let (server, _dir) = start("streaming-list");
    server.put_pod(pod("a1", "apps", "node-a", "uid-a1", "10.0.0.1", "sa"));
    server.put_pod(pod("b1", "apps", "node-b", "uid-b1", "10.0.1.1", "sa"));
    let client = client(&server).await;
    let config = watcher::Config::default()
        .fields("spec.nodeName=node-a")
        .streaming_lists();
    let mut events = Watch::start(Api::<Pod>::all(client), config);
    assert_eq!(events.initial_names().await, ["a1"]);
    server.delete_pod("apps", "a1");
    match events.next().await {
        Event::Delete(pod) => assert_eq!(pod.name_any(), "a1"),
        other => panic!("a1 deleted, not {other:?}"),
    }
}

#[tokio::test]
async fn raw_watch_gets_bookmarks_and_ends_at_its_timeout() {
    let (server, _dir) = start("bookmarks");
    server.put_namespace("apps", &[]);
    let client = client(&server).await;
    let namespaces = Api::<Namespace>::all(client);
    let rv = namespaces
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = Box::pin(
        namespaces
            .watch(&WatchParams::default().timeout(3), &rv)
            .await
            .expect("a watch"),
    );
    let event = tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("an event before the deadline")
        .expect("an event")
        .expect("not an error");
    match event {
        WatchEvent::Bookmark(bookmark) => assert_eq!(bookmark.metadata.resource_version, rv),
        other => panic!("a bookmark, not {other:?}"),
    }
    // The stream ends cleanly once its timeout passes.
    let ended = tokio::time::timeout(DEADLINE, async {
        while let Some(event) = stream.next().await {
            assert!(
                matches!(event, Ok(WatchEvent::Bookmark(_))),
                "only bookmarks: {event:?}"
            );
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch did not end at its timeout");
    wait_for_watchers(&server, 0).await;
}

#[tokio::test]
async fn namespace_watcher_sees_label_changes() {
    let (server, _dir) = start("watch-namespaces");
    server.put_namespace("apps", &[]);
    server.put_namespace("kube-system", &[]);
    let client = client(&server).await;
    let mut events = Watch::start(Api::<Namespace>::all(client), watcher::Config::default());
    let mut names = events.initial_names().await;
    names.sort();
    assert_eq!(names, ["apps", "kube-system"]);

    server.put_namespace("apps", &[("istio.io/dataplane-mode", "ambient")]);
    match events.next().await {
        Event::Apply(namespace) => {
            assert_eq!(namespace.name_any(), "apps");
            assert_eq!(
                namespace.labels().get("istio.io/dataplane-mode"),
                Some(&"ambient".to_string())
            );
        }
        other => panic!("apps relabelled, not {other:?}"),
    }
    server.put_namespace("apps", &[]);
    match events.next().await {
        Event::Apply(namespace) => {
            assert!(!namespace.labels().contains_key("istio.io/dataplane-mode"))
        }
        other => panic!("apps unlabelled, not {other:?}"),
    }
}

#[tokio::test]
async fn merge_patch_sets_and_removes_an_annotation() {
    let (server, _dir) = start("patch");
    server.put_pod(pod("a1", "apps", "node-a", "uid-a1", "10.0.0.1", "sa"));
    let client = client(&server).await;
    let mut events = Watch::start(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields("spec.nodeName=node-a"),
    );
    assert_eq!(events.initial_names().await, ["a1"]);
    let pods = Api::<Pod>::namespaced(client, "apps");

    let set = json!({"metadata": {"annotations": {REDIRECTION: "enabled"}}});
    let patched = pods
        .patch("a1", &PatchParams::default(), &Patch::Merge(&set))
        .await
        .expect("patching");
    assert_eq!(
        patched.annotations().get(REDIRECTION),
        Some(&"enabled".to_string())
    );
    let stored = server.pod("apps", "a1").expect("the pod");
    assert_eq!(
        stored.annotations().get(REDIRECTION),
        Some(&"enabled".to_string())
    );
    // The rest of the pod is untouched.
    assert_eq!(stored.metadata.uid.as_deref(), Some("uid-a1"));
    assert_eq!(
        stored.spec.as_ref().unwrap().node_name.as_deref(),
        Some("node-a")
    );
    match events.next().await {
        Event::Apply(pod) => assert_eq!(
            pod.annotations().get(REDIRECTION),
            Some(&"enabled".to_string())
        ),
        other => panic!("the patch watched, not {other:?}"),
    }

    let remove = json!({"metadata": {"annotations": {REDIRECTION: null}}});
    pods.patch("a1", &PatchParams::default(), &Patch::Merge(&remove))
        .await
        .expect("patching");
    assert!(
        !server
            .pod("apps", "a1")
            .unwrap()
            .annotations()
            .contains_key(REDIRECTION)
    );
    assert_eq!(
        server.patches(),
        [
            format!("apps/a1 application/merge-patch+json {set}"),
            format!("apps/a1 application/merge-patch+json {remove}"),
        ]
    );

    match pods
        .patch("nope", &PatchParams::default(), &Patch::Merge(&set))
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 404),
        other => panic!("a 404, not {other:?}"),
    }
    assert!(server.unhandled().is_empty(), "{:?}", server.unhandled());
}

#[tokio::test]
async fn a_pod_that_stops_matching_a_label_selector_is_deleted_for_the_watcher() {
    let (server, _dir) = start("watch-labels");
    server.put_pod(with_labels(
        pod("a1", "apps", "node-a", "uid-a1", "10.0.0.1", "sa"),
        &[("app", "one")],
    ));
    let client = client(&server).await;
    let mut events = Watch::start(
        Api::<Pod>::all(client),
        watcher::Config::default().labels("app=one"),
    );
    assert_eq!(events.initial_names().await, ["a1"]);
    server.set_pod_labels("apps", "a1", &[("app", "two")]);
    match events.next().await {
        Event::Delete(pod) => assert_eq!(pod.name_any(), "a1"),
        other => panic!("a1 deleted for this watcher, not {other:?}"),
    }
    server.set_pod_labels("apps", "a1", &[("app", "one")]);
    match events.next().await {
        Event::Apply(pod) => assert_eq!(pod.labels().get("app"), Some(&"one".to_string())),
        other => panic!("a1 back, not {other:?}"),
    }
    // Recreated under the same name: a new uid.
    server.delete_pod("apps", "a1");
    server.put_pod(with_labels(
        pod("a1", "apps", "node-a", "uid-a1-2", "10.0.0.9", "sa"),
        &[("app", "one")],
    ));
    assert!(matches!(events.next().await, Event::Delete(_)));
    match events.next().await {
        Event::Apply(pod) => assert_eq!(pod.metadata.uid.as_deref(), Some("uid-a1-2")),
        other => panic!("a1 recreated, not {other:?}"),
    }
}

#[tokio::test]
async fn requests_it_does_not_serve_are_recorded() {
    let (server, _dir) = start("unhandled");
    let client = client(&server).await;
    let result = Api::<k8s_openapi::api::core::v1::ConfigMap>::all(client)
        .list(&ListParams::default())
        .await;
    assert!(
        matches!(result, Err(kube::Error::Api(ref status)) if status.code == 404),
        "{result:?}"
    );
    assert_eq!(server.unhandled(), ["404 GET /api/v1/configmaps"]);
}
