//! Managed API keys in the SQL registry's database (MySQL/MariaDB or PostgreSQL), shared by
//! every controller of an HA cluster.
//!
//! Tables (created at start-up under the registry's schema lock when missing):
//! `dbgpt_api_keys` (id, unique name, version, JSON record), `dbgpt_key_version` (one row:
//! the store-wide version counter), `dbgpt_key_usage` (key_id, model, day → requests,
//! prompt and completion tokens) and `dbgpt_key_minute` (key_id, model, minute → requests,
//! tokens). Key writes bump the counter row in their transaction: its row lock orders them,
//! so a committed version never hides a smaller uncommitted one from a sync. A sync's
//! usage and minute counts are additive multi-row upserts ([`UPSERT_BATCH`] rows a
//! statement) in one transaction (rows sorted, so two controllers writing the same rows
//! lock them in the same order); minute rows older than [`MINUTE_RETENTION`] minutes are
//! deleted in it.

use std::collections::BTreeMap;

use async_trait::async_trait;
use sqlx::{AssertSqlSafe, Row};
use tracing::info;

use super::{
    KeyError, KeyStore, MINUTE_RETENTION, apply_update, day_of, minute_of, new_key, now_secs, pick,
    validate_spec, validate_sync, validate_updated,
};
use crate::registry::sql::{DbType, Pool, schema_lock, schema_unlock};
use crate::wire::keys::{
    ApiKey, CreatedKey, KeySpec, KeyUpdate, MinuteCount, SyncRequest, SyncResponse, UsageRow,
};

pub const KEYS_TABLE: &str = "dbgpt_api_keys";
pub const VERSION_TABLE: &str = "dbgpt_key_version";
pub const USAGE_TABLE: &str = "dbgpt_key_usage";
pub const MINUTE_TABLE: &str = "dbgpt_key_minute";

/// Runs `$body` with `$p` bound to whichever pool this is.
macro_rules! on_pool {
    ($pool:expr, |$p:ident| $body:expr) => {
        match $pool {
            Pool::My($p) => $body,
            Pool::Pg($p) => $body,
        }
    };
}

/// `sql` with MySQL's `?` placeholders, as `$1, $2, …` for PostgreSQL.
fn dialect(d: DbType, sql: &str) -> String {
    match d {
        DbType::Mysql => sql.to_string(),
        DbType::Postgresql => {
            let mut out = String::with_capacity(sql.len() + 8);
            let mut n = 0;
            for c in sql.chars() {
                if c == '?' {
                    n += 1;
                    out.push_str(&format!("${n}"));
                } else {
                    out.push(c);
                }
            }
            out
        }
    }
}

