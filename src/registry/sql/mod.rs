//! The shared registry: DB-GPT's `dbgpt_cluster_registry_instance` table in MySQL/MariaDB or
//! PostgreSQL, so that several controllers (ours and DB-GPT's) serve one state.
//!
//! The database is the source of truth. Membership writes (register, deregister, removal,
//! heartbeat of an unknown instance) are single statements, acknowledged only once the
//! database has them; on a table with a unique index on `(model_name, host, port)` (created
//! with the table, or added to a DB-GPT table when its data allows) they are upserts, and on
//! a DB-GPT table that still holds duplicates they run under a database lock
//! (`GET_LOCK` / `pg_advisory_xact_lock`) as update-then-insert, so no writer of ours can add
//! a duplicate row. Heartbeats of known instances are buffered and written every
//! [`HEARTBEAT_FLUSH_INTERVAL`] as one multi-row `UPDATE`. Every timestamp is the database
//! server's clock (`CURRENT_TIMESTAMP(6)` / `LOCALTIMESTAMP`); the expiry sweep is one
//! conditional `UPDATE` on that clock. Reads refresh a cache of the whole table and fall back
//! to it (the last known view) while the database is unreachable; writes then fail with
//! [`RegistryError::Storage`] (HTTP 503).
//!
//! This file is the store; `config` holds the connection settings, `statements` the SQL
//! of each dialect and `schema` the start-up checks of the table. MySQL and PostgreSQL run
//! the same code: `on_pool!` type-checks one body per driver.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::mysql::{MySqlConnectOptions, MySqlSslMode};
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::{AssertSqlSafe, ConnectOptions, Row, SqlStr};
use tracing::{info, warn};

use super::{Counts, Instance, MemState, Registry, RegistryError};
use crate::wire::controller::{InstanceInput, InstanceKey, ModelInstance, Timestamp};

/// DB-GPT's table name.
pub const TABLE: &str = "dbgpt_cluster_registry_instance";
/// The unique index we add on `(model_name, host, port)`.
pub const UNIQUE_INDEX: &str = "uk_dbgpt_cluster_instance";
/// How often buffered heartbeats are written (one multi-row UPDATE per batch).
pub const HEARTBEAT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// How often the cache is refreshed from the database when nothing else refreshed it.
const CACHE_REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// Keys per heartbeat UPDATE statement.
const BATCH: usize = 500;
/// How long a statement waits for a pooled connection before the write answers 503.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// The MySQL named lock / PostgreSQL advisory lock guarding writes on a table without the
/// unique index.
const MYSQL_LOCK: &str = "dbgpt_cluster_registry_write";
const PG_LOCK: i64 = 0x6462_6770_7472_6567; // "dbgptreg"

/// Runs `$body` with `$p` bound to whichever pool this is (the code is type-checked once
/// per driver).
macro_rules! on_pool {
    ($pool:expr, |$p:ident| $body:expr) => {
        match $pool {
            Pool::My($p) => $body,
            Pool::Pg($p) => $body,
        }
    };
}

/// Binds `(model_name, host, port)` of `$k` (an [`InstanceKey`] or an [`InstanceInput`])
/// to the query `$q`.
macro_rules! bind_key {
    ($q:expr, $k:expr) => {{
        let k = $k;
        $q.bind(k.model_name.clone())
            .bind(k.host.clone())
            .bind(k.port as i32)
    }};
}

/// Binds the columns of a new row, in the order of the insert statements: `(model_name,
/// host, port, weight, check_healthy, enabled, prompt_template)`.
macro_rules! bind_input {
    ($q:expr, $i:expr) => {{
        let i: &InstanceInput = $i;
        bind_key!($q, i)
            .bind(i.weight)
            .bind(i.check_healthy)
            .bind(i.enabled)
            .bind(i.prompt_template.clone())
    }};
}

