//! BERT sentence embeddings (e.g. all-MiniLM-L6-v2) run in-process through
//! candle, reproducing the sentence-transformers pipeline: WordPiece
//! tokenisation with truncation, BERT forward pass with the attention mask,
//! masked mean pooling, L2 normalisation.
//!
//! A model directory holds `config.json`, `model.safetensors` and
//! `tokenizer.json`. Requests go through the model's [`Lanes`]: concurrent
//! requests are merged into forward passes of at most [`BatchConfig::max_batch`]
//! texts ([`BatchConfig::threads`] passes run at once, one thread each, on the shared
//! encoder of [`super::bert`]), and each pass is cut by
//! [`padded_batches`] into runs of similar length, each padded to its longest
//! member with the padding masked, so a text gets the same vector alone or in
//! any batch. Dropping the `embed` future withdraws the texts not yet in a pass.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use candle_transformers::models::bert::Config;
use futures::future::BoxFuture;
use tokenizers::{Tokenizer, TruncationParams};

use super::batcher::{BatchConfig, BatchModel, Lanes};
use super::bert::Bert;
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
    /// How concurrent requests are merged into forward passes.
    pub batch: BatchConfig,
}

impl BertEmbeddingConfig {
    /// Defaults: max 256 tokens, [`BatchConfig::default`].
    pub fn new(model_dir: impl Into<PathBuf>) -> Self {
        BertEmbeddingConfig {
            model_dir: model_dir.into(),
            max_length: 256,
            batch: BatchConfig::default(),
        }
    }
}

/// A BERT sentence-embedding model. Cheap to clone.
#[derive(Clone)]
pub struct BertEmbeddingBackend {
    inner: Arc<Inner>,
}

struct Inner {
    batcher: Lanes<Encoder>,
    /// The encoder's tokenizer, for [`EmbeddingBackend::count_tokens`].
    tokenizer: Tokenizer,
    dimension: usize,
    batch: BatchConfig,
}

/// What a batching thread runs: tokenizer, encoder (shared by the threads), pooling.
struct Encoder {
    pool: rayon::ThreadPool,
    model: Arc<Bert>,
    tokenizer: Tokenizer,
    pad_id: u32,
    device: Device,
}

impl std::fmt::Debug for BertEmbeddingBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertEmbeddingBackend")
            .field("dimension", &self.inner.dimension)
            .field("batch", &self.inner.batch)
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
/// [`VarBuilder`], and its tokenizer set to truncate at `max_length` (capped by the model's
/// `max_position_embeddings`) and not to pad: [`padded_batches`] pads. Shared by the
/// embedding and the reranker backends.
pub(super) struct BertDir {
    pub config: Config,
    pub raw_config: serde_json::Value,
    pub weights_path: PathBuf,
    pub vb: VarBuilder<'static>,
    pub tokenizer: Tokenizer,
    /// The id padding positions get (the tokenizer's own padding id, else `[PAD]`'s).
    pub pad_id: u32,
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
        let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::new(&weights_path) }
            .map_err(|e| {
                BackendError::load(&weights_path, format!("cannot read safetensors: {e}"))
            })?;
        let vb = VarBuilder::from_backend(
            Box::new(TransposedLinears(tensors)),
            DType::F32,
            device.clone(),
        );

        let mut tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| {
            BackendError::load(&tokenizer_path, format!("cannot parse tokenizer: {e}"))
        })?;
        let max_length = max_length.min(bert_config.max_position_embeddings).max(2);
        let pad_id = match tokenizer.get_padding() {
            Some(p) => p.pad_id,
            None => tokenizer
                .token_to_id("[PAD]")
                .unwrap_or(bert_config.pad_token_id as u32),
        };
        tokenizer.with_padding(None);
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
            pad_id,
            max_length,
            device,
        })
    }

    /// The BERT encoder (without pooler or head).
    pub fn bert(&self) -> Result<Bert, BackendError> {
        Bert::load(self.vb.clone(), &self.config).map_err(|e| self.mismatch(e))
    }

    /// A load error for weights that do not fit `config.json`.
    pub fn mismatch(&self, e: impl std::fmt::Display) -> BackendError {
        BackendError::load(
            &self.weights_path,
            format!("weights do not match config.json: {e}"),
        )
    }
}