/// The DDL of the missing tables, one statement each.
fn create_tables(d: DbType) -> Vec<String> {
    match d {
        DbType::Mysql => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {KEYS_TABLE} (
  id VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  name VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
  version BIGINT NOT NULL,
  record TEXT NOT NULL,
  PRIMARY KEY (id),
  UNIQUE KEY uk_dbgpt_api_keys_name (name),
  KEY idx_dbgpt_api_keys_version (version)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COMMENT='Managed API keys: salted hashes, never secrets'"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (
  id INT NOT NULL,
  version BIGINT NOT NULL,
  PRIMARY KEY (id)
) ENGINE=InnoDB COMMENT='The managed API keys version counter'"
            ),
            format!("INSERT IGNORE INTO {VERSION_TABLE} (id, version) VALUES (1, 0)"),
            format!(
                "CREATE TABLE IF NOT EXISTS {USAGE_TABLE} (
  key_id VARCHAR(32) NOT NULL,
  model VARCHAR(128) NOT NULL,
  day VARCHAR(10) NOT NULL,
  requests BIGINT NOT NULL DEFAULT 0,
  prompt_tokens BIGINT NOT NULL DEFAULT 0,
  completion_tokens BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (key_id, model, day),
  KEY idx_dbgpt_key_usage_day (day)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COMMENT='Managed API key usage per key, model and UTC day'"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {MINUTE_TABLE} (
  key_id VARCHAR(32) NOT NULL,
  model VARCHAR(128) NOT NULL,
  minute BIGINT NOT NULL,
  requests BIGINT NOT NULL DEFAULT 0,
  tokens BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (key_id, model, minute)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COMMENT='Managed API key requests and tokens of the last minutes'"
            ),
        ],
        DbType::Postgresql => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {KEYS_TABLE} (
  id VARCHAR(32) PRIMARY KEY,
  name VARCHAR(64) NOT NULL UNIQUE,
  version BIGINT NOT NULL,
  record TEXT NOT NULL
)"
            ),
            format!("CREATE INDEX IF NOT EXISTS idx_dbgpt_api_keys_version ON {KEYS_TABLE} (version)"),
            format!(
                "CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (id INTEGER PRIMARY KEY, version BIGINT NOT NULL)"
            ),
            format!(
                "INSERT INTO {VERSION_TABLE} (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {USAGE_TABLE} (
  key_id VARCHAR(32) NOT NULL,
  model VARCHAR(128) NOT NULL,
  day VARCHAR(10) NOT NULL,
  requests BIGINT NOT NULL DEFAULT 0,
  prompt_tokens BIGINT NOT NULL DEFAULT 0,
  completion_tokens BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (key_id, model, day)
)"
            ),
            format!("CREATE INDEX IF NOT EXISTS idx_dbgpt_key_usage_day ON {USAGE_TABLE} (day)"),
            format!(
                "CREATE TABLE IF NOT EXISTS {MINUTE_TABLE} (
  key_id VARCHAR(32) NOT NULL,
  model VARCHAR(128) NOT NULL,
  minute BIGINT NOT NULL,
  requests BIGINT NOT NULL DEFAULT 0,
  tokens BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (key_id, model, minute)
)"
            ),
        ],
    }
}

/// The statements of one dialect.
struct Statements {
    name_exists: String,
    bump: String,
    version: String,
    insert_key: String,
    find_for_update: String,
    find: String,
    update_key: String,
    all_keys: String,
    keys_since: String,
    /// Templates (MySQL placeholders, `{ROWS}` for the rows): see [`rows_sql`].
    upsert_usage: String,
    upsert_minute: String,
    prune_minute: String,
    minute_since: String,
    daily: String,
    usage: String,
}

