//! PLACEHOLDER until the local embeddings engine lands (branch `embed`): every request is a 501.

use std::sync::Arc;

use axum::http::StatusCode;

use super::backends::EmbeddingBackend;
use crate::openai::OpenAiError;

pub async fn embeddings(
    _: Arc<dyn EmbeddingBackend>,
    _: &[u8],
) -> Result<bytes::Bytes, OpenAiError> {
    Err(OpenAiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "server_error",
        "not_implemented",
        "the local embeddings engine is not built yet".into(),
    ))
}
