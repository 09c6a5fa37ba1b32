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

use anyhow::Context;
use clap::Args;
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
