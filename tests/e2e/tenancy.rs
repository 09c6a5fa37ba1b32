//! Managed API keys in the apiserver (issue 17) with the real binary: keys created with
//! `dbgpt keys`, the apiserver open until the controller has a key, 401 for revoked and
//! expired keys, 403 for a model outside a key's list, 429 with OpenAI's headers, tokens of
//! whole and streamed answers in `dbgpt keys usage` and `/metrics`, usage surviving an
//! apiserver restart, and two apiservers sharing a key's limits through two controllers on
//! one MariaDB database. The upstream is the proxy worker in front of a fake OpenAI server
//! (every answer: 9 prompt and 3 completion tokens).

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;
use crate::sql::{Db, TestDb};
use crate::worker::FakeUpstream;

/// Runs `dbgpt keys ARGS --address URL`, which must succeed; its stdout.
fn keys(env: &TestEnv, url: &str, args: &[&str]) -> String {
    let mut all = vec!["keys"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--address", url]);
    let o = env.run(&all);
    assert!(
        o.status.success(),
        "dbgpt keys {args:?}: {}{}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// `dbgpt keys create --name NAME ARGS…`: the secret it prints.
fn create(env: &TestEnv, url: &str, name: &str, args: &[&str]) -> String {
    let mut all = vec!["create", "--name", name];
    all.extend_from_slice(args);
    let out = keys(env, url, &all);
    out.lines()
        .find(|l| l.starts_with("sk-dbgpt-"))
        .unwrap_or_else(|| panic!("no secret printed: {out}"))
        .to_string()
}

/// A key's usage from `dbgpt keys usage NAME --json`: (requests, prompt, completion).
fn usage(env: &TestEnv, url: &str, name: &str) -> (u64, u64, u64) {
    let rows: Vec<Value> = serde_json::from_str(&keys(env, url, &["usage", name, "--json"]))
        .expect("usage --json is a JSON list");
    let sum = |k: &str| rows.iter().map(|r| r[k].as_u64().unwrap()).sum::<u64>();
    (
        sum("requests"),
        sum("prompt_tokens"),
        sum("completion_tokens"),
    )
}

/// A chat request for `model` with the bearer `key`.
fn chat(port: u16, key: Option<&str>, model: &str, stream: bool) -> RawResponse {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let body = json!({"model": model, "stream": stream,
        "messages": [{"role": "user", "content": "hi"}]});
    raw_http(
        port,
        "POST",
        "/v1/chat/completions",
        &headers,
        &serde_json::to_vec(&body).unwrap(),
    )
    .expect("no HTTP answer")
}

fn header<'a>(r: &'a RawResponse, name: &str) -> Option<&'a str> {
    r.1.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn error_of(r: &RawResponse) -> Value {
    let v: Value = serde_json::from_slice(&r.2)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&r.2)));
    v["error"].clone()
}

/// The proxy worker serving `gpt` in front of `up`.
fn gpt_worker(env: &TestEnv, controller: &str, up: &FakeUpstream) -> Daemon {
    let base = format!("http://127.0.0.1:{}/v1", up.port);
    crate::worker::worker(
        env,
        controller,
        &[
            "--model_name",
            "gpt",
            "--model_type",
            "proxy",
            "--proxy_api_base",
            &base,
            "--proxy_api_key",
            "sk-test",
        ],
    )
}

/// Waits until the apiserver on `port` serves `gpt` to `key`.
fn wait_served(port: u16, key: Option<&str>) {
    assert!(
        wait_until(Duration::from_secs(20), || chat(port, key, "gpt", false).0
            == 200),
        "the apiserver never served gpt"
    );
}

/// The apiserver's `/metrics` series as `name{labels}` → value.
fn scrape(port: u16) -> (String, Vec<(String, f64)>) {
    let (_, _, b) = raw_http(port, "GET", "/metrics", &[], b"").unwrap();
    let text = String::from_utf8_lossy(&b).to_string();
    let series = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect();
    (text, series)
}

fn metric(series: &[(String, f64)], key: &str) -> f64 {
    series
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| *v)
        .unwrap_or(0.0)
}

