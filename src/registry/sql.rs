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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions, MySqlSslMode};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{AssertSqlSafe, ConnectOptions, Row, SqlSafeStr, SqlStr};
use tracing::{info, warn};

use super::{Counts, Instance, MemState, Registry, RegistryError};
use crate::types::{InstanceInput, InstanceKey, ModelInstance, Timestamp};

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

/// Supported database servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbType {
    /// MySQL or MariaDB.
    Mysql,
    /// PostgreSQL.
    Postgresql,
}

impl DbType {
    /// Parses `--registry_db_type` (also URL schemes): mysql, mariadb, postgresql, postgres.
    pub fn parse(s: &str) -> Option<DbType> {
        match s.trim().to_ascii_lowercase().as_str() {
            "mysql" | "mariadb" => Some(DbType::Mysql),
            "postgresql" | "postgres" | "pg" => Some(DbType::Postgresql),
            _ => None,
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            DbType::Mysql => 3306,
            DbType::Postgresql => 5432,
        }
    }

    fn scheme(self) -> &'static str {
        match self {
            DbType::Mysql => "mysql",
            DbType::Postgresql => "postgresql",
        }
    }
}

/// A password that never prints.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Errors in the connection settings (a bad `--registry_db_url`).
#[derive(Debug, thiserror::Error)]
pub enum SqlConfigError {
    #[error(
        "--registry_db_url must look like mysql://user:password@host:port/database or postgresql://…: {0}"
    )]
    BadUrl(String),
}

/// Where the SQL registry lives.
#[derive(Debug, Clone, PartialEq)]
pub struct SqlConfig {
    pub db_type: DbType,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Secret,
    pub database: String,
    /// Connections per controller.
    pub pool_size: u32,
    /// How long start-up keeps retrying an unreachable database (zero: fail at once).
    pub wait: Duration,
}

fn percent_decode(s: &str) -> Result<String, SqlConfigError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| SqlConfigError::BadUrl("bad %-escape".into()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| SqlConfigError::BadUrl("not UTF-8 after %-decoding".into()))
}

impl SqlConfig {
    /// Parses `scheme://[user[:password]@]host[:port][/database]`; missing parts keep the
    /// values of `self` (the other flags).
    pub fn apply_url(mut self, url: &str) -> Result<SqlConfig, SqlConfigError> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| SqlConfigError::BadUrl("missing scheme://".into()))?;
        self.db_type = DbType::parse(scheme)
            .ok_or_else(|| SqlConfigError::BadUrl(format!("unknown scheme {scheme:?}")))?;
        let rest = rest.split(['?', '#']).next().unwrap_or_default();
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        if let Some(u) = userinfo {
            let (user, pass) = match u.split_once(':') {
                Some((a, b)) => (a, Some(b)),
                None => (u, None),
            };
            if !user.is_empty() {
                self.user = percent_decode(user)?;
            }
            if let Some(p) = pass {
                self.password = Secret(percent_decode(p)?);
            }
        }
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| SqlConfigError::BadUrl("unclosed [".into()))?;
            (h, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(SqlConfigError::BadUrl("missing host".into()));
        }
        self.host = host.to_string();
        self.port = match port {
            Some(p) => p
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| SqlConfigError::BadUrl(format!("bad port {p:?}")))?,
            None => self.db_type.default_port(),
        };
        if !path.is_empty() {
            self.database = percent_decode(path)?;
        }
        Ok(self)
    }

    /// `mysql://user@host:port/database` — never the password.
    pub fn describe(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!(
            "{}://{}@{}:{}/{}",
            self.db_type.scheme(),
            self.user,
            host,
            self.port,
            self.database
        )
    }
}

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

#[derive(Clone)]
enum Pool {
    My(sqlx::MySqlPool),
    Pg(sqlx::PgPool),
}

/// The statements of one dialect (`?` placeholders rewritten to `$n` for PostgreSQL).
struct Statements {
    select_all: SqlStr,
    select_one: SqlStr,
    upsert_register: SqlStr,
    upsert_heartbeat: SqlStr,
    update_register: SqlStr,
    update_heartbeat: SqlStr,
    insert: SqlStr,
    deregister: SqlStr,
    delete: SqlStr,
    expire: SqlStr,
}

