//! OpenAI's answer shapes for the local engine: whole chat and text completions, their SSE
//! chunks (role, content, tool-call fragments, finish, usage), tool calls with fresh
//! `call_` ids, and log-probabilities in chat's (`content[]` of token, logprob, bytes,
//! top_logprobs) and legacy completions' (tokens, token_logprobs, top_logprobs,
//! text_offset) shapes. The envelope (id, created, model) is the apiserver's
//! [`Envelope`].

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::tools::ParsedCall;
use crate::openai::response::{Envelope, Kind, new_id, sse};
use crate::worker::backends::{TokenLogprob, Usage};

/// A log-probability as JSON: the f32's shortest decimal (not its f64 widening), and
/// OpenAI's -9999.0 for an impossible token.
fn num(x: f32) -> Value {
    if !x.is_finite() {
        return json!(-9999.0);
    }
    json!(x.to_string().parse::<f64>().unwrap_or(f64::from(x)))
}

/// Chat's `logprobs`: one entry per token with its alternatives.
pub(crate) fn chat_logprobs(tokens: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let top: Vec<Value> = t
                .top
                .iter()
                .map(|a| json!({"token": a.token, "logprob": num(a.logprob), "bytes": a.bytes}))
                .collect();
            json!({"token": t.token, "logprob": num(t.logprob), "bytes": t.bytes, "top_logprobs": top})
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Legacy completions' `logprobs`; `offset` is the text's length (in characters) before
/// the first of these tokens.
pub(crate) fn text_logprobs(tokens: &[TokenLogprob], mut offset: usize) -> Value {
    let mut texts = Vec::with_capacity(tokens.len());
    let mut lps = Vec::with_capacity(tokens.len());
    let mut tops = Vec::with_capacity(tokens.len());
    let mut offsets = Vec::with_capacity(tokens.len());
    for t in tokens {
        texts.push(Value::String(t.token.clone()));
        lps.push(num(t.logprob));
        let mut top = Map::new();
        for a in &t.top {
            top.insert(a.token.clone(), num(a.logprob));
        }
        tops.push(Value::Object(top));
        offsets.push(json!(offset));
        offset += t.token.chars().count();
    }
    json!({"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// Tool calls of a whole answer (fresh ids).
pub(crate) fn tool_calls(calls: &[ParsedCall]) -> Value {
    Value::Array(
        calls
            .iter()
            .map(|c| {
                json!({"id": new_id("call_"), "type": "function",
                       "function": {"name": c.name, "arguments": c.arguments}})
            })
            .collect(),
    )
}

/// One finished choice of a whole answer.
pub(crate) struct Finished {
    pub index: usize,
    pub text: String,
    pub calls: Option<Vec<ParsedCall>>,
    /// The choice's `logprobs` value (already shaped), or `null`.
    pub logprobs: Value,
    pub finish_reason: &'static str,
}

/// The whole (non-stream) answer.
pub(crate) fn whole(env: &Envelope, choices: Vec<Finished>, usage: &Usage) -> Bytes {
    let choices: Vec<Value> = choices
        .into_iter()
        .map(|c| match env.kind {
            Kind::Chat => {
                let message = match &c.calls {
                    Some(calls) => json!({"role": "assistant", "content": null,
                        "tool_calls": tool_calls(calls), "refusal": null}),
                    None => json!({"role": "assistant", "content": c.text, "refusal": null}),
                };
                json!({"index": c.index, "message": message, "logprobs": c.logprobs,
                       "finish_reason": c.finish_reason})
            }
            Kind::Text => json!({"index": c.index, "text": c.text, "logprobs": c.logprobs,
                                 "finish_reason": c.finish_reason}),
        })
        .collect();
    let object = match env.kind {
        Kind::Chat => "chat.completion",
        Kind::Text => "text_completion",
    };
    let v = json!({
        "id": env.id,
        "object": object,
        "created": env.created,
        "model": env.model,
        "choices": choices,
        "usage": usage,
    });
    Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
}

/// One SSE chunk holding `choices` (and `"usage": null` when the stream ends with usage).
pub(crate) fn chunk(env: &Envelope, choices: Vec<Value>) -> Bytes {
    let object = match env.kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Text => "text_completion",
    };
    let mut v = json!({
        "id": env.id,
        "object": object,
        "created": env.created,
        "model": env.model,
        "choices": choices,
    });
    if env.include_usage {
        v["usage"] = Value::Null;
    }
    sse(&v)
}

/// The chunk after the last choice when `stream_options.include_usage` asked for it.
pub(crate) fn usage_chunk(env: &Envelope, usage: &Usage) -> Bytes {
    let object = match env.kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Text => "text_completion",
    };
    sse(&json!({
        "id": env.id,
        "object": object,
        "created": env.created,
        "model": env.model,
        "choices": [],
        "usage": usage,
    }))
}

/// A chat choice's delta.
pub(crate) fn delta(index: usize, delta: Value, logprobs: Value, finish: Option<&str>) -> Value {
    json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
}

/// A text completion choice's piece.
pub(crate) fn text_piece(index: usize, text: &str, logprobs: Value, finish: Option<&str>) -> Value {
    json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
}

/// The fragments announcing tool calls: each call's id, type and name first (empty
/// arguments), then its arguments string.
pub(crate) fn tool_call_deltas(index: usize, calls: &[ParsedCall], logprobs: Value) -> Vec<Value> {
    let mut out = Vec::with_capacity(calls.len() * 2);
    let mut logprobs = Some(logprobs);
    for (k, c) in calls.iter().enumerate() {
        out.push(delta(
            index,
            json!({"tool_calls": [{"index": k, "id": new_id("call_"), "type": "function",
                                   "function": {"name": c.name, "arguments": ""}}]}),
            logprobs.take().unwrap_or(Value::Null),
            None,
        ));
        out.push(delta(
            index,
            json!({"tool_calls": [{"index": k, "function": {"arguments": c.arguments}}]}),
            Value::Null,
            None,
        ));
    }
    out
}
