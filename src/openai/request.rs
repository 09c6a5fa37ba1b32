//! OpenAI requests as the apiserver accepts them: chat and text completions, embeddings and
//! DB-GPT's relevance, validated into typed requests, and the worker's PromptRequest built
//! from a completion.
//!
//! Requests are parsed from raw JSON by hand (not derived) so that every rejection names the
//! offending field in OpenAI's error shape; unknown fields are ignored like OpenAI does.
//! Where DB-GPT's apiserver deviates from OpenAI (`temperature: 0` dropped, HTTP 400 for
//! every error) we follow OpenAI. Roles are mapped to DB-GPT's `system`/`human`/`ai`, which
//! both DB-GPT's Python workers and ours understand.

use std::borrow::Cow;

use serde_json::{Map, Value};

use super::OpenAiError;
use crate::wire::worker::{PromptMessage, PromptRequest};

/// Parses a request body as a JSON object.
pub fn parse_body(body: &[u8]) -> Result<Map<String, Value>, OpenAiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(OpenAiError::invalid(
            "body",
            "invalid_json",
            "The request body is empty; send a JSON object",
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(OpenAiError::invalid(
            "body",
            "invalid_json",
            "The request body must be a JSON object",
        )),
        Err(e) => Err(OpenAiError::invalid(
            "body",
            "invalid_json",
            format!("The request body is not valid JSON: {e}"),
        )),
    }
}

/// How an error message names the JSON type of `v` ("a string", "null", …).
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn wrong_type(field: &str, want: &str, got: &Value) -> OpenAiError {
    OpenAiError::invalid(
        field,
        "invalid_type",
        format!("'{field}' must be {want}, got {}", type_name(got)),
    )
}

/// A required field that is absent.
pub(crate) fn missing(field: &str) -> OpenAiError {
    OpenAiError::invalid(
        field,
        "missing_required_parameter",
        format!("Missing required parameter: '{field}'"),
    )
}

/// A list field sent empty.
fn empty_list(field: &str) -> OpenAiError {
    OpenAiError::invalid(
        field,
        "invalid_value",
        format!("'{field}' must not be an empty list"),
    )
}

/// A field that is a string or a non-empty list of strings (`prompt`, `input`), as a list.
pub(crate) fn string_list(o: &Obj, field: &str) -> Result<Vec<String>, OpenAiError> {
    match o.get(field) {
        None => Err(missing(field)),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) if a.is_empty() => Err(empty_list(field)),
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => Ok(a
            .iter()
            .map(|s| s.as_str().unwrap_or_default().to_string())
            .collect()),
        Some(v) => Err(wrong_type(
            field,
            "a string or a list of strings (token arrays are not supported)",
            v,
        )),
    }
}

/// A list field with more than `max` items.
fn too_many(field: &str, max: usize) -> OpenAiError {
    OpenAiError::invalid(
        field,
        "invalid_value",
        format!("'{field}' may hold at most {max} items"),
    )
}

/// A request body's top-level fields by name.
pub(crate) trait FieldSource {
    fn field(&self, k: &str) -> Option<&Value>;
}

impl FieldSource for Map<String, Value> {
    fn field(&self, k: &str) -> Option<&Value> {
        self.get(k)
    }
}

/// The top-level fields of a chat or text completion request that are read; any other key
/// is skipped without being built. Every value is kept as sent (`null` as absent) so the
/// validation below can say what was wrong with it. Reading this instead of a whole
/// `Map` saves a hash-map build and a hashed lookup per field on every request.
#[derive(Default, serde::Deserialize)]
struct CompletionFields {
    model: Option<Value>,
    messages: Option<MessagesField>,
    prompt: Option<Value>,
    n: Option<Value>,
    stream: Option<Value>,
    stream_options: Option<Value>,
    tools: Option<Value>,
    functions: Option<Value>,
    tool_choice: Option<Value>,
    function_call: Option<Value>,
    logprobs: Option<Value>,
    top_logprobs: Option<Value>,
    response_format: Option<Value>,
    echo: Option<Value>,
    temperature: Option<Value>,
    top_p: Option<Value>,
    top_k: Option<Value>,
    max_tokens: Option<Value>,
    max_completion_tokens: Option<Value>,
    stop: Option<Value>,
    seed: Option<Value>,
    presence_penalty: Option<Value>,
    frequency_penalty: Option<Value>,
}

