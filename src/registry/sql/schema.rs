//! The table and its guarantees at start-up: DB-GPT's DDL (plus our unique index) for a
//! missing table, the database lock that keeps controllers starting together from racing
//! on it, and the check that `(model_name, host, port)` is unique (adding the index when a
//! DB-GPT table's data allows).

use sqlx::{AssertSqlSafe, Row};
use tracing::{info, warn};

use super::{DbType, Pool, TABLE, UNIQUE_INDEX, mysql_get_lock};

/// DDL for a missing table: DB-GPT's columns, plus our unique index.
pub(super) fn create_table_sql(d: DbType) -> String {
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

/// A session holding the schema lock.
pub(crate) enum SchemaLock {
    My(sqlx::pool::PoolConnection<sqlx::MySql>),
    Pg(sqlx::pool::PoolConnection<sqlx::Postgres>),
}

const SCHEMA_LOCK_MYSQL: &str = "dbgpt_cluster_registry_schema";
const SCHEMA_LOCK_PG: i64 = 0x6462_6770_7473_6368; // "dbgptsch"

/// Takes the schema lock, waiting up to a minute on MySQL (PostgreSQL waits as long as it
/// takes).
pub(crate) async fn schema_lock(pool: &Pool) -> Result<SchemaLock, sqlx::Error> {
    match pool {
        Pool::My(p) => {
            let mut c = p.acquire().await?;
            mysql_get_lock(
                &mut c,
                SCHEMA_LOCK_MYSQL,
                60,
                "another controller's schema set-up",
            )
            .await?;
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

pub(crate) async fn schema_unlock(lock: SchemaLock) {
    let released = match lock {
        SchemaLock::My(c) => {
            release_session_lock!(c, "SELECT RELEASE_LOCK(?)", SCHEMA_LOCK_MYSQL)
        }
        SchemaLock::Pg(c) => {
            release_session_lock!(c, "SELECT pg_advisory_unlock($1)", SCHEMA_LOCK_PG)
        }
    };
    if !released {
        warn!("could not release the schema lock; it ends with the connection");
    }
}

/// Whether the table has a unique index on exactly `(model_name, host, port)`; adds one if
/// it does not and the data allows, and logs what it did.
pub(super) async fn ensure_unique(pool: &Pool, d: DbType) -> Result<bool, sqlx::Error> {
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
