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
    query: PackedLinear,
    key: PackedLinear,
    value: PackedLinear,
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
        // (batch, 1, 1, seq): 0 where attended, the lowest f32 where padded.
        let mask = match mask {
            Some(m) => m.to_dtype(DType::F32)?,
            None => ids.ones_like()?.to_dtype(DType::F32)?,
        };
        let mask = ((1.0 - mask.unsqueeze(1)?.unsqueeze(1)?)? * f32::MIN as f64)?;
        for layer in &self.layers {
            states = layer.forward(&states, &mask)?;
        }
        Ok(states)
    }
}

impl Layer {
    fn load(vb: VarBuilder, c: &Config) -> Result<Self> {
        let h = c.hidden_size;
        let a = vb.pp("attention");
        let s = a.pp("self");
        Ok(Layer {
            query: PackedLinear::load(h, h, s.pp("query"))?,
            key: PackedLinear::load(h, h, s.pp("key"))?,
            value: PackedLinear::load(h, h, s.pp("value"))?,
            heads: c.num_attention_heads,
            head_size: h / c.num_attention_heads,
            attention_out: PackedLinear::load(h, h, a.pp("output.dense"))?,
            attention_norm: candle_nn::layer_norm(h, c.layer_norm_eps, a.pp("output.LayerNorm"))?,
            intermediate: PackedLinear::load(h, c.intermediate_size, vb.pp("intermediate.dense"))?,
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

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let q = self.split_heads(&self.query.forward(x)?)?;
        let k = self.split_heads(&self.key.forward(x)?)?;
        let v = self.split_heads(&self.value.forward(x)?)?;
        let scores = (q.matmul(&k.t()?)? / (self.head_size as f64).sqrt())?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let context = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .flatten_from(D::Minus2)?;
        let attended = self
            .attention_norm
            .forward(&(self.attention_out.forward(&context)? + x)?)?;
        let inner = self.intermediate.forward(&attended)?;
        let inner = match self.act {
            HiddenAct::Gelu => inner.gelu_erf()?,
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
    /// `BertModel`'s states: same checkpoint, a padded batch with a mask, to float rounding.
    #[test]
    fn matches_candles_bert_model_on_minilm() {
        let dir = crate::worker::backends::require_test_model("all-MiniLM-L6-v2");
        let d = BertDir::open(&dir, 256).unwrap();
        let ours = Bert::load(d.vb.clone(), &d.config).unwrap();
        let theirs = BertModel::load(d.vb.clone(), &d.config).unwrap();
        let dev = &d.device;
        let enc = d
            .tokenizer
            .encode_batch(
                vec!["Hello world", "The quick brown fox jumps over the lazy dog"],
                true,
            )
            .unwrap();
        let batches =
            crate::worker::backends::embedding::padded_batches(&enc, d.pad_id, dev).unwrap();
        assert!(!batches.is_empty());
        for b in batches {
            let a = ours.forward(&b.ids, &b.type_ids, Some(&b.mask)).unwrap();
            let c = theirs.forward(&b.ids, &b.type_ids, Some(&b.mask)).unwrap();
            assert_eq!(a.dims(), c.dims());
            let diff = (a - c)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-4, "largest difference {diff}");
        }
    }
}
