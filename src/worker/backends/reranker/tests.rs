//! The reranker against an independent computation: a plain-loop cross-encoder forward pass
//! (BERT or XLM-RoBERTa) over the same weights file, one unpadded pair at a time.

use std::collections::HashMap;

use serde_json::json;

use super::super::require_test_model;
use super::fixture::Arch;
use super::*;
use crate::worker::backends::batcher::BatchConfig;

/// A tiny random cross-encoder in a temporary directory.
fn tiny(arch: Arch, activation: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let tok = require_test_model("all-MiniLM-L6-v2/tokenizer.json");
    fixture::write(dir.path(), &tok, arch, activation).unwrap();
    dir
}

/// The weights as flat row-major `f32` vectors by name.
struct Weights(HashMap<String, Vec<f32>>);

impl Weights {
    fn read(dir: &Path) -> Self {
        let tensors = candle_core::safetensors::load(
            dir.join("model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        Weights(
            tensors
                .into_iter()
                .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
                .collect(),
        )
    }

    fn get(&self, name: &str) -> &[f32] {
        self.0.get(name).unwrap_or_else(|| panic!("missing {name}"))
    }

    /// `W x + b` with `W` stored `(out, in)` as PyTorch does.
    fn linear(&self, prefix: &str, x: &[f32]) -> Vec<f32> {
        let w = self.get(&format!("{prefix}.weight"));
        let b = self.get(&format!("{prefix}.bias"));
        let n_in = x.len();
        b.iter()
            .enumerate()
            .map(|(o, bias)| {
                bias + w[o * n_in..(o + 1) * n_in]
                    .iter()
                    .zip(x)
                    .map(|(a, b)| a * b)
                    .sum::<f32>()
            })
            .collect()
    }

    fn layer_norm(&self, prefix: &str, x: &mut [f32]) {
        let g = self.get(&format!("{prefix}.weight"));
        let b = self.get(&format!("{prefix}.bias"));
        let n = x.len() as f32;
        let mean = x.iter().sum::<f32>() / n;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let inv = 1.0 / (var + 1e-12).sqrt();
        for (i, v) in x.iter_mut().enumerate() {
            *v = (*v - mean) * inv * g[i] + b[i];
        }
    }
}

/// erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7).
fn erf(x: f32) -> f32 {
    let x = f64::from(x);
    let t = 1.0 / (1.0 + 0.3275911 * x.abs());
    let y = 1.0
        - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
            + 0.254829592)
            * t
            * (-x * x).exp();
    (if x >= 0.0 { y } else { -y }) as f32
}

fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x / std::f32::consts::SQRT_2))
}

/// The `*ForSequenceClassification` logit for one unpadded token sequence. XLM-RoBERTa: one
/// token type, position `pad + 1 + t` (the fixture's padding id is 0), and the head
/// `out_proj(tanh(dense(h0)))` instead of BERT's pooler and classifier.
fn reference_logit(w: &Weights, arch: Arch, ids: &[u32], types: &[u32]) -> f32 {
    let (enc, first_position) = match arch {
        Arch::Bert => ("bert", 0),
        Arch::XlmRoberta => ("roberta", 1),
    };
    let h = fixture::HIDDEN;
    let heads = fixture::HEADS;
    let d = h / heads;
    let n = ids.len();
    let row = |name: &str, i: usize| w.get(name)[i * h..(i + 1) * h].to_vec();
    let mut x: Vec<Vec<f32>> = (0..n)
        .map(|t| {
            let word = row(
                &format!("{enc}.embeddings.word_embeddings.weight"),
                ids[t] as usize,
            );
            let pos = row(
                &format!("{enc}.embeddings.position_embeddings.weight"),
                first_position + t,
            );
            let ty_id = if arch == Arch::Bert { types[t] } else { 0 };
            let ty = row(
                &format!("{enc}.embeddings.token_type_embeddings.weight"),
                ty_id as usize,
            );
            let mut e: Vec<f32> = (0..h).map(|i| word[i] + pos[i] + ty[i]).collect();
            w.layer_norm(&format!("{enc}.embeddings.LayerNorm"), &mut e);
            e
        })
        .collect();
    for l in 0..fixture::LAYERS {
        let p = format!("{enc}.encoder.layer.{l}");
        let q: Vec<_> = x
            .iter()
            .map(|v| w.linear(&format!("{p}.attention.self.query"), v))
            .collect();
        let k: Vec<_> = x
            .iter()
            .map(|v| w.linear(&format!("{p}.attention.self.key"), v))
            .collect();
        let v: Vec<_> = x
            .iter()
            .map(|v| w.linear(&format!("{p}.attention.self.value"), v))
            .collect();
        let mut next = Vec::with_capacity(n);
        for i in 0..n {
            let mut ctx = vec![0f32; h];
            for hd in 0..heads {
                let r = hd * d..(hd + 1) * d;
                let s: Vec<f32> = (0..n)
                    .map(|j| {
                        q[i][r.clone()]
                            .iter()
                            .zip(&k[j][r.clone()])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            / (d as f32).sqrt()
                    })
                    .collect();
                let max = s.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = s.iter().map(|z| (z - max).exp()).collect();
                let total: f32 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for c in r.clone() {
                        ctx[c] += ej / total * v[j][c];
                    }
                }
            }
            let mut a = w.linear(&format!("{p}.attention.output.dense"), &ctx);
            for (c, xc) in a.iter_mut().zip(&x[i]) {
                *c += xc;
            }
            w.layer_norm(&format!("{p}.attention.output.LayerNorm"), &mut a);
            let inter: Vec<f32> = w
                .linear(&format!("{p}.intermediate.dense"), &a)
                .into_iter()
                .map(gelu)
                .collect();
            let mut o = w.linear(&format!("{p}.output.dense"), &inter);
            for (c, ac) in o.iter_mut().zip(&a) {
                *c += ac;
            }
            w.layer_norm(&format!("{p}.output.LayerNorm"), &mut o);
            next.push(o);
        }
        x = next;
    }
    let (dense, out) = match arch {
        Arch::Bert => ("bert.pooler.dense", "classifier"),
        Arch::XlmRoberta => ("classifier.dense", "classifier.out_proj"),
    };
    let pooled: Vec<f32> = w.linear(dense, &x[0]).into_iter().map(f32::tanh).collect();
    w.linear(out, &pooled)[0]
}

