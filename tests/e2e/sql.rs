//! The SQL registry with the real binary: two controllers on one MariaDB or PostgreSQL
//! database (each test creates its own database and drops it), failover after `kill -9`,
//! concurrent registrations, connections killed under load, credentials kept out of sight.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use sqlx::{AssertSqlSafe, ConnectOptions, Row};

use crate::common::*;

#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Db {
    My,
    Pg,
}

/// A private database on the local test server.
pub(crate) struct TestDb {
    kind: Db,
    name: String,
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs admin SQL (on the server, not in the test database); returns the first column of
/// each row as text.
fn admin(kind: Db, sql: &str) -> Vec<String> {
    let sql = sql.to_string();
    rt().block_on(async move {
        match kind {
            Db::My => {
                let mut c = sqlx::mysql::MySqlConnectOptions::new()
                    .host("127.0.0.1")
                    .port(3306)
                    .username("root")
                    .ssl_mode(sqlx::mysql::MySqlSslMode::Disabled)
                    .connect()
                    .await
                    .expect("MariaDB on 127.0.0.1:3306 (scripts/setup.sh starts it)");
                let rows = sqlx::query(AssertSqlSafe(sql))
                    .fetch_all(&mut c)
                    .await
                    .unwrap();
                rows.iter()
                    .map(|r| {
                        r.try_get::<String, _>(0)
                            .or_else(|_| r.try_get::<i64, _>(0).map(|v| v.to_string()))
                            .unwrap_or_default()
                    })
                    .collect()
            }
            Db::Pg => {
                let mut c = sqlx::postgres::PgConnectOptions::new()
                    .host("127.0.0.1")
                    .port(5432)
                    .username("postgres")
                    .database("postgres")
                    .ssl_mode(sqlx::postgres::PgSslMode::Disable)
                    .connect()
                    .await
                    .expect("PostgreSQL on 127.0.0.1:5432 (scripts/setup.sh starts it)");
                let rows = sqlx::query(AssertSqlSafe(sql))
                    .fetch_all(&mut c)
                    .await
                    .unwrap();
                rows.iter()
                    .map(|r| {
                        r.try_get::<String, _>(0)
                            .or_else(|_| r.try_get::<i64, _>(0).map(|v| v.to_string()))
                            .unwrap_or_default()
                    })
                    .collect()
            }
        }
    })
}

impl TestDb {
    pub(crate) fn new(kind: Db) -> TestDb {
        let name = format!("dbgpt_e2e_{}", uuid::Uuid::new_v4().simple());
        admin(kind, &format!("CREATE DATABASE {name}"));
        TestDb { kind, name }
    }

    fn url(&self) -> String {
        match self.kind {
            Db::My => format!("mysql://root@127.0.0.1:3306/{}", self.name),
            Db::Pg => format!("postgresql://postgres@127.0.0.1:5432/{}", self.name),
        }
    }

    pub(crate) fn flags(&self) -> Vec<String> {
        vec![
            "--registry_type".into(),
            "database".into(),
            "--registry_db_url".into(),
            self.url(),
            "--heartbeat_interval_secs".into(),
            "1".into(),
            // Heartbeats below come every 0.3 s and reach the table within 1 s: 6 s leaves
            // room for a machine busy with the other tests (4 s flaked once under load).
            "--heartbeat_timeout_secs".into(),
            "6".into(),
        ]
    }

    /// A query in this database (first column as text).
    pub(crate) fn query(&self, sql: &str) -> Vec<String> {
        match self.kind {
            Db::My => admin(self.kind, &sql.replace("$DB.", &format!("{}.", self.name))),
            Db::Pg => {
                let sql = sql.replace("$DB.", "").to_string();
                let url = format!("{}?sslmode=disable", self.url());
                rt().block_on(async move {
                    let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
                        .await
                        .unwrap();
                    sqlx::query(AssertSqlSafe(sql))
                        .fetch_all(&mut c)
                        .await
                        .unwrap()
                        .iter()
                        .map(|r| {
                            r.try_get::<String, _>(0)
                                .or_else(|_| r.try_get::<i64, _>(0).map(|v| v.to_string()))
                                .unwrap_or_default()
                        })
                        .collect()
                })
            }
        }
    }