impl FieldSource for CompletionFields {
    fn field(&self, k: &str) -> Option<&Value> {
        match k {
            "model" => self.model.as_ref(),
            "prompt" => self.prompt.as_ref(),
            "n" => self.n.as_ref(),
            "stream" => self.stream.as_ref(),
            "stream_options" => self.stream_options.as_ref(),
            "tools" => self.tools.as_ref(),
            "functions" => self.functions.as_ref(),
            "tool_choice" => self.tool_choice.as_ref(),
            "function_call" => self.function_call.as_ref(),
            "logprobs" => self.logprobs.as_ref(),
            "top_logprobs" => self.top_logprobs.as_ref(),
            "response_format" => self.response_format.as_ref(),
            "echo" => self.echo.as_ref(),
            "temperature" => self.temperature.as_ref(),
            "top_p" => self.top_p.as_ref(),
            "top_k" => self.top_k.as_ref(),
            "max_tokens" => self.max_tokens.as_ref(),
            "max_completion_tokens" => self.max_completion_tokens.as_ref(),
            "stop" => self.stop.as_ref(),
            "seed" => self.seed.as_ref(),
            "presence_penalty" => self.presence_penalty.as_ref(),
            "frequency_penalty" => self.frequency_penalty.as_ref(),
            _ => None,
        }
    }
}

/// Visitor methods that keep a value of any other shape as a JSON [`Value`] (wrapped by
/// `$wrap`), for the error message that names what was sent.
macro_rules! keep_other_values {
    ($wrap:expr) => {
        fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
            Ok($wrap(Value::Bool(v)))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
            Ok($wrap(Value::from(v)))
        }
        fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
            Ok($wrap(Value::from(v)))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
            Ok($wrap(Value::from(v)))
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok($wrap(Value::String(v.to_string())))
        }
        fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
            Ok($wrap(Value::String(v)))
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok($wrap(Value::Null))
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok($wrap(Value::Null))
        }
    };
}

/// A chat request's `messages` as sent: a list, read message by message without building
/// a JSON map for each, or any other value (a bare string is one user message; anything
/// else is an error naming its type).
enum MessagesField {
    List(Vec<MessageField>),
    Other(Value),
}

/// One element of `messages`: the two keys used (others are skipped), or a non-object.
enum MessageField {
    Fields {
        role: Option<Value>,
        content: Option<Value>,
        /// An assistant message's `tool_calls` was sent (and is not null).
        tool_calls: bool,
    },
    Other(Value),
}

impl<'de> serde::Deserialize<'de> for MessagesField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = MessagesField;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of messages")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<MessagesField, A::Error> {
                let mut list = Vec::with_capacity(seq.size_hint().unwrap_or(2));
                while let Some(m) = seq.next_element::<MessageField>()? {
                    list.push(m);
                }
                Ok(MessagesField::List(list))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<MessagesField, A::Error> {
                use serde::de::value::MapAccessDeserializer;
                serde::Deserialize::deserialize(MapAccessDeserializer::new(map))
                    .map(MessagesField::Other)
            }
            keep_other_values!(MessagesField::Other);
        }
        d.deserialize_any(V)
    }
}

impl<'de> serde::Deserialize<'de> for MessageField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = MessageField;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a message")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<MessageField, A::Error> {
                let (mut role, mut content, mut tool_calls) = (None, None, false);
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match key.as_ref() {
                        "role" => role = Some(map.next_value::<Value>()?),
                        "content" => content = Some(map.next_value::<Value>()?),
                        "tool_calls" => {
                            tool_calls =
                                map.next_value::<Option<serde::de::IgnoredAny>>()?.is_some()
                        }
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(MessageField::Fields {
                    role,
                    content,
                    tool_calls,
                })
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<MessageField, A::Error> {
                use serde::de::value::SeqAccessDeserializer;
                serde::Deserialize::deserialize(SeqAccessDeserializer::new(seq))
                    .map(MessageField::Other)
            }
            keep_other_values!(MessageField::Other);
        }
        d.deserialize_any(V)
    }
}

/// Reads a completion request body: a JSON object, or the same errors as [`parse_body`].
fn parse_completion_fields(body: &[u8]) -> Result<CompletionFields, OpenAiError> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        // Empty, not JSON, or JSON but not an object: parse_body says which.
        parse_body(body)?;
    }
    serde_json::from_slice(body).map_err(|e| {
        OpenAiError::invalid(
            "body",
            "invalid_json",
            format!("The request body is not valid JSON: {e}"),
        )
    })
}

/// Field accessors that treat `null` as absent.
pub(crate) struct Obj<'a>(pub(crate) &'a dyn FieldSource);

