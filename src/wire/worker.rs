//! The worker protocol (DB-GPT 0.5.10's `/api/worker/*`, reference §3.2–§3.5 and §6), used by
//! the worker that serves it, the apiserver and the chat CLI that call it.
//!
//! It owns the route paths, the worker types ([`WorkerType`], the only spelling of `llm` and
//! `text2vec`), the generation request ([`PromptRequest`], built by the callers and validated
//! by the worker), the generation frame ([`ModelOutput`], written by the worker, read back
//! leniently and fast as a [`Frame`]), the NUL-terminated framing of `generate_stream`
//! ([`encode_frame`], [`next_frame`]), token counts ([`Usage`]) and the lifecycle and metadata
//! answers ([`WorkerApplyOutput`], [`SupportedModel`], [`ModelMetadata`], …).

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::validate::{Fields, ValidationErrors};

/// `POST`: one generation, answered as frames of cumulative text, each followed by a NUL.
pub const GENERATE_STREAM_PATH: &str = "/api/worker/generate_stream";
/// `POST`: one generation, answered as its last frame.
pub const GENERATE_PATH: &str = "/api/worker/generate";
/// `POST`: embeddings of a list of texts (or a reranker's scores).
pub const EMBEDDINGS_PATH: &str = "/api/worker/embeddings";
/// `POST` (ours; DB-GPT's workers answer 404): an OpenAI chat completion request, answered
/// in OpenAI's shape. Callers fall back to [`GENERATE_STREAM_PATH`] on a 404 that is not an
/// OpenAI error object ([`is_route_missing`]).
pub const OPENAI_CHAT_PATH: &str = "/api/worker/openai/v1/chat/completions";
/// `POST` (ours): an OpenAI text completion request, answered in OpenAI's shape.
pub const OPENAI_COMPLETIONS_PATH: &str = "/api/worker/openai/v1/completions";
/// `POST` (ours): an OpenAI embeddings request, answered in OpenAI's shape.
pub const OPENAI_EMBEDDINGS_PATH: &str = "/api/worker/openai/v1/embeddings";

/// Whether a 404 answer to one of the `OPENAI_*_PATH` routes means the worker has no such
/// route (a DB-GPT worker, or one of ours older than them: FastAPI's `{"detail": …}`), as
/// opposed to an OpenAI error object about the request (`{"error": …}`).
pub fn is_route_missing(status: u16, body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(default)]
        error: Option<serde::de::IgnoredAny>,
    }
    status == 404 && serde_json::from_slice::<Probe>(body).map_or(true, |p| p.error.is_none())
}

/// `POST`: the number of tokens of a prompt.
pub const COUNT_TOKEN_PATH: &str = "/api/worker/count_token";
/// `POST`: a model's [`ModelMetadata`].
pub const MODEL_METADATA_PATH: &str = "/api/worker/model_metadata";
/// `POST`: start, stop, restart or update models ([`WorkerApplyOutput`]).
pub const APPLY_PATH: &str = "/api/worker/apply";
/// `GET`: the parameters a model type takes ([`ParameterDescription`]s).
pub const PARAMETER_DESCRIPTIONS_PATH: &str = "/api/worker/parameter/descriptions";
/// `GET`: the models this worker can run ([`WorkerSupportedModel`]).
pub const MODELS_SUPPORTS_PATH: &str = "/api/worker/models/supports";
/// `POST`: start one model.
pub const MODELS_STARTUP_PATH: &str = "/api/worker/models/startup";
/// `POST`: stop one model.
pub const MODELS_SHUTDOWN_PATH: &str = "/api/worker/models/shutdown";

/// DB-GPT worker types. `reranker` is DB-GPT 0.7's (a cross-encoder scoring documents
/// against a query, reached through [`EMBEDDINGS_PATH`] with a `query`); 0.5 serves rerankers
/// as `text2vec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WorkerType {
    Llm,
    Text2vec,
    Reranker,
}

