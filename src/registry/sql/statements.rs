//! The SQL of one dialect, built once per registry: every statement the store runs, with
//! MySQL's and PostgreSQL's spellings of the same thing side by side (the database clock,
//! booleans, casts, upserts) and `?` placeholders numbered `$n` for PostgreSQL.

use sqlx::{AssertSqlSafe, SqlSafeStr, SqlStr};

use super::{DbType, TABLE};

/// The statements of one dialect (`?` placeholders rewritten to `$n` for PostgreSQL).
pub(super) struct Statements {
    pub(super) select_all: SqlStr,
    pub(super) select_one: SqlStr,
    pub(super) upsert_register: SqlStr,
    pub(super) upsert_heartbeat: SqlStr,
    pub(super) update_register: SqlStr,
    pub(super) update_heartbeat: SqlStr,
    pub(super) insert: SqlStr,
    pub(super) deregister: SqlStr,
    pub(super) delete: SqlStr,
    pub(super) expire: SqlStr,
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
    pub(super) fn new(d: DbType) -> Statements {
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
    pub(super) fn heartbeat_batch(d: DbType, n: usize) -> SqlStr {
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
    pub(super) fn existing_batch(d: DbType, n: usize) -> SqlStr {
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
