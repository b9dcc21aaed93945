//! Request → (virtual host, route) selection with Envoy's rules, so that a
//! `RouteConfiguration` written for Envoy/Istio routes the same way here.
//!
//! Deliberate choices (all Envoy's behaviour unless said otherwise):
//! - virtual hosts: exact domain, then suffix wildcards (`*.foo.com`,
//!   longest first), then prefix wildcards (`foo.*`, longest first), then
//!   `*`. A wildcard never matches the empty string. A domain without a port
//!   is compared with the host stripped of its port; a domain with a port
//!   (`foo.com:8080`) with the host as sent. Once a virtual host is chosen,
//!   a request that matches none of its routes gets no route: Envoy does not
//!   fall back to another virtual host.
//! - `case_sensitive: false` applies to prefix, exact and separated-prefix
//!   path matching (ASCII case folding); it is ignored by regexes, as in
//!   Envoy.
//! - regexes (path and string matchers) must match the whole value.
//! - a header sent several times is matched as its values joined with `,`.
//! - query parameters are matched raw, without percent-decoding (`+` stays
//!   `+`), as Envoy's route matcher does; the first occurrence of a name
//!   wins; `?flag` has the value `""`.
//! - `ignore_case` has no effect on regex string matchers, as in Envoy.
//! - gRPC: `content-type` is exactly `application/grpc` or starts with
//!   `application/grpc+` (so `application/grpc-web` is not gRPC).

use std::{
    borrow::Cow,
    collections::HashMap,
    sync::{LazyLock, RwLock},
};

use super::{
    HeaderMatch, PathMatch, QueryParameterMatch, RequestFacts, Route, RouteConfig, RouteMatch,
    StringMatch, StringMatcher, VirtualHost,
};

impl RouteConfig {
    /// The virtual host for the request's host, then the first of its
    /// routes that matches.
    pub fn select(&self, facts: &RequestFacts) -> Option<(&VirtualHost, &Route)> {
        let vhost = self.virtual_host(facts.host)?;
        let route = vhost.routes.iter().find(|r| r.matcher.matches(facts))?;
        Some((vhost, route))
    }

    /// The virtual host whose domains match `host` best (see the module
    /// doc); among equally good matches, the first virtual host.
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        let bare = strip_port(host);
        let mut best: Option<((u8, usize), &VirtualHost)> = None;
        for vhost in &self.virtual_hosts {
            for domain in &vhost.domains {
                let Some(score) = domain_score(domain, host, bare) else {
                    continue;
                };
                if best.is_none_or(|(b, _)| score > b) {
                    best = Some((score, vhost));
                }
            }
        }
        best.map(|(_, vhost)| vhost)
    }
}

/// How well `domain` matches: (tier, length), higher is better. Tiers:
/// 3 exact, 2 suffix wildcard, 1 prefix wildcard, 0 `*`.
fn domain_score(domain: &str, host: &str, bare: &str) -> Option<(u8, usize)> {
    let host = if strip_port(domain).len() != domain.len() {
        host
    } else {
        bare
    };
    if domain == "*" {
        return Some((0, 0));
    }
    if let Some(suffix) = domain.strip_prefix('*') {
        let ok = host.len() > suffix.len() && ends_with_ignore_case(host, suffix);
        return ok.then_some((2, suffix.len()));
    }
    if let Some(prefix) = domain.strip_suffix('*') {
        let ok = host.len() > prefix.len() && starts_with_ignore_case(host, prefix);
        return ok.then_some((1, prefix.len()));
    }
    host.eq_ignore_ascii_case(domain)
        .then_some((3, domain.len()))
}

