//! GGUF chat models run in-process through llama.cpp (`llama-cpp-2`).
//!
//! # Concurrency model
//!
//! One [`LlamaCppBackend`] holds one loaded `LlamaModel` (weights are shared,
//! read-only, memory-mapped). Every generation request gets its **own
//! `LlamaContext`** (KV cache), created on a dedicated OS thread that runs the
//! whole request (template, tokenisation, prefill, decode loop) and streams
//! events back through a bounded channel. Nothing heavy runs on the async
//! executor.
//!
//! * Context creation is serialised process-wide by a mutex, because
//!   llama.cpp's context constructor may mutate the shared model
//!   (`llama-cpp-2` documents that contexts must not be created in parallel).
//!   Decoding itself runs in parallel on independent contexts.
//! * At most [`LlamaCppConfig::parallel`] generations run at once per model;
//!   further requests wait (FIFO, cancellable) for a slot.
//! * Each context is sized to what the request can use
//!   (`prompt + max_new_tokens`, rounded up to 256, capped at the configured
//!   context length), so short requests allocate a small KV cache.
//! * Threads: a request that starts alone uses all `n_threads` (default: the
//!   number of physical cores available to the process); a request that starts
//!   while others are running gets `n_threads / running` (at least 1), so
//!   concurrent requests do not oversubscribe the CPU badly.
//! * Cancellation: the worker thread checks the channel between prompt chunks
//!   (`n_batch` tokens) and between generated tokens; dropping the stream
//!   therefore stops decoding within one token (or one prompt chunk).
//!
//! # Prompt, grammar, log-probabilities
//!
//! * [`GenerateParams::prompt`], when set, is tokenized as is (special tokens such as
//!   `<|im_start|>` parsed, BOS added when the model wants one and the text lacks it)
//!   instead of the chat template applied to `messages`.
//! * [`GenerateParams::grammar`] (GBNF, root rule `root`) adds llama.cpp's grammar sampler
//!   to a per-request sampler chain, before top-k/top-p/temperature and the final pick
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
//!   that temperature, before penalties, top-k, top-p and the grammar. Computed only when
//!   asked; with `logprobs` and `grammar` unset the decode loop does what it did before.
//!
//! `LlamaBackend::init` runs once per process (see [`llama_runtime`]); llama.cpp
//! logs are routed into `tracing` under the target `llama-cpp-2` (model loading
//! logs ~100 lines at INFO; a filter such as `llama-cpp-2=warn` quiets them).

use std::fs::File;
use std::io::Read;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use futures::stream::{self, BoxStream, StreamExt};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::{ChatTemplateError, GrammarError, LogOptions};
use tokio::sync::{Semaphore, mpsc};

use super::{
    BackendError, ChatMessage, FinishReason, GenerateEvent, GenerateParams, LlmBackend,
    TokenLogprob, TopLogprob, Usage, error_stream,
};

/// Default context window when the config does not set one (capped by the
/// model's training context).
pub const DEFAULT_CONTEXT_LENGTH: u32 = 4096;
/// Default sampling temperature when the request does not set one (llama.cpp's
/// default).
pub const DEFAULT_TEMPERATURE: f32 = 0.8;

/// Configuration of a [`LlamaCppBackend`].
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaCppConfig {
    /// Path of the `.gguf` file.
    pub model_path: PathBuf,
    /// Context window (prompt + completion) in tokens. `None`:
    /// `min(model training context, 4096)`. Values above the training context
    /// are capped to it.
    pub context_length: Option<u32>,
    /// CPU threads per generation. `None`: physical cores available.
    pub n_threads: Option<usize>,
    /// Maximum concurrent generations on this model (at least 1).
    pub parallel: usize,
    /// Prompt tokens decoded per llama.cpp call (also the cancellation
    /// granularity during prefill).
    pub n_batch: u32,
}

