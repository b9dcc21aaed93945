//! A request's time limits as a route sets them: the route timeout (or the
//! request's own `grpc-timeout`, when the route says so), and the stream's
//! maximum duration, which also cuts a response body that runs past it.
use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::{BoxError, ProxyBody};
use crate::routing::{ForwardAction, GrpcTimeout};

/// Envoy's default route timeout, for a route that sets none.
const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

/// The limits one request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Limits {
    /// Until the response starts, retries included; zero: none.
    pub(super) timeout: Duration,
    /// The whole exchange, response body included.
    pub(super) stream: Option<Duration>,
}

impl Limits {
    pub(super) fn of(action: &ForwardAction, grpc: bool, headers: &HeaderMap) -> Limits {
        let header = grpc.then(|| grpc_timeout_header(headers)).flatten();
        let mut timeout = action.timeout.unwrap_or(DEFAULT_ROUTE_TIMEOUT);
        if let (Some(rule), Some(header)) = (&action.grpc_timeout, header) {
            timeout = from_header(rule, header);
        }
        let stream = action.max_stream_duration.and_then(|limit| {
            match (&limit.grpc, header) {
                (Some(rule), Some(header)) => Some(from_header(rule, header)),
                _ => limit.max,
            }
            .filter(|limit| !limit.is_zero())
        });
        Limits { timeout, stream }
    }
}

/// The timeout a `grpc-timeout` header asks for under `rule`; zero: none.
fn from_header(rule: &GrpcTimeout, header: Duration) -> Duration {
    if header.is_zero() {
        return rule.max.unwrap_or(Duration::ZERO);
    }
    // An offset larger than the deadline leaves the deadline as it is, as
    // in Envoy.
    let wanted = header.checked_sub(rule.offset).unwrap_or(header);
    match rule.max {
        Some(max) => wanted.min(max),
        None => wanted,
    }
}

/// gRPC's `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
pub(super) fn grpc_timeout_header(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The stream's maximum duration ran out while the response body was still
/// coming: the body ends in an error, which resets the client's stream.
#[derive(Debug)]
pub(super) struct StreamDurationExceeded;

impl std::fmt::Display for StreamDurationExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("max stream duration reached")
    }
}

impl std::error::Error for StreamDurationExceeded {}

/// A response body cut at `deadline`.
pub(super) struct DeadlineBody {
    inner: ProxyBody,
    deadline: Pin<Box<Sleep>>,
}

impl DeadlineBody {
    pub(super) fn new(inner: ProxyBody, deadline: Instant) -> DeadlineBody {
        DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
        }
    }
}

impl Body for DeadlineBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(StreamDurationExceeded)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use http_body_util::BodyExt as _;

    use super::*;
    use crate::routing::StreamDuration;

    fn action(
        timeout: Option<Duration>,
        grpc: Option<GrpcTimeout>,
        stream: Option<StreamDuration>,
    ) -> ForwardAction {
        let mut action = match crate::routing::RouteConfig::to_service("s", 80)
            .virtual_hosts
            .remove(0)
            .routes
            .remove(0)
            .action
        {
            crate::routing::RouteAction::Forward(action) => *action,
            other => panic!("{other:?}"),
        };
        action.timeout = timeout;
        action.grpc_timeout = grpc;
        action.max_stream_duration = stream;
        action
    }

    fn with_grpc_timeout(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-timeout", HeaderValue::from_static(value));
        headers
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn grpc_timeout_header_units_and_bad_values() {
        for (value, expected) in [
            ("1H", Some(Duration::from_secs(3600))),
            ("2M", Some(Duration::from_secs(120))),
            ("3S", Some(Duration::from_secs(3))),
            ("250m", Some(Duration::from_millis(250))),
            ("7u", Some(Duration::from_micros(7))),
            ("99999999n", Some(Duration::from_nanos(99_999_999))),
            ("123456789m", None),
            ("m", None),
            ("1x", None),
            ("-1S", None),
        ] {
            let headers = with_grpc_timeout(value);
            assert_eq!(grpc_timeout_header(&headers), expected, "{value}");
        }
    }

    #[test]
    fn the_route_says_which_limit_applies() {
        let uncapped = GrpcTimeout {
            max: None,
            offset: Duration::ZERO,
        };
        let headers = with_grpc_timeout("2S");
        // No route timeout: Envoy's 15 s.
        assert_eq!(
            Limits::of(&action(None, None, None), true, &headers).timeout,
            Duration::from_secs(15)
        );
        // The route's timeout; the header only counts where the route says.
        assert_eq!(
            Limits::of(&action(Some(SECOND * 5), None, None), true, &headers).timeout,
            SECOND * 5
        );
        assert_eq!(
            Limits::of(
                &action(Some(SECOND * 5), Some(uncapped), None),
                true,
                &headers
            )
            .timeout,
            SECOND * 2
        );
        // Not gRPC: the header is not read.
        assert_eq!(
            Limits::of(
                &action(Some(SECOND * 5), Some(uncapped), None),
                false,
                &headers
            )
            .timeout,
            SECOND * 5
        );
        // Capped, and less the offset.
        let capped = GrpcTimeout {
            max: Some(SECOND),
            offset: Duration::ZERO,
        };
        assert_eq!(
            Limits::of(
                &action(Some(Duration::ZERO), Some(capped), None),
                true,
                &headers
            )
            .timeout,
            SECOND
        );
        let offset = GrpcTimeout {
            max: None,
            offset: Duration::from_millis(500),
        };
        assert_eq!(
            Limits::of(
                &action(Some(Duration::ZERO), Some(offset), None),
                true,
                &headers
            )
            .timeout,
            Duration::from_millis(1500)
        );
        // The stream's own limit, or the header through it.
        let stream = StreamDuration {
            max: Some(SECOND * 9),
            grpc: None,
        };
        assert_eq!(
            Limits::of(&action(None, None, Some(stream)), true, &headers).stream,
            Some(SECOND * 9)
        );
        let stream = StreamDuration {
            max: None,
            grpc: Some(uncapped),
        };
        assert_eq!(
            Limits::of(&action(None, None, Some(stream)), true, &headers).stream,
            Some(SECOND * 2)
        );
        assert_eq!(
            Limits::of(&action(None, None, Some(stream)), true, &HeaderMap::new()).stream,
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_past_the_deadline_ends_in_an_error() {
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let stream =
            http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(receiver));
        let mut body = DeadlineBody::new(stream.boxed(), Instant::now() + SECOND);
        let sent = sender.send(Ok(Frame::data(Bytes::from_static(b"a")))).await;
        assert!(sent.is_ok());
        let first = body.frame().await;
        assert!(matches!(&first, Some(Ok(frame)) if frame.data_ref().is_some()));
        // The sender stays open: only the deadline ends the body.
        let second = body.frame().await;
        assert!(
            matches!(&second, Some(Err(error)) if error.is::<StreamDurationExceeded>()),
            "{second:?}"
        );
        drop(sender);
    }
}