/// The reference score of every document, each pair tokenised alone (no padding).
fn reference_scores(
    dir: &Path,
    arch: Arch,
    query: &str,
    docs: &[String],
    sigmoid: bool,
) -> Vec<f32> {
    let w = Weights::read(dir);
    let mut tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    tok.with_padding(None);
    tok.with_truncation(None).unwrap();
    docs.iter()
        .map(|doc| {
            let e = tok.encode((query, doc.as_str()), true).unwrap();
            let logit = reference_logit(&w, arch, e.get_ids(), e.get_type_ids());
            if sigmoid {
                1.0 / (1.0 + (-logit).exp())
            } else {
                logit
            }
        })
        .collect()
}

fn docs() -> Vec<String> {
    [
        "Paris is the capital of France.",
        "bananas",
        "The Eiffel tower stands in Paris, a city on the Seine with many museums.",
        "",
        "capital city",
    ]
    .map(String::from)
    .to_vec()
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() < 1e-4 * w.abs().max(1.0),
            "document {i}: got {g}, reference {w} (all: {got:?} vs {want:?})"
        );
    }
}

#[tokio::test]
async fn sigmoid_scores_match_an_independent_forward_pass_bert_and_xlm_roberta() {
    for arch in [Arch::Bert, Arch::XlmRoberta] {
        let dir = tiny(arch, None);
        let m = BertRerankerBackend::load(RerankerConfig::new(dir.path())).unwrap();
        assert_eq!(m.activation(), ScoreActivation::Sigmoid);
        let query = "What is the capital of France?";
        // One padded batch of pairs of different lengths.
        let got = m.rerank(query.into(), docs()).await.unwrap();
        let want = reference_scores(dir.path(), arch, query, &docs(), true);
        assert_close(&got, &want);
        assert!(got.iter().all(|s| (0.0..=1.0).contains(s)), "{got:?}");
        // Distinct documents, distinct scores (the weights are used, not a constant).
        assert!(
            got.windows(2).any(|p| (p[0] - p[1]).abs() > 1e-6),
            "{arch:?}: {got:?}"
        );
    }
}

