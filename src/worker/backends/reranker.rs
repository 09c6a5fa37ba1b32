//! Cross-encoder rerankers run in-process through candle, reproducing what DB-GPT's reranker
//! does (sentence-transformers' `CrossEncoder.predict`): each (query, document) pair is
//! tokenised by the model's tokenizer as one pair (for BERT `[CLS] query [SEP] document
//! [SEP]` with token type 0 for the query part and 1 for the document part; the longer part
//! is truncated first) and run through the encoder, and the first token's state goes through
//! the checkpoint's classification head. Two layouts: `BertForSequenceClassification`
//! (e.g. cross-encoder/ms-marco-MiniLM-L-6-v2: pooler `tanh(dense(h))`, then the one-logit
//! classifier) and `XLMRobertaForSequenceClassification` (e.g. BAAI/bge-reranker-base: one
//! token type, positions counted from the padding id, `out_proj(tanh(dense(h)))`).
//!
//! The score is `sigmoid(logit)` unless the checkpoint says otherwise, exactly as
//! sentence-transformers decides it: `config.json`'s `sentence_transformers.activation_fn`
//! (sentence-transformers 4+) or `sbert_ce_default_activation_function` (older) naming
//! `Identity` gives the raw logit (ms-marco-MiniLM does this), `Sigmoid` or nothing gives the
//! sigmoid (bge-style checkpoints without the key). Only `num_labels == 1` heads are
//! rerankers.
//!
//! The directory holds `config.json`, `model.safetensors` and `tokenizer.json`, as for the
//! embedding models ([`super::embedding::BertDir`]). Pairs go through the model's
//! [`Lanes`], as the embedding model's texts: the pairs of concurrent requests are merged
//! into forward passes of at most [`BatchConfig::max_batch`] pairs, cut by length and
//! padded with the padding masked ([`super::embedding::padded_batches`]), so a pair gets the
//! same score alone or batched; dropping the `rerank` future withdraws the pairs not yet in
//! a pass. [`fixture`] writes a tiny random cross-encoder directory for tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use candle_core::{IndexOp, Module};
use candle_nn::Linear;
use candle_transformers::models::xlm_roberta::{
    Config as XlmRobertaConfig, XLMRobertaForSequenceClassification,
};
use futures::future::BoxFuture;
use serde_json::Value;
use tokenizers::{Tokenizer, TruncationParams};

use super::batcher::{BatchConfig, BatchModel, Lanes};
use super::bert::Bert;
use super::embedding::{BertDir, compute_pool, padded_batches};
use super::{BackendError, RerankBackend};

pub mod fixture;
#[cfg(test)]
mod tests;

/// Configuration of a [`BertRerankerBackend`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RerankerConfig {
    /// Directory with `config.json`, `model.safetensors`, `tokenizer.json`.
    pub model_dir: PathBuf,
    /// Maximum tokens per (query, document) pair, capped by the model's
    /// `max_position_embeddings` (sentence-transformers uses the model's 512).
    pub max_length: usize,
    /// How concurrent requests are merged into forward passes.
    pub batch: BatchConfig,
}

impl RerankerConfig {
    /// Defaults: max 512 tokens per pair, [`BatchConfig::default`].
    pub fn new(model_dir: impl Into<PathBuf>) -> Self {
        RerankerConfig {
            model_dir: model_dir.into(),
            max_length: 512,
            batch: BatchConfig::default(),
        }
    }
}

/// How a logit becomes a score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreActivation {
    /// `1 / (1 + e^-x)`: sentence-transformers' default for one-label cross-encoders.
    Sigmoid,
    /// The raw logit (the checkpoint names `torch.nn.Identity`).
    Identity,
}

impl ScoreActivation {
    /// What `config.json` asks for (see the module docs); an activation other than
    /// Sigmoid or Identity is an error naming it.
    pub fn from_config(raw: &Value) -> Result<Self, String> {
        let named = raw
            .pointer("/sentence_transformers/activation_fn")
            .or_else(|| raw.get("sbert_ce_default_activation_function"))
            .and_then(Value::as_str);
        match named.map(|n| n.rsplit('.').next().unwrap_or(n)) {
            None | Some("Sigmoid") => Ok(ScoreActivation::Sigmoid),
            Some("Identity") => Ok(ScoreActivation::Identity),
            Some(_) => Err(format!(
                "unsupported score activation {:?} (Sigmoid or Identity)",
                named.unwrap_or_default()
            )),
        }
    }

    /// The score of `logit`.
    pub fn apply(self, logit: f32) -> f32 {
        match self {
            ScoreActivation::Sigmoid => 1.0 / (1.0 + (-logit).exp()),
            ScoreActivation::Identity => logit,
        }
    }
}

