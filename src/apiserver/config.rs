//! The apiserver's configuration: `dbgpt start apiserver` flags, the `[apiserver]` section of
//! a config file (or DB-GPT 0.7's `[service.model.api]`), and the resolved [`ApiserverConfig`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde::Deserialize;

use super::aliases::{self, Routes};
use super::outlier;
use super::policy::RoutingPolicy;
use crate::config::{
    CommonServerArgs, TraceSection, TracerConfig, load_section, resolve_log_file, resolve_tracer,
};

/// `dbgpt start apiserver` options.
#[derive(Debug, Clone, Args, Default)]
pub struct ApiserverArgs {
    /// Address to bind [default: 0.0.0.0]
    #[arg(long, env = "APISERVER_HOST")]
    pub host: Option<String>,
    /// HTTP port [default: 8100]
    #[arg(long, env = "APISERVER_PORT")]
    pub port: Option<u16>,
    /// Controller URL(s), comma separated, for failover [default: $CONTROLLER_ADDRESS or http://127.0.0.1:8000]
    #[arg(
        long = "controller_addr",
        visible_alias = "controller-addr",
        env = "APISERVER_CONTROLLER_ADDR"
    )]
    pub controller_addr: Option<String>,
    /// API keys clients must send as `Authorization: Bearer <key>`, comma separated [default: none, the server is open]
    #[arg(
        long = "api_keys",
        visible_alias = "api-keys",
        env = "APISERVER_API_KEYS",
        hide_env_values = true
    )]
    pub api_keys: Option<String>,
    /// Embedding inputs per worker call [default: 4]
    #[arg(
        long = "embedding_batch_size",
        visible_alias = "embedding-batch-size",
        env = "APISERVER_EMBEDDING_BATCH_SIZE"
    )]
    pub embedding_batch_size: Option<usize>,
    /// How a worker instance is chosen for each request [default: least_outstanding]
    #[arg(
        long = "routing_policy",
        visible_alias = "routing-policy",
        env = "APISERVER_ROUTING_POLICY",
        value_enum
    )]
    pub routing_policy: Option<RoutingPolicy>,
    /// Seconds between refreshes of the instance list from the controller [default: 2]
    #[arg(
        long = "refresh_interval_secs",
        visible_alias = "refresh-interval-secs",
        env = "APISERVER_REFRESH_INTERVAL_SECS"
    )]
    pub refresh_interval_secs: Option<f64>,
    /// Seconds to wait for a worker's first byte (stream) or whole answer [default: 600]
    #[arg(
        long = "request_timeout_secs",
        visible_alias = "request-timeout-secs",
        env = "APISERVER_REQUEST_TIMEOUT_SECS"
    )]
    pub request_timeout_secs: Option<f64>,
    /// Seconds to wait for a worker's response headers on a completion before treating the
    /// instance as frozen (a failure towards its ejection) and trying another; our workers answer them
    /// when the model has produced its first token, so raise it for long prefills on a slow
    /// model; DB-GPT's Python workers answer a non-stream `generate` only when it is
    /// complete, so in front of them raise it above the longest one (at the request timeout
    /// it is off) [default: 30]
    #[arg(
        long = "first_byte_timeout_secs",
        visible_alias = "first-byte-timeout-secs",
        env = "APISERVER_FIRST_BYTE_TIMEOUT_SECS"
    )]
    pub first_byte_timeout_secs: Option<f64>,
    /// Extra attempts on other instances when a worker fails before its first byte [default: 2]
    #[arg(
        long = "max_retries",
        visible_alias = "max-retries",
        env = "APISERVER_MAX_RETRIES"
    )]
    pub max_retries: Option<u32>,
    /// Mid-stream failover: how many times one chat stream may move to another instance
    /// of its model when its worker dies or stalls; 0 turns failover off (a broken stream
    /// then ends with an error event) [default: 2]
    #[arg(
        long = "max_stream_migrations",
        visible_alias = "max-stream-migrations",
        env = "APISERVER_MAX_STREAM_MIGRATIONS"
    )]
    pub max_stream_migrations: Option<u32>,
    /// Seconds a worker may stay silent in the middle of a chat stream before it is taken
    /// for stalled and the stream moves to another instance (or, when it cannot, ends with
    /// an error event) [default: 30]
    #[arg(
        long = "stream_stall_timeout_secs",
        visible_alias = "stream-stall-timeout-secs",
        env = "APISERVER_STREAM_STALL_TIMEOUT_SECS"
    )]
    pub stream_stall_timeout_secs: Option<f64>,
    /// A model alias, ALIAS=MODEL: requests for ALIAS are served by MODEL (repeat the flag
    /// for several; an alias may name another alias)
    #[arg(
        long = "model_alias",
        visible_alias = "model-alias",
        value_name = "ALIAS=MODEL"
    )]
    pub model_alias: Vec<String>,
    /// A fallback chain, MODEL=FALLBACK[,FALLBACK…]: a request for MODEL (or an alias of it)
    /// that no instance of MODEL can serve before the first byte (none routable, all failed
    /// or overloaded) goes to the next model of the chain (repeat the flag for several)
    #[arg(long = "fallback", value_name = "MODEL=FALLBACK,…")]
    pub fallback: Vec<String>,
    /// Outlier detection: failures in a row (connect errors, 5xx, stalls) that eject an
    /// instance from routing; 0 turns it off [default: 3]
    #[arg(
        long = "outlier_consecutive_failures",
        visible_alias = "outlier-consecutive-failures",
        env = "APISERVER_OUTLIER_CONSECUTIVE_FAILURES"
    )]
    pub outlier_consecutive_failures: Option<u32>,
    /// Outlier detection: seconds of an instance's first ejection; each ejection in a row
    /// doubles it [default: 5]
    #[arg(
        long = "outlier_base_ejection_secs",
        visible_alias = "outlier-base-ejection-secs",
        env = "APISERVER_OUTLIER_BASE_EJECTION_SECS"
    )]
    pub outlier_base_ejection_secs: Option<f64>,
    /// Outlier detection: the longest ejection, in seconds [default: 300]
    #[arg(
        long = "outlier_max_ejection_secs",
        visible_alias = "outlier-max-ejection-secs",
        env = "APISERVER_OUTLIER_MAX_EJECTION_SECS"
    )]
    pub outlier_max_ejection_secs: Option<f64>,
    /// HTTP serving threads; each owns its client connections and its pooled worker
    /// connections [default: the number of CPUs]
    #[arg(long = "threads", env = "APISERVER_THREADS")]
    pub threads: Option<usize>,
    /// Milliseconds between syncs of managed API keys with the controller: each sync
    /// reports this apiserver's usage and fetches changed keys and the cluster-wide counts
    /// its limits need (limits hold across apiservers within one interval) [default: 1000]
    #[arg(
        long = "keys_sync_ms",
        visible_alias = "keys-sync-ms",
        env = "APISERVER_KEYS_SYNC_MS"
    )]
    pub keys_sync_ms: Option<u64>,
    /// CORS origins allowed, comma separated; `*` allows any [default: *]
    #[arg(
        long = "cors_allow_origins",
        visible_alias = "cors-allow-origins",
        env = "APISERVER_CORS_ALLOW_ORIGINS"
    )]
    pub cors_allow_origins: Option<String>,
    /// Longest wait of a request, in seconds, in its model's queue: for room under
    /// --max_instance_concurrency, after every instance answered overloaded, or for an
    /// instance of a known model that has none (hold-and-wake); past it 503 with
    /// Retry-After; 0 turns waiting off [default: 30]
    #[arg(
        long = "queue_timeout",
        visible_alias = "queue-timeout",
        env = "APISERVER_QUEUE_TIMEOUT"
    )]
    pub queue_timeout: Option<f64>,
    /// Requests that may wait per model; beyond, batch requests are shed first, then the
    /// arriving one (503 model_overloaded with Retry-After) [default: 64]
    #[arg(
        long = "max_queue",
        visible_alias = "max-queue",
        env = "APISERVER_MAX_QUEUE"
    )]
    pub max_queue: Option<usize>,
    /// Requests this apiserver sends to one instance at once; more wait in the model's
    /// queue; 0 = no limit [default: 0]
    #[arg(
        long = "max_instance_concurrency",
        visible_alias = "max-instance-concurrency",
        env = "APISERVER_MAX_INSTANCE_CONCURRENCY"
    )]
    pub max_instance_concurrency: Option<u32>,
    /// Models (`name` or `name@type`, comma separated) whose requests wait for an instance
    /// even if this apiserver never saw them registered (models it saw are held anyway)
    #[arg(
        long = "wake_models",
        visible_alias = "wake-models",
        env = "APISERVER_WAKE_MODELS"
    )]
    pub wake_models: Option<String>,
    /// Start a stopped model on a worker manager that ran it when a request waits for it
    /// (the call `dbgpt model start` makes)
    #[arg(
        long = "wake_on_request",
        visible_alias = "wake-on-request",
        env = "APISERVER_WAKE_ON_REQUEST"
    )]
    pub wake_on_request: bool,
    /// Stop a model woken by --wake_on_request once it has had no request for this many
    /// seconds [default: never]
    #[arg(
        long = "idle_unload_secs",
        visible_alias = "idle-unload-secs",
        env = "APISERVER_IDLE_UNLOAD_SECS"
    )]
    pub idle_unload_secs: Option<f64>,
    #[command(flatten)]
    pub common: CommonServerArgs,
}

