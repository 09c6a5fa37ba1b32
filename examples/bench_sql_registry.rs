//! Heartbeat benchmark of the controller's registries: the embedded redb store (one
//! controller) beside the SQL registry on MariaDB and on PostgreSQL (two controllers on one
//! database each), with N instances heartbeating through keep-alive HTTP/1.1 connections on
//! loopback. Bounded in time and request count; prints one Markdown table.
//!
//! Usage: `cargo run --release --example bench_sql_registry -- BIN [instances] [seconds]
//! [concurrency]` (see `scripts/bench-sql-registry.sh`). Needs MariaDB on 127.0.0.1:3306
//! (root, no password) and PostgreSQL on 127.0.0.1:5432 (postgres, trust).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::{AssertSqlSafe, ConnectOptions, Row};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MAX_REQUESTS: usize = 2_000_000;

#[derive(Clone, Copy, PartialEq)]
enum Store {
    Redb,
    Mysql,
    Postgres,
}

impl Store {
    fn label(self) -> &'static str {
        match self {
            Store::Redb => "redb (1 controller)",
            Store::Mysql => "MariaDB (2 controllers)",
            Store::Postgres => "PostgreSQL (2 controllers)",
        }
    }
}

async fn admin(store: Store, sql: String) -> Vec<i64> {
    admin_in(store, "postgres", sql).await
}

/// Runs `sql` (PostgreSQL: in database `pg_db`); returns the first column as integers.
async fn admin_in(store: Store, pg_db: &str, sql: String) -> Vec<i64> {
    match store {
        Store::Mysql => {
            let mut c = sqlx::mysql::MySqlConnectOptions::new()
                .host("127.0.0.1")
                .port(3306)
                .username("root")
                .ssl_mode(sqlx::mysql::MySqlSslMode::Disabled)
                .connect()
                .await
                .expect("MariaDB on 127.0.0.1:3306");
            let rows = sqlx::query(AssertSqlSafe(sql))
                .fetch_all(&mut c)
                .await
                .unwrap();
            rows.iter().filter_map(|r| r.try_get(0).ok()).collect()
        }
        Store::Postgres => {
            let mut c = sqlx::postgres::PgConnectOptions::new()
                .host("127.0.0.1")
                .port(5432)
                .username("postgres")
                .database(pg_db)
                .ssl_mode(sqlx::postgres::PgSslMode::Disable)
                .connect()
                .await
                .expect("PostgreSQL on 127.0.0.1:5432");
            let rows = sqlx::query(AssertSqlSafe(sql))
                .fetch_all(&mut c)
                .await
                .unwrap();
            rows.iter().filter_map(|r| r.try_get(0).ok()).collect()
        }
        Store::Redb => Vec::new(),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(bin: &str, dir: &std::path::Path, port: u16, extra: &[String]) -> Child {
    let log = std::fs::File::create(dir.join(format!("controller-{port}.log"))).unwrap();
    Command::new(bin)
        .args([
            "start",
            "controller",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--log_level",
            "warn",
            "--registry_path",
            dir.join(format!("r-{port}.redb")).to_str().unwrap(),
        ])
        .args(extra)
        .env("DBGPT_RUNTIME_DIR", dir.join("run"))
        .env("DBGPT_LOG_DIR", dir.join("log"))
        .env("DBGPT_STATE_DIR", dir.join("state"))
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// A keep-alive HTTP/1.1 connection.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(port: u16) -> std::io::Result<Conn> {
        let s = TcpStream::connect(("127.0.0.1", port)).await?;
        s.set_nodelay(true)?;
        Ok(Conn {
            s,
            buf: Vec::with_capacity(4096),
        })
    }

    /// POSTs JSON; returns the status.
    async fn post(&mut self, path: &str, body: &str) -> std::io::Result<u16> {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.s.write_all(req.as_bytes()).await?;
        self.buf.clear();
        let mut tmp = [0u8; 4096];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                let status: u16 = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while self.buf.len() < end + 4 + len {
                    let n = self.s.read(&mut tmp).await?;
                    if n == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    self.buf.extend_from_slice(&tmp[..n]);
                }
                return Ok(status);
            }
            let n = self.s.read(&mut tmp).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }
}

fn body(i: usize) -> String {
    format!(
        r#"{{"model_name":"bench{}@llm","host":"10.0.{}.{}","port":{},"weight":1.0,"check_healthy":true,"healthy":false,"enabled":true,"prompt_template":null,"last_heartbeat":null}}"#,
        i % 10,
        i / 250,
        i % 250,
        8000 + i
    )
}

