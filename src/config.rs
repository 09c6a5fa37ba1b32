//! What every daemon's configuration shares: the common server flags, config-file loading and
//! DB-GPT's span-file (tracer) options. Each service's own flags, file section and resolved
//! configuration live beside the service: [`crate::controller::config`],
//! [`crate::worker::config`] and [`crate::apiserver::config`].
//!
//! Precedence is flags > environment > `--config FILE` > defaults. Flags use DB-GPT's
//! snake_case names (`--heartbeat_timeout_secs`) with kebab-case aliases; environment
//! variables use DB-GPT's prefixes (`CONTROLLER_PORT`, `CONTROLLER_HEARTBEAT_TIMEOUT_SECS`,
//! `DBGPT_LOG_LEVEL`, …) — but, unlike DB-GPT, never un-prefixed names such as `PORT`.
//! A config file section is `[controller]` (or DB-GPT 0.7's `[service.model.controller]`);
//! unknown keys are errors that name the key, so typos do not pass silently.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde::Deserialize;

use crate::http::HttpLimits;

/// Options every server command shares.
#[derive(Debug, Clone, Args, Default)]
pub struct CommonServerArgs {
    /// Run in the background: returns once the server is serving (or fails with the reason).
    #[arg(short = 'd', long)]
    pub daemon: bool,
    /// Log level: error, warn, info, debug, trace (DB-GPT's FATAL/WARNING/NOTSET also work).
    #[arg(
        long = "log_level",
        visible_alias = "log-level",
        env = "DBGPT_LOG_LEVEL"
    )]
    pub log_level: Option<String>,
    /// Log file name (inside $DBGPT_LOG_DIR) or path, used with --daemon.
    #[arg(long = "log_file", visible_alias = "log-file")]
    pub log_file: Option<PathBuf>,
    /// DB-GPT's span file (JSON lines, read by `dbgpt trace`): a name inside $DBGPT_LOG_DIR or a path [default: dbgpt_model_controller_tracer.jsonl, dbgpt_model_worker_manager_tracer.jsonl or dbgpt_model_apiserver_tracer.jsonl]; "" turns tracing off
    #[arg(
        long = "tracer_file",
        visible_alias = "tracer-file",
        value_name = "FILE"
    )]
    pub tracer_file: Option<String>,
    /// TOML configuration file; flags and environment variables override it.
    #[arg(short = 'c', long = "config")]
    pub config: Option<PathBuf>,
    // HTTP connection limits: see `HttpLimits` in src/http/limits.rs.
    /// Seconds a client may take to send a request head, from its first byte [default: 10]
    #[arg(
        long = "http_header_timeout_secs",
        visible_alias = "http-header-timeout-secs",
        env = "DBGPT_HTTP_HEADER_TIMEOUT_SECS",
        value_name = "SECS"
    )]
    pub http_header_timeout_secs: Option<u64>,
    /// Seconds a keep-alive connection may stay idle between requests [default: 120]
    #[arg(
        long = "http_idle_timeout_secs",
        visible_alias = "http-idle-timeout-secs",
        env = "DBGPT_HTTP_IDLE_TIMEOUT_SECS",
        value_name = "SECS"
    )]
    pub http_idle_timeout_secs: Option<u64>,
    /// Seconds a client may take to send a request body, from the end of its head (408 beyond) [default: 30]
    #[arg(
        long = "http_body_timeout_secs",
        visible_alias = "http-body-timeout-secs",
        env = "DBGPT_HTTP_BODY_TIMEOUT_SECS",
        value_name = "SECS"
    )]
    pub http_body_timeout_secs: Option<u64>,
    /// Connections served at once; more wait in the listen backlog [default: 4096]
    #[arg(
        long = "http_max_connections",
        visible_alias = "http-max-connections",
        env = "DBGPT_HTTP_MAX_CONNECTIONS",
        value_name = "N"
    )]
    pub http_max_connections: Option<usize>,
    /// Where `GET /metrics` (Prometheus) is served: unset for the HTTP port, HOST:PORT for a separate listener, `off` for nowhere
    #[arg(
        long = "metrics_addr",
        visible_alias = "metrics-addr",
        env = "DBGPT_METRICS_ADDR",
        value_name = "HOST:PORT|off"
    )]
    pub metrics_addr: Option<String>,
    /// A key scrapes of /metrics must send as `Authorization: Bearer <key>` [default: none, open]
    #[arg(
        long = "metrics_api_key",
        visible_alias = "metrics-api-key",
        env = "DBGPT_METRICS_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub metrics_api_key: Option<String>,
    /// Export request spans to this OTLP/HTTP collector (protobuf): its base URL, e.g. http://127.0.0.1:4318 (`/v1/traces` is added); "" turns export off [default: off, or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT as the full URL]
    #[arg(
        long = "otlp_endpoint",
        visible_alias = "otlp-endpoint",
        env = "OTEL_EXPORTER_OTLP_ENDPOINT",
        value_name = "URL"
    )]
    pub otlp_endpoint: Option<String>,
    /// Milliseconds between two exports of finished spans [default: 1000]
    #[arg(
        long = "otlp_batch_delay_ms",
        visible_alias = "otlp-batch-delay-ms",
        env = "OTEL_BSP_SCHEDULE_DELAY",
        value_name = "MS"
    )]
    pub otlp_batch_delay_ms: Option<u64>,
}