    fn rows_of(&self, model: &str) -> usize {
        self.query(&format!(
            "SELECT CAST(COUNT(*) AS {}) FROM $DB.dbgpt_cluster_registry_instance WHERE model_name = '{model}'",
            if self.kind == Db::My { "SIGNED" } else { "BIGINT" }
        ))[0]
            .parse()
            .unwrap()
    }

    /// Kills every server connection to this database (the controllers' pools).
    fn kill_connections(&self) -> usize {
        match self.kind {
            Db::My => {
                let ids = admin(
                    Db::My,
                    &format!(
                        "SELECT CAST(id AS SIGNED) FROM information_schema.processlist WHERE db = '{}'",
                        self.name
                    ),
                );
                for id in &ids {
                    let _ = std::panic::catch_unwind(|| admin(Db::My, &format!("KILL {id}")));
                }
                ids.len()
            }
            Db::Pg => admin(
                Db::Pg,
                &format!(
                    "SELECT CAST(COUNT(pg_terminate_backend(pid)) AS BIGINT) FROM pg_stat_activity WHERE datname = '{}'",
                    self.name
                ),
            )[0]
            .parse()
            .unwrap(),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let sql = match self.kind {
            Db::My => format!("DROP DATABASE IF EXISTS {}", self.name),
            Db::Pg => format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        };
        let kind = self.kind;
        let _ = std::panic::catch_unwind(move || admin(kind, &sql));
    }
}

pub(crate) fn start(env: &TestEnv, db: &TestDb, port: u16) -> Daemon {
    let flags = db.flags();
    let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    env.controller_on(port, &env.path("unused.redb"), &extra)
}

fn list(port: u16, healthy_only: bool) -> Vec<Value> {
    let path = if healthy_only {
        "/api/controller/models?healthy_only=true"
    } else {
        "/api/controller/models"
    };
    let (status, v) = json_req(port, "GET", path, None);
    assert_eq!(status, 200, "{v}");
    v.as_array().unwrap().clone()
}

fn names(l: &[Value]) -> Vec<String> {
    l.iter()
        .map(|i| format!("{}:{}", i["model_name"].as_str().unwrap(), i["port"]))
        .collect()
}

fn post(port: u16, path: &str, body: &Value) -> u16 {
    raw_http(
        port,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        &serde_json::to_vec(body).unwrap(),
    )
    .map(|r| r.0)
    .unwrap_or(0)
}

/// Register via A, list via B; expiry by either; kill -9 A under heartbeats → B carries
/// on; restart A → same state.
fn two_controllers(kind: Db) {
    let env = TestEnv::new();
    let db = TestDb::new(kind);
    let (pa, pb) = (free_port(), free_port());
    let mut a = start(&env, &db, pa);
    let b = start(&env, &db, pb);
    assert_eq!(
        post(pa, "/api/controller/models", &instance("w@llm", 7001)),
        200
    );
    assert_eq!(names(&list(pb, false)), ["w@llm:7001"]);
    // Silent instance registered via B is expired (by either sweep), seen by both.
    assert_eq!(
        post(pb, "/api/controller/models", &instance("quiet@llm", 1)),
        200
    );
    // A worker heartbeating w@llm to A (falling back to B when A is gone). A controller
    // answers 503 for a moment after any failed database round trip (a pool wait past its
    // bound on a loaded machine), so single heartbeats may fail; what must never happen is a
    // gap long enough for the instance to expire: the longest run of failed heartbeats is
    // measured in time.
    let stop = Arc::new(AtomicBool::new(false));
    let longest_gap = Arc::new(Mutex::new(Duration::ZERO));
    let hb = {
        let (stop, longest_gap) = (stop.clone(), longest_gap.clone());
        std::thread::spawn(move || {
            let mut last_ok = std::time::Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let ok = [pa, pb].iter().any(|p| {
                    post(*p, "/api/controller/heartbeat", &instance("w@llm", 7001)) == 200
                });
                if ok {
                    last_ok = std::time::Instant::now();
                } else {
                    let mut g = longest_gap.lock().unwrap();
                    *g = (*g).max(last_ok.elapsed());
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    assert!(
        wait_until(Duration::from_secs(20), || {
            db.query(&format!(
                "SELECT CAST(COUNT(*) AS {}) FROM $DB.dbgpt_cluster_registry_instance WHERE model_name = 'quiet@llm' AND NOT healthy",
                if kind == Db::My { "SIGNED" } else { "BIGINT" }
            )) == ["1"]
        }),
        "the silent instance was never marked unhealthy in the table"
    );
    assert_eq!(names(&list(pa, true)), ["w@llm:7001"]);
    assert_eq!(names(&list(pb, true)), ["w@llm:7001"]);
    a.kill9();
    // Longer than the timeout: the heartbeats through B keep it alive.
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(names(&list(pb, true)), ["w@llm:7001"], "{}", b.logs());
    let before = list(pb, false);
    let a2 = start(&env, &db, pa);
    let after = list(pa, false);
    assert_eq!(names(&after), names(&before));
    assert_eq!(names(&list(pa, true)), ["w@llm:7001"]);
    stop.store(true, Ordering::Relaxed);
    hb.join().unwrap();
    // Well inside the 6 s heartbeat timeout: the instance was never close to expiring.
    let gap = *longest_gap.lock().unwrap();
    assert!(
        gap < Duration::from_secs(4),
        "no controller took a heartbeat for {gap:?}; A:\n{}\nB:\n{}",
        a2.logs(),
        b.logs()
    );
    assert_eq!(db.rows_of("w@llm"), 1);
    drop((a2, b));
}

#[test]
fn sql_mysql_two_controllers_share_state_and_fail_over() {
    two_controllers(Db::My);
}

#[test]
fn sql_postgres_two_controllers_share_state_and_fail_over() {
    two_controllers(Db::Pg);
}

/// 200 concurrent registrations of one instance through both controllers → one row; then
/// connections killed under heartbeat load → both controllers recover by themselves.
fn concurrency_and_connection_kill(kind: Db) {
    let env = TestEnv::new();
    let db = TestDb::new(kind);
    let (pa, pb) = (free_port(), free_port());
    let a = start(&env, &db, pa);
    let b = start(&env, &db, pb);
    let threads: Vec<_> = (0..200)
        .map(|i| {
            let port = if i % 2 == 0 { pa } else { pb };
            std::thread::spawn(move || post(port, "/api/controller/models", &instance("c@llm", 9)))
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 200);
    }
    assert_eq!(db.rows_of("c@llm"), 1);
    assert_eq!(names(&list(pa, false)), ["c@llm:9"]);

    // Heartbeat load through both while the server kills their connections.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..4)
        .map(|t| {
            let (stop, ok) = (stop.clone(), ok.clone());
            std::thread::spawn(move || {
                let mut i = 0u16;
                while !stop.load(Ordering::Relaxed) {
                    let port = if t % 2 == 0 { pa } else { pb };
                    let inst = instance(&format!("load{t}@llm"), 100 + (i % 20));
                    if post(port, "/api/controller/heartbeat", &inst) == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    i = i.wrapping_add(1);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut killed = 0;
    for _ in 0..3 {
        killed += db.kill_connections();
        std::thread::sleep(Duration::from_millis(1300));
    }
    assert!(killed >= 2, "only {killed} connections were killed");
    std::thread::sleep(Duration::from_millis(1500));
    let before = ok.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        ok.load(Ordering::Relaxed) > before,
        "heartbeats stopped succeeding"
    );
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    // Writes work again through both, without a restart.
    assert_eq!(
        post(pa, "/api/controller/models", &instance("after@llm", 1)),
        200
    );
    assert_eq!(
        post(pb, "/api/controller/models", &instance("after@llm", 2)),
        200
    );
    assert!(wait_until(Duration::from_secs(5), || {
        let l = list(pa, false);
        l.len() == 1 + 4 * 20 + 2 && list(pb, false).len() == l.len()
    }));
    drop((a, b));
}

#[test]
fn sql_mysql_concurrency_and_killed_connections() {
    concurrency_and_connection_kill(Db::My);
}

#[test]
fn sql_postgres_concurrency_and_killed_connections() {
    concurrency_and_connection_kill(Db::Pg);
}

/// The password (from the environment or a file) shows in no log, no `ctl status`, no help.
#[test]
fn sql_password_stays_hidden() {
    let env = TestEnv::new();
    let db = TestDb::new(Db::My);
    let user = format!("u{}", &db.name[10..20]);
    let pw = "Zq9-very-secret-pw";
    admin(
        Db::My,
        &format!("CREATE USER '{user}'@'%' IDENTIFIED BY '{pw}'"),
    );
    admin(
        Db::My,
        &format!("GRANT ALL PRIVILEGES ON {}.* TO '{user}'@'%'", db.name),
    );
    let port = free_port();
    let port_s = port.to_string();
    std::fs::create_dir_all(env.log_dir()).unwrap();
    let log = env.log_dir().join("controller-pw.out");
    let f = std::fs::File::create(&log).unwrap();
    let child = env
        .cmd()
        .args([
            "start",
            "controller",
            "--host",
            "127.0.0.1",
            "--port",
            &port_s,
            "--registry_type",
            "database",
            "--registry_db_host",
            "127.0.0.1",
            "--registry_db_user",
            &user,
            "--registry_db_name",
            &db.name,
            "--log_level",
            "debug",
        ])
        .env("CONTROLLER_REGISTRY_DB_PASSWORD", pw)
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    let mut d = Daemon {
        child: Some(child),
        port,
        log,
    };
    d.wait_healthy();
    assert_eq!(
        post(port, "/api/controller/models", &instance("p@llm", 1)),
        200
    );
    let out = env.run(&["ctl", "status", "--json"]);
    let status = stdout(&out);
    assert!(
        status.contains(&format!("mysql://{user}@127.0.0.1:3306/")),
        "{status}"
    );
    assert!(!status.contains(pw), "{status}");
    let help = env
        .cmd()
        .args(["start", "controller", "--help"])
        .env("CONTROLLER_REGISTRY_DB_PASSWORD", pw)
        .output()
        .unwrap();
    let help = stdout(&help);
    assert!(help.contains("--registry_db_password_file"), "{help}");
    assert!(!help.contains(pw));
    d.terminate();
    let logs: String = std::fs::read_dir(env.log_dir())
        .map(|rd| {
            rd.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(logs.contains("SQL registry opened"), "{logs}");
    assert!(!logs.contains(pw));
    // The password file works as well.
    let f = env.path("pw");
    std::fs::write(&f, format!("{pw}\n")).unwrap();
    let port2 = free_port();
    let c = env.controller_on(
        port2,
        &env.path("unused.redb"),
        &[
            "--registry_type",
            "database",
            "--registry_db_host",
            "127.0.0.1",
            "--registry_db_user",
            &user,
            "--registry_db_name",
            &db.name,
            "--registry_db_password_file",
            f.to_str().unwrap(),
        ],
    );
    assert_eq!(names(&list(port2, false)), ["p@llm:1"]);
    drop(c);
    admin(Db::My, &format!("DROP USER '{user}'@'%'"));
}

/// Bad settings: one line naming the flag, exit 1; an unreachable server is named.
#[test]
fn sql_bad_settings_and_unreachable_server() {
    let env = TestEnv::new();
    for (args, needle) in [
        (
            vec!["--registry_db_type", "oracle", "--registry_db_host", "h"],
            "--registry_db_type",
        ),
        (vec!["--registry_db_type", "mysql"], "--registry_db_host"),
    ] {
        let mut all = vec!["start", "controller", "--registry_type", "database"];
        all.extend(args);
        let out = env.run(&all);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(needle), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    let dead = free_port().to_string();
    let port = free_port();
    let mut d = env.spawn(
        &[
            "start",
            "controller",
            "--port",
            &port.to_string(),
            "--registry_type",
            "database",
            "--registry_db_host",
            "127.0.0.1",
            "--registry_db_port",
            &dead,
        ],
        port,
        "controller",
    );
    // It gives up by itself (the wait is only a bound) and at once: without
    // --registry_db_wait there is no retry.
    let status = d.wait_exit(Duration::from_secs(120)).unwrap_or_else(|| {
        panic!(
            "a controller whose database is unreachable must exit, not hang:\n{}",
            d.logs()
        )
    });
    let err = d.logs();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{dead}")), "{err}");
    assert!(!err.contains("retrying"), "{err}");
}
