//! GGUF chat models run in-process through llama.cpp (`llama-cpp-2`).
//!
//! This module owns the model as a whole: loading the GGUF file and its chat template, the
//! configuration ([`LlamaCppConfig`]), turning a request ([`GenerateParams`]) into prompt
//! tokens (chat template or raw prompt, checks against the slot's context window) and
//! handing it to the model's scheduler, whose events come back as the request's stream.
//! [`scheduler`] runs every generation of the model in one llama.cpp context (continuous
//! batching, prefix cache, bounded wait queue), [`sampling`] builds each sequence's sampler
//! chain, [`text`] holds the streaming UTF-8 and stop-string helpers.
//!
//! # Context, slots and threads
//!
//! One [`LlamaCppBackend`] holds one loaded `LlamaModel` (weights memory-mapped, shared) and
//! **one** `LlamaContext` with [`LlamaCppConfig::parallel`] sequence slots, driven by one
//! dedicated OS thread. The KV cache is split evenly among the slots (llama.cpp's
//! non-unified cache, as llama-server's `-c` with `-np`): each slot has a context window of
//! `context_length` tokens (default `min(training context, 4096)`; `ctx_size / parallel`
//! when a total `ctx_size` is given), so a request can never run out of KV cells halfway
//! and no request can take another's. Every decode step uses all `n_threads`. Nothing heavy
//! runs on the async executor: prompts are rendered and tokenized on tokio's blocking pool,
//! the rest on the scheduler thread.
//!
//! # Prompt, grammar, log-probabilities
//!
//! * [`GenerateParams::prompt`], when set, is tokenized as is (special tokens such as
//!   `<|im_start|>` parsed, BOS added when the model wants one and the text lacks it)
//!   instead of the chat template applied to `messages`.
//! * [`GenerateParams::grammar`] (GBNF, root rule `root`) adds llama.cpp's grammar sampler
//!   to the sequence's sampler chain, before top-k/top-p/temperature and the final pick
//!   (greedy or seeded random), so only tokens the grammar allows can be picked. An invalid
//!   grammar is a `BadRequest`, the stream's first item. Once the grammar is complete it
//!   allows only end-of-generation tokens, so generation ends with finish reason `stop`.
//! * [`GenerateParams::logprobs`] `Some(k)`: a [`GenerateEvent::Logprobs`] precedes each
//!   `Delta` and lists the tokens generated since the previous `Delta` (tokens whose text
//!   was held back, for an incomplete UTF-8 character or a possible stop-string prefix,
//!   are listed with the delta that finally carries it). Tokens generated after the last
//!   `Delta` are dropped: text swallowed whole by a stop string, or tokens without text at
//!   the end. Log-probabilities are a log-softmax over the whole vocabulary of the logits
//!   divided by the temperature (plain logits when greedy): the model's distribution at
//!   that temperature, before penalties, top-k, top-p and the grammar.
//!
//! `LlamaBackend::init` runs once per process (see [`llama_runtime`]); llama.cpp
//! logs are routed into `tracing` under the target `llama-cpp-2` (model loading
//! logs ~100 lines at INFO; a filter such as `llama-cpp-2=warn` quiets them).

mod sampling;
mod scheduler;
mod text;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::stream::{self, BoxStream, StreamExt};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::{ChatTemplateError, LogOptions};
use tokio::sync::mpsc;

use super::{
    BackendError, ChatMessage, EngineStatus, GenerateEvent, GenerateParams, LlmBackend,
    error_stream,
};
#[cfg(test)]
pub(crate) use sampling::{explain_grammar_error, sampler_seed};
use scheduler::{Job, Scheduler, SchedulerConfig};
#[cfg(test)]
pub(crate) use text::{StopMatcher, Utf8Stream};

/// Default context window of one sequence slot when the config sets neither
/// `context_length` nor `ctx_size` (capped by the model's training context).
pub const DEFAULT_CONTEXT_LENGTH: u32 = 4096;
/// Default sampling temperature when the request does not set one (llama.cpp's
/// default).
pub const DEFAULT_TEMPERATURE: f32 = 0.8;
/// Default number of sequence slots (generations decoded together), llama-server's too.
pub const DEFAULT_PARALLEL: usize = 4;
/// Most sequence slots one model may have.
pub const MAX_PARALLEL: usize = 64;
/// Default tokens per decode step (running sequences' next tokens plus prompt chunks).
pub const DEFAULT_BATCH_SIZE: u32 = 512;
/// Default number of requests that may wait for a slot.
pub const DEFAULT_MAX_QUEUE: usize = 32;
/// Default longest wait for a slot. Below the apiserver's 30 s first-byte timeout, so a
/// queued request is answered "overloaded" (and retried elsewhere) before the apiserver
/// takes the worker for a frozen one.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(20);
/// Smallest context window a slot may have.
pub const MIN_SLOT_CONTEXT: u32 = 16;

