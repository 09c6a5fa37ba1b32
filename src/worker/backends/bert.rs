//! The BERT encoder's forward pass (embeddings, then self-attention and feed-forward
//! layers), as Hugging Face's `BertModel` computes it, with the linear layers on
//! [`PackedLinear`]: for the few tokens of an embedding or rerank request those were most of
//! the time, and candle's `BertModel` cannot be given other linear layers. Everything else
//! (embedding lookup, layer norm, softmax, GELU) is candle's own. Weight names, the
//! `bert.`/`<model_type>.` prefixes and the mask convention are candle's `BertModel`'s, so
//! the same checkpoints load; `tests` compare the two on the real MiniLM.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};
use candle_transformers::models::bert::{Config, HiddenAct};

use super::packed::PackedLinear;

/// A BERT encoder (no pooler, no head).
pub struct Bert {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
}

/// One transformer layer.
struct Layer {
    /// Query, key and value in one layer: `(…, 3·hidden)`, in that order.
    qkv: PackedLinear,
    heads: usize,
    head_size: usize,
    attention_out: PackedLinear,
    attention_norm: LayerNorm,
    intermediate: PackedLinear,
    act: HiddenAct,
    output: PackedLinear,
    output_norm: LayerNorm,
}

impl Bert {
    /// Loads the encoder's weights from `vb`: at its root, under `bert.`, or under
    /// `<model_type>.` (the prefixes candle's `BertModel` accepts).
    pub fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        let vb = if vb.contains_tensor("bert")
            || vb.contains_tensor("bert.embeddings.word_embeddings.weight")
        {
            vb.pp("bert")
        } else {
            vb
        };
        match Self::load_at(vb.clone(), config) {
            Ok(m) => Ok(m),
            Err(e) => match &config.model_type {
                Some(t) => Self::load_at(vb.pp(t), config).map_err(|_| e),
                None => Err(e),
            },
        }
    }

    fn load_at(vb: VarBuilder, c: &Config) -> Result<Self> {
        let e = vb.pp("embeddings");
        let h = c.hidden_size;
        if c.num_attention_heads == 0 || !h.is_multiple_of(c.num_attention_heads) {
            candle_core::bail!(
                "hidden_size {h} is not a multiple of num_attention_heads {}",
                c.num_attention_heads
            );
        }
        let layers = (0..c.num_hidden_layers)
            .map(|i| Layer::load(vb.pp(format!("encoder.layer.{i}")), c))
            .collect::<Result<Vec<_>>>()?;
        Ok(Bert {
            word_embeddings: candle_nn::embedding(c.vocab_size, h, e.pp("word_embeddings"))?,
            position_embeddings: candle_nn::embedding(
                c.max_position_embeddings,
                h,
                e.pp("position_embeddings"),
            )?,
            token_type_embeddings: candle_nn::embedding(
                c.type_vocab_size,
                h,
                e.pp("token_type_embeddings"),
            )?,
            embeddings_norm: candle_nn::layer_norm(h, c.layer_norm_eps, e.pp("LayerNorm"))?,
            layers,
        })
    }

    /// The last layer's states `(batch, seq, hidden)` for token ids and type ids
    /// `(batch, seq)`; `mask` (1 = token, 0 = padding) hides padded positions from attention.
    pub fn forward(
        &self,
        ids: &Tensor,
        type_ids: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (_, seq_len) = ids.dims2()?;
        let positions = Tensor::arange(0u32, seq_len as u32, ids.device())?;
        let mut states = (self.word_embeddings.forward(ids)?
            + self.token_type_embeddings.forward(type_ids)?)?
        .broadcast_add(&self.position_embeddings.forward(&positions)?)?;
        states = self.embeddings_norm.forward(&states)?;
        // 0 where attended, the lowest f32 where padded, added to the attention scores.
        let mask = match mask {
            Some(m) => m.to_dtype(DType::F32)?,
            None => ids.ones_like()?.to_dtype(DType::F32)?,
        };
        let mask = ((1.0 - mask)? * f32::MIN as f64)?;
        let additive = Mask {
            per_token: mask.flatten_all()?.to_vec1::<f32>()?,
            tensor: mask.unsqueeze(1)?.unsqueeze(1)?,
        };
        for layer in &self.layers {
            states = layer.forward(&states, &additive)?;
        }
        Ok(states)
    }
}

