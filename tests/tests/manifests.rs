//! The Kubernetes packaging in `deploy/`: the kustomize root, the optional
//! monitoring add-on, the Helm chart (rendered here with gtmpl) and the
//! Dockerfile.
//!
//! Every object is parsed strictly into its k8s-openapi type: k8s-openapi
//! itself ignores unknown fields, so a misspelt field (`hostNetwrk`) would
//! otherwise pass unnoticed and be dropped by the API server.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use gtmpl::{Context, Func, FuncError, Template, Value as TValue};
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount, Volume},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_yaml::Value as Yaml;
use weir_agent::config::Config;

const NAMESPACE: &str = "weir-system";
const IMAGE_REPOSITORY: &str = "ghcr.io/weir-mesh/weir";
const ISTIOD: &str = "https://istiod.istio-system.svc:15012";
/// The capabilities the agent needs, each justified in the DaemonSet.
const CAPABILITIES: [&str; 4] = ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository root")
        .to_path_buf()
}

fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Deserializes `value` into `T` and fails if any field was ignored on the way.
fn strict<T: DeserializeOwned>(value: Yaml, origin: &str) -> anyhow::Result<T> {
    let mut ignored = Vec::new();
    let parsed = serde_ignored::deserialize(value, |path| ignored.push(path.to_string()))
        .with_context(|| format!("{origin}: does not parse"))?;
    ensure!(
        ignored.is_empty(),
        "{origin}: unknown fields {}",
        ignored.join(", ")
    );
    Ok(parsed)
}

/// prometheus-operator's PodMonitor (not in k8s-openapi): only the fields
/// used here, and nothing else.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMonitor {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: PodMonitorSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMonitorSpec {
    selector: LabelSelector,
    pod_metrics_endpoints: Vec<PodMetricsEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodMetricsEndpoint {
    #[serde(rename = "targetPort")]
    target_port: u16,
    path: String,
    interval: Option<String>,
}

/// The subset of `kustomization.yaml` the deploy roots use.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    namespace: Option<String>,
    resources: Vec<String>,
}

/// `Chart.yaml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Chart {
    api_version: String,
    name: String,
    description: String,
    #[serde(rename = "type")]
    chart_type: String,
    version: String,
    app_version: String,
}

/// The objects of one install, by kind, each parsed strictly.
#[derive(Debug, Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
    services: Vec<Service>,
    pod_monitors: Vec<PodMonitor>,
    /// (kind, name) of every object.
    ids: BTreeSet<(String, String)>,
}

