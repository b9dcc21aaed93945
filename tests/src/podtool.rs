//! Driving `podtool` (the test workload) from tests: servers whose every
//! connection is reported, and clients whose result is parsed.
use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use crate::{Pod, wait_for};

/// What a server saw of one connection.
#[derive(Debug, Clone, Deserialize)]
pub struct ConnectionReport {
    /// The client address as the server saw it.
    pub peer: String,
    /// The server's local address.
    pub local: String,
    pub bytes: u64,
}

impl ConnectionReport {
    /// The peer's IP, without port or IPv6 brackets.
    pub fn peer_ip(&self) -> &str {
        let ip = self
            .peer
            .rsplit_once(':')
            .map(|(ip, _)| ip)
            .unwrap_or(&self.peer);
        ip.trim_start_matches('[').trim_end_matches(']')
    }
}

/// What a client saw.
#[derive(Debug, Clone, Deserialize)]
pub struct SendReport {
    /// `getsockname` of the client socket: what the application sees (the
    /// pod's own address, captured or not).
    pub local: String,
    /// The socket's local address in the kernel's socket table, which no
    /// hook rewrites: `127.0.0.1:…` when captured.
    #[serde(default)]
    pub kernel_local: String,
    /// `getpeername`: the address the application connected to.
    pub peer: String,
    pub sent: u64,
    pub received: u64,
    pub intact: bool,
    pub error: Option<String>,
}

impl SendReport {
    /// Whether the connection went to the pod-local outbound listener.
    pub fn captured(&self) -> bool {
        ["127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:"]
            .iter()
            .any(|prefix| self.kernel_local.starts_with(prefix))
    }
}

/// A `podtool serve` process in a pod.
pub struct Server {
    child: Child,
    reports: Arc<Mutex<Vec<ConnectionReport>>>,
    pub port: u16,
}

impl Server {
    /// Starts `podtool serve --mode <mode>` and waits until it listens.
    pub fn start(pod: &Pod, port: u16, mode: &str) -> anyhow::Result<Server> {
        Server::start_on(pod, "0.0.0.0", port, mode)
    }

    /// Same, listening on the unspecified address of `family` (`[::]`
    /// takes IPv6 and IPv4-mapped clients).
    pub fn start_family(
        pod: &Pod,
        family: crate::Family,
        port: u16,
        mode: &str,
    ) -> anyhow::Result<Server> {
        Server::start_on(pod, family.any(), port, mode)
    }

    /// Same, listening on `bind` (`::` for IPv6).
    pub fn start_on(pod: &Pod, bind: &str, port: u16, mode: &str) -> anyhow::Result<Server> {
        let mut command = pod.podtool()?.args([
            "serve",
            "--bind",
            bind,
            "--port",
            &port.to_string(),
            "--mode",
            mode,
        ]);
        command
            .command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().context("server stdout")?;
        let reports = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sink = reports.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("\"listening\"") {
                    let _ = ready_tx.send(());
                } else if let Ok(report) = serde_json::from_str::<ConnectionReport>(&line) {
                    sink.lock().unwrap_or_else(|e| e.into_inner()).push(report);
                }
            }
        });
        if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
            let _ = child.kill();
            bail!("podtool serve on {}:{port} did not start", pod.name);
        }
        Ok(Server {
            child,
            reports,
            port,
        })
    }

    pub fn reports(&self) -> Vec<ConnectionReport> {
        self.reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until at least `count` connections have been reported.
    pub fn wait_reports(&self, count: usize) -> anyhow::Result<Vec<ConnectionReport>> {
        wait_for(
            &format!("{count} connection report(s) on port {}", self.port),
            Duration::from_secs(10),
            || {
                let reports = self.reports();
                (reports.len() >= count).then_some(reports)
            },
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `podtool <args>` in `pod`; its last output line, parsed.
fn run_json<T: serde::de::DeserializeOwned>(pod: &Pod, args: &[&str]) -> anyhow::Result<T> {
    let output = pod.podtool()?.args(args).output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| {
        format!(
            "podtool {} output {stdout:?}, stderr {:?}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// Runs `podtool send` in `pod`: `bytes` random bytes to `to`, all read back.
pub fn send(pod: &Pod, to: &str, bytes: u64) -> anyhow::Result<SendReport> {
    run_json(pod, &["send", "--to", to, "--bytes", &bytes.to_string()])
}

/// [`send`] over IPv6 with a Destination Options header on every packet
/// (the SYN first).
pub fn send_with_dstopts(pod: &Pod, to: &str, bytes: u64) -> anyhow::Result<SendReport> {
    let bytes = bytes.to_string();
    run_json(pod, &["send", "--to", to, "--bytes", &bytes, "--dstopts"])
}

/// Runs `podtool burst` in `pod`: `count` connections to `to` opened at the
/// same instant, each echoing 1 KiB; how many succeeded.
pub fn burst(pod: &Pod, to: &str, count: usize) -> anyhow::Result<u64> {
    let report: serde_json::Value =
        run_json(pod, &["burst", "--to", to, "--count", &count.to_string()])?;
    report["ok"]
        .as_u64()
        .with_context(|| format!("podtool burst: {report}"))
}

/// The bytes `podtool send` sends (deterministic xorshift), so tests can
/// look for them.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// The seed of `podtool send`'s payload.
pub const SEND_SEED: u64 = 0x5eed;

/// Runs `podtool stream` in `pod` against `to` for `seconds`; returns the
/// number of exchanges, failing if any went wrong.
pub fn stream(pod: &Pod, to: &str, seconds: u64) -> anyhow::Result<u64> {
    let output = pod
        .podtool()?
        .args(["stream", "--to", to, "--seconds", &seconds.to_string()])
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let value: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .with_context(|| format!("podtool stream output {stdout:?}"))?;
    if value["ok"] != true {
        bail!("stream failed: {value}");
    }
    value["exchanges"].as_u64().context("exchanges")
}

/// `podtool probe` running in the background: a new connection to `to`
/// every `interval_ms`, one JSON line each (`ok`, `local`, `kernel_local`,
/// `error`), collected as they come. Killed on drop.
pub struct Probe {
    child: Child,
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Probe {
    pub fn start(pod: &Pod, to: &str, interval_ms: u64) -> anyhow::Result<Probe> {
        let interval = interval_ms.to_string();
        let mut command = pod
            .podtool()?
            .args(["probe", "--to", to, "--interval-ms", &interval]);
        command.command.stdout(Stdio::piped());
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().context("probe stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(value) = serde_json::from_str(&line) {
                    sink.lock().unwrap_or_else(|e| e.into_inner()).push(value);
                }
            }
        });
        Ok(Probe { child, lines })
    }

    /// The lines so far.
    pub fn lines(&self) -> std::sync::MutexGuard<'_, Vec<serde_json::Value>> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a line is a successful exchange through the proxy: the
    /// kernel's own view of the client socket is the in-pod loopback
    /// listener's (`local`, what the application sees, is rewritten).
    pub fn captured(line: &serde_json::Value) -> bool {
        line["kernel_local"]
            .as_str()
            .is_some_and(|local| local.starts_with("127.0.0.1:"))
    }

    /// The process, still the same one, still running.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
