//! GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"; HF
//! `modeling_gpt2.py`): learned positions, pre-LayerNorm, GELU MLP, biases, tied head.
//! HF stores its projections as `Conv1D` (weight (in, out)) with q, k and v fused in
//! `c_attn`; taper keeps them apart as (out, in) linears, so names and layouts map here.

use super::Json;
use crate::{Mlp, ModelConfig, ModelError, Norm, PosEmb, Result};
use candle_core::{DType, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;

pub fn config_from_hf(j: &Value) -> Result<ModelConfig> {
    let g = Json(j);
    let mlp = match g.str_or("activation_function", "gelu_new") {
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Mlp::GeluTanh,
        "gelu" => Mlp::Gelu,
        "relu" => Mlp::Relu,
        other => {
            return Err(ModelError::Config(format!("config.json: activation_function {other:?} is not supported")))
        }
    };
    for (key, ok) in
        [("scale_attn_by_inverse_layer_idx", false), ("add_cross_attention", false), ("scale_attn_weights", true)]
    {
        if g.bool_or(key, ok)? != ok {
            return Err(ModelError::Config(format!("config.json: gpt2 with {key} = {} is not supported", !ok)));
        }
    }
    let n_embd = g.usize("n_embd")?;
    Ok(ModelConfig {
        vocab_size: g.usize("vocab_size")?,
        n_layer: g.usize("n_layer")?,
        n_head: g.usize("n_head")?,
        n_kv_head: 0,
        n_embd,
        head_dim: 0,
        intermediate_size: g.usize_or("n_inner", 4 * n_embd)?,
        block_size: g.usize("n_positions")?,
        pos_emb: PosEmb::Learned,
        norm: Norm::LayerNorm,
        norm_eps: g.f64_or("layer_norm_epsilon", 1e-5)?,
        mlp,
        bias: true,
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
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_positions": cfg.block_size,
        "n_inner": cfg.hidden(),
        "activation_function": act,
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": true,
        "tie_word_embeddings": true,
    })
}

/// (taper prefix, HF prefix) of each per-layer piece that maps one to one.
fn layer_pairs(i: usize) -> [(String, String); 5] {
    let (t, h) = (format!("model.layers.{i}"), format!("transformer.h.{i}"));
    [
        (format!("{t}.input_layernorm"), format!("{h}.ln_1")),
        (format!("{t}.post_attention_layernorm"), format!("{h}.ln_2")),
        (format!("{t}.self_attn.o_proj"), format!("{h}.attn.c_proj")),
        (format!("{t}.mlp.up_proj"), format!("{h}.mlp.c_fc")),
        (format!("{t}.mlp.down_proj"), format!("{h}.mlp.c_proj")),
    ]
}

fn is_conv(taper: &str) -> bool {
    taper.contains("_proj")
}

pub fn weights_from_hf(cfg: &ModelConfig, hf: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    // Checkpoints saved from GPT2Model lack the `transformer.` prefix; old ones carry the
    // causal-mask buffers `attn.bias` / `attn.masked_bias`.
    let hf: HashMap<String, Tensor> = hf
        .into_iter()
        .filter(|(k, _)| !k.ends_with(".attn.bias") && !k.ends_with(".attn.masked_bias"))
        .map(|(k, t)| {
            if k.starts_with("transformer.") || k == "lm_head.weight" {
                (k, t)
            } else {
                (format!("transformer.{k}"), t)
            }
        })
        .collect();
    let take = |name: &str| -> Result<Tensor> {
        hf.get(name).cloned().ok_or_else(|| ModelError::MissingTensor { name: name.to_string() })
    };
    let mut out = HashMap::new();
    out.insert("model.embed_tokens.weight".to_string(), take("transformer.wte.weight")?);
    out.insert("model.embed_positions.weight".to_string(), take("transformer.wpe.weight")?);
    out.insert("model.norm.weight".to_string(), take("transformer.ln_f.weight")?);
    out.insert("model.norm.bias".to_string(), take("transformer.ln_f.bias")?);
    if !cfg.tie_embeddings {
        out.insert("lm_head.weight".to_string(), take("lm_head.weight")?);
    }
    let c = cfg.n_embd;
    for i in 0..cfg.n_layer {
        for (t, h) in layer_pairs(i) {
            let w = take(&format!("{h}.weight"))?;
            let w = if is_conv(&t) { w.t()?.contiguous()? } else { w };
            out.insert(format!("{t}.weight"), w);
            out.insert(format!("{t}.bias"), take(&format!("{h}.bias"))?);
        }
        let h = format!("transformer.h.{i}.attn.c_attn");
        let (w, b) = (take(&format!("{h}.weight"))?, take(&format!("{h}.bias"))?);
        if w.dims() != [c, 3 * c] {
            return Err(ModelError::ShapeMismatch {
                name: format!("{h}.weight"),
                expected: vec![c, 3 * c],
                found: w.dims().to_vec(),
            });
        }
        for (j, p) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            let t = format!("model.layers.{i}.self_attn.{p}");
            out.insert(format!("{t}.weight"), w.narrow(1, j * c, c)?.t()?.contiguous()?);
            out.insert(format!("{t}.bias"), b.narrow(0, j * c, c)?.contiguous()?);
        }
    }
    Ok(out)
}

pub fn weights_to_hf(cfg: &ModelConfig, w: &HashMap<String, Tensor>) -> Result<Vec<(String, Tensor)>> {
    let get = |name: &str| -> Result<Tensor> {
        w.get(name).cloned().ok_or_else(|| ModelError::MissingTensor { name: name.to_string() })
    };
    // GPT-2 always has biases; a bias-free taper model exports zeros, which compute the same.
    let bias_or_zeros = |name: &str, n: usize| -> Result<Tensor> {
        match w.get(name) {
            Some(b) => Ok(b.clone()),
            None => Ok(Tensor::zeros(n, DType::F32, get("model.embed_tokens.weight")?.device())?),
        }
    };
    let c = cfg.n_embd;
    let mut out = vec![
        ("transformer.wte.weight".to_string(), get("model.embed_tokens.weight")?),
        ("transformer.wpe.weight".to_string(), get("model.embed_positions.weight")?),
        ("transformer.ln_f.weight".to_string(), get("model.norm.weight")?),
        ("transformer.ln_f.bias".to_string(), bias_or_zeros("model.norm.bias", c)?),
    ];
    for i in 0..cfg.n_layer {
        for (t, h) in layer_pairs(i) {
            let wt = get(&format!("{t}.weight"))?;
            let n_out = wt.dim(0)?;
            out.push((format!("{h}.weight"), if is_conv(&t) { wt.t()?.contiguous()? } else { wt }));
            out.push((format!("{h}.bias"), bias_or_zeros(&format!("{t}.bias"), n_out)?));
        }
        let t = format!("model.layers.{i}.self_attn");
        let ws: Vec<Tensor> =
            ["q_proj", "k_proj", "v_proj"].iter().map(|p| get(&format!("{t}.{p}.weight"))).collect::<Result<_>>()?;
        let bs: Vec<Tensor> = ["q_proj", "k_proj", "v_proj"]
            .iter()
            .map(|p| bias_or_zeros(&format!("{t}.{p}.bias"), c))
            .collect::<Result<_>>()?;
        let h = format!("transformer.h.{i}.attn.c_attn");
        out.push((format!("{h}.weight"), Tensor::cat(&ws, 0)?.t()?.contiguous()?));
        out.push((format!("{h}.bias"), Tensor::cat(&bs, 0)?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
