//! OpenAI's Responses API (`POST /v1/responses`), served statelessly on top of chat
//! completions: [`to_chat`] turns a Responses request into a chat completions request (and
//! the [`ResponsesCtx`] the answer needs), [`whole`] turns a chat completion into a Response
//! object, and [`ResponsesStream`] turns a chat completion's SSE chunks into the Responses
//! streaming events (`response.created` … `response.completed`). Pure conversions, no I/O:
//! the apiserver routes the chat request like any other and converts what comes back.
//!
//! Nothing is stored. `store: true` (the API's default) is accepted and ignored, and every
//! answer says `"store": false`; what needs stored state (`previous_response_id`,
//! `conversation`, a stored `prompt`, `item_reference` input items, `background: true`) is
//! a 400 naming the field, so a client replays the conversation in `input` instead (output
//! items of an earlier answer are valid input items; `reasoning` items are dropped).
//! Only `function` tools exist here: OpenAI's built-in tools (web search, file search, …)
//! are a 400 naming `tools[i].type`. Content other than text (images, files, audio) is a
//! 400 naming the part. A streamed refusal is not produced (chat `refusal` deltas are
//! dropped; a whole answer's refusal becomes a `refusal` content part).

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::OpenAiError;
use super::request::{Obj, missing, parse_body, wrong_type};
use super::response::{new_id, unix_now};

/// What answering one Responses request needs from the request: the response's identity
/// and the request fields every Response object echoes.
#[derive(Debug, Clone)]
pub struct ResponsesCtx {
    id: String,
    created_at: i64,
    model: String,
    stream: bool,
    instructions: Value,
    tools: Value,
    tool_choice: Value,
    text: Value,
    temperature: Value,
    top_p: Value,
    max_output_tokens: Value,
    parallel_tool_calls: bool,
    metadata: Value,
    user: Value,
    top_logprobs: Value,
    /// Whether `output_text` parts carry the tokens' log probabilities.
    logprobs: bool,
}

impl ResponsesCtx {
    /// The response id (`resp_…`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The requested model.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Whether the client asked for a stream (the chat request then streams too).
    pub fn stream(&self) -> bool {
        self.stream
    }
}

// ---------------------------------------------------------------------------------------
// Request: Responses → chat completions
// ---------------------------------------------------------------------------------------

/// A field this stateless server cannot honour.
fn unsupported(field: &str, msg: impl Into<String>) -> OpenAiError {
    OpenAiError::invalid(field, "unsupported_parameter", msg)
}

/// `m[k]`, with `null` read as absent.
fn get<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    m.get(k).filter(|v| !v.is_null())
}

fn opt_str<'a>(
    m: &'a Map<String, Value>,
    k: &str,
    field: &str,
) -> Result<Option<&'a str>, OpenAiError> {
    match get(m, k) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(wrong_type(field, "a string", v)),
    }
}

fn req_str<'a>(m: &'a Map<String, Value>, k: &str, field: &str) -> Result<&'a str, OpenAiError> {
    opt_str(m, k, field)?.ok_or_else(|| missing(field))
}

fn opt_bool(m: &Map<String, Value>, k: &str, field: &str) -> Result<Option<bool>, OpenAiError> {
    match get(m, k) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(wrong_type(field, "a boolean", v)),
    }
}

fn opt_object<'a>(
    m: &'a Map<String, Value>,
    k: &str,
    field: &str,
) -> Result<Option<&'a Map<String, Value>>, OpenAiError> {
    match get(m, k) {
        None => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(v) => Err(wrong_type(field, "an object", v)),
    }
}

/// A number in `lo..=hi`, kept as sent.
fn opt_number(m: &Map<String, Value>, k: &str, lo: f64, hi: f64) -> Result<Value, OpenAiError> {
    Obj(m).float(k, lo, hi)?;
    Ok(get(m, k).cloned().unwrap_or(Value::Null))
}