/// Releases a session lock by running `$sql` with `$arg` on the pooled connection `$conn`;
/// if that fails, the connection is detached rather than handed back (the lock dies with
/// the session). True when released.
macro_rules! release_session_lock {
    ($conn:expr, $sql:expr, $arg:expr) => {{
        let mut c = $conn;
        let r = sqlx::query($sql).bind($arg).execute(&mut *c).await;
        if r.is_err() {
            c.detach();
        }
        r.is_ok()
    }};
}

mod config;
mod schema;
mod statements;
#[cfg(test)]
pub(crate) mod tests;

pub use config::{DbType, Secret, SqlConfig};
use schema::{create_table_sql, ensure_unique};
pub(crate) use schema::{schema_lock, schema_unlock};
use statements::Statements;

/// The connection pool of either driver (shared with the key store, [`crate::keys::SqlKeyStore`]).
#[derive(Clone)]
pub(crate) enum Pool {
    My(sqlx::MySqlPool),
    Pg(sqlx::PgPool),
}

/// Takes MySQL's named lock `name` on this session, waiting at most `secs` seconds;
/// `what` names the lock in the error.
async fn mysql_get_lock(
    conn: &mut sqlx::MySqlConnection,
    name: &str,
    secs: i64,
    what: &str,
) -> Result<(), sqlx::Error> {
    let got: Option<i64> = sqlx::query("SELECT GET_LOCK(?, ?)")
        .bind(name)
        .bind(secs)
        .fetch_one(&mut *conn)
        .await?
        .try_get(0)?;
    if got != Some(1) {
        return Err(sqlx::Error::Protocol(format!(
            "timed out waiting for {what}"
        )));
    }
    Ok(())
}

/// One row as read, with its heartbeat age on the database clock.
struct DbRow {
    id: i64,
    model_name: String,
    host: String,
    port: i64,
    weight: Option<f64>,
    check_healthy: Option<bool>,
    healthy: Option<bool>,
    enabled: Option<bool>,
    prompt_template: Option<String>,
    age_us: Option<i64>,
}

impl DbRow {
    /// Translates the database clock into ours: `last_heartbeat = now - age`.
    fn into_instance(self, now: Timestamp) -> Option<Instance> {
        let port = u16::try_from(self.port).ok()?;
        Some(Instance {
            key: InstanceKey {
                model_name: self.model_name,
                host: self.host,
                port,
            },
            seq: u64::try_from(self.id).unwrap_or(0),
            weight: self.weight,
            check_healthy: self.check_healthy,
            healthy: self.healthy.unwrap_or(false),
            enabled: self.enabled,
            prompt_template: self.prompt_template,
            last_heartbeat: self.age_us.map(|a| Timestamp(now.0 - a)),
        })
    }
}

macro_rules! decode_row {
    ($r:expr) => {{
        let r = $r;
        DbRow {
            id: r.try_get(0)?,
            model_name: r.try_get(1)?,
            host: r.try_get(2)?,
            port: r.try_get(3)?,
            weight: {
                use sqlx::{Column, TypeInfo};
                let ty = r.columns()[4].type_info().name().to_ascii_uppercase();
                if ty == "FLOAT" || ty == "FLOAT4" || ty == "REAL" {
                    // DB-GPT's MySQL DDL has FLOAT: its shortest decimal form (0.1, not
                    // 0.10000000149), as DB-GPT shows it.
                    r.try_get::<Option<f32>, _>(4)?
                        .map(|w| w.to_string().parse().unwrap_or(w as f64))
                } else {
                    r.try_get::<Option<f64>, _>(4)?
                }
            },
            check_healthy: r.try_get(5)?,
            healthy: r.try_get(6)?,
            enabled: r.try_get(7)?,
            prompt_template: r.try_get(8)?,
            age_us: r.try_get(9)?,
        }
    }};
}

/// Which write a membership statement makes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WriteKind {
    Register,
    Heartbeat,
}

