//! `httptool`: the HTTP/1.1, HTTP/2 and gRPC workload run inside test pods,
//! for the L7 proxy's tests. Every result is one JSON line on stdout; bad
//! arguments print `{"error":..}` and exit 2.
//!
//! serve --port P --name NAME [--bind IP] [--http1-only]
//!     [--tls-cert F --tls-key F [--tls-client-ca F]] [--proxy-protocol]
//!     HTTP/1.1 and prior-knowledge HTTP/2 (h2c) on one port (only HTTP/1.1
//!     with --http1-only: an HTTP/2 preface is a malformed request); requests
//!     to `/weir.test.Echo/…` whose
//!     content-type starts with `application/grpc` go to the `weir.test.Echo`
//!     service (proto/echo.proto: Call echoes, Stream sends `count` replies;
//!     `fail_code` != 0 ends either with that status, "requested failure";
//!     replies and failures carry `x-backend: NAME` metadata). Prints
//!     `listening` once bound, then one
//!     line per request: {"backend","method","authority","path","query",
//!     "version","headers","peer"} (plus "body_len" for plain HTTP).
//!     With --tls-cert, each connection is TLS first (a client certificate
//!     signed by --tls-client-ca is asked for, not required), and request
//!     lines add "tls": {"sni", "client_certificate" (whether one came)}.
//!     With --proxy-protocol, each connection starts with a PROXY protocol
//!     header (v1 or v2), and request lines add "proxy": {"version",
//!     "source", "destination"}; a connection without one is closed.
//!     Plain HTTP answers 200, header `x-backend: NAME`, and a JSON body
//!     of the same fields as the request line (with "body_len").
//!     Query parameters (any path; values are not percent-decoded):
//!       status=S            answer S
//!       delay_ms=D          wait D ms before answering
//!       fail_first=N&key=K  503 for the first N requests with key K, then as usual
//!       fail_status=S       with fail_first: answer S (not 503) to those N
//!       close=1             drop the connection (HTTP/2: reset the stream), no answer
//!       body_bytes=N        answer N printable pattern bytes (streamed), not JSON
//!       forward=URL         GET http://IP[:PORT]/PATH (plain, or percent-encoded
//!                           when it has a query) over HTTP/1.1 first, copying the
//!                           request's trace headers (traceparent, tracestate, b3,
//!                           x-b3-*, x-request-id) onto it, as an instrumented app
//!                           does; answers that response's status with
//!                           {"forwarded": STATUS, "backend", "response": its body
//!                           (JSON when it is)}, or 502 {"forwarded": null, "error"}
//!     `Upgrade: echo` + `Connection: upgrade` (HTTP/1.1): 101, then the
//!     upgraded stream is echoed byte for byte. `CONNECT host:port`
//!     (HTTP/1.1): 200, then the tunnel is echoed the same way.
//!
//! get --url http://IP:PORT/PATH [--h2] [--method M] [--header 'k: v']...
//!     [--data S] [--count N] [--concurrency C] [--timeout-ms T]
//!     N requests (method GET, or POST with --data) over kept-alive
//!     connections: HTTP/1.1 uses C connections, --h2 one multiplexed
//!     connection with C requests in flight. Per response
//!     {"status","version","headers","body" (first 4 KiB),"body_len","elapsed_ms"},
//!     or {"error","elapsed_ms"} on a transport error or timeout (default
//!     10 s); with N > 1 a final {"summary":{"count","by_status","errors",
//!     "by_backend"}} (backend from `x-backend`).
//!
//! grpc --to IP:PORT --message M [--fail-code C] [--count N] [--stream R]
//!     [--metadata k=v]... [--timeout-ms T]
//!     N Echo/Call calls (or Echo/Stream asking for R replies) on one h2c
//!     channel. Per call {"code" (0 = OK),"message","backend","metadata",
//!     "elapsed_ms"} (streams add "replies" and "messages"); with N > 1 a
//!     final {"summary":{"count","by_code","by_backend"}}.
//!
//! upgrade --to IP:PORT --bytes N [--connect HOST:PORT [--h2]] [--timeout-ms T]
//!     An `Upgrade: echo` request; after the 101, N pattern bytes are sent
//!     and read back: {"status":101,"echoed":N,"intact":true}. With
//!     --connect, a `CONNECT HOST:PORT` request instead, expecting 200
//!     before the bytes: {"status":200,"echoed":N,"intact":true}; with --h2,
//!     that CONNECT is an HTTP/2 stream (prior knowledge).
use std::{
    collections::{BTreeMap, HashMap},
    io::Write as _,
    net::SocketAddr,
    pin::Pin,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    body::{Frame, Incoming},
    client::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tonic::{
    codegen::Service as _,
    metadata::{Ascii, KeyAndValueRef, MetadataKey, MetadataMap, MetadataValue},
};

mod proto {
    tonic::include_proto!("weir.test");
}
use proto::{
    EchoReply, EchoRequest,
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Why the tool gave up: bad arguments (exit 2) or a failure to run (exit 1).
enum Failure {
    Usage(String),
    Run(String),
}

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    // One thread is plenty for a test workload and spares the 2-core CI.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            emit(&json!({ "error": format!("tokio runtime: {e}") }));
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(raw)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            emit(&json!({ "error": message }));
            ExitCode::from(2)
        }
        Err(Failure::Run(message)) => {
            emit(&json!({ "error": message }));
            ExitCode::from(1)
        }
    }
}

