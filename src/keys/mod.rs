//! Managed API keys on the controller's side: the [`KeyStore`] contract, the rules every
//! store shares (new secrets, spec validation, applying an update, UTC days and minutes)
//! and the two stores: [`RedbKeyStore`] (tables in the controller's redb registry file)
//! and [`SqlKeyStore`] (tables next to the SQL registry's, shared by every controller of
//! an HA cluster).
//!
//! A store keeps each key's record ([`ApiKey`]: spec, salt, salted hash, never the secret),
//! a store-wide version counter bumped by every create, update and revoke (so that an
//! apiserver's [`KeyStore::sync`] gets only the keys changed since its last one), usage per
//! key, model and UTC day (additive), and per-minute request/token counts per key and model
//! (additive, pruned after [`MINUTE_RETENTION`] minutes). A sync's usage and minute counts
//! are written in one transaction.

#[cfg(test)]
mod conformance;
pub mod redb_store;
pub mod sql;

use std::collections::BTreeMap;

use async_trait::async_trait;
use rand::Rng;

use crate::wire::keys::{
    ApiKey, CreatedKey, KEY_PREFIX, KeySpec, KeyUpdate, Limits, SyncRequest, SyncResponse,
    UsageRow, key_hash,
};

pub use redb_store::RedbKeyStore;
pub use sql::SqlKeyStore;

/// Minute counts older than this many minutes are deleted by the next sync.
pub const MINUTE_RETENTION: i64 = 5;
/// Length of a key's public id.
pub const ID_LEN: usize = 12;
/// Longest model name a key may list.
const MAX_MODEL_CHARS: usize = 128;

/// Errors of a key store.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No key has this name or id.
    #[error("no API key named {0:?}")]
    NotFound(String),
    /// Names are unique, revoked keys' included.
    #[error("an API key named {0:?} exists already (revoked keys keep their names)")]
    NameTaken(String),
    /// A field of the request is not acceptable.
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    /// The store could not be read or written; nothing was changed.
    #[error("key store unavailable: {0}")]
    Storage(String),
}

impl KeyError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        KeyError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The key store contract. Writes return only once they are durable.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Stores a new key (validated with [`validate_spec`]) and answers its secret, once.
    async fn create(&self, spec: KeySpec) -> Result<CreatedKey, KeyError>;
    /// Every key, revoked ones too, by name.
    async fn list(&self) -> Result<Vec<ApiKey>, KeyError>;
    /// The key named `name_or_id`, else the key with that id.
    async fn get(&self, name_or_id: &str) -> Result<ApiKey, KeyError>;
    /// Applies `update` ([`apply_update`]) and bumps the key's version.
    async fn update(&self, name_or_id: &str, update: KeyUpdate) -> Result<ApiKey, KeyError>;
    /// Marks the key revoked (the record and its usage stay). Revoking a revoked key
    /// changes nothing.
    async fn revoke(&self, name_or_id: &str) -> Result<ApiKey, KeyError>;
    /// Usage rows of one key id (or all), from `since` (`YYYY-MM-DD`) on, ordered by key
    /// id, model and day; `key_name` is left empty ([`name_usage`] fills it in).
    async fn usage(
        &self,
        key_id: Option<&str>,
        since: Option<&str>,
    ) -> Result<Vec<UsageRow>, KeyError>;
    /// Adds an apiserver's usage and minute counts (one transaction) and answers the keys
    /// changed after `req.since_version`, the minute counts of `now`'s minute and the one
    /// before it, and today's tokens per key id. `now` is unix seconds.
    async fn sync(&self, req: &SyncRequest, now: i64) -> Result<SyncResponse, KeyError>;
    /// A human-readable description of the store.
    fn describe(&self) -> String;
}

/// The current unix time in seconds.
pub fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The UTC day (`YYYY-MM-DD`) of a unix time.
pub fn day_of(unix_secs: i64) -> String {
    chrono::DateTime::from_timestamp(unix_secs, 0)
        .unwrap_or_default()
        .format("%Y-%m-%d")
        .to_string()
}