/// The number of labels of a Hugging Face classification config (`num_labels`, else the
/// size of `id2label`, else transformers' default 2).
fn num_labels(raw: &Value) -> usize {
    raw.get("num_labels")
        .and_then(Value::as_u64)
        .map(|n| n as usize)
        .or_else(|| {
            raw.get("id2label")
                .and_then(Value::as_object)
                .map(|m| m.len())
        })
        .unwrap_or(2)
}

/// Whether the model directory `dir` holds a sequence-classification checkpoint (a
/// cross-encoder) rather than a plain encoder: how a `text2vec` worker (DB-GPT 0.5's way
/// of serving rerankers) tells a reranker from an embedding model.
pub fn is_cross_encoder(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .and_then(|v| v.get("architectures").cloned())
        .and_then(|a| {
            a.as_array().map(|a| {
                a.iter().any(|x| {
                    x.as_str()
                        .is_some_and(|s| s.ends_with("ForSequenceClassification"))
                })
            })
        })
        .unwrap_or(false)
}

/// A BERT or XLM-RoBERTa cross-encoder. Cheap to clone.
#[derive(Clone)]
pub struct BertRerankerBackend {
    inner: Arc<Inner>,
}

/// The encoder and head of one checkpoint layout.
enum Model {
    Bert {
        bert: Bert,
        pooler: Linear,
        classifier: Linear,
    },
    XlmRoberta(XLMRobertaForSequenceClassification),
}

impl Model {
    /// One logit per row of a padded batch.
    fn logits(
        &self,
        ids: &Tensor,
        type_ids: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Vec<f32>> {
        let logits = match self {
            Model::Bert {
                bert,
                pooler,
                classifier,
            } => {
                let hidden = bert.forward(ids, type_ids, Some(mask))?;
                let pooled = pooler.forward(&hidden.i((.., 0))?)?.tanh()?;
                classifier.forward(&pooled)?
            }
            // XLM-RoBERTa has one token type (its tokenizers give none).
            Model::XlmRoberta(m) => m.forward(ids, mask, &type_ids.zeros_like()?)?,
        };
        logits.squeeze(1)?.to_vec1::<f32>()
    }
}

struct Inner {
    batcher: Lanes<Scorer>,
    activation: ScoreActivation,
    batch: BatchConfig,
}

/// What a batching thread runs: tokenizer, encoder and head (shared by the threads).
struct Scorer {
    pool: rayon::ThreadPool,
    /// Shared by the model's batching threads.
    model: Arc<Model>,
    activation: ScoreActivation,
    tokenizer: Tokenizer,
    pad_id: u32,
    device: candle_core::Device,
}

impl std::fmt::Debug for BertRerankerBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertRerankerBackend")
            .field("activation", &self.inner.activation)
            .field("batch", &self.inner.batch)
            .finish_non_exhaustive()
    }
}

