//! Validation of the request bodies the local engine answers: OpenAI chat completions
//! (messages with text parts, assistant tool calls and tool results, tools, tool_choice,
//! response_format, logprobs, n, streaming options) and legacy text completions. Every
//! rejection is a 400 naming the offending field; unknown top-level fields are ignored.

use serde_json::{Map, Value};

use crate::openai::OpenAiError;
use crate::openai::request::{
    Obj, Sampling, missing, parse_body, sampling, stream_flags, string_list, wrong_type,
};

/// Most choices (`n`) one request may ask for.
pub(crate) const MAX_N: i64 = 8;
/// Most alternatives per token (`top_logprobs`, completions' `logprobs`).
pub(crate) const MAX_TOP_LOGPROBS: i64 = 20;

/// Who wrote a message, in OpenAI's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MsgRole {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

impl MsgRole {
    fn parse(r: &str) -> Option<MsgRole> {
        Some(match r {
            "system" => MsgRole::System,
            "developer" => MsgRole::Developer,
            "user" | "human" => MsgRole::User,
            "assistant" | "ai" => MsgRole::Assistant,
            "tool" => MsgRole::Tool,
            _ => return None,
        })
    }

    /// The name chat templates expect.
    pub(crate) fn name(self) -> &'static str {
        match self {
            MsgRole::System => "system",
            MsgRole::Developer => "developer",
            MsgRole::User => "user",
            MsgRole::Assistant => "assistant",
            MsgRole::Tool => "tool",
        }
    }
}

/// A tool call the assistant made in an earlier turn.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as sent: a JSON text (OpenAI sends a string).
    pub arguments: String,
}

/// One validated message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Message {
    pub role: MsgRole,
    /// The text (text parts joined by newlines); `None` when sent as `null` or absent
    /// (assistant messages that only call tools).
    pub content: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    /// `role: "tool"` only: the call this message answers.
    pub tool_call_id: Option<String>,
    /// The optional `name` field.
    pub name: Option<String>,
}

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// The parameters' JSON schema (an object), when given.
    pub parameters: Option<Value>,
    /// The tool as the client sent it (what a chat template gets).
    pub raw: Value,
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ToolChoice {
    /// Tools are not offered.
    None,
    /// The model decides.
    Auto,
    /// The model must call at least one tool.
    Required,
    /// The model must call this tool.
    Named(String),
}

/// `response_format`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { schema: Value },
}

/// A validated chat completion request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub sampling: Sampling,
    /// `Some(k)` when `logprobs: true` (k = `top_logprobs`, 0 when absent).
    pub logprobs: Option<u8>,
    pub tools: Vec<Tool>,
    pub tool_choice: ToolChoice,
    pub parallel_tool_calls: bool,
    pub response_format: ResponseFormat,
    /// `continue_final_message`: the last message (the assistant's) is continued.
    pub continuation: Option<Continuation>,
}

/// How a request continues its final assistant message (`continue_final_message: true`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Continuation {
    /// `x_dbgpt_continuation: true`: the final message counts as generated output (against
    /// `max_tokens` and in `usage.completion_tokens`), as in one uninterrupted run.
    pub as_generated: bool,
}

/// A validated text completion request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TextRequest {
    pub model: String,
    pub prompts: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub echo: bool,
    pub sampling: Sampling,
    /// `logprobs: k`.
    pub logprobs: Option<u8>,
}

fn invalid(param: &str, msg: impl Into<String>) -> OpenAiError {
    OpenAiError::invalid(param, "invalid_value", msg)
}

/// `n`, `stream` and `stream_options` of either request.
fn stream_and_n(o: &Obj) -> Result<(usize, bool, bool), OpenAiError> {
    let n = o.int("n", 1, MAX_N)?.unwrap_or(1) as usize;
    let (stream, include_usage) = stream_flags(o)?;
    Ok((n, stream, include_usage))
}

/// A required string field of a nested object.
fn string_at<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    param: &str,
) -> Result<&'a str, OpenAiError> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(missing(param)),
        Some(v) => Err(wrong_type(param, "a string", v)),
    }
}

fn object_at<'a>(v: &'a Value, param: &str) -> Result<&'a Map<String, Value>, OpenAiError> {
    v.as_object()
        .ok_or_else(|| wrong_type(param, "an object", v))
}