struct Inner {
    pool: Pool,
    dialect: DbType,
    desc: String,
    timeout: Duration,
    /// Whether `(model_name, host, port)` is unique in the table (upserts) or writes must
    /// take the lock.
    unique: bool,
    sql: Statements,
    cache: RwLock<MemState>,
    /// Buffered heartbeats of known instances: the request (to re-register if the row was
    /// removed meanwhile) and when it arrived.
    pending: Mutex<HashMap<InstanceKey, (InstanceInput, Timestamp)>>,
    db_ok: AtomicBool,
    flush_lock: tokio::sync::Mutex<()>,
    last_refresh: Mutex<Instant>,
    /// Failed database round trips, for the metrics.
    errors: AtomicU64,
    /// Times the database became reachable again after a failure, for the metrics.
    reconnects: AtomicU64,
}

/// The SQL-backed registry (see the module documentation).
pub struct SqlRegistry {
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SqlRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn storage(desc: &str, e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Storage(format!("registry database {desc} unavailable: {e}"))
}

/// A pool of `cfg.pool_size` connections made with `opts`.
async fn pool<DB: sqlx::Database>(
    cfg: &SqlConfig,
    opts: <DB::Connection as sqlx::Connection>::Options,
) -> Result<sqlx::Pool<DB>, sqlx::Error> {
    sqlx::pool::PoolOptions::<DB>::new()
        .max_connections(cfg.pool_size)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(opts)
        .await
}

pub(crate) async fn connect(cfg: &SqlConfig) -> Result<Pool, sqlx::Error> {
    // What both drivers' options take alike (each type has its own inherent methods).
    macro_rules! options {
        ($t:ty) => {{
            let o = <$t>::new()
                .host(&cfg.host)
                .port(cfg.port)
                .username(&cfg.user)
                .database(&cfg.database);
            let o = if cfg.password.0.is_empty() {
                o
            } else {
                o.password(&cfg.password.0)
            };
            o.disable_statement_logging()
        }};
    }
    Ok(match cfg.db_type {
        DbType::Mysql => {
            let opts = options!(MySqlConnectOptions)
                .ssl_mode(MySqlSslMode::Disabled)
                // The server's own time zone: stored times are the database server's local
                // naive time, as DB-GPT's controllers write theirs.
                .timezone(None);
            Pool::My(pool(cfg, opts).await?)
        }
        DbType::Postgresql => {
            let opts = options!(PgConnectOptions).ssl_mode(PgSslMode::Disable);
            Pool::Pg(pool(cfg, opts).await?)
        }
    })
}

impl SqlRegistry {
    /// Connects (retrying for `cfg.wait`), creates the table if it is missing, makes sure
    /// writes cannot create duplicate rows, and loads the current view.
    pub async fn open(cfg: &SqlConfig, heartbeat_timeout: Duration) -> Result<Self, RegistryError> {
        let desc = cfg.describe();
        let open_err = |reason: String| RegistryError::Open {
            path: desc.clone(),
            reason,
        };
        let deadline = Instant::now() + cfg.wait;
        let pool = loop {
            match connect(cfg).await {
                Ok(p) => break p,
                Err(e) if Instant::now() < deadline => {
                    warn!(database = %desc, error = %e, "registry database not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    return Err(open_err(format!(
                        "cannot connect to the {} server at {}:{}: {e}",
                        cfg.db_type.scheme(),
                        cfg.host,
                        cfg.port
                    )));
                }
            }
        };
        // Schema set-up under a database lock: controllers starting together must not race
        // on CREATE TABLE (PostgreSQL fails one of them) or on adding the index.
        let lock = schema_lock(&pool)
            .await
            .map_err(|e| open_err(format!("cannot take the schema lock: {e}")))?;
        let ddl = AssertSqlSafe(create_table_sql(cfg.db_type));
        let created = on_pool!(&pool, |p| sqlx::query(ddl).execute(p).await.map(|_| ()))
            .map_err(|e| open_err(format!("cannot create table {TABLE}: {e}")));
        let unique = match created {
            Ok(()) => ensure_unique(&pool, cfg.db_type)
                .await
                .map_err(|e| open_err(format!("cannot inspect table {TABLE}: {e}"))),
            Err(e) => Err(e),
        };
        schema_unlock(lock).await;
        let unique = unique?;
        let inner = Arc::new(Inner {
            pool,
            dialect: cfg.db_type,
            desc: desc.clone(),
            timeout: heartbeat_timeout,
            unique,
            sql: Statements::new(cfg.db_type),
            cache: RwLock::new(MemState::default()),
            pending: Mutex::new(HashMap::new()),
            db_ok: AtomicBool::new(true),
            flush_lock: tokio::sync::Mutex::new(()),
            last_refresh: Mutex::new(Instant::now()),
            errors: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        });
        inner
            .reload()
            .await
            .map_err(|e| open_err(format!("cannot read table {TABLE}: {e}")))?;
        info!(database = %desc, instances = inner.read_cache().len(), unique, "SQL registry opened");
        let task = tokio::spawn(background(Arc::downgrade(&inner)));
        Ok(SqlRegistry { inner, task })
    }

    /// The registry's connection pool (the key store's tables live in the same database).
    pub(crate) fn pool(&self) -> Pool {
        self.inner.pool.clone()
    }

    /// Whether writes are upserts on a unique index (false: the locked path for a DB-GPT
    /// table holding duplicates).
    #[cfg(test)]
    pub fn has_unique_index(&self) -> bool {
        self.inner.unique
    }
}

