//! Managed API keys in the controller's redb registry file: tables next to the registry's
//! `instances`, written through the registry ([`RedbRegistry::with_write`]: one writer
//! at a time, the same recovery after a storage error), so one file holds everything a
//! single controller knows.
//!
//! The tables are created by the first write that needs them; a registry file written
//! before managed keys existed opens as it is and reads as having no keys. Records are
//! JSON ([`ApiKey`]; new fields added with serde defaults keep old records readable).
//! Usage rows are keyed `(key_id, model, day)`, with a `(day, key_id)` total of tokens
//! beside them so a sync finds today's tokens without scanning every day ever recorded.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{
    Database, Key, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable,
    TableDefinition, TableError, Value, WriteTransaction,
};
use tracing::warn;

use super::{
    KeyError, KeyStore, MINUTE_RETENTION, apply_update, day_of, minute_of, new_key, validate_spec,
    validate_sync, validate_updated,
};
use crate::registry::{RedbRegistry, RegistryError};
use crate::wire::keys::{
    ApiKey, CreatedKey, KeySpec, KeyUpdate, MinuteCount, SyncRequest, SyncResponse, UsageRow,
};

/// Key id → JSON [`ApiKey`].
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("api_keys");
/// Key name → key id.
const NAMES: TableDefinition<&str, &str> = TableDefinition::new("api_key_names");
/// `version`: the newest key version.
const META: TableDefinition<&str, u64> = TableDefinition::new("api_key_meta");
/// `(key_id, model, day)` → `(requests, prompt_tokens, completion_tokens)`.
const USAGE: TableDefinition<(&str, &str, &str), (u64, u64, u64)> =
    TableDefinition::new("api_key_usage");
/// `(day, key_id)` → tokens (prompt + completion) that day, every model together.
const DAILY: TableDefinition<(&str, &str), u64> = TableDefinition::new("api_key_daily");
/// `(key_id, model, minute)` → `(requests, tokens)`.
const MINUTE: TableDefinition<(&str, &str, i64), (u64, u64)> =
    TableDefinition::new("api_key_minute");

/// The redb key store (see the module documentation).
pub struct RedbKeyStore {
    registry: Arc<RedbRegistry>,
}

impl RedbKeyStore {
    /// Keys in `registry`'s file.
    pub fn new(registry: Arc<RedbRegistry>) -> Self {
        RedbKeyStore { registry }
    }

    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<Result<T, KeyError>, redb::Error> + Send + 'static,
    ) -> Result<T, KeyError> {
        self.registry.with_write(f).await.map_err(storage)?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T, KeyError> {
        self.registry.with_read(f).await.map_err(storage)
    }
}

fn storage(e: RegistryError) -> KeyError {
    KeyError::Storage(e.to_string())
}

fn encode(k: &ApiKey) -> Vec<u8> {
    serde_json::to_vec(k).expect("a key record serialises")
}

fn decode(id: &str, bytes: &[u8]) -> Option<ApiKey> {
    match serde_json::from_slice(bytes) {
        Ok(k) => Some(k),
        Err(e) => {
            warn!(key_id = %id.escape_debug(), error = %e, "skipping an unreadable API key record");
            None
        }
    }
}

