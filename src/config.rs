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

use crate::http::HttpLimits;
use crate::registry::sql::{DbType, Secret, SqlConfig};

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
}

/// The `http_*` keys of a config file section (every service's section has them).
#[derive(Debug, Default, Clone, Copy)]
struct HttpKeys {
    header_timeout_secs: Option<u64>,
    idle_timeout_secs: Option<u64>,
    body_timeout_secs: Option<u64>,
    max_connections: Option<usize>,
}

/// The [`HttpKeys`] of a section struct (they all name them alike).
macro_rules! http_keys {
    ($file:expr) => {
        HttpKeys {
            header_timeout_secs: $file.http_header_timeout_secs,
            idle_timeout_secs: $file.http_idle_timeout_secs,
            body_timeout_secs: $file.http_body_timeout_secs,
            max_connections: $file.http_max_connections,
        }
    };
}

impl CommonServerArgs {
    /// The HTTP connection limits: flags and environment > the section's keys > defaults.
    fn http_limits(&self, file: HttpKeys) -> anyhow::Result<HttpLimits> {
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

#[cfg(test)]
mod http_limits_tests {
    use super::*;

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

/// Registry backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistryType {
    /// The embedded redb file (default).
    Embedded,
    /// A shared SQL database (MySQL/MariaDB or PostgreSQL; several controllers).
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
    /// The `--registry_db_*` options (boxed: they are many and rarely used).
    #[command(flatten)]
    pub registry_db: Box<RegistryDbArgs>,
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

/// `--registry_db_*`: where the shared SQL registry lives (`--registry_type database`).
#[derive(Debug, Clone, Args, Default)]
pub struct RegistryDbArgs {
    /// Database server of the shared registry: mysql (also MariaDB) or postgresql [default: mysql]
    #[arg(
        long = "registry_db_type",
        visible_alias = "registry-db-type",
        env = "CONTROLLER_REGISTRY_DB_TYPE"
    )]
    pub registry_db_type: Option<String>,
    /// Registry database URL, e.g. mysql://user:password@host:3306/dbgpt (overrides the other --registry_db_* flags' parts it contains)
    #[arg(
        long = "registry_db_url",
        visible_alias = "registry-db-url",
        env = "CONTROLLER_REGISTRY_DB_URL",
        hide_env_values = true
    )]
    pub registry_db_url: Option<String>,
    /// Registry database host (required with --registry_type database unless --registry_db_url)
    #[arg(
        long = "registry_db_host",
        visible_alias = "registry-db-host",
        env = "CONTROLLER_REGISTRY_DB_HOST"
    )]
    pub registry_db_host: Option<String>,
    /// Registry database port [default: 3306 for mysql, 5432 for postgresql]
    #[arg(
        long = "registry_db_port",
        visible_alias = "registry-db-port",
        env = "CONTROLLER_REGISTRY_DB_PORT"
    )]
    pub registry_db_port: Option<u16>,
    /// Registry database user [default: root]
    #[arg(
        long = "registry_db_user",
        visible_alias = "registry-db-user",
        env = "CONTROLLER_REGISTRY_DB_USER"
    )]
    pub registry_db_user: Option<String>,
    /// Registry database password (prefer CONTROLLER_REGISTRY_DB_PASSWORD or --registry_db_password_file: a flag shows in `ps`)
    #[arg(
        long = "registry_db_password",
        visible_alias = "registry-db-password",
        env = "CONTROLLER_REGISTRY_DB_PASSWORD",
        hide_env_values = true
    )]
    pub registry_db_password: Option<String>,
    /// File holding the registry database password (trailing newline ignored)
    #[arg(
        long = "registry_db_password_file",
        visible_alias = "registry-db-password-file",
        env = "CONTROLLER_REGISTRY_DB_PASSWORD_FILE"
    )]
    pub registry_db_password_file: Option<PathBuf>,
    /// Registry database (schema) name [default: dbgpt]
    #[arg(
        long = "registry_db_name",
        visible_alias = "registry-db-name",
        env = "CONTROLLER_REGISTRY_DB_NAME"
    )]
    pub registry_db_name: Option<String>,
    /// Connections to the registry database per controller [default: 5]
    #[arg(
        long = "registry_db_pool_size",
        visible_alias = "registry-db-pool-size",
        env = "CONTROLLER_REGISTRY_DB_POOL_SIZE"
    )]
    pub registry_db_pool_size: Option<u32>,
    /// Seconds to keep retrying an unreachable registry database at start-up [default: 0, fail at once]
    #[arg(
        long = "registry_db_wait",
        visible_alias = "registry-db-wait",
        env = "CONTROLLER_REGISTRY_DB_WAIT"
    )]
    pub registry_db_wait: Option<u64>,
}

