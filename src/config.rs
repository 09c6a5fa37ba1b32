//! Service parameters: command-line flags, environment variables and an optional TOML file.
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
use clap::{Args, ValueEnum};
use serde::Deserialize;

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
    /// TOML configuration file; flags and environment variables override it.
    #[arg(short = 'c', long = "config")]
    pub config: Option<PathBuf>,
}

/// Registry backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistryType {
    /// The embedded redb file (default).
    Embedded,
    /// A shared SQL database (several controllers; not available in this build yet).
    Database,
}

/// `dbgpt start controller` options.
#[derive(Debug, Clone, Args, Default)]
pub struct ControllerArgs {
    /// Address to bind [default: 0.0.0.0]
    #[arg(long, env = "CONTROLLER_HOST")]
    pub host: Option<String>,
    /// HTTP port [default: 8000]
    #[arg(long, env = "CONTROLLER_PORT")]
    pub port: Option<u16>,
    /// Registry backend [default: embedded]
    #[arg(
        long = "registry_type",
        visible_alias = "registry-type",
        env = "CONTROLLER_REGISTRY_TYPE",
        value_enum
    )]
    pub registry_type: Option<RegistryType>,
    /// redb registry file [default: $DBGPT_STATE_DIR/registry.redb, ~/.local/share/dbgpt/registry.redb, or /var/lib/dbgpt/registry.redb for root]
    #[arg(
        long = "registry_path",
        visible_alias = "registry-path",
        env = "CONTROLLER_REGISTRY_PATH"
    )]
    pub registry_path: Option<PathBuf>,
    /// Seconds between health checks of registered instances [default: 20]
    #[arg(
        long = "heartbeat_interval_secs",
        visible_alias = "heartbeat-interval-secs",
        env = "CONTROLLER_HEARTBEAT_INTERVAL_SECS"
    )]
    pub heartbeat_interval_secs: Option<u64>,
    /// Seconds without a heartbeat after which an instance is unhealthy [default: 60]
    #[arg(
        long = "heartbeat_timeout_secs",
        visible_alias = "heartbeat-timeout-secs",
        env = "CONTROLLER_HEARTBEAT_TIMEOUT_SECS"
    )]
    pub heartbeat_timeout_secs: Option<u64>,
    #[command(flatten)]
    pub common: CommonServerArgs,
}

/// The `[controller]` section of a config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControllerFile {
    host: Option<String>,
    port: Option<u16>,
    registry_type: Option<RegistryType>,
    registry_path: Option<PathBuf>,
    heartbeat_interval_secs: Option<u64>,
    heartbeat_timeout_secs: Option<u64>,
    log_level: Option<String>,
    log_file: Option<PathBuf>,
}

/// Resolved controller configuration.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub host: String,
    pub port: u16,
    pub registry_type: RegistryType,
    pub registry_path: PathBuf,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub log_level: Option<String>,
    pub log_file: PathBuf,
    pub daemon: bool,
}

/// Reads `[section]` (or `[service.model.<section>]`) of a TOML file.
fn load_section<T: for<'de> Deserialize<'de> + Default>(
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

impl ControllerArgs {
    /// Applies file values and defaults, and checks ranges.
    pub fn resolve(self) -> anyhow::Result<ControllerConfig> {
        let file: ControllerFile = match &self.common.config {
            Some(p) => load_section(p, "controller")?,
            None => ControllerFile::default(),
        };
        let interval = self
            .heartbeat_interval_secs
            .or(file.heartbeat_interval_secs)
            .unwrap_or(20);
        let timeout = self
            .heartbeat_timeout_secs
            .or(file.heartbeat_timeout_secs)
            .unwrap_or(60);
        if interval == 0 {
            bail!("--heartbeat_interval_secs must be at least 1");
        }
        if timeout == 0 {
            bail!("--heartbeat_timeout_secs must be at least 1");
        }
        let port = self.port.or(file.port).unwrap_or(8000);
        if port == 0 {
            bail!("--port must be between 1 and 65535");
        }
        let registry_type = self
            .registry_type
            .or(file.registry_type)
            .unwrap_or(RegistryType::Embedded);
        Ok(ControllerConfig {
            host: self.host.or(file.host).unwrap_or_else(|| "0.0.0.0".into()),
            port,
            registry_type,
            registry_path: self
                .registry_path
                .or(file.registry_path)
                .unwrap_or_else(|| crate::daemon::state_dir().join("registry.redb")),
            heartbeat_interval: Duration::from_secs(interval),
            heartbeat_timeout: Duration::from_secs(timeout),
            log_level: self.common.log_level.or(file.log_level),
            log_file: resolve_log_file(
                self.common.log_file.or(file.log_file),
                "dbgpt_model_controller.log",
            ),
            daemon: self.common.daemon,
        })
    }
}

/// Instance-selection policies of the apiserver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum RoutingPolicy {
    /// Weighted random choice (DB-GPT's behaviour, plus weights).
    Random,
    /// Smooth weighted round robin.
    #[value(alias = "round-robin")]
    RoundRobin,
    /// Fewest requests in flight relative to weight (default).
    #[default]
    #[value(alias = "least-outstanding")]
    LeastOutstanding,
}

