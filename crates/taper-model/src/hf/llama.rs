//! Llama (Touvron et al. 2023, "LLaMA"; Llama 3's RoPE scaling from "The Llama 3 Herd of
//! Models", 2024) and Mistral (Jiang et al. 2023, sliding-window attention): HF
//! `modeling_llama.py` and `modeling_mistral.py`. RMSNorm, SwiGLU, RoPE (rotate-half), GQA.
//! The tensor names are taper's own.

use super::{rope_from_hf, rope_to_hf, Family, Json};
use crate::{Mlp, ModelConfig, ModelError, Norm, PosEmb, Result};
use serde_json::{json, Value};

pub fn config_from_hf(j: &Value, family: Family) -> Result<ModelConfig> {
    let g = Json(j);
    let act = g.str_or("hidden_act", "silu");
    if act != "silu" {
        return Err(ModelError::Config(format!("config.json: hidden_act {act:?} is not supported (llama uses silu)")));
    }
    let n_embd = g.usize("hidden_size")?;
    let n_head = g.usize("num_attention_heads")?;
    let attention_bias = g.bool_or("attention_bias", false)?;
    let max_pos = g.usize("max_position_embeddings")?;
    let mut cfg = ModelConfig {
        vocab_size: g.usize("vocab_size")?,
        n_layer: g.usize("num_hidden_layers")?,
        n_head,
        n_kv_head: g.usize_or("num_key_value_heads", n_head)?,
        n_embd,
        head_dim: g.usize_or("head_dim", n_embd / n_head.max(1))?,
        intermediate_size: g.usize("intermediate_size")?,
        block_size: max_pos,
        pos_emb: PosEmb::Rope,
        norm: Norm::RmsNorm,
        norm_eps: g.f64_or("rms_norm_eps", 1e-6)?,
        mlp: Mlp::Swiglu,
        bias: false,
        qkv_bias: Some(attention_bias),
        o_bias: Some(attention_bias),
        mlp_bias: Some(g.bool_or("mlp_bias", false)?),
        tie_embeddings: g.bool_or("tie_word_embeddings", false)?,
        ..Default::default()
    };
    rope_from_hf(j, &mut cfg, 10_000.0)?;
    if family == Family::Mistral {
        // A window at least as long as the context is no window at all.
        cfg.sliding_window = g.usize_or("sliding_window", 0)?;
        if cfg.sliding_window >= max_pos {
            cfg.sliding_window = 0;
        }
    }
    Ok(cfg)
}

pub fn config_to_hf(cfg: &ModelConfig, family: Family) -> Value {
    let mut j = json!({
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.hidden(),
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads(),
        "head_dim": cfg.head_dim(),
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "attention_bias": cfg.qkv_bias(),
        "mlp_bias": cfg.mlp_bias(),
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
    });
    rope_to_hf(cfg, &mut j);
    if family == Family::Mistral {
        j["sliding_window"] = if cfg.sliding_window > 0 { cfg.sliding_window.into() } else { Value::Null };
    }
    j
}