/// The `[controller]` section of a config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControllerFile {
    host: Option<String>,
    port: Option<u16>,
    registry_type: Option<RegistryType>,
    registry_path: Option<PathBuf>,
    registry_db_type: Option<String>,
    registry_db_url: Option<String>,
    registry_db_host: Option<String>,
    registry_db_port: Option<u16>,
    registry_db_user: Option<String>,
    registry_db_password: Option<String>,
    registry_db_password_file: Option<PathBuf>,
    registry_db_name: Option<String>,
    registry_db_pool_size: Option<u32>,
    registry_db_wait: Option<u64>,
    heartbeat_interval_secs: Option<u64>,
    heartbeat_timeout_secs: Option<u64>,
    log_level: Option<String>,
    log_file: Option<PathBuf>,
    tracer_file: Option<String>,
    /// DB-GPT 0.7's `[service.model.<service>.trace]`.
    trace: Option<TraceSection>,
    http_header_timeout_secs: Option<u64>,
    http_idle_timeout_secs: Option<u64>,
    http_body_timeout_secs: Option<u64>,
    http_max_connections: Option<usize>,
}

/// Resolved controller configuration.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub host: String,
    pub port: u16,
    pub registry_type: RegistryType,
    pub registry_path: PathBuf,
    /// The shared database, with `--registry_type database`.
    pub registry_db: Option<SqlConfig>,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub log_level: Option<String>,
    pub log_file: PathBuf,
    pub tracer: TracerConfig,
    pub daemon: bool,
    /// HTTP connection limits.
    pub http: HttpLimits,
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

/// DB-GPT 0.7's `[trace]` table: at the top level of a config file, or inside a service's
/// section (`[service.model.controller.trace]`, which wins).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TraceSection {
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
fn resolve_tracer(
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
        let registry_db = match registry_type {
            RegistryType::Embedded => None,
            RegistryType::Database => Some(sql_config(&self, &file)?),
        };
        let http = self.common.http_limits(http_keys!(file))?;
        Ok(ControllerConfig {
            host: self.host.or(file.host).unwrap_or_else(|| "0.0.0.0".into()),
            port,
            registry_type,
            registry_db,
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
            tracer: resolve_tracer(
                self.common.config.as_deref(),
                self.common.tracer_file,
                file.tracer_file,
                file.trace,
                crate::tracer::CONTROLLER_FILE,
            )?,
            daemon: self.common.daemon,
            http,
        })
    }
}

