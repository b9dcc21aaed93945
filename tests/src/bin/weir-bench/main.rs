//! `weir-bench`: the benchmarks behind `cargo xtask bench`, built in release
//! once `cargo xtask setup` has installed the eBPF toolchain. Each prints
//! ratios against a baseline measured in the same run; none asserts a timing.
mod cpu;
mod enroll;
mod http;
mod rows;
mod scrape;
mod soak;
mod tcp;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "weir-bench",
    about = "Weir's benchmarks (run by `cargo xtask bench`)"
)]
struct Cli {
    #[command(subcommand)]
    suite: Suite,
}

#[derive(Subcommand)]
enum Suite {
    /// xDS state scale in process, then pod-to-pod TCP throughput and latency:
    /// direct, through the agent, accelerated, and across two nodes.
    Tcp {
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
    /// HTTP requests/s, latency and agent CPU per request: direct, L4, L7.
    Http(http::Options),
    /// wrk, iperf3 and h2load against nginx and iperf3's server: direct
    /// and through Weir, across two nodes and on one.
    Rows(rows::Options),
    /// The state store at scale, in process.
    State,
    /// Enrolling many pods: from the agent's start and on a reload that adds
    /// them, against the target of 100 pods in under 1 s.
    Enroll(enroll::Options),
    /// Connection churn for minutes, then bursts of idle connections held
    /// and released: the agents' RSS, descriptors and tasks.
    Soak(soak::Options),
    /// `/metrics` with the connection maps full: scrape latency, agent CPU
    /// per scrape, round-trip latency while scraped.
    Scrape {
        /// Scrapes timed one after the other.
        #[arg(long, default_value_t = 20)]
        scrapes: usize,
        /// Round trips per latency run (enough to span several scrapes).
        #[arg(long, default_value_t = 20000)]
        round_trips: u64,
        /// Repetitions of each latency run (the median is reported).
        #[arg(long, default_value_t = 3)]
        repeat: usize,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().suite {
        Suite::Tcp {
            bytes,
            round_trips,
            repeat,
        } => {
            tcp::run_state_scale()?;
            tcp::run(bytes, round_trips, repeat.max(1))
        }
        Suite::Http(options) => http::run(options),
        Suite::Rows(options) => rows::run(options),
        Suite::State => tcp::run_state_scale(),
        Suite::Enroll(options) => enroll::run(options),
        Suite::Soak(options) => soak::run(options),
        Suite::Scrape {
            scrapes,
            round_trips,
            repeat,
        } => scrape::run(scrapes.max(1), round_trips, repeat.max(1)),
    }
}
