//! HTTP client of the controller API, used by the CLI, workers and the apiserver.
//!
//! Takes DB-GPT's comma-separated list of controller URLs. Unlike DB-GPT (which picks a URL
//! from a 5-second health round and never retries), a request that fails to connect or gets
//! a 5xx is retried on the next URL at once, and the URL that answered is tried first next
//! time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::http::describe;

use crate::wire::controller::{HEARTBEAT_PATH, MODELS_PATH, ModelInstance};
use crate::wire::keys::{
    ApiKey, CreatedKey, KEY_PATH, KEYS_PATH, KEYS_SYNC_PATH, KEYS_USAGE_PATH, KeySpec, KeyUpdate,
    SyncRequest, SyncResponse, UsageRow,
};

/// Errors calling the controller.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the controller at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("controller at {url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("controller at {url} sent an unexpected body: {reason}")]
    Decode { url: String, reason: String },
    #[error("no controller address given")]
    NoAddress,
}

impl ClientError {
    /// The HTTP status the controller answered, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The controller's own message (`{"detail": …}`) for an error status, else the
    /// error's text.
    pub fn detail(&self) -> String {
        if let ClientError::Status { body, .. } = self
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(body)
            && let Some(d) = v.get("detail").and_then(|d| d.as_str())
        {
            return d.to_string();
        }
        self.to_string()
    }
}

/// `KEY_PATH` for one key, the name percent-encoded (it is whatever the user typed).
fn key_path(name_or_id: &str) -> String {
    let mut enc = String::with_capacity(name_or_id.len());
    for b in name_or_id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            enc.push(b as char);
        } else {
            enc.push_str(&format!("%{b:02X}"));
        }
    }
    KEY_PATH.replace("{name}", &enc)
}

/// A controller client over one or more base URLs.
pub struct ControllerClient {
    urls: Vec<String>,
    preferred: AtomicUsize,
    http: reqwest::Client,
}

/// Splits DB-GPT's comma list, trims parts and trailing slashes, adds `http://` if missing.
pub fn parse_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let s = s.trim_end_matches('/');
            if s.contains("://") {
                s.to_string()
            } else {
                format!("http://{s}")
            }
        })
        .collect()
}

impl ControllerClient {
    /// `urls` is DB-GPT's comma-separated list.
    pub fn new(urls: &str, timeout: Duration) -> Result<Self, ClientError> {
        let urls = parse_urls(urls);
        if urls.is_empty() {
            return Err(ClientError::NoAddress);
        }
        let http = crate::http::build_client(|b| {
            b.timeout(timeout)
                .connect_timeout(timeout.min(Duration::from_secs(3)))
        })
        .map_err(|e| ClientError::Unreachable {
            url: urls[0].clone(),
            reason: e.to_string(),
        })?;
        Ok(ControllerClient {
            urls,
            preferred: AtomicUsize::new(0),
            http,
        })
    }