/// The `[apiserver]` (or `[service.model.api]`) section of a config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiserverFile {
    host: Option<String>,
    port: Option<u16>,
    controller_addr: Option<String>,
    api_keys: Option<String>,
    embedding_batch_size: Option<usize>,
    routing_policy: Option<RoutingPolicy>,
    refresh_interval_secs: Option<f64>,
    request_timeout_secs: Option<f64>,
    first_byte_timeout_secs: Option<f64>,
    max_retries: Option<u32>,
    max_stream_migrations: Option<u32>,
    stream_stall_timeout_secs: Option<f64>,
    threads: Option<usize>,
    keys_sync_ms: Option<u64>,
    cors_allow_origins: Option<String>,
    queue_timeout: Option<f64>,
    max_queue: Option<usize>,
    max_instance_concurrency: Option<u32>,
    wake_models: Option<String>,
    wake_on_request: Option<bool>,
    idle_unload_secs: Option<f64>,
    model_alias: Option<AliasList>,
    fallback: Option<FallbackList>,
    outlier_consecutive_failures: Option<u32>,
    outlier_base_ejection_secs: Option<f64>,
    outlier_max_ejection_secs: Option<f64>,
    log_level: Option<String>,
    log_file: Option<PathBuf>,
    tracer_file: Option<String>,
    /// DB-GPT 0.7's `[service.model.<service>.trace]`.
    trace: Option<TraceSection>,
    http_header_timeout_secs: Option<u64>,
    http_idle_timeout_secs: Option<u64>,
    http_body_timeout_secs: Option<u64>,
    http_max_connections: Option<usize>,
    otlp_endpoint: Option<String>,
    otlp_batch_delay_ms: Option<u64>,
}

