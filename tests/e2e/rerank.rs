//! Rerank end to end with a tiny random cross-encoder (no real reranker weights are
//! installed here): a `reranker` worker and a DB-GPT 0.5-style `text2vec` worker serving the
//! same directory, an embedding and a chat model beside them, and the apiserver's
//! `/v1/rerank` (also `/rerank`, `/v2/rerank`, `/api/v1/rerank`) and `beta/relevance`
//! checked against the backend's own scores, with their bad-input answers.

use std::path::Path;
use std::time::Duration;

use dbgpt_cluster::worker::backends::{
    BertRerankerBackend, RerankBackend, RerankerConfig, fixture,
};
use serde_json::{Value, json};

use crate::common::*;
use crate::worker::{gguf, minilm, worker};

const QUERY: &str = "Where is the Eiffel tower?";

fn documents() -> Vec<String> {
    [
        "The Eiffel tower is in Paris.",
        "Bananas are yellow.",
        "Paris is the capital of France, on the Seine.",
        "",
        "tower",
    ]
    .map(String::from)
    .to_vec()
}

/// The scores the reranker backend gives in-process (what the cluster must relay).
fn expected_scores(dir: &Path) -> Vec<f32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let m = BertRerankerBackend::load(RerankerConfig::new(dir)).unwrap();
    rt.block_on(m.rerank(QUERY.into(), documents())).unwrap()
}