#[test]
fn managed_keys_auth_limits_usage_and_metrics() {
    let up = FakeUpstream::start(Duration::ZERO);
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let url = c.url();
    let _w = gpt_worker(&env, &url, &up);
    let a = apiserver(&env, &url, &["--keys_sync_ms", "200"]);
    // No static key, no managed key: open, as before.
    wait_served(a.port, None);

    let team = create(
        &env,
        &url,
        "team-a",
        &["--models", "gpt", "--rpm", "4", "--tpm", "100000"],
    );
    let other = create(&env, &url, "other", &["--models", "elsewhere"]);
    // Keys are required as soon as the apiserver learns the controller has some.
    assert!(
        wait_until(Duration::from_secs(10), || chat(a.port, None, "gpt", false)
            .0
            == 401),
        "the apiserver stayed open after a managed key was created"
    );
    let wrong = chat(a.port, Some("sk-dbgpt-zzzz-bogus"), "gpt", false);
    assert_eq!(wrong.0, 401);
    assert_eq!(error_of(&wrong)["message"], "Incorrect API key provided.");

    // A whole answer and a stream that did not ask for usage: both counted, both with the
    // x-ratelimit headers, the stream without a usage chunk the client did not ask for.
    let mut ok = 0u64;
    let r = chat(a.port, Some(&team), "gpt", false);
    assert_eq!(r.0, 200, "{}", String::from_utf8_lossy(&r.2));
    ok += 1;
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), Some("4"));
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("3"));
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), Some("100000"));
    assert!(header(&r, "x-ratelimit-reset-requests").is_some());
    let s = chat(a.port, Some(&team), "gpt", true);
    let text = String::from_utf8_lossy(&s.2).to_string();
    assert_eq!(s.0, 200, "{text}");
    ok += 1;
    assert!(
        text.contains("upstream") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    assert!(
        !text.contains("\"choices\":[]"),
        "usage chunk shown: {text}"
    );

    // A model outside the key's list: 403 naming it; /v1/models shows only its models.
    let f = chat(a.port, Some(&other), "gpt", false);
    assert_eq!(f.0, 403);
    let e = error_of(&f);
    assert_eq!(
        (e["code"].as_str(), e["param"].as_str()),
        (Some("model_not_allowed"), Some("model"))
    );
    assert!(e["message"].as_str().unwrap().contains("'gpt'"), "{e}");
    let auth = format!("Bearer {other}");
    let (_, _, models) = raw_http(
        a.port,
        "GET",
        "/v1/models",
        &[("Authorization", &auth)],
        b"",
    )
    .unwrap();
    assert!(!String::from_utf8_lossy(&models).contains("\"gpt\""));

    // Over the rpm: 429 with Retry-After and OpenAI's headers.
    let mut limited = None;
    for _ in 0..6 {
        let r = chat(a.port, Some(&team), "gpt", false);
        match r.0 {
            200 => ok += 1,
            429 => {
                limited = Some(r);
                break;
            }
            s => panic!("unexpected {s}: {}", String::from_utf8_lossy(&r.2)),
        }
    }
    let r = limited.expect("no 429 within 6 requests at --rpm 4");
    assert!(ok <= 4, "{ok} requests admitted at --rpm 4");
    let retry: u64 = header(&r, "retry-after").unwrap().parse().unwrap();
    assert!((1..=120).contains(&retry), "{retry}");
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), Some("4"));
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("0"));
    assert!(header(&r, "x-ratelimit-reset-requests").is_some());
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), Some("100000"));
    assert!(header(&r, "x-ratelimit-remaining-tokens").is_some());
    assert!(header(&r, "x-ratelimit-reset-tokens").is_some());
    let e = error_of(&r);
    assert_eq!(e["type"], "requests");
    assert_eq!(e["code"], "rate_limit_exceeded");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("'team-a'") && msg.contains("rpm"), "{msg}");

    // Usage reaches the controller with the next sync: every answered request, with the
    // real tokens of whole and streamed answers.
    assert!(
        wait_until(Duration::from_secs(10), || usage(&env, &url, "team-a")
            == (ok, 9 * ok, 3 * ok)),
        "usage {:?}, expected {ok} requests",
        usage(&env, &url, "team-a")
    );
    // /metrics by key name, never the secret.
    let (text, m) = scrape(a.port);
    assert!(!text.contains(&team) && !text.contains("sk-dbgpt-"));
    assert_eq!(
        metric(
            &m,
            "dbgpt_apiserver_key_requests_total{key=\"team-a\",model=\"gpt\"}"
        ),
        ok as f64
    );
    assert_eq!(
        metric(
            &m,
            "dbgpt_apiserver_key_tokens_total{key=\"team-a\",model=\"gpt\",kind=\"completion\"}"
        ),
        (3 * ok) as f64
    );
    assert!(
        metric(
            &m,
            "dbgpt_apiserver_key_rate_limited_total{key=\"team-a\",limit=\"rpm\"}"
        ) >= 1.0
    );

    // Revoked: 401 saying so, from the next sync on.
    keys(&env, &url, &["revoke", "other"]);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let r = chat(a.port, Some(&other), "gpt", false);
            r.0 == 401
                && error_of(&r)["message"]
                    .as_str()
                    .unwrap()
                    .contains("revoked")
        }),
        "a revoked key was still accepted"
    );
    // Expired (created through the API: the CLI's shortest expiry is a minute).
    let at = chrono::Utc::now().timestamp() + 3;
    let (st, created) = json_req(
        c.port,
        "POST",
        "/api/controller/keys",
        Some(&json!({"name": "brief", "expires_at": at})),
    );
    assert_eq!(st, 201, "{created}");
    let brief = created["secret"].as_str().unwrap().to_string();
    assert!(wait_until(Duration::from_secs(10), || {
        let r = chat(a.port, Some(&brief), "gpt", false);
        r.0 == 401
            && error_of(&r)["message"]
                .as_str()
                .unwrap()
                .contains("expired")
    }));
}