/// `host` without a trailing `:port`; IPv6 literals keep their colons
/// (`[::1]:80` → `[::1]`, `::1` unchanged).
fn strip_port(host: &str) -> &str {
    if let Some((name, port)) = host.rsplit_once(':')
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && (!name.contains(':') || (name.starts_with('[') && name.ends_with(']')))
    {
        name
    } else {
        host
    }
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

fn ends_with_ignore_case(s: &str, suffix: &str) -> bool {
    s.len() >= suffix.len()
        && s.as_bytes()[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

fn contains_ignore_case(s: &str, needle: &str) -> bool {
    needle.is_empty()
        || s.as_bytes()
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

impl RouteMatch {
    /// All of path, headers, query parameters and the gRPC condition.
    pub fn matches(&self, facts: &RequestFacts) -> bool {
        let path = match self.path {
            PathMatch::Connect => facts.method == http::Method::CONNECT,
            _ => self.path.matches(facts.path, self.case_sensitive),
        };
        (!self.grpc || is_grpc(facts.headers))
            && path
            && self.headers.iter().all(|h| h.matches(facts))
            && self.query_parameters.iter().all(|q| q.matches(facts.query))
    }
}

impl PathMatch {
    /// `path` is the request path without its query.
    pub fn matches(&self, path: &str, case_sensitive: bool) -> bool {
        match self {
            PathMatch::Any => true,
            PathMatch::Prefix(prefix) => {
                if case_sensitive {
                    path.starts_with(prefix.as_str())
                } else {
                    starts_with_ignore_case(path, prefix)
                }
            }
            PathMatch::Exact(exact) => {
                if case_sensitive {
                    path == exact
                } else {
                    path.eq_ignore_ascii_case(exact)
                }
            }
            PathMatch::Regex(re) => full_match(&re.0, path),
            PathMatch::SeparatedPrefix(prefix) => {
                let head = if case_sensitive {
                    path.starts_with(prefix.as_str())
                } else {
                    starts_with_ignore_case(path, prefix)
                };
                head && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
            }
            // Decided by the method (`RouteMatch::matches`), not the path.
            PathMatch::Connect => false,
        }
    }
}

fn is_grpc(headers: &http::HeaderMap) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    headers.get(http::header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.starts_with(GRPC) && matches!(v.get(GRPC.len()), None | Some(b'+'))
    })
}

impl HeaderMatch {
    /// Envoy's `HeaderMatcher`. An absent header matches only "must be
    /// absent" (`value: None` with `invert`) unless `missing_as_empty`
    /// makes it the empty string; in particular an inverted value matcher
    /// does not match an absent header.
    pub fn matches(&self, facts: &RequestFacts) -> bool {
        let value = match header_value(facts, self.name.as_str()) {
            Some(v) => v,
            None if self.missing_as_empty => Cow::Borrowed(""),
            None => return self.value.is_none() && self.invert,
        };
        let matched = match &self.value {
            None => true,
            Some(m) => m.matches(&value),
        };
        matched != self.invert
    }
}

/// A header's value for matching: pseudo-headers from the request facts
/// (`host` is the same as `:authority`), others joined with `,`.
fn header_value<'a>(facts: &RequestFacts<'a>, name: &str) -> Option<Cow<'a, str>> {
    match name {
        ":method" => return Some(Cow::Borrowed(facts.method.as_str())),
        ":authority" | "host" => return Some(Cow::Borrowed(facts.host)),
        ":path" => {
            return Some(match facts.query {
                Some(q) => Cow::Owned(format!("{}?{q}", facts.path)),
                None => Cow::Borrowed(facts.path),
            });
        }
        _ => {}
    }
    let mut values = facts.headers.get_all(name).iter();
    let first = values.next()?;
    let mut joined = String::from_utf8_lossy(first.as_bytes());
    for v in values {
        let s = joined.to_mut();
        s.push(',');
        s.push_str(&String::from_utf8_lossy(v.as_bytes()));
    }
    Some(joined)
}

impl QueryParameterMatch {
    /// `query` is the raw query string, without `?`.
    pub fn matches(&self, query: Option<&str>) -> bool {
        match query_param(query, &self.name) {
            None => false,
            Some(value) => self.value.as_ref().is_none_or(|m| m.matches(value)),
        }
    }
}

/// The raw value of the first parameter called `name`.
fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

impl StringMatcher {
    pub fn matches(&self, value: &str) -> bool {
        let ic = self.ignore_case;
        match &self.kind {
            StringMatch::Exact(s) if ic => value.eq_ignore_ascii_case(s),
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) if ic => starts_with_ignore_case(value, s),
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) if ic => ends_with_ignore_case(value, s),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Contains(s) if ic => contains_ignore_case(value, s),
            StringMatch::Contains(s) => value.contains(s.as_str()),
            StringMatch::Regex(re) => full_match(&re.0, value),
        }
    }
}