impl Manifests {
    /// Adds every object of a (multi-document) YAML text.
    fn add_yaml(&mut self, text: &str, origin: &str) -> anyhow::Result<()> {
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let at = format!("{origin} (document {index})");
            let value = Yaml::deserialize(document).with_context(|| format!("{at}: not YAML"))?;
            if value.is_null() {
                continue;
            }
            let kind = value
                .get("kind")
                .and_then(Yaml::as_str)
                .with_context(|| format!("{at}: no kind"))?
                .to_string();
            let name = value
                .get("metadata")
                .and_then(|metadata| metadata.get("name"))
                .and_then(Yaml::as_str)
                .with_context(|| format!("{at}: no metadata.name"))?
                .to_string();
            let at = format!("{at}: {kind} {name}");
            match kind.as_str() {
                "Namespace" => self.namespaces.push(strict(value, &at)?),
                "ServiceAccount" => self.service_accounts.push(strict(value, &at)?),
                "ClusterRole" => self.cluster_roles.push(strict(value, &at)?),
                "ClusterRoleBinding" => self.cluster_role_bindings.push(strict(value, &at)?),
                "ConfigMap" => self.config_maps.push(strict(value, &at)?),
                "DaemonSet" => self.daemon_sets.push(strict(value, &at)?),
                "Service" => self.services.push(strict(value, &at)?),
                "PodMonitor" => self.pod_monitors.push(strict(value, &at)?),
                other => bail!("{at}: unexpected kind {other}"),
            }
            ensure!(
                self.ids.insert((kind, name)),
                "{at}: defined twice in one install"
            );
        }
        Ok(())
    }

    /// Reads a kustomize root: its resources, files or directories (other
    /// kustomize roots), and checks its namespace on the namespaced objects.
    fn from_kustomization(dir: &Path) -> anyhow::Result<Manifests> {
        let mut manifests = Manifests::default();
        manifests.add_kustomization(dir)?;
        Ok(manifests)
    }

    fn add_kustomization(&mut self, dir: &Path) -> anyhow::Result<()> {
        let path = dir.join("kustomization.yaml");
        let origin = path.display().to_string();
        let kustomization: Kustomization = strict(serde_yaml::from_str(&read(&path)?)?, &origin)?;
        ensure!(
            kustomization.api_version == "kustomize.config.k8s.io/v1beta1"
                && kustomization.kind == "Kustomization",
            "{origin}: not a Kustomization"
        );
        for resource in &kustomization.resources {
            let resource = dir.join(resource);
            if resource.is_dir() {
                self.add_kustomization(&resource)?;
            } else {
                self.add_yaml(&read(&resource)?, &resource.display().to_string())?;
            }
        }
        if let Some(namespace) = &kustomization.namespace {
            for (kind, metadata) in self.namespaced() {
                ensure!(
                    metadata
                        .namespace
                        .as_deref()
                        .is_none_or(|ns| ns == namespace),
                    "{origin}: {kind} {:?} is in namespace {:?}, not {namespace}",
                    metadata.name,
                    metadata.namespace
                );
            }
        }
        Ok(())
    }

    fn namespaced(&self) -> Vec<(&'static str, &ObjectMeta)> {
        let mut all = Vec::new();
        all.extend(
            self.service_accounts
                .iter()
                .map(|o| ("ServiceAccount", &o.metadata)),
        );
        all.extend(self.config_maps.iter().map(|o| ("ConfigMap", &o.metadata)));
        all.extend(self.daemon_sets.iter().map(|o| ("DaemonSet", &o.metadata)));
        all.extend(self.services.iter().map(|o| ("Service", &o.metadata)));
        all.extend(
            self.pod_monitors
                .iter()
                .map(|o| ("PodMonitor", &o.metadata)),
        );
        all
    }

    fn all_metadata(&self) -> Vec<(&'static str, &ObjectMeta)> {
        let mut all = self.namespaced();
        all.extend(self.namespaces.iter().map(|o| ("Namespace", &o.metadata)));
        all.extend(
            self.cluster_roles
                .iter()
                .map(|o| ("ClusterRole", &o.metadata)),
        );
        all.extend(
            self.cluster_role_bindings
                .iter()
                .map(|o| ("ClusterRoleBinding", &o.metadata)),
        );
        all
    }

    fn daemon_set(&self) -> &DaemonSet {
        assert_eq!(self.daemon_sets.len(), 1, "exactly one DaemonSet");
        &self.daemon_sets[0]
    }

    fn pod_spec(&self) -> &PodSpec {
        self.daemon_set()
            .spec
            .as_ref()
            .and_then(|spec| spec.template.spec.as_ref())
            .expect("the DaemonSet has a pod spec")
    }

    fn pod_labels(&self) -> &BTreeMap<String, String> {
        self.daemon_set()
            .spec
            .as_ref()
            .and_then(|spec| spec.template.metadata.as_ref())
            .and_then(|metadata| metadata.labels.as_ref())
            .expect("the DaemonSet's pods have labels")
    }

    fn container(&self) -> &Container {
        let containers = &self.pod_spec().containers;
        assert_eq!(containers.len(), 1, "one container");
        assert_eq!(containers[0].name, "weir");
        &containers[0]
    }

    fn volume(&self, name: &str) -> &Volume {
        self.pod_spec()
            .volumes
            .iter()
            .flatten()
            .find(|volume| volume.name == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    }

    /// The agent's config from the ConfigMap the DaemonSet mounts at
    /// /etc/weir, parsed by the agent's own parser.
    fn agent_config(&self) -> Config {
        let mount = self
            .container()
            .volume_mounts
            .iter()
            .flatten()
            .find(|mount| mount.mount_path == "/etc/weir")
            .expect("the config is mounted at /etc/weir");
        let name = self
            .volume(&mount.name)
            .config_map
            .as_ref()
            .expect("/etc/weir is a ConfigMap")
            .name
            .clone();
        let config_map = self
            .config_maps
            .iter()
            .find(|config_map| config_map.metadata.name.as_deref() == Some(&name))
            .unwrap_or_else(|| panic!("the install has no ConfigMap {name}"));
        let text = config_map
            .data
            .as_ref()
            .and_then(|data| data.get("config.yaml"))
            .expect("the ConfigMap has config.yaml");
        // The node comes from $NODE_NAME in the cluster.
        assert!(
            !text.lines().any(|line| line.starts_with("node:")),
            "the config leaves node to $NODE_NAME"
        );
        let config = Config::parse(&format!("node: test-node\n{text}"), &name)
            .unwrap_or_else(|error| panic!("{error}"));
        assert!(
            config.kubernetes.is_some(),
            "the config enrolls from Kubernetes"
        );
        config
    }
}

/// What every install of the agent must satisfy, whatever rendered it.
fn check_install(manifests: &Manifests, namespace: &str) {
    for (kind, metadata) in manifests.all_metadata() {
        let labels = metadata.labels.clone().unwrap_or_default();
        for key in ["app.kubernetes.io/name", "app.kubernetes.io/part-of"] {
            assert_eq!(
                labels.get(key).map(String::as_str),
                Some("weir"),
                "{kind} {:?}: label {key}",
                metadata.name
            );
        }
    }
    for (kind, metadata) in manifests.namespaced() {
        assert_eq!(
            metadata.namespace.as_deref(),
            Some(namespace),
            "{kind} {:?}",
            metadata.name
        );
    }
    check_daemon_set(manifests);
    check_rbac(manifests, namespace);
    check_service(manifests);
    for pod_monitor in &manifests.pod_monitors {
        check_pod_monitor(pod_monitor, manifests.pod_labels());
    }
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty()
        && selector
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
}

