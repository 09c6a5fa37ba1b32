//! Operator-supplied chat templates (`--chat_template FILE`): a Hugging Face style Jinja
//! template, rendered with minijinja (Python string methods through minijinja-contrib's
//! pycompat, plus the `raise_exception` and `strftime_now` helpers HF templates call). The
//! template gets `messages` (OpenAI's shape: `content`, `tool_calls` with `function.name`
//! and `function.arguments` as an object, `tool_call_id`), `tools` (as the client sent
//! them, only when tools are offered), `add_generation_prompt`, `bos_token`, `eos_token`.
//! The file may be the template itself or a `tokenizer_config.json` carrying one.

use std::path::{Path, PathBuf};

use minijinja::{Environment, Error, ErrorKind};
use serde_json::{Map, Value, json};

use super::request::{Message, MsgRole, Tool};

/// Why a chat template could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot read chat template {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("chat template {origin} is not valid Jinja: {message}")]
    Syntax { origin: String, message: String },
    #[error("{} is JSON without a usable 'chat_template' string", .0.display())]
    NoTemplate(PathBuf),
}

/// A compiled chat template with the special tokens it may print.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

const NAME: &str = "chat";

fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(format: String) -> String {
    chrono::Utc::now().format(&format).to_string()
}

impl ChatTemplate {
    /// Compiles template source (`origin` names it in errors).
    pub fn new(source: impl Into<String>, origin: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        // As transformers renders chat templates.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.into())
            .map_err(|e| TemplateError::Syntax {
                origin: origin.to_string(),
                message: e.to_string(),
            })?;
        Ok(ChatTemplate {
            env,
            bos_token: String::new(),
            eos_token: String::new(),
        })
    }

    /// Reads a template file: Jinja text, or a Hugging Face `tokenizer_config.json` whose
    /// `chat_template` (and `bos_token`, `eos_token`) are used.
    pub fn load(path: &Path) -> Result<Self, TemplateError> {
        let text = std::fs::read_to_string(path).map_err(|source| TemplateError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let origin = path.display().to_string();
        let Ok(Value::Object(cfg)) = serde_json::from_str::<Value>(&text) else {
            return Self::new(text, &origin);
        };
        let source = match cfg.get("chat_template") {
            Some(Value::String(s)) => s.clone(),
            // A list of named templates: the default one.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| TemplateError::NoTemplate(path.to_path_buf()))?,
            _ => return Err(TemplateError::NoTemplate(path.to_path_buf())),
        };
        let token = |k: &str| match cfg.get(k) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Object(o)) => o
                .get("content")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            _ => String::new(),
        };
        Ok(Self::new(source, &origin)?.with_tokens(token("bos_token"), token("eos_token")))
    }

    /// Sets the texts of `bos_token` and `eos_token`.
    pub fn with_tokens(mut self, bos: impl Into<String>, eos: impl Into<String>) -> Self {
        self.bos_token = bos.into();
        self.eos_token = eos.into();
        self
    }

    /// Renders the prompt for `messages` (and `tools`, when offered), ending with the
    /// assistant's generation prompt. The error is the template's message (it raised, or
    /// failed on this conversation).
    pub(crate) fn render(
        &self,
        messages: &[Message],
        tools: Option<&[Tool]>,
    ) -> Result<String, String> {
        let mut ctx = Map::new();
        ctx.insert(
            "messages".into(),
            Value::Array(messages.iter().map(message_value).collect()),
        );
        if let Some(tools) = tools {
            ctx.insert(
                "tools".into(),
                Value::Array(tools.iter().map(|t| t.raw.clone()).collect()),
            );
        }
        ctx.insert("add_generation_prompt".into(), Value::Bool(true));
        ctx.insert("bos_token".into(), Value::String(self.bos_token.clone()));
        ctx.insert("eos_token".into(), Value::String(self.eos_token.clone()));
        let tmpl = self.env.get_template(NAME).map_err(|e| e.to_string())?;
        tmpl.render(minijinja::Value::from_serialize(Value::Object(ctx)))
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or_default().to_string(),
                _ => e.to_string(),
            })
    }
}

/// A message in the shape Hugging Face templates read.
fn message_value(m: &Message) -> Value {
    let role = match m.role {
        MsgRole::Developer => "system",
        r => r.name(),
    };
    let mut v = Map::new();
    v.insert("role".into(), Value::String(role.into()));
    v.insert(
        "content".into(),
        m.content.clone().map(Value::String).unwrap_or(Value::Null),
    );
    if !m.tool_calls.is_empty() {
        let calls: Vec<Value> = m
            .tool_calls
            .iter()
            .map(|c| {
                let args = serde_json::from_str::<Value>(&c.arguments)
                    .unwrap_or_else(|_| Value::String(c.arguments.clone()));
                json!({"id": c.id, "type": "function",
                       "function": {"name": c.name, "arguments": args}})
            })
            .collect();
        v.insert("tool_calls".into(), Value::Array(calls));
    }
    if let Some(id) = &m.tool_call_id {
        v.insert("tool_call_id".into(), Value::String(id.clone()));
    }
    if let Some(n) = &m.name {
        v.insert("name".into(), Value::String(n.clone()));
    }
    Value::Object(v)
}
