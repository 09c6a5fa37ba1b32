//! The SQL key store against the local MariaDB and PostgreSQL servers (fresh databases as
//! the registry's SQL tests make them): the conformance suite, and two controllers' stores
//! sharing one database.

use std::sync::Arc;

use async_trait::async_trait;

use super::*;
use crate::keys::conformance::{self, Factory};
use crate::registry::sql::tests::TestDb;
use crate::registry::sql::{SqlConfig, connect};

struct Sql(SqlConfig);

async fn open(cfg: &SqlConfig) -> SqlKeyStore {
    let pool = connect(cfg).await.unwrap();
    SqlKeyStore::open(pool, cfg.db_type).await.unwrap()
}

#[async_trait]
impl Factory for Sql {
    async fn open(&self) -> Box<dyn KeyStore> {
        Box::new(open(&self.0).await)
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

/// Two stores opened at once on one empty database (the schema set-up must not race):
/// concurrent creates of one name give one key, concurrent syncs through both add up,
/// versions stay distinct.
async fn shared(d: DbType) {
    let db = TestDb::new(d).await;
    let (a, b) = tokio::join!(open(&db.cfg), open(&db.cfg));
    let (a, b) = (Arc::new(a), Arc::new(b));
    let spec = |n: &str| KeySpec {
        name: n.into(),
        ..KeySpec::default()
    };
    let (x, y) = tokio::join!(a.create(spec("same")), b.create(spec("same")));
    assert!(
        x.is_ok() != y.is_ok(),
        "exactly one create wins: {x:?} {y:?}"
    );
    let id = a.get("same").await.unwrap().id;
    let now = now_secs();
    let day = day_of(now);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        let id = id.clone();
        let day = day.clone();
        tasks.push(tokio::spawn(async move {
            let req = SyncRequest {
                apiserver: format!("api{i}"),
                since_version: 0,
                usage: vec![UsageRow {
                    key_id: id.clone(),
                    key_name: String::new(),
                    model: "m".into(),
                    day,
                    requests: 1,
                    prompt_tokens: 2,
                    completion_tokens: 3,
                }],
                minute: vec![MinuteCount {
                    key_id: id,
                    model: String::new(),
                    minute: minute_of(now),
                    requests: 1,
                    tokens: 5,
                }],
            };
            s.sync(&req, now).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rows = b.usage(Some(id.as_str()), None).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (
            rows[0].requests,
            rows[0].prompt_tokens,
            rows[0].completion_tokens
        ),
        (40, 80, 120)
    );
    let empty = SyncRequest {
        apiserver: "x".into(),
        since_version: 0,
        usage: vec![],
        minute: vec![],
    };
    let answer = a.sync(&empty, now).await.unwrap();
    assert_eq!(answer.daily_tokens.get(&id), Some(&200));
    assert_eq!(answer.minute.len(), 1);
    assert_eq!(
        (answer.minute[0].requests, answer.minute[0].tokens),
        (40, 200)
    );
    // Concurrent updates through both get distinct, growing versions.
    let mut tasks = Vec::new();
    for i in 0..10u64 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            s.update(
                "same",
                KeyUpdate {
                    rpm: Some(Some(i + 1)),
                    ..KeyUpdate::default()
                },
            )
            .await
            .unwrap()
            .version
        }));
    }
    let mut versions = Vec::new();
    for t in tasks {
        versions.push(t.await.unwrap());
    }
    versions.sort();
    versions.dedup();
    assert_eq!(versions.len(), 10);
    let last = a.get("same").await.unwrap();
    assert_eq!(last.version, *versions.last().unwrap());
    drop(db);
}

#[tokio::test]
async fn mysql_stores_share_keys_and_usage() {
    shared(DbType::Mysql).await;
}

#[tokio::test]
async fn postgres_stores_share_keys_and_usage() {
    shared(DbType::Postgresql).await;
}

/// A report of more rows than one statement takes (three multi-row upserts) adds them all,
/// and a second report adds to each.
async fn large_report(d: DbType) {
    let db = TestDb::new(d).await;
    let s = open(&db.cfg).await;
    let now = now_secs();
    let day = day_of(now);
    let req = SyncRequest {
        apiserver: "a".into(),
        since_version: 0,
        usage: (0..1200)
            .map(|i| UsageRow {
                key_id: "k".into(),
                key_name: String::new(),
                model: format!("m{i}"),
                day: day.clone(),
                requests: 1,
                prompt_tokens: 2,
                completion_tokens: 3,
            })
            .collect(),
        minute: (0..1200)
            .map(|i| MinuteCount {
                key_id: "k".into(),
                model: format!("m{i}"),
                minute: minute_of(now),
                requests: 1,
                tokens: 5,
            })
            .collect(),
    };
    s.sync(&req, now).await.unwrap();
    let answer = s.sync(&req, now).await.unwrap();
    assert_eq!(answer.daily_tokens.get("k"), Some(&12_000));
    assert_eq!(answer.minute.len(), 1200);
    assert!(
        answer
            .minute
            .iter()
            .all(|m| m.requests == 2 && m.tokens == 10)
    );
    let rows = s.usage(Some("k"), None).await.unwrap();
    assert_eq!(rows.len(), 1200);
    assert!(rows.iter().all(|r| r.requests == 2 && r.prompt_tokens == 4));
    drop(db);
}

#[tokio::test]
async fn mysql_takes_a_large_report() {
    large_report(DbType::Mysql).await;
}

#[tokio::test]
async fn postgres_takes_a_large_report() {
    large_report(DbType::Postgresql).await;
}