fn check_daemon_set(manifests: &Manifests) {
    let daemon_set = manifests.daemon_set();
    let spec = daemon_set.spec.as_ref().expect("DaemonSet spec");
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    assert!(
        selects(&selector, manifests.pod_labels()),
        "the selector matches the pods"
    );
    let update = spec.update_strategy.as_ref().expect("an update strategy");
    assert_eq!(update.type_.as_deref(), Some("RollingUpdate"));
    // The agent's hand-over needs the successor beside the old agent.
    let rolling = update.rolling_update.as_ref().expect("rollingUpdate");
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));

    let pod = manifests.pod_spec();
    assert_eq!(pod.host_network, Some(true), "hostNetwork");
    assert_eq!(pod.host_pid, Some(true), "hostPID");
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(
                |toleration| toleration.operator.as_deref() == Some("Exists")
                    && toleration.key.is_none()
                    && toleration.effect.is_none()
            ),
        "tolerates every taint"
    );
    let account = pod
        .service_account_name
        .as_deref()
        .expect("a service account");
    assert!(
        manifests
            .service_accounts
            .iter()
            .any(|sa| sa.metadata.name.as_deref() == Some(account)),
        "ServiceAccount {account} is part of the install"
    );

    let container = manifests.container();
    let image = container.image.as_deref().expect("an image");
    assert_image_pinned(image);
    assert_eq!(container.image_pull_policy.as_deref(), Some("IfNotPresent"));
    assert_eq!(
        container.args.as_deref(),
        Some(
            &[
                "run",
                "--config",
                "/etc/weir/config.yaml",
                "--log-format",
                "json"
            ]
            .map(String::from)[..]
        )
    );
    let node_name = container
        .env
        .iter()
        .flatten()
        .find(|env| env.name == "NODE_NAME")
        .expect("NODE_NAME is set");
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .and_then(|from| from.field_ref.as_ref())
            .map(|field| field.field_path.as_str()),
        Some("spec.nodeName")
    );

    let security = container
        .security_context
        .as_ref()
        .expect("a security context");
    assert_ne!(security.privileged, Some(true), "not privileged");
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: BTreeSet<&str> = capabilities
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    assert_eq!(
        added,
        BTreeSet::from(CAPABILITIES),
        "exactly the justified capabilities"
    );

    check_mounts(manifests);

    for (which, probe) in [
        ("readiness", &container.readiness_probe),
        ("liveness", &container.liveness_probe),
    ] {
        let get = probe
            .as_ref()
            .and_then(|probe| probe.http_get.as_ref())
            .unwrap_or_else(|| panic!("an HTTP {which} probe"));
        assert_eq!(get.path.as_deref(), Some("/healthz/ready"), "{which}");
        assert_eq!(get.port, IntOrString::Int(15021), "{which}");
    }
    let liveness = container.liveness_probe.as_ref().expect("liveness");
    assert!(
        liveness.failure_threshold.unwrap_or(3) * liveness.period_seconds.unwrap_or(10) >= 60,
        "liveness tolerates at least a minute without readiness"
    );

    // With hostNetwork, containerPorts are host ports: the surge pod of an
    // update could not be scheduled beside the old one.
    assert!(
        container.ports.as_deref().unwrap_or_default().is_empty(),
        "no containerPorts"
    );

    let resources = container.resources.as_ref().expect("resources");
    let requests = resources.requests.as_ref().expect("requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
    let limits = resources.limits.as_ref().expect("limits");
    assert!(limits.contains_key("memory"), "a memory limit");
    assert!(
        !limits.contains_key("cpu"),
        "no CPU limit: the proxy is not throttled"
    );

    let config = manifests.agent_config();
    let kubernetes = config.kubernetes.as_ref().expect("kubernetes section");
    let grace = pod
        .termination_grace_period_seconds
        .expect("terminationGracePeriodSeconds");
    assert!(
        u64::try_from(grace).expect("positive grace period") > kubernetes.drain_seconds,
        "terminationGracePeriodSeconds {grace} must exceed drain_seconds {}",
        kubernetes.drain_seconds
    );
    assert_eq!(kubernetes.proc_root, Path::new("/host/proc"));
    assert_eq!(config.bpffs, Path::new("/sys/fs/bpf"));
}