/// The table, or `None` when no write has created it yet.
fn open_ro<K: Key + 'static, V: Value + 'static>(
    txn: &ReadTransaction,
    def: TableDefinition<K, V>,
) -> Result<Option<ReadOnlyTable<K, V>>, redb::Error> {
    match txn.open_table(def) {
        Ok(t) => Ok(Some(t)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn all_keys(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<ApiKey>, redb::Error> {
    let mut out = Vec::new();
    for row in table.iter()? {
        let (k, v) = row?;
        out.extend(decode(k.value(), v.value()));
    }
    Ok(out)
}

/// The key named `name_or_id`, else with that id, in a write transaction.
fn find(txn: &WriteTransaction, name_or_id: &str) -> Result<Option<ApiKey>, redb::Error> {
    let names = txn.open_table(NAMES)?;
    let keys = txn.open_table(KEYS)?;
    let id = names.get(name_or_id)?.map(|g| g.value().to_string());
    let id = id.as_deref().unwrap_or(name_or_id);
    Ok(keys.get(id)?.and_then(|g| decode(id, g.value())))
}

/// Bumps and returns the store's key version.
fn bump_version(txn: &WriteTransaction) -> Result<u64, redb::Error> {
    let mut meta = txn.open_table(META)?;
    let v = meta.get("version")?.map(|g| g.value()).unwrap_or(0) + 1;
    meta.insert("version", v)?;
    Ok(v)
}

/// Stores a changed key under a new version and commits.
fn put_changed(txn: WriteTransaction, mut key: ApiKey) -> Result<ApiKey, redb::Error> {
    key.version = bump_version(&txn)?;
    txn.open_table(KEYS)?
        .insert(key.id.as_str(), encode(&key).as_slice())?;
    txn.commit()?;
    Ok(key)
}

/// A sync's answer from the tables (`None`: not created yet): the version, the keys changed
/// after `req.since_version`, the minute counts of `now`'s minute and the one before, and
/// today's tokens per key.
fn answer(
    req: &SyncRequest,
    now: i64,
    meta: Option<&impl ReadableTable<&'static str, u64>>,
    keys: Option<&impl ReadableTable<&'static str, &'static [u8]>>,
    minutes: Option<&impl ReadableTable<(&'static str, &'static str, i64), (u64, u64)>>,
    daily: Option<&impl ReadableTable<(&'static str, &'static str), u64>>,
) -> Result<SyncResponse, redb::Error> {
    let current = minute_of(now);
    let version = match meta {
        Some(t) => t.get("version")?.map(|g| g.value()).unwrap_or(0),
        None => 0,
    };
    let mut changed = Vec::new();
    if version > req.since_version
        && let Some(t) = keys
    {
        changed = all_keys(t)?;
        changed.retain(|k| k.version > req.since_version);
        changed.sort_by_key(|k| k.version);
    }
    let mut minute = Vec::new();
    if let Some(t) = minutes {
        for row in t.iter()? {
            let (k, v) = row?;
            let (key_id, model, at) = k.value();
            if at >= current - 1 {
                let (requests, tokens) = v.value();
                minute.push(MinuteCount {
                    key_id: key_id.to_string(),
                    model: model.to_string(),
                    minute: at,
                    requests,
                    tokens,
                });
            }
        }
    }
    let today = day_of(now);
    let mut daily_tokens = BTreeMap::new();
    if let Some(t) = daily {
        for row in t.range((today.as_str(), "")..)? {
            let (k, v) = row?;
            let (day, key_id) = k.value();
            if day != today {
                break;
            }
            daily_tokens.insert(key_id.to_string(), v.value());
        }
    }
    Ok(SyncResponse {
        version,
        keys: changed,
        minute,
        daily_tokens,
    })
}

#[async_trait]
impl KeyStore for RedbKeyStore {
    async fn create(&self, spec: KeySpec) -> Result<CreatedKey, KeyError> {
        let now = super::now_secs();
        validate_spec(&spec, now)?;
        self.write(move |db| {
            let txn = db.begin_write()?;
            if txn.open_table(NAMES)?.get(spec.name.as_str())?.is_some() {
                return Ok(Err(KeyError::NameTaken(spec.name)));
            }
            let (mut key, secret) = loop {
                let (key, secret) = new_key(spec.clone(), now);
                if txn.open_table(KEYS)?.get(key.id.as_str())?.is_none() {
                    break (key, secret);
                }
            };
            key.version = bump_version(&txn)?;
            txn.open_table(NAMES)?
                .insert(key.spec.name.as_str(), key.id.as_str())?;
            txn.open_table(KEYS)?
                .insert(key.id.as_str(), encode(&key).as_slice())?;
            txn.commit()?;
            Ok(Ok(CreatedKey { key, secret }))
        })
        .await
    }

    async fn list(&self) -> Result<Vec<ApiKey>, KeyError> {
        let mut keys = self
            .read(|db| {
                let txn = db.begin_read()?;
                match open_ro(&txn, KEYS)? {
                    Some(t) => all_keys(&t),
                    None => Ok(Vec::new()),
                }
            })
            .await?;
        keys.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        Ok(keys)
    }

    async fn get(&self, name_or_id: &str) -> Result<ApiKey, KeyError> {
        let wanted = name_or_id.to_string();
        let found = self
            .read(move |db| {
                let txn = db.begin_read()?;
                let (Some(names), Some(keys)) = (open_ro(&txn, NAMES)?, open_ro(&txn, KEYS)?)
                else {
                    return Ok(None);
                };
                let id = names.get(wanted.as_str())?.map(|g| g.value().to_string());
                let id = id.as_deref().unwrap_or(wanted.as_str());
                Ok(keys.get(id)?.and_then(|g| decode(id, g.value())))
            })
            .await?;
        found.ok_or_else(|| KeyError::NotFound(name_or_id.to_string()))
    }

    async fn update(&self, name_or_id: &str, update: KeyUpdate) -> Result<ApiKey, KeyError> {
        let wanted = name_or_id.to_string();
        let now = super::now_secs();
        self.write(move |db| {
            let txn = db.begin_write()?;
            let Some(old) = find(&txn, &wanted)? else {
                return Ok(Err(KeyError::NotFound(wanted)));
            };
            let new = apply_update(&old, &update);
            if let Err(e) = validate_updated(&new.spec, &update, now) {
                return Ok(Err(e));
            }
            put_changed(txn, new).map(Ok)
        })
        .await
    }

    async fn revoke(&self, name_or_id: &str) -> Result<ApiKey, KeyError> {
        let wanted = name_or_id.to_string();
        let now = super::now_secs();
        self.write(move |db| {
            let txn = db.begin_write()?;
            let Some(mut key) = find(&txn, &wanted)? else {
                return Ok(Err(KeyError::NotFound(wanted)));
            };
            if key.revoked_at.is_some() {
                return Ok(Ok(key));
            }
            key.revoked_at = Some(now);
            put_changed(txn, key).map(Ok)
        })
        .await
    }

    async fn usage(
        &self,
        key_id: Option<&str>,
        since: Option<&str>,
    ) -> Result<Vec<UsageRow>, KeyError> {
        let key_id = key_id.map(str::to_string);
        let since = since.map(str::to_string);
        self.read(move |db| {
            let txn = db.begin_read()?;
            let Some(t) = open_ro(&txn, USAGE)? else {
                return Ok(Vec::new());
            };
            let mut out = Vec::new();
            for row in t.iter()? {
                let (k, v) = row?;
                let (id, model, day) = k.value();
                if key_id.as_deref().is_some_and(|want| want != id)
                    || since.as_deref().is_some_and(|s| day < s)
                {
                    continue;
                }
                let (requests, prompt_tokens, completion_tokens) = v.value();
                out.push(UsageRow {
                    key_id: id.to_string(),
                    key_name: String::new(),
                    model: model.to_string(),
                    day: day.to_string(),
                    requests,
                    prompt_tokens,
                    completion_tokens,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn sync(&self, req: &SyncRequest, now: i64) -> Result<SyncResponse, KeyError> {
        validate_sync(req)?;
        let req = req.clone();
        if req.usage.is_empty() && req.minute.is_empty() {
            // Nothing to add (an idle apiserver): a read, no commit to wait for.
            return self
                .read(move |db| {
                    let txn = db.begin_read()?;
                    answer(
                        &req,
                        now,
                        open_ro(&txn, META)?.as_ref(),
                        open_ro(&txn, KEYS)?.as_ref(),
                        open_ro(&txn, MINUTE)?.as_ref(),
                        open_ro(&txn, DAILY)?.as_ref(),
                    )
                })
                .await;
        }
        self.write(move |db| {
            let txn = db.begin_write()?;
            let current = minute_of(now);
            {
                let mut usage = txn.open_table(USAGE)?;
                let mut daily = txn.open_table(DAILY)?;
                for u in &req.usage {
                    let k = (u.key_id.as_str(), u.model.as_str(), u.day.as_str());
                    let (r, p, c) = usage.get(k)?.map(|g| g.value()).unwrap_or((0, 0, 0));
                    usage.insert(
                        k,
                        (
                            r.saturating_add(u.requests),
                            p.saturating_add(u.prompt_tokens),
                            c.saturating_add(u.completion_tokens),
                        ),
                    )?;
                    let dk = (u.day.as_str(), u.key_id.as_str());
                    let t = daily.get(dk)?.map(|g| g.value()).unwrap_or(0);
                    let add = u.prompt_tokens.saturating_add(u.completion_tokens);
                    daily.insert(dk, t.saturating_add(add))?;
                }
                let mut minute = txn.open_table(MINUTE)?;
                for m in &req.minute {
                    let k = (m.key_id.as_str(), m.model.as_str(), m.minute);
                    let (r, t) = minute.get(k)?.map(|g| g.value()).unwrap_or((0, 0));
                    minute.insert(
                        k,
                        (r.saturating_add(m.requests), t.saturating_add(m.tokens)),
                    )?;
                }
                minute.retain(|(_, _, at), _| at >= current - MINUTE_RETENTION)?;
            }
            let answer = answer(
                &req,
                now,
                Some(&txn.open_table(META)?),
                Some(&txn.open_table(KEYS)?),
                Some(&txn.open_table(MINUTE)?),
                Some(&txn.open_table(DAILY)?),
            )?;
            txn.commit()?;
            Ok(Ok(answer))
        })
        .await
    }

    fn describe(&self) -> String {
        format!("redb:{}", self.registry.path().display())
    }
}

#[cfg(test)]
mod tests;