impl LlamaCppConfig {
    /// Defaults for the given model file: context `min(train, 4096)`, threads =
    /// physical cores, 2 parallel generations, batch 512.
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        LlamaCppConfig {
            model_path: model_path.into(),
            context_length: None,
            n_threads: None,
            parallel: 2,
            n_batch: 512,
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

/// Events a generation thread may send ahead of its consumer.
const EVENT_BUFFER: usize = 64;

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

/// A GGUF chat model served by llama.cpp. Cheap to clone (shared model).
#[derive(Clone)]
pub struct LlamaCppBackend {
    inner: Arc<Inner>,
}

struct Inner {
    model: LlamaModel,
    template: LlamaChatTemplate,
    /// The GGUF's own `tokenizer.chat_template` (`None` when it has none and ChatML is used).
    gguf_template: Option<String>,
    path: PathBuf,
    context_length: u32,
    n_threads: usize,
    n_batch: u32,
    slots: Arc<Semaphore>,
    running: AtomicUsize,
    /// Tokens generated by this model, all requests together.
    generated: AtomicUsize,
}

impl std::fmt::Debug for LlamaCppBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaCppBackend")
            .field("path", &self.inner.path)
            .field("context_length", &self.inner.context_length)
            .field("n_threads", &self.inner.n_threads)
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
        let context_length = config
            .context_length
            .unwrap_or(DEFAULT_CONTEXT_LENGTH)
            .clamp(1, train_ctx);
        let n_threads = config.n_threads.unwrap_or_else(physical_cores).max(1);
        let parallel = config.parallel.max(1);
        tracing::info!(
            file = %file_name,
            size_bytes = size,
            n_params = model.n_params(),
            train_ctx,
            context_length,
            n_threads,
            parallel,
            load_ms = start.elapsed().as_millis() as u64,
            "loaded GGUF model"
        );
        Ok(LlamaCppBackend {
            inner: Arc::new(Inner {
                model,
                template,
                gguf_template,
                path,
                context_length,
                n_threads,
                n_batch: config.n_batch.max(1),
                slots: Arc::new(Semaphore::new(parallel)),
                running: AtomicUsize::new(0),
                generated: AtomicUsize::new(0),
            }),
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

/// Most alternatives [`GenerateParams::logprobs`] may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u8 = 20;

fn validate(params: &GenerateParams) -> Result<(), BackendError> {
    let bad = |m: String| Err(BackendError::BadRequest(m));
    if params.prompt.is_none() && params.messages.is_empty() {
        return bad("messages must not be empty".into());
    }
    if let Some(t) = params.temperature
        && !(t.is_finite() && t >= 0.0)
    {
        return bad(format!("temperature must be >= 0, got {t}"));
    }
    if let Some(p) = params.top_p
        && !(p.is_finite() && p > 0.0 && p <= 1.0)
    {
        return bad(format!("top_p must be in (0, 1], got {p}"));
    }
    if params.max_new_tokens == Some(0) {
        return bad("max_new_tokens must be at least 1".into());
    }
    for (name, v) in [
        ("presence_penalty", params.presence_penalty),
        ("frequency_penalty", params.frequency_penalty),
    ] {
        if let Some(v) = v
            && !(v.is_finite() && (-2.0..=2.0).contains(&v))
        {
            return bad(format!("{name} must be in [-2, 2], got {v}"));
        }
    }
    if let Some(k) = params.logprobs
        && k > MAX_TOP_LOGPROBS
    {
        return bad(format!(
            "logprobs must be in 0..={MAX_TOP_LOGPROBS} (alternatives per token), got {k}"
        ));
    }
    if let Some(g) = &params.grammar
        && g.trim().is_empty()
    {
        return bad("grammar must not be empty".into());
    }
    Ok(())
}

/// The sampling temperature a request runs at (`0` = greedy).
fn effective_temperature(params: &GenerateParams) -> f32 {
    params.temperature.unwrap_or(DEFAULT_TEMPERATURE)
}

/// The seed of the `dist` sampler. llama.cpp treats `u32::MAX` as "pick a random seed",
/// so a caller's seed never maps to it (the fold of a `u64` seed would, for some seeds).
fn sampler_seed(seed: Option<u64>) -> u32 {
    match seed {
        Some(s) => match (s ^ (s >> 32)) as u32 {
            u32::MAX => u32::MAX - 1,
            folded => folded,
        },
        None => rand::random::<u32>(),
    }
}

/// The sampler chain: penalties, then the grammar (so that every later stage, and the final
/// pick, only sees tokens the grammar allows: a top-k cut before the grammar could leave no
/// allowed token), then greedy, or top-k, top-p, temperature and a seeded random pick.
fn build_sampler(
    params: &GenerateParams,
    grammar: Option<LlamaSampler>,
    n_vocab: i32,
    n_ctx: u32,
) -> LlamaSampler {
    let mut chain = Vec::new();
    let freq = params.frequency_penalty.unwrap_or(0.0);
    let presence = params.presence_penalty.unwrap_or(0.0);
    if freq != 0.0 || presence != 0.0 {
        // The sampler sees only generated tokens (prompt tokens are not
        // accepted into it), like OpenAI's penalties.
        chain.push(LlamaSampler::penalties(
            n_vocab,
            n_ctx as i32,
            1.0,
            freq,
            presence,
        ));
    }
    chain.extend(grammar);
    let temperature = effective_temperature(params);
    if temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if let Some(k) = params.top_k.filter(|k| *k > 0) {
            chain.push(LlamaSampler::top_k(k));
        }
        if let Some(p) = params.top_p.filter(|p| *p < 1.0) {
            chain.push(LlamaSampler::top_p(p, 1));
        }
        chain.push(LlamaSampler::temp(temperature));
        chain.push(LlamaSampler::dist(sampler_seed(params.seed)));
    }
    LlamaSampler::chain_simple(chain)
}

/// Sample one token through a chain that holds a grammar, by hand rather than with
/// `LlamaSampler::sample`: llama.cpp aborts the process (C++ exception or `GGML_ABORT`)
/// when a grammar is made to accept a token it forbids, which `sample` would do when the
/// grammar allows no token at all. Here that case is an error, and the token is accepted
/// through the exception-catching `try_accept`. `buf` is reused between tokens.
fn sample_with_grammar(
    sampler: &mut LlamaSampler,
    logits: &[f32],
    buf: &mut Vec<LlamaTokenData>,
) -> Result<LlamaToken, BackendError> {
    buf.clear();
    buf.extend(
        logits
            .iter()
            .enumerate()
            .map(|(i, &l)| LlamaTokenData::new(LlamaToken(i as i32), l, 0.0)),
    );
    let mut candidates = LlamaTokenDataArray::new(std::mem::take(buf), false);
    sampler.apply(&mut candidates);
    let chosen = candidates
        .selected
        .and_then(|i| candidates.data.get(i))
        .filter(|d| d.logit() > f32::NEG_INFINITY)
        .map(|d| d.id());
    *buf = candidates.data;
    let token = chosen.ok_or_else(|| {
        BackendError::BadRequest(
            "grammar: no token the model can produce fits the grammar at this point \
             (does it require a character the vocabulary cannot spell?)"
                .into(),
        )
    })?;
    sampler
        .try_accept(token)
        .map_err(|e| BackendError::internal(format!("grammar sampler failed: {e}")))?;
    Ok(token)
}

/// Log-probabilities at one position, from the model's logits row.
///
/// A log-softmax over the whole vocabulary of `logits / temperature` (plain logits when
/// greedy): the model's own distribution at the request's temperature, before penalties,
/// top-k, top-p and the grammar. The chosen token's text and bytes are its piece as it
/// appears in the generated text (`piece`); alternatives are rendered with special tokens
/// spelled out (an end-of-turn alternative reads `<|im_end|>`, not an empty string).
fn token_logprob(
    vocab: &llama_cpp_2::vocab::LlamaVocab<'_>,
    logits: &[f32],
    token: LlamaToken,
    piece: &[u8],
    temperature: f32,
    k: usize,
) -> TokenLogprob {
    let scale = if temperature > 0.0 {
        1.0 / temperature
    } else {
        1.0
    };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .map(|&l| f64::from(((l - max) * scale).exp()))
        .sum();
    let log_z = max * scale + sum.ln() as f32;
    // Rounding can put the most likely token a hair above 0.
    let logprob_of = |l: f32| (l * scale - log_z).min(0.0);
    let chosen = logits
        .get(token.0 as usize)
        .copied()
        .unwrap_or(f32::NEG_INFINITY);

    // The k largest logits, largest first (ties: lower token id first).
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if best.len() == k && l <= best[k - 1].0 {
                continue;
            }
            let at = best.partition_point(|&(v, _)| v >= l);
            best.insert(at, (l, i));
            best.truncate(k);
        }
    }
    let top = best
        .into_iter()
        .map(|(l, i)| {
            let bytes = vocab.token_to_piece(LlamaToken(i as i32), true, None);
            TopLogprob {
                token: String::from_utf8_lossy(&bytes).into_owned(),
                bytes,
                logprob: logprob_of(l),
            }
        })
        .collect();
    TokenLogprob {
        token: String::from_utf8_lossy(piece).into_owned(),
        bytes: piece.to_vec(),
        logprob: logprob_of(chosen),
        top,
    }
}

/// Why llama.cpp rejected a GBNF grammar, as far as a light scan can tell (llama.cpp's
/// parser prints its own reason only to stderr). Called only after llama.cpp has refused
/// the grammar, so a miss here never rejects a grammar llama.cpp accepts. `None` when the
/// scan finds nothing wrong.
pub(crate) fn explain_grammar_error(gbnf: &str) -> Option<String> {
    struct Name {
        text: String,
        line: usize,
        defines: bool,
    }
    let mut names: Vec<Name> = Vec::new();
    let mut prev_was_name = false;
    let mut depth = 0usize;
    let mut open_line = 0;
    let mut chars = gbnf.chars().peekable();
    let (mut line, mut col) = (1usize, 0usize);
    while let Some(c) = chars.next() {
        col += 1;
        let at = format!("line {line}, column {col}");
        let mut is_name = false;
        match c {
            '\n' => {
                line += 1;
                col = 0;
            }
            ' ' | '\t' | '\r' => {}
            '#' => while chars.next_if(|&c| c != '\n').is_some() {},
            '"' | '[' => {
                let close = if c == '"' { '"' } else { ']' };
                let mut closed = false;
                while let Some(d) = chars.next() {
                    col += 1;
                    if d == '\n' {
                        line += 1;
                        col = 0;
                    }
                    if d == '\\' {
                        chars.next();
                        col += 1;
                    } else if d == close {
                        closed = true;
                        break;
                    }
                }
                if !closed {
                    let what = if c == '"' {
                        "string"
                    } else {
                        "character class"
                    };
                    return Some(format!("unterminated {what} starting at {at}"));
                }
            }
            '<' => {
                if !chars.any(|d| d == '>') {
                    return Some(format!("unterminated token reference `<` at {at}"));
                }
            }
            '{' => {
                if !chars.any(|d| d == '}') {
                    return Some(format!("unterminated repetition `{{` at {at}"));
                }
            }
            ':' => {
                if !(chars.next_if_eq(&':').is_some() && chars.next_if_eq(&'=').is_some()) {
                    return Some(format!(
                        "unexpected `:` at {at} (a rule is written `name ::= ...`)"
                    ));
                }
                if !prev_was_name {
                    return Some(format!("`::=` at {at} does not follow a rule name"));
                }
                if let Some(last) = names.last_mut() {
                    last.defines = true;
                }
            }
            '(' => {
                if depth == 0 {
                    open_line = line;
                }
                depth += 1;
            }
            ')' => {
                if depth == 0 {
                    return Some(format!("unmatched `)` at {at}"));
                }
                depth -= 1;
            }
            '|' | '*' | '+' | '?' | '.' | '!' => {}
            '_' => {
                return Some(format!(
                    "`_` at {at}: rule names may contain only letters, digits and `-`"
                ));
            }
            c if c.is_ascii_alphanumeric() || c == '-' => {
                let mut text = String::from(c);
                while let Some(d) = chars.next_if(|d| d.is_ascii_alphanumeric() || *d == '-') {
                    text.push(d);
                    col += 1;
                }
                if let Some(&'_') = chars.peek() {
                    return Some(format!(
                        "`_` after `{text}` at line {line}: rule names may contain only \
                         letters, digits and `-`"
                    ));
                }
                names.push(Name {
                    text,
                    line,
                    defines: false,
                });
                is_name = true;
            }
            other => {
                return Some(format!("unexpected character {other:?} at {at}"));
            }
        }
        if !matches!(c, ' ' | '\t' | '\r') {
            prev_was_name = is_name;
        }
    }
    if depth > 0 {
        return Some(format!("unclosed `(` opened on line {open_line}"));
    }
    let defined: std::collections::HashSet<&str> = names
        .iter()
        .filter(|n| n.defines)
        .map(|n| n.text.as_str())
        .collect();
    if defined.is_empty() {
        return Some("no rules (a grammar is lines of the form `name ::= ...`)".into());
    }
    if !defined.contains("root") {
        return Some("no `root` rule (generation starts from the rule named `root`)".into());
    }
    if let Some(n) = names
        .iter()
        .find(|n| !n.defines && !defined.contains(n.text.as_str()))
    {
        return Some(format!(
            "rule `{}` (line {}) is used but never defined",
            n.text, n.line
        ));
    }
    None
}

type EventSender = mpsc::Sender<Result<GenerateEvent, BackendError>>;

/// Decrements the running-generation counter when a generation ends.
struct RunningGuard<'a>(&'a AtomicUsize);
impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
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

    /// The grammar sampler for a request's GBNF grammar (root rule `root`), or the
    /// reason the grammar is invalid. Each request gets its own (grammar state is the
    /// position reached in the grammar).
    fn grammar_sampler(&self, gbnf: &str) -> Result<LlamaSampler, BackendError> {
        LlamaSampler::grammar(&self.model, gbnf, "root").map_err(|e| {
            let reason = match e {
                GrammarError::GrammarNullBytes => "it contains a NUL byte".to_string(),
                _ => explain_grammar_error(gbnf).unwrap_or_else(|| {
                    "llama.cpp could not parse it (a syntax error, or left recursion; \
                     llama.cpp prints the details on the worker's stderr)"
                        .to_string()
                }),
            };
            BackendError::BadRequest(format!("invalid grammar: {reason}"))
        })
    }

    /// Run one generation on the current (dedicated) thread. Returns `Ok` also
    /// when the receiver went away (cancellation).
    fn generate(&self, params: GenerateParams, tx: &EventSender) -> Result<(), BackendError> {
        validate(&params)?;
        // Checked before anything else so that a bad grammar is the stream's first item.
        let grammar = params
            .grammar
            .as_deref()
            .map(|g| self.grammar_sampler(g))
            .transpose()?;
        let tokens = match params.prompt.as_deref() {
            Some(prompt) => self.tokenize_prompt(prompt),
            None => self.tokenize_prompt(&self.render_prompt(&params.messages)?),
        };
        let n_prompt = tokens.len();
        let ctx_len = self.context_length as usize;
        if n_prompt == 0 {
            return Err(BackendError::BadRequest(if params.prompt.is_some() {
                "prompt must not be empty".into()
            } else {
                "the rendered prompt is empty".into()
            }));
        }
        if n_prompt >= ctx_len {
            return Err(BackendError::BadRequest(format!(
                "prompt is {n_prompt} tokens but the model's context window is {ctx_len} tokens \
                 (prompt plus at least one generated token must fit); shorten the conversation"
            )));
        }
        let room = ctx_len - n_prompt;
        let max_new = params.max_new_tokens.map_or(room, |m| m as usize).min(room);
        let n_ctx = ((n_prompt + max_new).div_ceil(256) * 256).min(ctx_len) as u32;
        let n_batch = self.n_batch.min(n_ctx) as usize;
        if tx.is_closed() {
            return Ok(());
        }

        let running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        let _running = RunningGuard(&self.running);
        let threads = (self.n_threads / running).max(1) as i32;
        let ctx_params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_batch as u32)
            .with_n_ubatch(n_batch as u32)
            .with_n_seq_max(1)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let runtime = llama_runtime()?;
        let mut ctx = {
            let _lock = CONTEXT_CREATION.lock().unwrap_or_else(|p| p.into_inner());
            self.model.new_context(runtime, ctx_params)
        }
        .map_err(|e| BackendError::internal(format!("cannot create llama.cpp context: {e}")))?;
        // With a grammar, tokens are sampled by hand into this reused candidate buffer.
        let mut candidates = grammar.is_some().then(Vec::new);
        let mut sampler = build_sampler(&params, grammar, self.model.n_vocab(), n_ctx);
        let temperature = effective_temperature(&params);
        let top_logprobs = params.logprobs.map(usize::from);
        let vocab = self.model.vocab();
        let decode_err = |e: llama_cpp_2::DecodeError| {
            BackendError::internal(format!("llama.cpp decode failed: {e}"))
        };
        let batch_err = |e: llama_cpp_2::llama_batch::BatchAddError| {
            BackendError::internal(format!("llama.cpp batch error: {e}"))
        };

        // Prefill, in chunks of n_batch so that cancellation is noticed.
        let t_prefill = Instant::now();
        let mut batch = LlamaBatch::new(n_batch, 1);
        for (ci, chunk) in tokens.chunks(n_batch).enumerate() {
            if tx.is_closed() {
                return Ok(());
            }
            batch.clear();
            let last_chunk = (ci + 1) * n_batch >= n_prompt;
            for (j, &t) in chunk.iter().enumerate() {
                let pos = (ci * n_batch + j) as i32;
                batch
                    .add(t, pos, &[0], last_chunk && j + 1 == chunk.len())
                    .map_err(batch_err)?;
            }
            ctx.decode(&mut batch).map_err(decode_err)?;
        }
        let prefill_time = t_prefill.elapsed();

        // Decode loop.
        let t_decode = Instant::now();
        let mut utf8 = Utf8Stream::default();
        let mut stops = StopMatcher::new(&params.stop);
        let mut n_cur = n_prompt;
        let mut completion = 0usize;
        // Log-probabilities of the tokens generated since the last delta (only when asked).
        // They go out just before the next delta; those still here when generation ends
        // (text swallowed by a stop string, or tokens without text) are dropped.
        let mut pending: Vec<TokenLogprob> = Vec::new();
        let send = |text: String, pending: &mut Vec<TokenLogprob>| -> bool {
            if text.is_empty() {
                return true;
            }
            if !pending.is_empty() {
                let tokens = std::mem::take(pending);
                if tx
                    .blocking_send(Ok(GenerateEvent::Logprobs { tokens }))
                    .is_err()
                {
                    return false;
                }
            }
            tx.blocking_send(Ok(GenerateEvent::Delta { text })).is_ok()
        };
        let finish_reason = loop {
            let idx = batch.n_tokens() - 1;
            let token = match candidates.as_mut() {
                None => sampler.sample(&ctx, idx),
                Some(buf) => sample_with_grammar(&mut sampler, ctx.get_logits_ith(idx), buf)?,
            };
            if vocab.is_eog(token) {
                break FinishReason::Stop;
            }
            completion += 1;
            self.generated.fetch_add(1, Ordering::Relaxed);
            let piece = vocab.token_to_piece(token, false, None);
            if let Some(k) = top_logprobs {
                let logits = ctx.get_logits_ith(idx);
                pending.push(token_logprob(&vocab, logits, token, &piece, temperature, k));
            }
            let text = utf8.push(&piece);
            let (emit, stopped) = stops.push(&text);
            if !send(emit, &mut pending) {
                return Ok(());
            }
            if stopped {
                break FinishReason::Stop;
            }
            if completion >= max_new {
                break FinishReason::Length;
            }
            if tx.is_closed() {
                return Ok(());
            }
            batch.clear();
            batch
                .add(token, n_cur as i32, &[0], true)
                .map_err(batch_err)?;
            ctx.decode(&mut batch).map_err(decode_err)?;
            n_cur += 1;
        };
        if !stops.stopped {
            // Flush what was held back (incomplete UTF-8, possible stop prefix).
            let tail = utf8.finish();
            let (mut emit, stopped) = stops.push(&tail);
            if !stopped {
                emit.push_str(&stops.flush());
            }
            if !send(emit, &mut pending) {
                return Ok(());
            }
        }
        let decode_time = t_decode.elapsed();
        tracing::debug!(
            prompt_tokens = n_prompt,
            completion_tokens = completion,
            threads,
            n_ctx,
            prefill_tok_s = n_prompt as f64 / prefill_time.as_secs_f64().max(1e-9),
            decode_tok_s = completion as f64 / decode_time.as_secs_f64().max(1e-9),
            finish_reason = %finish_reason,
            "generation finished"
        );
        let _ = tx.blocking_send(Ok(GenerateEvent::Finish {
            finish_reason,
            usage: Some(Usage::new(n_prompt as u32, completion as u32)),
        }));
        Ok(())
    }
}