impl Statements {
    fn new(d: DbType) -> Self {
        let q = |s: &str| dialect(d, s);
        let (upsert_usage, upsert_minute, cast) = match d {
            DbType::Mysql => (
                format!(
                    "INSERT INTO {USAGE_TABLE} (key_id, model, day, requests, prompt_tokens, completion_tokens) \
                     VALUES {{ROWS}} ON DUPLICATE KEY UPDATE requests = requests + VALUES(requests), \
                     prompt_tokens = prompt_tokens + VALUES(prompt_tokens), \
                     completion_tokens = completion_tokens + VALUES(completion_tokens)"
                ),
                format!(
                    "INSERT INTO {MINUTE_TABLE} (key_id, model, minute, requests, tokens) VALUES {{ROWS}} \
                     ON DUPLICATE KEY UPDATE requests = requests + VALUES(requests), tokens = tokens + VALUES(tokens)"
                ),
                "SIGNED",
            ),
            DbType::Postgresql => (
                format!(
                    "INSERT INTO {USAGE_TABLE} (key_id, model, day, requests, prompt_tokens, completion_tokens) \
                     VALUES {{ROWS}} ON CONFLICT (key_id, model, day) DO UPDATE SET \
                     requests = {USAGE_TABLE}.requests + EXCLUDED.requests, \
                     prompt_tokens = {USAGE_TABLE}.prompt_tokens + EXCLUDED.prompt_tokens, \
                     completion_tokens = {USAGE_TABLE}.completion_tokens + EXCLUDED.completion_tokens"
                ),
                format!(
                    "INSERT INTO {MINUTE_TABLE} (key_id, model, minute, requests, tokens) VALUES {{ROWS}} \
                     ON CONFLICT (key_id, model, minute) DO UPDATE SET \
                     requests = {MINUTE_TABLE}.requests + EXCLUDED.requests, \
                     tokens = {MINUTE_TABLE}.tokens + EXCLUDED.tokens"
                ),
                "BIGINT",
            ),
        };
        Statements {
            name_exists: q(&format!("SELECT id FROM {KEYS_TABLE} WHERE name = ?")),
            bump: q(&format!(
                "UPDATE {VERSION_TABLE} SET version = version + 1 WHERE id = 1"
            )),
            version: q(&format!("SELECT version FROM {VERSION_TABLE} WHERE id = 1")),
            insert_key: q(&format!(
                "INSERT INTO {KEYS_TABLE} (id, name, version, record) VALUES (?, ?, ?, ?)"
            )),
            find_for_update: q(&format!(
                "SELECT record FROM {KEYS_TABLE} WHERE name = ? OR id = ? FOR UPDATE"
            )),
            find: q(&format!(
                "SELECT record FROM {KEYS_TABLE} WHERE name = ? OR id = ?"
            )),
            update_key: q(&format!(
                "UPDATE {KEYS_TABLE} SET version = ?, record = ? WHERE id = ?"
            )),
            all_keys: format!("SELECT record FROM {KEYS_TABLE}"),
            keys_since: q(&format!(
                "SELECT record FROM {KEYS_TABLE} WHERE version > ? ORDER BY version"
            )),
            upsert_usage,
            upsert_minute,
            prune_minute: q(&format!("DELETE FROM {MINUTE_TABLE} WHERE minute < ?")),
            minute_since: q(&format!(
                "SELECT key_id, model, minute, requests, tokens FROM {MINUTE_TABLE} WHERE minute >= ? \
                 ORDER BY key_id, model, minute"
            )),
            daily: q(&format!(
                "SELECT key_id, CAST(SUM(prompt_tokens + completion_tokens) AS {cast}) FROM {USAGE_TABLE} \
                 WHERE day = ? GROUP BY key_id"
            )),
            usage: q(&format!(
                "SELECT key_id, model, day, requests, prompt_tokens, completion_tokens FROM {USAGE_TABLE} \
                 WHERE (? = '' OR key_id = ?) AND day >= ? ORDER BY key_id, model, day"
            )),
        }
    }
}

/// Rows per multi-row upsert (6 parameters each: far below both servers' 65535).
const UPSERT_BATCH: usize = 500;

/// `template` for `n` rows: its `{ROWS}` replaced by `n` groups of `width` placeholders,
/// in `d`'s placeholder style.
fn rows_sql(d: DbType, template: &str, width: usize, n: usize) -> String {
    let group = format!("({})", vec!["?"; width].join(", "));
    let rows = vec![group.as_str(); n].join(", ");
    dialect(d, &template.replace("{ROWS}", &rows))
}

fn sql(s: &str) -> AssertSqlSafe<String> {
    AssertSqlSafe(s.to_string())
}

/// Whether a transaction failed as a deadlock victim or on a serialization conflict (and
/// was rolled back whole, so running it again is safe).
fn retryable(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("40001" | "40P01")))
}

fn storage(e: sqlx::Error) -> KeyError {
    KeyError::Storage(format!("key database: {e}"))
}

fn encode(k: &ApiKey) -> String {
    serde_json::to_string(k).expect("a key record serialises")
}