/// `model_alias` in a config file: `["ALIAS=MODEL", …]` or a table `{ ALIAS = "MODEL" }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum AliasList {
    List(Vec<String>),
    Table(toml::Table),
}

/// `fallback` in a config file: `["MODEL=A,B", …]` or a table `{ MODEL = ["A", "B"] }`
/// (or `MODEL = "A,B"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FallbackList {
    List(Vec<String>),
    Table(toml::Table),
}

/// The `--model_alias` entries: the flags when given, else the file's.
fn alias_entries(
    flags: Vec<String>,
    file: Option<AliasList>,
) -> anyhow::Result<Vec<(String, String)>> {
    if !flags.is_empty() {
        return Ok(flags
            .iter()
            .map(|s| aliases::parse_alias(s))
            .collect::<Result<_, _>>()?);
    }
    Ok(match file {
        None => Vec::new(),
        Some(AliasList::List(l)) => l
            .iter()
            .map(|s| aliases::parse_alias(s))
            .collect::<Result<_, _>>()?,
        Some(AliasList::Table(t)) => {
            let mut out = Vec::with_capacity(t.len());
            for (a, v) in t {
                let Some(m) = v.as_str() else {
                    bail!("model_alias.{a}: expected the name of a model (a string)");
                };
                out.push(aliases::parse_alias(&format!("{a}={m}"))?);
            }
            out
        }
    })
}

