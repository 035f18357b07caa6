//! Marian (Junczys-Dowmunt et al. 2018; HF `modeling_marian.py`, `MarianMTModel`): the
//! encoder-decoder of [`crate::marian`]. Tensor names are HF's; HF's sinusoidal position
//! tables (not saved by transformers, but present in some older checkpoints) are recomputed.

use super::Json;
use crate::{Mlp, ModelConfig, ModelError, ModelKind, Norm, PosEmb, Result};
use candle_core::Tensor;
use serde_json::{json, Value};
use std::collections::HashMap;

pub fn config_from_hf(j: &Value) -> Result<ModelConfig> {
    let g = Json(j);
    let bad = |m: String| Err(ModelError::Config(format!("config.json: {m}")));
    let mlp = match g.str_or("activation_function", "gelu") {
        "gelu" => Mlp::Gelu,
        "gelu_new" | "gelu_pytorch_tanh" => Mlp::GeluTanh,
        "relu" => Mlp::Relu,
        other => {
            return bad(format!("activation_function {other:?} is not supported (taper has gelu, gelu_new, relu)"))
        }
    };
    let heads = g.usize("encoder_attention_heads")?;
    if g.usize("decoder_attention_heads")? != heads {
        return bad("encoder_attention_heads and decoder_attention_heads differ; taper needs them equal".into());
    }
    let ffn = g.usize("encoder_ffn_dim")?;
    if g.usize("decoder_ffn_dim")? != ffn {
        return bad("encoder_ffn_dim and decoder_ffn_dim differ; taper needs them equal".into());
    }
    let vocab = g.usize("vocab_size")?;
    let share = g.bool_or("share_encoder_decoder_embeddings", true)?;
    if g.usize_or("decoder_vocab_size", vocab)? != vocab {
        return bad("decoder_vocab_size differs from vocab_size; taper needs one vocabulary".into());
    }
    if g.bool_or("normalize_before", false)? {
        return bad("normalize_before (pre-LN) is not supported; Marian is post-LN".into());
    }
    Ok(ModelConfig {
        kind: ModelKind::EncoderDecoder,
        vocab_size: vocab,
        n_layer: g.usize("encoder_layers")?,
        n_decoder_layer: g.usize("decoder_layers")?,
        n_head: heads,
        n_embd: g.usize("d_model")?,
        intermediate_size: ffn,
        block_size: g.usize("max_position_embeddings")?,
        pos_emb: PosEmb::Sinusoidal,
        norm: Norm::LayerNorm,
        norm_eps: 1e-5,
        mlp,
        bias: true,
        tie_embeddings: g.bool_or("tie_word_embeddings", true)?,
        share_embeddings: share,
        scale_embedding: g.bool_or("scale_embedding", false)?,
        dropout: g.f64_or("dropout", 0.0)?,
        ..Default::default()
    })
}

/// Token ids (pad, eos, decoder start) are the caller's to add: they come from the tokenizer.
pub fn config_to_hf(cfg: &ModelConfig) -> Value {
    let act = match cfg.mlp {
        Mlp::Gelu => "gelu",
        Mlp::GeluTanh => "gelu_new",
        Mlp::Relu | Mlp::Swiglu => "relu",
    };
    json!({
        "vocab_size": cfg.vocab_size,
        "decoder_vocab_size": cfg.vocab_size,
        "d_model": cfg.n_embd,
        "encoder_layers": cfg.n_layer,
        "decoder_layers": crate::marian::decoder_layers(cfg),
        "encoder_attention_heads": cfg.n_head,
        "decoder_attention_heads": cfg.n_head,
        "encoder_ffn_dim": cfg.hidden(),
        "decoder_ffn_dim": cfg.hidden(),
        "activation_function": act,
        "max_position_embeddings": cfg.block_size,
        "scale_embedding": cfg.scale_embedding,
        "share_encoder_decoder_embeddings": cfg.share_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        "dropout": cfg.dropout,
        "attention_dropout": cfg.dropout,
        "activation_dropout": 0.0,
        "is_encoder_decoder": true,
        "forced_eos_token_id": null,
    })
}

/// Drops what taper recomputes or ties: position tables, copies of a shared embedding, a tied
/// head. A checkpoint without `final_logits_bias` gets zeros (transformers' default).
pub fn weights_from_hf(cfg: &ModelConfig, mut hf: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    hf.retain(|k, _| !k.ends_with("embed_positions.weight"));
    if cfg.share_embeddings {
        let shared = ["model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"]
            .iter()
            .find_map(|k| hf.get(*k).cloned());
        hf.remove("model.encoder.embed_tokens.weight");
        hf.remove("model.decoder.embed_tokens.weight");
        if let Some(s) = shared {
            hf.insert("model.shared.weight".into(), s);
        }
    }
    if cfg.tie_embeddings {
        hf.remove("lm_head.weight");
    }
    if !hf.contains_key("final_logits_bias") {
        if let Some(e) = hf.values().next() {
            hf.insert("final_logits_bias".into(), Tensor::zeros((1, cfg.vocab_size), e.dtype(), e.device())?);
        }
    }
    Ok(hf)
}

/// taper's tensors under HF's names: the same names; a shared table also written as both
/// sides' `embed_tokens` is left to transformers' tying.
pub fn weights_to_hf(w: &HashMap<String, Tensor>) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = w.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