/// Converts a Responses request body into a chat completions request (a JSON object with
/// `model`, `messages` and the mapped options) and the context its answer needs. A stream
/// request asks the chat side for a stream with a final usage chunk.
pub fn to_chat(body: &[u8]) -> Result<(Map<String, Value>, ResponsesCtx), OpenAiError> {
    let m = parse_body(body)?;

    let model = match get(&m, "model") {
        None => return Err(missing("model")),
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        Some(Value::String(_)) => {
            return Err(OpenAiError::invalid(
                "model",
                "invalid_value",
                "'model' must not be empty",
            ));
        }
        Some(v) => return Err(wrong_type("model", "a string", v)),
    };

    // Stored state does not exist here.
    if get(&m, "previous_response_id").is_some() {
        return Err(unsupported(
            "previous_response_id",
            "'previous_response_id' is not supported: this server stores no responses; \
             send the earlier turns (and their output items) in 'input' instead",
        ));
    }
    if get(&m, "conversation").is_some() {
        return Err(unsupported(
            "conversation",
            "'conversation' is not supported: this server stores no conversations; \
             send the earlier turns in 'input' instead",
        ));
    }
    if get(&m, "prompt").is_some() {
        return Err(unsupported(
            "prompt",
            "'prompt' (a stored prompt template) is not supported by this server; \
             send the prompt in 'instructions' and 'input'",
        ));
    }
    if opt_bool(&m, "background", "background")? == Some(true) {
        return Err(unsupported(
            "background",
            "'background: true' is not supported: this server answers every response in the request that made it",
        ));
    }
    // Accepted and ignored: nothing is stored, and every answer says `store: false`.
    opt_bool(&m, "store", "store")?;
    let stream = opt_bool(&m, "stream", "stream")?.unwrap_or(false);

    let instructions = opt_str(&m, "instructions", "instructions")?;
    let mut messages = Vec::new();
    if let Some(s) = instructions {
        messages.push(json!({"role": "system", "content": s}));
    }
    match get(&m, "input") {
        None => return Err(missing("input")),
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                input_item(i, item, &mut messages)?;
            }
        }
        Some(v) => return Err(wrong_type("input", "a string or a list of input items", v)),
    }
    if messages.is_empty() {
        return Err(OpenAiError::invalid(
            "input",
            "invalid_value",
            "'input' must hold at least one item (or send 'instructions')",
        ));
    }

    let (mut chat_tools, names) = tools(get(&m, "tools"))?;
    let chat_tool_choice = tool_choice(get(&m, "tool_choice"), &names, &mut chat_tools)?;
    let response_format = text_format(get(&m, "text"))?;
    let max_output_tokens = match get(&m, "max_output_tokens") {
        None => Value::Null,
        Some(Value::Number(n)) if n.as_u64().is_some_and(|x| x >= 1) => Value::Number(n.clone()),
        Some(v @ Value::Number(_)) => {
            return Err(OpenAiError::invalid(
                "max_output_tokens",
                "invalid_value",
                format!("'max_output_tokens' must be a positive integer, got {v}"),
            ));
        }
        Some(v) => return Err(wrong_type("max_output_tokens", "an integer", v)),
    };
    let temperature = opt_number(&m, "temperature", 0.0, 2.0)?;
    let top_p = opt_number(&m, "top_p", 0.0, 1.0)?;
    let parallel_tool_calls = opt_bool(&m, "parallel_tool_calls", "parallel_tool_calls")?;
    let metadata = opt_object(&m, "metadata", "metadata")?;
    let user = opt_str(&m, "user", "user")?;
    let (logprobs, top_logprobs) = logprobs(&m)?;

    let mut chat = Map::new();
    chat.insert("model".into(), Value::String(model.clone()));
    chat.insert("messages".into(), Value::Array(messages));
    if !chat_tools.is_empty() {
        chat.insert("tools".into(), Value::Array(chat_tools));
        if let Some(c) = chat_tool_choice {
            chat.insert("tool_choice".into(), c);
        }
        if let Some(p) = parallel_tool_calls {
            chat.insert("parallel_tool_calls".into(), Value::Bool(p));
        }
    }
    if let Some(f) = response_format {
        chat.insert("response_format".into(), f);
    }
    if !max_output_tokens.is_null() {
        chat.insert("max_completion_tokens".into(), max_output_tokens.clone());
    }
    if !temperature.is_null() {
        chat.insert("temperature".into(), temperature.clone());
    }
    if !top_p.is_null() {
        chat.insert("top_p".into(), top_p.clone());
    }
    if let Some(u) = user {
        chat.insert("user".into(), Value::String(u.to_string()));
    }
    if logprobs {
        chat.insert("logprobs".into(), Value::Bool(true));
        if !top_logprobs.is_null() {
            chat.insert("top_logprobs".into(), top_logprobs.clone());
        }
    }
    if stream {
        chat.insert("stream".into(), Value::Bool(true));
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }

    // The echo of `text`: as sent, with the default format when none was given.
    let mut text = match get(&m, "text") {
        Some(Value::Object(o)) => o.clone(),
        _ => Map::new(),
    };
    if get(&text, "format").is_none() {
        text.insert("format".into(), json!({"type": "text"}));
    }
    let ctx = ResponsesCtx {
        id: new_id("resp_"),
        created_at: unix_now(),
        model,
        stream,
        instructions: instructions.map_or(Value::Null, |s| Value::String(s.to_string())),
        tools: get(&m, "tools").cloned().unwrap_or_else(|| json!([])),
        tool_choice: get(&m, "tool_choice")
            .cloned()
            .unwrap_or_else(|| json!("auto")),
        text: Value::Object(text),
        temperature,
        top_p,
        max_output_tokens,
        parallel_tool_calls: parallel_tool_calls.unwrap_or(true),
        metadata: metadata.map_or_else(|| json!({}), |o| Value::Object(o.clone())),
        user: user.map_or(Value::Null, |s| Value::String(s.to_string())),
        top_logprobs,
        logprobs,
    };
    Ok((chat, ctx))
}

/// Whether the client asked for log probabilities (`include` holding
/// `message.output_text.logprobs`, or `top_logprobs` above 0), and `top_logprobs` as sent.
/// Other `include` values concern built-in tools and reasoning state, which never occur here.
fn logprobs(m: &Map<String, Value>) -> Result<(bool, Value), OpenAiError> {
    let mut wanted = false;
    match get(m, "include") {
        None => {}
        Some(Value::Array(a)) => {
            for (i, v) in a.iter().enumerate() {
                match v {
                    Value::String(s) => wanted |= s == "message.output_text.logprobs",
                    v => return Err(wrong_type(&format!("include[{i}]"), "a string", v)),
                }
            }
        }
        Some(v) => return Err(wrong_type("include", "a list of strings", v)),
    }
    let top = match get(m, "top_logprobs") {
        None => Value::Null,
        Some(Value::Number(n)) if n.as_u64().is_some_and(|k| k <= 20) => {
            wanted |= n.as_u64() != Some(0);
            Value::Number(n.clone())
        }
        Some(v @ Value::Number(_)) => {
            return Err(OpenAiError::invalid(
                "top_logprobs",
                "invalid_value",
                format!("'top_logprobs' must be an integer between 0 and 20, got {v}"),
            ));
        }
        Some(v) => return Err(wrong_type("top_logprobs", "an integer", v)),
    };
    Ok((wanted, top))
}