impl LlmBackend for LlamaCppBackend {
    fn generate_stream(
        &self,
        params: GenerateParams,
    ) -> BoxStream<'static, Result<GenerateEvent, BackendError>> {
        let inner = self.inner.clone();
        let start = async move {
            // Waiting for a slot is cancellable: dropping the stream drops this future.
            let permit = match inner.slots.clone().acquire_owned().await {
                Ok(p) => p,
                Err(_) => return error_stream(BackendError::internal("model is shutting down")),
            };
            let (tx, rx) = mpsc::channel(EVENT_BUFFER);
            let spawned = std::thread::Builder::new()
                .name("llama-generate".into())
                .spawn(move || {
                    let _permit = permit;
                    if let Err(e) = inner.generate(params, &tx) {
                        let _ = tx.blocking_send(Err(e));
                    }
                });
            if let Err(e) = spawned {
                return error_stream(BackendError::internal(format!(
                    "cannot spawn generation thread: {e}"
                )));
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
}

/// Incremental UTF-8 decoder: tokens may end in the middle of a multi-byte
/// character; those bytes are held until the character is complete. Invalid
/// bytes become U+FFFD.
#[derive(Debug, Default)]
pub(crate) struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Add bytes; return the text that is now complete.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(&self.pending[..valid]).expect("validated prefix"),
                    );
                    match e.error_len() {
                        // Incomplete character at the end: keep it for later.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + n);
                        }
                    }
                }
            }
        }
    }

    /// End of stream: whatever is left, lossily decoded.
    pub(crate) fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