/// The `--fallback` entries: the flags when given, else the file's.
fn fallback_entries(
    flags: Vec<String>,
    file: Option<FallbackList>,
) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    if !flags.is_empty() {
        return Ok(flags
            .iter()
            .map(|s| aliases::parse_fallback(s))
            .collect::<Result<_, _>>()?);
    }
    Ok(match file {
        None => Vec::new(),
        Some(FallbackList::List(l)) => l
            .iter()
            .map(|s| aliases::parse_fallback(s))
            .collect::<Result<_, _>>()?,
        Some(FallbackList::Table(t)) => {
            let mut out = Vec::with_capacity(t.len());
            for (m, v) in t {
                let chain = match &v {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Array(a) if a.iter().all(toml::Value::is_str) => a
                        .iter()
                        .filter_map(toml::Value::as_str)
                        .collect::<Vec<_>>()
                        .join(","),
                    _ => bail!("fallback.{m}: expected a list of model names"),
                };
                out.push(aliases::parse_fallback(&format!("{m}={chain}"))?);
            }
            out
        }
    })
}

/// Resolved apiserver configuration.
#[derive(Clone)]
pub struct ApiserverConfig {
    pub host: String,
    pub port: u16,
    pub controller_addr: String,
    /// Accepted API keys; empty = open server.
    pub api_keys: Vec<String>,
    pub embedding_batch_size: usize,
    pub routing_policy: RoutingPolicy,
    pub refresh_interval: Duration,
    pub request_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub max_retries: u32,
    /// Mid-stream failover: migrations allowed per stream (0 = off).
    pub max_stream_migrations: u32,
    /// Mid-stream failover: the longest silence of a worker inside a stream.
    pub stream_stall_timeout: Duration,
    /// HTTP serving threads (each a single-threaded runtime).
    pub threads: usize,
    /// Interval of the managed API keys' sync with the controller.
    pub keys_sync: Duration,
    /// `None` = any origin.
    pub cors_allow_origins: Option<Vec<String>>,
    /// Queues, priorities and hold-and-wake.
    pub admission: super::admission::Settings,
    /// Model aliases and fallback chains.
    pub routes: Routes,
    /// Outlier detection.
    pub outlier: outlier::Settings,
    pub log_level: Option<String>,
    pub log_file: PathBuf,
    pub tracer: TracerConfig,
    pub daemon: bool,
    /// HTTP connection limits.
    pub http: crate::http::HttpLimits,
    /// Where and how `/metrics` is served.
    pub metrics: crate::telemetry::metrics::MetricsConfig,
    /// OTLP span export (`None`: off).
    pub otlp: Option<crate::telemetry::otlp::OtlpConfig>,
}

impl std::fmt::Debug for ApiserverConfig {
    /// Never prints the keys themselves.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiserverConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("controller_addr", &self.controller_addr)
            .field("api_keys", &format_args!("<{} keys>", self.api_keys.len()))
            .field("embedding_batch_size", &self.embedding_batch_size)
            .field("routing_policy", &self.routing_policy)
            .finish_non_exhaustive()
    }
}

fn positive_secs(v: f64, flag: &str) -> anyhow::Result<Duration> {
    if !v.is_finite() || v <= 0.0 || v > 86_400.0 {
        bail!("--{flag} must be a number of seconds between 0 and 86400");
    }
    Ok(Duration::from_secs_f64(v))
}