fn numbered(sql: &str, dialect: DbType) -> String {
    if dialect == DbType::Mysql {
        return sql.to_string();
    }
    let mut out = String::with_capacity(sql.len() + 16);
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

fn stmt(sql: &str, dialect: DbType) -> SqlStr {
    AssertSqlSafe(numbered(sql, dialect)).into_sql_str()
}

impl Statements {
    fn new(d: DbType) -> Statements {
        let (now, t, f, age, id, port) = match d {
            DbType::Mysql => (
                "CURRENT_TIMESTAMP(6)",
                "1",
                "0",
                "TIMESTAMPDIFF(MICROSECOND, last_heartbeat, CURRENT_TIMESTAMP(6))",
                "CAST(id AS SIGNED)",
                "CAST(port AS SIGNED)",
            ),
            DbType::Postgresql => (
                "LOCALTIMESTAMP",
                "TRUE",
                "FALSE",
                "CAST(EXTRACT(EPOCH FROM (LOCALTIMESTAMP - last_heartbeat)) * 1000000 AS BIGINT)",
                "CAST(id AS BIGINT)",
                "CAST(port AS BIGINT)",
            ),
        };
        let cols = format!(
            "{id}, model_name, host, {port}, weight, check_healthy, healthy, enabled, prompt_template, {age}"
        );
        let key = "model_name = ? AND host = ? AND port = ?";
        let insert_cols = "(model_name, host, port, weight, check_healthy, healthy, enabled, prompt_template, last_heartbeat, gmt_created, gmt_modified)";
        let insert_vals = format!("VALUES (?, ?, ?, ?, ?, {t}, ?, ?, {now}, {now}, {now})");
        let (on_reg, on_hb) = match d {
            DbType::Mysql => (
                format!(
                    "ON DUPLICATE KEY UPDATE weight = VALUES(weight), prompt_template = VALUES(prompt_template), healthy = {t}, last_heartbeat = VALUES(last_heartbeat), gmt_modified = VALUES(gmt_modified)"
                ),
                format!(
                    "ON DUPLICATE KEY UPDATE healthy = {t}, last_heartbeat = VALUES(last_heartbeat), gmt_modified = VALUES(gmt_modified)"
                ),
            ),
            DbType::Postgresql => (
                format!(
                    "ON CONFLICT (model_name, host, port) DO UPDATE SET weight = EXCLUDED.weight, prompt_template = EXCLUDED.prompt_template, healthy = {t}, last_heartbeat = EXCLUDED.last_heartbeat, gmt_modified = EXCLUDED.gmt_modified"
                ),
                format!(
                    "ON CONFLICT (model_name, host, port) DO UPDATE SET healthy = {t}, last_heartbeat = EXCLUDED.last_heartbeat, gmt_modified = EXCLUDED.gmt_modified"
                ),
            ),
        };
        let expire = match d {
            DbType::Mysql => format!(
                "UPDATE {TABLE} SET healthy = 0 WHERE check_healthy = 1 AND healthy = 1 AND (last_heartbeat IS NULL OR last_heartbeat < CURRENT_TIMESTAMP(6) - INTERVAL ? MICROSECOND)"
            ),
            DbType::Postgresql => format!(
                "UPDATE {TABLE} SET healthy = FALSE WHERE check_healthy AND healthy AND (last_heartbeat IS NULL OR last_heartbeat < LOCALTIMESTAMP - CAST(? AS BIGINT) * INTERVAL '1 microsecond')"
            ),
        };
        Statements {
            select_all: stmt(&format!("SELECT {cols} FROM {TABLE} ORDER BY id"), d),
            select_one: stmt(
                &format!("SELECT {cols} FROM {TABLE} WHERE {key} ORDER BY id"),
                d,
            ),
            upsert_register: stmt(
                &format!("INSERT INTO {TABLE} {insert_cols} {insert_vals} {on_reg}"),
                d,
            ),
            upsert_heartbeat: stmt(
                &format!("INSERT INTO {TABLE} {insert_cols} {insert_vals} {on_hb}"),
                d,
            ),
            update_register: stmt(
                &format!(
                    "UPDATE {TABLE} SET weight = ?, prompt_template = ?, healthy = {t}, last_heartbeat = {now}, gmt_modified = {now} WHERE {key}"
                ),
                d,
            ),
            update_heartbeat: stmt(
                &format!(
                    "UPDATE {TABLE} SET healthy = {t}, last_heartbeat = {now}, gmt_modified = {now} WHERE {key}"
                ),
                d,
            ),
            insert: stmt(
                &format!("INSERT INTO {TABLE} {insert_cols} {insert_vals}"),
                d,
            ),
            deregister: stmt(
                &format!("UPDATE {TABLE} SET healthy = {f}, gmt_modified = {now} WHERE {key}"),
                d,
            ),
            delete: stmt(&format!("DELETE FROM {TABLE} WHERE {key}"), d),
            expire: stmt(&expire, d),
        }
    }

    /// One multi-row heartbeat UPDATE for `n` keys.
    fn heartbeat_batch(d: DbType, n: usize) -> SqlStr {
        let (now, t) = match d {
            DbType::Mysql => ("CURRENT_TIMESTAMP(6)", "1"),
            DbType::Postgresql => ("LOCALTIMESTAMP", "TRUE"),
        };
        let tuples = vec!["(?, ?, ?)"; n].join(", ");
        stmt(
            &format!(
                "UPDATE {TABLE} SET healthy = {t}, last_heartbeat = {now}, gmt_modified = {now} WHERE (model_name, host, port) IN ({tuples})"
            ),
            d,
        )
    }

    /// Which of `n` keys exist.
    fn existing_batch(d: DbType, n: usize) -> SqlStr {
        let tuples = vec!["(?, ?, ?)"; n].join(", ");
        stmt(
            &format!(
                "SELECT model_name, host, CAST(port AS {}) FROM {TABLE} WHERE (model_name, host, port) IN ({tuples})",
                if d == DbType::Mysql {
                    "SIGNED"
                } else {
                    "BIGINT"
                }
            ),
            d,
        )
    }
}

/// DDL for a missing table: DB-GPT's columns, plus our unique index.
fn create_table_sql(d: DbType) -> String {
    match d {
        DbType::Mysql => format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (
  id int(11) NOT NULL AUTO_INCREMENT COMMENT 'Auto increment id',
  model_name varchar(128) NOT NULL COMMENT 'Model name',
  host varchar(128) NOT NULL COMMENT 'Host of the model',
  port int(11) NOT NULL COMMENT 'Port of the model',
  weight double DEFAULT 1.0 COMMENT 'Weight of the model',
  check_healthy tinyint(1) DEFAULT 1 COMMENT 'Whether to check the health of the model',
  healthy tinyint(1) DEFAULT 0 COMMENT 'Whether the model is healthy',
  enabled tinyint(1) DEFAULT 1 COMMENT 'Whether the model is enabled',
  prompt_template varchar(512) DEFAULT NULL COMMENT 'Prompt template for the model instance',
  last_heartbeat datetime(6) DEFAULT NULL COMMENT 'Last heartbeat, database server clock',
  user_name varchar(128) DEFAULT NULL COMMENT 'User name',
  sys_code varchar(128) DEFAULT NULL COMMENT 'System code',
  gmt_created datetime(6) DEFAULT CURRENT_TIMESTAMP(6) COMMENT 'Record creation time',
  gmt_modified datetime(6) DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6) COMMENT 'Record update time',
  PRIMARY KEY (id),
  UNIQUE KEY {UNIQUE_INDEX} (model_name, host, port)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COMMENT='Cluster model instance table, for registering and managing model instances'"
        ),
        DbType::Postgresql => format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (
  id BIGSERIAL PRIMARY KEY,
  model_name VARCHAR(128) NOT NULL,
  host VARCHAR(128) NOT NULL,
  port INTEGER NOT NULL,
  weight DOUBLE PRECISION DEFAULT 1.0,
  check_healthy BOOLEAN DEFAULT TRUE,
  healthy BOOLEAN DEFAULT FALSE,
  enabled BOOLEAN DEFAULT TRUE,
  prompt_template VARCHAR(512),
  last_heartbeat TIMESTAMP(6),
  user_name VARCHAR(128),
  sys_code VARCHAR(128),
  gmt_created TIMESTAMP(6) DEFAULT LOCALTIMESTAMP,
  gmt_modified TIMESTAMP(6) DEFAULT LOCALTIMESTAMP,
  CONSTRAINT {UNIQUE_INDEX} UNIQUE (model_name, host, port)
)"
        ),
    }
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