/// Asserts a rerank answer: `n` results by descending score, each the expected score of its
/// document, with the document's text exactly when `with_documents`.
fn check_results(v: &Value, want: &[f32], n: usize, with_documents: bool) {
    let results = v["results"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(results.len(), n, "{v}");
    let mut order: Vec<usize> = (0..want.len()).collect();
    order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
    for (r, &i) in results.iter().zip(&order) {
        assert_eq!(r["index"].as_u64(), Some(i as u64), "{v}");
        let score = r["relevance_score"].as_f64().unwrap();
        assert!((score - f64::from(want[i])).abs() < 1e-6, "{v}");
        if with_documents {
            assert_eq!(r["document"]["text"], documents()[i].as_str(), "{v}");
        } else {
            assert!(r.get("document").is_none(), "{v}");
        }
    }
    assert!(v["usage"]["total_tokens"].is_u64(), "{v}");
}

#[test]
fn rerank_through_the_cluster_with_a_tiny_cross_encoder() {
    let env = TestEnv::new();
    let dir = env.path("tiny-reranker");
    let tokenizer = Path::new(&minilm()).join("tokenizer.json");
    fixture::write(&dir, &tokenizer, fixture::Arch::Bert, None).unwrap();
    let want = expected_scores(&dir);
    // Distinct scores, so that the order is well defined.
    let mut sorted = want.clone();
    sorted.sort_by(f32::total_cmp);
    assert!(sorted.windows(2).all(|p| p[1] - p[0] > 1e-6), "{want:?}");

    let c = env.controller(&[]);
    let d = dir.display().to_string();
    let serve = |name: &str, worker_type: &str, path: &str| {
        let args = [
            "--model_name",
            name,
            "--worker_type",
            worker_type,
            "--model_path",
            path,
        ];
        worker(&env, &c.url(), &args)
    };
    let rr = serve("tiny", "reranker", &d);
    let _old = serve("old", "text2vec", &d);
    let _emb = serve("all-minilm", "text2vec", &minilm());
    let _llm = worker(
        &env,
        &c.url(),
        &["--model_name", "smollm2", "--model_path", &gguf()],
    );
    let api = apiserver(&env, &c.url(), &[]);
    assert!(wait_until(Duration::from_secs(10), || {
        let (s, v) = json_req(api.port, "GET", "/v1/models", None);
        let ids: Vec<&str> = v["data"]
            .as_array()
            .map(|d| d.iter().filter_map(|m| m["id"].as_str()).collect())
            .unwrap_or_default();
        s == 200
            && ["tiny", "old", "all-minilm", "smollm2"]
                .iter()
                .all(|m| ids.contains(m))
    }));
    // Registered under DB-GPT's keys: 0.7's `@reranker`, 0.5's `@text2vec`.
    let (_, list) = json_req(c.port, "GET", "/api/controller/models", None);
    let keys: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["model_name"].as_str())
        .collect();
    assert!(
        keys.contains(&"tiny@reranker") && keys.contains(&"old@text2vec"),
        "{keys:?}"
    );

    // Jina / Cohere shape, sorted, cut to top_n, documents on request; every path.
    let ask = json!({"model": "tiny", "query": QUERY, "documents": documents(), "top_n": 3, "return_documents": true});
    let (s, v) = json_req(api.port, "POST", "/v1/rerank", Some(&ask));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["model"], "tiny");
    check_results(&v, &want, 3, true);
    for path in ["/rerank", "/v2/rerank", "/api/v1/rerank"] {
        let body = json!({"model": "tiny", "query": QUERY, "documents": documents()});
        let (s, v) = json_req(api.port, "POST", path, Some(&body));
        assert_eq!(s, 200, "{path}: {v}");
        check_results(&v, &want, 5, false);
    }
    // The same model served the 0.5 way (a text2vec worker), with Cohere's text objects.
    let objs: Vec<Value> = documents().iter().map(|d| json!({"text": d})).collect();
    let body = json!({"model": "old", "query": QUERY, "documents": objs, "top_n": 10});
    let (s, v) = json_req(api.port, "POST", "/v1/rerank", Some(&body));
    assert_eq!(s, 200, "{v}");
    check_results(&v, &want, 5, false);
    // DB-GPT's relevance: the scores in request order.
    for model in ["tiny", "old"] {
        let body = json!({"model": model, "query": QUERY, "documents": documents()});
        let (s, v) = json_req(api.port, "POST", "/api/v1/beta/relevance", Some(&body));
        assert_eq!(s, 200, "{v}");
        let got: Vec<f64> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - f64::from(*w)).abs() < 1e-6, "{v}");
        }
    }

    // Bad input: an OpenAI error naming the field, never a 5xx.
    let docs = documents();
    let cases = [
        (
            json!({"model": "tiny", "query": QUERY, "documents": []}),
            400,
            "documents",
        ),
        (json!({"model": "tiny", "query": QUERY}), 400, "documents"),
        (
            json!({"model": "tiny", "query": QUERY, "documents": ["a", 5]}),
            400,
            "documents[1]",
        ),
        (json!({"model": "tiny", "documents": docs}), 400, "query"),
        (
            json!({"model": "tiny", "query": QUERY, "documents": docs, "top_n": 0}),
            400,
            "top_n",
        ),
        (
            json!({"model": "tiny", "query": QUERY, "documents": docs, "top_n": 2.5}),
            400,
            "top_n",
        ),
        (
            json!({"model": "nope", "query": QUERY, "documents": docs}),
            404,
            "model",
        ),
        (
            json!({"model": "all-minilm", "query": QUERY, "documents": docs}),
            400,
            "model",
        ),
        (
            json!({"model": "smollm2", "query": QUERY, "documents": docs}),
            400,
            "model",
        ),
    ];
    for (body, status, param) in cases {
        let (s, v) = json_req(api.port, "POST", "/v1/rerank", Some(&body));
        assert_eq!(s, status, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
        assert!(
            v["error"]["type"].is_string() && v["error"]["code"].is_string(),
            "{v}"
        );
    }
    let (_, v) = json_req(
        api.port,
        "POST",
        "/v1/rerank",
        Some(&json!({"model": "all-minilm", "query": QUERY, "documents": docs})),
    );
    assert_eq!(v["error"]["code"], "model_not_reranker", "{v}");

    // The worker itself: DB-GPT's embeddings call with the query answers `[[scores]]`;
    // without the query a reranker says what is missing.
    let body =
        json!({"model": "tiny", "input": documents(), "query": QUERY, "worker_type": "reranker"});
    let (s, v) = json_req(rr.port, "POST", "/api/worker/embeddings", Some(&body));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v[0].as_array().map(Vec::len), Some(want.len()), "{v}");
    let body = json!({"model": "tiny", "input": documents()});
    let (s, v) = json_req(rr.port, "POST", "/api/worker/embeddings", Some(&body));
    assert_eq!(s, 400, "{v}");
    assert!(v.to_string().contains("query"), "{v}");
}