/// Tag of an image reference; `None` when it has none (a digest counts as
/// pinned and is returned as the tag).
fn image_tag(image: &str) -> Option<&str> {
    if let Some((_, digest)) = image.split_once('@') {
        return Some(digest);
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    last.split_once(':').map(|(_, tag)| tag)
}

fn assert_image_pinned(image: &str) {
    let tag = image_tag(image).unwrap_or_else(|| panic!("image {image} has no tag"));
    assert!(
        !tag.is_empty() && tag != "latest",
        "image {image} is not pinned"
    );
}

fn check_mounts(manifests: &Manifests) {
    let container = manifests.container();
    let mounts: BTreeMap<&str, _> = container
        .volume_mounts
        .iter()
        .flatten()
        .map(|mount| (mount.mount_path.as_str(), mount))
        .collect();
    // mount path -> (host path, read-only, propagation)
    let host_mounts = [
        ("/sys/fs/bpf", "/sys/fs/bpf", false, Some("HostToContainer")),
        ("/host/sys/fs/cgroup", "/sys/fs/cgroup", false, None),
        ("/host/proc", "/proc", true, None),
        (
            "/var/run/netns",
            "/var/run/netns",
            false,
            Some("HostToContainer"),
        ),
    ];
    for (mount_path, host_path, read_only, propagation) in host_mounts {
        let mount = mounts
            .get(mount_path)
            .unwrap_or_else(|| panic!("{mount_path} is mounted"));
        let volume = manifests.volume(&mount.name);
        assert_eq!(
            volume.host_path.as_ref().map(|host| host.path.as_str()),
            Some(host_path),
            "{mount_path}"
        );
        assert_eq!(
            mount.read_only.unwrap_or(false),
            read_only,
            "{mount_path} read-only"
        );
        assert_eq!(
            mount.mount_propagation.as_deref(),
            propagation,
            "{mount_path}"
        );
    }
    assert!(
        mounts
            .values()
            .all(|mount| mount.mount_propagation.as_deref() != Some("Bidirectional")),
        "Bidirectional propagation needs a privileged container"
    );
    let config = mounts.get("/etc/weir").expect("the config is mounted");
    assert!(manifests.volume(&config.name).config_map.is_some());
}

fn check_rbac(manifests: &Manifests, namespace: &str) {
    assert_eq!(manifests.cluster_roles.len(), 1, "one ClusterRole");
    let role = &manifests.cluster_roles[0];
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                granted
                    .entry((group.clone(), resource.clone()))
                    .or_default()
                    .extend(rule.verbs.iter().cloned());
            }
        }
    }
    let verbs = |list: &[&str]| list.iter().map(|verb| verb.to_string()).collect();
    let expected = BTreeMap::from([
        (
            (String::new(), "pods".to_string()),
            verbs(&["get", "list", "watch", "patch"]),
        ),
        (
            (String::new(), "namespaces".to_string()),
            verbs(&["get", "list", "watch"]),
        ),
    ]);
    assert_eq!(
        granted, expected,
        "the ClusterRole grants only what the agent needs"
    );

    assert_eq!(
        manifests.cluster_role_bindings.len(),
        1,
        "one ClusterRoleBinding"
    );
    let binding = &manifests.cluster_role_bindings[0];
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(
        Some(subjects[0].name.as_str()),
        manifests.pod_spec().service_account_name.as_deref()
    );
    assert_eq!(subjects[0].namespace.as_deref(), Some(namespace));
}

fn check_service(manifests: &Manifests) {
    assert_eq!(manifests.services.len(), 1, "one Service");
    let service = &manifests.services[0];
    assert!(
        service
            .metadata
            .name
            .as_deref()
            .is_some_and(|name| name.ends_with("-metrics")),
        "{:?}",
        service.metadata.name
    );
    let annotations = service.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        annotations.get("prometheus.io/port").map(String::as_str),
        Some("15020")
    );
    let spec = service.spec.as_ref().expect("Service spec");
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"), "headless");
    let selector = spec.selector.clone().unwrap_or_default();
    assert!(
        selects(&selector, manifests.pod_labels()),
        "the Service selects the agents"
    );
    let ports = spec.ports.as_deref().unwrap_or_default();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].port, 15020);
    assert_eq!(ports[0].name.as_deref(), Some("http-metrics"));
    assert_eq!(ports[0].target_port, Some(IntOrString::Int(15020)));
}

fn check_pod_monitor(pod_monitor: &PodMonitor, pod_labels: &BTreeMap<String, String>) {
    assert_eq!(pod_monitor.api_version, "monitoring.coreos.com/v1");
    assert_eq!(pod_monitor.kind, "PodMonitor");
    let selector = pod_monitor
        .spec
        .selector
        .match_labels
        .clone()
        .unwrap_or_default();
    assert!(
        selects(&selector, pod_labels),
        "the PodMonitor selects the agents"
    );
    let endpoints = &pod_monitor.spec.pod_metrics_endpoints;
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0].target_port, 15020);
    assert_eq!(endpoints[0].path, "/metrics");
    assert!(
        endpoints[0]
            .interval
            .as_deref()
            .is_none_or(|i| i.ends_with('s'))
    );
}

fn kustomize() -> Manifests {
    Manifests::from_kustomization(&deploy_dir()).unwrap_or_else(|error| panic!("{error:#}"))
}

#[test]
fn kustomize_root_parses_strictly_and_holds_the_install() {
    let manifests = kustomize();
    let ids: BTreeSet<(&str, &str)> = manifests
        .ids
        .iter()
        .map(|(kind, name)| (kind.as_str(), name.as_str()))
        .collect();
    assert_eq!(
        ids,
        BTreeSet::from([
            ("Namespace", NAMESPACE),
            ("ServiceAccount", "weir"),
            ("ClusterRole", "weir"),
            ("ClusterRoleBinding", "weir"),
            ("ConfigMap", "weir-config"),
            ("DaemonSet", "weir"),
            ("Service", "weir-metrics"),
        ])
    );
    check_install(&manifests, NAMESPACE);

    let config = manifests.agent_config();
    assert!(config.xds.is_none(), "the base has no control plane");
    assert!(config.ca.istio.is_none(), "the base uses the built-in CA");
    let image = manifests.container().image.clone().expect("an image");
    assert_eq!(
        image,
        format!("{IMAGE_REPOSITORY}:{}", helm_chart().app_version)
    );
}