/// The `http_*` keys of a config file section (every service's section has them).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct HttpKeys {
    pub(crate) header_timeout_secs: Option<u64>,
    pub(crate) idle_timeout_secs: Option<u64>,
    pub(crate) body_timeout_secs: Option<u64>,
    pub(crate) max_connections: Option<usize>,
}

/// The [`HttpKeys`] of a section struct (they all name them alike).
macro_rules! http_keys {
    ($file:expr) => {
        $crate::config::HttpKeys {
            header_timeout_secs: $file.http_header_timeout_secs,
            idle_timeout_secs: $file.http_idle_timeout_secs,
            body_timeout_secs: $file.http_body_timeout_secs,
            max_connections: $file.http_max_connections,
        }
    };
}
pub(crate) use http_keys;

/// The `otlp_*` keys of a config file section (every service's section has them).
#[derive(Debug, Default, Clone)]
pub(crate) struct OtlpKeys {
    pub(crate) endpoint: Option<String>,
    pub(crate) batch_delay_ms: Option<u64>,
}

/// The [`OtlpKeys`] of a section struct (they all name them alike).
macro_rules! otlp_keys {
    ($file:expr) => {
        $crate::config::OtlpKeys {
            endpoint: $file.otlp_endpoint.clone(),
            batch_delay_ms: $file.otlp_batch_delay_ms,
        }
    };
}
pub(crate) use otlp_keys;

impl CommonServerArgs {
    /// The metrics endpoint flags, resolved.
    pub(crate) fn metrics(&self) -> anyhow::Result<crate::telemetry::metrics::MetricsConfig> {
        crate::telemetry::metrics::MetricsConfig::from_flags(
            self.metrics_addr.as_deref(),
            self.metrics_api_key.as_deref(),
        )
    }

