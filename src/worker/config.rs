//! The worker's configuration: `dbgpt start worker` flags (one model), the `[worker]` section
//! and `[[models.llms]]` / `[[models.embeddings]]` / `[[models.rerankers]]` entries of a
//! config file (any number of
//! models, checked by [`super::spec`]), and the resolved [`WorkerConfig`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use serde::Deserialize;

use super::backends::ProxyTimeouts;
use super::spec::{LlamaSpec, ModelSpec, ModelType, default_model_type};
use crate::config::{
    CommonServerArgs, TraceSection, TracerConfig, load_section, resolve_log_file, resolve_tracer,
};
use crate::wire::worker::WorkerType;

/// `dbgpt start worker` options. One model from flags, any number from `--config`.
#[derive(Debug, Clone, Args, Default)]
pub struct WorkerArgs {
    /// Model to serve (registered as <model_name>@<worker_type>)
    #[arg(long = "model_name", visible_alias = "model-name")]
    pub model_name: Option<String>,
    /// GGUF file (llama.cpp), embedding-model directory (text2vec) or cross-encoder directory (reranker)
    #[arg(long = "model_path", visible_alias = "model-path")]
    pub model_path: Option<PathBuf>,
    /// Worker type [default: llm]
    #[arg(long = "worker_type", visible_alias = "worker-type", value_enum)]
    pub worker_type: Option<WorkerType>,
    /// Engine: llama.cpp, hf (local BERT embeddings or cross-encoder) or proxy [default: llama.cpp for llm, hf for text2vec and reranker, proxy when only --proxy_api_base is given]
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
    /// llama.cpp: a Jinja chat template file (or a Hugging Face tokenizer_config.json) for
    /// the OpenAI routes, instead of the GGUF's own; it receives `tools`, so a model whose
    /// own template cannot describe tools can be given one that does
    #[arg(long = "chat_template", visible_alias = "chat-template")]
    pub chat_template: Option<PathBuf>,
    /// llama.cpp: CPU threads [default: physical cores]
    #[arg(long = "n_threads", visible_alias = "n-threads")]
    pub n_threads: Option<usize>,
    /// llama.cpp: sequence slots decoded together in one batch (continuous batching) [default: 4]
    #[arg(long = "parallel", visible_alias = "n_parallel")]
    pub parallel: Option<usize>,
    /// llama.cpp: total KV-cache tokens, split evenly among the --parallel slots (each slot's window is ctx_size / parallel) [default: --context_length × --parallel]
    #[arg(long = "ctx_size", visible_alias = "ctx-size")]
    pub ctx_size: Option<u32>,
    /// llama.cpp: most tokens per decode step; prompts are read in chunks within it so running streams keep flowing [default: 512]
    #[arg(long = "batch_size", visible_alias = "batch-size")]
    pub batch_size: Option<u32>,
    /// llama.cpp: requests that may wait for a free slot; more get HTTP 503 with Retry-After [default: 32]
    #[arg(long = "max_queue", visible_alias = "max-queue")]
    pub max_queue: Option<usize>,
    /// llama.cpp: seconds a request may wait for a free slot before it gets HTTP 503 with Retry-After [default: 20]
    #[arg(long = "queue_timeout", visible_alias = "queue-timeout")]
    pub queue_timeout: Option<f64>,
    /// text2vec and reranker (hf): texts or (query, document) pairs per forward pass at most;
    /// concurrent requests are merged up to it [default: 32]
    #[arg(long = "embed_max_batch", visible_alias = "embed-max-batch")]
    pub embed_max_batch: Option<usize>,
    /// text2vec and reranker (hf): milliseconds a forward pass waits for more requests to
    /// merge, only while requests are arriving concurrently; 0 never waits [default: 2]
    #[arg(long = "embed_batch_wait_ms", visible_alias = "embed-batch-wait-ms")]
    pub embed_batch_wait_ms: Option<u64>,
    /// text2vec and reranker (hf): forward passes run at once, one thread each; concurrent
    /// requests are spread over them [default: the CPU count, at most 4]
    #[arg(long = "embed_threads", visible_alias = "embed-threads")]
    pub embed_threads: Option<usize>,
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
    /// Proxy: seconds to connect to an upstream [default: 10]
    #[arg(
        long = "proxy_connect_timeout_secs",
        visible_alias = "proxy-connect-timeout-secs",
        env = "WORKER_PROXY_CONNECT_TIMEOUT_SECS"
    )]
    pub proxy_connect_timeout_secs: Option<f64>,
    /// Proxy: seconds an upstream may take to start answering (response head and first chunk) [default: 120]
    #[arg(
        long = "proxy_first_byte_timeout_secs",
        visible_alias = "proxy-first-byte-timeout-secs",
        env = "WORKER_PROXY_FIRST_BYTE_TIMEOUT_SECS"
    )]
    pub proxy_first_byte_timeout_secs: Option<f64>,
    /// Proxy: seconds an upstream's stream may stay silent between two chunks [default: 60]
    #[arg(
        long = "proxy_chunk_timeout_secs",
        visible_alias = "proxy-chunk-timeout-secs",
        env = "WORKER_PROXY_CHUNK_TIMEOUT_SECS"
    )]
    pub proxy_chunk_timeout_secs: Option<f64>,
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
    proxy_connect_timeout_secs: Option<f64>,
    proxy_first_byte_timeout_secs: Option<f64>,
    proxy_chunk_timeout_secs: Option<f64>,
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
    otlp_endpoint: Option<String>,
    otlp_batch_delay_ms: Option<u64>,
}