/// The admission settings from flags or file values, range-checked.
fn admission_settings(
    (queue_timeout, max_queue, max_instance_concurrency): (Option<f64>, Option<usize>, Option<u32>),
    wake_models: Option<String>,
    wake_on_request: bool,
    idle_unload_secs: Option<f64>,
) -> anyhow::Result<super::admission::Settings> {
    let d = super::admission::Settings::default();
    let queue_timeout = match queue_timeout {
        None => d.queue_timeout,
        Some(v) if v.is_finite() && (0.0..=3600.0).contains(&v) => Duration::from_secs_f64(v),
        Some(_) => bail!("--queue_timeout must be a number of seconds between 0 and 3600"),
    };
    let max_queue = max_queue.unwrap_or(d.max_queue);
    if max_queue > 100_000 {
        bail!("--max_queue must be at most 100000");
    }
    let max_instance_concurrency = max_instance_concurrency.unwrap_or(0);
    if max_instance_concurrency > 100_000 {
        bail!("--max_instance_concurrency must be at most 100000");
    }
    let mut models = Vec::new();
    for m in wake_models.unwrap_or_default().split(',').map(str::trim) {
        if m.is_empty() {
            continue;
        }
        if let Some((_, ty)) = m.rsplit_once('@')
            && crate::wire::worker::WorkerType::from_wire(ty).is_none()
        {
            bail!("--wake_models: {m:?} names no worker type (llm, text2vec or reranker)");
        }
        models.push(m.to_string());
    }
    let idle_unload = idle_unload_secs
        .map(|v| positive_secs(v, "idle_unload_secs"))
        .transpose()?;
    Ok(super::admission::Settings {
        queue_timeout,
        max_queue,
        max_instance_concurrency,
        wake_models: models,
        wake_on_request,
        idle_unload,
    })
}

