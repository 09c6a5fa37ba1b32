//! Tool calling for models whose own chat template cannot describe tools: the generic tool
//! format. The tools are described in a system message together with the exact JSON a call
//! is written as (`{"tool_calls":[{"name":…,"arguments":{…}}]}`); earlier calls are replayed
//! as that JSON and tool results as user messages naming the call and the tool. A required
//! or named `tool_choice` is enforced with a grammar built (by llama.cpp's converter) from a
//! JSON schema of that JSON, and the generated text is read back into tool calls, in this
//! format or in the common `<tool_call>{…}</tool_call>` one. Grammars for `response_format`
//! are built here too.

use serde_json::{Map, Value, json};

use super::request::{Message, MsgRole, ResponseFormat, Tool, ToolChoice};
use crate::openai::OpenAiError;
use crate::worker::backends::{ChatMessage, Role};

/// A tool call read from generated text.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ParsedCall {
    pub name: String,
    /// The arguments as a JSON text.
    pub arguments: String,
}

/// The generic format's instructions: what the tools are and how to call them.
pub(crate) fn system_prompt(tools: &[Tool], choice: &ToolChoice, parallel: bool) -> String {
    let list: Vec<Value> = tools
        .iter()
        .map(|t| {
            let mut m = Map::new();
            m.insert("name".into(), Value::String(t.name.clone()));
            if let Some(d) = &t.description {
                m.insert("description".into(), Value::String(d.clone()));
            }
            m.insert(
                "parameters".into(),
                t.parameters
                    .clone()
                    .unwrap_or_else(|| json!({"type": "object"})),
            );
            Value::Object(m)
        })
        .collect();
    let mut s = String::from(
        "You can call functions (tools) to help answer. The available tools, as JSON:\n",
    );
    s.push_str(&Value::Array(list).to_string());
    s.push_str(
        "\n\nTo call tools, reply with only this JSON and nothing else:\n\
         {\"tool_calls\":[{\"name\":\"<tool name>\",\"arguments\":{<the arguments, matching the tool's parameters>}}]}\n",
    );
    s.push_str(if parallel {
        "You may list several calls. "
    } else {
        "Call one tool at a time. "
    });
    match choice {
        ToolChoice::Required => s.push_str("You must call a tool now."),
        ToolChoice::Named(n) => s.push_str(&format!("You must call the tool '{n}' now.")),
        _ => s.push_str("If no tool is needed, answer normally in plain text."),
    }
    s
}

/// The arguments of an earlier call as JSON (the object when the string parses).
fn arguments_value(args: &str) -> Value {
    serde_json::from_str(args).unwrap_or_else(|_| Value::String(args.to_string()))
}

/// Earlier tool calls written the way the generic format asks the model to write them.
fn calls_json(m: &Message) -> String {
    let calls: Vec<Value> = m
        .tool_calls
        .iter()
        .map(|c| json!({"name": c.name, "arguments": arguments_value(&c.arguments)}))
        .collect();
    json!({ "tool_calls": calls }).to_string()
}

/// The conversation as the backend's own chat template gets it (roles system, user,
/// assistant): developer messages become system ones, assistant tool calls the format's
/// JSON, tool results user messages naming the call; `tools_prompt` (when tools are
/// offered) joins the first system message or becomes one.
pub(crate) fn generic_messages(
    messages: &[Message],
    tools_prompt: Option<String>,
) -> Vec<ChatMessage> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    for (i, m) in messages.iter().enumerate() {
        let text = m.content.clone().unwrap_or_default();
        let msg = match m.role {
            MsgRole::System | MsgRole::Developer => ChatMessage::new(Role::System, text),
            MsgRole::User => ChatMessage::new(Role::User, text),
            MsgRole::Assistant if m.tool_calls.is_empty() => {
                ChatMessage::new(Role::Assistant, text)
            }
            MsgRole::Assistant => {
                let calls = calls_json(m);
                let content = if text.trim().is_empty() {
                    calls
                } else {
                    format!("{text}\n{calls}")
                };
                ChatMessage::new(Role::Assistant, content)
            }
            MsgRole::Tool => {
                let id = m.tool_call_id.as_deref().unwrap_or_default();
                let name = m.name.clone().or_else(|| tool_name_for(&messages[..i], id));
                let who = match name {
                    Some(n) => format!("tool call {id} ({n})"),
                    None => format!("tool call {id}"),
                };
                ChatMessage::new(Role::User, format!("Result of {who}:\n{text}"))
            }
        };
        out.push(msg);
    }
    if let Some(p) = tools_prompt {
        match out.first_mut() {
            Some(first) if first.role == Role::System => {
                first.content = format!("{}\n\n{p}", first.content);
            }
            _ => out.insert(0, ChatMessage::new(Role::System, p)),
        }
    }
    out
}

