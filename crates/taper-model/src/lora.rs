//! LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), laid
//! out as HF PEFT does: `lora_A` (r, in) and `lora_B` (out, r) beside each adapted linear,
//! y = x W^T + b + (dropout(x) A^T B^T) * alpha / r. B starts at zero, so training starts from
//! the base model exactly; A is drawn like PEFT's default (Kaiming-uniform, a = sqrt(5)).

use crate::decoder::param_specs;
use crate::rng::Rng;
use crate::{ModelConfig, ModelError, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Short names ("q", "k", "v", "o", "gate", "up", "down") or module names ("q_proj", ...).
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { r: 8, alpha: 16.0, dropout: 0.05, target_modules: ["q", "k", "v", "o"].map(String::from).to_vec() }
    }
}

const MODULES: [(&str, &str); 7] = [
    ("q", "self_attn.q_proj"),
    ("k", "self_attn.k_proj"),
    ("v", "self_attn.v_proj"),
    ("o", "self_attn.o_proj"),
    ("gate", "mlp.gate_proj"),
    ("up", "mlp.up_proj"),
    ("down", "mlp.down_proj"),
];

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// The module suffixes (`self_attn.q_proj`) chosen, or an error naming an unknown one.
    pub fn modules(&self) -> Result<Vec<&'static str>> {
        self.target_modules
            .iter()
            .map(|t| {
                let t = t.as_str();
                MODULES
                    .iter()
                    .find(|(short, full)| *short == t || full.ends_with(t) && t.ends_with("_proj"))
                    .map(|(_, full)| *full)
                    .ok_or_else(|| {
                        ModelError::Config(format!(
                            "lora.target_modules: unknown module {t:?} (use q, k, v, o, gate, up, down)"
                        ))
                    })
            })
            .collect()
    }

    pub fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        if self.r == 0 {
            e.push("lora.r must be > 0".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            e.push(format!("lora.dropout = {} must be in [0, 1)", self.dropout));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            e.push(format!("lora.alpha = {}: must be a finite number > 0", self.alpha));
        }
        if let Err(err) = self.modules() {
            e.push(err.to_string());
        }
        if self.target_modules.is_empty() {
            e.push("lora.target_modules is empty".into());
        }
        e
    }

    /// (linear name, out, in) of every adapted linear in `cfg`.
    pub fn targets(&self, cfg: &ModelConfig) -> Result<Vec<(String, usize, usize)>> {
        let modules = self.modules()?;
        Ok(param_specs(cfg)
            .into_iter()
            .filter_map(|(name, shape, _)| {
                let linear = name.strip_suffix(".weight")?;
                (shape.len() == 2 && modules.iter().any(|m| linear.ends_with(m)))
                    .then(|| (linear.to_string(), shape[0], shape[1]))
            })
            .collect())
    }
}

/// Fresh adapters: `{linear}.lora_A.weight` and `{linear}.lora_B.weight` for each target.
pub fn init_lora(cfg: &ModelConfig, l: &LoraConfig, seed: u64, dev: &Device) -> Result<Vec<(String, Tensor)>> {
    let mut rng = Rng::new(seed ^ 0x4C6F_5241);
    let mut out = Vec::new();
    for (linear, n_out, n_in) in l.targets(cfg)? {
        // kaiming_uniform_(a = sqrt(5)) on (r, in): bound = sqrt(6 / ((1 + a^2) fan_in)) = 1 / sqrt(fan_in).
        let bound = 1.0 / (n_in as f64).sqrt();
        let a: Vec<f32> = (0..l.r * n_in).map(|_| ((rng.uniform_f64() * 2.0 - 1.0) * bound) as f32).collect();
        out.push((format!("{linear}.lora_A.weight"), Tensor::from_vec(a, (l.r, n_in), dev)?));
        out.push((format!("{linear}.lora_B.weight"), Tensor::zeros((n_out, l.r), candle_core::DType::F32, dev)?));
    }
    Ok(out)
}

/// The base weights with each adapter folded in: W + (alpha / r) B A.
pub fn merge(
    base: &HashMap<String, Tensor>,
    adapters: &HashMap<String, Tensor>,
    l: &LoraConfig,
) -> Result<HashMap<String, Tensor>> {
    let mut out = base.clone();
    for (name, a) in adapters {
        let Some(linear) = name.strip_suffix(".lora_A.weight") else {
            // Trained alongside the adapters (a reward head): taken as is.
            if !name.ends_with(".lora_B.weight") {
                out.insert(name.clone(), a.clone());
            }
            continue;
        };
        let b = adapters
            .get(&format!("{linear}.lora_B.weight"))
            .ok_or_else(|| ModelError::MissingTensor { name: format!("{linear}.lora_B.weight") })?;
        let wname = format!("{linear}.weight");
        let w = base.get(&wname).ok_or_else(|| ModelError::MissingTensor { name: wname.clone() })?;
        let delta = (b.matmul(a)? * l.scale())?;
        out.insert(wname, (w + delta.to_dtype(w.dtype())?)?);
    }
    Ok(out)
}

/// PEFT's key for a taper adapter tensor (taper names are HF Llama-family names).
pub fn peft_key(name: &str) -> String {
    format!("base_model.model.{name}")
}

