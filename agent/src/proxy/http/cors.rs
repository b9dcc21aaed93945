//! CORS as Envoy's filter does it, for the route's policy (its fields over
//! its virtual host's, merged when the config was read): a preflight from an allowed origin is answered by the proxy, and
//! responses to an allowed origin carry `Access-Control-Allow-Origin` and
//! the policy's other headers.
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};

use super::{ProxyBody, empty, roll};
use crate::routing::Cors;

/// What the policy makes of one request.
pub(super) enum Verdict<'a> {
    /// Not a CORS request, or the policy is off for it.
    None,
    /// Answered by the proxy: a preflight.
    Preflight(Response<ProxyBody>),
    /// Goes on; the response gets these headers if the origin is allowed.
    Forward {
        cors: &'a Cors,
        origin: Option<HeaderValue>,
    },
}

pub(super) fn check<'a>(
    cors: Option<&'a Cors>,
    method: &Method,
    headers: &HeaderMap,
) -> Verdict<'a> {
    let Some(cors) = cors.filter(|cors| roll(cors.enabled)) else {
        return Verdict::None;
    };
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Verdict::None;
    };
    let allowed = origin
        .to_str()
        .ok()
        .filter(|origin| origin_allowed(cors, origin))
        .map(|_| origin.clone());
    let preflight =
        method == Method::OPTIONS && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if !preflight {
        return Verdict::Forward {
            cors,
            origin: allowed,
        };
    }
    let Some(origin) = allowed else {
        return if cors.forward_not_matching_preflights.unwrap_or(true) {
            Verdict::Forward { cors, origin: None }
        } else {
            Verdict::Preflight(ok())
        };
    };
    let mut response = ok();
    allow(cors, origin, &mut response);
    let out = response.headers_mut();
    for (name, value) in [
        (header::ACCESS_CONTROL_ALLOW_METHODS, &cors.allow_methods),
        (header::ACCESS_CONTROL_ALLOW_HEADERS, &cors.allow_headers),
        (header::ACCESS_CONTROL_MAX_AGE, &cors.max_age),
    ] {
        if let Ok(value) = HeaderValue::from_str(value)
            && !value.is_empty()
        {
            out.insert(name, value);
        }
    }
    if cors.allow_private_network_access == Some(true)
        && headers
            .get("access-control-request-private-network")
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"true"))
    {
        out.insert(
            "access-control-allow-private-network",
            HeaderValue::from_static("true"),
        );
    }
    Verdict::Preflight(response)
}

/// The headers an actual response to an allowed origin carries.
pub(super) fn decorate(cors: &Cors, origin: HeaderValue, response: &mut Response<ProxyBody>) {
    allow(cors, origin, response);
    if let Ok(value) = HeaderValue::from_str(&cors.expose_headers)
        && !value.is_empty()
    {
        response
            .headers_mut()
            .insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, value);
    }
}

/// What preflights and actual responses to an allowed origin both carry.
fn allow(cors: &Cors, origin: HeaderValue, response: &mut Response<ProxyBody>) {
    let out = response.headers_mut();
    out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    if cors.allow_credentials == Some(true) {
        out.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
}

/// As Envoy: a matcher that matches the origin, or that matches `*`.
fn origin_allowed(cors: &Cors, origin: &str) -> bool {
    cors.allow_origins
        .iter()
        .any(|matcher| matcher.matches("*") || matcher.matches(origin))
}

fn ok() -> Response<ProxyBody> {
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::OK;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{StringMatch, StringMatcher};

    fn policy(origins: &[&str]) -> Cors {
        Cors {
            allow_origins: origins
                .iter()
                .map(|origin| StringMatcher {
                    kind: StringMatch::Exact((*origin).into()),
                    ignore_case: false,
                })
                .collect(),
            allow_methods: "GET,POST".into(),
            allow_headers: "x-custom".into(),
            max_age: "600".into(),
            expose_headers: "x-exposed".into(),
            allow_credentials: Some(true),
            allow_private_network_access: None,
            forward_not_matching_preflights: None,
            enabled: 1.0,
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    http::HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                )
            })
            .collect()
    }

    #[test]
    fn preflights_and_actual_requests() {
        let cors = policy(&["https://a.example"]);
        let preflight = headers(&[
            ("origin", "https://a.example"),
            ("access-control-request-method", "POST"),
        ]);
        let Verdict::Preflight(response) = check(Some(&cors), &Method::OPTIONS, &preflight) else {
            panic!("a preflight")
        };
        let got = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        assert_eq!(response.status(), 200);
        assert_eq!(got("access-control-allow-origin"), "https://a.example");
        assert_eq!(got("access-control-allow-methods"), "GET,POST");
        assert_eq!(got("access-control-allow-headers"), "x-custom");
        assert_eq!(got("access-control-max-age"), "600");
        assert_eq!(got("access-control-allow-credentials"), "true");

        // Another origin's preflight goes on to the route, undecorated.
        let other = headers(&[
            ("origin", "https://b.example"),
            ("access-control-request-method", "POST"),
        ]);
        assert!(matches!(
            check(Some(&cors), &Method::OPTIONS, &other),
            Verdict::Forward { origin: None, .. }
        ));
        // An actual request from the allowed origin is decorated.
        let actual = headers(&[("origin", "https://a.example")]);
        assert!(matches!(
            check(Some(&cors), &Method::GET, &actual),
            Verdict::Forward {
                origin: Some(_),
                ..
            }
        ));
        // No Origin: not CORS.
        assert!(matches!(
            check(Some(&cors), &Method::GET, &HeaderMap::new()),
            Verdict::None
        ));
        // A `*` matcher allows every origin.
        let any = policy(&["*"]);
        assert!(matches!(
            check(Some(&any), &Method::GET, &other),
            Verdict::Forward {
                origin: Some(_),
                ..
            }
        ));
    }
}