fn decode(record: &str) -> Result<ApiKey, sqlx::Error> {
    serde_json::from_str(record).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The SQL key store (see the module documentation).
pub struct SqlKeyStore {
    pool: Pool,
    sql: Statements,
    dialect: DbType,
}

impl SqlKeyStore {
    /// The key store in `pool`'s database (the SQL registry's); creates missing tables.
    pub async fn open(pool: Pool, d: DbType) -> Result<Self, KeyError> {
        let lock = schema_lock(&pool).await.map_err(storage)?;
        let mut created = Ok(());
        for ddl in create_tables(d) {
            created = on_pool!(&pool, |p| sqlx::query(sql(&ddl)).execute(p).await.map(drop));
            if created.is_err() {
                break;
            }
        }
        schema_unlock(lock).await;
        created.map_err(|e| KeyError::Storage(format!("cannot create the key tables: {e}")))?;
        info!(dialect = ?d, "SQL key store opened");
        Ok(SqlKeyStore {
            pool,
            sql: Statements::new(d),
            dialect: d,
        })
    }

    /// A key write: `change` turns the current record into the new one (or an error), under
    /// a row lock, with a new version.
    async fn change(
        &self,
        name_or_id: &str,
        change: impl Fn(ApiKey) -> Result<Option<ApiKey>, KeyError> + Send + Sync,
    ) -> Result<ApiKey, KeyError> {
        let s = &self.sql;
        let r: Result<Result<ApiKey, KeyError>, sqlx::Error> = on_pool!(&self.pool, |p| async {
            let mut tx = p.begin().await?;
            let rows = sqlx::query(sql(&s.find_for_update))
                .bind(name_or_id)
                .bind(name_or_id)
                .fetch_all(&mut *tx)
                .await?;
            let mut found = Vec::new();
            for r in &rows {
                found.push(decode(&r.try_get::<String, _>(0)?)?);
            }
            let old = match pick(found, name_or_id) {
                Ok(k) => k,
                Err(e) => return Ok(Err(e)),
            };
            let mut new = match change(old.clone()) {
                Ok(Some(k)) => k,
                Ok(None) => return Ok(Ok(old)),
                Err(e) => return Ok(Err(e)),
            };
            sqlx::query(sql(&s.bump)).execute(&mut *tx).await?;
            let v: i64 = sqlx::query(sql(&s.version))
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
            new.version = to_u64(v);
            sqlx::query(sql(&s.update_key))
                .bind(v)
                .bind(encode(&new))
                .bind(new.id.as_str())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(Ok(new))
        }
        .await);
        r.map_err(storage)?
    }
}

#[async_trait]
impl KeyStore for SqlKeyStore {
    async fn create(&self, spec: KeySpec) -> Result<CreatedKey, KeyError> {
        let now = now_secs();
        validate_spec(&spec, now)?;
        let (mut key, secret) = new_key(spec, now);
        let s = &self.sql;
        let r: Result<Option<ApiKey>, sqlx::Error> = on_pool!(&self.pool, |p| async {
            let mut tx = p.begin().await?;
            let taken = sqlx::query(sql(&s.name_exists))
                .bind(key.spec.name.as_str())
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
            if taken {
                return Ok(None);
            }
            sqlx::query(sql(&s.bump)).execute(&mut *tx).await?;
            let v: i64 = sqlx::query(sql(&s.version))
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
            key.version = to_u64(v);
            let inserted = sqlx::query(sql(&s.insert_key))
                .bind(key.id.as_str())
                .bind(key.spec.name.as_str())
                .bind(v)
                .bind(encode(&key))
                .execute(&mut *tx)
                .await;
            match inserted {
                // Another controller created the name since the check.
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => return Ok(None),
                r => r?,
            };
            tx.commit().await?;
            Ok::<_, sqlx::Error>(Some(key.clone()))
        }
        .await);
        match r.map_err(storage)? {
            Some(key) => Ok(CreatedKey { key, secret }),
            None => Err(KeyError::NameTaken(key.spec.name)),
        }
    }

    async fn list(&self) -> Result<Vec<ApiKey>, KeyError> {
        let s = &self.sql;
        let r: Result<Vec<ApiKey>, sqlx::Error> = on_pool!(&self.pool, |p| async {
            let rows = sqlx::query(sql(&s.all_keys)).fetch_all(p).await?;
            rows.iter()
                .map(|r| decode(&r.try_get::<String, _>(0)?))
                .collect::<Result<Vec<ApiKey>, sqlx::Error>>()
        }
        .await);
        let mut keys = r.map_err(storage)?;
        keys.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        Ok(keys)
    }

    async fn get(&self, name_or_id: &str) -> Result<ApiKey, KeyError> {
        let s = &self.sql;
        let r: Result<Vec<ApiKey>, sqlx::Error> = on_pool!(&self.pool, |p| async {
            let rows = sqlx::query(sql(&s.find))
                .bind(name_or_id)
                .bind(name_or_id)
                .fetch_all(p)
                .await?;
            rows.iter()
                .map(|r| decode(&r.try_get::<String, _>(0)?))
                .collect::<Result<Vec<ApiKey>, sqlx::Error>>()
        }
        .await);
        pick(r.map_err(storage)?, name_or_id)
    }

    async fn update(&self, name_or_id: &str, update: KeyUpdate) -> Result<ApiKey, KeyError> {
        let now = now_secs();
        self.change(name_or_id, |old| {
            let new = apply_update(&old, &update);
            validate_updated(&new.spec, &update, now)?;
            Ok(Some(new))
        })
        .await
    }

    async fn revoke(&self, name_or_id: &str) -> Result<ApiKey, KeyError> {
        let now = now_secs();
        self.change(name_or_id, |mut key| {
            if key.revoked_at.is_some() {
                return Ok(None);
            }
            key.revoked_at = Some(now);
            Ok(Some(key))
        })
        .await
    }

    async fn usage(
        &self,
        key_id: Option<&str>,
        since: Option<&str>,
    ) -> Result<Vec<UsageRow>, KeyError> {
        let s = &self.sql;
        let id = key_id.unwrap_or("");
        let since = since.unwrap_or("");
        let r: Result<Vec<UsageRow>, sqlx::Error> = on_pool!(&self.pool, |p| async {
            let rows = sqlx::query(sql(&s.usage))
                .bind(id)
                .bind(id)
                .bind(since)
                .fetch_all(p)
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(UsageRow {
                        key_id: r.try_get(0)?,
                        key_name: String::new(),
                        model: r.try_get(1)?,
                        day: r.try_get(2)?,
                        requests: to_u64(r.try_get(3)?),
                        prompt_tokens: to_u64(r.try_get(4)?),
                        completion_tokens: to_u64(r.try_get(5)?),
                    })
                })
                .collect::<Result<Vec<UsageRow>, sqlx::Error>>()
        }
        .await);
        r.map_err(storage)
    }

    async fn sync(&self, req: &SyncRequest, now: i64) -> Result<SyncResponse, KeyError> {
        validate_sync(req)?;
        // Merged and sorted: each row once (PostgreSQL refuses one row twice in an upsert),
        // and rows locked in the same order by every controller.
        let mut usage: BTreeMap<(&str, &str, &str), (u64, u64, u64)> = BTreeMap::new();
        for u in &req.usage {
            let e = usage
                .entry((u.key_id.as_str(), u.model.as_str(), u.day.as_str()))
                .or_default();
            e.0 = e.0.saturating_add(u.requests);
            e.1 = e.1.saturating_add(u.prompt_tokens);
            e.2 = e.2.saturating_add(u.completion_tokens);
        }
        let mut minutes: BTreeMap<(&str, &str, i64), (u64, u64)> = BTreeMap::new();
        for m in &req.minute {
            let e = minutes
                .entry((m.key_id.as_str(), m.model.as_str(), m.minute))
                .or_default();
            e.0 = e.0.saturating_add(m.requests);
            e.1 = e.1.saturating_add(m.tokens);
        }
        let current = minute_of(now);
        let today = day_of(now);
        let s = &self.sql;
        let d = self.dialect;
        let r: Result<SyncResponse, sqlx::Error> = on_pool!(&self.pool, |p| async {
            // Nothing to add (an idle apiserver): reads only.
            if !usage.is_empty() || !minutes.is_empty() {
                // A deadlock or serialization failure rolled everything back: try again.
                let mut attempt = 0;
                loop {
                    let written = async {
                        let mut tx = p.begin().await?;
                        let usage: Vec<_> = usage.iter().collect();
                        for chunk in usage.chunks(UPSERT_BATCH) {
                            let stmt = rows_sql(d, &s.upsert_usage, 6, chunk.len());
                            let mut q = sqlx::query(sql(&stmt));
                            for ((id, model, day), (r, pt, ct)) in chunk {
                                q = q
                                    .bind(*id)
                                    .bind(*model)
                                    .bind(*day)
                                    .bind(to_i64(*r))
                                    .bind(to_i64(*pt))
                                    .bind(to_i64(*ct));
                            }
                            q.execute(&mut *tx).await?;
                        }
                        let minutes: Vec<_> = minutes.iter().collect();
                        for chunk in minutes.chunks(UPSERT_BATCH) {
                            let stmt = rows_sql(d, &s.upsert_minute, 5, chunk.len());
                            let mut q = sqlx::query(sql(&stmt));
                            for ((id, model, minute), (r, t)) in chunk {
                                q = q
                                    .bind(*id)
                                    .bind(*model)
                                    .bind(*minute)
                                    .bind(to_i64(*r))
                                    .bind(to_i64(*t));
                            }
                            q.execute(&mut *tx).await?;
                        }
                        sqlx::query(sql(&s.prune_minute))
                            .bind(current - MINUTE_RETENTION)
                            .execute(&mut *tx)
                            .await?;
                        tx.commit().await?;
                        Ok::<(), sqlx::Error>(())
                    }
                    .await;
                    match written {
                        Err(e) if attempt < 2 && retryable(&e) => attempt += 1,
                        r => break r?,
                    }
                }
            }
            // The version first: every key at or below it is committed, so none is missed.
            let version: i64 = sqlx::query(sql(&s.version))
                .fetch_one(p)
                .await?
                .try_get(0)?;
            let mut keys = Vec::new();
            if to_u64(version) > req.since_version {
                for r in sqlx::query(sql(&s.keys_since))
                    .bind(to_i64(req.since_version))
                    .fetch_all(p)
                    .await?
                {
                    keys.push(decode(&r.try_get::<String, _>(0)?)?);
                }
            }
            let mut minute = Vec::new();
            for r in sqlx::query(sql(&s.minute_since))
                .bind(current - 1)
                .fetch_all(p)
                .await?
            {
                minute.push(MinuteCount {
                    key_id: r.try_get(0)?,
                    model: r.try_get(1)?,
                    minute: r.try_get(2)?,
                    requests: to_u64(r.try_get(3)?),
                    tokens: to_u64(r.try_get(4)?),
                });
            }
            let mut daily_tokens = BTreeMap::new();
            for r in sqlx::query(sql(&s.daily))
                .bind(today.as_str())
                .fetch_all(p)
                .await?
            {
                let id: String = r.try_get(0)?;
                let tokens: Option<i64> = r.try_get(1)?;
                daily_tokens.insert(id, to_u64(tokens.unwrap_or(0)));
            }
            Ok::<_, sqlx::Error>(SyncResponse {
                version: to_u64(version),
                keys,
                minute,
                daily_tokens,
            })
        }
        .await);
        r.map_err(storage)
    }

    fn describe(&self) -> String {
        format!("{:?} database (the SQL registry's)", self.dialect)
    }
}

#[cfg(test)]
mod tests;
