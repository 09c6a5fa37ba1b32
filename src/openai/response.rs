//! OpenAI response shapes the apiserver writes: completions whole and as SSE chunks (with
//! the envelope every chunk of one request shares), model cards, base64 embeddings, rerank
//! results, ids and timestamps. Chunks are serialised from borrowed structs, never through a JSON `Value`.
//! Chunks carry `object` and `created` as OpenAI's do (DB-GPT's apiserver leaves them out).

use bytes::Bytes;
use serde_json::{Value, json};

use crate::wire::worker::Usage;

/// Which OpenAI API a completion request came through.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Text,
}

impl Kind {
    /// OpenAI's id prefix (`chatcmpl-`, `cmpl-`).
    pub fn id_prefix(self) -> &'static str {
        match self {
            Kind::Chat => "chatcmpl-",
            Kind::Text => "cmpl-",
        }
    }
}

/// Chunk/response envelope fields shared by every message of one request.
pub struct Envelope {
    pub kind: Kind,
    pub id: String,
    pub created: i64,
    pub model: String,
    pub include_usage: bool,
}

#[derive(serde::Serialize)]
pub struct ChunkOut<'a> {
    id: &'a str,
    object: &'static str,
    created: i64,
    model: &'a str,
    choices: &'a [ChoiceOut<'a>],
    /// `Some(None)` renders `"usage": null` (include_usage streams), `None` omits it.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<&'a Usage>>,
}

/// A whole (non-stream) chat or text completion.
#[derive(serde::Serialize)]
pub struct CompletionOut<'a> {
    id: &'a str,
    object: &'static str,
    created: i64,
    model: &'a str,
    choices: Vec<ResultChoice>,
    usage: Usage,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
pub enum ResultChoice {
    Chat {
        index: usize,
        message: MessageOut,
        logprobs: Option<()>,
        finish_reason: String,
    },
    Text {
        index: usize,
        text: String,
        logprobs: Option<()>,
        finish_reason: String,
    },
}

#[derive(serde::Serialize)]
pub struct MessageOut {
    role: &'static str,
    content: String,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
pub enum ChoiceOut<'a> {
    Chat {
        index: usize,
        delta: DeltaOut<'a>,
        logprobs: Option<()>,
        finish_reason: Option<&'a str>,
    },
    Text {
        index: usize,
        text: &'a str,
        logprobs: Option<()>,
        finish_reason: Option<&'a str>,
    },
}

#[derive(serde::Serialize)]
pub struct DeltaOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

impl Envelope {
    /// The envelope of a new response (a fresh id, created now).
    pub fn new(kind: Kind, model: String, include_usage: bool) -> Self {
        Envelope {
            kind,
            id: new_id(kind.id_prefix()),
            created: unix_now(),
            model,
            include_usage,
        }
    }

    /// One choice of a whole completion: the assistant's message, or the text.
    pub fn result_choice(&self, index: usize, text: String, finish_reason: String) -> ResultChoice {
        match self.kind {
            Kind::Chat => ResultChoice::Chat {
                index,
                message: MessageOut {
                    role: "assistant",
                    content: text,
                },
                logprobs: None,
                finish_reason,
            },
            Kind::Text => ResultChoice::Text {
                index,
                text,
                logprobs: None,
                finish_reason,
            },
        }
    }

    /// A whole (non-stream) completion of `choices`.
    pub fn completion(&self, choices: Vec<ResultChoice>, usage: Usage) -> CompletionOut<'_> {
        CompletionOut {
            id: &self.id,
            object: match self.kind {
                Kind::Chat => "chat.completion",
                Kind::Text => "text_completion",
            },
            created: self.created,
            model: &self.model,
            choices,
            usage,
        }
    }

    /// One stream chunk of one choice: a delta (chat) or text, the role on the first chat
    /// chunk, the finish reason on the last.
    pub fn chunk(
        &self,
        index: usize,
        content: Option<&str>,
        role: bool,
        finish: Option<&str>,
    ) -> Bytes {
        let choice = match self.kind {
            Kind::Chat => ChoiceOut::Chat {
                index,
                delta: DeltaOut {
                    role: role.then_some("assistant"),
                    content,
                },
                logprobs: None,
                finish_reason: finish,
            },
            Kind::Text => ChoiceOut::Text {
                index,
                text: content.unwrap_or(""),
                logprobs: None,
                finish_reason: finish,
            },
        };
        self.event(std::slice::from_ref(&choice), None)
    }

    /// An SSE event of `choices` (and the usage, when the client asked for it).
    pub fn event(&self, choices: &[ChoiceOut], usage: Option<&Usage>) -> Bytes {
        let c = ChunkOut {
            id: &self.id,
            object: match self.kind {
                Kind::Chat => "chat.completion.chunk",
                Kind::Text => "text_completion",
            },
            created: self.created,
            model: &self.model,
            choices,
            usage: self.include_usage.then_some(usage),
        };
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"data: ");
        let _ = serde_json::to_writer(&mut out, &c);
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }
}