/// A safetensors file whose linear-layer weights are handed out transposed in memory (for
/// candle's XLM-RoBERTa; our BERT encoder packs its own, [`super::packed`]): a
/// 2-D `*.weight` `(out, in)` (embedding tables excepted) is copied once, at load, into
/// `(in, out)` row-major storage and served as a strided `(out, in)` view of it. candle's
/// `Linear` multiplies by `weight.t()`, which then is a plain row-major matrix, the layout
/// gemm reads as it is. With the weights as stored, gemm repacked every weight matrix on
/// every call (its LHS after it transposes the problem): for the few token rows of a short
/// text that packing cost more than the arithmetic (46% of a MiniLM forward pass against
/// 19% in the multiply kernel, measured with perf). Same values, same shapes.
struct TransposedLinears(candle_core::safetensors::MmapedSafetensors);

impl TransposedLinears {
    fn arrange(name: &str, t: Tensor) -> candle_core::Result<Tensor> {
        if t.rank() == 2 && name.ends_with(".weight") && !name.contains("embeddings") {
            t.t()?.contiguous()?.t()
        } else {
            Ok(t)
        }
    }
}

impl SimpleBackend for TransposedLinears {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Self::arrange(name, SimpleBackend::get(&self.0, s, name, h, dtype, dev)?)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        Self::arrange(
            name,
            SimpleBackend::get_unchecked(&self.0, name, dtype, dev)?,
        )
    }

    fn contains_tensor(&self, name: &str) -> bool {
        SimpleBackend::contains_tensor(&self.0, name)
    }
}

/// The one-thread pool a batching thread's passes run in (`install`ed around each pass):
/// gemm and the tokenizer split their work over the pool they are called from. On this
/// 2-core machine, shared with the HTTP stack, candle's default of every core for every
/// matmul cost twice the CPU per text at 32 concurrent requests (9.8 against 4.4 ms) and
/// more wall time: a pass runs on one thread, and [`BatchConfig::threads`] passes run side by
/// side instead ([`Lanes`]).
pub(super) fn compute_pool() -> Result<rayon::ThreadPool, BackendError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .thread_name(|i| format!("dbgpt-encoder-{i}"))
        .build()
        .map_err(|e| BackendError::internal(format!("cannot start the model's threads: {e}")))
}

/// One padded forward pass's input: which encodings it holds (indices into the caller's
/// list) and their token ids, type ids and attention mask, each `(batch, seq_len)`, padded
/// on the right to the longest member with `pad_id`, type 0 and mask 0.
pub(super) struct PaddedBatch {
    pub members: Vec<usize>,
    pub ids: Tensor,
    pub type_ids: Tensor,
    pub mask: Tensor,
}

/// A pass never pads to more than this many token slots for the sake of a few long
/// members: below it, one pass of short sequences costs less than two.
const PADDING_FLOOR_TOKENS: usize = 512;

