//! BERT sentence embeddings (e.g. all-MiniLM-L6-v2) run in-process through
//! candle, reproducing the sentence-transformers pipeline: WordPiece
//! tokenisation with truncation, BERT forward pass with the attention mask,
//! masked mean pooling, L2 normalisation.
//!
//! A model directory holds `config.json`, `model.safetensors` and
//! `tokenizer.json`. Inputs are split into sub-batches of
//! [`BertEmbeddingConfig::batch_size`] texts, each padded to its longest
//! member. Forward passes run on tokio's blocking pool, one sub-batch at a
//! time per model (candle already uses every core for one matmul), so
//! concurrent requests interleave at sub-batch granularity. Dropping the
//! `embed` future stops the work before the next sub-batch.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use futures::future::BoxFuture;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::{BackendError, EmbeddingBackend};

/// Configuration of a [`BertEmbeddingBackend`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BertEmbeddingConfig {
    /// Directory with `config.json`, `model.safetensors`, `tokenizer.json`.
    pub model_dir: PathBuf,
    /// Maximum tokens per text (longer texts are truncated), capped by the
    /// model's `max_position_embeddings`. sentence-transformers' all-MiniLM
    /// uses 256.
    pub max_length: usize,
    /// Texts per forward pass.
    pub batch_size: usize,
}

impl BertEmbeddingConfig {
    /// Defaults: max 256 tokens, sub-batches of 32.
    pub fn new(model_dir: impl Into<PathBuf>) -> Self {
        BertEmbeddingConfig {
            model_dir: model_dir.into(),
            max_length: 256,
            batch_size: 32,
        }
    }
}

/// A BERT sentence-embedding model. Cheap to clone.
#[derive(Clone)]
pub struct BertEmbeddingBackend {
    inner: Arc<Inner>,
}

struct Inner {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    dimension: usize,
    batch_size: usize,
    /// One forward pass at a time per model (candle parallelises inside).
    forward_lock: Mutex<()>,
}

impl std::fmt::Debug for BertEmbeddingBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertEmbeddingBackend")
            .field("dimension", &self.inner.dimension)
            .field("batch_size", &self.inner.batch_size)
            .finish_non_exhaustive()
    }
}

fn required_file(dir: &Path, name: &str) -> Result<PathBuf, BackendError> {
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(BackendError::load(
            &p,
            format!("required file {name} is missing from the model directory"),
        ))
    }
}

/// A BERT model directory opened for inference: its parsed `config.json` (typed and raw, for
/// the keys candle's [`Config`] does not read), its weights as a memory-mapped
/// [`VarBuilder`], and its tokenizer set to pad each batch to its longest member and to
/// truncate at `max_length` (capped by the model's `max_position_embeddings`). Shared by
/// the embedding and the reranker backends.
pub(super) struct BertDir {
    pub config: Config,
    pub raw_config: serde_json::Value,
    pub weights_path: PathBuf,
    pub vb: VarBuilder<'static>,
    pub tokenizer: Tokenizer,
    pub max_length: usize,
    pub device: Device,
}

impl BertDir {
    /// Opens `dir` (blocking: maps the weights, parses the tokenizer).
    pub fn open(dir: &Path, max_length: usize) -> Result<Self, BackendError> {
        if !dir.is_dir() {
            return Err(BackendError::load(dir, "model directory does not exist"));
        }
        let config_path = required_file(dir, "config.json")?;
        let weights_path = required_file(dir, "model.safetensors")?;
        let tokenizer_path = required_file(dir, "tokenizer.json")?;

        let raw_config: serde_json::Value = std::fs::read_to_string(&config_path)
            .map_err(|e| BackendError::load(&config_path, e))
            .and_then(|s| {
                serde_json::from_str(&s).map_err(|e| {
                    BackendError::load(&config_path, format!("not a BERT config: {e}"))
                })
            })?;
        let bert_config: Config = serde_json::from_value(raw_config.clone())
            .map_err(|e| BackendError::load(&config_path, format!("not a BERT config: {e}")))?;

        let device = Device::Cpu;
        // SAFETY: the file is memory-mapped read-only; it must not be modified
        // while the model is loaded (same contract as every mmap-based loader).
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&[&weights_path], DType::F32, &device) }
                .map_err(|e| {
                BackendError::load(&weights_path, format!("cannot read safetensors: {e}"))
            })?;

        let mut tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| {
            BackendError::load(&tokenizer_path, format!("cannot parse tokenizer: {e}"))
        })?;
        let max_length = max_length.min(bert_config.max_position_embeddings).max(2);
        let mut padding = tokenizer.get_padding().cloned().unwrap_or_else(|| {
            let pad_token = "[PAD]".to_string();
            PaddingParams {
                pad_id: tokenizer
                    .token_to_id(&pad_token)
                    .unwrap_or(bert_config.pad_token_id as u32),
                pad_token,
                ..Default::default()
            }
        });
        padding.strategy = PaddingStrategy::BatchLongest;
        padding.pad_to_multiple_of = None;
        tokenizer.with_padding(Some(padding));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| BackendError::load(&tokenizer_path, format!("bad truncation: {e}")))?;
        Ok(BertDir {
            config: bert_config,
            raw_config,
            weights_path,
            vb,
            tokenizer,
            max_length,
            device,
        })
    }

    /// The BERT encoder (without pooler or head).
    pub fn bert(&self) -> Result<BertModel, BackendError> {
        BertModel::load(self.vb.clone(), &self.config).map_err(|e| self.mismatch(e))
    }

    /// A load error for weights that do not fit `config.json`.
    pub fn mismatch(&self, e: impl std::fmt::Display) -> BackendError {
        BackendError::load(
            &self.weights_path,
            format!("weights do not match config.json: {e}"),
        )
    }
}

