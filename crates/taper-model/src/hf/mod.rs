//! Hugging Face models: `config.json` to [`ModelConfig`] and back, HF tensor names to taper's
//! and back, and loading a model directory (safetensors, single or sharded; f32, f16 or bf16).
//!
//! One file per architecture family; [`Family`] dispatches to them, and is the one place where
//! weight names map to HF's.

pub mod bert;
pub mod gpt2;
pub mod llama;
pub mod marian;
pub mod qwen;

use crate::{ModelConfig, ModelError, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The HF `model_type`s taper reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Gpt2,
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    /// An encoder: `BertForMaskedLM`.
    Bert,
    /// The encoder-decoder (`MarianMTModel`).
    Marian,
}

impl Family {
    pub fn from_model_type(t: &str) -> Result<Self> {
        Ok(match t {
            "gpt2" => Family::Gpt2,
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "bert" => Family::Bert,
            "marian" => Family::Marian,
            other => {
                return Err(ModelError::Config(format!(
                "config.json: model_type {other:?} is not supported (taper reads gpt2, llama, mistral, qwen2, qwen3, bert, marian)"
            )))
            }
        })
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Family::Gpt2 => "gpt2",
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Bert => "bert",
            Family::Marian => "marian",
        }
    }

    pub fn architecture(self) -> &'static str {
        match self {
            Family::Gpt2 => "GPT2LMHeadModel",
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Bert => "BertForMaskedLM",
            Family::Marian => "MarianMTModel",
        }
    }

    /// The HF family that can represent a taper model, if any.
    pub fn for_config(cfg: &ModelConfig) -> Result<Self> {
        use crate::{Mlp, Norm, PosEmb};
        let no = |why: &str| Err(ModelError::Config(format!("this model has no Hugging Face equivalent: {why}")));
        match cfg.kind {
            crate::ModelKind::Decoder => {}
            crate::ModelKind::Encoder if cfg.post_norm => return Ok(Family::Bert),
            crate::ModelKind::Encoder => return no("a pre-LN encoder (HF's bert is post-LN; set model.post_norm)"),
            crate::ModelKind::EncoderDecoder => {
                return match (cfg.pos_emb, cfg.bias) {
                    (PosEmb::Sinusoidal, true) => Ok(Family::Marian),
                    (p, true) => no(&format!("Marian has sinusoidal positions, this encoder-decoder has {p:?}")),
                    (_, false) => no("Marian has biases on every linear and LayerNorm (set model.bias)"),
                };
            }
        }
        match (cfg.pos_emb, cfg.norm, cfg.mlp) {
            (PosEmb::Learned, Norm::LayerNorm, Mlp::Gelu | Mlp::GeluTanh | Mlp::Relu) => {
                if !cfg.tie_embeddings {
                    return no("GPT-2 ties its output head to the embeddings (set model.tie_embeddings)");
                }
                if cfg.kv_heads() != cfg.n_head || cfg.head_dim() * cfg.n_head != cfg.n_embd || cfg.qk_norm {
                    return no("GPT-2 has plain multi-head attention");
                }
                Ok(Family::Gpt2)
            }
            (PosEmb::Rope, Norm::RmsNorm, Mlp::Swiglu) => {
                if cfg.qk_norm {
                    Ok(Family::Qwen3)
                } else if cfg.qkv_bias() && !cfg.o_bias() && !cfg.mlp_bias() {
                    Ok(Family::Qwen2)
                } else if cfg.sliding_window > 0 {
                    Ok(Family::Mistral)
                } else if cfg.qkv_bias() != cfg.o_bias() {
                    no("Llama has biases on all attention projections or on none")
                } else {
                    Ok(Family::Llama)
                }
            }
            (p, n, m) => no(&format!("pos_emb {p:?} with norm {n:?} and mlp {m:?}")),
        }
    }

    pub fn config_from_hf(self, j: &Value) -> Result<ModelConfig> {
        match self {
            Family::Gpt2 => gpt2::config_from_hf(j),
            Family::Llama | Family::Mistral => llama::config_from_hf(j, self),
            Family::Qwen2 | Family::Qwen3 => qwen::config_from_hf(j, self),
            Family::Bert => bert::config_from_hf(j),
            Family::Marian => marian::config_from_hf(j),
        }
    }

    pub fn config_to_hf(self, cfg: &ModelConfig) -> Value {
        let mut j = match self {
            Family::Gpt2 => gpt2::config_to_hf(cfg),
            Family::Llama | Family::Mistral => llama::config_to_hf(cfg, self),
            Family::Qwen2 | Family::Qwen3 => qwen::config_to_hf(cfg, self),
            Family::Bert => bert::config_to_hf(cfg),
            Family::Marian => marian::config_to_hf(cfg),
        };
        j["model_type"] = self.model_type().into();
        j["architectures"] = serde_json::json!([self.architecture()]);
        j["torch_dtype"] = "float32".into();
        j
    }

    /// HF tensors (any float dtype) to taper names, in f32. Unused HF buffers are dropped;
    /// a tied output head is dropped.
    pub fn weights_from_hf(self, cfg: &ModelConfig, hf: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
        let hf = hf.into_iter().map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?))).collect::<Result<HashMap<_, _>>>()?;
        match self {
            Family::Gpt2 => gpt2::weights_from_hf(cfg, hf),
            Family::Bert => bert::weights_from_hf(cfg, hf),
            Family::Marian => marian::weights_from_hf(cfg, hf),
            _ => Ok(llama_names_from_hf(cfg, hf)),
        }
    }

    /// taper tensors to HF names (the inverse of [`Family::weights_from_hf`]).
    pub fn weights_to_hf(self, cfg: &ModelConfig, w: &HashMap<String, Tensor>) -> Result<Vec<(String, Tensor)>> {
        match self {
            Family::Gpt2 => gpt2::weights_to_hf(cfg, w),
            Family::Bert => bert::weights_to_hf(cfg, w),
            Family::Marian => Ok(marian::weights_to_hf(w)),
            _ => {
                let mut v: Vec<(String, Tensor)> = w.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(v)
            }
        }
    }
}