async fn connect(cfg: &SqlConfig) -> Result<Pool, sqlx::Error> {
    Ok(match cfg.db_type {
        DbType::Mysql => {
            let mut opts = MySqlConnectOptions::new()
                .host(&cfg.host)
                .port(cfg.port)
                .username(&cfg.user);
            if !cfg.password.0.is_empty() {
                opts = opts.password(&cfg.password.0);
            }
            let opts = opts
                .database(&cfg.database)
                .ssl_mode(MySqlSslMode::Disabled)
                // The server's own time zone: stored times are the database server's local
                // naive time, as DB-GPT's controllers write theirs.
                .timezone(None)
                .disable_statement_logging();
            Pool::My(
                MySqlPoolOptions::new()
                    .max_connections(cfg.pool_size)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_with(opts)
                    .await?,
            )
        }
        DbType::Postgresql => {
            let mut opts = PgConnectOptions::new()
                .host(&cfg.host)
                .port(cfg.port)
                .username(&cfg.user);
            if !cfg.password.0.is_empty() {
                opts = opts.password(&cfg.password.0);
            }
            let opts = opts
                .database(&cfg.database)
                .ssl_mode(PgSslMode::Disable)
                .disable_statement_logging();
            Pool::Pg(
                PgPoolOptions::new()
                    .max_connections(cfg.pool_size)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_with(opts)
                    .await?,
            )
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
        });
        inner
            .reload()
            .await
            .map_err(|e| open_err(format!("cannot read table {TABLE}: {e}")))?;
        info!(database = %desc, instances = inner.read_cache().len(), unique, "SQL registry opened");
        let task = tokio::spawn(background(Arc::downgrade(&inner)));
        Ok(SqlRegistry { inner, task })
    }

    /// Whether writes are upserts on a unique index (false: the locked path for a DB-GPT
    /// table holding duplicates).
    pub fn has_unique_index(&self) -> bool {
        self.inner.unique
    }
}

/// A session holding the schema lock.
enum SchemaLock {
    My(sqlx::pool::PoolConnection<sqlx::MySql>),
    Pg(sqlx::pool::PoolConnection<sqlx::Postgres>),
}

const SCHEMA_LOCK_MYSQL: &str = "dbgpt_cluster_registry_schema";
const SCHEMA_LOCK_PG: i64 = 0x6462_6770_7473_6368; // "dbgptsch"

async fn schema_lock(pool: &Pool) -> Result<SchemaLock, sqlx::Error> {
    match pool {
        Pool::My(p) => {
            let mut c = p.acquire().await?;
            let got: Option<i64> = sqlx::query("SELECT GET_LOCK(?, 60)")
                .bind(SCHEMA_LOCK_MYSQL)
                .fetch_one(&mut *c)
                .await?
                .try_get(0)?;
            if got != Some(1) {
                return Err(sqlx::Error::Protocol(
                    "timed out waiting for another controller's schema set-up".into(),
                ));
            }
            Ok(SchemaLock::My(c))
        }
        Pool::Pg(p) => {
            let mut c = p.acquire().await?;
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(SCHEMA_LOCK_PG)
                .execute(&mut *c)
                .await?;
            Ok(SchemaLock::Pg(c))
        }
    }
}

async fn schema_unlock(lock: SchemaLock) {
    let released = match lock {
        SchemaLock::My(mut c) => {
            let r = sqlx::query("SELECT RELEASE_LOCK(?)")
                .bind(SCHEMA_LOCK_MYSQL)
                .execute(&mut *c)
                .await;
            if r.is_err() {
                c.detach();
            }
            r.is_ok()
        }
        SchemaLock::Pg(mut c) => {
            let r = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(SCHEMA_LOCK_PG)
                .execute(&mut *c)
                .await;
            if r.is_err() {
                c.detach();
            }
            r.is_ok()
        }
    };
    if !released {
        warn!("could not release the schema lock; it ends with the connection");
    }
}