async fn run(raw: Vec<String>) -> Result<(), Failure> {
    let Some((command, rest)) = raw.split_first() else {
        return Err(usage());
    };
    match command.as_str() {
        "serve" => {
            serve(&Args::parse(
                rest,
                &[
                    "--port",
                    "--name",
                    "--bind",
                    "--tls-cert",
                    "--tls-key",
                    "--tls-client-ca",
                ],
                &["--http1-only", "--proxy-protocol"],
            )?)
            .await
        }
        "get" => {
            let args = Args::parse(
                rest,
                &[
                    "--url",
                    "--method",
                    "--header",
                    "--data",
                    "--count",
                    "--concurrency",
                    "--timeout-ms",
                ],
                &["--h2"],
            )?;
            get(&args).await
        }
        "grpc" => {
            let args = Args::parse(
                rest,
                &[
                    "--to",
                    "--message",
                    "--fail-code",
                    "--count",
                    "--stream",
                    "--metadata",
                    "--timeout-ms",
                ],
                &[],
            )?;
            grpc(&args).await
        }
        "upgrade" => {
            upgrade(&Args::parse(
                rest,
                &["--to", "--bytes", "--connect", "--timeout-ms"],
                &["--h2"],
            )?)
            .await
        }
        _ => Err(usage()),
    }
}

fn usage() -> Failure {
    Failure::Usage("usage: httptool serve|get|grpc|upgrade ... (see the module doc)".into())
}

/// `--name value` options (repeatable) and `--flag`s; anything else is refused.
struct Args {
    values: HashMap<String, Vec<String>>,
    flags: Vec<String>,
}

impl Args {
    fn parse(raw: &[String], with_value: &[&str], flags: &[&str]) -> Result<Args, Failure> {
        let mut args = Args {
            values: HashMap::new(),
            flags: Vec::new(),
        };
        let mut iter = raw.iter();
        while let Some(name) = iter.next() {
            if flags.contains(&name.as_str()) {
                args.flags.push(name.clone());
            } else if with_value.contains(&name.as_str()) {
                let value = iter
                    .next()
                    .ok_or_else(|| Failure::Usage(format!("{name} needs a value")))?;
                args.values
                    .entry(name.clone())
                    .or_default()
                    .push(value.clone());
            } else {
                return Err(Failure::Usage(format!("unknown argument {name:?}")));
            }
        }
        Ok(args)
    }

    fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|flag| flag == name)
    }

    fn all(&self, name: &str) -> &[String] {
        self.values.get(name).map(Vec::as_slice).unwrap_or_default()
    }

    fn one(&self, name: &str) -> Option<&str> {
        self.all(name).last().map(String::as_str)
    }

    fn required(&self, name: &str) -> Result<&str, Failure> {
        self.one(name)
            .ok_or_else(|| Failure::Usage(format!("missing {name}")))
    }

    fn number<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, Failure> {
        match self.one(name) {
            None => Ok(default),
            Some(text) => text
                .parse()
                .map_err(|_| Failure::Usage(format!("bad {name} {text:?}"))),
        }
    }

    fn timeout(&self) -> Result<Duration, Failure> {
        Ok(Duration::from_millis(self.number("--timeout-ms", 10_000)?))
    }
}

/// Writes one JSON line and flushes it, so a reader sees it at once.
fn emit(value: &Value) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{value}");
    let _ = stdout.flush();
}

/// Lowercased name → values joined by ", ".
fn headers_json(headers: &HeaderMap) -> Value {
    let mut map = serde_json::Map::new();
    for name in headers.keys() {
        let values: Vec<String> = headers
            .get_all(name)
            .iter()
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
            .collect();
        map.insert(name.as_str().to_owned(), values.join(", ").into());
    }
    Value::Object(map)
}