/// taper's name for a PEFT adapter key (`...lora_A.weight` or PEFT's `...lora_A.default.weight`).
pub fn from_peft_key(key: &str) -> Option<String> {
    let k = key.strip_prefix("base_model.model.")?;
    Some(k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."))
}

/// `adapter_config.json` as PEFT writes it.
pub fn adapter_config(l: &LoraConfig, base_model: &str) -> Result<serde_json::Value> {
    let modules: Vec<&str> = l.modules()?.iter().map(|m| m.rsplit('.').next().unwrap_or(m)).collect();
    Ok(serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": l.r,
        "lora_alpha": l.alpha,
        "lora_dropout": l.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{init_weights, Decoder, Mlp, Norm, PosEmb, Weights};
    use candle_core::{DType, Var};

    fn cfg() -> ModelConfig {
        ModelConfig {
            vocab_size: 19,
            n_layer: 2,
            n_head: 4,
            n_kv_head: 2,
            n_embd: 16,
            block_size: 12,
            pos_emb: PosEmb::Rope,
            norm: Norm::RmsNorm,
            mlp: Mlp::Swiglu,
            bias: false,
            tie_embeddings: false,
            ..Default::default()
        }
    }

    fn logits(w: Weights, cfg: &ModelConfig, ids: &Tensor) -> Tensor {
        Decoder::load(&w, cfg).unwrap().forward(ids, 0, None, None).unwrap()
    }

    #[test]
    fn adapters_start_at_the_base_model_train_alone_and_merge() {
        let (cfg, dev) = (cfg(), Device::Cpu);
        let l =
            LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, target_modules: vec!["q".into(), "v".into(), "down".into()] };
        let base: HashMap<String, Tensor> = init_weights(&cfg, 1, &dev).unwrap().into_iter().collect();
        let adapters = init_lora(&cfg, &l, 2, &dev).unwrap();
        assert_eq!(adapters.len(), 2 * 3 * cfg.n_layer);
        let ids = Tensor::new(&[[1u32, 4, 2, 9, 0, 18]], &dev).unwrap();
        let plain = logits(Weights::new(base.clone()), &cfg, &ids);
        let with = logits(Weights::new(base.clone()).with_lora(adapters.clone(), l.clone()), &cfg, &ids);
        assert_eq!((plain - &with).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);

        // Train-shaped: base detached, adapters variables (B made non-zero, as after a step).
        let vars: Vec<(String, Var)> = adapters
            .iter()
            .map(|(n, t)| {
                let t = if n.contains("lora_B") { (t.ones_like().unwrap() * 0.05).unwrap() } else { t.clone() };
                (n.clone(), Var::from_tensor(&t).unwrap())
            })
            .collect();
        let base_vars: Vec<Var> = base.values().map(|t| Var::from_tensor(t).unwrap()).collect();
        let w = Weights::new(base.iter().map(|(k, t)| (k.clone(), t.detach())).collect())
            .with_lora(vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())), l.clone());
        let out = Decoder::load(&w, &cfg).unwrap().forward(&ids, 0, None, None).unwrap();
        let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for (n, v) in &vars {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {n}"));
            assert!(g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "{n}");
        }
        assert!(base_vars.iter().all(|v| grads.get(v.as_tensor()).is_none()), "frozen base weights get no gradient");
        // Nor is one computed and kept for them under another id (candle's matmul backward
        // would store dW^T): no gradient in the store has a linear weight's shape.
        let weight_shapes: Vec<Vec<usize>> = param_specs(&cfg)
            .into_iter()
            .filter(|(n, s, _)| s.len() == 2 && n.contains("_proj"))
            .flat_map(|(_, s, _)| [s.clone(), vec![s[1], s[0]]])
            .collect();
        let adapter_ids: Vec<_> = vars.iter().map(|(_, v)| v.as_tensor().id()).collect();
        for id in grads.get_ids() {
            let g = grads.get_id(*id).unwrap();
            assert!(
                adapter_ids.contains(id) || !weight_shapes.contains(&g.dims().to_vec()),
                "a weight-shaped gradient {:?} was stored",
                g.dims()
            );
        }

        // Merged weights compute what base + adapters compute.
        let trained: HashMap<String, Tensor> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect();
        let merged = merge(&base, &trained, &l).unwrap();
        let a = logits(Weights::new(base.clone()).with_lora(trained, l.clone()), &cfg, &ids);
        let b = logits(Weights::new(merged), &cfg, &ids);
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F32).unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }

    #[test]
    fn names_and_config_follow_peft() {
        let l = LoraConfig { target_modules: vec!["q_proj".into(), "up".into()], ..Default::default() };
        assert_eq!(l.modules().unwrap(), vec!["self_attn.q_proj", "mlp.up_proj"]);
        let key = peft_key("model.layers.0.self_attn.q_proj.lora_A.weight");
        assert_eq!(key, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
        assert_eq!(from_peft_key(&key).unwrap(), "model.layers.0.self_attn.q_proj.lora_A.weight");
        let j = adapter_config(&l, "base").unwrap();
        assert_eq!(j["target_modules"], serde_json::json!(["q_proj", "up_proj"]));
        assert!(LoraConfig { target_modules: vec!["qq".into()], ..Default::default() }.validate()[0].contains("qq"));
    }
}