/// Whether `re` matches all of `s`. The compiled regexes are not anchored
/// (the model keeps the source as written), and the leftmost match may be
/// shorter than a whole-string match (`a|ab` on `ab`), so when the first
/// match starts at 0 but ends early the anchored form decides. Anchored
/// forms are compiled once per pattern and cached.
fn full_match(re: &regex::Regex, s: &str) -> bool {
    match re.find(s) {
        None => false,
        Some(m) if m.start() != 0 => false,
        Some(m) if m.end() == s.len() => true,
        Some(_) => anchored(re).is_some_and(|a| a.is_match(s)),
    }
}

/// Cache of `\A(?:pattern)\z` by pattern; cleared when it grows past
/// `ANCHORED_MAX` (only configuration churn makes new patterns).
static ANCHORED: LazyLock<RwLock<HashMap<String, regex::Regex>>> = LazyLock::new(Default::default);
const ANCHORED_MAX: usize = 4096;

fn anchored(re: &regex::Regex) -> Option<regex::Regex> {
    let pattern = re.as_str();
    if let Some(a) = ANCHORED
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(pattern)
    {
        return Some(a.clone());
    }
    let a = regex::Regex::new(&format!(r"\A(?:{pattern})\z")).ok()?;
    let mut cache = ANCHORED.write().unwrap_or_else(|e| e.into_inner());
    if cache.len() >= ANCHORED_MAX {
        cache.clear();
    }
    cache.insert(pattern.to_owned(), a.clone());
    Some(a)
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue, Method, StatusCode};

    use super::*;
    use crate::routing::{HeaderOps, Regex, RouteAction};

    fn re(s: &str) -> Regex {
        Regex(regex::Regex::new(s).unwrap())
    }

    fn route(name: &str, matcher: RouteMatch) -> Route {
        Route {
            name: name.into(),
            matcher,
            action: RouteAction::DirectResponse {
                status: StatusCode::OK,
                body: None,
            },
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
            fault: None,
            session: None,
            cors: None,
        }
    }

    fn vhost(name: &str, domains: &[&str], routes: Vec<Route>) -> VirtualHost {
        VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            routes,
            retry_policy: None,
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
            attempt_count_to_upstream: false,
            attempt_count_to_client: false,
            require_tls: false,
            cors: None,
        }
    }

    fn any() -> RouteMatch {
        RouteMatch {
            case_sensitive: true,
            ..Default::default()
        }
    }

    fn path(p: PathMatch) -> RouteMatch {
        RouteMatch { path: p, ..any() }
    }

    struct Req {
        method: Method,
        host: String,
        path: String,
        query: Option<String>,
        headers: HeaderMap,
    }

    impl Req {
        fn new(host: &str, path_and_query: &str) -> Req {
            let (path, query) = match path_and_query.split_once('?') {
                Some((p, q)) => (p.to_string(), Some(q.to_string())),
                None => (path_and_query.to_string(), None),
            };
            Req {
                method: Method::GET,
                host: host.into(),
                path,
                query,
                headers: HeaderMap::new(),
            }
        }

        fn header(mut self, name: &'static str, value: &'static str) -> Req {
            self.headers.append(name, HeaderValue::from_static(value));
            self
        }

        fn facts(&self) -> RequestFacts<'_> {
            RequestFacts {
                method: &self.method,
                host: &self.host,
                path: &self.path,
                query: self.query.as_deref(),
                headers: &self.headers,
            }
        }
    }

    fn exact(s: &str) -> StringMatcher {
        StringMatcher {
            kind: StringMatch::Exact(s.into()),
            ignore_case: false,
        }
    }

    fn header(name: &'static str, value: Option<StringMatcher>) -> HeaderMatch {
        HeaderMatch {
            name: name.to_string(),
            value,
            invert: false,
            missing_as_empty: false,
        }
    }

    fn vhost_name<'a>(config: &'a RouteConfig, host: &str) -> Option<&'a str> {
        config.virtual_host(host).map(|v| v.name.as_str())
    }

    #[test]
    fn domain_precedence() {
        let config = RouteConfig {
            name: "rc".into(),
            virtual_hosts: vec![
                vhost("star", &["*"], vec![]),
                vhost("prefix", &["foo.*"], vec![]),
                vhost("longer-prefix", &["foo.bar.*"], vec![]),
                vhost("suffix", &["*.com"], vec![]),
                vhost("longer-suffix", &["*-bar.foo.com"], vec![]),
                vhost("exact", &["Foo.Bar.com", "other"], vec![]),
                vhost("with-port", &["ported.com:8080"], vec![]),
            ],
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
        };
        // Exact beats everything, case-insensitively, port ignored.
        assert_eq!(vhost_name(&config, "foo.bar.COM:80"), Some("exact"));
        assert_eq!(vhost_name(&config, "other"), Some("exact"));
        // Longest suffix first.
        assert_eq!(vhost_name(&config, "x-bar.foo.com"), Some("longer-suffix"));
        assert_eq!(vhost_name(&config, "x.foo.com"), Some("suffix"));
        // Suffix beats prefix.
        assert_eq!(vhost_name(&config, "foo.bar.baz.com"), Some("suffix"));
        // Longest prefix first; prefix beats `*`.
        assert_eq!(vhost_name(&config, "foo.bar.org"), Some("longer-prefix"));
        assert_eq!(vhost_name(&config, "foo.org"), Some("prefix"));
        assert_eq!(vhost_name(&config, "unrelated.org"), Some("star"));
        // A wildcard does not match the empty string.
        assert_eq!(vhost_name(&config, ".com"), Some("star"));
        assert_eq!(vhost_name(&config, "-bar.foo.com"), Some("suffix"));
        // A domain with a port matches the host with that port only.
        assert_eq!(vhost_name(&config, "ported.com:8080"), Some("with-port"));
        assert_eq!(vhost_name(&config, "ported.com:9090"), Some("suffix"));
        assert_eq!(vhost_name(&config, "ported.com"), Some("suffix"));
    }

    #[test]
    fn no_domain_matches() {
        let config = RouteConfig {
            name: "rc".into(),
            virtual_hosts: vec![vhost("a", &["a.com"], vec![route("r", any())])],
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
        };
        assert!(config.select(&Req::new("b.com", "/").facts()).is_none());
        assert!(config.select(&Req::new("A.com:443", "/").facts()).is_some());
    }

    #[test]
    fn strip_port_forms() {
        assert_eq!(strip_port("foo.com:80"), "foo.com");
        assert_eq!(strip_port("foo.com"), "foo.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("foo.com:"), "foo.com:");
    }

    #[test]
    fn first_matching_route_wins_and_no_fallback() {
        let config = RouteConfig {
            name: "rc".into(),
            virtual_hosts: vec![
                vhost(
                    "a",
                    &["a.com"],
                    vec![
                        route("api", path(PathMatch::Prefix("/api".into()))),
                        route("api-v1", path(PathMatch::Prefix("/api/v1".into()))),
                        route("exact", path(PathMatch::Exact("/x".into()))),
                    ],
                ),
                vhost("star", &["*"], vec![route("all", any())]),
            ],
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
        };
        let pick = |host: &str, p: &str| {
            let req = Req::new(host, p);
            config
                .select(&req.facts())
                .map(|(v, r)| format!("{}/{}", v.name, r.name))
        };
        assert_eq!(pick("a.com", "/api/v1/x").as_deref(), Some("a/api"));
        assert_eq!(pick("a.com", "/x?y=1").as_deref(), Some("a/exact"));
        // The virtual host is chosen first; no fallback to `*`.
        assert_eq!(pick("a.com", "/other"), None);
        assert_eq!(pick("b.com", "/other").as_deref(), Some("star/all"));
    }

    #[test]
    fn connect_matcher_takes_connect_only() {
        let config = RouteConfig {
            name: "rc".into(),
            virtual_hosts: vec![vhost(
                "a",
                &["*"],
                vec![
                    route("prefix", path(PathMatch::Prefix("/".into()))),
                    route("connect", path(PathMatch::Connect)),
                ],
            )],
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
        };
        let pick = |req: Req| config.select(&req.facts()).map(|(_, r)| r.name.clone());
        let mut connect = Req::new("tunnel.test:443", "");
        connect.method = Method::CONNECT;
        assert_eq!(pick(connect).as_deref(), Some("connect"));
        assert_eq!(pick(Req::new("a", "/x")).as_deref(), Some("prefix"));
        // A GET with no path (never from hyper, but) is not a CONNECT.
        assert_eq!(pick(Req::new("a", "")), None);
    }

    #[test]
    fn path_forms_and_case() {
        let prefix = PathMatch::Prefix("/Api".into());
        assert!(prefix.matches("/Api/x", true));
        assert!(!prefix.matches("/api/x", true));
        assert!(prefix.matches("/api/x", false));
        assert!(!prefix.matches("/Ap", false));

        let exact = PathMatch::Exact("/Login".into());
        assert!(exact.matches("/Login", true));
        assert!(!exact.matches("/login", true));
        assert!(exact.matches("/LOGIN", false));
        assert!(!exact.matches("/Login/", false));

        let sep = PathMatch::SeparatedPrefix("/api".into());
        assert!(sep.matches("/api", true));
        assert!(sep.matches("/api/", true));
        assert!(sep.matches("/api/x", true));
        assert!(!sep.matches("/apix", true));
        assert!(!sep.matches("/API/x", true));
        assert!(sep.matches("/API/x", false));

        assert!(PathMatch::Any.matches("/whatever", true));
    }

    #[test]
    fn regex_is_anchored() {
        let p = PathMatch::Regex(re("/users/[0-9]+"));
        assert!(p.matches("/users/42", true));
        assert!(!p.matches("/users/42/x", true));
        assert!(!p.matches("/v1/users/42", true));
        // Leftmost-first alternation: the anchored form still finds `ab`.
        let alt = PathMatch::Regex(re("/a|/ab"));
        assert!(alt.matches("/ab", true));
        assert!(!alt.matches("/abc", true));
        // The query is not part of the path.
        let req = Req::new("h", "/users/7?x=1");
        assert!(path(PathMatch::Regex(re("/users/[0-9]+"))).matches(&req.facts()));

        let m = StringMatcher {
            kind: StringMatch::Regex(re("v[0-9]")),
            ignore_case: false,
        };
        assert!(m.matches("v1"));
        assert!(!m.matches("v12"));
        assert!(!m.matches("xv1"));
    }

    #[test]
    fn string_matcher_kinds_and_ignore_case() {
        let m = |kind: StringMatch, ignore_case| StringMatcher { kind, ignore_case };
        assert!(m(StringMatch::Exact("Abc".into()), false).matches("Abc"));
        assert!(!m(StringMatch::Exact("Abc".into()), false).matches("abc"));
        assert!(m(StringMatch::Exact("Abc".into()), true).matches("aBC"));
        assert!(m(StringMatch::Prefix("Ab".into()), true).matches("aBc"));
        assert!(!m(StringMatch::Prefix("Ab".into()), false).matches("aBc"));
        assert!(m(StringMatch::Suffix("BC".into()), true).matches("abc"));
        assert!(!m(StringMatch::Suffix("BC".into()), false).matches("abc"));
        assert!(m(StringMatch::Contains("B".into()), true).matches("abc"));
        assert!(!m(StringMatch::Contains("B".into()), false).matches("abc"));
        assert!(m(StringMatch::Contains(String::new()), true).matches(""));
        assert!(!m(StringMatch::Contains("abcd".into()), true).matches("abc"));
    }

    #[test]
    fn headers_values_invert_present() {
        let req = Req::new("h.com:80", "/p?q=1")
            .header("x-env", "canary")
            .header("x-multi", "a")
            .header("x-multi", "b");
        let facts = req.facts();

        assert!(header("x-env", Some(exact("canary"))).matches(&facts));
        assert!(!header("x-env", Some(exact("prod"))).matches(&facts));
        // Multiple values are joined with ",".
        assert!(header("x-multi", Some(exact("a,b"))).matches(&facts));

        let inverted = |name, value| HeaderMatch {
            invert: true,
            ..header(name, value)
        };
        assert!(inverted("x-env", Some(exact("prod"))).matches(&facts));
        assert!(!inverted("x-env", Some(exact("canary"))).matches(&facts));
        // An inverted value matcher does not match an absent header.
        assert!(!inverted("x-absent", Some(exact("prod"))).matches(&facts));

        // Presence and absence.
        assert!(header("x-env", None).matches(&facts));
        assert!(!header("x-absent", None).matches(&facts));
        assert!(inverted("x-absent", None).matches(&facts));
        assert!(!inverted("x-env", None).matches(&facts));

        // treat_missing_header_as_empty.
        let empty = HeaderMatch {
            missing_as_empty: true,
            ..header("x-absent", Some(exact("")))
        };
        assert!(empty.matches(&facts));
        let empty_inv = HeaderMatch {
            invert: true,
            ..empty.clone()
        };
        assert!(!empty_inv.matches(&facts));

        // `host` is the request's authority.
        assert!(header("host", Some(exact("h.com:80"))).matches(&facts));
    }

    #[test]
    fn pseudo_header_values() {
        let req = Req::new("h.com", "/p?q=1");
        let facts = req.facts();
        assert_eq!(header_value(&facts, ":method").as_deref(), Some("GET"));
        assert_eq!(header_value(&facts, ":authority").as_deref(), Some("h.com"));
        assert_eq!(header_value(&facts, ":path").as_deref(), Some("/p?q=1"));
        assert_eq!(header_value(&facts, "x-none"), None);
    }

    #[test]
    fn query_parameters() {
        let q = |name: &str, value: Option<StringMatcher>| QueryParameterMatch {
            name: name.into(),
            value,
        };
        let query = Some("debug&user=a+b&user=second&empty=&pct=%41");
        assert!(q("debug", None).matches(query));
        assert!(q("debug", Some(exact(""))).matches(query));
        assert!(!q("absent", None).matches(query));
        assert!(!q("debug", None).matches(None));
        // First occurrence wins, raw (no decoding).
        assert!(q("user", Some(exact("a+b"))).matches(query));
        assert!(!q("user", Some(exact("second"))).matches(query));
        assert!(q("pct", Some(exact("%41"))).matches(query));
        assert!(q("empty", Some(exact(""))).matches(query));

        let m = RouteMatch {
            query_parameters: vec![q("user", Some(exact("a+b"))), q("debug", None)],
            ..any()
        };
        assert!(m.matches(&Req::new("h", "/?debug&user=a+b").facts()));
        assert!(!m.matches(&Req::new("h", "/?user=a+b").facts()));
        assert!(!m.matches(&Req::new("h", "/").facts()));
    }

    #[test]
    fn grpc_condition() {
        let m = RouteMatch {
            grpc: true,
            ..any()
        };
        assert!(
            m.matches(
                &Req::new("h", "/s/M")
                    .header("content-type", "application/grpc")
                    .facts()
            )
        );
        assert!(
            m.matches(
                &Req::new("h", "/s/M")
                    .header("content-type", "application/grpc+proto")
                    .facts()
            )
        );
        assert!(
            !m.matches(
                &Req::new("h", "/s/M")
                    .header("content-type", "application/grpc-web")
                    .facts()
            )
        );
        assert!(
            !m.matches(
                &Req::new("h", "/s/M")
                    .header("content-type", "application/json")
                    .facts()
            )
        );
        assert!(!m.matches(&Req::new("h", "/s/M").facts()));
        assert!(any().matches(&Req::new("h", "/s/M").facts()));
    }

    #[test]
    fn all_conditions_combine() {
        let m = RouteMatch {
            path: PathMatch::Prefix("/api".into()),
            case_sensitive: true,
            headers: vec![header("x-env", Some(exact("canary")))],
            query_parameters: vec![QueryParameterMatch {
                name: "v".into(),
                value: None,
            }],
            grpc: false,
        };
        assert!(m.matches(&Req::new("h", "/api/x?v").header("x-env", "canary").facts()));
        assert!(!m.matches(&Req::new("h", "/api/x?v").header("x-env", "prod").facts()));
        assert!(!m.matches(&Req::new("h", "/api/x").header("x-env", "canary").facts()));
        assert!(!m.matches(&Req::new("h", "/other?v").header("x-env", "canary").facts()));
    }
}