/// Stop-string detection over streamed text. Text that might be the start of
/// a stop string is held back until it is known not to be one, so emitted
/// text never contains any part of a matched stop string.
#[derive(Debug, Default)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    held: String,
    pub(crate) stopped: bool,
}

impl StopMatcher {
    pub(crate) fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Add text; returns (text safe to emit, whether a stop string matched).
    /// After a match, the text from the stop string on is discarded.
    pub(crate) fn push(&mut self, text: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.held.push_str(text);
        if let Some(idx) = self.stops.iter().filter_map(|s| self.held.find(s)).min() {
            let out = self.held[..idx].to_string();
            self.held.clear();
            self.stopped = true;
            return (out, true);
        }
        let hold = self.partial_suffix_len();
        let cut = self.held.len() - hold;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of a
    /// stop string.
    fn partial_suffix_len(&self) -> usize {
        let h = &self.held;
        let mut best = 0;
        for s in &self.stops {
            for k in (best + 1..s.len().min(h.len() + 1)).rev() {
                if s.is_char_boundary(k) && h.is_char_boundary(h.len() - k) && h.ends_with(&s[..k])
                {
                    best = k;
                    break;
                }
            }
        }
        best
    }

    /// Release held-back text (end of generation without a match).
    pub(crate) fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests;
