//! A tiny random cross-encoder directory (`config.json`, `model.safetensors`,
//! `tokenizer.json`) in the layout of a Hugging Face `BertForSequenceClassification` or
//! `XLMRobertaForSequenceClassification` checkpoint: what the reranker's tests load, since
//! no real reranker weights are installed where they run. The weights are random; only the
//! shapes and names are real.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::bert::{BertModel, Config};
use candle_transformers::models::xlm_roberta::{
    Config as XlmRobertaConfig, XLMRobertaForSequenceClassification,
};
use serde_json::json;

/// Sizes of the generated model (small enough to write and load in milliseconds).
pub const HIDDEN: usize = 16;
/// Encoder layers.
pub const LAYERS: usize = 2;
/// Attention heads.
pub const HEADS: usize = 2;
/// Feed-forward width.
pub const INTERMEDIATE: usize = 32;
/// Longest (query, document) pair in tokens.
pub const MAX_POSITIONS: usize = 64;

fn io(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Which checkpoint layout to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `BertForSequenceClassification` (ms-marco-MiniLM's): pooler + classifier.
    Bert,
    /// `XLMRobertaForSequenceClassification` (bge-reranker's): one token type, positions
    /// after the padding id, `classifier.dense` + `classifier.out_proj`.
    XlmRoberta,
}

/// Writes a random cross-encoder into `dir` (created if missing), with a copy of
/// `tokenizer_json` (a BERT WordPiece tokenizer such as MiniLM's) as its tokenizer.
/// `activation`, when given, is written as the sentence-transformers activation
/// (`"torch.nn.modules.linear.Identity"` for raw logits); without it scores are sigmoids.
pub fn write(
    dir: &Path,
    tokenizer_json: &Path,
    arch: Arch,
    activation: Option<&str>,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tokenizer = tokenizers::Tokenizer::from_file(tokenizer_json).map_err(io)?;
    let mut config = json!({
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "vocab_size": tokenizer.get_vocab_size(true),
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": INTERMEDIATE,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": MAX_POSITIONS,
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
    });
    if let Some(a) = activation {
        config["sentence_transformers"] = json!({"activation_fn": a});
    }
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    match arch {
        Arch::Bert => {
            let bert_config: Config = serde_json::from_value(config.clone()).map_err(io)?;
            BertModel::load(vb.pp("bert"), &bert_config).map_err(io)?;
            candle_nn::linear(HIDDEN, HIDDEN, vb.pp("bert.pooler.dense")).map_err(io)?;
            candle_nn::linear(HIDDEN, 1, vb.pp("classifier")).map_err(io)?;
        }
        Arch::XlmRoberta => {
            config["architectures"] = json!(["XLMRobertaForSequenceClassification"]);
            config["model_type"] = json!("xlm-roberta");
            config["type_vocab_size"] = json!(1);
            config["position_embedding_type"] = json!("absolute");
            let c: XlmRobertaConfig = serde_json::from_value(config.clone()).map_err(io)?;
            XLMRobertaForSequenceClassification::new(1, &c, vb).map_err(io)?;
        }
    }
    // Every tensor random (layer norms too), so that a weight left out anywhere shows.
    for var in varmap.all_vars() {
        let noise = Tensor::randn(0f32, 0.5, var.shape(), &Device::Cpu).map_err(io)?;
        var.set(&noise).map_err(io)?;
    }
    varmap.save(dir.join("model.safetensors")).map_err(io)?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).map_err(io)?,
    )?;
    std::fs::copy(tokenizer_json, dir.join("tokenizer.json"))?;
    Ok(())
}
