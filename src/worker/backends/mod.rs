//! Model backends: the engines a worker hosts. This layer owns turning a chat
//! request ([`GenerateParams`]) into a stream of text deltas plus a final
//! finish reason and token usage ([`LlmBackend`]), and turning texts into
//! embedding vectors ([`EmbeddingBackend`]) or a query and documents into
//! relevance scores ([`RerankBackend`]). The implementations: GGUF chat models
//! run in-process through llama.cpp ([`llama`], feature `local-models`), BERT
//! sentence-embedding models and BERT or XLM-RoBERTa cross-encoder rerankers run in-process
//! through candle ([`embedding`], [`reranker`], feature `local-models`), and any
//! OpenAI-compatible HTTP server (vLLM, llama-server, Ollama, OpenAI) reached
//! through [`proxy`]. Everything above this layer (worker manager, DB-GPT wire
//! format, HTTP status codes, registration) is someone else's job: backends
//! only report typed [`BackendError`]s, never HTTP responses. Heavy CPU work
//! never runs on the async executor, and dropping a generation stream cancels
//! the generation.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

#[cfg_attr(not(feature = "local-models"), allow(dead_code))]
pub(crate) mod batcher;
#[cfg(feature = "local-models")]
pub(crate) mod bert;
#[cfg(feature = "local-models")]
pub(crate) mod embedding;
#[cfg(feature = "local-models")]
pub(crate) mod llama;
#[cfg(feature = "local-models")]
pub(crate) mod packed;
pub(crate) mod proxy;
#[cfg(feature = "local-models")]
pub(crate) mod reranker;

pub use batcher::BatchConfig;
#[cfg(feature = "local-models")]
pub use embedding::{BertEmbeddingBackend, BertEmbeddingConfig};
#[cfg(feature = "local-models")]
pub use llama::{LlamaCppBackend, LlamaCppConfig};
pub use proxy::{OpenAiProxyBackend, OpenAiProxyConfig, ProxyTimeouts};
#[cfg(feature = "local-models")]
pub use reranker::{BertRerankerBackend, RerankerConfig, fixture};

/// Process-wide settings the local engines read from the environment once, set for a worker
/// process before any thread exists (environment writes are sound only then): candle runs
/// elementwise operations over more than 64K values on a pool of helper threads of its own,
/// one per core, outside a model's thread pool ([`BatchConfig::threads`]); on a busy
/// machine the forward pass then spins waiting for a descheduled helper, which was a third
/// of the worker's CPU at 8 concurrent embedding requests (perf: candle's `BarrierGuard`
/// and `candle-bp` threads; 12.4 → 7.7 ms of CPU per text without them). One thread runs
/// them inline. And candle asks for its thread count on every matrix product: without
/// `RAYON_NUM_THREADS` that means parsing `/proc/cpuinfo` each time (~6% of a single-text
/// request's CPU, perf), so it is set to the logical core count, rayon's own default (gemm
/// then splits a product into that many parts, which the model's pool runs). Values the
/// user set are kept.
///
/// # Safety
/// No other thread may be running (it could read the environment concurrently).
pub unsafe fn init_process_env() {
    #[cfg(feature = "local-models")]
    {
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            // SAFETY: the caller guarantees that this is the only thread.
            unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
        }
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            // SAFETY: as above.
            unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
        }
    }
}

/// Who wrote a chat message.
///
/// Parses both DB-GPT's role names (`system`, `human`, `ai`) and OpenAI's
/// (`system`, `user`, `assistant`), ASCII case-insensitively. Any other role is
/// an error: a message is never dropped silently (DB-GPT's proxy path drops
/// unknown roles; we refuse them instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// System prompt.
    System,
    /// The user (`human` in DB-GPT, `user` in OpenAI).
    User,
    /// The model (`ai` in DB-GPT, `assistant` in OpenAI).
    Assistant,
}