/// An error with its sources: hyper's own messages alone are terse.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Milliseconds, to the microsecond.
fn elapsed_ms(start: Instant) -> f64 {
    (start.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

/// Deterministic payload bytes (xorshift, as podtool's).
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|i| {
            let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------- serve

struct ServerState {
    name: String,
    name_header: HeaderValue,
    /// Requests seen per `key`, for `fail_first`.
    fail_counts: Mutex<HashMap<String, u64>>,
    echo: EchoServer<EchoService>,
}

async fn serve(args: &Args) -> Result<(), Failure> {
    let bind = args.one("--bind").unwrap_or("0.0.0.0");
    let port: u16 = args.number("--port", 0)?;
    if port == 0 {
        return Err(Failure::Usage("missing or zero --port".into()));
    }
    let name = args.required("--name")?.to_owned();
    let http1_only = args.flag("--http1-only");
    let name_header = HeaderValue::from_str(&name)
        .map_err(|_| Failure::Usage(format!("--name {name:?} is not a header value")))?;
    let name_metadata: MetadataValue<Ascii> = name
        .parse()
        .map_err(|_| Failure::Usage(format!("--name {name:?} is not ASCII metadata")))?;
    let ip: std::net::IpAddr = bind
        .parse()
        .map_err(|_| Failure::Usage(format!("bad --bind {bind:?}")))?;
    let listener = TcpListener::bind((ip, port))
        .await
        .map_err(|e| Failure::Run(format!("binding {bind}:{port}: {e}")))?;
    let tls = tls_acceptor(args)?;
    let proxy_protocol = args.flag("--proxy-protocol");
    let state = Arc::new(ServerState {
        name: name.clone(),
        name_header,
        fail_counts: Mutex::new(HashMap::new()),
        echo: EchoServer::new(EchoService {
            name,
            name_metadata,
        }),
    });
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "listening");
    let _ = stdout.flush();
    drop(stdout);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("httptool: accept: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            let seen_proxy = if proxy_protocol {
                match read_proxy_header(&mut stream).await {
                    Ok(seen) => Some(ProxySeen(seen)),
                    Err(e) => {
                        eprintln!("httptool: PROXY header from {peer}: {e}");
                        return;
                    }
                }
            } else {
                None
            };
            let (stream, seen_tls): (Box<dyn ServerIo>, Option<TlsSeen>) = match tls {
                None => (Box::new(stream), None),
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(stream) => {
                        let (_, connection) = stream.get_ref();
                        let seen = TlsSeen(json!({
                            "sni": connection.server_name(),
                            "client_certificate": connection.peer_certificates().is_some(),
                        }));
                        (Box::new(stream), Some(seen))
                    }
                    Err(e) => {
                        eprintln!("httptool: TLS from {peer}: {e}");
                        return;
                    }
                },
            };
            let service = service_fn(move |mut request: Request<Incoming>| {
                if let Some(seen) = &seen_tls {
                    request.extensions_mut().insert(seen.clone());
                }
                if let Some(seen) = &seen_proxy {
                    request.extensions_mut().insert(seen.clone());
                }
                handle(state.clone(), peer, request)
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            if http1_only {
                builder = builder.http1_only();
            }
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await
                && !is_close_requested(&*e)
            {
                eprintln!("httptool: connection from {peer}: {}", error_chain(&*e));
            }
        });
    }
}

/// What a TLS connection's handshake showed, for its request lines.
#[derive(Clone)]
struct TlsSeen(Value);

/// The PROXY protocol header a connection began with.
#[derive(Clone)]
struct ProxySeen(Value);

/// Reads exactly the PROXY protocol header (v1 or v2) at the start of
/// `stream`, leaving what follows: {"version", "source", "destination"}.
async fn read_proxy_header(stream: &mut TcpStream) -> Result<Value, String> {
    let mut buffer = vec![0u8; 536];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let peeked = stream.peek(&mut buffer).await.map_err(|e| e.to_string())?;
        if peeked == 0 {
            return Err("closed before a header".into());
        }
        let (length, seen) = match ppp::HeaderResult::parse(&buffer[..peeked]) {
            ppp::HeaderResult::V1(Ok(header)) => {
                let (source, destination) = match header.addresses {
                    ppp::v1::Addresses::Tcp4(a) => (
                        SocketAddr::from((a.source_address, a.source_port)),
                        SocketAddr::from((a.destination_address, a.destination_port)),
                    ),
                    ppp::v1::Addresses::Tcp6(a) => (
                        SocketAddr::from((a.source_address, a.source_port)),
                        SocketAddr::from((a.destination_address, a.destination_port)),
                    ),
                    ppp::v1::Addresses::Unknown => return Err("v1 UNKNOWN".into()),
                };
                (header.header.len(), (1, source, destination))
            }
            ppp::HeaderResult::V2(Ok(header)) => {
                let (source, destination) = match header.addresses {
                    ppp::v2::Addresses::IPv4(a) => (
                        SocketAddr::from((a.source_address, a.source_port)),
                        SocketAddr::from((a.destination_address, a.destination_port)),
                    ),
                    ppp::v2::Addresses::IPv6(a) => (
                        SocketAddr::from((a.source_address, a.source_port)),
                        SocketAddr::from((a.destination_address, a.destination_port)),
                    ),
                    other => return Err(format!("v2 addresses {other:?}")),
                };
                (header.header.len(), (2, source, destination))
            }
            result if ppp::PartialResult::is_incomplete(&result) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            other => return Err(format!("not a PROXY header: {other:?}")),
        };
        let mut header = vec![0u8; length];
        stream
            .read_exact(&mut header)
            .await
            .map_err(|e| e.to_string())?;
        let (version, source, destination) = seen;
        return Ok(json!({
            "version": version,
            "source": source.to_string(),
            "destination": destination.to_string(),
        }));
    }
}

trait ServerIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> ServerIo for T {}