/// Splits unpadded `encodings` into padded forward passes. Sequences are sorted by length
/// and cut into runs whose padded size (members × longest) stays within twice their real
/// tokens (or [`PADDING_FLOOR_TOKENS`]), so a long text does not make a batch of short ones
/// pay for its length. Padding is masked: each sequence's states are the same as alone.
pub(super) fn padded_batches(
    encodings: &[tokenizers::Encoding],
    pad_id: u32,
    device: &Device,
) -> Result<Vec<PaddedBatch>, BackendError> {
    let mut order: Vec<usize> = (0..encodings.len()).collect();
    order.sort_by_key(|&i| encodings[i].len());
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut real = 0usize;
    for i in order {
        let len = encodings[i].len().max(1);
        if let Some(g) = groups.last_mut() {
            let padded = (g.len() + 1) * len;
            if padded <= (2 * (real + len)).max(PADDING_FLOOR_TOKENS) {
                g.push(i);
                real += len;
                continue;
            }
        }
        groups.push(vec![i]);
        real = len;
    }
    let err = |e: candle_core::Error| BackendError::internal(format!("BERT input: {e}"));
    groups
        .into_iter()
        .map(|members| {
            let seq_len = members
                .iter()
                .map(|&i| encodings[i].len())
                .max()
                .unwrap_or(0);
            let n = members.len() * seq_len;
            let (mut ids, mut type_ids, mut mask) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            for &i in &members {
                let e = &encodings[i];
                let pad = seq_len - e.len();
                ids.extend_from_slice(e.get_ids());
                ids.extend(std::iter::repeat_n(pad_id, pad));
                type_ids.extend_from_slice(e.get_type_ids());
                type_ids.extend(std::iter::repeat_n(0, pad));
                mask.extend_from_slice(e.get_attention_mask());
                mask.extend(std::iter::repeat_n(0, pad));
            }
            let shape = (members.len(), seq_len);
            Ok(PaddedBatch {
                ids: Tensor::from_vec(ids, shape, device).map_err(err)?,
                type_ids: Tensor::from_vec(type_ids, shape, device).map_err(err)?,
                mask: Tensor::from_vec(mask, shape, device).map_err(err)?,
                members,
            })
        })
        .collect()
}

