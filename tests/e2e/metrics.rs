//! Prometheus metrics: `/metrics` of the controller, a proxy worker (in front of the test
//! double upstream) and the apiserver move by exactly what one chat request does; the
//! endpoint can be turned off (404), moved to its own address, or require a key (401);
//! `dbgpt ctl status` shows the figures and the apiserver's view of each instance.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use crate::common::*;

/// `series -> value` of a text exposition (the series is the line up to its value).
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            let v = match v {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")),
            };
            (k.to_string(), v)
        })
        .collect()
}

/// Scrapes `port` (optionally with a bearer key): (status, content type, series).
fn scrape_with(port: u16, key: Option<&str>) -> (u16, String, HashMap<String, f64>) {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    let (s, h, b) = raw_http(port, "GET", "/metrics", &headers, b"").expect("no answer");
    let ct = h
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let series = if s == 200 {
        parse(&String::from_utf8(b).unwrap())
    } else {
        HashMap::new()
    };
    (s, ct, series)
}

fn scrape(port: u16) -> HashMap<String, f64> {
    let (s, ct, series) = scrape_with(port, None);
    assert_eq!(s, 200);
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    series
}

fn get(m: &HashMap<String, f64>, k: &str) -> f64 {
    m.get(k).copied().unwrap_or(0.0)
}

