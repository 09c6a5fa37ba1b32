//! The controller's managed API key routes (protocol: [`crate::wire::keys`]) over a
//! [`KeyStore`]: create, list, show, update and revoke keys, read usage, and the
//! apiservers' sync (usage in, changed keys and cluster-wide counts out).
//!
//! Errors answer like the controller's other routes, `{"detail": message}`, the message
//! naming the field or the key: 400 for a bad field, 404 for an unknown key, 409 for a
//! taken name, 503 when the store cannot be written (nothing was changed).

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::{error, info};

use super::ControllerState;
use crate::http::{ApiError, CappedBody, json_response, json_response_sized};
use crate::keys::{KeyError, is_day, name_usage, now_secs};
use crate::telemetry::Escaped;
use crate::validate::{Fields, query_object};
use crate::wire::keys::{
    KEY_PATH, KEYS_PATH, KEYS_SYNC_PATH, KEYS_USAGE_PATH, KeySpec, KeyUpdate, SyncRequest,
};

/// The largest sync body taken: an apiserver that could not reach the controller for a
/// while reports everything it kept (a usage row is ~150 bytes; other routes keep the
/// default 1 MiB).
pub const SYNC_BODY_LIMIT: usize = 16 << 20;

/// The key routes (merged into the controller's router).
pub fn routes() -> Router<ControllerState> {
    Router::new()
        .route(KEYS_PATH, post(create).get(list))
        .route(KEY_PATH, get(show).patch(update).delete(revoke))
        .route(KEYS_USAGE_PATH, get(usage))
        .route(KEYS_SYNC_PATH, post(sync))
}

/// The HTTP answer to a store error.
pub fn key_error(e: KeyError) -> ApiError {
    match e {
        KeyError::NotFound(_) => ApiError::Status(StatusCode::NOT_FOUND, e.to_string()),
        KeyError::NameTaken(_) => ApiError::Status(StatusCode::CONFLICT, e.to_string()),
        KeyError::Invalid { .. } => ApiError::BadRequest(e.to_string()),
        KeyError::Storage(_) => {
            error!(error = %Escaped(&e), "key store failed");
            ApiError::Unavailable(e.to_string())
        }
    }
}

/// Parses a JSON body; a bad value is named by its path (`invalid limits.rpm: …`).
fn body<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." { what.to_string() } else { path };
        ApiError::BadRequest(format!("invalid {at}: {}", e.inner()))
    })?;
    de.end()
        .map_err(|e| ApiError::BadRequest(format!("invalid {what}: {e}")))?;
    Ok(parsed)
}

async fn create(
    State(s): State<ControllerState>,
    CappedBody(bytes): CappedBody,
) -> Result<Response, ApiError> {
    let spec: KeySpec = body(&bytes, "key spec")?;
    let created = s.keys.create(spec).await.map_err(key_error)?;
    info!(key = %Escaped(&created.key.spec.name), id = %created.key.id, "API key created");
    Ok(json_response(StatusCode::CREATED, &created))
}

async fn list(State(s): State<ControllerState>) -> Result<Response, ApiError> {
    let keys = s.keys.list().await.map_err(key_error)?;
    Ok(json_response_sized(
        StatusCode::OK,
        &keys,
        256 + keys.len() * 512,
    ))
}

async fn show(
    State(s): State<ControllerState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let key = s.keys.get(&name).await.map_err(key_error)?;
    Ok(json_response(StatusCode::OK, &key))
}

async fn update(
    State(s): State<ControllerState>,
    Path(name): Path<String>,
    CappedBody(bytes): CappedBody,
) -> Result<Response, ApiError> {
    let change: KeyUpdate = body(&bytes, "key update")?;
    let key = s.keys.update(&name, change).await.map_err(key_error)?;
    info!(key = %Escaped(&key.spec.name), version = key.version, "API key updated");
    Ok(json_response(StatusCode::OK, &key))
}

async fn revoke(
    State(s): State<ControllerState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let key = s.keys.revoke(&name).await.map_err(key_error)?;
    info!(key = %Escaped(&key.spec.name), "API key revoked");
    Ok(json_response(StatusCode::OK, &key))
}

async fn usage(
    State(s): State<ControllerState>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let v: Value = query_object(q.as_deref());
    let mut f = Fields::new("query", &v);
    let key = f.opt_str("key").filter(|k| !k.is_empty());
    let since = f.opt_str("since").filter(|d| !d.is_empty());
    f.finish()?;
    if let Some(d) = &since
        && !is_day(d)
    {
        return Err(ApiError::BadRequest(format!(
            "invalid since: {d:?} is not a YYYY-MM-DD date"
        )));
    }
    let key_id = match &key {
        Some(k) => Some(s.keys.get(k).await.map_err(key_error)?.id),
        None => None,
    };
    let mut rows = s
        .keys
        .usage(key_id.as_deref(), since.as_deref())
        .await
        .map_err(key_error)?;
    let keys = s.keys.list().await.map_err(key_error)?;
    name_usage(&mut rows, &keys);
    rows.sort_by(|a, b| {
        (&a.key_name, &a.key_id, &a.model, &a.day).cmp(&(&b.key_name, &b.key_id, &b.model, &b.day))
    });
    Ok(json_response_sized(
        StatusCode::OK,
        &rows,
        64 + rows.len() * 160,
    ))
}

async fn sync(
    State(s): State<ControllerState>,
    CappedBody(bytes): CappedBody<SYNC_BODY_LIMIT>,
) -> Result<Response, ApiError> {
    let req: SyncRequest = body(&bytes, "sync request")?;
    let answer = s.keys.sync(&req, now_secs()).await.map_err(key_error)?;
    Ok(json_response_sized(
        StatusCode::OK,
        &answer,
        256 + answer.keys.len() * 512 + answer.minute.len() * 96,
    ))
}