impl Role {
    /// Parse a DB-GPT or OpenAI role name.
    pub fn parse(role: &str) -> Result<Role, BackendError> {
        let r = role.trim();
        if r.eq_ignore_ascii_case("system") {
            Ok(Role::System)
        } else if r.eq_ignore_ascii_case("human") || r.eq_ignore_ascii_case("user") {
            Ok(Role::User)
        } else if r.eq_ignore_ascii_case("ai") || r.eq_ignore_ascii_case("assistant") {
            Ok(Role::Assistant)
        } else {
            Err(BackendError::BadRequest(format!(
                "unknown message role {role:?} (expected one of system, human, ai, user, assistant)"
            )))
        }
    }

    /// The OpenAI name of this role (`system`, `user`, `assistant`); also what
    /// chat templates expect.
    pub fn openai_name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    /// The DB-GPT name of this role (`system`, `human`, `ai`).
    pub fn dbgpt_name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "human",
            Role::Assistant => "ai",
        }
    }
}

impl FromStr for Role {
    type Err = BackendError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::parse(s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.openai_name())
    }
}

/// Serialises as the OpenAI name.
impl Serialize for Role {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.openai_name())
    }
}

/// Accepts DB-GPT and OpenAI names; anything else is a deserialisation error.
impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Role::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Author of the message.
    pub role: Role,
    /// Text of the message.
    pub content: String,
}

impl ChatMessage {
    /// Shorthand constructor.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        ChatMessage {
            role,
            content: content.into(),
        }
    }
}

/// A chat generation request. `None` means "backend default" (for the proxy:
/// not sent upstream, so the upstream's default applies).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerateParams {
    /// Conversation, oldest first.
    pub messages: Vec<ChatMessage>,
    /// Sampling temperature; `0` means greedy decoding.
    pub temperature: Option<f32>,
    /// Nucleus sampling threshold in `(0, 1]`.
    pub top_p: Option<f32>,
    /// Top-k sampling; `<= 0` disables it.
    pub top_k: Option<i32>,
    /// Maximum number of tokens to generate.
    pub max_new_tokens: Option<u32>,
    /// Stop strings: generation ends at the first occurrence of any of them,
    /// and the text is truncated before it (finish reason `stop`).
    pub stop: Vec<String>,
    /// RNG seed for reproducible sampling.
    pub seed: Option<u64>,
    /// OpenAI-style presence penalty.
    pub presence_penalty: Option<f32>,
    /// OpenAI-style frequency penalty.
    pub frequency_penalty: Option<f32>,
    /// A GBNF grammar (llama.cpp's format, root rule `root`) that every generated token must
    /// fit: how structured output and forced tool calls are made. Backends that cannot
    /// constrain generation refuse it with [`BackendError::BadRequest`].
    pub grammar: Option<String>,
    /// Report log-probabilities: `Some(k)` sends a [`GenerateEvent::Logprobs`] before each
    /// [`GenerateEvent::Delta`], with each token's own log-probability and its `k` (0–20)
    /// most likely alternatives. Backends that cannot refuse it with `BadRequest`.
    pub logprobs: Option<u8>,
    /// A prompt the caller has already rendered (a chat template applied, or a text
    /// completion's prompt): when set, `messages` is ignored and the backend tokenizes this
    /// text as is, special tokens included.
    pub prompt: Option<String>,
}

/// One generated token's log-probability (natural log), with its alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token's text (lossy UTF-8 when the token is part of a character).
    pub token: String,
    /// The token's exact bytes.
    pub bytes: Vec<u8>,
    /// Its log-probability under the model's distribution (before grammar and sampling
    /// filters other than temperature).
    pub logprob: f32,
    /// The most likely tokens at this position, most likely first (as many as asked).
    pub top: Vec<TopLogprob>,
}

/// One alternative token at a position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// Token accounting for one generation (the worker protocol's type, reported as is).
pub use crate::wire::worker::Usage;

/// Why a generation ended. Serialises as OpenAI's strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-generation token or a stop string.
    Stop,
    /// `max_new_tokens` reached, or the context window is full.
    Length,
    /// Upstream (proxy only) filtered the content.
    ContentFilter,
    /// Upstream (proxy only) stopped to call tools.
    ToolCalls,
}