/// `--tls-cert`/`--tls-key` (PEM), and the CA of the client certificates
/// asked for (`--tls-client-ca`).
fn tls_acceptor(args: &Args) -> Result<Option<tokio_rustls::TlsAcceptor>, Failure> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let (Some(cert), Some(key)) = (args.one("--tls-cert"), args.one("--tls-key")) else {
        return Ok(None);
    };
    let run = |what: &str, e: &dyn std::fmt::Display| Failure::Run(format!("{what}: {e}"));
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| run(cert, &e))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| run(key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| run("TLS versions", &e))?;
    let builder = match args.one("--tls-client-ca") {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for root in CertificateDer::pem_file_iter(ca).map_err(|e| run(ca, &e))? {
                roots
                    .add(root.map_err(|e| run(ca, &e))?)
                    .map_err(|e| run(ca, &e))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| run("client verifier", &e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| run("server certificate", &e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}

/// The service's error for `close=1`: expected, so not logged.
#[derive(Debug)]
struct CloseRequested;

impl std::fmt::Display for CloseRequested {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("close requested")
    }
}

impl std::error::Error for CloseRequested {}

fn is_close_requested(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |error| error.source())
        .any(|error| error.is::<CloseRequested>())
}

/// What a plain request's query asks of the server (see the module doc).
struct Controls {
    status: StatusCode,
    delay: Option<Duration>,
    /// (N, key, status): `status` for the first N requests with that key.
    fail_first: Option<(u64, String, StatusCode)>,
    close: bool,
    body_bytes: Option<u64>,
    /// A URL to call before answering (percent-decoded).
    forward: Option<String>,
}

impl Controls {
    fn from_query(uri: &Uri) -> Result<Controls, String> {
        let params: HashMap<&str, &str> = uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
            .collect();
        let number = |key: &str| -> Result<Option<u64>, String> {
            params
                .get(key)
                .map(|text| text.parse().map_err(|_| format!("bad {key}={text:?}")))
                .transpose()
        };
        let status = match number("status")? {
            None => StatusCode::OK,
            Some(code) => u16::try_from(code)
                .ok()
                .and_then(|code| StatusCode::from_u16(code).ok())
                .ok_or_else(|| format!("bad status={code}"))?,
        };
        let key = params.get("key").copied().unwrap_or_default().to_owned();
        let fail_status = match number("fail_status")? {
            None => StatusCode::SERVICE_UNAVAILABLE,
            Some(code) => u16::try_from(code)
                .ok()
                .and_then(|code| StatusCode::from_u16(code).ok())
                .ok_or_else(|| format!("bad fail_status={code}"))?,
        };
        Ok(Controls {
            status,
            delay: number("delay_ms")?.map(Duration::from_millis),
            fail_first: number("fail_first")?.map(|limit| (limit, key, fail_status)),
            close: params.get("close") == Some(&"1"),
            body_bytes: number("body_bytes")?,
            forward: params.get("forward").map(|url| percent_decode(url)),
        })
    }
}

/// `%XX` escapes decoded; anything else (a bad escape too) kept as is.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escaped = (bytes[index] == b'%')
            .then(|| bytes.get(index + 1..index + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                index += 3;
            }
            None => {
                decoded.push(bytes[index]);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// Headers an instrumented application copies from the request it serves
/// onto the requests it makes (Istio's list, less the OpenTracing one).
const TRACE_HEADERS: [&str; 9] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-request-id",
];

/// `forward=URL`: one GET over a new HTTP/1.1 connection, carrying the
/// trace headers of `incoming`; (status, body).
async fn forward(url: &str, incoming: &HeaderMap) -> Result<(StatusCode, Bytes), BoxError> {
    let uri: Uri = url.parse()?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("forward={url:?}: only http:// URLs").into());
    }
    let authority = uri.authority().ok_or("forward URL without a host")?;
    let address = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let stream = connect(&address).await?;
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, authority.as_str())
        .body(Full::new(Bytes::new()))?;
    for name in TRACE_HEADERS {
        for value in incoming.get_all(name) {
            request
                .headers_mut()
                .append(HeaderName::from_static(name), value.clone());
        }
    }
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