/// Flushes heartbeats every second and refreshes the cache now and then, until the registry
/// is dropped.
async fn background(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(HEARTBEAT_FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let _ = inner.flush().await;
        let stale = inner.lock_refresh().elapsed() >= CACHE_REFRESH_INTERVAL;
        if stale && inner.db_ok.load(Ordering::Relaxed) {
            let _ = inner.reload().await;
        }
    }
}

impl Inner {
    fn read_cache(&self) -> std::sync::RwLockReadGuard<'_, MemState> {
        self.cache.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_cache(&self) -> std::sync::RwLockWriteGuard<'_, MemState> {
        self.cache.write().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_pending(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<InstanceKey, (InstanceInput, Timestamp)>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_refresh(&self) -> std::sync::MutexGuard<'_, Instant> {
        self.last_refresh.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the outcome of a database round trip (logging transitions only).
    fn note<T>(&self, r: Result<T, sqlx::Error>) -> Result<T, RegistryError> {
        match r {
            Ok(v) => {
                if !self.db_ok.swap(true, Ordering::Relaxed) {
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                    info!(database = %self.desc, "registry database reachable again");
                }
                Ok(v)
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                if self.db_ok.swap(false, Ordering::Relaxed) {
                    warn!(database = %self.desc, error = %e,
                        "registry database unreachable: writes answer 503, reads serve the last known view");
                }
                Err(storage(&self.desc, e))
            }
        }
    }

    /// Runs a `SELECT` of the row columns (binding `key` when given) and decodes the rows.
    async fn select(
        &self,
        sql: SqlStr,
        key: Option<&InstanceKey>,
    ) -> Result<Vec<DbRow>, sqlx::Error> {
        on_pool!(&self.pool, |p| {
            let q = sqlx::query(sql);
            let q = match key {
                Some(k) => bind_key!(q, k),
                None => q,
            };
            let rows = q.fetch_all(p).await?;
            rows.iter()
                .map(|r| Ok::<DbRow, sqlx::Error>(decode_row!(r)))
                .collect()
        })
    }

    /// Re-reads the whole table into the cache (keeping buffered heartbeats).
    async fn reload(&self) -> Result<(), RegistryError> {
        let now = Timestamp::now();
        let rows = self.select(self.sql.select_all.clone(), None).await;
        let rows = self.note(rows)?;
        let mut state = MemState::from_instances(
            rows.into_iter()
                .filter_map(|r| r.into_instance(now))
                .collect(),
        );
        for (key, (_, at)) in self.lock_pending().iter() {
            if let Some(i) = state.get_mut(key) {
                i.healthy = true;
                if i.last_heartbeat.is_none_or(|t| t.0 < at.0) {
                    i.last_heartbeat = Some(*at);
                }
            }
        }
        *self.write_cache() = state;
        *self.lock_refresh() = Instant::now();
        Ok(())
    }

    /// Re-reads one instance into the cache (or drops it if it is gone).
    async fn reload_one(&self, key: &InstanceKey) -> Result<(), RegistryError> {
        let now = Timestamp::now();
        let rows = self.select(self.sql.select_one.clone(), Some(key)).await;
        let rows = self.note(rows)?;
        let mut cache = self.write_cache();
        match rows
            .into_iter()
            .filter_map(|r| r.into_instance(now))
            .next_back()
        {
            Some(inst) => cache.put(inst),
            None => {
                cache.remove(key);
            }
        }
        Ok(())
    }

    /// A register (or heartbeat of an instance we do not know) as one database write.
    async fn write(&self, input: &InstanceInput, kind: WriteKind) -> Result<(), RegistryError> {
        let key = input.key();
        let r = if self.unique {
            let sql = match kind {
                WriteKind::Register => self.sql.upsert_register.clone(),
                WriteKind::Heartbeat => self.sql.upsert_heartbeat.clone(),
            };
            on_pool!(&self.pool, |p| bind_input!(sqlx::query(sql), input)
                .execute(p)
                .await
                .map(|_| ()))
        } else {
            self.locked_write(input, kind).await
        };
        self.note(r)?;
        self.lock_pending().remove(&key);
        // The write is durable; a failed re-read only leaves the cache stale.
        if self.reload_one(&key).await.is_err() {
            let now = Timestamp::now();
            let mut cache = self.write_cache();
            let inst = match cache.get(&key) {
                Some(old) if kind == WriteKind::Register => old.reregistered(input, now),
                Some(old) => Instance {
                    healthy: true,
                    last_heartbeat: Some(now),
                    ..old.clone()
                },
                None => Instance::from_input(input, u64::MAX, now),
            };
            cache.put(inst);
        }
        Ok(())
    }

    /// Update-then-insert under a database lock, for a table without the unique index: a
    /// session's named lock on MySQL, a transaction's advisory lock on PostgreSQL.
    async fn locked_write(
        &self,
        input: &InstanceInput,
        kind: WriteKind,
    ) -> Result<(), sqlx::Error> {
        let update = match kind {
            WriteKind::Register => self.sql.update_register.clone(),
            WriteKind::Heartbeat => self.sql.update_heartbeat.clone(),
        };
        let insert = self.sql.insert.clone();
        // The write itself, on whichever connection holds the lock.
        macro_rules! update_then_insert {
            ($conn:expr) => {{
                let q = sqlx::query(update);
                let q = if kind == WriteKind::Register {
                    q.bind(input.weight).bind(input.prompt_template.clone())
                } else {
                    q
                };
                let n = bind_key!(q, input)
                    .execute(&mut *$conn)
                    .await?
                    .rows_affected();
                if n == 0 {
                    bind_input!(sqlx::query(insert), input)
                        .execute(&mut *$conn)
                        .await?;
                }
                Ok::<(), sqlx::Error>(())
            }};
        }
        match &self.pool {
            Pool::My(p) => {
                let mut conn = p.acquire().await?;
                mysql_get_lock(&mut conn, MYSQL_LOCK, 10, "the registry write lock").await?;
                let result = async { update_then_insert!(conn) }.await;
                // Not released: the lock ends with the detached session.
                let _ = release_session_lock!(conn, "SELECT RELEASE_LOCK(?)", MYSQL_LOCK);
                result
            }
            Pool::Pg(p) => {
                let mut tx = p.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(PG_LOCK)
                    .execute(&mut *tx)
                    .await?;
                update_then_insert!(tx)?;
                tx.commit().await
            }
        }
    }

    /// Writes buffered heartbeats: one UPDATE per [`BATCH`] keys; instances whose row has
    /// vanished (removed through another controller) are registered again, as DB-GPT does
    /// for a heartbeat of an unknown instance.
    async fn flush(&self) -> Result<(), RegistryError> {
        let _g = self.flush_lock.lock().await;
        let batch: Vec<(InstanceKey, (InstanceInput, Timestamp))> =
            self.lock_pending().drain().collect();
        if batch.is_empty() {
            if !self.db_ok.load(Ordering::Relaxed) {
                let probe = on_pool!(&self.pool, |p| sqlx::query("SELECT 1")
                    .execute(p)
                    .await
                    .map(|_| ()));
                self.note(probe)?;
                let _ = self.reload().await;
            }
            return Ok(());
        }
        let mut done = 0;
        let mut result = Ok(());
        for chunk in batch.chunks(BATCH) {
            if let Err(e) = self.flush_chunk(chunk).await {
                result = Err(e);
                break;
            }
            done += chunk.len();
        }
        if result.is_err() {
            // Put back what was not written, unless a newer heartbeat arrived meanwhile.
            let mut pending = self.lock_pending();
            for (k, v) in batch.into_iter().skip(done) {
                pending.entry(k).or_insert(v);
            }
        }
        result
    }

    async fn flush_chunk(
        &self,
        chunk: &[(InstanceKey, (InstanceInput, Timestamp))],
    ) -> Result<(), RegistryError> {
        let sql = Statements::heartbeat_batch(self.dialect, chunk.len());
        let r = on_pool!(&self.pool, |p| {
            let mut q = sqlx::query(sql);
            for (k, _) in chunk {
                q = bind_key!(q, k);
            }
            q.execute(p).await.map(|r| r.rows_affected())
        });
        let n = self.note(r)? as usize;
        if n == chunk.len() && self.unique {
            return Ok(());
        }
        // Some rows are gone (or the table holds duplicates): find out which.
        let sql = Statements::existing_batch(self.dialect, chunk.len());
        let r: Result<Vec<(String, String, i64)>, sqlx::Error> = on_pool!(&self.pool, |p| {
            let mut q = sqlx::query(sql);
            for (k, _) in chunk {
                q = bind_key!(q, k);
            }
            match q.fetch_all(p).await {
                Ok(rows) => rows
                    .iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                    .collect(),
                Err(e) => Err(e),
            }
        });
        let existing: std::collections::HashSet<(String, String, i64)> =
            self.note(r)?.into_iter().collect();
        for (k, (input, _)) in chunk {
            if !existing.contains(&(k.model_name.clone(), k.host.clone(), k.port as i64)) {
                info!(instance = %crate::telemetry::Escaped(&k), "heartbeat for an instance removed meanwhile: registering it again");
                self.write(input, WriteKind::Register).await?;
            }
        }
        Ok(())
    }

    async fn simple_key_write(&self, sql: SqlStr, key: &InstanceKey) -> Result<u64, RegistryError> {
        let r = on_pool!(&self.pool, |p| bind_key!(sqlx::query(sql), key)
            .execute(p)
            .await
            .map(|r| r.rows_affected()));
        self.note(r)
    }
}

#[async_trait]
impl Registry for SqlRegistry {
    async fn register(&self, input: InstanceInput) -> Result<(), RegistryError> {
        self.inner.write(&input, WriteKind::Register).await
    }