/// The attention mask, added to the scores: 0 where attended, the lowest f32 where padded.
struct Mask {
    /// `(batch · seq)`, for [`Attention`].
    per_token: Vec<f32>,
    /// `(batch, 1, 1, seq)`, for candle's operations.
    tensor: Tensor,
}

/// Sequences up to this many tokens go through [`Attention`]; longer ones through candle's
/// batched matrix products. For a short text those were a quarter of the forward pass: one
/// gemm call per (text, head), each a few hundred multiply-adds, cost mostly the call.
const SHORT_SEQUENCE: usize = 64;

/// Self-attention over the query/key/value rows of short sequences, written out: for each
/// text, head and query position, the scaled dot products with every key plus the mask, a
/// softmax (max subtracted, as candle's), and the weighted sum of the values. Input
/// `(batch, seq, 3·hidden)` (query, key, value), output `(batch, seq, hidden)`.
struct Attention<'a> {
    heads: usize,
    head_size: usize,
    mask: &'a [f32],
}

impl candle_core::CustomOp1 for Attention<'_> {
    fn name(&self) -> &'static str {
        "bert-short-attention"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("attention takes f32 input");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("attention takes a contiguous input");
        };
        let (batch, seq, width) = layout.shape().dims3()?;
        let (d, hidden) = (self.head_size, self.heads * self.head_size);
        if width != 3 * hidden || self.mask.len() != batch * seq {
            candle_core::bail!(
                "attention: input ({batch}, {seq}, {width}) and mask of {} for {} heads of {d}",
                self.mask.len(),
                self.heads
            );
        }
        let qkv = &data[start..end];
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; batch * seq * hidden];
        let mut scores = vec![0f32; seq];
        for b in 0..batch {
            let rows = &qkv[b * seq * width..(b + 1) * seq * width];
            let mask = &self.mask[b * seq..(b + 1) * seq];
            for head in 0..self.heads {
                let at = |row: usize, part: usize| {
                    let i = row * width + part * hidden + head * d;
                    &rows[i..i + d]
                };
                for i in 0..seq {
                    let q = at(i, 0);
                    let mut max = f32::NEG_INFINITY;
                    for (j, score) in scores.iter_mut().enumerate() {
                        *score = dot(q, at(j, 1)) * scale + mask[j];
                        max = max.max(*score);
                    }
                    let mut sum = 0.0;
                    for score in scores.iter_mut() {
                        *score = (*score - max).exp();
                        sum += *score;
                    }
                    let o = (b * seq + i) * hidden + head * d;
                    let o = &mut out[o..o + d];
                    for (j, score) in scores.iter().enumerate() {
                        let p = score / sum;
                        for (o, v) in o.iter_mut().zip(at(j, 2)) {
                            *o += p * v;
                        }
                    }
                }
            }
        }
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from((batch, seq, hidden)),
        ))
    }
}

/// A dot product in eight independent lanes (so that it vectorises).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

impl Layer {
    fn load(vb: VarBuilder, c: &Config) -> Result<Self> {
        let h = c.hidden_size;
        let a = vb.pp("attention");
        let s = a.pp("self");
        Ok(Layer {
            qkv: {
                let part = |name: &str| -> Result<(Tensor, Tensor)> {
                    Ok((
                        s.get((h, h), &format!("{name}.weight"))?,
                        s.get(h, &format!("{name}.bias"))?,
                    ))
                };
                let (q, k, v) = (part("query")?, part("key")?, part("value")?);
                PackedLinear::new(
                    &Tensor::cat(&[&q.0, &k.0, &v.0], 0)?,
                    Some(&Tensor::cat(&[&q.1, &k.1, &v.1], 0)?),
                )?
            },
            heads: c.num_attention_heads,
            head_size: h / c.num_attention_heads,
            attention_out: PackedLinear::load(h, h, a.pp("output.dense"))?,
            attention_norm: candle_nn::layer_norm(h, c.layer_norm_eps, a.pp("output.LayerNorm"))?,
            intermediate: {
                let l = PackedLinear::load(h, c.intermediate_size, vb.pp("intermediate.dense"))?;
                if c.hidden_act == HiddenAct::Gelu {
                    l.then_gelu_erf()
                } else {
                    l
                }
            },
            act: c.hidden_act,
            output: PackedLinear::load(c.intermediate_size, h, vb.pp("output.dense"))?,
            output_norm: candle_nn::layer_norm(h, c.layer_norm_eps, vb.pp("output.LayerNorm"))?,
        })
    }

