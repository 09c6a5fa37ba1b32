use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use tower::{Layer, ServiceExt};

use super::apiserver::ApiMetrics;
use super::controller::ControllerMetrics;
use super::worker::WorkerMetrics;
use super::*;

/// A strict reader of the Prometheus text format 0.0.4: every line is `# HELP name text`,
/// `# TYPE name type` (before the family's samples, once) or `name{labels} value`, names and
/// label names match the data model's patterns, label values are quoted with `\\`, `\"` and
/// `\n` escapes, values are floats. Returns `series -> value`, the key being the line up to
/// its value.
pub(crate) fn parse_exposition(text: &str) -> Result<HashMap<String, f64>, String> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut types: HashMap<String, String> = HashMap::new();
    let mut out = HashMap::new();
    for (no, line) in text.lines().enumerate() {
        let err = |m: &str| format!("line {}: {m}: {line:?}", no + 1);
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (n, _) = rest
                .split_once(' ')
                .ok_or_else(|| err("HELP without text"))?;
            if !name_ok(n) {
                return Err(err("bad name"));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (n, t) = rest
                .split_once(' ')
                .ok_or_else(|| err("TYPE without type"))?;
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                return Err(err("unknown type"));
            }
            if types.insert(n.to_string(), t.to_string()).is_some() {
                return Err(err("TYPE twice"));
            }
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            return Err(err("unexpected line"));
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| err("no value"))?;
        let name = &line[..name_end];
        if !name_ok(name) {
            return Err(err("bad metric name"));
        }
        let mut rest = &line[name_end..];
        if let Some(r) = rest.strip_prefix('{') {
            // label="value",… }
            let mut r = r;
            loop {
                if let Some(after) = r.strip_prefix('}') {
                    r = after;
                    break;
                }
                let eq = r.find('=').ok_or_else(|| err("label without ="))?;
                if !name_ok(&r[..eq]) || r[..eq].contains(':') {
                    return Err(err("bad label name"));
                }
                let v = r[eq + 1..]
                    .strip_prefix('"')
                    .ok_or_else(|| err("unquoted label value"))?;
                let mut chars = v.char_indices();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next() {
                            Some((_, '\\' | '"' | 'n')) => {}
                            _ => return Err(err("bad escape")),
                        },
                        '"' => {
                            end = Some(i);
                            break;
                        }
                        '\n' => return Err(err("raw newline")),
                        _ => {}
                    }
                }
                let end = end.ok_or_else(|| err("unterminated label value"))?;
                r = &v[end + 1..];
                r = r.strip_prefix(',').unwrap_or(r);
            }
            rest = r;
        }
        let value = rest
            .strip_prefix(' ')
            .ok_or_else(|| err("no space before value"))?;
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| err("value is not a number"))?,
        };
        let family = ["_bucket", "_sum", "_count", "_total", "_info"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.contains_key(*f)))
            .unwrap_or(name);
        if !types.contains_key(family) && !types.contains_key(name) {
            return Err(err("sample before its TYPE"));
        }
        out.insert(line[..line.len() - value.len() - 1].to_string(), v);
    }
    Ok(out)
}

fn full_exposition() -> (
    Arc<ApiMetrics>,
    Arc<WorkerMetrics>,
    Arc<ControllerMetrics>,
    Exposition,
) {
    let mut e = Exposition::new("apiserver", MetricsConfig::default());
    let api = Arc::new(ApiMetrics::new());
    let client = crate::controller::client::ControllerClient::new(
        "http://127.0.0.1:9",
        std::time::Duration::from_secs(1),
    )
    .unwrap();
    let d = Arc::new(crate::apiserver::discovery::Discovery::new(client));
    api.register(e.registry(), d);
    let w = Arc::new(WorkerMetrics::default());
    w.register(e.registry());
    let dir = tempfile::tempdir().unwrap();
    let reg: Arc<dyn crate::registry::Registry> = Arc::new(
        crate::registry::RedbRegistry::open(
            &dir.path().join("r.redb"),
            std::time::Duration::from_secs(30),
        )
        .unwrap(),
    );
    let c = Arc::new(ControllerMetrics::default());
    c.register(e.registry(), reg);
    (api, w, c, e)
}