#[test]
fn one_chat_request_moves_every_daemons_counters_by_exactly_its_share() {
    let up = crate::worker::FakeUpstream::start(Duration::ZERO);
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let base = format!("http://127.0.0.1:{}/v1", up.port);
    let w = crate::worker::worker(
        &env,
        &c.url(),
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
    );
    let a = apiserver(&env, &c.url(), &["--api_keys", "client-key"]);
    assert!(
        wait_until(Duration::from_secs(15), || {
            raw_http(
                a.port,
                "GET",
                "/v1/models",
                &[("Authorization", "Bearer client-key")],
                b"",
            )
            .is_some_and(|r| String::from_utf8_lossy(&r.2).contains("\"gpt\""))
        }),
        "the apiserver never saw the worker"
    );
    // /metrics needs no API key by default, even on an apiserver that has keys.
    let (a0, w0, c0) = (scrape(a.port), scrape(w.port), scrape(c.port));

    let chat = json!({"model": "gpt", "messages": [{"role": "user", "content": "secret-prompt-text"}], "stream": true});
    let (s, _, b) = raw_http(
        a.port,
        "POST",
        "/v1/chat/completions",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer client-key"),
        ],
        &serde_json::to_vec(&chat).unwrap(),
    )
    .unwrap();
    let b = String::from_utf8_lossy(&b).to_string();
    assert_eq!(s, 200, "{b}");
    assert!(
        b.contains("[DONE]") && b.contains("\"completion_tokens\":3"),
        "{b}"
    );

    // The answer's last byte may reach the client just before the server's bookkeeping:
    // wait until the request is counted, then every figure must be exact.
    let api_req = "dbgpt_apiserver_requests_total{route=\"chat_completions\",model=\"gpt\",status_class=\"2xx\"}";
    let wrk_req =
        "dbgpt_worker_requests_total{route=\"openai_chat_completions\",status_class=\"2xx\"}";
    assert!(wait_until(Duration::from_secs(5), || {
        get(&scrape(a.port), api_req) == get(&a0, api_req) + 1.0
            && get(&scrape(w.port), wrk_req) == get(&w0, wrk_req) + 1.0
    }));
    let (a1, w1, c1) = (scrape(a.port), scrape(w.port), scrape(c.port));
    let moved = |before: &HashMap<String, f64>, after: &HashMap<String, f64>, k: &str| {
        get(after, k) - get(before, k)
    };

    // Apiserver: one chat request of model gpt, its tokens from the usage chunk, one first
    // byte, nothing left in flight, no retry; the instance as it sees it.
    assert_eq!(moved(&a0, &a1, api_req), 1.0);
    for k in [
        "dbgpt_apiserver_request_duration_seconds_count{route=\"chat_completions\",model=\"gpt\"}",
        "dbgpt_apiserver_time_to_first_token_seconds_count{model=\"gpt\"}",
    ] {
        assert_eq!(moved(&a0, &a1, k), 1.0, "{k}");
    }
    assert_eq!(
        moved(
            &a0,
            &a1,
            "dbgpt_apiserver_prompt_tokens_total{model=\"gpt\"}"
        ),
        9.0
    );
    assert_eq!(
        moved(
            &a0,
            &a1,
            "dbgpt_apiserver_completion_tokens_total{model=\"gpt\"}"
        ),
        3.0
    );
    assert_eq!(
        get(&a1, "dbgpt_apiserver_retries_total{model=\"gpt\"}"),
        0.0
    );
    assert_eq!(get(&a1, "dbgpt_apiserver_in_flight_requests"), 0.0);
    let inst = format!(
        "{{model=\"gpt\",worker_type=\"llm\",worker=\"127.0.0.1:{}\"}}",
        w.port
    );
    assert_eq!(
        get(&a1, &format!("dbgpt_apiserver_instance_healthy{inst}")),
        1.0
    );
    assert_eq!(
        a1.get(&format!(
            "dbgpt_apiserver_instance_outstanding_requests{inst}"
        )),
        Some(&0.0)
    );
    assert!(a1.contains_key("dbgpt_apiserver_discovery_refresh_age_seconds"));
    // The models listing polled above is counted under its route, without a model.
    assert!(
        get(
            &a1,
            "dbgpt_apiserver_requests_total{route=\"models\",model=\"other\",status_class=\"2xx\"}"
        ) >= 1.0
    );

    // Worker: one HTTP request, one model call, the upstream's 9 + 3 tokens.
    assert_eq!(moved(&w0, &w1, wrk_req), 1.0);
    let model = "{model=\"gpt\",worker_type=\"llm\"}";
    assert_eq!(
        moved(
            &w0,
            &w1,
            &format!("dbgpt_worker_model_requests_total{model}")
        ),
        1.0
    );
    assert_eq!(
        moved(
            &w0,
            &w1,
            &format!("dbgpt_worker_generated_tokens_total{model}")
        ),
        3.0
    );
    assert_eq!(
        moved(
            &w0,
            &w1,
            &format!("dbgpt_worker_prompt_tokens_total{model}")
        ),
        9.0
    );
    assert_eq!(
        moved(
            &w0,
            &w1,
            &format!("dbgpt_worker_time_to_first_token_seconds_count{model}")
        ),
        1.0
    );
    assert_eq!(get(&w1, &format!("dbgpt_worker_slots_in_use{model}")), 0.0);
    assert_eq!(get(&w1, &format!("dbgpt_worker_queue_depth{model}")), 0.0);
    assert_eq!(get(&w1, "dbgpt_worker_in_flight_requests"), 0.0);
    assert!(w1.contains_key(&format!("dbgpt_worker_model_load_seconds{model}")));

    // Controller: nothing registered during the request; the instance is counted healthy.
    assert_eq!(moved(&c0, &c1, "dbgpt_controller_registrations_total"), 0.0);
    assert!(get(&c1, "dbgpt_controller_registrations_total") >= 1.0);
    assert!(get(&c1, "dbgpt_controller_heartbeats_total") >= 0.0);
    assert_eq!(
        get(
            &c1,
            "dbgpt_controller_instances{model=\"gpt\",worker_type=\"llm\",health=\"healthy\"}"
        ),
        1.0
    );
    assert_eq!(
        get(
            &c1,
            "dbgpt_controller_instances{model=\"gpt\",worker_type=\"llm\",health=\"unhealthy\"}"
        ),
        0.0
    );
    assert!(
        get(
            &c1,
            "dbgpt_controller_registry_write_duration_seconds_count{op=\"register\"}"
        ) >= 1.0
    );

    // Every daemon: build info, uptime, memory, descriptors; no secrets anywhere.
    for (m, service) in [(&a1, "apiserver"), (&w1, "worker"), (&c1, "controller")] {
        assert!(
            m.keys().any(|k| k.starts_with("dbgpt_build_info{")
                && k.contains(&format!("service=\"{service}\""))),
            "{service}"
        );
        assert!(get(m, "process_resident_memory_bytes") > 0.0, "{service}");
        assert!(get(m, "process_open_fds") > 0.0, "{service}");
        assert!(m.contains_key("dbgpt_uptime_seconds"), "{service}");
        assert!(!m.keys().any(|k| k.contains("client-key")
            || k.contains("sk-test")
            || k.contains("secret-prompt")));
    }

    // A model nobody serves is counted as `other`, never under the client's name.
    let (s, _, _) = raw_http(
        a.port,
        "POST",
        "/v1/chat/completions",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer client-key"),
        ],
        br#"{"model": "made-up-by-a-client", "messages": [{"role": "user", "content": "x"}]}"#,
    )
    .unwrap();
    assert_eq!(s, 404);
    assert!(wait_until(Duration::from_secs(5), || {
        get(
            &scrape(a.port),
            "dbgpt_apiserver_requests_total{route=\"chat_completions\",model=\"other\",status_class=\"4xx\"}",
        ) == 1.0
    }));
    assert!(
        !scrape(a.port)
            .keys()
            .any(|k| k.contains("made-up-by-a-client"))
    );

    // ctl status: the figures per daemon and the apiserver's view of the instance.
    let out = env.run(&["ctl", "status"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(
        text.contains("REQ/S") && text.contains("IN-FLIGHT") && text.contains("ERRORS"),
        "{text}"
    );
    assert!(
        text.contains(&format!("gpt@llm@127.0.0.1:{}", w.port))
            && text.contains("healthy outstanding=0"),
        "{text}"
    );
}

#[test]
fn metrics_off_moved_or_behind_a_key() {
    let env = TestEnv::new();
    // Off: 404 on the HTTP port (the daemon serves as usual).
    let off = env.controller(&["--metrics_addr", "off"]);
    assert_eq!(http_get_status(off.port, "/metrics"), Some(404));
    let a = apiserver(&env, &off.url(), &["--metrics_addr", "off"]);
    assert_eq!(http_get_status(a.port, "/metrics"), Some(404));

    // A key: 401 without it or with another, 200 with it.
    let keyed = env.controller(&["--metrics_api_key", "scrape-secret"]);
    let (s, _, _) = scrape_with(keyed.port, None);
    assert_eq!(s, 401);
    let (s, _, _) = scrape_with(keyed.port, Some("wrong"));
    assert_eq!(s, 401);
    let (s, _, m) = scrape_with(keyed.port, Some("scrape-secret"));
    assert_eq!(s, 200);
    assert!(m.contains_key("dbgpt_uptime_seconds"));

    // A separate address: served there, not on the HTTP port.
    let mport = free_port();
    let addr = format!("127.0.0.1:{mport}");
    let moved = env.controller(&["--metrics_addr", &addr]);
    assert_eq!(http_get_status(moved.port, "/metrics"), Some(404));
    assert!(wait_until(Duration::from_secs(5), || {
        http_get_status(mport, "/metrics") == Some(200)
    }));

    // A bad address is refused at start with a message naming the flag.
    let out = env.run(&[
        "start",
        "controller",
        "--port",
        &free_port().to_string(),
        "--metrics_addr",
        "nonsense",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--metrics_addr"), "{}", stderr(&out));
}