impl WorkerType {
    /// The wire spelling (`llm`, `text2vec`, `reranker`), as in worker keys.
    pub const fn as_str(self) -> &'static str {
        match self {
            WorkerType::Llm => "llm",
            WorkerType::Text2vec => "text2vec",
            WorkerType::Reranker => "reranker",
        }
    }

    /// Exactly the wire spelling (the type part of a registry key).
    pub fn from_wire(s: &str) -> Option<Self> {
        match s {
            "llm" => Some(WorkerType::Llm),
            "text2vec" => Some(WorkerType::Text2vec),
            "reranker" => Some(WorkerType::Reranker),
            _ => None,
        }
    }

    /// What a user may type: case-insensitive, with `embedding(s)` for `text2vec` and
    /// `rerank` for `reranker`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "llm" => Some(WorkerType::Llm),
            "text2vec" | "embedding" | "embeddings" => Some(WorkerType::Text2vec),
            "reranker" | "rerank" => Some(WorkerType::Reranker),
            _ => None,
        }
    }
}

/// Token accounting for one generation, in OpenAI's shape (with `total_tokens`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the (templated) prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// `prompt_tokens + completion_tokens` unless an upstream said otherwise.
    pub total_tokens: u32,
    /// OpenAI's `prompt_tokens_details`: how many prompt tokens came from the prefix cache
    /// (llama.cpp models always report it; absent when unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// OpenAI's `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV cells were reused rather than computed.
    #[serde(default)]
    pub cached_tokens: u32,
}

impl Usage {
    /// A usage record with the total computed (counts saturate at `u32::MAX`).
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            prompt_tokens_details: None,
        }
    }

    /// The same usage reporting `cached` prompt tokens from the prefix cache.
    pub fn with_cached(mut self, cached: u32) -> Self {
        self.prompt_tokens_details = Some(PromptTokensDetails {
            cached_tokens: cached,
        });
        self
    }

    /// Adds `cached` prompt tokens from the prefix cache (reported from then on).
    pub fn add_cached(&mut self, cached: u32) {
        let d = self
            .prompt_tokens_details
            .get_or_insert_with(Default::default);
        d.cached_tokens = d.cached_tokens.saturating_add(cached);
    }

    /// Adds `other`'s counts (saturating), total included.
    pub fn add(&mut self, prompt_tokens: u32, completion_tokens: u32) {
        self.prompt_tokens = self.prompt_tokens.saturating_add(prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(completion_tokens);
        self.total_tokens = self.prompt_tokens.saturating_add(self.completion_tokens);
    }
}

/// One generation frame (DB-GPT 0.5/0.6 `ModelOutput`) as the worker writes it: `text` is
/// the *cumulative* text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelOutput {
    pub text: String,
    pub error_code: i32,
    #[serde(default)]
    pub incremental: bool,
    #[serde(default)]
    pub model_context: Option<Value>,
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// Read leniently: anything but an object is no usage.
    #[serde(default, deserialize_with = "lenient_usage")]
    pub usage: Option<Usage>,
    #[serde(default)]
    pub metrics: Option<Value>,
}

impl ModelOutput {
    pub fn text(text: String) -> Self {
        ModelOutput {
            text,
            error_code: 0,
            incremental: false,
            model_context: None,
            finish_reason: None,
            usage: None,
            metrics: None,
        }
    }

    /// DB-GPT's generation error frame.
    pub fn error(message: &str) -> Self {
        ModelOutput {
            error_code: 1,
            ..ModelOutput::text(format!(
                "**LLMServer Generate Error, Please CheckErrorInfo.**: {message}"
            ))
        }
    }
}

/// One `generate_stream` frame on the wire: the JSON of `out` and its NUL terminator.
pub fn encode_frame(out: &ModelOutput) -> Bytes {
    let mut b = serde_json::to_vec(out).expect("ModelOutput serialises");
    b.push(0);
    Bytes::from(b)
}

/// Takes the next complete frame (without its NUL) off the front of `buf`, skipping blank
/// ones; `None` while no NUL-terminated frame is left (the partial tail stays in `buf`).
pub fn next_frame(buf: &mut BytesMut) -> Option<BytesMut> {
    loop {
        let pos = buf.iter().position(|&b| b == 0)?;
        let mut piece = buf.split_to(pos + 1);
        piece.truncate(pos);
        if piece.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        return Some(piece);
    }
}