/// Configuration of a [`LlamaCppBackend`].
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaCppConfig {
    /// Path of the `.gguf` file.
    pub model_path: PathBuf,
    /// Context window (prompt + completion) of one sequence slot, in tokens. `None`:
    /// `ctx_size / parallel` when `ctx_size` is set, else `min(training context, 4096)`.
    /// Capped by the training context (and by `ctx_size / parallel`).
    pub context_length: Option<u32>,
    /// Total KV-cache size in tokens, split evenly among the slots (llama-server's `-c`).
    /// `None`: `context_length * parallel`.
    pub ctx_size: Option<u32>,
    /// CPU threads of the decode. `None`: physical cores available.
    pub n_threads: Option<usize>,
    /// Sequence slots: generations decoded together in one batch (1..=64).
    pub parallel: usize,
    /// Most tokens one decode step takes (llama-server's `-b`): one per running sequence,
    /// the rest prompt chunks of newly admitted requests, so a long prompt is taken in
    /// pieces while the running streams keep flowing.
    pub n_batch: u32,
    /// Requests that may wait for a free slot; more are refused as overloaded.
    pub max_queue: usize,
    /// Longest wait for a free slot before the request is refused as overloaded.
    pub queue_timeout: Duration,
}

impl LlamaCppConfig {
    /// Defaults for the given model file: slot context `min(train, 4096)`, threads =
    /// physical cores, 4 slots, batch 512, queue 32 for at most 20 s.
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        LlamaCppConfig {
            model_path: model_path.into(),
            context_length: None,
            ctx_size: None,
            n_threads: None,
            parallel: DEFAULT_PARALLEL,
            n_batch: DEFAULT_BATCH_SIZE,
            max_queue: DEFAULT_MAX_QUEUE,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
        }
    }
}

/// The process-wide llama.cpp runtime (initialised once; logs go to
/// `tracing`).
pub fn llama_runtime() -> Result<&'static LlamaBackend, BackendError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| BackendError::internal(format!("llama.cpp initialisation failed: {e}")))
}

/// llama.cpp mutates the model while creating a context: create one at a time.
static CONTEXT_CREATION: Mutex<()> = Mutex::new(());

/// Number of physical cores available to this process (hyper-threads do not
/// help llama.cpp). Falls back to the logical CPU count.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else {
        return logical;
    };
    let mut cores = std::collections::HashSet::new();
    let mut physical_id = "";
    for line in cpuinfo.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key.trim() {
            "physical id" => physical_id = value.trim(),
            "core id" => {
                cores.insert((physical_id.to_string(), value.trim().to_string()));
            }
            _ => {}
        }
    }
    if cores.is_empty() {
        logical
    } else {
        cores.len().min(logical).max(1)
    }
}

/// A GGUF chat model served by llama.cpp. Cheap to clone (shared model and scheduler);
/// the scheduler thread ends once the last clone is dropped and its work is done.
#[derive(Clone)]
pub struct LlamaCppBackend {
    inner: Arc<Inner>,
    scheduler: Arc<Scheduler>,
}

/// What the scheduler thread shares with request preparation.
pub(super) struct Inner {
    model: LlamaModel,
    template: LlamaChatTemplate,
    /// The GGUF's own `tokenizer.chat_template` (`None` when it has none and ChatML is used).
    gguf_template: Option<String>,
    path: PathBuf,
    /// Context window of one slot.
    context_length: u32,
}

impl std::fmt::Debug for LlamaCppBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaCppBackend")
            .field("path", &self.inner.path)
            .field("context_length", &self.inner.context_length)
            .finish_non_exhaustive()
    }
}

impl LlamaCppBackend {
    /// Load a GGUF model. Blocking (file I/O, 0.1 s for a 100 MB model): call
    /// it from `spawn_blocking` when on an async executor.
    pub fn load(config: LlamaCppConfig) -> Result<Self, BackendError> {
        let path = config.model_path.clone();
        check_gguf_file(&path)?;
        let runtime = llama_runtime()?;
        // For log lines only: the path may come from a `models/startup` request.
        let file_name = crate::telemetry::Escaped(
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string()),
        )
        .to_string();
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        tracing::info!(file = %file_name, size_bytes = size, "loading GGUF model");

