//! `weir trace` run against a test node's agent: started, awaited, and its
//! JSON events read back.
use std::{
    io::Read as _,
    process::{Child, Stdio},
    time::Duration,
};

use weir_agent::telemetry::flows::FlowRecord;

use crate::{TestNode, node::NsCommand, prereq, wait_for};

/// Starts `weir trace <args>` in the node's namespace.
pub fn spawn(node: &TestNode, args: &[&str]) -> anyhow::Result<Child> {
    let mut command = NsCommand::new(&prereq::agent_binary()?, &node.netns_path(), None)?
        .arg("trace")
        .args(args);
    command
        .command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command.spawn()
}

/// Waits (10 s at most) for a `weir trace` given `--count` to exit; what
/// it printed, or an error naming how it ended and what it printed.
pub fn finish(child: &mut Child) -> anyhow::Result<String> {
    let exited = wait_for(
        "weir trace to print its events",
        Duration::from_secs(10),
        || child.try_wait().ok().flatten(),
    );
    if exited.is_err() {
        let _ = child.kill();
    }
    let _ = child.wait();
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut stdout)?;
    }
    if let Some(mut err) = child.stderr.take() {
        err.read_to_string(&mut stderr)?;
    }
    match exited {
        Ok(status) if status.success() => Ok(stdout),
        Ok(status) => anyhow::bail!("weir trace exited {status}: {stderr}"),
        Err(error) => anyhow::bail!("{error}; printed so far:\n{stdout}{stderr}"),
    }
}

/// The events of `--output json` output.
pub fn events(output: &str) -> Vec<FlowRecord> {
    output
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Runs `weir trace <args>` (with `--output json` and a `--count`) until it
/// exits: the events it printed.
pub fn trace_events(node: &TestNode, args: &[&str]) -> anyhow::Result<Vec<FlowRecord>> {
    let mut child = spawn(node, args)?;
    Ok(events(&finish(&mut child)?))
}

/// The `count` most recent events of `pod` (`test/<name>`) with `verdict`.
pub fn recent(
    node: &TestNode,
    pod: &str,
    verdict: &str,
    count: usize,
) -> anyhow::Result<Vec<FlowRecord>> {
    let count = count.to_string();
    trace_events(
        node,
        &[
            "--recent",
            "--pod",
            pod,
            "--verdict",
            verdict,
            "--count",
            &count,
            "--output",
            "json",
        ],
    )
}