impl BertEmbeddingBackend {
    /// Load a model directory and start its batching threads. Blocking (reads ~100 MB):
    /// call it from `spawn_blocking` when on an async executor.
    pub fn load(config: BertEmbeddingConfig) -> Result<Self, BackendError> {
        let dir = &config.model_dir;
        let start = Instant::now();
        let opened = BertDir::open(dir, config.max_length)?;
        let model = opened.bert()?;
        let BertDir {
            config: bert_config,
            tokenizer,
            pad_id,
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
            max_batch = config.batch.max_batch,
            batch_wait_ms = config.batch.max_wait.as_secs_f64() * 1e3,
            threads = config.batch.threads,
            load_ms = start.elapsed().as_millis() as u64,
            "loaded BERT embedding model"
        );
        let model = Arc::new(model);
        let batcher = Lanes::start(config.batch, "dbgpt-embed", || {
            Ok(Encoder {
                pool: compute_pool()?,
                model: model.clone(),
                tokenizer: tokenizer.clone(),
                pad_id,
                device: device.clone(),
            })
        })?;
        Ok(BertEmbeddingBackend {
            inner: Arc::new(Inner {
                batcher,
                tokenizer,
                dimension,
                batch: config.batch,
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
    /// Tokens the model reads for `texts`: the same tokenizer (and so the same special tokens
    /// and truncation at `max_length`) as [`Encoder::embed`], padding not counted.
    fn count_tokens(&self, texts: &[String]) -> Result<usize, BackendError> {
        let mut n = 0;
        for chunk in texts.chunks(64) {
            let encodings = self
                .tokenizer
                .encode_batch_fast(chunk.iter().map(String::as_str).collect::<Vec<_>>(), true)
                .map_err(|e| BackendError::internal(format!("tokenisation failed: {e}")))?;
            n += encodings.iter().map(|e| e.len()).sum::<usize>();
        }
        Ok(n)
    }
}

impl Encoder {
    /// One normalised vector per text.
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, BackendError> {
        let err =
            |e: candle_core::Error| BackendError::internal(format!("BERT forward failed: {e}"));
        let encodings = self
            .tokenizer
            .encode_batch_fast(texts.to_vec(), true)
            .map_err(|e| BackendError::internal(format!("tokenisation failed: {e}")))?;
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
        for batch in padded_batches(&encodings, self.pad_id, &self.device)? {
            let hidden = self
                .model
                .forward(&batch.ids, &batch.type_ids, Some(&batch.mask))
                .map_err(err)?;
            // Masked mean pooling over the sequence dimension.
            let mask_f = batch
                .mask
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
            for (i, mut v) in batch
                .members
                .into_iter()
                .zip(pooled.to_vec2::<f32>().map_err(err)?)
            {
                l2_normalize(&mut v);
                out[i] = v;
            }
        }
        Ok(out)
    }
}

impl BatchModel for Encoder {
    type Item = String;
    type Output = Vec<f32>;
    fn run(&self, items: &[&String]) -> Result<Vec<Vec<f32>>, BackendError> {
        let texts: Vec<&str> = items.iter().map(|s| s.as_str()).collect();
        self.pool.install(|| self.embed(&texts))
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

impl EmbeddingBackend for BertEmbeddingBackend {
    fn embed(
        &self,
        inputs: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<Vec<f32>>, BackendError>> {
        let n = inputs.len();
        let answer = self.inner.batcher.submit(inputs);
        Box::pin(async move {
            let start = Instant::now();
            let result = answer.await;
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
            batch: BatchConfig {
                max_batch: 2,
                ..BatchConfig::default()
            },
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

    /// Texts of very different lengths (so passes are cut and padded), sent as concurrent
    /// single-text requests, get the vectors each gets alone.
    #[tokio::test]
    async fn concurrent_requests_get_the_vectors_of_single_calls() {
        let m = model();
        let mut texts: Vec<String> = vec![
            "hello world".into(),
            "A man is eating food.".into(),
            "The quick brown fox jumps over the lazy dog".into(),
            String::new(),
            "word ".repeat(300),
            "Rust's ownership model makes memory safety a compile-time property.".into(),
        ];
        texts.extend((0..14).map(|i| format!("sentence number {i} about {}", "x ".repeat(i))));
        let mut alone = Vec::new();
        for t in &texts {
            alone.push(m.embed(vec![t.clone()]).await.unwrap().remove(0));
        }
        let t = Instant::now();
        let together =
            futures::future::join_all(texts.iter().map(|t| tokio::spawn(m.embed(vec![t.clone()]))))
                .await;
        eprintln!("MiniLM {} concurrent texts: {:?}", texts.len(), t.elapsed());
        for (i, (a, b)) in alone.iter().zip(together).enumerate() {
            let b = b.unwrap().unwrap().remove(0);
            let c = cosine(a, &b);
            assert!(c >= 0.99999, "text {i}: cosine {c}");
        }
        // And the same texts as one request (one pass, cut by length).
        let one = m.embed(texts.clone()).await.unwrap();
        for (i, (a, b)) in alone.iter().zip(&one).enumerate() {
            let c = cosine(a, b);
            assert!(c >= 0.99999, "text {i}: cosine {c}");
        }
    }

    #[test]
    fn passes_are_cut_by_length_and_padding_is_masked() {
        let m = model();
        let tok = &m.inner.tokenizer;
        let texts = ["hi", "hello there", "a b c d", &"word ".repeat(300)];
        let enc = tok.encode_batch_fast(texts.to_vec(), true).unwrap();
        let batches = padded_batches(&enc, 0, &Device::Cpu).unwrap();
        // The 256-token text is not padded into the short ones' pass.
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0].members, vec![0, 1, 2]);
        assert_eq!(batches[1].members, vec![3]);
        let ids = batches[0].ids.to_vec2::<u32>().unwrap();
        let mask = batches[0].mask.to_vec2::<u32>().unwrap();
        assert_eq!(ids[0].len(), enc[2].len());
        // "hi" is [CLS] hi [SEP] then padding, masked.
        assert_eq!(&ids[0][..3], enc[0].get_ids());
        assert!(ids[0][3..].iter().all(|&x| x == 0));
        assert_eq!(mask[0], [1, 1, 1, 0, 0, 0]);
        assert_eq!(batches[1].ids.dims(), &[1, 256]);
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