#[test]
fn strict_parser_rejects_a_misspelt_field() {
    let path = deploy_dir().join("base/daemonset.yaml");
    let text = read(&path).expect("the DaemonSet");
    let misspelt = text.replacen("hostNetwork:", "hostNetwrk:", 1);
    assert_ne!(misspelt, text);
    // k8s-openapi alone drops the field without a word...
    let lenient: DaemonSet = serde_yaml::from_str(&misspelt).expect("lenient parse");
    let pod = lenient
        .spec
        .and_then(|spec| spec.template.spec)
        .expect("pod spec");
    assert_eq!(pod.host_network, None);
    // ...the strict parser names it.
    let error = Manifests::default()
        .add_yaml(&misspelt, "misspelt")
        .expect_err("a misspelt field is rejected");
    assert!(format!("{error:#}").contains("hostNetwrk"), "{error:#}");
}

#[test]
fn monitoring_add_on_is_a_pod_monitor_for_the_agents() {
    let monitoring =
        Manifests::from_kustomization(&deploy_dir().join("monitoring")).expect("monitoring");
    assert_eq!(monitoring.pod_monitors.len(), 1);
    assert_eq!(monitoring.ids.len(), 1, "only the PodMonitor");
    let pod_monitor = &monitoring.pod_monitors[0];
    assert_eq!(pod_monitor.metadata.namespace.as_deref(), Some(NAMESPACE));
    check_pod_monitor(pod_monitor, kustomize().pod_labels());

    let error = Manifests::default()
        .add_yaml(
            "apiVersion: monitoring.coreos.com/v1\nkind: PodMonitor\nmetadata: {name: x}\n\
             spec: {selector: {}, podMetricsEndpoints: [{targetPort: 1, path: /m, intervall: 1s}]}\n",
            "misspelt",
        )
        .expect_err("a misspelt PodMonitor field is rejected");
    assert!(format!("{error:#}").contains("intervall"), "{error:#}");
}