#[test]
fn exposition_parses_and_follows_the_naming_conventions() {
    let (api, w, c, e) = full_exposition();
    // Some series of every kind.
    let m = w.model("smol\"lm\n2", "llm");
    m.slot_taken();
    m.loaded_in(1.5);
    c.registered();
    c.expired(2);
    drop(c.timed(controller::Op::Register));
    api.failed_over("unknown-model");
    let text = e.render();
    let series = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut it = line[7..].split(' ');
        let (name, ty) = (it.next().unwrap(), it.next().unwrap());
        assert!(
            name.starts_with("dbgpt_") || name.starts_with("process_"),
            "{name}"
        );
        if ty == "counter" {
            assert!(name.ends_with("_total"), "counter {name}");
        }
        if name.contains("duration") || name.contains("token_seconds") {
            assert_eq!(ty, "histogram", "{name}");
            assert!(name.ends_with("_seconds"), "{name}");
        }
    }
    assert!(text.contains("dbgpt_build_info{version=\""), "{text}");
    assert_eq!(
        series["dbgpt_worker_slots_in_use{model=\"smol\\\"lm\\n2\",worker_type=\"llm\"}"],
        1.0
    );
    assert_eq!(
        series["dbgpt_worker_model_load_seconds{model=\"smol\\\"lm\\n2\",worker_type=\"llm\"}"],
        1.5
    );
    assert_eq!(series["dbgpt_controller_registrations_total"], 1.0);
    assert_eq!(series["dbgpt_controller_expiries_total"], 2.0);
    assert_eq!(
        series["dbgpt_controller_registry_write_duration_seconds_count{op=\"register\"}"],
        1.0
    );
    // The discovery view knows no model: a client-chosen name is counted as `other`.
    assert_eq!(
        series["dbgpt_apiserver_failovers_total{model=\"other\"}"],
        1.0
    );
    assert!(!text.contains("unknown-model"));
    assert!(series["process_resident_memory_bytes"] > 0.0);
    assert!(series["process_open_fds"] > 0.0);
    assert!(series.contains_key("dbgpt_uptime_seconds"));
}

#[test]
fn model_labels_are_bounded() {
    let b: Bounded<String> = Bounded::new(|m| m.to_string());
    for i in 0..MAX_MODELS + 50 {
        let h = b.get(&format!("m{i}"), || true);
        if i < MAX_MODELS {
            assert_eq!(*h, format!("m{i}"));
        } else {
            assert_eq!(*h, OTHER);
        }
    }
    assert_eq!(b.len(), MAX_MODELS);
    // Names the caller does not vouch for never get a series, even with room.
    let b: Bounded<String> = Bounded::new(|m| m.to_string());
    assert_eq!(*b.get("sk-secret-looking-name", || false), OTHER);
    assert_eq!(b.len(), 0);
    // Asking again for a known name does not ask `known` again.
    b.get("a", || true);
    assert_eq!(*b.get("a", || panic!("looked up again")), "a");
}

#[test]
fn flags() {
    let c = MetricsConfig::from_flags(None, None).unwrap();
    assert_eq!(c.endpoint, Endpoint::Main);
    assert_eq!(c.api_key, None);
    assert_eq!(
        MetricsConfig::from_flags(Some("off"), Some(" ")).unwrap(),
        MetricsConfig {
            endpoint: Endpoint::Off,
            api_key: None
        }
    );
    let c = MetricsConfig::from_flags(Some("127.0.0.1:9464"), Some("k")).unwrap();
    assert_eq!(c.endpoint, Endpoint::Separate("127.0.0.1:9464".into()));
    assert_eq!(c.api_key.as_deref(), Some("k"));
    assert!(!format!("{c:?}").contains("\"k\""));
    for bad in ["9464", "host:", ":9464", "h:0", "h:99999", "on"] {
        let e = MetricsConfig::from_flags(Some(bad), None).unwrap_err();
        assert!(e.to_string().contains("--metrics_addr"), "{bad}: {e}");
    }
}

