//! The controller's HTTP API against DB-GPT 0.5.10's observed behaviour (reference §2–§4),
//! its bad-input answers, expiry, and durability across restarts and kill -9.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

fn list(port: u16, q: &str) -> Vec<Value> {
    let (s, v) = json_req(port, "GET", &format!("/api/controller/models{q}"), None);
    assert_eq!(s, 200, "{v}");
    v.as_array().unwrap().clone()
}

#[test]
fn routes_return_dbgpt_wire_shapes() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let p = c.port;

    // Health.
    let (s, h, b) = raw_http(p, "GET", "/api/health", &[], b"").unwrap();
    assert_eq!((s, b.as_slice()), (200, &br#"{"status":"ok"}"#[..]));
    assert!(
        h.iter()
            .any(|(k, v)| k == "content-type" && v == "application/json")
    );

    // Register answers the bare literal `true`.
    let (s, _, b) = raw_http(
        p,
        "POST",
        "/api/controller/models",
        &[("Content-Type", "application/json")],
        serde_json::to_vec(&instance("chatgpt_proxyllm@llm", 38001))
            .unwrap()
            .as_slice(),
    )
    .unwrap();
    assert_eq!((s, b.as_slice()), (200, &b"true"[..]));

    // Listing: nine keys in DB-GPT's order, server-set healthy + naive ISO timestamp.
    let (_, _, body) = raw_http(p, "GET", "/api/controller/models", &[], b"").unwrap();
    let text = String::from_utf8(body).unwrap();
    let prefix = r#"[{"model_name":"chatgpt_proxyllm@llm","host":"127.0.0.1","port":38001,"weight":1.0,"check_healthy":true,"healthy":true,"enabled":true,"prompt_template":null,"last_heartbeat":""#;
    assert!(text.starts_with(prefix), "{text}");
    let ts = text[prefix.len()..].split('"').next().unwrap();
    assert_eq!(ts.len(), 26, "{ts}");
    assert_eq!(&ts[10..11], "T");
    assert!(ts[20..].chars().all(|c| c.is_ascii_digit()), "{ts}");

    // Unknown paths and methods are JSON.
    let (s, v) = json_req(p, "GET", "/nope", None);
    assert_eq!((s, v), (404, json!({"detail": "Not Found"})));
    let (s, v) = json_req(p, "PUT", "/api/controller/models", None);
    assert_eq!((s, v), (405, json!({"detail": "Method Not Allowed"})));
}

#[test]
fn registry_semantics_match_dbgpt() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let p = c.port;
    let post = |path: &str, body: &Value| json_req(p, "POST", path, Some(body));

    // First registration with enabled=false / check_healthy=false; a re-register changes
    // weight and prompt_template but keeps those two.
    let mut a = instance("a@llm", 1);
    a["enabled"] = json!(false);
    a["check_healthy"] = json!(false);
    assert_eq!(post("/api/controller/models", &a), (200, json!(true)));
    let mut a2 = instance("a@llm", 1);
    a2["weight"] = json!(3.0);
    a2["prompt_template"] = json!("vicuna");
    a2["remove_from_registry"] = json!(false); // a 0.7 worker's extra key is accepted
    assert_eq!(post("/api/controller/models", &a2), (200, json!(true)));
    let l = list(p, "");
    assert_eq!(l.len(), 1);
    assert_eq!(l[0]["enabled"], json!(false));
    assert_eq!(l[0]["check_healthy"], json!(false));
    assert_eq!(l[0]["weight"], json!(3.0));
    assert_eq!(l[0]["prompt_template"], json!("vicuna"));

    // A heartbeat from an unknown instance registers it; a string port is coerced.
    let mut b = instance("b@text2vec", 2);
    b["port"] = json!("2");
    assert_eq!(post("/api/controller/heartbeat", &b), (200, json!(true)));
    assert_eq!(
        post("/api/controller/models", &instance("a@llm", 3)),
        (200, json!(true))
    );
    let names: Vec<_> = list(p, "")
        .iter()
        .map(|i| {
            (
                i["model_name"].as_str().unwrap().to_string(),
                i["port"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("a@llm".into(), 1),
            ("a@llm".into(), 3),
            ("b@text2vec".into(), 2)
        ]
    );

    // Deregister as DB-GPT's client sends it: the whole instance as query, None as "".
    let q = "/api/controller/models?model_name=a%40llm&host=127.0.0.1&port=3&weight=1.0&check_healthy=true&healthy=false&enabled=true&prompt_template=&last_heartbeat=";
    assert_eq!(json_req(p, "DELETE", q, None), (200, json!(true)));
    let l = list(p, "?model_name=a%40llm");
    assert_eq!(l.len(), 2, "deregister keeps the entry");
    assert_eq!(l[1]["healthy"], json!(false));
    // Deregistering something unknown is still `true`.
    assert_eq!(
        json_req(
            p,
            "DELETE",
            "/api/controller/models?model_name=zz%40llm&host=h&port=1",
            None
        ),
        (200, json!(true))
    );

    // healthy_only accepts every spelling pydantic does (the sync client sends "True").
    for v in ["true", "True", "TRUE", "1", "yes", "on"] {
        let l = list(p, &format!("?model_name=a%40llm&healthy_only={v}"));
        assert_eq!(l.len(), 1, "healthy_only={v}");
    }
    for v in ["false", "False", "0", "no", "off"] {
        assert_eq!(
            list(p, &format!("?model_name=a%40llm&healthy_only={v}")).len(),
            2,
            "{v}"
        );
    }
    // Empty model_name means "all".
    assert_eq!(list(p, "?model_name=&healthy_only=false").len(), 3);
    assert_eq!(list(p, "?model_name=unknown%40llm").len(), 0);

    // The heartbeat revives a deregistered instance.
    assert_eq!(
        post("/api/controller/heartbeat", &instance("a@llm", 3)),
        (200, json!(true))
    );
    assert_eq!(list(p, "?model_name=a%40llm&healthy_only=true").len(), 2);

    // 0.7's remove_from_registry=true really removes, and never shows up as a key.
    assert_eq!(
        json_req(
            p,
            "DELETE",
            "/api/controller/models?model_name=a%40llm&host=127.0.0.1&port=3&remove_from_registry=true",
            None
        ),
        (200, json!(true))
    );
    let l = list(p, "");
    assert_eq!(l.len(), 2);
    for i in &l {
        assert_eq!(i.as_object().unwrap().len(), 9, "{i}");
        assert!(i.get("remove_from_registry").is_none());
    }
}

/// (method, path, content-type, body, expected status, expected first detail type, loc).
type Case = (
    &'static str,
    &'static str,
    Option<&'static str>,
    Vec<u8>,
    u16,
    Option<&'static str>,
    Option<Value>,
);

#[test]
fn bad_input_matrix_gets_4xx_and_the_controller_keeps_serving() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let p = c.port;
    let ct = Some("application/json");
    let j = |v: Value| serde_json::to_vec(&v).unwrap();
    let models = "/api/controller/models";
    let hb = "/api/controller/heartbeat";
    let cases: Vec<Case> = vec![
        (
            "POST",
            models,
            ct,
            b"{".to_vec(),
            422,
            Some("json_invalid"),
            None,
        ),
        (
            "POST",
            models,
            ct,
            b"".to_vec(),
            422,
            Some("json_invalid"),
            None,
        ),
        (
            "POST",
            models,
            ct,
            b"null".to_vec(),
            422,
            Some("dataclass_type"),
            Some(json!(["body"])),
        ),
        (
            "POST",
            models,
            ct,
            b"[1,2]".to_vec(),
            422,
            Some("dataclass_type"),
            Some(json!(["body"])),
        ),
        (
            "POST",
            models,
            ct,
            b"\"str\"".to_vec(),
            422,
            Some("dataclass_type"),
            Some(json!(["body"])),
        ),
        (
            "POST",
            models,
            ct,
            j(json!({})),
            422,
            Some("missing"),
            Some(json!(["body", "model_name"])),
        ),
        (
            "POST",
            models,
            ct,
            j(json!({"model_name": "a@llm", "host": "h"})),
            422,
            Some("missing"),
            Some(json!(["body", "port"])),
        ),
        (
            "POST",
            models,
            ct,
            j(json!({"model_name": "a@llm", "port": 1})),
            422,
            Some("missing"),
            Some(json!(["body", "host"])),
        ),
        (
            "POST",
            models,
            ct,
            j(json!({"model_name": "a@llm", "host": "h", "port": "abc"})),
            422,
            Some("int_parsing"),
            Some(json!(["body", "port"])),
        ),
        (
            "POST",
            models,
            ct,
            j(json!({"model_name": "a@llm", "host": "h", "port": 70000})),
            422,
            Some("less_than_equal"),
            Some(json!(["body", "port"])),
        ),
        (
            "POST",
            models,
            ct,
            j(json!({"model_name": "a@llm", "host": "h", "port": -1})),
            422,
            Some("greater_than_equal"),
            Some(json!(["body", "port"])),
        ),
        (
            "POST",
            models,
            ct,
            j(json!({"model_name": "a@llm", "host": "h", "port": 1.5})),
            422,
            Some("int_from_float"),
            Some(json!(["body", "port"])),
        ),
        (
            "POST",
            models,
            ct,
            j(json!({"model_name": "a@llm", "host": "h", "port": [1]})),
            422,
            Some("int_type"),
            Some(json!(["body", "port"])),
        ),
        (
            "POST",
            models,
            ct,
            j(json!({"model_name": 5, "host": "h", "port": 1})),
            422,
            Some("string_type"),
            Some(json!(["body", "model_name"])),
        ),
        (
            "POST",
            models,
            ct,
            j(json!({"model_name": "a@llm", "host": {}, "port": 1})),
            422,
            Some("string_type"),
            Some(json!(["body", "host"])),
        ),
        (
            "POST",
            models,
            ct,
            j(json!({"model_name": "a@llm", "host": "h", "port": 1, "weight": "heavy"})),
            422,
            Some("float_parsing"),
            Some(json!(["body", "weight"])),
        ),
        (
            "POST",
            models,
            ct,
            j(json!({"model_name": "a@llm", "host": "h", "port": 1, "enabled": "maybe"})),
            422,
            Some("bool_parsing"),
            Some(json!(["body", "enabled"])),
        ),
        (
            "POST",
            models,
            ct,
            j(json!({"model_name": "a@llm", "host": "h", "port": 1, "check_healthy": [true]})),
            422,
            Some("bool_type"),
            Some(json!(["body", "check_healthy"])),
        ),
        (
            "POST",
            models,
            ct,
            j(json!({"model_name": "a@llm", "host": "h", "port": 1, "prompt_template": 7})),
            422,
            Some("string_type"),
            Some(json!(["body", "prompt_template"])),
        ),
        (
            "POST",
            models,
            ct,
            j(json!({"model_name": "  ", "host": "h", "port": 1})),
            422,
            Some("string_too_short"),
            Some(json!(["body", "model_name"])),
        ),
        (
            "POST",
            hb,
            ct,
            b"{\"model_name\":".to_vec(),
            422,
            Some("json_invalid"),
            None,
        ),
        (
            "POST",
            hb,
            ct,
            j(json!({"model_name": "a@llm"})),
            422,
            Some("missing"),
            None,
        ),
        (
            "POST",
            models,
            Some("application/x-www-form-urlencoded"),
            b"model_name=a&host=h&port=1".to_vec(),
            422,
            Some("json_invalid"),
            None,
        ),
        (
            "DELETE",
            models,
            None,
            vec![],
            422,
            Some("missing"),
            Some(json!(["query", "model_name"])),
        ),
        (
            "DELETE",
            "/api/controller/models?model_name=a&host=h&port=x",
            None,
            vec![],
            422,
            Some("int_parsing"),
            Some(json!(["query", "port"])),
        ),
        (
            "DELETE",
            "/api/controller/models?model_name=a&host=h&port=1&remove_from_registry=perhaps",
            None,
            vec![],
            422,
            Some("bool_parsing"),
            Some(json!(["query", "remove_from_registry"])),
        ),
        (
            "GET",
            "/api/controller/models?healthy_only=maybe",
            None,
            vec![],
            422,
            Some("bool_parsing"),
            Some(json!(["query", "healthy_only"])),
        ),
        (
            "GET",
            "/api/controller/models?healthy_only=",
            None,
            vec![],
            422,
            Some("bool_parsing"),
            Some(json!(["query", "healthy_only"])),
        ),
        (
            "GET",
            "/api/controller/heartbeat",
            None,
            vec![],
            405,
            None,
            None,
        ),
        ("PATCH", models, ct, j(json!({})), 405, None, None),
        ("GET", "/api/controller", None, vec![], 404, None, None),
        ("POST", "/api/health", ct, b"{}".to_vec(), 405, None, None),
        ("POST", models, ct, vec![b' '; 2 << 20], 413, None, None),
        (
            "POST",
            models,
            ct,
            j(json!({"model_name": "m".repeat(129), "host": "h", "port": 1})),
            422,
            Some("string_too_long"),
            Some(json!(["body", "model_name"])),
        ),
        (
            "POST",
            hb,
            ct,
            j(json!({"model_name": "a@llm", "host": "h".repeat(129), "port": 1})),
            422,
            Some("string_too_long"),
            Some(json!(["body", "host"])),
        ),
    ];
    assert!(cases.len() >= 25);
    for (method, path, ctype, body, status, kind, loc) in cases {
        let mut headers = vec![];
        if let Some(t) = ctype {
            headers.push(("Content-Type", t));
        }
        let (s, _, b) = raw_http(p, method, path, &headers, &body)
            .unwrap_or_else(|| panic!("{method} {path}: no answer"));
        let v: Value = serde_json::from_slice(&b).unwrap_or_else(|_| {
            panic!(
                "{method} {path}: body is not JSON: {}",
                String::from_utf8_lossy(&b)
            )
        });
        assert_eq!(
            s,
            status,
            "{method} {path} {}: {v}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        );
        assert!(v.get("detail").is_some(), "{method} {path}: {v}");
        if let Some(k) = kind {
            assert_eq!(v["detail"][0]["type"], json!(k), "{method} {path}: {v}");
            assert!(v["detail"][0]["msg"].is_string());
        }
        if let Some(l) = loc {
            assert_eq!(v["detail"][0]["loc"], l, "{method} {path}: {v}");
        }
        // Still serving, nothing was registered by garbage.
        assert_eq!(http_get_status(p, "/api/health"), Some(200));
    }
    assert!(
        list(p, "").is_empty(),
        "bad input must not register anything"
    );
}

#[test]
fn expiry_marks_unhealthy_and_heartbeat_revives() {
    let env = TestEnv::new();
    let c = env.controller(&[
        "--heartbeat_interval_secs",
        "1",
        "--heartbeat_timeout_secs",
        "2",
    ]);
    let p = c.port;
    assert_eq!(
        json_req(
            p,
            "POST",
            "/api/controller/models",
            Some(&instance("a@llm", 1))
        )
        .0,
        200
    );
    let mut b = instance("b@llm", 2);
    b["check_healthy"] = json!(false);
    assert_eq!(
        json_req(p, "POST", "/api/controller/models", Some(&b)).0,
        200
    );
    assert!(wait_until(Duration::from_secs(6), || {
        let l = list(p, "?healthy_only=true");
        l.len() == 1 && l[0]["model_name"] == "b@llm"
    }));
    let all = list(p, "");
    assert_eq!(all[0]["healthy"], json!(false));
    assert_eq!(
        all[1]["healthy"],
        json!(true),
        "check_healthy=false never expires"
    );
    assert_eq!(
        json_req(
            p,
            "POST",
            "/api/controller/heartbeat",
            Some(&instance("a@llm", 1))
        )
        .0,
        200
    );
    assert_eq!(list(p, "?healthy_only=true").len(), 2);
}

#[test]
fn restart_keeps_every_instance_and_flushes_heartbeats() {
    let env = TestEnv::new();
    let reg = env.path("r.redb");
    let port = free_port();
    let mut c = env.controller_on(port, &reg, &[]);
    for i in 0..10 {
        assert_eq!(
            json_req(
                port,
                "POST",
                "/api/controller/models",
                Some(&instance(&format!("m{i}@llm"), 100 + i))
            )
            .0,
            200
        );
    }
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(
        json_req(
            port,
            "POST",
            "/api/controller/heartbeat",
            Some(&instance("m3@llm", 103))
        )
        .0,
        200
    );
    let before = list(port, "");
    assert!(c.terminate().success(), "{}", c.logs());
    let c2 = env.controller_on(port, &reg, &[]);
    let after = list(c2.port, "");
    assert_eq!(
        before, after,
        "graceful restart keeps instances, order and the last heartbeat"
    );
}

#[test]
fn acknowledged_registrations_survive_kill_9() {
    let env = TestEnv::new();
    let reg = env.path("r.redb");
    let mut acked: Vec<String> = Vec::new();
    let mut n = 0u32;
    for cycle in 0..20 {
        let port = free_port();
        let mut c = env.spawn_controller(port, &reg, &[]);
        c.wait_healthy();
        // Register from a thread until the controller is killed under it.
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let start = n;
        let writer = std::thread::spawn(move || {
            for i in start..start + 400 {
                let name = format!("m{i}@llm");
                let body = serde_json::to_vec(&instance(&name, 1)).unwrap();
                match raw_http(
                    port,
                    "POST",
                    "/api/controller/models",
                    &[("Content-Type", "application/json")],
                    &body,
                ) {
                    Some((200, _, b)) if b == b"true" => tx.send(name).unwrap(),
                    _ => break,
                }
            }
        });
        std::thread::sleep(Duration::from_millis(30 + (cycle * 37 % 150) as u64));
        c.kill9();
        writer.join().unwrap();
        let got: Vec<String> = rx.try_iter().collect();
        n += 400;
        acked.extend(got);
        // Restart and check every acknowledged registration is there.
        let c2 = env.controller_on(port, &reg, &[]);
        let present: std::collections::HashSet<String> = list(c2.port, "")
            .iter()
            .map(|i| i["model_name"].as_str().unwrap().to_string())
            .collect();
        for a in &acked {
            assert!(
                present.contains(a),
                "cycle {cycle}: acknowledged {a} lost after kill -9"
            );
        }
        drop(c2);
    }
    assert!(
        acked.len() > 20,
        "the test must actually register things ({})",
        acked.len()
    );
}

#[test]
fn second_controller_on_the_same_file_fails_naming_it() {
    let env = TestEnv::new();
    let reg = env.path("shared.redb");
    let _a = env.controller_on(free_port(), &reg, &[]);
    let port = free_port().to_string();
    let out = env.run(&[
        "start",
        "controller",
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--registry_path",
        reg.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("shared.redb") && err.contains("already in use"),
        "{err}"
    );
}

/// Issue 18 item 8: names, hosts and templates are bounded at registration (422 naming the
/// field, on register and heartbeat), and an instance at every limit at once, with 4-byte
/// characters, is removed by a DELETE that carries the whole instance in its query string
/// as DB-GPT's client does.
#[test]
fn bounded_names_register_and_can_always_be_deleted() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let p = c.port;
    let wide = |n: usize| "𝔸".repeat(n);
    let name = format!("{}@llm", wide(124));
    let host = wide(128);
    let template = wide(512);
    let mut inst = instance(&name, 9);
    inst["host"] = json!(host);
    inst["prompt_template"] = json!(template);
    let (s, v) = json_req(p, "POST", "/api/controller/models", Some(&inst));
    assert_eq!(s, 200, "{v}");
    assert_eq!(list(p, "")[0]["model_name"], json!(name));
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("model_name", &name)
        .append_pair("host", &host)
        .append_pair("port", "9")
        .append_pair("weight", "1.0")
        .append_pair("check_healthy", "true")
        .append_pair("healthy", "false")
        .append_pair("enabled", "true")
        .append_pair("prompt_template", &template)
        .append_pair("last_heartbeat", "")
        .append_pair("remove_from_registry", "true")
        .finish();
    let (s, v) = json_req(
        p,
        "DELETE",
        &format!("/api/controller/models?{query}"),
        None,
    );
    assert_eq!((s, v), (200, json!(true)));
    assert!(list(p, "").is_empty(), "the entry at the limits is gone");

    // One character over any limit, or the issue's 100,000-character name: refused.
    let over: [(&str, &str, Value); 5] = [
        ("/api/controller/models", "model_name", json!(wide(129))),
        ("/api/controller/heartbeat", "model_name", json!(wide(129))),
        (
            "/api/controller/models",
            "model_name",
            json!("x".repeat(100_000)),
        ),
        ("/api/controller/models", "host", json!(wide(129))),
        (
            "/api/controller/heartbeat",
            "prompt_template",
            json!(wide(513)),
        ),
    ];
    for (path, field, value) in over {
        let mut body = instance("a@llm", 9);
        body[field] = value;
        let (s, v) = json_req(p, "POST", path, Some(&body));
        assert_eq!(s, 422, "{path} {field}: {v}");
        assert_eq!(v["detail"][0]["type"], "string_too_long", "{v}");
        assert_eq!(v["detail"][0]["loc"], json!(["body", field]), "{v}");
    }
    assert!(
        list(p, "").is_empty(),
        "nothing over a limit was registered"
    );
}

/// Issue 18 item 9: a control character in client input cannot forge a log line: the
/// controller logs the name with its newline escaped.
#[test]
fn newlines_in_names_cannot_forge_log_lines() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    let p = c.port;
    let forged = "FORGED  INFO registered instance=admin";
    let name = format!("evil\n{forged}\r\n{forged}@llm");
    let mut body = instance(&name, 9);
    body["host"] = json!(format!("h\n{forged}"));
    let (s, v) = json_req(p, "POST", "/api/controller/models", Some(&body));
    assert_eq!(s, 200, "{v}");
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("model_name", &name)
        .append_pair("host", &format!("h\n{forged}"))
        .append_pair("port", "9")
        .finish();
    let (s, _) = json_req(
        p,
        "DELETE",
        &format!("/api/controller/models?{query}"),
        None,
    );
    assert_eq!(s, 200);
    let logs = c.logs();
    assert!(
        logs.lines().any(|l| l.contains("registered")
            && l.contains(r"evil\nFORGED")
            && l.contains(r"\r\nFORGED")),
        "the registration is logged on one line, escaped:\n{logs}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("deregistered") && l.contains(r"h\nFORGED")),
        "the deregistration is logged on one line, escaped:\n{logs}"
    );
    assert!(
        !logs.lines().any(|l| l.starts_with("FORGED")),
        "a forged line reached the log:\n{logs}"
    );
}