impl BertRerankerBackend {
    /// Loads a model directory. Blocking: call it from `spawn_blocking` when on an async
    /// executor.
    pub fn load(config: RerankerConfig) -> Result<Self, BackendError> {
        let start = Instant::now();
        let d = BertDir::open(&config.model_dir, config.max_length)?;
        let config_path = config.model_dir.join("config.json");
        let archs = d.raw_config.get("architectures").and_then(Value::as_array);
        let has = |name: &str| archs.is_some_and(|a| a.iter().any(|x| x.as_str() == Some(name)));
        let xlm_roberta = has("XLMRobertaForSequenceClassification");
        if let Some(archs) = archs
            && !xlm_roberta
            && !has("BertForSequenceClassification")
        {
            return Err(BackendError::load(
                &config_path,
                format!(
                    "not a cross-encoder: architectures is {}, this backend runs BertForSequenceClassification and XLMRobertaForSequenceClassification",
                    Value::Array(archs.clone())
                ),
            ));
        }
        let labels = num_labels(&d.raw_config);
        if labels != 1 {
            return Err(BackendError::load(
                &config_path,
                format!("a reranker has one output label (num_labels 1), this model has {labels}"),
            ));
        }
        let activation = ScoreActivation::from_config(&d.raw_config)
            .map_err(|m| BackendError::load(&config_path, m))?;
        let mut tokenizer = d.tokenizer.clone();
        let model = if xlm_roberta {
            let mut raw = d.raw_config.clone();
            for (key, default) in [
                ("position_embedding_type", Value::from("absolute")),
                ("attention_probs_dropout_prob", Value::from(0.1)),
            ] {
                if raw.get(key).is_none_or(Value::is_null) {
                    raw[key] = default;
                }
            }
            let c: XlmRobertaConfig = serde_json::from_value(raw).map_err(|e| {
                BackendError::load(&config_path, format!("not an XLM-RoBERTa config: {e}"))
            })?;
            // Positions start after the padding id: fewer fit than max_position_embeddings.
            let room = c
                .max_position_embeddings
                .saturating_sub(c.pad_token_id as usize + 1);
            tokenizer
                .with_truncation(Some(TruncationParams {
                    max_length: d.max_length.min(room).max(2),
                    ..Default::default()
                }))
                .map_err(|e| BackendError::load(&config_path, format!("bad truncation: {e}")))?;
            Model::XlmRoberta(
                XLMRobertaForSequenceClassification::new(1, &c, d.vb.clone())
                    .map_err(|e| d.mismatch(e))?,
            )
        } else {
            let hidden = d.config.hidden_size;
            let pooler_vb = if d.vb.contains_tensor("bert.pooler.dense.weight") {
                d.vb.pp("bert.pooler.dense")
            } else {
                d.vb.pp("pooler.dense")
            };
            Model::Bert {
                bert: d.bert()?,
                pooler: candle_nn::linear(hidden, hidden, pooler_vb).map_err(|e| d.mismatch(e))?,
                classifier: candle_nn::linear(hidden, 1, d.vb.pp("classifier"))
                    .map_err(|e| d.mismatch(e))?,
            }
        };
        tracing::info!(
            architecture = if xlm_roberta { "xlm-roberta" } else { "bert" },
            dir = %config.model_dir.display(),
            layers = d.config.num_hidden_layers,
            max_length = d.max_length,
            activation = ?activation,
            max_batch = config.batch.max_batch,
            load_ms = start.elapsed().as_millis() as u64,
            "loaded cross-encoder"
        );
        let model = Arc::new(model);
        let batcher = Lanes::start(config.batch, "dbgpt-rerank", || {
            Ok(Scorer {
                pool: compute_pool()?,
                model: model.clone(),
                activation,
                tokenizer: tokenizer.clone(),
                pad_id: d.pad_id,
                device: d.device.clone(),
            })
        })?;
        Ok(BertRerankerBackend {
            inner: Arc::new(Inner {
                batcher,
                activation,
                batch: config.batch,
            }),
        })
    }

    /// [`BertRerankerBackend::load`] on tokio's blocking pool.
    pub async fn load_async(config: RerankerConfig) -> Result<Self, BackendError> {
        tokio::task::spawn_blocking(move || Self::load(config))
            .await
            .map_err(|e| BackendError::internal(format!("model loading task failed: {e}")))?
    }

    /// How this model turns logits into scores.
    pub fn activation(&self) -> ScoreActivation {
        self.inner.activation
    }
}

impl Scorer {
    /// One score per `(query, document)` pair.
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, BackendError> {
        let err = |e: candle_core::Error| {
            BackendError::internal(format!("cross-encoder forward failed: {e}"))
        };
        let encodings = self
            .tokenizer
            .encode_batch_fast(pairs.to_vec(), true)
            .map_err(|e| BackendError::internal(format!("tokenisation failed: {e}")))?;
        let mut out = vec![0f32; pairs.len()];
        for batch in padded_batches(&encodings, self.pad_id, &self.device)? {
            let logits = self
                .model
                .logits(&batch.ids, &batch.type_ids, &batch.mask)
                .map_err(err)?;
            for (i, l) in batch.members.into_iter().zip(logits) {
                out[i] = self.activation.apply(l);
            }
        }
        Ok(out)
    }
}

impl BatchModel for Scorer {
    type Item = (Arc<str>, String);
    type Output = f32;
    fn run(&self, items: &[&(Arc<str>, String)]) -> Result<Vec<f32>, BackendError> {
        let pairs: Vec<(&str, &str)> = items.iter().map(|(q, d)| (&**q, d.as_str())).collect();
        self.pool.install(|| self.score(&pairs))
    }
}

impl RerankBackend for BertRerankerBackend {
    fn rerank(
        &self,
        query: String,
        documents: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<f32>, BackendError>> {
        let n = documents.len();
        let query: Arc<str> = query.into();
        let pairs = documents.into_iter().map(|d| (query.clone(), d)).collect();
        let answer = self.inner.batcher.submit(pairs);
        Box::pin(async move {
            let start = Instant::now();
            let result = answer.await;
            tracing::debug!(
                documents = n,
                elapsed_ms = start.elapsed().as_millis() as u64,
                "reranked"
            );
            result
        })
    }
}