/// Llama, Mistral and the Qwens use taper's own names; only the tied head goes.
fn llama_names_from_hf(cfg: &ModelConfig, mut hf: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    if cfg.tie_embeddings {
        hf.remove("lm_head.weight");
    }
    hf.retain(|k, _| !k.ends_with("rotary_emb.inv_freq"));
    hf
}

/// Field access on config.json with errors that name the key.
pub(crate) struct Json<'a>(pub &'a Value);

impl Json<'_> {
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.0
            .get(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| ModelError::Config(format!("config.json: `{key}` is missing or not a whole number")))
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(_) => self.usize(key),
        }
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| ModelError::Config(format!("config.json: `{key}` is not a number"))),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| ModelError::Config(format!("config.json: `{key}` is not true/false"))),
        }
    }

    pub fn str_or<'b>(&'b self, key: &str, default: &'b str) -> &'b str {
        self.0.get(key).and_then(Value::as_str).unwrap_or(default)
    }
}

/// RoPE theta and scaling: transformers 5 nests them in `rope_parameters`, older configs have
/// top-level `rope_theta` and `rope_scaling`.
pub(crate) fn rope_from_hf(j: &Value, cfg: &mut ModelConfig, default_theta: f64) -> Result<()> {
    let params = j.get("rope_parameters").filter(|v| v.is_object());
    let scaling = params.or_else(|| j.get("rope_scaling").filter(|v| v.is_object()));
    cfg.rope_theta = match params.and_then(|p| p.get("rope_theta")) {
        Some(t) => t.as_f64().ok_or_else(|| ModelError::Config("config.json: rope_theta is not a number".into()))?,
        None => Json(j).f64_or("rope_theta", default_theta)?,
    };
    if let Some(s) = scaling {
        let ty = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
        match ty {
            "default" => {}
            "llama3" => {
                let num = |k: &str| {
                    s.get(k).and_then(Value::as_f64).ok_or_else(|| {
                        ModelError::Config(format!("config.json: rope scaling llama3 needs a number `{k}`"))
                    })
                };
                cfg.rope_scaling = Some(crate::config::RopeScaling {
                    rope_type: "llama3".into(),
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
                });
            }
            other => {
                return Err(ModelError::Config(format!(
                    "config.json: rope scaling {other:?} is not supported (taper supports \"llama3\")"
                )))
            }
        }
    }
    Ok(())
}

