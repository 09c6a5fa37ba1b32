//! OpenAI's `POST /v1/embeddings` answered by a worker's own embedding model: this module
//! owns turning the client's request body into a call of an [`EmbeddingBackend`] and its
//! vectors into OpenAI's answer, `{"object":"list","data":[{"object":"embedding","index",
//! "embedding"}],"model","usage":{"prompt_tokens","total_tokens"}}`.
//!
//! The request is validated by the protocol's own parser
//! ([`crate::openai::request::parse_embeddings`]): `input` is a string or a
//! list of strings (token arrays are a 400 naming `input`: they would be ids of some other
//! tokenizer's vocabulary), `encoding_format` is `float` or `base64` (little-endian f32s, as
//! OpenAI), `user` and unknown fields are ignored. `dimensions` is honoured only as the
//! model's own size: the BERT models served here are not Matryoshka-trained, so a shortened
//! vector would not be a meaningful embedding; any other value is a 400 naming `dimensions`
//! and the size the model gives. `usage.prompt_tokens` is the real count of the tokens the
//! model read ([`EmbeddingBackend::count_tokens`]: special tokens included, each input
//! after truncation to the model's maximum length), and `total_tokens` the same number.
//!
//! The proxy backend is not served through here (it cannot count its upstream's tokens, and
//! answers a 500 saying so): the worker passes its upstream's answer through byte for byte,
//! the upstream's `usage` with it.

use std::sync::Arc;

use axum::http::StatusCode;
use bytes::Bytes;

use super::backends::{BackendError, EmbeddingBackend};
use crate::openai::OpenAiError;
use crate::openai::request::{EmbeddingsRequest, parse_embeddings};
use crate::openai::response::embeddings_body;

/// Answers an OpenAI embeddings request `body` with `backend`: OpenAI's JSON answer, or an
/// OpenAI error (400 naming the field for a bad request, 500 when the model fails).
pub async fn embeddings(
    backend: Arc<dyn EmbeddingBackend>,
    body: &[u8],
) -> Result<Bytes, OpenAiError> {
    let EmbeddingsRequest {
        model,
        input,
        base64,
        dimensions,
    } = parse_embeddings(body)?;
    if let (Some(want), Some(have)) = (dimensions, backend.dimension()) {
        check_dimensions(want, have)?;
    }
    let n = input.len();
    // Tokenizing is CPU work proportional to the input (up to 2048 texts): off the executor.
    let counter = backend.clone();
    let (input, tokens) = tokio::task::spawn_blocking(move || {
        let tokens = counter.count_tokens(&input);
        (input, tokens)
    })
    .await
    .map_err(|e| internal(format!("the token counting task failed: {e}")))?;
    let prompt_tokens = tokens.map_err(backend_error)?;
    let vectors = backend.embed(input).await.map_err(backend_error)?;
    if vectors.len() != n {
        return Err(internal(format!(
            "the model returned {} embeddings for {n} inputs",
            vectors.len()
        )));
    }
    if let Some(want) = dimensions {
        // A backend that did not know its size beforehand is checked on what it gave.
        for v in &vectors {
            check_dimensions(want, v.len())?;
        }
    }
    Ok(embeddings_body(&model, &vectors, base64, prompt_tokens))
}

/// `dimensions` must be the model's own vector size (see the module documentation).
fn check_dimensions(want: usize, have: usize) -> Result<(), OpenAiError> {
    if want == have {
        return Ok(());
    }
    Err(OpenAiError::invalid(
        "dimensions",
        "invalid_value",
        format!(
            "This model supports only dimensions={have} (its {have}-dimensional vectors \
             cannot be shortened); got dimensions={want}. Leave 'dimensions' out or send {have}"
        ),
    ))
}

fn internal(msg: String) -> OpenAiError {
    OpenAiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "internal_error",
        msg,
    )
}

/// A backend's failure as OpenAI's error: the model refusing the input is the client's error
/// (400 naming `input`), an upstream's refusal keeps its 400/413, any other upstream failure
/// is a 502 and a failing model a 500.
fn backend_error(e: BackendError) -> OpenAiError {
    match e {
        BackendError::BadRequest(m) => OpenAiError::invalid("input", "invalid_input", m),
        BackendError::Upstream {
            status: Some(s @ (400 | 413)),
            message,
        } => OpenAiError::new(
            StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_REQUEST),
            "invalid_request_error",
            "invalid_input",
            message,
        )
        .with_param("input"),
        e @ BackendError::Upstream { .. } => OpenAiError::bad_gateway(e.to_string()),
        BackendError::Overloaded {
            message,
            retry_after_secs,
        } => OpenAiError::overloaded(message, retry_after_secs),
        e @ (BackendError::Internal(_) | BackendError::Load { .. }) => internal(e.to_string()),
    }
}

#[cfg(test)]
mod tests;