    async fn deregister(&self, input: InstanceInput) -> Result<(), RegistryError> {
        let inner = &self.inner;
        let key = input.key();
        // A heartbeat buffered before the deregister must not revive the instance.
        let had = inner.lock_pending().remove(&key);
        let sql = if input.remove_from_registry {
            inner.sql.delete.clone()
        } else {
            inner.sql.deregister.clone()
        };
        if let Err(e) = inner.simple_key_write(sql, &key).await {
            if let Some(v) = had {
                inner.lock_pending().entry(key).or_insert(v);
            }
            return Err(e);
        }
        let mut cache = inner.write_cache();
        if input.remove_from_registry {
            cache.remove(&key);
        } else if let Some(i) = cache.get_mut(&key) {
            i.healthy = false;
        }
        Ok(())
    }

    async fn heartbeat(&self, input: InstanceInput) -> Result<(), RegistryError> {
        let inner = &self.inner;
        let key = input.key();
        let now = Timestamp::now();
        let known = {
            let mut cache = inner.write_cache();
            match cache.get_mut(&key) {
                Some(i) => {
                    i.healthy = true;
                    i.last_heartbeat = Some(now);
                    true
                }
                None => false,
            }
        };
        if !known {
            // Unknown here: it may exist in the table (registered through another
            // controller: refresh only its heartbeat) or not at all (register it).
            return inner.write(&input, WriteKind::Heartbeat).await;
        }
        inner.lock_pending().insert(key, (input, now));
        if inner.db_ok.load(Ordering::Relaxed) {
            Ok(())
        } else {
            // Buffered, and written once the database is back; answering 503 lets a client
            // with several controllers move to one that can reach the database.
            Err(storage(
                &inner.desc,
                "heartbeat buffered until the database is reachable again",
            ))
        }
    }