/// A message's `content`: a string, `null`, or a list of text parts.
fn content(i: usize, v: Option<&Value>) -> Result<Option<String>, OpenAiError> {
    let field = format!("messages[{i}].content");
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, p) in parts.iter().enumerate() {
                let param = format!("{field}[{j}]");
                let part = object_at(p, &param)?;
                let kind = string_at(part, "type", &format!("{param}.type"))?;
                match kind {
                    "text" | "refusal" => {
                        let text = string_at(part, kind, &format!("{param}.{kind}"))?;
                        texts.push(text);
                    }
                    "image_url" | "input_audio" | "file" | "image" | "input_image" => {
                        return Err(OpenAiError::invalid(
                            &param,
                            "unsupported_content",
                            format!(
                                "'{param}' is a content part of type '{kind}', but this model \
                                 only reads text; send text parts only"
                            ),
                        ));
                    }
                    other => {
                        return Err(invalid(
                            &format!("{param}.type"),
                            format!("unknown content part type '{other}'; expected 'text'"),
                        ));
                    }
                }
            }
            Ok(Some(texts.join("\n")))
        }
        Some(v) => Err(wrong_type(&field, "a string or a list of content parts", v)),
    }
}

/// An assistant message's `tool_calls`.
fn tool_calls(i: usize, v: Option<&Value>) -> Result<Vec<ToolCall>, OpenAiError> {
    let field = format!("messages[{i}].tool_calls");
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(v) => return Err(wrong_type(&field, "a list of tool calls", v)),
    };
    let mut out = Vec::with_capacity(list.len());
    for (j, c) in list.iter().enumerate() {
        let param = format!("{field}[{j}]");
        let call = object_at(c, &param)?;
        let id = string_at(call, "id", &format!("{param}.id"))?;
        match call.get("type") {
            None | Some(Value::Null) => {}
            Some(Value::String(t)) if t == "function" => {}
            Some(v) => {
                return Err(invalid(
                    &format!("{param}.type"),
                    format!("'{param}.type' must be 'function', got {v}"),
                ));
            }
        }
        let fparam = format!("{param}.function");
        let f = object_at(call.get("function").unwrap_or(&Value::Null), &fparam)?;
        let name = string_at(f, "name", &format!("{fparam}.name"))?;
        let arguments = match f.get("arguments") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => "{}".to_string(),
            Some(v @ Value::Object(_)) => v.to_string(),
            Some(v) => {
                return Err(wrong_type(
                    &format!("{fparam}.arguments"),
                    "a JSON string",
                    v,
                ));
            }
        };
        out.push(ToolCall {
            id: id.to_string(),
            name: name.to_string(),
            arguments,
        });
    }
    Ok(out)
}

fn messages(v: Option<&Value>) -> Result<Vec<Message>, OpenAiError> {
    let list = match v {
        None => return Err(missing("messages")),
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(invalid(
                "messages",
                "'messages' must contain at least one message",
            ));
        }
        Some(Value::Array(a)) => a,
        Some(v) => return Err(wrong_type("messages", "a list of messages", v)),
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let m = object_at(m, &format!("messages[{i}]"))?;
        let rparam = format!("messages[{i}].role");
        let role_name = string_at(m, "role", &rparam)?;
        let Some(role) = MsgRole::parse(role_name) else {
            return Err(invalid(
                &rparam,
                format!(
                    "unsupported role '{role_name}'; use 'system', 'developer', 'user', \
                     'assistant' or 'tool'"
                ),
            ));
        };
        let text = content(i, m.get("content"))?;
        let calls = if role == MsgRole::Assistant {
            tool_calls(i, m.get("tool_calls"))?
        } else {
            Vec::new()
        };
        if text.is_none() && calls.is_empty() && role != MsgRole::Assistant {
            return Err(missing(&format!("messages[{i}].content")));
        }
        let tool_call_id = if role == MsgRole::Tool {
            Some(string_at(m, "tool_call_id", &format!("messages[{i}].tool_call_id"))?.to_string())
        } else {
            None
        };
        let name = match m.get("name") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => return Err(wrong_type(&format!("messages[{i}].name"), "a string", v)),
        };
        out.push(Message {
            role,
            content: text,
            tool_calls: calls,
            tool_call_id,
            name,
        });
    }
    Ok(out)
}

