//! `weir bpf`: what an agent has loaded and pinned, map fill against
//! capacity, and the bpftool commands that show each object.
use std::{fmt::Write as _, path::Path};

use aya::maps::{HashMap, Map, MapData, MapInfo};
use weir_common::{ClientKey, EnrolledPod, OrigDst, PodRestore, SockKey, map_name};

fn entries<K: aya::Pod, V: aya::Pod>(path: &Path, lru: bool) -> Option<usize> {
    let data = MapData::from_pin(path).ok()?;
    let map = if lru {
        Map::LruHashMap(data)
    } else {
        Map::HashMap(data)
    };
    let map: HashMap<_, K, V> = HashMap::try_from(map).ok()?;
    Some(map.keys().filter_map(Result::ok).count())
}

/// Map fill, for the maps whose key and value types are Weir's own.
fn fill(name: &str, path: &Path) -> Option<usize> {
    match name {
        map_name::ENROLLED_PODS => entries::<u64, EnrolledPod>(path, false),
        map_name::ORIGDST_BY_SOCKET => entries::<u64, OrigDst>(path, true),
        map_name::ORIGDST_BY_CLIENT => entries::<ClientKey, OrigDst>(path, true),
        map_name::EXCLUDED_PORTS => entries::<u16, u8>(path, false),
        map_name::POD_RESTORE => entries::<u64, PodRestore>(path, false),
        map_name::ACCEL_TCP_ONLY => entries::<SockKey, u8>(path, true),
        _ => None,
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// One pinned map: how full it is against its capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapFill {
    pub name: String,
    /// Entries held, for the hash maps whose types are Weir's own (keys are
    /// counted); `None` for the others.
    pub entries: Option<usize>,
    /// `max_entries`, as `bpftool map show` reports it.
    pub capacity: u32,
}

/// Fill against capacity of every map pinned under `<pin_dir>/maps`, by name.
pub fn map_fill(pin_dir: &Path) -> Vec<MapFill> {
    let maps = pin_dir.join("maps");
    names(&maps)
        .into_iter()
        .map(|name| {
            let path = maps.join(&name);
            let capacity = MapInfo::from_pin(&path)
                .map(|info| info.max_entries())
                .unwrap_or(0);
            let entries = fill(&name, &path);
            MapFill {
                name,
                entries,
                capacity,
            }
        })
        .collect()
}

/// The summary of the agent pinned at `pin_dir`.
pub fn summary(pin_dir: &Path) -> anyhow::Result<String> {
    if !pin_dir.is_dir() {
        anyhow::bail!(
            "{} does not exist: is an agent with this instance running?",
            pin_dir.display()
        );
    }
    let mut out = String::new();
    writeln!(out, "pins: {}", pin_dir.display())?;
    writeln!(out, "\nprograms:")?;
    for name in names(&pin_dir.join("progs")) {
        let path = pin_dir.join("progs").join(&name);
        writeln!(
            out,
            "  {name:24} bpftool prog show pinned {}",
            path.display()
        )?;
    }
    writeln!(
        out,
        "\ncgroup attachments (bpf links; the socket-address hooks run ahead of others, BPF_F_PREORDER):"
    )?;
    for name in names(&pin_dir.join("links"))
        .into_iter()
        .filter(|name| name != "tc")
    {
        let path = pin_dir.join("links").join(&name);
        writeln!(
            out,
            "  {name:24} bpftool link show pinned {}",
            path.display()
        )?;
    }
    writeln!(out, "\nmaps (entries / capacity):")?;
    for map in map_fill(pin_dir) {
        let path = pin_dir.join("maps").join(&map.name);
        let used = map
            .entries
            .map(|n| n.to_string())
            .unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "  {:20} {used:>6} / {:<6} bpftool map dump pinned {}",
            map.name,
            map.capacity,
            path.display()
        )?;
    }
    writeln!(
        out,
        "\ninbound classifiers (tcx links, first on each pod's ingress; by the pod's netns cookie):"
    )?;
    let tc = pin_dir.join("links").join("tc");
    for name in names(&tc) {
        let path = tc.join(&name);
        writeln!(
            out,
            "  {name:24} bpftool link show pinned {}",
            path.display()
        )?;
    }
    writeln!(
        out,
        "programs' own logs: weir run --bpf-debug (or /logging?level=weir=debug on the admin port)"
    )?;
    Ok(out)
}

/// The chains a running agent reports on its admin port (`/bpf/chains`).
pub async fn chains(admin: std::net::SocketAddr) -> anyhow::Result<Vec<super::chain::Chain>> {
    use http_body_util::BodyExt as _;
    let stream = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(admin),
    )
    .await??;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::get("/bpf/chains")
        .header(hyper::header::HOST, admin.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let response = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    })
    .await??;
    let (status, body) = response;
    if !status.is_success() {
        anyhow::bail!("{status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(serde_json::from_slice(&body)?)
}