    async fn list(
        &self,
        model_name: Option<&str>,
        healthy_only: bool,
    ) -> Result<Vec<ModelInstance>, RegistryError> {
        let inner = &self.inner;
        if inner.db_ok.load(Ordering::Relaxed)
            && let Err(e) = inner.reload().await
        {
            warn!(error = %e, "serving the last known registry view");
        }
        let now = Timestamp::now();
        let cache = inner.read_cache();
        Ok(cache
            .select(model_name)
            .filter(|i| !healthy_only || i.reported_healthy(now, inner.timeout))
            .map(|i| i.to_wire(now, inner.timeout))
            .collect())
    }

    async fn expire(&self) -> Result<usize, RegistryError> {
        let inner = &self.inner;
        // Our own buffered heartbeats first, so they are not expired from a stale row.
        inner.flush().await?;
        let sql = inner.sql.expire.clone();
        let micros = i64::try_from(inner.timeout.as_micros()).unwrap_or(i64::MAX);
        let r = on_pool!(&inner.pool, |p| sqlx::query(sql)
            .bind(micros)
            .execute(p)
            .await
            .map(|r| r.rows_affected()));
        let n = inner.note(r)? as usize;
        let _ = inner.reload().await;
        Ok(n)
    }

    async fn flush(&self) -> Result<(), RegistryError> {
        self.inner.flush().await
    }

    fn model_counts(&self) -> Vec<(String, Counts)> {
        let cache = self.inner.read_cache();
        crate::registry::model_counts(cache.iter(), Timestamp::now(), self.inner.timeout)
    }

    fn store_stats(&self) -> crate::registry::StoreStats {
        crate::registry::StoreStats {
            errors: self.inner.errors.load(Ordering::Relaxed),
            reconnects: self.inner.reconnects.load(Ordering::Relaxed),
        }
    }

    fn counts(&self) -> Counts {
        let now = Timestamp::now();
        let cache = self.inner.read_cache();
        let mut c = Counts::default();
        for i in cache.iter() {
            c.total += 1;
            if i.reported_healthy(now, self.inner.timeout) {
                c.healthy += 1;
            }
        }
        c
    }

    fn describe(&self) -> String {
        if self.inner.unique {
            self.inner.desc.clone()
        } else {
            format!("{} (locked writes: table has duplicates)", self.inner.desc)
        }
    }
}
