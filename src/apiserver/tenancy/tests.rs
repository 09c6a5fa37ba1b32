use std::collections::BTreeMap;

use axum::body::Body;
use serde_json::Value;

use super::*;
use crate::wire::keys::{KeySpec, Limits};

/// Answers syncs from memory and keeps the reports.
#[derive(Default)]
struct Fake {
    keys: Mutex<Vec<ApiKey>>,
    version: AtomicU64,
    reports: Mutex<Vec<SyncRequest>>,
    down: AtomicBool,
    /// Answers 404, as DB-GPT's own controller does.
    no_api: AtomicBool,
    calls: AtomicU64,
}

#[async_trait::async_trait]
impl KeySync for Fake {
    async fn keys_sync(&self, req: &SyncRequest) -> Result<SyncResponse, ClientError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if self.down.load(Ordering::Relaxed) {
            return Err(ClientError::Unreachable {
                url: "http://fake".into(),
                reason: "controller down".into(),
            });
        }
        if self.no_api.load(Ordering::Relaxed) {
            return Err(ClientError::Status {
                url: "http://fake".into(),
                status: 404,
                body: r#"{"detail":"Not Found"}"#.into(),
            });
        }
        lock(&self.reports).push(req.clone());
        Ok(SyncResponse {
            version: self.version.load(Ordering::Relaxed),
            keys: lock(&self.keys)
                .iter()
                .filter(|k| k.version > req.since_version)
                .cloned()
                .collect(),
            minute: Vec::new(),
            daily_tokens: BTreeMap::new(),
        })
    }
}

impl Fake {
    /// Adds (or replaces) a key; returns its secret.
    fn put(&self, id: &str, spec: KeySpec, revoked: bool) -> String {
        let v = self.version.fetch_add(1, Ordering::Relaxed) + 1;
        let secret = format!("sk-dbgpt-{id}-c2VjcmV0c2VjcmV0c2VjcmV0");
        let salt = "00112233445566778899aabbccddeeff".to_string();
        let record = ApiKey {
            id: id.into(),
            hash: wire::key_hash(&salt, &secret).unwrap(),
            salt,
            spec,
            created_at: 0,
            revoked_at: revoked.then_some(1),
            version: v,
        };
        let mut keys = lock(&self.keys);
        keys.retain(|k| k.id != id);
        keys.push(record);
        secret
    }
}

fn spec(name: &str) -> KeySpec {
    KeySpec {
        name: name.into(),
        ..KeySpec::default()
    }
}

fn auth(key: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
    );
    h
}

fn message(e: &OpenAiError) -> String {
    e.message.clone()
}

async fn body_json(resp: Response) -> Value {
    let b = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    serde_json::from_slice(&b).unwrap()
}

fn err(r: Result<Caller, OpenAiError>) -> OpenAiError {
    match r {
        Err(e) => e,
        Ok(_) => panic!("expected a refusal"),
    }
}

#[tokio::test]
async fn open_static_and_managed_keys() {
    // No keys at all: open, interactive.
    let t = Tenancy::new(vec![], "a".into());
    let c = t.authenticate(&HeaderMap::new()).unwrap();
    assert!(matches!(c, Caller::Open));
    assert_eq!(c.priority(), Priority::Interactive);

    // Static keys: full access; anything else 401.
    let t = Tenancy::new(vec!["static-1".into()], "a".into());
    assert!(matches!(
        t.authenticate(&auth("static-1")),
        Ok(Caller::Static)
    ));
    let e = err(t.authenticate(&auth("static-2")));
    assert_eq!(e.status, StatusCode::UNAUTHORIZED);
    assert_eq!(message(&e), "Incorrect API key provided.");
    assert!(message(&err(t.authenticate(&HeaderMap::new()))).contains("didn't provide"));

    // A managed key learned by a sync makes keys required even without static ones.
    let fake = Fake::default();
    let mut batch = spec("team-b");
    batch.priority = Priority::Batch;
    let secret = fake.put("abc123", batch, false);
    let t = Tenancy::new(vec![], "a".into());
    assert!(!t.required());
    t.sync_once(&fake).await.unwrap();
    assert!(t.required());
    assert!(message(&err(t.authenticate(&HeaderMap::new()))).contains("didn't provide"));
    let c = t.authenticate(&auth(&secret)).unwrap();
    assert_eq!(c.priority(), Priority::Batch);
    assert!(matches!(&c, Caller::Key(e) if e.name() == "team-b"));
    // Again: from the verified-secret cache.
    assert!(matches!(t.authenticate(&auth(&secret)), Ok(Caller::Key(_))));
    // A wrong secret for a known id, an unknown id: incorrect.
    let wrong = secret.replace("c2Vj", "c2VK");
    assert_eq!(
        message(&err(t.authenticate(&auth(&wrong)))),
        "Incorrect API key provided."
    );
    assert_eq!(
        message(&err(t.authenticate(&auth("sk-dbgpt-zzz999-c2VjcmV0")))),
        "Incorrect API key provided."
    );
}