/// `kubectl kustomize` on each root yields the objects read here.
#[test]
fn kubectl_kustomize_agrees() {
    for dir in [deploy_dir(), deploy_dir().join("monitoring")] {
        let output = match Command::new("kubectl").arg("kustomize").arg(&dir).output() {
            Ok(output) => output,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => panic!(
                "kubectl is not on PATH, so `kubectl kustomize` cannot cross-check deploy/: \
                 `cargo xtask setup` installs it (Debian: apt-get install kubernetes-client)"
            ),
            Err(error) => panic!("cannot run kubectl: {error}"),
        };
        assert!(
            output.status.success(),
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let mut built = Manifests::default();
        built
            .add_yaml(
                &String::from_utf8(output.stdout).expect("UTF-8 output"),
                "kubectl kustomize",
            )
            .unwrap_or_else(|error| panic!("{error:#}"));
        let ours = Manifests::from_kustomization(&dir).expect("kustomization");
        assert_eq!(built.ids, ours.ids, "{}", dir.display());
        for (kind, metadata) in built.namespaced() {
            assert_eq!(metadata.namespace.as_deref(), Some(NAMESPACE), "{kind}");
        }
    }
}

// ---------------------------------------------------------------------------
// Helm: the chart's templates rendered by gtmpl, with the few sprig functions
// the chart uses.

fn helm_dir() -> PathBuf {
    deploy_dir().join("helm/weir")
}

fn helm_chart() -> Chart {
    let path = helm_dir().join("Chart.yaml");
    let value = serde_yaml::from_str(&read(&path).expect("Chart.yaml")).expect("YAML");
    let chart: Chart = strict(value, "Chart.yaml").unwrap_or_else(|error| panic!("{error:#}"));
    assert_eq!(chart.api_version, "v2");
    assert_eq!(chart.chart_type, "application");
    assert!(!chart.description.is_empty());
    chart
}

fn func_error(message: impl Into<String>) -> FuncError {
    FuncError::Generic(message.into())
}

fn yaml_to_template(value: &Yaml) -> anyhow::Result<TValue> {
    Ok(match value {
        Yaml::Null => TValue::Nil,
        Yaml::Bool(b) => TValue::Bool(*b),
        Yaml::Number(n) => {
            if let Some(u) = n.as_u64() {
                TValue::from(u)
            } else if let Some(i) = n.as_i64() {
                TValue::from(i)
            } else {
                TValue::from(n.as_f64().context("a number")?)
            }
        }
        Yaml::String(s) => TValue::from(s.as_str()),
        Yaml::Sequence(items) => TValue::Array(
            items
                .iter()
                .map(yaml_to_template)
                .collect::<anyhow::Result<_>>()?,
        ),
        Yaml::Mapping(map) => TValue::Map(
            map.iter()
                .map(|(key, value)| {
                    let key = key.as_str().context("values keys are strings")?;
                    Ok((key.to_string(), yaml_to_template(value)?))
                })
                .collect::<anyhow::Result<HashMap<_, _>>>()?,
        ),
        Yaml::Tagged(tagged) => bail!("unexpected YAML tag {}", tagged.tag),
    })
}

fn template_to_yaml(value: &TValue) -> Result<Yaml, FuncError> {
    Ok(match value {
        TValue::NoValue | TValue::Nil => Yaml::Null,
        TValue::Bool(b) => Yaml::Bool(*b),
        TValue::String(s) => Yaml::String(s.clone()),
        TValue::Number(n) => {
            if let Some(u) = n.as_u64() {
                Yaml::from(u)
            } else if let Some(i) = n.as_i64() {
                Yaml::from(i)
            } else {
                Yaml::from(n.as_f64().ok_or_else(|| func_error("not a number"))?)
            }
        }
        TValue::Array(items) => Yaml::Sequence(
            items
                .iter()
                .map(template_to_yaml)
                .collect::<Result<_, _>>()?,
        ),
        TValue::Map(map) | TValue::Object(map) => {
            // Sorted keys, as Helm's toYaml prints them.
            let sorted: BTreeMap<&String, &TValue> = map.iter().collect();
            Yaml::Mapping(
                sorted
                    .into_iter()
                    .map(|(key, value)| Ok((Yaml::String(key.clone()), template_to_yaml(value)?)))
                    .collect::<Result<_, FuncError>>()?,
            )
        }
        TValue::Function(_) => return Err(func_error("toYaml: a function")),
    })
}

fn is_empty(value: &TValue) -> bool {
    match value {
        TValue::NoValue | TValue::Nil => true,
        TValue::Bool(b) => !b,
        TValue::String(s) => s.is_empty(),
        TValue::Array(items) => items.is_empty(),
        TValue::Map(map) | TValue::Object(map) => map.is_empty(),
        TValue::Number(n) => n.as_f64() == Some(0.0),
        TValue::Function(_) => false,
    }
}

/// sprig `quote`: each non-nil argument as a double-quoted string.
fn quote(args: &[TValue]) -> Result<TValue, FuncError> {
    let quoted: Vec<String> = args
        .iter()
        .filter(|arg| !matches!(arg, TValue::Nil | TValue::NoValue))
        .map(|arg| serde_json::to_string(&arg.to_string()).map_err(|e| func_error(e.to_string())))
        .collect::<Result<_, _>>()?;
    Ok(TValue::from(quoted.join(" ")))
}

/// sprig `default DEFAULT VALUE`: VALUE unless it is empty.
fn default(args: &[TValue]) -> Result<TValue, FuncError> {
    match args {
        [fallback] => Ok(fallback.clone()),
        [fallback, given] => Ok(if is_empty(given) { fallback } else { given }.clone()),
        _ => Err(FuncError::ExactlyXArgs("default".into(), 2)),
    }
}

/// Helm `toYaml`: YAML without the final newline.
fn to_yaml(args: &[TValue]) -> Result<TValue, FuncError> {
    let [value] = args else {
        return Err(FuncError::ExactlyXArgs("toYaml".into(), 1));
    };
    let text = serde_yaml::to_string(&template_to_yaml(value)?)
        .map_err(|error| func_error(error.to_string()))?;
    Ok(TValue::from(text.trim_end_matches('\n')))
}

fn indent_by(name: &str, args: &[TValue]) -> Result<String, FuncError> {
    let [width, text] = args else {
        return Err(FuncError::ExactlyXArgs(name.into(), 2));
    };
    let width = match width {
        TValue::Number(n) => n.as_u64(),
        _ => None,
    }
    .and_then(|n| usize::try_from(n).ok())
    .ok_or_else(|| func_error(format!("{name}: the width must be a number")))?;
    let pad = " ".repeat(width);
    Ok(format!(
        "{pad}{}",
        text.to_string().replace('\n', &format!("\n{pad}"))
    ))
}

/// sprig `indent N TEXT`.
fn indent(args: &[TValue]) -> Result<TValue, FuncError> {
    indent_by("indent", args).map(TValue::from)
}

/// sprig `nindent N TEXT`: a newline, then `indent`.
fn nindent(args: &[TValue]) -> Result<TValue, FuncError> {
    indent_by("nindent", args).map(|text| TValue::from(format!("\n{text}")))
}

const HELM_FUNCS: [(&str, Func); 5] = [
    ("quote", quote as Func),
    ("default", default as Func),
    ("toYaml", to_yaml as Func),
    ("nindent", nindent as Func),
    ("indent", indent as Func),
];

/// Sets `path` (dotted) in `values`; the key must exist in values.yaml.
fn set_value(values: &mut Yaml, path: &str, value: Yaml) -> anyhow::Result<()> {
    let mut at = values;
    for key in path.split('.') {
        at = at
            .get_mut(key)
            .with_context(|| format!("values.yaml has no {path}"))?;
    }
    *at = value;
    Ok(())
}

/// Renders every template of the chart, as `helm template` would with
/// `--set` for each override.
fn render_chart(release: &str, namespace: &str, overrides: &[(&str, Yaml)]) -> Manifests {
    let chart = helm_chart();
    let mut values: Yaml =
        serde_yaml::from_str(&read(&helm_dir().join("values.yaml")).expect("values.yaml"))
            .expect("values.yaml is YAML");
    for (path, value) in overrides {
        set_value(&mut values, path, value.clone()).unwrap_or_else(|error| panic!("{error:#}"));
    }
    let text_map = |pairs: &[(&str, &str)]| {
        TValue::Map(
            pairs
                .iter()
                .map(|(key, value)| (key.to_string(), TValue::from(*value)))
                .collect(),
        )
    };
    let context = TValue::Map(HashMap::from([
        (
            "Values".to_string(),
            yaml_to_template(&values).expect("values convert"),
        ),
        (
            "Release".to_string(),
            text_map(&[("Name", release), ("Namespace", namespace)]),
        ),
        (
            "Chart".to_string(),
            text_map(&[
                ("Name", &chart.name),
                ("Version", &chart.version),
                ("AppVersion", &chart.app_version),
            ]),
        ),
    ]));

    let mut templates: Vec<PathBuf> = std::fs::read_dir(helm_dir().join("templates"))
        .expect("templates/")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| {
            path.extension().is_some_and(|ext| ext == "yaml")
                && !path
                    .file_name()
                    .is_some_and(|name| name.to_string_lossy().starts_with('_'))
        })
        .collect();
    templates.sort();
    assert!(!templates.is_empty(), "the chart has templates");

    let mut manifests = Manifests::default();
    for path in templates {
        let origin = path.display().to_string();
        let mut template = Template::default();
        template.add_funcs(&HELM_FUNCS);
        template
            .parse(read(&path).expect("template"))
            .unwrap_or_else(|error| panic!("{origin}: {error}"));
        let rendered = template
            .render(&Context::from(context.clone()))
            .unwrap_or_else(|error| panic!("{origin}: {error}"));
        assert!(
            !rendered.contains("<no value>"),
            "{origin} reads a value that is not in values.yaml:\n{rendered}"
        );
        manifests
            .add_yaml(&rendered, &origin)
            .unwrap_or_else(|error| panic!("{error:#}\n{rendered}"));
    }
    manifests
}