/// One element of `input`, appended to the chat `messages`.
fn input_item(i: usize, item: &Value, out: &mut Vec<Value>) -> Result<(), OpenAiError> {
    let field = format!("input[{i}]");
    let Value::Object(o) = item else {
        return Err(wrong_type(&field, "an object", item));
    };
    let kind = match get(o, "type") {
        None if o.contains_key("role") => "message",
        None => {
            return Err(OpenAiError::invalid(
                &format!("{field}.type"),
                "missing_required_parameter",
                format!(
                    "'{field}' must be a message ({{\"role\", \"content\"}}) or an item with a 'type'"
                ),
            ));
        }
        Some(Value::String(s)) => s.as_str(),
        Some(v) => return Err(wrong_type(&format!("{field}.type"), "a string", v)),
    };
    match kind {
        "message" => out.push(input_message(&field, o)?),
        "function_call" => {
            let call_id = req_str(o, "call_id", &format!("{field}.call_id"))?;
            let name = req_str(o, "name", &format!("{field}.name"))?;
            let arguments = req_str(o, "arguments", &format!("{field}.arguments"))?;
            let call = json!({
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            });
            // Calls following an assistant message (or each other) belong to that turn.
            match out.last_mut() {
                Some(Value::Object(prev)) if prev.get("role") == Some(&json!("assistant")) => {
                    match prev.get_mut("tool_calls") {
                        Some(Value::Array(calls)) => calls.push(call),
                        _ => {
                            prev.insert("tool_calls".into(), json!([call]));
                        }
                    }
                }
                _ => out.push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
            }
        }
        "function_call_output" => {
            let call_id = req_str(o, "call_id", &format!("{field}.call_id"))?;
            let content = match get(o, "output") {
                None => return Err(missing(&format!("{field}.output"))),
                Some(Value::String(s)) => Value::String(s.clone()),
                Some(Value::Array(parts)) => text_parts(&format!("{field}.output"), parts)?,
                Some(v) => {
                    return Err(wrong_type(
                        &format!("{field}.output"),
                        "a string or a list of content parts",
                        v,
                    ));
                }
            };
            out.push(json!({"role": "tool", "tool_call_id": call_id, "content": content}));
        }
        // A reasoning model's own state: nothing a chat model can take, dropped.
        "reasoning" => {}
        "item_reference" => {
            return Err(unsupported(
                &format!("{field}.type"),
                "'item_reference' input items are not supported: this server stores no items; send the item itself",
            ));
        }
        other => {
            return Err(unsupported(
                &format!("{field}.type"),
                format!(
                    "input items of type '{other}' are not supported; use messages, \
                     'function_call' and 'function_call_output' items"
                ),
            ));
        }
    }
    Ok(())
}

/// A message input item as a chat message.
fn input_message(field: &str, o: &Map<String, Value>) -> Result<Value, OpenAiError> {
    let role_field = format!("{field}.role");
    let role = match req_str(o, "role", &role_field)? {
        "user" => "user",
        "assistant" => "assistant",
        // Every chat server knows `system`; not every one knows `developer`.
        "system" | "developer" => "system",
        other => {
            return Err(OpenAiError::invalid(
                &role_field,
                "invalid_value",
                format!(
                    "unsupported role '{other}'; use 'user', 'assistant', 'system' or 'developer'"
                ),
            ));
        }
    };
    let content_field = format!("{field}.content");
    let content = match get(o, "content") {
        None => return Err(missing(&content_field)),
        Some(Value::String(s)) => Value::String(s.clone()),
        Some(Value::Array(parts)) => {
            let parts = text_parts(&content_field, parts)?;
            // An assistant turn goes back as one string, which every chat server takes.
            match (role, parts) {
                ("assistant", Value::Array(p)) => Value::String(
                    p.iter()
                        .filter_map(|x| x["text"].as_str())
                        .collect::<String>(),
                ),
                (_, p) => p,
            }
        }
        Some(v) => {
            return Err(wrong_type(
                &content_field,
                "a string or a list of content parts",
                v,
            ));
        }
    };
    Ok(json!({"role": role, "content": content}))
}

/// Responses content parts as chat content: one text part as a string, several as a list
/// of chat text parts. Anything but text is a 400 naming the part.
fn text_parts(field: &str, parts: &[Value]) -> Result<Value, OpenAiError> {
    let mut texts = Vec::with_capacity(parts.len());
    for (j, p) in parts.iter().enumerate() {
        let pf = format!("{field}[{j}]");
        let Value::Object(po) = p else {
            return Err(wrong_type(&pf, "an object", p));
        };
        let text = match req_str(po, "type", &format!("{pf}.type"))? {
            "input_text" | "output_text" | "text" => req_str(po, "text", &format!("{pf}.text"))?,
            "refusal" => req_str(po, "refusal", &format!("{pf}.refusal"))?,
            kind @ ("input_image" | "input_file" | "input_audio") => {
                return Err(OpenAiError::invalid(
                    &pf,
                    "unsupported_value",
                    format!("'{kind}' content is not supported by this server; send text"),
                ));
            }
            other => {
                return Err(OpenAiError::invalid(
                    &format!("{pf}.type"),
                    "invalid_value",
                    format!(
                        "unknown content part type '{other}'; use 'input_text' (or 'output_text' in assistant turns)"
                    ),
                ));
            }
        };
        texts.push(text);
    }
    Ok(match texts.as_slice() {
        [one] => Value::String((*one).to_string()),
        _ => Value::Array(
            texts
                .into_iter()
                .map(|t| json!({"type": "text", "text": t}))
                .collect(),
        ),
    })
}

