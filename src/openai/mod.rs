//! The OpenAI API, the one home of that protocol for every side that speaks it (the
//! apiserver, the workers' native OpenAI routes, the proxy backend): [`request`] validates
//! what clients send (and builds a DB-GPT worker's PromptRequest from it), [`response`] holds
//! the shapes written back (whole completions, SSE chunks, model cards, embeddings, rerank
//! results), [`responses`] the Responses API (`/v1/responses`) mapped onto chat completions,
//! [`error`] OpenAI's error answer, [`continuation`] the continuation of a broken
//! stream on another worker, and [`raw`] the byte-faithful reading and rewriting of a
//! body that is passed through. Nothing here does I/O.

pub mod continuation;
pub mod error;
pub mod raw;
pub mod request;
pub mod response;
pub mod responses;

pub use error::OpenAiError;
pub use request::{
    CompletionRequest, parse_chat, parse_completion, parse_embeddings, parse_relevance,
    parse_rerank, worker_prompt,
};
pub use response::{base64_f32, model_card, rerank_response, unix_now};
pub use responses::{ResponsesCtx, ResponsesStream};
