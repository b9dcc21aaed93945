//! The `weir` command line as a newcomer meets it: errors said once, a
//! refusal under `ip netns exec` that names the cause, and no panic when the
//! reader of its output goes away (`weir trace | head`).
use std::{
    os::{fd::FromRawFd as _, unix::process::ExitStatusExt as _},
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::Duration,
};

use weir_tests::{AgentOptions, Server, TestNode, node::NsCommand, podtool, prereq, wait_for};

fn scratch(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("weir-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Removes a scratch directory at the end of a test, also after a panic.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_config_error_is_printed_once() -> anyhow::Result<()> {
    let dir = RemoveOnDrop(scratch("once")?);
    let path = dir.0.join("bad.yaml");
    // A YAML syntax error (serde_yaml: "mapping values are not allowed …").
    std::fs::write(
        &path,
        "node: n1\npods:\n  - name: web\n    ip: 10.0.0.1: 2\n",
    )?;
    let output = Command::new(prereq::agent_binary()?)
        .arg("check-config")
        .arg(&path)
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].starts_with("weir: "), "{stderr}");
    assert!(lines[0].contains(&path.display().to_string()), "{stderr}");
    assert_eq!(
        lines[0].matches("mapping values are not allowed").count(),
        1,
        "the cause is said once: {stderr}"
    );
    Ok(())
}

#[test]
fn under_ip_netns_exec_the_agent_names_the_cause_and_the_fix() -> anyhow::Result<()> {
    prereq::check()?;
    let netns = format!("wt{}xcli", std::process::id());
    weir_tests::node::run("ip", &["netns", "add", &netns])?;
    struct DeleteNetns(String);
    impl Drop for DeleteNetns {
        fn drop(&mut self) {
            let _ = weir_tests::node::run("ip", &["netns", "del", &self.0]);
        }
    }
    let _netns = DeleteNetns(netns.clone());
    let dir = RemoveOnDrop(scratch("netns-exec")?);
    let config = dir.0.join("agent.yaml");
    std::fs::write(&config, format!("node: {netns}\ninstance: {netns}\n"))?;
    let mut child = Command::new("ip")
        .args(["netns", "exec", &netns])
        .arg(prereq::agent_binary()?)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // It must refuse at once; a started agent would be a failure too.
    let exited = wait_for("the agent to refuse", Duration::from_secs(10), || {
        child.try_wait().ok().flatten()
    });
    if exited.is_err() {
        let _ = child.kill();
    }
    let output = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(exited.is_ok() && !output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("`ip netns exec {netns}`")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("nsenter --net=/run/netns/{netns} weir run")),
        "{stderr}"
    );
    Ok(())
}

/// Runs a command with its stdout on a pipe whose reading end is already
/// closed, so its first write fails with EPIPE.
fn with_closed_stdout(mut command: Command) -> anyhow::Result<Output> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors we own from here on.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: both descriptors are ours and open; each is owned once.
    let (reader, writer) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    drop(reader);
    command.stdout(Stdio::from(writer)).stderr(Stdio::piped());
    Ok(command.output()?)
}

fn assert_no_panic(what: &str, output: &Output) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("panicked") && output.status.code() != Some(101),
        "{what} panicked on a closed pipe ({:?}): {stderr}",
        output.status
    );
    // Ended by SIGPIPE, as Unix tools are, or quietly.
    assert!(
        output.status.signal() == Some(libc::SIGPIPE) || output.status.success(),
        "{what}: {:?} {stderr}",
        output.status
    );
}

#[test]
fn no_subcommand_panics_when_its_reader_goes_away() -> anyhow::Result<()> {
    let weir = prereq::agent_binary()?;
    let mut node = TestNode::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let _server = Server::start(&b, 8080, "echo")?;
    node.start_agent(&AgentOptions::enroll(&["a", "b"]))?;
    // Something for `weir trace --recent` to print.
    let report = podtool::send(&a, &format!("{}:8080", b.ip), 1024)?;
    assert!(report.intact && report.captured(), "{report:?}");

    let config = node.dir.join("agent.yaml");
    let ca = node.dir.join("ca");
    for (what, mut command) in [
        ("weir --help", Command::new(&weir).tap_arg("--help")),
        (
            "weir check-config",
            Command::new(&weir).tap_arg("check-config").tap_arg(&config),
        ),
        (
            "weir ca init",
            Command::new(&weir)
                .tap_arg("ca")
                .tap_arg("init")
                .tap_arg(&ca),
        ),
        (
            "weir bpf",
            Command::new(&weir)
                .tap_arg("bpf")
                .tap_arg("--instance")
                .tap_arg(&node.id),
        ),
        (
            "weir counters",
            Command::new(&weir)
                .tap_arg("counters")
                .tap_arg("--instance")
                .tap_arg(&node.id),
        ),
    ] {
        command.env_remove("RUST_BACKTRACE");
        assert_no_panic(what, &with_closed_stdout(command)?);
    }
    // `weir trace` talks to the agent's admin port inside the node.
    let mut trace = NsCommand::new(&weir, &node.netns_path(), None)?
        .args(["trace", "--recent", "--count", "5"]);
    trace.command.env_remove("RUST_BACKTRACE");
    assert_no_panic("weir trace --recent", &with_closed_stdout(trace.command)?);
    Ok(())
}

/// `Command`'s builder methods take `&mut self`; this one moves, for arrays.
trait TapArg {
    fn tap_arg(self, arg: impl AsRef<std::ffi::OsStr>) -> Self;
}

impl TapArg for Command {
    fn tap_arg(mut self, arg: impl AsRef<std::ffi::OsStr>) -> Self {
        self.arg(arg);
        self
    }
}
