//! `cargo xtask`: set up the machine, build, run the demo, the tests and the
//! benchmarks. Every command installs what is missing first and says so.
mod bootstrap;
mod leftovers;
mod setup;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Weir's build, demo, test and bench orchestration"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building, testing and benchmarking need (eBPF toolchain,
    /// bpf-linker, bpftool, iproute2, h2load, wrk, iperf3, nginx).
    Setup,
    /// Build the agent (with its eBPF programs) and the test workload.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Bring up a local demo node (two pods), run the agent on its embedded
    /// default config with traffic between the pods, then tear it all down.
    Demo {
        /// How long to run the traffic; 0 runs until Ctrl-C.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// Run the whole test suite (needs root): formatting, clippy, unit and
    /// namespaced integration tests, a check that the tests left nothing
    /// behind, and the bootstrap check (the README's commands from a Rust
    /// home with only stable Rust).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter). With
        /// any, only those tests run: no leftover or bootstrap check.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Only the bootstrap check that `test` ends with: in a scratch Rust home
    /// with only stable Rust, `cargo xtask setup` on a fresh clone, then the
    /// agent (and its eBPF programs) builds.
    BootstrapCheck,
    /// Pod-to-pod throughput and latency: direct, through the agent, and
    /// through the agent with acceleration, as ratios measured in one run,
    /// then the rows of `bench rows` (`bench rows`: wrk, iperf3 and h2load
    /// direct vs Weir, across nodes and on one node;
    /// `bench http`: HTTP requests/s and latency, direct vs L4 vs L7;
    /// `bench enroll`: time to enroll 100 pods; `bench soak`: memory and
    /// descriptors under churn and after bursts).
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        #[command(subcommand)]
        suite: Option<BenchSuite>,
        /// Bytes per throughput run.
        #[arg(long, default_value_t = 512 << 20)]
        bytes: u64,
        /// Round trips per latency run.
        #[arg(long, default_value_t = 5000)]
        round_trips: u64,
        /// Repetitions of each measurement (the median is reported).
        #[arg(long, default_value_t = 3)]
        repeat: usize,
    },
}

