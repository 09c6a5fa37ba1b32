//! PLACEHOLDER until the local OpenAI engine lands (branch `engine`): every request is a 501.

use std::sync::Arc;

use axum::http::StatusCode;

use super::backends::LlmBackend;
use crate::openai::OpenAiError;

pub enum Answer {
    Whole(bytes::Bytes),
    Stream(futures::stream::BoxStream<'static, bytes::Bytes>),
}

fn not_yet() -> OpenAiError {
    OpenAiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "server_error",
        "not_implemented",
        "the local OpenAI engine is not built yet".into(),
    )
}

pub async fn chat_completions(_: Arc<dyn LlmBackend>, _: &[u8]) -> Result<Answer, OpenAiError> {
    Err(not_yet())
}

pub async fn completions(_: Arc<dyn LlmBackend>, _: &[u8]) -> Result<Answer, OpenAiError> {
    Err(not_yet())
}
