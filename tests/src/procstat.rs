//! A process's CPU time and memory from `/proc`, for the benchmarks.

use anyhow::{Context, Result};

/// CPU time (user + system) and memory of one process.
#[derive(Clone, Copy, Debug)]
pub struct ProcStats {
    /// User + system CPU time, in seconds.
    pub cpu_s: f64,
    /// Resident memory (`VmRSS`).
    pub rss_kib: u64,
    /// Peak resident memory (`VmHWM`).
    pub hwm_kib: u64,
    /// Resident anonymous memory (`RssAnon`): heap, stacks.
    pub anon_kib: u64,
    /// Resident file-backed memory (`RssFile`): mostly the pages of the program's own code,
    /// clean and shared with the page cache.
    pub file_kib: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`.
pub fn proc_stats(pid: u32) -> Result<ProcStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map(|(_, r)| r).context("bad /proc stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // fields[0] is the state (field 3); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // Linux reports utime/stime in USER_HZ, which is 100 on every supported architecture.
    Ok(ProcStats {
        cpu_s: (utime + stime) as f64 / 100.0,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
        anon_kib: kib("RssAnon:"),
        file_kib: kib("RssFile:"),
    })
}

/// CPU seconds of `pid`, or 0 when it cannot be read (the figure then shows as 0).
pub fn cpu_seconds(pid: u32) -> f64 {
    proc_stats(pid).map(|s| s.cpu_s).unwrap_or(0.0)
}

/// The machine a benchmark ran on, for the figures: CPU model, cores and load average
/// (`/proc/cpuinfo`, `/proc/loadavg`), such as `AMD EPYC, 2 cores, load 1.52 1.40 1.10`.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(usize::from).unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!("{model}, {cores} cores, load {}", load.join(" "))
}
