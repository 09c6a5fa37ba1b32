//! What a worker can host: a [`ModelSpec`] names a model, its worker type (`llm`,
//! `text2vec`, `reranker`) and its engine (`llama.cpp`, local BERT embeddings or
//! cross-encoders, or an OpenAI-compatible `proxy`), and [`ModelSpec::load`] turns it into a
//! running [`Engine`]. A `text2vec` model whose directory holds a cross-encoder is loaded as
//! a reranker (DB-GPT 0.5's way of serving one).
//!
//! Specs come from command-line flags, from a TOML file (`[[models.llms]]` /
//! `[[models.embeddings]]` / `[[models.rerankers]]` in the shape of DB-GPT 0.7), or from the `params` of a
//! `models/startup` request; all three are validated here with errors that name the field.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tracing::info;

use crate::telemetry::Escaped;

use super::backends::{
    BackendError, BatchConfig, EmbeddingBackend, LlmBackend, RerankBackend,
    proxy::{OpenAiProxyBackend, OpenAiProxyConfig, ProxyTimeouts},
};

use crate::wire::worker::WorkerType;

/// Inference engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    /// GGUF chat model through llama.cpp.
    LlamaCpp,
    /// BERT-family sentence embeddings or cross-encoders through candle.
    Bert,
    /// Any OpenAI-compatible HTTP upstream.
    Proxy,
}

impl ModelType {
    /// Accepts DB-GPT's names (`llama.cpp`, `proxy`, `huggingface`/`hf`) and 0.7's
    /// providers (`proxy/openai`, `llama.cpp.server`…) for the given worker type.
    pub fn parse(s: &str, worker_type: WorkerType) -> Option<Self> {
        let s = s.trim().to_ascii_lowercase();
        if s == "proxy"
            || s.starts_with("proxy/")
            || s == "openai"
            || s == "vllm"
            || s == "ollama"
            || s == "llama.cpp.server"
        {
            return Some(ModelType::Proxy);
        }
        match (worker_type, s.as_str()) {
            (WorkerType::Llm, "llama.cpp" | "llama_cpp" | "llamacpp" | "gguf") => {
                Some(ModelType::LlamaCpp)
            }
            (
                WorkerType::Text2vec | WorkerType::Reranker,
                "hf" | "huggingface" | "bert" | "text2vec" | "candle" | "local",
            ) => Some(ModelType::Bert),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::LlamaCpp => "llama.cpp",
            ModelType::Bert => "hf",
            ModelType::Proxy => "proxy",
        }
    }
}

/// A model a worker hosts.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub worker_type: WorkerType,
    pub model_type: ModelType,
    /// GGUF file or embedding-model directory (local engines).
    pub path: Option<PathBuf>,
    /// Proxy: upstream base URL such as `http://127.0.0.1:8080/v1`.
    pub api_base: Option<String>,
    /// Proxy: API key (else `OPENAI_API_KEY`).
    pub api_key: Option<String>,
    /// Proxy: upstream model name.
    pub backend: Option<String>,
    /// llama.cpp context size.
    pub context_length: Option<u32>,
    /// llama.cpp threads.
    pub n_threads: Option<usize>,
    /// Concurrent requests for this model (excess requests wait).
    pub concurrency: Option<usize>,
    /// Proxy: this model's own upstream timeouts (`None`: the worker's).
    pub proxy_timeouts: Option<ProxyTimeouts>,
    /// llama.cpp: a Jinja chat template file (or a Hugging Face `tokenizer_config.json`)
    /// that renders the prompts of the OpenAI routes instead of the GGUF's own template,
    /// tools included.
    pub chat_template: Option<PathBuf>,
    /// Local text2vec and reranker models: texts (pairs) per forward pass at most, merged
    /// from concurrent requests (`embed_max_batch`).
    pub embed_max_batch: Option<usize>,
    /// Local text2vec and reranker models: milliseconds a forward pass waits for more
    /// requests under concurrent load (`embed_batch_wait_ms`).
    pub embed_batch_wait_ms: Option<u64>,
    /// Local text2vec and reranker models: forward passes run at once, one thread each
    /// (`embed_threads`).
    pub embed_threads: Option<usize>,
    /// llama.cpp: the scheduler's slots, batch and wait queue.
    pub llama: LlamaSpec,
}

