//! Model sources: a taper checkpoint or run dir, a local Hugging Face model dir, or a hub id
//! `hf://Org/Name[@revision]`. Each loads to the same thing: a config, taper-named weights,
//! the tokenizer, its special tokens and chat template, and generation defaults.

use crate::checkpoint;
use crate::{Result, TrainError};
use candle_core::{Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use taper_data::{hub, tokenizer};
use taper_model::hf::Family;
use taper_model::ModelConfig;

/// `generation_config.json`'s defaults, for `taper generate`.
#[derive(Debug, Clone, Default)]
pub struct GenerationDefaults {
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub max_new_tokens: Option<usize>,
}

pub struct Source {
    pub dir: PathBuf,
    /// Set for HF sources; a taper checkpoint's family is [`Family::for_config`].
    pub family: Option<Family>,
    pub config: ModelConfig,
    pub weights: HashMap<String, Tensor>,
    pub tokenizer_path: PathBuf,
    pub tokenizer: tokenizers::Tokenizer,
    pub tokenizer_config: Option<Value>,
    pub chat_template: Option<String>,
    pub bos_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_ids: Vec<u32>,
    pub generation: GenerationDefaults,
    pub hf_config: Option<Value>,
    /// The run config, for taper checkpoints.
    pub run_config: Option<crate::RunConfig>,
    /// For a LoRA checkpoint: its adapters and base. `weights` holds them merged.
    pub lora: Option<LoraParts>,
}

impl Source {
    /// One clear error when the model is not of the `kind` a command needs (a BERT checkpoint
    /// given to a decoder recipe), before anything else goes wrong with it.
    pub fn expect_kind(&self, kind: taper_model::ModelKind) -> Result<()> {
        if self.config.kind == kind {
            return Ok(());
        }
        let e = taper_model::ModelError::WrongKind { found: self.config.kind, needed: kind };
        Err(TrainError::Invalid(format!("{}: {e}", self.dir.display())))
    }
}

/// A LoRA checkpoint's own parts, kept beside the merged weights for adapter export.
pub struct LoraParts {
    pub config: taper_model::lora::LoraConfig,
    /// The base model's source spec, as the SFT config named it.
    pub base: String,
    /// taper-named adapter tensors (`...q_proj.lora_A.weight`).
    pub adapters: HashMap<String, Tensor>,
}

fn bad(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Invalid(format!("{}: {}", path.display(), reason.into()))
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(crate::io_err(path))?;
    serde_json::from_str(&text).map(Some).map_err(|e| bad(path, format!("not valid JSON: {e}")))
}

/// A token named in tokenizer_config.json: a string or `{"content": ...}`.
fn token_field(cfg: &Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

fn ids_field(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => Vec::new(),
    }
}

/// Resolves a source spec to a local directory (fetching hub repos).
pub fn resolve(spec: &str) -> Result<PathBuf> {
    if let Some(r) = hub::HubRef::parse(spec) {
        return Ok(hub::fetch_model(&r)?);
    }
    let p = PathBuf::from(spec);
    if !p.exists() {
        return Err(TrainError::Invalid(format!(
            "model source {spec}: no such directory (give a checkpoint, a run dir, an HF model dir or hf://Org/Name)"
        )));
    }
    Ok(p)
}

/// Loads any model source onto `device`.
pub fn load(spec: &str, device: &Device) -> Result<Source> {
    let dir = resolve(spec)?;
    let is_taper = dir.join("trainer_state.json").exists() || dir.join("checkpoints").is_dir();
    let (dir, family, config, weights, hf_config, run_config, lora) = if is_taper {
        let ck_dir = checkpoint::resolve(&dir)?;
        let ck = checkpoint::load_model_checkpoint(&ck_dir, device)?;
        // Adapters apply over their base, merged: every consumer then sees plain weights.
        let (weights, lora) = match ck.lora {
            Some((l, base)) => {
                let b = load(&base, device)?;
                let merged = taper_model::lora::merge(&b.weights, &ck.weights, &l)?;
                (merged, Some(LoraParts { config: l, base, adapters: ck.weights }))
            }
            None => (ck.weights, None),
        };
        (ck_dir, None, ck.model, weights, None, ck.run, lora)
    } else if dir.join("config.json").exists() {
        let m = taper_model::hf::load_dir(&dir, device)?;
        (dir, Some(m.family), m.config, m.weights, Some(m.hf_config), None, None)
    } else {
        return Err(bad(&dir, "neither a taper checkpoint or run dir nor an HF model dir (no config.json)"));
    };
    let tokenizer_path = dir.join("tokenizer.json");
    let tok = tokenizer::load(&tokenizer_path)?;
    let n_tok = tokenizer::vocab_size(&tok);
    if n_tok > config.vocab_size {
        return Err(bad(
            &tokenizer_path,
            format!("the tokenizer has {n_tok} tokens but the model's vocab_size is {}", config.vocab_size),
        ));
    }
    let tokenizer_config = read_json(&dir.join("tokenizer_config.json"))?;
    let gen = read_json(&dir.join("generation_config.json"))?;
    let chat_template = match tokenizer_config.as_ref().and_then(|c| c.get("chat_template")).and_then(Value::as_str) {
        Some(t) => Some(t.to_string()),
        None => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
    };
    let special =
        |key: &str| tokenizer_config.as_ref().and_then(|c| token_field(c, key)).and_then(|t| tok.token_to_id(&t));
    let mut eos_ids = ids_field(gen.as_ref().and_then(|g| g.get("eos_token_id")));
    eos_ids.extend(special("eos_token"));
    if eos_ids.is_empty() {
        eos_ids.extend(hf_config.as_ref().map(|c| ids_field(c.get("eos_token_id"))).unwrap_or_default());
    }
    if eos_ids.is_empty() {
        eos_ids.extend(tokenizer::eos_id(&tok));
    }
    eos_ids.sort_unstable();
    eos_ids.dedup();
    let bos_id =
        special("bos_token").or_else(|| gen.as_ref().and_then(|g| ids_field(g.get("bos_token_id")).first().copied()));
    let g = |k: &str| gen.as_ref().and_then(|g| g.get(k));
    let generation = GenerationDefaults {
        do_sample: g("do_sample").and_then(Value::as_bool),
        temperature: g("temperature").and_then(Value::as_f64),
        top_k: g("top_k").and_then(Value::as_u64).map(|v| v as usize),
        top_p: g("top_p").and_then(Value::as_f64),
        max_new_tokens: g("max_new_tokens").and_then(Value::as_u64).map(|v| v as usize),
    };
    Ok(Source {
        dir,
        family,
        config,
        weights,
        tokenizer_path,
        tokenizer: tok,
        tokenizer_config,
        chat_template,
        bos_id,
        eos_ids,
        generation,
        hf_config,
        run_config,
        lora,
    })
}
