//! Mirroring: a copy of the request sent to another cluster, its answer
//! discarded.
use std::sync::{Arc, atomic::Ordering};

use http::{HeaderValue, header, request::Parts};
use http_body_util::BodyExt as _;

use super::{
    body::RequestBody,
    dispatch::cluster_named,
    full,
    headers::{split_host_port, upstream_request},
    upstream::Target,
};
use crate::proxy::{PodHandle, ProxyContext};

/// Sends a copy of the request to `cluster_name` and forgets it; the answer is
/// discarded. Only requests whose whole body has arrived (and fit the replay
/// copy) are mirrored.
pub(super) fn spawn_mirror(
    context: &Arc<ProxyContext>,
    pod: &Arc<PodHandle>,
    downstream: (std::net::SocketAddr, std::net::SocketAddr),
    client_http2: bool,
    parts: &Parts,
    body: &RequestBody,
    cluster_name: &str,
) {
    let Some(copy) = body.complete_copy() else {
        tracing::debug!(
            cluster = cluster_name,
            "request body not complete; not mirrored"
        );
        return;
    };
    let Some(cluster) = cluster_named(context, cluster_name) else {
        return;
    };
    let Some(index) = cluster.pick(None) else {
        return;
    };
    let endpoint = cluster.endpoints[index].address;
    let workload = cluster.endpoints[index].workload.clone();
    let http2 = cluster.config.protocol.http2(client_http2);
    let mut headers = parts.headers.clone();
    // Envoy marks shadowed requests by suffixing the host.
    if let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
        let (name, port) = split_host_port(host);
        let shadow = match port {
            Some(port) => format!("{name}-shadow:{port}"),
            None => format!("{name}-shadow"),
        };
        if let Ok(value) = HeaderValue::from_str(&shadow) {
            headers.insert(header::HOST, value);
        }
    }
    let request = upstream_request(parts, headers, full(copy), http2, endpoint);
    context.http.mirrored.fetch_add(1, Ordering::Relaxed);
    let pod = pod.clone();
    let context = context.clone();
    tokio::spawn(async move {
        let target = Target {
            context: &context,
            pod: &pod,
            endpoint,
            workload: workload.as_deref(),
            http2,
            downstream,
        };
        match cluster.pool.send(target, request).await {
            Ok(response) => {
                // Read the answer through so the connection can be reused.
                let _ = response.into_body().collect().await;
            }
            Err(error) => tracing::debug!(%error, %endpoint, "mirrored request failed"),
        }
    });
}