/// `tools` in the Responses shape (`{"type":"function","name",…}`, flat) as chat tools,
/// with their names.
fn tools(v: Option<&Value>) -> Result<(Vec<Value>, Vec<String>), OpenAiError> {
    let list = match v {
        None => return Ok((Vec::new(), Vec::new())),
        Some(Value::Array(a)) => a,
        Some(v) => return Err(wrong_type("tools", "a list of tools", v)),
    };
    let mut out = Vec::with_capacity(list.len());
    let mut names: Vec<String> = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let field = format!("tools[{i}]");
        let Value::Object(o) = t else {
            return Err(wrong_type(&field, "an object", t));
        };
        match req_str(o, "type", &format!("{field}.type"))? {
            "function" => {}
            other => {
                return Err(unsupported(
                    &format!("{field}.type"),
                    format!(
                        "tools of type '{other}' are not available on this server; only 'function' tools are"
                    ),
                ));
            }
        }
        let name_field = format!("{field}.name");
        let name = match get(o, "name") {
            None if o.contains_key("function") => {
                return Err(OpenAiError::invalid(
                    &name_field,
                    "missing_required_parameter",
                    format!(
                        "Missing required parameter: '{name_field}' (Responses tools are flat: \
                         {{\"type\":\"function\",\"name\",\"parameters\"}}, not chat's nested 'function')"
                    ),
                ));
            }
            None => return Err(missing(&name_field)),
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::String(_)) => {
                return Err(OpenAiError::invalid(
                    &name_field,
                    "invalid_value",
                    format!("'{name_field}' must not be empty"),
                ));
            }
            Some(v) => return Err(wrong_type(&name_field, "a string", v)),
        };
        if names.contains(&name) {
            return Err(OpenAiError::invalid(
                &name_field,
                "invalid_value",
                format!("two tools are named '{name}'"),
            ));
        }
        let mut f = Map::new();
        f.insert("name".into(), Value::String(name.clone()));
        if let Some(d) = opt_str(o, "description", &format!("{field}.description"))? {
            f.insert("description".into(), Value::String(d.to_string()));
        }
        if let Some(p) = opt_object(o, "parameters", &format!("{field}.parameters"))? {
            f.insert("parameters".into(), Value::Object(p.clone()));
        }
        if let Some(s) = opt_bool(o, "strict", &format!("{field}.strict"))? {
            f.insert("strict".into(), Value::Bool(s));
        }
        out.push(json!({"type": "function", "function": f}));
        names.push(name);
    }
    Ok((out, names))
}

/// `tool_choice` as chat's. `allowed_tools` narrows the chat tools to the allowed ones.
fn tool_choice(
    v: Option<&Value>,
    names: &[String],
    chat_tools: &mut Vec<Value>,
) -> Result<Option<Value>, OpenAiError> {
    let need_tools = |what: &str| {
        if names.is_empty() {
            Err(OpenAiError::invalid(
                "tool_choice",
                "invalid_value",
                format!("'tool_choice' {what} needs 'tools'"),
            ))
        } else {
            Ok(())
        }
    };
    let known = |field: &str, name: &str| {
        if names.iter().any(|n| n == name) {
            Ok(())
        } else {
            Err(OpenAiError::invalid(
                field,
                "invalid_value",
                format!("'{field}' names '{name}', which is not in 'tools'"),
            ))
        }
    };
    match v {
        None => Ok(None),
        Some(Value::String(s)) => match s.as_str() {
            "auto" | "none" => Ok(Some(Value::String(s.clone()))),
            "required" => {
                need_tools("'required'")?;
                Ok(Some(Value::String(s.clone())))
            }
            other => Err(OpenAiError::invalid(
                "tool_choice",
                "invalid_value",
                format!(
                    "unknown 'tool_choice' '{other}'; use 'auto', 'none', 'required' or {{\"type\":\"function\",\"name\":…}}"
                ),
            )),
        },
        Some(Value::Object(o)) => match req_str(o, "type", "tool_choice.type")? {
            "function" => {
                let name = req_str(o, "name", "tool_choice.name")?;
                need_tools("naming a function")?;
                known("tool_choice.name", name)?;
                Ok(Some(
                    json!({"type": "function", "function": {"name": name}}),
                ))
            }
            "allowed_tools" => {
                let mode = match req_str(o, "mode", "tool_choice.mode")? {
                    m @ ("auto" | "required") => m,
                    other => {
                        return Err(OpenAiError::invalid(
                            "tool_choice.mode",
                            "invalid_value",
                            format!(
                                "unknown 'tool_choice.mode' '{other}'; use 'auto' or 'required'"
                            ),
                        ));
                    }
                };
                need_tools("'allowed_tools'")?;
                let allowed = match get(o, "tools") {
                    None => return Err(missing("tool_choice.tools")),
                    Some(Value::Array(a)) => a,
                    Some(v) => return Err(wrong_type("tool_choice.tools", "a list of tools", v)),
                };
                let mut keep = Vec::with_capacity(allowed.len());
                for (j, t) in allowed.iter().enumerate() {
                    let field = format!("tool_choice.tools[{j}]");
                    let Value::Object(to) = t else {
                        return Err(wrong_type(&field, "an object", t));
                    };
                    if req_str(to, "type", &format!("{field}.type"))? != "function" {
                        return Err(unsupported(
                            &format!("{field}.type"),
                            "only 'function' tools are available on this server",
                        ));
                    }
                    let name = req_str(to, "name", &format!("{field}.name"))?;
                    known(&format!("{field}.name"), name)?;
                    keep.push(name.to_string());
                }
                chat_tools.retain(|t| {
                    t["function"]["name"]
                        .as_str()
                        .is_some_and(|n| keep.iter().any(|k| k == n))
                });
                if chat_tools.is_empty() {
                    return Err(OpenAiError::invalid(
                        "tool_choice.tools",
                        "invalid_value",
                        "'tool_choice.tools' must allow at least one tool",
                    ));
                }
                Ok(Some(Value::String(mode.to_string())))
            }
            other => Err(unsupported(
                "tool_choice.type",
                format!(
                    "'tool_choice' of type '{other}' is not available on this server; use 'function' or 'allowed_tools'"
                ),
            )),
        },
        Some(v) => Err(wrong_type("tool_choice", "a string or an object", v)),
    }
}