/// A llama.cpp model's scheduler settings (`None`: the default; see
/// `backends::llama::LlamaCppConfig`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LlamaSpec {
    /// Sequence slots decoded together (`--parallel`) [default: the model's `concurrency`
    /// when set, else 4].
    pub parallel: Option<usize>,
    /// Total KV-cache tokens, split among the slots (`--ctx_size`).
    pub ctx_size: Option<u32>,
    /// Most tokens per decode step (`--batch_size`).
    pub batch_size: Option<u32>,
    /// Requests that may wait for a slot (`--max_queue`).
    pub max_queue: Option<usize>,
    /// Longest wait for a slot, in seconds (`--queue_timeout`).
    pub queue_timeout_secs: Option<f64>,
}

impl LlamaSpec {
    /// Checks the values; errors name the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        #[cfg(feature = "local-models")]
        use super::backends::llama::{MAX_PARALLEL, MIN_SLOT_CONTEXT};
        #[cfg(not(feature = "local-models"))]
        const MAX_PARALLEL: usize = 64;
        #[cfg(not(feature = "local-models"))]
        const MIN_SLOT_CONTEXT: u32 = 16;
        if let Some(p) = self.parallel
            && !(1..=MAX_PARALLEL).contains(&p)
        {
            return Err(SpecError(format!(
                "parallel must be between 1 and {MAX_PARALLEL}, got {p}"
            )));
        }
        if let Some(c) = self.ctx_size {
            let slots = self.parallel.unwrap_or(1) as u32;
            if c / slots.max(1) < MIN_SLOT_CONTEXT {
                return Err(SpecError(format!(
                    "ctx_size {c} leaves fewer than {MIN_SLOT_CONTEXT} tokens per slot \
                     (split among {slots} parallel slots)"
                )));
            }
        }
        if self.batch_size == Some(0) {
            return Err(SpecError("batch_size must be at least 1".into()));
        }
        if let Some(t) = self.queue_timeout_secs
            && !(t.is_finite() && t > 0.0 && t <= 86_400.0)
        {
            return Err(SpecError(format!(
                "queue_timeout must be a number of seconds between 0 and 86400, got {t}"
            )));
        }
        Ok(())
    }
}

/// Largest `embed_max_batch`.
pub const MAX_EMBED_BATCH: usize = 1024;
/// Largest `embed_batch_wait_ms`.
pub const MAX_EMBED_BATCH_WAIT_MS: u64 = 1000;
/// Largest `embed_threads`.
pub const MAX_EMBED_THREADS: usize = 256;

/// Why a spec is invalid (the message names the field).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

/// A loaded model.
#[derive(Clone)]
pub enum Engine {
    Llm(Arc<dyn LlmBackend>),
    Embedding(Arc<dyn EmbeddingBackend>),
    Reranker(Arc<dyn RerankBackend>),
}

impl ModelSpec {
    /// `name@type`, the registry key.
    pub fn key(&self) -> String {
        crate::wire::controller::worker_key(&self.name, self.worker_type.as_str())
    }