#[derive(Subcommand)]
enum BenchSuite {
    /// wrk (50 keep-alive connections, 1 connection, a new connection per
    /// request on 10), iperf3 (1 and 4 streams) and h2load (h2c) against
    /// nginx and iperf3's server, direct and through Weir, across two nodes
    /// (HBONE) and on one (hand-off): one table of ratios, with the
    /// agents' CPU and memory.
    Rows {
        /// Seconds per wrk and iperf3 run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Requests per h2load run.
        #[arg(long, default_value_t = 50_000)]
        h2_requests: u64,
        /// Runs of each row on each setup (the median is reported).
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Also measure Weir as built from this revision (e.g. `HEAD~1`),
        /// in the same run: built in a worktree under target/baseline/.
        #[arg(long)]
        baseline: Option<String>,
        /// Only these rows (keep-alive, one, close, iperf1, iperf4,
        /// h2load; all when none is given), e.g. to profile one.
        #[arg(long = "row")]
        rows: Vec<String>,
        /// Only this topology (cross-node or same-node).
        #[arg(long)]
        topology: Option<String>,
    },
    /// HTTP requests/s, p50/p99/p999 latency and agent CPU per request
    /// (h2load, HTTP/1.1 and h2c): direct, through the agent as L4, and
    /// through its L7 routing, as ratios measured in one run.
    Http {
        /// Requests per saturation run (each mode and protocol).
        #[arg(long, default_value_t = 100_000)]
        requests: u64,
        /// Total requests/s of the fixed-rate runs.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Requests per fixed-rate run.
        #[arg(long, default_value_t = 10_000)]
        rate_requests: u64,
    },
    /// The state store at scale, in process: a full push of 10,000
    /// workloads and 1,000 services, single-workload deltas, and address
    /// lookups (also the first step of the default suite).
    State,
    /// Enrolling many pods at once: from the agent's start and on a reload
    /// that adds them (and releasing them), against the target of 100 pods
    /// enrolled in under 1 s.
    Enroll {
        /// Pods on the node, all enrolled at once.
        #[arg(long, default_value_t = 100)]
        pods: usize,
        /// Repetitions of each measurement (the median is reported).
        #[arg(long, default_value_t = 3)]
        repeat: usize,
    },
    /// `/metrics` with the connection maps full: scrape latency, agent CPU
    /// per scrape, and round-trip latency while scraped.
    Scrape,
    /// Connection churn through HBONE and plaintext (10 minutes by
    /// default), sampling each agent's RSS, descriptors and tasks; then
    /// idle connections held and released twice: memory per idle
    /// connection and whether RSS comes back.
    Soak {
        /// Seconds of churn.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// Idle connections per burst.
        #[arg(long, default_value_t = 2000)]
        idle: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Task::Setup => setup::run(),
        Task::Build { release } => {
            setup::run()?;
            build(release)
        }
        Task::Demo { seconds } => {
            setup::run()?;
            build(false)?;
            let seconds = seconds.to_string();
            cargo(&[
                "run",
                "--quiet",
                "-p",
                "weir-tests",
                "--bin",
                "weir-demo",
                "--",
                "--seconds",
                &seconds,
            ])
        }
        Task::BootstrapCheck => bootstrap::check(&workspace_root()?),
        Task::Test { args } => {
            setup::run()?;
            test(&args)
        }
        Task::Bench {
            suite:
                Some(BenchSuite::Http {
                    requests,
                    rate,
                    rate_requests,
                }),
            ..
        } => {
            setup::run()?;
            build(true)?;
            bench(&[
                "http",
                "--requests",
                &requests.to_string(),
                "--rate",
                &rate.to_string(),
                "--rate-requests",
                &rate_requests.to_string(),
            ])
        }
        Task::Bench {
            suite:
                Some(BenchSuite::Rows {
                    seconds,
                    h2_requests,
                    repeat,
                    baseline,
                    rows,
                    topology,
                }),
            ..
        } => {
            setup::run()?;
            build(true)?;
            let baseline = baseline.map(|rev| build_baseline(&rev)).transpose()?;
            let mut only: Vec<String> = rows
                .iter()
                .flat_map(|row| ["--row".into(), row.clone()])
                .collect();
            only.extend(
                topology
                    .into_iter()
                    .flat_map(|topology| ["--topology".into(), topology]),
            );
            bench_rows(seconds, h2_requests, repeat, baseline, &only)
        }
        Task::Bench {
            suite: Some(BenchSuite::State),
            ..
        } => {
            setup::run()?;
            build(true)?;
            bench(&["state"])
        }
        Task::Bench {
            suite: Some(BenchSuite::Enroll { pods, repeat }),
            ..
        } => {
            setup::run()?;
            build(true)?;
            bench(&[
                "enroll",
                "--pods",
                &pods.to_string(),
                "--repeat",
                &repeat.to_string(),
            ])
        }
        Task::Bench {
            suite: Some(BenchSuite::Scrape),
            ..
        } => {
            setup::run()?;
            build(true)?;
            bench(&["scrape"])
        }
        Task::Bench {
            suite: Some(BenchSuite::Soak { seconds, idle }),
            ..
        } => {
            setup::run()?;
            build(true)?;
            bench(&[
                "soak",
                "--seconds",
                &seconds.to_string(),
                "--warmup-seconds",
                &(seconds / 10).clamp(1, 60).to_string(),
                "--idle",
                &idle.to_string(),
            ])
        }
        Task::Bench {
            suite: None,
            bytes,
            round_trips,
            repeat,
        } => {
            setup::run()?;
            build(true)?;
            bench(&[
                "tcp",
                "--bytes",
                &bytes.to_string(),
                "--round-trips",
                &round_trips.to_string(),
                "--repeat",
                &repeat.to_string(),
            ])?;
            bench_rows(5, 50_000, repeat, None, &[])
        }
    }
}