fn ids_without_namespace(manifests: &Manifests) -> BTreeSet<(String, String)> {
    manifests
        .ids
        .iter()
        .filter(|(kind, _)| kind != "Namespace")
        .cloned()
        .collect()
}

#[test]
fn helm_chart_defaults_render_the_kustomize_objects() {
    let rendered = render_chart("weir", NAMESPACE, &[]);
    assert_eq!(
        ids_without_namespace(&rendered),
        ids_without_namespace(&kustomize())
    );
    check_install(&rendered, NAMESPACE);

    let config = rendered.agent_config();
    assert!(config.xds.is_none(), "no control plane by default");
    assert!(config.ca.istio.is_none(), "the built-in CA by default");
    assert_eq!(config.trust_domain, "cluster.local");
    assert!(config.capture.exclude_ports.is_empty());
    assert!(!config.capture.accelerate);
    let kustomize_config = kustomize().agent_config();
    assert_eq!(
        config, kustomize_config,
        "the chart's default config is the base's"
    );

    let chart = helm_chart();
    assert_eq!(
        rendered.container().image.as_deref(),
        Some(format!("{IMAGE_REPOSITORY}:{}", chart.app_version).as_str())
    );
    assert!(
        rendered
            .pod_spec()
            .volumes
            .iter()
            .flatten()
            .all(|v| v.projected.is_none()),
        "no Istio token without Istio"
    );
}

#[test]
fn helm_chart_points_the_agent_at_istiod() {
    let rendered = render_chart(
        "weir",
        NAMESPACE,
        &[
            ("xds.address", Yaml::from(ISTIOD)),
            ("ca.address", Yaml::from(ISTIOD)),
            ("trustDomain", Yaml::from("example.org")),
            ("capture.excludePorts", Yaml::Sequence(vec![Yaml::from(22)])),
            (
                "capture.excludeCidrs",
                Yaml::Sequence(vec![Yaml::from("169.254.0.0/16")]),
            ),
            ("drainSeconds", Yaml::from(5)),
        ],
    );
    check_install(&rendered, NAMESPACE);

    let config = rendered.agent_config();
    let xds = config.xds.as_ref().expect("xds is configured");
    assert_eq!(xds.address, ISTIOD);
    let istio = config.ca.istio.as_ref().expect("Istio's CA is configured");
    assert_eq!(istio.address, ISTIOD);
    assert_eq!(config.trust_domain, "example.org");
    assert_eq!(config.capture.exclude_ports, BTreeSet::from([22]));
    assert_eq!(config.capture.exclude_cidrs.len(), 1);
    assert_eq!(config.kubernetes.as_ref().map(|k| k.drain_seconds), Some(5));

    // The root certificate and the token the config names are mounted.
    let mounts: BTreeMap<&str, &str> = rendered
        .container()
        .volume_mounts
        .iter()
        .flatten()
        .map(|mount| (mount.mount_path.as_str(), mount.name.as_str()))
        .collect();
    let root = rendered.volume(mounts["/var/run/secrets/istio"]);
    let root = root
        .config_map
        .as_ref()
        .expect("istio-ca-root-cert ConfigMap");
    assert_eq!(root.name, "istio-ca-root-cert");
    assert_eq!(root.optional, Some(true), "the pod starts without Istio");
    let token = rendered.volume(mounts["/var/run/secrets/tokens"]);
    let token = token
        .projected
        .as_ref()
        .and_then(|projected| projected.sources.as_ref())
        .and_then(|sources| {
            sources
                .iter()
                .find_map(|s| s.service_account_token.as_ref())
        })
        .expect("a projected service-account token");
    assert_eq!(token.audience.as_deref(), Some("istio-ca"));
    let token_file = Path::new("/var/run/secrets/tokens").join(&token.path);
    for (what, root_cert, token_path) in [
        ("xds", xds.root_cert.as_deref(), xds.token_file.as_deref()),
        (
            "ca.istio",
            Some(istio.root_cert.as_path()),
            istio.token_file.as_deref(),
        ),
    ] {
        assert!(
            root_cert.is_some_and(|path| path.starts_with("/var/run/secrets/istio")),
            "{what}: root_cert {root_cert:?}"
        );
        assert_eq!(token_path, Some(token_file.as_path()), "{what}: token_file");
    }
}