/// Token ids, type ids and attention mask of a padded batch, each `(batch, seq_len)`.
pub(super) fn batch_tensors(
    encodings: &[tokenizers::Encoding],
    device: &Device,
) -> Result<(Tensor, Tensor, Tensor), BackendError> {
    let err = |e: candle_core::Error| BackendError::internal(format!("BERT forward failed: {e}"));
    let batch = encodings.len();
    let seq_len = encodings.first().map_or(0, |e| e.len());
    let mut ids = Vec::with_capacity(batch * seq_len);
    let mut type_ids = Vec::with_capacity(batch * seq_len);
    let mut mask = Vec::with_capacity(batch * seq_len);
    for e in encodings {
        if e.len() != seq_len {
            return Err(BackendError::internal("tokenizer did not pad the batch"));
        }
        ids.extend_from_slice(e.get_ids());
        type_ids.extend_from_slice(e.get_type_ids());
        mask.extend_from_slice(e.get_attention_mask());
    }
    Ok((
        Tensor::from_vec(ids, (batch, seq_len), device).map_err(err)?,
        Tensor::from_vec(type_ids, (batch, seq_len), device).map_err(err)?,
        Tensor::from_vec(mask, (batch, seq_len), device).map_err(err)?,
    ))
}

impl BertEmbeddingBackend {
    /// Load a model directory. Blocking (reads ~100 MB): call it from
    /// `spawn_blocking` when on an async executor.
    pub fn load(config: BertEmbeddingConfig) -> Result<Self, BackendError> {
        let dir = &config.model_dir;
        let start = Instant::now();
        let opened = BertDir::open(dir, config.max_length)?;
        let model = opened.bert()?;
        let BertDir {
            config: bert_config,
            tokenizer,
            max_length,
            device,
            ..
        } = opened;

        let dimension = bert_config.hidden_size;
        tracing::info!(
            dir = %crate::telemetry::Escaped(dir.display()),
            dimension,
            layers = bert_config.num_hidden_layers,
            max_length,
            load_ms = start.elapsed().as_millis() as u64,
            "loaded BERT embedding model"
        );
        Ok(BertEmbeddingBackend {
            inner: Arc::new(Inner {
                model,
                tokenizer,
                device,
                dimension,
                batch_size: config.batch_size.max(1),
                forward_lock: Mutex::new(()),
            }),
        })
    }

    /// [`BertEmbeddingBackend::load`] on tokio's blocking pool.
    pub async fn load_async(config: BertEmbeddingConfig) -> Result<Self, BackendError> {
        tokio::task::spawn_blocking(move || Self::load(config))
            .await
            .map_err(|e| BackendError::internal(format!("model loading task failed: {e}")))?
    }
}

impl Inner {
    fn embed_all(
        &self,
        inputs: &[String],
        cancelled: &AtomicBool,
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        let mut out = Vec::with_capacity(inputs.len());
        for chunk in inputs.chunks(self.batch_size) {
            if cancelled.load(Ordering::Relaxed) {
                return Err(BackendError::internal("embedding request cancelled"));
            }
            out.extend(self.embed_batch(chunk)?);
        }
        Ok(out)
    }

