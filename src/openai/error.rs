//! OpenAI's error answer: `{"error":{"message","type","param","code"}}` with its HTTP status,
//! built by request validation, discovery misses and the relay's failures alike. Statuses are
//! OpenAI's (DB-GPT's apiserver answers every error with HTTP 400).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::apiserver::proxy::UpstreamError;

/// An error answered in OpenAI's shape.
#[derive(Debug, Clone)]
pub struct OpenAiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (an overloaded model).
    pub retry_after: Option<u32>,
}

impl OpenAiError {
    pub fn new(status: StatusCode, kind: &'static str, code: &'static str, msg: String) -> Self {
        OpenAiError {
            status,
            message: msg,
            kind,
            param: None,
            code: Some(code),
            retry_after: None,
        }
    }

    /// The same error naming the offending request field.
    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    /// 400 naming the offending request field.
    pub fn invalid(param: &str, code: &'static str, msg: impl Into<String>) -> Self {
        OpenAiError {
            status: StatusCode::BAD_REQUEST,
            message: msg.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: Some(code),
            retry_after: None,
        }
    }

    pub fn unauthorized(msg: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            msg.to_string(),
        )
    }

    pub fn model_not_found(model: &str, available: &[String]) -> Self {
        let list = if available.is_empty() {
            "no models are available right now".to_string()
        } else {
            format!("available models: {}", available.join(", "))
        };
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("The model `{model}` does not exist; {list}"),
        )
        .with_param("model")
    }

    pub fn unavailable(msg: String) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "no_healthy_instance",
            msg,
        )
    }

    /// 503 with `Retry-After`: the model's slots and wait queue are full (or the request
    /// waited past the queue's deadline); another instance, or a later try, may take it.
    pub fn overloaded(msg: String, retry_after_secs: u32) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "model_overloaded",
            msg,
        );
        e.retry_after = Some(retry_after_secs);
        e
    }

    pub fn bad_gateway(msg: String) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            "upstream_error",
            msg,
        )
    }

    pub fn gateway_timeout(msg: String) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            "upstream_timeout",
            msg,
        )
    }

    /// The JSON body `{"error":{…}}`.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// How the apiserver answers a failed worker call: an unknown model is OpenAI's 404, a model
/// without a routable instance 503, a worker that stays silent (before any output) 504, a
/// request the worker refused as the client's error (400, 413) the same status with the
/// worker's message ([`OpenAiError::from_upstream`] names the field), and every other
/// failure 502 with the relay's own account of it.
impl From<UpstreamError> for OpenAiError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::UnknownModel { model, available } => {
                OpenAiError::model_not_found(&model, &available)
            }
            UpstreamError::NoneRoutable { .. } => OpenAiError::unavailable(e.to_string()),
            UpstreamError::Timeout(_) | UpstreamError::Idle(_) => {
                OpenAiError::gateway_timeout(e.to_string())
            }
            UpstreamError::Refused { status, detail } => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
                let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    "request_too_large"
                } else {
                    "invalid_prompt"
                };
                OpenAiError::new(
                    status,
                    "invalid_request_error",
                    code,
                    format!("The model refused the request: {detail}"),
                )
            }
            UpstreamError::Overloaded { retry_after, .. } => {
                let msg = e.to_string();
                OpenAiError::overloaded(msg, retry_after)
            }
            UpstreamError::NoInstance { .. }
            | UpstreamError::Exhausted { .. }
            | UpstreamError::Rejected { .. }
            | UpstreamError::Broken(_)
            | UpstreamError::Malformed(_)
            | UpstreamError::NotVectors(_)
            | UpstreamError::MidStream(_) => OpenAiError::bad_gateway(e.to_string()),
        }
    }
}

impl OpenAiError {
    /// [`From`], naming `field` (the request's prompt: `messages`, `prompt`, `input`) when
    /// the worker refused the request as the client's error.
    pub fn from_upstream(e: UpstreamError, field: &str) -> Self {
        let refused = matches!(e, UpstreamError::Refused { .. });
        let o = Self::from(e);
        if refused { o.with_param(field) } else { o }
    }
}

impl IntoResponse for UpstreamError {
    fn into_response(self) -> Response {
        OpenAiError::from(self).into_response()
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let mut resp = crate::http::json_response(self.status, &self.body());
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn upstream_errors_keep_their_status_and_message() {
        let answer = |u: UpstreamError| {
            let e = OpenAiError::from(u);
            (e.status.as_u16(), e.code, e.message)
        };
        let (status, code, message) = answer(UpstreamError::UnknownModel {
            model: "m".into(),
            available: vec!["a".into(), "b".into()],
        });
        assert_eq!((status, code), (404, Some("model_not_found")));
        assert!(message.ends_with("available models: a, b"), "{message}");
        assert_eq!(
            answer(UpstreamError::NoneRoutable { model: "m".into() }),
            (
                503,
                Some("no_healthy_instance"),
                "no healthy instance of model `m` is available right now".into()
            )
        );
        // Silence before any output is a timeout; any failure after it is a broken stream.
        let idle = || UpstreamError::Idle(Duration::from_secs(2));
        assert_eq!(
            answer(idle()),
            (
                504,
                Some("upstream_timeout"),
                "the worker sent nothing for 2s".into()
            )
        );
        assert_eq!(
            answer(UpstreamError::MidStream(Box::new(idle()))),
            (
                502,
                Some("upstream_error"),
                "the worker stream broke: the worker sent nothing for 2s".into()
            )
        );
        assert_eq!(
            answer(UpstreamError::Exhausted {
                model: "m".into(),
                tried: 2,
                last: "worker h:1 failed: HTTP 500".into(),
            }),
            (
                502,
                Some("upstream_error"),
                "every worker tried for model `m` failed (2 tried); last: worker h:1 failed: HTTP 500"
                    .into()
            )
        );
        assert_eq!(
            answer(UpstreamError::Timeout(Duration::from_millis(1500))).0,
            504
        );
        // A worker's refusal stays the client's error, naming the field.
        let too_long = OpenAiError::from_upstream(
            UpstreamError::Refused {
                status: 400,
                detail: "prompt is 9 tokens but the model's context window is 8 tokens".into(),
            },
            "messages",
        );
        assert_eq!(too_long.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            (too_long.kind, too_long.code, too_long.param.as_deref()),
            (
                "invalid_request_error",
                Some("invalid_prompt"),
                Some("messages")
            )
        );
        assert!(too_long.message.contains("context window is 8 tokens"));
        let big = OpenAiError::from_upstream(
            UpstreamError::Refused {
                status: 413,
                detail: "too large".into(),
            },
            "input",
        );
        assert_eq!(
            (big.status.as_u16(), big.code, big.param.as_deref()),
            (413, Some("request_too_large"), Some("input"))
        );
        // Other failures name no field.
        let other = OpenAiError::from_upstream(UpstreamError::Broken("reset".into()), "input");
        assert_eq!((other.status.as_u16(), other.param), (502, None));
    }
}