impl<'a> Obj<'a> {
    pub(crate) fn get(&self, k: &str) -> Option<&'a Value> {
        self.0.field(k).filter(|v| !v.is_null())
    }

    pub(crate) fn model(&self) -> Result<String, OpenAiError> {
        match self.get("model") {
            None => Err(OpenAiError::invalid(
                "model",
                "missing_required_parameter",
                "Missing required parameter: 'model'",
            )),
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_string()),
            Some(Value::String(_)) => Err(OpenAiError::invalid(
                "model",
                "invalid_value",
                "'model' must not be empty",
            )),
            Some(v) => Err(wrong_type("model", "a string", v)),
        }
    }

    pub(crate) fn bool(&self, k: &str) -> Result<Option<bool>, OpenAiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(wrong_type(k, "a boolean", v)),
        }
    }

    pub(crate) fn float(&self, k: &str, lo: f64, hi: f64) -> Result<Option<f64>, OpenAiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                if !(lo..=hi).contains(&x) {
                    return Err(OpenAiError::invalid(
                        k,
                        "invalid_value",
                        format!("'{k}' must be between {lo} and {hi}, got {x}"),
                    ));
                }
                Ok(Some(x))
            }
            Some(v) => Err(wrong_type(k, "a number", v)),
        }
    }

    pub(crate) fn int(&self, k: &str, lo: i64, hi: i64) -> Result<Option<i64>, OpenAiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let Some(x) = n
                    .as_i64()
                    .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
                else {
                    return Err(wrong_type(k, "an integer", &Value::Number(n.clone())));
                };
                if !(lo..=hi).contains(&x) {
                    return Err(OpenAiError::invalid(
                        k,
                        "invalid_value",
                        format!("'{k}' must be between {lo} and {hi}, got {x}"),
                    ));
                }
                Ok(Some(x))
            }
            Some(v) => Err(wrong_type(k, "an integer", v)),
        }
    }
}

/// Sampling options shared by chat and text completions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sampling {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub max_tokens: Option<i64>,
    /// A string or a list of strings, as sent.
    pub stop: Option<Value>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
}

/// A validated chat or text completion request.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    pub model: String,
    /// DB-GPT-role messages (`system`/`human`/`ai`), one list per prompt.
    pub prompts: Vec<Vec<(String, String)>>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// Text completions only: prepend the prompt to the output.
    pub echo: bool,
    pub sampling: Sampling,
    /// The first field sent that DB-GPT's worker API cannot carry (tools, structured
    /// output, log-probabilities, tool messages, image parts), as OpenAI's `param` names
    /// it: such a request needs a worker with the native OpenAI routes.
    pub native_only: Option<String>,
}

pub(crate) fn sampling(o: &Obj) -> Result<Sampling, OpenAiError> {
    let max_tokens = match o.int("max_completion_tokens", 1, 1 << 24)? {
        Some(m) => Some(m),
        None => o.int("max_tokens", 1, 1 << 24)?,
    };
    let top_k = o.int("top_k", -1, 1 << 20)?;
    if top_k == Some(0) {
        return Err(OpenAiError::invalid(
            "top_k",
            "invalid_value",
            "'top_k' must be -1 (disabled) or at least 1",
        ));
    }
    let stop = match o.get("stop") {
        None => None,
        Some(Value::String(s)) => Some(Value::String(s.clone())),
        Some(Value::Array(a)) => {
            if a.len() > 16 {
                return Err(OpenAiError::invalid(
                    "stop",
                    "invalid_value",
                    "'stop' may hold at most 16 sequences",
                ));
            }
            for (i, s) in a.iter().enumerate() {
                match s {
                    Value::String(s) if !s.is_empty() => {}
                    _ => {
                        return Err(OpenAiError::invalid(
                            "stop",
                            "invalid_value",
                            format!("'stop[{i}]' must be a non-empty string"),
                        ));
                    }
                }
            }
            if a.is_empty() {
                None
            } else {
                Some(Value::Array(a.clone()))
            }
        }
        Some(v) => return Err(wrong_type("stop", "a string or a list of strings", v)),
    };
    Ok(Sampling {
        temperature: o.float("temperature", 0.0, 2.0)?,
        top_p: o.float("top_p", 0.0, 1.0)?,
        top_k,
        max_tokens,
        stop,
        seed: o.int("seed", i64::MIN, i64::MAX)?,
        presence_penalty: o.float("presence_penalty", -2.0, 2.0)?,
        frequency_penalty: o.float("frequency_penalty", -2.0, 2.0)?,
    })
}

/// What [`common`] reads: `n`, `stream`, `stream_options.include_usage`, and the first
/// native-only field.
struct Common {
    n: usize,
    stream: bool,
    include_usage: bool,
    native_only: Option<String>,
}

/// `stream` and `stream_options.include_usage` of a chat or text completion request.
pub(crate) fn stream_flags(o: &Obj) -> Result<(bool, bool), OpenAiError> {
    let stream = o.bool("stream")?.unwrap_or(false);
    let include_usage = match o.get("stream_options") {
        None => false,
        Some(Value::Object(so)) => {
            if !stream {
                return Err(OpenAiError::invalid(
                    "stream_options",
                    "invalid_value",
                    "'stream_options' is only allowed when 'stream' is true",
                ));
            }
            match so.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => return Err(wrong_type("stream_options.include_usage", "a boolean", v)),
            }
        }
        Some(v) => return Err(wrong_type("stream_options", "an object", v)),
    };
    Ok((stream, include_usage))
}