/// Whether `s` is a `YYYY-MM-DD` date.
pub fn is_day(s: &str) -> bool {
    s.len() == 10 && chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok()
}

/// The minute number (unix seconds / 60) of a unix time.
pub fn minute_of(unix_secs: i64) -> i64 {
    unix_secs.div_euclid(60)
}

/// Whether `name` is a valid key name: `[A-Za-z0-9_.-]{1,64}`.
pub fn is_valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn check_limits(prefix: &str, l: &Limits) -> Result<(), KeyError> {
    let fields = [
        ("rpm", l.rpm),
        ("tpm", l.tpm),
        ("max_concurrency", l.max_concurrency),
        ("daily_tokens", l.daily_tokens),
    ];
    for (name, v) in fields {
        if let Some(v) = v {
            if v == 0 {
                return Err(KeyError::invalid(
                    format!("{prefix}{name}"),
                    "must be at least 1 (leave it out for no limit)",
                ));
            }
            if v > i64::MAX as u64 {
                return Err(KeyError::invalid(
                    format!("{prefix}{name}"),
                    format!("{v} is too large"),
                ));
            }
        }
    }
    Ok(())
}

fn check_model_name(field: &str, m: &str) -> Result<(), KeyError> {
    if m.trim().is_empty() {
        return Err(KeyError::invalid(field, "a model name is empty"));
    }
    if m.chars().count() > MAX_MODEL_CHARS {
        return Err(KeyError::invalid(
            field,
            format!("model name {m:?} is longer than {MAX_MODEL_CHARS} characters"),
        ));
    }
    Ok(())
}

/// Checks a new key's spec: the name, the model list, every limit above 0, an expiry in the
/// future (`now` is unix seconds).
pub fn validate_spec(spec: &KeySpec, now: i64) -> Result<(), KeyError> {
    validate_fields(spec)?;
    check_expiry(spec.expires_at, now)
}

/// Checks a key's spec after `update`: as [`validate_spec`], but the expiry only when the
/// update sets one (an expired key's other settings can still be changed).
pub fn validate_updated(spec: &KeySpec, update: &KeyUpdate, now: i64) -> Result<(), KeyError> {
    validate_fields(spec)?;
    match update.expires_at {
        Some(at) => check_expiry(at, now),
        None => Ok(()),
    }
}

fn check_expiry(expires_at: Option<i64>, now: i64) -> Result<(), KeyError> {
    if let Some(at) = expires_at
        && at <= now
    {
        return Err(KeyError::invalid(
            "expires_at",
            format!("{at} is not in the future"),
        ));
    }
    Ok(())
}

fn validate_fields(spec: &KeySpec) -> Result<(), KeyError> {
    if !is_valid_name(&spec.name) {
        return Err(KeyError::invalid(
            "name",
            format!(
                "{:?} is not 1 to 64 of the characters A-Z a-z 0-9 _ . -",
                spec.name
            ),
        ));
    }
    if let Some(models) = &spec.models {
        if models.is_empty() {
            return Err(KeyError::invalid(
                "models",
                "the list is empty (leave it out to allow every model)",
            ));
        }
        for m in models {
            check_model_name("models", m)?;
        }
    }
    check_limits("", &spec.limits)?;
    for (m, l) in &spec.model_limits {
        check_model_name("model_limits", m)?;
        check_limits(&format!("model_limits.{m}."), l)?;
    }
    Ok(())
}

/// `key` with `update` applied (not yet validated: see [`validate_updated`]).
pub fn apply_update(key: &ApiKey, update: &KeyUpdate) -> ApiKey {
    let mut k = key.clone();
    let s = &mut k.spec;
    if let Some(m) = &update.models {
        s.models = m.clone();
    }
    if let Some(v) = update.rpm {
        s.limits.rpm = v;
    }
    if let Some(v) = update.tpm {
        s.limits.tpm = v;
    }
    if let Some(v) = update.max_concurrency {
        s.limits.max_concurrency = v;
    }
    if let Some(v) = update.daily_tokens {
        s.limits.daily_tokens = v;
    }
    if let Some(m) = &update.model_limits {
        s.model_limits = m.clone();
    }
    if let Some(p) = update.priority {
        s.priority = p;
    }
    if let Some(e) = update.expires_at {
        s.expires_at = e;
    }
    k
}