fn request_json(
    name: &str,
    peer: SocketAddr,
    method: &Method,
    uri: &Uri,
    version: http::Version,
    headers: &HeaderMap,
) -> serde_json::Map<String, Value> {
    // HTTP/2 carries it in the URI (:authority), HTTP/1.1 in Host.
    let authority = match uri.authority() {
        Some(authority) => authority.as_str().to_owned(),
        None => headers
            .get(http::header::HOST)
            .map(|host| String::from_utf8_lossy(host.as_bytes()).into_owned())
            .unwrap_or_default(),
    };
    let Value::Object(map) = json!({
        "backend": name,
        "method": method.as_str(),
        "authority": authority,
        "path": uri.path(),
        "query": uri.query().unwrap_or_default(),
        "version": format!("{version:?}"),
        "headers": headers_json(headers),
        "peer": peer.to_string(),
    }) else {
        unreachable!("json! of an object literal is an object")
    };
    map
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

async fn handle(
    state: Arc<ServerState>,
    peer: SocketAddr,
    mut request: Request<Incoming>,
) -> Result<Response<Body>, BoxError> {
    let grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
        && request.uri().path().starts_with("/weir.test.Echo/");
    if grpc {
        emit(&Value::Object(request_json(
            &state.name,
            peer,
            request.method(),
            request.uri(),
            request.version(),
            request.headers(),
        )));
        let response = match state.echo.clone().call(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        return Ok(response.map(|body| body.map_err(BoxError::from).boxed_unsync()));
    }

    let tunnel = request.method() == Method::CONNECT;
    let upgrade =
        (tunnel || wants_echo_upgrade(&request)).then(|| hyper::upgrade::on(&mut request));
    let (parts, body) = request.into_parts();
    let body = body.collect().await?.to_bytes();
    let mut seen = request_json(
        &state.name,
        peer,
        &parts.method,
        &parts.uri,
        parts.version,
        &parts.headers,
    );
    seen.insert("body_len".into(), body.len().into());
    if let Some(TlsSeen(tls)) = parts.extensions.get::<TlsSeen>() {
        seen.insert("tls".into(), tls.clone());
    }
    if let Some(ProxySeen(proxy)) = parts.extensions.get::<ProxySeen>() {
        seen.insert("proxy".into(), proxy.clone());
    }
    let seen = Value::Object(seen);
    emit(&seen);

    let response = Response::builder().header("x-backend", state.name_header.clone());
    if let Some(upgrade) = upgrade {
        tokio::spawn(async move {
            match upgrade.await {
                Ok(upgraded) => {
                    let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
                    let _ = tokio::io::copy(&mut reader, &mut writer).await;
                    let _ = writer.shutdown().await;
                }
                Err(e) => eprintln!("httptool: upgrade from {peer}: {e}"),
            }
        });
        if tunnel {
            return Ok(response.status(StatusCode::OK).body(full(Bytes::new()))?);
        }
        return Ok(response
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(http::header::CONNECTION, "upgrade")
            .header(http::header::UPGRADE, "echo")
            .body(full(Bytes::new()))?);
    }

    let Controls {
        mut status,
        delay,
        fail_first,
        close,
        body_bytes,
        forward: forward_to,
    } = match Controls::from_query(&parts.uri) {
        Ok(controls) => controls,
        Err(message) => {
            let error = json!({ "backend": state.name, "error": message });
            return Ok(response
                .status(StatusCode::BAD_REQUEST)
                .body(full(error.to_string()))?);
        }
    };
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    if close {
        // An error from the service makes hyper drop the connection (HTTP/1)
        // or reset the stream (HTTP/2) without answering.
        return Err(Box::new(CloseRequested));
    }
    if let Some((limit, key, fail_status)) = fail_first {
        let mut counts = state.fail_counts.lock().unwrap_or_else(|e| e.into_inner());
        let requests = counts.entry(key).or_default();
        *requests += 1;
        if *requests <= limit {
            status = fail_status;
        }
    }
    if let Some(url) = forward_to {
        let (status, answer) = match forward(&url, &parts.headers).await {
            Ok((status, body)) => {
                let response = serde_json::from_slice::<Value>(&body)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned().into());
                (
                    status,
                    json!({"forwarded": status.as_u16(), "backend": state.name, "response": response}),
                )
            }
            Err(error) => (
                StatusCode::BAD_GATEWAY,
                json!({"forwarded": null, "backend": state.name, "error": error_chain(&*error)}),
            ),
        };
        return Ok(response
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(full(answer.to_string()))?);
    }
    let response = response.status(status);
    if let Some(total) = body_bytes {
        return Ok(response
            .header(http::header::CONTENT_TYPE, "application/octet-stream")
            .body(pattern_body(total))?);
    }
    Ok(response
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(full(seen.to_string()))?)
}

fn wants_echo_upgrade(request: &Request<Incoming>) -> bool {
    let header_has = |name: http::header::HeaderName, token: &str| {
        request.headers().get_all(name).iter().any(|value| {
            String::from_utf8_lossy(value.as_bytes())
                .split(',')
                .any(|part| part.trim().eq_ignore_ascii_case(token))
        })
    };
    request.version() == http::Version::HTTP_11
        && header_has(http::header::UPGRADE, "echo")
        && header_has(http::header::CONNECTION, "upgrade")
}

/// Printable bytes (`body` of `get` stays readable), position-dependent.
fn text_pattern(offset: u64, len: usize) -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    (offset..offset + len as u64)
        // A prime period: a chunk lost or repeated shifts the text visibly.
        .map(|i| ALPHABET[(i % 61) as usize])
        .collect()
}

/// `total` text pattern bytes in 16 KiB frames, made as they are sent.
fn pattern_body(total: u64) -> Body {
    const CHUNK: u64 = 16 * 1024;
    let frames = (0..total).step_by(CHUNK as usize).map(move |offset| {
        let len = CHUNK.min(total - offset) as usize;
        Ok::<_, BoxError>(Frame::data(Bytes::from(text_pattern(offset, len))))
    });
    StreamBody::new(tokio_stream::iter(frames)).boxed_unsync()
}

struct EchoService {
    name: String,
    name_metadata: MetadataValue<Ascii>,
}

impl EchoService {
    fn reply(&self, message: String, metadata: &MetadataMap) -> EchoReply {
        let mut seen: HashMap<String, String> = HashMap::new();
        for entry in metadata.iter() {
            if let KeyAndValueRef::Ascii(key, value) = entry {
                let value = value.to_str().unwrap_or_default();
                seen.entry(key.as_str().to_owned())
                    .and_modify(|joined| {
                        joined.push_str(", ");
                        joined.push_str(value);
                    })
                    .or_insert_with(|| value.to_owned());
            }
        }
        EchoReply {
            message,
            backend: self.name.clone(),
            metadata: seen,
        }
    }

