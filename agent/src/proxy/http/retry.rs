//! Sending a request to a cluster: one attempt per picked endpoint,
//! retried as the route's policy says, within the cluster's limits, each
//! outcome fed to outlier detection.
use std::{
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, request::Parts};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::{
    BoxError, ProxyBody,
    body::{ClientError, RequestBody},
    clusters::ClusterRuntime,
    headers::upstream_request,
    local_reply::LocalReply,
    telemetry::RequestLog,
    upgrade::splice_upgrade,
    upstream::{Target, UpstreamError},
};
use crate::{
    proxy::{PodHandle, ProxyContext},
    routing::{RetryPolicy, outlier::UpstreamResult},
};

/// Envoy's header with the number of the try (1 for the first).
pub(super) const ATTEMPT_COUNT: &str = "x-envoy-attempt-count";

/// Holds what must live as long as a response body: the circuit-breaker
/// slot and the endpoint's active-request count.
pub(super) struct RequestSlot {
    pub(super) cluster: Arc<ClusterRuntime>,
    pub(super) endpoint: usize,
    pub(super) _guard: crate::routing::limits::RequestGuard,
}

impl Drop for RequestSlot {
    fn drop(&mut self) {
        if let Some(endpoint) = self.cluster.endpoints.get(self.endpoint) {
            endpoint.active_requests.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A response body that releases its request slot when it ends.
pub(super) struct SlotBody {
    pub(super) inner: Incoming,
    pub(super) _slot: Option<RequestSlot>,
}

impl Body for SlotBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                self._slot = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => {
                self._slot = None;
                Poll::Ready(Some(Err(Box::new(error))))
            }
            other => other.map_err(|error| Box::new(error) as BoxError),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How one attempt ended, as retry policy and outlier detection see it.
pub(super) enum Attempt {
    Response(Response<Incoming>),
    Failed(UpstreamError),
    TimedOut,
}

/// A request on its way to a cluster: what each attempt sends, and how.
pub(super) struct Outgoing<'a> {
    /// The client pod, where upstream connections start.
    pub(super) pod: &'a PodHandle,
    pub(super) parts: &'a Parts,
    pub(super) body: &'a RequestBody,
    /// Speak HTTP/2 to the endpoint.
    pub(super) http2: bool,
    pub(super) policy: Option<&'a RetryPolicy>,
    /// The request's hash, for ring hash.
    pub(super) hash: Option<u64>,
    /// The client's side of an upgrade (WebSocket, CONNECT): such a
    /// request is never retried.
    pub(super) upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// Send `x-envoy-attempt-count` with each try.
    pub(super) attempt_count: bool,
    /// The endpoint a stateful session asks for, for the first try.
    pub(super) preferred: Option<usize>,
    /// The client's address and the address it dialled.
    pub(super) downstream: (std::net::SocketAddr, std::net::SocketAddr),
}

/// Sends the request to the cluster's endpoints until one answers or the
/// retry policy, the body or the cluster's limits allow no more attempts.
pub(super) async fn send_with_retries(
    context: &Arc<ProxyContext>,
    cluster: &Arc<ClusterRuntime>,
    outgoing: Outgoing<'_>,
    log: &mut RequestLog,
) -> Result<Response<ProxyBody>, LocalReply> {
    let Outgoing {
        pod,
        parts,
        body,
        http2,
        policy,
        hash,
        upgrade: mut downstream_upgrade,
        attempt_count,
        preferred,
        downstream,
    } = outgoing;
    let max_retries = policy.map_or(0, |policy| policy.num_retries);
    let mut attempt: u32 = 0;
    let mut tried: Vec<usize> = Vec::new();
    // The priority each attempt went to (`previous_priorities`).
    let mut tried_priorities: Vec<u32> = Vec::new();
    // Held while a retry is in flight (the retry circuit breaker).
    let mut _retry_slot = None;
    loop {
        log.attempts = attempt + 1;
        // Leave out the priorities of the earlier blocks of attempts.
        let avoid: &[u32] = match policy.and_then(|policy| policy.previous_priorities) {
            Some(frequency) => {
                let block_start = (attempt - attempt % frequency) as usize;
                &tried_priorities[..block_start.min(tried_priorities.len())]
            }
            None => &[],
        };
        let picked = match preferred.filter(|_| attempt == 0) {
            Some(index) => Some(index),
            None => cluster.pick_avoiding(hash, avoid),
        };
        let Some(mut index) = picked else {
            return Err(LocalReply::new(503, "UH", "no healthy upstream"));
        };
        // A retry goes elsewhere when it can (Envoy's previous_hosts
        // predicate, which istiod sets on every route): as many more picks
        // as `host_selection_retry_max_attempts` allows.
        let reselections = policy.map_or(1, |policy| policy.host_selection_attempts.max(1));
        for _ in 0..reselections {
            if !tried.contains(&index) || cluster.endpoints.len() <= tried.len() {
                break;
            }
            if let Some(other) = cluster.pick_avoiding(hash, avoid) {
                index = other;
            }
        }
        tried.push(index);
        tried_priorities.push(cluster.endpoints[index].priority);
        let guard = cluster
            .breaker
            .try_request()
            .map_err(LocalReply::overflow)?;
        let endpoint = &cluster.endpoints[index];
        endpoint.active_requests.fetch_add(1, Ordering::Relaxed);
        let slot = RequestSlot {
            cluster: cluster.clone(),
            endpoint: index,
            _guard: guard,
        };
        log.upstream = Some(endpoint.address);
        let mut headers = parts.headers.clone();
        if attempt_count {
            headers.insert(ATTEMPT_COUNT, HeaderValue::from(attempt + 1));
        }
        let request = upstream_request(
            parts,
            headers,
            body.attempt(attempt).boxed(),
            http2,
            endpoint.address,
        );
        let target = Target {
            context,
            pod,
            endpoint: endpoint.address,
            workload: endpoint.workload.as_deref(),
            http2,
            downstream,
        };
        let pool = &cluster.pool;
        let outcome = if downstream_upgrade.is_some() {
            match pool.send_upgradable(target, request).await {
                Ok(response) => Attempt::Response(response),
                Err(error) => Attempt::Failed(error),
            }
        } else {
            let send = pool.send(target, request);
            match policy.and_then(|policy| policy.per_try_timeout) {
                Some(per_try) => match tokio::time::timeout(per_try, send).await {
                    Ok(Ok(response)) => Attempt::Response(response),
                    Ok(Err(error)) => Attempt::Failed(error),
                    Err(_) => Attempt::TimedOut,
                },
                None => match send.await {
                    Ok(response) => Attempt::Response(response),
                    Err(error) => Attempt::Failed(error),
                },
            }
        };
        // The client's body broke (a bad chunk size, a hang-up): its
        // fault, answered 400 and never counted against the endpoint.
        if !matches!(outcome, Attempt::Response(_))
            && let Some(error) = body.client_error()
        {
            return Err(client_error_reply(error));
        }
        let (result, retriable) = classify(&outcome, policy);
        cluster.record(index, result);
        let may_retry =
            retriable && attempt < max_retries && body.replayable() && downstream_upgrade.is_none();
        if may_retry {
            match cluster.breaker.try_retry() {
                Ok(retry) => {
                    _retry_slot = Some(retry);
                    context.http.retries.fetch_add(1, Ordering::Relaxed);
                    attempt += 1;
                    if let Some(policy) = policy {
                        tokio::time::sleep(backoff(policy, attempt)).await;
                    }
                    continue;
                }
                Err(_) => log.flags.push("UO"),
            }
        } else if retriable && attempt > 0 {
            log.flags.push("URX");
        }
        return match outcome {
            Attempt::Response(mut response) => {
                log.kernel = response
                    .extensions_mut()
                    .remove::<super::upstream::UpstreamLeg>();
                // A WebSocket switches on 101, a CONNECT on any 2xx.
                let upgraded = response.status() == StatusCode::SWITCHING_PROTOCOLS
                    || (parts.method == Method::CONNECT && response.status().is_success());
                if upgraded && let Some(downstream_upgrade) = downstream_upgrade.take() {
                    let upstream_upgrade = hyper::upgrade::on(&mut response);
                    let idle = context.limits.settings().idle_timeout;
                    tokio::spawn(splice_upgrade(downstream_upgrade, upstream_upgrade, idle));
                }
                Ok(response.map(|inner| {
                    SlotBody {
                        inner,
                        _slot: Some(slot),
                    }
                    .boxed()
                }))
            }
            Attempt::Failed(UpstreamError::Overflow(limit)) => Err(LocalReply::overflow(limit)),
            Attempt::Failed(UpstreamError::Connect {
                endpoint,
                reason,
                timed_out,
            }) => {
                tracing::debug!(%endpoint, %reason, "upstream connect failed");
                // Envoy's wording, which clients and dashboards grep for.
                Err(LocalReply::new(
                    503,
                    "UF",
                    if timed_out {
                        "upstream connect error or disconnect/reset before headers. reset reason: connection timeout"
                    } else {
                        "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
                    },
                ))
            }
            Attempt::Failed(UpstreamError::Reset { endpoint, source }) => {
                tracing::debug!(%endpoint, error = %source, "upstream reset");
                Err(LocalReply::new(503, "UC", "upstream reset before response"))
            }
            Attempt::TimedOut => Err(LocalReply::new(504, "UT", "upstream request timeout")),
        };
    }
}

/// The answer to a request whose body the client broke: Envoy's 400 with
/// `DPE` (downstream protocol error), or `DC` when the client went away.
pub(super) fn client_error_reply(error: ClientError) -> LocalReply {
    match error {
        ClientError::Malformed => LocalReply::new(400, "DPE", "bad request: malformed body"),
        ClientError::Disconnected => {
            LocalReply::new(400, "DC", "downstream disconnected mid-request")
        }
    }
}

/// Outlier input and whether `policy` retries this outcome.
pub(super) fn classify(outcome: &Attempt, policy: Option<&RetryPolicy>) -> (UpstreamResult, bool) {
    let on = policy.map(|policy| &policy.retry_on);
    let any = |check: &dyn Fn(&crate::routing::RetryOn) -> bool| on.is_some_and(check);
    match outcome {
        Attempt::Response(response) => {
            let status = response.status().as_u16();
            let grpc_status = response
                .headers()
                .get("grpc-status")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse::<u32>().ok());
            let retriable = any(&|on| {
                (on.five_xx && status >= 500)
                    || (on.gateway_error && matches!(status, 502..=504))
                    || (on.retriable_status_codes && on.status_codes.contains(&status))
                    || grpc_status.is_some_and(|code| on.grpc_statuses.contains(&code))
            });
            let result = if status >= 500 {
                UpstreamResult::Http5xx(status)
            } else {
                UpstreamResult::Success
            };
            (result, retriable)
        }
        Attempt::Failed(UpstreamError::Connect { .. }) => (
            UpstreamResult::ConnectFailure,
            any(&|on| on.connect_failure || on.five_xx || on.gateway_error),
        ),
        Attempt::Failed(UpstreamError::Reset { .. }) => (
            UpstreamResult::Reset,
            any(&|on| on.reset || on.five_xx || on.gateway_error),
        ),
        // The cluster's own limit, not the endpoint's fault.
        Attempt::Failed(UpstreamError::Overflow(_)) => (UpstreamResult::Success, false),
        Attempt::TimedOut => (
            UpstreamResult::Timeout,
            any(&|on| on.five_xx || on.gateway_error || on.reset),
        ),
    }
}

/// Envoy's fully jittered exponential backoff: uniform in
/// `[0, min(base × 2^(n-1), max))`.
pub(super) fn backoff(policy: &RetryPolicy, retry: u32) -> Duration {
    let base = if policy.backoff_base.is_zero() {
        Duration::from_millis(25)
    } else {
        policy.backoff_base
    };
    let max = if policy.backoff_max.is_zero() {
        base * 10
    } else {
        policy.backoff_max
    };
    let ceiling = base
        .saturating_mul(1u32 << retry.saturating_sub(1).min(16))
        .min(max);
    ceiling.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn backoff_stays_under_its_ceiling() {
        let policy = RetryPolicy {
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
            ..Default::default()
        };
        for retry in 1..8 {
            let ceiling = Duration::from_millis((10u64 << (retry - 1)).min(50));
            assert!(backoff(&policy, retry) <= ceiling);
        }
    }
}
