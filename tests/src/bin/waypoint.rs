//! A stand-in Istio waypoint for the tests: an HBONE server (HTTP/2
//! `CONNECT` over mutual TLS 1.3) with a certificate for its own identity
//! from the mesh's root, as a waypoint pod's Envoy terminates the tunnels
//! ztunnel sends it. Each `CONNECT` is reported on stdout as a JSON line
//! (its `:authority`, the client's proven identity, `baggage`,
//! `traceparent`, `forwarded`), then carried to its route's backend in
//! plaintext, as a waypoint forwards what it admitted.
//!
//! `waypoint --ca-dir DIR --identity SPIFFE --port 15008
//!  [--route AUTHORITY=BACKEND]...`
use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use weir_agent::{
    proxy::h2::H2Stream,
    security::{
        identity::{BuiltinCa, CertificateAuthority, Identity, SecretManager},
        tls,
    },
};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|arg| arg == name)
        .and_then(|index| args.get(index + 1).cloned())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let ca_dir = std::path::PathBuf::from(arg(&args, "--ca-dir").context("--ca-dir")?);
    let identity: Identity = arg(&args, "--identity")
        .context("--identity")?
        .parse()
        .map_err(|e| anyhow::anyhow!("--identity: {e}"))?;
    let port: u16 = arg(&args, "--port").context("--port")?.parse()?;
    let mut routes = HashMap::new();
    for (index, arg) in args.iter().enumerate() {
        if arg == "--route" {
            let route = args.get(index + 1).context("--route AUTHORITY=BACKEND")?;
            let (authority, backend) = route.split_once('=').context("AUTHORITY=BACKEND")?;
            routes.insert(
                authority.parse::<SocketAddr>()?,
                backend.parse::<SocketAddr>()?,
            );
        }
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(serve(ca_dir, identity, port, Arc::new(routes)))
}

async fn serve(
    ca_dir: std::path::PathBuf,
    identity: Identity,
    port: u16,
    routes: Arc<HashMap<SocketAddr, SocketAddr>>,
) -> anyhow::Result<()> {
    let ca = BuiltinCa::load(&ca_dir.join("root.pem"), &ca_dir.join("root-key.pem"))?;
    let secrets = SecretManager::new(
        CertificateAuthority::Builtin(Box::new(ca)),
        Duration::from_secs(3600),
        Duration::from_secs(60),
    );
    let certificate = secrets.fetch(&identity).await?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&certificate)?);
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([0u16; 8], port))).await?;
    println!("{}", serde_json::json!({"listening": port}));
    loop {
        let (tcp, _) = listener.accept().await?;
        let acceptor = acceptor.clone();
        let routes = routes.clone();
        tokio::spawn(async move {
            if let Err(error) = connection(acceptor, tcp, routes).await {
                eprintln!("waypoint: {error:#}");
            }
        });
    }
}

async fn connection(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    routes: Arc<HashMap<SocketAddr, SocketAddr>>,
) -> anyhow::Result<()> {
    let tls = acceptor.accept(tcp).await?;
    let client = tls::peer_identity(tls.get_ref().1.peer_certificates())
        .map(|id| id.to_string())
        .unwrap_or_default();
    let mut h2 = h2::server::handshake(tls).await?;
    while let Some(accepted) = h2.accept().await {
        let (request, mut respond) = accepted?;
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let authority = request
            .uri()
            .authority()
            .map(|authority| authority.to_string())
            .unwrap_or_default();
        println!(
            "{}",
            serde_json::json!({
                "method": request.method().as_str(),
                "authority": authority,
                "client": client,
                "baggage": header("baggage"),
                "traceparent": header("traceparent"),
                "forwarded": header("forwarded"),
            })
        );
        let backend = authority
            .parse::<SocketAddr>()
            .ok()
            .map(|authority| routes.get(&authority).copied().unwrap_or(authority));
        tokio::spawn(async move {
            let Some(backend) = backend else {
                let _ = respond.send_response(status(400), true);
                return;
            };
            let Ok(mut upstream) = tokio::net::TcpStream::connect(backend).await else {
                let _ = respond.send_response(status(503), true);
                return;
            };
            let Ok(send) = respond.send_response(status(200), false) else {
                return;
            };
            let mut stream = H2Stream::new(send, request.into_body());
            let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
        });
    }
    Ok(())
}

fn status(code: u16) -> http::Response<()> {
    let mut response = http::Response::new(());
    *response.status_mut() = http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::OK);
    response
}