impl FinishReason {
    /// The OpenAI string (`stop`, `length`, `content_filter`, `tool_calls`).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContentFilter => "content_filter",
            FinishReason::ToolCalls => "tool_calls",
        }
    }

    /// Map an upstream finish reason string; unknown values (e.g. `eos`)
    /// count as `stop`.
    pub fn from_upstream(s: &str) -> FinishReason {
        match s {
            "length" => FinishReason::Length,
            "content_filter" => FinishReason::ContentFilter,
            "tool_calls" | "function_call" => FinishReason::ToolCalls,
            _ => FinishReason::Stop,
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One item of a generation stream: zero or more [`GenerateEvent::Delta`]s,
/// then exactly one [`GenerateEvent::Finish`] (unless an error ends the
/// stream first; an `Err` item is always the last item).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GenerateEvent {
    /// New text, to append to everything received so far. Never empty.
    Delta {
        /// The new text (valid UTF-8; never splits a character).
        text: String,
    },
    /// Only when [`GenerateParams::logprobs`] asked: the tokens whose text the next `Delta`
    /// carries, with their log-probabilities (a token cut by a stop string is still listed).
    Logprobs { tokens: Vec<TokenLogprob> },
    /// End of generation.
    Finish {
        /// Why generation ended.
        finish_reason: FinishReason,
        /// Token usage. Always present for local models; for the proxy it is
        /// `None` when the upstream does not report usage.
        usage: Option<Usage>,
    },
}

/// Errors a backend reports. The HTTP layer maps them to status codes:
/// `BadRequest` → 400, `Upstream` → the upstream status (or 502 without one),
/// `Internal` → 500, `Load` → 500 at model start.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// The request is invalid (bad parameter, unknown role, prompt longer
    /// than the context window, ...).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The proxy's upstream failed. `status` is the upstream HTTP status, or
    /// `None` when there was no usable HTTP response (connection refused,
    /// timeout, malformed stream).
    #[error("upstream error{}: {message}", .status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Upstream {
        /// Upstream HTTP status, if a response was received.
        status: Option<u16>,
        /// The upstream's error message (from OpenAI error JSON when present).
        message: String,
    },
    /// The model failed while running (decode failure, tensor error, ...).
    #[error("model error: {0}")]
    Internal(String),
    /// The model is busy: every sequence slot is taken and its wait queue is full, or the
    /// request waited for a slot past the queue's deadline. Nothing was generated; the
    /// request may be retried later or on another instance (HTTP 503 with `Retry-After`).
    #[error("model overloaded: {message}")]
    Overloaded {
        message: String,
        /// Seconds the client should wait before trying again.
        retry_after_secs: u32,
    },
    /// The model could not be loaded. The message names the offending path.
    #[error("cannot load model from {}: {message}", .path.display())]
    Load {
        /// File or directory that could not be loaded.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl BackendError {
    /// Convenience constructor for [`BackendError::Load`].
    pub fn load(path: impl Into<PathBuf>, message: impl fmt::Display) -> Self {
        BackendError::Load {
            path: path.into(),
            message: message.to_string(),
        }
    }

    /// Convenience constructor for [`BackendError::Internal`].
    pub fn internal(message: impl fmt::Display) -> Self {
        BackendError::Internal(message.to_string())
    }
}

/// A stream holding just one error (for failures before generation starts).
pub(crate) fn error_stream(
    e: BackendError,
) -> BoxStream<'static, Result<GenerateEvent, BackendError>> {
    use futures::StreamExt;
    futures::stream::iter([Err(e)]).boxed()
}

/// Slot and queue usage of a local model's scheduler (see `llama::scheduler`), for the
/// worker's status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineStatus {
    /// Sequence slots (`--parallel`).
    pub slots: usize,
    /// Slots running a generation.
    pub busy: usize,
    /// Requests waiting for a slot, and how many may (`--max_queue`).
    pub queued: usize,
    pub max_queue: usize,
    /// Context window of one slot, in tokens.
    pub slot_context: usize,
    /// Idle slots whose KV cells hold a cached prompt, and the tokens they hold.
    pub cached_slots: usize,
    pub cached_tokens: usize,
    /// Since load: tokens generated, prompt tokens admitted, and how many of those came
    /// from the prefix cache.
    pub generated_tokens: u64,
    pub prompt_tokens: u64,
    pub reused_prompt_tokens: u64,
}