async fn wait_up(port: u16, dir: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(mut c) = Conn::open(port).await
            && c.post("/api/controller/heartbeat", "{}").await.is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log =
        std::fs::read_to_string(dir.join(format!("controller-{port}.log"))).unwrap_or_default();
    panic!("controller on {port} did not come up:\n{log}");
}

struct Outcome {
    ok: usize,
    errors: usize,
    secs: f64,
    p50: Duration,
    p99: Duration,
    rows: Option<i64>,
}

async fn run(bin: &str, store: Store, n: usize, secs: u64, conc: usize) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("dbgpt_bench_{}", uuid::Uuid::new_v4().simple());
    let mut extra: Vec<String> = Vec::new();
    match store {
        Store::Redb => {}
        Store::Mysql | Store::Postgres => {
            admin(store, format!("CREATE DATABASE {db}")).await;
            let url = if store == Store::Mysql {
                format!("mysql://root@127.0.0.1:3306/{db}")
            } else {
                format!("postgresql://postgres@127.0.0.1:5432/{db}")
            };
            extra.extend(["--registry_type".into(), "database".into()]);
            extra.extend(["--registry_db_url".into(), url]);
        }
    }
    let ports: Vec<u16> = if store == Store::Redb {
        vec![free_port()]
    } else {
        vec![free_port(), free_port()]
    };
    let mut children: Vec<Child> = ports
        .iter()
        .map(|p| start(bin, dir.path(), *p, &extra))
        .collect();
    for p in &ports {
        wait_up(*p, dir.path()).await;
    }
    // Register every instance (half through each controller).
    let mut c = Conn::open(ports[0]).await.unwrap();
    let mut c2 = Conn::open(ports[ports.len() - 1]).await.unwrap();
    for i in 0..n {
        let conn = if i % 2 == 0 { &mut c } else { &mut c2 };
        assert_eq!(
            conn.post("/api/controller/models", &body(i)).await.unwrap(),
            200
        );
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let per_task = MAX_REQUESTS / conc;
    let mut tasks = Vec::new();
    for t in 0..conc {
        let port = ports[t % ports.len()];
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(16 * 1024);
            let mut errors = 0;
            let mut conn = Conn::open(port).await.unwrap();
            let mut i = t;
            while Instant::now() < deadline && lat.len() < per_task {
                let b = body(i % n);
                let t0 = Instant::now();
                match conn.post("/api/controller/heartbeat", &b).await {
                    Ok(200) => lat.push(t0.elapsed()),
                    Ok(_) => errors += 1,
                    Err(_) => {
                        errors += 1;
                        conn = Conn::open(port).await.unwrap();
                    }
                }
                i += conc;
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let (p50, p99) = (pct(0.50), pct(0.99));
    for ch in &mut children {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(ch.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = ch.wait();
    }
    let rows = match store {
        Store::Redb => None,
        Store::Mysql => {
            let v = admin(
                store,
                format!(
                    "SELECT CAST(COUNT(*) AS SIGNED) FROM {db}.dbgpt_cluster_registry_instance"
                ),
            )
            .await;
            admin(store, format!("DROP DATABASE {db}")).await;
            v.first().copied()
        }
        Store::Postgres => {
            let v = admin_in(
                store,
                &db,
                "SELECT COUNT(*) FROM dbgpt_cluster_registry_instance".into(),
            )
            .await;
            admin(store, format!("DROP DATABASE {db} WITH (FORCE)")).await;
            v.first().copied()
        }
    };
    Outcome {
        ok: all.len(),
        errors,
        secs: elapsed,
        p50,
        p99,
        rows,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bin = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "target/release/dbgpt".into());
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let secs: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(10);
    let conc: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(32);
    println!(
        "{n} instances, {conc} keep-alive connections, {secs} s per store, loopback, {} CPUs\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!("| registry | heartbeats/s | p50 ms | p99 ms | errors | rows after |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for store in [Store::Redb, Store::Mysql, Store::Postgres] {
        let o = run(&bin, store, n, secs, conc).await;
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {} | {} |",
            store.label(),
            o.ok as f64 / o.secs,
            o.p50.as_secs_f64() * 1e3,
            o.p99.as_secs_f64() * 1e3,
            o.errors,
            o.rows.map(|r| r.to_string()).unwrap_or_else(|| "-".into())
        );
    }
}