/// One frame of a worker's output as a caller reads it (DB-GPT's ModelOutput, the fields we
/// use), from any DB-GPT version.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Frame {
    /// Cumulative text so far (the error message when `error_code != 0`).
    pub text: String,
    pub error_code: i64,
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
}

/// A frame that is not a ModelOutput JSON object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the worker sent a malformed frame: {snippet}")]
pub struct MalformedFrame {
    /// The first 200 bytes of the frame.
    pub snippet: String,
}

/// ModelOutput as it arrives; unknown keys (`model_context`, `metrics`, …) are skipped.
#[derive(Deserialize)]
struct RawFrame {
    #[serde(default)]
    text: Option<String>,
    /// DB-GPT 0.7+ calls `text` `content`.
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    error_code: Option<Value>,
    #[serde(default)]
    finish_reason: Option<Value>,
    #[serde(default)]
    usage: LenientUsage,
}

/// A frame's `usage`: the token counts when it is an object (missing or non-integer counts
/// are 0, counts past `u32::MAX` saturate, the total is their sum), nothing for any other
/// value — read without building a map.
#[derive(Default)]
struct LenientUsage(Option<Usage>);

fn lenient_usage<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Usage>, D::Error> {
    LenientUsage::deserialize(d).map(|u| u.0)
}