/// Whether the table has a unique index on exactly `(model_name, host, port)`; adds one if
/// it does not and the data allows, and logs what it did.
async fn ensure_unique(pool: &Pool, d: DbType) -> Result<bool, sqlx::Error> {
    let found: bool = match pool {
        Pool::My(p) => {
            let rows = sqlx::query(
                "SELECT index_name, GROUP_CONCAT(column_name ORDER BY seq_in_index SEPARATOR ',') \
                 FROM information_schema.statistics \
                 WHERE table_schema = DATABASE() AND table_name = ? AND non_unique = 0 \
                 GROUP BY index_name",
            )
            .bind(TABLE)
            .fetch_all(p)
            .await?;
            rows.iter().any(|r| {
                r.try_get::<String, _>(1)
                    .map(|c| c.eq_ignore_ascii_case("model_name,host,port"))
                    .unwrap_or(false)
            })
        }
        Pool::Pg(p) => {
            let rows = sqlx::query(
                "SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema() AND tablename = $1",
            )
            .bind(TABLE)
            .fetch_all(p)
            .await?;
            rows.iter().any(|r| {
                r.try_get::<String, _>(0)
                    .map(|def| {
                        def.contains("UNIQUE")
                            && def.replace(' ', "").ends_with("(model_name,host,port)")
                    })
                    .unwrap_or(false)
            })
        }
    };
    if found {
        return Ok(true);
    }
    let add = AssertSqlSafe(format!(
        "CREATE UNIQUE INDEX {UNIQUE_INDEX} ON {TABLE} (model_name, host, port)"
    ));
    match on_pool!(pool, |p| sqlx::query(add).execute(p).await.map(|_| ())) {
        Ok(()) => {
            info!(
                table = TABLE,
                index = UNIQUE_INDEX,
                "added a unique index on (model_name, host, port) to the existing registry table"
            );
            Ok(true)
        }
        Err(e) => {
            warn!(
                table = TABLE,
                error = %e,
                dialect = ?d,
                "could not add a unique index on (model_name, host, port) (the table probably \
                 holds duplicate rows already); writes will take a database lock instead"
            );
            Ok(false)
        }
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
                    info!(database = %self.desc, "registry database reachable again");
                }
                Ok(v)
            }
            Err(e) => {
                if self.db_ok.swap(false, Ordering::Relaxed) {
                    warn!(database = %self.desc, error = %e,
                        "registry database unreachable: writes answer 503, reads serve the last known view");
                }
                Err(storage(&self.desc, e))
            }
        }
    }

    /// Re-reads the whole table into the cache (keeping buffered heartbeats).
    async fn reload(&self) -> Result<(), RegistryError> {
        let sql = self.sql.select_all.clone();
        let now = Timestamp::now();
        let rows: Result<Vec<DbRow>, sqlx::Error> = on_pool!(&self.pool, |p| {
            match sqlx::query(sql).fetch_all(p).await {
                Ok(rows) => (|| {
                    let mut out = Vec::with_capacity(rows.len());
                    for r in &rows {
                        out.push(decode_row!(r));
                    }
                    Ok(out)
                })(),
                Err(e) => Err(e),
            }
        });
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
        let sql = self.sql.select_one.clone();
        let now = Timestamp::now();
        let (m, h, port) = (key.model_name.clone(), key.host.clone(), key.port as i32);
        let rows: Result<Vec<DbRow>, sqlx::Error> = on_pool!(&self.pool, |p| {
            match sqlx::query(sql)
                .bind(m)
                .bind(h)
                .bind(port)
                .fetch_all(p)
                .await
            {
                Ok(rows) => (|| {
                    let mut out = Vec::with_capacity(rows.len());
                    for r in &rows {
                        out.push(decode_row!(r));
                    }
                    Ok(out)
                })(),
                Err(e) => Err(e),
            }
        });
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
            let i = input.clone();
            on_pool!(&self.pool, |p| sqlx::query(sql)
                .bind(i.model_name)
                .bind(i.host)
                .bind(i.port as i32)
                .bind(i.weight)
                .bind(i.check_healthy)
                .bind(i.enabled)
                .bind(i.prompt_template)
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

    /// Update-then-insert under a database lock, for a table without the unique index.
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
        let i = input.clone();
        match &self.pool {
            Pool::My(p) => {
                let mut conn = p.acquire().await?;
                let got: Option<i64> = sqlx::query("SELECT GET_LOCK(?, 10)")
                    .bind(MYSQL_LOCK)
                    .fetch_one(&mut *conn)
                    .await?
                    .try_get(0)?;
                if got != Some(1) {
                    return Err(sqlx::Error::Protocol(
                        "timed out waiting for the registry write lock".into(),
                    ));
                }
                let result = async {
                    let q = sqlx::query(update);
                    let q = if kind == WriteKind::Register {
                        q.bind(i.weight).bind(i.prompt_template.clone())
                    } else {
                        q
                    };
                    let n = q
                        .bind(i.model_name.clone())
                        .bind(i.host.clone())
                        .bind(i.port as i32)
                        .execute(&mut *conn)
                        .await?
                        .rows_affected();
                    if n == 0 {
                        sqlx::query(insert)
                            .bind(i.model_name.clone())
                            .bind(i.host.clone())
                            .bind(i.port as i32)
                            .bind(i.weight)
                            .bind(i.check_healthy)
                            .bind(i.enabled)
                            .bind(i.prompt_template.clone())
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok::<(), sqlx::Error>(())
                }
                .await;
                let released = sqlx::query("SELECT RELEASE_LOCK(?)")
                    .bind(MYSQL_LOCK)
                    .execute(&mut *conn)
                    .await;
                if released.is_err() {
                    // The lock dies with the session: do not hand this connection back.
                    conn.detach();
                }
                result
            }
            Pool::Pg(p) => {
                let mut tx = p.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(PG_LOCK)
                    .execute(&mut *tx)
                    .await?;
                let q = sqlx::query(update);
                let q = if kind == WriteKind::Register {
                    q.bind(i.weight).bind(i.prompt_template.clone())
                } else {
                    q
                };
                let n = q
                    .bind(i.model_name.clone())
                    .bind(i.host.clone())
                    .bind(i.port as i32)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if n == 0 {
                    sqlx::query(insert)
                        .bind(i.model_name.clone())
                        .bind(i.host.clone())
                        .bind(i.port as i32)
                        .bind(i.weight)
                        .bind(i.check_healthy)
                        .bind(i.enabled)
                        .bind(i.prompt_template.clone())
                        .execute(&mut *tx)
                        .await?;
                }
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
                q = q
                    .bind(k.model_name.clone())
                    .bind(k.host.clone())
                    .bind(k.port as i32);
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
                q = q
                    .bind(k.model_name.clone())
                    .bind(k.host.clone())
                    .bind(k.port as i32);
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
                info!(instance = %k, "heartbeat for an instance removed meanwhile: registering it again");
                self.write(input, WriteKind::Register).await?;
            }
        }
        Ok(())
    }

    async fn simple_key_write(&self, sql: SqlStr, key: &InstanceKey) -> Result<u64, RegistryError> {
        let (m, h, port) = (key.model_name.clone(), key.host.clone(), key.port as i32);
        let r = on_pool!(&self.pool, |p| sqlx::query(sql)
            .bind(m)
            .bind(h)
            .bind(port)
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::registry::conformance::{self, Factory, input};

    /// A private database on the local test server, dropped (even on panic) with the value.
    pub struct TestDb {
        pub cfg: SqlConfig,
    }

    fn server(d: DbType) -> (String, u16, String) {
        let var = match d {
            DbType::Mysql => "DBGPT_TEST_MYSQL",
            DbType::Postgresql => "DBGPT_TEST_POSTGRES",
        };
        let hp = std::env::var(var).unwrap_or_else(|_| format!("127.0.0.1:{}", d.default_port()));
        let (h, p) = hp.rsplit_once(':').unwrap();
        let user = match d {
            DbType::Mysql => "root",
            DbType::Postgresql => "postgres",
        };
        (h.to_string(), p.parse().unwrap(), user.to_string())
    }

    async fn admin(d: DbType, sql: String) {
        let (host, port, user) = server(d);
        match d {
            DbType::Mysql => {
                let mut c = MySqlConnectOptions::new()
                    .host(&host)
                    .port(port)
                    .username(&user)
                    .ssl_mode(MySqlSslMode::Disabled)
                    .connect()
                    .await
                    .expect("MariaDB test server (scripts/setup.sh starts it)");
                sqlx::query(AssertSqlSafe(sql))
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
            DbType::Postgresql => {
                let mut c = PgConnectOptions::new()
                    .host(&host)
                    .port(port)
                    .username(&user)
                    .database("postgres")
                    .ssl_mode(PgSslMode::Disable)
                    .connect()
                    .await
                    .expect("PostgreSQL test server (scripts/setup.sh starts it)");
                sqlx::query(AssertSqlSafe(sql))
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
        }
    }

    impl TestDb {
        pub async fn new(d: DbType) -> TestDb {
            let name = format!("dbgpt_test_{}", uuid::Uuid::new_v4().simple());
            admin(d, format!("CREATE DATABASE {name}")).await;
            let (host, port, user) = server(d);
            TestDb {
                cfg: SqlConfig {
                    db_type: d,
                    host,
                    port,
                    user,
                    password: Secret::default(),
                    database: name,
                    pool_size: 5,
                    wait: Duration::ZERO,
                },
            }
        }

        async fn pool(&self) -> Pool {
            connect(&self.cfg).await.unwrap()
        }

        pub async fn exec(&self, sql: &str) -> u64 {
            let pool = self.pool().await;
            let sql = AssertSqlSafe(sql.to_string());
            on_pool!(&pool, |p| sqlx::query(sql)
                .execute(p)
                .await
                .unwrap()
                .rows_affected())
        }

        pub async fn count(&self, sql: &str) -> i64 {
            let pool = self.pool().await;
            let sql = AssertSqlSafe(sql.to_string());
            on_pool!(&pool, |p| sqlx::query(sql)
                .fetch_one(p)
                .await
                .unwrap()
                .try_get::<i64, _>(0)
                .unwrap())
        }
    }

    impl Drop for TestDb {
        /// Drops the database even when the test panicked (on a thread with its own
        /// runtime: this may run inside the test's runtime).
        fn drop(&mut self) {
            let d = self.cfg.db_type;
            let sql = match d {
                DbType::Mysql => format!("DROP DATABASE IF EXISTS {}", self.cfg.database),
                DbType::Postgresql => {
                    format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.cfg.database)
                }
            };
            let _ = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(admin(d, sql))
            })
            .join();
        }
    }

    struct Sql(SqlConfig);

    #[async_trait]
    impl Factory for Sql {
        async fn open(&self, t: Duration) -> Box<dyn Registry> {
            Box::new(SqlRegistry::open(&self.0, t).await.unwrap())
        }
    }

    async fn conforms(d: DbType) {
        let db = TestDb::new(d).await;
        conformance::run_all(&Sql(db.cfg.clone())).await;
        drop(db);
    }

    #[tokio::test]
    async fn mysql_conforms() {
        conforms(DbType::Mysql).await;
    }

    #[tokio::test]
    async fn postgres_conforms() {
        conforms(DbType::Postgresql).await;
    }

    /// Two registries on one database: shared state, expiry by either, heartbeats through
    /// one keep the instance alive against the other's sweep, concurrent registrations of
    /// one instance through both give one row.
    async fn shared(d: DbType) {
        let db = TestDb::new(d).await;
        let t = Duration::from_millis(2500);
        // Both start at once on an empty database: the schema set-up must not race.
        let (a, b) = tokio::join!(SqlRegistry::open(&db.cfg, t), SqlRegistry::open(&db.cfg, t));
        let (a, b) = (Arc::new(a.unwrap()), Arc::new(b.unwrap()));
        assert!(a.has_unique_index() && b.has_unique_index());
        a.register(input("m@llm", 1)).await.unwrap();
        let l = b.list(None, false).await.unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].healthy, Some(true));
        // Heartbeats through B keep it alive against A's sweep (B flushes every second).
        for _ in 0..8 {
            b.heartbeat(input("m@llm", 1)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(a.expire().await.unwrap(), 0);
        }
        assert_eq!(a.list(None, true).await.unwrap().len(), 1);
        // Silence: A's sweep expires it, B sees it.
        tokio::time::sleep(Duration::from_millis(3200)).await;
        assert_eq!(a.expire().await.unwrap(), 1);
        let l = b.list(None, false).await.unwrap();
        assert_eq!(l[0].healthy, Some(false));
        // Heartbeat via B revives it; A sees it.
        b.heartbeat(input("m@llm", 1)).await.unwrap();
        b.flush().await.unwrap();
        assert_eq!(a.list(None, true).await.unwrap().len(), 1);
        // Removal via A; B's buffered heartbeat re-registers it (heartbeat of unknown).
        b.heartbeat(input("m@llm", 1)).await.unwrap();
        let mut rm = input("m@llm", 1);
        rm.remove_from_registry = true;
        a.deregister(rm).await.unwrap();
        assert!(a.list(None, false).await.unwrap().is_empty());
        b.flush().await.unwrap();
        assert_eq!(a.list(None, true).await.unwrap().len(), 1);
        // 200 concurrent registrations of one new instance through both.
        let mut tasks = Vec::new();
        for i in 0..200 {
            let r = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                r.register(input("c@llm", 7)).await.unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let n = db
            .count(&format!(
                "SELECT COUNT(*) FROM {TABLE} WHERE model_name = 'c@llm' AND port = 7"
            ))
            .await;
        assert_eq!(n, 1);
        drop((a, b));
        drop(db);
    }

    #[tokio::test]
    async fn mysql_shared_by_two_registries() {
        shared(DbType::Mysql).await;
    }

    #[tokio::test]
    async fn postgres_shared_by_two_registries() {
        shared(DbType::Postgresql).await;
    }

    /// DB-GPT's MySQL DDL (assets/schema/dbgpt.sql).
    pub const DBGPT_MYSQL_DDL: &str = "CREATE TABLE IF NOT EXISTS `dbgpt_cluster_registry_instance` (
  `id` int(11) NOT NULL AUTO_INCREMENT COMMENT 'Auto increment id',
  `model_name` varchar(128) NOT NULL COMMENT 'Model name',
  `host` varchar(128) NOT NULL COMMENT 'Host of the model',
  `port` int(11) NOT NULL COMMENT 'Port of the model',
  `weight` float DEFAULT 1.0 COMMENT 'Weight of the model',
  `check_healthy` tinyint(1) DEFAULT 1 COMMENT 'Whether to check the health of the model',
  `healthy` tinyint(1) DEFAULT 0 COMMENT 'Whether the model is healthy',
  `enabled` tinyint(1) DEFAULT 1 COMMENT 'Whether the model is enabled',
  `prompt_template` varchar(128) DEFAULT NULL COMMENT 'Prompt template for the model instance',
  `last_heartbeat` datetime DEFAULT NULL COMMENT 'Last heartbeat time of the model instance',
  `user_name` varchar(128) DEFAULT NULL COMMENT 'User name',
  `sys_code` varchar(128) DEFAULT NULL COMMENT 'System code',
  `gmt_created` datetime DEFAULT CURRENT_TIMESTAMP COMMENT 'Record creation time',
  `gmt_modified` datetime DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP COMMENT 'Record update time',
  PRIMARY KEY (`id`),
  UNIQUE KEY `uk_model_instance` (`model_name`,`host`,`port`,`sys_code`)
) ENGINE=InnoDB AUTO_INCREMENT=1 DEFAULT CHARSET=utf8mb4 COMMENT='Cluster model instance table, for registering and managing model instances'";

    /// A DB-GPT-created table with rows written by DB-GPT (local naive time, FLOAT weight):
    /// read correctly, the unique index is added, writes keep the columns DB-GPT reads.
    #[tokio::test]
    async fn mysql_dbgpt_table_is_read_and_written() {
        let db = TestDb::new(DbType::Mysql).await;
        db.exec(DBGPT_MYSQL_DDL).await;
        db.exec(&format!(
            "INSERT INTO {TABLE} (model_name, host, port, weight, check_healthy, healthy, enabled, prompt_template, last_heartbeat) \
             VALUES ('db1@llm', '10.1.1.1', 7001, 0.1, 1, 1, 0, 'tpl', NOW()), \
                    ('old@llm', '10.1.1.2', 7002, 1.0, 1, 1, 1, NULL, NOW() - INTERVAL 1 HOUR)"
        ))
        .await;
        let r = SqlRegistry::open(&db.cfg, Duration::from_secs(60))
            .await
            .unwrap();
        assert!(r.has_unique_index());
        let l = r.list(None, false).await.unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].model_name, "db1@llm");
        assert_eq!(l[0].weight, Some(0.1));
        assert_eq!(l[0].enabled, Some(false));
        assert_eq!(l[0].prompt_template.as_deref(), Some("tpl"));
        assert_eq!(l[0].healthy, Some(true));
        assert_eq!(
            l[1].healthy,
            Some(false),
            "an hour old heartbeat is expired"
        );
        // The wire time is the local naive time DB-GPT wrote (server and test share a clock).
        let shown = chrono::NaiveDateTime::parse_from_str(
            l[0].last_heartbeat.as_deref().unwrap(),
            "%Y-%m-%dT%H:%M:%S%.f",
        )
        .unwrap();
        let local_now = chrono::Local::now().naive_local();
        assert!(
            (local_now - shown).num_seconds().abs() < 5,
            "{shown} vs {local_now}"
        );
        assert_eq!(r.expire().await.unwrap(), 1);
        r.register(input("new@llm", 1)).await.unwrap();
        r.heartbeat(input("db1@llm", 1)).await.unwrap(); // unknown port: registers
        let n = db
            .count(&format!("SELECT COUNT(*) FROM {TABLE} WHERE healthy = 1 AND sys_code IS NULL AND last_heartbeat IS NOT NULL"))
            .await;
        assert_eq!(n, 3);
        drop(r);
        drop(db);
    }

    /// A DB-GPT table that already holds duplicates: no unique index can be added, writes
    /// take the lock, and concurrent registrations of a new instance still give one row.
    async fn legacy_duplicates(d: DbType) {
        let db = TestDb::new(d).await;
        match d {
            DbType::Mysql => {
                db.exec(DBGPT_MYSQL_DDL).await;
            }
            DbType::Postgresql => {
                db.exec(&format!(
                    "CREATE TABLE {TABLE} (id SERIAL PRIMARY KEY, model_name VARCHAR(128) NOT NULL, host VARCHAR(128) NOT NULL, port INTEGER NOT NULL, weight FLOAT, check_healthy BOOLEAN, healthy BOOLEAN, enabled BOOLEAN, prompt_template VARCHAR(128), last_heartbeat TIMESTAMP, user_name VARCHAR(128), sys_code VARCHAR(128), gmt_created TIMESTAMP, gmt_modified TIMESTAMP, CONSTRAINT uk_model_instance UNIQUE (model_name, host, port, sys_code))"
                ))
                .await;
            }
        }
        let (t, now) = if d == DbType::Mysql {
            ("1", "NOW()")
        } else {
            ("TRUE", "LOCALTIMESTAMP")
        };
        db.exec(&format!(
            "INSERT INTO {TABLE} (model_name, host, port, weight, check_healthy, healthy, enabled, last_heartbeat) VALUES \
             ('dup@llm', 'h', 1, 1.0, {t}, {t}, {t}, {now}), ('dup@llm', 'h', 1, 2.0, {t}, {t}, {t}, {now})"
        ))
        .await;
        let a = Arc::new(
            SqlRegistry::open(&db.cfg, Duration::from_secs(60))
                .await
                .unwrap(),
        );
        let b = Arc::new(
            SqlRegistry::open(&db.cfg, Duration::from_secs(60))
                .await
                .unwrap(),
        );
        assert!(!a.has_unique_index());
        assert!(a.describe().contains("locked"));
        // The duplicate is served once.
        assert_eq!(a.list(None, false).await.unwrap().len(), 1);
        let mut tasks = Vec::new();
        for i in 0..60 {
            let r = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                if i % 3 == 0 {
                    r.heartbeat(input("n@llm", 3)).await.unwrap()
                } else {
                    r.register(input("n@llm", 3)).await.unwrap()
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let n = db
            .count(&format!(
                "SELECT COUNT(*) FROM {TABLE} WHERE model_name = 'n@llm'"
            ))
            .await;
        assert_eq!(n, 1);
        b.heartbeat(input("n@llm", 3)).await.unwrap();
        b.flush().await.unwrap();
        assert_eq!(a.list(None, true).await.unwrap().len(), 2);
        drop((a, b));
        drop(db);
    }

    #[tokio::test]
    async fn mysql_legacy_table_with_duplicates() {
        legacy_duplicates(DbType::Mysql).await;
    }

    #[tokio::test]
    async fn postgres_legacy_table_with_duplicates() {
        legacy_duplicates(DbType::Postgresql).await;
    }

    /// Connections killed on the server: the pool reconnects, nothing is lost.
    async fn connections_killed(d: DbType) {
        let db = TestDb::new(d).await;
        let r = SqlRegistry::open(&db.cfg, Duration::from_secs(60))
            .await
            .unwrap();
        r.register(input("k@llm", 1)).await.unwrap();
        let kill = match d {
            DbType::Mysql => format!(
                "SELECT COUNT(*) FROM (SELECT id FROM information_schema.processlist WHERE db = '{}') x",
                db.cfg.database
            ),
            DbType::Postgresql => format!(
                "SELECT CAST(COUNT(pg_terminate_backend(pid)) AS BIGINT) FROM pg_stat_activity WHERE datname = '{}' AND pid <> pg_backend_pid()",
                db.cfg.database
            ),
        };
        if d == DbType::Mysql {
            // KILL needs one statement per connection.
            let pool = db.pool().await;
            if let Pool::My(p) = &pool {
                let ids: Vec<i64> = sqlx::query(AssertSqlSafe(format!(
                    "SELECT CAST(id AS SIGNED) FROM information_schema.processlist WHERE db = '{}' AND id <> CONNECTION_ID()",
                    db.cfg.database
                )))
                .fetch_all(p)
                .await
                .unwrap()
                .iter()
                .map(|row| row.try_get(0).unwrap())
                .collect();
                assert!(!ids.is_empty());
                for id in ids {
                    let _ = sqlx::query(AssertSqlSafe(format!("KILL {id}")))
                        .execute(p)
                        .await;
                }
            }
        } else {
            assert!(db.count(&kill).await >= 1);
        }
        // The next operations succeed on fresh connections (allow one failed attempt).
        let mut ok = false;
        for _ in 0..3 {
            if r.register(input("k@llm", 2)).await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            ok,
            "registry did not recover after its connections were killed"
        );
        r.heartbeat(input("k@llm", 1)).await.ok();
        r.flush().await.ok();
        r.flush().await.unwrap();
        assert_eq!(r.list(None, true).await.unwrap().len(), 2);
        drop(r);
        drop(db);
    }

    #[tokio::test]
    async fn mysql_recovers_from_killed_connections() {
        connections_killed(DbType::Mysql).await;
    }

    #[tokio::test]
    async fn postgres_recovers_from_killed_connections() {
        connections_killed(DbType::Postgresql).await;
    }

    /// Unreachable server: writes 503, reads serve the last view, recovery when it returns.
    /// (Simulated with a database name that is dropped and re-created would be invasive;
    /// instead open against a port nobody listens on.)
    #[tokio::test]
    async fn unreachable_server_fails_fast_naming_host_and_port() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = SqlConfig {
            db_type: DbType::Mysql,
            host: "127.0.0.1".into(),
            port,
            user: "root".into(),
            password: Secret("hunter2".into()),
            database: "dbgpt".into(),
            pool_size: 1,
            wait: Duration::ZERO,
        };
        let t0 = Instant::now();
        let e = SqlRegistry::open(&cfg, Duration::from_secs(60))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }
}