    /// Checks the combination of fields.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.name.trim().is_empty() {
            return Err(SpecError("model_name must not be empty".into()));
        }
        if self.name.contains('@') {
            return Err(SpecError(format!(
                "invalid symbol '@' in model_name {:?}",
                self.name
            )));
        }
        let max = crate::wire::controller::MAX_MODEL_NAME_CHARS;
        if self.key().chars().count() > max {
            return Err(SpecError(format!(
                "model_name is too long: the controller registers at most {max} characters, \
                 the @{} suffix included",
                self.worker_type.as_str()
            )));
        }
        match (self.worker_type, self.model_type) {
            (WorkerType::Llm, ModelType::Bert) => {
                return Err(SpecError(
                    "model_type hf (embeddings) needs worker_type text2vec".into(),
                ));
            }
            (WorkerType::Text2vec | WorkerType::Reranker, ModelType::LlamaCpp) => {
                return Err(SpecError(
                    "model_type llama.cpp needs worker_type llm".into(),
                ));
            }
            (WorkerType::Reranker, ModelType::Proxy) => {
                return Err(SpecError(
                    "a reranker runs in-process (model_type hf with a cross-encoder model_path); proxy rerankers are not supported".into(),
                ));
            }
            _ => {}
        }
        match self.model_type {
            ModelType::LlamaCpp | ModelType::Bert => {
                if self.path.is_none() {
                    return Err(SpecError(format!(
                        "model {}: model_path is required for model_type {}",
                        self.name,
                        self.model_type.as_str()
                    )));
                }
            }
            ModelType::Proxy => {
                if self.api_base.is_none() {
                    return Err(SpecError(format!(
                        "model {}: proxy_api_base (or proxy_server_url, or OPENAI_API_BASE) is required for a proxy model",
                        self.name
                    )));
                }
            }
        }
        if self.chat_template.is_some() && self.model_type != ModelType::LlamaCpp {
            return Err(SpecError(format!(
                "model {}: chat_template applies to llama.cpp models only",
                self.name
            )));
        }
        let batching = self.embed_max_batch.is_some()
            || self.embed_batch_wait_ms.is_some()
            || self.embed_threads.is_some();
        if batching && self.model_type != ModelType::Bert {
            return Err(SpecError(format!(
                "model {}: embed_max_batch, embed_batch_wait_ms and embed_threads apply to local text2vec and reranker models (model_type hf) only",
                self.name
            )));
        }
        if let Some(n) = self.embed_max_batch
            && !(1..=MAX_EMBED_BATCH).contains(&n)
        {
            return Err(SpecError(format!(
                "model {}: embed_max_batch must be between 1 and {MAX_EMBED_BATCH}, got {n}",
                self.name
            )));
        }
        if let Some(ms) = self.embed_batch_wait_ms
            && ms > MAX_EMBED_BATCH_WAIT_MS
        {
            return Err(SpecError(format!(
                "model {}: embed_batch_wait_ms must be between 0 and {MAX_EMBED_BATCH_WAIT_MS}, got {ms}",
                self.name
            )));
        }
        if let Some(n) = self.embed_threads
            && !(1..=MAX_EMBED_THREADS).contains(&n)
        {
            return Err(SpecError(format!(
                "model {}: embed_threads must be between 1 and {MAX_EMBED_THREADS}, got {n}",
                self.name
            )));
        }
        if self.concurrency == Some(0) {
            return Err(SpecError(
                "limit_model_concurrency must be at least 1".into(),
            ));
        }
        self.llama.validate()?;
        Ok(())
    }

    /// Loads the engine (blocking work runs off the async executor). Logs the file, its
    /// size and the load time. A proxy without timeouts of its own gets `proxy_timeouts`.
    /// A local chat model comes with its own prompt rendering, for continuations
    /// ([`super::chat::RenderChat`]).
    pub async fn load(
        &self,
        proxy_timeouts: ProxyTimeouts,
    ) -> Result<(Engine, Option<super::chat::RenderChat>), BackendError> {
        let started = Instant::now();
        let what = match &self.path {
            Some(p) => format!("{} ({})", p.display(), human_size(path_size(p))),
            None => format!(
                "{} via {}",
                self.backend.as_deref().unwrap_or(&self.name),
                self.api_base
                    .as_deref()
                    .map(super::backends::proxy::shown_api_base)
                    .unwrap_or_default()
            ),
        };
        info!(model = %Escaped(self.key()), "loading {}", Escaped(&what));
        let spinner = loading_spinner(&format!("loading {} from {what}", self.key()));
        let engine = self.load_inner(proxy_timeouts).await;
        if let Some(s) = spinner {
            s.finish_and_clear();
        }
        let engine = engine?;
        info!(model = %Escaped(self.key()), secs = started.elapsed().as_secs_f64(), "model loaded in {:.2} s", started.elapsed().as_secs_f64());
        Ok(engine)
    }

    async fn load_inner(
        &self,
        proxy_timeouts: ProxyTimeouts,
    ) -> Result<(Engine, Option<super::chat::RenderChat>), BackendError> {
        #[allow(unused_mut)]
        let mut render: Option<super::chat::RenderChat> = None;
        let engine = match self.model_type {
            ModelType::Proxy => {
                let mut cfg = OpenAiProxyConfig::new(
                    self.api_base.clone().unwrap_or_default(),
                    self.backend.clone().unwrap_or_else(|| self.name.clone()),
                );
                cfg.api_key = self.api_key.clone().or_else(|| {
                    std::env::var("OPENAI_API_KEY")
                        .ok()
                        .filter(|k| !k.is_empty())
                });
                if let Some(c) = self.context_length {
                    cfg.context_length = c as usize;
                }
                cfg.timeouts = self.proxy_timeouts.unwrap_or(proxy_timeouts);
                let backend = Arc::new(OpenAiProxyBackend::new(cfg)?);
                match self.worker_type {
                    WorkerType::Llm => Ok(Engine::Llm(backend)),
                    WorkerType::Text2vec => Ok(Engine::Embedding(backend)),
                    WorkerType::Reranker => {
                        Err(BackendError::internal("proxy rerankers are not supported"))
                    }
                }
            }
            #[cfg(feature = "local-models")]
            ModelType::LlamaCpp => {
                use super::backends::llama::{LlamaCppBackend, LlamaCppConfig};
                let mut cfg = LlamaCppConfig::new(self.path.clone().unwrap_or_default());
                cfg.context_length = self.context_length;
                cfg.n_threads = self.n_threads;
                let l = &self.llama;
                cfg.parallel = l.parallel.or(self.concurrency).unwrap_or(cfg.parallel);
                cfg.ctx_size = l.ctx_size;
                cfg.n_batch = l.batch_size.unwrap_or(cfg.n_batch);
                cfg.max_queue = l.max_queue.unwrap_or(cfg.max_queue);
                if let Some(t) = l.queue_timeout_secs {
                    cfg.queue_timeout = Duration::from_secs_f64(t);
                }
                let backend = Arc::new(LlamaCppBackend::load_async(cfg).await?);
                let b = backend.clone();
                render = Some(Arc::new(move |m: &[super::backends::ChatMessage]| {
                    b.render_prompt(m)
                }));
                Ok(Engine::Llm(backend))
            }
            #[cfg(feature = "local-models")]
            ModelType::Bert => {
                use super::backends::embedding::{BertEmbeddingBackend, BertEmbeddingConfig};
                use super::backends::reranker::{
                    BertRerankerBackend, RerankerConfig, is_cross_encoder,
                };
                let path = self.path.clone().unwrap_or_default();
                let batch = self.batch_config();
                if self.worker_type == WorkerType::Reranker || is_cross_encoder(&path) {
                    let cfg = RerankerConfig {
                        batch,
                        ..RerankerConfig::new(path)
                    };
                    return Ok((
                        Engine::Reranker(Arc::new(BertRerankerBackend::load_async(cfg).await?)),
                        None,
                    ));
                }
                let cfg = BertEmbeddingConfig {
                    batch,
                    ..BertEmbeddingConfig::new(path)
                };
                Ok(Engine::Embedding(Arc::new(
                    BertEmbeddingBackend::load_async(cfg).await?,
                )))
            }
            #[cfg(not(feature = "local-models"))]
            ModelType::LlamaCpp | ModelType::Bert => Err(BackendError::load(
                self.path.clone().unwrap_or_default(),
                "this dbgpt was built without the local-models feature",
            )),
        };
        engine.map(|e| (e, render))
    }

    /// How a local encoder model merges concurrent requests (the defaults where unset).
    pub fn batch_config(&self) -> BatchConfig {
        let d = BatchConfig::default();
        BatchConfig {
            max_batch: self.embed_max_batch.unwrap_or(d.max_batch),
            max_wait: self
                .embed_batch_wait_ms
                .map_or(d.max_wait, Duration::from_millis),
            threads: self.embed_threads.unwrap_or(d.threads),
        }
    }

    /// Builds a spec from a `models/startup` request's `params` (DB-GPT's parameter names:
    /// `model_path`, `model_type`, `proxy_api_base`, `proxy_server_url`, `proxy_api_key`,
    /// `proxyllm_backend`, …), for model `name` of `worker_type`.
    pub fn from_params(
        name: &str,
        worker_type: WorkerType,
        params: &Value,
    ) -> Result<Self, SpecError> {
        let get = |k: &str| {
            params.get(k).and_then(|v| match v {
                Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
        };
        let num = |k: &str| -> Result<Option<u64>, SpecError> {
            match get(k) {
                None => Ok(None),
                Some(s) => s.parse::<u64>().map(Some).map_err(|_| {
                    SpecError(format!("params.{k} must be a positive integer, got {s:?}"))
                }),
            }
        };
        let api_base = get("proxy_api_base").or_else(|| {
            get("proxy_server_url").map(|u| {
                u.trim_end_matches('/')
                    .trim_end_matches("/chat/completions")
                    .trim_end_matches("/embeddings")
                    .to_string()
            })
        });
        let model_type = match get("model_type")
            .or_else(|| get("provider"))
            .filter(|t| !is_dbgpt_default_llm_type(t, worker_type))
        {
            Some(t) => ModelType::parse(&t, worker_type).ok_or_else(|| {
                SpecError(format!(
                    "params.model_type {t:?} is not supported for worker_type {}",
                    worker_type.as_str()
                ))
            })?,
            None => default_model_type(
                worker_type,
                get("model_path").as_deref(),
                api_base.is_some(),
            ),
        };
        let spec = ModelSpec {
            name: name.to_string(),
            worker_type,
            model_type,
            path: get("model_path").or_else(|| get("path")).map(PathBuf::from),
            api_base,
            api_key: get("proxy_api_key").or_else(|| get("api_key")),
            backend: get("proxyllm_backend")
                .or_else(|| get("proxy_backend"))
                .or_else(|| get("backend")),
            context_length: num("context_length")?
                .or(num("max_context_size")?)
                .map(|v| v as u32),
            n_threads: num("n_threads")?.map(|v| v as usize),
            concurrency: num("limit_model_concurrency")?
                .or(num("concurrency")?)
                .map(|v| v as usize),
            proxy_timeouts: None,
            chat_template: get("chat_template").map(PathBuf::from),
            llama: LlamaSpec {
                parallel: num("parallel")?.or(num("n_parallel")?).map(|v| v as usize),
                ctx_size: num("ctx_size")?.or(num("n_ctx")?).map(|v| v as u32),
                batch_size: num("batch_size")?.or(num("n_batch")?).map(|v| v as u32),
                max_queue: num("max_queue")?.map(|v| v as usize),
                queue_timeout_secs: match get("queue_timeout") {
                    None => None,
                    Some(t) => Some(t.parse::<f64>().map_err(|_| {
                        SpecError(format!(
                            "params.queue_timeout must be a number of seconds, got {t:?}"
                        ))
                    })?),
                },
            },
            embed_max_batch: num("embed_max_batch")?.map(|v| v as usize),
            embed_batch_wait_ms: num("embed_batch_wait_ms")?,
            embed_threads: num("embed_threads")?.map(|v| v as usize),
        };
        spec.validate()?;
        Ok(spec)
    }

    /// The parameters that would recreate this spec (API key masked), as DB-GPT's
    /// `ParameterDescription`s.
    pub fn describe_params(&self) -> Vec<crate::wire::worker::ParameterDescription> {
        let class = match self.model_type {
            ModelType::Proxy => "dbgpt.model.parameter.ProxyModelParameters",
            ModelType::LlamaCpp => "dbgpt.model.parameter.LlamaCppModelParameters",
            ModelType::Bert => "dbgpt.model.parameter.EmbeddingModelParameters",
        };
        let p = |name: &str, ty: &str, desc: &str, value: Option<Value>, tag: &str| {
            crate::wire::worker::ParameterDescription {
                required: false,
                param_class: class.into(),
                param_name: name.into(),
                param_type: ty.into(),
                description: desc.into(),
                default_value: value,
                valid_values: None,
                ext_metadata: if tag.is_empty() {
                    Value::Object(Default::default())
                } else {
                    serde_json::json!({"tags": tag})
                },
            }
        };
        let mut out = vec![
            p(
                "model_name",
                "str",
                "Model name",
                Some(Value::String(self.name.clone())),
                "fixed",
            ),
            p(
                "model_type",
                "str",
                "Model type: llama.cpp, hf (embeddings) or proxy",
                Some(Value::String(self.model_type.as_str().into())),
                "fixed",
            ),
        ];
        if let Some(path) = &self.path {
            out.push(p(
                "model_path",
                "str",
                "Model file or directory",
                Some(Value::String(path.display().to_string())),
                "fixed",
            ));
        }
        if let Some(b) = &self.api_base {
            out.push(p(
                "proxy_api_base",
                "str",
                "OpenAI-compatible upstream base URL",
                Some(Value::String(b.clone())),
                "",
            ));
            out.push(p(
                "proxy_api_key",
                "str",
                "Upstream API key",
                self.api_key.as_ref().map(|k| Value::String(mask(k))),
                "privacy",
            ));
            out.push(p(
                "proxyllm_backend",
                "str",
                "Upstream model name",
                self.backend.clone().map(Value::String),
                "",
            ));
        }
        if self.model_type == ModelType::Bert {
            let b = self.batch_config();
            out.push(p(
                "embed_max_batch",
                "int",
                "Texts (or query, document pairs) per forward pass, merged from concurrent requests",
                Some(Value::from(b.max_batch)),
                "",
            ));
            out.push(p(
                "embed_batch_wait_ms",
                "int",
                "Milliseconds a forward pass waits for more requests under concurrent load",
                Some(Value::from(b.max_wait.as_millis() as u64)),
                "",
            ));
            out.push(p(
                "embed_threads",
                "int",
                "Forward passes run at once, one thread each",
                Some(Value::from(b.threads)),
                "",
            ));
        }
        if let Some(c) = self.context_length {
            out.push(p(
                "context_length",
                "int",
                "Context size in tokens",
                Some(Value::from(c)),
                "",
            ));
        }
        out
    }
}

/// DB-GPT prints secrets as `s******t`.
pub fn mask(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    match chars.len() {
        0 => String::new(),
        1 | 2 => "*".repeat(chars.len()),
        n => format!("{}{}{}", chars[0], "*".repeat(6.min(n - 2)), chars[n - 1]),
    }
}

/// Whether `model_type` is DB-GPT's default for an LLM (`huggingface`, 0.7's `hf`), which
/// DB-GPT's own CLI sends when the user names no engine: `dbgpt model start` builds its
/// options from DB-GPT's parameter class named in our `param_class`, whose `model_type`
/// defaults to it. No engine here runs Hugging Face LLMs, so for an LLM it means "not
/// specified" and the engine follows from the other params ([`default_model_type`]), which
/// for the `model_path` `models/supports` reported is the engine the model ran with.
fn is_dbgpt_default_llm_type(model_type: &str, worker_type: WorkerType) -> bool {
    worker_type == WorkerType::Llm
        && ["huggingface", "hf"]
            .iter()
            .any(|d| model_type.eq_ignore_ascii_case(d))
}

/// Engine to use when only a path (or a proxy URL) is given.
pub fn default_model_type(
    worker_type: WorkerType,
    path: Option<&str>,
    has_api_base: bool,
) -> ModelType {
    if has_api_base && path.is_none() {
        return ModelType::Proxy;
    }
    match worker_type {
        WorkerType::Llm => ModelType::LlamaCpp,
        WorkerType::Text2vec | WorkerType::Reranker => ModelType::Bert,
    }
}

fn path_size(p: &std::path::Path) -> u64 {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => std::fs::read_dir(p)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// `98.4 MB`.
pub fn human_size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

/// A spinner on stderr while loading, only when stderr is a terminal.
fn loading_spinner(msg: &str) -> Option<indicatif::ProgressBar> {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(100));
    Some(pb)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn params_from_dbgpt_startup_requests() {
        let s = ModelSpec::from_params(
            "gpt",
            WorkerType::Llm,
            &json!({"model_type": "proxy", "proxy_server_url": "http://u:1/v1/chat/completions", "proxy_api_key": "sk-secret", "proxyllm_backend": "gpt-4o-mini", "model_path": null}),
        )
        .unwrap();
        assert_eq!(s.model_type, ModelType::Proxy);
        assert_eq!(s.api_base.as_deref(), Some("http://u:1/v1"));
        assert_eq!(s.backend.as_deref(), Some("gpt-4o-mini"));
        let d = s.describe_params();
        let key = d.iter().find(|p| p.param_name == "proxy_api_key").unwrap();
        assert_eq!(key.default_value, Some(json!("s******t")));

        let s = ModelSpec::from_params("m", WorkerType::Llm, &json!({"model_path": "/x.gguf"}))
            .unwrap();
        assert_eq!(s.model_type, ModelType::LlamaCpp);
        let s = ModelSpec::from_params("e", WorkerType::Text2vec, &json!({"model_path": "/d"}))
            .unwrap();
        assert_eq!(s.model_type, ModelType::Bert);
        assert_eq!(s.batch_config(), BatchConfig::default());
        let s = ModelSpec::from_params(
            "e",
            WorkerType::Text2vec,
            &json!({"model_path": "/d", "embed_max_batch": 16, "embed_batch_wait_ms": "0"}),
        )
        .unwrap();
        assert_eq!(s.batch_config().max_batch, 16);
        assert_eq!(s.batch_config().max_wait, Duration::ZERO);
        let d = s.describe_params();
        let b = d
            .iter()
            .find(|p| p.param_name == "embed_max_batch")
            .unwrap();
        assert_eq!(b.default_value, Some(json!(16)));
        let e = ModelSpec::from_params(
            "e",
            WorkerType::Text2vec,
            &json!({"model_path": "/d", "embed_max_batch": 0}),
        )
        .unwrap_err();
        assert!(e.0.contains("embed_max_batch"), "{e}");
    }

    #[test]
    fn dbgpt_cli_default_model_type_means_not_specified() {
        let s = ModelSpec::from_params(
            "smollm2",
            WorkerType::Llm,
            // The fields of DB-GPT 0.5.10's CLI body that matter here (the whole body is
            // in the e2e lifecycle test).
            &json!({"model_name": "smollm2", "model_path": "/m/smollm2.gguf", "model_type": "huggingface", "max_context_size": 4096, "n_threads": null, "seed": -1}),
        )
        .unwrap();
        assert_eq!(s.model_type, ModelType::LlamaCpp);
        assert_eq!(s.path, Some(PathBuf::from("/m/smollm2.gguf")));
        assert_eq!(s.context_length, Some(4096));
        let s = ModelSpec::from_params(
            "gpt",
            WorkerType::Llm,
            &json!({"model_type": "HuggingFace", "proxy_api_base": "http://u:1/v1"}),
        )
        .unwrap();
        assert_eq!(s.model_type, ModelType::Proxy);
        // For embeddings, hf is an engine of its own.
        let s = ModelSpec::from_params(
            "e",
            WorkerType::Text2vec,
            &json!({"model_type": "huggingface", "model_path": "/d", "proxy_api_base": "http://u:1/v1"}),
        )
        .unwrap();
        assert_eq!(s.model_type, ModelType::Bert);
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let e = ModelSpec::from_params("m", WorkerType::Llm, &json!({})).unwrap_err();
        assert!(e.0.contains("model_path"), "{e}");
        let e = ModelSpec::from_params("m", WorkerType::Llm, &json!({"model_type": "proxy"}))
            .unwrap_err();
        assert!(e.0.contains("proxy_api_base"), "{e}");
        let e = ModelSpec::from_params("a@b", WorkerType::Llm, &json!({"model_path": "/x"}))
            .unwrap_err();
        assert!(e.0.contains('@'), "{e}");
        let e = ModelSpec::from_params(
            "m",
            WorkerType::Llm,
            &json!({"model_type": "tensorrt", "model_path": "/x"}),
        )
        .unwrap_err();
        assert!(e.0.contains("model_type"), "{e}");
        let e = ModelSpec::from_params(
            "m",
            WorkerType::Llm,
            &json!({"model_path": "/x", "context_length": "lots"}),
        )
        .unwrap_err();
        assert!(e.0.contains("context_length"), "{e}");
    }

    #[test]
    fn masking() {
        assert_eq!(mask("sk-secret"), "s******t");
        assert_eq!(mask("ab"), "**");
    }
}
