//! Driving `httptool` (the HTTP/1.1, HTTP/2 and gRPC test workload, see
//! src/bin/httptool.rs) from tests: servers whose every request is reported,
//! and clients whose JSON lines are returned as they are.
use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{Pod, node::NsCommand, wait_for};

/// The httptool binary: `$HTTPTOOL_BIN`, or beside the running test
/// executable as podtool is found (`target/<profile>/deps/<test>` or
/// `target/<profile>/<bin>`), where cargo builds it.
pub fn httptool_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("HTTPTOOL_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("httptool");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "`httptool` was not found beside {} (build it with `cargo build -p weir-tests --bins`, or set HTTPTOOL_BIN)",
        exe.display()
    )
}

/// `httptool` inside `pod`.
pub fn httptool(pod: &Pod) -> anyhow::Result<NsCommand> {
    pod.command(httptool_binary()?)
}

/// An `httptool serve` process in a pod: HTTP/1.1, h2c and gRPC on one port.
pub struct HttpServer {
    child: Child,
    requests: Arc<Mutex<Vec<Value>>>,
    pub port: u16,
    pub name: String,
}

impl HttpServer {
    /// Starts `httptool serve` on 0.0.0.0:`port`, answering as backend
    /// `name`, and waits until it listens.
    pub fn start(pod: &Pod, port: u16, name: &str) -> anyhow::Result<HttpServer> {
        HttpServer::start_on(pod, "0.0.0.0", port, name)
    }

    /// Same, listening on `bind` (`::` for IPv6).
    pub fn start_on(pod: &Pod, bind: &str, port: u16, name: &str) -> anyhow::Result<HttpServer> {
        HttpServer::start_with(pod, bind, port, name, &[])
    }

    /// Same, with more `serve` arguments (e.g. `--http1-only`).
    pub fn start_with(
        pod: &Pod,
        bind: &str,
        port: u16,
        name: &str,
        more: &[&str],
    ) -> anyhow::Result<HttpServer> {
        let mut command = httptool(pod)?
            .args([
                "serve",
                "--bind",
                bind,
                "--port",
                &port.to_string(),
                "--name",
                name,
            ])
            .args(more.iter().copied());
        command
            .command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().context("httptool serve stdout")?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        // Lines that are not requests (an {"error"} before exiting), for the
        // message when the server does not come up.
        let other = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (sink, other_sink) = (requests.clone(), other.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.trim() == "listening" {
                    let _ = ready_tx.send(());
                    continue;
                }
                match serde_json::from_str::<Value>(&line) {
                    Ok(request) if request.get("method").is_some() => {
                        sink.lock().unwrap_or_else(|e| e.into_inner()).push(request);
                    }
                    _ => other_sink
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(line),
                }
            }
        });
        // Also returns early, disconnected, when the server exits first.
        if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            let said = other.lock().unwrap_or_else(|e| e.into_inner()).join("\n");
            bail!(
                "httptool serve on {}:{bind}:{port} did not start: {said}",
                pod.name
            );
        }
        Ok(HttpServer {
            child,
            requests,
            port,
            name: name.to_owned(),
        })
    }

    /// The requests seen so far, one JSON object each (see httptool's doc).
    pub fn requests(&self) -> Vec<Value> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until at least `count` requests have been reported: a client
    /// can have its answer before the server's line is read.
    pub fn wait_requests(&self, count: usize) -> anyhow::Result<Vec<Value>> {
        wait_for(
            &format!("{count} request(s) at {} on port {}", self.name, self.port),
            Duration::from_secs(10),
            || {
                let requests = self.requests();
                (requests.len() >= count).then_some(requests)
            },
        )
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `httptool <subcommand> <args>` in `pod` to completion and returns
/// its JSON lines. Fails only if httptool itself failed (bad arguments);
/// transport errors are lines with an "error" for the test to judge.
fn run(pod: &Pod, subcommand: &str, args: &[&str]) -> anyhow::Result<Vec<Value>> {
    let output = httptool(pod)?.arg(subcommand).args(args).output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let context = || {
        format!(
            "httptool {subcommand} {args:?} in {}: status {}, stdout {stdout:?}, stderr {:?}",
            pod.name,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
    };
    if !output.status.success() {
        bail!("{}", context());
    }
    stdout
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).with_context(context))
        .collect()
}

/// `httptool get` in `pod`, e.g. `["--url", "http://10.77.0.3:8080/x", "--h2"]`:
/// one line per response (or {"error"}), then the summary when `--count` > 1.
pub fn get(pod: &Pod, args: &[&str]) -> anyhow::Result<Vec<Value>> {
    run(pod, "get", args)
}

/// `httptool grpc` in `pod`, e.g. `["--to", "10.77.0.3:8080", "--message", "hi"]`:
/// one line per call, then the summary when `--count` > 1.
pub fn grpc(pod: &Pod, args: &[&str]) -> anyhow::Result<Vec<Value>> {
    run(pod, "grpc", args)
}

/// `httptool upgrade` in `pod`, e.g. `["--to", "10.77.0.3:8080", "--bytes", "65536"]`.
pub fn upgrade(pod: &Pod, args: &[&str]) -> anyhow::Result<Vec<Value>> {
    run(pod, "upgrade", args)
}

/// The summary line of a `get`/`grpc` run with `--count` > 1.
pub fn summary(lines: &[Value]) -> anyhow::Result<&Value> {
    lines
        .iter()
        .rev()
        .find_map(|line| line.get("summary"))
        .with_context(|| format!("no summary line in {lines:?}"))
}