#[test]
fn usage_survives_an_apiserver_restart() {
    let up = FakeUpstream::start(Duration::ZERO);
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let url = c.url();
    let _w = gpt_worker(&env, &url, &up);
    let key = create(&env, &url, "batch-job", &["--priority", "batch"]);
    // Syncs only at start and stop: the usage can only come from the report on stop.
    let slow = ["--keys_sync_ms", "600000"];
    for round in 1..=2u64 {
        let mut a = apiserver(&env, &url, &slow);
        wait_served(a.port, Some(&key));
        let s = chat(a.port, Some(&key), "gpt", true);
        assert_eq!(s.0, 200);
        assert!(a.terminate().success());
        // wait_served's request and the stream: two per round.
        assert_eq!(
            usage(&env, &url, "batch-job"),
            (2 * round, 18 * round, 6 * round)
        );
    }
}

#[test]
fn two_apiservers_share_a_keys_limits_through_mariadb() {
    let db = TestDb::new(Db::My);
    let env = TestEnv::new();
    let c1 = crate::sql::start(&env, &db, free_port());
    let c2 = crate::sql::start(&env, &db, free_port());
    let up = FakeUpstream::start(Duration::ZERO);
    let _w = gpt_worker(&env, &c1.url(), &up);
    let key = create(&env, &c1.url(), "shared", &["--rpm", "4"]);
    let a = apiserver(&env, &c1.url(), &["--keys_sync_ms", "200"]);
    let b = apiserver(&env, &c2.url(), &["--keys_sync_ms", "200"]);
    // B learns the model (registered through c1) and the key through c2.
    assert!(wait_until(Duration::from_secs(20), || {
        let r = chat(b.port, None, "gpt", false);
        r.0 == 401
    }));
    let mut served = 0;
    for _ in 0..4 {
        let r = chat(a.port, Some(&key), "gpt", false);
        assert_eq!(r.0, 200, "{}", String::from_utf8_lossy(&r.2));
        served += 1;
    }
    // A reports its four requests within a sync interval (0.2 s) and B's next sync brings
    // the cluster's count: after a few intervals B refuses the key at once. (Before that,
    // B would admit up to the whole rpm itself: the documented tolerance of one interval.)
    std::thread::sleep(Duration::from_millis(1500));
    let r = chat(b.port, Some(&key), "gpt", false);
    assert_eq!(r.0, 429, "{}", String::from_utf8_lossy(&r.2));
    assert!(
        error_of(&r)["message"]
            .as_str()
            .unwrap()
            .contains("'shared'")
    );
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("0"));
    // The usage of both apiservers is in the shared store, seen through either controller.
    assert!(wait_until(Duration::from_secs(10), || usage(
        &env,
        &c2.url(),
        "shared"
    )
    .0 == served));
}

