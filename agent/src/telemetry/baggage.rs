//! The `baggage` header of an HBONE `CONNECT` and of its `200`, in
//! ztunnel's keys: who the other end is, so that a peer that does not have
//! this end in its own state still labels its metrics with it.
use http::HeaderValue;

use super::metrics::Peer;
use crate::{security::identity::Identity, state::Workload};

pub const HEADER: &str = "baggage";

/// What one end says of itself; empty fields were not said.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Baggage {
    /// `deployment`, `cronjob`, `job` or `pod`: the key the workload's
    /// name is sent under (`k8s.<kind>.name`).
    pub workload_type: &'static str,
    pub cluster: String,
    pub namespace: String,
    pub workload_name: String,
    /// Istio's canonical service and revision.
    pub service_name: String,
    pub revision: String,
    pub region: String,
    pub zone: String,
}

impl Baggage {
    pub fn of(workload: &Workload) -> Baggage {
        let (service_name, revision) = super::metrics::app_and_version(Some(workload));
        let said = |value: String| {
            if value == "unknown" {
                String::new()
            } else {
                value
            }
        };
        Baggage {
            workload_type: workload.workload_type,
            cluster: workload.cluster_id.clone(),
            namespace: workload.namespace.clone(),
            workload_name: workload.workload_name.clone(),
            service_name: said(service_name),
            revision: said(revision),
            region: workload.locality.region.clone(),
            zone: workload.locality.zone.clone(),
        }
    }

    /// The header's value.
    pub fn header(&self) -> Option<HeaderValue> {
        let workload_key = match self.workload_type {
            "cronjob" => "k8s.cronjob.name",
            "job" => "k8s.job.name",
            "pod" => "k8s.pod.name",
            _ => "k8s.deployment.name",
        };
        let value = [
            ("k8s.cluster.name", &self.cluster),
            ("k8s.namespace.name", &self.namespace),
            (workload_key, &self.workload_name),
            ("service.name", &self.service_name),
            ("service.version", &self.revision),
            ("cloud.region", &self.region),
            ("cloud.availability_zone", &self.zone),
        ]
        .iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",");
        // A value that is not a valid header (a name with a control
        // character) is left out rather than sent broken.
        HeaderValue::from_str(&value)
            .ok()
            .filter(|value| !value.is_empty())
    }

    /// Every `baggage` header of a request or response; unknown keys and
    /// members that are not `key=value` are skipped.
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a HeaderValue>) -> Option<Baggage> {
        let mut baggage = Baggage::default();
        let mut any = false;
        for value in values {
            let Ok(text) = value.to_str() else {
                continue;
            };
            for member in text.split(',') {
                // W3C baggage: properties after `;` are not the value.
                let member = member.split(';').next().unwrap_or_default();
                let Some((key, value)) = member.split_once('=') else {
                    continue;
                };
                let value = value.trim().to_string();
                let field = match key.trim() {
                    "k8s.cluster.name" => &mut baggage.cluster,
                    "k8s.namespace.name" => &mut baggage.namespace,
                    "k8s.deployment.name"
                    | "k8s.cronjob.name"
                    | "k8s.pod.name"
                    | "k8s.job.name" => &mut baggage.workload_name,
                    "service.name" => &mut baggage.service_name,
                    "service.version" => &mut baggage.revision,
                    "cloud.region" => &mut baggage.region,
                    "cloud.availability_zone" => &mut baggage.zone,
                    _ => continue,
                };
                any |= !value.is_empty();
                *field = value;
            }
        }
        any.then_some(baggage)
    }

    /// The labels of an end known only by what it said, and the identity
    /// it proved (the principal and namespace come from that, never from
    /// what it said).
    pub fn peer(&self, identity: Option<&Identity>) -> Peer {
        use super::metrics::known;
        Peer {
            workload: known(&self.workload_name),
            namespace: identity.map_or_else(
                || known(&self.namespace),
                |id| id.namespace().to_string().into(),
            ),
            principal: super::metrics::principal(identity),
            canonical_service: known(&self.service_name),
            canonical_revision: known(&self.revision),
            cluster: known(&self.cluster),
            region: known(&self.region),
            zone: known(&self.zone),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ztunnels_keys_both_ways() {
        // As ztunnel writes it, over two header lines.
        let values = [
            HeaderValue::from_static(
                "k8s.cluster.name=K1,k8s.namespace.name=NS1,k8s.deployment.name=N1",
            ),
            HeaderValue::from_static("service.name=N2,service.version=V1,other=x,junk"),
        ];
        let baggage = Baggage::parse(&values).expect("baggage");
        assert_eq!(
            baggage,
            Baggage {
                cluster: "K1".into(),
                namespace: "NS1".into(),
                workload_name: "N1".into(),
                service_name: "N2".into(),
                revision: "V1".into(),
                ..Default::default()
            }
        );
        let header = baggage.header().expect("header");
        assert_eq!(
            header.to_str().ok(),
            Some(
                "k8s.cluster.name=K1,k8s.namespace.name=NS1,k8s.deployment.name=N1,service.name=N2,service.version=V1"
            )
        );
        assert_eq!(Baggage::parse([&header]), Some(baggage));
        assert_eq!(
            Baggage::parse([&HeaderValue::from_static("k8s.cluster.name=")]),
            None
        );
        let job = Baggage {
            workload_type: "cronjob",
            workload_name: "nightly".into(),
            ..Default::default()
        };
        let header = job.header().expect("header");
        assert_eq!(header.to_str().ok(), Some("k8s.cronjob.name=nightly"));
        assert_eq!(
            Baggage::parse([&header]).map(|b| b.workload_name),
            Some("nightly".to_string())
        );
    }

    #[test]
    fn an_ends_principal_and_namespace_come_from_its_identity_not_its_words() {
        let baggage = Baggage {
            namespace: "claimed".into(),
            workload_name: "web".into(),
            ..Default::default()
        };
        let identity = Identity::new("cluster.local", "real", "sa");
        let peer = baggage.peer(Some(&identity));
        assert_eq!(peer.namespace, "real");
        assert_eq!(peer.principal, "spiffe://cluster.local/ns/real/sa/sa");
        assert_eq!(peer.workload, "web");
        assert_eq!(peer.cluster, "unknown");
    }
}