    /// The configured base URLs.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    async fn call<T: DeserializeOwned>(
        &self,
        build: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let n = self.urls.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut last_err = None;
        for i in 0..n {
            let idx = (first + i) % n;
            let url = &self.urls[idx];
            let resp = match build(&self.http, url).send().await {
                Ok(r) => r,
                Err(e) => {
                    last_err = Some(ClientError::Unreachable {
                        url: url.clone(),
                        reason: describe(&e),
                    });
                    continue;
                }
            };
            let status = resp.status();
            if status.is_server_error() {
                last_err = Some(ClientError::Status {
                    url: url.clone(),
                    status: status.as_u16(),
                    body: resp.text().await.unwrap_or_default(),
                });
                continue;
            }
            if !status.is_success() {
                return Err(ClientError::Status {
                    url: url.clone(),
                    status: status.as_u16(),
                    body: resp.text().await.unwrap_or_default(),
                });
            }
            self.preferred.store(idx, Ordering::Relaxed);
            let bytes = resp.bytes().await.map_err(|e| ClientError::Unreachable {
                url: url.clone(),
                reason: describe(&e),
            })?;
            return serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
                url: url.clone(),
                reason: e.to_string(),
            });
        }
        Err(last_err.unwrap_or(ClientError::NoAddress))
    }

    /// `GET /api/controller/models`.
    pub async fn list(
        &self,
        model_name: Option<&str>,
        healthy_only: bool,
    ) -> Result<Vec<ModelInstance>, ClientError> {
        self.list_with(model_name, healthy_only, false).await
    }

    /// `GET /api/controller/models` (every instance) for a periodic poll: marked with
    /// [`crate::tracer::POLL_HEADER`] so that the controller does not write two tracer lines
    /// per poll (an apiserver polls every 2 s: ~20 MB of spans a day that say nothing).
    pub async fn poll_all(&self) -> Result<Vec<ModelInstance>, ClientError> {
        self.list_with(None, false, true).await
    }

    async fn list_with(
        &self,
        model_name: Option<&str>,
        healthy_only: bool,
        poll: bool,
    ) -> Result<Vec<ModelInstance>, ClientError> {
        self.call(|c, url| {
            let mut q: Vec<(&str, String)> = vec![("healthy_only", healthy_only.to_string())];
            if let Some(m) = model_name {
                q.push(("model_name", m.to_string()));
            }
            let req = c.get(format!("{url}{MODELS_PATH}")).query(&q);
            if poll {
                req.header(crate::tracer::POLL_HEADER, "1")
            } else {
                req
            }
        })
        .await
    }

    /// `POST /api/controller/models`.
    pub async fn register(&self, inst: &ModelInstance) -> Result<bool, ClientError> {
        self.call(|c, url| c.post(format!("{url}{MODELS_PATH}")).json(inst))
            .await
    }

    /// `POST /api/controller/heartbeat`.
    pub async fn heartbeat(&self, inst: &ModelInstance) -> Result<bool, ClientError> {
        self.call(|c, url| c.post(format!("{url}{HEARTBEAT_PATH}")).json(inst))
            .await
    }

    /// `DELETE /api/controller/models` (mark unhealthy, or remove).
    pub async fn deregister(
        &self,
        inst: &ModelInstance,
        remove: bool,
    ) -> Result<bool, ClientError> {
        self.call(|c, url| {
            c.delete(format!("{url}{MODELS_PATH}")).query(&[
                ("model_name", inst.model_name.clone()),
                ("host", inst.host.clone()),
                ("port", inst.port.to_string()),
                ("remove_from_registry", remove.to_string()),
            ])
        })
        .await
    }

    /// Creates a managed API key (`POST` [`KEYS_PATH`]); the answer holds its secret, once.
    pub async fn keys_create(&self, spec: &KeySpec) -> Result<CreatedKey, ClientError> {
        self.call(|c, url| c.post(format!("{url}{KEYS_PATH}")).json(spec))
            .await
    }

    /// Every managed API key, revoked ones too.
    pub async fn keys_list(&self) -> Result<Vec<ApiKey>, ClientError> {
        self.call(|c, url| c.get(format!("{url}{KEYS_PATH}"))).await
    }

    /// One key by name (or id).
    pub async fn keys_get(&self, name_or_id: &str) -> Result<ApiKey, ClientError> {
        let path = key_path(name_or_id);
        self.call(|c, url| c.get(format!("{url}{path}"))).await
    }

    /// Changes a key's models, limits, priority or expiry.
    pub async fn keys_update(
        &self,
        name_or_id: &str,
        update: &KeyUpdate,
    ) -> Result<ApiKey, ClientError> {
        let path = key_path(name_or_id);
        self.call(|c, url| c.patch(format!("{url}{path}")).json(update))
            .await
    }

    /// Revokes a key (the record and its usage stay).
    pub async fn keys_revoke(&self, name_or_id: &str) -> Result<ApiKey, ClientError> {
        let path = key_path(name_or_id);
        self.call(|c, url| c.delete(format!("{url}{path}"))).await
    }

    /// Usage rows of one key (by name or id) or of all, from `since` (`YYYY-MM-DD`) on.
    pub async fn keys_usage(
        &self,
        key: Option<&str>,
        since: Option<&str>,
    ) -> Result<Vec<UsageRow>, ClientError> {
        self.call(|c, url| {
            let mut q: Vec<(&str, &str)> = Vec::new();
            if let Some(k) = key {
                q.push(("key", k));
            }
            if let Some(s) = since {
                q.push(("since", s));
            }
            c.get(format!("{url}{KEYS_USAGE_PATH}")).query(&q)
        })
        .await
    }

    /// An apiserver's usage report and key refresh (`POST` [`KEYS_SYNC_PATH`]).
    pub async fn keys_sync(&self, req: &SyncRequest) -> Result<SyncResponse, ClientError> {
        self.call(|c, url| c.post(format!("{url}{KEYS_SYNC_PATH}")).json(req))
            .await
    }

    /// `GET /api/health` on one URL.
    pub async fn health(&self) -> Result<serde_json::Value, ClientError> {
        self.call(|c, url| c.get(format!("{url}{}", crate::wire::HEALTH_PATH)))
            .await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn key_paths_encode_what_the_user_typed() {
        assert_eq!(super::key_path("team-a"), "/api/controller/keys/team-a");
        assert_eq!(super::key_path("a b/c"), "/api/controller/keys/a%20b%2Fc");
    }

    #[test]
    fn url_lists() {
        assert_eq!(
            super::parse_urls("http://a:8000/, b:8010 ,,"),
            ["http://a:8000", "http://b:8010"]
        );
    }
}