    /// Tokens the model reads for `texts`: the same tokenizer (and so the same special tokens
    /// and truncation at `max_length`) as [`Inner::embed_batch`], padding not counted.
    fn count_tokens(&self, texts: &[String]) -> Result<usize, BackendError> {
        let mut n = 0;
        for chunk in texts.chunks(self.batch_size) {
            let encodings = self
                .tokenizer
                .encode_batch(chunk.iter().map(String::as_str).collect::<Vec<_>>(), true)
                .map_err(|e| BackendError::internal(format!("tokenisation failed: {e}")))?;
            n += encodings
                .iter()
                .map(|e| e.get_attention_mask().iter().filter(|&&m| m != 0).count())
                .sum::<usize>();
        }
        Ok(n)
    }

    fn embed_batch(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, BackendError> {
        let err =
            |e: candle_core::Error| BackendError::internal(format!("BERT forward failed: {e}"));
        let encodings = self
            .tokenizer
            .encode_batch(texts.iter().map(String::as_str).collect::<Vec<_>>(), true)
            .map_err(|e| BackendError::internal(format!("tokenisation failed: {e}")))?;
        let (ids, type_ids, mask) = batch_tensors(&encodings, &self.device)?;

        let hidden = {
            let _lock = self.forward_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.model
                .forward(&ids, &type_ids, Some(&mask))
                .map_err(err)?
        };
        // Masked mean pooling over the sequence dimension.
        let mask_f = mask
            .to_dtype(DType::F32)
            .and_then(|m| m.unsqueeze(2))
            .map_err(err)?;
        let summed = hidden
            .broadcast_mul(&mask_f)
            .and_then(|h| h.sum(1))
            .map_err(err)?;
        let counts = mask_f
            .sum(1)
            .and_then(|c| c.clamp(1e-9f32, f32::MAX))
            .map_err(err)?;
        let pooled = summed.broadcast_div(&counts).map_err(err)?;
        let mut vectors = pooled.to_vec2::<f32>().map_err(err)?;
        for v in &mut vectors {
            l2_normalize(v);
        }
        Ok(vectors)
    }
}

/// `v / max(‖v‖, 1e-12)`, as `torch.nn.functional.normalize`.
fn l2_normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    let norm = norm.max(1e-12) as f32;
    for x in v {
        *x /= norm;
    }
}

/// Sets the flag when the `embed` future is dropped (finished or abandoned).
pub(super) struct CancelOnDrop(pub(super) Arc<AtomicBool>);
impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl EmbeddingBackend for BertEmbeddingBackend {
    fn embed(
        &self,
        inputs: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<Vec<f32>>, BackendError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            if inputs.is_empty() {
                return Ok(Vec::new());
            }
            let flag = Arc::new(AtomicBool::new(false));
            let _cancel = CancelOnDrop(flag.clone());
            let start = Instant::now();
            let n = inputs.len();
            let result = tokio::task::spawn_blocking(move || inner.embed_all(&inputs, &flag))
                .await
                .map_err(|e| BackendError::internal(format!("embedding task failed: {e}")))?;
            tracing::debug!(
                texts = n,
                elapsed_ms = start.elapsed().as_millis() as u64,
                "embedded"
            );
            result
        })
    }

    fn dimension(&self) -> Option<usize> {
        Some(self.inner.dimension)
    }

    fn count_tokens(&self, texts: &[String]) -> Result<usize, BackendError> {
        self.inner.count_tokens(texts)
    }
}

#[cfg(test)]
mod tests {
    use super::super::require_test_model;
    use super::*;
    use std::sync::OnceLock;