#[test]
fn a_key_guards_the_scrape() {
    let open = Exposition::new("controller", MetricsConfig::default());
    assert_eq!(open.scrape(&HeaderMap::new()).status(), StatusCode::OK);
    let cfg = MetricsConfig {
        endpoint: Endpoint::Main,
        api_key: Some("s3cret".into()),
    };
    let e = Exposition::new("controller", cfg);
    let with = |v: &str| {
        let mut h = HeaderMap::new();
        h.insert("authorization", v.parse().unwrap());
        e.scrape(&h).status()
    };
    assert_eq!(
        e.scrape(&HeaderMap::new()).status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(with("Bearer wrong"), StatusCode::UNAUTHORIZED);
    assert_eq!(with("Basic s3cret"), StatusCode::UNAUTHORIZED);
    assert_eq!(with("Bearer s3cret"), StatusCode::OK);
    assert_eq!(with("bearer  s3cret "), StatusCode::OK);
}

#[tokio::test]
async fn the_layer_counts_a_request_its_tokens_and_its_first_byte() {
    let (api, _, _, e) = full_exposition();
    let inner = tower::service_fn(|req: Request<Body>| async move {
        let sse = req.uri().path().ends_with("chat/completions");
        let mut r = if sse {
            let chunks = futures::stream::iter([
                Ok::<_, std::convert::Infallible>(bytes::Bytes::from_static(
                    b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
                )),
                Ok(bytes::Bytes::from_static(
                    b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n",
                )),
            ]);
            crate::http::sse_response(Body::from_stream(chunks))
        } else {
            let mut r = axum::response::Response::new(Body::from("{}"));
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            r
        };
        r.extensions_mut().insert(ModelName("gpt-x".into()));
        Ok::<_, std::convert::Infallible>(r)
    });
    let svc = MeasureLayer(api.clone()).layer(inner);
    let exp = &e;
    let call = |path: &'static str| {
        let svc = svc.clone();
        async move {
            let r = svc
                .oneshot(Request::builder().uri(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(api_in_flight(exp), 1.0, "in flight until the body is read");
            axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        }
    };
    call("/v1/chat/completions").await;
    call("/v1/embeddings").await;
    let s = parse_exposition(&e.render()).unwrap();
    // `gpt-x` is not in the (empty) view: counted as `other`.
    let key = |k: &str| s.get(k).copied().unwrap_or(0.0);
    assert_eq!(
        key(
            "dbgpt_apiserver_requests_total{route=\"chat_completions\",model=\"other\",status_class=\"2xx\"}"
        ),
        1.0
    );
    assert_eq!(
        key(
            "dbgpt_apiserver_requests_total{route=\"embeddings\",model=\"other\",status_class=\"5xx\"}"
        ),
        1.0
    );
    assert_eq!(
        key("dbgpt_apiserver_prompt_tokens_total{model=\"other\"}"),
        11.0
    );
    assert_eq!(
        key("dbgpt_apiserver_completion_tokens_total{model=\"other\"}"),
        4.0
    );
    assert_eq!(
        key("dbgpt_apiserver_time_to_first_token_seconds_count{model=\"other\"}"),
        1.0
    );
    assert_eq!(key("dbgpt_apiserver_in_flight_requests"), 0.0);
    let v = api.vitals_ref();
    assert_eq!(v.requests.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(v.errors.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert!(!e.render().contains("gpt-x"));
}

fn api_in_flight(e: &Exposition) -> f64 {
    parse_exposition(&e.render()).unwrap()["dbgpt_apiserver_in_flight_requests"]
}

#[test]
fn vitals_rate_over_the_window() {
    let v = Vitals::default();
    assert_eq!(v.rate(), 0.0);
    v.sample();
    v.requests.store(10, std::sync::atomic::Ordering::Relaxed);
    // Too soon after the first sample for a rate.
    assert_eq!(v.rate(), 0.0);
    let d = v.details();
    assert_eq!(d[1], (STATUS_IN_FLIGHT.to_string(), "0".to_string()));
    assert_eq!(d[2], (STATUS_ERRORS.to_string(), "0".to_string()));
}

/// A proxy model's pass-through stream: its first chunk is the first token, its usage gives
/// the tokens (read at its end), and it adds one inter-token observation, its mean gap; a
/// whole answer adds none. A stream the client leaves early is still recorded.
#[tokio::test]
async fn a_pass_through_stream_is_timed_and_counted_once() {
    use futures::StreamExt;
    let (_, w, _, e) = full_exposition();
    let m = w.model("proxy-m", "llm");
    let chunks = |n: usize| {
        let mut v: Vec<Result<bytes::Bytes, std::convert::Infallible>> = (0..n)
            .map(|i| {
                Ok(bytes::Bytes::from(format!(
                    "data: {{\"choices\":[{{\"delta\":{{\"content\":\"w{i}\"}}}}],\"usage\":null}}\n\n"
                )))
            })
            .collect();
        v.push(Ok(bytes::Bytes::from_static(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":5}}\n\ndata: [DONE]\n\n",
        )));
        futures::stream::iter(v).boxed()
    };
    let started = std::time::Instant::now();
    let body = m.meter_body(chunks(5), true, started);
    assert_eq!(body.collect::<Vec<_>>().await.len(), 6);
    // A whole answer: tokens, first byte, no inter-token observation.
    let whole = futures::stream::iter([Ok::<_, std::convert::Infallible>(
        bytes::Bytes::from_static(
            br#"{"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3}}"#,
        ),
    )])
    .boxed();
    m.meter_body(whole, false, started)
        .collect::<Vec<_>>()
        .await;
    // Left after two chunks: no usage seen, the mean over the chunks that came.
    let mut left = m.meter_body(chunks(5), true, started);
    left.next().await;
    left.next().await;
    drop(left);

    let s = parse_exposition(&e.render()).unwrap();
    let key = |k: &str| s.get(k).copied().unwrap_or(-1.0);
    let l = "{model=\"proxy-m\",worker_type=\"llm\"}";
    assert_eq!(key(&format!("dbgpt_worker_prompt_tokens_total{l}")), 11.0);
    assert_eq!(key(&format!("dbgpt_worker_generated_tokens_total{l}")), 8.0);
    assert_eq!(
        key(&format!(
            "dbgpt_worker_time_to_first_token_seconds_count{l}"
        )),
        3.0
    );
    assert_eq!(
        key(&format!("dbgpt_worker_inter_token_seconds_count{l}")),
        2.0
    );
}