impl ApiserverArgs {
    /// Applies environment fallbacks, file values and defaults, and checks ranges.
    pub fn resolve(self) -> anyhow::Result<ApiserverConfig> {
        let section = |p: &Path| -> anyhow::Result<ApiserverFile> {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config file {}", p.display()))?;
            let root: toml::Table = toml::from_str(&text)
                .with_context(|| format!("config file {} is not valid TOML", p.display()))?;
            if root.contains_key("apiserver") {
                load_section(p, "apiserver")
            } else {
                load_section(p, "api")
            }
        };
        let file = match &self.common.config {
            Some(p) => section(p)?,
            None => ApiserverFile::default(),
        };
        let port = self.port.or(file.port).unwrap_or(8100);
        if port == 0 {
            bail!("--port must be between 1 and 65535");
        }
        let controller_addr = self
            .controller_addr
            .or_else(|| {
                std::env::var("CONTROLLER_ADDRESS")
                    .ok()
                    .filter(|s| !s.trim().is_empty())
            })
            .or(file.controller_addr)
            .unwrap_or_else(|| "http://127.0.0.1:8000".into());
        if crate::controller::client::parse_urls(&controller_addr).is_empty() {
            bail!("--controller_addr must name at least one controller URL");
        }
        let api_keys: Vec<String> = self
            .api_keys
            .or(file.api_keys)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_string)
            .collect();
        let embedding_batch_size = self
            .embedding_batch_size
            .or(file.embedding_batch_size)
            .unwrap_or(4);
        if embedding_batch_size == 0 {
            bail!("--embedding_batch_size must be at least 1");
        }
        let refresh_interval = positive_secs(
            self.refresh_interval_secs
                .or(file.refresh_interval_secs)
                .unwrap_or(2.0),
            "refresh_interval_secs",
        )?;
        let request_timeout = positive_secs(
            self.request_timeout_secs
                .or(file.request_timeout_secs)
                .unwrap_or(600.0),
            "request_timeout_secs",
        )?;
        let first_byte_timeout = positive_secs(
            self.first_byte_timeout_secs
                .or(file.first_byte_timeout_secs)
                .unwrap_or(30.0),
            "first_byte_timeout_secs",
        )?;
        let max_retries = self.max_retries.or(file.max_retries).unwrap_or(2);
        if max_retries > 16 {
            bail!("--max_retries must be at most 16");
        }
        let max_stream_migrations = self
            .max_stream_migrations
            .or(file.max_stream_migrations)
            .unwrap_or(2);
        if max_stream_migrations > 16 {
            bail!("--max_stream_migrations must be at most 16");
        }
        let stream_stall_timeout = positive_secs(
            self.stream_stall_timeout_secs
                .or(file.stream_stall_timeout_secs)
                .unwrap_or(30.0),
            "stream_stall_timeout_secs",
        )?;
        let threads = match self.threads.or(file.threads) {
            Some(n) if n == 0 || n > 256 => bail!("--threads must be between 1 and 256"),
            Some(n) => n,
            None => crate::http::default_threads(),
        };
        let keys_sync_ms = self.keys_sync_ms.or(file.keys_sync_ms).unwrap_or(1000);
        if !(10..=600_000).contains(&keys_sync_ms) {
            bail!("--keys_sync_ms must be between 10 and 600000 (milliseconds)");
        }
        let origins: Vec<String> = self
            .cors_allow_origins
            .or(file.cors_allow_origins)
            .unwrap_or_else(|| "*".into())
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .map(str::to_string)
            .collect();
        let cors_allow_origins = if origins.is_empty() || origins.iter().any(|o| o == "*") {
            None
        } else {
            for o in &origins {
                if axum::http::HeaderValue::from_str(o).is_err() {
                    bail!("--cors_allow_origins: {o:?} is not a valid origin");
                }
            }
            Some(origins)
        };
        let admission = admission_settings(
            (
                self.queue_timeout.or(file.queue_timeout),
                self.max_queue.or(file.max_queue),
                self.max_instance_concurrency
                    .or(file.max_instance_concurrency),
            ),
            self.wake_models.or(file.wake_models),
            self.wake_on_request || file.wake_on_request.unwrap_or(false),
            self.idle_unload_secs.or(file.idle_unload_secs),
        )?;
        let routes = Routes::new(
            alias_entries(self.model_alias, file.model_alias)?,
            fallback_entries(self.fallback, file.fallback)?,
        )?;
        let consecutive_failures = self
            .outlier_consecutive_failures
            .or(file.outlier_consecutive_failures)
            .unwrap_or(3);
        if consecutive_failures > 1000 {
            bail!("--outlier_consecutive_failures must be at most 1000 (0 turns it off)");
        }
        let base_ejection = positive_secs(
            self.outlier_base_ejection_secs
                .or(file.outlier_base_ejection_secs)
                .unwrap_or(5.0),
            "outlier_base_ejection_secs",
        )?;
        let max_ejection = positive_secs(
            self.outlier_max_ejection_secs
                .or(file.outlier_max_ejection_secs)
                .unwrap_or(300.0),
            "outlier_max_ejection_secs",
        )?;
        if max_ejection < base_ejection {
            bail!(
                "--outlier_max_ejection_secs ({}) must be at least --outlier_base_ejection_secs ({})",
                max_ejection.as_secs_f64(),
                base_ejection.as_secs_f64()
            );
        }
        let outlier = outlier::Settings {
            consecutive_failures,
            base_ejection,
            max_ejection,
        };
        let http = self.common.http_limits(crate::config::http_keys!(file))?;
        let metrics = self.common.metrics()?;
        let otlp = self
            .common
            .otlp(crate::config::otlp_keys!(file), "dbgpt-apiserver")?;
        Ok(ApiserverConfig {
            metrics,
            host: self.host.or(file.host).unwrap_or_else(|| "0.0.0.0".into()),
            port,
            controller_addr,
            api_keys,
            embedding_batch_size,
            routing_policy: self
                .routing_policy
                .or(file.routing_policy)
                .unwrap_or_default(),
            refresh_interval,
            request_timeout,
            first_byte_timeout,
            max_retries,
            max_stream_migrations,
            stream_stall_timeout,
            threads,
            keys_sync: Duration::from_millis(keys_sync_ms),
            cors_allow_origins,
            admission,
            routes,
            outlier,
            log_level: self.common.log_level.or(file.log_level),
            log_file: resolve_log_file(
                self.common.log_file.or(file.log_file),
                "dbgpt_model_apiserver.log",
            ),
            tracer: resolve_tracer(
                self.common.config.as_deref(),
                self.common.tracer_file,
                file.tracer_file,
                file.trace,
                crate::tracer::APISERVER_FILE,
            )?,
            daemon: self.common.daemon,
            http,
            otlp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apiserver_defaults_file_and_keys() {
        let c = ApiserverArgs::default().resolve().unwrap();
        assert_eq!(c.port, 8100);
        assert_eq!(c.embedding_batch_size, 4);
        assert_eq!(c.routing_policy, RoutingPolicy::LeastOutstanding);
        assert!(c.api_keys.is_empty());
        assert!(c.cors_allow_origins.is_none());
        assert_eq!(c.first_byte_timeout, Duration::from_secs(30));
        assert_eq!(c.max_stream_migrations, 2);
        assert_eq!(c.stream_stall_timeout, Duration::from_secs(30));
        assert_eq!(c.keys_sync, Duration::from_secs(1));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.toml");
        std::fs::write(
            &f,
            "[service.model.api]\nport = 9100\nrouting_policy = \"round_robin\"\napi_keys = \"a, b\"\nfirst_byte_timeout_secs = 2.5\nmax_stream_migrations = 0\nstream_stall_timeout_secs = 4\nkeys_sync_ms = 250\n",
        )
        .unwrap();
        let c = ApiserverArgs {
            common: CommonServerArgs {
                config: Some(f.clone()),
                ..Default::default()
            },
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.port, 9100);
        assert_eq!(c.routing_policy, RoutingPolicy::RoundRobin);
        assert_eq!(c.api_keys, ["a", "b"]);
        assert_eq!(c.first_byte_timeout, Duration::from_millis(2500));
        assert_eq!(c.max_stream_migrations, 0);
        assert_eq!(c.stream_stall_timeout, Duration::from_secs(4));
        assert_eq!(c.keys_sync, Duration::from_millis(250));
        for (args, flag) in [
            (
                ApiserverArgs {
                    max_stream_migrations: Some(17),
                    ..Default::default()
                },
                "--max_stream_migrations",
            ),
            (
                ApiserverArgs {
                    stream_stall_timeout_secs: Some(0.0),
                    ..Default::default()
                },
                "--stream_stall_timeout_secs",
            ),
            (
                ApiserverArgs {
                    keys_sync_ms: Some(0),
                    ..Default::default()
                },
                "--keys_sync_ms",
            ),
        ] {
            assert!(args.resolve().unwrap_err().to_string().contains(flag));
        }
        assert!(!format!("{c:?}").contains("\"a\""));
        let bad = ApiserverArgs {
            embedding_batch_size: Some(0),
            ..Default::default()
        };
        assert!(
            bad.resolve()
                .unwrap_err()
                .to_string()
                .contains("--embedding_batch_size")
        );
        assert!(c.threads >= 1, "defaults to the number of CPUs");
        for (n, ok) in [(0, false), (1, true), (4, true), (257, false)] {
            let r = ApiserverArgs {
                threads: Some(n),
                ..Default::default()
            }
            .resolve();
            match r {
                Ok(c) => assert!(ok && c.threads == n, "--threads {n}"),
                Err(e) => assert!(!ok && e.to_string().contains("--threads"), "{e}"),
            }
        }
    }

    #[test]
    fn aliases_fallbacks_and_outlier_flags() {
        let c = ApiserverArgs::default().resolve().unwrap();
        assert_eq!(c.routes, Routes::default());
        assert_eq!(c.outlier, outlier::Settings::default());
        let c = ApiserverArgs {
            model_alias: vec!["gpt-4o-mini=smollm2".into()],
            fallback: vec!["smollm2=qwen,proxy-gpt".into()],
            outlier_consecutive_failures: Some(2),
            outlier_base_ejection_secs: Some(0.5),
            outlier_max_ejection_secs: Some(4.0),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let hops: Vec<&str> = c
            .routes
            .hops("gpt-4o-mini")
            .iter()
            .map(|h| h.model)
            .collect();
        assert_eq!(hops, ["smollm2", "qwen", "proxy-gpt"]);
        assert_eq!(c.outlier.consecutive_failures, 2);
        assert_eq!(c.outlier.base_ejection, Duration::from_millis(500));
        assert_eq!(c.outlier.max_ejection, Duration::from_secs(4));
        // Both shapes of the config file.
        let dir = tempfile::tempdir().unwrap();
        for text in [
            "[apiserver]\nmodel_alias = [\"a=m\"]\nfallback = [\"m=x,y\"]\n",
            "[apiserver.model_alias]\na = \"m\"\n[apiserver.fallback]\nm = [\"x\", \"y\"]\n",
            "[apiserver.model_alias]\na = \"m\"\n[apiserver.fallback]\nm = \"x,y\"\n",
        ] {
            let f = dir.path().join("a.toml");
            std::fs::write(&f, text).unwrap();
            let c = ApiserverArgs {
                common: CommonServerArgs {
                    config: Some(f),
                    ..Default::default()
                },
                ..Default::default()
            }
            .resolve()
            .unwrap();
            let hops: Vec<&str> = c.routes.hops("a").iter().map(|h| h.model).collect();
            assert_eq!(hops, ["m", "x", "y"], "{text}");
        }
        for (args, flag) in [
            (
                ApiserverArgs {
                    model_alias: vec!["a=".into()],
                    ..Default::default()
                },
                "--model_alias",
            ),
            (
                ApiserverArgs {
                    model_alias: vec!["a=b".into(), "b=a".into()],
                    ..Default::default()
                },
                "--model_alias",
            ),
            (
                ApiserverArgs {
                    fallback: vec!["m".into()],
                    ..Default::default()
                },
                "--fallback",
            ),
            (
                ApiserverArgs {
                    outlier_base_ejection_secs: Some(10.0),
                    outlier_max_ejection_secs: Some(5.0),
                    ..Default::default()
                },
                "--outlier_max_ejection_secs",
            ),
            (
                ApiserverArgs {
                    outlier_base_ejection_secs: Some(0.0),
                    ..Default::default()
                },
                "--outlier_base_ejection_secs",
            ),
        ] {
            let e = args.resolve().unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
    }

    #[test]
    fn admission_flags_file_and_errors() {
        let c = ApiserverArgs::default().resolve().unwrap();
        assert_eq!(c.admission, super::super::admission::Settings::default());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.toml");
        std::fs::write(
            &f,
            "[apiserver]\nqueue_timeout = 5\nmax_queue = 8\nmax_instance_concurrency = 2\nwake_models = \"a, b@llm\"\nwake_on_request = true\nidle_unload_secs = 60\n",
        )
        .unwrap();
        let file = || CommonServerArgs {
            config: Some(f.clone()),
            ..Default::default()
        };
        let c = ApiserverArgs {
            common: file(),
            ..Default::default()
        }
        .resolve()
        .unwrap()
        .admission;
        assert_eq!(c.queue_timeout, Duration::from_secs(5));
        assert_eq!((c.max_queue, c.max_instance_concurrency), (8, 2));
        assert_eq!(c.wake_models, ["a", "b@llm"]);
        assert!(c.wake_on_request);
        assert_eq!(c.idle_unload, Some(Duration::from_secs(60)));
        // Flags win; 0 turns waiting off.
        let c = ApiserverArgs {
            queue_timeout: Some(0.0),
            max_queue: Some(0),
            common: file(),
            ..Default::default()
        }
        .resolve()
        .unwrap()
        .admission;
        assert_eq!((c.queue_timeout, c.max_queue), (Duration::ZERO, 0));
        for (args, flag) in [
            (
                ApiserverArgs {
                    queue_timeout: Some(-1.0),
                    ..Default::default()
                },
                "--queue_timeout",
            ),
            (
                ApiserverArgs {
                    wake_models: Some("m@gpu".into()),
                    ..Default::default()
                },
                "--wake_models",
            ),
            (
                ApiserverArgs {
                    idle_unload_secs: Some(0.0),
                    ..Default::default()
                },
                "--idle_unload_secs",
            ),
            (
                ApiserverArgs {
                    max_queue: Some(1_000_000),
                    ..Default::default()
                },
                "--max_queue",
            ),
        ] {
            let e = args.resolve().unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
    }

    #[test]
    fn tracer_file_default() {
        let a = ApiserverArgs::default().resolve().unwrap();
        assert_eq!(
            a.tracer.file,
            Some(crate::daemon::log_dir().join("dbgpt_model_apiserver_tracer.jsonl"))
        );
    }

    /// The config file the packages install parses with this build.
    #[test]
    fn shipped_config_resolves() {
        let etc = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/etc");
        ApiserverArgs {
            common: CommonServerArgs {
                config: Some(etc.join("apiserver.toml")),
                ..Default::default()
            },
            ..Default::default()
        }
        .resolve()
        .unwrap();
    }
}