fn common(o: &Obj) -> Result<Common, OpenAiError> {
    let n = o.int("n", 1, 128)?.unwrap_or(1) as usize;
    let (stream, include_usage) = stream_flags(o)?;
    // Shapes are checked by whoever serves them (our workers, an upstream); here only what
    // decides the route, and the bounds OpenAI itself sets.
    let mut native_only = None;
    for field in ["tools", "functions", "tool_choice", "function_call"] {
        if native_only.is_none() && o.get(field).is_some() {
            native_only = Some(field.to_string());
        }
    }
    match o.get("logprobs") {
        None | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true) | Value::Number(_)) => {
            native_only.get_or_insert_with(|| "logprobs".into());
        }
        Some(v) => return Err(wrong_type("logprobs", "a boolean or an integer", v)),
    }
    if o.int("top_logprobs", 0, 20)?.is_some() {
        native_only.get_or_insert_with(|| "top_logprobs".into());
    }
    match o.get("response_format") {
        None => {}
        Some(Value::Object(rf)) => match rf.get("type") {
            Some(Value::String(t)) if t == "text" => {}
            Some(Value::String(t)) if t == "json_object" || t == "json_schema" => {
                native_only.get_or_insert_with(|| "response_format".into());
            }
            Some(Value::String(t)) => {
                return Err(OpenAiError::invalid(
                    "response_format.type",
                    "invalid_value",
                    format!(
                        "'response_format.type' must be 'text', 'json_object' or 'json_schema', got '{t}'"
                    ),
                ));
            }
            None | Some(Value::Null) => return Err(missing("response_format.type")),
            Some(v) => return Err(wrong_type("response_format.type", "a string", v)),
        },
        Some(v) => return Err(wrong_type("response_format", "an object", v)),
    }
    Ok(Common {
        n,
        stream,
        include_usage,
        native_only,
    })
}

/// Maps an OpenAI (or DB-GPT) role to the DB-GPT role workers understand.
pub fn map_role(role: &str) -> Option<&'static str> {
    match role {
        "system" | "developer" => Some("system"),
        "user" | "human" => Some("human"),
        "assistant" | "ai" => Some("ai"),
        _ => None,
    }
}

/// The text of `messages[i].content`; a part DB-GPT's worker API cannot carry (an image,
/// audio, a file) is noted in `native_only` and left out of the text.
fn message_content(
    i: usize,
    v: Option<Value>,
    native_only: &mut Option<String>,
) -> Result<String, OpenAiError> {
    let field = || format!("messages[{i}].content");
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    (Some(other), _) if other != "text" => {
                        native_only.get_or_insert_with(|| format!("{}[{j}]", field()));
                    }
                    _ => {
                        return Err(OpenAiError::invalid(
                            &format!("{}[{j}]", field()),
                            "invalid_value",
                            "a content part must be {\"type\":\"text\",\"text\":<string>}",
                        ));
                    }
                }
            }
            Ok(out)
        }
        Some(v) => Err(wrong_type(
            &field(),
            "a string or a list of content parts",
            &v,
        )),
    }
}

/// Validates `POST /v1/chat/completions`.
pub fn parse_chat(body: &[u8]) -> Result<CompletionRequest, OpenAiError> {
    let mut m = parse_completion_fields(body)?;
    let messages = m.messages.take();
    let o = Obj(&m);
    let model = o.model()?;
    let mut native_only = None;
    let messages = match messages {
        None => {
            return Err(OpenAiError::invalid(
                "messages",
                "missing_required_parameter",
                "Missing required parameter: 'messages'",
            ));
        }
        // DB-GPT accepts a bare string as one user message.
        Some(MessagesField::Other(Value::String(s))) => vec![("human".to_string(), s)],
        Some(MessagesField::List(a)) => {
            if a.is_empty() {
                return Err(OpenAiError::invalid(
                    "messages",
                    "invalid_value",
                    "'messages' must contain at least one message",
                ));
            }
            let mut out = Vec::with_capacity(a.len());
            for (i, msg) in a.into_iter().enumerate() {
                let (role, content, tool_calls) = match msg {
                    MessageField::Fields {
                        role,
                        content,
                        tool_calls,
                    } => (role, content, tool_calls),
                    MessageField::Other(v) => {
                        return Err(wrong_type(&format!("messages[{i}]"), "an object", &v));
                    }
                };
                let role = match &role {
                    Some(Value::String(r)) => r.as_str(),
                    None | Some(Value::Null) => {
                        return Err(OpenAiError::invalid(
                            &format!("messages[{i}].role"),
                            "missing_required_parameter",
                            format!("Missing required parameter: 'messages[{i}].role'"),
                        ));
                    }
                    Some(v) => {
                        return Err(wrong_type(&format!("messages[{i}].role"), "a string", v));
                    }
                };
                if tool_calls {
                    native_only.get_or_insert_with(|| format!("messages[{i}].tool_calls"));
                }
                if role == "tool" || role == "function" {
                    // A tool's answer: only a native worker knows what to do with it.
                    native_only.get_or_insert_with(|| format!("messages[{i}].role"));
                    continue;
                }
                let Some(mapped) = map_role(role) else {
                    return Err(OpenAiError::invalid(
                        &format!("messages[{i}].role"),
                        "invalid_value",
                        format!(
                            "unsupported role '{role}'; use 'system', 'developer', 'user', 'assistant' or 'tool'"
                        ),
                    ));
                };
                out.push((
                    mapped.to_string(),
                    message_content(i, content, &mut native_only)?,
                ));
            }
            out
        }
        Some(MessagesField::Other(v)) => {
            return Err(wrong_type("messages", "a list of messages", &v));
        }
    };
    let c = common(&o)?;
    Ok(CompletionRequest {
        model,
        prompts: vec![messages],
        n: c.n,
        stream: c.stream,
        include_usage: c.include_usage,
        echo: false,
        sampling: sampling(&o)?,
        native_only: c.native_only.or(native_only),
    })
}