pub(crate) fn rope_to_hf(cfg: &ModelConfig, j: &mut Value) {
    j["rope_theta"] = cfg.rope_theta.into();
    if let Some(r) = &cfg.rope_scaling {
        j["rope_scaling"] = serde_json::json!({
            "rope_type": r.rope_type, "factor": r.factor, "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_position_embeddings,
        });
    }
}

/// A model read from an HF directory.
pub struct HfModel {
    pub family: Family,
    pub config: ModelConfig,
    /// taper names, f32.
    pub weights: HashMap<String, Tensor>,
    pub hf_config: Value,
}

fn io(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Config(format!("{}: {e}", path.display()))
}

/// The safetensors files of a model directory: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`. Pickle checkpoints are refused: loading them can run code.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| io(&index, e))?;
        let j: Value = serde_json::from_str(&text).map_err(|e| io(&index, e))?;
        let map = j.get("weight_map").and_then(Value::as_object).ok_or_else(|| io(&index, "no `weight_map`"))?;
        let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    if dir.join("pytorch_model.bin").exists() || dir.join("pytorch_model.bin.index.json").exists() {
        return Err(io(
            dir,
            "has only pickle weights (pytorch_model.bin), which taper refuses to load because unpickling can run code; \
             convert them to safetensors (e.g. `model.save_pretrained(dir, safe_serialization=True)`)",
        ));
    }
    Err(io(dir, "no model.safetensors or model.safetensors.index.json"))
}

/// Reads every tensor of the given safetensors files, naming the file on any error.
pub fn read_safetensors(files: &[PathBuf], device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for f in files {
        if !f.exists() {
            return Err(io(f, "is missing (listed in the index)"));
        }
        let t = candle_core::safetensors::load(f, device)
            .map_err(|e| io(f, format!("not a valid safetensors file: {e}")))?;
        all.extend(t);
    }
    Ok(all)
}

/// Loads `config.json` and the weights of an HF model directory.
pub fn load_dir(dir: &Path, device: &Device) -> Result<HfModel> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| io(&cfg_path, e))?;
    let hf_config: Value = serde_json::from_str(&text).map_err(|e| io(&cfg_path, format!("not valid JSON: {e}")))?;
    let model_type =
        hf_config.get("model_type").and_then(Value::as_str).ok_or_else(|| io(&cfg_path, "no `model_type`"))?;
    let family = Family::from_model_type(model_type)?;
    let config = family.config_from_hf(&hf_config)?;
    let errs = config.validate();
    if !errs.is_empty() {
        return Err(io(&cfg_path, errs.join("; ")));
    }
    let raw = read_safetensors(&safetensors_files(dir)?, device)?;
    let weights = family.weights_from_hf(&config, raw)?;
    // Every expected tensor present with its shape; nothing unexpected left over.
    let specs = match config.kind {
        crate::ModelKind::Encoder => crate::bert::param_specs(&config),
        _ => crate::param_specs(&config),
    };
    for (name, shape, _) in &specs {
        match weights.get(name) {
            None => return Err(ModelError::MissingTensor { name: format!("{} (in {})", name, dir.display()) }),
            Some(t) if t.dims() != shape.as_slice() => {
                return Err(ModelError::ShapeMismatch {
                    name: name.clone(),
                    expected: shape.clone(),
                    found: t.dims().to_vec(),
                })
            }
            _ => {}
        }
    }
    // A sequence classifier's head (a reward model's `score`) rides along: (labels, width).
    if let Some(score) = weights.get("score.weight") {
        if score.rank() != 2 || score.dim(1)? != config.n_embd {
            return Err(ModelError::ShapeMismatch {
                name: "score.weight".into(),
                expected: vec![1, config.n_embd],
                found: score.dims().to_vec(),
            });
        }
    }
    if let Some(extra) = weights.keys().find(|k| k.as_str() != "score.weight" && !specs.iter().any(|(n, _, _)| n == *k))
    {
        return Err(ModelError::Config(format!(
            "{}: unexpected tensor `{extra}` for a {model_type} model with this config",
            dir.display()
        )));
    }
    Ok(HfModel { family, config, weights, hf_config })
}
