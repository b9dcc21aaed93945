//! `weir`: the node agent's command line.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use weir_agent::{
    app::{self, ConfigSource, RunOptions},
    config::Config,
    telemetry::log_writer::{BatchedLog, FlushGuard},
};
use weir_common::{counter, map_name};

/// Weir: a sidecarless service-mesh node agent. Its eBPF programs steer the
/// TCP traffic of enrolled pods into one per-node proxy, with no sidecar and
/// no pod restart.
#[derive(Parser)]
#[command(name = "weir", version, propagate_version = true)]
struct Cli {
    /// Log format of the agent's own output.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum TraceFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a root certificate and key for the built-in CA, to share
    /// between the agents of nodes that talk to each other.
    Init {
        /// Directory for root.pem and root-key.pem (created if needed).
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: load and attach the eBPF programs, enroll the pods of
    /// the config, proxy their traffic; SIGTERM/SIGINT undo everything.
    Run {
        /// YAML config (node, pods, capture settings). Reloaded when it
        /// changes. Without it, the embedded demo config is used.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Forward the eBPF programs' debug logs (aya-log) to the agent's log.
        #[arg(long)]
        bpf_debug: bool,
        /// How often to check the config file for changes, in milliseconds.
        #[arg(long, default_value_t = 500)]
        reload_interval_ms: u64,
    },
    /// Validate a config file and print what it would enroll.
    CheckConfig {
        /// The YAML file to check.
        config: PathBuf,
    },
    /// The built-in CA.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Summarise what a running agent loaded and pinned: programs, links,
    /// maps with their fill, and the bpftool commands that show each; then
    /// every chain Weir's programs are in, others' programs included, in
    /// the order the kernel runs them (from the agent's admin port).
    Bpf {
        /// The agent's instance name (its pin directory).
        #[arg(long, default_value = "default")]
        instance: String,
        /// Where bpffs is mounted.
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        /// The agent's admin address.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
    },
    /// Follow the node's flows live: what the eBPF programs captured,
    /// bypassed (and why) or steered, and the proxy's verdicts, with pod
    /// names and identities (from a running agent's admin port).
    Trace {
        /// Only this pod (`namespace/name`).
        #[arg(long)]
        pod: Option<String>,
        /// Only pods of this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Only flows to this destination port.
        #[arg(long)]
        port: Option<u16>,
        /// Only this verdict: captured, bypassed, dropped, error, allowed,
        /// denied, failed.
        #[arg(long)]
        verdict: Option<String>,
        /// Start with the most recent events the agent kept.
        #[arg(long)]
        recent: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// `text` (one line per flow) or `json` (one object per line).
        #[arg(long, value_enum, default_value_t = TraceFormat::Text)]
        output: TraceFormat,
        /// The agent's admin address.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
    },
    /// Print the eBPF counters of a running agent (from its pinned map).
    Counters {
        /// The agent's instance name (its pin directory).
        #[arg(long, default_value = "default")]
        instance: String,
        /// Where bpffs is mounted.
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
}

/// The access log (a line per connection and per request) is gathered in
/// memory and written every few milliseconds ([`BatchedLog`]); every other
/// line is written at once, as it happens, so that a line about what the
/// agent just did is there when it is done. The returned guard writes what
/// is gathered when dropped.
fn init_logging(format: LogFormat, bpf_debug: bool) -> Option<FlushGuard> {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if bpf_debug {
        // aya-log records carry the eBPF crate's module path (`weir`).
        if let Ok(directive) = "weir=debug".parse() {
            filter = filter.add_directive(directive);
        }
    }
    // The filter sits behind a reload handle so /logging can change it.
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    weir_agent::admin::set_log_filter_handle(handle);
    use tracing_subscriber::{
        fmt::writer::MakeWriterExt as _, layer::SubscriberExt as _, util::SubscriberInitExt as _,
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Without a thread for it, the access log is written at once too.
    let (access_log, guard) = match BatchedLog::start() {
        Ok((log, guard)) => (log, Some(guard)),
        Err(error) => {
            eprintln!(
                "weir: no thread for the access log ({error}): its lines are written at once"
            );
            (BatchedLog::unbatched(), None)
        }
    };
    let writer = access_log
        .with_filter(|event: &tracing::Metadata<'_>| {
            weir_agent::telemetry::access_log::TARGETS.contains(&event.target())
        })
        .or_else(std::io::stderr);
    match format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(writer),
            )
            .init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(tracing_subscriber::fmt::layer().json().with_writer(writer))
            .init(),
    }
    guard
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let bpf_debug = matches!(
        cli.command,
        Command::Run {
            bpf_debug: true,
            ..
        }
    );
    if !matches!(cli.command, Command::Run { .. }) {
        // The inspection commands end quietly when their reader goes away
        // (`weir trace | head`), as Unix tools do, instead of panicking in
        // `println!`. The agent itself keeps Rust's SIG_IGN: its sockets
        // see EPIPE as an error.
        // SAFETY: restoring a default disposition before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let log_writer = init_logging(cli.log_format, bpf_debug);
    let result = execute(cli.command);
    // Every queued line out before the last word.
    drop(log_writer);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("weir: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each said once: many errors
/// already end with their cause's text, which `{:#}` would repeat.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run {
            config,
            bpf_debug,
            reload_interval_ms,
        } => {
            let source = match config {
                Some(path) => ConfigSource::File(path),
                None => ConfigSource::Embedded,
            };
            let loaded = source.load()?;
            let cgroups = app::prepare(&loaded)?;
            let options = RunOptions {
                source,
                bpf_log_level: if bpf_debug { 4 } else { 0 },
                reload_interval: Duration::from_millis(reload_interval_ms.max(50)),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(app::run(options, loaded, cgroups))
        }
        Command::CheckConfig { config: path } => {
            let config = Config::load(&path)?;
            // The agent would take such a file and leave the pod unprotected
            // until its namespace appears: on the node itself, most likely
            // a wrong path.
            let missing: Vec<String> = config
                .pods
                .iter()
                .enumerate()
                .filter(|(_, pod)| !pod.netns.exists())
                .map(|(index, pod)| {
                    format!(
                        "pods[{index}] ({}): netns {} does not exist",
                        pod.id(),
                        pod.netns.display()
                    )
                })
                .collect();
            if !missing.is_empty() {
                anyhow::bail!(
                    "{}: {} (the agent would leave the pod unenrolled until it appears)",
                    path.display(),
                    missing.join("; ")
                );
            }
            // ztunnel's local file, checked as the agent will load it.
            let local = match &config.local_xds_path {
                Some(local) => {
                    let text = std::fs::read_to_string(local).map_err(|error| {
                        anyhow::anyhow!(
                            "{}: local_xds_path {}: {error}",
                            path.display(),
                            local.display()
                        )
                    })?;
                    let resources = weir_agent::xds::local::parse(
                        &text,
                        &weir_agent::xds::convert::NodeContext::of(&config),
                    )
                    .map_err(|error| {
                        anyhow::anyhow!(
                            "{}: local_xds_path {}:\n{error}",
                            path.display(),
                            local.display()
                        )
                    })?;
                    Some((local, resources))
                }
                None => None,
            };
            println!(
                "ok: node {} (instance {}), {} pod(s)",
                config.node,
                config.instance,
                config.pods.len()
            );
            if let Some((local, resources)) = &local {
                println!(
                    "  local_xds_path {}: {} workload(s), {} service(s), {} policy(ies)",
                    local.display(),
                    resources.workloads(),
                    resources.services(),
                    resources.authorizations.len()
                );
            }
            for pod in &config.pods {
                let ips: Vec<String> = pod.ips.iter().map(ToString::to_string).collect();
                println!(
                    "  {} ips {} netns {}",
                    pod.id(),
                    ips.join(","),
                    pod.netns.display()
                );
            }
            Ok(())
        }
        Command::Ca {
            command: CaCommand::Init { dir, trust_domain },
        } => {
            let ca = weir_agent::security::identity::BuiltinCa::generate(&trust_domain)?;
            std::fs::create_dir_all(&dir)?;
            let key_path = dir.join("root-key.pem");
            std::fs::write(dir.join("root.pem"), ca.root_pem())?;
            std::fs::write(&key_path, ca.key_pem())?;
            std::fs::set_permissions(
                &key_path,
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )?;
            println!("wrote {0}/root.pem and {0}/root-key.pem", dir.display());
            Ok(())
        }
        Command::Bpf {
            instance,
            bpffs,
            admin,
        } => {
            print!(
                "{}",
                weir_agent::capture::bpfinfo::summary(&bpffs.join("weir").join(&instance))?
            );
            println!("\nchains, in the order the kernel runs them (* Weir's):");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            match runtime.block_on(weir_agent::capture::bpfinfo::chains(admin)) {
                Ok(chains) => {
                    for chain in &chains {
                        println!("{}", weir_agent::capture::chain::render(chain));
                    }
                }
                Err(error) => {
                    println!("  (the agent's admin port {admin} did not answer: {error})")
                }
            }
            Ok(())
        }
        Command::Trace {
            pod,
            namespace,
            port,
            verdict,
            recent,
            count,
            output,
            admin,
        } => {
            use weir_agent::telemetry::flows::{FlowFilter, FlowOutput, follow};
            let filter = FlowFilter {
                pod,
                namespace,
                port,
                verdict,
            };
            let output = match output {
                TraceFormat::Text => FlowOutput::Text,
                TraceFormat::Json => FlowOutput::Json,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(follow(admin, &filter, recent, output, count))
        }
        Command::Counters { instance, bpffs } => {
            let path = bpffs
                .join("weir")
                .join(&instance)
                .join("maps")
                .join(map_name::COUNTERS);
            let data = aya::maps::MapData::from_pin(&path).map_err(|error| {
                anyhow::anyhow!(
                    "{}: {error} (is an agent with instance {instance:?} running?)",
                    path.display()
                )
            })?;
            let map: aya::maps::PerCpuArray<_, u64> =
                aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?;
            for (index, name) in counter::NAMES.iter().enumerate() {
                let total: u64 = map
                    .get(&(index as u32), 0)
                    .map(|values| values.iter().sum())
                    .unwrap_or(0);
                println!("{name:24} {total}");
            }
            Ok(())
        }
    }
}