/// Validates `POST /v1/completions` (legacy text completions).
pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, OpenAiError> {
    let m = parse_completion_fields(body)?;
    let o = Obj(&m);
    let model = o.model()?;
    let prompts = string_list(&o, "prompt")?;
    if prompts.len() > 128 {
        return Err(OpenAiError::invalid(
            "prompt",
            "invalid_value",
            "'prompt' may hold at most 128 prompts",
        ));
    }
    let Common {
        n,
        stream,
        include_usage,
        native_only,
    } = common(&o)?;
    if prompts.len() * n > 128 {
        return Err(OpenAiError::invalid(
            "n",
            "invalid_value",
            "prompts × n must be at most 128",
        ));
    }
    Ok(CompletionRequest {
        model,
        prompts: prompts
            .into_iter()
            .map(|p| vec![("human".to_string(), p)])
            .collect(),
        n,
        stream,
        include_usage,
        echo: o.bool("echo")?.unwrap_or(false),
        sampling: sampling(&o)?,
        native_only,
    })
}

/// The PromptRequest body a worker gets for one prompt. Only options that were set are sent,
/// and `temperature: 0` is sent as 0 (DB-GPT's apiserver drops falsy values).
pub fn worker_prompt(model: &str, messages: &[(String, String)], s: &Sampling) -> bytes::Bytes {
    let stop = match &s.stop {
        Some(Value::String(one)) => vec![Cow::Borrowed(one.as_str())],
        Some(Value::Array(many)) => many
            .iter()
            .filter_map(Value::as_str)
            .map(Cow::Borrowed)
            .collect(),
        _ => Vec::new(),
    };
    PromptRequest {
        model: Cow::Borrowed(model),
        messages: messages
            .iter()
            .map(|(r, c)| PromptMessage::new(r, c))
            .collect(),
        prompt: None,
        echo: false,
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        max_new_tokens: s.max_tokens,
        stop,
        seed: s.seed,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
    }
    .to_body()
}

/// A validated embeddings request.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub input: Vec<String>,
    pub base64: bool,
    /// The vector size asked for (a positive integer). DB-GPT's worker API cannot carry
    /// it: a request with it needs a worker with the native OpenAI routes, which says
    /// whether its model can give that size.
    pub dimensions: Option<usize>,
}

/// Validates `POST /v1/embeddings`; `dimensions` must be a positive integer (whether the
/// model can give that size is for the worker that serves it to say).
pub fn parse_embeddings(body: &[u8]) -> Result<EmbeddingsRequest, OpenAiError> {
    let m = parse_body(body)?;
    let o = Obj(&m);
    let model = o.model()?;
    let input = string_list(&o, "input")?;
    if input.len() > 2048 {
        return Err(too_many("input", 2048));
    }
    let base64 = match o.get("encoding_format") {
        None => false,
        Some(Value::String(s)) if s == "float" => false,
        Some(Value::String(s)) if s == "base64" => true,
        Some(v) => {
            return Err(OpenAiError::invalid(
                "encoding_format",
                "invalid_value",
                format!("'encoding_format' must be 'float' or 'base64', got {v}"),
            ));
        }
    };
    let dimensions = match o.get("dimensions") {
        None => None,
        Some(Value::Number(n)) => match n.as_u64().or_else(|| {
            // 384.0 is the integer 384, as `Obj::int` reads numbers.
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && (1.0..=u32::MAX as f64).contains(f))
                .map(|f| f as u64)
        }) {
            Some(d) if d > 0 => Some(usize::try_from(d).unwrap_or(usize::MAX)),
            _ => {
                return Err(OpenAiError::invalid(
                    "dimensions",
                    "invalid_value",
                    format!("'dimensions' must be a positive integer, got {n}"),
                ));
            }
        },
        Some(v) => return Err(wrong_type("dimensions", "a positive integer", v)),
    };
    Ok(EmbeddingsRequest {
        model,
        input,
        base64,
        dimensions,
    })
}

/// A validated relevance request, DB-GPT's `/api/v1/beta/relevance`.
#[derive(Debug, Clone, PartialEq)]
pub struct RelevanceRequest {
    pub model: String,
    pub query: String,
    pub documents: Vec<String>,
}

