//! Logs, and Prometheus metrics ([`metrics`]).
//!
//! Logging: one `tracing` subscriber per process, writing to stderr (the journal under
//! systemd, the log file under `--daemon`). The level comes from `--log_level`,
//! `DBGPT_LOG_LEVEL` or `RUST_LOG`, and accepts DB-GPT's Python level names too. With
//! `--otlp_endpoint` the same subscriber also exports the request spans of [`otlp`].
//!
//! The text formatter writes `%`-fields and messages as they are, so client input (model
//! names, hosts, paths, upstream messages…) goes into a log line through [`Escaped`], which
//! keeps a newline in a model name from starting a forged line.

pub mod metrics;

use std::fmt::{self, Write as _};

use tracing_subscriber::EnvFilter;

pub mod otlp;

/// Client input in a log line: `Display`s the value with control characters escaped the
/// way `str::escape_debug` does (`\n`, `\r`, `\t`, `\u{1b}`…, and the Unicode line and
/// paragraph separators), everything else as is. Use it as `%Escaped(&value)`.
pub struct Escaped<T>(pub T);

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(EscapeControls(f), "{}", self.0)
    }
}

/// Writes through to the formatter, escaping control characters on the way.
struct EscapeControls<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl fmt::Write for EscapeControls<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, c) in s.char_indices() {
            if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
                self.0.write_str(&s[plain..i])?;
                write!(self.0, "{}", c.escape_debug())?;
                plain = i + c.len_utf8();
            }
        }
        self.0.write_str(&s[plain..])
    }
}

/// Maps DB-GPT/Python level names to tracing's.
pub fn normalize_level(level: &str) -> String {
    match level.trim().to_ascii_lowercase().as_str() {
        "fatal" | "critical" => "error".into(),
        "warning" => "warn".into(),
        "notset" => "trace".into(),
        other => other.into(),
    }
}

/// Installs the global subscriber (call once, after daemonizing), exporting spans over
/// OTLP when `otlp` is given: the returned handle flushes them at the daemon's stop.
pub fn init(
    level: Option<&str>,
    otlp: Option<&otlp::OtlpConfig>,
) -> anyhow::Result<otlp::Exporting> {
    // llama.cpp logs ~100 INFO lines per model load: keep them at warn unless asked.
    let quiet = ",llama-cpp-2=warn,llama_cpp_2=warn";
    let filter = match level {
        Some(l) => EnvFilter::try_new(format!("{}{quiet}", normalize_level(l)))
            .map_err(|e| anyhow::anyhow!("invalid --log_level {l:?}: {e}"))?,
        None => EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new(format!("info{quiet}"))),
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let Some(cfg) = otlp else {
        // Without export, exactly the plain logger (one global filter, no per-layer state).
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            // A log line that cannot be written (stderr is a closed pipe) is dropped: the
            // default reports it with `eprintln!`, which panics on that same closed pipe
            // and took the task that logged with it (a SIGTERM handler: the daemon then
            // never stopped).
            .log_internal_errors(false)
            .with_ansi(ansi)
            .with_target(false)
            .try_init()
            .map_err(|e| anyhow::anyhow!("cannot install logger: {e}"))?;
        return Ok(otlp::Exporting::off());
    };
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    // The exported spans are not log lines.
    let filter = filter.add_directive(
        format!("{}=off", otlp::TARGET)
            .parse()
            .map_err(|e| anyhow::anyhow!("log filter: {e}"))?,
    );
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .with_ansi(ansi)
        .with_target(false)
        .with_filter(filter);
    let registry = tracing_subscriber::registry().with(logs);
    let (spans, exporting) = otlp::layer(cfg)?;
    registry
        .with(spans)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install logger: {e}"))?;
    tracing::info!(endpoint = %cfg.endpoint, service = cfg.service_name, "exporting traces over OTLP/HTTP");
    Ok(exporting)
}

#[cfg(test)]
mod tests {
    #[test]
    fn escaped_keeps_client_input_on_one_line() {
        use super::Escaped;
        assert_eq!(
            Escaped("a\nFORGED\r\tb\u{1b}[31m\u{85}\u{2028}é 模 \\n").to_string(),
            r"a\nFORGED\r\tb\u{1b}[31m\u{85}\u{2028}é 模 \n"
        );
        assert_eq!(Escaped("qwen2.5-7b@llm").to_string(), "qwen2.5-7b@llm");
        let key = crate::wire::controller::InstanceKey {
            model_name: "m\n".into(),
            host: "h".into(),
            port: 1,
        };
        assert_eq!(Escaped(&key).to_string(), r"m\n(h:1)");
    }

    #[test]
    fn python_level_names() {
        assert_eq!(super::normalize_level("WARNING"), "warn");
        assert_eq!(super::normalize_level("FATAL"), "error");
        assert_eq!(super::normalize_level("INFO"), "info");
    }
}