impl<'de> Deserialize<'de> for LenientUsage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = LenientUsage;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a usage object or any other value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<LenientUsage, A::Error> {
                let mut u = Usage::default();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    let slot = match key.as_ref() {
                        "prompt_tokens" => &mut u.prompt_tokens,
                        "completion_tokens" => &mut u.completion_tokens,
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                            continue;
                        }
                    };
                    let n = map.next_value::<Value>()?.as_u64().unwrap_or(0);
                    *slot = n.min(u64::from(u32::MAX)) as u32;
                }
                Ok(LenientUsage(Some(Usage::new(
                    u.prompt_tokens,
                    u.completion_tokens,
                ))))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<LenientUsage, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(LenientUsage(None))
            }
            fn visit_unit<E>(self) -> Result<LenientUsage, E> {
                Ok(LenientUsage(None))
            }
            fn visit_none<E>(self) -> Result<LenientUsage, E> {
                Ok(LenientUsage(None))
            }
            fn visit_some<D: serde::Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<LenientUsage, D::Error> {
                d.deserialize_any(V)
            }
            fn visit_bool<E>(self, _: bool) -> Result<LenientUsage, E> {
                Ok(LenientUsage(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<LenientUsage, E> {
                Ok(LenientUsage(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<LenientUsage, E> {
                Ok(LenientUsage(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<LenientUsage, E> {
                Ok(LenientUsage(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<LenientUsage, E> {
                Ok(LenientUsage(None))
            }
        }
        d.deserialize_any(V)
    }
}

impl Frame {
    fn from_raw(r: RawFrame) -> Frame {
        let text = match (r.text, r.content) {
            (Some(t), _) => t,
            (None, Some(Value::String(c))) => c,
            _ => String::new(),
        };
        let usage = r.usage.0;
        Frame {
            text,
            error_code: r.error_code.as_ref().and_then(Value::as_i64).unwrap_or(0),
            finish_reason: match r.finish_reason {
                Some(Value::String(s)) if !s.is_empty() => Some(s),
                _ => None,
            },
            usage,
        }
    }

    /// Reads a ModelOutput.
    pub fn from_json(v: &Value) -> Option<Frame> {
        if !v.is_object() {
            return None;
        }
        serde_json::from_value::<RawFrame>(v.clone())
            .ok()
            .map(Frame::from_raw)
    }
}

/// Reads one ModelOutput frame (the bytes between two NULs, or a whole `generate` answer).
pub fn parse_frame(piece: &[u8]) -> Result<Frame, MalformedFrame> {
    serde_json::from_slice::<RawFrame>(piece)
        .ok()
        .map(Frame::from_raw)
        .ok_or_else(|| MalformedFrame {
            snippet: String::from_utf8_lossy(&piece[..piece.len().min(200)]).into_owned(),
        })
}

/// One message of a [`PromptRequest`] (DB-GPT's `ModelMessage`). Roles are kept as sent
/// (`system`/`human`/`ai` or OpenAI's); the worker maps them.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct PromptMessage<'a> {
    pub role: Cow<'a, str>,
    pub content: Cow<'a, str>,
    /// Always 0 as sent (DB-GPT's default); not read.
    pub round_index: u32,
}

impl<'a> PromptMessage<'a> {
    /// A message borrowing its role and content.
    pub fn new(role: &'a str, content: &'a str) -> Self {
        PromptMessage {
            role: Cow::Borrowed(role),
            content: Cow::Borrowed(content),
            round_index: 0,
        }
    }
}

/// DB-GPT's `PromptRequest`: built (borrowing) and serialised by the callers with only the
/// options that were set, validated into an owned value by the worker.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct PromptRequest<'a> {
    pub model: Cow<'a, str>,
    pub messages: Vec<PromptMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Cow<'a, str>>,
    pub echo: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<i64>,
    /// Sent as a plain string when there is one (DB-GPT 0.5.x workers take `stop` as a
    /// string only), as a list when there are several, not at all when there is none.
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "one_or_many")]
    pub stop: Vec<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
}

fn one_or_many<S: serde::Serializer>(v: &[Cow<'_, str>], s: S) -> Result<S::Ok, S::Error> {
    match v {
        [one] => s.serialize_str(one),
        many => many.serialize(s),
    }
}

impl PromptRequest<'_> {
    /// The JSON body.
    pub fn to_body(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }
}

impl PromptRequest<'static> {
    /// Validates DB-GPT's PromptRequest body. `messages` may be omitted when `prompt` is
    /// given (the prompt becomes one user message); unknown keys are ignored.
    pub fn from_json(v: &Value) -> Result<Self, ValidationErrors> {
        let mut f = Fields::new("body", v);
        let model = f.req_str("model");
        let mut messages = Vec::new();
        match f.raw("messages") {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for (i, m) in items.iter().enumerate() {
                    let role = m.get("role").and_then(Value::as_str);
                    let content = match m.get("content") {
                        Some(Value::String(s)) => Some(s.clone()),
                        // OpenAI-style content parts: keep the text parts.
                        Some(Value::Array(parts)) => Some(
                            parts
                                .iter()
                                .filter_map(|p| p.get("text").and_then(Value::as_str))
                                .collect::<Vec<_>>()
                                .join(""),
                        ),
                        Some(Value::Null) | None => None,
                        _ => None,
                    };
                    match (role, content) {
                        (Some(r), Some(c)) => messages.push(PromptMessage {
                            role: Cow::Owned(r.to_string()),
                            content: Cow::Owned(c),
                            round_index: 0,
                        }),
                        _ => f.invalid(
                            "model_attributes_type",
                            "messages",
                            &format!(
                                "messages[{i}] must be an object with string 'role' and 'content'"
                            ),
                        ),
                    }
                }
            }
            Some(Value::String(s)) => messages.push(human(s.clone())),
            Some(_) => f.invalid("list_type", "messages", "Input should be a valid list"),
        }
        let prompt = f.opt_str("prompt");
        let temperature = f.opt_float("temperature");
        let top_p = f.opt_float("top_p");
        let top_k = f.opt_int("top_k", -1, 1_000_000);
        let max_new_tokens = f.opt_int("max_new_tokens", 1, 1_000_000);
        let seed = f.opt_int("seed", i64::MIN, i64::MAX);
        let presence_penalty = f.opt_float("presence_penalty");
        let frequency_penalty = f.opt_float("frequency_penalty");
        let echo = f.bool_or("echo", true);
        let stop = match f.raw("stop") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) if s.is_empty() => Vec::new(),
            Some(Value::String(s)) => vec![Cow::Owned(s.clone())],
            Some(Value::Array(a)) if a.iter().all(Value::is_string) => a
                .iter()
                .filter_map(|s| s.as_str().filter(|s| !s.is_empty()))
                .map(|s| Cow::Owned(s.to_string()))
                .collect(),
            Some(_) => {
                f.invalid(
                    "string_type",
                    "stop",
                    "Input should be a string or a list of strings",
                );
                Vec::new()
            }
        };
        if messages.is_empty()
            && let Some(p) = prompt.clone().filter(|p| !p.is_empty())
        {
            messages.push(human(p));
        }
        if !f.has_errors() && messages.is_empty() {
            f.invalid(
                "missing",
                "messages",
                "Field required: give 'messages' or a non-empty 'prompt'",
            );
        }
        f.finish()?;
        Ok(PromptRequest {
            model: Cow::Owned(model),
            messages,
            prompt: prompt.map(Cow::Owned),
            temperature,
            top_p,
            top_k,
            max_new_tokens,
            stop,
            seed,
            presence_penalty,
            frequency_penalty,
            echo,
        })
    }
}

/// A `human` message (a bare string or a `prompt` in place of `messages`).
fn human(content: String) -> PromptMessage<'static> {
    PromptMessage {
        role: Cow::Borrowed("human"),
        content: Cow::Owned(content),
        round_index: 0,
    }
}