    fn model() -> &'static BertEmbeddingBackend {
        static MODEL: OnceLock<BertEmbeddingBackend> = OnceLock::new();
        MODEL.get_or_init(|| {
            let dir = require_test_model("all-MiniLM-L6-v2");
            for f in ["config.json", "model.safetensors", "tokenizer.json"] {
                require_test_model(&format!("all-MiniLM-L6-v2/{f}"));
            }
            let t = Instant::now();
            let m = BertEmbeddingBackend::load(BertEmbeddingConfig::new(dir)).expect("load MiniLM");
            eprintln!("MiniLM load: {:?}", t.elapsed());
            m
        })
    }

    fn cosine(a: &[f32], b: &[f32]) -> f64 {
        let dot: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum();
        let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        dot / (na * nb)
    }

    #[tokio::test]
    async fn hello_world_matches_sentence_transformers() {
        let m = model();
        assert_eq!(m.dimension(), Some(384));
        let t = Instant::now();
        let v = m.embed(vec!["hello world".into()]).await.unwrap();
        eprintln!("MiniLM 1 text: {:?}", t.elapsed());
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].len(), 384);
        let reference = [-0.0344773f32, 0.0310233, 0.0067349, 0.0261089, -0.0393620];
        let c = cosine(&v[0][..5], &reference);
        assert!(c >= 0.9999, "cosine {c}, got {:?}", &v[0][..5]);
        for (a, b) in v[0][..5].iter().zip(reference) {
            assert!((a - b).abs() < 1e-5, "{:?}", &v[0][..5]);
        }
        let norm: f64 = v[0]
            .iter()
            .map(|x| f64::from(*x).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    }

    #[tokio::test]
    async fn padded_batch_equals_single_calls() {
        let m = model();
        let texts = vec![
            "hello world".to_string(),
            "The quick brown fox jumps over the lazy dog".to_string(),
            "A man is eating food.".to_string(),
        ];
        let t = Instant::now();
        let batch = m.embed(texts.clone()).await.unwrap();
        eprintln!("MiniLM 3 texts: {:?}", t.elapsed());
        assert_eq!(batch.len(), 3);
        for (i, text) in texts.iter().enumerate() {
            let single = m.embed(vec![text.clone()]).await.unwrap().remove(0);
            let diff = single
                .iter()
                .zip(&batch[i])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "text {i}: max abs diff {diff}");
        }
        // Reference values from the research notes.
        let fox = [0.0354968f32, 0.0612863, 0.0526921, 0.0707051, 0.0331014];
        assert!(
            cosine(&batch[1][..5], &fox) > 0.9999,
            "{:?}",
            &batch[1][..5]
        );
    }

    #[tokio::test]
    async fn sub_batches_and_truncation() {
        let cfg = BertEmbeddingConfig {
            batch_size: 2,
            ..BertEmbeddingConfig::new(require_test_model("all-MiniLM-L6-v2"))
        };
        let small = BertEmbeddingBackend::load_async(cfg).await.unwrap();
        let texts: Vec<String> = (0..5).map(|i| format!("sentence number {i}")).collect();
        let a = small.embed(texts.clone()).await.unwrap();
        // Sub-batches count the same tokens: "sentence number i" is 3 tokens + [CLS], [SEP].
        assert_eq!(small.count_tokens(&texts).unwrap(), 5 * 5);
        assert_eq!(model().count_tokens(&texts).unwrap(), 5 * 5);
        let b = model().embed(texts).await.unwrap();
        assert_eq!(a.len(), 5);
        for (x, y) in a.iter().zip(&b) {
            assert!(cosine(x, y) > 0.99999);
        }
        // A text far longer than 256 tokens is truncated, not an error.
        let long = "word ".repeat(2000);
        // What the model reads: 256 tokens of the long text (special ones included), and
        // [CLS] [SEP] for the empty one; the padding of the short one is not counted.
        assert_eq!(
            model()
                .count_tokens(&[long.clone(), String::new()])
                .unwrap(),
            256 + 2
        );
        let v = model().embed(vec![long, String::new()]).await.unwrap();
        assert_eq!(v.len(), 2);
        assert!(
            v.iter()
                .all(|x| x.len() == 384 && x.iter().all(|f| f.is_finite()))
        );
        assert!(model().embed(Vec::new()).await.unwrap().is_empty());
    }

    #[test]
    fn missing_files_are_load_errors_naming_the_file() {
        let err = BertEmbeddingBackend::load(BertEmbeddingConfig::new("/nonexistent/minilm"))
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/minilm"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let src = require_test_model("all-MiniLM-L6-v2");
        std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
        std::fs::copy(
            src.join("tokenizer.json"),
            dir.path().join("tokenizer.json"),
        )
        .unwrap();
        let err = BertEmbeddingBackend::load(BertEmbeddingConfig::new(dir.path())).unwrap_err();
        assert!(
            matches!(&err, BackendError::Load { path, .. } if path.ends_with("model.safetensors")),
            "{err:?}"
        );
        assert!(err.to_string().contains("model.safetensors"), "{err}");

        std::fs::write(dir.path().join("model.safetensors"), b"garbage").unwrap();
        let err = BertEmbeddingBackend::load(BertEmbeddingConfig::new(dir.path())).unwrap_err();
        assert!(err.to_string().contains("model.safetensors"), "{err}");
    }
}