/// An SSE event of any JSON value (an error, mid-stream).
pub fn sse(v: &Value) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    let _ = serde_json::to_writer(&mut out, v);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// The stream's last event.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

/// Standard base64 (RFC 4648, padded) of little-endian f32s: OpenAI's `encoding_format: base64`.
pub fn base64_f32(v: &[f32]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// One vector of an embeddings answer, as the request's `encoding_format` asked.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum EmbeddingOut<'a> {
    Float(&'a [f32]),
    Base64(String),
}

#[derive(serde::Serialize)]
struct EmbeddingItem<'a> {
    object: &'static str,
    index: usize,
    embedding: EmbeddingOut<'a>,
}

#[derive(serde::Serialize)]
struct EmbeddingsUsage {
    prompt_tokens: usize,
    total_tokens: usize,
}

#[derive(serde::Serialize)]
struct EmbeddingsOut<'a> {
    object: &'static str,
    data: Vec<EmbeddingItem<'a>>,
    model: &'a str,
    usage: EmbeddingsUsage,
}

/// OpenAI's embeddings answer, `{"object":"list","data":[{"object":"embedding","index",
/// "embedding"}],"model","usage":{"prompt_tokens","total_tokens"}}`, one item per vector in
/// order; `base64` writes each vector as [`base64_f32`] instead of a list of numbers.
/// `total_tokens` equals `prompt_tokens` (an embedding generates nothing).
pub fn embeddings_body(
    model: &str,
    vectors: &[Vec<f32>],
    base64: bool,
    prompt_tokens: usize,
) -> Bytes {
    let data = vectors
        .iter()
        .enumerate()
        .map(|(index, v)| EmbeddingItem {
            object: "embedding",
            index,
            embedding: if base64 {
                EmbeddingOut::Base64(base64_f32(v))
            } else {
                EmbeddingOut::Float(v)
            },
        })
        .collect();
    let out = EmbeddingsOut {
        object: "list",
        data,
        model,
        usage: EmbeddingsUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    };
    // Serialising plain structs of strings and numbers cannot fail.
    Bytes::from(serde_json::to_vec(&out).unwrap_or_default())
}

/// An OpenAI model card (DB-GPT's shape, which adds `root`, `parent`, `permission`).
pub fn model_card(id: &str, created: i64) -> Value {
    json!({
        "id": id,
        "object": "model",
        "created": created,
        "owned_by": "DB-GPT",
        "root": id,
        "parent": null,
        "permission": [{
            "id": format!("modelperm-{}", uuid::Uuid::new_v4().simple()),
            "object": "model_permission",
            "created": created,
            "allow_create_engine": false,
            "allow_sampling": true,
            "allow_logprobs": true,
            "allow_search_indices": true,
            "allow_view": true,
            "allow_fine_tuning": false,
            "organization": "*",
            "group": null,
            "is_blocking": false
        }]
    })
}

/// The answer to a rerank request in Jina's and Cohere's shape: `results` ordered by
/// descending `relevance_score` (ties keep request order), cut to `top_n`, each with the
/// document's request `index` and, with `return_documents`, the document as `{"text": …}`.
/// Token counts are not reported by the worker protocol, so `usage` holds zeros.
pub fn rerank_response(
    model: &str,
    scores: &[f32],
    documents: &[String],
    top_n: Option<usize>,
    return_documents: bool,
) -> Value {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.truncate(top_n.unwrap_or(usize::MAX));
    let results: Vec<Value> = order
        .into_iter()
        .map(|i| {
            let mut r = json!({"index": i, "relevance_score": scores[i]});
            if return_documents {
                r["document"] = json!({"text": documents.get(i)});
            }
            r
        })
        .collect();
    json!({
        "id": new_id("rerank-"),
        "model": model,
        "results": results,
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    })
}

/// A fresh response id with OpenAI's prefix (`chatcmpl-`, `cmpl-`).
pub fn new_id(prefix: &str) -> String {
    // From the thread-local RNG: no getrandom system call per request.
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    format!("{prefix}{}", id.simple())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    (crate::daemon::unix_ms() / 1000) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rerank_results_by_score_cut_to_top_n() {
        let docs: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let v = rerank_response("r", &[0.1, 0.9, 0.5, 0.9], &docs, None, false);
        let order: Vec<u64> = v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["index"].as_u64().unwrap())
            .collect();
        assert_eq!(order, [1, 3, 2, 0]);
        assert_eq!(v["model"], "r");
        assert!(v["results"][0].get("document").is_none());
        assert!(v["id"].as_str().unwrap().starts_with("rerank-"));
        let v = rerank_response("r", &[0.1, 0.9, 0.5, 0.2], &docs, Some(2), true);
        assert_eq!(
            v["results"],
            json!([
                {"index": 1, "relevance_score": 0.9f32, "document": {"text": "b"}},
                {"index": 2, "relevance_score": 0.5f32, "document": {"text": "c"}},
            ])
        );
        let v = rerank_response("r", &[0.3], &docs[..1], Some(10), false);
        assert_eq!(v["results"].as_array().unwrap().len(), 1);
    }
}