#[tokio::test]
async fn revoked_and_expired_keys_are_told_so() {
    let fake = Fake::default();
    let s1 = fake.put("aaa111", spec("gone"), true);
    let mut old = spec("old");
    old.expires_at = Some(1_000_000_000);
    let s2 = fake.put("bbb222", old, false);
    let mut later = spec("later");
    later.expires_at = Some(4_000_000_000);
    let s3 = fake.put("ccc333", later, false);
    let t = Tenancy::new(vec![], "a".into());
    t.sync_once(&fake).await.unwrap();
    let e = err(t.authenticate(&auth(&s1)));
    assert_eq!(
        (e.status, message(&e).as_str()),
        (StatusCode::UNAUTHORIZED, "The API key 'gone' was revoked.")
    );
    let e = err(t.authenticate(&auth(&s2)));
    assert_eq!(
        message(&e),
        "The API key 'old' expired at 2001-09-09 01:46:40 UTC."
    );
    assert!(t.authenticate(&auth(&s3)).is_ok());
    // A key revoked later is learned by the next sync (only the change comes back).
    fake.put("ccc333", spec("later"), true);
    t.sync_once(&fake).await.unwrap();
    assert_eq!(lock(&fake.reports).last().unwrap().since_version, 3);
    assert!(message(&err(t.authenticate(&auth(&s3)))).contains("revoked"));
    // The other keys are still known.
    assert!(message(&err(t.authenticate(&auth(&s1)))).contains("revoked"));
}

#[tokio::test]
async fn models_outside_the_list_are_forbidden() {
    let fake = Fake::default();
    let mut s = spec("team-a");
    s.models = Some(vec!["m1".into(), "m2".into()]);
    let secret = fake.put("abc123", s, false);
    let t = Tenancy::new(vec![], "a".into());
    t.sync_once(&fake).await.unwrap();
    let c = t.authenticate(&auth(&secret)).unwrap();
    assert!(c.allows("m1") && !c.allows("m3"));
    assert!(t.admit(&c, "m1").unwrap().is_some());
    let resp = t.admit(&c, "m3").unwrap_err();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let v = body_json(*resp).await;
    assert_eq!(v["error"]["code"], "model_not_allowed");
    assert_eq!(v["error"]["param"], "model");
    assert!(v["error"]["message"].as_str().unwrap().contains("'m3'"));
    // Static and open callers have no lease and no limits.
    assert!(t.admit(&Caller::Static, "m3").unwrap().is_none());
}

#[tokio::test]
async fn over_a_limit_is_a_429_with_openai_headers() {
    let fake = Fake::default();
    let mut s = spec("team-a");
    s.limits.rpm = Some(2);
    s.limits.tpm = Some(1000);
    s.model_limits.insert(
        "big".into(),
        Limits {
            max_concurrency: Some(1),
            ..Limits::default()
        },
    );
    let secret = fake.put("abc123", s, false);
    let t = Tenancy::new(vec![], "a".into());
    t.sync_once(&fake).await.unwrap();
    let c = t.authenticate(&auth(&secret)).unwrap();

    // The model's concurrency: a second request while the first is in flight is refused,
    // and does not use up the key's rpm.
    let first = t.admit(&c, "big").unwrap();
    let resp = t.admit(&c, "big").unwrap_err();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let v = body_json(*resp).await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("on model 'big'"),
        "{v}"
    );
    // The lease goes on a successful answer: x-ratelimit headers, then it is released.
    let ok = attach(Response::new(Body::empty()), first);
    let h = ok.headers();
    assert_eq!(h["x-ratelimit-limit-requests"], "2");
    assert_eq!(h["x-ratelimit-remaining-requests"], "1");
    assert_eq!(h["x-ratelimit-limit-tokens"], "1000");
    assert_eq!(h["x-ratelimit-remaining-tokens"], "1000");
    assert!(h.contains_key("x-ratelimit-reset-requests"));
    let charge = ok.extensions().get::<Charge>().unwrap().clone();
    charge.0.tokens(Tokens {
        prompt_tokens: 10,
        completion_tokens: 5,
    });
    drop((ok, charge));

    // The second request of the minute fits; the third is over the rpm.
    drop(t.admit(&c, "m").unwrap());
    let resp = t.admit(&c, "m").unwrap_err();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let h = resp.headers().clone();
    assert!(
        h[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(h["x-ratelimit-limit-requests"], "2");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    assert_eq!(h["x-ratelimit-remaining-tokens"], "985");
    let v = body_json(*resp).await;
    assert_eq!(v["error"]["type"], "requests");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("'team-a'") && msg.contains("(rpm)"), "{msg}");
    let limited = t
        .metrics
        .limited
        .get_or_create(&vec![
            ("key", "team-a".to_string()),
            ("limit", "rpm".to_string()),
        ])
        .get();
    assert_eq!(limited, 1);
}