impl fmt::Display for EngineStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "slots {}/{} busy, queued {}/{}, slot context {}, cached {} slots ({} tokens), \
             prompt tokens {} ({} from cache), generated {}",
            self.busy,
            self.slots,
            self.queued,
            self.max_queue,
            self.slot_context,
            self.cached_slots,
            self.cached_tokens,
            self.prompt_tokens,
            self.reused_prompt_tokens,
            self.generated_tokens
        )
    }
}

/// A chat model. Streams and futures returned by backends must be polled
/// inside a tokio runtime (the proxy uses reqwest, the embedding model uses
/// `spawn_blocking`).
pub trait LlmBackend: Send + Sync {
    /// Start generating. The stream yields text deltas then one finish event.
    /// Dropping the stream cancels the generation promptly (the model stops
    /// within one decoded token or one prompt chunk). Nothing happens until
    /// the stream is first polled.
    fn generate_stream(
        &self,
        params: GenerateParams,
    ) -> BoxStream<'static, Result<GenerateEvent, BackendError>>;

    /// Number of tokens in `text` (no special tokens added). Cheap; may be
    /// called on the async executor.
    fn count_tokens(&self, text: &str) -> Result<usize, BackendError>;

    /// Context window in tokens (prompt + completion).
    fn context_length(&self) -> usize;

    /// The model's own chat template (the Jinja text a Hugging Face
    /// `tokenizer_config.json` or a GGUF's `tokenizer.chat_template` carries),
    /// when the model has one. `None` when it has none or the backend cannot
    /// know it (the proxy).
    fn chat_template(&self) -> Option<&str> {
        None
    }

    /// The OpenAI-compatible upstream this model forwards whole OpenAI requests to (the
    /// proxy backend), or `None` for a model that runs here.
    fn passthrough(&self) -> Option<&dyn OpenAiPassthrough> {
        None
    }

    /// Slot and queue usage, for a backend that schedules its own requests (llama.cpp:
    /// its slots and bounded queue admit requests, so the worker puts no limit of its own
    /// in front). `None` for the others.
    fn engine_status(&self) -> Option<EngineStatus> {
        None
    }
}

/// A model behind an OpenAI-compatible server that takes the client's OpenAI request as
/// it is: the proxy backend.
pub trait OpenAiPassthrough: Send + Sync {
    /// Sends `body` (an OpenAI request for `path`, `chat/completions`, `completions` or
    /// `embeddings`) upstream with its `model` set to the upstream's model name and every
    /// other byte unchanged, and answers the upstream's status, content type and body
    /// bytes unchanged. The wait for the answer's head is bounded, and so is every silence
    /// of its body. Errors are the failures to get an answer at all.
    fn forward(
        &self,
        path: &'static str,
        body: bytes::Bytes,
        model: crate::openai::raw::ModelField,
    ) -> BoxFuture<'static, Result<Passthrough, BackendError>>;
}

/// An upstream's answer, relayed as it comes.
pub struct Passthrough {
    /// The upstream's HTTP status.
    pub status: u16,
    /// The upstream's `Content-Type`, when it sent one.
    pub content_type: Option<String>,
    /// The body as it arrives; an error item ends it (the upstream broke or went silent).
    pub body: BoxStream<'static, Result<bytes::Bytes, BackendError>>,
}

/// A text-embedding model.
pub trait EmbeddingBackend: Send + Sync {
    /// Embed every input; the result has one vector per input, in order.
    /// Dropping the future stops work at the next sub-batch boundary.
    fn embed(&self, inputs: Vec<String>)
    -> BoxFuture<'static, Result<Vec<Vec<f32>>, BackendError>>;

