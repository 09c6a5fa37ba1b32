//! The managed API keys protocol (ours, not DB-GPT's): the controller's `/api/controller/keys*`
//! routes, spoken by the controller (which keeps keys and usage in its store), the
//! apiserver (which caches the keys, enforces their limits and reports usage) and the CLI
//! (`dbgpt keys …`).
//!
//! A key's secret is `sk-dbgpt-<id>-<secret>`: [`KEY_PREFIX`], the key's public [`ApiKey::id`]
//! (which finds the record without a search), a dash, and 43 characters of URL-safe base64
//! (32 random bytes). The secret is printed once, at creation; the store keeps only
//! `salt` and `hash` (hex SHA-256 of the salt's bytes followed by the whole key string),
//! which is what [`ApiKey`] carries to the apiservers. Secrets have 256 random bits, so the
//! salted hash is safe to hand to the apiservers that must check keys.
//!
//! Usage flows the other way: each apiserver posts what its requests used since its last
//! report ([`SyncRequest`], about once a second, never on a request's path) and gets back
//! the keys that changed and the cluster-wide counts its limits need ([`SyncResponse`]), so
//! limits hold across apiservers within one sync interval.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `POST` creates a key (body [`KeySpec`], answer [`CreatedKey`]); `GET` lists keys
/// (answer `Vec<ApiKey>`).
pub const KEYS_PATH: &str = "/api/controller/keys";
/// `GET`/`PATCH`/`DELETE` one key by name or id: `{KEYS_PATH}/{name}`. `PATCH` takes a
/// [`KeyUpdate`]; `DELETE` revokes (the record stays, with `revoked_at`, so its usage is
/// still shown and a reused secret is told it was revoked).
pub const KEY_PATH: &str = "/api/controller/keys/{name}";
/// `GET` usage rows ([`UsageRow`]); query `key=<name>`, `since=<YYYY-MM-DD>` optional.
pub const KEYS_USAGE_PATH: &str = "/api/controller/keys-usage";
/// `POST` [`SyncRequest`] → [`SyncResponse`]: an apiserver's usage report and key refresh.
pub const KEYS_SYNC_PATH: &str = "/api/controller/keys-sync";

/// What every managed key's string starts with.
pub const KEY_PREFIX: &str = "sk-dbgpt-";

/// Which requests wait first when a model's instances are all busy.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Chats a person waits for: served before batch work.
    #[default]
    Interactive,
    /// Bulk jobs: wait behind interactive requests and are shed first.
    Batch,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Batch => "batch",
        }
    }
}

/// Limits of a key (or of a key on one model). `None`: unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Limits {
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Tokens (prompt + completion) per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u64>,
    /// Tokens per UTC day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_tokens: Option<u64>,
}

/// What `dbgpt keys create` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KeySpec {
    /// Unique, `[A-Za-z0-9_.-]{1,64}`.
    pub name: String,
    /// Models the key may use; `None`: every model. Aliases count as their own names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub limits: Limits,
    /// Limits that apply on one model, on top of the key's own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub model_limits: BTreeMap<String, Limits>,
    #[serde(default)]
    pub priority: Priority,
    /// Unix seconds; `None`: never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

/// A change to a key (`dbgpt keys update`): each `Some` field replaces the stored one.
/// Inner `None` of a double option clears the setting (e.g. `--rpm none`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KeyUpdate {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "double_option"
    )]
    pub models: Option<Option<Vec<String>>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "double_option"
    )]
    pub rpm: Option<Option<u64>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "double_option"
    )]
    pub tpm: Option<Option<u64>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "double_option"
    )]
    pub max_concurrency: Option<Option<u64>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "double_option"
    )]
    pub daily_tokens: Option<Option<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_limits: Option<BTreeMap<String, Limits>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "double_option"
    )]
    pub expires_at: Option<Option<i64>>,
}

/// Reads a present field of a double option: `null` is `Some(None)` (clear the setting);
/// an absent field stays `None` through `#[serde(default)]`. (Plain serde reads `null` as
/// `None`, which would make `--rpm none` a no-op.)
fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A stored key as the controller hands it out: everything but the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// Public identifier, 12 lowercase alphanumerics, part of the key string.
    pub id: String,
    #[serde(flatten)]
    pub spec: KeySpec,
    /// Hex of 16 random bytes.
    pub salt: String,
    /// Hex SHA-256 of `salt` bytes followed by the key string.
    pub hash: String,
    /// Unix seconds.
    pub created_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
    /// Bumped by every change; the apiservers' caches compare it.
    pub version: u64,
}

/// The answer to a create: the record and, this once, the key string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedKey {
    pub key: ApiKey,
    pub secret: String,
}