#[tokio::test]
async fn usage_is_reported_and_kept_while_the_controller_is_down() {
    let fake = Fake::default();
    let secret = fake.put("abc123", spec("team-a"), false);
    let t = Tenancy::new(vec![], "a".into());
    t.sync_once(&fake).await.unwrap();
    let c = t.authenticate(&auth(&secret)).unwrap();
    for _ in 0..2 {
        let lease = t.admit(&c, "m").unwrap();
        let resp = attach(Response::new(Body::empty()), lease);
        let charge = resp.extensions().get::<Charge>().unwrap().clone();
        charge.0.tokens(Tokens {
            prompt_tokens: 3,
            completion_tokens: 4,
        });
    }
    // A failed answer counts in no usage row.
    let lease = t.admit(&c, "m").unwrap();
    let mut bad = Response::new(Body::empty());
    *bad.status_mut() = StatusCode::BAD_GATEWAY;
    drop(attach(bad, lease));

    fake.down.store(true, Ordering::Relaxed);
    assert!(t.sync_once(&fake).await.is_err());
    // Known keys keep working while the controller is down.
    assert!(t.authenticate(&auth(&secret)).is_ok());
    fake.down.store(false, Ordering::Relaxed);
    t.sync_once(&fake).await.unwrap();
    let last = lock(&fake.reports).last().unwrap().clone();
    assert_eq!(last.usage.len(), 1);
    let row = &last.usage[0];
    assert_eq!((row.key_id.as_str(), row.model.as_str()), ("abc123", "m"));
    assert_eq!(
        (row.requests, row.prompt_tokens, row.completion_tokens),
        (2, 6, 8)
    );
    assert_eq!(row.day.len(), 10);
    let minute: u64 = last.minute.iter().map(|m| m.requests).sum();
    assert_eq!(minute, 3, "every admitted request counts in the minute");
    assert_eq!(last.minute.iter().map(|m| m.tokens).sum::<u64>(), 14);
    // Reported once only.
    t.sync_once(&fake).await.unwrap();
    assert!(lock(&fake.reports).last().unwrap().usage.is_empty());
    let reqs = t
        .metrics
        .requests
        .get_or_create(&vec![
            ("key", "team-a".to_string()),
            ("model", "m".to_string()),
        ])
        .get();
    assert_eq!(reqs, 2);
}

#[tokio::test]
async fn a_stream_without_include_usage_is_counted_and_its_usage_chunk_hidden() {
    let fake = Fake::default();
    let secret = fake.put("abc123", spec("team-a"), false);
    let t = Tenancy::new(vec![], "a".into());
    t.sync_once(&fake).await.unwrap();
    let c = t.authenticate(&auth(&secret)).unwrap();
    let mut lease = t.admit(&c, "m").unwrap();
    let raw = br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut r = crate::openai::parse_chat(raw).unwrap();
    assert!(!r.include_usage);
    let body = stream_usage(&mut r, bytes::Bytes::from_static(raw), &mut lease);
    assert!(r.include_usage);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["stream_options"]["include_usage"], true);
    assert_eq!(v["messages"][0]["content"], "hi");
    // A static caller's request is left alone.
    let mut r2 = crate::openai::parse_chat(raw).unwrap();
    let same = stream_usage(&mut r2, bytes::Bytes::from_static(raw), &mut None);
    assert!(!r2.include_usage && same == bytes::Bytes::from_static(raw));

    let events: Vec<&'static str> = vec![
        "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"x\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n",
    ];
    let stream = futures::stream::iter(
        events
            .into_iter()
            .map(|e| Ok::<_, std::convert::Infallible>(bytes::Bytes::from_static(e.as_bytes()))),
    );
    let resp = attach(crate::http::sse_response(Body::from_stream(stream)), lease);
    assert!(resp.extensions().get::<Charge>().is_none());
    let text = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&text);
    assert!(!text.contains("\"choices\":[]"), "{text}");
    assert!(
        text.contains("\"content\":\"a\"") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    t.sync_once(&fake).await.unwrap();
    let reports = lock(&fake.reports);
    let row = &reports.last().unwrap().usage[0];
    assert_eq!(
        (row.requests, row.prompt_tokens, row.completion_tokens),
        (1, 5, 2)
    );
}

