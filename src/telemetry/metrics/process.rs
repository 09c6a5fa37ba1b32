//! What every daemon reports about itself, read at scrape time: `dbgpt_build_info` (version,
//! service), `dbgpt_uptime_seconds`, and the standard process metrics from `/proc/self`
//! (`process_resident_memory_bytes`, `process_virtual_memory_bytes`, `process_open_fds`,
//! `process_max_fds`, `process_cpu_seconds_total`, `process_start_time_seconds`).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// Registers the process collector of `service`.
pub(crate) fn register(registry: &mut Registry, service: &'static str) {
    registry.register_collector(Box::new(Process {
        service,
        started: Instant::now(),
        start_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
    }));
}

#[derive(Debug)]
struct Process {
    service: &'static str,
    started: Instant,
    start_unix: f64,
}

/// Resident and virtual memory (bytes) and CPU seconds, from `/proc/self/stat`.
fn stat() -> Option<(f64, f64, f64)> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime: fields 14, 15; vsize 23; rss 24 (1-based over the whole line).
    let num = |i: usize| f.get(i - 3).and_then(|v| v.parse::<f64>().ok());
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
    let cpu = (num(14)? + num(15)?) / ticks.max(1.0);
    Some((num(24)? * page, num(23)?, cpu))
}

fn open_fds() -> Option<f64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as f64)
}

fn max_fds() -> Option<f64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0).then_some(r.rlim_cur as f64)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> std::fmt::Result {
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for Process {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut info = enc.encode_descriptor(
            "dbgpt_build",
            "dbgpt version and the service of this process (always 1)",
            None,
            MetricType::Info,
        )?;
        info.encode_info(&[
            ("version", env!("CARGO_PKG_VERSION")),
            ("service", self.service),
        ])?;
        gauge(
            &mut enc,
            "dbgpt_uptime_seconds",
            "Seconds since the daemon started",
            self.started.elapsed().as_secs_f64(),
        )?;
        gauge(
            &mut enc,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds",
            self.start_unix,
        )?;
        if let Some((rss, vsize, cpu)) = stat() {
            gauge(
                &mut enc,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                rss,
            )?;
            gauge(
                &mut enc,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                vsize,
            )?;
            ConstCounter::new(cpu).encode(enc.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                MetricType::Counter,
            )?)?;
        }
        if let Some(n) = open_fds() {
            gauge(
                &mut enc,
                "process_open_fds",
                "Number of open file descriptors",
                n,
            )?;
        }
        if let Some(n) = max_fds() {
            gauge(
                &mut enc,
                "process_max_fds",
                "Maximum number of open file descriptors",
                n,
            )?;
        }
        // OTLP trace export (both stay 0 while export is off).
        ConstCounter::new(crate::telemetry::otlp::exported_spans()).encode(
            enc.encode_descriptor(
                "dbgpt_otlp_exported_spans",
                "Spans sent to the OTLP collector",
                None,
                MetricType::Counter,
            )?,
        )?;
        ConstCounter::new(crate::telemetry::otlp::dropped_spans()).encode(
            enc.encode_descriptor(
                "dbgpt_otlp_dropped_spans",
                "Spans dropped: the OTLP collector failed or the export queue was full",
                None,
                MetricType::Counter,
            )?,
        )?;
        Ok(())
    }
}