#[test]
fn streamed_tokens_count_toward_tpm_daily_tokens_a_model_limit_and_concurrency() {
    let up = FakeUpstream::start(Duration::from_millis(600));
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let url = c.url();
    let _w = gpt_worker(&env, &url, &up);
    let tpm = create(&env, &url, "tpm", &["--tpm", "20"]);
    let daily = create(&env, &url, "daily", &["--daily_tokens", "10"]);
    let conc = create(&env, &url, "conc", &["--max_concurrency", "1"]);
    let per_model = create(&env, &url, "per-model", &["--model_limit", "gpt:rpm=1"]);
    let a = apiserver(&env, &url, &["--keys_sync_ms", "200"]);
    wait_served(a.port, Some(&conc));

    // 12 tokens per answer, counted from the streams' (hidden) usage chunks: two fit under
    // 20 tokens a minute (the second starts at 12), the third is refused.
    for _ in 0..2 {
        assert_eq!(chat(a.port, Some(&tpm), "gpt", true).0, 200);
    }
    let r = chat(a.port, Some(&tpm), "gpt", true);
    assert_eq!(r.0, 429, "{}", String::from_utf8_lossy(&r.2));
    let e = error_of(&r);
    assert_eq!(e["type"], "tokens");
    assert!(e["message"].as_str().unwrap().contains("(tpm)"), "{e}");
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), Some("20"));
    assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), Some("0"));

    // 10 tokens a day: the first answer spends them.
    assert_eq!(chat(a.port, Some(&daily), "gpt", false).0, 200);
    let r = chat(a.port, Some(&daily), "gpt", false);
    assert_eq!(r.0, 429);
    assert!(
        error_of(&r)["message"]
            .as_str()
            .unwrap()
            .contains("(daily_tokens)")
    );
    let retry: u64 = header(&r, "retry-after").unwrap().parse().unwrap();
    assert!(retry <= 86_400);

    // A limit on one model only.
    assert_eq!(chat(a.port, Some(&per_model), "gpt", false).0, 200);
    let r = chat(a.port, Some(&per_model), "gpt", false);
    assert_eq!(r.0, 429);
    let msg = error_of(&r)["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("'per-model' on model 'gpt'") && msg.contains("(rpm)"),
        "{msg}"
    );
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), Some("1"));

    // One request in flight at a time: a second one meanwhile is refused, and the slot is
    // free again once the first answer has ended.
    let port = a.port;
    let k = conc.clone();
    let first = std::thread::spawn(move || chat(port, Some(&k), "gpt", true).0);
    std::thread::sleep(Duration::from_millis(250));
    let r = chat(a.port, Some(&conc), "gpt", false);
    assert_eq!(r.0, 429, "{}", String::from_utf8_lossy(&r.2));
    assert!(
        error_of(&r)["message"]
            .as_str()
            .unwrap()
            .contains("(max_concurrency)")
    );
    assert_eq!(first.join().unwrap(), 200);
    assert_eq!(chat(a.port, Some(&conc), "gpt", false).0, 200);
    let (_, m) = scrape(a.port);
    for (key, limit) in [
        ("tpm", "tpm"),
        ("daily", "daily_tokens"),
        ("conc", "max_concurrency"),
    ] {
        let k =
            format!("dbgpt_apiserver_key_rate_limited_total{{key=\"{key}\",limit=\"{limit}\"}}");
        assert_eq!(metric(&m, &k), 1.0, "{k}");
    }
}
