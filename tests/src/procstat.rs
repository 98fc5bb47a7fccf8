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
    Ok(ProcStats { cpu_s: (utime + stime) as f64 / 100.0, rss_kib: kib("VmRSS:"), hwm_kib: kib("VmHWM:") })
}

/// CPU seconds of `pid`, or 0 when it cannot be read (the figure then shows as 0).
pub fn cpu_seconds(pid: u32) -> f64 {
    proc_stats(pid).map(|s| s.cpu_s).unwrap_or(0.0)
}