#[test]
fn a_large_backlog_goes_out_in_bounded_reports_oldest_first() {
    let t = Tenancy::new(vec![], "a".into());
    let row = |i: usize| UsageRow {
        key_id: "abc123".into(),
        key_name: String::new(),
        model: format!("m{i}"),
        day: "2026-12-07".into(),
        requests: 1,
        prompt_tokens: 0,
        completion_tokens: 0,
    };
    *lock(&t.backlog) = (0..MAX_REPORT_ROWS + 5).map(row).collect();
    let report = t.take_report();
    assert_eq!(report.usage.len(), MAX_REPORT_ROWS);
    assert_eq!(report.usage[0].model, "m0");
    assert_eq!(lock(&t.backlog).len(), 5);
    // A failed report goes back in front of the rest, in order.
    t.sync_failed(report);
    let all = lock(&t.backlog).clone();
    assert_eq!(all.len(), MAX_REPORT_ROWS + 5);
    assert!(
        all.iter()
            .enumerate()
            .all(|(i, r)| r.model == format!("m{i}"))
    );
    // Past MAX_BACKLOG the oldest rows are dropped.
    *lock(&t.backlog) = (0..MAX_BACKLOG).map(row).collect();
    let report = t.take_report();
    let mut more = report.clone();
    more.usage.push(row(MAX_BACKLOG));
    t.sync_failed(more);
    let all = lock(&t.backlog).clone();
    assert_eq!(all.len(), MAX_BACKLOG);
    assert_eq!(all[0].model, "m1");
}

/// DB-GPT's own controller has no keys API: its 404 is no failure, the apiserver stays
/// open (no keys), asks again only every [`NO_KEYS_API_RETRY`], and picks keys up when a
/// controller with the API answers. A controller that is down is retried every interval.
#[tokio::test]
async fn a_controller_without_the_keys_api_is_asked_rarely() {
    let fake = Arc::new(Fake::default());
    fake.no_api.store(true, Ordering::Relaxed);
    let t = Arc::new(Tenancy::new(vec![], "a".into()));
    let e = t.sync_once(&*fake).await.unwrap_err();
    assert!(no_keys_api(&e), "{e}");
    assert!(t.controller_has_no_keys_api() && !t.required());
    assert!(matches!(
        t.authenticate(&HeaderMap::new()),
        Ok(Caller::Open)
    ));

    let stop = CancellationToken::new();
    let calls = fake.calls.load(Ordering::Relaxed);
    let h = t.spawn_loop(fake.clone(), Duration::from_millis(5), stop.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        fake.calls.load(Ordering::Relaxed),
        calls,
        "asked again within a second"
    );
    stop.cancel();
    h.await.unwrap();

    // Down, not without the API: asked every interval.
    fake.no_api.store(false, Ordering::Relaxed);
    fake.down.store(true, Ordering::Relaxed);
    let t2 = Arc::new(Tenancy::new(vec![], "b".into()));
    let stop = CancellationToken::new();
    let calls = fake.calls.load(Ordering::Relaxed);
    let h = t2.spawn_loop(fake.clone(), Duration::from_millis(5), stop.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(fake.calls.load(Ordering::Relaxed) - calls >= 5);
    stop.cancel();
    h.await.unwrap();

    // The API appears (the controller was upgraded): keys are learned.
    fake.down.store(false, Ordering::Relaxed);
    let secret = fake.put("abc123", spec("team-a"), false);
    t.sync_once(&*fake).await.unwrap();
    assert!(!t.controller_has_no_keys_api() && t.required());
    assert!(t.authenticate(&auth(&secret)).is_ok());
}