    /// The requested failure, naming the backend in its metadata too.
    fn failure(&self, code: i32) -> tonic::Status {
        let mut status = tonic::Status::new(tonic::Code::from(code), "requested failure");
        status
            .metadata_mut()
            .insert("x-backend", self.name_metadata.clone());
        status
    }

    fn response<T>(&self, message: T) -> tonic::Response<T> {
        let mut response = tonic::Response::new(message);
        response
            .metadata_mut()
            .insert("x-backend", self.name_metadata.clone());
        response
    }
}

type ReplyStream =
    Pin<Box<dyn futures_core::Stream<Item = Result<EchoReply, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn call(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let fail_code = request.get_ref().fail_code;
        if fail_code != 0 {
            return Err(self.failure(fail_code));
        }
        let reply = self.reply(request.get_ref().message.clone(), request.metadata());
        Ok(self.response(reply))
    }

    type StreamStream = ReplyStream;

    /// `count` replies, then OK or the requested failure (in the trailers).
    async fn stream(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<ReplyStream>, tonic::Status> {
        let EchoRequest {
            message,
            fail_code,
            count,
        } = request.get_ref().clone();
        let reply = self.reply(message, request.metadata());
        let mut items: Vec<Result<EchoReply, tonic::Status>> =
            (0..count).map(|_| Ok(reply.clone())).collect();
        if fail_code != 0 {
            items.push(Err(self.failure(fail_code)));
        }
        Ok(self.response(Box::pin(tokio_stream::iter(items)) as ReplyStream))
    }
}

// ---------------------------------------------------------------- get

/// What every `get` request is made of.
struct GetPlan {
    addr: String,
    uri: Uri,
    /// Origin-form target for HTTP/1.1 (the full URI goes to HTTP/2).
    target: Uri,
    h2: bool,
    method: Method,
    headers: HeaderMap,
    data: Bytes,
    timeout: Duration,
}

#[derive(Default)]
struct Tally {
    count: u64,
    errors: u64,
    by_status: BTreeMap<String, u64>,
    by_backend: BTreeMap<String, u64>,
}

async fn get(args: &Args) -> Result<(), Failure> {
    let url = args.required("--url")?;
    let bad_url = || Failure::Usage(format!("bad --url {url:?} (want http://HOST:PORT/PATH)"));
    let uri: Uri = url.parse().map_err(|_| bad_url())?;
    if uri.scheme_str() != Some("http") {
        return Err(bad_url());
    }
    let authority = uri.authority().ok_or_else(bad_url)?;
    let addr = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let target: Uri = uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/")
        .parse()
        .map_err(|_| bad_url())?;
    let mut headers = HeaderMap::new();
    for line in args.all("--header") {
        let bad = || Failure::Usage(format!("bad --header {line:?} (want 'name: value')"));
        let (name, value) = line.split_once(':').ok_or_else(bad)?;
        let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad())?;
        let value = HeaderValue::from_str(value.trim()).map_err(|_| bad())?;
        headers.append(name, value);
    }
    let data = args.one("--data").map(|data| Bytes::from(data.to_owned()));
    let method = match args.one("--method") {
        Some(method) => Method::from_bytes(method.as_bytes())
            .map_err(|_| Failure::Usage(format!("bad --method {method:?}")))?,
        None if data.is_some() => Method::POST,
        None => Method::GET,
    };
    let count: u64 = args.number("--count", 1)?;
    let concurrency: u64 = args.number("--concurrency", 1)?;
    let plan = Arc::new(GetPlan {
        addr,
        uri: uri.clone(),
        target,
        h2: args.flag("--h2"),
        method,
        headers,
        data: data.unwrap_or_default(),
        timeout: args.timeout()?,
    });

    let next = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let shared_h2 = Arc::new(tokio::sync::Mutex::new(None));
    let workers: Vec<_> = (0..concurrency.clamp(1, count.max(1)))
        .map(|_| {
            tokio::spawn(get_worker(
                plan.clone(),
                count,
                next.clone(),
                tally.clone(),
                shared_h2.clone(),
            ))
        })
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    if count > 1 {
        let tally = tally.lock().unwrap_or_else(|e| e.into_inner());
        emit(&json!({ "summary": {
            "count": tally.count,
            "by_status": tally.by_status,
            "errors": tally.errors,
            "by_backend": tally.by_backend,
        }}));
    }
    Ok(())
}

type H2Sender = http2::SendRequest<Full<Bytes>>;

