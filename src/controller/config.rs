//! The controller's configuration: `dbgpt start controller` flags, the `[controller]` section
//! of a config file (or DB-GPT 0.7's `[service.model.controller]`), and the resolved
//! [`ControllerConfig`], including the shared SQL registry's `--registry_db_*` options.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde::Deserialize;

use crate::config::{
    CommonServerArgs, TraceSection, TracerConfig, load_section, resolve_log_file, resolve_tracer,
};
use crate::registry::sql::{DbType, Secret, SqlConfig};

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
    otlp_endpoint: Option<String>,
    otlp_batch_delay_ms: Option<u64>,
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
    pub http: crate::http::HttpLimits,
    /// Where and how `/metrics` is served.
    pub metrics: crate::telemetry::metrics::MetricsConfig,
    /// OTLP span export (`None`: off).
    pub otlp: Option<crate::telemetry::otlp::OtlpConfig>,
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
        let http = self.common.http_limits(crate::config::http_keys!(file))?;
        let metrics = self.common.metrics()?;
        let otlp = self
            .common
            .otlp(crate::config::otlp_keys!(file), "dbgpt-controller")?;
        Ok(ControllerConfig {
            metrics,
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
            otlp,
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

    /// The config file the packages install parses with this build.
    #[test]
    fn shipped_config_resolves() {
        let etc = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/etc");
        ControllerArgs {
            common: CommonServerArgs {
                config: Some(etc.join("controller.toml")),
                ..Default::default()
            },
            ..Default::default()
        }
        .resolve()
        .unwrap();
    }
}
