//! The stand-in waypoint (`src/bin/waypoint.rs`) run in a pod: what each
//! `CONNECT` it received said.
use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{node::Pod, prereq};

pub struct Waypoint {
    child: Child,
    connects: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Waypoint {
    /// Serves HBONE on `port` in `pod` as `identity` (a certificate from
    /// the root in `ca_dir`), carrying `authority` to `backend` for each
    /// route given.
    pub fn start(
        pod: &Pod,
        ca_dir: &Path,
        identity: &str,
        port: u16,
        routes: &[(String, String)],
    ) -> anyhow::Result<Waypoint> {
        let mut command = pod.command(prereq::waypoint_binary()?)?;
        command = command.arg("--ca-dir").arg(ca_dir).args([
            "--identity",
            identity,
            "--port",
            &port.to_string(),
        ]);
        for (authority, backend) in routes {
            command = command.args(["--route", &format!("{authority}={backend}")]);
        }
        command
            .command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().context("waypoint stdout")?;
        let connects = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sink = connects.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if value.get("listening").is_some() {
                    let _ = ready_tx.send(());
                } else {
                    sink.lock().unwrap_or_else(|e| e.into_inner()).push(value);
                }
            }
        });
        if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the waypoint in {} did not start", pod.name);
        }
        Ok(Waypoint { child, connects })
    }

    /// Every `CONNECT` so far: `authority`, `client` (the proven
    /// identity), `baggage`, `traceparent`, `forwarded`.
    pub fn connects(&self) -> Vec<serde_json::Value> {
        self.connects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Waypoint {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
