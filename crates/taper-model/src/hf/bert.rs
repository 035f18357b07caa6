//! BERT (Devlin et al. 2019; HF `modeling_bert.py`): `BertForMaskedLM`. taper's encoder uses
//! HF's own tensor names, so the mapping is small: HF's buffers, pooler and next-sentence head
//! go, and its two homes of the MLM bias (`cls.predictions.bias`, and `decoder.bias` that
//! transformers uses when the decoder is untied) become one.

use super::Json;
use crate::{Mlp, ModelConfig, ModelError, ModelKind, Norm, PosEmb, Result};
use candle_core::Tensor;
use serde_json::{json, Value};
use std::collections::HashMap;

pub fn config_from_hf(j: &Value) -> Result<ModelConfig> {
    let g = Json(j);
    let mlp = match g.str_or("hidden_act", "gelu") {
        "gelu" => Mlp::Gelu,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Mlp::GeluTanh,
        "relu" => Mlp::Relu,
        other => return Err(ModelError::Config(format!("config.json: hidden_act {other:?} is not supported"))),
    };
    match g.str_or("position_embedding_type", "absolute") {
        "absolute" => {}
        other => {
            return Err(ModelError::Config(format!(
                "config.json: bert with position_embedding_type {other:?} is not supported (only \"absolute\")"
            )))
        }
    }
    for key in ["is_decoder", "add_cross_attention"] {
        if g.bool_or(key, false)? {
            return Err(ModelError::Config(format!("config.json: bert with {key} = true is not supported")));
        }
    }
    Ok(ModelConfig {
        kind: ModelKind::Encoder,
        vocab_size: g.usize("vocab_size")?,
        n_layer: g.usize("num_hidden_layers")?,
        n_head: g.usize("num_attention_heads")?,
        n_embd: g.usize("hidden_size")?,
        intermediate_size: g.usize("intermediate_size")?,
        block_size: g.usize("max_position_embeddings")?,
        type_vocab_size: g.usize_or("type_vocab_size", 2)?,
        pos_emb: PosEmb::Learned,
        norm: Norm::LayerNorm,
        norm_eps: g.f64_or("layer_norm_eps", 1e-12)?,
        mlp,
        bias: true,
        post_norm: true,
        tie_embeddings: g.bool_or("tie_word_embeddings", true)?,
        ..Default::default()
    })
}

pub fn config_to_hf(cfg: &ModelConfig) -> Value {
    let act = match cfg.mlp {
        Mlp::GeluTanh => "gelu_new",
        Mlp::Relu => "relu",
        _ => "gelu",
    };
    json!({
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "intermediate_size": cfg.hidden(),
        "hidden_act": act,
        "max_position_embeddings": cfg.block_size,
        // HF always builds the table; a model without token types reads type 0, zeros.
        "type_vocab_size": cfg.type_vocab_size.max(1),
        "layer_norm_eps": cfg.norm_eps,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": cfg.tie_embeddings,
        "is_decoder": false,
    })
}

pub fn weights_from_hf(cfg: &ModelConfig, hf: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let mut out: HashMap<String, Tensor> = hf
        .into_iter()
        .filter(|(k, _)| {
            !(k.ends_with("position_ids")
                || k.ends_with("token_type_ids")
                || k.starts_with("bert.pooler.")
                || k.starts_with("cls.seq_relationship."))
        })
        .collect();
    if let Some(b) = out.remove("cls.predictions.decoder.bias") {
        out.insert("cls.predictions.bias".into(), b);
    }
    if cfg.tie_embeddings {
        out.remove("cls.predictions.decoder.weight");
    }
    Ok(out)
}

pub fn weights_to_hf(cfg: &ModelConfig, w: &HashMap<String, Tensor>) -> Result<Vec<(String, Tensor)>> {
    let mut out: Vec<(String, Tensor)> = w.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
    let word = w
        .get("bert.embeddings.word_embeddings.weight")
        .ok_or_else(|| ModelError::MissingTensor { name: "bert.embeddings.word_embeddings.weight".into() })?;
    // transformers reads the bias from `decoder.bias` when untied: write it in both places.
    if let Some(b) = w.get("cls.predictions.bias") {
        out.push(("cls.predictions.decoder.bias".into(), b.clone()));
    }
    // Fixed sinusoids are exactly a learned table that never moved.
    if cfg.pos_emb == PosEmb::Sinusoidal {
        let table = crate::nn::sinusoidal_table(cfg.n_embd, cfg.block_size, word.device())?;
        out.push(("bert.embeddings.position_embeddings.weight".into(), table));
    }
    if cfg.type_vocab_size == 0 {
        let zeros = Tensor::zeros((1, cfg.n_embd), word.dtype(), word.device())?;
        out.push(("bert.embeddings.token_type_embeddings.weight".into(), zeros));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