impl RoutingPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RoutingPolicy::Random => "random",
            RoutingPolicy::RoundRobin => "round_robin",
            RoutingPolicy::LeastOutstanding => "least_outstanding",
        }
    }
}

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
    /// Extra attempts on other instances when a worker fails before its first byte [default: 2]
    #[arg(
        long = "max_retries",
        visible_alias = "max-retries",
        env = "APISERVER_MAX_RETRIES"
    )]
    pub max_retries: Option<u32>,
    /// CORS origins allowed, comma separated; `*` allows any [default: *]
    #[arg(
        long = "cors_allow_origins",
        visible_alias = "cors-allow-origins",
        env = "APISERVER_CORS_ALLOW_ORIGINS"
    )]
    pub cors_allow_origins: Option<String>,
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
    max_retries: Option<u32>,
    cors_allow_origins: Option<String>,
    log_level: Option<String>,
    log_file: Option<PathBuf>,
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
    pub max_retries: u32,
    /// `None` = any origin.
    pub cors_allow_origins: Option<Vec<String>>,
    pub log_level: Option<String>,
    pub log_file: PathBuf,
    pub daemon: bool,
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
        let max_retries = self.max_retries.or(file.max_retries).unwrap_or(2);
        if max_retries > 16 {
            bail!("--max_retries must be at most 16");
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
        Ok(ApiserverConfig {
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
            max_retries,
            cors_allow_origins,
            log_level: self.common.log_level.or(file.log_level),
            log_file: resolve_log_file(
                self.common.log_file.or(file.log_file),
                "dbgpt_model_apiserver.log",
            ),
            daemon: self.common.daemon,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "[controller]\nport = 9000\nheartbeat_timeout_secs = 5\n",
        )
        .unwrap();
        let args = ControllerArgs {
            port: Some(9100),
            common: CommonServerArgs {
                config: Some(f.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.port, 9100);
        assert_eq!(c.heartbeat_timeout, Duration::from_secs(5));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(20));
        assert_eq!(c.host, "0.0.0.0");
    }

    #[test]
    fn dbgpt_07_section_and_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[service.model.controller]\nport = 9001\n").unwrap();
        let args = ControllerArgs {
            common: CommonServerArgs {
                config: Some(f.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(args.clone().resolve().unwrap().port, 9001);
        std::fs::write(&f, "[controller]\nprot = 1\n").unwrap();
        let e = format!("{:#}", args.resolve().unwrap_err());
        assert!(e.contains("prot"), "{e}");
    }

    #[test]
    fn zero_values_are_rejected_with_the_flag_name() {
        let args = ControllerArgs {
            heartbeat_timeout_secs: Some(0),
            ..Default::default()
        };
        let e = args.resolve().unwrap_err().to_string();
        assert!(e.contains("--heartbeat_timeout_secs"), "{e}");
    }

    #[test]
    fn apiserver_defaults_file_and_keys() {
        let c = ApiserverArgs::default().resolve().unwrap();
        assert_eq!(c.port, 8100);
        assert_eq!(c.embedding_batch_size, 4);
        assert_eq!(c.routing_policy, RoutingPolicy::LeastOutstanding);
        assert!(c.api_keys.is_empty());
        assert!(c.cors_allow_origins.is_none());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.toml");
        std::fs::write(
            &f,
            "[service.model.api]\nport = 9100\nrouting_policy = \"round_robin\"\napi_keys = \"a, b\"\n",
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
    }
}