/// The required string `query` of a relevance or rerank request.
fn query_field(o: &Obj<'_>) -> Result<String, OpenAiError> {
    match o.get("query") {
        Some(Value::String(s)) => Ok(s.clone()),
        None => Err(missing("query")),
        Some(v) => Err(wrong_type("query", "a string", v)),
    }
}

/// Validates `POST /v1/beta/relevance`.
pub fn parse_relevance(body: &[u8]) -> Result<RelevanceRequest, OpenAiError> {
    let m = parse_body(body)?;
    let o = Obj(&m);
    let model = o.model()?;
    let query = query_field(&o)?;
    let documents = match o.get("documents") {
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => a
            .iter()
            .map(|s| s.as_str().unwrap_or_default().to_string())
            .collect(),
        None => return Err(missing("documents")),
        Some(v) => return Err(wrong_type("documents", "a list of strings", v)),
    };
    Ok(RelevanceRequest {
        model,
        query,
        documents,
    })
}

/// Most documents one rerank request may carry.
pub const MAX_RERANK_DOCUMENTS: usize = 2048;

/// A validated rerank request (Jina's and Cohere's `POST /v1/rerank`).
#[derive(Debug, Clone, PartialEq)]
pub struct RerankRequest {
    pub model: String,
    pub query: String,
    /// The texts, in request order (a `{"text": …}` document is its text).
    pub documents: Vec<String>,
    /// How many of the best results to answer (all when absent).
    pub top_n: Option<usize>,
    /// Whether each result carries its document (`{"text": …}`); default false, as Cohere.
    pub return_documents: bool,
}