/// `WorkerApplyOutput`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerApplyOutput {
    pub message: String,
    pub success: bool,
    pub timecost: f64,
}

/// `ParameterDescription` (DB-GPT's `dbgpt/util/parameter_utils.py`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParameterDescription {
    pub required: bool,
    pub param_class: String,
    pub param_name: String,
    pub param_type: String,
    pub description: String,
    pub default_value: Option<Value>,
    pub valid_values: Option<Vec<Value>>,
    pub ext_metadata: Value,
}

/// `SupportedModel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SupportedModel {
    pub model: String,
    pub path: String,
    pub worker_type: String,
    pub path_exist: bool,
    pub proxy: bool,
    pub enabled: bool,
    pub params: Option<Vec<ParameterDescription>>,
}

/// `WorkerSupportedModel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerSupportedModel {
    pub host: String,
    pub port: u16,
    pub models: Vec<SupportedModel>,
}

/// `ModelMetadata`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMetadata {
    pub model: String,
    pub context_length: usize,
    pub chat_model: bool,
    pub is_function_calling_model: bool,
    pub metadata: Value,
    pub ext_metadata: Value,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn frames_from_dbgpt_and_ours() {
        let f = Frame::from_json(&json!({"text": "Hi", "error_code": 0, "incremental": false, "model_context": null, "finish_reason": null, "usage": null})).unwrap();
        assert_eq!(f.text, "Hi");
        assert_eq!(f.finish_reason, None);
        let f = Frame::from_json(&json!({"text": "Hi!", "error_code": 0, "finish_reason": "length", "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})).unwrap();
        assert_eq!(f.finish_reason.as_deref(), Some("length"));
        assert_eq!(f.usage.unwrap().completion_tokens, 2);
        assert!(parse_frame(b"not json").is_err());
        // usage: counts from an object (extra keys skipped, odd counts 0), nothing otherwise.
        let u = |usage: &str| {
            parse_frame(format!(r#"{{"text":"x","usage":{usage}}}"#).as_bytes())
                .unwrap()
                .usage
        };
        let both = |p, c| Some(Usage::new(p, c));
        assert_eq!(
            u(r#"{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5,"x":{"y":[1]}}"#),
            both(3, 2)
        );
        assert_eq!(
            u(r#"{"prompt_tokens":1.5,"completion_tokens":"2"}"#),
            both(0, 0)
        );
        assert_eq!(u("{}"), both(0, 0));
        for other in ["null", "\"n/a\"", "[1,2]", "7", "true"] {
            assert_eq!(u(other), None, "{other}");
        }
        assert_eq!(parse_frame(br#"{"text":"x"}"#).unwrap().usage, None);
        // The same through a Value (Frame::from_json).
        let f = Frame::from_json(&json!({"text": "x", "usage": {"completion_tokens": 4}})).unwrap();
        assert_eq!(f.usage, both(0, 4));
    }

    #[test]
    fn frames_split_on_nul_keeping_partial_tail() {
        let mut b = BytesMut::from(&b"{\"a\":1}\0{\"a\":2}\0 \n\0{\"a\""[..]);
        let mut f = Vec::new();
        while let Some(piece) = next_frame(&mut b) {
            f.push(piece.to_vec());
        }
        assert_eq!(f, vec![b"{\"a\":1}".to_vec(), b"{\"a\":2}".to_vec()]);
        assert_eq!(&b[..], b"{\"a\"");
    }

    /// What the worker writes, its callers read back: the frame codec and both readers.
    #[test]
    fn written_frames_read_back() {
        let out = ModelOutput {
            finish_reason: Some("stop".into()),
            usage: Some(Usage::new(5, 2)),
            ..ModelOutput::text("Hello".into())
        };
        let bytes = encode_frame(&out);
        assert_eq!(
            &bytes[..],
            &b"{\"text\":\"Hello\",\"error_code\":0,\"incremental\":false,\"model_context\":null,\"finish_reason\":\"stop\",\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7},\"metrics\":null}\0"[..]
        );
        let mut buf = BytesMut::from(&bytes[..]);
        let piece = next_frame(&mut buf).unwrap();
        assert!(buf.is_empty());
        let f = parse_frame(&piece).unwrap();
        assert_eq!((f.text.as_str(), f.error_code), ("Hello", 0));
        assert_eq!(f.usage, out.usage);
        assert_eq!(serde_json::from_slice::<ModelOutput>(&piece).unwrap(), out);
        let e = ModelOutput::error("boom");
        assert_eq!(e.error_code, 1);
        assert!(e.text.ends_with(": boom"), "{}", e.text);
    }

    /// A request as a caller builds it is what the worker validates, options included.
    #[test]
    fn prompt_requests_round_trip() {
        let sent = PromptRequest {
            model: "m".into(),
            messages: vec![
                PromptMessage::new("system", "s"),
                PromptMessage::new("human", "hi"),
            ],
            temperature: Some(0.0),
            max_new_tokens: Some(5),
            stop: vec!["x".into()],
            ..PromptRequest::default()
        };
        let body: Value = serde_json::from_slice(&sent.to_body()).unwrap();
        assert_eq!(
            body,
            json!({"model": "m", "messages": [
                {"role": "system", "content": "s", "round_index": 0},
                {"role": "human", "content": "hi", "round_index": 0}],
                "echo": false, "temperature": 0.0, "max_new_tokens": 5, "stop": "x"})
        );
        let got = PromptRequest::from_json(&body).unwrap();
        assert_eq!(got, sent);
        let two = PromptRequest {
            stop: vec!["a".into(), "b".into()],
            ..sent.clone()
        };
        let body: Value = serde_json::from_slice(&two.to_body()).unwrap();
        assert_eq!(body["stop"], json!(["a", "b"]));
        // A prompt alone becomes one human message.
        let p = PromptRequest::from_json(&json!({"model": "m", "prompt": "q"})).unwrap();
        assert_eq!(p.messages, [PromptMessage::new("human", "q")]);
        assert!(PromptRequest::from_json(&json!({"model": "m"})).is_err());
    }

    #[test]
    fn worker_types() {
        for t in [WorkerType::Llm, WorkerType::Text2vec, WorkerType::Reranker] {
            assert_eq!(WorkerType::from_wire(t.as_str()), Some(t));
            assert_eq!(WorkerType::parse(&t.as_str().to_uppercase()), Some(t));
        }
        assert_eq!(WorkerType::from_wire("LLM"), None);
        assert_eq!(WorkerType::parse("embeddings"), Some(WorkerType::Text2vec));
        assert_eq!(WorkerType::parse("rerank"), Some(WorkerType::Reranker));
        assert_eq!(
            WorkerType::from_wire("reranker"),
            Some(WorkerType::Reranker)
        );
    }
}
