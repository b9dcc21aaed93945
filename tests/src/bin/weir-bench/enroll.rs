//! `weir-bench enroll`: how long the agent takes to enroll many pods, at its
//! start and on a reload that adds them, and to release them on a reload
//! that removes them. Times come from the agent's own log timestamps (the
//! wall clock this process reads too), so polling adds nothing. Printed
//! against the target of 100 pods enrolled in under 1 s. Not a test: nothing
//! here asserts a timing.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use weir_tests::{AgentOptions, TestNode, step};

#[derive(clap::Args)]
pub struct Options {
    /// Pods on the node, all enrolled at once.
    #[arg(long, default_value_t = 100)]
    pub pods: usize,
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
}

/// The target: 100 pods in under 1 s.
const TARGET_PER_POD: Duration = Duration::from_millis(10);
/// How often the agent looks at its config file in this bench; a reload's
/// figure includes up to this much before the agent notices the change.
const RELOAD_INTERVAL_MS: u64 = 10;

pub fn run(options: Options) -> anyhow::Result<()> {
    let pods = options.pods.clamp(1, 250);
    step(&format!("enroll: building a node with {pods} pods"));
    let mut node = TestNode::new()?;
    let names: Vec<String> = (1..=pods).map(|n| format!("p{n}")).collect();
    for name in &names {
        node.add_pod(name)?;
    }
    let enrolled: Vec<&str> = names.iter().map(String::as_str).collect();
    let all = AgentOptions {
        reload_interval_ms: Some(RELOAD_INTERVAL_MS),
        ..AgentOptions::enroll(&enrolled)
    };
    let none = AgentOptions {
        reload_interval_ms: Some(RELOAD_INTERVAL_MS),
        ..AgentOptions::default()
    };
    let deadline = Duration::from_secs(60);
    let (mut from_start, mut enrolling, mut reload_add, mut reload_remove) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 1..=options.repeat.max(1) {
        step(&format!("enroll: run {run}, agent start with {pods} pods"));
        let spawned = now();
        node.start_agent(&all)?;
        node.wait_for_log("pod enrolled", pods, deadline)?;
        let log = node.agent_log();
        let done = nth_time(&log, "pod enrolled", pods)?;
        from_start.push(done - spawned);
        enrolling.push(done - nth_time(&log, "eBPF programs loaded and attached", 1)?);
        node.stop_agent()?;

        step(&format!("enroll: run {run}, a reload adding {pods} pods"));
        node.start_agent(&none)?;
        let written = now();
        node.reconfigure_agent(&all)?;
        node.wait_for_log("pod enrolled", pods, deadline)?;
        reload_add.push(nth_time(&node.agent_log(), "pod enrolled", pods)? - written);

        step(&format!("enroll: run {run}, a reload removing them"));
        let written = now();
        node.reconfigure_agent(&none)?;
        node.wait_for_log("pod released", pods, deadline)?;
        reload_remove.push(nth_time(&node.agent_log(), "pod released", pods)? - written);
        node.stop_agent()?;
    }
    node.teardown()?;

    let target = TARGET_PER_POD.as_secs_f64() * pods as f64;
    let (from_start, enrolling, reload_add, reload_remove) = (
        median(from_start),
        median(enrolling),
        median(reload_add),
        median(reload_remove),
    );
    let per_pod = |seconds: f64| seconds * 1000.0 / pods as f64;
    println!(
        "\nEnrollment of {pods} pods (median of {}):",
        options.repeat.max(1)
    );
    println!("| step | ms | ms per pod |");
    println!("|---|---|---|");
    println!(
        "| agent start to all enrolled | {:.0} | {:.2} |",
        from_start * 1000.0,
        per_pod(from_start)
    );
    println!(
        "| of which enrolling (datapath loaded to all enrolled) | {:.0} | {:.2} |",
        enrolling * 1000.0,
        per_pod(enrolling)
    );
    println!(
        "| reload adding them (file written to all enrolled; polled every {RELOAD_INTERVAL_MS} ms) | {:.0} | {:.2} |",
        reload_add * 1000.0,
        per_pod(reload_add)
    );
    println!(
        "| reload removing them (file written to all released) | {:.0} | {:.2} |",
        reload_remove * 1000.0,
        per_pod(reload_remove)
    );
    let verdict = |seconds: f64| if seconds < target { "met" } else { "missed" };
    println!(
        "target: 100 pods enrolled in under 1 s ({:.0} ms for {pods}): at start {} ({:.2}x), on a reload {} ({:.2}x)",
        target * 1000.0,
        verdict(enrolling),
        enrolling / target,
        verdict(reload_add),
        reload_add / target,
    );
    Ok(())
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |elapsed| elapsed.as_secs_f64())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The timestamp (seconds since the epoch) of the `n`th log line with `needle`.
fn nth_time(log: &str, needle: &str, n: usize) -> anyhow::Result<f64> {
    let line = log
        .lines()
        .filter(|line| line.contains(needle))
        .nth(n.saturating_sub(1))
        .with_context(|| format!("{needle:?} x{n} not in the agent log"))?;
    let stamp = line.split_whitespace().next().unwrap_or_default();
    log_time(stamp).with_context(|| format!("no timestamp at the start of {line:?}"))
}

/// Seconds since the epoch of a log timestamp, `2025-01-31T12:34:56.789012Z`.
fn log_time(stamp: &str) -> anyhow::Result<f64> {
    let (date, time) = stamp
        .strip_suffix('Z')
        .and_then(|stamp| stamp.split_once('T'))
        .context("not RFC 3339 UTC")?;
    let date: Vec<i64> = date.split('-').map(str::parse).collect::<Result<_, _>>()?;
    let time: Vec<f64> = time.split(':').map(str::parse).collect::<Result<_, _>>()?;
    let ([year, month, day], [hours, minutes, seconds]) = (date.as_slice(), time.as_slice()) else {
        bail!("not RFC 3339 UTC");
    };
    let days = days_from_civil(*year, *month, *day);
    Ok(days as f64 * 86_400.0 + hours * 3600.0 + minutes * 60.0 + seconds)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_timestamps_are_seconds_since_the_epoch() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        let seconds = log_time("2024-02-29T23:59:59.500000Z").unwrap_or_default();
        assert!((seconds - 1_709_251_199.5).abs() < 1e-6, "{seconds}");
    }
}