/// Validates `POST /v1/rerank`: `documents` is a non-empty list of strings or of
/// `{"text": string}` objects, `top_n` a positive integer; unknown fields are ignored.
pub fn parse_rerank(body: &[u8]) -> Result<RerankRequest, OpenAiError> {
    let m = parse_body(body)?;
    let o = Obj(&m);
    let model = o.model()?;
    let query = query_field(&o)?;
    let documents = match o.get("documents") {
        None => return Err(missing("documents")),
        Some(Value::Array(a)) if a.is_empty() => return Err(empty_list("documents")),
        Some(Value::Array(a)) if a.len() > MAX_RERANK_DOCUMENTS => {
            return Err(too_many("documents", MAX_RERANK_DOCUMENTS));
        }
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, d)| match d {
                Value::String(s) => Ok(s.clone()),
                Value::Object(m) => match m.get("text") {
                    Some(Value::String(s)) => Ok(s.clone()),
                    _ => Err(OpenAiError::invalid(
                        &format!("documents[{i}]"),
                        "invalid_type",
                        format!(
                            "'documents[{i}]' must be a string or an object with a string 'text'"
                        ),
                    )),
                },
                v => Err(wrong_type(&format!("documents[{i}]"), "a string", v)),
            })
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(wrong_type("documents", "a list of strings", v)),
    };
    let top_n = o.int("top_n", 1, i64::MAX)?.map(|n| n as usize);
    let return_documents = o.bool("return_documents")?.unwrap_or(false);
    Ok(RerankRequest {
        model,
        query,
        documents,
        top_n,
        return_documents,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::response::base64_f32;
    use axum::http::StatusCode;

    #[test]
    fn chat_roles_sampling_and_worker_body() {
        let r = parse_chat(
            br#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"hi"}]},{"role":"assistant","content":null}],
                "temperature":0,"stop":["x"],"max_tokens":5,"n":2,"stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(r.n, 2);
        assert!(r.stream && r.include_usage);
        let w: Value =
            serde_json::from_slice(&worker_prompt(&r.model, &r.prompts[0], &r.sampling)).unwrap();
        assert_eq!(w["messages"][0]["role"], "system");
        assert_eq!(w["messages"][1]["role"], "human");
        assert_eq!(w["messages"][1]["content"], "hi");
        assert_eq!(w["messages"][2]["role"], "ai");
        assert_eq!(w["temperature"], 0.0);
        assert_eq!(w["stop"], "x");
        assert_eq!(w["max_new_tokens"], 5);
        assert_eq!(w["echo"], false);
        assert!(w.get("top_p").is_none());
    }

    #[test]
    fn completion_body_shapes() {
        // Not an object: the same messages as any other body.
        let msg = |b: &[u8]| parse_chat(b).unwrap_err().message;
        assert!(msg(b"  ").contains("empty"), "{}", msg(b"  "));
        assert!(msg(b"[1]").contains("must be a JSON object"));
        assert!(msg(b"\"x\"").contains("must be a JSON object"));
        assert!(msg(b"{\"model\": }").contains("not valid JSON"));
        assert!(msg(br#"{"model":"m","messages":"x"} trailing"#).contains("not valid JSON"));
        // Unknown keys of any shape are skipped; null is absent.
        let r = parse_chat(
            br#"{"user":"u","metadata":{"a":[1,{"b":null}]},"model":"m","messages":"hi","temperature":null,"n":null,"stream":false}"#,
        )
        .unwrap();
        assert_eq!(r.model, "m");
        assert_eq!(r.sampling.temperature, None);
        assert_eq!(r.n, 1);
        // Values keep their validation, naming the field.
        let e = parse_chat(br#"{"model":5,"messages":"hi"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("model"));
        assert!(e.message.contains("a number"), "{}", e.message);
        let e = parse_completion(br#"{"model":"m","prompt":"p","echo":"yes"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("echo"));
    }

    #[test]
    fn validation_names_the_field() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "body"),
            (b"[1]", "body"),
            (b"{", "body"),
            (br#"{"messages":[]}"#, "model"),
            (br#"{"model":"m"}"#, "messages"),
            (br#"{"model":"m","messages":[]}"#, "messages"),
            (
                br#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#,
                "messages[0].role",
            ),
            (
                br#"{"model":"m","messages":"x","temperature":3}"#,
                "temperature",
            ),
            (br#"{"model":"m","messages":"x","top_p":"a"}"#, "top_p"),
            (br#"{"model":"m","messages":"x","n":0}"#, "n"),
            (
                br#"{"model":"m","messages":"x","max_tokens":0}"#,
                "max_tokens",
            ),
            (br#"{"model":"m","messages":"x","stop":5}"#, "stop"),
            (br#"{"model":"m","messages":"x","top_k":0}"#, "top_k"),
            (
                br#"{"model":"m","messages":"x","stream_options":{}}"#,
                "stream_options",
            ),
            (
                br#"{"model":"m","messages":"x","response_format":{"type":"xml"}}"#,
                "response_format.type",
            ),
            (
                br#"{"model":"m","messages":"x","logprobs":true,"top_logprobs":21}"#,
                "top_logprobs",
            ),
            (
                br#"{"model":"m","messages":"x","logprobs":"yes"}"#,
                "logprobs",
            ),
        ];
        for (body, field) in cases {
            let e = parse_chat(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(
                e.param.as_deref(),
                Some(*field),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn fields_only_a_native_worker_can_serve_are_named() {
        let native_only = |b: &[u8]| parse_chat(b).unwrap().native_only;
        for (body, field) in [
            (&br#"{"model":"m","messages":"x"}"#[..], None),
            (br#"{"model":"m","messages":"x","response_format":{"type":"text"},"logprobs":false}"#, None),
            (br#"{"model":"m","messages":"x","tools":[]}"#, Some("tools")),
            (br#"{"model":"m","messages":"x","tool_choice":"auto"}"#, Some("tool_choice")),
            (br#"{"model":"m","messages":"x","logprobs":true}"#, Some("logprobs")),
            (br#"{"model":"m","messages":"x","top_logprobs":2}"#, Some("top_logprobs")),
            (br#"{"model":"m","messages":"x","response_format":{"type":"json_object"}}"#, Some("response_format")),
            (br#"{"model":"m","messages":[{"role":"user","content":"a"},{"role":"tool","tool_call_id":"c","content":"1"}]}"#, Some("messages[1].role")),
            (br#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"c"}]}]}"#, Some("messages[0].tool_calls")),
            (br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"u"}}]}]}"#, Some("messages[0].content[1]")),
            // Top-level fields are named before message fields.
            (br#"{"model":"m","messages":[{"role":"tool","content":"1"}],"tools":[]}"#, Some("tools")),
        ] {
            assert_eq!(native_only(body).as_deref(), field, "{}", String::from_utf8_lossy(body));
        }
        let r = parse_completion(br#"{"model":"m","prompt":"p","logprobs":3}"#).unwrap();
        assert_eq!(r.native_only.as_deref(), Some("logprobs"));
    }

    #[test]
    fn messages_of_every_shape() {
        // Extra keys are skipped, null content is empty, duplicate keys: the last one wins.
        let r = parse_chat(
            br#"{"model":"m","messages":[{"name":"n","role":"user","content":"a","tool_calls":[{"x":[1,{"y":null}]}],"role":"assistant"},{"content":null,"role":"system"}]}"#,
        )
        .unwrap();
        assert_eq!(
            r.prompts[0],
            vec![
                ("ai".to_string(), "a".to_string()),
                ("system".to_string(), String::new())
            ]
        );
        // Wrong shapes name the field and the type that was sent.
        let cases: &[(&[u8], &str, &str)] = &[
            (
                br#"{"model":"m","messages":{"role":"user"}}"#,
                "messages",
                "got an object",
            ),
            (br#"{"model":"m","messages":7}"#, "messages", "got a number"),
            (
                br#"{"model":"m","messages":true}"#,
                "messages",
                "got a boolean",
            ),
            (
                br#"{"model":"m","messages":["hi"]}"#,
                "messages[0]",
                "got a string",
            ),
            (
                br#"{"model":"m","messages":[[1]]}"#,
                "messages[0]",
                "got an array",
            ),
            (
                br#"{"model":"m","messages":[{"role":"user"},null]}"#,
                "messages[1]",
                "got null",
            ),
            (
                br#"{"model":"m","messages":[{"content":"x"}]}"#,
                "messages[0].role",
                "Missing",
            ),
            (
                br#"{"model":"m","messages":[{"role":null}]}"#,
                "messages[0].role",
                "Missing",
            ),
            (
                br#"{"model":"m","messages":[{"role":["user"]}]}"#,
                "messages[0].role",
                "got an array",
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":5}]}"#,
                "messages[0].content",
                "got a number",
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text"}]}]}"#,
                "messages[0].content[0]",
                "content part",
            ),
        ];
        for (body, field, says) in cases {
            let e = parse_chat(body).unwrap_err();
            let what = String::from_utf8_lossy(body);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{what}");
            assert_eq!(e.param.as_deref(), Some(*field), "{what}");
            assert!(e.message.contains(says), "{what}: {}", e.message);
        }
    }

    #[test]
    fn embeddings_and_base64() {
        let r =
            parse_embeddings(br#"{"model":"e","input":"a","encoding_format":"base64"}"#).unwrap();
        assert!(r.base64);
        assert_eq!(r.input, ["a"]);
        assert_eq!(
            parse_embeddings(br#"{"model":"e","input":[1,2]}"#)
                .unwrap_err()
                .param
                .as_deref(),
            Some("input")
        );
        let r = parse_embeddings(br#"{"model":"e","input":"a","dimensions":384}"#).unwrap();
        assert_eq!(r.dimensions, Some(384));
        for d in ["0", "-1", "2.5", "\"384\""] {
            let body = format!(r#"{{"model":"e","input":"a","dimensions":{d}}}"#);
            let e = parse_embeddings(body.as_bytes()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("dimensions"), "{body}");
        }
        // 1.0f32 = 00 00 80 3f
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, 2.0]), "AACAPwAAAEA=");
        assert_eq!(base64_f32(&[]), "");
    }

    #[test]
    fn completions_prompts() {
        let r = parse_completion(br#"{"model":"m","prompt":["a","b"],"n":2,"echo":true}"#).unwrap();
        assert_eq!(r.prompts.len(), 2);
        assert!(r.echo);
        assert!(parse_completion(br#"{"model":"m","prompt":[[1,2]]}"#).is_err());
    }

    #[test]
    fn rerank_requests() {
        let r = parse_rerank(
            br#"{"model":"r","query":"q","documents":["a",{"text":"b","id":7}],"top_n":1,"return_documents":true,"rank_fields":["text"]}"#,
        )
        .unwrap();
        assert_eq!(r.documents, ["a", "b"]);
        assert_eq!((r.top_n, r.return_documents), (Some(1), true));
        let r =
            parse_rerank(br#"{"model":"r","query":"","documents":["a"],"top_n":null}"#).unwrap();
        assert_eq!((r.top_n, r.return_documents), (None, false));
        let cases: &[(&[u8], &str)] = &[
            (br#"{"query":"q","documents":["a"]}"#, "model"),
            (br#"{"model":"r","documents":["a"]}"#, "query"),
            (br#"{"model":"r","query":5,"documents":["a"]}"#, "query"),
            (br#"{"model":"r","query":"q"}"#, "documents"),
            (br#"{"model":"r","query":"q","documents":[]}"#, "documents"),
            (br#"{"model":"r","query":"q","documents":"a"}"#, "documents"),
            (
                br#"{"model":"r","query":"q","documents":["a",3]}"#,
                "documents[1]",
            ),
            (
                br#"{"model":"r","query":"q","documents":[{"title":"x"}]}"#,
                "documents[0]",
            ),
            (
                br#"{"model":"r","query":"q","documents":["a"],"top_n":0}"#,
                "top_n",
            ),
            (
                br#"{"model":"r","query":"q","documents":["a"],"top_n":-2}"#,
                "top_n",
            ),
            (
                br#"{"model":"r","query":"q","documents":["a"],"top_n":1.5}"#,
                "top_n",
            ),
            (
                br#"{"model":"r","query":"q","documents":["a"],"top_n":"2"}"#,
                "top_n",
            ),
            (
                br#"{"model":"r","query":"q","documents":["a"],"return_documents":"yes"}"#,
                "return_documents",
            ),
        ];
        for (body, field) in cases {
            let e = parse_rerank(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(
                e.param.as_deref(),
                Some(*field),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let many = format!(
            r#"{{"model":"r","query":"q","documents":{}}}"#,
            serde_json::to_string(&vec!["d"; MAX_RERANK_DOCUMENTS + 1]).unwrap()
        );
        assert_eq!(
            parse_rerank(many.as_bytes()).unwrap_err().param.as_deref(),
            Some("documents")
        );
    }
}