/// One `[[models.llms]]` / `[[models.embeddings]]` / `[[models.rerankers]]` entry.
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
    chat_template: Option<PathBuf>,
    n_threads: Option<usize>,
    concurrency: Option<usize>,
    /// llama.cpp scheduler settings (see `LlamaSpec`).
    #[serde(alias = "n_parallel")]
    parallel: Option<usize>,
    #[serde(alias = "n_ctx")]
    ctx_size: Option<u32>,
    #[serde(alias = "n_batch")]
    batch_size: Option<u32>,
    max_queue: Option<usize>,
    #[serde(alias = "queue_timeout")]
    queue_timeout_secs: Option<f64>,
    embed_max_batch: Option<usize>,
    embed_batch_wait_ms: Option<u64>,
    embed_threads: Option<usize>,
    /// Proxy: this model's own upstream timeouts (else the worker's).
    #[serde(alias = "proxy_connect_timeout_secs")]
    connect_timeout_secs: Option<f64>,
    #[serde(alias = "proxy_first_byte_timeout_secs")]
    first_byte_timeout_secs: Option<f64>,
    #[serde(alias = "proxy_chunk_timeout_secs")]
    chunk_timeout_secs: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelsFile {
    #[serde(default)]
    llms: Vec<ModelFile>,
    #[serde(default)]
    embeddings: Vec<ModelFile>,
    #[serde(default)]
    rerankers: Vec<ModelFile>,
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
    /// Upstream timeouts of proxy models without their own.
    pub proxy_timeouts: ProxyTimeouts,
    pub models: Vec<ModelSpec>,
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

/// A timeout in seconds: positive, finite, at most a day. `name` is the flag or key.
fn timeout_secs(v: Option<f64>, default: Duration, name: &str) -> anyhow::Result<Duration> {
    match v {
        None => Ok(default),
        Some(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(Duration::from_secs_f64(v)),
        Some(_) => bail!("{name} must be a number of seconds between 0 and 86400"),
    }
}

/// `base` with the timeouts given in seconds replaced; `names` are the three flags or keys.
fn timeouts_over(
    base: ProxyTimeouts,
    [connect, first_byte, between_chunks]: [Option<f64>; 3],
    names: [&str; 3],
) -> anyhow::Result<ProxyTimeouts> {
    Ok(ProxyTimeouts {
        connect: timeout_secs(connect, base.connect, names[0])?,
        first_byte: timeout_secs(first_byte, base.first_byte, names[1])?,
        between_chunks: timeout_secs(between_chunks, base.between_chunks, names[2])?,
    })
}

fn model_from_file(
    m: ModelFile,
    wt: WorkerType,
    file: &Path,
    worker_timeouts: ProxyTimeouts,
) -> anyhow::Result<ModelSpec> {
    let own = [
        m.connect_timeout_secs,
        m.first_byte_timeout_secs,
        m.chunk_timeout_secs,
    ];
    let proxy_timeouts = if own.iter().all(Option::is_none) {
        None
    } else {
        let names = [
            "connect_timeout_secs",
            "first_byte_timeout_secs",
            "chunk_timeout_secs",
        ];
        Some(
            timeouts_over(worker_timeouts, own, names)
                .map_err(|e| anyhow::anyhow!("{}: model {:?}: {e}", file.display(), m.name))?,
        )
    };
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
    let relative = |p: PathBuf| {
        if p.is_relative() {
            file.parent().unwrap_or(Path::new(".")).join(p)
        } else {
            p
        }
    };
    let path = m.path.map(relative);
    let chat_template = m.chat_template.map(relative);
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
        proxy_timeouts,
        chat_template,
        llama: LlamaSpec {
            parallel: m.parallel,
            ctx_size: m.ctx_size,
            batch_size: m.batch_size,
            max_queue: m.max_queue,
            queue_timeout_secs: m.queue_timeout_secs,
        },
        embed_max_batch: m.embed_max_batch,
        embed_batch_wait_ms: m.embed_batch_wait_ms,
        embed_threads: m.embed_threads,
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
        let proxy_timeouts = timeouts_over(
            ProxyTimeouts::default(),
            [
                self.proxy_connect_timeout_secs
                    .or(file.proxy_connect_timeout_secs),
                self.proxy_first_byte_timeout_secs
                    .or(file.proxy_first_byte_timeout_secs),
                self.proxy_chunk_timeout_secs
                    .or(file.proxy_chunk_timeout_secs),
            ],
            [
                "--proxy_connect_timeout_secs",
                "--proxy_first_byte_timeout_secs",
                "--proxy_chunk_timeout_secs",
            ],
        )?;
        let mut models = Vec::new();
        if let Some(p) = &self.common.config {
            for m in file_models.llms {
                models.push(model_from_file(m, WorkerType::Llm, p, proxy_timeouts)?);
            }
            for m in file_models.embeddings {
                models.push(model_from_file(m, WorkerType::Text2vec, p, proxy_timeouts)?);
            }
            for m in file_models.rerankers {
                models.push(model_from_file(m, WorkerType::Reranker, p, proxy_timeouts)?);
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
                proxy_timeouts: None,
                chat_template: self.chat_template.clone(),
                llama: LlamaSpec {
                    parallel: self.parallel,
                    ctx_size: self.ctx_size,
                    batch_size: self.batch_size,
                    max_queue: self.max_queue,
                    queue_timeout_secs: self.queue_timeout,
                },
                embed_max_batch: self.embed_max_batch,
                embed_batch_wait_ms: self.embed_batch_wait_ms,
                embed_threads: self.embed_threads,
            };
            spec.validate().map_err(|e| {
                anyhow::anyhow!(
                    "{}",
                    e.0.replace("model_path", "--model_path")
                        .replace("proxy_api_base", "--proxy_api_base")
                        .replace("parallel must", "--parallel must")
                        .replace("ctx_size ", "--ctx_size ")
                        .replace("batch_size must", "--batch_size must")
                        .replace("queue_timeout must", "--queue_timeout must")
                        .replace("embed_max_batch", "--embed_max_batch")
                        .replace("embed_batch_wait_ms", "--embed_batch_wait_ms")
                        .replace("embed_threads", "--embed_threads")
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
            .unwrap_or(super::manager::DEFAULT_CONCURRENCY);
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
        let http = self.common.http_limits(crate::config::http_keys!(file))?;
        let metrics = self.common.metrics()?;
        let otlp = self
            .common
            .otlp(crate::config::otlp_keys!(file), "dbgpt-worker")?;
        Ok(WorkerConfig {
            metrics,
            host: self.host.or(file.host).unwrap_or_else(|| "0.0.0.0".into()),
            port,
            controller_addr,
            register_host: self.worker_register_host.or(file.worker_register_host),
            heartbeat_interval: Duration::from_secs(interval),
            concurrency,
            proxy_timeouts,
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
            otlp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `text` as a worker config file in a temporary directory (kept while the guard lives).
    fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("w.toml");
        std::fs::write(&f, text).unwrap();
        (dir, f)
    }

    #[test]
    fn worker_from_flags_and_file() {
        let (dir, f) = config_file(
            "[worker]\nport = 9001\ncontroller_addr = \"http://c:1\"\n\n[[models.llms]]\nname = \"smollm2\"\npath = \"m.gguf\"\n\n[[models.llms]]\nname = \"gpt\"\nprovider = \"proxy/openai\"\napi_base = \"http://u/v1\"\n\n[[models.embeddings]]\nname = \"minilm\"\npath = \"/abs/minilm\"\n",
        );
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

    /// Batching of encoder models: per-model keys and flags, bounds and misuse name the
    /// key or flag.
    #[test]
    fn embed_batching_from_file_and_flags() {
        let (_dir, f) = config_file(
            "[[models.embeddings]]\nname = \"minilm\"\npath = \"/m\"\nembed_max_batch = 8\nembed_batch_wait_ms = 0\nembed_threads = 2\n\n[[models.rerankers]]\nname = \"ce\"\npath = \"/r\"\n",
        );
        let args = WorkerArgs {
            common: CommonServerArgs {
                config: Some(f.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        let b = c.models[0].batch_config();
        assert_eq!((b.max_batch, b.max_wait, b.threads), (8, Duration::ZERO, 2));
        assert_eq!(
            c.models[1].batch_config(),
            crate::worker::backends::BatchConfig::default()
        );

        let flags = |wt, batch, wait| WorkerArgs {
            model_name: Some("m".into()),
            model_path: Some("/x".into()),
            worker_type: Some(wt),
            embed_max_batch: batch,
            embed_batch_wait_ms: wait,
            ..Default::default()
        };
        let c = flags(WorkerType::Text2vec, Some(64), Some(5))
            .resolve()
            .unwrap();
        let b = c.models[0].batch_config();
        assert_eq!((b.max_batch, b.max_wait), (64, Duration::from_millis(5)));
        for (args, flag) in [
            (
                flags(WorkerType::Text2vec, Some(0), None),
                "--embed_max_batch",
            ),
            (
                flags(WorkerType::Reranker, Some(5000), None),
                "--embed_max_batch",
            ),
            (
                flags(WorkerType::Text2vec, None, Some(60_000)),
                "--embed_batch_wait_ms",
            ),
            (flags(WorkerType::Llm, Some(8), None), "--embed_max_batch"),
        ] {
            let e = args.resolve().unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
        std::fs::write(
            &f,
            "[[models.llms]]\nname = \"m\"\npath = \"/m.gguf\"\nembed_batch_wait_ms = 1\n",
        )
        .unwrap();
        let args = WorkerArgs {
            common: CommonServerArgs {
                config: Some(f),
                ..Default::default()
            },
            ..Default::default()
        };
        let e = args.resolve().unwrap_err().to_string();
        assert!(e.contains("embed_batch_wait_ms"), "{e}");
    }

    /// Upstream timeouts: flags over the `[worker]` section over the defaults, and a
    /// model's own keys over the worker's; bad values name the flag or key.
    #[test]
    fn proxy_timeouts_from_flags_file_and_model() {
        let (_dir, f) = config_file(
            "[worker]\nproxy_first_byte_timeout_secs = 30\nproxy_chunk_timeout_secs = 5\n\n[[models.llms]]\nname = \"slow\"\nmodel_type = \"proxy\"\napi_base = \"http://u/v1\"\nchunk_timeout_secs = 0.5\n\n[[models.llms]]\nname = \"plain\"\nmodel_type = \"proxy\"\napi_base = \"http://u/v1\"\n",
        );
        let args = |connect: Option<f64>| WorkerArgs {
            proxy_connect_timeout_secs: connect,
            proxy_first_byte_timeout_secs: Some(2.0),
            common: CommonServerArgs {
                config: Some(f.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = args(None).resolve().unwrap();
        let worker = ProxyTimeouts {
            connect: Duration::from_secs(10),
            first_byte: Duration::from_secs(2),
            between_chunks: Duration::from_secs(5),
        };
        assert_eq!(c.proxy_timeouts, worker);
        assert_eq!(
            c.models[0].proxy_timeouts,
            Some(ProxyTimeouts {
                between_chunks: Duration::from_millis(500),
                ..worker
            })
        );
        assert_eq!(c.models[1].proxy_timeouts, None, "the worker's apply");
        let e = args(Some(0.0)).resolve().unwrap_err().to_string();
        assert!(e.contains("--proxy_connect_timeout_secs"), "{e}");
        std::fs::write(
            &f,
            "[[models.llms]]\nname = \"m\"\nmodel_type = \"proxy\"\napi_base = \"http://u/v1\"\nfirst_byte_timeout_secs = -1\n",
        )
        .unwrap();
        let e = args(None).resolve().unwrap_err().to_string();
        assert!(
            e.contains("first_byte_timeout_secs") && e.contains("\"m\""),
            "{e}"
        );
    }

    #[test]
    fn tracer_file_default() {
        let w = WorkerArgs::default().resolve().unwrap();
        assert_eq!(
            w.tracer.file,
            Some(crate::daemon::log_dir().join("dbgpt_model_worker_manager_tracer.jsonl"))
        );
    }

    /// The worker example config the packages install parses with this build, and its
    /// commented model entries are valid once uncommented.
    #[test]
    fn shipped_example_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let etc = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/etc");
        let with = |f: &Path| CommonServerArgs {
            config: Some(f.to_path_buf()),
            ..Default::default()
        };
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