        let start = Instant::now();
        let progress_name = file_name.clone();
        let mut last_decile = -1i32;
        let params = LlamaModelParams::default().with_progress_callback(move |p: f32| {
            let decile = (p * 10.0) as i32;
            if decile > last_decile {
                last_decile = decile;
                tracing::debug!(file = %progress_name, progress = decile * 10, "loading model (%)");
            }
            true
        });
        let model = LlamaModel::load_from_file(runtime, &path, &params).map_err(|e| {
            BackendError::load(&path, format!("llama.cpp could not load the model: {e}"))
        })?;

        let (template, gguf_template) = match model.chat_template(None) {
            Ok(t) => {
                let text = t.to_str().ok().map(str::to_string);
                (t, text)
            }
            Err(ChatTemplateError::MissingTemplate) => {
                tracing::warn!(file = %file_name, "GGUF has no chat template; using ChatML");
                let chatml = LlamaChatTemplate::new("chatml").expect("static string has no NUL");
                (chatml, None)
            }
            Err(e) => {
                return Err(BackendError::load(
                    &path,
                    format!("unreadable chat template: {e}"),
                ));
            }
        };
        // Refuse at load time a template llama.cpp's built-in engine cannot apply.
        let probe =
            [LlamaChatMessage::new("user".into(), "hi".into())
                .expect("static strings have no NUL")];
        model
            .apply_chat_template(&template, &probe, true)
            .map_err(|e| {
                BackendError::load(
                    &path,
                    format!("chat template not supported by llama.cpp: {e}"),
                )
            })?;

        let train_ctx = model.n_ctx_train().max(1);
        let parallel = config.parallel.clamp(1, MAX_PARALLEL);
        let slot_ctx = match (config.ctx_size, config.context_length) {
            (Some(total), Some(c)) => (total / parallel as u32).min(c),
            (Some(total), None) => total / parallel as u32,
            (None, Some(c)) => c,
            (None, None) => DEFAULT_CONTEXT_LENGTH,
        }
        .min(train_ctx);
        if slot_ctx < MIN_SLOT_CONTEXT {
            return Err(BackendError::load(
                &path,
                format!(
                    "a sequence slot would get {slot_ctx} tokens of context (ctx_size split \
                     among {parallel} parallel slots); at least {MIN_SLOT_CONTEXT} are needed"
                ),
            ));
        }
        let n_threads = config.n_threads.unwrap_or_else(physical_cores).max(1);
        let n_batch = config.n_batch.max(parallel as u32).max(1);
        let inner = Arc::new(Inner {
            model,
            template,
            gguf_template,
            path: path.clone(),
            context_length: slot_ctx,
        });
        let scheduler = Scheduler::start(
            inner.clone(),
            SchedulerConfig {
                parallel,
                slot_ctx,
                n_batch,
                n_threads,
                max_queue: config.max_queue,
                queue_timeout: config.queue_timeout,
            },
        )
        .map_err(|e| BackendError::load(&path, e))?;
        tracing::info!(
            file = %file_name,
            size_bytes = size,
            n_params = inner.model.n_params(),
            train_ctx,
            slot_context = slot_ctx,
            n_threads,
            parallel,
            n_batch,
            max_queue = config.max_queue,
            queue_timeout_secs = config.queue_timeout.as_secs_f64(),
            load_ms = start.elapsed().as_millis() as u64,
            "loaded GGUF model"
        );
        Ok(LlamaCppBackend {
            inner,
            scheduler: Arc::new(scheduler),
        })
    }

    /// [`LlamaCppBackend::load`] on tokio's blocking pool.
    pub async fn load_async(config: LlamaCppConfig) -> Result<Self, BackendError> {
        tokio::task::spawn_blocking(move || Self::load(config))
            .await
            .map_err(|e| BackendError::internal(format!("model loading task failed: {e}")))?
    }

    /// Path of the loaded file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Render the chat template for `messages` (with the assistant turn
    /// opened), as the model will see it.
    pub fn render_prompt(&self, messages: &[ChatMessage]) -> Result<String, BackendError> {
        self.inner.render_prompt(messages)
    }
}