fn valid_tool_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn tools(v: Option<&Value>) -> Result<Vec<Tool>, OpenAiError> {
    let list = match v {
        None => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(v) => return Err(wrong_type("tools", "a list of tools", v)),
    };
    let mut out: Vec<Tool> = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let param = format!("tools[{i}]");
        let tool = object_at(t, &param)?;
        match tool.get("type") {
            Some(Value::String(s)) if s == "function" => {}
            None | Some(Value::Null) => return Err(missing(&format!("{param}.type"))),
            Some(v) => {
                return Err(invalid(
                    &format!("{param}.type"),
                    format!("'{param}.type' must be 'function', got {v}"),
                ));
            }
        }
        let fparam = format!("{param}.function");
        let f = match tool.get("function") {
            None | Some(Value::Null) => return Err(missing(&fparam)),
            Some(f) => object_at(f, &fparam)?,
        };
        let nparam = format!("{fparam}.name");
        let name = string_at(f, "name", &nparam)?;
        if !valid_tool_name(name) {
            return Err(invalid(
                &nparam,
                format!(
                    "'{nparam}' must be 1 to 64 letters, digits, underscores or dashes, got {name:?}"
                ),
            ));
        }
        if out.iter().any(|t| t.name == name) {
            return Err(invalid(
                &nparam,
                format!("two tools are named '{name}'; tool names must be unique"),
            ));
        }
        let description = match f.get("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => return Err(wrong_type(&format!("{fparam}.description"), "a string", v)),
        };
        let pparam = format!("{fparam}.parameters");
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => None,
            Some(p @ Value::Object(_)) => Some(p.clone()),
            Some(v) => {
                return Err(OpenAiError::invalid(
                    &pparam,
                    "invalid_schema",
                    format!("'{pparam}' must be a JSON schema object, got {}", short(v)),
                ));
            }
        };
        match f.get("strict") {
            None | Some(Value::Null) | Some(Value::Bool(_)) => {}
            Some(v) => return Err(wrong_type(&format!("{fparam}.strict"), "a boolean", v)),
        }
        out.push(Tool {
            name: name.to_string(),
            description,
            parameters,
            raw: t.clone(),
        });
    }
    Ok(out)
}

/// A value for an error message, cut to a readable length.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        let cut: String = s.chars().take(77).collect();
        format!("{cut}...")
    } else {
        s
    }
}