/// Usage of one key on one model on one UTC day, as stored and as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    pub key_id: String,
    /// The key's name (filled in by the controller on reads; ignored in reports).
    #[serde(default)]
    pub key_name: String,
    pub model: String,
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// An apiserver's report: usage since its last report (increments, added to the store),
/// and the newest key version it has seen (keys changed since come back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    /// Stable for the apiserver process (e.g. `host:port/pid`), for its share of the
    /// per-minute counters.
    pub apiserver: String,
    pub since_version: u64,
    pub usage: Vec<UsageRow>,
    /// Requests and tokens per key in the current minute, since the last report.
    pub minute: Vec<MinuteCount>,
}

/// One key's requests and tokens in one wall-clock minute, on one model or (empty
/// `model`) on all of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinuteCount {
    pub key_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    /// Unix seconds / 60.
    pub minute: i64,
    pub requests: u64,
    pub tokens: u64,
}

/// The controller's answer to a sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncResponse {
    /// The store's newest key version.
    pub version: u64,
    /// Every key changed after `since_version` (all keys when it was 0), revoked ones too.
    pub keys: Vec<ApiKey>,
    /// Cluster-wide counts of the current and previous minute, every apiserver's together
    /// (the reporting one included).
    pub minute: Vec<MinuteCount>,
    /// Cluster-wide tokens (prompt + completion, every model) per key today (UTC), by key
    /// id, for `daily_tokens`. Keys without usage today are absent.
    pub daily_tokens: BTreeMap<String, u64>,
}

/// The public id inside a managed key string (`sk-dbgpt-<id>-<secret>`), `None` for any
/// other string (a static key, a typo).
pub fn key_id(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('-')?;
    let ok = !id.is_empty()
        && id.len() <= 32
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && !secret.is_empty();
    ok.then_some(id)
}

/// The stored hash of `key` under `salt_hex`: hex SHA-256 of the salt's bytes followed by
/// the key string (`None` when the salt is not hex).
pub fn key_hash(salt_hex: &str, key: &str) -> Option<String> {
    use sha2::{Digest, Sha256};
    let salt = hex::decode(salt_hex).ok()?;
    let mut h = Sha256::new();
    h.update(&salt);
    h.update(key.as_bytes());
    Some(hex::encode(h.finalize()))
}

/// Whether `key` is the secret of `record` (constant time in the hash comparison).
pub fn key_matches(record: &ApiKey, key: &str) -> bool {
    let Some(h) = key_hash(&record.salt, key) else {
        return false;
    };
    let (a, b) = (h.as_bytes(), record.hash.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_keeps_clear_apart_from_absent() {
        let u = KeyUpdate {
            rpm: Some(None),
            tpm: Some(Some(5)),
            models: Some(None),
            ..KeyUpdate::default()
        };
        let json = serde_json::to_string(&u).unwrap();
        assert_eq!(json, r#"{"models":null,"rpm":null,"tpm":5}"#);
        assert_eq!(serde_json::from_str::<KeyUpdate>(&json).unwrap(), u);
        assert_eq!(
            serde_json::from_str::<KeyUpdate>("{}").unwrap(),
            KeyUpdate::default()
        );
    }

    #[test]
    fn key_ids_are_found_only_in_managed_keys() {
        assert_eq!(key_id("sk-dbgpt-abc123-SECRETpart_x"), Some("abc123"));
        assert_eq!(key_id("sk-dbgpt-abc123-"), None);
        assert_eq!(key_id("sk-dbgpt-ABC-secret"), None);
        assert_eq!(key_id("sk-other-abc-secret"), None);
        assert_eq!(key_id("static-key"), None);
    }

    #[test]
    fn a_key_matches_only_its_own_salted_hash() {
        let key = "sk-dbgpt-abc123-secret";
        let salt = "00112233445566778899aabbccddeeff";
        // Computed independently with Python's hashlib:
        // sha256(bytes.fromhex(salt) + key.encode()).hexdigest()
        let hash = key_hash(salt, key).unwrap();
        assert_eq!(
            hash,
            "be0c9893965db2d550952bdfd371f1ff2d496604106f62fa5f6b026694606783"
        );
        let record = ApiKey {
            id: "abc123".into(),
            spec: KeySpec {
                name: "team-a".into(),
                ..KeySpec::default()
            },
            salt: salt.into(),
            hash: hash.clone(),
            created_at: 0,
            revoked_at: None,
            version: 1,
        };
        assert!(key_matches(&record, key));
        assert!(!key_matches(&record, "sk-dbgpt-abc123-secreT"));
        assert_ne!(
            key_hash("ff112233445566778899aabbccddeeff", key).unwrap(),
            hash
        );
        assert_eq!(key_hash("not hex", key), None);
    }
}