async fn get_worker(
    plan: Arc<GetPlan>,
    count: u64,
    next: Arc<AtomicU64>,
    tally: Arc<Mutex<Tally>>,
    shared_h2: Arc<tokio::sync::Mutex<Option<H2Sender>>>,
) {
    let mut h1: Option<http1::SendRequest<Full<Bytes>>> = None;
    while next.fetch_add(1, Ordering::Relaxed) < count {
        let start = Instant::now();
        let outcome = tokio::time::timeout(plan.timeout, get_once(&plan, &mut h1, &shared_h2))
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
        let mut tally = tally.lock().unwrap_or_else(|e| e.into_inner());
        tally.count += 1;
        match outcome {
            Ok((head, body)) => {
                *tally
                    .by_status
                    .entry(head.status.as_u16().to_string())
                    .or_default() += 1;
                if let Some(backend) = head.headers.get("x-backend") {
                    let backend = String::from_utf8_lossy(backend.as_bytes()).into_owned();
                    *tally.by_backend.entry(backend).or_default() += 1;
                }
                let shown = &body[..body.len().min(4096)];
                emit(&json!({
                    "status": head.status.as_u16(),
                    "version": format!("{:?}", head.version),
                    "headers": headers_json(&head.headers),
                    "body": String::from_utf8_lossy(shown),
                    "body_len": body.len(),
                    "elapsed_ms": elapsed_ms(start),
                }));
            }
            Err(e) => {
                tally.errors += 1;
                // A failed HTTP/1.1 connection is not reused.
                h1 = None;
                emit(&json!({ "error": error_chain(&*e), "elapsed_ms": elapsed_ms(start) }));
            }
        }
    }
}