fn tool_choice(v: Option<&Value>, tools: &[Tool]) -> Result<ToolChoice, OpenAiError> {
    let default = if tools.is_empty() {
        ToolChoice::None
    } else {
        ToolChoice::Auto
    };
    let choice = match v {
        None => return Ok(default),
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(invalid(
                    "tool_choice",
                    format!(
                        "'tool_choice' must be 'none', 'auto', 'required' or \
                         {{\"type\":\"function\",\"function\":{{\"name\":...}}}}, got '{other}'"
                    ),
                ));
            }
        },
        Some(Value::Object(o)) => {
            match o.get("type") {
                Some(Value::String(t)) if t == "function" => {}
                None | Some(Value::Null) => return Err(missing("tool_choice.type")),
                Some(v) => {
                    return Err(invalid(
                        "tool_choice.type",
                        format!("'tool_choice.type' must be 'function', got {v}"),
                    ));
                }
            }
            // Chat's {"function":{"name"}}; the Responses API's flat {"name"} too.
            let (name, param) = match (o.get("function"), o.get("name")) {
                (Some(f @ Value::Object(_)), _) => (
                    string_at(
                        object_at(f, "tool_choice.function")?,
                        "name",
                        "tool_choice.function.name",
                    )?,
                    "tool_choice.function.name",
                ),
                (None | Some(Value::Null), Some(Value::String(n))) => {
                    (n.as_str(), "tool_choice.name")
                }
                (None | Some(Value::Null), _) => return Err(missing("tool_choice.function")),
                (Some(v), _) => return Err(wrong_type("tool_choice.function", "an object", v)),
            };
            if !tools.iter().any(|t| t.name == name) {
                let known: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
                return Err(invalid(
                    param,
                    format!(
                        "tool_choice names the tool '{name}', which is not in 'tools' (tools: {})",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
            ToolChoice::Named(name.to_string())
        }
        Some(v) => {
            return Err(wrong_type(
                "tool_choice",
                "a string ('none', 'auto', 'required') or an object",
                v,
            ));
        }
    };
    if tools.is_empty() && choice == ToolChoice::Required {
        return Err(invalid(
            "tool_choice",
            "'tool_choice' is 'required' but the request has no 'tools'",
        ));
    }
    Ok(choice)
}

fn response_format(v: Option<&Value>) -> Result<ResponseFormat, OpenAiError> {
    let rf = match v {
        None => return Ok(ResponseFormat::Text),
        Some(v) => object_at(v, "response_format")?,
    };
    match rf.get("type") {
        Some(Value::String(t)) if t == "text" => Ok(ResponseFormat::Text),
        Some(Value::String(t)) if t == "json_object" => Ok(ResponseFormat::JsonObject),
        Some(Value::String(t)) if t == "json_schema" => {
            let js = match rf.get("json_schema") {
                None | Some(Value::Null) => return Err(missing("response_format.json_schema")),
                Some(v) => object_at(v, "response_format.json_schema")?,
            };
            string_at(js, "name", "response_format.json_schema.name")?;
            match js.get("strict") {
                None | Some(Value::Null) | Some(Value::Bool(_)) => {}
                Some(v) => {
                    return Err(wrong_type(
                        "response_format.json_schema.strict",
                        "a boolean",
                        v,
                    ));
                }
            }
            let schema = match js.get("schema") {
                // No schema: any JSON object.
                None | Some(Value::Null) => serde_json::json!({"type": "object"}),
                Some(s @ Value::Object(_)) => s.clone(),
                Some(v) => {
                    return Err(OpenAiError::invalid(
                        "response_format.json_schema.schema",
                        "invalid_schema",
                        format!(
                            "'response_format.json_schema.schema' must be a JSON schema object, got {}",
                            short(v)
                        ),
                    ));
                }
            };
            Ok(ResponseFormat::JsonSchema { schema })
        }
        None | Some(Value::Null) => Err(missing("response_format.type")),
        Some(v) => Err(invalid(
            "response_format.type",
            format!(
                "'response_format.type' must be 'text', 'json_object' or 'json_schema', got {}",
                short(v)
            ),
        )),
    }
}

/// Validates a chat completion request body.
pub(crate) fn parse_chat(body: &[u8]) -> Result<ChatRequest, OpenAiError> {
    let m = parse_body(body)?;
    let o = Obj(&m);
    let model = o.model()?;
    let messages = messages(o.get("messages"))?;
    let (n, stream, include_usage) = stream_and_n(&o)?;
    let top = o.int("top_logprobs", 0, MAX_TOP_LOGPROBS)?;
    let logprobs = match (o.bool("logprobs")?, top) {
        (Some(true), k) => Some(k.unwrap_or(0) as u8),
        (_, None) => None,
        (_, Some(_)) => {
            return Err(invalid(
                "top_logprobs",
                "'top_logprobs' needs 'logprobs' set to true",
            ));
        }
    };
    let tools = tools(o.get("tools"))?;
    let tool_choice = tool_choice(o.get("tool_choice"), &tools)?;
    let parallel_tool_calls = o.bool("parallel_tool_calls")?.unwrap_or(true);
    let response_format = response_format(o.get("response_format"))?;
    let continuation = continuation(&o, &messages, !tools.is_empty(), &response_format)?;
    Ok(ChatRequest {
        model,
        messages,
        n,
        stream,
        include_usage,
        sampling: sampling(&o)?,
        logprobs,
        tools,
        tool_choice,
        parallel_tool_calls,
        response_format,
        continuation,
    })
}

/// `continue_final_message` (vLLM's name; with `add_generation_prompt`, which must then be
/// false) and our `x_dbgpt_continuation`: the final message must be the assistant's, with
/// text only, and the request plain text (no tools, no structured output).
fn continuation(
    o: &Obj,
    messages: &[Message],
    tools: bool,
    format: &ResponseFormat,
) -> Result<Option<Continuation>, OpenAiError> {
    let field = crate::openai::continuation::CONTINUE_FIELD;
    let as_generated = o
        .bool(crate::openai::continuation::ACCOUNTING_FIELD)?
        .unwrap_or(false);
    let generation_prompt = o.bool(crate::openai::continuation::GENERATION_PROMPT_FIELD)?;
    if !o.bool(field)?.unwrap_or(false) {
        return Ok(None);
    }
    if generation_prompt == Some(true) {
        return Err(invalid(
            field,
            "'continue_final_message' and 'add_generation_prompt' cannot both be true",
        ));
    }
    let last = messages
        .last()
        .filter(|m| m.role == MsgRole::Assistant && m.tool_calls.is_empty() && m.content.is_some());
    if last.is_none() || messages.len() < 2 {
        return Err(invalid(
            field,
            "'continue_final_message' needs the last message to be the assistant's, with text, after at least one other message",
        ));
    }
    if tools || *format != ResponseFormat::Text {
        return Err(invalid(
            field,
            "'continue_final_message' cannot be combined with tools or structured output",
        ));
    }
    Ok(Some(Continuation { as_generated }))
}

/// Validates a text completion request body.
pub(crate) fn parse_text(body: &[u8]) -> Result<TextRequest, OpenAiError> {
    let m = parse_body(body)?;
    let o = Obj(&m);
    let model = o.model()?;
    let prompts = string_list(&o, "prompt")?;
    let (n, stream, include_usage) = stream_and_n(&o)?;
    if prompts.len() * n > MAX_N as usize {
        return Err(invalid(
            "n",
            format!(
                "prompts × n must be at most {MAX_N}, got {}",
                prompts.len() * n
            ),
        ));
    }
    let logprobs = match o.get("logprobs") {
        // Some clients send the chat style boolean here.
        Some(Value::Bool(false)) => None,
        Some(Value::Bool(true)) => Some(0),
        _ => o.int("logprobs", 0, MAX_TOP_LOGPROBS)?.map(|k| k as u8),
    };
    Ok(TextRequest {
        model,
        prompts,
        n,
        stream,
        include_usage,
        echo: o.bool("echo")?.unwrap_or(false),
        sampling: sampling(&o)?,
        logprobs,
    })
}