/// Concurrent one-document requests (merged into shared passes by the batcher, with
/// different queries in one pass) get the scores of the independent unbatched computation.
#[tokio::test]
async fn concurrent_requests_are_batched_without_changing_scores() {
    for arch in [Arch::Bert, Arch::XlmRoberta] {
        let dir = tiny(arch, None);
        let m = BertRerankerBackend::load(RerankerConfig::new(dir.path())).unwrap();
        let queries = [
            "What is the capital of France?",
            "tower",
            "a much longer query about rivers and the bridges that cross them",
        ];
        let calls: Vec<_> = queries
            .iter()
            .flat_map(|q| docs().into_iter().map(move |d| (q.to_string(), d)))
            .collect();
        let got = futures::future::join_all(
            calls
                .iter()
                .map(|(q, d)| tokio::spawn(m.rerank(q.clone(), vec![d.clone()]))),
        )
        .await;
        for (q, chunk) in queries.iter().zip(got.chunks(docs().len())) {
            let got: Vec<f32> = chunk
                .iter()
                .map(|r| r.as_ref().unwrap().as_ref().unwrap()[0])
                .collect();
            assert_close(&got, &reference_scores(dir.path(), arch, q, &docs(), true));
        }
    }
}

#[tokio::test]
async fn identity_checkpoints_give_raw_logits_and_sub_batches_agree() {
    let dir = tiny(Arch::Bert, Some("torch.nn.modules.linear.Identity"));
    let cfg = RerankerConfig {
        batch: BatchConfig {
            max_batch: 2,
            ..BatchConfig::default()
        },
        ..RerankerConfig::new(dir.path())
    };
    let small = BertRerankerBackend::load_async(cfg).await.unwrap();
    assert_eq!(small.activation(), ScoreActivation::Identity);
    let query = "tower";
    let got = small.rerank(query.into(), docs()).await.unwrap();
    assert_close(
        &got,
        &reference_scores(dir.path(), Arch::Bert, query, &docs(), false),
    );
    let whole = BertRerankerBackend::load(RerankerConfig::new(dir.path()))
        .unwrap()
        .rerank(query.into(), docs())
        .await
        .unwrap();
    assert_close(&got, &whole);
    // A document far past the position limit is truncated, not an error; none is nothing.
    let long = "word ".repeat(500);
    let s = small.rerank(query.into(), vec![long]).await.unwrap();
    assert!(s.len() == 1 && s[0].is_finite(), "{s:?}");
    assert!(
        small
            .rerank(query.into(), Vec::new())
            .await
            .unwrap()
            .is_empty()
    );
}

#[test]
fn activations_from_config() {
    let a = |v: Value| ScoreActivation::from_config(&v);
    assert_eq!(a(json!({})), Ok(ScoreActivation::Sigmoid));
    assert_eq!(
        a(json!({"sbert_ce_default_activation_function": "torch.nn.modules.linear.Identity"})),
        Ok(ScoreActivation::Identity)
    );
    assert_eq!(
        a(
            json!({"sentence_transformers": {"activation_fn": "torch.nn.modules.activation.Sigmoid"}})
        ),
        Ok(ScoreActivation::Sigmoid)
    );
    assert!(a(json!({"sentence_transformers": {"activation_fn": "torch.nn.Tanh"}})).is_err());
    assert!((ScoreActivation::Sigmoid.apply(0.0) - 0.5).abs() < 1e-7);
    assert_eq!(ScoreActivation::Identity.apply(-3.5), -3.5);
}

#[test]
fn what_is_not_a_bert_cross_encoder_is_refused_at_load() {
    let dir = tiny(Arch::Bert, None);
    assert!(is_cross_encoder(dir.path()));
    assert!(!is_cross_encoder(&require_test_model("all-MiniLM-L6-v2")));
    let config_path = dir.path().join("config.json");
    let original: Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    let refused = |edit: &dyn Fn(&mut Value), says: &str| {
        let mut c = original.clone();
        edit(&mut c);
        std::fs::write(&config_path, serde_json::to_vec(&c).unwrap()).unwrap();
        let e = BertRerankerBackend::load(RerankerConfig::new(dir.path())).unwrap_err();
        assert!(
            matches!(&e, BackendError::Load { path, .. } if path.ends_with("config.json")),
            "{e:?}"
        );
        assert!(e.to_string().contains(says), "{e}");
    };
    refused(
        &|c| c["id2label"] = json!({"0": "no", "1": "yes"}),
        "num_labels 1",
    );
    refused(
        &|c| c["architectures"] = json!(["DebertaV2ForSequenceClassification"]),
        "DebertaV2ForSequenceClassification",
    );
    refused(
        &|c| c["sbert_ce_default_activation_function"] = json!("torch.nn.Tanh"),
        "Tanh",
    );
    // An embedding model is not a reranker.
    let e = BertRerankerBackend::load(RerankerConfig::new(require_test_model("all-MiniLM-L6-v2")))
        .unwrap_err();
    assert!(
        e.to_string().contains("BertForSequenceClassification"),
        "{e}"
    );
}