/// `weir-bench rows` with its options; `baseline`: (name, agent binary).
fn bench_rows(
    seconds: u64,
    h2_requests: u64,
    repeat: usize,
    baseline: Option<(String, std::path::PathBuf)>,
    only: &[String],
) -> anyhow::Result<()> {
    let (seconds, h2_requests, repeat) = (
        seconds.to_string(),
        h2_requests.to_string(),
        repeat.to_string(),
    );
    let mut args = vec![
        "rows",
        "--seconds",
        &seconds,
        "--h2-requests",
        &h2_requests,
        "--repeat",
        &repeat,
    ];
    let binary;
    if let Some((name, path)) = &baseline {
        binary = path.to_string_lossy().into_owned();
        args.extend(["--baseline-agent", &binary, "--baseline-name", name]);
    }
    args.extend(only.iter().map(String::as_str));
    bench(&args)
}

/// Builds the agent of revision `rev` (release) in a worktree of its own,
/// `target/baseline/src`, into `target/baseline/target`: (the revision's
/// short name, the agent binary).
fn build_baseline(rev: &str) -> anyhow::Result<(String, std::path::PathBuf)> {
    let root = workspace_root()?;
    let git = |args: &[&str], dir: &std::path::Path| -> anyhow::Result<String> {
        let output = Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running git")?;
        if !output.status.success() {
            bail!(
                "`git {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    let commit = git(
        &["rev-parse", "--verify", &format!("{rev}^{{commit}}")],
        &root,
    )
    .with_context(|| format!("--baseline {rev}: not a revision of this repository"))?;
    let short = git(&["rev-parse", "--short", &commit], &root)?;
    let base = root.join("target").join("baseline");
    let tree = base.join("src");
    step(&format!("baseline: Weir at {short} ({rev})"));
    if tree.join(".git").exists() {
        git(
            &["checkout", "--quiet", "--detach", "--force", &commit],
            &tree,
        )?;
    } else {
        std::fs::create_dir_all(&base)?;
        let tree_arg = tree.to_string_lossy().into_owned();
        git(
            &["worktree", "add", "--quiet", "--detach", &tree_arg, &commit],
            &root,
        )?;
    }
    let target = base.join("target");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "-p", "weir-agent"])
        .current_dir(&tree)
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("building the baseline agent at {short} failed");
    }
    Ok((short, target.join("release").join("weir")))
}

/// Runs `weir-bench` (weir-tests) as a release build: timed code must be optimised.
fn bench(args: &[&str]) -> anyhow::Result<()> {
    let mut command = vec![
        "run",
        "--release",
        "--quiet",
        "-p",
        "weir-tests",
        "--bin",
        "weir-bench",
        "--",
    ];
    command.extend(args);
    cargo(&command)
}

/// Runs a command, failing with its name if it fails.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    step(&format!("cargo {}", args.join(" ")));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("`cargo {}` failed", args.join(" "));
    }
    Ok(())
}

pub fn step(message: &str) {
    eprintln!("\x1b[1mxtask:\x1b[0m {message}");
}

fn build(release: bool) -> anyhow::Result<()> {
    let mut args = vec!["build", "-p", "weir-agent", "-p", "weir-tests", "--bins"];
    if release {
        args.push("--release");
    }
    cargo(&args)
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the test suite needs root (network namespaces, cgroups, eBPF): run it as root");
    }
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    build(false)?;
    // Every test binary runs, so one failure does not hide the next.
    let mut args = vec!["test", "--no-fail-fast"];
    args.extend(extra.iter().map(String::as_str));
    // The tests' temporary files go to a directory of this run's, which must
    // be empty again at the end.
    let scratch = leftovers::scratch()?;
    // SAFETY: set before this process starts any thread.
    unsafe { std::env::set_var("TMPDIR", &scratch) };
    cargo(&args)?;
    // SAFETY: as above; cargo has exited.
    unsafe { std::env::remove_var("TMPDIR") };
    if extra.is_empty() {
        leftovers::check(&scratch)?;
        bootstrap::check(&workspace_root()?)?;
    }
    Ok(())
}

/// The repository's root: xtask's manifest directory's parent.
fn workspace_root() -> anyhow::Result<std::path::PathBuf> {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .context("xtask has no parent directory")
}
