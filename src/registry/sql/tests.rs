//! The SQL store against the local MariaDB and PostgreSQL servers: the conformance suite,
//! two registries sharing one database, DB-GPT's own tables (including one holding
//! duplicates), killed connections, and outages through a proxy that can be cut.

use std::sync::atomic::AtomicBool;

use sqlx::mysql::{MySqlConnectOptions, MySqlSslMode};
use sqlx::postgres::{PgConnectOptions, PgSslMode};

use super::*;
use crate::registry::conformance::{self, Factory, input};

/// A private database on the local test server, dropped (even on panic) with the value.
pub(crate) struct TestDb {
    pub(crate) cfg: SqlConfig,
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
    pub(crate) async fn new(d: DbType) -> TestDb {
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

    async fn exec(&self, sql: &str) -> u64 {
        let pool = self.pool().await;
        let sql = AssertSqlSafe(sql.to_string());
        on_pool!(&pool, |p| sqlx::query(sql)
            .execute(p)
            .await
            .unwrap()
            .rows_affected())
    }

    async fn count(&self, sql: &str) -> i64 {
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
const DBGPT_MYSQL_DDL: &str = "CREATE TABLE IF NOT EXISTS `dbgpt_cluster_registry_instance` (
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
    // Without --registry_db_wait, open gives up after the first refused connection
    // instead of retrying (a bounded wait, so a retry loop fails the test, not hangs it).
    let e = tokio::time::timeout(
        Duration::from_secs(60),
        SqlRegistry::open(&cfg, Duration::from_secs(60)),
    )
    .await
    .expect("open retried an unreachable server although wait is zero")
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    assert!(!e.contains("hunter2"), "{e}");
}

// ------------------------------------------------------------------------------------
// Outages: a proxy in front of the database server that can be cut
// ------------------------------------------------------------------------------------

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
    // Reads serve the last known view, at once: the failed writes marked the database
    // down, so a read does not wait for it.
    assert!(!r.inner.db_ok.load(Ordering::Relaxed));
    let l = r.list(None, true).await.unwrap();
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
    let is_up = AtomicBool::new(false);
    let up_later = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        proxy.up();
        is_up.store(true, Ordering::SeqCst);
    };
    // Whether the database was up when open returned.
    let open = async {
        let r = SqlRegistry::open(&cfg, Duration::from_secs(60)).await;
        (r, is_up.load(Ordering::SeqCst))
    };
    let ((r, opened_after_up), ()) = tokio::join!(open, up_later);
    let r = r.unwrap();
    assert!(opened_after_up, "open returned before the database came up");
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