/// The name of the tool an earlier assistant call with this id called.
fn tool_name_for(earlier: &[Message], id: &str) -> Option<String> {
    earlier
        .iter()
        .rev()
        .flat_map(|m| m.tool_calls.iter())
        .find(|c| c.id == id)
        .map(|c| c.name.clone())
}

/// The JSON schema of a forced call: `{"tool_calls":[{name, arguments}, …]}` with each
/// tool's name as a constant and its parameters as the arguments' schema (closed to
/// undeclared keys unless the schema says otherwise).
pub(crate) fn forced_schema(tools: &[Tool], choice: &ToolChoice, parallel: bool) -> Value {
    let one = |t: &Tool| {
        let mut args = t
            .parameters
            .clone()
            .unwrap_or_else(|| json!({"type": "object"}));
        if let Value::Object(a) = &mut args
            && a.contains_key("properties")
            && !a.contains_key("additionalProperties")
        {
            a.insert("additionalProperties".into(), Value::Bool(false));
        }
        json!({
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": args},
            "required": ["name", "arguments"],
            "additionalProperties": false,
        })
    };
    let items: Vec<Value> = match choice {
        ToolChoice::Named(n) => tools.iter().filter(|t| &t.name == n).map(one).collect(),
        _ => tools.iter().map(one).collect(),
    };
    let mut list = json!({
        "type": "array",
        "items": {"anyOf": items},
        "minItems": 1,
    });
    if !parallel || matches!(choice, ToolChoice::Named(_)) {
        list["maxItems"] = json!(1);
    }
    json!({
        "type": "object",
        "properties": {"tool_calls": list},
        "required": ["tool_calls"],
        "additionalProperties": false,
    })
}

/// llama.cpp's JSON-schema → GBNF converter (root rule `root`).
#[cfg(feature = "local-models")]
pub(crate) fn schema_grammar(schema: &Value) -> Result<String, String> {
    llama_cpp_2::json_schema_to_grammar(&schema.to_string()).map_err(|e| e.to_string())
}

/// Without the local models there is no grammar converter (and no backend to use one).
#[cfg(not(feature = "local-models"))]
pub(crate) fn schema_grammar(_schema: &Value) -> Result<String, String> {
    Err("this build has no local models, so it cannot constrain generation".into())
}

/// The grammar forcing a tool call; a tool schema the converter rejects is a 400 naming it.
pub(crate) fn forced_grammar(
    tools: &[Tool],
    choice: &ToolChoice,
    parallel: bool,
) -> Result<String, OpenAiError> {
    schema_grammar(&forced_schema(tools, choice, parallel)).map_err(|e| {
        // Find the tool whose schema is at fault, to name it.
        let culprit = tools.iter().position(|t| {
            t.parameters
                .as_ref()
                .is_some_and(|p| schema_grammar(p).is_err())
        });
        let param = match culprit {
            Some(i) => format!("tools[{i}].function.parameters"),
            None => "tools".to_string(),
        };
        OpenAiError::invalid(
            &param,
            "invalid_schema",
            format!("the tool's parameter schema cannot be turned into a grammar: {e}"),
        )
    })
}