    /// Span export for `service` (its `service.name`): `--otlp_endpoint` (or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`) > the section's `otlp_endpoint` >
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (a full traces URL); none, "" or
    /// `OTEL_SDK_DISABLED=true`: off.
    pub(crate) fn otlp(
        &self,
        file: OtlpKeys,
        service: &'static str,
    ) -> anyhow::Result<Option<crate::telemetry::otlp::OtlpConfig>> {
        use crate::telemetry::otlp::{DEFAULT_BATCH_DELAY, OtlpConfig};
        let disabled =
            std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let endpoint = match self.otlp_endpoint.clone().or(file.endpoint) {
            Some(e) if e.trim().is_empty() => return Ok(None),
            Some(e) => OtlpConfig::traces_url(&e)
                .map_err(|m| anyhow::anyhow!("invalid --otlp_endpoint: {m}"))?,
            None => match std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
                Ok(e) if !e.trim().is_empty() => {
                    OtlpConfig::traces_url(&e).map_err(|m| {
                        anyhow::anyhow!("invalid OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: {m}")
                    })?;
                    e.trim().to_string()
                }
                _ => return Ok(None),
            },
        };
        let batch_delay = match self.otlp_batch_delay_ms.or(file.batch_delay_ms) {
            Some(0) => bail!("--otlp_batch_delay_ms must be at least 1"),
            Some(ms) => Duration::from_millis(ms),
            None => DEFAULT_BATCH_DELAY,
        };
        if disabled {
            return Ok(None);
        }
        Ok(Some(OtlpConfig {
            endpoint,
            service_name: service,
            batch_delay,
        }))
    }

    /// The HTTP connection limits: flags and environment > the section's keys > defaults.
    pub(crate) fn http_limits(&self, file: HttpKeys) -> anyhow::Result<HttpLimits> {
        let secs = |flag: Option<u64>, key: Option<u64>, default: u64, name: &str| match flag
            .or(key)
            .unwrap_or(default)
        {
            0 => bail!("--{name} must be at least 1"),
            n => Ok(Duration::from_secs(n)),
        };
        let max_connections = self
            .http_max_connections
            .or(file.max_connections)
            .unwrap_or(HttpLimits::MAX_CONNECTIONS);
        if max_connections == 0 {
            bail!("--http_max_connections must be at least 1");
        }
        Ok(HttpLimits {
            header_timeout: secs(
                self.http_header_timeout_secs,
                file.header_timeout_secs,
                HttpLimits::HEADER_TIMEOUT_SECS,
                "http_header_timeout_secs",
            )?,
            idle_timeout: secs(
                self.http_idle_timeout_secs,
                file.idle_timeout_secs,
                HttpLimits::IDLE_TIMEOUT_SECS,
                "http_idle_timeout_secs",
            )?,
            body_timeout: secs(
                self.http_body_timeout_secs,
                file.body_timeout_secs,
                HttpLimits::BODY_TIMEOUT_SECS,
                "http_body_timeout_secs",
            )?,
            max_connections,
        })
    }
}

/// Reads `[section]` (or `[service.model.<section>]`) of a TOML file.
pub(crate) fn load_section<T: for<'de> Deserialize<'de> + Default>(
    path: &Path,
    section: &str,
) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let root: toml::Table = toml::from_str(&text)
        .with_context(|| format!("config file {} is not valid TOML", path.display()))?;
    let found = root.get(section).cloned().or_else(|| {
        root.get("service")
            .and_then(|s| s.get("model"))
            .and_then(|m| m.get(section))
            .cloned()
    });
    match found {
        None => Ok(T::default()),
        Some(v) => v
            .try_into()
            .with_context(|| format!("invalid [{section}] section in {}", path.display())),
    }
}

/// Resolves a log-file option: a bare file name goes into the log directory.
pub fn resolve_log_file(opt: Option<PathBuf>, default_name: &str) -> PathBuf {
    match opt {
        Some(p) if p.components().count() > 1 || p.is_absolute() => p,
        Some(p) => crate::daemon::log_dir().join(p),
        None => crate::daemon::log_dir().join(default_name),
    }
}

/// DB-GPT 0.7's `[trace]` table: at the top level of a config file, or inside a service's
/// section (`[service.model.controller.trace]`, which wins).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TraceSection {
    file: Option<String>,
    root_operation_name: Option<String>,
}