#[cfg(test)]
mod outage_tests {
    use std::sync::atomic::AtomicBool;

    use super::tests::TestDb;
    use super::*;
    use crate::registry::conformance::input;

    /// A TCP proxy in front of the database server that can be cut: while down it refuses
    /// new connections and closes the open ones.
    struct Proxy {
        port: u16,
        up: Arc<AtomicBool>,
        cut: Arc<tokio::sync::Notify>,
    }

    impl Proxy {
        async fn start(target: (String, u16)) -> Proxy {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let up = Arc::new(AtomicBool::new(true));
            let cut = Arc::new(tokio::sync::Notify::new());
            let (up2, cut2) = (up.clone(), cut.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        return;
                    };
                    if !up2.load(Ordering::SeqCst) {
                        continue; // dropped: connection closed at once
                    }
                    let target = target.clone();
                    let cut = cut2.clone();
                    tokio::spawn(async move {
                        let Ok(mut server) =
                            tokio::net::TcpStream::connect((target.0.as_str(), target.1)).await
                        else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cut.notified() => {}
                        }
                    });
                }
            });
            Proxy { port, up, cut }
        }

        fn down(&self) {
            self.up.store(false, Ordering::SeqCst);
            self.cut.notify_waiters();
        }

        fn up(&self) {
            self.up.store(true, Ordering::SeqCst);
        }
    }

    async fn outage(d: DbType) {
        let db = TestDb::new(d).await;
        let proxy = Proxy::start((db.cfg.host.clone(), db.cfg.port)).await;
        let mut cfg = db.cfg.clone();
        cfg.port = proxy.port;
        let r = SqlRegistry::open(&cfg, Duration::from_secs(60))
            .await
            .unwrap();
        r.register(input("a@llm", 1)).await.unwrap();
        r.register(input("b@llm", 1)).await.unwrap();
        proxy.down();
        // Writes fail with a storage error (HTTP 503) naming the database.
        let e = r.register(input("c@llm", 1)).await.unwrap_err();
        assert!(matches!(e, RegistryError::Storage(_)), "{e}");
        assert!(e.to_string().contains(&cfg.describe()), "{e}");
        assert!(r.deregister(input("a@llm", 1)).await.is_err());
        // Heartbeats of known instances are buffered but reported as failing.
        assert!(r.heartbeat(input("a@llm", 1)).await.is_err());
        assert!(r.expire().await.is_err());
        // Reads serve the last known view, at once.
        let t0 = Instant::now();
        let l = r.list(None, true).await.unwrap();
        assert!(t0.elapsed() < Duration::from_secs(1));
        assert_eq!(l.len(), 2);
        assert_eq!(r.counts().total, 2);
        // Back: the background task reconnects and writes the buffered heartbeat.
        proxy.up();
        let mut back = false;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if r.inner.db_ok.load(Ordering::Relaxed) && r.inner.lock_pending().is_empty() {
                back = true;
                break;
            }
        }
        assert!(
            back,
            "registry did not recover after the database came back"
        );
        r.register(input("c@llm", 1)).await.unwrap();
        assert_eq!(r.expire().await.unwrap(), 0);
        assert_eq!(r.list(None, true).await.unwrap().len(), 3);
        drop(r);
        drop(db);
    }

    /// `--registry_db_wait`: start-up keeps retrying until the server answers.
    #[tokio::test]
    async fn start_up_waits_for_the_database_when_asked() {
        let db = TestDb::new(DbType::Postgresql).await;
        let proxy = Proxy::start((db.cfg.host.clone(), db.cfg.port)).await;
        proxy.down();
        let mut cfg = db.cfg.clone();
        cfg.port = proxy.port;
        assert!(
            SqlRegistry::open(&cfg, Duration::from_secs(60))
                .await
                .is_err()
        );
        cfg.wait = Duration::from_secs(20);
        let up_later = async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            proxy.up();
        };
        let t0 = Instant::now();
        let (r, ()) = tokio::join!(SqlRegistry::open(&cfg, Duration::from_secs(60)), up_later);
        let r = r.unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(1500));
        r.register(input("w@llm", 1)).await.unwrap();
        drop(r);
        drop(db);
    }

    #[tokio::test]
    async fn mysql_outage_503_then_recovery() {
        outage(DbType::Mysql).await;
    }

    #[tokio::test]
    async fn postgres_outage_503_then_recovery() {
        outage(DbType::Postgresql).await;
    }
}