/// `text.format` as chat's `response_format` (`None` for plain text).
fn text_format(v: Option<&Value>) -> Result<Option<Value>, OpenAiError> {
    let text = match v {
        None => return Ok(None),
        Some(Value::Object(o)) => o,
        Some(v) => return Err(wrong_type("text", "an object", v)),
    };
    let Some(format) = opt_object(text, "format", "text.format")? else {
        return Ok(None);
    };
    match req_str(format, "type", "text.format.type")? {
        "text" => Ok(None),
        "json_object" => Ok(Some(json!({"type": "json_object"}))),
        "json_schema" => {
            let name = req_str(format, "name", "text.format.name")?;
            let schema = opt_object(format, "schema", "text.format.schema")?
                .ok_or_else(|| missing("text.format.schema"))?;
            let mut js = Map::new();
            js.insert("name".into(), Value::String(name.to_string()));
            if let Some(d) = opt_str(format, "description", "text.format.description")? {
                js.insert("description".into(), Value::String(d.to_string()));
            }
            js.insert("schema".into(), Value::Object(schema.clone()));
            if let Some(s) = opt_bool(format, "strict", "text.format.strict")? {
                js.insert("strict".into(), Value::Bool(s));
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": js})))
        }
        other => Err(OpenAiError::invalid(
            "text.format.type",
            "invalid_value",
            format!(
                "unknown 'text.format.type' '{other}'; use 'text', 'json_object' or 'json_schema'"
            ),
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Answer: chat completion → Response object
// ---------------------------------------------------------------------------------------

/// How a response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    InProgress,
    Completed,
    /// Cut short: `max_output_tokens` or `content_filter`.
    Incomplete(&'static str),
    Failed,
}

impl Status {
    fn from_finish(reason: Option<&str>) -> Self {
        match reason {
            Some("length") => Status::Incomplete("max_output_tokens"),
            Some("content_filter") => Status::Incomplete("content_filter"),
            _ => Status::Completed,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::Incomplete(_) => "incomplete",
            Status::Failed => "failed",
        }
    }

    /// The status of an output item finished with the response.
    fn item(self) -> &'static str {
        match self {
            Status::Completed => "completed",
            Status::InProgress => "in_progress",
            Status::Incomplete(_) | Status::Failed => "incomplete",
        }
    }
}

/// Chat `usage` in the Responses shape (`None` when the chat answer had none).
fn usage(u: Option<&Value>) -> Value {
    let Some(u @ Value::Object(_)) = u else {
        return Value::Null;
    };
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let input = n(&u["prompt_tokens"]);
    let output = n(&u["completion_tokens"]);
    let total = u["total_tokens"].as_u64().unwrap_or(input + output);
    json!({
        "input_tokens": input,
        "input_tokens_details": {
            "cached_tokens": n(&u["prompt_tokens_details"]["cached_tokens"]),
            "cache_write_tokens": 0,
        },
        "output_tokens": output,
        "output_tokens_details": {
            "reasoning_tokens": n(&u["completion_tokens_details"]["reasoning_tokens"]),
        },
        "total_tokens": total,
    })
}

/// A Response object of `ctx` with `output`.
fn response_object(
    ctx: &ResponsesCtx,
    status: Status,
    output: Vec<Value>,
    usage: Value,
    error: Value,
) -> Value {
    let incomplete = match status {
        Status::Incomplete(reason) => json!({"reason": reason}),
        _ => Value::Null,
    };
    let mut r = json!({
        "id": ctx.id,
        "object": "response",
        "created_at": ctx.created_at,
        "status": status.name(),
        "background": false,
        "error": error,
        "incomplete_details": incomplete,
        "instructions": ctx.instructions,
        "max_output_tokens": ctx.max_output_tokens,
        "model": ctx.model,
        "output": output,
        "parallel_tool_calls": ctx.parallel_tool_calls,
        "previous_response_id": null,
        "store": false,
        "temperature": ctx.temperature,
        "text": ctx.text,
        "tool_choice": ctx.tool_choice,
        "tools": ctx.tools,
        "top_logprobs": ctx.top_logprobs,
        "top_p": ctx.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": ctx.user,
        "metadata": ctx.metadata,
    });
    if status == Status::Completed {
        r["completed_at"] = json!(unix_now());
    }
    r
}

fn message_item(
    id: &str,
    status: &str,
    text: &str,
    refusal: Option<&str>,
    logprobs: &[Value],
) -> Value {
    let mut content = vec![text_part(text, logprobs)];
    if let Some(r) = refusal {
        if text.is_empty() {
            content.clear();
        }
        content.push(json!({"type": "refusal", "refusal": r}));
    }
    json!({
        "id": id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    })
}

/// An `output_text` content part.
fn text_part(text: &str, logprobs: &[Value]) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs})
}

/// Chat `logprobs.content` entries in the Responses shape (`bytes` filled in when the chat
/// side sent none).
fn token_logprobs(chat: &Value) -> Vec<Value> {
    let one = |t: &Value| {
        let token = t["token"].as_str().unwrap_or("");
        let bytes = match &t["bytes"] {
            Value::Array(b) => Value::Array(b.clone()),
            _ => json!(token.as_bytes()),
        };
        let mut o = Map::new();
        o.insert("token".into(), json!(token));
        o.insert("bytes".into(), bytes);
        o.insert("logprob".into(), t["logprob"].clone());
        o
    };
    chat["content"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|t| {
            let mut o = one(t);
            let top: Vec<Value> = t["top_logprobs"]
                .as_array()
                .map_or(&[][..], Vec::as_slice)
                .iter()
                .map(|a| Value::Object(one(a)))
                .collect();
            o.insert("top_logprobs".into(), Value::Array(top));
            Value::Object(o)
        })
        .collect()
}

/// Log probabilities in the shape of the text events (no `bytes`).
fn without_bytes(logprobs: &[Value]) -> Vec<Value> {
    fn strip(v: &Value) -> Value {
        match v {
            Value::Object(o) => Value::Object(
                o.iter()
                    .filter(|(k, _)| *k != "bytes")
                    .map(|(k, v)| (k.clone(), strip(v)))
                    .collect(),
            ),
            Value::Array(a) => Value::Array(a.iter().map(strip).collect()),
            v => v.clone(),
        }
    }
    logprobs.iter().map(strip).collect()
}

fn call_item(id: &str, status: &str, call_id: &str, name: &str, arguments: &str) -> Value {
    json!({
        "id": id,
        "type": "function_call",
        "status": status,
        "arguments": arguments,
        "call_id": call_id,
        "name": name,
    })
}

fn to_bytes(v: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

/// The chat side's error answer (`{"error":{…}}`) as an [`OpenAiError`].
fn chat_error(e: &Value) -> OpenAiError {
    let message = e["message"]
        .as_str()
        .or_else(|| e.as_str())
        .unwrap_or("the model failed without a message");
    OpenAiError::bad_gateway(format!("the model failed: {message}"))
}

/// Converts a whole chat completion (JSON) into the Response object's JSON.
pub fn whole(ctx: &ResponsesCtx, chat_answer: &[u8]) -> Result<Bytes, OpenAiError> {
    let answer: Value = serde_json::from_slice(chat_answer).map_err(|e| {
        OpenAiError::bad_gateway(format!("the model's answer is not valid JSON: {e}"))
    })?;
    if let Some(e) = answer.get("error").filter(|e| !e.is_null()) {
        return Err(chat_error(e));
    }
    let Some(choice) = answer["choices"].get(0) else {
        return Err(OpenAiError::bad_gateway(
            "the model's answer has no choices".to_string(),
        ));
    };
    let status = Status::from_finish(choice["finish_reason"].as_str());
    let msg = &choice["message"];
    let text = msg["content"].as_str().unwrap_or("");
    let refusal = msg["refusal"].as_str();
    let calls = msg["tool_calls"].as_array().map_or(&[][..], Vec::as_slice);
    let mut output = Vec::with_capacity(1 + calls.len());
    if !text.is_empty() || refusal.is_some() || calls.is_empty() {
        let logprobs = if ctx.logprobs {
            token_logprobs(&choice["logprobs"])
        } else {
            Vec::new()
        };
        output.push(message_item(
            &new_id("msg_"),
            status.item(),
            text,
            refusal,
            &logprobs,
        ));
    }
    for c in calls {
        let call_id = c["id"]
            .as_str()
            .map_or_else(|| new_id("call_"), str::to_string);
        output.push(call_item(
            &new_id("fc_"),
            status.item(),
            &call_id,
            c["function"]["name"].as_str().unwrap_or(""),
            c["function"]["arguments"].as_str().unwrap_or(""),
        ));
    }
    let r = response_object(ctx, status, output, usage(answer.get("usage")), Value::Null);
    Ok(to_bytes(&r))
}

// ---------------------------------------------------------------------------------------
// Stream: chat chunks → Responses events
// ---------------------------------------------------------------------------------------

/// One output item of a streamed response.
#[derive(Debug)]
enum Item {
    Message {
        id: String,
        text: String,
        /// The tokens' log probabilities (when asked for).
        logprobs: Vec<Value>,
        /// The status it was closed with; `None` while open.
        done: Option<&'static str>,
    },
    Call {
        id: String,
        /// The chat tool call's `index`.
        index: u64,
        call_id: String,
        name: String,
        arguments: String,
        done: Option<&'static str>,
    },
}

/// Turns a streamed chat completion into the Responses streaming events.
///
/// Feed it the payload of every chat SSE `data:` line, `[DONE]` included ([`feed`]), or
/// the chat stream's raw bytes as they come ([`feed_sse`], which finds the `data:` lines
/// across any split); each call answers the complete SSE events
/// (`event: <type>\ndata: {…}\n\n`) to send on. The first call
/// opens with `response.created` and `response.in_progress` (or call [`start`] to send them
/// before any chunk). Text becomes one `message` output item; each chat tool call a
/// `function_call` item; an item is closed when the next one opens (the message when the
/// first tool call starts, a call when the next call starts) or when the stream ends.
/// `[DONE]` (or a chunk's finish reason followed by [`finish`]) ends it with
/// `response.completed`, or `response.incomplete` when the chat answer stopped at its
/// token limit. A chat error chunk, or a stream that ends without a finish, ends it with
/// `response.failed` (whose `response.error` carries the message). Nothing follows the
/// terminal event; the Responses API has no `[DONE]`.
///
/// [`start`]: ResponsesStream::start
/// [`feed`]: ResponsesStream::feed
/// [`feed_sse`]: ResponsesStream::feed_sse
/// [`finish`]: ResponsesStream::finish
#[derive(Debug)]
pub struct ResponsesStream {
    ctx: ResponsesCtx,
    seq: u64,
    started: bool,
    ended: bool,
    items: Vec<Item>,
    finish_reason: Option<String>,
    usage: Value,
    /// [`feed_sse`](Self::feed_sse)'s bytes not yet ending a line.
    sse_buf: Vec<u8>,
    /// The `data:` of the SSE event being gathered.
    sse_data: Option<Vec<u8>>,
}

impl ResponsesStream {
    pub fn new(ctx: ResponsesCtx) -> Self {
        ResponsesStream {
            ctx,
            seq: 0,
            started: false,
            ended: false,
            items: Vec::new(),
            finish_reason: None,
            usage: Value::Null,
            sse_buf: Vec::new(),
            sse_data: None,
        }
    }

    /// The events for raw bytes of the chat SSE stream, split anywhere: each event's
    /// `data:` (several `data:` lines joined by newlines) goes to [`feed`](Self::feed) when
    /// the blank line ending the event arrives. Other SSE fields and comments are skipped.
    pub fn feed_sse(&mut self, raw: &[u8]) -> Vec<Bytes> {
        let mut out = Vec::new();
        self.sse_buf.extend_from_slice(raw);
        let mut start = 0;
        while let Some(n) = self.sse_buf[start..].iter().position(|&b| b == b'\n') {
            let line = &self.sse_buf[start..start + n];
            let line = line.strip_suffix(b"\r").unwrap_or(line).to_vec();
            start += n + 1;
            self.sse_line(&line, &mut out);
        }
        self.sse_buf.drain(..start);
        out
    }

    fn sse_line(&mut self, line: &[u8], out: &mut Vec<Bytes>) {
        if line.is_empty() {
            if let Some(data) = self.sse_data.take() {
                out.extend(self.feed(&data));
            }
        } else if let Some(v) = line.strip_prefix(b"data:") {
            let v = v.strip_prefix(b" ").unwrap_or(v);
            match &mut self.sse_data {
                Some(d) => {
                    d.push(b'\n');
                    d.extend_from_slice(v);
                }
                None => self.sse_data = Some(v.to_vec()),
            }
        }
    }

    /// `response.created` and `response.in_progress`, once (later calls answer nothing).
    pub fn start(&mut self) -> Vec<Bytes> {
        let mut out = Vec::new();
        self.ensure_started(&mut out);
        out
    }

    /// The events for one chat SSE `data:` payload.
    pub fn feed(&mut self, chat_sse_data: &[u8]) -> Vec<Bytes> {
        let mut out = Vec::new();
        if self.ended {
            return out;
        }
        self.ensure_started(&mut out);
        let data = chat_sse_data.trim_ascii();
        if data.is_empty() {
            return out;
        }
        if data == b"[DONE]" {
            self.complete(&mut out);
            return out;
        }
        let chunk: Value = match serde_json::from_slice(data) {
            Ok(v) => v,
            Err(e) => {
                self.fail(
                    &mut out,
                    &format!("the model sent a malformed stream chunk: {e}"),
                );
                return out;
            }
        };
        if let Some(e) = chunk.get("error").filter(|e| !e.is_null()) {
            let message = e["message"]
                .as_str()
                .or_else(|| e.as_str())
                .unwrap_or("the model failed without a message")
                .to_string();
            self.fail(&mut out, &message);
            return out;
        }
        if let Some(choices) = chunk["choices"].as_array() {
            for c in choices
                .iter()
                .filter(|c| c["index"].as_u64().unwrap_or(0) == 0)
            {
                let delta = &c["delta"];
                if let Some(t) = delta["content"].as_str().filter(|t| !t.is_empty()) {
                    self.text(&mut out, t, &c["logprobs"]);
                }
                if let Some(calls) = delta["tool_calls"].as_array() {
                    for (k, call) in calls.iter().enumerate() {
                        self.tool_delta(&mut out, k, call);
                    }
                }
                if let Some(r) = c["finish_reason"].as_str() {
                    self.finish_reason = Some(r.to_string());
                }
            }
        }
        if chunk.get("usage").is_some_and(Value::is_object) {
            self.usage = usage(chunk.get("usage"));
        }
        out
    }

    /// The chat stream ended: completes the response if the chat answer finished (a finish
    /// reason or `[DONE]` was seen), else fails it. Answers nothing more once it has ended.
    pub fn finish(&mut self) -> Vec<Bytes> {
        let mut out = Vec::new();
        // An event [`feed_sse`] holds without its closing blank line still counts.
        let rest = std::mem::take(&mut self.sse_buf);
        if !rest.is_empty() {
            self.sse_line(rest.strip_suffix(b"\r").unwrap_or(&rest), &mut out);
        }
        self.sse_line(b"", &mut out);
        if self.ended {
            return out;
        }
        self.ensure_started(&mut out);
        if self.finish_reason.is_some() {
            self.complete(&mut out);
        } else {
            self.fail(
                &mut out,
                "the model's answer stream ended before it finished",
            );
        }
        out
    }

    /// Fails the response with `message` (the relay lost the chat stream, say).
    pub fn fail_with(&mut self, message: &str) -> Vec<Bytes> {
        let mut out = Vec::new();
        if self.ended {
            return out;
        }
        self.ensure_started(&mut out);
        self.fail(&mut out, message);
        out
    }

    /// Whether the terminal event has been produced.
    pub fn ended(&self) -> bool {
        self.ended
    }

    fn emit(&mut self, out: &mut Vec<Bytes>, kind: &str, fields: Value) {
        let mut m = Map::new();
        m.insert("type".into(), Value::String(kind.to_string()));
        m.insert("sequence_number".into(), json!(self.seq));
        if let Value::Object(f) = fields {
            m.extend(f);
        }
        self.seq += 1;
        let mut b = Vec::with_capacity(128);
        b.extend_from_slice(b"event: ");
        b.extend_from_slice(kind.as_bytes());
        b.extend_from_slice(b"\ndata: ");
        let _ = serde_json::to_writer(&mut b, &m);
        b.extend_from_slice(b"\n\n");
        out.push(Bytes::from(b));
    }

    fn ensure_started(&mut self, out: &mut Vec<Bytes>) {
        if self.started {
            return;
        }
        self.started = true;
        let r = self.snapshot(Status::InProgress, Value::Null);
        self.emit(out, "response.created", json!({"response": r}));
        let r = self.snapshot(Status::InProgress, Value::Null);
        self.emit(out, "response.in_progress", json!({"response": r}));
    }

    /// The response object with the output so far.
    fn snapshot(&self, status: Status, error: Value) -> Value {
        let output = if status == Status::InProgress {
            Vec::new()
        } else {
            (0..self.items.len())
                .map(|i| self.item_value(i, status))
                .collect()
        };
        let usage = if status == Status::InProgress {
            Value::Null
        } else {
            self.usage.clone()
        };
        response_object(&self.ctx, status, output, usage, error)
    }

    /// Item `i` as JSON: a closed item with the status it was closed with, an open one
    /// with `status`'s item status.
    fn item_value(&self, i: usize, status: Status) -> Value {
        match &self.items[i] {
            Item::Message {
                id,
                text,
                logprobs,
                done,
            } => message_item(id, done.unwrap_or(status.item()), text, None, logprobs),
            Item::Call {
                id,
                call_id,
                name,
                arguments,
                done,
                ..
            } => call_item(id, done.unwrap_or(status.item()), call_id, name, arguments),
        }
    }

    fn open_message(&self) -> Option<usize> {
        self.items
            .iter()
            .rposition(|it| matches!(it, Item::Message { done: None, .. }))
    }

    /// Opens a new message item (closing any open item), answering its index.
    fn add_message(&mut self, out: &mut Vec<Bytes>) -> usize {
        self.close_all(out, Status::Completed);
        let id = new_id("msg_");
        let i = self.items.len();
        self.items.push(Item::Message {
            id: id.clone(),
            text: String::new(),
            logprobs: Vec::new(),
            done: None,
        });
        let mut item = message_item(&id, "in_progress", "", None, &[]);
        item["content"] = json!([]);
        self.emit(
            out,
            "response.output_item.added",
            json!({"output_index": i, "item": item}),
        );
        self.emit(
            out,
            "response.content_part.added",
            json!({
                "item_id": id,
                "output_index": i,
                "content_index": 0,
                "part": text_part("", &[]),
            }),
        );
        i
    }

    /// A text delta, with its chunk's `logprobs`.
    fn text(&mut self, out: &mut Vec<Bytes>, t: &str, chat_logprobs: &Value) {
        let i = match self.open_message() {
            Some(i) => i,
            None => self.add_message(out),
        };
        let wanted = self.ctx.logprobs;
        let Item::Message {
            id, text, logprobs, ..
        } = &mut self.items[i]
        else {
            return;
        };
        text.push_str(t);
        let delta_logprobs = if wanted {
            let new = token_logprobs(chat_logprobs);
            let delta = without_bytes(&new);
            logprobs.extend(new);
            delta
        } else {
            Vec::new()
        };
        let id = id.clone();
        self.emit(
            out,
            "response.output_text.delta",
            json!({
                "item_id": id,
                "output_index": i,
                "content_index": 0,
                "delta": t,
                "logprobs": delta_logprobs,
            }),
        );
    }

    /// One element `k` of a chunk's `delta.tool_calls`.
    fn tool_delta(&mut self, out: &mut Vec<Bytes>, k: usize, call: &Value) {
        let index = call["index"].as_u64().unwrap_or(k as u64);
        let name = call["function"]["name"].as_str().unwrap_or("");
        let args = call["function"]["arguments"].as_str().unwrap_or("");
        let found = self
            .items
            .iter()
            .position(|it| matches!(it, Item::Call { index: x, .. } if *x == index));
        let i = match found {
            Some(i) => i,
            None => {
                self.close_all(out, Status::Completed);
                let id = new_id("fc_");
                let call_id = call["id"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .map_or_else(|| new_id("call_"), str::to_string);
                let i = self.items.len();
                let item = call_item(&id, "in_progress", &call_id, name, "");
                self.items.push(Item::Call {
                    id,
                    index,
                    call_id,
                    name: name.to_string(),
                    arguments: String::new(),
                    done: None,
                });
                self.emit(
                    out,
                    "response.output_item.added",
                    json!({"output_index": i, "item": item}),
                );
                if args.is_empty() {
                    return;
                }
                i
            }
        };
        let Item::Call {
            id,
            name: item_name,
            arguments,
            done,
            ..
        } = &mut self.items[i]
        else {
            return;
        };
        // A name sent in pieces (or late) completes the item's name.
        if found.is_some() && !name.is_empty() {
            item_name.push_str(name);
        }
        arguments.push_str(args);
        // A fragment for a call already closed (interleaved calls) still reaches the final
        // response object, but gets no event after its item's `done`.
        if done.is_none() && !args.is_empty() {
            let id = id.clone();
            self.emit(
                out,
                "response.function_call_arguments.delta",
                json!({"item_id": id, "output_index": i, "delta": args}),
            );
        }
    }

    /// Closes every open item, ending them with `status`.
    fn close_all(&mut self, out: &mut Vec<Bytes>, status: Status) {
        for i in 0..self.items.len() {
            let id = match &mut self.items[i] {
                Item::Message { done, id, .. } | Item::Call { done, id, .. } => {
                    if done.is_some() {
                        continue;
                    }
                    *done = Some(status.item());
                    id.clone()
                }
            };
            let item = match &self.items[i] {
                Item::Message { text, logprobs, .. } => {
                    let item = message_item(&id, status.item(), text, None, logprobs);
                    let (text, logprobs) = (text.clone(), logprobs.clone());
                    self.emit(
                        out,
                        "response.output_text.done",
                        json!({
                            "item_id": id,
                            "output_index": i,
                            "content_index": 0,
                            "text": text,
                            "logprobs": without_bytes(&logprobs),
                        }),
                    );
                    self.emit(
                        out,
                        "response.content_part.done",
                        json!({
                            "item_id": id,
                            "output_index": i,
                            "content_index": 0,
                            "part": text_part(&text, &logprobs),
                        }),
                    );
                    item
                }
                Item::Call {
                    call_id,
                    name,
                    arguments,
                    ..
                } => {
                    let item = call_item(&id, status.item(), call_id, name, arguments);
                    let arguments = arguments.clone();
                    self.emit(
                        out,
                        "response.function_call_arguments.done",
                        json!({"item_id": id, "output_index": i, "arguments": arguments}),
                    );
                    item
                }
            };
            self.emit(
                out,
                "response.output_item.done",
                json!({"output_index": i, "item": item}),
            );
        }
    }

    fn complete(&mut self, out: &mut Vec<Bytes>) {
        let status = Status::from_finish(self.finish_reason.as_deref());
        // An answer with neither text nor calls is one empty message, as in a whole answer.
        if self.items.is_empty() {
            self.add_message(out);
        }
        self.close_all(out, status);
        // Items closed early stay completed; the last ones carry the end's status.
        let r = self.snapshot(status, Value::Null);
        self.ended = true;
        let kind = match status {
            Status::Incomplete(_) => "response.incomplete",
            _ => "response.completed",
        };
        self.emit(out, kind, json!({"response": r}));
    }

    fn fail(&mut self, out: &mut Vec<Bytes>, message: &str) {
        self.ended = true;
        let error = json!({"code": "server_error", "message": message});
        let r = self.snapshot(Status::Failed, error);
        self.emit(out, "response.failed", json!({"response": r}));
    }
}

#[cfg(test)]
mod tests;
