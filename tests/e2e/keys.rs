//! Managed API keys on the controller (redb store) through the real binary: `dbgpt keys
//! create|list|show|update|revoke|usage`, bad input that names the flag or key and changes
//! nothing, an apiserver's sync adding usage (posted here as an apiserver would), and keys
//! and usage surviving a `kill -9` of the controller; with the SQL registry, two controllers
//! sharing keys and usage through MariaDB or PostgreSQL.

use std::process::Output;

use serde_json::{Value, json};

use crate::common::*;

fn keys(env: &TestEnv, url: &str, args: &[&str]) -> Output {
    let mut all = vec!["keys"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--address", url]);
    env.run(&all)
}

/// Runs a `dbgpt keys` command that must succeed; returns its stdout.
fn ok(env: &TestEnv, url: &str, args: &[&str]) -> String {
    let o = keys(env, url, args);
    assert!(
        o.status.success(),
        "dbgpt keys {args:?} failed: {}{}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Runs a `dbgpt keys` command that must fail; returns its stderr.
fn fails(env: &TestEnv, url: &str, args: &[&str]) -> String {
    let o = keys(env, url, args);
    assert!(
        !o.status.success(),
        "dbgpt keys {args:?} should have failed: {}",
        stdout(&o)
    );
    stderr(&o)
}

fn json_of(env: &TestEnv, url: &str, args: &[&str]) -> Value {
    let out = ok(env, url, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

fn today() -> String {
    chrono::Utc::now().format("%Y-%m-%d").to_string()
}

/// The whole CLI cycle, the sync, and a `kill -9` restart on the same registry file.
#[test]
fn keys_cli_sync_and_restart() {
    let env = TestEnv::new();
    let port = free_port();
    let registry = env.path("registry.redb");
    let mut c = env.controller_on(port, &registry, &[]);
    let url = c.url();

    let o = keys(
        &env,
        &url,
        &[
            "create",
            "--name",
            "team-a",
            "--models",
            "m1,m2",
            "--rpm",
            "60",
            "--tpm",
            "1000",
            "--max_concurrency",
            "2",
            "--daily_tokens",
            "100000",
            "--priority",
            "batch",
            "--expires",
            "30d",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let secret = out
        .lines()
        .find(|l| l.starts_with("sk-dbgpt-"))
        .unwrap_or_else(|| panic!("no secret printed: {out}"))
        .to_string();
    assert!(
        stderr(&o).contains("shown only this once"),
        "{}",
        stderr(&o)
    );
    ok(&env, &url, &["create", "--name", "team-b"]);

    let table = ok(&env, &url, &["list"]);
    let a_line = table.lines().find(|l| l.starts_with("team-a")).unwrap();
    for want in [
        "m1,m2",
        "rpm=60",
        "tpm=1000",
        "concurrency=2",
        "daily_tokens=100000",
        "batch",
        "active",
    ] {
        assert!(a_line.contains(want), "{want} missing: {table}");
    }
    let a = json_of(&env, &url, &["show", "team-a", "--json"]);
    let id = a["id"].as_str().unwrap().to_string();
    assert!(secret.starts_with(&format!("sk-dbgpt-{id}-")), "{secret}");
    // The store keeps a salted hash, never the secret.
    assert!(a.get("secret").is_none());
    assert_eq!(a["hash"].as_str().unwrap().len(), 64);
    let expires = a["expires_at"].as_i64().unwrap();
    let in_30d = chrono::Utc::now().timestamp() + 30 * 86_400;
    assert!((expires - in_30d).abs() < 120, "{expires} vs {in_30d}");
    assert!(ok(&env, &url, &["show", &id]).contains("team-a"));

    // Update: one limit removed, one changed, the rest kept.
    ok(
        &env,
        &url,
        &["update", "team-a", "--rpm", "none", "--tpm", "5"],
    );
    let a2 = json_of(&env, &url, &["show", "team-a", "--json"]);
    assert!(a2["limits"].get("rpm").is_none(), "{a2}");
    assert_eq!(a2["limits"]["tpm"], 5);
    assert_eq!(a2["limits"]["daily_tokens"], 100000);
    assert!(a2["version"].as_u64() > a["version"].as_u64());

    // An apiserver's report, as the apiservers post it every second or so.
    let min = chrono::Utc::now().timestamp() / 60;
    let report = json!({
        "apiserver": "127.0.0.1:1/1",
        "since_version": 0,
        "usage": [
            {"key_id": id, "model": "m1", "day": today(), "requests": 3,
             "prompt_tokens": 30, "completion_tokens": 12},
            {"key_id": id, "model": "m2", "day": "2026-01-02", "requests": 1,
             "prompt_tokens": 1, "completion_tokens": 1},
        ],
        "minute": [{"key_id": id, "minute": min, "requests": 3, "tokens": 42}],
    });
    let (status, answer) = json_req(port, "POST", "/api/controller/keys-sync", Some(&report));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["keys"].as_array().unwrap().len(), 2, "{answer}");
    assert_eq!(answer["daily_tokens"][&id], 42, "{answer}");
    assert_eq!(answer["minute"][0]["tokens"], 42, "{answer}");
    // The same report again adds to it.
    let since = answer["version"].as_u64().unwrap();
    let mut again = report.clone();
    again["since_version"] = json!(since);
    let (status, answer) = json_req(port, "POST", "/api/controller/keys-sync", Some(&again));
    assert_eq!(status, 200, "{answer}");
    assert!(answer["keys"].as_array().unwrap().is_empty(), "{answer}");
    assert_eq!(answer["daily_tokens"][&id], 84, "{answer}");
    // A malformed report is refused naming the field, and adds nothing.
    let mut bad = report.clone();
    bad["usage"][0]["day"] = json!("yesterday");
    let (status, answer) = json_req(port, "POST", "/api/controller/keys-sync", Some(&bad));
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["detail"].as_str().unwrap().contains("usage[0].day"),
        "{answer}"
    );

    let usage = json_of(&env, &url, &["usage", "--json"]);
    let rows = usage.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{usage}");
    let m1 = rows.iter().find(|r| r["model"] == "m1").unwrap();
    assert_eq!(m1["key_name"], "team-a");
    assert_eq!(m1["day"], today());
    assert_eq!(
        (
            &m1["requests"],
            &m1["prompt_tokens"],
            &m1["completion_tokens"]
        ),
        (&json!(6), &json!(60), &json!(24))
    );
    let recent = json_of(
        &env,
        &url,
        &["usage", "team-a", "--since", &today(), "--json"],
    );
    assert_eq!(recent.as_array().unwrap().len(), 1, "{recent}");
    let table = ok(&env, &url, &["usage", "team-a"]);
    assert!(
        table.contains("team-a") && table.contains("m1") && table.contains("84"),
        "{table}"
    );
    assert!(
        json_of(&env, &url, &["usage", "team-b", "--json"])
            .as_array()
            .unwrap()
            .is_empty()
    );

    assert!(ok(&env, &url, &["revoke", "team-b"]).contains("revoked"));
    let table = ok(&env, &url, &["list"]);
    let b_line = table.lines().find(|l| l.starts_with("team-b")).unwrap();
    assert!(b_line.contains("revoked"), "{table}");

    // kill -9 and start again on the same file: keys, versions and usage are all there.
    let keys_before = json_of(&env, &url, &["list", "--json"]);
    let usage_before = json_of(&env, &url, &["usage", "--json"]);
    c.kill9();
    let c2 = env.controller_on(port, &registry, &[]);
    let url = c2.url();
    assert_eq!(json_of(&env, &url, &["list", "--json"]), keys_before);
    assert_eq!(json_of(&env, &url, &["usage", "--json"]), usage_before);
    // The name of a revoked key stays taken; new keys get newer versions.
    let e = fails(&env, &url, &["create", "--name", "team-b"]);
    assert!(e.contains("team-b") && e.contains("exists"), "{e}");
    ok(&env, &url, &["create", "--name", "team-c"]);
    let c_key = json_of(&env, &url, &["show", "team-c", "--json"]);
    let max_before = keys_before
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["version"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(c_key["version"].as_u64().unwrap() > max_before);
}

/// Bad flags and unknown keys: a message naming the flag or key, a failing exit, and the
/// stored keys exactly as before.
#[test]
fn bad_key_input_names_the_flag_and_changes_nothing() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let url = c.url();
    ok(
        &env,
        &url,
        &[
            "create",
            "--name",
            "team-a",
            "--rpm",
            "10",
            "--expires",
            "2h",
        ],
    );
    // Limits per model: set at creation, one removed by an update, the rest kept.
    ok(
        &env,
        &url,
        &[
            "create",
            "--name",
            "team-m",
            "--model_limit",
            "smollm2:rpm=5,tpm=100",
            "--model_limit",
            "qwen:max_concurrency=1",
        ],
    );
    ok(
        &env,
        &url,
        &[
            "update",
            "team-m",
            "--model_limit",
            "smollm2:rpm=none",
            "--model_limit",
            "qwen:none",
        ],
    );
    let m = json_of(&env, &url, &["show", "team-m", "--json"]);
    assert_eq!(m["model_limits"], json!({"smollm2": {"tpm": 100}}), "{m}");
    let before = json_of(&env, &url, &["list", "--json"]);

    let cases: &[(&[&str], &str)] = &[
        (&["create", "--name", "x", "--rpm", "-1"], "--rpm"),
        (&["create", "--name", "x", "--rpm", "0"], "--rpm"),
        (&["create", "--name", "x", "--tpm", "lots"], "--tpm"),
        (&["create", "--name", "x", "--expires", "3x"], "--expires"),
        (
            &["create", "--name", "x", "--expires", "2001-01-01"],
            "--expires",
        ),
        (
            &["create", "--name", "x", "--priority", "urgent"],
            "--priority",
        ),
        (&["create", "--name", "x", "--rpm", "none"], "--rpm"),
        (&["create", "--name", "bad name"], "--name"),
        (&["create", "--name", "team-a"], "team-a"),
        (&["update", "team-a", "--rpm", "-1"], "--rpm"),
        (&["update", "team-a", "--rpm", "0"], "--rpm"),
        (&["update", "team-a", "--expires", "3x"], "--expires"),
        (&["update", "team-a"], "nothing to change"),
        (&["update", "nobody", "--rpm", "5"], "nobody"),
        (&["update", "nobody", "--model_limit", "m:rpm=5"], "nobody"),
        (
            &["update", "team-m", "--model_limit", "m:rpm=0"],
            "--model_limit",
        ),
        (
            &["create", "--name", "x", "--model_limit", "m:rps=1"],
            "--model_limit",
        ),
        (&["show", "nobody"], "nobody"),
        (&["revoke", "nobody"], "nobody"),
        (&["usage", "nobody"], "nobody"),
        (&["usage", "--since", "last week"], "--since"),
    ];
    for (args, names) in cases {
        let e = fails(&env, &url, args);
        assert!(e.contains(names), "{args:?}: {e}");
        assert!(!e.contains("panicked"), "{args:?}: {e}");
    }
    assert_eq!(json_of(&env, &url, &["list", "--json"]), before);

    // The routes themselves refuse bad input naming the field (400/404/409).
    let port = c.port;
    let (s, b) = json_req(
        port,
        "POST",
        "/api/controller/keys",
        Some(&json!({"name": "y", "limits": {"rpm": 0}})),
    );
    assert_eq!(s, 400, "{b}");
    assert!(b["detail"].as_str().unwrap().contains("rpm"), "{b}");
    let (s, b) = json_req(
        port,
        "POST",
        "/api/controller/keys",
        Some(&json!({"name": "team-a"})),
    );
    assert_eq!(s, 409, "{b}");
    let (s, b) = json_req(
        port,
        "POST",
        "/api/controller/keys",
        Some(&json!({"name": "z", "limits": {"tpm": -1}})),
    );
    assert_eq!(s, 400, "{b}");
    assert!(b["detail"].as_str().unwrap().contains("limits.tpm"), "{b}");
    let (s, b) = json_req(
        port,
        "POST",
        "/api/controller/keys-sync",
        Some(
            &json!({"apiserver": "a", "since_version": 0, "usage": [], "minute": [{"key_id": "k", "minute": "now"}]}),
        ),
    );
    assert_eq!(s, 400, "{b}");
    assert!(
        b["detail"].as_str().unwrap().contains("minute[0].minute"),
        "{b}"
    );
    let (s, b) = json_req(
        port,
        "PATCH",
        "/api/controller/keys/nobody",
        Some(&json!({"rpm": 3})),
    );
    assert_eq!(s, 404, "{b}");
    assert!(b["detail"].as_str().unwrap().contains("nobody"), "{b}");
    let (s, b) = json_req(port, "GET", "/api/controller/keys-usage?since=soon", None);
    assert_eq!(s, 400, "{b}");
    assert!(b["detail"].as_str().unwrap().contains("since"), "{b}");
    assert_eq!(json_of(&env, &url, &["list", "--json"]), before);
}

/// Two controllers on one SQL database: a key made through one is seen, changed and
/// revoked through the other, both controllers' syncs add up, and the table holds the
/// salted hash, never the secret.
fn two_sql_controllers_share_keys(kind: crate::sql::Db) {
    let env = TestEnv::new();
    let db = crate::sql::TestDb::new(kind);
    let a = crate::sql::start(&env, &db, free_port());
    let b = crate::sql::start(&env, &db, free_port());
    let (ua, ub) = (a.url(), b.url());
    let out = ok(&env, &ua, &["create", "--name", "team-a", "--rpm", "10"]);
    let secret = out
        .lines()
        .find(|l| l.starts_with("sk-dbgpt-"))
        .unwrap()
        .to_string();
    let key = json_of(&env, &ub, &["show", "team-a", "--json"]);
    let id = key["id"].as_str().unwrap().to_string();
    assert_eq!(key["limits"]["rpm"], 10);
    let e = fails(&env, &ub, &["create", "--name", "team-a"]);
    assert!(e.contains("exists"), "{e}");
    ok(&env, &ub, &["update", "team-a", "--tpm", "500"]);
    assert_eq!(
        json_of(&env, &ua, &["show", "team-a", "--json"])["limits"]["tpm"],
        500
    );
    let report = json!({
        "apiserver": "a",
        "since_version": 0,
        "usage": [{"key_id": id, "model": "m1", "day": today(), "requests": 1,
                   "prompt_tokens": 10, "completion_tokens": 5}],
        "minute": [],
    });
    for port in [a.port, b.port, a.port] {
        let (s, v) = json_req(port, "POST", "/api/controller/keys-sync", Some(&report));
        assert_eq!(s, 200, "{v}");
    }
    let (_, v) = json_req(b.port, "POST", "/api/controller/keys-sync", Some(&report));
    assert_eq!(v["daily_tokens"][&id], 60, "{v}");
    let usage = json_of(&env, &ua, &["usage", "team-a", "--json"]);
    assert_eq!(usage[0]["requests"], 4, "{usage}");
    ok(&env, &ub, &["revoke", "team-a"]);
    assert!(json_of(&env, &ua, &["show", "team-a", "--json"])["revoked_at"].is_i64());
    let records = db.query("SELECT record FROM $DB.dbgpt_api_keys");
    assert_eq!(records.len(), 1);
    assert!(!records[0].contains(&secret), "{}", records[0]);
    assert!(records[0].contains(key["hash"].as_str().unwrap()));
}

#[test]
fn sql_mysql_controllers_share_keys() {
    two_sql_controllers_share_keys(crate::sql::Db::My);
}

#[test]
fn sql_postgres_controllers_share_keys() {
    two_sql_controllers_share_keys(crate::sql::Db::Pg);
}

/// A report larger than the other routes' 1 MiB body cap (what an apiserver holds after a
/// while without its controller) is taken whole, in one transaction.
#[test]
fn a_large_usage_report_is_taken_whole() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let url = c.url();
    ok(&env, &url, &["create", "--name", "bulk"]);
    let id = json_of(&env, &url, &["show", "bulk", "--json"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let usage: Vec<Value> = (0..8000)
        .map(|i| {
            json!({"key_id": id, "model": format!("model-with-a-longish-name-{i}"),
                   "day": today(), "requests": 1, "prompt_tokens": 2, "completion_tokens": 3})
        })
        .collect();
    let report = json!({"apiserver": "a", "since_version": 0, "usage": usage, "minute": []});
    assert!(serde_json::to_vec(&report).unwrap().len() > 1 << 20);
    let (status, answer) = json_req(c.port, "POST", "/api/controller/keys-sync", Some(&report));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["daily_tokens"][&id], 8000 * 5, "{answer}");
    let rows = json_of(&env, &url, &["usage", "bulk", "--json"]);
    assert_eq!(rows.as_array().unwrap().len(), 8000);
}
