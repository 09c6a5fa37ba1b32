//! HTTP client of a worker's API (DB-GPT's `/api/worker/*`), used by the CLI's model
//! commands and chat REPL: the client settings for worker calls and a JSON POST whose error
//! carries the worker's own `detail`.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

/// Errors calling a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerClientError {
    #[error("cannot reach the worker at {host}:{port}: {reason}")]
    Unreachable {
        host: String,
        port: u16,
        reason: String,
    },
    /// A non-2xx answer; `detail` is the body's FastAPI `detail`, else the whole body.
    #[error("worker {host}:{port} answered {status}: {detail}")]
    Status {
        host: String,
        port: u16,
        status: u16,
        detail: String,
    },
}

/// HTTP client for worker calls (model loading can take a while).
pub fn worker_http() -> reqwest::Result<reqwest::Client> {
    crate::http::build_client(|b| {
        b.connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(600))
    })
}

/// POSTs JSON to a worker; returns the body, or an error with the worker's `detail`.
pub async fn post_worker(
    http: &reqwest::Client,
    host: &str,
    port: u16,
    path: &str,
    body: &(impl Serialize + ?Sized),
) -> Result<Value, WorkerClientError> {
    let url = format!("http://{host}:{port}{path}");
    let resp =
        http.post(&url)
            .json(body)
            .send()
            .await
            .map_err(|e| WorkerClientError::Unreachable {
                host: host.to_string(),
                port,
                reason: crate::http::describe(&e),
            })?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
    if !status.is_success() {
        let detail = v.get("detail").map(|d| match d {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        });
        return Err(WorkerClientError::Status {
            host: host.to_string(),
            port,
            status: status.as_u16(),
            detail: detail.unwrap_or(text),
        });
    }
    Ok(v)
}