/// Where a service writes DB-GPT's span file, and under which root operation name.
#[derive(Debug, Clone, PartialEq)]
pub struct TracerConfig {
    /// `None`: tracing off.
    pub file: Option<PathBuf>,
    /// The root span's operation name [default: DB-GPT's name for the service].
    pub root_operation_name: Option<String>,
}

impl TracerConfig {
    /// Opens the span file (or a disabled tracer); `default_root` is DB-GPT's root span name
    /// for the service, used unless the config names another.
    pub fn open(&self, default_root: &str) -> (crate::tracer::Tracer, crate::tracer::Flusher) {
        crate::tracer::Tracer::open(
            self.file.as_deref(),
            self.root_operation_name.as_deref().unwrap_or(default_root),
        )
    }
}

/// Resolves the tracer options: `--tracer_file` > the section's `tracer_file` > the
/// section's `[….trace] file` > the top-level `[trace] file` > `default_name`. A bare
/// name goes into the log directory (next to the log file); an empty one turns tracing off.
pub(crate) fn resolve_tracer(
    config: Option<&Path>,
    flag: Option<String>,
    section_file: Option<String>,
    section_trace: Option<TraceSection>,
    default_name: &str,
) -> anyhow::Result<TracerConfig> {
    let top: TraceSection = match config {
        Some(p) => load_section(p, "trace")?,
        None => TraceSection::default(),
    };
    let inner = section_trace.unwrap_or_default();
    let file = match flag.or(section_file).or(inner.file).or(top.file) {
        Some(f) if f.trim().is_empty() => None,
        Some(f) => Some(resolve_log_file(Some(PathBuf::from(f)), default_name)),
        None => Some(resolve_log_file(None, default_name)),
    };
    let root_operation_name = inner
        .root_operation_name
        .or(top.root_operation_name)
        .filter(|n| !n.trim().is_empty());
    Ok(TracerConfig {
        file,
        root_operation_name,
    })
}

#[cfg(test)]
mod http_limits_tests {
    use super::*;
    use crate::apiserver::config::ApiserverArgs;
    use crate::controller::config::ControllerArgs;
    use crate::worker::config::WorkerArgs;

    #[test]
    fn http_limits_flags_over_section_keys_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "[controller]\nhttp_idle_timeout_secs = 7\nhttp_max_connections = 9\n\
             [worker]\nhttp_body_timeout_secs = 3\n\
             [apiserver]\nhttp_header_timeout_secs = 4\n",
        )
        .unwrap();
        let common = |header| CommonServerArgs {
            config: Some(f.clone()),
            http_header_timeout_secs: header,
            ..Default::default()
        };
        let secs = Duration::from_secs;
        let c = ControllerArgs {
            common: common(Some(2)),
            ..Default::default()
        };
        let expected = HttpLimits {
            header_timeout: secs(2),
            idle_timeout: secs(7),
            body_timeout: secs(30),
            max_connections: 9,
        };
        assert_eq!(c.resolve().unwrap().http, expected);
        let w = WorkerArgs {
            common: common(None),
            ..Default::default()
        };
        let expected = HttpLimits {
            body_timeout: secs(3),
            ..HttpLimits::default()
        };
        assert_eq!(w.resolve().unwrap().http, expected);
        let a = ApiserverArgs {
            common: common(None),
            ..Default::default()
        };
        let expected = HttpLimits {
            header_timeout: secs(4),
            ..HttpLimits::default()
        };
        assert_eq!(a.resolve().unwrap().http, expected);
        assert_eq!(
            HttpLimits::default(),
            HttpLimits {
                header_timeout: secs(10),
                idle_timeout: secs(120),
                body_timeout: secs(30),
                max_connections: 4096,
            }
        );
        // Zero is refused, naming the flag.
        let c = ControllerArgs {
            common: common(Some(0)),
            ..Default::default()
        };
        let e = c.resolve().unwrap_err().to_string();
        assert!(e.contains("--http_header_timeout_secs"), "{e}");
    }
}