    /// Vector dimension, when known (local models: always; proxy: after the
    /// first successful call, or when configured).
    fn dimension(&self) -> Option<usize>;

    /// How many tokens the model reads for all of `texts` together: OpenAI's
    /// `usage.prompt_tokens`. Counts what [`EmbeddingBackend::embed`] feeds the model:
    /// special tokens included, each text after the truncation `embed` applies, padding
    /// excluded. Blocking, and proportional to the size of the texts (it tokenizes them):
    /// call it from `spawn_blocking`. A backend that cannot know (the proxy: the upstream's
    /// tokenizer is not here) answers an error.
    fn count_tokens(&self, texts: &[String]) -> Result<usize, BackendError>;

    /// See [`LlmBackend::passthrough`].
    fn passthrough(&self) -> Option<&dyn OpenAiPassthrough> {
        None
    }
}

/// A reranker (cross-encoder): scores how relevant each document is to a query.
pub trait RerankBackend: Send + Sync {
    /// One score per document, in order (higher is more relevant). Dropping the future
    /// stops work at the next sub-batch boundary.
    fn rerank(
        &self,
        query: String,
        documents: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<f32>, BackendError>>;
}

/// Directory holding the real test models: `$DBGPT_MODELS_DIR`, else
/// `$HOME/.cache/dbgpt-cluster/models`.
#[cfg(all(test, feature = "local-models"))]
pub(crate) fn test_models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DBGPT_MODELS_DIR") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").expect("HOME is not set");
    PathBuf::from(home).join(".cache/dbgpt-cluster/models")
}

/// Path of a required test model file; panics (test failure, not a skip)
/// when it is missing.
#[cfg(all(test, feature = "local-models"))]
pub(crate) fn require_test_model(name: &str) -> PathBuf {
    let p = test_models_dir().join(name);
    assert!(
        p.exists(),
        "test model {} is missing: run scripts/fetch-models.sh (or set DBGPT_MODELS_DIR)",
        p.display()
    );
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_dbgpt_and_openai_names() {
        assert_eq!(Role::parse("human").unwrap(), Role::User);
        assert_eq!(Role::parse("user").unwrap(), Role::User);
        assert_eq!(Role::parse("ai").unwrap(), Role::Assistant);
        assert_eq!(Role::parse("assistant").unwrap(), Role::Assistant);
        assert_eq!(Role::parse("system").unwrap(), Role::System);
        assert_eq!("Human".parse::<Role>().unwrap(), Role::User);
        assert!(matches!(
            Role::parse("bogus"),
            Err(BackendError::BadRequest(m)) if m.contains("bogus")
        ));
        assert!(Role::parse("view").is_err());
        assert!(Role::parse("").is_err());
    }

    #[test]
    fn roles_serde() {
        let m: ChatMessage = serde_json::from_str(r#"{"role":"human","content":"hi"}"#).unwrap();
        assert_eq!(m, ChatMessage::new(Role::User, "hi"));
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"role":"user","content":"hi"}"#
        );
        assert!(serde_json::from_str::<ChatMessage>(r#"{"role":"bogus","content":"x"}"#).is_err());
        assert_eq!(Role::Assistant.dbgpt_name(), "ai");
    }

    #[test]
    fn finish_reason_and_usage_serde() {
        assert_eq!(
            serde_json::to_string(&FinishReason::Stop).unwrap(),
            r#""stop""#
        );
        assert_eq!(
            serde_json::to_string(&FinishReason::Length).unwrap(),
            r#""length""#
        );
        assert_eq!(FinishReason::from_upstream("length"), FinishReason::Length);
        assert_eq!(FinishReason::from_upstream("eos"), FinishReason::Stop);
        assert_eq!(Usage::new(3, 4).total_tokens, 7);
    }

    #[test]
    fn error_display() {
        let e = BackendError::Upstream {
            status: Some(401),
            message: "bad key".into(),
        };
        assert_eq!(e.to_string(), "upstream error (HTTP 401): bad key");
        let e = BackendError::load("/x/model.gguf", "missing");
        assert!(e.to_string().contains("/x/model.gguf"));
    }
}