    /// `(batch, seq, hidden)` → `(batch, heads, seq, head_size)`, contiguous.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        x.reshape((b, s, self.heads, self.head_size))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn forward(&self, x: &Tensor, mask: &Mask) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?;
        let (_, seq, _) = qkv.dims3()?;
        let context = if seq <= SHORT_SEQUENCE {
            qkv.apply_op1_no_bwd(&Attention {
                heads: self.heads,
                head_size: self.head_size,
                mask: &mask.per_token,
            })?
        } else {
            let h = self.heads * self.head_size;
            let part = |i: usize| self.split_heads(&qkv.narrow(D::Minus1, i * h, h)?.contiguous()?);
            let (q, k, v) = (part(0)?, part(1)?, part(2)?);
            let scores = (q.matmul(&k.t()?)? / (self.head_size as f64).sqrt())?
                .broadcast_add(&mask.tensor)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            probs
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .flatten_from(D::Minus2)?
        };
        let attended = self
            .attention_norm
            .forward(&(self.attention_out.forward(&context)? + x)?)?;
        let inner = self.intermediate.forward(&attended)?;
        let inner = match self.act {
            // Applied by the layer itself (PackedLinear::then_gelu_erf).
            HiddenAct::Gelu => inner,
            HiddenAct::GeluApproximate => inner.gelu()?,
            HiddenAct::Relu => inner.relu()?,
        };
        self.output_norm
            .forward(&(self.output.forward(&inner)? + &attended)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::backends::embedding::BertDir;
    use candle_transformers::models::bert::BertModel;

    /// On the real all-MiniLM-L6-v2 (fetched by the test setup), this encoder gives candle's
    /// `BertModel`'s states: same checkpoint, padded batches with a mask, short and long
    /// sequences, to float rounding.
    #[test]
    fn matches_candles_bert_model_on_minilm() {
        let dir = crate::worker::backends::require_test_model("all-MiniLM-L6-v2");
        let d = BertDir::open(&dir, 256).unwrap();
        let ours = Bert::load(d.vb.clone(), &d.config).unwrap();
        let theirs = BertModel::load(d.vb.clone(), &d.config).unwrap();
        let dev = &d.device;
        let long = "A sentence of a dozen words goes on and on, and then on. ".repeat(8);
        // Short sequences (written-out attention) and a long one (candle's), padded.
        for texts in [
            vec!["Hello world", "The quick brown fox jumps over the lazy dog"],
            vec!["Hello world", long.as_str()],
        ] {
            let enc = d.tokenizer.encode_batch(texts, true).unwrap();
            let batches =
                crate::worker::backends::embedding::padded_batches(&enc, d.pad_id, dev).unwrap();
            assert_eq!(batches.len(), 1, "one padded pass");
            let b = &batches[0];
            let seq = b.ids.dims2().unwrap().1;
            let a = ours.forward(&b.ids, &b.type_ids, Some(&b.mask)).unwrap();
            let c = theirs.forward(&b.ids, &b.type_ids, Some(&b.mask)).unwrap();
            assert_eq!(a.dims(), c.dims());
            let diff = (a - c).unwrap().abs().unwrap().max_all().unwrap();
            let diff = diff.to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "{seq} tokens: largest difference {diff}");
        }
    }
}
