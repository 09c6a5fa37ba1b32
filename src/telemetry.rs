//! Logging: one `tracing` subscriber per process, writing to stderr (the journal under
//! systemd, the log file under `--daemon`). The level comes from `--log_level`,
//! `DBGPT_LOG_LEVEL` or `RUST_LOG`, and accepts DB-GPT's Python level names too.

use tracing_subscriber::EnvFilter;

/// Maps DB-GPT/Python level names to tracing's.
pub fn normalize_level(level: &str) -> String {
    match level.trim().to_ascii_lowercase().as_str() {
        "fatal" | "critical" => "error".into(),
        "warning" => "warn".into(),
        "notset" => "trace".into(),
        other => other.into(),
    }
}

/// Installs the global subscriber (call once, after daemonizing).
pub fn init(level: Option<&str>) -> anyhow::Result<()> {
    // llama.cpp logs ~100 INFO lines per model load: keep them at warn unless asked.
    let quiet = ",llama-cpp-2=warn,llama_cpp_2=warn";
    let filter = match level {
        Some(l) => EnvFilter::try_new(format!("{}{quiet}", normalize_level(l)))
            .map_err(|e| anyhow::anyhow!("invalid --log_level {l:?}: {e}"))?,
        None => EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new(format!("info{quiet}"))),
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install logger: {e}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn python_level_names() {
        assert_eq!(super::normalize_level("WARNING"), "warn");
        assert_eq!(super::normalize_level("FATAL"), "error");
        assert_eq!(super::normalize_level("INFO"), "info");
    }
}
