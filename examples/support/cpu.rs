//! A process's CPU time, for benchmarks that charge a server's CPU to the requests it
//! served: every thread's on-CPU nanoseconds from `/proc/<pid>/task/<tid>/schedstat`, with
//! `utime + stime` of `/proc/<pid>/stat` (clock ticks) as the fallback when a thread ended
//! between two samples (it took its count with it).

use std::collections::HashMap;

/// A process's CPU counters at one instant.
pub struct CpuSample {
    ticks_secs: f64,
    threads: HashMap<u32, u64>,
}

/// Samples `pid` now.
pub fn cpu_sample(pid: u32) -> CpuSample {
    let mut threads = HashMap::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in dir.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
                continue;
            };
            let ns = std::fs::read_to_string(e.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
            if let Some(ns) = ns {
                threads.insert(tid, ns);
            }
        }
    }
    CpuSample {
        ticks_secs: cpu_secs(pid),
        threads,
    }
}

/// CPU seconds between two samples of one process.
pub fn cpu_between(a: &CpuSample, b: &CpuSample) -> f64 {
    if !a.threads.is_empty() && a.threads.keys().all(|t| b.threads.contains_key(t)) {
        let ns: u64 = b
            .threads
            .iter()
            .map(|(t, &n)| n.saturating_sub(a.threads.get(t).copied().unwrap_or(0)))
            .sum();
        ns as f64 / 1e9
    } else {
        b.ticks_secs - a.ticks_secs
    }
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = s.rfind(')').map(|i| &s[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After "pid (comm) ", field 3 is index 0: utime is field 14, stime 15.
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz.max(1.0)
}