/// The `--registry_db_*` options, resolved and checked.
fn sql_config(a: &ControllerArgs, f: &ControllerFile) -> anyhow::Result<SqlConfig> {
    let ty = a
        .registry_db
        .registry_db_type
        .clone()
        .or(f.registry_db_type.clone())
        .unwrap_or_else(|| "mysql".into());
    let db_type = DbType::parse(&ty).ok_or_else(|| {
        anyhow::anyhow!("--registry_db_type must be mysql or postgresql, not {ty:?}")
    })?;
    let password_file = a
        .registry_db
        .registry_db_password_file
        .clone()
        .or(f.registry_db_password_file.clone());
    let password = match (&a.registry_db.registry_db_password, &password_file) {
        (Some(p), _) => p.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
            .with_context(|| {
                format!(
                    "--registry_db_password_file: cannot read {}",
                    path.display()
                )
            })?,
        (None, None) => f.registry_db_password.clone().unwrap_or_default(),
    };
    let mut cfg = SqlConfig {
        db_type,
        host: a
            .registry_db
            .registry_db_host
            .clone()
            .or(f.registry_db_host.clone())
            .unwrap_or_default(),
        port: 0,
        user: a
            .registry_db
            .registry_db_user
            .clone()
            .or(f.registry_db_user.clone())
            .unwrap_or_else(|| "root".into()),
        password: Secret(password),
        database: a
            .registry_db
            .registry_db_name
            .clone()
            .or(f.registry_db_name.clone())
            .unwrap_or_else(|| "dbgpt".into()),
        pool_size: a
            .registry_db
            .registry_db_pool_size
            .or(f.registry_db_pool_size)
            .unwrap_or(5),
        wait: Duration::from_secs(
            a.registry_db
                .registry_db_wait
                .or(f.registry_db_wait)
                .unwrap_or(0),
        ),
    };
    if let Some(url) = a
        .registry_db
        .registry_db_url
        .clone()
        .or(f.registry_db_url.clone())
    {
        cfg = cfg.apply_url(&url)?;
    } else if cfg.host.trim().is_empty() {
        bail!(
            "--registry_db_host is required with --registry_type database (or give --registry_db_url)"
        );
    }
    if let Some(p) = a.registry_db.registry_db_port.or(f.registry_db_port) {
        if p == 0 {
            bail!("--registry_db_port must be between 1 and 65535");
        }
        cfg.port = p;
    }
    if cfg.port == 0 {
        cfg.port = cfg.db_type.default_port();
    }
    if cfg.pool_size == 0 {
        bail!("--registry_db_pool_size must be at least 1");
    }
    if cfg.database.is_empty() {
        bail!("--registry_db_name must not be empty");
    }
    Ok(cfg)
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
    fn registry_db_flags_url_and_password_file() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let args = ControllerArgs {
            registry_type: Some(RegistryType::Database),
            registry_db: Box::new(RegistryDbArgs {
                registry_db_type: Some("postgresql".into()),
                registry_db_host: Some("db.example".into()),
                registry_db_password_file: Some(pw),
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = args.resolve().unwrap().registry_db.unwrap();
        assert_eq!(c.db_type, DbType::Postgresql);
        assert_eq!(c.port, 5432);
        assert_eq!(c.password, Secret("s3cret".into()));
        assert_eq!(c.describe(), "postgresql://root@db.example:5432/dbgpt");
        assert!(!format!("{c:?}").contains("s3cret"));

        let args = ControllerArgs {
            registry_type: Some(RegistryType::Database),
            registry_db: Box::new(RegistryDbArgs {
                registry_db_url: Some("mysql://u%40x:p%3Aw@10.0.0.1:3307/reg".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = args.resolve().unwrap().registry_db.unwrap();
        assert_eq!(
            (c.db_type, c.host.as_str(), c.port, c.user.as_str()),
            (DbType::Mysql, "10.0.0.1", 3307, "u@x")
        );
        assert_eq!(c.password.0, "p:w");
        assert_eq!(c.database, "reg");
        assert!(!c.describe().contains("p:w"));

        for (args, flag) in [
            (
                ControllerArgs {
                    registry_type: Some(RegistryType::Database),
                    registry_db: Box::new(RegistryDbArgs {
                        registry_db_type: Some("oracle".into()),
                        registry_db_host: Some("h".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "--registry_db_type",
            ),
            (
                ControllerArgs {
                    registry_type: Some(RegistryType::Database),
                    ..Default::default()
                },
                "--registry_db_host",
            ),
            (
                ControllerArgs {
                    registry_type: Some(RegistryType::Database),
                    registry_db: Box::new(RegistryDbArgs {
                        registry_db_url: Some("nonsense".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "--registry_db_url",
            ),
        ] {
            let e = format!("{:#}", args.resolve().unwrap_err());
            assert!(e.contains(flag) && !e.contains('\n'), "{e}");
        }
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
}

// ---------------------------------------------------------------------------------------
// Worker
// ---------------------------------------------------------------------------------------

use crate::worker::spec::{ModelSpec, ModelType, WorkerType, default_model_type};

/// `dbgpt start worker` options. One model from flags, any number from `--config`.
#[derive(Debug, Clone, Args, Default)]
pub struct WorkerArgs {
    /// Model to serve (registered as <model_name>@<worker_type>)
    #[arg(long = "model_name", visible_alias = "model-name")]
    pub model_name: Option<String>,
    /// GGUF file (llama.cpp) or embedding-model directory (text2vec)
    #[arg(long = "model_path", visible_alias = "model-path")]
    pub model_path: Option<PathBuf>,
    /// Worker type [default: llm]
    #[arg(long = "worker_type", visible_alias = "worker-type", value_enum)]
    pub worker_type: Option<WorkerType>,
    /// Engine: llama.cpp, hf (local BERT embeddings) or proxy [default: llama.cpp for llm, hf for text2vec, proxy when only --proxy_api_base is given]
    #[arg(long = "model_type", visible_alias = "model-type")]
    pub model_type: Option<String>,
    /// Proxy: OpenAI-compatible upstream base URL, e.g. http://127.0.0.1:8080/v1 [default: $OPENAI_API_BASE for --model_type proxy]
    #[arg(long = "proxy_api_base", visible_alias = "proxy-api-base")]
    pub proxy_api_base: Option<String>,
    /// Proxy: DB-GPT's full chat URL (…/v1/chat/completions); used when --proxy_api_base is absent
    #[arg(long = "proxy_server_url", visible_alias = "proxy-server-url")]
    pub proxy_server_url: Option<String>,
    /// Proxy: upstream API key [default: $OPENAI_API_KEY]
    #[arg(
        long = "proxy_api_key",
        visible_alias = "proxy-api-key",
        hide_env_values = true
    )]
    pub proxy_api_key: Option<String>,
    /// Proxy: upstream model name [default: the model name]
    #[arg(long = "proxyllm_backend", visible_alias = "proxyllm-backend")]
    pub proxyllm_backend: Option<String>,
    /// llama.cpp: context size in tokens [default: min(model's, 4096)]
    #[arg(long = "context_length", visible_alias = "context-length")]
    pub context_length: Option<u32>,
    /// llama.cpp: CPU threads [default: physical cores]
    #[arg(long = "n_threads", visible_alias = "n-threads")]
    pub n_threads: Option<usize>,
    /// Address to bind [default: 0.0.0.0]
    #[arg(long, env = "WORKER_HOST")]
    pub host: Option<String>,
    /// HTTP port [default: 8001]
    #[arg(long, env = "WORKER_PORT")]
    pub port: Option<u16>,
    /// Controller URL(s), comma-separated; the first that answers is used [default: $CONTROLLER_ADDRESS or http://127.0.0.1:8000]
    #[arg(
        long = "controller_addr",
        visible_alias = "controller-addr",
        env = "CONTROLLER_ADDRESS"
    )]
    pub controller_addr: Option<String>,
    /// Address registered with the controller [default: --host if specific, else the default-route interface's address]
    #[arg(long = "worker_register_host", visible_alias = "worker-register-host")]
    pub worker_register_host: Option<String>,
    /// Seconds between heartbeats [default: 20]
    #[arg(long = "heartbeat_interval", visible_alias = "heartbeat-interval")]
    pub heartbeat_interval: Option<u64>,
    /// Concurrent requests per model; excess requests wait [default: 5]
    #[arg(
        long = "limit_model_concurrency",
        visible_alias = "limit-model-concurrency"
    )]
    pub limit_model_concurrency: Option<usize>,
    /// Do not register with a controller (serve the worker API only)
    #[arg(long = "no_register", visible_alias = "no-register")]
    pub no_register: bool,
    #[command(flatten)]
    pub common: CommonServerArgs,
}

/// The `[worker]` section of a config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkerFile {
    host: Option<String>,
    port: Option<u16>,
    controller_addr: Option<String>,
    worker_register_host: Option<String>,
    heartbeat_interval: Option<u64>,
    limit_model_concurrency: Option<usize>,
    register: Option<bool>,
    log_level: Option<String>,
    log_file: Option<PathBuf>,
    tracer_file: Option<String>,
    /// DB-GPT 0.7's `[service.model.<service>.trace]`.
    trace: Option<TraceSection>,
    http_header_timeout_secs: Option<u64>,
    http_idle_timeout_secs: Option<u64>,
    http_body_timeout_secs: Option<u64>,
    http_max_connections: Option<usize>,
}

/// One `[[models.llms]]` / `[[models.embeddings]]` entry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    name: String,
    #[serde(alias = "provider")]
    model_type: Option<String>,
    #[serde(alias = "model_path")]
    path: Option<PathBuf>,
    #[serde(alias = "proxy_api_base")]
    api_base: Option<String>,
    #[serde(alias = "proxy_api_key")]
    api_key: Option<String>,
    #[serde(alias = "proxyllm_backend")]
    backend: Option<String>,
    context_length: Option<u32>,
    n_threads: Option<usize>,
    concurrency: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelsFile {
    #[serde(default)]
    llms: Vec<ModelFile>,
    #[serde(default)]
    embeddings: Vec<ModelFile>,
}

/// Resolved worker configuration.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub host: String,
    pub port: u16,
    /// `None` = do not register.
    pub controller_addr: Option<String>,
    pub register_host: Option<String>,
    pub heartbeat_interval: Duration,
    pub concurrency: usize,
    pub models: Vec<ModelSpec>,
    pub log_level: Option<String>,
    pub log_file: PathBuf,
    pub tracer: TracerConfig,
    pub daemon: bool,
    /// HTTP connection limits.
    pub http: HttpLimits,
}

fn model_from_file(m: ModelFile, wt: WorkerType, file: &Path) -> anyhow::Result<ModelSpec> {
    let model_type = match &m.model_type {
        Some(t) => ModelType::parse(t, wt).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: model {:?}: model_type {t:?} is not supported for {}",
                file.display(),
                m.name,
                wt.as_str()
            )
        })?,
        None => default_model_type(
            wt,
            m.path.as_ref().and_then(|p| p.to_str()),
            m.api_base.is_some(),
        ),
    };
    // Relative model paths are relative to the config file.
    let path = m.path.map(|p| {
        if p.is_relative() {
            file.parent().unwrap_or(Path::new(".")).join(p)
        } else {
            p
        }
    });
    let spec = ModelSpec {
        name: m.name,
        worker_type: wt,
        model_type,
        path,
        api_base: m.api_base,
        api_key: m.api_key,
        backend: m.backend,
        context_length: m.context_length,
        n_threads: m.n_threads,
        concurrency: m.concurrency,
    };
    spec.validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    Ok(spec)
}

impl WorkerArgs {
    /// Applies file values and defaults, and checks the model definitions.
    pub fn resolve(self) -> anyhow::Result<WorkerConfig> {
        let (file, file_models): (WorkerFile, ModelsFile) = match &self.common.config {
            Some(p) => (load_section(p, "worker")?, load_section(p, "models")?),
            None => (WorkerFile::default(), ModelsFile::default()),
        };
        let mut models = Vec::new();
        if let Some(p) = &self.common.config {
            for m in file_models.llms {
                models.push(model_from_file(m, WorkerType::Llm, p)?);
            }
            for m in file_models.embeddings {
                models.push(model_from_file(m, WorkerType::Text2vec, p)?);
            }
        }
        if let Some(name) = self.model_name.clone() {
            let wt = self.worker_type.unwrap_or(WorkerType::Llm);
            let mut api_base = self.proxy_api_base.clone().or_else(|| {
                self.proxy_server_url.as_ref().map(|u| {
                    u.trim_end_matches('/')
                        .trim_end_matches("/chat/completions")
                        .trim_end_matches("/embeddings")
                        .to_string()
                })
            });
            let wants_proxy = self
                .model_type
                .as_deref()
                .and_then(|t| ModelType::parse(t, wt))
                == Some(ModelType::Proxy);
            if api_base.is_none() && wants_proxy {
                api_base = std::env::var("OPENAI_API_BASE")
                    .ok()
                    .filter(|b| !b.is_empty());
            }
            let model_type = match &self.model_type {
                Some(t) => ModelType::parse(t, wt).ok_or_else(|| {
                    anyhow::anyhow!("--model_type {t:?} is not supported for --worker_type {} (use llama.cpp, hf or proxy)", wt.as_str())
                })?,
                None => default_model_type(wt, self.model_path.as_ref().and_then(|p| p.to_str()), api_base.is_some()),
            };
            let spec = ModelSpec {
                name,
                worker_type: wt,
                model_type,
                path: self.model_path.clone(),
                api_base,
                api_key: self.proxy_api_key.clone(),
                backend: self.proxyllm_backend.clone(),
                context_length: self.context_length,
                n_threads: self.n_threads,
                concurrency: None,
            };
            spec.validate().map_err(|e| {
                anyhow::anyhow!(
                    "{}",
                    e.0.replace("model_path", "--model_path")
                        .replace("proxy_api_base", "--proxy_api_base")
                )
            })?;
            models.push(spec);
        } else if self.model_path.is_some() || self.proxy_api_base.is_some() {
            bail!("--model_name is required with --model_path / --proxy_api_base");
        }
        let mut seen = std::collections::HashSet::new();
        for m in &models {
            if !seen.insert(m.key()) {
                bail!("model {} is defined twice", m.key());
            }
        }
        let port = self.port.or(file.port).unwrap_or(8001);
        if port == 0 {
            bail!("--port must be between 1 and 65535");
        }
        let interval = self
            .heartbeat_interval
            .or(file.heartbeat_interval)
            .unwrap_or(20);
        if interval == 0 {
            bail!("--heartbeat_interval must be at least 1");
        }
        let concurrency = self
            .limit_model_concurrency
            .or(file.limit_model_concurrency)
            .unwrap_or(crate::worker::manager::DEFAULT_CONCURRENCY);
        if concurrency == 0 {
            bail!("--limit_model_concurrency must be at least 1");
        }
        let register = !self.no_register && file.register.unwrap_or(true);
        let controller_addr = if register {
            Some(
                self.controller_addr
                    .or(file.controller_addr)
                    .unwrap_or_else(|| "http://127.0.0.1:8000".into()),
            )
        } else {
            None
        };
        let http = self.common.http_limits(http_keys!(file))?;
        Ok(WorkerConfig {
            host: self.host.or(file.host).unwrap_or_else(|| "0.0.0.0".into()),
            port,
            controller_addr,
            register_host: self.worker_register_host.or(file.worker_register_host),
            heartbeat_interval: Duration::from_secs(interval),
            concurrency,
            models,
            log_level: self.common.log_level.or(file.log_level),
            log_file: resolve_log_file(
                self.common.log_file.or(file.log_file),
                &format!("dbgpt_model_worker_manager_{port}.log"),
            ),
            tracer: resolve_tracer(
                self.common.config.as_deref(),
                self.common.tracer_file,
                file.tracer_file,
                file.trace,
                crate::tracer::WORKER_FILE,
            )?,
            daemon: self.common.daemon,
            http,
        })
    }
}

#[cfg(test)]
mod worker_tests {
    use super::*;

    #[test]
    fn worker_from_flags_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("w.toml");
        std::fs::write(
            &f,
            "[worker]\nport = 9001\ncontroller_addr = \"http://c:1\"\n\n[[models.llms]]\nname = \"smollm2\"\npath = \"m.gguf\"\n\n[[models.llms]]\nname = \"gpt\"\nprovider = \"proxy/openai\"\napi_base = \"http://u/v1\"\n\n[[models.embeddings]]\nname = \"minilm\"\npath = \"/abs/minilm\"\n",
        )
        .unwrap();
        let args = WorkerArgs {
            common: CommonServerArgs {
                config: Some(f.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.port, 9001);
        assert_eq!(c.controller_addr.as_deref(), Some("http://c:1"));
        let keys: Vec<_> = c.models.iter().map(|m| m.key()).collect();
        assert_eq!(keys, ["smollm2@llm", "gpt@llm", "minilm@text2vec"]);
        assert_eq!(
            c.models[0].path.as_deref(),
            Some(dir.path().join("m.gguf").as_path())
        );
        assert_eq!(c.models[1].model_type, ModelType::Proxy);
        assert_eq!(c.models[2].model_type, ModelType::Bert);
    }

    #[test]
    fn worker_flag_errors_name_the_flag() {
        let a = WorkerArgs {
            model_name: Some("m".into()),
            ..Default::default()
        };
        let e = a.resolve().unwrap_err().to_string();
        assert!(e.contains("--model_path"), "{e}");
        let a = WorkerArgs {
            model_name: Some("m".into()),
            model_type: Some("tensorrt".into()),
            ..Default::default()
        };
        let e = a.resolve().unwrap_err().to_string();
        assert!(e.contains("--model_type"), "{e}");
        let a = WorkerArgs {
            model_name: Some("m".into()),
            model_path: Some("/x".into()),
            no_register: true,
            ..Default::default()
        };
        let c = a.resolve().unwrap();
        assert!(c.controller_addr.is_none());
    }
}

// ---------------------------------------------------------------------------------------
// API server
// ---------------------------------------------------------------------------------------

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
    /// HTTP serving threads; each owns its client connections and its pooled worker
    /// connections [default: the number of CPUs]
    #[arg(long = "threads", env = "APISERVER_THREADS")]
    pub threads: Option<usize>,
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
    threads: Option<usize>,
    cors_allow_origins: Option<String>,
    log_level: Option<String>,
    log_file: Option<PathBuf>,
    tracer_file: Option<String>,
    /// DB-GPT 0.7's `[service.model.<service>.trace]`.
    trace: Option<TraceSection>,
    http_header_timeout_secs: Option<u64>,
    http_idle_timeout_secs: Option<u64>,
    http_body_timeout_secs: Option<u64>,
    http_max_connections: Option<usize>,
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
    /// HTTP serving threads (each a single-threaded runtime).
    pub threads: usize,
    /// `None` = any origin.
    pub cors_allow_origins: Option<Vec<String>>,
    pub log_level: Option<String>,
    pub log_file: PathBuf,
    pub tracer: TracerConfig,
    pub daemon: bool,
    /// HTTP connection limits.
    pub http: HttpLimits,
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
        let threads = match self.threads.or(file.threads) {
            Some(n) if n == 0 || n > 256 => bail!("--threads must be between 1 and 256"),
            Some(n) => n,
            None => crate::http::default_threads(),
        };
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
        let http = self.common.http_limits(http_keys!(file))?;
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
            threads,
            cors_allow_origins,
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
        })
    }
}

#[cfg(test)]
mod apiserver_tests {
    use super::*;

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
}

#[cfg(test)]
mod tracer_config_tests {
    use super::*;

    #[test]
    fn tracer_file_flag_sections_and_off() {
        let log = crate::daemon::log_dir();
        let c = ControllerArgs::default().resolve().unwrap();
        assert_eq!(
            c.tracer,
            TracerConfig {
                file: Some(log.join("dbgpt_model_controller_tracer.jsonl")),
                root_operation_name: None
            }
        );
        let w = WorkerArgs::default().resolve().unwrap();
        assert_eq!(
            w.tracer.file,
            Some(log.join("dbgpt_model_worker_manager_tracer.jsonl"))
        );
        let a = ApiserverArgs::default().resolve().unwrap();
        assert_eq!(
            a.tracer.file,
            Some(log.join("dbgpt_model_apiserver_tracer.jsonl"))
        );

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        let with = |flag: Option<&str>| ControllerArgs {
            common: CommonServerArgs {
                config: Some(f.clone()),
                tracer_file: flag.map(str::to_string),
                ..Default::default()
            },
            ..Default::default()
        };
        // DB-GPT 0.7: top-level [trace], overridden by the service's own trace table,
        // overridden by the flat key, overridden by the flag.
        std::fs::write(
            &f,
            "[trace]\nfile = \"/t/top.jsonl\"\nroot_operation_name = \"Top\"\n",
        )
        .unwrap();
        let c = with(None).resolve().unwrap();
        assert_eq!(c.tracer.file, Some(PathBuf::from("/t/top.jsonl")));
        assert_eq!(c.tracer.root_operation_name.as_deref(), Some("Top"));
        std::fs::write(
            &f,
            "[trace]\nfile = \"/t/top.jsonl\"\n\n[service.model.controller.trace]\nfile = \"inner.jsonl\"\nroot_operation_name = \"Inner\"\n",
        )
        .unwrap();
        let c = with(None).resolve().unwrap();
        assert_eq!(c.tracer.file, Some(log.join("inner.jsonl")));
        assert_eq!(c.tracer.root_operation_name.as_deref(), Some("Inner"));
        std::fs::write(&f, "[controller]\ntracer_file = \"\"\n").unwrap();
        assert_eq!(with(None).resolve().unwrap().tracer.file, None);
        assert_eq!(
            with(Some("rel/x.jsonl")).resolve().unwrap().tracer.file,
            Some(PathBuf::from("rel/x.jsonl"))
        );
        assert_eq!(with(Some("")).resolve().unwrap().tracer.file, None);
        // Unknown [trace] keys are errors that name the key.
        std::fs::write(&f, "[trace]\nexporter = \"telemetry\"\n").unwrap();
        let e = format!("{:#}", with(None).resolve().unwrap_err());
        assert!(e.contains("exporter"), "{e}");
    }
}

#[cfg(test)]
mod packaged_config_tests {
    use super::*;

    /// The config files the packages install parse with this build, and the worker
    /// example's commented model entries are valid once uncommented.
    #[test]
    fn shipped_configs_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let etc = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/etc");
        let with = |f: &Path| CommonServerArgs {
            config: Some(f.to_path_buf()),
            ..Default::default()
        };
        ControllerArgs {
            common: with(&etc.join("controller.toml")),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        ApiserverArgs {
            common: with(&etc.join("apiserver.toml")),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let w = WorkerArgs {
            common: with(&etc.join("worker-example.toml")),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert!(
            w.models.is_empty(),
            "the example serves nothing until edited"
        );
        let text = std::fs::read_to_string(etc.join("worker-example.toml")).unwrap();
        let uncommented: String = text
            .lines()
            .map(|l| {
                l.strip_prefix('#')
                    .filter(|r| r.starts_with('[') || r.contains(" = "))
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n");
        let f = dir.path().join("w.toml");
        std::fs::write(&f, uncommented).unwrap();
        let w = WorkerArgs {
            common: with(&f),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let keys: Vec<String> = w.models.iter().map(|m| m.key()).collect();
        assert_eq!(
            keys,
            [
                "smollm2-135m-instruct@llm",
                "gpt-4o-mini@llm",
                "all-minilm@text2vec"
            ]
        );
    }
}