fn check_gguf_file(path: &Path) -> Result<(), BackendError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| BackendError::load(path, format!("cannot read model file: {e}")))?;
    if !meta.is_file() {
        return Err(BackendError::load(path, "not a regular file"));
    }
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(|e| BackendError::load(path, format!("cannot read model file: {e}")))?;
    if &magic != b"GGUF" {
        return Err(BackendError::load(
            path,
            "not a GGUF file (missing GGUF magic bytes)",
        ));
    }
    Ok(())
}

impl Inner {
    fn render_prompt(&self, messages: &[ChatMessage]) -> Result<String, BackendError> {
        if messages.is_empty() {
            return Err(BackendError::BadRequest(
                "messages must not be empty".into(),
            ));
        }
        let chat = messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.openai_name().to_string(), m.content.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| BackendError::BadRequest("message content contains a NUL byte".into()))?;
        self.model
            .apply_chat_template(&self.template, &chat, true)
            .map_err(|e| BackendError::internal(format!("applying the chat template failed: {e}")))
    }

    fn tokenize_prompt(&self, prompt: &str) -> Vec<LlamaToken> {
        let vocab = self.model.vocab();
        let mut tokens = vocab.tokenize(prompt.as_bytes(), false, true);
        // Add BOS if the model wants one and the template did not write it.
        if vocab.should_add_bos() && tokens.first() != Some(&vocab.bos()) {
            tokens.insert(0, vocab.bos());
        }
        tokens
    }

    /// Checks a request and turns it into the scheduler's job (without its event sender):
    /// parameters, grammar, the prompt's tokens against the slot's context window. Blocking
    /// (template and tokenizer): runs on tokio's blocking pool.
    fn prepare(
        &self,
        mut params: GenerateParams,
    ) -> Result<(Vec<LlamaToken>, GenerateParams, usize), BackendError> {
        sampling::validate(&params)?;
        // Checked before anything else so that a bad grammar is the stream's first item
        // (the scheduler builds the sequence's own sampler again when it admits it).
        if let Some(g) = params.grammar.as_deref() {
            drop(sampling::grammar_sampler(&self.model, g)?);
        }
        let raw = params.prompt.is_some();
        let tokens = match params.prompt.take() {
            Some(prompt) => self.tokenize_prompt(&prompt),
            None => self.tokenize_prompt(&self.render_prompt(&params.messages)?),
        };
        params.messages = Vec::new();
        let n_prompt = tokens.len();
        let ctx_len = self.context_length as usize;
        if n_prompt == 0 {
            return Err(BackendError::BadRequest(if raw {
                "prompt must not be empty".into()
            } else {
                "the rendered prompt is empty".into()
            }));
        }
        if n_prompt >= ctx_len {
            return Err(BackendError::BadRequest(format!(
                "prompt is {n_prompt} tokens but the model's context window is {ctx_len} tokens \
                 per sequence slot (prompt plus at least one generated token must fit); \
                 shorten the conversation"
            )));
        }
        let room = ctx_len - n_prompt;
        let max_new = params.max_new_tokens.map_or(room, |m| m as usize).min(room);
        Ok((tokens, params, max_new))
    }
}

impl LlmBackend for LlamaCppBackend {
    fn generate_stream(
        &self,
        params: GenerateParams,
    ) -> BoxStream<'static, Result<GenerateEvent, BackendError>> {
        let this = self.clone();
        let start = async move {
            let inner = this.inner.clone();
            let prepared = match tokio::task::spawn_blocking(move || inner.prepare(params)).await {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => return error_stream(e),
                Err(e) => {
                    return error_stream(BackendError::internal(format!(
                        "request preparation failed: {e}"
                    )));
                }
            };
            let (tokens, params, max_new) = prepared;
            let (tx, rx) = mpsc::unbounded_channel();
            let job = Job {
                tokens,
                params,
                max_new,
                tx,
                enqueued: Instant::now(),
            };
            if let Err(e) = this.scheduler.submit(job) {
                return error_stream(e);
            }
            stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|ev| (ev, rx)) },
            )
            .boxed()
        };
        stream::once(start).flatten().boxed()
    }

    fn count_tokens(&self, text: &str) -> Result<usize, BackendError> {
        Ok(self
            .inner
            .model
            .vocab()
            .tokenize(text.as_bytes(), false, false)
            .len())
    }

    fn context_length(&self) -> usize {
        self.inner.context_length as usize
    }

    fn chat_template(&self) -> Option<&str> {
        self.inner.gguf_template.as_deref()
    }

    fn engine_status(&self) -> Option<EngineStatus> {
        Some(self.scheduler.status())
    }
}

#[cfg(test)]
mod tests;