#[test]
fn helm_chart_follows_the_release_name_and_namespace() {
    let rendered = render_chart("mesh", "infra", &[("podMonitor.enabled", Yaml::from(true))]);
    check_install(&rendered, "infra");
    let names: BTreeSet<&str> = rendered.ids.iter().map(|(_, name)| name.as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["mesh", "mesh-config", "mesh-metrics"])
    );
    assert_eq!(
        rendered.pod_monitors.len(),
        1,
        "podMonitor.enabled renders a PodMonitor"
    );
    rendered.agent_config();
}

// ---------------------------------------------------------------------------
// Dockerfile

/// A Dockerfile instruction: (keyword, arguments).
type Instruction = (String, String);

/// One `FROM` and the instructions that follow it.
struct Stage {
    image: String,
    name: Option<String>,
    body: Vec<Instruction>,
}

/// Dockerfile instructions (continuation lines joined, comments dropped) as
/// (keyword, arguments).
fn dockerfile_instructions(text: &str) -> Vec<Instruction> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(continued) = trimmed.strip_suffix('\\') {
            current.push_str(continued);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        if let Some((keyword, arguments)) = current.split_once(char::is_whitespace) {
            instructions.push((keyword.to_uppercase(), arguments.trim().to_string()));
        }
        current.clear();
    }
    instructions
}

#[test]
fn dockerfile_builds_in_one_pinned_stage_and_runs_in_another() {
    let text = read(&deploy_dir().join("Dockerfile")).expect("deploy/Dockerfile");
    let instructions = dockerfile_instructions(&text);

    // The stages, in order: the first builds, the last runs.
    let mut stages: Vec<Stage> = Vec::new();
    for (keyword, arguments) in instructions {
        if keyword == "FROM" {
            let words: Vec<&str> = arguments
                .split_whitespace()
                .filter(|word| !word.starts_with("--"))
                .collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                [_] => None,
                other => panic!("unexpected FROM {other:?}"),
            };
            stages.push(Stage {
                image: words[0].to_string(),
                name,
                body: Vec::new(),
            });
        } else {
            let stage = stages.last_mut().expect("FROM comes first");
            stage.body.push((keyword, arguments));
        }
    }
    assert!(stages.len() >= 2, "a build stage and a runtime stage");
    for stage in &stages {
        assert_image_pinned(&stage.image);
    }

    // The build stage uses the toolchains the repository pins.
    let Stage {
        image: build_image,
        name: build_name,
        body: build,
    } = &stages[0];
    let toolchain = read(&repo_root().join("rust-toolchain.toml")).expect("rust-toolchain.toml");
    let channel = toolchain
        .lines()
        .find_map(|line| line.trim().strip_prefix("channel = "))
        .map(|value| value.trim_matches('"'))
        .expect("a pinned channel");
    assert!(
        build_image.starts_with(&format!("rust:{channel}")),
        "{build_image} is the toolchain of rust-toolchain.toml ({channel})"
    );
    let build_rs = read(&repo_root().join("agent/build.rs")).expect("agent/build.rs");
    let nightly = build_rs
        .lines()
        .find_map(|line| line.trim().strip_prefix("const EBPF_TOOLCHAIN: &str = "))
        .map(|value| value.trim_end_matches(';').trim_matches('"'))
        .expect("EBPF_TOOLCHAIN in agent/build.rs");
    let build_runs: String = build
        .iter()
        .filter(|(keyword, _)| keyword == "RUN")
        .map(|(_, arguments)| arguments.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for needed in [
        nightly,
        "rust-src",
        "bpf-linker@0.10.4",
        "-p weir-agent",
        "--release",
    ] {
        assert!(build_runs.contains(needed), "the build stage runs {needed}");
    }

    // The runtime stage: the tools the agent runs, and the binary.
    let runtime = &stages.last().expect("a runtime stage").body;
    let runtime_runs: String = runtime
        .iter()
        .filter(|(keyword, _)| keyword == "RUN")
        .map(|(_, arguments)| arguments.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(runtime_runs.contains("apt-get install"));
    for package in ["bpftool", "iproute2", "procps", "ca-certificates"] {
        assert!(
            runtime_runs.contains(package),
            "the runtime installs {package}"
        );
    }
    let build_name = build_name.as_deref().expect("the build stage is named");
    assert!(
        runtime.iter().any(|(keyword, arguments)| keyword == "COPY"
            && arguments.contains(&format!("--from={build_name}"))
            && arguments.contains("target/release/weir")
            && arguments.ends_with("/usr/local/bin/weir")),
        "the runtime copies the weir binary from the build stage"
    );
    assert!(
        runtime
            .iter()
            .any(|(keyword, arguments)| keyword == "ENTRYPOINT"
                && arguments.contains("/usr/local/bin/weir")),
        "the entrypoint is weir"
    );

    let ignore = read(&repo_root().join(".dockerignore")).expect(".dockerignore");
    let ignored: BTreeSet<&str> = ignore
        .lines()
        .map(|line| line.trim_end_matches('/'))
        .collect();
    assert!(ignored.contains("target") && ignored.contains(".git"));
}