/// Checks an apiserver's report: days are `YYYY-MM-DD`, ids and models non-empty.
pub fn validate_sync(req: &SyncRequest) -> Result<(), KeyError> {
    for (i, u) in req.usage.iter().enumerate() {
        if !is_day(&u.day) {
            return Err(KeyError::invalid(
                format!("usage[{i}].day"),
                format!("{:?} is not a YYYY-MM-DD date", u.day),
            ));
        }
        if u.key_id.is_empty() {
            return Err(KeyError::invalid(format!("usage[{i}].key_id"), "empty"));
        }
        check_model_name(&format!("usage[{i}].model"), &u.model)?;
    }
    for (i, m) in req.minute.iter().enumerate() {
        if m.key_id.is_empty() {
            return Err(KeyError::invalid(format!("minute[{i}].key_id"), "empty"));
        }
        if m.model.chars().count() > MAX_MODEL_CHARS {
            return Err(KeyError::invalid(
                format!("minute[{i}].model"),
                "longer than 128 characters",
            ));
        }
    }
    Ok(())
}

/// A random string of `n` lowercase letters and digits.
fn random_id(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// URL-safe base64 without padding.
fn base64_url(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A new key record for `spec` (version 0: the store sets it) and its secret:
/// `sk-dbgpt-<12 lowercase alphanumerics>-<43 characters of URL-safe base64>`.
pub fn new_key(spec: KeySpec, now: i64) -> (ApiKey, String) {
    let id = random_id(ID_LEN);
    let mut secret_bytes = [0u8; 32];
    rand::rng().fill(&mut secret_bytes);
    let mut salt = [0u8; 16];
    rand::rng().fill(&mut salt);
    let secret = format!("{KEY_PREFIX}{id}-{}", base64_url(&secret_bytes));
    let salt = hex::encode(salt);
    let hash = key_hash(&salt, &secret).expect("the salt is hex");
    let key = ApiKey {
        id,
        spec,
        salt,
        hash,
        created_at: now,
        revoked_at: None,
        version: 0,
    };
    (key, secret)
}

/// Whether a key is usable at `now`: `"active"`, `"revoked"` or `"expired"`.
pub fn state(key: &ApiKey, now: i64) -> &'static str {
    if key.revoked_at.is_some() {
        "revoked"
    } else if key.spec.expires_at.is_some_and(|e| e <= now) {
        "expired"
    } else {
        "active"
    }
}

/// Fills in `key_name` of usage rows from `keys`.
pub fn name_usage(rows: &mut [UsageRow], keys: &[ApiKey]) {
    let names: BTreeMap<&str, &str> = keys
        .iter()
        .map(|k| (k.id.as_str(), k.spec.name.as_str()))
        .collect();
    for r in rows {
        if let Some(n) = names.get(r.key_id.as_str()) {
            r.key_name = n.to_string();
        }
    }
}

/// Picks the key named `name_or_id` from candidates matching by name or by id (a name wins
/// over another key's id).
fn pick(candidates: Vec<ApiKey>, name_or_id: &str) -> Result<ApiKey, KeyError> {
    let mut by_id = None;
    for k in candidates {
        if k.spec.name == name_or_id {
            return Ok(k);
        }
        if k.id == name_or_id {
            by_id = Some(k);
        }
    }
    by_id.ok_or_else(|| KeyError::NotFound(name_or_id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::keys::{key_id, key_matches};

    #[test]
    fn secrets_have_the_documented_shape_and_match_their_record() {
        let (key, secret) = new_key(
            KeySpec {
                name: "a".into(),
                ..KeySpec::default()
            },
            100,
        );
        assert_eq!(key.id.len(), ID_LEN);
        assert!(
            key.id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
        let tail = secret
            .strip_prefix(&format!("sk-dbgpt-{}-", key.id))
            .unwrap();
        assert_eq!(tail.len(), 43, "{secret}");
        assert!(
            tail.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(key_id(&secret), Some(key.id.as_str()));
        assert_eq!(key.salt.len(), 32);
        assert!(key_matches(&key, &secret));
        let (other, other_secret) = new_key(key.spec.clone(), 100);
        assert_ne!(other.salt, key.salt);
        assert_ne!(other_secret, secret);
        assert!(!key_matches(&key, &other_secret));
    }

    #[test]
    fn base64_url_matches_the_rfc_vectors() {
        // RFC 4648 §10, without padding.
        assert_eq!(base64_url(b"f"), "Zg");
        assert_eq!(base64_url(b"fo"), "Zm8");
        assert_eq!(base64_url(b"foo"), "Zm9v");
        assert_eq!(base64_url(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn specs_are_validated_naming_the_field() {
        let ok = KeySpec {
            name: "team-a_1.x".into(),
            ..KeySpec::default()
        };
        validate_spec(&ok, 0).unwrap();
        let field = |s: &KeySpec| match validate_spec(s, 1000) {
            Err(KeyError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let long = "x".repeat(65);
        for bad in ["", "a b", "ä", long.as_str()] {
            assert_eq!(
                field(&KeySpec {
                    name: bad.into(),
                    ..ok.clone()
                }),
                "name"
            );
        }
        let mut s = ok.clone();
        s.limits.rpm = Some(0);
        assert_eq!(field(&s), "rpm");
        let mut s = ok.clone();
        s.limits.daily_tokens = Some(u64::MAX);
        assert_eq!(field(&s), "daily_tokens");
        let mut s = ok.clone();
        s.model_limits.insert(
            "m1".into(),
            Limits {
                tpm: Some(0),
                ..Limits::default()
            },
        );
        assert_eq!(field(&s), "model_limits.m1.tpm");
        let mut s = ok.clone();
        s.models = Some(vec![]);
        assert_eq!(field(&s), "models");
        let mut s = ok.clone();
        s.expires_at = Some(999);
        assert_eq!(field(&s), "expires_at");
        s.expires_at = Some(1001);
        validate_spec(&s, 1000).unwrap();
    }

    #[test]
    fn an_expired_key_can_be_changed_but_not_given_a_past_expiry() {
        let spec = KeySpec {
            name: "k".into(),
            expires_at: Some(100),
            ..KeySpec::default()
        };
        let rpm = KeyUpdate {
            rpm: Some(Some(5)),
            ..KeyUpdate::default()
        };
        validate_updated(&spec, &rpm, 200).unwrap();
        let past = KeyUpdate {
            expires_at: Some(Some(150)),
            ..KeyUpdate::default()
        };
        assert!(matches!(
            validate_updated(&spec, &past, 200),
            Err(KeyError::Invalid { field, .. }) if field == "expires_at"
        ));
        let never = KeyUpdate {
            expires_at: Some(None),
            ..KeyUpdate::default()
        };
        validate_updated(&spec, &never, 200).unwrap();
    }

    #[test]
    fn updates_replace_or_clear_only_what_they_name() {
        let (mut key, _) = new_key(
            KeySpec {
                name: "k".into(),
                limits: Limits {
                    rpm: Some(5),
                    tpm: Some(7),
                    ..Limits::default()
                },
                ..KeySpec::default()
            },
            0,
        );
        key.version = 3;
        let u = KeyUpdate {
            rpm: Some(None),
            daily_tokens: Some(Some(9)),
            ..KeyUpdate::default()
        };
        let k = apply_update(&key, &u);
        assert_eq!(k.spec.limits.rpm, None);
        assert_eq!(k.spec.limits.tpm, Some(7));
        assert_eq!(k.spec.limits.daily_tokens, Some(9));
        assert_eq!(k.hash, key.hash);
    }

    #[test]
    fn days_and_minutes_are_utc() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(86_399), "1970-01-01");
        assert_eq!(day_of(86_400), "1970-01-02");
        assert!(is_day("2027-01-31"));
        assert!(!is_day("2027-02-30"));
        assert!(!is_day("2027-1-3"));
        assert_eq!(minute_of(119), 1);
        assert_eq!(minute_of(-1), -1);
    }
}
