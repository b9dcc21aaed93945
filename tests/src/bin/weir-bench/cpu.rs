//! CPU time from /proc: a process's (user and system apart) and the whole
//! machine's, so that a bench can say what a row costs and whether the
//! machine was saturated while it ran.
use anyhow::{Context as _, bail};

/// Clock ticks per second (`_SC_CLK_TCK`), the unit of /proc's times.
fn ticks_per_second() -> anyhow::Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if per_second <= 0 {
        bail!("sysconf(_SC_CLK_TCK) = {per_second}");
    }
    Ok(per_second as f64)
}

/// A process's CPU time so far, seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessCpu {
    pub user: f64,
    pub system: f64,
}

impl ProcessCpu {
    pub fn total(self) -> f64 {
        self.user + self.system
    }
}

impl std::ops::Sub for ProcessCpu {
    type Output = ProcessCpu;
    fn sub(self, earlier: ProcessCpu) -> ProcessCpu {
        ProcessCpu {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
        }
    }
}

impl std::ops::Add for ProcessCpu {
    type Output = ProcessCpu;
    fn add(self, other: ProcessCpu) -> ProcessCpu {
        ProcessCpu {
            user: self.user + other.user,
            system: self.system + other.system,
        }
    }
}

/// The CPU time of process `pid` (all its threads) so far.
pub fn process(pid: u32) -> anyhow::Result<ProcessCpu> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {path} (has the process exited?)"))?;
    parse_process(&stat).with_context(|| format!("{path}: {stat:?}"))
}

fn parse_process(stat: &str) -> anyhow::Result<ProcessCpu> {
    // Fields after the command name (which may hold spaces) in parentheses:
    // state is field 3, utime 14 and stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |index: usize| -> anyhow::Result<f64> {
        fields
            .get(index - 3)
            .and_then(|field| field.parse::<f64>().ok())
            .with_context(|| format!("no field {index}"))
    };
    let per_second = ticks_per_second()?;
    Ok(ProcessCpu {
        user: ticks(14)? / per_second,
        system: ticks(15)? / per_second,
    })
}

/// User plus system CPU seconds of process `pid` so far.
pub fn seconds(pid: u32) -> anyhow::Result<f64> {
    process(pid).map(ProcessCpu::total)
}

/// The whole machine's busy CPU time so far (every core; all but idle
/// and I/O wait, softirq included), seconds.
pub fn machine_busy() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    Ok(parse_machine_busy(&stat)? as f64 / ticks_per_second()?)
}

fn parse_machine_busy(stat: &str) -> anyhow::Result<u64> {
    let line = stat
        .lines()
        .find(|line| line.starts_with("cpu "))
        .context("/proc/stat has no `cpu` line")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().context("/proc/stat: a cpu field"))
        .collect::<anyhow::Result<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is
    // already inside user and nice).
    if ticks.len() < 8 {
        bail!("/proc/stat's cpu line has {} fields: {line}", ticks.len());
    }
    Ok(ticks[..8].iter().sum::<u64>() - ticks[3] - ticks[4])
}

/// The machine's cores (what `machine_busy` can reach per second).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_process_and_machine_times() {
        let stat = "4242 (tokio rt (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0";
        let cpu = parse_process(stat).expect("parsed");
        let per_second = ticks_per_second().expect("clock ticks");
        assert_eq!(cpu.user * per_second, 250.0);
        assert_eq!(cpu.system * per_second, 75.0);
        let machine = "cpu  100 5 50 1000 20 3 7 0 0 0\ncpu0 50 2 25 500 10 1 3 0 0 0\n";
        assert_eq!(parse_machine_busy(machine).expect("parsed"), 165);
        assert!(parse_machine_busy("cpu  1 2 3\n").is_err());
    }
}
