//! `weir-bench scrape`: what `/metrics` costs with the connection maps full
//! (65,536 entries each in ORIGDST_BY_SOCKET, ORIGDST_BY_CLIENT and
//! ACCEL_TCP_ONLY, the worst case for map fill): scrape latency, agent CPU
//! per scrape, and the 1-byte round-trip latency through the agent (p50,
//! p99, max) while `/metrics` is scraped every 20 ms against the same with
//! no scraping: a scrape that stalls an async thread shows in the max.
//! Not a test: nothing here asserts a timing.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{HashMap, Map, MapData};
use weir_common::{ClientKey, IpAddr, MAX_TRACKED_CONNECTIONS, OrigDst, SockKey, map_name};
use weir_tests::{AgentOptions, Server, TestNode, metric_sample, step};

use crate::tcp::{median, pingpong, use_release_binaries};

/// Inserts `count` entries that no connection will ever look up (netns
/// cookie 0, documentation addresses) into the agent's LRU hash map `name`.
fn fill<K: aya::Pod, V: aya::Pod>(
    node: &TestNode,
    name: &str,
    count: u32,
    entry: impl Fn(u32) -> (K, V),
) -> anyhow::Result<()> {
    let path = node.pin_dir().join("maps").join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut map: HashMap<_, K, V> = HashMap::try_from(Map::LruHashMap(data))?;
    for index in 0..count {
        let (key, value) = entry(index);
        map.insert(&key, &value, 0)
            .with_context(|| format!("filling {name}"))?;
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn run(scrapes: usize, round_trips: u64, repeat: usize) -> anyhow::Result<()> {
    use_release_binaries()?;
    let mut node = TestNode::new()?;
    let a = node.add_pod("client")?;
    let b = node.add_pod("server")?;
    let _echo = Server::start(&b, 9001, "echo")?;
    node.start_agent(&AgentOptions::enroll(&["client", "server"]))?;
    let echo = format!("{}:9001", b.ip);

    step(&format!(
        "filling three connection maps with {MAX_TRACKED_CONNECTIONS} entries each"
    ));
    let documentation = |index: u32| IpAddr {
        ip: [u32::from_be_bytes([192, 0, 2, 0]) | (index >> 16), 0, 0, 0],
        family: libc::AF_INET as u16,
        _pad: 0,
    };
    let orig = |index: u32| OrigDst {
        netns_cookie: 0,
        addr: documentation(index),
        port: index as u16,
        _pad: 0,
    };
    fill(
        &node,
        map_name::ORIGDST_BY_SOCKET,
        MAX_TRACKED_CONNECTIONS,
        |index| (u64::MAX - u64::from(index), orig(index)),
    )?;
    fill(
        &node,
        map_name::ORIGDST_BY_CLIENT,
        MAX_TRACKED_CONNECTIONS,
        |index| {
            let key = ClientKey {
                netns_cookie: 0,
                addr: documentation(index),
                port: index as u16,
                _pad: 0,
            };
            (key, orig(index))
        },
    )?;
    fill(
        &node,
        map_name::ACCEL_TCP_ONLY,
        MAX_TRACKED_CONNECTIONS,
        |index| {
            let key = SockKey {
                local_ip: [u32::from_ne_bytes([192, 0, 2, 1]), 0, 0, 0],
                remote_ip: [u32::from_ne_bytes([192, 0, 2, 2]), 0, 0, 0],
                local_port: index,
                remote_port: 9,
                family: u32::from(weir_common::AF_INET),
            };
            (key, 1u8)
        },
    )?;

    step(&format!(
        "{scrapes} scrapes of /metrics, one after the other"
    ));
    let pid = node.agent_pid().context("no agent")?;
    let cpu_before = crate::cpu::seconds(pid)?;
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut last = String::new();
    for _ in 0..scrapes {
        let scrape = Instant::now();
        let (status, text) = node.http_get(15020, "/metrics")?;
        latencies.push(scrape.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(status == 200, "/metrics: {status}");
        anyhow::ensure!(
            text.contains("weir_bpf_map_entries{map=\"ORIGDST_BY_SOCKET\"}"),
            "no map fill in /metrics"
        );
        last = text;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_per_scrape = (crate::cpu::seconds(pid)? - cpu_before) / scrapes as f64 * 1e3;
    latencies.sort_by(f64::total_cmp);

    step(&format!(
        "{repeat} x {round_trips} round trips, without and with back-to-back scrapes"
    ));
    let pingpong = || -> anyhow::Result<[f64; 3]> {
        let ping = pingpong(&a, &echo, round_trips)?;
        Ok(["p50_us", "p99_us", "max_us"].map(|field| ping[field].as_f64().unwrap_or(0.0)))
    };
    // p50, p99 and max of each run, without and with scraping.
    let (mut quiet, mut busy) = ([(); 3].map(|_| Vec::new()), [(); 3].map(|_| Vec::new()));
    let node = Arc::new(node);
    for _ in 0..repeat {
        for (values, value) in quiet.iter_mut().zip(pingpong()?) {
            values.push(value);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let scraper = {
            let (node, stop) = (node.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut count = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if node.http_get(15020, "/metrics").is_ok() {
                        count += 1;
                    }
                    // Paced, so the scraper itself does not take a core.
                    std::thread::sleep(Duration::from_millis(20));
                }
                count
            })
        };
        let measured = pingpong();
        stop.store(true, Ordering::Relaxed);
        let _ = scraper.join();
        for (values, value) in busy.iter_mut().zip(measured?) {
            values.push(value);
        }
    }

    println!(
        "\n/metrics with ORIGDST_BY_SOCKET, ORIGDST_BY_CLIENT and ACCEL_TCP_ONLY full ({MAX_TRACKED_CONNECTIONS} entries each)"
    );
    println!(
        "  scrape latency:      p50 {:>8.2} ms   max {:>8.2} ms   ({scrapes} scrapes in {elapsed:.2} s)",
        percentile(&latencies, 0.5),
        percentile(&latencies, 1.0),
    );
    println!("  agent CPU per scrape: {cpu_per_scrape:>7.2} ms");
    let entries: Vec<String> = [
        map_name::ORIGDST_BY_SOCKET,
        map_name::ORIGDST_BY_CLIENT,
        map_name::ACCEL_TCP_ONLY,
    ]
    .iter()
    .map(|name| {
        let label = format!("map=\"{name}\"");
        let count = metric_sample(&last, "weir_bpf_map_entries{", &[&label]);
        format!("{name} {}", count.unwrap_or(f64::NAN))
    })
    .collect();
    println!("  entries reported:    {}", entries.join(", "));
    for (name, runs) in [("no scraping", quiet), ("scraped every 20 ms", busy)] {
        let [p50, p99, max] = runs.map(median);
        println!(
            "  round trip, {name:<20} p50 {p50:>7.1} µs   p99 {p99:>8.1} µs   max {max:>9.1} µs"
        );
    }
    println!("  (round trips: medians of {repeat} runs of {round_trips})");
    Ok(())
}