/// The grammar for `response_format` (`None` for text).
pub(crate) fn format_grammar(rf: &ResponseFormat) -> Result<Option<String>, OpenAiError> {
    match rf {
        ResponseFormat::Text => Ok(None),
        ResponseFormat::JsonObject => schema_grammar(&json!({"type": "object"}))
            .map(Some)
            .map_err(|e| {
                OpenAiError::invalid(
                    "response_format.type",
                    "unsupported_parameter",
                    format!("'json_object' cannot be enforced: {e}"),
                )
            }),
        ResponseFormat::JsonSchema { schema } => schema_grammar(schema).map(Some).map_err(|e| {
            OpenAiError::invalid(
                "response_format.json_schema.schema",
                "invalid_schema",
                format!("the JSON schema cannot be turned into a grammar (llama.cpp's converter rejected it): {e}"),
            )
        }),
    }
}

/// Whether text generated so far could still become a tool call (so a streamed answer
/// must hold it back): blank, or opening JSON, a code fence or `<tool_call>`.
pub(crate) fn may_be_call(text: &str) -> bool {
    let t = text.trim_start();
    const TAG: &str = "<tool_call>";
    const FENCE: &str = "```";
    t.is_empty()
        || t.starts_with('{')
        || t.starts_with('[')
        || t.starts_with(TAG)
        || TAG.starts_with(t)
        || t.starts_with(FENCE)
        || FENCE.starts_with(t)
}

/// Reads generated text as tool calls of the offered tools: the generic format's
/// `{"tool_calls":[…]}`, a bare `{"name","arguments"}` or a list of them, optionally in a
/// code fence, or one or more `<tool_call>{…}</tool_call>` blocks. `None` when the text is
/// anything else or names a tool that was not offered.
pub(crate) fn parse_calls(text: &str, tools: &[Tool], parallel: bool) -> Option<Vec<ParsedCall>> {
    let t = text.trim();
    let mut calls = if t.starts_with("<tool_call>") {
        let mut calls = Vec::new();
        let mut rest = t;
        while let Some(start) = rest.find("<tool_call>") {
            let after = &rest[start + "<tool_call>".len()..];
            let (body, next) = match after.find("</tool_call>") {
                Some(end) => (&after[..end], &after[end + "</tool_call>".len()..]),
                None => (after, ""),
            };
            calls.extend(calls_from(&serde_json::from_str(body.trim()).ok()?)?);
            rest = next;
        }
        if !rest.trim().is_empty() {
            return None;
        }
        calls
    } else {
        let t = t
            .strip_prefix("```json")
            .or_else(|| t.strip_prefix("```"))
            .and_then(|s| s.strip_suffix("```"))
            .unwrap_or(t)
            .trim();
        calls_from(&serde_json::from_str(t).ok()?)?
    };
    if calls.is_empty() || !calls.iter().all(|c| tools.iter().any(|t| t.name == c.name)) {
        return None;
    }
    if !parallel {
        calls.truncate(1);
    }
    Some(calls)
}

fn calls_from(v: &Value) -> Option<Vec<ParsedCall>> {
    match v {
        Value::Object(o) if o.contains_key("tool_calls") => {
            calls_from_list(o.get("tool_calls")?.as_array()?)
        }
        Value::Object(_) => Some(vec![one_call(v)?]),
        Value::Array(a) => calls_from_list(a),
        _ => None,
    }
}

fn calls_from_list(a: &[Value]) -> Option<Vec<ParsedCall>> {
    a.iter().map(one_call).collect()
}

/// `{"name","arguments"}` (also `parameters`, or OpenAI's own `{"function":{…}}`).
fn one_call(v: &Value) -> Option<ParsedCall> {
    let o = v.as_object()?;
    let o = match o.get("function") {
        Some(Value::Object(f)) => f,
        _ => o,
    };
    let name = o.get("name")?.as_str()?.to_string();
    let arguments = match o.get("arguments").or_else(|| o.get("parameters")) {
        None | Some(Value::Null) => "{}".to_string(),
        Some(Value::String(s)) if serde_json::from_str::<Value>(s).is_ok() => s.clone(),
        Some(v @ Value::Object(_)) => v.to_string(),
        Some(_) => return None,
    };
    Some(ParsedCall { name, arguments })
}