/// One request; connects first when there is no open connection. Never
/// resends a request: retries are for the proxy under test to make.
async fn get_once(
    plan: &GetPlan,
    h1: &mut Option<http1::SendRequest<Full<Bytes>>>,
    shared_h2: &tokio::sync::Mutex<Option<H2Sender>>,
) -> Result<(http::response::Parts, Bytes), BoxError> {
    let mut request = Request::builder()
        .method(plan.method.clone())
        .uri(if plan.h2 { &plan.uri } else { &plan.target })
        .body(Full::new(plan.data.clone()))?;
    *request.headers_mut() = plan.headers.clone();
    let response = if plan.h2 {
        let mut sender = {
            let mut slot = shared_h2.lock().await;
            match slot.as_ref() {
                Some(sender) if !sender.is_closed() => sender.clone(),
                _ => {
                    let stream = connect(&plan.addr).await?;
                    let (sender, connection) =
                        http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
                    tokio::spawn(connection);
                    slot.insert(sender).clone()
                }
            }
        };
        sender.ready().await?;
        sender.send_request(request).await?
    } else {
        if !request.headers().contains_key(http::header::HOST)
            && let Some(authority) = plan.uri.authority()
        {
            request.headers_mut().insert(
                http::header::HOST,
                HeaderValue::from_str(authority.as_str())?,
            );
        }
        let reusable = match h1.as_mut() {
            Some(sender) => sender.ready().await.is_ok(),
            None => false,
        };
        if !reusable {
            let stream = connect(&plan.addr).await?;
            let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            *h1 = Some(sender);
        }
        let sender = h1.as_mut().ok_or("no connection")?;
        sender.ready().await?;
        sender.send_request(request).await?
    };
    let (head, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((head, body))
}

async fn connect(addr: &str) -> Result<TcpStream, BoxError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

// ---------------------------------------------------------------- grpc

async fn grpc(args: &Args) -> Result<(), Failure> {
    let to = args.required("--to")?;
    let message = args.required("--message")?.to_owned();
    let fail_code: i32 = args.number("--fail-code", 0)?;
    let count: u64 = args.number("--count", 1)?;
    let stream: Option<u32> = args
        .one("--stream")
        .map(|_| args.number("--stream", 0))
        .transpose()?;
    let timeout = args.timeout()?;
    let mut metadata = MetadataMap::new();
    for pair in args.all("--metadata") {
        let bad = || Failure::Usage(format!("bad --metadata {pair:?} (want key=value)"));
        let (key, value) = pair.split_once('=').ok_or_else(bad)?;
        let key = MetadataKey::from_bytes(key.as_bytes()).map_err(|_| bad())?;
        let value: MetadataValue<_> = value.parse().map_err(|_| bad())?;
        metadata.append(key, value);
    }
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{to}"))
        .map_err(|_| Failure::Usage(format!("bad --to {to:?} (want IP:PORT)")))?
        .timeout(timeout)
        .connect_timeout(timeout);
    let mut client = EchoClient::new(endpoint.connect_lazy());

    let mut by_code: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_backend: BTreeMap<String, u64> = BTreeMap::new();
    for _ in 0..count {
        let start = Instant::now();
        let mut request = tonic::Request::new(EchoRequest {
            message: message.clone(),
            fail_code,
            count: stream.unwrap_or(0),
        });
        *request.metadata_mut() = metadata.clone();
        let mut line = match stream {
            None => match client.call(request).await {
                Ok(response) => reply_json(response.into_inner()),
                Err(status) => status_json(&status),
            },
            Some(_) => call_stream(&mut client, request).await,
        };
        line.insert("elapsed_ms".into(), elapsed_ms(start).into());
        let code = line.get("code").cloned().unwrap_or_default();
        *by_code.entry(code.to_string()).or_default() += 1;
        if let Some(backend) = line.get("backend").and_then(Value::as_str)
            && !backend.is_empty()
        {
            *by_backend.entry(backend.to_owned()).or_default() += 1;
        }
        emit(&Value::Object(line));
    }
    if count > 1 {
        emit(&json!({ "summary": {
            "count": count,
            "by_code": by_code,
            "by_backend": by_backend,
        }}));
    }
    Ok(())
}

fn reply_json(reply: EchoReply) -> serde_json::Map<String, Value> {
    let metadata: BTreeMap<_, _> = reply.metadata.into_iter().collect();
    let Value::Object(map) = json!({
        "code": 0,
        "message": reply.message,
        "backend": reply.backend,
        "metadata": metadata,
    }) else {
        unreachable!("json! of an object literal is an object")
    };
    map
}

/// A failed call; the backend comes from the `x-backend` response metadata.
fn status_json(status: &tonic::Status) -> serde_json::Map<String, Value> {
    let backend = status
        .metadata()
        .get("x-backend")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let Value::Object(map) = json!({
        "code": status.code() as i32,
        "message": status.message(),
        "backend": backend,
    }) else {
        unreachable!("json! of an object literal is an object")
    };
    map
}

/// A Stream call: the last reply's fields, every reply's message, and the
/// final status.
async fn call_stream(
    client: &mut EchoClient<tonic::transport::Channel>,
    request: tonic::Request<EchoRequest>,
) -> serde_json::Map<String, Value> {
    let mut replies = match client.stream(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            let mut line = status_json(&status);
            line.insert("replies".into(), 0.into());
            return line;
        }
    };
    let mut messages = Vec::new();
    let mut last = None;
    let outcome = loop {
        match replies.message().await {
            Ok(Some(reply)) => {
                messages.push(reply.message.clone());
                last = Some(reply);
            }
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    let mut line = match (outcome, last) {
        (Some(status), last) => {
            let mut line = status_json(&status);
            if let Some(reply) = last {
                line.insert("backend".into(), reply.backend.into());
            }
            line
        }
        (None, Some(reply)) => reply_json(reply),
        (None, None) => {
            let Value::Object(map) = json!({ "code": 0, "message": "", "backend": "" }) else {
                unreachable!("json! of an object literal is an object")
            };
            map
        }
    };
    line.insert("replies".into(), messages.len().into());
    line.insert("messages".into(), messages.into());
    line
}

// ---------------------------------------------------------------- upgrade

async fn upgrade(args: &Args) -> Result<(), Failure> {
    let to = args.required("--to")?.to_owned();
    let bytes: usize = args.number("--bytes", 0)?;
    let connect_to = args.one("--connect");
    let h2 = args.flag("--h2");
    if h2 && connect_to.is_none() {
        return Err(Failure::Usage("upgrade --h2 needs --connect".into()));
    }
    let timeout = args.timeout()?;
    let line = match tokio::time::timeout(timeout, upgrade_once(&to, bytes, connect_to, h2)).await {
        Ok(Ok(line)) => line,
        Ok(Err(e)) => json!({ "error": error_chain(&*e) }),
        Err(_) => json!({ "error": "timed out" }),
    };
    emit(&line);
    Ok(())
}

async fn upgrade_once(
    to: &str,
    bytes: usize,
    connect_to: Option<&str>,
    h2: bool,
) -> Result<Value, BoxError> {
    let stream = connect(to).await?;
    let (request, expected) = match connect_to {
        // The authority form: `CONNECT host:port HTTP/1.1`.
        Some(authority) => (
            Request::builder()
                .method(Method::CONNECT)
                .uri(authority)
                .header(http::header::HOST, authority)
                .body(Full::new(Bytes::new()))?,
            StatusCode::OK,
        ),
        None => (
            Request::builder()
                .uri("/")
                .header(http::header::HOST, to)
                .header(http::header::CONNECTION, "upgrade")
                .header(http::header::UPGRADE, "echo")
                .body(Full::new(Bytes::new()))?,
            StatusCode::SWITCHING_PROTOCOLS,
        ),
    };
    let response = if h2 {
        // HTTP/2 CONNECT (RFC 9113 8.5): `:method CONNECT`, `:authority`.
        let (mut sender, connection) =
            http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        sender.send_request(request).await?
    } else {
        let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection.with_upgrades());
        sender.send_request(request).await?
    };
    let status = response.status();
    if status != expected {
        let body = response.into_body().collect().await?.to_bytes();
        return Ok(json!({
            "status": status.as_u16(),
            "error": format!("expected {}", expected.as_u16()),
            "body": String::from_utf8_lossy(&body),
        }));
    }
    let upgraded = hyper::upgrade::on(response).await?;
    let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
    let sent = pattern(0, bytes);
    // Written while reading, so a large payload cannot fill both directions.
    let payload = sent.clone();
    let writing = tokio::spawn(async move { writer.write_all(&payload).await });
    let mut received = Vec::with_capacity(bytes);
    let mut buffer = vec![0u8; 64 * 1024];
    while received.len() < bytes {
        let n = reader.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buffer[..n]);
    }
    writing.await??;
    Ok(json!({
        "status": status.as_u16(),
        "echoed": received.len(),
        "intact": received == sent,
    }))
}
