//! Qwen2 (Yang et al. 2024, "Qwen2 Technical Report"; HF `modeling_qwen2.py`: the Llama
//! block with biases on q, k and v) and Qwen3 (Qwen Team 2025, "Qwen3 Technical Report"; HF
//! `modeling_qwen3.py`: no q/k/v biases, an RMSNorm on every query and key head, and a
//! head_dim set apart from hidden_size / heads). Tensor names are taper's own.

use super::{rope_from_hf, rope_to_hf, Family, Json};
use crate::{Mlp, ModelConfig, ModelError, Norm, PosEmb, Result};
use serde_json::{json, Value};

pub fn config_from_hf(j: &Value, family: Family) -> Result<ModelConfig> {
    let g = Json(j);
    let act = g.str_or("hidden_act", "silu");
    if act != "silu" {
        return Err(ModelError::Config(format!("config.json: hidden_act {act:?} is not supported (qwen uses silu)")));
    }
    if g.bool_or("use_sliding_window", false)? {
        return Err(ModelError::Config(
            "config.json: use_sliding_window = true (Qwen's per-layer sliding window) is not supported".into(),
        ));
    }
    let n_embd = g.usize("hidden_size")?;
    let n_head = g.usize("num_attention_heads")?;
    let qwen3 = family == Family::Qwen3;
    let attention_bias = g.bool_or("attention_bias", false)?;
    let mut cfg = ModelConfig {
        vocab_size: g.usize("vocab_size")?,
        n_layer: g.usize("num_hidden_layers")?,
        n_head,
        n_kv_head: g.usize_or("num_key_value_heads", n_head)?,
        n_embd,
        head_dim: g.usize_or("head_dim", n_embd / n_head.max(1))?,
        intermediate_size: g.usize("intermediate_size")?,
        block_size: g.usize("max_position_embeddings")?,
        pos_emb: PosEmb::Rope,
        norm: Norm::RmsNorm,
        norm_eps: g.f64_or("rms_norm_eps", 1e-6)?,
        mlp: Mlp::Swiglu,
        bias: false,
        qkv_bias: Some(if qwen3 { attention_bias } else { true }),
        o_bias: Some(qwen3 && attention_bias),
        mlp_bias: Some(false),
        qk_norm: qwen3,
        tie_embeddings: g.bool_or("tie_word_embeddings", false)?,
        ..Default::default()
    };
    rope_from_hf(j, &mut cfg, 1_000_000.0)?;
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
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_sliding_window": false,
        "attention_dropout": 0.0,
    });
    if family == Family::Qwen3 {
        j["attention_bias"] = cfg.qkv_bias().into();
    }
    rope_to_hf(cfg, &mut j);
    j
}
